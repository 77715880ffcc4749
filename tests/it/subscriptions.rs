//! `apply.topics` and `apply.topic_regex`: apply consumes exactly the topics it is told to.

use tokio_util::sync::CancellationToken;

use dualsync::config::{Config, SinkConfig};
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use crate::common::*;

fn with_apply(text: &str, setting: &str) -> Config {
    let text = text.replacen("[apply]\n", &format!("[apply]\n{setting}\n"), 1);
    Config::from_toml(std::path::Path::new("test.toml"), &text, Vec::new()).unwrap()
}

async fn has<S: SinkReader>(sink: &S, aggregate_type: &str, id: &str) -> bool {
    sink.get(aggregate_type, id).await.unwrap().is_some()
}

/// One relay publishes customers and orders (orders first); the PostgreSQL sink's apply
/// lists only the customers topic, the MongoDB sink's apply matches only the orders topic by
/// regex. Each ends up with exactly its topic's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_consumes_exactly_its_listed_topics_or_its_regex() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("m"), "");
    let base = with_apply(&text, "");
    let customers = base.kafka.topic_for("customers");
    let orders_prefix = base.kafka.topic_for("ord");
    let by_list = with_apply(&text, &format!("topics = [\"{customers}\"]"));
    let by_regex = with_apply(
        &text,
        &format!(
            "topic_regex = \"^{}.*\"",
            orders_prefix.replace('.', "\\\\.")
        ),
    );
    source
        .batch_execute(
            r#"INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
               SELECT 'orders', 'o' || i, 'OrderPlaced',
                      jsonb_build_object('id', 'o' || i, 'customer_id', 'c' || i, 'status', 'NEW',
                                         'total_cents', 100, 'lines', '[]'::jsonb)
               FROM generate_series(0, 4) i;
               INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
               SELECT 'customers', 'c' || i, 'CustomerUpserted',
                      jsonb_build_object('id', 'c' || i, 'name', 'n', 'email', 'e', 'order_count', 0)
               FROM generate_series(0, 4) i"#,
        )
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&base, &cancel);
    let (apply_pg, _) = spawn_apply(&by_list, "postgres", &cancel);
    let (apply_mongo, _) = spawn_apply(&by_regex, "mongo", &cancel);
    let SinkConfig::Postgres(pg) = &base.sinks["postgres"] else {
        unreachable!()
    };
    let SinkConfig::Mongodb(mongo) = &base.sinks["mongo"] else {
        unreachable!()
    };
    let pg = PostgresSink::connect(pg).await.unwrap();
    let mongo = MongoSink::connect(mongo).await.unwrap();
    eventually("the listed topic is applied", || async {
        has(&pg, "customers", "c4").await && has(&pg, "customers", "c0").await
    })
    .await;
    eventually("the regex's topic is applied", || async {
        has(&mongo, "orders", "o4").await && has(&mongo, "orders", "o0").await
    })
    .await;
    // The other topic was published before, so a wider subscription would have applied it by
    // now.
    for i in 0..5 {
        assert!(
            !has(&pg, "orders", &format!("o{i}")).await,
            "o{i} in PostgreSQL"
        );
        assert!(
            !has(&mongo, "customers", &format!("c{i}")).await,
            "c{i} in MongoDB"
        );
    }
    cancel.cancel();
    relay.await.unwrap().unwrap();
    apply_pg.await.unwrap().unwrap();
    apply_mongo.await.unwrap().unwrap();
}
