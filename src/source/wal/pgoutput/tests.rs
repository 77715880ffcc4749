use bytes::{BufMut, BytesMut};

use super::*;
use crate::source::wal::version::version as v;

fn begin(commit_lsn: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(commit_lsn);
    b.put_i64(1_000_000); // 2000-01-01 00:00:01
    b.put_i32(700);
    b.to_vec()
}

fn commit(commit_lsn: u64, end: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(commit_lsn);
    b.put_u64(end);
    b.put_i64(1_000_000);
    b.to_vec()
}

fn relation(oid: u32, namespace: &str, name: &str, columns: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(oid);
    for s in [namespace, name] {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(b'd');
    b.put_i16(columns.len() as i16);
    for c in columns {
        b.put_u8(0);
        b.put_slice(c.as_bytes());
        b.put_u8(0);
        b.put_u32(25);
        b.put_i32(-1);
    }
    b.to_vec()
}

fn insert(oid: u32, values: &[Option<&str>]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(oid);
    b.put_u8(b'N');
    b.put_i16(values.len() as i16);
    for value in values {
        match value {
            None => b.put_u8(b'n'),
            Some(text) => {
                b.put_u8(b't');
                b.put_i32(text.len() as i32);
                b.put_slice(text.as_bytes());
            }
        }
    }
    b.to_vec()
}

fn message(transactional: bool, lsn: u64, prefix: &str, content: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(b'M');
    b.put_u8(u8::from(transactional));
    b.put_u64(lsn);
    b.put_slice(prefix.as_bytes());
    b.put_u8(0);
    b.put_i32(content.len() as i32);
    b.put_slice(content.as_bytes());
    b.to_vec()
}

const COLUMNS: &[&str] = &[
    "seq",
    "id",
    "aggregatetype",
    "aggregateid",
    "type",
    "payload",
    "traceparent",
    "created_at",
    "txid",
    "published_at",
];
const ID1: &str = "00000000-0000-0000-0000-00000000000a";
const ID2: &str = "00000000-0000-0000-0000-00000000000b";

fn outbox_insert(id: &str, aggregate: &str, payload: Option<&str>) -> Vec<u8> {
    insert(
        16_400,
        &[
            Some("17"),
            Some(id),
            Some("orders"),
            Some(aggregate),
            Some("OrderPlaced"),
            payload,
            None,
            Some("2026-12-07 11:58:15.123456+00"),
            Some("812"),
            None,
        ],
    )
}

#[test]
fn a_transaction_s_inserts_and_messages_become_versioned_events() {
    let mut d = Decoder::new("7400".into());
    let lsn = 0x1_6000_0028;
    assert_eq!(d.decode(&begin(lsn)).unwrap(), None);
    d.decode(&relation(16_400, "dualsync", "outbox", COLUMNS))
        .unwrap();
    d.decode(&relation(16_500, "public", "other", &["a"]))
        .unwrap();
    d.decode(&outbox_insert(ID1, "o-1", Some(r#"{"n": 1}"#)))
        .unwrap();
    d.decode(&insert(16_500, &[Some("x")])).unwrap();
    d.decode(&outbox_insert(ID2, "o-2", None)).unwrap();
    d.decode(&message(
        true,
        lsn - 8,
        "dualsync",
        r#"{"aggregatetype":"orders","aggregateid":"o-1","type":"OrderShipped","payload":{"n":2}}"#,
    ))
    .unwrap();
    d.decode(&message(true, lsn - 4, "someone-else", "x"))
        .unwrap();
    let t = d
        .decode(&commit(lsn, lsn + 48))
        .unwrap()
        .expect("a transaction");
    assert_eq!((t.commit_lsn, t.end_lsn), (lsn, lsn + 48));
    let summary: Vec<_> = t
        .rows
        .iter()
        .map(|r| {
            (
                r.aggregate_id.as_str(),
                r.event_type.as_str(),
                r.seq,
                r.payload.as_deref(),
            )
        })
        .collect();
    // o-1 has two events: positions 0 and 1; o-2 its own position 0.
    assert_eq!(
        summary,
        vec![
            (
                "o-1",
                "OrderPlaced",
                v(lsn, 0).unwrap(),
                Some(r#"{"n": 1}"#)
            ),
            ("o-2", "OrderPlaced", v(lsn, 0).unwrap(), None),
            (
                "o-1",
                "OrderShipped",
                v(lsn, 1).unwrap(),
                Some(r#"{"n":2}"#)
            ),
        ]
    );
    let first = &t.rows[0];
    assert_eq!(first.id.to_string(), ID1);
    assert_eq!(first.created_at_micros, 1_796_644_695_123_456);
    assert_eq!(
        first.committed_at_micros,
        PG_EPOCH_OFFSET_MICROS + 1_000_000
    );
}

#[test]
fn a_message_without_id_gets_the_same_id_each_time_it_is_streamed() {
    let content = r#"{"aggregatetype":"orders","aggregateid":"o-1","type":"T","payload":null}"#;
    let ids: Vec<Uuid> = (0..2)
        .map(|_| {
            let mut d = Decoder::new("7400".into());
            d.decode(&begin(0x2000)).unwrap();
            d.decode(&message(true, 0x1F00, "dualsync", content))
                .unwrap();
            let t = d.decode(&commit(0x2000, 0x2030)).unwrap().unwrap();
            assert_eq!(t.rows[0].payload, None);
            t.rows[0].id
        })
        .collect();
    assert_eq!(ids[0], ids[1]);
    let mut d = Decoder::new("7400".into());
    d.decode(&begin(0x3000)).unwrap();
    d.decode(&message(true, 0x2F00, "dualsync", content))
        .unwrap();
    let other = d.decode(&commit(0x3000, 0x3030)).unwrap().unwrap();
    assert_ne!(other.rows[0].id, ids[0], "another message, another id");
}

#[test]
fn a_message_that_is_no_event_is_kept_for_the_dead_letter_policy() {
    let mut d = Decoder::new("1".into());
    d.decode(&begin(0x2000)).unwrap();
    d.decode(&message(true, 0x1F00, "dualsync", "not json"))
        .unwrap();
    let t = d.decode(&commit(0x2000, 0x2030)).unwrap().unwrap();
    assert_eq!(t.rows[0].event_type, "dualsync.invalid_message");
    assert!(
        serde_json::from_str::<serde_json::Value>(t.rows[0].payload.as_deref().unwrap()).is_err()
    );
}

#[test]
fn garbled_streams_are_errors_not_skips() {
    let mut d = Decoder::new("1".into());
    assert!(
        d.decode(&commit(0x10, 0x20)).is_err(),
        "COMMIT without BEGIN"
    );
    d.decode(&begin(0x10)).unwrap();
    assert!(
        d.decode(&outbox_insert(ID1, "o", None)).is_err(),
        "unknown relation"
    );
    assert!(d.decode(&[b'I', 0, 0]).is_err(), "truncated");
}
