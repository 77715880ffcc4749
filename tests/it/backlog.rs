//! The outbox backlog as operators see it: `dualsync_outbox_backlog_rows`, the oldest
//! unpublished row's age, and the `/status` warnings they raise, on a paused relay.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use dualsync::codec::SchemaStore;
use dualsync::config::Config;
use dualsync::http::Control;
use dualsync::metrics::Metrics;

use crate::common::*;
use crate::operations::http;

async fn insert_customers(client: &tokio_postgres::Client, n: i32) {
    client
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             SELECT 'customers', 'c' || i, 'CustomerUpserted',
                    jsonb_build_object('id', 'c' || i, 'name', 'n', 'email', 'e', 'order_count', 0)
             FROM generate_series(1, $1::int) i",
            &[&n],
        )
        .await
        .unwrap();
}

/// Paused, the relay keeps sampling: the gauges climb to the 5 waiting rows and their age,
/// `/status` warns naming both thresholds; resumed, they return to 0, the warnings go and the
/// state is "ok".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backlog_gauges_follow_a_paused_relay_and_status_warns_past_the_thresholds() {
    let servers = servers();
    let url = create_database(&servers).await;
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    let text = pipeline_toml(&servers, &url, &url, &unique("m"), "").replacen(
        "[http]\n",
        "[http]\nwarn_outbox_backlog = 3\nwarn_oldest_unpublished_secs = 1\n",
        1,
    );
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    let metrics = Arc::new(Metrics::new(&config.pipeline.name, "relay"));
    let control = Control::default();
    control.set_paused(true);
    let cancel = CancellationToken::new();
    let relay = {
        let (config, metrics, control, cancel) = (
            config.clone(),
            metrics.clone(),
            control.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            let schemas = Arc::new(SchemaStore::load_dir(&config.encoding.schemas_dir).unwrap());
            dualsync::relay::run(&config, schemas, metrics, control, cancel).await
        })
    };
    let addr = dualsync::http::serve(
        &config.http,
        0,
        "relay",
        &config.pipeline.name,
        metrics.clone(),
        control.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    let status = || async {
        let (code, body) = http(addr, "GET", "/status", None).await;
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };

    insert_customers(&client, 5).await;
    eventually(
        "the paused relay's gauges show the 5 waiting rows",
        || async { metrics.outbox_backlog.get() == 5 && metrics.outbox_oldest_age.get() > 1.0 },
    )
    .await;
    let report = status().await;
    assert_eq!(report["paused"], true, "{report}");
    assert_eq!(report["outbox"]["backlog"], 5, "{report}");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("http.warn_outbox_backlog")
            && warnings.contains("http.warn_oldest_unpublished_secs"),
        "{report}"
    );

    control.set_paused(false);
    eventually("resumed, the gauges return to 0", || async {
        metrics.outbox_backlog.get() == 0 && metrics.outbox_oldest_age.get() == 0.0
    })
    .await;
    let report = status().await;
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
    assert_eq!(report["state"], "ok", "{report}");
    assert_eq!(dualsync::demo::outbox_counts(&client).await.unwrap().1, 0);
    cancel.cancel();
    relay.await.unwrap().unwrap();
}
