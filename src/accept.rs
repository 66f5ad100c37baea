//! The accept loops of the three listeners, and what a connection holds
//! while it lives: a place under `engine.connections_per_shard_max` and a
//! pass of its shard's gate (the shutdown drain waits for it).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Pass;

use crate::admin::{AdminConn, AdminState};
use crate::business::BusinessConn;
use crate::config::Config;
use crate::http::conn::{serve, Limits};
use crate::http::write_error;
use crate::shard::Shard;
use crate::shutdown::Shutdown;

/// Most admin connections at once (shard 0).
const ADMIN_CONNECTIONS_MAX: u64 = 1024;
/// Largest admin request body: a whole config in a `PUT /v1/config` (a few
/// hundred clients). 1024 connections at this size bound admin buffers at
/// 256 MiB; the admin listener must stay private.
const ADMIN_BODY_BYTES_MAX: usize = 256 * 1024;

impl Limits {
    fn business(cfg: &Config) -> Limits {
        Limits {
            body_bytes_max: cfg.business.max_body_bytes,
            request_timeout: Duration::from_millis(cfg.business.request_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.business.idle_timeout_ms),
        }
    }
    fn admin() -> Limits {
        Limits {
            body_bytes_max: ADMIN_BODY_BYTES_MAX,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The next connection, or None once `shutdown` began.
async fn next(listener: &TcpListener, shutdown: &Shutdown) -> Option<TcpStream> {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shutdown.wait().await;
            None
        })
        .await;
        match accepted? {
            Ok(s) => return Some(s),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Refuses a connection over the limit with a `503` and closes it.
fn refuse_over_limit(stream: TcpStream) {
    let mut out = Vec::new();
    write_error(&mut out, 503, "too_many_connections", "connection limit reached", "retry-after: 1\r\n", false);
    glommio::spawn_local(async move {
        use futures_lite::AsyncWriteExt;
        let mut s = stream;
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(&out).await;
    })
    .detach();
}

/// Accepts business connections until shutdown, serving each in its own task.
pub async fn accept_business(listener: TcpListener, shard: Rc<Shard>) {
    let max = shard.cfg().engine.connections_per_shard_max as u64;
    let open = Rc::new(Cell::new(0u64));
    let limits = Limits::business(&shard.cfg());
    while let Some(stream) = next(&listener, shard.shutdown()).await {
        if open.get() >= max {
            refuse_over_limit(stream);
            continue;
        }
        let Some(guard) = ConnGuard::new(open.clone(), Some(shard.clone())) else { break };
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut handler = BusinessConn::new(shard.clone());
            serve(stream, limits, &mut handler, shard.shutdown(), Some(shard.pressure())).await;
            drop(guard);
        })
        .detach();
    }
}

/// Serves the admin listener until `shutdown` (triggered when the shard stops).
pub async fn serve_admin(listener: TcpListener, shutdown: Rc<Shutdown>, state: Rc<AdminState>) {
    let open = Rc::new(Cell::new(0u64));
    // Admin connections are not drained: /readyz must answer until the end.
    let never = Rc::new(Shutdown::default());
    while let Some(stream) = next(&listener, &shutdown).await {
        if open.get() >= ADMIN_CONNECTIONS_MAX {
            refuse_over_limit(stream);
            continue;
        }
        let Some(guard) = ConnGuard::new(open.clone(), None) else { continue };
        let (never, state) = (never.clone(), state.clone());
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "unknown".into());
        glommio::spawn_local(async move {
            serve(stream, Limits::admin(), &mut AdminConn::new(state, peer), &never, None).await;
            drop(guard);
        })
        .detach();
    }
}

/// Accepts mobile connections until shutdown; each upgrade request is
/// checked here and the session handed to the user's home shard.
pub async fn accept_mobile(listener: TcpListener, shard: Rc<Shard>) {
    let max = shard.cfg().engine.connections_per_shard_max;
    while let Some(stream) = next(&listener, shard.shutdown()).await {
        if shard.sessions().len() >= max {
            drop(stream); // over the limit: refuse fast, the client retries elsewhere or later
            continue;
        }
        glommio::spawn_local(crate::mobile::serve_conn(shard.clone(), stream)).detach();
    }
}

/// Counts a connection for the limit and holds its pass for the drain.
struct ConnGuard {
    open: Rc<Cell<u64>>,
    shard: Option<Rc<Shard>>,
    _pass: Option<Pass>,
}

impl ConnGuard {
    /// None when the shard is already draining (its gate is closed).
    fn new(open: Rc<Cell<u64>>, shard: Option<Rc<Shard>>) -> Option<Self> {
        let pass = match &shard {
            Some(s) => Some(s.shutdown().enter()?),
            None => None,
        };
        open.set(open.get() + 1);
        if let Some(s) = &shard {
            s.stats().connections.set(s.stats().connections.get() + 1);
        }
        Some(Self { open, shard, _pass: pass })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        if let Some(s) = &self.shard {
            s.stats().connections.set(s.stats().connections.get() - 1);
        }
    }
}
