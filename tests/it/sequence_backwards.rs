//! An outbox sequence that goes backwards (a failover to an asynchronous standby, a re-created
//! schema): the relay must not publish versions the sinks already hold (they would be dropped
//! as stale, silently), must say why, and `dualsync outbox resequence` must recover.

use std::net::SocketAddr;
use std::process::Command;

use tokio_util::sync::CancellationToken;

use dualsync::config::Config;
use dualsync::sink::SinkReader;

use crate::common::*;
use crate::operations::http;

async fn upsert_customer(client: &tokio_postgres::Client, id: &str, name: &str) {
    client
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('customers', $1, 'CustomerUpserted',
                     jsonb_build_object('id', $1::text, 'name', $2::text, 'email', 'e', 'order_count', 0))",
            &[&id, &name],
        )
        .await
        .unwrap();
}

pub(crate) const KEYS: [&str; 5] = ["c1", "c2", "c3", "c4", "c5"];

/// Whether the sink holds `name` for every key of [`KEYS`].
pub(crate) async fn sink_has(sink: &dualsync::sink::postgres::PostgresSink, name: &str) -> bool {
    for key in KEYS {
        let doc = sink
            .get("customers", key)
            .await
            .unwrap()
            .and_then(|(_, d)| d);
        if doc.as_ref().and_then(|d| d["name"].as_str()) != Some(name) {
            return false;
        }
    }
    true
}

/// A shop pipeline that published and applied [`KEYS`] as "before", its relay and apply
/// stopped again.
async fn published_before() -> ShopPipeline {
    let shop = shop_pipeline("").await;
    for key in KEYS {
        upsert_customer(&shop.source, key, "before").await;
    }
    eventually("the first events are applied", || {
        sink_has(&shop.sink, "before")
    })
    .await;
    shop
}

/// The relay's HTTP endpoint, serving `metrics` until `cancel`.
async fn serve(
    config: &Config,
    metrics: std::sync::Arc<dualsync::metrics::Metrics>,
    cancel: &CancellationToken,
) -> SocketAddr {
    dualsync::http::serve(
        &config.http,
        0,
        "relay",
        &config.pipeline.name,
        metrics,
        dualsync::http::Control::default(),
        cancel.clone(),
    )
    .await
    .unwrap()
}

/// Publish five events, restart the sequence below them (what a failover to a standby that
/// had not replayed the last transactions leaves), write five newer events: they must not be
/// published with the re-used versions. The relay refuses and `/readyz` and `/status` say
/// why; `dualsync outbox resequence` renumbers the unpublished rows past the published
/// maximum, and the newer events then arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequence_restarted_below_published_versions_is_refused_until_resequenced() {
    let ShopPipeline {
        config,
        config_file,
        source,
        sink,
        running,
        ..
    } = published_before().await;
    running.stop().await;

    // The failover: the standby never saw the published transactions (lost with the old
    // primary), and its sequence resumes below them. The newer events then get the versions
    // the sink already holds.
    source
        .batch_execute(
            "DELETE FROM dualsync.outbox;
             ALTER SEQUENCE dualsync.outbox_seq RESTART WITH 1",
        )
        .await
        .unwrap();
    for key in KEYS {
        upsert_customer(&source, key, "after").await;
    }
    let running = run_pipeline(&config, &["postgres"]);
    let cancel = CancellationToken::new();
    let addr = serve(&config, running.relay.clone(), &cancel).await;
    let refused = dualsync::demo::wait_until(DEADLINE, || async {
        let (status, body) = http(addr, "GET", "/readyz", None).await;
        status == 503 && body.contains("dualsync outbox resequence")
    })
    .await;
    let last = http(addr, "GET", "/readyz", None).await;
    let unpublished = dualsync::demo::outbox_counts(&source).await.unwrap().1;
    assert!(
        refused,
        "the relay never refused the re-used versions (last /readyz: {last:?}); unpublished rows: {unpublished}; the sink has the newer events: {}",
        sink_has(&sink, "after").await
    );
    let status: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/status", None).await.1).unwrap();
    assert_eq!(status["ready"], false, "{status}");
    assert_eq!(unpublished, 5, "nothing is published while refused");
    assert!(sink_has(&sink, "before").await);

    // The recovery, as an operator runs it, while the relay waits.
    let out = Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(["outbox", "resequence", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "resequence failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("renumbered 5 unpublished rows"), "{stdout}");
    eventually("the newer events are applied", || sink_has(&sink, "after")).await;
    eventually("the relay is ready again", || async {
        http(addr, "GET", "/readyz", None).await.0 == 200
    })
    .await;
    // Run again: nothing to do.
    let again = Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(["outbox", "resequence", "--config"])
        .arg(&config_file)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    cancel.cancel();
    running.stop().await;
}

/// A re-created schema whose sequence climbed past the published maximum before the relay
/// came back: the sequence alone looks sound, but the outbox rows at the published versions
/// are other events. The relay compares event ids at the versions it read back and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn re_used_versions_are_found_by_event_id_when_the_sequence_climbed_past_the_maximum() {
    let ShopPipeline {
        config,
        source,
        running,
        ..
    } = published_before().await;
    running.stop().await;

    // Drop and re-create the outbox; more events than were published before.
    source
        .batch_execute("DROP SCHEMA dualsync CASCADE")
        .await
        .unwrap();
    dualsync::source::outbox::migrate(&source).await.unwrap();
    for key in KEYS.iter().chain(KEYS.iter()) {
        upsert_customer(&source, key, "after").await;
    }
    let running = run_pipeline(&config, &["postgres"]);
    let health = running.relay.clone();
    let refused = dualsync::demo::wait_until(DEADLINE, || async {
        health
            .health
            .not_ready(std::time::Duration::from_secs(3600))
            .iter()
            .any(|r| r.contains("dualsync outbox resequence"))
    })
    .await;
    assert!(
        refused,
        "the relay never refused; unpublished rows: {}",
        dualsync::demo::outbox_counts(&source).await.unwrap().1
    );
    assert_eq!(dualsync::demo::outbox_counts(&source).await.unwrap().1, 10);
    // Outside `outbox resequence` a row's seq stays immutable.
    assert!(source
        .execute(
            "UPDATE dualsync.outbox SET seq = seq + 1000 WHERE seq = 1",
            &[]
        )
        .await
        .is_err());
    running.stop().await;
}
