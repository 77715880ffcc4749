//! The schema-registry path: Confluent wire format out of the relay, registry-resolved decoding
//! and schema evolution in apply, `dualsync schema check`. The registry is [`FakeRegistry`],
//! which follows the documented Confluent REST API for the calls dualsync makes; the broker,
//! PostgreSQL and the processes are real.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Message};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::codec::registry::RegistryClient;
use dualsync::codec::{EventCodec, OutboxEvent, SchemaStore};
use dualsync::config::{Config, SinkConfig};
use dualsync::dlq::headers as dlq;
use dualsync::error::{classify, Disposition, Error};
use dualsync::metrics::total;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::Sink;

use crate::common::*;
use crate::fake_registry::FakeRegistry;

fn registry_section(url: &str, extra: &str) -> String {
    format!("[schema_registry]\nurl = \"{url}\"\n{extra}\n")
}

/// The customers payload schema of `schemas/`, plus a `tier` field with a default: a
/// compatible evolution in both directions.
fn customers_with_tier() -> String {
    let text = std::fs::read_to_string(Path::new(&schemas_dir()).join("customers.avsc")).unwrap();
    let mut schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    schema["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "tier", "type": "string", "default": "basic"}));
    schema.to_string()
}

fn store_with(customers: &str) -> Arc<SchemaStore> {
    let mut store = SchemaStore::default();
    store.add("customers", customers).unwrap();
    Arc::new(store)
}

fn customer(id: &str, version: i64, payload: serde_json::Value) -> OutboxEvent {
    customer_event(id, version, Some(payload))
}

/// The 4-byte big-endian schema id of a Confluent frame.
fn frame_id(value: &[u8]) -> u32 {
    assert_eq!(value[0], 0, "Confluent magic byte");
    u32::from_be_bytes(value[1..5].try_into().unwrap())
}

async fn publishing_codec(config: &Config, store: Arc<SchemaStore>) -> Result<EventCodec, Error> {
    EventCodec::for_publishing(config, store, &CancellationToken::new())
        .await
        .map(|c| c.expect("not cancelled"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_writes_confluent_frames_with_registered_ids_and_apply_converges() {
    let registry = FakeRegistry::start(Some(("dualsync", "registry-s3cret"))).await;
    let password_env = format!("DUALSYNC_TEST_{}", unique("pw").to_uppercase());
    std::env::set_var(&password_env, "registry-s3cret");
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let extra = registry_section(
        &registry.url,
        &format!("username = \"dualsync\"\npassword_env = \"{password_env}\""),
    );
    let config = pipeline(&servers, &source_url, &sink_url, &unique("t"), &extra);
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let cancel = CancellationToken::new();
    let (relay, relay_stats) = spawn_relay(&config, &cancel);
    let (apply, apply_stats) = spawn_apply(&config, "postgres", &cancel);
    dualsync::demo::generate(&source_url, 4, 10, 120, 2, 11)
        .await
        .unwrap();
    let SinkConfig::Postgres(p) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(p).await.unwrap();
    let primary = primary_state(&source).await;
    eventually("the PostgreSQL sink matches the primary", || async {
        let mut all = true;
        for ((t, id), doc) in &primary {
            let held = sink.get(t, id).await.unwrap();
            all &= held.as_ref().and_then(|(_, d)| d.as_ref()) == Some(doc);
        }
        all
    })
    .await;

    let mut subjects = registry.subjects();
    subjects.sort();
    let customers_subject = format!("{}-value", config.kafka.topic_for("customers"));
    let orders_subject = format!("{}-value", config.kafka.topic_for("orders"));
    assert_eq!(
        subjects,
        [customers_subject.clone(), orders_subject.clone()]
    );
    for (aggregate, subject) in [
        ("customers", &customers_subject),
        ("orders", &orders_subject),
    ] {
        let ids = registry.versions(subject);
        assert_eq!(ids.len(), 1, "one version under {subject}");
        let topic = config.kafka.topic_for(aggregate);
        let messages = read_topic(&servers.kafka, &topic, 1).await;
        assert!(!messages.is_empty());
        for m in &messages {
            assert_eq!(frame_id(m.payload().unwrap()), ids[0], "{topic}");
        }
    }
    assert_eq!(total(&apply_stats.dead_lettered), 0);
    assert!(total(&relay_stats.published) > 0);
    cancel.cancel();
    relay.await.unwrap().unwrap();
    apply.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evolved_writers_decode_unknown_ids_are_dead_lettered_and_outages_are_retried() {
    let registry = FakeRegistry::start(None).await;
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(
        &servers,
        &sink_url,
        &sink_url,
        &unique("t"),
        &registry_section(&registry.url, ""),
    );
    let topic = config.kafka.topic_for("customers");
    let subject = format!("{topic}-value");

    // The deployed schema, then a producer that evolved first (added `tier` with a default).
    let current = publishing_codec(&config, schemas()).await.unwrap();
    let evolved = publishing_codec(&config, store_with(&customers_with_tier()))
        .await
        .unwrap();
    let [current_id, evolved_id] = registry.versions(&subject)[..] else {
        panic!("two versions expected: {:?}", registry.versions(&subject))
    };
    assert_ne!(current_id, evolved_id);

    let payload =
        |id: &str, name: &str| json!({"id": id, "name": name, "email": "e", "order_count": 1});
    let mut evolved_payload = payload("c1", "first");
    evolved_payload["tier"] = json!("gold");
    let from_evolved = evolved.encode(&customer("c1", 1, evolved_payload)).unwrap();
    assert_eq!(frame_id(&from_evolved), evolved_id);
    let from_current = current
        .encode(&customer("c2", 1, payload("c2", "second")))
        .unwrap();
    assert_eq!(frame_id(&from_current), current_id);
    let mut unknown_id = from_current.clone();
    unknown_id[1..5].copy_from_slice(&9_999u32.to_be_bytes());
    let last = current
        .encode(&customer("c1", 2, payload("c1", "last")))
        .unwrap();

    // A reader that knows `tier` fills its default into what the older writer wrote.
    let newer_reader = EventCodec::new(
        store_with(&customers_with_tier()),
        Some(RegistryClient::new(config.schema_registry.as_ref().unwrap()).unwrap()),
    );
    let read = newer_reader.decode(&from_current).await.unwrap();
    assert_eq!(read.payload.as_ref().unwrap()["tier"], "basic");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let messages: [(&str, &[u8]); 4] = [
        ("c1", &from_evolved),
        ("c3", &unknown_id),
        ("c2", &from_current),
        ("c1", &last),
    ];
    let publisher = dualsync::publish::Publisher::new(&config.kafka).unwrap();
    publisher.ensure_topic(&topic).await.unwrap();
    produce_in_order(&producer, &topic, &messages).await;

    // Apply meets a registry that answers 503 for a while: it waits, it does not dead-letter.
    registry.fail_next(3);
    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);
    let SinkConfig::Postgres(p) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(p).await.unwrap();
    eventually("c1's last event and c2 are applied", || async {
        let c1 = sink.get("customers", "c1").await.unwrap();
        let c2 = sink.get("customers", "c2").await.unwrap();
        matches!(&c1, Some((2, Some(doc))) if doc["name"] == "last")
            && matches!(&c2, Some((1, Some(doc))) if doc["name"] == "second")
    })
    .await;
    assert_eq!(registry.failures_served(), 3);
    let letters = read_topic(&servers.kafka, &format!("{topic}.dlq"), 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        header(&letters[0], dlq::CLASS).as_deref(),
        Some("decode.unknown_schema")
    );
    assert_eq!(letters[0].key(), Some(&b"c3"[..]));
    assert_eq!(letters[0].payload(), Some(unknown_id.as_slice()));
    assert!(header(&letters[0], dlq::MESSAGE).is_some_and(|m| m.contains("9999")));
    assert_eq!(total(&stats.dead_lettered), 1);
    assert!(total(&stats.retries) >= 1, "the outage shows as retries");
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_refusals_stop_start_up_with_a_named_cause() {
    let registry = FakeRegistry::start(Some(("dualsync", "right"))).await;
    let servers = servers();
    let wrong_env = format!("DUALSYNC_TEST_{}", unique("pw").to_uppercase());
    std::env::set_var(&wrong_env, "wrong");
    let config = pipeline(
        &servers,
        "postgres://unused",
        "postgres://unused",
        "unused",
        &registry_section(
            &registry.url,
            &format!("username = \"dualsync\"\npassword_env = \"{wrong_env}\""),
        ),
    );
    let e = publishing_codec(&config, schemas()).await.err().unwrap();
    assert_eq!(classify(&e), Disposition::Fatal, "{e}");
    assert!(e.to_string().contains("401"), "{e}");

    let open = FakeRegistry::start(None).await;
    let config = pipeline(
        &servers,
        "postgres://unused",
        "postgres://unused",
        "unused",
        &registry_section(&open.url, "auto_register = false"),
    );
    let e = publishing_codec(&config, schemas()).await.err().unwrap();
    let subject = format!("{}-value", config.kafka.topic_for("customers"));
    assert!(matches!(e, Error::Setup(_)), "{e}");
    assert!(e.to_string().contains(&subject), "{e}");
    assert!(open.subjects().is_empty(), "nothing registered");
}

/// Runs `dualsync schema check`: (exit success, stdout, stderr).
fn schema_check(config_path: &Path, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dualsync"));
    cmd.args(["schema", "check", "--config"]).arg(config_path);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_check_tells_new_registered_compatible_and_incompatible_apart() {
    let registry = FakeRegistry::start(None).await;
    let servers = servers();
    let text = pipeline_toml(
        &servers,
        "postgres://unused",
        "postgres://unused",
        "unused",
        &registry_section(&registry.url, ""),
    );
    let path = std::env::temp_dir().join(format!("{}.toml", unique("schema-check")));
    std::fs::write(&path, &text).unwrap();
    let config = Config::from_toml(&path, &text, Vec::new()).unwrap();
    let subject = |a: &str| format!("{}-value", config.kafka.topic_for(a));

    let (ok, out, err) = schema_check(&path, false);
    assert!(ok, "{out}{err}");
    assert_eq!(out.matches("new subject").count(), 2, "{out}");

    // orders: exactly the local schema; customers: a newer version that added `tier` with a
    // default, which the local schema still reads.
    let local = schemas();
    let orders_id = registry
        .register(
            &subject("orders"),
            &local.for_type("orders").unwrap().registry_json,
        )
        .unwrap();
    let evolved = store_with(&customers_with_tier());
    registry
        .register(
            &subject("customers"),
            &evolved.for_type("customers").unwrap().registry_json,
        )
        .unwrap();
    let (ok, out, err) = schema_check(&path, false);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("registered (id {orders_id})")),
        "{out}"
    );
    assert!(out.contains("\tcompatible"), "{out}");
    assert!(
        registry.versions(&subject("customers")).len() == 1,
        "check registers nothing"
    );

    // Then a version without `email`, which the local schema requires with no default.
    let mut older: serde_json::Value =
        serde_json::from_str(&local.for_type("customers").unwrap().registry_json).unwrap();
    older["fields"].as_array_mut().unwrap()[7]["type"][1]["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "email");
    registry
        .register(&subject("customers"), &older.to_string())
        .unwrap();
    let (ok, out, err) = schema_check(&path, false);
    assert!(!ok, "an incompatible schema fails the check: {out}");
    assert!(out.contains("INCOMPATIBLE"), "{out}");
    // The stand-in's reason comes from apache-avro's checker, which names the outer field.
    assert!(
        out.contains("    Incompatible schemata! Field 'payload'"),
        "the registry's reason is shown, indented under its schema: {out}"
    );
    assert!(err.contains("incompatible"), "{err}");

    let (ok, out, _) = schema_check(&path, true);
    assert!(!ok);
    let report: Vec<BTreeMap<String, serde_json::Value>> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let status = |a: &str| {
        report
            .iter()
            .find(|r| r["aggregate_type"] == a)
            .map(|r| (r["status"].clone(), r["subject"].clone()))
            .unwrap()
    };
    assert_eq!(
        status("customers"),
        (json!("incompatible"), json!(subject("customers")))
    );
    assert_eq!(
        status("orders"),
        (json!("registered"), json!(subject("orders")))
    );
    std::fs::remove_file(&path).ok();
}
