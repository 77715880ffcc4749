//! Waiting out transient failures: the one retry driver every stage uses ([`Retry`]), its
//! backoff (exponential with jitter, never giving up unless told a deadline, because skipping
//! a step would lose data) and the stage's circuit breaker ([`Breaker`]).
//!
//! What counts as transient is the error's [`Disposition`] ([`crate::error::Error::policy`]),
//! never this module's: a dead-letter or fatal error is handed back at once, never retried.

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{classify, endpoint, Disposition, Endpoint, Error};
use crate::metrics::Metrics;

mod breaker;
#[cfg(test)]
mod tests;

pub use breaker::{Breaker, BreakerPolicy};

/// The longest wait between two attempts to reach a server that is down.
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with jitter; after `max` the delay stays around `max`.
#[derive(Debug)]
pub struct Backoff {
    policy: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// From `initial` up to `max` between attempts, each delay ±50 % at random (so retries of
    /// many processes do not arrive together), growing 1.5× per attempt.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            policy: ExponentialBackoff {
                // The crate starts from `current_interval` (its default 500 ms), not from
                // `initial_interval`, until a reset: set both, or `initial` is ignored.
                current_interval: initial,
                initial_interval: initial,
                max_interval: max,
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
            max,
        }
    }

    /// Doubling from `initial` up to `max`, without jitter.
    pub fn doubling(initial: Duration, max: Duration) -> Self {
        let mut backoff = Self::new(initial, max);
        backoff.policy.randomization_factor = 0.0;
        backoff.policy.multiplier = 2.0;
        backoff
    }

    /// The same `delay` between every two attempts.
    pub fn constant(delay: Duration) -> Self {
        let mut backoff = Self::new(delay, delay);
        backoff.policy.randomization_factor = 0.0;
        backoff.policy.multiplier = 1.0;
        backoff
    }

    /// For reconnecting to a server: the library's initial interval, at most [`RECONNECT_MAX`].
    pub fn reconnect() -> Self {
        Self::new(
            Duration::from_millis(backoff::default::INITIAL_INTERVAL_MILLIS),
            RECONNECT_MAX,
        )
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.policy.next_backoff().unwrap_or(self.max)
    }
}

/// Sleeps for `delay`; `false` when `cancel` fired first.
pub async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// What to do after a failed attempt ([`Retry::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transient: [`Retry::wait`] this long, then try again.
    Again(Duration),
    /// Transient, but the time allowed ([`Retry::give_up_at`]) ran out.
    GiveUp,
    /// Not transient: the caller dead-letters or stops, as the disposition says.
    Stop(Disposition),
}

/// How [`Retry::run`] ended without a result.
#[derive(Debug)]
pub enum Stopped {
    /// The cancellation token fired while waiting between attempts.
    Cancelled,
    /// Transient failures until the time allowed ran out: the last one.
    GaveUp(Error),
    /// A failure that retrying cannot fix (dead-letter or fatal), returned at once.
    Permanent(Error),
}

impl Stopped {
    /// `Ok(None)` when cancelled, the failure otherwise: what a caller that treats
    /// cancellation as a clean stop returns.
    pub fn cancelled_or_error<T>(self) -> Result<Option<T>, Error> {
        match self {
            Stopped::Cancelled => Ok(None),
            Stopped::GaveUp(e) | Stopped::Permanent(e) => Err(e),
        }
    }
}

/// The stage a [`Retry`] counts for: `dualsync_retries_total{stage}`, the readiness's retry
/// episode and the stage's circuit breaker.
struct StageHealth<'a> {
    metrics: &'a Metrics,
    stage: &'static str,
    breaker: Breaker<'a>,
    /// Whether this retry is an episode of its own ([`Retry::episode`]), and whether one is
    /// under way.
    episode: bool,
    in_episode: bool,
}

/// The retry driver: one operation retried while its errors are transient, with a backoff, a
/// cancellation token, an optional deadline, and (for a stage) the metrics, the readiness and
/// the circuit breaker kept in step.
///
/// Two ways to use it: [`Retry::run`] for an operation that is one call; or, for a loop that
/// does more between attempts (dead-letters part of a batch, logs by episode), the steps:
/// [`Retry::failed`] with each error, [`Retry::wait`] for the delay it gives, and
/// [`Retry::succeeded`] once it worked.
pub struct Retry<'a> {
    backoff: Backoff,
    cancel: &'a CancellationToken,
    give_up_at: Option<Instant>,
    attempts: u32,
    stage: Option<StageHealth<'a>>,
}

impl<'a> Retry<'a> {
    /// Retries transient errors with `backoff` until `cancel`, for ever.
    pub fn new(backoff: Backoff, cancel: &'a CancellationToken) -> Self {
        Self {
            backoff,
            cancel,
            give_up_at: None,
            attempts: 1,
            stage: None,
        }
    }

    /// Gives up (with [`Verdict::GiveUp`]) on a transient failure at or after `at`.
    pub fn give_up_at(mut self, at: Instant) -> Self {
        self.give_up_at = Some(at);
        self
    }

    /// Gives up on a transient failure once `max_elapsed` has passed since now.
    pub fn give_up_after(self, max_elapsed: Duration) -> Self {
        self.give_up_at(Instant::now() + max_elapsed)
    }

    /// Counts each transient failure in `metrics` for `stage`, marks the retry episode in the
    /// readiness, and drives the stage's circuit breaker with `policy`.
    pub fn for_stage(
        mut self,
        metrics: &'a Metrics,
        stage: &'static str,
        policy: BreakerPolicy,
    ) -> Self {
        self.stage = Some(StageHealth {
            metrics,
            stage,
            breaker: Breaker::new(&metrics.health, policy),
            episode: false,
            in_episode: false,
        });
        self
    }

    /// This retry is an episode of its own (apply's decode or write of one share): it counts
    /// in `dualsync_retries_in_progress` while it fails, and its end (a success, or the
    /// driver dropped: dead-lettered, stopped, cancelled) marks the stage recovered.
    pub fn episode(mut self) -> Self {
        if let Some(stage) = &mut self.stage {
            stage.episode = true;
        }
        self
    }

    /// The number of the attempt under way (1 for the first).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The stage's circuit breaker, when [`Retry::for_stage`] set one.
    pub fn breaker(&self) -> Option<&Breaker<'a>> {
        self.stage.as_ref().map(|s| &s.breaker)
    }

    /// After a failed attempt with `err`: retry (after the returned delay), give up, or stop,
    /// as the error's disposition says.
    pub fn failed(&mut self, err: &Error) -> Verdict {
        self.failed_as(classify(err))
    }

    /// As [`Retry::failed`], for a failure whose disposition the caller decided.
    pub fn failed_as(&mut self, disposition: Disposition) -> Verdict {
        if disposition != Disposition::Retry {
            return Verdict::Stop(disposition);
        }
        if self.give_up_at.is_some_and(|at| Instant::now() >= at) {
            return Verdict::GiveUp;
        }
        let mut delay = self.backoff.next_delay();
        if let Some(s) = &mut self.stage {
            s.metrics.retries.with_label_values(&[s.stage]).inc();
            s.metrics.health.retrying();
            if s.episode && !s.in_episode {
                s.in_episode = true;
                s.metrics.retries_in_progress.inc();
            }
            s.breaker.failed();
            delay = s.breaker.delay(delay);
        }
        Verdict::Again(delay)
    }

    /// Waits `delay` before the next attempt, which probes an open circuit; `false` when the
    /// cancellation token fired first (at once, mid-wait).
    pub async fn wait(&mut self, delay: Duration) -> bool {
        if !sleep_unless_cancelled(delay, self.cancel).await {
            return false;
        }
        if let Some(s) = &self.stage {
            s.breaker.probing();
        }
        self.attempts += 1;
        true
    }

    /// The attempt worked: ends this retry's episode (closing the circuit).
    pub fn succeeded(&mut self) {
        let Some(s) = &mut self.stage else {
            return;
        };
        if !s.episode {
            s.breaker.succeeded();
        } else if std::mem::take(&mut s.in_episode) {
            s.metrics.retries_in_progress.dec();
            s.breaker.succeeded();
        }
    }

    /// Runs `attempt` until it succeeds, retrying transient errors; `on_retry` hears of each
    /// retried error with the delay before the next attempt.
    pub async fn run<T, F, Fut>(
        &mut self,
        mut attempt: F,
        mut on_retry: impl FnMut(&Error, Duration),
    ) -> Result<T, Stopped>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        loop {
            match attempt().await {
                Ok(t) => {
                    self.succeeded();
                    return Ok(t);
                }
                Err(e) => match self.failed(&e) {
                    Verdict::Again(delay) => {
                        on_retry(&e, delay);
                        if !self.wait(delay).await {
                            return Err(Stopped::Cancelled);
                        }
                    }
                    Verdict::GiveUp => return Err(Stopped::GaveUp(e)),
                    Verdict::Stop(_) => return Err(Stopped::Permanent(e)),
                },
            }
        }
    }
}

impl Drop for Retry<'_> {
    fn drop(&mut self) {
        if self.stage.as_ref().is_some_and(|s| s.episode) {
            self.succeeded();
        }
    }
}

/// Runs `attempt` until it succeeds, waiting out errors [`classify`] calls transient with
/// [`Backoff::reconnect`] for as long as it takes: a server that is down at start-up is
/// waited for, not a reason to exit. `Ok(None)` when `cancel` fires first.
pub async fn retry_transient<T, F, Fut>(
    what: Endpoint<'_>,
    cancel: &CancellationToken,
    attempt: F,
) -> Result<Option<T>, Error>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let told = |e: &Error, delay: Duration| {
        let at = endpoint(e, what).unwrap_or(what);
        tracing::warn!(error = %e, retry_in = ?delay, connection = %at,
            config_key = %at.config_key(), "{at} unavailable ({}); retrying", at.config_key());
    };
    match Retry::new(Backoff::reconnect(), cancel)
        .run(attempt, told)
        .await
    {
        Ok(t) => Ok(Some(t)),
        Err(stopped) => stopped.cancelled_or_error(),
    }
}
