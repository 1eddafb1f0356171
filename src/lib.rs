#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The modules, alphabetically. docs/design.md ("## Layers") lists them lowest first, and
// tests/layers.rs checks every reference between them against that list.
pub mod activity;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod bench;
mod bitmap;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod calendar;
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
pub mod engine;
pub mod error;
#[cfg(feature = "fault")]
#[cfg_attr(docsrs, doc(cfg(feature = "fault")))]
pub mod fault;
pub mod ids;
pub mod limits;
pub mod model;
pub mod nbd;
pub mod session;
mod state;
#[cfg(feature = "orchestration")]
#[cfg_attr(docsrs, doc(cfg(feature = "orchestration")))]
pub mod store;
mod sync;
mod units;
pub mod volume;

/// The background copier (see [`engine::copier`]).
pub use engine::copier;

pub use activity::TableOptions;
pub use engine::copier::{Copier, CopierEvent, CopierOptions};
pub use engine::{
    Decision, Engine, EngineOptions, Image, Outcome, RestartPolicy, SessionSpec, SessionStatus,
};
pub use error::{Error, Result};
pub use ids::{GrainCount, GrainIndex, GrainSize, SessionId, VolumeId};
pub use model::{CopyMode, ExtentSpec, Reason, ReasonCode, SessionState};
pub use volume::{FileVolume, FileVolumeOptions, MemVolume, Volume, VolumeInfo};

/// The types most programs that link timezero use: `use timezero::prelude::*;`.
pub mod prelude {
    pub use crate::activity::TableOptions;
    pub use crate::engine::copier::{Copier, CopierOptions};
    pub use crate::engine::{Engine, EngineOptions, Image, SessionSpec};
    pub use crate::error::{Error, Result};
    pub use crate::ids::{GrainCount, GrainIndex, GrainSize, SessionId};
    pub use crate::model::{CopyMode, ExtentSpec};
    pub use crate::volume::{FileVolume, MemVolume, Volume};
}
