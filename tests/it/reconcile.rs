//! `verify`, `verify --repair` and `snapshot` against the real servers: drift injected into
//! the sink is found and classified, repaired through the pipeline (never by writing the
//! sink), and rows that predate the outbox are backfilled — resumably, while writers run.

use std::collections::BTreeMap;

use dualsync::reconcile::{self, MismatchKind, REPAIR_EVENT_TYPE};

use crate::common::*;

const RECONCILE: &str = r#"
[reconcile.customers]
table = "shop.customers"
[reconcile.orders]
table = "shop.orders"
"#;

/// A pipeline with reconcile sections, relay and PostgreSQL apply running.
type Running = ShopPipeline;

async fn start() -> Running {
    shop_pipeline(RECONCILE).await
}

/// `dualsync verify --json` on the running pipeline's file: (exit status, report).
fn verify_cli(run: &Running) -> (std::process::ExitStatus, serde_json::Value) {
    verify_cli_with(run, &[])
}

fn verify_cli_with(run: &Running, more: &[&str]) -> (std::process::ExitStatus, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(["verify", "--sink", "postgres", "--json", "-c"])
        .arg(&run.config_file)
        .args(more)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_classifies_drift_and_repair_converges_through_the_pipeline() {
    let mut run = start().await;
    dualsync::demo::generate(&run.source_url, 5, 30, 200, 2, 11)
        .await
        .unwrap();
    run.converged().await;

    // Drift the sink behind the pipeline's back.
    let replica = run.replica().await;
    let ends = run
        .source
        .query_one("SELECT min(id), max(id) FROM shop.orders", &[])
        .await
        .unwrap();
    let (live_order, other_order): (String, String) = (ends.get(0), ends.get(1));
    replica
        .batch_execute(&format!(
            "DELETE FROM replica.customers WHERE id = 'c0';
             UPDATE replica.orders SET doc = doc || '{{\"note\": \"tampered\"}}' WHERE id = '{live_order}';
             UPDATE replica.orders SET doc = doc || '{{\"note\": \"old\"}}', version = 1 WHERE id = '{other_order}';
             INSERT INTO replica.orders (id, doc, version) VALUES ('o-extra', '{{\"id\": \"o-extra\"}}', 1);"
        ))
        .await
        .unwrap();
    let found = verify_all(&run.source, &run.sink, &run.config).await;
    let expected: BTreeMap<(String, String), MismatchKind> = [
        (("customers", "c0"), MismatchKind::Missing),
        (("orders", live_order.as_str()), MismatchKind::Different),
        (("orders", other_order.as_str()), MismatchKind::Stale),
        (("orders", "o-extra"), MismatchKind::Extra),
    ]
    .into_iter()
    .map(|((a, k), kind)| ((a.to_string(), k.to_string()), kind))
    .collect();
    assert_eq!(found, expected);
    // The command line says the same, exits 1, and prints JSON for scripts.
    let (status, report) = verify_cli(&run);
    assert_eq!(status.code(), Some(1));
    let kinds: Vec<String> = report["aggregates"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["mismatches"].as_array().unwrap().clone())
        .map(|m| m["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.len(), 4, "{report}");

    // Repair: outbox events with the primary's state, while the pipeline runs.
    for (aggregate, rc) in &run.config.reconcile {
        let keys: Vec<String> = found
            .keys()
            .filter(|(a, _)| a == aggregate)
            .map(|(_, k)| k.clone())
            .collect();
        let emitted =
            reconcile::emit_current_state(&mut run.source, aggregate, rc, &keys, REPAIR_EVENT_TYPE)
                .await
                .unwrap();
        assert_eq!(emitted, keys.len() as u64);
    }
    eventually("after the repair the sink matches again", || async {
        verify_all(&run.source, &run.sink, &run.config)
            .await
            .is_empty()
    })
    .await;
    assert!(verify_cli(&run).0.success());
    let extra = dualsync::sink::SinkReader::get(&run.sink, "orders", "o-extra")
        .await
        .unwrap();
    assert!(
        matches!(extra, Some((_, None))),
        "the extra row became a tombstone"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_backfills_rows_without_events_resumably_under_concurrent_writes() {
    let mut run = start().await;
    let customers = run.config.reconcile["customers"].clone();
    // Rows written before the application adopted the outbox: no events exist for them; and
    // an earlier snapshot run that stopped after key 'c25' (text order).
    run.source
        .batch_execute(
            "INSERT INTO shop.customers (id, name, email, order_count)
             SELECT 'c' || i, 'Legacy ' || i, 'c' || i || '@old', 0 FROM generate_series(0, 39) i;
             CREATE TABLE IF NOT EXISTS dualsync.snapshot_progress (
                aggregatetype text PRIMARY KEY, last_key text,
                rows_emitted bigint NOT NULL DEFAULT 0,
                started_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz);
             INSERT INTO dualsync.snapshot_progress (aggregatetype, last_key, rows_emitted)
             VALUES ('customers', 'c25', 0)",
        )
        .await
        .unwrap();
    let expected_rest: i64 = run
        .source
        .query_one("SELECT count(*) FROM shop.customers WHERE id > 'c25'", &[])
        .await
        .unwrap()
        .get(0);
    let resumed = reconcile::snapshot(&mut run.source, "customers", &customers, 7, false, &|_| {})
        .await
        .unwrap();
    assert!(resumed.resumed);
    assert_eq!(resumed.rows_emitted, expected_rest);

    // A full snapshot while writers change the same customers (order counts) concurrently.
    let writers = tokio::spawn({
        let url = run.source_url.clone();
        async move { dualsync::demo::generate(&url, 40, 60, 300, 3, 5).await }
    });
    let full = reconcile::snapshot(&mut run.source, "customers", &customers, 7, true, &|_| {})
        .await
        .unwrap();
    assert!(!full.resumed);
    assert!(full.rows_emitted >= 40);
    writers.await.unwrap().unwrap();
    eventually("snapshot plus concurrent writes converge", || async {
        verify_all(&run.source, &run.sink, &run.config)
            .await
            .is_empty()
    })
    .await;
    run.stop().await;
}

/// `dualsync verify --repair` as a command: it reports the drift, writes one repair event per
/// mismatch (its JSON says how many) and exits 0, every mismatch being repaired; a plain
/// `verify` exits 1 until the pipeline applied them, then 0 with nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_repair_command_writes_one_event_per_mismatch_and_the_sink_converges() {
    let run = start().await;
    dualsync::demo::generate(&run.source_url, 3, 5, 20, 2, 7)
        .await
        .unwrap();
    run.converged().await;
    let replica = run.replica().await;
    replica
        .batch_execute(
            "DELETE FROM replica.customers WHERE id = 'c0';
             INSERT INTO replica.orders (id, doc, version) VALUES ('o-extra', '{\"id\": \"o-extra\"}', 1);",
        )
        .await
        .unwrap();
    let before: i64 = run
        .source
        .query_one(
            "SELECT count(*) FROM dualsync.outbox WHERE type = $1",
            &[&REPAIR_EVENT_TYPE],
        )
        .await
        .unwrap()
        .get(0);
    let (status, report) = verify_cli(&run);
    assert_eq!(status.code(), Some(1), "{report}");
    let (status, report) = verify_cli_with(&run, &["--repair"]);
    assert_eq!(status.code(), Some(0), "{report}");
    assert_eq!(report["repaired"], 2, "{report}");
    let kinds: Vec<&str> = report["aggregates"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["mismatches"].as_array().unwrap())
        .map(|m| m["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["missing", "extra"], "{report}");
    let after: i64 = run
        .source
        .query_one(
            "SELECT count(*) FROM dualsync.outbox WHERE type = $1",
            &[&REPAIR_EVENT_TYPE],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(after - before, 2, "one repair event per mismatch");
    eventually("the repair is applied", || async {
        verify_cli(&run).0.success()
    })
    .await;
    let (status, report) = verify_cli(&run);
    assert_eq!(status.code(), Some(0));
    assert_eq!(report["repaired"], 0, "{report}");
    run.stop().await;
}
