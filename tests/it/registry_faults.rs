//! Registry faults a real registry does not produce on demand, against [`FakeRegistry`]: a
//! registry answering 503 for a while (apply waits, it does not dead-letter), and refused
//! credentials (the local Apicurio runs without authentication). Everything else about the
//! registry is tested against the real one in `registry.rs`.

use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::error::{classify, Disposition};
use dualsync::metrics::total;
use dualsync::sink::SinkReader;

use crate::common::*;
use crate::fake_registry::FakeRegistry;
use crate::registry::{customer, frame_id, publishing_codec, registry_pipeline, registry_section};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_answering_503_is_waited_out_not_dead_lettered() {
    let registry = FakeRegistry::start(None).await;
    let servers = servers();
    let config = registry_pipeline(&servers, &registry.url).await;
    let topic = config.kafka.topic_for("customers");
    let codec = publishing_codec(&config, schemas()).await.unwrap();
    let value = codec
        .encode(&customer(
            "c1",
            1,
            json!({"id": "c1", "name": "n", "email": "e", "order_count": 1}),
        ))
        .unwrap();
    assert_eq!(
        registry.versions(&format!("{topic}-value")),
        [frame_id(&value)]
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let publisher = dualsync::publish::Publisher::new(&config.kafka).unwrap();
    publisher.ensure_topic(&topic).await.unwrap();
    produce_in_order(&producer, &topic, &[("c1", &value)]).await;

    // The registry's leader is away for three requests: apply waits, it does not dead-letter.
    registry.fail_next(3);
    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);
    let sink = postgres_sink(&config).await;
    eventually("c1 is applied", || async {
        matches!(
            sink.get("customers", "c1").await.unwrap(),
            Some((1, Some(_)))
        )
    })
    .await;
    assert_eq!(registry.failures_served(), 3);
    assert_eq!(total(&stats.dead_lettered), 0);
    assert!(total(&stats.retries) >= 1, "the outage shows as retries");
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_sent_and_a_refusal_stops_start_up() {
    let registry = FakeRegistry::start(Some(("dualsync", "right"))).await;
    let servers = servers();
    let with_password = |password: &str| {
        let env = format!("DUALSYNC_TEST_{}", unique("pw").to_uppercase());
        std::env::set_var(&env, password);
        pipeline(
            &servers,
            "postgres://unused",
            "postgres://unused",
            "unused",
            &registry_section(
                &registry.url,
                &format!("username = \"dualsync\"\npassword_env = \"{env}\""),
            ),
        )
    };
    let e = publishing_codec(&with_password("wrong"), schemas())
        .await
        .err()
        .unwrap();
    assert_eq!(classify(&e), Disposition::Fatal, "{e}");
    assert!(e.to_string().contains("401"), "{e}");
    assert!(registry.subjects().is_empty());

    let config = with_password("right");
    publishing_codec(&config, schemas()).await.unwrap();
    assert_eq!(
        registry.subjects(),
        [
            format!("{}-value", config.kafka.topic_for("customers")),
            format!("{}-value", config.kafka.topic_for("orders")),
        ]
    );
}
