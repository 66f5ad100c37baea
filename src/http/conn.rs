//! Drives one HTTP/1.1 connection: read, frame, hand each request to a
//! [`Handler`], write responses in order (pipelining and keep-alive), and
//! enforce the buffer limits and timeouts.

use std::io;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{parse_head, write_error, Framing, RequestHead, HEAD_BYTES_MAX};
use crate::pressure::{Held, Pressure};
use crate::shutdown::Shutdown;

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub body_bytes_max: usize,
    /// From the first byte of a request to its last.
    pub request_timeout: Duration,
    /// Between requests on a keep-alive connection.
    pub idle_timeout: Duration,
}

/// One framed request. `body` is mutable so JSON can be parsed in place.
pub struct Request<'a> {
    pub head: &'a RequestHead,
    /// The head bytes; `head`'s ranges index them.
    pub head_bytes: &'a [u8],
    pub body: &'a mut [u8],
}

impl Request<'_> {
    /// The request path (without query string).
    pub fn path(&self) -> &[u8] {
        let p = &self.head_bytes[self.head.path.clone()];
        p.split(|&b| b == b'?').next().unwrap_or(p)
    }
    /// The value of query parameter `name` (raw, not percent-decoded).
    pub fn query(&self, name: &str) -> Option<&[u8]> {
        let p = &self.head_bytes[self.head.path.clone()];
        let q = p.splitn(2, |&b| b == b'?').nth(1)?;
        q.split(|&b| b == b'&').find_map(|kv| {
            let mut it = kv.splitn(2, |&b| b == b'=');
            (it.next()? == name.as_bytes()).then(|| it.next().unwrap_or(b""))
        })
    }
    /// A header value by its range.
    pub fn header(&self, r: &Option<std::ops::Range<usize>>) -> Option<&[u8]> {
        r.as_ref().map(|r| &self.head_bytes[r.clone()])
    }
}

/// Answers requests of one connection.
pub trait Handler {
    /// Writes the response to `out`; returns false to close the connection
    /// after it.
    #[allow(async_fn_in_trait)]
    async fn handle(&mut self, req: Request<'_>, out: &mut Vec<u8>) -> bool;

    /// Awaited before reading the next request from the socket: a handler
    /// may hold the connection here (backpressure) while its shard has no room.
    #[allow(async_fn_in_trait)]
    async fn before_read(&mut self) {}

    /// Runs after the connection's last answer is written, before it
    /// closes: a handler that answered with a stream (server-sent events)
    /// writes the rest of it here.
    #[allow(async_fn_in_trait)]
    async fn stream_after(&mut self, _stream: &mut TcpStream) {}

    /// Called once the answers handled so far are written to the socket.
    fn written(&mut self) {}

    /// Called when the connection itself refuses a request (framing error,
    /// timeout) with `status`, before any handler saw it.
    fn refused(&mut self, _status: u16) {}
}

const READ_CHUNK_BYTES: usize = 4096;

/// Serves `stream` until the peer closes, an error, a timeout, or shutdown.
///
/// With `pressure`, the connection's buffer counts against the shard's
/// memory budget for as long as it exists.
pub async fn serve<H: Handler>(
    stream: TcpStream,
    limits: Limits,
    handler: &mut H,
    shutdown: &Shutdown,
    pressure: Option<&Pressure>,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(limits.request_timeout));
    let mut conn = Conn::new(stream, limits, pressure);
    loop {
        let Some(need) = conn.answer_buffered(handler, shutdown).await else { return };
        if !conn.write_answers(handler).await {
            return;
        }
        conn.make_room(need);
        if !conn.read_more(handler, shutdown).await {
            return;
        }
    }
}

/// One connection's buffers: requests arrive in `buf[start..end]`,
/// answers collect in `out`.
struct Conn<'p> {
    stream: TcpStream,
    limits: Limits,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    request_started: Instant,
    pressure: Option<&'p Pressure>,
    /// `buf`'s bytes, counted against the shard's budget.
    held: Option<Held<'p>>,
}

impl<'p> Conn<'p> {
    fn new(stream: TcpStream, limits: Limits, pressure: Option<&'p Pressure>) -> Self {
        let buf = vec![0u8; READ_CHUNK_BYTES];
        let held = pressure.map(|p| p.hold(buf.len()));
        let out = Vec::with_capacity(512);
        Conn { stream, limits, buf, start: 0, end: 0, out, request_started: Instant::now(), pressure, held }
    }

    /// Answers every complete request already buffered (pipelining).
    /// Returns the bytes the next request needs in all (0: unknown yet), or
    /// None once the connection must close (its last answer written).
    async fn answer_buffered<H: Handler>(&mut self, handler: &mut H, shutdown: &Shutdown) -> Option<usize> {
        while self.start < self.end {
            let head = match parse_head(&self.buf[self.start..self.end], self.limits.body_bytes_max) {
                Framing::Partial => return Some(0),
                Framing::Error(e) => {
                    handler.refused(e.status);
                    write_error(&mut self.out, e.status, e.code, e.message, "", false);
                    let _ = self.stream.write_all(&self.out).await;
                    return None;
                }
                Framing::Head(h) => h,
            };
            let total = head.head_len + head.content_length;
            if self.end - self.start < total {
                return Some(total);
            }
            let (head_bytes, body) = self.buf[self.start..self.start + total].split_at_mut(head.head_len);
            let keep_alive = head.keep_alive;
            let keep = handler.handle(Request { head: &head, head_bytes, body }, &mut self.out).await;
            self.start += total;
            self.request_started = Instant::now();
            if !keep || !keep_alive || shutdown.is_set() {
                if self.stream.write_all(&self.out).await.is_ok() {
                    handler.written();
                    handler.stream_after(&mut self.stream).await;
                }
                return None;
            }
        }
        Some(0)
    }

    /// Writes the answers collected so far; gives back a large body's
    /// buffer once it is consumed. False if the peer is gone.
    async fn write_answers<H: Handler>(&mut self, handler: &mut H) -> bool {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            if self.buf.len() > 4 * READ_CHUNK_BYTES {
                self.buf = vec![0u8; READ_CHUNK_BYTES];
                self.held = self.pressure.map(|p| p.hold(self.buf.len()));
            }
        }
        if !self.out.is_empty() {
            if self.stream.write_all(&self.out).await.is_err() {
                return false;
            }
            handler.written();
            self.out.clear();
        }
        true
    }

    /// Makes room for the rest of the request (`need` bytes in all if known).
    fn make_room(&mut self, need: usize) {
        let buf_max = HEAD_BYTES_MAX + self.limits.body_bytes_max;
        let want = need.max(self.end - self.start + READ_CHUNK_BYTES).min(buf_max);
        if self.buf.len() - self.start < want {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
                drop(self.held.take());
                self.held = self.pressure.map(|p| p.hold(self.buf.len()));
            }
        }
    }

    /// Reads more bytes, within the idle or request deadline. False when
    /// the connection ends (peer closed, error, timeout, or shutdown while
    /// idle).
    async fn read_more<H: Handler>(&mut self, handler: &mut H, shutdown: &Shutdown) -> bool {
        let idle = self.start == self.end;
        if idle {
            // Only between requests: a request already started is read to
            // its end (its buffer is allocated and counted), so the gate can
            // never stall every connection mid-request.
            handler.before_read().await;
            if shutdown.is_set() {
                return false;
            }
        }
        let timeout = if idle {
            self.limits.idle_timeout
        } else {
            let left = self.limits.request_timeout.saturating_sub(self.request_started.elapsed());
            left.max(Duration::from_millis(1))
        };
        let _ = self.stream.set_read_timeout(Some(timeout));
        let (stream, buf, end) = (&mut self.stream, &mut self.buf, self.end);
        let read = if idle {
            let read = async { Some(stream.read(&mut buf[end..]).await) };
            futures_lite::future::or(read, async {
                shutdown.wait().await;
                None
            })
            .await
        } else {
            Some(stream.read(&mut buf[end..]).await)
        };
        match read {
            None | Some(Ok(0)) => false,
            Some(Ok(n)) => {
                if idle {
                    self.request_started = Instant::now();
                }
                self.end += n;
                true
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut && !idle => {
                handler.refused(408);
                write_error(&mut self.out, 408, "request_timeout", "request not completed in time", "", false);
                let _ = self.stream.write_all(&self.out).await;
                false
            }
            Some(Err(_)) => false,
        }
    }
}
