//! The outbox slot as the server sees it: how far behind its confirmed position is, how much
//! WAL it holds on the primary's disk, and whether it was invalidated. A slot pins WAL until
//! its position moves, so a stopped or slow relay fills the primary's disk, and a server with
//! `max_slot_wal_keep_size` set invalidates the slot instead: both must be seen before they
//! hurt ([`sample`] for the relay's periodic check, [`record`] for metrics and `/status`).

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::{Error, WalError, WalSetupError};
use crate::metrics::Metrics;

/// One reading of `pg_replication_slots` for the outbox slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotHealth {
    pub slot: String,
    /// A walsender streams it (the leading relay).
    pub active: bool,
    pub active_pid: Option<i32>,
    /// Where the relay confirmed (everything before was acknowledged by Kafka), as PostgreSQL
    /// prints an LSN.
    pub confirmed_flush_lsn: Option<String>,
    /// The server's insert position minus `confirmed_flush_lsn`: WAL a restarted relay
    /// decodes again. Small while the relay keeps up (it confirms idle positions too).
    pub lag_bytes: Option<i64>,
    /// The insert position minus `restart_lsn`: WAL kept on the primary for this slot.
    pub retained_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13 and later).
    pub wal_status: Option<String>,
    /// WAL that can still be written before the slot is lost (`max_slot_wal_keep_size` set).
    pub safe_wal_size: Option<i64>,
    /// Why it was invalidated (PostgreSQL 17 and later).
    pub invalidation_reason: Option<String>,
    /// Invalidated by a recovery conflict on a standby (PostgreSQL 16 and later).
    pub conflicting: Option<bool>,
}

/// The slot and the insert position in one statement. The view is read as JSON so that
/// columns of later PostgreSQL versions (`conflicting`, `invalidation_reason`) are read where
/// they exist without a query per version.
const SAMPLE: &str = "SELECT to_jsonb(s)::text,
        (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
        (pg_current_wal_lsn() - s.restart_lsn)::int8
    FROM pg_replication_slots s WHERE s.slot_name = $1";

/// The slot's health; `None` when no slot has that name.
pub async fn find(client: &Client, slot: &str) -> Result<Option<SlotHealth>, Error> {
    let Some(row) = client.query_opt(SAMPLE, &[&slot]).await? else {
        return Ok(None);
    };
    let view: serde_json::Value = serde_json::from_str(row.get::<_, &str>(0))
        .map_err(|e| Error::Internal(format!("pg_replication_slots row as JSON: {e}")))?;
    let text = |key: &str| view.get(key).and_then(|v| v.as_str()).map(str::to_string);
    Ok(Some(SlotHealth {
        slot: slot.to_string(),
        active: view.get("active").and_then(|v| v.as_bool()) == Some(true),
        active_pid: view
            .get("active_pid")
            .and_then(|v| v.as_i64())
            .and_then(|p| i32::try_from(p).ok()),
        confirmed_flush_lsn: text("confirmed_flush_lsn"),
        lag_bytes: row.get(1),
        retained_bytes: row.get(2),
        wal_status: text("wal_status"),
        safe_wal_size: view.get("safe_wal_size").and_then(|v| v.as_i64()),
        invalidation_reason: text("invalidation_reason"),
        conflicting: view.get("conflicting").and_then(|v| v.as_bool()),
    }))
}

/// The slot's health now; a missing slot is an error (it was dropped, or never created).
/// The relay runs it periodically and passes the result to [`record`]; a lost slot is
/// reported, not raised here: the caller turns [`SlotHealth::lost_error`] into its stop.
pub async fn sample(client: &Client, slot: &str) -> Result<SlotHealth, Error> {
    find(client, slot).await?.ok_or_else(|| {
        WalSetupError::SlotMissing {
            slot: slot.to_string(),
        }
        .into()
    })
}

/// Samples the slot every `every` and records each sample until `cancel`: the relay's
/// periodic check (a task beside the stream). Returns the fatal [`Error::SlotLost`] as soon as
/// the slot is lost, and a failed sample's error for the caller to retry or stop on.
pub async fn watch(
    client: &Client,
    slot: &str,
    metrics: &Metrics,
    every: std::time::Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = ticks.tick() => {}
        }
        let health = sample(client, slot).await?;
        record(metrics, &health);
        if let Some(lost) = health.lost_error() {
            return Err(lost);
        }
    }
}

/// How often the relay samples its slot: the lag gauges move at this pace, and a lost slot
/// stops the relay within it (the stream itself fails at its next start too).
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The relay's slot check, leader and standby alike (each over its own SQL session, so the
/// gauges exist wherever a relay runs): [`watch`] until `cancel`, reconnecting after a failed
/// sample. Returns only the fatal [`Error::SlotLost`]: a gap must stop the pipeline, not be
/// streamed past. A missing slot is the leader's start-up refusal to report, so it is only
/// logged here.
pub async fn watch_for_relay(
    config: &crate::config::OutboxSourceConfig,
    metrics: &Metrics,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    loop {
        let watched = match crate::pg::connect(config.url.expose()).await {
            Ok(client) => watch(&client, &config.slot_name, metrics, SAMPLE_EVERY, cancel).await,
            Err(e) => Err(e),
        };
        match watched {
            Ok(()) => return Ok(()),
            Err(e @ Error::Wal(WalError::SlotLost { .. })) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, slot = %config.slot_name, "cannot sample the replication slot; trying again")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

impl SlotHealth {
    /// Why the slot can no longer be streamed, if it cannot: PostgreSQL 15 says `wal_status =
    /// 'lost'`, 16 adds `conflicting`, 17 `invalidation_reason`.
    pub fn lost_reason(&self) -> Option<String> {
        if let Some(reason) = &self.invalidation_reason {
            return Some(reason.clone());
        }
        if self.conflicting == Some(true) {
            return Some("a recovery conflict on the standby".to_string());
        }
        (self.wal_status.as_deref() == Some("lost")).then(|| {
            "wal_status = lost: the server removed WAL it still needed, past max_slot_wal_keep_size".to_string()
        })
    }

    /// The fatal error a relay stops with when the slot is lost.
    pub fn lost_error(&self) -> Option<Error> {
        self.lost_reason().map(|reason| {
            Error::Wal(WalError::SlotLost {
                slot: self.slot.clone(),
                reason,
            })
        })
    }
}

/// Sets the slot gauges and `/status`'s `wal_slot` section from a sample; a lost slot also
/// becomes a lasting `/status` warning.
pub fn record(metrics: &Metrics, health: &SlotHealth) {
    let gauges = &metrics.wal_slot;
    let label = [health.slot.as_str()];
    let lost = health.lost_reason();
    // Unknown positions (a slot never streamed has no confirmed position) count as 0 rather
    // than leaving a stale value.
    gauges
        .lag_bytes
        .with_label_values(&label)
        .set(health.lag_bytes.unwrap_or(0));
    gauges
        .retained_bytes
        .with_label_values(&label)
        .set(health.retained_bytes.unwrap_or(0));
    gauges
        .lost
        .with_label_values(&label)
        .set(i64::from(lost.is_some()));
    gauges
        .active
        .with_label_values(&label)
        .set(i64::from(health.active));
    if let Some(reason) = &lost {
        metrics.health.warn(format!(
            "replication slot {} is lost ({reason}): see docs/outbox.md#when-the-slot-is-lost",
            health.slot
        ));
    }
    let mut json = serde_json::to_value(health).expect("plain struct serializes");
    json["lost"] = lost.is_some().into();
    *gauges.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(json);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> SlotHealth {
        SlotHealth {
            slot: "s".into(),
            active: true,
            active_pid: Some(42),
            confirmed_flush_lsn: Some("0/16B3748".into()),
            lag_bytes: Some(120),
            retained_bytes: Some(4096),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            invalidation_reason: None,
            conflicting: None,
        }
    }

    #[test]
    fn lost_is_read_from_whichever_column_the_server_has() {
        assert_eq!(healthy().lost_reason(), None);
        let pg15 = SlotHealth {
            wal_status: Some("lost".into()),
            ..healthy()
        };
        assert!(pg15
            .lost_reason()
            .unwrap()
            .contains("max_slot_wal_keep_size"));
        let pg17 = SlotHealth {
            invalidation_reason: Some("wal_removed".into()),
            ..pg15.clone()
        };
        assert_eq!(pg17.lost_reason().as_deref(), Some("wal_removed"));
        let standby = SlotHealth {
            conflicting: Some(true),
            ..healthy()
        };
        assert!(standby.lost_reason().is_some());
        let err = pg17.lost_error().unwrap();
        assert_eq!(err.class(), "source.slot_lost");
        assert_eq!(
            crate::error::classify(&err),
            crate::error::Disposition::Fatal
        );
        assert!(crate::error::hint(&err)
            .unwrap()
            .contains("verify --repair"));
    }

    #[test]
    fn record_sets_gauges_and_the_status_section() {
        let m = Metrics::new("p", "relay");
        assert!(
            !m.render().contains(crate::metrics::names::WAL_SLOT_LAG),
            "no series before a sample (polling relays have none)"
        );
        record(&m, &healthy());
        let text = m.render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("dualsync_wal_slot_lag_bytes{")
                    && l.contains(r#"slot="s""#)
                    && l.ends_with(" 120")),
            "{text}"
        );
        let last = m.wal_slot.last.lock().unwrap().clone().unwrap();
        assert_eq!(last["retained_bytes"], 4096);
        assert_eq!(last["lost"], false);
        assert!(m.health.warnings().is_empty());
        record(
            &m,
            &SlotHealth {
                wal_status: Some("lost".into()),
                ..healthy()
            },
        );
        assert_eq!(m.wal_slot.lost.with_label_values(&["s"]).get(), 1);
        assert_eq!(m.health.warnings().len(), 1);
    }
}
