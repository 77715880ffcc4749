//! An in-memory sink that keeps the [`Sink`] contract: the reference for what a sink must do,
//! and the seam that lets apply be tested in-process, without servers (as supabase/etl's
//! `destination/memory.rs`). Not for pipelines: nothing is durable.
//!
//! What it keeps of the contract: the newest version of a key in a batch wins
//! ([`newest_per_key`]), a record not newer than the one held (live or tombstone) changes
//! nothing and counts as stale, a tombstone remembers its version. What a test can make it do:
//! refuse records for good ([`MemorySink::refusing`]), either one by one as MongoDB's bulk
//! writes do or by failing the whole batch as a PostgreSQL statement does, and fail the next
//! calls with a transient error ([`MemorySink::fail_next`]). The purge horizon of the real
//! sinks is left out: [`Sink::purge_tombstones`] deletes the tombstones at once.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::{newest_per_key, ApplyOutcome, Sink, SinkReader, SinkRecord, StoredRecord};
use crate::error::Error;

/// What the sink holds: `(namespace, key) → (version, document or None for a tombstone)`.
pub type Held = BTreeMap<(String, String), (i64, Option<serde_json::Value>)>;

/// Which records the sink refuses for good.
type Refuse = Box<dyn Fn(&SinkRecord) -> bool + Send + Sync>;

/// How a refused record fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The rest of the batch goes in; the refused records are listed in
    /// [`ApplyOutcome::rejected`] (MongoDB's unordered bulk write).
    PerRecord,
    /// The batch fails as a whole with the refusal (a PostgreSQL statement): apply narrows it
    /// down to find the record.
    WholeBatch,
}

/// The in-memory sink (see the module's doc).
pub struct MemorySink {
    records: Mutex<Held>,
    refuse: Option<(Refuse, Refusal)>,
    failures: Mutex<VecDeque<Error>>,
    calls: Mutex<Vec<Vec<SinkRecord>>>,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySink {
    /// An empty sink that refuses nothing.
    pub fn new() -> Self {
        Self {
            records: Mutex::new(BTreeMap::new()),
            refuse: None,
            failures: Mutex::new(VecDeque::new()),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// A sink that refuses for good every record `refuse` picks, the way `how` says.
    pub fn refusing(
        refuse: impl Fn(&SinkRecord) -> bool + Send + Sync + 'static,
        how: Refusal,
    ) -> Self {
        Self {
            refuse: Some((Box::new(refuse), how)),
            ..Self::new()
        }
    }

    /// The next call of [`Sink::apply`] fails with `error` (queued: one error per call).
    pub fn fail_next(&self, error: Error) {
        self.failures.lock().expect("not poisoned").push_back(error);
    }

    /// Every batch [`Sink::apply`] was called with, in order (failed calls included).
    pub fn calls(&self) -> Vec<Vec<SinkRecord>> {
        self.calls.lock().expect("not poisoned").clone()
    }

    /// What the sink holds.
    pub fn records(&self) -> Held {
        self.records.lock().expect("not poisoned").clone()
    }

    fn refused(&self, record: &SinkRecord) -> Option<Refusal> {
        self.refuse
            .as_ref()
            .and_then(|(refuse, how)| refuse(record).then_some(*how))
    }
}

fn refusal(record: &SinkRecord) -> Error {
    Error::Rejected(format!(
        "memory sink refused {}/{} version {}",
        record.namespace, record.key, record.version
    ))
}

impl Sink for MemorySink {
    async fn apply(&self, batch: &[SinkRecord]) -> Result<ApplyOutcome, Error> {
        self.calls
            .lock()
            .expect("not poisoned")
            .push(batch.to_vec());
        if let Some(error) = self.failures.lock().expect("not poisoned").pop_front() {
            return Err(error);
        }
        let (kept, stale) = newest_per_key(batch);
        if let Some(&i) = kept
            .iter()
            .find(|&&i| self.refused(&batch[i]) == Some(Refusal::WholeBatch))
        {
            return Err(refusal(&batch[i]));
        }
        let mut outcome = ApplyOutcome {
            stale,
            ..ApplyOutcome::default()
        };
        let mut records = self.records.lock().expect("not poisoned");
        for i in kept {
            let r = &batch[i];
            if self.refused(r).is_some() {
                outcome.rejected.push((i, refusal(r)));
                continue;
            }
            let key = (r.namespace.clone(), r.key.clone());
            match records.get(&key) {
                Some((held, _)) if *held >= r.version => outcome.stale += 1,
                _ => {
                    records.insert(key, (r.version, r.document.clone()));
                    outcome.written.push(i);
                }
            }
        }
        Ok(outcome)
    }

    async fn purge_tombstones(
        &self,
        _older_than: Duration,
        _grace: Duration,
    ) -> Result<u64, Error> {
        let mut records = self.records.lock().expect("not poisoned");
        let before = records.len();
        records.retain(|_, (_, document)| document.is_some());
        Ok((before - records.len()) as u64)
    }
}

impl SinkReader for MemorySink {
    async fn scan(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        let records = self.records.lock().expect("not poisoned");
        Ok(records
            .iter()
            .filter(|((ns, key), _)| ns == namespace && after.is_none_or(|a| key.as_str() > a))
            .take(limit)
            .map(|((_, key), (version, doc))| (key.clone(), *version, doc.clone()))
            .collect())
    }

    async fn get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<(i64, Option<serde_json::Value>)>, Error> {
        let records = self.records.lock().expect("not poisoned");
        Ok(records
            .get(&(namespace.to_string(), key.to_string()))
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(key: &str, version: i64, doc: Option<serde_json::Value>) -> SinkRecord {
        SinkRecord {
            namespace: "orders".into(),
            key: key.into(),
            version,
            document: doc,
        }
    }

    /// The version guard: the newest of a batch wins, nothing older than what is held goes
    /// in, and a tombstone keeps its version against late older events.
    #[tokio::test]
    async fn keeps_the_version_guard() {
        let sink = MemorySink::new();
        let first = [
            rec("a", 1, Some(json!({"v": 1}))),
            rec("a", 3, Some(json!({"v": 3}))),
            rec("a", 2, Some(json!({"v": 2}))),
            rec("b", 5, None),
        ];
        let outcome = sink.apply(&first).await.unwrap();
        assert_eq!((outcome.written, outcome.stale), (vec![1, 3], 2));
        let late = [
            rec("a", 2, Some(json!({"v": 2}))),
            rec("b", 4, Some(json!({}))),
        ];
        let outcome = sink.apply(&late).await.unwrap();
        assert_eq!((outcome.applied(), outcome.stale), (0, 2));
        assert_eq!(
            sink.get("orders", "a").await.unwrap(),
            Some((3, Some(json!({"v": 3}))))
        );
        assert_eq!(sink.get("orders", "b").await.unwrap(), Some((5, None)));
        assert_eq!(
            sink.purge_tombstones(Duration::ZERO, Duration::ZERO)
                .await
                .unwrap(),
            1
        );
        assert_eq!(sink.scan("orders", None, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn refuses_per_record_or_the_whole_batch() {
        let poison = |r: &SinkRecord| r.key == "bad";
        let batch = [
            rec("ok", 1, Some(json!({}))),
            rec("bad", 1, Some(json!({}))),
        ];
        let per_record = MemorySink::refusing(poison, Refusal::PerRecord);
        let outcome = per_record.apply(&batch).await.unwrap();
        assert_eq!(outcome.written, vec![0]);
        assert_eq!(outcome.rejected.len(), 1);
        assert_eq!(outcome.rejected[0].0, 1);
        let whole = MemorySink::refusing(poison, Refusal::WholeBatch);
        assert!(matches!(whole.apply(&batch).await, Err(Error::Rejected(_))));
        assert!(
            whole.records().is_empty(),
            "nothing of a refused batch is written"
        );
    }
}
