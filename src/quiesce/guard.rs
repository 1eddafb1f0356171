//! Quiescing a task's sources and undoing it: the deadlines of QUI-04 and QUI-05 and the
//! guard that thaws on every path out (QUI-03, QUI-11).
//!
//! Every backend call and quiesce command runs on a worker thread while the caller waits in
//! `crossbeam::select!` for the worker or the deadline on the [`Clock`], so a `FIFREEZE` that
//! hangs cannot hold the task past its deadline. After a quiesce deadline the worker freezes
//! nothing more, and a freeze that returns after the deadline is thawed by the worker itself:
//! what the caller thaws is exactly the list of freezes that had completed when it gave up.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam::channel::{self, Receiver};
use jiff::{SignedDuration, Timestamp};
use parking_lot::Mutex;

use super::backend::{BackendError, QuiesceBackend};
use super::spec::{QuiesceMode, QuiesceSpec};
use crate::clock::Clock;
use crate::hook::{self, HookContext, HookError, HookOutcome, HookSpec, Stage, Timeout};
use crate::limits::QUIESCE_GRACE_SECS;

/// Why a quiesce or an unquiesce failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QuiesceError {
    /// A mount was frozen already (`EBUSY`) by someone else (PLAN-12). What this quiesce froze
    /// before it was thawed; this mount was not.
    #[error("{} is already quiesced", mount.display())]
    AlreadyQuiesced {
        /// The mount.
        mount: PathBuf,
    },
    /// A mount's file system cannot be frozen.
    #[error("{} cannot be frozen: its file system does not support it", mount.display())]
    Unsupported {
        /// The mount.
        mount: PathBuf,
    },
    /// A freeze, thaw or flush failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Not quiesced within the timeout plus `QUIESCE_GRACE_SECS` (QUI-04); what was done is
    /// undone.
    #[error("not quiesced within {timeout} + {grace} s", grace = QUIESCE_GRACE_SECS)]
    QuiesceTimedOut {
        /// The quiesce timeout T.
        timeout: Timeout,
    },
    /// Not unquiesced within the unquiesce timeout plus `QUIESCE_GRACE_SECS` (QUI-05); the
    /// thaw may still finish, its worker goes on.
    #[error("not unquiesced within {timeout} + {grace} s", grace = QUIESCE_GRACE_SECS)]
    UnquiesceTimedOut {
        /// The unquiesce timeout U.
        timeout: Timeout,
    },
    /// A quiesce command failed (`quiesce_cmd`, `unquiesce_cmd`, or a `status_cmd` that
    /// could not be started).
    #[error("{stage} command: {error}")]
    Command {
        /// Which command.
        stage: Stage,
        /// How it failed.
        #[source]
        error: HookError,
    },
    /// A worker thread could not be started, or ended without an answer.
    #[error("quiesce worker: {source}")]
    Worker {
        /// The error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The quiesce failed, and undoing what it had done failed too.
    #[error("{cause}; undoing it failed too: {undo}")]
    Undo {
        /// Why the quiesce failed.
        cause: Box<QuiesceError>,
        /// Why the undo failed.
        undo: Box<QuiesceError>,
    },
}

impl QuiesceError {
    fn from_backend(e: BackendError) -> QuiesceError {
        match e {
            BackendError::Busy { mount, .. } => QuiesceError::AlreadyQuiesced { mount },
            BackendError::Unsupported { mount, .. } => QuiesceError::Unsupported { mount },
            e @ BackendError::Io { .. } => QuiesceError::Backend(e),
        }
    }

    fn worker(what: &str) -> QuiesceError {
        QuiesceError::Worker {
            source: Arc::new(io::Error::other(what.to_string())),
        }
    }
}

/// What a quiesce did, so that exactly that is undone (QUI-03).
#[derive(Debug, Clone, Default)]
enum Held {
    /// Nothing to undo (`none`, `flush`, or already undone).
    #[default]
    Nothing,
    /// These mounts were frozen by this quiesce, in this order.
    Frozen(Vec<PathBuf>),
    /// `quiesce_cmd` ran: `unquiesce_cmd` must run.
    Command(Box<UnquiesceCommand>),
}

/// The `unquiesce_cmd` a command-mode quiesce owes, with what it is told.
#[derive(Debug, Clone)]
struct UnquiesceCommand {
    unquiesce: HookSpec,
    ctx: HookContext,
}

/// Quiesces and unquiesces through a backend, with deadlines on a clock.
#[derive(Debug, Clone)]
pub struct Quiescer {
    backend: Arc<dyn QuiesceBackend>,
    clock: Arc<dyn Clock>,
}

/// Progress of a freeze worker, shared with the waiting caller.
#[derive(Debug, Default)]
struct Progress {
    frozen: Vec<PathBuf>,
    canceled: bool,
}

fn grace() -> SignedDuration {
    SignedDuration::from_secs(i64::try_from(QUIESCE_GRACE_SECS).unwrap_or(i64::MAX))
}

/// `start + timeout + QUIESCE_GRACE_SECS`.
fn deadline_after(start: Timestamp, timeout: Timeout) -> Timestamp {
    hook::later(hook::later(start, timeout.get()), grace())
}

/// Run `f` on a new thread; the receiver gets its result, or is disconnected if it panicked.
fn spawn_worker<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Receiver<T>, QuiesceError> {
    let (tx, rx) = channel::bounded(1);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| QuiesceError::Worker {
            source: Arc::new(e),
        })?;
    Ok(rx)
}

/// The time left until `deadline`, or `None` when it has passed.
fn left(clock: &dyn Clock, deadline: Timestamp) -> Option<Timeout> {
    Timeout::from_duration(deadline.duration_since(clock.now()))
}

impl Quiescer {
    /// A quiescer using `backend` for freeze, thaw and flush, and `clock` for every wait.
    #[must_use]
    pub fn new(backend: Arc<dyn QuiesceBackend>, clock: Arc<dyn Clock>) -> Quiescer {
        Quiescer { backend, clock }
    }

    /// Quiesce as `spec` says; `ctx` is what quiesce commands are told (their stage is set
    /// here). Returns the guard that undoes it.
    ///
    /// Done by `start + spec.timeout + QUIESCE_GRACE_SECS` → `Ok`; not done then →
    /// [`QuiesceError::QuiesceTimedOut`] after what was done is undone (QUI-04). Freezes run in
    /// the order given; a mount frozen by someone else stops the quiesce with
    /// [`QuiesceError::AlreadyQuiesced`] and only the mounts frozen by this call are thawed.
    /// In command mode, once `quiesce_cmd` has started, `unquiesce_cmd` runs on every path
    /// out; at the deadline the running command gets SIGTERM (its timeout is the deadline)
    /// and is waited for (at most its kill grace) before `unquiesce_cmd` runs.
    ///
    /// # Errors
    /// [`QuiesceError`]; each error path has undone what this call did (or says in
    /// [`QuiesceError::Undo`] that undoing failed).
    pub fn quiesce(&self, spec: &QuiesceSpec, ctx: &HookContext) -> Result<Quiesced, QuiesceError> {
        let deadline = deadline_after(self.clock.now(), spec.timeout);
        match &spec.mode {
            QuiesceMode::None => Ok(self.guard(Held::Nothing, spec)),
            QuiesceMode::Flush { mounts } => self.flush(mounts, deadline, spec),
            QuiesceMode::Freeze { mounts } => self.freeze(mounts, deadline, spec),
            QuiesceMode::Command {
                quiesce,
                status,
                unquiesce,
                status_interval,
            } => {
                let held = Held::Command(Box::new(UnquiesceCommand {
                    unquiesce: unquiesce.clone(),
                    ctx: ctx.for_stage(Stage::Unquiesce),
                }));
                self.command(
                    quiesce,
                    status.as_ref(),
                    *status_interval,
                    ctx,
                    deadline,
                    spec,
                    held,
                )
            }
        }
    }

    fn guard(&self, held: Held, spec: &QuiesceSpec) -> Quiesced {
        Quiesced {
            quiescer: self.clone(),
            held,
            unquiesce_timeout: spec.unquiesce_timeout,
        }
    }

    /// `cause`, after undoing `held`; or both errors when the undo failed too.
    fn undone(&self, cause: QuiesceError, held: Held, spec: &QuiesceSpec) -> QuiesceError {
        match self.undo(held, spec.unquiesce_timeout) {
            Ok(()) => cause,
            Err(undo) => QuiesceError::Undo {
                cause: Box::new(cause),
                undo: Box::new(undo),
            },
        }
    }

    fn flush(
        &self,
        mounts: &[PathBuf],
        deadline: Timestamp,
        spec: &QuiesceSpec,
    ) -> Result<Quiesced, QuiesceError> {
        let deadline_rx = self.clock.after(deadline);
        let backend = Arc::clone(&self.backend);
        let mounts = mounts.to_vec();
        let worker = spawn_worker("quiesce-flush", move || {
            mounts.iter().try_for_each(|m| backend.flush(m))
        })?;
        channel::select! {
            recv(worker) -> r => match r {
                Ok(Ok(())) => Ok(self.guard(Held::Nothing, spec)),
                Ok(Err(e)) => Err(QuiesceError::from_backend(e)),
                Err(_) => Err(QuiesceError::worker("the flush worker ended without an answer")),
            },
            recv(deadline_rx) -> _ => Err(QuiesceError::QuiesceTimedOut { timeout: spec.timeout }),
        }
    }

    fn freeze(
        &self,
        mounts: &[PathBuf],
        deadline: Timestamp,
        spec: &QuiesceSpec,
    ) -> Result<Quiesced, QuiesceError> {
        let deadline_rx = self.clock.after(deadline);
        let progress = Arc::new(Mutex::new(Progress::default()));
        let worker = {
            let backend = Arc::clone(&self.backend);
            let progress = Arc::clone(&progress);
            let mounts = mounts.to_vec();
            spawn_worker("quiesce-freeze", move || -> Result<(), BackendError> {
                for m in mounts {
                    if progress.lock().canceled {
                        return Ok(());
                    }
                    backend.freeze(&m)?;
                    let mut p = progress.lock();
                    if p.canceled {
                        // The caller gave up while this freeze ran: it never learns of it,
                        // so it is undone here.
                        drop(p);
                        let _ = backend.thaw(&m);
                        return Ok(());
                    }
                    p.frozen.push(m);
                }
                Ok(())
            })?
        };
        channel::select! {
            recv(worker) -> r => {
                let held = Held::Frozen(std::mem::take(&mut progress.lock().frozen));
                match r {
                    Ok(Ok(())) => Ok(self.guard(held, spec)),
                    Ok(Err(e)) => Err(self.undone(QuiesceError::from_backend(e), held, spec)),
                    Err(_) => Err(self.undone(
                        QuiesceError::worker("the freeze worker ended without an answer"),
                        held,
                        spec,
                    )),
                }
            },
            recv(deadline_rx) -> _ => {
                let frozen = {
                    let mut p = progress.lock();
                    p.canceled = true;
                    std::mem::take(&mut p.frozen)
                };
                let cause = QuiesceError::QuiesceTimedOut { timeout: spec.timeout };
                Err(self.undone(cause, Held::Frozen(frozen), spec))
            },
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the parts of one command-mode quiesce"
    )]
    fn command(
        &self,
        quiesce: &HookSpec,
        status: Option<&HookSpec>,
        interval: Timeout,
        ctx: &HookContext,
        deadline: Timestamp,
        spec: &QuiesceSpec,
        held: Held,
    ) -> Result<Quiesced, QuiesceError> {
        let deadline_rx = self.clock.after(deadline);
        let (cancel_tx, cancel_rx) = channel::bounded::<()>(0);
        let started = Arc::new(AtomicBool::new(false));
        let worker = {
            let clock = Arc::clone(&self.clock);
            let started = Arc::clone(&started);
            let quiesce = quiesce.clone();
            let status = status.cloned();
            let ctx = ctx.clone();
            spawn_worker("quiesce-command", move || -> Result<(), QuiesceError> {
                let timed_out = QuiesceError::QuiesceTimedOut {
                    timeout: Timeout::from_secs(0),
                };
                let Some(t) = left(&*clock, deadline) else {
                    return Err(timed_out);
                };
                let ran = hook::run(
                    &quiesce.with_timeout(t),
                    &ctx.for_stage(Stage::Quiesce),
                    &*clock,
                );
                let not_started =
                    matches!(ran.outcome, HookOutcome::Failed(HookError::Spawn { .. }));
                started.store(!not_started, Ordering::SeqCst);
                command_result(Stage::Quiesce, ran.outcome)?;
                let Some(status) = status else {
                    return Ok(());
                };
                loop {
                    let Some(t) = left(&*clock, deadline) else {
                        return Err(timed_out);
                    };
                    let ran = hook::run(
                        &status.clone().with_timeout(t),
                        &ctx.for_stage(Stage::QuiesceStatus),
                        &*clock,
                    );
                    match ran.outcome {
                        HookOutcome::Success => return Ok(()),
                        HookOutcome::Failed(error @ HookError::Spawn { .. }) => {
                            return Err(QuiesceError::Command {
                                stage: Stage::QuiesceStatus,
                                error,
                            })
                        }
                        // Not quiesced yet: ask again after the interval.
                        _ => {}
                    }
                    let tick = clock.after(hook::later(clock.now(), interval.get()));
                    channel::select! {
                        recv(tick) -> _ => {}
                        recv(cancel_rx) -> _ => return Err(timed_out),
                    }
                }
            })?
        };
        channel::select! {
            recv(worker) -> r => {
                let cause = match r {
                    Ok(Ok(())) => return Ok(self.guard(held, spec)),
                    Ok(Err(e)) => e,
                    Err(_) => QuiesceError::worker("the quiesce command worker ended without an answer"),
                };
                if started.load(Ordering::SeqCst) {
                    Err(self.undone(cause, held, spec))
                } else {
                    Err(cause)
                }
            },
            recv(deadline_rx) -> _ => {
                drop(cancel_tx);
                // Its command got SIGTERM at this deadline (or SIGKILL after its kill grace),
                // and a status wait ends on the cancel: the worker ends, so no quiesce command
                // still runs when unquiesce_cmd starts.
                let _ = worker.recv();
                let cause = QuiesceError::QuiesceTimedOut { timeout: spec.timeout };
                if started.load(Ordering::SeqCst) {
                    Err(self.undone(cause, held, spec))
                } else {
                    Err(cause)
                }
            },
        }
    }

    /// Undo `held` within `timeout` + `QUIESCE_GRACE_SECS` (QUI-05): thaw frozen mounts in
    /// reverse order (every one, also after one fails), or run `unquiesce_cmd`.
    fn undo(&self, held: Held, timeout: Timeout) -> Result<(), QuiesceError> {
        let deadline = deadline_after(self.clock.now(), timeout);
        let worker = match held {
            Held::Nothing => return Ok(()),
            Held::Frozen(mounts) if mounts.is_empty() => return Ok(()),
            Held::Frozen(mounts) => {
                let deadline_rx = self.clock.after(deadline);
                let backend = Arc::clone(&self.backend);
                let worker = spawn_worker("quiesce-thaw", move || {
                    let mut first = Ok(());
                    for m in mounts.iter().rev() {
                        if let Err(e) = backend.thaw(m) {
                            first = first.and(Err(QuiesceError::Backend(e)));
                        }
                    }
                    first
                })?;
                (deadline_rx, worker)
            }
            Held::Command(command) => {
                let UnquiesceCommand { unquiesce, ctx } = *command;
                let deadline_rx = self.clock.after(deadline);
                let clock = Arc::clone(&self.clock);
                let worker = spawn_worker("quiesce-unquiesce", move || {
                    let Some(t) = left(&*clock, deadline) else {
                        return Err(QuiesceError::UnquiesceTimedOut { timeout });
                    };
                    let ran = hook::run(&unquiesce.with_timeout(t), &ctx, &*clock);
                    command_result(Stage::Unquiesce, ran.outcome)
                })?;
                (deadline_rx, worker)
            }
        };
        let (deadline_rx, worker) = worker;
        channel::select! {
            recv(worker) -> r => match r {
                Ok(r) => r,
                Err(_) => Err(QuiesceError::worker("the thaw worker ended without an answer")),
            },
            recv(deadline_rx) -> _ => Err(QuiesceError::UnquiesceTimedOut { timeout }),
        }
    }
}

/// A quiesce command's outcome as a result: only exit 0 succeeds (75 is no skip here).
fn command_result(stage: Stage, outcome: HookOutcome) -> Result<(), QuiesceError> {
    match outcome {
        HookOutcome::Success => Ok(()),
        HookOutcome::Skip => Err(QuiesceError::Command {
            stage,
            error: HookError::ReservedExitCode(hook::EXIT_SKIP),
        }),
        HookOutcome::Failed(error) => Err(QuiesceError::Command { stage, error }),
    }
}

/// What one quiesce did, undone exactly once: by [`Quiesced::unquiesce`], or when it is
/// dropped on any other path out (an error, a panic, a cancel; QUI-11). Frozen mounts are
/// thawed in reverse order of freezing (QUI-03). Dropping never waits longer than the
/// unquiesce timeout plus `QUIESCE_GRACE_SECS` on the clock: a user's `unquiesce_cmd` is
/// bounded by that deadline and its own kill grace.
#[derive(Debug)]
#[must_use = "dropping the guard unquiesces at once"]
pub struct Quiesced {
    quiescer: Quiescer,
    held: Held,
    unquiesce_timeout: Timeout,
}

impl Quiesced {
    /// The mounts this quiesce froze, in freezing order (empty for other modes).
    #[must_use]
    pub fn frozen(&self) -> &[PathBuf] {
        match &self.held {
            Held::Frozen(m) => m,
            _ => &[],
        }
    }

    /// Whether there is anything to undo.
    #[must_use]
    pub fn holds_anything(&self) -> bool {
        match &self.held {
            Held::Nothing => false,
            Held::Frozen(m) => !m.is_empty(),
            Held::Command(_) => true,
        }
    }

    /// Whether `mount` is one this quiesce froze.
    #[must_use]
    pub fn froze(&self, mount: &Path) -> bool {
        self.frozen().iter().any(|m| m == mount)
    }

    /// Undo the quiesce now and report how it went (QUI-05).
    ///
    /// # Errors
    /// [`QuiesceError::UnquiesceTimedOut`] when not done by the unquiesce timeout plus the
    /// grace (the thaw may still finish), or the thaw's or `unquiesce_cmd`'s failure.
    pub fn unquiesce(mut self) -> Result<(), QuiesceError> {
        let held = std::mem::take(&mut self.held);
        self.quiescer.undo(held, self.unquiesce_timeout)
    }
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        // Nobody is left to tell: the lease (plan layer) stays for reconcile when this fails.
        let _ = self.quiescer.undo(held, self.unquiesce_timeout);
    }
}
