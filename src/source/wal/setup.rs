//! The primary's side of `capture = "wal"`, set up idempotently by `dualsync outbox migrate`
//! and checked again by the relay at start ([`ensure_wal_setup`]): the server settings and
//! the role attribute logical replication needs (each refusal names the setting and the
//! fix), the publication of the outbox's INSERTs, the `pgoutput` slot, and the writers'
//! trigger for the mode.
//!
//! The writers' trigger is an outbox-wide choice, not a pipeline's: the polling relay needs
//! the per-aggregate lock (its `seq` order is commit order only with it), the WAL relay does
//! not. So the lock-free trigger goes in only while no other pipeline polls the same outbox
//! (one registered in `dualsync.outbox_relays`), and a polling relay refuses to start on a
//! lock-free outbox ([`check_writers_lock`]). Which function the trigger runs is the record
//! of the mode: nothing is read per insert (the function body is chosen at migrate time).

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::slot_health::{self, SlotHealth};
use crate::config::{Capture, OutboxSourceConfig};
use crate::error::{Error, WalSetupError};
use crate::source::outbox::OUTBOX_DDL;

/// Points the writers' trigger at the lock-free function and drops the NOTIFY trigger; run
/// after [`OUTBOX_DDL`], in its transaction.
pub const WAL_TRIGGER_DDL: &str = include_str!("../../../connectors/outbox_wal.sql");

/// Which function the outbox's insert trigger runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritersTrigger {
    /// `outbox_assign_seq`: the per-aggregate advisory lock, then `seq` (polling needs it).
    Locking,
    /// `outbox_assign_seq_unlocked`: `seq` only (every pipeline streams the WAL).
    Unlocked,
}

/// What [`migrate`] did, for the command to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub capture: Capture,
    /// The trigger writers run from now on.
    pub writers: WritersTrigger,
    /// Other pipelines registered as polling this outbox: they keep the writers' lock.
    pub polling_pipelines: Vec<String>,
    /// `capture = "wal"`: the slot was created by this run.
    pub slot_created: Option<SlotCreated>,
    /// `capture = "poll"`: a slot of the configured name still exists (left by WAL capture;
    /// it holds WAL until dropped).
    pub leftover_slot: Option<SlotHealth>,
    /// `capture = "poll"` on an outbox that was lock-free until now.
    pub back_to_poll: Option<BackToPoll>,
}

/// The switch from WAL capture back to polling, made in one transaction that waited for every
/// writer under the lock-free trigger. Their rows were born marked published (the WAL relay
/// publishes them from the stream), so the polling relay will not publish them; the WAL relay
/// must have streamed past `lsn` before it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackToPoll {
    /// Every lock-free insert committed before this position: the WAL relay must have
    /// confirmed past it (the slot's `confirmed_flush_lsn`) before it stops.
    pub lsn: String,
}

/// A slot created by [`migrate`]: the WAL relay streams what commits after it. Rows committed
/// before it and still unpublished are published from the table by the WAL relay at its
/// take-over (or by a polling relay still running).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCreated {
    /// The slot's consistent point.
    pub lsn: String,
    /// The highest `seq` in the table once the slot existed (every row up to it committed
    /// before the slot, or is visible to the WAL relay as well).
    pub max_seq: Option<i64>,
    /// Unpublished rows up to `max_seq`, left for the table read.
    pub unpublished: i64,
}

/// Applies the outbox DDL for the pipeline's capture mode, idempotently. `capture = "wal"`:
/// checks the server first (nothing is changed on a server that cannot stream), creates the
/// publication and the slot ([`ensure_wal_setup`]), and only then installs the lock-free
/// writers' trigger (unless another pipeline polls this outbox): its rows are born marked, so
/// the slot must exist to carry them.
pub async fn migrate(
    client: &Client,
    cfg: &OutboxSourceConfig,
    pipeline: &str,
) -> Result<Migrated, Error> {
    if cfg.capture == Capture::Poll {
        let back_to_poll = if writers_trigger(client).await? == Some(WritersTrigger::Unlocked) {
            Some(switch_back_to_poll(client).await?)
        } else {
            crate::source::outbox::migrate(client).await?;
            None
        };
        return Ok(Migrated {
            capture: Capture::Poll,
            writers: WritersTrigger::Locking,
            polling_pipelines: Vec::new(),
            slot_created: None,
            leftover_slot: slot_health::find(client, &cfg.slot_name).await?,
            back_to_poll,
        });
    }
    preflight(client).await?;
    // The DDL in the mode the outbox is in: a lock-free outbox never gets the locking trigger
    // back for a moment (its rows would then also wait in the table).
    reapply_ddl(client).await?;
    // This pipeline no longer polls; any other registered one still may.
    let polling: Vec<String> = client
        .query(
            "WITH mine AS (DELETE FROM dualsync.outbox_relays WHERE pipeline = $1)
             SELECT DISTINCT pipeline FROM dualsync.outbox_relays WHERE pipeline <> $1
             ORDER BY 1",
            &[&pipeline],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure_publication(client, &cfg.publication).await?;
    let slot_created = match ensure_slot(client, &cfg.slot_name).await? {
        None => None,
        Some(lsn) => {
            let row = client
                .query_one(
                    "SELECT max(seq), count(*) FILTER (WHERE published_at IS NULL)
                     FROM dualsync.outbox",
                    &[],
                )
                .await?;
            Some(SlotCreated {
                lsn,
                max_seq: row.get(0),
                unpublished: row.get(1),
            })
        }
    };
    let writers = if polling.is_empty() {
        install_lock_free(client).await?;
        WritersTrigger::Unlocked
    } else {
        // Another pipeline polls: the lock (and the unmarked rows it reads) stay.
        crate::source::outbox::migrate(client).await?;
        WritersTrigger::Locking
    };
    Ok(Migrated {
        capture: Capture::Wal,
        writers,
        polling_pipelines: polling,
        slot_created,
        leftover_slot: None,
        back_to_poll: None,
    })
}

/// The polling triggers back, and the WAL position they took effect at, in one transaction.
async fn switch_back_to_poll(client: &Client) -> Result<BackToPoll, Error> {
    let messages = client
        .simple_query(&format!("{OUTBOX_DDL}\nSELECT pg_current_wal_lsn()::text;"))
        .await?;
    let lsn = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| Error::Internal("no WAL position from the switch to polling".into()))?;
    Ok(BackToPoll { lsn })
}

/// Checks the server and the role, then creates the publication and the slot if they are
/// missing (and checks them if they exist, lost slots included). Idempotent; for `migrate` and
/// a pipeline's first start. Needs the outbox table (`dualsync outbox migrate`).
pub async fn ensure_wal_setup(client: &Client, cfg: &OutboxSourceConfig) -> Result<(), Error> {
    preflight(client).await?;
    crate::source::outbox::check_outbox(client).await?;
    ensure_publication(client, &cfg.publication).await?;
    ensure_slot(client, &cfg.slot_name).await?;
    Ok(())
}

/// The same checks for a relay whose pipeline streamed before: a missing slot is refused
/// ([`WalSetupError::SlotMissing`]), never created, as a new slot starts at the server's
/// current position and the events committed since the old one's confirmed position would be
/// skipped without a word. The operator re-creates it (`dualsync outbox migrate`) knowing
/// the gap (docs/outbox.md#when-the-slot-is-lost).
pub async fn check_wal_setup(client: &Client, cfg: &OutboxSourceConfig) -> Result<(), Error> {
    preflight(client).await?;
    crate::source::outbox::check_outbox(client).await?;
    ensure_publication(client, &cfg.publication).await?;
    if check_slot(client, &cfg.slot_name).await? {
        Ok(())
    } else {
        Err(WalSetupError::SlotMissing {
            slot: cfg.slot_name.clone(),
        }
        .into())
    }
}

/// `wal_level = logical` and a role that may create and stream slots.
async fn preflight(client: &Client) -> Result<(), Error> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text,
                    coalesce((SELECT rolreplication OR rolsuper FROM pg_roles
                              WHERE rolname = current_user), false)",
            &[],
        )
        .await?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(WalSetupError::WalLevel { current: wal_level }.into());
    }
    if !row.get::<_, bool>(2) {
        return Err(WalSetupError::NotReplication { role: row.get(1) }.into());
    }
    Ok(())
}

/// Creates the publication of the outbox's INSERTs, or checks the existing one: a publication
/// of updates or deletes would stream the purge and the marks as events.
async fn ensure_publication(client: &Client, name: &str) -> Result<(), Error> {
    if check_publication(client, name).await? {
        return Ok(());
    }
    // The name is validated as [a-z0-9_]{1,63} (config::validate): safe unquoted.
    let create =
        format!("CREATE PUBLICATION {name} FOR TABLE dualsync.outbox WITH (publish = 'insert')");
    match client.batch_execute(&create).await {
        Ok(()) => Ok(()),
        // Another migrate or relay created it meanwhile: check what it made.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {
            check_publication(client, name).await.map(|_| ())
        }
        Err(e) => Err(e.into()),
    }
}

/// `true` when the publication exists as dualsync needs it, `false` when it does not exist.
async fn check_publication(client: &Client, name: &str) -> Result<bool, Error> {
    let Some(row) = client
        .query_opt(
            "SELECT p.pubinsert, p.pubupdate OR p.pubdelete OR p.pubtruncate, p.puballtables,
                    ARRAY(SELECT t.schemaname || '.' || t.tablename FROM pg_publication_tables t
                          WHERE t.pubname = p.pubname ORDER BY 1)
             FROM pg_publication p WHERE p.pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(false);
    };
    let (insert, more, all, tables): (bool, bool, bool, Vec<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let found = if all {
        "FOR ALL TABLES".to_string()
    } else if tables != ["dualsync.outbox"] {
        format!("for tables {tables:?}")
    } else if !insert || more {
        "not publish = 'insert' only".to_string()
    } else {
        return Ok(true);
    };
    Err(WalSetupError::PublicationMismatch {
        publication: name.to_string(),
        found,
    }
    .into())
}

/// Creates the logical slot with `pgoutput` if it is missing (returning its consistent
/// point), or checks the existing one, lost slots included.
async fn ensure_slot(client: &Client, slot: &str) -> Result<Option<String>, Error> {
    if check_slot(client, slot).await? {
        return Ok(None);
    }
    let room = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int4,
                    (SELECT count(*) FROM pg_replication_slots)",
            &[],
        )
        .await?;
    let (max, used): (i32, i64) = (room.get(0), room.get(1));
    let exhausted = || WalSetupError::SlotsExhausted {
        slot: slot.to_string(),
        max,
        used,
    };
    if used >= i64::from(max) {
        return Err(exhausted().into());
    }
    // Waits for the transactions running now to end (the slot's consistent point).
    match client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
    {
        Ok(row) => Ok(Some(row.get(0))),
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {
            check_slot(client, slot).await.map(|_| None)
        }
        Err(e) if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED) => {
            Err(exhausted().into())
        }
        Err(e) => Err(e.into()),
    }
}

/// `true` when the slot exists as dualsync needs it, `false` when it does not exist.
async fn check_slot(client: &Client, slot: &str) -> Result<bool, Error> {
    let Some(row) = client
        .query_opt(
            "SELECT slot_type, coalesce(plugin, ''), coalesce(database = current_database(), false)
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(false);
    };
    let (kind, plugin, here): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    if kind != "logical" || plugin != "pgoutput" || !here {
        let found = if kind != "logical" {
            format!("a {kind} slot")
        } else if plugin != "pgoutput" {
            format!("a slot of plugin {plugin:?}")
        } else {
            "a slot of another database".to_string()
        };
        return Err(WalSetupError::SlotMismatch {
            slot: slot.to_string(),
            found,
        }
        .into());
    }
    match slot_health::sample(client, slot).await?.lost_error() {
        Some(lost) => Err(lost),
        None => Ok(true),
    }
}

/// Applies the outbox DDL again keeping the writers' trigger of the outbox's current mode, for
/// commands that need the latest DDL but must not switch the mode (`outbox resequence`): the
/// outbox DDL alone would put the lock back on a lock-free outbox, and a later switch back to
/// polling would then not know which rows were written without it.
pub async fn reapply_ddl(client: &Client) -> Result<(), Error> {
    if writers_trigger(client).await? == Some(WritersTrigger::Unlocked) {
        install_lock_free(client).await
    } else {
        crate::source::outbox::migrate(client).await
    }
}

/// The outbox DDL and the lock-free trigger in one transaction: the trigger never appears
/// without the functions it runs.
async fn install_lock_free(client: &Client) -> Result<(), Error> {
    client
        .batch_execute(&format!("{OUTBOX_DDL}\n{WAL_TRIGGER_DDL}"))
        .await?;
    Ok(())
}

/// Which function the outbox's insert trigger runs; `None` without the trigger.
pub async fn writers_trigger(client: &Client) -> Result<Option<WritersTrigger>, Error> {
    let row = client
        .query_opt(
            "SELECT p.proname::text FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE t.tgrelid = to_regclass('dualsync.outbox') AND t.tgname = 'outbox_assign_seq'",
            &[],
        )
        .await?;
    Ok(row.map(|r| match r.get::<_, &str>(0) {
        "outbox_assign_seq_unlocked" => WritersTrigger::Unlocked,
        _ => WritersTrigger::Locking,
    }))
}

/// For a polling relay at start: refuses an outbox whose writers take no lock (set up for
/// WAL capture), where polling in `seq` order could reorder an aggregate's events.
pub async fn check_writers_lock(client: &Client) -> Result<(), Error> {
    match writers_trigger(client).await? {
        Some(WritersTrigger::Unlocked) => Err(WalSetupError::WritersUnlocked.into()),
        _ => Ok(()),
    }
}
