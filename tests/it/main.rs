//! Integration tests against the real servers started by `make up` (PostgreSQL, Apache Kafka,
//! the SecantusDB MongoDB server, the Apicurio schema registry).
//! One binary for all of them, to link once.

mod backlog;
mod chaos;
mod column_tables;
mod commit_lag;
mod common;
mod dashboard;
mod dead_letters;
mod dlq_commands;
mod dlq_tools;
mod end_to_end;
mod fake_registry;
mod fingerprints;
mod interop;
mod interop_confluent;
pub mod interop_java;
mod kafka;
mod layers;
mod logs;
mod mongo_delivery;
mod mongo_source;
mod mongo_verify;
mod new_topics;
pub mod operations;
mod outbox_order;
mod outbox_purge;
mod outbox_wakeup;
pub mod pipeline_scope;
mod private_kafka;
mod private_servers;
mod processes;
mod progress;
mod purge_horizon;
mod real_registry;
mod reconcile;
mod registry;
mod registry_faults;
mod relay_contract;
mod relay_control;
mod schema_evolution;
mod schema_folder;
mod shutdown;
mod sink_outage;
mod sinks;
mod subscriptions;
pub mod toxiproxy;
