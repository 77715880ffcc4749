//! The outbox leader's lease on its own session.
//!
//! The leader lock is a session advisory lock: PostgreSQL frees it when the session ends. A
//! leader whose host is cut off (power, a partition) ends nothing, and TCP alone cannot be
//! trusted to end it: a live middlebox (a proxy, a load balancer, Toxiproxy in the tests)
//! keeps answering the server's keepalives. So the lock session carries a server-side clock:
//! `idle_session_timeout = lease_secs` makes the server end it once it has waited that long
//! for a query, and the leader queries it at least every `lease_secs / 4` (the backlog sample
//! doubles as the heartbeat). The leader, in turn, counts itself the leader only until the
//! send time of its last answered query plus three quarters of the lease: the server started
//! its idle clock after it answered that query, so it cannot free the lock before the
//! leader has stopped publishing. A call on the session gets no longer than that either, so a
//! half-open connection surfaces as [`Error::LeaderSilent`] instead of a hang.
//!
//! The MongoDB relay uses the same rule for its lease document: it counts itself the leader
//! until three quarters of `lease_secs` after the send time of its last confirmed renewal.
//!
//! Take-over after a cut-off: the server frees the lock at most `lease_secs` after the last
//! answered query (at most a heartbeat before the cut), and the standby, which tries the lock
//! every 500 ms, leads within about `lease_secs` + 1 s (21 s with the default of 20).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;

/// When a standby tries the leader lock again.
pub const STANDBY_RETRY: Duration = Duration::from_millis(500);

/// The lease of one session: when it was last confirmed and how long that holds.
#[derive(Debug)]
pub struct LeaderLease {
    origin: Instant,
    /// Micros from `origin` to the send time of the latest answered query.
    confirmed_micros: AtomicU64,
    lease: Duration,
}

impl LeaderLease {
    /// A lease of `lease` (the server's `idle_session_timeout`), confirmed now.
    pub fn new(lease: Duration) -> Self {
        Self {
            origin: Instant::now(),
            confirmed_micros: AtomicU64::new(0),
            lease,
        }
    }

    /// How long after its last answered query the leader still counts itself the leader:
    /// three quarters of the lease, so a quarter is left for the leader to notice and stop
    /// (timers and a query cancelled at the deadline) before the server can free the lock.
    pub fn valid_for(&self) -> Duration {
        self.lease * 3 / 4
    }

    /// How often the leader must query the session to keep it from idling out: four times per
    /// lease, so one or two late heartbeats do not cost the leadership.
    pub fn heartbeat(&self) -> Duration {
        self.lease / 4
    }

    /// A query sent at `sent` was answered.
    pub fn confirm(&self, sent: Instant) {
        let micros = sent.saturating_duration_since(self.origin).as_micros() as u64;
        self.confirmed_micros.fetch_max(micros, Ordering::Relaxed);
    }

    /// When the leadership stops counting unless a query is answered before.
    pub fn expires_at(&self) -> Instant {
        self.origin
            + Duration::from_micros(self.confirmed_micros.load(Ordering::Relaxed))
            + self.valid_for()
    }

    /// Whether this process may still publish as the leader at `now`.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at()
    }

    /// Resolves once the lease has run out (a confirmation meanwhile moves it on).
    pub async fn lapsed(&self) {
        loop {
            let at = self.expires_at();
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at.into()).await;
        }
    }

    /// Runs a call on the session: it confirms the lease when answered, and fails with
    /// [`Error::LeaderSilent`] when the lease runs out first (the call is dropped; the caller
    /// drops the session, which frees the lock at once wherever the server still hears it).
    pub async fn call<T, E>(&self, call: impl Future<Output = Result<T, E>>) -> Result<T, Error>
    where
        Error: From<E>,
    {
        let sent = Instant::now();
        match tokio::time::timeout_at(self.expires_at().into(), call).await {
            Ok(answer) => {
                let value = answer?;
                self.confirm(sent);
                Ok(value)
            }
            Err(_) => Err(Error::LeaderSilent(self.valid_for())),
        }
    }

    /// The settings that give the session its server-side clock, plus the server's own TCP
    /// deadlines on it (which catch a vanished client where no middlebox answers for it), for
    /// a server of `server_version_num`. `idle_session_timeout` exists from PostgreSQL 14 and
    /// `tcp_user_timeout` from 12: without the former an older server frees the lock of a
    /// cut-off leader only when TCP tells it (see docs/operations.md).
    pub fn server_settings(&self, server_version_num: i32) -> String {
        let lease_ms = self.lease.as_millis();
        let mut settings = format!(
            "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = {};",
            crate::pg::KEEPALIVES_IDLE.as_secs(),
            crate::pg::KEEPALIVES_INTERVAL.as_secs(),
            crate::pg::KEEPALIVES_RETRIES,
        );
        if server_version_num >= 120_000 {
            settings += &format!(" SET tcp_user_timeout = {lease_ms};");
        }
        if server_version_num >= 140_000 {
            settings += &format!(" SET idle_session_timeout = {lease_ms};");
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_gives_up_a_quarter_lease_before_the_server_can_free_the_lock() {
        let lease = LeaderLease::new(Duration::from_secs(20));
        assert_eq!(lease.valid_for(), Duration::from_secs(15));
        assert_eq!(lease.heartbeat(), Duration::from_secs(5));
        let sent = Instant::now() + Duration::from_secs(3);
        lease.confirm(sent);
        assert!(lease.is_valid_at(sent + Duration::from_millis(14_999)));
        assert!(!lease.is_valid_at(sent + Duration::from_secs(15)));
        // The server's idle clock starts after it answered, so after `sent`: it frees the lock
        // no sooner than `sent + lease`, a quarter lease after the leader stopped.
        assert!(lease.expires_at() + Duration::from_secs(5) <= sent + Duration::from_secs(20));
    }

    #[test]
    fn an_older_answer_never_moves_the_lease_back() {
        let lease = LeaderLease::new(Duration::from_secs(8));
        let later = Instant::now() + Duration::from_secs(2);
        lease.confirm(later);
        lease.confirm(later - Duration::from_secs(1));
        let expected = later + Duration::from_secs(6);
        // Kept in whole microseconds.
        assert!(
            expected - lease.expires_at() < Duration::from_micros(1),
            "{lease:?}"
        );
    }

    #[test]
    fn the_server_clock_is_set_where_the_server_has_it() {
        let lease = LeaderLease::new(Duration::from_secs(20));
        assert!(lease
            .server_settings(150_004)
            .contains("SET idle_session_timeout = 20000;"));
        assert!(!lease
            .server_settings(130_011)
            .contains("idle_session_timeout"));
        assert!(!lease.server_settings(110_000).contains("tcp_user_timeout"));
    }

    #[tokio::test]
    async fn a_call_that_outlasts_the_lease_fails_instead_of_hanging() {
        let lease = LeaderLease::new(Duration::from_millis(40));
        let answered: Result<u8, Error> = lease.call(async { Ok::<_, Error>(1) }).await;
        assert_eq!(answered.unwrap(), 1);
        let hung: Result<(), Error> = lease
            .call(std::future::pending::<Result<(), Error>>())
            .await;
        assert!(matches!(hung, Err(Error::LeaderSilent(_))), "{hung:?}");
    }
}
