//! The command front-ends of the `dualsync` binary: argument shapes, tables and JSON on
//! stdout, progress on stderr. The work itself is in the library.

pub mod args;
pub mod config;
pub mod dlq;
pub mod migrate;
pub mod progress;
pub mod reconcile;
pub mod report;
pub mod schema;
