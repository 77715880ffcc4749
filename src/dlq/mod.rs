//! Dead-letter topics: where events go that can never be applied, with enough context to fix
//! and replay them. Header names follow Kafka Connect's `__connect.errors.*` in spirit.
//! This module is what the relay and apply stages need to write them; reading them back and
//! replaying them is [`crate::ops`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};

use crate::error::Error;
use crate::publish::{Outgoing, Publisher};

/// Header names on dead-lettered messages (documented in the README).
pub mod headers {
    pub const TOPIC: &str = "__dualsync.errors.topic";
    pub const PARTITION: &str = "__dualsync.errors.partition";
    pub const OFFSET: &str = "__dualsync.errors.offset";
    /// Stable error class, e.g. `decode.bad_magic`, `sink.rejected`, `encode.schema_violation`.
    pub const CLASS: &str = "__dualsync.errors.class";
    pub const MESSAGE: &str = "__dualsync.errors.message";
    /// Where it failed: a [`super::FailedStage`] (`decode`, `sink`, `relay.encode`,
    /// `relay.publish`).
    pub const STAGE: &str = "__dualsync.errors.stage";
    pub const GROUP: &str = "__dualsync.errors.group";
    pub const PIPELINE: &str = "__dualsync.errors.pipeline";
    pub const ATTEMPTS: &str = "__dualsync.errors.attempts";
    /// Milliseconds since the epoch when it was dead-lettered.
    pub const TIMESTAMP: &str = "__dualsync.errors.timestamp";
    /// Set (to the original value's size in bytes) when the value was too large for the
    /// dead-letter topic and was left out: the original stays at topic/partition/offset.
    pub const VALUE_OMITTED: &str = "__dualsync.errors.value.omitted.bytes";
    /// Relay only: the outbox row's seq and id.
    pub const ROW_SEQ: &str = "__dualsync.errors.row.seq";
    pub const ROW_ID: &str = "__dualsync.errors.row.id";
    /// Prefix shared by every error header (dropped when a message is replayed).
    pub const ERROR_PREFIX: &str = "__dualsync.errors.";
    /// On replayed messages: when (millis since the epoch) and from where.
    pub const REPLAY_TIME: &str = "__dualsync.replay.timestamp";
    pub const REPLAY_DLQ_TOPIC: &str = "__dualsync.replay.dlq.topic";
    pub const REPLAY_DLQ_PARTITION: &str = "__dualsync.replay.dlq.partition";
    pub const REPLAY_DLQ_OFFSET: &str = "__dualsync.replay.dlq.offset";
}

/// Where a dead letter failed, as its [`headers::STAGE`] header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedStage {
    /// Apply could not decode the message.
    Decode,
    /// The sink refused the record for good.
    Sink,
    /// The relay could not encode the outbox row or change.
    RelayEncode,
    /// Kafka refused the relay's message (too large).
    RelayPublish,
}

impl FailedStage {
    const ALL: [FailedStage; 4] = [
        FailedStage::Decode,
        FailedStage::Sink,
        FailedStage::RelayEncode,
        FailedStage::RelayPublish,
    ];

    /// The header value, stable: consumers of the dead-letter topics match on it.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailedStage::Decode => "decode",
            FailedStage::Sink => "sink",
            FailedStage::RelayEncode => "relay.encode",
            FailedStage::RelayPublish => "relay.publish",
        }
    }

    /// The stage a header value names; `None` for one dualsync does not write.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// Whether the relay wrote the letter (its value is the raw row or change).
    pub fn is_relay(self) -> bool {
        matches!(self, FailedStage::RelayEncode | FailedStage::RelayPublish)
    }
}

impl std::fmt::Display for FailedStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Context of one failure.
pub struct Failure<'a> {
    pub error: &'a Error,
    pub stage: FailedStage,
    pub pipeline: &'a str,
    pub group: Option<&'a str>,
    pub attempts: u32,
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// The error headers, appended to `base` (the original message's headers, kept as they were).
pub fn error_headers(base: OwnedHeaders, failure: &Failure<'_>) -> OwnedHeaders {
    let mut h = base;
    let mut add = |key: &str, value: String| {
        h = std::mem::take(&mut h).insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    };
    add(headers::CLASS, failure.error.class().to_string());
    add(headers::MESSAGE, failure.error.to_string());
    add(headers::STAGE, failure.stage.as_str().to_string());
    add(headers::PIPELINE, failure.pipeline.to_string());
    if let Some(g) = failure.group {
        add(headers::GROUP, g.to_string());
    }
    add(headers::ATTEMPTS, failure.attempts.to_string());
    add(headers::TIMESTAMP, now_millis().to_string());
    h
}

/// Builds the dead letter for a consumed message: original key, value and headers, plus the
/// error headers and the message's origin.
pub fn dead_letter_for(message: &OwnedMessage, dlq_topic: &str, failure: &Failure<'_>) -> Outgoing {
    let mut base = OwnedHeaders::new();
    if let Some(h) = message.headers() {
        for header in h.iter() {
            base = base.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    let origin = [
        (headers::TOPIC, message.topic().to_string()),
        (headers::PARTITION, message.partition().to_string()),
        (headers::OFFSET, message.offset().to_string()),
    ];
    for (key, value) in &origin {
        base = base.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    Outgoing {
        topic: dlq_topic.to_string(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: error_headers(base, failure),
    }
}

/// The same dead letter without its value, for when the broker refused it as too large: the
/// context headers still arrive, and the original stays readable where it came from (until
/// that topic's retention).
pub fn without_value(letter: Outgoing) -> Outgoing {
    let size = letter.value.len().to_string();
    Outgoing {
        value: Vec::new(),
        headers: letter.headers.insert(Header {
            key: headers::VALUE_OMITTED,
            value: Some(size.as_bytes()),
        }),
        ..letter
    }
}

/// Sends dead letters and waits for the broker's acknowledgement.
pub async fn send(publisher: &Publisher, letters: Vec<Outgoing>) -> Result<(), Error> {
    publisher.publish_all(letters).await
}

#[cfg(test)]
mod tests {
    use super::FailedStage;

    #[test]
    fn stages_read_back_as_written() {
        for stage in FailedStage::ALL {
            assert_eq!(FailedStage::parse(stage.as_str()), Some(stage));
        }
        assert_eq!(FailedStage::parse("relay.other"), None);
        assert!(FailedStage::RelayPublish.is_relay() && !FailedStage::Sink.is_relay());
    }
}
