//! The relay stage: outbox rows → Avro events → Kafka, one active relay per pipeline.
//!
//! Loop of the leader ([`outbox`]): read a batch of unpublished rows in `seq` order, encode
//! each (a row that cannot be encoded becomes a dead letter, or halts the relay), hand them to
//! the producer, and mark the rows published only after Kafka acknowledged all of them; the
//! next batches are read and sent meanwhile (a bounded pipeline). A crash between publish and
//! mark republishes the unmarked rows (at-least-once; apply's version guard absorbs them).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use tokio_util::sync::CancellationToken;

pub mod mongo;
mod outbox;

use crate::codec::{EventCodec, OutboxEvent, SchemaStore};
use crate::config::{Config, SourceConfig};
use crate::dlq::{self, Failure};
use crate::error::{classify, endpoint, Disposition, Endpoint, Error};
use crate::http::Control;
use crate::metrics::{stage, Metrics};
use crate::publish::{headers, KafkaHealth, Outgoing, Publisher};
use crate::retry::{sleep_unless_cancelled, Backoff};
use crate::source::outbox::{OutboxRow, OutboxSource};

/// Runs the relay until `cancel`: standby until it holds the leader lock, then publishes.
/// Transient failures (lost connections, broker outages) are retried forever with backoff.
/// While `control` is paused the leader keeps its lock but reads nothing.
pub async fn run(
    config: &Config,
    schemas: Arc<SchemaStore>,
    metrics: Arc<Metrics>,
    control: Control,
    cancel: CancellationToken,
) -> Result<(), Error> {
    if let Some(SourceConfig::Mongodb(source)) = &config.source {
        return mongo::run(config, source, schemas, metrics, control, cancel).await;
    }
    let source_config = config.outbox_source()?.clone();
    let Some(codec) = EventCodec::for_publishing(config, schemas, &cancel).await? else {
        return Ok(());
    };
    let publisher = Publisher::with_health(
        &config.kafka,
        KafkaHealth {
            metrics: Some(metrics.clone()),
        },
    )?;
    lead_until_cancelled(&publisher, &metrics, &cancel, || async {
        let Some(source) = OutboxSource::acquire_leadership(
            &source_config,
            &config.pipeline.name,
            &metrics.health,
            &cancel,
        )
        .await?
        else {
            return Ok(());
        };
        metrics.relay_leader.set(1);
        let leader = outbox::Leader {
            config,
            source_config: &source_config,
            publisher: &publisher,
            codec: &codec,
            metrics: &metrics,
            control: &control,
            cancel: &cancel,
        };
        leader.lead(source).await
    })
    .await
}

/// A batch was read from the source.
fn count_read(metrics: &Metrics, n: usize) {
    metrics.outbox_rows_read.inc_by(n as u64);
    metrics
        .batch_size
        .with_label_values(&[stage::RELAY])
        .observe(n as f64);
}

/// A batch is published and its progress recorded: the source is healthy again.
fn count_acked(metrics: &Metrics, per_topic: HashMap<String, u64>, dead: Vec<DeadRow>) {
    metrics.health.recovered();
    metrics.health.set_database_up(true);
    for (topic, n) in per_topic {
        metrics.published.with_label_values(&[&topic]).inc_by(n);
    }
    for (topic, class) in dead {
        metrics.count_dead_letter(stage::RELAY, &topic, class);
    }
}

/// Runs `lead` (become the leader, then publish) until it returns `Ok` (cancelled) or a
/// non-transient error; a transient one (lost connection or lease, broker outage) is retried
/// forever with backoff. Flushes the producer at the end: whatever is still queued was never
/// marked, so it will be read again; flushing only avoids needless duplicates.
async fn lead_until_cancelled<F, Fut>(
    publisher: &Publisher,
    metrics: &Metrics,
    cancel: &CancellationToken,
    mut lead: F,
) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let mut policy = Backoff::reconnect();
    let result = loop {
        let outcome = lead().await;
        metrics.relay_leader.set(0);
        match outcome {
            Ok(()) => break Ok(()),
            Err(e) if classify(&e) == Disposition::Retry => {
                metrics.retries.with_label_values(&[stage::RELAY]).inc();
                metrics.health.retrying();
                if matches!(e, Error::Postgres(_) | Error::Mongo(_)) {
                    metrics.health.set_database_up(false);
                }
                let delay = policy.next_delay();
                match endpoint(&e, Endpoint::Source) {
                    Some(at) => tracing::warn!(error = %e, retry_in = ?delay, connection = %at,
                        config_key = %at.config_key(),
                        "relay lost its connection to the {at} ({}); reconnecting", at.config_key()),
                    None => {
                        tracing::warn!(error = %e, retry_in = ?delay, "relay lost its lease; reconnecting")
                    }
                }
                if !sleep_unless_cancelled(delay, cancel).await {
                    break Ok(());
                }
                metrics.health.probing();
            }
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = publisher.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush on shutdown incomplete");
    }
    result
}

/// The error that stops the relay on a bad row when `relay.on_invalid = "halt"`.
fn halted(row: &OutboxRow, error: &Error) -> Error {
    Error::Halted(format!(
        "outbox row seq={} id={} ({} {}): {error}",
        row.seq, row.id, row.aggregate_type, row.aggregate_id
    ))
}

/// A dead-lettered row, for the metrics: `(its event topic, error class)`.
type DeadRow = (String, &'static str);

/// Published messages per topic, and the dead-lettered rows.
type PublishedRows = (HashMap<String, u64>, Vec<DeadRow>);

fn to_event(row: &OutboxRow) -> Result<OutboxEvent, Error> {
    let payload = match &row.payload {
        None => None,
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| crate::codec::EncodeError::NotJson(e.to_string()))?,
        ),
    };
    Ok(OutboxEvent {
        event_id: row.id,
        event_type: row.event_type.clone(),
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        version: row.seq,
        created_at_micros: row.created_at_micros,
        payload,
    })
}

/// The Kafka message for an outbox row (also used to replay a relay dead letter after a fix).
pub fn to_message(config: &Config, codec: &EventCodec, row: &OutboxRow) -> Result<Outgoing, Error> {
    let event = to_event(row)?;
    let value = codec.encode(&event)?;
    let version = row.seq.to_string();
    let created = row.created_at_micros.to_string();
    let id = row.id.to_string();
    let mut h = OwnedHeaders::new();
    for (key, v) in [
        (headers::EVENT_ID, id.as_str()),
        (headers::EVENT_TYPE, row.event_type.as_str()),
        (headers::AGGREGATE_TYPE, row.aggregate_type.as_str()),
        (headers::AGGREGATE_ID, row.aggregate_id.as_str()),
        (headers::VERSION, version.as_str()),
        (headers::CREATED_AT, created.as_str()),
    ] {
        h = h.insert(Header {
            key,
            value: Some(v),
        });
    }
    if let Some(tp) = &row.traceparent {
        h = h.insert(Header {
            key: headers::TRACEPARENT,
            value: Some(tp.as_str()),
        });
    }
    Ok(Outgoing {
        topic: config.kafka.topic_for(&row.aggregate_type),
        key: Some(row.aggregate_id.clone().into_bytes()),
        value,
        headers: h,
    })
}

/// The raw row as JSON, with the error in headers, for the relay's dead-letter topic.
fn dead_letter(config: &Config, row: &OutboxRow, error: &Error, stage: &str) -> Outgoing {
    let raw = serde_json::json!({
        "seq": row.seq,
        "id": row.id,
        "aggregatetype": row.aggregate_type,
        "aggregateid": row.aggregate_id,
        "type": row.event_type,
        "payload": row.payload,
        "traceparent": row.traceparent,
        "created_at_micros": row.created_at_micros,
    });
    let seq = row.seq.to_string();
    let id = row.id.to_string();
    let base = OwnedHeaders::new()
        .insert(Header {
            key: dlq::headers::ROW_SEQ,
            value: Some(seq.as_str()),
        })
        .insert(Header {
            key: dlq::headers::ROW_ID,
            value: Some(id.as_str()),
        });
    let failure = Failure {
        error,
        stage,
        pipeline: &config.pipeline.name,
        group: None,
        attempts: 1,
    };
    Outgoing {
        topic: config.relay.dead_letter_topic.clone(),
        key: Some(row.aggregate_id.clone().into_bytes()),
        value: raw.to_string().into_bytes(),
        headers: dlq::error_headers(base, &failure),
    }
}

/// Reads back the raw row of a relay dead letter (the JSON written by [`dead_letter`]).
pub fn row_from_dead_letter(value: &[u8]) -> Result<OutboxRow, String> {
    let raw: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("not a relay dead letter: {e}"))?;
    if raw.get("operationType").is_some() {
        return Err("a MongoDB change cannot be replayed from its dead letter (the document may have changed since): fix the document in the primary, or publish its current state with `dualsync snapshot --collection <name>`".into());
    }
    let text = |key: &str| {
        raw.get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("relay dead letter lacks `{key}`"))
    };
    let int = |key: &str| {
        raw.get(key)
            .and_then(|v| v.as_i64())
            .ok_or_else(|| format!("relay dead letter lacks `{key}`"))
    };
    Ok(OutboxRow {
        seq: int("seq")?,
        id: text("id")?
            .parse()
            .map_err(|e| format!("relay dead letter has a bad `id`: {e}"))?,
        aggregate_type: text("aggregatetype")?,
        aggregate_id: text("aggregateid")?,
        event_type: text("type")?,
        payload: raw
            .get("payload")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        traceparent: raw
            .get("traceparent")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        created_at_micros: int("created_at_micros")?,
    })
}
