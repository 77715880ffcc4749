//! The durability of the topics dualsync writes, on a private three-node cluster with one node
//! down: a topic is never created with fewer replicas than the cluster's default because a
//! broker happens to be down, never with `min.insync.replicas` below 2 on a cluster of three,
//! and an existing topic below that is named in a warning (log and `/status`).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use dualsync::error::{classify, Disposition};
use dualsync::metrics::Metrics;
use dualsync::publish::{KafkaHealth, Publisher};

use crate::common::*;
use crate::kafka::replicas;
use crate::operations::http;
use crate::private_kafka::KafkaCluster;

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap()
}

/// Brokers the cluster's metadata lists (the live, unfenced ones).
fn live_brokers(brokers: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_or(0, |m| m.brokers().len())
}

/// The topic's effective `min.insync.replicas`.
async fn min_insync(brokers: &str, topic: &str) -> Option<String> {
    let results = admin(brokers)
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let resource = results.into_iter().next()?.ok()?;
    resource.get("min.insync.replicas")?.value.clone()
}

async fn create(brokers: &str, topic: &str, replication: i32) {
    let results = admin(brokers)
        .create_topics(
            &[NewTopic::new(
                topic,
                3,
                TopicReplication::Fixed(replication),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// With Kafka's own default `min.insync.replicas = 1` and `default.replication.factor = 3`:
/// a topic first needed while one of three brokers is down is not created with two replicas
/// (it gets three, the down broker's offline, or the creation fails and is retried) and gets
/// `min.insync.replicas = 2`. Topics that exist with less are warned about by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn topics_are_not_created_weaker_while_a_broker_is_down_and_weak_ones_are_named() {
    let servers = servers();
    let mut kafka = KafkaCluster::start_with(
        3,
        "min.insync.replicas=1\ndefault.replication.factor=3",
        None,
    );
    let brokers = kafka.bootstrap();
    let mut config = pipeline_without_postgres(&servers, "x");
    config.kafka.brokers = brokers.clone();
    // Created by an administrator: two replicas; three replicas with one in sync required.
    let two_replicas = config.kafka.topic_for("two_replicas");
    let one_in_sync = config.kafka.topic_for("one_in_sync");
    create(&brokers, &two_replicas, 2).await;
    create(&brokers, &one_in_sync, 3).await;

    kafka.kill(3);
    eventually("the cluster lists two live brokers", || async {
        live_brokers(&brokers) == 2
    })
    .await;
    let metrics = Arc::new(Metrics::new(&config.pipeline.name, "relay"));
    let publisher = Publisher::with_health(
        &config.kafka,
        KafkaHealth::new(metrics.clone(), &config.http),
    )
    .unwrap();
    let topic = config.kafka.topic_for("customers");
    // KRaft places replicas on every registered broker, also a fenced one, so the creation
    // may succeed with the down broker as an offline replica; where it is refused for too
    // few brokers, that is a wait, not an error.
    if let Err(e) = publisher.ensure_topic(&topic).await {
        assert_eq!(classify(&e), Disposition::Retry, "{e}");
    }
    let created = (
        replicas(&brokers, &topic),
        min_insync(&brokers, &topic).await,
    );
    assert!(
        created.0.is_empty() || created == (vec![3, 3, 3], Some("2".to_string())),
        "created {topic} with one broker of three down: replicas {:?}, min.insync.replicas {:?}",
        created.0,
        created.1
    );

    kafka.restart(3);
    eventually("the topic is used once the broker is back", || async {
        publisher.ensure_topic(&topic).await.is_ok()
    })
    .await;
    assert_eq!(replicas(&brokers, &topic), vec![3, 3, 3]);
    assert_eq!(min_insync(&brokers, &topic).await.as_deref(), Some("2"));

    // Existing topics below the bar: used, and named in /status.
    publisher.ensure_topic(&two_replicas).await.unwrap();
    publisher.ensure_topic(&one_in_sync).await.unwrap();
    let cancel = CancellationToken::new();
    let addr = dualsync::http::serve(
        &config.http,
        0,
        "relay",
        &config.pipeline.name,
        metrics.clone(),
        dualsync::http::Control::default(),
        cancel.clone(),
    )
    .await
    .unwrap();
    let status: serde_json::Value =
        serde_json::from_str(&http(addr, "GET", "/status", None).await.1).unwrap();
    let warnings: Vec<String> = status["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    for (name, part) in [
        (&two_replicas, "replication factor 2"),
        (&one_in_sync, "min.insync.replicas 1"),
    ] {
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(name.as_str()) && w.contains(part)),
            "no warning naming {name} with {part:?}: {warnings:?}"
        );
    }
    assert!(
        !warnings.iter().any(|w| w.contains(&topic)),
        "{topic} is as durable as required: {warnings:?}"
    );
    cancel.cancel();
}
