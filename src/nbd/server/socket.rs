//! The sockets a server talks over: unix and TCP behind one [`Stream`] type, their listeners,
//! and [`TimedReader`], which bounds how long a read may wait.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::ListenAddr;

/// Longest [`wake`] waits for its connection.
const WAKE_TIMEOUT_MS: u64 = 1000;

/// Connect once to a listener so that its acceptor wakes up and sees the stop flag; `false`
/// when the connection failed.
pub(super) fn wake(addr: &ListenAddr) -> bool {
    match addr {
        ListenAddr::Unix(p) => UnixStream::connect(p).is_ok(),
        ListenAddr::Tcp(a) => {
            let mut target = *a;
            if target.ip().is_unspecified() {
                target.set_ip(match target.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                });
            }
            TcpStream::connect_timeout(&target, Duration::from_millis(WAKE_TIMEOUT_MS)).is_ok()
        }
    }
}

/// A bound listener of either family.
pub(super) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Accept one client (TCP ones with `TCP_NODELAY`).
    pub(super) fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }
}

/// A connected socket of either family.
#[derive(Debug)]
pub(super) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Shut both directions down, ignoring errors (the peer may be gone already).
    pub(super) fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&mut &*s).read(buf),
            Stream::Tcp(s) => (&mut &*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&mut &*s).write(buf),
            Stream::Tcp(s) => (&mut &*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match *self {
            Stream::Unix(s) => (&mut &*s).flush(),
            Stream::Tcp(s) => (&mut &*s).flush(),
        }
    }
}

/// Reads a socket under a deadline (the handshake's, while set) or else an idle timeout per
/// read.
pub(super) struct TimedReader<'a> {
    stream: &'a Stream,
    deadline: &'a Cell<Option<Instant>>,
    idle: Option<Duration>,
    /// The read timeout last set on the socket.
    set: Option<Option<Duration>>,
}

impl<'a> TimedReader<'a> {
    /// A reader of `stream` under `deadline` (while set), else `idle` per read.
    pub(super) fn new(
        stream: &'a Stream,
        deadline: &'a Cell<Option<Instant>>,
        idle: Option<Duration>,
    ) -> Self {
        TimedReader {
            stream,
            deadline,
            idle,
            set: None,
        }
    }
}

impl TimedReader<'_> {
    /// Whether the socket has bytes to read right now (a zero-timeout `poll`; an error counts
    /// as readable, so that the caller reads and meets it).
    pub(super) fn readable_now(&self) -> bool {
        use std::os::fd::AsFd;
        let fd = match self.stream {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        };
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        !matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
    }
}

impl Read for TimedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = match self.deadline.get() {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Some(left)
            }
            None => self.idle,
        };
        if self.set != Some(t) {
            self.stream.set_read_timeout(t)?;
            self.set = Some(t);
        }
        (&mut &*self.stream).read(buf)
    }
}
