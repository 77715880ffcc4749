//! The apply stage: a Kafka consumer group whose partitions are written to a [`Sink`].
//!
//! Offsets are stored (for the next auto-commit) only after the sink acknowledged the write or
//! the dead-letter topic acknowledged the dead letter, so a crash or a rebalance can replay
//! events but never lose one; the sinks' version guard makes the replay harmless. Messages of
//! one partition are handled strictly in order; a batch is written topic by topic (one sink
//! write per topic, different topics concurrently). Transient failures are retried with
//! exponential backoff and jitter, holding the partitions' positions, for as long as it takes
//! (or until shutdown, which abandons the batch uncommitted).

mod hold;
mod lag;
mod purge;
mod share;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::codec::SchemaStore;
use crate::config::Config;
use crate::error::{classify, Disposition, Error};
use crate::http::Control;
use crate::metrics::{stage, Metrics};
use crate::publish::{client_config, KafkaHealth, Publisher, STATISTICS_INTERVAL_MS};
use crate::sink::Sink;
use crate::traces::{self, Traces};
use crate::wire::EventCodec;
use hold::{Hold, OnAssign};

pub use share::ShareResult;

/// Everything a batch's workers need, shared by all of them.
pub struct ApplyContext<S: Sink> {
    pub sink: Arc<S>,
    /// The `[sinks.NAME]` it writes to, for log lines.
    pub sink_name: String,
    pub codec: EventCodec,
    pub dlq: Publisher,
    pub config: Config,
    pub group: String,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
    /// `[telemetry]`'s tracer: a span per sink write (one topic of a batch).
    pub traces: Option<Traces>,
    /// Runs of slow and of failing sink writes, each told in a few lines.
    pub signals: share::WriteSignals,
}

/// The consumer's librdkafka context: logs every rebalance, keeps the assignment size in the
/// metrics, and reports broker reachability. Rebalance
/// callbacks run inside `recv`, i.e. between batches, so a revoke never interrupts a write;
/// messages of a revoked partition still in hand are written (idempotently) and their offsets
/// are not stored.
pub struct ConsumerEvents {
    health: KafkaHealth,
    metrics: Arc<Metrics>,
    /// Whether the assignment is held (paused) right now: see [`hold_partitions`].
    hold: Hold,
}

impl ClientContext for ConsumerEvents {
    fn stats(&self, statistics: Statistics) {
        crate::publish::chatter::statistics(&statistics);
        self.metrics
            .health
            .set_broker_up(crate::publish::brokers_up(&statistics));
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.health.error(error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        crate::publish::chatter::log(level, fac, message);
    }
}

impl ConsumerContext for ConsumerEvents {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &TopicPartitionList| -> Vec<String> {
            tpl.elements()
                .iter()
                .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                .collect()
        };
        match rebalance {
            // Incremental (cooperative-sticky): these are the partitions added or taken away,
            // not the whole assignment.
            Rebalance::Assign(tpl) => {
                tracing::info!(count = tpl.count(), partitions = ?list(tpl), "partitions assigned");
                // What is handed out follows the hold as it is now (see [`Hold::assigned`]).
                let parts: Vec<_> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let result = match self.hold.assigned(parts) {
                    OnAssign::Pause => consumer.pause(tpl),
                    OnAssign::Resume(stale) if stale.is_empty() => Ok(()),
                    OnAssign::Resume(stale) => {
                        let mut resume = TopicPartitionList::new();
                        for (topic, partition) in &stale {
                            resume.add_partition(topic, *partition);
                        }
                        consumer.resume(&resume)
                    }
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not set the pause state of assigned partitions");
                }
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(count = tpl.count(), partitions = ?list(tpl), "partitions revoked");
                self.hold.revoked(
                    tpl.elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition())),
                );
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.assigned_partitions.set(assigned as i64);
    }
}

type GroupConsumer = StreamConsumer<ConsumerEvents>;

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

/// How long start-up waits for the broker to create the event topics (it may be down).
const TOPIC_CREATION_WAIT: Duration = Duration::from_secs(10);

/// With the default subscription (every topic of the template), creates the topic of each
/// aggregate type that has a schema before the group is joined, as the relay would, so the
/// group's first assignment already covers them: a topic appearing later is only seen at the
/// next metadata refresh (up to `topic.metadata.refresh.interval.ms`) and costs a rebalance
/// of the whole group before its first event is applied. Best effort: a topic that cannot be
/// created now is consumed once the relay creates it.
async fn create_event_topics(config: &Config, schemas: &SchemaStore, publisher: &Publisher) {
    if !config.apply.topics.is_empty() || config.apply.topic_regex.is_some() {
        return;
    }
    let mut types: Vec<&str> = schemas.aggregate_types().collect();
    types.sort_unstable();
    for aggregate_type in types {
        let topic = config.kafka.topic_for(aggregate_type);
        if let Err(e) = publisher.ensure_topic(&topic).await {
            tracing::warn!(topic, error = %e, "cannot create the event topic before joining the group; it is consumed once the relay creates it");
        }
    }
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
/// While `control` is paused, the assigned partitions are paused (the process stays in the
/// group, so a pause never triggers a rebalance).
pub async fn run<S: Sink>(
    config: &Config,
    sink_name: &str,
    sink: Arc<S>,
    schemas: Arc<SchemaStore>,
    metrics: Arc<Metrics>,
    control: Control,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let codec = EventCodec::for_reading(config, schemas.clone())?;
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
        // Incremental rebalancing (KIP-429): a member joining or leaving moves only the
        // partitions that change owner; the others keep being applied meanwhile.
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
    ] {
        if !config.kafka.properties.contains_key(k) {
            consumer_config.set(k, v);
        }
    }
    let health = KafkaHealth::new(metrics.clone(), &config.http);
    let consumer: Arc<GroupConsumer> =
        Arc::new(consumer_config.create_with_context(ConsumerEvents {
            health: health.clone(),
            metrics: metrics.clone(),
            hold: Hold::default(),
        })?);
    let dlq = Publisher::with_health(&config.kafka, health)?;
    tokio::select! {
        _ = cancel.cancelled() => {}
        created = tokio::time::timeout(TOPIC_CREATION_WAIT, create_event_topics(config, &schemas, &dlq)) => {
            if created.is_err() {
                tracing::warn!("the broker did not confirm the event topics in time; joining the group anyway");
            }
        }
    }
    let topics = subscription(config);
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    tracing::info!(group = %group, topics = ?topics, sink = sink_name, "apply started");

    let tracer = Traces::start(config, "apply")?;
    let ctx = Arc::new(ApplyContext {
        sink,
        sink_name: sink_name.to_string(),
        codec,
        dlq,
        config: config.clone(),
        group,
        metrics,
        cancel: cancel.clone(),
        traces: tracer.clone(),
        signals: share::WriteSignals::default(),
    });
    ctx.metrics.health.set_started();
    let lag_sampler = tokio::spawn(lag::sample_consumer_lag(
        consumer.clone(),
        ctx.metrics.clone(),
        cancel.clone(),
    ));
    let interval = Duration::from_secs(config.apply.tombstone_purge_interval_secs);
    let purger = tokio::spawn(purge::purge_tombstones(
        ctx.sink.clone(),
        purge::tombstone_retention(config, sink_name),
        interval,
        purge::purge_grace(config, sink_name, interval),
        cancel.clone(),
    ));
    let mut pending = Vec::new();
    let result = loop {
        if control.is_paused() {
            if let Err(e) = wait_while_paused(&consumer, &ctx, &control, &mut pending).await {
                break Err(e);
            }
        }
        let batch = match next_batch(&consumer, &ctx, &control, &mut pending).await {
            Ok(b) => b,
            Err(e) => break Err(e),
        };
        if batch.is_empty() {
            if cancel.is_cancelled() {
                break Ok(());
            }
            continue; // paused, or nothing yet
        }
        if let Err(e) = process_batch(&consumer, &ctx, batch, &mut pending).await {
            break Err(e);
        }
        if cancel.is_cancelled() {
            break Ok(());
        }
    };
    lag_sampler.abort();
    purger.abort();
    // Whatever happened, hand the group the positions of everything that was fully handled.
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("final offsets committed"),
        Err(e) => tracing::debug!(error = %e, "no final offsets to commit"),
    }
    traces::shutdown(tracer).await;
    result
}

/// Pauses the assigned partitions until `control` is resumed (or shutdown), still polling so
/// the group membership and rebalances are served. Messages fetched before the pause took
/// effect are kept in `pending`, never dropped.
async fn wait_while_paused<S: Sink>(
    consumer: &GroupConsumer,
    ctx: &ApplyContext<S>,
    control: &Control,
    pending: &mut Vec<OwnedMessage>,
) -> Result<(), Error> {
    tracing::info!("paused: consumption stopped until resumed");
    let mut paused = control.subscribe();
    hold_partitions(consumer, true);
    loop {
        if !*paused.borrow_and_update() || ctx.cancel.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => {}
            _ = paused.changed() => {}
            m = consumer.recv() => match m {
                Ok(m) => pending.push(m.detach()),
                Err(e) => consumer_error(e.into())?,
            },
        }
    }
    hold_partitions(consumer, false);
    tracing::info!("resumed");
    Ok(())
}

/// Up to `batch_size` messages (those left `pending` first), waiting at most `linger_ms` after
/// the first one. Consumer errors go through [`classify`]: transient ones (a subscribed topic
/// not created yet, a broker down) are logged and waited out, never fatal.
async fn next_batch<S: Sink>(
    consumer: &GroupConsumer,
    ctx: &ApplyContext<S>,
    control: &Control,
    pending: &mut Vec<OwnedMessage>,
) -> Result<Vec<OwnedMessage>, Error> {
    if !pending.is_empty() {
        return Ok(std::mem::take(pending));
    }
    let mut batch = Vec::new();
    let mut paused = control.subscribe();
    loop {
        let received = tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(batch),
            // A pause while idle takes effect at once; a batch in hand is finished first.
            _ = paused.wait_for(|p| *p) => return Ok(batch),
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
        // Connection trouble is told by the client's context, per broker and in a few lines
        // (publish::chatter); here it would be one more line per reconnect.
        _ if matches!(&e, Error::Kafka(k) if crate::publish::chatter::is_connection_error(k.rdkafka_error_code())) =>
        {
            tracing::debug!(error = %e, "consumer reported a connection problem; continuing");
            Ok(())
        }
        _ => {
            tracing::warn!(error = %e, "consumer reported a transient problem; continuing");
            Ok(())
        }
    }
}

/// Pauses (`on`) or resumes every assigned partition, and records it so that partitions a
/// rebalance hands out meanwhile get the same state (see [`ConsumerEvents`]). Rebalance
/// callbacks run inside `recv`, on this task, so the record and the assignment cannot race.
fn hold_partitions(consumer: &GroupConsumer, on: bool) {
    consumer.context().hold.set(on);
    if let Ok(assignment) = consumer.assignment() {
        let result = if on {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, on, "could not pause or resume the assigned partitions");
        }
    }
}

/// How long a batch may take before apply pauses its partitions and polls the consumer while
/// the batch goes on (see [`process_batch`]).
const KEEP_MEMBERSHIP_AFTER: Duration = Duration::from_secs(1);

/// Writes one batch, topic by topic (concurrently), then stores the offsets of the partitions
/// of every topic that was fully handled.
///
/// A sink that is down is retried for as long as it takes, which can be longer than
/// `max.poll.interval.ms`; a consumer that stops polling that long is evicted from the group
/// and its partitions go to another process while this one still writes them. So once a
/// batch takes longer than [`KEEP_MEMBERSHIP_AFTER`], every assigned partition is paused (no
/// more fetching, nothing hammers a sink that is down) and the consumer is polled meanwhile:
/// the membership stays alive, rebalances are served, and messages already fetched wait in
/// `pending`, in order, for the next batch.
async fn process_batch<S: Sink>(
    consumer: &GroupConsumer,
    ctx: &Arc<ApplyContext<S>>,
    batch: Vec<OwnedMessage>,
    pending: &mut Vec<OwnedMessage>,
) -> Result<(), Error> {
    // Per topic, its messages in the order received (so each partition's stay in order) and
    // the last offset of each of its partitions.
    let mut by_topic: BTreeMap<String, (Vec<OwnedMessage>, BTreeMap<i32, i64>)> = BTreeMap::new();
    for m in batch {
        let (messages, last) = by_topic.entry(m.topic().to_string()).or_default();
        last.insert(m.partition(), m.offset());
        messages.push(m);
    }
    let work = by_topic.into_iter().map(|(topic, (messages, last))| {
        let partitions: Vec<i32> = last.keys().copied().collect();
        let span = tracing::info_span!("share", %topic, ?partitions);
        let ctx = ctx.clone();
        async move {
            ctx.metrics
                .consumed
                .with_label_values(&[&topic])
                .inc_by(messages.len() as u64);
            ctx.metrics
                .batch_size
                .with_label_values(&[stage::APPLY])
                .observe(messages.len() as f64);
            let span = ctx.traces.as_ref().map(|_| share::span_events(&messages));
            let result = share::process(&ctx, messages).await;
            if let (Some(traces), Some((started, events))) = (&ctx.traces, span) {
                share::record_span(&ctx, traces, started, &events, &result);
            }
            (topic, last, result)
        }
        .instrument(span)
    });
    let work = join_all(work);
    tokio::pin!(work);
    let mut held = false;
    let results = loop {
        tokio::select! {
            results = &mut work => break results,
            _ = tokio::time::sleep(KEEP_MEMBERSHIP_AFTER), if !held => {
                hold_partitions(consumer, true);
                held = true;
                tracing::debug!("batch still running; partitions paused, polling to keep the group membership");
            }
            m = consumer.recv(), if held => match m {
                Ok(m) => pending.push(m.detach()),
                Err(e) => consumer_error(e.into())?,
            },
        }
    };
    if held {
        hold_partitions(consumer, false);
    }
    let mut fatal = None;
    for (topic, last, result) in results {
        match result {
            Ok(ShareResult::Done) => {
                for (partition, last) in last {
                    // One list per partition, so a revoked partition fails alone.
                    let mut next = TopicPartitionList::new();
                    next.add_partition_offset(&topic, partition, Offset::Offset(last + 1))?;
                    if let Err(e) = consumer.store_offsets(&next) {
                        // Revoked meanwhile: its new owner replays from the committed offset,
                        // and the version guard absorbs the repeat.
                        tracing::debug!(error = %e, %topic, partition, "offset not stored (revoked?)");
                    }
                }
            }
            Ok(ShareResult::Abandoned) => {}
            Err(e) => fatal = Some(e),
        }
    }
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
