//! The WAL capture's replication connection authenticates like every other connection:
//! SCRAM-SHA-256 against a server that asks for it (a private server, its `pg_hba.conf`
//! changed), a clear refusal for a wrong password or a TLS-less server under
//! `sslmode=require`, and TLS verified against the trust store on a server that accepts
//! nothing else.

use std::process::Command;
use std::time::Duration;

use dualsync::config::Config;
use dualsync::error::{classify, Disposition, Error, WalError};
use dualsync::source::wal::protocol::ReplicationConnection;

use crate::capture_modes::{every_row_in_topics, Mode};
use crate::common::*;
use crate::pipeline_scope::with_source;
use crate::private_servers::{run, PrivateServer};
use crate::processes::{sigterm, spawn_with_env, wait_exit, write_config};

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

/// A server that accepts only TLS (`hostssl` lines, `hostnossl … reject`), its certificate
/// self-signed for `localhost`: a WAL relay given that certificate as its trust store
/// (`SSL_CERT_FILE`, which OpenSSL reads) publishes every event, and the server reports its
/// walsender's connection as TLS; without it, the replication connection refuses the server
/// (its certificate is not trusted) instead of going on in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replication_connection_runs_over_verified_tls() {
    dualsync::telemetry::init_for_tests();
    let servers = servers();
    let server = PrivateServer::postgres();
    let data = server.data().to_path_buf();
    run(Command::new("openssl").current_dir(&data).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.crt",
    ]));
    run(Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key")));
    // The server's user (`postgres` when the tests run as root) must own its key.
    run(Command::new("chown")
        .arg("--reference")
        .arg(&data)
        .arg(data.join("server.key"))
        .arg(data.join("server.crt")));
    // Everything that needs a plain connection first: the outbox, the slot, the events.
    let admin = dualsync::pg::connect(&server.url()).await.unwrap();
    dualsync::demo::setup(&admin).await.unwrap();
    let prepared = Mode::Wal.prepare(&admin, &server.url()).await;
    dualsync::demo::generate(&server.url(), 3, 30, 20, 1, 1)
        .await
        .unwrap();
    // TLS on, and nothing else accepted over TCP from now on (this session stays open).
    let hba = data.join("pg_hba.conf");
    let plain_hba = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostssl replication all 127.0.0.1/32 trust\n\
         hostnossl all all 0.0.0.0/0 reject\n\
         hostnossl replication all 0.0.0.0/0 reject\n",
    )
    .unwrap();
    for statement in [
        "ALTER SYSTEM SET ssl = on",
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
        "ALTER SYSTEM SET ssl_key_file = 'server.key'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    let tls_url = server.url().replace("127.0.0.1", "localhost") + "?sslmode=require";
    eventually("the server offers TLS", || async {
        admin
            .query_one("SHOW ssl", &[])
            .await
            .is_ok_and(|r| r.get::<_, String>(0) == "on")
    })
    .await;

    // Not trusted by this process's store: refused at the handshake, never plain text.
    let untrusted = ReplicationConnection::connect(&tls_url, "")
        .await
        .err()
        .expect("an untrusted certificate is refused");
    assert!(
        untrusted.to_string().contains("certificate verify failed"),
        "{untrusted}"
    );

    let text = with_source(
        &pipeline_toml(&servers, &tls_url, &tls_url, &unique("t"), ""),
        &prepared.source_lines(),
    );
    let config = Config::from_toml(std::path::Path::new("t.toml"), &text, Vec::new()).unwrap();
    let path = write_config(&text);
    let certificate = data.join("server.crt");
    let mut relay = spawn_with_env(
        &["relay", "--config", path.to_str().unwrap()],
        "relay-wal-tls.log",
        &[("SSL_CERT_FILE", certificate.as_os_str())],
    );
    let messages = every_row_in_topics(&admin, &config, &["customers", "orders"]).await;
    assert!(!messages.is_empty());
    let walsenders_on_tls: Vec<bool> = first_column(
        &admin,
        "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
    )
    .await;
    assert_eq!(
        walsenders_on_tls,
        [true],
        "the relay's replication connection"
    );
    sigterm(&relay);
    let status = wait_exit(&mut relay, Duration::from_secs(30));
    assert!(status.success(), "relay exit status on SIGTERM: {status}");

    // Plain connections again, so the slot guard can drop the slot.
    std::fs::write(&hba, plain_hba).unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    drop(prepared);
}
