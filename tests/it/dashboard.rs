//! The Grafana dashboard and the alert rules against a real Prometheus: it scrapes a running
//! relay and apply (the real binary) while load flows, and every panel expression of
//! deploy/grafana/dualsync.json and every alert expression of
//! deploy/prometheus/dualsync-alerts.yml must return series. A renamed metric or label breaks
//! this test. Prometheus is the Debian package (`scripts/prometheus.sh` installs it);
//! `DUALSYNC_TEST_PROMETHEUS` names another binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::processes::{spawn, write_config};

/// Processes the test started; killed when it ends, passed or not.
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn prometheus_binary() -> String {
    let bin = std::env::var("DUALSYNC_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let found = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "no Prometheus binary {bin:?}: run `bash scripts/prometheus.sh install` (Debian package `prometheus`) or set DUALSYNC_TEST_PROMETHEUS"
    );
    bin
}

/// Starts Prometheus on a free port, scraping `targets` (job name → address) every second
/// and evaluating the project's alert rules. Returns the child and its base URL.
fn start_prometheus(targets: &[(&str, String)]) -> (Child, String) {
    let dir = std::env::temp_dir().join(unique("prometheus"));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs: String = targets
        .iter()
        .map(|(job, addr)| {
            format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n")
        })
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n{jobs}",
        repo_file("deploy/prometheus/dualsync-alerts.yml").display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(prometheus_binary())
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    (child, format!("http://127.0.0.1:{port}"))
}

/// `GET /api/v1/<path>` → the `data` member (panics on a failed request or error status).
async fn api(base: &str, path: &str, query: &[(&str, &str)]) -> Option<serde_json::Value> {
    let response = reqwest::Client::new()
        .get(format!("{base}/api/v1/{path}"))
        .query(query)
        .send()
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
    Some(body["data"].clone())
}

/// Every `expr` of every panel target of the dashboard, with its panel title.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/dualsync.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_string();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            out.push((title.clone(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// Grafana's variables as a live query needs them: this pipeline, a rate window that holds
/// several 1 s scrapes.
fn substitute(expr: &str, pipeline: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$pipeline", pipeline)
}

/// The left side of an alert expression's top-level comparison with a number (every rule is
/// written `<probe> <comparison> <threshold>`): what must return series on live data.
fn probe(expr: &str) -> String {
    let bytes = expr.as_bytes();
    let (mut depth, mut quote, mut cut) = (0i32, None::<u8>, None);
    let mut i = 0;
    while i < bytes.len() {
        let (c, next_eq) = (bytes[i], bytes.get(i + 1) == Some(&b'='));
        match quote {
            Some(_) if c == b'\\' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => depth -= 1,
                // `=~` and `!~` only occur inside braces.
                b'<' | b'>' if depth == 0 => cut = Some((i, 1 + usize::from(next_eq))),
                b'=' | b'!' if depth == 0 && next_eq => cut = Some((i, 2)),
                _ => {}
            },
        }
        i += 1 + usize::from(quote.is_none() && cut.is_some_and(|(at, len)| at == i && len == 2));
    }
    let (at, len) = cut.unwrap_or_else(|| panic!("no top-level comparison in {expr:?}"));
    let threshold = expr[at + len..].trim().trim_start_matches("bool").trim();
    assert!(
        threshold.parse::<f64>().is_ok(),
        "the right side of {expr:?} must be a number, not {threshold:?}"
    );
    expr[..at].trim().to_string()
}

#[test]
fn alert_probes_are_the_left_side_of_the_comparison() {
    assert_eq!(
        probe("max by (p) (x{a=~\"b>c\"}) < 1"),
        "max by (p) (x{a=~\"b>c\"})"
    );
    assert_eq!(probe("(a or b) >= 0.5"), "(a or b)");
    assert_eq!(probe("rate(x[5m]) != 0"), "rate(x[5m])");
}

/// How many series `expr` returns now (None while Prometheus cannot answer).
async fn series(base: &str, expr: &str) -> Option<usize> {
    let data = api(base, "query", &[("query", expr)]).await?;
    data["result"].as_array().map(Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_panel_and_alert_expression_returns_live_series() {
    let servers = servers();
    let source_url = create_database(&servers).await;
    let sink_url = create_database(&servers).await;
    let text = pipeline_toml(&servers, &source_url, &sink_url, &unique("t"), "");
    let config =
        dualsync::config::Config::from_toml(Path::new("t.toml"), &text, Vec::new()).unwrap();
    let pipeline = config.pipeline.name.clone();
    let path = write_config(&text);
    let path = path.to_str().unwrap();
    let source = dualsync::pg::connect(&source_url).await.unwrap();
    dualsync::demo::setup(&source).await.unwrap();

    let (relay_port, apply_port) = (free_port(), free_port());
    let mut reaper = Reaper(Vec::new());
    reaper.0.push(spawn(
        &["relay", "-c", path, "--http-port", &relay_port.to_string()],
        &format!("{}.log", unique("dash-relay")),
    ));
    reaper.0.push(spawn(
        &[
            "apply",
            "-c",
            path,
            "--sink",
            "postgres",
            "--http-port",
            &apply_port.to_string(),
        ],
        &format!("{}.log", unique("dash-apply")),
    ));
    let (prometheus, base) = start_prometheus(&[
        ("dualsync-relay", format!("127.0.0.1:{relay_port}")),
        ("dualsync-apply", format!("127.0.0.1:{apply_port}")),
    ]);
    reaper.0.push(prometheus);

    // Load through the pipeline for a while, and one poison message for the dead-letter panel
    // and alert.
    let load_secs: f64 = std::env::var("DUALSYNC_DASHBOARD_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    let started = std::time::SystemTime::now();
    let rate = 200.0;
    let url = source_url.clone();
    let load = tokio::spawn(async move {
        dualsync::demo::generate_at_rate(
            &url,
            20,
            400,
            (rate * load_secs) as usize,
            2,
            3,
            Some(rate),
        )
        .await
    });
    eventually("both processes are scraped", || async {
        series(&base, "up{job=~\"dualsync-.*\"} == 1").await == Some(2)
    })
    .await;
    let topic = config.kafka.topic_for("orders");
    eventually("the relay created the orders topic", || async {
        series(
            &base,
            &format!("dualsync_events_published_total{{topic=\"{topic}\"}}"),
        )
        .await
        .is_some_and(|n| n > 0)
    })
    .await;
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &servers.kafka)
        .create()
        .unwrap();
    produce_in_order(&producer, &topic, &[("o1", &b"not avro"[..])]).await;
    load.await.unwrap().unwrap();

    // The rules Prometheus loaded from the file: the same expressions, parsed by Prometheus.
    let groups = api(&base, "rules", &[("type", "alert")]).await.unwrap();
    // The `dualsync-wal` group's series come from a relay streaming the WAL; this pipeline
    // polls (the slot gauges are checked in-process in source::wal::slot_health's tests).
    let alerts: Vec<(String, String)> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["name"] != "dualsync-wal")
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["query"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(alerts.len() >= 8, "rules not loaded: {groups}");

    let mut checks: Vec<(String, String)> = dashboard_expressions()
        .into_iter()
        .map(|(title, expr)| (format!("panel {title:?}"), substitute(&expr, &pipeline)))
        .collect();
    checks.extend(
        alerts
            .iter()
            .map(|(name, expr)| (format!("alert {name}"), probe(expr))),
    );
    // Each must return series; rates and derivatives need a few scrapes, so poll.
    let end = Instant::now() + DEADLINE;
    let mut missing = checks.clone();
    while !missing.is_empty() && Instant::now() < end {
        let mut still = Vec::new();
        for (what, expr) in missing {
            if series(&base, &expr).await.unwrap_or(0) == 0 {
                still.push((what, expr));
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        missing.is_empty(),
        "expressions without series on live metrics:\n{}",
        missing
            .iter()
            .map(|(w, e)| format!("  {w}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every rule evaluates without error on the live data.
    let groups = api(&base, "rules", &[("type", "alert")]).await.unwrap();
    for rule in groups["groups"][0]["rules"].as_array().unwrap() {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    // For docs/img: the dashboard's queries over the run, when asked.
    if let Ok(out) = std::env::var("DUALSYNC_DASHBOARD_DUMP") {
        let from = started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let to = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let mut dump = Vec::new();
        for (title, expr) in dashboard_expressions() {
            let expr = substitute(&expr, &pipeline);
            let (f, t) = (from.to_string(), to.to_string());
            let data = api(
                &base,
                "query_range",
                &[("query", &expr), ("start", &f), ("end", &t), ("step", "1")],
            )
            .await
            .unwrap();
            dump.push(serde_json::json!({"panel": title, "expr": expr, "data": data}));
        }
        std::fs::write(out, serde_json::to_string(&dump).unwrap()).unwrap();
    }
}
