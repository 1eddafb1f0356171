//! Reverse restore: a session's source holds its image again, at once for the engine's clients
//! and in the background on the volume.
//!
//! The order that keeps it crash-consistent (docs/crash-model.md, guarantee 10):
//! 1. `Reverse` is committed with the writers of both volumes held out and no copy of the
//!    session in flight. Its restore map (the grains to move back) is a function of the
//!    session's durable state at that point of the journal, so replay rebuilds the same map.
//!    From that commit on, [`Engine::read`] of the source takes mapped grains from the target.
//! 2. A grain moves back under the session's restore lock: its image bytes are read from the
//!    target and written to the source *through the write path* (so every other session on
//!    the source copies its own T0 bytes first), the source is flushed, and only then is
//!    `Restored` committed and the grain's bit cleared. A crash before that commit leaves the
//!    bit set, and the grain is read from the target and moved again after recovery.
//! 3. A write to the source that covers a mapped grain moves that grain back first (2), then
//!    proceeds; so no write lands on a grain the restore will still overwrite.
//! 4. While the map is not empty, writes to the target through the engine are refused (the
//!    target is what the source is restored from), and so are withdraw, refresh, another
//!    reverse, and an establish on either volume.

use std::sync::Arc;

use super::{Engine, VolumeHandle, VolumeResolver};
use crate::ids::{GrainCount, GrainIndex, SessionId, VolumeId};
use crate::model::{Entry, SessionState};
use crate::session::Session;
use crate::{Error, Result};

#[cfg(feature = "fault")]
thread_local! {
    static CANARY_RESTORED_BEFORE_FLUSH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Fault-harness canary: while on, a reverse restore in the calling thread commits `Restored`
/// before it flushes the source (a crash between the two clears the bits of grains whose data
/// never reached the source; the enumerator's reverse check must catch it). Thread-local so
/// that parallel tests are not affected.
#[cfg(feature = "fault")]
pub fn set_canary_restored_before_flush(on: bool) {
    CANARY_RESTORED_BEFORE_FLUSH.with(|c| c.set(on));
}

thread_local! {
    /// The restore's data buffer, one per thread.
    static RESTORE_BUF: std::cell::RefCell<crate::volume::AlignedBuf> =
        std::cell::RefCell::new(crate::volume::AlignedBuf::new(0));
}

/// What [`Engine::reverse`] started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reversed {
    /// The session whose image its source holds again.
    pub session: SessionId,
    /// Grains to move back from the target (those that may differ from the image).
    pub grains_to_restore: GrainCount,
    /// The same in bytes.
    pub bytes_to_restore: u64,
}

impl Engine {
    /// Make the source of session `id` hold the session's image again (reverse restore).
    ///
    /// When this returns, the reverse is durable and the engine's clients of the source
    /// ([`Engine::read`], [`Engine::write`], the source's NBD export) see the image: grains
    /// not yet moved back are read from the target, and a write to one moves it back first.
    /// A [`crate::Copier`] (or [`Engine::restore_all`]) moves the rest in the background;
    /// until it has, the source *file* read by other programs is not yet the image. Only the
    /// grains that may differ move: for an active session the copied ones (every grain
    /// written since T0 was copied first), narrowed to those marked changed for an
    /// incremental session; for a completed one the grains marked changed, or every grain when
    /// changes were not recorded (its target is then restored as it is now: a completed
    /// session no longer holds it). Other sessions on the source keep their T0: the restore's
    /// writes go through copy-before-write for them. The session itself goes on as before
    /// (its image is unchanged); a crash at any point resumes the restore on the next open.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use timezero::MemStorage;
    /// # use timezero::prelude::*;
    /// # fn main() -> timezero::Result<()> {
    /// # let layout = TableOptions::default().layout()?;
    /// # let engine = Engine::create(Arc::new(MemStorage::new("t", layout.file_bytes())), EngineOptions::default())?;
    /// let src = engine.attach(Arc::new(MemVolume::with_data("src", &vec![1u8; 1 << 20])));
    /// let tgt = engine.attach(Arc::new(MemVolume::new("tgt", 1 << 20)));
    /// let id = engine.establish(&SessionSpec::whole(src, tgt))?;
    /// engine.write(src, 0, &[9u8; 4096])?; // after T0: the old grain is copied first
    /// let r = engine.reverse(id)?;
    /// assert_eq!(r.grains_to_restore, GrainCount(1));
    /// let mut b = vec![0u8; 4096];
    /// engine.read(src, 0, &mut b)?; // at once: the image's bytes
    /// assert_eq!(b, vec![1u8; 4096]);
    /// engine.restore_all(id)?; // now on the source volume itself
    /// assert_eq!(engine.session(id)?.restore_pending(), GrainCount(0));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownSession`]; [`Error::NotActive`] for a suspended or ended session;
    /// [`Error::Reversing`] when a reverse of it, or of another session sharing one of its
    /// volumes, is in progress; [`Error::UnknownVolume`] when a volume is not attached;
    /// [`Error::Invalid`] when source and target are one volume or the session has copies not
    /// yet proven durable (their target's flush failed; reopening the table proves them);
    /// [`Error::PoisonedIo`] when the target failed an earlier write or flush; table errors
    /// (the volumes are then fenced until the table is reopened: the reverse may or may not
    /// be durable).
    pub fn reverse(&self, id: SessionId) -> Result<Reversed> {
        let s = self.session(id)?;
        self.reverse_allowed(&s)?;
        // A completed session may no longer have its volumes attached: find them by path,
        // as recovery does, when they are still what the session recorded.
        for r in [&s.desc.source, &s.desc.target] {
            if self.handle(r.id).is_err() {
                let found = self.file_resolver().resolve(r)?;
                match found {
                    Some(v) if v.info().id == r.id && v.info().generation == r.generation => {
                        self.attach(v);
                    }
                    _ => return Err(Error::UnknownVolume(r.locator.clone())),
                }
            }
        }
        let mut vols = [s.desc.source.id, s.desc.target.id];
        vols.sort_unstable();
        let handles = vols
            .iter()
            .map(|v| self.handle(*v))
            .collect::<Result<Vec<_>>>()?;
        let _gates = super::hold_gates(&handles);
        // No write is held while a reverse runs (the write path holds none then).
        self.drain_gated(&handles)?;
        // Copies in flight on the session finish first: the map is taken from settled bits.
        let _grains = s.locks.lock(0, s.desc.grains());
        self.reverse_allowed(&s)?;
        if let Err(e) = self.table.commit(vec![Entry::Reverse { session: id }]) {
            // Durable or not, nobody knows: refuse writes to both volumes until recovery
            // decides, as after a failed establish.
            for h in &handles {
                h.fenced.store(true, std::sync::atomic::Ordering::Release);
            }
            return Err(e);
        }
        // Before the gates open: every writer that passes them sees the reverse.
        self.refresh_active();
        let n = s.restore_pending();
        Ok(Reversed {
            session: id,
            grains_to_restore: n,
            bytes_to_restore: n.bytes(s.desc.grain),
        })
    }

    /// Whether `s` may start a reverse restore now.
    fn reverse_allowed(&self, s: &Session) -> Result<()> {
        match s.state() {
            SessionState::Active | SessionState::Completed => {}
            SessionState::Suspended => return Err(super::suspended_error(s)),
            state => return Err(Error::NotActive { id: s.id(), state }),
        }
        if s.desc.source.id == s.desc.target.id {
            return Err(Error::invalid(
                "reverse",
                format!(
                    "{} is both the source and the target of {}",
                    s.desc.source.locator,
                    s.id()
                ),
            ));
        }
        // The restore reads the target, and once the reverse is durable recovery no longer
        // proves the session's recorded copies there: a target that latched a failure (a
        // failed flush may have lost bytes its page cache still shows) or copies still to be
        // proven (kept in the copy log since their target's flush failed) rule it out until
        // the table is opened again and recovery has proven them.
        if let Ok(t) = self.handle(s.desc.target.id) {
            t.check_live()?;
        }
        if !self.table.unverified_of(s.id()).is_empty() {
            return Err(Error::invalid(
                "reverse",
                format!(
                    "{} has copies on {} not yet proven durable (its flush failed); open the \
                     table again to prove them first",
                    s.id(),
                    s.desc.target.locator
                ),
            ));
        }
        let mine = [s.desc.source.id, s.desc.target.id];
        for o in self.table.sessions() {
            if o.reversing() && (o.id() == s.id() || shares_volume(&o, &mine)) {
                return Err(Error::Reversing {
                    id: o.id(),
                    pending: o.restore_pending().get(),
                    what: format!("a reverse restore of {}", s.id()),
                });
            }
        }
        Ok(())
    }

    /// Move back up to `max_grains` grains of session `id`'s reverse restore, starting the
    /// search at grain `from`, durably; returns the grain after the last one examined and how
    /// many moved (`None` when none is left from `from`). Grains another thread is moving are
    /// skipped.
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn restore_batch(
        &self,
        id: SessionId,
        from: GrainIndex,
        max_grains: GrainCount,
    ) -> Result<Option<(GrainIndex, GrainCount)>> {
        let s = self.session(id)?;
        let Some(p) = s.pending_bits() else {
            return Ok(None);
        };
        let Some(g) = p.next_set(from.get()) else {
            return Ok(None);
        };
        let (_, ext_end) = s
            .map
            .extent_of_grain(g)
            .ok_or_else(|| Error::invalid("grain", "outside extents"))?;
        let run = p.set_run(g, max_grains.get().min(ext_end - g)).max(1);
        let n = self.restore_grains(&s, g, g + run, false)?;
        if !s.reversing() {
            self.refresh_active();
        }
        Ok(Some((GrainIndex(g + run), n)))
    }

    /// Move back every grain of session `id`'s reverse restore in the calling thread; returns
    /// how many moved.
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn restore_all(&self, id: SessionId) -> Result<GrainCount> {
        let s = self.session(id)?;
        let batch = (crate::limits::COPY_BATCH_BYTES_MAX / s.desc.grain.bytes()).max(1);
        let mut total = GrainCount::ZERO;
        let mut from = GrainIndex::ZERO;
        while s.reversing() {
            match self.restore_batch(id, from, GrainCount(batch))? {
                Some((next, n)) => {
                    total += n;
                    from = next;
                }
                None => from = GrainIndex::ZERO,
            }
        }
        Ok(total)
    }

    /// Move back the mapped grains among `g0..g1` of `s` (image grains, within one extent or
    /// not): under the restore lock (waiting for it when `wait`, else skipping when it is
    /// taken), each run is read from the target and written to the source through the write
    /// path, the source is flushed, then `Restored` is committed. Returns grains moved.
    fn restore_grains(&self, s: &Arc<Session>, g0: u64, g1: u64, wait: bool) -> Result<GrainCount> {
        let _held = if wait {
            s.restore_locks.lock(g0, g1)
        } else {
            match s.restore_locks.try_lock(g0, g1) {
                Some(g) => g,
                None => return Ok(GrainCount::ZERO),
            }
        };
        let Some(p) = s.pending_bits() else {
            return Ok(GrainCount::ZERO);
        };
        let src = self.handle(s.desc.source.id)?;
        let tgt = self.handle(s.desc.target.id)?;
        let chunk = (crate::limits::COPY_BATCH_BYTES_MAX >> s.map.shift()).max(1);
        let mut entries = Vec::new();
        let mut moved = 0;
        let mut g = g0;
        while let Some(a) = p.next_set(g).filter(|a| *a < g1) {
            let (_, ext_end) = s
                .map
                .extent_of_grain(a)
                .ok_or_else(|| Error::invalid("grain", "outside extents"))?;
            let n = p.set_run(a, g1.min(ext_end).min(a + chunk) - a).max(1);
            let piece = s
                .map
                .grain_piece(a, a + n)
                .ok_or_else(|| Error::invalid("grain", "run crosses extents"))?;
            let len = usize::try_from(piece.len).map_err(|_| Error::invalid("restore", "len"))?;
            RESTORE_BUF.with(|b| {
                let mut b = b.borrow_mut();
                b.resize(len);
                tgt.read_retry(piece.target_offset, b.get_mut())?;
                self.write_as(s.desc.source.id, piece.source_offset, b.get(), Some(s.id()))
            })?;
            entries.push(Entry::Restored {
                session: s.id(),
                start: a,
                count: n,
            });
            moved += n;
            g = a + n;
        }
        if entries.is_empty() {
            return Ok(GrainCount::ZERO);
        }
        #[cfg(feature = "fault")]
        if CANARY_RESTORED_BEFORE_FLUSH.with(std::cell::Cell::get) {
            self.table.commit(entries)?;
            return src.flush().map(|()| GrainCount(moved));
        }
        // The grains' data is durable on the source before their bits clear.
        src.flush()?;
        self.table.commit(entries)?;
        Ok(GrainCount(moved))
    }

    /// Before a write of `len` bytes at `offset` of `vol`: move back the grains it covers of
    /// any reverse restore onto `vol` (waiting for a restore of them in progress).
    pub(super) fn restore_first(&self, vol: VolumeId, offset: u64, len: u64) -> Result<()> {
        let active = self.active.load();
        for s in active.iter() {
            if s.desc.source.id != vol {
                continue;
            }
            let Some(p) = s.pending_bits() else { continue };
            for piece in s.map.source_pieces(offset, len) {
                let (g0, g1) = s.map.grains_of(&piece);
                if p.count_set(g0, g1 - g0) > 0 {
                    self.restore_grains(s, g0, g1, true)?;
                }
            }
        }
        Ok(())
    }

    /// Under the gate of `vol`, for a write of `len` bytes at `offset`: `Ok(true)` when a
    /// reverse restore still maps a grain it covers (a reverse committed after
    /// [`Engine::restore_first`] looked: release the gate and move them back first),
    /// [`Error::Reversing`] when `vol` is the target a reverse restore reads from. The restore's
    /// own writes (`restoring`) pass.
    pub(super) fn reverse_blocks(
        &self,
        vol: VolumeId,
        offset: u64,
        len: u64,
        restoring: Option<SessionId>,
    ) -> Result<bool> {
        let active = self.active.load();
        for s in active.iter() {
            if Some(s.id()) == restoring {
                continue;
            }
            let Some(p) = s.pending_bits() else { continue };
            if s.desc.target.id == vol && s.map.target_pieces(offset, len).next().is_some() {
                return Err(Error::Reversing {
                    id: s.id(),
                    pending: s.restore_pending().get(),
                    what: format!("a write to its target {}", s.desc.target.locator),
                });
            }
            if s.desc.source.id == vol
                && s.map.source_pieces(offset, len).any(|piece| {
                    let (g0, g1) = s.map.grains_of(&piece);
                    p.count_set(g0, g1 - g0) > 0
                })
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`Engine::read`] while a reverse restore may be in progress: the grains of `buf` that a
    /// reverse onto this volume still maps are read from its target. The map is looked at
    /// before the volume is read: a bit only clears after its grain is durable on the source,
    /// so a grain found clear is read from the source, one found set from the target (which
    /// no one writes while the reverse runs).
    pub(super) fn read_restoring(
        &self,
        h: &VolumeHandle,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let vol = h.info.id;
        let len = buf.len() as u64;
        let active = self.active.load();
        let mut from_target: Vec<(Arc<VolumeHandle>, u64, u64, u64)> = Vec::new();
        for s in active.iter() {
            if s.desc.source.id != vol {
                continue;
            }
            let Some(p) = s.pending_bits() else { continue };
            let mut tgt = None;
            let shift = s.map.shift();
            for piece in s.map.source_pieces(offset, len) {
                let (g0, g1) = s.map.grains_of(&piece);
                let mut g = g0;
                while let Some(a) = p.next_set(g).filter(|a| *a < g1) {
                    let n = p.set_run(a, g1 - a);
                    // The bytes of grains a..a+n inside this piece, in image coordinates.
                    let lo = (a << shift).max(piece.image_offset);
                    let hi = ((a + n) << shift).min(piece.image_offset + piece.len);
                    let t = match &tgt {
                        Some(t) => Arc::clone(t),
                        None => {
                            let t = self.handle(s.desc.target.id)?;
                            tgt = Some(Arc::clone(&t));
                            t
                        }
                    };
                    let at = piece.source_offset + (lo - piece.image_offset) - offset;
                    from_target.push((
                        t,
                        piece.target_offset + (lo - piece.image_offset),
                        at,
                        hi - lo,
                    ));
                    g = a + n;
                }
            }
        }
        h.read_retry(offset, buf)?;
        for (t, toff, at, n) in from_target {
            let (at, n) = (
                usize::try_from(at).map_err(|_| Error::invalid("read", "offset"))?,
                usize::try_from(n).map_err(|_| Error::invalid("read", "len"))?,
            );
            t.read_retry(toff, &mut buf[at..at + n])?;
        }
        Ok(())
    }
}

/// Whether session `o` uses one of `vols` as its source or target.
fn shares_volume(o: &Session, vols: &[VolumeId]) -> bool {
    vols.contains(&o.desc.source.id) || vols.contains(&o.desc.target.id)
}
