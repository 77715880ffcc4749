//! OpenTelemetry traces against a real Jaeger: a writer's `traceparent` on an outbox row must
//! bring the relay's `send` span and apply's `process` span into the writer's trace, with
//! the messaging and dualsync attributes (docs/operations.md#traces).
//!
//! The Jaeger program (v1.75, the OpenTelemetry-Collector-based `cmd/jaeger`) comes from
//! `scripts/test.sh` (`go install` into `~/.dualsync/tools`), named by `DUALSYNC_TEST_JAEGER`.
//! Each test starts a private one: in-memory storage, OTLP/HTTP in and the query API out on
//! free ports of 127.0.0.1, nothing else listening.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::common::{eventually, free_port, shop_pipeline, test_tool, unique};

/// A private Jaeger, killed when dropped.
struct Jaeger {
    _child: Child,
    _dir: std::path::PathBuf,
    /// `http://127.0.0.1:port`: where OTLP/HTTP spans go.
    otlp: String,
    /// `http://127.0.0.1:port`: the query API (`/api/traces/<id>`).
    query: String,
    http: reqwest::Client,
}

impl Jaeger {
    async fn start() -> Self {
        let program = test_tool("DUALSYNC_TEST_JAEGER", "Jaeger");
        let (otlp, query, grpc) = (free_port(), free_port(), free_port());
        let dir = std::env::temp_dir().join(unique("jaeger"));
        std::fs::create_dir_all(&dir).unwrap();
        // Only the OTLP/HTTP receiver, memory storage and the query extension; the collector's
        // own metrics are off so no fixed port (8888) is taken.
        let config = format!(
            r#"
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memory_store:
        memory:
          max_traces: 10000
  jaeger_query:
    storage:
      traces: memory_store
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{grpc}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memory_store
"#
        );
        let config_file = dir.join("jaeger.yaml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.join("jaeger.log")).unwrap();
        let child = Command::new(&program)
            .arg("--config")
            .arg(&config_file)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let jaeger = Self {
            _child: child,
            otlp: format!("http://127.0.0.1:{otlp}"),
            query: format!("http://127.0.0.1:{query}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
            _dir: dir.clone(),
        };
        let services = format!("{}/api/services", jaeger.query);
        let http = jaeger.http.clone();
        let log_file = dir.join("jaeger.log");
        let up = dualsync::demo::wait_until(Duration::from_secs(60), || {
            let (http, services) = (http.clone(), services.clone());
            async move {
                http.get(&services)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        assert!(
            up,
            "Jaeger's query API did not answer: {}",
            std::fs::read_to_string(log_file).unwrap_or_default()
        );
        jaeger
    }

    /// The trace's spans with their service names (empty while Jaeger has none of it).
    async fn trace(&self, trace_id: &str) -> Vec<Span> {
        let url = format!("{}/api/traces/{trace_id}", self.query);
        let Ok(response) = self.http.get(&url).send().await else {
            return Vec::new();
        };
        let Ok(body) = response.json::<Value>().await else {
            return Vec::new();
        };
        let mut spans = Vec::new();
        for trace in body["data"].as_array().into_iter().flatten() {
            for s in trace["spans"].as_array().into_iter().flatten() {
                let process = s["processID"].as_str().unwrap_or_default();
                spans.push(Span {
                    service: trace["processes"][process]["serviceName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    operation: s["operationName"].as_str().unwrap_or_default().to_string(),
                    tags: s["tags"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| {
                            let value = match &t["value"] {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            };
                            (t["key"].as_str().unwrap_or_default().to_string(), value)
                        })
                        .collect(),
                    references: s["references"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            (
                                r["refType"].as_str().unwrap_or_default().to_string(),
                                r["traceID"].as_str().unwrap_or_default().to_string(),
                                r["spanID"].as_str().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                });
            }
        }
        spans
    }
}

#[derive(Debug, Clone)]
struct Span {
    service: String,
    operation: String,
    tags: BTreeMap<String, String>,
    /// (CHILD_OF or FOLLOWS_FROM, trace id, span id): the parent, and the links.
    references: Vec<(String, String, String)>,
}

impl Span {
    fn tag(&self, key: &str) -> &str {
        self.tags
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("span {} has no tag {key}: {:?}", self.operation, self.tags))
    }
}

/// A made-up writer's span context: (trace id, span id) in lower-case hex.
fn writer_context() -> (String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    (trace, span)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writers_trace_shows_the_relays_and_applys_batch_spans_in_jaeger() {
    let jaeger = Jaeger::start().await;
    let shop = shop_pipeline(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nexport_timeout_ms = 5000\n",
        jaeger.otlp
    ))
    .await;
    let (trace_id, writer_span) = writer_context();
    let customer = unique("c");
    let seq: i64 = shop
        .source
        .query_one(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload, traceparent)
             VALUES ('customers', $1, 'CustomerUpserted',
                     jsonb_build_object('id', $1::text, 'name', 'n', 'email', 'e', 'order_count', 0),
                     $2)
             RETURNING seq",
            &[&customer, &format!("00-{trace_id}-{writer_span}-01")],
        )
        .await
        .unwrap()
        .get(0);

    let services = |spans: &[Span]| -> Vec<String> {
        let mut s: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
        s.sort();
        s.dedup();
        s
    };
    eventually(
        "the relay's and apply's spans in the writer's trace",
        || async {
            services(&jaeger.trace(&trace_id).await) == ["dualsync-apply", "dualsync-relay"]
        },
    )
    .await;
    let spans = jaeger.trace(&trace_id).await;
    let config = shop.config.clone();
    shop.stop().await;

    let topic = config.kafka.topic_for("customers");
    let pipeline = config.pipeline.name.clone();
    let relay = spans
        .iter()
        .find(|s| s.service == "dualsync-relay")
        .unwrap();
    let apply = spans
        .iter()
        .find(|s| s.service == "dualsync-apply")
        .unwrap();
    for (span, operation, kind) in [(relay, "send", "producer"), (apply, "process", "consumer")] {
        assert_eq!(span.operation, format!("{operation} {topic}"));
        assert_eq!(span.tag("span.kind"), kind);
        assert_eq!(span.tag("messaging.system"), "kafka");
        assert_eq!(span.tag("messaging.operation.type"), operation);
        assert_eq!(span.tag("messaging.destination.name"), topic);
        assert_eq!(span.tag("messaging.batch.message_count"), "1");
        assert_eq!(span.tag("dualsync.pipeline"), pipeline);
        assert_eq!(span.tag("dualsync.aggregate_type"), "customers");
        assert_eq!(span.tag("dualsync.version"), seq.to_string());
        // A batch of one is the writer's child (it is in the writer's trace) and links to
        // the writer's span: Jaeger shows the two as one FOLLOWS_FROM reference (a link to
        // the parent overrides the parent's CHILD_OF).
        assert_eq!(
            span.references,
            [("FOLLOWS_FROM".into(), trace_id.clone(), writer_span.clone())],
            "{}",
            span.operation
        );
    }
    // Only apply knows where the event sits in Kafka.
    let partition: i32 = apply
        .tag("messaging.destination.partition.id")
        .parse()
        .unwrap();
    assert!((0..config.kafka.partitions).contains(&partition));
    let offset: i64 = apply.tag("messaging.kafka.offset").parse().unwrap();
    assert!(offset >= 0);
    assert_eq!(
        apply.tag("messaging.consumer.group.name"),
        config.group_id("postgres")
    );
    assert_eq!(apply.tag("dualsync.sink"), "postgres");
}

/// Two writers' rows committed together go out in one batch (as a rule): its span is in the
/// first writer's trace and links to both, so each writer's span is referenced by a relay
/// and an apply span found from the writers' traces, whichever way the batches fell.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_span_links_to_every_writer_in_it() {
    let jaeger = Jaeger::start().await;
    let mut shop = shop_pipeline(&format!(
        "[telemetry]\notlp_endpoint = \"{}/v1/traces\"\n",
        jaeger.otlp
    ))
    .await;
    let writers = [writer_context(), writer_context()];
    let customer = unique("c");
    let tx = shop.source.transaction().await.unwrap();
    for (trace, span) in &writers {
        tx.execute(
            "INSERT INTO dualsync.outbox (aggregatetype, aggregateid, type, payload, traceparent)
             VALUES ('customers', $1, 'CustomerUpserted',
                     jsonb_build_object('id', $1::text, 'name', 'n', 'email', 'e', 'order_count', 0),
                     $2)",
            &[&customer, &format!("00-{trace}-{span}-01")],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    // Every (service, writer) pair: a span of that service, in either writer's trace, whose
    // references point at that writer's span.
    let covered = |spans: &[Span]| -> bool {
        ["dualsync-relay", "dualsync-apply"].iter().all(|service| {
            writers.iter().all(|(trace, span)| {
                spans.iter().any(|s| {
                    s.service == *service
                        && s.references
                            .iter()
                            .any(|(kind, t, sp)| kind == "FOLLOWS_FROM" && t == trace && sp == span)
                })
            })
        })
    };
    let all_spans = || async {
        let mut spans = jaeger.trace(&writers[0].0).await;
        spans.extend(jaeger.trace(&writers[1].0).await);
        spans
    };
    eventually("relay and apply spans linked to both writers", || async {
        covered(&all_spans().await)
    })
    .await;
    let spans = all_spans().await;
    shop.stop().await;
    // Where one span covers both writers, it says it carried both.
    for s in spans.iter().filter(|s| s.references.len() == 2) {
        assert_eq!(s.tag("messaging.batch.message_count"), "2", "{s:?}");
    }
    // The relay reads both rows of one commit in one batch: one span, in the first writer's
    // trace, linking to the second writer's trace too.
    let relay: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "dualsync-relay")
        .collect();
    assert!(
        relay.iter().any(|s| s.references.len() == 2),
        "no relay span links both writers: {relay:?}"
    );
}
