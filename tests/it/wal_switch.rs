//! A pipeline switched from polling to the WAL capture: the sinks take its new events (their
//! versions are above everything polling published, so none is dropped as stale), and the
//! row polling left unpublished is not lost.

use std::path::Path;

use dualsync::config::Config;

use crate::capture_modes::Mode;
use crate::common::*;
use crate::pipeline_scope::with_source;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_switched_from_poll_to_wal_applies_its_new_events() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let reconcile = "[reconcile.customers]\ntable = \"shop.customers\"\n";
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), reconcile);
    let poll = Config::from_toml(Path::new("t.toml"), &text, Vec::new()).unwrap();
    assert!(!poll.reconcile.is_empty(), "verify compares the customers");
    let mut source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    // Polling publishes and applies c1, then stops with c2 left unpublished.
    let running = run_pipeline(&poll, &["postgres"]);
    dualsync::demo::upsert_customer(&mut source, "c1", "poll-1")
        .await
        .unwrap();
    let sink = postgres_sink(&poll).await;
    eventually("polling mode converges", || async {
        verify_all(&source, &sink, &poll).await.is_empty()
    })
    .await;
    running.stop().await;
    dualsync::demo::upsert_customer(&mut source, "c2", "left-by-poll")
        .await
        .unwrap();

    // The switch: slot, lock-free writers, relays with capture = "wal".
    let prepared = Mode::Wal
        .prepare_for(&source, &source_url, &poll.pipeline.name)
        .await;
    let wal = Config::from_toml(
        Path::new("t.toml"),
        &with_source(&text, &prepared.source_lines()),
        Vec::new(),
    )
    .unwrap();
    let running = run_pipeline(&wal, &["postgres"]);
    eventually(
        "the row polling left is published from the table",
        || async { verify_all(&source, &sink, &wal).await.is_empty() },
    )
    .await;
    dualsync::demo::upsert_customer(&mut source, "c1", "wal-1")
        .await
        .unwrap();
    dualsync::demo::upsert_customer(&mut source, "c2", "wal-2")
        .await
        .unwrap();
    // `verify` compares the sink with the primary, which now holds wal-1 and wal-2: events
    // dropped as stale would leave poll-1 and left-by-poll in the sink.
    eventually("the new events are applied over polling's", || async {
        verify_all(&source, &sink, &wal).await.is_empty()
    })
    .await;
    running.stop().await;
}
