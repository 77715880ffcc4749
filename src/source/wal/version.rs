//! The version of an event captured from the WAL: its transaction's commit LSN and its
//! position among the same aggregate's events in that transaction, as one `i64`.
//!
//! `version = (commit_lsn / 8) << 16 | position`. The WAL delivers transactions in commit
//! order and two commit records start at least 24 bytes apart (a WAL record's header alone
//! is 24 bytes), so `commit_lsn / 8` grows with every commit, and the position orders one
//! aggregate's events inside its transaction: versions grow with commit order per aggregate
//! without the writers' advisory lock. Bounds: 65,536 events of one aggregate in one
//! transaction, and a commit LSN below 2^50 (1 PiB of WAL written over the cluster's life,
//! `pg_current_wal_lsn()` below `40000/00000000`). Past either the relay stops with
//! [`WalError::VersionOverflow`], never wraps.
//!
//! Comparable with polling mode: a poll-mode version is the outbox `seq`, and the smallest
//! WAL version of a cluster is already `2^37` (a fresh cluster's WAL starts at 16 MiB), far
//! above any sequence a table reaches; the relay still checks, at start, that the slot's
//! first version is above the outbox sequence and what the topics hold.

use crate::error::WalError;

/// Bits of the position inside the transaction.
pub const POSITION_BITS: u32 = 16;
/// Commit LSNs at or above this do not fit.
pub const MAX_LSN: u64 = 1 << (63 - POSITION_BITS + 3);

/// The version of the `position`th event of one aggregate in the transaction committed at
/// `commit_lsn`.
pub fn version(commit_lsn: u64, position: u32) -> Result<i64, WalError> {
    if commit_lsn >= MAX_LSN {
        return Err(WalError::VersionOverflow(format!(
            "commit LSN {} is past {}, the largest WAL position the version encoding holds (docs/wal-capture.md#versions)",
            lsn_text(commit_lsn),
            lsn_text(MAX_LSN)
        )));
    }
    if position >= 1 << POSITION_BITS {
        return Err(WalError::VersionOverflow(format!(
            "a transaction committed at {} holds more than {} events of one aggregate, the most the version encoding numbers (docs/wal-capture.md#versions); split such transactions",
            lsn_text(commit_lsn),
            1u64 << POSITION_BITS
        )));
    }
    Ok((((commit_lsn >> 3) << POSITION_BITS) | u64::from(position)) as i64)
}

/// The smallest version a transaction committed at or after `lsn` can get.
pub fn floor(lsn: u64) -> i64 {
    ((lsn.min(MAX_LSN - 1) >> 3) << POSITION_BITS) as i64
}

/// An LSN as PostgreSQL writes it (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_commit_order_then_position() {
        // Two commits as close as WAL records can be (24 bytes apart), and a later one.
        let a = 0x1_6000_0028;
        let b = a + 24;
        assert!(version(a, 65_535).unwrap() < version(b, 0).unwrap());
        assert!(version(a, 0).unwrap() < version(a, 1).unwrap());
        assert!(version(b, 3).unwrap() < version(0x2_0000_0000, 0).unwrap());
        assert_eq!(floor(b), version(b, 0).unwrap());
    }

    #[test]
    fn overflow_is_an_error_never_a_wrap() {
        assert!(version(MAX_LSN - 8, 65_535).unwrap() > 0);
        assert!(matches!(
            version(MAX_LSN, 0),
            Err(WalError::VersionOverflow(_))
        ));
        assert!(matches!(
            version(0x100, 65_536),
            Err(WalError::VersionOverflow(_))
        ));
    }

    #[test]
    fn any_wal_version_is_above_a_poll_mode_sequence() {
        // initdb starts the WAL at 0/1000000.
        assert!(floor(0x100_0000) >= 1 << 37);
    }

    #[test]
    fn lsns_read_and_print_like_postgresql() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nope"), None);
    }
}
