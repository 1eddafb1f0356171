//! Activity tables: the durable record of sessions, their extents, states and copied bits.
//!
//! A table is a preallocated, memory-mapped file (see [`self::format`] for every byte): two
//! superblocks, a mirrored journal of 512-byte CRC-checked blocks, and three checkpoint areas
//! (two named by the superblocks, one to write the next checkpoint into).
//! `Table::commit` (crate-internal) is the only way state changes: entries are written to the journal, made
//! durable (many callers share one durability point), and only then applied to the in-memory
//! [`crate::session::Session`]s.

mod checked;
pub mod codec;
pub mod format;
#[allow(unsafe_code)]
mod mmap;
mod replay;
mod storage;
mod table;

pub(crate) use checked::{FlushFn, LogRun};
pub use storage::{table_holder, MemStorage, MmapStorage, TableStorage};
#[cfg(feature = "fault")]
pub use table::{
    set_canary_skip_log_write, set_canary_skip_log_write_all_threads,
    set_canary_unverified_checkpoint,
};
pub use table::{CopyProof, LogBytes, OpenReport, Table, TableOptions, TableStats};
