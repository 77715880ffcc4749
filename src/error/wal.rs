//! Errors of the outbox's WAL capture (`[source] capture = "wal"`).

/// What went wrong on the replication connection or in the stream it carries.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The connection broke or could not be opened: reconnect with backoff, stream again from
    /// the slot's confirmed position (nothing is skipped).
    #[error("replication connection: {0}")]
    Io(String),
    /// The server sent something this client cannot read. Retried like a lost connection
    /// (streaming restarts from the slot's confirmed position): a skipped message would be a gap.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// The server refused a command (its SQLSTATE decides: 55006, the slot is streamed by
    /// another session, is a standby's wait).
    #[error("{message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    /// The slot is gone or invalidated (`max_slot_wal_keep_size`): the WAL since its position
    /// is no longer there, so streaming on would silently skip events.
    #[error("replication slot {slot:?} (source.slot_name) is lost ({reason}): the WAL since its last confirmed position is gone, so the relay cannot stream on without a gap. Recover as docs/outbox.md#when-the-slot-is-lost says: drop the slot, `dualsync outbox migrate` to create it anew, then `dualsync verify --repair` (or `dualsync snapshot`) to re-publish what the gap held")]
    SlotLost { slot: String, reason: String },
    /// A version does not fit the i64 encoding (docs/wal-capture.md#versions).
    #[error("{0}")]
    VersionOverflow(String),
}

impl WalError {
    /// The server's SQLSTATE, when the server refused something.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            WalError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}
