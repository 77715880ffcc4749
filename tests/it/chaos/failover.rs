//! A PostgreSQL primary with a synchronous streaming standby (Debian's PostgreSQL 15:
//! `pg_basebackup -R`, a second cluster on its own port, `synchronous_standby_names = '*'`),
//! and the failover a schedule injects: the primary killed (`immediate`, no shutdown
//! checkpoint), the standby promoted, and the old primary rebuilt as the new one's standby, so
//! the next failover has somewhere to go. Clients reach whichever is primary through a libpq
//! multi-host URL with `target_session_attrs=read-write`.
//!
//! With synchronous replication a commit is acknowledged only once the standby has flushed it:
//! nothing acknowledged may be lost by the failover.
//!
//! With asynchronous replication ([`Pair::start_async`]) a promoted standby may lack commits
//! the old primary acknowledged, and the relay published: `chaos::async_failover` shows what
//! dualsync does then.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::unique;
use crate::private_servers::{run, PrivateServer};

/// Two clusters: `servers[primary]` is the primary, the other its synchronous standby.
pub(crate) struct Pair {
    pub(crate) servers: [PrivateServer; 2],
    pub(crate) primary: usize,
}

fn port_of(server: &PrivateServer) -> u16 {
    server
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap()
}

/// Runs a PostgreSQL program as the clusters' owner (`postgres` when the tests run as root).
fn pg_program(server: &PrivateServer, program: &str) -> Command {
    let PrivateServer::Postgres { bin, as_root, .. } = server else {
        unreachable!()
    };
    if *as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

/// A streaming standby of `primary` in a new folder `data` on `port`, started.
fn standby_of(primary: &PrivateServer, data: PathBuf, port: u16) -> PrivateServer {
    let PrivateServer::Postgres { bin, as_root, .. } = primary else {
        unreachable!()
    };
    let mut backup = pg_program(primary, "pg_basebackup");
    backup
        .arg("-D")
        .arg(&data)
        .args(["-h", "127.0.0.1", "-p", &port_of(primary).to_string()])
        .args(["-U", "postgres", "-X", "stream", "-R", "-c", "fast"]);
    run(&mut backup);
    let mut standby = PrivateServer::Postgres {
        bin: bin.clone(),
        data,
        port,
        as_root: *as_root,
    };
    standby.start();
    standby
}

impl Pair {
    /// A primary and its synchronous standby, both running.
    pub(crate) async fn start() -> Self {
        Self::start_replicating(true).await
    }

    /// A primary and its asynchronous standby (no `synchronous_standby_names`: a commit is
    /// acknowledged before the standby has it), both running, the standby streaming.
    pub(crate) async fn start_async() -> Self {
        Self::start_replicating(false).await
    }

    /// A new database on the primary (streamed to the standby), its name and a session on
    /// the primary's `postgres` database.
    pub(crate) async fn new_database(&mut self) -> (String, tokio_postgres::Client) {
        let db = unique("t");
        let admin = dualsync::pg::connect(&self.primary().url()).await.unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        (db, admin)
    }

    async fn start_replicating(synchronous: bool) -> Self {
        let primary = PrivateServer::postgres();
        let admin = dualsync::pg::connect(&primary.url()).await.unwrap();
        if synchronous {
            // Kept in postgresql.auto.conf, which the base backup copies: a promoted standby
            // asks for a synchronous standby of its own, which the rebuild gives it.
            for statement in [
                "ALTER SYSTEM SET synchronous_standby_names = '*'",
                "ALTER SYSTEM SET synchronous_commit = 'on'",
                "SELECT pg_reload_conf()",
            ] {
                admin.batch_execute(statement).await.unwrap();
            }
        }
        let data = std::env::temp_dir().join(unique("dualsync-private-pg-standby"));
        let standby = standby_of(&primary, data, crate::common::free_port());
        let pair = Self {
            servers: [primary, standby],
            primary: 0,
        };
        pair.wait_streaming(&admin, synchronous).await;
        pair
    }

    /// Waits until the primary streams to a standby, a synchronous one if `synchronous`.
    async fn wait_streaming(&self, admin: &tokio_postgres::Client, synchronous: bool) {
        let sql = if synchronous {
            "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'"
        } else {
            "SELECT 1 FROM pg_stat_replication WHERE state = 'streaming'"
        };
        crate::common::eventually("the standby streams", || async {
            admin.query_opt(sql, &[]).await.ok().flatten().is_some()
        })
        .await;
    }

    pub(crate) fn primary(&mut self) -> &mut PrivateServer {
        &mut self.servers[self.primary]
    }

    /// `host:port` of both clusters, in a fixed order (the multi-host URL's).
    pub(crate) fn addresses(&self) -> [String; 2] {
        [0, 1].map(|i| format!("127.0.0.1:{}", port_of(&self.servers[i])))
    }

    /// A libpq multi-host URL of database `db` over `hosts` (`host:port` each), connecting to
    /// whichever is read-write.
    pub(crate) fn url(hosts: &[String], db: &str) -> String {
        format!(
            "postgres://postgres@{}/{db}?target_session_attrs=read-write",
            hosts.join(",")
        )
    }

    /// The primary is killed, the standby promoted (and waited for until it accepts writes),
    /// and the old primary's folder replaced by a standby of the new one, on the same port.
    pub(crate) async fn failover(&mut self) {
        let old = self.primary;
        self.promote_standby();
        let new = self.primary;
        let admin = dualsync::pg::connect(&self.servers[new].url())
            .await
            .unwrap();
        let old_data: PathBuf = self.servers[old].data().to_path_buf();
        remove_cluster(&old_data);
        let rebuilt = standby_of(&self.servers[new], old_data, port_of(&self.servers[old]));
        // The replaced server's Drop must not kill the rebuilt one: it has already stopped.
        let gone = std::mem::replace(&mut self.servers[old], rebuilt);
        std::mem::forget(gone);
        self.wait_streaming(&admin, true).await;
    }

    /// The primary is killed (`immediate`: no shutdown checkpoint, as a crash) and the standby
    /// promoted, waited for until it accepts writes; nothing is rebuilt.
    pub(crate) fn promote_standby(&mut self) {
        let old = self.primary;
        self.servers[old].kill();
        let new = 1 - old;
        let mut promote = pg_program(&self.servers[new], "pg_ctl");
        promote
            .arg("-D")
            .arg(self.servers[new].data())
            .args(["promote", "-w", "-t", "60"]);
        run(&mut promote);
        self.primary = new;
    }
}

/// Removes a stopped cluster's folder for a base backup into the same path.
fn remove_cluster(data: &Path) {
    std::fs::remove_dir_all(data).unwrap_or_else(|e| panic!("remove {}: {e}", data.display()));
}
