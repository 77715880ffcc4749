//! PostgreSQL connections with TLS negotiated from the URL's `sslmode` (`disable`, `prefer`,
//! the default, or `require`), through the system's OpenSSL and trust store.

use std::sync::OnceLock;

use openssl::ssl::{SslConnector, SslMethod};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{Client, Connection, Socket};

use crate::error::Error;

pub type TlsStream = postgres_openssl::TlsStream<Socket>;

/// Connects and returns the client with its connection future (the caller drives it, e.g. to
/// receive notifications).
pub async fn connect_raw(url: &str) -> Result<(Client, Connection<Socket, TlsStream>), Error> {
    Ok(tokio_postgres::connect(url, tls_connector()?).await?)
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
    static CONNECTOR: OnceLock<Result<MakeTlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            SslConnector::builder(SslMethod::tls())
                .map(|builder| MakeTlsConnector::new(builder.build()))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Error::Connect(format!("cannot initialise TLS for PostgreSQL: {e}")))
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
