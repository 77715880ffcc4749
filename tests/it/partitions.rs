//! Faults that are not polite: a relay leader whose host is cut off from PostgreSQL without
//! its connection being closed (a Toxiproxy blackhole on the leader's link only; the standby
//! reaches the server directly). The server must free the leader lock although nothing ever
//! closes the socket, the old leader must stop publishing before that, and the standby must
//! take over within the stated bound with per-key order and completeness intact on the topic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use dualsync::config::Config;
use dualsync::publish::headers;
use dualsync::source::leader_lease::LeaderLease;

use crate::capture_modes::{Mode, Prepared};
use crate::common::*;
use crate::pipeline_scope::with_source;
use crate::toxiproxy::{host_port, Toxiproxy};

/// The bound docs/operations.md states for a take-over after the leader is cut off.
pub(crate) const TAKE_OVER_BOUND: Duration = Duration::from_secs(30);
/// Keys the writer cycles through: several versions of each land on every partition.
pub(crate) const KEYS: usize = 12;

/// One outbox row the writer committed: `(event id, aggregate id, created_at in micros)`
/// (by event id: in WAL mode the version is not the `seq`).
type Written = (String, String, i64);

/// Writes `customers` rows, one per statement, cycling over [`KEYS`] keys, until `stop`.
async fn write_until(source_url: String, stop: CancellationToken) -> Vec<Written> {
    let client = dualsync::pg::connect(&source_url).await.unwrap();
    let insert = client
        .prepare(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('customers', $1, 'CustomerUpserted', $2)
             RETURNING id::text, (extract(epoch FROM created_at) * 1000000)::int8",
        )
        .await
        .unwrap();
    let mut written = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for n in 0.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let id = format!("c{}", n % KEYS);
        let payload =
            serde_json::json!({"id": id, "name": format!("n{n}"), "email": "e", "order_count": n});
        let row = client.query_one(&insert, &[&id, &payload]).await.unwrap();
        written.push((row.get(0), id, row.get(1)));
    }
    written
}

/// The pid holding this database's relay leader lock, if any.
async fn leader_lock_holder(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
               AND classid = x'6473796e'::int4::oid AND objsubid = 2
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Per-key order on the topic: in partition order, a version below the key's highest so far
/// is only allowed as a redelivery of an identical earlier message. Returns the first
/// on-topic timestamp (ms) of each version.
pub(crate) fn check_order(messages: &[OwnedMessage]) -> BTreeMap<i64, i64> {
    // Per (partition, key): the highest version so far, and every (version, value) seen.
    type Copies = (i64, BTreeSet<(i64, Vec<u8>)>);
    let mut seen: HashMap<(i32, Vec<u8>), Copies> = HashMap::new();
    let mut first_on_topic: BTreeMap<i64, i64> = BTreeMap::new();
    for m in messages {
        let version: i64 = header(m, headers::VERSION).unwrap().parse().unwrap();
        let key = m.key().unwrap().to_vec();
        let value = m.payload().unwrap_or_default().to_vec();
        let (max, copies) = seen.entry((m.partition(), key.clone())).or_default();
        if version < *max {
            assert!(
                copies.contains(&(version, value.clone())),
                "key {} went back from version {max} to {version} at partition {} offset {}, and that is not a redelivery of an identical event",
                String::from_utf8_lossy(&key),
                m.partition(),
                m.offset()
            );
        }
        *max = (*max).max(version);
        copies.insert((version, value));
        let millis = m.timestamp().to_millis().unwrap();
        first_on_topic.entry(version).or_insert(millis);
    }
    first_on_topic
}

/// [`check_order`], and every written row is on the topic. Returns the worst commit →
/// on-topic delay (the first copy's timestamp minus the row's `created_at`).
fn check_topic(messages: &[OwnedMessage], written: &[Written]) -> Duration {
    check_order(messages);
    let mut first_on_topic: HashMap<String, i64> = HashMap::new();
    for m in messages {
        let millis = m.timestamp().to_millis().unwrap();
        first_on_topic
            .entry(header(m, headers::EVENT_ID).unwrap())
            .or_insert(millis);
    }
    let mut worst = 0i64;
    for (event, id, created_micros) in written {
        let Some(on_topic) = first_on_topic.get(event) else {
            panic!("outbox row {event} ({id}) is missing from the topic");
        };
        worst = worst.max(on_topic * 1000 - created_micros);
    }
    Duration::from_micros(worst.max(0) as u64)
}

/// A fresh outbox database, a private Toxiproxy with a link to its server, and one pipeline's
/// configuration text whose source URL is `@SOURCE@` (the leader's goes through the link).
struct CutOff {
    source_url: String,
    admin: tokio_postgres::Client,
    proxy: Toxiproxy,
    link: crate::toxiproxy::Link,
    /// The source URL through the link.
    leader_url: String,
    text: String,
    mode: Mode,
    /// The WAL capture's slot (dropped last).
    _prepared: Prepared,
}

impl CutOff {
    async fn new(link_name: &str, mode: Mode) -> Self {
        let servers = servers();
        let source_url = create_database(&servers).await;
        let admin = dualsync::pg::connect(&source_url).await.unwrap();
        dualsync::source::outbox::migrate(&admin).await.unwrap();
        let prepared = mode.prepare(&admin, &source_url).await;
        let proxy = Toxiproxy::start().await;
        let upstream = host_port(&source_url);
        let link = proxy.link(link_name, &upstream).await;
        let leader_url = source_url.replace(&upstream, &link.listen);
        let text = with_source(
            &pipeline_toml(&servers, "@SOURCE@", &source_url, &unique("t"), ""),
            &prepared.source_lines(),
        );
        Self {
            source_url,
            admin,
            proxy,
            link,
            leader_url,
            text,
            mode,
            _prepared: prepared,
        }
    }

    /// The pipeline with its source at `url`.
    fn config(&self, url: &str) -> Config {
        Config::from_toml(
            Path::new("t.toml"),
            &self.text.replace("@SOURCE@", url),
            vec![],
        )
        .unwrap()
    }

    /// Outbox rows not yet (`false`) or already (`true`) marked published.
    async fn rows(&self, published: bool) -> i64 {
        self.admin
            .query_one(
                "SELECT count(*) FROM dualsync.outbox WHERE (published_at IS NOT NULL) = $1",
                &[&published],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Blackholes the link and waits until `standby` leads: returns when the standby led,
    /// when the server freed `old_pid`'s lock and when `leader` (if watched) stopped leading,
    /// as times after the cut-off.
    async fn cut_until_taken_over(
        &self,
        old_pid: i32,
        leader: Option<&dualsync::metrics::Metrics>,
        standby: &dualsync::metrics::Metrics,
    ) -> TakeOver {
        self.proxy.blackhole(&self.link).await;
        let cut = Instant::now();
        let (mut leader_stopped, mut lock_freed) = (None, None);
        loop {
            let now = Instant::now();
            if leader_stopped.is_none() && leader.is_some_and(|m| m.relay_leader.get() == 0) {
                leader_stopped = Some(now - cut);
            }
            if lock_freed.is_none() && leader_lock_holder(&self.admin).await != Some(old_pid) {
                lock_freed = Some(now - cut);
            }
            if standby.relay_leader.get() == 1 {
                let taken = TakeOver {
                    leader_stopped,
                    lock_freed,
                    standby_led: now - cut,
                };
                eprintln!("after the cut-off: {taken:?}");
                return taken;
            }
            assert!(
                now - cut < TAKE_OVER_BOUND + Duration::from_secs(15),
                "the standby did not take over within {:?} of the leader's cut-off (leader stopped: {leader_stopped:?}, lock freed: {lock_freed:?})",
                now - cut,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lets `standby` (now the leader) publish on, stops the writer, waits until the outbox is
    /// drained, heals the link, and checks the topic: per-key order and every written row.
    async fn drain_and_check(
        &self,
        standby: &dualsync::metrics::Metrics,
        stop_writing: CancellationToken,
        writer: tokio::task::JoinHandle<Vec<Written>>,
    ) {
        let published_at_take_over = leader_published(standby);
        eventually("the new leader publishes", || async {
            leader_published(standby) > published_at_take_over + 100
        })
        .await;
        stop_writing.cancel();
        let written = writer.await.unwrap();
        if self.mode == Mode::Poll {
            eventually("the outbox is drained", || async {
                self.rows(false).await == 0
            })
            .await;
        }
        self.proxy.heal(&self.link).await;
        let topic = self.config(&self.source_url).kafka.topic_for("customers");
        let events: BTreeSet<String> = written.iter().map(|(event, ..)| event.clone()).collect();
        let messages = read_topic_until(&servers().kafka, &topic, move |got| {
            let on_topic: BTreeSet<String> = got
                .iter()
                .filter_map(|m| header(m, headers::EVENT_ID))
                .collect();
            events.is_subset(&on_topic)
        })
        .await;
        let worst = check_topic(&messages, &written);
        eprintln!(
            "{} rows, {} messages; worst commit -> on-topic delay across the hand-over {worst:?}",
            written.len(),
            messages.len()
        );
    }
}

/// When things happened after the cut-off.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
struct TakeOver {
    leader_stopped: Option<Duration>,
    lock_freed: Option<Duration>,
    standby_led: Duration,
}

/// Issues #35 item 7 and #36: the leader's link to PostgreSQL is blackholed (no FIN, no RST:
/// the server keeps seeing an open connection, whose keepalives Toxiproxy answers). Before the
/// fix the server held the session lock for as long as the socket lived (about two hours) and
/// the standby never led.
#[tokio::test]
async fn a_leader_cut_off_from_postgres_steps_down_before_the_standby_takes_over() {
    leader_cut_off(Mode::Poll).await;
}

/// The same with the WAL capture: the cut-off leader's replication session goes through the
/// link too, so the standby also waits for the server to free the slot (55006 until then).
#[tokio::test]
async fn a_wal_leader_cut_off_steps_down_before_the_standby_takes_over() {
    leader_cut_off(Mode::Wal).await;
}

async fn leader_cut_off(mode: Mode) {
    let t = CutOff::new("leader_pg", mode).await;
    // One pipeline, two relays: the leader through the link, the standby directly.
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(write_until(t.source_url.clone(), stop_writing.clone()));
    let cancel = CancellationToken::new();
    let (leader_task, leader) = spawn_relay(&t.config(&t.leader_url), &cancel);
    eventually("the first relay leads and publishes", || async {
        leader.relay_leader.get() == 1 && leader_published(&leader) > 50
    })
    .await;
    let old_pid = leader_lock_holder(&t.admin)
        .await
        .expect("the leader holds the lock");
    let (standby_task, standby) = spawn_relay(&t.config(&t.source_url), &cancel);
    standby_connects(&standby).await;

    let taken = t
        .cut_until_taken_over(old_pid, Some(&leader), &standby)
        .await;
    let leader_stopped = taken
        .leader_stopped
        .expect("the cut-off leader still led when the standby took over");
    let lock_freed = taken
        .lock_freed
        .expect("the standby led while the old session held the lock");
    // Toxiproxy passes the old leader's close on once it steps down, so here the lock goes
    // as soon as it stopped; `a_silent_session_s_lock_is_freed_by_the_server_clock` shows
    // the server freeing it without that close.
    assert!(
        leader_stopped <= lock_freed,
        "the old leader still led when the server freed its lock"
    );
    assert!(taken.standby_led <= TAKE_OVER_BOUND, "{taken:?}");

    t.drain_and_check(&standby, stop_writing, writer).await;
    stop_relays(&cancel, [leader_task, standby_task]).await;
}

/// Cancels the relays and waits until each ended without an error.
pub(crate) async fn stop_relays<const N: usize>(
    cancel: &CancellationToken,
    tasks: [tokio::task::JoinHandle<Result<(), dualsync::error::Error>>; N],
) {
    cancel.cancel();
    for task in tasks {
        tokio::time::timeout(DEADLINE, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Waits until a standby relay is connected and ready, and checks that it does not lead.
pub(crate) async fn standby_connects(standby: &dualsync::metrics::Metrics) {
    eventually("the standby connects", || async {
        standby
            .health
            .not_ready(Duration::from_secs(3600))
            .is_empty()
    })
    .await;
    assert_eq!(
        standby.relay_leader.get(),
        0,
        "the standby leads beside the leader"
    );
}

/// What the server sees of a leader that vanished without closing anything: the session,
/// behind a blackholed link the test never closes, with the leader session's settings (here a
/// 5 s lease) is ended by the server about one lease after its last query, although Toxiproxy
/// keeps the TCP connection alive (it answers the server's keepalives). The control: the
/// same session with only the TCP settings (what a server before PostgreSQL 14 gets) still
/// holds its lock well after that.
#[tokio::test]
async fn a_silent_session_s_lock_is_freed_by_the_server_clock() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let admin = dualsync::pg::connect(&source_url).await.unwrap();
    let proxy = Toxiproxy::start().await;
    let upstream = host_port(&source_url);
    let link = proxy.link("silent_pg", &upstream).await;
    let via_link = source_url.replace(&upstream, &link.listen);
    let lease = LeaderLease::new(Duration::from_secs(5));
    let mut sessions = Vec::new();
    for (key, server_version) in [(1, 150_000), (2, 130_000)] {
        let client = dualsync::pg::connect(&via_link).await.unwrap();
        client
            .batch_execute(&lease.server_settings(server_version))
            .await
            .unwrap();
        let pid: i32 = client
            .query_one(
                "SELECT pg_backend_pid() WHERE pg_try_advisory_lock(x'6473796e'::int4, $1)",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        sessions.push((client, pid));
    }
    let (with_clock, tcp_only) = (sessions[0].1, sessions[1].1);
    let holds_lock = |pid: i32| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND granted)",
                    &[&pid],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    proxy.blackhole(&link).await;
    let cut = Instant::now();
    eventually("the server ends the silent session", || async {
        !holds_lock(with_clock).await
    })
    .await;
    let freed = cut.elapsed();
    eprintln!("the server freed the silent session's lock {freed:?} after the cut-off");
    assert!(
        freed >= Duration::from_secs(4) && freed <= Duration::from_secs(8),
        "freed after {freed:?}, expected about the 5 s lease"
    );
    let gone: bool = admin
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
            &[&with_clock],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        gone,
        "the session holding no lock is still in pg_stat_activity"
    );
    // Not a synchronisation: the control must still hold its lock a while past the lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        holds_lock(tcp_only).await,
        "TCP alone freed the lock behind a live proxy"
    );
    drop(sessions);
    proxy.heal(&link).await;
}

/// Sends `signal` (`STOP`, `CONT`, `TERM`) to a process this test started.
fn signal(child: &std::process::Child, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {}", child.id());
}

/// A leader whose host vanishes: the `dualsync relay` process is frozen (SIGSTOP: nothing it
/// holds is closed, nothing is sent) and its link blackholed. Only the server's clock can free
/// the lock; the standby must lead within the bound, and the old leader, thawed after that,
/// must step down without publishing (its lease ran out while it was frozen) — the pause of a
/// virtual machine or a long GC stop looks the same to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_s_lock_is_freed_by_the_server_and_the_thawed_leader_steps_down() {
    let t = CutOff::new("frozen_pg", Mode::Poll).await;
    let leader_file = crate::processes::write_config(&t.text.replace("@SOURCE@", &t.leader_url));
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(write_until(t.source_url.clone(), stop_writing.clone()));
    let log = format!("{}.log", unique("frozen-leader"));
    let mut old =
        crate::processes::spawn(&["relay", "--config", leader_file.to_str().unwrap()], &log);
    eventually("the relay process leads and publishes", || async {
        t.rows(true).await > 50
    })
    .await;
    let old_pid = leader_lock_holder(&t.admin)
        .await
        .expect("the leader holds the lock");
    let cancel = CancellationToken::new();
    let (standby_task, standby) = spawn_relay(&t.config(&t.source_url), &cancel);
    standby_connects(&standby).await;

    signal(&old, "STOP");
    let taken = t.cut_until_taken_over(old_pid, None, &standby).await;
    assert!(
        taken.lock_freed.is_some(),
        "the standby led while the frozen session held the lock"
    );
    assert!(taken.standby_led <= TAKE_OVER_BOUND, "{taken:?}");

    // Thawed, still cut off: it finds its lease run out and steps down.
    signal(&old, "CONT");
    crate::processes::wait_for_log(&log, "stepping down before a standby can take over");
    t.drain_and_check(&standby, stop_writing, writer).await;
    assert_eq!(
        standby.relay_leader.get(),
        1,
        "the thawed leader took the lock back"
    );
    signal(&old, "TERM");
    let status = crate::processes::wait_exit(&mut old, Duration::from_secs(30));
    assert!(status.success(), "old leader's exit status: {status}");
    stop_relays(&cancel, [standby_task]).await;
}

/// Events a relay published (marked after Kafka's acknowledgement).
pub(crate) fn leader_published(metrics: &dualsync::metrics::Metrics) -> u64 {
    dualsync::metrics::total(&metrics.published)
}
