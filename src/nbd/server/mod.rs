//! Listeners, connections, the handshake, and the per-connection request pipeline.
//!
//! Threads: one acceptor per listener, one thread per connection (it does the handshake and
//! then reads requests), and a small pool of workers per connection that execute requests and
//! write replies. Replies go out whole under one lock, so they never interleave; they may go out
//! in any order. A per-connection budget bounds how many requests (and how many payload bytes)
//! are in flight, so memory use is bounded by configuration, never by what a client claims.
//!
//! Layout, in the order a client meets them:
//!
//! - this file: the limits and [`NbdConfig`], [`NbdServer`] and its listeners
//!   ([`ServerHandle`]), the accept loop (connection counting, refusal of clients over the
//!   limit, per-export counts) and [`serve_connection`], which runs one connection's two
//!   phases;
//! - `socket`: unix and TCP sockets behind one type, and the reader that enforces the
//!   handshake deadline and the idle timeout;
//! - `handshake`: option haggling up to the chosen export (or a refusal);
//! - `transmission`: the request reader, the in-flight budget, and the workers that execute
//!   requests and write replies for a `Connection`.

mod handshake;
mod socket;
mod transmission;

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::handshake::{handshake, refuse};
use self::socket::{wake, Listener, Stream, TimedReader};
use self::transmission::transmission;
use super::export::ExportRegistry;
use super::proto::MIN_BLOCK_MAX_BYTES;
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
/// Default most requests in flight on one connection (QEMU's NBD client keeps up to 16 per
/// connection, `qemu-img bench -d 32` 32; Linux's nbd driver 128 per queue).
pub const IN_FLIGHT_MAX_REQUESTS: usize = 64;
/// Default most payload bytes (write data and read buffers) in flight on one connection.
pub const IN_FLIGHT_MAX_BYTES: u64 = 64 << 20;
/// Default most worker threads per connection, started as requests in flight need them: each
/// request in flight beyond the reading thread's own runs on one, so that concurrent first
/// writes can share their flushes and table commits.
pub const WORKERS_PER_CONNECTION: usize = 32;
/// Default time a client may take for the whole handshake.
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 30;
/// Most options one handshake may send before the server hangs up.
pub const HANDSHAKE_MAX_OPTIONS: usize = 256;
/// The `what` of the [`Error::Invalid`] returned when a non-loopback TCP address is refused.
pub const REMOTE_ADDRESS_REFUSED: &str = "nbd listen address";

const READ_BUFFER_BYTES: usize = 64 * 1024;
const ACCEPT_RETRY_MS: u64 = 50;

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
        let conns: Arc<Mutex<HashMap<u64, ConnectionThread>>> = Arc::default();
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
    conns: Arc<Mutex<HashMap<u64, ConnectionThread>>>,
}

/// A listener's record of one connection thread (or of a thread refusing a client).
struct ConnectionThread {
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
        let conns: Vec<ConnectionThread> = self.conns.lock().drain().map(|(_, c)| c).collect();
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
    conns: &Mutex<HashMap<u64, ConnectionThread>>,
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
                    ConnectionThread {
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

fn reap(conns: &Mutex<HashMap<u64, ConnectionThread>>) {
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
pub(crate) fn serve_connection<R: transmission::InputWaiting, W: Write + Send>(
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
