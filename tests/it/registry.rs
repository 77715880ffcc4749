//! The schema-registry path against the real registry `make up` starts ([`RealRegistry`],
//! Apicurio's Confluent-compatible API): TopicNameStrategy subjects, registration, Confluent
//! frames out of the relay, lookup by id and schema evolution in apply, `dualsync schema
//! list|check`. Faults a real registry does not produce on demand (503s, refused credentials)
//! are in `registry_faults.rs`, against the stand-in.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Message};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::codec::registry::RegistryClient;
use dualsync::codec::{OutboxEvent, SchemaStore};
use dualsync::config::{Config, SinkConfig};
use dualsync::dlq::headers as dlq;
use dualsync::error::{classify, Disposition, Error};
use dualsync::metrics::total;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;
use dualsync::wire::EventCodec;

use crate::common::*;
use crate::real_registry::RealRegistry;

pub fn registry_section(url: &str, extra: &str) -> String {
    format!("[schema_registry]\nurl = \"{url}\"\n{extra}\n")
}

/// A pipeline with the schema registry at `url`, whose source and PostgreSQL sink are one
/// fresh database.
pub async fn registry_pipeline(servers: &Servers, url: &str) -> Config {
    let db = create_database(servers).await;
    pipeline(servers, &db, &db, &unique("t"), &registry_section(url, ""))
}

/// The customers payload schema of `schemas/`, plus a `tier` field with a default: a
/// compatible evolution in both directions.
pub fn customers_with_tier() -> String {
    let text = std::fs::read_to_string(Path::new(&schemas_dir()).join("customers.avsc")).unwrap();
    let mut schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    schema["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "tier", "type": "string", "default": "basic"}));
    schema.to_string()
}

pub fn store_with(customers: &str) -> Arc<SchemaStore> {
    let mut store = SchemaStore::default();
    store.add("customers", customers).unwrap();
    Arc::new(store)
}

pub fn customer(id: &str, version: i64, payload: serde_json::Value) -> OutboxEvent {
    customer_event(id, version, Some(payload))
}

/// The 4-byte big-endian schema id of a Confluent frame.
pub fn frame_id(value: &[u8]) -> u32 {
    assert_eq!(value[0], 0, "Confluent magic byte");
    u32::from_be_bytes(value[1..5].try_into().unwrap())
}

pub async fn publishing_codec(
    config: &Config,
    store: Arc<SchemaStore>,
) -> Result<EventCodec, Error> {
    EventCodec::for_publishing(config, store, &CancellationToken::new())
        .await
        .map(|c| c.expect("not cancelled"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_writes_confluent_frames_with_registered_ids_and_apply_converges() {
    let registry = RealRegistry::from_env();
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let extra = registry_section(&registry.url, "");
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

    let subjects = registry.subjects(&config.pipeline.name).await;
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
        let ids = registry.versions(subject).await;
        assert_eq!(ids.len(), 1, "one version under {subject}");
        // What the registry holds under the id is the envelope the relay wrote with.
        let held = registry.schema(ids[0]).await;
        let local = schemas();
        let local: serde_json::Value =
            serde_json::from_str(&local.for_type(aggregate).unwrap().registry_json).unwrap();
        assert_eq!(held["name"], local["name"], "{subject}");
        assert_eq!(held["fields"], local["fields"], "{subject}");
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

/// An id no test registers: the registry answers "not found" for it.
const UNKNOWN_ID: u32 = 2_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evolved_writers_decode_and_unknown_ids_are_dead_lettered() {
    let registry = RealRegistry::from_env();
    let servers = servers();
    let config = registry_pipeline(&servers, &registry.url).await;
    let topic = config.kafka.topic_for("customers");
    let subject = format!("{topic}-value");

    // The deployed schema, then a producer that evolved first (added `tier` with a default).
    let current = publishing_codec(&config, schemas()).await.unwrap();
    let evolved = publishing_codec(&config, store_with(&customers_with_tier()))
        .await
        .unwrap();
    let [current_id, evolved_id] = registry.versions(&subject).await[..] else {
        panic!("two versions expected under {subject}")
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
    unknown_id[1..5].copy_from_slice(&UNKNOWN_ID.to_be_bytes());
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
    let letters = read_topic(&servers.kafka, &format!("{topic}.dlq"), 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        header(&letters[0], dlq::CLASS).as_deref(),
        Some("decode.unknown_schema")
    );
    assert_eq!(letters[0].key(), Some(&b"c3"[..]));
    assert_eq!(letters[0].payload(), Some(unknown_id.as_slice()));
    assert!(header(&letters[0], dlq::MESSAGE).is_some_and(|m| m.contains(&UNKNOWN_ID.to_string())));
    assert_eq!(total(&stats.dead_lettered), 1);
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_register_off_refuses_a_subject_without_the_schema_by_name() {
    let registry = RealRegistry::from_env();
    let servers = servers();
    let config = pipeline(
        &servers,
        "postgres://unused",
        "postgres://unused",
        "unused",
        &registry_section(&registry.url, "auto_register = false"),
    );
    let e = publishing_codec(&config, schemas()).await.err().unwrap();
    let subject = format!("{}-value", config.kafka.topic_for("customers"));
    assert!(matches!(e, Error::Schema(_)), "{e}");
    assert_eq!(classify(&e), Disposition::Fatal, "{e}");
    assert!(e.to_string().contains(&subject), "{e}");
    assert!(
        registry.subjects(&config.pipeline.name).await.is_empty(),
        "nothing registered"
    );
}

/// Runs `dualsync schema <verb>`: (exit success, stdout, stderr).
fn schema_command(verb: &str, config_path: &Path, json: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dualsync"));
    cmd.args(["schema", verb, "--config"]).arg(config_path);
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

fn schema_check(config_path: &Path, json: bool) -> (bool, String, String) {
    schema_command("check", config_path, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_list_and_check_tell_new_registered_compatible_and_incompatible_apart() {
    let registry = RealRegistry::from_env();
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

    // `schema list` names each type's TopicNameStrategy subject.
    let (ok, out, err) = schema_command("list", &path, false);
    assert!(ok, "{out}{err}");
    let listed: BTreeMap<&str, &str> = out
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (cols[0], cols[3])
        })
        .collect();
    let expected: BTreeMap<&str, String> = [
        ("customers", subject("customers")),
        ("orders", subject("orders")),
    ]
    .into();
    assert_eq!(
        listed,
        expected
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<BTreeMap<_, _>>(),
        "{out}"
    );

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
        .await
        .unwrap();
    let evolved = store_with(&customers_with_tier());
    registry
        .register(
            &subject("customers"),
            &evolved.for_type("customers").unwrap().registry_json,
        )
        .await
        .unwrap();
    let (ok, out, err) = schema_check(&path, false);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("registered (id {orders_id})")),
        "{out}"
    );
    assert!(out.contains("\tcompatible"), "{out}");
    assert_eq!(
        registry.versions(&subject("customers")).await.len(),
        1,
        "check registers nothing"
    );

    // Then a version without `email` (BACKWARD allows dropping a field), which the local schema
    // cannot read: it requires `email` and has no default for it.
    let mut older: serde_json::Value =
        serde_json::from_str(&local.for_type("customers").unwrap().registry_json).unwrap();
    older["fields"].as_array_mut().unwrap()[7]["type"][1]["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "email" && f["name"] != "tier");
    registry
        .register(&subject("customers"), &older.to_string())
        .await
        .unwrap();
    let (ok, out, err) = schema_check(&path, false);
    assert!(!ok, "an incompatible schema fails the check: {out}");
    assert!(out.contains("INCOMPATIBLE"), "{out}");
    // The registry's reason, indented under its schema, names the field at fault.
    assert!(
        out.lines()
            .any(|l| l.starts_with("    ") && l.contains("email")),
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
