//! Volumes: the only door to storage.
//!
//! A [`Volume`] is a block-addressable store with an identity ([`VolumeInfo`]). Backends:
//! [`FileVolume`] (regular files and block devices, pread/pwrite, optional `O_DIRECT`),
//! `UringVolume` (the same through `io_uring`, with the `uring` feature; see [`open_best`]),
//! [`MemVolume`] (in memory, for tests and simulations). Everything else (latching of the first
//! failure, fault injection, ordering checks) wraps a `Volume` and is itself a `Volume`.

mod aligned;
mod file;
mod mem;
// The io_uring backend is the one place that needs `unsafe` (see docs/unsafe.md).
#[cfg(feature = "uring")]
#[allow(unsafe_code)]
mod uring;

pub use file::{FileVolume, FileVolumeOptions};
pub use mem::MemVolume;
#[cfg(feature = "uring")]
pub use uring::{uring_available, UringVolume};

use std::path::Path;
use std::sync::Arc;

use crate::ids::{Generation, VolumeId};
use crate::Result;

/// Open a file or block device with the best backend this process may use.
///
/// Returns the volume and the backend's name for logging: `"io_uring"` when the crate is built
/// with the `uring` feature and the kernel allows `io_uring` (see `uring_available`), `"pread"`
/// ([`FileVolume`]) otherwise, including when the kernel refuses to create the volume's rings.
///
/// # Errors
/// [`crate::Error::Io`] when the file cannot be opened or inspected.
pub fn open_best(
    path: impl AsRef<Path>,
    options: &FileVolumeOptions,
) -> Result<(Arc<dyn Volume>, &'static str)> {
    let path = path.as_ref();
    #[cfg(feature = "uring")]
    if uring::uring_available() {
        match UringVolume::open(path, options) {
            Ok(v) => return Ok((Arc::new(v), "io_uring")),
            // Ring creation refused (e.g. RLIMIT_MEMLOCK, too many rings): use pread instead.
            Err(e) if uring::is_setup_error(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((Arc::new(FileVolume::open(path, options)?), "pread"))
}

/// What a volume is right now: the facts recovery compares against the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Stable identity (device and inode for files).
    pub id: VolumeId,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size in bytes (the unit of atomic writes the engine assumes).
    pub sector_size: u32,
    /// Generation: changes when the same identity holds unrelated contents.
    pub generation: Generation,
    /// How to find the volume again after a restart (a path, or `mem:NAME`).
    pub locator: String,
}

/// A block-addressable store.
///
/// Implementations must loop over short transfers or report them as errors, and must make
/// [`Volume::flush`] a real durability point: when it returns `Ok`, every write that returned
/// before it was called survives power loss.
pub trait Volume: Send + Sync + std::fmt::Debug {
    /// Current identity and size.
    fn info(&self) -> VolumeInfo;

    /// Read exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] with the offset, or [`crate::Error::OutOfRange`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Write all of `buf` at `offset` (not yet durable).
    ///
    /// # Errors
    /// [`crate::Error::Io`] with the offset, or [`crate::Error::OutOfRange`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Make every completed write durable (fdatasync or equivalent).
    ///
    /// # Errors
    /// [`crate::Error::Io`]; after a failed flush nothing written since the last successful one
    /// may be trusted.
    fn flush(&self) -> Result<()>;

    /// Size in bytes (shortcut for `info().size`).
    fn size(&self) -> u64 {
        self.info().size
    }
}

/// Check that `offset..offset+len` lies within `size`.
///
/// # Errors
/// [`crate::Error::OutOfRange`].
pub fn check_range(offset: u64, len: u64, size: u64, what: &'static str) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange {
            offset,
            len,
            what,
            size,
        }),
    }
}
