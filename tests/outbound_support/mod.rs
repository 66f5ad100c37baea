//! A local webhook receiver for the outbound tests: a hyper server on
//! 127.0.0.1 on its own thread and runtime, so it serves whatever runtime
//! the test itself runs on (tokio or glommio). It checks every signature
//! with its own HMAC (hmac + sha2 + base64 here, not the engine's signing
//! code), records what it saw, and answers as the test's `behave` says.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use sha2::Sha256;

use esh3ar::outbound::{BreakerState, Endpoint, OutboundStatus, Secret};

/// How the receiver answers one request (by its arrival index, from 0).
#[derive(Debug, Clone)]
pub enum Reply {
    Ok,
    Status(u16),
    SlowOk(Duration),
    /// Never answers.
    Hang,
    /// 429 with this `Retry-After` value.
    TooMany(String),
    /// 200 with a 10 MB body, streamed.
    Huge,
    /// 200, one chunk, then a body that never ends.
    Endless,
    /// 307 to this URL.
    Redirect(String),
}

pub fn random_key() -> Vec<u8> {
    (0..32).map(|_| rand::random::<u8>()).collect()
}

pub fn secret_text(key: &[u8]) -> String {
    format!("whsec_{}", STANDARD.encode(key))
}

pub type Behave = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

pub fn always(reply: Reply) -> Behave {
    Arc::new(move |_| reply.clone())
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub webhook_id: String,
    pub timestamp_s: u64,
    pub signature_ok: bool,
    pub content_type_ok: bool,
    pub at: Instant,
    pub body: Bytes,
    /// The endpoint's breaker as published when this request arrived.
    pub breaker: Option<BreakerState>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    key: Vec<u8>,
    state: Arc<State>,
}

struct State {
    key: Vec<u8>,
    behave: Behave,
    arrivals: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Bytes of streamed bodies (`Huge`, `Endless`) hyper took from us.
    streamed: Arc<AtomicUsize>,
    status: OnceLock<(Arc<OutboundStatus>, usize)>,
}

impl Receiver {
    pub fn start(behave: Behave) -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap(), behave)
    }

    pub fn start_on(addr: SocketAddr, behave: Behave) -> Receiver {
        Self::start_keyed(addr, random_key(), behave)
    }

    /// On a given address with a given key (a receiver that comes back).
    pub fn start_keyed(addr: SocketAddr, key: Vec<u8>, behave: Behave) -> Receiver {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            key: key.clone(),
            behave,
            arrivals: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            streamed: Arc::new(AtomicUsize::new(0)),
            status: OnceLock::new(),
        });
        let served = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(serve(listener, served));
        });
        Receiver { addr, key, state }
    }

    pub fn url(&self) -> url::Url {
        format!("http://{}/hooks/esh3ar?tenant=t1", self.addr).parse().unwrap()
    }

    pub fn secret_text(&self) -> String {
        secret_text(&self.key)
    }

    pub fn endpoint(&self, name: &str) -> Endpoint {
        Endpoint { name: name.into(), url: self.url(), secret: Secret::parse(&self.secret_text()).unwrap() }
    }

    /// Lets the receiver record the breaker state of endpoint `index` at each arrival.
    pub fn watch(&self, status: Arc<OutboundStatus>, index: usize) {
        let _ = self.state.status.set((status, index));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.arrivals.load(Ordering::SeqCst)
    }

    /// Bytes of streamed bodies handed to hyper (a bound on what the client read).
    pub fn streamed_bytes(&self) -> usize {
        self.state.streamed.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<State>) {
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type HttpReply = Response<BoxBody<Bytes, Infallible>>;

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<HttpReply, Infallible> {
    let _in_flight = InFlight::enter(&state);
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (webhook_id, timestamp, signature) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let content_type_ok = header("content-type") == "application/json";
    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let signature_ok = verify(&state.key, &webhook_id, &timestamp, &body, &signature);
    let breaker = state.status.get().and_then(|(status, index)| status.breaker(*index));
    let index = {
        let mut seen = state.seen.lock().unwrap();
        seen.push(Seen {
            webhook_id,
            timestamp_s: timestamp.parse().unwrap_or(0),
            signature_ok,
            content_type_ok,
            at: Instant::now(),
            body,
            breaker,
        });
        state.arrivals.fetch_add(1, Ordering::SeqCst)
    };
    let reply = (state.behave)(index);
    Ok(match reply {
        Reply::Ok => respond(200, full("ok")),
        Reply::Status(code) => respond(code, full("no")),
        Reply::SlowOk(d) => {
            tokio::time::sleep(d).await;
            respond(200, full("ok"))
        }
        Reply::Hang => std::future::pending().await,
        Reply::TooMany(after) => {
            let mut r = respond(429, full("slow down"));
            r.headers_mut().insert("retry-after", after.parse().unwrap());
            r
        }
        Reply::Redirect(to) => {
            let mut r = respond(307, full("elsewhere"));
            r.headers_mut().insert("location", to.parse().unwrap());
            r
        }
        Reply::Huge => {
            respond(200, Chunks { left: 10 << 20, endless: false, streamed: state.streamed.clone() }.boxed())
        }
        Reply::Endless => respond(200, Chunks { left: 1024, endless: true, streamed: state.streamed.clone() }.boxed()),
    })
}

/// The independent check: HMAC-SHA256 over "id.timestamp.body" with the raw key.
fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(b64) = header.strip_prefix("v1,") else { return false };
    let Ok(expected) = STANDARD.decode(b64) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn respond(code: u16, body: BoxBody<Bytes, Infallible>) -> HttpReply {
    let mut r = Response::new(body);
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
    r
}

fn full(text: &'static str) -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::from_static(text.as_bytes())).boxed()
}

static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// A streamed body: `left` bytes in 64 KiB chunks from a static buffer (the
/// receiver itself holds no 10 MB), then either the end or nothing ever again.
struct Chunks {
    left: usize,
    endless: bool,
    streamed: Arc<AtomicUsize>,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return if self.endless { Poll::Pending } else { Poll::Ready(None) };
        }
        let n = self.left.min(CHUNK.len());
        self.left -= n;
        self.streamed.fetch_add(n, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }
}
