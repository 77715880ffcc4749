//! Time-based purge (`retention_secs > 0`): exactly the published rows older than the
//! retention go; recently published and unpublished rows (however old) stay.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use dualsync::source::outbox::{purge_published, AggregateFilter};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_deletes_exactly_the_published_rows_older_than_the_retention() {
    let servers = servers();
    let url = create_database(&servers).await;
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             SELECT 'customers', k, 'CustomerUpserted', '{}'::jsonb
             FROM unnest(ARRAY['old1', 'old2', 'recent', 'unpublished', 'edge']) k;
             UPDATE dualsync.outbox SET published_at = now() - interval '2 hours'
               WHERE aggregateid IN ('old1', 'old2');
             UPDATE dualsync.outbox SET published_at = now() - interval '30 seconds'
               WHERE aggregateid = 'recent';
             UPDATE dualsync.outbox SET published_at = now() - interval '50 seconds'
               WHERE aggregateid = 'edge';",
        )
        .await
        .unwrap();
    let remaining = || async {
        let rows = client
            .query(
                "SELECT aggregateid FROM dualsync.outbox ORDER BY aggregateid",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let cancel = CancellationToken::new();
    let purger = tokio::spawn(purge_published(
        url.clone(),
        AggregateFilter::default(),
        60,
        Duration::from_millis(100),
        cancel.clone(),
    ));
    eventually("the rows published 2 hours ago are purged", || async {
        !remaining().await.contains(&"old1".to_string())
    })
    .await;
    // The same statement saw the others: none of them was past the 60 s retention.
    assert_eq!(remaining().await, ["edge", "recent", "unpublished"]);
    cancel.cancel();
    purger.await.unwrap();
}
