//! Publishing to Kafka: an idempotent producer (`acks=all`, Java-compatible murmur2
//! partitioning so a key lands where Java clients would put it), topic creation, and batch
//! publication that returns only when every message of the batch is acknowledged.
//! [`durability`]: the replication factor and `min.insync.replicas` of the topics it writes.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use tokio::sync::Mutex;

use crate::config::KafkaConfig;
use crate::error::Error;
use crate::metrics::Metrics;

pub mod chatter;
pub mod durability;

/// Header names of every relay message: the contract with downstream consumers.
pub mod headers {
    pub const EVENT_ID: &str = "dualsync.event_id";
    pub const EVENT_TYPE: &str = "dualsync.event_type";
    pub const AGGREGATE_TYPE: &str = "dualsync.aggregate_type";
    pub const AGGREGATE_ID: &str = "dualsync.aggregate_id";
    pub const VERSION: &str = "dualsync.version";
    /// Microseconds since the epoch, decimal text.
    pub const CREATED_AT: &str = "dualsync.created_at";
    /// When the primary committed the change: microseconds since the epoch, decimal text.
    /// PostgreSQL's commit timestamp where `track_commit_timestamp` is on, else `created_at`;
    /// a MongoDB change's wall time. Apply measures its lag from it.
    pub const COMMITTED_AT: &str = "dualsync.committed_at";
    pub const TRACEPARENT: &str = "traceparent";
}

/// A header of a consumed message as text (`None`: absent, null or not UTF-8).
pub fn header_str<'a, M: rdkafka::message::Message>(m: &'a M, key: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

/// Base librdkafka settings shared by producers and consumers, with the user's properties on
/// top (they win, except for the few dualsync must own).
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers);
    c.set("client.id", "dualsync");
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// librdkafka client context that feeds broker reachability into the process's readiness
/// (from the periodic statistics and the all-brokers-down error), and the publisher's
/// watchdog: a batch Kafka has not acknowledged after `stuck_write` of waiting makes the
/// process not ready, naming its topic. "All brokers down" misses a partition of one broker
/// of three, whose partitions' produce requests just wait.
#[derive(Clone, Default)]
pub struct KafkaHealth {
    pub metrics: Option<Arc<Metrics>>,
    /// `http.stuck_write_secs`, as for sink writes.
    pub stuck_write: Duration,
}

impl KafkaHealth {
    pub fn new(metrics: Arc<Metrics>, http: &crate::config::HttpConfig) -> Self {
        Self {
            metrics: Some(metrics),
            stuck_write: Duration::from_secs(http.stuck_write_secs),
        }
    }
}

/// How often librdkafka reports statistics (broker state, consumer lag) to the contexts.
pub const STATISTICS_INTERVAL_MS: &str = "5000";

impl ClientContext for KafkaHealth {
    fn stats(&self, statistics: Statistics) {
        chatter::statistics(&statistics);
        if let Some(m) = &self.metrics {
            m.health.set_broker_up(brokers_up(&statistics));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(m) = &self.metrics {
            if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
                m.health.set_broker_up(false);
            }
        }
        // An error about one broker is part of that broker's fault, told in a few lines.
        if !chatter::error(error.rdkafka_error_code(), reason) {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        chatter::log(level, fac, message);
    }
}

/// Whether at least one real (not bootstrap-only) broker connection is up.
pub fn brokers_up(statistics: &Statistics) -> bool {
    statistics
        .brokers
        .values()
        .any(|b| b.nodeid >= 0 && b.state == "UP")
}

/// Remembers the last client-level error librdkafka reported, so a failed metadata request
/// can say why (an authentication failure arrives only through this callback).
#[derive(Default, Clone)]
struct LastError(Arc<std::sync::Mutex<Option<(RDKafkaErrorCode, String)>>>);

impl rdkafka::producer::ProducerContext for LastError {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(code) = error.rdkafka_error_code() {
            let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
            // A credentials failure is followed by "all brokers down": keep the cause.
            if is_credentials_error(code)
                || !last.as_ref().is_some_and(|(c, _)| is_credentials_error(*c))
            {
                *last = Some((code, reason.to_string()));
            }
        }
    }
}

/// Client errors that no retry can fix: wrong credentials, a TLS set-up that cannot work.
fn is_credentials_error(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::SSL
            | RDKafkaErrorCode::UnsupportedSASLMechanism
            | RDKafkaErrorCode::IllegalSASLState
    )
}

/// Waits until the cluster answers a metadata request, so start-up neither runs ahead of a
/// broker that is down (it logs one line per attempt, backing off up to 10 s, and the
/// process stays not ready) nor retries for ever what cannot work: a credentials or TLS
/// failure ends start-up with the broker's reason. `Ok(false)` when cancelled first. Each
/// failed attempt marks the brokers unreachable in `health`, so `/readyz` says why start-up
/// waits (not only "starting").
pub async fn wait_for_cluster(
    kafka: &KafkaConfig,
    health: &crate::metrics::Health,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<bool, Error> {
    let context = LastError::default();
    // A producer only because its poll serves the client's error events (where a failed
    // authentication is reported); it never sends anything.
    let client: Arc<rdkafka::producer::BaseProducer<LastError>> =
        Arc::new(client_config(kafka).create_with_context(context.clone())?);
    let mut retry = crate::retry::Retry::new(
        crate::retry::Backoff::doubling(Duration::from_millis(500), Duration::from_secs(10)),
        cancel,
    );
    loop {
        let probe = client.clone();
        let answer = tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            let answer = probe
                .client()
                .fetch_metadata(None, Duration::from_secs(5))
                .map(|_| ());
            // Only a failure needs the error events (a failed authentication is one); on
            // success this wait was a tenth of a second of every start-up.
            if answer.is_err() {
                probe.poll(Duration::from_millis(100));
            }
            answer
        })
        .await
        .map_err(|_| Error::Kafka(KafkaError::Canceled))?;
        let last = context.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        health.set_broker_up(answer.is_ok());
        match (answer, last) {
            (Ok(()), _) => return Ok(true),
            (Err(_), Some((code, reason))) if is_credentials_error(code) => {
                return Err(Error::KafkaCredentials {
                    brokers: kafka.brokers.clone(),
                    reason,
                })
            }
            (Err(e), last) => {
                // Anything but a refusal of the credentials is waited out.
                let crate::retry::Verdict::Again(delay) =
                    retry.failed_as(crate::error::Disposition::Retry)
                else {
                    unreachable!("transient, and no deadline")
                };
                let reason = last.map(|(_, r)| r).unwrap_or_else(|| e.to_string());
                tracing::warn!(brokers = %kafka.brokers, %reason, retry_in = ?delay, "kafka cluster unreachable (kafka.brokers); retrying");
                if !retry.wait(delay).await {
                    return Ok(false);
                }
            }
        }
    }
}

/// Resolves when Kafka acknowledged every message of a batch (the first failure otherwise).
pub type Acks = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// The delivery futures of a batch, each with the index of its topic in `topics`. From its
/// first poll (when the caller starts waiting on it) until it resolves, the wait is watched
/// (`health`): a caller busy elsewhere, e.g. marking an earlier batch in its database, is not
/// waiting on Kafka.
fn acks(
    deliveries: Vec<(DeliveryFuture, usize)>,
    topics: Vec<String>,
    health: KafkaHealth,
) -> Acks {
    Box::pin(async move {
        let _watch = match (&health.metrics, topics.first()) {
            (Some(metrics), Some(topic)) if !deliveries.is_empty() => {
                Some(metrics.health.write_started(
                    format!("Kafka topic {topic} (kafka.brokers)"),
                    health.stuck_write,
                ))
            }
            _ => None,
        };
        for (delivery, topic) in deliveries {
            let delivered = delivery
                .await
                .map_err(|_| Error::Kafka(KafkaError::Canceled))?
                .map_err(|(e, _)| Error::Kafka(e))?;
            // librdkafka reports a message without an offset when it inferred the delivery
            // from a later request's success ("implicit ack"). A broker that holds no state
            // for this producer on the partition (a partition created a moment ago) accepts
            // any sequence, so that inference can be wrong: the message may never have been
            // written. Not a proof, so not an acknowledgement: the batch is published again.
            if delivered.offset < 0 {
                return Err(Error::UnconfirmedDelivery {
                    topic: topics[topic].clone(),
                    partition: delivered.partition,
                });
            }
        }
        Ok(())
    })
}

/// One message to publish.
pub struct Outgoing {
    pub topic: String,
    /// `None` keeps a null key (dead letters of null-key messages stay null-keyed).
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: OwnedHeaders,
}

/// How long a topic's first use waits for its partition leaders (see
/// [`Publisher::wait_until_leaders_serve`]).
const LEADERS_WAIT: Duration = Duration::from_secs(30);

pub struct Publisher {
    producer: FutureProducer<KafkaHealth>,
    producer_config: ClientConfig,
    admin: AdminClient<DefaultClientContext>,
    kafka: KafkaConfig,
    known_topics: Mutex<HashSet<String>>,
    leaders_wait: Duration,
    /// Where durability warnings go (`/status`).
    health: KafkaHealth,
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, Error> {
        Self::with_health(kafka, KafkaHealth::default())
    }

    /// A publisher whose broker reachability is reported to `health.metrics`.
    pub fn with_health(kafka: &KafkaConfig, health: KafkaHealth) -> Result<Self, Error> {
        let mut producer_config = client_config(kafka);
        // The delivery contract: never overridable (`config::DELIVERY_GUARANTEES`, refused by config
        // validation), so set after the user's properties.
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            // Never give up on a message: a broker outage blocks the relay (which is what must
            // happen) instead of failing a message and reordering its key on the retry.
            .set("message.timeout.ms", "0");
        for (k, v) in [
            ("partitioner", "murmur2_random"),
            // Kafka 4.0's Java producer default (KIP-1030). Batches read close together share
            // produce requests: on three brokers with RF 3 at 1,000 events/s, 5 against 0 cut
            // produce requests by 41 %, the relay's CPU by half and commit → applied p99 from
            // 98 to 47 ms, for 3 ms more at p50 (BENCHMARKS.md, 2026-12-07).
            ("linger.ms", "5"),
            ("queue.buffering.max.messages", "100000"),
            // Up to `source.max_batches_in_flight` produce requests share a connection: with
            // Nagle's algorithm a request waits for the TCP acknowledgement of the previous one.
            ("socket.nagle.disable", "true"),
            ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
        ] {
            if !kafka.properties.contains_key(k) {
                producer_config.set(k, v);
            }
        }
        Ok(Self {
            producer: producer_config.create_with_context(health.clone())?,
            producer_config,
            admin: client_config(kafka).create()?,
            kafka: kafka.clone(),
            known_topics: Mutex::new(HashSet::new()),
            leaders_wait: LEADERS_WAIT,
            health,
        })
    }

    /// Publishes to new topics without waiting for their partition leaders: only for tests
    /// of what the delivery check catches when the wait is not enough.
    #[doc(hidden)]
    pub fn without_leaders_wait(mut self) -> Self {
        self.leaders_wait = Duration::ZERO;
        self
    }

    pub fn producer(&self) -> &FutureProducer<KafkaHealth> {
        &self.producer
    }

    /// The settings the producer was created with (user properties and dualsync's own).
    pub fn producer_config(&self) -> &ClientConfig {
        &self.producer_config
    }

    /// Creates `topic` with the configured partitions unless it exists, with the durability
    /// [`durability::settings`] decides, and warns when an existing one has less
    /// ([`durability::weakness`]).
    pub async fn ensure_topic(&self, topic: &str) -> Result<(), Error> {
        if self.known_topics.lock().await.contains(topic) {
            return Ok(());
        }
        let cluster = self.cluster().await?;
        let settings = durability::settings(self.kafka.replication_factor, &cluster);
        let replication = settings.replication;
        let min_insync = settings.min_insync.map(|n| n.to_string());
        let mut new_topic = NewTopic::new(
            topic,
            self.kafka.partitions,
            TopicReplication::Fixed(replication),
        );
        if let Some(n) = &min_insync {
            new_topic = new_topic.set("min.insync.replicas", n);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self.admin.create_topics([&new_topic], &options).await?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                // Not allowed to create it, but it may exist (created by an administrator):
                // then there is nothing to do.
                Err((_, RDKafkaErrorCode::TopicAuthorizationFailed))
                    if self.topic_exists(topic).await? => {}
                Err((_, code)) => {
                    return Err(Error::TopicCreation {
                        topic: topic.to_string(),
                        code,
                        partitions: self.kafka.partitions,
                        replication,
                        brokers: cluster.size(),
                    });
                }
            }
        }
        self.check_durability(topic, &cluster).await?;
        self.wait_until_leaders_serve(topic).await?;
        self.known_topics.lock().await.insert(topic.to_string());
        Ok(())
    }

    /// Waits until the leader of every partition of `topic` answers for it (a ListOffsets
    /// request succeeds), at most [`LEADERS_WAIT`]. A topic's partitions appear in
    /// the cluster's metadata a few milliseconds before each leader has created its log, and
    /// a produce request arriving in between fails; with several requests per partition in
    /// flight, a later one can then succeed and make the producer take the failed one for
    /// delivered (see [`acks`]). Those are caught and published again, but waiting here keeps
    /// that duplicate, and the reordering it brings, from happening on every new topic.
    async fn wait_until_leaders_serve(&self, topic: &str) -> Result<(), Error> {
        let wait = self.leaders_wait;
        if wait.is_zero() {
            return Ok(());
        }
        let client = self.producer.clone();
        let name = topic.to_string();
        let ready = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + wait;
            let timeout = Duration::from_secs(5);
            loop {
                let serving = client
                    .client()
                    .fetch_metadata(Some(&name), timeout)
                    .ok()
                    .and_then(|m| {
                        let partitions = m.topics().first()?.partitions().len() as i32;
                        (partitions > 0).then_some(partitions)
                    })
                    .is_some_and(|partitions| {
                        (0..partitions)
                            .all(|p| client.client().fetch_watermarks(&name, p, timeout).is_ok())
                    });
                if serving || std::time::Instant::now() >= deadline {
                    return serving;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .map_err(|_| Error::Kafka(KafkaError::Canceled))?;
        if !ready {
            tracing::warn!(topic, waited = ?wait,
                "not every partition leader answers yet; publishing anyway (unconfirmed deliveries are published again)");
        }
        Ok(())
    }

    /// Whether the cluster's metadata lists `topic`.
    async fn topic_exists(&self, topic: &str) -> Result<bool, Error> {
        let client = self.producer.clone();
        let name = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let metadata = client
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))?;
            Ok::<bool, Error>(
                metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty()),
            )
        })
        .await
        .map_err(|_| Error::Kafka(KafkaError::Canceled))?
    }

    /// Sends every message (in order) and waits until all are acknowledged. A full producer
    /// queue is backpressure: the send waits for earlier deliveries instead of buffering more.
    pub async fn publish_all(&self, messages: Vec<Outgoing>) -> Result<(), Error> {
        match self.enqueue(messages).await {
            Ok(acks) => acks.await,
            Err((e, _)) => Err(e),
        }
    }

    /// Hands every message (in order) to the producer and returns at once with the future of
    /// their acknowledgements, so the caller can prepare the next batch meanwhile. The
    /// idempotent producer keeps the order of messages per partition across batches. A full
    /// producer queue is backpressure: the send waits for earlier deliveries. On an error the
    /// messages before the failed one are already on their way: their acknowledgements come
    /// with the error.
    pub async fn enqueue(&self, messages: Vec<Outgoing>) -> Result<Acks, (Error, Acks)> {
        let mut deliveries = Vec::with_capacity(messages.len());
        // The batch's topics in order of appearance; the last is the one being sent to.
        let mut topics: Vec<String> = Vec::new();
        for m in messages {
            // Batches are mostly one topic: ask the topic cache only when it changes.
            if topics.last() != Some(&m.topic) {
                if let Err(e) = self.ensure_topic(&m.topic).await {
                    return Err((e, acks(deliveries, topics, self.health.clone())));
                }
                topics.push(m.topic.clone());
            }
            let mut record = FutureRecord::<Vec<u8>, Vec<u8>>::to(&m.topic)
                .payload(&m.value)
                .headers(m.headers);
            if let Some(key) = &m.key {
                record = record.key(key);
            }
            // A full queue waits on earlier deliveries: watched like them.
            let mut queue_full = None;
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((delivery, topics.len() - 1));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        if let (None, Some(metrics)) = (&queue_full, &self.health.metrics) {
                            queue_full = Some(metrics.health.write_started(
                                format!("Kafka producer queue for {} (kafka.brokers)", m.topic),
                                self.health.stuck_write,
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        return Err((e.into(), acks(deliveries, topics, self.health.clone())))
                    }
                }
            }
        }
        Ok(acks(deliveries, topics, self.health.clone()))
    }

    /// Waits for everything in flight (used on shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        Ok(self.producer.flush(timeout)?)
    }
}
