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

use std::time::{Duration, Instant};

use rand::Rng;

use dualsync::config::{Config, SinkConfig};
use dualsync::reconcile;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use crate::common::*;
use crate::private_kafka::KafkaCluster;
use crate::private_servers::PrivateServer;

mod harness;
mod mongo;

use harness::{dead_letters_are_the_poison, schedule, Faults, Pipeline, Proc, Role};

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
    let (seed, faults, mut rng) = schedule("chaos");

    // The servers this schedule restarts: its own PostgreSQL (primary and PostgreSQL sink),
    // SecantusDB (MongoDB sink) and a three-node Kafka cluster.
    let mut pg_server = PrivateServer::postgres();
    let mongo_server = PrivateServer::mongo();
    let kafka = KafkaCluster::start(3);
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

    let mut procs = Pipeline::start("chaos", path);
    let writers = tokio::spawn({
        let url = source_url.clone();
        let seed = rng.gen();
        // 20 customers and 150 orders shared by 3 writers: updates, deletes, contention.
        async move { dualsync::demo::generate_at_rate(&url, 20, 150, 3000, 3, seed, Some(200.0)).await }
    });

    let mut f = Faults::new(
        kafka,
        mongo_server,
        config.kafka.topic_for("orders"),
        &FAULT_KINDS,
    );
    for step in 0..faults {
        let Some((fault, restart_after)) = f.next(step, &mut procs, &mut rng).await else {
            continue;
        };
        match fault {
            3 => {
                procs
                    .crash(&[Role::Relay, Role::ApplyPg], restart_after)
                    .await
            }
            7 => {
                // The primary's PostgreSQL (also the PostgreSQL sink's) restarts: the relay,
                // the PostgreSQL apply and the writers lose their connections.
                pg_server.stop();
                tokio::time::sleep(restart_after).await;
                pg_server.start();
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
        "seed {seed}: sinks did not converge ({} / {} mismatches)\n{}",
        mismatches(&source, &pg_sink, &config).await,
        mismatches(&source, &mongo_sink, &config).await,
        procs.tails()
    );
    let converge_secs = writes_done.elapsed().as_secs_f64();

    let letters = dead_letters_are_the_poison(
        &servers.kafka,
        &format!("{}{}", f.event_topic, config.apply.dead_letter_suffix),
        &f.poison_keys,
        seed,
        &|| procs.tails(),
    )
    .await;
    let (events, _) = dualsync::demo::outbox_counts(&source).await.unwrap();
    let duplicates = published_once_at_least(&source, &servers, &config, seed).await;
    println!(
        "chaos seed {seed}: {written} transactions, {events} events, {faults} faults, {} poison \
         ({letters} dead letters), {duplicates} duplicates in the topics (absorbed), 0 mismatches, \
         converged {converge_secs:.1}s after the writers stopped ({})",
        f.poison_keys.len(),
        f.drawn()
    );
    procs.stop();
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
