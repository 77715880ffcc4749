//! The drivers' codes, one list per server, read once against its documentation: which
//! SQLSTATEs, MongoDB codes and Kafka errors are transient, permanent for one event, or fatal.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::Disposition;

/// PostgreSQL errors by SQLSTATE (appendix A "PostgreSQL Error Codes"), reviewed class by
/// class for issue #35 item 8. Retried: 08 connection exception, 40 transaction rollback
/// (serialization failure, deadlock), 53 insufficient resources, 57 operator intervention
/// (shutdown, 57014 query_canceled: `statement_timeout` or a cancel), 58 system error, and
/// single codes that clear by themselves: 55P03 lock_not_available (`lock_timeout`, a
/// migration holding the table), 55006 object_in_use, 25006 read_only_sql_transaction (a
/// standby, or a primary being demoted), 25P03 idle_in_transaction_session_timeout, 25P04
/// transaction_timeout, 72000 snapshot_too_old. Dead-lettered: 22 data exception, 23
/// integrity constraint violation, 54 program limit exceeded (that one row can never be
/// written). The rest (28 authorization, 3D/3F missing database or schema, 42 syntax or
/// access, 0A unsupported, 55000/55P02/55P04, XX internal) is a deployment problem: fatal.
pub(super) fn classify_postgres(e: &tokio_postgres::Error) -> Disposition {
    let Some(db) = e.as_db_error() else {
        // No SQLSTATE: the connection broke, timed out, or was closed.
        return Disposition::Retry;
    };
    classify_sqlstate(db.code().code())
}

/// [`classify_postgres`] of a server error, by its SQLSTATE.
pub(super) fn classify_sqlstate(code: &str) -> Disposition {
    match code.get(..2).unwrap_or_default() {
        "08" | "40" | "53" | "57" | "58" => Disposition::Retry,
        "22" | "23" | "54" => Disposition::DeadLetter,
        _ if POSTGRES_TRANSIENT_CODES.contains(&code) => Disposition::Retry,
        _ => Disposition::Fatal,
    }
}

/// Single SQLSTATEs outside the retried classes that mean "try again later" (see
/// [`classify_postgres`]).
const POSTGRES_TRANSIENT_CODES: &[&str] = &[
    "55P03", // lock_not_available: lock_timeout expired while another session held the lock
    "55006", // object_in_use
    "25006", // read_only_sql_transaction
    "25P03", // idle_in_transaction_session_timeout
    "25P04", // transaction_timeout (PostgreSQL 17)
    "72000", // snapshot_too_old
];

/// The dead-letter class of a PostgreSQL error: `sink.<condition name>` from its SQLSTATE
/// for what a sink refuses for good (so `dlq replay --class sink.check_violation` selects
/// one cause), `sink.data_exception` / `sink.integrity_constraint_violation` /
/// `sink.program_limit_exceeded` for other codes of those classes, `postgres` otherwise.
pub(super) fn postgres_class(e: &tokio_postgres::Error) -> &'static str {
    e.code().map_or("postgres", |c| sqlstate_class(c.code()))
}

/// [`postgres_class`] by SQLSTATE.
pub(super) fn sqlstate_class(code: &str) -> &'static str {
    match code {
        "23514" => "sink.check_violation",
        "23502" => "sink.not_null_violation",
        "23505" => "sink.unique_violation",
        "23503" => "sink.foreign_key_violation",
        "23P01" => "sink.exclusion_violation",
        "22P02" => "sink.invalid_text_representation",
        "22003" => "sink.numeric_value_out_of_range",
        "22001" => "sink.string_data_right_truncation",
        "22007" => "sink.invalid_datetime_format",
        "22008" => "sink.datetime_field_overflow",
        "22021" => "sink.character_not_in_repertoire",
        "22P05" => "sink.untranslatable_character",
        "22023" => "sink.invalid_parameter_value",
        _ if code.starts_with("22") => "sink.data_exception",
        _ if code.starts_with("23") => "sink.integrity_constraint_violation",
        _ if code.starts_with("54") => "sink.program_limit_exceeded",
        _ => "postgres",
    }
}

/// MongoDB's DuplicateKey (E11000): the MongoDB sink settles it on `_id` itself (stale, or a
/// race with another writer); on a unique secondary index it is permanent.
pub const MONGO_DUPLICATE_KEY: i32 = 11000;

/// MongoDB server codes that mean "try again later", as a command's error, a per-document
/// write error or a write-concern error. Reviewed against the server's error-code list and
/// the drivers' retryable-writes/reads specifications for issue #35 item 8: added then were
/// 24 LockTimeout, 46 LockBusy (a lock held by another operation, e.g. an index build),
/// 133 FailedToSatisfyReadPreference (no primary during an election), 134
/// ReadConcernMajorityNotAvailableYet, 202 NetworkInterfaceExceededTimeLimit, 10058
/// LegacyNotPrimary, and the sharding routing codes 63/150/13388 (stale shard version,
/// epoch or config: refreshed by the router, so the same write succeeds).
const MONGO_TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    24,    // LockTimeout
    46,    // LockBusy
    50,    // MaxTimeMSExpired (the sink's own deadline, sinks.NAME.timeout_ms)
    63,    // StaleShardVersion
    133,   // FailedToSatisfyReadPreference
    134,   // ReadConcernMajorityNotAvailableYet
    150,   // StaleEpoch
    202,   // NetworkInterfaceExceededTimeLimit
    10058, // LegacyNotPrimary
    13388, // StaleConfig
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
    16755,               // a 2dsphere index cannot extract geo keys from the document
    17280,               // KeyTooLong (an indexed value over the index key limit)
    17419,               // document exceeds maximum size
    17420,               // document exceeds maximum size (update)
    MONGO_DUPLICATE_KEY, // on a unique secondary index
];

pub(super) fn classify_mongo(e: &mongodb::error::Error) -> Disposition {
    use mongodb::error::ErrorKind;
    // Labels the server or driver attaches when the same operation may succeed again:
    // retryable writes, transactions, network errors, and (MongoDB 8.x) overload shedding.
    if [
        "RetryableWriteError",
        "TransientTransactionError",
        "NetworkError",
        "SystemOverloadedError",
        "RetryableError",
    ]
    .iter()
    .any(|l| e.contains_label(l))
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

pub(super) fn classify_kafka(e: &KafkaError) -> Disposition {
    // rdkafka leaves an admin request's code out of `rdkafka_error_code()`; without it a
    // broken connection while creating a topic would be taken for fatal.
    let code = match e {
        KafkaError::AdminOp(code) => Some(*code),
        _ => e.rdkafka_error_code(),
    };
    let Some(code) = code else {
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
