//! Waiting out transient failures: the one backoff policy (exponential with jitter, never
//! giving up, because skipping a step would lose data) and the start-up wait for a server.
//!
//! What counts as transient is [`classify`]'s decision, never this module's.

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;
use tokio_util::sync::CancellationToken;

use crate::error::{classify, endpoint, Disposition, Endpoint, Error};

/// The longest wait between two attempts to reach a server that is down.
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with jitter that never gives up; after `max` the delay stays at `max`.
#[derive(Debug)]
pub struct Backoff {
    policy: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// From `initial` up to `max` between attempts.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            policy: ExponentialBackoff {
                initial_interval: initial,
                max_interval: max,
                max_elapsed_time: None,
                ..ExponentialBackoff::default()
            },
            max,
        }
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

    /// Waits out the next delay; `false` when `cancel` fired first.
    pub async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        sleep_unless_cancelled(delay, cancel).await
    }
}

/// Sleeps for `delay`; `false` when `cancel` fired first.
pub async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
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
    let mut policy = Backoff::reconnect();
    loop {
        match attempt().await {
            Ok(t) => return Ok(Some(t)),
            Err(e) if classify(&e) == Disposition::Retry => {
                let delay = policy.next_delay();
                let at = endpoint(&e, what).unwrap_or(what);
                tracing::warn!(error = %e, retry_in = ?delay, connection = %at,
                    config_key = %at.config_key(), "{at} unavailable ({}); retrying", at.config_key());
                if !sleep_unless_cancelled(delay, cancel).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}
