//! Sending dead letters back after the cause was fixed.
//!
//! An apply dead letter goes back to its original topic as it was (key, value, original
//! headers), a relay dead letter (an outbox row that could not be encoded) is encoded again
//! with the current schemas and published to its aggregate's topic. Either way the version it
//! carries is the original one, so apply's version guard decides: a replay never overwrites
//! anything newer the sink holds, and never brings back a record whose tombstone was purged
//! after a newer delete (a replay at or below the sink's purge horizon, for a key it does not
//! hold, is dead-lettered again as `sink.below_purge_horizon`; `verify --repair` recovers it). Each replayed message carries `__dualsync.replay.*` headers naming the dead
//! letter it came from, and every replay is recorded in `<dead-letter topic>.replayed` (key
//! `partition:offset`), so a second replay of the same message is refused unless forced.
//! Messages that would fail again the same way (they still do not decode or encode with the
//! current schemas, or their event still does not route to the topic they go back to) are not
//! sent unless forced.

use std::collections::HashMap;

use rdkafka::message::{Header, OwnedHeaders};
use serde::Serialize;

use super::inspect::{self, DeadLetter};
use crate::codec::DecodeError;
use crate::config::Config;
use crate::dlq::{headers, FailedStage};
use crate::error::Error;
use crate::mapping::{check_route, row_from_dead_letter, to_message, NotARow};
use crate::publish::{Outgoing, Publisher};
use crate::wire::EventCodec;

/// Where the replays of `dlq_topic` are recorded.
pub fn replay_log_topic(dlq_topic: &str) -> String {
    format!("{dlq_topic}.replayed")
}

/// What replay does (or, with `--dry-run`, would do) with one dead letter.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Decision {
    Replay { target: String },
    AlreadyReplayed { at_ms: i64, target: String },
    StillFails { error: String },
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    #[serde(flatten)]
    pub decision: Decision,
    /// False for a dry run or a skipped message.
    pub sent: bool,
}

/// Previous replays of a dead-letter topic: (partition, offset) → (when, target topic).
type ReplayLog = HashMap<(i32, i64), (i64, String)>;

fn previous_replays(config: &Config, dlq_topic: &str) -> Result<ReplayLog, Error> {
    let log = replay_log_topic(dlq_topic);
    if !inspect::topic_exists(config, &log)? {
        return Ok(HashMap::new());
    }
    let mut done = HashMap::new();
    for entry in inspect::read_topic(config, &log)? {
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&entry.value) else {
            continue;
        };
        let (Some(p), Some(o)) = (record["partition"].as_i64(), record["offset"].as_i64()) else {
            continue;
        };
        done.insert(
            (p as i32, o),
            (
                record["replayed_at_ms"].as_i64().unwrap_or(0),
                record["target"].as_str().unwrap_or_default().to_string(),
            ),
        );
    }
    Ok(done)
}

/// Why a dead letter cannot be replayed (or would fail again).
#[derive(Debug, thiserror::Error)]
enum Unreplayable {
    #[error("the row's payload ({size} bytes) was too large for Kafka and is not in the dead letter; the row stays in dualsync.outbox (seq {seq}) until the relay's retention purges it")]
    RowTooLarge { size: String, seq: String },
    #[error("its value ({size} bytes) was too large for the dead-letter topic and is not in it; the original is at {topic}[{partition}]@{offset}")]
    ValueOmitted {
        size: String,
        topic: String,
        partition: String,
        offset: String,
    },
    #[error("no {} header: cannot tell where it came from", headers::TOPIC)]
    NoOrigin,
    #[error(transparent)]
    NotARow(#[from] NotARow),
    /// Its key is not its event's aggregate id.
    #[error(transparent)]
    KeyMismatch(DecodeError),
    /// Apply would dead-letter it again: a type this pipeline does not carry, or another
    /// type's event on this topic.
    #[error(transparent)]
    Misrouted(DecodeError),
    /// It still does not encode or decode.
    #[error(transparent)]
    Fails(#[from] Error),
}

/// The message to send for `letter`, or why it would fail again.
async fn rebuild(
    config: &Config,
    codec: &EventCodec,
    letter: &DeadLetter,
) -> Result<Outgoing, Unreplayable> {
    let header = |key| letter.header(key).unwrap_or("?").to_string();
    if let (Some(size), Some(seq)) = (
        letter.header(headers::VALUE_OMITTED),
        letter.header(headers::ROW_SEQ),
    ) {
        return Err(Unreplayable::RowTooLarge {
            size: size.to_string(),
            seq: seq.to_string(),
        });
    }
    if let Some(size) = letter.header(headers::VALUE_OMITTED) {
        return Err(Unreplayable::ValueOmitted {
            size: size.to_string(),
            topic: header(headers::TOPIC),
            partition: header(headers::PARTITION),
            offset: header(headers::OFFSET),
        });
    }
    let from_relay = letter.topic == config.relay.dead_letter_topic
        || letter
            .header(headers::STAGE)
            .and_then(FailedStage::parse)
            .is_some_and(FailedStage::is_relay);
    let mut outgoing = if from_relay {
        let row = row_from_dead_letter(&letter.value)?;
        to_message(config, codec, &row)?
    } else {
        let target = letter
            .header(headers::TOPIC)
            .ok_or(Unreplayable::NoOrigin)?;
        let event = codec.decode(&letter.value).await?;
        if letter.key.as_deref() != Some(event.aggregate_id.as_bytes()) {
            return Err(Unreplayable::KeyMismatch(DecodeError::KeyMismatch {
                key: letter.key_text().unwrap_or_default(),
                aggregate_id: event.aggregate_id,
            }));
        }
        // Apply would dead-letter it again: a type this pipeline does not carry, or another
        // type's event on this topic.
        check_route(config, codec, &event.aggregate_type, target)
            .map_err(Unreplayable::Misrouted)?;
        let mut h = OwnedHeaders::new();
        for (key, value) in letter.raw_headers() {
            if !key.starts_with(headers::ERROR_PREFIX) {
                h = h.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
        }
        Outgoing {
            topic: target.to_string(),
            key: letter.key.clone(),
            value: letter.value.clone(),
            headers: h,
        }
    };
    let now = crate::dlq::now_millis().to_string();
    let (partition, offset) = (letter.partition.to_string(), letter.offset.to_string());
    for (key, value) in [
        (headers::REPLAY_TIME, now.as_str()),
        (headers::REPLAY_DLQ_TOPIC, letter.topic.as_str()),
        (headers::REPLAY_DLQ_PARTITION, partition.as_str()),
        (headers::REPLAY_DLQ_OFFSET, offset.as_str()),
    ] {
        outgoing.headers = std::mem::take(&mut outgoing.headers).insert(Header {
            key,
            value: Some(value),
        });
    }
    Ok(outgoing)
}

/// Replays `letters` (all from `dlq_topic`), or only says what it would do when `dry_run`.
/// `force` sends messages that were replayed before or that still fail to decode/encode.
pub async fn replay(
    config: &Config,
    codec: &EventCodec,
    dlq_topic: &str,
    letters: Vec<DeadLetter>,
    dry_run: bool,
    force: bool,
) -> Result<Vec<Outcome>, Error> {
    replay_with_progress(config, codec, dlq_topic, letters, dry_run, force, &|_| {}).await
}

/// [`replay`], calling `on_progress(1)` as each letter is decided.
pub async fn replay_with_progress(
    config: &Config,
    codec: &EventCodec,
    dlq_topic: &str,
    letters: Vec<DeadLetter>,
    dry_run: bool,
    force: bool,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Outcome>, Error> {
    super::inspect::ensure_own_dead_letter_topic(config, dlq_topic)?;
    let done = {
        let (config, topic) = (config.clone(), dlq_topic.to_string());
        tokio::task::spawn_blocking(move || previous_replays(&config, &topic))
            .await
            .map_err(|e| Error::Internal(format!("replay log reader failed: {e}")))??
    };
    let mut outcomes = Vec::new();
    let mut to_send = Vec::new();
    let mut log_entries = Vec::new();
    for letter in letters {
        let rebuilt = rebuild(config, codec, &letter).await;
        let decision = match (&rebuilt, done.get(&(letter.partition, letter.offset))) {
            (_, Some((at_ms, target))) if !force => Decision::AlreadyReplayed {
                at_ms: *at_ms,
                target: target.clone(),
            },
            (Err(error), _) if !force => Decision::StillFails {
                error: error.to_string(),
            },
            (Ok(m), _) => Decision::Replay {
                target: m.topic.clone(),
            },
            (Err(error), _) => {
                // Forced, but there is nothing to send: a relay row that cannot be read back.
                Decision::StillFails {
                    error: error.to_string(),
                }
            }
        };
        let send = matches!(decision, Decision::Replay { .. }) && !dry_run;
        if send {
            let message = rebuilt.expect("a replay decision has a message");
            log_entries.push(Outgoing {
                topic: replay_log_topic(dlq_topic),
                key: Some(format!("{}:{}", letter.partition, letter.offset).into_bytes()),
                value: serde_json::json!({
                    "partition": letter.partition,
                    "offset": letter.offset,
                    "replayed_at_ms": crate::dlq::now_millis(),
                    "target": message.topic,
                })
                .to_string()
                .into_bytes(),
                headers: OwnedHeaders::new(),
            });
            to_send.push(message);
        }
        on_progress(1);
        outcomes.push(Outcome {
            topic: letter.topic.clone(),
            partition: letter.partition,
            offset: letter.offset,
            key: letter.key_text(),
            decision,
            sent: send,
        });
    }
    if !to_send.is_empty() {
        let publisher = Publisher::new(&config.kafka)?;
        // Messages first: a crash in between can only lose the log entry (a later replay
        // would then be allowed again, and the version guard makes it harmless).
        publisher.publish_all(to_send).await?;
        publisher.publish_all(log_entries).await?;
    }
    Ok(outcomes)
}
