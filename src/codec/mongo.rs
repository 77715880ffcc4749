//! The generic envelope of MongoDB change events.
//!
//! A collection with a `<collection>.avsc` in `schemas/` is published in the ordinary envelope
//! around that schema. Any other collection's changes use this one fixed envelope, in which the
//! document travels as canonical Extended JSON text (MongoDB's own lossless JSON form), so a
//! collection needs no schema to be replicated and no BSON type is lost on the way: consumers
//! parse it with any MongoDB driver's Extended JSON reader. Apply turns it into relaxed
//! Extended JSON for the sinks (ObjectId, dates, decimals and binaries keep their type in a
//! MongoDB sink; PostgreSQL gets readable JSON).

use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::Value as Json;

use super::envelope::{envelope_head, event_schema_from_envelope, EventSchema};
use super::{EncodeError, OutboxEvent};

/// Full name of the generic envelope record.
pub const GENERIC_ENVELOPE_NAME: &str = "dualsync.mongo.ChangeEvent";

/// Label of the generic envelope where an aggregate type would be named.
pub const GENERIC_LABEL: &str = "(mongodb change, generic envelope)";

/// Where a change happened, for the generic envelope's extra fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeContext {
    pub database: String,
    pub collection: String,
    /// The change's `documentKey` as canonical Extended JSON.
    pub document_key: String,
    /// The change's `updateDescription` as canonical Extended JSON (updates only).
    pub update_description: Option<String>,
    /// The pre-image as canonical Extended JSON, where the collection keeps pre-images.
    pub document_before_change: Option<String>,
    /// The operation's cluster time `(seconds, increment)`.
    pub cluster_time: (u32, u32),
}

/// The generic envelope: the ordinary envelope's fields (so the same consumers read both),
/// with the payload as a string, plus where the change happened.
pub fn generic_envelope_json() -> Json {
    serde_json::from_str(GENERIC_ENVELOPE_AVSC).expect("the generic envelope file is JSON")
}

/// The generic envelope as shipped to consumers (`schemas/envelope/mongo-change.avsc`).
pub const GENERIC_ENVELOPE_AVSC: &str = include_str!("../../schemas/envelope/mongo-change.avsc");

pub(super) fn generic_event_schema() -> EventSchema {
    event_schema_from_envelope(GENERIC_LABEL, generic_envelope_json(), Schema::String)
        .expect("the generic envelope is a valid schema")
}

/// The generic envelope datum of `event`, whose payload is canonical Extended JSON.
pub(crate) fn encode_generic_datum(
    schema: &EventSchema,
    event: &OutboxEvent,
    change: &ChangeContext,
) -> Result<Vec<u8>, EncodeError> {
    let string_or_null = |s: Option<String>| match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s))),
    };
    let mut fields = envelope_head(event);
    fields.extend([
        (
            "payload".into(),
            string_or_null(event.payload.as_ref().map(Json::to_string)),
        ),
        ("database".into(), Value::String(change.database.clone())),
        (
            "collection".into(),
            Value::String(change.collection.clone()),
        ),
        (
            "document_key".into(),
            Value::String(change.document_key.clone()),
        ),
        (
            "update_description".into(),
            string_or_null(change.update_description.clone()),
        ),
        (
            "document_before_change".into(),
            string_or_null(change.document_before_change.clone()),
        ),
        (
            "cluster_time_seconds".into(),
            Value::Long(change.cluster_time.0.into()),
        ),
        (
            "cluster_time_increment".into(),
            Value::Long(change.cluster_time.1.into()),
        ),
    ]);
    let record = Value::Record(fields);
    schema
        .write_datum(&record)
        .map_err(|e| EncodeError::SchemaViolation {
            aggregate_type: event.aggregate_type.clone(),
            path: "$".into(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::envelope::relaxed_from_canonical;
    use crate::codec::SchemaStore;
    use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Decimal128};
    use serde_json::json;

    fn change() -> ChangeContext {
        ChangeContext {
            database: "shop".into(),
            collection: "carts".into(),
            document_key: r#"{"_id":{"$oid":"6b045d0eb6ebfed351ac9d18"}}"#.into(),
            update_description: Some(r#"{"updatedFields":{"n":{"$numberInt":"2"}}}"#.into()),
            document_before_change: None,
            cluster_time: (1_795_448_083, 9),
        }
    }

    #[test]
    fn generic_envelope_round_trips_bson_types_through_relaxed_json() {
        let id = ObjectId::parse_str("6b045d0eb6ebfed351ac9d18").unwrap();
        let when = DateTime::from_millis(1_795_448_083_000);
        let document = doc! {
            "owner": id, "at": when, "n": 2_i64, "price": "1.10".parse::<Decimal128>().unwrap(), "ratio": 0.5,
        };
        let event = OutboxEvent {
            event_id: uuid::Uuid::nil(),
            event_type: "update".into(),
            aggregate_type: "carts".into(),
            aggregate_id: "6b045d0eb6ebfed351ac9d18".into(),
            version: 42,
            created_at_micros: 7,
            payload: Some(Bson::Document(document.clone()).into_canonical_extjson()),
        };
        let store = SchemaStore::default();
        let bytes = store.encode_generic(&event, &change()).unwrap();
        let back = store.decode(&bytes).unwrap();
        assert_eq!(back.aggregate_id, event.aggregate_id);
        assert_eq!(back.version, 42);
        let payload = back.payload.unwrap();
        // What a MongoDB sink makes of it: the same BSON types (relaxed JSON keeps them),
        // except that a small int64 comes back as int32.
        let Bson::Document(restored) = Bson::try_from(payload.clone()).unwrap() else {
            panic!("not a document")
        };
        assert_eq!(restored.get_object_id("owner").unwrap(), id);
        assert_eq!(restored.get_datetime("at").unwrap(), &when);
        assert_eq!(
            restored.get("price"),
            Some(&Bson::Decimal128("1.10".parse().unwrap()))
        );
        assert_eq!(payload["n"], json!(2));
        assert_eq!(payload["ratio"], json!(0.5));
    }

    #[test]
    fn generic_delete_has_no_payload_and_bad_text_is_refused() {
        let event = OutboxEvent {
            event_id: uuid::Uuid::nil(),
            event_type: "delete".into(),
            aggregate_type: "carts".into(),
            aggregate_id: "k".into(),
            version: 1,
            created_at_micros: 0,
            payload: None,
        };
        let store = SchemaStore::default();
        let back = store
            .decode(&store.encode_generic(&event, &change()).unwrap())
            .unwrap();
        assert!(back.is_delete());
        assert!(relaxed_from_canonical("[1]").is_err());
        assert!(relaxed_from_canonical("{").is_err());
    }
}
