//! The relay's outward contract on the real servers: it wakes on NOTIFY, keys land where
//! Java's producer puts them, and every event carries its headers.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::message::OwnedHeaders;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

use dualsync::publish::{headers, Outgoing, Publisher};

use crate::common::*;
use crate::pipeline_scope::with_source;

async fn outbox_source(servers: &Servers) -> (String, tokio_postgres::Client) {
    let url = create_database(servers).await;
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    (url, client)
}

async fn insert_customer(client: &tokio_postgres::Client, id: &str) {
    client
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload, traceparent)
             VALUES ('customers', $1, 'CustomerUpserted',
                     jsonb_build_object('id', $1::text, 'name', 'n', 'email', 'e', 'order_count', 0),
                     '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')",
            &[&id],
        )
        .await
        .unwrap();
}

/// With a poll interval of ten minutes only the trigger's NOTIFY can bring a new row out
/// within seconds (measured well under a second; the deadline leaves room for a loaded CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_wakes_the_relay_despite_a_poll_interval_of_minutes() {
    let servers = servers();
    let (url, client) = outbox_source(&servers).await;
    let config = parse_config(&with_source(
        &pipeline_toml(&servers, &url, &url, &unique("m"), "")
            .replace("poll_interval_ms = 200\n", ""),
        "poll_interval_ms = 600000",
    ));
    assert_eq!(config.outbox_source().unwrap().poll_interval_ms, 600_000);
    insert_customer(&client, "c1").await;
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    let topic = config.kafka.topic_for("customers");
    // c1 is read at start-up; afterwards the relay is idle, waiting on NOTIFY or the poll.
    assert_eq!(read_topic(&config.kafka.brokers, &topic, 1).await.len(), 1);
    eventually("c1 is marked", || async {
        dualsync::demo::outbox_counts(&client).await.unwrap().1 == 0
    })
    .await;
    let written = Instant::now();
    insert_customer(&client, "c2").await;
    let deadline = written + Duration::from_secs(5);
    while dualsync::demo::outbox_counts(&client).await.unwrap().1 > 0 {
        assert!(
            Instant::now() < deadline,
            "c2 not published 5 s after its insert with a 10-minute poll: NOTIFY did not wake the relay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    relay.await.unwrap().unwrap();
}

fn parse_config(text: &str) -> dualsync::config::Config {
    dualsync::config::Config::from_toml(std::path::Path::new("test.toml"), text, Vec::new())
        .unwrap()
}

/// Kafka's Java client partitions a keyed record by `toPositive(murmur2(key)) % partitions`
/// (computed here by kafka-clients itself, in tests/java/Murmur.java).
fn java_partitions(keys: &[String], partitions: i32) -> Vec<i32> {
    let libs = std::env::var("DUALSYNC_TEST_KAFKA_LIBS")
        .expect("DUALSYNC_TEST_KAFKA_LIBS (Kafka's jars) is not set: source .local/env");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/java/Murmur.java");
    let mut child = Command::new("java")
        .args(["-cp", &format!("{libs}/*"), source])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run java");
    let mut input = format!("{partitions}\n");
    for k in keys {
        input.push_str(k);
        input.push('\n');
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "Murmur.java failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let got: Vec<(String, i32)> = text
        .lines()
        .map(|l| {
            let (k, p) = l.rsplit_once(' ').unwrap();
            (k.to_string(), p.parse().unwrap())
        })
        .collect();
    assert_eq!(got.len(), keys.len());
    got.into_iter()
        .zip(keys)
        .map(|((k, p), key)| {
            assert_eq!(&k, key);
            p
        })
        .collect()
}

/// A Java producer writing the same aggregate must land in the same partition, or the two
/// would interleave one aggregate's events across partitions and lose their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_events_land_in_the_partition_of_javas_default_partitioner() {
    let servers = servers();
    let text = pipeline_toml(&servers, "postgres://h/db", "postgres://h/db", "m", "")
        .replace("partitions = 3", "partitions = 7");
    let config = parse_config(&text);
    let topic = config.kafka.topic_for("keys");
    let keys: Vec<String> = (0..1000)
        .map(|i| format!("agg-{i}-{}", "é".repeat(i % 3)))
        .collect();
    let publisher = Publisher::new(&config.kafka).unwrap();
    publisher.ensure_topic(&topic).await.unwrap();
    let messages = keys
        .iter()
        .map(|k| Outgoing {
            topic: topic.clone(),
            key: Some(k.as_bytes().to_vec()),
            value: b"v".to_vec(),
            headers: OwnedHeaders::new(),
        })
        .collect();
    publisher.publish_all(messages).await.unwrap();
    let consumed = read_topic(&config.kafka.brokers, &topic, keys.len()).await;
    let by_key: std::collections::HashMap<String, i32> = consumed
        .iter()
        .map(|m| {
            (
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                m.partition(),
            )
        })
        .collect();
    let java = java_partitions(&keys, 7);
    let differing: Vec<_> = keys
        .iter()
        .zip(&java)
        .filter(|(k, p)| by_key.get(*k) != Some(p))
        .take(5)
        .collect();
    assert!(
        differing.is_empty(),
        "dualsync vs Java partition: {differing:?}"
    );
    assert_eq!(by_key.len(), 1000);
}

/// Every header a consumer may rely on, with the values of the row it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_carries_the_dualsync_headers_and_traceparent_of_its_row() {
    let servers = servers();
    let (url, client) = outbox_source(&servers).await;
    let config = pipeline(&servers, &url, &url, &unique("m"), "");
    insert_customer(&client, "c1").await;
    let row = client
        .query_one(
            "SELECT seq, id::text, (extract(epoch FROM created_at) * 1000000)::int8
             FROM dualsync.outbox",
            &[],
        )
        .await
        .unwrap();
    let (seq, id, created): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    let m = read_topic(
        &config.kafka.brokers,
        &config.kafka.topic_for("customers"),
        1,
    )
    .await
    .remove(0);
    let expected = [
        (headers::EVENT_ID, id),
        (headers::EVENT_TYPE, "CustomerUpserted".to_string()),
        (headers::AGGREGATE_TYPE, "customers".to_string()),
        (headers::AGGREGATE_ID, "c1".to_string()),
        (headers::VERSION, seq.to_string()),
        (headers::CREATED_AT, created.to_string()),
        (
            headers::TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
        ),
    ];
    for (name, value) in expected {
        assert_eq!(header(&m, name).as_deref(), Some(value.as_str()), "{name}");
    }
    assert_eq!(m.key(), Some(&b"c1"[..]));
    cancel.cancel();
    relay.await.unwrap().unwrap();
}
