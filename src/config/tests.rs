use super::*;

const MINIMAL: &str = r#"
[pipeline]
name = "p"
[source]
kind = "postgres_outbox"
url = "postgres://app:hunter2@db:5432/app"
[kafka]
brokers = "k:9092"
[sinks.pg]
kind = "postgres"
url = "postgres://app:hunter2@replica/app"
"#;

fn parse(text: &str, env: Vec<(&str, &str)>) -> Result<Config, ConfigError> {
    let env = env.into_iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::from_toml(Path::new("conf.toml"), text, env)
}

#[test]
fn defaults_fill_in() {
    let c = parse(MINIMAL, vec![]).unwrap();
    assert_eq!(c.kafka.topic_for("orders"), "outbox.event.orders");
    assert_eq!(c.group_id("pg"), "dualsync-p-pg");
    assert_eq!(c.sink(None).unwrap().0, "pg");
    assert!(c.telemetry.is_none(), "traces are off by default");
}

#[test]
fn unknown_keys_are_named_with_the_file() {
    let e = parse(
        &MINIMAL.replace("brokers =", "brokerz = \"x\"\nbrokers ="),
        vec![],
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("conf.toml:"), "{msg}");
    assert!(msg.contains("brokerz"), "{msg}");
}

/// A key refused by the config's structure is named by its path, and by the variable that set
/// it when one did (what `dualsync config check` prints for a compose file's or a chart's
/// environment); a mistake in the file blames no variable.
#[test]
fn structure_errors_name_the_key_and_the_variable_that_set_it() {
    let key = |text: &str, env: Vec<(&str, &str)>| parse(text, env).unwrap_err().key;
    assert_eq!(
        key(MINIMAL, vec![("DUALSYNC_KAFKA__BROKERZ", "x:1")]),
        "kafka.brokerz (set by $DUALSYNC_KAFKA__BROKERZ)"
    );
    assert_eq!(
        key(MINIMAL, vec![("DUALSYNC_BOGUS__X", "1")]),
        "bogus (set by $DUALSYNC_BOGUS__X)"
    );
    // Inside a sink (a table tagged by `kind`) and a sink the variables made up.
    assert_eq!(
        key(MINIMAL, vec![("DUALSYNC_SINKS__PG__SCHEMAA", "s")]),
        "sinks.pg.schemaa (set by $DUALSYNC_SINKS__PG__SCHEMAA)"
    );
    assert_eq!(
        key(
            MINIMAL,
            vec![("DUALSYNC_SINKS__PGG__URL", "postgres://r/x")]
        ),
        "sinks.pgg.kind (set by $DUALSYNC_SINKS__PGG__URL)"
    );
    assert_eq!(
        key(MINIMAL, vec![("DUALSYNC_KAFKA__PARTITIONS", "three")]),
        "kafka.partitions (set by $DUALSYNC_KAFKA__PARTITIONS)"
    );
    // The file's own mistakes, with an unrelated variable set.
    let url = vec![("DUALSYNC_SINKS__PG__URL", "postgres://r/x")];
    assert_eq!(
        key(
            &MINIMAL.replace("[sinks.pg]", "[sinks.pg]\nschemaa = \"s\""),
            url.clone()
        ),
        "sinks.pg.schemaa"
    );
    assert_eq!(
        key(&MINIMAL.replace("kind = \"postgres\"\n", ""), url),
        "sinks.pg.kind"
    );
    assert_eq!(
        key(
            &MINIMAL.replace("brokers =", "partitions = \"3\"\nbrokers ="),
            vec![]
        ),
        "kafka.partitions"
    );
}

#[test]
fn env_overrides_win_and_properties_take_dots() {
    let c = parse(
        MINIMAL,
        vec![
            ("DUALSYNC_KAFKA__BROKERS", "other:9092"),
            ("DUALSYNC_KAFKA__PROPERTIES__SASL_PASSWORD", "123"),
            ("DUALSYNC_APPLY__BATCH_SIZE", "7"),
            ("DUALSYNC_TEST_PG_URL", "ignored: no double underscore"),
        ],
    )
    .unwrap();
    assert_eq!(c.kafka.brokers, "other:9092");
    assert_eq!(c.kafka.properties["sasl.password"], "123");
    assert_eq!(c.apply.batch_size, 7);
}

#[test]
fn dead_letter_topics_must_not_look_like_event_topics() {
    let base = "[pipeline]\nname = \"p\"\n[kafka]\nbrokers = \"b:1\"\ntopic_template = \"shop.{aggregatetype}\"\n";
    let load =
        |extra: &str| Config::from_toml(Path::new("p.toml"), &format!("{base}{extra}"), Vec::new());
    let e = load("[relay]\ndead_letter_topic = \"shop.relay-dlq\"\n").unwrap_err();
    assert_eq!(e.key, "relay.dead_letter_topic");
    let e = load("[apply]\ndead_letter_suffix = \"-dlq\"\n").unwrap_err();
    assert_eq!(e.key, "apply.dead_letter_suffix");
    load("[relay]\ndead_letter_topic = \"shop.relay.dlq\"\n").unwrap();
    // An explicit topic list has no such risk.
    load("[relay]\ndead_letter_topic = \"shop.relay-dlq\"\n[apply]\ntopics = [\"shop.orders\"]\n")
        .unwrap();
}

#[test]
fn bad_values_name_their_key() {
    let e = parse(MINIMAL, vec![("DUALSYNC_SINKS__PG__URL", "mysql://x")]).unwrap_err();
    assert_eq!(e.key, "sinks.pg.url");
    let e = parse(
        &MINIMAL.replace(
            "brokers = \"k:9092\"",
            "brokers = \"k:9092\"\ntopic_template = \"fixed\"",
        ),
        vec![],
    )
    .unwrap_err();
    assert_eq!(e.key, "kafka.topic_template");
    let two_sinks =
        format!("{MINIMAL}\n[sinks.other]\nkind = \"postgres\"\nurl = \"postgres://h/db\"\n");
    let e = parse(&two_sinks, vec![("DUALSYNC_APPLY__GROUP_ID", "shared")]).unwrap_err();
    assert_eq!(e.key, "apply.group_id");
    let c = parse(&two_sinks, vec![("DUALSYNC_APPLY__GROUP_ID", "g-{sink}")]).unwrap();
    assert_eq!(c.group_id("other"), "g-other");
    for bad in ["0", "65"] {
        let e = parse(
            MINIMAL,
            vec![("DUALSYNC_SOURCE__MAX_BATCHES_IN_FLIGHT", bad)],
        )
        .unwrap_err();
        assert_eq!(e.key, "source.max_batches_in_flight");
    }
    let c = parse(MINIMAL, vec![]).unwrap();
    assert_eq!(c.outbox_source().unwrap().max_batches_in_flight, 4);
}

/// Issue #23 9(d): a password containing `/` or `?` (unencoded, as people type them) must
/// not be printed by a `check_url` error.
#[test]
fn redact_url_hides_passwords_containing_slash_or_question_mark() {
    for (url, shown) in [
        (
            "postgres://app:pa/ss@db:5432/app",
            "postgres://app:***@db:5432/app",
        ),
        ("postgres://app:pa?ss@db/app", "postgres://app:***@db/app"),
        (
            "mongodb://u:a/b?c@h1,h2/?tls=true",
            "mongodb://u:***@h1,h2/?tls=true",
        ),
        ("mysql://u:p@ss/w?rd@h/db", "mysql://u:***@h/db"),
        // An `@` after the host could be the password's: hidden with it.
        (
            "postgres://u:pw@h/db?application_name=a@b",
            "postgres://u:***@b",
        ),
        (
            "postgres://h/db?password=x@y&sslmode=require",
            "postgres://h/db?password=***&sslmode=require",
        ),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
    let e = parse(
        MINIMAL,
        vec![("DUALSYNC_SOURCE__URL", "mysql://u:hun/ter?2@x")],
    )
    .unwrap_err();
    assert!(!e.to_string().contains("ter"), "{e}");
}

#[test]
fn secrets_never_print() {
    let c = parse(MINIMAL, vec![]).unwrap();
    let c = Config {
        kafka: KafkaConfig {
            properties: [("sasl.password".to_string(), "hunter2".to_string())].into(),
            ..c.kafka
        },
        ..c
    };
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("postgres://app:***@db:5432/app"), "{shown}");
    assert_eq!(
        redact_url("mongodb://u:p@h/?tls=true&password=x"),
        "mongodb://u:***@h/?tls=true&password=***"
    );
    assert_eq!(redact_url("plain-secret"), "***");
    let e = parse(
        MINIMAL,
        vec![("DUALSYNC_SOURCE__URL", "mysql://u:hunter2@x")],
    )
    .unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn registry_settings_are_checked() {
    let with = |section: &str| parse(&format!("{MINIMAL}\n[schema_registry]\n{section}"), vec![]);
    let c = with("url = \"http://localhost:8081\"").unwrap();
    let r = c.schema_registry.as_ref().unwrap();
    assert!(r.auto_register, "auto_register defaults to on");
    assert!(r.timeout_ms > 0);
    with("url = \"https://reg:8081\"\nusername = \"u\"\npassword_env = \"REG_PW\"").unwrap();

    let key = |section: &str| with(section).unwrap_err().key;
    assert_eq!(key("url = \"ftp://reg\""), "schema_registry.url");
    assert_eq!(key("url = \"reg:8081\""), "schema_registry.url");
    let e = with("url = \"http://u:hunter2@reg:8081\"").unwrap_err();
    assert_eq!(e.key, "schema_registry.url");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert_eq!(
        key("url = \"http://reg\"\nusername = \"u\""),
        "schema_registry.password_env"
    );
    assert_eq!(
        key("url = \"http://reg\"\npassword_env = \"P\""),
        "schema_registry.password_env"
    );
    assert_eq!(
        key("url = \"http://reg\"\ntimeout_ms = 0"),
        "schema_registry.timeout_ms"
    );
    let e = with("url = \"http://reg\"\npassword = \"x\"").unwrap_err();
    assert!(e.to_string().contains("password"), "unknown key named: {e}");
    // The compose file switches the registry on with a variable alone.
    let c = parse(
        MINIMAL,
        vec![("DUALSYNC_SCHEMA_REGISTRY__URL", "http://redpanda:8081")],
    )
    .unwrap();
    assert_eq!(c.schema_registry.unwrap().url, "http://redpanda:8081");
}

#[test]
fn column_tables_are_checked() {
    let with = |table: &str| {
        parse(
            &format!("{MINIMAL}\n[sinks.pg.tables.customers]\n{table}"),
            vec![],
        )
    };
    let c = with("columns = [{ name = \"email\", type = \"text\" }, { name = \"n\", type = \"double precision\", field = \"stats.n\" }]").unwrap();
    let SinkConfig::Postgres(p) = &c.sinks["pg"] else {
        panic!()
    };
    let t = &p.tables["customers"];
    assert_eq!(t.key_column, "id");
    assert_eq!(t.columns[1].sql_type, ColumnType::DoublePrecision);
    assert_eq!(t.columns[1].path(), ["stats", "n"]);

    let key = |table: &str| with(table).unwrap_err().key;
    let columns = "sinks.pg.tables.customers.columns";
    assert_eq!(key("columns = []"), columns);
    assert_eq!(
        key("columns = [{ name = \"version\", type = \"text\" }]"),
        columns
    );
    assert_eq!(
        key("columns = [{ name = \"id\", type = \"text\" }]"),
        columns
    );
    assert_eq!(
        key("columns = [{ name = \"a\", type = \"text\" }, { name = \"a\", type = \"text\" }]"),
        columns
    );
    assert_eq!(
        key("columns = [{ name = \"a b\", type = \"text\" }]"),
        columns
    );
    assert_eq!(
        key("columns = [{ name = \"a\", type = \"text\", field = \"x..y\" }]"),
        columns
    );
    assert_eq!(
        key("table = \"x;drop\"\ncolumns = [{ name = \"a\", type = \"text\" }]"),
        "sinks.pg.tables.customers.table"
    );
    assert_eq!(
        key("key_column = \"deleted\"\ncolumns = [{ name = \"a\", type = \"text\" }]"),
        "sinks.pg.tables.customers.key_column"
    );
    let e = with("columns = [{ name = \"a\", type = \"varchar\" }]").unwrap_err();
    assert!(e.to_string().contains("varchar"), "unknown type named: {e}");
}

const MONGO: &str = r#"
[pipeline]
name = "p"
[source]
kind = "mongodb"
url = "mongodb://app:hunter2@db:27017/?replicaSet=rs0"
database = "shop"
[kafka]
brokers = "k:9092"
[sinks.pg]
kind = "postgres"
url = "postgres://app@replica/app"
"#;

#[test]
fn mongodb_source_defaults_and_topic_naming() {
    let c = parse(MONGO, vec![]).unwrap();
    assert_eq!(c.kafka.topic_for("carts"), "mongo.shop.carts");
    assert!(c.kafka.is_event_topic("mongo.shop.carts"));
    let Some(SourceConfig::Mongodb(s)) = &c.source else {
        panic!("a mongodb source")
    };
    assert!(s.watches("carts"));
    assert!(
        !s.watches("dualsync_offsets"),
        "the relay's own position is never published"
    );
    assert!(!s.watches("system.views"));
    assert_eq!(s.on_history_lost, OnHistoryLost::Fail);
    let c = parse(
        &MONGO.replace(
            "brokers =",
            "topic_template = \"cdc.{database}.{aggregatetype}\"\nbrokers =",
        ),
        vec![],
    )
    .unwrap();
    assert_eq!(c.kafka.topic_for("carts"), "cdc.shop.carts");
    // Commands that need an outbox say so.
    let e = c.outbox_source().unwrap_err().to_string();
    assert!(
        e.contains("source.kind") && e.contains("postgres_outbox"),
        "{e}"
    );
    assert!(
        !format!("{c:?}").contains("hunter2"),
        "the URL's password is never shown"
    );
}

#[test]
fn mongodb_source_mistakes_are_named() {
    for (change, key) in [
        ("database = \"shop\"", "source.database"),
        ("url = \"mongodb://", "source.url"),
    ] {
        let bad = match key {
            "source.database" => MONGO.replace(change, "database = \"sh.op\""),
            _ => MONGO.replace(change, "url = \"postgres://"),
        };
        let e = parse(&bad, vec![]).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    let both = MONGO.replace(
        "database = \"shop\"",
        "database = \"shop\"\ncollections = [\"a\"]\nexclude_collections = [\"b\"]",
    );
    assert!(parse(&both, vec![])
        .unwrap_err()
        .to_string()
        .contains("source.exclude_collections"));
    let lease = MONGO.replace("database = \"shop\"", "database = \"shop\"\nlease_secs = 1");
    assert!(parse(&lease, vec![])
        .unwrap_err()
        .to_string()
        .contains("source.lease_secs"));
    let typo = MONGO.replace(
        "database = \"shop\"",
        "database = \"shop\"\non_history_lost = \"resnap\"",
    );
    assert!(parse(&typo, vec![])
        .unwrap_err()
        .to_string()
        .contains("resnap"));
    let own = MONGO.replace(
        "database = \"shop\"",
        "database = \"shop\"\ncollections = [\"dualsync_offsets\"]",
    );
    assert!(parse(&own, vec![])
        .unwrap_err()
        .to_string()
        .contains("source.collections"));
}

#[test]
fn the_mongodb_connector_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors/mongo-primary.toml");
    let c = Config::load(&path, Vec::new()).unwrap();
    assert!(matches!(c.source, Some(SourceConfig::Mongodb(_))));
    assert_eq!(c.kafka.topic_for("orders"), "mongo.shop.orders");
}

#[test]
fn outbox_aggregate_filters_are_validated_naming_the_key() {
    let with = |s: &str| MINIMAL.replace("[kafka]", &format!("{s}\n[kafka]"));
    let c = parse(
        &with("include_aggregates = [\"order*\"]\nexclude_aggregates = [\"orders_audit\"]"),
        vec![],
    )
    .unwrap();
    assert_eq!(c.outbox_source().unwrap().include_aggregates, ["order*"]);
    let e = parse(&with("include_aggregates = [\"\"]"), vec![]).unwrap_err();
    assert_eq!(e.key, "source.include_aggregates");
    let e = parse(
        &with("include_aggregates = [\"a\"]\nexclude_aggregates = [\"a\"]"),
        vec![],
    )
    .unwrap_err();
    assert_eq!(e.key, "source.exclude_aggregates");
    assert!(parse(&with("include_aggregate = [\"a\"]"), vec![]).is_err());
}

#[test]
fn apply_topic_regex_must_compile() {
    let e = parse(
        &format!("{MINIMAL}\n[apply]\ntopic_regex = \"^orders(\"\n"),
        vec![],
    )
    .unwrap_err();
    assert_eq!(e.key, "apply.topic_regex");
}

/// docs/configuration.md is the configuration reference: every `toml` block in it must parse
/// (unknown keys are refused), and dropping its `# default` lines must change nothing, so a
/// key or a default cannot be documented wrong.
#[test]
fn configuration_reference_matches_the_config_types() {
    let doc = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ));
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().expect("closed block"))
        .collect();
    assert!(blocks.len() >= 3, "found {} toml blocks", blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        let full = parse(block, vec![])
            .unwrap_or_else(|e| panic!("toml block {} of docs/configuration.md: {e}", i + 1));
        let without_defaults: String = block
            .lines()
            .filter(|l| !l.contains("# default"))
            .map(|l| format!("{l}\n"))
            .collect();
        let defaulted = parse(&without_defaults, vec![])
            .unwrap_or_else(|e| panic!("block {} without its defaults: {e}", i + 1));
        assert_eq!(
            format!("{full:?}"),
            format!("{defaulted:?}"),
            "toml block {} documents a default the code does not have",
            i + 1
        );
    }
}

/// Issue #35 item 12: a URL its client cannot parse stops start-up naming its key (the
/// password never printed); broker lists are host:port entries.
#[test]
fn unparseable_urls_and_broker_lists_name_their_key() {
    for (var, value, key) in [
        (
            "DUALSYNC_SOURCE__URL",
            "postgres://u:Pw-9@127.0.0.1:notaport/x",
            "source.url",
        ),
        (
            "DUALSYNC_SINKS__PG__URL",
            "postgresql://h:99999/db",
            "sinks.pg.url",
        ),
        (
            "DUALSYNC_SINKS__PG__URL",
            "postgres://h/db?sslmode=maybe",
            "sinks.pg.url",
        ),
        ("DUALSYNC_KAFKA__BROKERS", "k:notaport", "kafka.brokers"),
        ("DUALSYNC_KAFKA__BROKERS", "k:9092,:9093", "kafka.brokers"),
        ("DUALSYNC_KAFKA__BROKERS", "k:0", "kafka.brokers"),
        (
            "DUALSYNC_TELEMETRY__OTLP_ENDPOINT",
            "collector:4318",
            "telemetry.otlp_endpoint",
        ),
        (
            "DUALSYNC_TELEMETRY__OTLP_ENDPOINT",
            "grpc://collector:4317",
            "telemetry.otlp_endpoint",
        ),
    ] {
        let e = parse(MINIMAL, vec![(var, value)]).unwrap_err();
        assert_eq!(e.key, key, "{value}");
        assert!(!e.to_string().contains("Pw-9"), "{e}");
    }
    for ok in [
        "k1:9092, k2:9093",
        "k",
        "SASL_SSL://k:9096",
        "[::1]:9092",
        "10.0.0.1:9092",
    ] {
        parse(MINIMAL, vec![("DUALSYNC_KAFKA__BROKERS", ok)]).unwrap();
    }
    let mongo = format!(
        "{MINIMAL}\n[sinks.m]\nkind = \"mongodb\"\nurl = \"mongodb://u:Pw-9@h:notaport/\"\ndatabase = \"d\"\n"
    )
    .replace("[sinks.pg]", "[apply]\ngroup_id = \"g-{sink}\"\n[sinks.pg]");
    let e = parse(&mongo, vec![]).unwrap_err();
    assert_eq!(e.key, "sinks.m.url");
    assert!(!e.to_string().contains("Pw-9"), "{e}");
    let registry = format!("{MINIMAL}\n[schema_registry]\nurl = \"http://r:notaport\"\n");
    assert_eq!(
        parse(&registry, vec![]).unwrap_err().key,
        "schema_registry.url"
    );
}

/// Issue #35 item 1: a retention shorter than the lag between partitions turns live events
/// into dead letters (below the purge horizon), so it has a floor; the purge needs a timer.
#[test]
fn tombstone_retention_has_a_floor_and_the_purge_an_interval() {
    let e = parse(
        &format!("{MINIMAL}tombstone_retention_secs = 3599\n"),
        vec![],
    )
    .unwrap_err();
    assert_eq!(e.key, "sinks.pg.tombstone_retention_secs");
    let c = parse(
        &format!("{MINIMAL}tombstone_retention_secs = 3600\n"),
        vec![],
    )
    .unwrap();
    assert_eq!(c.apply.tombstone_purge_interval_secs, 600);
    let e = parse(
        &format!("{MINIMAL}[apply]\ntombstone_purge_interval_secs = 0\n"),
        vec![],
    )
    .unwrap_err();
    assert_eq!(e.key, "apply.tombstone_purge_interval_secs");
}
