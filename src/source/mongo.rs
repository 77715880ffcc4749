//! The MongoDB change-stream source.
//! (Over 600 lines: MongoSource's stream, lease and snapshot phases share its private state.)
//!
//! Where the position lives, and why: one document per pipeline in `source.offsets_collection`
//! of the watched database (`{_id: <pipeline>, owner, expires_at, token | start_at}`). It
//! survives restarts like the data it describes, needs no Kafka consumer at start-up, an
//! operator can read or reset it with any MongoDB shell, and it doubles as the leader lease:
//! the token is only ever saved with a filter on `owner`, so a relay that lost its lease cannot
//! move the position. The collection is filtered out of the stream.
//!
//! Why nothing is skipped: the token saved is that of the last change of a batch, written only
//! after Kafka acknowledged every message of the batch ([`Source::ack`]); after a crash the
//! stream resumes *after* that token, so at worst the unacknowledged batch is published again,
//! which apply's version guard absorbs. When idle, with no batch pending, the stream's
//! post-batch token is saved too, so a quiet collection in a busy database does not let its
//! position fall out of the oplog.
//!
//! Snapshot: the start time `T` is taken first, then every watched collection is read and
//! published as `snapshot` events with version `version_of(T) - 1`, and the stream then starts
//! at `T`: a change made during the snapshot is both in what was read (perhaps) and in the
//! stream (surely), and the stream's version is higher, so the sink converges. `T` is saved
//! when the snapshot begins (`snapshot_from`), and a snapshot interrupted by a crash or a
//! lost lease is taken again from that same `T`: a document the first attempt published and
//! that was deleted before the second began is in neither the second's reads nor a stream
//! started later, so only a stream from the first `T` delivers its delete (it did not, and
//! the sinks kept the document).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType, WriteConcern};
use mongodb::{Client, Collection, Cursor, Database};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::leader_lease::LeaderLease;
use super::mongo_change::{parse_event, MongoChange, NotPublished};
use super::mongo_offsets::{
    keep_lease, read_position, server_expiry, try_lease, Position, TxnPlace,
};
use super::mongo_reads::{cluster_time, read_collection, watched_collections};
use super::resume_token;
use super::Source;
use crate::config::{MongoSourceConfig, OnHistoryLost};
use crate::error::Error;
use crate::metrics::Health;

/// Server codes meaning the saved position can no longer be resumed from.
const HISTORY_LOST_CODES: &[i32] = &[
    280, // ChangeStreamFatalError ("resume token was not found")
    286, // ChangeStreamHistoryLost
];

/// What the leader does next.
enum Phase {
    /// Reading the collections' documents; the stream starts at `start_at` afterwards.
    Snapshot {
        start_at: Timestamp,
        pending: VecDeque<String>,
        cursor: Option<Box<(String, Cursor<Document>)>>,
        finished: bool,
    },
    /// Changes come from the reader task (see [`read_stream`]).
    Streaming(StreamReader),
}

/// The change stream, read ahead by a task into a bounded channel: the relay takes what has
/// arrived without waiting for the driver's next round trip, and the task alone touches the
/// cursor (the driver forbids reading the resume token while a `getMore` is in flight).
struct StreamReader {
    items: mpsc::Receiver<Result<StreamItem, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum StreamItem {
    Change(Box<Document>),
    /// A round trip returned nothing: everything before this token has been delivered.
    Idle(Document),
}

/// Reads `stream` until the receiver goes away, forwarding each event, an idle marker with
/// the post-batch token after an empty round trip, and the first error (then stops).
async fn read_stream(
    mut stream: ChangeStream<Document>,
    items: mpsc::Sender<Result<StreamItem, Error>>,
) {
    loop {
        let item = match stream.next_if_any().await {
            Ok(Some(event)) => Ok(StreamItem::Change(Box::new(event))),
            Ok(None) if !stream.is_alive() => Err(Error::HistoryLost(
                "the change stream was closed by the server".into(),
            )),
            Ok(None) => match stream
                .resume_token()
                .map(|t| mongodb::bson::to_document(&t))
            {
                Some(Ok(token)) => Ok(StreamItem::Idle(token)),
                Some(Err(e)) => Err(Error::Bson {
                    what: "resume token",
                    source: e.into(),
                }),
                None => continue,
            },
            Err(e) => Err(history_lost_or(e)),
        };
        let failed = item.is_err();
        if items.send(item).await.is_err() || failed {
            return;
        }
    }
}

/// The leader's session: holds the lease, reads changes, saves the position.
pub struct MongoSource {
    config: MongoSourceConfig,
    db: Database,
    offsets: Collection<Document>,
    pipeline: String,
    owner: String,
    phase: Phase,
    last_renewal: Instant,
    /// Fired by the lease keeper when another relay took the lease over.
    lease_lost: CancellationToken,
    /// Until when this relay may publish as the leader: three quarters of `lease_secs` after
    /// its last confirmed renewal, so it stops before a standby can take the lease.
    lease: Arc<LeaderLease>,
    /// Stops the lease keeper when this source is dropped or releases the lease.
    keeper: tokio_util::sync::DropGuard,
    saved_token: Option<Document>,
    /// Cluster time and position in its transaction of the last change read from the stream.
    placed: Option<TxnPlace>,
    /// An error the reader reported after changes still to publish; returned next time.
    deferred: Option<Error>,
    /// Stream batches returned and not acknowledged yet: while any is, an idle round trip's
    /// post-batch token (past them) must not be saved.
    unacked: usize,
}

impl MongoSource {
    /// Connects and waits until this process holds the pipeline's lease (standby until then).
    /// `Ok(None)` when cancelled while waiting.
    pub async fn acquire_leadership(
        config: &MongoSourceConfig,
        pipeline: &str,
        health: &Health,
        cancel: &CancellationToken,
    ) -> Result<Option<Self>, Error> {
        let client = crate::telemetry::mongo_client(config.url.expose(), "source.url").await?;
        Self::acquire_leadership_on(&client, config, pipeline, health, cancel).await
    }

    /// [`Self::acquire_leadership`] through a client of the caller's (one with command
    /// monitoring, in the tests that pin what is sent to the server).
    pub async fn acquire_leadership_on(
        client: &Client,
        config: &MongoSourceConfig,
        pipeline: &str,
        health: &Health,
        cancel: &CancellationToken,
    ) -> Result<Option<Self>, Error> {
        let db = client.database(&config.database);
        db.run_command(doc! {"ping": 1}).await?;
        let offsets = db.collection_with_options::<Document>(
            &config.offsets_collection,
            mongodb::options::CollectionOptions::builder()
                .write_concern(WriteConcern::majority())
                .build(),
        );
        health.set_database_up(true);
        health.recovered();
        health.set_started();
        let owner = format!(
            "{}/{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".into()),
            uuid::Uuid::new_v4().simple()
        );
        let mut announced = false;
        let lease = Arc::new(LeaderLease::new(Duration::from_secs(config.lease_secs)));
        loop {
            let sent = Instant::now();
            if try_lease(&offsets, pipeline, &owner, config).await? {
                lease.confirm(sent);
                tracing::info!(pipeline, "relay is the active leader");
                break;
            }
            if !announced {
                tracing::info!(
                    pipeline,
                    "another relay holds the lease; waiting as standby"
                );
                announced = true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        // The lease is renewed by a task of its own, so nothing slow on the leader's path
        // (opening the stream on a loaded server, a long snapshot batch, a pause) lets it expire.
        let (lease_lost, keeper_stop) = (CancellationToken::new(), CancellationToken::new());
        tokio::spawn(keep_lease(
            offsets.clone(),
            pipeline.to_string(),
            owner.clone(),
            config.clone(),
            lease_lost.clone(),
            lease.clone(),
            keeper_stop.clone(),
        ));
        let mut source = Self {
            config: config.clone(),
            db,
            offsets,
            pipeline: pipeline.to_string(),
            owner,
            phase: Phase::Snapshot {
                start_at: Timestamp {
                    time: 0,
                    increment: 0,
                },
                pending: VecDeque::new(),
                cursor: None,
                finished: true,
            },
            last_renewal: Instant::now(),
            lease_lost: lease_lost.clone(),
            lease,
            keeper: keeper_stop.clone().drop_guard(),
            saved_token: None,
            placed: None,
            deferred: None,
            unacked: 0,
        };
        match read_position(&source.offsets, pipeline).await? {
            Some(Position::After(token, place)) => {
                tracing::info!(pipeline, "resuming the change stream after the saved token");
                source.saved_token = Some(token.clone());
                source.placed = place;
                match source.open(Some(token), None).await {
                    Ok(reader) => source.phase = Phase::Streaming(reader),
                    Err(Error::HistoryLost(why))
                        if config.on_history_lost == OnHistoryLost::Resnapshot =>
                    {
                        tracing::error!(reason = %why, "change stream history lost: taking a new snapshot (on_history_lost = \"resnapshot\")");
                        source.begin_snapshot(None).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            Some(Position::Snapshot(from)) => {
                tracing::info!(
                    pipeline,
                    ?from,
                    "an earlier snapshot did not finish: taking it again from its start"
                );
                source.begin_snapshot(Some(from)).await?;
            }
            Some(Position::At(at)) => {
                tracing::info!(
                    pipeline,
                    ?at,
                    "starting the change stream at the saved time"
                );
                source.phase = Phase::Streaming(source.open(None, Some(at)).await?);
            }
            None if config.snapshot_on_start => source.begin_snapshot(None).await?,
            None => {
                let now = cluster_time(&source.db).await?;
                tracing::info!(
                    pipeline,
                    ?now,
                    "no saved position: streaming changes from now"
                );
                source.phase = Phase::Streaming(source.open(None, Some(now)).await?);
                source.save(Position::At(now)).await?;
            }
        }
        Ok(Some(source))
    }

    /// Starts (or restarts, after lost history) with a snapshot of the watched collections,
    /// from `interrupted`'s start when an earlier attempt did not finish, else from now; saves
    /// that start before reading anything.
    pub async fn begin_snapshot(&mut self, interrupted: Option<Timestamp>) -> Result<(), Error> {
        let start_at = match interrupted {
            Some(at) => at,
            None => cluster_time(&self.db).await?,
        };
        self.save(Position::Snapshot(start_at)).await?;
        self.placed = None;
        self.unacked = 0;
        let pending: VecDeque<String> = watched_collections(&self.db, &self.config, &[])
            .await?
            .into();
        tracing::info!(collections = ?pending, ?start_at, "snapshot of the watched collections started");
        self.phase = Phase::Snapshot {
            start_at,
            pending,
            cursor: None,
            finished: false,
        };
        Ok(())
    }

    async fn open(
        &mut self,
        resume_after: Option<Document>,
        start_at: Option<Timestamp>,
    ) -> Result<StreamReader, Error> {
        let token = match resume_after {
            Some(t) => Some(
                mongodb::bson::from_bson::<ResumeToken>(Bson::Document(t)).map_err(|e| {
                    Error::Bson {
                        what: "saved resume token is unreadable",
                        source: e.into(),
                    }
                })?,
            ),
            None => None,
        };
        let mut watch = self
            .db
            .watch()
            .pipeline([doc! {"$match": self.stream_filter()}])
            .full_document(FullDocumentType::UpdateLookup)
            // Pre-images of collections that keep them (changeStreamPreAndPostImages), for
            // consumers that want a deleted document's last state; null elsewhere.
            .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
            .max_await_time(Duration::from_millis(self.config.max_await_ms))
            .batch_size(self.config.batch_size.min(u32::MAX as usize) as u32);
        if token.is_some() {
            watch = watch.resume_after(token);
        } else if let Some(at) = start_at {
            watch = watch.start_at_operation_time(at);
        }
        let stream = watch
            .await
            .map_err(history_lost_or)?
            .with_type::<Document>();
        let (tx, items) = mpsc::channel(self.config.batch_size.clamp(16, 4096));
        Ok(StreamReader {
            items,
            task: tokio::spawn(read_stream(stream, tx)),
        })
    }

    /// Server-side filter: the watched collections, never the offsets collection. DDL and
    /// invalidate events pass (they have no `ns.coll` or must be seen).
    fn stream_filter(&self) -> Document {
        let c = &self.config;
        let coll = if !c.collections.is_empty() {
            doc! {"$in": c.collections.clone()}
        } else {
            let mut excluded = c.exclude_collections.clone();
            excluded.push(c.offsets_collection.clone());
            doc! {"$nin": excluded}
        };
        doc! {"$or": [
            {"ns.coll": coll},
            {"operationType": {"$nin": ["insert", "update", "replace", "delete"]}},
        ]}
    }

    /// Gives the lease up (on a clean stop), so a standby takes over without waiting for it to
    /// expire. Best effort: an expired lease is taken over anyway.
    pub async fn release(&mut self) {
        std::mem::replace(&mut self.keeper, CancellationToken::new().drop_guard())
            .disarm()
            .cancel();
        let released = self
            .offsets
            .update_one(
                doc! {"_id": &self.pipeline, "owner": &self.owner},
                vec![doc! {"$set": {"expires_at": "$$NOW"}}],
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the relay lease; it expires by itself");
        }
    }

    /// Why the position could not be saved: another relay holds the lease, or the document
    /// is gone (deleted, or its database dropped), and with it the position.
    async fn why_not_saved(&mut self) -> Error {
        match self.offsets.find_one(doc! {"_id": &self.pipeline}).await {
            Ok(None) => Error::HistoryLost(format!(
                "this pipeline's position document ({}.{} _id {:?}) was deleted while the relay ran (was the database dropped?)",
                self.config.database, self.config.offsets_collection, self.pipeline
            )),
            Ok(Some(_)) => Error::LeaseLost(self.pipeline.clone()),
            Err(e) => e.into(),
        }
    }

    /// Until when this relay may publish as the leader (see [`LeaderLease`]).
    pub fn lease(&self) -> Arc<LeaderLease> {
        self.lease.clone()
    }

    /// How often the lease is renewed: a third of it.
    pub fn renewal_interval(&self) -> Duration {
        Duration::from_secs(self.config.lease_secs) / 3
    }

    /// Renews the lease when a third of it has passed; [`Error::LeaseLost`] when another relay
    /// took it. Called for every batch, and while paused (a paused leader is still the leader).
    pub async fn renew_if_due(&mut self) -> Result<(), Error> {
        if self.lease_lost.is_cancelled() {
            return Err(Error::LeaseLost(self.pipeline.clone()));
        }
        if self.last_renewal.elapsed() < self.renewal_interval() {
            return Ok(());
        }
        let sent = Instant::now();
        if !try_lease(&self.offsets, &self.pipeline, &self.owner, &self.config).await? {
            return Err(Error::LeaseLost(self.pipeline.clone()));
        }
        self.lease.confirm(sent);
        self.last_renewal = Instant::now();
        Ok(())
    }

    /// Saves the position, fenced by the lease: fails with [`Error::LeaseLost`] when another
    /// relay took over.
    async fn save(&mut self, position: Position) -> Result<(), Error> {
        let set = match &position {
            Position::After(token, place) => doc! {
                "token": token.clone(),
                "start_at": Bson::Null,
                "txn_place": place.map_or(Bson::Null, |(t, i)| Bson::Document(doc! {"t": t, "i": i as i64})),
                "snapshot_from": Bson::Null,
            },
            Position::At(at) => {
                doc! {"token": Bson::Null, "start_at": *at, "txn_place": Bson::Null, "snapshot_from": Bson::Null}
            }
            Position::Snapshot(from) => {
                doc! {"token": Bson::Null, "start_at": Bson::Null, "txn_place": Bson::Null, "snapshot_from": *from}
            }
        };
        // An update pipeline, so the renewal is in the server's time (as in `try_lease`); the
        // values are literals, never read as expressions.
        let mut set: Document = set
            .into_iter()
            .map(|(k, v)| (k, Bson::Document(doc! {"$literal": v})))
            .collect();
        set.insert("updated_at", "$$NOW");
        set.insert("renewed_at", "$$NOW");
        set.insert("expires_at", server_expiry(&self.config));
        let sent = Instant::now();
        let result = self
            .offsets
            .update_one(
                doc! {"_id": &self.pipeline, "owner": &self.owner},
                vec![doc! {"$set": set}],
            )
            .await?;
        if result.matched_count == 0 {
            return Err(self.why_not_saved().await);
        }
        self.lease.confirm(sent);
        self.last_renewal = Instant::now();
        if let Position::After(token, _) = position {
            self.saved_token = Some(token);
        }
        Ok(())
    }

    async fn next_snapshot_batch(&mut self) -> Result<Vec<MongoChange>, Error> {
        let Phase::Snapshot {
            start_at,
            pending,
            cursor,
            finished,
        } = &mut self.phase
        else {
            unreachable!("called in the snapshot phase")
        };
        let mut batch = Vec::new();
        while batch.len() < self.config.batch_size {
            if cursor.is_none() {
                let Some(collection) = pending.pop_front() else {
                    *finished = true;
                    break;
                };
                let found = read_collection(&self.db, &collection).await?;
                *cursor = Some(Box::new((collection, found)));
            }
            let (collection, docs) = &mut **cursor.as_mut().expect("set above");
            match docs.try_next().await? {
                Some(document) => batch.push(MongoChange::snapshot(
                    &self.config.database,
                    collection,
                    document,
                    *start_at,
                )),
                None => {
                    tracing::info!(collection = %collection, "snapshot of collection read");
                    *cursor = None;
                }
            }
        }
        Ok(batch)
    }

    async fn next_stream_batch(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Vec<MongoChange>, Error> {
        let Phase::Streaming(reader) = &mut self.phase else {
            unreachable!("called in the streaming phase")
        };
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let mut batch = Vec::new();
        let mut idle_token = None;
        // Wait for the first item, then take only what has already arrived.
        let mut next = tokio::select! {
            _ = cancel.cancelled() => return Ok(batch),
            item = reader.items.recv() => item,
        };
        loop {
            let raw = match next {
                None => {
                    return Err(Error::Internal("the change stream reader stopped".into()));
                }
                Some(Err(e)) if batch.is_empty() => return Err(e),
                // Publish what came before; then the error reopens from the saved token.
                Some(Err(e)) => {
                    self.deferred = Some(e);
                    break;
                }
                Some(Ok(StreamItem::Idle(token))) => {
                    idle_token = Some(token);
                    break;
                }
                Some(Ok(StreamItem::Change(raw))) => raw,
            };
            match parse_event(&raw)? {
                Ok(mut change) => {
                    change.txn_index = resume_token::place(
                        change.token.as_ref(),
                        change.cluster_time,
                        self.placed,
                    );
                    self.placed = Some((change.cluster_time, change.txn_index));
                    batch.push(change);
                }
                Err(NotPublished::Invalidated) if batch.is_empty() => {
                    return Err(Error::HistoryLost(
                        "the change stream was invalidated (the database was dropped or renamed)"
                            .into(),
                    ));
                }
                Err(NotPublished::Invalidated) => break,
                Err(NotPublished::Ignored {
                    operation,
                    collection,
                }) => {
                    tracing::warn!(
                        operation,
                        collection,
                        "DDL change not replicated (the secondary keeps its documents)"
                    );
                }
            }
            if batch.len() >= self.config.batch_size {
                break;
            }
            next = match reader.items.try_recv() {
                Ok(item) => Some(item),
                Err(_) => break,
            };
        }
        // Idle with every earlier change acknowledged: move the saved position up to the
        // stream's post-batch token, so it never ages out of the oplog. Not while a batch is
        // pending (the relay may read ahead): the token is past it, and a relay taking over
        // from there would never publish it.
        // (An empty round trip means every change of a transaction was delivered: no place.)
        if !batch.is_empty() {
            self.unacked += 1;
        } else if let (0, Some(token)) = (self.unacked, idle_token) {
            if self.saved_token.as_ref() != Some(&token) {
                self.save(Position::After(token, None)).await?;
            }
        }
        Ok(batch)
    }
}

impl Source for MongoSource {
    type Event = MongoChange;

    async fn next_batch(&mut self, cancel: &CancellationToken) -> Result<Vec<MongoChange>, Error> {
        self.renew_if_due().await?;
        if matches!(self.phase, Phase::Snapshot { finished: true, .. }) {
            self.finish_snapshot().await?;
        }
        match &self.phase {
            Phase::Snapshot { .. } => self.next_snapshot_batch().await,
            Phase::Streaming(_) => self.next_stream_batch(cancel).await,
        }
    }

    async fn ack(&mut self, changes: &[MongoChange]) -> Result<(), Error> {
        if let Phase::Snapshot { finished, .. } = &self.phase {
            if *finished {
                self.finish_snapshot().await?;
            }
            return Ok(());
        }
        let last = changes
            .iter()
            .rev()
            .find_map(|c| Some((c.token.clone()?, (c.cluster_time, c.txn_index))));
        if let Some((token, place)) = last {
            self.save(Position::After(token, Some(place))).await?;
        }
        if !changes.is_empty() {
            self.unacked = self.unacked.saturating_sub(1);
        }
        Ok(())
    }
}

impl MongoSource {
    /// Every snapshot batch is acknowledged: save the snapshot's start time as the position
    /// and stream from it.
    async fn finish_snapshot(&mut self) -> Result<(), Error> {
        let Phase::Snapshot { start_at, .. } = self.phase else {
            return Ok(());
        };
        tracing::info!(
            ?start_at,
            "snapshot published; streaming changes from its start"
        );
        self.save(Position::At(start_at)).await?;
        self.placed = None;
        self.phase = Phase::Streaming(self.open(None, Some(start_at)).await?);
        Ok(())
    }
}

/// A server error that means the position is gone becomes [`Error::HistoryLost`].
pub(crate) fn history_lost_or(e: mongodb::error::Error) -> Error {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) if HISTORY_LOST_CODES.contains(&c.code) => {
            Error::HistoryLost(format!(
                "the saved change-stream position is no longer in the oplog ({}: {})",
                c.code_name, c.message
            ))
        }
        _ => e.into(),
    }
}
