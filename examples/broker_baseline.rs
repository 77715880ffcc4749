//! Benchmark baseline for `make bench`: the broker alone, with dualsync's own client settings.
//!
//! Produces `COUNT` messages of `SIZE` bytes over `KEYS` keys to a fresh topic through the
//! relay's publisher (idempotent, `acks=all`, murmur2, `linger.ms=0`) in batches of 1,000
//! (each batch awaited, as the relay does), then reads them all back with a consumer set up
//! like apply's (`fetch.wait.max.ms=20`). Then produces single messages at a light fixed rate
//! (`ACK_RATE` per second for `ACK_COUNT` messages, each awaited) and records the time from
//! hand-over to acknowledgement: the floor under the relay's commit→published latency. Prints
//! one JSON line with the rates and that latency, so the pipeline's figures can be read
//! against what the broker does with no database involved.
//!
//! `cargo run --release --example broker_baseline -- BROKERS [COUNT] [SIZE] [KEYS] [ACK_COUNT] [ACK_RATE]`

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
    let (ack_count, ack_rate) = (arg(5, 2_000).max(1), arg(6, 200).max(1));
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

    // One message at a time on a fixed schedule, as the relay sends at light load.
    let interval = Duration::from_secs_f64(1.0 / ack_rate as f64);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ack_ms = Vec::with_capacity(ack_count);
    for i in 0..ack_count {
        ticks.tick().await;
        let message = Outgoing {
            topic: topic.clone(),
            key: Some(format!("k{}", i % keys).into_bytes()),
            value: value.clone(),
            headers: OwnedHeaders::new(),
        };
        let handed_over = Instant::now();
        publisher.publish_all(vec![message]).await?;
        ack_ms.push(handed_over.elapsed().as_secs_f64() * 1000.0);
    }
    ack_ms.sort_by(f64::total_cmp);
    let quantile = |q: f64| ack_ms[((ack_ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "{{\"messages\": {count}, \"bytes\": {size}, \"produce_per_s\": {:.0}, \"consume_per_s\": {:.0}, \"ack_ms\": {{\"rate_per_s\": {ack_rate}, \"messages\": {ack_count}, \"p50\": {:.1}, \"p99\": {:.1}, \"max\": {:.1}}}}}",
        count as f64 / produce_secs,
        count as f64 / consume_secs,
        quantile(0.5),
        quantile(0.99),
        quantile(1.0),
    );
    Ok(())
}
