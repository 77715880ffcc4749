-- dualsync outbox, `capture = "wal"` for every pipeline of this outbox. Applied by `dualsync
-- outbox migrate` right after outbox.sql, in the same transaction, once the replication slot
-- exists and when no pipeline polls the outbox (no other pipeline in dualsync.outbox_relays).
-- outbox.sql alone puts the polling triggers back: the safe mode, which a re-run of it by
-- hand or by an older dualsync returns to.
--
-- Writers then take no per-aggregate lock (the WAL relay orders by commit LSN), send no
-- NOTIFY (nothing waits for one), and their rows are born marked published: only the slot
-- carries them, which is why it must exist first. DROP TRIGGER locks the table exclusively: it waits for every
-- writer's transaction under the old trigger to end, and writers after it run the new one,
-- so no insert is numbered under a mode that no relay expects.

DROP TRIGGER IF EXISTS outbox_assign_seq ON dualsync.outbox;
CREATE TRIGGER outbox_assign_seq BEFORE INSERT ON dualsync.outbox
    FOR EACH ROW EXECUTE FUNCTION dualsync.outbox_assign_seq_unlocked();

DROP TRIGGER IF EXISTS outbox_notify ON dualsync.outbox;
