//! PostgreSQL sink. Each aggregate type gets a table, created on first use:
//!
//! - by default a **document table** `(id text primary key, doc jsonb, version bigint,
//!   deleted boolean, updated_at timestamptz)`;
//! - with `[sinks.NAME.tables.<aggregatetype>]`, a **column table**: the key column, one typed
//!   column per mapped payload field, and the same `version`, `deleted`, `updated_at`.
//!
//! A batch is one statement per table: records above the purge horizon go through
//! `INSERT .. ON CONFLICT DO UPDATE .. WHERE version < EXCLUDED.version`, records at or below
//! it may only `UPDATE` a row the table holds (a row deleted meanwhile is not re-inserted),
//! so a stale event is a no-op inside the database, atomically; a record at or below the
//! horizon for a key the table does not hold is refused as [`Error::BelowPurgeHorizon`]. Column values are cast
//! by PostgreSQL from the payload's JSON (`(doc #>> path)::type`): a value that does not cast
//! fails the batch with a data exception, and apply isolates and dead-letters that record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::{
    newest_per_key, quote_ident, ApplyOutcome, Sink, SinkReader, SinkRecord, StoredRecord,
};
use crate::config::{ColumnTableConfig, ColumnType, PostgresSinkConfig};
use crate::error::{classify, Disposition, Error};

pub struct PostgresSink {
    connection: Mutex<Option<Arc<Connection>>>,
    /// The tombstone purge's own connection: a purge statement held up (a lock, a large
    /// chunk) never holds up the writes pipelined on the write connection.
    purge_connection: Mutex<Option<Arc<Connection>>>,
    url: String,
    schema: String,
    /// Aggregate types with a column mapping; the rest use document tables.
    column_tables: BTreeMap<String, ColumnTableConfig>,
    known_tables: Mutex<HashSet<String>>,
    /// `statement_timeout` of the sink's connections (`sinks.NAME.timeout_ms`): a write
    /// waiting on a lock fails with 57014 (retried) instead of holding the partitions.
    statement_timeout_ms: u64,
}

/// The sink's connection, with the upsert of each table prepared on it once: a statement
/// prepared per write costs a second round trip and a parse in PostgreSQL on every batch
/// (at 1,000 events/s apply writes about 140 batches a second).
struct Connection {
    client: Client,
    upserts: Mutex<HashMap<String, Statement>>,
}

impl std::ops::Deref for Connection {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

mod purge;

/// How one aggregate type is laid out in its table.
enum Layout<'a> {
    Document,
    Columns(&'a ColumnTableConfig),
}

impl Layout<'_> {
    fn key_column(&self) -> String {
        match self {
            Layout::Document => quote_ident("id"),
            Layout::Columns(t) => quote_ident(&t.key_column),
        }
    }

    /// The payload paths of the mapped columns, bound as `text[]` parameters from `first`
    /// on (never spliced into the SQL).
    fn paths(&self) -> Vec<Vec<String>> {
        match self {
            Layout::Document => Vec::new(),
            Layout::Columns(t) => t.columns.iter().map(|c| c.path()).collect(),
        }
    }

    /// `(column list, value expressions over the jsonb `source`)`, paths from `$first`.
    fn value_columns(&self, source: &str, first: usize) -> (Vec<String>, Vec<String>) {
        match self {
            Layout::Document => (vec![quote_ident("doc")], vec![source.to_string()]),
            Layout::Columns(t) => t
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let path = format!("${}::text[]", first + i);
                    let value = match c.sql_type {
                        // JSON null stays SQL NULL, not the JSON value `null`.
                        ColumnType::Jsonb => format!("NULLIF({source} #> {path}, 'null'::jsonb)"),
                        other => format!("({source} #>> {path})::{}", other.sql()),
                    };
                    (quote_ident(&c.name), value)
                })
                .unzip(),
        }
    }

    /// The stored document as `scan`/`get` report it: the payload itself, or the mapped
    /// fields rebuilt into an object (`{field: value}`, dotted paths kept as keys).
    fn stored_document(&self) -> String {
        match self {
            Layout::Document => "doc".into(),
            Layout::Columns(t) => {
                let pairs: Vec<String> = t
                    .columns
                    .iter()
                    .map(|c| {
                        format!(
                            "{}, to_jsonb({})",
                            quote_literal(c.field_name()),
                            quote_ident(&c.name)
                        )
                    })
                    .collect();
                format!("jsonb_build_object({})", pairs.join(", "))
            }
        }
    }
}

/// A SQL string literal (for the field names of a rebuilt document).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl PostgresSink {
    pub async fn connect(config: &PostgresSinkConfig) -> Result<Self, Error> {
        let sink = Self {
            connection: Mutex::new(None),
            purge_connection: Mutex::new(None),
            url: config.url.expose().to_string(),
            schema: config.schema.clone(),
            column_tables: config.tables.clone(),
            known_tables: Mutex::new(HashSet::new()),
            statement_timeout_ms: config.timeout_ms,
        };
        let client = sink.client().await?;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(&sink.schema)
            ))
            .await
            .or_else(ignore_concurrent_create)?;
        // `settled` and `pending_since` came with the two-phase purge: a horizon row written
        // before it has deleted everything up to `version` already (settled = version).
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {h} (namespace text PRIMARY KEY, version bigint NOT NULL,
                    settled bigint, pending_since timestamptz);
                 ALTER TABLE {h} ADD COLUMN IF NOT EXISTS settled bigint,
                    ADD COLUMN IF NOT EXISTS pending_since timestamptz",
                h = sink.horizon_table()
            ))
            .await
            .or_else(ignore_concurrent_create)?;
        Ok(sink)
    }

    /// The records of `namespace` matching `condition` (SQL where `{key}` stands for the key
    /// column), as `scan` and `get_many` report them; none when the table does not exist.
    async fn records(
        &self,
        namespace: &str,
        condition: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<StoredRecord>, Error> {
        let client = self.client().await?;
        let table = self.table(namespace);
        if !table_exists(&client, &table).await? {
            return Ok(Vec::new());
        }
        let layout = self.layout(namespace);
        let sql = format!(
            "SELECT {key}, version, CASE WHEN deleted THEN NULL ELSE {doc} END FROM {table} WHERE {condition}",
            key = layout.key_column(),
            doc = layout.stored_document(),
            condition = condition.replace("{key}", &layout.key_column()),
        );
        let rows = client.query(&sql, params).await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// The shared connection, reconnecting when the last one broke (its prepared statements
    /// go with it).
    async fn client(&self) -> Result<Arc<Connection>, Error> {
        Self::connection(&self.connection, &self.url, self.statement_timeout_ms).await
    }

    /// `slot`'s connection, reconnecting when the last one broke; every statement on it is
    /// bounded by `statement_timeout_ms` (the sink's deadline).
    async fn connection(
        slot: &Mutex<Option<Arc<Connection>>>,
        url: &str,
        statement_timeout_ms: u64,
    ) -> Result<Arc<Connection>, Error> {
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let client = crate::pg::connect(url).await?;
        client
            .batch_execute(&format!("SET statement_timeout = {statement_timeout_ms}"))
            .await?;
        let connection = Arc::new(Connection {
            client,
            upserts: Mutex::new(HashMap::new()),
        });
        *guard = Some(connection.clone());
        Ok(connection)
    }

    /// `namespace`'s upsert, prepared on `connection` the first time it is needed there. The
    /// cache stays locked while it prepares, so concurrent shares prepare it once.
    async fn upsert(&self, connection: &Connection, namespace: &str) -> Result<Statement, Error> {
        let mut upserts = connection.upserts.lock().await;
        if let Some(statement) = upserts.get(namespace) {
            return Ok(statement.clone());
        }
        let statement = connection.prepare(&self.upsert_sql(namespace)).await?;
        upserts.insert(namespace.to_string(), statement.clone());
        Ok(statement)
    }

    /// One batch into `namespace`'s table: `$1..$4` the records' keys, documents, versions
    /// and deletion flags, `$5` the namespace, then the mapped columns' payload paths.
    /// Returns `(key, horizon)` per record: `horizon` NULL for a record written, the horizon
    /// for one refused as below it; the records not returned were stale.
    ///
    /// Above the horizon a record is upserted. At or below it a record may only update a row
    /// the table holds: `UPDATE` re-checks a row another session deleted meanwhile (a purge),
    /// where an insert would re-create it. Such a record is refused when the statement's
    /// snapshot holds no row of its key at least as new (absent, or deleted meanwhile); a
    /// delete of a key the table does not hold is stale (absent is what it asks for).
    fn upsert_sql(&self, namespace: &str) -> String {
        let layout = self.layout(namespace);
        let (columns, values) = layout.value_columns("u.doc", 6);
        let updates: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        let sets: Vec<String> = columns
            .iter()
            .zip(&values)
            .map(|(c, v)| format!("{c} = {v}"))
            .collect();
        format!(
            "WITH u AS (
               SELECT * FROM unnest($1::text[], $2::jsonb[], $3::int8[], $4::bool[]) AS u(id, doc, version, deleted)),
             h AS (
               SELECT COALESCE((SELECT h.version FROM {horizon} h WHERE h.namespace = $5), -1) AS version),
             updated AS (
               UPDATE {t} AS t SET {sets}, version = u.version, deleted = u.deleted, updated_at = now()
               FROM u, h
               WHERE u.version <= h.version AND t.{key} = u.id AND t.version < u.version
               RETURNING t.{key} AS id),
             inserted AS (
               INSERT INTO {t} AS t ({key}, {columns}, version, deleted, updated_at)
               SELECT u.id, {values}, u.version, u.deleted, now() FROM u, h WHERE u.version > h.version
               ON CONFLICT ({key}) DO UPDATE
                 SET {updates}, version = EXCLUDED.version,
                     deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at
                 WHERE t.version < EXCLUDED.version
               RETURNING t.{key} AS id)
             SELECT id, NULL::int8 FROM updated
             UNION ALL SELECT id, NULL::int8 FROM inserted
             UNION ALL SELECT u.id, h.version FROM u, h
               WHERE u.version <= h.version AND NOT u.deleted
                 AND u.id NOT IN (SELECT id FROM updated)
                 AND NOT EXISTS (SELECT 1 FROM {t} e WHERE e.{key} = u.id AND e.version >= u.version)",
            t = self.table(namespace),
            horizon = self.horizon_table(),
            key = layout.key_column(),
            columns = columns.join(", "),
            values = values.join(", "),
            updates = updates.join(", "),
            sets = sets.join(", "),
        )
    }

    /// Per aggregate type, the purge horizon: `version`, the highest version of any tombstone
    /// the purge may delete (in force for every write from the moment it is raised), `settled`
    /// (tombstones up to it may be deleted now: it has been in force for the purge's grace)
    /// and `pending_since` (when `version` was raised above `settled`). An event at or below
    /// `version` for a key the table does not hold may be older than a purged delete: it is
    /// refused (dead-lettered), never written, so nothing deleted comes back.
    fn horizon_table(&self) -> String {
        format!("{}.dualsync_purge_horizon", quote_ident(&self.schema))
    }

    fn layout(&self, namespace: &str) -> Layout<'_> {
        match self.column_tables.get(namespace) {
            Some(t) => Layout::Columns(t),
            None => Layout::Document,
        }
    }

    fn table(&self, namespace: &str) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.schema),
            quote_ident(self.table_name(namespace))
        )
    }

    fn table_name<'a>(&'a self, namespace: &'a str) -> &'a str {
        match self.layout(namespace) {
            Layout::Columns(ColumnTableConfig { table: Some(t), .. }) => t.as_str(),
            _ => namespace,
        }
    }

    async fn ensure_table(&self, client: &Client, namespace: &str) -> Result<(), Error> {
        if self.known_tables.lock().await.contains(namespace) {
            return Ok(());
        }
        let table = self.table(namespace);
        let layout = self.layout(namespace);
        let value_columns = match layout {
            Layout::Document => "doc jsonb,".to_string(),
            Layout::Columns(t) => t
                .columns
                .iter()
                .map(|c| format!("{} {},", quote_ident(&c.name), c.sql_type.sql()))
                .collect::<Vec<_>>()
                .join("\n"),
        };
        let index = format!("{}_tombstones", self.table_name(namespace));
        // A table (re)created here starts with no purge horizon: its horizon row, if any, is
        // a dropped table's, and removing it in the same transaction lets a sink be rebuilt by
        // dropping the table and resetting the group. The partial index serves the purge; it is
        // looked up first, as `CREATE INDEX` locks out writes (also one that finds it exists).
        client
            .batch_execute(&format!(
                "DO $dualsync$ BEGIN
                   IF to_regclass({table_literal}) IS NULL THEN
                     CREATE TABLE {table} (
                       {key} text PRIMARY KEY,
                       {value_columns}
                       version bigint NOT NULL,
                       deleted boolean NOT NULL DEFAULT false,
                       updated_at timestamptz NOT NULL DEFAULT now());
                     DELETE FROM {horizon} WHERE namespace = {namespace_literal};
                   END IF;
                   IF to_regclass({index_literal}) IS NULL THEN
                     CREATE INDEX IF NOT EXISTS {index} ON {table} (updated_at) WHERE deleted;
                   END IF;
                 END $dualsync$",
                key = layout.key_column(),
                table_literal = quote_literal(&table),
                horizon = self.horizon_table(),
                namespace_literal = quote_literal(namespace),
                index = quote_ident(&index),
                index_literal = quote_literal(&format!(
                    "{}.{}",
                    quote_ident(&self.schema),
                    quote_ident(&index)
                )),
            ))
            .await
            .or_else(ignore_concurrent_create)?;
        self.known_tables.lock().await.insert(namespace.to_string());
        Ok(())
    }
}

impl Sink for PostgresSink {
    /// Forgets the connection: a call on it got no answer, so it may be half-open.
    async fn reset(&self) {
        self.connection.lock().await.take();
    }

    async fn apply(&self, batch: &[SinkRecord]) -> Result<ApplyOutcome, Error> {
        let (kept, dropped) = newest_per_key(batch);
        let mut by_table: BTreeMap<&str, Vec<(usize, &SinkRecord)>> = BTreeMap::new();
        for i in kept {
            by_table
                .entry(&batch[i].namespace)
                .or_default()
                .push((i, &batch[i]));
        }
        let client = self.client().await?;
        let mut outcome = ApplyOutcome {
            stale: dropped,
            ..Default::default()
        };
        for (namespace, records) in by_table {
            self.ensure_table(&client, namespace).await?;
            let layout = self.layout(namespace);
            let ids: Vec<&str> = records.iter().map(|(_, r)| r.key.as_str()).collect();
            let docs: Vec<Option<&serde_json::Value>> =
                records.iter().map(|(_, r)| r.document.as_ref()).collect();
            let versions: Vec<i64> = records.iter().map(|(_, r)| r.version).collect();
            let deleted: Vec<bool> = records.iter().map(|(_, r)| r.document.is_none()).collect();
            let upsert = self.upsert(&client, namespace).await?;
            let paths = layout.paths();
            let mut params: Vec<&(dyn ToSql + Sync)> =
                vec![&ids, &docs, &versions, &deleted, &namespace];
            params.extend(paths.iter().map(|p| p as &(dyn ToSql + Sync)));
            // Keys are unique here (newest_per_key): the returned keys name the records.
            let returned: HashMap<String, Option<i64>> = client
                .query(&upsert, &params)
                .await?
                .into_iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            for (i, r) in &records {
                match returned.get(&r.key) {
                    Some(None) => outcome.written.push(*i),
                    Some(Some(horizon)) => outcome.rejected.push((
                        *i,
                        Error::BelowPurgeHorizon {
                            namespace: r.namespace.clone(),
                            key: r.key.clone(),
                            version: r.version,
                            horizon: *horizon,
                        },
                    )),
                    None => outcome.stale += 1,
                }
            }
        }
        Ok(outcome)
    }

    async fn purge_tombstones(&self, older_than: Duration, grace: Duration) -> Result<u64, Error> {
        let client =
            Self::connection(&self.purge_connection, &self.url, self.statement_timeout_ms).await?;
        self.discover_tables(&client).await?;
        let tables: Vec<String> = self.known_tables.lock().await.iter().cloned().collect();
        let mut purged = 0;
        for namespace in tables {
            purged += self
                .purge_namespace(&client, &namespace, older_than, grace)
                .await?;
        }
        Ok(purged)
    }
}

impl SinkReader for PostgresSink {
    async fn scan(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        self.records(
            namespace,
            "$1::text IS NULL OR {key} > $1 ORDER BY {key} LIMIT $2",
            &[&after, &(limit as i64)],
        )
        .await
    }

    async fn get_many(&self, namespace: &str, keys: &[String]) -> Result<Vec<StoredRecord>, Error> {
        self.records(namespace, "{key} = ANY($1)", &[&keys]).await
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
        let layout = self.layout(namespace);
        let sql = format!(
            "SELECT version, CASE WHEN deleted THEN NULL ELSE {doc} END FROM {table} WHERE {key} = $1",
            key = layout.key_column(),
            doc = layout.stored_document(),
        );
        let row = client.query_opt(&sql, &[&key]).await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// A column table's documents are cast into the mapped columns with the write path's
    /// casts and rebuilt as `scan` reports stored rows; `None` for a document that does not
    /// cast (apply would have dead-lettered it).
    async fn project(
        &self,
        namespace: &str,
        docs: &[serde_json::Value],
    ) -> Result<Vec<Option<serde_json::Value>>, Error> {
        let layout = self.layout(namespace);
        if matches!(layout, Layout::Document) {
            return Ok(docs.iter().cloned().map(Some).collect());
        }
        let client = self.client().await?;
        let (_, values) = layout.value_columns("u.doc", 2);
        // Rebuilt with the same casts as the write path and rendered like `scan` does.
        let rebuilt = match &layout {
            Layout::Columns(t) => t
                .columns
                .iter()
                .zip(&values)
                .map(|(c, v)| format!("{}, to_jsonb({v})", quote_literal(c.field_name())))
                .collect::<Vec<_>>()
                .join(", "),
            Layout::Document => unreachable!(),
        };
        let sql = format!(
            "SELECT jsonb_build_object({rebuilt}) FROM unnest($1::jsonb[]) WITH ORDINALITY AS u(doc, n) ORDER BY n"
        );
        let paths = layout.paths();
        match query_projection(&client, &sql, &paths, docs).await {
            Ok(all) => Ok(all.into_iter().map(Some).collect()),
            // Some document does not cast: project one by one to find which.
            Err(e) if classify(&e) == Disposition::DeadLetter => {
                let mut out = Vec::with_capacity(docs.len());
                for doc in docs {
                    match query_projection(&client, &sql, &paths, std::slice::from_ref(doc)).await {
                        Ok(mut one) => out.push(one.pop()),
                        Err(e) if classify(&e) == Disposition::DeadLetter => out.push(None),
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }
}

async fn query_projection(
    client: &Client,
    sql: &str,
    paths: &[Vec<String>],
    docs: &[serde_json::Value],
) -> Result<Vec<serde_json::Value>, Error> {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&docs];
    params.extend(paths.iter().map(|p| p as &(dyn ToSql + Sync)));
    let rows = client.query(sql, &params).await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
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
        // Two sessions creating the same table at once: the loser fails on the catalog's
        // unique index, on the table's row type already existing (42710), or on the
        // relation or schema itself (42P07, 42P06: seen in a CI run on 2026-12-04).
        Some(c)
            if *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                || *c == tokio_postgres::error::SqlState::DUPLICATE_OBJECT
                || *c == tokio_postgres::error::SqlState::DUPLICATE_TABLE
                || *c == tokio_postgres::error::SqlState::DUPLICATE_SCHEMA =>
        {
            Ok(())
        }
        _ => Err(e),
    }
}
