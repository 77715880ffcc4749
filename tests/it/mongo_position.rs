//! The MongoDB relay's saved position (`source.offsets_collection`) against the `Source`
//! contract: it never passes a change Kafka has not acknowledged, even when the relay reads
//! ahead (idle round trips in between), a relay whose lease was taken over cannot move it, and
//! a snapshot taken over midway keeps its start.

use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use dualsync::config::{MongoSourceConfig, SourceConfig};
use dualsync::error::Error;
use dualsync::metrics::Health;
use dualsync::source::mongo::MongoSource;
use dualsync::source::mongo_change::{MongoChange, Operation};
use dualsync::source::mongo_offsets::{read_position, Position};
use dualsync::source::Source;

use crate::common::*;
use crate::mongo_common::{mongo_pipeline, MongoPipeline, GENERIC};

fn source_config(p: &MongoPipeline) -> &MongoSourceConfig {
    match &p.config.source {
        Some(SourceConfig::Mongodb(m)) => m,
        _ => panic!("a MongoDB source"),
    }
}

async fn lead(p: &MongoPipeline, cancel: &CancellationToken) -> MongoSource {
    MongoSource::acquire_leadership(
        source_config(p),
        &p.config.pipeline.name,
        &Health::default(),
        cancel,
    )
    .await
    .unwrap()
    .expect("leads")
}

/// The next non-empty batch (idle round trips of `max_await_ms` in between).
async fn next_changes(relay: &mut MongoSource, cancel: &CancellationToken) -> Vec<MongoChange> {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let batch = relay.next_batch(cancel).await.unwrap();
        if !batch.is_empty() {
            return batch;
        }
        assert!(std::time::Instant::now() < deadline, "no change came");
    }
}

/// A leader that has read one change (`_id: "a"`) and not acknowledged it.
struct OneChangeRead {
    p: MongoPipeline,
    offsets: Collection<Document>,
    cancel: CancellationToken,
    relay: MongoSource,
    read: Vec<MongoChange>,
}

impl OneChangeRead {
    async fn new() -> Self {
        let servers = servers();
        let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
        let offsets = p
            .source_db
            .collection::<Document>(&source_config(&p).offsets_collection);
        let cancel = CancellationToken::new();
        let mut relay = lead(&p, &cancel).await;
        let carts = p.source_db.collection::<Document>(GENERIC);
        carts.insert_one(doc! {"_id": "a"}).await.unwrap();
        let read = next_changes(&mut relay, &cancel).await;
        assert_eq!(read.len(), 1);
        Self {
            p,
            offsets,
            cancel,
            relay,
            read,
        }
    }

    async fn position(&self) -> Option<Position> {
        read_position(&self.offsets, &self.p.config.pipeline.name)
            .await
            .unwrap()
    }
}

/// The relay may read the next batch before the last one is acknowledged (the `Source`
/// contract allows it). A round trip that comes back empty meanwhile must not save the
/// stream's post-batch token: it lies past the unacknowledged changes, and a relay taking
/// over from it would never publish them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_read_saves_no_position_past_an_unacknowledged_change() {
    let mut t = OneChangeRead::new().await;
    // Where idle round trips before the change left it (before the change).
    let before = t.position().await;
    // Other writes to the database (the lease's own) move the post-batch token on.
    for _ in 0..5 {
        assert!(t.relay.next_batch(&t.cancel).await.unwrap().is_empty());
    }
    assert_eq!(
        t.position().await,
        before,
        "the position moved past a change read but not acknowledged"
    );
    // The relay goes away without acknowledging: the next leader reads the change again.
    t.relay.release().await;
    let mut next = lead(&t.p, &t.cancel).await;
    let again = next_changes(&mut next, &t.cancel).await;
    assert_eq!(
        again[0].key(),
        t.read[0].key(),
        "the next leader skipped the change"
    );
    next.ack(&again).await.unwrap();
    let saved = t.position().await;
    assert!(
        matches!(&saved, Some(Position::After(token, _)) if Some(token) == again.last().unwrap().token.as_ref()),
        "acknowledged, the position is the change's token: {saved:?}"
    );
    next.release().await;
}

/// A relay whose lease another relay took over cannot move the position: the save is filtered
/// on the owner in the same update, and fails with `LeaseLost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_lost_its_lease_cannot_move_the_position() {
    let mut t = OneChangeRead::new().await;
    // What a standby does once the lease ran out: take it over and save its own position.
    let at = Timestamp {
        time: 1,
        increment: 1,
    };
    t.offsets
        .update_one(
            doc! {"_id": &t.p.config.pipeline.name},
            doc! {"$set": {"owner": "standby", "token": Bson::Null, "start_at": at}},
        )
        .await
        .unwrap();
    let acked = t.relay.ack(&t.read).await;
    assert!(matches!(acked, Err(Error::LeaseLost(_))), "{acked:?}");
    assert_eq!(
        t.position().await,
        Some(Position::At(at)),
        "the old leader overwrote the new leader's position"
    );
}

/// A snapshot interrupted after publishing part of the documents (its leader lost the lease,
/// or crashed) is taken again by the next leader. A document the first attempt published and
/// that was deleted before the second began must still reach the sinks as a delete, with a
/// version above the one it was published with: the second attempt keeps the first's start,
/// and its stream starts there. Before, the second attempt started afresh after the delete,
/// so neither its reads nor its stream had it, and the sinks kept the document for good
/// (`chaos::mongo` seed 1: a primary restart during the relay's first snapshot, 14 documents
/// deleted on the primary and still in both sinks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_over_midway_still_delivers_the_deletes_made_meanwhile() {
    let servers = servers();
    let mut p = mongo_pipeline(
        &servers,
        &servers.mongo,
        "snapshot_on_start = true",
        None,
        None,
    )
    .await;
    if let Some(SourceConfig::Mongodb(m)) = &mut p.config.source {
        m.batch_size = 1;
    }
    let carts = p.source_db.collection::<Document>(GENERIC);
    carts
        .insert_many([doc! {"_id": "a"}, doc! {"_id": "b"}])
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let mut first = lead(&p, &cancel).await;
    let published = first.next_batch(&cancel).await.unwrap();
    assert_eq!(published.len(), 1, "one document per batch: {published:?}");
    let published = &published[0];
    assert_eq!(published.operation, Operation::Snapshot);
    carts
        .delete_one(doc! {"_id": published.id.clone()})
        .await
        .unwrap();
    // The hand-over, midway through the snapshot.
    first.release().await;

    let mut second = lead(&p, &cancel).await;
    // A marker written after the delete: once the second leader streams it, the delete (if
    // it is coming at all) came before.
    carts.insert_one(doc! {"_id": "marker"}).await.unwrap();
    let marker = Bson::String("marker".into());
    let mut seen: Vec<MongoChange> = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    while !seen
        .iter()
        .any(|c| c.id == marker && c.operation != Operation::Snapshot)
    {
        assert!(std::time::Instant::now() < deadline, "no marker: {seen:?}");
        let batch = second.next_batch(&cancel).await.unwrap();
        second.ack(&batch).await.unwrap();
        seen.extend(batch);
    }
    let delete = seen
        .iter()
        .find(|c| c.id == published.id && c.is_removal())
        .unwrap_or_else(|| {
            panic!(
                "the delete of {} (published by the interrupted snapshot) never came: {:?}",
                published.key(),
                seen.iter()
                    .map(|c| format!("{} {}", c.operation.as_str(), c.key()))
                    .collect::<Vec<_>>()
            )
        });
    assert!(
        delete.version() > published.version(),
        "the delete ({}) must win over the snapshot's document ({})",
        delete.version(),
        published.version()
    );
    second.release().await;
}
