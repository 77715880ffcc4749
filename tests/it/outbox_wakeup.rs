//! How writers wake the relay without serialising their commits: a NOTIFY makes PostgreSQL
//! commit notifying transactions one at a time, so the outbox trigger notifies only a relay
//! that waits (it holds its wait lock), and a writer that skipped the notification keeps the
//! relay from starting to wait until that writer's row is committed.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, GenericClient};
use tokio_util::sync::CancellationToken;

use dualsync::source::outbox::{NOTIFY_CHANNEL, WAIT_LOCK_CLASS};

use crate::common::*;

/// A session LISTENing on the outbox channel: the payloads it receives, in commit order.
async fn listener(url: &str) -> (Client, mpsc::UnboundedReceiver<String>) {
    let (client, mut connection) = dualsync::pg::connect_raw(url).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
        .unwrap();
    (client, rx)
}

async fn next_notification(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no notification within 10 s")
        .expect("listener gone")
}

async fn insert(client: &impl GenericClient, id: &str) {
    client
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('customers', $1, 'CustomerUpserted', '{}')",
            &[&id],
        )
        .await
        .unwrap();
}

/// Notifications that arrive before `marker`, a NOTIFY the test sends after the inserts in
/// question committed: notifications are delivered in commit order, so this needs no wait.
async fn notifications_before_marker(
    client: &Client,
    rx: &mut mpsc::UnboundedReceiver<String>,
) -> usize {
    client
        .batch_execute(&format!("NOTIFY {NOTIFY_CHANNEL}, 'marker'"))
        .await
        .unwrap();
    let mut before = 0;
    while next_notification(rx).await != "marker" {
        before += 1;
    }
    before
}

async fn try_wait_lock(relay: &Client, key: i32) -> bool {
    relay
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&WAIT_LOCK_CLASS, &key],
        )
        .await
        .unwrap()
        .get(0)
}

/// Sessions holding a relay wait lock in this database (relays waiting for work).
async fn relays_waiting(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
             AND classid = $1::int4::oid AND granted AND mode = 'ExclusiveLock'
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&WAIT_LOCK_CLASS],
        )
        .await
        .unwrap()
        .get(0)
}

/// The trigger's side of the protocol, played by hand: a session stands in for the relay.
/// Fails on the trigger that notified on every insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_notify_only_a_relay_that_waits_and_a_relay_waits_only_after_they_commit() {
    let servers = servers();
    let url = create_database(&servers).await;
    let writer = dualsync::pg::connect(&url).await.unwrap();
    dualsync::source::outbox::migrate(&writer).await.unwrap();
    let (_listening, mut notifications) = listener(&url).await;

    // No relay registered (an outbox older than the relays table, or none started yet):
    // every insert notifies.
    insert(&writer, "c1").await;
    assert_eq!(
        notifications_before_marker(&writer, &mut notifications).await,
        1
    );

    let key = 4242;
    let relay = dualsync::pg::connect(&url).await.unwrap();
    relay
        .execute(
            "INSERT INTO dualsync.outbox_relays (lock_key, pipeline) VALUES ($1, 'by-hand')",
            &[&key],
        )
        .await
        .unwrap();
    // The relay is busy (it does not hold its wait lock): no NOTIFY, no serialised commit.
    insert(&writer, "c2").await;
    assert_eq!(
        notifications_before_marker(&writer, &mut notifications).await,
        0,
        "an insert notified while no relay waited"
    );

    // The relay waits: the next insert wakes it.
    assert!(try_wait_lock(&relay, key).await);
    insert(&writer, "c3").await;
    assert_eq!(next_notification(&mut notifications).await, "");
    relay
        .query_one(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&WAIT_LOCK_CLASS, &key],
        )
        .await
        .unwrap();

    // A writer that skipped the notification (the relay was busy) and has not committed yet
    // keeps the relay from waiting: otherwise its commit would wake no one.
    let mut open = dualsync::pg::connect(&url).await.unwrap();
    let tx = open.transaction().await.unwrap();
    insert(&tx, "c4").await;
    assert!(
        !try_wait_lock(&relay, key).await,
        "the relay could start waiting while an unnotified row was uncommitted"
    );
    tx.commit().await.unwrap();
    assert!(
        try_wait_lock(&relay, key).await,
        "free once the writer committed"
    );
}

/// The relay's side, with a poll interval of ten minutes so that only the protocol can bring
/// rows out: a row written while the relay was busy, whose transaction is still open when the
/// relay runs out of work, is published as soon as it commits (the relay looks again shortly
/// while it cannot take its wait lock); and a row written while it waits wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_while_the_relay_turns_idle_is_published_without_waiting_for_the_poll() {
    let servers = servers();
    let url = create_database(&servers).await;
    let mut config = pipeline(&servers, &url, &url, &unique("t"), "");
    if let Some(dualsync::config::SourceConfig::PostgresOutbox(s)) = &mut config.source {
        s.poll_interval_ms = 600_000;
    }
    let writer = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&writer).await.unwrap();
    let control = dualsync::http::Control::default();
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay_controlled(&config, &cancel, control.clone());
    insert(&writer, "c1").await;
    let published = |n: i64| {
        let writer = &writer;
        async move {
            let (total, unpublished) = dualsync::demo::outbox_counts(writer).await.unwrap();
            total == n && unpublished == 0
        }
    };
    eventually("c1 is published", || published(1)).await;

    // Paused, the relay neither reads nor waits: a writer now finds it busy, skips the
    // notification and holds the relay off its wait lock until it commits.
    control.set_paused(true);
    eventually("the paused relay stops waiting", || async {
        relays_waiting(&writer).await == 0
    })
    .await;
    let mut open = dualsync::pg::connect(&url).await.unwrap();
    let tx = open.transaction().await.unwrap();
    insert(&tx, "c2").await;
    control.set_paused(false);
    tx.commit().await.unwrap();
    // Within the 90 s deadline, against a poll of ten minutes.
    eventually("c2 is published at its commit, not at the poll", || {
        published(2)
    })
    .await;

    // Waiting again: a new row wakes it.
    eventually("the relay waits", || async {
        relays_waiting(&writer).await == 1
    })
    .await;
    insert(&writer, "c3").await;
    eventually("c3 is published", || published(3)).await;
    cancel.cancel();
    relay.await.unwrap().unwrap();
}

/// Index and table scans of `dualsync.outbox` so far (what the relay's reads cost).
async fn outbox_scans(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::int8 FROM pg_stat_user_tables
             WHERE schemaname = 'dualsync' AND relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// An outbox migrated before `dualsync.outbox_relays` existed: every insert notifies, as it
/// always did, and the idle relay waits for that instead of reading again and again (the
/// first version of the wait lock spun there: it never counted itself as waiting without a
/// lock to take).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_an_outbox_without_the_relays_table_the_idle_relay_waits_for_notify() {
    let servers = servers();
    let url = create_database(&servers).await;
    let mut config = pipeline(&servers, &url, &url, &unique("t"), "");
    if let Some(dualsync::config::SourceConfig::PostgresOutbox(s)) = &mut config.source {
        s.poll_interval_ms = 600_000;
    }
    let writer = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&writer).await.unwrap();
    // The outbox as the version before wrote it: a NOTIFY on every insert, no relays table.
    writer
        .batch_execute(
            "DROP TABLE dualsync.outbox_relays;
             CREATE OR REPLACE FUNCTION dualsync.outbox_notify() RETURNS trigger
             LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pg_notify('dualsync_outbox', '');
                 RETURN NULL;
             END
             $$;",
        )
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    insert(&writer, "c1").await;
    eventually("c1 is published", || async {
        dualsync::demo::outbox_counts(&writer).await.unwrap() == (1, 0)
    })
    .await;
    // Idle now. A relay waiting on NOTIFY reads nothing in between (its backlog sample, every
    // 5 s, may scan once); one that spins reads thousands of times a second.
    let before = outbox_scans(&writer).await;
    // Workload shape, not synchronisation: an idle interval to count the reads in (the
    // statistics reach the view about once a second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_reads = outbox_scans(&writer).await - before;
    assert!(
        idle_reads < 20,
        "the idle relay read the outbox {idle_reads} times in 3 s"
    );
    insert(&writer, "c2").await;
    eventually(
        "c2 is published by NOTIFY, within the deadline, not at the poll",
        || async { dualsync::demo::outbox_counts(&writer).await.unwrap() == (2, 0) },
    )
    .await;
    cancel.cancel();
    relay.await.unwrap().unwrap();
}
