#![doc = include_str!("../README.md")]

pub mod error;
pub mod ids;
pub mod limits;
pub mod model;
pub mod units;
pub mod volume;
pub use error::{Error, Result};
pub mod activity;
pub mod bench;
pub mod bitmap;
pub mod cli;
pub mod command;
pub mod control;
/// The background copier (see [`engine::copier`]).
pub use engine::copier;
pub mod engine;
#[cfg(feature = "fault")]
pub mod fault;
pub mod nbd;
pub mod session;
pub mod sync;
