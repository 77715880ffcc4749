//! docker-compose.yml, checked without a Docker engine: `docker-compose config` (Debian's
//! `docker-compose` package, installed by `scripts/test.sh`, named by
//! `DUALSYNC_TEST_DOCKER_COMPOSE`) validates the file against the Compose schema and prints
//! it resolved; then every service that runs dualsync gets `dualsync config check` with its
//! command's pipeline file and `--sink` and exactly the environment the file gives it, so a
//! variable naming a key the config does not have (drift from docs/configuration.md, which
//! `config::tests` checks against the same types) fails here.
//! Not run: the images themselves (no Docker engine here).

use std::path::Path;

use serde_yaml::Value;

use crate::common::{config_check, run_tool, test_tool};

const COMPOSE_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml");

fn compose_config(file: &str) -> Result<String, String> {
    run_tool(
        &test_tool("DUALSYNC_TEST_DOCKER_COMPOSE", "docker-compose"),
        &["-f", file, "config"],
    )
}

/// A dualsync service of the compose file: its command and environment.
struct Service {
    name: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
}

fn dualsync_services(resolved: &str) -> Vec<Service> {
    let doc: Value = serde_yaml::from_str(resolved).expect("docker-compose printed YAML");
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap().trim().to_string(),
    };
    doc["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .filter_map(|(name, service)| {
            let command: Vec<String> = service["command"].as_sequence()?.iter().map(text).collect();
            (command.first()? == "dualsync").then(|| Service {
                name: text(name),
                command,
                env: service["environment"]
                    .as_mapping()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (text(k), text(v)))
                    .collect(),
            })
        })
        .collect()
}

/// `dualsync config check` as the service would load its config (paths in the image are
/// relative to /app, a copy of the repository's connectors/ and schemas/). Every `DUALSYNC_`
/// variable must be an override (`DUALSYNC_SECTION__KEY`) or the variable `http.token_env`
/// names: any other is ignored by dualsync, a silent drift.
fn check(service: &Service) -> Result<String, String> {
    let after = |flag: &str| {
        let i = service.command.iter().position(|a| a == flag)?;
        service.command.get(i + 1).cloned()
    };
    let config = after("--config")
        .or_else(|| after("-c"))
        .ok_or(format!("{}: no --config in its command", service.name))?;
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(config);
    let token_env = dualsync::config::Config::load(&file, service.env.iter().cloned())
        .map(|c| c.http.token_env)
        .unwrap_or_default();
    if let Some((stray, _)) = service.env.iter().find(|(k, _)| {
        k.starts_with(dualsync::config::ENV_PREFIX) && !k.contains("__") && *k != token_env
    }) {
        return Err(format!(
            "{}: {stray} is not an override (DUALSYNC_<SECTION>__<KEY>): dualsync ignores it",
            service.name
        ));
    }
    config_check(&file, after("--sink").as_deref(), &service.env)
        .map_err(|e| format!("{}: {e}", service.name))
}

#[test]
fn compose_file_is_valid_and_passes_dualsync_only_keys_its_config_has() {
    let resolved = compose_config(COMPOSE_FILE).unwrap_or_else(|e| panic!("{e}"));
    let services = dualsync_services(&resolved);
    let mut names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["apply-mongo", "apply-postgres", "relay"]);
    for service in &services {
        assert!(
            service
                .env
                .iter()
                .any(|(k, _)| k == "DUALSYNC_KAFKA__BROKERS"),
            "{}: the compose environment was not read",
            service.name
        );
        let summary = check(service).unwrap_or_else(|e| panic!("{e}"));
        assert!(summary.contains("kafka redpanda:9092"), "{summary}");
        assert!(summary.contains("http 0.0.0.0:"), "{summary}");
    }
}

/// The same checks fail on what they are there to catch.
#[test]
fn compose_checks_refuse_an_invalid_file_and_variables_the_config_lacks() {
    let dir = std::env::temp_dir().join(crate::common::unique("dualsync_compose"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("docker-compose.yml");
    std::fs::write(
        &bad,
        "services:\n  relay:\n    image: a\n    restart_policy: always\n",
    )
    .unwrap();
    let e = compose_config(bad.to_str().unwrap()).unwrap_err();
    std::fs::remove_dir_all(&dir).ok();
    assert!(e.contains("restart_policy"), "{e}");

    let resolved = compose_config(COMPOSE_FILE).unwrap();
    let mut relay = dualsync_services(&resolved)
        .into_iter()
        .find(|s| s.name == "relay")
        .unwrap();
    for (variable, expected) in [
        (
            "DUALSYNC_KAFKA__BROKER",
            "kafka.broker (set by $DUALSYNC_KAFKA__BROKER)",
        ),
        (
            "DUALSYNC_KAFKA_BROKERS",
            "DUALSYNC_KAFKA_BROKERS is not an override",
        ),
    ] {
        relay.env.push((variable.into(), "redpanda:9092".into()));
        let e = check(&relay).unwrap_err();
        assert!(e.contains(expected), "{e}");
        relay.env.pop();
    }
}
