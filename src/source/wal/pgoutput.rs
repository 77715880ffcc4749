//! pgoutput (protocol version 1) → committed transactions of outbox events.
//!
//! Read: BEGIN (the commit LSN is known up front), RELATION (column names of
//! `dualsync.outbox`), INSERT into it, transactional MESSAGE with prefix `dualsync`
//! (`dualsync.emit(...)`), COMMIT. Everything else (other tables, updates and deletes, types,
//! origins, messages of other prefixes) has no event in it and is passed over; its WAL
//! position is still confirmed once everything before it is published.

use std::collections::HashMap;

use uuid::Uuid;

use super::protocol::{get_cstr, get_i16, get_i32, get_u64, get_u8, take, PG_EPOCH_OFFSET_MICROS};
use super::version::{lsn_text, version};
use crate::error::{Error, WalError};
use crate::source::outbox::OutboxRow;

/// The logical-message prefix `dualsync.emit` writes with.
pub const MESSAGE_PREFIX: &str = "dualsync";
/// Namespace of the event ids derived for messages that carry none (v5 of the server's
/// system identifier and the message's LSN): the same message gets the same id when it is
/// streamed again.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6473_796e_6377_616c_8000_0000_0000_0001);

/// One committed transaction's outbox events, versions assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    pub commit_lsn: u64,
    /// The end of its commit record: confirming it means this transaction is done.
    pub end_lsn: u64,
    pub rows: Vec<OutboxRow>,
}

#[derive(Debug)]
struct Relation {
    is_outbox: bool,
    columns: Vec<String>,
}

#[derive(Debug)]
struct Open {
    commit_lsn: u64,
    commit_micros: i64,
    rows: Vec<OutboxRow>,
    /// Events so far per aggregate: the next one's position.
    positions: HashMap<(String, String), u32>,
}

/// Decodes one replication session's pgoutput messages.
#[derive(Debug)]
pub struct Decoder {
    relations: HashMap<u32, Relation>,
    open: Option<Open>,
    system_id: String,
}

impl Decoder {
    /// `system_id`: the server's (`IDENTIFY_SYSTEM`), part of derived message ids.
    pub fn new(system_id: String) -> Self {
        Self {
            relations: HashMap::new(),
            open: None,
            system_id,
        }
    }

    /// Whether a transaction is being received (a keepalive inside one is no position).
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Reads one pgoutput message; a COMMIT returns its transaction.
    pub fn decode(&mut self, mut data: &[u8]) -> Result<Option<Transaction>, Error> {
        let kind = get_u8(&mut data)?;
        match kind {
            b'B' => {
                let commit_lsn = get_u64(&mut data)?;
                let commit_micros = get_u64(&mut data)? as i64 + PG_EPOCH_OFFSET_MICROS;
                self.open = Some(Open {
                    commit_lsn,
                    commit_micros,
                    rows: Vec::new(),
                    positions: HashMap::new(),
                });
            }
            b'C' => {
                let _flags = get_u8(&mut data)?;
                let commit_lsn = get_u64(&mut data)?;
                let end_lsn = get_u64(&mut data)?;
                let open = self
                    .open
                    .take()
                    .ok_or_else(|| protocol("COMMIT without BEGIN"))?;
                if open.commit_lsn != commit_lsn {
                    return Err(protocol(&format!(
                        "COMMIT at {} for the transaction begun for {}",
                        lsn_text(commit_lsn),
                        lsn_text(open.commit_lsn)
                    )));
                }
                return Ok(Some(Transaction {
                    commit_lsn,
                    end_lsn,
                    rows: open.rows,
                }));
            }
            b'R' => {
                let oid = get_i32(&mut data)? as u32;
                let namespace = get_cstr(&mut data)?;
                let name = get_cstr(&mut data)?;
                let _identity = get_u8(&mut data)?;
                let n = get_i16(&mut data)?;
                let mut columns = Vec::with_capacity(n.max(0) as usize);
                for _ in 0..n {
                    let _flags = get_u8(&mut data)?;
                    columns.push(get_cstr(&mut data)?);
                    let _type = get_i32(&mut data)?;
                    let _typmod = get_i32(&mut data)?;
                }
                let is_outbox = namespace == "dualsync" && name == "outbox";
                self.relations.insert(oid, Relation { is_outbox, columns });
            }
            b'I' => {
                let oid = get_i32(&mut data)? as u32;
                let relation = self.relations.get(&oid).ok_or_else(|| {
                    protocol(&format!("INSERT into relation {oid} before its RELATION"))
                })?;
                if relation.is_outbox {
                    let _n = get_u8(&mut data)?;
                    let values = tuple(&mut data)?;
                    let row = outbox_row(&relation.columns, values)?;
                    self.push(row)?;
                }
            }
            b'M' => {
                let transactional = get_u8(&mut data)? & 1 == 1;
                let lsn = get_u64(&mut data)?;
                let prefix = get_cstr(&mut data)?;
                let len = get_i32(&mut data)?;
                let content = take(&mut data, len.max(0) as usize)?;
                if prefix != MESSAGE_PREFIX {
                    return Ok(None);
                }
                if !transactional || self.open.is_none() {
                    tracing::warn!(lsn = %lsn_text(lsn), "a non-transactional dualsync message is not an outbox event (dualsync.emit writes transactional ones); passed over");
                    return Ok(None);
                }
                let commit_micros = self.open.as_ref().map_or(0, |o| o.commit_micros);
                let row = message_row(&content, lsn, commit_micros, &self.system_id);
                self.push(row)?;
            }
            // Update, delete, truncate, type, origin: no outbox event.
            _ => {}
        }
        Ok(None)
    }

    /// Adds an event to the open transaction, with its version.
    fn push(&mut self, mut row: OutboxRow) -> Result<(), Error> {
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| protocol("a change outside a transaction"))?;
        let position = open
            .positions
            .entry((row.aggregate_type.clone(), row.aggregate_id.clone()))
            .or_insert(0);
        row.seq = version(open.commit_lsn, *position)?;
        *position += 1;
        row.committed_at_micros = open.commit_micros;
        open.rows.push(row);
        Ok(())
    }
}

fn protocol(what: &str) -> Error {
    WalError::Protocol(what.to_string()).into()
}

/// A TupleData's values as text (`None`: NULL or an unchanged TOAST value).
fn tuple(data: &mut &[u8]) -> Result<Vec<Option<String>>, Error> {
    let n = get_i16(data)?;
    let mut values = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        match get_u8(data)? {
            b'n' | b'u' => values.push(None),
            b't' | b'b' => {
                let len = get_i32(data)?;
                let bytes = take(data, len.max(0) as usize)?;
                values.push(Some(String::from_utf8_lossy(&bytes).into_owned()));
            }
            other => {
                return Err(protocol(&format!(
                    "unknown tuple value kind {:?}",
                    other as char
                )))
            }
        }
    }
    Ok(values)
}

/// An outbox INSERT's row (its `seq` field is set to the version afterwards).
fn outbox_row(columns: &[String], values: Vec<Option<String>>) -> Result<OutboxRow, Error> {
    let mut by_name: HashMap<&str, Option<String>> =
        columns.iter().map(String::as_str).zip(values).collect();
    let mut get = |name: &str| by_name.remove(name).flatten();
    let required = |value: Option<String>, name: &str| {
        value.ok_or_else(|| protocol(&format!("outbox INSERT without {name}")))
    };
    let id = required(get("id"), "id")?;
    let created_at = get("created_at").and_then(|t| timestamp_micros(&t));
    Ok(OutboxRow {
        seq: 0,
        id: id
            .parse()
            .map_err(|_| protocol(&format!("outbox id {id:?} is not a UUID")))?,
        aggregate_type: required(get("aggregatetype"), "aggregatetype")?,
        aggregate_id: required(get("aggregateid"), "aggregateid")?,
        event_type: required(get("type"), "type")?,
        payload: get("payload"),
        traceparent: get("traceparent"),
        created_at_micros: created_at.unwrap_or(0),
        committed_at_micros: 0,
    })
}

/// The content of a `dualsync.emit` message (docs/wal-capture.md#messages).
#[derive(serde::Deserialize)]
struct Emitted {
    id: Option<Uuid>,
    aggregatetype: String,
    aggregateid: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    payload: serde_json::Value,
    traceparent: Option<String>,
}

/// A logical message's event. Content that is not an event is kept as its payload under
/// type `dualsync.invalid_message`, so the relay's `on_invalid` policy dead-letters (or halts
/// on) it instead of it vanishing.
fn message_row(content: &[u8], lsn: u64, commit_micros: i64, system_id: &str) -> OutboxRow {
    let derived = Uuid::new_v5(
        &MESSAGE_ID_NAMESPACE,
        format!("{system_id}/{lsn}").as_bytes(),
    );
    let (id, aggregate_type, aggregate_id, event_type, payload, traceparent) =
        match serde_json::from_slice::<Emitted>(content) {
            Ok(e) => (
                e.id.unwrap_or(derived),
                e.aggregatetype,
                e.aggregateid,
                e.event_type,
                (!e.payload.is_null()).then(|| e.payload.to_string()),
                e.traceparent,
            ),
            Err(e) => {
                tracing::error!(lsn = %lsn_text(lsn), error = %e, "a dualsync message is not an outbox event");
                (
                    derived,
                    "dualsync.invalid_message".into(),
                    lsn_text(lsn),
                    "dualsync.invalid_message".into(),
                    // Not JSON on purpose: the relay dead-letters it with the raw text.
                    Some(format!(
                        "invalid message: {}",
                        String::from_utf8_lossy(content)
                    )),
                    None,
                )
            }
        };
    OutboxRow {
        seq: 0,
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        traceparent,
        created_at_micros: commit_micros,
        committed_at_micros: commit_micros,
    }
}

/// `2026-12-07 11:58:15.123456+00` (ISO DateStyle, UTC: pinned for the session) → micros
/// since the Unix epoch.
pub fn timestamp_micros(text: &str) -> Option<i64> {
    let local = text.strip_suffix("+00").unwrap_or(text);
    let time = humantime::parse_rfc3339_weak(local).ok()?;
    time.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests;
