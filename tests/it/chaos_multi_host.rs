//! A libpq multi-host URL with `target_session_attrs=read-write`, as users point a pipeline
//! at a primary with standbys: dualsync's configuration takes it as it is, and its connect
//! path (tokio-postgres) skips a standby listed first and lands on the primary, for the relay
//! as for any connection. The chaos schedule's failover relies on it (tests/it/chaos/failover.rs).

use tokio_util::sync::CancellationToken;

use crate::chaos::failover::Pair;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_host_url_reaches_the_read_write_server_past_a_standby() {
    let servers = servers();
    let mut pair = Pair::start().await;
    let (db, _) = pair.new_database().await;
    // The standby first, the primary second.
    let [primary, standby] = pair.addresses();
    let url = Pair::url(&[standby, primary], &db);

    let client = dualsync::pg::connect(&url).await.unwrap();
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery, "{url} connected to the standby");
    dualsync::demo::setup(&client).await.unwrap();
    let mut writer = dualsync::pg::connect(&url).await.unwrap();
    dualsync::demo::upsert_customer(&mut writer, "c1", "Ann")
        .await
        .unwrap();

    // The relay, configured with it, publishes the row.
    let config = pipeline(&servers, &url, &url, &unique("t"), "");
    let cancel = CancellationToken::new();
    let (relay, _) = spawn_relay(&config, &cancel);
    let events = read_topic(&servers.kafka, &config.kafka.topic_for("customers"), 1).await;
    assert_eq!(events.len(), 1, "the relay published the row through {url}");
    cancel.cancel();
    relay.await.unwrap().unwrap();
}
