//! `[sinks.NAME]`: the secondary stores apply writes to.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ColumnTableConfig, Secret};

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Postgres(PostgresSinkConfig),
    Mongodb(MongoSinkConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    pub url: Secret,
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
    pub database: String,
    #[serde(default = "super::defaults::tombstone_retention_secs")]
    pub tombstone_retention_secs: u64,
}
