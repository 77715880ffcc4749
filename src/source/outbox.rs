//! The PostgreSQL outbox source.
//!
//! Why this cannot skip or reorder (the two classic polling-outbox bugs):
//! - No cursor. The relay reads *unpublished* rows (`published_at IS NULL`) in `seq` order and
//!   marks them published after Kafka acknowledged them. A row whose transaction commits late,
//!   after higher-numbered rows were published, is simply still unpublished when it becomes
//!   visible: it is read on the next pass. Nothing is compared against "the last id seen".
//! - Per-aggregate commit order. The outbox's insert trigger (connectors/outbox.sql) takes a
//!   transaction-scoped advisory lock on the aggregate before drawing `seq`, so a later writer
//!   of the same aggregate draws its `seq` only after the earlier one committed. Hence, for one
//!   aggregate, higher `seq` means later commit, and a snapshot that sees a row also sees every
//!   lower-`seq` row of that aggregate: reading in `seq` order publishes each aggregate's
//!   events in commit order. (A transaction id would order by start of writing, and a plain
//!   sequence default by insert time; neither is commit order.)
//! - Pipelining without a cursor. The relay may read the next batch before earlier ones are
//!   acknowledged ([`Source`]'s contract). Rows handed out and not yet marked are *pending*:
//!   the next read excludes exactly those rows by `seq`, never a range of them. A range or a
//!   "greater than the last pending seq" bound would bring the cursor bug back in a subtler
//!   form: a row committed late below the bound (aggregate B, seq 500) would be held back
//!   while B's later rows (seq 2100, written after it committed) went out first.
//! - One active relay. The leader holds a session-level advisory lock on the same connection it
//!   reads and marks with, so if that connection dies the lock is gone and so is its ability to
//!   mark rows; a standby polling for the lock takes over and re-reads everything unmarked.
//!   A connection cut off without being closed is ended by the server's clock and, before
//!   that, given up by the leader ([`super::leader_lease`]).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Statement};
use tokio_util::sync::{CancellationToken, DropGuard};

pub use super::aggregate_filter::AggregateFilter;
use super::leader_lease::{LeaderLease, STANDBY_RETRY};
pub use super::outbox_purge::purge_published;
use super::outbox_purge::PURGE_INTERVAL;
pub use super::OutboxRow;
use super::{OutboxCapture, Source};
use crate::config::OutboxSourceConfig;
use crate::error::Error;
use crate::metrics::Health;

/// The outbox DDL, applied by `dualsync outbox migrate` and by tests.
pub const OUTBOX_DDL: &str = include_str!("../../connectors/outbox.sql");
/// Channel the outbox trigger notifies.
pub const NOTIFY_CHANNEL: &str = "dualsync_outbox";
/// The leader's read: the first unpublished rows in `seq` order that are not pending ($2).
/// The last column is the commit time, here the insert time: [`COMMIT_TIME`] replaces it
/// where the server tracks commit timestamps.
pub const READ_BATCH: &str =
    "SELECT seq, id, aggregatetype, aggregateid, type, payload::text, traceparent,
        (extract(epoch FROM created_at) * 1000000)::int8,
        (extract(epoch FROM created_at) * 1000000)::int8
    FROM dualsync.outbox WHERE published_at IS NULL AND seq <> ALL($2)
    ORDER BY seq LIMIT $1";
/// A row's commit time with `track_commit_timestamp = on`: its inserting transaction's commit
/// timestamp (the row is unpublished, so never updated: `xmin` is that transaction). NULL for
/// transactions committed before the setting was turned on: the insert time then.
pub(super) const COMMIT_TIME: &str = "coalesce(pg_xact_commit_timestamp(xmin), created_at)";
/// Settings of the leader's session (see [`OutboxSource::acquire_leadership`] for why).
pub const SESSION_SETTINGS: &str = "SET enable_sort = off; SET synchronous_commit = off;
    SET plan_cache_mode = force_custom_plan";
/// First key of the relay's leader lock (the second is derived from the pipeline name).
pub(super) const LEADER_LOCK_CLASS: i32 = 0x6473_796e; // "dsyn"
/// First key of the lock a relay holds while it waits for work, which tells writers to notify
/// it (connectors/outbox.sql, `outbox_notify`); the second is the leader lock's.
pub const WAIT_LOCK_CLASS: i32 = 0x6473_7977; // "dsyw"
/// How soon a relay that cannot start waiting (a writer that did not notify has not committed
/// yet) looks again.
const UNNOTIFIED_WRITER_RECHECK: Duration = Duration::from_millis(5);
/// Takes the wait lock unless this session holds it already (a cancelled call may have taken it
/// without recording so; taking it twice would need two unlocks).
const TAKE_WAIT_LOCK: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
        AND pid = pg_backend_pid() AND classid = $1::int4::oid AND objid = $2::int4::oid
        AND objsubid = 2 AND granted) OR pg_try_advisory_lock($1, $2)";
/// Releases the wait lock if this session holds it.
const RELEASE_WAIT_LOCK: &str = "SELECT pg_advisory_unlock($1, $2) FROM pg_locks
    WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND classid = $1::int4::oid
        AND objid = $2::int4::oid AND objsubid = 2 AND granted";

/// The leader's session: holds the lock, reads, marks.
pub struct OutboxSource {
    client: Client,
    wakeups: mpsc::Receiver<()>,
    connection_task: tokio::task::JoinHandle<()>,
    config: OutboxSourceConfig,
    /// Rows returned by `next_batch` and not yet marked by `ack`, by `seq`.
    pending: std::collections::BTreeSet<i64>,
    /// When the last read found nothing: the next one waits for NOTIFY or the poll interval.
    last_empty_read: Option<std::time::Instant>,
    /// When the last read found rows but fewer than a batch: rows are arriving and the outbox
    /// is drained. The next read comes `linger_ms` after it, without the wait lock and a
    /// NOTIFY: under a steady load a batch costs one read instead of four round trips.
    last_short_read: Option<std::time::Instant>,
    /// The aggregate types this pipeline publishes: parameters of the read and the backlog query.
    filter: AggregateFilter,
    /// The read and the mark, prepared once per session.
    statements: Statements,
    /// The second key of this relay's wait lock, registered in `dualsync.outbox_relays`;
    /// `None` on an outbox migrated before that table existed (every insert notifies there).
    wait_key: Option<i32>,
    /// Whether this relay waits for a NOTIFY: it holds its wait lock (writers notify it), or
    /// has none to hold (every insert notifies).
    waiting: bool,
    /// A lock statement was cancelled before its answer: whether the lock is held is unknown
    /// until the next (idempotent) take or release.
    wait_lock_uncertain: bool,
    /// Until when this session may count itself the leader; bounds every call on it.
    lease: Arc<LeaderLease>,
}

/// The leader's per-batch statements, prepared once per session: a statement prepared per
/// call costs a second round trip and a parse in PostgreSQL on every batch (at 1,000 events/s
/// the relay makes ~140 batches a second). `plan_cache_mode = force_custom_plan` (in
/// [`SESSION_SETTINGS`]) still plans each read with its parameters' values, so the pending
/// seqs are looked up in a hash table as before.
struct Statements {
    read: Statement,
    /// Marks rows published, or deletes them when `retention_secs = 0`: a delete costs
    /// PostgreSQL about a fifth of the update, which writes a new version of every row.
    mark: Statement,
}

impl Statements {
    async fn prepare(client: &Client, read_sql: &str, retention_secs: u64) -> Result<Self, Error> {
        let mark = if retention_secs == 0 {
            "DELETE FROM dualsync.outbox WHERE seq = ANY($1)"
        } else {
            "UPDATE dualsync.outbox SET published_at = now() WHERE seq = ANY($1)"
        };
        Ok(Self {
            read: client.prepare(read_sql).await?,
            mark: client.prepare(mark).await?,
        })
    }
}

pub(crate) async fn check_outbox(client: &Client) -> Result<(), Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('dualsync.outbox') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Err(Error::Schema(
            "table dualsync.outbox does not exist in the source database: run `dualsync outbox migrate --config <file>` (or apply connectors/outbox.sql)".into(),
        ));
    }
    Ok(())
}

impl Drop for OutboxSource {
    fn drop(&mut self) {
        // Dropping the connection releases the leader lock at once.
        self.connection_task.abort();
    }
}

/// Applies the outbox DDL (idempotent).
pub async fn migrate(client: &Client) -> Result<(), Error> {
    client.batch_execute(OUTBOX_DDL).await?;
    Ok(())
}

/// Whether the server records commit timestamps (`track_commit_timestamp`, set at server
/// start). Without them apply's lag counts from the insert, which over-states it by the rest
/// of the writing transaction.
pub(super) async fn tracks_commit_timestamps(client: &Client) -> Result<bool, Error> {
    let on = client
        .query_one("SHOW track_commit_timestamp", &[])
        .await?
        .get::<_, String>(0)
        == "on";
    if !on {
        tracing::info!("track_commit_timestamp is off on the primary: lag is measured from each outbox row's insert, not its commit");
    }
    Ok(on)
}

/// FNV-1a of the pipeline name: stable across builds, so relays of different versions agree.
pub(super) fn leader_lock_key(pipeline: &str) -> i32 {
    let hash = pipeline.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash as i32
}

impl OutboxSource {
    /// Connects and waits until this process holds the pipeline's leader lock (standby until
    /// then). Returns `Ok(None)` when cancelled while waiting.
    pub async fn acquire_leadership(
        config: &OutboxSourceConfig,
        pipeline: &str,
        health: &Health,
        cancel: &CancellationToken,
    ) -> Result<Option<Self>, Error> {
        let (client, mut connection) = crate::pg::connect_raw(config.url.expose()).await?;
        let (wake_tx, wakeups) = mpsc::channel(1);
        let connection_task = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => {
                        // A full channel already holds a wake-up: notifications coalesce.
                        let _ = wake_tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox connection lost");
                        break;
                    }
                }
            }
        });
        let filter = AggregateFilter::new(config);
        let lease = Arc::new(LeaderLease::new(Duration::from_secs(config.lease_secs)));
        let commit_times = lease.call(tracks_commit_timestamps(&client)).await?;
        lease.call(check_outbox(&client)).await?;
        lease
            .call(super::wal::setup::check_writers_lock(&client))
            .await?;
        // The read must walk the `outbox_unpublished` index in `seq` order and stop after a
        // batch. When the table grew since its last ANALYZE (a backlog: just what the relay
        // has to catch up on), the planner expects a few rows and instead fetches every
        // unpublished row and sorts them, per batch: 60 ms instead of 2 ms at 68,000 rows,
        // growing with the backlog. This session runs no query that needs a sort.
        // Its only writes are the marks (and purges), which need not wait for the WAL flush:
        // a mark lost in a server crash leaves its rows unpublished, so they are published
        // again (a duplicate, never a loss), and the next read no longer queues behind an
        // fsync (measured at light load: stalls of 100-200 ms while PostgreSQL checkpoints).
        lease.call(client.batch_execute(SESSION_SETTINGS)).await?;
        // The server's clock on this session, so that a cut-off leader's lock is freed.
        let version: i32 = lease
            .call(client.query_one("SELECT current_setting('server_version_num')::int4", &[]))
            .await?
            .get(0);
        if version < 140_000 {
            tracing::warn!(server_version_num = version, "the source server predates PostgreSQL 14 (no idle_session_timeout): the leader lock of a relay cut off behind a live proxy is freed only when TCP notices, so a standby may wait long to take over");
        }
        lease
            .call(client.batch_execute(&lease.server_settings(version)))
            .await?;
        let read_sql = filter.read_batch_sql(commit_times);
        let statements = lease
            .call(Statements::prepare(
                &client,
                &read_sql,
                config.retention_secs,
            ))
            .await?;
        let mut source = Self {
            client,
            wakeups,
            connection_task,
            config: config.clone(),
            pending: Default::default(),
            last_empty_read: None,
            last_short_read: None,
            statements,
            filter,
            wait_key: None,
            waiting: false,
            wait_lock_uncertain: false,
            lease,
        };
        // Connected: a standby is as healthy as the leader.
        health.set_database_up(true);
        health.recovered();
        health.set_started();
        let key = leader_lock_key(pipeline);
        let mut announced = false;
        loop {
            let row = source
                .lease
                .call(source.client.query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&LEADER_LOCK_CLASS, &key],
                ))
                .await?;
            if row.get::<_, bool>(0) {
                tracing::info!(pipeline, "relay is the active leader");
                source
                    .lease
                    .call(
                        source
                            .client
                            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}")),
                    )
                    .await?;
                source.wait_key = source.register(pipeline, key).await?;
                return Ok(Some(source));
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
    }

    /// Registers this pipeline's wait lock with the outbox's writers. `None` when the outbox
    /// predates `dualsync.outbox_relays`: writers then notify on every insert.
    async fn register(&self, pipeline: &str, key: i32) -> Result<Option<i32>, Error> {
        let exists: bool = self
            .lease
            .call(self.client.query_one(
                "SELECT to_regclass('dualsync.outbox_relays') IS NOT NULL",
                &[],
            ))
            .await?
            .get(0);
        if !exists {
            tracing::warn!(pipeline, "dualsync.outbox_relays is missing: every outbox insert sends a NOTIFY, which serialises the writers' commits; run `dualsync outbox migrate` to update the outbox");
            return Ok(None);
        }
        self.lease
            .call(self.client.execute(
                "INSERT INTO dualsync.outbox_relays (lock_key, pipeline) VALUES ($1, $2)
                 ON CONFLICT (lock_key) DO NOTHING",
                &[&key, &pipeline],
            ))
            .await?;
        Ok(Some(key))
    }

    /// Starts waiting for work: takes the wait lock, so that writers notify. `false` while a
    /// writer that skipped its notification has not committed (it holds the lock shared).
    /// Without a registered lock (an outbox older than `dualsync.outbox_relays`) every insert
    /// notifies, so waiting needs nothing taken.
    async fn start_waiting(&mut self) -> Result<bool, Error> {
        if self.waiting && !self.wait_lock_uncertain {
            return Ok(true);
        }
        let Some(key) = self.wait_key else {
            self.waiting = true;
            return Ok(true);
        };
        self.wait_lock_uncertain = true;
        let taken = self
            .lease
            .call(
                self.client
                    .query_one(TAKE_WAIT_LOCK, &[&WAIT_LOCK_CLASS, &key]),
            )
            .await?
            .get(0);
        self.waiting = taken;
        self.wait_lock_uncertain = false;
        Ok(taken)
    }

    /// Stops waiting (busy, or paused): writers skip the NOTIFY, so their commits do not queue
    /// behind one another.
    async fn stop_waiting(&mut self) -> Result<(), Error> {
        if !self.waiting && !self.wait_lock_uncertain {
            return Ok(());
        }
        // Not waiting any more: read before waiting again (writers stop notifying now).
        self.last_empty_read = None;
        if let Some(key) = self.wait_key {
            self.wait_lock_uncertain = true;
            self.lease
                .call(
                    self.client
                        .query(RELEASE_WAIT_LOCK, &[&WAIT_LOCK_CLASS, &key]),
                )
                .await?;
        }
        self.waiting = false;
        self.wait_lock_uncertain = false;
        Ok(())
    }

    /// The first unpublished rows in `seq` order that are not pending.
    async fn read(&self) -> Result<Vec<OutboxRow>, Error> {
        let limit = self.config.batch_size as i64;
        let pending: Vec<i64> = self.pending.iter().copied().collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&limit, &pending];
        params.extend(self.filter.params());
        let rows = self
            .lease
            .call(self.client.query(&self.statements.read, &params))
            .await?;
        Ok(rows.into_iter().map(|r| row_from_read(&r)).collect())
    }
}

/// An outbox row from a query that selects the columns of [`READ_BATCH`], in its order (the
/// polling read, and the WAL relay's publication of rows polling left).
pub(super) fn row_from_read(r: &tokio_postgres::Row) -> OutboxRow {
    OutboxRow {
        seq: r.get(0),
        id: r.get(1),
        aggregate_type: r.get(2),
        aggregate_id: r.get(3),
        event_type: r.get(4),
        payload: r.get(5),
        traceparent: r.get(6),
        created_at_micros: r.get(7),
        committed_at_micros: r.get(8),
    }
}

impl OutboxCapture for OutboxSource {
    /// The session's lease: whether this process may still publish as the leader, and how
    /// often the session must be queried (the backlog sample is that query).
    fn lease(&self) -> Arc<LeaderLease> {
        self.lease.clone()
    }

    /// The leader's session, the one it reads and marks with.
    fn client(&self) -> &Client {
        &self.client
    }

    /// Rows of this pipeline's aggregate types still waiting to be published (a gauge for
    /// operators): unpublished rows and the age in seconds of the oldest one (0 when none).
    async fn backlog(&self) -> Result<(i64, f64), Error> {
        let row = self
            .lease
            .call(self.client.query_one(
                &format!(
                    "SELECT count(*),
                        coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
                     FROM dualsync.outbox WHERE published_at IS NULL {}",
                    self.filter.condition(1)
                ),
                &self.filter.params(),
            ))
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// A paused relay is not waiting for rows: writers need not notify it.
    async fn pause(&mut self) -> Result<(), Error> {
        self.stop_waiting().await
    }

    /// The purge of published rows past `retention_secs`, on a connection of its own
    /// (retention 0 deletes rows as they are marked instead).
    fn start_upkeep(&self, cancel: &CancellationToken) -> Option<DropGuard> {
        (self.config.retention_secs > 0).then(|| {
            let stop = cancel.child_token();
            tokio::spawn(purge_published(
                self.config.url.expose().to_string(),
                AggregateFilter::new(&self.config),
                self.config.retention_secs,
                PURGE_INTERVAL,
                stop.clone(),
            ));
            stop.drop_guard()
        })
    }
}

impl Source for OutboxSource {
    type Event = OutboxRow;

    /// Cancel-safe: a read cancelled before it returned leaves nothing pending, and a wait
    /// cancelled (the relay wakes up every few seconds to sample the backlog) keeps its poll
    /// deadline, so the outbox is still read only on NOTIFY or once per poll interval.
    async fn next_batch(&mut self, cancel: &CancellationToken) -> Result<Vec<OutboxRow>, Error> {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let linger = Duration::from_millis(self.config.linger_ms);
        loop {
            if let Some(at) = self.last_short_read {
                // Cancelled here (an acknowledgement came first), the next call sleeps the rest.
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(Vec::new()),
                    _ = tokio::time::sleep_until((at + linger).into()) => {}
                }
                self.last_short_read = None;
            }
            let wait = self
                .last_empty_read
                .map_or(Duration::ZERO, |t| poll.saturating_sub(t.elapsed()));
            if wait.is_zero() {
                let rows = self.read().await?;
                if !rows.is_empty() {
                    // Found by the poll while waiting: busy now. Before the rows become
                    // pending: cancelled here, they are simply read again.
                    self.stop_waiting().await?;
                    self.last_empty_read = None;
                    if rows.len() < self.config.batch_size {
                        self.last_short_read = Some(std::time::Instant::now());
                    }
                    self.pending.extend(rows.iter().map(|r| r.seq));
                    return Ok(rows);
                }
                if !self.waiting || self.wait_lock_uncertain {
                    // Read again once waiting: a writer that committed between the read and
                    // the lock did not notify.
                    if !self.start_waiting().await? {
                        tokio::select! {
                            _ = cancel.cancelled() => return Ok(Vec::new()),
                            _ = tokio::time::sleep(UNNOTIFIED_WRITER_RECHECK) => {}
                        }
                    }
                    continue;
                }
                self.last_empty_read = Some(std::time::Instant::now());
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(Vec::new()),
                woke = self.wakeups.recv() => {
                    // Before the linger: a wait cancelled during it must still read.
                    self.last_empty_read = None;
                    if woke.is_none() {
                        continue; // connection ended: the next read reports it
                    }
                    // Busy from here: writers stop notifying.
                    self.stop_waiting().await?;
                    // Let the rest of a burst commit so batches fill up.
                    if !linger.is_zero() {
                        tokio::time::sleep(linger).await;
                    }
                }
                _ = tokio::time::sleep(wait) => self.last_empty_read = None,
            }
        }
    }

    /// Marks the rows published, or deletes them when `retention_secs = 0`.
    async fn ack(&mut self, rows: &[OutboxRow]) -> Result<(), Error> {
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        self.lease
            .call(self.client.execute(&self.statements.mark, &[&seqs]))
            .await?;
        // Only now: a read between the statement's commit and here still excludes them, which
        // is harmless; the reverse order would let a read return rows still being marked.
        for seq in &seqs {
            self.pending.remove(seq);
        }
        Ok(())
    }
}
