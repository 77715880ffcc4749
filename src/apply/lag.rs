//! The consumer lag gauges, sampled beside the poll loop.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

use super::GroupConsumer;
use crate::metrics::Metrics;

/// How often the consumer lag gauges are refreshed.
const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `dualsync_consumer_lag_messages` per assigned partition: the partition's high
/// watermark (asked of the broker) minus this consumer's position. Asked of the broker rather than taken from librdkafka's
/// statistics, which stop updating while a partition is paused — exactly when lag matters.
pub(super) async fn sample_consumer_lag(
    consumer: Arc<GroupConsumer>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(LAG_SAMPLE_INTERVAL) => {}
        }
        let consumer = consumer.clone();
        let lags = tokio::task::spawn_blocking(move || partition_lags(&consumer))
            .await
            .unwrap_or_default();
        metrics.consumer_lag.reset();
        for (topic, partition, lag) in lags {
            metrics
                .consumer_lag
                .with_label_values(&[&topic, &partition.to_string()])
                .set(lag);
        }
    }
}

/// (topic, partition, lag) of every assigned partition whose position is known (a message
/// was consumed since the assignment) and whose watermarks could be fetched. Only local state
/// and the partition leaders are asked; never the group coordinator, so sampling cannot get in
/// the way of a rebalance.
fn partition_lags(consumer: &GroupConsumer) -> Vec<(String, i32, i64)> {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let Ok(positions) = consumer.position() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in positions.elements() {
        let Some(position) = e.offset().to_raw().filter(|o| *o >= 0) else {
            continue;
        };
        let (topic, partition) = (e.topic(), e.partition());
        if let Ok((_, high)) = consumer.fetch_watermarks(topic, partition, TIMEOUT) {
            out.push((topic.to_string(), partition, (high - position).max(0)));
        }
    }
    out
}
