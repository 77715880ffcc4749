//! Two pipelines on one broker (and one outbox): each one's tools and relay see only its own
//! share — its dead-letter topics, its aggregate types.

use std::path::Path;
use std::process::Command;

use rdkafka::message::OwnedHeaders;

use tokio_util::sync::CancellationToken;

use dualsync::config::Config;
use dualsync::ops::inspect;
use dualsync::publish::{Outgoing, Publisher};

use crate::common::*;
use crate::processes::write_config;

/// Runs the binary to completion: (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run dualsync");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn parse(text: &str) -> Config {
    Config::from_toml(Path::new("test.toml"), text, Vec::new()).unwrap()
}

/// One dead letter in each of `topics` (created first).
async fn letters_in(config: &Config, topics: &[String]) {
    let publisher = Publisher::new(&config.kafka).unwrap();
    let mut out = Vec::new();
    for topic in topics {
        publisher.ensure_topic(topic).await.unwrap();
        out.push(Outgoing {
            topic: topic.clone(),
            key: Some(b"k1".to_vec()),
            value: b"not avro".to_vec(),
            headers: OwnedHeaders::new(),
        });
    }
    publisher.publish_all(out).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dlq_list_shows_only_this_pipelines_dead_letters_and_show_replay_refuse_others() {
    let servers = servers();
    let url = create_database(&servers).await;
    let text_a = pipeline_toml(&servers, &url, &url, &unique("m"), "");
    let text_b = pipeline_toml(&servers, &url, &url, &unique("m"), "");
    let (a, b) = (parse(&text_a), parse(&text_b));
    let own_a = vec![
        a.relay.dead_letter_topic.clone(),
        format!(
            "{}{}",
            a.kafka.topic_for("customers"),
            a.apply.dead_letter_suffix
        ),
    ];
    let own_b = vec![
        b.relay.dead_letter_topic.clone(),
        format!(
            "{}{}",
            b.kafka.topic_for("orders"),
            b.apply.dead_letter_suffix
        ),
    ];
    letters_in(&a, &own_a.iter().chain(&own_b).cloned().collect::<Vec<_>>()).await;

    let listed = |config: &Config| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || inspect::dead_letter_topics(&config))
                .await
                .unwrap()
                .unwrap()
        }
    };
    let mut expected_a = own_a.clone();
    expected_a.sort();
    let mut expected_b = own_b.clone();
    expected_b.sort();
    assert_eq!(listed(&a).await, expected_a);
    assert_eq!(listed(&b).await, expected_b);

    // The command: `dlq list --json` of A names A's topics only.
    let path_a = write_config(&text_a);
    let path_a = path_a.to_str().unwrap();
    let (ok, stdout, stderr) = run(&["dlq", "list", "-c", path_a, "--json"]);
    assert!(ok, "{stderr}");
    let summaries: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mut topics: Vec<String> = summaries
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["topic"].as_str().unwrap().to_string())
        .collect();
    topics.sort();
    assert_eq!(topics, expected_a);

    // `show` and `replay` pointed at B's letters with A's config: refused, naming the topic.
    for foreign in &own_b {
        for args in [
            vec!["dlq", "show", "-c", path_a, "--topic", foreign],
            vec![
                "dlq",
                "replay",
                "-c",
                path_a,
                "--topic",
                foreign,
                "--dry-run",
            ],
        ] {
            let (ok, stdout, stderr) = run(&args);
            assert!(!ok, "{args:?} succeeded: {stdout}");
            assert!(
                stderr.contains(foreign.as_str()) && stderr.contains("not a dead-letter topic"),
                "{args:?}: {stderr}"
            );
        }
    }
    // Its own topic is shown.
    let (ok, stdout, stderr) = run(&["dlq", "show", "-c", path_a, "--topic", &own_a[1]]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("key=k1"), "{stdout}");
}

/// `[source]` settings for [`pipeline_toml`]'s text.
pub fn with_source(text: &str, settings: &str) -> String {
    text.replacen(
        "kind = \"postgres_outbox\"\n",
        &format!("kind = \"postgres_outbox\"\n{settings}\n"),
        1,
    )
}

async fn outbox_rows(client: &tokio_postgres::Client, aggregate_type: &str) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL)
             FROM dualsync.outbox WHERE aggregatetype = $1",
            &[&aggregate_type],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn insert_rows(client: &tokio_postgres::Client, ids: std::ops::Range<i32>) {
    client
        .execute(
            r#"INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
               SELECT 'customers', 'c' || i, 'CustomerUpserted',
                      jsonb_build_object('id', 'c' || i, 'name', 'n', 'email', 'e', 'order_count', 0)
               FROM generate_series($1::int, $2::int - 1) i
               UNION ALL
               SELECT 'orders', 'o' || i, 'OrderPlaced',
                      jsonb_build_object('id', 'o' || i, 'customer_id', 'c' || i, 'status', 'NEW',
                                         'total_cents', 100, 'lines', '[]'::jsonb)
               FROM generate_series($1::int, $2::int - 1) i"#,
            &[&ids.start, &ids.end],
        )
        .await
        .unwrap();
}

/// Two pipelines share one outbox with disjoint aggregate types (A includes `cust*`, B
/// excludes `customers`): each publishes exactly its own rows; A leaves B's rows unpublished
/// (not blocking its own) and its backlog does not count them; A's short retention purges
/// only A's published rows, never B's unpublished nor B's published ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelines_sharing_an_outbox_publish_and_purge_only_their_own_aggregate_types() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let text_a = with_source(
        &pipeline_toml(&servers, &source_url, &sink_url, &unique("m"), ""),
        "retention_secs = 1\ninclude_aggregates = [\"cust*\"]",
    );
    let text_b = with_source(
        &pipeline_toml(&servers, &source_url, &sink_url, &unique("m"), ""),
        "retention_secs = 3600\nexclude_aggregates = [\"customers\"]",
    );
    let (a, b) = (parse(&text_a), parse(&text_b));
    // Orders first in seq order: A must not be blocked behind them.
    insert_rows(&source, 0..5).await;

    let cancel = CancellationToken::new();
    let (relay_a, metrics_a) = spawn_relay(&a, &cancel);
    let a_customers = read_topic(&a.kafka.brokers, &a.kafka.topic_for("customers"), 5).await;
    assert_eq!(a_customers.len(), 5);
    // A's published rows are purged after its 1 s retention; B's rows stay unpublished.
    eventually("A purges its published customers rows", || async {
        outbox_rows(&source, "customers").await == (0, 0)
    })
    .await;
    assert_eq!(outbox_rows(&source, "orders").await, (5, 5));
    // Sampled every few seconds; counting B's rows it would stay at 5.
    eventually("A's backlog counts only its own types", || async {
        metrics_a.outbox_backlog.get() == 0
    })
    .await;

    let (relay_b, _) = spawn_relay(&b, &cancel);
    let b_orders = read_topic(&b.kafka.brokers, &b.kafka.topic_for("orders"), 5).await;
    assert_eq!(b_orders.len(), 5);
    eventually("B marks its orders rows", || async {
        outbox_rows(&source, "orders").await == (5, 0)
    })
    .await;
    // A's purger runs again after B's marks are older than A's retention: c5 published after
    // them and purged by A means A's purge statement also saw B's rows, and left them.
    insert_rows(&source, 5..6).await;
    eventually("A publishes and purges c5", || async {
        outbox_rows(&source, "customers").await == (0, 0)
            && outbox_rows(&source, "orders").await.0 == 6
    })
    .await;
    eventually("B publishes o5", || async {
        outbox_rows(&source, "orders").await == (6, 0)
    })
    .await;
    assert_eq!(
        outbox_rows(&source, "orders").await,
        (6, 0),
        "B's rows are never purged by A"
    );

    // Neither published the other's types.
    let a_all = read_topic(&a.kafka.brokers, &a.kafka.topic_for("customers"), 6).await;
    assert_eq!(a_all.len(), 6);
    let b_all = read_topic(&b.kafka.brokers, &b.kafka.topic_for("orders"), 6).await;
    assert_eq!(b_all.len(), 6);
    let exists = |config: &Config, topic: String| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || inspect::topic_exists(&config, &topic))
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert!(!exists(&a, a.kafka.topic_for("orders")).await);
    assert!(!exists(&b, b.kafka.topic_for("customers")).await);

    cancel.cancel();
    relay_a.await.unwrap().unwrap();
    relay_b.await.unwrap().unwrap();
}
