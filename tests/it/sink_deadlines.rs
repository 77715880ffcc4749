//! Sink calls under locks (issue #35 items 8 and 9): a write refused by `lock_timeout`
//! (SQLSTATE 55P03) is retried, not fatal; a write blocked on a locked row shows in `/readyz`
//! and `/status` while it waits, is cut off by the sink's deadline (`sinks.NAME.timeout_ms`)
//! and retried, and catches up once the lock is released.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use dualsync::config::{Config, SinkConfig};
use dualsync::http::Control;
use dualsync::metrics::Metrics;

use crate::common::*;
use crate::operations::http;
use crate::toxiproxy::{host_port, Toxiproxy};

fn customer(id: &str, version: i64) -> Vec<u8> {
    let event = customer_event(
        id,
        version,
        Some(serde_json::json!({"id": id, "name": "n", "email": "e", "order_count": version})),
    );
    schemas().encode(&event).unwrap()
}

/// Produces `customers` events (key, version) in order.
pub async fn produce(config: &Config, events: &[(&str, i64)]) {
    let (topic, producer) = topic_with_producer(config, "customers").await;
    let values: Vec<(&str, Vec<u8>)> = events.iter().map(|(k, v)| (*k, customer(k, *v))).collect();
    let messages: Vec<(&str, &[u8])> = values.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    produce_in_order(&producer, &topic, &messages).await;
}

fn retries(metrics: &Metrics) -> u64 {
    metrics.retries.with_label_values(&["apply"]).get()
}

/// A pipeline writing to a fresh PostgreSQL sink database whose URL ends with `url_tail`.
async fn pipeline_on_fresh_sink(url_tail: &str) -> (Config, String) {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(
        &servers,
        "postgres://unused/db",
        &format!("{sink_url}{url_tail}"),
        &unique("m"),
        "",
    );
    (config, sink_url)
}

/// The version of `key` in the sink database at `url`, read past any proxy.
pub async fn version_at(url: &str, key: &str) -> Option<i64> {
    let client = dualsync::pg::connect(url).await.unwrap();
    let row = client
        .query_opt(
            "SELECT version FROM replica.customers WHERE id = $1",
            &[&key],
        )
        .await
        .ok()
        .flatten();
    row.map(|r| r.get(0))
}

/// Waits until the sink at `url` holds `key` at `version`.
pub async fn wait_version(url: &str, key: &str, version: i64) {
    eventually(&format!("{key}@{version} is in the sink"), || async {
        version_at(url, key).await == Some(version)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_table_locked_past_lock_timeout_is_retried_not_fatal() {
    let (config, sink_url) = pipeline_on_fresh_sink("?options=-c%20lock_timeout%3D200").await;
    let cancel = CancellationToken::new();
    let (apply, metrics) = spawn_apply(&config, "postgres", &cancel);
    produce(&config, &[("c0", 1)]).await;
    wait_version(&sink_url, "c0", 1).await;

    // A migration holds the table: every write fails with 55P03 after 200 ms.
    let mut migration = dualsync::pg::connect(&sink_url).await.unwrap();
    let tx = migration.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE replica.customers IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    produce(&config, &[("c1", 1), ("c0", 2)]).await;
    eventually("the refused write is retried", || async {
        retries(&metrics) >= 3 || apply.is_finished()
    })
    .await;
    assert!(
        !apply.is_finished(),
        "apply stopped on a lock timeout: {:?}",
        apply.await
    );
    tx.rollback().await.unwrap();
    wait_version(&sink_url, "c1", 1).await;
    wait_version(&sink_url, "c0", 2).await;
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_stuck_on_a_locked_row_shows_in_readyz_times_out_and_catches_up() {
    let (mut config, sink_url) = pipeline_on_fresh_sink("").await;
    config.http.stuck_write_secs = 1;
    if let Some(SinkConfig::Postgres(p)) = config.sinks.get_mut("postgres") {
        p.timeout_ms = 1500;
    }
    let cancel = CancellationToken::new();
    let (apply, metrics) = spawn_apply(&config, "postgres", &cancel);
    let addr = dualsync::http::serve(
        &config.http,
        0,
        "apply",
        &config.pipeline.name,
        Arc::clone(&metrics),
        Control::default(),
        cancel.clone(),
    )
    .await
    .unwrap();
    produce(&config, &[("c0", 1)]).await;
    wait_version(&sink_url, "c0", 1).await;
    assert_eq!(http(addr, "GET", "/readyz", None).await.0, 200);

    // Another session holds c0's row: the next write of c0 waits on it.
    let mut holder = dualsync::pg::connect(&sink_url).await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM replica.customers WHERE id = 'c0' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    produce(&config, &[("c0", 2)]).await;
    let reason = "sink postgres (sinks.postgres.url): a write unfinished for";
    eventually("/readyz answers 503 naming the stuck sink", || async {
        let (status, body) = http(addr, "GET", "/readyz", None).await;
        status == 503 && body.contains(reason)
    })
    .await;
    let (_, status) = http(addr, "GET", "/status", None).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(
        status["not_ready"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains(reason)),
        "{status}"
    );
    eventually("the blocked write times out and is retried", || async {
        retries(&metrics) >= 2
    })
    .await;
    assert!(!apply.is_finished(), "apply stopped: {:?}", apply.await);
    assert_eq!(version_at(&sink_url, "c0").await, Some(1), "still blocked");

    tx.rollback().await.unwrap();
    eventually("caught up and ready again", || async {
        version_at(&sink_url, "c0").await == Some(2)
            && http(addr, "GET", "/readyz", None).await == (200, "ready\n".to_string())
    })
    .await;
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// The client-side deadline: a connection that goes silent (a blackhole: open, but nothing
/// comes back, so `statement_timeout` cannot answer either) is cut off after `timeout_ms` plus
/// the grace period, dropped, and the write retried on a new connection once the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_connection_gone_silent_is_cut_off_and_the_write_retried_on_a_new_one() {
    let proxy = Toxiproxy::start().await;
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let upstream = host_port(&sink_url);
    let link = proxy.link("sink", &upstream).await;
    let mut config = pipeline(
        &servers,
        "postgres://unused/db",
        &sink_url.replace(&upstream, &link.listen),
        &unique("m"),
        "",
    );
    if let Some(SinkConfig::Postgres(p)) = config.sinks.get_mut("postgres") {
        p.timeout_ms = 500;
    }
    let cancel = CancellationToken::new();
    let (apply, metrics) = spawn_apply(&config, "postgres", &cancel);
    produce(&config, &[("c0", 1)]).await;
    wait_version(&sink_url, "c0", 1).await;

    proxy.blackhole(&link).await;
    produce(&config, &[("c0", 2)]).await;
    eventually("the silent write is cut off and retried", || async {
        retries(&metrics) >= 1
    })
    .await;
    assert!(!apply.is_finished(), "apply stopped: {:?}", apply.await);
    assert_eq!(version_at(&sink_url, "c0").await, Some(1));

    proxy.heal(&link).await;
    wait_version(&sink_url, "c0", 2).await;
    cancel.cancel();
    apply.await.unwrap().unwrap();
}
