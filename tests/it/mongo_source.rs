//! The MongoDB change-stream source against the real servers (SecantusDB as a one-node
//! replica set, Apache Kafka, PostgreSQL): changes reach both kinds of sink in order, a relay killed
//! with `kill -9` resumes without a gap, lost history stops the relay with its explanation or
//! is healed by a new snapshot, a snapshot taken under concurrent writes converges, and a
//! source server that goes away for a while is waited for.

use std::collections::HashMap;
use std::time::Duration;

use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use dualsync::error::Error;
use dualsync::publish::headers;
use dualsync::source::mongo_key::canonical_key;

use crate::common::*;
use crate::mongo_common::*;
use crate::private_servers::PrivateServer;
use crate::processes::{spawn, write_config};

fn version(m: &OwnedMessage) -> i64 {
    header(m, headers::VERSION).unwrap().parse().unwrap()
}

/// Per key, the versions in partition order must only grow (commit order per document).
fn assert_ordered_per_key(messages: &[OwnedMessage]) {
    let mut last: HashMap<(i32, Vec<u8>), i64> = HashMap::new();
    for m in messages {
        let key = (m.partition(), m.key().unwrap().to_vec());
        let v = version(m);
        if let Some(prev) = last.insert(key.clone(), v) {
            assert!(
                v > prev,
                "key {:?}: version {v} after {prev}",
                String::from_utf8_lossy(&key.1)
            );
        }
    }
}

/// Whether the broker knows `topic` (the relay creates a topic when it first publishes to it).
async fn topic_exists(brokers: &str, topic: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        metadata.topics().iter().any(|t| t.name() == topic)
    })
    .await
    .unwrap()
}

fn customer(id: &str, name: &str, orders: i32) -> Document {
    doc! {"_id": id, "id": id, "name": name, "email": format!("{id}@example.com"), "order_count": orders}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inserts_updates_replaces_deletes_reach_both_sinks_in_order() {
    let servers = servers();
    let p = mongo_pipeline(
        &servers,
        &servers.mongo,
        "exclude_collections = [\"sessions\"]",
        None,
        None,
    )
    .await;
    let run = run_pipeline(&p.config, &["postgres", "mongo"]);
    // Without a saved position (and no snapshot asked for) the relay streams from "now".
    leads(&run.relay).await;
    // An excluded collection: written first, so if it were published it would be by the time
    // everything after it is.
    p.source_db
        .collection::<Document>("sessions")
        .insert_one(doc! {"token": "t"})
        .await
        .unwrap();

    let customers = p.source_db.collection::<Document>(TYPED);
    // Carts keep pre-images, so its delete events carry the deleted document's last state.
    p.source_db
        .create_collection(GENERIC)
        .change_stream_pre_and_post_images(
            mongodb::options::ChangeStreamPreAndPostImages::builder()
                .enabled(true)
                .build(),
        )
        .await
        .unwrap();
    let carts = p.source_db.collection::<Document>(GENERIC);
    // Typed collection: every kind of change, and one document its schema refuses.
    customers
        .insert_one(customer("c1", "Ada", 0))
        .await
        .unwrap();
    customers
        .update_one(doc! {"_id": "c1"}, doc! {"$inc": {"order_count": 2}})
        .await
        .unwrap();
    customers
        .replace_one(doc! {"_id": "c1"}, customer("c1", "Ada L.", 3))
        .await
        .unwrap();
    customers
        .insert_one(customer("c2", "Bob", 1))
        .await
        .unwrap();
    customers.delete_one(doc! {"_id": "c2"}).await.unwrap();
    customers
        .insert_one(doc! {"_id": "c3", "id": "c3", "nme": "typo"})
        .await
        .unwrap();
    // Generic collection: BSON types a schema-less pipeline must carry, many changes per key.
    let ids: Vec<ObjectId> = (0..5).map(|_| ObjectId::new()).collect();
    let mut changes = 0;
    for (n, id) in ids.iter().enumerate() {
        carts
            .insert_one(doc! {"_id": id, "items": [], "total": "12.50".parse::<mongodb::bson::Decimal128>().unwrap(), "at": DateTime::from_millis(1_700_000_000_000), "n": n as i64})
            .await
            .unwrap();
        changes += 1;
        for k in 0..4 {
            carts
                .update_one(
                    doc! {"_id": id},
                    doc! {"$push": {"items": {"sku": format!("s{k}"), "qty": k}}, "$inc": {"n": 1}},
                )
                .await
                .unwrap();
            changes += 1;
        }
    }
    carts.delete_one(doc! {"_id": ids[0]}).await.unwrap();
    changes += 1;
    carts
        .insert_one(doc! {"_id": 42, "plain": true})
        .await
        .unwrap();
    changes += 1;

    converged(&p, &[TYPED, GENERIC], &["c3"]).await;

    // Nothing crashed: exactly one message per change, in commit order per key.
    let messages = read_topic(&servers.kafka, &p.topic(GENERIC), changes).await;
    assert_eq!(messages.len(), changes);
    assert_ordered_per_key(&messages);
    let first = &messages
        .iter()
        .find(|m| m.key() == Some(canonical_key(&Bson::ObjectId(ids[1])).as_bytes()))
        .unwrap();
    assert_eq!(
        header(first, headers::EVENT_TYPE).as_deref(),
        Some("insert")
    );
    assert_eq!(
        header(first, "dualsync.mongo.document_key"),
        Some(format!(r#"{{"_id":{{"$oid":"{}"}}}}"#, ids[1].to_hex()))
    );
    // The delete, in the generic envelope, with the pre-image and no document.
    let delete = messages
        .iter()
        .find(|m| header(m, headers::EVENT_TYPE).as_deref() == Some("delete"))
        .unwrap();
    let store = dualsync::codec::SchemaStore::default();
    let mut datum = &delete.payload().unwrap()[10..];
    let apache_avro::types::Value::Record(fields) =
        apache_avro::from_avro_datum(&store.generic().envelope, &mut datum, None).unwrap()
    else {
        panic!("the generic envelope is a record")
    };
    let fields: HashMap<_, _> = fields.into_iter().collect();
    let text = |name: &str| match &fields[name] {
        apache_avro::types::Value::Union(_, v) => match &**v {
            apache_avro::types::Value::String(s) => Some(s.clone()),
            _ => None,
        },
        other => panic!("{name} is {other:?}"),
    };
    assert_eq!(text("payload"), None);
    let before: Json = serde_json::from_str(&text("document_before_change").unwrap()).unwrap();
    assert_eq!(before["items"].as_array().unwrap().len(), 4, "{before}");

    let typed = read_topic(&servers.kafka, &p.topic(TYPED), 5).await;
    let kinds: Vec<String> = typed
        .iter()
        .filter(|m| m.key() == Some(b"c1".as_slice()))
        .map(|m| header(m, headers::EVENT_TYPE).unwrap())
        .collect();
    assert_eq!(kinds, ["insert", "update", "replace"]);
    // The document its schema refuses is in the relay's dead-letter topic, with the reason.
    let dead = read_topic(&servers.kafka, &format!("{}.relay.dlq", p.prefix), 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], dualsync::dlq::headers::CLASS).as_deref(),
        Some("encode.schema_violation")
    );
    let raw: Json = serde_json::from_slice(dead[0].payload().unwrap()).unwrap();
    assert_eq!(raw["fullDocument"]["nme"], "typo");
    assert!(
        !topic_exists(&servers.kafka, &p.topic("sessions")).await,
        "an excluded collection was published"
    );

    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_mid_stream_hands_over_and_resumes_without_a_gap() {
    let servers = servers();
    let p = snapshotting_pipeline(&servers).await;
    let path = write_config(&p.toml);
    let path = path.to_str().unwrap();
    let carts = p.source_db.collection::<Document>(GENERIC);
    const N: i64 = 600;
    let writer = tokio::spawn({
        let carts = carts.clone();
        async move {
            for i in 0..N {
                // The driver retries an insert whose connection broke; when the first attempt
                // had gone in, the retry collides with it: the document is there either way.
                if let Err(e) = carts.insert_one(doc! {"_id": i, "n": i}).await {
                    let duplicate = matches!(&*e.kind, mongodb::error::ErrorKind::Write(
                        mongodb::error::WriteFailure::WriteError(w)) if w.code == dualsync::error::MONGO_DUPLICATE_KEY);
                    assert!(duplicate, "insert {i}: {e}");
                }
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    let mut relay = spawn(
        &["relay", "-c", path, "--http-port", "0"],
        "mongo-kill-1.log",
    );
    // Once part of the stream is published, a second relay waits as standby; then the active
    // one is killed mid-stream and the standby takes over when the lease runs out.
    let topic = p.topic(GENERIC);
    read_topic(&servers.kafka, &topic, 100).await;
    let mut standby = spawn(
        &["relay", "-c", path, "--http-port", "0"],
        "mongo-kill-2.log",
    );
    relay.kill().unwrap();
    relay.wait().unwrap();
    let mut relay = spawn(
        &["relay", "-c", path, "--http-port", "0"],
        "mongo-kill-3.log",
    );
    writer.await.unwrap();
    let messages = read_topic_until(&servers.kafka, &topic, |m| {
        let keys: std::collections::HashSet<_> = m.iter().filter_map(|m| m.key()).collect();
        keys.len() >= N as usize
    })
    .await;
    for r in [&mut relay, &mut standby] {
        r.kill().unwrap();
        r.wait().unwrap();
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &messages {
        *seen
            .entry(String::from_utf8_lossy(m.key().unwrap()).into_owned())
            .or_default() += 1;
    }
    let missing: Vec<i64> = (0..N)
        .filter(|i| !seen.contains_key(&canonical_key(&Bson::Int64(*i))))
        .collect();
    assert!(missing.is_empty(), "inserts never published: {missing:?}");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!("{N} inserts, {duplicates} published twice after the kill (absorbed by apply)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_history_stops_with_an_explanation_or_resnapshots_and_converges() {
    let servers = servers();
    // A tiny oplog: 40 entries, so a relay that is away for 100 changes loses its position.
    let source = PrivateServer::mongo_with_config("[oplog]\nmax_entries = 40\n");
    let url = source.url();
    let name = unique("lost");
    let db_name = unique("src");
    let fail = mongo_pipeline(&servers, &url, "", Some(&name), Some(&db_name)).await;
    let carts = fail.source_db.collection::<Document>(GENERIC);
    for i in 0..5 {
        carts.insert_one(doc! {"_id": i, "v": 0}).await.unwrap();
    }
    let run = run_pipeline(&fail.config, &[]);
    leads(&run.relay).await;
    // The relay starts from "now": publish one change so a token is saved, then stop it.
    carts
        .update_one(doc! {"_id": 0}, doc! {"$set": {"v": 1}})
        .await
        .unwrap();
    read_topic(&servers.kafka, &fail.topic(GENERIC), 1).await;
    let offsets = fail.source_db.collection::<Document>("dualsync_offsets");
    eventually("the relay saves a resume token", || async {
        offsets
            .find_one(doc! {"_id": &name, "token": {"$type": "object"}})
            .await
            .unwrap()
            .is_some()
    })
    .await;
    run.stop().await;

    // While it is away: 100 changes (inserts and updates), more than the oplog keeps.
    for i in 5..55 {
        carts.insert_one(doc! {"_id": i, "v": 0}).await.unwrap();
        carts
            .update_one(doc! {"_id": i - 5}, doc! {"$inc": {"v": 1}})
            .await
            .unwrap();
    }
    // SecantusDB truncates its oplog lazily, as mongod does; its admin command does it now.
    let pruned = fail
        .source_db
        .client()
        .database("admin")
        .run_command(doc! {"secantusAdmin.pruneOplog": 1})
        .await
        .unwrap();
    assert!(pruned.get_i32("pruned").unwrap_or(0) > 0, "{pruned}");

    // on_history_lost = "fail" (the default): the relay stops and says what to do.
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&fail.config, &cancel);
    let outcome = tokio::time::timeout(DEADLINE, relay)
        .await
        .unwrap()
        .unwrap();
    match outcome {
        Err(e @ Error::HistoryLost(_)) => {
            let text = e.to_string();
            assert!(text.contains("on_history_lost"), "{text}");
            assert!(text.contains("resnapshot"), "{text}");
        }
        other => panic!("expected the history-lost error, got {other:?}"),
    }

    // on_history_lost = "resnapshot": same pipeline and position, a new snapshot, then the
    // stream; the sinks converge, including changes made after the snapshot.
    let heal = mongo_pipeline(
        &servers,
        &url,
        "on_history_lost = \"resnapshot\"",
        Some(&name),
        Some(&db_name),
    )
    .await;
    let run = run_pipeline(&heal.config, &["postgres", "mongo"]);
    read_topic(&servers.kafka, &heal.topic(GENERIC), 55).await;
    carts.delete_one(doc! {"_id": 1}).await.unwrap();
    carts
        .update_one(doc! {"_id": 2}, doc! {"$set": {"v": 100}})
        .await
        .unwrap();
    converged(&heal, &[GENERIC], &[]).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_under_concurrent_writes_converges() {
    let servers = servers();
    let p = snapshotting_pipeline(&servers).await;
    let carts = p.source_db.collection::<Document>(GENERIC);
    let customers = p.source_db.collection::<Document>(TYPED);
    let docs: Vec<Document> = (0..1500).map(|i| doc! {"_id": i, "v": 0}).collect();
    carts.insert_many(docs).await.unwrap();
    for i in 0..50 {
        customers
            .insert_one(customer(&format!("c{i}"), "x", 0))
            .await
            .unwrap();
    }
    // Writers change documents before, during and after the snapshot reads them.
    let writer = tokio::spawn({
        let (carts, customers) = (carts.clone(), customers.clone());
        async move {
            for round in 1..=300_i64 {
                let i = (round * 7919) % 1500;
                match round % 5 {
                    0 => {
                        carts.delete_one(doc! {"_id": i}).await.unwrap();
                    }
                    1 => {
                        carts
                            .insert_one(doc! {"_id": 10_000 + round, "v": round})
                            .await
                            .unwrap();
                    }
                    _ => {
                        carts
                            .update_one(doc! {"_id": i}, doc! {"$set": {"v": round}})
                            .await
                            .unwrap();
                    }
                }
                customers
                    .update_one(
                        doc! {"_id": format!("c{}", round % 50)},
                        doc! {"$inc": {"order_count": 1}},
                    )
                    .await
                    .unwrap();
            }
        }
    });
    let run = run_pipeline(&p.config, &["postgres", "mongo"]);
    writer.await.unwrap();
    converged(&p, &[GENERIC, TYPED], &[]).await;
    let snapshot = read_topic(&servers.kafka, &p.topic(GENERIC), 1500).await;
    assert!(
        snapshot
            .iter()
            .filter(|m| header(m, headers::EVENT_TYPE).as_deref() == Some("snapshot"))
            .count()
            >= 1200,
        "the snapshot published the collection"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn source_server_away_or_stepped_down_is_waited_for_and_nothing_is_lost() {
    let servers = servers();
    let mut source = PrivateServer::mongo();
    let url = source.url();
    let p = mongo_pipeline(&servers, &url, "", None, None).await;
    let carts = p.source_db.collection::<Document>(GENERIC);
    let run = run_pipeline(&p.config, &["mongo"]);
    leads(&run.relay).await;
    for i in 0..100 {
        carts.insert_one(doc! {"_id": i, "v": 1}).await.unwrap();
    }
    read_topic(&servers.kafka, &p.topic(GENERIC), 100).await;
    source.stop();
    tokio::time::sleep(Duration::from_secs(5)).await; // the outage itself, not a synchronisation
    source.start();
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let carts = client
        .database(p.source_db.name())
        .collection::<Document>(GENERIC);
    for i in 0..100 {
        carts
            .update_one(doc! {"_id": i}, doc! {"$set": {"v": 2}})
            .await
            .unwrap();
    }
    let (_, mongo) = sinks(&p.config).await;
    eventually("every update after the outage is applied", || async {
        let state = sink_state(&mongo, GENERIC).await;
        state.len() == 100 && state.values().all(|d| d["v"] == 2)
    })
    .await;

    // A primary step-down: for 3 s the server is a secondary and refuses the relay's writes
    // (its lease and position), then it is primary again.
    client
        .database("admin")
        .run_command(doc! {"replSetStepDown": 3, "force": true})
        .await
        .unwrap();
    eventually("the server is primary again", || async {
        let hello = client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await
            .unwrap();
        hello.get_bool("isWritablePrimary").unwrap_or(false)
    })
    .await;
    for i in 0..100 {
        carts
            .update_one(doc! {"_id": i}, doc! {"$set": {"v": 3}})
            .await
            .unwrap();
    }
    eventually("every update after the step-down is applied", || async {
        let state = sink_state(&mongo, GENERIC).await;
        state.len() == 100 && state.values().all(|d| d["v"] == 3)
    })
    .await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_command_publishes_the_watched_collections() {
    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    let carts = p.source_db.collection::<Document>(GENERIC);
    let docs: Vec<Document> = (0..30).map(|i| doc! {"_id": i, "v": i}).collect();
    carts.insert_many(docs).await.unwrap();
    let customers = p.source_db.collection::<Document>(TYPED);
    customers.insert_one(customer("c1", "a", 1)).await.unwrap();
    customers.insert_one(customer("c2", "b", 2)).await.unwrap();
    customers
        .insert_one(doc! {"_id": "c3", "unexpected": true})
        .await
        .unwrap();
    let path = write_config(&p.toml);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_dualsync"))
            .args(["snapshot", "--json", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Json = serde_json::from_slice(&out.stdout).unwrap();
    let report = |c: &str| {
        reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["collection"] == c)
            .cloned()
            .unwrap_or_else(|| panic!("no report for {c}: {reports}"))
    };
    assert_eq!(report(GENERIC)["documents"], 30);
    assert_eq!(report(TYPED)["documents"], 2);
    assert_eq!(report(TYPED)["dead_lettered"], 1);
    let version = report(GENERIC)["version"].as_i64().unwrap();
    let messages = read_topic(&servers.kafka, &p.topic(GENERIC), 30).await;
    assert_eq!(messages.len(), 30);
    for m in &messages {
        assert_eq!(header(m, headers::EVENT_TYPE).as_deref(), Some("snapshot"));
        assert_eq!(self::version(m), version);
    }
    let dead = read_topic(&servers.kafka, &format!("{}.relay.dlq", p.prefix), 1).await;
    assert_eq!(dead.len(), 1);
}

/// With a schema registry (the real one `make up` starts, see real_registry.rs) the relay
/// registers each collection's schema as it first sees the collection: the
/// collection's own envelope, or the generic one; apply reads the Confluent frames back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_subjects_are_registered_per_collection_as_they_appear() {
    let servers = servers();
    let registry = crate::real_registry::RealRegistry::from_env();
    let p = mongo_pipeline(
        &servers,
        &servers.mongo,
        &format!(
            "collections = [\"{GENERIC}\", \"{TYPED}\"]\n[schema_registry]\nurl = \"{}\"",
            registry.url
        ),
        None,
        None,
    )
    .await;
    let run = run_pipeline(&p.config, &["mongo", "postgres"]);
    leads(&run.relay).await;
    // Not in the include list: never published.
    p.source_db
        .collection::<Document>("audit")
        .insert_one(doc! {"what": "login"})
        .await
        .unwrap();
    let carts = p.source_db.collection::<Document>(GENERIC);
    carts
        .insert_one(doc! {"_id": ObjectId::new(), "at": DateTime::now()})
        .await
        .unwrap();
    p.source_db
        .collection::<Document>(TYPED)
        .insert_one(customer("c1", "Ada", 1))
        .await
        .unwrap();
    converged(&p, &[GENERIC, TYPED], &[]).await;
    for collection in [GENERIC, TYPED] {
        let topic = p.topic(collection);
        let ids = registry.versions(&format!("{topic}-value")).await;
        assert_eq!(ids.len(), 1, "{topic} registered once");
        let messages = read_topic(&servers.kafka, &topic, 1).await;
        let value = messages[0].payload().unwrap();
        assert_eq!(value[0], 0, "Confluent wire format");
        assert_eq!(
            value[1..5],
            ids[0].to_be_bytes(),
            "framed with the registered id"
        );
    }
    assert!(!topic_exists(&servers.kafka, &p.topic("audit")).await);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_database_invalidates_the_stream_and_stops_the_relay_with_the_explanation() {
    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    let cancel = CancellationToken::new();
    let (relay, metrics) = spawn_relay(&p.config, &cancel);
    leads(&metrics).await;
    let carts = p.source_db.collection::<Document>(GENERIC);
    carts.insert_one(doc! {"_id": 1}).await.unwrap();
    read_topic(&servers.kafka, &p.topic(GENERIC), 1).await;
    p.source_db.drop().await.unwrap();
    let outcome = tokio::time::timeout(DEADLINE, relay)
        .await
        .unwrap()
        .unwrap();
    match outcome {
        Err(e @ Error::HistoryLost(_)) => {
            let text = e.to_string();
            // Whichever the relay meets first: the stream's invalidate event, or its position
            // document gone with the database.
            assert!(
                text.contains("invalidated") || text.contains("database dropped"),
                "{text}"
            );
            assert!(text.contains("resnapshot"), "{text}");
        }
        other => panic!("expected the history-lost error, got {other:?}"),
    }
}
