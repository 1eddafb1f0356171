#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The modules, alphabetically. docs/design.md ("## Layers") lists them lowest first, and
// tests/layers.rs checks every reference between them against that list.
mod activity;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod bench;
mod bitmap;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod calendar;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod catalog;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod cli;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod clock;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod command;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod control;
mod engine;
mod error;
#[cfg(feature = "fault")]
#[cfg_attr(docsrs, doc(cfg(feature = "fault")))]
pub mod fault;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod hook;
mod ids;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod job;
pub mod limits;
mod model;
#[cfg(feature = "fuse")]
#[cfg_attr(docsrs, doc(cfg(feature = "fuse")))]
pub mod mount;
pub mod nbd;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod plan;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod quiesce;
mod session;
mod state;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod store;
mod sync;
mod units;
mod volume;

// The public API: the modules above are private (but for the subsystems `nbd`, `limits`, the
// feature-gated harness and tools, and the orchestration layers), and what a program that links
// timezero names is re-exported here, grouped by the module it comes from.

// The engine: open a table, establish and end sessions, write, read images, copy, recover.
pub use engine::copier::{Copier, CopierControl, CopierEvent, CopierOptions, Progress};
pub use engine::{
    read_status, table_room, CopyErrorPolicy, CopyProgress, Decision, Engine, EngineOptions,
    FileResolver, Image, MapResolver, Outcome, Refreshed, ResetHandled, RestartPolicy, Reversed,
    Room, SessionSpec, SessionStatus, TableSnapshot, VolumeResolver,
};
// Errors.
pub use error::{Corruption, Error, Result};
// Identities and units.
pub use ids::{Generation, GrainCount, GrainIndex, GrainSize, Seq, SessionId, VolumeId};
// The domain's value types, as the table records them.
pub use model::{
    CopyMode, ExtentSpec, Reason, ReasonCode, SessionDesc, SessionImage, SessionState, VolumeRef,
};
// A session as the engine shows it (read-only outside the crate).
pub use session::{GrainHold, Session, Status};
// The activity table's storage and reports.
/// A table's 16-byte identity, chosen at `init` and bound into every record.
pub use activity::format::TableId;
pub use activity::{
    table_holder, MemStorage, MmapStorage, OpenReport, TableOptions, TableStats, TableStorage,
};
// Volumes: the trait, the backends and opening a file with a backend.
pub use volume::{
    check_range, open_file_volume, Backend, CheckedVolume, FileVolume, FileVolumeOptions,
    FirstFailure, MemVolume, Volume, VolumeInfo, BACKEND_IO_URING, BACKEND_PREAD,
    BACKEND_PREAD_IO_URING,
};
#[cfg(feature = "uring")]
#[cfg_attr(docsrs, doc(cfg(feature = "uring")))]
pub use volume::{uring_available, UringVolume};
// Policy helpers around volumes: whether a volume visibly holds data (the command line refuses
// such a target without --force), and making a directory entry durable.
pub use volume::{sync_dir, visible_data, PROBE_BYTES};

/// The types most programs that link timezero use: `use timezero::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Copier, CopierOptions, CopyMode, Engine, EngineOptions, Error, ExtentSpec, FileVolume,
        GrainCount, GrainIndex, GrainSize, Image, MemVolume, Result, SessionId, SessionSpec,
        TableOptions, Volume,
    };
}
