//! Consistency groups: several sessions established at one T0 and made durable by one commit,
//! and ended together.
//!
//! Establishing a group holds the write gates of every volume of every pair at once (in volume
//! id order, like a single establish holds its two), makes every source durable, and commits
//! every `Establish` entry in one journal commit ([`crate::activity::Table::commit_atomic`]).
//! So a write to any source of the group completed before T0 on every image or started after
//! it on every image, and a crash at any point leaves, after recovery, every session of the
//! group or none of them. The group's name is part of each session's descriptor.

use std::sync::Arc;

use super::lifecycle::Pair;
use super::{Engine, SessionSpec, VolumeHandle};
use crate::ids::SessionId;
use crate::limits::GROUP_NAME_BYTES_MAX;
use crate::model::{Entry, Reason, ReasonCode, SessionDesc, SessionState, VolumeRef};
use crate::session::Session;
use crate::{Error, Result};

#[cfg(feature = "fault")]
thread_local! {
    static CANARY_SPLIT_GROUP_COMMIT: std::cell::Cell<bool> =
        const { std::cell::Cell::new(false) };
}

/// Fault-harness canary: while on, a group establish in the calling thread commits each
/// session in a commit of its own (each durable before the next is written), so a crash
/// between two of them leaves part of the group; the enumerator's all-or-none check must catch
/// it. Thread-local so that parallel tests are not affected.
#[cfg(feature = "fault")]
pub fn set_canary_split_group_commit(on: bool) {
    CANARY_SPLIT_GROUP_COMMIT.with(|c| c.set(on));
}

/// Commit a group's entries: one atomic commit (the canary splits it).
fn commit_group(table: &crate::activity::Table, entries: Vec<Entry>) -> Result<()> {
    #[cfg(feature = "fault")]
    if CANARY_SPLIT_GROUP_COMMIT.with(std::cell::Cell::get) {
        for e in entries {
            table.commit(vec![e])?;
        }
        return Ok(());
    }
    table.commit_atomic(entries)
}

/// Check a group name: 1 to [`GROUP_NAME_BYTES_MAX`] bytes of ASCII letters, digits, `.`, `_`
/// and `-`, not starting with `-`.
///
/// # Errors
/// [`Error::Invalid`] naming what is wrong.
fn check_group_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > GROUP_NAME_BYTES_MAX
        || !name.chars().all(ok_char)
        || name.starts_with('-')
    {
        return Err(Error::invalid(
            "group name",
            format!(
                "'{name}': 1 to {GROUP_NAME_BYTES_MAX} ASCII letters, digits, '.', '_' or '-', \
                 not starting with '-'"
            ),
        ));
    }
    Ok(())
}

fn overlaps(a: u64, al: u64, b: u64, bl: u64) -> bool {
    a < b.saturating_add(bl) && b < a.saturating_add(al)
}

impl Engine {
    /// Establish a consistency group: one session per spec, all at one T0. The writers of
    /// every source and target are held out together, every source is made durable, and one
    /// table commit makes every session durable, so a write to any source completed before T0
    /// on every image or starts after it on every image, and a crash at any point leaves every
    /// session of the group or none of them. Returns the session ids in the order of `specs`.
    ///
    /// The group's `name` is recorded with each session ([`super::SessionStatus::group`]);
    /// it must not be the name of a group that still has a live session.
    /// [`Engine::withdraw_group`] ends all of them in one commit.
    ///
    /// # Errors
    /// [`Error::GroupPair`] naming the first pair that cannot be established (its error
    /// inside: the errors of [`Engine::establish`], or [`Error::GroupConflict`] when it would
    /// use a range an earlier pair of the group uses as a target); then no session is
    /// established. [`Error::GroupExists`], [`Error::Invalid`] (a bad name, no pairs, or more
    /// pairs than one journal commit holds), [`Error::TableFull`], table errors.
    ///
    /// # Example
    ///
    /// Two sources (say a database's data and its log) copied at one T0: a write to the log
    /// after the establish leaves both images as they were.
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
    /// let data = engine.attach(Arc::new(MemVolume::with_data("data", &[1u8; 256 << 10])));
    /// let log = engine.attach(Arc::new(MemVolume::with_data("log", &[2u8; 256 << 10])));
    /// let data_copy = engine.attach(Arc::new(MemVolume::new("data-copy", 256 << 10)));
    /// let log_copy = engine.attach(Arc::new(MemVolume::new("log-copy", 256 << 10)));
    ///
    /// let ids = engine.establish_group(
    ///     "db",
    ///     &[SessionSpec::whole(data, data_copy), SessionSpec::whole(log, log_copy)],
    /// )?; // one T0 for both
    /// engine.write(log, 0, &[3u8; 4096])?;
    ///
    /// let mut image = [0u8; 4096];
    /// engine.read_image(ids[1], 0, &mut image)?;
    /// assert_eq!(image, [2u8; 4096]); // the log at T0
    /// let status = engine.status();
    /// assert!(status.iter().all(|s| s.group.as_deref() == Some("db")));
    /// assert_eq!(status[0].created_unix_ms, status[1].created_unix_ms);
    ///
    /// assert_eq!(engine.withdraw_group("db")?, ids); // both end in one commit
    /// # Ok(())
    /// # }
    /// ```
    pub fn establish_group(&self, name: &str, specs: &[SessionSpec]) -> Result<Vec<SessionId>> {
        check_group_name(name)?;
        if specs.is_empty() {
            return Err(Error::invalid(
                "group",
                format!("{name}: no pairs to establish"),
            ));
        }
        let _names = self.groups_change.lock();
        if let Some(s) = self.live_in_group(name).first() {
            return Err(Error::GroupExists {
                name: name.to_string(),
                other: *s,
            });
        }
        let pair_err = |i: usize, spec: &SessionSpec, e: Error| {
            let path = |v| {
                self.handle(v)
                    .map_or_else(|_| v.to_string(), |h| h.info.locator.clone())
            };
            Error::GroupPair {
                group: name.to_string(),
                pair: i + 1,
                source_path: path(spec.source),
                target_path: path(spec.target),
                error: Box::new(e),
            }
        };
        let mut pairs: Vec<Pair> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let p = self
                .session_pair(spec)
                .and_then(|p| {
                    check_within_group(&pairs, &p)?;
                    Ok(p)
                })
                .map_err(|e| pair_err(i, spec, e))?;
            pairs.push(p);
        }
        // One T0 for every session of the group.
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        let descs: Vec<SessionDesc> = pairs
            .iter()
            .zip(specs)
            .map(|(p, spec)| SessionDesc {
                id: self.table.allocate_session_id(),
                mode: spec.mode,
                grain: spec.grain,
                source: VolumeRef::from(&p.src.info),
                target: VolumeRef::from(&p.tgt.info),
                extents: p.extents.clone(),
                created_unix_ms: t0,
                group: Some(name.to_string()),
                incremental: spec.incremental,
            })
            .collect();
        let entries: Vec<Entry> = descs.iter().cloned().map(Entry::Establish).collect();
        let bytes: usize = entries.iter().map(Entry::encoded_len).sum();
        if bytes > crate::activity::Table::commit_payload_max() {
            return Err(Error::invalid(
                "group",
                format!(
                    "{name}: its {} pairs need {bytes} bytes in one journal commit, at most {} \
                     fit (fewer pairs, or shorter paths)",
                    specs.len(),
                    crate::activity::Table::commit_payload_max()
                ),
            ));
        }
        // Held until the commit below: no other establish takes the same room.
        let _room = self.table.make_room_for(&descs)?;
        // T0: drain the writers of every volume of the group (in id order), make every source
        // durable, commit every session at once.
        let mut volumes: Vec<Arc<VolumeHandle>> = pairs
            .iter()
            .flat_map(|p| [Arc::clone(&p.src), Arc::clone(&p.tgt)])
            .collect();
        volumes.sort_by_key(|h| h.info.id);
        volumes.dedup_by_key(|h| h.info.id);
        let _gates = super::hold_gates(&volumes);
        self.drain_gated(&volumes)?;
        // Re-validate against sessions established while we waited.
        for (i, (p, spec)) in pairs.iter().zip(specs).enumerate() {
            self.validate(&p.src.info, &p.tgt.info, spec.grain, &p.extents)
                .map_err(|e| pair_err(i, spec, e))?;
        }
        let mut sources: Vec<&Arc<VolumeHandle>> = pairs.iter().map(|p| &p.src).collect();
        sources.sort_by_key(|h| h.info.id);
        sources.dedup_by_key(|h| h.info.id);
        for s in sources {
            s.flush()?;
        }
        if let Err(e) = commit_group(&self.table, entries) {
            // As for a single establish: the commit may have reached the table, and recovery
            // may resume every session of the group; no source or target of it may change
            // until the table is reopened and recovery decides.
            for h in &volumes {
                h.fenced.store(true, std::sync::atomic::Ordering::Release);
            }
            return Err(e);
        }
        self.refresh_active();
        Ok(descs.iter().map(|d| d.id).collect())
    }

    /// The sessions of group `name` that hold their volumes (active, suspended, or completed
    /// and recording changes), by id.
    #[must_use]
    pub fn live_in_group(&self, name: &str) -> Vec<SessionId> {
        self.table
            .sessions()
            .iter()
            .filter(|s| s.holds_volumes() && s.desc.group.as_deref() == Some(name))
            .map(|s| s.id())
            .collect()
    }

    /// End every live session of group `name` at the user's request, in one commit (after a
    /// crash, all of them are withdrawn or none). Returns their ids.
    ///
    /// # Errors
    /// [`Error::UnknownGroup`] when no session of the group is live; table errors.
    pub fn withdraw_group(&self, name: &str) -> Result<Vec<SessionId>> {
        let ids = self.live_in_group(name);
        if ids.is_empty() {
            return Err(Error::UnknownGroup(name.to_string()));
        }
        let sessions = ids
            .iter()
            .map(|id| self.session(*id))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Session> = sessions.iter().map(|s| &**s).collect();
        let handles = self.handles_of(&refs);
        let _gates = super::hold_gates(&handles);
        for s in &sessions {
            super::lifecycle::refuse_reversing(s, "a withdraw of its group")?;
        }
        let reason = Reason::new(
            ReasonCode::Withdrawn,
            format!("withdrawn by request with group {name}"),
        );
        self.table.commit_atomic(
            ids.iter()
                .map(|id| Entry::SetState {
                    session: *id,
                    state: SessionState::Withdrawn,
                    reason: Some(reason.clone()),
                })
                .collect(),
        )?;
        self.refresh_active();
        Ok(ids)
    }
}

/// Refuse a pair that would use, on one volume, a range an earlier pair of the group uses as
/// a target, or a target range an earlier pair uses at all (as a source or a target).
fn check_within_group(earlier: &[Pair], p: &Pair) -> Result<()> {
    for (j, o) in earlier.iter().enumerate() {
        for e in &p.extents {
            for oe in &o.extents {
                let conflict = |what: &'static str, h: &VolumeHandle, offset: u64| {
                    Err(Error::GroupConflict {
                        what,
                        volume: h.info.locator.clone(),
                        offset,
                        len: e.len,
                        other: j + 1,
                    })
                };
                if p.tgt.info.id == o.tgt.info.id
                    && overlaps(e.target_offset, e.len, oe.target_offset, oe.len)
                {
                    return conflict("target range", &p.tgt, e.target_offset);
                }
                if p.tgt.info.id == o.src.info.id
                    && overlaps(e.target_offset, e.len, oe.source_offset, oe.len)
                {
                    return conflict("target range", &p.tgt, e.target_offset);
                }
                if p.src.info.id == o.tgt.info.id
                    && overlaps(e.source_offset, e.len, oe.target_offset, oe.len)
                {
                    return conflict("source range", &p.src, e.source_offset);
                }
            }
        }
    }
    Ok(())
}
