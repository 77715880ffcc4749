//! The specification's Parsing Canonical Form (PCF) of an Avro schema and its CRC-64-AVRO
//! fingerprint: what single-object encoding puts on the wire, so that any standard reader
//! (Java's `SchemaNormalization`, fastavro, ...) finds the writer schema by it.
//!
//! apache-avro's own `canonical_form` (0.21, and still in 0.22) keeps a primitive that carries
//! a `logicalType` as `{"type":"long"}` where the specification and every other implementation
//! write `"long"`, and keeps `order`, `precision` and `scale`; its fingerprints of such schemas
//! match nobody else's. Only the canonical text is done here: the CRC-64-AVRO digest is the
//! crate's, and schemas are validated by the crate's parser before they get here.
//!
//! Spec: <https://avro.apache.org/docs/1.12.0/specification/#parsing-canonical-form-for-schemas>

use std::collections::HashSet;

use apache_avro::rabin::Rabin;
use digest::Digest;
use serde_json::Value as Json;

/// The type names that are never namespaced.
const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// What makes a schema's JSON not a schema the canonical form can be written of, naming the
/// type or field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("schema object without a valid type: {0}")]
    NoType(String),
    #[error("not a schema: {0}")]
    NotASchema(String),
    #[error("{kind} without a name")]
    Unnamed { kind: &'static str },
    #[error("type {0} is defined twice")]
    DefinedTwice(String),
    /// A named type without what its kind needs (`record x without fields`).
    #[error("{kind} {name} without {what}")]
    Incomplete {
        kind: &'static str,
        name: String,
        what: &'static str,
    },
    #[error("a field of {0} has no name")]
    UnnamedField(String),
    #[error("field {record}.{field} has no type")]
    UntypedField { record: String, field: String },
    #[error("a symbol of {0} is not a string")]
    BadSymbol(String),
    /// An array without `items` or a map without `values`.
    #[error("{kind} without {key}")]
    NoItems {
        kind: &'static str,
        key: &'static str,
    },
}

/// The Parsing Canonical Form of a (valid) schema given as JSON.
pub fn parsing_canonical_form(schema: &Json) -> Result<String, CanonicalError> {
    let mut pcf = Pcf::default();
    pcf.write(schema, "")?;
    Ok(pcf.out)
}

/// CRC-64-AVRO of the Parsing Canonical Form, in the byte order single-object encoding writes
/// it (little-endian).
pub fn fingerprint(schema: &Json) -> Result<[u8; 8], CanonicalError> {
    Ok(fingerprint_of_form(&parsing_canonical_form(schema)?))
}

/// CRC-64-AVRO of an already canonical schema text.
pub fn fingerprint_of_form(canonical: &str) -> [u8; 8] {
    Rabin::digest(canonical.as_bytes()).into()
}

#[derive(Default)]
struct Pcf {
    /// Full names defined so far: a later reference by short name resolves against them.
    defined: HashSet<String>,
    out: String,
}

impl Pcf {
    /// Writes `schema`, met inside namespace `ns` ("" = none).
    fn write(&mut self, schema: &Json, ns: &str) -> Result<(), CanonicalError> {
        match schema {
            Json::String(name) => {
                let name = self.reference(name, ns);
                self.string(&name);
                Ok(())
            }
            Json::Array(branches) => {
                self.out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.write(branch, ns)?;
                }
                self.out.push(']');
                Ok(())
            }
            Json::Object(map) => match map.get("type") {
                // [PRIMITIVES] and [STRIP]: `{"type":"long","logicalType":...}` is "long".
                Some(Json::String(t)) => match t.as_str() {
                    "record" | "error" => self.named(map, ns, "record"),
                    "enum" => self.named(map, ns, "enum"),
                    "fixed" => self.named(map, ns, "fixed"),
                    "array" => self.container(map, ns, "array", "items"),
                    "map" => self.container(map, ns, "map", "values"),
                    // A primitive, or a named type referred to in object form.
                    _ => self.write(&Json::String(t.clone()), ns),
                },
                // `{"type": {...}}` wraps a schema.
                Some(inner @ (Json::Object(_) | Json::Array(_))) => self.write(inner, ns),
                _ => Err(CanonicalError::NoType(schema.to_string())),
            },
            other => Err(CanonicalError::NotASchema(other.to_string())),
        }
    }

    /// [FULLNAMES] for a reference: primitives stay as they are; a short name is looked up in
    /// the enclosing namespace first, then in the null namespace (as Java's parser does).
    fn reference(&self, name: &str, ns: &str) -> String {
        if PRIMITIVES.contains(&name) || name.contains('.') || ns.is_empty() {
            return name.to_string();
        }
        let qualified = format!("{ns}.{name}");
        if !self.defined.contains(&qualified) && self.defined.contains(name) {
            return name.to_string();
        }
        qualified
    }

    /// A record, enum or fixed: `{"name":<fullname>,"type":...,<fields|symbols|size>}`.
    fn named(
        &mut self,
        map: &serde_json::Map<String, Json>,
        ns: &str,
        kind: &'static str,
    ) -> Result<(), CanonicalError> {
        let name = map
            .get("name")
            .and_then(Json::as_str)
            .ok_or(CanonicalError::Unnamed { kind })?;
        let full = match (name.contains('.'), map.get("namespace")) {
            (true, _) => name.to_string(),
            (false, Some(Json::String(n))) if n.is_empty() => name.to_string(),
            (false, Some(Json::String(n))) => format!("{n}.{name}"),
            (false, _) if ns.is_empty() => name.to_string(),
            (false, _) => format!("{ns}.{name}"),
        };
        if !self.defined.insert(full.clone()) {
            return Err(CanonicalError::DefinedTwice(full));
        }
        let own_ns = full.rsplit_once('.').map_or("", |(n, _)| n).to_string();
        let incomplete = |what| CanonicalError::Incomplete {
            kind,
            name: full.clone(),
            what,
        };
        self.out.push_str("{\"name\":");
        self.string(&full);
        self.out.push_str(",\"type\":");
        self.string(kind);
        match kind {
            "record" => {
                self.out.push_str(",\"fields\":[");
                let fields = map
                    .get("fields")
                    .and_then(Json::as_array)
                    .ok_or_else(|| incomplete("fields"))?;
                for (i, field) in fields.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    let field_name = field
                        .get("name")
                        .and_then(Json::as_str)
                        .ok_or_else(|| CanonicalError::UnnamedField(full.clone()))?;
                    let field_type =
                        field
                            .get("type")
                            .ok_or_else(|| CanonicalError::UntypedField {
                                record: full.clone(),
                                field: field_name.to_string(),
                            })?;
                    self.out.push_str("{\"name\":");
                    self.string(field_name);
                    self.out.push_str(",\"type\":");
                    self.write(field_type, &own_ns)?;
                    self.out.push('}');
                }
                self.out.push(']');
            }
            "enum" => {
                self.out.push_str(",\"symbols\":[");
                let symbols = map
                    .get("symbols")
                    .and_then(Json::as_array)
                    .ok_or_else(|| incomplete("symbols"))?;
                for (i, symbol) in symbols.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    let symbol = symbol
                        .as_str()
                        .ok_or_else(|| CanonicalError::BadSymbol(full.clone()))?;
                    self.string(symbol);
                }
                self.out.push(']');
            }
            _ => {
                // [INTEGERS]: no quotes, no leading zeros.
                let size = match map.get("size") {
                    Some(Json::Number(n)) => n.as_u64(),
                    Some(Json::String(s)) => s.parse::<u64>().ok(),
                    _ => None,
                }
                .ok_or_else(|| incomplete("a valid size"))?;
                self.out.push_str(&format!(",\"size\":{size}"));
            }
        }
        self.out.push('}');
        Ok(())
    }

    /// An array or a map: `{"type":"array","items":...}` / `{"type":"map","values":...}`.
    fn container(
        &mut self,
        map: &serde_json::Map<String, Json>,
        ns: &str,
        kind: &'static str,
        key: &'static str,
    ) -> Result<(), CanonicalError> {
        let inner = map.get(key).ok_or(CanonicalError::NoItems { kind, key })?;
        self.out
            .push_str(&format!("{{\"type\":\"{kind}\",\"{key}\":"));
        self.write(inner, ns)?;
        self.out.push('}');
        Ok(())
    }

    /// [STRINGS]: a JSON string literal with only what JSON requires escaped.
    fn string(&mut self, s: &str) {
        self.out
            .push_str(&serde_json::to_string(s).expect("a string serializes"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pcf(schema: Json) -> String {
        parsing_canonical_form(&schema).unwrap()
    }

    #[test]
    fn logical_types_reduce_to_their_primitive() {
        assert_eq!(
            pcf(json!({"type": "long", "logicalType": "timestamp-micros"})),
            r#""long""#
        );
        assert_eq!(
            pcf(json!({"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2})),
            r#""bytes""#
        );
    }

    #[test]
    fn names_are_full_and_attributes_stripped_and_ordered() {
        let schema = json!({
            "fields": [
                {"type": {"symbols": ["A"], "type": "enum", "name": "E", "doc": "d"}, "name": "e", "order": "descending"},
                {"name": "again", "type": "E", "default": "A"},
                {"name": "f", "type": {"type": "fixed", "size": "016", "name": "x.F", "aliases": ["G"]}},
                {"name": "m", "type": {"values": {"type": "int"}, "type": "map"}}
            ],
            "namespace": "a.b", "name": "R", "type": "record", "doc": "why"
        });
        assert_eq!(
            pcf(schema),
            concat!(
                r#"{"name":"a.b.R","type":"record","fields":["#,
                r#"{"name":"e","type":{"name":"a.b.E","type":"enum","symbols":["A"]}},"#,
                r#"{"name":"again","type":"a.b.E"},"#,
                r#"{"name":"f","type":{"name":"x.F","type":"fixed","size":16}},"#,
                r#"{"name":"m","type":{"type":"map","values":"int"}}]}"#
            )
        );
    }

    #[test]
    fn a_short_name_falls_back_to_the_null_namespace() {
        let schema = json!({"type": "record", "name": "R", "namespace": "n", "fields": [
            {"name": "a", "type": {"type": "enum", "name": "E", "namespace": "", "symbols": ["X"]}},
            {"name": "b", "type": "E"}
        ]});
        assert!(pcf(schema).ends_with(r#"{"name":"b","type":"E"}]}"#));
    }
}
