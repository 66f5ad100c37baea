//! Durable peers, each driven through its own protocol with acknowledged,
//! fsynced writes (the servers are started with those settings by
//! scripts/bench.sh):
//!
//! - [`redis`]: Redis Streams, `appendfsync always`; `XADD`, consumer
//!   group `XREADGROUP` + `XACK`.
//! - [`nats`]: NATS JetStream, file storage, `sync_interval: always`;
//!   publish acks, a durable push consumer with explicit acks.
//! - [`amqp`]: RabbitMQ, a quorum queue, persistent messages, publisher
//!   confirms, consumer acks.
//!
//! Every peer gets the same load shape as esh3ar: a publisher connection
//! has one message in flight and waits for its durable acknowledgement;
//! receivers share one queue (the peers' best case) and ack what they get.

pub mod amqp;
pub mod nats;
pub mod redis;

use std::io;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

/// Largest frame or reply a peer connection buffers.
const BUFFER_BYTES_MAX: usize = 16 << 20;

/// Name of the queue, stream or subject every peer uses.
pub const QUEUE: &str = "bench";

/// A connection with a read buffer, shared by the protocol clients.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    pub out: Vec<u8>,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Self { stream, buf: vec![0; 16384], start: 0, end: 0, out: Vec::with_capacity(512) }
    }

    /// Unconsumed bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
    }

    /// Reads more bytes; `TimedOut` if a read timeout is set and passes.
    pub async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < 4096 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() - self.end < 4096 {
                if self.buf.len() >= BUFFER_BYTES_MAX {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "peer reply too large"));
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection"));
        }
        self.end += n;
        Ok(())
    }

    /// Writes and clears `out`.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(d).map_err(io::Error::from)
    }
}

/// True for the error a read timeout gives.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// An error for a protocol violation or refusal.
pub fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}
