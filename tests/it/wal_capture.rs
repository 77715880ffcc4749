//! The outbox's WAL capture (`capture = "wal"`) as a source, on the real PostgreSQL: commit
//! order without the writers' lock, the slot confirmed only past acknowledged transactions,
//! redelivery after a crash, an idle outbox in a busy database holding no WAL, `dualsync.emit`
//! messages, the hand-over between relays, and the switch from polling.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use dualsync::config::{Config, OutboxSourceConfig};
use dualsync::metrics::Health;
use dualsync::source::outbox::OutboxRow;
use dualsync::source::wal::{setup, version, WalSource};
use dualsync::source::Source;

use crate::common::*;
use crate::pipeline_scope::with_source;

/// A fresh database with the sample shop and the outbox, a pipeline on it in WAL mode, and
/// its slot (dropped when this is dropped: a forgotten slot pins the shared server's WAL).
pub struct WalOutbox {
    pub servers: Servers,
    pub url: String,
    pub client: tokio_postgres::Client,
    pub config: Config,
    pub slot: SlotGuard,
}

impl WalOutbox {
    pub fn source(&self) -> &OutboxSourceConfig {
        self.config.outbox_source().unwrap()
    }
}

/// Drops the slot at the end of a test, also a failed one.
pub struct SlotGuard {
    url: String,
    pub name: String,
}

impl SlotGuard {
    pub fn new(url: &str, name: &str) -> Self {
        Self {
            url: url.to_string(),
            name: name.to_string(),
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let Ok(client) = dualsync::pg::connect(&url).await else {
                    return;
                };
                // Still active for a moment after its relay let go, or for good when a failed
                // test left its relay running: its walsender is ended, then the slot dropped
                // before the relay is back.
                dualsync::demo::wait_until(Duration::from_secs(30), || async {
                    let _ = client
                        .execute(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                             WHERE slot_name = $1 AND active",
                            &[&name],
                        )
                        .await;
                    let _ = client
                        .execute(
                            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                             WHERE slot_name = $1 AND NOT active",
                            &[&name],
                        )
                        .await;
                    client
                        .query_one(
                            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                            &[&name],
                        )
                        .await
                        .is_ok_and(|r| r.get::<_, i64>(0) == 0)
                })
                .await;
            });
        });
        let _ = dropped.join();
    }
}

/// The product's set-up for WAL mode (`dualsync outbox migrate` with `capture = "wal"`): the
/// publication, the slot, and the writers' trigger without the per-aggregate lock (so commit
/// order differs from `seq` order) whose rows are born marked.
pub async fn wal_outbox(extra_source: &str) -> WalOutbox {
    let servers = servers();
    let url = create_database(&servers).await;
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    let slot = unique("dswal");
    let mut base = pipeline_toml(&servers, &url, &url, &unique("m"), "");
    if extra_source.contains("batch_size") {
        base = base.replace("batch_size = 200\n", "");
    }
    let text = with_source(
        &base,
        &format!(
            "capture = \"wal\"\nslot_name = \"{slot}\"\npublication = \"{slot}\"\nlease_secs = 6\n{extra_source}"
        ),
    );
    let config = Config::from_toml(std::path::Path::new("test.toml"), &text, Vec::new()).unwrap();
    let guard = SlotGuard::new(&url, &slot);
    migrate_wal(&client, &config).await;
    WalOutbox {
        servers,
        url: url.clone(),
        client,
        config,
        slot: guard,
    }
}

/// `dualsync outbox migrate` for a pipeline with `capture = "wal"`.
pub async fn migrate_wal(client: &tokio_postgres::Client, config: &Config) {
    let source = config.outbox_source().unwrap();
    let done = setup::migrate(client, source, &config.pipeline.name)
        .await
        .unwrap();
    assert_eq!(done.writers, setup::WritersTrigger::Unlocked);
}

pub async fn insert(client: &impl tokio_postgres::GenericClient, id: &str, name: &str) {
    let payload = serde_json::json!({"id": id, "name": name, "email": "e", "order_count": 0});
    client
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES ('customers', $1, 'CustomerUpserted', $2)",
            &[&id, &payload],
        )
        .await
        .unwrap();
}

async fn lead(w: &WalOutbox) -> WalSource {
    WalSource::acquire_leadership(
        w.source(),
        &w.config.pipeline.name,
        &Health::default(),
        &CancellationToken::new(),
    )
    .await
    .unwrap()
    .expect("leads")
}

/// Batches until `n` events arrived.
async fn take(source: &mut WalSource, n: usize) -> Vec<OutboxRow> {
    let mut rows = Vec::new();
    let cancel = CancellationToken::new();
    tokio::time::timeout(DEADLINE, async {
        while rows.len() < n {
            rows.extend(source.next_batch(&cancel).await.unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} of {n} events arrived", rows.len()));
    rows
}

fn name(row: &OutboxRow) -> String {
    serde_json::from_str::<serde_json::Value>(row.payload.as_deref().unwrap()).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (confirmed_flush_lsn, restart_lsn) of the slot.
pub async fn slot_position(client: &tokio_postgres::Client, slot: &str) -> (u64, u64) {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let lsn = |i| version::parse_lsn(&row.get::<_, String>(i)).unwrap();
    (lsn(0), lsn(1))
}

async fn current_lsn(client: &tokio_postgres::Client) -> u64 {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    version::parse_lsn(&text).unwrap()
}

/// Without the writers' lock, a transaction that wrote first and committed last is handed
/// out last, with the higher version; the slot moves past a transaction only once all its
/// events are acknowledged, and what was not acknowledged comes again after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_order_without_the_lock_and_the_slot_moves_only_after_the_ack() {
    let w = wal_outbox("batch_size = 2").await;
    let mut source = lead(&w).await;
    let (start, _) = slot_position(&w.client, &w.slot.name).await;

    let mut c1 = dualsync::pg::connect(&w.url).await.unwrap();
    let t1 = c1.transaction().await.unwrap();
    insert(&t1, "x", "wrote-first").await;
    let mut c2 = dualsync::pg::connect(&w.url).await.unwrap();
    let t2 = c2.transaction().await.unwrap();
    insert(&t2, "x", "committed-first").await;
    insert(&t2, "x", "committed-first-again").await;
    insert(&t2, "y", "y").await;
    t2.commit().await.unwrap();
    t1.commit().await.unwrap();

    let first = take(&mut source, 2).await;
    assert_eq!(first.len(), 2, "batch_size");
    // The commit LSN is the version's high bits (docs/wal-capture.md#versions).
    let commit_of = |row: &OutboxRow| ((row.seq as u64) >> version::POSITION_BITS) << 3;
    let t2_commit = commit_of(&first[0]);
    let rest = take(&mut source, 2).await;
    let all: Vec<OutboxRow> = first.iter().chain(&rest).cloned().collect();
    let names: Vec<String> = all.iter().map(name).collect();
    assert_eq!(
        names,
        [
            "committed-first",
            "committed-first-again",
            "y",
            "wrote-first"
        ]
    );
    let x: Vec<i64> = all
        .iter()
        .filter(|r| r.aggregate_id == "x")
        .map(|r| r.seq)
        .collect();
    assert!(
        x.windows(2).all(|p| p[0] < p[1]),
        "versions follow commit order: {x:?}"
    );
    assert!(all.iter().all(|r| r.seq >= source.first_version()));

    let t1_commit = commit_of(&all[3]);
    assert!(t2_commit < t1_commit);
    // Half of T2 acknowledged: the slot does not pass T2's commit.
    source.ack(&first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = slot_position(&w.client, &w.slot.name).await.0;
    assert!(
        start <= held && held <= t2_commit,
        "{held:X} past T2's commit {t2_commit:X}"
    );

    // A crash now: T2 and T1 come again, the same events at the same versions.
    drop(source);
    let mut again = lead(&w).await;
    let redelivered = take(&mut again, 4).await;
    let key = |rows: &[OutboxRow]| rows.iter().map(|r| (r.id, r.seq)).collect::<Vec<_>>();
    assert_eq!(key(&redelivered), key(&all));
    again.ack(&redelivered[..3]).await.unwrap();
    eventually(
        "the slot moves past T2, whose events are all acknowledged",
        || async { slot_position(&w.client, &w.slot.name).await.0 > t2_commit },
    )
    .await;
    assert!(
        slot_position(&w.client, &w.slot.name).await.0 <= t1_commit,
        "T1 is not acknowledged"
    );
    drop(again);
    let mut third = lead(&w).await;
    let last = take(&mut third, 1).await;
    assert_eq!(key(&last), key(&all[3..]), "only T1 is left");
    third.ack(&last).await.unwrap();
    eventually("the slot moves past T1", || async {
        slot_position(&w.client, &w.slot.name).await.0 > t1_commit
    })
    .await;
}

/// The classic "WAL fills the disk on an idle slot": the outbox is idle while another table
/// takes megabytes of writes; the relay confirms the server's keepalive positions, so the
/// slot follows and the WAL it retains stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_outbox_in_a_busy_database_holds_no_wal() {
    let w = wal_outbox("").await;
    let mut source = lead(&w).await;
    let before = current_lsn(&w.client).await;
    w.client
        .batch_execute("CREATE TABLE filler (id int, pad text)")
        .await
        .unwrap();
    for _ in 0..10 {
        w.client
            .batch_execute(
                "INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, 1000) g",
            )
            .await
            .unwrap();
    }
    let after = current_lsn(&w.client).await;
    assert!(
        after - before > 8 << 20,
        "wrote {} bytes of WAL",
        after - before
    );
    // The idle relay waits for events; the positions are taken meanwhile.
    let cancel = CancellationToken::new();
    let waiting = async {
        let batch = source.next_batch(&cancel).await.unwrap();
        panic!("no outbox event was written, got {batch:?}");
    };
    let slot = w.slot.name.clone();
    let followed = async {
        eventually(
            "the slot confirms past the other table's writes",
            || async { slot_position(&w.client, &slot).await.0 >= after },
        )
        .await;
        // The WAL kept for the slot starts after most of those writes once the server logged
        // its next running-transactions record (at most 15 s apart with traffic).
        eventually(
            "the slot's retained WAL no longer holds the writes",
            || async { slot_position(&w.client, &slot).await.1 > before + ((after - before) / 2) },
        )
        .await;
    };
    tokio::select! {
        _ = waiting => unreachable!(),
        _ = followed => {}
    }
}

/// `pg_logical_emit_message(true, 'dualsync', …)` (what `dualsync.emit` writes) is an event
/// like an outbox row, ordered with the transaction's other events; without an `id` it gets
/// one derived from its WAL position, the same when streamed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dualsync_messages_are_events_ordered_with_the_transaction() {
    let w = wal_outbox("").await;
    let mut source = lead(&w).await;
    let mut c = dualsync::pg::connect(&w.url).await.unwrap();
    let t = c.transaction().await.unwrap();
    insert(&t, "m", "row").await;
    t.execute(
        "SELECT pg_logical_emit_message(true, 'dualsync', $1::text)",
        &[&serde_json::json!({"aggregatetype": "customers", "aggregateid": "m", "type": "CustomerUpserted",
            "payload": {"id": "m", "name": "message", "email": "e", "order_count": 0}}).to_string()],
    )
    .await
    .unwrap();
    t.execute(
        "SELECT pg_logical_emit_message(true, 'another-app', 'ignored')",
        &[],
    )
    .await
    .unwrap();
    t.commit().await.unwrap();
    let rows = take(&mut source, 2).await;
    assert_eq!(
        rows.iter().map(name).collect::<Vec<_>>(),
        ["row", "message"]
    );
    assert!(rows[0].seq < rows[1].seq);
    assert!(rows[1].committed_at_micros > 0);
    drop(source);
    let mut again = lead(&w).await;
    let rows_again = take(&mut again, 2).await;
    assert_eq!(rows_again[1].id, rows[1].id, "the derived id is stable");
}

/// One relay streams the slot: a second waits as standby (the leader lock) and leads once
/// the first is gone, from the first one's confirmed position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_waits_and_takes_over_where_the_leader_confirmed() {
    let w = wal_outbox("").await;
    let mut leader = lead(&w).await;
    insert(&w.client, "a", "1").await;
    let first = take(&mut leader, 1).await;
    leader.ack(&first).await.unwrap();
    let cancel = CancellationToken::new();
    let standby = {
        let (config, pipeline, cancel) = (
            w.source().clone(),
            w.config.pipeline.name.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            WalSource::acquire_leadership(&config, &pipeline, &Health::default(), &cancel).await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !standby.is_finished(),
        "the standby waits while the leader leads"
    );
    insert(&w.client, "a", "2").await;
    let _unacked = take(&mut leader, 1).await;
    drop(leader);
    let mut new = tokio::time::timeout(DEADLINE, standby)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .expect("the standby leads");
    let rows = take(&mut new, 1).await;
    assert_eq!(
        rows.iter().map(name).collect::<Vec<_>>(),
        ["2"],
        "the unacknowledged event, not the acknowledged one"
    );
}

/// Switching a pipeline from polling: rows polling left unpublished are published first,
/// from the table, with their `seq`, and every event from the WAL has a higher version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_switch_from_polling_unpublished_rows_come_first_and_new_versions_are_higher() {
    let servers = servers();
    let url = create_database(&servers).await;
    let client = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::setup(&client).await.unwrap();
    insert(&client, "p", "published-by-poll").await;
    client
        .batch_execute("UPDATE dualsync.outbox SET published_at = now()")
        .await
        .unwrap();
    insert(&client, "p", "left-by-poll").await;
    insert(&client, "q", "left-by-poll").await;
    // Now the switch: `outbox migrate` in WAL mode (slot, then the lock-free trigger), then
    // the relay in WAL mode.
    let slot = unique("dswal");
    let text = with_source(
        &pipeline_toml(&servers, &url, &url, &unique("m"), ""),
        &format!("capture = \"wal\"\nslot_name = \"{slot}\"\npublication = \"{slot}\""),
    );
    let config = Config::from_toml(std::path::Path::new("test.toml"), &text, Vec::new()).unwrap();
    let guard = SlotGuard::new(&url, &slot);
    migrate_wal(&client, &config).await;
    let w = WalOutbox {
        servers,
        url,
        client,
        config,
        slot: guard,
    };
    let mut source = lead(&w).await;
    insert(&w.client, "p", "after-switch").await;
    let rows = take(&mut source, 3).await;
    let names: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.aggregate_id.clone(), name(r)))
        .collect();
    assert_eq!(
        names[..2],
        [
            ("p".into(), "left-by-poll".into()),
            ("q".into(), "left-by-poll".into())
        ]
    );
    assert_eq!(names[2], ("p".into(), "after-switch".into()));
    assert!(rows[2].seq > rows[0].seq && rows[2].seq >= source.first_version());
    source.ack(&rows).await.unwrap();
    let unpublished: i64 = w
        .client
        .query_one("SELECT count(*) FROM dualsync.outbox WHERE published_at IS NULL AND payload->>'name' = 'left-by-poll'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        unpublished, 0,
        "the drained rows are marked as polling marks them"
    );
}

/// The replication connection is cut by the server (its walsender terminated) while the relay
/// streams: the relay reconnects with backoff and streams on from the slot; every event
/// reaches the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_replication_connection_is_retried_and_nothing_is_skipped() {
    let w = wal_outbox("").await;
    let run = run_pipeline(&w.config, &[]);
    for i in 0..20 {
        insert(&w.client, &format!("k{}", i % 4), &format!("before-{i}")).await;
    }
    crate::capture_modes::every_row_in_topics(&w.client, &w.config, &["customers"]).await;
    let terminated: bool = w
        .client
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
             WHERE slot_name = $1 AND active",
            &[&w.slot.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated, "the relay's walsender was streaming the slot");
    for i in 0..20 {
        insert(&w.client, &format!("k{}", i % 4), &format!("after-{i}")).await;
    }
    let messages =
        crate::capture_modes::every_row_in_topics(&w.client, &w.config, &["customers"]).await;
    crate::partitions::check_order(&messages);
    assert!(
        run.relay
            .retries
            .with_label_values(&[dualsync::metrics::stage::RELAY])
            .get()
            >= 1
    );
    run.stop().await;
}
