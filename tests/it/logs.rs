//! What a supervisor's log file gets from the real binary: no colour codes, a start-up error
//! once, and connection failures that name the connection and the key that configures it.

use std::process::Command;

use crate::common::*;
use crate::processes::{sigterm, spawn, wait_exit, wait_for_log, write_config};

/// A pipeline whose source and sink databases are unreachable (port 9: nothing listens).
fn unreachable_databases(servers: &Servers) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"
[source]
kind = "postgres_outbox"
url = "postgres://postgres@127.0.0.1:9/primary"
[kafka]
brokers = "{kafka}"
[encoding]
schemas_dir = "{schemas}"
[http]
relay_port = 0
apply_port = 0
[sinks.replica_pg]
kind = "postgres"
url = "postgres://postgres@127.0.0.1:9/replica"
"#,
        name = unique("t"),
        kafka = servers.kafka,
        schemas = schemas_dir(),
    )
}

#[test]
fn log_files_have_no_colour_codes_and_lost_connections_name_their_config_key() {
    let servers = servers();
    let path = write_config(&unreachable_databases(&servers));
    let path = path.to_str().unwrap();
    // `spawn` sends stdout to /dev/null and stderr to a file, as a supervisor would.
    let runs = [
        (
            vec!["relay", "-c", path],
            "relay lost its connection to the source (source.url)",
        ),
        (
            vec!["apply", "-c", path, "--sink", "replica_pg"],
            "sink replica_pg unavailable (sinks.replica_pg.url)",
        ),
    ];
    for (i, (args, needle)) in runs.iter().enumerate() {
        let name = format!("{}.log", unique(&format!("nocolour{i}")));
        let mut child = spawn(args, &name);
        // The process is stopped whether or not the line came, then a failure is reported.
        let text = std::panic::catch_unwind(|| wait_for_log(&name, needle));
        sigterm(&child);
        assert!(wait_exit(&mut child, DEADLINE).success());
        let text = text.unwrap_or_else(|e| std::panic::resume_unwind(e));
        assert!(
            !text.contains('\u{1b}'),
            "ANSI escape codes in a log file:\n{text}"
        );
    }
}

#[test]
fn a_start_up_error_is_reported_once_in_either_format() {
    let servers = servers();
    let text = unreachable_databases(&servers).replace(
        "postgres://postgres@127.0.0.1:9/primary",
        "mysql://x@127.0.0.1:9/primary",
    );
    let path = write_config(&text);
    for format in ["text", "json"] {
        let out = Command::new(env!("CARGO_BIN_EXE_dualsync"))
            .args(["--log-format", format, "relay", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("source.url"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{format}: the error should be printed once:\n{stderr}"
        );
        assert!(!stderr.contains('\u{1b}'), "{stderr}");
        if format == "json" {
            let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
            assert_eq!(line["level"], "ERROR", "{stderr}");
        }
    }
}
