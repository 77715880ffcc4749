//! The task that owns the replication connection while the relay leads: reads the stream,
//! decodes committed transactions into a bounded channel, answers the server's keepalives and
//! reports the confirmed position.
//!
//! A task of its own because the server must hear from the relay even while the relay does
//! not read (it waits for Kafka with a full pipeline): a walsender that hears nothing for
//! `wal_sender_timeout` ends the session. While the channel is full the task keeps sending
//! status updates and stops reading (TCP holds the server back: backpressure, not memory).

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::pgoutput::{Decoder, Transaction};
use super::protocol::{ReplicationConnection, StreamMessage};
use crate::error::{Error, WalError};

/// What the relay receives, in WAL order.
#[derive(Debug)]
pub enum Item {
    /// A committed transaction (possibly without outbox events).
    Transaction(Transaction),
    /// The server's position between transactions: nothing before it is left to publish
    /// beyond what came before it on this channel.
    Position(u64),
}

/// How often the task reports the confirmed position when it has not changed, asking the
/// server for an answer: the answer proves the connection still carries data both ways.
pub struct Timing {
    pub status_every: Duration,
    /// No message from the server this long: the connection is dead.
    pub silence: Duration,
}

/// Streams until the connection fails (the error is sent as the last item) or the receiver
/// is dropped.
pub async fn run(
    mut conn: ReplicationConnection,
    mut decoder: Decoder,
    items: mpsc::Sender<Result<Item, Error>>,
    mut confirmed: watch::Receiver<u64>,
    timing: Timing,
) {
    let result = stream(&mut conn, &mut decoder, &items, &mut confirmed, &timing).await;
    if let Err(e) = result {
        // The relay learns of it at its next read; a relay that is gone needs no telling.
        let _ = items.send(Err(e)).await;
    }
}

enum Event {
    Message(Result<StreamMessage, Error>),
    Confirmed,
    Tick,
}

async fn stream(
    conn: &mut ReplicationConnection,
    decoder: &mut Decoder,
    items: &mpsc::Sender<Result<Item, Error>>,
    confirmed: &mut watch::Receiver<u64>,
    timing: &Timing,
) -> Result<(), Error> {
    let mut ticker = tokio::time::interval(timing.status_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut reported = 0;
    loop {
        let event = tokio::select! {
            m = conn.next_message() => Event::Message(m),
            changed = confirmed.changed() => match changed {
                Ok(()) => Event::Confirmed,
                Err(_) => return Ok(()), // the source is gone
            },
            _ = ticker.tick() => Event::Tick,
        };
        match event {
            Event::Message(message) => {
                heard = Instant::now();
                match message? {
                    StreamMessage::XLogData { data, .. } => {
                        if let Some(t) = decoder.decode(&data)? {
                            let item = Ok(Item::Transaction(t));
                            if !send(conn, items, item, confirmed, timing).await? {
                                return Ok(());
                            }
                            // Not read while the relay was behind: no silence to count.
                            heard = Instant::now();
                        }
                    }
                    StreamMessage::Keepalive { wal_end, reply } => {
                        if !decoder.in_transaction() {
                            // Optional: a full channel drops it, a later one comes.
                            let _ = items.try_send(Ok(Item::Position(wal_end)));
                        }
                        if reply {
                            let now = *confirmed.borrow();
                            conn.send_status(now, false).await?;
                        }
                    }
                    StreamMessage::End => {
                        return Err(
                            WalError::Io("the server ended the replication stream".into()).into(),
                        )
                    }
                }
            }
            Event::Confirmed => {
                let now = *confirmed.borrow_and_update();
                if now > reported {
                    conn.send_status(now, false).await?;
                    reported = now;
                }
            }
            Event::Tick => {
                if heard.elapsed() > timing.silence {
                    return Err(WalError::Io(format!(
                        "no message from the server for {:?}",
                        heard.elapsed()
                    ))
                    .into());
                }
                let now = *confirmed.borrow();
                conn.send_status(now, true).await?;
                reported = reported.max(now);
            }
        }
    }
}

/// Sends an item, reporting the confirmed position meanwhile while the channel is full.
/// `false` when the receiver is gone.
async fn send(
    conn: &mut ReplicationConnection,
    items: &mpsc::Sender<Result<Item, Error>>,
    item: Result<Item, Error>,
    confirmed: &watch::Receiver<u64>,
    timing: &Timing,
) -> Result<bool, Error> {
    let mut ticker = tokio::time::interval(timing.status_every);
    ticker.tick().await;
    loop {
        tokio::select! {
            permit = items.reserve() => {
                return match permit {
                    Ok(permit) => {
                        permit.send(item);
                        Ok(true)
                    }
                    Err(_) => Ok(false),
                };
            }
            _ = ticker.tick() => {
                let now = *confirmed.borrow();
                conn.send_status(now, false).await?;
            }
        }
    }
}
