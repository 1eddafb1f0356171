//! Running one hook: a child process in its own process group, its deadline on the
//! [`Clock`], SIGTERM then SIGKILL to the whole group, and the result classified (HOOK-05..09).
//!
//! Processes left in the group when the leader exits normally are killed (SIGKILL) before the
//! run ends: a hook's background process could hold a quiesce or a target open, and nothing
//! would ever stop it. A hook that must leave a process running starts it outside its group
//! (`setsid`, `systemd-run`) and redirects its output (else the run still ends, but the
//! process's later output is lost).

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crossbeam::channel;
use jiff::{SignedDuration, Timestamp};
use rustix::process::{Pid, Signal};

use super::context::HookContext;
use super::group::{kill_group_and_wait, signal_group};
use super::output::{pump, OutputTail, Pipes};
use super::spec::{HookSpec, OnFailure, Timeout};
use crate::clock::Clock;

/// The exit code by which a hook asks for its task to be skipped, not failed (HOOK-05).
pub const EXIT_SKIP: u8 = 75;
/// The highest exit code reserved for timezero; 100..=255 are the user's (HOOK-05, \[001\]).
pub const EXIT_RESERVED_MAX: u8 = 99;

/// Why a hook did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    /// Exit code 1..=99 other than 75: reserved for timezero (\[001\]), so the task fails.
    #[error("hook exited with reserved code {0} (1-99 are reserved; use 100-255)")]
    ReservedExitCode(u8),
    /// Exit code 100..=255: the user's failure code, shown verbatim.
    #[error("hook exited with code {0}")]
    HookExit(u8),
    /// The hook ran past its timeout; its group got SIGTERM, and SIGKILL after the kill grace
    /// when it still ran.
    #[error("hook timed out after {timeout}{}", killed_message(*.killed))]
    TimedOut {
        /// The timeout.
        timeout: Timeout,
        /// Whether SIGKILL was needed (the group outlived the kill grace).
        killed: bool,
    },
    /// The hook was ended by a signal it was not sent by the runner.
    #[error("hook was killed by signal {0}")]
    Signal(i32),
    /// The program could not be started.
    #[error("cannot start hook program {program:?}: {source}")]
    Spawn {
        /// The program (`run[0]`, or `/bin/sh`).
        program: String,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// Setting up or ending the run failed (a pipe, a thread, waiting for the child).
    #[error("hook {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
}

fn killed_message(killed: bool) -> &'static str {
    if killed {
        " (SIGKILL after the kill grace)"
    } else {
        " (SIGTERM)"
    }
}

/// How a hook ended (HOOK-05).
#[derive(Debug, Clone)]
pub enum HookOutcome {
    /// Exit code 0.
    Success,
    /// Exit code 75: the task is `Skipped`, not `Failed`.
    Skip,
    /// Anything else.
    Failed(HookError),
}

/// What a hook's end means for its task, once `on_failure` is applied (HOOK-08).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (success, or a failure with `on_failure = "ignore"`).
    Ok,
    /// Go on, and the job ends with status 1 (a failure with `on_failure = "warn"`).
    Warn,
    /// The hook asked for the task to be skipped (exit 75, whatever `on_failure` says).
    Skip,
    /// The task (or the job, for plan hooks) fails.
    Fail,
}

impl HookOutcome {
    /// What this end means under `on_failure`.
    #[must_use]
    pub fn verdict(&self, on_failure: OnFailure) -> Verdict {
        match (self, on_failure) {
            (HookOutcome::Success, _) | (HookOutcome::Failed(_), OnFailure::Ignore) => Verdict::Ok,
            (HookOutcome::Skip, _) => Verdict::Skip,
            (HookOutcome::Failed(_), OnFailure::Warn) => Verdict::Warn,
            (HookOutcome::Failed(_), OnFailure::Fail) => Verdict::Fail,
        }
    }

    /// Whether the hook succeeded (exit 0).
    #[must_use]
    pub fn is_success(&self) -> bool {
        matches!(self, HookOutcome::Success)
    }
}

/// Classify a normal exit code (HOOK-05).
#[must_use]
pub fn classify_exit(code: u8) -> HookOutcome {
    match code {
        0 => HookOutcome::Success,
        EXIT_SKIP => HookOutcome::Skip,
        1..=EXIT_RESERVED_MAX => HookOutcome::Failed(HookError::ReservedExitCode(code)),
        _ => HookOutcome::Failed(HookError::HookExit(code)),
    }
}

/// The record of one hook run, as the job record keeps it.
#[derive(Debug, Clone)]
pub struct HookRun {
    /// How it ended.
    pub outcome: HookOutcome,
    /// When it started, on the run's clock.
    pub started: Timestamp,
    /// When it ended, on the run's clock.
    pub ended: Timestamp,
    /// The process group (the leader's pid); `None` when nothing was started.
    pub pgid: Option<u32>,
    /// The leader's exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended the leader, when one did.
    pub signal: Option<i32>,
    /// Processes of the group other than the leader that were still running when the leader
    /// had exited by itself, and were killed (0 after a timeout, when the whole group was
    /// signalled anyway).
    pub strays_killed: usize,
    /// The last `HOOK_OUTPUT_BYTES_MAX` bytes of stdout (HOOK-09).
    pub stdout: OutputTail,
    /// The last `HOOK_OUTPUT_BYTES_MAX` bytes of stderr (HOOK-09).
    pub stderr: OutputTail,
}

impl HookRun {
    fn not_started(started: Timestamp, ended: Timestamp, error: HookError) -> HookRun {
        HookRun {
            outcome: HookOutcome::Failed(error),
            started,
            ended,
            pgid: None,
            exit_code: None,
            signal: None,
            strays_killed: 0,
            stdout: OutputTail::default(),
            stderr: OutputTail::default(),
        }
    }
}

/// `t + d`, saturating at the end of time.
pub(crate) fn later(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// How many times [`spawn_retrying_busy`] tries a program that is busy being written.
const SPAWN_BUSY_ATTEMPTS: u32 = 50;

/// Spawn `cmd`, trying again for a short while when exec fails with `ETXTBSY`.
///
/// `ETXTBSY` means some process holds the program file open for writing. A process that
/// forks while another of its threads has just written a script holds that descriptor in
/// the child until the child's own exec closes it, so a hook written and started by a
/// multithreaded deployer (or test harness) can see this for a few microseconds even though
/// nothing writes the file any more. Retrying with a short pause (at most about 1.3 s in all)
/// makes that race harmless; a file that really stays open for writing still fails.
fn spawn_retrying_busy(cmd: &mut Command) -> io::Result<std::process::Child> {
    let mut attempt = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy => {
                attempt += 1;
                if attempt >= SPAWN_BUSY_ATTEMPTS {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(u64::from(attempt.min(50))));
            }
            other => return other,
        }
    }
}

/// Run `spec` with `ctx` in its environment and on its stdin, and wait for it to end.
///
/// The hook runs by argv (no shell unless `spec.shell`), in a new process group, with the
/// daemon's environment plus the `TIMEZERO_*` variables of `ctx` (HOOK-06). At
/// `start + spec.timeout` on `clock` the group gets SIGTERM, and at `start + timeout +
/// kill_grace` SIGKILL; the result is then [`HookError::TimedOut`] (HOOK-07). Before this
/// returns, every process of the group has exited, also when the leader exited by itself
/// (see the module docs). Both deadlines are registered on `clock` before the child starts, so
/// a test that sees the child running may advance a manual clock at once.
///
/// A hook that does not read its stdin makes the write of the document fail with `EPIPE`;
/// the calling process must ignore SIGPIPE, as every Rust program's `main` does by default.
#[must_use]
pub fn run(spec: &HookSpec, ctx: &HookContext, clock: &dyn Clock) -> HookRun {
    let started = clock.now();
    let term_at = later(started, spec.timeout.get());
    let kill_at = later(term_at, spec.kill_grace.get());
    let term_rx = clock.after(term_at);
    let kill_rx = clock.after(kill_at);

    let argv = spec.argv();
    let Some((program, args)) = argv.split_first() else {
        let err = HookError::Spawn {
            program: String::new(),
            source: Arc::new(io::Error::new(io::ErrorKind::InvalidInput, "no program")),
        };
        return HookRun::not_started(started, clock.now(), err);
    };
    let (stop_read, stop_write) = match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            let err = HookError::Io {
                op: "create the stop pipe",
                source: Arc::new(e.into()),
            };
            return HookRun::not_started(started, clock.now(), err);
        }
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in ctx.env() {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    let mut child = match spawn_retrying_busy(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            let err = HookError::Spawn {
                program: spec.program().to_string(),
                source: Arc::new(e),
            };
            return HookRun::not_started(started, clock.now(), err);
        }
    };
    let leader = child.id();
    // The child called setpgid(0, 0) before exec: its pid is the group id. The leader is
    // reaped only after the group has been killed, so the group id cannot be reused meanwhile.
    let pgid = i32::try_from(leader).ok().and_then(Pid::from_raw);
    let pipes = Pipes {
        stdin: child.stdin.take(),
        document: ctx.document(),
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        stop: stop_read,
    };
    let pumper = std::thread::Builder::new()
        .name("hook-output".into())
        .spawn(move || pump(pipes));

    let (exit_tx, exit_rx) = channel::bounded::<()>(1);
    let waiter = pgid.map(|pid| {
        std::thread::Builder::new()
            .name("hook-wait".into())
            .spawn(move || {
                wait_exited(pid);
                let _ = exit_tx.send(());
            })
    });

    let mut timed_out = false;
    let mut killed = false;
    let mut setup_error = None;
    match (pgid, waiter) {
        (Some(pgid), Some(Ok(waiter))) => {
            channel::select! {
                recv(exit_rx) -> _ => {}
                recv(term_rx) -> _ => {
                    timed_out = true;
                    signal_group(pgid, Signal::TERM);
                    channel::select! {
                        recv(exit_rx) -> _ => {}
                        recv(kill_rx) -> _ => {
                            killed = true;
                            signal_group(pgid, Signal::KILL);
                            // SIGKILL cannot be ignored: this wait ends.
                            let _ = exit_rx.recv();
                        }
                    }
                }
            }
            let _ = waiter.join();
        }
        (pgid, waiter) => {
            // No group id or no waiting thread: kill what was started and report it.
            if let Some(pgid) = pgid {
                signal_group(pgid, Signal::KILL);
            }
            setup_error = Some(match waiter {
                Some(Err(e)) => HookError::Io {
                    op: "start the waiting thread",
                    source: Arc::new(e),
                },
                _ => HookError::Io {
                    op: "read the child's process id",
                    source: Arc::new(io::Error::other("pid out of range")),
                },
            });
        }
    }
    let strays = pgid.map_or(0, |p| kill_group_and_wait(p, leader));
    // After a timeout the whole group was signalled already: whether a member was still
    // there at the count is a race, so only a leader's own exit counts strays.
    let strays_killed = if timed_out || setup_error.is_some() {
        0
    } else {
        strays
    };
    let status = child.wait();
    // Every process of the group has exited: what they wrote is in the pipes.
    drop(stop_write);
    let (stdout, stderr) = match pumper {
        Ok(handle) => handle.join().unwrap_or_default(),
        Err(_) => Default::default(),
    };
    let ended = clock.now();

    let (exit_code, signal) = match &status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    let outcome = if let Some(e) = setup_error {
        HookOutcome::Failed(e)
    } else if timed_out {
        HookOutcome::Failed(HookError::TimedOut {
            timeout: spec.timeout,
            killed,
        })
    } else {
        match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => classify_exit(u8::try_from(code & 0xff).unwrap_or(u8::MAX)),
                (None, Some(sig)) => HookOutcome::Failed(HookError::Signal(sig)),
                (None, None) => HookOutcome::Failed(HookError::Io {
                    op: "read the exit status",
                    source: Arc::new(io::Error::other("neither exit code nor signal")),
                }),
            },
            Err(e) => HookOutcome::Failed(HookError::Io {
                op: "wait for the hook",
                source: Arc::new(e),
            }),
        }
    };
    HookRun {
        outcome,
        started,
        ended,
        pgid: Some(leader),
        exit_code,
        signal,
        strays_killed,
        stdout,
        stderr,
    }
}

/// Block until child `pid` has exited, without reaping it (`WNOWAIT`): the zombie keeps the
/// process group id reserved until the runner has killed the rest of the group.
fn wait_exited(pid: Pid) {
    use rustix::process::{waitid, WaitId, WaitIdOptions};
    loop {
        match waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        ) {
            Err(rustix::io::Errno::INTR) => {}
            // Exited; or an error (ECHILD) that waiting again would not change.
            _ => return,
        }
    }
}
