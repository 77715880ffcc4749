//! The sink's server stopped for 20 seconds while events keep arriving, then started again:
//! apply holds its partitions, retries with backoff (visible in its metrics), and the
//! secondary ends at exactly the events' final state: nothing lost, nothing doubled. The
//! outage is longer than the consumer's (shortened) `max.poll.interval.ms`, and the member
//! keeps its place in the group throughout: same member id, never evicted, so no other
//! process is handed its partitions while it retries. Its circuit breaker opens after repeated
//! failures (not ready, partitions paused, a probe per backoff interval) and closes once writes
//! succeed again.
//!
//! Each test runs its own private sink server (a PostgreSQL cluster or a SecantusDB process on
//! a free port), so stopping it disturbs no other test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::codec::OutboxEvent;
use dualsync::config::{Config, SinkConfig};
use dualsync::metrics::{total, total_where, Circuit};
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::{SinkReader, StoredRecord};

use crate::common::*;
use crate::kafka::group_members;
use crate::private_servers::PrivateServer;

const OUTAGE: Duration = Duration::from_secs(20);
const KEYS: usize = 40;

/// Event `n` of the stream: key `c{n % KEYS}`, versions rising per key, every seventh a delete.
fn event(n: usize) -> OutboxEvent {
    let id = format!("c{:02}", n % KEYS);
    let version = (n / KEYS + 1) as i64;
    let payload = (n % 7 != 3)
        .then(|| json!({"id": id, "name": format!("v{version}"), "email": "e", "order_count": n}));
    OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: "CustomerChanged".into(),
        aggregate_type: "customers".into(),
        aggregate_id: id,
        version,
        created_at_micros: 0,
        payload,
    }
}

/// The state the secondary must end in after events `0..count`, as [`Sink::scan`] shows it.
fn expected_state(count: usize) -> Vec<StoredRecord> {
    let mut last = BTreeMap::new();
    for n in 0..count {
        let e = event(n);
        last.insert(e.aggregate_id.clone(), (e.version, e.payload));
    }
    last.into_iter().map(|(k, (v, d))| (k, v, d)).collect()
}

/// Everything the secondary holds for `customers` (empty while it cannot answer).
async fn scan_all(config: &Config, sink_name: &str) -> Vec<StoredRecord> {
    let scan = |r: Result<Vec<StoredRecord>, _>| r.unwrap_or_default();
    match &config.sinks[sink_name] {
        SinkConfig::Postgres(p) => match PostgresSink::connect(p).await {
            Ok(sink) => scan(sink.scan("customers", None, 10 * KEYS).await),
            Err(_) => Vec::new(),
        },
        SinkConfig::Mongodb(m) => match MongoSink::connect(m).await {
            Ok(sink) => scan(sink.scan("customers", None, 10 * KEYS).await),
            Err(_) => Vec::new(),
        },
    }
}

async fn sink_survives_an_outage(mut server: PrivateServer, sink_name: &str) {
    let servers = servers();
    // The sink under test points at the private server; the other one is never used.
    let (pg_url, servers) = match &server {
        PrivateServer::Postgres { .. } => (server.url(), servers),
        PrivateServer::Mongo { .. } => (
            "postgres://unused/db".to_string(),
            Servers {
                mongo: server.url(),
                ..servers
            },
        ),
    };
    let config = pipeline(
        &servers,
        "postgres://unused/db",
        &pg_url,
        &unique("outage"),
        // Shorter than the outage: a consumer that stops polling while it retries is evicted.
        "[kafka.properties]\n\"max.poll.interval.ms\" = \"7000\"\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n",
    );
    let topic = config.kafka.topic_for("customers");
    dualsync::publish::Publisher::new(&config.kafka)
        .unwrap()
        .ensure_topic(&topic)
        .await
        .unwrap();
    let producer: Arc<FutureProducer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &servers.kafka)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .unwrap(),
    );
    let codec = schemas();
    let send = move |range: std::ops::Range<usize>| {
        let (producer, codec, topic) = (producer.clone(), codec.clone(), topic.clone());
        async move {
            for n in range {
                let e = event(n);
                let value = codec.encode(&e).unwrap();
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&e.aggregate_id)
                            .payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap();
            }
        }
    };

    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, sink_name, &cancel);
    // Before the outage: the first events are in the sink.
    send(0..200).await;
    eventually("the first events are applied", || async {
        total(&stats.applied) > 0
    })
    .await;

    // A writer keeps producing through the outage, paced so events arrive before, during
    // and after it.
    let total_events = 200 + 25 * 40;
    let writer = tokio::spawn({
        let send = send.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000));
            for chunk in 0..25 {
                tick.tick().await;
                let start = 200 + chunk * 40;
                send(start..start + 40).await;
            }
        }
    });
    let before = total(&stats.applied);
    eventually("events of the paced writer are applied", || async {
        total(&stats.applied) > before
    })
    .await;

    let group = config.group_id(sink_name);
    let members_before = group_members(&servers.kafka, &group);
    assert_eq!(members_before.len(), 1, "{members_before:?}");
    let stopped = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    eventually("apply notices the outage and retries", || async {
        stats.retries_in_progress.get() > 0
    })
    .await;
    eventually(
        "the sink's circuit opens after repeated failures",
        || async { stats.health.circuit() != Circuit::Closed },
    )
    .await;
    assert!(
        stats
            .health
            .not_ready(Duration::from_secs(3600))
            .iter()
            .any(|r| r.starts_with("circuit ")),
        "an open circuit makes the process not ready"
    );
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;
    assert!(
        !apply.is_finished(),
        "apply kept running through the outage"
    );
    let written_during_outage = total_where(&stats.applied, "outcome", "written");
    assert_eq!(
        group_members(&servers.kafka, &group),
        members_before,
        "the member kept its place in the group through an outage longer than max.poll.interval.ms"
    );
    tokio::task::block_in_place(|| server.start());

    writer.await.unwrap();
    let expected = expected_state(total_events);
    eventually("the secondary converges to the final state", || async {
        scan_all(&config, sink_name).await == expected
    })
    .await;
    assert!(total(&stats.retries) > 0, "the outage was seen and retried");
    assert!(
        total_where(&stats.applied, "outcome", "written") > written_during_outage,
        "writes resumed after the restart"
    );
    assert_eq!(stats.retries_in_progress.get(), 0, "retry episode over");
    assert_eq!(
        stats.health.circuit(),
        Circuit::Closed,
        "circuit closed again"
    );
    cancel.cancel();
    apply.await.unwrap().unwrap();
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sink_stopped_for_20_s_mid_stream_loses_and_doubles_nothing() {
    let server = tokio::task::block_in_place(PrivateServer::postgres);
    sink_survives_an_outage(server, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_sink_stopped_for_20_s_mid_stream_loses_and_doubles_nothing() {
    let server = tokio::task::block_in_place(PrivateServer::mongo);
    sink_survives_an_outage(server, "mongo").await;
}

/// The same outage with the MongoDB sink on FerretDB, the second MongoDB-wire server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_sink_on_ferretdb_stopped_for_20_s_mid_stream_loses_and_doubles_nothing() {
    let server = tokio::task::block_in_place(PrivateServer::ferretdb);
    sink_survives_an_outage(server, "mongo").await;
}
