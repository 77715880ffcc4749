//! What the MongoDB sink must do the same on every MongoDB-wire server it writes to. These tests
//! run in both passes of `make test`: against SecantusDB, and against FerretDB (scripts/test.sh
//! points DUALSYNC_TEST_MONGO_URL at it), whose answers differ from MongoDB's where noted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mongodb::bson::{doc, Document};
use serde_json::json;

use dualsync::sink::mongo::CommandInterceptor;
use dualsync::sink::{Sink, SinkReader, SinkRecord};

use crate::common::*;

fn record(key: &str, version: i64) -> SinkRecord {
    SinkRecord {
        namespace: "customers".into(),
        key: key.into(),
        version,
        document: Some(json!({"v": version})),
    }
}

/// A stale record in the middle of a batch collides on `_id` (its stored version is newer).
/// MongoDB runs an unordered `update` to the end and reports the collision at its index;
/// FerretDB 1.24 stops at the first failing statement and reports it at index 0 without `n`.
/// Either way every other record of the batch must be written: none may be counted written
/// that is not stored (apply would commit its offset and the change would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_record_mid_batch_does_not_cost_the_records_after_it() {
    let sink = fresh_mongo_sink(&servers()).await;
    sink.apply(&[record("b", 9)]).await.unwrap();
    let outcome = sink
        .apply(&[
            record("a", 1),
            record("b", 3),
            record("c", 1),
            record("d", 1),
        ])
        .await
        .unwrap();
    for (key, version) in [("a", 1), ("b", 9), ("c", 1), ("d", 1)] {
        let stored = sink.get("customers", key).await.unwrap().map(|(v, _)| v);
        assert_eq!(stored, Some(version), "{key}");
    }
    // `a` may count as stale: on FerretDB it went in with the first command and collided when
    // sent again on its own, as a record does when MongoDB's batch is retried.
    let mut written = outcome.written.clone();
    written.sort_unstable();
    assert!(written == [0, 2, 3] || written == [2, 3], "{written:?}");
    assert_eq!(outcome.applied() + outcome.stale, 4);
    assert!(outcome.rejected.is_empty());
}

/// FerretDB's reply to an `update` that stopped at a collision, given in the server's place for
/// the first command (nothing of it was written): one write error at index 0, no `n`. The sink
/// cannot tell from it which statements ran, so it must not count any of them written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_that_does_not_account_for_every_statement_is_not_taken_as_written() {
    let servers = servers();
    let calls = Arc::new(AtomicUsize::new(0));
    let stopped_early: CommandInterceptor = {
        let calls = calls.clone();
        Arc::new(move |_: &Document| {
            (calls.fetch_add(1, Ordering::SeqCst) == 0).then(|| {
                doc! {"ok": 1.0, "writeErrors": [{"index": 0, "code": 11000,
                "errmsg": "E11000 duplicate key error collection: t.customers"}]}
            })
        })
    };
    let sink = fresh_mongo_sink(&servers)
        .await
        .with_interceptor(stopped_early);
    let outcome = sink
        .apply(&[record("a", 1), record("b", 1), record("c", 1)])
        .await
        .unwrap();
    for key in ["a", "b", "c"] {
        let stored = sink.get("customers", key).await.unwrap().map(|(v, _)| v);
        assert_eq!(stored, Some(1), "{key}");
    }
    assert_eq!((outcome.applied(), outcome.stale), (3, 0));
    assert!(calls.load(Ordering::SeqCst) > 1);
}
