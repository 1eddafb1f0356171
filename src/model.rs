//! The domain's value types: what a session is made of (its volumes, extents, mode, state and
//! the reasons it ends), its descriptor, and the state changes the activity table records.
//! They depend on nothing above `ids` and `volume`; how they are encoded on disk lives in
//! `activity::format`, and the in-memory session that applies them in `session`.

use crate::ids::{Generation, GrainSize, SessionId, VolumeId};
pub use crate::state::{Reason, ReasonCode, SessionState};

/// What a volume was when a session was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    /// Identity.
    pub id: VolumeId,
    /// Size in bytes.
    pub size: u64,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Generation.
    pub generation: Generation,
    /// How to find it again.
    pub locator: String,
}

impl From<&crate::volume::VolumeInfo> for VolumeRef {
    fn from(i: &crate::volume::VolumeInfo) -> Self {
        VolumeRef {
            id: i.id,
            size: i.size,
            sector_size: i.sector_size,
            generation: i.generation,
            locator: i.locator.clone(),
        }
    }
}

/// One source range and where it goes in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ExtentSpec {
    /// Start in the source volume, bytes.
    pub source_offset: u64,
    /// Start in the target volume, bytes.
    pub target_offset: u64,
    /// Length in bytes (a multiple of the grain).
    pub len: u64,
}

impl ExtentSpec {
    /// Parse `OFFSET:LEN[@TARGET_OFFSET]`.
    ///
    /// # Errors
    /// [`crate::Error::Invalid`] naming the text.
    pub fn parse(s: &str) -> crate::Result<ExtentSpec> {
        let bad = |why: String| {
            crate::Error::invalid(
                "extent",
                format!("'{s}' is not OFFSET:LEN[@TARGET_OFFSET] ({why})"),
            )
        };
        let (main, tgt) = match s.split_once('@') {
            Some((m, t)) => (
                m,
                Some(crate::units::parse_size(t).map_err(|e| bad(e.to_string()))?),
            ),
            None => (s, None),
        };
        let (o, l) = main
            .split_once(':')
            .ok_or_else(|| bad("no ':' between offset and length".to_string()))?;
        let source_offset = crate::units::parse_size(o).map_err(|e| bad(e.to_string()))?;
        let len = crate::units::parse_size(l).map_err(|e| bad(e.to_string()))?;
        if len == 0 {
            return Err(bad("the length is 0".to_string()));
        }
        Ok(ExtentSpec {
            source_offset,
            target_offset: tgt.unwrap_or(source_offset),
            len,
        })
    }
}

/// Whether the background copier fills the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CopyMode {
    /// Background copy runs to completion; the session then completes.
    Copy,
    /// Copy-before-write only, until withdrawn.
    NoCopy,
}

impl CopyMode {
    pub(crate) fn code(self) -> u8 {
        match self {
            CopyMode::Copy => 1,
            CopyMode::NoCopy => 2,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(CopyMode::Copy),
            2 => Some(CopyMode::NoCopy),
            _ => None,
        }
    }
}

/// Everything fixed about a session at establish time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDesc {
    /// Id.
    pub id: SessionId,
    /// Mode at establish.
    pub mode: CopyMode,
    /// Grain size.
    pub grain: GrainSize,
    /// Source volume as it was.
    pub source: VolumeRef,
    /// Target volume as it was.
    pub target: VolumeRef,
    /// Extents, in image order.
    pub extents: Vec<ExtentSpec>,
    /// T0, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The consistency group the session was established in (every session of a group shares
    /// one T0 and was made durable by one commit); `None` for a session established alone.
    pub group: Option<String>,
    /// An incremental session records which grains changed after its T0 (a durable change
    /// map, written before the write it describes), also after its copy completed, so that a
    /// refresh takes a new T0 and copies only those grains. Copy mode only.
    pub incremental: bool,
}

impl SessionDesc {
    /// Total grains in the session (its bitmap length).
    #[must_use]
    pub fn grains(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| e.len >> self.grain.shift())
            .sum()
    }

    /// Bytes of bitmaps a checkpoint holds for the session at most: the copied bitmap, the
    /// restore map of a reverse restore (reserved at establish, so that a reverse never needs
    /// room the table lacks), and the change map of an incremental session.
    #[must_use]
    pub fn bitmap_bytes(&self) -> u64 {
        self.grains().div_ceil(8) * (2 + u64::from(self.incremental))
    }
}

/// One journal entry: a state transition of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A session was established (T0).
    Establish(SessionDesc),
    /// Grains `start..start+count` of a session are copied (data already durable).
    SetBits {
        /// Session.
        session: SessionId,
        /// First grain.
        start: u64,
        /// Number of grains.
        count: u64,
    },
    /// Grains `start..start+crcs.len()` of a session were copied and their bytes written to
    /// the target, whose flush may still be in flight when this entry is durable: recovery
    /// trusts a grain only when the target's bytes match its CRC32C (`crcs[i]` for grain
    /// `start + i`) and copies it again from the source otherwise (the source write waits for
    /// both durability points, so the source still holds those bytes). A later `SetBits` of a
    /// grain, or a checkpoint taken after the targets were flushed, confirms it.
    ///
    /// With `log`, the grains' T0 bytes were also written to the table's copy log, at that
    /// offset of the log region (grain `start + i` at `log + i * grain`), before this entry:
    /// the entry and those bytes are durable together (one sync of the table file), so the
    /// source write waits for this commit alone and the target's flush comes later (when the
    /// log space is retired). Recovery then takes a grain whose target bytes do not match
    /// from the log (checked against the same CRC), and from the source only after that.
    CopyChecked {
        /// Session.
        session: SessionId,
        /// First grain.
        start: u64,
        /// CRC32C of each grain's bytes on the target, in grain order.
        crcs: Vec<u32>,
        /// Offset in the table's copy log of grain `start`'s T0 bytes (format version 8);
        /// `None`: the source write waited for the target's flush as well.
        log: Option<u64>,
    },
    /// A session changed state.
    SetState {
        /// Session.
        session: SessionId,
        /// New state.
        state: SessionState,
        /// Why (for ended states).
        reason: Option<Reason>,
    },
    /// A session's mode changed (no-copy converted to copy).
    SetMode {
        /// Session.
        session: SessionId,
        /// New mode.
        mode: CopyMode,
    },
    /// Grains `start..start+count` of an incremental session changed after its T0 (a source
    /// write, or a target write through the engine); durable before that write is issued.
    SetChanged {
        /// Session.
        session: SessionId,
        /// First grain.
        start: u64,
        /// Number of grains.
        count: u64,
    },
    /// An incremental session took a new T0: the grains marked changed are copied again (their
    /// copied bits clear; after a completed copy, every other grain stays copied), the change
    /// map empties, and the session is active again.
    Refresh {
        /// Session.
        session: SessionId,
        /// The new T0, ms since the Unix epoch.
        t0_unix_ms: u64,
    },
    /// A reverse restore began: the session's source is to hold its image again. The grains
    /// to move back (the restore map) follow from the session's state where this entry stands
    /// in the journal: for a live session its copied grains (for an incremental one, those
    /// also marked changed); for a completed one the grains marked changed (incremental) or
    /// all. Grains of ended extents are not restored. From here, reads of the source through
    /// the engine take those grains from the target until they are moved back.
    Reverse {
        /// Session.
        session: SessionId,
    },
    /// Grains `start..start+count` of a reverse restore are back on the source (their data is
    /// durable there): they leave the restore map.
    Restored {
        /// Session.
        session: SessionId,
        /// First grain.
        start: u64,
        /// Number of grains.
        count: u64,
    },
    /// One extent of a session ended while the rest goes on.
    EndExtent {
        /// Session.
        session: SessionId,
        /// Extent index.
        extent: u32,
        /// Why.
        reason: Reason,
    },
    /// An ended session was removed from the table.
    Forget {
        /// Session.
        session: SessionId,
    },
}

/// One session as a checkpoint stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionImage {
    /// Descriptor.
    pub desc: SessionDesc,
    /// State.
    pub state: SessionState,
    /// Current mode.
    pub mode: CopyMode,
    /// Why it ended, when it did.
    pub reason: Option<Reason>,
    /// Ended extents and why.
    pub ended_extents: Vec<(u32, Reason)>,
    /// Bitmap bytes (bit `i` of byte `i / 8`, LSB first); empty for ended sessions (kept for
    /// active and suspended ones).
    pub bitmap: Vec<u8>,
    /// The current T0 (the establish's, or the last refresh's), ms since the Unix epoch.
    pub t0_unix_ms: u64,
    /// The change map of an incremental session, as `bitmap`; empty when the session is not
    /// incremental or has ended (a completed incremental session keeps it).
    pub changed: Vec<u8>,
    /// The restore map of a reverse restore in progress, as `bitmap`; empty when none is.
    pub pending: Vec<u8>,
    /// Grains of a live session whose checked copy records could not be verified when the
    /// table was opened (its target, or the source of a grain the target lost, was missing),
    /// each with the CRC32C of its T0 bytes; verified before the session resumes. Empty
    /// otherwise.
    pub unverified: Vec<(u64, u32)>,
    /// Of `unverified`, the grains whose T0 bytes are also in the table's copy log (grain,
    /// offset in the log region): the log keeps them (nothing is written to it) until the
    /// session resumes or ends. Format version 8; empty otherwise.
    pub unverified_log: Vec<(u64, u64)>,
}
