//! The CopyBoth phase of a replication session: WAL data in, status updates out, and a
//! receive timeout so a frozen server or network is noticed.

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

use super::conn::{ReplicationError, Wire};
use super::protocol::{self, ReplicationMessage};
use crate::liveness::Beat;
use crate::types::Lsn;

/// The CopyBoth phase of a replication session.
pub struct ReplicationStream {
    wire: Wire,
    ended: bool,
    /// Silence longer than this ends the stream with [`ReplicationError::ReceiveTimeout`].
    receive_timeout: Duration,
    /// When bytes last arrived.
    last_heard: Instant,
    /// A status update asking for a reply went out since `last_heard`.
    pinged: bool,
    /// The positions of the last status update, repeated by a ping.
    last_status: (Lsn, Lsn, Lsn),
    /// Stamped when bytes arrive, armed while the stream lives.
    beat: Option<Beat>,
}

impl ReplicationStream {
    pub(crate) fn new(wire: Wire, receive_timeout: Duration) -> ReplicationStream {
        ReplicationStream {
            wire,
            ended: false,
            receive_timeout,
            last_heard: Instant::now(),
            pinged: false,
            last_status: (Lsn::ZERO, Lsn::ZERO, Lsn::ZERO),
            beat: None,
        }
    }

    /// Stamps `beat` whenever the server sends something; the beat counts as stalled
    /// after half the receive timeout of silence, until the stream is dropped.
    pub fn watch(&mut self, beat: Beat) {
        beat.arm(self.receive_timeout / 2);
        self.wire.set_beat(beat.clone());
        self.beat = Some(beat);
    }

    /// After this much silence a status update asking for a reply goes out: a live server
    /// answers at once, even when it has nothing to send.
    fn ping_after(&self) -> Duration {
        self.receive_timeout / 3
    }

    /// The next XLogData or keepalive; `Ok(None)` once the server ended the stream with
    /// CopyDone. Cancel-safe: dropping the future loses no data, so it may sit in `select!`.
    pub async fn recv(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            if let Some(frame) = self.wire.take_frame()? {
                match frame.tag {
                    b'd' => {
                        let msg = protocol::parse_copy_data(&frame.body)
                            .map_err(|e| self.wire.protocol(e))?;
                        return Ok(Some(msg));
                    }
                    b'c' => {
                        self.ended = true;
                        return Ok(None);
                    }
                    b'E' => return Err(self.wire.server_error(&frame.body)),
                    b'N' => self.wire.log_notice(&frame.body),
                    b'S' => {}
                    other => return Err(self.wire.unexpected(other, "streaming")),
                }
                continue;
            }
            self.wait_for_bytes().await?;
        }
    }

    /// Reads more bytes, pinging the server when it has been quiet and failing when it
    /// stays quiet past the receive timeout.
    async fn wait_for_bytes(&mut self) -> Result<(), ReplicationError> {
        let dead_at = self.last_heard + self.receive_timeout;
        let ping_at = self.last_heard + self.ping_after();
        if Instant::now() >= dead_at {
            return Err(ReplicationError::ReceiveTimeout {
                addr: self.wire.addr.clone(),
                after: self.receive_timeout,
            });
        }
        if !self.pinged && Instant::now() >= ping_at {
            let (write, flush, apply) = self.last_status;
            self.wire.queue(&status_message(write, flush, apply, true));
            self.pinged = true;
        }
        if self.wire.has_pending() {
            // A peer that stopped reading fills the socket buffers: bounded by the deadline.
            if tokio::time::timeout_at(dead_at, self.wire.flush_pending())
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        let wake = if self.pinged { dead_at } else { ping_at };
        if let Ok(read) = tokio::time::timeout_at(wake, self.wire.fill()).await {
            read?;
            self.last_heard = Instant::now();
            self.pinged = false;
        }
        Ok(())
    }

    /// Sends a standby status update: WAL up to `write` received, up to `flush` durable
    /// (the slot may advance to it), up to `apply` applied. A cancelled call leaves the
    /// rest of the message queued, and the next send or receive writes it.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        self.last_status = (write, flush, apply);
        self.wire
            .send(&status_message(write, flush, apply, reply_requested))
            .await
    }

    /// Ends the stream cleanly: CopyDone, then waits up to `wait` for the server's CopyDone
    /// and the end of the command (WAL data still in flight is discarded), then Terminate.
    /// The server handles messages in order, so a status update sent before this is
    /// processed once it returns `Ok`.
    pub async fn finish(mut self, wait: Duration) -> Result<(), ReplicationError> {
        let mut out = BytesMut::new();
        if !self.ended {
            frontend::copy_done(&mut out);
            self.wire.send(&out).await?;
            out.clear();
        }
        let drained = tokio::time::timeout(wait, async {
            loop {
                let frame = self.wire.read_frame().await?;
                match frame.tag {
                    b'Z' => return Ok(()),
                    b'E' => return Err(self.wire.server_error(&frame.body)),
                    b'N' => self.wire.log_notice(&frame.body),
                    // XLogData and keepalives sent before the server saw CopyDone, its own
                    // CopyDone, CommandComplete, ParameterStatus.
                    b'd' | b'c' | b'C' | b'S' => {}
                    other => return Err(self.wire.unexpected(other, "ending the stream")),
                }
            }
        })
        .await;
        frontend::terminate(&mut out);
        if let Err(e) = self.wire.send(&out).await {
            tracing::debug!(error = %e, "sending Terminate failed");
        }
        self.wire.shutdown().await;
        drained.unwrap_or_else(|_| {
            Err(ReplicationError::BadReply {
                addr: self.wire.addr.clone(),
                command: "CopyDone",
                reason: format!("no answer within {}s", wait.as_secs()),
            })
        })
    }

    /// Ends the stream (CopyDone) and the session (Terminate).
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        if !self.ended {
            frontend::copy_done(&mut out);
        }
        frontend::terminate(&mut out);
        if let Err(e) = self.wire.send(&out).await {
            tracing::debug!(error = %e, "closing the replication stream failed");
        }
        self.wire.shutdown().await;
    }
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        // No stream, no stall: reconnecting is idle by design.
        if let Some(beat) = &self.beat {
            beat.disarm();
        }
    }
}

fn status_message(write: Lsn, flush: Lsn, apply: Lsn, reply_requested: bool) -> BytesMut {
    let payload =
        protocol::encode_standby_status(write, flush, apply, protocol::pg_now(), reply_requested);
    let mut out = BytesMut::with_capacity(payload.len() + 5);
    protocol::encode_copy_data(&payload, &mut out);
    out
}
