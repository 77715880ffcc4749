//! The command line's shape: every subcommand and its arguments (clap). `main.rs` runs them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dualsync::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "dualsync",
    version,
    about = "Outbox → Kafka → secondary store, without dual writes"
)]
pub(crate) struct Cli {
    /// Log lines on stderr: `text` (colours only on a terminal) or `json`, one object a line.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub(crate) log_format: LogFormat,
    /// snapshot, verify and dlq replay: how often to print a progress line when stderr is
    /// not a terminal (on a terminal they show a bar).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub(crate) progress_interval: Duration,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(clap::Args, Clone)]
pub(crate) struct ConfigArg {
    /// Pipeline file (TOML), e.g. connectors/demo.toml. DUALSYNC_<SECTION>__<KEY> variables override it.
    #[arg(long, short)]
    pub(crate) config: PathBuf,
}

#[derive(clap::Args, Clone)]
pub(crate) struct HttpArg {
    /// Port of the /healthz /readyz /metrics /status endpoint (default: http.relay_port or
    /// http.apply_port; 0 = any free port).
    #[arg(long)]
    pub(crate) http_port: Option<u16>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Publish outbox rows (or MongoDB changes) to Kafka (one active relay per pipeline;
    /// others wait as standby).
    Relay {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        http: HttpArg,
    },
    /// Consume the pipeline's topics and apply them to a sink.
    Apply {
        #[command(flatten)]
        config: ConfigArg,
        /// Which [sinks.NAME] to write to (needed when the file has several).
        #[arg(long)]
        sink: Option<String>,
        #[command(flatten)]
        http: HttpArg,
    },
    /// Outbox table management.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// The pipeline file itself.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The Avro schemas in the schemas folder, and their state in the schema registry.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// The sample shop: create it, put load on it, report what arrived where.
    #[command(subcommand)]
    Demo(DemoCommand),
    /// Dead-letter topics: list them, show their messages, replay them after a fix.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Compare the primary with a sink, key by key; exits 1 when they differ. With --repair,
    /// re-emit the primary's current state of every mismatched key through the pipeline.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        sink: Option<String>,
        /// Aggregate types (or their tables) to check; default all [reconcile.*] sections.
        /// With a MongoDB source: collections (default every watched one).
        #[arg(long = "aggregate", alias = "collection")]
        aggregates: Vec<String>,
        #[arg(long)]
        repair: bool,
        /// Mismatches to print per aggregate type.
        #[arg(long, default_value_t = 50)]
        show: usize,
        #[arg(long)]
        json: bool,
        /// MongoDB source: documents read (and sink records asked for) per round trip.
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// MongoDB source: where the run stands, saved after every batch; a run stopped
        /// (SIGINT, SIGTERM, crash) continues from it, a finished run deletes it.
        #[arg(long)]
        checkpoint: Option<std::path::PathBuf>,
    },
    /// Emit the current rows of primary tables as events (backfill), resumable; with a
    /// MongoDB source, the current documents of the watched collections.
    Snapshot {
        #[command(flatten)]
        config: ConfigArg,
        /// Aggregate type or table name (a [reconcile.*] section), or a MongoDB collection;
        /// default all.
        #[arg(long = "table", alias = "collection")]
        tables: Vec<String>,
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// Start from the beginning even if an earlier snapshot was interrupted.
        #[arg(long)]
        restart: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum DlqCommand {
    /// Dead-letter topics with message counts by error class and oldest/newest time.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// Messages with their error headers and payload (decoded where possible).
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// One dead-letter topic (default: all of the pipeline's).
        #[arg(long)]
        topic: Option<String>,
        #[command(flatten)]
        filter: super::dlq::FilterArgs,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their original topic (relay rows: encoded again). Each is
    /// recorded, and a second replay of the same message is refused unless --force.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        /// The dead-letter topic to replay from.
        #[arg(long)]
        topic: String,
        #[command(flatten)]
        filter: super::dlq::FilterArgs,
        #[arg(long, default_value_t = usize::MAX)]
        limit: usize,
        /// Say what would be sent, send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also send messages replayed before or that would fail again.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum SchemaCommand {
    /// Each aggregate type with its fingerprint, topic and registry subject.
    List(ConfigArg),
    /// Ask the registry whether each local schema may be registered under its subject (the
    /// subject's compatibility level decides); exits 1 when any is incompatible. Run it before
    /// deploying a schema change.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Load and validate the file as relay and apply would (DUALSYNC_* overrides applied),
    /// connecting to nothing; print a one-line summary, or exit 1 naming the key at fault.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also check that this [sinks.NAME] exists (what `apply --sink NAME` needs).
        #[arg(long)]
        sink: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum OutboxCommand {
    /// Create or upgrade dualsync.outbox in the source database (idempotent); with
    /// `source.capture = "wal"` also the publication, the replication slot and the writers'
    /// lock-free trigger (docs/outbox.md).
    Migrate(ConfigArg),
    /// After the outbox sequence went backwards (a failover, a re-created outbox): renumber the
    /// unpublished rows, in order, past the highest version the pipeline published, and move
    /// the sequence after them (does nothing when the outbox is already past it).
    Resequence(ConfigArg),
}

#[derive(Subcommand)]
pub(crate) enum DemoCommand {
    /// Create the outbox and the sample tables in the source database.
    Setup(ConfigArg),
    /// Commit sample business changes, each with its outbox rows in the same transaction.
    Load {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value_t = 50)]
        customers: usize,
        #[arg(long, default_value_t = 500)]
        orders: usize,
        #[arg(long, default_value_t = 2000)]
        changes: usize,
        #[arg(long, default_value_t = 4)]
        writers: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Order changes per second in total (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Print counts in the primary, the topics and every sink; with --wait, first wait (up to
    /// that many seconds) until every sink matches the primary.
    Report {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        wait: Option<u64>,
    },
}
