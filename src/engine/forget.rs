//! Room for sessions: how many a table holds, and forgetting ended sessions.
//!
//! A table holds at most [`SESSIONS_MAX`] sessions, live or ended, and their descriptors and
//! bitmaps must fit its checkpoint area. An ended session (completed, withdrawn, terminated)
//! stays listed, with why it ended, until it is forgotten: explicitly ([`Engine::forget`],
//! [`Engine::forget_ended`], `timezero forget`), or when an establish needs room, which forgets
//! the oldest ended sessions first ([`Room::forget_order`] lists them in that order).

use super::Engine;
use crate::activity::Table;
use crate::ids::SessionId;
use crate::limits::SESSIONS_MAX;
use crate::{Error, Result};

/// How much room a table has for new sessions, and which ended sessions making room would
/// forget first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Room {
    /// Sessions in the table, live and ended.
    pub sessions: usize,
    /// The most sessions a table holds.
    pub sessions_max: usize,
    /// Session slots free (`sessions_max - sessions`).
    pub slots_free: usize,
    /// Checkpoint bytes the sessions need (descriptors and bitmaps, estimated as the table
    /// reserves them).
    pub capacity_used: u64,
    /// Bytes of a checkpoint area.
    pub capacity_bytes: u64,
    /// The ended sessions, in the order an establish that needs room forgets them (oldest
    /// first).
    pub forget_order: Vec<SessionId>,
}

/// The room of `table` now.
#[must_use]
pub fn table_room(table: &Table) -> Room {
    let sessions = table.sessions().len();
    let (capacity_used, capacity_bytes) = table.capacity();
    Room {
        sessions,
        sessions_max: SESSIONS_MAX,
        slots_free: SESSIONS_MAX.saturating_sub(sessions),
        capacity_used,
        capacity_bytes,
        forget_order: table.forget_order(),
    }
}

impl Engine {
    /// How much room the table has for new sessions, and which ended sessions would be
    /// forgotten first when an establish needs room.
    #[must_use]
    pub fn room(&self) -> Room {
        table_room(&self.table)
    }

    /// Remove an ended session (completed, withdrawn or terminated) from the table, in one
    /// commit: it no longer shows in the status and its slot is free.
    ///
    /// # Errors
    /// [`Error::UnknownSession`]; [`Error::NotEnded`] for an active or suspended session
    /// (withdraw it first); table errors.
    ///
    /// # Example
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
    /// let source = engine.attach(Arc::new(MemVolume::new("src", 256 << 10)));
    /// let target = engine.attach(Arc::new(MemVolume::new("tgt", 256 << 10)));
    /// let id = engine.establish(&SessionSpec::whole(source, target))?;
    /// assert!(matches!(engine.forget(id), Err(Error::NotEnded { .. })));
    /// engine.withdraw(id)?;
    /// assert_eq!(engine.room().forget_order, vec![id]);
    /// engine.forget(id)?;
    /// assert!(engine.status().is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn forget(&self, id: SessionId) -> Result<()> {
        let s = self.session(id)?;
        if s.holds_volumes() {
            return Err(Error::NotEnded {
                id,
                state: if s.is_live() {
                    s.state().to_string()
                } else {
                    format!("{}, recording changes for a refresh", s.state())
                },
            });
        }
        if self.table.forget(&[id])?.is_empty() {
            // Forgotten meanwhile (to make room for an establish).
            return Err(Error::UnknownSession(id));
        }
        Ok(())
    }

    /// Remove every ended session from the table in one commit; returns their ids (none: an
    /// empty list).
    ///
    /// # Errors
    /// Table errors.
    pub fn forget_ended(&self) -> Result<Vec<SessionId>> {
        self.table.forget(&self.table.forget_order())
    }
}
