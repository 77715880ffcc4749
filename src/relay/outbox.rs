//! The outbox relay's leader loop, a pipeline of up to `source.max_batches_in_flight` batches,
//! written once for every capture of the outbox ([`OutboxCapture`]: polling today, the WAL
//! beside it). One batch reads top to bottom here: read (`Source::next_batch`) → counted →
//! each row's message ([`crate::mapping`], which calls the codec once; the dead-letter policy
//! here) → handed to the producer ([`crate::publish`]) → acknowledged → marked
//! (`Source::ack`) → counted and traced.
//!
//! While batch N waits for Kafka's acknowledgements, the leader reads and encodes batch N+1
//! and hands it to the producer. Batches are marked published strictly in the order they were
//! read, each only after every message of it was acknowledged. Why order and completeness
//! survive the overlap:
//! - The producer is idempotent, so messages keep their send order per partition across
//!   batches, and batches are sent in read order.
//! - A read never returns a pending row (read, not yet marked), and an aggregate's rows in a
//!   later batch are newer than its rows in earlier ones ([`crate::source::Source`]'s
//!   contract, argued in [`crate::source::outbox`]).
//! - A crash, a lost connection or a failed delivery drops every pending row unmarked: the
//!   next leader reads them again from the oldest, in `seq` order (at-least-once; apply's
//!   version guard absorbs the duplicates).
//!
//! Where the overlap shows: a row too large for Kafka fails its batch after later batches may
//! already be on their way. That batch is then published again row by row (the oversize row
//! dead-lettered), so a consumer may see an aggregate's newer event from a later batch before
//! the duplicate of its older one. The version headers tell them apart.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::SpanKind;
use rdkafka::message::Header;

use super::versions::SequenceGuard;
use super::Relay;
use crate::config::{Config, OnInvalid, OutboxSourceConfig};
use crate::dlq::{self, FailedStage};
use crate::error::Error;
use crate::mapping::{dead_letter, to_message};
use crate::metrics::{stage, Metrics};
use crate::publish::{Acks, Outgoing};
use crate::source::leader_lease::LeaderLease;
use crate::source::{OutboxCapture, OutboxRow};
use crate::traces::{parse_traceparent, BatchSpan, EventTrace, Traces};

/// How often the leader samples the outbox backlog for the metrics (more often when its
/// lease needs a heartbeat sooner: the sample is that heartbeat).
const BACKLOG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// On shutdown, how long the leader waits for the acknowledgements of batches in flight
/// before it exits leaving them unmarked (they are published again by the next leader).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// Publishes as the leader until cancelled or a failure. First reads back what the pipeline
/// published and waits while the outbox would re-use those versions ([`SequenceGuard`]);
/// checks the durability of the pipeline's existing topics (a warning per weak one).
pub(super) async fn lead<S: OutboxCapture>(
    relay: &Relay<'_>,
    source_config: &OutboxSourceConfig,
    source: S,
) -> Result<(), Error> {
    let guard = SequenceGuard::load(relay.config).await?;
    for topic in guard.topics() {
        relay.publisher.ensure_topic(topic).await?;
    }
    if !guard
        .hold_until_sound(source.client(), &relay.metrics.health, relay.cancel)
        .await?
    {
        return Ok(());
    }
    let leader = Leader {
        relay,
        source_config,
        guard,
        lease: source.lease(),
    };
    let mut source = source;
    let result = leader.lead(&mut source).await;
    // No longer leading before the session (and with it the lock) is let go.
    relay.metrics.relay_leader.set(0);
    drop(source);
    result
}

/// Everything the leader loop needs besides the source.
struct Leader<'a> {
    relay: &'a Relay<'a>,
    source_config: &'a OutboxSourceConfig,
    guard: SequenceGuard,
    /// Nothing is handed to the producer once it has run out.
    lease: Arc<LeaderLease>,
}

/// A batch handed to the producer and not yet marked published.
struct InFlight {
    rows: Vec<OutboxRow>,
    acks: Acks,
    per_topic: HashMap<String, u64>,
    dead: Vec<DeadRow>,
    /// The producer refused one of its messages as too large before sending the rest: once
    /// the earlier ones are acknowledged, the batch is published again row by row.
    refused_too_large: bool,
    read_ms: f64,
    /// From the oldest row's creation to the end of the read that returned it.
    waited_ms: f64,
    encode_ms: f64,
    sent_at: Instant,
    /// When it was handed to the producer, for its span; `None` without `[telemetry]`.
    span_start: Option<SystemTime>,
}

fn ms(from: Instant, to: Instant) -> f64 {
    (to - from).as_secs_f64() * 1000.0
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Milliseconds from a row's `created_at` (PostgreSQL's clock: this host's or a synchronised
/// one) to `now`; 0 when the clocks disagree.
fn age_ms(created_at_micros: i64, now_micros: i64) -> f64 {
    (now_micros - created_at_micros).max(0) as f64 / 1000.0
}

/// The acknowledgements of the oldest batch in flight; never resolves when there is none.
async fn oldest_acked(in_flight: &mut VecDeque<InFlight>) -> Result<(), Error> {
    match in_flight.front_mut() {
        Some(batch) => batch.acks.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Leader<'_> {
    async fn lead<S: OutboxCapture>(&self, source: &mut S) -> Result<(), Error> {
        let (metrics, cancel) = (self.relay.metrics, self.relay.cancel);
        let depth = self.source_config.max_batches_in_flight;
        let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(depth);
        // The purge runs beside the leader for as long as it leads.
        let _upkeep = source.start_upkeep(cancel);
        let mut last_sample: Option<Instant> = None;
        let mut was_paused = false;
        // The sample keeps the session from idling out on the server (`leader_lease`).
        let sample_interval = BACKLOG_SAMPLE_INTERVAL.min(self.lease.heartbeat());
        loop {
            if last_sample.is_none_or(|t| t.elapsed() >= sample_interval) {
                last_sample = Some(Instant::now());
                let (rows, oldest) = source.backlog().await?;
                metrics.outbox_backlog.set(rows);
                metrics.outbox_oldest_age.set(oldest);
                // An outbox re-created under the running relay: stop before re-using versions
                // (the next take-over waits until it is resequenced).
                if let Some(why) = self.guard.check(source.client()).await? {
                    self.drain_on_shutdown(source, in_flight).await?;
                    return Err(Error::SequenceBehind(why));
                }
            }
            let paused = self.relay.control.is_paused();
            if paused && in_flight.is_empty() {
                if !was_paused {
                    tracing::info!("paused: the outbox is not read until resumed");
                    source.pause().await?;
                }
                was_paused = true;
                // Waking to sample: a paused relay's backlog is what operators watch grow.
                let next_sample = last_sample.map_or(Instant::now(), |t| t + sample_interval);
                tokio::select! {
                    _ = self.relay.control.wait_resumed(cancel) => {}
                    _ = tokio::time::sleep_until(next_sample.into()) => {}
                }
                if cancel.is_cancelled() {
                    return self.drain_on_shutdown(source, in_flight).await;
                }
                continue;
            }
            if was_paused && !paused {
                tracing::info!("resumed");
                was_paused = false;
            }
            // A batch waiting to be republished row by row goes before anything newer.
            let can_read = !paused
                && in_flight.len() < depth
                && !in_flight.back().is_some_and(|b| b.refused_too_large);
            let read_started = Instant::now();
            let next_sample = last_sample.map_or(read_started, |t| t + sample_interval);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return self.drain_on_shutdown(source, in_flight).await,
                acked = oldest_acked(&mut in_flight) => {
                    let batch = in_flight.pop_front().expect("a batch was in flight");
                    if !self.settle(source, batch, acked).await? {
                        return Ok(()); // cancelled during a row-by-row republish
                    }
                }
                // Before the read: an idle read would otherwise publish the next rows to arrive
                // (the read is cancel-safe).
                _ = self.relay.control.wait_paused(), if !paused => {}
                rows = source.next_batch(cancel), if can_read => {
                    let rows = rows?;
                    if !rows.is_empty() {
                        in_flight.push_back(self.send(rows, ms(read_started, Instant::now())).await?);
                    }
                }
                // An idle read never returns: without this the backlog gauges would keep the
                // sample taken before the last burst was published (cancelling the read is safe).
                _ = tokio::time::sleep_until(next_sample.into()) => {}
            }
        }
    }

    /// Fails once the lease ran out: past it the server may free the lock for a standby, so
    /// nothing more goes to the producer (what it holds already is at-least-once duplicates
    /// of rows the next leader publishes again).
    fn ensure_leading(&self) -> Result<(), Error> {
        match self.lease.is_valid_at(Instant::now()) {
            true => Ok(()),
            false => Err(Error::LeaderSilent(self.lease.valid_for())),
        }
    }

    /// Encodes a batch and hands it to the producer.
    async fn send(&self, rows: Vec<OutboxRow>, read_ms: f64) -> Result<InFlight, Error> {
        self.ensure_leading()?;
        count_read(self.relay.metrics, rows.len());
        let waited_ms = rows
            .first()
            .map_or(0.0, |r| age_ms(r.created_at_micros, now_micros()));
        let encode_started = Instant::now();
        let mut messages = Vec::with_capacity(rows.len());
        let mut dead = Vec::new();
        let mut per_topic: HashMap<String, u64> = HashMap::new();
        for row in &rows {
            let (message, invalid) = self.message_for(row, true)?;
            dead.extend(invalid);
            // Counted by name only when the topic changes: batches are mostly one topic.
            match per_topic.get_mut(&message.topic) {
                Some(n) => *n += 1,
                None => {
                    per_topic.insert(message.topic.clone(), 1);
                }
            }
            messages.push(message);
        }
        let sent_at = Instant::now();
        let (acks, refused_too_large) = match self.relay.publisher.enqueue(messages).await {
            Ok(acks) => (acks, false),
            Err((e, acks)) if e.is_too_large() => {
                tracing::warn!(error = %e, "a message of the batch is too large; publishing the batch row by row");
                (acks, true)
            }
            Err((e, _)) => return Err(e),
        };
        Ok(InFlight {
            rows,
            acks,
            per_topic,
            dead,
            refused_too_large,
            read_ms,
            waited_ms,
            encode_ms: ms(encode_started, sent_at),
            sent_at,
            span_start: self.relay.traces.map(|_| SystemTime::now()),
        })
    }

    /// The oldest batch's acknowledgements arrived: mark its rows published (after publishing
    /// them row by row when a message was too large). Returns `false` when cancelled.
    async fn settle<S: OutboxCapture>(
        &self,
        source: &mut S,
        mut batch: InFlight,
        acked: Result<(), Error>,
    ) -> Result<bool, Error> {
        let acked_at = Instant::now();
        if acked.is_ok() {
            let now = now_micros();
            for row in &batch.rows {
                let delay_ms = age_ms(row.created_at_micros, now);
                self.relay.metrics.publish_delay.observe(delay_ms / 1000.0);
            }
        }
        match acked {
            Ok(()) if !batch.refused_too_large => {}
            Ok(()) => self.republish_row_by_row(&mut batch).await?,
            // The broker refused a message as too large (its limit is below the client's).
            Err(e) if e.is_too_large() => {
                tracing::warn!(error = %e, "the broker refused a message of the batch as too large; publishing the batch row by row");
                self.republish_row_by_row(&mut batch).await?;
            }
            Err(e) => return Err(e),
        }
        if self.relay.cancel.is_cancelled() && batch.refused_too_large {
            return Ok(false);
        }
        self.mark_published(source, &mut batch).await?;
        if let (Some(traces), Some(started)) = (self.relay.traces, batch.span_start) {
            record_span(traces, self.relay.config, &batch.rows, started);
        }
        // Where a batch's time goes (`read_ms` includes waiting for rows when idle;
        // `publish_ms` runs from the hand-over to the producer to the last acknowledgement).
        tracing::debug!(
            rows = batch.rows.len(),
            last_seq = batch.rows.last().map(|r| r.seq),
            read_ms = batch.read_ms,
            waited_ms = batch.waited_ms,
            encode_ms = batch.encode_ms,
            publish_ms = ms(batch.sent_at, acked_at),
            mark_ms = ms(acked_at, Instant::now()),
            "batch published"
        );
        Ok(true)
    }

    /// Marks an acknowledged batch's rows and counts its events (not its dead letters, which
    /// are counted by class) as published.
    async fn mark_published<S: OutboxCapture>(
        &self,
        source: &mut S,
        batch: &mut InFlight,
    ) -> Result<(), Error> {
        source.ack(&batch.rows).await?;
        self.guard.published(batch.rows.iter().map(|r| r.seq));
        let mut per_topic = std::mem::take(&mut batch.per_topic);
        per_topic.remove(&self.relay.config.relay.dead_letter_topic);
        count_acked(
            self.relay.metrics,
            per_topic,
            std::mem::take(&mut batch.dead),
        );
        Ok(())
    }

    /// Replaces the batch's counts with those of a row-by-row publication. Leaves
    /// `refused_too_large` set when cancelled meanwhile (the batch is then left unmarked).
    async fn republish_row_by_row(&self, batch: &mut InFlight) -> Result<(), Error> {
        batch.refused_too_large = true;
        if let Some((per_topic, dead)) = self.publish_row_by_row(&batch.rows).await? {
            batch.per_topic = per_topic;
            batch.dead = dead;
            batch.refused_too_large = false;
        }
        Ok(())
    }

    /// SIGTERM: read nothing more, mark what Kafka acknowledges within [`SHUTDOWN_DRAIN`],
    /// leave the rest unmarked for the next leader.
    async fn drain_on_shutdown<S: OutboxCapture>(
        &self,
        source: &mut S,
        mut in_flight: VecDeque<InFlight>,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        while let Some(mut batch) = in_flight.pop_front() {
            if batch.refused_too_large {
                break;
            }
            match tokio::time::timeout_at(deadline, batch.acks.as_mut()).await {
                Ok(Ok(())) => self.mark_published(source, &mut batch).await?,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "a batch failed while shutting down; it stays unmarked");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        batches = in_flight.len() + 1,
                        "shutting down before Kafka acknowledged every batch; they stay unmarked and are published again"
                    );
                    break;
                }
            }
        }
        Ok(())
    }

    /// The message for a row: its event, or (when it cannot be encoded and the policy is
    /// `dead-letter`) its dead letter plus `(event topic, class)` for the metrics.
    fn message_for(
        &self,
        row: &OutboxRow,
        log_invalid: bool,
    ) -> Result<(Outgoing, Option<DeadRow>), Error> {
        let config = self.relay.config;
        match to_message(config, self.relay.codec, row) {
            Ok(m) => Ok((m, None)),
            Err(e) if config.relay.on_invalid == OnInvalid::Halt => Err(halted(row, &e)),
            Err(e) => {
                if log_invalid {
                    tracing::warn!(seq = row.seq, id = %row.id, class = e.class(), error = %e,
                        topic = %config.relay.dead_letter_topic, "outbox row dead-lettered");
                }
                let dead = (config.kafka.topic_for(&row.aggregate_type), e.class());
                Ok((
                    dead_letter(config, row, &e, FailedStage::RelayEncode),
                    Some(dead),
                ))
            }
        }
    }

    /// Publishes `rows` one at a time; a row whose message is too large goes to the relay's
    /// dead-letter topic without its payload (which stays in the outbox until the
    /// retention), or the relay halts when `on_invalid = "halt"`. Returns the published
    /// count per topic and the dead-lettered rows, or `None` when cancelled. Rows of the
    /// failed batch that had already reached Kafka are published again (at-least-once).
    async fn publish_row_by_row(&self, rows: &[OutboxRow]) -> Result<Option<PublishedRows>, Error> {
        let config = self.relay.config;
        let mut per_topic = HashMap::new();
        let mut dead = Vec::new();
        for row in rows {
            self.ensure_leading()?;
            // Already logged by the first attempt at the batch.
            let (message, invalid) = self.message_for(row, false)?;
            let topic = message.topic.clone();
            let sent = tokio::select! {
                r = self.relay.publisher.publish_all(vec![message]) => r,
                _ = self.relay.cancel.cancelled() => return Ok(None),
            };
            match sent {
                Ok(()) => match invalid {
                    Some(d) => dead.push(d),
                    None => *per_topic.entry(topic).or_default() += 1,
                },
                Err(e) if e.is_too_large() => {
                    if config.relay.on_invalid == OnInvalid::Halt {
                        return Err(halted(row, &e));
                    }
                    let bytes = row.payload.as_ref().map_or(0, String::len);
                    tracing::error!(seq = row.seq, id = %row.id, bytes, error = %e,
                        "outbox row too large for Kafka: dead-lettered without its payload");
                    let without_payload = OutboxRow {
                        payload: None,
                        ..row.clone()
                    };
                    let mut letter =
                        dead_letter(config, &without_payload, &e, FailedStage::RelayPublish);
                    let size = bytes.to_string();
                    letter.headers = letter.headers.insert(Header {
                        key: dlq::headers::VALUE_OMITTED,
                        value: Some(size.as_str()),
                    });
                    tokio::select! {
                        r = self.relay.publisher.publish_all(vec![letter]) => r?,
                        _ = self.relay.cancel.cancelled() => return Ok(None),
                    }
                    dead.push((config.kafka.topic_for(&row.aggregate_type), e.class()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some((per_topic, dead)))
    }
}

/// The error that stops the relay on a bad row when `relay.on_invalid = "halt"`.
fn halted(row: &OutboxRow, error: &Error) -> Error {
    Error::Halted(format!(
        "outbox row seq={} id={} ({} {}): {error}",
        row.seq, row.id, row.aggregate_type, row.aggregate_id
    ))
}

/// Published messages per topic, and the dead-lettered rows.
type PublishedRows = (HashMap<String, u64>, Vec<DeadRow>);

/// A dead-lettered row or change, for the metrics: `(its event topic, error class)`.
pub(super) type DeadRow = (String, &'static str);

/// A batch was read from the source.
pub(super) fn count_read(metrics: &Metrics, n: usize) {
    metrics.outbox_rows_read.inc_by(n as u64);
    metrics
        .batch_size
        .with_label_values(&[stage::RELAY])
        .observe(n as f64);
}

/// A batch is published and its progress recorded: the source is healthy again.
pub(super) fn count_acked(metrics: &Metrics, per_topic: HashMap<String, u64>, dead: Vec<DeadRow>) {
    metrics.health.recovered();
    metrics.health.set_database_up(true);
    for (topic, n) in per_topic {
        metrics.published.with_label_values(&[&topic]).inc_by(n);
    }
    for (topic, class) in dead {
        metrics.count_dead_letter(stage::RELAY, &topic, class);
    }
}

/// An outbox batch's `send` span: linked to (and, for the first, the child of) each row's
/// `traceparent` (see [`crate::traces`]). Kafka's partitions and offsets are not known here
/// (the acknowledgements carry none), so its events have neither.
fn record_span(traces: &Traces, config: &Config, rows: &[OutboxRow], started: SystemTime) {
    let events: Vec<EventTrace> = rows
        .iter()
        .map(|row| EventTrace {
            traceparent: row.traceparent.as_deref().and_then(parse_traceparent),
            topic: config.kafka.topic_for(&row.aggregate_type),
            aggregate_type: row.aggregate_type.clone(),
            version: Some(row.seq),
            partition: None,
            offset: None,
        })
        .collect();
    traces.record(BatchSpan {
        operation: "send",
        kind: SpanKind::Producer,
        started,
        events: &events,
        extra: Vec::new(),
        error: None,
    });
}
