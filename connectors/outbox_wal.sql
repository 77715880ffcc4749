-- dualsync outbox, `capture = "wal"` for every pipeline of this outbox. Applied by `dualsync
-- outbox migrate` right after outbox.sql, in the same transaction, when no pipeline polls the
-- outbox (no other pipeline in dualsync.outbox_relays). outbox.sql alone puts the polling
-- triggers back: the safe mode, which any re-run of it (an older dualsync, `outbox
-- resequence`, a hand-applied file) returns to.
--
-- Writers then take no per-aggregate lock (the WAL relay orders by commit LSN) and send no
-- NOTIFY (nothing waits for one). DROP TRIGGER locks the table exclusively: it waits for every
-- writer's transaction under the old trigger to end, and writers after it run the new one,
-- so no insert is numbered under a mode that no relay expects.

DROP TRIGGER IF EXISTS outbox_assign_seq ON dualsync.outbox;
CREATE TRIGGER outbox_assign_seq BEFORE INSERT ON dualsync.outbox
    FOR EACH ROW EXECUTE FUNCTION dualsync.outbox_assign_seq_unlocked();

DROP TRIGGER IF EXISTS outbox_notify ON dualsync.outbox;
