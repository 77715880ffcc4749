//! Where a MongoDB relay keeps its position and its lease: one document per pipeline in
//! `source.offsets_collection` (`{_id: <pipeline>, owner, expires_at, token | start_at,
//! txn_place}`).
//! Every write of the position is filtered on `owner`, so a relay that lost its lease cannot
//! move it; see [`super::mongo`] for why the position lives in the source database.

use mongodb::bson::{doc, DateTime, Document, Timestamp};
use mongodb::options::ReturnDocument;
use mongodb::Collection;

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
}

/// This relay's wall clock: the system's, shifted by `test_clock_skew_ms` (test-only).
pub(super) fn relay_clock(config: &MongoSourceConfig) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() + config.test_clock_skew_ms)
}

pub(super) fn lease_expiry(config: &MongoSourceConfig) -> DateTime {
    DateTime::from_millis(relay_clock(config).timestamp_millis() + config.lease_secs as i64 * 1000)
}

/// Takes or renews the lease: succeeds when it is free, expired, or already ours.
pub(super) async fn try_lease(
    offsets: &Collection<Document>,
    pipeline: &str,
    owner: &str,
    config: &MongoSourceConfig,
) -> Result<bool, Error> {
    let filter = doc! {"_id": pipeline, "$or": [
        {"owner": owner},
        {"owner": {"$exists": false}},
        {"expires_at": {"$lt": relay_clock(config)}},
    ]};
    let update = doc! {"$set": {"owner": owner, "expires_at": lease_expiry(config)}};
    match offsets
        .find_one_and_update(filter, update)
        .upsert(true)
        .return_document(ReturnDocument::After)
        .await
    {
        Ok(doc) => Ok(doc.is_some()),
        // The document exists and is someone else's live lease: the upsert's insert collides.
        Err(e) if is_duplicate_key(&e) => Ok(false),
        Err(e) => Err(e.into()),
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
    Ok(saved.get_timestamp("start_at").ok().map(Position::At))
}
