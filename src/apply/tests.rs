//! Apply in-process: the memory sink ([`crate::sink::memory`]) and messages made here stand
//! for the servers, so the stage's decisions are checked in milliseconds. What needs the real
//! servers (offsets, rebalances, dead letters on Kafka) is in `tests/it`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::share::{self, ShareResult};
use super::ApplyContext;
use crate::codec::{DecodeError, OutboxEvent, SchemaStore};
use crate::config::Config;
use crate::error::Error;
use crate::mapping::{check_route, decode_message};
use crate::metrics::Metrics;
use crate::publish::{headers, KafkaHealth, Publisher};
use crate::sink::memory::{MemorySink, Refusal};
use crate::wire::EventCodec;

const PAYLOAD: &str = r#"{"type": "record", "name": "Item", "namespace": "t", "fields": [{"name": "n", "type": "long"}]}"#;

/// A pipeline whose servers are never reached (port 1): nothing here talks to them.
fn config(on_error: &str) -> Config {
    let text = format!(
        r#"
[pipeline]
name = "p"
[source]
kind = "postgres_outbox"
url = "postgres://u@127.0.0.1:1/db"
[kafka]
brokers = "127.0.0.1:1"
[sinks.mem]
kind = "postgres"
url = "postgres://u@127.0.0.1:1/db"
[apply]
on_error = "{on_error}"
retry_initial_ms = 1
retry_max_ms = 2
"#
    );
    Config::from_toml(Path::new("t.toml"), &text, Vec::new()).unwrap()
}

fn store() -> Arc<SchemaStore> {
    let mut store = SchemaStore::default();
    store.add("items", PAYLOAD).unwrap();
    Arc::new(store)
}

fn context(sink: MemorySink, on_error: &str) -> ApplyContext<MemorySink> {
    let config = config(on_error);
    ApplyContext {
        sink: Arc::new(sink),
        sink_name: "mem".into(),
        codec: EventCodec::new(store(), None),
        dlq: Publisher::with_health(&config.kafka, KafkaHealth::default()).unwrap(),
        group: config.group_id("mem"),
        metrics: Arc::new(Metrics::new("p", "apply")),
        cancel: CancellationToken::new(),
        traces: None,
        signals: Default::default(),
        config,
    }
}

fn event(key: &str, version: i64) -> OutboxEvent {
    OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: "changed".into(),
        aggregate_type: "items".into(),
        aggregate_id: key.into(),
        version,
        created_at_micros: 7,
        payload: Some(json!({ "n": version })),
    }
}

/// The message the relay would have published for `event`, consumed from `topic` at `offset`.
fn message(event: &OutboxEvent, topic: &str, offset: i64) -> OwnedMessage {
    OwnedMessage::new(
        Some(store().encode(event).unwrap()),
        Some(event.aggregate_id.as_bytes().to_vec()),
        topic.to_string(),
        Timestamp::NotAvailable,
        0,
        offset,
        None,
    )
}

/// Messages of `items`' own topic, one per `(key, version)`, at offsets 0, 1, …
fn messages(ctx: &ApplyContext<MemorySink>, events: &[(&str, i64)]) -> Vec<OwnedMessage> {
    let topic = ctx.config.kafka.topic_for("items");
    (0..)
        .zip(events)
        .map(|(offset, (key, version))| message(&event(key, *version), &topic, offset))
        .collect()
}

fn held(sink: &MemorySink) -> Vec<(String, i64)> {
    sink.records()
        .into_iter()
        .map(|((_, key), (version, _))| (key, version))
        .collect()
}

/// A batch the sink refuses as a whole is written again one record at a time, so only the
/// refused record is singled out (here, with `on_error = "halt"`, the error names its offset;
/// with dead letters the others go in and it goes to the dead-letter topic).
#[tokio::test]
async fn a_refused_batch_is_narrowed_down_to_the_refused_record() {
    let sink = MemorySink::refusing(|r| r.key == "k3", Refusal::WholeBatch);
    let ctx = context(sink, "halt");
    let batch = messages(
        &ctx,
        &[("k1", 1), ("k2", 1), ("k3", 1), ("k4", 1), ("k5", 1)],
    );
    let e = share::process(&ctx, batch).await.unwrap_err();
    assert!(
        matches!(&e, Error::Halted(why) if why.contains("@2")),
        "{e}"
    );
    let sizes: Vec<usize> = ctx.sink.calls().iter().map(Vec::len).collect();
    assert_eq!(sizes, [5, 1, 1, 1]);
    assert_eq!(held(&ctx.sink), [("k1".into(), 1), ("k2".into(), 1)]);
}

/// Several versions of a key in one batch: the newest is written, the others count as stale,
/// and what the sink already holds newer is never overwritten.
#[tokio::test]
async fn the_newest_version_of_each_key_is_written_and_the_rest_counted_stale() {
    let ctx = context(MemorySink::new(), "dead-letter");
    let batch = messages(&ctx, &[("a", 1), ("a", 3), ("a", 2), ("b", 1)]);
    assert_eq!(
        share::process(&ctx, batch).await.unwrap(),
        ShareResult::Done
    );
    assert_eq!(held(&ctx.sink), [("a".into(), 3), ("b".into(), 1)]);
    let again = messages(&ctx, &[("a", 2), ("b", 4)]);
    assert_eq!(
        share::process(&ctx, again).await.unwrap(),
        ShareResult::Done
    );
    assert_eq!(held(&ctx.sink), [("a".into(), 3), ("b".into(), 4)]);
    let topic = ctx.config.kafka.topic_for("items");
    let count = |outcome: &str| {
        ctx.metrics
            .applied
            .with_label_values(&[&topic, outcome])
            .get()
    };
    assert_eq!((count("written"), count("stale")), (3, 3));
}

/// A transient failure is retried (never skipped) and the batch then goes in once.
#[tokio::test]
async fn a_transient_failure_is_retried_until_the_write_goes_in() {
    let ctx = context(MemorySink::new(), "halt");
    for _ in 0..2 {
        ctx.sink.fail_next(Error::SinkTimeout {
            sink: "mem".into(),
            after_ms: 1,
        });
    }
    let batch = messages(&ctx, &[("a", 1), ("b", 1)]);
    assert_eq!(
        share::process(&ctx, batch).await.unwrap(),
        ShareResult::Done
    );
    assert_eq!(ctx.sink.calls().len(), 3);
    assert_eq!(held(&ctx.sink), [("a".into(), 1), ("b".into(), 1)]);
}

/// The route check: an event is written only from its own type's topic, only for a type the
/// pipeline carries, only under its own key; the commit time comes from the relay's header.
#[tokio::test]
async fn a_message_is_decoded_only_from_its_own_topic_under_its_own_key() {
    let (config, codec) = (config("halt"), EventCodec::new(store(), None));
    let topic = config.kafka.topic_for("items");
    let decode = |m: OwnedMessage| {
        let (config, codec) = (&config, &codec);
        async move { decode_message(config, codec, &m, Instant::now()).await }
    };
    let (record, committed_at) = decode(message(&event("a", 4), &topic, 0)).await.unwrap();
    assert_eq!(
        (record.key.as_str(), record.version, committed_at),
        ("a", 4, 7)
    );
    let with_header = message(&event("a", 4), &topic, 0).replace_headers(Some(
        OwnedHeaders::new().insert(Header {
            key: headers::COMMITTED_AT,
            value: Some("99"),
        }),
    ));
    assert_eq!(decode(with_header).await.unwrap().1, 99);
    let elsewhere = decode(message(&event("a", 4), "outbox.event.other", 0)).await;
    assert!(matches!(
        elsewhere,
        Err(Error::Decode(DecodeError::WrongTopic { .. }))
    ));
    let wrong_key = OwnedMessage::new(
        Some(store().encode(&event("a", 4)).unwrap()),
        Some(b"b".to_vec()),
        topic.clone(),
        Timestamp::NotAvailable,
        0,
        0,
        None,
    );
    assert!(matches!(
        decode(wrong_key).await,
        Err(Error::Decode(DecodeError::KeyMismatch { .. }))
    ));
    assert!(matches!(
        check_route(
            &config,
            &codec,
            "customers",
            &config.kafka.topic_for("customers")
        ),
        Err(DecodeError::UnknownAggregateType(_))
    ));
}
