//! The crate's error type.
//!
//! One `#[non_exhaustive]` [`Error`] enum carries every failure with its context: the operation,
//! the offset, the session or volume involved, and the underlying [`std::io::Error`] as `source()`.

use std::path::PathBuf;

use crate::ids::{Seq, SessionId};
use crate::state::{Reason, SessionState};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an activity table's bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// A structure's magic number did not match.
    #[error("{what}: bad magic")]
    BadMagic {
        /// Which structure.
        what: &'static str,
    },
    /// A structure's format version is not one this build reads.
    #[error(
        "{what}: unsupported format version {found} (this build reads version {}; create the \
         table again with this build)",
        crate::activity::format::FORMAT_VERSION
    )]
    BadVersion {
        /// Which structure.
        what: &'static str,
        /// The version found on disk.
        found: u32,
    },
    /// A checksum did not match.
    #[error("{what}: checksum mismatch (expected {expected:#010x}, found {found:#010x})")]
    Checksum {
        /// Which structure.
        what: &'static str,
        /// The checksum computed over the bytes.
        expected: u32,
        /// The checksum stored on disk.
        found: u32,
    },
    /// A field held a value outside its valid range.
    #[error("{what}: field {field} out of range ({value})")]
    Field {
        /// Which structure.
        what: &'static str,
        /// Which field.
        field: &'static str,
        /// The offending value.
        value: u64,
    },
    /// The record belongs to another table, slot or sequence (stale, zeroed or misdirected).
    #[error("{what}: record is not bound to this place (table, slot or sequence differ)")]
    Misplaced {
        /// Which structure.
        what: &'static str,
    },
    /// Bytes ended before a structure did.
    #[error("{what}: truncated")]
    Truncated {
        /// Which structure.
        what: &'static str,
    },
    /// Neither copy of a redundant structure is valid.
    #[error("no valid copy of {what}")]
    NoValidCopy {
        /// Which structure.
        what: &'static str,
    },
    /// A committed journal block is unreadable while later commits are intact.
    #[error("journal block {seq} is damaged in both copies while later commits are intact")]
    JournalHole {
        /// Sequence number of the damaged block.
        seq: u64,
    },
}

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed. The offset is shown for positioned transfers (`read`, `write`)
    /// only.
    #[error("{}", io_message(op, target, *offset, source))]
    Io {
        /// What was being done (`read`, `write`, `flush`, `open`, ...).
        op: &'static str,
        /// What it was done on (a path or a volume id).
        target: String,
        /// Byte offset of the operation, 0 where none applies.
        offset: u64,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// An earlier I/O failure latched this volume or table; reopen and recover it.
    #[error("{target} is poisoned by an earlier I/O failure; reopen it to recover")]
    Poisoned {
        /// The volume or table.
        target: String,
    },
    /// An earlier I/O failure latched this volume (see [`crate::volume::CheckedVolume`]): the
    /// first failure's operation, offset and operating-system error, repeated on every later
    /// call. Unlike [`Error::Poisoned`] it keeps that error's kind (`source()` is an
    /// [`std::io::Error`] of the same kind, and of the same `raw_os_error` when it had one).
    #[error("{}", poisoned_io_message(target, op, *offset, source))]
    PoisonedIo {
        /// The volume (the failed call's target, usually a path).
        target: String,
        /// The operation that failed first (`write`, `fdatasync`, ...).
        op: &'static str,
        /// Its byte offset, 0 where none applies.
        offset: u64,
        /// The first failure's error, rebuilt with the same kind and message.
        #[source]
        source: std::io::Error,
    },
    /// The activity table's bytes are damaged or not a table.
    #[error("activity table {path}: {kind}")]
    Corrupt {
        /// Path (or name) of the table.
        path: String,
        /// What was found.
        #[source]
        kind: Corruption,
    },
    /// The table file is older than its rollback witness: it was put back from an older copy
    /// (or the witness belongs to a newer copy of it).
    #[error(
        "activity table {path} was rolled back: it ends at journal sequence {} but its \
         witness {path}.witness saw sequence {} committed; its images cannot be \
         trusted (recover --accept-rollback opens it and ends every active session)",
        table_seq.0,
        witness_seq.0
    )]
    RolledBack {
        /// Path of the table.
        path: String,
        /// Where the table's journal ends.
        table_seq: Seq,
        /// The newest committed sequence the witness recorded.
        witness_seq: Seq,
    },
    /// The table was opened read-only.
    #[error("activity table {path} is open read-only")]
    ReadOnly {
        /// Path of the table.
        path: String,
    },
    /// Another process holds the table.
    #[error("activity table {path} is held by {holder}")]
    Locked {
        /// Path of the table.
        path: PathBuf,
        /// Who holds it, as recorded in the lock file (pid and command).
        holder: String,
    },
    /// An extent is not aligned to the grain or sector size.
    #[error("extent {offset}+{len} is not aligned to {align} bytes")]
    Misaligned {
        /// Start of the extent in bytes.
        offset: u64,
        /// Length of the extent in bytes.
        len: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// An extent or I/O lies outside its volume or image.
    #[error("range {offset}+{len} is outside {what} of {size} bytes")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// What it was checked against.
        what: &'static str,
        /// Size of that thing in bytes.
        size: u64,
    },
    /// A target extent ends past the end of the target volume.
    #[error("target extent {offset}+{len} ends past the end of {target} ({size} bytes)")]
    TargetTooSmall {
        /// The target volume (its path).
        target: String,
        /// Start of the target extent.
        offset: u64,
        /// Length of the target extent.
        len: u64,
        /// Size of the target volume in bytes.
        size: u64,
    },
    /// Two active sessions would write the same target range.
    #[error("target range {offset}+{len} on {volume} is already the target of {other}")]
    TargetInUse {
        /// The target volume (its path).
        volume: String,
        /// Start of the conflicting range.
        offset: u64,
        /// Length of the conflicting range.
        len: u64,
        /// The session already using it.
        other: SessionId,
    },
    /// A session's source and target ranges overlap, or a range would be both source and target.
    #[error("source and target ranges overlap on {volume} at {offset}+{len}")]
    Overlap {
        /// The volume (its path).
        volume: String,
        /// Start of the overlapping range.
        offset: u64,
        /// Length of the overlapping range.
        len: u64,
    },
    /// Two extents of one session overlap on the same side (two source or two target ranges).
    #[error("{side} extents {first} and {second} of the session overlap on {volume}")]
    ExtentsOverlap {
        /// `source` or `target`.
        side: &'static str,
        /// The volume (its path).
        volume: String,
        /// The first extent's range on that side, `OFFSET+LEN`.
        first: String,
        /// The second extent's range on that side, `OFFSET+LEN`.
        second: String,
    },
    /// One pair of a consistency group could not be established; no session of the group
    /// was (a group is established whole or not at all).
    #[error("group {group}: pair {pair} ({source_path} -> {target_path}): {error}")]
    GroupPair {
        /// The group's name.
        group: String,
        /// The pair's position in the group, from 1 (argument order).
        pair: usize,
        /// The pair's source (its path).
        source_path: String,
        /// The pair's target (its path).
        target_path: String,
        /// What is wrong with it.
        #[source]
        error: Box<Error>,
    },
    /// A pair of a consistency group would use a range that an earlier pair of the same group
    /// uses as its target (or, for a target, as its source).
    #[error("{what} {offset}+{len} on {volume} is also used by pair {other} of the group")]
    GroupConflict {
        /// `target range` or `source range`.
        what: &'static str,
        /// The volume (its path).
        volume: String,
        /// Start of the conflicting range.
        offset: u64,
        /// Length of the conflicting range.
        len: u64,
        /// The earlier pair, from 1.
        other: usize,
    },
    /// A consistency group of this name still has a live (active or suspended) session.
    #[error(
        "group {name} already exists (session {other} is live); withdraw it or choose another name"
    )]
    GroupExists {
        /// The group's name.
        name: String,
        /// One of its live sessions.
        other: SessionId,
    },
    /// Only an ended session (completed, withdrawn, terminated) can be forgotten.
    #[error(
        "session {id} is {state}: only an ended session (completed, withdrawn, terminated) can \
         be forgotten; withdraw it first"
    )]
    NotEnded {
        /// The session.
        id: SessionId,
        /// Its state (`active`, `suspended`, or a completed session still recording changes).
        state: String,
    },
    /// No live session belongs to a consistency group of this name.
    #[error("no live session in group {0}")]
    UnknownGroup(String),
    /// A file was offered as a volume that must never be one (the activity table itself,
    /// another table, a table's holder or control file, a socket).
    #[error("{path} cannot be used as a volume: {why}")]
    NotAVolume {
        /// The path offered.
        path: String,
        /// What it is.
        why: String,
    },
    /// A volume about to be overwritten visibly holds data: a file-system or partition-table
    /// signature, or non-zero bytes near the start or end of a range.
    #[error("target {path} holds data ({found}) that the session would overwrite; pass --force to establish anyway")]
    HoldsData {
        /// The volume (its path).
        path: String,
        /// What was found.
        found: String,
    },
    /// No session with this id is in the table.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// No volume with this id is attached.
    #[error("unknown volume {0}")]
    UnknownVolume(String),
    /// The session exists but is not active (withdrawn, completed or terminated).
    #[error("session {id} is not active ({state})")]
    NotActive {
        /// The session.
        id: SessionId,
        /// Its current state.
        state: SessionState,
    },
    /// A refresh of a session that was not established incremental (it recorded no changes).
    #[error(
        "session {0} records no changes (establish it with --incremental to refresh it later)"
    )]
    NotIncremental(SessionId),
    /// A reverse restore of the session is moving its image back to its source: what would
    /// change the source's restored view or the image it is restored from waits until the
    /// restore ends (writes to its target, withdraw, refresh, another reverse or establish
    /// on its volumes).
    #[error(
        "session {id} is restoring its source (reverse restore, {pending} grains to go): {what}          waits until it ends (`timezero copy` finishes it)"
    )]
    Reversing {
        /// The session.
        id: SessionId,
        /// Grains still to move back when refused.
        pending: u64,
        /// What was refused.
        what: String,
    },
    /// The session is suspended: one of its volumes cannot be found or opened. Writes that
    /// would need copy-before-write for it, its image reads and its background copy wait until
    /// the volume is back with the same identity and the session resumes.
    #[error(
        "session {id} is suspended: its {role} {path} is unavailable ({why}); it resumes when \
         that volume is back"
    )]
    Suspended {
        /// The session.
        id: SessionId,
        /// Which of its volumes is unavailable: `source` or `target`.
        role: &'static str,
        /// That volume's path (locator).
        path: String,
        /// Why it is unavailable (not found, or the error opening it gave).
        why: String,
    },
    /// A configuration value or argument is invalid.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// A bounded resource of the table is exhausted.
    #[error("activity table is full: {what}")]
    TableFull {
        /// Which resource.
        what: &'static str,
    },
    /// A session's extent was terminated and can no longer be read or copied.
    #[error("session {id} extent {extent} is terminated ({reason})")]
    ExtentTerminated {
        /// The session.
        id: SessionId,
        /// Index of the extent within the session.
        extent: u32,
        /// Why it ended.
        reason: Reason,
    },
    /// A long command was stopped on request (Ctrl-C) before it finished; what it did so far
    /// is durable.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// A command run by the process serving a table failed there; its message as that process
    /// gave it.
    #[error("{0}")]
    Remote(String),
}

/// Operations at a byte offset: their messages name the offset.
const POSITIONED_OPS: [&str; 4] = ["read", "write", "pread", "pwrite"];

fn io_message(op: &str, target: &str, offset: u64, source: &std::io::Error) -> String {
    if POSITIONED_OPS.contains(&op) {
        format!("{op} {target} at offset {offset}: {source}")
    } else {
        format!("{op} {target}: {source}")
    }
}

fn poisoned_io_message(target: &str, op: &str, offset: u64, source: &std::io::Error) -> String {
    let at = if POSITIONED_OPS.contains(&op) {
        format!(" at offset {offset}")
    } else {
        String::new()
    };
    format!("{target} is poisoned by an earlier failed {op}{at} ({source}); reopen it to recover")
}

impl Error {
    /// Wrap an I/O error with the operation, target and offset.
    pub fn io(
        op: &'static str,
        target: impl Into<String>,
        offset: u64,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            op,
            target: target.into(),
            offset,
            source,
        }
    }

    /// The [`std::io::ErrorKind`] of an I/O failure ([`Error::Io`], or the first failure an
    /// [`Error::PoisonedIo`] repeats); `None` for every other error.
    #[must_use]
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            Error::Io { source, .. } | Error::PoisonedIo { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// True for the errors of a latched volume or table ([`Error::Poisoned`],
    /// [`Error::PoisonedIo`]): every later call fails the same way until it is reopened.
    #[must_use]
    pub fn is_poisoned(&self) -> bool {
        matches!(self, Error::Poisoned { .. } | Error::PoisonedIo { .. })
    }

    /// Build an [`Error::Invalid`].
    pub fn invalid(what: &'static str, why: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            why: why.into(),
        }
    }
}
