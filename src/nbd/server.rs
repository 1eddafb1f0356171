//! Listeners, connections, the handshake, and the per-connection request pipeline.
//!
//! Threads: one acceptor per listener, one thread per connection (it does the handshake and
//! then reads requests), and a small pool of workers per connection that execute requests and
//! write replies. Replies go out whole under one lock, so they never interleave; they may go out
//! in any order. A per-connection budget bounds how many requests (and how many payload bytes)
//! are in flight, so memory use is bounded by configuration, never by what a client claims.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::ToSocketAddrs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::export::{ExportRegistry, NbdExport};
use super::proto::{
    self, block_sizes, check_request, encode_export_name_reply, encode_none_chunk,
    encode_offset_data_prefix, encode_option_reply, encode_rep_server, errno_for, parse_string,
    transmission_flags, ClientFlags, Command, ErrorChunk, ExportLimits, Info, InfoRequest,
    OptionHeader, Request, SimpleReply, CMD_FLAG_FUA, EINVAL, INFO_BLOCK_SIZE, INFO_DESCRIPTION,
    INFO_NAME, MIN_BLOCK_MAX_BYTES, OFFSET_DATA_PREFIX_BYTES, OPTION_DATA_MAX_BYTES,
    OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES, SIMPLE_REPLY_HEADER_BYTES, STRING_MAX_BYTES,
};
use crate::{Error, Result};

/// Default largest read or write payload (also advertised as the maximum block size).
pub const PAYLOAD_MAX_BYTES: u32 = 32 << 20;
/// Largest payload limit a configuration may choose.
pub const PAYLOAD_CEILING_BYTES: u32 = 1 << 30;
/// Default most simultaneous connections (over all listeners of one [`NbdServer`]).
pub const CONNECTIONS_MAX: usize = 64;
/// Default most simultaneous connections to one export.
pub const CONNECTIONS_PER_EXPORT_MAX: usize = 16;
/// Default seconds a connection in transmission may send no request before it is closed.
pub const IDLE_TIMEOUT_SECS: u64 = 300;
/// Most clients over the connection limit being told so at once; beyond that a client over
/// the limit is closed without a word.
pub const REFUSALS_MAX: usize = 8;
/// Longest a client over the limit may take to ask for something and be refused.
pub const REFUSAL_TIMEOUT_SECS: u64 = 5;
/// Default most requests in flight on one connection.
pub const IN_FLIGHT_MAX_REQUESTS: usize = 16;
/// Default most payload bytes (write data and read buffers) in flight on one connection.
pub const IN_FLIGHT_MAX_BYTES: u64 = 64 << 20;
/// Default worker threads per connection.
pub const WORKERS_PER_CONNECTION: usize = 4;
/// Default time a client may take for the whole handshake.
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 30;
/// Most options one handshake may send before the server hangs up.
pub const HANDSHAKE_MAX_OPTIONS: usize = 256;
/// The `what` of the [`Error::Invalid`] returned when a non-loopback TCP address is refused.
pub const REMOTE_ADDRESS_REFUSED: &str = "nbd listen address";

const READ_BUFFER_BYTES: usize = 64 * 1024;
const ACCEPT_RETRY_MS: u64 = 50;
const WAKE_TIMEOUT_MS: u64 = 1000;

/// Server configuration. Values out of range are corrected by [`NbdServer::new`]: counts to
/// at least 1, the payload limit into `64 KiB..=PAYLOAD_CEILING_BYTES` (a multiple of 64 KiB),
/// the in-flight bytes to at least one payload, the workers to at most the in-flight requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// Listen on TCP addresses other than loopback. Off by default: NBD has no authentication.
    pub allow_remote: bool,
    /// Largest read or write payload; larger reads get `EOVERFLOW`, larger writes end the
    /// connection (their payload is not read).
    pub payload_max_bytes: u32,
    /// Most simultaneous connections; a client over the limit gets `NBD_REP_ERR_POLICY` for
    /// every option it sends (at most [`REFUSALS_MAX`] such clients at once, each for at most
    /// [`REFUSAL_TIMEOUT_SECS`]; more are closed at once).
    pub connections_max: usize,
    /// Most simultaneous connections to one export; an `NBD_OPT_GO` over the limit gets
    /// `NBD_REP_ERR_POLICY` (an `NBD_OPT_EXPORT_NAME`, which cannot be refused, a hang-up).
    pub connections_per_export_max: usize,
    /// Most requests in flight on one connection.
    pub in_flight_max_requests: usize,
    /// Most payload bytes in flight on one connection.
    pub in_flight_max_bytes: u64,
    /// Worker threads per connection.
    pub workers_per_connection: usize,
    /// Longest the whole handshake may take (`None`: no limit).
    pub handshake_timeout: Option<Duration>,
    /// Longest a connection in transmission may send no request (`None`: no limit). Requests
    /// already received are still answered.
    pub idle_timeout: Option<Duration>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            allow_remote: false,
            payload_max_bytes: PAYLOAD_MAX_BYTES,
            connections_max: CONNECTIONS_MAX,
            connections_per_export_max: CONNECTIONS_PER_EXPORT_MAX,
            in_flight_max_requests: IN_FLIGHT_MAX_REQUESTS,
            in_flight_max_bytes: IN_FLIGHT_MAX_BYTES,
            workers_per_connection: WORKERS_PER_CONNECTION,
            handshake_timeout: Some(Duration::from_secs(HANDSHAKE_TIMEOUT_SECS)),
            idle_timeout: Some(Duration::from_secs(IDLE_TIMEOUT_SECS)),
        }
    }
}

impl NbdConfig {
    fn sanitized(&self) -> NbdConfig {
        let payload = self
            .payload_max_bytes
            .clamp(MIN_BLOCK_MAX_BYTES, PAYLOAD_CEILING_BYTES)
            / MIN_BLOCK_MAX_BYTES
            * MIN_BLOCK_MAX_BYTES;
        let in_flight = self.in_flight_max_requests.max(1);
        let connections = self.connections_max.max(1);
        NbdConfig {
            allow_remote: self.allow_remote,
            payload_max_bytes: payload,
            connections_max: connections,
            connections_per_export_max: self.connections_per_export_max.clamp(1, connections),
            in_flight_max_requests: in_flight,
            in_flight_max_bytes: self.in_flight_max_bytes.max(u64::from(payload)),
            workers_per_connection: self.workers_per_connection.clamp(1, in_flight),
            handshake_timeout: self.handshake_timeout.filter(|d| !d.is_zero()),
            idle_timeout: self.idle_timeout.filter(|d| !d.is_zero()),
        }
    }
}

/// Where a listener is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address (with the port actually bound).
    Tcp(SocketAddr),
}

/// An NBD server: a registry of exports and a configuration, served on any number of
/// listeners.
pub struct NbdServer {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<dyn ExportRegistry>,
    config: NbdConfig,
    active: AtomicUsize,
    /// Clients over the limit being refused right now.
    refusing: AtomicUsize,
    exports: Arc<ExportCounts>,
}

/// Connections per export, bounded by [`NbdConfig::connections_per_export_max`].
#[derive(Debug, Default)]
pub(crate) struct ExportCounts {
    counts: Mutex<HashMap<String, usize>>,
}

/// One connection's hold on its export; released when dropped.
struct ExportClaim {
    counts: Arc<ExportCounts>,
    name: String,
}

impl ExportCounts {
    /// Count a connection to `name`, unless it already has `max`.
    fn claim(self: &Arc<Self>, name: &str, max: usize) -> Option<ExportClaim> {
        let mut c = self.counts.lock();
        let n = c.entry(name.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ExportClaim {
            counts: Arc::clone(self),
            name: name.to_string(),
        })
    }
}

impl Drop for ExportClaim {
    fn drop(&mut self) {
        let mut c = self.counts.counts.lock();
        if let Some(n) = c.get_mut(&self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.name);
            }
        }
    }
}

impl NbdServer {
    /// A server for the exports of `registry`.
    #[must_use]
    pub fn new(registry: Arc<dyn ExportRegistry>, config: NbdConfig) -> Self {
        NbdServer {
            inner: Arc::new(Inner {
                registry,
                config: config.sanitized(),
                active: AtomicUsize::new(0),
                refusing: AtomicUsize::new(0),
                exports: Arc::default(),
            }),
        }
    }

    /// The configuration in effect (after correction).
    #[must_use]
    pub fn config(&self) -> &NbdConfig {
        &self.inner.config
    }

    /// Connections open right now, over all listeners.
    #[must_use]
    pub fn active_connections(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Listen on a unix socket at `path` (which must not exist) and serve until the handle is
    /// shut down or dropped; the socket file is removed then.
    ///
    /// # Errors
    /// [`Error::Io`] when binding fails or the acceptor thread cannot start.
    pub fn serve_unix(&self, path: impl AsRef<Path>) -> Result<ServerHandle> {
        let path = path.as_ref().to_path_buf();
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io("bind", path.display().to_string(), 0, e))?;
        self.start(Listener::Unix(listener), ListenAddr::Unix(path))
    }

    /// Listen on TCP (port 0 picks a free port; see [`ServerHandle::tcp_addr`]).
    ///
    /// # Errors
    /// [`Error::Invalid`] with `what` = [`REMOTE_ADDRESS_REFUSED`] when an address is not
    /// loopback and [`NbdConfig::allow_remote`] is off; [`Error::Io`] when resolving or binding
    /// fails.
    pub fn serve_tcp(&self, addr: impl ToSocketAddrs) -> Result<ServerHandle> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::io("resolve", "nbd tcp address", 0, e))?
            .collect();
        if addrs.is_empty() {
            return Err(Error::invalid(
                REMOTE_ADDRESS_REFUSED,
                "address resolves to nothing",
            ));
        }
        if !self.inner.config.allow_remote {
            if let Some(bad) = addrs.iter().find(|a| !is_loopback(a.ip())) {
                return Err(Error::invalid(
                    REMOTE_ADDRESS_REFUSED,
                    format!("{bad} is not a loopback address and NbdConfig::allow_remote is off"),
                ));
            }
        }
        let listener = TcpListener::bind(&addrs[..])
            .map_err(|e| Error::io("bind", format!("{addrs:?}"), 0, e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("getsockname", format!("{addrs:?}"), 0, e))?;
        self.start(Listener::Tcp(listener), ListenAddr::Tcp(local))
    }

    fn start(&self, listener: Listener, addr: ListenAddr) -> Result<ServerHandle> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, Conn>>> = Arc::default();
        let acceptor = {
            let (inner, stop, conns) = (
                Arc::clone(&self.inner),
                Arc::clone(&stop),
                Arc::clone(&conns),
            );
            thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&listener, &inner, &stop, &conns))
        };
        let acceptor = match acceptor {
            Ok(a) => a,
            Err(e) => {
                if let ListenAddr::Unix(p) = &addr {
                    let _ = std::fs::remove_file(p);
                }
                return Err(Error::io("spawn", "nbd acceptor", 0, e));
            }
        };
        Ok(ServerHandle {
            addr,
            stop,
            acceptor: Some(acceptor),
            conns,
        })
    }
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.inner.registry.list())
            .field("config", &self.inner.config)
            .field("active", &self.active_connections())
            .finish()
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// A running listener. [`ServerHandle::shutdown`] (or dropping the handle) stops accepting,
/// closes this listener's connections and joins every thread it started.
pub struct ServerHandle {
    addr: ListenAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<HashMap<u64, Conn>>>,
}

struct Conn {
    stream: Arc<Stream>,
    thread: JoinHandle<()>,
    /// False for a client being refused (it does not count as a connection).
    counted: bool,
}

impl ServerHandle {
    /// Where the listener is bound.
    #[must_use]
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The bound TCP address (with the real port), for TCP listeners.
    #[must_use]
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.addr {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }

    /// The socket path, for unix listeners.
    #[must_use]
    pub fn unix_path(&self) -> Option<&Path> {
        match &self.addr {
            ListenAddr::Unix(p) => Some(p),
            ListenAddr::Tcp(_) => None,
        }
    }

    /// Connections of this listener that are still being served.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.conns
            .lock()
            .values()
            .filter(|c| c.counted && !c.thread.is_finished())
            .count()
    }

    /// Stop accepting, close every connection of this listener (requests already executing
    /// finish first), and join all threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // The acceptor notices `stop` after its next accept; connect once to provoke it. If
        // that fails the acceptor is left to exit on its own rather than risk hanging here.
        if wake(&self.addr) {
            let _ = acceptor.join();
        }
        let conns: Vec<Conn> = self.conns.lock().drain().map(|(_, c)| c).collect();
        for c in &conns {
            c.stream.shutdown();
        }
        for c in conns {
            let _ = c.thread.join();
        }
        if let ListenAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .finish()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn wake(addr: &ListenAddr) -> bool {
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

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
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
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn shutdown(&self) {
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

/// Decrements the server's connection count when a connection thread ends (or never starts).
struct ActiveGuard(Arc<Inner>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: &Listener,
    inner: &Arc<Inner>,
    stop: &AtomicBool,
    conns: &Mutex<HashMap<u64, Conn>>,
) {
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    // Out of descriptors or similar: back off instead of spinning.
                    thread::sleep(Duration::from_millis(ACCEPT_RETRY_MS));
                }
                continue;
            }
        };
        reap(conns);
        let stream = Arc::new(stream);
        let mut map = conns.lock();
        // Checked under the lock so a concurrent shutdown either sees this connection or
        // makes us stop.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let id = next_id;
        next_id += 1;
        let over = inner.active.load(Ordering::SeqCst) >= inner.config.connections_max;
        let spawned = if over {
            spawn_refusal(inner, &stream, id)
        } else {
            inner.active.fetch_add(1, Ordering::SeqCst);
            let guard = ActiveGuard(Arc::clone(inner));
            let (conn_inner, conn_stream) = (Arc::clone(inner), Arc::clone(&stream));
            thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    let _guard = guard;
                    run_connection(&conn_inner, &conn_stream);
                })
                .ok()
        };
        // On failure the closure (and with it the guard and the stream) is dropped.
        match spawned {
            Some(thread) => {
                map.insert(
                    id,
                    Conn {
                        stream,
                        thread,
                        counted: !over,
                    },
                );
            }
            None => stream.shutdown(),
        }
    }
}

/// Uncounts a client being refused.
struct RefusalGuard(Arc<Inner>);

impl Drop for RefusalGuard {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Start telling a client over the connection limit that it is refused; `None` when too many
/// are being refused already (the caller closes the connection).
fn spawn_refusal(inner: &Arc<Inner>, stream: &Arc<Stream>, id: u64) -> Option<JoinHandle<()>> {
    if inner.refusing.fetch_add(1, Ordering::SeqCst) >= REFUSALS_MAX {
        inner.refusing.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    let guard = RefusalGuard(Arc::clone(inner));
    let (conn_inner, conn_stream) = (Arc::clone(inner), Arc::clone(stream));
    thread::Builder::new()
        .name(format!("nbd-refuse-{id}"))
        .spawn(move || {
            let _guard = guard;
            let limit = Duration::from_secs(REFUSAL_TIMEOUT_SECS);
            let t = conn_inner
                .config
                .handshake_timeout
                .map_or(limit, |h| h.min(limit));
            let deadline = Cell::new(Some(Instant::now() + t));
            let reader = TimedReader::new(&conn_stream, &deadline, None);
            let writer = Mutex::new(&*conn_stream);
            let why = format!(
                "server has {} connections, the most it allows; try again later",
                conn_inner.config.connections_max
            );
            let _ = refuse(&mut BufReader::new(reader), &writer, &why);
            conn_stream.shutdown();
        })
        .ok()
}

fn reap(conns: &Mutex<HashMap<u64, Conn>>) {
    let mut map = conns.lock();
    let done: Vec<u64> = map
        .iter()
        .filter(|(_, c)| c.thread.is_finished())
        .map(|(id, _)| *id)
        .collect();
    for id in done {
        if let Some(c) = map.remove(&id) {
            let _ = c.thread.join();
        }
    }
}

/// Reads a socket under a deadline (the handshake's, while set) or else an idle timeout per
/// read.
struct TimedReader<'a> {
    stream: &'a Stream,
    deadline: &'a Cell<Option<Instant>>,
    idle: Option<Duration>,
    /// The read timeout last set on the socket.
    set: Option<Option<Duration>>,
}

impl<'a> TimedReader<'a> {
    fn new(
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

fn run_connection(inner: &Inner, stream: &Stream) {
    let cfg = &inner.config;
    let deadline = Cell::new(cfg.handshake_timeout.map(|t| Instant::now() + t));
    let reader = BufReader::with_capacity(
        READ_BUFFER_BYTES,
        TimedReader::new(stream, &deadline, cfg.idle_timeout),
    );
    let writer = Mutex::new(stream);
    let kill = || stream.shutdown();
    serve_connection(
        reader,
        &writer,
        &kill,
        &*inner.registry,
        &inner.exports,
        cfg,
        || {
            deadline.set(None);
            true
        },
    );
    stream.shutdown();
}

/// Serve one connection over any byte stream: handshake, then transmission until the client
/// disconnects, a protocol violation, or `kill` makes the reader fail.
///
/// `kill` must make further reads of `reader` fail (it shuts the socket down); it is called
/// when a reply cannot be written. `enter_transmission` runs between the phases (it clears the
/// handshake timeout); returning `false` ends the connection.
pub(crate) fn serve_connection<R: Read, W: Write + Send>(
    mut reader: R,
    writer: &Mutex<W>,
    kill: &(dyn Fn() + Sync),
    registry: &dyn ExportRegistry,
    exports: &Arc<ExportCounts>,
    cfg: &NbdConfig,
    enter_transmission: impl FnOnce() -> bool,
) {
    let Ok(Some(neg)) = handshake(&mut reader, writer, registry, exports, cfg) else {
        return;
    };
    if enter_transmission() {
        transmission(&mut reader, writer, kill, &neg, cfg);
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake.

/// The outcome of a successful handshake.
struct Negotiated {
    export: Arc<dyn NbdExport>,
    structured: bool,
    read_only: bool,
    min_block: u32,
    /// This connection's place in its export's count.
    _claim: ExportClaim,
}

fn send<W: Write>(w: &Mutex<W>, bytes: &[u8]) -> io::Result<()> {
    let mut g = w.lock();
    g.write_all(bytes)?;
    g.flush()
}

fn lookup(registry: &dyn ExportRegistry, name: &str) -> Option<(String, Arc<dyn NbdExport>)> {
    let name = if name.is_empty() {
        registry.default_name()?
    } else {
        name.to_string()
    };
    let export = registry.get(&name)?;
    Some((name, export))
}

/// Send the greeting and read the client's flags; `None` for a client this server cannot talk
/// to (unknown flags, or not fixed newstyle: this server speaks nothing else).
fn greet<R: Read, W: Write>(r: &mut R, w: &Mutex<W>) -> io::Result<Option<ClientFlags>> {
    send(w, &proto::encode_greeting())?;
    let mut raw = [0u8; 4];
    r.read_exact(&mut raw)?;
    Ok(match ClientFlags::parse(u32::from_be_bytes(raw)) {
        Ok(f) if f.fixed_newstyle => Some(f),
        _ => None,
    })
}

/// Read one option; `None` for one that ends the connection (bad magic, too much data).
fn read_option<R: Read>(r: &mut R) -> io::Result<Option<(OptionHeader, Vec<u8>)>> {
    let mut hb = [0u8; OPTION_HEADER_BYTES];
    r.read_exact(&mut hb)?;
    let Ok(h) = OptionHeader::parse(&hb) else {
        return Ok(None);
    };
    if h.length > OPTION_DATA_MAX_BYTES {
        return Ok(None);
    }
    let mut data = vec![0u8; h.length as usize];
    r.read_exact(&mut data)?;
    Ok(Some((h, data)))
}

/// Refuse a client over the connection limit: every option it sends is answered with
/// `NBD_REP_ERR_POLICY` and `why`, until it aborts or leaves.
///
/// `NBD_REP_ERR_POLICY` ("forbidden by server policy") is the reply the protocol has for a
/// request that is valid but that the server will not grant by its own rules, which is what a
/// connection limit is. `NBD_REP_ERR_UNKNOWN` would tell the client the export does not exist,
/// `NBD_REP_ERR_SHUTDOWN` that the server is going away, and `NBD_REP_ERR_TOO_BIG` concerns
/// request sizes; none of them is true here. `NBD_OPT_EXPORT_NAME` has no error reply, so a
/// client using it only sees the connection close.
fn refuse<R: Read, W: Write>(r: &mut R, w: &Mutex<W>, why: &str) -> io::Result<()> {
    if greet(r, w)?.is_none() {
        return Ok(());
    }
    for _ in 0..HANDSHAKE_MAX_OPTIONS {
        let Some((h, _)) = read_option(r)? else {
            return Ok(());
        };
        match h.option {
            proto::OPT_EXPORT_NAME => return Ok(()),
            proto::OPT_ABORT => {
                return send(w, &encode_option_reply(h.option, proto::REP_ACK, &[]))
            }
            _ => send(
                w,
                &encode_option_reply(h.option, proto::REP_ERR_POLICY, why.as_bytes()),
            )?,
        }
    }
    Ok(())
}

/// Run the handshake; `Ok(None)` means the connection is to be closed.
fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &Mutex<W>,
    registry: &dyn ExportRegistry,
    exports: &Arc<ExportCounts>,
    cfg: &NbdConfig,
) -> io::Result<Option<Negotiated>> {
    // Unknown client flags must end the connection; so does a client that is not fixed
    // newstyle (this server speaks nothing else).
    let Some(client) = greet(r, w)? else {
        return Ok(None);
    };
    let mut structured = false;
    for _ in 0..HANDSHAKE_MAX_OPTIONS {
        let Some((h, data)) = read_option(r)? else {
            return Ok(None);
        };
        let reply = |rep: u32, d: &[u8]| send(w, &encode_option_reply(h.option, rep, d));
        match h.option {
            proto::OPT_EXPORT_NAME => {
                let Ok(name) = parse_string(&data, "export name") else {
                    return Ok(None);
                };
                let Some((name, export)) = lookup(registry, &name) else {
                    return Ok(None);
                };
                // Over the export's limit: this option has no error reply.
                let Some(claim) = exports.claim(&name, cfg.connections_per_export_max) else {
                    return Ok(None);
                };
                let read_only = export.read_only();
                let flags = transmission_flags(read_only, export.multi_conn());
                let (min_block, _, _) = block_sizes(
                    export.min_block(),
                    export.preferred_block(),
                    cfg.payload_max_bytes,
                );
                send(
                    w,
                    &encode_export_name_reply(export.size(), flags, client.no_zeroes),
                )?;
                return Ok(Some(Negotiated {
                    export,
                    structured,
                    read_only,
                    min_block,
                    _claim: claim,
                }));
            }
            proto::OPT_ABORT => {
                let _ = reply(proto::REP_ACK, &[]);
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    reply(proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for name in registry.list() {
                    if name.len() <= STRING_MAX_BYTES {
                        reply(proto::REP_SERVER, &encode_rep_server(&name))?;
                    }
                }
                reply(proto::REP_ACK, &[])?;
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        proto::REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else if structured {
                    reply(
                        proto::REP_ERR_INVALID,
                        b"structured replies already negotiated",
                    )?;
                } else {
                    structured = true;
                    reply(proto::REP_ACK, &[])?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let go = h.option == proto::OPT_GO;
                if let Some(neg) =
                    info_or_go(go, &data, registry, exports, cfg, structured, &reply)?
                {
                    return Ok(Some(neg));
                }
            }
            _ => reply(proto::REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Ok(None)
}

/// Answer `NBD_OPT_INFO` or `NBD_OPT_GO`; `Some` when a `GO` succeeded.
fn info_or_go(
    go: bool,
    data: &[u8],
    registry: &dyn ExportRegistry,
    exports: &Arc<ExportCounts>,
    cfg: &NbdConfig,
    structured: bool,
    reply: &dyn Fn(u32, &[u8]) -> io::Result<()>,
) -> io::Result<Option<Negotiated>> {
    let req = match InfoRequest::parse(data) {
        Ok(r) => r,
        Err(e) => {
            reply(proto::REP_ERR_INVALID, e.to_string().as_bytes())?;
            return Ok(None);
        }
    };
    let Some((name, export)) = lookup(registry, &req.name) else {
        reply(proto::REP_ERR_UNKNOWN, b"unknown export")?;
        return Ok(None);
    };
    // A GO takes a place in the export's count for the life of the connection. Over the limit
    // the client is refused by policy (see `refuse`) and may ask for another export.
    let claim = if go {
        let max = cfg.connections_per_export_max;
        let Some(c) = exports.claim(&name, max) else {
            let why = format!("export {name} has {max} connections, the most it allows");
            reply(proto::REP_ERR_POLICY, why.as_bytes())?;
            return Ok(None);
        };
        Some(c)
    } else {
        None
    };
    let read_only = export.read_only();
    let flags = transmission_flags(read_only, export.multi_conn());
    let (min, preferred, max) = block_sizes(
        export.min_block(),
        export.preferred_block(),
        cfg.payload_max_bytes,
    );
    let block_info = Info::BlockSize {
        min,
        preferred,
        max,
    }
    .encode();
    let wants = |t: u16| req.infos.contains(&t);
    if go && min > 1 && !wants(INFO_BLOCK_SIZE) {
        // The client would not know it must align its requests.
        reply(proto::REP_INFO, &block_info)?;
        reply(
            proto::REP_ERR_BLOCK_SIZE_REQD,
            b"this export requires aligned requests",
        )?;
        return Ok(None);
    }
    reply(
        proto::REP_INFO,
        &Info::Export {
            size: export.size(),
            flags,
        }
        .encode(),
    )?;
    if wants(INFO_NAME) {
        reply(proto::REP_INFO, &Info::Name(name).encode())?;
    }
    if wants(INFO_DESCRIPTION) {
        reply(
            proto::REP_INFO,
            &Info::Description(export.description()).encode(),
        )?;
    }
    reply(proto::REP_INFO, &block_info)?;
    reply(proto::REP_ACK, &[])?;
    Ok(claim.map(|c| Negotiated {
        export,
        structured,
        read_only,
        min_block: min,
        _claim: c,
    }))
}

// ---------------------------------------------------------------------------------------------
// Transmission.

/// One request handed to a worker.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: u64,
}

/// Bounds the requests and payload bytes in flight on one connection.
struct Budget {
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    max_requests: usize,
    max_bytes: u64,
}

impl Budget {
    fn new(max_requests: usize, max_bytes: u64) -> Self {
        Budget {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            max_requests,
            max_bytes,
        }
    }

    /// Wait for room for one request of `bytes`. A lone request always fits, so a request no
    /// larger than the payload limit can never wait forever.
    fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock();
        while s.0 >= self.max_requests || (s.0 > 0 && s.1.saturating_add(bytes) > self.max_bytes) {
            self.cv.wait(&mut s);
        }
        s.0 += 1;
        s.1 = s.1.saturating_add(bytes);
    }

    fn release(&self, bytes: u64) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(1);
        s.1 = s.1.saturating_sub(bytes);
        self.cv.notify_all();
    }
}

/// State shared by the reader and the workers of one connection.
struct Session<'a, W> {
    export: &'a dyn NbdExport,
    structured: bool,
    writer: &'a Mutex<W>,
    kill: &'a (dyn Fn() + Sync),
    dead: AtomicBool,
}

impl<W: Write> Session<'_, W> {
    /// Write one whole reply; on failure mark the connection dead and shut it down.
    fn send(&self, bytes: &[u8]) {
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let mut w = self.writer.lock();
        if w.write_all(bytes).and_then(|()| w.flush()).is_err() {
            drop(w);
            self.dead.store(true, Ordering::SeqCst);
            (self.kill)();
        }
    }

    fn send_error(&self, cookie: u64, errno: u32, message: &str, offset: Option<u64>) {
        if self.structured {
            self.send(
                &ErrorChunk {
                    errno,
                    message: message.to_string(),
                    offset,
                }
                .encode(cookie),
            );
        } else {
            self.send(
                &SimpleReply {
                    error: errno,
                    cookie,
                }
                .encode(),
            );
        }
    }

    fn finish(&self, cookie: u64, res: Result<()>, what: &str) {
        match res {
            Ok(()) => self.send(&SimpleReply { error: 0, cookie }.encode()),
            Err(e) => self.send_error(cookie, errno_for(&e), &format!("{what} failed"), None),
        }
    }

    fn fua_flush(&self, fua: bool) -> Result<()> {
        if fua {
            self.export.flush()
        } else {
            Ok(())
        }
    }

    fn execute(&self, job: Job) {
        let Job { req, payload, .. } = job;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = u64::from(req.length);
        let (res, what) = match req.command {
            Command::Read => return self.read(&req),
            Command::Write if payload.is_empty() => (self.fua_flush(fua), "write"),
            Command::Write => (self.export.write(req.offset, &payload, fua), "write"),
            Command::Flush => (self.export.flush(), "flush"),
            Command::Trim if len == 0 => (self.fua_flush(fua), "trim"),
            Command::Trim => (
                self.export
                    .trim(req.offset, len)
                    .and_then(|()| self.fua_flush(fua)),
                "trim",
            ),
            Command::WriteZeroes if len == 0 => (self.fua_flush(fua), "write zeroes"),
            Command::WriteZeroes => (
                self.export.write_zeroes(req.offset, len, fua),
                "write zeroes",
            ),
            _ => return self.send_error(req.cookie, EINVAL, "unsupported command", None),
        };
        drop(payload);
        self.finish(req.cookie, res, what);
    }

    fn read(&self, req: &Request) {
        // The length was checked against the payload limit before the job was queued.
        let len = req.length as usize;
        if self.structured {
            if len == 0 {
                return self.send(&encode_none_chunk(req.cookie));
            }
            let mut buf = vec![0u8; OFFSET_DATA_PREFIX_BYTES + len];
            match self
                .export
                .read(req.offset, &mut buf[OFFSET_DATA_PREFIX_BYTES..])
            {
                Ok(()) => {
                    buf[..OFFSET_DATA_PREFIX_BYTES].copy_from_slice(&encode_offset_data_prefix(
                        req.cookie, req.offset, req.length, true,
                    ));
                    self.send(&buf);
                }
                Err(e) => {
                    drop(buf);
                    self.send_error(req.cookie, errno_for(&e), "read failed", Some(req.offset));
                }
            }
        } else {
            let mut buf = vec![0u8; SIMPLE_REPLY_HEADER_BYTES + len];
            match self
                .export
                .read(req.offset, &mut buf[SIMPLE_REPLY_HEADER_BYTES..])
            {
                Ok(()) => {
                    buf[..SIMPLE_REPLY_HEADER_BYTES].copy_from_slice(
                        &SimpleReply {
                            error: 0,
                            cookie: req.cookie,
                        }
                        .encode(),
                    );
                    self.send(&buf);
                }
                Err(e) => {
                    drop(buf);
                    self.send(
                        &SimpleReply {
                            error: errno_for(&e),
                            cookie: req.cookie,
                        }
                        .encode(),
                    );
                }
            }
        }
    }
}

fn transmission<R: Read, W: Write + Send>(
    reader: &mut R,
    writer: &Mutex<W>,
    kill: &(dyn Fn() + Sync),
    neg: &Negotiated,
    cfg: &NbdConfig,
) {
    let session = Session {
        export: &*neg.export,
        structured: neg.structured,
        writer,
        kill,
        dead: AtomicBool::new(false),
    };
    let budget = Budget::new(cfg.in_flight_max_requests, cfg.in_flight_max_bytes);
    thread::scope(|scope| {
        let (tx, rx) = crossbeam::channel::bounded::<Job>(cfg.in_flight_max_requests);
        let mut workers = 0usize;
        for i in 0..cfg.workers_per_connection {
            let (rx, session, budget) = (rx.clone(), &session, &budget);
            let spawned = thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, move || {
                    for job in rx {
                        let cost = job.cost;
                        session.execute(job);
                        budget.release(cost);
                    }
                });
            workers += usize::from(spawned.is_ok());
        }
        drop(rx);
        if workers > 0 {
            read_requests(reader, &session, &budget, &tx, neg, cfg);
        }
        // Dropping the sender lets the workers drain what is queued and exit; the scope joins
        // them, so every request read before a disconnect is answered.
        drop(tx);
    });
}

fn read_requests<R: Read, W: Write>(
    reader: &mut R,
    session: &Session<'_, W>,
    budget: &Budget,
    tx: &crossbeam::channel::Sender<Job>,
    neg: &Negotiated,
    cfg: &NbdConfig,
) {
    let max_payload = cfg.payload_max_bytes;
    loop {
        if session.dead.load(Ordering::SeqCst) {
            return;
        }
        let mut hb = [0u8; REQUEST_HEADER_BYTES];
        if reader.read_exact(&mut hb).is_err() {
            return;
        }
        // A bad magic means we cannot find the next request: hard disconnect.
        let Ok(req) = Request::parse(&hb) else { return };
        if req.command == Command::Disc {
            return;
        }
        let is_write = req.command == Command::Write;
        if is_write && req.length > max_payload {
            // The payload cannot be accepted and skipping it would mean reading up to 4 GiB
            // for nothing: hard disconnect.
            return;
        }
        let cost = match req.command {
            Command::Read | Command::Write if req.length <= max_payload => u64::from(req.length),
            _ => 0,
        };
        budget.acquire(cost);
        let mut payload = Vec::new();
        if is_write {
            payload = vec![0u8; req.length as usize];
            if reader.read_exact(&mut payload).is_err() {
                budget.release(cost);
                return;
            }
        }
        let limits = ExportLimits {
            size: neg.export.size(),
            read_only: neg.read_only || neg.export.read_only(),
            min_block: neg.min_block,
            max_payload,
        };
        if let Err(rej) = check_request(&req, &limits) {
            drop(payload);
            session.send_error(req.cookie, rej.errno, rej.message, None);
            budget.release(cost);
            continue;
        }
        if let Err(e) = tx.send(Job { req, payload, cost }) {
            budget.release(e.0.cost);
            return;
        }
    }
}
