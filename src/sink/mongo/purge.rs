//! The MongoDB sink's tombstone purge ([`Sink::purge_tombstones`](crate::sink::Sink)): two
//! phases per collection (raise the horizon; delete what it covers only a grace later, in
//! chunks), over every collection of the sink database, also those this process never wrote.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};

use super::{stored, MongoSink, HORIZON_COLLECTION, META_FIELD};
use crate::error::{Error, MONGO_DUPLICATE_KEY};
use crate::sink::PURGE_CHUNK;

impl MongoSink {
    /// Adds the sink's collections this process has not written yet (an idle or restarted
    /// member) to the seen ones, so its purge covers them: every collection of the database
    /// holding documents with dualsync's bookkeeping.
    pub(super) async fn discover_collections(&self) -> Result<(), Error> {
        for name in self.db.list_collection_names().await? {
            if name == HORIZON_COLLECTION
                || name.starts_with("system.")
                || self.seen.lock().await.contains(&name)
            {
                continue;
            }
            let ours = self
                .db
                .collection::<Document>(&name)
                .find_one(doc! {META_FIELD: {"$exists": true}})
                .await?
                .is_some();
            if ours {
                self.prepare_collection(&name).await?;
                self.seen.lock().await.insert(name);
            }
        }
        Ok(())
    }

    /// One purge cycle of `collection` (see [`Sink::purge_tombstones`]): settle a raise that
    /// has been in force for `grace`, delete the settled tombstones in chunks, then raise the
    /// horizon over the tombstones now past the retention (unless a raise is still pending).
    pub(super) async fn purge_collection(
        &self,
        c: &str,
        cutoff: DateTime,
        grace: Duration,
    ) -> Result<u64, Error> {
        let horizons = self.db.collection::<Document>(HORIZON_COLLECTION);
        let mut horizon = self.horizon(c).await?;
        if let Some(h) = horizon.as_mut() {
            let now = DateTime::now().timestamp_millis();
            if let Some(since) = h
                .pending_since
                .filter(|s| s.timestamp_millis() + grace.as_millis() as i64 <= now)
            {
                horizons
                    .update_one(
                        doc! {"_id": c, "version": h.version, "pending_since": since},
                        doc! {"$set": {"settled": h.version}, "$unset": {"pending_since": ""}},
                    )
                    .await?;
                h.settled = h.version;
                h.pending_since = None;
            }
        }
        let old_tombstones = doc! {
            format!("{META_FIELD}.deleted"): true,
            format!("{META_FIELD}.updated_at"): {"$lt": cutoff},
        };
        let collection = self.db.collection::<Document>(c);
        let mut purged = 0;
        if let Some(h) = &horizon {
            let mut settled = old_tombstones.clone();
            settled.insert(format!("{META_FIELD}.version"), doc! {"$lte": h.settled});
            loop {
                let ids: Vec<Bson> = collection
                    .find(settled.clone())
                    .projection(doc! {"_id": 1})
                    .limit(PURGE_CHUNK)
                    .await?
                    .try_collect::<Vec<Document>>()
                    .await?
                    .into_iter()
                    .filter_map(|mut d| d.remove("_id"))
                    .collect();
                let n = ids.len();
                if n == 0 {
                    break;
                }
                let mut chunk = settled.clone();
                chunk.insert("_id", doc! {"$in": ids});
                purged += collection.delete_many(chunk).await?.deleted_count;
                if (n as i64) < PURGE_CHUNK {
                    break;
                }
            }
        }
        if horizon.as_ref().is_some_and(|h| h.pending_since.is_some()) {
            return Ok(purged);
        }
        let newest: Option<Document> = collection
            .find_one(old_tombstones)
            .sort(doc! {format!("{META_FIELD}.version"): -1})
            .projection(doc! {format!("{META_FIELD}.version"): 1})
            .await?;
        let Some(newest) = newest else {
            return Ok(purged);
        };
        let (_, version, _) = stored(newest);
        match horizon {
            None => {
                let raised = horizons
                    .insert_one(doc! {"_id": c, "version": version, "settled": -1i64, "pending_since": DateTime::now()})
                    .await;
                match raised {
                    Ok(_) => {}
                    // Another member raised it first.
                    Err(e) if is_duplicate_key(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Some(h) if h.version < version => {
                horizons
                    .update_one(
                        doc! {"_id": c, "version": h.version, "pending_since": null},
                        doc! {"$set": {"version": version, "settled": h.settled, "pending_since": DateTime::now()}},
                    )
                    .await?;
            }
            Some(_) => {}
        }
        Ok(purged)
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == MONGO_DUPLICATE_KEY)
}
