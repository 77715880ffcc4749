//! Where a MongoDB relay keeps its position and its lease: one document per pipeline in
//! `source.offsets_collection` (`{_id: <pipeline>, owner, expires_at, token | start_at |
//! snapshot_from, txn_place}`).
//! Every write of the position is filtered on `owner`, so a relay that lost its lease cannot
//! move it; see [`super::mongo`] for why the position lives in the source database.

use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document, Timestamp};
use mongodb::options::ReturnDocument;
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use crate::config::MongoSourceConfig;
use crate::error::{Error, MONGO_DUPLICATE_KEY};

/// Cluster time and position in its transaction of the change a token was saved after, so a
/// relay resuming in the middle of a transaction numbers the rest of it as before (for servers
/// whose tokens do not carry the position; see [`super::resume_token`]).
pub type TxnPlace = (Timestamp, u64);

/// The saved position of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Position {
    /// Resume after this token.
    After(Document, Option<TxnPlace>),
    /// Start at this cluster time (a snapshot finished, no change published yet).
    At(Timestamp),
    /// A snapshot that started at this cluster time has not finished: the next leader takes
    /// it again with the same start (see [`super::mongo`]).
    Snapshot(Timestamp),
}

/// This relay's wall clock: the system's, shifted by `test_clock_skew_ms` (test-only). The
/// lease never depends on it (see [`try_lease`]); it is only compared with the server's.
pub(super) fn relay_clock(config: &MongoSourceConfig) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() + config.test_clock_skew_ms)
}

/// `expires_at` of a lease taken or renewed now, in the server's time (`$$NOW`, inside an
/// update pipeline).
pub(super) fn server_expiry(config: &MongoSourceConfig) -> Document {
    doc! {"$add": ["$$NOW", config.lease_secs as i64 * 1000]}
}

/// Takes or renews the lease: succeeds when it is free, expired, or already ours.
///
/// Decided by the server's clock alone: the whole decision is one update pipeline evaluated
/// on the server against `$$NOW`, so relays whose clocks disagree (a standby running
/// seconds ahead) still agree on whether a lease ran out. (Dates are compared as
/// milliseconds: SecantusDB compares a date with `$$NOW` wrongly, numbers rightly.)
pub(super) async fn try_lease(
    offsets: &Collection<Document>,
    pipeline: &str,
    owner: &str,
    config: &MongoSourceConfig,
) -> Result<bool, Error> {
    let free = doc! {"$or": [
        {"$eq": ["$owner", owner]},
        {"$eq": [{"$type": "$owner"}, "missing"]},
        {"$lt": [{"$toLong": "$expires_at"}, {"$toLong": "$$NOW"}]},
    ]};
    let update = vec![doc! {"$set": {
        "owner": {"$cond": [free.clone(), {"$literal": owner}, "$owner"]},
        "expires_at": {"$cond": [free.clone(), server_expiry(config), "$expires_at"]},
        "renewed_at": {"$cond": [free, "$$NOW", "$renewed_at"]},
    }}];
    let held = match offsets
        .find_one_and_update(doc! {"_id": pipeline}, update)
        .upsert(true)
        .return_document(ReturnDocument::After)
        .await
    {
        Ok(doc) => doc,
        // Two relays creating the document at once: the other one's insert won.
        Err(e) if is_duplicate_key(&e) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let Some(held) = held.filter(|d| d.get_str("owner") == Ok(owner)) else {
        return Ok(false);
    };
    warn_if_clock_is_off(config, &held);
    Ok(true)
}

/// Logs (at most once a minute) when this host's clock differs from the server's by more than
/// a second: harmless for the lease, worth knowing for the events' wall times.
fn warn_if_clock_is_off(config: &MongoSourceConfig, held: &Document) {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_WARNED: AtomicI64 = AtomicI64::new(i64::MIN);
    let Ok(server) = held.get_datetime("renewed_at") else {
        return;
    };
    let mine = relay_clock(config).timestamp_millis();
    let off = mine - server.timestamp_millis();
    let last = LAST_WARNED.load(Ordering::Relaxed);
    if off.abs() > 1000 && mine.saturating_sub(last) > 60_000 {
        LAST_WARNED.store(mine, Ordering::Relaxed);
        tracing::warn!(
            offset_ms = off,
            "this host's clock differs from the MongoDB server's; the relay lease follows the server's clock"
        );
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == MONGO_DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == MONGO_DUPLICATE_KEY,
        _ => false,
    }
}

/// The pipeline's saved position.
pub async fn read_position(
    offsets: &Collection<Document>,
    pipeline: &str,
) -> Result<Option<Position>, Error> {
    let Some(saved) = offsets.find_one(doc! {"_id": pipeline}).await? else {
        return Ok(None);
    };
    if let Ok(token) = saved.get_document("token") {
        let place = saved.get_document("txn_place").ok().and_then(|p| {
            Some((
                p.get_timestamp("t").ok()?,
                u64::try_from(p.get_i64("i").ok()?).ok()?,
            ))
        });
        return Ok(Some(Position::After(token.clone(), place)));
    }
    if let Ok(at) = saved.get_timestamp("start_at") {
        return Ok(Some(Position::At(at)));
    }
    Ok(saved
        .get_timestamp("snapshot_from")
        .ok()
        .map(Position::Snapshot))
}

/// Renews the lease every third of `lease_secs` until `stop`, confirming `lease` with each
/// renewal; fires `lost` (and returns) when another relay holds it. A renewal that fails for a
/// transient reason is tried again at the next interval: the lease outlives two missed renewals.
pub(super) async fn keep_lease(
    offsets: Collection<Document>,
    pipeline: String,
    owner: String,
    config: MongoSourceConfig,
    lost: CancellationToken,
    lease: std::sync::Arc<super::leader_lease::LeaderLease>,
    stop: CancellationToken,
) {
    let interval = Duration::from_secs(config.lease_secs) / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let sent = std::time::Instant::now();
        match try_lease(&offsets, &pipeline, &owner, &config).await {
            Ok(true) => lease.confirm(sent),
            Ok(false) => {
                tracing::warn!(pipeline, "the relay lease was taken over by another relay");
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(pipeline, error = %e, "cannot renew the relay lease; trying again")
            }
        }
    }
}
