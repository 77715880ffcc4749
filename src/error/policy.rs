//! The one decision per kind of error: its class, what the pipeline does with it, and what an
//! operator should check when it stops the process. One match, so the three can never drift
//! apart (they were three parallel matches once). Modelled on supabase/etl's error policy:
//! the retried set stays narrow, and the advice sits beside the decision it explains.

use rdkafka::error::RDKafkaErrorCode;
use tokio_postgres::error::SqlState;

use super::codes::{
    classify_kafka, classify_mongo, classify_postgres, classify_sqlstate, postgres_class,
};
use super::{too_few_brokers_up, Disposition, Error, WalError};

/// What dualsync does about one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Short stable name, used in dead-letter headers, metrics labels and `dlq replay --class`.
    pub class: &'static str,
    pub disposition: Disposition,
    /// What an operator should check; only for a fatal error, and `None` when the error's own
    /// message says it all.
    pub hint: Option<&'static str>,
}

impl Policy {
    const fn retry(class: &'static str) -> Self {
        Self::by(class, Disposition::Retry, None)
    }
    const fn dead_letter(class: &'static str) -> Self {
        Self::by(class, Disposition::DeadLetter, None)
    }
    const fn fatal(class: &'static str, hint: Option<&'static str>) -> Self {
        Self::by(class, Disposition::Fatal, hint)
    }
    /// A disposition decided by the driver's code: the hint counts only when it is fatal.
    const fn by(class: &'static str, disposition: Disposition, hint: Option<&'static str>) -> Self {
        let hint = match disposition {
            Disposition::Fatal => hint,
            Disposition::Retry | Disposition::DeadLetter => None,
        };
        Self {
            class,
            disposition,
            hint,
        }
    }
}

const CONFIG: &str = "check the pipeline's configuration file, its DUALSYNC_* environment overrides and the command's arguments";
const CONNECT: &str =
    "check the address, that it is reachable (or free, to listen on), and its TLS settings";
const SCHEMA: &str = "check that the databases and the schema registry are prepared for this pipeline (`dualsync outbox migrate`, `dualsync schema check`)";
const INTERNAL: &str =
    "unexpected: report it with this log; restarting resumes from the last saved position";
const INTERRUPTED: &str = "run the same command again to finish (with the same --checkpoint, if it had one, it continues where it stopped)";
const PERMISSION: &str = "permission: grant the database user what the message names";
const DATABASE: &str = "check the database URL's credentials and the user's permissions, and that the objects named exist";
const KAFKA: &str = "check kafka.brokers, kafka.properties (security, credentials) and the user's ACLs on the topics and group";
const REGISTRY: &str = "check schema_registry.url and its credentials";
const REPLICATION: &str = "check that the source user has the REPLICATION attribute, that wal_level = logical, and that the slot and publication exist (`dualsync outbox migrate`)";
const SLOT_LOST: &str = "the slot cannot be resumed: drop it (SELECT pg_drop_replication_slot(...)), run `dualsync outbox migrate` to create it anew, re-publish what the gap held (docs/outbox.md#when-the-slot-is-lost, then `dualsync verify --repair`), and raise max_slot_wal_keep_size so it does not happen again";
const DLQ_REQUEST: &str = "check the command's filters (`dualsync dlq --help`)";

impl Error {
    /// This error's class, disposition and operator hint, decided together.
    pub fn policy(&self) -> Policy {
        match self {
            // Set-up and operator problems: nothing sensible can continue.
            Error::Config(_) => Policy::fatal("config", Some(CONFIG)),
            Error::Misconfigured(_) => Policy::fatal("setup.config", Some(CONFIG)),
            Error::Connect(_) | Error::Listen { .. } | Error::Tls(_) => {
                Policy::fatal("setup.connect", Some(CONNECT))
            }
            Error::Schema(_) => Policy::fatal("setup.schema", Some(SCHEMA)),
            Error::Internal(_)
            | Error::TaskFailed { .. }
            | Error::MalformedChange { .. }
            | Error::Bson { .. } => Policy::fatal("internal", Some(INTERNAL)),
            Error::Interrupted(_) | Error::Checkpoint { .. } => {
                Policy::fatal("interrupted", Some(INTERRUPTED))
            }
            Error::DlqRequest(_) => Policy::fatal("dlq.request", Some(DLQ_REQUEST)),
            // Fatal, and their messages carry their own advice.
            Error::Halted(_) => Policy::fatal("halted", None),
            Error::HistoryLost(_) => Policy::fatal("source.history_lost", None),
            Error::ForeignTopic { .. } => Policy::fatal("dlq.foreign_topic", None),
            Error::KafkaCredentials { .. } => Policy::fatal("kafka.credentials", None),
            // Transient by kind: the same step can succeed later.
            Error::LeaseLost(_) => Policy::retry("source.lease_lost"),
            Error::LeaderSilent(_) => Policy::retry("source.leader_silent"),
            Error::UnconfirmedDelivery { .. } => Policy::retry("kafka.unconfirmed_delivery"),
            Error::SequenceBehind(_) => Policy::retry("source.sequence_behind"),
            Error::SinkTimeout { .. } => Policy::retry("sink.timeout"),
            Error::SchemaPending { .. } => Policy::retry("decode.schema_pending"),
            // Permanent for this one event.
            Error::Decode(e) => Policy::dead_letter(e.class()),
            Error::Encode(e) => Policy::dead_letter(e.class()),
            Error::Rejected(_) => Policy::dead_letter("sink.rejected"),
            Error::BelowPurgeHorizon { .. } => Policy::dead_letter("sink.below_purge_horizon"),
            // The replication stream: a lost or garbled stream restarts from the slot's
            // confirmed position, never skipped; a server error by its SQLSTATE.
            Error::Wal(WalError::Io(_) | WalError::Protocol(_)) => {
                Policy::retry("source.replication")
            }
            Error::Wal(WalError::Server { code, .. }) => Policy::by(
                "source.replication",
                classify_sqlstate(code),
                Some(REPLICATION),
            ),
            Error::Wal(WalError::SlotLost { .. }) => {
                Policy::fatal("source.slot_lost", Some(SLOT_LOST))
            }
            Error::WalSetup(_) => Policy::fatal("source.wal_setup", None),
            Error::Wal(WalError::VersionOverflow(_)) => {
                Policy::fatal("source.version_overflow", None)
            }
            // By the driver's code (codes.rs).
            Error::Postgres(e) => {
                let hint = if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                    PERMISSION
                } else {
                    DATABASE
                };
                Policy::by(postgres_class(e), classify_postgres(e), Some(hint))
            }
            Error::Mongo(e) => Policy::by("mongodb", classify_mongo(e), Some(DATABASE)),
            Error::Kafka(e) => {
                let class = if self.is_too_large() {
                    "publish.too_large"
                } else {
                    "kafka"
                };
                Policy::by(class, classify_kafka(e), Some(KAFKA))
            }
            // Never dead-letter on a registry failure: an unknown id is a DecodeError; anything
            // else (auth, a URL that is not a registry, a rejected schema) holds for every event.
            Error::Registry(e) => {
                let disposition = if e.is_transient() {
                    Disposition::Retry
                } else {
                    Disposition::Fatal
                };
                Policy::by("registry", disposition, Some(REGISTRY))
            }
            Error::TopicCreation {
                code,
                replication,
                brokers,
                ..
            } => {
                let disposition = match code {
                    // Brokers down: creating the topic with fewer replicas would make it less
                    // durable for good, so wait for them.
                    _ if too_few_brokers_up(*code, *replication, *brokers) => Disposition::Retry,
                    // A controller moving or a request timing out: the same request can succeed.
                    RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::NotController
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::AllBrokersDown => Disposition::Retry,
                    _ => Disposition::Fatal,
                };
                Policy::by("kafka.topic_creation", disposition, None)
            }
        }
    }
}
