//! Schema skew without a registry: an apply started with an older schemas folder meets events
//! written with a newer schema (single-object frames whose fingerprint it does not know). It
//! reads its folder again and applies them, and keeps decoding the events written with the
//! schema the folder no longer holds; nothing is dead-lettered.

use std::path::Path;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::codec::SchemaStore;
use dualsync::config::SinkConfig;
use dualsync::metrics::total;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use crate::common::*;

fn copy_schemas(to: &Path, customers: &str) {
    std::fs::create_dir_all(to).unwrap();
    let from = Path::new(&schemas_dir()).to_path_buf();
    std::fs::copy(from.join("orders.avsc"), to.join("orders.avsc")).unwrap();
    std::fs::write(to.join("customers.avsc"), customers).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_reads_its_schemas_folder_again_for_an_unknown_fingerprint() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let mut config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    let original =
        std::fs::read_to_string(Path::new(&schemas_dir()).join("customers.avsc")).unwrap();
    let mut evolved: serde_json::Value = serde_json::from_str(&original).unwrap();
    evolved["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "tier", "type": ["null", "string"], "default": null}));
    let evolved = serde_json::to_string_pretty(&evolved).unwrap();
    let apply_dir = std::env::temp_dir().join(unique("apply-schemas"));
    let writer_dir = std::env::temp_dir().join(unique("writer-schemas"));
    copy_schemas(&apply_dir, &original);
    copy_schemas(&writer_dir, &evolved);
    config.encoding.schemas_dir = apply_dir.clone();
    let old_writer = SchemaStore::load_dir(&apply_dir).unwrap();
    let new_writer = SchemaStore::load_dir(&writer_dir).unwrap();

    let (topic, producer) = topic_with_producer(&config, "customers").await;
    let customer = |id: &str, tier: Option<&str>| {
        let mut payload = json!({"id": id, "name": "n", "email": "e", "order_count": 1});
        if let Some(t) = tier {
            payload["tier"] = json!(t);
        }
        customer_event(id, 1, Some(payload))
    };
    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);
    let SinkConfig::Postgres(p) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(p).await.unwrap();

    let c1 = old_writer.encode(&customer("c1", None)).unwrap();
    produce_in_order(&producer, &topic, &[("c1", &c1)]).await;
    eventually(
        "an event of the schema apply started with is applied",
        || async { sink.get("customers", "c1").await.unwrap().is_some() },
    )
    .await;

    // The new schema is deployed to apply's folder; the writer uses it from now on.
    std::fs::write(apply_dir.join("customers.avsc"), &evolved).unwrap();
    let c2 = new_writer.encode(&customer("c2", Some("gold"))).unwrap();
    let c3 = old_writer.encode(&customer("c3", None)).unwrap();
    produce_in_order(&producer, &topic, &[("c2", &c2), ("c3", &c3)]).await;
    eventually(
        "events of the new and of the replaced schema are applied",
        || async {
            sink.get("customers", "c2").await.unwrap().is_some()
                && sink.get("customers", "c3").await.unwrap().is_some()
        },
    )
    .await;
    assert_eq!(
        sink.get("customers", "c2")
            .await
            .unwrap()
            .unwrap()
            .1
            .unwrap()["tier"],
        json!("gold")
    );
    assert_eq!(total(&stats.dead_lettered), 0, "nothing dead-lettered");
    cancel.cancel();
    apply.await.unwrap().unwrap();
    std::fs::remove_dir_all(apply_dir).ok();
    std::fs::remove_dir_all(writer_dir).ok();
}
