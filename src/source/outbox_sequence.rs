//! The outbox sequence against the versions already published: versions are the outbox
//! `seq`, so a sequence that went backwards (a failover to an asynchronous standby that lost
//! the last transactions, a re-created outbox) hands out versions the sinks already hold.
//! These are the checks the relay makes at every take-over and backlog sample, and the
//! renumbering `dualsync outbox resequence` does.

use tokio_postgres::Client;
use uuid::Uuid;

use crate::error::Error;

/// The `seq` the next outbox insert draws.
pub async fn next_seq(client: &Client) -> Result<i64, Error> {
    Ok(client
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END
             FROM dualsync.outbox_seq",
            &[],
        )
        .await?
        .get(0))
}

/// Outbox rows at one of the `published` versions with another event id than the one
/// published at it: `(seq, outbox row's id, published id)`. A row at a published version with
/// the same id is the same event (published again after a lost mark): not a re-use.
pub async fn reused(
    client: &Client,
    published: &[(i64, Uuid)],
) -> Result<Vec<(i64, Uuid, Uuid)>, Error> {
    if published.is_empty() {
        return Ok(Vec::new());
    }
    let seqs: Vec<i64> = published.iter().map(|(v, _)| *v).collect();
    let rows = client
        .query(
            "SELECT seq, id FROM dualsync.outbox WHERE seq = ANY($1)",
            &[&seqs],
        )
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, id): (i64, Uuid) = (row.get(0), row.get(1));
        if let Some((_, other)) = published.iter().find(|(v, p)| *v == seq && *p != id) {
            out.push((seq, id, *other));
        }
    }
    out.sort();
    Ok(out)
}

/// What [`renumber`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renumbered {
    /// Unpublished rows given new `seq`s.
    pub rows: u64,
    /// The first new `seq` (the rows got `first ..`, in their old order).
    pub first: i64,
    /// The `seq` the next insert draws.
    pub next: i64,
}

/// Moves the outbox past `published_max`, in one transaction that holds writers and relays
/// off the table: every unpublished row, in `seq` order, gets a new `seq` above both
/// `published_max` and every `seq` in the table (so each aggregate keeps its order and no
/// row keeps a version a sink may already hold), and the sequence continues after them.
/// Published rows keep theirs (they are only waiting for the purge). Applies the outbox DDL
/// first (idempotent, as `outbox migrate`), for the trigger that allows this renumbering.
pub async fn renumber(client: &mut Client, published_max: i64) -> Result<Renumbered, Error> {
    // The outbox's immutability trigger lets `seq` change only with this transaction's
    // setting: bring an outbox migrated by an older version up to date first (keeping the
    // writers' trigger of its capture mode).
    super::wal::setup::reapply_ddl(client).await?;
    let tx = client.transaction().await?;
    // Blocks inserts and the relays' marks until the commit; reads go on.
    tx.batch_execute(
        "LOCK TABLE dualsync.outbox IN SHARE ROW EXCLUSIVE MODE;
         SET LOCAL dualsync.resequence = 'on'",
    )
    .await?;
    let above: i64 = tx
        .query_one(
            "SELECT greatest($1::int8, coalesce(max(seq), 0), (SELECT last_value FROM dualsync.outbox_seq))
             FROM dualsync.outbox",
            &[&published_max],
        )
        .await?
        .get(0);
    // New values are all above every existing seq, so the primary key never collides.
    let rows = tx
        .execute(
            "UPDATE dualsync.outbox o SET seq = $1 + n.rank
             FROM (SELECT seq, row_number() OVER (ORDER BY seq) AS rank
                   FROM dualsync.outbox WHERE published_at IS NULL) n
             WHERE o.seq = n.seq",
            &[&above],
        )
        .await?;
    let last = above + rows as i64;
    tx.query_one("SELECT setval('dualsync.outbox_seq', $1, true)", &[&last])
        .await?;
    tx.commit().await?;
    Ok(Renumbered {
        rows,
        first: above + 1,
        next: last + 1,
    })
}
