//! A consumer we did not write reads a run in the Confluent framing: confluent-kafka's
//! `DeserializingConsumer` with its `AvroDeserializer` (tests/interop/consume_confluent.py),
//! resolving schema ids at the real registry. Every event of the run must decode with the key
//! equal to the envelope's `aggregate_id` and the `dualsync.*` headers equal to the envelope.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::interop_java::{outbox_run, summary_events};
use crate::real_registry::RealRegistry;
use crate::registry::registry_section;

/// The interop venv's python (scripts/interop.sh creates it once).
fn interop_python() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/interop.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/interop.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_confluent_kafka_consumer_decodes_every_event_of_a_run() {
    let registry = RealRegistry::from_env();
    let servers = servers();
    let source_url = create_database(&servers).await;
    let config = pipeline(
        &servers,
        &source_url,
        "postgres://unused",
        &unique("t"),
        &registry_section(&registry.url, ""),
    );
    let written = outbox_run(&config, &source_url).await;

    let topics = [
        config.kafka.topic_for("customers"),
        config.kafka.topic_for("orders"),
    ];
    let out = Command::new(interop_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/consume_confluent.py"))
        .args(["--bootstrap", &servers.kafka, "--registry", &registry.url])
        .args(&topics)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "consume_confluent.py: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{stderr}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(summary["failures"], serde_json::json!([]), "{summary}");
    assert_eq!(summary["decoded"], summary["messages"]);
    let read = summary_events(&summary);
    assert_eq!(
        read, written,
        "every outbox row, decoded by confluent-kafka"
    );
    println!(
        "confluent-kafka decoded {} of {} messages ({} outbox rows)",
        summary["decoded"],
        summary["messages"],
        written.len()
    );
}
