//! A session's lifecycle state and the reasons a session or extent ends: the value types the
//! error type also carries (so they sit low, beside the ids; `model` re-exports them).

use crate::limits::REASON_BYTES_MAX;

/// Lifecycle state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Recovery could not prove a recorded copy-before-write: the grain's bytes on the target
    /// did not match the CRC32C its record carries, and they could not be copied again from
    /// the source (a volume missing, replaced, or not holding those bytes either).
    CopyUnverified,
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
            ReasonCode::CopyUnverified => 14,
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
            14 => ReasonCode::CopyUnverified,
            _ => return None,
        })
    }
}

/// A typed reason with a short human detail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
