//! The relay's contract tests run in both outbox capture modes: polling the table and
//! streaming the WAL. `Mode` sets a pipeline and its database up for one of them; completion
//! is judged by the topics (every outbox row's event id is there), which holds in both modes
//! (in WAL mode rows are never marked).

use std::collections::HashSet;

use rdkafka::message::OwnedMessage;

use dualsync::config::{Capture, Config, OutboxSourceConfig};
use dualsync::publish::headers;
use dualsync::source::wal::setup;

use crate::common::*;
use crate::wal_capture::SlotGuard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Poll,
    Wal,
}

/// What a mode set up in the database: the slot, dropped at the end of the test.
pub struct Prepared {
    pub slot: Option<SlotGuard>,
    slot_name: String,
}

impl Prepared {
    /// The `[source]` lines of this mode, for a pipeline written as TOML.
    pub fn source_lines(&self) -> String {
        match &self.slot {
            None => String::new(),
            Some(_) => format!(
                "capture = \"wal\"\nslot_name = \"{0}\"\npublication = \"{0}\"",
                self.slot_name
            ),
        }
    }

    /// Sets a parsed pipeline's source to this mode.
    pub fn apply(&self, source: &mut OutboxSourceConfig) {
        if self.slot.is_some() {
            source.capture = Capture::Wal;
            source.slot_name = self.slot_name.clone();
            source.publication = self.slot_name.clone();
        }
    }
}

impl Mode {
    /// Prepares the source database (the outbox already migrated): in WAL mode what
    /// `dualsync outbox migrate` sets up (publication, slot, the writers' trigger without the
    /// per-aggregate lock), for a pipeline no other pipeline polls the outbox beside.
    pub async fn prepare(self, client: &tokio_postgres::Client, url: &str) -> Prepared {
        self.prepare_for(client, url, "").await
    }

    /// [`Self::prepare`] as `dualsync outbox migrate` run for `pipeline`: a polling relay of
    /// that pipeline, stopped before the switch, no longer counts as polling the outbox.
    pub async fn prepare_for(
        self,
        client: &tokio_postgres::Client,
        url: &str,
        pipeline: &str,
    ) -> Prepared {
        let slot_name = unique("dswal");
        if self == Mode::Poll {
            return Prepared {
                slot: None,
                slot_name,
            };
        }
        let slot = Some(SlotGuard::new(url, &slot_name));
        let prepared = Prepared { slot, slot_name };
        let mut source: OutboxSourceConfig = toml::from_str(&format!("url = \"{url}\"")).unwrap();
        prepared.apply(&mut source);
        let done = setup::migrate(client, &source, pipeline).await.unwrap();
        assert_eq!(done.writers, setup::WritersTrigger::Unlocked);
        prepared
    }
}

/// Reads the topics of `types` until every outbox row of those types is there (by event id);
/// returns everything read.
pub async fn every_row_in_topics(
    client: &tokio_postgres::Client,
    config: &Config,
    types: &[&str],
) -> Vec<OwnedMessage> {
    let mut messages = Vec::new();
    for t in types {
        let want: HashSet<String> = client
            .query(
                "SELECT id::text FROM dualsync.outbox WHERE aggregatetype = $1",
                &[t],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        messages.extend(
            read_topic_until(
                &config.kafka.brokers,
                &config.kafka.topic_for(t),
                move |read| {
                    let got: HashSet<String> = read
                        .iter()
                        .filter_map(|m| header(m, headers::EVENT_ID))
                        .collect();
                    want.is_subset(&got)
                },
            )
            .await,
        );
    }
    messages
}
