//! `ceiling`: a bare HTTP/1.1 server on the engine's runtime (glommio,
//! one executor per core, SO_REUSEPORT) that frames each request and
//! answers a fixed `202` shaped like esh3ar's, doing no other work. What
//! esh3ar reaches against what this reaches is the headline ratio: the cost
//! of validation, routing, journaling and fdatasync over the bare runtime.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context as _;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement, PoolThreadHandles};

/// The answer to every request (same size and shape as esh3ar's 202).
pub const RESPONSE: &[u8] = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 45\r\n\r\n{\"id\":\"0000000000000000\",\"status\":\"accepted\"}";

/// Largest request the ceiling takes.
const REQUEST_BYTES_MAX: usize = 1 << 20;

/// Pool placement: one executor per entry of `cpus`, or `threads`
/// unbound executors (they then follow the process's `taskset`).
pub fn placement(threads: usize, cpus: &[usize]) -> anyhow::Result<PoolPlacement> {
    if cpus.is_empty() {
        return Ok(PoolPlacement::Unbound(threads.max(1)));
    }
    let online = CpuSet::online().map_err(|e| anyhow::anyhow!("cannot read the CPU topology: {e}"))?;
    let sets = cpus
        .iter()
        .map(|&c| {
            let set = online.clone().filter(|l| l.cpu == c);
            if set.is_empty() {
                anyhow::bail!("CPU {c} is not online");
            }
            Ok(set)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(PoolPlacement::Custom(sets))
}

/// Starts a glommio pool running `f(shard_index)` on every executor.
pub fn pool<G, F, T>(
    name: &str,
    placement: PoolPlacement,
    spin_before_park: Option<std::time::Duration>,
    f: G,
) -> anyhow::Result<PoolThreadHandles<T>>
where
    G: Fn(usize) -> F + Clone + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut builder = LocalExecutorPoolBuilder::new(placement).name(name);
    if let Some(d) = spin_before_park {
        builder = builder.spin_before_park(d);
    }
    builder
        .on_all_shards(move || {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            f(i)
        })
        .map_err(|e| anyhow::anyhow!("cannot start the {name} executors: {e}"))
}

/// Binds a placeholder with SO_REUSEPORT to learn a free port when `addr`
/// asks for port 0, so that every executor binds the same port.
fn reserve(addr: SocketAddr) -> anyhow::Result<(SocketAddr, Option<socket2::Socket>)> {
    if addr.port() != 0 {
        return Ok((addr, None));
    }
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    let bound = sock.local_addr()?.as_socket().context("inet socket")?;
    Ok((bound, Some(sock)))
}

/// Serves forever (until the process is killed). Calls `ready` with the
/// bound address once every executor listens.
pub fn serve(
    listen: SocketAddr,
    threads: usize,
    cpus: &[usize],
    socket_timeouts: bool,
    ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let (addr, placeholder) = reserve(listen).with_context(|| format!("cannot bind {listen}"))?;
    let n = if cpus.is_empty() { threads.max(1) } else { cpus.len() };
    let bound = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b = bound.clone();
    let handles = pool("ceiling", placement(threads, cpus)?, None, move |_| {
        let bound = b.clone();
        async move {
            let listener = match TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("ceiling: cannot bind {addr}: {e}");
                    std::process::exit(1);
                }
            };
            bound.fetch_add(1, std::sync::atomic::Ordering::Release);
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(serve_conn(stream, socket_timeouts)).detach();
                    }
                    Err(_) => glommio::timer::sleep(std::time::Duration::from_millis(1)).await,
                }
            }
        }
    })?;
    while bound.load(std::sync::atomic::Ordering::Acquire) < n {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    drop(placeholder);
    ready(addr);
    for r in handles.join_all() {
        r.map_err(|e| anyhow::anyhow!("ceiling executor failed: {e}"))?;
    }
    Ok(())
}

/// Starts the ceiling in background threads of this process (for tests).
pub fn spawn_background(threads: usize) -> anyhow::Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        if let Err(e) = serve(listen, threads, &[], false, |a| {
            let _ = tx.send(a);
        }) {
            eprintln!("ceiling: {e:#}");
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(30)).context("the ceiling did not start")
}

/// With `socket_timeouts`, every read and write carries a timeout as the
/// engine's connections do (a diagnostic: what timeouts cost the runtime).
async fn serve_conn(mut stream: TcpStream, socket_timeouts: bool) {
    let _ = stream.set_nodelay(true);
    if socket_timeouts {
        let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(10)));
    }
    let mut buf = vec![0u8; 8192];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out = Vec::with_capacity(RESPONSE.len() * 4);
    loop {
        loop {
            match frame(&buf[start..end]) {
                Some(Ok(n)) => {
                    start += n;
                    out.extend_from_slice(RESPONSE);
                }
                Some(Err(())) => return,
                None => break,
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
            if end == buf.len() {
                if buf.len() >= REQUEST_BYTES_MAX {
                    return;
                }
                buf.resize(buf.len() * 2, 0);
            }
        }
        if socket_timeouts {
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(120)));
        }
        match stream.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => end += n,
        }
    }
}

/// Frames one request: Some(Ok(bytes)) when complete, None when partial.
fn frame(buf: &[u8]) -> Option<Result<usize, ()>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(Err(())),
    };
    let len = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head + len).then_some(Ok(head + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_is_well_formed() {
        let (r, used) = crate::http_client::parse(RESPONSE).unwrap().unwrap();
        assert_eq!(r.status, 202);
        assert_eq!(used, RESPONSE.len());
    }

    #[test]
    fn frames_requests() {
        let req = b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET";
        assert_eq!(frame(req), Some(Ok(req.len() - 3)));
        assert_eq!(frame(&req[..req.len() - 4]), None);
        assert_eq!(frame(b"\x01\x02\r\n\r\n"), Some(Err(())));
    }
}
