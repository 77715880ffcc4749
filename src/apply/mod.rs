//! The apply stage: a Kafka consumer group whose partitions are written to a [`Sink`].
//!
//! Offsets are stored (for the next auto-commit) only after the sink acknowledged the write or
//! the dead-letter topic acknowledged the dead letter, so a crash or a rebalance can replay
//! events but never lose one; the sinks' version guard makes the replay harmless. Messages of
//! one partition are handled strictly in order; different partitions of a batch are written
//! concurrently. Transient failures are retried with exponential backoff and jitter, holding
//! that partition's position, for as long as it takes (or until shutdown, which abandons the
//! batch uncommitted).

mod partition;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::codec::SchemaStore;
use crate::config::Config;
use crate::error::{classify, Disposition, Error};
use crate::publish::{client_config, Publisher};
use crate::sink::Sink;

pub use partition::PartitionResult;

/// Running totals, shared with whoever reports on the process.
#[derive(Debug, Default)]
pub struct ApplyStats {
    pub consumed: AtomicU64,
    pub applied: AtomicU64,
    pub stale: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retries: AtomicU64,
    /// Partitions this process holds right now.
    pub assigned_partitions: AtomicU64,
}

impl ApplyStats {
    pub fn snapshot(&self) -> [u64; 5] {
        [
            self.consumed.load(Ordering::Relaxed),
            self.applied.load(Ordering::Relaxed),
            self.stale.load(Ordering::Relaxed),
            self.dead_lettered.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
        ]
    }
}

/// Everything a partition worker needs, shared by all of them.
pub struct ApplyContext<S: Sink> {
    pub sink: Arc<S>,
    pub schemas: Arc<SchemaStore>,
    pub dlq: Publisher,
    pub config: Config,
    pub group: String,
    pub stats: Arc<ApplyStats>,
    pub cancel: CancellationToken,
}

/// Logs every rebalance and keeps the assignment size in the stats. Rebalance callbacks run
/// inside `recv`, i.e. between batches, so a revoke never interrupts a write; messages of a
/// revoked partition still in hand are written (idempotently) and their offsets are not stored.
pub struct RebalanceLogger {
    stats: Arc<ApplyStats>,
}

impl ClientContext for RebalanceLogger {}

impl ConsumerContext for RebalanceLogger {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                    .collect();
                tracing::info!(count = partitions.len(), ?partitions, "partitions assigned");
                self.stats
                    .assigned_partitions
                    .store(partitions.len() as u64, Ordering::Relaxed);
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(count = tpl.count(), "partitions revoked");
                self.stats.assigned_partitions.store(0, Ordering::Relaxed);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
    }
}

type GroupConsumer = StreamConsumer<RebalanceLogger>;

/// Topics to subscribe to: the configured list, the configured regex, or a regex built from
/// the topic template.
fn subscription(config: &Config) -> Vec<String> {
    if !config.apply.topics.is_empty() {
        return config.apply.topics.clone();
    }
    if let Some(re) = &config.apply.topic_regex {
        return vec![re.clone()];
    }
    let (prefix, suffix) = config
        .kafka
        .topic_template
        .split_once("{aggregatetype}")
        .unwrap_or((&config.kafka.topic_template, ""));
    vec![format!(
        "^{}[^.]+{}$",
        regex_escape(prefix),
        regex_escape(suffix)
    )]
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.^$|?*+()[]{}".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// Runs the consumer group until `cancel`; commits the stored offsets before returning.
pub async fn run<S: Sink>(
    config: &Config,
    sink_name: &str,
    sink: Arc<S>,
    schemas: Arc<SchemaStore>,
    stats: Arc<ApplyStats>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let group = config.group_id(sink_name);
    let mut consumer_config = client_config(&config.kafka);
    consumer_config
        .set("group.id", &group)
        .set("enable.auto.offset.store", "false");
    if let Some(instance) = &config.apply.instance_id {
        consumer_config.set("group.instance.id", instance.replace("{sink}", sink_name));
    }
    for (k, v) in [
        ("enable.auto.commit", "true"),
        ("auto.commit.interval.ms", "1000"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
        ("topic.metadata.refresh.interval.ms", "5000"),
        // A killed member's partitions move on after this long (librdkafka's default is 45 s).
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "3000"),
        // Some brokers (Tansu 0.6) hold every empty fetch for the full wait even when data
        // arrives meanwhile, so the wait bounds end-to-end latency: 500 ms by default gave a
        // p50 commit→applied of 400 ms, 20 ms gives 65 ms (see BENCHMARKS.md). An idle
        // consumer pays 50 small fetches a second for it.
        ("fetch.wait.max.ms", "20"),
    ] {
        if !config.kafka.properties.contains_key(k) {
            consumer_config.set(k, v);
        }
    }
    let consumer: GroupConsumer = consumer_config.create_with_context(RebalanceLogger {
        stats: stats.clone(),
    })?;
    let topics = subscription(config);
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    tracing::info!(group = %group, topics = ?topics, sink = sink_name, "apply started");

    let ctx = Arc::new(ApplyContext {
        sink,
        schemas,
        dlq: Publisher::new(&config.kafka)?,
        config: config.clone(),
        group,
        stats,
        cancel: cancel.clone(),
    });
    let tombstone_retention = tombstone_retention(config, sink_name);
    let mut last_purge = Instant::now();
    let result = loop {
        let batch = match next_batch(&consumer, &ctx).await {
            Ok(b) => b,
            Err(e) => break Err(e),
        };
        if batch.is_empty() {
            if cancel.is_cancelled() {
                break Ok(());
            }
            continue;
        }
        ctx.stats
            .consumed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = process_batch(&consumer, &ctx, batch).await {
            break Err(e);
        }
        if cancel.is_cancelled() {
            break Ok(());
        }
        if last_purge.elapsed() > Duration::from_secs(600) {
            last_purge = Instant::now();
            match ctx.sink.purge_tombstones(tombstone_retention).await {
                Ok(n) if n > 0 => tracing::info!(purged = n, "purged old tombstones"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "tombstone purge failed; will try again"),
            }
        }
    };
    // Whatever happened, hand the group the positions of everything that was fully handled.
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("final offsets committed"),
        Err(e) => tracing::debug!(error = %e, "no final offsets to commit"),
    }
    result
}

fn tombstone_retention(config: &Config, sink_name: &str) -> Duration {
    let secs = match config.sinks.get(sink_name) {
        Some(crate::config::SinkConfig::Postgres(p)) => p.tombstone_retention_secs,
        Some(crate::config::SinkConfig::Mongodb(m)) => m.tombstone_retention_secs,
        None => u64::MAX / 2,
    };
    Duration::from_secs(secs)
}

/// Up to `batch_size` messages, waiting at most `linger_ms` after the first one. Consumer
/// errors go through [`classify`]: transient ones (a subscribed topic not created yet, a
/// broker down) are logged and waited out, never fatal.
async fn next_batch<S: Sink>(
    consumer: &GroupConsumer,
    ctx: &ApplyContext<S>,
) -> Result<Vec<OwnedMessage>, Error> {
    let mut batch = Vec::new();
    loop {
        let received = tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(batch),
            m = consumer.recv() => m,
        };
        match received {
            Ok(m) => {
                batch.push(m.detach());
                break;
            }
            Err(e) => consumer_error(e.into())?,
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ctx.config.apply.linger_ms);
    while batch.len() < ctx.config.apply.batch_size {
        tokio::select! {
            _ = ctx.cancel.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m.detach()),
                Err(e) => {
                    consumer_error(e.into())?;
                    break;
                }
            },
        }
    }
    Ok(batch)
}

/// A consumer-level error: fatal ones end the stage, the rest are logged (librdkafka keeps
/// retrying them itself).
fn consumer_error(e: Error) -> Result<(), Error> {
    match classify(&e) {
        Disposition::Fatal => Err(e),
        _ => {
            tracing::warn!(error = %e, "consumer reported a transient problem; continuing");
            Ok(())
        }
    }
}

/// Writes one batch, partition by partition (concurrently), then stores the offsets of the
/// partitions that were fully handled.
async fn process_batch<S: Sink>(
    consumer: &GroupConsumer,
    ctx: &Arc<ApplyContext<S>>,
    batch: Vec<OwnedMessage>,
) -> Result<(), Error> {
    let mut by_partition: BTreeMap<(String, i32), Vec<OwnedMessage>> = BTreeMap::new();
    for m in batch {
        by_partition
            .entry((m.topic().to_string(), m.partition()))
            .or_default()
            .push(m);
    }
    let work = by_partition
        .into_iter()
        .map(|((topic, partition), messages)| {
            let span = tracing::info_span!("partition", %topic, partition);
            let ctx = ctx.clone();
            async move {
                let last = messages.last().map(|m| m.offset()).unwrap_or(-1);
                let result = partition::process(&ctx, messages).await;
                (topic, partition, last, result)
            }
            .instrument(span)
        });
    let mut fatal = None;
    for (topic, partition, last, result) in join_all(work).await {
        match result {
            Ok(PartitionResult::Done) => {
                // One list per partition, so a revoked partition fails alone.
                let mut next = TopicPartitionList::new();
                next.add_partition_offset(&topic, partition, Offset::Offset(last + 1))?;
                if let Err(e) = consumer.store_offsets(&next) {
                    // Revoked meanwhile: its new owner replays from the committed offset, and
                    // the version guard absorbs the repeat.
                    tracing::debug!(error = %e, %topic, partition, "offset not stored (revoked?)");
                }
            }
            Ok(PartitionResult::Abandoned) => {}
            Err(e) => fatal = Some(e),
        }
    }
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
