//! `dualsync verify [--repair]` for a MongoDB primary against the real servers (SecantusDB as
//! primary and as a sink, PostgreSQL as a sink): damage in either sink is found and classified
//! like the PostgreSQL primary's verify, `--repair` (the command) brings both back through the
//! pipeline and a later change still wins, and a big collection is read in bounded batches
//! with progress lines and resumes from its checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use mongodb::bson::{doc, Bson, Document};
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use dualsync::config::{SinkConfig, SourceConfig};
use dualsync::publish::headers;
use dualsync::reconcile::mongo::{MongoVerify, Watch};
use dualsync::sink::postgres::PostgresSink;
use dualsync::source::mongo_key::canonical_key;

use crate::common::*;
use crate::mongo_common::{converged, leads, mongo_pipeline, MongoPipeline, GENERIC, TYPED};
use crate::processes::{sigterm, spawn, wait_exit, write_config};

/// A MongoDB-primary pipeline (relay and both applies running) whose sinks hold `carts`
/// generic documents with integer `_id`s (the updated ones with a later change) and two
/// typed customers.
struct Running {
    p: MongoPipeline,
    file: PathBuf,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<(), dualsync::error::Error>>>,
}

async fn start(carts: i32, updated: &[i32]) -> Running {
    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    let cancel = CancellationToken::new();
    let (relay, metrics) = spawn_relay(&p.config, &cancel);
    let (apply_pg, _) = spawn_apply(&p.config, "postgres", &cancel);
    let (apply_mongo, _) = spawn_apply(&p.config, "mongo", &cancel);
    leads(&metrics).await;
    let docs: Vec<Document> = (0..carts)
        .map(|i| doc! {"_id": i, "v": i, "items": [{"sku": format!("s{i}"), "qty": 1}]})
        .collect();
    let collection = p.source_db.collection::<Document>(GENERIC);
    collection.insert_many(docs).await.unwrap();
    for i in updated {
        collection
            .update_one(doc! {"_id": i}, doc! {"$set": {"v": i * 10}})
            .await
            .unwrap();
    }
    p.source_db
        .collection::<Document>(TYPED)
        .insert_many([
            doc! {"_id": "c1", "id": "c1", "name": "Ada", "email": "a@example.com", "order_count": 1},
            doc! {"_id": "c2", "id": "c2", "name": "Bob", "email": "b@example.com", "order_count": 2},
        ])
        .await
        .unwrap();
    converged(&p, &[GENERIC, TYPED], &[]).await;
    let file = write_config(&p.toml);
    Running {
        p,
        file,
        cancel,
        tasks: vec![relay, apply_pg, apply_mongo],
    }
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            t.await.unwrap().unwrap();
        }
    }

    /// The PostgreSQL sink's database, for damaging it.
    async fn pg_replica(&self) -> tokio_postgres::Client {
        let SinkConfig::Postgres(pg) = &self.p.config.sinks["postgres"] else {
            unreachable!()
        };
        dualsync::pg::connect(pg.url.expose()).await.unwrap()
    }

    /// The MongoDB sink's database, for damaging it.
    async fn mongo_replica(&self) -> mongodb::Database {
        let SinkConfig::Mongodb(m) = &self.p.config.sinks["mongo"] else {
            unreachable!()
        };
        mongodb::Client::with_uri_str(m.url.expose())
            .await
            .unwrap()
            .database(&m.database)
    }
}

/// Runs `dualsync --progress-interval 1ms verify --json -c <file> <args>`: (exit status,
/// report, stderr).
fn verify(file: &Path, args: &[&str]) -> (ExitStatus, Json, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(["--progress-interval", "1ms", "verify", "--json", "-c"])
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {stderr}"));
    (out.status, report, stderr)
}

/// `collection`'s mismatches in a verify report: key → kind.
fn kinds(report: &Json, collection: &str) -> BTreeMap<String, String> {
    let r = report["aggregates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["aggregate"] == collection)
        .unwrap_or_else(|| panic!("no report for {collection}: {report}"));
    r["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["key"].as_str().unwrap().to_string(),
                m["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The key of the integer `_id` `i` (its canonical Extended JSON).
fn k(i: i32) -> String {
    canonical_key(&Bson::Int32(i))
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_primary_verify_classifies_sink_damage_and_repair_converges_both_sinks() {
    let run = start(20, &[5, 6]).await;
    let (status, report, _) = verify(&run.file, &["--sink", "postgres"]);
    assert_eq!(status.code(), Some(0), "{report}");

    // PostgreSQL sink: a row deleted, one changed, one added, one set back to the state (and a
    // version) before its last change.
    run.pg_replica()
        .await
        .batch_execute(&format!(
            r#"DELETE FROM replica.carts WHERE id = '{}';
               UPDATE replica.carts SET doc = jsonb_set(doc, '{{v}}', '100') WHERE id = '{}';
               INSERT INTO replica.carts (id, doc, version) VALUES ('extra-1', '{{"v": 1}}', 1);
               UPDATE replica.carts SET doc = jsonb_set(doc, '{{v}}', '5'), version = version - 1 WHERE id = '{}';"#,
            k(1),
            k(2),
            k(5)
        ))
        .await
        .unwrap();
    // MongoDB sink: the same kinds, and a live typed document turned into a tombstone.
    let replica = run.mongo_replica().await;
    let carts = replica.collection::<Document>(GENERIC);
    carts.delete_one(doc! {"_id": k(3)}).await.unwrap();
    carts
        .update_one(doc! {"_id": k(4)}, doc! {"$set": {"v": 400}})
        .await
        .unwrap();
    carts
        .insert_one(
            doc! {"_id": "extra-2", "v": 1, "_dualsync": {"version": 1_i64, "deleted": false}},
        )
        .await
        .unwrap();
    carts
        .update_one(
            doc! {"_id": k(6)},
            doc! {"$set": {"v": 6}, "$inc": {"_dualsync.version": -1_i64}},
        )
        .await
        .unwrap();
    replica
        .collection::<Document>(TYPED)
        .update_one(
            doc! {"_id": "c1"},
            doc! {"$set": {"_dualsync.deleted": true}},
        )
        .await
        .unwrap();

    let (status, report, _) = verify(&run.file, &["--sink", "postgres"]);
    assert_eq!(status.code(), Some(1), "{report}");
    assert_eq!(
        kinds(&report, GENERIC),
        expect(&[
            (k(1).as_str(), "missing"),
            (k(2).as_str(), "different"),
            (k(5).as_str(), "stale"),
            ("extra-1", "extra")
        ]),
        "{report}"
    );
    assert_eq!(kinds(&report, TYPED), expect(&[]), "{report}");
    let (status, report, _) = verify(&run.file, &["--sink", "mongo"]);
    assert_eq!(status.code(), Some(1), "{report}");
    assert_eq!(
        kinds(&report, GENERIC),
        expect(&[
            (k(3).as_str(), "missing"),
            (k(4).as_str(), "different"),
            (k(6).as_str(), "stale"),
            ("extra-2", "extra")
        ]),
        "{report}"
    );
    assert_eq!(
        kinds(&report, TYPED),
        expect(&[("c1", "missing")]),
        "{report}"
    );
    let carts_report = &report["aggregates"][0];
    assert_eq!(carts_report["primary_rows"], 20, "{report}");
    assert_eq!(carts_report["sink_live"], 20, "{report}");
    assert_eq!(carts_report["matching"], 17, "{report}");

    for (sink, n) in [("postgres", 4), ("mongo", 5)] {
        let (status, report, _) = verify(&run.file, &["--sink", sink, "--repair"]);
        assert_eq!(status.code(), Some(0), "{report}");
        assert_eq!(report["repaired"], n, "{report}");
    }
    // Through the pipeline: `repair` events on the collections' topics, one per mismatched key
    // (the extras' as deletes), none for the keys that matched.
    let is_repair = |m: &OwnedMessage| header(m, headers::EVENT_TYPE).as_deref() == Some("repair");
    let topic = run.p.topic(GENERIC);
    let repairs: Vec<OwnedMessage> = read_topic_until(&servers().kafka, &topic, move |m| {
        m.iter().filter(|m| is_repair(m)).count() >= 8
    })
    .await
    .into_iter()
    .filter(is_repair)
    .collect();
    let mut keys: Vec<String> = repairs
        .iter()
        .map(|m| String::from_utf8(m.key().unwrap().to_vec()).unwrap())
        .collect();
    keys.sort();
    let mut want: Vec<String> = (1..=6).map(k).collect();
    want.extend(["extra-1".to_string(), "extra-2".to_string()]);
    want.sort();
    assert_eq!(keys, want);
    for m in &repairs {
        let version: i64 = header(m, headers::VERSION).unwrap().parse().unwrap();
        assert_eq!(
            version & 2047,
            2047,
            "the highest version of a cluster time"
        );
        assert_eq!(header(m, headers::AGGREGATE_TYPE).as_deref(), Some(GENERIC));
    }
    eventually("both sinks match the primary again", || async {
        verify(&run.file, &["--sink", "postgres"]).0.success()
            && verify(&run.file, &["--sink", "mongo"]).0.success()
    })
    .await;
    // A change after the repair wins over the repair's version.
    run.p
        .source_db
        .collection::<Document>(GENERIC)
        .update_one(doc! {"_id": 2}, doc! {"$set": {"v": 222}})
        .await
        .unwrap();
    converged(&run.p, &[GENERIC, TYPED], &[]).await;
    run.stop().await;
}

/// Counts the batches of a library run and stops it after `after` of them.
struct StopAfter {
    after: usize,
    sizes: Mutex<Vec<u64>>,
    seen: AtomicUsize,
    cancel: CancellationToken,
}

impl Watch for StopAfter {
    fn begin(&self, _: String, _: &'static str, _: Option<u64>) {}

    fn advance(&self, n: u64) {
        self.sizes.lock().unwrap().push(n);
        if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            self.cancel.cancel();
        }
    }

    fn end(&self) {}
}

/// The plain progress lines of `what` (`what: done/total rows (…), …`): the done counts.
fn progress_counts(stderr: &str, what: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{what}: ")))
        .filter(|l| l.contains(" ETA "))
        .map(|l| l.split('/').next().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_primary_verify_streams_in_batches_and_resumes_after_its_checkpoint() {
    let run = start(1000, &[]).await;
    let replica = run.pg_replica().await;
    replica
        .batch_execute(&format!("DELETE FROM replica.carts WHERE id = '{}'", k(10)))
        .await
        .unwrap();
    let checkpoint = std::env::temp_dir().join(format!("{}.json", unique("verify")));

    // Stopped (as by SIGINT) after three batches of 50 of the primary.
    let SinkConfig::Postgres(pg) = &run.p.config.sinks["postgres"] else {
        unreachable!()
    };
    let Some(SourceConfig::Mongodb(source)) = &run.p.config.source else {
        unreachable!()
    };
    let sink = PostgresSink::connect(pg).await.unwrap();
    let only = [GENERIC.to_string()];
    let stop = StopAfter {
        after: 3,
        sizes: Mutex::new(Vec::new()),
        seen: AtomicUsize::new(0),
        cancel: CancellationToken::new(),
    };
    let interrupted = MongoVerify {
        config: &run.p.config,
        source,
        sink: &sink,
        sink_name: "postgres",
        schemas: schemas(),
        only: &only,
        batch: 50,
        repair: false,
        checkpoint: Some(&checkpoint),
    }
    .run(&stop, &stop.cancel)
    .await;
    assert!(interrupted.is_err(), "the run stops when cancelled");
    assert_eq!(*stop.sizes.lock().unwrap(), [50, 50, 50]);
    let saved: Json = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    let place = &saved["current"];
    assert_eq!(place["collection"], GENERIC, "{saved}");
    assert_eq!(place["pass"], "primary", "{saved}");
    assert_eq!(place["after"], r#"{"$numberInt":"149"}"#, "{saved}");
    assert_eq!(place["report"]["primary_rows"], 150, "{saved}");

    // Damage in the range already verified is not seen again; after it, it is.
    replica
        .batch_execute(&format!(
            "DELETE FROM replica.carts WHERE id IN ('{}', '{}')",
            k(20),
            k(400)
        ))
        .await
        .unwrap();
    let path = checkpoint.to_str().unwrap();
    let args = [
        "--sink",
        "postgres",
        "--collection",
        GENERIC,
        "--batch-size",
        "50",
        "--checkpoint",
        path,
    ];
    let (status, report, stderr) = verify(&run.file, &args);
    assert_eq!(status.code(), Some(1), "{report}\n{stderr}");
    assert!(stderr.contains("continued from checkpoint"), "{stderr}");
    assert_eq!(
        kinds(&report, GENERIC),
        expect(&[(k(10).as_str(), "missing"), (k(400).as_str(), "missing")]),
        "{report}"
    );
    assert_eq!(report["aggregates"][0]["primary_rows"], 1000, "{report}");
    assert_eq!(report["aggregates"][0]["sink_live"], 997, "{report}");
    // This run read the 850 documents after the checkpoint and the 997 sink records, in
    // batches of 50: every progress line falls on a batch boundary (850 is one).
    let what = "verify carts vs postgres";
    assert!(
        stderr.contains(&format!("{what}: done, {} rows in ", 850 + 997)),
        "{stderr}"
    );
    let counts = progress_counts(&stderr, what);
    assert!(!counts.is_empty(), "{stderr}");
    assert!(
        counts.iter().all(|c| c % 50 == 0 || *c == 850 + 997),
        "{counts:?}"
    );
    assert!(
        !checkpoint.exists(),
        "a finished run deletes its checkpoint"
    );

    // Without the checkpoint, everything is read again.
    let (status, report, _) = verify(&run.file, &args[..6]);
    assert_eq!(status.code(), Some(1), "{report}");
    assert_eq!(
        kinds(&report, GENERIC),
        expect(&[
            (k(10).as_str(), "missing"),
            (k(20).as_str(), "missing"),
            (k(400).as_str(), "missing")
        ]),
        "{report}"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongo_primary_verify_command_stopped_by_sigterm_continues_from_its_checkpoint() {
    let run = start(1000, &[]).await;
    run.pg_replica()
        .await
        .batch_execute(&format!(
            "DELETE FROM replica.carts WHERE id = '{}'",
            k(999)
        ))
        .await
        .unwrap();
    let checkpoint = std::env::temp_dir().join(format!("{}.json", unique("verify")));
    let path = checkpoint.to_str().unwrap();
    let file = run.file.to_str().unwrap();
    let log = format!("{}.log", unique("mongo-verify"));
    // One document per batch, so the run is still going when it is stopped.
    let mut child = spawn(
        &[
            "verify",
            "--json",
            "--sink",
            "postgres",
            "--collection",
            GENERIC,
            "--batch-size",
            "1",
            "--checkpoint",
            path,
            "-c",
            file,
        ],
        &log,
    );
    let saved =
        || -> Option<Json> { serde_json::from_slice(&std::fs::read(&checkpoint).ok()?).ok() };
    eventually("the run saves its checkpoint", || async {
        saved().is_some_and(|s| s["current"]["report"]["primary_rows"].as_u64() >= Some(5))
    })
    .await;
    sigterm(&child);
    let status = wait_exit(&mut child, DEADLINE);
    let stderr = std::fs::read_to_string(std::env::temp_dir().join(&log)).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("verify interrupted"), "{stderr}");
    let at_stop = saved().expect("the checkpoint stays after a stop");
    let place = &at_stop["current"];
    assert_eq!(place["collection"], GENERIC, "{at_stop}");
    assert!(
        place["pass"] == "sink" || place["report"]["primary_rows"].as_u64() < Some(1000),
        "stopped before the end: {at_stop}"
    );

    let (status, report, stderr) = verify(
        &run.file,
        &[
            "--sink",
            "postgres",
            "--collection",
            GENERIC,
            "--batch-size",
            "100",
            "--checkpoint",
            path,
        ],
    );
    assert_eq!(status.code(), Some(1), "{report}\n{stderr}");
    assert!(stderr.contains("continued from checkpoint"), "{stderr}");
    assert_eq!(
        kinds(&report, GENERIC),
        expect(&[(k(999).as_str(), "missing")]),
        "{report}"
    );
    assert_eq!(report["aggregates"][0]["primary_rows"], 1000, "{report}");
    assert!(!checkpoint.exists());
    run.stop().await;
}
