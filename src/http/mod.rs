//! HTTP/1.1 for the business and admin listeners: request framing (sans-io,
//! fuzzed and unit-tested) and response writing. The connection loop that
//! drives a socket is in [`conn`].
//!
//! Framing is strict on purpose (RFC 9112): a request with both
//! `Content-Length` and `Transfer-Encoding`, or with conflicting lengths, is
//! refused and its connection closed, so no proxy in front of us can be
//! desynchronised into smuggling a request. Chunked bodies are not
//! supported (411): every business client can send a length.

pub mod conn;

use std::fmt::Write as _;
use std::ops::Range;

/// Most bytes of a request head (request line + headers).
pub const HEAD_BYTES_MAX: usize = esh3ar_shards::limits::HTTP_HEAD_BYTES_MAX;
/// Most header fields of a request.
pub const HEADERS_MAX: usize = esh3ar_shards::limits::HTTP_HEADERS_MAX;

/// Request method, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Patch,
    Other,
}

/// A parsed request head. Ranges index the connection buffer, so no header
/// is copied.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub path: Range<usize>,
    pub authorization: Option<Range<usize>>,
    pub content_type: Option<Range<usize>>,
    pub idempotency_key: Option<Range<usize>>,
    pub content_length: usize,
    pub keep_alive: bool,
    /// Bytes of the head, up to and including the blank line.
    pub head_len: usize,
}

/// An HTTP-level refusal: status, stable error code, message, and whether
/// the connection must close (framing errors always close it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
    pub close: bool,
}

impl HttpError {
    pub const fn new(status: u16, code: &'static str, message: &'static str) -> Self {
        Self { status, code, message, close: false }
    }
    pub const fn closing(status: u16, code: &'static str, message: &'static str) -> Self {
        Self { status, code, message, close: true }
    }
}

/// What the bytes so far hold.
#[derive(Debug)]
pub enum Framing {
    /// A complete head; the body is the next `content_length` bytes.
    Head(RequestHead),
    /// Need more bytes.
    Partial,
    /// Refuse and close.
    Error(HttpError),
}

/// Frames the request head at the start of `buf`.
pub fn parse_head(buf: &[u8], body_bytes_max: usize) -> Framing {
    // Uninitialised slots: httparse fills only as many as the head has,
    // instead of us zeroing all 64 (2 KiB) on every parse.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= HEAD_BYTES_MAX {
                Framing::Error(HttpError::closing(431, "headers_too_large", "request head exceeds 8 KiB"))
            } else {
                Framing::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Framing::Error(HttpError::closing(431, "headers_too_large", "more than 64 header fields"))
        }
        Err(_) => return Framing::Error(HttpError::closing(400, "bad_request", "malformed HTTP request")),
    };
    if head_len > HEAD_BYTES_MAX {
        return Framing::Error(HttpError::closing(431, "headers_too_large", "request head exceeds 8 KiB"));
    }
    let offset = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let range = |s: &[u8]| offset(s)..offset(s) + s.len();
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("PATCH") => Method::Patch,
        _ => Method::Other,
    };
    let path = range(req.path.expect("complete request has a path").as_bytes());
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version == 1;
    let mut authorization = None;
    let mut content_type = None;
    let mut idempotency_key = None;
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = parse_decimal(h.value) else {
                return Framing::Error(HttpError::closing(400, "bad_request", "invalid Content-Length"));
            };
            if content_length.is_some_and(|c| c != n) {
                return Framing::Error(HttpError::closing(400, "bad_request", "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"authorization") {
            authorization = Some(range(h.value));
        } else if name.eq_ignore_ascii_case(b"content-type") {
            content_type = Some(range(h.value));
        } else if name.eq_ignore_ascii_case(b"idempotency-key") {
            idempotency_key = Some(range(h.value));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Framing::Error(HttpError::closing(
            400,
            "bad_request",
            "request has both Content-Length and Transfer-Encoding",
        ));
    }
    if transfer_encoding {
        return Framing::Error(HttpError::closing(
            411,
            "length_required",
            "Transfer-Encoding is not supported; send Content-Length",
        ));
    }
    let content_length = match (content_length, method) {
        (Some(n), _) => n,
        (None, Method::Post) => {
            return Framing::Error(HttpError::closing(411, "length_required", "POST needs a Content-Length"))
        }
        (None, _) => 0,
    };
    if content_length > body_bytes_max {
        return Framing::Error(HttpError::closing(413, "payload_too_large", "request body exceeds max_body_bytes"));
    }
    Framing::Head(RequestHead {
        method,
        path,
        authorization,
        content_type,
        idempotency_key,
        content_length,
        keep_alive,
        head_len,
    })
}

fn parse_decimal(v: &[u8]) -> Option<usize> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 12 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0usize, |acc, &d| acc.checked_mul(10)?.checked_add((d - b'0') as usize))
}

/// Reason phrase of the statuses we send.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a complete response with a JSON body.
pub fn write_response(out: &mut Vec<u8>, status: u16, extra_headers: &str, body: &[u8], keep_alive: bool) {
    // Written piece by piece, not with `write!`: this runs once per
    // request, and core::fmt plus a head `String` cost about 1,000
    // instructions a response (docs/PERFORMANCE.md, "Hot path").
    let mut num = itoa::Buffer::new();
    out.reserve(128 + extra_headers.len() + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(num.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    out.extend_from_slice(num.format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra_headers.as_bytes());
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// The status code of a response written by [`write_response`] (0 if none).
pub fn answered_status(response: &[u8]) -> u16 {
    response.get(9..12).and_then(|c| std::str::from_utf8(c).ok()?.parse().ok()).unwrap_or(0)
}

/// Writes `{"error":{"code":..,"message":..}}` with the given status.
pub fn write_error(out: &mut Vec<u8>, status: u16, code: &str, message: &str, extra_headers: &str, keep_alive: bool) {
    let mut body = Vec::with_capacity(64 + message.len());
    body.extend_from_slice(b"{\"error\":{\"code\":");
    json_string(&mut body, code);
    body.extend_from_slice(b",\"message\":");
    json_string(&mut body, message);
    body.extend_from_slice(b"}}");
    write_response(out, status, extra_headers, &body, keep_alive);
}

/// Appends `s` as a JSON string literal.
pub fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                let _ = write!(HexSink(out), "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

struct HexSink<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for HexSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Framing {
        parse_head(raw.as_bytes(), 1000)
    }

    fn err_status(f: Framing) -> u16 {
        match f {
            Framing::Error(e) => e.status,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_post() {
        let raw = "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n";
        let Framing::Head(h) = head(raw) else { panic!() };
        assert_eq!(h.method, Method::Post);
        assert_eq!(&raw[h.path.clone()], "/v1/messages");
        assert_eq!(&raw[h.authorization.clone().unwrap()], "Bearer k");
        assert_eq!(h.content_length, 12);
        assert!(h.keep_alive);
        assert_eq!(h.head_len, raw.len());
    }

    #[test]
    fn partial_until_blank_line() {
        assert!(matches!(head("POST /v1/messages HTTP/1.1\r\nContent-Le"), Framing::Partial));
    }

    #[test]
    fn refuses_smuggling_shapes() {
        assert_eq!(err_status(head("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")), 400);
        assert_eq!(err_status(head("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n")), 400);
        assert_eq!(err_status(head("POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n")), 400);
        assert_eq!(err_status(head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")), 411);
        assert_eq!(err_status(head("POST / HTTP/1.1\r\n\r\n")), 411);
        assert_eq!(err_status(head("POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n")), 413);
        assert_eq!(err_status(head("GARBAGE\r\n\r\n")), 400);
    }

    #[test]
    fn oversized_head_is_431() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(HEAD_BYTES_MAX));
        assert_eq!(err_status(parse_head(big.as_bytes(), 10)), 431);
        let many: String = (0..70).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(err_status(head(&format!("GET / HTTP/1.1\r\n{many}\r\n"))), 431);
    }

    #[test]
    fn connection_semantics() {
        let Framing::Head(h) = head("GET / HTTP/1.0\r\n\r\n") else { panic!() };
        assert!(!h.keep_alive);
        let Framing::Head(h) = head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n") else { panic!() };
        assert!(!h.keep_alive);
    }

    #[test]
    fn json_escaping() {
        let mut v = Vec::new();
        json_string(&mut v, "a\"b\\c\n\u{1}");
        assert_eq!(String::from_utf8(v).unwrap(), r#""a\"b\\c\n\u0001""#);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes: no panic, and a framed head never claims more than it has.
        #[test]
        fn parse_head_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Framing::Head(h) = parse_head(&bytes, 4096) {
                prop_assert!(h.head_len <= bytes.len());
                prop_assert!(h.path.end <= h.head_len);
                prop_assert!(h.content_length <= 4096);
            }
        }

        /// Splitting a valid request anywhere gives Partial, then the same head.
        #[test]
        fn partial_prefixes_then_complete(cut in 0usize..80) {
            let raw = b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\n";
            let cut = cut.min(raw.len() - 1);
            prop_assert!(matches!(parse_head(&raw[..cut], 100), Framing::Partial));
            let Framing::Head(h) = parse_head(raw, 100) else { panic!("complete head") };
            prop_assert_eq!(h.head_len, raw.len());
            prop_assert_eq!(h.content_length, 5);
        }
    }
}
