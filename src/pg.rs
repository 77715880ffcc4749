//! PostgreSQL connections with TLS negotiated from the URL's `sslmode` (`disable`, `prefer`,
//! the default, or `require`), through the system's OpenSSL and trust store, and with
//! deadlines at the connection level (see [`with_connection_deadlines`]): a server on a host
//! that vanished must not hold a connection (and the relay's leader lock) for the two hours of
//! the operating system's default keepalive.

use std::sync::OnceLock;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{Client, Config, Connection, Socket};

use crate::error::Error;

pub type TlsStream = postgres_openssl::TlsStream<Socket>;

/// Connects and returns the client with its connection future (the caller drives it, e.g. to
/// receive notifications).
pub async fn connect_raw(url: &str) -> Result<(Client, Connection<Socket, TlsStream>), Error> {
    let config = with_connection_deadlines(url.parse::<Config>()?);
    Ok(config.connect(tls_connector()?).await?)
}

/// Keepalive probes start after this much silence (URL parameter `keepalives_idle`, seconds).
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
/// Between unanswered keepalive probes (`keepalives_interval`, seconds).
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes after which the connection is dead (`keepalives_retries`).
pub const KEEPALIVES_RETRIES: u32 = 3;
/// Sent data unacknowledged this long kills the connection (`tcp_user_timeout`, seconds in
/// this client, unlike libpq's milliseconds): a write to a vanished host fails instead of
/// being retransmitted for about 15 minutes.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// A server that does not complete the connection within this is unreachable
/// (`connect_timeout`, seconds): without it a connect into a partition waits for the OS.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The client library's own keepalive idle time, which means "not set in the URL".
const LIBRARY_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Fills in dualsync's connection deadlines where the URL sets none of its own: TCP
/// keepalives, `tcp_user_timeout` and `connect_timeout` (documented in
/// docs/configuration.md#postgresql-connections). `keepalives=0` in the URL is respected.
/// These notice a dead peer only where the TCP peer itself is gone; a live middlebox (a proxy,
/// a load balancer) answers keepalives for a vanished server, which is why the relay's leader
/// session also has a lease of its own (`source::leader_lease`).
pub fn with_connection_deadlines(mut config: Config) -> Config {
    if config.get_keepalives_idle() == LIBRARY_KEEPALIVES_IDLE {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
}

/// Builds the TLS connector on a blocking thread, so that it is ready by the first connection
/// instead of delaying it (start-up runs this while it waits for the Kafka cluster).
pub fn warm_tls_connector() {
    tokio::task::spawn_blocking(tls_connector);
}

/// The process's TLS connector, built at its first use. Building one loads and parses the
/// system trust store (about 40 ms of CPU here), which every connection used to pay again:
/// twice in the relay's start-up alone, and on each reconnect, blocking a runtime thread.
/// So a changed trust store is read at the next start, as JVMs and Go programs do.
pub fn tls_connector() -> Result<MakeTlsConnector, Error> {
    static CONNECTOR: OnceLock<Result<MakeTlsConnector, openssl::error::ErrorStack>> =
        OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            SslConnector::builder(SslMethod::tls())
                .map(|builder| MakeTlsConnector::new(builder.build()))
        })
        .clone()
        .map_err(Error::Tls)
}

/// Connects and drives the connection in a background task.
pub async fn connect(url: &str) -> Result<Client, Error> {
    let (client, connection) = connect_raw(url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> Config {
        with_connection_deadlines(url.parse().unwrap())
    }

    #[test]
    fn deadlines_are_filled_in_where_the_url_sets_none() {
        let c = parsed("postgres://u@db:5432/x");
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(c.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(c.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        assert_eq!(c.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(c.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
    }

    #[test]
    fn the_url_s_own_settings_win() {
        let c = parsed(
            "postgres://u@db/x?keepalives_idle=60&keepalives_interval=7&keepalives_retries=9&tcp_user_timeout=90&connect_timeout=3",
        );
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(7)));
        assert_eq!(c.get_keepalives_retries(), Some(9));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(90)));
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert!(!parsed("postgres://u@db/x?keepalives=0").get_keepalives());
    }
}
