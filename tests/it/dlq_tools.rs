//! Dead-letter tooling on the real broker: a poison outbox row is dead-lettered, listed and
//! shown; a replay before the fix is refused as "would fail again"; after the schema is fixed a
//! dry run sends nothing, the replay is applied exactly once, and a second replay is refused.

use std::path::PathBuf;
use std::sync::Arc;

use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use dualsync::codec::SchemaStore;
use dualsync::config::SinkConfig;
use dualsync::dlq::headers;
use dualsync::metrics::total_where;
use dualsync::ops::inspect::{self, Filter};
use dualsync::ops::replay::{self, Decision};
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;
use dualsync::wire::EventCodec;

use crate::common::*;

fn copy_schemas() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("schemas"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(schemas_dir()).unwrap() {
        let path = entry.unwrap().path();
        // The aggregates' schemas; envelope/ is compiled into dualsync.
        if path.is_dir() {
            continue;
        }
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

const FIXED_CUSTOMER_SCHEMA: &str = r#"{
  "type": "record", "name": "Customer", "namespace": "dualsync.example",
  "fields": [
    {"name": "id", "type": "string"},
    {"name": "name", "type": "string"},
    {"name": "email", "type": "string"},
    {"name": "order_count", "type": "int", "default": 0},
    {"name": "tier", "type": ["null", "string"], "default": null}
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_is_listed_shown_fixed_and_replayed_exactly_once() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let schemas_dir = copy_schemas();
    let mut config = pipeline(&servers, &source_url, &sink_url, &unique("t"), "");
    config.encoding.schemas_dir = schemas_dir.clone();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    // c2 carries a field the customers schema does not know yet: the relay dead-letters it.
    source
        .batch_execute(
            r#"INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES
               ('customers', 'c1', 'CustomerUpserted', '{"id":"c1","name":"a","email":"a@x","order_count":1}'),
               ('customers', 'c2', 'CustomerUpserted', '{"id":"c2","name":"b","email":"b@x","order_count":2,"tier":"gold"}')"#,
        )
        .await
        .unwrap();
    let bad_seq: i64 = source
        .query_one(
            "SELECT seq FROM dualsync.outbox WHERE aggregateid = 'c2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    let first_apply_cancel = CancellationToken::new();
    let (first_apply, first_metrics) = spawn_apply(&config, "postgres", &first_apply_cancel);
    let SinkConfig::Postgres(pg) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(pg).await.unwrap();
    eventually("c1 is applied", || async {
        sink.get("customers", "c1").await.ok().flatten().is_some()
    })
    .await;

    // list + show
    let dlq = config.relay.dead_letter_topic.clone();
    let blocking_read = |topic: String| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || inspect::read_topic(&config, &topic))
                .await
                .unwrap()
                .unwrap()
        }
    };
    eventually("the dead letter is readable", || async {
        blocking_read(dlq.clone()).await.len() == 1
    })
    .await;
    let topics = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || inspect::dead_letter_topics(&config))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(topics.contains(&dlq), "{topics:?}");
    let letters = blocking_read(dlq.clone()).await;
    let summary = inspect::summarize(&dlq, &letters);
    assert_eq!(summary.messages, 1);
    assert_eq!(
        summary.by_class.keys().collect::<Vec<_>>(),
        ["encode.schema_violation"]
    );
    let filter = Filter {
        class: Some("encode".into()),
        key: Some("c2".into()),
        ..Filter::default()
    };
    assert!(filter.matches(&letters[0]));
    assert!(!Filter {
        key: Some("c1".into()),
        ..Filter::default()
    }
    .matches(&letters[0]));
    let old_schemas = EventCodec::new(Arc::new(SchemaStore::load_dir(&schemas_dir).unwrap()), None);
    let shown = inspect::decode_payload(&old_schemas, &letters[0].value).await;
    assert_eq!(shown["json"]["aggregateid"], "c2", "{shown}");
    assert!(letters[0]
        .header(headers::MESSAGE)
        .is_some_and(|m| m.contains("tier")));

    // Before the fix: refused, nothing sent.
    let outcomes = replay::replay(&config, &old_schemas, &dlq, letters.clone(), false, false)
        .await
        .unwrap();
    assert!(
        matches!(&outcomes[0].decision, Decision::StillFails { error } if error.contains("tier")),
        "{outcomes:?}"
    );
    assert!(!outcomes[0].sent);

    // The fix: a schema that knows `tier`, deployed to apply first, then replayed.
    std::fs::write(schemas_dir.join("customers.avsc"), FIXED_CUSTOMER_SCHEMA).unwrap();
    first_apply_cancel.cancel();
    first_apply.await.unwrap().unwrap();
    let (apply, apply_metrics) = spawn_apply(&config, "postgres", &cancel);
    let fixed = EventCodec::new(Arc::new(SchemaStore::load_dir(&schemas_dir).unwrap()), None);
    let customers_topic = config.kafka.topic_for("customers");

    let dry = replay::replay(&config, &fixed, &dlq, letters.clone(), true, false)
        .await
        .unwrap();
    assert_eq!(
        dry[0].decision,
        Decision::Replay {
            target: customers_topic.clone()
        }
    );
    assert!(!dry[0].sent, "a dry run sends nothing");

    let done = replay::replay(&config, &fixed, &dlq, letters.clone(), false, false)
        .await
        .unwrap();
    assert!(done[0].sent);
    eventually("the replayed c2 is applied with its original version", || async {
        matches!(sink.get("customers", "c2").await, Ok(Some((v, Some(doc)))) if v == bad_seq && doc["tier"] == "gold")
    })
    .await;

    let again = replay::replay(&config, &fixed, &dlq, letters.clone(), false, false)
        .await
        .unwrap();
    assert!(
        matches!(&again[0].decision, Decision::AlreadyReplayed { target, .. } if *target == customers_topic),
        "{again:?}"
    );
    assert!(!again[0].sent);

    // Exactly once on the topic, traceable to its dead letter.
    let on_topic = read_topic_until(&servers.kafka, &customers_topic, |m| {
        m.iter().any(|m| m.key() == Some(&b"c2"[..]))
    })
    .await;
    let replayed: Vec<_> = on_topic
        .iter()
        .filter(|m| m.key() == Some(&b"c2"[..]))
        .collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(
        header(replayed[0], headers::REPLAY_DLQ_TOPIC).as_deref(),
        Some(dlq.as_str())
    );
    assert_eq!(
        header(replayed[0], headers::REPLAY_DLQ_OFFSET).as_deref(),
        Some("0")
    );
    let written = total_where(&first_metrics.applied, "outcome", "written")
        + total_where(&apply_metrics.applied, "outcome", "written");
    assert_eq!(written, 2, "c1 once, the replayed c2 once");

    cancel.cancel();
    relay.await.unwrap().unwrap();
    apply.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&schemas_dir);
}
