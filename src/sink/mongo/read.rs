//! Reading the MongoDB sink back (`SinkReader`): what `verify` and the tests read.

use super::*;

impl SinkReader for MongoSink {
    async fn get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<(i64, Option<serde_json::Value>)>, Error> {
        let found = self
            .db
            .collection::<Document>(namespace)
            .find_one(doc! {"_id": key})
            .await?;
        Ok(found.map(stored).map(|(_, version, doc)| (version, doc)))
    }

    async fn get_many(&self, namespace: &str, keys: &[String]) -> Result<Vec<StoredRecord>, Error> {
        let found: Vec<Document> = self
            .db
            .collection::<Document>(namespace)
            .find(doc! {"_id": {"$in": keys}})
            .await?
            .try_collect()
            .await?;
        Ok(found.into_iter().map(stored).collect())
    }

    async fn scan(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        let filter = match after {
            Some(a) => doc! {"_id": {"$gt": a}},
            None => doc! {},
        };
        let cursor = self
            .db
            .collection::<Document>(namespace)
            .find(filter)
            .sort(doc! {"_id": 1})
            .limit(limit as i64)
            .await?;
        let documents: Vec<Document> = cursor.try_collect().await?;
        Ok(documents.into_iter().map(stored).collect())
    }
}

/// A stored document as (key, version, document without `_id` and metadata, or `None` for a
/// tombstone).
pub(super) fn stored(mut d: Document) -> StoredRecord {
    let meta = d
        .remove(META_FIELD)
        .and_then(|m| m.as_document().cloned())
        .unwrap_or_default();
    let version = meta.get_i64("version").unwrap_or(i64::MIN);
    let key = match d.remove("_id") {
        Some(Bson::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    if meta.get_bool("deleted").unwrap_or(false) {
        return (key, version, None);
    }
    (key, version, Some(Bson::Document(d).into_relaxed_extjson()))
}
