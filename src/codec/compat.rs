//! Which payload field breaks compatibility, said by dualsync itself. A registry judges the
//! whole envelope, and Java Avro's checker (Apicurio's, Confluent's) stops at the payload's
//! union: "reader union lacking writer type: RECORD at /fields/7/type/1", never naming the
//! field inside the record. Comparing the two payload records directly names it.

use apache_avro::schema::RecordSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

/// The record inside an envelope's `payload` union, if `envelope` is one of dualsync's.
fn payload_record(envelope: &Schema) -> Option<&Schema> {
    let Schema::Record(RecordSchema { fields, .. }) = envelope else {
        return None;
    };
    let payload = fields.iter().find(|f| f.name == "payload")?;
    let Schema::Union(union) = &payload.schema else {
        return None;
    };
    union
        .variants()
        .iter()
        .find(|s| matches!(s, Schema::Record(_)))
}

/// Why a reader with payload schema `reader_payload` cannot read what was written with the
/// envelope `writer_envelope` (JSON text, e.g. a subject's latest version): the checker's
/// error chain, naming the field. `None` when it can, or when `writer_envelope` is not a
/// dualsync envelope.
pub fn payload_breaks(writer_envelope: &str, reader_payload: &Schema) -> Option<String> {
    let writer = Schema::parse_str(writer_envelope).ok()?;
    let writer_payload = payload_record(&writer)?;
    let error = SchemaCompatibility::can_read(writer_payload, reader_payload).err()?;
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SchemaStore;

    fn envelope(fields: &str) -> (String, Schema) {
        let payload = format!(r#"{{"type":"record","name":"Customer","fields":[{fields}]}}"#);
        let mut store = SchemaStore::default();
        store.add("customers", &payload).unwrap();
        let schema = store.for_type("customers").unwrap();
        (schema.registry_json.clone(), schema.payload.clone())
    }

    #[test]
    fn names_the_payload_field_a_reader_cannot_fill() {
        let (old, _) = envelope(r#"{"name":"id","type":"string"}"#);
        let (_, added_required) =
            envelope(r#"{"name":"id","type":"string"},{"name":"points","type":"int"}"#);
        let why = payload_breaks(&old, &added_required).expect("incompatible");
        assert!(why.contains("'points'"), "{why}");

        let (_, added_optional) =
            envelope(r#"{"name":"id","type":"string"},{"name":"points","type":"int","default":0}"#);
        assert_eq!(payload_breaks(&old, &added_optional), None);
        assert_eq!(payload_breaks(r#""string""#, &added_required), None);
    }
}
