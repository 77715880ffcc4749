//! The hold on the assignment: whether apply has paused its partitions (an operator's pause, or
//! a batch that takes long, see `process_batch`), and what a rebalance must do so that the
//! partitions it hands out follow that state. Bookkeeping only, without the consumer, so it is
//! tested in-process; the consumer acts on what it answers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// A partition: `(topic, partition)`.
pub(super) type Partition = (String, i32);

/// What to do with partitions a rebalance has just assigned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum OnAssign {
    /// The assignment is held: pause them all.
    Pause,
    /// Not held: resume these, paused by a hold before they were revoked (librdkafka keeps an
    /// application pause across a revocation and a re-assignment). The others are left alone:
    /// a pause or resume right after an assignment can make librdkafka drop the assignment's
    /// fetch start (confluentinc/librdkafka#2190).
    Resume(Vec<Partition>),
}

/// Whether the assignment is held right now, and the partitions revoked while it was.
#[derive(Debug, Default)]
pub(super) struct Hold {
    held: AtomicBool,
    paused_when_revoked: Mutex<HashSet<Partition>>,
}

impl Hold {
    /// Holds (`true`) or releases the assignment; the caller pauses or resumes it.
    pub(super) fn set(&self, on: bool) {
        self.held.store(on, Ordering::SeqCst);
    }

    pub(super) fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Partitions were assigned: what to do so they follow the hold as it is now.
    pub(super) fn assigned(&self, partitions: impl IntoIterator<Item = Partition>) -> OnAssign {
        let mut stale = self.paused_when_revoked.lock().expect("not poisoned");
        if self.is_held() {
            for p in partitions {
                stale.remove(&p);
            }
            return OnAssign::Pause;
        }
        OnAssign::Resume(partitions.into_iter().filter(|p| stale.remove(p)).collect())
    }

    /// Partitions were revoked: while held they keep librdkafka's pause if handed back later.
    pub(super) fn revoked(&self, partitions: impl IntoIterator<Item = Partition>) {
        if self.is_held() {
            self.paused_when_revoked
                .lock()
                .expect("not poisoned")
                .extend(partitions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("t".to_string(), n)
    }

    #[test]
    fn partitions_assigned_while_held_are_paused() {
        let hold = Hold::default();
        hold.set(true);
        assert_eq!(hold.assigned([p(0), p(1)]), OnAssign::Pause);
        hold.set(false);
        assert_eq!(hold.assigned([p(0)]), OnAssign::Resume(vec![]));
    }

    /// A partition paused by the hold, revoked, and handed back after the hold ended is
    /// resumed (else it stays paused for good); a fresh one is left alone.
    #[test]
    fn a_partition_revoked_while_held_is_resumed_when_handed_back_later() {
        let hold = Hold::default();
        hold.set(true);
        hold.revoked([p(0)]);
        hold.set(false);
        assert_eq!(hold.assigned([p(0), p(1)]), OnAssign::Resume(vec![p(0)]));
        // Only once: it is no longer paused.
        assert_eq!(hold.assigned([p(0)]), OnAssign::Resume(vec![]));
    }

    #[test]
    fn revoked_while_not_held_is_not_remembered_and_a_new_hold_forgets_it() {
        let hold = Hold::default();
        hold.revoked([p(0)]);
        assert_eq!(hold.assigned([p(0)]), OnAssign::Resume(vec![]));
        hold.set(true);
        hold.revoked([p(1)]);
        // Handed back while still held: paused with the rest, nothing left to resume later.
        assert_eq!(hold.assigned([p(1)]), OnAssign::Pause);
        hold.set(false);
        assert_eq!(hold.assigned([p(1)]), OnAssign::Resume(vec![]));
    }
}
