//! Benchmark baseline for `make bench`: the broker alone, with dualsync's own client settings.
//!
//! Produces `COUNT` messages of `SIZE` bytes over `KEYS` keys to a fresh topic through the
//! relay's publisher (idempotent, `acks=all`, murmur2, `linger.ms=0`) in batches of 1,000
//! (each batch awaited, as the relay does), then reads them all back with a consumer set up
//! like apply's (`fetch.wait.max.ms=20`). Prints one JSON line with both rates, so the
//! pipeline's figures can be read against what the broker does with no database involved.
//!
//! `cargo run --release --example broker_baseline -- BROKERS [COUNT] [SIZE] [KEYS]`

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use dualsync::config::Config;
use dualsync::publish::{Outgoing, Publisher};

const BATCH: usize = 1000;

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .map(|a| a.parse().expect("a number"))
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let brokers = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: broker_baseline BROKERS [COUNT] [SIZE] [KEYS]"))?;
    let (count, size, keys) = (arg(2, 100_000), arg(3, 300), arg(4, 10_000));
    let topic = format!(
        "bench.broker.{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..12)
            .unwrap_or("x")
    );
    let config = Config::from_toml(
        std::path::Path::new("broker_baseline"),
        &format!(
            "[pipeline]\nname = \"bench\"\n[kafka]\nbrokers = \"{brokers}\"\npartitions = 3\n"
        ),
        Vec::new(),
    )?;
    let publisher = Publisher::new(&config.kafka)?;
    publisher.ensure_topic(&topic).await?;
    let value = vec![b'x'; size];

    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = BATCH.min(count - sent);
        let batch = (sent..sent + n)
            .map(|i| Outgoing {
                topic: topic.clone(),
                key: Some(format!("k{}", i % keys).into_bytes()),
                value: value.clone(),
                headers: OwnedHeaders::new(),
            })
            .collect();
        publisher.publish_all(batch).await?;
        sent += n;
    }
    let produce_secs = started.elapsed().as_secs_f64();

    let consumed = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || -> anyhow::Result<(usize, f64)> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("{topic}.reader"))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "20")
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..config.kafka.partitions {
                tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
            }
            consumer.assign(&tpl)?;
            let started = Instant::now();
            let deadline = started + Duration::from_secs(600);
            let mut got = 0;
            while got < count && Instant::now() < deadline {
                if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                    m?;
                    got += 1;
                }
            }
            Ok((got, started.elapsed().as_secs_f64()))
        }
    })
    .await??;
    let (got, consume_secs) = consumed;
    anyhow::ensure!(got == count, "read back {got} of {count} messages");
    println!(
        "{{\"messages\": {count}, \"bytes\": {size}, \"produce_per_s\": {:.0}, \"consume_per_s\": {:.0}}}",
        count as f64 / produce_secs,
        count as f64 / consume_secs
    );
    Ok(())
}
