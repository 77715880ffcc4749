//! OpenTelemetry traces of the pipeline's batches (`[telemetry]`, off by default).
//!
//! Each stage records ONE span per batch it hands on: the relay's `send` (from the hand-over
//! to the producer to the last acknowledgement and the outbox mark) and apply's `process`
//! (one sink write: one topic of a consumed batch). A span links to the `traceparent` of every
//! event in it, as the OpenTelemetry messaging conventions ask of batch spans, and is the child
//! of the first event's `traceparent`, so that Jaeger (which groups spans by trace id) shows it
//! inside a writer's trace: a batch of one event is that writer's child, as the conventions
//! allow for a single message. Why, and what Jaeger shows: docs/operations.md#traces.
//!
//! Without `[telemetry]` nothing here exists at run time: the stages hold `None`, build no
//! exporter and look at no event.
//!
//! Spans are exported by the SDK's batch processor on its own thread over OTLP HTTP/protobuf.
//! A collector that is down or slow loses spans (the queue is bounded), never events.

use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::{traces_url, Config, ConfigError};
use crate::error::Error;

/// Attribute names: the messaging conventions' and dualsync's own.
pub mod attr {
    pub const MESSAGING_SYSTEM: &str = "messaging.system";
    pub const OPERATION_TYPE: &str = "messaging.operation.type";
    pub const OPERATION_NAME: &str = "messaging.operation.name";
    pub const DESTINATION: &str = "messaging.destination.name";
    pub const PARTITION: &str = "messaging.destination.partition.id";
    pub const OFFSET: &str = "messaging.kafka.offset";
    pub const BATCH_SIZE: &str = "messaging.batch.message_count";
    pub const CONSUMER_GROUP: &str = "messaging.consumer.group.name";
    pub const PIPELINE: &str = "dualsync.pipeline";
    pub const AGGREGATE_TYPE: &str = "dualsync.aggregate_type";
    pub const VERSION: &str = "dualsync.version";
    pub const SINK: &str = "dualsync.sink";
}

/// A W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`) as a remote span context;
/// `None` when it is malformed (an event's bad header never fails its batch).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may append more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2)) {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & 1),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

/// One event of a batch, as its span sees it.
#[derive(Debug, Clone, Default)]
pub struct EventTrace {
    pub traceparent: Option<SpanContext>,
    pub topic: String,
    pub aggregate_type: String,
    pub version: Option<i64>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
}

/// What a stage did with one batch.
pub struct BatchSpan<'a> {
    /// `send` (relay) or `process` (apply): the conventions' operation type.
    pub operation: &'static str,
    pub kind: SpanKind,
    pub started: SystemTime,
    pub events: &'a [EventTrace],
    /// Stage-specific attributes (consumer group, sink name).
    pub extra: Vec<KeyValue>,
    /// The error that failed the batch, if it did.
    pub error: Option<String>,
}

/// A stage's tracer (clones share one exporter); [`shutdown`] at the end of the stage.
#[derive(Clone)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    pipeline: String,
}

impl Traces {
    /// The stage's tracer (`stage`: `relay` or `apply`), or `None` without `[telemetry]`.
    pub fn start(config: &Config, stage: &str) -> Result<Option<Self>, Error> {
        let Some(t) = &config.telemetry else {
            return Ok(None);
        };
        let config_error = |problem: String| {
            Error::Config(ConfigError {
                file: config.path.display().to_string(),
                key: "telemetry.otlp_endpoint".into(),
                problem,
            })
        };
        let url = traces_url(&t.otlp_endpoint).map_err(|e| config_error(e.to_string()))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(Duration::from_millis(t.export_timeout_ms))
            .build()
            .map_err(|e| config_error(e.to_string()))?;
        let service = format!("{}-{stage}", t.service_name);
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(service.clone())
                    .with_attributes([KeyValue::new(attr::PIPELINE, config.pipeline.name.clone())])
                    .build(),
            )
            .build();
        let tracer = provider.tracer("dualsync");
        tracing::info!(service, endpoint = %t.otlp_endpoint, "exporting batch spans over OTLP");
        Ok(Some(Self {
            provider,
            tracer,
            pipeline: config.pipeline.name.clone(),
        }))
    }

    /// Records a finished batch's span (ending now).
    pub fn record(&self, batch: BatchSpan<'_>) {
        let events = batch.events;
        let links: Vec<opentelemetry::trace::Link> = events
            .iter()
            .filter_map(|e| {
                let context = e.traceparent.clone()?;
                Some(opentelemetry::trace::Link::new(
                    context,
                    event_attributes(e),
                    0,
                ))
            })
            .collect();
        let parent = links.first().map_or_else(Context::new, |l| {
            Context::new().with_remote_span_context(l.span_context.clone())
        });
        let mut attributes = vec![
            KeyValue::new(attr::MESSAGING_SYSTEM, "kafka"),
            KeyValue::new(attr::OPERATION_TYPE, batch.operation),
            KeyValue::new(attr::BATCH_SIZE, events.len() as i64),
            KeyValue::new(attr::PIPELINE, self.pipeline.clone()),
        ];
        attributes.extend(shared_attributes(events));
        attributes.extend(batch.extra);
        let destination = common(events, |e| Some(e.topic.as_str()));
        let name = match destination {
            Some(topic) => format!("{} {topic}", batch.operation),
            None => batch.operation.to_string(),
        };
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(batch.kind)
            .with_start_time(batch.started)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(&self.tracer, &parent);
        if let Some(error) = batch.error {
            span.set_status(Status::error(error));
        }
        span.end();
    }

    /// Exports what is queued and stops the exporter's thread (blocking: call it from
    /// `spawn_blocking` or at the very end).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace exporter shutdown incomplete; the last spans may be lost");
        }
    }
}

/// Shuts the tracer down off the async threads (its exporter blocks while it flushes).
pub async fn shutdown(traces: Option<Traces>) {
    if let Some(traces) = traces {
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
}

/// The attributes of one event: on its link, and on the span when the whole batch shares them.
fn event_attributes(e: &EventTrace) -> Vec<KeyValue> {
    let mut kv = vec![
        KeyValue::new(attr::DESTINATION, e.topic.clone()),
        KeyValue::new(attr::AGGREGATE_TYPE, e.aggregate_type.clone()),
    ];
    if let Some(v) = e.version {
        kv.push(KeyValue::new(attr::VERSION, v));
    }
    if let Some(p) = e.partition {
        kv.push(KeyValue::new(attr::PARTITION, p.to_string()));
    }
    if let Some(o) = e.offset {
        kv.push(KeyValue::new(attr::OFFSET, o));
    }
    kv
}

/// The per-event attributes every event of the batch has in common (all of them for a batch
/// of one: its version and offset too).
fn shared_attributes(events: &[EventTrace]) -> Vec<KeyValue> {
    let mut kv = Vec::new();
    if let Some(t) = common(events, |e| Some(e.topic.as_str())) {
        kv.push(KeyValue::new(attr::DESTINATION, t.to_string()));
    }
    if let Some(t) = common(events, |e| Some(e.aggregate_type.as_str())) {
        kv.push(KeyValue::new(attr::AGGREGATE_TYPE, t.to_string()));
    }
    if let Some(p) = common(events, |e| e.partition) {
        kv.push(KeyValue::new(attr::PARTITION, p.to_string()));
    }
    if let [only] = events {
        if let Some(v) = only.version {
            kv.push(KeyValue::new(attr::VERSION, v));
        }
        if let Some(o) = only.offset {
            kv.push(KeyValue::new(attr::OFFSET, o));
        }
    }
    kv
}

/// The value every event has, if they all have the same one.
fn common<'a, T: PartialEq>(
    events: &'a [EventTrace],
    value: impl Fn(&'a EventTrace) -> Option<T>,
) -> Option<T> {
    let mut values = events.iter().map(value);
    let first = values.next()??;
    values.all(|v| v.as_ref() == Some(&first)).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_only_when_well_formed() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = parse_traceparent(good).expect("valid");
        assert_eq!(c.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id().to_string(), "00f067aa0ba902b7");
        assert!(c.is_sampled() && c.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xbf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")
                .is_some()
        );
    }

    #[test]
    fn traces_url_appends_the_signal_path_to_a_base_url_only() {
        assert_eq!(
            traces_url("http://c:4318").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c/otlp/v1/traces").unwrap(),
            "https://c/otlp/v1/traces"
        );
        assert!(traces_url("not a url").is_err());
    }

    #[test]
    fn span_attributes_are_those_all_events_share() {
        let e = |topic: &str, partition, version| EventTrace {
            traceparent: None,
            topic: topic.into(),
            aggregate_type: "orders".into(),
            version: Some(version),
            partition: Some(partition),
            offset: Some(version * 10),
        };
        let keys = |kv: Vec<KeyValue>| -> Vec<String> {
            kv.into_iter()
                .map(|k| format!("{}={}", k.key, k.value))
                .collect()
        };
        assert_eq!(
            keys(shared_attributes(&[e("t", 0, 7)])),
            [
                "messaging.destination.name=t",
                "dualsync.aggregate_type=orders",
                "messaging.destination.partition.id=0",
                "dualsync.version=7",
                "messaging.kafka.offset=70"
            ]
        );
        assert_eq!(
            keys(shared_attributes(&[e("t", 0, 7), e("t", 1, 8)])),
            [
                "messaging.destination.name=t",
                "dualsync.aggregate_type=orders"
            ]
        );
        assert!(keys(shared_attributes(&[])).is_empty());
    }
}
