//! Fault injection: the pipeline as real processes while writers contend on a fixed set of
//! aggregates (creates, updates, deletes), and a seeded schedule of faults — `kill -9` of the
//! relay, of either apply, of a relay and an apply together, a second relay started and
//! stopped, poison messages produced straight to an event topic, a restart of the MongoDB sink
//! server, a restart of the PostgreSQL primary (which also holds the PostgreSQL sink), and
//! `kill -9` of a broker of a three-node Apache Kafka cluster (the leader of a partition in
//! use, or the active KRaft controller), restarted after a random delay — and network faults:
//! every connection of the relay and the applies (PostgreSQL primary and sink, each broker,
//! MongoDB) goes through a Toxiproxy link, cut (partition), slowed (latency, bandwidth) or
//! reset for a while; the relay leader cut off from PostgreSQL while a standby relay still
//! reaches it; and a failover of the PostgreSQL primary to its synchronous standby (killed,
//! promoted; everyone reconnects through a multi-host URL). Event topics have three replicas
//! and `min.insync.replicas = 2`.
//!
//! Afterwards: both sinks match the primary record by record, every outbox row is in its
//! topic, per-key order holds in the topics (chaos/order.rs), every acknowledged probe commit
//! survived, and the dead-letter topic holds exactly the injected poison (once per sink's
//! consumer group). For each network fault and failover the schedule prints a `chaos fault`
//! line: time until healthy again, the longest commit → applied, what each process logged.
//!
//! Every server is the test's own (a private PostgreSQL primary and standby, a private
//! SecantusDB, a private three-node Kafka cluster, a private Toxiproxy), so disturbing them
//! disturbs no other test.
//!
//! `DUALSYNC_CHAOS_SEED` replays a schedule (the seed is printed), `DUALSYNC_CHAOS_FAULTS`
//! sets its length (default 6, the CI configuration; `make chaos` runs longer ones),
//! `DUALSYNC_CHAOS_FIRST` the kinds it starts with (CI: a partition, a slow link, the leader
//! cut-off), `DUALSYNC_CHAOS_TARGET` the server a partition, slow link or resets hit (e.g.
//! `Kafka broker 2`; any whose name contains it).

use std::time::{Duration, Instant};

use rand::Rng;

use dualsync::config::{Config, SinkConfig};
use dualsync::reconcile;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use tokio_util::sync::CancellationToken;

use crate::capture_modes::Mode;
use crate::common::*;
use crate::pipeline_scope::with_source;
use crate::private_kafka::KafkaCluster;
use crate::private_servers::PrivateServer;
use crate::toxiproxy::host_port;

mod async_failover;
pub(crate) mod failover;
mod harness;
mod mongo;
mod network;
mod order;

use failover::Pair;
use harness::{dead_letters_are_the_poison, schedule, Faults, Pipeline, Proc, Role};
use network::{healthy_after, leader_cut_off, log_marks, logged, Net, Probes};

const RECONCILE: &str = "[reconcile.customers]\ntable = \"shop.customers\"\n[reconcile.orders]\ntable = \"shop.orders\"\n";

/// The schedule's fault kinds, by the number the seeded RNG draws.
const FAULT_KINDS: [&str; 15] = [
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
    "partition",
    "slow link",
    "resets",
    "leader cut-off",
    "primary failover",
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
    seeded_faults(Mode::Poll).await;
}

/// The same schedule with the outbox captured from the WAL. A primary failover is drawn but
/// not injected: PostgreSQL 15's logical slot lives on the primary only, so a promoted
/// standby has none (docs/wal-capture.md#when-the-slot-is-lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_seeded_faults_leave_both_sinks_equal_to_the_primary() {
    seeded_faults(Mode::Wal).await;
}

async fn seeded_faults(mode: Mode) {
    dualsync::telemetry::init_for_tests();
    let name = match mode {
        Mode::Poll => "chaos",
        Mode::Wal => "chaos-wal",
    };
    let (seed, faults, mut rng) = schedule(name);

    // The servers this schedule disturbs: a PostgreSQL primary with a synchronous standby
    // (holding the outbox and the PostgreSQL sink), SecantusDB (MongoDB sink) and a three-node
    // Kafka cluster whose client listeners are advertised at the proxy's ports.
    let mut pg = Pair::start().await;
    let mongo_server = PrivateServer::mongo();
    let advertised: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let kafka = KafkaCluster::start_proxied(3, &advertised);
    let brokers: Vec<(u16, u16)> = kafka.proxied_ports().into_iter().zip(advertised).collect();
    // The shared schema registry (subjects are named after the schedule's unique topics).
    let registry = std::env::var("DUALSYNC_TEST_REGISTRY_URL").expect("DUALSYNC_TEST_REGISTRY_URL");
    let net = Net::start(
        &pg.addresses(),
        &brokers,
        &host_port(&mongo_server.url()),
        &host_port(&registry),
    )
    .await;

    let (source_db, sink_db, mongo_db) = (unique("t"), unique("t"), unique("t"));
    let admin = dualsync::pg::connect(&pg.primary().url()).await.unwrap();
    for db in [&source_db, &sink_db] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
    }
    drop(admin);
    // The test's own connections (writers, probes, checks) reach the servers directly; the
    // pipeline's processes reach them through the proxy, PostgreSQL by a multi-host URL.
    let direct = pg.addresses();
    let source_url = Pair::url(&direct, &source_db);
    let relay_url = Pair::url(&Net::hosts(&net.relay_pg), &source_db);
    let standby_url = Pair::url(&Net::hosts(&net.standby_pg), &source_db);
    let sink_url = Pair::url(&Net::hosts(&net.sink_pg), &sink_db);
    let proxied = Servers {
        pg: relay_url.clone(),
        kafka: Net::hosts(&net.kafka).join(","),
        mongo: format!("mongodb://{}/?directConnection=true", net.mongo.listen),
    };
    let servers = Servers {
        pg: source_url.clone(),
        kafka: kafka.bootstrap(),
        mongo: mongo_server.url(),
    };
    // Dynamic group membership, as most deployments run it: a member killed with -9 is
    // expired by the broker after `session.timeout.ms` and its partitions move to the others.
    let registry_section = format!(
        "[schema_registry]\nurl = \"{}\"\n",
        registry.replace(&host_port(&registry), &net.registry.listen)
    );
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let prepared = mode.prepare(&source, &source_url).await;
    let text = with_source(
        &pipeline_toml(
            &proxied,
            &relay_url,
            &sink_url,
            &mongo_db,
            &format!("{RECONCILE}{registry_section}"),
        ),
        &prepared.source_lines(),
    );
    let config = Config::from_toml(std::path::Path::new("chaos.toml"), &text, Vec::new()).unwrap();
    let file = crate::processes::write_config(&text);
    let path = file.to_str().unwrap();
    // Other relays (standbys) reach PostgreSQL on links of their own.
    let standby_file = crate::processes::write_config(&text.replace(&relay_url, &standby_url));
    let standby_path = standby_file.to_str().unwrap();

    let mut procs = Pipeline::start("chaos", path);
    let writing = CancellationToken::new();
    let writers = tokio::spawn(write_until(source_url.clone(), rng.gen(), writing.clone()));
    let probing = CancellationToken::new();
    let probes = Probes::default();
    let prober = probes.spawn(
        source_url.clone(),
        Pair::url(&direct, &sink_db),
        (mongo_server.url(), mongo_db.clone()),
        probing.clone(),
    );

    let mut f = Faults::new(
        kafka,
        mongo_server,
        config.kafka.topic_for("orders"),
        &FAULT_KINDS,
    );
    if mode == Mode::Wal {
        f.skip_kind("primary failover");
    }
    for step in 0..faults {
        let Some((fault, restart_after)) = f.next(step, &mut procs, &mut rng).await else {
            continue;
        };
        let started = Instant::now();
        let marks = log_marks(&procs);
        let (what, healed) = match fault {
            3 => {
                procs
                    .crash(&[Role::Relay, Role::ApplyPg], restart_after)
                    .await;
                continue;
            }
            7 => {
                // The primary's PostgreSQL (also the PostgreSQL sink's) restarts: the relay,
                // the PostgreSQL apply and the writers lose their connections.
                pg.primary().stop();
                tokio::time::sleep(restart_after).await;
                pg.primary().start();
                continue;
            }
            5 => {
                // A second relay: standby while the first lives; stopped cleanly.
                let mut second = Proc::new("chaos-relay-2", &["relay", "-c", standby_path]);
                tokio::time::sleep(restart_after).await;
                second.stop();
                continue;
            }
            10 => net.partition(&mut rng).await,
            11 => net.slow(&mut rng).await,
            12 => net.resets(&mut rng).await,
            13 => {
                // The standby stops afterwards, so the first relay leads again.
                let tails = || procs.tails();
                let (mut standby, took, healed) = leader_cut_off(
                    &net.proxy,
                    &procs.relay,
                    &net.relay_pg,
                    || Proc::new("chaos-relay-standby", &["relay", "-c", standby_path]),
                    seed,
                    &tails,
                )
                .await;
                standby.stop();
                let what = format!(
                    "relay leader (standby led {:.1}s after)",
                    took.as_secs_f64()
                );
                (what, healed)
            }
            _ => {
                pg.failover().await;
                println!(
                    "        failover done: the standby is primary, the old primary its standby"
                );
                (
                    "PostgreSQL primary killed, standby promoted".to_string(),
                    Instant::now(),
                )
            }
        };
        let (healthy, readiness) = healthy_after(&procs, &probes, healed).await;
        let longest = probes.longest(started, Instant::now());
        println!(
            "chaos fault seed {seed}: {} | {what} | healthy {} after the heal | longest commit → applied {:.1}s | {} | {readiness}",
            FAULT_KINDS[fault],
            healthy.map_or("NOT within 180 s".to_string(), |d| format!("{:.1}s", d.as_secs_f64())),
            longest.as_secs_f64(),
            logged(&procs, &marks)
        );
    }
    writing.cancel();
    let written = writers.await.unwrap();
    let writes_done = Instant::now();
    probing.cancel();
    prober.await.unwrap();
    // The schedule may have restarted the primary, or failed over, under the first connection.
    let source = dualsync::pg::connect(&source_url).await.unwrap();

    let SinkConfig::Postgres(pg_config) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let SinkConfig::Mongodb(mongo) = &config.sinks["mongo"] else {
        unreachable!()
    };
    let pg_sink = PostgresSink::connect(pg_config).await.unwrap();
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

    // Nothing acknowledged was lost (a failover included): every probe commit is on the
    // primary, hence (converged) in both sinks.
    let acked = probes.acked.lock().unwrap().clone();
    let kept: i64 = source
        .query_one(
            "SELECT count(*) FROM shop.customers WHERE id = ANY($1)",
            &[&acked],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept as usize,
        acked.len(),
        "seed {seed}: acknowledged commits lost"
    );

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
        "chaos seed {seed}: {written} transactions, {} acknowledged probes all kept, {events} events, \
         {faults} faults, {} poison ({letters} dead letters), {duplicates} duplicates in the topics \
         (absorbed), 0 order violations, 0 mismatches, converged {converge_secs:.1}s after the \
         writers stopped ({})",
        acked.len(),
        f.poison_keys.len(),
        f.drawn()
    );
    procs.stop();
}

/// The load: three writers contending on 20 customers and 150 orders at 200 changes/s, in
/// rounds of 1,000 changes until `stop` (at least 3,000), so every fault of a schedule, however
/// long, happens mid-load. Returns the transactions committed.
async fn write_until(url: String, seed: u64, stop: CancellationToken) -> u64 {
    let mut written = 0;
    for round in 0u64.. {
        if stop.is_cancelled() && round >= 3 {
            break;
        }
        written +=
            dualsync::demo::generate_at_rate(&url, 20, 150, 1000, 3, seed + round, Some(200.0))
                .await
                .unwrap();
    }
    written
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
        // Counted as the messages arrive: recounting them all after each one was quadratic,
        // and a schedule whose writers run through minutes of network faults writes tens of
        // thousands of events.
        let seen = std::sync::Mutex::new((std::collections::HashSet::new(), 0));
        let messages = read_topic_until(&servers.kafka, &config.kafka.topic_for(aggregate), {
            move |ms| {
                let (set, counted) = &mut *seen.lock().unwrap();
                set.extend(ms[*counted..].iter().filter_map(event_of));
                *counted = ms.len();
                set.len() >= rows
            }
        })
        .await;
        let order = order::violations(&messages);
        assert!(
            order.is_empty(),
            "seed {seed}: {} order violations in the {aggregate} topic: {:?}",
            order.len(),
            &order[..order.len().min(10)]
        );
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
