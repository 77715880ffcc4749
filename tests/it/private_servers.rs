//! Servers owned by one test (a PostgreSQL cluster, a SecantusDB or a FerretDB process, each
//! on a free port), for tests that stop, restart or reconfigure a server without disturbing the others.
//! A test's own Kafka cluster is in `private_kafka`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_port, unique, DEADLINE};

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{name} is not set: run the tests with `make test`, or `make up && source .local/env`")
    })
}

/// Runs `cmd` and fails the test, with its output, unless it succeeds.
pub(crate) fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server owned by one test, stopped cleanly and started again on the same port and data
/// directory.
pub enum PrivateServer {
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
        /// FerretDB (SQLite backend in `data`) rather than SecantusDB.
        ferretdb: bool,
    },
}

impl PrivateServer {
    pub fn postgres() -> Self {
        Self::postgres_configured("", &[])
    }

    /// A PostgreSQL cluster initialised with extra `initdb` options (e.g. `--wal-segsize=1`)
    /// and `settings` appended to its postgresql.conf (e.g. `wal_level = logical`).
    pub fn postgres_configured(initdb: &str, settings: &[&str]) -> Self {
        let bin = env_path("DUALSYNC_TEST_PG_BIN");
        let data = std::env::temp_dir().join(unique("dualsync-private-pg"));
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
        server.pg_ctl(&[
            "initdb",
            "-o",
            &format!("-U postgres --auth=trust -E UTF8 {initdb}"),
        ]);
        let conf = server.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        // wal_level = logical: the outbox's WAL capture runs on private servers too. In the
        // file, not on the command line, so a test's own `settings` (later lines) override it.
        text.push_str("wal_level = logical\n");
        for line in settings {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&conf, text).unwrap();
        server.start();
        server
    }

    pub fn mongo() -> Self {
        Self::mongo_with_config("")
    }

    /// A SecantusDB started with `secantusd_toml` as its configuration file.
    pub fn mongo_with_config(secantusd_toml: &str) -> Self {
        let data = std::env::temp_dir().join(unique("dualsync-private-mongo"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("secantusd.toml"), secantusd_toml).unwrap();
        let mut server = Self::Mongo {
            bin: env_path("DUALSYNC_TEST_MONGOD"),
            data,
            port: free_port(),
            child: None,
            ferretdb: false,
        };
        server.start();
        server
    }

    /// A FerretDB with its SQLite data in a folder of its own.
    pub fn ferretdb() -> Self {
        let data = std::env::temp_dir().join(unique("dualsync-private-ferretdb"));
        std::fs::create_dir_all(&data).unwrap();
        let mut server = Self::Mongo {
            bin: env_path("DUALSYNC_TEST_FERRETDB"),
            data,
            port: free_port(),
            child: None,
            ferretdb: true,
        };
        server.start();
        server
    }

    /// The connection string.
    pub fn url(&self) -> String {
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
    pub fn start(&mut self) {
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
                ferretdb: true,
            } => {
                // No debug listener (its default port is shared) and no telemetry.
                let mut cmd = Command::new(&*bin);
                cmd.arg("--handler=sqlite")
                    .arg(format!("--sqlite-url=file:{}/", data.display()))
                    .arg(format!("--state-dir={}", data.display()))
                    .arg(format!("--listen-addr=127.0.0.1:{port}"))
                    .args(["--debug-addr=-", "--telemetry=disable", "--log-level=warn"]);
                *child = Some(spawn_logged(cmd, data, *port, "FerretDB"));
            }
            Self::Mongo {
                bin,
                data,
                port,
                child,
                ferretdb: false,
            } => {
                // Its working directory is the data folder: it reads ./secantusd.toml if any.
                let mut cmd = Command::new(&*bin);
                cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .arg("--storage-path")
                    .arg(&*data);
                *child = Some(spawn_logged(cmd, data, *port, "SecantusDB"));
            }
        }
    }

    /// A clean shutdown that disconnects every client (PostgreSQL's fast mode, SIGTERM). A
    /// SecantusDB that has not exited 30 s after SIGTERM (seen once on a loaded machine) is
    /// killed, so a schedule never hangs on the test server itself.
    pub fn stop(&mut self) {
        match self {
            Self::Postgres { .. } => self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]),
            Self::Mongo { child, .. } => {
                if let Some(mut c) = child.take() {
                    run(Command::new("kill").args(["-TERM", &c.id().to_string()]));
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while c.try_wait().unwrap().is_none() {
                        if Instant::now() >= deadline {
                            eprintln!("server {} ignored SIGTERM for 30 s; killing it", c.id());
                            c.kill().ok();
                            c.wait().unwrap();
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }

    /// A crash: `kill -9` of the server process, or PostgreSQL's immediate shutdown.
    pub fn kill(&mut self) {
        match self {
            Self::Postgres { .. } => self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "60"]),
            Self::Mongo { child, .. } => {
                if let Some(mut c) = child.take() {
                    c.kill().unwrap();
                    c.wait().unwrap();
                }
            }
        }
    }

    pub fn data(&self) -> &Path {
        match self {
            Self::Postgres { data, .. } | Self::Mongo { data, .. } => data,
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // Best effort; the test already asserted what it needed.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.kill()));
        if std::thread::panicking() {
            // Kept for the failure's diagnosis (server.log is in it).
            eprintln!("kept {}", self.data().display());
        } else {
            std::fs::remove_dir_all(self.data()).ok();
        }
    }
}

/// Starts `cmd` in `data` with its output appended to `data/server.log`, and returns once it
/// accepts connections on `port`.
fn spawn_logged(mut cmd: Command, data: &Path, port: u16, what: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("server.log"))
        .unwrap();
    let child = cmd
        .current_dir(data)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "private {what} never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}
