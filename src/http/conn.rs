//! Drives one HTTP/1.1 connection: read, frame, hand each request to a
//! [`Handler`], write responses in order (pipelining and keep-alive), and
//! enforce the buffer limits and timeouts.

use std::io;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{parse_head, write_error, Framing, RequestHead, HEAD_BYTES_MAX};
use crate::pressure::Pressure;
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
}

const READ_CHUNK_BYTES: usize = 4096;

/// Serves `stream` until the peer closes, an error, a timeout, or shutdown.
///
/// With `pressure`, the connection's buffer counts against the shard's
/// memory budget for as long as it exists.
pub async fn serve<H: Handler>(
    mut stream: TcpStream,
    limits: Limits,
    handler: &mut H,
    shutdown: &Shutdown,
    pressure: Option<&Pressure>,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(limits.request_timeout));
    let buf_max = HEAD_BYTES_MAX + limits.body_bytes_max;
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut held = pressure.map(|p| p.hold(buf.len()));
    let (mut start, mut end) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut request_started = Instant::now();
    loop {
        // Answer every complete request already buffered (pipelining).
        let mut need = 0;
        while start < end {
            let head = match parse_head(&buf[start..end], limits.body_bytes_max) {
                Framing::Partial => break,
                Framing::Error(e) => {
                    write_error(&mut out, e.status, e.code, e.message, "", false);
                    let _ = stream.write_all(&out).await;
                    return;
                }
                Framing::Head(h) => h,
            };
            let total = head.head_len + head.content_length;
            if end - start < total {
                need = total;
                break;
            }
            let (head_bytes, body) = buf[start..start + total].split_at_mut(head.head_len);
            let keep_alive = head.keep_alive;
            let keep = handler.handle(Request { head: &head, head_bytes, body }, &mut out).await;
            start += total;
            request_started = Instant::now();
            if !keep || !keep_alive || shutdown.is_set() {
                let _ = stream.write_all(&out).await;
                return;
            }
        }
        if start == end {
            (start, end) = (0, 0);
            if buf.len() > 4 * READ_CHUNK_BYTES {
                buf = vec![0u8; READ_CHUNK_BYTES]; // give back a large body's buffer
                held = pressure.map(|p| p.hold(buf.len()));
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        // Make room for the rest of the request.
        let want = need.max(end - start + READ_CHUNK_BYTES).min(buf_max);
        if buf.len() - start < want {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
            if buf.len() < want {
                buf.resize(want, 0);
                drop(held.take());
                held = pressure.map(|p| p.hold(buf.len()));
            }
        }
        let idle = start == end;
        if idle {
            // Only between requests: a request already started is read to
            // its end (its buffer is allocated and counted), so the gate can
            // never stall every connection mid-request.
            handler.before_read().await;
        }
        if idle && shutdown.is_set() {
            return;
        }
        let timeout = if idle {
            limits.idle_timeout
        } else {
            limits.request_timeout.saturating_sub(request_started.elapsed()).max(Duration::from_millis(1))
        };
        let _ = stream.set_read_timeout(Some(timeout));
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
            None | Some(Ok(0)) => return,
            Some(Ok(n)) => {
                if idle {
                    request_started = Instant::now();
                }
                end += n;
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut && !idle => {
                write_error(&mut out, 408, "request_timeout", "request not completed in time", "", false);
                let _ = stream.write_all(&out).await;
                return;
            }
            Some(Err(_)) => return,
        }
    }
}
