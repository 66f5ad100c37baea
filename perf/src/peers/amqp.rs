//! RabbitMQ over AMQP 0-9-1: a quorum queue (Raft log, fsynced), persistent
//! messages published with publisher confirms (the broker confirms after
//! the quorum commit), and consumers with manual acks and a prefetch.
//!
//! Only the handful of methods the benchmark needs are encoded here.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::{protocol_error, Conn, QUEUE};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const CHANNEL: u16 = 1;
/// Unacked deliveries per consumer.
const PREFETCH: u16 = 256;

/// (class, method) ids.
mod m {
    pub const START: (u16, u16) = (10, 10);
    pub const START_OK: (u16, u16) = (10, 11);
    pub const TUNE: (u16, u16) = (10, 30);
    pub const TUNE_OK: (u16, u16) = (10, 31);
    pub const OPEN: (u16, u16) = (10, 40);
    pub const OPEN_OK: (u16, u16) = (10, 41);
    pub const CLOSE: (u16, u16) = (10, 50);
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
    pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
    pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
    pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
    pub const QUEUE_DECLARE_OK: (u16, u16) = (50, 11);
    pub const QUEUE_DELETE: (u16, u16) = (50, 40);
    pub const QUEUE_DELETE_OK: (u16, u16) = (50, 41);
    pub const QOS: (u16, u16) = (60, 10);
    pub const QOS_OK: (u16, u16) = (60, 11);
    pub const CONSUME: (u16, u16) = (60, 20);
    pub const CONSUME_OK: (u16, u16) = (60, 21);
    pub const PUBLISH: (u16, u16) = (60, 40);
    pub const DELIVER: (u16, u16) = (60, 60);
    pub const ACK: (u16, u16) = (60, 80);
    pub const NACK: (u16, u16) = (60, 120);
    pub const CONFIRM_SELECT: (u16, u16) = (85, 10);
    pub const CONFIRM_SELECT_OK: (u16, u16) = (85, 11);
}

/// Method arguments under construction.
#[derive(Default)]
struct Args(Vec<u8>);

impl Args {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn short(mut self, s: &str) -> Self {
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn long(mut self, s: &[u8]) -> Self {
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s);
        self
    }
    /// A field table of string values.
    fn table(self, entries: &[(&str, &str)]) -> Self {
        let mut t = Vec::new();
        for (k, v) in entries {
            t.push(k.len() as u8);
            t.extend_from_slice(k.as_bytes());
            t.push(b'S');
            t.extend_from_slice(&(v.len() as u32).to_be_bytes());
            t.extend_from_slice(v.as_bytes());
        }
        self.long(&t)
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

fn method(out: &mut Vec<u8>, channel: u16, id: (u16, u16), args: Args) {
    let mut p = Vec::with_capacity(4 + args.0.len());
    p.extend_from_slice(&id.0.to_be_bytes());
    p.extend_from_slice(&id.1.to_be_bytes());
    p.extend_from_slice(&args.0);
    frame(out, FRAME_METHOD, channel, &p);
}

/// Appends a persistent message: Basic.Publish, content header, body.
fn publish(out: &mut Vec<u8>, body: &[u8]) {
    method(out, CHANNEL, m::PUBLISH, Args::default().u16(0).short("").short(QUEUE).u8(0));
    let mut h = Vec::with_capacity(15);
    h.extend_from_slice(&60u16.to_be_bytes()); // class basic
    h.extend_from_slice(&0u16.to_be_bytes()); // weight
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    h.extend_from_slice(&0x1000u16.to_be_bytes()); // property flags: delivery-mode
    h.push(2); // persistent
    frame(out, FRAME_HEADER, CHANNEL, &h);
    frame(out, FRAME_BODY, CHANNEL, body);
}

/// (kind, channel, payload range, bytes used) of a frame.
type FrameAt = (u8, u16, std::ops::Range<usize>, usize);

/// One frame: (kind, channel, payload range), and bytes used.
fn parse_frame(b: &[u8]) -> io::Result<Option<FrameAt>> {
    if b.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as usize;
    if b.len() < 8 + size {
        return Ok(None);
    }
    if b[7 + size] != FRAME_END {
        return Err(protocol_error("AMQP frame without its end marker"));
    }
    Ok(Some((b[0], u16::from_be_bytes([b[1], b[2]]), 7..7 + size, 8 + size)))
}

/// The (class, method) of a method frame payload.
fn method_id(p: &[u8]) -> (u16, u16) {
    if p.len() < 4 {
        return (0, 0);
    }
    (u16::from_be_bytes([p[0], p[1]]), u16::from_be_bytes([p[2], p[3]]))
}

fn close_reason(p: &[u8]) -> String {
    // reply-code u16, reply-text shortstr
    if p.len() < 7 {
        return "closed".into();
    }
    let code = u16::from_be_bytes([p[4], p[5]]);
    let len = p[6] as usize;
    let text = String::from_utf8_lossy(p.get(7..7 + len).unwrap_or_default());
    format!("rabbitmq closed the channel: {code} {text}")
}

/// Reads frames until a method `want` arrives; returns its arguments.
async fn expect(conn: &mut Conn, want: (u16, u16)) -> io::Result<Vec<u8>> {
    loop {
        let Some((kind, _, r, used)) = parse_frame(conn.data())? else {
            conn.fill().await?;
            continue;
        };
        let payload = conn.data()[r].to_vec();
        conn.consume(used);
        if kind != FRAME_METHOD {
            continue;
        }
        let id = method_id(&payload);
        if id == want {
            return Ok(payload[4..].to_vec());
        }
        if id == m::CLOSE || id == m::CHANNEL_CLOSE {
            return Err(protocol_error(close_reason(&payload)));
        }
    }
}

/// Opens a connection and channel 1 as guest/guest.
async fn open(addr: SocketAddr, src: Option<Ipv4Addr>, user: &str, password: &str) -> io::Result<Conn> {
    let mut conn = Conn::new(crate::net::connect(addr, src).await?);
    conn.out.extend_from_slice(b"AMQP\x00\x00\x09\x01");
    conn.flush().await?;
    expect(&mut conn, m::START).await?;
    let response = format!("\0{user}\0{password}");
    let args = Args::default().table(&[]).short("PLAIN").long(response.as_bytes()).short("en_US");
    method(&mut conn.out, 0, m::START_OK, args);
    conn.flush().await?;
    let tune = expect(&mut conn, m::TUNE).await?;
    let channel_max = u16::from_be_bytes([tune[0], tune[1]]);
    let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
    method(&mut conn.out, 0, m::TUNE_OK, Args::default().u16(channel_max.clamp(1, 16)).u32(frame_max).u16(0));
    method(&mut conn.out, 0, m::OPEN, Args::default().short("/").short("").u8(0));
    conn.flush().await?;
    expect(&mut conn, m::OPEN_OK).await?;
    method(&mut conn.out, CHANNEL, m::CHANNEL_OPEN, Args::default().short(""));
    conn.flush().await?;
    expect(&mut conn, m::CHANNEL_OPEN_OK).await?;
    Ok(conn)
}

/// Deletes and re-declares the quorum queue.
pub async fn setup(addr: SocketAddr, user: &str, password: &str) -> io::Result<()> {
    let mut conn = open(addr, None, user, password).await?;
    method(&mut conn.out, CHANNEL, m::QUEUE_DELETE, Args::default().u16(0).short(QUEUE).u8(0));
    conn.flush().await?;
    expect(&mut conn, m::QUEUE_DELETE_OK).await?;
    let args = Args::default().u16(0).short(QUEUE).u8(0x02).table(&[("x-queue-type", "quorum")]);
    method(&mut conn.out, CHANNEL, m::QUEUE_DECLARE, args);
    conn.flush().await?;
    expect(&mut conn, m::QUEUE_DECLARE_OK).await?;
    Ok(())
}

/// A publisher channel in confirm mode.
pub struct Publisher {
    conn: Conn,
    next_tag: u64,
}

impl Publisher {
    pub async fn connect(addr: SocketAddr, src: Option<Ipv4Addr>, user: &str, password: &str) -> io::Result<Self> {
        let mut conn = open(addr, src, user, password).await?;
        method(&mut conn.out, CHANNEL, m::CONFIRM_SELECT, Args::default().u8(0));
        conn.flush().await?;
        expect(&mut conn, m::CONFIRM_SELECT_OK).await?;
        Ok(Self { conn, next_tag: 1 })
    }

    /// Publishes one persistent message and waits for its confirm.
    pub async fn publish(&mut self, body: &[u8]) -> io::Result<Result<(), String>> {
        let tag = self.next_tag;
        self.next_tag += 1;
        publish(&mut self.conn.out, body);
        self.conn.flush().await?;
        loop {
            let Some((kind, _, r, used)) = parse_frame(self.conn.data())? else {
                self.conn.fill().await?;
                continue;
            };
            let p = &self.conn.data()[r];
            let outcome = if kind == FRAME_METHOD && p.len() >= 12 {
                let acked = u64::from_be_bytes(p[4..12].try_into().expect("8 bytes"));
                let multiple = p.get(12).is_some_and(|b| b & 1 == 1);
                let covers = acked == tag || (multiple && acked >= tag);
                match method_id(p) {
                    m::ACK if covers => Some(Ok(())),
                    m::NACK if covers => Some(Err("nack".to_owned())),
                    _ => None,
                }
            } else if kind == FRAME_METHOD && matches!(method_id(p), m::CLOSE | m::CHANNEL_CLOSE) {
                return Err(protocol_error(close_reason(p)));
            } else {
                None
            };
            self.conn.consume(used);
            if let Some(o) = outcome {
                return Ok(o);
            }
        }
    }
}

/// A consumer of the queue with manual acks.
pub struct Consumer {
    conn: Conn,
    /// Delivery tag of the message whose body is awaited.
    body_tag: Option<u64>,
}

impl Consumer {
    pub async fn connect(
        addr: SocketAddr,
        src: Option<Ipv4Addr>,
        _index: usize,
        user: &str,
        password: &str,
    ) -> io::Result<Self> {
        let mut conn = open(addr, src, user, password).await?;
        method(&mut conn.out, CHANNEL, m::QOS, Args::default().u32(0).u16(PREFETCH).u8(0));
        conn.flush().await?;
        expect(&mut conn, m::QOS_OK).await?;
        method(&mut conn.out, CHANNEL, m::CONSUME, Args::default().u16(0).short(QUEUE).short("").u8(0).table(&[]));
        conn.flush().await?;
        expect(&mut conn, m::CONSUME_OK).await?;
        conn.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self { conn, body_tag: None })
    }

    /// Waits for deliveries, calls `on_body` for each, acks up to the last.
    pub async fn next_batch(&mut self, on_body: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        if parse_frame(self.conn.data())?.is_none() {
            self.conn.fill().await?;
        }
        let mut last_tag = None;
        while let Some((kind, _, r, used)) = parse_frame(self.conn.data())? {
            let p = &self.conn.data()[r];
            match kind {
                FRAME_METHOD if method_id(p) == m::DELIVER => {
                    // consumer-tag shortstr, then delivery-tag u64.
                    let ctag = *p.get(4).unwrap_or(&0) as usize;
                    let at = 5 + ctag;
                    let tag = p.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
                    self.body_tag = tag;
                }
                FRAME_METHOD if matches!(method_id(p), m::CLOSE | m::CHANNEL_CLOSE) => {
                    return Err(protocol_error(close_reason(p)));
                }
                FRAME_BODY => {
                    on_body(p);
                    last_tag = self.body_tag.take().or(last_tag);
                }
                FRAME_HEADER | FRAME_HEARTBEAT | FRAME_METHOD => {}
                _ => return Err(protocol_error("unknown AMQP frame")),
            }
            self.conn.consume(used);
        }
        if let Some(tag) = last_tag {
            method(&mut self.conn.out, CHANNEL, m::ACK, Args::default().u64(tag).u8(1));
            self.conn.flush().await?;
        }
        Ok(())
    }

    pub async fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_frames_parse_back() {
        let mut out = Vec::new();
        publish(&mut out, b"hello");
        let (kind, ch, r, used) = parse_frame(&out).unwrap().unwrap();
        assert_eq!((kind, ch, method_id(&out[r])), (FRAME_METHOD, CHANNEL, m::PUBLISH));
        let (kind, _, r, used2) = parse_frame(&out[used..]).unwrap().unwrap();
        assert_eq!(kind, FRAME_HEADER);
        assert_eq!(out[used..][r].len(), 15);
        let (kind, _, r, _) = parse_frame(&out[used + used2..]).unwrap().unwrap();
        assert_eq!((kind, &out[used + used2..][r]), (FRAME_BODY, &b"hello"[..]));
        assert!(parse_frame(&out[..5]).unwrap().is_none());
    }

    #[test]
    fn tables_encode_strings() {
        let a = Args::default().table(&[("x-queue-type", "quorum")]);
        assert_eq!(&a.0[..4], &(1 + 12 + 1 + 4 + 6u32).to_be_bytes());
        assert_eq!(a.0[4] as usize, "x-queue-type".len());
    }
}
