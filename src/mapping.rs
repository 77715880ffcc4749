//! What an outbox row becomes on its way through the pipeline, in one place below the stages:
//! its event, its Kafka message and its dead letter (the relay), the way back from a dead
//! letter to the row (`dlq replay`), and the route check every reader of a topic applies
//! (apply before a write, `dlq replay` before a send). Whichever capture read the row (polling
//! or the WAL) and whichever tool writes it, the mapping is this one.

use rdkafka::message::{Header, OwnedHeaders};

use crate::codec::{DecodeError, OutboxEvent};
use crate::config::{Config, SourceConfig};
use crate::dlq::{self, FailedStage, Failure};
use crate::error::Error;
use crate::publish::{headers, Outgoing};
use crate::source::outbox::OutboxRow;
use crate::wire::EventCodec;

/// The event an outbox row stands for; fails when its payload is not JSON.
pub fn to_event(row: &OutboxRow) -> Result<OutboxEvent, Error> {
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
    let mut h = event_headers(&event, row.committed_at_micros);
    if let Some(tp) = &row.traceparent {
        h = h.insert(Header {
            key: headers::TRACEPARENT,
            value: Some(tp.as_str()),
        });
    }
    Ok(Outgoing {
        topic: config.kafka.topic_for(&row.aggregate_type),
        key: Some(event.aggregate_id.into_bytes()),
        value,
        headers: h,
    })
}

/// The seven event headers every relay message carries, whichever the source, so consumers
/// can route and order without decoding the value (see docs/consumers.md).
pub fn event_headers(event: &OutboxEvent, committed_at_micros: i64) -> OwnedHeaders {
    let version = event.version.to_string();
    let created = event.created_at_micros.to_string();
    let committed = committed_at_micros.to_string();
    let id = event.event_id.to_string();
    let mut h = OwnedHeaders::new();
    for (key, v) in [
        (headers::EVENT_ID, id.as_str()),
        (headers::EVENT_TYPE, event.event_type.as_str()),
        (headers::AGGREGATE_TYPE, event.aggregate_type.as_str()),
        (headers::AGGREGATE_ID, event.aggregate_id.as_str()),
        (headers::VERSION, version.as_str()),
        (headers::CREATED_AT, created.as_str()),
        (headers::COMMITTED_AT, committed.as_str()),
    ] {
        h = h.insert(Header {
            key,
            value: Some(v),
        });
    }
    h
}

/// The raw row as JSON, with the error in headers, for the relay's dead-letter topic.
pub fn dead_letter(
    config: &Config,
    row: &OutboxRow,
    error: &Error,
    stage: FailedStage,
) -> Outgoing {
    let raw = serde_json::json!({
        "seq": row.seq,
        "id": row.id,
        "aggregatetype": row.aggregate_type,
        "aggregateid": row.aggregate_id,
        "type": row.event_type,
        "payload": row.payload,
        "traceparent": row.traceparent,
        "created_at_micros": row.created_at_micros,
        "committed_at_micros": row.committed_at_micros,
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

/// Why a relay dead letter's value cannot be read back as its outbox row.
#[derive(Debug, thiserror::Error)]
pub enum NotARow {
    #[error("not a relay dead letter: {0}")]
    NotJson(serde_json::Error),
    #[error("a MongoDB change cannot be replayed from its dead letter (the document may have changed since): fix the document in the primary, or publish its current state with `dualsync snapshot --collection <name>`")]
    MongoChange,
    #[error("relay dead letter lacks `{0}`")]
    Missing(&'static str),
    #[error("relay dead letter has a bad `id`: {0}")]
    BadId(uuid::Error),
}

/// Reads back the raw row of a relay dead letter (the JSON written by [`dead_letter`]).
pub fn row_from_dead_letter(value: &[u8]) -> Result<OutboxRow, NotARow> {
    let raw: serde_json::Value = serde_json::from_slice(value).map_err(NotARow::NotJson)?;
    if raw.get("operationType").is_some() {
        return Err(NotARow::MongoChange);
    }
    let text = |key: &'static str| {
        raw.get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or(NotARow::Missing(key))
    };
    let int = |key: &'static str| {
        raw.get(key)
            .and_then(|v| v.as_i64())
            .ok_or(NotARow::Missing(key))
    };
    Ok(OutboxRow {
        seq: int("seq")?,
        id: text("id")?.parse().map_err(NotARow::BadId)?,
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
        // Letters written before the commit time was kept: the insert time is the fallback.
        committed_at_micros: int("committed_at_micros").or_else(|_| int("created_at_micros"))?,
    })
}

/// An event is written only if its aggregate type is one this pipeline carries and it was
/// read from that type's own topic: the envelope alone is never trusted to pick the table or
/// collection it writes. `dlq replay` asks the same before sending a letter back.
pub fn check_route(
    config: &Config,
    codec: &EventCodec,
    aggregate_type: &str,
    topic: &str,
) -> Result<(), DecodeError> {
    let carried = codec.store().for_type(aggregate_type).is_some()
        || matches!(&config.source, Some(SourceConfig::Mongodb(s)) if s.watches(aggregate_type));
    if !carried {
        return Err(DecodeError::UnknownAggregateType(
            aggregate_type.to_string(),
        ));
    }
    let expected = config.kafka.topic_for(aggregate_type);
    if expected != topic {
        return Err(DecodeError::WrongTopic {
            aggregate_type: aggregate_type.to_string(),
            topic: topic.to_string(),
            expected,
        });
    }
    Ok(())
}
