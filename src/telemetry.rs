//! Logging set-up. Connection strings never reach the logs: configuration types print secrets
//! redacted (see [`crate::config::Secret`]).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::{fmt, EnvFilter};

/// `text` (one human-readable line per event; `human` is its old name) or `json` (one object
/// per line). Both carry the same fields: time, level, target, spans and the event's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[value(alias = "human")]
    Text,
    Json,
}

/// Colours only on a terminal: a supervisor's log file must not fill with escape codes.
/// `NO_COLOR` (any value) turns them off on a terminal too.
pub fn use_ansi(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber, writing to stderr; `RUST_LOG` overrides the default `info`
/// level.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,mongodb=warn,tokio_postgres=warn"));
    let ansi = use_ansi(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
    );
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Logging for tests: written through the test harness so each test shows its own logs when
/// it fails.
pub fn init_for_tests() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,dualsync=debug"));
    let _ = fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// What to log for one fault signal of an [`Episodes`] subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// The first signal of a fault: log it (one line naming the server).
    Start,
    /// A signal while the fault lasts, logged as a summary: how many signals were held back
    /// since the last line, and how long the fault has lasted.
    Summary { held_back: u64, lasting: Duration },
    /// A signal held back (counted into the next summary or the end).
    Quiet,
    /// The fault is over: `signals` in all over `lasted`.
    End { signals: u64, lasted: Duration },
}

/// Turns a stream of fault signals per subject (a server, a sink) into a few log lines: one at
/// the start, a summary at most every `summary_every` while it lasts, one at the end (the
/// first success after `quiet_for` without a signal). A fault that repeats many times a
/// second (a broker link resetting every connection) yields a handful of lines, not a flood.
pub struct Episodes {
    open: Mutex<HashMap<String, Episode>>,
    summary_every: Duration,
    quiet_for: Duration,
}

struct Episode {
    started: Instant,
    last_signal: Instant,
    last_line: Instant,
    held_back: u64,
    signals: u64,
}

impl Episodes {
    pub fn new(summary_every: Duration, quiet_for: Duration) -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            summary_every,
            quiet_for,
        }
    }

    /// A fault signal about `subject` at `now`.
    pub fn fault(&self, subject: &str, now: Instant) -> Say {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = open.get_mut(subject) else {
            open.insert(
                subject.to_string(),
                Episode {
                    started: now,
                    last_signal: now,
                    last_line: now,
                    held_back: 0,
                    signals: 1,
                },
            );
            return Say::Start;
        };
        e.signals += 1;
        e.last_signal = now;
        if now.saturating_duration_since(e.last_line) >= self.summary_every {
            let held_back = std::mem::take(&mut e.held_back);
            e.last_line = now;
            Say::Summary {
                held_back,
                lasting: now.saturating_duration_since(e.started),
            }
        } else {
            e.held_back += 1;
            Say::Quiet
        }
    }

    /// `subject` works at `now`: ends its fault (`Some(Say::End)`) if no signal came for
    /// `quiet_for`.
    pub fn ok(&self, subject: &str, now: Instant) -> Option<Say> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let e = open.get(subject)?;
        if now.saturating_duration_since(e.last_signal) < self.quiet_for {
            return None;
        }
        let e = open.remove(subject)?;
        Some(Say::End {
            signals: e.signals,
            lasted: e.last_signal.saturating_duration_since(e.started),
        })
    }

    /// Whether `subject` is in a fault now.
    pub fn is_open(&self, subject: &str) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.contains_key(subject)
    }
}

/// A client of `url` whose server faults (unreachable, failed heartbeats, and the recovery)
/// are logged naming the server and `key`, the config key of the URL.
pub async fn mongo_client(url: &str, key: &str) -> mongodb::error::Result<mongodb::Client> {
    let mut options = mongodb::options::ClientOptions::parse(url).await?;
    watch_mongo_servers(&mut options, key);
    mongodb::Client::with_options(options)
}

/// Tells what a MongoDB client sees of its servers, per server: the first failure (a server
/// marked unknown, a failed heartbeat) as one warning naming the server and `config_key`, a
/// summary every 30 s while it lasts, and one line once it answers again with no failure for
/// 5 s. Without it a partition or resets of the link are silent: operations just wait in
/// server selection.
pub fn watch_mongo_servers(options: &mut mongodb::options::ClientOptions, config_key: &str) {
    use mongodb::event::{sdam::SdamEvent, EventHandler};
    use mongodb::ServerType;
    let episodes = Episodes::new(Duration::from_secs(30), Duration::from_secs(5));
    let key = config_key.to_string();
    options.sdam_event_handler = Some(EventHandler::callback(move |event: SdamEvent| {
        let now = Instant::now();
        let (server, failure) = match event {
            SdamEvent::ServerDescriptionChanged(e) => {
                let failure = (e.new_description.server_type() == ServerType::Unknown)
                    .then(|| e.new_description.error().map(|e| e.to_string()))
                    .map(Option::unwrap_or_default);
                (e.address.to_string(), failure)
            }
            SdamEvent::ServerHeartbeatFailed(e) => {
                (e.server_address.to_string(), Some(e.failure.to_string()))
            }
            SdamEvent::ServerHeartbeatSucceeded(e) => (e.server_address.to_string(), None),
            _ => return,
        };
        match failure {
            Some(error) => match episodes.fault(&server, now) {
                Say::Start => tracing::warn!(server, config_key = key, %error,
                    "MongoDB server {server} ({key}) unreachable: {error}; retrying, further failures summarised"),
                Say::Summary { held_back, lasting } => {
                    tracing::warn!(server, config_key = key, %error,
                    "MongoDB server {server} ({key}) still unreachable after {}s ({} more failures): {error}",
                    lasting.as_secs(), held_back + 1)
                }
                _ => {}
            },
            None => {
                if let Some(Say::End { signals, lasted }) = episodes.ok(&server, now) {
                    tracing::info!(server, config_key = key,
                        "MongoDB server {server} ({key}) reachable again after {signals} failures over {:.1}s",
                        lasted.as_secs_f64());
                }
            }
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_fault_gives_a_start_summaries_and_an_end() {
        let e = Episodes::new(Duration::from_secs(30), Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        assert_eq!(e.ok("b", t0), None, "nothing to end");
        assert_eq!(e.fault("b", at(0)), Say::Start);
        // Four signals a second for 28 s: one summary at 30 s, nothing before.
        let mut lines = 0;
        for ms in (250..28_000).step_by(250) {
            if e.fault("b", at(ms)) != Say::Quiet {
                lines += 1;
            }
        }
        assert_eq!(lines, 0);
        assert_eq!(
            e.fault("b", at(30_000)),
            Say::Summary {
                held_back: 111,
                lasting: Duration::from_secs(30)
            }
        );
        // Another subject has its own episode.
        assert_eq!(e.fault("other", at(30_000)), Say::Start);
        // Too soon after the last signal: not over yet.
        assert_eq!(e.ok("b", at(33_000)), None);
        assert!(e.is_open("b"));
        assert_eq!(
            e.ok("b", at(35_000)),
            Some(Say::End {
                signals: 113,
                lasted: Duration::from_secs(30)
            })
        );
        assert!(!e.is_open("b"));
        assert_eq!(e.fault("b", at(36_000)), Say::Start, "a new fault");
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(use_ansi(true, None));
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(true, Some("1".into())));
        assert!(use_ansi(true, Some("".into())));
    }
}
