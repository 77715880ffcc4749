//! `dualsync` command line: one subcommand per role. Every long-running role gets the same
//! cancellation token, fired by SIGINT or SIGTERM, and drains before exiting.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dualsync::relay::versions::Resequenced;
use tokio_util::sync::CancellationToken;

use dualsync::apply;
use dualsync::codec::SchemaStore;
use dualsync::config::{Config, SinkConfig};
use dualsync::error::{with_causes, Endpoint, Error};
use dualsync::http::Control;
use dualsync::metrics::Metrics;
use dualsync::relay;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::telemetry;
use dualsync::wire::EventCodec;

mod cli;

use cli::args::*;

/// Relay and apply run on one thread: they wait on PostgreSQL, Kafka and the sink nearly all
/// the time, and on a multi-thread runtime every round trip woke another thread (the leader
/// on `main`, each connection's task on a worker). At 1,000 events/s that scheduling was
/// about 40 % of their CPU (perf); on one thread the relay used 39 % and apply 20 % less CPU
/// per event, and drained faster (BENCHMARKS.md, 2026-12-04). Blocking librdkafka
/// calls go through `spawn_blocking` either way. The other commands keep a worker per core.
fn runtime_builder(command: &Command) -> tokio::runtime::Builder {
    match command {
        Command::Relay { .. } | Command::Apply { .. } => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}

fn main() -> ExitCode {
    let args = Cli::parse();
    telemetry::init(args.log_format);
    cli::progress::set_interval(args.progress_interval);
    let runtime = match runtime_builder(&args.command).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.command)) {
        Ok(()) => ExitCode::SUCCESS,
        // Logged once, here, where the process decides to exit: in the chosen log format, so
        // a supervisor's file keeps one parseable line for it.
        Err(e) => {
            match e.downcast_ref::<Error>().and_then(dualsync::error::hint) {
                Some(hint) => tracing::error!(hint, "{}", with_causes(e.as_ref())),
                None => tracing::error!("{}", with_causes(e.as_ref())),
            }
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

/// One token for the whole process, cancelled by SIGINT or SIGTERM. The handlers are installed
/// before this returns, so a signal during start-up is a clean shutdown, not a kill.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .expect("SIGINT handler");
    tokio::spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested; draining");
        t.cancel();
    });
    token
}

/// Connects a sink, retrying transient failures until `cancel` (a sink that is down at
/// start-up is waited for, not a reason to exit).
async fn connect_sink<S, F, Fut>(
    sink: &str,
    cancel: &CancellationToken,
    connect: F,
) -> anyhow::Result<Option<S>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<S, Error>>,
{
    let at = Endpoint::Sink(sink);
    dualsync::retry::retry_transient(at, cancel, connect)
        .await
        .with_context(|| format!("cannot connect to {at} ({})", at.config_key()))
}

/// Starts the process's HTTP endpoint unless disabled; returns the shared metrics and control.
async fn start_http(
    config: &dualsync::config::Config,
    role: &'static str,
    port: u16,
    cancel: &CancellationToken,
) -> anyhow::Result<(Arc<Metrics>, Control)> {
    let metrics = Arc::new(Metrics::new(&config.pipeline.name, role));
    let control = Control::default();
    if config.http.enabled {
        dualsync::http::serve(
            &config.http,
            port,
            role,
            &config.pipeline.name,
            metrics.clone(),
            control.clone(),
            cancel.clone(),
        )
        .await?;
    }
    Ok((metrics, control))
}

/// Everything `apply` needs once the sink is connected.
struct ApplyRun<'a> {
    config: &'a dualsync::config::Config,
    sink_name: &'a str,
    schemas: Arc<SchemaStore>,
    metrics: Arc<Metrics>,
    control: Control,
    cancel: CancellationToken,
}

impl ApplyRun<'_> {
    /// Connects the sink (waiting out transient failures) and runs the consumer group on it.
    async fn run<S, F, Fut>(self, connect: F) -> anyhow::Result<()>
    where
        S: dualsync::sink::Sink,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<S, Error>>,
    {
        let Some(sink) = connect_sink(self.sink_name, &self.cancel, connect).await? else {
            return Ok(());
        };
        apply::run(
            self.config,
            self.sink_name,
            Arc::new(sink),
            self.schemas,
            self.metrics,
            self.control,
            self.cancel,
        )
        .await?;
        Ok(())
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Relay { config: arg, http } => {
            let config = load_config(&arg)?;
            let schemas = load_schemas(&config)?;
            let span = tracing::info_span!("relay", pipeline = %config.pipeline.name);
            let _guard = span.enter();
            let cancel = shutdown_token();
            let port = http.http_port.unwrap_or(config.http.relay_port);
            let (metrics, control) = start_http(&config, "relay", port, &cancel).await?;
            if config.outbox_source().is_ok() {
                dualsync::pg::warm_tls_connector();
            }
            if !dualsync::publish::wait_for_cluster(&config.kafka, &metrics.health, &cancel).await?
            {
                return Ok(());
            }
            relay::run(&config, schemas, metrics, control, cancel).await?;
            tracing::info!("relay stopped");
            Ok(())
        }
        Command::Apply {
            config: arg,
            sink,
            http,
        } => {
            let config = load_config(&arg)?;
            let schemas = load_schemas(&config)?;
            let (sink_name, sink_config) = config.sink(sink.as_deref())?;
            let span =
                tracing::info_span!("apply", pipeline = %config.pipeline.name, sink = %sink_name);
            let _guard = span.enter();
            let cancel = shutdown_token();
            let port = http.http_port.unwrap_or(config.http.apply_port);
            let (metrics, control) = start_http(&config, "apply", port, &cancel).await?;
            if matches!(sink_config, SinkConfig::Postgres(_)) {
                dualsync::pg::warm_tls_connector();
            }
            if !dualsync::publish::wait_for_cluster(&config.kafka, &metrics.health, &cancel).await?
            {
                return Ok(());
            }
            let run = ApplyRun {
                config: &config,
                sink_name: &sink_name,
                schemas,
                metrics,
                control,
                cancel,
            };
            match sink_config.clone() {
                SinkConfig::Postgres(p) => run.run(|| PostgresSink::connect(&p)).await?,
                SinkConfig::Mongodb(m) => run.run(|| MongoSink::connect_as(&m, &sink_name)).await?,
            }
            tracing::info!("apply stopped");
            Ok(())
        }
        Command::Config(ConfigCommand::Check { config: arg, sink }) => {
            let config = load_config(&arg)?;
            if let Some(name) = sink.as_deref() {
                config.sink(Some(name))?;
            }
            println!("{}", cli::config::summary(&config));
            Ok(())
        }
        Command::Outbox(OutboxCommand::Migrate(arg)) => {
            let config = load_config(&arg)?;
            let source = config.outbox_source()?;
            let client = dualsync::pg::connect(source.url.expose()).await?;
            let done =
                dualsync::source::wal::setup::migrate(&client, source, &config.pipeline.name)
                    .await?;
            println!("{}", cli::migrate::summary(&done, source));
            Ok(())
        }
        Command::Outbox(OutboxCommand::Resequence(arg)) => {
            let config = load_config(&arg)?;
            match dualsync::relay::versions::resequence(&config).await? {
                Resequenced::NothingToDo {
                    published_max,
                    next,
                } => println!(
                    "nothing to do: the outbox's next seq {next} is past the highest published version ({})",
                    published_max.map_or("none".to_string(), |v| v.to_string())
                ),
                Resequenced::Done {
                    why,
                    published_max,
                    renumbered,
                } => println!(
                    "{why}\nrenumbered {} unpublished rows to seq {}.. in their order (above the highest published version {published_max}); the next insert gets seq {}",
                    renumbered.rows, renumbered.first, renumbered.next
                ),
            }
            Ok(())
        }
        Command::Schema(SchemaCommand::List(arg)) => {
            let config = load_config(&arg)?;
            cli::schema::list(&config, &*load_schemas(&config)?);
            Ok(())
        }
        Command::Schema(SchemaCommand::Check { config: arg, json }) => {
            let config = load_config(&arg)?;
            if !cli::schema::check(&config, load_schemas(&config)?, json).await? {
                anyhow::bail!("some schemas are incompatible with the registry (see above)");
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
        Command::Verify {
            config: arg,
            sink,
            aggregates,
            repair,
            show,
            json,
            batch_size,
            checkpoint,
        } => {
            let config = load_config(&arg)?;
            let args = cli::reconcile::VerifyArgs {
                sink: sink.as_deref(),
                only: &aggregates,
                repair,
                show,
                json,
                batch: batch_size,
                checkpoint: checkpoint.as_deref(),
            };
            // A MongoDB-source verify stops at its checkpoint on SIGINT/SIGTERM; the
            // PostgreSQL one keeps the default (the signal ends the process at once).
            let cancel = match &config.source {
                Some(dualsync::config::SourceConfig::Mongodb(_)) => shutdown_token(),
                _ => CancellationToken::new(),
            };
            let consistent = cli::reconcile::verify(&config, &args, &cancel).await?;
            if !consistent {
                anyhow::bail!("the sink differs from the primary (see above; --repair fixes it through the pipeline)");
            }
            Ok(())
        }
        Command::Snapshot {
            config: arg,
            tables,
            batch_size,
            restart,
            json,
        } => {
            let config = load_config(&arg)?;
            cli::reconcile::snapshot(&config, &tables, batch_size.max(1), restart, json).await
        }
        Command::Dlq(DlqCommand::List { config: arg, json }) => {
            cli::dlq::list(&load_config(&arg)?, json).await
        }
        Command::Dlq(DlqCommand::Show {
            config: arg,
            topic,
            filter,
            limit,
            json,
        }) => {
            let config = load_config(&arg)?;
            let codec = EventCodec::for_reading(&config, load_schemas(&config)?)?;
            cli::dlq::show(&config, &codec, topic.as_deref(), &filter, limit, json).await
        }
        Command::Dlq(DlqCommand::Replay {
            config: arg,
            topic,
            filter,
            limit,
            dry_run,
            force,
            json,
        }) => {
            let config = load_config(&arg)?;
            let cancel = shutdown_token();
            // Relay dead letters are encoded again, so the schemas must be registered first.
            let Some(codec) =
                EventCodec::for_publishing(&config, load_schemas(&config)?, &cancel).await?
            else {
                return Ok(());
            };
            cli::dlq::replay(
                &config, &codec, &topic, &filter, limit, dry_run, force, json,
            )
            .await
        }
        Command::Demo(DemoCommand::Report { config: arg, wait }) => {
            let config = load_config(&arg)?;
            cli::report::run(&config, wait.map(Duration::from_secs)).await
        }
    }
}
