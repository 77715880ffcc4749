//! Reading dead-letter topics back: which exist, what they hold, each message with its error
//! context and its payload decoded where possible. Reads with a group-less consumer (assign,
//! never commit), so inspecting never moves anyone's offsets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::Config;
use crate::dlq::headers;
use crate::error::Error;
use crate::publish::client_config;
use crate::wire::EventCodec;

/// One message of a dead-letter topic.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp of the dead letter (millis since the epoch).
    pub timestamp_ms: Option<i64>,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub value: Vec<u8>,
    /// Every header, values as text (lossy UTF-8).
    pub headers: Vec<(String, Option<String>)>,
    #[serde(skip)]
    raw_headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }
    pub fn class(&self) -> &str {
        self.header(headers::CLASS).unwrap_or("unknown")
    }
    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }
    /// When it was dead-lettered: the error header, else the Kafka timestamp.
    pub fn time_ms(&self) -> Option<i64> {
        self.header(headers::TIMESTAMP)
            .and_then(|t| t.parse().ok())
            .or(self.timestamp_ms)
    }
    /// The headers as produced, bytes intact (for replay).
    pub fn raw_headers(&self) -> &[(String, Option<Vec<u8>>)] {
        &self.raw_headers
    }
}

/// Which messages to look at. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub class: Option<String>,
    pub key: Option<String>,
    pub partition: Option<i32>,
    pub from_offset: Option<i64>,
    pub to_offset: Option<i64>,
    /// Dead-lettered at or after / before, millis since the epoch.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

pub use crate::error::{BadTime, RequestError};

impl Filter {
    /// Refuses filters that can only be a mistake: ranges that are backwards or empty, and
    /// offsets without the partition they count in.
    pub fn validate(&self) -> Result<(), RequestError> {
        if let (Some(from), Some(to)) = (self.from_offset, self.to_offset) {
            if from > to {
                return Err(RequestError::OffsetsBackwards { from, to });
            }
        }
        if (self.from_offset.is_some() || self.to_offset.is_some()) && self.partition.is_none() {
            return Err(RequestError::OffsetsWithoutPartition);
        }
        if let (Some(since), Some(until)) = (self.since_ms, self.until_ms) {
            if since >= until {
                return Err(RequestError::TimesBackwards {
                    since: format_ms(since),
                    until: format_ms(until),
                });
            }
        }
        Ok(())
    }

    /// The filter as the flags that set it, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |flag: &str, value: Option<String>| {
            if let Some(v) = value {
                parts.push(format!("--{flag} {v}"));
            }
        };
        add("class", self.class.clone());
        add("key", self.key.clone());
        add("partition", self.partition.map(|p| p.to_string()));
        add("from-offset", self.from_offset.map(|o| o.to_string()));
        add("to-offset", self.to_offset.map(|o| o.to_string()));
        add("since", self.since_ms.map(format_ms));
        add("until", self.until_ms.map(format_ms));
        if parts.is_empty() {
            "no filter".into()
        } else {
            parts.join(" ")
        }
    }

    pub fn matches(&self, m: &DeadLetter) -> bool {
        self.class
            .as_deref()
            .is_none_or(|c| m.class() == c || m.class().starts_with(&format!("{c}.")))
            && self
                .key
                .as_deref()
                .is_none_or(|k| m.key_text().as_deref() == Some(k))
            && self.partition.is_none_or(|p| m.partition == p)
            && self.from_offset.is_none_or(|o| m.offset >= o)
            && self.to_offset.is_none_or(|o| m.offset <= o)
            && self
                .since_ms
                .is_none_or(|t| m.time_ms().is_some_and(|x| x >= t))
            && self
                .until_ms
                .is_none_or(|t| m.time_ms().is_some_and(|x| x < t))
    }
}

/// The dead-letter topics of this pipeline that exist on the broker: its relay's, and the
/// apply dead-letter topic of each of its own event topics. A shared cluster holds other
/// pipelines' letters too; they are not listed (see [`is_own_dead_letter_topic`]).
pub fn dead_letter_topics(config: &Config) -> Result<Vec<String>, Error> {
    let consumer = tool_consumer(config)?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    let mut topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|name| is_own_dead_letter_topic(config, name))
        .collect();
    topics.sort();
    Ok(topics)
}

/// Whether `topic` holds this pipeline's dead letters: the relay's topic, or an event topic
/// apply consumes (its `apply.topics`, its `apply.topic_regex`, or else the topic template)
/// followed by `apply.dead_letter_suffix`.
pub fn is_own_dead_letter_topic(config: &Config, topic: &str) -> bool {
    if topic == config.relay.dead_letter_topic {
        return true;
    }
    let Some(event_topic) = topic.strip_suffix(config.apply.dead_letter_suffix.as_str()) else {
        return false;
    };
    if !config.apply.topics.is_empty() {
        return config.apply.topics.iter().any(|t| t == event_topic);
    }
    if let Some(re) = &config.apply.topic_regex {
        // validate() has compiled it already.
        return regex_lite::Regex::new(re).is_ok_and(|re| re.is_match(event_topic));
    }
    config.kafka.is_event_topic(event_topic)
}

/// Refuses a topic that is not one of this pipeline's dead-letter topics, so `dlq show` and
/// `dlq replay` cannot be pointed at another pipeline's letters.
pub fn ensure_own_dead_letter_topic(config: &Config, topic: &str) -> Result<(), Error> {
    if is_own_dead_letter_topic(config, topic) {
        return Ok(());
    }
    Err(Error::ForeignTopic {
        topic: topic.to_string(),
        pipeline: config.pipeline.name.clone(),
    })
}

/// Whether `topic` exists on the broker. Blocking.
pub fn topic_exists(config: &Config, topic: &str) -> Result<bool, Error> {
    let consumer = tool_consumer(config)?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata.topics().iter().any(|t| t.name() == topic))
}

/// The tool consumer's context: end-of-partition is how a read knows it is done, not an error
/// worth a log line.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::error::RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for QuietEof {}

fn tool_consumer(config: &Config) -> Result<BaseConsumer<QuietEof>, Error> {
    let mut c = client_config(&config.kafka);
    c.set(
        "group.id",
        format!("dualsync-dlq-tool-{}", uuid::Uuid::new_v4().simple()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("enable.partition.eof", "true");
    Ok(c.create_with_context(QuietEof)?)
}

/// How long a read waits for more messages after every partition reported its end (some
/// brokers report a high watermark a little behind what they serve).
const SETTLE: Duration = Duration::from_millis(500);
const READ_DEADLINE: Duration = Duration::from_secs(120);

/// Every message of `topic`, in partition/offset order. Blocking: call it from
/// `spawn_blocking` in async code.
pub fn read_topic(config: &Config, topic: &str) -> Result<Vec<DeadLetter>, Error> {
    let consumer = tool_consumer(config)?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::Misconfigured(format!(
            "topic {topic} does not exist on {}",
            config.kafka.brokers
        )));
    }
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let mut at_end = std::collections::HashSet::new();
    let mut last_message = Instant::now();
    let mut out = Vec::new();
    loop {
        if started.elapsed() > READ_DEADLINE {
            return Err(Error::Connect(format!(
                "reading {topic} did not reach its end within {}s",
                READ_DEADLINE.as_secs()
            )));
        }
        if at_end.len() == partitions.len() && last_message.elapsed() >= SETTLE {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                last_message = Instant::now();
                let raw_headers: Vec<(String, Option<Vec<u8>>)> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(DeadLetter {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: raw_headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_deref()
                                    .map(|b| String::from_utf8_lossy(b).into_owned()),
                            )
                        })
                        .collect(),
                    raw_headers,
                });
            }
        }
    }
    out.sort_by_key(|m| (m.partition, m.offset));
    Ok(out)
}

/// One line of `dlq list`.
#[derive(Debug, Serialize)]
pub struct TopicSummary {
    pub topic: String,
    pub messages: usize,
    pub by_class: BTreeMap<String, usize>,
    pub oldest_ms: Option<i64>,
    pub newest_ms: Option<i64>,
}

pub fn summarize(topic: &str, messages: &[DeadLetter]) -> TopicSummary {
    let mut by_class = BTreeMap::new();
    for m in messages {
        *by_class.entry(m.class().to_string()).or_insert(0) += 1;
    }
    let times = messages.iter().filter_map(DeadLetter::time_ms);
    TopicSummary {
        topic: topic.to_string(),
        messages: messages.len(),
        by_class,
        oldest_ms: times.clone().min(),
        newest_ms: times.max(),
    }
}

/// The payload for humans and scripts: the decoded event for Avro (current schemas, and the
/// registry's for Confluent frames), the JSON itself for relay dead letters, else the bytes in
/// base64.
pub async fn decode_payload(codec: &EventCodec, value: &[u8]) -> serde_json::Value {
    if let Ok(event) = codec.decode(value).await {
        return serde_json::json!({ "avro_event": event });
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(value) {
        return serde_json::json!({ "json": json });
    }
    match std::str::from_utf8(value) {
        Ok(text) => serde_json::json!({ "text": text }),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(value)
        }),
    }
}

/// RFC 3339 text of a millisecond timestamp.
pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses `--since` / `--until`: RFC 3339 (`2026-11-22T07:00:00Z`) or millis since the epoch.
pub fn parse_time(text: &str) -> Result<i64, BadTime> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(text).map_err(|reason| BadTime::Unreadable {
        text: text.to_string(),
        reason,
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_err(BadTime::BeforeEpoch)?
        .as_millis() as i64)
}
