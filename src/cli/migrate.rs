//! What `dualsync outbox migrate` reports: the mode set up, and what the operator must still
//! do (a slot left holding WAL, rows the polling relay must publish before a switch).

use dualsync::config::{Capture, OutboxSourceConfig};
use dualsync::source::wal::setup::{Migrated, WritersTrigger};

pub fn summary(done: &Migrated, source: &OutboxSourceConfig) -> String {
    let mut lines = vec!["dualsync.outbox is up to date".to_string()];
    if done.capture == Capture::Wal {
        lines.push(format!(
            "capture = \"wal\": publication {} and replication slot {} are ready",
            source.publication, source.slot_name
        ));
        lines.push(match done.writers {
            WritersTrigger::Unlocked => {
                "writers' trigger: no per-aggregate lock, no NOTIFY (every pipeline of this outbox streams the WAL)".to_string()
            }
            WritersTrigger::Locking => format!(
                "writers' trigger: keeps the per-aggregate lock, as pipeline(s) {} poll this outbox (registered in dualsync.outbox_relays; delete their rows there if they no longer run, then migrate again)",
                done.polling_pipelines.join(", ")
            ),
        });
        if let Some(slot) = &done.slot_created {
            lines.push(format!(
                "slot created at {}: it streams what commits from there on",
                slot.lsn
            ));
            if slot.unpublished > 0 {
                lines.push(format!(
                    "{} unpublished rows (seq <= {}) were committed before the slot: the WAL relay publishes them from the table when it takes over, before it streams",
                    slot.unpublished,
                    slot.max_seq.unwrap_or(0)
                ));
            }
        }
    }
    if let Some(back) = &done.back_to_poll {
        lines.push(format!(
            "back to polling: writers take the per-aggregate lock again. The rows written without it are published only from the WAL: keep the WAL relay running until its slot's confirmed_flush_lsn passes {}, then stop it, run `dualsync outbox resequence` and start the polling relays (docs/outbox.md#switching)",
            back.lsn
        ));
    }
    if let Some(slot) = &done.leftover_slot {
        lines.push(format!(
            "warning: replication slot {} still exists ({}, retaining {} bytes of WAL on the primary); once no relay streams it, drop it: SELECT pg_drop_replication_slot('{}')",
            slot.slot,
            if slot.active { "active" } else { "inactive" },
            slot.retained_bytes.unwrap_or(0),
            slot.slot
        ));
    }
    lines.join("\n")
}
