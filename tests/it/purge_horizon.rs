//! The purge horizon after faults (issue #35 item 1): a late event for a key whose tombstone
//! was purged never resurrects it, a key that was never deleted is never dropped silently by
//! the horizon (it is dead-lettered as `sink.below_purge_horizon` when the sink cannot tell),
//! and a purge by one member cannot race another member's write into a resurrection.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::Document;
use rdkafka::Message;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::dlq::headers as dlq;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::{Sink, SinkReader, SinkRecord};

use crate::common::*;

/// The fix-and-replay scenario: `c7`'s first event is refused by the sink (a CHECK
/// constraint) and dead-lettered; deletes of other customers are applied and their tombstones
/// purged, so the horizon passes `c7`'s version; the constraint is dropped and the letter
/// replayed. The sink cannot tell `c7`'s replayed first write from an event older than a purged
/// delete, so it must not write it, and must not drop it silently either: it is dead-lettered
/// again, as `sink.below_purge_horizon`, and the documented recovery (a new version above the
/// horizon, as `verify --repair` emits) brings it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_first_write_below_the_purge_horizon_is_dead_lettered_not_dropped() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    // Another member of the group: it creates the table, and purges.
    let member = postgres_sink(&config).await;
    let seed = SinkRecord::from(named_customer("seed", 1, "s"));
    member.apply(&[seed]).await.unwrap();
    let replica = dualsync::pg::connect(&sink_url).await.unwrap();
    replica
        .batch_execute(
            "ALTER TABLE replica.customers ADD CONSTRAINT no_refused CHECK (doc->>'name' <> 'refused')",
        )
        .await
        .unwrap();

    let (topic, producer) = topic_with_producer(&config, "customers").await;
    let events = [
        named_customer("c7", 5, "refused"),
        named_customer("d1", 6, "d"),
        named_customer("d2", 7, "d"),
        customer_event("d1", 20, None),
        customer_event("d2", 21, None),
    ];
    produce_events(&producer, &topic, &events).await;

    let cancel = CancellationToken::new();
    let (apply, _stats) = spawn_apply(&config, "postgres", &cancel);
    let dlq_topic = format!("{topic}.dlq");
    let letters = read_topic(&servers.kafka, &dlq_topic, 1).await;
    assert_eq!(letters[0].key(), Some(&b"c7"[..]));
    eventually("the deletes are applied", || async {
        member.get("customers", "d2").await.unwrap() == Some((21, None))
    })
    .await;
    eventually("the tombstones are purged", || async {
        member
            .purge_tombstones(Duration::ZERO, Duration::ZERO)
            .await
            .unwrap();
        member.get("customers", "d1").await.unwrap().is_none()
            && member.get("customers", "d2").await.unwrap().is_none()
    })
    .await;

    // The operator fixes the cause and replays the letter.
    replica
        .batch_execute("ALTER TABLE replica.customers DROP CONSTRAINT no_refused")
        .await
        .unwrap();
    crate::dead_letters::force_replay(&config, &dlq_topic).await;
    let letters = read_topic(&servers.kafka, &dlq_topic, 2).await;
    assert_eq!(letters.len(), 2, "the replayed c7 is dead-lettered again");
    assert_eq!(letters[1].key(), Some(&b"c7"[..]));
    assert_eq!(
        header(&letters[1], dlq::CLASS).as_deref(),
        Some("sink.below_purge_horizon")
    );
    let message = header(&letters[1], dlq::MESSAGE).unwrap();
    assert!(
        message.contains("(21)") && message.contains("verify --repair"),
        "{message}"
    );
    assert_eq!(member.get("customers", "c7").await.unwrap(), None);

    // The recovery the letter names: the primary's state at a version above the horizon.
    produce_events(&producer, &topic, &[named_customer("c7", 22, "fixed")]).await;
    eventually("c7 arrives at its new version", || async {
        member.get("customers", "c7").await.unwrap().map(|r| r.0) == Some(22)
    })
    .await;
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

fn thing(key: &str, version: i64, n: Option<i64>) -> SinkRecord {
    SinkRecord {
        namespace: "things".into(),
        key: key.into(),
        version,
        document: n.map(|n| json!({ "n": n })),
    }
}

/// After A's late `x@7` (its `outcome`) raced B's purge: `x` was not resurrected; once the
/// grace has passed B purges the tombstone, and the late event is refused (named), never
/// written.
async fn not_resurrected<S: Sink + SinkReader>(
    a: &S,
    b: &S,
    outcome: dualsync::sink::ApplyOutcome,
) {
    assert_eq!(outcome.applied(), 0, "{outcome:?}");
    assert_ne!(
        a.get("things", "x").await.unwrap(),
        Some((7, Some(json!({"n": 7})))),
        "x was resurrected"
    );
    eventually("x's tombstone is purged", || async {
        b.purge_tombstones(Duration::ZERO, Duration::ZERO)
            .await
            .unwrap();
        b.get("things", "x").await.unwrap().is_none()
    })
    .await;
    let outcome = a.apply(&[thing("x", 7, Some(7))]).await.unwrap();
    assert_eq!(outcome.rejected.len(), 1, "{outcome:?}");
    assert_eq!(a.get("things", "x").await.unwrap(), None);
}

/// How many sessions of `db` (a database name) wait on a lock.
async fn waiting_on_locks(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until `task` finished or at least `sessions` sessions wait on a lock.
async fn finished_or_waiting<T>(
    task: &tokio::task::JoinHandle<T>,
    client: &tokio_postgres::Client,
    sessions: i64,
) {
    eventually("the task finished or waits on a lock", || async {
        task.is_finished() || waiting_on_locks(client).await >= sessions
    })
    .await;
}

/// Two members of one group share a PostgreSQL sink. B purges `x`'s tombstone (v10) while A
/// writes a late `x@7`; a third session holds `x`'s row (`FOR SHARE`: it holds up a delete and
/// a write's row lock alike), A's write starts while B's purge is held or done, then the row is
/// released. A late event must never bring `x` back, whatever order the two end in. (Before
/// the fix, B's delete and horizon committed together while A's statement, waiting behind
/// B's delete, already held the old horizon: A re-inserted `x@7` once the tombstone was gone.
/// Now B's first cycle only raises the horizon, and deletes a grace later.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_by_one_member_never_lets_another_resurrect_a_record_postgres() {
    let servers = servers();
    let url = create_database(&servers).await;
    let connect = || async {
        PostgresSink::connect(&dualsync::config::PostgresSinkConfig {
            url: dualsync::config::Secret::new(url.clone()),
            timeout_ms: 30_000,
            schema: "replica".into(),
            tombstone_retention_secs: 3600,
            tables: Default::default(),
        })
        .await
        .unwrap()
    };
    let (a, b) = (Arc::new(connect().await), Arc::new(connect().await));
    a.apply(&[thing("x", 5, Some(5))]).await.unwrap();
    a.apply(&[thing("x", 10, None)]).await.unwrap();
    b.apply(&[thing("other", 1, Some(1))]).await.unwrap();

    let mut holder = dualsync::pg::connect(&url).await.unwrap();
    let observer = dualsync::pg::connect(&url).await.unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.execute("SELECT 1 FROM replica.things WHERE id = 'x' FOR SHARE", &[])
        .await
        .unwrap();

    // B's purge cycles, as its timer would run them, with a grace far longer than A's write.
    let purger = {
        let b = b.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                b.purge_tombstones(Duration::ZERO, Duration::from_secs(3600))
                    .await
                    .unwrap();
            }
        })
    };
    finished_or_waiting(&purger, &observer, 1).await;
    let writer = {
        let a = a.clone();
        tokio::spawn(async move { a.apply(&[thing("x", 7, Some(7))]).await.unwrap() })
    };
    finished_or_waiting(&writer, &observer, 2).await;
    hold.commit().await.unwrap();
    purger.await.unwrap();
    not_resurrected(&*a, &b, writer.await.unwrap()).await;
}

/// The same race on MongoDB (no transactions there): A reads the horizon, then, before A's
/// upsert of a late `x@7` reaches the server, B runs its purge cycles. A test hook (the
/// command interceptor) holds A's `update` command until B is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_by_one_member_never_lets_another_resurrect_a_record_mongo() {
    let servers = servers();
    let config = dualsync::config::MongoSinkConfig {
        url: dualsync::config::Secret::new(servers.mongo.clone()),
        timeout_ms: 30_000,
        database: unique("t"),
        tombstone_retention_secs: 3600,
    };
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(Some((reached_tx, go_rx)));
    let a = MongoSink::connect(&config)
        .await
        .unwrap()
        .with_interceptor(Arc::new(move |command: &Document| {
            let late = command
                .get_array("updates")
                .ok()
                .and_then(|u| u.first())
                .and_then(|u| u.as_document())
                .and_then(|u| u.get_document("u").ok())
                .and_then(|d| d.get_document("_dualsync").ok())
                .and_then(|m| m.get_i64("version").ok())
                == Some(7);
            if late {
                if let Some((reached, go)) = gate.lock().unwrap().take() {
                    reached.send(()).unwrap();
                    go.recv().unwrap();
                }
            }
            None
        }));
    let a = Arc::new(a);
    let b = MongoSink::connect(&config).await.unwrap();
    a.apply(&[thing("x", 5, Some(5))]).await.unwrap();
    a.apply(&[thing("x", 10, None)]).await.unwrap();
    b.apply(&[thing("other", 1, Some(1))]).await.unwrap();

    let writer = {
        let a = a.clone();
        tokio::spawn(async move { a.apply(&[thing("x", 7, Some(7))]).await.unwrap() })
    };
    tokio::task::spawn_blocking(move || reached_rx.recv().unwrap())
        .await
        .unwrap();
    for _ in 0..2 {
        b.purge_tombstones(Duration::ZERO, Duration::from_secs(3600))
            .await
            .unwrap();
    }
    go_tx.send(()).unwrap();
    not_resurrected(&*a, &b, writer.await.unwrap()).await;
}

/// Another member's writes: `gone` live then deleted (its tombstone is then backdated past
/// the retention), `live`, and `young`, a fresh tombstone.
async fn seed_tombstones<S: Sink>(other_member: &S) {
    other_member
        .apply(&[thing("gone", 1, Some(1)), thing("live", 1, Some(1))])
        .await
        .unwrap();
    other_member
        .apply(&[thing("gone", 2, None), thing("young", 3, None)])
        .await
        .unwrap();
}

/// Runs apply on `sink_name` with nothing to consume until it purged `gone`'s expired
/// tombstone (and only that).
async fn idle_apply_purges<S: SinkReader>(
    config: &dualsync::config::Config,
    sink_name: &str,
    other_member: &S,
) {
    let cancel = CancellationToken::new();
    let (apply, _) = spawn_apply(config, sink_name, &cancel);
    eventually("the idle member purges the expired tombstone", || async {
        other_member.get("things", "gone").await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        other_member.get("things", "young").await.unwrap(),
        Some((3, None))
    );
    assert!(other_member.get("things", "live").await.unwrap().is_some());
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// An apply process with nothing to consume still purges (issue #35 item 9): its purge runs
/// on its own timer (`apply.tombstone_purge_interval_secs`), over every table of the sink,
/// including those another member wrote. The purge's filter is indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_member_purges_expired_tombstones_postgres() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let mut config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    purge_every_second(&mut config);
    let other_member = postgres_sink(&config).await;
    seed_tombstones(&other_member).await;
    let replica = dualsync::pg::connect(&sink_url).await.unwrap();
    // Past the retention (7 days by default).
    replica
        .execute(
            "UPDATE replica.things SET updated_at = now() - interval '8 days' WHERE id = 'gone'",
            &[],
        )
        .await
        .unwrap();

    idle_apply_purges(&config, "postgres", &other_member).await;

    // The tombstones have a partial index, and the purge's chunk query can use it.
    let index: String = replica
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'replica' AND indexname = 'things_tombstones'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(index.contains("WHERE deleted"), "{index}");
    replica
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = first_column(
        &replica,
        "EXPLAIN SELECT ctid FROM replica.things
         WHERE deleted AND updated_at < now() - interval '1 hour' AND version <= 10 LIMIT 1000",
    )
    .await;
    assert!(
        plan.iter().any(|l| l.contains("things_tombstones")),
        "{plan:?}"
    );
}

/// [`an_idle_member_purges_expired_tombstones_postgres`] on a MongoDB sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_member_purges_expired_tombstones_mongo() {
    let servers = servers();
    let mut config = pipeline_without_postgres(&servers, &unique("t"));
    purge_every_second(&mut config);
    let dualsync::config::SinkConfig::Mongodb(mongo) = &config.sinks["mongo"] else {
        unreachable!()
    };
    let other_member = MongoSink::connect(mongo).await.unwrap();
    seed_tombstones(&other_member).await;
    let things = other_member.database().collection::<Document>("things");
    let eight_days_ago = mongodb::bson::DateTime::from_millis(
        mongodb::bson::DateTime::now().timestamp_millis() - 8 * 24 * 3600 * 1000,
    );
    things
        .update_one(
            mongodb::bson::doc! {"_id": "gone"},
            mongodb::bson::doc! {"$set": {"_dualsync.updated_at": eight_days_ago}},
        )
        .await
        .unwrap();

    idle_apply_purges(&config, "mongo", &other_member).await;
    let indexes = things.list_index_names().await.unwrap();
    assert!(
        indexes.contains(&dualsync::sink::mongo::TOMBSTONE_INDEX.to_string()),
        "{indexes:?}"
    );
}

/// A purge that is held up (here: an expired tombstone's row locked by another session) never
/// holds up apply: the purge is a task of its own, on a connection of its own, so apply goes
/// on consuming and writing meanwhile; the purge finishes once the row is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_keeps_writing_while_a_purge_is_held_up() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let mut config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    purge_every_second(&mut config);
    let other_member = postgres_sink(&config).await;
    other_member
        .apply(&[SinkRecord::from(named_customer("gone", 1, "g"))])
        .await
        .unwrap();
    other_member
        .apply(&[SinkRecord::from(customer_event("gone", 2, None))])
        .await
        .unwrap();
    let mut holder = dualsync::pg::connect(&sink_url).await.unwrap();
    holder
        .execute(
            "UPDATE replica.customers SET updated_at = now() - interval '8 days' WHERE id = 'gone'",
            &[],
        )
        .await
        .unwrap();
    let hold = holder.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM replica.customers WHERE id = 'gone' FOR KEY SHARE",
        &[],
    )
    .await
    .unwrap();

    let cancel = CancellationToken::new();
    let (apply, _) = spawn_apply(&config, "postgres", &cancel);
    let observer = dualsync::pg::connect(&sink_url).await.unwrap();
    eventually("the purge is held up on the locked tombstone", || async {
        waiting_on_locks(&observer).await >= 1
    })
    .await;
    let (topic, producer) = topic_with_producer(&config, "customers").await;
    produce_events(&producer, &topic, &[named_customer("c1", 100, "n")]).await;
    eventually("apply writes while the purge is held up", || async {
        other_member.get("customers", "c1").await.unwrap().is_some()
    })
    .await;
    assert!(
        waiting_on_locks(&observer).await >= 1,
        "the purge was still held"
    );
    hold.commit().await.unwrap();
    eventually("the purge finishes once the row is released", || async {
        other_member
            .get("customers", "gone")
            .await
            .unwrap()
            .is_none()
    })
    .await;
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// The purge every second, with sink deadlines of a second so its grace (the deadline and a
/// second when longer than the interval) stays short in these tests.
fn purge_every_second(config: &mut dualsync::config::Config) {
    config.apply.tombstone_purge_interval_secs = 1;
    for sink in config.sinks.values_mut() {
        match sink {
            dualsync::config::SinkConfig::Postgres(p) => p.timeout_ms = 1_000,
            dualsync::config::SinkConfig::Mongodb(m) => m.timeout_ms = 1_000,
        }
    }
}
