//! The outbox table's purge: published rows deleted after `retention_secs`, beside the leader
//! ([`super::OutboxCapture::start_upkeep`]).

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::aggregate_filter::AggregateFilter;
use crate::error::Error;

/// How long the purger waits once no published row is past its retention.
pub(super) const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Rows one purge statement deletes: a short transaction that holds few locks.
const PURGE_CHUNK: i64 = 5_000;

/// Deletes published rows (of this pipeline's aggregate types) older than `retention_secs`
/// on a connection of its own, beside the
/// leader: a full chunk is followed at once by the next, so purging keeps pace with any
/// publish rate without delaying the leader's reads and marks; once caught up it waits
/// `interval`. Failures are logged and tried again at the next interval (rows not purged yet
/// only take space). Returns when `cancel` fires.
pub async fn purge_published(
    url: String,
    filter: AggregateFilter,
    retention_secs: u64,
    interval: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut client = None;
    loop {
        if client.as_ref().is_none_or(|c: &Client| c.is_closed()) {
            client = crate::pg::connect(&url).await.ok();
        }
        let mut purged = 0u64;
        if let Some(c) = &client {
            loop {
                let retention = retention_secs as f64;
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&retention, &PURGE_CHUNK];
                params.extend(filter.params());
                let sql = format!(
                    "DELETE FROM dualsync.outbox WHERE seq IN (
                        SELECT seq FROM dualsync.outbox
                        WHERE published_at < now() - make_interval(secs => $1) {}
                        LIMIT $2)",
                    filter.condition(3)
                );
                // Stopped with the leader even mid-statement: behind a half-open link the
                // statement would otherwise hold this task and its connection for good.
                let deleted = tokio::select! {
                    deleted = c.execute(&sql, &params) => deleted,
                    _ = cancel.cancelled() => return,
                };
                match deleted {
                    Ok(n) => {
                        purged += n;
                        if (n as i64) < PURGE_CHUNK || cancel.is_cancelled() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %Error::from(e), "outbox purge failed; trying again later");
                        break;
                    }
                }
            }
        }
        if purged > 0 {
            tracing::info!(purged, retention_secs, "purged published outbox rows");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
