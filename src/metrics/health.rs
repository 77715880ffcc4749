//! A stage's health: what `/readyz` and `/status` report on (started, database and brokers
//! reachable, the circuit breaker, retries in progress, writes that do not finish, refusals
//! and lasting warnings). Stages set it as they connect, fail and recover.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What `/readyz` reports on. Stages set these as they connect, fail and recover.
#[derive(Default)]
pub struct Health {
    /// Set once the stage connected to its database(s) and subscribed or took its role.
    started: AtomicBool,
    database_down: AtomicBool,
    broker_down: AtomicBool,
    /// Since when (process-relative millis + 1; 0 = not retrying) the stage has been retrying.
    retrying_since_ms: AtomicI64,
    /// The stage's circuit breaker, as the readiness and the gauge see it.
    circuit: CircuitCell,
    origin: OnceInstant,
    /// Why the stage refuses to work until an operator acts (not ready while set).
    refusing: Mutex<Option<String>>,
    /// Lasting conditions an operator should fix, for `/status` (e.g. a topic less durable
    /// than required); each once.
    warnings: Mutex<Vec<String>>,
    /// Writes under way (the watchdog's view): a write that stays unfinished past its
    /// threshold makes the process not ready, before the call's own deadline cuts it off.
    writes: Mutex<WritesInFlight>,
}

#[derive(Default)]
struct WritesInFlight {
    next_id: u64,
    open: std::collections::BTreeMap<u64, WriteInFlight>,
}

struct WriteInFlight {
    /// What is written to, as a reason names it: `sink postgres (sinks.postgres.url)`.
    target: String,
    since: Instant,
    stuck_after: Duration,
}

/// A write [`Health::write_started`] is watching; dropping it ends the watch.
pub struct WriteWatch<'a> {
    health: &'a Health,
    id: u64,
}

impl Drop for WriteWatch<'_> {
    fn drop(&mut self) {
        let mut writes = self.health.writes.lock().expect("writes lock");
        writes.open.remove(&self.id);
    }
}

/// An `Instant` fixed at first use, so times can be kept in atomics as offsets.
#[derive(Default)]
struct OnceInstant(Mutex<Option<Instant>>);

impl OnceInstant {
    fn elapsed_ms(&self) -> i64 {
        let mut guard = self.0.lock().expect("instant lock");
        guard.get_or_insert_with(Instant::now).elapsed().as_millis() as i64
    }
}

/// Why a process is not ready; empty when it is.
pub type NotReady = Vec<String>;

/// The circuit breaker around a stage's downstream (the sink for apply; the primary and the
/// broker for the relay). Closed: writes flow. Open: repeated transient failures; the failing
/// call is tried again after each backoff interval (a probe) and nothing new is read
/// meanwhile, because the stage waits on that call. The state itself pauses nothing: apply
/// pauses its partitions by time, once a batch has run for a second (to keep its group
/// membership, `apply::process_batch`), whatever the circuit says. Half-open: a probe is under
/// way; its success closes the circuit, its failure opens it again. Exposed in `/status`,
/// `/readyz` and `dualsync_circuit_state` (0 closed, 1 open, 2 half-open). When it opens and
/// probes is `crate::retry`'s decision (its `Breaker`); this module keeps the state every
/// retry of the stage shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

/// The breaker's shared state: every retry of a stage (apply's topics write concurrently)
/// counts into it, and `/status`, `/readyz` and the gauge read it. Only storage: the rules
/// that move it are `crate::retry`'s.
#[derive(Default)]
pub struct CircuitCell {
    state: AtomicU8,
    /// Transient failures in a row; reset by a success.
    failures: AtomicI64,
    /// When the recent failures happened, successes or not in between (the breaker's failure
    /// window; oldest first). Tokio's clock, so paused-time tests drive it.
    recent: Mutex<VecDeque<tokio::time::Instant>>,
}

impl CircuitCell {
    pub fn state(&self) -> Circuit {
        match self.state.load(Ordering::Relaxed) {
            1 => Circuit::Open,
            2 => Circuit::HalfOpen,
            _ => Circuit::Closed,
        }
    }
    /// Transient failures in a row so far.
    pub fn failures(&self) -> i64 {
        self.failures.load(Ordering::Relaxed)
    }
    /// Counts one more failure in a row; returns the count.
    pub fn add_failure(&self) -> i64 {
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Notes a failure at `now` in the failure window; returns how many failures happened
    /// within `window` up to now (this one included). Keeps at most `keep` of them.
    pub fn add_recent_failure(
        &self,
        now: tokio::time::Instant,
        window: Duration,
        keep: usize,
    ) -> usize {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|&at| now.duration_since(at) > window || recent.len() > keep)
        {
            recent.pop_front();
        }
        recent.len()
    }
    /// Failures noted in the failure window (as of the last one).
    pub fn recent_failures(&self) -> usize {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// Sets the state; returns the one before.
    pub fn swap(&self, to: Circuit) -> Circuit {
        match self.state.swap(to as u8, Ordering::Relaxed) {
            1 => Circuit::Open,
            2 => Circuit::HalfOpen,
            _ => Circuit::Closed,
        }
    }
    /// Moves `from` to `to`; `false` when the state was not `from`.
    pub fn replace(&self, from: Circuit, to: Circuit) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
    /// A success: no failures in a row, closed; returns whether it was not closed. A circuit
    /// that was open or probing also forgets its failure window (the probe's success is a new
    /// start); a closed one keeps it, so failures between successes still add up.
    pub fn close(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        let was_open = self.swap(Circuit::Closed) != Circuit::Closed;
        if was_open {
            self.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        was_open
    }
}

impl Health {
    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }
    pub fn set_database_up(&self, up: bool) {
        self.database_down.store(!up, Ordering::Relaxed);
    }
    pub fn set_broker_up(&self, up: bool) {
        self.broker_down.store(!up, Ordering::Relaxed);
    }
    /// The circuit breaker's state.
    pub fn circuit(&self) -> Circuit {
        self.circuit.state()
    }
    /// The breaker's shared state, for `crate::retry`'s `Breaker`.
    pub fn circuit_cell(&self) -> &CircuitCell {
        &self.circuit
    }
    /// Marks the start of a retry episode (only the first call of an episode counts).
    pub fn retrying(&self) {
        let now = self.origin.elapsed_ms() + 1;
        let _ =
            self.retrying_since_ms
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }
    /// The stage works again: the retry episode ends and the circuit closes.
    pub fn recovered(&self) {
        self.retrying_since_ms.store(0, Ordering::Relaxed);
        if self.circuit.close() {
            tracing::info!("circuit closed: writes succeed again");
        }
    }
    /// The stage refuses to work (`Some(why and what to do)`) or works again (`None`).
    pub fn set_refusing(&self, why: Option<String>) {
        *self.refusing.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
    /// Adds a lasting warning for `/status` (a repeat is ignored).
    pub fn warn(&self, warning: String) {
        let mut warnings = self.warnings.lock().unwrap_or_else(|p| p.into_inner());
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    }
    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// How long the current retry episode has lasted, if one is running.
    pub fn retrying_for(&self) -> Option<Duration> {
        match self.retrying_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(
                (self.origin.elapsed_ms() + 1 - since).max(0) as u64,
            )),
        }
    }
    /// Watches a write to `target` from now until the returned guard is dropped: unfinished
    /// after `stuck_after` (a call waiting on a lock or a half-open connection, or retried
    /// after its deadline), it makes the process not ready, with a reason naming `target` and
    /// for how long.
    pub fn write_started(&self, target: String, stuck_after: Duration) -> WriteWatch<'_> {
        let mut writes = self.writes.lock().expect("writes lock");
        writes.next_id += 1;
        let id = writes.next_id;
        writes.open.insert(
            id,
            WriteInFlight {
                target,
                since: Instant::now(),
                stuck_after,
            },
        );
        WriteWatch { health: self, id }
    }

    /// The reasons the process is not ready (empty = ready). A retry episode longer than
    /// `stuck_after` counts as stuck.
    pub fn not_ready(&self, stuck_after: Duration) -> NotReady {
        let mut reasons = Vec::new();
        {
            let writes = self.writes.lock().expect("writes lock");
            // The longest-running stuck write of each target.
            let mut stuck: Vec<(&str, Duration)> = Vec::new();
            for w in writes.open.values() {
                let age = w.since.elapsed();
                if age < w.stuck_after {
                    continue;
                }
                match stuck.iter_mut().find(|(t, _)| *t == w.target) {
                    Some((_, d)) => *d = (*d).max(age),
                    None => stuck.push((&w.target, age)),
                }
            }
            for (target, age) in stuck {
                reasons.push(format!(
                    "{target}: a write unfinished for {}s (waiting for an answer or retrying)",
                    age.as_secs()
                ));
            }
        }
        if !self.started.load(Ordering::Relaxed) {
            reasons.push("starting: not connected to its database and broker yet".to_string());
        }
        if self.database_down.load(Ordering::Relaxed) {
            reasons.push("database unreachable".to_string());
        }
        if self.broker_down.load(Ordering::Relaxed) {
            reasons.push("all Kafka brokers unreachable".to_string());
        }
        match self.circuit() {
            Circuit::Closed => {}
            c => reasons.push(format!(
                "circuit {}: {} failures in a row, {} in its failure window; input paused, \
                 probing at the backoff interval",
                c.as_str(),
                self.circuit.failures(),
                self.circuit.recent_failures()
            )),
        }
        if let Some(why) = self
            .refusing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            reasons.push(why);
        }
        if let Some(d) = self.retrying_for().filter(|d| *d >= stuck_after) {
            reasons.push(format!("retrying a transient failure for {}s", d.as_secs()));
        }
        reasons
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reports_each_reason() {
        let h = Health::default();
        assert_eq!(h.not_ready(Duration::ZERO).len(), 1);
        h.set_started();
        assert!(h.not_ready(Duration::from_secs(30)).is_empty());
        h.retrying();
        assert!(
            h.not_ready(Duration::from_secs(30)).is_empty(),
            "not stuck yet"
        );
        assert_eq!(h.not_ready(Duration::ZERO).len(), 1, "stuck at once with 0");
        h.recovered();
        {
            let _write = h.write_started("sink pg (sinks.pg.url)".into(), Duration::ZERO);
            let reasons = h.not_ready(Duration::from_secs(30));
            assert_eq!(reasons.len(), 1, "{reasons:?}");
            assert!(reasons[0].starts_with("sink pg (sinks.pg.url): a write unfinished for 0s"));
            let _young = h.write_started("sink m".into(), Duration::from_secs(60));
            assert_eq!(
                h.not_ready(Duration::from_secs(30)).len(),
                1,
                "not stuck yet"
            );
        }
        assert!(
            h.not_ready(Duration::from_secs(30)).is_empty(),
            "watch ended"
        );
        h.set_broker_up(false);
        assert_eq!(
            h.not_ready(Duration::ZERO),
            vec!["all Kafka brokers unreachable"]
        );
    }
}
