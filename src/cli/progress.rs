//! Progress of long commands (`snapshot`, `verify [--repair]`, `dlq replay`) on stderr: a bar
//! on a terminal, otherwise a plain line every interval that a log file can keep, and a
//! summary line at the end in both cases.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often plain mode prints a line (`--progress-interval`, default 5 s).
static INTERVAL: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

pub fn set_interval(every: Duration) {
    let _ = INTERVAL.set(every);
}

pub struct Progress {
    what: String,
    unit: &'static str,
    total: Option<u64>,
    done: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
    /// Plain mode: when the last line was printed, and how often to print one.
    last_line: Mutex<Instant>,
    every: Duration,
}

impl Progress {
    /// `total` is the expected count when known (an estimate is fine: rows can come and go).
    pub fn new(what: &str, unit: &'static str, total: Option<u64>) -> Self {
        let every = INTERVAL.get().copied().unwrap_or(Duration::from_secs(5));
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total.unwrap_or(0));
            bar.set_style(
                ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} ({per_sec}, {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            bar
        });
        let started = Instant::now();
        Self {
            what: what.to_string(),
            unit,
            total,
            done: AtomicU64::new(0),
            started,
            bar,
            last_line: Mutex::new(started),
            every,
        }
    }

    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let mut last = self.last_line.lock().expect("progress lock");
        if last.elapsed() >= self.every {
            *last = Instant::now();
            eprintln!(
                "{}",
                line(
                    &self.what,
                    self.unit,
                    done,
                    self.total,
                    self.started.elapsed()
                )
            );
        }
    }

    /// Clears the bar and prints the summary line.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!(
            "{}",
            summary(
                &self.what,
                self.unit,
                self.done.load(Ordering::Relaxed),
                self.started.elapsed()
            )
        );
    }
}

fn rate(done: u64, elapsed: Duration) -> f64 {
    done as f64 / elapsed.as_secs_f64().max(1e-3)
}

/// `snapshot orders: 1200/5000 rows (24%), 850 rows/s, ETA 4s`
pub fn line(what: &str, unit: &str, done: u64, total: Option<u64>, elapsed: Duration) -> String {
    let per_sec = rate(done, elapsed);
    match total.filter(|t| *t > 0) {
        Some(total) => {
            let left = total.saturating_sub(done);
            let eta = if per_sec > 0.0 {
                format!("{}s", (left as f64 / per_sec).ceil() as u64)
            } else {
                "unknown".into()
            };
            format!(
                "{what}: {done}/{total} {unit} ({}%), {per_sec:.0} {unit}/s, ETA {eta}",
                (done * 100 / total).min(100)
            )
        }
        None => format!("{what}: {done} {unit}, {per_sec:.0} {unit}/s"),
    }
}

/// `snapshot orders: done, 5000 rows in 5.9s (850 rows/s)`
pub fn summary(what: &str, unit: &str, done: u64, elapsed: Duration) -> String {
    format!(
        "{what}: done, {done} {unit} in {:.1}s ({:.0} {unit}/s)",
        elapsed.as_secs_f64(),
        rate(done, elapsed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_count_total_rate_and_eta() {
        assert_eq!(
            line(
                "snapshot orders",
                "rows",
                1200,
                Some(5000),
                Duration::from_secs(2)
            ),
            "snapshot orders: 1200/5000 rows (24%), 600 rows/s, ETA 7s"
        );
        assert_eq!(
            line(
                "replay t.dlq",
                "letters",
                0,
                Some(10),
                Duration::from_secs(1)
            ),
            "replay t.dlq: 0/10 letters (0%), 0 letters/s, ETA unknown"
        );
        // More rows than the estimate (rows inserted meanwhile): never above 100 %.
        assert_eq!(
            line("verify c", "rows", 12, Some(10), Duration::from_secs(1)),
            "verify c: 12/10 rows (100%), 12 rows/s, ETA 0s"
        );
        assert_eq!(
            line("verify c", "rows", 12, None, Duration::from_secs(4)),
            "verify c: 12 rows, 3 rows/s"
        );
        assert_eq!(
            summary("snapshot orders", "rows", 5000, Duration::from_millis(5900)),
            "snapshot orders: done, 5000 rows in 5.9s (847 rows/s)"
        );
    }
}
