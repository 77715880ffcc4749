//! Shared test plumbing: server addresses, unique names, pipelines run in-process.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use dualsync::apply;
use dualsync::codec::SchemaStore;
use dualsync::config::{Config, SinkConfig};
use dualsync::error::Error;
use dualsync::http::Control;
use dualsync::metrics::Metrics;
use dualsync::reconcile::{self, MismatchKind};
use dualsync::relay;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;

pub const DEADLINE: Duration = Duration::from_secs(90);

pub struct Servers {
    pub pg: String,
    pub kafka: String,
    pub mongo: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with `make test` (it starts the servers and sets it), or `make up && source .local/env`")
    })
}

pub fn servers() -> Servers {
    // Logs are captured per test and shown when it fails.
    dualsync::telemetry::init_for_tests();
    Servers {
        pg: var("DUALSYNC_TEST_PG_URL"),
        kafka: var("DUALSYNC_TEST_KAFKA_BROKERS"),
        mongo: var("DUALSYNC_TEST_MONGO_URL"),
    }
}

/// A port nothing listens on right now, for a private server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        uuid::Uuid::new_v4().simple().to_string().get(..12).unwrap()
    )
}

/// Creates a fresh database and returns its URL.
pub async fn create_database(servers: &Servers) -> String {
    let name = unique("t");
    let admin = dualsync::pg::connect(&servers.pg)
        .await
        .expect("connect to test PostgreSQL");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (base, _) = servers.pg.rsplit_once('/').expect("URL with a database");
    format!("{base}/{name}")
}

pub fn schemas_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .display()
        .to_string()
}

/// A pipeline with unique topics: source `source_url`, a PostgreSQL sink `postgres` and a
/// MongoDB sink `mongo`.
pub fn pipeline(
    servers: &Servers,
    source_url: &str,
    sink_pg_url: &str,
    mongo_db: &str,
    extra: &str,
) -> Config {
    let text = pipeline_toml(servers, source_url, sink_pg_url, mongo_db, extra);
    Config::from_toml(Path::new("test.toml"), &text, Vec::new()).expect("test config is valid")
}

/// The TOML text of [`pipeline`], for running the real binary on it.
pub fn pipeline_toml(
    servers: &Servers,
    source_url: &str,
    sink_pg_url: &str,
    mongo_db: &str,
    extra: &str,
) -> String {
    let prefix = unique("t");
    format!(
        r#"
[pipeline]
name = "{prefix}"
[source]
kind = "postgres_outbox"
url = "{source_url}"
batch_size = 200
poll_interval_ms = 200
{rest}
{extra}
"#,
        rest = pipeline_sections(servers, &prefix, sink_pg_url, mongo_db),
    )
}

/// Every section of a test pipeline after `[source]`: topics named after `prefix`, quick
/// apply retries, HTTP on free ports, a PostgreSQL sink `postgres` and a MongoDB sink `mongo`.
pub fn pipeline_sections(
    servers: &Servers,
    prefix: &str,
    sink_pg_url: &str,
    mongo_db: &str,
) -> String {
    format!(
        r#"[kafka]
brokers = "{kafka}"
topic_template = "{prefix}.{{aggregatetype}}"
partitions = 3
[encoding]
schemas_dir = "{schemas}"
[relay]
dead_letter_topic = "{prefix}.relay.dlq"
[http]
relay_port = 0
apply_port = 0
[apply]
batch_size = 100
linger_ms = 5
retry_initial_ms = 50
retry_max_ms = 1000
[sinks.postgres]
kind = "postgres"
url = "{sink_pg_url}"
schema = "replica"
[sinks.mongo]
kind = "mongodb"
url = "{mongo}"
database = "{mongo_db}""#,
        kafka = servers.kafka,
        schemas = schemas_dir(),
        mongo = servers.mongo,
    )
}

/// A pipeline whose PostgreSQL is never reached (tests of Kafka, apply or the MongoDB sink
/// alone), its MongoDB sink's database `mongo_db`.
pub fn pipeline_without_postgres(servers: &Servers, mongo_db: &str) -> Config {
    pipeline(
        servers,
        "postgres://unused/db",
        "postgres://unused/db",
        mongo_db,
        "",
    )
}

/// The `postgres` sink of a test pipeline, connected.
pub async fn postgres_sink(config: &Config) -> PostgresSink {
    let SinkConfig::Postgres(pg) = &config.sinks["postgres"] else {
        unreachable!("test pipelines have a PostgreSQL sink named postgres")
    };
    PostgresSink::connect(pg).await.unwrap()
}

/// A PostgreSQL sink with document tables in schema `replica` of a fresh database.
pub async fn fresh_postgres_sink(servers: &Servers) -> PostgresSink {
    let url = create_database(servers).await;
    PostgresSink::connect(&dualsync::config::PostgresSinkConfig {
        url: dualsync::config::Secret::new(url),
        schema: "replica".into(),
        tombstone_retention_secs: 60,
        timeout_ms: 30_000,
        tables: Default::default(),
    })
    .await
    .unwrap()
}

/// A MongoDB sink on a fresh database.
pub async fn fresh_mongo_sink(servers: &Servers) -> MongoSink {
    MongoSink::connect(&dualsync::config::MongoSinkConfig {
        url: dualsync::config::Secret::new(servers.mongo.clone()),
        database: unique("t"),
        tombstone_retention_secs: 60,
        timeout_ms: 30_000,
    })
    .await
    .unwrap()
}

pub fn schemas() -> Arc<SchemaStore> {
    Arc::new(SchemaStore::load_dir(Path::new(&schemas_dir())).unwrap())
}

fn test_metrics(config: &Config, role: &str) -> Arc<Metrics> {
    Arc::new(Metrics::new(&config.pipeline.name, role))
}

/// The schemas of `config` (its `encoding.schemas_dir`).
fn config_schemas(config: &Config) -> Arc<SchemaStore> {
    Arc::new(SchemaStore::load_dir(&config.encoding.schemas_dir).unwrap())
}

pub fn spawn_relay(
    config: &Config,
    cancel: &CancellationToken,
) -> (JoinHandle<Result<(), Error>>, Arc<Metrics>) {
    spawn_relay_controlled(config, cancel, Control::default())
}

/// [`spawn_relay`] with a pause/resume control the test holds.
pub fn spawn_relay_controlled(
    config: &Config,
    cancel: &CancellationToken,
    control: Control,
) -> (JoinHandle<Result<(), Error>>, Arc<Metrics>) {
    let metrics = test_metrics(config, "relay");
    let (config, m, c) = (config.clone(), metrics.clone(), cancel.clone());
    (
        tokio::spawn(
            async move { relay::run(&config, config_schemas(&config), m, control, c).await },
        ),
        metrics,
    )
}

pub fn spawn_apply(
    config: &Config,
    sink_name: &str,
    cancel: &CancellationToken,
) -> (JoinHandle<Result<(), Error>>, Arc<Metrics>) {
    spawn_apply_controlled(config, sink_name, cancel, Control::default())
}

/// [`spawn_apply`] with a pause/resume control the test holds.
pub fn spawn_apply_controlled(
    config: &Config,
    sink_name: &str,
    cancel: &CancellationToken,
    control: Control,
) -> (JoinHandle<Result<(), Error>>, Arc<Metrics>) {
    let metrics = test_metrics(config, "apply");
    let (config, m, c, name) = (
        config.clone(),
        metrics.clone(),
        cancel.clone(),
        sink_name.to_string(),
    );
    let handle = tokio::spawn(async move {
        match config.sinks[&name].clone() {
            SinkConfig::Postgres(p) => {
                let sink = Arc::new(PostgresSink::connect(&p).await?);
                apply::run(&config, &name, sink, config_schemas(&config), m, control, c).await
            }
            SinkConfig::Mongodb(m2) => {
                let sink = Arc::new(MongoSink::connect(&m2).await?);
                apply::run(&config, &name, sink, config_schemas(&config), m, control, c).await
            }
        }
    });
    (handle, metrics)
}

/// A pipeline's relay and the applies of some of its sinks, running in this process until
/// [`RunningPipeline::stop`], which expects each of them to end cleanly.
pub struct RunningPipeline {
    pub cancel: CancellationToken,
    /// The relay's metrics (`relay_leader` tells when it leads).
    pub relay: Arc<Metrics>,
    /// Each apply's metrics, in the order of `sinks`.
    pub applies: Vec<Arc<Metrics>>,
    tasks: Vec<JoinHandle<Result<(), Error>>>,
}

/// Starts the relay of `config`, then an apply for each of `sinks`, in that order.
pub fn run_pipeline(config: &Config, sinks: &[&str]) -> RunningPipeline {
    let cancel = CancellationToken::new();
    let (relay, metrics) = spawn_relay(config, &cancel);
    let mut tasks = vec![relay];
    let mut applies = Vec::new();
    for sink in sinks {
        let (task, metrics) = spawn_apply(config, sink, &cancel);
        tasks.push(task);
        applies.push(metrics);
    }
    RunningPipeline {
        cancel,
        relay: metrics,
        applies,
        tasks,
    }
}

impl RunningPipeline {
    /// Cancels every task and waits for each to end without an error.
    pub async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            task.await.unwrap().unwrap();
        }
    }
}

/// A PostgreSQL-outbox pipeline on two fresh databases, the sample shop in the source, with
/// `extra` added to its configuration, and its relay and PostgreSQL apply running.
pub struct ShopPipeline {
    pub config: Config,
    /// The same pipeline as a file, for running the binary on it.
    pub config_file: std::path::PathBuf,
    pub source_url: String,
    pub source: tokio_postgres::Client,
    pub sink: PostgresSink,
    pub running: RunningPipeline,
}

pub async fn shop_pipeline(extra: &str) -> ShopPipeline {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), extra);
    let config = Config::from_toml(Path::new("test.toml"), &text, Vec::new()).unwrap();
    let config_file = std::env::temp_dir().join(format!("{}.toml", unique("pipeline")));
    std::fs::write(&config_file, &text).unwrap();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let running = run_pipeline(&config, &["postgres"]);
    let sink = postgres_sink(&config).await;
    ShopPipeline {
        config,
        config_file,
        source_url,
        source,
        sink,
        running,
    }
}

impl ShopPipeline {
    /// Waits until `verify` finds the sink in step with the primary.
    pub async fn converged(&self) {
        eventually("the sink converges", || async {
            verify_all(&self.source, &self.sink, &self.config)
                .await
                .is_empty()
        })
        .await;
    }

    /// A connection to the sink's database, to change it behind the pipeline's back.
    pub async fn replica(&self) -> tokio_postgres::Client {
        let SinkConfig::Postgres(pg) = &self.config.sinks["postgres"] else {
            unreachable!()
        };
        dualsync::pg::connect(pg.url.expose()).await.unwrap()
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

/// Polls `probe` every 100 ms until it is true; panics with `what` after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        dualsync::demo::wait_until(DEADLINE, probe).await,
        "timed out waiting for: {what}"
    );
}

/// The first column of every row `sql` returns.
pub async fn first_column<T: tokio_postgres::types::FromSqlOwned>(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The primary's current state of the sample shop, keyed by (aggregate type, id), in the same
/// JSON form as the events.
pub async fn primary_state(
    client: &tokio_postgres::Client,
) -> BTreeMap<(String, String), serde_json::Value> {
    let rows = client
        .query(
            "SELECT 'customers', id, jsonb_build_object('id', id, 'name', name, 'email', email, 'order_count', order_count) FROM shop.customers
             UNION ALL
             SELECT 'orders', id, jsonb_build_object('id', id, 'customer_id', customer_id, 'status', status,
                 'total_cents', total_cents, 'lines', lines, 'note', note) FROM shop.orders",
            &[],
        )
        .await
        .unwrap();
    rows.into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// Every key the outbox ever mentioned.
pub async fn outbox_keys(client: &tokio_postgres::Client) -> Vec<(String, String)> {
    client
        .query(
            "SELECT DISTINCT aggregatetype, aggregateid FROM dualsync.outbox ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A `customers` event with `payload` (`None` = delete).
pub fn customer_event(
    id: &str,
    version: i64,
    payload: Option<serde_json::Value>,
) -> dualsync::codec::OutboxEvent {
    dualsync::codec::OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: "CustomerUpserted".into(),
        aggregate_type: "customers".into(),
        aggregate_id: id.into(),
        version,
        created_at_micros: 0,
        payload,
    }
}

/// A `customers` upsert of `id` named `name`.
pub fn named_customer(id: &str, version: i64, name: &str) -> dualsync::codec::OutboxEvent {
    customer_event(
        id,
        version,
        Some(serde_json::json!({"id": id, "name": name, "email": "e", "order_count": 1})),
    )
}

/// Every mismatch `verify` finds, over all `[reconcile.*]` aggregates of `config`.
pub async fn verify_all(
    source: &tokio_postgres::Client,
    sink: &PostgresSink,
    config: &Config,
) -> BTreeMap<(String, String), MismatchKind> {
    let mut out = BTreeMap::new();
    for (aggregate, rc) in &config.reconcile {
        let report = reconcile::verify(source, sink, aggregate, rc, &|_| {})
            .await
            .unwrap();
        for m in report.mismatches {
            out.insert((m.aggregate, m.key), m.kind);
        }
    }
    out
}

mod tools;
mod topics;
pub use tools::*;
pub use topics::*;
