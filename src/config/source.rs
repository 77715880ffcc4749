//! `[source]`: the primary, a PostgreSQL outbox or a MongoDB change stream.

use serde::Deserialize;

use super::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    PostgresOutbox(OutboxSourceConfig),
    Mongodb(MongoSourceConfig),
}

/// A MongoDB change stream over one database (the primary is a replica set: change streams
/// need one, a single-node set will do).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSourceConfig {
    /// `mongodb://` or `mongodb+srv://` URL of the primary.
    pub url: Secret,
    /// The database to watch.
    pub database: String,
    /// Collections to publish; empty means every collection of the database.
    #[serde(default)]
    pub collections: Vec<String>,
    /// Collections never published (when `collections` is empty).
    #[serde(default)]
    pub exclude_collections: Vec<String>,
    /// Where the relay keeps its resume token and leader lease, in the watched database
    /// (never published itself).
    #[serde(default = "super::defaults::offsets_collection")]
    pub offsets_collection: String,
    /// Change events read and published per batch.
    #[serde(default = "super::defaults::relay_batch_size")]
    pub batch_size: usize,
    /// Longest wait for a change before an idle batch is returned (and the lease renewed).
    #[serde(default = "super::defaults::max_await_ms")]
    pub max_await_ms: u64,
    /// Publish the watched collections' documents before streaming when the relay has no
    /// saved position yet.
    #[serde(default)]
    pub snapshot_on_start: bool,
    /// What to do when the saved position is no longer in the oplog.
    #[serde(default = "super::defaults::on_history_lost")]
    pub on_history_lost: OnHistoryLost,
    /// A standby takes over this long after the active relay stopped renewing its lease.
    #[serde(default = "super::defaults::lease_secs")]
    pub lease_secs: u64,
    /// Test-only: shifts this relay's wall clock by this many milliseconds, standing for a
    /// host whose clock is off (the tests of the lease use it). Never set in production.
    #[serde(default)]
    pub test_clock_skew_ms: i64,
}

impl MongoSourceConfig {
    /// Whether changes of `collection` are published.
    pub fn watches(&self, collection: &str) -> bool {
        collection != self.offsets_collection
            && !collection.starts_with("system.")
            && (self.collections.is_empty() || self.collections.iter().any(|c| c == collection))
            && !self.exclude_collections.iter().any(|c| c == collection)
    }
}

/// `[source] on_history_lost`: the resume token fell out of the oplog, or the stream was
/// invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnHistoryLost {
    /// Stop with an error that says what happened and what to do.
    Fail,
    /// Publish a fresh snapshot of the collections and stream on from its start.
    Resnapshot,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSourceConfig {
    /// libpq-style URL of the primary database holding `dualsync.outbox`.
    pub url: Secret,
    /// Rows read and published per batch.
    #[serde(default = "super::defaults::relay_batch_size")]
    pub batch_size: usize,
    /// After a wake-up, and after a read that found fewer rows than a batch, wait this long
    /// for more rows before reading, to fill batches. While rows keep arriving the relay reads
    /// every `linger_ms` and falls back to waiting for a NOTIFY at the first empty read.
    #[serde(default = "super::defaults::relay_linger_ms")]
    pub linger_ms: u64,
    /// Polling fallback when no NOTIFY arrives (missed notifications, notify disabled).
    #[serde(default = "super::defaults::poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Published rows are kept this long (for inspection), then purged; 0 deletes each row as
    /// soon as Kafka acknowledged it (the cheapest way to mark it).
    #[serde(default = "super::defaults::retention_secs")]
    pub retention_secs: u64,
    /// Batches published and not yet acknowledged by Kafka at once: the relay reads and
    /// encodes the next batch while earlier ones wait for their acknowledgements. 1 makes the
    /// loop strictly sequential (read, publish, wait, mark).
    #[serde(default = "super::defaults::max_batches_in_flight")]
    pub max_batches_in_flight: usize,
    /// Aggregate types this pipeline publishes (exact names or `*`/`?` globs such as
    /// `order*`); empty means all. For one outbox shared by several pipelines: rows of other
    /// types are left unpublished for the pipeline that carries them (see
    /// `source::outbox::AggregateFilter`).
    #[serde(default)]
    pub include_aggregates: Vec<String>,
    /// Aggregate types this pipeline never publishes (names or globs), applied after
    /// `include_aggregates`.
    #[serde(default)]
    pub exclude_aggregates: Vec<String>,
    /// The leader's session lease: the server ends a session silent this long (freeing the
    /// leader lock), the leader stops publishing after three quarters of it without an
    /// answer, and a standby takes over about this long after the leader was cut off
    /// (`source::leader_lease`).
    #[serde(default = "super::defaults::outbox_lease_secs")]
    pub lease_secs: u64,
    /// How the relay learns of new outbox events: `poll` reads the table (works on any
    /// PostgreSQL, marks rows) or `wal` streams them from a logical replication slot
    /// (needs `wal_level = logical` and the REPLICATION attribute; no marking writes, no
    /// writers' lock). See docs/outbox.md for how to choose and switch.
    #[serde(default)]
    pub capture: Capture,
    /// `capture = "wal"`: the logical replication slot dualsync creates and streams.
    #[serde(default = "super::defaults::wal_slot_name")]
    pub slot_name: String,
    /// `capture = "wal"`: the publication (INSERTs on `dualsync.outbox`) the slot decodes.
    #[serde(default = "super::defaults::wal_publication")]
    pub publication: String,
}

/// `[source] capture` of the PostgreSQL outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capture {
    /// Read the outbox table (NOTIFY plus a read), mark published rows, purge them later.
    #[default]
    Poll,
    /// Stream the outbox's inserts (and `dualsync.emit` messages) from the WAL with pgoutput.
    Wal,
}
