//! Operations on a running pipeline's dead letters, above the pipeline itself: reading the
//! dead-letter topics back ([`inspect`]) and sending letters back after a fix ([`replay`]).
//! They use the relay and apply stages (to rebuild a message); the stages never use them.

pub mod inspect;
pub mod replay;
