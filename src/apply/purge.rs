//! Apply's tombstone purge: a task of its own on a timer, idle or not, that the poll loop never
//! waits on (delivery-contract.md, "Tombstone purge and the purge horizon").

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sink::Sink;

/// The sink's tombstone purge, every `interval` (idle or not), as its own task: the poll loop
/// never waits for it, and each of its statements is bounded (the sinks delete in chunks).
/// `grace` is the time between raising a horizon and deleting under it ([`purge_grace`]).
/// Failures are logged and tried again at the next interval.
pub(super) async fn purge_tombstones<S: Sink>(
    sink: Arc<S>,
    retention: Duration,
    interval: Duration,
    grace: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            purged = sink.purge_tombstones(retention, grace) => match purged {
                Ok(n) if n > 0 => tracing::info!(purged = n, "purged old tombstones"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "tombstone purge failed; will try again"),
            },
        }
    }
}

/// The purge's grace between raising a horizon and deleting the tombstones it covers: a write
/// that read the horizon before the raise must be over by then. No sink statement outlives
/// `sinks.NAME.timeout_ms` (the server cancels it), so the grace is the purge interval, or that
/// deadline and a second when the interval is shorter.
pub(super) fn purge_grace(config: &Config, sink_name: &str, interval: Duration) -> Duration {
    let deadline = config
        .sinks
        .get(sink_name)
        .map_or(Duration::ZERO, |s| s.timeout());
    interval.max(deadline + Duration::from_secs(1))
}

pub(super) fn tombstone_retention(config: &Config, sink_name: &str) -> Duration {
    let secs = match config.sinks.get(sink_name) {
        Some(crate::config::SinkConfig::Postgres(p)) => p.tombstone_retention_secs,
        Some(crate::config::SinkConfig::Mongodb(m)) => m.tombstone_retention_secs,
        None => u64::MAX / 2,
    };
    Duration::from_secs(secs)
}
