//! The highest version this pipeline has published, and the guard that keeps the relay from
//! publishing versions again after the outbox sequence went backwards.
//!
//! Versions are the outbox `seq`. A failover to an asynchronous standby loses the last
//! transactions, and the standby's sequence resumes from its last logged value; a re-created
//! outbox starts again at 1. New events would then carry versions the sinks already hold and
//! be dropped as not newer, silently. What was published survives the primary in Kafka: at
//! every take-over (so after every reconnection, hence every failover) the leader reads back
//! the last [`TAIL`] records of each partition of the pipeline's event topics (one read at
//! start, no cost per batch) and refuses to publish while
//! - the sequence's next value is at or below the highest version read back or published
//!   since (also checked at every backlog sample, every 5 s, for an outbox re-created under
//!   a running relay), or
//! - an outbox row sits at a version read back with another event id (the sequence already
//!   climbed past the maximum, but the rows below it are other events).
//!
//! It then logs one error line, reports the reason in `/readyz` and `/status`, and checks
//! again every [`RECHECK`] until `dualsync outbox resequence` ([`resequence`]) fixed it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Capture, Config};
use crate::error::Error;
use crate::metrics::Health;
use crate::publish::{client_config, headers};
use crate::source::aggregate_filter::carries;
use crate::source::outbox_sequence::{self, Renumbered};

/// Records read back from the end of each partition. The relay publishes in `seq` order but
/// for rows that commit late, so the highest version is among the last records.
pub const TAIL: i64 = 64;
/// How often a refusing relay checks whether the outbox was moved past the published versions.
pub const RECHECK: Duration = Duration::from_secs(5);
const READ_DEADLINE: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the ends of the pipeline's event topics hold.
#[derive(Debug, Clone, Default)]
pub struct PublishedTail {
    /// The event topics of this pipeline that exist.
    pub topics: Vec<String>,
    /// The highest version read back, and its topic.
    pub max: Option<(i64, String)>,
    /// `(version, event id)` of every record read back.
    pub events: Vec<(i64, Uuid)>,
}

/// Whether `topic` is one of this pipeline's event topics: `kafka.topic_template` for an
/// aggregate type the pipeline carries, not a dead-letter topic.
pub fn is_event_topic(config: &Config, topic: &str) -> bool {
    let template = &config.kafka.topic_template;
    let Some((prefix, suffix)) = template.split_once("{aggregatetype}") else {
        return topic == template;
    };
    if topic == config.relay.dead_letter_topic
        || topic.ends_with(&config.apply.dead_letter_suffix)
        || topic.len() <= prefix.len() + suffix.len()
    {
        return false;
    }
    let Some(aggregate) = topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(suffix))
    else {
        return false;
    };
    let Ok(source) = config.outbox_source() else {
        return true;
    };
    carries(source, aggregate)
}

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    crate::publish::header_str(m, key)
}

/// Reads the last [`TAIL`] records of every partition of the pipeline's event topics.
/// Blocking: call it from `spawn_blocking`.
pub fn read_published_tail(config: &Config) -> Result<PublishedTail, Error> {
    let mut c = client_config(&config.kafka);
    c.set(
        "group.id",
        format!("dualsync-versions-{}", Uuid::new_v4().simple()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false");
    let consumer: BaseConsumer = c.create()?;
    let metadata = consumer.fetch_metadata(None, TIMEOUT)?;
    let mut tail = PublishedTail::default();
    let mut assignment = TopicPartitionList::new();
    // The offset of each partition's last record, until it was read.
    let mut last: HashMap<(String, i32), i64> = HashMap::new();
    for t in metadata.topics() {
        if t.error().is_some() || !is_event_topic(config, t.name()) {
            continue;
        }
        tail.topics.push(t.name().to_string());
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(t.name(), p.id(), TIMEOUT)?;
            if high > low {
                let from = low.max(high - TAIL);
                assignment.add_partition_offset(t.name(), p.id(), Offset::Offset(from))?;
                last.insert((t.name().to_string(), p.id()), high - 1);
            }
        }
    }
    tail.topics.sort();
    if last.is_empty() {
        return Ok(tail);
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + READ_DEADLINE;
    while !last.is_empty() {
        if Instant::now() >= deadline {
            return Err(Error::Kafka(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message?;
        let version = header(&m, headers::VERSION).and_then(|v| v.parse::<i64>().ok());
        let id = header(&m, headers::EVENT_ID).and_then(|v| v.parse::<Uuid>().ok());
        if let Some(version) = version {
            if tail.max.as_ref().is_none_or(|(max, _)| version > *max) {
                tail.max = Some((version, m.topic().to_string()));
            }
            if let Some(id) = id {
                tail.events.push((version, id));
            }
        }
        let key = (m.topic().to_string(), m.partition());
        if last.get(&key).is_some_and(|end| m.offset() >= *end) {
            last.remove(&key);
        }
    }
    Ok(tail)
}

/// [`read_published_tail`] off the async runtime.
pub async fn published_tail(config: &Config) -> Result<PublishedTail, Error> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || read_published_tail(&config))
        .await
        .map_err(|_| Error::Kafka(KafkaError::Canceled))?
}

/// Why the outbox would re-use published versions, if it would.
async fn unsound(
    client: &Client,
    capture: Capture,
    published_max: Option<(i64, &str)>,
    events: &[(i64, Uuid)],
) -> Result<Option<String>, Error> {
    let Some((max, topic)) = published_max else {
        return Ok(None);
    };
    if capture == Capture::Wal {
        // Versions come from the WAL: only a server whose WAL is behind what was published
        // (a failover to a standby that lost transactions) hands them out again.
        let (next, at) = crate::source::wal::next_version(client).await?;
        return Ok((next <= max).then(|| format!(
            "the primary's WAL is behind the published versions: the next event would get version {next} (WAL position {at}), but this pipeline already published version {max} (topic {topic}); events committed now would look older than what the sinks hold (docs/wal-capture.md#versions)"
        )));
    }
    let next = outbox_sequence::next_seq(client).await?;
    if next <= max {
        return Ok(Some(format!(
            "the outbox sequence went backwards: its next seq is {next}, but this pipeline already published version {max} (topic {topic}); new events would re-use versions the sinks hold and be dropped as stale"
        )));
    }
    if let Some((seq, id, published)) = outbox_sequence::reused(client, events).await?.first() {
        return Ok(Some(format!(
            "the outbox re-uses published versions: its row at seq {seq} is event {id}, but version {seq} was published as event {published} (the outbox was re-created or restored; next seq {next}, highest published version {max} in topic {topic})"
        )));
    }
    Ok(None)
}

/// The relay leader's guard: the published maximum, kept up to date as batches are marked.
pub(crate) struct SequenceGuard {
    tail: PublishedTail,
    /// Where versions come from (the sequence or the WAL).
    capture: Capture,
    /// Highest version read back or marked published since (0: none).
    max: AtomicI64,
}

impl SequenceGuard {
    pub async fn load(config: &Config) -> Result<Self, Error> {
        let tail = published_tail(config).await?;
        let max = tail.max.as_ref().map_or(0, |(v, _)| *v);
        let capture = config.outbox_source().map_or(Capture::Poll, |s| s.capture);
        Ok(Self {
            tail,
            capture,
            max: AtomicI64::new(max),
        })
    }

    /// The pipeline's event topics found at the take-over.
    pub fn topics(&self) -> &[String] {
        &self.tail.topics
    }

    /// Rows with these versions were acknowledged by Kafka.
    pub fn published(&self, versions: impl Iterator<Item = i64>) {
        if let Some(max) = versions.max() {
            self.max.fetch_max(max, Ordering::Relaxed);
        }
    }

    /// Why publishing would re-use versions, if it would.
    pub async fn check(&self, client: &Client) -> Result<Option<String>, Error> {
        let max = self.max.load(Ordering::Relaxed);
        let topic = match &self.tail.max {
            Some((v, t)) if *v == max => t.as_str(),
            _ => "published by this relay",
        };
        let max = (max > 0).then_some((max, topic));
        unsound(client, self.capture, max, &self.tail.events).await
    }

    /// Waits while publishing would re-use versions: one error line, the reason in `/readyz`
    /// and `/status`, a check every [`RECHECK`]. `false` when cancelled first.
    pub async fn hold_until_sound(
        &self,
        client: &Client,
        health: &Health,
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        let mut refused = false;
        loop {
            match self.check(client).await? {
                None => {
                    if refused {
                        tracing::info!(
                            "the outbox is past the published versions again; publishing"
                        );
                        health.set_refusing(None);
                    }
                    return Ok(true);
                }
                Some(why) if !refused => {
                    let error = Error::SequenceBehind(why);
                    tracing::error!(class = error.class(), "relay refuses to publish: {error}");
                    health.set_refusing(Some(format!("refusing to publish: {error}")));
                    refused = true;
                }
                Some(_) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// What `dualsync outbox resequence` found and did.
#[derive(Debug, Clone)]
pub enum Resequenced {
    /// The outbox is already past every published version.
    NothingToDo {
        published_max: Option<i64>,
        next: i64,
    },
    Done {
        why: String,
        published_max: i64,
        renumbered: Renumbered,
    },
}

/// `dualsync outbox resequence`: reads the published maximum back from the topics and, when
/// the outbox would re-use versions, renumbers its unpublished rows past it
/// ([`outbox_sequence::renumber`]). Safe while relays run: a refusing relay reads nothing,
/// and the renumbering holds writers and marks off the table until it commits.
pub async fn resequence(config: &Config) -> Result<Resequenced, Error> {
    let tail = published_tail(config).await?;
    let source = config.outbox_source()?;
    let mut client = crate::pg::connect(source.url.expose()).await?;
    let max = tail.max.as_ref().map(|(v, t)| (*v, t.as_str()));
    if source.capture == Capture::Wal {
        return Err(Error::Misconfigured("`outbox resequence` renumbers the outbox sequence, and with capture = \"wal\" versions come from the WAL, not the sequence (docs/wal-capture.md#versions)".into()));
    }
    match unsound(&client, Capture::Poll, max, &tail.events).await? {
        None => Ok(Resequenced::NothingToDo {
            published_max: max.map(|(v, _)| v),
            next: outbox_sequence::next_seq(&client).await?,
        }),
        Some(why) => {
            let published_max = max.map_or(0, |(v, _)| v);
            let renumbered = outbox_sequence::renumber(&mut client, published_max).await?;
            Ok(Resequenced::Done {
                why,
                published_max,
                renumbered,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::source::aggregate_filter::glob_matches;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_matches("order*", "orders"));
        assert!(glob_matches("order*", "order"));
        assert!(!glob_matches("order*", "customers"));
        assert!(glob_matches("c?stomers", "customers"));
        assert!(glob_matches("*s", "orders"));
        assert!(!glob_matches("orders", "orders_audit"));
        assert!(glob_matches("*", "x"));
    }
}
