//! The two classic polling-outbox failures, provoked with real concurrent transactions: a row
//! committed after later-numbered rows were published is not skipped, and an aggregate's
//! events are published in commit order even when the writer that started first commits last.

use std::collections::HashMap;

use rdkafka::Message;

use dualsync::publish::headers;

use dualsync::config::{Config, OutboxSourceConfig, SourceConfig};

use crate::capture_modes::Mode;
use crate::common::*;

/// A relay-only pipeline whose source is a fresh database holding the sample shop and the
/// outbox (`setup` is connected to it), its outbox source tuned by `tune`.
struct Outbox {
    servers: Servers,
    source_url: String,
    config: Config,
    /// The `customers` topic.
    topic: String,
    setup: tokio_postgres::Client,
}

async fn outbox(tune: impl FnOnce(&mut OutboxSourceConfig)) -> Outbox {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let mut config = pipeline(&servers, &source_url, &source_url, &unique("t"), "");
    if let Some(SourceConfig::PostgresOutbox(s)) = &mut config.source {
        tune(s);
    }
    let topic = config.kafka.topic_for("customers");
    let setup = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&setup).await.unwrap();
    Outbox {
        servers,
        source_url,
        config,
        topic,
        setup,
    }
}

async fn insert(tx: &tokio_postgres::Transaction<'_>, id: &str, name: &str) {
    let payload = serde_json::json!({"id": id, "name": name, "email": "e", "order_count": 0});
    tx.execute(
        "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES ('customers', $1, 'CustomerUpserted', $2)",
        &[&id, &payload],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_commits_are_not_skipped_and_each_aggregate_keeps_commit_order() {
    let Outbox {
        servers,
        source_url,
        config,
        topic,
        setup,
    } = outbox(|_| {}).await;
    let run = run_pipeline(&config, &[]);

    // T1 writes aggregate "x" first and stays open.
    let mut c1 = dualsync::pg::connect(&source_url).await.unwrap();
    let t1 = c1.transaction().await.unwrap();
    insert(&t1, "x", "first-started").await;

    // Meanwhile other transactions commit and are published.
    let mut c2 = dualsync::pg::connect(&source_url).await.unwrap();
    for i in 0..5 {
        let t = c2.transaction().await.unwrap();
        insert(&t, &format!("y{i}"), "other").await;
        t.commit().await.unwrap();
    }
    let published = read_topic(&servers.kafka, &topic, 5).await;
    assert_eq!(
        published.len(),
        5,
        "later transactions are published while T1 is open"
    );

    // T2 writes the same aggregate "x": it waits for T1 inside its insert.
    let url = source_url.clone();
    let t2 = tokio::spawn(async move {
        let mut c3 = dualsync::pg::connect(&url).await.unwrap();
        let t = c3.transaction().await.unwrap();
        insert(&t, "x", "second").await;
        t.commit().await.unwrap();
    });
    // T2 must be blocked behind T1: poll pg_locks until it waits on the advisory lock.
    eventually("T2 waits on the aggregate's lock", || async {
        setup
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    t1.commit().await.unwrap();
    t2.await.unwrap();

    let all = read_topic(&servers.kafka, &topic, 7).await;
    assert_eq!(all.len(), 7, "the late commit was not skipped");
    let mut by_key: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for m in &all {
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let version: i64 = header(m, headers::VERSION).unwrap().parse().unwrap();
        let event = schemas().decode(m.payload().unwrap()).unwrap();
        let name = event.payload.unwrap()["name"].as_str().unwrap().to_string();
        by_key.entry(key).or_default().push((version, name));
    }
    let x = &by_key["x"];
    assert_eq!(x.len(), 2);
    assert_eq!(
        x[0].1, "first-started",
        "T1 committed first, so it is first on the partition"
    );
    assert_eq!(x[1].1, "second");
    assert!(x[0].0 < x[1].0, "versions follow commit order");
    // The held-open row got a lower seq than rows published before it: no cursor would see it.
    let y_min = by_key["y0"][0].0;
    assert!(x[0].0 < y_min);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_that_started_first_but_commits_last_is_published_last() {
    let Outbox {
        servers,
        source_url,
        config,
        topic,
        setup: _setup,
    } = outbox(|_| {}).await;

    // A starts first and takes a transaction id by writing business data.
    let mut ca = dualsync::pg::connect(&source_url).await.unwrap();
    let a = ca.transaction().await.unwrap();
    a.execute(
        "INSERT INTO shop.customers (id, name, email) VALUES ('z', 'a', 'e')",
        &[],
    )
    .await
    .unwrap();
    let xid_a: String = a
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    // B starts later, writes the same aggregate's event and commits first.
    let mut cb = dualsync::pg::connect(&source_url).await.unwrap();
    let b = cb.transaction().await.unwrap();
    let xid_b: String = b
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(xid_a.parse::<u64>().unwrap() < xid_b.parse::<u64>().unwrap());
    insert(&b, "z", "B").await;
    b.commit().await.unwrap();
    insert(&a, "z", "A").await;
    a.commit().await.unwrap();

    let run = run_pipeline(&config, &[]);
    let all = read_topic(&servers.kafka, &topic, 2).await;
    let names: Vec<String> = all
        .iter()
        .map(|m| {
            schemas()
                .decode(m.payload().unwrap())
                .unwrap()
                .payload
                .unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["B", "A"], "commit order, not transaction-id order");
    run.stop().await;
}

/// The pipelined relay under contention: small batches (7 rows, up to 8 in flight), writers
/// contending on 12 aggregates, and transactions held open for a while after their insert
/// so rows commit late, below rows of batches already on their way. Every row must arrive
/// exactly once (nothing crashed), and each key's versions in partition order must be the
/// order its transactions committed, which the outbox records as increasing `seq`. (It caught
/// the producer taking a failed first request to a new partition for delivered: see
/// `new_topics`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_batches_publish_every_row_once_and_each_key_in_commit_order() {
    pipelined_batches_in_commit_order(Mode::Poll).await;
}

/// The same from the WAL, with writers that take no lock: commit order comes from the WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_pipelined_batches_publish_every_row_once_and_each_key_in_commit_order() {
    pipelined_batches_in_commit_order(Mode::Wal).await;
}

async fn pipelined_batches_in_commit_order(mode: Mode) {
    use rand::{Rng, SeedableRng};
    let Outbox {
        servers,
        source_url,
        mut config,
        topic,
        setup,
    } = outbox(|s| {
        s.batch_size = 7;
        s.max_batches_in_flight = 8;
        s.linger_ms = 0;
    })
    .await;
    let prepared = mode.prepare(&setup, &source_url).await;
    if let Some(SourceConfig::PostgresOutbox(s)) = &mut config.source {
        prepared.apply(s);
    }
    let run = run_pipeline(&config, &[]);

    let mut writers = Vec::new();
    for w in 0..6u64 {
        let url = source_url.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut client = dualsync::pg::connect(&url).await.unwrap();
            for i in 0..60 {
                let tx = client.transaction().await.unwrap();
                let id = format!("k{}", rng.gen_range(0..12));
                insert(&tx, &id, &format!("w{w}-{i}")).await;
                if rng.gen_bool(0.2) {
                    // Workload shape, not synchronisation: commit late.
                    tokio::time::sleep(std::time::Duration::from_millis(rng.gen_range(5..60)))
                        .await;
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let expected: i64 = setup
        .query_one("SELECT count(*) FROM dualsync.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(expected, 360);
    let all = read_topic(&servers.kafka, &topic, expected as usize).await;
    if mode == Mode::Poll {
        eventually("every row is marked published", || async {
            dualsync::demo::outbox_counts(&setup).await.unwrap().1 == 0
        })
        .await;
    }
    let ids: std::collections::HashSet<String> = all
        .iter()
        .map(|m| header(m, headers::EVENT_ID).unwrap())
        .collect();
    assert_eq!(all.len(), 360, "no row twice, none missing");
    assert_eq!(ids.len(), 360);
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for m in &all {
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        by_key
            .entry(key)
            .or_default()
            .push(header(m, headers::VERSION).unwrap().parse().unwrap());
    }
    for (key, versions) in &by_key {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{key}: versions out of commit order on its partition: {versions:?}"
        );
    }
    // Commit order without trusting the versions: one writer's transactions commit one after
    // the other, so on each key they appear in the order the writer made them.
    let mut last: HashMap<(String, String), u32> = HashMap::new();
    for m in &all {
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        let name = schemas()
            .decode(m.payload().unwrap())
            .unwrap()
            .payload
            .unwrap()["name"]
            .as_str()
            .unwrap()
            .to_string();
        let (writer, i) = name.split_once('-').unwrap();
        let i: u32 = i.parse().unwrap();
        if let Some(before) = last.insert((key.clone(), writer.to_string()), i) {
            assert!(
                before < i,
                "{key}: {writer}'s transaction {i} after its {before}"
            );
        }
    }
    let batches = run
        .relay
        .batch_size
        .with_label_values(&[dualsync::metrics::stage::RELAY])
        .get_sample_count();
    assert!(
        batches >= 360 / 7,
        "the rows went out in small batches: {batches}"
    );
    run.stop().await;
}

/// `retention_secs = 0`: a row is deleted once Kafka acknowledged it, instead of kept marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_retention_published_rows_are_deleted() {
    let Outbox {
        servers,
        source_url,
        config,
        topic,
        setup,
    } = outbox(|s| {
        s.retention_secs = 0;
        s.batch_size = 10;
    })
    .await;
    let mut client = dualsync::pg::connect(&source_url).await.unwrap();
    for i in 0..45 {
        let tx = client.transaction().await.unwrap();
        insert(&tx, &format!("c{}", i % 9), &format!("n{i}")).await;
        tx.commit().await.unwrap();
    }
    let run = run_pipeline(&config, &[]);
    let all = read_topic(&servers.kafka, &topic, 45).await;
    assert_eq!(all.len(), 45);
    eventually("every published row is deleted", || async {
        dualsync::demo::outbox_counts(&setup).await.unwrap().0 == 0
    })
    .await;
    run.stop().await;
}

/// A backlog that grew after the last ANALYZE (the relay was down) must still be read along
/// the unpublished index, a batch at a time: without the leader's session settings the
/// planner, expecting a few rows, fetched and sorted the whole backlog for every batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_with_stale_statistics_is_read_along_the_index() {
    use dualsync::source::outbox::SESSION_SETTINGS;
    let servers = servers();
    let source_url = create_database(&servers).await;
    let client = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    client
        .batch_execute(
            "ALTER TABLE dualsync.outbox SET (autovacuum_enabled = false);
             ANALYZE dualsync.outbox;
             INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             SELECT 'customers', 'c' || (i % 500), 'CustomerUpserted',
                    jsonb_build_object('id', 'c' || (i % 500), 'name', 'n', 'email', 'e', 'order_count', i)
             FROM generate_series(1, 30000) i;",
        )
        .await
        .unwrap();
    let unsettled = read_plan(&client).await;
    assert!(
        unsettled.contains("\"Sort\""),
        "the trap this guards against: the default plan sorts the backlog: {unsettled}"
    );
    client.batch_execute(SESSION_SETTINGS).await.unwrap();
    let settled = read_plan(&client).await;
    assert!(
        settled.contains("\"Index Scan\"") && !settled.contains("\"Sort\""),
        "the leader's read walks the index: {settled}"
    );
    // So does the read of a pipeline that carries only some aggregate types.
    let text = pipeline_toml(&servers, &source_url, &source_url, "m", "").replacen(
        "kind = \"postgres_outbox\"\n",
        "kind = \"postgres_outbox\"\ninclude_aggregates = [\"cust*\"]\nexclude_aggregates = [\"x\"]\n",
        1,
    );
    let config =
        dualsync::config::Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new())
            .unwrap();
    let filter = dualsync::source::outbox::AggregateFilter::new(config.outbox_source().unwrap());
    let (limit, pending) = (1000i64, vec![1i64, 2, 3]);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&limit, &pending];
    params.extend(filter.params());
    let row = client
        .query_one(
            &format!("EXPLAIN (FORMAT JSON) {}", filter.read_batch_sql(true)),
            &params,
        )
        .await
        .unwrap();
    let filtered = row.get::<_, serde_json::Value>(0).to_string();
    assert!(
        filtered.contains("\"Index Scan\"") && !filtered.contains("\"Sort\""),
        "the filtered read walks the index: {filtered}"
    );
}

async fn read_plan(client: &tokio_postgres::Client) -> String {
    let explain = format!(
        "EXPLAIN (FORMAT JSON) {}",
        dualsync::source::outbox::READ_BATCH
    );
    let row = client
        .query_one(&explain, &[&1000i64, &vec![1i64, 2, 3]])
        .await
        .unwrap();
    row.get::<_, serde_json::Value>(0).to_string()
}

/// `retention_secs > 0` under a sustained rate far above the old purge limit (10,000 rows a
/// minute): published rows past their retention are deleted in chunks as fast as they are
/// published, so the outbox on the primary stays bounded and empties soon after the writers
/// stop; rows not yet published are never purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn published_rows_are_purged_as_fast_as_they_are_published() {
    let Outbox {
        source_url,
        config,
        setup,
        ..
    } = outbox(|s| {
        s.retention_secs = 1;
    })
    .await;
    let run = run_pipeline(&config, &[]);
    let written = dualsync::demo::generate(&source_url, 200, 2000, 15_000, 4, 11)
        .await
        .unwrap();
    assert!(written > 0);
    let published = || dualsync::metrics::total(&run.relay.published);
    eventually("every event is published", || async {
        dualsync::demo::outbox_counts(&setup).await.unwrap().1 == 0
    })
    .await;
    assert!(published() > 15_000, "{} published", published());
    eventually(
        "every published row past its retention is purged",
        || async { dualsync::demo::outbox_counts(&setup).await.unwrap().0 == 0 },
    )
    .await;
    run.stop().await;
}
