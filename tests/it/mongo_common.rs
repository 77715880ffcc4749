//! What the MongoDB-primary tests share: a pipeline from a source database to both kinds of
//! sink, the source's and the sinks' state in one form, and waiting for convergence.

use std::collections::BTreeMap;
use std::path::Path;

use mongodb::bson::{doc, Bson, Document};
use serde_json::Value as Json;

use dualsync::config::{Config, SinkConfig};
use dualsync::sink::mongo::MongoSink;
use dualsync::sink::postgres::PostgresSink;
use dualsync::sink::SinkReader;
use dualsync::source::mongo_change::simplified_json;
use dualsync::source::mongo_key::canonical_key;

use crate::common::*;

/// Collections of the tests: `customers` has a schema in `schemas/` (typed path), `carts`
/// does not (generic envelope).
pub(crate) const TYPED: &str = "customers";
pub(crate) const GENERIC: &str = "carts";

pub(crate) struct MongoPipeline {
    pub(crate) toml: String,
    pub(crate) config: Config,
    pub(crate) prefix: String,
    pub(crate) source_db: mongodb::Database,
}

impl MongoPipeline {
    pub(crate) fn topic(&self, collection: &str) -> String {
        format!("{}.{collection}", self.prefix)
    }
}

/// A pipeline from database `source_db` at `source_url` to a PostgreSQL sink and a MongoDB
/// sink, with unique topics; `source_extra` goes into `[source]`.
pub(crate) async fn mongo_pipeline(
    servers: &Servers,
    source_url: &str,
    source_extra: &str,
    pipeline_name: Option<&str>,
    source_db_name: Option<&str>,
) -> MongoPipeline {
    let prefix = unique("m");
    let name = pipeline_name.unwrap_or(&prefix).to_string();
    let db_name = source_db_name.map_or_else(|| unique("src"), str::to_string);
    let sink_pg = create_database(servers).await;
    let toml = format!(
        r#"
[pipeline]
name = "{name}"
[source]
kind = "mongodb"
url = "{source_url}"
database = "{db_name}"
batch_size = 200
max_await_ms = 200
lease_secs = 3
{source_extra}
{rest}
"#,
        rest = pipeline_sections(servers, &prefix, &sink_pg, &unique("replica")),
    );
    let config = Config::from_toml(Path::new("mongo-test.toml"), &toml, Vec::new())
        .expect("test config is valid");
    let client = mongodb::Client::with_uri_str(source_url).await.unwrap();
    MongoPipeline {
        toml,
        config,
        prefix,
        source_db: client.database(&db_name),
    }
}

/// [`mongo_pipeline`] on the shared server that publishes a snapshot first.
pub(crate) async fn snapshotting_pipeline(servers: &Servers) -> MongoPipeline {
    mongo_pipeline(
        servers,
        &servers.mongo,
        "snapshot_on_start = true",
        None,
        None,
    )
    .await
}

/// The source's documents of `collection` as the sinks should hold them.
pub(crate) async fn source_state(
    db: &mongodb::Database,
    collection: &str,
) -> BTreeMap<String, Json> {
    use futures::TryStreamExt;
    let docs: Vec<Document> = db
        .collection::<Document>(collection)
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.into_iter()
        .map(|mut d| {
            let id = d.remove("_id").unwrap();
            let doc = Bson::Document(d);
            let json = if collection == TYPED {
                simplified_json(&doc)
            } else {
                doc.into_relaxed_extjson()
            };
            (canonical_key(&id), json)
        })
        .collect()
}

/// The live documents a sink holds for `collection`.
pub(crate) async fn sink_state<S: SinkReader>(
    sink: &S,
    collection: &str,
) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = sink.scan(collection, after.as_deref(), 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        for (key, _, doc) in page {
            if let Some(doc) = doc {
                out.insert(key, doc);
            }
        }
    }
    out
}

/// Connects to both sinks of `config`.
pub(crate) async fn sinks(config: &Config) -> (PostgresSink, MongoSink) {
    let (SinkConfig::Postgres(p), SinkConfig::Mongodb(m)) =
        (&config.sinks["postgres"], &config.sinks["mongo"])
    else {
        panic!("test pipeline has a postgres and a mongo sink")
    };
    (
        PostgresSink::connect(p).await.unwrap(),
        MongoSink::connect(m).await.unwrap(),
    )
}

/// Waits until both sinks hold exactly the source's documents of `collections`, except the
/// keys in `skip` (dead-lettered on purpose).
pub(crate) async fn converged(p: &MongoPipeline, collections: &[&str], skip: &[&str]) {
    let (pg, mongo) = sinks(&p.config).await;
    let last = std::sync::Mutex::new(String::new());
    let ok = dualsync::demo::wait_until(DEADLINE, || {
        let (pg, mongo, last) = (&pg, &mongo, &last);
        async move {
            for c in collections {
                let mut want = source_state(&p.source_db, c).await;
                want.retain(|k, _| !skip.contains(&k.as_str()));
                let in_pg = sink_state(pg, c).await;
                let in_mongo = sink_state(mongo, c).await;
                if in_pg != want || in_mongo != want {
                    *last.lock().unwrap() =
                        format!("{c}: source {want:?}\npostgres {in_pg:?}\nmongodb {in_mongo:?}");
                    return false;
                }
            }
            true
        }
    })
    .await;
    let last = last.into_inner().unwrap();
    assert!(ok, "sinks never converged with the source:\n{last}");
}

/// Waits until the relay holds the lease and its stream is open.
pub(crate) async fn leads(metrics: &dualsync::metrics::Metrics) {
    eventually("the relay leads", || async {
        metrics.relay_leader.get() == 1
    })
    .await;
}
