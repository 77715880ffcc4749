//! The PostgreSQL sink's tombstone purge ([`Sink::purge_tombstones`](crate::sink::Sink)), on
//! its own connection: two phases per table (raise the horizon; delete what it covers only a
//! grace later, in chunks), over every table of the sink schema, also those this process
//! never wrote.

use std::time::Duration;

use tokio_postgres::Client;

use super::PostgresSink;
use crate::error::Error;
use crate::sink::PURGE_CHUNK;

impl PostgresSink {
    /// One purge cycle of `namespace` (see [`Sink::purge_tombstones`](crate::sink::Sink)).
    pub(super) async fn purge_namespace(
        &self,
        client: &Client,
        namespace: &str,
        older_than: Duration,
        grace: Duration,
    ) -> Result<u64, Error> {
        let horizon = self.horizon_table();
        let table = self.table(namespace);
        let mut purged = 0;
        // A raise that has been in force for the grace settles: no write still running
        // read the horizon from before it.
        let settled: Option<i64> = client
            .query_opt(
                &format!(
                    "UPDATE {horizon} SET settled = version, pending_since = NULL
                     WHERE namespace = $1 AND pending_since <= now() - make_interval(secs => $2)
                     RETURNING settled"
                ),
                &[&namespace, &grace.as_secs_f64()],
            )
            .await?
            .map(|r| r.get(0));
        let settled: Option<i64> = match settled {
            Some(v) => Some(v),
            None => client
                .query_opt(
                    &format!(
                        "SELECT COALESCE(settled, version) FROM {horizon} WHERE namespace = $1"
                    ),
                    &[&namespace],
                )
                .await?
                .map(|r| r.get(0)),
        };
        if let Some(settled) = settled {
            purged += self
                .delete_tombstones(client, &table, settled, older_than)
                .await?;
        }
        // Raise the horizon over the tombstones now past the retention, unless a raise is
        // still pending (one at a time, so a steady stream of deletes cannot keep
        // postponing the settlement).
        client
            .execute(
                &format!(
                    "INSERT INTO {horizon} AS h (namespace, version, settled, pending_since)
                     SELECT $1, max(version), -1, now() FROM {table}
                     WHERE deleted AND updated_at < now() - make_interval(secs => $2)
                     HAVING max(version) IS NOT NULL
                     ON CONFLICT (namespace) DO UPDATE
                       SET settled = COALESCE(h.settled, h.version),
                           version = EXCLUDED.version, pending_since = EXCLUDED.pending_since
                       WHERE h.pending_since IS NULL AND h.version < EXCLUDED.version"
                ),
                &[&namespace, &older_than.as_secs_f64()],
            )
            .await?;
        Ok(purged)
    }

    /// Adds the sink's tables that this process has not written yet (an idle or restarted
    /// member) to the known ones, so its purge covers them: every table of the schema with
    /// the sink's bookkeeping columns.
    pub(super) async fn discover_tables(&self, client: &Client) -> Result<(), Error> {
        let rows = client
            .query(
                "SELECT table_name::text FROM information_schema.columns
                 WHERE table_schema = $1 AND column_name IN ('version', 'deleted', 'updated_at')
                 GROUP BY table_name HAVING count(*) = 3",
                &[&self.schema],
            )
            .await?;
        for row in rows {
            let name: String = row.get(0);
            let namespace = self
                .column_tables
                .iter()
                .find(|(ns, t)| t.table.as_deref().unwrap_or(ns.as_str()) == name)
                .map(|(ns, _)| ns.clone())
                .unwrap_or(name);
            self.ensure_table(client, &namespace).await?;
        }
        Ok(())
    }

    /// Deletes `table`'s tombstones older than `older_than` at or below `settled`, a chunk per
    /// statement (each a short transaction: apply's writes on the same connection wait behind
    /// one chunk at most).
    async fn delete_tombstones(
        &self,
        client: &Client,
        table: &str,
        settled: i64,
        older_than: Duration,
    ) -> Result<u64, Error> {
        let delete = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM {table}
               WHERE deleted AND updated_at < now() - make_interval(secs => $1) AND version <= $2
               LIMIT $3))
             AND deleted AND version <= $2"
        );
        let mut purged = 0;
        loop {
            let n = client
                .execute(
                    &delete,
                    &[&older_than.as_secs_f64(), &settled, &PURGE_CHUNK],
                )
                .await?;
            purged += n;
            if n < PURGE_CHUNK as u64 {
                return Ok(purged);
            }
        }
    }
}
