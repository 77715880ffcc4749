//! Poison messages land in the dead-letter topic with their context, and the partition keeps
//! flowing; bad outbox rows land in the relay's dead-letter topic.

use dualsync::metrics::total;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rdkafka::Message;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::codec::OutboxEvent;
use dualsync::config::{Config, SinkConfig};
use dualsync::dlq::headers as dlq;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;

use crate::capture_modes::Mode;
use crate::common::*;

/// (expected error class, key, value) of one poison message.
type Poison<'a> = (&'a str, Option<&'a [u8]>, Vec<u8>);

fn event(id: &str, version: i64) -> OutboxEvent {
    customer_event(
        id,
        version,
        Some(json!({"id": id, "name": "n", "email": "e", "order_count": 1})),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_and_the_partition_keeps_flowing() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    let topic = config.kafka.topic_for("customers");
    let schemas = schemas();
    let good = schemas.encode(&event("c1", 1)).unwrap();
    let mut unknown_schema = good.clone();
    unknown_schema[2..10].copy_from_slice(&[0xAB; 8]);
    let mut violation = good[..10].to_vec();
    violation.extend_from_slice(&[0x02, 0x41]); // a string of length 1, then nothing
    let poison: Vec<Poison> = vec![
        ("decode.bad_magic", Some(b"c1"), b"not avro at all".to_vec()),
        (
            "decode.no_registry",
            Some(b"c1"),
            vec![0x00, 0, 0, 0, 1, 2, 3],
        ), // Confluent framing, no registry configured
        ("decode.truncated", Some(b"c1"), vec![0xC3, 0x01, 1, 2]),
        ("decode.unknown_schema", Some(b"c1"), unknown_schema),
        ("decode.schema_violation", Some(b"c1"), violation),
        ("decode.null_key", None, good.clone()),
        ("decode.key_mismatch", Some(b"other"), good.clone()),
    ];
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let publisher = dualsync::publish::Publisher::new(&config.kafka).unwrap();
    publisher.ensure_topic(&topic).await.unwrap();
    for (_, key, value) in &poison {
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic)
            .payload(value)
            .partition(0)
            .headers(OwnedHeaders::new().insert(Header {
                key: "origin",
                value: Some("test"),
            }));
        if let Some(k) = key {
            record = record.key(k);
        }
        producer
            .send(record, std::time::Duration::from_secs(30))
            .await
            .unwrap();
    }
    let after = schemas.encode(&event("c1", 2)).unwrap();
    producer
        .send(
            FutureRecord::to(&topic)
                .key("c1")
                .payload(&after)
                .partition(0),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();

    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);
    let SinkConfig::Postgres(p) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(p).await.unwrap();
    eventually("the good event after the poison is applied", || async {
        sink.get("customers", "c1").await.unwrap().map(|(v, _)| v) == Some(2)
    })
    .await;

    let mut letters = read_topic(&servers.kafka, &format!("{topic}.dlq"), poison.len()).await;
    assert_eq!(letters.len(), poison.len());
    letters.sort_by_key(|l| header(l, dlq::OFFSET).and_then(|o| o.parse::<i64>().ok()));
    for (letter, (class, key, value)) in letters.iter().zip(&poison) {
        assert_eq!(header(letter, dlq::CLASS).as_deref(), Some(*class));
        assert_eq!(letter.key(), *key, "original key kept");
        assert_eq!(
            letter.payload(),
            Some(value.as_slice()),
            "original value kept"
        );
        assert_eq!(
            header(letter, "origin").as_deref(),
            Some("test"),
            "original headers kept"
        );
        assert_eq!(header(letter, dlq::TOPIC).as_deref(), Some(topic.as_str()));
        assert_eq!(header(letter, dlq::PARTITION).as_deref(), Some("0"));
        assert!(header(letter, dlq::OFFSET).is_some());
        assert_eq!(header(letter, dlq::STAGE).as_deref(), Some("decode"));
        assert_eq!(
            header(letter, dlq::GROUP),
            Some(config.group_id("postgres"))
        );
        assert!(header(letter, dlq::MESSAGE).is_some_and(|m| !m.is_empty()));
        assert!(header(letter, dlq::TIMESTAMP).is_some());
    }
    assert_eq!(total(&stats.dead_lettered), poison.len() as u64);
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_outbox_rows_go_to_the_relay_dead_letter_topic() {
    bad_rows_dead_lettered(Mode::Poll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_bad_outbox_rows_go_to_the_relay_dead_letter_topic() {
    bad_rows_dead_lettered(Mode::Wal).await;
}

async fn bad_rows_dead_lettered(mode: Mode) {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let mut config = pipeline(&servers, &source_url, &source_url, &unique("t"), "");
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let prepared = mode.prepare(&source, &source_url).await;
    if let Some(dualsync::config::SourceConfig::PostgresOutbox(s)) = &mut config.source {
        prepared.apply(s);
    }
    source
        .batch_execute(
            r#"INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES
               ('customers', 'c1', 'CustomerUpserted', '{"id":"c1","name":"x"}'),
               ('nothing_like_it', 'z1', 'Odd', '{}'),
               ('customers', 'c2', 'CustomerUpserted', '{"id":"c2","name":"y","email":"e","order_count":1}')"#,
        )
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let (relay, stats) = spawn_relay(&config, &cancel);
    let mut letters = read_topic(&servers.kafka, &config.relay.dead_letter_topic, 2).await;
    assert_eq!(letters.len(), 2);
    // By aggregate id: from the WAL, the three rows of one transaction share a version.
    letters.sort_by_key(|l| {
        serde_json::from_slice::<serde_json::Value>(l.payload().unwrap()).unwrap()["aggregateid"]
            .as_str()
            .map(str::to_string)
    });
    assert_eq!(
        header(&letters[0], dlq::CLASS).as_deref(),
        Some("encode.schema_violation")
    );
    assert!(header(&letters[0], dlq::MESSAGE)
        .unwrap()
        .contains("$.email"));
    assert_eq!(
        header(&letters[1], dlq::CLASS).as_deref(),
        Some("encode.no_schema")
    );
    let raw: serde_json::Value = serde_json::from_slice(letters[0].payload().unwrap()).unwrap();
    assert_eq!(raw["aggregateid"], "c1");
    let good = read_topic(&servers.kafka, &config.kafka.topic_for("customers"), 1).await;
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].key(), Some(&b"c2"[..]));
    if mode == Mode::Poll {
        eventually("all three rows are marked published", || async {
            dualsync::demo::outbox_counts(&source).await.unwrap().1 == 0
        })
        .await;
    }
    eventually("the relay counted them", || async {
        total(&stats.dead_lettered) == 2 && total(&stats.published) == 1
    })
    .await;
    assert_eq!(total(&stats.dead_lettered), 2);
    assert_eq!(total(&stats.published), 1);
    cancel.cancel();
    relay.await.unwrap().unwrap();
}

/// `dualsync dlq replay --force` of every letter in `dlq_topic`, with the local schemas.
pub async fn force_replay(config: &Config, dlq_topic: &str) -> Vec<dualsync::ops::replay::Outcome> {
    let letters = {
        let (config, dlq_topic) = (config.clone(), dlq_topic.to_string());
        tokio::task::spawn_blocking(move || dualsync::ops::inspect::read_topic(&config, &dlq_topic))
            .await
            .unwrap()
            .unwrap()
    };
    let codec = dualsync::wire::EventCodec::new(schemas(), None);
    dualsync::ops::replay::replay(config, &codec, dlq_topic, letters, false, true)
        .await
        .unwrap()
}

/// A document over MongoDB's 16 MiB limit: the sink refuses it, its dead letter is too large
/// for the broker's default limit too, so it goes without its value (saying where the original
/// is), and the partition keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversize_document_is_dead_lettered_without_stalling_the_partition() {
    let servers = servers();
    let config = pipeline_without_postgres(&servers, &unique("t"));
    let topic = config.kafka.topic_for("customers");
    let schemas = schemas();
    let mut big = event("big", 1);
    big.payload.as_mut().unwrap()["name"] = json!("x".repeat(17 << 20));
    let big_value = schemas.encode(&big).unwrap();
    let after = schemas.encode(&event("c2", 1)).unwrap();
    // A topic that takes 17 MiB events (Kafka's default limit is 1 MiB a message), as its
    // owner would create it.
    let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    let new_topic =
        rdkafka::admin::NewTopic::new(&topic, 1, rdkafka::admin::TopicReplication::Fixed(1))
            .set("max.message.bytes", "67108864");
    for result in admin
        .create_topics([&new_topic], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    // The upstream producer allows big messages (as a topic holding 17 MiB events must).
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .set("message.max.bytes", "67108864")
        .create()
        .unwrap();
    produce_in_order(&producer, &topic, &[("big", &big_value), ("c2", &after)]).await;

    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "mongo", &cancel);
    let SinkConfig::Mongodb(m) = &config.sinks["mongo"] else {
        unreachable!()
    };
    let sink = dualsync::sink::mongo::MongoSink::connect(m).await.unwrap();
    eventually("the event after the oversize one is applied", || async {
        sink.get("customers", "c2").await.unwrap().is_some()
    })
    .await;
    assert_eq!(sink.get("customers", "big").await.unwrap(), None);

    let dlq_topic = format!("{topic}.dlq");
    let letters = read_topic(&servers.kafka, &dlq_topic, 1).await;
    assert_eq!(
        letters.len(),
        1,
        "exactly the oversize event is dead-lettered"
    );
    let letter = &letters[0];
    assert_eq!(letter.key(), Some(&b"big"[..]));
    assert_eq!(header(letter, dlq::STAGE).as_deref(), Some("sink"));
    // Refused by the server (code 17420, document larger than 16 MiB), not by dualsync.
    assert_eq!(header(letter, dlq::CLASS).as_deref(), Some("mongodb"));
    assert_eq!(
        header(letter, dlq::VALUE_OMITTED),
        Some(big_value.len().to_string()),
        "the letter says how big the left-out value was"
    );
    assert_eq!(letter.payload().unwrap_or_default(), b"");
    assert_eq!(header(letter, dlq::TOPIC), Some(topic.clone()));
    assert_eq!(header(letter, dlq::OFFSET).as_deref(), Some("0"));
    assert_eq!(total(&stats.dead_lettered), 1);

    // Replay cannot send what the letter does not hold, and says where the original is.
    let outcomes = force_replay(&config, &dlq_topic).await;
    assert!(!outcomes[0].sent);
    match &outcomes[0].decision {
        dualsync::ops::replay::Decision::StillFails { error } => {
            assert!(error.contains(&format!("{topic}[0]@0")), "{error}")
        }
        other => panic!("{other:?}"),
    }
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// An outbox row whose event exceeds Kafka's message size limit: the relay dead-letters it
/// without its payload and keeps publishing; replaying that letter is refused (sending a row
/// without its payload would publish a delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_row_too_large_for_kafka_is_dead_lettered_and_the_relay_goes_on() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let config = pipeline(&servers, &source_url, &source_url, &unique("t"), "");
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();
    let big_name = "x".repeat(2 << 20); // over librdkafka's default message.max.bytes (1 MB)
    source
        .execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload) VALUES
               ('customers', 'c1', 'CustomerUpserted', '{\"id\":\"c1\",\"name\":\"a\",\"email\":\"e\",\"order_count\":1}'),
               ('customers', 'c2', 'CustomerUpserted', jsonb_build_object('id', 'c2', 'name', $1::text, 'email', 'e', 'order_count', 1)),
               ('customers', 'c3', 'CustomerUpserted', '{\"id\":\"c3\",\"name\":\"c\",\"email\":\"e\",\"order_count\":1}')",
            &[&big_name],
        )
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let (relay, stats) = spawn_relay(&config, &cancel);
    let letters = read_topic(&servers.kafka, &config.relay.dead_letter_topic, 1).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.key(), Some(&b"c2"[..]));
    assert_eq!(
        header(letter, dlq::CLASS).as_deref(),
        Some("publish.too_large")
    );
    assert_eq!(header(letter, dlq::STAGE).as_deref(), Some("relay.publish"));
    let raw: serde_json::Value = serde_json::from_slice(letter.payload().unwrap()).unwrap();
    assert_eq!(raw["aggregateid"], "c2");
    assert_eq!(
        raw["payload"],
        serde_json::Value::Null,
        "the payload is left out"
    );
    let size: usize = header(letter, dlq::VALUE_OMITTED).unwrap().parse().unwrap();
    assert!(
        size > big_name.len(),
        "the letter says how big the payload was: {size}"
    );

    let topic = config.kafka.topic_for("customers");
    let events = read_topic_until(&servers.kafka, &topic, |m| {
        m.iter().any(|m| m.key() == Some(&b"c3"[..]))
    })
    .await;
    let keys: std::collections::BTreeSet<_> = events.iter().filter_map(|m| m.key()).collect();
    assert_eq!(
        keys,
        [&b"c1"[..], &b"c3"[..]].into(),
        "the rows around it are published"
    );
    eventually("all three rows are marked published", || async {
        dualsync::demo::outbox_counts(&source).await.unwrap().1 == 0
    })
    .await;
    assert!(!relay.is_finished(), "the relay keeps running");
    assert_eq!(total(&stats.dead_lettered), 1);

    let outcomes = force_replay(&config, &config.relay.dead_letter_topic).await;
    assert!(
        !outcomes[0].sent,
        "never replayed as a payload-less row (a delete)"
    );
    cancel.cancel();
    relay.await.unwrap().unwrap();
}

/// Apply never trusts the envelope over the topic: an `orders` event produced to the
/// `customers` topic, and a customers-schema event claiming an aggregate type the pipeline
/// does not carry (on the customers topic and on a topic of its own that matches the
/// subscription), are dead-lettered with classes of their own. No table is created for the
/// unknown type and no orders record is written (nor pinned by its huge version).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_that_do_not_route_to_their_topic_or_type_are_poison() {
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), "");
    let customers_topic = config.kafka.topic_for("customers");
    let widgets_topic = config.kafka.topic_for("widgets");
    let schemas = schemas();
    let huge = 1i64 << 62;
    let order = dualsync::codec::OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: "OrderPlaced".into(),
        aggregate_type: "orders".into(),
        aggregate_id: "o1".into(),
        version: huge,
        created_at_micros: 0,
        payload: Some(
            json!({"id": "o1", "customer_id": "c1", "status": "NEW", "total_cents": 5, "lines": [], "note": null}),
        ),
    };
    let order_value = schemas.encode(&order).unwrap();
    // A customers-schema datum whose aggregate_type field says "widgets" (Avro strings are
    // length-prefixed: zigzag 9 = 0x12 for "customers", 7 = 0x0e for "widgets").
    let customer_value = schemas.encode(&event("w1", huge)).unwrap();
    let at = customer_value
        .windows(10)
        .position(|w| w == b"\x12customers")
        .expect("aggregate_type in the datum");
    let mut widget_value = customer_value[..at].to_vec();
    widget_value.extend_from_slice(b"\x0ewidgets");
    widget_value.extend_from_slice(&customer_value[at + 10..]);

    let publisher = dualsync::publish::Publisher::new(&config.kafka).unwrap();
    for topic in [&customers_topic, &widgets_topic] {
        publisher.ensure_topic(topic).await.unwrap();
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    produce_in_order(
        &producer,
        &customers_topic,
        &[("o1", &order_value), ("w1", &widget_value)],
    )
    .await;
    produce_in_order(&producer, &widgets_topic, &[("w1", &widget_value)]).await;
    let after = schemas.encode(&event("c1", 1)).unwrap();
    produce_in_order(&producer, &customers_topic, &[("c1", &after)]).await;

    let cancel = CancellationToken::new();
    let (apply, _) = spawn_apply(&config, "postgres", &cancel);
    let SinkConfig::Postgres(p) = &config.sinks["postgres"] else {
        unreachable!()
    };
    let sink = PostgresSink::connect(p).await.unwrap();
    eventually(
        "the good event after the misrouted ones is applied",
        || async { sink.get("customers", "c1").await.unwrap().is_some() },
    )
    .await;
    let classes = |letters: &[rdkafka::message::OwnedMessage]| -> Vec<String> {
        letters
            .iter()
            .map(|l| header(l, dlq::CLASS).unwrap_or_default())
            .collect()
    };
    let letters = read_topic(&servers.kafka, &format!("{customers_topic}.dlq"), 2).await;
    assert_eq!(
        classes(&letters),
        ["decode.wrong_topic", "decode.unknown_aggregate_type"]
    );
    let letters = read_topic(&servers.kafka, &format!("{widgets_topic}.dlq"), 1).await;
    assert_eq!(classes(&letters), ["decode.unknown_aggregate_type"]);
    let tables: Vec<String> = first_column(
        &dualsync::pg::connect(&sink_url).await.unwrap(),
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'replica'",
    )
    .await;
    assert!(
        !tables.iter().any(|t| t == "orders" || t == "widgets"),
        "no table for orders or widgets: {tables:?}"
    );
    assert_eq!(sink.get("customers", "w1").await.unwrap(), None);
    cancel.cancel();
    apply.await.unwrap().unwrap();
}

/// A record the sink refuses (a value its column cannot take) in a batch that holds all three
/// partitions of its topic: apply writes a topic's share of a batch in one write, so the
/// refusal must be narrowed down to that record. Everything else is written, the record is
/// dead-lettered with its own partition and offset, and every partition's committed offset
/// moves past the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_the_sink_refuses_is_dead_lettered_alone_and_every_partition_moves_on() {
    const UUID_EMAILS: &str = r#"
[sinks.postgres.tables.customers]
columns = [{ name = "email", type = "uuid" }]
"#;
    let servers = servers();
    let sink_url = create_database(&servers).await;
    let config = pipeline(&servers, &sink_url, &sink_url, &unique("t"), UUID_EMAILS);
    let (topic, producer) = topic_with_producer(&config, "customers").await;
    let schemas = schemas();
    let with_email = |id: &str, email: &str| {
        let payload = json!({"id": id, "name": "n", "email": email, "order_count": 1});
        schemas
            .encode(&customer_event(id, 1, Some(payload)))
            .unwrap()
    };
    // Everything is on the topic before apply starts, so its first batch spans the partitions.
    let mut good = Vec::new();
    for partition in 0..3 {
        for n in 0..3 {
            let id = format!("p{partition}-{n}");
            let value = if (partition, n) == (1, 1) {
                with_email("refused", "not a uuid")
            } else {
                good.push(id.clone());
                with_email(&id, &uuid::Uuid::new_v4().to_string())
            };
            let key = if (partition, n) == (1, 1) {
                "refused"
            } else {
                &id
            };
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(key)
                        .payload(&value)
                        .partition(partition),
                    std::time::Duration::from_secs(30),
                )
                .await
                .unwrap();
        }
    }

    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, "postgres", &cancel);
    let letters = read_topic(&servers.kafka, &format!("{topic}.dlq"), 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].key(), Some(&b"refused"[..]));
    assert_eq!(header(&letters[0], dlq::STAGE).as_deref(), Some("sink"));
    assert_eq!(header(&letters[0], dlq::PARTITION).as_deref(), Some("1"));
    assert_eq!(header(&letters[0], dlq::OFFSET).as_deref(), Some("1"));
    let replica = dualsync::pg::connect(&sink_url).await.unwrap();
    eventually("every other record is written", || async {
        let rows = replica
            .query(
                "SELECT id FROM replica.customers ORDER BY id COLLATE \"C\"",
                &[],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
            .unwrap_or_else(|_| Vec::new());
        rows == good
    })
    .await;
    assert_eq!(total(&stats.dead_lettered), 1);
    cancel.cancel();
    apply.await.unwrap().unwrap();

    let group = config.group_id("postgres");
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition(&topic, p);
    }
    let committed = rdkafka::consumer::Consumer::committed_offsets(
        &consumer,
        partitions,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    for p in 0..3 {
        assert_eq!(
            committed.find_partition(&topic, p).map(|e| e.offset()),
            Some(rdkafka::Offset::Offset(3)),
            "partition {p}'s committed offset"
        );
    }
}
