//! The relay stage for a MongoDB primary: change stream → Avro events → Kafka.
//!
//! Same loop and guarantees as the outbox relay: read a batch, encode each change (one that
//! does not match its collection's schema becomes a dead letter, or halts the relay), publish
//! and wait for every acknowledgement, and only then save the resume token. One relay per
//! pipeline holds the lease (see [`crate::source::mongo`]); others wait as standby.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::codec::SchemaStore;
use crate::config::{Config, MongoSourceConfig, OnHistoryLost, OnInvalid};
use crate::dlq::{self, FailedStage, Failure};
use crate::error::Error;
use crate::mapping::event_headers;
use crate::publish::{Outgoing, Publisher};
use crate::source::leader_lease::LeaderLease;
use crate::source::mongo::MongoSource;
use crate::source::mongo_change::MongoChange;
use crate::source::mongo_reads::{cluster_time, read_collection, watched_collections};
use crate::source::Source;
use crate::wire::EventCodec;

/// Headers only MongoDB-sourced messages carry.
pub mod mongo_headers {
    pub const DATABASE: &str = "dualsync.mongo.database";
    /// `documentKey` as canonical Extended JSON (the `_id` with its BSON type).
    pub const DOCUMENT_KEY: &str = "dualsync.mongo.document_key";
    /// `<seconds>.<increment>` of the operation's cluster time.
    pub const CLUSTER_TIME: &str = "dualsync.mongo.cluster_time";
}

/// A dead-lettered change, for the metrics: `(its event topic, error class)`.
type DeadChange = super::outbox::DeadRow;

struct Leader<'a> {
    relay: &'a Relay<'a>,
    source_config: &'a MongoSourceConfig,
    /// Nothing is handed to the producer once it has run out.
    lease: Arc<LeaderLease>,
}

/// How long a leader that steps down tries to hand its lease over: a leader cut off from
/// MongoDB cannot, and the lease then expires by itself.
const RELEASE_DEADLINE: Duration = Duration::from_secs(2);

/// Publishes as the leader until cancelled, a failure, or its lease running out unconfirmed
/// (cut off from MongoDB: it stops before a standby can take over, see
/// [`crate::source::leader_lease`]), then hands the lease over at once instead of after it
/// runs out (a no-op when it was lost).
pub(super) async fn lead(
    relay: &Relay<'_>,
    source_config: &MongoSourceConfig,
    mut source: MongoSource,
) -> Result<(), Error> {
    let lease = source.lease();
    let leader = Leader {
        relay,
        source_config,
        lease: lease.clone(),
    };
    // Dropping the loop mid-batch is safe: what it read is saved only after Kafka acknowledged
    // it, so the next leader reads it again.
    let led = tokio::select! {
        biased;
        _ = lease.lapsed() => Err(Error::LeaderSilent(lease.valid_for())),
        led = leader.lead(&mut source) => led,
    };
    relay.metrics.relay_leader.set(0);
    if tokio::time::timeout(RELEASE_DEADLINE, source.release())
        .await
        .is_err()
    {
        tracing::warn!("could not release the relay lease in time; it expires by itself");
    }
    led
}

impl Leader<'_> {
    async fn lead(&self, source: &mut MongoSource) -> Result<(), Error> {
        let (config, metrics, cancel) = (self.relay.config, self.relay.metrics, self.relay.cancel);
        loop {
            self.hold_while_paused(source).await?;
            let changes = match source.next_batch(cancel).await {
                Err(Error::HistoryLost(why))
                    if self.source_config.on_history_lost == OnHistoryLost::Resnapshot =>
                {
                    tracing::error!(reason = %why, "change stream history lost: taking a new snapshot (on_history_lost = \"resnapshot\")");
                    source.begin_snapshot(None).await?;
                    continue;
                }
                other => other?,
            };
            if changes.is_empty() {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            // A read under way when the pause came (it waits up to max_await_ms for changes):
            // what it returned is held until resumed, not published during the pause.
            self.hold_while_paused(source).await?;
            if cancel.is_cancelled() {
                return Ok(());
            }
            super::outbox::count_read(metrics, changes.len());
            let mut messages = Vec::with_capacity(changes.len());
            let mut dead = Vec::new();
            let mut per_topic: HashMap<String, u64> = HashMap::new();
            for change in &changes {
                self.relay
                    .codec
                    .ensure_registered(config, &change.collection)
                    .await?;
                let (message, invalid) = self.message_for(change)?;
                match invalid {
                    Some(d) => dead.push(d),
                    None => *per_topic.entry(message.topic.clone()).or_default() += 1,
                }
                messages.push(message);
            }
            self.ensure_leading()?;
            let published = tokio::select! {
                r = self.relay.publisher.publish_all(messages) => r,
                _ = cancel.cancelled() => return Ok(()),
            };
            match published {
                Ok(()) => {}
                Err(e) if e.is_too_large() => {
                    tracing::warn!(error = %e, "a change of the batch is too large; publishing one by one");
                    let before = dead.len();
                    if !self.publish_one_by_one(&changes, &mut dead).await? {
                        return Ok(());
                    }
                    for (topic, _) in &dead[before..] {
                        per_topic.entry(topic.clone()).and_modify(|n| *n -= 1);
                    }
                }
                Err(e) => return Err(e),
            }
            source.ack(&changes).await?;
            super::outbox::count_acked(metrics, per_topic, dead);
            tracing::debug!(changes = changes.len(), "batch published");
        }
    }

    /// Fails once the lease ran out unconfirmed: a standby may take it over from then on.
    fn ensure_leading(&self) -> Result<(), Error> {
        match self.lease.is_valid_at(Instant::now()) {
            true => Ok(()),
            false => Err(Error::LeaderSilent(self.lease.valid_for())),
        }
    }

    /// While paused, reads and publishes nothing (see [`Self::wait_resumed_keeping_the_lease`]).
    async fn hold_while_paused(&self, source: &mut MongoSource) -> Result<(), Error> {
        if self.relay.control.is_paused() {
            tracing::info!("paused: the change stream is not read until resumed");
            self.wait_resumed_keeping_the_lease(source).await?;
            tracing::info!("resumed");
        }
        Ok(())
    }

    /// Waits until resumed (or cancelled), renewing the lease meanwhile: a paused leader is
    /// still the leader, and a standby that took over would publish what pause holds back.
    async fn wait_resumed_keeping_the_lease(&self, source: &mut MongoSource) -> Result<(), Error> {
        loop {
            tokio::select! {
                _ = self.relay.control.wait_resumed(self.relay.cancel) => return Ok(()),
                _ = tokio::time::sleep(source.renewal_interval()) => source.renew_if_due().await?,
            }
        }
    }

    /// The message for a change: its event, or its dead letter (with `(topic, class)`).
    fn message_for(&self, change: &MongoChange) -> Result<(Outgoing, Option<DeadChange>), Error> {
        let config = self.relay.config;
        match to_message(config, self.relay.codec, change) {
            Ok(m) => Ok((m, None)),
            Err(e) if config.relay.on_invalid == OnInvalid::Halt => Err(halted(change, &e)),
            Err(e) => {
                tracing::warn!(collection = %change.collection, key = %change.key(), class = e.class(),
                    error = %e, topic = %config.relay.dead_letter_topic, "change dead-lettered");
                let dead = (config.kafka.topic_for(&change.collection), e.class());
                Ok((dead_letter(config, change, &e, false), Some(dead)))
            }
        }
    }

    /// Publishes the batch one message at a time, dead-lettering (without the document) a
    /// change too large for Kafka. `false` when cancelled.
    async fn publish_one_by_one(
        &self,
        changes: &[MongoChange],
        dead: &mut Vec<DeadChange>,
    ) -> Result<bool, Error> {
        for change in changes {
            self.ensure_leading()?;
            let (message, _) = self.message_for(change)?;
            let sent = tokio::select! {
                r = self.relay.publisher.publish_all(vec![message]) => r,
                _ = self.relay.cancel.cancelled() => return Ok(false),
            };
            match sent {
                Ok(()) => {}
                Err(e) if e.is_too_large() => {
                    if self.relay.config.relay.on_invalid == OnInvalid::Halt {
                        return Err(halted(change, &e));
                    }
                    tracing::error!(collection = %change.collection, key = %change.key(), error = %e,
                        "change too large for Kafka: dead-lettered without its document");
                    let letter = dead_letter(self.relay.config, change, &e, true);
                    tokio::select! {
                        r = self.relay.publisher.publish_all(vec![letter]) => r?,
                        _ = self.relay.cancel.cancelled() => return Ok(false),
                    }
                    dead.push((
                        self.relay.config.kafka.topic_for(&change.collection),
                        e.class(),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

fn halted(change: &MongoChange, error: &Error) -> Error {
    Error::Halted(format!(
        "{} of {}.{} _id {}: {error}",
        change.operation.as_str(),
        change.database,
        change.collection,
        change.key()
    ))
}

/// The Kafka message of a change: key = canonical `_id`, value in the collection's schema or
/// the generic envelope, the outbox relay's headers plus the MongoDB ones.
pub fn to_message(
    config: &Config,
    codec: &EventCodec,
    change: &MongoChange,
) -> Result<Outgoing, Error> {
    let typed = codec.store().for_type(&change.collection).is_some();
    let event = change.to_event(change.version(), typed);
    let context = change.context();
    let value = codec.encode_change(&event, &context)?;
    let cluster_time = format!("{}.{}", context.cluster_time.0, context.cluster_time.1);
    // A change's wall time is its commit's.
    let mut h = event_headers(&event, event.created_at_micros);
    for (key, v) in [
        (mongo_headers::DATABASE, change.database.as_str()),
        (mongo_headers::DOCUMENT_KEY, context.document_key.as_str()),
        (mongo_headers::CLUSTER_TIME, cluster_time.as_str()),
    ] {
        h = h.insert(Header {
            key,
            value: Some(v),
        });
    }
    Ok(Outgoing {
        topic: config.kafka.topic_for(&change.collection),
        key: Some(event.aggregate_id.into_bytes()),
        value,
        headers: h,
    })
}

/// The change as canonical Extended JSON with the error in headers; without the document
/// when `omit_document` (it was too large for Kafka).
fn dead_letter(
    config: &Config,
    change: &MongoChange,
    error: &Error,
    omit_document: bool,
) -> Outgoing {
    let mut raw = change.to_dead_letter_json();
    let mut base = OwnedHeaders::new();
    let size;
    if omit_document {
        size = raw["fullDocument"].to_string().len().to_string();
        raw["fullDocument"] = serde_json::Value::Null;
        base = base.insert(Header {
            key: dlq::headers::VALUE_OMITTED,
            value: Some(size.as_str()),
        });
    }
    let failure = Failure {
        error,
        stage: if omit_document {
            FailedStage::RelayPublish
        } else {
            FailedStage::RelayEncode
        },
        pipeline: &config.pipeline.name,
        group: None,
        attempts: 1,
    };
    Outgoing {
        topic: config.relay.dead_letter_topic.clone(),
        key: Some(change.key().into_bytes()),
        value: raw.to_string().into_bytes(),
        headers: dlq::error_headers(base, &failure),
    }
}

/// The event of a document read outside the stream (snapshot, repair), or its dead letter
/// (`Err`) when it does not encode; an error when `on_invalid = "halt"`.
pub(crate) fn encode_or_dead_letter(
    config: &Config,
    codec: &EventCodec,
    change: &MongoChange,
) -> Result<Result<Outgoing, Outgoing>, Error> {
    match to_message(config, codec, change) {
        Ok(m) => Ok(Ok(m)),
        Err(e) if config.relay.on_invalid == OnInvalid::Halt => Err(halted(change, &e)),
        Err(e) => {
            tracing::warn!(collection = %change.collection, key = %change.key(), class = e.class(),
                error = %e, operation = change.operation.as_str(), "document dead-lettered");
            Ok(Err(dead_letter(config, change, &e, false)))
        }
    }
}

/// What `dualsync snapshot` published for one collection.
#[derive(Debug, serde::Serialize)]
pub struct SnapshotReport {
    pub collection: String,
    pub documents: u64,
    pub dead_lettered: u64,
    /// The version every document was published with (just below the start's cluster time).
    pub version: i64,
}

/// `dualsync snapshot` for a MongoDB source: publishes the current documents of `only` (or of
/// every watched collection) as `snapshot` events, alongside a running relay or not. Their
/// version is just below the cluster time at the start, so any change the stream publishes
/// from then on wins, and what the snapshot read is at least as new as that time. `db` is the
/// source's database ([`crate::source::mongo_reads::connect`]).
pub async fn snapshot(
    db: &mongodb::Database,
    config: &Config,
    source_config: &MongoSourceConfig,
    schemas: Arc<SchemaStore>,
    only: &[String],
    batch_size: usize,
    cancel: &CancellationToken,
) -> Result<Vec<SnapshotReport>, Error> {
    use futures::TryStreamExt;

    let Some(codec) = EventCodec::for_publishing(config, schemas, cancel).await? else {
        return Ok(Vec::new());
    };
    let publisher = Publisher::new(&config.kafka)?;
    let start_at = cluster_time(db).await?;
    let collections = watched_collections(db, source_config, only).await?;
    let mut reports = Vec::new();
    for collection in collections {
        codec.ensure_registered(config, &collection).await?;
        let mut report = SnapshotReport {
            collection: collection.clone(),
            documents: 0,
            dead_lettered: 0,
            version: crate::source::mongo_change::snapshot_version(start_at),
        };
        let mut cursor = read_collection(db, &collection).await?;
        let mut done = false;
        while !done {
            let mut messages = Vec::with_capacity(batch_size);
            while messages.len() < batch_size {
                let Some(document) = cursor.try_next().await? else {
                    done = true;
                    break;
                };
                let change =
                    MongoChange::snapshot(&source_config.database, &collection, document, start_at);
                match encode_or_dead_letter(config, &codec, &change)? {
                    Ok(m) => {
                        report.documents += 1;
                        messages.push(m);
                    }
                    Err(letter) => {
                        report.dead_lettered += 1;
                        messages.push(letter);
                    }
                }
            }
            tokio::select! {
                r = publisher.publish_all(messages) => r?,
                _ = cancel.cancelled() => return Err(Error::Internal("snapshot interrupted".into())),
            }
        }
        tracing::info!(collection = %report.collection, documents = report.documents, "snapshot published");
        reports.push(report);
    }
    Ok(reports)
}
