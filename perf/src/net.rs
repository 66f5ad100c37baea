//! Outgoing connections, spread over several loopback source addresses.
//!
//! One (source address, destination) pair has about 28,000 ephemeral ports
//! (32768–60999). Beyond that, connections bind 127.0.0.2, 127.0.0.3...
//! (all of 127/8 is local on Linux) with `IP_BIND_ADDRESS_NO_PORT`, so the
//! kernel still picks the port at connect time and can reuse TIME_WAIT
//! ports of earlier runs.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::Duration;

use glommio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

use crate::clock::now_ns;

/// Connections one source address takes to one destination.
pub const CONNECTIONS_PER_SOURCE_MAX: usize = 25_000;

/// How long a connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The source addresses for `connections` to one destination: none (let
/// the kernel choose) when one address is enough, unless `forced` asks for
/// a number of them.
pub fn sources(connections: usize, forced: Option<usize>) -> Vec<Ipv4Addr> {
    let n = forced.unwrap_or_else(|| connections.div_ceil(CONNECTIONS_PER_SOURCE_MAX));
    if n <= 1 && forced.is_none() {
        return Vec::new();
    }
    (1..=n.clamp(1, 250) as u8).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
}

/// The source address of the `i`-th connection.
pub fn source_for(sources: &[Ipv4Addr], i: usize) -> Option<Ipv4Addr> {
    (!sources.is_empty()).then(|| sources[i % sources.len()])
}

/// File descriptors kept free beyond the connections (engine pipes,
/// io_uring, the report, the data dir).
const SPARE_FILES: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so one generator
/// process holds `sockets` connections; fails clearly when even the hard
/// limit is too low.
pub fn raise_open_files(sockets: usize) -> anyhow::Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into a valid, owned struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        anyhow::bail!("getrlimit(RLIMIT_NOFILE): {}", io::Error::last_os_error());
    }
    let needed = sockets as u64 + SPARE_FILES;
    if lim.rlim_max < needed {
        anyhow::bail!(
            "{sockets} connections need {needed} open files, but the hard RLIMIT_NOFILE is {}: \
             raise it (ulimit -Hn, limits.conf or LimitNOFILE=) or use fewer --connections",
            lim.rlim_max
        );
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit; soft <= hard always holds here.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            anyhow::bail!("setrlimit(RLIMIT_NOFILE, {}): {}", lim.rlim_max, io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Connects to `dst`, from `src` when given. TCP_NODELAY is set.
pub async fn connect(dst: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let stream = match src {
        None => TcpStream::connect_timeout(dst, CONNECT_TIMEOUT).await?,
        Some(src) => connect_from(dst, src).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_from(dst: SocketAddr, src: Ipv4Addr) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own with a pointer to a live c_int
    // and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // glommio has no connect for a pre-bound socket; on loopback the
    // handshake completes at once, so polling for the peer is cheap.
    let deadline = now_ns() + CONNECT_TIMEOUT.as_nanos() as u64;
    let mut wait = Duration::from_micros(200);
    loop {
        if let Some(e) = sock.take_error()? {
            return Err(e);
        }
        if sock.peer_addr().is_ok() {
            // SAFETY: the descriptor comes from a socket we own and give up here.
            return Ok(unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) });
        }
        if now_ns() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        glommio::timer::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_is_the_kernel_default() {
        assert!(sources(1000, None).is_empty());
        assert_eq!(sources(60_000, None).len(), 3);
        assert_eq!(sources(10, Some(2)), vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)]);
        let s = sources(10, Some(2));
        assert_eq!(source_for(&s, 3), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_for(&[], 3), None);
    }
}
