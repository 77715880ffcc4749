//! Secondary stores. Both sinks keep, with every record, the version of the event that wrote
//! it, and apply an event only when its version is newer: that single rule makes replays,
//! duplicates and late out-of-order deliveries harmless.

pub mod memory;
pub mod mongo;
pub mod postgres;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use crate::codec::OutboxEvent;
use crate::error::Error;

/// One change to apply: the current state of `key` in `namespace` as of `version`.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRecord {
    /// Aggregate type: the table or collection.
    pub namespace: String,
    /// Aggregate id: the primary key / `_id`.
    pub key: String,
    pub version: i64,
    /// `None` writes a tombstone (a delete that remembers its version).
    pub document: Option<serde_json::Value>,
}

impl From<OutboxEvent> for SinkRecord {
    fn from(e: OutboxEvent) -> Self {
        Self {
            namespace: e.aggregate_type,
            key: e.aggregate_id,
            version: e.version,
            document: e.payload,
        }
    }
}

/// A record as a sink holds it: key, version, document (`None` = tombstone).
pub type StoredRecord = (String, i64, Option<serde_json::Value>);

/// What a batch write did.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// Records written (newer than what the sink held), by index into the batch passed to
    /// [`Sink::apply`]: only these count for the end-to-end lag (a replay is not lag).
    pub written: Vec<usize>,
    /// Records ignored because the sink already held that version or a newer one.
    pub stale: u64,
    /// Records the sink refused for good while the rest of the batch went in, by index into
    /// the batch passed to [`Sink::apply`].
    pub rejected: Vec<(usize, Error)>,
}

impl ApplyOutcome {
    /// How many records were written.
    pub fn applied(&self) -> u64 {
        self.written.len() as u64
    }
}

/// A secondary store.
///
/// Delivery contract: the input is at-least-once and may be replayed from any earlier point,
/// so `apply` must be idempotent and version-guarded. A record whose version is not newer than
/// the stored one (live or tombstone) changes nothing. When `apply` returns `Ok`, every record
/// not listed in `rejected` is durably written or was stale; only then may the caller commit
/// the input position. On `Err` nothing may be assumed written (a retry is safe).
pub trait Sink: Send + Sync + 'static {
    /// Writes a batch. Records of one key may appear several times; the newest version wins
    /// (the older ones count as stale). When the newest version of a key is `rejected`, apply
    /// writes that key's older versions of the batch again, so the sink ends as if the events
    /// had been applied one by one.
    fn apply(
        &self,
        batch: &[SinkRecord],
    ) -> impl Future<Output = Result<ApplyOutcome, Error>> + Send;

    /// A call got no answer within its client-side deadline and was abandoned: drop any
    /// connection that may be half-open, so the retry starts on a new one.
    fn reset(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// One cycle of the tombstone purge of the namespaces this sink has seen, in two phases
    /// so that no member's write can race it into a resurrection:
    ///
    /// 1. raise the namespace's purge horizon to the newest tombstone older than
    ///    `older_than` (the horizon in force from then on);
    /// 2. in a later cycle, at least `grace` after that raise, delete the tombstones the
    ///    raised horizon covers, in bounded chunks.
    ///
    /// A write that read the horizon before the raise still finds the tombstones, as long as
    /// no write takes longer than `grace`. Returns the number of tombstones deleted.
    fn purge_tombstones(
        &self,
        older_than: Duration,
        grace: Duration,
    ) -> impl Future<Output = Result<u64, Error>> + Send;
}

/// Tombstones one purge statement deletes: a short statement, so a purge never holds the
/// sink (or a connection apply writes through) for long.
pub const PURGE_CHUNK: i64 = 1000;

/// Reading a sink back, for `verify` (and tests): not part of the apply loop's contract, so a
/// sink's write path never depends on it.
pub trait SinkReader: Send + Sync + 'static {
    /// Up to `limit` records of `namespace` whose keys sort after `after`, in key order:
    /// `(key, version, document or None for a tombstone)`. Used by `verify` to find every
    /// record, including those the primary no longer has.
    fn scan(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredRecord>, Error>> + Send;

    /// How this sink would hold each of `docs` (primary documents of `namespace`), in the
    /// form `scan` reports, so `verify` compares like with like: the documents themselves,
    /// unless the sink keeps only part of them (a PostgreSQL column table). `None` for a
    /// document the sink cannot hold.
    fn project(
        &self,
        namespace: &str,
        docs: &[serde_json::Value],
    ) -> impl Future<Output = Result<Vec<Option<serde_json::Value>>, Error>> + Send {
        let _ = namespace;
        let projected = docs.iter().cloned().map(Some).collect();
        async move { Ok(projected) }
    }

    /// The records of those of `keys` the sink holds, in any order (for `verify` of a MongoDB
    /// primary, which reads the primary in its own key order and asks the sink for each batch).
    fn get_many(
        &self,
        namespace: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<StoredRecord>, Error>> + Send {
        async move {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some((version, doc)) = self.get(namespace, key).await? {
                    out.push((key.clone(), version, doc));
                }
            }
            Ok(out)
        }
    }

    /// Current state of `key` (for tests and `verify`): `(version, document or None if deleted)`.
    fn get(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<(i64, Option<serde_json::Value>)>, Error>> + Send;
}

/// Keeps, per (namespace, key), only the record with the highest version, remembering the
/// indexes of the records that were dropped as stale. Applying the survivors with the version
/// guard gives the same result as applying the whole batch one by one in any order.
pub fn newest_per_key(batch: &[SinkRecord]) -> (Vec<usize>, u64) {
    let mut best: HashMap<(&str, &str), usize> = HashMap::with_capacity(batch.len());
    for (i, r) in batch.iter().enumerate() {
        best.entry((r.namespace.as_str(), r.key.as_str()))
            .and_modify(|j| {
                if batch[*j].version < r.version {
                    *j = i;
                }
            })
            .or_insert(i);
    }
    let mut kept: Vec<usize> = best.into_values().collect();
    kept.sort_unstable();
    let dropped = (batch.len() - kept.len()) as u64;
    (kept, dropped)
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(key: &str, version: i64) -> SinkRecord {
        SinkRecord {
            namespace: "n".into(),
            key: key.into(),
            version,
            document: Some(serde_json::json!({ "v": version })),
        }
    }

    proptest! {
        /// Folding the whole batch through the version guard equals applying the survivors.
        #[test]
        fn newest_per_key_matches_sequential_guard(events in prop::collection::vec((0u8..5, 0i64..20), 0..60)) {
            let batch: Vec<_> = events.iter().map(|(k, v)| rec(&k.to_string(), *v)).collect();
            let mut sequential: HashMap<String, i64> = HashMap::new();
            for r in &batch {
                let cur = sequential.entry(r.key.clone()).or_insert(i64::MIN);
                if r.version > *cur { *cur = r.version; }
            }
            let (kept, dropped) = newest_per_key(&batch);
            prop_assert_eq!(kept.len() as u64 + dropped, batch.len() as u64);
            let survivors: HashMap<String, i64> = kept.iter().map(|&i| (batch[i].key.clone(), batch[i].version)).collect();
            prop_assert_eq!(survivors, sequential);
        }
    }

    #[test]
    fn quote_ident_escapes_quotes() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
    }
}
