//! PostgreSQL sink: one document table per aggregate type,
//! `(id text primary key, doc jsonb, version bigint, deleted boolean, updated_at timestamptz)`,
//! created on first use. A batch is one `INSERT .. ON CONFLICT DO UPDATE .. WHERE version <
//! EXCLUDED.version` per table, so a stale event is a no-op inside the database, atomically.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::{newest_per_key, quote_ident, ApplyOutcome, Sink, SinkRecord, StoredRecord};
use crate::config::PostgresSinkConfig;
use crate::error::Error;

pub struct PostgresSink {
    client: Mutex<Option<Arc<Client>>>,
    url: String,
    schema: String,
    known_tables: Mutex<HashSet<String>>,
}

impl PostgresSink {
    pub async fn connect(config: &PostgresSinkConfig) -> Result<Self, Error> {
        let sink = Self {
            client: Mutex::new(None),
            url: config.url.expose().to_string(),
            schema: config.schema.clone(),
            known_tables: Mutex::new(HashSet::new()),
        };
        let client = sink.client().await?;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(&sink.schema)
            ))
            .await
            .or_else(ignore_concurrent_create)?;
        Ok(sink)
    }

    /// The shared connection, reconnecting when the last one broke.
    async fn client(&self) -> Result<Arc<Client>, Error> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let client = Arc::new(crate::pg::connect(&self.url).await?);
        *guard = Some(client.clone());
        Ok(client)
    }

    fn table(&self, namespace: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(namespace))
    }

    async fn ensure_table(&self, client: &Client, namespace: &str) -> Result<(), Error> {
        if self.known_tables.lock().await.contains(namespace) {
            return Ok(());
        }
        let table = self.table(namespace);
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                    id text PRIMARY KEY,
                    doc jsonb,
                    version bigint NOT NULL,
                    deleted boolean NOT NULL DEFAULT false,
                    updated_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .or_else(ignore_concurrent_create)?;
        self.known_tables.lock().await.insert(namespace.to_string());
        Ok(())
    }
}

impl Sink for PostgresSink {
    async fn apply(&self, batch: &[SinkRecord]) -> Result<ApplyOutcome, Error> {
        let (kept, dropped) = newest_per_key(batch);
        let mut by_table: BTreeMap<&str, Vec<&SinkRecord>> = BTreeMap::new();
        for i in kept {
            by_table
                .entry(&batch[i].namespace)
                .or_default()
                .push(&batch[i]);
        }
        let client = self.client().await?;
        let mut outcome = ApplyOutcome {
            stale: dropped,
            ..Default::default()
        };
        for (namespace, records) in by_table {
            self.ensure_table(&client, namespace).await?;
            let ids: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
            let docs: Vec<Option<&serde_json::Value>> =
                records.iter().map(|r| r.document.as_ref()).collect();
            let versions: Vec<i64> = records.iter().map(|r| r.version).collect();
            let deleted: Vec<bool> = records.iter().map(|r| r.document.is_none()).collect();
            let sql = format!(
                "INSERT INTO {t} AS t (id, doc, version, deleted, updated_at)
                 SELECT id, doc, version, deleted, now()
                 FROM unnest($1::text[], $2::jsonb[], $3::int8[], $4::bool[]) AS u(id, doc, version, deleted)
                 ON CONFLICT (id) DO UPDATE
                   SET doc = EXCLUDED.doc, version = EXCLUDED.version,
                       deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at
                   WHERE t.version < EXCLUDED.version",
                t = self.table(namespace)
            );
            let written = client
                .execute(&sql, &[&ids, &docs, &versions, &deleted])
                .await?;
            outcome.applied += written;
            outcome.stale += records.len() as u64 - written;
        }
        Ok(outcome)
    }

    async fn purge_tombstones(&self, older_than: Duration) -> Result<u64, Error> {
        let client = self.client().await?;
        let tables: Vec<String> = self.known_tables.lock().await.iter().cloned().collect();
        let mut purged = 0;
        for namespace in tables {
            purged += client
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE deleted AND updated_at < now() - make_interval(secs => $1)",
                        self.table(&namespace)
                    ),
                    &[&(older_than.as_secs_f64())],
                )
                .await?;
        }
        Ok(purged)
    }

    async fn scan(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        let client = self.client().await?;
        let table = self.table(namespace);
        if !table_exists(&client, &table).await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id, version, CASE WHEN deleted THEN NULL ELSE doc END FROM {table}
             WHERE $1::text IS NULL OR id > $1 ORDER BY id LIMIT $2"
        );
        let rows = client.query(&sql, &[&after, &(limit as i64)]).await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    async fn get(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<(i64, Option<serde_json::Value>)>, Error> {
        let client = self.client().await?;
        let table = self.table(namespace);
        // Ask before querying, so polling a table that does not exist yet logs no errors.
        if !table_exists(&client, &table).await? {
            return Ok(None);
        }
        let sql = format!(
            "SELECT version, CASE WHEN deleted THEN NULL ELSE doc END FROM {table} WHERE id = $1"
        );
        let row = client.query_opt(&sql, &[&key]).await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}

async fn table_exists(client: &Client, table: &str) -> Result<bool, Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0))
}

/// `CREATE … IF NOT EXISTS` is not safe against a concurrent creator: the loser of the race
/// (two apply processes starting together, or a worker and `verify`) sees a unique violation
/// on the catalog, which means the object exists — exactly what was asked for.
fn ignore_concurrent_create(e: tokio_postgres::Error) -> Result<(), tokio_postgres::Error> {
    match e.code() {
        Some(c) if *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION => Ok(()),
        _ => Err(e),
    }
}
