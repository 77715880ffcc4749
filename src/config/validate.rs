//! Cross-field checks run on every load, so a bad config stops start-up naming its key.

use std::path::Path;

use super::{
    redact_url, ColumnTableConfig, Config, ConfigError, SchemaRegistryConfig, SinkConfig,
    SourceConfig, RESERVED_COLUMNS,
};

impl Config {
    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, problem: &str| Err(ConfigError::new(&self.path, key, problem));
        if self.pipeline.name.trim().is_empty() {
            return err("pipeline.name", "must not be empty");
        }
        if self.kafka.brokers.trim().is_empty() {
            return err("kafka.brokers", "must list at least one host:port");
        }
        check_brokers(&self.path, &self.kafka.brokers)?;
        if !self.kafka.topic_template.contains("{aggregatetype}") {
            return err(
                "kafka.topic_template",
                "must contain {aggregatetype} so each aggregate type gets its own topic",
            );
        }
        if self.kafka.partitions < 1 {
            return err("kafka.partitions", "must be at least 1");
        }
        if matches!(self.kafka.replication_factor, Some(rf) if rf < 1) {
            return err("kafka.replication_factor", "must be at least 1");
        }
        for reserved in [
            "bootstrap.servers",
            "group.id",
            "group.instance.id",
            "enable.auto.offset.store",
        ] {
            if self.kafka.properties.contains_key(reserved) {
                return err(
                    &format!("kafka.properties.\"{reserved}\""),
                    "is set by dualsync itself (use kafka.brokers / apply.group_id / apply.instance_id)",
                );
            }
        }
        for (key, why) in super::DELIVERY_GUARANTEES {
            if self.kafka.properties.contains_key(*key) {
                return err(&format!("kafka.properties.\"{key}\""), why);
            }
        }
        if let Some(SourceConfig::PostgresOutbox(s)) = &self.source {
            if s.batch_size == 0 || s.batch_size > 100_000 {
                return err("source.batch_size", "must be between 1 and 100000");
            }
            if s.poll_interval_ms == 0 {
                return err("source.poll_interval_ms", "must be above 0");
            }
            if s.max_batches_in_flight == 0 || s.max_batches_in_flight > 64 {
                return err("source.max_batches_in_flight", "must be between 1 and 64");
            }
            if !(4..=3600).contains(&s.lease_secs) {
                return err(
                    "source.lease_secs",
                    "must be between 4 and 3600 (the leader queries its session every quarter of it)",
                );
            }
            check_url(
                &self.path,
                "source.url",
                s.url.expose(),
                &["postgres", "postgresql"],
            )?;
            for (key, name) in [
                ("source.slot_name", &s.slot_name),
                ("source.publication", &s.publication),
            ] {
                // PostgreSQL's rule for slot names; publications follow it here so both can be
                // used unquoted.
                let valid = !name.is_empty()
                    && name.len() <= 63
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !valid {
                    return err(
                        key,
                        &format!("{name:?} must be 1-63 characters of a-z, 0-9 and _"),
                    );
                }
            }
        }
        if let Some(SourceConfig::PostgresOutbox(s)) = &self.source {
            for (key, patterns) in [
                ("source.include_aggregates", &s.include_aggregates),
                ("source.exclude_aggregates", &s.exclude_aggregates),
            ] {
                if let Some(bad) = patterns.iter().find(|p| p.trim().is_empty()) {
                    return err(
                        key,
                        &format!("{bad:?} is not an aggregate type or a pattern like \"order*\""),
                    );
                }
            }
            if let Some(both) = s
                .exclude_aggregates
                .iter()
                .find(|p| s.include_aggregates.contains(p))
            {
                return err(
                    "source.exclude_aggregates",
                    &format!("{both:?} is also in source.include_aggregates"),
                );
            }
        }
        if let Some(SourceConfig::Mongodb(s)) = &self.source {
            if s.batch_size == 0 || s.batch_size > 100_000 {
                return err("source.batch_size", "must be between 1 and 100000");
            }
            if s.max_await_ms == 0 || s.max_await_ms > 60_000 {
                return err("source.max_await_ms", "must be between 1 and 60000");
            }
            if s.lease_secs < 2 || s.max_await_ms >= s.lease_secs * 1000 / 3 {
                return err(
                    "source.lease_secs",
                    "must be at least 2 and more than 3 x source.max_await_ms, so the leader renews it in time",
                );
            }
            if !is_mongo_name(&s.database) {
                return err(
                    "source.database",
                    "must be a MongoDB database name (not empty, none of /\\. \"$ or spaces)",
                );
            }
            for (key, names) in [
                ("source.collections", &s.collections),
                ("source.exclude_collections", &s.exclude_collections),
            ] {
                if let Some(bad) = names.iter().find(|c| c.is_empty() || c.contains('$')) {
                    return err(key, &format!("{bad:?} is not a collection name"));
                }
            }
            if !s.collections.is_empty() && !s.exclude_collections.is_empty() {
                return err(
                    "source.exclude_collections",
                    "cannot be combined with source.collections (list what to include, or what to exclude)",
                );
            }
            if s.collections.contains(&s.offsets_collection) {
                return err(
                    "source.collections",
                    "must not list source.offsets_collection, where the relay keeps its own position",
                );
            }
            check_url(
                &self.path,
                "source.url",
                s.url.expose(),
                &["mongodb", "mongodb+srv"],
            )?;
        }
        if self.apply.batch_size == 0 || self.apply.batch_size > 100_000 {
            return err("apply.batch_size", "must be between 1 and 100000");
        }
        if self.apply.retry_initial_ms == 0 || self.apply.retry_max_ms < self.apply.retry_initial_ms
        {
            return err(
                "apply.retry_max_ms",
                "must be at least apply.retry_initial_ms, which must be above 0",
            );
        }
        if let Some(g) = &self.apply.group_id {
            if self.sinks.len() > 1 && !g.contains("{sink}") {
                return err(
                    "apply.group_id",
                    "must contain {sink} when several sinks are configured: sinks sharing one group would each receive only part of the partitions",
                );
            }
        }
        for (aggregate, r) in &self.reconcile {
            let qualified = r.table.split('.').collect::<Vec<_>>();
            if qualified.len() > 2 || !qualified.iter().all(|p| is_identifier(p)) {
                return err(
                    &format!("reconcile.{aggregate}.table"),
                    "must be `table` or `schema.table` (plain identifiers)",
                );
            }
            if !is_identifier(&r.key) {
                return err(
                    &format!("reconcile.{aggregate}.key"),
                    "must be a plain column name",
                );
            }
        }
        if let Some(r) = &self.schema_registry {
            self.validate_registry(r)?;
        }
        if self.http.host.parse::<std::net::IpAddr>().is_err() {
            return err("http.host", "must be an IP address, e.g. 127.0.0.1");
        }
        if let Some(t) = &self.telemetry {
            if super::traces_url(&t.otlp_endpoint).is_err() {
                return err(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL of an OTLP/HTTP collector",
                );
            }
            if t.service_name.trim().is_empty() {
                return err("telemetry.service_name", "must not be empty");
            }
            if t.export_timeout_ms == 0 {
                return err("telemetry.export_timeout_ms", "must be above 0");
            }
        }
        if self.http.stuck_write_secs == 0 {
            return err("http.stuck_write_secs", "must be above 0");
        }
        if self.http.slow_write_ms == 0 {
            return err("http.slow_write_ms", "must be above 0");
        }
        if !(0.0..=1.0).contains(&self.http.warn_failure_rate) {
            return err("http.warn_failure_rate", "must be between 0 and 1");
        }
        if self.apply.dead_letter_suffix.is_empty() {
            return err("apply.dead_letter_suffix", "must not be empty");
        }
        // With the default subscription, apply would consume its own dead letters as events.
        if self.apply.topics.is_empty() && self.apply.topic_regex.is_none() {
            if self.kafka.is_event_topic(&self.relay.dead_letter_topic) {
                return err(
                    "relay.dead_letter_topic",
                    "looks like an event topic of kafka.topic_template, so apply would consume dead letters as events: pick a name outside the template (e.g. with a dot where {aggregatetype} is)",
                );
            }
            let sample = format!(
                "{}{}",
                self.kafka.topic_for("x"),
                self.apply.dead_letter_suffix
            );
            if self.kafka.is_event_topic(&sample) {
                return err(
                    "apply.dead_letter_suffix",
                    "makes dead-letter topics look like event topics of kafka.topic_template (apply would consume them): start it with a dot, e.g. \".dlq\"",
                );
            }
        }
        if let Some(re) = &self.apply.topic_regex {
            if !re.starts_with('^') {
                return err(
                    "apply.topic_regex",
                    "must start with ^ (librdkafka regex form)",
                );
            }
            // `dlq list` matches topics with it too (which topics are this pipeline's).
            if let Err(e) = regex_lite::Regex::new(re) {
                return err("apply.topic_regex", &format!("is not a valid regex: {e}"));
            }
        }
        if self.apply.tombstone_purge_interval_secs == 0 {
            return err("apply.tombstone_purge_interval_secs", "must be at least 1");
        }
        for (name, sink) in &self.sinks {
            let timeout_ms = sink.timeout().as_millis();
            if !(100..=3_600_000).contains(&timeout_ms) {
                return err(
                    &format!("sinks.{name}.timeout_ms"),
                    "must be between 100 and 3600000 (1 hour)",
                );
            }
            let retention = match sink {
                SinkConfig::Postgres(p) => p.tombstone_retention_secs,
                SinkConfig::Mongodb(m) => m.tombstone_retention_secs,
            };
            if retention < MIN_TOMBSTONE_RETENTION_SECS {
                return err(
                    &format!("sinks.{name}.tombstone_retention_secs"),
                    &format!("must be at least {MIN_TOMBSTONE_RETENTION_SECS} (1 hour): an event that arrives later than this after a delete of another key of its type is dead-lettered (below the purge horizon), so the retention must outlast any lag between partitions"),
                );
            }
            match sink {
                SinkConfig::Postgres(p) => {
                    check_url(
                        &self.path,
                        &format!("sinks.{name}.url"),
                        p.url.expose(),
                        &["postgres", "postgresql"],
                    )?;
                    if !is_identifier(&p.schema) {
                        return err(
                            &format!("sinks.{name}.schema"),
                            "must be a plain identifier",
                        );
                    }
                    for (aggregate, t) in &p.tables {
                        self.validate_column_table(&format!("sinks.{name}.tables.{aggregate}"), t)?;
                    }
                }
                SinkConfig::Mongodb(m) => {
                    check_url(
                        &self.path,
                        &format!("sinks.{name}.url"),
                        m.url.expose(),
                        &["mongodb", "mongodb+srv"],
                    )?;
                    if m.database.is_empty() || m.database.contains(['/', '.', ' ', '$']) {
                        return err(
                            &format!("sinks.{name}.database"),
                            "is not a valid database name",
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_column_table(&self, key: &str, t: &ColumnTableConfig) -> Result<(), ConfigError> {
        let err = |sub: &str, problem: String| {
            Err(ConfigError::new(&self.path, format!("{key}{sub}"), problem))
        };
        if let Some(table) = &t.table {
            if !is_identifier(table) {
                return err(".table", "must be a plain identifier".into());
            }
        }
        if !is_identifier(&t.key_column) || RESERVED_COLUMNS.contains(&t.key_column.as_str()) {
            return err(
                ".key_column",
                format!(
                    "must be a plain identifier other than {}",
                    RESERVED_COLUMNS.join(", ")
                ),
            );
        }
        if t.columns.is_empty() {
            return err(
                ".columns",
                "must list at least one column (or drop the table entry to get a document table)"
                    .into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for c in &t.columns {
            let taken = RESERVED_COLUMNS.contains(&c.name.as_str()) || c.name == t.key_column;
            if !is_identifier(&c.name) || taken || !seen.insert(c.name.as_str()) {
                return err(
                    ".columns",
                    format!(
                        "column {:?} must be a plain identifier, used once, and not the key column or one of {}",
                        c.name,
                        RESERVED_COLUMNS.join(", ")
                    ),
                );
            }
            if c.path().iter().any(String::is_empty) {
                return err(
                    ".columns",
                    format!(
                        "column {:?}: field {:?} has an empty path segment",
                        c.name,
                        c.field_name()
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_registry(&self, r: &SchemaRegistryConfig) -> Result<(), ConfigError> {
        let err = |key: &str, problem: &str| {
            Err(ConfigError::new(
                &self.path,
                format!("schema_registry.{key}"),
                problem,
            ))
        };
        check_url(
            &self.path,
            "schema_registry.url",
            &r.url,
            &["http", "https"],
        )?;
        let authority = r.url.split("://").nth(1).unwrap_or("").split('/').next();
        if authority.is_some_and(|a| a.contains('@')) {
            return err(
                "url",
                "must not contain credentials: use schema_registry.username and password_env",
            );
        }
        if r.username.is_some() != r.password_env.is_some() {
            return err(
                "password_env",
                "and schema_registry.username go together (basic auth needs both)",
            );
        }
        if r.timeout_ms == 0 {
            return err("timeout_ms", "must be above 0");
        }
        Ok(())
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// A URL of one of `schemes` that its client can parse: a port that is not a number, a bad
/// option or escape is a configuration error at start-up, not a connection to retry forever.
fn check_url(path: &Path, key: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let scheme = url.split("://").next().unwrap_or("");
    if !url.contains("://") || !schemes.contains(&scheme) {
        return Err(ConfigError::new(
            path,
            key,
            format!(
                "must be a URL starting with {}:// (got {})",
                schemes.join(":// or "),
                redact_url(url)
            ),
        ));
    }
    let parsed = match scheme {
        "postgres" | "postgresql" => url
            .parse::<tokio_postgres::Config>()
            .map(drop)
            .map_err(|e| e.to_string()),
        "mongodb" | "mongodb+srv" => mongodb::options::ConnectionString::parse(url)
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => match reqwest::Url::parse(url) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
            Ok(_) => Err("it has no host".to_string()),
            Err(e) => Err(e.to_string()),
        },
    };
    parsed.map_err(|reason| {
        ConfigError::new(
            path,
            key,
            format!(
                "cannot be parsed: {} (got {})",
                without_password(&reason, url),
                redact_url(url)
            ),
        )
    })
}

/// `reason` with the URL's password (if it has one and the parser quoted it) hidden.
fn without_password(reason: &str, url: &str) -> String {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let password = rest
        .rfind('@')
        .and_then(|at| rest[..at].split_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => reason.replace(p, "***"),
        None => reason.to_string(),
    }
}

/// `kafka.brokers`: comma-separated `host:port` (or `host`, librdkafka's default port 9092),
/// optionally `PROTOCOL://host:port`, IPv6 hosts in brackets.
fn check_brokers(path: &Path, brokers: &str) -> Result<(), ConfigError> {
    for entry in brokers.split(',').map(str::trim) {
        let address = entry.split_once("://").map_or(entry, |(_, a)| a);
        let (host, port) = match address.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, tail)) => (host, Some(tail.strip_prefix(':').unwrap_or(tail))),
                None => ("", None),
            },
            None => match address.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (address, None),
            },
        };
        let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
        if host.is_empty() || host.contains(['/', '@', ' ']) || !port_ok {
            return Err(ConfigError::new(
                path,
                "kafka.brokers",
                format!(
                    "{entry:?} is not host:port (a host name or IP address and a port number between 1 and 65535)"
                ),
            ));
        }
    }
    Ok(())
}

/// MongoDB's database name rules (the characters it refuses on any platform).
/// The shortest tombstone retention: events arriving this much later than a purged delete of
/// their aggregate type are dead-lettered as below the purge horizon.
pub const MIN_TOMBSTONE_RETENTION_SECS: u64 = 3600;

fn is_mongo_name(name: &str) -> bool {
    !name.is_empty() && name.len() < 64 && !name.contains(['/', '\\', '.', ' ', '"', '$', '\0'])
}
