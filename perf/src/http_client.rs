//! A keep-alive HTTP/1.1 client connection: write a request, read one
//! response (status and body). Enough for the business API and the
//! ceiling server, with no allocation per request.

use std::io;
use std::ops::Range;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

/// Largest response we accept (a batch answer of 1000 items fits).
const RESPONSE_BYTES_MAX: usize = 1 << 20;

pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// One response: its status and where its body lies in the buffer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Range<usize>,
    /// The server will close the connection after it.
    pub close: bool,
}

impl HttpConn {
    pub fn new(stream: TcpStream) -> Self {
        Self { stream, buf: vec![0; 8192], start: 0, end: 0 }
    }

    pub async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request).await
    }

    /// The body of a response returned by [`HttpConn::recv`], valid until
    /// the next call.
    pub fn body(&self, r: &Response) -> &[u8] {
        &self.buf[r.body.clone()]
    }

    /// Reads the next response.
    pub async fn recv(&mut self) -> io::Result<Response> {
        loop {
            if let Some((resp, used)) = parse(&self.buf[self.start..self.end])? {
                let base = self.start;
                self.start += used;
                return Ok(Response { body: base + resp.body.start..base + resp.body.end, ..resp });
            }
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
                if self.end == self.buf.len() {
                    if self.buf.len() >= RESPONSE_BYTES_MAX {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "response too large"));
                    }
                    self.buf.resize(self.buf.len() * 2, 0);
                }
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
            }
            self.end += n;
        }
    }
}

/// Parses one response at the start of `buf`: Some((response, bytes used)).
pub fn parse(buf: &[u8]) -> io::Result<Option<(Response, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 24];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let mut length = 0usize;
    let mut close = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        } else if h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close") {
            close = true;
        }
    }
    if buf.len() < head_len + length {
        return Ok(None);
    }
    Ok(Some((Response { status, body: head_len..head_len + length, close }, head_len + length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pipelined_responses() {
        let raw = b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (a, used) = parse(raw).unwrap().unwrap();
        assert_eq!((a.status, &raw[a.body.clone()], a.close), (202, &b"ok"[..], false));
        let (b, used2) = parse(&raw[used..]).unwrap().unwrap();
        assert_eq!((b.status, b.close), (503, true));
        assert_eq!(used + used2, raw.len());
        assert!(parse(&raw[..used - 1]).unwrap().is_none());
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }
}
