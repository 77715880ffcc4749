//! MongoDB sink: one collection per aggregate type, `_id` = aggregate id, and a `_dualsync`
//! sub-document `{version, deleted, updated_at}` on every record.
//!
//! A batch is one `update` command of upserts whose filter is `{_id, "_dualsync.version":
//! {$lt: v}}`, sent with the connection string's write concern. Because [`newest_per_key`]
//! leaves one record per key, the statements are independent and the command runs unordered,
//! so one rejected document does not hold back the rest of the batch.
//!
//! When the filter matches nothing the upsert inserts, and the insert collides on `_id`
//! (E11000) if the document exists: either its stored version is at least `v` (the record is
//! stale), or another writer inserted it after the filter looked (two apply processes during a
//! rebalance). The stored versions of the collided keys decide: at least `v` is stale, older
//! is upserted again. Every other per-document error goes through [`classify`]: transient
//! ones (not primary, write conflict) fail the batch so it is retried, permanent ones are
//! dead-lettered, fatal ones stop apply. A write-concern error is classified the same way.
//! A reply that accounts for fewer statements than were sent (FerretDB stops at the first
//! failing one) is settled statement by statement, never taken as the rest written.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::{ReadPreference, SelectionCriteria};
use mongodb::Database;
use tokio::sync::Mutex;

use futures::TryStreamExt;

use super::{newest_per_key, ApplyOutcome, Sink, SinkReader, SinkRecord, StoredRecord};
use crate::config::MongoSinkConfig;
use crate::error::{classify, Disposition, Error, MONGO_DUPLICATE_KEY};

/// Field holding dualsync's bookkeeping in every document.
const META_FIELD: &str = "_dualsync";

/// Collection of the purge horizons: per collection (`_id`), `version`, the highest version of
/// any tombstone the purge may delete (in force for every write from the moment it is
/// raised), `settled` (tombstones up to it may be deleted now: it has been in force for the
/// purge's grace; absent in a horizon written before the two-phase purge, which had deleted
/// up to `version`) and `pending_since` (when `version` was raised above `settled`). An event
/// at or below `version` may be older than a purged delete, so it may update a document that
/// exists but never insert one; for a key the collection does not hold it is refused
/// ([`Error::BelowPurgeHorizon`]), so a late event or a replay cannot bring a deleted record
/// back and nothing is dropped silently.
pub const HORIZON_COLLECTION: &str = "dualsync_purge_horizon";

/// The index the tombstone purge's filter uses, created with each collection.
pub const TOMBSTONE_INDEX: &str = "dualsync_tombstones";

/// Rounds of upserts for keys whose insert keeps colliding with a document older than the
/// record: the first collision is a race with another writer, which one more round settles;
/// a collision that outlasts the rounds is a unique secondary index, and the record is poison.
const UPSERT_ROUNDS: usize = 3;

/// Fault-injection seam for tests: sees every write command as it would be sent and may answer
/// it in the server's place (`Some(reply)`: the command is not sent). Only for faults a
/// one-node test server cannot produce (not-primary, write conflicts, write-concern errors);
/// everything after the reply is the real code path.
pub type CommandInterceptor = Arc<dyn Fn(&Document) -> Option<Document> + Send + Sync>;

pub struct MongoSink {
    db: Database,
    seen: Mutex<HashSet<String>>,
    /// The connection string's write concern, as the command's `writeConcern` field:
    /// `run_command` does not add the client's on its own.
    write_concern: Option<Document>,
    intercept: Option<CommandInterceptor>,
    /// `maxTimeMS` of every write command (`sinks.NAME.timeout_ms`): a write waiting on a
    /// lock fails with MaxTimeMSExpired (retried) instead of holding the partitions.
    max_time_ms: i64,
}

mod purge;
mod read;

use read::stored;

/// A statement of the batch: (index into the caller's batch, the document to write).
type Statement = (usize, Document);

/// A collection's purge horizon (see [`HORIZON_COLLECTION`]).
struct Horizon {
    version: i64,
    settled: i64,
    pending_since: Option<DateTime>,
}

impl MongoSink {
    pub async fn connect(config: &MongoSinkConfig) -> Result<Self, Error> {
        Self::connect_as(config, "NAME").await
    }

    /// [`Self::connect`] for the sink `[sinks.NAME]`: its server faults are logged naming
    /// `sinks.NAME.url`.
    pub async fn connect_as(config: &MongoSinkConfig, name: &str) -> Result<Self, Error> {
        let key = format!("sinks.{name}.url");
        let client = crate::telemetry::mongo_client(config.url.expose(), &key).await?;
        let db = client.database(&config.database);
        db.run_command(doc! {"ping": 1}).await?;
        let write_concern = match db.write_concern() {
            Some(wc) => Some(mongodb::bson::to_document(wc).map_err(|e| {
                Error::Misconfigured(format!("write concern of the MongoDB sink's URL: {e}"))
            })?),
            None => None,
        }
        .filter(|d| !d.is_empty());
        Ok(Self {
            db,
            seen: Mutex::new(HashSet::new()),
            write_concern,
            intercept: None,
            max_time_ms: config.timeout_ms as i64,
        })
    }

    /// Installs a [`CommandInterceptor`] (tests only).
    #[doc(hidden)]
    pub fn with_interceptor(mut self, intercept: CommandInterceptor) -> Self {
        self.intercept = Some(intercept);
        self
    }

    /// Runs a write command, unless the interceptor answers it.
    async fn write_command(&self, mut command: Document) -> Result<Document, Error> {
        command.insert("maxTimeMS", self.max_time_ms);
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

impl MongoSink {
    /// Writes one collection's statements, settling `_id` collisions (see the module doc).
    async fn write_collection(
        &self,
        collection: &str,
        batch: &[SinkRecord],
        todo: Vec<Statement>,
        outcome: &mut ApplyOutcome,
    ) -> Result<(), Error> {
        let horizon = self.horizon(collection).await?.map(|h| h.version);
        let (bounded, mut todo): (Vec<Statement>, Vec<Statement>) = todo
            .into_iter()
            .partition(|(i, _)| horizon.is_some_and(|h| batch[*i].version <= h));
        if let (false, Some(h)) = (bounded.is_empty(), horizon) {
            self.update_existing(collection, batch, &bounded, h, outcome)
                .await?;
        }
        if todo.is_empty() {
            return Ok(());
        }
        for round in 1..=UPSERT_ROUNDS {
            let collided = self.upsert(collection, batch, &todo, outcome).await?;
            if collided.is_empty() {
                return Ok(());
            }
            let keys: Vec<&str> = collided
                .iter()
                .map(|(s, _)| batch[s.0].key.as_str())
                .collect();
            let stored = self.stored_versions(collection, &keys).await?;
            todo = Vec::new();
            for ((i, d), message) in collided {
                let record = &batch[i];
                if stored
                    .get(&record.key)
                    .is_some_and(|v| *v >= record.version)
                {
                    outcome.stale += 1;
                } else if round == UPSERT_ROUNDS {
                    outcome
                        .rejected
                        .push((i, mongo_write_error(MONGO_DUPLICATE_KEY, message)));
                } else {
                    todo.push((i, d));
                }
            }
            if todo.is_empty() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// One unordered `update` command of guarded upserts. Counts what was written, puts what
    /// the server refused for good into `rejected`, and returns the statements whose insert
    /// collided (E11000) with the server's message. A transient or fatal error (per document
    /// or of the write concern) fails the call: the batch is retried (what did go in is stale
    /// then) or apply stops.
    async fn upsert(
        &self,
        collection: &str,
        batch: &[SinkRecord],
        statements: &[Statement],
        outcome: &mut ApplyOutcome,
    ) -> Result<Vec<(Statement, String)>, Error> {
        let reply = self
            .guarded_update(collection, batch, statements, true)
            .await?;
        let errors = reply
            .get_array("writeErrors")
            .map(|a| a.as_slice())
            .unwrap_or_default();
        // Every statement of an unordered upsert batch is either counted in `n` (matched or
        // upserted) or has a write error. FerretDB 1.x runs the statements in order whatever
        // `ordered` says, stops at the first that fails and reports it at index 0 without `n`:
        // its reply does not say which statements ran. A stored document carrying the
        // statement's own `updated_at` went in with it; every other statement is sent again
        // on its own, where index 0 can only mean that statement.
        if statements.len() > 1 && count(&reply) as usize + errors.len() < statements.len() {
            let went_in = self.written_by(collection, statements).await?;
            let mut collided = Vec::new();
            for statement in statements {
                if went_in.contains(&statement.0) {
                    outcome.written.push(statement.0);
                    continue;
                }
                let one = std::slice::from_ref(statement);
                collided.extend(Box::pin(self.upsert(collection, batch, one, outcome)).await?);
            }
            return Ok(collided);
        }
        let mut collided = Vec::new();
        let mut refused = HashSet::new();
        for e in errors.iter().filter_map(Bson::as_document) {
            let index = e.get_i32("index").unwrap_or(-1);
            let Some(statement) = usize::try_from(index).ok().and_then(|i| statements.get(i))
            else {
                return Err(Error::Internal(format!(
                    "mongodb update reply has a bad writeErrors index: {e}"
                )));
            };
            refused.insert(statement.0);
            let code = e.get_i32("code").unwrap_or(0);
            let message = e.get_str("errmsg").unwrap_or("").to_string();
            if code == MONGO_DUPLICATE_KEY {
                collided.push((statement.clone(), message));
                continue;
            }
            let error = mongo_write_error(code, message);
            match classify(&error) {
                Disposition::DeadLetter => outcome.rejected.push((statement.0, error)),
                Disposition::Retry | Disposition::Fatal => return Err(error),
            }
        }
        outcome.written.extend(
            statements
                .iter()
                .map(|(i, _)| *i)
                .filter(|i| !refused.contains(i)),
        );
        Ok(collided)
    }

    /// One unordered `update` command of the statements, each filtered on an older stored
    /// version, sent with the URL's write concern; a write-concern error fails it.
    async fn guarded_update(
        &self,
        collection: &str,
        batch: &[SinkRecord],
        statements: &[Statement],
        upsert: bool,
    ) -> Result<Document, Error> {
        let updates: Vec<Document> = statements
            .iter()
            .map(|(i, d)| {
                doc! {
                    "q": {"_id": &batch[*i].key, format!("{META_FIELD}.version"): {"$lt": batch[*i].version}},
                    "u": d,
                    "upsert": upsert,
                }
            })
            .collect();
        let mut command = doc! {"update": collection, "updates": updates, "ordered": false};
        if let Some(wc) = &self.write_concern {
            command.insert("writeConcern", wc.clone());
        }
        let reply = self.write_command(command).await?;
        if let Ok(wce) = reply.get_document("writeConcernError") {
            return Err(write_concern_error(wce));
        }
        Ok(reply)
    }

    /// The purge horizon of `collection` (see [`HORIZON_COLLECTION`]), from the primary.
    async fn horizon(&self, collection: &str) -> Result<Option<Horizon>, Error> {
        let found = self
            .db
            .collection::<Document>(HORIZON_COLLECTION)
            .find_one(doc! {"_id": collection})
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .await?;
        Ok(found.and_then(|d| {
            let version = d.get_i64("version").ok()?;
            Some(Horizon {
                version,
                settled: d.get_i64("settled").unwrap_or(version),
                pending_since: d.get_datetime("pending_since").ok().copied(),
            })
        }))
    }

    /// First sight of `collection` in this process: a collection that does not exist yet is
    /// created here and starts with no purge horizon (a horizon left by a dropped collection
    /// is removed first, so a sink can be rebuilt by dropping it and resetting the group), and
    /// the purge's index is created.
    async fn prepare_collection(&self, collection: &str) -> Result<(), Error> {
        let exists = !self
            .db
            .list_collection_names()
            .filter(doc! {"name": collection})
            .await?
            .is_empty();
        if !exists {
            self.db
                .collection::<Document>(HORIZON_COLLECTION)
                .delete_one(doc! {"_id": collection})
                .await?;
            if let Err(e) = self.db.create_collection(collection).await {
                // NamespaceExists: another member created it meanwhile.
                if !matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 48) {
                    return Err(e.into());
                }
            }
        }
        self.db
            .collection::<Document>(collection)
            .create_index(
                mongodb::IndexModel::builder()
                    .keys(doc! {
                        format!("{META_FIELD}.deleted"): 1,
                        format!("{META_FIELD}.updated_at"): 1,
                    })
                    .options(
                        mongodb::options::IndexOptions::builder()
                            .name(TOMBSTONE_INDEX.to_string())
                            .build(),
                    )
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// Statements at or below the purge horizon `horizon`: written only over a document that
    /// exists with an older version (no upsert), stale when it holds a newer one, refused when
    /// it holds none.
    async fn update_existing(
        &self,
        collection: &str,
        batch: &[SinkRecord],
        statements: &[Statement],
        horizon: i64,
        outcome: &mut ApplyOutcome,
    ) -> Result<(), Error> {
        let reply = self
            .guarded_update(collection, batch, statements, false)
            .await?;
        if let Some(e) = reply
            .get_array("writeErrors")
            .ok()
            .and_then(|a| a.first())
            .and_then(Bson::as_document)
        {
            let error = mongo_write_error(
                e.get_i32("code").unwrap_or(0),
                e.get_str("errmsg").unwrap_or("").to_string(),
            );
            return Err(error);
        }
        let matched = count(&reply);
        if matched >= statements.len() as u64 {
            outcome.written.extend(statements.iter().map(|(i, _)| *i));
            return Ok(());
        }
        // The reply counts the matched statements without naming them: the stored versions
        // tell which ones this write put there, which were stale, and which keys the
        // collection does not hold (refused: the sink cannot tell them from records older
        // than a purged delete).
        let keys: Vec<&str> = statements
            .iter()
            .map(|(i, _)| batch[*i].key.as_str())
            .collect();
        let stored = self.stored_versions(collection, &keys).await?;
        for (i, _) in statements {
            let record = &batch[*i];
            match stored.get(&record.key) {
                Some(v) if *v == record.version && matched > 0 => outcome.written.push(*i),
                Some(v) if *v >= record.version => outcome.stale += 1,
                // A delete of a key the collection does not hold: absent is what it asks for.
                None if record.document.is_none() => outcome.stale += 1,
                _ => outcome.rejected.push((
                    *i,
                    Error::BelowPurgeHorizon {
                        namespace: collection.to_string(),
                        key: record.key.clone(),
                        version: record.version,
                        horizon,
                    },
                )),
            }
        }
        Ok(())
    }

    /// The statements whose document is stored as they wrote it (same `_dualsync`: version,
    /// tombstone flag and the `updated_at` stamped when the statement was made).
    async fn written_by(
        &self,
        collection: &str,
        statements: &[Statement],
    ) -> Result<HashSet<usize>, Error> {
        let keys: Vec<&str> = statements
            .iter()
            .filter_map(|(_, d)| d.get_str("_id").ok())
            .collect();
        let found: Vec<Document> = self
            .db
            .collection::<Document>(collection)
            .find(doc! {"_id": {"$in": keys}})
            .projection(doc! {META_FIELD: 1})
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .await?
            .try_collect()
            .await?;
        let stored: std::collections::HashMap<&str, &Bson> = found
            .iter()
            .filter_map(|d| Some((d.get_str("_id").ok()?, d.get(META_FIELD)?)))
            .collect();
        Ok(statements
            .iter()
            .filter(|(_, d)| {
                d.get_str("_id")
                    .ok()
                    .and_then(|id| stored.get(id))
                    .is_some_and(|meta| Some(*meta) == d.get(META_FIELD))
            })
            .map(|(i, _)| *i)
            .collect())
    }

    /// The stored versions of `keys` (tombstones included) in `collection`, read from the
    /// primary: a lagging secondary would show an older version, and a stale record would be
    /// upserted again until it counted as poison.
    async fn stored_versions(
        &self,
        collection: &str,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, i64>, Error> {
        let found: Vec<Document> = self
            .db
            .collection::<Document>(collection)
            .find(doc! {"_id": {"$in": keys}})
            .projection(doc! {format!("{META_FIELD}.version"): 1})
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .await?
            .try_collect()
            .await?;
        Ok(found
            .into_iter()
            .map(|d| {
                let (key, version, _) = stored(d);
                (key, version)
            })
            .collect())
    }
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
            if !self.seen.lock().await.contains(collection) {
                self.prepare_collection(collection).await?;
                self.seen.lock().await.insert(collection.to_string());
            }
            self.write_collection(collection, batch, docs, &mut outcome)
                .await?;
        }
        outcome.rejected.sort_by_key(|(i, _)| *i);
        Ok(outcome)
    }

    async fn purge_tombstones(&self, older_than: Duration, grace: Duration) -> Result<u64, Error> {
        let cutoff = DateTime::from_millis(
            DateTime::now().timestamp_millis() - older_than.as_millis() as i64,
        );
        self.discover_collections().await?;
        let collections: Vec<String> = self.seen.lock().await.iter().cloned().collect();
        let mut purged = 0;
        for c in collections {
            purged += self.purge_collection(&c, cutoff, grace).await?;
        }
        Ok(purged)
    }
}

/// The `n` of a write command's reply (statements matched or upserted); 0 when it is missing.
fn count(reply: &Document) -> u64 {
    reply
        .get_i32("n")
        .map(i64::from)
        .or_else(|_| reply.get_i64("n"))
        .unwrap_or(0)
        .max(0) as u64
}

/// A `writeConcernError` of a reply, as an [`Error`] the classifier understands.
fn write_concern_error(wce: &Document) -> Error {
    match mongodb::bson::from_document::<mongodb::error::WriteConcernError>(wce.clone()) {
        Ok(failure) => Error::Mongo(
            mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(
                failure,
            ))
            .into(),
        ),
        Err(e) => Error::Internal(format!("mongodb write concern error: {wce} ({e})")),
    }
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
