//! `dualsync verify [--repair]` for a MongoDB primary: the watched collections compared with
//! a sink, collection by collection, with the PostgreSQL primary's report
//! ([`VerifyReport`]).
//!
//! Streaming: the primary is read in `_id` order, `batch` documents at a time, and the sink
//! is asked for exactly those keys; then the sink is scanned in its own key order, `batch`
//! records at a time, and the primary is asked which of those keys it has (the two orders
//! differ: the sink keys by the canonical string of the `_id`). Memory holds one batch and
//! the mismatches found.
//!
//! Stale or different: a record whose content differs (or a tombstone of a live document) is
//! *stale* when the primary's change stream still holds a change of that document newer
//! than the sink's version (not applied yet, or lost), otherwise *different*. Such suspects
//! are gathered, up to [`SUSPECTS_PER_PROBE`], and the change stream is read once for them,
//! from the oldest of their versions to the present (opening a stream far back can take
//! seconds); when that history is gone from the oplog they count as different (or missing).
//!
//! Resumable: with a checkpoint file, where the run stands (finished collections, the current
//! collection, which side and the last key done, and the report so far) is written after each
//! batch, so a run stopped by SIGINT/SIGTERM or a crash continues after that key.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::Database;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::mongo_repair::repair;
use super::{content_hash, Mismatch, MismatchKind, VerifyReport};
use crate::codec::SchemaStore;
use crate::config::{Config, MongoSourceConfig};
use crate::error::Error;
use crate::sink::{SinkReader, StoredRecord};
use crate::source::mongo_change::{simplified_json, version_of, version_time};
use crate::source::mongo_key::{canonical_key, id_of_key};
use crate::source::mongo_reads::{cluster_time, connect, watched_collections};
use crate::source::resume_token::cluster_time_of;

/// Longest the change stream is read to tell stale from different, per probe.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// Suspects classified by one reading of the change stream.
pub const SUSPECTS_PER_PROBE: usize = 10_000;

/// A sink record that differs from its primary document: stale or different (missing or
/// stale for a tombstone), decided by [`newest_changes`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Suspect {
    pub key: String,
    /// The primary's `_id` as canonical Extended JSON.
    pub id: String,
    pub sink_version: i64,
    pub tombstone: bool,
}

/// Which side of a collection is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pass {
    /// The primary, in `_id` order: missing, stale, different, matching.
    Primary,
    /// The sink, in its key order: extras and the sink's counts.
    Sink,
}

/// Where the verify of one collection stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Place {
    pub collection: String,
    pub pass: Pass,
    /// The last key done: the primary's `_id` as canonical Extended JSON, or the sink's key.
    pub after: Option<String>,
    pub report: VerifyReport,
    /// Primary pass: differing records not classified yet.
    #[serde(default)]
    pub suspects: Vec<Suspect>,
}

/// The content of a checkpoint file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    pub sink: String,
    /// Collections verified (and repaired, with `--repair`).
    pub done: Vec<VerifyReport>,
    pub repaired: u64,
    pub current: Option<Place>,
}

impl Checkpoint {
    /// The checkpoint at `path` for `sink`; `None` when there is none.
    pub fn load(path: &Path, sink: &str) -> Result<Option<Self>, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(checkpoint_error(path, e)),
        };
        let checkpoint: Self =
            serde_json::from_str(&text).map_err(|e| checkpoint_error(path, e))?;
        if checkpoint.sink != sink {
            return Err(Error::Interrupted(format!(
                "checkpoint {} is of a verify against sink {:?}, not {sink:?}: use another file",
                path.display(),
                checkpoint.sink
            )));
        }
        Ok(Some(checkpoint))
    }

    /// Written to a temporary file and renamed, so a crash leaves the old or the new one.
    fn save(&self, path: &Path) -> Result<(), Error> {
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec(self).map_err(|e| checkpoint_error(path, e))?;
        std::fs::write(&tmp, text).map_err(|e| checkpoint_error(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| checkpoint_error(path, e))
    }
}

fn checkpoint_error(path: &Path, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Progress of the run, shown by the command (a bar or lines on stderr).
pub trait Watch: Sync {
    fn begin(&self, what: String, unit: &'static str, total: Option<u64>);
    fn advance(&self, n: u64);
    fn end(&self);
}

/// One verify run of a MongoDB primary against one sink.
pub struct MongoVerify<'a, S: SinkReader> {
    pub config: &'a Config,
    pub source: &'a MongoSourceConfig,
    pub sink: &'a S,
    pub sink_name: &'a str,
    pub schemas: Arc<SchemaStore>,
    /// Collections to check (empty: every watched one).
    pub only: &'a [String],
    pub batch: usize,
    pub repair: bool,
    pub checkpoint: Option<&'a Path>,
}

/// What a run found and did.
pub struct Outcome {
    pub reports: Vec<VerifyReport>,
    pub repaired: u64,
    /// Whether the run continued from a checkpoint.
    pub resumed: bool,
}

impl<S: SinkReader> MongoVerify<'_, S> {
    /// Verifies (and repairs) every selected collection; on `cancel` stops after the current
    /// batch with the checkpoint saved.
    pub async fn run(
        &self,
        watch: &dyn Watch,
        cancel: &CancellationToken,
    ) -> Result<Outcome, Error> {
        let db = connect(self.source).await?;
        let collections = watched_collections(&db, self.source, self.only).await?;
        let loaded = match self.checkpoint {
            Some(path) => Checkpoint::load(path, self.sink_name)?,
            None => None,
        };
        let resumed = loaded.is_some();
        let mut state = loaded.unwrap_or_else(|| Checkpoint {
            sink: self.sink_name.to_string(),
            ..Checkpoint::default()
        });
        for collection in collections {
            if state.done.iter().any(|r| r.aggregate == collection) {
                continue;
            }
            if state
                .current
                .as_ref()
                .is_none_or(|p| p.collection != collection)
            {
                state.current = Some(Place {
                    collection: collection.clone(),
                    pass: Pass::Primary,
                    after: None,
                    report: VerifyReport {
                        aggregate: collection.clone(),
                        ..VerifyReport::default()
                    },
                    suspects: Vec::new(),
                });
            }
            self.verify_collection(&db, &mut state, watch, cancel)
                .await?;
            let report = state.current.take().expect("set above").report;
            if self.repair && !report.mismatches.is_empty() {
                state.repaired += repair(
                    self.config,
                    self.source,
                    self.schemas.clone(),
                    &db,
                    &report,
                    self.batch,
                    &|what, total| watch.begin(what, "keys", total),
                    &|n| watch.advance(n),
                    cancel,
                )
                .await?;
                watch.end();
            }
            state.done.push(report);
            self.save(&state)?;
        }
        if let Some(path) = self.checkpoint {
            // Finished: the next run starts over. (Never written when nothing was watched.)
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(checkpoint_error(path, e))
                }
                _ => {}
            }
        }
        Ok(Outcome {
            reports: state.done,
            repaired: state.repaired,
            resumed,
        })
    }

    fn save(&self, state: &Checkpoint) -> Result<(), Error> {
        self.checkpoint.map_or(Ok(()), |path| state.save(path))
    }

    /// Both passes over `state.current`, saving the checkpoint after every batch.
    async fn verify_collection(
        &self,
        db: &Database,
        state: &mut Checkpoint,
        watch: &dyn Watch,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let place = state.current.as_ref().expect("current collection");
        let name = place.collection.clone();
        let collection = db.collection::<Document>(&name);
        let estimate = collection.estimated_document_count().await?;
        // Both sides are read and the sink holds about as many records as the primary.
        watch.begin(
            format!("verify {name} vs {}", self.sink_name),
            "rows",
            Some(2 * estimate),
        );
        let typed = self.schemas.for_type(&name).is_some();
        let interrupted = || {
            Error::Interrupted(format!(
                "verify interrupted in collection {name:?}{}",
                self.checkpoint.map_or(String::new(), |p| format!(
                    "; run it again with --checkpoint {} to continue",
                    p.display()
                ))
            ))
        };
        if place.pass == Pass::Primary {
            let filter = match &place.after {
                Some(after) => doc! {"_id": {"$gt": id_from_text(after)?}},
                None => doc! {},
            };
            let mut cursor = collection
                .find(filter)
                .sort(doc! {"_id": 1})
                .batch_size(self.batch.min(u32::MAX as usize) as u32)
                .await?;
            loop {
                let mut docs = Vec::with_capacity(self.batch);
                while docs.len() < self.batch {
                    match cursor.try_next().await? {
                        Some(d) => docs.push(d),
                        None => break,
                    }
                }
                let Some(last) = docs.last().and_then(|d| d.get("_id")).cloned() else {
                    break;
                };
                let n = docs.len() as u64;
                let place = state.current.as_mut().expect("current collection");
                self.compare_documents(&name, typed, docs, place).await?;
                if place.suspects.len() >= SUSPECTS_PER_PROBE {
                    classify(db, place).await?;
                }
                place.after = Some(last.into_canonical_extjson().to_string());
                self.save(state)?;
                watch.advance(n);
                if cancel.is_cancelled() {
                    return Err(interrupted());
                }
            }
            let place = state.current.as_mut().expect("current collection");
            classify(db, place).await?;
            place.pass = Pass::Sink;
            place.after = None;
            self.save(state)?;
        }
        loop {
            let place = state.current.as_mut().expect("current collection");
            let page = self
                .sink
                .scan(&name, place.after.as_deref(), self.batch)
                .await?;
            let Some(last) = page.last().map(|r| r.0.clone()) else {
                break;
            };
            let n = page.len() as u64;
            find_extras(db, &name, page, &mut place.report).await?;
            place.after = Some(last);
            self.save(state)?;
            watch.advance(n);
            if cancel.is_cancelled() {
                return Err(interrupted());
            }
        }
        watch.end();
        Ok(())
    }

    /// One batch of primary documents against the sink's records of the same keys: matching
    /// and missing counted, the rest kept as suspects.
    async fn compare_documents(
        &self,
        collection: &str,
        typed: bool,
        docs: Vec<Document>,
        place: &mut Place,
    ) -> Result<(), Error> {
        let mut ids = Vec::with_capacity(docs.len());
        let mut bodies = Vec::with_capacity(docs.len());
        for mut d in docs {
            ids.push(d.remove("_id").unwrap_or(Bson::Null));
            bodies.push(sink_form(Bson::Document(d), typed));
        }
        let keys: Vec<String> = ids.iter().map(canonical_key).collect();
        // Through the sink's projection: a column table holds only the mapped fields.
        let projected = self.sink.project(collection, &bodies).await?;
        let stored: HashMap<String, (i64, Option<serde_json::Value>)> = self
            .sink
            .get_many(collection, &keys)
            .await?
            .into_iter()
            .map(|(k, v, d)| (k, (v, d)))
            .collect();
        let report = &mut place.report;
        report.primary_rows += keys.len() as u64;
        for ((key, id), want) in keys.into_iter().zip(ids).zip(projected) {
            let (sink_version, tombstone) = match stored.get(&key) {
                None => {
                    push(report, key, MismatchKind::Missing, None, None);
                    continue;
                }
                Some((version, None)) => (*version, true),
                // A document the sink cannot hold never matches what it holds.
                Some((version, Some(have))) => {
                    if want.as_ref().map(content_hash) == Some(content_hash(have)) {
                        report.matching += 1;
                        continue;
                    }
                    (*version, false)
                }
            };
            place.suspects.push(Suspect {
                key,
                id: id.into_canonical_extjson().to_string(),
                sink_version,
                tombstone,
            });
        }
        Ok(())
    }
}

/// Classifies the suspects of `place` (see the module doc) into its report.
async fn classify(db: &Database, place: &mut Place) -> Result<(), Error> {
    if place.suspects.is_empty() {
        return Ok(());
    }
    let suspects = std::mem::take(&mut place.suspects);
    let newest = newest_changes(db, &place.collection, &suspects).await?;
    for s in suspects {
        let newer = newest.get(&s.key).copied().filter(|n| *n > s.sink_version);
        let kind = match (newer, s.tombstone) {
            (Some(_), _) => MismatchKind::Stale,
            (None, true) => MismatchKind::Missing,
            (None, false) => MismatchKind::Different,
        };
        push(&mut place.report, s.key, kind, Some(s.sink_version), newer);
    }
    Ok(())
}

fn push(
    report: &mut VerifyReport,
    key: String,
    kind: MismatchKind,
    sink_version: Option<i64>,
    newest_change_version: Option<i64>,
) {
    *report.by_kind.entry(kind).or_insert(0) += 1;
    report.mismatches.push(Mismatch {
        aggregate: report.aggregate.clone(),
        key,
        kind,
        sink_version,
        newest_outbox_seq: None,
        newest_change_version,
    });
}

/// A primary document (without `_id`) as apply writes it: simplified JSON for a collection
/// with a schema, relaxed Extended JSON otherwise.
fn sink_form(document: Bson, typed: bool) -> serde_json::Value {
    if typed {
        simplified_json(&document)
    } else {
        document.into_relaxed_extjson()
    }
}

fn id_from_text(text: &str) -> Result<Bson, Error> {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|j| Bson::try_from(j).ok())
        .ok_or_else(|| Error::Interrupted(format!("verify checkpoint: unreadable _id {text:?}")))
}

/// One page of the sink: counts it, and reports the live records the primary does not have.
async fn find_extras(
    db: &Database,
    collection: &str,
    page: Vec<StoredRecord>,
    report: &mut VerifyReport,
) -> Result<(), Error> {
    let ids: Vec<Bson> = page.iter().map(|r| id_of_key(&r.0)).collect();
    let present: HashSet<String> = db
        .collection::<Document>(collection)
        .find(doc! {"_id": {"$in": ids}})
        .projection(doc! {"_id": 1})
        .await?
        .try_collect::<Vec<Document>>()
        .await?
        .iter()
        .filter_map(|d| d.get("_id").map(canonical_key))
        .collect();
    for (key, version, doc) in page {
        if doc.is_some() {
            report.sink_live += 1;
        } else {
            report.sink_tombstones += 1;
        }
        match (doc.is_some(), present.contains(&key)) {
            (true, false) => push(report, key, MismatchKind::Extra, Some(version), None),
            // A tombstone of a deleted document is what the sink should hold.
            (false, false) => report.matching += 1,
            // Seen from the primary's side.
            (_, true) => {}
        }
    }
    Ok(())
}

/// Per key of `suspects`, the version of its newest change in the change stream from the
/// oldest sink version on; empty when the oplog no longer reaches back that far.
async fn newest_changes(
    db: &Database,
    collection: &str,
    suspects: &[Suspect],
) -> Result<HashMap<String, i64>, Error> {
    let mut newest = HashMap::new();
    let Some(oldest) = suspects.iter().map(|s| s.sink_version).min() else {
        return Ok(newest);
    };
    let end = cluster_time(db).await?;
    let ids = suspects
        .iter()
        .map(|s| id_from_text(&s.id))
        .collect::<Result<Vec<Bson>, Error>>()?;
    let opened = db
        .collection::<Document>(collection)
        .watch()
        .pipeline([doc! {"$match": {"documentKey._id": {"$in": ids}}}])
        .start_at_operation_time(version_time(oldest))
        .max_await_time(Duration::from_millis(100))
        .await;
    let mut stream = match opened.map_err(crate::source::mongo::history_lost_or) {
        Ok(s) => s,
        Err(Error::HistoryLost(why)) => return Ok(history_gone(collection, &why, newest)),
        Err(e) => return Err(e),
    };
    let deadline = Instant::now() + PROBE_LIMIT;
    loop {
        match stream.next_if_any().await {
            Ok(Some(event)) => {
                let key = event
                    .document_key
                    .as_ref()
                    .and_then(|k| k.get("_id"))
                    .map(canonical_key);
                if let (Some(key), Some(at)) = (key, event.cluster_time) {
                    let version = version_of(at, 0);
                    let best = newest.entry(key).or_insert(version);
                    *best = (*best).max(version);
                }
            }
            Ok(None) => {
                // An empty round trip: caught up when the stream is past `end` (or cannot
                // say how far it is).
                let at = stream
                    .resume_token()
                    .and_then(|t| mongodb::bson::to_document(&t).ok())
                    .and_then(|t| cluster_time_of(&t));
                if !stream.is_alive() || at.is_none_or(|t| not_before(t, end)) {
                    break;
                }
            }
            Err(e) => match crate::source::mongo::history_lost_or(e) {
                Error::HistoryLost(why) => return Ok(history_gone(collection, &why, newest)),
                other => return Err(other),
            },
        }
        if Instant::now() > deadline {
            tracing::warn!(collection, "reading the change stream to tell stale from different took too long; the rest count as different");
            break;
        }
    }
    Ok(newest)
}

fn not_before(t: Timestamp, end: Timestamp) -> bool {
    (t.time, t.increment) >= (end.time, end.increment)
}

fn history_gone(collection: &str, why: &str, found: HashMap<String, i64>) -> HashMap<String, i64> {
    tracing::warn!(collection, reason = why, "the oplog no longer holds the changes since the sink's versions: differing records count as different, not stale");
    found
}
