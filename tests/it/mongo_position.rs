//! The MongoDB relay's saved position (`source.offsets_collection`) against the `Source`
//! contract: it never passes a change Kafka has not acknowledged, even when the relay reads
//! ahead (idle round trips in between), and a relay whose lease was taken over cannot move it.

use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use dualsync::config::{MongoSourceConfig, SourceConfig};
use dualsync::error::Error;
use dualsync::metrics::Health;
use dualsync::source::mongo::MongoSource;
use dualsync::source::mongo_change::MongoChange;
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
