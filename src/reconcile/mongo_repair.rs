//! `verify --repair` for a MongoDB primary: the mismatched keys published again, through the
//! relay's encoding, as `repair` events (the tool above the pipeline; the relay knows nothing
//! of verify reports).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::VerifyReport;
use crate::codec::SchemaStore;
use crate::config::{Config, MongoSourceConfig};
use crate::error::Error;
use crate::publish::Publisher;
use crate::relay::mongo::encode_or_dead_letter;
use crate::source::mongo_change::MongoChange;
use crate::wire::EventCodec;

/// `verify --repair` for a MongoDB source: publishes, for every mismatched key of `report`,
/// the primary's current document (or, when it is gone, a delete) as a `repair` event with
/// [`crate::source::mongo_change::repair_version`] of the cluster time taken *before* the
/// documents are read: it wins over every version the sinks hold from earlier changes, and
/// any later change wins over it. Returns how many events were published.
#[allow(clippy::too_many_arguments)]
pub async fn repair(
    config: &Config,
    source_config: &MongoSourceConfig,
    schemas: Arc<SchemaStore>,
    db: &mongodb::Database,
    report: &VerifyReport,
    batch_size: usize,
    begin: &(dyn Fn(String, Option<u64>) + Sync),
    advance: &(dyn Fn(u64) + Sync),
    cancel: &CancellationToken,
) -> Result<u64, Error> {
    use crate::source::mongo_key::{canonical_key, id_of_key};
    use futures::TryStreamExt;
    use mongodb::bson::{doc, Bson, Document};

    let Some(codec) = EventCodec::for_publishing(config, schemas, cancel).await? else {
        return Ok(0);
    };
    let publisher = Publisher::new(&config.kafka)?;
    let collection = &report.aggregate;
    codec.ensure_registered(config, collection).await?;
    let mut keys: Vec<&str> = report.mismatches.iter().map(|m| m.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    begin(format!("repair {collection}"), Some(keys.len() as u64));
    let at = crate::source::mongo_reads::cluster_time(db).await?;
    let mut published = 0;
    for chunk in keys.chunks(batch_size.max(1)) {
        let ids: Vec<Bson> = chunk.iter().map(|k| id_of_key(k)).collect();
        let mut current: HashMap<String, Document> = db
            .collection::<Document>(collection)
            .find(doc! {"_id": {"$in": ids}})
            .selection_criteria(crate::source::mongo_reads::on_primary())
            .await?
            .try_collect::<Vec<Document>>()
            .await?
            .into_iter()
            .map(|d| (d.get("_id").map(canonical_key).unwrap_or_default(), d))
            .collect();
        let mut messages = Vec::with_capacity(chunk.len());
        for key in chunk {
            let document = current.remove(*key);
            let id = match &document {
                Some(d) => d.get("_id").cloned().unwrap_or(Bson::Null),
                None => id_of_key(key),
            };
            let change = MongoChange::repair(&source_config.database, collection, id, document, at);
            messages.push(encode_or_dead_letter(config, &codec, &change)?.unwrap_or_else(|l| l));
        }
        tokio::select! {
            r = publisher.publish_all(messages) => r?,
            _ = cancel.cancelled() => return Err(Error::Interrupted("repair interrupted".into())),
        }
        published += chunk.len() as u64;
        advance(chunk.len() as u64);
    }
    Ok(published)
}
