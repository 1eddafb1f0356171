//! The control socket of a serving process: while `timezero serve` holds a table, other
//! `timezero` commands on that table send their request here and the serving process runs them.
//!
//! Protocol (version [`PROTOCOL_VERSION`]): the client sends one JSON line
//! `{"v":2,"req":...}`. The server answers with JSON lines ("frames"): any number of progress
//! lines, data frames (a line announcing N bytes, then those N raw bytes: the bytes of `read`
//! and `export`, which the client writes where it was asked to), and one final line with the
//! command's output or error. A `write` request is answered first with a line asking for its
//! bytes, which the client then streams (exactly the announced length): no file path ever
//! crosses the socket for data, and every path that does is absolute (the client canonicalises
//! it; the server refuses a relative one). While a command runs, anything the client sends, or
//! the client hanging up, asks the server to stop it (Ctrl-C on the client).
//!
//! The server serves at most [`CONTROL_CONNECTIONS_MAX`] connections at once, one thread each;
//! further clients get a `busy` reply at once (the client retries for a while), and a client
//! that does not send its request within [`CONTROL_READ_TIMEOUT`] is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::command::{execute, Remote};
pub use crate::command::{Channel, CopyRegistry, Registered};
use crate::engine::Engine;
use crate::ids::SessionId;
use crate::state::{Reason, SessionState};
use crate::{Error, Result};

/// Version of the control protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 2;
/// Most control connections served at once; more get a `busy` reply.
pub const CONTROL_CONNECTIONS_MAX: usize = 16;
/// Longest a control client may take to send its request line.
pub const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client keeps retrying a busy server.
pub const CONTROL_BUSY_RETRY: Duration = Duration::from_secs(20);

/// Longest request line accepted.
const REQUEST_BYTES_MAX: u64 = 64 * 1024;
/// Longest reply line accepted (a `status --json` of many sessions).
const FRAME_BYTES_MAX: u64 = 64 << 20;
/// Largest data frame either side sends or accepts.
const DATA_FRAME_BYTES_MAX: u64 = 4 << 20;
/// Longest silence while a `write` streams its bytes, or while a reply cannot be written.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server lets running commands finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The control socket path of a table: `TABLE.ctl`.
#[must_use]
pub fn socket_path(table: &Path) -> PathBuf {
    let mut p = table.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Request {
    Run(Remote),
    Shutdown,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Envelope {
    v: u32,
    req: Request,
}

/// One line from the server.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Frame {
    /// Too many control connections; try again.
    Busy(String),
    /// Send the `write` bytes now.
    Send,
    /// A progress line for the client's standard error.
    Progress(String),
    /// This many raw bytes follow.
    Data(u64),
    /// The command succeeded; its output.
    Done(String),
    /// The command failed; `interrupted` when it was stopped at the client's request. `typed`
    /// carries the error's variant when the client can rebuild it.
    Failed {
        error: String,
        interrupted: bool,
        #[serde(default)]
        typed: Option<WireError>,
    },
}

impl Frame {
    fn failed(error: String) -> Frame {
        Frame::Failed {
            error,
            interrupted: false,
            typed: None,
        }
    }
}

/// The variants of [`Error`] a caller matches on, as they cross the control socket, so that a
/// command forwarded to the serving process fails with the same variant as it would here. The
/// others (I/O errors, corruption, invalid input: their fields name static strings of this
/// build) come back as [`Error::Remote`] with the server's message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum WireError {
    UnknownSession(SessionId),
    UnknownVolume(String),
    NotActive {
        id: SessionId,
        state: SessionState,
    },
    NotIncremental(SessionId),
    Reversing {
        id: SessionId,
        pending: u64,
        what: String,
    },
    Suspended {
        id: SessionId,
        target_role: bool,
        path: String,
        why: String,
    },
    ExtentTerminated {
        id: SessionId,
        extent: u32,
        reason: Reason,
    },
    TargetTooSmall {
        target: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    TargetInUse {
        volume: String,
        offset: u64,
        len: u64,
        other: SessionId,
    },
    Overlap {
        volume: String,
        offset: u64,
        len: u64,
    },
    Misaligned {
        offset: u64,
        len: u64,
        align: u64,
    },
    NotAVolume {
        path: String,
        why: String,
    },
    HoldsData {
        path: String,
        found: String,
    },
    ReadOnly {
        path: String,
    },
    Interrupted(String),
}

impl WireError {
    /// The typed form of `e`, when it has one.
    fn of(e: &Error) -> Option<WireError> {
        Some(match e {
            Error::UnknownSession(id) => WireError::UnknownSession(*id),
            Error::UnknownVolume(v) => WireError::UnknownVolume(v.clone()),
            Error::NotIncremental(id) => WireError::NotIncremental(*id),
            Error::Reversing { id, pending, what } => WireError::Reversing {
                id: *id,
                pending: *pending,
                what: what.clone(),
            },
            Error::NotActive { id, state } => WireError::NotActive {
                id: *id,
                state: *state,
            },
            Error::Suspended {
                id,
                role,
                path,
                why,
            } => WireError::Suspended {
                id: *id,
                target_role: *role == "target",
                path: path.clone(),
                why: why.clone(),
            },
            Error::ExtentTerminated { id, extent, reason } => WireError::ExtentTerminated {
                id: *id,
                extent: *extent,
                reason: reason.clone(),
            },
            Error::TargetTooSmall {
                target,
                offset,
                len,
                size,
            } => WireError::TargetTooSmall {
                target: target.clone(),
                offset: *offset,
                len: *len,
                size: *size,
            },
            Error::TargetInUse {
                volume,
                offset,
                len,
                other,
            } => WireError::TargetInUse {
                volume: volume.clone(),
                offset: *offset,
                len: *len,
                other: *other,
            },
            Error::Overlap {
                volume,
                offset,
                len,
            } => WireError::Overlap {
                volume: volume.clone(),
                offset: *offset,
                len: *len,
            },
            Error::Misaligned { offset, len, align } => WireError::Misaligned {
                offset: *offset,
                len: *len,
                align: *align,
            },
            Error::NotAVolume { path, why } => WireError::NotAVolume {
                path: path.clone(),
                why: why.clone(),
            },
            Error::HoldsData { path, found } => WireError::HoldsData {
                path: path.clone(),
                found: found.clone(),
            },
            Error::ReadOnly { path } => WireError::ReadOnly { path: path.clone() },
            Error::Interrupted(m) => WireError::Interrupted(m.clone()),
            _ => return None,
        })
    }

    fn into_error(self) -> Error {
        match self {
            WireError::UnknownSession(id) => Error::UnknownSession(id),
            WireError::UnknownVolume(v) => Error::UnknownVolume(v),
            WireError::NotIncremental(id) => Error::NotIncremental(id),
            WireError::Reversing { id, pending, what } => Error::Reversing { id, pending, what },
            WireError::NotActive { id, state } => Error::NotActive { id, state },
            WireError::Suspended {
                id,
                target_role,
                path,
                why,
            } => Error::Suspended {
                id,
                role: if target_role { "target" } else { "source" },
                path,
                why,
            },
            WireError::ExtentTerminated { id, extent, reason } => {
                Error::ExtentTerminated { id, extent, reason }
            }
            WireError::TargetTooSmall {
                target,
                offset,
                len,
                size,
            } => Error::TargetTooSmall {
                target,
                offset,
                len,
                size,
            },
            WireError::TargetInUse {
                volume,
                offset,
                len,
                other,
            } => Error::TargetInUse {
                volume,
                offset,
                len,
                other,
            },
            WireError::Overlap {
                volume,
                offset,
                len,
            } => Error::Overlap {
                volume,
                offset,
                len,
            },
            WireError::Misaligned { offset, len, align } => {
                Error::Misaligned { offset, len, align }
            }
            WireError::NotAVolume { path, why } => Error::NotAVolume { path, why },
            WireError::HoldsData { path, found } => Error::HoldsData { path, found },
            WireError::ReadOnly { path } => Error::ReadOnly { path },
            WireError::Interrupted(m) => Error::Interrupted(m),
        }
    }
}

/// The error a `Failed` frame stands for: its variant when the server sent one, else its
/// message as [`Error::Remote`].
fn remote_error(error: String, typed: Option<WireError>) -> Error {
    typed.map_or(Error::Remote(error), WireError::into_error)
}

/// A listening control socket.
#[derive(Debug)]
pub struct ControlServer {
    ctx: Arc<Ctx>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Ctx {
    engine: Arc<Engine>,
    path: PathBuf,
    table: String,
    stop: AtomicBool,
    active: AtomicUsize,
    copies: CopyRegistry,
}

/// Counts a connection being served; uncounts it when dropped.
struct Slot(Arc<Ctx>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ControlServer {
    /// Listen at `path` (a stale socket file is replaced) for commands on `table`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn start(engine: Arc<Engine>, path: &Path, table: &Path) -> Result<ControlServer> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .map_err(|e| Error::io("bind", path.display().to_string(), 0, e))?;
        let ctx = Arc::new(Ctx {
            engine,
            path: path.to_path_buf(),
            table: table.display().to_string(),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            copies: CopyRegistry::default(),
        });
        let c2 = ctx.clone();
        let thread = std::thread::Builder::new()
            .name("tz-control".into())
            .spawn(move || accept_loop(&l, &c2))
            .map_err(|e| Error::io("spawn", "control", 0, e))?;
        Ok(ControlServer {
            ctx,
            thread: Some(thread),
        })
    }

    /// Connections being served right now.
    #[must_use]
    pub fn active(&self) -> usize {
        self.ctx.active.load(Ordering::Acquire)
    }

    /// Block until a client asks the server to shut down; then stop the running copies and
    /// wait (a bounded time) for the commands still running to answer their clients.
    pub fn wait_shutdown(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.ctx.stop.store(true, Ordering::Release);
        let _ = std::fs::remove_file(&self.ctx.path);
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Wake the accept loop.
            let _ = UnixStream::connect(&self.ctx.path);
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.ctx.path);
    }
}

fn accept_loop(l: &UnixListener, ctx: &Arc<Ctx>) {
    for conn in l.incoming() {
        if ctx.stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(c) = conn else {
            // Out of descriptors or similar: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if ctx.active.fetch_add(1, Ordering::AcqRel) >= CONTROL_CONNECTIONS_MAX {
            ctx.active.fetch_sub(1, Ordering::AcqRel);
            busy(&c);
            continue;
        }
        let slot = Slot(ctx.clone());
        // One thread per connection, at most CONTROL_CONNECTIONS_MAX of them: a long `copy`
        // must not block `status`.
        let spawned = std::thread::Builder::new()
            .name("tz-control-req".into())
            .spawn(move || {
                let ctx = slot.0.clone();
                let _ = handle(&ctx, &c);
                drop(slot);
            });
        if spawned.is_err() {
            // The closure (with its slot and connection) is gone; the client sees a hang-up.
            continue;
        }
    }
}

/// Tell a client over the connection limit to come back later; never blocks for long.
fn busy(c: &UnixStream) {
    let _ = c.set_write_timeout(Some(Duration::from_millis(100)));
    let f = Frame::Busy(format!(
        "busy: {CONTROL_CONNECTIONS_MAX} control connections in use"
    ));
    let _ = write_frame(&mut &*c, &f);
}

fn write_frame(w: &mut dyn Write, f: &Frame) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(f).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// Read one request and run it.
fn handle(ctx: &Ctx, c: &UnixStream) -> std::io::Result<()> {
    c.set_read_timeout(Some(CONTROL_READ_TIMEOUT))?;
    c.set_write_timeout(Some(STREAM_TIMEOUT))?;
    let mut reader = BufReader::new(c);
    let mut line = String::new();
    (&mut reader).take(REQUEST_BYTES_MAX).read_line(&mut line)?;
    c.set_read_timeout(Some(STREAM_TIMEOUT))?;
    let reply = match parse_request(&line) {
        Err(why) => Frame::failed(why),
        Ok(Request::Shutdown) => {
            ctx.stop.store(true, Ordering::Release);
            // Wake the accept loop so it sees the stop flag.
            let _ = UnixStream::connect(&ctx.path);
            Frame::Done("shutting down\n".into())
        }
        Ok(Request::Run(cmd)) => run(ctx, c, reader, &cmd),
    };
    write_frame(&mut &*c, &reply)
}

fn parse_request(line: &str) -> std::result::Result<Request, String> {
    #[derive(serde::Deserialize)]
    struct Version {
        v: Option<u32>,
    }
    let v = serde_json::from_str::<Version>(line)
        .map_err(|e| format!("bad control request: {e}"))?
        .v;
    if v != Some(PROTOCOL_VERSION) {
        return Err(format!(
            "control protocol version {} is not spoken here (this server speaks {PROTOCOL_VERSION}); \
             use the same timezero build as the server",
            v.map_or_else(|| "1".to_string(), |v| v.to_string())
        ));
    }
    serde_json::from_str::<Envelope>(line)
        .map(|e| e.req)
        .map_err(|e| format!("bad control request: {e}"))
}

fn run(ctx: &Ctx, c: &UnixStream, reader: BufReader<&UnixStream>, cmd: &Remote) -> Frame {
    if let Some(p) = cmd.paths().into_iter().find(|p| !p.is_absolute()) {
        return Frame::failed(format!(
            "relative path {} sent to the server of {}: a forwarded command must name absolute \
             paths",
            p.display(),
            ctx.table
        ));
    }
    let mut ch = ServerChannel {
        ctx,
        stream: c,
        reader,
        gone: false,
    };
    match execute(&ctx.engine, cmd, &mut ch) {
        Ok(o) => Frame::Done(o),
        Err(e) => Frame::Failed {
            interrupted: matches!(e, Error::Interrupted(_)),
            typed: WireError::of(&e),
            error: e.to_string(),
        },
    }
}

/// The serving side of a command's [`Channel`]: frames on the connection.
struct ServerChannel<'a> {
    ctx: &'a Ctx,
    stream: &'a UnixStream,
    reader: BufReader<&'a UnixStream>,
    /// The client hung up, asked to stop, or cannot be written to.
    gone: bool,
}

impl ServerChannel<'_> {
    fn frame(&mut self, f: &Frame) -> Result<()> {
        write_frame(&mut &*self.stream, f).map_err(|e| {
            self.gone = true;
            Error::io("write", self.ctx.path.display().to_string(), 0, e)
        })
    }

    /// True when the client has sent something (a stop request) or hung up; never blocks
    /// for more than a millisecond.
    fn client_stopped(&mut self) -> bool {
        if self.gone || !self.reader.buffer().is_empty() {
            return true;
        }
        if self
            .stream
            .set_read_timeout(Some(Duration::from_millis(1)))
            .is_err()
        {
            return false;
        }
        let r = match self.reader.fill_buf() {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ),
        };
        let _ = self.stream.set_read_timeout(Some(STREAM_TIMEOUT));
        self.gone = r;
        r
    }
}

impl Channel for ServerChannel<'_> {
    fn input(&mut self) -> Result<&mut dyn Read> {
        self.frame(&Frame::Send)?;
        Ok(&mut self.reader)
    }

    fn output(&mut self, bytes: &[u8]) -> Result<()> {
        for chunk in bytes.chunks(usize::try_from(DATA_FRAME_BYTES_MAX).unwrap_or(1 << 22)) {
            self.frame(&Frame::Data(chunk.len() as u64))?;
            (&mut &*self.stream).write_all(chunk).map_err(|e| {
                self.gone = true;
                Error::io("write", self.ctx.path.display().to_string(), 0, e)
            })?;
        }
        Ok(())
    }

    fn progress(&mut self, line: &str) {
        let _ = self.frame(&Frame::Progress(line.to_string()));
    }

    fn progress_interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn interrupted(&mut self) -> Option<Error> {
        if self.ctx.stop.load(Ordering::Acquire) {
            return Some(Error::Remote(format!(
                "the server of {} stopped; run copy again to resume",
                self.ctx.table
            )));
        }
        self.client_stopped()
            .then(|| Error::Interrupted("run copy again to resume".into()))
    }

    fn copies(&self) -> Option<CopyRegistry> {
        Some(self.ctx.copies.clone())
    }
}

/// Connect to a control socket.
///
/// # Errors
/// I/O errors reaching the socket.
pub fn connect(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| Error::io("connect", path.display().to_string(), 0, e))
}

fn send_request(c: &UnixStream, path: &Path, req: Request) -> Result<()> {
    let body = serde_json::to_string(&Envelope {
        v: PROTOCOL_VERSION,
        req,
    })
    .map_err(|e| Error::invalid("control request", e.to_string()))?;
    (&mut &*c)
        .write_all(format!("{body}\n").as_bytes())
        .map_err(|e| Error::io("write", path.display().to_string(), 0, e))
}

fn read_frame(r: &mut BufReader<&UnixStream>, path: &Path) -> Result<Frame> {
    let shown = path.display().to_string();
    let mut line = String::new();
    let n = r
        .take(FRAME_BYTES_MAX)
        .read_line(&mut line)
        .map_err(|e| Error::io("read", &shown, 0, e))?;
    if n == 0 {
        return Err(Error::Remote(format!(
            "the server behind {shown} hung up before answering"
        )));
    }
    serde_json::from_str(&line)
        .map_err(|e| Error::invalid("control reply", format!("from {shown}: {e}")))
}

/// Run `cmd` in the process serving the table through the control socket at `path`: its
/// progress, data and output reach `ch` as if it ran here. `first` is a connection already
/// made (else one is made). When `interrupt` becomes true the server is asked to stop the
/// command.
///
/// # Errors
/// I/O errors reaching the socket, a busy server that stays busy, and the command's own
/// errors: the same variant as the command gives when run here for the errors a caller matches
/// on (unknown or inactive sessions, overlaps, suspended sessions, ...), [`Error::Interrupted`]
/// when it was stopped on request, else [`Error::Remote`] with the server's message.
pub fn request(
    path: &Path,
    first: Option<UnixStream>,
    cmd: &Remote,
    ch: &mut dyn Channel,
    interrupt: Option<&AtomicBool>,
) -> Result<String> {
    let len = match cmd {
        Remote::Write { len, .. } => *len,
        _ => 0,
    };
    let deadline = Instant::now() + CONTROL_BUSY_RETRY;
    let mut first = first;
    loop {
        let c = match first.take() {
            Some(c) => c,
            None => connect(path)?,
        };
        let answer = match send_request(&c, path, Request::Run(cmd.clone())) {
            Ok(()) => converse(&c, path, len, ch, interrupt)?,
            // A busy server may answer and hang up before reading the request.
            Err(e) => match read_frame(&mut BufReader::new(&c), path) {
                Ok(Frame::Busy(_)) => None,
                _ => return Err(e),
            },
        };
        match answer {
            Some(r) => return r,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            None => {
                return Err(Error::Remote(format!(
                    "the server behind {} stayed busy for {}s",
                    path.display(),
                    CONTROL_BUSY_RETRY.as_secs()
                )))
            }
        }
    }
}

/// Read frames to the final one; `None` for a busy server.
fn converse(
    c: &UnixStream,
    path: &Path,
    len: u64,
    ch: &mut dyn Channel,
    interrupt: Option<&AtomicBool>,
) -> Result<Option<Result<String>>> {
    let shown = path.display().to_string();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        if let Some(flag) = interrupt {
            let done = &done;
            s.spawn(move || {
                while !done.load(Ordering::Acquire) {
                    if flag.load(Ordering::Acquire) {
                        let _ = (&mut &*c).write_all(b"stop\n");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        let r = frames(c, path, &shown, len, ch);
        done.store(true, Ordering::Release);
        r
    })
}

fn frames(
    c: &UnixStream,
    path: &Path,
    shown: &str,
    len: u64,
    ch: &mut dyn Channel,
) -> Result<Option<Result<String>>> {
    let mut r = BufReader::new(c);
    loop {
        match read_frame(&mut r, path)? {
            Frame::Busy(_) => return Ok(None),
            Frame::Send => {
                let input = ch.input()?;
                let n = match std::io::copy(&mut input.take(len), &mut &*c) {
                    Ok(n) => n,
                    // The server stopped reading: its reason comes next.
                    Err(e) => match read_frame(&mut r, path) {
                        Ok(Frame::Failed { error, typed, .. }) => {
                            return Ok(Some(Err(remote_error(error, typed))))
                        }
                        _ => return Err(Error::io("send", shown, 0, e)),
                    },
                };
                if n < len {
                    return Err(Error::invalid(
                        "write",
                        format!("input ended after {n} of {len} bytes"),
                    ));
                }
            }
            Frame::Progress(p) => ch.progress(&p),
            Frame::Data(n) if n > DATA_FRAME_BYTES_MAX => {
                return Err(Error::invalid(
                    "control reply",
                    format!("from {shown}: data frame of {n} bytes"),
                ))
            }
            Frame::Data(n) => {
                let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
                r.read_exact(&mut buf)
                    .map_err(|e| Error::io("read", shown, 0, e))?;
                ch.output(&buf)?;
            }
            Frame::Done(o) => return Ok(Some(Ok(o))),
            Frame::Failed { interrupted, .. } if interrupted => {
                return Ok(Some(Err(Error::Interrupted(
                    "run copy again to resume".into(),
                ))))
            }
            Frame::Failed { error, typed, .. } => return Ok(Some(Err(remote_error(error, typed)))),
        }
    }
}

/// Ask the serving process to stop.
///
/// # Errors
/// I/O errors reaching the socket.
pub fn shutdown(path: &Path) -> Result<()> {
    let deadline = Instant::now() + CONTROL_BUSY_RETRY;
    loop {
        let c = connect(path)?;
        let sent = send_request(&c, path, Request::Shutdown);
        match read_frame(&mut BufReader::new(&c), path) {
            Err(_) if sent.is_err() => return sent,
            r => match r? {
                Frame::Failed { error, typed, .. } => return Err(remote_error(error, typed)),
                Frame::Busy(why) if Instant::now() >= deadline => return Err(Error::Remote(why)),
                Frame::Busy(_) => std::thread::sleep(Duration::from_millis(200)),
                _ => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;
    use crate::command::CopyRegistry;
    use crate::engine::{EngineOptions, SessionSpec};
    use crate::volume::{FileVolume, FileVolumeOptions};

    /// A channel with no input that keeps what it is given.
    struct Quiet;

    impl Channel for Quiet {
        fn input(&mut self) -> Result<&mut dyn Read> {
            Err(Error::invalid("input", "none in this test"))
        }
        fn output(&mut self, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn progress(&mut self, _: &str) {}
        fn progress_interval(&self) -> Duration {
            Duration::from_secs(3600)
        }
        fn interrupted(&mut self) -> Option<Error> {
            None
        }
        fn copies(&self) -> Option<CopyRegistry> {
            None
        }
    }

    /// A command forwarded to the serving process fails with the variant it fails with here
    /// (state and reason typed), and one without a typed form keeps its message.
    #[test]
    fn forwarded_errors_keep_their_variant() {
        let d = tempfile::tempdir().unwrap();
        let table = d.path().join("t.tzt");
        let e = Arc::new(Engine::create_path(&table, EngineOptions::default()).unwrap());
        let vol = |n: &str| {
            let p = d.path().join(n);
            FileVolume::create(&p, 1 << 20, &FileVolumeOptions::default()).unwrap();
            e.attach_path(&p).unwrap()
        };
        let (a, b, c) = (vol("a"), vol("b"), vol("c"));
        let id = e.establish(&SessionSpec::whole(a, b)).unwrap();
        e.withdraw(id).unwrap();
        e.establish(&SessionSpec::whole(a, c)).unwrap();
        let sock = d.path().join("t.ctl");
        let _server = ControlServer::start(e.clone(), &sock, &table).unwrap();
        let run = |cmd: Remote| request(&sock, None, &cmd, &mut Quiet, None).unwrap_err();

        let err = run(Remote::Withdraw {
            session: id.0,
            json: false,
        });
        assert!(
            matches!(err, Error::NotActive { id: i, state: SessionState::Withdrawn } if i == id),
            "{err:?}"
        );
        let err = run(Remote::Withdraw {
            session: 99,
            json: false,
        });
        assert!(
            matches!(err, Error::UnknownSession(SessionId(99))),
            "{err:?}"
        );
        // Establishing onto a volume used as a source: `Overlap`, typed, naming the volume.
        let err = run(Remote::Establish {
            source: d.path().join("c"),
            target: d.path().join("a"),
            extents: Vec::new(),
            grain: 65536,
            nocopy: false,
            incremental: false,
            force: true,
            json: false,
        });
        let local = e
            .establish(&SessionSpec::whole(c, a))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.to_string(), local.to_string());
        assert_eq!(
            std::mem::discriminant(&err),
            std::mem::discriminant(&local),
            "{err:?} vs {local:?}"
        );
    }
}
