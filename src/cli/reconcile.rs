//! `dualsync verify` and `dualsync snapshot`: progress on stderr (see [`Progress`]), results on
//! stdout.

use dualsync::config::{Config, ReconcileConfig, SinkConfig, SourceConfig};
use dualsync::reconcile::mongo::{MongoVerify, Watch};
use dualsync::reconcile::{self, MismatchKind, VerifyReport, REPAIR_EVENT_TYPE};
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use tokio_util::sync::CancellationToken;

use crate::cli::progress::Progress;

/// The aggregates to work on: the named ones (each must have a `[reconcile.X]`), or all.
fn aggregates<'a>(
    config: &'a Config,
    only: &[String],
) -> anyhow::Result<Vec<(&'a String, &'a ReconcileConfig)>> {
    if config.reconcile.is_empty() {
        anyhow::bail!(
            "{}: no [reconcile.<aggregatetype>] sections: verify and snapshot need to know which primary table holds each aggregate type",
            config.path.display()
        );
    }
    if only.is_empty() {
        return Ok(config.reconcile.iter().collect());
    }
    only.iter()
        .map(|name| {
            config
                .reconcile
                .get_key_value(name)
                .or_else(|| config.reconcile.iter().find(|(_, r)| r.table == *name))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: no [reconcile.{name}] section (and no section with table = \"{name}\")",
                        config.path.display()
                    )
                })
        })
        .collect()
}

/// What `dualsync verify` was asked for.
pub struct VerifyArgs<'a> {
    pub sink: Option<&'a str>,
    /// Aggregate types (or tables); for a MongoDB source, collections.
    pub only: &'a [String],
    pub repair: bool,
    pub show: usize,
    pub json: bool,
    /// MongoDB source: documents per batch, and the checkpoint file of a resumable run.
    pub batch: usize,
    pub checkpoint: Option<&'a std::path::Path>,
}

/// Runs verify (and the repair) on every selected aggregate; `Ok(false)` when mismatches
/// remain unrepaired. `cancel` (SIGINT/SIGTERM) stops a MongoDB-source run at its checkpoint.
pub async fn verify(
    config: &Config,
    args: &VerifyArgs<'_>,
    cancel: &CancellationToken,
) -> anyhow::Result<bool> {
    let (sink_name, sink_config) = config.sink(args.sink)?;
    match sink_config.clone() {
        SinkConfig::Postgres(p) => {
            let sink = PostgresSink::connect(&p).await?;
            verify_with(config, &sink, &sink_name, args, cancel).await
        }
        SinkConfig::Mongodb(m) => {
            let sink = MongoSink::connect(&m).await?;
            verify_with(config, &sink, &sink_name, args, cancel).await
        }
    }
}

async fn verify_with<S: SinkReader>(
    config: &Config,
    sink: &S,
    sink_name: &str,
    args: &VerifyArgs<'_>,
    cancel: &CancellationToken,
) -> anyhow::Result<bool> {
    if let Some(SourceConfig::Mongodb(source)) = &config.source {
        let run = MongoVerify {
            config,
            source,
            sink,
            sink_name,
            schemas: std::sync::Arc::new(dualsync::codec::SchemaStore::load_dir(
                &config.encoding.schemas_dir,
            )?),
            only: args.only,
            batch: args.batch.max(1),
            repair: args.repair,
            checkpoint: args.checkpoint,
        };
        let outcome = run.run(&ProgressWatch::default(), cancel).await?;
        if outcome.resumed {
            eprintln!("verify: continued from checkpoint");
        }
        return Ok(print_reports(
            &outcome.reports,
            sink_name,
            outcome.repaired,
            args,
            "repair events published with the primary's current documents",
        ));
    }
    let mut source = dualsync::pg::connect(config.outbox_source()?.url.expose()).await?;
    let mut reports: Vec<VerifyReport> = Vec::new();
    let mut repaired = 0;
    for (aggregate, rc) in aggregates(config, args.only)? {
        let total = reconcile::primary_count(&source, rc).await?;
        // Both sides are read and the sink holds about as many rows as the primary.
        let progress = Progress::new(
            &format!("verify {aggregate} vs {sink_name}"),
            "rows",
            Some(2 * total),
        );
        let report = reconcile::verify(&source, sink, aggregate, rc, &|n| progress.inc(n)).await?;
        progress.finish();
        if args.repair && !report.mismatches.is_empty() {
            let mut keys: Vec<String> = report.mismatches.iter().map(|m| m.key.clone()).collect();
            keys.sort();
            let progress = Progress::new(
                &format!("repair {aggregate}"),
                "keys",
                Some(keys.len() as u64),
            );
            // Re-emitted in chunks, so the progress moves on big repairs.
            for chunk in keys.chunks(500) {
                repaired += reconcile::emit_current_state(
                    &mut source,
                    aggregate,
                    rc,
                    chunk,
                    REPAIR_EVENT_TYPE,
                )
                .await?;
                progress.inc(chunk.len() as u64);
            }
            progress.finish();
        }
        reports.push(report);
    }
    Ok(print_reports(
        &reports,
        sink_name,
        repaired,
        args,
        "outbox events written with the primary's current state",
    ))
}

/// The reports on stdout (text or JSON); whether nothing is left unrepaired.
fn print_reports(
    reports: &[VerifyReport],
    sink_name: &str,
    repaired: u64,
    args: &VerifyArgs<'_>,
    repair_means: &str,
) -> bool {
    let (repair, show, json) = (args.repair, args.show, args.json);
    let mismatches: usize = reports.iter().map(|r| r.mismatches.len()).sum();
    if json {
        let doc =
            serde_json::json!({ "sink": sink_name, "aggregates": reports, "repaired": repaired });
        println!("{doc:#}");
    } else {
        for r in reports {
            for m in r.mismatches.iter().take(show) {
                println!(
                    "{:<10} {}/{}  sink version {}  newest outbox seq {}",
                    format!("{:?}", m.kind).to_lowercase(),
                    m.aggregate,
                    m.key,
                    m.sink_version.map_or("-".into(), |v| v.to_string()),
                    m.newest_outbox_seq.map_or("-".into(), |v| v.to_string()),
                );
            }
            if r.mismatches.len() > show {
                println!("... and {} more (--show N)", r.mismatches.len() - show);
            }
            let kinds: Vec<String> = [
                MismatchKind::Missing,
                MismatchKind::Stale,
                MismatchKind::Extra,
                MismatchKind::Different,
            ]
            .iter()
            .map(|k| {
                format!(
                    "{} {}",
                    r.by_kind.get(k).copied().unwrap_or(0),
                    format!("{k:?}").to_lowercase()
                )
            })
            .collect();
            println!(
                "{}: primary {} rows, sink {} live + {} tombstones, {} matching; {}",
                r.aggregate,
                r.primary_rows,
                r.sink_live,
                r.sink_tombstones,
                r.matching,
                kinds.join(", ")
            );
        }
        if repair {
            println!("repair: {repaired} {repair_means}; the pipeline applies them (run verify again to confirm)");
        }
    }
    mismatches == 0 || repair
}

/// Progress of a MongoDB-source verify, one [`Progress`] per piece of work.
#[derive(Default)]
struct ProgressWatch(std::sync::Mutex<Option<Progress>>);

impl Watch for ProgressWatch {
    fn begin(&self, what: String, unit: &'static str, total: Option<u64>) {
        *self.0.lock().expect("progress lock") = Some(Progress::new(&what, unit, total));
    }

    fn advance(&self, n: u64) {
        if let Some(p) = self.0.lock().expect("progress lock").as_ref() {
            p.inc(n);
        }
    }

    fn end(&self) {
        if let Some(p) = self.0.lock().expect("progress lock").take() {
            p.finish();
        }
    }
}

pub async fn snapshot(
    config: &Config,
    only: &[String],
    batch: usize,
    restart: bool,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(SourceConfig::Mongodb(source)) = &config.source {
        let schemas = std::sync::Arc::new(dualsync::codec::SchemaStore::load_dir(
            &config.encoding.schemas_dir,
        )?);
        let cancel = tokio_util::sync::CancellationToken::new();
        let db = dualsync::source::mongo_reads::connect(source).await?;
        let reports =
            dualsync::relay::mongo::snapshot(&db, config, source, schemas, only, batch, &cancel)
                .await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        } else {
            for r in &reports {
                println!(
                    "{}: {} documents published as snapshot events (version {}), {} dead-lettered",
                    r.collection, r.documents, r.version, r.dead_lettered
                );
            }
        }
        return Ok(());
    }
    let mut source = dualsync::pg::connect(config.outbox_source()?.url.expose()).await?;
    let mut reports = Vec::new();
    for (aggregate, rc) in aggregates(config, only)? {
        let total = reconcile::primary_count(&source, rc).await?;
        let progress = Progress::new(&format!("snapshot {aggregate}"), "rows", Some(total));
        let report = reconcile::snapshot(&mut source, aggregate, rc, batch, restart, &|n| {
            progress.inc(n)
        })
        .await?;
        progress.finish();
        if !json {
            println!(
                "{}: {} rows emitted as {} events{}",
                report.aggregate,
                report.rows_emitted,
                reconcile::SNAPSHOT_EVENT_TYPE,
                if report.resumed {
                    " (resumed an interrupted snapshot)"
                } else {
                    ""
                }
            );
        }
        reports.push(report);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(())
}
