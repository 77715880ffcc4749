//! The outbox slot's health on a cluster of the test's own (1 MB WAL segments, `max_slot_wal_
//! keep_size = 1MB`, two slots at most): a healthy sample, the slot invalidated once the
//! server removed WAL it needed (reported by `sample`, refused by `ensure_wal_setup` with the
//! fatal `SlotLost`), and the refusal when every slot is taken.

use std::sync::Arc;

use dualsync::error::{Error, WalError, WalSetupError};
use dualsync::metrics::Metrics;
use dualsync::source::wal::{setup, slot_health};

use tokio_util::sync::CancellationToken;

use crate::common::{eventually, servers};
use crate::operations::http;
use crate::private_servers::PrivateServer;
use crate::wal_setup::wal_source;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_past_max_slot_wal_keep_size_is_reported_lost_and_refused() {
    servers();
    let server = tokio::task::block_in_place(|| {
        PrivateServer::postgres_configured(
            "--wal-segsize=1",
            &[
                "wal_level = logical",
                "max_replication_slots = 2",
                "max_slot_wal_keep_size = 1MB",
            ],
        )
    });
    let client = dualsync::pg::connect(&server.url()).await.unwrap();
    let source = wal_source(&server.url(), "wal");
    setup::migrate(&client, &source, "p").await.unwrap();

    let healthy = slot_health::sample(&client, &source.slot_name)
        .await
        .unwrap();
    assert!(!healthy.active, "no relay streams it");
    assert_eq!(healthy.wal_status.as_deref(), Some("reserved"));
    assert!(healthy.lost_reason().is_none());
    assert!(healthy.retained_bytes.unwrap() >= 0);
    let metrics = Arc::new(Metrics::new("p", "relay"));
    let lost_gauge = |m: &Metrics| {
        m.wal_slot
            .lost
            .with_label_values(&[&source.slot_name])
            .get()
    };
    slot_health::record(&metrics, &healthy);
    assert_eq!(lost_gauge(&metrics), 0);

    // Nothing confirms the slot's position: WAL written past the keep size, then a
    // checkpoint, invalidates it.
    client
        .batch_execute("CREATE TABLE filler (t text)")
        .await
        .unwrap();
    eventually("the slot is invalidated", || async {
        client
            .batch_execute(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 2000);
                 SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await
            .unwrap();
        let s = slot_health::sample(&client, &source.slot_name)
            .await
            .unwrap();
        s.lost_reason().is_some()
    })
    .await;
    let lost = slot_health::sample(&client, &source.slot_name)
        .await
        .unwrap();
    assert_eq!(lost.wal_status.as_deref(), Some("lost"));
    // The relay's periodic check records it and stops with the fatal error.
    let err = slot_health::watch(
        &client,
        &source.slot_name,
        &metrics,
        std::time::Duration::from_millis(10),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Wal(WalError::SlotLost { .. })),
        "{err:?}"
    );
    assert_eq!(lost_gauge(&metrics), 1);
    let cancel = CancellationToken::new();
    let addr = dualsync::http::serve(
        &Default::default(),
        0,
        "relay",
        "p",
        metrics.clone(),
        Default::default(),
        cancel.clone(),
    )
    .await
    .unwrap();
    let (code, body) = http(addr, "GET", "/status", None).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["wal_slot"]["lost"], true, "{status}");
    assert_eq!(status["wal_slot"]["wal_status"], "lost", "{status}");
    assert!(
        status["warnings"][0].as_str().unwrap().contains("is lost"),
        "{status}"
    );
    let (_, text) = http(addr, "GET", "/metrics", None).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("dualsync_wal_slot_lost{")
                && l.contains(&source.slot_name)
                && l.ends_with(" 1")),
        "{text}"
    );
    cancel.cancel();
    let err = setup::ensure_wal_setup(&client, &source).await.unwrap_err();
    assert!(
        matches!(&err, Error::Wal(WalError::SlotLost { slot, .. }) if *slot == source.slot_name),
        "{err:?}"
    );
    assert_eq!(err.class(), "source.slot_lost");
    assert_eq!(
        dualsync::error::classify(&err),
        dualsync::error::Disposition::Fatal
    );

    // The lost slot still counts against max_replication_slots = 2: one more fits, then none.
    setup::migrate(&client, &wal_source(&server.url(), "wal"), "p")
        .await
        .unwrap();
    let err = setup::ensure_wal_setup(&client, &wal_source(&server.url(), "wal"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::WalSetup(WalSetupError::SlotsExhausted {
                max: 2,
                used: 2,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("max_replication_slots"), "{err}");
}
