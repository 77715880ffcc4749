//! The sink's server stopped for 20 seconds while events keep arriving, then started again:
//! apply holds its partitions, retries with backoff (visible in its metrics), and the
//! secondary ends at exactly the events' final state: nothing lost, nothing doubled.
//!
//! Each test runs its own private sink server (a PostgreSQL cluster or a SecantusDB process on
//! a free port), so stopping it disturbs no other test.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use dualsync::codec::OutboxEvent;
use dualsync::config::{Config, SinkConfig};
use dualsync::metrics::{total, total_where};
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::{Sink, StoredRecord};

use crate::common::*;

const OUTAGE: Duration = Duration::from_secs(20);
const KEYS: usize = 40;

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{name} is not set: run the tests with `make test`, or `make up && source .local/env`")
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sink server owned by one test, stopped cleanly and started again on the same port and
/// data directory.
enum PrivateServer {
    Postgres {
        bin: PathBuf,
        data: PathBuf,
        port: u16,
        as_root: bool,
    },
    Mongo {
        bin: PathBuf,
        data: PathBuf,
        port: u16,
        child: Option<Child>,
    },
}

impl PrivateServer {
    fn postgres() -> Self {
        let bin = env_path("DUALSYNC_TEST_PG_BIN");
        let data = std::env::temp_dir().join(unique("dualsync-outage-pg"));
        std::fs::create_dir_all(&data).unwrap();
        // PostgreSQL refuses to run as root: then the cluster belongs to `postgres`.
        let as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        if as_root {
            run(Command::new("chown").arg("postgres:postgres").arg(&data));
        }
        let mut server = Self::Postgres {
            bin,
            data,
            port: free_port(),
            as_root,
        };
        server.pg_ctl(&["initdb", "-o", "-U postgres --auth=trust -E UTF8"]);
        server.start();
        server
    }

    fn mongo() -> Self {
        let data = std::env::temp_dir().join(unique("dualsync-outage-mongo"));
        std::fs::create_dir_all(&data).unwrap();
        let mut server = Self::Mongo {
            bin: env_path("DUALSYNC_TEST_MONGOD"),
            data,
            port: free_port(),
            child: None,
        };
        server.start();
        server
    }

    fn url(&self) -> String {
        match self {
            Self::Postgres { port, .. } => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            Self::Mongo { port, .. } => {
                format!("mongodb://127.0.0.1:{port}/?directConnection=true")
            }
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let Self::Postgres {
            bin, data, as_root, ..
        } = self
        else {
            unreachable!()
        };
        let pg_ctl = bin.join("pg_ctl");
        let mut cmd = if *as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        run(cmd.arg("-D").arg(data).args(args).current_dir(data));
    }

    /// Starts the server and returns once it accepts connections.
    fn start(&mut self) {
        match self {
            Self::Postgres { data, port, .. } => {
                let options = format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    data.display()
                );
                let log = data.join("server.log").display().to_string();
                self.pg_ctl(&["start", "-w", "-t", "60", "-l", &log, "-o", &options]);
            }
            Self::Mongo {
                bin,
                data,
                port,
                child,
            } => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data.join("server.log"))
                    .unwrap();
                // Its working directory is the data folder: it reads ./secantusd.toml if any.
                *child = Some(
                    Command::new(&*bin)
                        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                        .arg("--storage-path")
                        .arg(&*data)
                        .current_dir(&*data)
                        .stdout(log.try_clone().unwrap())
                        .stderr(log)
                        .stdin(Stdio::null())
                        .spawn()
                        .unwrap(),
                );
                let deadline = Instant::now() + DEADLINE;
                while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                    assert!(
                        Instant::now() < deadline,
                        "private SecantusDB never listened"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// A clean shutdown that disconnects every client (PostgreSQL's fast mode, SIGTERM).
    fn stop(&mut self) {
        match self {
            Self::Postgres { .. } => self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]),
            Self::Mongo { child, .. } => {
                if let Some(mut c) = child.take() {
                    run(Command::new("kill").args(["-TERM", &c.id().to_string()]));
                    c.wait().unwrap();
                }
            }
        }
    }

    fn data(&self) -> &Path {
        match self {
            Self::Postgres { data, .. } | Self::Mongo { data, .. } => data,
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Self::Mongo { child: Some(c), .. } = self {
            c.kill().ok();
            c.wait().ok();
        } else if let Self::Postgres { .. } = self {
            // Best effort; the test already asserted what it needed.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.pg_ctl(&["stop", "-m", "immediate", "-w"])
            }));
        }
        std::fs::remove_dir_all(self.data()).ok();
    }
}

/// Event `n` of the stream: key `c{n % KEYS}`, versions rising per key, every seventh a delete.
fn event(n: usize) -> OutboxEvent {
    let id = format!("c{:02}", n % KEYS);
    let version = (n / KEYS + 1) as i64;
    let payload = (n % 7 != 3)
        .then(|| json!({"id": id, "name": format!("v{version}"), "email": "e", "order_count": n}));
    OutboxEvent {
        event_id: uuid::Uuid::new_v4(),
        event_type: "CustomerChanged".into(),
        aggregate_type: "customers".into(),
        aggregate_id: id,
        version,
        created_at_micros: 0,
        payload,
    }
}

/// The state the secondary must end in after events `0..count`, as [`Sink::scan`] shows it.
fn expected_state(count: usize) -> Vec<StoredRecord> {
    let mut last = BTreeMap::new();
    for n in 0..count {
        let e = event(n);
        last.insert(e.aggregate_id.clone(), (e.version, e.payload));
    }
    last.into_iter().map(|(k, (v, d))| (k, v, d)).collect()
}

/// Everything the secondary holds for `customers` (empty while it cannot answer).
async fn scan_all(config: &Config, sink_name: &str) -> Vec<StoredRecord> {
    let scan = |r: Result<Vec<StoredRecord>, _>| r.unwrap_or_default();
    match &config.sinks[sink_name] {
        SinkConfig::Postgres(p) => match PostgresSink::connect(p).await {
            Ok(sink) => scan(sink.scan("customers", None, 10 * KEYS).await),
            Err(_) => Vec::new(),
        },
        SinkConfig::Mongodb(m) => match MongoSink::connect(m).await {
            Ok(sink) => scan(sink.scan("customers", None, 10 * KEYS).await),
            Err(_) => Vec::new(),
        },
    }
}

async fn sink_survives_an_outage(mut server: PrivateServer, sink_name: &str) {
    let servers = servers();
    // The sink under test points at the private server; the other one is never used.
    let (pg_url, servers) = match &server {
        PrivateServer::Postgres { .. } => (server.url(), servers),
        PrivateServer::Mongo { .. } => (
            "postgres://unused/db".to_string(),
            Servers {
                mongo: server.url(),
                ..servers
            },
        ),
    };
    let config = pipeline(
        &servers,
        "postgres://unused/db",
        &pg_url,
        &unique("outage"),
        "",
    );
    let topic = config.kafka.topic_for("customers");
    dualsync::publish::Publisher::new(&config.kafka)
        .unwrap()
        .ensure_topic(&topic)
        .await
        .unwrap();
    let producer: Arc<FutureProducer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &servers.kafka)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .unwrap(),
    );
    let codec = schemas();
    let send = move |range: std::ops::Range<usize>| {
        let (producer, codec, topic) = (producer.clone(), codec.clone(), topic.clone());
        async move {
            for n in range {
                let e = event(n);
                let value = codec.encode(&e).unwrap();
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&e.aggregate_id)
                            .payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .unwrap();
            }
        }
    };

    let cancel = CancellationToken::new();
    let (apply, stats) = spawn_apply(&config, sink_name, &cancel);
    // Before the outage: the first events are in the sink.
    send(0..200).await;
    eventually("the first events are applied", || async {
        total(&stats.applied) > 0
    })
    .await;

    // A writer keeps producing through the outage, paced so events arrive before, during
    // and after it.
    let total_events = 200 + 25 * 40;
    let writer = tokio::spawn({
        let send = send.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000));
            for chunk in 0..25 {
                tick.tick().await;
                let start = 200 + chunk * 40;
                send(start..start + 40).await;
            }
        }
    });
    let before = total(&stats.applied);
    eventually("events of the paced writer are applied", || async {
        total(&stats.applied) > before
    })
    .await;

    let stopped = Instant::now();
    tokio::task::block_in_place(|| server.stop());
    eventually("apply notices the outage and retries", || async {
        stats.retries_in_progress.get() > 0
    })
    .await;
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;
    assert!(
        !apply.is_finished(),
        "apply kept running through the outage"
    );
    let written_during_outage = total_where(&stats.applied, "outcome", "written");
    tokio::task::block_in_place(|| server.start());

    writer.await.unwrap();
    let expected = expected_state(total_events);
    eventually("the secondary converges to the final state", || async {
        scan_all(&config, sink_name).await == expected
    })
    .await;
    assert!(total(&stats.retries) > 0, "the outage was seen and retried");
    assert!(
        total_where(&stats.applied, "outcome", "written") > written_during_outage,
        "writes resumed after the restart"
    );
    assert_eq!(stats.retries_in_progress.get(), 0, "retry episode over");
    cancel.cancel();
    apply.await.unwrap().unwrap();
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sink_stopped_for_20_s_mid_stream_loses_and_doubles_nothing() {
    let server = tokio::task::block_in_place(PrivateServer::postgres);
    sink_survives_an_outage(server, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_sink_stopped_for_20_s_mid_stream_loses_and_doubles_nothing() {
    let server = tokio::task::block_in_place(PrivateServer::mongo);
    sink_survives_an_outage(server, "mongo").await;
}
