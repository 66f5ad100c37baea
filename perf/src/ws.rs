//! A minimal WebSocket (RFC 6455) client for receivers: upgrade, read
//! unfragmented server frames, write masked text and pong frames. Small on
//! purpose: thousands of these run per generator core.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

/// Largest server frame a receiver accepts.
const FRAME_BYTES_MAX: usize = 1 << 20;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub struct WsConn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    mask_state: u32,
}

/// Why a WebSocket could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered this HTTP status instead of 101.
    Refused(u16),
    Io(io::Error),
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl ConnectError {
    /// The error cause as reported (`ws_401`, `ws_io`).
    pub fn cause(&self) -> String {
        match self {
            Self::Refused(s) => format!("ws_{s}"),
            Self::Io(_) => "ws_io".to_owned(),
        }
    }
}

impl WsConn {
    /// Opens a WebSocket to `path` on `addr`, with `Authorization: Bearer`.
    pub async fn connect(
        addr: SocketAddr,
        src: Option<Ipv4Addr>,
        path: &str,
        token: &str,
    ) -> Result<WsConn, ConnectError> {
        let mut stream = crate::net::connect(addr, src).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ZXNoM2FyLXBlcmYtMDAwMQ==\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 4096];
        let mut end = 0;
        loop {
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the upgrade").into());
            }
            end += n;
            let mut headers = [httparse::EMPTY_HEADER; 24];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf[..end]) {
                Ok(httparse::Status::Complete(head)) => {
                    let status = resp.code.unwrap_or(0);
                    if status != 101 {
                        return Err(ConnectError::Refused(status));
                    }
                    let mask_state = (addr.port() as u32).wrapping_mul(2_654_435_761) | 1;
                    return Ok(WsConn { stream, buf, start: head, end, out: Vec::with_capacity(256), mask_state });
                }
                Ok(httparse::Status::Partial) if end < buf.len() => {}
                Ok(httparse::Status::Partial) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "upgrade answer too large").into())
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()).into()),
            }
        }
    }

    /// Reads will fail with `TimedOut` after `d` without data.
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(d).map_err(io::Error::from)
    }

    /// The next complete frame in the buffer: (opcode, payload range).
    pub fn next_frame(&mut self) -> io::Result<Option<(u8, Range<usize>)>> {
        match parse_frame(&self.buf[self.start..self.end])? {
            None => Ok(None),
            Some((op, payload, used)) => {
                let base = self.start;
                self.start += used;
                Ok(Some((op, base + payload.start..base + payload.end)))
            }
        }
    }

    /// Does the buffer hold a complete frame?
    pub fn has_frame(&self) -> io::Result<bool> {
        Ok(parse_frame(&self.buf[self.start..self.end])?.is_some())
    }

    pub fn payload(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Reads more bytes (after the caller took every complete frame).
    pub async fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < 1024 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() - self.end < 1024 {
                if self.buf.len() >= FRAME_BYTES_MAX + 16 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "server frame too large"));
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
        }
        self.end += n;
        Ok(())
    }

    /// Queues a masked frame; [`WsConn::flush`] writes the queue.
    pub fn push(&mut self, opcode: u8, payload: &[u8]) {
        self.mask_state ^= self.mask_state << 13;
        self.mask_state ^= self.mask_state >> 17;
        self.mask_state ^= self.mask_state << 5;
        write_frame(&mut self.out, opcode, payload, self.mask_state.to_le_bytes());
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }
}

/// Parses one unmasked server frame: (opcode, payload range, bytes used).
pub fn parse_frame(b: &[u8]) -> io::Result<Option<(u8, Range<usize>, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (fin, op) = (b[0] & 0x80 != 0, b[0] & 0x0f);
    if !fin || op == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "fragmented frames are not expected"));
    }
    if b[1] & 0x80 != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "server frames must not be masked"));
    }
    let (len, head) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize, 10),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "server frame too large"));
    }
    if b.len() < head + len {
        return Ok(None);
    }
    Ok(Some((op, head..head + len, head + len)))
}

/// Appends a masked client frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// How a receiver speaks to esh3ar's mobile listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MobileProtocol {
    /// `/v1/connect`: one JSON frame per message, `{"type":"ack","ids":[..]}`.
    Raw,
    /// `/v1/hub`: SignalR's JSON hub protocol (handshake, `ReceiveMessage`
    /// invocations, `AckMany`, ping records both ways).
    Signalr,
}

/// SignalR's record separator.
pub const RS: u8 = 0x1e;

/// The hub handshake request (JSON hub protocol, version 1).
pub const HUB_HANDSHAKE: &[u8] = b"{\"protocol\":\"json\",\"version\":1}\x1e";

/// A hub ping record.
pub const HUB_PING: &[u8] = b"{\"type\":6}\x1e";

impl MobileProtocol {
    /// The path to upgrade on.
    pub fn path(self) -> &'static str {
        match self {
            MobileProtocol::Raw => "/v1/connect",
            MobileProtocol::Signalr => "/v1/hub",
        }
    }

    /// The message that acks `ids` (each a message id, already quoted and
    /// comma-separated in `quoted`).
    pub fn ack(self, quoted: &[u8]) -> Vec<u8> {
        let (head, tail): (&[u8], &[u8]) = match self {
            MobileProtocol::Raw => (br#"{"type":"ack","ids":["#, b"]}"),
            MobileProtocol::Signalr => (br#"{"type":1,"target":"AckMany","arguments":[["#, b"]]}\x1e"),
        };
        let mut out = Vec::with_capacity(head.len() + quoted.len() + tail.len());
        out.extend_from_slice(head);
        out.extend_from_slice(quoted);
        out.extend_from_slice(tail);
        out
    }
}

/// True if a hub text message holds a ping record.
pub fn has_hub_ping(payload: &[u8]) -> bool {
    memchr::memmem::find(payload, b"{\"type\":6}").is_some()
}

/// The `"id"` of a message frame (also inside a hub `ReceiveMessage`
/// invocation, which carries no `invocationId`).
pub fn message_id(frame: &[u8]) -> Option<&[u8]> {
    let at = memchr::memmem::find(frame, b"\"id\":\"")? + 6;
    let len = memchr::memchr(b'"', &frame[at..])?;
    Some(&frame[at..at + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        write_frame(&mut out, OP_TEXT, b"hello", [1, 2, 3, 4]);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 5);
        let unmasked: Vec<u8> = out[6..].iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]).collect();
        assert_eq!(unmasked, b"hello");
        let mut long = Vec::new();
        write_frame(&mut long, OP_TEXT, &[b'a'; 300], [0; 4]);
        assert_eq!(&long[1..4], &[0x80 | 126, 1, 44]);
    }

    #[test]
    fn parses_server_frames() {
        let mut b = vec![0x81, 3, b'a', b'b', b'c', 0x89, 0];
        let (op, r, used) = parse_frame(&b).unwrap().unwrap();
        assert_eq!((op, &b[r], used), (OP_TEXT, &b"abc"[..], 5));
        let (op, _, used2) = parse_frame(&b[used..]).unwrap().unwrap();
        assert_eq!((op, used2), (OP_PING, 2));
        b.truncate(4);
        assert!(parse_frame(&b).unwrap().is_none());
        let mut big = vec![0x81, 126, 1, 0];
        big.resize(4 + 256, b'x');
        assert_eq!(parse_frame(&big).unwrap().unwrap().1, 4..260);
        assert!(parse_frame(&[0x01, 0]).is_err(), "fragment");
    }

    #[test]
    fn hub_acks_and_pings() {
        let ack = MobileProtocol::Signalr.ack(br#""A","B""#);
        assert_eq!(ack, b"{\"type\":1,\"target\":\"AckMany\",\"arguments\":[[\"A\",\"B\"]]}\x1e");
        assert_eq!(MobileProtocol::Raw.ack(br#""A""#), br#"{"type":"ack","ids":["A"]}"#);
        let inv =
            b"{\"type\":1,\"target\":\"ReceiveMessage\",\"arguments\":[{\"type\":\"message\",\"id\":\"000g\"}]}\x1e";
        assert_eq!(message_id(inv), Some(&b"000g"[..]));
        assert!(has_hub_ping(HUB_PING) && !has_hub_ping(inv));
    }

    #[test]
    fn finds_the_id() {
        assert_eq!(
            message_id(br#"{"type":"message","id":"000g000000000000","from":"a"}"#),
            Some(&b"000g000000000000"[..])
        );
        assert_eq!(message_id(b"{}"), None);
    }
}
