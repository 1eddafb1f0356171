//! Incremental refresh: a new T0 for an incremental session (or a consistency group of them)
//! that re-copies only the grains marked changed since the last T0.

use std::sync::Arc;

use crate::ids::{GrainCount, SessionId};
use crate::model::{Entry, SessionState};
use crate::session::Session;
use crate::{Error, Result};

use super::Engine;

/// The uncopied grains of the session's live extents.
fn uncopied_live(s: &Session) -> GrainCount {
    let st = s.status();
    GrainCount(
        s.map
            .image_pieces(0, s.map.image_len())
            .filter(|p| st.ended.get(p.extent).is_some_and(Option::is_none))
            .map(|p| {
                let (g0, g1) = s.map.grains_of(&p);
                (g1 - g0) - s.bits().count_set(g0, g1 - g0)
            })
            .sum(),
    )
}

/// What a refresh did to one session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refreshed {
    /// The session.
    pub session: SessionId,
    /// Its new T0, ms since the Unix epoch.
    pub t0_unix_ms: u64,
    /// Grains the copy has to move now (those marked changed, plus any never copied).
    pub grains_to_copy: GrainCount,
    /// The same in bytes.
    pub bytes_to_copy: u64,
}

impl Engine {
    /// Take a new T0 for an incremental session (active or completed): from the moment this
    /// returns its image reads as the source does now, and only the grains written since the
    /// last T0 (through the engine, on its source or its target), plus any never copied, are
    /// copied again; start a [`crate::Copier`] to move them. The session is active until that
    /// copy completes.
    ///
    /// Writers of the session's volumes are held out while the new T0 is taken, as for an
    /// establish, and copies in flight on the session finish first.
    ///
    /// # Errors
    /// [`Error::UnknownSession`]; [`Error::NotIncremental`]; [`Error::NotActive`] for a session
    /// that is suspended or ended (withdrawn, terminated); [`Error::Invalid`] for a session of
    /// a consistency group (refresh the group: [`Engine::refresh_group`]); table errors.
    pub fn refresh(&self, id: SessionId) -> Result<Refreshed> {
        let s = self.session(id)?;
        if let Some(g) = &s.desc.group {
            return Err(Error::invalid(
                "refresh",
                format!("{id} belongs to consistency group {g}: refresh the group (--group {g})"),
            ));
        }
        let mut out = self.refresh_sessions(&[s])?;
        Ok(out.remove(0))
    }

    /// Take one new T0 for every session of consistency group `name` (each must be
    /// incremental), in one commit: after a crash, all of them are refreshed or none.
    ///
    /// # Errors
    /// [`Error::UnknownGroup`] when no session of the group holds its volumes; as
    /// [`Engine::refresh`] otherwise.
    pub fn refresh_group(&self, name: &str) -> Result<Vec<Refreshed>> {
        let ids = self.live_in_group(name);
        if ids.is_empty() {
            return Err(Error::UnknownGroup(name.to_string()));
        }
        let sessions = ids
            .iter()
            .map(|id| self.session(*id))
            .collect::<Result<Vec<_>>>()?;
        self.refresh_sessions(&sessions)
    }

    fn refresh_sessions(&self, sessions: &[Arc<Session>]) -> Result<Vec<Refreshed>> {
        let check = |s: &Session| -> Result<()> {
            if !s.desc.incremental {
                return Err(Error::NotIncremental(s.id()));
            }
            super::lifecycle::refuse_reversing(s, "a refresh")?;
            // A reverse restore onto (or from) one of its volumes: the new T0 would be the
            // volume's bytes, not what its clients see.
            let mine = [s.desc.source.id, s.desc.target.id];
            if let Some(o) = self.active.load().iter().find(|o| {
                o.reversing()
                    && (mine.contains(&o.desc.source.id) || mine.contains(&o.desc.target.id))
            }) {
                return Err(Error::Reversing {
                    id: o.id(),
                    pending: o.restore_pending().get(),
                    what: format!("a refresh of {}", s.id()),
                });
            }
            match s.state() {
                SessionState::Active | SessionState::Completed => Ok(()),
                state => Err(Error::NotActive { id: s.id(), state }),
            }
        };
        for s in sessions {
            check(s)?;
        }
        // Hold out every writer of the sessions' volumes (in id order, as establish does),
        // then every copy in flight on the sessions.
        let mut vols: Vec<_> = sessions
            .iter()
            .flat_map(|s| [s.desc.source.id, s.desc.target.id])
            .collect();
        vols.sort_unstable();
        vols.dedup();
        let handles = vols
            .iter()
            .map(|v| self.handle(*v))
            .collect::<Result<Vec<_>>>()?;
        let _gates = super::hold_gates(&handles);
        // Held writes are copied under the bits the refresh clears: they reach the volumes first.
        self.drain_gated(&handles)?;
        let _grains: Vec<_> = sessions
            .iter()
            .map(|s| s.locks.lock(0, s.desc.grains()))
            .collect();
        // A withdraw may have come first.
        for s in sessions {
            check(s)?;
        }
        // The new T0 includes every write acknowledged before it: make the sources durable.
        for h in &handles {
            if sessions.iter().any(|s| s.desc.source.id == h.info.id) {
                h.flush()?;
            }
        }
        let t0_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        let entries: Vec<Entry> = sessions
            .iter()
            .map(|s| Entry::Refresh {
                session: s.id(),
                t0_unix_ms,
            })
            .collect();
        if let Err(e) = self.table.commit_atomic(entries) {
            // The refresh may have reached the table (a failed durability point says nothing
            // either way), while this engine still holds the old T0: a write now could change a
            // grain of the new T0 without copying it first. Refuse writes to the sessions'
            // volumes until the table is reopened and recovery decides, as after a failed
            // establish.
            for h in &handles {
                h.fenced.store(true, std::sync::atomic::Ordering::Release);
            }
            return Err(e);
        }
        self.refresh_active();
        Ok(sessions
            .iter()
            .map(|s| {
                let grains_to_copy = uncopied_live(s);
                Refreshed {
                    session: s.id(),
                    t0_unix_ms,
                    grains_to_copy,
                    bytes_to_copy: grains_to_copy.bytes(s.desc.grain),
                }
            })
            .collect())
    }
}
