//! A PostgreSQL sink with a column mapping, end to end: the relay and apply run on sample
//! traffic, `customers` lands in a typed column table and `orders` in a document table, and
//! `verify` compares each through the sink's projection (clean after convergence, a changed
//! column found).

use dualsync::reconcile::MismatchKind;

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
    let run = shop_pipeline(MAPPING).await;
    let (config, source, sink) = (&run.config, &run.source, &run.sink);

    dualsync::demo::generate(&run.source_url, 5, 30, 200, 2, 7)
        .await
        .unwrap();
    run.converged().await;

    let replica = run.replica().await;
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
        verify_all(source, sink, config).await,
        [(("customers".to_string(), tampered), MismatchKind::Different)].into()
    );
    run.stop().await;
}
