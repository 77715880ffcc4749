//! Issue #35 item 11: the broker refusing to create a topic dualsync needs. A create-topic
//! policy's `PolicyViolation` is a fatal error naming the topic, the settings asked for and
//! what to check, never retried forever; a user without CREATE whose topic an administrator
//! created goes on (the topic exists), and is stopped, told to ask for CREATE, when it does
//! not. Real broker plug-ins (`tests/java/*.java`, compiled against the broker's jars) on a
//! private Kafka node: the policy, and a principal builder naming users by listener, under
//! Kafka's own ACL authorizer.

use std::path::Path;
use std::process::Command;

use rdkafka::types::RDKafkaErrorCode;

use dualsync::error::{classify, Disposition, Error};
use dualsync::publish::Publisher;

use crate::common::*;
use crate::private_kafka::KafkaCluster;

fn kafka_libs() -> String {
    std::env::var("DUALSYNC_TEST_KAFKA_LIBS").expect("DUALSYNC_TEST_KAFKA_LIBS")
}

/// Compiles the broker plug-in `tests/java/<name>.java` into a fresh folder; the folder.
fn compiled_plugin(name: &str) -> std::path::PathBuf {
    let out = std::env::temp_dir().join(unique("broker-plugin"));
    std::fs::create_dir_all(&out).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/java/{name}.java"));
    let status = Command::new("javac")
        .arg("-cp")
        .arg(format!("{}/*", kafka_libs()))
        .arg("-d")
        .arg(&out)
        .arg(source)
        .status()
        .expect("run javac");
    assert!(status.success(), "javac {name}.java failed");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_refused_by_the_clusters_create_topic_policy_is_fatal_and_named() {
    let classes = compiled_plugin("RefuseTopicPolicy");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_that_exists_needs_no_create_permission_and_one_that_does_not_is_fatal() {
    let classes = compiled_plugin("ListenerPrincipalBuilder");
    let client_port = free_port();
    let cluster = KafkaCluster::start_with(
        1,
        &format!(
            "principal.builder.class=ListenerPrincipalBuilder\n\
             authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n\
             super.users=User:admin\nallow.everyone.if.no.acl.found=false\n\
             listeners=PLAINTEXT://127.0.0.1:{{port}},CLIENT://127.0.0.1:{client_port},CONTROLLER://127.0.0.1:{{controller_port}}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{{port}},CLIENT://127.0.0.1:{client_port}\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CLIENT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        ),
        Some(&classes),
    );
    let servers = servers();
    let mut admin_config = pipeline_without_postgres(&servers, &unique("m"));
    admin_config.kafka.brokers = cluster.bootstrap();
    // The administrator creates the topic and lets the application user describe and write it.
    let existing = unique("existing");
    Publisher::new(&admin_config.kafka)
        .unwrap()
        .ensure_topic(&existing)
        .await
        .unwrap();
    let acl = Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", kafka_libs()))
        .args(["org.apache.kafka.tools.AclCommand", "--bootstrap-server"])
        .arg(cluster.bootstrap())
        .args([
            "--add",
            "--allow-principal",
            "User:app",
            "--operation",
            "Describe",
        ])
        .args(["--operation", "Write", "--topic", &existing])
        .output()
        .expect("run AclCommand");
    assert!(
        acl.status.success(),
        "{}",
        String::from_utf8_lossy(&acl.stderr)
    );

    let mut app_config = admin_config.clone();
    app_config.kafka.brokers = format!("127.0.0.1:{client_port}");
    let app = Publisher::new(&app_config.kafka).unwrap();
    app.ensure_topic(&existing)
        .await
        .expect("a topic that exists needs no CREATE");
    let missing = unique("missing");
    let e = app.ensure_topic(&missing).await.unwrap_err();
    assert!(
        matches!(&e, Error::TopicCreation { code: RDKafkaErrorCode::TopicAuthorizationFailed, topic: t, .. } if *t == missing),
        "{e:?}"
    );
    assert_eq!(classify(&e), Disposition::Fatal, "{e}");
    assert!(e.to_string().contains("Grant this user CREATE"), "{e}");
    std::fs::remove_dir_all(&classes).ok();
}
