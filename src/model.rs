//! The domain's value types: what a session is made of (its volumes, extents, mode, state and
//! the reasons it ends), its descriptor, and the state changes the activity table records.
//! They depend on nothing above `ids` and `volume`; how they are encoded on disk lives in
//! `activity::format`, and the in-memory session that applies them in `session`.

use crate::ids::{Generation, GrainSize, SessionId, VolumeId};
use crate::limits::REASON_BYTES_MAX;

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

/// Lifecycle state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SessionState {
    /// Copy-before-write is in force.
    Active,
    /// Every grain was copied; the target is independent.
    Completed,
    /// Ended by the user.
    Withdrawn,
    /// Ended by the engine with a reason.
    Terminated,
    /// On hold: its source or target cannot be found or opened (the reason names which). The
    /// relationship and its copied bits are kept; writes that would need copy-before-write,
    /// image reads and the background copy are refused until the volume is back with the same
    /// identity and the session resumes (or it is withdrawn or terminated).
    Suspended,
}

impl SessionState {
    /// Stable on-disk code.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            SessionState::Active => 1,
            SessionState::Completed => 2,
            SessionState::Withdrawn => 3,
            SessionState::Terminated => 4,
            SessionState::Suspended => 5,
        }
    }
    /// Decode an on-disk code.
    #[must_use]
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(SessionState::Active),
            2 => Some(SessionState::Completed),
            3 => Some(SessionState::Withdrawn),
            4 => Some(SessionState::Terminated),
            5 => Some(SessionState::Suspended),
            _ => None,
        }
    }

    /// Whether the relationship still holds (active or suspended): the session keeps its
    /// copied bits and has not ended.
    #[must_use]
    pub fn is_live(self) -> bool {
        matches!(self, SessionState::Active | SessionState::Suspended)
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            SessionState::Active => "active",
            SessionState::Completed => "completed",
            SessionState::Withdrawn => "withdrawn",
            SessionState::Terminated => "terminated",
            SessionState::Suspended => "suspended",
        };
        f.write_str(s)
    }
}

/// Why a session or extent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum ReasonCode {
    /// The user withdrew it.
    Withdrawn,
    /// The named "terminate incomplete" restart policy ended it.
    RestartPolicy,
    /// A volume could not be found (written by earlier builds, which terminated the session;
    /// this build suspends it with [`ReasonCode::SourceUnavailable`] or
    /// [`ReasonCode::TargetUnavailable`]).
    VolumeMissing,
    /// A volume now has another identity (replaced, or source and target swapped).
    IdentityMismatch,
    /// A volume's generation changed (re-formatted or rewritten outside the engine).
    GenerationMismatch,
    /// A volume's sector size changed.
    SectorSizeMismatch,
    /// A volume shrank below the extent.
    VolumeShrunk,
    /// The table's durable state for the session could not be proven.
    TableDamaged,
    /// Copying failed after bounded retries.
    CopyFailed,
    /// A reset notification found the volume changed.
    ResetMismatch,
    /// The session's source volume cannot be found or opened (the session is suspended).
    SourceUnavailable,
    /// The session's target volume cannot be found or opened (the session is suspended).
    TargetUnavailable,
    /// The table file was older than its rollback witness and was opened anyway.
    TableRolledBack,
}

impl ReasonCode {
    pub(crate) fn code(self) -> u16 {
        match self {
            ReasonCode::Withdrawn => 1,
            ReasonCode::RestartPolicy => 2,
            ReasonCode::VolumeMissing => 3,
            ReasonCode::IdentityMismatch => 4,
            ReasonCode::GenerationMismatch => 5,
            ReasonCode::SectorSizeMismatch => 6,
            ReasonCode::VolumeShrunk => 7,
            ReasonCode::TableDamaged => 8,
            ReasonCode::CopyFailed => 9,
            ReasonCode::ResetMismatch => 10,
            ReasonCode::SourceUnavailable => 11,
            ReasonCode::TargetUnavailable => 12,
            ReasonCode::TableRolledBack => 13,
        }
    }
    pub(crate) fn from_code(c: u16) -> Option<Self> {
        Some(match c {
            1 => ReasonCode::Withdrawn,
            2 => ReasonCode::RestartPolicy,
            3 => ReasonCode::VolumeMissing,
            4 => ReasonCode::IdentityMismatch,
            5 => ReasonCode::GenerationMismatch,
            6 => ReasonCode::SectorSizeMismatch,
            7 => ReasonCode::VolumeShrunk,
            8 => ReasonCode::TableDamaged,
            9 => ReasonCode::CopyFailed,
            10 => ReasonCode::ResetMismatch,
            11 => ReasonCode::SourceUnavailable,
            12 => ReasonCode::TargetUnavailable,
            13 => ReasonCode::TableRolledBack,
            _ => return None,
        })
    }
}

/// A typed reason with a short human detail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reason {
    /// The machine-readable code.
    pub code: ReasonCode,
    /// Details (at most [`REASON_BYTES_MAX`] bytes are kept).
    pub detail: String,
}

impl Reason {
    /// A reason with detail text, truncated at a character boundary to the stored limit.
    #[must_use]
    pub fn new(code: ReasonCode, detail: impl Into<String>) -> Self {
        let mut detail: String = detail.into();
        if detail.len() > REASON_BYTES_MAX {
            let mut cut = REASON_BYTES_MAX;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Reason { code, detail }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.detail)
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
}
