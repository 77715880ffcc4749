//! The relay stage: primary changes → Avro events → Kafka, one active relay per pipeline.
//!
//! [`run`] sets up what every relay shares (the codec for publishing, the producer, leadership
//! retried until cancelled, the leader gauge), then leads with the source's own loop:
//! [`outbox`] (PostgreSQL outbox rows, batches in flight) or [`mongo`] (change streams).
//! Either way a message is marked (row published, resume token saved) only after Kafka
//! acknowledged it; a crash in between publishes it again (at-least-once; apply's version
//! guard absorbs the duplicates).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub mod mongo;
pub mod outbox;
pub mod versions;

use crate::codec::SchemaStore;
use crate::config::{Capture, Config, SourceConfig};
use crate::error::{endpoint, Endpoint, Error};
use crate::http::Control;
use crate::metrics::{stage, Metrics};
use crate::publish::{KafkaHealth, Publisher};
use crate::retry::{Backoff, BreakerPolicy, Retry, Verdict};
use crate::source::mongo::MongoSource;
use crate::source::outbox::OutboxSource;
use crate::source::wal::{slot_health, WalSource};
use crate::traces::{self, Traces};
use crate::wire::EventCodec;

/// What every relay leader works with, set up once by [`run`] whichever the source.
pub(crate) struct Relay<'a> {
    pub config: &'a Config,
    pub publisher: &'a Publisher,
    pub codec: &'a EventCodec,
    pub metrics: &'a Metrics,
    pub control: &'a Control,
    pub cancel: &'a CancellationToken,
    /// `[telemetry]`'s tracer: a span per published batch (outbox source).
    pub traces: Option<&'a Traces>,
}

/// Runs the relay until `cancel`: standby until it holds the leader lock (outbox) or lease
/// (MongoDB), then publishes. Transient failures (lost connections, broker outages) are
/// retried forever with backoff. While `control` is paused the leader keeps its lock but
/// reads nothing.
pub async fn run(
    config: &Config,
    schemas: Arc<SchemaStore>,
    metrics: Arc<Metrics>,
    control: Control,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let mongo_source = match &config.source {
        Some(SourceConfig::Mongodb(source)) => Some(source),
        _ => None,
    };
    let outbox_source = match mongo_source {
        None => Some(config.outbox_source()?.clone()),
        Some(_) => None,
    };
    let Some(codec) = EventCodec::for_publishing(config, schemas, &cancel).await? else {
        return Ok(());
    };
    let publisher = Publisher::with_health(
        &config.kafka,
        KafkaHealth::new(metrics.clone(), &config.http),
    )?;
    let tracer = Traces::start(config, "relay")?;
    // The relay's own stop: main's cancellation, or a lost replication slot (below).
    let stop = cancel.child_token();
    let cancel = &stop;
    let relay = Relay {
        config,
        publisher: &publisher,
        codec: &codec,
        metrics: &metrics,
        control: &control,
        cancel,
        traces: tracer.as_ref(),
    };
    let result = match (mongo_source, &outbox_source) {
        (Some(source), _) => {
            lead_until_cancelled(
                &relay,
                || {
                    MongoSource::acquire_leadership(
                        source,
                        &config.pipeline.name,
                        &metrics.health,
                        cancel,
                    )
                },
                |held| mongo::lead(&relay, source, held),
            )
            .await
        }
        (None, Some(source)) if source.capture == Capture::Wal => {
            let lead = async {
                let led = lead_until_cancelled(
                    &relay,
                    || {
                        WalSource::acquire_leadership(
                            source,
                            &config.pipeline.name,
                            &metrics.health,
                            cancel,
                        )
                    },
                    |held| outbox::lead(&relay, source, held),
                )
                .await;
                cancel.cancel();
                led
            };
            // Beside the leader and the standby alike: the slot's gauges, and the stop on a
            // lost slot (fatal, so the relay exits rather than stream past the gap).
            let watch = async {
                let watched = slot_health::watch_for_relay(source, &metrics, cancel).await;
                cancel.cancel();
                watched
            };
            let (led, watched) = tokio::join!(lead, watch);
            watched.and(led)
        }
        (None, Some(source)) => {
            lead_until_cancelled(
                &relay,
                || {
                    OutboxSource::acquire_leadership(
                        source,
                        &config.pipeline.name,
                        &metrics.health,
                        cancel,
                    )
                },
                |held| outbox::lead(&relay, source, held),
            )
            .await
        }
        (None, None) => unreachable!("an outbox source unless a MongoDB one"),
    };
    traces::shutdown(tracer).await;
    result
}

/// Becomes the leader (`acquire`; `None` when cancelled while standby) and publishes (`lead`)
/// until it returns `Ok` (cancelled) or a non-transient error; a transient one (lost
/// connection or lease, broker outage) is retried forever with backoff. The leader gauge is 1
/// exactly while leading. Flushes the producer at the end: whatever is still queued was never
/// marked, so it will be read again; flushing only avoids needless duplicates.
async fn lead_until_cancelled<S, A, AF, L, LF>(
    relay: &Relay<'_>,
    acquire: A,
    lead: L,
) -> Result<(), Error>
where
    A: Fn() -> AF,
    AF: Future<Output = Result<Option<S>, Error>>,
    L: Fn(S) -> LF,
    LF: Future<Output = Result<(), Error>>,
{
    let (metrics, cancel) = (relay.metrics, relay.cancel);
    let mut retry = Retry::new(Backoff::reconnect(), cancel).for_stage(
        metrics,
        stage::RELAY,
        BreakerPolicy::default(),
    );
    let result = loop {
        let outcome = match acquire().await {
            Ok(Some(held)) => {
                metrics.relay_leader.set(1);
                lead(held).await
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        metrics.relay_leader.set(0);
        let e = match outcome {
            Ok(()) => break Ok(()),
            Err(e) => e,
        };
        match retry.failed(&e) {
            Verdict::Again(delay) => {
                if matches!(e, Error::Postgres(_) | Error::Mongo(_)) {
                    metrics.health.set_database_up(false);
                }
                match endpoint(&e, Endpoint::Source) {
                    _ if matches!(e, Error::SequenceBehind(_)) => {
                        tracing::error!(error = %e, "relay stopped publishing; it waits as the leader until the outbox is resequenced")
                    }
                    Some(at) => tracing::warn!(error = %e, retry_in = ?delay, connection = %at,
                        config_key = %at.config_key(),
                        "relay lost its connection to the {at} ({}); reconnecting", at.config_key()),
                    None => {
                        tracing::warn!(error = %e, retry_in = ?delay, "relay lost its lease; reconnecting")
                    }
                }
                if !retry.wait(delay).await {
                    break Ok(());
                }
            }
            Verdict::GiveUp | Verdict::Stop(_) => break Err(e),
        }
    };
    if let Err(e) = relay.publisher.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush on shutdown incomplete");
    }
    result
}
