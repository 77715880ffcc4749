//! One suite, run against both real sinks: the version guard.

use serde_json::json;

use dualsync::config::{MongoSinkConfig, PostgresSinkConfig, Secret};
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::{Sink, SinkRecord};

use crate::common::*;

fn rec(key: &str, version: i64, doc: Option<serde_json::Value>) -> SinkRecord {
    SinkRecord {
        namespace: "things".into(),
        key: key.into(),
        version,
        document: doc,
    }
}

async fn version_guard_suite<S: Sink>(sink: &S) {
    // Newest first, then older ones: the newest stays.
    let o = sink
        .apply(&[rec("a", 30, Some(json!({"n": 30})))])
        .await
        .unwrap();
    assert_eq!((o.applied, o.stale), (1, 0));
    let o = sink
        .apply(&[
            rec("a", 10, Some(json!({"n": 10}))),
            rec("a", 20, Some(json!({"n": 20}))),
        ])
        .await
        .unwrap();
    assert_eq!((o.applied, o.stale), (0, 2));
    assert_eq!(
        sink.get("things", "a").await.unwrap(),
        Some((30, Some(json!({"n": 30}))))
    );

    // Duplicates change nothing.
    let o = sink
        .apply(&[rec("a", 30, Some(json!({"n": 30})))])
        .await
        .unwrap();
    assert_eq!((o.applied, o.stale), (0, 1));

    // Several versions of one key in one batch: the newest wins whatever the order.
    let o = sink
        .apply(&[
            rec("b", 5, Some(json!({"n": 5}))),
            rec("b", 7, Some(json!({"n": 7}))),
            rec("b", 6, Some(json!({"n": 6}))),
        ])
        .await
        .unwrap();
    assert_eq!((o.applied, o.stale), (1, 2));
    assert_eq!(
        sink.get("things", "b").await.unwrap(),
        Some((7, Some(json!({"n": 7}))))
    );

    // A delete leaves a tombstone; a late older upsert does not resurrect the record.
    sink.apply(&[rec("b", 8, None)]).await.unwrap();
    let o = sink
        .apply(&[rec("b", 7, Some(json!({"n": 7})))])
        .await
        .unwrap();
    assert_eq!((o.applied, o.stale), (0, 1));
    assert_eq!(sink.get("things", "b").await.unwrap(), Some((8, None)));
    // A newer upsert after the delete does bring it back.
    sink.apply(&[rec("b", 9, Some(json!({"n": 9})))])
        .await
        .unwrap();
    assert_eq!(
        sink.get("things", "b").await.unwrap(),
        Some((9, Some(json!({"n": 9}))))
    );

    // Old tombstones are purged; young ones are kept.
    sink.apply(&[rec("c", 1, None)]).await.unwrap();
    assert_eq!(
        sink.purge_tombstones(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    let purged = std::sync::atomic::AtomicU64::new(0);
    eventually("the tombstone is purged", || async {
        let n = sink
            .purge_tombstones(std::time::Duration::ZERO)
            .await
            .unwrap();
        purged.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n >= 1
    })
    .await;
    assert_eq!(purged.into_inner(), 1);
    assert_eq!(sink.get("things", "c").await.unwrap(), None);
}

#[tokio::test]
async fn postgres_sink_version_guard() {
    let servers = servers();
    let url = create_database(&servers).await;
    let sink = PostgresSink::connect(&PostgresSinkConfig {
        url: Secret::new(url),
        schema: "replica".into(),
        tombstone_retention_secs: 60,
    })
    .await
    .unwrap();
    version_guard_suite(&sink).await;
}

#[tokio::test]
async fn mongo_sink_version_guard() {
    let servers = servers();
    let sink = MongoSink::connect(&MongoSinkConfig {
        url: Secret::new(servers.mongo.clone()),
        database: unique("t"),
        tombstone_retention_secs: 60,
    })
    .await
    .unwrap();
    version_guard_suite(&sink).await;
}
