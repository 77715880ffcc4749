//! Schema evolution end to end, against the real registry (#25 part 4): an optional field with
//! a default added while the pipeline runs is registered as the subject's next version, and an
//! apply still holding the old schemas folder applies events of both versions; an incompatible
//! change stops the relay before it publishes, naming the subject, the registry's answer and
//! the field at fault.

use std::path::{Path, PathBuf};

use rdkafka::Message;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use dualsync::config::{Config, SinkConfig};
use dualsync::error::{classify, Disposition, Error};
use dualsync::metrics::total;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use crate::common::*;
use crate::real_registry::RealRegistry;
use crate::registry::{customers_with_tier, frame_id, registry_section};

/// A schemas folder of its own: `schemas/`, with `customers.avsc` replaced when given.
fn schema_folder(customers: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("schemas"));
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["customers.avsc", "orders.avsc"] {
        std::fs::copy(Path::new(&schemas_dir()).join(file), dir.join(file)).unwrap();
    }
    if let Some(text) = customers {
        std::fs::write(dir.join("customers.avsc"), text).unwrap();
    }
    dir
}

fn with_schemas(config: &Config, dir: &Path) -> Config {
    let mut config = config.clone();
    config.encoding.schemas_dir = dir.to_path_buf();
    config
}

/// An application's write: a customer row's outbox event with exactly `payload`.
async fn write_customer(source: &tokio_postgres::Client, payload: Value) {
    let id = payload["id"].as_str().unwrap().to_string();
    source
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('customers', $1, 'CustomerUpserted', $2)",
            &[&id, &payload],
        )
        .await
        .unwrap();
}

fn customer(id: &str, name: &str) -> Value {
    json!({"id": id, "name": name, "email": format!("{id}@example.com"), "order_count": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_added_optional_field_is_registered_while_running_and_an_old_apply_applies_both() {
    let registry = RealRegistry::from_env();
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let base = pipeline(
        &servers,
        &source_url,
        &sink_url,
        &unique("t"),
        &registry_section(&registry.url, ""),
    );
    let old = with_schemas(&base, &schema_folder(None));
    let evolved = with_schemas(&base, &schema_folder(Some(&customers_with_tier())));
    let topic = base.kafka.topic_for("customers");
    let subject = format!("{topic}-value");
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let SinkConfig::Postgres(p) = &base.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(p).await.unwrap();

    // Apply keeps the old folder for the whole test.
    let apply_cancel = CancellationToken::new();
    let (apply, apply_stats) = spawn_apply(&old, "postgres", &apply_cancel);
    let relay_cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&old, &relay_cancel);
    write_customer(&source, customer("c1", "before")).await;
    write_customer(&source, customer("c2", "before")).await;
    eventually("the old schema's events are applied", || async {
        let c1 = sink.get("customers", "c1").await.unwrap();
        let c2 = sink.get("customers", "c2").await.unwrap();
        c1.is_some() && c2.is_some()
    })
    .await;

    // The deploy that adds `tier`: the relay restarts on the new folder; apply runs on.
    relay_cancel.cancel();
    relay.await.unwrap().unwrap();
    let relay_cancel = CancellationToken::new();
    let (relay, relay_stats) = spawn_relay(&evolved, &relay_cancel);
    let mut c1 = customer("c1", "after");
    c1["tier"] = json!("gold");
    let mut c3 = customer("c3", "new");
    c3["tier"] = json!("silver");
    write_customer(&source, c1).await;
    write_customer(&source, c3).await;
    eventually(
        "the new schema's events are applied by the old apply",
        || async {
            let c1 = sink.get("customers", "c1").await.unwrap();
            let c3 = sink.get("customers", "c3").await.unwrap();
            matches!(&c1, Some((_, Some(doc))) if doc["name"] == "after") && c3.is_some()
        },
    )
    .await;

    let ids = registry.versions(&subject).await;
    assert_eq!(ids.len(), 2, "the new version is registered: {ids:?}");
    let newest = registry.schema(ids[1]).await;
    let payload_fields = &newest["fields"].as_array().unwrap().last().unwrap()["type"][1]["fields"];
    assert!(
        payload_fields
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "tier" && f["default"] == "basic"),
        "{newest}"
    );
    let messages = read_topic(&servers.kafka, &topic, 4).await;
    let mut framed: Vec<(String, u32)> = messages
        .iter()
        .map(|m| {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            (key, frame_id(m.payload().unwrap()))
        })
        .collect();
    framed.sort();
    assert_eq!(
        framed,
        [
            ("c1".to_string(), ids[0]),
            ("c1".to_string(), ids[1]),
            ("c2".to_string(), ids[0]),
            ("c3".to_string(), ids[1]),
        ]
    );
    // The old reader resolves the new writer: `tier` is not in its schema, the rest is.
    let (_, doc) = sink.get("customers", "c3").await.unwrap().unwrap();
    assert_eq!(doc, Some(customer("c3", "new")));
    assert_eq!(total(&apply_stats.dead_lettered), 0);
    assert!(total(&relay_stats.published) >= 2);
    relay_cancel.cancel();
    apply_cancel.cancel();
    relay.await.unwrap().unwrap();
    apply.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incompatible_schema_stops_the_relay_naming_subject_answer_and_field() {
    let registry = RealRegistry::from_env();
    let servers = servers();
    let source_url = create_database(&servers).await;
    let base = pipeline(
        &servers,
        &source_url,
        "postgres://unused",
        &unique("t"),
        &registry_section(&registry.url, ""),
    );
    let subject = format!("{}-value", base.kafka.topic_for("customers"));
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    // The deployed schema is registered by a first relay run.
    let old = with_schemas(&base, &schema_folder(None));
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&old, &cancel);
    let prefix = base.pipeline.name.clone();
    eventually("the first relay registers its schemas", || async {
        registry.subjects(&prefix).await.len() == 2
    })
    .await;
    cancel.cancel();
    relay.await.unwrap().unwrap();

    // A new required field without a default: the new schema cannot read the events already
    // written, which BACKWARD (the registry's level) forbids.
    let text = std::fs::read_to_string(Path::new(&schemas_dir()).join("customers.avsc")).unwrap();
    let mut broken: Value = serde_json::from_str(&text).unwrap();
    broken["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "loyalty_points", "type": "int"}));
    let incompatible = with_schemas(&base, &schema_folder(Some(&broken.to_string())));
    write_customer(&source, customer("c1", "waits")).await;
    let cancel = CancellationToken::new();
    let (relay, relay_stats) = spawn_relay(&incompatible, &cancel);
    let stopped = tokio::time::timeout(DEADLINE, relay)
        .await
        .expect("the relay stops by itself")
        .unwrap();
    let e = stopped.expect_err("an incompatible schema stops the relay");
    assert_eq!(classify(&e), Disposition::Fatal, "{e}");
    assert!(matches!(e, Error::Registry(_)), "{e:?}");
    let message = e.to_string();
    println!("the relay stopped: {message}");
    for part in [subject.as_str(), "incompatible", "409", "loyalty_points"] {
        assert!(message.contains(part), "{part:?} is not in: {message}");
    }
    assert_eq!(
        registry.versions(&subject).await.len(),
        1,
        "nothing new registered"
    );
    assert_eq!(total(&relay_stats.published), 0);
    let (_, unpublished) = dualsync::demo::outbox_counts(&source).await.unwrap();
    assert_eq!(unpublished, 1, "the row waits in the outbox");
}
