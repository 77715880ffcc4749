//! The relay stage: outbox rows → Avro events → Kafka, one active relay per pipeline.
//!
//! Loop of the leader: read a batch of unpublished rows in `seq` order, encode each (a row
//! that cannot be encoded becomes a dead letter, or halts the relay), publish them all and
//! wait for Kafka's acknowledgements, and only then mark the rows published. A crash between
//! publish and mark republishes the batch (at-least-once; apply's version guard absorbs it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rdkafka::message::{Header, OwnedHeaders};
use tokio_util::sync::CancellationToken;

pub mod mongo;

use crate::codec::{EventCodec, OutboxEvent, SchemaStore};
use crate::config::{Config, OnInvalid, OutboxSourceConfig, SourceConfig};
use crate::dlq::{self, Failure};
use crate::error::{classify, Disposition, Error};
use crate::http::Control;
use crate::metrics::{stage, Metrics};
use crate::publish::{headers, KafkaHealth, Outgoing, Publisher};
use crate::source::outbox::{OutboxRow, OutboxSource};
use crate::source::Source;

/// How often the leader samples the outbox backlog for the metrics.
const BACKLOG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Everything the leader loop needs besides the source.
struct Leader<'a> {
    config: &'a Config,
    source_config: &'a OutboxSourceConfig,
    publisher: &'a Publisher,
    codec: &'a EventCodec,
    metrics: &'a Metrics,
    control: &'a Control,
    cancel: &'a CancellationToken,
}

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
        let leader = Leader {
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
    let mut policy = ExponentialBackoff {
        max_elapsed_time: None,
        max_interval: Duration::from_secs(10),
        ..ExponentialBackoff::default()
    };
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
                let delay = policy.next_backoff().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, retry_in = ?delay, "relay lost its connection or lease; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = publisher.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush on shutdown incomplete");
    }
    result
}

impl Leader<'_> {
    async fn lead(&self, mut source: OutboxSource) -> Result<(), Error> {
        let (config, metrics, cancel) = (self.config, self.metrics, self.cancel);
        let mut last_purge = Instant::now();
        let mut last_sample: Option<Instant> = None;
        loop {
            if last_sample.is_none_or(|t| t.elapsed() >= BACKLOG_SAMPLE_INTERVAL) {
                last_sample = Some(Instant::now());
                let (rows, oldest) = source.backlog().await?;
                metrics.outbox_backlog.set(rows);
                metrics.outbox_oldest_age.set(oldest);
            }
            if self.control.is_paused() {
                tracing::info!("paused: the outbox is not read until resumed");
                self.control.wait_resumed(cancel).await;
                tracing::info!("resumed");
            }
            let started = Instant::now();
            let rows = source.next_batch(cancel).await?;
            let read_at = Instant::now();
            if rows.is_empty() {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            count_read(metrics, rows.len());
            let mut messages = Vec::with_capacity(rows.len());
            let mut dead = Vec::new();
            for row in &rows {
                let (message, invalid) = self.message_for(row, true)?;
                dead.extend(invalid);
                messages.push(message);
            }
            let mut per_topic = HashMap::new();
            for m in &messages {
                *per_topic.entry(m.topic.clone()).or_default() += 1;
            }
            // A cancelled publish leaves the rows unmarked: they are published again next time.
            let encoded_at = Instant::now();
            let published = tokio::select! {
                r = self.publisher.publish_all(messages) => r,
                _ = cancel.cancelled() => return Ok(()),
            };
            match published {
                Ok(()) => {}
                // A message over the size limit (the client's or the broker's) would fail the
                // batch forever: publish row by row and dead-letter the ones that do not fit.
                Err(e) if e.is_too_large() => {
                    tracing::warn!(error = %e, "a message of the batch is too large; publishing row by row");
                    let Some((counts, oversize)) = self.publish_row_by_row(&rows).await? else {
                        return Ok(());
                    };
                    per_topic = counts;
                    dead.extend(oversize);
                }
                Err(e) => return Err(e),
            }
            let published_at = Instant::now();
            source.ack(&rows).await?;
            per_topic.remove(&config.relay.dead_letter_topic);
            count_acked(metrics, per_topic, dead);
            // Where a batch's time goes (`read_ms` includes waiting for rows when idle).
            let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
            tracing::debug!(
                rows = rows.len(),
                last_seq = rows.last().map(|r| r.seq),
                read_ms = ms(started, read_at),
                encode_ms = ms(read_at, encoded_at),
                publish_ms = ms(encoded_at, published_at),
                mark_ms = ms(published_at, Instant::now()),
                "batch published"
            );
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = Instant::now();
                let purged = source.purge_published().await?;
                if purged > 0 {
                    tracing::info!(
                        purged,
                        retention_secs = self.source_config.retention_secs,
                        "purged published outbox rows"
                    );
                }
            }
        }
    }
}

impl Leader<'_> {
    /// The message for a row: its event, or (when it cannot be encoded and the policy is
    /// `dead-letter`) its dead letter plus `(event topic, class)` for the metrics.
    fn message_for(
        &self,
        row: &OutboxRow,
        log_invalid: bool,
    ) -> Result<(Outgoing, Option<DeadRow>), Error> {
        let config = self.config;
        match to_message(config, self.codec, row) {
            Ok(m) => Ok((m, None)),
            Err(e) if config.relay.on_invalid == OnInvalid::Halt => Err(halted(row, &e)),
            Err(e) => {
                if log_invalid {
                    tracing::warn!(seq = row.seq, id = %row.id, class = e.class(), error = %e,
                        topic = %config.relay.dead_letter_topic, "outbox row dead-lettered");
                }
                let dead = (config.kafka.topic_for(&row.aggregate_type), e.class());
                Ok((dead_letter(config, row, &e, "relay.encode"), Some(dead)))
            }
        }
    }

    /// Publishes `rows` one at a time; a row whose message is too large goes to the relay's
    /// dead-letter topic without its payload (which stays in the outbox until the
    /// retention), or the relay halts when `on_invalid = "halt"`. Returns the published
    /// count per topic and the dead-lettered rows, or `None` when cancelled. Rows of the
    /// failed batch that had already reached Kafka are published again (at-least-once).
    async fn publish_row_by_row(&self, rows: &[OutboxRow]) -> Result<Option<PublishedRows>, Error> {
        let config = self.config;
        let mut per_topic = HashMap::new();
        let mut dead = Vec::new();
        for row in rows {
            // Already logged by the first attempt at the batch.
            let (message, invalid) = self.message_for(row, false)?;
            let topic = message.topic.clone();
            let sent = tokio::select! {
                r = self.publisher.publish_all(vec![message]) => r,
                _ = self.cancel.cancelled() => return Ok(None),
            };
            match sent {
                Ok(()) => match invalid {
                    Some(d) => dead.push(d),
                    None => *per_topic.entry(topic).or_default() += 1,
                },
                Err(e) if e.is_too_large() => {
                    if config.relay.on_invalid == OnInvalid::Halt {
                        return Err(halted(row, &e));
                    }
                    let bytes = row.payload.as_ref().map_or(0, String::len);
                    tracing::error!(seq = row.seq, id = %row.id, bytes, error = %e,
                        "outbox row too large for Kafka: dead-lettered without its payload");
                    let without_payload = OutboxRow {
                        payload: None,
                        ..row.clone()
                    };
                    let mut letter = dead_letter(config, &without_payload, &e, "relay.publish");
                    let size = bytes.to_string();
                    letter.headers = letter.headers.insert(Header {
                        key: dlq::headers::VALUE_OMITTED,
                        value: Some(size.as_str()),
                    });
                    tokio::select! {
                        r = self.publisher.publish_all(vec![letter]) => r?,
                        _ = self.cancel.cancelled() => return Ok(None),
                    }
                    dead.push((config.kafka.topic_for(&row.aggregate_type), e.class()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some((per_topic, dead)))
    }
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
