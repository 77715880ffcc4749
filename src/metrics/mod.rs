//! Every metric a relay or apply process exports, in one place: names are constants here and
//! nowhere else, so dashboards and alerts have one list to follow (the README's operations
//! section shows an excerpt). Each process owns one [`Metrics`] (its own registry, so tests
//! can run several pipelines in one process without mixing their numbers).

use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Metric names (Prometheus convention: `_total` for counters, base units in the name).
pub mod names {
    pub const OUTBOX_ROWS_READ: &str = "dualsync_outbox_rows_read_total";
    pub const EVENTS_PUBLISHED: &str = "dualsync_events_published_total";
    pub const OUTBOX_BACKLOG: &str = "dualsync_outbox_backlog_rows";
    pub const OUTBOX_OLDEST_AGE: &str = "dualsync_outbox_oldest_unpublished_age_seconds";
    pub const RELAY_LEADER: &str = "dualsync_relay_leader";
    pub const EVENTS_CONSUMED: &str = "dualsync_events_consumed_total";
    /// `outcome` = `written` (changed the sink) or `stale` (version guard: no change).
    pub const EVENTS_APPLIED: &str = "dualsync_events_applied_total";
    pub const EVENTS_DEAD_LETTERED: &str = "dualsync_events_dead_lettered_total";
    pub const RETRIES: &str = "dualsync_retries_total";
    pub const RETRIES_IN_PROGRESS: &str = "dualsync_retries_in_progress";
    pub const BATCH_SIZE: &str = "dualsync_batch_size";
    pub const END_TO_END_LAG: &str = "dualsync_end_to_end_lag_seconds";
    /// Relay: an event's outbox row creation to Kafka's acknowledgement.
    pub const PUBLISH_DELAY: &str = "dualsync_relay_publish_delay_seconds";
    pub const CONSUMER_LAG: &str = "dualsync_consumer_lag_messages";
    pub const ASSIGNED_PARTITIONS: &str = "dualsync_assigned_partitions";
    pub const PAUSED: &str = "dualsync_paused";
    pub const UP: &str = "dualsync_up";
    /// 1 while `/readyz` would answer 200 (set at each scrape).
    pub const READY: &str = "dualsync_ready";
    pub const CIRCUIT_STATE: &str = "dualsync_circuit_state";
    /// `capture = "wal"` (label `slot`): WAL between the server's insert position and the
    /// slot's confirmed flush position, what a restarted relay would stream again.
    pub const WAL_SLOT_LAG: &str = "dualsync_wal_slot_lag_bytes";
    /// WAL the server keeps for the slot (insert position minus its `restart_lsn`).
    pub const WAL_SLOT_RETAINED: &str = "dualsync_wal_slot_retained_bytes";
    /// 1 once the slot is invalidated (`wal_status` lost): events since its position are gone.
    pub const WAL_SLOT_LOST: &str = "dualsync_wal_slot_lost";
    /// 1 while a walsender streams the slot.
    pub const WAL_SLOT_ACTIVE: &str = "dualsync_wal_slot_active";
    /// Standard process metrics (the names every Prometheus client library uses), Linux only.
    pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
    pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
}

/// Which pipeline stage counted something (the `stage` label).
pub mod stage {
    pub const RELAY: &str = "relay";
    pub const APPLY: &str = "apply";
}

pub struct Metrics {
    pub registry: Registry,
    pub outbox_rows_read: IntCounter,
    pub published: IntCounterVec,
    pub outbox_backlog: IntGauge,
    pub outbox_oldest_age: Gauge,
    pub relay_leader: IntGauge,
    pub consumed: IntCounterVec,
    pub applied: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub retries: IntCounterVec,
    pub retries_in_progress: IntGauge,
    pub batch_size: HistogramVec,
    pub end_to_end_lag: Histogram,
    pub publish_delay: Histogram,
    pub consumer_lag: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub paused: IntGauge,
    pub ready: IntGauge,
    pub circuit_state: IntGauge,
    pub health: Health,
    /// The outbox's replication slot, by `slot` label (`capture = "wal"`; no series otherwise).
    pub wal_slot: WalSlotGauges,
}

/// The slot gauges and the last sample for `/status`.
pub struct WalSlotGauges {
    pub lag_bytes: IntGaugeVec,
    pub retained_bytes: IntGaugeVec,
    pub lost: IntGaugeVec,
    pub active: IntGaugeVec,
    /// The last sample as `/status` shows it (`None` until one is recorded).
    pub last: std::sync::Mutex<Option<serde_json::Value>>,
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique constants");
    c
}

fn slot_gauge(r: &Registry, name: &str, help: &str) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), &["slot"]).expect("valid metric"),
    )
}

impl Metrics {
    /// A fresh registry; `pipeline` and `role` become constant labels on every series.
    pub fn new(pipeline: &str, role: &str) -> Self {
        let labels = [
            ("pipeline".to_string(), pipeline.to_string()),
            ("role".to_string(), role.to_string()),
        ]
        .into_iter()
        .collect();
        let registry = Registry::new_custom(None, Some(labels)).expect("constant labels are valid");
        let r = &registry;
        let counter = |name: &str, help: &str| {
            register(r, IntCounter::new(name, help).expect("valid metric"))
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge =
            |name: &str, help: &str| register(r, IntGauge::new(name, help).expect("valid metric"));
        let up = gauge(names::UP, "1 while the process runs");
        up.set(1);
        #[cfg(target_os = "linux")]
        register(r, process::ProcessCollector::new());
        let retries = counter_vec(
            names::RETRIES,
            "Transient failures retried with backoff",
            &["stage"],
        );
        // A series at 0 from the start, so rate() and alerts see the first retry.
        retries.with_label_values(&[role]);
        Self {
            outbox_rows_read: counter(
                names::OUTBOX_ROWS_READ,
                "Outbox rows (or MongoDB changes) read by the relay",
            ),
            published: counter_vec(
                names::EVENTS_PUBLISHED,
                "Events acknowledged by Kafka",
                &["topic"],
            ),
            outbox_backlog: gauge(
                names::OUTBOX_BACKLOG,
                "Committed outbox rows not published yet",
            ),
            outbox_oldest_age: register(
                r,
                Gauge::new(
                    names::OUTBOX_OLDEST_AGE,
                    "Age of the oldest unpublished outbox row (0 when none)",
                )
                .expect("valid metric"),
            ),
            relay_leader: gauge(
                names::RELAY_LEADER,
                "1 while this relay holds the leader lock",
            ),
            consumed: counter_vec(names::EVENTS_CONSUMED, "Messages consumed", &["topic"]),
            applied: counter_vec(
                names::EVENTS_APPLIED,
                "Events handled by the sink: written, or stale (version guard, no change)",
                &["topic", "outcome"],
            ),
            dead_lettered: counter_vec(
                names::EVENTS_DEAD_LETTERED,
                "Events sent to a dead-letter topic",
                &["stage", "topic", "class"],
            ),
            retries,
            retries_in_progress: gauge(
                names::RETRIES_IN_PROGRESS,
                "Workers currently backing off after a transient failure",
            ),
            batch_size: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(names::BATCH_SIZE, "Events per batch").buckets(vec![
                        1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                    ]),
                    &["stage"],
                )
                .expect("valid metric"),
            ),
            end_to_end_lag: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        names::END_TO_END_LAG,
                        "Primary commit (dualsync.committed_at) to written in the sink; stale records not counted",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                        300.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            publish_delay: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        names::PUBLISH_DELAY,
                        "Outbox row insert (created_at) to Kafka's acknowledgement",
                    )
                    .buckets(vec![
                        0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0, 300.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            consumer_lag: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        names::CONSUMER_LAG,
                        "Messages between the partition end and this group's position",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric"),
            ),
            assigned_partitions: gauge(
                names::ASSIGNED_PARTITIONS,
                "Partitions assigned to this consumer",
            ),
            paused: gauge(names::PAUSED, "1 while paused through the HTTP API"),
            ready: gauge(names::READY, "1 while ready (GET /readyz answers 200)"),
            circuit_state: gauge(
                names::CIRCUIT_STATE,
                "Circuit breaker of the stage's downstream: 0 closed, 1 open (input paused), 2 half-open (probing)",
            ),
            health: Health::default(),
            wal_slot: WalSlotGauges {
                lag_bytes: slot_gauge(r, names::WAL_SLOT_LAG, "WAL between the server's insert position and the outbox slot's confirmed flush position"),
                retained_bytes: slot_gauge(r, names::WAL_SLOT_RETAINED, "WAL the server retains for the outbox slot (insert position minus restart_lsn)"),
                lost: slot_gauge(r, names::WAL_SLOT_LOST, "1 once the outbox slot is invalidated (wal_status lost)"),
                active: slot_gauge(r, names::WAL_SLOT_ACTIVE, "1 while a walsender streams the outbox slot"),
                last: std::sync::Mutex::new(None),
            },
            registry,
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        out
    }

    pub fn count_dead_letter(&self, stage: &str, topic: &str, class: &str) {
        self.dead_lettered
            .with_label_values(&[stage, topic, class])
            .inc();
    }
}

/// Resident memory and CPU time of this process from /proc/self, read at each scrape (the
/// `prometheus` crate's own collector would pull in `procfs` for two numbers).
#[cfg(target_os = "linux")]
mod process {
    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;
    use prometheus::{Counter, Gauge};

    use super::names;

    /// Clock ticks per second of /proc times: USER_HZ, 100 on every Linux architecture.
    const USER_HZ: f64 = 100.0;

    #[derive(Clone)]
    pub struct ProcessCollector {
        rss: Gauge,
        cpu: Counter,
    }

    impl ProcessCollector {
        pub fn new() -> Self {
            Self {
                rss: Gauge::new(names::PROCESS_RSS, "Resident memory size in bytes")
                    .expect("valid metric"),
                cpu: Counter::new(
                    names::PROCESS_CPU,
                    "Total user and system CPU time spent in seconds",
                )
                .expect("valid metric"),
            }
        }
    }

    /// VmRSS of /proc/self/status, in bytes.
    fn rss_bytes() -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024.0)
    }

    /// utime + stime of /proc/self/stat, in seconds. Fields after the `(comm)`, which may
    /// hold spaces: state is the 1st, utime the 12th, stime the 13th.
    fn cpu_seconds() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / USER_HZ)
    }

    impl Collector for ProcessCollector {
        fn desc(&self) -> Vec<&Desc> {
            let mut d = self.rss.desc();
            d.extend(self.cpu.desc());
            d
        }

        fn collect(&self) -> Vec<MetricFamily> {
            if let Some(rss) = rss_bytes() {
                self.rss.set(rss);
            }
            if let Some(cpu) = cpu_seconds() {
                let delta = cpu - self.cpu.get();
                if delta > 0.0 {
                    self.cpu.inc_by(delta);
                }
            }
            let mut out = self.rss.collect();
            out.extend(self.cpu.collect());
            out
        }
    }
}

/// Sum of every series of a counter vector (for tests and `/status`).
pub fn total(vec: &IntCounterVec) -> u64 {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Sum of the series of `vec` whose label `name` equals `value`.
pub fn total_where(vec: &IntCounterVec, name: &str, value: &str) -> u64 {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == name && l.value() == value)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

mod health;
pub use health::{Circuit, CircuitCell, Health, WriteWatch};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_across_labels() {
        let m = Metrics::new("p", "apply");
        m.applied.with_label_values(&["a", "written"]).inc_by(3);
        m.applied.with_label_values(&["b", "stale"]).inc_by(2);
        assert_eq!(total(&m.applied), 5);
        assert_eq!(total_where(&m.applied, "outcome", "stale"), 2);
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with(names::EVENTS_APPLIED) && l.contains(r#"outcome="stale""#))
            .unwrap_or_else(|| panic!("no stale series in {text}"));
        assert!(
            line.contains(r#"pipeline="p""#) && line.ends_with(" 2"),
            "{line}"
        );
    }

    /// Dashboards and alerts need these series before anything happened.
    #[test]
    fn retries_and_process_series_exist_from_the_start() {
        let text = Metrics::new("p", "apply").render();
        let has = |prefix: &str| text.lines().any(|l| l.starts_with(prefix));
        assert!(has(r#"dualsync_retries_total{stage="apply""#), "{text}");
        assert!(has(names::READY), "{text}");
        #[cfg(target_os = "linux")]
        {
            let value = |name: &str| -> f64 {
                let line = text
                    .lines()
                    .find(|l| l.starts_with(name))
                    .unwrap_or_else(|| panic!("no {name} in {text}"));
                line.rsplit_once(' ').unwrap().1.parse().unwrap()
            };
            assert!(value(names::PROCESS_RSS) > 1_000_000.0, "{text}");
            assert!(value(names::PROCESS_CPU) >= 0.0, "{text}");
        }
    }
}
