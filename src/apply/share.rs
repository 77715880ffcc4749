//! One topic's share of a batch, from all its partitions: decode, dead-letter what cannot be
//! decoded, write the rest to the sink in one write with retries, dead-letter what the sink
//! refuses for good. One write for the whole share, not one per partition: at 1,000 events/s
//! a batch holds a few events of each partition, and every write is a round trip and a
//! commit in the sink.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use rdkafka::message::{Message, OwnedMessage};

use super::ApplyContext;
use crate::codec::DecodeError;
use crate::config::OnInvalid;
use crate::dlq::{self, FailedStage, Failure};
use crate::error::{classify, endpoint, Disposition, Endpoint, Error};
use crate::mapping::check_route;
use crate::metrics::stage;
use crate::publish::{header_str, headers};
use crate::retry::Backoff;
use crate::sink::{Sink, SinkRecord};
use crate::telemetry::{Episodes, Say};
use crate::traces::{attr, parse_traceparent, BatchSpan, EventTrace, Traces};

/// How a topic's share of a batch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ShareResult {
    /// Every message was written, found stale, or dead-lettered: the offsets may move on.
    Done,
    /// Shutdown interrupted a retry: nothing may be committed for this share.
    Abandoned,
}

/// Apply's backoff (`apply.retry_initial_ms` up to `apply.retry_max_ms`), never giving up on a
/// transient fault: never skip.
fn retry_policy<S: Sink>(ctx: &ApplyContext<S>) -> Backoff {
    Backoff::new(
        Duration::from_millis(ctx.config.apply.retry_initial_ms),
        Duration::from_millis(ctx.config.apply.retry_max_ms),
    )
}

/// Decodes one message into the record to write and the time its change was committed on the
/// primary (micros): the relay's `committed_at` header, or the envelope's `created_at` for a
/// message without it (written by an older relay, or by another producer).
async fn decode<S: Sink>(
    ctx: &ApplyContext<S>,
    m: &OwnedMessage,
    received: Instant,
) -> Result<(SinkRecord, i64), Error> {
    let key = m.key().ok_or(DecodeError::NullKey)?;
    let value = m.payload().ok_or(DecodeError::Empty)?;
    let event = ctx.codec.decode_received(value, received).await?;
    if key != event.aggregate_id.as_bytes() {
        return Err(DecodeError::KeyMismatch {
            key: String::from_utf8_lossy(key).into_owned(),
            aggregate_id: event.aggregate_id,
        }
        .into());
    }
    check_route(&ctx.config, &ctx.codec, &event.aggregate_type, m.topic())?;
    let committed_at = committed_at(m).unwrap_or(event.created_at_micros);
    Ok((event.into(), committed_at))
}

/// The `committed_at` header, if the message has a valid one.
fn committed_at(m: &OwnedMessage) -> Option<i64> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == crate::publish::headers::COMMITTED_AT)?
        .value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
}

/// Handles `messages`: one topic's share of a batch, each partition's messages in their order.
pub async fn process<S: Sink>(
    ctx: &ApplyContext<S>,
    messages: Vec<OwnedMessage>,
) -> Result<ShareResult, Error> {
    let mut records = Vec::with_capacity(messages.len());
    let mut origins = Vec::with_capacity(messages.len());
    let mut committed = Vec::with_capacity(messages.len());
    // When this share's messages were in hand: an unknown schema fingerprint is poison only
    // if the schemas folder, read after this, still lacks it.
    let received = Instant::now();
    for m in &messages {
        let mut policy = retry_policy(ctx);
        let retrying = RetryEpisode::new(ctx);
        let mut attempts = 1u32;
        loop {
            match decode(ctx, m, received).await {
                Ok((r, committed_at)) => {
                    records.push(r);
                    origins.push(m);
                    committed.push(committed_at);
                    break;
                }
                // The schema registry could not answer: wait for it, never skip the message.
                Err(e) if classify(&e) == Disposition::Retry => {
                    retrying.begin();
                    tracing::warn!(error = %e, attempts, "cannot decode yet; retrying with backoff");
                    if !policy.pause(&ctx.cancel).await {
                        return Ok(ShareResult::Abandoned);
                    }
                    ctx.metrics.health.probing();
                    attempts += 1;
                }
                Err(e) if classify(&e) == Disposition::Fatal => return Err(e),
                Err(e) => {
                    if !dead_letter(ctx, m, &e, FailedStage::Decode, attempts).await? {
                        return Ok(ShareResult::Abandoned);
                    }
                    break;
                }
            }
        }
    }
    if records.is_empty() {
        return Ok(ShareResult::Done);
    }
    if !write(ctx, &records, &origins, &committed).await? {
        return Ok(ShareResult::Abandoned);
    }
    Ok(ShareResult::Done)
}

/// Observes the end-to-end lag of the records a write changed the sink with, from their
/// commit times (micros). Stale records (replays, duplicates) are not lag: they would report
/// the age of an event applied long ago.
fn observe_lag<S: Sink>(ctx: &ApplyContext<S>, committed: &[i64], written: &[usize]) {
    let now = crate::dlq::now_millis() as f64 / 1000.0;
    for &i in written {
        let lag = now - committed[i] as f64 / 1_000_000.0;
        ctx.metrics.end_to_end_lag.observe(lag.max(0.0));
    }
}

/// Writes `records` (with their source messages and commit times), retrying transient faults;
/// falls back to one-by-one writes when the batch as a whole is refused, to find and
/// dead-letter the culprit. Returns `false` when shutdown interrupted it.
async fn write<S: Sink>(
    ctx: &ApplyContext<S>,
    records: &[SinkRecord],
    origins: &[&OwnedMessage],
    committed: &[i64],
) -> Result<bool, Error> {
    let mut policy = retry_policy(ctx);
    let mut attempts = 1u32;
    let topic = origins.first().map(|m| m.topic()).unwrap_or_default();
    let retrying = RetryEpisode::new(ctx);
    let at = Endpoint::Sink(&ctx.sink_name);
    // The watchdog: this write, until it is done, shows in /readyz and /status once it takes
    // longer than http.stuck_write_secs, whether waiting on a call or retrying one.
    let target = format!("{at} ({})", at.config_key());
    let _watch = ctx.metrics.health.write_started(
        target.clone(),
        Duration::from_secs(ctx.config.http.stuck_write_secs),
    );
    let started = Instant::now();
    let slow_after = Duration::from_millis(ctx.config.http.slow_write_ms);
    let deadline = ctx
        .config
        .sinks
        .get(&ctx.sink_name)
        .map_or(Duration::from_secs(35), |s| s.client_deadline());
    loop {
        let applied = match tokio::time::timeout(deadline, ctx.sink.apply(records)).await {
            Ok(applied) => applied,
            // No answer at all (the server's own deadline would have answered): the
            // connection may be half-open, so the sink drops it before the retry.
            Err(_) => {
                ctx.sink.reset().await;
                Err(Error::SinkTimeout {
                    sink: ctx.sink_name.clone(),
                    after_ms: deadline.as_millis() as u64,
                })
            }
        };
        match applied {
            Ok(outcome) => {
                retrying.end();
                ctx.signals.written(&target, started.elapsed(), slow_after);
                let count = |outcome: &str, n: u64| {
                    ctx.metrics
                        .applied
                        .with_label_values(&[topic, outcome])
                        .inc_by(n)
                };
                let older = older_versions_of_refused(records, &outcome.rejected);
                count("written", outcome.applied());
                count("stale", outcome.stale.saturating_sub(older.len() as u64));
                observe_lag(ctx, committed, &outcome.written);
                for (index, error) in &outcome.rejected {
                    if !dead_letter(ctx, origins[*index], error, FailedStage::Sink, attempts)
                        .await?
                    {
                        return Ok(false);
                    }
                }
                if older.is_empty() {
                    return Ok(true);
                }
                // The sink wrote only the newest version of each key, and refused some: the
                // older versions of those keys were counted stale against it. Applied one by
                // one they would have gone in, so they are written now (newest first again).
                let pick = |from: &[i64]| older.iter().map(|&i| from[i]).collect::<Vec<_>>();
                let again: Vec<SinkRecord> = older.iter().map(|&i| records[i].clone()).collect();
                let origins: Vec<&OwnedMessage> = older.iter().map(|&i| origins[i]).collect();
                return Box::pin(write(ctx, &again, &origins, &pick(committed))).await;
            }
            Err(e) => match classify(&e) {
                Disposition::Retry => {
                    retrying.begin();
                    let at = endpoint(&e, Endpoint::Sink(&ctx.sink_name))
                        .unwrap_or(Endpoint::Sink(&ctx.sink_name));
                    let signal = ctx.signals.failing.fault(&target, Instant::now());
                    let at = format!("{at}, {}", at.config_key());
                    tell_failure(signal, &at, &e, attempts);
                    if !policy.pause(&ctx.cancel).await {
                        return Ok(false);
                    }
                    ctx.metrics.health.probing();
                    attempts += 1;
                }
                Disposition::DeadLetter if records.len() == 1 => {
                    return dead_letter(ctx, origins[0], &e, FailedStage::Sink, attempts).await;
                }
                Disposition::DeadLetter => {
                    tracing::warn!(error = %e, "batch refused; writing one by one to isolate the bad record");
                    for ((record, origin), at) in records.iter().zip(origins).zip(committed) {
                        if !Box::pin(write(
                            ctx,
                            std::slice::from_ref(record),
                            std::slice::from_ref(origin),
                            std::slice::from_ref(at),
                        ))
                        .await?
                        {
                            return Ok(false);
                        }
                    }
                    return Ok(true);
                }
                Disposition::Fatal => return Err(e),
            },
        }
    }
}

/// The indexes of the records of `records` older than a refused record of the same key (the
/// sink counted them stale against the refused one), in batch order.
fn older_versions_of_refused(records: &[SinkRecord], rejected: &[(usize, Error)]) -> Vec<usize> {
    if rejected.is_empty() {
        return Vec::new();
    }
    (0..records.len())
        .filter(|&i| {
            let r = &records[i];
            rejected.iter().any(|(j, _)| {
                let refused = &records[*j];
                refused.namespace == r.namespace
                    && refused.key == r.key
                    && refused.version > r.version
            })
        })
        .collect()
}

/// Keeps the retry metrics and readiness in step with one write's retry loop: counted once per
/// retry, "in progress" while backing off, and the episode ends with the write (whatever way).
struct RetryEpisode<'a, S: Sink> {
    ctx: &'a ApplyContext<S>,
    active: AtomicBool,
}

impl<'a, S: Sink> RetryEpisode<'a, S> {
    fn new(ctx: &'a ApplyContext<S>) -> Self {
        Self {
            ctx,
            active: AtomicBool::new(false),
        }
    }
    fn begin(&self) {
        let m = &self.ctx.metrics;
        m.retries.with_label_values(&[stage::APPLY]).inc();
        m.health.retrying();
        if !self.active.swap(true, Ordering::Relaxed) {
            m.retries_in_progress.inc();
        }
    }
    fn end(&self) {
        if self.active.swap(false, Ordering::Relaxed) {
            let m = &self.ctx.metrics;
            m.retries_in_progress.dec();
            m.health.recovered();
        }
    }
}

impl<S: Sink> Drop for RetryEpisode<'_, S> {
    fn drop(&mut self) {
        self.end();
    }
}

/// Sends `message` to the dead-letter topic (retrying until the broker acknowledges), or stops
/// the pipeline when the policy is `halt`. Returns `false` when shutdown interrupted it.
async fn dead_letter<S: Sink>(
    ctx: &ApplyContext<S>,
    message: &OwnedMessage,
    error: &Error,
    stage: FailedStage,
    attempts: u32,
) -> Result<bool, Error> {
    if ctx.config.apply.on_error == OnInvalid::Halt {
        return Err(Error::Halted(format!(
            "{stage} failed for {}[{}]@{}: {error}",
            message.topic(),
            message.partition(),
            message.offset()
        )));
    }
    let topic = format!("{}{}", message.topic(), ctx.config.apply.dead_letter_suffix);
    let failure = Failure {
        error,
        stage,
        pipeline: &ctx.config.pipeline.name,
        group: Some(&ctx.group),
        attempts,
    };
    tracing::warn!(
        error = %error, class = error.class(), stage = stage.as_str(), dlq = %topic,
        partition = message.partition(), offset = message.offset(),
        "dead-lettering message"
    );
    let mut policy = retry_policy(ctx);
    let mut omit_value = false;
    loop {
        let mut letter = dlq::dead_letter_for(message, &topic, &failure);
        if omit_value {
            letter = dlq::without_value(letter);
        }
        match dlq::send(&ctx.dlq, vec![letter]).await {
            Ok(()) => {
                ctx.metrics
                    .count_dead_letter(stage::APPLY, message.topic(), error.class());
                return Ok(true);
            }
            Err(e) if classify(&e) == Disposition::Retry => {
                tracing::warn!(error = %e, "dead-letter produce failed; retrying");
                if !policy.pause(&ctx.cancel).await {
                    return Ok(false);
                }
            }
            Err(e) if e.is_too_large() && !omit_value => {
                tracing::error!(
                    error = %e, bytes = message.payload().map_or(0, <[u8]>::len), offset = message.offset(),
                    "dead letter too large for the broker: sending it without its value (the original stays in its topic)"
                );
                omit_value = true;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs of slow sink writes (`http.slow_write_ms`) and of failing ones, per sink, each told as
/// one line at the start, a summary every 30 s and one line at the end: a slow or flapping
/// sink is never silent and never floods the log.
pub struct WriteSignals {
    /// Ends on a fast write 5 s after the last slow one (latency jitters).
    pub slow: Episodes,
    /// Ends on the first success.
    pub failing: Episodes,
}

impl Default for WriteSignals {
    fn default() -> Self {
        Self {
            slow: Episodes::new(Duration::from_secs(30), Duration::from_secs(5)),
            failing: Episodes::new(Duration::from_secs(30), Duration::ZERO),
        }
    }
}

impl WriteSignals {
    /// A write to `target` succeeded after `took` (its retries included).
    fn written(&self, target: &str, took: Duration, slow_after: Duration) {
        let now = Instant::now();
        if let Some(Say::End { signals, lasted }) = self.failing.ok(target, now) {
            tracing::info!(
                target_sink = target,
                failures = signals,
                "sink writes succeed again ({target}) after {signals} failed attempts over {:.1}s",
                lasted.as_secs_f64()
            );
        }
        if took >= slow_after {
            match self.slow.fault(target, now) {
                Say::Start => tracing::warn!(target_sink = target, took_ms = took.as_millis() as u64,
                    "sink writes slow ({target}): a write took {:.1}s (http.slow_write_ms = {}); further slow writes are summarised",
                    took.as_secs_f64(), slow_after.as_millis()),
                Say::Summary { held_back, lasting } => tracing::warn!(target_sink = target, held_back,
                    "sink writes still slow ({target}) after {}s: {} more slow writes, the last took {:.1}s",
                    lasting.as_secs(), held_back + 1, took.as_secs_f64()),
                _ => {}
            }
        } else if let Some(Say::End { signals, lasted }) = self.slow.ok(target, now) {
            tracing::info!(
                target_sink = target,
                slow_writes = signals,
                "sink writes fast again ({target}): {signals} slow writes over {:.1}s",
                lasted.as_secs_f64()
            );
        }
    }
}

/// Logs a failed attempt of a write as its episode says; `target`: the connection that failed
/// and its config key.
fn tell_failure(signal: Say, target: &str, e: &Error, attempts: u32) {
    match signal {
        Say::Start => tracing::warn!(error = %e, attempts, target_sink = target,
            "sink write failed ({target}); retrying with backoff, further failures summarised"),
        Say::Summary { held_back, lasting } => {
            tracing::warn!(error = %e, attempts, target_sink = target,
            "sink write still failing ({target}) after {}s: {} more failed attempts; retrying with backoff",
            lasting.as_secs(), held_back + 1)
        }
        _ => {}
    }
}

/// The share's events as its span sees them, taken before the write consumes the messages
/// (only with `[telemetry]`).
pub(super) fn span_events(messages: &[OwnedMessage]) -> (std::time::SystemTime, Vec<EventTrace>) {
    let events = messages
        .iter()
        .map(|m| EventTrace {
            traceparent: header_str(m, headers::TRACEPARENT).and_then(parse_traceparent),
            topic: m.topic().to_string(),
            aggregate_type: header_str(m, headers::AGGREGATE_TYPE)
                .unwrap_or_default()
                .to_string(),
            version: header_str(m, headers::VERSION).and_then(|v| v.parse().ok()),
            partition: Some(m.partition()),
            offset: Some(m.offset()),
        })
        .collect();
    (std::time::SystemTime::now(), events)
}

/// The share's `process` span (see [`crate::traces`]); an error that stops apply marks it.
pub(super) fn record_span<S: Sink>(
    ctx: &ApplyContext<S>,
    traces: &Traces,
    started: std::time::SystemTime,
    events: &[EventTrace],
    result: &Result<ShareResult, Error>,
) {
    traces.record(BatchSpan {
        operation: "process",
        kind: SpanKind::Consumer,
        started,
        events,
        extra: vec![
            KeyValue::new(attr::CONSUMER_GROUP, ctx.group.clone()),
            KeyValue::new(attr::SINK, ctx.sink_name.clone()),
        ],
        error: result.as_ref().err().map(|e| e.to_string()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, version: i64) -> SinkRecord {
        SinkRecord {
            namespace: "n".into(),
            key: key.into(),
            version,
            document: None,
        }
    }

    /// Only the older versions of a refused key are written again; a newer version of that
    /// key (never refused) and other keys are not.
    #[test]
    fn older_versions_of_a_refused_record_are_retried() {
        let records = [
            rec("k", 1),
            rec("j", 1),
            rec("k", 3),
            rec("k", 2),
            rec("k", 4),
        ];
        let refused = vec![(2, Error::Rejected("no".into()))];
        assert_eq!(older_versions_of_refused(&records, &refused), vec![0, 3]);
        assert!(older_versions_of_refused(&records, &[]).is_empty());
    }
}
