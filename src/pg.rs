//! PostgreSQL connections with TLS negotiated from the URL's `sslmode` (`disable`, `prefer`,
//! the default, or `require`), through the system's OpenSSL and trust store.

use openssl::ssl::{SslConnector, SslMethod};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{Client, Connection, Socket};

use crate::error::Error;

pub type TlsStream = postgres_openssl::TlsStream<Socket>;

/// Connects and returns the client with its connection future (the caller drives it, e.g. to
/// receive notifications).
pub async fn connect_raw(url: &str) -> Result<(Client, Connection<Socket, TlsStream>), Error> {
    let builder = SslConnector::builder(SslMethod::tls())
        .map_err(|e| Error::Connect(format!("cannot initialise TLS for PostgreSQL: {e}")))?;
    let tls = MakeTlsConnector::new(builder.build());
    Ok(tokio_postgres::connect(url, tls).await?)
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
