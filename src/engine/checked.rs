//! Checked copy-before-write: the target's flush and the table's commit run side by side.
//!
//! A first write copies its grains' T0 bytes to the target, then flushes the target and
//! commits [`Entry::CopyChecked`] records (a CRC32C per grain) to the table side by side, one
//! of the two on a flusher thread ([`Durability`] says which). Only when both are
//! durable are the grains' bits set in memory and the source write issued. A crash in between
//! leaves a durable record whose target bytes may be lost or torn: recovery
//! ([`verify_at_open`]) reads each recorded grain on the target and keeps it when it matches
//! its CRC, and otherwise copies it again from the source, which still holds those bytes (the
//! source write had not been issued), checking them against the same CRC. Rule 2 of the crash
//! model in this form: *a copied bit is trusted only when its grain's target bytes are durable
//! or verified against the record*.

use std::sync::Arc;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::activity::{CopyProof, LogBytes};
use crate::model::{Entry, Reason, ReasonCode, VolumeRef};
use crate::session::Session;
use crate::volume::{AlignedBuf, Volume};
use crate::Result;

use super::VolumeResolver;

/// How long the two durability points of a checked copy take on this engine's devices (a
/// moving average of what first writes saw), and so which of the two a first write hands to a
/// flusher thread.
///
/// Both run side by side; the writer runs one itself and waits for the thread to finish the
/// other, so the hand-over (a wake-up there and one back) adds to the first write only when the
/// thread's part is the longer: the writer runs the longer one. With the table on a faster
/// device than the target, the commit is the shorter (about half the flush on the machine of
/// docs/benchmarks.md): the writer flushes the target and the commit goes to the thread. With
/// one device for both, the commit (two journal blocks and the file's sync, while the target's
/// flush competes for the device) measured a little longer than the flush: the writer commits
/// and the thread flushes. Either way both are durable before the grains' bits are set and the
/// source write issued.
#[derive(Debug, Default)]
pub(super) struct Durability {
    /// Nanoseconds, moving average of the table commits of first writes (on a flusher thread:
    /// from the hand-over on).
    commit_ns: AtomicU64,
    /// Nanoseconds, moving average of the target flushes of first writes (on a flusher thread:
    /// from the hand-over on).
    flush_ns: AtomicU64,
}

impl Durability {
    /// Whether a first write should hand its commit to a flusher thread and flush its targets
    /// itself: the commit takes under four fifths of the flush.
    pub(super) fn commit_on_thread(&self) -> bool {
        let (c, f) = (
            self.commit_ns.load(Ordering::Relaxed),
            self.flush_ns.load(Ordering::Relaxed),
        );
        c > 0 && c.saturating_mul(5) < f.saturating_mul(4)
    }

    /// Count a commit that took `d`.
    pub(super) fn commit_took(&self, d: std::time::Duration) {
        average(&self.commit_ns, d);
    }

    /// Count a target flush that took `d`.
    pub(super) fn flush_took(&self, d: std::time::Duration) {
        average(&self.flush_ns, d);
    }
}

/// Fold `d` into the moving average `avg` (weight 1/8; the first sample sets it).
fn average(avg: &AtomicU64, d: std::time::Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    let old = avg.load(Ordering::Relaxed);
    // Lost updates between racing writers only drop a sample.
    let new = if old == 0 { ns } else { old - old / 8 + ns / 8 };
    avg.store(new, Ordering::Relaxed);
}

/// The result of a job run on a flusher thread, once it ran.
#[derive(Default)]
pub(super) struct Done {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

impl Done {
    /// Store the job's result and wake the waiter.
    pub(super) fn set(&self, r: Result<()>) {
        *self.result.lock() = Some(r);
        self.cv.notify_one();
    }

    /// Wait for the job's result.
    pub(super) fn wait(&self) -> Result<()> {
        let mut g = self.result.lock();
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            self.cv.wait(&mut g);
        }
    }
}

/// Threads that run one of a first write's two durability points while its writer runs the
/// other ([`Flusher::start`] runs any job there; see [`Durability`]).
///
/// Waiting parks on a condition variable: no spinning and no `sched_yield`, which on a loaded
/// machine hands the core to other processes for milliseconds at a time.
pub(super) struct Flusher {
    shared: Arc<Queue>,
    /// Whether the threads were started (once), and their handles, joined on drop.
    started: Mutex<Option<Vec<std::thread::JoinHandle<()>>>>,
}

/// A job for a flusher thread.
type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    cv: Condvar,
    /// Set when the engine dropped its flusher: the threads end.
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").finish_non_exhaustive()
    }
}

impl Drop for Flusher {
    /// Ends the threads once they ran every queued job, and waits for them: a job holds the
    /// table, which must be gone when the engine is (a reopen right after finds it free).
    fn drop(&mut self) {
        {
            // Under the queue's lock, so that no thread misses the wake-up between its check
            // and its wait.
            let _jobs = self.shared.jobs.lock();
            self.shared
                .closed
                .store(true, std::sync::atomic::Ordering::Release);
            self.shared.cv.notify_all();
        }
        for t in self.started.get_mut().take().unwrap_or_default() {
            let _ = t.join();
        }
    }
}

impl Flusher {
    pub(super) fn new() -> Self {
        Flusher {
            shared: Arc::new(Queue::default()),
            started: Mutex::new(None),
        }
    }

    /// Run `job` on a flusher thread, or on the calling thread when no flusher thread can be
    /// started. A job leaves its result where its caller looks (a [`Done`], or a journal
    /// commit that the caller also waits for).
    pub(super) fn start(&self, job: Job) {
        let running = {
            let mut started = self.started.lock();
            !started
                .get_or_insert_with(|| spawn_threads(&self.shared))
                .is_empty()
        };
        if running {
            self.shared.jobs.lock().push_back(job);
            self.shared.cv.notify_one();
        } else {
            job();
        }
    }
}

/// Start the flusher threads; the handles of those that started. They end when the flusher
/// is dropped.
fn spawn_threads(shared: &Arc<Queue>) -> Vec<std::thread::JoinHandle<()>> {
    let mut started = Vec::new();
    for i in 0..crate::limits::FLUSH_THREADS {
        let q = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("tz-flush-{i}"))
            .spawn(move || loop {
                let job = {
                    let mut jobs = q.jobs.lock();
                    loop {
                        if let Some(j) = jobs.pop_front() {
                            break Some(j);
                        }
                        if q.closed.load(std::sync::atomic::Ordering::Acquire) {
                            break None;
                        }
                        q.cv.wait(&mut jobs);
                    }
                };
                match job {
                    Some(j) => j(),
                    None => return,
                }
            });
        if let Ok(t) = spawned {
            started.push(t);
        }
    }
    started
}

/// The `CopyChecked` entries for grains `g0..g1` of `session` with their CRCs (at most
/// [`crate::limits::COPY_CHECKED_GRAINS_MAX`] grains per entry); `log`: (offset in the copy
/// log of grain `g0`'s bytes, grain size) when the grains were logged.
pub(super) fn entries(
    session: crate::ids::SessionId,
    g0: u64,
    crcs: &[u32],
    log: Option<(u64, u64)>,
) -> Vec<Entry> {
    let per = crate::limits::COPY_CHECKED_GRAINS_MAX as usize;
    crcs.chunks(per)
        .enumerate()
        .map(|(i, c)| Entry::CopyChecked {
            session,
            start: g0 + (i * per) as u64,
            crcs: c.to_vec(),
            log: log.map(|(off, grain)| off + (i * per) as u64 * grain),
        })
        .collect()
}

/// The CRC32C of each grain of `bytes` (grains of `grain` bytes; the last may be shorter).
pub(super) fn grain_crcs(bytes: &[u8], grain: usize) -> Vec<u32> {
    bytes.chunks(grain.max(1)).map(crc32c::crc32c).collect()
}

/// Prove the checked copies `grains` (grain, CRC32C) of `s` when its table is opened (see the
/// module doc; `log` gives a grain's T0 bytes from the copy log, which come before the
/// source's): [`CopyProof::Proven`] when every grain is proven and the target is flushed,
/// [`CopyProof::Deferred`] when the target (or the source a lost grain must come from again)
/// is missing or cannot be opened, else why the session cannot go on
/// ([`ReasonCode::CopyUnverified`]).
///
/// # Errors
/// None of its own: every volume failure becomes the verdict.
pub(super) fn verify_at_open(
    resolver: &dyn VolumeResolver,
    s: &Arc<Session>,
    grains: &[(u64, u32)],
    log: &LogBytes<'_>,
) -> Result<CopyProof> {
    let tgt = match open_same(resolver, &s.desc.target, "target") {
        Ok(v) => v,
        Err(Unavailable::Gone) => return Ok(CopyProof::Deferred),
        Err(Unavailable::Replaced(d)) => return Ok(unverified(d)),
    };
    Ok(prove(
        s,
        &tgt,
        &mut || open_same(resolver, &s.desc.source, "source"),
        grains,
        log,
        &|e| s.extent_live(e),
    ))
}

/// Prove the checked copies `grains` of `s` whose proof was deferred, now that its volumes
/// `src` and `tgt` are back (a resume); grains of extents `live` rejects are skipped.
pub(super) fn verify_on_resume(
    s: &Arc<Session>,
    src: &Arc<dyn Volume>,
    tgt: &Arc<dyn Volume>,
    grains: &[(u64, u32)],
    log: &LogBytes<'_>,
    live: &dyn Fn(usize) -> bool,
) -> CopyProof {
    prove(s, tgt, &mut || Ok(Arc::clone(src)), grains, log, live)
}

/// The verdict that a session's recorded copies cannot be proven, and why.
fn unverified(detail: String) -> CopyProof {
    CopyProof::Failed(Reason::new(
        ReasonCode::CopyUnverified,
        format!("recorded copy not verified: {detail}"),
    ))
}

/// Read each grain of `grains` on `tgt` and keep it when it matches its CRC; otherwise copy
/// it again from the copy log when the log holds bytes that match, else from the source
/// (`source` opens it, once), which must match the same CRC. Then flush the target.
fn prove(
    s: &Arc<Session>,
    tgt: &Arc<dyn Volume>,
    source: &mut dyn FnMut() -> std::result::Result<Arc<dyn Volume>, Unavailable>,
    grains: &[(u64, u32)],
    log: &LogBytes<'_>,
    live: &dyn Fn(usize) -> bool,
) -> CopyProof {
    let mut src: Option<Arc<dyn Volume>> = None;
    for &(g, crc) in grains {
        let Some(p) = s.map.grain_piece(g, g + 1) else {
            return unverified(format!("grain {g} is outside the session's extents"));
        };
        if !live(p.extent) {
            continue;
        }
        let Ok(len) = usize::try_from(p.len) else {
            return unverified(format!("grain {g} is too large"));
        };
        let mut buf = AlignedBuf::new(len);
        if let Err(e) = tgt.read_at(p.target_offset, buf.get_mut()) {
            return unverified(format!("reading grain {g} of the target: {e}"));
        }
        if crc32c::crc32c(buf.get()) == crc {
            continue;
        }
        // The target lost a logged grain (its flush comes later than the record): the log
        // holds the bytes, durable with the record.
        if let Some(bytes) = log(g).filter(|b| b.len() == len && crc32c::crc32c(b) == crc) {
            buf.get_mut().copy_from_slice(&bytes);
            if let Err(e) = tgt.write_at(p.target_offset, buf.get()) {
                return unverified(format!("copying grain {g} again from the log: {e}"));
            }
            continue;
        }
        // The target does not hold the recorded bytes: its write or flush did not finish, so
        // the source write that waited for it was never issued.
        let sv = match &src {
            Some(v) => Arc::clone(v),
            None => match source() {
                Ok(v) => {
                    src = Some(Arc::clone(&v));
                    v
                }
                Err(Unavailable::Gone) => return CopyProof::Deferred,
                Err(Unavailable::Replaced(d)) => {
                    return unverified(format!("grain {g} differs on the target and {d}"))
                }
            },
        };
        if let Err(e) = sv.read_at(p.source_offset, buf.get_mut()) {
            return unverified(format!("reading grain {g} of the source: {e}"));
        }
        if crc32c::crc32c(buf.get()) != crc {
            return unverified(format!(
                "grain {g}: neither the target nor the source holds the recorded bytes"
            ));
        }
        if let Err(e) = tgt.write_at(p.target_offset, buf.get()) {
            return unverified(format!("copying grain {g} again: {e}"));
        }
    }
    if let Err(e) = tgt.flush() {
        return unverified(format!("flushing the target: {e}"));
    }
    CopyProof::Proven
}

/// Why a session's volume cannot be used to prove its copies.
enum Unavailable {
    /// Missing, or it cannot be opened: the proof waits for it (the session is suspended).
    Gone,
    /// Another volume is at its place now: the proof can never be made.
    Replaced(String),
}

/// The volume `r` names, when it is still that volume.
fn open_same(
    resolver: &dyn VolumeResolver,
    r: &VolumeRef,
    role: &str,
) -> std::result::Result<Arc<dyn Volume>, Unavailable> {
    match resolver.resolve(r) {
        Ok(Some(v)) => {
            let i = v.info();
            if i.id == r.id && i.generation == r.generation {
                Ok(v)
            } else {
                Err(Unavailable::Replaced(format!(
                    "the {role} {} is another volume now",
                    r.locator
                )))
            }
        }
        Ok(None) | Err(_) => Err(Unavailable::Gone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durability_hands_the_commit_over_only_when_it_is_well_under_the_flush() {
        let d = Durability::default();
        // Nothing measured yet: the writer commits, the thread flushes.
        assert!(!d.commit_on_thread());
        d.flush_took(Duration::from_micros(150));
        assert!(!d.commit_on_thread(), "no commit measured yet");
        // One device for both: the commit is a little longer (as measured on files).
        d.commit_took(Duration::from_micros(190));
        assert!(!d.commit_on_thread());
        // The table moves to a faster device: the average follows within a few dozen commits.
        let mut n = 0;
        while !d.commit_on_thread() {
            d.commit_took(Duration::from_micros(60));
            d.flush_took(Duration::from_micros(150));
            n += 1;
            assert!(n < 64, "still the writer's after {n} fast commits");
        }
        // And back when the commits slow down again.
        let mut n = 0;
        while d.commit_on_thread() {
            d.commit_took(Duration::from_micros(190));
            n += 1;
            assert!(n < 64, "still the thread's after {n} slow commits");
        }
    }

    #[test]
    fn a_flusher_runs_queued_jobs_before_its_drop_returns() {
        let f = Flusher::new();
        let ran = Arc::new(AtomicU64::new(0));
        let done = Arc::new(Done::default());
        {
            let done = Arc::clone(&done);
            f.start(Box::new(move || done.set(Ok(()))));
        }
        done.wait().unwrap();
        for _ in 0..32 {
            let ran = Arc::clone(&ran);
            f.start(Box::new(move || {
                std::thread::sleep(Duration::from_millis(1));
                ran.fetch_add(1, Ordering::SeqCst);
            }));
        }
        drop(f);
        // Every job ran, and none holds its captures any more.
        assert_eq!(ran.load(Ordering::SeqCst), 32);
        assert_eq!(Arc::strong_count(&ran), 1);
    }
}
