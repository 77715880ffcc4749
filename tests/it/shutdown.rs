//! Graceful shutdown of the real binaries: SIGTERM while events flow marks what Kafka
//! acknowledged and commits what was applied, so a restart redelivers nothing already done.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use dualsync::config::Config;

use crate::common::*;
use crate::processes::{sigterm, spawn, wait_exit, write_config};

const ROWS: i64 = 3000;

/// Sum over partitions of (committed offset of `group`, high watermark) on `topic`.
fn offsets(config: &Config, group: &str, topic: &str) -> (i64, i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..config.kafka.partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let mut sums = (0, 0);
    for p in 0..config.kafka.partitions {
        if let Some(Offset::Offset(o)) = committed.find_partition(topic, p).map(|e| e.offset()) {
            sums.0 += o;
        }
        sums.1 += consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap()
            .1;
    }
    sums
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// A child process killed if the test fails before stopping it.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn stop(child: &mut Proc, what: &str) {
    sigterm(&child.0);
    let status = wait_exit(&mut child.0, Duration::from_secs(30));
    assert!(status.success(), "{what} exit status on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_stream_then_restart_redelivers_nothing_already_done() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), "")
        .replace("[apply]\n", "[apply]\ninstance_id = \"apply-{sink}-0\"\n");
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    let path = write_config(&text);
    let path = path.to_str().unwrap();
    let topic = config.kafka.topic_for("customers");
    let group = config.group_id("postgres");
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let sink = dualsync::pg::connect(&sink_url).await.unwrap();

    // One event per aggregate, so rows in the sink count applied events. Paced load (not
    // synchronisation): the processes are stopped while rows still arrive.
    let writer = {
        let url = source_url.clone();
        tokio::spawn(async move {
            let client = dualsync::pg::connect(&url).await.unwrap();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for chunk in 0..(ROWS / 30) {
                tick.tick().await;
                client
                    .execute(
                        "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
                         SELECT 'customers', 'c' || i, 'CustomerUpserted',
                                jsonb_build_object('id', 'c' || i, 'name', 'n', 'email', 'e',
                                                   'order_count', 0)
                         FROM generate_series($1::int8 * 30, $1::int8 * 30 + 29) i",
                        &[&chunk],
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let log = |name: &str| format!("{}.log", unique(name));
    let mut relay = Proc(spawn(&["relay", "--config", path], &log("relay-a")));
    let mut apply = Proc(spawn(
        &["apply", "--config", path, "--sink", "postgres"],
        &log("apply-a"),
    ));
    eventually("some events are applied", || async {
        count(&sink, "SELECT count(*) FROM replica.customers").await >= 300
    })
    .await;
    stop(&mut relay, "relay");
    stop(&mut apply, "apply");
    assert!(!writer.is_finished(), "stopped after the load: raise ROWS");

    // Relay: every acknowledged message was marked, every marked row is in the topic.
    let published = count(
        &source,
        "SELECT count(*) FROM dualsync.outbox WHERE published_at IS NOT NULL",
    )
    .await;
    let (committed, in_topic) = {
        let (config, group, topic) = (config.clone(), group.clone(), topic.clone());
        tokio::task::spawn_blocking(move || offsets(&config, &group, &topic))
            .await
            .unwrap()
    };
    assert_eq!(
        published, in_topic,
        "published rows vs messages in the topic"
    );
    // Apply: what was written is exactly what was committed.
    let applied = count(&sink, "SELECT count(*) FROM replica.customers").await;
    assert_eq!(committed, applied, "committed offsets vs applied events");
    assert!(applied < ROWS);

    writer.await.unwrap();
    let mut relay = Proc(spawn(&["relay", "--config", path], &log("relay-b")));
    let mut apply = Proc(spawn(
        &["apply", "--config", path, "--sink", "postgres"],
        &log("apply-b"),
    ));
    eventually("the restarted pipeline catches up", || async {
        count(&sink, "SELECT count(*) FROM replica.customers").await == ROWS
    })
    .await;
    eventually("the group commits the end", || {
        let (config, group, topic) = (config.clone(), group.clone(), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || offsets(&config, &group, &topic))
                .await
                .unwrap()
                .0
                == ROWS
        }
    })
    .await;
    // No row was published twice.
    let (_, in_topic) = {
        let (config, group, topic) = (config.clone(), group.clone(), topic.clone());
        tokio::task::spawn_blocking(move || offsets(&config, &group, &topic))
            .await
            .unwrap()
    };
    assert_eq!(
        in_topic, ROWS,
        "messages in the topic: duplicates after restart"
    );
    stop(&mut apply, "apply");
    stop(&mut relay, "relay");
}
