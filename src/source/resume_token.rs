//! The position of a change inside its transaction, read from the change stream's resume
//! token.
//!
//! Every event of one multi-document transaction carries the transaction's cluster time; the
//! oplog orders them by their index in the transaction, and so does MongoDB's resume token:
//! `_data` is a hex KeyString of `(clusterTime, version, tokenType, txnOpIndex, …)` (see
//! `resume_token.cpp` in the server, and `mongodb-resumetoken-decoder`). Only that prefix is
//! read here. A server whose tokens are in another form (SecantusDB's are hex BSON) gets
//! `None`, and the source numbers the events of a transaction in stream order instead.

use mongodb::bson::{Document, Timestamp};

use super::mongo_change::MAX_TXN_INDEX;
use super::mongo_offsets::TxnPlace;

/// The position in its transaction of a change at `cluster_time` with resume token `token`:
/// the token's `txnOpIndex` where the server encodes it (MongoDB), otherwise one more than the
/// change read before it (`previous`) when that has the same cluster time (only the changes of
/// one transaction share a cluster time), else 0. `previous` survives restarts in the saved
/// position, so a relay resuming inside a transaction numbers its rest as before.
pub fn place(token: Option<&Document>, cluster_time: Timestamp, previous: Option<TxnPlace>) -> u64 {
    let from_token = token
        .and_then(txn_op_index)
        .filter(|(at, _)| *at == cluster_time)
        .map(|(_, index)| index);
    let index = from_token.unwrap_or(match previous {
        Some((at, index)) if at == cluster_time => index + 1,
        _ => 0,
    });
    if index == MAX_TXN_INDEX + 1 {
        tracing::warn!(
            ?cluster_time,
            "transaction with more than {} changes: the rest share one version, so a document changed twice among them may keep the earlier change",
            MAX_TXN_INDEX + 1
        );
    }
    index
}

/// KeyString type bytes (`key_string.cpp`) of the values in a token's prefix.
const TIMESTAMP: u8 = 130;
const NUMERIC_ZERO: u8 = 41;
const POSITIVE_1_BYTE_INT: u8 = 43;
const POSITIVE_8_BYTE_INT: u8 = 50;

/// `(clusterTime, txnOpIndex)` of a MongoDB resume token; `None` when `token` is not one.
pub fn txn_op_index(token: &Document) -> Option<(Timestamp, u64)> {
    let hex = token.get_str("_data").ok()?;
    let bytes = decode_hex(hex)?;
    let mut reader = Reader(&bytes);
    if reader.byte()? != TIMESTAMP {
        return None;
    }
    let time = u32::from_be_bytes(reader.take(4)?.try_into().ok()?);
    let increment = u32::from_be_bytes(reader.take(4)?.try_into().ok()?);
    let version = reader.uint()?;
    if version >= 1 {
        reader.uint()?; // tokenType
    }
    let index = reader.uint()?;
    Some((Timestamp { time, increment }, index))
}

/// The cluster time a resume token stands for: MongoDB's KeyString prefix, or the `t` field of
/// SecantusDB's hex BSON token; `None` for a token in another form.
pub fn cluster_time_of(token: &Document) -> Option<Timestamp> {
    if let Some((time, _)) = txn_op_index(token) {
        return Some(time);
    }
    let bytes = decode_hex(token.get_str("_data").ok()?)?;
    Document::from_reader(bytes.as_slice())
        .ok()?
        .get_timestamp("t")
        .ok()
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*first)
    }

    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// A non-negative integer: zero, or 1 to 8 big-endian bytes holding `value << 1` (the low
    /// bit flags a fractional part, which an index never has).
    fn uint(&mut self) -> Option<u64> {
        match self.byte()? {
            NUMERIC_ZERO => Some(0),
            ctype @ POSITIVE_1_BYTE_INT..=POSITIVE_8_BYTE_INT => {
                let n = usize::from(ctype - POSITIVE_1_BYTE_INT + 1);
                let encoded = self
                    .take(n)?
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                (encoded & 1 == 0).then_some(encoded >> 1)
            }
            _ => None,
        }
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    fn token(data: &str) -> Document {
        doc! {"_data": data}
    }

    /// A post-batch token SecantusDB 0.7.0b3 returned (read with pymongo): hex BSON whose
    /// `t` is the cluster time Timestamp(1796329722, 10) pymongo reported for the last event.
    #[test]
    fn cluster_time_of_a_secantusdb_token() {
        let t = token("45000000107300f6d101001174000a000000fad0116b026e001600000070726f62655f6d765f313739363332393732322e6300036b000e000000105f696400020000000000");
        assert_eq!(
            cluster_time_of(&t),
            Some(Timestamp {
                time: 1796329722,
                increment: 10
            })
        );
        assert_eq!(cluster_time_of(&token("zz")), None);
    }

    /// Expected values from an independent decoder, mongodb-js/mongodb-resumetoken-decoder
    /// 1.1.2 (`decodeResumeToken`), run on the same tokens: the first two are tokens of real
    /// servers from its test suite, the others the first with a different `txnOpIndex`.
    #[test]
    fn reads_cluster_time_and_txn_op_index_as_mongodb_encodes_them() {
        let t = |time, increment| Timestamp { time, increment };
        for (data, expected) in [
            ("826275077A000000012B042C0100296E5A1004BFFDB617400E486099007C0E0048B305463C6F7065726174696F6E54797065003C696E736572740046646F63756D656E744B65790046645F696400646275077A2F3159F971E405C6000004", (t(1651836794, 1), 0)),
            ("82612F653E000000022B0229296E04", (t(1630496062, 2), 0)),
            ("826275077A000000052B042C01002B066E5A1004BFFDB617400E486099007C0E0048B305463C6F7065726174696F6E54797065003C696E736572740046646F63756D656E744B65790046645F696400646275077A2F3159F971E405C6000004", (t(1651836794, 5), 3)),
            ("826275077A000000052B042C01002C03E86E5A1004BFFDB617400E486099007C0E0048B30504", (t(1651836794, 5), 500)),
            ("826275077A000000052B022C01002D01E2406E04", (t(1651836794, 5), 61728)),
        ] {
            assert_eq!(txn_op_index(&token(data)), Some(expected), "{data}");
        }
    }

    #[test]
    fn without_a_txn_op_index_changes_are_numbered_in_stream_order() {
        let at = Timestamp {
            time: 7,
            increment: 3,
        };
        let later = Timestamp {
            time: 7,
            increment: 4,
        };
        let secantus = doc! {"_data": "44"};
        assert_eq!(place(Some(&secantus), at, None), 0);
        assert_eq!(place(Some(&secantus), at, Some((at, 0))), 1);
        assert_eq!(place(Some(&secantus), at, Some((at, 5))), 6);
        assert_eq!(place(Some(&secantus), later, Some((at, 5))), 0);
        // A MongoDB token's own index wins, if it is for this cluster time.
        let mongo = token("826275077A000000052B042C01002B066E04");
        let its = Timestamp {
            time: 1651836794,
            increment: 5,
        };
        assert_eq!(place(Some(&mongo), its, Some((its, 9))), 3);
        assert_eq!(place(Some(&mongo), at, Some((at, 9))), 10);
    }

    #[test]
    fn other_token_forms_are_not_guessed_at() {
        // SecantusDB: hex BSON {s, t, n, k}.
        let secantus = "44000000107300030000001174000500000033a3116b026e00130000006d6670726f62655f65363439613663302e7800036b0010000000025f6964000200000061000000";
        assert_eq!(txn_op_index(&token(secantus)), None);
        assert_eq!(txn_op_index(&token("82")), None);
        assert_eq!(txn_op_index(&token("zz")), None);
        assert_eq!(txn_op_index(&doc! {"other": 1}), None);
    }
}
