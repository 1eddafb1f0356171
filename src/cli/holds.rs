//! What a job run holds on file systems and applications, made safe against the death of the
//! process running it (docs/orchestration.md, QUI-06 and QUI-07):
//!
//! - [`Holds`] is the quiesce backend of a job run. A freeze is a lease: its row (job, mount,
//!   `st_dev`, deadline) is committed before `FIFREEZE` and dropped after a successful thaw; a
//!   second lease on one file system conflicts, which refuses the freeze as `AlreadyQuiesced`
//!   (PLAN-12). Before the first freeze or quiesce command it starts the watchdog and announces
//!   every hold to it, and releases each hold it undid itself.
//! - [`watchdog`] is `timezero quiesce-watchdog`: it holds an exclusive lock on
//!   `STATE/watchdog-JOB.lock` (holding its pid) for its whole life and serves
//!   [`quiesce::serve_watchdog`] on its stdin.
//! - [`wait_for_watchdog`] lets `reconcile` wait until the watchdog of a dead job has undone
//!   its holds (so no hold is undone twice), and removes the lock file.
//!
//! A hold's deadline: for `writes = "engine"` the quiesce timeout T plus the unquiesce timeout
//! U plus twice `QUIESCE_GRACE_SECS` after the quiesce starts (the longest a task may take to
//! quiesce, cut and unquiesce); for `writes = "direct"` none (the freeze lasts as long as the
//! copy, whose length nothing bounds), only the pipe.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use parking_lot::Mutex;
use rustix::fs::{flock, FlockOperation};

use super::state::StateDir;
use super::Fail;
use crate::clock::{Clock, SystemClock};
use crate::hook::HookSpec;
use crate::limits::QUIESCE_GRACE_SECS;
use crate::quiesce::{
    serve_watchdog, BackendError, QuiesceBackend, QuiesceSpec, Watchdog, WatchdogMessage,
    WATCHDOG_READY,
};
use crate::store::{BackupDay, Change, IdKind, IntentId, JobId, Lease, LeaseId, Store, StoreError};

/// `STATE/watchdog-JOB.lock`: held by the watchdog of `job` while it runs.
pub(super) fn watchdog_lock_path(state: &Path, job: JobId) -> PathBuf {
    state.join(format!("watchdog-{job}.lock"))
}

/// `timezero quiesce-watchdog --job J`: lock, say ready, serve until the pipe closes.
pub(super) fn watchdog(job: &str, state: Option<PathBuf>) -> Result<String, Fail> {
    let state = StateDir::new(state);
    let job = job
        .strip_prefix('j')
        .and_then(|n| n.parse::<u64>().ok())
        .map(JobId)
        .ok_or_else(|| Fail::Usage(format!("--job {job}: not a job id like j7")))?;
    let path = watchdog_lock_path(&state.dir, job);
    let mut lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Fail::Message(format!("open {}: {e}", path.display())))?;
    flock(&lock, FlockOperation::LockExclusive)
        .map_err(|e| Fail::Message(format!("lock {}: {e}", path.display())))?;
    let _ = lock.set_len(0);
    let _ = writeln!(lock, "{}", std::process::id());
    let store: Arc<dyn Store> = state.open_store()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{WATCHDOG_READY}")
            .and_then(|()| out.flush())
            .map_err(|e| Fail::Message(format!("quiesce watchdog: write stdout: {e}")))?;
    }
    let mut log = std::io::stderr();
    serve_watchdog(std::io::stdin(), Some(store), &clock, &mut log);
    // Removed while still locked: a reconcile waiting on it finds its holds undone.
    let _ = std::fs::remove_file(&path);
    drop(lock);
    Ok(String::new())
}

/// For `reconcile`: wait until the watchdog of dead job `job` (if one ran) has ended, so that
/// what it undid is in the store; remove its lock file. Returns the line to print, if any.
pub(super) fn wait_for_watchdog(state: &Path, job: JobId) -> Option<String> {
    let path = watchdog_lock_path(state, job);
    let file = OpenOptions::new().read(true).open(&path).ok()?;
    let line = match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => format!("{job}: its quiesce watchdog is gone"),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            // Its undo is bounded: a thaw, or an unquiesce_cmd with its timeout and kill grace.
            match flock(&file, FlockOperation::LockExclusive) {
                Ok(()) => format!(
                    "{job}: waited for its quiesce watchdog (pid {}) to undo what it held",
                    pid.trim()
                ),
                Err(e) => format!("{job}: lock {}: {e}", path.display()),
            }
        }
        Err(e) => format!("{job}: lock {}: {e}", path.display()),
    };
    let _ = std::fs::remove_file(&path);
    Some(line)
}

/// The quiesce backend of one job run: leases around the real freezes, and the watchdog.
pub(super) struct Holds {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    inner: Arc<dyn QuiesceBackend>,
    job: JobId,
    attempt: u32,
    plan: String,
    backup_day: BackupDay,
    /// Where the watchdog keeps its lock; `None`: no watchdog (a run inside a test program).
    state: Option<PathBuf>,
    watchdog: Mutex<Option<Watchdog>>,
    leases: Mutex<HashMap<PathBuf, LeaseId>>,
    deadline: Mutex<Timestamp>,
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holds")
            .field("job", &self.job)
            .field("leases", &*self.leases.lock())
            .finish_non_exhaustive()
    }
}

fn io_err(op: &'static str, mount: &Path, e: impl std::fmt::Display) -> BackendError {
    BackendError::Io {
        op,
        mount: mount.to_path_buf(),
        source: Arc::new(std::io::Error::other(e.to_string())),
    }
}

impl Holds {
    /// The holds of attempt `attempt` of `job`, freezing through `inner`.
    #[expect(clippy::too_many_arguments, reason = "what one job run's holds name")]
    pub(super) fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        inner: Arc<dyn QuiesceBackend>,
        job: JobId,
        attempt: u32,
        plan: String,
        backup_day: BackupDay,
        state: Option<PathBuf>,
    ) -> Holds {
        let now = clock.now();
        Holds {
            store,
            clock,
            inner,
            job,
            attempt,
            plan,
            backup_day,
            state,
            watchdog: Mutex::new(None),
            leases: Mutex::new(HashMap::new()),
            deadline: Mutex::new(now),
        }
    }

    /// A task starts quiescing as `spec` says: set the deadline of the holds it announces.
    pub(super) fn quiescing(&self, spec: &QuiesceSpec, direct: bool) {
        let deadline = if direct {
            no_deadline()
        } else {
            let grace =
                SignedDuration::from_secs(i64::try_from(QUIESCE_GRACE_SECS).unwrap_or(i64::MAX));
            let span = spec.timeout.get() + spec.unquiesce_timeout.get() + grace + grace;
            self.clock
                .now()
                .saturating_add(span)
                .unwrap_or_else(|_| no_deadline())
        };
        *self.deadline.lock() = deadline;
    }

    /// Tell the watchdog, starting it first if it is not running.
    fn announce(&self, msg: &WatchdogMessage) -> Result<(), String> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let mut w = self.watchdog.lock();
        if w.is_none() {
            let exe = std::env::current_exe()
                .map_err(|e| format!("quiesce watchdog: the program's path: {e}"))?;
            let mut command = std::process::Command::new(exe);
            command
                .arg("quiesce-watchdog")
                .arg("--job")
                .arg(self.job.to_string())
                .arg("--state")
                .arg(state);
            *w = Some(Watchdog::spawn(command).map_err(|e| e.to_string())?);
        }
        match w.as_mut() {
            Some(watchdog) => watchdog.send(msg).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// The runner undid hold `key` itself.
    fn release(&self, key: String) {
        if let Some(w) = self.watchdog.lock().as_mut() {
            if w.holds(&key) {
                let _ = w.send(&WatchdogMessage::Release { key });
            }
        }
    }

    /// A command quiesce of `task` is about to run `quiesce_cmd`; `unquiesce` undoes it and
    /// `intent` records it.
    pub(super) fn hold_command(
        &self,
        intent: IntentId,
        task: u32,
        unquiesce: &HookSpec,
    ) -> Result<(), String> {
        self.announce(&WatchdogMessage::Command {
            intent,
            argv: unquiesce.run.clone(),
            shell: unquiesce.shell,
            timeout_secs: secs(unquiesce.timeout.get()),
            kill_grace_secs: secs(unquiesce.kill_grace.get()),
            job: self.job,
            attempt: self.attempt,
            plan: Some(self.plan.clone()),
            task: Some(task),
            backup_day: Some(self.backup_day),
            deadline_ms: self.deadline.lock().as_millisecond(),
        })
    }

    /// The command quiesce recorded by `intent` was undone by the runner.
    pub(super) fn release_command(&self, intent: IntentId) {
        self.release(intent.to_string());
    }

    fn drop_lease(&self, lease: LeaseId) {
        let _ = self.store.commit(vec![Change::DropLease(lease)]);
    }
}

/// The deadline of a hold that only the pipe ends: the last whole day jiff represents (a
/// lease row keeps whole milliseconds, and `Timestamp::MAX` is not one).
fn no_deadline() -> Timestamp {
    Timestamp::from_second(Timestamp::MAX.as_second() - 86_400).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn secs(d: SignedDuration) -> u64 {
    u64::try_from(d.as_secs()).unwrap_or(0)
}

impl QuiesceBackend for Holds {
    fn freeze(&self, mount: &Path) -> Result<(), BackendError> {
        let st = rustix::fs::stat(mount).map_err(|e| io_err("stat", mount, e))?;
        let id = self
            .store
            .allocate(IdKind::Lease)
            .map_err(|e| io_err("record the lease of", mount, e))?;
        let lease = LeaseId(id);
        let deadline = *self.deadline.lock();
        match self.store.commit(vec![Change::PutLease(Lease {
            id: lease,
            job: self.job,
            mount: mount.to_path_buf(),
            st_dev: st.st_dev,
            deadline,
        })]) {
            Ok(()) => {}
            // Another job holds a lease on this file system (PLAN-12).
            Err(StoreError::Conflict { .. }) => {
                return Err(BackendError::Busy {
                    op: "freeze",
                    mount: mount.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err("record the lease of", mount, e)),
        }
        if let Err(e) = self.announce(&WatchdogMessage::Freeze {
            lease,
            mount: mount.to_path_buf(),
            st_dev: st.st_dev,
            deadline_ms: deadline.as_millisecond(),
        }) {
            self.drop_lease(lease);
            return Err(io_err("freeze", mount, e));
        }
        if let Err(e) = self.inner.freeze(mount) {
            self.release(lease.to_string());
            self.drop_lease(lease);
            return Err(e);
        }
        self.leases.lock().insert(mount.to_path_buf(), lease);
        Ok(())
    }

    fn thaw(&self, mount: &Path) -> Result<(), BackendError> {
        // A failed thaw keeps the lease and the watchdog's hold: one of them thaws it later.
        self.inner.thaw(mount)?;
        let lease = self.leases.lock().remove(mount);
        if let Some(lease) = lease {
            self.release(lease.to_string());
            self.drop_lease(lease);
        }
        Ok(())
    }

    fn flush(&self, mount: &Path) -> Result<(), BackendError> {
        self.inner.flush(mount)
    }
}
