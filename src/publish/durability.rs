//! How durable the topics dualsync writes are: the replication factor and
//! `min.insync.replicas` a topic is created with, and the check of topics that exist.
//!
//! On a cluster of three or more brokers dualsync never creates a topic with fewer than three
//! replicas (unless `kafka.replication_factor` says so) or with `min.insync.replicas` below 2,
//! and names every topic it writes that has less. While a broker is down the cluster's
//! metadata lists only the live ones, so the size is the larger of the live brokers and the
//! brokers' `default.replication.factor` (read with DescribeConfigs): a cluster set up for
//! three replicas counts as three brokers with one of them down.

use std::time::Duration;

use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;

use super::Publisher;
use crate::error::Error;

/// The fewest replicas, and in-sync replicas, of a topic on a cluster of three or more brokers.
pub const DURABLE_REPLICAS: i32 = 3;
pub const DURABLE_MIN_INSYNC: i32 = 2;

/// What the cluster says about durability, read before a topic is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    /// Brokers in the metadata: the live (unfenced) ones.
    pub live_brokers: i32,
    /// The brokers' `default.replication.factor` and `min.insync.replicas`, when readable.
    pub default_replication: Option<i32>,
    pub default_min_insync: Option<i32>,
}

impl Cluster {
    /// How many brokers the cluster has, as far as dualsync can tell with some of them down.
    pub fn size(&self) -> i32 {
        self.live_brokers.max(self.default_replication.unwrap_or(0))
    }

    fn needs_durability(&self) -> bool {
        self.size() >= DURABLE_REPLICAS
    }
}

/// The settings of a topic to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    /// `-1`: the cluster's `default.replication.factor` (KIP-464), so a creation while too
    /// few brokers are up fails instead of creating fewer replicas.
    pub replication: i32,
    /// Set on the topic when the brokers' default is too low; `None` keeps the default.
    pub min_insync: Option<i32>,
}

/// The settings of a new topic: the configured replication factor, else the cluster's
/// default (three when that default is lower on a cluster of three or more); and
/// `min.insync.replicas = 2` there when the brokers' default is lower (not with a configured
/// single replica, which could then never be written).
pub fn settings(configured: Option<i32>, cluster: &Cluster) -> TopicSettings {
    let default = cluster.default_replication.unwrap_or(1);
    let replication = match configured {
        Some(rf) => rf,
        None if cluster.needs_durability() && default < DURABLE_REPLICAS => DURABLE_REPLICAS,
        None => -1,
    };
    let effective = if replication < 0 {
        default
    } else {
        replication
    };
    let min_insync = (cluster.needs_durability()
        && effective >= DURABLE_MIN_INSYNC
        && cluster.default_min_insync.unwrap_or(1) < DURABLE_MIN_INSYNC)
        .then_some(DURABLE_MIN_INSYNC);
    TopicSettings {
        replication,
        min_insync,
    }
}

/// Why an existing topic is less durable than required, if it is (the warning's text).
pub fn weakness(
    topic: &str,
    replication: i32,
    min_insync: i32,
    cluster: &Cluster,
) -> Option<String> {
    if !cluster.needs_durability()
        || (replication >= DURABLE_REPLICAS && min_insync >= DURABLE_MIN_INSYNC)
    {
        return None;
    }
    Some(format!(
        "topic {topic:?} has replication factor {replication} and min.insync.replicas {min_insync} \
         on a cluster of {} brokers: one broker failure can lose events Kafka acknowledged, or stop \
         writes; raise them to at least {DURABLE_REPLICAS} and {DURABLE_MIN_INSYNC} (docs/kafka.md#topics)",
        cluster.size()
    ))
}

impl Publisher {
    /// The live brokers and the durability defaults of one of them. The defaults are `None`
    /// when they cannot be read (no DescribeConfigs permission): the live brokers count then.
    pub(super) async fn cluster(&self) -> Result<Cluster, Error> {
        let client = self.producer.clone();
        let ids: Vec<i32> = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|m| m.brokers().iter().map(|b| b.id()).collect())
        })
        .await
        .map_err(|_| Error::Kafka(KafkaError::Canceled))??;
        let mut cluster = Cluster {
            live_brokers: ids.len() as i32,
            default_replication: None,
            default_min_insync: None,
        };
        if let Some(id) = ids.first() {
            let config = self.describe(ResourceSpecifier::Broker(*id)).await;
            cluster.default_replication = config("default.replication.factor");
            cluster.default_min_insync = config("min.insync.replicas");
        }
        Ok(cluster)
    }

    /// A resource's configuration as a lookup of integer values (nothing when unreadable).
    async fn describe(&self, resource: ResourceSpecifier<'_>) -> impl Fn(&str) -> Option<i32> {
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let described = match self.admin.describe_configs([&resource], &options).await {
            Ok(mut results) => results.pop().and_then(Result::ok),
            Err(e) => {
                tracing::debug!(error = %e, ?resource, "cannot describe the configuration");
                None
            }
        };
        move |name: &str| {
            described
                .as_ref()?
                .get(name)?
                .value
                .as_deref()?
                .parse()
                .ok()
        }
    }

    /// Warns once per topic (a log line, and `/status` through the health) when `topic` is
    /// less durable than required on `cluster`.
    pub(super) async fn check_durability(
        &self,
        topic: &str,
        cluster: &Cluster,
    ) -> Result<(), Error> {
        let client = self.producer.clone();
        let name = topic.to_string();
        let replication = tokio::task::spawn_blocking(move || {
            let metadata = client
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))?;
            Ok::<_, Error>(
                metadata
                    .topics()
                    .iter()
                    .flat_map(|t| t.partitions())
                    .map(|p| p.replicas().len() as i32)
                    .min(),
            )
        })
        .await
        .map_err(|_| Error::Kafka(KafkaError::Canceled))??;
        let min_insync =
            self.describe(ResourceSpecifier::Topic(topic)).await("min.insync.replicas");
        let (Some(replication), Some(min_insync)) = (replication, min_insync) else {
            return Ok(());
        };
        if let Some(warning) = weakness(topic, replication, min_insync, cluster) {
            tracing::warn!(
                topic,
                replication,
                min_insync,
                brokers = cluster.size(),
                "{warning}"
            );
            if let Some(m) = &self.health.metrics {
                m.health.warn(warning);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(live: i32, rf: Option<i32>, isr: Option<i32>) -> Cluster {
        Cluster {
            live_brokers: live,
            default_replication: rf,
            default_min_insync: isr,
        }
    }

    #[test]
    fn a_broker_down_does_not_shrink_the_cluster_set_up_for_three_replicas() {
        assert_eq!(cluster(2, Some(3), Some(1)).size(), 3);
        let s = settings(None, &cluster(2, Some(3), Some(1)));
        assert_eq!(
            s,
            TopicSettings {
                replication: -1,
                min_insync: Some(2)
            }
        );
    }

    #[test]
    fn new_topics_on_three_brokers_get_three_replicas_and_two_in_sync() {
        // Kafka's own defaults (1 and 1) on three live brokers.
        let s = settings(None, &cluster(3, Some(1), Some(1)));
        assert_eq!(
            s,
            TopicSettings {
                replication: 3,
                min_insync: Some(2)
            }
        );
        // Defaults already durable: nothing is set on the topic.
        let s = settings(None, &cluster(3, Some(3), Some(2)));
        assert_eq!(
            s,
            TopicSettings {
                replication: -1,
                min_insync: None
            }
        );
        // A configured single replica is the operator's choice; two in sync would block it.
        let s = settings(Some(1), &cluster(3, Some(1), Some(1)));
        assert_eq!(
            s,
            TopicSettings {
                replication: 1,
                min_insync: None
            }
        );
    }

    #[test]
    fn a_development_broker_keeps_its_defaults() {
        let s = settings(None, &cluster(1, Some(1), Some(1)));
        assert_eq!(
            s,
            TopicSettings {
                replication: -1,
                min_insync: None
            }
        );
        assert_eq!(weakness("t", 1, 1, &cluster(1, Some(1), Some(1))), None);
    }

    #[test]
    fn weak_topics_on_three_brokers_are_named_with_their_values() {
        let c = cluster(2, Some(3), Some(1));
        let w = weakness("acme.orders", 2, 1, &c).unwrap();
        for part in [
            "\"acme.orders\"",
            "replication factor 2",
            "min.insync.replicas 1",
            "3 brokers",
        ] {
            assert!(w.contains(part), "{part:?} in {w}");
        }
        assert!(weakness("t", 3, 1, &c).is_some());
        assert!(weakness("t", 3, 2, &c).is_none());
    }
}
