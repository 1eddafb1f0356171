//! What the commands print: one serde structure per command for `--json`, and the text forms.
//! Session ids are `s1` in both, times are RFC 3339 (with the milliseconds beside them), states
//! and outcomes use the same words (`active`, `completed`, `withdrawn`, `terminated`).

use std::fmt::Write as _;

use serde::Serialize;

use crate::activity::OpenReport;
use crate::engine::{Decision, Outcome, SessionStatus};
use crate::model::{CopyMode, Reason, SessionState};
use crate::units::{format_size, rfc3339_ms};
use crate::{Error, Result};

/// One line of JSON for `v`.
pub fn json<T: Serialize>(v: &T) -> Result<String> {
    let s = serde_json::to_string(v).map_err(|e| Error::invalid("json", e.to_string()))?;
    Ok(s + "\n")
}

/// A reason's machine code (`IdentityMismatch`): its serde name.
fn code_name<T: Serialize>(code: &T) -> String {
    match serde_json::to_value(code) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".to_string(),
    }
}

/// `copy`, `no-copy`.
fn mode_word(m: CopyMode) -> &'static str {
    match m {
        CopyMode::Copy => "copy",
        CopyMode::NoCopy => "no-copy",
    }
}

/// Why a session or an extent ended.
#[derive(Debug, Serialize)]
pub struct ReasonOut {
    /// Machine code (`IdentityMismatch`, `VolumeShrunk`, ...).
    pub code: String,
    /// Human detail.
    pub detail: String,
}

impl ReasonOut {
    fn of(r: &Reason) -> Self {
        ReasonOut {
            code: code_name(&r.code),
            detail: r.detail.clone(),
        }
    }
}

impl std::fmt::Display for ReasonOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// One extent of a session.
#[derive(Debug, Serialize)]
pub struct ExtentOut {
    /// Source offset in bytes.
    pub source_offset: u64,
    /// Target offset in bytes.
    pub target_offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Why it ended, when it did.
    pub ended: Option<ReasonOut>,
}

/// `establish`.
#[derive(Debug, Serialize)]
pub struct EstablishOut {
    /// `s1`.
    pub session: String,
    /// Source path as given.
    pub source: String,
    /// Target path as given.
    pub target: String,
    /// T0, RFC 3339.
    pub t0: String,
    /// T0, ms since the Unix epoch.
    pub t0_unix_ms: u64,
    /// `copy` or `no-copy`.
    pub mode: &'static str,
    /// Grain in bytes.
    pub grain_bytes: u64,
    /// Image size in bytes (sum of the extents).
    pub size_bytes: u64,
    /// Extents.
    pub extents: Vec<ExtentOut>,
    /// The consistency group, if any.
    pub group: Option<String>,
}

impl EstablishOut {
    /// The record of a session just established from `source` to `target` (paths as given).
    pub fn new(st: &SessionStatus, source: String, target: String) -> Self {
        let s = SessionOut::of(st);
        EstablishOut {
            session: s.session,
            source,
            target,
            t0: s.t0,
            t0_unix_ms: s.t0_unix_ms,
            mode: s.mode,
            grain_bytes: s.grain_bytes,
            size_bytes: s.size_bytes,
            extents: s.extents,
            group: s.group,
        }
    }

    /// `s1: SRC -> TGT at T0 TIME (...)`: the session id first.
    pub fn text(&self) -> String {
        let group = self
            .group
            .as_ref()
            .map(|g| format!(", group {g}"))
            .unwrap_or_default();
        format!(
            "{}: {} -> {} at T0 {} ({}, {} in {} extent{}, grain {}{group})\n",
            self.session,
            self.source,
            self.target,
            self.t0,
            self.mode,
            format_size(self.size_bytes),
            self.extents.len(),
            if self.extents.len() == 1 { "" } else { "s" },
            format_size(self.grain_bytes)
        )
    }
}

/// One session in `status`.
#[derive(Debug, Serialize)]
pub struct SessionOut {
    /// `s1`.
    pub session: String,
    /// `active`, `completed`, `withdrawn`, `terminated`.
    pub state: String,
    /// `copy` or `no-copy`.
    pub mode: &'static str,
    /// Source path.
    pub source: String,
    /// Target path.
    pub target: String,
    /// T0, RFC 3339.
    pub t0: String,
    /// T0, ms since the Unix epoch.
    pub t0_unix_ms: u64,
    /// Grain in bytes.
    pub grain_bytes: u64,
    /// Image size in bytes.
    pub size_bytes: u64,
    /// Grains copied.
    pub grains_copied: u64,
    /// Grains in total.
    pub grains_total: u64,
    /// Percent copied.
    pub percent: f64,
    /// Extents.
    pub extents: Vec<ExtentOut>,
    /// Why it ended, or why it is suspended.
    pub reason: Option<ReasonOut>,
    /// The path of the volume a suspended session is waiting for.
    pub unavailable: Option<String>,
    /// The consistency group the session was established in, if any.
    pub group: Option<String>,
    /// Whether the session records changes (`refresh` takes a new T0 copying only those).
    pub incremental: bool,
    /// Grains marked changed since T0 (incremental sessions).
    pub grains_changed: u64,
    /// Grains a reverse restore still has to move back to the source (0: none in progress).
    pub grains_to_restore: u64,
}

impl SessionOut {
    /// From the engine's status.
    pub fn of(s: &SessionStatus) -> Self {
        let ended = |i: usize| {
            s.ended_extents
                .iter()
                .find(|(x, _)| *x as usize == i)
                .map(|(_, r)| ReasonOut::of(r))
        };
        SessionOut {
            session: s.id.to_string(),
            state: s.state.to_string(),
            mode: mode_word(s.mode),
            source: s.source.clone(),
            target: s.target.clone(),
            t0: rfc3339_ms(s.created_unix_ms),
            t0_unix_ms: s.created_unix_ms,
            grain_bytes: s.grain_bytes,
            size_bytes: s.extents.iter().map(|e| e.len).sum(),
            grains_copied: s.grains_copied.get(),
            grains_total: s.grains_total.get(),
            percent: if s.grains_total.get() == 0 {
                100.0
            } else {
                (1000.0 * s.grains_copied.get() as f64 / s.grains_total.get() as f64).round() / 10.0
            },
            extents: s
                .extents
                .iter()
                .enumerate()
                .map(|(i, e)| ExtentOut {
                    source_offset: e.source_offset,
                    target_offset: e.target_offset,
                    len: e.len,
                    ended: ended(i),
                })
                .collect(),
            reason: s.reason.as_ref().map(ReasonOut::of),
            unavailable: s.unavailable.clone(),
            group: s.group.clone(),
            incremental: s.incremental,
            grains_changed: s.grains_changed.get(),
            grains_to_restore: s.grains_to_restore.get(),
        }
    }
}

/// `reverse`: what the reverse restore moves back.
#[derive(Debug, Serialize)]
pub struct ReverseOut {
    /// `s1`.
    pub session: String,
    /// The source that holds the image again.
    pub source: String,
    /// Grains to move back from the target.
    pub grains_to_restore: u64,
    /// Their bytes.
    pub bytes_to_restore: u64,
}

impl ReverseOut {
    /// `s1: /dev/x holds the image again (through timezero); 3 grains (192 KiB) to move back`.
    pub fn text(&self) -> String {
        format!(
            "{}: {} reads as the image now through timezero; {} grains ({}) to move back\n",
            self.session,
            self.source,
            self.grains_to_restore,
            format_size(self.bytes_to_restore)
        )
    }
}

/// `refresh`: one line per session.
#[derive(Debug, Serialize)]
pub struct RefreshOut {
    /// `s1`.
    pub session: String,
    /// The new T0, RFC 3339.
    pub t0: String,
    /// The new T0, ms since the Unix epoch.
    pub t0_unix_ms: u64,
    /// Grains the copy moves now.
    pub grains_to_copy: u64,
    /// Bytes the copy moves now.
    pub bytes_to_copy: u64,
}

impl RefreshOut {
    /// From the engine's report.
    pub fn of(r: &crate::engine::Refreshed) -> Self {
        RefreshOut {
            session: r.session.to_string(),
            t0: rfc3339_ms(r.t0_unix_ms),
            t0_unix_ms: r.t0_unix_ms,
            grains_to_copy: r.grains_to_copy.get(),
            bytes_to_copy: r.bytes_to_copy,
        }
    }

    /// `s1 refreshed at T0 2026-12-02T10:00:00.000Z: 3 grains (192 KiB) to copy`.
    pub fn text(&self) -> String {
        format!(
            "{} refreshed at T0 {}: {} grains ({}) to copy\n",
            self.session,
            self.t0,
            self.grains_to_copy,
            format_size(self.bytes_to_copy)
        )
    }
}

/// `status`.
#[derive(Debug, Serialize)]
pub struct StatusOut {
    /// Every session in the table.
    pub sessions: Vec<SessionOut>,
    /// The file backend in use (`None`: the table was read without opening volumes).
    pub backend: Option<String>,
    /// Whether volumes are opened with `O_DIRECT` (`None` as for `backend`).
    pub direct: Option<bool>,
    /// The process holding the table, when its committed state was read without taking it.
    pub held_by: Option<String>,
    /// `(where the journal ends, what the witness saw)` when the table file is older than its
    /// rollback witness.
    pub rolled_back: Option<(u64, u64)>,
    /// Room for new sessions, and the ended sessions making room would forget first.
    pub room: Option<RoomOut>,
}

/// Room for new sessions in `status`.
#[derive(Debug, Serialize)]
pub struct RoomOut {
    /// Session slots free.
    pub slots_free: usize,
    /// Session slots in all.
    pub slots_total: usize,
    /// Checkpoint bytes the sessions need.
    pub capacity_used: u64,
    /// Bytes of a checkpoint area.
    pub capacity_bytes: u64,
    /// The ended sessions an establish that needs room forgets, first to last (`s1`).
    pub forget_order: Vec<String>,
}

impl RoomOut {
    /// From the engine's room.
    pub fn of(r: &crate::engine::Room) -> Self {
        RoomOut {
            slots_free: r.slots_free,
            slots_total: r.sessions_max,
            capacity_used: r.capacity_used,
            capacity_bytes: r.capacity_bytes,
            forget_order: r.forget_order.iter().map(ToString::to_string).collect(),
        }
    }

    /// `room: N of M session slots free, ...; forgotten first when room is needed: s1 s2`.
    pub fn text(&self) -> String {
        const SHOWN: usize = 8;
        let mut t = format!(
            "room: {} of {} session slots free, checkpoint {} of {} used",
            self.slots_free,
            self.slots_total,
            format_size(self.capacity_used),
            format_size(self.capacity_bytes)
        );
        if self.forget_order.is_empty() {
            t.push_str("; no ended session to forget\n");
            return t;
        }
        let more = self.forget_order.len().saturating_sub(SHOWN);
        let _ = write!(
            t,
            "; ended sessions forgotten first when room is needed: {}{}",
            self.forget_order[..self.forget_order.len() - more].join(" "),
            if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            }
        );
        t.push('\n');
        t
    }
}

/// `forget`.
#[derive(Debug, Serialize)]
pub struct ForgetOut {
    /// The sessions forgotten (`s1`).
    pub forgotten: Vec<String>,
}

impl StatusOut {
    /// The text form: a header row, one row per session, the backend last.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.sessions.is_empty() {
            let _ = writeln!(out, "no sessions");
        } else {
            let _ = writeln!(
                out,
                "{:<18} {:<7} {:>6} {:>8} {:>7} {:>17} {:<24} {:>7}  SOURCE -> TARGET",
                "SESSION STATE", "MODE", "GRAIN", "SIZE", "COPIED", "GRAINS", "T0", "EXTENTS"
            );
        }
        for s in &self.sessions {
            // The id and the state stay one word apart (`s1 active`), for line-oriented tools.
            let _ = write!(
                out,
                "{:<18} {:<7} {:>6} {:>8} {:>6.1}% {:>17} {:<24} {:>7}  {} -> {}",
                format!("{} {}", s.session, s.state),
                s.mode,
                format_size(s.grain_bytes),
                format_size(s.size_bytes),
                s.percent,
                format!("{}/{}", s.grains_copied, s.grains_total),
                s.t0,
                s.extents.len(),
                s.source,
                s.target
            );
            if let Some(g) = &s.group {
                let _ = write!(out, "  group {g}");
            }
            if s.incremental {
                let _ = write!(out, "  incremental, {} grains changed", s.grains_changed);
            }
            if s.grains_to_restore > 0 {
                let _ = write!(
                    out,
                    "  reverse restore: {} grains to move back",
                    s.grains_to_restore
                );
            }
            if let Some(r) = &s.reason {
                let _ = write!(out, "  reason {r}");
            }
            if let Some(p) = &s.unavailable {
                let _ = write!(out, "; volume {p}");
            }
            for (i, e) in s.extents.iter().enumerate() {
                if let Some(r) = &e.ended {
                    let _ = write!(out, "  extent {i} ended ({r})");
                }
            }
            out.push('\n');
        }
        if let Some(r) = &self.room {
            out.push_str(&r.text());
        }
        if let Some((table_seq, witness_seq)) = self.rolled_back {
            let _ = writeln!(
                out,
                "rolled back: the table file ends at journal sequence {table_seq}, its witness \
                 saw {witness_seq}; commands refuse it (recover --accept-rollback)"
            );
        }
        match (&self.backend, &self.held_by) {
            (Some(b), _) => {
                let direct = if self.direct == Some(true) {
                    " (O_DIRECT)"
                } else {
                    ""
                };
                let _ = writeln!(out, "backend {b}{direct}");
            }
            (None, Some(h)) => {
                let _ = writeln!(out, "held by {h}: its last committed state is shown");
            }
            (None, None) => {
                let _ = writeln!(out, "not held by any process: its committed state is shown");
            }
        }
        out
    }
}

/// What recovery or a reset decided for one session.
#[derive(Debug, Serialize)]
pub struct DecisionOut {
    /// `s1`.
    pub session: String,
    /// `resumed`, `resumed-partly`, `terminated`, or the state of a session that had already
    /// ended (`completed`, `withdrawn`, `terminated`).
    pub outcome: String,
    /// Why it was terminated.
    pub reason: Option<ReasonOut>,
    /// Extents that ended (index, why).
    pub ended_extents: Vec<(u32, ReasonOut)>,
}

impl DecisionOut {
    /// `state` is the session's state now (for sessions that had ended before).
    pub fn of(d: &Decision, state: Option<SessionState>) -> Self {
        let (outcome, reason, ended) = match &d.outcome {
            Outcome::Resumed => ("resumed".to_string(), None, Vec::new()),
            Outcome::ResumedPartly(v) => (
                "resumed-partly".to_string(),
                None,
                v.iter().map(|(i, r)| (*i, ReasonOut::of(r))).collect(),
            ),
            Outcome::Terminated(r) => {
                ("terminated".to_string(), Some(ReasonOut::of(r)), Vec::new())
            }
            Outcome::Suspended(r) => ("suspended".to_string(), Some(ReasonOut::of(r)), Vec::new()),
            Outcome::ChangesUnknown(r) => (
                "completed, every grain marked changed".to_string(),
                Some(ReasonOut::of(r)),
                Vec::new(),
            ),
            Outcome::Ended => (
                state.map_or_else(|| "ended".to_string(), |s| s.to_string()),
                None,
                Vec::new(),
            ),
        };
        DecisionOut {
            session: d.session.to_string(),
            outcome,
            reason,
            ended_extents: ended,
        }
    }

    /// `s1: terminated (IdentityMismatch: ...)`.
    pub fn text(&self) -> String {
        let mut t = format!("{}: {}", self.session, self.outcome);
        if let Some(r) = &self.reason {
            let _ = write!(t, " ({r})");
        }
        for (i, r) in &self.ended_extents {
            let _ = write!(t, "; extent {i} ended ({r})");
        }
        t
    }
}

/// `recover`.
#[derive(Debug, Serialize)]
pub struct RecoverOut {
    /// What opening the table found.
    pub open: OpenReport,
    /// One decision per session.
    pub decisions: Vec<DecisionOut>,
}

impl RecoverOut {
    /// The text form.
    pub fn text(&self) -> String {
        let r = &self.open;
        let mut t = format!(
            "table generation {}{}: replayed {} commits ({} journal blocks, {} repaired){}\n",
            r.generation,
            if r.fell_back {
                " (fell back to an older copy)"
            } else {
                ""
            },
            r.commits_replayed,
            r.blocks_replayed,
            r.blocks_repaired,
            if r.journal_hole {
                "; a damaged journal block was found"
            } else {
                ""
            }
        );
        if let Some((table_seq, witness_seq)) = r.rolled_back {
            t.push_str(&format!(
                "rolled back: the table ended at journal sequence {table_seq}, its witness saw \
                 {witness_seq}; every active session was terminated\n"
            ));
        }
        for d in &self.decisions {
            t.push_str(&d.text());
            t.push('\n');
        }
        t
    }
}

/// `reset`.
#[derive(Debug, Serialize)]
pub struct ResetOut {
    /// The volume's path.
    pub volume: String,
    /// What was decided for each session using it.
    pub decisions: Vec<DecisionOut>,
}

/// The `copy` summary.
#[derive(Debug, Serialize)]
pub struct CopyOut {
    /// Bytes this run copied.
    pub bytes_copied: u64,
    /// Bytes of those the kernel copied file to file (copy offload; shared extents on XFS and
    /// Btrfs).
    pub bytes_offloaded: u64,
    /// Grains copied (of the sessions copied).
    pub grains_copied: u64,
    /// Grains in total.
    pub grains_total: u64,
    /// The file backend.
    pub backend: String,
    /// Each session's state afterwards.
    pub sessions: Vec<SessionStateOut>,
}

/// `establish` of a consistency group.
#[derive(Debug, Serialize)]
pub struct GroupOut {
    /// The group's name.
    pub group: String,
    /// Its sessions, in pair order.
    pub sessions: Vec<EstablishOut>,
}

/// `withdraw --group`.
#[derive(Debug, Serialize)]
pub struct GroupStateOut {
    /// The group's name.
    pub group: String,
    /// Its sessions and their states.
    pub sessions: Vec<SessionStateOut>,
}

/// A session and its state.
#[derive(Debug, Serialize)]
pub struct SessionStateOut {
    /// `s1`.
    pub session: String,
    /// Its state.
    pub state: String,
}

/// `write`.
#[derive(Debug, Serialize)]
pub struct WriteOut {
    /// The volume's path.
    pub volume: String,
    /// Offset written at.
    pub offset: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// `read --to`, `export`.
#[derive(Debug, Serialize)]
pub struct ImageOut {
    /// `s1`.
    pub session: String,
    /// Image offset read from.
    pub offset: u64,
    /// Bytes written to the file.
    pub bytes: u64,
    /// The file written.
    pub output: String,
}

/// `init`.
#[derive(Debug, Serialize)]
pub struct InitOut {
    /// The table's path.
    pub table: String,
    /// File size in bytes.
    pub bytes: u64,
    /// Bytes per journal copy.
    pub journal_bytes: u64,
    /// Bytes per checkpoint area.
    pub checkpoint_bytes: u64,
    /// Bytes of the copy log (0: none).
    pub log_bytes: u64,
}

/// `stop`.
#[derive(Debug, Serialize)]
pub struct StopOut {
    /// The table's path.
    pub table: String,
    /// The serving process was asked to stop.
    pub asked: bool,
}
