//! Fault-injection harness (feature `fault`): simulated devices that record every write with
//! its flush epoch and build the crash images the crash model allows, an online ordering
//! checker, and the crash-state enumerator behind `timezero crashtest`.
//!
//! Faults covered: F1 (crash after every mutating I/O, including during recovery), F2/F5
//! (any subset of unsynced writes lost: exhaustive for small counts, drop-one and seeded random
//! subsets otherwise), F4 (512-byte tears of the last unsynced table write: prefix, suffix,
//! garbage sector), F6 (a table write lands elsewhere in the table: another journal slot, a
//! superblock slot, a checkpoint area or anywhere, then a crash at points after it; and a table
//! read returns another place's bytes), F7 ([`flip_bit`]), F8
//! (ENOSPC on every write from the N-th I/O), F9 (EIO on the N-th I/O once or forever, failing
//! sync).
//! [`FaultyVolume`] brings the volume faults to any [`crate::volume::Volume`] (a real file or
//! device): failed reads, writes and flushes, ENOSPC past a size, torn writes, and a crash that
//! loses what no flush covered.
//! [`powerloss`] brings power cuts to real processes: a FUSE file system that keeps every write
//! volatile until `fsync`/`fdatasync` and drops (all, some, or torn pieces of) the rest.
//! Everything is seeded and deterministic; violation messages name the workload and seed.

mod checker;
pub mod crashtest;
mod faulty;
pub mod fuzzing;
pub mod internals;
pub mod powerloss;
mod sim;

pub use checker::OrderingChecker;
pub use crashtest::{
    catalogue, catalogue_with, check_misdirected_write, crashtest, engine_options, CrashReport,
    CrashtestOptions, Op, Workload,
};
pub use faulty::{CrashMode, FaultCounts, FaultPlan, FaultyVolume, InjectedError, Trigger};
pub use sim::{
    flip_bit, CrashCursor, CrashLog, DevKind, Fate, Faults, IoEvent, SimStorage, SimVolume,
    SimWorld, SECTOR,
};
