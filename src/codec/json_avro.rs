//! Strict JSON ↔ Avro conversion of payloads.
//!
//! JSON payloads are converted to Avro by hand ([`json_to_avro`]) rather than through serde,
//! because the conversion must be strict (an unknown field is an error, not silently dropped)
//! and its errors must name the field that is wrong.

use std::collections::HashMap;

use apache_avro::schema::Name;
use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::Value as Json;

/// Avro value to JSON as the sinks store it: bytes and fixed become strings of their bytes
/// read as ISO-8859-1 (Avro's own JSON encoding), the rest maps one to one.
pub fn avro_to_json(value: Value) -> Result<Json, apache_avro::Error> {
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
        other => Json::try_from(other)?,
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
        (Schema::Bytes, Json::String(s)) => match latin1_bytes(s) {
            Ok(bytes) => Ok(Value::Bytes(bytes)),
            Err(e) => fail(e.to_string()),
        },
        (Schema::Fixed(f), Json::String(s)) => {
            let bytes = latin1_bytes(s).map_err(|e| (path.to_string(), e.to_string()))?;
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

/// A character of a `bytes` or `fixed` string above U+00FF.
#[derive(Debug, thiserror::Error)]
#[error("character {0:?} is not a byte (bytes are ISO-8859-1 strings)")]
struct NotAByte(char);

fn latin1_bytes(s: &str) -> Result<Vec<u8>, NotAByte> {
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).map_err(|_| NotAByte(c)))
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
