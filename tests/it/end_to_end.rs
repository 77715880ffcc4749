//! The whole path: business rows and outbox events committed together reach both sinks, and a
//! replay of every topic from offset 0 changes nothing.

use dualsync::metrics::{total, total_where};
use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use dualsync::config::SinkConfig;
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use crate::common::*;

type State = BTreeMap<(String, String), Option<(i64, Option<serde_json::Value>)>>;

async fn sink_state<S: SinkReader>(sink: &S, keys: &[(String, String)]) -> State {
    let mut out = BTreeMap::new();
    for (t, id) in keys {
        out.insert((t.clone(), id.clone()), sink.get(t, id).await.unwrap());
    }
    out
}

/// True when the sink holds exactly the primary's live rows (deleted ones as tombstones).
fn matches_primary(state: &State, primary: &BTreeMap<(String, String), serde_json::Value>) -> bool {
    state.iter().all(|(k, v)| {
        let live = v.as_ref().and_then(|(_, doc)| doc.as_ref());
        live == primary.get(k)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outbox_to_both_sinks_and_replay_changes_nothing() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let mongo_db = unique("t");
    let config = pipeline(&servers, &source_url, &sink_url, &mongo_db, "");
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let cancel = CancellationToken::new();
    let (relay, relay_stats) = spawn_relay(&config, &cancel);
    let (apply_pg, _) = spawn_apply(&config, "postgres", &cancel);
    let (apply_mongo, _) = spawn_apply(&config, "mongo", &cancel);

    let transactions = dualsync::demo::generate(&source_url, 5, 24, 300, 3, 7)
        .await
        .unwrap();
    assert!(transactions > 300);

    let SinkConfig::Postgres(pg_config) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let SinkConfig::Mongodb(mongo_config) = &config.sinks["mongo"] else {
        unreachable!()
    };
    let pg_sink = PostgresSink::connect(pg_config).await.unwrap();
    let mongo_sink = MongoSink::connect(mongo_config).await.unwrap();
    let primary = primary_state(&source).await;
    let keys = outbox_keys(&source).await;
    assert!(primary.len() > 10 && keys.len() >= primary.len());

    eventually("the PostgreSQL sink matches the primary", || async {
        matches_primary(&sink_state(&pg_sink, &keys).await, &primary)
    })
    .await;
    eventually("the MongoDB sink matches the primary", || async {
        matches_primary(&sink_state(&mongo_sink, &keys).await, &primary)
    })
    .await;
    let (total_events, _) = dualsync::demo::outbox_counts(&source).await.unwrap();
    assert_eq!(total(&relay_stats.published) as i64, total_events);

    // Replay: a new consumer group reads every topic from offset 0 into the same sinks.
    let pg_before = sink_state(&pg_sink, &keys).await;
    let mongo_before = sink_state(&mongo_sink, &keys).await;
    let mut replay_config = config.clone();
    replay_config.apply.group_id = Some(format!("{}-{{sink}}", unique("replay")));
    let replay_cancel = CancellationToken::new();
    let (replay_pg, pg_stats) = spawn_apply(&replay_config, "postgres", &replay_cancel);
    let (replay_mongo, mongo_stats) = spawn_apply(&replay_config, "mongo", &replay_cancel);
    for stats in [&pg_stats, &mongo_stats] {
        let stats = Arc::clone(stats);
        eventually("the replay consumed every event", || {
            let stats = stats.clone();
            async move { total(&stats.consumed) as i64 >= total_events }
        })
        .await;
    }
    replay_cancel.cancel();
    replay_pg.await.unwrap().unwrap();
    replay_mongo.await.unwrap().unwrap();
    for stats in [&pg_stats, &mongo_stats] {
        let consumed = total(&stats.consumed);
        let applied = total_where(&stats.applied, "outcome", "written");
        let stale = total_where(&stats.applied, "outcome", "stale");
        let dead = total(&stats.dead_lettered);
        assert_eq!(applied, 0, "a replay must not write anything");
        assert_eq!(stale, consumed, "every replayed event is stale");
        assert_eq!(dead, 0);
    }
    assert_eq!(sink_state(&pg_sink, &keys).await, pg_before);
    assert_eq!(sink_state(&mongo_sink, &keys).await, mongo_before);

    cancel.cancel();
    relay.await.unwrap().unwrap();
    apply_pg.await.unwrap().unwrap();
    apply_mongo.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_apply_consumers_share_the_partitions_and_converge() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &source_url, &sink_url, &unique("t"), "");
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    // Create the topics (first events) before the consumers subscribe.
    dualsync::demo::generate(&source_url, 4, 40, 20, 1, 5)
        .await
        .unwrap();
    eventually("first events published", || async {
        dualsync::demo::outbox_counts(&source).await.unwrap().1 == 0
    })
    .await;

    let (first, first_stats) = spawn_apply(&config, "postgres", &cancel);
    let (second, second_stats) = spawn_apply(&config, "postgres", &cancel);
    for stats in [&first_stats, &second_stats] {
        let stats = Arc::clone(stats);
        eventually("both consumers hold partitions", || {
            let stats = stats.clone();
            async move { stats.assigned_partitions.get() > 0 }
        })
        .await;
    }
    dualsync::demo::generate(&source_url, 4, 40, 600, 3, 6)
        .await
        .unwrap();

    let SinkConfig::Postgres(pg_config) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(pg_config).await.unwrap();
    let primary = primary_state(&source).await;
    let keys = outbox_keys(&source).await;
    eventually("the sink matches the primary", || async {
        matches_primary(&sink_state(&sink, &keys).await, &primary)
    })
    .await;
    let (a, b) = (total(&first_stats.consumed), total(&second_stats.consumed));
    assert!(
        a > 0 && b > 0,
        "both consumers did work: {a} and {b} events"
    );
    cancel.cancel();
    for h in [relay, first, second] {
        h.await.unwrap().unwrap();
    }
}

/// An apply started before the relay ever ran creates the topics of the schemas' aggregate
/// types and is assigned all their partitions at once: the group's first assignment does not
/// wait for a topic to appear (which would change the subscription at the next metadata
/// refresh and force a rebalance).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_started_before_the_relay_is_assigned_every_schema_topic() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &source_url, &sink_url, &unique("t"), "");
    let types = schemas()
        .aggregate_types()
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(types.len() >= 2, "schemas/ holds customers and orders");
    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);
    let expected = types.len() as i64 * i64::from(config.kafka.partitions);
    eventually(
        "every partition of every schema's topic is assigned",
        || {
            let stats = stats.clone();
            async move { stats.assigned_partitions.get() == expected }
        },
    )
    .await;
    cancel.cancel();
    apply.await.unwrap().unwrap();
}
