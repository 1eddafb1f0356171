//! Internals the crate's own benchmarks measure directly, reachable only with the `fault`
//! feature. Not a stable API: they are private to the library, and a program that links
//! timezero has no use for them (the engine is the way to change a table or a bitmap).

/// The lock-free copied bitmap (one bit per grain) the write path tests on every write.
pub use crate::bitmap::AtomicBitmap;

use crate::activity::Table;
use crate::model::Entry;
use crate::Result;

/// Commit `entries` to a table directly, past every check the engine makes before it writes
/// one (that the grains a `SetBits` names were copied, for one): for tests that forge a table
/// state and benchmarks that time a commit. A program that links timezero changes a table only
/// through [`crate::engine::Engine`].
///
/// # Errors
/// As the table's commit: [`crate::Error::Poisoned`], I/O errors, [`crate::Error::TableFull`].
pub fn commit(table: &Table, entries: Vec<Entry>) -> Result<()> {
    table.commit(entries)
}
