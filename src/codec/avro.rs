//! Avro schemas from `schemas/`, the event envelope built around them, and single-object
//! encoding (`C3 01` + CRC-64-AVRO fingerprint + datum).
//!
//! JSON payloads are converted to Avro by hand ([`json_to_avro`]) rather than through serde,
//! because the conversion must be strict (an unknown field is an error, not silently dropped)
//! and its errors must name the field that is wrong.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use apache_avro::rabin::Rabin;
use apache_avro::schema::{Name, RecordSchema, ResolvedSchema};
use apache_avro::types::Value;
use apache_avro::{GenericSingleObjectWriter, Schema};
use serde_json::{json, Value as Json};

use super::{DecodeError, EncodeError, OutboxEvent};

/// Single-object encoding marker.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

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
    /// The Avro datum of `value` (an envelope record), validated against the envelope.
    pub fn write_datum(&self, value: &Value) -> Result<Vec<u8>, apache_avro::Error> {
        let mut framed = Vec::with_capacity(128);
        let mut writer = self.writer.0.lock().unwrap_or_else(|e| e.into_inner());
        writer.write_value_ref(value, &mut framed)?;
        // The writer frames for single-object encoding; the caller frames for itself.
        framed.drain(..HEADER_LEN);
        Ok(framed)
    }
}

/// Every event schema known to this process, by aggregate type and by fingerprint, plus the
/// generic envelope of MongoDB changes to collections that have no schema.
#[derive(Debug)]
pub struct SchemaStore {
    by_type: HashMap<String, Arc<EventSchema>>,
    by_fingerprint: HashMap<[u8; 8], Arc<EventSchema>>,
    generic: Arc<EventSchema>,
}

impl Default for SchemaStore {
    fn default() -> Self {
        let generic = Arc::new(super::mongo::generic_event_schema());
        Self {
            by_type: HashMap::new(),
            by_fingerprint: HashMap::from([
                (generic.legacy_fingerprint, generic.clone()),
                (generic.fingerprint, generic.clone()),
            ]),
            generic,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("schema file {file}: {problem}")]
pub struct SchemaFileError {
    pub file: String,
    pub problem: String,
}

impl SchemaStore {
    /// Loads every `<aggregatetype>.avsc` in `dir`. A file that does not parse, or whose top
    /// type is not a record, stops start-up with its name.
    pub fn load_dir(dir: &Path) -> Result<Self, SchemaFileError> {
        let err = |file: &Path, problem: String| SchemaFileError {
            file: file.display().to_string(),
            problem,
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| err(dir, format!("cannot read the schemas folder: {e}")))?;
        let mut store = SchemaStore::default();
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
            .collect();
        paths.sort();
        for path in paths {
            let aggregate_type = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| err(&path, "file name is not UTF-8".into()))?
                .to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| err(&path, e.to_string()))?;
            store
                .add(&aggregate_type, &text)
                .map_err(|problem| err(&path, problem))?;
        }
        Ok(store)
    }

    /// Adds the payload schema of `aggregate_type`, given as Avro JSON text.
    pub fn add(&mut self, aggregate_type: &str, payload_json: &str) -> Result<(), String> {
        let schema = Arc::new(build_event_schema(aggregate_type, payload_json)?);
        // Both fingerprints read; a standard one wins should it ever equal an old one.
        self.by_fingerprint
            .entry(schema.legacy_fingerprint)
            .or_insert_with(|| schema.clone());
        self.by_fingerprint
            .insert(schema.fingerprint, schema.clone());
        self.by_type.insert(aggregate_type.to_string(), schema);
        Ok(())
    }

    pub fn for_type(&self, aggregate_type: &str) -> Option<&Arc<EventSchema>> {
        self.by_type.get(aggregate_type)
    }

    pub fn aggregate_types(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }

    /// The schema whose envelope record has the full name `name`.
    pub fn for_envelope_name(&self, name: &str) -> Option<&Arc<EventSchema>> {
        self.by_type
            .values()
            .chain([&self.generic])
            .find(|s| s.envelope_name == name)
    }

    /// The generic envelope of MongoDB change events (collections without a schema).
    pub fn generic(&self) -> &Arc<EventSchema> {
        &self.generic
    }

    /// A MongoDB change in the generic envelope, single-object encoded.
    pub fn encode_generic(
        &self,
        event: &OutboxEvent,
        change: &super::mongo::ChangeContext,
    ) -> Result<Vec<u8>, EncodeError> {
        let datum = super::mongo::encode_generic_datum(&self.generic, event, change)?;
        let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&self.generic.fingerprint);
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// Encodes an event in single-object encoding; `payload` is validated strictly against the
    /// aggregate's schema.
    pub fn encode(&self, event: &OutboxEvent) -> Result<Vec<u8>, EncodeError> {
        let (schema, datum) = self.encode_datum(event)?;
        let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&schema.fingerprint);
        out.extend_from_slice(&datum);
        Ok(out)
    }

    /// The bare Avro datum of an event (no framing) and the schema it was written with.
    pub fn encode_datum(
        &self,
        event: &OutboxEvent,
    ) -> Result<(Arc<EventSchema>, Vec<u8>), EncodeError> {
        let schema = self
            .for_type(&event.aggregate_type)
            .ok_or_else(|| EncodeError::NoSchema(event.aggregate_type.clone()))?;
        let violation = |path: String, reason: String| EncodeError::SchemaViolation {
            aggregate_type: event.aggregate_type.clone(),
            path,
            reason,
        };
        let payload = match &event.payload {
            None => Value::Union(0, Box::new(Value::Null)),
            Some(json) => {
                let value = json_to_avro(
                    &schema.payload,
                    &schema.payload_names,
                    json,
                    &JsonPath::Root,
                )
                .map_err(|(path, reason)| violation(path, reason))?;
                Value::Union(1, Box::new(value))
            }
        };
        let mut fields = envelope_head(event);
        fields.push(("payload".into(), payload));
        let record = Value::Record(fields);
        let datum = schema
            .write_datum(&record)
            .map_err(|e| violation("$".into(), e.to_string()))?;
        Ok((schema.clone(), datum))
    }

    /// Decodes a single-object-encoded event written with any schema in this store.
    pub fn decode(&self, bytes: &[u8]) -> Result<OutboxEvent, DecodeError> {
        let (schema, datum) = self.split_header(bytes)?;
        decode_datum(&schema.aggregate_type, &schema.envelope, None, datum)
    }

    fn split_header<'a>(
        &self,
        bytes: &'a [u8],
    ) -> Result<(&Arc<EventSchema>, &'a [u8]), DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes[0] != SINGLE_OBJECT_MAGIC[0]
            || bytes.get(1).is_some_and(|b| *b != SINGLE_OBJECT_MAGIC[1])
        {
            return Err(DecodeError::BadMagic(bytes[0]));
        }
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::TooShort(bytes.len()));
        }
        let fingerprint: [u8; 8] = bytes[2..HEADER_LEN].try_into().expect("8 bytes");
        let schema = self
            .by_fingerprint
            .get(&fingerprint)
            .ok_or_else(|| DecodeError::UnknownFingerprint(hex(&fingerprint)))?;
        Ok((schema, &bytes[HEADER_LEN..]))
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

fn build_event_schema(aggregate_type: &str, payload_json: &str) -> Result<EventSchema, String> {
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
            Some(super::mongo::relaxed_from_canonical(&text)?)
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

/// Avro value to JSON as the sinks store it: bytes and fixed become strings of their bytes
/// read as ISO-8859-1 (Avro's own JSON encoding), the rest maps one to one.
pub fn avro_to_json(value: Value) -> Result<Json, String> {
    Ok(match value {
        Value::Bytes(b) | Value::Fixed(_, b) => {
            Json::String(b.iter().map(|&c| c as char).collect())
        }
        Value::Union(_, inner) => avro_to_json(*inner)?,
        Value::Array(items) => Json::Array(
            items
                .into_iter()
                .map(avro_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(items) => Json::Object(
            items
                .into_iter()
                .map(|(k, v)| avro_to_json(v).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        ),
        Value::Record(items) => Json::Object(
            items
                .into_iter()
                .map(|(k, v)| avro_to_json(v).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        ),
        other => Json::try_from(other).map_err(|e| e.to_string())?,
    })
}

type PathError = (String, String);

/// Where a value sits in a payload (`$.lines[0].qty`), written out only for an error: the
/// conversion runs for every event, and formatting each field's path cost more than the rest.
pub enum JsonPath<'a> {
    Root,
    Field(&'a JsonPath<'a>, &'a str),
    Index(&'a JsonPath<'a>, usize),
}

impl std::fmt::Display for JsonPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsonPath::Root => f.write_str("$"),
            JsonPath::Field(parent, name) => write!(f, "{parent}.{name}"),
            JsonPath::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Converts a JSON document to an Avro value of `schema`, strictly: unknown fields, missing
/// required fields, out-of-range numbers and unknown enum symbols are errors naming the path.
pub fn json_to_avro(
    schema: &Schema,
    names: &HashMap<Name, Schema>,
    json: &Json,
    path: &JsonPath<'_>,
) -> Result<Value, PathError> {
    let fail = |reason: String| Err((path.to_string(), reason));
    let kind = json_kind(json);
    match (schema, json) {
        (Schema::Null, Json::Null) => Ok(Value::Null),
        (Schema::Boolean, Json::Bool(b)) => Ok(Value::Boolean(*b)),
        (Schema::Int | Schema::Date | Schema::TimeMillis, Json::Number(n)) => match n.as_i64() {
            Some(i) if i32::try_from(i).is_ok() => Ok(match schema {
                Schema::Date => Value::Date(i as i32),
                Schema::TimeMillis => Value::TimeMillis(i as i32),
                _ => Value::Int(i as i32),
            }),
            _ => fail(format!("{n} is not a 32-bit integer")),
        },
        (
            Schema::Long | Schema::TimeMicros | Schema::TimestampMillis | Schema::TimestampMicros,
            Json::Number(n),
        ) => match n.as_i64() {
            Some(i) => Ok(match schema {
                Schema::TimeMicros => Value::TimeMicros(i),
                Schema::TimestampMillis => Value::TimestampMillis(i),
                Schema::TimestampMicros => Value::TimestampMicros(i),
                _ => Value::Long(i),
            }),
            None => fail(format!("{n} is not a 64-bit integer")),
        },
        (Schema::Float, Json::Number(n)) => Ok(Value::Float(n.as_f64().unwrap_or(f64::NAN) as f32)),
        (Schema::Double, Json::Number(n)) => Ok(Value::Double(n.as_f64().unwrap_or(f64::NAN))),
        (Schema::String, Json::String(s)) => Ok(Value::String(s.clone())),
        (Schema::Uuid, Json::String(s)) => match uuid::Uuid::parse_str(s) {
            Ok(u) => Ok(Value::Uuid(u)),
            Err(e) => fail(format!("{s:?} is not a UUID: {e}")),
        },
        (Schema::Bytes, Json::String(s)) => latin1_bytes(s).map(Value::Bytes).or_else(fail),
        (Schema::Fixed(f), Json::String(s)) => {
            let bytes = latin1_bytes(s).map_err(|r| (path.to_string(), r))?;
            if bytes.len() != f.size {
                return fail(format!(
                    "fixed {} needs {} bytes, got {}",
                    f.name.name,
                    f.size,
                    bytes.len()
                ));
            }
            Ok(Value::Fixed(f.size, bytes))
        }
        (Schema::Enum(e), Json::String(s)) => match e.symbols.iter().position(|x| x == s) {
            Some(i) => Ok(Value::Enum(i as u32, s.clone())),
            None => fail(format!(
                "{s:?} is not one of the symbols {:?} of enum {}",
                e.symbols, e.name.name
            )),
        },
        (Schema::Array(a), Json::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| json_to_avro(&a.items, names, item, &JsonPath::Index(path, i)))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        (Schema::Map(m), Json::Object(obj)) => obj
            .iter()
            .map(|(k, v)| {
                json_to_avro(&m.types, names, v, &JsonPath::Field(path, k)).map(|v| (k.clone(), v))
            })
            .collect::<Result<_, _>>()
            .map(Value::Map),
        (Schema::Record(r), Json::Object(obj)) => {
            if let Some(unknown) = obj.keys().find(|k| !r.lookup.contains_key(*k)) {
                return Err((
                    JsonPath::Field(path, unknown).to_string(),
                    format!("field is not in record {}", r.name.name),
                ));
            }
            let mut fields = Vec::with_capacity(r.fields.len());
            for field in &r.fields {
                let field_path = JsonPath::Field(path, &field.name);
                let value = match (obj.get(&field.name), &field.default) {
                    (Some(v), _) => json_to_avro(&field.schema, names, v, &field_path)?,
                    (None, Some(default)) => {
                        json_to_avro(&field.schema, names, default, &field_path)?
                    }
                    (None, None) => {
                        return Err((field_path.to_string(), "required field is missing".into()))
                    }
                };
                fields.push((field.name.clone(), value));
            }
            Ok(Value::Record(fields))
        }
        (Schema::Union(u), _) => {
            // Only null matches the null branch, so a value is not first tried against it
            // (building that error for every nullable field was a cost per event).
            let null_branch = u.variants().iter().position(|v| *v == Schema::Null);
            if let (Json::Null, Some(i)) = (json, null_branch) {
                return Ok(Value::Union(i as u32, Box::new(Value::Null)));
            }
            let mut last_err = None;
            for (i, variant) in u.variants().iter().enumerate() {
                if Some(i) == null_branch {
                    continue;
                }
                match json_to_avro(variant, names, json, path) {
                    Ok(v) => return Ok(Value::Union(i as u32, Box::new(v))),
                    Err(e) => last_err = Some(e),
                }
            }
            match (json, last_err) {
                (Json::Null, _) => fail("null is not allowed here".into()),
                (_, Some((p, r))) if u.variants().len() <= 2 => Err((p, r)),
                _ => fail(format!("{kind} matches no branch of the union")),
            }
        }
        (Schema::Ref { name }, _) => match names.get(name) {
            Some(target) => json_to_avro(target, names, json, path),
            None => fail(format!("schema refers to unknown type {}", name.name)),
        },
        (Schema::Decimal(_) | Schema::BigDecimal | Schema::Duration, _) => fail(
            "decimal and duration types are not supported in outbox payloads; use a string".into(),
        ),
        (_, Json::Null) => {
            fail("null is not allowed here (make the field a union with \"null\")".into())
        }
        _ => fail(format!("expected {}, got {kind}", schema_kind(schema))),
    }
}

fn latin1_bytes(s: &str) -> Result<Vec<u8>, String> {
    s.chars()
        .map(|c| {
            u8::try_from(u32::from(c)).map_err(|_| {
                format!("character {c:?} is not a byte (bytes are ISO-8859-1 strings)")
            })
        })
        .collect()
}

fn json_kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn schema_kind(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => format!("record {}", r.name.name),
        Schema::Enum(e) => format!("enum {}", e.name.name),
        Schema::Fixed(f) => format!("fixed {}", f.name.name),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"status","type":{"type":"enum","name":"Status","symbols":["NEW","PAID"]}},
        {"name":"total_cents","type":"long"},
        {"name":"note","type":["null","string"],"default":null},
        {"name":"lines","type":{"type":"array","items":{"type":"record","name":"Line","fields":[
            {"name":"sku","type":"string"},{"name":"qty","type":"int"}]}}}]}"#;

    fn store() -> SchemaStore {
        let mut s = SchemaStore::default();
        s.add("orders", ORDER).unwrap();
        s
    }

    fn event(payload: Option<Json>) -> OutboxEvent {
        OutboxEvent {
            event_id: uuid::Uuid::new_v4(),
            event_type: "OrderPlaced".into(),
            aggregate_type: "orders".into(),
            aggregate_id: "o-1".into(),
            version: 42,
            created_at_micros: 1_700_000_000_000_000,
            payload,
        }
    }

    #[test]
    fn round_trip_fills_defaults() {
        let e = event(Some(
            json!({"status":"NEW","total_cents":1200,"lines":[{"sku":"a","qty":2}]}),
        ));
        let bytes = store().encode(&e).unwrap();
        assert_eq!(&bytes[..2], &SINGLE_OBJECT_MAGIC);
        let back = store().decode(&bytes).unwrap();
        let mut expected = e.clone();
        expected.payload = Some(
            json!({"status":"NEW","total_cents":1200,"note":null,"lines":[{"sku":"a","qty":2}]}),
        );
        assert_eq!(back, expected);
    }

    #[test]
    fn delete_has_no_payload() {
        let e = event(None);
        let back = store().decode(&store().encode(&e).unwrap()).unwrap();
        assert!(back.is_delete());
    }

    #[test]
    fn errors_name_the_field() {
        let e = event(Some(
            json!({"status":"NEW","total_cents":1,"lines":[{"sku":"a","qty":"two"}]}),
        ));
        match store().encode(&e) {
            Err(EncodeError::SchemaViolation { path, .. }) => assert_eq!(path, "$.lines[0].qty"),
            other => panic!("{other:?}"),
        }
        let e = event(Some(
            json!({"status":"NEW","total_cents":1,"lines":[],"extra":1}),
        ));
        match store().encode(&e) {
            Err(EncodeError::SchemaViolation { path, reason, .. }) => {
                assert_eq!(path, "$.extra");
                assert!(reason.contains("not in record Order"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let e = event(Some(json!({"status":"LOST","total_cents":1,"lines":[]})));
        assert!(matches!(
            store().encode(&e),
            Err(EncodeError::SchemaViolation { .. })
        ));
        let mut e = event(None);
        e.aggregate_type = "nope".into();
        assert_eq!(
            store().encode(&e),
            Err(EncodeError::NoSchema("nope".into()))
        );
    }

    #[test]
    fn bad_frames_are_classified() {
        let s = store();
        assert_eq!(s.decode(b""), Err(DecodeError::Empty));
        assert_eq!(
            s.decode(b"\x00\x00\x00\x00\x01x"),
            Err(DecodeError::BadMagic(0))
        );
        assert_eq!(s.decode(&[0xC3, 0x01, 1, 2]), Err(DecodeError::TooShort(4)));
        assert!(matches!(
            s.decode(&[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(DecodeError::UnknownFingerprint(_))
        ));
        let good = s.encode(&event(None)).unwrap();
        assert!(matches!(
            s.decode(&good[..good.len() - 3]),
            Err(DecodeError::Datum { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(s.decode(&long), Err(DecodeError::TrailingBytes(1)));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn payload() -> impl Strategy<Value = Json> {
            (
                prop::sample::select(vec!["NEW", "PAID"]),
                any::<i64>(),
                prop::option::of(".{0,20}"),
                prop::collection::vec(("[a-z0-9]{1,8}", any::<i32>()), 0..5),
            )
                .prop_map(|(status, total, note, lines)| {
                    let lines: Vec<Json> = lines
                        .into_iter()
                        .map(|(sku, qty)| json!({"sku": sku, "qty": qty}))
                        .collect();
                    json!({"status": status, "total_cents": total, "note": note, "lines": lines})
                })
        }

        proptest! {
            /// Whatever a valid payload holds, decode(encode(e)) == e.
            #[test]
            fn encode_then_decode_is_identity(p in prop::option::of(payload()), version in any::<i64>(), id in ".{1,40}") {
                let mut e = event(p);
                e.version = version;
                e.aggregate_id = id;
                let s = store();
                prop_assert_eq!(s.decode(&s.encode(&e).unwrap()).unwrap(), e);
            }

            /// Any byte string either decodes or is rejected with a classified error: no panic.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), valid_header in any::<bool>()) {
                let s = store();
                let mut input = bytes;
                if valid_header {
                    let fp = s.for_type("orders").unwrap().fingerprint;
                    let mut framed = vec![0xC3, 0x01];
                    framed.extend_from_slice(&fp);
                    framed.extend_from_slice(&input);
                    input = framed;
                }
                let _ = s.decode(&input);
            }
        }
    }
}
