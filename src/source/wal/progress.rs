//! How far the slot may be confirmed: past a transaction only once Kafka acknowledged every
//! event of it and of every transaction before it; past a keepalive or a transaction with
//! nothing to publish once everything handed out before it is acknowledged.
//!
//! Pure bookkeeping, in hand-out order (the relay acknowledges batches in the order it got
//! them, [`crate::source::Source`]'s contract), so the rules are tested without a server.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::error::Error;

#[derive(Debug)]
enum Entry {
    /// An event handed to the relay; `ends` is its transaction's commit end when it is the
    /// transaction's last event.
    Event { id: Uuid, ends: Option<u64> },
    /// A position with nothing left to publish before it but what is queued ahead.
    Position(u64),
}

/// The events handed out and not yet acknowledged, and the position confirmed so far.
#[derive(Debug, Default)]
pub struct Progress {
    queue: VecDeque<Entry>,
    confirmed: u64,
}

impl Progress {
    /// Starts at the slot's confirmed position.
    pub fn new(confirmed: u64) -> Self {
        Self {
            queue: VecDeque::new(),
            confirmed,
        }
    }

    /// An event was handed to the relay; `ends` is set on its transaction's last event.
    pub fn handed_out(&mut self, id: Uuid, ends: Option<u64>) {
        self.queue.push_back(Entry::Event { id, ends });
    }

    /// WAL up to `lsn` holds nothing more to publish than what was handed out already (a
    /// server keepalive between transactions, a transaction without outbox events).
    pub fn reached(&mut self, lsn: u64) {
        self.queue.push_back(Entry::Position(lsn));
        self.settle();
    }

    /// Kafka acknowledged these events, the oldest handed out first.
    pub fn acked(&mut self, ids: impl IntoIterator<Item = Uuid>) -> Result<(), Error> {
        for id in ids {
            match self.queue.pop_front() {
                Some(Entry::Event { id: front, ends }) if front == id => {
                    if let Some(lsn) = ends {
                        self.confirmed = self.confirmed.max(lsn);
                    }
                }
                other => {
                    return Err(Error::Internal(format!(
                    "wal capture: event {id} acknowledged out of order (next pending: {other:?})"
                )))
                }
            }
            self.settle();
        }
        Ok(())
    }

    fn settle(&mut self) {
        while let Some(Entry::Position(lsn)) = self.queue.front() {
            self.confirmed = self.confirmed.max(*lsn);
            self.queue.pop_front();
        }
    }

    /// The position the slot may confirm: every transaction that ends at or before it is
    /// published.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Events handed out and not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| matches!(e, Entry::Event { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn a_transaction_is_confirmed_only_once_all_its_events_are_acknowledged() {
        let e = ids(3);
        let mut p = Progress::new(100);
        p.handed_out(e[0], None);
        p.handed_out(e[1], Some(200)); // first transaction ends
        p.handed_out(e[2], Some(300));
        p.acked([e[0]]).unwrap();
        assert_eq!(p.confirmed(), 100, "half a transaction confirms nothing");
        p.acked([e[1]]).unwrap();
        assert_eq!(p.confirmed(), 200);
        assert_eq!(p.pending(), 1);
        p.acked([e[2]]).unwrap();
        assert_eq!(p.confirmed(), 300);
    }

    #[test]
    fn a_keepalive_waits_for_what_was_handed_out_before_it() {
        let e = ids(1);
        let mut p = Progress::new(10);
        p.reached(50); // idle outbox, other traffic: confirmed at once
        assert_eq!(p.confirmed(), 50);
        p.handed_out(e[0], Some(80));
        p.reached(120); // keepalive while the transaction is in flight
        assert_eq!(p.confirmed(), 50);
        p.acked([e[0]]).unwrap();
        assert_eq!(p.confirmed(), 120);
    }

    #[test]
    fn never_moves_back_and_refuses_acks_out_of_order() {
        let e = ids(2);
        let mut p = Progress::new(500);
        p.reached(400);
        assert_eq!(p.confirmed(), 500);
        p.handed_out(e[0], Some(600));
        p.handed_out(e[1], Some(700));
        assert!(p.acked([e[1]]).is_err());
    }
}
