//! Pause points for fault harnesses: a hook (feature `fault`) that runs at named places where a
//! thread has looked at one piece of shared state and is about to look at another, so that a
//! test can run a whole concurrent operation in between and prove the pair of looks is safe
//! against it (interleavings a scheduler produces only rarely, on a loaded machine).
//!
//! Without the feature, [`pause`] is an empty inline function.

/// A place where the engine calls the pause hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PausePoint {
    /// The background copier holds a run of grains and has looked at which of them held
    /// writes copied (write-back mode), and not yet at their copied bits.
    Copier,
    /// A held source write (write-back mode) holds its grains and has looked at which of them
    /// earlier held writes copied, and not yet at their copied bits.
    HeldWrite,
    /// A write that is not held (to a session's target, say) holds its grains, has found none
    /// of them copied by a held write on its source, has looked at their copied bits, and has
    /// not yet read the T0 bytes of the uncopied ones from the sources.
    SyncWrite,
}

#[cfg(feature = "fault")]
mod hook {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use parking_lot::RwLock;

    use super::PausePoint;

    /// What a harness runs at a pause point.
    pub type PauseHook = Arc<dyn Fn(PausePoint) + Send + Sync>;

    static ARMED: AtomicBool = AtomicBool::new(false);
    static HOOK: RwLock<Option<PauseHook>> = parking_lot::const_rwlock(None);

    /// Set (or with `None`, clear) the process-wide pause hook. It runs in the thread that
    /// reaches the point, which may hold grain locks and a volume's write gate (shared): it may
    /// block until another thread has done its work, as long as that work needs neither.
    pub fn set_pause_hook(hook: Option<PauseHook>) {
        let armed = hook.is_some();
        *HOOK.write() = hook;
        ARMED.store(armed, Ordering::Release);
    }

    /// Run the hook, when one is set, at `point`.
    #[inline]
    pub(crate) fn pause(point: PausePoint) {
        if !ARMED.load(Ordering::Acquire) {
            return;
        }
        let hook = HOOK.read().clone();
        if let Some(h) = hook {
            h(point);
        }
    }
}

#[cfg(feature = "fault")]
pub(crate) use hook::pause;
#[cfg(feature = "fault")]
pub use hook::{set_pause_hook, PauseHook};

/// Without the `fault` feature there is no hook.
#[cfg(not(feature = "fault"))]
#[inline(always)]
pub(crate) fn pause(_point: PausePoint) {}
