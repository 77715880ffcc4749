//! Sources of change events on the primary side.

pub mod aggregate_filter;
pub mod leader_lease;
pub mod mongo;
pub mod mongo_change;
pub mod mongo_key;
pub mod mongo_offsets;
pub mod mongo_reads;
pub mod outbox;
pub mod outbox_purge;
pub mod outbox_sequence;
pub mod resume_token;
pub mod wal;

use std::future::Future;
use std::sync::Arc;

use tokio_postgres::Client;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::Error;
use leader_lease::LeaderLease;

/// A primary-side change feed.
///
/// Delivery contract: at-least-once and in order per aggregate. Events returned by
/// [`Source::next_batch`] stay pending until [`Source::ack`] confirms that Kafka acknowledged
/// them; after a crash or a leader change everything not acked is returned again, in the same
/// order. A source never skips a committed change.
///
/// The relay may pipeline: call `next_batch` again while earlier batches are pending, then
/// `ack` the batches in the order they were returned. A later batch never repeats a pending
/// event, and an aggregate's events in it come after that aggregate's events in earlier
/// batches.
pub trait Source: Send {
    type Event: Send;

    /// The next batch in publication order; waits (until `cancel`) while there is none.
    fn next_batch(
        &mut self,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<Self::Event>, Error>> + Send;

    /// Marks events as published. Only call after Kafka acknowledged every one of them.
    fn ack(&mut self, events: &[Self::Event]) -> impl Future<Output = Result<(), Error>> + Send;
}

/// One committed outbox row, whichever capture read it (polling the table, or the WAL): what
/// the relay's outbox leader publishes ([`crate::mapping`] turns it into its event).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub seq: i64,
    pub id: uuid::Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// The payload as JSON text; `None` is a delete.
    pub payload: Option<String>,
    pub traceparent: Option<String>,
    pub created_at_micros: i64,
    /// When its transaction committed (see [`outbox::COMMIT_TIME`]); `created_at` where the
    /// server does not track commit timestamps.
    pub committed_at_micros: i64,
}

/// A capture of the PostgreSQL outbox: a [`Source`] of [`OutboxRow`]s held by one leader.
/// The relay's outbox leader (`crate::relay::outbox`) is written once against this trait, so
/// a second way of reading the same rows (the WAL beside [`outbox::OutboxSource`]'s polling)
/// plugs in with its own `acquire_leadership` and no copy of the loop. Delivery contract:
/// [`Source`]'s.
pub trait OutboxCapture: Source<Event = OutboxRow> {
    /// Until when this process may publish as the leader; the leader hands nothing to the
    /// producer past it, and samples the backlog at least every [`LeaderLease::heartbeat`].
    fn lease(&self) -> Arc<LeaderLease>;

    /// A session on the primary for the checks beside reading: the sequence guard reads the
    /// outbox's sequence on it (`crate::relay::versions`).
    fn client(&self) -> &Client;

    /// Rows still waiting to be published and the age in seconds of the oldest (gauges for
    /// operators; 0 when none). Also the leader's heartbeat on its session.
    fn backlog(&self) -> impl Future<Output = Result<(i64, f64), Error>> + Send;

    /// The relay was paused: stop whatever makes writers wake this capture (nothing is read
    /// until the next [`Source::next_batch`]).
    fn pause(&mut self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Starts the work that runs beside the leader for as long as it leads (the outbox
    /// table's purge after the retention); dropping the guard stops it.
    fn start_upkeep(&self, cancel: &CancellationToken) -> Option<DropGuard>;
}
