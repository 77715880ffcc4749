//! librdkafka's connection chatter, told per broker as a fault: while a broker's link resets
//! every connection, librdkafka reports each disconnect and failed reconnect (several a
//! second). Those lines go through one [`Episodes`] for the process, keyed by the broker's
//! name (`host:port/id`, as librdkafka names it): the first is logged, then a summary at most
//! every [`SUMMARY_EVERY`], and a line when the statistics show the broker up again with no
//! trouble for [`QUIET_FOR`].

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::statistics::Statistics;

use crate::telemetry::{Episodes, Say};

/// How often a lasting broker fault is summarised.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);
/// How long a broker must be up without trouble before its fault is declared over (two
/// statistics intervals).
pub const QUIET_FOR: Duration = Duration::from_secs(10);

/// One per process: every client (producer, consumer, admin) talks to the same brokers.
static BROKERS: LazyLock<Episodes> = LazyLock::new(|| Episodes::new(SUMMARY_EVERY, QUIET_FOR));

/// The broker a librdkafka message is about: its leading `host:port/id` (or
/// `host:port/bootstrap`), `None` for a message about the client as a whole.
pub fn broker_of(message: &str) -> Option<&str> {
    // Log lines start with the thread: `[thrd:127.0.0.1:9092/1]: 127.0.0.1:9092/1: …`.
    let message = match message.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ")?.1,
        None => message,
    };
    let (name, _) = message.split_once(": ")?;
    // The consumer group's coordinator connection has a logical name of its own.
    if name == "GroupCoordinator" {
        return Some(name);
    }
    let (address, id) = name.rsplit_once('/')?;
    (!name.contains(' ') && address.contains(':') && !id.is_empty()).then_some(name)
}

/// librdkafka's log callback: connection messages about a broker are summarised per broker,
/// debug messages and messages about the client as a whole pass through as they are.
pub fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    let broker = match broker_of(message) {
        Some(b) if (level as i32) < RDKafkaLogLevel::Debug as i32 => b,
        _ => return pass_through(level, fac, message),
    };
    let say = BROKERS.fault(broker, Instant::now());
    tell(say, broker, &format!("{fac} {message}"), level);
}

/// Subject of "all brokers down", which librdkafka repeats each time a resetting link takes
/// the last connection down again.
const ALL_BROKERS: &str = "all brokers";

/// librdkafka's error callback: an error about one broker (a transport failure, a request
/// timed out) is one more signal of that broker's fault, "all brokers down" one of its own;
/// `false` for any other error (the caller logs it).
pub fn error(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    let broker = match broker_of(reason) {
        Some(b) => b,
        None if code == Some(RDKafkaErrorCode::AllBrokersDown) => ALL_BROKERS,
        None => return false,
    };
    let say = BROKERS.fault(broker, Instant::now());
    tell(say, broker, reason, RDKafkaLogLevel::Warning);
    true
}

/// Whether a client error is connection trouble, which [`error`] already tells per broker.
pub fn is_connection_error(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
}

/// From the periodic statistics: brokers up now end their fault once quiet long enough.
pub fn statistics(statistics: &Statistics) {
    let now = Instant::now();
    if crate::publish::brokers_up(statistics) {
        if let Some(say) = BROKERS.ok(ALL_BROKERS, now) {
            tell(say, ALL_BROKERS, "", RDKafkaLogLevel::Info);
        }
    }
    for (name, broker) in &statistics.brokers {
        if broker.state == "UP" {
            if let Some(say) = BROKERS.ok(name, now) {
                tell(say, name, "", RDKafkaLogLevel::Info);
            }
        }
    }
}

fn tell(say: Say, broker: &str, what: &str, level: RDKafkaLogLevel) {
    match say {
        Say::Start if (level as i32) <= RDKafkaLogLevel::Warning as i32 => tracing::warn!(
            target: "librdkafka", broker, "kafka broker {broker} (kafka.brokers): {what}; further connection messages of this broker are summarised"
        ),
        Say::Start => tracing::info!(
            target: "librdkafka", broker, "kafka broker {broker} (kafka.brokers): {what}; further connection messages of this broker are summarised"
        ),
        Say::Summary { held_back, lasting } => tracing::warn!(
            target: "librdkafka", broker, held_back, "kafka broker {broker} (kafka.brokers) still failing after {}s: {held_back} more connection messages, the last: {what}", lasting.as_secs()
        ),
        Say::Quiet => {}
        Say::End { signals, lasted } => tracing::info!(
            target: "librdkafka", broker, signals, "kafka broker {broker} (kafka.brokers) up again: {signals} connection messages over {:.1}s", lasted.as_secs_f64()
        ),
    }
}

/// What rdkafka's default log callback does.
fn pass_through(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_their_broker() {
        assert_eq!(
            broker_of("127.0.0.1:40001/2: Disconnected (after 12ms in state UP)"),
            Some("127.0.0.1:40001/2")
        );
        assert_eq!(
            broker_of(
                "sasl_ssl://kafka-1:9096/bootstrap: Connect to ipv4#10.0.0.1:9096 failed: refused"
            ),
            Some("sasl_ssl://kafka-1:9096/bootstrap")
        );
        assert_eq!(
            broker_of("[thrd:127.0.0.1:40001/2]: 127.0.0.1:40001/2: Connect to ipv4#127.0.0.1:40001 failed: Connection reset by peer (after 1ms in state CONNECT)"),
            Some("127.0.0.1:40001/2")
        );
        assert_eq!(
            broker_of(
                "[thrd:main]: Failed to acquire idempotence PID from broker 127.0.0.1:4/1: x"
            ),
            None
        );
        assert_eq!(
            broker_of("[thrd:GroupCoordinator]: GroupCoordinator: 127.0.0.1:4: Disconnected"),
            Some("GroupCoordinator")
        );
        assert_eq!(broker_of("1/1 brokers are down"), None);
        assert_eq!(broker_of("Local: All broker connections are down: x"), None);
    }
}
