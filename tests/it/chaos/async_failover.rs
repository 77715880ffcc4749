//! A failover to an ASYNCHRONOUS standby that missed the last commits: the contract
//! (docs/chaos-report.md, "Asynchronous replication").
//!
//! The old primary acknowledged those commits and the relay published them, so the sinks hold
//! events the new primary never had, and the new primary's outbox sequence resumes below
//! versions already published. dualsync must not publish new events with re-used versions
//! (the sinks would drop them as stale, silently): the relay refuses and says why;
//! `dualsync outbox resequence` lets it go on; `dualsync verify --repair` brings the sinks back
//! to what the new primary holds.

use std::time::Duration;

use dualsync::config::Config;
use dualsync::reconcile::MismatchKind;
use dualsync::sink::SinkReader;

use super::failover::Pair;
use super::RECONCILE;
use crate::common::*;
use crate::sequence_backwards::{sink_has, KEYS};

async fn upsert_all(url: &str, ids: &[&str], name: &str) {
    let mut client = dualsync::pg::connect(url).await.unwrap();
    for id in ids {
        dualsync::demo::upsert_customer(&mut client, id, name)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_asynchronous_failover_is_refused_until_resequenced_and_repaired() {
    dualsync::telemetry::init_for_tests();
    let mut pair = Pair::start_async().await;
    let (db, admin) = pair.new_database().await;
    let source_url = Pair::url(&pair.addresses(), &db);
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let servers = servers();
    let sink_url = create_database(&servers).await;
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), RECONCILE);
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    let config_file = std::env::temp_dir().join(format!("{}.toml", unique("pipeline")));
    std::fs::write(&config_file, &text).unwrap();
    let config_file = config_file.to_str().unwrap();
    let dualsync = |args: &[&str]| {
        let args = [args, &["--config", config_file]].concat();
        run_tool(env!("CARGO_BIN_EXE_dualsync"), &args)
    };
    let running = run_pipeline(&config, &["postgres"]);
    let sink = postgres_sink(&config).await;

    upsert_all(&source_url, &KEYS, "before").await;
    eventually("the first events are applied", || sink_has(&sink, "before")).await;
    let caught_up = "SELECT 1 FROM pg_stat_replication WHERE replay_lsn >= pg_current_wal_lsn()";
    eventually("the standby replayed them", || async {
        admin.query_opt(caught_up, &[]).await.unwrap().is_some()
    })
    .await;

    // The standby stops receiving (its primary_conninfo emptied): what a lagging asynchronous
    // standby is at the moment of a crash.
    let standby = 1 - pair.primary;
    let auto_conf = pair.servers[standby].data().join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto_conf).unwrap();
    conf.push_str("primary_conninfo = ''\n");
    std::fs::write(&auto_conf, conf).unwrap();
    dualsync::pg::connect(&pair.servers[standby].url())
        .await
        .unwrap()
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    eventually("the standby no longer streams", || async {
        admin
            .query_opt("SELECT 1 FROM pg_stat_replication", &[])
            .await
            .unwrap()
            .is_none()
    })
    .await;

    // Acknowledged, published and applied, never replicated: more sequence values than the
    // 32 a sequence logs ahead, so the standby's sequence resumes below them; five customers
    // that exist only on the old primary.
    let lost_ids = ["x1", "x2", "x3", "x4", "x5"];
    for _ in 0..10 {
        upsert_all(&source_url, &KEYS, "lost").await;
    }
    upsert_all(&source_url, &lost_ids, "lost").await;
    eventually("the lost commits are applied", || async {
        sink_has(&sink, "lost").await && sink.get("customers", "x5").await.unwrap().is_some()
    })
    .await;

    drop(admin);
    pair.promote_standby();
    upsert_all(&source_url, &KEYS, "after").await;

    // The relay refuses to publish the re-used versions and says why; nothing is published.
    let relay = running.relay.clone();
    eventually("the relay refuses, naming the recovery", || async {
        relay
            .health
            .not_ready(Duration::from_secs(600))
            .iter()
            .any(|r| r.contains("dualsync outbox resequence"))
    })
    .await;
    // `source` was the old primary's session: ask the new one.
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    assert_eq!(
        dualsync::demo::outbox_counts(&source).await.unwrap().1,
        5,
        "the five newer events wait, unpublished"
    );
    assert!(sink_has(&sink, "lost").await, "nothing newer was applied");

    // The operator's recovery: renumber, then realign the sinks with the new primary.
    if let Err(out) = dualsync(&["outbox", "resequence"]) {
        panic!("resequence failed: {out}");
    }
    eventually("the newer events are applied after the resequence", || {
        sink_has(&sink, "after")
    })
    .await;
    let diverged = verify_all(&source, &sink, &config).await;
    let expected: Vec<(String, String)> = lost_ids
        .iter()
        .map(|id| ("customers".to_string(), id.to_string()))
        .collect();
    assert_eq!(
        diverged.keys().cloned().collect::<Vec<_>>(),
        expected,
        "only the customers the new primary never had differ: {diverged:?}"
    );
    assert!(diverged.values().all(|k| matches!(k, MismatchKind::Extra)));
    if let Err(out) = dualsync(&["verify", "--repair", "--sink", "postgres"]) {
        panic!("verify --repair failed: {out}");
    }
    eventually("the repair reaches the sink", || async {
        verify_all(&source, &sink, &config).await.is_empty()
    })
    .await;
    running.stop().await;
}
