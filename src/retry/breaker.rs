//! The circuit breaker of a stage's downstream: when it opens, when it probes, when it
//! closes. Its state lives in the stage's [`Health`] (every retry of the stage shares it, and
//! `/status`, `/readyz` and `dualsync_circuit_state` read it there); the rules live here.

use std::time::Duration;

use crate::metrics::{Circuit, Health};

/// When a breaker opens and how long an open one waits before its probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Transient failures in a row that open the circuit.
    pub open_after: i64,
    /// Transient failures within [`BreakerPolicy::window`] that open it too, successes or not
    /// in between: a downstream that fails every other call never fails `open_after` times in
    /// a row, yet each of its failures costs a backoff.
    pub window_failures: usize,
    /// The failure window's length.
    pub window: Duration,
    /// The least an open circuit waits before the next attempt (its probe). Zero: the
    /// backoff's delay alone, which is what the stages use (their backoff grows anyway).
    pub cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            open_after: 3,
            window_failures: 10,
            window: Duration::from_secs(60),
            cool_down: Duration::ZERO,
        }
    }
}

/// A stage's circuit breaker. Closed: calls flow. Open: `open_after` transient failures in a
/// row, or `window_failures` within the window; the next attempt waits at least the
/// cool-down. Half-open: that attempt (the probe) is under way; its success closes the
/// circuit, its failure opens it again.
pub struct Breaker<'a> {
    health: &'a Health,
    policy: BreakerPolicy,
}

impl<'a> Breaker<'a> {
    pub fn new(health: &'a Health, policy: BreakerPolicy) -> Self {
        Self { health, policy }
    }

    pub fn state(&self) -> Circuit {
        self.health.circuit()
    }

    /// A transient failure: opens the circuit after `open_after` in a row or
    /// `window_failures` within the window, and again when a probe failed. Returns the state
    /// after it.
    pub fn failed(&self) -> Circuit {
        let cell = self.health.circuit_cell();
        let failures = cell.add_failure();
        let recent = cell.add_recent_failure(
            tokio::time::Instant::now(),
            self.policy.window,
            self.policy.window_failures,
        );
        if failures < self.policy.open_after && recent < self.policy.window_failures {
            return cell.state();
        }
        if cell.swap(Circuit::Open) == Circuit::Closed {
            tracing::warn!(
                failures,
                recent,
                window = ?self.policy.window,
                "circuit open: pausing input, probing at the backoff interval"
            );
        }
        Circuit::Open
    }

    /// How long to wait before the next attempt, given the backoff's `delay`: an open circuit
    /// waits at least its cool-down.
    pub fn delay(&self, delay: Duration) -> Duration {
        match self.state() {
            Circuit::Closed => delay,
            Circuit::Open | Circuit::HalfOpen => delay.max(self.policy.cool_down),
        }
    }

    /// The next attempt is about to be made: an open circuit half-opens for it.
    pub fn probing(&self) {
        self.health
            .circuit_cell()
            .replace(Circuit::Open, Circuit::HalfOpen);
    }

    /// A success: the circuit closes and the stage's retry episode ends.
    pub fn succeeded(&self) {
        self.health.recovered();
    }
}
