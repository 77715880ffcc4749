//! Issue #35 item 12: a URL that cannot be parsed is a configuration error. The real binary
//! stops at start-up with exit 1 naming the key, for every URL of the config, instead of
//! logging "lost its connection" at every backoff forever.

use std::time::Duration;

use crate::common::*;
use crate::processes::{spawn, wait_exit, write_config};

/// Long enough for a process that loads its config and stops; far shorter than one that
/// retries (its first backoff alone would not end it).
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

/// Runs `args` (with `-c <config>` added) on `text`: whether it exited 1 naming `key`.
fn exits_naming(text: &str, args: &[&str], key: &str) -> Result<(), String> {
    let path = write_config(text);
    let log = format!("{}.log", unique("badurl"));
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["-c", path.to_str().unwrap()]);
    let mut child = spawn(&full, &log);
    let end = std::time::Instant::now() + EXIT_DEADLINE;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = std::fs::read_to_string(std::env::temp_dir().join(&log)).unwrap_or_default();
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap();
        child.wait().unwrap();
        let last = stderr.lines().last().unwrap_or_default();
        return Err(format!(
            "{args:?} with a malformed {key} still runs after {EXIT_DEADLINE:?}; last log line: {last}"
        ));
    }
    let status = wait_exit(&mut child, Duration::from_secs(1));
    if status.code() != Some(1) || !stderr.contains(key) {
        return Err(format!(
            "{args:?}: {status}, {key} named: {}\n{stderr}",
            stderr.contains(key)
        ));
    }
    Ok(())
}

#[test]
fn a_malformed_url_stops_start_up_naming_its_key() {
    let servers = servers();
    // Valid URLs nothing is asked of: the process must stop before it connects anywhere.
    let (source, sink) = (
        "postgres://127.0.0.1:9/source",
        "postgres://127.0.0.1:9/sink",
    );
    let text = pipeline_toml(&servers, source, sink, &unique("m"), "");
    let bad_pg = "postgres://127.0.0.1:notaport/x";
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (text.replace(source, bad_pg), vec!["relay"], "source.url"),
        (
            text.replace(sink, bad_pg),
            vec!["apply", "--sink", "postgres"],
            "sinks.postgres.url",
        ),
        (
            text.replace(
                &format!("url = \"{}\"", servers.mongo),
                "url = \"mongodb://127.0.0.1:notaport/\"",
            ),
            vec!["apply", "--sink", "mongo"],
            "sinks.mongo.url",
        ),
        (
            text.replace(
                &format!("brokers = \"{}\"", servers.kafka),
                "brokers = \"127.0.0.1:notaport\"",
            ),
            vec!["relay"],
            "kafka.brokers",
        ),
        (
            format!("{text}\n[schema_registry]\nurl = \"http://127.0.0.1:notaport\"\n"),
            vec!["relay"],
            "schema_registry.url",
        ),
    ];
    let mut failures = Vec::new();
    for (text, args, key) in &cases {
        assert!(text.contains("notaport"), "{key}: the case did not apply");
        failures.extend(exits_naming(text, args, key).err());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
