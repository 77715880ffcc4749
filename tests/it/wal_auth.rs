//! The WAL capture's replication connection authenticates like every other connection:
//! SCRAM-SHA-256 against a server that asks for it (a private server, its `pg_hba.conf`
//! changed), a clear refusal for a wrong password or a TLS-less server under
//! `sslmode=require`.

use dualsync::error::{classify, Disposition, Error, WalError};
use dualsync::source::wal::protocol::ReplicationConnection;

use crate::private_servers::PrivateServer;

#[tokio::test]
async fn the_replication_connection_authenticates_with_scram() {
    dualsync::telemetry::init_for_tests();
    let server = PrivateServer::postgres();
    let admin = dualsync::pg::connect(&server.url()).await.unwrap();
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE relay_user LOGIN REPLICATION PASSWORD 'p4ss-w0rd'",
        )
        .await
        .unwrap();
    // The first matching line wins: this user must use SCRAM, for SQL and replication alike.
    let hba = server.data().join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all relay_user 127.0.0.1/32 scram-sha-256\n\
             host replication relay_user 127.0.0.1/32 scram-sha-256\n{rest}"
        ),
    )
    .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();

    let url = |password: &str, extra: &str| {
        server.url().replace(
            "postgres://postgres@",
            &format!("postgres://relay_user:{password}@"),
        ) + extra
    };
    let mut conn = ReplicationConnection::connect(&url("p4ss-w0rd", "?sslmode=prefer"), "")
        .await
        .expect("SCRAM with the right password");
    let identity = conn.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    assert_eq!(
        identity.len(),
        1,
        "one row: systemid, timeline, xlogpos, dbname"
    );
    assert!(identity[0][0].as_deref().is_some_and(|id| !id.is_empty()));

    let refused = ReplicationConnection::connect(&url("wrong", ""), "")
        .await
        .err()
        .expect("a wrong password is refused");
    assert!(
        matches!(&refused, Error::Wal(WalError::Server { code, .. }) if code == "28P01"),
        "{refused}"
    );
    assert_eq!(classify(&refused), Disposition::Fatal);

    // The private server has no TLS: `require` must not fall back to plain text.
    let no_tls = ReplicationConnection::connect(&url("p4ss-w0rd", "?sslmode=require"), "")
        .await
        .err()
        .expect("sslmode=require refuses a server without TLS");
    assert!(no_tls.to_string().contains("sslmode=require"), "{no_tls}");
}
