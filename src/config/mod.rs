//! Typed pipeline configuration: one TOML file per pipeline (see `connectors/`), overridden by
//! environment variables, validated as a whole before anything connects.
//!
//! Environment overrides: any variable named `DUALSYNC_<PATH>` whose name contains `__` sets the
//! key at `<PATH>`, with `__` separating nesting levels and the path lower-cased:
//! `DUALSYNC_SOURCE__URL`, `DUALSYNC_KAFKA__BROKERS`, `DUALSYNC_SINKS__MONGO__URL`. Under
//! `kafka.properties` a `_` becomes a `.` so librdkafka names can be written as variables:
//! `DUALSYNC_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`. Values that parse as TOML
//! integers, floats or booleans take that type; everything else is a string.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "DUALSYNC_";

/// A configuration problem, naming the file, the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(file: &Path, key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            file: file.display().to_string(),
            key: key.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub source: Option<SourceConfig>,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub encoding: EncodingConfig,
    /// A schema registry; without one, values use Avro single-object encoding.
    #[serde(default)]
    pub schema_registry: Option<SchemaRegistryConfig>,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub apply: ApplyConfig,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    #[serde(default)]
    pub http: HttpConfig,
    /// OTLP trace export; absent (the default): no exporter and no per-event work.
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
    /// Per aggregate type: where the primary keeps its current state (for `verify` and
    /// `snapshot`).
    #[serde(default)]
    pub reconcile: BTreeMap<String, ReconcileConfig>,
    /// Where the file was read from, for error messages.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Names the pipeline in logs, metrics, consumer groups and the relay's HA lock.
    pub name: String,
}

/// Producer settings that carry dualsync's delivery contract (no loss, no reordering of a
/// key, no duplicates from the producer's own retries). A `[kafka.properties]` entry for any
/// of them is refused at start-up, with the reason.
pub const DELIVERY_GUARANTEES: &[(&str, &str)] = &[
    ("enable.idempotence", "is always true: retries must not duplicate or reorder events"),
    ("acks", "is always \"all\": an event is acknowledged only once every in-sync replica has it"),
    ("request.required.acks", "is always \"all\" (alias of acks)"),
    (
        "max.in.flight.requests.per.connection",
        "is fixed at 5, the most the idempotent producer keeps in order",
    ),
    ("max.in.flight", "is fixed at 5 (alias of max.in.flight.requests.per.connection)"),
    (
        "message.timeout.ms",
        "is always 0 (never give up): a message given up would be retried after later ones of its key",
    ),
    ("delivery.timeout.ms", "is always 0 (alias of message.timeout.ms)"),
];

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port]` bootstrap servers.
    pub brokers: String,
    /// Topic per aggregate type; `{aggregatetype}` is replaced (Debezium's outbox router default).
    #[serde(default = "defaults::topic_template")]
    pub topic_template: String,
    /// Partitions of topics the relay creates when they are missing.
    #[serde(default = "defaults::partitions")]
    pub partitions: i32,
    /// Replicas of topics dualsync creates. Unset: the cluster's `default.replication.factor`
    /// (KIP-464), at least 3 on a cluster of three or more brokers (docs/kafka.md#topics).
    #[serde(default)]
    pub replication_factor: Option<i32>,
    /// Passed to librdkafka unchanged (e.g. `security.protocol`, `sasl.*`, `ssl.*`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret_key(k) { "***" } else { v.as_str() },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_template", &self.topic_template)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaConfig {
    pub fn topic_for(&self, aggregate_type: &str) -> String {
        self.topic_template
            .replace("{aggregatetype}", aggregate_type)
    }

    /// Whether `topic` looks like an event topic of this template (`{aggregatetype}` standing
    /// for a name without dots): what apply's default subscription matches.
    pub fn is_event_topic(&self, topic: &str) -> bool {
        let (prefix, suffix) = self
            .topic_template
            .split_once("{aggregatetype}")
            .unwrap_or((&self.topic_template, ""));
        topic.len() > prefix.len() + suffix.len()
            && topic.starts_with(prefix)
            && topic.ends_with(suffix)
            && !topic[prefix.len()..topic.len() - suffix.len()].contains('.')
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingConfig {
    /// Folder of `<aggregatetype>.avsc` files.
    #[serde(default = "defaults::schemas_dir")]
    pub schemas_dir: PathBuf,
}

impl Default for EncodingConfig {
    fn default() -> Self {
        Self {
            schemas_dir: defaults::schemas_dir(),
        }
    }
}

/// A registry speaking the Confluent Schema Registry REST API (Confluent, Redpanda, Karapace).
/// When set, the relay writes the Confluent wire format (`00` + 4-byte schema id) under
/// TopicNameStrategy subjects (`<topic>-value`); apply reads both framings either way.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081`; no credentials in it (see `username`).
    pub url: String,
    /// HTTP basic-auth user (Confluent Cloud: the API key).
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the basic-auth password, so it never sits in the file.
    #[serde(default)]
    pub password_env: Option<String>,
    /// `true`: the relay registers each aggregate's schema at start. `false`: it only looks
    /// them up and refuses to start when one is missing (schemas registered by a deploy step).
    #[serde(default = "defaults::auto_register")]
    pub auto_register: bool,
    #[serde(default = "defaults::registry_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnInvalid {
    /// Send the bad input to the dead-letter topic and go on.
    DeadLetter,
    /// Stop the process with an error, leaving the input where it is.
    Halt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    #[serde(default = "defaults::on_invalid")]
    pub on_invalid: OnInvalid,
    /// Topic for outbox rows that cannot be encoded.
    #[serde(default = "defaults::relay_dlq_topic")]
    pub dead_letter_topic: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            on_invalid: defaults::on_invalid(),
            dead_letter_topic: defaults::relay_dlq_topic(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Consumer group; defaults to `dualsync-<pipeline>-<sink>`. `{sink}` is replaced by the
    /// sink's name, and is required when there are several sinks (each sink needs its own
    /// group, or each would receive only part of the partitions).
    pub group_id: Option<String>,
    /// Static group membership (`group.instance.id`): a stable name per apply process (e.g. a
    /// StatefulSet pod name). A restarted process gets its partitions back at once instead of
    /// after the session timeout; `{sink}` is replaced by the sink's name.
    pub instance_id: Option<String>,
    /// Topics to consume; empty means a regex over the topic template.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Regex subscription (librdkafka form, must start with `^`).
    pub topic_regex: Option<String>,
    #[serde(default = "defaults::apply_batch_size")]
    pub batch_size: usize,
    #[serde(default = "defaults::apply_linger_ms")]
    pub linger_ms: u64,
    #[serde(default = "defaults::on_invalid")]
    pub on_error: OnInvalid,
    /// Dead-letter topic = original topic + this suffix.
    #[serde(default = "defaults::dlq_suffix")]
    pub dead_letter_suffix: String,
    #[serde(default = "defaults::retry_initial_ms")]
    pub retry_initial_ms: u64,
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// How often the sink's tombstone purge runs (its own task, idle or not), and the grace
    /// between raising a purge horizon and deleting the tombstones it covers: longer than any
    /// sink write can take.
    #[serde(default = "defaults::tombstone_purge_interval_secs")]
    pub tombstone_purge_interval_secs: u64,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self {
            group_id: None,
            instance_id: None,
            topics: Vec::new(),
            topic_regex: None,
            batch_size: defaults::apply_batch_size(),
            linger_ms: defaults::apply_linger_ms(),
            on_error: defaults::on_invalid(),
            dead_letter_suffix: defaults::dlq_suffix(),
            retry_initial_ms: defaults::retry_initial_ms(),
            retry_max_ms: defaults::retry_max_ms(),
            tombstone_purge_interval_secs: defaults::tombstone_purge_interval_secs(),
        }
    }
}

/// Where an aggregate type's current state lives in the primary: `SELECT <key>::text,
/// <doc> FROM <table> t`. `doc` must produce the same JSON the application writes as the
/// outbox payload (the default `to_jsonb(t)` fits payloads that are the whole row).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// `schema.table` (or `table`) holding one row per aggregate.
    pub table: String,
    #[serde(default = "defaults::reconcile_key")]
    pub key: String,
    /// SQL expression over the row alias `t` giving the payload JSON.
    #[serde(default = "defaults::reconcile_doc")]
    pub doc: String,
}

/// The operations endpoint of each process (see [`crate::http`]) and the thresholds behind the
/// warnings of its `/status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Interface to bind; keep 127.0.0.1 unless a scraper elsewhere needs it.
    pub host: String,
    /// Ports of the relay and apply processes (0 = any free port, logged at start-up);
    /// `--http-port` overrides them per process.
    pub relay_port: u16,
    pub apply_port: u16,
    /// Environment variable holding the bearer token for `POST /pause` and `/resume`
    /// (unset = those routes are disabled).
    pub token_env: String,
    /// A retry episode longer than this makes `/readyz` fail.
    pub stuck_after_secs: u64,
    /// A sink write unfinished for longer than this (waiting on its call, or retrying it)
    /// makes `/readyz` fail, naming the sink: a watchdog that reacts before the call's own
    /// deadline (`sinks.NAME.timeout_ms`). Likewise a batch waited on that Kafka has not
    /// acknowledged (a partitioned broker leading its partitions), naming the topic.
    pub stuck_write_secs: u64,
    /// A sink write (its retries included) that takes longer than this is slow: the first of
    /// a run of slow writes logs one warning naming the sink, and a line when writes are fast
    /// again (a summary every 30 s between).
    pub slow_write_ms: u64,
    pub warn_consumer_lag: i64,
    pub warn_outbox_backlog: i64,
    pub warn_oldest_unpublished_secs: u64,
    /// Dead-lettered ÷ handled events above which `/status` warns.
    pub warn_failure_rate: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            host: "127.0.0.1".into(),
            relay_port: 9464,
            apply_port: 9465,
            token_env: "DUALSYNC_HTTP_TOKEN".into(),
            stuck_after_secs: 60,
            stuck_write_secs: 10,
            slow_write_ms: 1000,
            warn_consumer_lag: 10_000,
            warn_outbox_backlog: 10_000,
            warn_oldest_unpublished_secs: 60,
            warn_failure_rate: 0.01,
        }
    }
}

/// `[telemetry]`: where the relay and apply send their batch spans (OTLP over HTTP/protobuf).
/// See docs/operations.md#traces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector (Jaeger, the OpenTelemetry Collector, Tempo): a base URL such
    /// as `http://127.0.0.1:4318` (`/v1/traces` is appended) or the full traces URL.
    pub otlp_endpoint: String,
    /// `service.name` of the spans is this plus the process's stage: `dualsync-relay`,
    /// `dualsync-apply`.
    #[serde(default = "defaults::service_name")]
    pub service_name: String,
    /// How long one export request may take before it is given up (spans are dropped,
    /// never the pipeline's work).
    #[serde(default = "defaults::export_timeout_ms")]
    pub export_timeout_ms: u64,
}

mod defaults {
    use super::OnInvalid;
    use std::path::PathBuf;
    pub fn service_name() -> String {
        "dualsync".into()
    }
    pub fn export_timeout_ms() -> u64 {
        10_000
    }
    pub fn relay_batch_size() -> usize {
        1000
    }
    pub fn offsets_collection() -> String {
        "dualsync_offsets".into()
    }
    pub fn max_await_ms() -> u64 {
        500
    }
    pub fn on_history_lost() -> super::OnHistoryLost {
        super::OnHistoryLost::Fail
    }
    pub fn lease_secs() -> u64 {
        10
    }
    pub fn outbox_lease_secs() -> u64 {
        20
    }
    pub fn relay_linger_ms() -> u64 {
        2
    }
    pub fn max_batches_in_flight() -> usize {
        4
    }
    pub fn poll_interval_ms() -> u64 {
        1000
    }
    pub fn retention_secs() -> u64 {
        3600
    }
    pub fn wal_slot_name() -> String {
        "dualsync_outbox".into()
    }
    pub fn wal_publication() -> String {
        "dualsync_outbox".into()
    }
    pub fn topic_template() -> String {
        "outbox.event.{aggregatetype}".into()
    }
    pub fn partitions() -> i32 {
        3
    }
    pub fn schemas_dir() -> PathBuf {
        PathBuf::from("schemas")
    }
    pub fn on_invalid() -> OnInvalid {
        OnInvalid::DeadLetter
    }
    pub fn relay_dlq_topic() -> String {
        "dualsync.relay.dlq".into()
    }
    pub fn apply_batch_size() -> usize {
        500
    }
    /// 3, not 10: at 1,000 events/s, 10 ms put commit → applied at p50 15.5 / p99 33.6 ms and
    /// 3 ms at 9.4 / 20.4, for 9 % more apply CPU (BENCHMARKS.md, 2026-12-04).
    pub fn apply_linger_ms() -> u64 {
        3
    }
    pub fn dlq_suffix() -> String {
        ".dlq".into()
    }
    pub fn retry_initial_ms() -> u64 {
        100
    }
    pub fn retry_max_ms() -> u64 {
        10_000
    }
    pub fn pg_schema() -> String {
        "public".into()
    }
    pub fn reconcile_key() -> String {
        "id".into()
    }
    pub fn reconcile_doc() -> String {
        "to_jsonb(t)".into()
    }
    pub fn auto_register() -> bool {
        true
    }
    pub fn registry_timeout_ms() -> u64 {
        10_000
    }
    pub fn sink_timeout_ms() -> u64 {
        30_000
    }
    pub fn tombstone_retention_secs() -> u64 {
        7 * 24 * 3600
    }
    pub fn tombstone_purge_interval_secs() -> u64 {
        600
    }
}

impl Config {
    /// Reads `path`, applies `DUALSYNC_*__*` overrides from `env`, and validates the result.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "(file)", format!("cannot read: {e}")))?;
        Self::from_toml(path, &text, env)
    }

    pub fn from_toml(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::new(path, "(syntax)", e.to_string()))?;
        let file_doc = doc.clone();
        let mut overridden = Vec::new();
        for (name, value) in env {
            let key = overrides::apply_env_override(&mut doc, &name, &value)
                .map_err(|e| ConfigError::new(path, format!("${name}"), e.to_string()))?;
            overridden.extend(key.map(|key| (key, name)));
        }
        default_mongo_topic_template(&mut doc);
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(doc))
            .map_err(|e| overrides::structure_error(path, &e, &file_doc, &overridden))?;
        config.path = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    pub fn outbox_source(&self) -> Result<&OutboxSourceConfig, ConfigError> {
        match &self.source {
            Some(SourceConfig::PostgresOutbox(s)) => Ok(s),
            Some(SourceConfig::Mongodb(_)) => Err(ConfigError::new(
                &self.path,
                "source.kind",
                "is \"mongodb\": this command works on a PostgreSQL outbox (kind = \"postgres_outbox\")",
            )),
            None => Err(ConfigError::new(
                &self.path,
                "source",
                "missing: the relay needs a [source] table",
            )),
        }
    }

    /// The sink to apply into: the named one, or the only one when there is exactly one.
    pub fn sink(&self, name: Option<&str>) -> Result<(String, &SinkConfig), ConfigError> {
        match name {
            Some(n) => self
                .sinks
                .get(n)
                .map(|s| (n.to_string(), s))
                .ok_or_else(|| ConfigError::new(&self.path, format!("sinks.{n}"), "no such sink")),
            None if self.sinks.len() == 1 => {
                let (n, s) = self.sinks.iter().next().expect("one sink");
                Ok((n.clone(), s))
            }
            None => Err(ConfigError::new(
                &self.path,
                "sinks",
                format!(
                    "{} sinks are configured; choose one with --sink ({})",
                    self.sinks.len(),
                    self.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    pub fn group_id(&self, sink_name: &str) -> String {
        match &self.apply.group_id {
            Some(g) => g.replace("{sink}", sink_name),
            None => format!("dualsync-{}-{}", self.pipeline.name, sink_name),
        }
    }
}

/// A MongoDB source's topics default to `mongo.<database>.<collection>` (the MongoDB Kafka
/// connector's naming) instead of the outbox router's `outbox.event.<aggregatetype>`; a
/// `{database}` in an explicit template is the watched database.
fn default_mongo_topic_template(doc: &mut toml::Table) {
    let Some(source) = doc.get("source").and_then(toml::Value::as_table) else {
        return;
    };
    if source.get("kind").and_then(toml::Value::as_str) != Some("mongodb") {
        return;
    }
    let Some(database) = source.get("database").and_then(toml::Value::as_str) else {
        return;
    };
    let database = database.to_string();
    let Some(kafka) = doc.get_mut("kafka").and_then(toml::Value::as_table_mut) else {
        return;
    };
    let template = kafka
        .get("topic_template")
        .and_then(toml::Value::as_str)
        .unwrap_or("mongo.{database}.{aggregatetype}")
        .replace("{database}", &database);
    kafka.insert("topic_template".into(), toml::Value::String(template));
}

mod columns;
mod otlp;
mod overrides;
mod secret;
mod sinks;
mod source;
mod validate;

pub use columns::{ColumnConfig, ColumnTableConfig, ColumnType, RESERVED_COLUMNS};
pub use otlp::{traces_url, EndpointUrlError};
pub use secret::{is_secret_key, redact_url, Secret};
pub use sinks::{MongoSinkConfig, PostgresSinkConfig, SinkConfig};
pub use source::{Capture, MongoSourceConfig, OnHistoryLost, OutboxSourceConfig, SourceConfig};

#[cfg(test)]
mod tests;
