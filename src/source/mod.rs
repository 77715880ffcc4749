//! Sources of change events on the primary side.

pub mod aggregate_filter;
pub mod leader_lease;
pub mod mongo;
pub mod mongo_change;
pub mod mongo_key;
pub mod mongo_offsets;
pub mod mongo_reads;
pub mod outbox;
pub mod outbox_sequence;
pub mod resume_token;
pub mod wal;

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::error::Error;

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
