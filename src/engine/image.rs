//! Reading a session's image: [`Image`] and the lock-free read with its re-check.

use std::sync::Arc;

use crate::model::{SessionState, VolumeRef};

use super::{not_usable, suspended_error, Engine, VolumeHandle};
use crate::ids::SessionId;
use crate::session::{Piece, Session};
use crate::volume::check_range;
use crate::{Error, Result};

/// An open session image (from [`Engine::image`]). Holds the session and its volume handles,
/// so a read costs no lookup; when a volume was attached or replaced since it was opened (a
/// reset), a read resolves the volumes again first. [`Engine::image`] has an example.
pub struct Image<'e> {
    engine: &'e Engine,
    session: Arc<Session>,
    src: Arc<VolumeHandle>,
    tgt: Arc<VolumeHandle>,
    epoch: u64,
}

impl std::fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("session", &self.session.id())
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Image<'_> {
    /// The session.
    #[must_use]
    pub fn id(&self) -> SessionId {
        self.session.id()
    }

    /// Read the image at `offset`, exactly as [`Engine::read_image`] does.
    ///
    /// # Errors
    /// As [`Engine::read_image`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let e = self.engine;
        if e.volumes_epoch.load(std::sync::atomic::Ordering::Acquire) != self.epoch {
            return e.image(self.session.id())?.read_now(offset, buf);
        }
        self.read_now(offset, buf)
    }

    /// Read with the handles resolved when this image was opened: lock-free first, then, if a
    /// copy-before-write raced the read, again under the grain locks.
    #[inline(always)]
    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let e = self.engine;
        let s = &self.session;
        let state = s.state();
        if !matches!(state, SessionState::Active | SessionState::Completed) {
            return Err(not_usable(s));
        }
        check_range(offset, buf.len() as u64, s.map.image_len(), "session image")?;
        let completed = state == SessionState::Completed;
        if !completed && self.src.info.id != s.desc.source.id {
            // The source was not attached when the image was opened.
            return Err(Error::UnknownVolume(s.desc.source.locator.clone()));
        }
        if let Some(p) = s.map.within_one_grain(offset, buf.len() as u64) {
            // A read within one grain (most small reads): the general path below, specialised.
            if s.extent_end(p.extent).is_none() {
                let g = p.image_offset >> s.map.shift();
                if completed || s.bits().get(g) {
                    return self.tgt.read_retry(p.target_offset, buf);
                }
                self.src.read_retry(p.source_offset, buf)?;
                // As in `Engine::read_piece`: the source bytes were read before the bit, the
                // extent end and the state are loaded again.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                if !s.bits().get(g)
                    && s.extent_end(p.extent).is_none()
                    && s.state() == SessionState::Active
                {
                    return Ok(());
                }
            }
        } else if e.read_pieces(s, &self.src, &self.tgt, completed, offset, buf, false)? {
            return Ok(());
        }
        e.read_pieces(s, &self.src, &self.tgt, completed, offset, buf, true)
            .map(|_| ())
    }
}

impl Engine {
    /// Read the image of a session at `offset` (image coordinates: its extents end to end).
    ///
    /// # Errors
    /// [`Error::NotActive`] for withdrawn or terminated sessions, [`Error::Suspended`] for
    /// suspended ones, [`Error::ExtentTerminated`],
    /// [`Error::OutOfRange`], I/O errors.
    pub fn read_image(&self, id: SessionId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.image(id)?.read_now(offset, buf)
    }

    /// Open a session's image for repeated reads: [`Image::read_at`] reads like
    /// [`Engine::read_image`] without looking the session and its volumes up on every call.
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`], [`Error::UnknownVolume`],
    /// [`Error::Suspended`].
    ///
    /// # Example
    ///
    /// Open the image once and read it at several offsets: grains the source has rewritten
    /// since T0 and grains it has not both read as T0.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use timezero::MemStorage;
    /// use timezero::prelude::*;
    ///
    /// # fn main() -> timezero::Result<()> {
    /// let layout = TableOptions::default().layout()?;
    /// let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
    /// let engine = Engine::create(table, EngineOptions::default())?;
    /// // Each 64 KiB of the source holds its own index.
    /// let data: Vec<u8> = (0..1u32 << 20).map(|i| (i >> 16) as u8).collect();
    /// let source = engine.attach(Arc::new(MemVolume::with_data("src", &data)));
    /// let target = engine.attach(Arc::new(MemVolume::new("tgt", 1 << 20)));
    /// let session = engine.establish(&SessionSpec::whole(source, target))?;
    /// engine.write(source, 3 << 16, &[0xff; 4096])?;
    ///
    /// let image = engine.image(session)?;
    /// assert_eq!(image.id(), session);
    /// let mut buf = [0u8; 512];
    /// for grain in [0u64, 3, 15] {
    ///     image.read_at(grain << 16, &mut buf)?;
    ///     assert_eq!(buf, [grain as u8; 512]);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn image(&self, id: SessionId) -> Result<Image<'_>> {
        let session = self.session(id)?;
        let state = session.state();
        if state == SessionState::Suspended {
            return Err(suspended_error(&session));
        }
        if !matches!(state, SessionState::Active | SessionState::Completed) {
            return Err(Error::NotActive { id, state });
        }
        // The epoch before the map (see `Engine::attach`).
        let epoch = self
            .volumes_epoch
            .load(std::sync::atomic::Ordering::Acquire);
        let vols = self.volumes.load();
        let get = |v: &VolumeRef| {
            vols.get(&v.id)
                .cloned()
                .ok_or_else(|| Error::UnknownVolume(v.locator.clone()))
        };
        let tgt = get(&session.desc.target)?;
        // A completed session reads only its target: its source may be gone.
        let src = get(&session.desc.source).unwrap_or_else(|_| Arc::clone(&tgt));
        drop(vols);
        Ok(Image {
            engine: self,
            session,
            src,
            tgt,
            epoch,
        })
    }

    /// Read the image range `offset..offset+buf.len()` piece by piece. Copied pieces come from
    /// the target without a lock (copied grains never go back to uncopied). For the others:
    /// without `locked`, read lock-free and return false as soon as a piece may have changed
    /// under the read; with `locked`, hold the piece's grain lock while reading it.
    #[allow(
        clippy::too_many_arguments,
        reason = "one private helper of read_image"
    )]
    fn read_pieces(
        &self,
        s: &Session,
        src: &VolumeHandle,
        tgt: &VolumeHandle,
        completed: bool,
        offset: u64,
        buf: &mut [u8],
        locked: bool,
    ) -> Result<bool> {
        let id = s.id();
        for p in s.map.image_pieces(offset, buf.len() as u64) {
            if let Some(r) = s.extent_end(p.extent) {
                return Err(Error::ExtentTerminated {
                    id,
                    extent: p.extent as u32,
                    reason: r.clone(),
                });
            }
            let bo = usize::try_from(p.image_offset - offset)
                .map_err(|_| Error::invalid("read", "offset"))?;
            let bl = usize::try_from(p.len).map_err(|_| Error::invalid("read", "len"))?;
            let out = &mut buf[bo..bo + bl];
            let (g0, g1) = s.map.grains_of(&p);
            if completed || s.bits().all_set(g0, g1 - g0) {
                tgt.read_retry(p.target_offset, out)?;
                continue;
            }
            // A source write is released only after its grains' bits are set in memory (or,
            // for an ended extent or session, after the end is recorded), so bits still clear
            // and the extent still live after a lock-free read mean the source bytes read were
            // T0 bytes.
            if locked {
                let _g = s.locks.lock(g0, g1);
                self.read_piece(s, &p, out, src, tgt, true)?;
            } else if !self.read_piece(s, &p, out, src, tgt, false)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Read one image piece grain run by grain run (copied runs from the target, the others
    /// from the source). Without `locked`, returns false when a run read from the source may
    /// have changed under the read (its grains got copied, or the extent or session ended).
    fn read_piece(
        &self,
        s: &Session,
        p: &Piece,
        out: &mut [u8],
        src: &VolumeHandle,
        tgt: &VolumeHandle,
        locked: bool,
    ) -> Result<bool> {
        let (g0, g1) = s.map.grains_of(p);
        let gb = s.map.grain_bytes();
        let mut from_source = false;
        let mut copied_seen = 0u64;
        let mut g = g0;
        while g < g1 {
            let copied = s.bits().get(g);
            let start = g;
            while g < g1 && s.bits().get(g) == copied {
                g += 1;
            }
            let lo = (start * gb).max(p.image_offset);
            let hi = (g * gb).min(p.image_offset + p.len);
            let o = usize::try_from(lo - p.image_offset)
                .map_err(|_| Error::invalid("read", "offset"))?;
            let l = usize::try_from(hi - lo).map_err(|_| Error::invalid("read", "len"))?;
            let delta = lo - p.image_offset;
            if copied {
                copied_seen += g - start;
                tgt.read_retry(p.target_offset + delta, &mut out[o..o + l])?;
            } else {
                src.read_retry(p.source_offset + delta, &mut out[o..o + l])?;
                from_source = true;
            }
        }
        if !from_source {
            return Ok(true);
        }
        // The reader half of a sequence lock, paired with the release fence before every source
        // write in `Engine::write`: the source bytes above were read before the bits, extent
        // end and state below are loaded.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        if let Some(r) = s.extent_end(p.extent) {
            // Source writes to an ended extent skip copy-before-write (even under the lock).
            if locked {
                return Err(Error::ExtentTerminated {
                    id: s.id(),
                    extent: p.extent as u32,
                    reason: r.clone(),
                });
            }
            return Ok(false);
        }
        let state = s.state();
        if state != SessionState::Active {
            // Withdrawn, terminated or suspended during the read: its source writes no longer
            // copy first (or are refused).
            if locked {
                return Err(not_usable(s));
            }
            return Ok(false);
        }
        // Bits only go from clear to set: as many set now as were found set above means that
        // no grain read from the source was copied meanwhile. (Under the lock no copy can
        // happen.)
        Ok(locked || s.bits().count_set(g0, g1 - g0) == copied_seen)
    }
}
