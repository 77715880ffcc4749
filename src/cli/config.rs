//! `dualsync config check`: the pipeline file as a process would load it (environment
//! overrides applied, every check of start-up), without connecting to anything. Deploy
//! tooling runs it on what it renders (the Helm chart's ConfigMap, docker-compose's
//! environment: tests/it/helm.rs, tests/it/compose.rs).

use dualsync::config::{Config, SinkConfig, SourceConfig};

/// One line saying what the file configures, with no URL in it (URLs may hold passwords).
pub fn summary(config: &Config) -> String {
    let source = match &config.source {
        Some(SourceConfig::PostgresOutbox(_)) => "postgres_outbox",
        Some(SourceConfig::Mongodb(_)) => "mongodb",
        None => "none",
    };
    let sinks: Vec<String> = config
        .sinks
        .iter()
        .map(|(name, sink)| {
            let kind = match sink {
                SinkConfig::Postgres(_) => "postgres",
                SinkConfig::Mongodb(_) => "mongodb",
            };
            format!("{name} ({kind})")
        })
        .collect();
    let http = &config.http;
    format!(
        "{}: ok: pipeline {}, source {source}, kafka {}, sinks {}, schema registry {}, http {}",
        config.path.display(),
        config.pipeline.name,
        config.kafka.brokers,
        if sinks.is_empty() {
            "none".to_string()
        } else {
            sinks.join(", ")
        },
        if config.schema_registry.is_some() {
            "yes"
        } else {
            "no"
        },
        if http.enabled {
            format!("{}:{}/{}", http.host, http.relay_port, http.apply_port)
        } else {
            "off".to_string()
        },
    )
}
