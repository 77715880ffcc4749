//! The PostgreSQL outbox captured from the write-ahead log (`[source] capture = "wal"`):
//! logical replication with `pgoutput` on a slot, over the streaming protocol.
//!
//! Why this keeps [`Source`]'s contract (docs/wal-capture.md has the long form):
//! - Order. The WAL hands over transactions in commit order, so an aggregate's events come
//!   in commit order with no lock on the writers; their versions ([`version`]) grow with it.
//! - No skip. The slot's confirmed position moves only past transactions every event of
//!   which Kafka acknowledged, and of every transaction before ([`progress`]); after a crash,
//!   a lost connection or a hand-over the stream starts again from there, so the events not
//!   acknowledged come again, in the same order (at-least-once; the versions are the same,
//!   so apply's guard absorbs the duplicates).
//! - No pinned WAL. Between transactions the server's keepalive position is confirmed once
//!   everything before it is published, so an idle outbox in a busy database holds no WAL.
//! - One relay. The leader holds the pipeline's leader lock on its SQL session (the one the
//!   poll mode takes, so a poll relay and a WAL relay of one pipeline never run together),
//!   with the same lease ([`super::leader_lease`]); only then does it start streaming. A
//!   slot still held by a leader that was cut off (55006) is waited for: the replication
//!   session carries `wal_sender_timeout = lease_secs`, so the server frees it, while the
//!   cut-off leader stopped publishing when its lease ran out, a quarter lease before.
//! - Poll → wal. Rows left unpublished by polling mode are published first, from the table,
//!   with their `seq` as version (every WAL version is larger), and marked as polling does.

pub mod pgoutput;
pub mod progress;
pub mod protocol;
pub mod setup;
pub mod slot_health;
pub mod stream;
pub mod version;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use super::aggregate_filter::{carries, AggregateFilter};
use super::leader_lease::{LeaderLease, STANDBY_RETRY};
use super::outbox::{self as poll, OutboxRow};
use super::outbox_purge::{purge_published, PURGE_INTERVAL};
use super::{OutboxCapture, Source};
use crate::config::OutboxSourceConfig;
use crate::error::{Error, WalError, WalSetupError};
use crate::metrics::Health;
use pgoutput::Decoder;
use progress::Progress;
use protocol::ReplicationConnection;
use stream::{Item, Timing};
use version::{lsn_text, parse_lsn};

/// Decoded transactions buffered between the stream and the relay.
const CHANNEL: usize = 64;

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The leader's WAL capture: its SQL session (lock, lease, poll-era rows) and the stream.
pub struct WalSource {
    client: Client,
    connection_task: tokio::task::JoinHandle<()>,
    stream_task: tokio::task::JoinHandle<()>,
    lease: Arc<LeaderLease>,
    config: OutboxSourceConfig,
    filter: AggregateFilter,
    items: mpsc::Receiver<Result<Item, Error>>,
    confirmed: watch::Sender<u64>,
    progress: Progress,
    /// Received and not handed out yet, in WAL order.
    carry: VecDeque<Carried>,
    /// Poll-era rows still to read from the table (`None` once none is left), and those
    /// handed out (marked published on their acknowledgement).
    drain: Option<String>,
    drained: HashSet<Uuid>,
    drained_pending: Vec<i64>,
    /// The smallest version the stream can hand out (the slot's position at start).
    first_version: i64,
}

impl Drop for WalSource {
    fn drop(&mut self) {
        // Ends both sessions: the slot and the leader lock are free at once.
        self.stream_task.abort();
        self.connection_task.abort();
    }
}

/// What the stream delivered and the relay has not been handed yet.
enum Carried {
    /// An event, with its transaction's end when it is the transaction's last.
    Event(OutboxRow, Option<u64>),
    /// A position with nothing to publish before it but the events ahead of it.
    Position(u64),
}

/// The slot as `pg_replication_slots` has it.
struct SlotState {
    confirmed_flush: u64,
    lost: bool,
}

async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, wal_status = 'lost' FROM pg_replication_slots
             WHERE slot_name = $1 AND slot_type = 'logical'",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotState {
        confirmed_flush: r
            .get::<_, Option<String>>(0)
            .as_deref()
            .and_then(parse_lsn)
            .unwrap_or(0),
        lost: r.get::<_, Option<bool>>(1).unwrap_or(false),
    }))
}

impl WalSource {
    /// The smallest version this session's stream hands out.
    pub fn first_version(&self) -> i64 {
        self.first_version
    }

    /// Connects, waits as standby until this process holds the pipeline's leader lock, then
    /// starts streaming the slot (waiting while a cut-off leader's session still holds it).
    /// `Ok(None)` when cancelled meanwhile.
    pub async fn acquire_leadership(
        config: &OutboxSourceConfig,
        pipeline: &str,
        health: &Health,
        cancel: &CancellationToken,
    ) -> Result<Option<Self>, Error> {
        let (client, connection) = crate::pg::connect_raw(config.url.expose()).await?;
        let connection_task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "the WAL capture's leader session was lost");
            }
        });
        let lease = Arc::new(LeaderLease::new(Duration::from_secs(config.lease_secs)));
        // The outbox and the set-up errors (wal_level, REPLICATION, a lost or missing slot)
        // stop the relay with their fix, standby or not. A missing slot is never created here:
        // a new one would start at the server's current position and skip what was committed
        // since the old one (`dualsync outbox migrate` creates it, with the writers' trigger).
        lease.call(setup::check_wal_setup(&client, config)).await?;
        let server_version: i32 = lease
            .call(client.query_one("SELECT current_setting('server_version_num')::int4", &[]))
            .await?
            .get(0);
        lease
            .call(client.batch_execute(&lease.server_settings(server_version)))
            .await?;
        health.set_database_up(true);
        health.recovered();
        health.set_started();
        let key = poll::leader_lock_key(pipeline);
        let mut announced = false;
        loop {
            let held: bool = lease
                .call(client.query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&poll::LEADER_LOCK_CLASS, &key],
                ))
                .await?
                .get(0);
            if held {
                break;
            }
            if !announced {
                tracing::info!(pipeline, "another relay is active; waiting as standby");
                announced = true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(STANDBY_RETRY) => {}
            }
        }
        let Some((conn, decoder, state)) =
            Self::start_stream(config, &client, &lease, cancel).await?
        else {
            return Ok(None);
        };
        tracing::info!(pipeline, slot = %config.slot_name, from = %lsn_text(state.confirmed_flush),
            "relay is the active leader, streaming the outbox from the WAL");
        let first_version = version::floor(state.confirmed_flush);
        check_versions(&client, &lease, first_version).await?;
        let (confirmed, watched) = watch::channel(state.confirmed_flush);
        let (tx, items) = mpsc::channel(CHANNEL);
        let timing = Timing {
            status_every: lease.heartbeat().min(Duration::from_secs(10)),
            silence: Duration::from_secs(config.lease_secs),
        };
        let stream_task = tokio::spawn(stream::run(conn, decoder, tx, watched, timing));
        let filter = AggregateFilter::new(config);
        let drain = Some(filter.read_batch_sql(false));
        Ok(Some(Self {
            client,
            connection_task,
            stream_task,
            lease,
            config: config.clone(),
            filter,
            items,
            confirmed,
            progress: Progress::new(state.confirmed_flush),
            carry: VecDeque::new(),
            drain,
            drained: HashSet::new(),
            drained_pending: Vec::new(),
            first_version,
        }))
    }

    /// Opens the replication session and starts streaming; retries while the slot is still
    /// held by another session (a leader cut off, until the server's `wal_sender_timeout`).
    async fn start_stream(
        config: &OutboxSourceConfig,
        client: &Client,
        lease: &LeaderLease,
        cancel: &CancellationToken,
    ) -> Result<Option<(ReplicationConnection, Decoder, SlotState)>, Error> {
        let options = protocol::session_options(Duration::from_secs(config.lease_secs));
        let mut announced = false;
        loop {
            let state = lease
                .call(slot_state(client, &config.slot_name))
                .await?
                .ok_or_else(|| WalSetupError::SlotMissing {
                    slot: config.slot_name.clone(),
                })?;
            if state.lost {
                return Err(WalError::SlotLost {
                    slot: config.slot_name.clone(),
                    reason: "the server invalidated it (wal_status = lost, max_slot_wal_keep_size)"
                        .into(),
                }
                .into());
            }
            let mut conn = ReplicationConnection::connect(config.url.expose(), &options).await?;
            let identity = conn.simple_query("IDENTIFY_SYSTEM").await?;
            let system_id = identity
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .unwrap_or_default();
            let command = format!(
                "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
                quote_ident(&config.slot_name),
                quote_literal(&quote_ident(&config.publication))
            );
            match conn.start_replication(&command).await {
                Ok(()) => return Ok(Some((conn, Decoder::new(system_id), state))),
                Err(Error::Wal(e)) if e.sqlstate() == Some("55006") => {
                    if !announced {
                        tracing::info!(slot = %config.slot_name, "the slot is still streamed by another session (a relay that was cut off); waiting until the server frees it");
                        announced = true;
                    }
                }
                Err(Error::Wal(e)) if e.sqlstate() == Some("55000") => {
                    return Err(WalError::SlotLost {
                        slot: config.slot_name.clone(),
                        reason: e.to_string(),
                    }
                    .into())
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(STANDBY_RETRY) => {}
            }
        }
    }

    /// Poll-era rows: the first unpublished rows of the table not handed out yet; `None` once
    /// none is left.
    async fn read_drain(&mut self, sql: &str) -> Result<Vec<OutboxRow>, Error> {
        let limit = self.config.batch_size as i64;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&limit, &self.drained_pending];
        params.extend(self.filter.params());
        let rows = self.lease.call(self.client.query(sql, &params)).await?;
        Ok(rows.into_iter().map(|r| poll::row_from_read(&r)).collect())
    }

    /// Takes a received item into the carry. A position goes behind the events still
    /// carried (straight to the progress when none is): confirming it before they are handed
    /// out and acknowledged would skip them after a crash.
    fn take(&mut self, item: Item) {
        match item {
            Item::Position(lsn) => self.reached(lsn),
            Item::Transaction(t) => {
                let rows: Vec<OutboxRow> = t
                    .rows
                    .into_iter()
                    .filter(|r| carries(&self.config, &r.aggregate_type))
                    .collect();
                if rows.is_empty() {
                    self.reached(t.end_lsn);
                }
                let last = rows.len().saturating_sub(1);
                for (i, row) in rows.into_iter().enumerate() {
                    let ends = (i == last).then_some(t.end_lsn);
                    self.carry.push_back(Carried::Event(row, ends));
                }
            }
        }
        self.report();
    }

    fn reached(&mut self, lsn: u64) {
        match self.carry.is_empty() {
            true => self.progress.reached(lsn),
            false => self.carry.push_back(Carried::Position(lsn)),
        }
    }

    /// Hands the stream's position to the task that reports it, when it moved.
    fn report(&mut self) {
        let now = self.progress.confirmed();
        self.confirmed.send_if_modified(|c| {
            let moved = now > *c;
            *c = (*c).max(now);
            moved
        });
    }

    /// Up to `limit` carried events, in order, with the positions between them.
    fn hand_out(&mut self, limit: usize) -> Vec<OutboxRow> {
        let mut batch = Vec::new();
        while let Some(front) = self.carry.front() {
            if batch.len() == limit && matches!(front, Carried::Event(..)) {
                break;
            }
            match self.carry.pop_front().expect("a front") {
                Carried::Event(row, ends) => {
                    self.progress.handed_out(row.id, ends);
                    batch.push(row);
                }
                Carried::Position(lsn) => self.progress.reached(lsn),
            }
        }
        self.report();
        batch
    }
}

/// The smallest version an event committed from now on can get, and the WAL position it
/// comes from (the relay's guard against versions handed out again).
pub async fn next_version(client: &Client) -> Result<(i64, String), Error> {
    let at: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let lsn = parse_lsn(&at)
        .ok_or_else(|| WalError::Protocol(format!("unreadable WAL position {at:?}")))?;
    Ok((version::floor(lsn), at))
}

/// Refuses to stream while the outbox's sequence or the slot's position would let new events
/// look older than events already published (a switch from polling on a table whose `seq`
/// is past the WAL versions: never seen in practice, see [`version`]).
async fn check_versions(client: &Client, lease: &LeaderLease, first: i64) -> Result<(), Error> {
    let max: Option<i64> = lease
        .call(client.query_one("SELECT max(seq) FROM dualsync.outbox", &[]))
        .await?
        .get(0);
    if let Some(max) = max.filter(|m| *m >= first) {
        return Err(Error::SequenceBehind(format!(
            "the outbox holds seq {max}, at or above the first version the WAL capture would hand out ({first}): its events would look older than the table's"
        )));
    }
    Ok(())
}

impl OutboxCapture for WalSource {
    fn lease(&self) -> Arc<LeaderLease> {
        self.lease.clone()
    }

    fn client(&self) -> &Client {
        &self.client
    }

    /// Events handed out and not acknowledged (the WAL the slot holds back is its own
    /// gauge); the query is the lease's heartbeat on the leader session.
    async fn backlog(&self) -> Result<(i64, f64), Error> {
        self.lease
            .call(self.client.query_one("SELECT 1", &[]))
            .await?;
        Ok((self.progress.pending() as i64, 0.0))
    }

    /// Writers never wake a WAL capture: nothing to stop.
    async fn pause(&mut self) -> Result<(), Error> {
        Ok(())
    }

    /// The outbox table's purge: rows are never marked in WAL mode (the writers' trigger
    /// inserts them marked), so it runs whatever `retention_secs`, 0 deleting them at once.
    fn start_upkeep(&self, cancel: &CancellationToken) -> Option<DropGuard> {
        let stop = cancel.child_token();
        tokio::spawn(purge_published(
            self.config.url.expose().to_string(),
            AggregateFilter::new(&self.config),
            self.config.retention_secs,
            PURGE_INTERVAL,
            stop.clone(),
        ));
        Some(stop.drop_guard())
    }
}

impl Source for WalSource {
    type Event = OutboxRow;

    /// Poll-era rows first, then the stream's events in WAL order. Cancel-safe: an item
    /// received is kept in the carry until handed out.
    async fn next_batch(&mut self, cancel: &CancellationToken) -> Result<Vec<OutboxRow>, Error> {
        if let Some(sql) = self.drain.clone() {
            let rows = self.read_drain(&sql).await?;
            if !rows.is_empty() {
                for row in &rows {
                    self.progress.handed_out(row.id, None);
                    self.drained.insert(row.id);
                    self.drained_pending.push(row.seq);
                }
                return Ok(rows);
            }
            self.drain = None;
        }
        let limit = self.config.batch_size.max(1);
        while self.carry.is_empty() {
            let item = tokio::select! {
                _ = cancel.cancelled() => return Ok(Vec::new()),
                item = self.items.recv() => item,
            };
            match item {
                Some(item) => self.take(item?),
                None => return Err(WalError::Io("the replication stream ended".into()).into()),
            }
        }
        // Whatever else already arrived, up to a batch.
        while self.carry.len() < limit * 2 {
            match self.items.try_recv() {
                Ok(item) => self.take(item?),
                Err(_) => break,
            }
        }
        Ok(self.hand_out(limit))
    }

    /// Marks poll-era rows published; moves the slot past the transactions now complete.
    async fn ack(&mut self, rows: &[OutboxRow]) -> Result<(), Error> {
        let seqs: Vec<i64> = rows
            .iter()
            .filter(|r| self.drained.contains(&r.id))
            .map(|r| r.seq)
            .collect();
        if !seqs.is_empty() {
            self.lease
                .call(self.client.execute(
                    "UPDATE dualsync.outbox SET published_at = now() WHERE seq = ANY($1)",
                    &[&seqs],
                ))
                .await?;
            self.drained_pending.retain(|s| !seqs.contains(s));
        }
        self.progress.acked(rows.iter().map(|r| r.id))?;
        for row in rows {
            self.drained.remove(&row.id);
        }
        self.report();
        Ok(())
    }
}
