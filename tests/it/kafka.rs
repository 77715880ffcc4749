//! dualsync on Apache Kafka as users run it: dynamic group membership, incremental
//! (cooperative-sticky) rebalancing while a batch is in flight, topics created with the
//! cluster's replication factor, topic-creation refusals that name their cause, and the
//! producer guarantees that no `[kafka.properties]` entry can switch off.

use std::process::Child;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use dualsync::config::Config;
use dualsync::error::{classify, Disposition, Error};
use dualsync::publish::Publisher;

use crate::common::*;
use crate::processes::{spawn, write_config};

const RECONCILE: &str = "[reconcile.customers]\ntable = \"shop.customers\"\n[reconcile.orders]\ntable = \"shop.orders\"\n";

/// Replicas of each partition of `topic`, as the cluster's metadata lists them.
pub fn replicas(brokers: &str, topic: &str) -> Vec<usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.replicas().len())
        .collect()
}

/// On the one-broker development cluster the cluster's default is one replica (three-broker
/// clusters: tests/it/topic_durability.rs).
#[tokio::test]
async fn topics_dualsync_creates_follow_the_clusters_broker_count() {
    let servers = servers();
    let config = pipeline_without_postgres(&servers, "x");
    assert_eq!(config.kafka.replication_factor, None, "unset by default");
    let topic = config.kafka.topic_for("customers");
    Publisher::new(&config.kafka)
        .unwrap()
        .ensure_topic(&topic)
        .await
        .unwrap();
    let brokers = servers.kafka.split(',').count().min(3);
    assert_eq!(replicas(&servers.kafka, &topic), vec![brokers; 3]);
}

#[tokio::test]
async fn topic_creation_the_cluster_refuses_is_fatal_and_names_topic_setting_and_reason() {
    let servers = servers();
    let mut config = pipeline_without_postgres(&servers, "x");
    // More replicas than the local cluster has brokers.
    config.kafka.replication_factor = Some(7);
    let topic = config.kafka.topic_for("customers");
    let err = Publisher::new(&config.kafka)
        .unwrap()
        .ensure_topic(&topic)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TopicCreation { .. }), "{err:?}");
    assert_eq!(classify(&err), Disposition::Fatal);
    let text = err.to_string();
    for part in [
        topic.as_str(),
        "replication factor 7",
        "kafka.replication_factor",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    assert!(
        text.to_lowercase().contains("replication"),
        "the broker's reason: {text}"
    );
}

#[test]
fn producer_guarantees_cannot_be_overridden_and_are_what_the_producer_runs_with() {
    for (key, value) in [
        ("acks", "1"),
        ("enable.idempotence", "false"),
        ("max.in.flight.requests.per.connection", "20"),
        ("message.timeout.ms", "30000"),
    ] {
        let text = offline_toml(&format!("[kafka.properties]\n\"{key}\" = \"{value}\"\n"));
        let err = Config::from_toml(std::path::Path::new("p.toml"), &text, Vec::new())
            .err()
            .unwrap_or_else(|| panic!("{key} = {value} was accepted"));
        assert!(
            err.to_string()
                .contains(&format!("kafka.properties.\"{key}\"")),
            "{err}"
        );
    }
    let text = offline_toml("[kafka.properties]\n\"linger.ms\" = \"7\"\n");
    let config = Config::from_toml(std::path::Path::new("p.toml"), &text, Vec::new()).unwrap();
    let publisher = Publisher::new(&config.kafka).unwrap();
    let effective = publisher.producer_config();
    assert_eq!(effective.get("acks"), Some("all"));
    assert_eq!(effective.get("enable.idempotence"), Some("true"));
    assert_eq!(
        effective.get("max.in.flight.requests.per.connection"),
        Some("5")
    );
    assert_eq!(effective.get("message.timeout.ms"), Some("0"));
    assert_eq!(
        effective.get("linger.ms"),
        Some("7"),
        "other settings are the user's"
    );
}

/// Members of `group` as the group coordinator lists them (member ids).
pub fn group_members(brokers: &str, group: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    match consumer.fetch_group_list(Some(group), Duration::from_secs(10)) {
        Ok(list) => list
            .groups()
            .iter()
            .flat_map(|g| g.members().iter().map(|m| m.id().to_string()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two apply processes without `instance_id` (dynamic membership) share the group; one is
/// killed with -9 mid-stream. The broker expires it after `session.timeout.ms` and the
/// survivor takes its partitions: the sink converges to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dynamic_member_killed_with_sigkill_hands_its_partitions_to_the_survivor() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), RECONCILE);
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    assert!(config.apply.instance_id.is_none());
    let path = write_config(&text);
    let path = path.to_str().unwrap();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let _relay = Killed(spawn(
        &["relay", "-c", path],
        &format!("{}.log", unique("relay")),
    ));
    let mut doomed = Killed(spawn(
        &["apply", "-c", path, "--sink", "postgres"],
        &format!("{}.log", unique("apply-a")),
    ));
    let _survivor = Killed(spawn(
        &["apply", "-c", path, "--sink", "postgres"],
        &format!("{}.log", unique("apply-b")),
    ));
    let group = config.group_id("postgres");
    eventually("both processes are members of the group", || async {
        group_members(&servers.kafka, &group).len() == 2
    })
    .await;
    let url = source_url.clone();
    let writers = tokio::spawn(async move {
        dualsync::demo::generate(&url, 10, 60, 600, 2, 7)
            .await
            .unwrap()
    });
    eventually("some events are applied", || async {
        let sink = dualsync::pg::connect(&sink_url).await.unwrap();
        sink.query_one("SELECT count(*) FROM replica.orders", &[])
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();
    writers.await.unwrap();
    eventually("the dead member is expired", || async {
        group_members(&servers.kafka, &group).len() == 1
    })
    .await;
    let sink = postgres_sink(&config).await;
    eventually("the survivor applied everything", || async {
        verify_all(&source, &sink, &config).await.is_empty()
    })
    .await;
}

/// The shop pipeline (relay and one apply member) whose next batch is held in flight: the
/// first events are applied, then the sink's tables are locked by another session and more
/// events are written, until the member's write waits on the lock. `release` lets the batch
/// finish.
struct HeldBatch {
    shop: ShopPipeline,
    /// Partitions the first member owned alone, before the hold.
    all: i64,
    /// The session holding the sink's tables locked in an open transaction.
    locker: tokio_postgres::Client,
}

impl HeldBatch {
    async fn start() -> Self {
        let shop = shop_pipeline(RECONCILE).await;
        dualsync::demo::generate(&shop.source_url, 10, 60, 100, 1, 3)
            .await
            .unwrap();
        shop.converged().await;
        let all = shop.first().assigned_partitions.get();
        let locker = shop.replica().await;
        locker
            .batch_execute(
                "BEGIN; LOCK TABLE replica.orders, replica.customers IN ACCESS EXCLUSIVE MODE",
            )
            .await
            .unwrap();
        dualsync::demo::generate(&shop.source_url, 10, 60, 300, 2, 4)
            .await
            .unwrap();
        eventually("the first member's batch waits on the lock", || async {
            sink_lock_waiters(&shop.replica().await).await > 0
        })
        .await;
        HeldBatch { shop, all, locker }
    }

    async fn release(&self) {
        self.locker.batch_execute("ROLLBACK").await.unwrap();
    }
}

impl ShopPipeline {
    /// The metrics of the pipeline's (first) apply member.
    fn first(&self) -> &dualsync::metrics::Metrics {
        &self.running.applies[0]
    }
}

/// A batch is held in flight (the sink's table is locked by another session) when a second
/// member joins: the cooperative-sticky rebalance revokes some of the first member's
/// partitions while it still writes them. Nothing is lost or left stale: the first member
/// finishes its write, its revoked offsets are not stored, the new owner replays from the
/// committed offset and the version guard absorbs the repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_revoked_while_a_batch_is_in_flight_lose_nothing() {
    let held = HeldBatch::start().await;
    let shop = &held.shop;
    let (second, second_metrics) = spawn_apply(&shop.config, "postgres", &shop.running.cancel);
    eventually(
        "the second member is given partitions mid-batch",
        || async { second_metrics.assigned_partitions.get() > 0 },
    )
    .await;
    held.release().await;
    shop.converged().await;
    assert!(
        shop.first().assigned_partitions.get() > 0,
        "the first member kept some partitions (sticky)"
    );
    held.shop.stop().await;
    second.await.unwrap().unwrap();
}

/// Partitions taken away while a batch is held in flight (the first member paused its
/// assignment to keep its membership alive) and handed back after the batch finished are
/// consumed again. librdkafka keeps an application pause on a partition across its
/// revocation and re-assignment, so without care they came back paused and were never read
/// again: the sink silently stopped converging (the chaos run of 2026-12-03, seed 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_handed_back_after_a_held_batch_are_consumed_again() {
    let held = HeldBatch::start().await;
    let shop = &held.shop;
    // A second member takes some partitions while the first holds its batch paused.
    let second_cancel = shop.running.cancel.child_token();
    let (second, second_metrics) = spawn_apply(&shop.config, "postgres", &second_cancel);
    eventually(
        "the second member is given partitions mid-batch",
        || async { second_metrics.assigned_partitions.get() > 0 },
    )
    .await;
    held.release().await;
    shop.converged().await;

    // The second member leaves: its partitions go back to the first, which must read them.
    second_cancel.cancel();
    second.await.unwrap().unwrap();
    eventually("the first member owns every partition again", || async {
        shop.first().assigned_partitions.get() == held.all
    })
    .await;
    dualsync::demo::generate(&shop.source_url, 10, 60, 300, 2, 5)
        .await
        .unwrap();
    eventually(
        "events of the handed-back partitions are applied",
        || async {
            verify_all(&shop.source, &shop.sink, &shop.config)
                .await
                .is_empty()
        },
    )
    .await;
    held.shop.stop().await;
}

/// Sessions of the sink's database waiting for a lock.
async fn sink_lock_waiters(sink: &tokio_postgres::Client) -> i64 {
    sink.query_one(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        &[],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
}

/// The local broker's SASL_SSL listener (SCRAM-SHA-512 over TLS, made by `make up`).
struct SaslListener {
    brokers: String,
    user: String,
    password: String,
    ca: String,
}

fn sasl_listener() -> SaslListener {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: `make up` starts the broker's SASL_SSL listener and writes it to .local/env")
        })
    };
    SaslListener {
        brokers: var("DUALSYNC_TEST_KAFKA_SASL_BROKERS"),
        user: var("DUALSYNC_TEST_KAFKA_SASL_USER"),
        password: std::fs::read_to_string(var("DUALSYNC_TEST_KAFKA_SASL_PASSWORD_FILE"))
            .unwrap()
            .trim()
            .to_string(),
        ca: var("DUALSYNC_TEST_KAFKA_CA"),
    }
}

/// The dualsync binary with the SASL password given only through the environment.
fn spawn_with_password(args: &[&str], password: &str, log: &std::path::Path) -> Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(args)
        .env("RUST_LOG", "info,dualsync=debug,librdkafka=debug")
        .env("DUALSYNC_KAFKA__PROPERTIES__SASL_PASSWORD", password)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start dualsync")
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The README's "pointing dualsync at your own servers": SASL_SSL with SCRAM-SHA-512, the
/// CA in `ssl.ca.location`, the password only in `DUALSYNC_KAFKA__PROPERTIES__SASL_PASSWORD`.
/// Events flow end to end; a wrong password ends start-up quickly with the broker's reason
/// instead of retrying for ever; no log line, error or `/status` shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_runs_through_sasl_ssl_with_the_password_from_the_environment_only() {
    let mut servers = servers();
    let sasl = sasl_listener();
    servers.kafka = sasl.brokers.clone();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let properties = format!(
        "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"{}\"\n\"ssl.ca.location\" = \"{}\"\n{RECONCILE}",
        sasl.user, sasl.ca
    );
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), &properties);
    assert!(!text.contains(&sasl.password));
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    let path = write_config(&text);
    let path = path.to_str().unwrap();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let dir = std::env::temp_dir();
    let logs = [
        dir.join(format!("{}.log", unique("sasl-relay"))),
        dir.join(format!("{}.log", unique("sasl-apply"))),
        dir.join(format!("{}.log", unique("sasl-wrong"))),
    ];
    let relay_port = free_port();
    let port_arg = relay_port.to_string();
    let relay = Killed(spawn_with_password(
        &["relay", "-c", path, "--http-port", &port_arg],
        &sasl.password,
        &logs[0],
    ));
    let apply = Killed(spawn_with_password(
        &["apply", "-c", path, "--sink", "postgres"],
        &sasl.password,
        &logs[1],
    ));
    dualsync::demo::generate(&source_url, 5, 20, 100, 1, 9)
        .await
        .unwrap();
    let sink = postgres_sink(&config).await;
    eventually("events flow through the SASL_SSL listener", || async {
        verify_all(&source, &sink, &config).await.is_empty()
    })
    .await;
    let status = http_get(relay_port, "/status").expect("relay /status answers");
    assert!(status.contains("200 OK"), "{status}");

    // A wrong password: start-up ends with the broker's reason, soon, exit status 1.
    let wrong = format!("{}-wrong", sasl.password);
    let mut refused = spawn_with_password(&["relay", "-c", path], &wrong, &logs[2]);
    let started = std::time::Instant::now();
    let status_code = loop {
        if let Some(s) = refused.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a wrong password must end start-up, not be retried for ever"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status_code.success());
    let refused_log = std::fs::read_to_string(&logs[2]).unwrap();
    assert!(
        refused_log.contains("kafka refused the connection")
            && refused_log.contains("kafka.brokers"),
        "{refused_log}"
    );
    drop(relay);
    drop(apply);
    for log in &logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(
            !text.contains(&sasl.password),
            "password in {}",
            log.display()
        );
        assert!(
            !text.contains(&wrong),
            "wrong password in {}",
            log.display()
        );
    }
    assert!(!status.contains(&sasl.password), "password in /status");
}

/// A pipeline's TOML whose servers are all unreachable, for checks that never connect.
fn offline_toml(extra: &str) -> String {
    let servers = Servers {
        pg: String::new(),
        kafka: "127.0.0.1:1".into(),
        mongo: "mongodb://127.0.0.1:1".into(),
    };
    pipeline_toml(&servers, "postgres://h/db", "postgres://h/db", "x", extra)
}
