//! One suite, run against both real sinks: the version guard.

use serde_json::json;

use dualsync::config::{ColumnTableConfig, PostgresSinkConfig, Secret};
use dualsync::error::{classify, Disposition};
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::{Sink, SinkReader, SinkRecord};

use crate::common::*;

fn rec(key: &str, version: i64, doc: Option<serde_json::Value>) -> SinkRecord {
    SinkRecord {
        namespace: "things".into(),
        key: key.into(),
        version,
        document: doc,
    }
}

async fn version_guard_suite<S: Sink + SinkReader>(sink: &S) {
    // Newest first, then older ones: the newest stays.
    let o = sink
        .apply(&[rec("a", 30, Some(json!({"n": 30})))])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale), (1, 0));
    let o = sink
        .apply(&[
            rec("a", 10, Some(json!({"n": 10}))),
            rec("a", 20, Some(json!({"n": 20}))),
        ])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale), (0, 2));
    assert_eq!(
        sink.get("things", "a").await.unwrap(),
        Some((30, Some(json!({"n": 30}))))
    );

    // Duplicates change nothing.
    let o = sink
        .apply(&[rec("a", 30, Some(json!({"n": 30})))])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale), (0, 1));

    // Several versions of one key in one batch: the newest wins whatever the order.
    let o = sink
        .apply(&[
            rec("b", 5, Some(json!({"n": 5}))),
            rec("b", 7, Some(json!({"n": 7}))),
            rec("b", 6, Some(json!({"n": 6}))),
        ])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale), (1, 2));
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
    assert_eq!((o.applied(), o.stale), (0, 1));
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
        sink.purge_tombstones(
            std::time::Duration::from_secs(3600),
            std::time::Duration::ZERO
        )
        .await
        .unwrap(),
        0
    );
    let purged = std::sync::atomic::AtomicU64::new(0);
    eventually("the tombstone is purged", || async {
        let n = sink
            .purge_tombstones(std::time::Duration::ZERO, std::time::Duration::ZERO)
            .await
            .unwrap();
        purged.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n >= 1
    })
    .await;
    assert_eq!(purged.into_inner(), 1);
    assert_eq!(sink.get("things", "c").await.unwrap(), None);

    // The outcome names the records written (apply's lag counts only those): a new key, and
    // the newest of two versions of another; not a stale one nor the older duplicate.
    let o = sink
        .apply(&[
            rec("e", 2, Some(json!({"n": 2}))),
            rec("a", 5, Some(json!({"n": 5}))),
            rec("f", 5, Some(json!({"n": 5}))),
            rec("e", 1, Some(json!({"n": 1}))),
        ])
        .await
        .unwrap();
    assert_eq!((written(&o), o.stale), (vec![0, 2], 2));
}

/// The indexes an outcome says were written, in order.
fn written(o: &dualsync::sink::ApplyOutcome) -> Vec<usize> {
    let mut w = o.written.clone();
    w.sort_unstable();
    w
}

#[tokio::test]
async fn postgres_sink_version_guard() {
    let sink = fresh_postgres_sink(&servers()).await;
    version_guard_suite(&sink).await;
}

#[tokio::test]
async fn mongo_sink_version_guard() {
    let sink = fresh_mongo_sink(&servers()).await;
    version_guard_suite(&sink).await;
}

/// A PostgreSQL sink whose aggregate types `mapped` are column tables (from TOML, as a user
/// writes them).
async fn column_sink(tables_toml: &str) -> (PostgresSink, tokio_postgres::Client) {
    let servers = servers();
    let url = create_database(&servers).await;
    let tables: std::collections::BTreeMap<String, ColumnTableConfig> =
        toml::from_str(tables_toml).unwrap();
    let sink = PostgresSink::connect(&PostgresSinkConfig {
        url: Secret::new(url.clone()),
        schema: "replica".into(),
        tombstone_retention_secs: 60,
        timeout_ms: 30_000,
        tables,
    })
    .await
    .unwrap();
    (sink, dualsync::pg::connect(&url).await.unwrap())
}

#[tokio::test]
async fn postgres_column_table_version_guard() {
    let (sink, _) = column_sink("[things]\ncolumns = [{ name = \"n\", type = \"bigint\" }]").await;
    version_guard_suite(&sink).await;
}

#[tokio::test]
async fn postgres_column_table_casts_fields_and_rejects_what_does_not_cast() {
    let (sink, client) = column_sink(
        r#"[things]
table = "thing_rows"
key_column = "thing_id"
columns = [
  { name = "title", type = "text", field = "name" },
  { name = "qty", type = "integer" },
  { name = "price", type = "numeric" },
  { name = "active", type = "boolean" },
  { name = "city", type = "text", field = "address.city" },
  { name = "tags", type = "jsonb" },
  { name = "seen_at", type = "timestamptz" },
]"#,
    )
    .await;
    let full = json!({
        "name": "lamp", "qty": 3, "price": 12.5, "active": true,
        "address": {"city": "Lyon", "zip": "69001"}, "tags": ["a", "b"],
        "seen_at": "2026-11-23T10:00:00Z", "not_mapped": 1,
    });
    sink.apply(&[
        rec("t1", 1, Some(full.clone())),
        rec("t2", 1, Some(json!({"name": "bare", "tags": null}))),
    ])
    .await
    .unwrap();

    // The table has exactly the mapped columns, typed, under the configured names.
    let columns: Vec<(String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = 'replica' AND table_name = 'thing_rows' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "thing_id",
            "title",
            "qty",
            "price",
            "active",
            "city",
            "tags",
            "seen_at",
            "version",
            "deleted",
            "updated_at"
        ]
    );
    assert_eq!(columns[2].1, "integer");
    assert_eq!(columns[7].1, "timestamp with time zone");
    let row = client
        .query_one(
            "SELECT title, qty, price::text, active, city, tags, seen_at = '2026-11-23T10:00:00Z'
             FROM replica.thing_rows WHERE thing_id = 't1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "lamp");
    assert_eq!(row.get::<_, i32>(1), 3);
    assert_eq!(row.get::<_, String>(2), "12.5");
    assert!(row.get::<_, bool>(3));
    assert_eq!(row.get::<_, String>(4), "Lyon");
    assert_eq!(row.get::<_, serde_json::Value>(5), json!(["a", "b"]));
    assert!(row.get::<_, bool>(6));
    // Missing fields and JSON null are SQL NULL.
    let row = client
        .query_one(
            "SELECT qty IS NULL, tags IS NULL FROM replica.thing_rows WHERE thing_id = 't2'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));

    // `get`/`scan` rebuild the mapped fields, and `project` turns a primary document into
    // the same shape, so `verify` compares like with like.
    let (_, stored) = sink.get("things", "t1").await.unwrap().unwrap();
    let projected = sink
        .project("things", std::slice::from_ref(&full))
        .await
        .unwrap();
    assert_eq!(projected, vec![stored.clone()]);
    assert_eq!(stored.unwrap()["address.city"], "Lyon");

    // A value that does not cast is refused as a data error (dead-letter, not retry) and
    // projects to nothing.
    let bad = json!({"name": "x", "qty": "three"});
    let e = sink
        .apply(&[rec("t3", 1, Some(bad.clone()))])
        .await
        .unwrap_err();
    assert_eq!(classify(&e), Disposition::DeadLetter, "{e}");
    assert_eq!(sink.project("things", &[full, bad]).await.unwrap()[1], None);
    assert_eq!(sink.get("things", "t3").await.unwrap(), None);

    // A delete keeps a tombstone row with the columns emptied.
    sink.apply(&[rec("t1", 2, None)]).await.unwrap();
    assert_eq!(sink.get("things", "t1").await.unwrap(), Some((2, None)));
    let row = client
        .query_one(
            "SELECT deleted, title IS NULL FROM replica.thing_rows WHERE thing_id = 't1'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
}

/// After a tombstone is purged, a late event older than the purged delete (a replay of an old
/// dead letter, a consumer group reset) must not bring the record back: the sink keeps the
/// highest version it ever purged per aggregate type, and an event at or below it for a key
/// it does not hold is refused as `sink.below_purge_horizon` (dead-lettered, never silently
/// stale: it may as well be a first write). Newer events, and events of keys it still holds,
/// are applied.
async fn purge_horizon_suite<S: Sink + SinkReader>(sink: &S) {
    sink.apply(&[
        rec("x", 5, Some(json!({"n": 5}))),
        rec("live", 3, Some(json!({"n": 3}))),
    ])
    .await
    .unwrap();
    sink.apply(&[rec("x", 10, None)]).await.unwrap();
    eventually("the tombstone of x is purged", || async {
        sink.purge_tombstones(std::time::Duration::ZERO, std::time::Duration::ZERO)
            .await
            .unwrap();
        sink.get("things", "x").await.unwrap().is_none()
    })
    .await;
    // Late: older than the purged delete.
    let o = sink
        .apply(&[rec("x", 7, Some(json!({"n": 7})))])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale), (0, 0), "x stays deleted");
    assert_below_horizon(&o, &[0], 10);
    assert_eq!(sink.get("things", "x").await.unwrap(), None);
    // A key never seen, at or below the horizon: the sink cannot tell a first write from a
    // record older than a purged delete, so it refuses it with a class that says so (apply
    // dead-letters it): never written, never silently stale.
    let o = sink
        .apply(&[rec("y", 10, Some(json!({"n": 10})))])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale), (0, 0));
    assert_below_horizon(&o, &[0], 10);
    assert_eq!(sink.get("things", "y").await.unwrap(), None);
    // Newer than the horizon: applied; a key still held follows its own version.
    let o = sink
        .apply(&[
            rec("x", 11, Some(json!({"n": 11}))),
            rec("live", 4, Some(json!({"n": 4}))),
        ])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale), (2, 0));
    assert_eq!(
        sink.get("things", "live").await.unwrap(),
        Some((4, Some(json!({"n": 4}))))
    );
    // At or below the horizon, a held key is written and an unknown one is refused: the
    // outcome names which (MongoDB's reply only counts them).
    let o = sink
        .apply(&[
            rec("z", 9, Some(json!({"n": 9}))),
            rec("live", 5, Some(json!({"n": 5}))),
            rec("live", 4, Some(json!({"n": 4}))),
        ])
        .await
        .unwrap();
    assert_eq!((written(&o), o.stale), (vec![1], 1));
    assert_below_horizon(&o, &[0], 10);
    // A delete at or below the horizon of a key the sink does not hold changes nothing and
    // loses nothing (the key is absent either way): stale, not refused.
    let o = sink.apply(&[rec("gone", 8, None)]).await.unwrap();
    assert_eq!((o.applied(), o.stale, o.rejected.len()), (0, 1, 0));
    assert_eq!(sink.get("things", "gone").await.unwrap(), None);
    // A held key at or below the horizon whose stored version is newer is stale, as always.
    let o = sink
        .apply(&[rec("live", 2, Some(json!({"n": 2})))])
        .await
        .unwrap();
    assert_eq!((o.applied(), o.stale, o.rejected.len()), (0, 1, 0));
}

/// `outcome` refused exactly the records `indexes`, each as below the purge horizon `horizon`.
fn assert_below_horizon(o: &dualsync::sink::ApplyOutcome, indexes: &[usize], horizon: i64) {
    let refused: Vec<usize> = o.rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(refused, indexes, "{:?}", o.rejected);
    for (_, e) in &o.rejected {
        assert_eq!(e.class(), "sink.below_purge_horizon", "{e}");
        assert_eq!(classify(e), Disposition::DeadLetter, "{e}");
        assert!(e.to_string().contains(&format!("({horizon})")), "{e}");
        assert!(e.to_string().contains("verify --repair"), "{e}");
    }
}

#[tokio::test]
async fn postgres_sink_never_resurrects_a_record_whose_tombstone_was_purged() {
    let sink = fresh_postgres_sink(&servers()).await;
    purge_horizon_suite(&sink).await;
}

#[tokio::test]
async fn mongo_sink_never_resurrects_a_record_whose_tombstone_was_purged() {
    let sink = fresh_mongo_sink(&servers()).await;
    purge_horizon_suite(&sink).await;
}
