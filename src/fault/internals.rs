//! Internals the crate's own benchmarks measure directly, reachable only with the `fault`
//! feature. Not a stable API: they are private to the library, and a program that links
//! timezero has no use for them (the engine is the way to change a table or a bitmap).

/// The lock-free copied bitmap (one bit per grain) the write path tests on every write.
pub use crate::bitmap::AtomicBitmap;

/// What proving a session's checked copies found, as [`Table::open_verified`]'s verifier
/// returns it.
pub use crate::activity::CopyProof;
/// The table itself: opened directly by tests that check recovery below the engine.
pub use crate::activity::Table;
/// The table's on-disk format and its bounds-checked encoding, for tests that forge or damage
/// a table byte by byte (docs/format.md describes the same bytes).
pub use crate::activity::{codec, format};
/// A journal entry, as [`commit`] takes them.
pub use crate::model::Entry;

/// Canaries: each switches off one ordering rule of the engine, so that a test shows its
/// checker catches the resulting wrong state (docs/crash-model.md).
pub use crate::activity::{
    set_canary_skip_log_write, set_canary_skip_log_write_all_threads,
    set_canary_unverified_checkpoint,
};
pub use crate::engine::{
    set_canary_late_change_marks, set_canary_restored_before_flush, set_canary_skip_cbw_flush,
    set_canary_skip_cbw_flush_all_threads, set_canary_split_group_commit,
};
/// Which of a checked copy's two durability points a first write hands to a flusher thread
/// (the crash enumerator runs both arrangements).
pub use crate::engine::{set_checked_commit_on_thread, set_checked_commit_on_thread_all_threads};
/// Pause points: a hook that runs where the engine has looked at one piece of shared state
/// and not yet at the next, so that a test can run a whole concurrent operation in between.
pub use crate::engine::{set_pause_hook, PauseHook, PausePoint};
use crate::Result;

/// Commit `entries` to a table directly, past every check the engine makes before it writes
/// one (that the grains a `SetBits` names were copied, for one): for tests that forge a table
/// state and benchmarks that time a commit. A program that links timezero changes a table only
/// through [`crate::Engine`].
///
/// # Errors
/// As the table's commit: [`crate::Error::Poisoned`], I/O errors, [`crate::Error::TableFull`].
pub fn commit(table: &Table, entries: Vec<Entry>) -> Result<()> {
    table.commit(entries)
}
