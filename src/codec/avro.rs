//! The schema store (every event schema from `schemas/`, by aggregate type and by fingerprint)
//! and reading single-object frames (`C3 01` + CRC-64-AVRO fingerprint + datum).
//!
//! The envelope itself, and writing an event (datum and frame in one call), is
//! [`super::envelope`]; the strict payload conversion is [`super::json_avro`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::envelope::{build_event_schema, decode_datum, EventSchema};
pub use super::SINGLE_OBJECT_MAGIC;
use super::{
    DecodeError, EncodeError, Framing, OutboxEvent, SINGLE_OBJECT_HEADER_LEN as HEADER_LEN,
};

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

    /// Keeps every fingerprint `older` knows and this store does not, so events written with
    /// a schema since replaced in the folder still decode (as written) after a reload.
    pub fn keep_fingerprints_of(&mut self, older: &SchemaStore) {
        for (fingerprint, schema) in &older.by_fingerprint {
            self.by_fingerprint
                .entry(*fingerprint)
                .or_insert_with(|| schema.clone());
        }
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
        self.encode_generic_framed(event, change, Framing::SingleObject)
    }

    /// A MongoDB change in the generic envelope, framed as `framing` says.
    pub fn encode_generic_framed(
        &self,
        event: &OutboxEvent,
        change: &super::mongo::ChangeContext,
        framing: Framing,
    ) -> Result<Vec<u8>, EncodeError> {
        let datum = super::mongo::encode_generic_datum(&self.generic, event, change)?;
        Ok(self.generic.frame(framing, &datum))
    }

    /// Encodes an event in single-object encoding; `payload` is validated strictly against the
    /// aggregate's schema.
    pub fn encode(&self, event: &OutboxEvent) -> Result<Vec<u8>, EncodeError> {
        self.encode_framed(event, Framing::SingleObject)
    }

    /// [`EventSchema::encode`] with the schema of the event's aggregate type.
    pub fn encode_framed(
        &self,
        event: &OutboxEvent,
        framing: Framing,
    ) -> Result<Vec<u8>, EncodeError> {
        self.schema_for(event)?.encode(event, framing)
    }

    /// The bare Avro datum of an event (no framing) and the schema it was written with.
    pub fn encode_datum(
        &self,
        event: &OutboxEvent,
    ) -> Result<(Arc<EventSchema>, Vec<u8>), EncodeError> {
        let schema = self.schema_for(event)?;
        Ok((schema.clone(), schema.encode_datum(event)?))
    }

    /// The schema an event is written with: its aggregate type's.
    pub fn schema_for(&self, event: &OutboxEvent) -> Result<&Arc<EventSchema>, EncodeError> {
        self.for_type(&event.aggregate_type)
            .ok_or_else(|| EncodeError::NoSchema(event.aggregate_type.clone()))
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value as Json};

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
