//! Fault injection: the pipeline as real processes while writers contend on a fixed set of
//! aggregates (creates, updates, deletes), and a seeded schedule of faults — `kill -9` of the
//! relay, of either apply, of a relay and an apply together, a second relay started and
//! stopped, poison messages produced straight to an event topic, a restart of the MongoDB sink
//! server, a restart of the PostgreSQL server holding the primary (and the PostgreSQL sink),
//! and `kill -9` of a broker of a three-node Apache Kafka cluster (the leader of a partition in
//! use, or the active KRaft controller), restarted after a random delay. Event topics have
//! three replicas and `min.insync.replicas = 2`. Afterwards both sinks must match the primary record by record,
//! every outbox row must be in its topic, and the dead-letter topic must hold exactly the
//! injected poison (once per sink's consumer group).
//!
//! Every server is the test's own (a private PostgreSQL cluster, a private SecantusDB, a
//! private three-node Kafka cluster), so restarting them disturbs no other test.
//!
//! `DUALSYNC_CHAOS_SEED` replays a schedule (the seed is printed), `DUALSYNC_CHAOS_FAULTS`
//! sets its length (default 6, the CI configuration; `make chaos` runs longer ones).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use dualsync::config::{Config, SinkConfig};
use dualsync::dlq::headers;
use dualsync::reconcile;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use crate::common::*;
use crate::private_kafka::KafkaCluster;
use crate::private_servers::PrivateServer;

const RECONCILE: &str = "[reconcile.customers]\ntable = \"shop.customers\"\n[reconcile.orders]\ntable = \"shop.orders\"\n";

/// The schedule's fault kinds, by the number the seeded RNG draws.
const FAULT_KINDS: [&str; 10] = [
    "relay kill",
    "apply-pg kill",
    "apply-mongo kill",
    "relay+apply-pg kill",
    "poison",
    "second relay",
    "mongo sink restart",
    "primary restart",
    "partition leader kill",
    "controller kill",
];

/// One named process of the pipeline, restartable, with its log kept for failure reports.
struct Proc {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    logs: Vec<std::path::PathBuf>,
}

impl Proc {
    fn new(name: &str, args: &[&str]) -> Self {
        let mut p = Self {
            name: name.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            logs: Vec::new(),
        };
        p.start();
        p
    }
    fn start(&mut self) {
        let log = std::env::temp_dir().join(format!("{}.log", unique(&self.name)));
        let file = std::fs::File::create(&log).unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_dualsync"))
                .args(&self.args)
                // DUALSYNC_CHAOS_LOG adds e.g. librdkafka's group protocol (`...,librdkafka=debug`
                // with DUALSYNC_KAFKA__PROPERTIES__DEBUG=cgrp) for a diagnosis.
                .env(
                    "RUST_LOG",
                    std::env::var("DUALSYNC_CHAOS_LOG")
                        .unwrap_or_else(|_| "info,dualsync=debug".into()),
                )
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .expect("start dualsync"),
        );
        self.logs.push(log);
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// SIGTERM and wait; a clean exit is part of the contract.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            let end = Instant::now() + DEADLINE;
            let status = loop {
                if let Some(s) = c.try_wait().unwrap() {
                    break s;
                }
                assert!(
                    Instant::now() < end,
                    "{} did not exit on SIGTERM",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(
                status.success(),
                "{} exited with {status} on SIGTERM:\n{}",
                self.name,
                self.tail()
            );
        }
    }
    fn tail(&self) -> String {
        let text = self
            .logs
            .last()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

impl Drop for Proc {
    /// A failed schedule must not leave its processes running.
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn mismatches<S: SinkReader>(
    source: &tokio_postgres::Client,
    sink: &S,
    config: &Config,
) -> usize {
    let mut n = 0;
    for (aggregate, rc) in &config.reconcile {
        match reconcile::verify(source, sink, aggregate, rc, &|_| {}).await {
            Ok(r) => n += r.mismatches.len(),
            Err(_) => return usize::MAX, // e.g. a sink table not created yet
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_faults_leave_both_sinks_equal_to_the_primary() {
    dualsync::telemetry::init_for_tests();
    let seed: u64 = std::env::var("DUALSYNC_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let faults: usize = std::env::var("DUALSYNC_CHAOS_FAULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    println!("chaos seed {seed}, {faults} faults (DUALSYNC_CHAOS_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);

    // The servers this schedule restarts: its own PostgreSQL (primary and PostgreSQL sink),
    // SecantusDB (MongoDB sink) and a three-node Kafka cluster.
    let mut pg_server = PrivateServer::postgres();
    let mut mongo_server = PrivateServer::mongo();
    let mut kafka = KafkaCluster::start(3);
    let servers = Servers {
        pg: pg_server.url(),
        kafka: kafka.bootstrap(),
        mongo: mongo_server.url(),
    };
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    // Dynamic group membership, as most deployments run it: a member killed with -9 is
    // expired by the broker after `session.timeout.ms` and its partitions move to the others.
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), RECONCILE);
    let config = Config::from_toml(std::path::Path::new("chaos.toml"), &text, Vec::new()).unwrap();
    let file = std::env::temp_dir().join(format!("{}.toml", unique("chaos")));
    std::fs::write(&file, &text).unwrap();
    let path = file.to_str().unwrap();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let mut relay = Proc::new("chaos-relay", &["relay", "-c", path]);
    let mut apply_pg = Proc::new(
        "chaos-apply-pg",
        &["apply", "-c", path, "--sink", "postgres"],
    );
    let mut apply_mongo = Proc::new(
        "chaos-apply-mongo",
        &["apply", "-c", path, "--sink", "mongo"],
    );
    let writers = tokio::spawn({
        let url = source_url.clone();
        let seed = rng.gen();
        // 20 customers and 150 orders shared by 3 writers: updates, deletes, contention.
        async move { dualsync::demo::generate_at_rate(&url, 20, 150, 3000, 3, seed, Some(200.0)).await }
    });

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let event_topic = config.kafka.topic_for("orders");
    let mut poison = 0usize;
    let mut poison_keys = Vec::new();
    let started = Instant::now();
    let mut drawn = [0usize; FAULT_KINDS.len()];
    for step in 0..faults {
        // The schedule's own pacing, drawn from the seed (not a synchronisation point).
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        let restart_after = Duration::from_millis(rng.gen_range(50..1500));
        let fault = rng.gen_range(0..FAULT_KINDS.len() as i32);
        drawn[fault as usize] += 1;
        println!(
            "  {:>5.1}s fault {step}: kind {fault} ({})",
            started.elapsed().as_secs_f64(),
            FAULT_KINDS[fault as usize]
        );
        match fault {
            0 => {
                relay.kill9();
                tokio::time::sleep(restart_after).await;
                relay.start();
            }
            1 | 2 => {
                let apply = if fault == 1 {
                    &mut apply_pg
                } else {
                    &mut apply_mongo
                };
                apply.kill9();
                tokio::time::sleep(restart_after).await;
                apply.start();
            }
            3 => {
                relay.kill9();
                apply_pg.kill9();
                tokio::time::sleep(restart_after).await;
                apply_pg.start();
                relay.start();
            }
            4 => {
                let key = format!("poison-{step}");
                producer
                    .send(
                        FutureRecord::to(&event_topic)
                            .key(&key)
                            .payload(&b"\x00not an event"[..]),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("poison produced");
                poison += 1;
                poison_keys.push(key);
            }
            6 => {
                // The MongoDB sink's server goes away and comes back on the same data.
                mongo_server.stop();
                tokio::time::sleep(restart_after).await;
                mongo_server.start();
            }
            7 => {
                // The primary's PostgreSQL (also the PostgreSQL sink's) restarts: the relay,
                // the PostgreSQL apply and the writers lose their connections.
                pg_server.stop();
                tokio::time::sleep(restart_after).await;
                pg_server.start();
            }
            8 | 9 => {
                // A broker crashes mid-stream and comes back on its data: the leader of a
                // partition the pipeline writes and reads, or the active KRaft controller.
                // Its partitions' leadership moves to an in-sync replica; acknowledged
                // messages (acks=all, two in-sync replicas at least) survive.
                let victim = if fault == 8 {
                    let partition = rng.gen_range(0..3);
                    kafka.partition_leader(&event_topic, partition)
                } else {
                    kafka.active_controller()
                }
                .unwrap_or_else(|| rng.gen_range(1..=kafka.len()));
                println!("        kill -9 of broker {victim}");
                kafka.kill(victim);
                tokio::time::sleep(restart_after).await;
                kafka.restart(victim);
            }
            _ => {
                // A second relay: standby while the first lives; stopped cleanly.
                let mut second = Proc::new("chaos-relay-2", &["relay", "-c", path]);
                tokio::time::sleep(restart_after).await;
                second.stop();
            }
        }
    }
    let written = writers.await.unwrap().unwrap();
    let writes_done = Instant::now();
    // The schedule may have restarted the primary under the first connection.
    let source = dualsync::pg::connect(&source_url).await.unwrap();

    let SinkConfig::Postgres(pg) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let SinkConfig::Mongodb(mongo) = &config.sinks["mongo"] else {
        unreachable!()
    };
    let pg_sink = PostgresSink::connect(pg).await.unwrap();
    let mongo_sink = MongoSink::connect(mongo).await.unwrap();
    let converged = async {
        let end = Instant::now() + Duration::from_secs(180);
        while Instant::now() < end {
            if mismatches(&source, &pg_sink, &config).await == 0
                && mismatches(&source, &mongo_sink, &config).await == 0
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }
    .await;
    assert!(
        converged,
        "seed {seed}: sinks did not converge ({} / {} mismatches)\nrelay:\n{}\napply pg:\n{}\napply mongo:\n{}",
        mismatches(&source, &pg_sink, &config).await,
        mismatches(&source, &mongo_sink, &config).await,
        relay.tail(),
        apply_pg.tail(),
        apply_mongo.tail()
    );
    let converge_secs = writes_done.elapsed().as_secs_f64();

    // Exactly the injected poison, once per consumer group, and nothing else.
    let dlq_topic = format!("{event_topic}{}", config.apply.dead_letter_suffix);
    let letters = if poison == 0 {
        Vec::new()
    } else {
        // Until both groups' letters cover every poison key: a letter sent twice (its offset
        // not committed before a kill -9) must not make the read stop before the last one.
        let wanted = poison;
        read_topic_until(&servers.kafka, &dlq_topic, move |ms| {
            let mut keys =
                std::collections::BTreeMap::<String, std::collections::BTreeSet<Vec<u8>>>::new();
            for m in ms {
                keys.entry(header(m, headers::GROUP).unwrap_or_default())
                    .or_default()
                    .insert(rdkafka::Message::key(m).unwrap_or_default().to_vec());
            }
            keys.len() == 2 && keys.values().all(|k| k.len() >= wanted)
        })
        .await
    };
    let mut per_group = std::collections::BTreeMap::<String, Vec<String>>::new();
    for m in &letters {
        per_group
            .entry(header(m, headers::GROUP).unwrap_or_default())
            .or_default()
            .push(String::from_utf8_lossy(rdkafka::Message::key(m).unwrap_or_default()).into());
    }
    poison_keys.sort();
    for (group, keys) in &per_group {
        // A dead letter whose offset was not committed before a kill -9 is sent again:
        // duplicates are allowed, other messages and missing ones are not.
        let mut unique_keys = keys.clone();
        unique_keys.sort();
        unique_keys.dedup();
        assert_eq!(
            unique_keys, poison_keys,
            "seed {seed}: group {group} dead-lettered {keys:?}"
        );
    }
    assert_eq!(
        per_group.len(),
        usize::from(poison > 0) * 2,
        "seed {seed}: {per_group:?}\napply pg:\n{}\napply mongo:\n{}",
        apply_pg.tail(),
        apply_mongo.tail()
    );
    let (events, _) = dualsync::demo::outbox_counts(&source).await.unwrap();
    let duplicates = published_once_at_least(&source, &servers, &config, seed).await;
    println!(
        "chaos seed {seed}: {written} transactions, {events} events, {faults} faults, {poison} poison \
         ({} dead letters), {duplicates} duplicates in the topics (absorbed), 0 mismatches, \
         converged {converge_secs:.1}s after the writers stopped ({})",
        letters.len(),
        FAULT_KINDS
            .iter()
            .zip(drawn)
            .filter(|(_, n)| *n > 0)
            .map(|(kind, n)| format!("{kind} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for p in [&mut relay, &mut apply_pg, &mut apply_mongo] {
        p.stop();
    }
}

/// Checks that every outbox row is in its topic (as its `(key, version)`), and returns how
/// many events are there more than once: published again by a relay killed between Kafka's
/// acknowledgement and marking the rows, and absorbed by apply's version guard (the sinks
/// matched the primary). Poison messages (no version header) are not counted.
async fn published_once_at_least(
    source: &tokio_postgres::Client,
    servers: &Servers,
    config: &Config,
    seed: u64,
) -> usize {
    let mut duplicates = 0;
    for aggregate in ["customers", "orders"] {
        let rows: i64 = source
            .query_one(
                "SELECT count(*) FROM dualsync.outbox WHERE aggregatetype = $1",
                &[&aggregate],
            )
            .await
            .unwrap()
            .get(0);
        let rows = rows as usize;
        let event_of = |m: &rdkafka::message::OwnedMessage| {
            let version = header(m, dualsync::publish::headers::VERSION)?;
            Some((rdkafka::Message::key(m)?.to_vec(), version))
        };
        // Read until every row was seen (duplicates make the topic longer than the outbox).
        let messages = read_topic_until(&servers.kafka, &config.kafka.topic_for(aggregate), {
            move |ms| {
                let seen: std::collections::HashSet<_> = ms.iter().filter_map(event_of).collect();
                seen.len() >= rows
            }
        })
        .await;
        let events: Vec<(Vec<u8>, String)> = messages.iter().filter_map(event_of).collect();
        let distinct: std::collections::HashSet<_> = events.iter().collect();
        assert_eq!(
            distinct.len(),
            rows,
            "seed {seed}: every {aggregate} outbox row is in its topic"
        );
        duplicates += events.len() - distinct.len();
    }
    duplicates
}
