//! Records a sink refuses for good (issue #35 items 2 and 11): both sinks end as if the
//! events had been applied one by one, whatever else the batch held.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mongodb::bson::{doc, Document};
use rdkafka::Message;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::config::SinkConfig;
use dualsync::dlq::headers as dlq;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::{Sink, SinkReader, SinkRecord};

use crate::common::*;

/// One batch holds `k@1` (valid) and `k@2` (refused by the sink: a CHECK constraint on
/// PostgreSQL, a JSON-schema validator on MongoDB). Applied one by one, `k@1` is written and
/// `k@2` dead-lettered; both sinks must end there (MongoDB used to write only the newest
/// version of each key, so the refusal of `k@2` took `k@1` with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_newest_version_leaves_the_older_valid_one_in_both_sinks() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    let refused = format!("refused-{}", "x".repeat(30));
    // PostgreSQL: a CHECK constraint on the (created) table.
    let pg = postgres_sink(&config).await;
    pg.apply(&[SinkRecord::from(named_customer("seed", 1, "s"))])
        .await
        .unwrap();
    let replica = dualsync::pg::connect(&sink_url).await.unwrap();
    replica
        .batch_execute(
            "ALTER TABLE replica.customers ADD CONSTRAINT no_refused CHECK (doc->>'name' NOT LIKE 'refused%')",
        )
        .await
        .unwrap();
    // MongoDB: names of at most 20 characters.
    let SinkConfig::Mongodb(mongo) = &config.sinks["mongo"] else {
        unreachable!()
    };
    let client = mongodb::Client::with_uri_str(mongo.url.expose())
        .await
        .unwrap();
    client
        .database(&mongo.database)
        .create_collection("customers")
        .validator(
            doc! {"$jsonSchema": {"properties": {"name": {"bsonType": "string", "maxLength": 20}}}},
        )
        .await
        .unwrap();

    // Everything is on the topic before apply starts: one batch.
    let (topic, producer) = topic_with_producer(&config, "customers").await;
    let events = [
        named_customer("k", 1, "v1"),
        named_customer("other", 1, "o1"),
        named_customer("k", 2, &refused),
    ];
    produce_events(&producer, &topic, &events).await;

    let cancel = CancellationToken::new();
    let (pg_apply, _) = spawn_apply(&config, "postgres", &cancel);
    let (mongo_apply, _) = spawn_apply(&config, "mongo", &cancel);
    let letters = read_topic(&servers.kafka, &format!("{topic}.dlq"), 2).await;
    assert_eq!(letters.len(), 2, "one letter per sink");
    for letter in &letters {
        assert_eq!(letter.key(), Some(&b"k"[..]));
        assert_eq!(header(letter, dlq::OFFSET).as_deref(), Some("2"));
    }
    let mongo_sink = MongoSink::connect(mongo).await.unwrap();
    let v1 = Some((
        1,
        Some(json!({"id": "k", "name": "v1", "email": "e", "order_count": 1})),
    ));
    eventually("both sinks hold k@1 and other@1", || async {
        pg.get("customers", "other").await.unwrap().is_some()
            && mongo_sink
                .get("customers", "other")
                .await
                .unwrap()
                .is_some()
    })
    .await;
    assert_eq!(pg.get("customers", "k").await.unwrap(), v1, "PostgreSQL");
    assert_eq!(
        mongo_sink.get("customers", "k").await.unwrap(),
        v1,
        "MongoDB"
    );
    cancel.cancel();
    pg_apply.await.unwrap().unwrap();
    mongo_apply.await.unwrap().unwrap();
}

/// A unique secondary index on a MongoDB sink collection: a record whose value collides with
/// another key's is refused after the upsert rounds (an `_id` collision would have settled)
/// with the server's duplicate-key error, and the rest of the batch is written.
#[tokio::test]
async fn a_unique_secondary_index_refuses_the_colliding_record_after_the_rounds() {
    let servers = servers();
    let probe = fresh_mongo_sink(&servers).await;
    let db = probe.database().clone();
    db.collection::<Document>("things")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let updates = Arc::new(AtomicUsize::new(0));
    let counted = updates.clone();
    let config = dualsync::config::MongoSinkConfig {
        url: dualsync::config::Secret::new(servers.mongo.clone()),
        timeout_ms: 30_000,
        database: db.name().to_string(),
        tombstone_retention_secs: 3600,
    };
    let sink = MongoSink::connect(&config)
        .await
        .unwrap()
        .with_interceptor(Arc::new(move |command: &Document| {
            if command.contains_key("update") {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            None
        }));
    let rec = |key: &str, email: &str| SinkRecord {
        namespace: "things".into(),
        key: key.into(),
        version: 1,
        document: Some(json!({ "email": email })),
    };
    sink.apply(&[rec("a", "same@x")]).await.unwrap();
    updates.store(0, Ordering::SeqCst);
    let o = sink
        .apply(&[rec("b", "same@x"), rec("c", "other@x")])
        .await
        .unwrap();
    assert_eq!(o.written, vec![1], "{o:?}");
    assert_eq!(o.rejected.len(), 1, "{o:?}");
    let (index, error) = &o.rejected[0];
    assert_eq!(*index, 0);
    assert_eq!(
        dualsync::error::classify(error),
        dualsync::error::Disposition::DeadLetter
    );
    assert!(error.to_string().contains("E11000"), "{error}");
    assert_eq!(updates.load(Ordering::SeqCst), 3, "three upsert rounds");
    assert_eq!(sink.get("things", "b").await.unwrap(), None);
    assert!(sink.get("things", "c").await.unwrap().is_some());
}
