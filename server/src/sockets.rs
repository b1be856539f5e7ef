//! What a server of thousands of connections asks of the OS: an open-file limit as high as this
//! process may set it (a socket is a file), and listeners whose accept queue holds a burst of
//! clients connecting at once.

use std::io;
use std::net::{TcpListener, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections a listener queues before the server accepts them. The kernel caps it at
/// `net.core.somaxconn` (4,096 on recent Linux). The standard library's 128 overflows when
/// thousands of clients connect at once, and each client past it then waits out a SYN
/// retransmit, a second or more.
pub const BACKLOG: i32 = 4096;

/// Binds a TCP listener on the first address of `addr` that binds, with an accept queue of
/// [`BACKLOG`] (and `SO_REUSEADDR` on Unix, as the standard library sets it).
pub fn listen(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        let bound = (|| {
            let socket = Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))?;
            #[cfg(unix)]
            socket.set_reuse_address(true)?;
            socket.bind(&a.into())?;
            socket.listen(BACKLOG)?;
            Ok::<_, io::Error>(socket.into())
        })();
        match bound {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on")))
}

/// This process's limits on open files: (soft, hard).
#[cfg(unix)]
// `rlim_t` is a u64 on Linux and macOS but an i64 on some BSDs.
#[allow(clippy::unnecessary_cast)]
pub fn open_file_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur as u64, r.rlim_max as u64))
}

/// Raises the soft limit on open files to the hard limit (children inherit it); returns the soft
/// limit as it is after.
#[cfg(unix)]
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_file_limit() -> io::Result<u64> {
    let (soft, hard) = open_file_limit()?;
    // An unlimited hard limit still stops at the kernel's `fs.nr_open`, by default 2^20.
    let want = if hard == libc::RLIM_INFINITY as u64 {
        1 << 20
    } else {
        hard
    };
    if soft >= want {
        return Ok(soft);
    }
    let r = libc::rlimit {
        rlim_cur: want as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: `r` is a valid rlimit, read by the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(want)
}

/// This process's limits on open files: not known off Unix.
#[cfg(not(unix))]
pub fn open_file_limit() -> io::Result<(u64, u64)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "open-file limits are read on Unix only",
    ))
}

/// Raises the soft limit on open files: not done off Unix.
#[cfg(not(unix))]
pub fn raise_open_file_limit() -> io::Result<u64> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "open-file limits are raised on Unix only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_with_a_long_queue_on_any_free_port() {
        let l = listen(("127.0.0.1", 0)).unwrap();
        assert_ne!(l.local_addr().unwrap().port(), 0);
        std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn the_soft_limit_rises_to_the_hard_one() {
        let soft = raise_open_file_limit().unwrap();
        let (now, hard) = open_file_limit().unwrap();
        assert_eq!(soft, now);
        assert!(now == hard || hard == libc::RLIM_INFINITY as u64);
    }
}
