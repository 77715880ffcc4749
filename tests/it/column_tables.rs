//! A PostgreSQL sink with a column mapping, end to end: the relay and apply run on sample
//! traffic, `customers` lands in a typed column table and `orders` in a document table, and
//! `verify` compares each through the sink's projection (clean after convergence, a changed
//! column found).

use tokio_util::sync::CancellationToken;

use dualsync::config::SinkConfig;
use dualsync::reconcile::MismatchKind;
use dualsync::sink::postgres::PostgresSink;

use crate::common::*;

const MAPPING: &str = r#"
[sinks.postgres.tables.customers]
table = "customer_rows"
key_column = "customer_id"
columns = [
  { name = "full_name", type = "text", field = "name" },
  { name = "email", type = "text" },
  { name = "order_count", type = "bigint" },
]
[reconcile.customers]
table = "shop.customers"
[reconcile.orders]
table = "shop.orders"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn column_mapped_tables_fill_from_the_pipeline_and_verify_through_the_projection() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &source_url, &sink_url, &unique("t"), MAPPING);
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    let (apply, _) = spawn_apply(&config, "postgres", &cancel);
    let SinkConfig::Postgres(pg) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(pg).await.unwrap();

    dualsync::demo::generate(&source_url, 5, 30, 200, 2, 7)
        .await
        .unwrap();
    eventually("verify finds both tables in step", || async {
        verify_all(&source, &sink, &config).await.is_empty()
    })
    .await;

    let replica = dualsync::pg::connect(&sink_url).await.unwrap();
    let copied = replica
        .query_one(
            "SELECT count(*) FILTER (WHERE NOT deleted),
                    count(*) FILTER (WHERE NOT deleted AND full_name IS NOT NULL AND email IS NOT NULL)
             FROM replica.customer_rows",
            &[],
        )
        .await
        .unwrap();
    let (live, filled): (i64, i64) = (copied.get(0), copied.get(1));
    let primary: i64 = source
        .query_one("SELECT count(*) FROM shop.customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((live, filled), (primary, primary));
    let orders_is_document_table: bool = replica
        .query_one(
            "SELECT count(*) = 1 FROM information_schema.columns
             WHERE table_schema = 'replica' AND table_name = 'orders' AND column_name = 'doc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        orders_is_document_table,
        "unmapped aggregate types keep document tables"
    );

    // A mapped column changed behind the pipeline's back is found.
    let tampered: String = replica
        .query_one(
            "UPDATE replica.customer_rows SET email = 'tampered'
             WHERE customer_id = (SELECT min(customer_id) FROM replica.customer_rows WHERE NOT deleted)
             RETURNING customer_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        verify_all(&source, &sink, &config).await,
        [(("customers".to_string(), tampered), MismatchKind::Different)].into()
    );
    cancel.cancel();
    relay.await.unwrap().unwrap();
    apply.await.unwrap().unwrap();
}
