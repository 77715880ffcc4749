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
    /// Not a `#[source]`: the message already carries the causes, and error reports that walk
    /// sources (anyhow's `{:#}`) would print them twice.
    #[error("postgres: {}", with_causes(.0))]
    Postgres(tokio_postgres::Error),
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The cluster refused this client's credentials or TLS set-up: retrying cannot help.
    #[error("kafka refused the connection to {brokers} (kafka.brokers): {reason}. Check kafka.properties \"security.protocol\", \"sasl.mechanisms\", \"sasl.username\" and the password (DUALSYNC_KAFKA__PROPERTIES__SASL_PASSWORD), and \"ssl.ca.location\"")]
    KafkaCredentials { brokers: String, reason: String },
    /// The broker refused to create a topic dualsync needs, for a reason that waiting does not
    /// change (policy, authorization, too few brokers for the replication factor).
    #[error("kafka refused to create topic {topic:?} ({partitions} partitions, replication factor {replication}): {code}. {}", topic_creation_hint(*.code))]
    TopicCreation {
        topic: String,
        code: RDKafkaErrorCode,
        partitions: i32,
        replication: i32,
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
    /// The servers are not prepared for dualsync (the outbox table is missing, a schema is not
    /// registered while auto-registration is off).
    #[error("{0}")]
    Schema(String),
    /// Something that should not happen: a task died, a server's reply has an unknown form.
    #[error("{0}")]
    Internal(String),
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
    /// A dead-letter tool was pointed at a topic that is not one of this pipeline's dead-letter
    /// topics (another pipeline's letters on a shared cluster, or not a dead-letter topic).
    #[error("topic {topic:?} is not a dead-letter topic of pipeline {pipeline:?} (its relay dead-letter topic, or one of its event topics followed by apply.dead_letter_suffix); `dualsync dlq list` shows this pipeline's")]
    ForeignTopic { topic: String, pipeline: String },
    /// A `dlq show` / `dlq replay` request that can only be a mistake, or that matched nothing.
    #[error(transparent)]
    DlqRequest(#[from] RequestError),
    /// Stopped on purpose by an `on_invalid` / `on_error = "halt"` policy.
    #[error("halted by policy: {0}")]
    Halted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Postgres(e)
    }
}

/// What an operator should check when a topic cannot be created, by the broker's answer.
fn topic_creation_hint(code: RDKafkaErrorCode) -> &'static str {
    use RDKafkaErrorCode as C;
    match code {
        C::InvalidReplicationFactor => "Set kafka.replication_factor to at most the number of brokers, or leave it unset to follow the cluster",
        C::InvalidPartitions => "Check kafka.partitions against the cluster's limits",
        C::PolicyViolation => "The cluster's create-topic policy refused these settings: check kafka.partitions, kafka.replication_factor and the policy, or create the topic yourself",
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => "Grant this user CREATE on the topic (or the cluster), or create the topic yourself (kafka.partitions, kafka.replication_factor)",
        C::InvalidTopic => "Check kafka.topic_template: the name is not a valid Kafka topic name",
        _ => "Check the broker's log for the reason",
    }
}

/// The error and its causes, `: `-joined: tokio-postgres alone says "error connecting to
/// server" and keeps the why ("Connection refused") in its source.
fn with_causes(e: &dyn std::error::Error) -> String {
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

    /// Short stable name of the error class, used in dead-letter headers and metrics labels.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Decode(e) => e.class(),
            Error::Encode(e) => e.class(),
            Error::Postgres(_) => "postgres",
            Error::Mongo(_) => "mongodb",
            Error::Kafka(_) if self.is_too_large() => "publish.too_large",
            Error::Kafka(_) => "kafka",
            Error::Registry(_) => "registry",
            Error::TopicCreation { .. } => "kafka.topic_creation",
            Error::UnconfirmedDelivery { .. } => "kafka.unconfirmed_delivery",
            Error::KafkaCredentials { .. } => "kafka.credentials",
            Error::Rejected(_) => "sink.rejected",
            Error::BelowPurgeHorizon { .. } => "sink.below_purge_horizon",
            Error::Misconfigured(_) => "setup.config",
            Error::Connect(_) => "setup.connect",
            Error::Schema(_) => "setup.schema",
            Error::Internal(_) => "internal",
            Error::Interrupted(_) => "interrupted",
            Error::ForeignTopic { .. } => "dlq.foreign_topic",
            Error::DlqRequest(_) => "dlq.request",
            Error::Halted(_) => "halted",
            Error::HistoryLost(_) => "source.history_lost",
            Error::LeaseLost(_) => "source.lease_lost",
        }
    }
}

/// The single classification of errors into retry / dead-letter / fatal.
pub fn classify(err: &Error) -> Disposition {
    match err {
        Error::Config(_)
        | Error::Misconfigured(_)
        | Error::Connect(_)
        | Error::Schema(_)
        | Error::Internal(_)
        | Error::Interrupted(_)
        | Error::Halted(_)
        | Error::HistoryLost(_)
        | Error::ForeignTopic { .. }
        | Error::DlqRequest(_) => Disposition::Fatal,
        Error::LeaseLost(_) | Error::UnconfirmedDelivery { .. } => Disposition::Retry,
        Error::Decode(_)
        | Error::Encode(_)
        | Error::Rejected(_)
        | Error::BelowPurgeHorizon { .. } => Disposition::DeadLetter,
        Error::Postgres(e) => classify_postgres(e),
        Error::Mongo(e) => classify_mongo(e),
        Error::Kafka(e) => classify_kafka(e),
        // Never dead-letter on a registry failure: an unknown id is a DecodeError; anything
        // else (auth, a URL that is not a registry, a rejected schema) holds for every event.
        Error::Registry(e) if e.is_transient() => Disposition::Retry,
        Error::Registry(_) => Disposition::Fatal,
        Error::KafkaCredentials { .. } => Disposition::Fatal,
        Error::TopicCreation { code, .. } => match code {
            // A controller moving or a request timing out: the same request can succeed.
            RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NotController
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::AllBrokersDown => Disposition::Retry,
            _ => Disposition::Fatal,
        },
    }
}

/// What an operator should check when `err` stops the process: decided beside [`classify`],
/// by kind, as the error's own message says what failed. `None` when the message says it all
/// (its variant carries its own advice) or the error is not fatal.
pub fn hint(err: &Error) -> Option<&'static str> {
    if classify(err) != Disposition::Fatal {
        return None;
    }
    Some(match err {
        Error::Config(_) | Error::Misconfigured(_) => {
            "check the pipeline's configuration file, its DUALSYNC_* environment overrides and the command's arguments"
        }
        Error::Connect(_) => {
            "check the address, that it is reachable (or free, to listen on), and its TLS settings"
        }
        Error::Schema(_) => {
            "check that the databases and the schema registry are prepared for this pipeline (`dualsync outbox migrate`, `dualsync schema check`)"
        }
        Error::Internal(_) => {
            "unexpected: report it with this log; restarting resumes from the last saved position"
        }
        Error::Interrupted(_) => {
            "run the same command again to finish (with the same --checkpoint, if it had one, it continues where it stopped)"
        }
        Error::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            "permission: grant the database user what the message names"
        }
        Error::Mongo(_) | Error::Postgres(_) => {
            "check the database URL's credentials and the user's permissions, and that the objects named exist"
        }
        Error::Kafka(_) => {
            "check kafka.brokers, kafka.properties (security, credentials) and the user's ACLs on the topics and group"
        }
        Error::Registry(_) => "check schema_registry.url and its credentials",
        Error::DlqRequest(_) => "check the command's filters (`dualsync dlq --help`)",
        Error::Encode(_)
        | Error::Decode(_)
        | Error::Rejected(_)
        | Error::BelowPurgeHorizon { .. }
        | Error::KafkaCredentials { .. }
        | Error::TopicCreation { .. }
        | Error::HistoryLost(_)
        | Error::LeaseLost(_)
        | Error::ForeignTopic { .. }
        | Error::UnconfirmedDelivery { .. }
        | Error::Halted(_) => return None,
    })
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
        Error::Postgres(_) | Error::Mongo(_) => Some(database),
        Error::Kafka(_) | Error::UnconfirmedDelivery { .. } => Some(Endpoint::Broker),
        Error::Registry(_) => Some(Endpoint::Registry),
        _ => None,
    }
}

fn classify_postgres(e: &tokio_postgres::Error) -> Disposition {
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: the connection broke, timed out, or was closed.
        return Disposition::Retry;
    };
    let code = db.code().code();
    match &code[..2] {
        // connection exception, transaction rollback (serialization failure, deadlock),
        // insufficient resources, operator intervention (shutdown, cancel), system error.
        "08" | "40" | "53" | "57" | "58" => Disposition::Retry,
        // data exception (bad value for the column type), integrity constraint violation,
        // program limit exceeded (row or value too large): that event can never be written.
        "22" | "23" | "54" => Disposition::DeadLetter,
        // 25006 read-only transaction: a replica was promoted or we hit a standby.
        _ if code == "25006" => Disposition::Retry,
        // Authorization, missing objects, syntax: a deployment problem, not an event problem.
        _ => Disposition::Fatal,
    }
}

/// MongoDB's DuplicateKey (E11000): the MongoDB sink settles it on `_id` itself (stale, or a
/// race with another writer); on a unique secondary index it is permanent.
pub const MONGO_DUPLICATE_KEY: i32 = 11000;

/// MongoDB server codes that mean "try again later", as a command's error, a per-document
/// write error or a write-concern error.
const MONGO_TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    50,    // MaxTimeMSExpired
    64,    // WriteConcernFailed (wtimeout: not yet replicated as asked)
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11601, // Interrupted
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
    112,   // WriteConflict
];

/// MongoDB server codes that reject one document for good.
const MONGO_PERMANENT_CODES: &[i32] = &[
    2,                   // BadValue
    4,                   // NoSuchKey
    9,                   // FailedToParse
    14,                  // TypeMismatch
    52,                  // DollarPrefixedFieldName
    56,                  // EmptyFieldName
    57,                  // DottedFieldName
    66,                  // ImmutableField
    121,                 // DocumentValidationFailure
    10334,               // BSONObjectTooLarge
    17419,               // document exceeds maximum size
    17420,               // document exceeds maximum size (update)
    MONGO_DUPLICATE_KEY, // on a unique secondary index
];

fn classify_mongo(e: &mongodb::error::Error) -> Disposition {
    use mongodb::error::ErrorKind;
    if e.contains_label("RetryableWriteError")
        || e.contains_label("TransientTransactionError")
        || e.contains_label("NetworkError")
    {
        return Disposition::Retry;
    }
    let code = match &*e.kind {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. } => return Disposition::Retry,
        ErrorKind::BsonSerialization(_) | ErrorKind::InvalidArgument { .. } => {
            return Disposition::DeadLetter
        }
        ErrorKind::Authentication { .. } => return Disposition::Fatal,
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(w)) => Some(w.code),
        _ => None,
    };
    match code {
        Some(c) if MONGO_TRANSIENT_CODES.contains(&c) => Disposition::Retry,
        Some(c) if MONGO_PERMANENT_CODES.contains(&c) => Disposition::DeadLetter,
        _ => Disposition::Fatal,
    }
}

fn classify_kafka(e: &KafkaError) -> Disposition {
    let Some(code) = e.rdkafka_error_code() else {
        return match e {
            KafkaError::Canceled => Disposition::Retry,
            _ => Disposition::Fatal,
        };
    };
    use RDKafkaErrorCode as C;
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidMessage => {
            Disposition::DeadLetter
        }
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::InvalidConfig
        | C::Fatal => Disposition::Fatal,
        // Everything else librdkafka reports (transport failure, all brokers down, leader
        // elections, timeouts, full queues, unknown partition while a topic is created) clears
        // by itself: keep trying.
        _ => Disposition::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_encode_errors_dead_letter() {
        let e = Error::Decode(DecodeError::Empty);
        assert_eq!(classify(&e), Disposition::DeadLetter);
        assert_eq!(e.class(), "decode.empty");
    }

    #[test]
    fn kafka_transport_failures_retry_and_auth_failures_stop() {
        let transient = Error::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::BrokerTransportFailure,
        ));
        assert_eq!(classify(&transient), Disposition::Retry);
        let auth = Error::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ));
        assert_eq!(classify(&auth), Disposition::Fatal);
        let big = Error::Kafka(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert_eq!(classify(&big), Disposition::DeadLetter);
    }

    fn mongo_write(failure: mongodb::error::WriteFailure) -> Error {
        Error::Mongo(mongodb::error::ErrorKind::Write(failure).into())
    }

    /// Issue #23 items 2 and 6: per-document and write-concern errors are classified by code
    /// like any other MongoDB error.
    #[test]
    fn mongo_write_and_write_concern_errors_are_classified_by_code() {
        use mongodb::bson::{doc, from_document};
        use mongodb::error::WriteFailure;
        let write = |code: i32| {
            mongo_write(WriteFailure::WriteError(
                from_document(doc! {"code": code, "errmsg": "x"}).unwrap(),
            ))
        };
        let concern = |code: i32| {
            mongo_write(WriteFailure::WriteConcernError(
                from_document(doc! {"code": code, "codeName": "x", "errmsg": "x"}).unwrap(),
            ))
        };
        for (code, expected) in [
            (10107, Disposition::Retry),    // NotWritablePrimary
            (112, Disposition::Retry),      // WriteConflict
            (11601, Disposition::Retry),    // Interrupted
            (121, Disposition::DeadLetter), // DocumentValidationFailure
            (MONGO_DUPLICATE_KEY, Disposition::DeadLetter),
            (13, Disposition::Fatal), // Unauthorized
        ] {
            assert_eq!(classify(&write(code)), expected, "write error {code}");
        }
        assert_eq!(classify(&concern(64)), Disposition::Retry);
        assert_eq!(classify(&concern(91)), Disposition::Retry);
        assert_eq!(classify(&concern(100)), Disposition::Fatal); // UnsatisfiableWriteConcern
    }

    #[test]
    fn setup_problems_are_fatal() {
        for e in [
            Error::Misconfigured("x".into()),
            Error::Connect("x".into()),
            Error::Schema("x".into()),
            Error::Internal("x".into()),
        ] {
            assert_eq!(classify(&e), Disposition::Fatal, "{e}");
            assert!(hint(&e).is_some(), "{e}");
        }
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
