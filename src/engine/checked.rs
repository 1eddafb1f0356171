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

use crossbeam::channel::{bounded, unbounded, Receiver, Sender};

use crate::activity::FlushFn;
use crate::model::{Entry, Reason, ReasonCode, VolumeRef};
use crate::session::Session;
use crate::volume::{AlignedBuf, Volume};
use crate::{Error, Result};

use super::VolumeResolver;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run target flushes while the writer commits its records.
pub(super) struct Flusher {
    tx: parking_lot::Mutex<Option<Sender<Job>>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").finish_non_exhaustive()
    }
}

impl Flusher {
    pub(super) fn new() -> Self {
        Flusher {
            tx: parking_lot::Mutex::new(None),
        }
    }

    /// Run `flush` on a flusher thread; the receiver gets its result. Falls back to running it
    /// on the calling thread when no thread can be started.
    pub(super) fn start(&self, flush: FlushFn) -> Receiver<Result<()>> {
        let (done_tx, done_rx) = bounded(1);
        let job: Job = Box::new(move || {
            let _ = done_tx.send(flush());
        });
        let sent = {
            let mut tx = self.tx.lock();
            if tx.is_none() {
                *tx = spawn_threads();
            }
            match tx.as_ref() {
                Some(t) => t.send(job).map_err(|e| e.into_inner()),
                None => Err(job),
            }
        };
        if let Err(job) = sent {
            job();
        }
        done_rx
    }
}

/// Start the flusher threads; `None` when none could be started.
fn spawn_threads() -> Option<Sender<Job>> {
    let (tx, rx) = unbounded::<Job>();
    let mut started = 0;
    for i in 0..crate::limits::FLUSH_THREADS {
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tz-flush-{i}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if spawned.is_ok() {
            started += 1;
        }
    }
    (started > 0).then_some(tx)
}

/// Wait for a flush started by [`Flusher::start`].
pub(super) fn wait(rx: &Receiver<Result<()>>) -> Result<()> {
    rx.recv()
        .unwrap_or_else(|_| Err(Error::invalid("flush", "flusher thread ended")))
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
/// module doc); `None` when every grain is proven and the target is flushed, or why the
/// session cannot go on ([`ReasonCode::CopyUnverified`]).
///
/// # Errors
/// None of its own: every volume failure becomes the reason.
pub(super) fn verify_at_open(
    resolver: &dyn VolumeResolver,
    s: &Arc<Session>,
    grains: &[(u64, u32)],
) -> Result<Option<Reason>> {
    let unverified = |detail: String| {
        Ok(Some(Reason::new(
            ReasonCode::CopyUnverified,
            format!("recorded copy not verified: {detail}"),
        )))
    };
    let tgt = match open_same(resolver, &s.desc.target, "target") {
        Ok(v) => v,
        Err(d) => return unverified(d),
    };
    let mut src: Option<Arc<dyn Volume>> = None;
    for &(g, crc) in grains {
        let Some(p) = s.map.grain_piece(g, g + 1) else {
            return unverified(format!("grain {g} is outside the session's extents"));
        };
        if !s.extent_live(p.extent) {
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
        if src.is_none() {
            match open_same(resolver, &s.desc.source, "source") {
                Ok(v) => src = Some(v),
                Err(d) => return unverified(format!("grain {g} differs on the target and {d}")),
            }
        }
        let Some(sv) = src.as_ref() else {
            continue;
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
    Ok(None)
}

/// The volume `r` names, when it is still that volume.
fn open_same(
    resolver: &dyn VolumeResolver,
    r: &VolumeRef,
    role: &str,
) -> std::result::Result<Arc<dyn Volume>, String> {
    match resolver.resolve(r) {
        Ok(Some(v)) => {
            let i = v.info();
            if i.id == r.id && i.generation == r.generation {
                Ok(v)
            } else {
                Err(format!("the {role} {} is another volume now", r.locator))
            }
        }
        Ok(None) => Err(format!("the {role} {} is missing", r.locator)),
        Err(e) => Err(format!("the {role} {}: {e}", r.locator)),
    }
}
