//! Volumes: the only door to the data of sources and targets (the activity table keeps its bytes
//! in its own storage, `activity::TableStorage`).
//!
//! A [`Volume`] is a block-addressable store with an identity ([`VolumeInfo`]). Backends:
//! [`FileVolume`] (regular files and block devices, pread/pwrite, optional `O_DIRECT`),
//! `UringVolume` (the same through `io_uring`, with the `uring` feature; see [`open_best`]),
//! [`MemVolume`] (in memory, for tests and simulations). Decorators wrap any `Volume` and are
//! themselves `Volume`s: [`CheckedVolume`] (here) latches the first failure, and
//! `timezero::fault::FaultyVolume` (feature `fault`) injects faults and crashes. The fault
//! harness's simulated devices (`timezero::fault::SimVolume`, which feed its ordering checker)
//! implement `Volume` directly and wrap nothing.
//!
//! Also here: opening a file volume with a chosen backend ([`open_file_volume`]), and looking
//! at files before they are used (identities, visible data, creating a file only when complete).

pub(crate) mod aligned;
pub(crate) use aligned::AlignedBuf;
mod checked;
mod file;
mod mem;
mod open;
mod probe;
// The io_uring backend; its `ring` submodule is the one place here allowed `unsafe` (see
// docs/unsafe.md).
#[cfg(feature = "uring")]
mod uring;

pub use checked::{CheckedVolume, FirstFailure};
pub use file::{FileVolume, FileVolumeOptions};
pub use mem::MemVolume;
pub(crate) use open::uring_allowed;
pub use open::{
    open_file_volume, Backend, BACKEND_IO_URING, BACKEND_PREAD, BACKEND_PREAD_IO_URING,
};
pub use probe::{
    create_complete, file_identity, sync_dir, visible_data, witness_path, PROBE_BYTES,
};
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
    open_uring_or_pread(path.as_ref(), options, true)
}

/// Open a file or block device with io_uring used only for the transfers where it measured
/// faster (`UringVolume::open_registered_only`: unaligned `O_DIRECT` transfers through a
/// registered buffer), pread/pwrite for the rest. Returns the volume and `"pread+io_uring"`,
/// or `"pread"` ([`FileVolume`]) when the crate lacks the `uring` feature or the kernel refuses.
///
/// # Errors
/// [`crate::Error::Io`] when the file cannot be opened or inspected.
pub fn open_registered_only(
    path: impl AsRef<Path>,
    options: &FileVolumeOptions,
) -> Result<(Arc<dyn Volume>, &'static str)> {
    open_uring_or_pread(path.as_ref(), options, false)
}

fn open_uring_or_pread(
    path: &Path,
    options: &FileVolumeOptions,
    everywhere: bool,
) -> Result<(Arc<dyn Volume>, &'static str)> {
    #[cfg(feature = "uring")]
    if uring::uring_available() {
        let opened = if everywhere {
            UringVolume::open(path, options).map(|v| (v, "io_uring"))
        } else {
            UringVolume::open_registered_only(path, options).map(|v| (v, "pread+io_uring"))
        };
        match opened {
            Ok((v, name)) => return Ok((Arc::new(v), name)),
            // Ring creation refused (e.g. RLIMIT_MEMLOCK, too many rings): use pread instead.
            Err(e) if uring::is_setup_error(&e) => {}
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(feature = "uring"))]
    let _ = everywhere;
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
///
/// # Example
///
/// A device of your own: here a buffer behind a mutex, with an identity built from a serial
/// number that names this device and no other, and generation 0 until its contents are
/// replaced behind the engine's back.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use timezero::MemStorage;
/// use timezero::{Generation, VolumeId};
/// use timezero::prelude::*;
/// use timezero::{check_range, VolumeInfo};
///
/// #[derive(Debug)]
/// struct RamDisk { serial: u64, data: Mutex<Vec<u8>> }
///
/// impl Volume for RamDisk {
///     fn info(&self) -> VolumeInfo {
///         let size = self.data.lock().expect("lock").len() as u64;
///         VolumeInfo {
///             id: VolumeId::from_parts(0x7261_6d64, self.serial), // "ramd", serial
///             size,
///             sector_size: 512,
///             generation: Generation(0),
///             locator: format!("ramdisk:{}", self.serial),
///         }
///     }
///     fn read_at(&self, offset: u64, buf: &mut [u8]) -> timezero::Result<()> {
///         let data = self.data.lock().expect("lock");
///         check_range(offset, buf.len() as u64, data.len() as u64, "ramdisk")?;
///         let o = offset as usize; // in range, so it fits
///         buf.copy_from_slice(&data[o..o + buf.len()]);
///         Ok(())
///     }
///     fn write_at(&self, offset: u64, buf: &[u8]) -> timezero::Result<()> {
///         let mut data = self.data.lock().expect("lock");
///         check_range(offset, buf.len() as u64, data.len() as u64, "ramdisk")?;
///         let o = offset as usize;
///         data[o..o + buf.len()].copy_from_slice(buf);
///         Ok(())
///     }
///     fn flush(&self) -> timezero::Result<()> {
///         Ok(()) // memory: nothing to make durable
///     }
/// }
///
/// # fn main() -> timezero::Result<()> {
/// let layout = TableOptions::default().layout()?;
/// let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
/// let engine = Engine::create(table, EngineOptions::default())?;
/// let disk = |serial, byte| Arc::new(RamDisk { serial, data: Mutex::new(vec![byte; 1 << 20]) });
/// let source = engine.attach(disk(1, 4));
/// let target = engine.attach(disk(2, 0));
/// let session = engine.establish(&SessionSpec::whole(source, target))?;
/// engine.write(source, 0, &[8u8; 4096])?;
/// let mut buf = [0u8; 4096];
/// engine.read_image(session, 0, &mut buf)?;
/// assert_eq!(buf, [4u8; 4096]);
/// assert_eq!(engine.volume(target)?.info().locator, "ramdisk:2");
/// # Ok(())
/// # }
/// ```
pub trait Volume: Send + Sync + std::fmt::Debug {
    /// Current identity and size.
    fn info(&self) -> VolumeInfo;

    /// Read exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] with the offset, or [`crate::Error::OutOfRange`].
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Write all of `buf` at `offset` (not yet durable).
    ///
    /// # Errors
    /// [`crate::Error::Io`] with the offset, or [`crate::Error::OutOfRange`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;

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

    /// Read several ranges: fill every `(offset, buf)` of `reqs` exactly, as [`Volume::read_at`]
    /// would one after the other. A backend may have them all in flight at once (the io_uring
    /// backend submits several per system call); the default reads them one by one. When one
    /// fails, its error is returned once none of the requests is in flight any more; what the
    /// buffers hold is then unspecified.
    ///
    /// # Errors
    /// As [`Volume::read_at`]; the error names the offset of the failed transfer.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        for (offset, buf) in reqs.iter_mut() {
            self.read_at(*offset, buf)?;
        }
        Ok(())
    }

    /// Write several ranges: every `(offset, buf)` of `reqs`, as [`Volume::write_at`] would one
    /// after the other (not yet durable). The ranges should not overlap: a backend may have them
    /// all in flight at once, in no particular order; the default writes them one by one. When
    /// one fails, its error is returned once none of the requests is in flight any more; the
    /// other ranges may or may not have been written.
    ///
    /// # Errors
    /// As [`Volume::write_at`]; the error names the offset of the failed transfer.
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
        for (offset, buf) in reqs {
            self.write_at(*offset, buf)?;
        }
        Ok(())
    }

    /// The open file behind this volume, when the kernel may copy from it to another file
    /// without the bytes passing through user memory (see [`Volume::copy_from`]): a buffered
    /// (not `O_DIRECT`) regular file. `None` (the default) otherwise.
    fn copy_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// Copy `len` bytes of `src` from `src_offset` to `offset` of this volume inside the
    /// kernel (`copy_file_range(2)`: one copy between page caches, or shared extents on a file
    /// system that can reflink, such as XFS or Btrfs), as [`Volume::write_at`] of what
    /// [`Volume::read_at`] of `src` returns would (not yet durable). Returns `Ok(false)` when
    /// this pair of volumes cannot (the default: the caller copies through memory then, and
    /// must, because part of the range may have been copied).
    ///
    /// # Errors
    /// [`crate::Error::OutOfRange`], or [`crate::Error::Io`] when the kernel's copy failed;
    /// the range is then in an unknown state, and a caller that copies it again through
    /// memory learns which side failed.
    fn copy_from(&self, src: &dyn Volume, src_offset: u64, offset: u64, len: u64) -> Result<bool> {
        let _ = (src, src_offset, offset, len);
        Ok(false)
    }
}

/// A shared volume is a volume: decorators such as [`CheckedVolume`] can wrap an
/// `Arc<dyn Volume>` or an `Arc` the caller keeps a clone of.
impl<V: Volume + ?Sized> Volume for Arc<V> {
    fn info(&self) -> VolumeInfo {
        (**self).info()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        (**self).write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        (**self).read_many(reqs)
    }
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
        (**self).write_many(reqs)
    }
    fn copy_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (**self).copy_fd()
    }
    fn copy_from(&self, src: &dyn Volume, src_offset: u64, offset: u64, len: u64) -> Result<bool> {
        (**self).copy_from(src, src_offset, offset, len)
    }
}

/// A boxed volume is a volume.
impl<V: Volume + ?Sized> Volume for Box<V> {
    fn info(&self) -> VolumeInfo {
        (**self).info()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        (**self).write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        (**self).read_many(reqs)
    }
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
        (**self).write_many(reqs)
    }
    fn copy_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (**self).copy_fd()
    }
    fn copy_from(&self, src: &dyn Volume, src_offset: u64, offset: u64, len: u64) -> Result<bool> {
        (**self).copy_from(src, src_offset, offset, len)
    }
}

/// An opened file or block device with what its backends need to know about it.
pub(crate) struct OpenedFile {
    pub(crate) file: std::fs::File,
    pub(crate) meta: std::fs::Metadata,
    pub(crate) size: u64,
    pub(crate) canonical: std::path::PathBuf,
}

/// Open `path` for the file backends (pread and io_uring): flags, size (seeking to the end for
/// block devices) and the canonical path used as the locator.
pub(crate) fn open_file(path: &Path, options: &FileVolumeOptions) -> Result<OpenedFile> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display().to_string();
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(!options.read_only);
    if options.direct {
        oo.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    }
    let file = oo
        .open(path)
        .map_err(|e| crate::Error::io("open", &shown, 0, e))?;
    let meta = file
        .metadata()
        .map_err(|e| crate::Error::io("stat", &shown, 0, e))?;
    let size = if meta.file_type().is_file() {
        meta.len()
    } else {
        use std::io::{Seek, SeekFrom};
        (&file)
            .seek(SeekFrom::End(0))
            .map_err(|e| crate::Error::io("seek", &shown, 0, e))?
    };
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(OpenedFile {
        file,
        meta,
        size,
        canonical,
    })
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
