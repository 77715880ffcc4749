//! The relay stage: outbox rows → Avro events → Kafka, one active relay per pipeline.
//!
//! Loop of the leader: read a batch of unpublished rows in `seq` order, encode each (a row
//! that cannot be encoded becomes a dead letter, or halts the relay), publish them all and
//! wait for Kafka's acknowledgements, and only then mark the rows published. A crash between
//! publish and mark republishes the batch (at-least-once; apply's version guard absorbs it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rdkafka::message::{Header, OwnedHeaders};
use tokio_util::sync::CancellationToken;

use crate::codec::{OutboxEvent, SchemaStore};
use crate::config::{Config, OnInvalid, OutboxSourceConfig};
use crate::dlq::{self, Failure};
use crate::error::{classify, Disposition, Error};
use crate::publish::{headers, Outgoing, Publisher};
use crate::source::outbox::{OutboxRow, OutboxSource};
use crate::source::Source;

#[derive(Debug, Default)]
pub struct RelayStats {
    pub published: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
}

/// Runs the relay until `cancel`: standby until it holds the leader lock, then publishes.
/// Transient failures (lost connections, broker outages) are retried forever with backoff.
pub async fn run(
    config: &Config,
    schemas: Arc<SchemaStore>,
    stats: Arc<RelayStats>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let source_config = config.outbox_source()?.clone();
    let publisher = Publisher::new(&config.kafka)?;
    let mut policy = ExponentialBackoff {
        max_elapsed_time: None,
        max_interval: Duration::from_secs(10),
        ..ExponentialBackoff::default()
    };
    let result = loop {
        let attempt = async {
            let Some(source) =
                OutboxSource::acquire_leadership(&source_config, &config.pipeline.name, &cancel)
                    .await?
            else {
                return Ok(());
            };
            lead(
                config,
                &source_config,
                source,
                &publisher,
                &schemas,
                &stats,
                &cancel,
            )
            .await
        };
        match attempt.await {
            Ok(()) => break Ok(()),
            Err(e) if classify(&e) == Disposition::Retry => {
                let delay = policy.next_backoff().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, retry_in = ?delay, "relay lost its connection; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => break Err(e),
        }
    };
    // Whatever is still queued was never marked, so it will be re-read; flushing just avoids
    // needless duplicates.
    if let Err(e) = publisher.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush on shutdown incomplete");
    }
    result
}

async fn lead(
    config: &Config,
    source_config: &OutboxSourceConfig,
    mut source: OutboxSource,
    publisher: &Publisher,
    schemas: &SchemaStore,
    stats: &RelayStats,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    let mut last_purge = Instant::now();
    loop {
        let rows = source.next_batch(cancel).await?;
        if rows.is_empty() {
            if cancel.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        let mut messages = Vec::with_capacity(rows.len());
        let mut dead = 0u64;
        for row in &rows {
            match to_message(config, schemas, row) {
                Ok(m) => messages.push(m),
                Err(e) if config.relay.on_invalid == OnInvalid::Halt => {
                    return Err(Error::Halted(format!(
                        "outbox row seq={} id={} ({} {}): {e}",
                        row.seq, row.id, row.aggregate_type, row.aggregate_id
                    )));
                }
                Err(e) => {
                    tracing::warn!(seq = row.seq, id = %row.id, class = e.class(), error = %e,
                        topic = %config.relay.dead_letter_topic, "outbox row dead-lettered");
                    messages.push(dead_letter(config, row, &e));
                    dead += 1;
                }
            }
        }
        let count = messages.len() as u64;
        // A cancelled publish leaves the rows unmarked: they are published again next time.
        tokio::select! {
            r = publisher.publish_all(messages) => r?,
            _ = cancel.cancelled() => return Ok(()),
        }
        source.ack(&rows).await?;
        stats.published.fetch_add(count - dead, Ordering::Relaxed);
        stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            rows = rows.len(),
            last_seq = rows.last().map(|r| r.seq),
            "batch published"
        );
        if last_purge.elapsed() > Duration::from_secs(60) {
            last_purge = Instant::now();
            let purged = source.purge_published().await?;
            if purged > 0 {
                tracing::info!(
                    purged,
                    retention_secs = source_config.retention_secs,
                    "purged published outbox rows"
                );
            }
        }
    }
}

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

fn to_message(config: &Config, schemas: &SchemaStore, row: &OutboxRow) -> Result<Outgoing, Error> {
    let event = to_event(row)?;
    let value = schemas.encode(&event)?;
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
fn dead_letter(config: &Config, row: &OutboxRow, error: &Error) -> Outgoing {
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
        stage: "relay.encode",
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
