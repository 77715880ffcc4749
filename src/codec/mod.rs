//! What travels on the topics: the outbox event envelope, and its Avro encoding.
//!
//! The value of every relay message is an Avro record `<Aggregate>Event` (see
//! [`envelope::envelope_schema_json`]), framed so that it names its writer schema:
//! - with a schema registry, the Confluent wire format: `00`, the 4-byte big-endian schema id,
//!   then the datum ([`wire`], [`registry`]);
//! - without one, Avro single-object encoding: `C3 01`, the 8-byte CRC-64-AVRO (Rabin)
//!   fingerprint of the writer schema's Parsing Canonical Form, then the datum ([`avro`],
//!   [`canonical`]).

pub mod avro;
pub mod canonical;
pub mod compat;
pub mod envelope;
pub mod json_avro;
pub mod mongo;
pub mod registry;

pub use avro::SchemaStore;

/// Single-object encoding marker.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// Marker plus 8-byte fingerprint: what precedes the datum in single-object encoding.
pub const SINGLE_OBJECT_HEADER_LEN: usize = 10;
/// First byte of the Confluent wire format.
pub const CONFLUENT_MAGIC: u8 = 0;
/// Marker plus 4-byte schema id: what precedes the datum in the Confluent wire format.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// How a value names its writer schema in front of the datum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Avro single-object encoding: `C3 01` + the schema's 8-byte fingerprint.
    SingleObject,
    /// The Confluent wire format: `00` + this 4-byte big-endian registry id.
    Confluent(u32),
}

/// One outbox row as an event: the unit the relay publishes and apply writes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutboxEvent {
    pub event_id: uuid::Uuid,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// Position of the row in the outbox: increases with commit order per aggregate. The sinks
    /// keep it with each record and refuse anything not newer.
    pub version: i64,
    /// When the row was written, in microseconds since the Unix epoch.
    pub created_at_micros: i64,
    /// The aggregate's state after the event; `None` deletes the aggregate (as Debezium's
    /// outbox router treats an empty payload as a tombstone).
    pub payload: Option<serde_json::Value>,
}

impl OutboxEvent {
    pub fn is_delete(&self) -> bool {
        self.payload.is_none()
    }
}

/// A message value that cannot be turned into an event. Always permanent for that message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message has no value")]
    Empty,
    #[error("message has no key")]
    NullKey,
    #[error("unknown magic byte 0x{0:02x} (expected 00, the Confluent wire format, or C3 01, Avro single-object encoding)")]
    BadMagic(u8),
    #[error("value is {0} bytes, shorter than its framing header (5 bytes Confluent, 10 bytes single-object)")]
    TooShort(usize),
    #[error("no schema in the schemas folder has fingerprint {0}")]
    UnknownFingerprint(String),
    #[error("the schema registry has no schema with id {0}")]
    UnknownSchemaId(u32),
    #[error("value is in the Confluent wire format (schema id {0}) but no [schema_registry] is configured to resolve it")]
    NoRegistry(u32),
    #[error("schema id {id} from the registry cannot be used: {reason}")]
    WriterSchema { id: u32, reason: String },
    #[error("Avro datum does not match its schema {schema}: {reason}")]
    Datum { schema: String, reason: String },
    #[error("{0} bytes left over after the Avro datum")]
    TrailingBytes(usize),
    #[error("message key {key:?} differs from the event's aggregate id {aggregate_id:?}")]
    KeyMismatch { key: String, aggregate_id: String },
    /// An event of one aggregate type found on another type's topic: writing it would let
    /// whoever can produce to one topic change (or pin, with a huge version) another type's
    /// records.
    #[error("event of aggregate type {aggregate_type:?} read from topic {topic:?}, but that type's topic is {expected:?} (kafka.topic_template)")]
    WrongTopic {
        aggregate_type: String,
        topic: String,
        expected: String,
    },
    /// An aggregate type this pipeline does not carry (no schema in encoding.schemas_dir, not
    /// a watched collection): no table or collection is ever created for it.
    #[error("aggregate type {0:?} is not carried by this pipeline (no schema for it in encoding.schemas_dir, and not a watched MongoDB collection)")]
    UnknownAggregateType(String),
}

impl DecodeError {
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Empty => "decode.empty",
            DecodeError::NullKey => "decode.null_key",
            DecodeError::BadMagic(_) => "decode.bad_magic",
            DecodeError::TooShort(_) => "decode.truncated",
            DecodeError::UnknownFingerprint(_) | DecodeError::UnknownSchemaId(_) => {
                "decode.unknown_schema"
            }
            DecodeError::NoRegistry(_) => "decode.no_registry",
            DecodeError::WriterSchema { .. } => "decode.bad_writer_schema",
            DecodeError::Datum { .. } => "decode.schema_violation",
            DecodeError::TrailingBytes(_) => "decode.trailing_bytes",
            DecodeError::KeyMismatch { .. } => "decode.key_mismatch",
            DecodeError::WrongTopic { .. } => "decode.wrong_topic",
            DecodeError::UnknownAggregateType(_) => "decode.unknown_aggregate_type",
        }
    }
}

/// An outbox row that cannot be encoded. Permanent for that row.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EncodeError {
    #[error("no schema for aggregate type {0:?} (expected a file {0}.avsc in the schemas folder)")]
    NoSchema(String),
    #[error("payload of aggregate type {aggregate_type:?} does not match its schema at {path}: {reason}")]
    SchemaViolation {
        aggregate_type: String,
        path: String,
        reason: String,
    },
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
}

impl EncodeError {
    pub fn class(&self) -> &'static str {
        match self {
            EncodeError::NoSchema(_) => "encode.no_schema",
            EncodeError::SchemaViolation { .. } => "encode.schema_violation",
            EncodeError::NotJson(_) => "encode.not_json",
        }
    }
}
