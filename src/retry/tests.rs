//! The retry driver on paused time (`start_paused`): backoff, jitter bounds, give-up, permanent
//! errors, the breaker and cancellation, in virtual milliseconds and without servers.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::metrics::{Circuit, Metrics};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A transient error (a sink that did not answer) and a permanent one (a refused record).
fn transient() -> Error {
    Error::SinkTimeout {
        sink: "s".into(),
        after_ms: 1,
    }
}

#[test]
fn doubling_backoff_grows_to_its_cap() {
    let mut b = Backoff::doubling(ms(500), Duration::from_secs(10));
    let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
    assert_eq!(
        delays,
        [500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
    );
    let mut c = Backoff::constant(ms(200));
    assert!((0..5).all(|_| c.next_delay() == ms(200)));
}

/// Each delay is within ±50 % of its nominal value (growing 1.5× from `initial`, capped at
/// `max`). Failed before the fix: the first delays were around the crate's default 500 ms,
/// whatever `initial` (`apply.retry_initial_ms`) said.
#[test]
fn jittered_delays_stay_within_their_bounds_from_the_first() {
    for _ in 0..20 {
        let mut b = Backoff::new(ms(100), ms(1000));
        let mut nominal = 100.0_f64;
        for n in 0..12 {
            let d = b.next_delay().as_secs_f64() * 1000.0;
            assert!(
                d >= nominal * 0.5 - 1.0 && d <= nominal * 1.5 + 1.0,
                "delay {n}: {d} ms, nominal {nominal} ms"
            );
            nominal = if nominal >= 1000.0 / 1.5 {
                1000.0
            } else {
                nominal * 1.5
            };
        }
    }
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_after_each_delay() {
    let cancel = CancellationToken::new();
    let calls = AtomicU32::new(0);
    let start = Instant::now();
    let mut told = Vec::new();
    let mut retry = Retry::new(Backoff::constant(ms(250)), &cancel);
    let result = retry
        .run(
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0..=2 => Err(transient()),
                    n => Ok(n),
                }
            },
            |_, delay| told.push(delay),
        )
        .await;
    assert_eq!(result.unwrap(), 3);
    assert_eq!(told, [ms(250); 3]);
    assert_eq!(retry.attempts(), 4);
    assert_eq!(start.elapsed(), ms(750));
}

#[tokio::test(start_paused = true)]
async fn gives_up_once_the_time_allowed_ran_out() {
    let cancel = CancellationToken::new();
    let calls = AtomicU32::new(0);
    let start = Instant::now();
    let result = Retry::new(Backoff::constant(ms(1000)), &cancel)
        .give_up_after(ms(3500))
        .run(
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(transient())
            },
            |_, _| {},
        )
        .await;
    // Attempts at 0, 1, 2, 3 s waited out; the one at 4 s is past 3.5 s: given up.
    assert!(matches!(
        result,
        Err(Stopped::GaveUp(Error::SinkTimeout { .. }))
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(start.elapsed(), ms(4000));
}

#[tokio::test(start_paused = true)]
async fn dead_letter_and_fatal_errors_are_never_retried() {
    let cancel = CancellationToken::new();
    let start = Instant::now();
    for (error, disposition) in [
        (
            (|| Error::Rejected("no".into())) as fn() -> Error,
            Disposition::DeadLetter,
        ),
        (|| Error::Internal("bug".into()), Disposition::Fatal),
    ] {
        let calls = AtomicU32::new(0);
        let mut retry = Retry::new(Backoff::constant(ms(1000)), &cancel);
        let result = retry
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>(error())
                },
                |_, _| panic!("not retried"),
            )
            .await;
        assert!(matches!(result, Err(Stopped::Permanent(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(retry.failed(&error()), Verdict::Stop(disposition));
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn cancellation_ends_the_wait_at_once() {
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ms(1500)).await;
        canceller.cancel();
    });
    let result = Retry::new(Backoff::constant(Duration::from_secs(3600)), &cancel)
        .run(|| async { Err::<(), _>(transient()) }, |_, _| {})
        .await;
    assert!(matches!(result, Err(Stopped::Cancelled)));
    assert_eq!(
        start.elapsed(),
        ms(1500),
        "returned when cancelled, not after the hour"
    );
    assert!(matches!(
        Stopped::Cancelled.cancelled_or_error::<()>(),
        Ok(None)
    ));
}

/// Closed → open after `open_after` failures in a row (the next wait is the cool-down) →
/// half-open for the probe → open again when it fails → closed by a success; the stage's
/// metrics and readiness follow.
#[tokio::test(start_paused = true)]
async fn the_breaker_opens_probes_and_closes() {
    let cancel = CancellationToken::new();
    let metrics = Metrics::new("p", "apply");
    let policy = BreakerPolicy {
        open_after: 3,
        cool_down: ms(5000),
        ..BreakerPolicy::default()
    };
    let mut retry = Retry::new(Backoff::constant(ms(100)), &cancel)
        .for_stage(&metrics, "apply", policy)
        .episode();
    let circuit = || metrics.health.circuit();
    assert_eq!(retry.failed(&transient()), Verdict::Again(ms(100)));
    assert_eq!(metrics.retries_in_progress.get(), 1);
    assert!(retry.wait(ms(100)).await);
    assert_eq!(retry.failed(&transient()), Verdict::Again(ms(100)));
    assert_eq!(circuit(), Circuit::Closed);
    assert!(retry.wait(ms(100)).await);
    // The third failure in a row opens it; an open circuit waits out its cool-down.
    assert_eq!(retry.failed(&transient()), Verdict::Again(ms(5000)));
    assert_eq!(circuit(), Circuit::Open);
    let reasons = metrics.health.not_ready(Duration::from_secs(60));
    assert!(reasons
        .iter()
        .any(|r| r.starts_with("circuit open: 3 failures in a row")));
    let before = Instant::now();
    assert!(retry.wait(ms(5000)).await);
    assert_eq!(before.elapsed(), ms(5000));
    assert_eq!(
        circuit(),
        Circuit::HalfOpen,
        "the next attempt is the probe"
    );
    // The probe fails: open again.
    assert_eq!(retry.failed(&transient()), Verdict::Again(ms(5000)));
    assert_eq!(circuit(), Circuit::Open);
    assert!(retry.wait(ms(5000)).await);
    assert_eq!(circuit(), Circuit::HalfOpen);
    // The probe succeeds: closed, the episode over.
    retry.succeeded();
    assert_eq!(circuit(), Circuit::Closed);
    assert_eq!(metrics.retries_in_progress.get(), 0);
    assert_eq!(retry.attempts(), 5);
    assert_eq!(
        metrics.retries.with_label_values(&["apply"]).get(),
        4,
        "each transient failure counted once"
    );
    let says_circuit = |reasons: Vec<String>| reasons.iter().any(|r| r.contains("circuit"));
    assert!(!says_circuit(
        metrics.health.not_ready(Duration::from_secs(60))
    ));
}

/// A retry dropped mid-episode (its record dead-lettered, shutdown) ends its episode, as a
/// success would; a retry without a stage touches no metrics.
#[tokio::test(start_paused = true)]
async fn a_dropped_episode_ends() {
    let cancel = CancellationToken::new();
    let metrics = Metrics::new("p", "apply");
    {
        let mut retry = Retry::new(Backoff::constant(ms(10)), &cancel)
            .for_stage(&metrics, "apply", BreakerPolicy::default())
            .episode();
        for _ in 0..3 {
            let Verdict::Again(delay) = retry.failed(&transient()) else {
                panic!("transient")
            };
            assert!(retry.wait(delay).await);
        }
        assert_eq!(metrics.health.circuit(), Circuit::HalfOpen);
        assert_eq!(metrics.retries_in_progress.get(), 1);
    }
    assert_eq!(metrics.health.circuit(), Circuit::Closed);
    assert_eq!(metrics.retries_in_progress.get(), 0);
    let mut plain = Retry::new(Backoff::constant(ms(10)), &cancel);
    assert_eq!(plain.failed(&transient()), Verdict::Again(ms(10)));
    assert_eq!(metrics.retries.with_label_values(&["apply"]).get(), 3);
}

/// A downstream that fails every other call never fails `open_after` times in a row; its
/// failures add up in the failure window and open the circuit. Failures further apart than
/// the window do not, and a probe's success starts the window afresh.
#[tokio::test(start_paused = true)]
async fn failures_between_successes_open_the_breaker_within_its_window() {
    let metrics = Metrics::new("p", "apply");
    let policy = BreakerPolicy {
        open_after: 3,
        window_failures: 4,
        window: Duration::from_secs(10),
        cool_down: Duration::ZERO,
    };
    let breaker = Breaker::new(&metrics.health, policy);
    // Spread out: one failure every 4 s, a success after each; at most 3 within any 10 s.
    for _ in 0..6 {
        assert_eq!(breaker.failed(), Circuit::Closed);
        breaker.succeeded();
        tokio::time::advance(Duration::from_secs(4)).await;
    }
    // Flapping: one failure a second, a success after each; the 4th within 10 s opens it.
    tokio::time::advance(Duration::from_secs(20)).await;
    for n in 1..=3 {
        assert_eq!(
            breaker.failed(),
            Circuit::Closed,
            "failure {n} of the window"
        );
        breaker.succeeded();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(breaker.failed(), Circuit::Open);
    let reasons = metrics.health.not_ready(Duration::from_secs(60));
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("circuit open: 1 failures in a row, 4 in its failure window")),
        "{reasons:?}"
    );
    // The probe succeeds: closed, and the window starts again (one more failure stays closed).
    breaker.probing();
    breaker.succeeded();
    assert_eq!(breaker.state(), Circuit::Closed);
    assert_eq!(breaker.failed(), Circuit::Closed);
}
