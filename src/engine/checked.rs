//! Checked copy-before-write: the target's flush and the table's commit run side by side.
//!
//! A first write copies its grains' T0 bytes to the target, then issues the target's flush on
//! a flusher thread while the calling thread commits [`Entry::CopyChecked`] records (a CRC32C
//! per grain) to the table. Only when both are durable are the grains' bits set in memory and
//! the source write issued. A crash in between leaves a durable record whose target bytes may
//! be lost or torn: recovery ([`verify_at_open`]) reads each recorded grain on the target and
//! keeps it when it matches its CRC, and otherwise copies it again from the source, which still
//! holds those bytes (the source write had not been issued), checking them against the same
//! CRC. Rule 2 of the crash model in this form: *a copied bit is trusted only when its
//! grain's target bytes are durable or verified against the record*.

use std::sync::Arc;

use std::collections::VecDeque;

use parking_lot::{Condvar, Mutex};

use crate::activity::{CopyProof, FlushFn};
use crate::model::{Entry, Reason, ReasonCode, VolumeRef};
use crate::session::Session;
use crate::volume::{AlignedBuf, Volume};
use crate::Result;

use super::VolumeResolver;

/// Threads that run target flushes while the writer commits its records.
///
/// Waiting parks on a condition variable: no spinning and no `sched_yield`, which on a loaded
/// machine hands the core to other processes for milliseconds at a time.
pub(super) struct Flusher {
    shared: Arc<Queue>,
    started: Mutex<bool>,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Pending>>,
    cv: Condvar,
    /// Set when the engine dropped its flusher: the threads end.
    closed: std::sync::atomic::AtomicBool,
}

/// A flush to run and where its result goes.
struct Pending {
    flush: FlushFn,
    done: Arc<Done>,
}

/// The result of one flush, once it ran.
#[derive(Default)]
pub(super) struct Done {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
}

impl Done {
    fn set(&self, r: Result<()>) {
        *self.result.lock() = Some(r);
        self.cv.notify_one();
    }

    /// Wait for the flush's result.
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

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").finish_non_exhaustive()
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Under the queue's lock, so that no thread misses the wake-up between its check
        // and its wait.
        let _jobs = self.shared.jobs.lock();
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.cv.notify_all();
    }
}

impl Flusher {
    pub(super) fn new() -> Self {
        Flusher {
            shared: Arc::new(Queue::default()),
            started: Mutex::new(false),
        }
    }

    /// Run `flush` on a flusher thread; [`Done::wait`] gets its result. Runs it on the
    /// calling thread when no flusher thread can be started.
    pub(super) fn start(&self, flush: FlushFn) -> Arc<Done> {
        let done = Arc::new(Done::default());
        let running = {
            let mut started = self.started.lock();
            if !*started {
                *started = spawn_threads(&self.shared);
            }
            *started
        };
        if running {
            self.shared.jobs.lock().push_back(Pending {
                flush,
                done: Arc::clone(&done),
            });
            self.shared.cv.notify_one();
        } else {
            done.set(flush());
        }
        done
    }
}

/// Start the flusher threads; whether at least one started. They end when the flusher is
/// dropped.
fn spawn_threads(shared: &Arc<Queue>) -> bool {
    let mut started = 0;
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
                    Some(j) => j.done.set((j.flush)()),
                    None => return,
                }
            });
        if spawned.is_ok() {
            started += 1;
        }
    }
    started > 0
}

/// The `CopyChecked` entries for grains `g0..g1` of `session` with their CRCs (at most
/// [`crate::limits::COPY_CHECKED_GRAINS_MAX`] grains per entry).
pub(super) fn entries(session: crate::ids::SessionId, g0: u64, crcs: &[u32]) -> Vec<Entry> {
    let per = crate::limits::COPY_CHECKED_GRAINS_MAX as usize;
    crcs.chunks(per)
        .enumerate()
        .map(|(i, c)| Entry::CopyChecked {
            session,
            start: g0 + (i * per) as u64,
            crcs: c.to_vec(),
        })
        .collect()
}

/// The CRC32C of each grain of `bytes` (grains of `grain` bytes; the last may be shorter).
pub(super) fn grain_crcs(bytes: &[u8], grain: usize) -> Vec<u32> {
    bytes.chunks(grain.max(1)).map(crc32c::crc32c).collect()
}

/// Prove the checked copies `grains` (grain, CRC32C) of `s` when its table is opened (see the
/// module doc): [`CopyProof::Proven`] when every grain is proven and the target is flushed,
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
    live: &dyn Fn(usize) -> bool,
) -> CopyProof {
    prove(s, tgt, &mut || Ok(Arc::clone(src)), grains, live)
}

/// The verdict that a session's recorded copies cannot be proven, and why.
fn unverified(detail: String) -> CopyProof {
    CopyProof::Failed(Reason::new(
        ReasonCode::CopyUnverified,
        format!("recorded copy not verified: {detail}"),
    ))
}

/// Read each grain of `grains` on `tgt` and keep it when it matches its CRC; otherwise copy
/// it again from the source (`source` opens it, once), which must match the same CRC. Then
/// flush the target.
fn prove(
    s: &Arc<Session>,
    tgt: &Arc<dyn Volume>,
    source: &mut dyn FnMut() -> std::result::Result<Arc<dyn Volume>, Unavailable>,
    grains: &[(u64, u32)],
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
