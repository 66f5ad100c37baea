//! NATS JetStream over the NATS text protocol: a stream on file storage
//! (the server runs with `sync_interval: always`), publishes answered by a
//! JetStream ack after the write is synced, and a durable push consumer
//! with a queue group and explicit acks.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{protocol_error, Conn, QUEUE};

const STREAM: &str = "BENCH";
const CONSUMER: &str = "C";
const DELIVER_SUBJECT: &str = "deliver.bench";
const DELIVER_GROUP: &str = "g";
/// Messages delivered and not yet acked, over all receivers.
const MAX_ACK_PENDING: u32 = 65_536;

static INBOX: AtomicU64 = AtomicU64::new(0);

/// One protocol operation from the server.
#[derive(Debug, PartialEq)]
pub enum Op {
    Info,
    Ping,
    Pong,
    Ok,
    Err(Range<usize>),
    /// MSG or HMSG. `headers` holds the status line for HMSG.
    Msg {
        sid: Range<usize>,
        reply: Option<Range<usize>>,
        headers: Option<Range<usize>>,
        payload: Range<usize>,
    },
}

/// Parses one operation at the start of `b`: Some((op, bytes used)).
pub fn parse(b: &[u8]) -> io::Result<Option<(Op, usize)>> {
    let Some(nl) = memchr::memmem::find(b, b"\r\n") else { return Ok(None) };
    let line = &b[..nl];
    let next = nl + 2;
    let word = line.split(|&c| c == b' ').next().unwrap_or_default();
    let op = match word {
        w if w.eq_ignore_ascii_case(b"PING") => Op::Ping,
        w if w.eq_ignore_ascii_case(b"PONG") => Op::Pong,
        w if w.eq_ignore_ascii_case(b"+OK") => Op::Ok,
        w if w.eq_ignore_ascii_case(b"INFO") => Op::Info,
        w if w.eq_ignore_ascii_case(b"-ERR") => Op::Err(0..nl),
        w if w.eq_ignore_ascii_case(b"MSG") || w.eq_ignore_ascii_case(b"HMSG") => {
            let hmsg = w.len() == 4;
            // Ranges of the space-separated fields of the line.
            let mut fields = Vec::with_capacity(6);
            let mut at = 0;
            for part in line.split(|&c| c == b' ') {
                if !part.is_empty() {
                    fields.push(at..at + part.len());
                }
                at += part.len() + 1;
            }
            let num = |r: &Range<usize>| -> io::Result<usize> {
                std::str::from_utf8(&b[r.clone()])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| protocol_error("bad NATS size"))
            };
            let (reply, hlen, total) = match (hmsg, fields.len()) {
                (false, 4) => (None, 0, num(&fields[3])?),
                (false, 5) => (Some(fields[3].clone()), 0, num(&fields[4])?),
                (true, 5) => (None, num(&fields[3])?, num(&fields[4])?),
                (true, 6) => (Some(fields[3].clone()), num(&fields[4])?, num(&fields[5])?),
                _ => return Err(protocol_error(format!("bad NATS line {:?}", String::from_utf8_lossy(line)))),
            };
            if b.len() < next + total + 2 {
                return Ok(None);
            }
            let headers = hmsg.then(|| next..next + hlen);
            let op = Op::Msg { sid: fields[2].clone(), reply, headers, payload: next + hlen..next + total };
            return Ok(Some((op, next + total + 2)));
        }
        _ => return Err(protocol_error(format!("unknown NATS op {:?}", String::from_utf8_lossy(line)))),
    };
    Ok(Some((op, next)))
}

/// Connects and completes the CONNECT/PING handshake.
async fn handshake(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<Conn> {
    let mut conn = Conn::new(crate::net::connect(addr, src).await?);
    conn.out.extend_from_slice(
        br#"CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,"protocol":1,"name":"esh3ar-perf"}"#,
    );
    conn.out.extend_from_slice(b"\r\nPING\r\n");
    conn.flush().await?;
    loop {
        let Some((op, used)) = parse(conn.data())? else {
            conn.fill().await?;
            continue;
        };
        let err = if let Op::Err(r) = &op {
            Some(String::from_utf8_lossy(&conn.data()[r.clone()]).into_owned())
        } else {
            None
        };
        conn.consume(used);
        match op {
            Op::Pong => return Ok(conn),
            Op::Err(_) => return Err(protocol_error(format!("nats: {}", err.unwrap_or_default()))),
            _ => {}
        }
    }
}

fn publish_op(out: &mut Vec<u8>, subject: &str, reply: Option<&str>, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    if let Some(r) = reply {
        out.push(b' ');
        out.extend_from_slice(r.as_bytes());
    }
    out.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Waits for the reply to sid `1`; answers pings meanwhile.
async fn reply(conn: &mut Conn) -> io::Result<Result<Vec<u8>, String>> {
    loop {
        let Some((op, used)) = parse(conn.data())? else {
            conn.fill().await?;
            continue;
        };
        let result = match &op {
            Op::Msg { headers: Some(h), .. } => {
                let status = String::from_utf8_lossy(&conn.data()[h.clone()]).to_string();
                let code = status.split_whitespace().nth(1).unwrap_or("status").to_owned();
                Some(Err(format!("nats_{code}")))
            }
            Op::Msg { payload, .. } => Some(Ok(conn.data()[payload.clone()].to_vec())),
            Op::Err(r) => Some(Err(format!("nats: {}", String::from_utf8_lossy(&conn.data()[r.clone()])))),
            _ => None,
        };
        conn.consume(used);
        if op == Op::Ping {
            conn.out.extend_from_slice(b"PONG\r\n");
            conn.flush().await?;
        }
        if let Some(r) = result {
            return Ok(r);
        }
    }
}

/// Deletes and re-creates the stream and its durable push consumer.
pub async fn setup(addr: SocketAddr) -> io::Result<()> {
    let mut conn = handshake(addr, None).await?;
    conn.out.extend_from_slice(b"SUB _SETUP 1\r\n");
    let stream_config = format!(
        r#"{{"name":"{STREAM}","subjects":["{QUEUE}"],"storage":"file","retention":"workqueue","num_replicas":1}}"#
    );
    let consumer_config = format!(
        r#"{{"stream_name":"{STREAM}","config":{{"durable_name":"{CONSUMER}","deliver_subject":"{DELIVER_SUBJECT}","deliver_group":"{DELIVER_GROUP}","ack_policy":"explicit","ack_wait":30000000000,"max_ack_pending":{MAX_ACK_PENDING},"deliver_policy":"all","replay_policy":"instant"}}}}"#
    );
    let steps: [(String, String, bool); 3] = [
        (format!("$JS.API.STREAM.DELETE.{STREAM}"), String::new(), false),
        (format!("$JS.API.STREAM.CREATE.{STREAM}"), stream_config, true),
        (format!("$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{CONSUMER}"), consumer_config, true),
    ];
    for (subject, body, must_succeed) in steps {
        publish_op(&mut conn.out, &subject, Some("_SETUP"), body.as_bytes());
        conn.flush().await?;
        let answer = reply(&mut conn).await?.map_err(protocol_error)?;
        if must_succeed && memchr::memmem::find(&answer, b"\"error\"").is_some() {
            return Err(protocol_error(format!("nats {subject}: {}", String::from_utf8_lossy(&answer))));
        }
    }
    Ok(())
}

/// A publisher connection with its own reply inbox.
pub struct Publisher {
    conn: Conn,
    inbox: String,
}

impl Publisher {
    pub async fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<Self> {
        let mut conn = handshake(addr, src).await?;
        let inbox = format!("_INBOX.perf.{}.{}", std::process::id(), INBOX.fetch_add(1, Ordering::Relaxed));
        conn.out.extend_from_slice(format!("SUB {inbox} 1\r\n").as_bytes());
        conn.flush().await?;
        Ok(Self { conn, inbox })
    }

    /// Publishes and waits for the JetStream ack (`{"stream":..,"seq":..}`).
    pub async fn publish(&mut self, body: &[u8]) -> io::Result<Result<(), String>> {
        publish_op(&mut self.conn.out, QUEUE, Some(&self.inbox), body);
        self.conn.flush().await?;
        Ok(match reply(&mut self.conn).await? {
            Ok(ack) if memchr::memmem::find(&ack, b"\"seq\"").is_some() => Ok(()),
            Ok(_) => Err("nats_error".to_owned()),
            Err(e) => Err(e),
        })
    }
}

/// A member of the consumer's queue group; acks every message it gets.
pub struct Consumer {
    conn: Conn,
}

impl Consumer {
    pub async fn connect(addr: SocketAddr, src: Option<Ipv4Addr>, _index: usize) -> io::Result<Self> {
        let mut conn = handshake(addr, src).await?;
        conn.out.extend_from_slice(format!("SUB {DELIVER_SUBJECT} {DELIVER_GROUP} 1\r\n").as_bytes());
        conn.flush().await?;
        conn.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self { conn })
    }

    /// Waits for deliveries, calls `on_body` for each and acks them all.
    pub async fn next_batch(&mut self, on_body: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        if parse(self.conn.data())?.is_none() {
            self.conn.fill().await?;
        }
        let mut acks = Vec::new();
        while let Some((op, used)) = parse(self.conn.data())? {
            match &op {
                Op::Msg { reply, headers: None, payload, .. } => {
                    on_body(&self.conn.data()[payload.clone()]);
                    if let Some(r) = reply {
                        publish_op(
                            &mut acks,
                            std::str::from_utf8(&self.conn.data()[r.clone()]).unwrap_or(""),
                            None,
                            b"",
                        );
                    }
                }
                Op::Ping => acks.extend_from_slice(b"PONG\r\n"),
                Op::Err(r) => {
                    let msg = String::from_utf8_lossy(&self.conn.data()[r.clone()]).into_owned();
                    return Err(protocol_error(format!("nats: {msg}")));
                }
                _ => {}
            }
            self.conn.consume(used);
        }
        self.conn.out.extend_from_slice(&acks);
        self.conn.flush().await
    }

    pub async fn finish(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ops() {
        let b =
            b"MSG deliver.bench 1 $JS.ACK.B.C.1.2.2.0.0 5\r\nhello\r\nPING\r\nHMSG _I 1 12 12\r\nNATS/1.0 503\r\n\r\n";
        let (op, used) = parse(b).unwrap().unwrap();
        let Op::Msg { reply: Some(r), payload, headers: None, .. } = op else { panic!("{op:?}") };
        assert_eq!(&b[r], b"$JS.ACK.B.C.1.2.2.0.0");
        assert_eq!(&b[payload], b"hello");
        let (op, used2) = parse(&b[used..]).unwrap().unwrap();
        assert_eq!(op, Op::Ping);
        let rest = &b[used + used2..];
        let (op, _) = parse(rest).unwrap().unwrap();
        let Op::Msg { headers: Some(h), reply: None, .. } = op else { panic!("{op:?}") };
        assert!(rest[h].starts_with(b"NATS/1.0 503"));
        assert!(parse(&b[..20]).unwrap().is_none());
    }

    #[test]
    fn publish_line() {
        let mut out = Vec::new();
        publish_op(&mut out, "bench", Some("_I.1"), b"abc");
        assert_eq!(out, b"PUB bench _I.1 3\r\nabc\r\n");
    }
}
