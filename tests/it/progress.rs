//! Progress of `snapshot`, `verify`, `verify --repair` and `dlq replay` when stderr is not a
//! terminal: plain lines with count, total, rate and ETA, then a summary line.

use std::process::Command;

use crate::common::*;
use crate::processes::write_config;

const RECONCILE: &str = r#"
[reconcile.customers]
table = "shop.customers"
[reconcile.orders]
table = "shop.orders"
"#;

/// Runs the binary with a 1 ms progress interval; returns its stderr (stdout is checked to
/// hold no progress).
fn run(args: &[&str], config: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(["--progress-interval", "1ms"])
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stdout.contains("ETA"),
        "progress belongs on stderr:\n{stdout}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "no bar or colours off a terminal:\n{stderr}"
    );
    stderr
}

/// The plain progress lines of `what` (`what: done/total unit (pct%), rate unit/s, ETA ...`):
/// (done, total), in order.
fn progress_lines(stderr: &str, what: &str, unit: &str) -> Vec<(u64, u64)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{what}: ")))
        .filter(|l| l.contains(" ETA "))
        .map(|l| {
            let (counts, rest) = l.split_once(' ').unwrap();
            assert!(rest.starts_with(&format!("{unit} (")), "{l}");
            assert!(rest.contains(&format!(" {unit}/s, ETA ")), "{l}");
            let (done, total) = counts.split_once('/').unwrap();
            (done.parse().unwrap(), total.parse().unwrap())
        })
        .collect()
}

/// Checks the lines of one piece of work: at least one (they are printed by time, and a
/// 1 ms interval still lets fast work finish between two), increasing, out of `total`,
/// ending in a summary of `n`.
fn assert_progress(stderr: &str, what: &str, unit: &str, n: u64, total: u64) {
    let lines = progress_lines(stderr, what, unit);
    assert!(
        !lines.is_empty(),
        "{what}: expected progress lines in:\n{stderr}"
    );
    assert!(
        lines.windows(2).all(|w| w[0].0 < w[1].0) && lines.iter().all(|(_, t)| *t == total),
        "{what}: {lines:?}"
    );
    let summary = format!("{what}: done, {n} {unit} in ");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&summary) && l.ends_with(&format!(" {unit}/s)"))),
        "no summary {summary:?} in:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_commands_print_progress_lines_and_a_summary_off_a_terminal() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), RECONCILE);
    let path = write_config(&text);
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    dualsync::demo::generate(&source_url, 20, 3000, 4000, 4, 5)
        .await
        .unwrap();
    let count = |table: &'static str| {
        let source = &source;
        async move {
            let n: i64 = source
                .query_one(&format!("SELECT count(*) FROM shop.{table}"), &[])
                .await
                .unwrap()
                .get(0);
            n as u64
        }
    };
    let orders = count("orders").await;
    assert!(orders > 2000, "{orders}");

    let stderr = run(
        &["snapshot", "--table", "orders", "--batch-size", "200"],
        &path,
    );
    assert_progress(&stderr, "snapshot orders", "rows", orders, orders);

    // Nothing reached the sink (no apply runs): every key is missing. Verify reads both sides,
    // so its total is an estimate of twice the primary's rows.
    let stderr = run(
        &["verify", "--sink", "postgres", "--aggregate", "orders"],
        &path,
    );
    assert_progress(
        &stderr,
        "verify orders vs postgres",
        "rows",
        orders,
        2 * orders,
    );
    let stderr = run(
        &[
            "verify",
            "--sink",
            "postgres",
            "--aggregate",
            "orders",
            "--repair",
        ],
        &path,
    );
    assert_progress(
        &stderr,
        "verify orders vs postgres",
        "rows",
        orders,
        2 * orders,
    );
    assert_progress(&stderr, "repair orders", "keys", orders, orders);

    // Letters without error headers: a dry run decides each as "would fail again".
    let config =
        dualsync::config::Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new())
            .unwrap();
    // One of this pipeline's own dead-letter topics (others are refused).
    let dlq = format!(
        "{}{}",
        config.kafka.topic_for("orders"),
        config.apply.dead_letter_suffix
    );
    dualsync::publish::Publisher::new(&config.kafka)
        .unwrap()
        .ensure_topic(&dlq)
        .await
        .unwrap();
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let letters: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| (format!("o{i}"), b"not an event".to_vec()))
        .collect();
    let refs: Vec<(&str, &[u8])> = letters
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    produce_in_order(&producer, &dlq, &refs).await;
    let stderr = run(&["dlq", "replay", "--topic", &dlq, "--dry-run"], &path);
    assert_progress(&stderr, &format!("replay {dlq}"), "letters", 30, 30);
}
