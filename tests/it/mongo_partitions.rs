//! A MongoDB relay leader cut off from MongoDB without its connection being closed (a
//! Toxiproxy blackhole on the leader's link only; the standby reaches the server directly):
//! the leader steps down before the standby can take the lease, and no write goes missing
//! from the topic across the hand-over. The PostgreSQL counterparts are in `partitions.rs`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use dualsync::config::Config;
use dualsync::publish::headers;

use crate::common::*;
use crate::partitions::{
    check_order, leader_published, standby_connects, stop_relays, KEYS, TAKE_OVER_BOUND,
};
use crate::toxiproxy::{host_port, Toxiproxy};

/// The same cut-off for a MongoDB primary: the leader's link to MongoDB is blackholed, the
/// standby reaches MongoDB directly. The standby must lead once the lease runs out, the old
/// leader must have stepped down before, and per-key order must hold on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongo_leader_cut_off_steps_down_before_the_standby_takes_over() {
    mongo_leader_cut_off(false).await;
}

/// The same hand-over, and every write on the topic. (It was ignored as a known defect: the
/// last write or two were missing in about a third of the runs. They were the writes made
/// just before the test stopped the relays: read, not yet published, so a later start would
/// have published them. The relays now run until the topic holds every write.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongo_leader_cut_off_loses_no_change() {
    mongo_leader_cut_off(true).await;
}

/// Versions of the first `n` changes to `collection` from cluster time `from`, as the
/// server's change stream reports them: what the topic must hold.
async fn stream_versions(
    collection: &mongodb::Collection<mongodb::bson::Document>,
    from: mongodb::bson::Timestamp,
    n: usize,
) -> Vec<i64> {
    use futures::StreamExt;
    let mut stream = collection
        .watch()
        .start_at_operation_time(from)
        .await
        .unwrap();
    let mut versions = Vec::with_capacity(n);
    while versions.len() < n {
        let event = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("the change stream holds every write")
            .expect("the stream goes on")
            .unwrap();
        let at = event.cluster_time.expect("a change has a cluster time");
        versions.push(dualsync::source::mongo_change::version_of(at, 0));
    }
    versions
}

/// The MongoDB cut-off; `complete`: also require every write on the topic.
async fn mongo_leader_cut_off(complete: bool) {
    use crate::mongo_common::{leads, mongo_pipeline, GENERIC};
    use mongodb::bson::{doc, Document};

    let servers = servers();
    let p = mongo_pipeline(&servers, &servers.mongo, "", None, None).await;
    let proxy = Toxiproxy::start().await;
    let upstream = host_port(&servers.mongo);
    let link = proxy.link("leader_mongo", &upstream).await;
    let via_link = servers.mongo.replace(&upstream, &link.listen);
    let leader_config = Config::from_toml(
        Path::new("t.toml"),
        &p.toml.replacen(&servers.mongo, &via_link, 1),
        vec![],
    )
    .unwrap();
    let carts = p.source_db.collection::<Document>(GENERIC);
    let from = dualsync::source::mongo_reads::cluster_time(&p.source_db)
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let (leader_task, leader) = spawn_relay(&leader_config, &cancel);
    leads(&leader).await;
    // Without a saved position the stream starts when the leader opens it: once this write is
    // published, every later one is on the stream.
    carts.insert_one(doc! {"_id": "first"}).await.unwrap();
    eventually("the leader streams", || async {
        leader_published(&leader) >= 1
    })
    .await;
    let stop_writing = CancellationToken::new();
    let writer = {
        let (carts, stop) = (carts.clone(), stop_writing.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut n = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                let id = format!("k{}", n % KEYS as u64);
                carts
                    .update_one(doc! {"_id": &id}, doc! {"$inc": {"n": 1}})
                    .upsert(true)
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    eventually("the leader publishes", || async {
        leader_published(&leader) > 50
    })
    .await;
    let (standby_task, standby) = spawn_relay(&p.config, &cancel);
    standby_connects(&standby).await;

    proxy.blackhole(&link).await;
    let cut = Instant::now();
    let mut leader_stopped = None;
    let took_over = loop {
        let now = Instant::now();
        if leader_stopped.is_none() && leader.relay_leader.get() == 0 {
            leader_stopped = Some(now);
        }
        if standby.relay_leader.get() == 1 {
            break now;
        }
        assert!(
            now - cut < TAKE_OVER_BOUND + Duration::from_secs(15),
            "the standby did not take over within {:?} (leader stopped: {:?})",
            now - cut,
            leader_stopped.map(|t| t - cut)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let take_over = took_over - cut;
    eprintln!(
        "mongo: leader stopped {:?}, standby led {take_over:?} after the cut-off",
        leader_stopped.map(|t| t - cut)
    );
    let leader_stopped =
        leader_stopped.expect("the cut-off leader still led when the standby took over");
    assert!(leader_stopped <= took_over);
    assert!(take_over <= TAKE_OVER_BOUND, "take-over took {take_over:?}");
    let published_at_take_over = leader_published(&standby);
    eventually("the new leader publishes", || async {
        leader_published(&standby) > published_at_take_over + 50
    })
    .await;
    stop_writing.cancel();
    let writes = writer.await.unwrap();
    proxy.heal(&link).await;
    let distinct = |got: &[OwnedMessage]| -> usize {
        got.iter()
            .map(|m| (m.key().map(<[u8]>::to_vec), header(m, headers::VERSION)))
            .collect::<BTreeSet<_>>()
            .len()
    };
    let topic = p.topic(GENERIC);
    let messages = if complete {
        // The relays run until every write is there: stopped earlier, the new leader leaves
        // the last writes read but unpublished (for its successor), which is no loss.
        let got = read_topic_until(&servers.kafka, &topic, move |got| {
            distinct(got) as u64 > writes
        })
        .await;
        stop_relays(&cancel, [leader_task, standby_task]).await;
        got
    } else {
        stop_relays(&cancel, [leader_task, standby_task]).await;
        // Until the last event the relays published is there.
        let published = leader_published(&leader) + leader_published(&standby);
        read_topic_until(&servers.kafka, &topic, move |got| {
            distinct(got) as u64 > writes || got.len() as u64 >= published
        })
        .await
    };
    check_order(&messages);
    eprintln!(
        "mongo: {writes} writes, {} messages, {} distinct changes",
        messages.len(),
        distinct(&messages) - 1
    );
    if complete {
        let on_topic: BTreeSet<i64> = messages
            .iter()
            .filter_map(|m| header(m, headers::VERSION)?.parse().ok())
            .collect();
        let written = stream_versions(&carts, from, writes as usize + 1).await;
        let missing: Vec<(usize, &i64)> = written
            .iter()
            .enumerate()
            .filter(|(_, v)| !on_topic.contains(v))
            .collect();
        assert!(
            missing.is_empty(),
            "writes missing from the topic (index of {}, version): {missing:?}",
            writes + 1
        );
        assert_eq!(
            distinct(&messages) as u64,
            writes + 1,
            "every write is on the topic once (duplicates aside)"
        );
    }
}
