//! The control socket of a serving process: while `timezero serve` holds a table, other
//! `timezero` commands on that table send their request here (one JSON line) and get the text
//! they would have printed (one JSON line back).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{execute, Remote};
use crate::engine::Engine;
use crate::{Error, Result};

/// Longest request line accepted.
const REQUEST_BYTES_MAX: u64 = 64 * 1024;

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
struct Reply {
    output: Option<String>,
    error: Option<String>,
}

/// A listening control socket.
#[derive(Debug)]
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Listen at `path` (a stale socket file is replaced).
    ///
    /// # Errors
    /// I/O errors.
    pub fn start(engine: Arc<Engine>, path: &Path) -> Result<ControlServer> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .map_err(|e| Error::io("bind", path.display().to_string(), 0, e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tz-control".into())
            .spawn(move || {
                for conn in l.incoming() {
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(c) = conn else { continue };
                    let e = engine.clone();
                    let st2 = st.clone();
                    // One thread per request: a long `copy` must not block `status`.
                    let _ = std::thread::Builder::new()
                        .name("tz-control-req".into())
                        .spawn(move || {
                            let _ = handle(&e, c, &st2);
                        });
                }
            })
            .map_err(|e| Error::io("spawn", "control", 0, e))?;
        Ok(ControlServer {
            stop,
            path: path.to_path_buf(),
            thread: Some(thread),
        })
    }

    /// Block until a client asks the server to shut down.
    pub fn wait_shutdown(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn handle(e: &Arc<Engine>, c: UnixStream, stop: &AtomicBool) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = String::new();
    BufReader::new((&c).take(REQUEST_BYTES_MAX)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Run(cmd)) => match execute(e, &cmd, false) {
            Ok(o) => Reply {
                output: Some(o),
                error: None,
            },
            Err(er) => Reply {
                output: None,
                error: Some(er.to_string()),
            },
        },
        Ok(Request::Shutdown) => {
            stop.store(true, Ordering::Release);
            Reply {
                output: Some("shutting down\n".into()),
                error: None,
            }
        }
        Err(er) => Reply {
            output: None,
            error: Some(format!("bad control request: {er}")),
        },
    };
    let mut w = &c;
    w.write_all(serde_json::to_string(&reply).unwrap_or_default().as_bytes())?;
    w.write_all(b"\n")?;
    if stop.load(Ordering::Acquire) {
        // Wake the accept loop so it sees the stop flag.
        let _ = UnixStream::connect(c.local_addr()?.as_pathname().unwrap_or(Path::new("")));
    }
    Ok(())
}

fn send(path: &Path, req: &Request) -> Result<Reply> {
    let shown = path.display().to_string();
    let mut c = UnixStream::connect(path).map_err(|e| Error::io("connect", &shown, 0, e))?;
    let body =
        serde_json::to_string(req).map_err(|e| Error::invalid("control request", e.to_string()))?;
    c.write_all(body.as_bytes())
        .and_then(|()| c.write_all(b"\n"))
        .map_err(|e| Error::io("write", &shown, 0, e))?;
    let mut line = String::new();
    BufReader::new(&c)
        .read_line(&mut line)
        .map_err(|e| Error::io("read", &shown, 0, e))?;
    serde_json::from_str(&line).map_err(|e| Error::invalid("control reply", e.to_string()))
}

/// Run `cmd` in the process serving the table. The outer `Result` is the transport; the inner
/// one is the command's own outcome (its error text comes back as [`Error::Invalid`]).
///
/// # Errors
/// I/O errors reaching the socket.
pub fn request(path: &Path, cmd: &Remote) -> Result<Result<String>> {
    let r = send(path, &Request::Run(cmd.clone()))?;
    Ok(match (r.output, r.error) {
        (Some(o), None) => Ok(o),
        (_, Some(er)) => Err(Error::invalid("remote command", er)),
        (None, None) => Err(Error::invalid("remote command", "empty reply")),
    })
}

/// Ask the serving process to stop.
///
/// # Errors
/// I/O errors reaching the socket.
pub fn shutdown(path: &Path) -> Result<()> {
    send(path, &Request::Shutdown).map(|_| ())
}
