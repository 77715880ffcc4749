//! Logging set-up. Connection strings never reach the logs: configuration types print secrets
//! redacted (see [`crate::config::Secret`]).

use std::io::IsTerminal;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(use_ansi(true, None));
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(true, Some("1".into())));
        assert!(use_ansi(true, Some("".into())));
    }
}
