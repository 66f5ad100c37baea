//! Redis Streams over RESP2: `XADD` (answered after the AOF fsync with
//! `appendfsync always`), a consumer group read with `XREADGROUP`, `XACK`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use super::{is_timeout, protocol_error, Conn, QUEUE};

const GROUP: &str = "g";
/// Entries one `XREADGROUP` returns at most.
const READ_COUNT: &str = "256";
/// How long one `XREADGROUP` blocks, ms.
const BLOCK_MS: &str = "100";

/// A RESP2 value; strings are ranges of the parsed buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Simple(Range<usize>),
    Error(Range<usize>),
    Int(i64),
    Bulk(Option<Range<usize>>),
    Array(Option<Vec<Resp>>),
}

/// Appends a command as a RESP array of bulk strings.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one value at `buf[pos..]`: Some((value, end)) when complete.
pub fn parse(buf: &[u8], pos: usize) -> io::Result<Option<(Resp, usize)>> {
    let Some(nl) = memchr::memmem::find(&buf[pos..], b"\r\n") else { return Ok(None) };
    let line = pos + 1..pos + nl;
    let next = pos + nl + 2;
    let int = |r: Range<usize>| -> io::Result<i64> {
        std::str::from_utf8(&buf[r]).ok().and_then(|s| s.parse().ok()).ok_or_else(|| protocol_error("bad RESP length"))
    };
    Ok(match buf.get(pos) {
        Some(b'+') => Some((Resp::Simple(line), next)),
        Some(b'-') => Some((Resp::Error(line), next)),
        Some(b':') => Some((Resp::Int(int(line)?), next)),
        Some(b'$') => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Resp::Bulk(None), next)));
            }
            let end = next + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            Some((Resp::Bulk(Some(next..end)), end + 2))
        }
        Some(b'*') => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Resp::Array(None), next)));
            }
            let mut items = Vec::with_capacity(n as usize);
            let mut at = next;
            for _ in 0..n {
                match parse(buf, at)? {
                    Some((v, e)) => {
                        items.push(v);
                        at = e;
                    }
                    None => return Ok(None),
                }
            }
            Some((Resp::Array(Some(items)), at))
        }
        _ => return Err(protocol_error("bad RESP type")),
    })
}

async fn read_reply(conn: &mut Conn) -> io::Result<(Resp, Vec<u8>)> {
    loop {
        if let Some((v, used)) = parse(conn.data(), 0)? {
            // Copy the reply's bytes out so the caller may keep the ranges.
            let bytes = conn.data()[..used].to_vec();
            conn.consume(used);
            return Ok((v, bytes));
        }
        conn.fill().await?;
    }
}

/// Deletes the stream and creates it again with the consumer group.
pub async fn setup(addr: SocketAddr) -> io::Result<()> {
    let mut conn = Conn::new(crate::net::connect(addr, None).await?);
    command(&mut conn.out, &[b"DEL", QUEUE.as_bytes()]);
    command(&mut conn.out, &[b"XGROUP", b"CREATE", QUEUE.as_bytes(), GROUP.as_bytes(), b"$", b"MKSTREAM"]);
    command(&mut conn.out, &[b"CONFIG", b"GET", b"appendfsync"]);
    conn.flush().await?;
    for _ in 0..3 {
        let (v, bytes) = read_reply(&mut conn).await?;
        if let Resp::Error(r) = v {
            return Err(protocol_error(format!("redis: {}", String::from_utf8_lossy(&bytes[r]))));
        }
    }
    Ok(())
}

/// A publisher connection.
pub struct Publisher {
    conn: Conn,
}

impl Publisher {
    pub async fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<Self> {
        Ok(Self { conn: Conn::new(crate::net::connect(addr, src).await?) })
    }

    /// `XADD bench * k <body>`; Ok once Redis answered with the entry id.
    pub async fn publish(&mut self, body: &[u8]) -> io::Result<Result<(), String>> {
        command(&mut self.conn.out, &[b"XADD", QUEUE.as_bytes(), b"*", b"k", body]);
        self.conn.flush().await?;
        let (v, _) = read_reply(&mut self.conn).await?;
        Ok(match v {
            Resp::Bulk(Some(_)) => Ok(()),
            _ => Err("redis_error".to_owned()),
        })
    }
}

/// A consumer of the group; acks what it read with the next read.
pub struct Consumer {
    conn: Conn,
    name: Vec<u8>,
    to_ack: Vec<Vec<u8>>,
}

impl Consumer {
    pub async fn connect(addr: SocketAddr, src: Option<Ipv4Addr>, index: usize) -> io::Result<Self> {
        let conn = Conn::new(crate::net::connect(addr, src).await?);
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self { conn, name: format!("c{index}").into_bytes(), to_ack: Vec::new() })
    }

    /// Acks the previous batch, reads the next (blocking up to 100 ms) and
    /// calls `on_body` for each entry.
    pub async fn next_batch(&mut self, on_body: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let acking = !self.to_ack.is_empty();
        if acking {
            let mut args: Vec<&[u8]> = vec![b"XACK", QUEUE.as_bytes(), GROUP.as_bytes()];
            args.extend(self.to_ack.iter().map(Vec::as_slice));
            command(&mut self.conn.out, &args);
        }
        command(
            &mut self.conn.out,
            &[
                b"XREADGROUP",
                b"GROUP",
                GROUP.as_bytes(),
                &self.name,
                b"COUNT",
                READ_COUNT.as_bytes(),
                b"BLOCK",
                BLOCK_MS.as_bytes(),
                b"STREAMS",
                QUEUE.as_bytes(),
                b">",
            ],
        );
        self.conn.flush().await?;
        self.to_ack.clear();
        if acking {
            read_reply(&mut self.conn).await?;
        }
        let (v, bytes) = read_reply(&mut self.conn).await?;
        let streams = match v {
            Resp::Array(Some(s)) => s,
            Resp::Array(None) => return Ok(()),
            Resp::Error(r) => return Err(protocol_error(format!("redis: {}", String::from_utf8_lossy(&bytes[r])))),
            _ => return Err(protocol_error("unexpected XREADGROUP reply")),
        };
        for s in streams {
            let Resp::Array(Some(parts)) = s else { continue };
            let Some(Resp::Array(Some(entries))) = parts.get(1) else { continue };
            for e in entries {
                let Resp::Array(Some(entry)) = e else { continue };
                if let Some(Resp::Bulk(Some(id))) = entry.first() {
                    self.to_ack.push(bytes[id.clone()].to_vec());
                }
                if let Some(Resp::Array(Some(fields))) = entry.get(1) {
                    if let Some(Resp::Bulk(Some(body))) = fields.get(1) {
                        on_body(&bytes[body.clone()]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Acks what is left.
    pub async fn finish(&mut self) {
        if self.to_ack.is_empty() {
            return;
        }
        let mut args: Vec<&[u8]> = vec![b"XACK", QUEUE.as_bytes(), GROUP.as_bytes()];
        args.extend(self.to_ack.iter().map(Vec::as_slice));
        command(&mut self.conn.out, &args);
        if self.conn.flush().await.is_ok() {
            let _ = read_reply(&mut self.conn).await;
        }
    }
}

/// Is `e` only the read timeout of an idle consumer?
pub fn idle(e: &io::Error) -> bool {
    is_timeout(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_parses() {
        let mut out = Vec::new();
        command(&mut out, &[b"XADD", b"s", b"*"]);
        assert_eq!(out, b"*3\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n");
        let reply = b"*1\r\n*2\r\n$5\r\nbench\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nk\r\n$2\r\nhi\r\n";
        let (v, used) = parse(reply, 0).unwrap().unwrap();
        assert_eq!(used, reply.len());
        let Resp::Array(Some(streams)) = v else { panic!() };
        assert_eq!(streams.len(), 1);
        assert!(parse(&reply[..reply.len() - 3], 0).unwrap().is_none());
        assert_eq!(parse(b"*-1\r\n", 0).unwrap().unwrap().0, Resp::Array(None));
        assert_eq!(parse(b":12\r\n", 0).unwrap().unwrap().0, Resp::Int(12));
        assert!(matches!(parse(b"-ERR x\r\n", 0).unwrap().unwrap().0, Resp::Error(_)));
    }
}
