//! The operations endpoint on real processes' stages: metrics parsed from the Prometheus text,
//! readiness, the `/status` report, and bearer-protected pause/resume that really holds the
//! consumer (lag builds up, nothing is applied) until resumed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use dualsync::http::Control;
use dualsync::metrics::{names, Metrics};

use crate::common::*;

/// One HTTP/1.1 request; returns (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Prometheus text format → (metric name, labels) → value. Comment lines are checked for
/// shape (`# HELP name ...` / `# TYPE name kind`) so a malformed exposition fails the test.
pub fn parse_metrics(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            assert!(matches!(parts.next(), Some("HELP" | "TYPE")), "{line}");
            assert!(
                parts
                    .next()
                    .is_some_and(|n| n.starts_with("dualsync_") || n.starts_with("process_")),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("label k=v");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// Sum of a metric's series whose labels include every `(key, value)` of `filter`.
pub fn sum(
    metrics: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    filter: &[(&str, &str)],
) -> f64 {
    metrics
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && filter
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

pub async fn scrape(addr: SocketAddr) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let (status, body) = http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    parse_metrics(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_status_and_pause_resume_over_http() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let token_env = format!("DUALSYNC_TEST_TOKEN_{}", unique("t").to_uppercase());
    // SAFETY of the test: the variable name is unique to this test, nothing else reads it.
    std::env::set_var(&token_env, "s3cret-token");
    let mut config = pipeline(&servers, &source_url, &sink_url, &unique("t"), "");
    config.http.token_env = token_env.clone();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let cancel = CancellationToken::new();
    let (relay, relay_metrics) = spawn_relay(&config, &cancel);
    let control = Control::default();
    let (apply, apply_metrics) =
        spawn_apply_controlled(&config, "postgres", &cancel, control.clone());
    let serve = |role: &'static str, metrics: Arc<Metrics>, control: Control| {
        let (config, cancel) = (config.clone(), cancel.clone());
        async move {
            dualsync::http::serve(
                &config.http,
                0,
                role,
                &config.pipeline.name,
                metrics,
                control,
                cancel,
            )
            .await
            .unwrap()
        }
    };
    let relay_addr = serve("relay", relay_metrics.clone(), Control::default()).await;
    let apply_addr = serve("apply", apply_metrics.clone(), control.clone()).await;

    dualsync::demo::generate(&source_url, 3, 10, 60, 2, 3)
        .await
        .unwrap();
    let (events, _) = dualsync::demo::outbox_counts(&source).await.unwrap();
    eventually("every event is applied, as the metrics say", || async {
        let m = scrape(apply_addr).await;
        sum(&m, names::EVENTS_APPLIED, &[]) as i64 == events
    })
    .await;

    let relay_m = scrape(relay_addr).await;
    assert_eq!(sum(&relay_m, names::EVENTS_PUBLISHED, &[]) as i64, events);
    assert_eq!(
        sum(&relay_m, names::RELAY_LEADER, &[("role", "relay")]),
        1.0
    );
    assert!(
        sum(
            &relay_m,
            &format!("{}_count", names::BATCH_SIZE),
            &[("stage", "relay")]
        ) >= 1.0
    );
    assert_eq!(
        sum(&relay_m, &format!("{}_count", names::PUBLISH_DELAY), &[]) as i64,
        events,
        "one publish-delay observation per acknowledged event"
    );
    let apply_m = scrape(apply_addr).await;
    assert_eq!(sum(&apply_m, names::EVENTS_CONSUMED, &[]) as i64, events);
    assert_eq!(sum(&apply_m, names::EVENTS_DEAD_LETTERED, &[]), 0.0);
    assert_eq!(
        sum(&apply_m, &format!("{}_count", names::END_TO_END_LAG), &[]),
        sum(&apply_m, names::EVENTS_APPLIED, &[("outcome", "written")]),
        "one lag observation per written event (stale ones are no lag)"
    );
    assert!(sum(&apply_m, names::ASSIGNED_PARTITIONS, &[]) >= 1.0);

    assert_eq!(http(apply_addr, "GET", "/healthz", None).await.0, 200);
    assert_eq!(
        http(apply_addr, "GET", "/readyz", None).await,
        (200, "ready\n".into())
    );
    let (status, body) = http(relay_addr, "GET", "/status", None).await;
    assert_eq!(status, 200);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["state"], "ok", "{report}");
    assert_eq!(report["relay_leader"], true);
    assert_eq!(report["counters"]["published"].as_i64(), Some(events));

    // Pause needs the token: none → 401, wrong → 401, right → paused.
    assert_eq!(http(apply_addr, "POST", "/pause", None).await.0, 401);
    assert_eq!(
        http(apply_addr, "POST", "/pause", Some("wrong")).await.0,
        401
    );
    let (status, body) = http(apply_addr, "POST", "/pause", Some("s3cret-token")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"paused":true}"#));

    // While paused, new events pile up as consumer lag and none is applied.
    let applied_before = sum(&scrape(apply_addr).await, names::EVENTS_APPLIED, &[]);
    dualsync::demo::generate(&source_url, 3, 10, 20, 1, 4)
        .await
        .unwrap();
    let (events_after, _) = dualsync::demo::outbox_counts(&source).await.unwrap();
    eventually(
        "the paused consumer reports the new events as lag",
        || async {
            let m = scrape(apply_addr).await;
            sum(&m, names::CONSUMER_LAG, &[]) as i64 == events_after - events
        },
    )
    .await;
    let m = scrape(apply_addr).await;
    assert_eq!(
        sum(&m, names::EVENTS_APPLIED, &[]),
        applied_before,
        "nothing applied while paused"
    );
    assert_eq!(sum(&m, names::PAUSED, &[]), 1.0);
    let status: serde_json::Value =
        serde_json::from_str(&http(apply_addr, "GET", "/status", None).await.1).unwrap();
    assert_eq!(status["paused"], true);

    let (status, _) = http(apply_addr, "POST", "/resume", Some("s3cret-token")).await;
    assert_eq!(status, 200);
    eventually("after resume the held events are applied", || async {
        let m = scrape(apply_addr).await;
        sum(&m, names::EVENTS_APPLIED, &[]) as i64 == events_after
    })
    .await;

    cancel.cancel();
    relay.await.unwrap().unwrap();
    apply.await.unwrap().unwrap();
    std::env::remove_var(&token_env);
}
