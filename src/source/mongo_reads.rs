//! Reads of the primary MongoDB for publishing: the cluster time a snapshot or repair starts
//! at, the watched collections, and their documents, always from the primary.

use mongodb::bson::{doc, Document, Timestamp};
use mongodb::options::{ReadPreference, SelectionCriteria};
use mongodb::{Cursor, Database};

use crate::config::MongoSourceConfig;
use crate::error::Error;

/// The source's database, on a client of its own.
pub async fn connect(source_config: &MongoSourceConfig) -> Result<Database, Error> {
    let client = crate::telemetry::mongo_client(source_config.url.expose(), "source.url").await?;
    Ok(client.database(&source_config.database))
}

/// Where the reads of documents to publish go, whatever the URL's `readPreference`: to the
/// primary. The snapshot and repair take the cluster time `T` from the primary and give what
/// they read a version derived from `T`; a lagging secondary's older state read there would
/// be published as the state at `T` (a change before `T` then in neither the snapshot nor the
/// stream, or a repair outranking the real change). The change stream and verify's
/// comparison reads follow the URL.
pub fn on_primary() -> SelectionCriteria {
    SelectionCriteria::ReadPreference(ReadPreference::Primary)
}

/// Every document of `collection` in `_id` order, read from the primary ([`on_primary`]):
/// what a snapshot publishes.
pub async fn read_collection(db: &Database, collection: &str) -> Result<Cursor<Document>, Error> {
    Ok(db
        .collection::<Document>(collection)
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .selection_criteria(on_primary())
        .await?)
}

/// The watched collections of the source's database that exist now, sorted; only those of
/// `only` when it is not empty (each must be one of them). (`listCollections` always goes to
/// the primary.)
pub async fn watched_collections(
    db: &Database,
    source_config: &MongoSourceConfig,
    only: &[String],
) -> Result<Vec<String>, Error> {
    let mut collections: Vec<String> = db
        .list_collection_names()
        .await?
        .into_iter()
        .filter(|c| source_config.watches(c))
        .collect();
    collections.sort();
    if let Some(unknown) = only.iter().find(|c| !collections.contains(c)) {
        return Err(Error::Misconfigured(format!(
            "collection {unknown:?} is not watched by this pipeline, or does not exist in database {:?} (watched: {collections:?})",
            source_config.database
        )));
    }
    if !only.is_empty() {
        collections.retain(|c| only.contains(c));
    }
    Ok(collections)
}

/// The cluster's current operation time (the server's answer to a no-op command, which the
/// driver sends to the primary).
pub async fn cluster_time(db: &Database) -> Result<Timestamp, Error> {
    let reply = db
        .run_command(doc! {"ping": 1})
        .selection_criteria(on_primary())
        .await?;
    reply
        .get_timestamp("operationTime")
        .or_else(|_| {
            reply
                .get_document("$clusterTime")
                .and_then(|c| c.get_timestamp("clusterTime"))
        })
        .map_err(|_| {
            Error::Misconfigured(
                "the MongoDB server reports no cluster time: change streams need a replica set (a single-node one will do)".into(),
            )
        })
}
