//! Per-key order on an event topic, as a consumer sees it: within a partition, a key's
//! versions never decrease, except for a redelivery of an event already there (same version,
//! same bytes: a relay killed between Kafka's acknowledgement and marking its rows publishes
//! them again). A different event at a version at or below one already seen is an order
//! violation: two relays publishing at once, or a leader that kept publishing after losing
//! its lock.

use std::collections::{HashMap, HashSet};

use rdkafka::message::{Message, OwnedMessage};

use crate::common::header;

/// One line per violation (partition, key, the version that went backwards and the newest
/// before it). Messages without a version header (poison) are not events and are skipped.
/// `messages` are in (partition, offset) order, as `read_topic_until` returns them.
pub(super) fn violations(messages: &[OwnedMessage]) -> Vec<String> {
    #[derive(Default)]
    struct Key {
        newest: i64,
        seen: HashSet<(i64, Vec<u8>)>,
    }
    let mut keys: HashMap<(i32, Vec<u8>), Key> = HashMap::new();
    let mut out = Vec::new();
    for m in messages {
        let Some(version) =
            header(m, dualsync::publish::headers::VERSION).and_then(|v| v.parse::<i64>().ok())
        else {
            continue;
        };
        let key = m.key().unwrap_or_default().to_vec();
        let payload = m.payload().unwrap_or_default().to_vec();
        let k = keys.entry((m.partition(), key.clone())).or_default();
        if k.seen.contains(&(version, payload.clone())) {
            continue; // a redelivery of an identical event
        }
        if !k.seen.is_empty() && version <= k.newest {
            out.push(format!(
                "partition {} key {}: version {version} at offset {} after version {}",
                m.partition(),
                String::from_utf8_lossy(&key),
                m.offset(),
                k.newest
            ));
        }
        k.newest = k.newest.max(version);
        k.seen.insert((version, payload));
    }
    out
}

/// The check itself: a redelivered identical event passes, a different event at an older or
/// equal version of a key in its partition is flagged, other keys and partitions are apart.
#[test]
fn order_check_flags_a_version_going_back_but_not_a_redelivery() {
    use rdkafka::message::{OwnedHeaders, Timestamp};
    let event = |partition: i32, offset: i64, key: &str, version: i64, payload: &str| {
        let headers = OwnedHeaders::new().insert(rdkafka::message::Header {
            key: dualsync::publish::headers::VERSION,
            value: Some(&version.to_string()),
        });
        OwnedMessage::new(
            Some(payload.as_bytes().to_vec()),
            Some(key.as_bytes().to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            Some(headers),
        )
    };
    let fine = [
        event(0, 0, "a", 1, "a1"),
        event(0, 1, "a", 2, "a2"),
        event(0, 2, "b", 1, "b1"),
        event(0, 3, "a", 1, "a1"), // redelivered
        event(0, 4, "a", 2, "a2"),
        event(0, 5, "a", 3, "a3"),
        event(1, 0, "a", 1, "a1"), // another partition
    ];
    assert_eq!(violations(&fine), Vec::<String>::new());
    let backwards = [
        event(0, 0, "a", 2, "a2"),
        event(0, 1, "a", 1, "a1"),
        event(0, 2, "a", 2, "a2-other"),
    ];
    assert_eq!(
        violations(&backwards).len(),
        2,
        "{:?}",
        violations(&backwards)
    );
}
