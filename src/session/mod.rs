//! Sessions: the in-memory, durable-state view of one time-zero relationship.
//!
//! A [`Session`] is created by the activity table when an `Establish` entry is committed (or
//! replayed) and changed only by the table's commit leader applying later entries, after they
//! are durable. The engine reads its copied bits lock-free and serialises work on its grains
//! with its grain range lock. Outside the crate a session is read-only: its descriptor, state,
//! status, copied count and checkpoint image.

mod extent;
mod lock;

pub(crate) use extent::{ExtentMap, Piece};
pub(crate) use lock::{RangeGuard, RangeLock};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::bitmap::AtomicBitmap;
use crate::error::Corruption;
use crate::ids::{GrainCount, GrainIndex, SessionId};
use crate::model::{CopyMode, Entry, Reason, SessionDesc, SessionImage, SessionState};

/// Grains of a session held by a copy in flight ([`crate::engine::Engine::copy_data`]): no
/// writer changes them until the hold is committed or dropped; released on drop.
#[derive(Debug)]
pub struct GrainHold {
    session: Arc<Session>,
    range: (u64, u64),
}

impl GrainHold {
    /// The held grains: the first one and the one after the last.
    #[must_use]
    pub fn range(&self) -> (GrainIndex, GrainIndex) {
        (GrainIndex(self.range.0), GrainIndex(self.range.1))
    }

    /// How many grains are held.
    #[must_use]
    pub fn count(&self) -> GrainCount {
        GrainCount(self.range.1 - self.range.0)
    }
}

impl Drop for GrainHold {
    fn drop(&mut self) {
        self.session.locks.release(self.range.0, self.range.1);
    }
}

/// Mutable status of a session.
#[derive(Debug, Clone)]
pub struct Status {
    /// Lifecycle state.
    pub state: SessionState,
    /// Current copy mode.
    pub mode: CopyMode,
    /// Why it ended.
    pub reason: Option<Reason>,
    /// Per extent: `Some(reason)` once that extent ended.
    pub ended: Vec<Option<Reason>>,
}

impl Status {
    /// The ended extents as (index, reason).
    #[must_use]
    pub fn ended_list(&self) -> Vec<(u32, Reason)> {
        self.ended
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.clone().map(|r| (u32::try_from(i).unwrap_or(u32::MAX), r)))
            .collect()
    }
}

/// One session: descriptor, status, copied bits and grain locks.
#[derive(Debug)]
pub struct Session {
    /// What was established.
    pub desc: SessionDesc,
    /// Extent arithmetic.
    pub(crate) map: ExtentMap,
    status: Mutex<Status>,
    active: AtomicBool,
    /// State code mirror of `status.state`, for lock-free reads.
    state: AtomicU8,
    /// True once any extent ended (lets the hot paths skip the status lock).
    ended_any: AtomicBool,
    bits: AtomicBitmap,
    copied: AtomicU64,
    /// The change map of an incremental session (empty otherwise): grains changed since T0,
    /// each bit set only after its `SetChanged` is durable.
    changed: AtomicBitmap,
    /// The current T0 (the establish's, or the last refresh's), ms since the Unix epoch.
    t0_unix_ms: AtomicU64,
    /// The restore map of a reverse restore: grains whose image data is still to move back to
    /// the source (allocated at the first reverse). Bits only clear during a reverse, each
    /// after its grain is durable on the source.
    pending: std::sync::OnceLock<AtomicBitmap>,
    /// Set bits of `pending` (0 = no reverse in progress).
    pending_count: AtomicU64,
    /// Grain locks (image grain indices).
    pub(crate) locks: RangeLock,
    /// Grain locks of the reverse restore (taken before any volume gate or grain lock: a
    /// grain is restored once, and no write lands on the source before it is).
    pub(crate) restore_locks: RangeLock,
}

impl Session {
    /// A freshly established session (no grain copied).
    #[must_use]
    pub(crate) fn new(desc: SessionDesc) -> Self {
        let grains = desc.grains();
        let n = desc.extents.len();
        let status = Status {
            state: SessionState::Active,
            mode: desc.mode,
            reason: None,
            ended: vec![None; n],
        };
        Session {
            map: ExtentMap::new(&desc),
            bits: AtomicBitmap::new(grains),
            changed: AtomicBitmap::new(if desc.incremental { grains } else { 0 }),
            t0_unix_ms: AtomicU64::new(desc.created_unix_ms),
            desc,
            status: Mutex::new(status),
            active: AtomicBool::new(true),
            state: AtomicU8::new(SessionState::Active.code()),
            ended_any: AtomicBool::new(false),
            copied: AtomicU64::new(0),
            pending: std::sync::OnceLock::new(),
            pending_count: AtomicU64::new(0),
            locks: RangeLock::default(),
            restore_locks: RangeLock::default(),
        }
    }

    /// Rebuild from a checkpoint image.
    ///
    /// # Errors
    /// [`Corruption`] when the image is inconsistent.
    pub(crate) fn from_image(img: &SessionImage) -> Result<Self, Corruption> {
        let s = Session::new(img.desc.clone());
        if img.state.is_live() && img.bitmap.len() as u64 != img.desc.grains().div_ceil(8) {
            return Err(Corruption::Field {
                what: "checkpoint",
                field: "bitmap",
                value: img.bitmap.len() as u64,
            });
        }
        let bits = AtomicBitmap::from_bytes(img.desc.grains(), &img.bitmap);
        let copied = bits.count_ones();
        let holds_map =
            img.desc.incremental && (img.state.is_live() || img.state == SessionState::Completed);
        if holds_map && img.changed.len() as u64 != img.desc.grains().div_ceil(8) {
            return Err(Corruption::Field {
                what: "checkpoint",
                field: "changed",
                value: img.changed.len() as u64,
            });
        }
        let changed = AtomicBitmap::from_bytes(
            if img.desc.incremental {
                img.desc.grains()
            } else {
                0
            },
            &img.changed,
        );
        let mut st = s.status.lock();
        st.state = img.state;
        st.mode = img.mode;
        st.reason.clone_from(&img.reason);
        for (i, r) in &img.ended_extents {
            if let Some(slot) = st.ended.get_mut(*i as usize) {
                *slot = Some(r.clone());
            }
        }
        s.ended_any
            .store(st.ended.iter().any(Option::is_some), Ordering::Release);
        drop(st);
        s.active
            .store(img.state == SessionState::Active, Ordering::Release);
        s.state.store(img.state.code(), Ordering::Release);
        s.t0_unix_ms.store(img.t0_unix_ms, Ordering::Release);
        if !img.pending.is_empty() {
            if img.pending.len() as u64 != img.desc.grains().div_ceil(8)
                || !(img.state.is_live() || img.state == SessionState::Completed)
            {
                return Err(Corruption::Field {
                    what: "checkpoint",
                    field: "pending",
                    value: img.pending.len() as u64,
                });
            }
            let p = AtomicBitmap::from_bytes(img.desc.grains(), &img.pending);
            s.pending_count.store(p.count_ones(), Ordering::Release);
            let _ = s.pending.set(p);
        }
        Ok(Session {
            bits,
            copied: AtomicU64::new(copied),
            changed,
            ..s
        })
    }

    /// The checkpoint image (bitmaps only for active and suspended sessions).
    #[must_use]
    pub fn image(&self) -> SessionImage {
        let st = self.status.lock();
        SessionImage {
            desc: self.desc.clone(),
            state: st.state,
            mode: st.mode,
            reason: st.reason.clone(),
            ended_extents: st.ended_list(),
            bitmap: if st.state.is_live() {
                self.bits.to_bytes()
            } else {
                Vec::new()
            },
            t0_unix_ms: self.t0_unix_ms(),
            changed: if self.desc.incremental
                && (st.state.is_live() || st.state == SessionState::Completed)
            {
                self.changed.to_bytes()
            } else {
                Vec::new()
            },
            pending: match self.pending.get() {
                Some(p) if self.reversing() => p.to_bytes(),
                _ => Vec::new(),
            },
            // The table fills it in (it keeps the deferred grains).
            unverified: Vec::new(),
            unverified_log: Vec::new(),
        }
    }

    /// Whether a reverse restore is in progress: grains remain to move back to the source.
    #[must_use]
    #[inline]
    pub fn reversing(&self) -> bool {
        self.pending_count.load(Ordering::Acquire) > 0
    }

    /// Grains a reverse restore still has to move back to the source (0 when none runs).
    #[must_use]
    pub fn restore_pending(&self) -> GrainCount {
        GrainCount(self.pending_count.load(Ordering::Acquire))
    }

    /// The restore map, while a reverse restore is in progress.
    #[must_use]
    #[inline]
    pub(crate) fn pending_bits(&self) -> Option<&AtomicBitmap> {
        if self.reversing() {
            self.pending.get()
        } else {
            None
        }
    }

    /// Id.
    #[must_use]
    pub fn id(&self) -> SessionId {
        self.desc.id
    }

    /// Length of the session's image in bytes (its extents laid end to end).
    #[must_use]
    pub fn image_len(&self) -> u64 {
        self.map.image_len()
    }

    /// The current T0 (the establish's, or the last refresh's), ms since the Unix epoch.
    #[must_use]
    pub fn t0_unix_ms(&self) -> u64 {
        self.t0_unix_ms.load(Ordering::Acquire)
    }

    /// Whether writes through the engine must mark grains changed: an incremental session that
    /// is live or completed.
    #[must_use]
    #[inline]
    pub fn records_changes(&self) -> bool {
        self.desc.incremental && {
            let st = self.state();
            st.is_live() || st == SessionState::Completed
        }
    }

    /// Whether the session still holds its volumes: live, or completed and recording changes
    /// (its target is reserved for the next refresh, and an establish forgets it only when
    /// asked to).
    #[must_use]
    pub fn holds_volumes(&self) -> bool {
        self.is_live() || self.records_changes() || self.reversing()
    }

    /// Grains marked changed since T0 (incremental sessions; 0 otherwise).
    #[must_use]
    pub fn changed(&self) -> GrainCount {
        GrainCount(self.changed.count_ones())
    }

    /// The change map.
    #[must_use]
    #[inline]
    pub(crate) fn changed_bits(&self) -> &AtomicBitmap {
        &self.changed
    }

    /// Is copy-before-write in force (cheap).
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether the relationship still holds: active or suspended (not ended).
    #[must_use]
    #[inline]
    pub fn is_live(&self) -> bool {
        self.state().is_live()
    }

    /// A copy of the status.
    #[must_use]
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// The copied bits.
    #[must_use]
    #[inline]
    pub(crate) fn bits(&self) -> &AtomicBitmap {
        &self.bits
    }

    /// Grains copied so far (their bits are durable).
    #[must_use]
    pub fn copied(&self) -> GrainCount {
        GrainCount(self.copied.load(Ordering::Acquire))
    }

    /// Is extent `i` still in force.
    #[must_use]
    pub fn extent_live(&self, i: usize) -> bool {
        if !self.ended_any.load(Ordering::Acquire) {
            return i < self.desc.extents.len();
        }
        self.status.lock().ended.get(i).is_some_and(Option::is_none)
    }

    /// Lifecycle state, without taking the status lock.
    #[must_use]
    #[inline]
    pub fn state(&self) -> SessionState {
        SessionState::from_code(self.state.load(Ordering::Acquire))
            .unwrap_or(SessionState::Terminated)
    }

    /// Why extent `i` ended, if it did.
    #[must_use]
    #[inline]
    pub fn extent_end(&self, i: usize) -> Option<Reason> {
        if !self.ended_any.load(Ordering::Acquire) {
            return None;
        }
        self.status.lock().ended.get(i).cloned().flatten()
    }

    /// Hold grains `g0..g1` if no one else holds any of them, with a guard that owns a
    /// reference to the session (so it can outlive the caller's borrow, e.g. until a commit).
    ///
    /// Invariant: copied bits of a session are only ever committed by a holder of their grain
    /// lock. So while a caller holds a grain whose bit is clear, no one can set that bit, and
    /// every writer of the source grain must wait for the lock: the source still holds T0.
    #[must_use]
    pub(crate) fn try_hold(self: &Arc<Self>, g0: u64, g1: u64) -> Option<GrainHold> {
        if !self.locks.try_acquire(g0, g1) {
            return None;
        }
        Some(GrainHold {
            session: self.clone(),
            range: (g0, g1),
        })
    }

    /// Apply a durable journal entry addressed to this session.
    ///
    /// # Errors
    /// [`Corruption`] when the entry cannot apply (bit range or extent out of range).
    pub(crate) fn apply(&self, e: &Entry) -> Result<(), Corruption> {
        match e {
            Entry::CopyChecked { start, crcs, .. } => {
                // Replay only: a live commit leaves the bits to the engine, which sets them
                // once the target's flush is done too.
                return self.apply(&Entry::SetBits {
                    session: self.id(),
                    start: *start,
                    count: crcs.len() as u64,
                });
            }
            Entry::SetBits { start, count, .. } => {
                if start
                    .checked_add(*count)
                    .is_none_or(|end| end > self.bits.len())
                {
                    return Err(Corruption::Field {
                        what: "journal entry",
                        field: "bit_range",
                        value: *start,
                    });
                }
                let n = self.bits.set_range(*start, *count);
                self.copied.fetch_add(n, Ordering::AcqRel);
            }
            Entry::SetState { state, reason, .. } => {
                let mut st = self.status.lock();
                st.state = *state;
                st.reason.clone_from(reason);
                self.active
                    .store(*state == SessionState::Active, Ordering::Release);
                self.state.store(state.code(), Ordering::Release);
                if !(state.is_live() || *state == SessionState::Completed) {
                    // An ended session restores nothing more (its target is no longer held).
                    if let Some(p) = self.pending.get() {
                        p.clear_all();
                    }
                    self.pending_count.store(0, Ordering::Release);
                }
            }
            Entry::SetMode { mode, .. } => self.status.lock().mode = *mode,
            Entry::EndExtent { extent, reason, .. } => {
                let mut st = self.status.lock();
                let slot = st
                    .ended
                    .get_mut(*extent as usize)
                    .ok_or(Corruption::Field {
                        what: "journal entry",
                        field: "extent",
                        value: u64::from(*extent),
                    })?;
                *slot = Some(reason.clone());
                self.ended_any.store(true, Ordering::Release);
            }
            Entry::SetChanged { start, count, .. } => {
                if !self.desc.incremental
                    || start
                        .checked_add(*count)
                        .is_none_or(|end| end > self.changed.len())
                {
                    return Err(Corruption::Field {
                        what: "journal entry",
                        field: "changed_range",
                        value: *start,
                    });
                }
                self.changed.set_range(*start, *count);
            }
            Entry::Refresh { t0_unix_ms, .. } => {
                if !self.desc.incremental {
                    return Err(Corruption::Field {
                        what: "journal entry",
                        field: "refresh",
                        value: self.desc.id.0,
                    });
                }
                let mut st = self.status.lock();
                if st.state == SessionState::Completed {
                    // Every grain of a completed copy is on the target (a checkpoint keeps no
                    // copied bitmap for it, so set them here).
                    self.bits.set_all();
                }
                self.bits.clear_where(&self.changed);
                self.changed.clear_all();
                self.copied.store(self.bits.count_ones(), Ordering::Release);
                self.t0_unix_ms.store(*t0_unix_ms, Ordering::Release);
                st.state = SessionState::Active;
                st.reason = None;
                self.active.store(true, Ordering::Release);
                self.state
                    .store(SessionState::Active.code(), Ordering::Release);
            }
            Entry::Reverse { .. } => self.begin_reverse(),
            Entry::Restored { start, count, .. } => {
                if start
                    .checked_add(*count)
                    .is_none_or(|end| end > self.desc.grains())
                {
                    return Err(Corruption::Field {
                        what: "journal entry",
                        field: "restored_range",
                        value: *start,
                    });
                }
                if let Some(p) = self.pending.get() {
                    let n = p.clear_range(*start, *count);
                    self.pending_count.fetch_sub(n, Ordering::AcqRel);
                }
            }
            Entry::Establish(_) | Entry::Forget { .. } => {}
        }
        Ok(())
    }

    /// Fill the restore map as [`Entry::Reverse`] defines it, from the session's state now.
    fn begin_reverse(&self) {
        let grains = self.desc.grains();
        let p = self.pending.get_or_init(|| AtomicBitmap::new(grains));
        let st = self.status.lock();
        let mut n = match (st.state, self.desc.incremental) {
            (SessionState::Completed, true) => p.assign(&self.changed, None),
            (SessionState::Completed, false) => {
                p.clear_all();
                p.set_all()
            }
            (_, true) => p.assign(&self.bits, Some(&self.changed)),
            (_, false) => p.assign(&self.bits, None),
        };
        for (i, r) in st.ended.iter().enumerate() {
            if r.is_none() {
                continue;
            }
            if let Some(piece) = self
                .map
                .image_pieces(0, self.map.image_len())
                .find(|x| x.extent == i)
            {
                let (g0, g1) = self.map.grains_of(&piece);
                n -= p.clear_range(g0, g1 - g0);
            }
        }
        self.pending_count.store(n, Ordering::Release);
    }
}
