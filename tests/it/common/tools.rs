//! Running the dualsync binary and the test tools (helm, docker-compose) as processes.

use super::*;

/// `dualsync config check -c FILE [--sink NAME]` with exactly `env` as its environment, as a
/// deployment would start the process: the summary line, or what it printed on failure.
pub fn config_check(
    file: &Path,
    sink: Option<&str>,
    env: &[(String, String)],
) -> Result<String, String> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dualsync"));
    cmd.env_clear()
        .envs(env.iter().cloned())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["config", "check", "-c"])
        .arg(file);
    if let Some(sink) = sink {
        cmd.args(["--sink", sink]);
    }
    let out = cmd.output().expect("run dualsync config check");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// A test tool named by an environment variable that `make test` sets (`.local/env`).
pub fn test_tool(var: &str, what: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with `make test` (it installs {what}), or `. .local/env` after it")
    })
}

/// Runs a program to its end: stdout, or stderr (with the command) when it fails.
pub fn run_tool(program: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
