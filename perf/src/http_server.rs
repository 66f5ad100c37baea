//! The request side of the harness's in-process HTTP/1.1 servers (the
//! webhook receiver of `receipts`, the fake WhatsApp provider of
//! `fallback`): one keep-alive request at a time, `Content-Length` bodies.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;

/// One request as the fake servers need it.
pub struct Request {
    /// The request line, e.g. `POST /hook HTTP/1.1`.
    pub line: String,
    /// `(name, value)`, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The method and path of the request line.
    pub fn is(&self, method: &str, path: &str) -> bool {
        let mut parts = self.line.split_whitespace();
        parts.next() == Some(method) && parts.next() == Some(path)
    }
}

/// Reads the next request; None when the peer closed or sent garbage.
pub fn read_request(input: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if input.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if input.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.to_owned(), v.trim().to_owned()));
        }
    }
    let mut req = Request { line: line.trim_end().to_owned(), headers, body: Vec::new() };
    let length = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    req.body = vec![0u8; length];
    input.read_exact(&mut req.body).ok()?;
    Some(req)
}
