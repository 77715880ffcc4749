//! `dualsync` command line: one subcommand per role. Every long-running role gets the same
//! cancellation token, fired by SIGINT or SIGTERM, and drains before exiting.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backoff::backoff::Backoff;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use dualsync::apply::{self, ApplyStats};
use dualsync::codec::SchemaStore;
use dualsync::config::{Config, SinkConfig};
use dualsync::error::{classify, Disposition, Error};
use dualsync::relay::{self, RelayStats};
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::telemetry::{self, LogFormat};

mod report;

#[derive(Parser)]
#[command(
    name = "dualsync",
    version,
    about = "Outbox → Kafka → secondary store, without dual writes"
)]
struct Cli {
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Pipeline file (TOML), e.g. connectors/demo.toml. DUALSYNC_<SECTION>__<KEY> variables override it.
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Publish outbox rows to Kafka (one active relay per pipeline; others wait as standby).
    Relay(ConfigArg),
    /// Consume the pipeline's topics and apply them to a sink.
    Apply {
        #[command(flatten)]
        config: ConfigArg,
        /// Which [sinks.NAME] to write to (needed when the file has several).
        #[arg(long)]
        sink: Option<String>,
    },
    /// Outbox table management.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Show the schemas in the schemas folder with their fingerprints.
    Schemas(ConfigArg),
    /// The sample shop: create it, put load on it, report what arrived where.
    #[command(subcommand)]
    Demo(DemoCommand),
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Create or upgrade dualsync.outbox in the source database (idempotent).
    Migrate(ConfigArg),
}

#[derive(Subcommand)]
enum DemoCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(&arg.config, std::env::vars())?)
}

fn load_schemas(config: &Config) -> anyhow::Result<Arc<SchemaStore>> {
    Ok(Arc::new(SchemaStore::load_dir(
        &config.encoding.schemas_dir,
    )?))
}

/// One token for the whole process, cancelled by SIGINT or SIGTERM.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; draining");
        t.cancel();
    });
    token
}

/// Connects a sink, retrying transient failures until `cancel` (a sink that is down at
/// start-up is waited for, not a reason to exit).
async fn connect_sink<S, F, Fut>(
    what: &str,
    cancel: &CancellationToken,
    connect: F,
) -> anyhow::Result<Option<S>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<S, Error>>,
{
    let mut policy = backoff::ExponentialBackoff {
        max_elapsed_time: None,
        max_interval: Duration::from_secs(10),
        ..Default::default()
    };
    loop {
        match connect().await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if classify(&e) == Disposition::Retry => {
                let delay = policy.next_backoff().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, retry_in = ?delay, "{what} unavailable; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e).with_context(|| format!("cannot connect to {what}")),
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Relay(arg) => {
            let config = load_config(&arg)?;
            let schemas = load_schemas(&config)?;
            let span = tracing::info_span!("relay", pipeline = %config.pipeline.name);
            let _guard = span.enter();
            let cancel = shutdown_token();
            relay::run(&config, schemas, Arc::new(RelayStats::default()), cancel).await?;
            tracing::info!("relay stopped");
            Ok(())
        }
        Command::Apply { config: arg, sink } => {
            let config = load_config(&arg)?;
            let schemas = load_schemas(&config)?;
            let (sink_name, sink_config) = config.sink(sink.as_deref())?;
            let span =
                tracing::info_span!("apply", pipeline = %config.pipeline.name, sink = %sink_name);
            let _guard = span.enter();
            let cancel = shutdown_token();
            let stats = Arc::new(ApplyStats::default());
            match sink_config.clone() {
                SinkConfig::Postgres(p) => {
                    let Some(s) =
                        connect_sink("postgres sink", &cancel, || PostgresSink::connect(&p))
                            .await?
                    else {
                        return Ok(());
                    };
                    apply::run(&config, &sink_name, Arc::new(s), schemas, stats, cancel).await?;
                }
                SinkConfig::Mongodb(m) => {
                    let Some(s) =
                        connect_sink("mongodb sink", &cancel, || MongoSink::connect(&m)).await?
                    else {
                        return Ok(());
                    };
                    apply::run(&config, &sink_name, Arc::new(s), schemas, stats, cancel).await?;
                }
            }
            tracing::info!("apply stopped");
            Ok(())
        }
        Command::Outbox(OutboxCommand::Migrate(arg)) => {
            let config = load_config(&arg)?;
            let client = dualsync::pg::connect(config.outbox_source()?.url.expose()).await?;
            dualsync::source::outbox::migrate(&client).await?;
            println!("dualsync.outbox is up to date");
            Ok(())
        }
        Command::Schemas(arg) => {
            let config = load_config(&arg)?;
            let schemas = load_schemas(&config)?;
            let mut types: Vec<&str> = schemas.aggregate_types().collect();
            types.sort_unstable();
            for t in types {
                let s = schemas.for_type(t).expect("listed");
                let fp: String = s.fingerprint.iter().map(|b| format!("{b:02x}")).collect();
                println!("{t}\t{fp}\t{}", config.kafka.topic_for(t));
            }
            Ok(())
        }
        Command::Demo(DemoCommand::Setup(arg)) => {
            let config = load_config(&arg)?;
            let client = dualsync::pg::connect(config.outbox_source()?.url.expose()).await?;
            dualsync::demo::setup(&client).await?;
            println!("sample shop and outbox ready");
            Ok(())
        }
        Command::Demo(DemoCommand::Load {
            config: arg,
            customers,
            orders,
            changes,
            writers,
            seed,
            rate,
        }) => {
            let config = load_config(&arg)?;
            let url = config.outbox_source()?.url.expose().to_string();
            let started = std::time::Instant::now();
            let n = dualsync::demo::generate_at_rate(
                &url, customers, orders, changes, writers, seed, rate,
            )
            .await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "committed {n} transactions in {secs:.1}s ({:.0}/s)",
                n as f64 / secs
            );
            Ok(())
        }
        Command::Demo(DemoCommand::Report { config: arg, wait }) => {
            let config = load_config(&arg)?;
            report::run(&config, wait.map(Duration::from_secs)).await
        }
    }
}
