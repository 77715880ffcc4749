//! The MongoDB side of the delivery contract (issue #23, items 1, 2, 3, 6, 7): versions within
//! one multi-document transaction, per-document write errors, the first-insert race between
//! two apply processes, the connection string's write concern, and a paused relay's lease.
//!
//! SecantusDB is a single node that runs one statement at a time, so it cannot produce a
//! not-primary error, a write-concern timeout or the interleaving of two upserts. Those faults
//! are injected through [`MongoSink::with_interceptor`], which answers one `update` command in
//! the server's place with the reply a real replica set gives in that situation; everything
//! from that reply on (classification, retries, dead letters, offsets) is the real code path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mongodb::bson::{doc, Bson, Document};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use dualsync::config::{Config, MongoSinkConfig, SinkConfig};
use dualsync::error::{classify, Disposition, Error};
use dualsync::http::Control;
use dualsync::metrics::{total, Metrics};
use dualsync::sink::mongo::{CommandInterceptor, MongoSink};
use dualsync::sink::{Sink, SinkReader, SinkRecord};

use crate::common::*;
use crate::mongo_common::{converged, leads, mongo_pipeline, GENERIC};

/// Runs apply on the `mongo` sink of `config` with `sink` (built by the test).
fn spawn_apply_on(
    config: &Config,
    sink: MongoSink,
    cancel: &CancellationToken,
) -> (JoinHandle<Result<(), Error>>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(&config.pipeline.name, "apply"));
    let (config, m, c) = (config.clone(), metrics.clone(), cancel.clone());
    let handle = tokio::spawn(async move {
        dualsync::apply::run(
            &config,
            "mongo",
            Arc::new(sink),
            schemas(),
            m,
            Control::default(),
            c,
        )
        .await
    });
    (handle, metrics)
}

fn mongo_sink_config(config: &Config) -> MongoSinkConfig {
    let SinkConfig::Mongodb(m) = &config.sinks["mongo"] else {
        panic!("test pipeline has a mongo sink")
    };
    m.clone()
}

fn customer(id: &str, version: i64) -> dualsync::codec::OutboxEvent {
    customer_event(
        id,
        version,
        Some(
            json!({"id": id, "name": format!("v{version}"), "email": "e", "order_count": version}),
        ),
    )
}

/// Produces the `customers` events to partition 0 of the pipeline's topic.
async fn produce(config: &Config, events: &[dualsync::codec::OutboxEvent]) {
    let topic = config.kafka.topic_for("customers");
    let publisher = dualsync::publish::Publisher::new(&config.kafka).unwrap();
    publisher.ensure_topic(&topic).await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .unwrap();
    let store = schemas();
    for e in events {
        let value = store.encode(e).unwrap();
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&e.aggregate_id)
                    .payload(&value)
                    .partition(0),
                std::time::Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
}

/// The reply of a replica set whose primary stepped down while the batch ran: every statement
/// refused with NotWritablePrimary (10107), nothing written.
fn not_primary_reply(command: &Document) -> Document {
    let n = command.get_array("updates").map_or(0, Vec::len);
    let errors: Vec<Bson> = (0..n as i32)
        .map(|i| Bson::Document(doc! {"index": i, "code": 10107, "errmsg": "not primary"}))
        .collect();
    doc! {"ok": 1.0, "n": 0, "nModified": 0, "writeErrors": errors}
}

/// An interceptor that answers the first `times` commands with `reply(command)`.
fn fail_first(times: usize, reply: fn(&Document) -> Document) -> CommandInterceptor {
    let calls = AtomicUsize::new(0);
    Arc::new(move |command: &Document| {
        (calls.fetch_add(1, Ordering::SeqCst) < times).then(|| reply(command))
    })
}

/// Item 1: every event of a multi-document transaction carries the transaction's cluster time;
/// their versions must still follow their order inside the transaction, or the version guard
/// keeps the first change of a document the transaction touched more than once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_within_one_transaction_reach_both_sinks_in_transaction_order() {
    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    let run = run_pipeline(&p.config, &["postgres", "mongo"]);
    leads(&run.relay).await;
    let carts = p.source_db.collection::<Document>(GENERIC);
    for id in ["reinserted", "replaced", "updated_then_deleted"] {
        carts
            .insert_one(doc! {"_id": id, "state": "before"})
            .await
            .unwrap();
    }
    let client = p.source_db.client();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    let ops: Vec<(&str, Document)> = vec![
        // insert then delete: must end absent.
        (
            "insert",
            doc! {"_id": "inserted_then_deleted", "state": "new"},
        ),
        ("delete", doc! {"_id": "inserted_then_deleted"}),
        // delete then re-insert: must end with the new document.
        ("delete", doc! {"_id": "reinserted"}),
        ("insert", doc! {"_id": "reinserted", "state": "again"}),
        // two replaces: the second wins.
        ("replace", doc! {"_id": "replaced", "state": "first"}),
        ("replace", doc! {"_id": "replaced", "state": "second"}),
        // insert, update, replace.
        ("insert", doc! {"_id": "grown", "state": "new", "n": 1}),
        ("update", doc! {"_id": "grown"}),
        (
            "replace",
            doc! {"_id": "grown", "state": "replaced", "n": 3},
        ),
        // update then delete of a document that existed before.
        ("update", doc! {"_id": "updated_then_deleted"}),
        ("delete", doc! {"_id": "updated_then_deleted"}),
        // insert, delete, insert.
        ("insert", doc! {"_id": "flapping", "state": "one"}),
        ("delete", doc! {"_id": "flapping"}),
        ("insert", doc! {"_id": "flapping", "state": "two"}),
    ];
    for (op, d) in ops {
        let id = d.get_str("_id").unwrap().to_string();
        match op {
            "insert" => {
                carts.insert_one(d).session(&mut session).await.unwrap();
            }
            "delete" => {
                carts
                    .delete_one(doc! {"_id": &id})
                    .session(&mut session)
                    .await
                    .unwrap();
            }
            "replace" => {
                carts
                    .replace_one(doc! {"_id": &id}, d)
                    .session(&mut session)
                    .await
                    .unwrap();
            }
            _ => {
                carts
                    .update_one(doc! {"_id": &id}, doc! {"$inc": {"n": 1}})
                    .session(&mut session)
                    .await
                    .unwrap();
            }
        }
    }
    session.commit_transaction().await.unwrap();
    // A later write outside the transaction: once it is in both sinks, so is the transaction.
    carts.insert_one(doc! {"_id": "after"}).await.unwrap();

    converged(&p, &[GENERIC], &[]).await;
    run.stop().await;
}

/// Item 2: a per-document NotWritablePrimary (injected: SecantusDB is always primary) is
/// transient, so the batch is retried and nothing is dead-lettered; a per-document validation
/// failure (real: the sink collection has a validator) is poison and is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_per_document_mongo_errors_are_retried_and_permanent_ones_dead_lettered() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    let mongo = mongo_sink_config(&config);
    let client = mongodb::Client::with_uri_str(mongo.url.expose())
        .await
        .unwrap();
    let db = client.database(&mongo.database);
    // Names of at most 20 characters: the event with a longer one is refused by the server.
    db.create_collection("customers")
        .validator(
            doc! {"$jsonSchema": {"properties": {"name": {"bsonType": "string", "maxLength": 20}}}},
        )
        .await
        .unwrap();
    let mut events: Vec<_> = (1..=5).map(|i| customer(&format!("c{i}"), 1)).collect();
    events.push(customer_event(
        "bad",
        1,
        Some(json!({"id": "bad", "name": "x".repeat(30), "email": "e", "order_count": 1})),
    ));
    produce(&config, &events).await;

    let sink = MongoSink::connect(&mongo)
        .await
        .unwrap()
        .with_interceptor(fail_first(2, not_primary_reply));
    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply_on(&config, sink, &cancel);
    let check = MongoSink::connect(&mongo).await.unwrap();
    eventually("the batch is written or dead-lettered", || async {
        let mut written = 0;
        for i in 1..=5 {
            if check
                .get("customers", &format!("c{i}"))
                .await
                .unwrap()
                .is_some()
            {
                written += 1;
            }
        }
        written == 5 || total(&stats.dead_lettered) > 1
    })
    .await;
    eventually("the invalid document is dead-lettered", || async {
        total(&stats.dead_lettered) >= 1
    })
    .await;
    let letters = read_topic(
        &servers.kafka,
        &format!("{}.dlq", config.kafka.topic_for("customers")),
        1,
    )
    .await;
    let keys: Vec<_> = letters
        .iter()
        .map(|l| String::from_utf8_lossy(rdkafka::Message::key(l).unwrap()).into_owned())
        .collect();
    assert_eq!(keys, ["bad"], "only the invalid document is poison");
    assert_eq!(total(&stats.dead_lettered), 1);
    assert!(
        total(&stats.retries) >= 1,
        "the not-primary batch was retried"
    );
    assert!(!apply.is_finished(), "apply stopped");
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// Item 3: two apply processes write a key that does not exist yet (a rebalance hand-over).
/// A inserts v5; B's upsert of v7 found no document to update, then its insert collided with
/// A's (E11000). B's v7 must still win; only a stored version newer than B's makes it stale.
/// The interleaving is injected (SecantusDB runs one statement at a time, so two upserts
/// never interleave there): A's write is real, and B's first command gets the server's
/// answer to that interleaving, E11000 on `_id` for every statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_inserts_keep_the_newest_version() {
    let servers = servers();
    let config = pipeline_without_postgres(&servers, &unique("t"));
    let mongo = mongo_sink_config(&config);
    let record = |key: &str, version: i64| SinkRecord {
        namespace: "customers".into(),
        key: key.into(),
        version,
        document: Some(json!({"v": version})),
    };
    // Real concurrency on fresh keys: A writes v5, B v7, at the same time.
    let a = MongoSink::connect(&mongo).await.unwrap();
    let b = MongoSink::connect(&mongo).await.unwrap();
    let keys: Vec<String> = (0..300).map(|i| format!("fresh{i}")).collect();
    let batch = |v: i64| keys.iter().map(|k| record(k, v)).collect::<Vec<_>>();
    let (older, newer) = (batch(5), batch(7));
    let mut writes_a = Vec::new();
    let mut writes_b = Vec::new();
    for (chunk_a, chunk_b) in older.chunks(20).zip(newer.chunks(20)) {
        writes_a.push(a.apply(chunk_a));
        writes_b.push(b.apply(chunk_b));
    }
    let (ra, rb) = tokio::join!(
        futures::future::join_all(writes_a),
        futures::future::join_all(writes_b)
    );
    for r in ra.into_iter().chain(rb) {
        assert!(r.unwrap().rejected.is_empty());
    }
    for k in &keys {
        assert_eq!(a.get("customers", k).await.unwrap().unwrap().0, 7, "{k}");
    }

    // The interleaving itself: A is first to insert; B's upsert collides on `_id`.
    let raced = |command: &Document| {
        let n = command.get_array("updates").map_or(0, Vec::len);
        let errors: Vec<Bson> = (0..n as i32)
            .map(|i| {
                Bson::Document(doc! {"index": i, "code": 11000,
                "errmsg": "E11000 duplicate key error", "keyPattern": {"_id": 1}})
            })
            .collect();
        doc! {"ok": 1.0, "n": 0, "nModified": 0, "writeErrors": errors}
    };
    let b = MongoSink::connect(&mongo)
        .await
        .unwrap()
        .with_interceptor(fail_first(1, raced));
    a.apply(&[record("race1", 5), record("race2", 9)])
        .await
        .unwrap();
    let outcome = b
        .apply(&[record("race1", 7), record("race2", 7)])
        .await
        .unwrap();
    assert_eq!(a.get("customers", "race1").await.unwrap().unwrap().0, 7);
    assert_eq!(a.get("customers", "race2").await.unwrap().unwrap().0, 9);
    assert_eq!((outcome.applied(), outcome.stale), (1, 1));
    assert!(outcome.rejected.is_empty());
}

/// Item 6: the sink writes with the connection string's write concern. SecantusDB is a
/// one-node replica set: `w=3` cannot be satisfied there, and it says so (a write-concern
/// error, UnsatisfiableWriteConcern), which is a deployment problem, not a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mongo_sink_writes_with_the_connection_strings_write_concern() {
    let servers = servers();
    let config = pipeline_without_postgres(&servers, &unique("t"));
    let mut mongo = mongo_sink_config(&config);
    let record = SinkRecord {
        namespace: "customers".into(),
        key: "k".into(),
        version: 1,
        document: Some(json!({"v": 1})),
    };
    let base = mongo.url.expose().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder: CommandInterceptor = {
        let seen = seen.clone();
        Arc::new(move |command: &Document| {
            seen.lock()
                .unwrap()
                .push(command.get_document("writeConcern").ok().cloned());
            None
        })
    };
    mongo.url = dualsync::config::Secret::new(format!("{base}&w=majority&wtimeoutMS=5000"));
    let sink = MongoSink::connect(&mongo)
        .await
        .unwrap()
        .with_interceptor(recorder);
    sink.apply(std::slice::from_ref(&record)).await.unwrap();
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [Some(doc! {"w": "majority", "wtimeout": 5000})]
    );

    mongo.url = dualsync::config::Secret::new(format!("{base}&w=3"));
    let sink = MongoSink::connect(&mongo).await.unwrap();
    let err = sink
        .apply(&[SinkRecord {
            version: 2,
            ..record
        }])
        .await
        .expect_err("w=3 on a one-node replica set must not be acknowledged");
    assert_eq!(classify(&err), Disposition::Fatal, "{err}");
}

/// Item 6: a write-concern error (here the wtimeout of `w: majority`, injected: a one-node set
/// always has its majority) is retried, never fatal; the batch is written again and the
/// version guard absorbs what the first attempt did write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_concern_error_is_retried_not_fatal() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    let mongo = mongo_sink_config(&config);
    let events: Vec<_> = (1..=3).map(|i| customer(&format!("c{i}"), 1)).collect();
    produce(&config, &events).await;
    let timed_out = |command: &Document| {
        let n = command.get_array("updates").map_or(0, Vec::len) as i32;
        doc! {"ok": 1.0, "n": n, "nModified": 0, "writeConcernError": {
        "code": 64, "codeName": "WriteConcernFailed",
        "errmsg": "waiting for replication timed out", "errInfo": {"wtimeout": true}}}
    };
    let sink = MongoSink::connect(&mongo)
        .await
        .unwrap()
        .with_interceptor(fail_first(2, timed_out));
    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply_on(&config, sink, &cancel);
    let check = MongoSink::connect(&mongo).await.unwrap();
    eventually("the batch is written, or apply stopped", || async {
        if apply.is_finished() {
            return true;
        }
        for i in 1..=3 {
            if check
                .get("customers", &format!("c{i}"))
                .await
                .unwrap()
                .is_none()
            {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        !apply.is_finished(),
        "apply stopped on a write-concern error"
    );
    assert!(total(&stats.retries) >= 1);
    assert_eq!(total(&stats.dead_lettered), 0);
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// Item 7: a paused relay keeps its lease. Two relays, the leader paused for twice
/// `lease_secs`: the standby must not take over (pause must pause under HA), and the change
/// made during the pause is published by the leader once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_mongo_relay_keeps_its_lease() {
    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    // A 6 s lease rather than the suite's 3 s: a leader stuck that long on a loaded test server
    // (opening its stream, say) loses its lease paused or not, which is not what this tests.
    const LEASE_SECS: u64 = 6;
    let toml = p
        .toml
        .replace("lease_secs = 3", &format!("lease_secs = {LEASE_SECS}"));
    let config = Config::from_toml(std::path::Path::new("pause.toml"), &toml, Vec::new()).unwrap();
    let cancel = CancellationToken::new();
    let spawn = |control: Control| {
        let metrics = Arc::new(Metrics::new(&config.pipeline.name, "relay"));
        let (config, m, c) = (config.clone(), metrics.clone(), cancel.clone());
        let handle =
            tokio::spawn(
                async move { dualsync::relay::run(&config, schemas(), m, control, c).await },
            );
        (handle, metrics)
    };
    let leader_control = Control::default();
    let (leader, leader_metrics) = spawn(leader_control.clone());
    leads(&leader_metrics).await;
    let (standby, standby_metrics) = spawn(Control::default());
    leader_control.set_paused(true);
    let carts = p.source_db.collection::<Document>(GENERIC);
    carts
        .insert_one(doc! {"_id": "during_pause"})
        .await
        .unwrap();

    let window = std::time::Duration::from_secs(2 * LEASE_SECS);
    let until = std::time::Instant::now() + window;
    while std::time::Instant::now() < until {
        assert_eq!(
            standby_metrics.relay_leader.get(),
            0,
            "the standby took over while the leader was paused"
        );
        assert!(!leader.is_finished() && !standby.is_finished());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    leader_control.set_paused(false);
    let published = read_topic(&servers.kafka, &p.topic(GENERIC), 1).await;
    assert_eq!(published.len(), 1);
    assert_eq!(standby_metrics.relay_leader.get(), 0);
    cancel.cancel();
    for h in [leader, standby] {
        h.await.unwrap().unwrap();
    }
}

/// Item 1 across a restart: SecantusDB's resume tokens do not carry the position in the
/// transaction, so the relay numbers a transaction's changes in stream order and saves the
/// number with its position. A relay resuming inside a transaction (its saved token is the
/// transaction's third change, as a crash there leaves it) publishes the rest of it again with
/// the versions they had the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_resuming_inside_a_transaction_publishes_the_rest_with_the_same_versions() {
    use futures::StreamExt;
    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    let carts = p.source_db.collection::<Document>(GENERIC);
    carts.insert_one(doc! {"_id": "before"}).await.unwrap();
    let mut stream = carts.watch().await.unwrap();
    let run = run_pipeline(&p.config, &[]);
    leads(&run.relay).await;
    let client = p.source_db.client();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    carts
        .insert_one(doc! {"_id": "t", "n": 0})
        .session(&mut session)
        .await
        .unwrap();
    for _ in 0..4 {
        carts
            .update_one(doc! {"_id": "t"}, doc! {"$inc": {"n": 1}})
            .session(&mut session)
            .await
            .unwrap();
    }
    carts
        .replace_one(doc! {"_id": "t"}, doc! {"n": 10})
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    let mut events = Vec::new();
    while events.len() < 6 {
        let event = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("the transaction's changes in the test's own stream")
            .unwrap()
            .unwrap();
        events.push(event);
    }
    let topic = p.topic(GENERIC);
    let first = read_topic(&servers.kafka, &topic, 6).await;
    let versions: std::collections::HashMap<String, String> = first
        .iter()
        .map(|m| {
            (
                header(m, dualsync::publish::headers::EVENT_ID).unwrap(),
                header(m, dualsync::publish::headers::VERSION).unwrap(),
            )
        })
        .collect();
    assert_eq!(versions.len(), 6, "six changes, six versions");
    run.stop().await;

    // The position moved back to the transaction's third change, as a crash there leaves it.
    let third = &events[2];
    let at = third.cluster_time.unwrap();
    let token = mongodb::bson::to_document(&third.id).unwrap();
    p.source_db
        .collection::<Document>("dualsync_offsets")
        .update_one(
            doc! {"_id": &p.config.pipeline.name},
            doc! {"$set": {"token": token, "start_at": Bson::Null, "txn_place": {"t": at, "i": 2_i64}}},
        )
        .await
        .unwrap();
    let run = run_pipeline(&p.config, &[]);
    leads(&run.relay).await;
    let all = read_topic(&servers.kafka, &topic, 6 + 3).await;
    assert_eq!(all.len(), 9, "the last three changes published again");
    for m in &all {
        let id = header(m, dualsync::publish::headers::EVENT_ID).unwrap();
        assert_eq!(
            header(m, dualsync::publish::headers::VERSION),
            versions.get(&id).cloned(),
            "event {id} published again with another version"
        );
    }
    run.stop().await;
}
