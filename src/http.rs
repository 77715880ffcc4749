//! The operations endpoint of a relay or apply process: `/healthz`, `/readyz`, `/metrics`
//! (Prometheus text), `/status` (JSON with warning thresholds) and the bearer-protected
//! `POST /pause` and `POST /resume`. Binds 127.0.0.1 unless configured otherwise; it serves
//! until the process's cancellation token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::error::Error;
use crate::metrics::{self, Metrics};

/// Pause/resume switch shared by the HTTP API and the stage it controls.
#[derive(Clone)]
pub struct Control {
    paused: Arc<watch::Sender<bool>>,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            paused: Arc::new(watch::channel(false).0),
        }
    }
}

impl Control {
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }
    /// Waits until not paused (returns at once when not paused) or until `cancel`.
    pub async fn wait_resumed(&self, cancel: &CancellationToken) {
        let mut rx = self.paused.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = rx.wait_for(|paused| !paused) => {}
        }
    }
    /// Waits until paused: a stage idle in a read selects on it, so a pause takes effect at
    /// once rather than after the next row arrives (and is published).
    pub async fn wait_paused(&self) {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|paused| *paused).await;
    }
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }
}

struct AppState {
    role: &'static str,
    pipeline: String,
    metrics: Arc<Metrics>,
    control: Control,
    config: HttpConfig,
    /// `None` when the token variable is unset: mutating routes are then disabled.
    token: Option<String>,
}

/// Binds `host:port` and serves until `cancel`. Returns the bound address (port 0 picks one).
pub async fn serve(
    config: &HttpConfig,
    port: u16,
    role: &'static str,
    pipeline: &str,
    metrics: Arc<Metrics>,
    control: Control,
    cancel: CancellationToken,
) -> Result<SocketAddr, Error> {
    let token = std::env::var(&config.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    let state = Arc::new(AppState {
        role,
        pipeline: pipeline.to_string(),
        metrics,
        control,
        config: config.clone(),
        token,
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .with_state(state);
    let address = format!("{}:{port}", config.host);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|source| Error::Listen {
            address: address.clone(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Listen { address, source })?;
    tracing::info!(address = %bound, "http endpoint listening (/healthz /readyz /metrics /status)");
    tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "http endpoint stopped");
        }
    });
    Ok(bound)
}

async fn readyz(State(s): State<Arc<AppState>>) -> Response {
    let reasons = s
        .metrics
        .health
        .not_ready(Duration::from_secs(s.config.stuck_after_secs));
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
            .into_response()
    }
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    let ready = s
        .metrics
        .health
        .not_ready(Duration::from_secs(s.config.stuck_after_secs))
        .is_empty();
    s.metrics.ready.set(i64::from(ready));
    s.metrics
        .circuit_state
        .set(s.metrics.health.circuit() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Counters, lags and readiness in one JSON document, with a `warnings` list for every
/// configured threshold that is exceeded.
async fn status(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(status_report(&s))
}

fn status_report(s: &AppState) -> serde_json::Value {
    let m = &s.metrics;
    let t = &s.config;
    let not_ready = m.health.not_ready(Duration::from_secs(t.stuck_after_secs));
    let consumed = metrics::total(&m.consumed);
    let dead = metrics::total(&m.dead_lettered);
    let handled = consumed.max(metrics::total(&m.published) + dead);
    let failure_rate = if handled == 0 {
        0.0
    } else {
        dead as f64 / handled as f64
    };
    let mut lags = serde_json::Map::new();
    let mut max_lag = 0i64;
    for family in prometheus::core::Collector::collect(&m.consumer_lag) {
        for metric in family.get_metric() {
            let label = |name: &str| {
                metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
                    .unwrap_or_default()
            };
            let lag = metric.get_gauge().get_value() as i64;
            max_lag = max_lag.max(lag);
            lags.insert(
                format!("{}[{}]", label("topic"), label("partition")),
                lag.into(),
            );
        }
    }
    let backlog = m.outbox_backlog.get();
    let oldest = m.outbox_oldest_age.get();
    let mut warnings = m.health.warnings();
    if max_lag > t.warn_consumer_lag {
        warnings.push(format!(
            "consumer lag {max_lag} is above {} (http.warn_consumer_lag)",
            t.warn_consumer_lag
        ));
    }
    if backlog > t.warn_outbox_backlog {
        warnings.push(format!(
            "outbox backlog {backlog} is above {} (http.warn_outbox_backlog)",
            t.warn_outbox_backlog
        ));
    }
    if oldest > t.warn_oldest_unpublished_secs as f64 {
        warnings.push(format!(
            "oldest unpublished outbox row is {oldest:.0}s old, above {}s (http.warn_oldest_unpublished_secs)",
            t.warn_oldest_unpublished_secs
        ));
    }
    if failure_rate > t.warn_failure_rate {
        warnings.push(format!(
            "dead-letter rate {failure_rate:.4} is above {} (http.warn_failure_rate)",
            t.warn_failure_rate
        ));
    }
    let state = if !not_ready.is_empty() {
        "not_ready"
    } else if !warnings.is_empty() {
        "warning"
    } else {
        "ok"
    };
    let wal_slot = m
        .wal_slot
        .last
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut report = json!({
        "pipeline": s.pipeline,
        "role": s.role,
        "state": state,
        "ready": not_ready.is_empty(),
        "circuit": m.health.circuit().as_str(),
        "not_ready": not_ready,
        "paused": s.control.is_paused(),
        "warnings": warnings,
        "counters": {
            "outbox_rows_read": m.outbox_rows_read.get(),
            "published": metrics::total(&m.published),
            "consumed": consumed,
            "written": metrics::total_where(&m.applied, "outcome", "written"),
            "stale": metrics::total_where(&m.applied, "outcome", "stale"),
            "dead_lettered": dead,
            "retries": metrics::total(&m.retries),
        },
        "failure_rate": failure_rate,
        "retries_in_progress": m.retries_in_progress.get(),
        "outbox": { "backlog": backlog, "oldest_unpublished_age_seconds": oldest },
        "relay_leader": m.relay_leader.get() == 1,
        "assigned_partitions": m.assigned_partitions.get(),
        "consumer_lag": lags,
        "max_consumer_lag": max_lag,
    });
    // A relay streaming the WAL (`capture = "wal"`): its slot as last sampled.
    if let Some(slot) = wal_slot {
        report["wal_slot"] = slot;
    }
    report
}

/// Checks `Authorization: Bearer <token>` in constant time.
fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = &s.token else {
        return Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                format!(
                    "pause/resume are disabled: set {} to a token to enable them\n",
                    s.config.token_env
                ),
            )
                .into_response(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same_length = given.len() == expected.len();
    let diff = given
        .bytes()
        .zip(expected.bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if same_length && diff == 0 {
        Ok(())
    } else {
        Err(Box::new(
            (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response(),
        ))
    }
}

async fn pause(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    set_paused(&s, &headers, true)
}

async fn resume(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    set_paused(&s, &headers, false)
}

fn set_paused(s: &AppState, headers: &HeaderMap, paused: bool) -> Response {
    if let Err(denied) = authorize(s, headers) {
        return *denied;
    }
    s.control.set_paused(paused);
    s.metrics.paused.set(i64::from(paused));
    tracing::info!(
        paused,
        "{} via http",
        if paused { "paused" } else { "resumed" }
    );
    Json(json!({ "paused": paused })).into_response()
}
