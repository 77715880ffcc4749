//! The event envelope around an aggregate's payload: its schema (made from the template shipped
//! to consumers), the fields every envelope shares, writing an event ([`EventSchema::encode`]:
//! datum and frame in one call) and reading one envelope datum.

use std::collections::HashMap;

use apache_avro::rabin::Rabin;
use apache_avro::schema::{Name, RecordSchema, ResolvedSchema};
use apache_avro::types::Value;
use apache_avro::{GenericSingleObjectWriter, Schema};
use mongodb::bson::Bson;
use serde_json::{json, Value as Json};

use super::json_avro::{avro_to_json, json_to_avro, JsonPath};
use super::{
    DecodeError, EncodeError, Framing, OutboxEvent, CONFLUENT_HEADER_LEN, CONFLUENT_MAGIC,
    SINGLE_OBJECT_HEADER_LEN, SINGLE_OBJECT_MAGIC,
};

/// The envelope and payload schemas of one aggregate type.
#[derive(Debug)]
pub struct EventSchema {
    pub aggregate_type: String,
    pub envelope: Schema,
    pub payload: Schema,
    /// CRC-64-AVRO of the envelope's Parsing Canonical Form as the specification defines it
    /// ([`super::canonical`]), in the byte order it is written: what standard readers look up.
    pub fingerprint: [u8; 8],
    /// The fingerprint dualsync wrote before it used the specification's canonical form
    /// (apache-avro 0.21's `canonical_form`, which differs for logical types). Still accepted
    /// when reading, for events already on the topics.
    pub legacy_fingerprint: [u8; 8],
    /// Envelope schema in apache-avro's canonical form: compared with a registry writer
    /// schema's to tell whether it is the local one.
    pub envelope_json: String,
    /// Envelope schema as full JSON text, defaults and docs kept: what is registered in a
    /// schema registry, whose compatibility checks need the defaults.
    pub registry_json: String,
    /// Full name of the envelope record, e.g. `dualsync.example.OrderEvent`.
    pub envelope_name: String,
    /// Named types of the payload schema, resolved once rather than per event.
    pub payload_names: HashMap<Name, Schema>,
    /// Writes envelope datums with the schema resolved once: `to_avro_datum` resolved it
    /// twice per event (to validate, then to encode), over half of the relay's encoding time.
    writer: DatumWriter,
}

/// apache-avro's writer with a pre-resolved schema, behind a lock because it writes into a
/// buffer of its own (the relay encodes on one task, so the lock is never contended).
struct DatumWriter(std::sync::Mutex<GenericSingleObjectWriter>);

impl std::fmt::Debug for DatumWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatumWriter")
    }
}

impl EventSchema {
    /// The codec's one call for writing an event: its envelope datum (the payload validated
    /// strictly against this schema's) and the frame naming the schema, together.
    pub fn encode(&self, event: &OutboxEvent, framing: Framing) -> Result<Vec<u8>, EncodeError> {
        Ok(self.frame(framing, &self.encode_datum(event)?))
    }

    /// The bare Avro datum of an event in this envelope (no framing).
    pub fn encode_datum(&self, event: &OutboxEvent) -> Result<Vec<u8>, EncodeError> {
        let violation = |path: String, reason: String| EncodeError::SchemaViolation {
            aggregate_type: event.aggregate_type.clone(),
            path,
            reason,
        };
        let payload = match &event.payload {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(json) => {
                let value = json_to_avro(&self.payload, &self.payload_names, json, &JsonPath::Root)
                    .map_err(|(path, reason)| violation(path, reason))?;
                Value::Union(1, Box::new(value))
            }
        };
        let mut fields = envelope_head(event);
        fields.push(("payload".into(), payload));
        self.write_datum(&Value::Record(fields))
            .map_err(|e| violation("$".into(), e.to_string()))
    }

    /// `datum` (written with this schema) framed: single-object (`C3 01` + fingerprint) or
    /// Confluent (`00` + the 4-byte big-endian registry id).
    pub fn frame(&self, framing: Framing, datum: &[u8]) -> Vec<u8> {
        match framing {
            Framing::SingleObject => {
                let mut out = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN + datum.len());
                out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
                out.extend_from_slice(&self.fingerprint);
                out.extend_from_slice(datum);
                out
            }
            Framing::Confluent(id) => {
                let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + datum.len());
                out.push(CONFLUENT_MAGIC);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(datum);
                out
            }
        }
    }

    /// The Avro datum of `value` (an envelope record), validated against the envelope.
    pub fn write_datum(&self, value: &Value) -> Result<Vec<u8>, apache_avro::Error> {
        let mut framed = Vec::with_capacity(128);
        let mut writer = self.writer.0.lock().unwrap_or_else(|e| e.into_inner());
        writer.write_value_ref(value, &mut framed)?;
        // The writer frames for single-object encoding; the caller frames for itself.
        framed.drain(..SINGLE_OBJECT_HEADER_LEN);
        Ok(framed)
    }
}

/// The envelope's fields before `payload`, shared by every envelope (the generic MongoDB one
/// included), so consumers read them the same way everywhere.
pub(super) fn envelope_head(event: &OutboxEvent) -> Vec<(String, Value)> {
    let op = if event.is_delete() {
        (1, "DELETE")
    } else {
        (0, "UPSERT")
    };
    vec![
        ("event_id".into(), Value::String(event.event_id.to_string())),
        ("event_type".into(), Value::String(event.event_type.clone())),
        (
            "aggregate_type".into(),
            Value::String(event.aggregate_type.clone()),
        ),
        (
            "aggregate_id".into(),
            Value::String(event.aggregate_id.clone()),
        ),
        ("version".into(), Value::Long(event.version)),
        (
            "created_at".into(),
            Value::TimestampMicros(event.created_at_micros),
        ),
        ("op".into(), Value::Enum(op.0, op.1.into())),
    ]
}

/// Decodes one envelope datum written with `writer`, resolved against `reader` when given (so a
/// compatible newer or older writer schema still reads); `schema_label` names it in errors.
pub fn decode_datum(
    schema_label: &str,
    writer: &Schema,
    reader: Option<&Schema>,
    mut datum: &[u8],
) -> Result<OutboxEvent, DecodeError> {
    let value = apache_avro::from_avro_datum(writer, &mut datum, reader).map_err(|e| {
        DecodeError::Datum {
            schema: schema_label.to_string(),
            reason: e.to_string(),
        }
    })?;
    if !datum.is_empty() {
        return Err(DecodeError::TrailingBytes(datum.len()));
    }
    envelope_from_value(value).map_err(|reason| DecodeError::Datum {
        schema: schema_label.to_string(),
        reason,
    })
}

/// The envelope template shipped to consumers (`schemas/envelope/envelope.avsc`): its field
/// order and names are the contract with them (see docs/consumers.md).
pub const ENVELOPE_AVSC: &str = include_str!("../../schemas/envelope/envelope.avsc");

/// The envelope record around an aggregate's payload schema, made from [`ENVELOPE_AVSC`] as a
/// consumer would: name `<PayloadName>Event`, the payload's namespace (else `dualsync`), and
/// the payload schema in place of `"PAYLOAD"`.
pub fn envelope_schema_json(payload: &Json, record_name: &Name) -> Json {
    let mut envelope: Json =
        serde_json::from_str(ENVELOPE_AVSC).expect("the envelope template is JSON");
    envelope["name"] = json!(format!("{}Event", record_name.name));
    if let Some(namespace) = &record_name.namespace {
        envelope["namespace"] = json!(namespace);
    }
    let fields = envelope["fields"].as_array_mut().expect("template fields");
    let slot = fields
        .iter_mut()
        .find(|f| f["name"] == "payload")
        .expect("template payload field");
    slot["type"] = json!(["null", payload]);
    envelope
}

pub(super) fn build_event_schema(
    aggregate_type: &str,
    payload_json: &str,
) -> Result<EventSchema, String> {
    let payload_value: Json =
        serde_json::from_str(payload_json).map_err(|e| format!("not JSON: {e}"))?;
    let payload = Schema::parse(&payload_value).map_err(|e| format!("not an Avro schema: {e}"))?;
    let Schema::Record(RecordSchema { name, .. }) = &payload else {
        return Err("the top-level type must be a record".into());
    };
    let envelope_value = envelope_schema_json(&payload_value, name);
    event_schema_from_envelope(aggregate_type, envelope_value, payload)
}

/// An [`EventSchema`] for an envelope given as JSON around `payload`.
pub(super) fn event_schema_from_envelope(
    aggregate_type: &str,
    envelope_value: Json,
    payload: Schema,
) -> Result<EventSchema, String> {
    let envelope = Schema::parse(&envelope_value)
        .map_err(|e| format!("cannot build the event envelope around it: {e}"))?;
    let fingerprint = super::canonical::fingerprint(&envelope_value)?;
    let legacy = envelope.fingerprint::<Rabin>();
    let legacy_fingerprint: [u8; 8] = legacy.bytes[..8]
        .try_into()
        .map_err(|_| "fingerprint size")?;
    let envelope_name = match &envelope {
        Schema::Record(r) => r.name.fullname(None),
        _ => return Err("the envelope is not a record".into()),
    };
    let payload_names = ResolvedSchema::try_from(&payload)
        .map_err(|e| format!("cannot resolve the named types of the payload: {e}"))?
        .get_names()
        .iter()
        .map(|(name, schema)| (name.clone(), (*schema).clone()))
        .collect();
    let writer = GenericSingleObjectWriter::new_with_capacity(&envelope, 256)
        .map_err(|e| format!("cannot resolve the event envelope: {e}"))?;
    Ok(EventSchema {
        writer: DatumWriter(std::sync::Mutex::new(writer)),
        payload_names,
        aggregate_type: aggregate_type.to_string(),
        envelope_json: envelope.canonical_form(),
        registry_json: envelope_value.to_string(),
        envelope_name,
        envelope,
        payload,
        fingerprint,
        legacy_fingerprint,
    })
}

fn envelope_from_value(value: Value) -> Result<OutboxEvent, String> {
    let Value::Record(fields) = value else {
        return Err("envelope is not a record".into());
    };
    let mut f: HashMap<String, Value> = fields.into_iter().collect();
    let mut take = |name: &str| {
        f.remove(name)
            .ok_or_else(|| format!("envelope has no field {name}"))
    };
    let string = |v: Value, name: &str| match v {
        Value::String(s) => Ok(s),
        other => Err(format!("field {name} is {other:?}, not a string")),
    };
    let event_id = string(take("event_id")?, "event_id")?;
    let event_id = uuid::Uuid::parse_str(&event_id).map_err(|e| format!("event_id: {e}"))?;
    let event_type = string(take("event_type")?, "event_type")?;
    let aggregate_type = string(take("aggregate_type")?, "aggregate_type")?;
    let aggregate_id = string(take("aggregate_id")?, "aggregate_id")?;
    let version = match take("version")? {
        Value::Long(v) => v,
        other => return Err(format!("version is {other:?}")),
    };
    let created_at_micros = match take("created_at")? {
        Value::TimestampMicros(v) | Value::Long(v) => v,
        other => return Err(format!("created_at is {other:?}")),
    };
    let payload = match take("payload")? {
        Value::Union(_, inner) if *inner == Value::Null => None,
        // Only the generic MongoDB envelope has a string payload: canonical Extended JSON.
        Value::Union(_, inner) if matches!(*inner, Value::String(_)) => {
            let Value::String(text) = *inner else {
                unreachable!("matched above")
            };
            Some(relaxed_from_canonical(&text)?)
        }
        Value::Union(_, inner) => Some(avro_to_json(*inner)?),
        other => return Err(format!("payload is {other:?}")),
    };
    Ok(OutboxEvent {
        event_id,
        event_type,
        aggregate_type,
        aggregate_id,
        version,
        created_at_micros,
        payload,
    })
}

/// Canonical Extended JSON text → the same document as relaxed Extended JSON.
pub fn relaxed_from_canonical(text: &str) -> Result<Json, String> {
    let json: Json = serde_json::from_str(text)
        .map_err(|e| format!("payload is not Extended JSON text: {e}"))?;
    let bson = Bson::try_from(json).map_err(|e| format!("payload is not Extended JSON: {e}"))?;
    match bson {
        Bson::Document(_) => Ok(bson.into_relaxed_extjson()),
        other => Err(format!(
            "payload is Extended JSON of a {:?}, not a document",
            other.element_type()
        )),
    }
}
