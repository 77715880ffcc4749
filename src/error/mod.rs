//! Every error dualsync can meet, and the one place that decides what to do with it.
//!
//! The pipeline never branches on error strings: it calls [`classify`] and acts on the
//! [`Disposition`]. The retried set is deliberately narrow (connection and availability
//! problems, serialization conflicts): retrying anything else would stall a partition forever.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::codec::registry::RegistryError;
use crate::codec::{DecodeError, EncodeError};
use crate::config::ConfigError;

/// What the pipeline does with a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient: back off and try the same step again; never skip.
    Retry,
    /// Permanent for this one event: send it to the dead-letter topic and move on.
    DeadLetter,
    /// Nothing sensible can continue (bad credentials, missing permissions, bad config).
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot decode event: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode outbox row: {0}")]
    Encode(#[from] EncodeError),
    /// The message carries the causes too (tokio-postgres alone says "error connecting to
    /// server"); reports that walk the sources ([`with_causes`]) skip what it already says.
    #[error("postgres: {}", with_causes(.0))]
    Postgres(#[source] tokio_postgres::Error),
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The cluster refused this client's credentials or TLS set-up: retrying cannot help.
    #[error("kafka refused the connection to {brokers} (kafka.brokers): {reason}. Check kafka.properties \"security.protocol\", \"sasl.mechanisms\", \"sasl.username\" and the password (DUALSYNC_KAFKA__PROPERTIES__SASL_PASSWORD), and \"ssl.ca.location\"")]
    KafkaCredentials { brokers: String, reason: String },
    /// The broker refused to create a topic dualsync needs: fatal for a reason that waiting
    /// does not change (policy, authorization, more replicas than the cluster has brokers),
    /// retried when brokers are only down ([`classify`]).
    #[error("kafka refused to create topic {topic:?} ({partitions} partitions, {}): {code}. {}", replication_text(*.replication), topic_creation_hint(*.code, *.replication, *.brokers))]
    TopicCreation {
        topic: String,
        code: RDKafkaErrorCode,
        partitions: i32,
        /// `-1`: the cluster's default replication factor.
        replication: i32,
        /// Brokers the cluster has as far as dualsync could tell (live ones, or the brokers'
        /// `default.replication.factor` when larger).
        brokers: i32,
    },
    /// The producer reported a message delivered without the broker's offset for it (inferred
    /// from a later request's success, which does not prove it on a partition the broker holds
    /// no producer state for): treated as not acknowledged, so it is published again.
    #[error("kafka did not confirm a message on {topic:?} partition {partition} (delivered without an offset); publishing it again")]
    UnconfirmedDelivery { topic: String, partition: i32 },
    /// The sink refused this one record for a reason that retrying cannot change.
    #[error("sink rejected the record: {0}")]
    Rejected(String),
    /// A record for a key the sink does not hold, at or below the purge horizon of its
    /// namespace: it may be older than a delete whose tombstone was purged (writing it could
    /// resurrect a deleted record) or the key's first write: the sink cannot tell, so it is
    /// dead-lettered rather than counted stale. `verify --repair` re-emits the primary's state
    /// at a new, higher version, which the sink then takes.
    #[error("{namespace} {key:?} version {version} is at or below the sink's purge horizon ({horizon}) and the sink holds no record of that key: it may be older than a delete whose tombstone was purged, so it is not written. If the record should exist, run `dualsync verify --repair` (it re-emits the primary's current state at a new, higher version)")]
    BelowPurgeHorizon {
        namespace: String,
        key: String,
        version: i64,
        horizon: i64,
    },
    /// A setting or a command's argument does not fit what dualsync found (a topic or
    /// collection that is not there, a server that is not a replica set).
    #[error("{0}")]
    Misconfigured(String),
    /// A connection cannot be set up at all (TLS, a port to listen on), or a server did not
    /// answer within a command's deadline.
    #[error("{0}")]
    Connect(String),
    /// An HTTP endpoint cannot listen on its address (in use, not this host's).
    #[error("http: cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// PostgreSQL's TLS connector cannot be built (OpenSSL, the system trust store).
    #[error("cannot initialise TLS for PostgreSQL: {0}")]
    Tls(#[source] openssl::error::ErrorStack),
    /// The servers are not prepared for dualsync (the outbox table is missing, a schema is not
    /// registered while auto-registration is off).
    #[error("{0}")]
    Schema(String),
    /// Something that should not happen: a task died, a server's reply has an unknown form.
    #[error("{0}")]
    Internal(String),
    /// A change stream event without a field every change event has: the server's reply has
    /// an unknown form.
    #[error("{operation} event without {missing}")]
    MalformedChange {
        operation: &'static str,
        missing: &'static str,
    },
    /// A BSON value dualsync made or saved does not convert (a resume token).
    #[error("{what}: {source}")]
    Bson {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A `verify --checkpoint` file cannot be read or written.
    #[error("verify checkpoint {}: {source}", .path.display())]
    Checkpoint {
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A task the command waited for panicked or was cancelled.
    #[error("{task} failed: {source}")]
    TaskFailed {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A command stopped by SIGINT/SIGTERM before it finished (what it did so far stands).
    #[error("{0}")]
    Interrupted(String),
    /// The MongoDB source's saved position is gone (out of the oplog, or the stream was
    /// invalidated): handled by `on_history_lost`, fatal otherwise.
    #[error("change stream history lost: {0}. The relay cannot resume without a gap. To recover, set source.on_history_lost = \"resnapshot\" and restart (every watched document is published again, then the stream goes on), or delete this pipeline's document from source.offsets_collection and restart with source.snapshot_on_start = true. Documents deleted in the primary during the gap stay in the secondary and must be deleted there")]
    HistoryLost(String),
    /// Another relay took over this pipeline's lease: step down and wait as standby.
    #[error("relay lease of pipeline {0:?} was taken over by another relay")]
    LeaseLost(String),
    /// The source confirmed the relay's leadership (an answered query on the outbox leader's
    /// session, a renewed MongoDB lease) last this long ago (a partition, a half-open
    /// connection): the relay steps down before a standby can take over, and connects again.
    #[error("the source (source.url) confirmed this relay's leadership last {0:?} ago: stepping down before a standby can take over")]
    LeaderSilent(std::time::Duration),
    /// A dead-letter tool was pointed at a topic that is not one of this pipeline's dead-letter
    /// topics (another pipeline's letters on a shared cluster, or not a dead-letter topic).
    #[error("topic {topic:?} is not a dead-letter topic of pipeline {pipeline:?} (its relay dead-letter topic, or one of its event topics followed by apply.dead_letter_suffix); `dualsync dlq list` shows this pipeline's")]
    ForeignTopic { topic: String, pipeline: String },
    /// A `dlq show` / `dlq replay` request that can only be a mistake, or that matched nothing.
    #[error(transparent)]
    DlqRequest(#[from] RequestError),
    /// The outbox sequence is at or below a version this pipeline already published (a
    /// failover to a standby that lost transactions, a re-created outbox): new events would
    /// re-use versions the sinks hold. The relay publishes nothing until an operator runs
    /// `dualsync outbox resequence`; it keeps checking meanwhile.
    #[error("{0}. The relay publishes nothing until `dualsync outbox resequence --config <file>` moves the outbox past the published versions (docs/operations.md#the-outbox-sequence-went-backwards)")]
    SequenceBehind(String),
    /// A sink call got no answer within its deadline (`sinks.NAME.timeout_ms` plus a grace
    /// period): a half-open connection, a host gone. Retried on a new connection, never skipped.
    #[error("sink {sink} did not answer within {after_ms} ms (sinks.{sink}.timeout_ms and 5 s of grace); retrying on a new connection")]
    SinkTimeout { sink: String, after_ms: u64 },
    /// A single-object frame names a schema fingerprint the local schemas lack, and the schemas
    /// folder was not read since the message arrived (rate-limited, or the read failed):
    /// retried until a read decides, so events written during a deploy wait for their schema.
    #[error("unknown schema fingerprint {fingerprint}: the schemas folder was not read since this message arrived; waiting for it to be read again")]
    SchemaPending { fingerprint: String },
    /// The source database is not ready for `capture = "wal"` (a setting, a privilege, a slot
    /// or publication of another shape).
    #[error(transparent)]
    WalSetup(#[from] WalSetupError),
    /// Stopped on purpose by an `on_invalid` / `on_error = "halt"` policy.
    #[error("halted by policy: {0}")]
    Halted(String),
    /// The outbox's WAL capture: the replication connection, the stream, the slot.
    #[error("wal capture: {0}")]
    Wal(#[from] WalError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Postgres(e)
    }
}

fn replication_text(replication: i32) -> String {
    if replication < 0 {
        "the cluster's default replication factor".to_string()
    } else {
        format!("replication factor {replication}")
    }
}

/// Whether a topic creation refused for too few brokers can succeed once brokers come back:
/// the cluster's default replication factor, or no more replicas than the cluster has brokers.
fn too_few_brokers_up(code: RDKafkaErrorCode, replication: i32, brokers: i32) -> bool {
    code == RDKafkaErrorCode::InvalidReplicationFactor && replication <= brokers
}

/// What an operator should check when a topic cannot be created, by the broker's answer.
fn topic_creation_hint(code: RDKafkaErrorCode, replication: i32, brokers: i32) -> &'static str {
    use RDKafkaErrorCode as C;
    match code {
        _ if too_few_brokers_up(code, replication, brokers) => "Too few brokers are up for the replicas the topic needs; retrying until they are back",
        C::InvalidReplicationFactor => "Set kafka.replication_factor to at most the number of brokers, or leave it unset to follow the cluster",
        C::InvalidPartitions => "Check kafka.partitions against the cluster's limits",
        C::PolicyViolation => "The cluster's create-topic policy refused these settings: check kafka.partitions, kafka.replication_factor and the policy, or create the topic yourself",
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => "Grant this user CREATE on the topic (or the cluster), or create the topic yourself (kafka.partitions, kafka.replication_factor)",
        C::InvalidTopic => "Check kafka.topic_template: the name is not a valid Kafka topic name",
        _ => "Check the broker's log for the reason",
    }
}

/// The error and its causes, `: `-joined, each cause only when the text so far does not
/// already say it: tokio-postgres alone says "error connecting to server" and keeps the why
/// ("Connection refused") in its source, while most messages here quote their cause.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

impl Error {
    /// The broker (or the client's own limit) refused a message for its size: sending the
    /// same bytes again can never succeed.
    pub fn is_too_large(&self) -> bool {
        matches!(self, Error::Kafka(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge))
    }

    /// Short stable name of the error class, used in dead-letter headers and metrics labels
    /// ([`Error::policy`]).
    pub fn class(&self) -> &'static str {
        self.policy().class
    }
}

/// The single classification of errors into retry / dead-letter / fatal ([`Error::policy`]).
pub fn classify(err: &Error) -> Disposition {
    err.policy().disposition
}

/// What an operator should check when `err` stops the process ([`Error::policy`]). `None`
/// when the message says it all (its variant carries its own advice) or the error is not
/// fatal.
pub fn hint(err: &Error) -> Option<&'static str> {
    err.policy().hint
}

/// Which configured connection an error came from, and the key that configures it: the first
/// two questions of whoever reads the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// The primary database (outbox or change stream).
    Source,
    /// The named `[sinks.NAME]`.
    Sink(&'a str),
    Broker,
    Registry,
}

impl Endpoint<'_> {
    pub fn config_key(&self) -> String {
        match self {
            Endpoint::Source => "source.url".into(),
            Endpoint::Sink(name) => format!("sinks.{name}.url"),
            Endpoint::Broker => "kafka.brokers".into(),
            Endpoint::Registry => "schema_registry.url".into(),
        }
    }
}

impl std::fmt::Display for Endpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Source => f.write_str("source"),
            Endpoint::Sink(name) => write!(f, "sink {name}"),
            Endpoint::Broker => f.write_str("Kafka broker"),
            Endpoint::Registry => f.write_str("schema registry"),
        }
    }
}

/// The connection `err` is about, in a process whose database is `database` (the source for
/// a relay, its sink for apply); `None` when the error is not about a connection.
pub fn endpoint<'a>(err: &Error, database: Endpoint<'a>) -> Option<Endpoint<'a>> {
    match err {
        Error::Postgres(_)
        | Error::Mongo(_)
        | Error::Wal(_)
        | Error::SinkTimeout { .. }
        | Error::LeaderSilent(_) => Some(database),
        Error::Kafka(_) | Error::UnconfirmedDelivery { .. } => Some(Endpoint::Broker),
        Error::Registry(_) => Some(Endpoint::Registry),
        _ => None,
    }
}

/// A `dlq show` / `dlq replay` request refused before anything is read or sent.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("--from-offset {from} is after --to-offset {to}: the offset range is backwards")]
    OffsetsBackwards { from: i64, to: i64 },
    #[error("--from-offset / --to-offset need --partition: offsets count per partition of the dead-letter topic, so without one the range names letters in every partition")]
    OffsetsWithoutPartition,
    #[error("--since {since} is not before --until {until}: the time range is empty or backwards")]
    TimesBackwards { since: String, until: String },
    #[error("--{flag}: {reason}")]
    BadTime { flag: &'static str, reason: BadTime },
    #[error("no dead letter in {topic} matches {filter}; `dualsync dlq show --topic {topic}` lists them")]
    NoMatch { topic: String, filter: String },
}

/// A `--since` / `--until` that is not a time dualsync reads.
#[derive(Debug, thiserror::Error)]
pub enum BadTime {
    #[error("`{text}` is neither RFC 3339 time nor epoch millis: {reason}")]
    Unreadable {
        text: String,
        reason: humantime::TimestampError,
    },
    #[error("{0}")]
    BeforeEpoch(std::time::SystemTimeError),
}

mod codes;
#[cfg(test)]
mod tests;
mod wal;
mod wal_setup;

pub use codes::MONGO_DUPLICATE_KEY;
mod policy;
pub use policy::Policy;
pub use wal::WalError;
pub use wal_setup::WalSetupError;
