//! The fault-injection schedule on a MongoDB primary: writers run multi-document
//! transactions (inserts, updates, replaces, deletes and re-inserts of the same documents
//! inside one transaction, interleaved in random orders) and single-document writes on a
//! private SecantusDB; the change-stream relay publishes to a private three-broker Kafka
//! cluster; apply writes into PostgreSQL and into a second private SecantusDB. Faults: `kill
//! -9` of the relay mid-stream, of either apply, of the relay and an apply together, poison
//! messages, a standby relay taking over from an active one killed with `-9` (the lease), a
//! restart of the MongoDB sink's server and of the primary's, and `kill -9` of a partition's
//! leader or of the active KRaft controller; and network faults on the leading relay's own
//! Toxiproxy link to the primary — a partition, a slow link, resets — and the leader cut off
//! from the primary while a standby relay (on the other link) still reaches it, which must
//! take the lease over within 45 s. Afterwards each sink must equal the primary
//! document by document (deleted documents absent), no two changes may share a version, and
//! only the injected poison may be dead-lettered (nothing by the relay).
//!
//! The seed and length come from `DUALSYNC_CHAOS_SEED` and `DUALSYNC_CHAOS_FAULTS`, as for
//! the PostgreSQL-outbox schedule in the parent module.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Bson, Document};
use mongodb::{ClientSession, Collection};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use super::harness::{dead_letters_are_the_poison, schedule, Faults, Pipeline, Proc, Role};
use super::network::{leader_cut_off, log_marks, logged};
use crate::common::*;
use crate::mongo_common::{mongo_pipeline, sink_state, sinks, source_state, GENERIC, TYPED};
use crate::private_kafka::KafkaCluster;
use crate::private_servers::PrivateServer;
use crate::toxiproxy::{host_port, Toxiproxy};

/// The schedule's fault kinds, by the number the seeded RNG draws.
const FAULT_KINDS: [&str; 14] = [
    "relay kill",
    "apply-pg kill",
    "apply-mongo kill",
    "relay+apply-mongo kill",
    "poison",
    "standby takeover",
    "mongo sink restart",
    "primary restart",
    "partition leader kill",
    "controller kill",
    "partition",
    "slow link",
    "resets",
    "leader cut-off",
];

/// Documents the writers contend on: customers (a schema in `schemas/`, typed events) and
/// carts (no schema, the generic envelope).
const CUSTOMERS: i32 = 12;
const CARTS: i32 = 24;

/// One write to one document.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Replace with upsert: an insert or a replace.
    Put,
    /// `$inc` and `$set`/`$push`; nothing when the document is absent.
    Update,
    Delete,
    /// Only after a `Delete` of the same document in the same sequence, so it never collides.
    Insert,
}

/// What a transaction does to one document, in order; the transaction interleaves the
/// sequences of its documents at random.
const SEQUENCES: [&[Step]; 7] = [
    &[Step::Delete, Step::Insert],
    &[Step::Delete, Step::Insert, Step::Delete],
    &[Step::Delete, Step::Insert, Step::Update, Step::Put],
    &[Step::Put, Step::Update, Step::Update],
    &[Step::Update, Step::Delete],
    &[Step::Put, Step::Put],
    &[Step::Delete, Step::Insert, Step::Delete, Step::Insert],
];

#[derive(Default, Debug)]
struct Tally {
    committed: usize,
    /// Aborted, or their commit failed (the primary went away): the sinks must follow
    /// whatever the primary kept.
    not_committed: usize,
    single: usize,
    failed: usize,
}

/// A document `(collection, _id)`: customers have string ids, carts integer ones.
fn pick(rng: &mut StdRng) -> (&'static str, Bson) {
    if rng.gen_bool(0.4) {
        (
            TYPED,
            Bson::String(format!("c{}", rng.gen_range(0..CUSTOMERS))),
        )
    } else {
        (GENERIC, Bson::Int32(rng.gen_range(0..CARTS)))
    }
}

/// A whole document for `Put` and `Insert`; customers match their schema.
fn full(collection: &str, id: &Bson, rng: &mut StdRng) -> Document {
    let n = rng.gen_range(0..1000);
    if collection == TYPED {
        let id = id.as_str().unwrap();
        doc! {"_id": id, "id": id, "name": format!("name-{n}"), "email": format!("{id}@example.com"), "order_count": n}
    } else {
        doc! {"_id": id.clone(), "items": [{"sku": format!("s{n}"), "qty": n % 7}], "n": n as i64}
    }
}

fn update(collection: &str, rng: &mut StdRng) -> Document {
    let n = rng.gen_range(0..1000);
    if collection == TYPED {
        doc! {"$inc": {"order_count": 1}, "$set": {"name": format!("renamed-{n}")}}
    } else {
        doc! {"$inc": {"n": 1i64}, "$push": {"items": {"sku": format!("u{n}"), "qty": 1}}}
    }
}

/// Runs one step, inside `session`'s transaction when there is one.
async fn run_step(
    coll: &Collection<Document>,
    id: &Bson,
    step: Step,
    rng: &mut StdRng,
    session: Option<&mut ClientSession>,
) -> mongodb::error::Result<()> {
    let name = coll.name().to_string();
    let filter = doc! {"_id": id.clone()};
    match (step, session) {
        (Step::Put, Some(s)) => coll
            .replace_one(filter, full(&name, id, rng))
            .upsert(true)
            .session(s)
            .await
            .map(drop),
        (Step::Put, None) => coll
            .replace_one(filter, full(&name, id, rng))
            .upsert(true)
            .await
            .map(drop),
        (Step::Update, Some(s)) => coll
            .update_one(filter, update(&name, rng))
            .session(s)
            .await
            .map(drop),
        (Step::Update, None) => coll.update_one(filter, update(&name, rng)).await.map(drop),
        (Step::Delete, Some(s)) => coll.delete_one(filter).session(s).await.map(drop),
        (Step::Delete, None) => coll.delete_one(filter).await.map(drop),
        (Step::Insert, Some(s)) => coll
            .insert_one(full(&name, id, rng))
            .session(s)
            .await
            .map(drop),
        (Step::Insert, None) => coll.insert_one(full(&name, id, rng)).await.map(drop),
    }
}

/// The steps of one transaction: one to three documents, each with a sequence of
/// [`SEQUENCES`], interleaved at random (each document's own order kept).
fn transaction_plan(rng: &mut StdRng) -> Vec<(&'static str, Bson, Step)> {
    let mut docs: Vec<(&'static str, Bson)> = Vec::new();
    while docs.len() < rng.gen_range(1..=3) {
        let d = pick(rng);
        if !docs.contains(&d) {
            docs.push(d);
        }
    }
    let mut queues: Vec<(usize, &[Step])> = docs
        .iter()
        .map(|_| (0, *SEQUENCES.choose(rng).unwrap()))
        .collect();
    let mut plan = Vec::new();
    while let Some(i) = (0..queues.len())
        .filter(|&i| queues[i].0 < queues[i].1.len())
        .collect::<Vec<_>>()
        .choose(rng)
        .copied()
    {
        let (at, steps) = &mut queues[i];
        plan.push((docs[i].0, docs[i].1.clone(), steps[*at]));
        *at += 1;
    }
    plan
}

/// One writer until `stop`: 60 % multi-document transactions, the rest single-document
/// writes (one step, or a whole sequence as separate writes), one every `pace`. Errors (the
/// primary restarting, two transactions on one document) are counted, not retried: the
/// sinks must end at whatever the primary kept.
async fn write_until(
    url: String,
    database: String,
    seed: u64,
    pace: Duration,
    stop: CancellationToken,
) -> Tally {
    let client = mongodb::Client::with_uri_str(&url).await.unwrap();
    let db = client.database(&database);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    while !stop.is_cancelled() {
        if rng.gen_bool(0.6) {
            let plan = transaction_plan(&mut rng);
            let mut session = match client.start_session().await {
                Ok(s) => s,
                Err(_) => {
                    tally.not_committed += 1;
                    continue;
                }
            };
            let mut ok = session.start_transaction().await.is_ok();
            for (collection, id, step) in &plan {
                if !ok {
                    break;
                }
                let coll = db.collection::<Document>(collection);
                ok = run_step(&coll, id, *step, &mut rng, Some(&mut session))
                    .await
                    .is_ok();
            }
            if ok && session.commit_transaction().await.is_ok() {
                tally.committed += 1;
            } else {
                let _ = session.abort_transaction().await;
                tally.not_committed += 1;
            }
        } else {
            let (collection, id) = pick(&mut rng);
            let coll = db.collection::<Document>(collection);
            let steps: &[Step] = if rng.gen_bool(0.5) {
                SEQUENCES.choose(&mut rng).unwrap()
            } else {
                [Step::Put, Step::Update, Step::Delete]
                    .choose(&mut rng)
                    .map(std::slice::from_ref)
                    .unwrap()
            };
            for step in steps {
                match run_step(&coll, &id, *step, &mut rng, None).await {
                    Ok(()) => tally.single += 1,
                    Err(_) => tally.failed += 1,
                }
            }
        }
        tokio::time::sleep(pace).await;
    }
    tally
}

/// Keys whose state differs between `want` and `got` (missing, extra or different).
fn differing(want: &BTreeMap<String, Json>, got: &BTreeMap<String, Json>) -> Vec<String> {
    let keys: HashSet<&String> = want.keys().chain(got.keys()).collect();
    let mut out: Vec<String> = keys
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .cloned()
        .collect();
    out.sort();
    out
}

/// How many messages `topic` holds (0 when it does not exist).
async fn messages_in(brokers: &str, topic: &str) -> i64 {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || watermarks_sum(&brokers, &topic))
        .await
        .unwrap()
}

fn watermarks_sum(brokers: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return 0;
    };
    t.partitions()
        .iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_faults_leave_both_sinks_equal_to_a_mongo_primary_writing_transactions() {
    dualsync::telemetry::init_for_tests();
    let (seed, faults, mut rng) = schedule("chaos mongo");

    // The servers this schedule restarts are its own: the primary and the MongoDB sink's
    // SecantusDB, and the Kafka cluster. The PostgreSQL sink is a fresh database on the
    // shared server (never restarted here; the outbox schedule restarts its own).
    let mut primary = PrivateServer::mongo();
    let mongo_sink_server = PrivateServer::mongo();
    let kafka = KafkaCluster::start(3);
    let servers = Servers {
        pg: servers().pg,
        kafka: kafka.bootstrap(),
        mongo: mongo_sink_server.url(),
    };
    let primary_url = format!("{}&serverSelectionTimeoutMS=5000", primary.url());
    // Each relay reaches the primary through a Toxiproxy link of its own (the writers and the
    // checks directly): `relays[leading]` is the leader's link and configuration file.
    let proxy = Toxiproxy::start().await;
    let upstream = host_port(&primary.url());
    let mut links = Vec::new();
    for i in 0..2 {
        links.push(proxy.link(&format!("mongo-primary-{i}"), &upstream).await);
    }
    let relay_urls: Vec<String> = links
        .iter()
        .map(|l| primary_url.replace(&upstream, &l.listen))
        .collect();
    let p = mongo_pipeline(
        &servers,
        &relay_urls[0],
        "snapshot_on_start = true",
        None,
        None,
    )
    .await;
    let database = p.source_db.name().to_string();
    // Documents before the relay starts: its snapshot publishes them.
    for (collection, n) in [(TYPED, CUSTOMERS), (GENERIC, CARTS)] {
        let mut init = StdRng::seed_from_u64(seed);
        let docs: Vec<Document> = (0..n)
            .map(|i| {
                let id = if collection == TYPED {
                    Bson::String(format!("c{i}"))
                } else {
                    Bson::Int32(i)
                };
                full(collection, &id, &mut init)
            })
            .collect();
        p.source_db
            .collection::<Document>(collection)
            .insert_many(docs)
            .await
            .unwrap();
    }
    let files = [
        crate::processes::write_config(&p.toml),
        crate::processes::write_config(&p.toml.replace(&relay_urls[0], &relay_urls[1])),
    ];
    let paths: Vec<&str> = files.iter().map(|f| f.to_str().unwrap()).collect();
    let mut leading = 0;
    let mut procs = Pipeline::start("chaos-mongo", paths[0]);
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(write_until(
                primary_url.clone(),
                database.clone(),
                rng.gen(),
                Duration::from_millis(30),
                stop.clone(),
            ))
        })
        .collect();

    let mut f = Faults::new(kafka, mongo_sink_server, p.topic(GENERIC), &FAULT_KINDS);
    for step in 0..faults {
        let Some((fault, restart_after)) = f.next(step, &mut procs, &mut rng).await else {
            continue;
        };
        match fault {
            3 => {
                procs
                    .crash(&[Role::Relay, Role::ApplyMongo], restart_after)
                    .await
            }
            5 => {
                // A standby joins, the relay it stands by for dies with -9: the standby takes
                // the lease over once it expires and goes on from the saved position.
                leading = 1 - leading;
                let standby = Proc::new(
                    "chaos-mongo-relay-standby",
                    &["relay", "-c", paths[leading]],
                );
                tokio::time::sleep(restart_after).await;
                procs.relay.kill9();
                procs.relay = standby;
            }
            10..=12 => {
                // The leading relay's link to the primary: cut, slowed or reset, then healed.
                let marks = log_marks(&procs);
                let link = [links[leading].clone()];
                let name = "MongoDB primary (relay)";
                let (what, _) = match fault {
                    10 => super::network::partition(&proxy, name, &link, &mut rng).await,
                    11 => super::network::slow(&proxy, name, &link, &mut rng).await,
                    _ => super::network::resets(&proxy, name, &link, &mut rng).await,
                };
                println!("        {what}: {}", logged(&procs, &marks));
            }
            13 => {
                // The leader cut off from the primary while a standby on the other link still
                // reaches it: the standby must take the lease over; the old leader (lease
                // lost) then stops cleanly.
                let marks = log_marks(&procs);
                let tails = || procs.tails();
                let (standby, _, _) = leader_cut_off(
                    &proxy,
                    &procs.relay,
                    &[links[leading].clone()],
                    || {
                        Proc::new(
                            "chaos-mongo-relay-standby",
                            &["relay", "-c", paths[1 - leading]],
                        )
                    },
                    seed,
                    &tails,
                )
                .await;
                println!("        {}", logged(&procs, &marks));
                procs.relay.stop();
                procs.relay = standby;
                leading = 1 - leading;
            }
            _ => {
                // The primary goes away and comes back on its data: the relay's stream, its
                // lease renewal and the writers' transactions fail meanwhile.
                primary.stop();
                tokio::time::sleep(restart_after).await;
                primary.start();
            }
        }
    }
    stop.cancel();
    let mut tally = Tally::default();
    for w in writers {
        let t = w.await.unwrap();
        tally.committed += t.committed;
        tally.not_committed += t.not_committed;
        tally.single += t.single;
        tally.failed += t.failed;
    }
    let writes_done = Instant::now();

    // Each sink equals the primary document by document, deleted documents absent.
    let client = mongodb::Client::with_uri_str(&primary_url).await.unwrap();
    let source_db = client.database(&database);
    let (pg_sink, mongo_sink) = sinks(&p.config).await;
    let mut last = Vec::new();
    let end = Instant::now() + Duration::from_secs(180);
    let mut documents = 0;
    while Instant::now() < end {
        last.clear();
        documents = 0;
        for c in [TYPED, GENERIC] {
            let want = source_state(&source_db, c).await;
            documents += want.len();
            for (sink, got) in [
                ("postgres", sink_state(&pg_sink, c).await),
                ("mongodb", sink_state(&mongo_sink, c).await),
            ] {
                for key in differing(&want, &got) {
                    last.push(format!(
                        "{sink} {c}/{key}: primary {:?}, sink {:?}",
                        want.get(&key),
                        got.get(&key)
                    ));
                }
            }
        }
        if last.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        last.is_empty(),
        "seed {seed}: sinks did not converge ({} mismatches):\n{}\n{}",
        last.len(),
        last.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        procs.tails()
    );
    let converge_secs = writes_done.elapsed().as_secs_f64();

    let letters = dead_letters_are_the_poison(
        &servers.kafka,
        &format!("{}{}", f.event_topic, p.config.apply.dead_letter_suffix),
        &f.poison_keys,
        seed,
        &|| procs.tails(),
    )
    .await;
    let relay_letters = messages_in(&servers.kafka, &p.config.relay.dead_letter_topic).await;
    assert_eq!(
        relay_letters, 0,
        "seed {seed}: the relay dead-lettered changes"
    );
    let (events, duplicates) = distinct_versions(&servers.kafka, &p, seed).await;
    println!(
        "chaos mongo seed {seed}: {} transactions committed ({} not), {} single-document writes \
         ({} failed), {events} change events, {faults} faults, {} poison ({letters} dead letters), \
         {duplicates} duplicates in the topics (absorbed), 0 mismatches in {documents} documents, \
         converged {converge_secs:.1}s after the writers stopped ({})",
        tally.committed,
        tally.not_committed,
        tally.single,
        tally.failed,
        f.poison_keys.len(),
        f.drawn()
    );
    procs.stop();
}

/// Reads both event topics to their end and checks that no two changes (distinct event ids,
/// one per resume token) of a document share a version: the guard would keep the first of
/// them. Returns how many changes are in the topics and how many were published more than
/// once (a relay killed between Kafka's acknowledgement and saving its position).
async fn distinct_versions(
    brokers: &str,
    p: &crate::mongo_common::MongoPipeline,
    seed: u64,
) -> (usize, usize) {
    let mut changes = 0;
    let mut duplicates = 0;
    for c in [TYPED, GENERIC] {
        let topic = p.topic(c);
        let total = messages_in(brokers, &topic).await;
        let messages = read_topic(brokers, &topic, total as usize).await;
        let mut ids_of: HashMap<(Vec<u8>, String), HashSet<String>> = HashMap::new();
        let mut events = 0;
        for m in &messages {
            let (Some(version), Some(id)) = (
                header(m, dualsync::publish::headers::VERSION),
                header(m, dualsync::publish::headers::EVENT_ID),
            ) else {
                continue; // poison
            };
            events += 1;
            let key = rdkafka::Message::key(m).unwrap_or_default().to_vec();
            ids_of.entry((key, version)).or_default().insert(id);
        }
        let shared: Vec<_> = ids_of
            .iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|((k, v), ids)| format!("{}@{v}: {ids:?}", String::from_utf8_lossy(k)))
            .collect();
        assert!(
            shared.is_empty(),
            "seed {seed}: changes sharing a version in {topic}: {shared:?}"
        );
        let distinct: usize = ids_of.values().map(HashSet::len).sum();
        changes += distinct;
        duplicates += events - distinct;
    }
    (changes, duplicates)
}
