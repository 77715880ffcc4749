//! Integration tests against the real servers started by `make up` (PostgreSQL, Apache Kafka,
//! the SecantusDB MongoDB server). One binary for all of them, to link once.

mod backlog;
mod chaos;
mod column_tables;
mod common;
mod dead_letters;
mod dlq_tools;
mod end_to_end;
mod fake_registry;
mod kafka;
mod mongo_source;
pub mod operations;
mod outbox_order;
mod outbox_purge;
pub mod pipeline_scope;
mod private_kafka;
mod private_servers;
mod processes;
mod reconcile;
mod registry;
mod relay_contract;
mod shutdown;
mod sink_outage;
mod sinks;
mod subscriptions;
