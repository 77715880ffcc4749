//! dualsync: keep a secondary database in step with a primary one through Kafka.
//!
//! Stages: [`source`] (outbox rows or change streams) → [`relay`] + [`publish`] (Avro events
//! on Kafka, via [`mapping`] and [`codec`]) → [`apply`] (consumer group) → [`sink`]
//! (PostgreSQL or MongoDB), with [`dlq`] for what cannot be handled, [`error::classify`] deciding retry / dead-letter /
//! fatal and [`retry`] waiting out what is transient. Above the pipeline: [`reconcile`]
//! (verify, repair, snapshot) and [`ops`] (dead-letter inspection and replay). The layer
//! order (no module uses one above it) is in docs/contributors.md.

pub mod apply;
pub mod codec;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod error;
pub mod http;
pub mod mapping;
pub mod metrics;
pub mod ops;
pub mod pg;
pub mod publish;
pub mod reconcile;
pub mod reconcile_mongo;
pub mod relay;
pub mod repair_mongo;
pub mod retry;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod traces;
pub mod wire;
