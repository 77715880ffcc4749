//! Why the primary is not ready for `capture = "wal"`: each message names the setting and
//! the statement that fixes it, as the operator reading it has only the log line.

/// The source database lacks something logical replication needs, or holds a slot or a
/// publication of the configured name that is not what dualsync creates. Fatal: waiting
/// changes none of it.
#[derive(Debug, thiserror::Error)]
pub enum WalSetupError {
    #[error("wal_level is {current:?} on the source server (source.url), and source.capture = \"wal\" needs logical decoding: set wal_level = logical (postgresql.conf, or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL, or use source.capture = \"poll\"")]
    WalLevel { current: String },
    #[error("role {role:?} (source.url) has neither the REPLICATION attribute nor superuser, and source.capture = \"wal\" creates and streams a replication slot: run ALTER ROLE {role} REPLICATION as a superuser, or connect as a role that has it")]
    NotReplication { role: String },
    #[error("cannot create replication slot {slot:?} (source.slot_name): all max_replication_slots = {max} slots of the source server are taken ({used} exist). Drop an unused one (SELECT slot_name, active, database FROM pg_replication_slots; SELECT pg_drop_replication_slot('name')) or raise max_replication_slots and restart PostgreSQL")]
    SlotsExhausted { slot: String, max: i32, used: i64 },
    #[error("replication slot {slot:?} (source.slot_name) exists but is {found}, where dualsync needs a logical slot with plugin pgoutput in this database: set another source.slot_name, or drop that slot if nothing uses it")]
    SlotMismatch { slot: String, found: String },
    #[error("replication slot {slot:?} (source.slot_name) does not exist: run `dualsync outbox migrate --config <file>` (it creates it). If this pipeline streamed from a slot of that name before, the relay will not silently start a new one: the events committed since it was dropped are not in any stream, so after migrate re-publish them with `dualsync verify --repair` (docs/outbox.md#when-the-slot-is-lost)")]
    SlotMissing { slot: String },
    #[error("publication {publication:?} (source.publication) exists but {found}, where dualsync needs one that publishes only INSERTs of dualsync.outbox: set another source.publication, or DROP PUBLICATION {publication} and run `dualsync outbox migrate` again")]
    PublicationMismatch { publication: String, found: String },
    /// A polling relay on an outbox whose insert trigger was set up for WAL capture: `seq`
    /// no longer follows commit order per aggregate, so polling could reorder.
    #[error("dualsync.outbox's insert trigger takes no per-aggregate lock (set up for capture = \"wal\"), so polling would publish an aggregate's events out of commit order: run `dualsync outbox migrate --config <file>` with this pipeline's configuration (capture = \"poll\") before starting a polling relay")]
    WritersUnlocked,
}
