//! dualsync's topics read by the Java consumer docs/consumers.md shows
//! (tests/interop/java/Consume.java: kafka-clients and Apache Avro from Maven Central, installed
//! by scripts/interop.sh), after an end-to-end outbox run in each framing: single-object
//! (fingerprint → envelope built from `schemas/`) and Confluent (schema id → the real registry).
//! Every event must decode, its key equal the envelope's `aggregate_id`, its `dualsync.*`
//! headers equal the envelope; and what it read is exactly what the outbox held.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use dualsync::config::Config;

use crate::common::*;
use crate::fingerprints::interop_tool;
use crate::real_registry::RealRegistry;
use crate::registry::registry_section;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Publishes a run of the sample shop with deletes of both types; every outbox row as
/// (topic, key, version). The run every interop test reads (also `interop_confluent`).
pub async fn outbox_run(config: &Config, source_url: &str) -> BTreeSet<(String, String, i64)> {
    let source = dualsync::pg::connect(source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(config, &cancel);
    // Order changes include cancellations (deletes); the demo never deletes a customer.
    dualsync::demo::generate(source_url, 4, 10, 120, 2, 25)
        .await
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES
                 ('customers', 'c1', 'CustomerDeleted', NULL)",
        )
        .await
        .unwrap();
    eventually("the relay has published the whole outbox", || async {
        dualsync::demo::outbox_counts(&source).await.unwrap().1 == 0
    })
    .await;
    cancel.cancel();
    relay.await.unwrap().unwrap();
    let deletes: Vec<String> = first_column(
        &source,
        "SELECT DISTINCT aggregatetype FROM dualsync.outbox WHERE payload IS NULL ORDER BY 1",
    )
    .await;
    assert_eq!(
        deletes,
        ["customers", "orders"],
        "the run deletes both types"
    );
    outbox_events(config, &source).await
}

/// Every outbox row as the event it was published as: (topic, key, version).
pub async fn outbox_events(
    config: &Config,
    source: &tokio_postgres::Client,
) -> BTreeSet<(String, String, i64)> {
    source
        .query(
            "SELECT aggregatetype, aggregateid, seq FROM dualsync.outbox",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (config.kafka.topic_for(r.get(0)), r.get(1), r.get(2)))
        .collect()
}

/// The `events` of a consumer's summary (`[[topic, key, version], …]`) as a set.
pub fn summary_events(summary: &Json) -> BTreeSet<(String, String, i64)> {
    summary["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_string(),
                e[1].as_str().unwrap().to_string(),
                e[2].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Runs Consume.java over the pipeline's topics with `framing` arguments; asserts it decoded
/// every message without a failure, and returns what it read as (topic, key, version).
async fn java_consumer(config: &Config, framing: Vec<String>) -> BTreeSet<(String, String, i64)> {
    let topics = ["customers", "orders"].map(|t| config.kafka.topic_for(t));
    let brokers = config.kafka.brokers.clone();
    let summary: Json = tokio::task::spawn_blocking(move || {
        let out = Command::new("java")
            .current_dir(repo())
            .args([
                "-cp",
                &interop_tool("java"),
                "tests/interop/java/Consume.java",
            ])
            .args(["--bootstrap", &brokers])
            .args(&framing)
            .args(&topics)
            .output()
            .expect("run java");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "Consume.java failed: {stderr}");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{stderr}", String::from_utf8_lossy(&out.stdout)))
    })
    .await
    .unwrap();
    assert_eq!(summary["failures"], serde_json::json!([]), "{summary}");
    assert!(summary["messages"].as_i64().unwrap() > 0, "{summary}");
    assert_eq!(summary["decoded"], summary["messages"], "{summary}");
    println!(
        "Consume.java decoded {} of {} messages",
        summary["decoded"], summary["messages"]
    );
    summary_events(&summary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_java_consumer_decodes_every_single_object_event() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let config = pipeline(&servers, &source_url, &source_url, &unique("t"), "");
    let written = outbox_run(&config, &source_url).await;
    let read = java_consumer(&config, vec!["--schemas".into(), schemas_dir()]).await;
    assert_eq!(
        read, written,
        "every outbox row, decoded by the Java consumer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_java_consumer_decodes_every_confluent_event() {
    let registry = RealRegistry::from_env();
    let servers = servers();
    let source_url = create_database(&servers).await;
    let config = pipeline(
        &servers,
        &source_url,
        &source_url,
        &unique("t"),
        &registry_section(&registry.url, ""),
    );
    let written = outbox_run(&config, &source_url).await;
    // The registry alone: no schema files.
    let read = java_consumer(&config, vec!["--registry".into(), registry.url.clone()]).await;
    assert_eq!(
        read, written,
        "every outbox row, decoded by the Java consumer"
    );
}

/// The `// docs:begin NAME` … `// docs:end` regions of Consume.java, each without the
/// indentation its lines share.
fn marked_regions(source: &str) -> Vec<String> {
    let mut regions = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in source.lines() {
        let marker = line.trim();
        if marker.starts_with("// docs:begin") {
            current = Some(Vec::new());
        } else if marker == "// docs:end" {
            let lines = current.take().expect("docs:end without docs:begin");
            let indent = lines
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .min()
                .unwrap_or(0);
            let text: Vec<&str> = lines
                .iter()
                .map(|l| {
                    if l.trim().is_empty() {
                        ""
                    } else {
                        &l[indent..]
                    }
                })
                .collect();
            regions.push(text.join("\n"));
        } else if let Some(lines) = current.as_mut() {
            lines.push(line);
        }
    }
    assert!(current.is_none(), "docs:begin without docs:end");
    regions
}

/// docs/consumers.md shows Consume.java as the tests run it: its `java` blocks are exactly the
/// marked regions of the source, in order.
#[test]
fn the_java_consumer_shown_in_the_docs_is_the_one_tested() {
    let doc = std::fs::read_to_string(repo().join("docs/consumers.md")).unwrap();
    let source = std::fs::read_to_string(repo().join("tests/interop/java/Consume.java")).unwrap();
    let blocks: Vec<String> = doc
        .split("```java\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap().to_string())
        .collect();
    let regions = marked_regions(&source);
    assert!(regions.len() >= 5, "Consume.java marks what the docs show");
    assert_eq!(
        blocks, regions,
        "docs/consumers.md's java blocks differ from the docs:begin/end regions of tests/interop/java/Consume.java"
    );
}
