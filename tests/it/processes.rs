//! The real binary as separate processes: relay fail-over after `kill -9`, and clean exit on
//! SIGTERM.

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::Message;

use dualsync::config::Config;
use dualsync::publish::headers;

use crate::capture_modes::{every_row_in_topics, Mode};
use crate::common::*;
use crate::pipeline_scope::with_source;

pub fn write_config(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("dualsync")));
    std::fs::write(&path, text).unwrap();
    path
}

pub fn spawn(args: &[&str], log: &str) -> Child {
    spawn_with_env(args, log, &[])
}

/// [`spawn`] with `env` added to the process's environment.
pub fn spawn_with_env(args: &[&str], log: &str, env: &[(&str, &std::ffi::OsStr)]) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join(log)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(args)
        .env("RUST_LOG", "info,dualsync=debug")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start dualsync")
}

/// Waits for the process to exit (deadline-bounded) and returns its exit status.
pub fn wait_exit(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < end,
            "process {} did not exit in time",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn unpublished(client: &tokio_postgres::Client) -> i64 {
    dualsync::demo::outbox_counts(client).await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_relay_takes_over_after_kill_9_without_loss_or_reordering() {
    standby_takes_over_after_kill_9(Mode::Poll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_standby_relay_takes_over_after_kill_9_without_loss_or_reordering() {
    standby_takes_over_after_kill_9(Mode::Wal).await;
}

async fn standby_takes_over_after_kill_9(mode: Mode) {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let prepared = mode.prepare(&source, &source_url).await;
    let text = with_source(
        &pipeline_toml(&servers, &source_url, &source_url, &unique("t"), ""),
        &prepared.source_lines(),
    );
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    let path = write_config(&text);
    let path = path.to_str().unwrap();
    let types = ["customers", "orders"];

    let mut active = spawn(&["relay", "--config", path], "relay-a.log");
    // A is active once it publishes something.
    dualsync::demo::generate(&source_url, 3, 30, 20, 1, 1)
        .await
        .unwrap();
    every_row_in_topics(&source, &config, &types).await;
    let mut standby = spawn(&["relay", "--config", path], "relay-b.log");

    // Writers keep committing while A is killed mid-stream.
    let url = source_url.clone();
    let writers = tokio::spawn(async move {
        dualsync::demo::generate(&url, 3, 30, 1500, 3, 2)
            .await
            .unwrap()
    });
    eventually("some of the new load is written", || async {
        dualsync::demo::outbox_counts(&source).await.unwrap().0 > 400
    })
    .await;
    active.kill().unwrap(); // SIGKILL
    active.wait().unwrap();
    writers.await.unwrap();
    if mode == Mode::Poll {
        eventually("the standby marks everything", || async {
            unpublished(&source).await == 0
        })
        .await;
    }
    // Every row arrived (by event id), and per key the first occurrences of versions are
    // increasing.
    let messages = every_row_in_topics(&source, &config, &types).await;
    let mut per_key: BTreeMap<Vec<u8>, (HashSet<i64>, i64)> = BTreeMap::new();
    for m in &messages {
        let version: i64 = header(m, headers::VERSION).unwrap().parse().unwrap();
        let (seen, last) = per_key
            .entry(m.key().unwrap().to_vec())
            .or_insert((HashSet::new(), i64::MIN));
        if seen.insert(version) {
            assert!(
                version > *last,
                "key {:?}: version {version} first seen after {last}",
                m.key()
            );
            *last = version;
        }
    }

    // SIGTERM: the standby-turned-leader drains and exits 0.
    sigterm(&standby);
    let status = wait_exit(&mut standby, Duration::from_secs(30));
    assert!(status.success(), "relay exit status on SIGTERM: {status}");
}

/// In WAL mode both relay processes, the leader and the standby, sample the slot over their
/// own SQL session and expose its gauges on `/metrics` and `/status` (the alert rules read
/// them from whichever process runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_relays_expose_the_slot_lag_on_metrics_leader_and_standby() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let prepared = Mode::Wal.prepare(&source, &source_url).await;
    let text = with_source(
        &pipeline_toml(&servers, &source_url, &source_url, &unique("t"), ""),
        &prepared.source_lines(),
    );
    let slot = &prepared.slot.as_ref().unwrap().name;
    let series = "dualsync_wal_slot_lag_bytes{";
    let mut relays = Vec::new();
    for name in ["a", "b"] {
        let port = free_port();
        let text = text.replace("relay_port = 0", &format!("relay_port = {port}"));
        let path = write_config(&text);
        let child = spawn(
            &["relay", "--config", path.to_str().unwrap()],
            &format!("relay-wal-slot-{name}.log"),
        );
        relays.push(KillOnDrop(child));
        let base = format!("http://127.0.0.1:{port}");
        eventually(&format!("relay {name} exports the slot's lag"), || async {
            let got = |path: &str| {
                let url = format!("{base}{path}");
                async move { reqwest::get(url).await.ok()?.text().await.ok() }
            };
            let metrics = got("/metrics").await.unwrap_or_default();
            let status = got("/status").await.unwrap_or_default();
            metrics
                .lines()
                .any(|l| l.starts_with(series) && l.contains(&format!("slot=\"{slot}\"")))
                && status.contains("\"wal_slot\"")
        })
        .await;
    }
    for mut relay in relays {
        sigterm(&relay.0);
        let status = wait_exit(&mut relay.0, Duration::from_secs(30));
        assert!(status.success(), "relay exit status on SIGTERM: {status}");
    }
}

/// Kills a test's process if the test fails before stopping it.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_exits_cleanly_on_sigterm_and_a_killed_apply_converges_after_restart() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    // Static membership (`group.instance.id`): the restarted process is handed its partitions
    // back at once, without waiting for the broker to expire the killed member's session.
    // Dynamic membership after kill -9 is `kafka::a_dynamic_member_killed_…`.
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), "")
        .replace("[apply]\n", "[apply]\ninstance_id = \"apply-{sink}-0\"\n");
    assert!(text.contains("instance_id"));
    let path = write_config(&text);
    let path = path.to_str().unwrap();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let relay_log = format!("{}.log", unique("relay-c"));
    let mut relay = spawn(&["relay", "--config", path], &relay_log);
    let mut apply = spawn(
        &["apply", "--config", path, "--sink", "postgres"],
        &format!("{}.log", unique("apply-a")),
    );
    dualsync::demo::generate(&source_url, 4, 40, 1500, 2, 3)
        .await
        .unwrap();
    // Kill apply while it is working through the backlog, then restart it.
    let sink = dualsync::pg::connect(&sink_url).await.unwrap();
    eventually("apply has written something", || async {
        sink.query_one("SELECT to_regclass('replica.orders') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0)
    })
    .await;
    apply.kill().unwrap();
    apply.wait().unwrap();
    let apply_log = format!("{}.log", unique("apply-b"));
    let mut apply = spawn(
        &["apply", "--config", path, "--sink", "postgres"],
        &apply_log,
    );

    // The restarted process must really take over (static membership gives it the same
    // partitions back), not just find the work already done.
    wait_for_log(&apply_log, "partitions assigned");
    let primary = primary_state(&source).await;
    eventually("the restarted apply converges to the primary", || async {
        let rows = sink
            .query(
                "SELECT 'orders', id, doc FROM replica.orders WHERE NOT deleted
                 UNION ALL SELECT 'customers', id, doc FROM replica.customers WHERE NOT deleted",
                &[],
            )
            .await;
        let Ok(rows) = rows else { return false };
        let state: BTreeMap<(String, String), serde_json::Value> = rows
            .into_iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        state == primary
    })
    .await;

    for (child, log) in [(&mut apply, &apply_log), (&mut relay, &relay_log)] {
        sigterm(child);
        let status = wait_exit(child, Duration::from_secs(30));
        let text = std::fs::read_to_string(std::env::temp_dir().join(log)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        assert!(
            status.success(),
            "exit status on SIGTERM: {status}; {log} ends with:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Waits (deadline-bounded) until the log file `name` contains `needle`.
pub fn wait_for_log(name: &str, needle: &str) -> String {
    let path = std::env::temp_dir().join(name);
    let end = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "{name} never logged {needle:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn secrets_never_reach_logs_or_errors_and_json_logs_parse() {
    let servers = servers();
    let secrets = [
        "Pg-S3cret-1",
        "Sink-S3cret-2",
        "Mongo-S3cret-3",
        "Kafka-S3cret-4",
    ];
    // Every server unreachable (port 9: nothing listens), so each process logs connection
    // errors, the place where a URL would leak.
    let text = format!(
        r#"
[pipeline]
name = "{name}"
[source]
kind = "postgres_outbox"
url = "postgres://dualsync:{pg}@127.0.0.1:9/primary"
[kafka]
brokers = "{kafka}"
[kafka.properties]
"sasl.password" = "{kafka_secret}"
[http]
relay_port = 0
apply_port = 0
[sinks.pg]
kind = "postgres"
url = "postgres://writer:{sink}@127.0.0.1:9/replica"
[sinks.mongo]
kind = "mongodb"
url = "mongodb://writer:{mongo}@127.0.0.1:9/?serverSelectionTimeoutMS=300"
database = "replica"
"#,
        name = unique("t"),
        pg = secrets[0],
        sink = secrets[1],
        mongo = secrets[2],
        kafka_secret = secrets[3],
        kafka = servers.kafka,
    );
    let config = write_config(&text.replace(
        "[sinks.mongo]",
        "[apply]\ngroup_id = \"g-{sink}\"\n[sinks.mongo]",
    ));
    let path = config.to_str().unwrap();
    let runs = [
        (vec!["relay", "-c", path], "relay lost its connection"),
        (
            vec!["apply", "-c", path, "--sink", "pg"],
            "sink pg unavailable",
        ),
        (
            vec!["apply", "-c", path, "--sink", "mongo"],
            "sink mongo unavailable",
        ),
    ];
    let mut logs = Vec::new();
    for (i, (args, needle)) in runs.iter().enumerate() {
        let name = format!("{}.log", unique(&format!("secrets{i}")));
        let mut full = vec!["--log-format", "json"];
        full.extend(args.iter().copied());
        let mut child = spawn(&full, &name);
        logs.push(wait_for_log(&name, needle));
        sigterm(&child);
        assert!(wait_exit(&mut child, DEADLINE).success());
    }
    // A configuration error quotes the key, never the value.
    let bad = write_config(&text.replace("postgres://dualsync:", "mysql://dualsync:"));
    let out = Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(["relay", "-c", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("source.url"), "{stderr}");
    logs.push(stderr);

    for log in &logs {
        for secret in secrets {
            assert!(!log.contains(secret), "{secret} leaked:\n{log}");
        }
    }
    for log in &logs[..3] {
        for line in log.lines() {
            let parsed: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(
                parsed["level"].is_string() && parsed["fields"].is_object(),
                "{line}"
            );
        }
    }
}
