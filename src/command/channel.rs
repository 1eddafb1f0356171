//! How a command talks to whoever asked for it ([`Channel`]), and the registry of the copies
//! running in a serving process ([`CopyRegistry`]).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::engine::copier::CopierControl;
use crate::engine::Engine;
use crate::ids::SessionId;
use crate::model::CopyMode;
use crate::{Error, Result};

/// How a command talks to whoever asked for it: the local terminal, or a client of the control
/// socket.
pub trait Channel {
    /// The bytes of a `write` (exactly the length the request names).
    ///
    /// # Errors
    /// When the bytes cannot be had.
    fn input(&mut self) -> Result<&mut dyn Read>;
    /// Data for the caller (`read`, `export`).
    ///
    /// # Errors
    /// When the data cannot be delivered.
    fn output(&mut self, bytes: &[u8]) -> Result<()>;
    /// One line of progress.
    fn progress(&mut self, line: &str);
    /// How often a running copy reports progress.
    fn progress_interval(&self) -> Duration;
    /// `Some(error to return)` when the caller asked to stop the command (Ctrl-C), or the
    /// serving process is stopping.
    fn interrupted(&mut self) -> Option<Error>;
    /// The running copies of the serving process (`None` outside one).
    fn copies(&self) -> Option<CopyRegistry>;
}

/// The copies running in a serving process, so that `pause`, `resume` and `rate` can reach
/// them.
#[derive(Debug, Clone, Default)]
pub struct CopyRegistry {
    inner: Arc<Mutex<(u64, HashMap<u64, CopierControl>)>>,
}

/// Removes a copy from its [`CopyRegistry`] when dropped.
#[derive(Debug)]
pub struct Registered {
    registry: CopyRegistry,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.inner.lock().1.remove(&self.id);
    }
}

impl CopyRegistry {
    /// Record a running copy until the returned guard is dropped.
    #[must_use]
    pub fn register(&self, c: CopierControl) -> Registered {
        let mut g = self.inner.lock();
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, c);
        Registered {
            registry: self.clone(),
            id,
        }
    }

    /// The running copies that copy `session` (those started for it, and those started for
    /// every session while it is an active copy-mode session).
    #[must_use]
    pub fn find(&self, engine: &Engine, session: SessionId) -> Vec<CopierControl> {
        let copying = engine
            .session(session)
            .is_ok_and(|s| s.is_active() && s.status().mode == CopyMode::Copy);
        self.inner
            .lock()
            .1
            .values()
            .filter(|c| c.sessions().contains(&session) || (c.sessions().is_empty() && copying))
            .cloned()
            .collect()
    }
}
