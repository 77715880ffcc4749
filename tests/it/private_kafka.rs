//! An Apache Kafka cluster owned by one test: one or three combined broker + controller
//! nodes (KRaft) on free ports, data in a temporary folder, so a test can crash and restart
//! brokers (the leader of a partition, the active controller) without disturbing the others.
//! The jars are the ones `make up` installed (`DUALSYNC_TEST_KAFKA_LIBS`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::common::{free_port, unique};

/// How long a node may take to start listening (a JVM on a busy 2-core machine).
const START_DEADLINE: Duration = Duration::from_secs(120);

fn libs() -> PathBuf {
    std::env::var_os("DUALSYNC_TEST_KAFKA_LIBS")
        .map(PathBuf::from)
        .expect("DUALSYNC_TEST_KAFKA_LIBS is not set: run the tests with `make test`, or `make up && source .local/env`")
}

fn java(args: &[&str], classpath: &Path) -> Command {
    let mut cmd = Command::new("java");
    cmd.arg("-cp").arg(format!("{}/*", classpath.display()));
    cmd.args(args);
    cmd
}

struct Node {
    id: usize,
    port: u16,
    controller_port: u16,
    /// A second client listener advertised at another address (a proxy's port in front of
    /// it), for tests whose clients must connect through a fault proxy; brokers talk to each
    /// other on `port`.
    proxied: Option<(u16, u16)>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

pub struct KafkaCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    libs: PathBuf,
    /// Lines added to every node's `server.properties`, and a folder of classes added to its
    /// class path (a test's broker plug-in, e.g. a create-topic policy).
    extra_properties: String,
    extra_classes: Option<PathBuf>,
}

impl KafkaCluster {
    /// Starts `n` nodes (1 or 3) and returns once every one accepts connections. With three,
    /// internal topics are replicated three times with `min.insync.replicas = 2`.
    pub fn start(n: usize) -> Self {
        Self::build(n, &[], "", None)
    }

    /// [`Self::start`] with `properties` added to every node's configuration (`{port}` and
    /// `{controller_port}` replaced by the node's; a key given again overrides the default)
    /// and `classes` (a folder of compiled classes) on its class path.
    pub fn start_with(n: usize, properties: &str, classes: Option<&Path>) -> Self {
        Self::build(n, &[], properties, classes)
    }

    /// As [`Self::start`], and node `i + 1` also listens for clients on a port of its own that
    /// it advertises as `127.0.0.1:advertised[i]` (a proxy forwarding to [`Self::proxied_ports`]):
    /// clients bootstrapping there get the proxy's addresses in the metadata, so every one of
    /// their connections goes through it, while the brokers replicate directly.
    pub fn start_proxied(n: usize, advertised: &[u16]) -> Self {
        Self::build(n, advertised, "", None)
    }

    fn build(n: usize, advertised: &[u16], properties: &str, classes: Option<&Path>) -> Self {
        let dir = std::env::temp_dir().join(unique("dualsync-private-kafka"));
        std::fs::create_dir_all(&dir).unwrap();
        let libs = libs();
        let nodes: Vec<Node> = (1..=n)
            .map(|id| Node {
                id,
                port: free_port(),
                controller_port: free_port(),
                proxied: advertised.get(id - 1).map(|a| (free_port(), *a)),
                dir: dir.join(format!("node-{id}")),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            nodes,
            dir,
            libs,
            extra_properties: properties.to_string(),
            extra_classes: classes.map(Path::to_path_buf),
        };
        cluster.format();
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_listening(i);
        }
        cluster
    }

    fn random_uuid(&self) -> String {
        let out = java(&["kafka.tools.StorageTool", "random-uuid"], &self.libs)
            .output()
            .expect("run kafka-storage random-uuid");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn format(&mut self) {
        let cluster_id = self.random_uuid();
        let n = self.nodes.len();
        let (rf, isr) = if n >= 3 { (3, 2) } else { (1, 1) };
        let voters = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let directory_ids: Vec<String> = self.nodes.iter().map(|_| self.random_uuid()).collect();
        let initial = self
            .nodes
            .iter()
            .zip(&directory_ids)
            .map(|(n, d)| format!("{}@127.0.0.1:{}:{d}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        for node in &self.nodes {
            std::fs::create_dir_all(node.dir.join("data")).unwrap();
            let (client_listener, client_advertised) = match node.proxied {
                Some((own, proxy)) => (
                    format!(",CLIENT://127.0.0.1:{own}"),
                    format!(",CLIENT://127.0.0.1:{proxy}"),
                ),
                None => Default::default(),
            };
            let config = format!(
                "process.roles=broker,controller\nnode.id={id}\n\
                 controller.quorum.bootstrap.servers={voters}\n\
                 controller.listener.names=CONTROLLER\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}{client_listener}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}{client_advertised}\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,CLIENT:PLAINTEXT\n\
                 inter.broker.listener.name=PLAINTEXT\nlog.dirs={data}\n\
                 auto.create.topics.enable=false\ndefault.replication.factor={rf}\n\
                 min.insync.replicas={isr}\noffsets.topic.replication.factor={rf}\n\
                 offsets.topic.num.partitions=6\ntransaction.state.log.replication.factor={rf}\n\
                 transaction.state.log.min.isr={isr}\ntransaction.state.log.num.partitions=2\n\
                 share.coordinator.state.topic.replication.factor={rf}\n\
                 share.coordinator.state.topic.min.isr={isr}\n\
                 group.initial.rebalance.delay.ms=0\nnum.network.threads=2\nnum.io.threads=2\n\
                 background.threads=2\nnum.replica.fetchers=1\n",
                id = node.id,
                port = node.port,
                cport = node.controller_port,
                data = node.dir.join("data").display(),
            );
            let properties = node.dir.join("server.properties");
            std::fs::write(&properties, config).unwrap();
            let mut cmd = java(
                &[
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    &cluster_id,
                    "-c",
                    properties.to_str().unwrap(),
                ],
                &self.libs,
            );
            if n == 1 {
                cmd.arg("--standalone");
            } else {
                cmd.args(["--initial-controllers", &initial]);
            }
            let out = cmd.output().expect("run kafka-storage format");
            assert!(
                out.status.success(),
                "kafka-storage format failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // Added after formatting: the storage tool would look for a plug-in's classes.
            let mut config = std::fs::read_to_string(&properties).unwrap();
            config.push_str(
                &self
                    .extra_properties
                    .replace("{port}", &node.port.to_string())
                    .replace("{controller_port}", &node.controller_port.to_string()),
            );
            config.push('\n');
            std::fs::write(&properties, config).unwrap();
        }
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {} already runs", node.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log())
            .unwrap();
        let child = Command::new("java")
            .args([
                "-Xms256m",
                "-Xmx512m",
                "-XX:+UseG1GC",
                "-XX:TieredStopAtLevel=1",
            ])
            .arg("-cp")
            .arg(match &self.extra_classes {
                Some(classes) => format!("{}/*:{}", self.libs.display(), classes.display()),
                None => format!("{}/*", self.libs.display()),
            })
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
            .arg("kafka.Kafka")
            .arg(node.dir.join("server.properties"))
            .current_dir(&node.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start a Kafka node");
        node.child = Some(child);
    }

    fn wait_listening(&mut self, i: usize) {
        let deadline = Instant::now() + START_DEADLINE;
        let port = self.nodes[i].port;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "Kafka node {} exited with {status} before listening; see {}",
                        self.nodes[i].id,
                        self.nodes[i].log().display()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "Kafka node {} never listened on {port}; see {}",
                self.nodes[i].id,
                self.nodes[i].log().display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of every node, comma-separated: the bootstrap list.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client ports of [`Self::start_with`], node by node: what the proxy forwards to.
    pub fn proxied_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter_map(|n| n.proxied.map(|(own, _)| own))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// A crash: `kill -9` of node `id` (1-based).
    pub fn kill(&mut self, id: usize) {
        if let Some(mut c) = self.nodes[id - 1].child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Starts node `id` again on its data and returns once it listens.
    pub fn restart(&mut self, id: usize) {
        self.spawn(id - 1);
        self.wait_listening(id - 1);
    }

    /// The node leading `topic`'s `partition` right now, as the cluster's metadata says.
    pub fn partition_leader(&self, topic: &str, partition: i32) -> Option<usize> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .ok()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()?;
        let t = metadata.topics().first()?;
        let p = t.partitions().iter().find(|p| p.id() == partition)?;
        usize::try_from(p.leader()).ok().filter(|l| *l >= 1)
    }

    /// The node that leads the KRaft quorum (the active controller): the newest epoch's
    /// leader among the nodes' `quorum-state` files.
    pub fn active_controller(&self) -> Option<usize> {
        self.nodes
            .iter()
            .filter_map(|n| {
                let text =
                    std::fs::read_to_string(n.dir.join("data/__cluster_metadata-0/quorum-state"))
                        .ok()?;
                let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                let leader = v["leaderId"].as_i64()?;
                let epoch = v["leaderEpoch"].as_i64()?;
                (leader >= 1).then_some((epoch, leader as usize))
            })
            .max()
            .map(|(_, leader)| leader)
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for i in 1..=self.nodes.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!(
                "kept {} (server.log of each node in it)",
                self.dir.display()
            );
        } else {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }
}
