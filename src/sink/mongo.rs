//! MongoDB sink: one collection per aggregate type, `_id` = aggregate id, and a `_dualsync`
//! sub-document `{version, deleted, updated_at}` on every record.
//!
//! A batch is one `update` command of upserts whose filter is `{_id, "_dualsync.version":
//! {$lt: v}}`. When the stored version is newer the filter matches nothing and the upsert's
//! insert collides on `_id` (E11000): that collision *is* the stale no-op, never an error that
//! retries. Because [`newest_per_key`] leaves one record per key, the statements are
//! independent and the command runs unordered, so one rejected document does not hold back the
//! rest of the batch.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::{Client, Database};
use tokio::sync::Mutex;

use futures::TryStreamExt;

use super::{newest_per_key, ApplyOutcome, Sink, SinkRecord, StoredRecord};
use crate::config::MongoSinkConfig;
use crate::error::Error;

/// Field holding dualsync's bookkeeping in every document.
pub const META_FIELD: &str = "_dualsync";
const DUPLICATE_KEY: i32 = 11000;

/// Fault-injection seam for tests: sees every write command as it would be sent and may answer
/// it in the server's place (`Some(reply)`: the command is not sent). Only for faults a
/// one-node test server cannot produce (not-primary, write conflicts, write-concern errors);
/// everything after the reply is the real code path.
pub type CommandInterceptor = Arc<dyn Fn(&Document) -> Option<Document> + Send + Sync>;

pub struct MongoSink {
    db: Database,
    seen: Mutex<HashSet<String>>,
    intercept: Option<CommandInterceptor>,
}

impl MongoSink {
    pub async fn connect(config: &MongoSinkConfig) -> Result<Self, Error> {
        let client = Client::with_uri_str(config.url.expose()).await?;
        let db = client.database(&config.database);
        db.run_command(doc! {"ping": 1}).await?;
        Ok(Self {
            db,
            seen: Mutex::new(HashSet::new()),
            intercept: None,
        })
    }

    /// Installs a [`CommandInterceptor`] (tests only).
    #[doc(hidden)]
    pub fn with_interceptor(mut self, intercept: CommandInterceptor) -> Self {
        self.intercept = Some(intercept);
        self
    }

    /// Runs a write command, unless the interceptor answers it.
    async fn write_command(&self, command: Document) -> Result<Document, Error> {
        if let Some(reply) = self.intercept.as_ref().and_then(|f| f(&command)) {
            return Ok(reply);
        }
        Ok(self.db.run_command(command).await?)
    }

    pub fn database(&self) -> &Database {
        &self.db
    }
}

fn to_document(record: &SinkRecord) -> Result<Document, Error> {
    let meta = doc! {
        "version": record.version,
        "deleted": record.document.is_none(),
        "updated_at": DateTime::now(),
    };
    let mut out = match &record.document {
        None => Document::new(),
        Some(json) => match Bson::try_from(json.clone()) {
            Ok(Bson::Document(d)) => d,
            Ok(_) => {
                return Err(Error::Rejected(
                    "a MongoDB document must be a JSON object".into(),
                ))
            }
            Err(e) => return Err(Error::Rejected(format!("not representable as BSON: {e}"))),
        },
    };
    match out.get("_id") {
        Some(Bson::String(id)) if *id == record.key => {}
        None => {}
        Some(other) => {
            return Err(Error::Rejected(format!(
                "payload field _id ({other}) differs from the aggregate id {:?}",
                record.key
            )))
        }
    }
    out.insert("_id", record.key.clone());
    out.insert(META_FIELD, meta);
    Ok(out)
}

impl Sink for MongoSink {
    async fn apply(&self, batch: &[SinkRecord]) -> Result<ApplyOutcome, Error> {
        let (kept, dropped) = newest_per_key(batch);
        let mut outcome = ApplyOutcome {
            stale: dropped,
            ..Default::default()
        };
        let mut by_collection: BTreeMap<&str, Vec<(usize, Document)>> = BTreeMap::new();
        for i in kept {
            let r = &batch[i];
            match to_document(r) {
                Ok(d) => by_collection.entry(&r.namespace).or_default().push((i, d)),
                Err(e) => outcome.rejected.push((i, e)),
            }
        }
        for (collection, docs) in by_collection {
            self.seen.lock().await.insert(collection.to_string());
            let updates: Vec<Document> = docs
                .iter()
                .map(|(i, d)| {
                    doc! {
                        "q": {"_id": &batch[*i].key, format!("{META_FIELD}.version"): {"$lt": batch[*i].version}},
                        "u": d,
                        "upsert": true,
                    }
                })
                .collect();
            let reply = self
                .write_command(doc! {"update": collection, "updates": updates, "ordered": false})
                .await?;
            let mut failed = 0u64;
            if let Ok(errors) = reply.get_array("writeErrors") {
                for e in errors.iter().filter_map(Bson::as_document) {
                    let index = e.get_i32("index").unwrap_or(-1);
                    let code = e.get_i32("code").unwrap_or(0);
                    let Some((batch_index, _)) =
                        usize::try_from(index).ok().and_then(|i| docs.get(i))
                    else {
                        return Err(Error::Setup(format!(
                            "mongodb update reply has a bad writeErrors index: {e}"
                        )));
                    };
                    failed += 1;
                    if code == DUPLICATE_KEY
                        && e.get_str("errmsg")
                            .map(|m| m.contains("_id_"))
                            .unwrap_or(true)
                    {
                        outcome.stale += 1;
                    } else {
                        let message = e.get_str("errmsg").unwrap_or("").to_string();
                        outcome
                            .rejected
                            .push((*batch_index, mongo_write_error(code, message)));
                    }
                }
            }
            if let Ok(wce) = reply.get_document("writeConcernError") {
                return Err(Error::Setup(format!("mongodb write concern error: {wce}")));
            }
            outcome.applied += docs.len() as u64 - failed;
        }
        outcome.rejected.sort_by_key(|(i, _)| *i);
        Ok(outcome)
    }

    async fn purge_tombstones(&self, older_than: Duration) -> Result<u64, Error> {
        let cutoff = DateTime::from_millis(
            DateTime::now().timestamp_millis() - older_than.as_millis() as i64,
        );
        let collections: Vec<String> = self.seen.lock().await.iter().cloned().collect();
        let mut purged = 0;
        for c in collections {
            let r = self
                .db
                .collection::<Document>(&c)
                .delete_many(doc! {
                    format!("{META_FIELD}.deleted"): true,
                    format!("{META_FIELD}.updated_at"): {"$lt": cutoff},
                })
                .await?;
            purged += r.deleted_count;
        }
        Ok(purged)
    }

    async fn get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<(i64, Option<serde_json::Value>)>, Error> {
        let found = self
            .db
            .collection::<Document>(namespace)
            .find_one(doc! {"_id": key})
            .await?;
        Ok(found.map(stored).map(|(_, version, doc)| (version, doc)))
    }

    async fn scan(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        let filter = match after {
            Some(a) => doc! {"_id": {"$gt": a}},
            None => doc! {},
        };
        let cursor = self
            .db
            .collection::<Document>(namespace)
            .find(filter)
            .sort(doc! {"_id": 1})
            .limit(limit as i64)
            .await?;
        let documents: Vec<Document> = cursor.try_collect().await?;
        Ok(documents.into_iter().map(stored).collect())
    }
}

/// A stored document as (key, version, document without `_id` and metadata, or `None` for a
/// tombstone).
fn stored(mut d: Document) -> StoredRecord {
    let meta = d
        .remove(META_FIELD)
        .and_then(|m| m.as_document().cloned())
        .unwrap_or_default();
    let version = meta.get_i64("version").unwrap_or(i64::MIN);
    let key = match d.remove("_id") {
        Some(Bson::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    if meta.get_bool("deleted").unwrap_or(false) {
        return (key, version, None);
    }
    (key, version, Some(Bson::Document(d).into_relaxed_extjson()))
}

/// A per-document write error from the server, as an [`Error`] the classifier understands.
fn mongo_write_error(code: i32, message: String) -> Error {
    // WriteError is non-exhaustive; it is built the way the driver builds it, from the reply.
    match mongodb::bson::from_document::<mongodb::error::WriteError>(
        doc! {"code": code, "errmsg": &message},
    ) {
        Ok(failure) => Error::Mongo(
            mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(failure))
                .into(),
        ),
        Err(_) => Error::Rejected(format!("mongodb error {code}: {message}")),
    }
}
