//! `dualsync dlq list | show | replay` as commands (the real binary), on apply dead letters
//! that hold Avro events: nine customers events the PostgreSQL sink refuses (a CHECK
//! constraint an operator added, then drops: the fix) and one `orders` event produced to the
//! customers topic. Each replay filter selects exactly the letters it names, and what was sent
//! is exactly what arrives in the sink; every refusal exits non-zero naming the fault.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value as Json};
use tokio_util::sync::CancellationToken;

use dualsync::codec::OutboxEvent;
use dualsync::config::Config;
use dualsync::dlq::headers;
use dualsync::publish::{Outgoing, Publisher};

use crate::common::*;
use crate::pipeline_scope::run;
use crate::processes::write_config;

/// One dead letter as `dlq show --json` prints it.
#[derive(Debug, Clone)]
struct Letter {
    partition: i64,
    offset: i64,
    key: String,
    class: String,
    time_ms: i64,
}

/// A header of a letter printed by `dlq show --json` (headers are `[name, value]` pairs).
fn header_of(doc: &Json, name: &str) -> String {
    doc["headers"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
        .unwrap_or_else(|| panic!("no header {name}: {doc}"))
        .to_string()
}

impl Letter {
    fn from_json(doc: &Json) -> Letter {
        Letter {
            partition: doc["partition"].as_i64().unwrap(),
            offset: doc["offset"].as_i64().unwrap(),
            key: doc["key"].as_str().unwrap().to_string(),
            class: doc["class"].as_str().unwrap().to_string(),
            time_ms: header_of(doc, headers::TIMESTAMP).parse().unwrap(),
        }
    }
}

/// Runs `dualsync` expecting success; its stdout.
fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = run(args);
    assert!(success, "{args:?} failed: {stderr}");
    stdout
}

/// Runs `dualsync` expecting a refusal whose message names every one of `faults`.
fn refused(args: &[&str], faults: &[&str]) {
    let (success, stdout, stderr) = run(args);
    assert!(!success, "{args:?} was not refused: {stdout}");
    for fault in faults {
        assert!(
            stderr.contains(fault),
            "{args:?}: {fault:?} not in: {stderr}"
        );
    }
}

fn customer(id: &str, version: i64) -> OutboxEvent {
    customer_event(
        id,
        version,
        Some(json!({"id": id, "name": format!("bad {id}"), "email": "e", "order_count": 1})),
    )
}

/// Produces `events` keyed by aggregate id; where each landed.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    events: &[OutboxEvent],
) -> BTreeMap<String, (i32, i64)> {
    let store = schemas();
    let mut at = BTreeMap::new();
    for e in events {
        let value = store.encode(e).unwrap();
        let delivered = producer
            .send(
                FutureRecord::to(topic).key(&e.aggregate_id).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        at.insert(
            e.aggregate_id.clone(),
            (delivered.partition, delivered.offset),
        );
    }
    at
}

/// `dlq replay --json` with `filter`: the (partition, offset) it selected, and the keys it sent.
fn replay(
    path: &str,
    dlq: &str,
    filter: &[&str],
) -> (BTreeSet<(i64, i64)>, BTreeSet<String>, Json) {
    let mut args = vec!["dlq", "replay", "-c", path, "--topic", dlq, "--json"];
    args.extend_from_slice(filter);
    let outcomes: Json = serde_json::from_str(&ok(&args)).unwrap();
    let selected = outcomes
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["partition"].as_i64().unwrap(),
                o["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    let sent = outcomes
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["sent"] == true)
        .map(|o| o["key"].as_str().unwrap().to_string())
        .collect();
    (selected, sent, outcomes)
}

/// Which letters a replay filter should select, as the test computes it.
type Selects<'a> = Box<dyn Fn(&Letter) -> bool + 'a>;

fn coordinates<'a>(letters: impl Iterator<Item = &'a Letter>) -> BTreeSet<(i64, i64)> {
    letters.map(|l| (l.partition, l.offset)).collect()
}

/// The ids in the sink's customers table (none before apply created it).
async fn sink_keys(client: &tokio_postgres::Client) -> BTreeSet<String> {
    client
        .query("SELECT id FROM replica.customers", &[])
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A pipeline whose sink is a fresh database, written to a file for the commands: (config,
/// its file, the sink's URL, the customers topic (created), its dead-letter topic).
async fn customers_pipeline() -> (Config, std::path::PathBuf, String, String, String) {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let text = pipeline_toml(&servers, &sink_url, &sink_url, &unique("t"), "");
    let config = Config::from_toml(Path::new("t.toml"), &text, Vec::new()).unwrap();
    let path = write_config(&text);
    let topic = config.kafka.topic_for("customers");
    let dlq = format!("{topic}{}", config.apply.dead_letter_suffix);
    Publisher::new(&config.kafka)
        .unwrap()
        .ensure_topic(&topic)
        .await
        .unwrap();
    (config, path, sink_url, topic, dlq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dlq_commands_list_show_and_replay_apply_letters_with_each_filter() {
    let servers = servers();
    let (config, path, sink_url, topic, dlq) = customers_pipeline().await;
    let path = path.to_str().unwrap();
    let publisher = Publisher::new(&config.kafka).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let sink = dualsync::pg::connect(&sink_url).await.unwrap();

    // A good event creates the sink's table; then the operator's constraint refuses "bad" names.
    let cancel = CancellationToken::new();
    let (apply, _) = spawn_apply(&config, "postgres", &cancel);
    let good = customer_event(
        "c0",
        1,
        Some(json!({"id": "c0", "name": "good", "email": "e", "order_count": 0})),
    );
    produce(&producer, &topic, &[good]).await;
    eventually("c0 is applied", || async {
        sink_keys(&sink).await.contains("c0")
    })
    .await;
    sink.batch_execute(
        "ALTER TABLE replica.customers ADD CONSTRAINT no_bad_names CHECK (doc->>'name' NOT LIKE 'bad%')",
    )
    .await
    .unwrap();

    // First batch: b1..b4 and an orders event on the customers topic; then T; then b5..b9.
    let first: Vec<OutboxEvent> = (1..=4)
        .map(|i| customer(&format!("b{i}"), 100 + i))
        .collect();
    let order = OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: "OrderPlaced".into(),
        aggregate_type: "orders".into(),
        aggregate_id: "o1".into(),
        version: 7,
        created_at_micros: 0,
        payload: Some(
            json!({"id": "o1", "customer_id": "c0", "status": "NEW", "total_cents": 5, "lines": [], "note": null}),
        ),
    };
    let mut origin = produce(&producer, &topic, &first).await;
    origin.extend(produce(&producer, &topic, std::slice::from_ref(&order)).await);
    read_topic(&servers.kafka, &dlq, 5).await;
    let t = dualsync::dlq::now_millis();
    let second: Vec<OutboxEvent> = (5..=9)
        .map(|i| customer(&format!("b{i}"), 100 + i))
        .collect();
    origin.extend(produce(&producer, &topic, &second).await);
    read_topic(&servers.kafka, &dlq, 10).await;

    // Another pipeline's letters on the same broker: never listed.
    let other = Config::from_toml(
        Path::new("o.toml"),
        &pipeline_toml(&servers, &sink_url, &sink_url, &unique("t"), ""),
        Vec::new(),
    )
    .unwrap();
    let foreign = format!("{}.dlq", other.kafka.topic_for("customers"));
    publisher.ensure_topic(&foreign).await.unwrap();
    publisher
        .publish_all(vec![Outgoing {
            topic: foreign.clone(),
            key: Some(b"b1".to_vec()),
            value: b"x".to_vec(),
            headers: OwnedHeaders::new(),
        }])
        .await
        .unwrap();

    // list: exactly this pipeline's one dead-letter topic, with its counts by class.
    let listed: Json = serde_json::from_str(&ok(&["dlq", "list", "-c", path, "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["topic"], dlq.as_str());
    assert_eq!(listed[0]["messages"], 10);
    assert_eq!(
        listed[0]["by_class"],
        json!({"decode.wrong_topic": 1, "sink.check_violation": 9})
    );
    let table = ok(&["dlq", "list", "-c", path]);
    let line = table.lines().find(|l| l.starts_with(&dlq)).expect(&table);
    assert!(
        line.split_whitespace().nth(1) == Some("10")
            && line.ends_with("decode.wrong_topic=1 sink.check_violation=9"),
        "{table}"
    );
    assert!(!table.contains(&foreign), "{table}");

    // show: the decoded event, class, stage and origin of a sink letter...
    let shown: Json = serde_json::from_str(&ok(&[
        "dlq", "show", "-c", path, "--topic", &dlq, "--key", "b6", "--json",
    ]))
    .unwrap();
    assert_eq!(shown.as_array().unwrap().len(), 1, "{shown}");
    let b6 = &shown[0];
    let event = &b6["payload"]["avro_event"];
    assert_eq!(event["aggregate_type"], "customers", "{b6}");
    assert_eq!(event["aggregate_id"], "b6");
    assert_eq!(event["event_id"], second[1].event_id.to_string());
    assert_eq!(event["version"], 106);
    assert_eq!(event["payload"]["name"], "bad b6");
    assert_eq!(b6["class"], "sink.check_violation");
    let h = |name: &str| header_of(b6, name);
    let (p, o) = origin["b6"];
    assert_eq!(h(headers::STAGE), "sink");
    assert_eq!(h(headers::TOPIC), topic.as_str());
    assert_eq!(h(headers::PARTITION), p.to_string().as_str());
    assert_eq!(h(headers::OFFSET), o.to_string().as_str());
    assert!(h(headers::MESSAGE).contains("no_bad_names"), "{b6}");
    // ... and as text, for the misrouted order.
    let text = ok(&["dlq", "show", "-c", path, "--key", "o1"]);
    let (p, o) = origin["o1"];
    for want in [
        "class: decode.wrong_topic  stage: decode".to_string(),
        format!("origin: {topic}[{p}]@{o}"),
        r#""aggregate_type":"orders""#.to_string(),
        r#""avro_event""#.to_string(),
        "key=o1".to_string(),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }

    let all: Vec<Letter> =
        serde_json::from_str::<Json>(&ok(&["dlq", "show", "-c", path, "--topic", &dlq, "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(Letter::from_json)
            .collect();
    assert_eq!(all.len(), 10);
    let before_t: BTreeSet<&str> = all
        .iter()
        .filter(|l| l.time_ms < t)
        .map(|l| l.key.as_str())
        .collect();
    assert_eq!(before_t, ["b1", "b2", "b3", "b4", "o1"].into());
    let letter = |key: &str| all.iter().find(|l| l.key == key).unwrap().clone();

    // Refusals, each before anything is sent.
    let t_text = t.to_string();
    let earlier = (t - 1000).to_string();
    let replay_with = |extra: &[&str]| {
        let mut a = vec!["dlq", "replay", "-c", path, "--topic", dlq.as_str()];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    for (args, faults) in [
        (
            replay_with(&["--partition", "0", "--from-offset", "5", "--to-offset", "2"]),
            vec!["--from-offset 5", "--to-offset 2", "backwards"],
        ),
        (replay_with(&["--from-offset", "1"]), vec!["--partition"]),
        (
            replay_with(&["--key", "nobody"]),
            vec!["no dead letter", dlq.as_str()],
        ),
        (
            replay_with(&["--key", "b6", "--class", "decode"]),
            vec!["no dead letter", dlq.as_str()],
        ),
        (
            replay_with(&["--since", "yesterday"]),
            vec!["--since", "yesterday"],
        ),
    ] {
        refused(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &faults,
        );
    }
    for args in [
        vec![
            "dlq", "replay", "-c", path, "--topic", &dlq, "--since", &t_text, "--until", &earlier,
        ],
        vec![
            "dlq", "show", "-c", path, "--since", &t_text, "--until", &t_text,
        ],
    ] {
        refused(&args, &["--since", "--until", "backwards"]);
    }
    refused(
        &["dlq", "replay", "-c", path, "--topic", &foreign],
        &[&foreign, "not a dead-letter topic"],
    );
    let missing = format!(
        "{}{}",
        config.kafka.topic_for("orders"),
        config.apply.dead_letter_suffix
    );
    refused(
        &["dlq", "replay", "-c", path, "--topic", &missing],
        &[&missing, "does not exist"],
    );
    assert_eq!(sink_keys(&sink).await, ["c0".to_string()].into());
    let log = dualsync::ops::replay::replay_log_topic(&dlq);
    let log_exists = {
        let (config, log) = (config.clone(), log.clone());
        tokio::task::spawn_blocking(move || dualsync::ops::inspect::topic_exists(&config, &log))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(!log_exists, "a refusal recorded a replay");

    // The fix.
    sink.batch_execute("ALTER TABLE replica.customers DROP CONSTRAINT no_bad_names")
        .await
        .unwrap();
    let mut applied: BTreeSet<String> = ["c0".to_string()].into();
    let mut replayed: BTreeSet<(i64, i64)> = BTreeSet::new();
    let offset_partition = letter("b5").partition;
    let (from, to) = (letter("b5").offset, letter("b5").offset + 1);
    let (from_text, to_text) = (from.to_string(), to.to_string());
    let offset_partition_text = offset_partition.to_string();
    let partition = letter("b9").partition.to_string();
    let steps: Vec<(Vec<&str>, Selects)> = vec![
        (vec!["--key", "b1"], Box::new(|l: &Letter| l.key == "b1")),
        (
            vec!["--class", "decode"],
            Box::new(|l: &Letter| l.class.starts_with("decode.")),
        ),
        (
            vec!["--until", &t_text],
            Box::new(move |l: &Letter| l.time_ms < t),
        ),
        (
            vec![
                "--partition",
                &offset_partition_text,
                "--from-offset",
                &from_text,
                "--to-offset",
                &to_text,
            ],
            Box::new(move |l: &Letter| {
                l.partition == offset_partition && (from..=to).contains(&l.offset)
            }),
        ),
        (
            vec!["--partition", &partition],
            Box::new(|l: &Letter| l.partition.to_string() == partition),
        ),
        (
            vec!["--since", &t_text],
            Box::new(move |l: &Letter| l.time_ms >= t),
        ),
    ];
    for (filter, matches) in &steps {
        let expected: Vec<&Letter> = all.iter().filter(|l| matches(l)).collect();
        assert!(
            !expected.is_empty() && expected.len() < all.len(),
            "{filter:?} should select some letters, not all"
        );
        let (selected, sent, outcomes) = replay(path, &dlq, filter);
        assert_eq!(
            selected,
            coordinates(expected.iter().copied()),
            "{filter:?}: {outcomes}"
        );
        let want_sent: BTreeSet<String> = expected
            .iter()
            .filter(|l| {
                l.class == "sink.check_violation" && !replayed.contains(&(l.partition, l.offset))
            })
            .map(|l| l.key.clone())
            .collect();
        assert_eq!(sent, want_sent, "{filter:?}: {outcomes}");
        for o in outcomes.as_array().unwrap() {
            let action = o["action"].as_str().unwrap();
            if o["key"] == "o1" {
                // Sending it back to the customers topic would only dead-letter it again.
                assert_eq!(action, "still_fails", "{o}");
                assert!(o["error"].as_str().unwrap().contains("orders"), "{o}");
            } else if o["sent"] == false {
                assert_eq!(action, "already_replayed", "{o}");
            }
        }
        replayed.extend(coordinates(
            expected
                .iter()
                .copied()
                .filter(|l| l.class == "sink.check_violation"),
        ));
        applied.extend(sent);
        eventually(
            &format!("{filter:?}: the replayed letters are applied"),
            || async { sink_keys(&sink).await == applied },
        )
        .await;
    }
    assert_eq!(applied.len(), 10, "c0 and b1..b9: {applied:?}");
    for i in 1..=9 {
        let row = sink
            .query_one(
                "SELECT version FROM replica.customers WHERE id = $1",
                &[&format!("b{i}")],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 100 + i, "the original version");
    }
    // Nothing came back: the misrouted order was not sent to be dead-lettered again.
    let listed: Json = serde_json::from_str(&ok(&["dlq", "list", "-c", path, "--json"])).unwrap();
    assert_eq!(listed[0]["messages"], 10, "{listed}");
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// Issue #35 item 11: the PostgreSQL sink's refusals are dead-lettered with a class named
/// after the SQLSTATE (was: all `postgres`), so `dlq replay --class` sends back exactly the
/// letters one fixed cause refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_refusals_are_classed_by_cause_and_replayed_by_class() {
    let servers = servers();
    let (config, path, sink_url, topic, dlq) = customers_pipeline().await;
    let path = path.to_str().unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let sink = dualsync::pg::connect(&sink_url).await.unwrap();
    let cancel = CancellationToken::new();
    let (apply, _) = spawn_apply(&config, "postgres", &cancel);
    let event = |id: &str, name: &str, email: &str| {
        customer_event(
            id,
            10,
            Some(json!({"id": id, "name": name, "email": email, "order_count": 1})),
        )
    };
    produce(&producer, &topic, &[event("c0", "good", "taken")]).await;
    eventually("c0 is applied", || async {
        sink_keys(&sink).await.contains("c0")
    })
    .await;
    sink.batch_execute(
        "ALTER TABLE replica.customers ADD CONSTRAINT no_bad_names CHECK (doc->>'name' NOT LIKE 'bad%');
         CREATE UNIQUE INDEX one_email ON replica.customers ((doc->>'email'))",
    )
    .await
    .unwrap();
    produce(
        &producer,
        &topic,
        &[
            event("k1", "bad 1", "k1"),
            event("u1", "fine", "taken"),
            event("k2", "bad 2", "k2"),
            event("u2", "fine", "taken"),
        ],
    )
    .await;
    read_topic(&servers.kafka, &dlq, 4).await;
    let listed: Json = serde_json::from_str(&ok(&["dlq", "list", "-c", path, "--json"])).unwrap();
    assert_eq!(
        listed[0]["by_class"],
        json!({"sink.check_violation": 2, "sink.unique_violation": 2}),
        "{listed}"
    );

    // The operator fixes the CHECK constraint and replays what it refused, and only that.
    sink.batch_execute("ALTER TABLE replica.customers DROP CONSTRAINT no_bad_names")
        .await
        .unwrap();
    let (selected, sent, outcomes) = replay(path, &dlq, &["--class", "sink.check_violation"]);
    assert_eq!(selected.len(), 2, "{outcomes}");
    assert_eq!(
        sent,
        ["k1".to_string(), "k2".to_string()].into(),
        "{outcomes}"
    );
    eventually("k1 and k2 are applied", || async {
        sink_keys(&sink).await == ["c0", "k1", "k2"].map(String::from).into()
    })
    .await;
    cancel.cancel();
    apply.await.unwrap().unwrap();
}
