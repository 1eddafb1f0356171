//! `STATE/daemon.ctl`: the request socket of a running `timezero daemon`, and its clients
//! (`daemon stop`, `plan run` handing its job to the daemon).
//!
//! Protocol: the client sends one JSON line `{"v":1,"req":"run-plan",...}` and reads one JSON
//! line back, `{"ok":true,"job":"j42","message":"..."}` (or `"ok":false` with the reason in
//! `message`); then both hang up. Requests:
//! - `stop`: stop the daemon (as SIGTERM); answered at once, the daemon stops after.
//! - `wake`: read the calendar again now (after schedules or events were changed).
//! - `run-plan {plan, path, priority}`: post an immediate run of the plan (CAL-03) and answer
//!   with its job id; `path` is the plan's file when it is not `STATE/plans/PLAN.toml`.
//! - `restore {image, to}`: start a restore job of the catalog image `image` to `to`; the job
//!   is `Active` (phase awaiting resources) when the answer comes (JOB-10).
//! - `set-clock {to}`: only for a daemon started on a manual clock (see `daemon.rs`): move it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Sender;
use serde::{Deserialize, Serialize};

use super::state::StateDir;
use super::Fail;
use crate::limits::{
    DAEMON_ANSWER_POLL_MS, DAEMON_ANSWER_WAIT_MS, DAEMON_CTL_REQUEST_BYTES_MAX,
    DAEMON_CTL_TIMEOUT_SECS,
};

/// The version of the protocol this build speaks.
pub(super) const CTL_VERSION: u32 = 1;
/// The request socket's file name in the state directory.
pub(super) const CTL_FILE: &str = "daemon.ctl";

/// `STATE/daemon.ctl`.
pub(super) fn ctl_path(state: &StateDir) -> PathBuf {
    state.dir.join(CTL_FILE)
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "req", rename_all = "kebab-case")]
pub(super) enum CtlRequest {
    /// Stop the daemon.
    Stop,
    /// Read the calendar again.
    Wake,
    /// Run a plan now.
    RunPlan {
        /// The plan's name.
        plan: String,
        /// Its file, when not `STATE/plans/PLAN.toml`.
        path: Option<PathBuf>,
        /// Its priority (0 unless given).
        priority: Option<i64>,
    },
    /// Restore a catalog image.
    Restore {
        /// The image number (`i7` is 7).
        image: u64,
        /// The destination.
        to: PathBuf,
    },
    /// Move a manual clock to this instant (RFC 3339).
    SetClock {
        /// The instant.
        to: String,
    },
}

/// The request line: the protocol version and the request.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    req: CtlRequest,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CtlReply {
    /// Whether the request was done.
    pub ok: bool,
    /// The job it created, if any (`j42`).
    pub job: Option<String>,
    /// What was done, or why not.
    pub message: String,
}

impl CtlReply {
    /// A request done.
    pub fn done(message: impl Into<String>) -> CtlReply {
        CtlReply {
            ok: true,
            job: None,
            message: message.into(),
        }
    }

    /// A request refused.
    pub fn refused(message: impl Into<String>) -> CtlReply {
        CtlReply {
            ok: false,
            job: None,
            message: message.into(),
        }
    }
}

/// What the listener hands to the daemon's loop.
#[derive(Debug)]
pub(super) enum Msg {
    /// A request and where to send its answer.
    Request(CtlRequest, Sender<CtlReply>),
    /// Stop (a signal, or the `stop` request).
    Stop,
    /// Something may have become due (a job's work ended).
    Wake,
    /// The engine holding `table` handled a storage reset notification (through the table's
    /// control socket); `decisions` are what it decided for the sessions using the volume.
    Reset {
        /// The table.
        table: PathBuf,
        /// The reset's decisions.
        decisions: Vec<crate::Decision>,
    },
}

/// Send `req` to the daemon of `state` and read its answer. `Ok(None)` when no daemon listens.
pub(super) fn request(state: &StateDir, req: &CtlRequest) -> Result<Option<CtlReply>, Fail> {
    let path = ctl_path(state);
    let c = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Fail::Message(format!("connect {}: {e}", path.display()))),
    };
    let io =
        |what: &str, e: std::io::Error| Fail::Message(format!("{what} {}: {e}", path.display()));
    let timeout = Some(Duration::from_secs(DAEMON_CTL_TIMEOUT_SECS));
    c.set_read_timeout(timeout)
        .map_err(|e| io("set timeout on", e))?;
    c.set_write_timeout(timeout)
        .map_err(|e| io("set timeout on", e))?;
    let mut line = serde_json::to_string(&Envelope {
        v: CTL_VERSION,
        req: req.clone(),
    })
    .map_err(|e| Fail::Message(format!("encode request: {e}")))?;
    line.push('\n');
    (&c).write_all(line.as_bytes())
        .map_err(|e| io("write to", e))?;
    let mut answer = String::new();
    BufReader::new(&c)
        .take(DAEMON_CTL_REQUEST_BYTES_MAX)
        .read_line(&mut answer)
        .map_err(|e| io("read from", e))?;
    if answer.is_empty() {
        return Err(Fail::Message(format!(
            "the daemon behind {} hung up without answering",
            path.display()
        )));
    }
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| Fail::Message(format!("answer from {}: {e}", path.display())))
}

/// [`request`] to a daemon that holds the state's lock: while its socket does not answer yet
/// (the daemon is starting: it takes the lock before it listens), say so once on stderr and try
/// again every [`DAEMON_ANSWER_POLL_MS`] for up to [`DAEMON_ANSWER_WAIT_MS`]. `Ok(None)` when the
/// lock was let go meanwhile or the time ran out.
pub(super) fn request_when_up(
    state: &StateDir,
    req: &CtlRequest,
) -> Result<Option<CtlReply>, Fail> {
    let deadline = Instant::now() + Duration::from_millis(DAEMON_ANSWER_WAIT_MS);
    let mut told = false;
    loop {
        if let Some(reply) = request(state, req)? {
            return Ok(Some(reply));
        }
        if state.hold_runner_lock()?.is_ok() || Instant::now() >= deadline {
            return Ok(None);
        }
        if !told {
            eprintln!(
                "waiting for the daemon that holds {} to answer on {}",
                state.dir.display(),
                ctl_path(state).display()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(DAEMON_ANSWER_POLL_MS));
    }
}

/// The listening socket; stops listening and removes its file when dropped.
#[derive(Debug)]
pub(super) struct CtlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CtlServer {
    /// Listen at `path` (a stale socket file is replaced: the caller holds the daemon lock);
    /// requests go to `to`. Once `stopping` is set, requests other than `stop` are refused.
    pub fn start(
        path: &Path,
        to: Sender<Msg>,
        stopping: Arc<AtomicBool>,
    ) -> Result<CtlServer, Fail> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .map_err(|e| Fail::Message(format!("bind {}: {e}", path.display())))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tz-daemon-ctl".into())
            .spawn(move || {
                for conn in l.incoming() {
                    if s2.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(c) = conn else { continue };
                    let to = to.clone();
                    let stopping = Arc::clone(&stopping);
                    // One thread per connection: a request waits for the loop, which may be
                    // busy for a while; `stop` must still get through.
                    let _ = std::thread::Builder::new()
                        .name("tz-daemon-req".into())
                        .spawn(move || serve_one(&c, &to, &stopping));
                }
            })
            .map_err(|e| Fail::Message(format!("spawn the request thread: {e}")))?;
        Ok(CtlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = UnixStream::connect(&self.path);
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_one(c: &UnixStream, to: &Sender<Msg>, stopping: &AtomicBool) {
    let timeout = Some(Duration::from_secs(DAEMON_CTL_TIMEOUT_SECS));
    let _ = c.set_read_timeout(timeout);
    let _ = c.set_write_timeout(timeout);
    let mut line = String::new();
    if BufReader::new(c)
        .take(DAEMON_CTL_REQUEST_BYTES_MAX)
        .read_line(&mut line)
        .is_err()
    {
        return;
    }
    let reply = match serde_json::from_str::<Envelope>(&line) {
        Err(e) => CtlReply::refused(format!("bad request: {e}")),
        Ok(env) if env.v != CTL_VERSION => CtlReply::refused(format!(
            "request of protocol version {}; this daemon speaks {CTL_VERSION}",
            env.v
        )),
        Ok(Envelope {
            req: CtlRequest::Stop,
            ..
        }) => {
            let _ = to.send(Msg::Stop);
            CtlReply::done("stopping")
        }
        Ok(_) if stopping.load(Ordering::Acquire) => CtlReply::refused("the daemon is stopping"),
        Ok(env) => {
            let (tx, rx) = crossbeam::channel::bounded(1);
            if to.send(Msg::Request(env.req, tx)).is_err() {
                CtlReply::refused("the daemon is stopping")
            } else {
                rx.recv_timeout(Duration::from_secs(DAEMON_CTL_TIMEOUT_SECS))
                    .unwrap_or_else(|_| CtlReply::refused("the daemon did not answer in time"))
            }
        }
    };
    if let Ok(mut text) = serde_json::to_string(&reply) {
        text.push('\n');
        let _ = (&mut &*c).write_all(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;

    #[test]
    fn requests_are_one_json_line_with_a_version() {
        let text = serde_json::to_string(&Envelope {
            v: CTL_VERSION,
            req: CtlRequest::RunPlan {
                plan: "db".into(),
                path: None,
                priority: Some(5),
            },
        })
        .unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"req":"run-plan","plan":"db","path":null,"priority":5}"#
        );
        let back: Envelope = serde_json::from_str(r#"{"v":1,"req":"stop"}"#).unwrap();
        assert_eq!(back.req, CtlRequest::Stop);
        assert!(serde_json::from_str::<Envelope>(r#"{"v":1,"req":"explode"}"#).is_err());
    }
}
