//! The fault-injection harness both schedules share: the pipeline's processes, the faults
//! drawn from a seed, and the dead-letter check.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use dualsync::dlq::headers;

use crate::common::*;
use crate::private_kafka::KafkaCluster;
use crate::private_servers::PrivateServer;

/// One named process of the pipeline, restartable, with its log kept for failure reports.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) args: Vec<String>,
    pub(super) child: Option<Child>,
    pub(super) logs: Vec<std::path::PathBuf>,
}

impl Proc {
    pub(super) fn new(name: &str, args: &[&str]) -> Self {
        let mut p = Self {
            name: name.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            logs: Vec::new(),
        };
        p.start();
        p
    }
    pub(super) fn start(&mut self) {
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
    pub(super) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// SIGTERM and wait; a clean exit is part of the contract. It holds once the process has
    /// installed its signal handlers, which it does before its HTTP endpoint listens: a SIGTERM
    /// before that (a debug binary still loading on a loaded machine) ends it by the default
    /// action, as any process, so the stop waits for that log line first.
    pub(super) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let end = Instant::now() + DEADLINE;
            while !self.log_contains("http endpoint listening") && c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < end, "{} never started", self.name);
                std::thread::sleep(Duration::from_millis(50));
            }
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
    /// The log of the current (last started) run.
    fn log(&self) -> String {
        self.logs
            .last()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }
    fn log_contains(&self, needle: &str) -> bool {
        self.log().contains(needle)
    }
    /// How long the current log is, to read what a fault made the process log.
    pub(super) fn log_len(&self) -> usize {
        self.log().len()
    }
    /// The current log from byte `from` on.
    pub(super) fn log_since(&self, from: usize) -> String {
        self.log().get(from..).unwrap_or_default().to_string()
    }
    /// `127.0.0.1:port` of the current run's HTTP endpoint, once it listens.
    pub(super) fn http_address(&self) -> Option<String> {
        let log = self.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("http endpoint listening"))?;
        let address = line.split("address=").nth(1)?;
        Some(address.split_whitespace().next()?.to_string())
    }
    pub(super) fn tail(&self) -> String {
        let text = self.log();
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

/// A process of the pipeline a fault can crash.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Role {
    Relay,
    ApplyPg,
    ApplyMongo,
}

/// The pipeline's processes: a relay and one apply per sink, on one configuration file.
pub(super) struct Pipeline {
    pub(super) relay: Proc,
    pub(super) apply_pg: Proc,
    pub(super) apply_mongo: Proc,
}

impl Pipeline {
    pub(super) fn start(name: &str, config: &str) -> Self {
        Self {
            relay: Proc::new(&format!("{name}-relay"), &["relay", "-c", config]),
            apply_pg: Proc::new(
                &format!("{name}-apply-pg"),
                &["apply", "-c", config, "--sink", "postgres"],
            ),
            apply_mongo: Proc::new(
                &format!("{name}-apply-mongo"),
                &["apply", "-c", config, "--sink", "mongo"],
            ),
        }
    }

    pub(super) fn get(&mut self, role: Role) -> &mut Proc {
        match role {
            Role::Relay => &mut self.relay,
            Role::ApplyPg => &mut self.apply_pg,
            Role::ApplyMongo => &mut self.apply_mongo,
        }
    }

    /// `kill -9` of `roles`, restarted after `restart_after` (applies first, then the relay).
    pub(super) async fn crash(&mut self, roles: &[Role], restart_after: Duration) {
        for role in roles {
            self.get(*role).kill9();
        }
        tokio::time::sleep(restart_after).await;
        for role in [Role::ApplyPg, Role::ApplyMongo, Role::Relay] {
            if roles.contains(&role) {
                self.get(role).start();
            }
        }
    }

    /// The last lines of each process's log, for a failure report.
    pub(super) fn tails(&self) -> String {
        format!(
            "relay:\n{}\napply pg:\n{}\napply mongo:\n{}",
            self.relay.tail(),
            self.apply_pg.tail(),
            self.apply_mongo.tail()
        )
    }

    /// SIGTERM to each; a clean exit is part of the contract.
    pub(super) fn stop(&mut self) {
        for p in [&mut self.relay, &mut self.apply_pg, &mut self.apply_mongo] {
            p.stop();
        }
    }
}

/// The servers and poison of a schedule, for the faults both schedules draw.
pub(super) struct Faults {
    pub(super) kafka: KafkaCluster,
    pub(super) mongo_sink: PrivateServer,
    pub(super) producer: FutureProducer,
    /// The event topic poison goes to, whose partitions' leaders are crashed.
    pub(super) event_topic: String,
    pub(super) poison_keys: Vec<String>,
    /// The schedule's fault kinds (shared ones at the numbers [`Faults::inject`] knows) and
    /// how many of each it drew.
    kinds: &'static [&'static str],
    drawn: Vec<usize>,
    started: Instant,
    /// Kinds the schedule starts with, in order (`DUALSYNC_CHAOS_FIRST`), before random ones.
    first: Vec<usize>,
    /// Kinds drawn but not injected (`DUALSYNC_CHAOS_SKIP`, same form).
    skip: Vec<usize>,
}

impl Faults {
    pub(super) fn new(
        kafka: KafkaCluster,
        mongo_sink: PrivateServer,
        event_topic: String,
        kinds: &'static [&'static str],
    ) -> Self {
        Self {
            producer: poison_producer(&kafka.bootstrap()),
            kafka,
            mongo_sink,
            event_topic,
            poison_keys: Vec::new(),
            kinds,
            drawn: vec![0; kinds.len()],
            started: Instant::now(),
            first: named_kinds(kinds, "DUALSYNC_CHAOS_FIRST"),
            skip: named_kinds(kinds, "DUALSYNC_CHAOS_SKIP"),
        }
    }

    /// Draws `name` as usual but never injects it (a kind this pipeline cannot survive by
    /// design, like a primary failover for a logical slot that lives on the primary only).
    pub(super) fn skip_kind(&mut self, name: &str) {
        self.skip.extend(self.kinds.iter().position(|k| *k == name));
    }

    /// Draws fault number `step` and injects it when it is a shared kind; otherwise returns
    /// it (and how long its victim stays down) for the schedule to inject.
    pub(super) async fn next(
        &mut self,
        step: usize,
        procs: &mut Pipeline,
        rng: &mut StdRng,
    ) -> Option<(usize, Duration)> {
        let (fault, restart_after) =
            draw_fault(rng, self.started, step, self.kinds, self.first.get(step)).await;
        if self.skip.contains(&fault) {
            println!("        skipped (DUALSYNC_CHAOS_SKIP)");
            return None;
        }
        self.drawn[fault] += 1;
        let shared = self.inject(fault, step, restart_after, procs, rng).await;
        (!shared).then_some((fault, restart_after))
    }

    /// `kind xN` for every fault kind the schedule drew.
    pub(super) fn drawn(&self) -> String {
        drawn_kinds(self.kinds, &self.drawn)
    }

    /// Kinds 0–2 (kill -9 of the relay or of an apply), 4 (poison), 6 (restart of the MongoDB
    /// sink's server) and 8–9 (kill -9 of a partition's leader or of the active controller);
    /// false for any other kind (the schedule's own).
    async fn inject(
        &mut self,
        fault: usize,
        step: usize,
        restart_after: Duration,
        procs: &mut Pipeline,
        rng: &mut StdRng,
    ) -> bool {
        match fault {
            0 => procs.crash(&[Role::Relay], restart_after).await,
            1 => procs.crash(&[Role::ApplyPg], restart_after).await,
            2 => procs.crash(&[Role::ApplyMongo], restart_after).await,
            4 => {
                let key = inject_poison(&self.producer, &self.event_topic, step).await;
                self.poison_keys.push(key);
            }
            6 => {
                // The MongoDB sink's server goes away and comes back on the same data.
                self.mongo_sink.stop();
                tokio::time::sleep(restart_after).await;
                self.mongo_sink.start();
            }
            8 | 9 => {
                let leader = fault == 8;
                crash_broker(
                    &mut self.kafka,
                    rng,
                    leader,
                    &self.event_topic,
                    restart_after,
                )
                .await
            }
            _ => return false,
        }
        true
    }
}

/// The schedule's seed (`DUALSYNC_CHAOS_SEED`, random when unset, printed as `chaos <name>
/// seed N` so a failure can be replayed), its number of faults (`DUALSYNC_CHAOS_FAULTS`,
/// default 6) and the random numbers it draws from.
pub(super) fn schedule(name: &str) -> (u64, usize, StdRng) {
    let seed: u64 = std::env::var("DUALSYNC_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let faults: usize = std::env::var("DUALSYNC_CHAOS_FAULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    println!("{name} seed {seed}, {faults} faults (DUALSYNC_CHAOS_SEED={seed} replays it)");
    (seed, faults, StdRng::seed_from_u64(seed))
}

/// The kinds named in `variable` (comma-separated, e.g. `partition,slow link,leader cut-off`)
/// that this schedule has, in order. `DUALSYNC_CHAOS_FIRST`: CI's short schedule starts with
/// them so it always covers them; the random draws go on after. `DUALSYNC_CHAOS_SKIP`: drawn
/// but not injected (e.g. the leader cut-off on a build without its fix), the seed's other
/// draws unchanged. Names of another schedule's kinds are ignored.
fn named_kinds(kinds: &[&str], variable: &str) -> Vec<usize> {
    std::env::var(variable)
        .unwrap_or_default()
        .split(',')
        .filter_map(|name| kinds.iter().position(|k| *k == name.trim()))
        .collect()
}

/// Waits the schedule's own pacing (drawn from the seed, not a synchronisation point), then
/// draws the next fault (an index into `kinds`) and how long its victim stays down.
async fn draw_fault(
    rng: &mut StdRng,
    started: Instant,
    step: usize,
    kinds: &[&str],
    forced: Option<&usize>,
) -> (usize, Duration) {
    tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
    let restart_after = Duration::from_millis(rng.gen_range(50..1500));
    // Drawn as i32, as the first reports' schedules were: a seed replays the same faults.
    let drawn = rng.gen_range(0..kinds.len() as i32) as usize;
    let fault = forced.copied().unwrap_or(drawn);
    println!(
        "  {:>5.1}s fault {step}: kind {fault} ({})",
        started.elapsed().as_secs_f64(),
        kinds[fault]
    );
    (fault, restart_after)
}

/// A producer for the poison messages the schedules inject straight into an event topic.
fn poison_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// Produces one message that is no event (keyed `poison-<step>`) to `topic`; returns its key.
/// A schedule may draw poison before the relay created the topic (auto-creation is off), or
/// while a broker is down: the produce is tried again until it lands, up to a deadline.
pub(super) async fn inject_poison(producer: &FutureProducer, topic: &str, step: usize) -> String {
    let key = format!("poison-{step}");
    let deadline = Instant::now() + crate::common::DEADLINE;
    loop {
        let sent = producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&b"\x00not an event"[..]),
                Duration::from_secs(10),
            )
            .await;
        match sent {
            Ok(_) => return key,
            Err((e, _)) if Instant::now() < deadline => {
                println!("  poison to {topic} not produced yet ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err((e, _)) => panic!("poison to {topic} not produced within the deadline: {e}"),
        }
    }
}

/// A broker crashes mid-stream (`kill -9`) and comes back on its data after `restart_after`:
/// the leader of a partition of `topic` the pipeline writes and reads, or the active KRaft
/// controller. Its partitions' leadership moves to an in-sync replica; acknowledged messages
/// (acks=all, two in-sync replicas at least) survive.
pub(super) async fn crash_broker(
    kafka: &mut KafkaCluster,
    rng: &mut StdRng,
    partition_leader: bool,
    topic: &str,
    restart_after: Duration,
) {
    let victim = if partition_leader {
        let partition = rng.gen_range(0..3);
        kafka.partition_leader(topic, partition)
    } else {
        kafka.active_controller()
    }
    .unwrap_or_else(|| rng.gen_range(1..=kafka.len()));
    println!("        kill -9 of broker {victim}");
    kafka.kill(victim);
    tokio::time::sleep(restart_after).await;
    kafka.restart(victim);
}

/// Checks that `dlq_topic` holds exactly the injected poison (`poison_keys`), from both sinks'
/// consumer groups, and nothing else; returns how many letters it holds. A dead letter whose
/// offset was not committed before a `kill -9` is sent again: duplicates are allowed, other
/// messages and missing ones are not. `diagnosis` gives the processes' logs for a failure.
pub(super) async fn dead_letters_are_the_poison(
    brokers: &str,
    dlq_topic: &str,
    poison_keys: &[String],
    seed: u64,
    diagnosis: &dyn Fn() -> String,
) -> usize {
    let letters = if poison_keys.is_empty() {
        Vec::new()
    } else {
        // Until both groups' letters cover every poison key: a letter sent twice must not make
        // the read stop before the last one.
        let wanted = poison_keys.len();
        read_topic_until(brokers, dlq_topic, move |ms| {
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
    let mut expected = poison_keys.to_vec();
    expected.sort();
    for (group, keys) in &per_group {
        let mut unique_keys = keys.clone();
        unique_keys.sort();
        unique_keys.dedup();
        assert_eq!(
            unique_keys, expected,
            "seed {seed}: group {group} dead-lettered {keys:?}"
        );
    }
    assert_eq!(
        per_group.len(),
        usize::from(!poison_keys.is_empty()) * 2,
        "seed {seed}: {per_group:?}\n{}",
        diagnosis()
    );
    letters.len()
}

/// `kind xN` for every fault kind the schedule drew.
fn drawn_kinds(kinds: &[&str], drawn: &[usize]) -> String {
    kinds
        .iter()
        .zip(drawn)
        .filter(|(_, n)| **n > 0)
        .map(|(kind, n)| format!("{kind} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
