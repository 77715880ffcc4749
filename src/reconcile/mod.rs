//! Comparing the primary with a sink (`dualsync verify`), repairing through the pipeline
//! (`verify --repair`), and emitting a table's current rows as events (`dualsync snapshot`).
//!
//! Repairs and snapshots never write the secondary: they insert outbox rows carrying the
//! primary's current state, so the relay publishes them and apply's version guard decides.
//! Each key is emitted while holding the same per-aggregate advisory lock the outbox trigger
//! takes, and the row is read after the lock is held: a writer that already inserted its own
//! outbox row has committed by then (its state is what we read), and one that has not will
//! get a later `seq` (its newer state wins). Locks are only tried, never waited for, so a
//! snapshot can neither deadlock with nor abort an application transaction; contended keys
//! are retried.

pub mod mongo;
pub mod mongo_repair;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use futures::{pin_mut, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::config::ReconcileConfig;
use crate::error::Error;
use crate::sink::SinkReader;

/// Event types of the outbox rows written by the tools (visible in headers and sinks' logs).
pub const REPAIR_EVENT_TYPE: &str = "dualsync.Repaired";
pub const SNAPSHOT_EVENT_TYPE: &str = "dualsync.Snapshot";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// In the primary, absent (or a tombstone) in the sink.
    Missing,
    /// The sink holds an older version than the newest event of the key (outbox row, or
    /// MongoDB change): the pipeline has not applied it yet, or lost it.
    Stale,
    /// Live in the sink, gone from the primary.
    Extra,
    /// Same or newer version, different content.
    Different,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mismatch {
    pub aggregate: String,
    pub key: String,
    pub kind: MismatchKind,
    pub sink_version: Option<i64>,
    /// Newest outbox `seq` of the key still in the outbox (rows are purged after retention).
    pub newest_outbox_seq: Option<i64>,
    /// MongoDB primary: version of the newest change of the key the change stream still
    /// holds, when newer than the sink's (what makes it stale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_change_version: Option<i64>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    pub aggregate: String,
    pub primary_rows: u64,
    pub sink_live: u64,
    pub sink_tombstones: u64,
    pub matching: u64,
    pub by_kind: BTreeMap<MismatchKind, u64>,
    pub mismatches: Vec<Mismatch>,
}

/// Order-independent hash of a JSON document (object keys sorted), so the primary's rows
/// need not be kept in memory, only their hashes.
pub fn content_hash(value: &serde_json::Value) -> u64 {
    fn feed(v: &serde_json::Value, h: &mut std::collections::hash_map::DefaultHasher) {
        use serde_json::Value::*;
        match v {
            Null => 0u8.hash(h),
            Bool(b) => (1u8, b).hash(h),
            Number(n) => (2u8, n.to_string()).hash(h),
            String(s) => (3u8, s).hash(h),
            Array(items) => {
                (4u8, items.len()).hash(h);
                items.iter().for_each(|i| feed(i, h));
            }
            Object(map) => {
                (5u8, map.len()).hash(h);
                let mut keys: Vec<&std::string::String> = map.keys().collect();
                keys.sort();
                for k in keys {
                    k.hash(h);
                    feed(&map[k], h);
                }
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    feed(value, &mut h);
    h.finish()
}

/// `SELECT key, doc FROM table` for `config` (row alias `t`).
fn select_sql(config: &ReconcileConfig) -> String {
    format!(
        "SELECT {key}::text, ({doc})::jsonb FROM {table} t",
        key = config.key,
        doc = config.doc,
        table = config.table
    )
}

/// Rows in the primary table (for progress bars).
pub async fn primary_count(source: &Client, config: &ReconcileConfig) -> Result<u64, Error> {
    let row = source
        .query_one(&format!("SELECT count(*) FROM {}", config.table), &[])
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Primary documents projected through the sink per round trip.
const PROJECT_CHUNK: usize = 1000;

/// Compares `aggregate` in the primary with the sink. `on_progress(rows)` is called as rows
/// of the primary and then of the sink are read.
pub async fn verify<S: SinkReader>(
    source: &Client,
    sink: &S,
    aggregate: &str,
    config: &ReconcileConfig,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<VerifyReport, Error> {
    let mut report = VerifyReport {
        aggregate: aggregate.to_string(),
        ..VerifyReport::default()
    };
    // Streamed: memory holds a key and a hash per row, not the documents.
    let mut primary: HashMap<String, u64> = HashMap::new();
    let rows = source
        .query_raw(&select_sql(config), std::iter::empty::<i64>())
        .await?;
    pin_mut!(rows);
    // In chunks, through the sink's projection: a column table holds only the mapped fields.
    let mut chunk: Vec<(String, serde_json::Value)> = Vec::with_capacity(PROJECT_CHUNK);
    loop {
        let row = rows.try_next().await?;
        if let Some(row) = &row {
            chunk.push((row.get(0), row.get(1)));
        }
        if chunk.len() == PROJECT_CHUNK || (row.is_none() && !chunk.is_empty()) {
            let (keys, docs): (Vec<String>, Vec<serde_json::Value>) = chunk.drain(..).unzip();
            let projected = sink.project(aggregate, &docs).await?;
            on_progress(keys.len() as u64);
            for (key, doc) in keys.into_iter().zip(projected) {
                // A document the sink cannot hold never matches what it holds.
                let hash = doc.as_ref().map_or(u64::MAX, content_hash);
                primary.insert(key, hash);
            }
        }
        if row.is_none() {
            break;
        }
    }
    report.primary_rows = primary.len() as u64;
    let newest: HashMap<String, i64> = source
        .query(
            "SELECT aggregateid, max(seq) FROM dualsync.outbox WHERE aggregatetype = $1 GROUP BY 1",
            &[&aggregate],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let mut mismatch = |key: &str, kind, sink_version| {
        *report.by_kind.entry(kind).or_insert(0) += 1;
        report.mismatches.push(Mismatch {
            aggregate: aggregate.to_string(),
            key: key.to_string(),
            kind,
            sink_version,
            newest_outbox_seq: newest.get(key).copied(),
            newest_change_version: None,
        });
    };
    let behind = |key: &str, version: i64| newest.get(key).is_some_and(|seq| *seq > version);
    let mut after: Option<String> = None;
    loop {
        let page = sink.scan(aggregate, after.as_deref(), 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        on_progress(page.len() as u64);
        for (key, version, doc) in page {
            let in_primary = primary.remove(&key);
            match (doc, in_primary) {
                (Some(doc), Some(hash)) => {
                    report.sink_live += 1;
                    if content_hash(&doc) == hash {
                        report.matching += 1;
                    } else if behind(&key, version) {
                        mismatch(&key, MismatchKind::Stale, Some(version));
                    } else {
                        mismatch(&key, MismatchKind::Different, Some(version));
                    }
                }
                (Some(_), None) => {
                    report.sink_live += 1;
                    mismatch(&key, MismatchKind::Extra, Some(version));
                }
                (None, Some(_)) => {
                    report.sink_tombstones += 1;
                    let kind = if behind(&key, version) {
                        MismatchKind::Stale
                    } else {
                        MismatchKind::Missing
                    };
                    mismatch(&key, kind, Some(version));
                }
                (None, None) => {
                    report.sink_tombstones += 1;
                    report.matching += 1;
                }
            }
        }
    }
    let mut never_arrived: Vec<String> = primary.into_keys().collect();
    never_arrived.sort();
    for key in never_arrived {
        mismatch(&key, MismatchKind::Missing, None);
    }
    Ok(report)
}

/// Inserts one outbox row per key with the primary's current state of that key (a delete
/// when the row is gone), under the per-aggregate lock (see the module doc). Returns how many
/// were emitted; keys whose lock is busy are retried until all are done.
pub async fn emit_current_state(
    source: &mut Client,
    aggregate: &str,
    config: &ReconcileConfig,
    keys: &[String],
    event_type: &str,
) -> Result<u64, Error> {
    let mut pending: Vec<String> = keys.to_vec();
    let mut emitted = 0;
    let mut pause = Duration::from_millis(5);
    while !pending.is_empty() {
        let tx = source.transaction().await?;
        let locked: Vec<String> = tx
            .query(
                "SELECT k FROM unnest($2::text[]) k
                 WHERE pg_try_advisory_xact_lock(hashtextextended($1 || '/' || k, 0))",
                &[&aggregate, &pending],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        // A separate statement, so its snapshot is taken after the locks are held.
        let sql = format!(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             SELECT $1, k, $3, (SELECT ({doc})::jsonb FROM {table} t WHERE {key}::text = k)
             FROM unnest($2::text[]) k",
            doc = config.doc,
            table = config.table,
            key = config.key
        );
        emitted += tx
            .execute(&sql, &[&aggregate, &locked, &event_type])
            .await?;
        tx.commit().await?;
        pending.retain(|k| !locked.contains(k));
        if !pending.is_empty() {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
    Ok(emitted)
}

/// Where a snapshot of `aggregate` stands (kept in the source database so an interrupted
/// snapshot resumes after its last committed batch).
const PROGRESS_DDL: &str = "CREATE TABLE IF NOT EXISTS dualsync.snapshot_progress (
    aggregatetype text PRIMARY KEY,
    last_key      text,
    rows_emitted  bigint NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
)";

#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    pub aggregate: String,
    pub rows_emitted: i64,
    /// True when this run continued an interrupted snapshot.
    pub resumed: bool,
}

/// Emits every row of the aggregate's table as an event, `batch` keys per transaction, in
/// key order, recording progress with each batch. `restart` forgets an earlier run.
pub async fn snapshot(
    source: &mut Client,
    aggregate: &str,
    config: &ReconcileConfig,
    batch: usize,
    restart: bool,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<SnapshotReport, Error> {
    source.batch_execute(PROGRESS_DDL).await?;
    if restart {
        source
            .execute(
                "DELETE FROM dualsync.snapshot_progress WHERE aggregatetype = $1",
                &[&aggregate],
            )
            .await?;
    }
    let existing = source
        .query_opt(
            "SELECT last_key, rows_emitted, finished_at IS NOT NULL
             FROM dualsync.snapshot_progress WHERE aggregatetype = $1",
            &[&aggregate],
        )
        .await?;
    let (mut last_key, mut emitted, resumed) = match existing {
        // A finished snapshot is started over: that is what a new `snapshot` asks for.
        Some(r) if !r.get::<_, bool>(2) => (r.get::<_, Option<String>>(0), r.get(1), true),
        _ => {
            source
                .execute(
                    "INSERT INTO dualsync.snapshot_progress (aggregatetype) VALUES ($1)
                     ON CONFLICT (aggregatetype) DO UPDATE
                     SET last_key = NULL, rows_emitted = 0, started_at = now(), finished_at = NULL",
                    &[&aggregate],
                )
                .await?;
            (None, 0i64, false)
        }
    };
    on_progress(emitted as u64);
    let page_sql = format!(
        "SELECT {key}::text FROM {table} t WHERE $1::text IS NULL OR {key}::text > $1
         ORDER BY 1 LIMIT $2",
        key = config.key,
        table = config.table
    );
    loop {
        let keys: Vec<String> = source
            .query(&page_sql, &[&last_key, &(batch as i64)])
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let Some(last) = keys.last().cloned() else {
            break;
        };
        let n = emit_current_state(source, aggregate, config, &keys, SNAPSHOT_EVENT_TYPE).await?;
        emitted += n as i64;
        // Progress is recorded after the batch's rows are committed: a crash in between
        // emits that batch again, which the version guard absorbs.
        source
            .execute(
                "UPDATE dualsync.snapshot_progress SET last_key = $2, rows_emitted = $3
                 WHERE aggregatetype = $1",
                &[&aggregate, &last, &emitted],
            )
            .await?;
        last_key = Some(last);
        on_progress(n);
    }
    source
        .execute(
            "UPDATE dualsync.snapshot_progress SET finished_at = now() WHERE aggregatetype = $1",
            &[&aggregate],
        )
        .await?;
    Ok(SnapshotReport {
        aggregate: aggregate.to_string(),
        rows_emitted: emitted,
        resumed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_hash_ignores_key_order_but_not_values() {
        let a = json!({"a": 1, "b": [1, {"x": null, "y": "s"}]});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"b": [1, {"y": "s", "x": null}], "a": 1}"#).unwrap();
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_ne!(
            content_hash(&a),
            content_hash(&json!({"a": 2, "b": [1, {"x": null, "y": "s"}]}))
        );
        assert_ne!(content_hash(&json!([1, 2])), content_hash(&json!([2, 1])));
        assert_ne!(content_hash(&json!("1")), content_hash(&json!(1)));
    }
}
