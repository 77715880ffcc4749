//! `dualsync demo report`: what arrived where.

use std::time::{Duration, Instant};

use anyhow::Context;
use mongodb::bson::doc;
use rdkafka::consumer::{BaseConsumer, Consumer};

use dualsync::config::{Config, SinkConfig};
use dualsync::publish::client_config;
use dualsync::sink::quote_ident;

const TYPES: [&str; 2] = ["customers", "orders"];

/// Live records per aggregate type in one sink.
async fn sink_counts(sink: &SinkConfig) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::new();
    match sink {
        SinkConfig::Postgres(p) => {
            let client = dualsync::pg::connect(p.url.expose()).await?;
            for t in TYPES {
                let sql = format!(
                    "SELECT count(*) FILTER (WHERE NOT deleted) FROM {}.{}",
                    quote_ident(&p.schema),
                    quote_ident(t)
                );
                out.push(
                    client
                        .query_one(&sql, &[])
                        .await
                        .map(|r| r.get(0))
                        .unwrap_or(0),
                );
            }
        }
        SinkConfig::Mongodb(m) => {
            let client = mongodb::Client::with_uri_str(m.url.expose()).await?;
            let db = client.database(&m.database);
            for t in TYPES {
                let n = db
                    .collection::<mongodb::bson::Document>(t)
                    .count_documents(doc! {"_dualsync.deleted": false})
                    .await?;
                out.push(n as i64);
            }
        }
    }
    Ok(out)
}

fn topic_counts(config: &Config) -> anyhow::Result<Vec<i64>> {
    let consumer: BaseConsumer = client_config(&config.kafka).create()?;
    let mut out = Vec::new();
    for t in TYPES {
        let topic = config.kafka.topic_for(t);
        let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut total = 0;
        for p in meta.topics().iter().flat_map(|t| t.partitions()) {
            let (low, high) = consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
            total += high - low;
        }
        out.push(total);
    }
    Ok(out)
}

pub async fn run(config: &Config, wait: Option<Duration>) -> anyhow::Result<()> {
    let source = dualsync::pg::connect(config.outbox_source()?.url.expose())
        .await
        .context("source database")?;
    let (customers, orders) = dualsync::demo::primary_counts(&source).await?;
    let primary = vec![customers, orders];
    if let Some(limit) = wait {
        let started = Instant::now();
        loop {
            let mut all = true;
            for sink in config.sinks.values() {
                all &= sink_counts(sink)
                    .await
                    .map(|c| c == primary)
                    .unwrap_or(false);
            }
            let (_, unpublished) = dualsync::demo::outbox_counts(&source).await?;
            if all && unpublished == 0 {
                println!(
                    "sinks caught up {:.2}s after the load finished",
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if started.elapsed() > limit {
                anyhow::bail!(
                    "sinks did not match the primary within {}s",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (outbox_total, unpublished) = dualsync::demo::outbox_counts(&source).await?;
    println!("{:<28}{:>12}{:>12}", "", "customers", "orders");
    println!(
        "{:<28}{:>12}{:>12}",
        "primary (live rows)", primary[0], primary[1]
    );
    let topics = topic_counts(config)?;
    println!(
        "{:<28}{:>12}{:>12}",
        "kafka topic (events)", topics[0], topics[1]
    );
    for (name, sink) in &config.sinks {
        let c = sink_counts(sink).await?;
        println!(
            "{:<28}{:>12}{:>12}",
            format!("sink {name} (live records)"),
            c[0],
            c[1]
        );
    }
    println!("outbox rows: {outbox_total} kept, {unpublished} unpublished");
    Ok(())
}
