//! dualsync: keep a secondary database in step with a primary one through Kafka.
//!
//! Stages: [`source`] (outbox rows) → [`relay`] + [`publish`] (Avro events on Kafka, via
//! [`codec`]) → [`apply`] (consumer group) → [`sink`] (PostgreSQL or MongoDB), with [`dlq`]
//! for what cannot be handled and [`error::classify`] deciding retry / dead-letter / fatal.

pub mod apply;
pub mod codec;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod error;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod pg;
pub mod publish;
pub mod reconcile;
pub mod relay;
pub mod retry;
pub mod sink;
pub mod source;
pub mod telemetry;
