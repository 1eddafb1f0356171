//! The background copy's primitives: copy a run of uncopied grains and keep it held
//! ([`Engine::copy_data`]), make it durable and record it ([`Engine::commit_copied`]).

use crate::model::Entry;

use super::lifecycle::live_extents_copied;
use super::{Engine, VolumeHandle};
use crate::ids::{GrainCount, GrainIndex, SessionId};
use crate::session::GrainHold;
use crate::volume::Volume;
use crate::{Error, Result};
use std::sync::Arc;

thread_local! {
    /// The background copy's data buffer, one per thread (see [`Engine::copy_data`]).
    static COPY_BUF: std::cell::RefCell<crate::volume::AlignedBuf> =
        std::cell::RefCell::new(crate::volume::AlignedBuf::new(0));
}

impl Engine {
    /// Copy up to `max_grains` uncopied grains of a session starting the search at grain
    /// `from`, make them durable and commit their bits; returns the grain after the last one
    /// examined and how many grains were copied (`None` when none is left from `from`). Grains
    /// locked by a writer are skipped (the writer copies them).
    ///
    /// The grains need not be adjacent: scattered uncopied grains (those a refresh left, say)
    /// are gathered up to `max_grains` and share one target flush and one table commit.
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn copy_batch(
        &self,
        id: SessionId,
        from: GrainIndex,
        max_grains: GrainCount,
    ) -> Result<Option<(GrainIndex, GrainCount)>> {
        let mut holds = Vec::new();
        let mut copied = 0;
        let mut next = from;
        while copied < max_grains.get() {
            match self.copy_data(id, next, GrainCount(max_grains.get() - copied)) {
                Ok(None) => break,
                Ok(Some((after, hold))) => {
                    if let Some(h) = hold {
                        copied += h.count().get();
                        holds.push(h);
                    }
                    next = after;
                }
                // What was copied so far is still committed; the error is reported after.
                Err(e) if !holds.is_empty() => {
                    self.commit_copied(id, holds)?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        if next == from {
            return Ok(None);
        }
        self.commit_copied(id, holds)?;
        Ok(Some((next, GrainCount(copied))))
    }

    /// The data half of [`Engine::copy_batch`]: copy up to `max_grains` uncopied grains to the
    /// target and return them *still held*, without making them durable or recording them. The
    /// caller passes the holds to [`Engine::commit_copied`] (many at once, to share one flush
    /// and one commit). Holding the grains until their bits are durable is what keeps a source
    /// writer from changing them while a copy of them is in flight (see
    /// [`GrainHold`]). A hold dropped without a commit is simply copied again later.
    ///
    /// # Errors
    /// I/O errors.
    pub fn copy_data(
        &self,
        id: SessionId,
        from: GrainIndex,
        max_grains: GrainCount,
    ) -> Result<Option<(GrainIndex, Option<GrainHold>)>> {
        let Some((next, run)) = self.plan_copy(id, from, max_grains)? else {
            return Ok(None);
        };
        let Some(run) = run else {
            return Ok(Some((next, None)));
        };
        if self.offload(&run) {
            return Ok(Some((next, Some(run.hold))));
        }
        COPY_BUF.with(|b| {
            // One aligned buffer per copying thread, reused: no allocation per batch, and no
            // bounce copy for O_DIRECT volumes.
            let mut b = b.borrow_mut();
            b.resize(run.len);
            run.src.read_retry(run.source_offset, b.get_mut())?;
            run.tgt.write_retry(run.target_offset, b.get())
        })?;
        Ok(Some((next, Some(run.hold))))
    }

    /// Copy a planned run inside the kernel ([`crate::Volume::copy_from`]) where the options
    /// allow it and the volumes can; false when the run must be copied through memory. A
    /// failed kernel copy is false too: the copy through memory then rewrites the whole run,
    /// and reports (and latches) the failure on the side it belongs to.
    pub(crate) fn offload(&self, run: &CopyRun) -> bool {
        self.options.copy_offload
            && matches!(
                run.tgt.vol.copy_from(
                    &run.src.vol,
                    run.source_offset,
                    run.target_offset,
                    run.len as u64
                ),
                Ok(true)
            )
    }

    /// The choice half of [`Engine::copy_data`]: find up to `max_grains` uncopied grains from
    /// `from`, hold them, and say where their bytes are on the source and go on the target,
    /// without moving any; the caller copies them (several runs at once, say) and then passes
    /// the holds to [`Engine::commit_copied`]. Returns as [`Engine::copy_data`] does.
    pub(crate) fn plan_copy(
        &self,
        id: SessionId,
        from: GrainIndex,
        max_grains: GrainCount,
    ) -> Result<Option<(GrainIndex, Option<CopyRun>)>> {
        let (from, max_grains) = (from.get(), max_grains.get());
        let s = self.session(id)?;
        if !s.is_active() {
            return Ok(None);
        }
        let Some(g) = s.bits().next_clear(from) else {
            return Ok(None);
        };
        let (ext, ext_end) = s
            .map
            .extent_of_grain(g)
            .ok_or_else(|| Error::invalid("grain", "outside extents"))?;
        if !s.extent_live(ext) {
            return Ok(Some((GrainIndex(ext_end), None)));
        }
        let run = s.bits().clear_run(g, max_grains.min(ext_end - g)).max(1);
        let Some(hold) = s.try_hold(g, g + run) else {
            return Ok(Some((GrainIndex(g + 1), None)));
        };
        let src = self.handle(s.desc.source.id)?;
        // Re-check under the hold: bits set before we took it shrink the run to the uncopied
        // prefix; none can be set while we hold it. Grains a held write already copied
        // (write-back mode) are not copied again: their drain commits them. Pending grains are
        // looked at before the bits (a drain sets a grain's bit before it stops being pending,
        // and only then writes the new bytes to the source): in this order a grain seen
        // neither pending nor copied still has its T0 bytes on the source.
        let pending = if src.held.is_empty() {
            run
        } else {
            src.held
                .pending_in(s.id(), g, g + run)
                .iter()
                .take_while(|p| !**p)
                .count() as u64
        };
        super::pause::pause(super::pause::PausePoint::Copier);
        let clear = s.bits().clear_run(g, run);
        if clear > 0 && pending == 0 {
            // The first grain waits for a held write's drain: drain now (the writes were only
            // ever promised durable at the next flush, so sooner is allowed), and come back to
            // the grain, then copied.
            drop(hold);
            self.drain(&src)?;
            return Ok(Some((GrainIndex(g), None)));
        }
        let uncopied = clear.min(pending);
        if uncopied == 0 {
            return Ok(Some((GrainIndex(g + 1), None)));
        }
        let (run, hold) = if uncopied == run {
            (run, hold)
        } else {
            // The hold must cover exactly the grains whose bits will be committed.
            drop(hold);
            match s.try_hold(g, g + uncopied) {
                // Pending first, then bits, as above.
                Some(h)
                    if !src.held.any_pending_in(s.id(), g, g + uncopied)
                        && s.bits().clear_run(g, uncopied) == uncopied =>
                {
                    (uncopied, h)
                }
                _ => return Ok(Some((GrainIndex(g + 1), None))),
            }
        };
        let p = s
            .map
            .grain_piece(g, g + run)
            .ok_or_else(|| Error::invalid("grain", "run crosses extents"))?;
        let tgt = self.handle(s.desc.target.id)?;
        let len = usize::try_from(p.len).map_err(|_| Error::invalid("copy", "len"))?;
        Ok(Some((
            GrainIndex(g + run),
            Some(CopyRun {
                hold,
                src,
                tgt,
                source_offset: p.source_offset,
                target_offset: p.target_offset,
                len,
            }),
        )))
    }

    /// Make the target of a session durable, then record the grains that
    /// [`Engine::copy_data`] copied (rule 3: bits only after their data), then release them.
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn commit_copied(&self, id: SessionId, holds: Vec<GrainHold>) -> Result<()> {
        if holds.is_empty() {
            return Ok(());
        }
        let s = self.session(id)?;
        self.handle(s.desc.target.id)?.flush()?;
        let entries = holds
            .iter()
            .map(|h| {
                let (start, _) = h.range();
                Entry::SetBits {
                    session: id,
                    start: start.get(),
                    count: h.count().get(),
                }
            })
            .collect();
        self.table.commit(entries)?;
        drop(holds);
        Ok(())
    }

    /// Run the background copy of one session to the end in the calling thread, and complete
    /// the session when every live grain is copied. Returns grains copied.
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn copy_all(&self, id: SessionId, batch_grains: GrainCount) -> Result<GrainCount> {
        self.copy_all_with(id, batch_grains, |_| std::ops::ControlFlow::Continue(()))
    }

    /// As [`Engine::copy_all`], calling `progress` after every batch with the session's copied
    /// and total grains; when it returns [`std::ops::ControlFlow::Break`] the copy stops there
    /// (everything copied so far is durable and recorded; a later copy goes on from it).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::ops::ControlFlow;
    /// # use timezero::MemStorage;
    /// # use timezero::prelude::*;
    /// # fn main() -> timezero::Result<()> {
    /// # let layout = TableOptions::default().layout()?;
    /// # let engine = Engine::create(Arc::new(MemStorage::new("t", layout.file_bytes())), EngineOptions::default())?;
    /// # let src = engine.attach(Arc::new(MemVolume::with_data("src", &vec![3u8; 1 << 20])));
    /// # let tgt = engine.attach(Arc::new(MemVolume::new("tgt", 1 << 20)));
    /// let id = engine.establish(&SessionSpec::whole(src, tgt))?; // 16 grains of 64 KiB
    /// let mut seen = Vec::new();
    /// let batch = GrainCount(4);
    /// let r = engine.copy_all_with(id, batch, |p| {
    ///     seen.push(p.grains_copied.get());
    ///     if p.grains_copied >= GrainCount(8) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    /// });
    /// assert!(matches!(r, Err(Error::Interrupted(_))));
    /// assert_eq!(seen, [4, 8]);
    /// assert_eq!(engine.copy_all(id, batch)?, GrainCount(8)); // the rest; the session completes
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// I/O and table errors; [`Error::Interrupted`] when `progress` stopped it.
    pub fn copy_all_with(
        &self,
        id: SessionId,
        batch_grains: GrainCount,
        mut progress: impl FnMut(CopyProgress) -> std::ops::ControlFlow<()>,
    ) -> Result<GrainCount> {
        let mut total = GrainCount::ZERO;
        let mut from = GrainIndex::ZERO;
        loop {
            match self.copy_batch(id, from, batch_grains)? {
                Some((next, n)) => {
                    total += n;
                    from = next;
                    let s = self.session(id)?;
                    let p = CopyProgress {
                        grains_copied: s.copied(),
                        grains_total: GrainCount(s.desc.grains()),
                    };
                    if progress(p).is_break() {
                        return Err(Error::Interrupted(format!(
                            "copy of session {id} stopped at {} of {}",
                            p.grains_copied.get(),
                            p.grains_total
                        )));
                    }
                }
                None if from == GrainIndex::ZERO => break,
                // Grains of ended extents stay uncopied for good: stop once every live
                // extent is copied instead of wrapping forever.
                None if live_extents_copied(&*self.session(id)?) => break,
                None => from = GrainIndex::ZERO,
            }
        }
        self.complete_if_done(id)?;
        Ok(total)
    }
}

/// A run of held, uncopied grains of a session and where its bytes are (see
/// [`Engine::plan_copy`]): `len` bytes from `source_offset` of the source go to
/// `target_offset` of the target, and `hold` is committed once they are there.
pub(crate) struct CopyRun {
    /// The grains, held until their bits are committed (or the hold is dropped).
    pub(crate) hold: GrainHold,
    /// The session's source.
    pub(crate) src: Arc<VolumeHandle>,
    /// The session's target.
    pub(crate) tgt: Arc<VolumeHandle>,
    /// Where the run's bytes start on the source.
    pub(crate) source_offset: u64,
    /// Where they go on the target.
    pub(crate) target_offset: u64,
    /// Their length in bytes.
    pub(crate) len: usize,
}

/// How far [`Engine::copy_all_with`] has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyProgress {
    /// The session's copied grains (durable).
    pub grains_copied: GrainCount,
    /// The session's grains in total.
    pub grains_total: GrainCount,
}
