//! Issue #35 item 11: a broker's create-topic policy refusing a topic dualsync needs
//! (`PolicyViolation`) is a fatal error naming the topic, the settings asked for and what to
//! check, never retried forever nor taken for a topic that exists. The policy is a real
//! broker plug-in (`tests/java/RefuseTopicPolicy.java`, compiled against the broker's jars) on
//! a private Kafka node.

use std::path::Path;
use std::process::Command;

use rdkafka::types::RDKafkaErrorCode;

use dualsync::error::{classify, Disposition, Error};
use dualsync::publish::Publisher;

use crate::common::*;
use crate::private_kafka::KafkaCluster;

/// Compiles the test policy into a fresh folder; the folder.
fn compiled_policy() -> std::path::PathBuf {
    let out = std::env::temp_dir().join(unique("topic-policy"));
    std::fs::create_dir_all(&out).unwrap();
    let libs = std::env::var("DUALSYNC_TEST_KAFKA_LIBS").expect("DUALSYNC_TEST_KAFKA_LIBS");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/java/RefuseTopicPolicy.java");
    let status = Command::new("javac")
        .arg("-cp")
        .arg(format!("{libs}/*"))
        .arg("-d")
        .arg(&out)
        .arg(source)
        .status()
        .expect("run javac");
    assert!(status.success(), "javac RefuseTopicPolicy.java failed");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_refused_by_the_clusters_create_topic_policy_is_fatal_and_named() {
    let classes = compiled_policy();
    let cluster = KafkaCluster::start_with(
        1,
        "create.topic.policy.class.name=RefuseTopicPolicy",
        Some(&classes),
    );
    let servers = servers();
    let mut config = pipeline_without_postgres(&servers, &unique("m"));
    config.kafka.brokers = cluster.bootstrap();
    let publisher = Publisher::new(&config.kafka).unwrap();
    // The policy lets other topics through: the cluster and the plug-in work.
    publisher.ensure_topic(&unique("allowed")).await.unwrap();

    let topic = unique("refused");
    let e = publisher.ensure_topic(&topic).await.unwrap_err();
    assert!(
        matches!(&e, Error::TopicCreation { code: RDKafkaErrorCode::PolicyViolation, topic: t, .. } if *t == topic),
        "{e:?}"
    );
    assert_eq!(classify(&e), Disposition::Fatal, "{e}");
    let text = e.to_string();
    for want in [topic.as_str(), "create-topic policy", "kafka.partitions"] {
        assert!(text.contains(want), "{want:?} not in: {text}");
    }
    std::fs::remove_dir_all(&classes).ok();
}
