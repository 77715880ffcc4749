//! MongoDB change events (and snapshot documents) as dualsync events: the pure part of the
//! MongoDB source, kept apart so its rules are unit- and property-tested.
//!
//! - Key: the document's `_id` as a string that keeps its type (`super::mongo_key`; strings
//!   as themselves, other ids as canonical Extended JSON).
//! - Version: the operation's cluster time and its position in its transaction,
//!   `seconds << 31 | increment << 11 | position` ([`version_of`]). The changes of one
//!   multi-document transaction share its cluster time; the position orders them as the oplog
//!   does, so a document the transaction changed several times ends at its last change. This
//!   orders every change of the replica set in commit order, so apply's version guard works
//!   unchanged; snapshot documents read after time `T` get `version_of(T, 0) - 1`, below every
//!   change the stream delivers from `T` on.
//! - Payload: the full document without `_id` (the key carries it). For a collection with a
//!   schema it is [`simplified_json`] (validated against the schema); otherwise canonical
//!   Extended JSON in the generic envelope.

use base64::Engine;
use mongodb::bson::{Bson, Document, Timestamp};
use serde_json::{Map, Number, Value as Json};

use super::mongo_key::canonical_key;
use crate::codec::mongo::ChangeContext;
use crate::codec::OutboxEvent;
use crate::error::Error;

/// Namespace of the deterministic event ids (UUID v5 of the resume token): a change published
/// twice (after a crash) keeps its id, so consumers can de-duplicate on it.
const EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6473_796e_6d6f_6e67_6f5f_6368_616e_6765);

/// What happened to the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Replace,
    Delete,
    /// A document read by a snapshot.
    Snapshot,
    /// The current state of a document (or its absence) re-emitted by `verify --repair`.
    Repair,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Replace => "replace",
            Operation::Delete => "delete",
            Operation::Snapshot => "snapshot",
            Operation::Repair => "repair",
        }
    }
}

/// One change to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct MongoChange {
    /// The change stream's resume token (`_id` of the event); `None` for snapshot documents.
    pub token: Option<Document>,
    pub operation: Operation,
    pub database: String,
    pub collection: String,
    /// `documentKey._id`.
    pub id: Bson,
    pub full_document: Option<Document>,
    /// The pre-image (`fullDocumentBeforeChange`), where the collection keeps pre-images.
    pub document_before_change: Option<Document>,
    pub update_description: Option<Document>,
    pub cluster_time: Timestamp,
    /// Position among the changes of its transaction (0 outside one); set by the source.
    pub txn_index: u64,
    pub wall_time_micros: i64,
}

/// A change stream event the relay does not publish, or one that ends the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum NotPublished {
    /// `invalidate`: the stream cannot go on (database dropped or renamed).
    Invalidated,
    /// A DDL event (`drop`, `rename`, `dropDatabase`, `create`...): logged, not published.
    Ignored {
        operation: String,
        collection: String,
    },
}

/// Parses a raw change stream event.
pub fn parse_event(raw: &Document) -> Result<Result<MongoChange, NotPublished>, Error> {
    let missing = |operation, missing| Error::MalformedChange { operation, missing };
    let operation = raw
        .get_str("operationType")
        .map_err(|_| missing("change", "operationType"))?;
    let ns = raw.get_document("ns").ok();
    let collection = ns
        .and_then(|n| n.get_str("coll").ok())
        .unwrap_or_default()
        .to_string();
    let operation = match operation {
        "insert" => Operation::Insert,
        "update" => Operation::Update,
        "replace" => Operation::Replace,
        "delete" => Operation::Delete,
        "invalidate" => return Ok(Err(NotPublished::Invalidated)),
        other => {
            return Ok(Err(NotPublished::Ignored {
                operation: other.to_string(),
                collection,
            }))
        }
    };
    let token = raw
        .get_document("_id")
        .map_err(|_| missing("change", "a resume token (_id)"))?
        .clone();
    let id = raw
        .get_document("documentKey")
        .ok()
        .and_then(|k| k.get("_id"))
        .cloned()
        .ok_or_else(|| missing(operation.as_str(), "documentKey._id"))?;
    let cluster_time = raw
        .get_timestamp("clusterTime")
        .map_err(|_| missing("change", "clusterTime"))?;
    let wall_time_micros = raw
        .get_datetime("wallTime")
        .map(|d| d.timestamp_millis() * 1000)
        .unwrap_or(i64::from(cluster_time.time) * 1_000_000);
    Ok(Ok(MongoChange {
        token: Some(token),
        operation,
        database: ns
            .and_then(|n| n.get_str("db").ok())
            .unwrap_or_default()
            .to_string(),
        collection,
        id,
        full_document: raw.get_document("fullDocument").ok().cloned(),
        document_before_change: raw.get_document("fullDocumentBeforeChange").ok().cloned(),
        update_description: raw.get_document("updateDescription").ok().cloned(),
        cluster_time,
        txn_index: 0,
        wall_time_micros,
    }))
}

fn canonical_text(document: &Document) -> String {
    Bson::Document(document.clone())
        .into_canonical_extjson()
        .to_string()
}

/// Bits of a version below the increment: the position within a transaction.
const TXN_INDEX_BITS: u32 = 11;
/// Positions in one transaction ordered exactly; later ones share this one's version.
pub const MAX_TXN_INDEX: u64 = (1 << TXN_INDEX_BITS) - 1;
/// Increments in one second ordered exactly (oplog entries per second); later ones share it.
pub const MAX_INCREMENT: u32 = (1 << (31 - TXN_INDEX_BITS)) - 1;

/// The version of a change at `cluster_time`, `txn_index`-th of its transaction:
/// `seconds << 31 | increment << 11 | txn_index`. Increasing in (cluster time, position)
/// until the year 2106, for up to [`MAX_INCREMENT`] oplog entries per second and
/// [`MAX_TXN_INDEX`] + 1 changes per transaction. The seconds keep their place of the former
/// `seconds << 31 | increment`, so versions written before are still ordered against these.
pub fn version_of(cluster_time: Timestamp, txn_index: u64) -> i64 {
    let increment = cluster_time.increment.min(MAX_INCREMENT);
    (i64::from(cluster_time.time) << 31)
        | (i64::from(increment) << TXN_INDEX_BITS)
        | txn_index.min(MAX_TXN_INDEX) as i64
}

/// A document as plain JSON for a collection with an Avro schema (the MongoDB Kafka
/// connector's "simplified JSON"): ObjectId → hex string, date → RFC 3339 string, decimal →
/// string, binary → base64 string, timestamp → `{t, i}`, the rest as relaxed Extended JSON.
pub fn simplified_json(value: &Bson) -> Json {
    match value {
        Bson::Document(d) => Json::Object(
            d.iter()
                .map(|(k, v)| (k.clone(), simplified_json(v)))
                .collect::<Map<_, _>>(),
        ),
        Bson::Array(items) => Json::Array(items.iter().map(simplified_json).collect()),
        Bson::ObjectId(o) => Json::String(o.to_hex()),
        Bson::DateTime(d) => Json::String(
            d.try_to_rfc3339_string()
                .unwrap_or_else(|_| d.timestamp_millis().to_string()),
        ),
        Bson::Decimal128(d) => Json::String(d.to_string()),
        Bson::Binary(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(&b.bytes)),
        Bson::Int32(i) => Json::Number((*i).into()),
        Bson::Int64(i) => Json::Number((*i).into()),
        Bson::Double(f) => {
            Number::from_f64(*f).map_or_else(|| Json::String(f.to_string()), Json::Number)
        }
        Bson::Timestamp(t) => serde_json::json!({"t": t.time, "i": t.increment}),
        other => other.clone().into_relaxed_extjson(),
    }
}

/// The version of every document a snapshot starting at `start_at` reads: just below any
/// change the stream delivers from `start_at` on.
pub fn snapshot_version(start_at: Timestamp) -> i64 {
    version_of(start_at, 0) - 1
}

/// The version of a repair event for a document read after cluster time `at`: the highest
/// version of a change at `at`. Every change the document went through was committed at or
/// before `at`, so the repair wins over whatever the sink holds from them; any change after
/// `at` has a higher cluster time, so it wins over the repair.
pub fn repair_version(at: Timestamp) -> i64 {
    version_of(at, MAX_TXN_INDEX)
}

/// The cluster time a version was made from (the inverse of [`version_of`], up to the
/// position in the transaction); versions below 0 map to the zero time.
pub fn version_time(version: i64) -> Timestamp {
    let v = version.max(0);
    Timestamp {
        time: (v >> 31) as u32,
        increment: ((v >> TXN_INDEX_BITS) as u32) & MAX_INCREMENT,
    }
}

impl MongoChange {
    /// A document read by a snapshot that started at cluster time `start_at`.
    pub fn snapshot(
        database: &str,
        collection: &str,
        document: Document,
        start_at: Timestamp,
    ) -> Self {
        Self {
            token: None,
            operation: Operation::Snapshot,
            database: database.to_string(),
            collection: collection.to_string(),
            id: document.get("_id").cloned().unwrap_or(Bson::Null),
            full_document: Some(document),
            document_before_change: None,
            update_description: None,
            cluster_time: start_at,
            txn_index: 0,
            wall_time_micros: mongodb::bson::DateTime::now().timestamp_millis() * 1000,
        }
    }

    /// The state of `id` in `collection` as read after cluster time `at` (`None`: the document
    /// is gone), for `verify --repair`.
    pub fn repair(
        database: &str,
        collection: &str,
        id: Bson,
        document: Option<Document>,
        at: Timestamp,
    ) -> Self {
        Self {
            token: None,
            operation: Operation::Repair,
            database: database.to_string(),
            collection: collection.to_string(),
            id,
            full_document: document,
            document_before_change: None,
            update_description: None,
            cluster_time: at,
            txn_index: 0,
            wall_time_micros: mongodb::bson::DateTime::now().timestamp_millis() * 1000,
        }
    }

    /// The version it is published with: its cluster time and position in its transaction,
    /// for a snapshot document [`snapshot_version`], for a repair [`repair_version`].
    pub fn version(&self) -> i64 {
        match self.operation {
            Operation::Snapshot => snapshot_version(self.cluster_time),
            Operation::Repair => repair_version(self.cluster_time),
            _ => version_of(self.cluster_time, self.txn_index),
        }
    }

    /// Whether the event leaves no document behind: a delete, or an update whose document was
    /// gone when the server looked it up (`fullDocument: null`; its delete follows).
    pub fn is_removal(&self) -> bool {
        self.operation == Operation::Delete || self.full_document.is_none()
    }

    pub fn key(&self) -> String {
        canonical_key(&self.id)
    }

    /// The event as apply reads it; `typed` when the collection has a schema.
    pub fn to_event(&self, version: i64, typed: bool) -> OutboxEvent {
        let payload = if self.is_removal() {
            None
        } else {
            let mut document = self.full_document.clone().unwrap_or_default();
            document.remove("_id");
            let document = Bson::Document(document);
            Some(if typed {
                simplified_json(&document)
            } else {
                document.into_canonical_extjson()
            })
        };
        OutboxEvent {
            event_id: self.event_id(version),
            event_type: self.operation.as_str().to_string(),
            aggregate_type: self.collection.clone(),
            aggregate_id: self.key(),
            version,
            created_at_micros: self.wall_time_micros,
            payload,
        }
    }

    /// Stable across re-publication: from the resume token, or for a snapshot or repair
    /// document from (operation, collection, key, version).
    fn event_id(&self, version: i64) -> uuid::Uuid {
        let name = match &self.token {
            Some(token) => Bson::Document(token.clone())
                .into_canonical_extjson()
                .to_string(),
            None => format!(
                "{}/{}/{}/{version}",
                self.operation.as_str(),
                self.collection,
                self.key()
            ),
        };
        uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
    }

    /// The generic envelope's extra fields.
    pub fn context(&self) -> ChangeContext {
        let mut key = Document::new();
        key.insert("_id", self.id.clone());
        ChangeContext {
            database: self.database.clone(),
            collection: self.collection.clone(),
            document_key: Bson::Document(key).into_canonical_extjson().to_string(),
            update_description: self.update_description.as_ref().map(canonical_text),
            document_before_change: self.document_before_change.as_ref().map(canonical_text),
            cluster_time: (self.cluster_time.time, self.cluster_time.increment),
        }
    }

    /// The change as canonical Extended JSON, for the relay's dead-letter topic.
    pub fn to_dead_letter_json(&self) -> Json {
        let ejson = |d: &Option<Document>| {
            d.as_ref().map_or(Json::Null, |d| {
                Bson::Document(d.clone()).into_canonical_extjson()
            })
        };
        serde_json::json!({
            "operationType": self.operation.as_str(),
            "ns": {"db": self.database, "coll": self.collection},
            "documentKey": {"_id": self.id.clone().into_canonical_extjson()},
            "clusterTime": {"t": self.cluster_time.time, "i": self.cluster_time.increment},
            "resumeToken": ejson(&self.token),
            "fullDocument": ejson(&self.full_document),
            "updateDescription": ejson(&self.update_description),
            "fullDocumentBeforeChange": ejson(&self.document_before_change),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId, DateTime};
    use proptest::prelude::*;

    fn raw(op: &str, t: u32, i: u32) -> Document {
        doc! {
            "_id": {"_data": format!("{t}-{i}")},
            "operationType": op,
            "clusterTime": Timestamp { time: t, increment: i },
            "wallTime": DateTime::from_millis(1_000),
            "ns": {"db": "shop", "coll": "carts"},
            "documentKey": {"_id": ObjectId::parse_str("6b045d0eb6ebfed351ac9d18").unwrap()},
            "fullDocument": {"_id": ObjectId::parse_str("6b045d0eb6ebfed351ac9d18").unwrap(), "n": 1_i64},
        }
    }

    proptest! {
        /// (cluster time, position in the transaction) order is version order (the guard's
        /// premise), within the documented limits.
        #[test]
        fn version_preserves_cluster_time_and_transaction_order(
            a in (any::<u32>(), 0..=MAX_INCREMENT, 0..=MAX_TXN_INDEX),
            b in (any::<u32>(), 0..=MAX_INCREMENT, 0..=MAX_TXN_INDEX),
        ) {
            let (va, vb) = (
                version_of(Timestamp { time: a.0, increment: a.1 }, a.2),
                version_of(Timestamp { time: b.0, increment: b.1 }, b.2),
            );
            prop_assert_eq!(a.cmp(&b), va.cmp(&vb));
            prop_assert!(va >= 0);
            // Never below the former `seconds << 31 | increment` of the same cluster time.
            prop_assert!(va >= (i64::from(a.0) << 31) | i64::from(a.1));
        }

        /// The same change always gets the same event id; different tokens different ids.
        #[test]
        fn event_ids_are_stable(t in any::<u32>(), i in 0u32..1000) {
            let a = parse_event(&raw("insert", t, i)).unwrap().unwrap();
            let b = parse_event(&raw("insert", t, i + 1)).unwrap().unwrap();
            let v = version_of(a.cluster_time, 0);
            prop_assert_eq!(a.to_event(v, false).event_id, a.clone().to_event(v, false).event_id);
            prop_assert_ne!(a.to_event(v, false).event_id, b.to_event(v, false).event_id);
        }
    }

    #[test]
    fn events_strip_the_id_and_pick_the_payload_form() {
        let change = parse_event(&raw("insert", 10, 1)).unwrap().unwrap();
        assert_eq!(change.operation, Operation::Insert);
        let generic = change.to_event(5, false);
        assert_eq!(
            generic.aggregate_id,
            r#"{"$oid":"6b045d0eb6ebfed351ac9d18"}"#
        );
        assert_eq!(generic.aggregate_type, "carts");
        assert_eq!(
            generic.payload,
            Some(serde_json::json!({"n": {"$numberLong": "1"}}))
        );
        assert_eq!(
            change.to_event(5, true).payload,
            Some(serde_json::json!({"n": 1}))
        );
        assert_eq!(generic.created_at_micros, 1_000_000);
    }

    #[test]
    fn deletes_and_vanished_updates_carry_no_document() {
        let mut d = raw("delete", 10, 2);
        d.remove("fullDocument");
        assert!(parse_event(&d)
            .unwrap()
            .unwrap()
            .to_event(1, false)
            .is_delete());
        let mut u = raw("update", 10, 3);
        u.insert("fullDocument", Bson::Null);
        let update = parse_event(&u).unwrap().unwrap();
        assert!(update.is_removal());
        assert_eq!(update.to_event(1, true).event_type, "update");
    }

    #[test]
    fn ddl_and_invalidate_are_not_published() {
        assert_eq!(
            parse_event(&doc! {"operationType": "invalidate"}).unwrap(),
            Err(NotPublished::Invalidated)
        );
        assert!(matches!(
            parse_event(&doc! {"operationType": "drop", "ns": {"db": "s", "coll": "c"}}).unwrap(),
            Err(NotPublished::Ignored { .. })
        ));
        assert!(parse_event(&doc! {"_id": {"_data": "x"}}).is_err());
    }

    #[test]
    fn simplified_json_flattens_bson_types() {
        let oid = ObjectId::parse_str("6b045d0eb6ebfed351ac9d18").unwrap();
        let d = Bson::Document(doc! {
            "o": oid, "at": DateTime::from_millis(0), "n": 3_i64, "f": 1.5, "s": "x", "a": [1, "y"],
        });
        assert_eq!(
            simplified_json(&d),
            serde_json::json!({"o": "6b045d0eb6ebfed351ac9d18", "at": "1970-01-01T00:00:00Z", "n": 3, "f": 1.5, "s": "x", "a": [1, "y"]})
        );
    }

    #[test]
    fn repair_versions_win_over_changes_up_to_their_time_and_lose_to_later_ones() {
        let at = Timestamp {
            time: 1_700_000_000,
            increment: 7,
        };
        let repair = repair_version(at);
        assert!(repair >= version_of(at, 5));
        assert!(repair > snapshot_version(at));
        assert!(
            repair
                < version_of(
                    Timestamp {
                        time: at.time,
                        increment: 8
                    },
                    0
                )
        );
        assert_eq!(version_time(version_of(at, 3)), at);
        assert_eq!(
            version_time(-1),
            Timestamp {
                time: 0,
                increment: 0
            }
        );
    }
}
