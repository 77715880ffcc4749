//! The outbox captured from the write-ahead log (`[source] capture = "wal"`).

pub mod setup;
pub mod slot_health;
