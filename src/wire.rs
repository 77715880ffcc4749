//! How event values are framed on the topics, and the schema-registry state behind it.
//!
//! Writing: with `[schema_registry]`, the relay registers (or, with `auto_register = false`,
//! only looks up) each aggregate's envelope under the TopicNameStrategy subject
//! `<topic>-value` once at start, then frames every value as `00` + the 4-byte big-endian id +
//! the datum, as Confluent's serializers do, so any Confluent-compatible consumer reads it.
//! Without a registry it writes Avro single-object encoding.
//!
//! Reading: both framings, always. A Confluent frame's writer schema is fetched by id (once,
//! then cached: ids are immutable) and resolved against the local schema of the same record
//! name when there is one, so a compatible evolution on the writing side keeps decoding.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use apache_avro::Schema;
use tokio_util::sync::CancellationToken;

use crate::codec::envelope::{decode_datum, EventSchema};
use crate::codec::mongo::ChangeContext;
use crate::codec::registry::{RegistryClient, RegistryError};
pub use crate::codec::CONFLUENT_MAGIC;
use crate::codec::{
    DecodeError, EncodeError, Framing, OutboxEvent, SchemaStore, CONFLUENT_HEADER_LEN,
    SINGLE_OBJECT_MAGIC,
};
use crate::config::Config;
use crate::error::{Endpoint, Error};
use crate::retry::retry_transient;

/// How often an unknown fingerprint may make the codec read the schemas folder again.
const SCHEMA_RELOAD_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// A writer schema fetched from the registry, with the local reader it resolves against.
struct WriterSchema {
    label: String,
    writer: Schema,
    /// `None` when the writer is the local schema itself (no resolution needed) or unknown
    /// locally (decoded as written).
    reader: Option<Arc<EventSchema>>,
}

pub struct EventCodec {
    store: RwLock<Arc<SchemaStore>>,
    /// The folder the local schemas came from: read again when a single-object frame names a
    /// fingerprint none of them has (a schema deployed after this process started), instead of
    /// dead-lettering every event written with it.
    reload_from: Option<PathBuf>,
    last_reload: Mutex<Option<Instant>>,
    /// When the last read of the folder that succeeded started: an unknown fingerprint is
    /// dead-lettered only when a read that started after its message arrived did not find it.
    last_loaded: Mutex<Option<Instant>>,
    registry: Option<RegistryClient>,
    /// Registry id of each aggregate type's envelope; `Some` once prepared for publishing with
    /// a registry, and then every value is written in the Confluent wire format.
    publish_ids: Option<Mutex<HashMap<String, u32>>>,
    writers: Mutex<HashMap<u32, Arc<WriterSchema>>>,
}

impl EventCodec {
    /// A codec over the local schemas, resolving Confluent frames through `registry` if given.
    pub fn new(store: Arc<SchemaStore>, registry: Option<RegistryClient>) -> Self {
        Self {
            store: RwLock::new(store),
            reload_from: None,
            last_reload: Mutex::new(None),
            last_loaded: Mutex::new(None),
            registry,
            publish_ids: None,
            writers: Mutex::new(HashMap::new()),
        }
    }

    /// A reading codec for `config` (apply, dead-letter tools).
    pub fn for_reading(config: &Config, store: Arc<SchemaStore>) -> Result<Self, Error> {
        let registry = match &config.schema_registry {
            Some(r) => {
                Some(RegistryClient::new(r).map_err(|e| Error::Misconfigured(e.to_string()))?)
            }
            None => None,
        };
        let mut codec = Self::new(store, registry);
        codec.reload_from = Some(config.encoding.schemas_dir.clone());
        Ok(codec)
    }

    /// A writing codec for `config` (relay): with a registry, registers or looks up every local
    /// schema first, waiting out an unreachable registry. `None` when cancelled meanwhile.
    pub async fn for_publishing(
        config: &Config,
        store: Arc<SchemaStore>,
        cancel: &CancellationToken,
    ) -> Result<Option<Self>, Error> {
        let mut codec = Self::for_reading(config, store)?;
        if codec.registry.is_none() {
            return Ok(Some(codec));
        }
        let ids =
            retry_transient(Endpoint::Registry, cancel, || codec.register_all(config)).await?;
        Ok(ids.map(|ids| {
            codec.publish_ids = Some(Mutex::new(ids));
            codec
        }))
    }

    /// The TopicNameStrategy subject of an aggregate type's values.
    pub fn subject(config: &Config, aggregate_type: &str) -> String {
        format!("{}-value", config.kafka.topic_for(aggregate_type))
    }

    pub fn store(&self) -> Arc<SchemaStore> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the schemas folder again (at most once a second), keeping the fingerprints
    /// already known; `true` when the store was replaced.
    fn reload_schemas(&self) -> bool {
        let Some(dir) = &self.reload_from else {
            return false;
        };
        let started = Instant::now();
        {
            let mut last = self.last_reload.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < SCHEMA_RELOAD_MIN_INTERVAL) {
                return false;
            }
            *last = Some(started);
        }
        match SchemaStore::load_dir(dir) {
            Ok(mut fresh) => {
                *self.last_loaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
                let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
                fresh.keep_fingerprints_of(&store);
                tracing::info!(folder = %dir.display(), "schemas folder read again for an unknown fingerprint");
                *store = Arc::new(fresh);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the schemas folder again; keeping the schemas loaded");
                false
            }
        }
    }

    pub fn registry(&self) -> Option<&RegistryClient> {
        self.registry.as_ref()
    }

    /// Registers (or looks up) every local schema: the registry id per aggregate type.
    async fn register_all(&self, config: &Config) -> Result<HashMap<String, u32>, Error> {
        let registry = self.registry.as_ref().expect("checked by the caller");
        let auto_register = config
            .schema_registry
            .as_ref()
            .is_none_or(|r| r.auto_register);
        let store = self.store();
        let mut types: Vec<&str> = store.aggregate_types().collect();
        types.sort_unstable();
        let mut ids = HashMap::new();
        for aggregate_type in types {
            let schema = store.for_type(aggregate_type).expect("listed");
            let subject = Self::subject(config, aggregate_type);
            let id = register_or_look_up(registry, &subject, schema, auto_register).await?;
            tracing::info!(aggregate_type, subject, id, "schema registered");
            ids.insert(aggregate_type.to_string(), id);
        }
        Ok(ids)
    }

    /// Encodes an event; the payload is validated strictly against the aggregate's schema.
    /// One call into the codec, datum and frame together.
    pub fn encode(&self, event: &OutboxEvent) -> Result<Vec<u8>, EncodeError> {
        let framing = self.framing(event)?;
        self.store().schema_for(event)?.encode(event, framing)
    }

    /// Encodes a MongoDB change: in its collection's schema when `schemas/` has one (`change`
    /// unused), else in the generic envelope (the payload is then canonical Extended JSON).
    pub fn encode_change(
        &self,
        event: &OutboxEvent,
        change: &ChangeContext,
    ) -> Result<Vec<u8>, EncodeError> {
        if self.store().for_type(&event.aggregate_type).is_some() {
            return self.encode(event);
        }
        self.store()
            .encode_generic_framed(event, change, self.framing(event)?)
    }

    /// How `event` is framed: with the registry id of its aggregate type when publishing
    /// through a registry, else single-object.
    fn framing(&self, event: &OutboxEvent) -> Result<Framing, EncodeError> {
        let Some(ids) = &self.publish_ids else {
            return Ok(Framing::SingleObject);
        };
        let ids = ids.lock().expect("not poisoned");
        let id = ids
            .get(&event.aggregate_type)
            .ok_or_else(|| EncodeError::NoSchema(event.aggregate_type.clone()))?;
        Ok(Framing::Confluent(*id))
    }

    /// With a registry, registers (or looks up) the schema `aggregate_type`'s values are
    /// written with, unless done already: its own, or the generic MongoDB envelope. For
    /// sources whose aggregate types appear as they go (MongoDB collections).
    pub async fn ensure_registered(
        &self,
        config: &Config,
        aggregate_type: &str,
    ) -> Result<(), Error> {
        let (Some(ids), Some(registry)) = (&self.publish_ids, &self.registry) else {
            return Ok(());
        };
        if ids
            .lock()
            .expect("not poisoned")
            .contains_key(aggregate_type)
        {
            return Ok(());
        }
        let store = self.store();
        let schema = store
            .for_type(aggregate_type)
            .unwrap_or(store.generic())
            .clone();
        let subject = Self::subject(config, aggregate_type);
        let auto_register = config
            .schema_registry
            .as_ref()
            .is_none_or(|r| r.auto_register);
        let id = register_or_look_up(registry, &subject, &schema, auto_register).await?;
        tracing::info!(aggregate_type, subject, id, "schema registered");
        ids.lock()
            .expect("not poisoned")
            .insert(aggregate_type.to_string(), id);
        Ok(())
    }

    /// [`decode`](Self::decode) for apply, of a message `received` at that instant: a
    /// single-object frame with an unknown fingerprint is dead-lettered only once the schemas
    /// folder was read (successfully) after the message arrived and still lacks it. While the
    /// read is rate-limited or fails, it is [`Error::SchemaPending`] (retried): schema skew
    /// during a deploy waits for the new schema instead of dead-lettering its events.
    pub async fn decode_received(
        &self,
        bytes: &[u8],
        received: Instant,
    ) -> Result<OutboxEvent, Error> {
        match self.decode(bytes).await {
            Err(Error::Decode(DecodeError::UnknownFingerprint(fingerprint)))
                if self.reload_from.is_some() =>
            {
                let read_since = self
                    .last_loaded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some_and(|t| t >= received);
                if read_since {
                    Err(DecodeError::UnknownFingerprint(fingerprint).into())
                } else {
                    Err(Error::SchemaPending { fingerprint })
                }
            }
            decoded => decoded,
        }
    }

    /// Decodes a value in either framing. Errors are [`Error::Decode`] (permanent for this
    /// message) or [`Error::Registry`] (the registry could not answer: retry or stop).
    pub async fn decode(&self, bytes: &[u8]) -> Result<OutboxEvent, Error> {
        match bytes.first() {
            None => Err(DecodeError::Empty.into()),
            Some(&CONFLUENT_MAGIC) => self.decode_confluent(bytes).await,
            Some(&b) if b == SINGLE_OBJECT_MAGIC[0] => match self.store().decode(bytes) {
                Err(DecodeError::UnknownFingerprint(_)) if self.reload_schemas() => {
                    Ok(self.store().decode(bytes)?)
                }
                decoded => Ok(decoded?),
            },
            Some(&b) => Err(DecodeError::BadMagic(b).into()),
        }
    }

    async fn decode_confluent(&self, bytes: &[u8]) -> Result<OutboxEvent, Error> {
        if bytes.len() < CONFLUENT_HEADER_LEN {
            return Err(DecodeError::TooShort(bytes.len()).into());
        }
        let id = u32::from_be_bytes(bytes[1..CONFLUENT_HEADER_LEN].try_into().expect("4 bytes"));
        let writer = self.writer(id).await?;
        let reader = writer.reader.as_ref().map(|r| &r.envelope);
        Ok(decode_datum(
            &writer.label,
            &writer.writer,
            reader,
            &bytes[CONFLUENT_HEADER_LEN..],
        )?)
    }

    async fn writer(&self, id: u32) -> Result<Arc<WriterSchema>, Error> {
        if let Some(w) = self.writers.lock().expect("not poisoned").get(&id) {
            return Ok(w.clone());
        }
        let registry = self.registry.as_ref().ok_or(DecodeError::NoRegistry(id))?;
        let registered = registry
            .schema_by_id(id)
            .await?
            .ok_or(DecodeError::UnknownSchemaId(id))?;
        let unusable = |reason: String| DecodeError::WriterSchema { id, reason };
        if registered.schema_type != "AVRO" {
            return Err(unusable(format!("it is {}, not Avro", registered.schema_type)).into());
        }
        let writer = Schema::parse_str(&registered.schema).map_err(|e| unusable(e.to_string()))?;
        let Schema::Record(record) = &writer else {
            return Err(unusable("its top-level type is not a record".into()).into());
        };
        let name = record.name.fullname(None);
        let local = self.store().for_envelope_name(&name).cloned();
        let writer = Arc::new(WriterSchema {
            label: local
                .as_ref()
                .map(|l| l.aggregate_type.clone())
                .unwrap_or_else(|| name.clone()),
            reader: local.filter(|l| l.envelope_json != writer.canonical_form()),
            writer,
        });
        self.writers
            .lock()
            .expect("not poisoned")
            .insert(id, writer.clone());
        Ok(writer)
    }
}

/// Registers `schema` under `subject`, or with `auto_register = false` only looks it up (and
/// refuses to start when it is missing).
async fn register_or_look_up(
    registry: &RegistryClient,
    subject: &str,
    schema: &EventSchema,
    auto_register: bool,
) -> Result<u32, Error> {
    if auto_register {
        return match registry.register(subject, &schema.registry_json).await {
            Err(RegistryError::Incompatible {
                url,
                subject,
                message,
                ..
            }) => Err(RegistryError::Incompatible {
                payload: payload_breaks(registry, &subject, schema).await,
                url,
                subject,
                message,
            }
            .into()),
            answer => Ok(answer?),
        };
    }
    registry
        .lookup(subject, &schema.registry_json)
        .await?
        .ok_or_else(|| {
            Error::Schema(format!(
                "schema {} is not registered under subject {subject:?} at {} (schema_registry.auto_register = false): register it, or check it with `dualsync schema check`",
                schema.envelope_name,
                registry.base_url()
            ))
        })
}

/// Why `schema`'s payload cannot read the latest version under `subject`, naming the field;
/// `None` when that cannot be said (no answer, not a dualsync envelope).
pub async fn payload_breaks(
    registry: &RegistryClient,
    subject: &str,
    schema: &EventSchema,
) -> Option<String> {
    let latest = registry.latest(subject).await.ok()??;
    crate::codec::compat::payload_breaks(&latest.schema, &schema.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> EventCodec {
        let mut store = SchemaStore::default();
        store
            .add(
                "orders",
                r#"{"type":"record","name":"Order","fields":[{"name":"id","type":"string"}]}"#,
            )
            .unwrap();
        EventCodec::new(Arc::new(store), None)
    }

    fn decode_error(result: Result<OutboxEvent, Error>) -> DecodeError {
        match result {
            Err(Error::Decode(e)) => e,
            other => panic!("expected a decode error, got {other:?}"),
        }
    }

    /// Issue #35 item 11: an unknown fingerprint whose reload was rate-limited (the folder was
    /// read less than a second before, and the deploy landed since) waits; it is dead-lettered
    /// only after a read that started after the message arrived.
    #[tokio::test]
    async fn an_unknown_fingerprint_waits_for_a_read_of_the_folder_after_it_arrived() {
        use crate::error::{classify, Disposition};
        let v1 = r#"{"type":"record","name":"Order","fields":[{"name":"id","type":"string"}]}"#;
        let v2 = r#"{"type":"record","name":"Order","fields":[{"name":"id","type":"string"},{"name":"note","type":["null","string"],"default":null}]}"#;
        let dir = std::env::temp_dir().join(format!("schemas-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("orders.avsc"), v1).unwrap();
        let mut codec = EventCodec::new(Arc::new(SchemaStore::load_dir(&dir).unwrap()), None);
        codec.reload_from = Some(dir.clone());
        let mut writer = SchemaStore::default();
        writer.add("orders", v2).unwrap();
        let bytes = writer
            .encode(&OutboxEvent {
                event_id: uuid::Uuid::new_v4(),
                event_type: "OrderPlaced".into(),
                aggregate_type: "orders".into(),
                aggregate_id: "o1".into(),
                version: 1,
                created_at_micros: 0,
                payload: Some(serde_json::json!({"id": "o1", "note": "n"})),
            })
            .unwrap();

        // Read after it arrived, and not there: poison.
        let first = codec.decode_received(&bytes, Instant::now()).await;
        assert!(matches!(
            decode_error(first),
            DecodeError::UnknownFingerprint(_)
        ));
        // The deploy lands; the next message arrives within the reload interval.
        std::fs::write(dir.join("orders.avsc"), v2).unwrap();
        let received = Instant::now();
        let pending = codec.decode_received(&bytes, received).await.unwrap_err();
        assert_eq!(classify(&pending), Disposition::Retry, "{pending}");
        let end = Instant::now() + Duration::from_secs(10);
        let decoded = loop {
            match codec.decode_received(&bytes, received).await {
                Ok(event) => break event,
                Err(e) => assert_eq!(classify(&e), Disposition::Retry, "{e}"),
            }
            assert!(Instant::now() < end, "never decoded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(decoded.payload.unwrap()["note"], "n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn confluent_frames_need_a_registry_and_a_full_header() {
        let c = codec();
        assert_eq!(
            decode_error(c.decode(&[0, 0, 0, 0, 7, 1]).await),
            DecodeError::NoRegistry(7)
        );
        assert_eq!(
            decode_error(c.decode(&[0, 0, 1]).await),
            DecodeError::TooShort(3)
        );
        assert_eq!(
            decode_error(c.decode(&[0x7B, 1, 2]).await),
            DecodeError::BadMagic(0x7B)
        );
        assert_eq!(decode_error(c.decode(&[]).await), DecodeError::Empty);
    }

    #[tokio::test]
    async fn without_a_registry_values_are_single_object_encoded() {
        let c = codec();
        let event = OutboxEvent {
            event_id: uuid::Uuid::nil(),
            event_type: "Created".into(),
            aggregate_type: "orders".into(),
            aggregate_id: "o-1".into(),
            version: 3,
            created_at_micros: 0,
            payload: Some(serde_json::json!({"id": "o-1"})),
        };
        let bytes = c.encode(&event).unwrap();
        assert_eq!(bytes[..2], SINGLE_OBJECT_MAGIC);
        assert_eq!(c.decode(&bytes).await.unwrap(), event);
    }
}
