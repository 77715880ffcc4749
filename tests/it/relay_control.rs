//! The relay's HTTP control on the real `dualsync relay` process, for both sources: `POST
//! /pause` and `/resume` refused without the bearer token (401) or when no token is configured
//! (403); a paused relay publishes nothing while rows or documents keep arriving, and once
//! resumed publishes all of them, in order. And `/readyz`: 503 naming each reason the code can
//! give (starting, database unreachable, all Kafka brokers unreachable, circuit open, retrying
//! for longer than `http.stuck_after_secs`), 200 when healthy, when paused and as a standby
//! (neither is a fault: an operator's pause must not page, and a standby is ready to lead).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mongodb::bson::{doc, Document};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use dualsync::config::Config;
use dualsync::metrics::names;
use dualsync::publish::headers;

use crate::common::*;
use crate::mongo_common::{leads, mongo_pipeline, GENERIC};
use crate::operations::{http, scrape, sum};
use crate::private_servers::PrivateServer;
use crate::processes::write_config;

const TOKEN: &str = "pause-token-7f3a";

/// A `dualsync relay` process with its HTTP endpoint on a free port; killed when dropped.
struct RelayProcess {
    child: Child,
    addr: SocketAddr,
}

impl RelayProcess {
    /// Starts the relay on `config`, with `token` (if any) in `DUALSYNC_HTTP_TOKEN`, and
    /// returns once its endpoint listens (the address is read from its log).
    async fn start(config: &str, token: Option<&str>) -> Self {
        let log: PathBuf = std::env::temp_dir().join(format!("{}.log", unique("relay")));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dualsync"));
        cmd.args(["relay", "--config", config, "--http-port", "0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("DUALSYNC_HTTP_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(t) = token {
            cmd.env("DUALSYNC_HTTP_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("start dualsync relay");
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let addr = text
                .lines()
                .find(|l| l.contains("http endpoint listening"))
                .and_then(|l| l.split("address=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            if let Some(addr) = addr {
                return Self { child, addr };
            }
            if child.try_wait().unwrap().is_some() || std::time::Instant::now() >= end {
                child.kill().ok();
                panic!("the relay's http endpoint never listened; its log:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        sum(&scrape(self.addr).await, name, &[])
    }

    async fn post(&self, path: &str, token: Option<&str>) -> (u16, String) {
        http(self.addr, "POST", path, token).await
    }

    async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&http(self.addr, "GET", "/status", None).await.1).unwrap()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Messages in `topic` (sum of its partitions' high watermarks).
fn topic_size(brokers: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..3)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map_or(0, |(_, high)| high)
        })
        .sum()
}

/// Per key, the values of `header` in partition order (a key stays in one partition).
fn per_key(messages: &[OwnedMessage], header_name: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in messages {
        let key = header(m, headers::AGGREGATE_ID).unwrap();
        out.entry(key)
            .or_default()
            .push(header(m, header_name).unwrap());
    }
    out
}

/// Pause/resume are refused without the token (401), with a wrong one (401) and on a relay
/// with no token configured (403); then pause succeeds.
async fn pause_checking_auth(relay: &RelayProcess, tokenless: &RelayProcess) {
    assert_eq!(relay.post("/pause", None).await.0, 401);
    assert_eq!(relay.post("/pause", Some("wrong")).await.0, 401);
    assert_eq!(relay.post("/resume", Some("wrong")).await.0, 401);
    assert_eq!(tokenless.post("/pause", Some(TOKEN)).await.0, 403);
    assert_eq!(tokenless.status().await["paused"], false);
    assert_eq!(
        relay.post("/pause", Some(TOKEN)).await,
        (200, r#"{"paused":true}"#.to_string())
    );
    assert_eq!(relay.status().await["paused"], true);
    assert_eq!(relay.metric(names::PAUSED).await, 1.0);
    assert_eq!(
        http(relay.addr, "GET", "/readyz", None).await,
        (200, "ready\n".to_string()),
        "paused is not a fault"
    );
}

async fn insert_outbox_row(client: &tokio_postgres::Client, i: usize) {
    let id = format!("k{}", i % 2);
    let payload =
        serde_json::json!({"id": id, "name": format!("n{i}"), "email": "e", "order_count": i});
    client
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES ('customers', $1, 'CustomerUpserted', $2)",
            &[&id, &payload],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_outbox_relay_publishes_nothing_until_resumed_then_everything_in_order() {
    let servers = servers();
    let url = create_database(&servers).await;
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    let text = pipeline_toml(&servers, &url, &url, &unique("m"), "");
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    let topic = config.kafka.topic_for("customers");
    let path = write_config(&text);
    let path = path.to_str().unwrap();

    let relay = RelayProcess::start(path, Some(TOKEN)).await;
    eventually("the first relay leads", || async {
        relay.metric(names::RELAY_LEADER).await == 1.0
    })
    .await;
    // A standby without a token: ready, and its pause route disabled.
    let standby = RelayProcess::start(path, None).await;
    eventually("the standby is ready", || async {
        http(standby.addr, "GET", "/readyz", None).await == (200, "ready\n".to_string())
    })
    .await;
    assert_eq!(standby.status().await["relay_leader"], false);

    for i in 0..4 {
        insert_outbox_row(&client, i).await;
    }
    eventually("the first rows are published", || async {
        relay.metric(names::EVENTS_PUBLISHED).await == 4.0
    })
    .await;
    pause_checking_auth(&relay, &standby).await;

    // Each row its own transaction, while paused.
    for i in 4..24 {
        insert_outbox_row(&client, i).await;
    }
    eventually("the paused relay sees the 20 waiting rows", || async {
        relay.metric(names::OUTBOX_BACKLOG).await == 20.0
            || relay.metric(names::EVENTS_PUBLISHED).await > 4.0
    })
    .await;
    assert_eq!(
        relay.metric(names::EVENTS_PUBLISHED).await,
        4.0,
        "nothing published while paused"
    );
    assert_eq!(topic_size(&servers.kafka, &topic), 4);
    let (_, unpublished) = dualsync::demo::outbox_counts(&client).await.unwrap();
    assert_eq!(unpublished, 20);

    assert_eq!(
        relay.post("/resume", Some(TOKEN)).await,
        (200, r#"{"paused":false}"#.to_string())
    );
    eventually("every waiting row is published", || async {
        dualsync::demo::outbox_counts(&client).await.unwrap().1 == 0
    })
    .await;
    let messages = read_topic(&servers.kafka, &topic, 24).await;
    assert_eq!(messages.len(), 24, "each row once");
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in client
        .query(
            "SELECT aggregateid, id::text FROM dualsync.outbox ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
    {
        expected.entry(row.get(0)).or_default().push(row.get(1));
    }
    assert_eq!(
        per_key(&messages, headers::EVENT_ID),
        expected,
        "per key, the events in the order their rows were committed"
    );
    assert_eq!(relay.status().await["paused"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_mongo_relay_publishes_nothing_until_resumed_then_everything_in_order() {
    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    // A second pipeline on the same database, never paused: when it has published a change,
    // the paused relay had the same chance to.
    let db = p.source_db.name().to_string();
    let witness = mongo_pipeline(&servers, &servers.mongo, "", None, Some(&db)).await;
    let cancel = CancellationToken::new();
    let (witness_relay, witness_metrics) = spawn_relay(&witness.config, &cancel);
    leads(&witness_metrics).await;
    // A long wait for changes (with MongoDB a read waits up to max_await_ms for one), so the
    // pause may come while a read is under way.
    let path = write_config(
        &p.toml
            .replace("max_await_ms = 200", "max_await_ms = 3000")
            .replace("lease_secs = 3", "lease_secs = 10"),
    );
    let path = path.to_str().unwrap();
    let relay = RelayProcess::start(path, Some(TOKEN)).await;
    eventually("the relay leads", || async {
        relay.metric(names::RELAY_LEADER).await == 1.0
    })
    .await;
    let tokenless = RelayProcess::start(path, None).await;

    let carts = p.source_db.collection::<Document>(GENERIC);
    for k in ["k0", "k1"] {
        carts.insert_one(doc! {"_id": k, "n": -1}).await.unwrap();
    }
    eventually("the first documents are published", || async {
        relay.metric(names::EVENTS_PUBLISHED).await == 2.0
    })
    .await;
    pause_checking_auth(&relay, &tokenless).await;

    for i in 0..10 {
        carts
            .update_one(doc! {"_id": format!("k{}", i % 2)}, doc! {"$set": {"n": i}})
            .await
            .unwrap();
    }
    let witnessed = read_topic(&servers.kafka, &witness.topic(GENERIC), 12).await;
    assert_eq!(witnessed.len(), 12, "the witness publishes every change");
    assert_eq!(relay.metric(names::EVENTS_PUBLISHED).await, 2.0);
    assert_eq!(topic_size(&servers.kafka, &p.topic(GENERIC)), 2);

    assert_eq!(relay.post("/resume", Some(TOKEN)).await.0, 200);
    let messages = read_topic(&servers.kafka, &p.topic(GENERIC), 12).await;
    assert_eq!(messages.len(), 12, "each change once");
    assert_eq!(
        per_key(&messages, headers::VERSION),
        per_key(&witnessed, headers::VERSION),
        "per key, the same changes in the same order as the pipeline never paused"
    );
    for m in &messages {
        assert_eq!(
            header(m, headers::COMMITTED_AT),
            header(m, headers::CREATED_AT),
            "a change's commit time is its wall time"
        );
    }
    for versions in per_key(&messages, headers::VERSION).values() {
        let v: Vec<i64> = versions.iter().map(|v| v.parse().unwrap()).collect();
        assert!(v.windows(2).all(|w| w[0] < w[1]), "{v:?}");
    }
    cancel.cancel();
    witness_relay.await.unwrap().unwrap();
}

/// The `/readyz` body, once the answer satisfies `want` (polled, deadline-bounded).
async fn readyz_until(addr: SocketAddr, what: &str, want: impl Fn(u16, &str) -> bool) -> String {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = http(addr, "GET", "/readyz", None).await;
        if want(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}; last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_circuit_open(body: &str) -> bool {
    body.contains("circuit open") || body.contains("circuit half_open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_names_each_database_reason_and_answers_200_once_healthy() {
    let servers = servers();
    let mut pg = PrivateServer::postgres();
    let admin = dualsync::pg::connect(&pg.url()).await.unwrap();
    admin.batch_execute("CREATE DATABASE src").await.unwrap();
    let url = format!("{}/src", pg.url().rsplit_once('/').unwrap().0);
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    drop((client, admin));
    let text = pipeline_toml(&servers, &url, &url, &unique("m"), "").replacen(
        "[http]\n",
        "[http]\nstuck_after_secs = 1\n",
        1,
    );
    let path = write_config(&text);
    pg.stop();

    let relay = RelayProcess::start(path.to_str().unwrap(), None).await;
    let body = readyz_until(relay.addr, "every start-up reason", |status, body| {
        status == 503
            && body.contains("starting: not connected to its database and broker yet")
            && body.contains("database unreachable")
            && is_circuit_open(body)
            && body.contains("retrying a transient failure for")
    })
    .await;
    assert!(body.starts_with("not ready: "), "{body}");

    pg.start();
    readyz_until(
        relay.addr,
        "ready once the database is up",
        |status, body| status == 200 && body == "ready\n",
    )
    .await;
    assert_eq!(relay.status().await["circuit"], "closed");

    pg.stop();
    readyz_until(relay.addr, "every outage reason", |status, body| {
        status == 503
            && !body.contains("starting")
            && body.contains("database unreachable")
            && is_circuit_open(body)
            && body.contains("retrying a transient failure for")
    })
    .await;
    assert_ne!(relay.status().await["circuit"], "closed");

    pg.start();
    readyz_until(relay.addr, "ready again", |status, body| {
        status == 200 && body == "ready\n"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_says_all_kafka_brokers_unreachable_when_none_answers() {
    let servers = servers();
    let url = create_database(&servers).await;
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = pipeline_toml(&servers, &url, &url, &unique("m"), "")
        .replace(&servers.kafka, &format!("127.0.0.1:{port}"));
    let path = write_config(&text);
    let relay = RelayProcess::start(path.to_str().unwrap(), None).await;
    let body = readyz_until(
        relay.addr,
        "brokers reported unreachable",
        |status, body| status == 503 && body.contains("all Kafka brokers unreachable"),
    )
    .await;
    assert!(!body.contains("database unreachable"), "{body}");
}
