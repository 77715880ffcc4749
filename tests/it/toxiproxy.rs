//! A private Toxiproxy server for the fault tests: one link per server a process talks to, and
//! faults that are not polite switched on and off through its HTTP API — a blackhole
//! (connections stay open, nothing arrives), latency, a bandwidth cap, connection resets.
//!
//! The program comes from `scripts/test.sh` (`go install` into `~/.dualsync/tools`), named by
//! `DUALSYNC_TEST_TOXIPROXY`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::{Child, Command};

use crate::common::free_port;

/// A running Toxiproxy server, killed when dropped.
pub struct Toxiproxy {
    child: Child,
    api: String,
    http: reqwest::Client,
}

/// One proxied link: clients connect to `listen`, Toxiproxy forwards to the upstream server.
#[derive(Debug, Clone)]
pub struct Link {
    pub name: String,
    /// `127.0.0.1:port` the clients use instead of the server's own address.
    pub listen: String,
}

impl Link {
    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.listen.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Toxiproxy {
    /// Starts a private server on a free port and waits until its API answers.
    pub async fn start() -> Self {
        let program = std::env::var("DUALSYNC_TEST_TOXIPROXY").expect(
            "DUALSYNC_TEST_TOXIPROXY is not set: run the tests with `make test` (it installs Toxiproxy), or `. .local/env` after it",
        );
        let port = free_port();
        let child = Command::new(&program)
            .args(["-host", "127.0.0.1", "-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let proxy = Self {
            child,
            api: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = proxy
                .http
                .get(format!("{}/version", proxy.api))
                .send()
                .await
            {
                if r.status().is_success() {
                    return proxy;
                }
            }
            assert!(
                Instant::now() < deadline,
                "toxiproxy did not answer on {}",
                proxy.api
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.api));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("toxiproxy {method} {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "toxiproxy {method} {path}: {status} {text}"
        );
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// A new link to `upstream` (`host:port`) on a free local port.
    pub async fn link(&self, name: &str, upstream: &str) -> Link {
        self.link_at(name, free_port(), upstream).await
    }

    /// A new link to `upstream` on local port `port`, chosen beforehand (a Kafka broker must
    /// advertise the port before the link exists).
    pub async fn link_at(&self, name: &str, port: u16, upstream: &str) -> Link {
        let listen = format!("127.0.0.1:{port}");
        let created = self
            .call(
                reqwest::Method::POST,
                "/proxies",
                Some(json!({ "name": name, "listen": listen, "upstream": upstream, "enabled": true })),
            )
            .await;
        Link {
            name: name.to_string(),
            listen: created["listen"].as_str().unwrap_or(&listen).to_string(),
        }
    }

    async fn toxic(
        &self,
        link: &Link,
        name: &str,
        kind: &str,
        stream: &str,
        attributes: serde_json::Value,
    ) {
        self.call(
            reqwest::Method::POST,
            &format!("/proxies/{}/toxics", link.name),
            Some(json!({ "name": name, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes })),
        )
        .await;
    }

    /// A network partition of `link`: open connections stay open and new ones are accepted,
    /// but nothing arrives in either direction until [`Self::heal`].
    pub async fn blackhole(&self, link: &Link) {
        for stream in ["upstream", "downstream"] {
            self.toxic(
                link,
                &format!("blackhole_{stream}"),
                "timeout",
                stream,
                json!({ "timeout": 0 }),
            )
            .await;
        }
    }

    /// Every byte from the server is held `latency_ms` (± `jitter_ms`).
    pub async fn latency(&self, link: &Link, latency_ms: u64, jitter_ms: u64) {
        self.toxic(
            link,
            "latency",
            "latency",
            "downstream",
            json!({ "latency": latency_ms, "jitter": jitter_ms }),
        )
        .await;
    }

    /// The server's replies trickle at `rate_kb` KB/s.
    pub async fn bandwidth(&self, link: &Link, rate_kb: u64) {
        self.toxic(
            link,
            "bandwidth",
            "bandwidth",
            "downstream",
            json!({ "rate": rate_kb }),
        )
        .await;
    }

    /// Connections are reset (TCP RST) `after_ms` after data arrives, new ones included, until
    /// [`Self::heal`].
    pub async fn reset_peer(&self, link: &Link, after_ms: u64) {
        self.toxic(
            link,
            "reset_peer",
            "reset_peer",
            "upstream",
            json!({ "timeout": after_ms }),
        )
        .await;
    }

    /// Removes every toxic of `link`: traffic flows again (connections that were held open by a
    /// blackhole resume).
    pub async fn heal(&self, link: &Link) {
        let toxics = self
            .call(
                reqwest::Method::GET,
                &format!("/proxies/{}/toxics", link.name),
                None,
            )
            .await;
        for toxic in toxics.as_array().into_iter().flatten() {
            let name = toxic["name"].as_str().unwrap();
            self.call(
                reqwest::Method::DELETE,
                &format!("/proxies/{}/toxics/{name}", link.name),
                None,
            )
            .await;
        }
    }

    /// Closes every connection of `link` and refuses new ones (`enabled = false`), or opens it
    /// again.
    pub async fn set_enabled(&self, link: &Link, enabled: bool) {
        self.call(
            reqwest::Method::POST,
            &format!("/proxies/{}", link.name),
            Some(json!({ "enabled": enabled })),
        )
        .await;
    }

    /// The server's process id (for tests that must kill it).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// `host:port` of a server URL (`scheme://user@host:port/...` or `scheme://host:port/...`).
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split(['/', '?']).next().unwrap().to_string()
}

/// The fixture itself: a query through a link works; a blackholed link holds a query without
/// closing the connection (Toxiproxy drops what it holds, so that connection is spoiled, as a
/// real one would be after its deadline); a healed link carries new connections.
#[tokio::test]
async fn blackhole_holds_a_connection_open_until_healed() {
    let servers = crate::common::servers();
    let proxy = Toxiproxy::start().await;
    let upstream = host_port(&servers.pg);
    let link = proxy.link("pg", &upstream).await;
    let url = servers.pg.replace(&upstream, &link.listen);
    let client = dualsync::pg::connect(&url).await.unwrap();
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    proxy.blackhole(&link).await;
    let held =
        tokio::time::timeout(Duration::from_secs(2), client.query_one("SELECT 2", &[])).await;
    assert!(
        held.is_err(),
        "a query went through a blackholed link: {held:?}"
    );
    assert!(!client.is_closed(), "the blackhole closed the connection");

    proxy.heal(&link).await;
    let again = dualsync::pg::connect(&url).await.unwrap();
    let two: i32 = again.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(two, 2);
}
