//! Two pipelines on one broker (and one outbox): each one's tools and relay see only its own
//! share — its dead-letter topics, its aggregate types.

use std::path::Path;
use std::process::Command;

use rdkafka::message::OwnedHeaders;

use dualsync::config::Config;
use dualsync::dlq::inspect;
use dualsync::publish::{Outgoing, Publisher};

use crate::common::*;
use crate::processes::write_config;

/// Runs the binary to completion: (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
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
