//! The end-to-end lag (`dualsync_end_to_end_lag_seconds`) runs from the primary's commit, not
//! from the outbox row's insert: a row written early in a long transaction is not late when
//! it arrives a moment after the commit. The commit time is PostgreSQL's own
//! (`pg_xact_commit_timestamp`, with `track_commit_timestamp = on`); without it the insert
//! time stands in (documented fallback). A replayed duplicate changes nothing in the sink and
//! adds no lag observation.

use std::time::Duration;

use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use tokio_util::sync::CancellationToken;

use dualsync::metrics::{total_where, Metrics};
use dualsync::publish::headers;

use crate::common::*;
use crate::private_servers::PrivateServer;

/// How long the writing transaction stays open after its insert.
const HOLD: Duration = Duration::from_secs(6);

/// Sum and count of the lag histogram.
fn lag(m: &Metrics) -> (f64, u64) {
    (
        m.end_to_end_lag.get_sample_sum(),
        m.end_to_end_lag.get_sample_count(),
    )
}

/// Inserts one `customers` outbox row, keeps the transaction open for [`HOLD`], commits, and
/// returns PostgreSQL's commit timestamp of it in micros (`None` when the server does not
/// track commit timestamps).
async fn write_in_a_long_transaction(source_url: &str, id: &str) -> Option<i64> {
    let mut client = dualsync::pg::connect(source_url).await.unwrap();
    let tx = client.transaction().await.unwrap();
    let payload = serde_json::json!({"id": id, "name": "late", "email": "e", "order_count": 0});
    tx.execute(
        "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES ('customers', $1, 'CustomerUpserted', $2)",
        &[&id, &payload],
    )
    .await
    .unwrap();
    let xid: String = tx
        .query_one("SELECT xid(pg_current_xact_id())::text", &[])
        .await
        .unwrap()
        .get(0);
    // The scenario, not a synchronisation: the transaction is long.
    tokio::time::sleep(HOLD).await;
    tx.commit().await.unwrap();
    let tracked: String = client
        .query_one("SHOW track_commit_timestamp", &[])
        .await
        .unwrap()
        .get(0);
    if tracked != "on" {
        return None;
    }
    let micros: Option<i64> = client
        .query_one(
            "SELECT (extract(epoch FROM pg_xact_commit_timestamp($1::text::xid)) * 1000000)::int8",
            &[&xid],
        )
        .await
        .unwrap()
        .get(0);
    Some(micros.expect("a commit timestamp for the committed transaction"))
}

/// Runs relay and apply on `source_url`, writes one row in a long transaction, waits for it
/// to be applied and replays its message once. Returns the commit timestamp PostgreSQL gave,
/// the message's `created_at` and `committed_at` headers, and the lag histogram (sum, count)
/// after the first apply and after the replay was found stale.
async fn run(source_url: &str) -> (Option<i64>, i64, i64, (f64, u64), (f64, u64)) {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, source_url, &sink_url, &unique("t"), "");
    let topic = config.kafka.topic_for("customers");
    let setup = dualsync::pg::connect(source_url).await.unwrap();
    dualsync::demo::setup(&setup).await.unwrap();
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);

    let commit = write_in_a_long_transaction(source_url, "c1").await;
    eventually("the event is applied", || async {
        total_where(&stats.applied, "outcome", "written") == 1
    })
    .await;
    let first = lag(&stats);

    // The same message once more, headers and all (a replay or a producer retry).
    let message = read_topic(&servers.kafka, &topic, 1).await.remove(0);
    let header_micros = |key: &str| -> i64 {
        header(&message, key)
            .unwrap_or_else(|| panic!("no {key} header"))
            .parse()
            .unwrap()
    };
    let created = header_micros(headers::CREATED_AT);
    let committed = header(&message, headers::COMMITTED_AT)
        .map(|v| v.parse().unwrap())
        .unwrap_or(-1);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let mut copied = OwnedHeaders::new();
    for h in message.headers().unwrap().iter() {
        copied = copied.insert(h);
    }
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(message.partition())
                .key(message.key().unwrap())
                .payload(message.payload().unwrap())
                .headers(copied),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    eventually("the replay is found stale", || async {
        total_where(&stats.applied, "outcome", "stale") == 1
    })
    .await;
    let after_replay = lag(&stats);

    cancel.cancel();
    relay.await.unwrap().unwrap();
    apply.await.unwrap().unwrap();
    (commit, created, committed, first, after_replay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_runs_from_the_commit_not_the_insert_and_a_replay_adds_no_observation() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let (commit, created, committed, first, after_replay) = run(&source_url).await;
    let commit = commit.expect(
        "the test PostgreSQL tracks commit timestamps (scripts/up.sh sets track_commit_timestamp = on; restart it with `make down SERVERS=postgres && make up`)",
    );
    assert_eq!(first.1, 1, "one observation for the one applied event");
    assert!(
        first.0 < HOLD.as_secs_f64() - 1.0,
        "lag {}s counts the {HOLD:?} the transaction stayed open: measured from the insert",
        first.0
    );
    assert_eq!(
        committed, commit,
        "the committed_at header is PostgreSQL's commit timestamp"
    );
    assert!(committed - created >= HOLD.as_micros() as i64);
    assert_eq!(
        after_replay, first,
        "a stale replay adds no lag observation"
    );
}

/// Without `track_commit_timestamp` the insert time stands in for the commit: the lag then
/// includes the rest of the writing transaction (an over-estimate, never an under-estimate).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_commit_timestamps_lag_falls_back_to_the_insert_time() {
    let server = PrivateServer::postgres();
    let admin = dualsync::pg::connect(&server.url()).await.unwrap();
    admin.batch_execute("CREATE DATABASE src").await.unwrap();
    let source_url = format!("{}/src", server.url().rsplit_once('/').unwrap().0);
    let (commit, created, committed, first, after_replay) = run(&source_url).await;
    assert_eq!(commit, None, "a fresh cluster does not track commit times");
    assert_eq!(committed, created, "committed_at falls back to created_at");
    assert_eq!(first.1, 1);
    assert!(
        first.0 >= HOLD.as_secs_f64(),
        "lag {}s is measured from the insert",
        first.0
    );
    assert_eq!(
        after_replay, first,
        "a stale replay adds no lag observation"
    );
}
