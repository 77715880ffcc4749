//! `dualsync outbox migrate` with `capture = "wal"` against real servers: the refusals that
//! name the setting (a cluster of the test's own at `wal_level = replica`, a role without
//! REPLICATION on the shared server), the idempotent publication, slot and writers' trigger,
//! `dualsync.emit` (transactional: peeked on the slot), and writers of one aggregate that no
//! longer wait for each other.

use dualsync::config::OutboxSourceConfig;
use dualsync::error::{Error, WalSetupError};
use dualsync::metrics::Health;
use dualsync::source::wal::setup::{self, WritersTrigger};
use dualsync::source::wal::WalSource;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::common::{create_database, eventually, first_column, servers, unique, DEADLINE};
use crate::private_servers::PrivateServer;
use crate::wal_capture::SlotGuard;

/// The `[source]` of a WAL pipeline on `url`, with a slot and publication of its own.
pub fn wal_source(url: &str, capture: &str) -> OutboxSourceConfig {
    let name = unique("ds");
    toml::from_str(&format!(
        "url = \"{url}\"\ncapture = \"{capture}\"\nslot_name = \"{name}\"\npublication = \"{name}\""
    ))
    .unwrap()
}

/// What a WAL relay stops with at start on this source.
async fn relay_start_error(source: &OutboxSourceConfig) -> Error {
    let led =
        WalSource::acquire_leadership(source, "p", &Health::default(), &CancellationToken::new())
            .await;
    led.err().expect("the relay refuses to start")
}

const INSERT: &str = "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload)
    VALUES ('orders', 'o1', 'updated', '{}')";

async fn connect(url: &str) -> Client {
    dualsync::pg::connect(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_naming_the_setting_before_anything_changes() {
    servers();
    let server = tokio::task::block_in_place(|| {
        PrivateServer::postgres_configured("", &["wal_level = replica"])
    });
    let client = connect(&server.url()).await;
    let source = wal_source(&server.url(), "wal");
    let err = setup::migrate(&client, &source, "p").await.unwrap_err();
    assert!(
        matches!(&err, Error::WalSetup(WalSetupError::WalLevel { current }) if current == "replica"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("set wal_level = logical") && text.contains("restart"),
        "{text}"
    );
    assert_eq!(
        dualsync::error::classify(&err),
        dualsync::error::Disposition::Fatal
    );
    let schema: bool = client
        .query_one("SELECT to_regnamespace('dualsync') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema, "nothing is created on a server that cannot stream");
    let err = setup::ensure_wal_setup(&client, &source).await.unwrap_err();
    assert!(
        matches!(err, Error::WalSetup(WalSetupError::WalLevel { .. })),
        "{err:?}"
    );
    // The relay's start-up refuses the same way, with the same message for the operator.
    let err = relay_start_error(&source).await;
    assert!(
        matches!(err, Error::WalSetup(WalSetupError::WalLevel { .. })),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_is_refused_with_the_alter_role_to_run() {
    let servers = servers();
    let url = create_database(&servers).await;
    let admin = connect(&url).await;
    let role = unique("norepl");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOREPLICATION"
        ))
        .await
        .unwrap();
    let role_url = url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(role_url, url, "the test URL names its user: {url}");
    let client = connect(&role_url).await;
    let err = setup::migrate(&client, &wal_source(&role_url, "wal"), "p")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, Error::WalSetup(WalSetupError::NotReplication { role: r }) if *r == role),
        "{err:?}"
    );
    assert!(
        text.contains(&format!("ALTER ROLE {role} REPLICATION")),
        "{text}"
    );
    drop(client);
    // The role owns nothing; its session may still be closing.
    eventually("the test role is dropped", || async {
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await
            .is_ok()
    })
    .await;
}

/// The publication, the slot and the trigger mode, three times over: created, left as they
/// are, and back to polling (which keeps the slot, and says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_sets_up_publication_slot_and_writers_trigger_idempotently() {
    let servers = servers();
    let url = create_database(&servers).await;
    let mut client = connect(&url).await;
    let wal = wal_source(&url, "wal");
    let _slot = SlotGuard::new(&url, &wal.slot_name);
    let first = setup::migrate(&client, &wal, "p").await.unwrap();
    assert_eq!(first.writers, WritersTrigger::Unlocked);
    assert!(first.slot_created.is_some());
    let second = setup::migrate(&client, &wal, "p").await.unwrap();
    assert_eq!(
        second.slot_created, None,
        "the slot is kept, not re-created"
    );
    setup::ensure_wal_setup(&client, &wal).await.unwrap();
    let row = client
        .query_one(
            "SELECT (SELECT plugin FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT pubinsert AND NOT (pubupdate OR pubdelete OR pubtruncate)
                     FROM pg_publication WHERE pubname = $2),
                    (SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_notify')",
            &[&wal.slot_name, &wal.publication],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("pgoutput"));
    assert_eq!(row.get::<_, Option<bool>>(1), Some(true), "INSERTs only");
    assert_eq!(row.get::<_, i64>(2), 0, "no NOTIFY in WAL mode");
    let err = setup::check_writers_lock(&client).await.unwrap_err();
    assert!(
        matches!(err, Error::WalSetup(WalSetupError::WritersUnlocked)),
        "{err:?}"
    );
    // `outbox resequence` brings the DDL up to date without switching the mode.
    dualsync::source::outbox_sequence::renumber(&mut client, 0)
        .await
        .unwrap();
    assert_eq!(
        setup::writers_trigger(&client).await.unwrap(),
        Some(WritersTrigger::Unlocked)
    );

    // Another pipeline polling the same outbox keeps the writers' lock.
    client
        .execute(
            "INSERT INTO dualsync.outbox_relays (lock_key, pipeline) VALUES (7, 'poller')",
            &[],
        )
        .await
        .unwrap();
    let shared = setup::migrate(&client, &wal, "p").await.unwrap();
    assert_eq!(shared.writers, WritersTrigger::Locking);
    assert_eq!(shared.polling_pipelines, ["poller"]);
    setup::check_writers_lock(&client).await.unwrap();

    // Rows written without the lock are born marked: the WAL relay publishes them from the
    // stream, polling never reads them (their seq order is not commit order). Back to
    // polling: the locking trigger and NOTIFY, the switch's WAL position, the slot left over.
    client
        .batch_execute("DELETE FROM dualsync.outbox_relays")
        .await
        .unwrap();
    setup::migrate(&client, &wal, "p").await.unwrap();
    client
        .batch_execute(&format!("{INSERT}; {INSERT}"))
        .await
        .unwrap();
    let poll = OutboxSourceConfig {
        capture: dualsync::config::Capture::Poll,
        ..wal.clone()
    };
    let back = setup::migrate(&client, &poll, "p").await.unwrap();
    assert_eq!(
        setup::writers_trigger(&client).await.unwrap(),
        Some(WritersTrigger::Locking)
    );
    let switch = back.back_to_poll.expect("the outbox was lock-free");
    let max: i64 = client
        .query_one("SELECT max(seq) FROM dualsync.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert!(switch.lsn.contains('/'), "an LSN: {}", switch.lsn);
    assert_eq!(back.leftover_slot.unwrap().slot, wal.slot_name);
    client.batch_execute(INSERT).await.unwrap();
    let unpublished: Vec<i64> = first_column(
        &client,
        "SELECT seq FROM dualsync.outbox WHERE published_at IS NULL",
    )
    .await;
    assert_eq!(
        unpublished,
        [max + 1],
        "only the row written under the lock is left to poll"
    );
    let again = setup::migrate(&client, &poll, "p").await.unwrap();
    assert_eq!(again.back_to_poll, None, "already polling");

    // A relay never re-creates a missing slot (that would skip the gap): it stops, naming
    // migrate.
    let missing = OutboxSourceConfig {
        publication: wal.publication.clone(),
        ..wal_source(&url, "wal")
    };
    let err = setup::check_wal_setup(&client, &missing).await.unwrap_err();
    assert!(
        matches!(err, Error::WalSetup(WalSetupError::SlotMissing { .. })),
        "{err:?}"
    );
    let err = relay_start_error(&missing).await;
    assert!(
        matches!(err, Error::WalSetup(WalSetupError::SlotMissing { .. })),
        "{err:?}"
    );
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&missing.slot_name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the relay created no slot");

    // A publication of the configured name that publishes more is refused, not altered.
    let other = wal_source(&url, "wal");
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE dualsync.outbox",
            other.publication
        ))
        .await
        .unwrap();
    let err = setup::ensure_wal_setup(&client, &other).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::WalSetup(WalSetupError::PublicationMismatch { .. })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("publish = 'insert' only"), "{err}");
}

/// The logical messages with prefix `dualsync` on `slot`, peeked (not consumed) through
/// pgoutput: the message's content, per the protocol's Message format ('M', flags, LSN,
/// prefix, length, content).
async fn peek_messages(client: &Client, slot: &str, publication: &str) -> Vec<serde_json::Value> {
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
                'proto_version', '1', 'publication_names', $2, 'messages', 'true')",
            &[&slot, &publication],
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    for row in rows {
        let data: Vec<u8> = row.get(0);
        if data.first() != Some(&b'M') {
            continue;
        }
        assert_eq!(data[1], 1, "transactional");
        let rest = &data[10..];
        let nul = rest.iter().position(|b| *b == 0).unwrap();
        assert_eq!(&rest[..nul], b"dualsync");
        let len = u32::from_be_bytes(rest[nul + 1..nul + 5].try_into().unwrap()) as usize;
        out.push(serde_json::from_slice(&rest[nul + 5..nul + 5 + len]).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emit_is_transactional_and_checks_its_arguments_at_call_time() {
    let servers = servers();
    let url = create_database(&servers).await;
    let mut client = connect(&url).await;
    let wal = wal_source(&url, "wal");
    let _slot = SlotGuard::new(&url, &wal.slot_name);
    setup::migrate(&client, &wal, "p").await.unwrap();

    let tx = client.transaction().await.unwrap();
    tx.query_one(
        "SELECT dualsync.emit('orders', 'rolled-back', 'created', '{\"n\": 1}')",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let id: uuid::Uuid = client
        .query_one(
            "SELECT dualsync.emit('orders', 'o1', 'created', '{\"n\": 2}', '00-abc-def-01')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let deleted: uuid::Uuid = client
        .query_one("SELECT dualsync.emit('orders', 'o1', 'deleted', NULL)", &[])
        .await
        .unwrap()
        .get(0);

    let messages = peek_messages(&client, &wal.slot_name, &wal.publication).await;
    assert_eq!(
        messages,
        [
            serde_json::json!({"id": id, "aggregatetype": "orders", "aggregateid": "o1",
                "type": "created", "payload": {"n": 2}, "traceparent": "00-abc-def-01"}),
            serde_json::json!({"id": deleted, "aggregatetype": "orders", "aggregateid": "o1",
                "type": "deleted", "payload": null, "traceparent": null}),
        ],
        "the rolled-back event is not in the WAL stream"
    );

    for call in [
        "SELECT dualsync.emit('', 'o1', 'created', '{}')",
        "SELECT dualsync.emit('orders', NULL, 'created', '{}')",
        "SELECT dualsync.emit('orders', 'o1', NULL, '{}')",
    ] {
        let err = client.query_one(call, &[]).await.unwrap_err();
        let code = err.code().cloned();
        assert!(
            code == Some(tokio_postgres::error::SqlState::CHECK_VIOLATION)
                || code == Some(tokio_postgres::error::SqlState::NOT_NULL_VIOLATION),
            "{call}: {err:?}"
        );
    }
}

/// Two transactions insert events of one aggregate; the first stays open. Polling: the second
/// waits on the first's advisory lock (seen in pg_stat_activity). WAL: it commits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_one_aggregate_wait_for_each_other_only_when_polling() {
    let servers = servers();
    let url = create_database(&servers).await;
    let admin = connect(&url).await;
    let wal = wal_source(&url, "wal");
    let _slot = SlotGuard::new(&url, &wal.slot_name);
    let poll = OutboxSourceConfig {
        capture: dualsync::config::Capture::Poll,
        ..wal.clone()
    };
    for (config, waits) in [(&poll, true), (&wal, false), (&poll, true)] {
        setup::migrate(&admin, config, "p").await.unwrap();
        let mut first = connect(&url).await;
        let open = first.transaction().await.unwrap();
        open.execute(INSERT, &[]).await.unwrap();
        let second = connect(&url).await;
        let pid: i32 = second
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let insert = tokio::spawn(async move { second.execute(INSERT, &[]).await.map(|_| ()) });
        let mut open = Some(open);
        if waits {
            eventually(
                "the second writer waits on the first's advisory lock",
                || async {
                    admin
                        .query_one(
                            "SELECT coalesce((SELECT wait_event = 'advisory' FROM pg_stat_activity
                                          WHERE pid = $1), false)",
                            &[&pid],
                        )
                        .await
                        .unwrap()
                        .get(0)
                },
            )
            .await;
            assert!(!insert.is_finished());
            open.take().unwrap().commit().await.unwrap();
        }
        // Without the lock, it commits while the first transaction is still open.
        tokio::time::timeout(DEADLINE, insert)
            .await
            .unwrap_or_else(|_| panic!("capture {:?}: the second writer blocked", config.capture))
            .unwrap()
            .unwrap();
        if let Some(open) = open {
            open.commit().await.unwrap();
        }
    }
}

/// The command prints what it set up; a polling relay then refuses the lock-free outbox (its
/// `seq` order would no longer be commit order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migrate_command_sets_up_wal_capture_and_a_polling_relay_then_refuses() {
    let servers = servers();
    let url = create_database(&servers).await;
    let wal = wal_source(&url, "wal");
    let _slot = SlotGuard::new(&url, &wal.slot_name);
    let text = crate::common::pipeline_toml(&servers, &url, &url, &unique("m"), "").replacen(
        "kind = \"postgres_outbox\"\n",
        &format!(
            "kind = \"postgres_outbox\"\ncapture = \"wal\"\nslot_name = \"{}\"\npublication = \"{}\"\n",
            wal.slot_name, wal.publication
        ),
        1,
    );
    let path = crate::processes::write_config(&text);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dualsync"))
        .args(["outbox", "migrate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "publication {} and replication slot {} are ready",
            wal.publication, wal.slot_name
        )) && stdout.contains("no per-aggregate lock"),
        "{stdout}"
    );

    let poll = OutboxSourceConfig {
        capture: dualsync::config::Capture::Poll,
        ..wal.clone()
    };
    let refused = dualsync::source::outbox::OutboxSource::acquire_leadership(
        &poll,
        &unique("poller"),
        &dualsync::metrics::Health::default(),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(Error::WalSetup(WalSetupError::WritersUnlocked))
        ),
        "{:?}",
        refused.err()
    );
}
