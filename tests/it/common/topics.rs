//! Reading and writing the pipeline's topics in tests.

use super::*;

/// Reads `topic` from the beginning until at least `expected` messages arrived (or deadline).
pub async fn read_topic(brokers: &str, topic: &str, expected: usize) -> Vec<OwnedMessage> {
    read_topic_until(brokers, topic, move |m| m.len() >= expected).await
}

/// Reads `topic` from the beginning until `done(messages so far)` (or the deadline). Waits on
/// content: a condition on what arrived, not on offsets.
pub async fn read_topic_until<F>(brokers: &str, topic: &str, done: F) -> Vec<OwnedMessage>
where
    F: Fn(&[OwnedMessage]) -> bool + Send + 'static,
{
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let end = std::time::Instant::now() + DEADLINE;
        let partitions = loop {
            if let Ok(meta) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                let n = meta
                    .topics()
                    .first()
                    .map(|t| t.partitions().len())
                    .unwrap_or(0);
                if n > 0 {
                    break n as i32;
                }
            }
            assert!(
                std::time::Instant::now() < end,
                "topic {topic} never appeared"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        while !done(&out) && std::time::Instant::now() < end {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                out.push(m.detach());
            }
        }
        out.sort_by_key(|m| (m.partition(), m.offset()));
        out
    })
    .await
    .unwrap()
}

pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Creates `config`'s topic for `aggregate_type` as the relay would, and a plain producer for
/// a test to write to it: (topic, producer).
pub async fn topic_with_producer(
    config: &Config,
    aggregate_type: &str,
) -> (String, rdkafka::producer::FutureProducer) {
    let topic = config.kafka.topic_for(aggregate_type);
    dualsync::publish::Publisher::new(&config.kafka)
        .unwrap()
        .ensure_topic(&topic)
        .await
        .unwrap();
    let producer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .create()
        .unwrap();
    (topic, producer)
}

/// Produces `messages` (key, value) to partition 0 of `topic`, in order, each acknowledged.
pub async fn produce_in_order(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    messages: &[(&str, &[u8])],
) {
    for (key, value) in messages {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(topic)
                    .key(*key)
                    .payload(*value)
                    .partition(0),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
}

/// Encodes `events` with the local schemas and produces them to partition 0 of `topic`, in
/// order, keyed by their aggregate ids.
pub async fn produce_events(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    events: &[dualsync::codec::OutboxEvent],
) {
    let schemas = schemas();
    let encoded: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| (e.aggregate_id.clone(), schemas.encode(e).unwrap()))
        .collect();
    let messages: Vec<(&str, &[u8])> = encoded
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    produce_in_order(producer, topic, &messages).await;
}
