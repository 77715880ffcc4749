//! dualsync's topics read by a consumer it did not write (Python: confluent-kafka and
//! fastavro, tests/interop/consume_single_object.py), and events written with the fingerprint
//! dualsync used before it followed the specification still applied.

use std::process::Command;
use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use serde_json::{json, Value as Json};
use tokio_util::sync::CancellationToken;

use dualsync::codec::avro::SINGLE_OBJECT_MAGIC;
use dualsync::config::SinkConfig;
use dualsync::metrics::total;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;
use dualsync::wire::EventCodec;

use crate::common::*;
use crate::fingerprints::interop_tool;

/// Runs the Python consumer over `topics`; its JSON summary.
async fn python_consumer(brokers: &str, topics: Vec<String>) -> Json {
    let brokers = brokers.to_string();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(interop_tool("python"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("tests/interop/consume_single_object.py")
            .args(["--bootstrap", &brokers, "--schemas", &schemas_dir()])
            .args(&topics)
            .output()
            .expect("run the Python consumer");
        assert!(
            out.status.success(),
            "the Python consumer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON summary ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    })
    .await
    .unwrap()
}

/// Outbox rows per (aggregate type, kind): kind is `delete`, `update` (not the aggregate's
/// first event) or `create`.
async fn outbox_kinds(source: &tokio_postgres::Client) -> Vec<(String, String, i64)> {
    source
        .query(
            "SELECT aggregatetype, kind, count(*) FROM (
                 SELECT aggregatetype, CASE WHEN payload IS NULL THEN 'delete'
                     WHEN seq > min(seq) OVER (PARTITION BY aggregatetype, aggregateid) THEN 'update'
                     ELSE 'create' END AS kind
                 FROM dualsync.outbox) k
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_consumer_decodes_every_single_object_event() {
    let shop = shop_pipeline("").await;
    let (config, source) = (&shop.config, &shop.source);
    let apply_stats = Arc::clone(&shop.running.applies[0]);

    dualsync::demo::generate(&shop.source_url, 6, 40, 200, 2, 25)
        .await
        .unwrap();
    // The demo never deletes a customer: two deletes, written as applications write them.
    source
        .batch_execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES
                 ('customers', 'c4', 'CustomerDeleted', NULL),
                 ('customers', 'c5', 'CustomerDeleted', NULL)",
        )
        .await
        .unwrap();
    eventually("every outbox row is published", || async {
        dualsync::demo::outbox_counts(source).await.unwrap().1 == 0
    })
    .await;
    let (events, _) = dualsync::demo::outbox_counts(source).await.unwrap();
    let kinds = outbox_kinds(source).await;
    for t in ["customers", "orders"] {
        for k in ["create", "update", "delete"] {
            assert!(
                kinds.iter().any(|(a, b, n)| a == t && b == k && *n > 0),
                "the run has {t} {k}s: {kinds:?}"
            );
        }
    }
    let stats = Arc::clone(&apply_stats);
    eventually("apply consumed every event", || {
        let stats = stats.clone();
        async move { total(&stats.consumed) as i64 >= events }
    })
    .await;
    assert_eq!(total(&apply_stats.dead_lettered), 0);

    let topics = ["customers", "orders"].map(|t| config.kafka.topic_for(t));
    let summary = python_consumer(&config.kafka.brokers, topics.to_vec()).await;
    eprintln!("the Python consumer's summary: {summary}");
    let deletes: i64 = kinds
        .iter()
        .filter(|(_, k, _)| k == "delete")
        .map(|(_, _, n)| n)
        .sum();
    assert_eq!(summary["failure_count"], 0, "{summary}");
    assert_eq!(summary["incomplete_partitions"], json!([]), "{summary}");
    assert_eq!(summary["messages"], events, "{summary}");
    assert_eq!(summary["decoded"], events, "{summary}");
    assert_eq!(summary["by_op"]["DELETE"], deletes, "{summary}");
    assert_eq!(
        summary["by_schema"]["customers"].as_i64().unwrap()
            + summary["by_schema"]["orders"].as_i64().unwrap(),
        events,
        "{summary}"
    );
    shop.stop().await;
}

/// The single-object fingerprints dualsync wrote before it followed the specification: CRC-64-
/// AVRO of apache-avro 0.21's canonical form of each envelope, which differs from the standard
/// one only in `created_at` (`{"type":"long"}`), computed by fastavro over that text. Pinned, so
/// that a newer crate with another canonical form cannot silently stop reading them.
const LEGACY_FINGERPRINTS: [(&str, &str); 2] = [
    ("customers", "13ba41a3ae8c257e"),
    ("orders", "ffd3cfe73b89fa30"),
];

/// `event` single-object encoded as dualsync wrote it before: the old fingerprint.
fn legacy_encoding(event: &dualsync::codec::OutboxEvent) -> Vec<u8> {
    let store = schemas();
    let schema = store.for_type(&event.aggregate_type).unwrap();
    let old = LEGACY_FINGERPRINTS
        .iter()
        .find(|(t, _)| *t == event.aggregate_type)
        .unwrap()
        .1;
    let old: Vec<u8> = (0..8)
        .map(|i| u8::from_str_radix(&old[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert_eq!(old, schema.legacy_fingerprint, "the crate's old form moved");
    assert_ne!(old, schema.fingerprint);
    let (_, datum) = store.encode_datum(event).unwrap();
    let mut bytes = SINGLE_OBJECT_MAGIC.to_vec();
    bytes.extend_from_slice(&old);
    bytes.extend_from_slice(&datum);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_with_the_old_fingerprint_still_decode_and_apply() {
    let event = customer_event(
        "c-legacy",
        7,
        Some(
            json!({"id": "c-legacy", "name": "Old", "email": "old@example.com", "order_count": 1}),
        ),
    );
    let bytes = legacy_encoding(&event);
    let codec = EventCodec::new(schemas(), None);
    assert_eq!(codec.decode(&bytes).await.unwrap(), event);

    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);
    eventually("apply is assigned its partitions", || {
        let stats = stats.clone();
        async move { stats.assigned_partitions.get() > 0 }
    })
    .await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let topic = config.kafka.topic_for("customers");
    produce_in_order(&producer, &topic, &[("c-legacy", &bytes)]).await;

    let SinkConfig::Postgres(pg) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(pg).await.unwrap();
    eventually("the old-fingerprint event is applied", || async {
        sink.get("customers", "c-legacy").await.unwrap() == Some((7, event.payload.clone()))
    })
    .await;
    assert_eq!(total(&stats.dead_lettered), 0);
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// docs/consumers.md shows the consumer the tests run: each of its `python` blocks is in the
/// script as it is (code from inside `main` is shown one level less indented).
#[test]
fn the_consumer_shown_in_the_docs_is_the_one_tested() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/consumers.md")).unwrap();
    let script =
        std::fs::read_to_string(root.join("tests/interop/consume_single_object.py")).unwrap();
    let blocks: Vec<&str> = doc
        .split("```python\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 6, "docs/consumers.md shows the consumer");
    for block in blocks {
        let indented = block
            .lines()
            .map(|l| {
                if l.is_empty() {
                    String::new()
                } else {
                    format!("    {l}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            script.contains(block) || script.contains(&indented),
            "docs/consumers.md shows code tests/interop/consume_single_object.py does not run:\n{block}"
        );
    }
}
