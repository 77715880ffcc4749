//! What the relay's outbox leader needs of a capture mode beyond [`Source`]: polling the
//! table ([`OutboxSource`]) or streaming the WAL ([`WalSource`]). Both hand out the same
//! [`OutboxRow`]s under the same delivery contract, on a leader session with the same lock
//! and lease.

use std::future::Future;
use std::sync::Arc;

use tokio_postgres::Client;

use super::leader_lease::LeaderLease;
use super::outbox::{OutboxRow, OutboxSource};
use super::wal::WalSource;
use super::Source;
use crate::config::Capture;
use crate::error::Error;

/// An outbox source as the relay's leader drives it.
pub trait OutboxCapture: Source<Event = OutboxRow> {
    /// The leader's SQL session (the version guard's checks).
    fn client(&self) -> &Client;
    /// Whether this process may still publish as the leader.
    fn lease(&self) -> Arc<LeaderLease>;
    /// Events waiting to be published and the age in seconds of the oldest (a gauge); the
    /// query is also the lease's heartbeat on the leader session.
    fn backlog(&self) -> impl Future<Output = Result<(i64, f64), Error>> + Send;
    /// The relay is busy or paused: writers need not wake it.
    fn stop_waiting(&mut self) -> impl Future<Output = Result<(), Error>> + Send;
    /// How versions are made: the table's `seq`, or the commit LSN.
    fn capture(&self) -> Capture;
}

impl OutboxCapture for OutboxSource {
    fn client(&self) -> &Client {
        OutboxSource::client(self)
    }
    fn lease(&self) -> Arc<LeaderLease> {
        OutboxSource::lease(self)
    }
    async fn backlog(&self) -> Result<(i64, f64), Error> {
        OutboxSource::backlog(self).await
    }
    async fn stop_waiting(&mut self) -> Result<(), Error> {
        OutboxSource::stop_waiting(self).await
    }
    fn capture(&self) -> Capture {
        Capture::Poll
    }
}

impl OutboxCapture for WalSource {
    fn client(&self) -> &Client {
        WalSource::client(self)
    }
    fn lease(&self) -> Arc<LeaderLease> {
        WalSource::lease(self)
    }
    async fn backlog(&self) -> Result<(i64, f64), Error> {
        WalSource::backlog(self).await
    }
    /// Writers never wake a WAL relay: the stream brings their commits.
    async fn stop_waiting(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn capture(&self) -> Capture {
        Capture::Wal
    }
}
