//! Session lifecycle: what to establish ([`SessionSpec`]), establishing it (validation, the
//! write gate, one commit), withdrawing, converting no-copy to copy, terminating and completing.

use std::sync::Arc;

use super::{not_usable, Engine, VolumeHandle};
use crate::ids::{GrainSize, SessionId, VolumeId};
use crate::model::{
    CopyMode, Entry, ExtentSpec, Reason, ReasonCode, SessionDesc, SessionState, VolumeRef,
};
use crate::session::Session;
use crate::volume::{check_range, VolumeInfo};
use crate::{Error, Result};

/// What to establish.
///
/// # Example
///
/// [`SessionSpec::whole`] copies the whole source with the default grain; the struct-update
/// form changes what differs from it.
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
/// let source = engine.attach(Arc::new(MemVolume::new("src", 1 << 20)));
/// let target = engine.attach(Arc::new(MemVolume::new("tgt", 1 << 20)));
///
/// let whole = SessionSpec::whole(source, target);
/// assert!(whole.extents.is_empty()); // the whole source, same offsets in the target
/// assert_eq!((whole.grain, whole.mode), (GrainSize::DEFAULT, CopyMode::Copy));
///
/// let spec = SessionSpec { grain: GrainSize::new(16 << 10)?, mode: CopyMode::NoCopy, ..whole };
/// let id = engine.establish(&spec)?;
/// let status = engine.status();
/// assert_eq!((status[0].id, status[0].grain_bytes), (id, 16 << 10));
/// assert_eq!(status[0].grains_total, GrainCount((1 << 20) / (16 << 10)));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Source volume (attached).
    pub source: VolumeId,
    /// Target volume (attached).
    pub target: VolumeId,
    /// Extents; empty means the whole source at the same offsets in the target.
    pub extents: Vec<ExtentSpec>,
    /// Grain. Default = 64 KiB.
    pub grain: GrainSize,
    /// Mode.
    pub mode: CopyMode,
    /// Record the grains that change after T0 (copy mode only), so that
    /// [`Engine::refresh`] later takes a new T0 and copies only those. Default = off.
    pub incremental: bool,
}

impl SessionSpec {
    /// A whole-volume copy session with the default grain.
    #[must_use]
    pub fn whole(source: VolumeId, target: VolumeId) -> Self {
        SessionSpec {
            source,
            target,
            extents: Vec::new(),
            grain: GrainSize::DEFAULT,
            mode: CopyMode::Copy,
            incremental: false,
        }
    }
}

impl Engine {
    /// Establish a session: from the moment this returns, its image reads as the source did.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::TargetTooSmall`],
    /// [`Error::TargetInUse`], [`Error::Overlap`], [`Error::ExtentsOverlap`],
    /// [`Error::UnknownVolume`], [`Error::NotAVolume`] (the table's own file), table errors.
    ///
    /// # Example
    ///
    /// A no-copy session of the source's second 256 KiB, placed at the start of a smaller
    /// target: only first writes inside the extent copy old bytes to the target.
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
    /// let source = engine.attach(Arc::new(MemVolume::with_data("src", &[7u8; 1 << 20])));
    /// let tgt = Arc::new(MemVolume::new("tgt", 256 << 10));
    /// let target = engine.attach(tgt.clone());
    /// let extent = ExtentSpec { source_offset: 256 << 10, target_offset: 0, len: 256 << 10 };
    /// let spec = SessionSpec {
    ///     extents: vec![extent],
    ///     mode: CopyMode::NoCopy,
    ///     ..SessionSpec::whole(source, target)
    /// };
    /// let session = engine.establish(&spec)?;
    ///
    /// engine.write(source, 0, &[1u8; 4096])?; // outside the extent: the target is untouched
    /// assert!(tgt.snapshot().iter().all(|&b| b == 0));
    /// engine.write(source, 256 << 10, &[2u8; 4096])?; // inside: its grain is copied first
    /// assert!(tgt.snapshot()[..64 << 10].iter().all(|&b| b == 7));
    /// let mut image = [0u8; 4096];
    /// engine.read_image(session, 0, &mut image)?; // image offset 0 = source offset 256 KiB
    /// assert_eq!(image, [7u8; 4096]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn establish(&self, spec: &SessionSpec) -> Result<SessionId> {
        let Pair { src, tgt, extents } = self.session_pair(spec)?;
        let id = self.table.allocate_session_id();
        let desc = SessionDesc {
            id,
            mode: spec.mode,
            grain: spec.grain,
            source: VolumeRef::from(&src.info),
            target: VolumeRef::from(&tgt.info),
            extents,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
                .unwrap_or(0),
            group: None,
            incremental: spec.incremental,
        };
        // Held until the commit below: no other establish takes the same room.
        let _room = self.table.make_room(&desc)?;
        // T0: drain writers of both volumes (in id order), make the source durable, commit.
        let (a, b) = if src.info.id <= tgt.info.id {
            (&src, &tgt)
        } else {
            (&tgt, &src)
        };
        let _ga = a
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _gb = (a.info.id != b.info.id).then(|| {
            b.gate
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        // Re-validate against sessions established while we waited.
        self.validate(&src.info, &tgt.info, spec.grain, &desc.extents)?;
        // Every acknowledged write is in T0: writes held in write-back mode reach the volumes.
        self.drain_locked(a)?;
        if a.info.id != b.info.id {
            self.drain_locked(b)?;
        }
        src.flush()?;
        if let Err(e) = self.table.commit(vec![Entry::Establish(desc)]) {
            // The entry may have reached the table (a failed durability point says nothing
            // either way): recovery may resume the session, so neither its source (which would
            // change without copy-before-write) nor its target (whose writes the resumed
            // session's copier would overwrite, and its image would not show) may change.
            // Refuse writes to both until the table is reopened and recovery decides.
            src.fenced.store(true, std::sync::atomic::Ordering::Release);
            tgt.fenced.store(true, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        self.refresh_active();
        Ok(id)
    }

    pub(super) fn validate(
        &self,
        src: &VolumeInfo,
        tgt: &VolumeInfo,
        grain: GrainSize,
        extents: &[ExtentSpec],
    ) -> Result<()> {
        let g = grain.bytes();
        if extents.is_empty() || extents.len() > crate::limits::EXTENTS_PER_SESSION_MAX {
            return Err(Error::invalid(
                "extents",
                format!(
                    "{} extents (1 to {} allowed)",
                    extents.len(),
                    crate::limits::EXTENTS_PER_SESSION_MAX
                ),
            ));
        }
        let align = g
            .max(u64::from(src.sector_size))
            .max(u64::from(tgt.sector_size));
        for e in extents {
            for off in [e.source_offset, e.target_offset] {
                if off % align != 0 || e.len % align != 0 || e.len == 0 {
                    return Err(Error::Misaligned {
                        offset: off,
                        len: e.len,
                        align,
                    });
                }
            }
            check_range(e.source_offset, e.len, src.size, "source volume")?;
        }
        if let Some(e) = extents
            .iter()
            .find(|e| e.target_offset.saturating_add(e.len) > tgt.size)
        {
            return Err(Error::TargetTooSmall {
                target: tgt.locator.clone(),
                offset: e.target_offset,
                len: e.len,
                size: tgt.size,
            });
        }
        validate_within(src, tgt, extents)?;
        self.validate_against_active(src, tgt, extents)
    }

    /// Against the other active sessions: targets are exclusive, and no range is both a source
    /// and a target.
    fn validate_against_active(
        &self,
        src: &VolumeInfo,
        tgt: &VolumeInfo,
        extents: &[ExtentSpec],
    ) -> Result<()> {
        for s in self.active.load().iter() {
            let shared = [src.id, tgt.id];
            if s.reversing()
                && (shared.contains(&s.desc.source.id) || shared.contains(&s.desc.target.id))
            {
                return Err(Error::Reversing {
                    id: s.id(),
                    pending: s.restore_pending().get(),
                    what: "an establish on its volumes".to_string(),
                });
            }
            for o in &s.desc.extents {
                for e in extents {
                    if s.desc.target.id == tgt.id
                        && overlaps(o.target_offset, o.len, e.target_offset, e.len)
                    {
                        return Err(Error::TargetInUse {
                            volume: tgt.locator.clone(),
                            offset: e.target_offset,
                            len: e.len,
                            other: s.id(),
                        });
                    }
                    if s.desc.source.id == tgt.id
                        && overlaps(o.source_offset, o.len, e.target_offset, e.len)
                    {
                        return Err(Error::Overlap {
                            volume: tgt.locator.clone(),
                            offset: e.target_offset,
                            len: e.len,
                        });
                    }
                    if s.desc.target.id == src.id
                        && overlaps(o.target_offset, o.len, e.source_offset, e.len)
                    {
                        return Err(Error::Overlap {
                            volume: src.locator.clone(),
                            offset: e.source_offset,
                            len: e.len,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The handles and extents of a session's source and target (whole volumes when the spec
    /// names no extents), validated alone and against live sessions.
    pub(super) fn session_pair(&self, spec: &SessionSpec) -> Result<Pair> {
        if spec.incremental && spec.mode != CopyMode::Copy {
            return Err(Error::invalid(
                "establish",
                "an incremental session records changes for a refresh of its copy: it needs \
                 copy mode, not no-copy",
            ));
        }
        let src = self.handle(spec.source)?;
        let tgt = self.handle(spec.target)?;
        self.refuse_table_file(&src.info)?;
        self.refuse_table_file(&tgt.info)?;
        let g = spec.grain.bytes();
        let extents = if spec.extents.is_empty() {
            let len = src.info.size - src.info.size % g;
            if len == 0 {
                return Err(Error::OutOfRange {
                    offset: 0,
                    len: g,
                    what: "source volume",
                    size: src.info.size,
                });
            }
            vec![ExtentSpec {
                source_offset: 0,
                target_offset: 0,
                len,
            }]
        } else {
            spec.extents.clone()
        };
        self.validate(&src.info, &tgt.info, spec.grain, &extents)?;
        Ok(Pair { src, tgt, extents })
    }

    /// End a session at the user's request. A completed incremental session stops recording
    /// changes (it can no longer be refreshed, and may be forgotten).
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`], table errors.
    pub fn withdraw(&self, id: SessionId) -> Result<()> {
        let s = self.session(id)?;
        if !s.holds_volumes() {
            return Err(Error::NotActive {
                id,
                state: s.status().state,
            });
        }
        // With the writers of its volumes held out, as a reverse restore starts: a reverse
        // and a withdraw of one session never cross.
        let handles = self.handles_of(&[&s]);
        let _gates = super::hold_gates(&handles);
        refuse_reversing(&s, "a withdraw")?;
        self.table.commit(vec![Entry::SetState {
            session: id,
            state: SessionState::Withdrawn,
            reason: Some(Reason::new(ReasonCode::Withdrawn, "withdrawn by request")),
        }])?;
        self.refresh_active();
        Ok(())
    }

    /// Ok when the session is active; else the error a use of it gets: [`Error::Suspended`]
    /// (naming the unavailable volume) or [`Error::NotActive`].
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::Suspended`], [`Error::NotActive`].
    pub fn check_active(&self, id: SessionId) -> Result<()> {
        let s = self.session(id)?;
        if s.is_active() {
            return Ok(());
        }
        Err(not_usable(&s))
    }

    /// Convert a no-copy session to copy mode (the background copier then fills the target).
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`], table errors.
    pub fn convert_to_copy(&self, id: SessionId) -> Result<()> {
        let s = self.session(id)?;
        if !s.is_live() {
            return Err(Error::NotActive {
                id,
                state: s.status().state,
            });
        }
        if s.status().mode == CopyMode::Copy {
            return Ok(());
        }
        self.table.commit(vec![Entry::SetMode {
            session: id,
            mode: CopyMode::Copy,
        }])
    }

    /// Terminate a session (active or suspended) with a reason.
    ///
    /// # Errors
    /// Table errors.
    pub fn terminate(&self, id: SessionId, reason: Reason) -> Result<()> {
        let s = self.session(id)?;
        if !s.is_live() && !s.reversing() {
            return Ok(());
        }
        // An ended session restores nothing more: say what a reverse restore left undone.
        let reason = if s.reversing() {
            Reason::new(
                reason.code,
                format!(
                    "{}; its reverse restore ended with {} grains of {} not moved back (the \
                     source is partly restored)",
                    reason.detail,
                    s.restore_pending().get(),
                    s.desc.source.locator
                ),
            )
        } else {
            reason
        };
        self.table.commit(vec![Entry::SetState {
            session: id,
            state: SessionState::Terminated,
            reason: Some(reason),
        }])?;
        self.refresh_active();
        Ok(())
    }

    /// Mark a copy-mode session complete if every grain is copied. Returns true when it is
    /// (now or before) complete.
    ///
    /// # Errors
    /// Table errors.
    pub fn complete_if_done(&self, id: SessionId) -> Result<bool> {
        let s = self.session(id)?;
        let st = s.status();
        if st.state == SessionState::Completed {
            return Ok(true);
        }
        if st.state != SessionState::Active || st.mode != CopyMode::Copy {
            return Ok(false);
        }
        // Ended extents never complete; the session completes when every live extent has.
        if !live_extents_copied(&s) {
            return Ok(false);
        }
        // Every bit is durable, so every target grain is durable: the target is independent.
        self.table.commit(vec![Entry::SetState {
            session: id,
            state: SessionState::Completed,
            reason: None,
        }])?;
        self.refresh_active();
        Ok(true)
    }
}

/// [`Error::Reversing`] when a reverse restore of `s` is in progress.
pub(super) fn refuse_reversing(s: &Session, what: &str) -> Result<()> {
    if s.reversing() {
        return Err(Error::Reversing {
            id: s.id(),
            pending: s.restore_pending().get(),
            what: what.to_string(),
        });
    }
    Ok(())
}

/// Every grain of every extent that has not ended is copied.
pub(super) fn live_extents_copied(s: &Session) -> bool {
    let st = s.status();
    s.map
        .image_pieces(0, s.map.image_len())
        .filter(|p| st.ended.get(p.extent).is_some_and(Option::is_none))
        .all(|p| {
            let (g0, g1) = s.map.grains_of(&p);
            s.bits().all_set(g0, g1 - g0)
        })
}

fn overlaps(a: u64, al: u64, b: u64, bl: u64) -> bool {
    a < b.saturating_add(bl) && b < a.saturating_add(al)
}

/// Within one session: no two extents overlap on either side, and on one volume no source range
/// overlaps a target range.
fn validate_within(src: &VolumeInfo, tgt: &VolumeInfo, extents: &[ExtentSpec]) -> Result<()> {
    let range = |o: u64, l: u64| format!("{o}+{l}");
    for (i, a) in extents.iter().enumerate() {
        for b in &extents[i + 1..] {
            if overlaps(a.source_offset, a.len, b.source_offset, b.len) {
                return Err(Error::ExtentsOverlap {
                    side: "source",
                    volume: src.locator.clone(),
                    first: range(a.source_offset, a.len),
                    second: range(b.source_offset, b.len),
                });
            }
            if overlaps(a.target_offset, a.len, b.target_offset, b.len) {
                return Err(Error::ExtentsOverlap {
                    side: "target",
                    volume: tgt.locator.clone(),
                    first: range(a.target_offset, a.len),
                    second: range(b.target_offset, b.len),
                });
            }
        }
        if src.id == tgt.id {
            for b in extents {
                if overlaps(a.source_offset, a.len, b.target_offset, b.len) {
                    return Err(Error::Overlap {
                        volume: src.locator.clone(),
                        offset: b.target_offset,
                        len: b.len,
                    });
                }
            }
        }
    }
    Ok(())
}

/// A session's source and target being established: their handles and extents.
pub(super) struct Pair {
    pub(super) src: Arc<VolumeHandle>,
    pub(super) tgt: Arc<VolumeHandle>,
    pub(super) extents: Vec<ExtentSpec>,
}
