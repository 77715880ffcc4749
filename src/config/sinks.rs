//! `[sinks.NAME]`: the secondary stores apply writes to.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ColumnTableConfig, Secret};

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Postgres(PostgresSinkConfig),
    Mongodb(MongoSinkConfig),
}

impl SinkConfig {
    /// The server-side deadline of a sink call (`sinks.NAME.timeout_ms`).
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(match self {
            SinkConfig::Postgres(p) => p.timeout_ms,
            SinkConfig::Mongodb(m) => m.timeout_ms,
        })
    }

    /// The client-side deadline of a write: the server's plus a grace period, so a server
    /// that answers reports its own timeout, and only one that does not answer at all (a
    /// half-open connection, a host that vanished) is cut off by the client.
    pub fn client_deadline(&self) -> Duration {
        self.timeout() + Duration::from_secs(5)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    pub url: Secret,
    /// Deadline of every sink call: `statement_timeout` on the sink's connections, and the
    /// client-side deadline around each write (see [`SinkConfig::timeout`]).
    #[serde(default = "super::defaults::sink_timeout_ms")]
    pub timeout_ms: u64,
    /// Schema holding one document table per aggregate type (created if missing).
    #[serde(default = "super::defaults::pg_schema")]
    pub schema: String,
    #[serde(default = "super::defaults::tombstone_retention_secs")]
    pub tombstone_retention_secs: u64,
    /// Aggregate types written to typed columns instead of a document table.
    #[serde(default)]
    pub tables: BTreeMap<String, ColumnTableConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSinkConfig {
    pub url: Secret,
    /// Deadline of every sink call: `maxTimeMS` of each command, and the client-side deadline
    /// around each write (see [`SinkConfig::timeout`]).
    #[serde(default = "super::defaults::sink_timeout_ms")]
    pub timeout_ms: u64,
    pub database: String,
    #[serde(default = "super::defaults::tombstone_retention_secs")]
    pub tombstone_retention_secs: u64,
}
