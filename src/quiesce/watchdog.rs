//! The thaw watchdog (QUI-07): a process of its own that undoes a quiesce when the process
//! that made it is gone.
//!
//! The job runner starts it (`timezero quiesce-watchdog`, hidden) before its first freeze or
//! quiesce command and tells it, one JSON line per [`WatchdogMessage`] on its stdin, what is
//! about to be held: a frozen mount (the watchdog opens the mount at once and keeps the
//! descriptor, so it thaws that file system even if the path is later mounted over) or a held
//! command quiesce (the `unquiesce_cmd` and what it is told). The runner sends `release` once
//! it has undone the hold itself. When the stdin pipe closes (the runner ended or died: the
//! kernel closes its end either way) or a hold's deadline passes, the watchdog undoes what is
//! still held: `FITHAW` on the held descriptor, or `unquiesce_cmd` run once; then it records
//! the undo in the store (the lease dropped, the `QuiesceCommand` intent resolved), so that
//! `reconcile` does not undo it a second time.
//!
//! A hold is announced before the freeze or the quiesce command starts. A runner that dies
//! after announcing and before acting leaves a hold whose undo finds nothing to undo (`FITHAW`
//! of a thawed file system is refused with `EINVAL`, which counts as thawed); an
//! `unquiesce_cmd` must bear running without its quiesce, as it must bear being repeated.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use crossbeam::channel;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::backend::BackendError;
use super::fsfreeze::{open_mount, thaw_fd};
use crate::clock::Clock;
use crate::hook::{self, HookContext, HookOutcome, HookSpec, Stage, Timeout};
use crate::store::{BackupDay, Change, IntentId, IntentOutcome, JobId, LeaseId, Store};

/// The line the watchdog prints on its stdout once it is ready to take holds.
pub const WATCHDOG_READY: &str = "ready";

/// One line from the runner to the watchdog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WatchdogMessage {
    /// The runner is about to freeze `mount` under `lease`.
    Freeze {
        /// The lease (its row is committed already, QUI-06).
        lease: LeaseId,
        /// The mount point.
        mount: PathBuf,
        /// The file system's device, as the runner found it.
        st_dev: u64,
        /// When the watchdog thaws it even while the runner lives (milliseconds since the
        /// epoch).
        deadline_ms: i64,
    },
    /// The runner is about to run a `quiesce_cmd`; `unquiesce_cmd` undoes it.
    Command {
        /// The open `QuiesceCommand` intent of the hold.
        intent: IntentId,
        /// `unquiesce_cmd`'s argv.
        argv: Vec<String>,
        /// Whether `argv[0]` is a shell script.
        shell: bool,
        /// `unquiesce_cmd`'s timeout in seconds.
        timeout_secs: u64,
        /// `unquiesce_cmd`'s kill grace in seconds.
        kill_grace_secs: u64,
        /// The job.
        job: JobId,
        /// Its attempt.
        attempt: u32,
        /// The plan.
        plan: Option<String>,
        /// The task.
        task: Option<u32>,
        /// The backup day.
        backup_day: Option<BackupDay>,
        /// When the watchdog undoes it even while the runner lives.
        deadline_ms: i64,
    },
    /// The runner undid the hold named (a lease `l3` or an intent `n5`) itself.
    Release {
        /// [`WatchdogMessage::key`] of the hold.
        key: String,
    },
}

impl WatchdogMessage {
    /// The name of the hold a message is about: the lease's or the intent's id.
    #[must_use]
    pub fn key(&self) -> String {
        match self {
            WatchdogMessage::Freeze { lease, .. } => lease.to_string(),
            WatchdogMessage::Command { intent, .. } => intent.to_string(),
            WatchdogMessage::Release { key } => key.clone(),
        }
    }
}

/// Why the watchdog could not be started or told something.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// Starting the process, or writing to it, failed.
    #[error("quiesce watchdog: {what}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The process did not say it was ready.
    #[error("quiesce watchdog: it did not start ({0})")]
    NotReady(String),
}

/// What a hold needs for its undo.
#[derive(Debug)]
enum Undo {
    Thaw {
        lease: LeaseId,
        mount: PathBuf,
        /// The mount's descriptor, or why there is none.
        fd: Result<OwnedFd, String>,
    },
    Unquiesce {
        intent: IntentId,
        spec: HookSpec,
        ctx: HookContext,
    },
}

#[derive(Debug)]
struct Hold {
    deadline: Timestamp,
    undo: Undo,
}

fn at_ms(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX)
}

fn hold_of(msg: WatchdogMessage) -> Option<(String, Hold)> {
    let key = msg.key();
    match msg {
        WatchdogMessage::Freeze {
            lease,
            mount,
            st_dev,
            deadline_ms,
        } => {
            let fd = open_mount(&mount)
                .map_err(|e| e.to_string())
                .and_then(|fd| match rustix::fs::fstat(&fd) {
                    Ok(st) if st.st_dev == st_dev => Ok(fd),
                    Ok(st) => Err(format!(
                        "{} is on device {} now, the lease names {st_dev}",
                        mount.display(),
                        st.st_dev
                    )),
                    Err(e) => Err(format!("fstat {}: {e}", mount.display())),
                });
            Some((
                key,
                Hold {
                    deadline: at_ms(deadline_ms),
                    undo: Undo::Thaw { lease, mount, fd },
                },
            ))
        }
        WatchdogMessage::Command {
            intent,
            argv,
            shell,
            timeout_secs,
            kill_grace_secs,
            job,
            attempt,
            plan,
            task,
            backup_day,
            deadline_ms,
        } => {
            let mut spec = HookSpec::new(argv).ok()?;
            spec.shell = shell;
            spec.timeout = Timeout::from_secs(timeout_secs);
            spec.kill_grace = Timeout::from_secs(kill_grace_secs);
            let mut ctx = HookContext::new(Stage::Unquiesce);
            ctx.job = Some(job);
            ctx.attempt = Some(attempt);
            ctx.plan = plan;
            ctx.task = task;
            ctx.backup_day = backup_day;
            Some((
                key,
                Hold {
                    deadline: at_ms(deadline_ms),
                    undo: Undo::Unquiesce { intent, spec, ctx },
                },
            ))
        }
        WatchdogMessage::Release { .. } => None,
    }
}

/// Undo one hold and record it in `store`; returns the line saying what was done.
fn undo(key: &str, hold: Hold, why: &str, store: Option<&dyn Store>, clock: &dyn Clock) -> String {
    match hold.undo {
        Undo::Thaw { lease, mount, fd } => {
            let thawed = match &fd {
                Ok(fd) => match thaw_fd(fd, &mount) {
                    Ok(()) => Ok("thawed".to_string()),
                    // EINVAL: the file system is not frozen (the freeze never happened or
                    // was undone already).
                    Err(BackendError::Io { source, .. })
                        if source.raw_os_error()
                            == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                    {
                        Ok("not frozen".to_string())
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.clone()),
            };
            let dropped = match (&thawed, store) {
                (Ok(_), Some(s)) => match s.commit(vec![Change::DropLease(lease)]) {
                    Ok(()) => ", lease dropped".to_string(),
                    Err(e) => format!(", lease kept: {e}"),
                },
                _ => String::new(),
            };
            format!(
                "{key}: {why}: {} {}{dropped}",
                match &thawed {
                    Ok(w) => w.clone(),
                    Err(e) => format!("thaw failed ({e}):"),
                },
                mount.display()
            )
        }
        Undo::Unquiesce { intent, spec, ctx } => {
            let run = hook::run(&spec, &ctx, clock);
            let outcome = match &run.outcome {
                HookOutcome::Failed(e) => IntentOutcome::Failed(e.to_string()),
                _ => IntentOutcome::Done,
            };
            let said = match &run.outcome {
                HookOutcome::Failed(e) => e.to_string(),
                _ => format!("exit {}", run.exit_code.unwrap_or(0)),
            };
            let resolved = match store {
                Some(s) => match s.commit(vec![Change::Resolve {
                    intent,
                    outcome,
                    at: clock.now(),
                }]) {
                    Ok(()) => ", intent resolved".to_string(),
                    Err(e) => format!(", intent not resolved: {e}"),
                },
                None => String::new(),
            };
            format!("{key}: {why}: unquiesce_cmd run, {said}{resolved}")
        }
    }
}

/// The watchdog's loop: read [`WatchdogMessage`] lines from `input` until it closes, undo each
/// hold whose deadline passes on `clock`, and at the close undo every hold left, newest first.
/// Each undo is recorded in `store` (when given) and described by one line on `log`. Returns
/// the number of holds undone.
pub fn serve(
    input: impl Read + Send + 'static,
    store: Option<Arc<dyn Store>>,
    clock: &Arc<dyn Clock>,
    log: &mut dyn Write,
) -> usize {
    let (tx, rx) = channel::unbounded::<Result<WatchdogMessage, String>>();
    let reader = std::thread::Builder::new()
        .name("watchdog-input".to_string())
        .spawn(move || {
            for line in BufReader::new(input).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let msg = serde_json::from_str(&line).map_err(|e| format!("{line}: {e}"));
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
    if let Err(e) = reader {
        let _ = writeln!(log, "watchdog: cannot read its input: {e}");
        return 0;
    }
    // Holds in the order they were announced.
    let mut holds: Vec<(String, Hold)> = Vec::new();
    let mut undone = 0;
    let store = store.as_deref();
    loop {
        let next = holds.iter().map(|(_, h)| h.deadline).min();
        let timer = match next {
            Some(d) => clock.after(d),
            None => channel::never(),
        };
        channel::select! {
            recv(rx) -> m => match m {
                Ok(Ok(WatchdogMessage::Release { key })) => {
                    holds.retain(|(k, _)| *k != key);
                }
                Ok(Ok(msg)) => {
                    if let Some((key, hold)) = hold_of(msg) {
                        holds.retain(|(k, _)| *k != key);
                        holds.push((key, hold));
                    }
                }
                Ok(Err(bad)) => {
                    let _ = writeln!(log, "watchdog: ignored a line that does not parse: {bad}");
                }
                Err(_) => {
                    // The runner's end of the pipe is closed: it ended or died.
                    while let Some((key, hold)) = holds.pop() {
                        let line = undo(&key, hold, "its runner is gone", store, &**clock);
                        let _ = writeln!(log, "watchdog {line}");
                        undone += 1;
                    }
                    return undone;
                }
            },
            recv(timer) -> _ => {
                let now = clock.now();
                let (due, keep): (Vec<_>, Vec<_>) =
                    holds.drain(..).partition(|(_, h)| h.deadline <= now);
                holds = keep;
                for (key, hold) in due.into_iter().rev() {
                    let line = undo(&key, hold, "its deadline passed", store, &**clock);
                    let _ = writeln!(log, "watchdog {line}");
                    undone += 1;
                }
            },
        }
    }
}

/// The runner's end of a watchdog process: started by [`Watchdog::spawn`], told of holds by
/// [`Watchdog::send`]; dropping it closes the pipe (the watchdog then undoes what is still held
/// and exits) and waits for the process.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
    holds: HashSet<String>,
}

impl Watchdog {
    /// Start `command` (a `timezero quiesce-watchdog` command line) in a process group of its
    /// own (a terminal's Ctrl-C or hang-up for the runner's group does not reach it), with
    /// piped stdin and stdout, and wait for its ready line.
    ///
    /// # Errors
    /// [`WatchdogError`] when it cannot be started or does not say it is ready.
    pub fn spawn(mut command: Command) -> Result<Watchdog, WatchdogError> {
        use std::os::unix::process::CommandExt;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0);
        let mut child = command.spawn().map_err(|source| WatchdogError::Io {
            what: "start",
            source,
        })?;
        let stdin = child.stdin.take();
        let ready = child.stdout.take().map(read_ready);
        match ready {
            Some(Ok(())) => Ok(Watchdog {
                child,
                stdin,
                holds: HashSet::new(),
            }),
            other => {
                drop(stdin);
                let _ = child.kill();
                let _ = child.wait();
                Err(WatchdogError::NotReady(match other {
                    Some(Err(e)) => e,
                    _ => "no stdout".to_string(),
                }))
            }
        }
    }

    /// The watchdog's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tell the watchdog one message (one line, flushed).
    ///
    /// # Errors
    /// [`WatchdogError::Io`] when the pipe is broken (the watchdog died).
    pub fn send(&mut self, msg: &WatchdogMessage) -> Result<(), WatchdogError> {
        let mut line = serde_json::to_string(msg).map_err(|e| WatchdogError::Io {
            what: "encode a message",
            source: io::Error::other(e),
        })?;
        line.push('\n');
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(WatchdogError::Io {
                what: "write",
                source: io::Error::from(io::ErrorKind::BrokenPipe),
            });
        };
        stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|source| WatchdogError::Io {
                what: "write",
                source,
            })?;
        match msg {
            WatchdogMessage::Release { key } => {
                self.holds.remove(key);
            }
            m => {
                self.holds.insert(m.key());
            }
        }
        Ok(())
    }

    /// Whether a hold is announced and not released.
    #[must_use]
    pub fn holds(&self, key: &str) -> bool {
        self.holds.contains(key)
    }
}

fn read_ready(stdout: ChildStdout) -> Result<(), String> {
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() == WATCHDOG_READY {
        Ok(())
    } else {
        Err(format!("it said {:?}", line.trim()))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Closing the pipe is the "runner ended" message; the watchdog undoes what is left.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use jiff::SignedDuration;

    use super::*;
    use crate::clock::ManualClock;

    /// A held command quiesce of task `intent` whose `unquiesce_cmd` logs `release TASK`.
    fn command(log: &std::path::Path, intent: u64, deadline: Timestamp) -> WatchdogMessage {
        WatchdogMessage::Command {
            intent: IntentId(intent),
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("echo release $TIMEZERO_TASK >> {}", log.display()),
            ],
            shell: false,
            timeout_secs: 60,
            kill_grace_secs: 5,
            job: JobId(1),
            attempt: 1,
            plan: Some("db".into()),
            task: Some(u32::try_from(intent).unwrap()),
            backup_day: None,
            deadline_ms: deadline.as_millisecond(),
        }
    }

    fn start() -> Timestamp {
        "2026-12-01T20:00:00Z".parse().unwrap()
    }

    #[test]
    fn qui_07_a_held_command_is_undone_once_when_the_pipe_closes_and_not_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(start()));
        let far = Timestamp::from_second(4_000_000_000).unwrap();
        let mut lines = String::new();
        for m in [
            command(&log, 1, far),
            command(&log, 2, far),
            WatchdogMessage::Release { key: "n2".into() },
        ] {
            lines += &serde_json::to_string(&m).unwrap();
            lines.push('\n');
        }
        let mut out = Vec::new();
        let n = serve(io::Cursor::new(lines.into_bytes()), None, &clock, &mut out);
        assert_eq!(n, 1, "{}", String::from_utf8_lossy(&out));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "release 1\n");
    }

    #[test]
    fn qui_07_a_hold_is_undone_when_its_deadline_passes_while_the_pipe_stays_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let manual = Arc::new(ManualClock::new(start()));
        let clock: Arc<dyn Clock> = Arc::clone(&manual) as Arc<dyn Clock>;
        let (reader, mut writer) = io::pipe().unwrap();
        let deadline = start().checked_add(SignedDuration::from_secs(60)).unwrap();
        let line = serde_json::to_string(&command(&log, 1, deadline)).unwrap();
        writeln!(writer, "{line}").unwrap();
        let served = {
            let clock = Arc::clone(&clock);
            std::thread::spawn(move || {
                let mut out = Vec::new();
                let n = serve(reader, None, &clock, &mut out);
                (n, String::from_utf8_lossy(&out).into_owned())
            })
        };
        manual.advance(SignedDuration::from_secs(61));
        // The runner still lives (its pipe is open): the deadline alone undoes the hold.
        let begun = Instant::now();
        while std::fs::read_to_string(&log).unwrap_or_default() != "release 1\n" {
            assert!(
                begun.elapsed() < Duration::from_secs(30),
                "no release at the deadline"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(writer);
        let (n, out) = served.join().unwrap();
        assert_eq!(n, 1, "undone once, not again when the pipe closed: {out}");
        assert!(out.contains("its deadline passed"), "{out}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "release 1\n");
    }
}
