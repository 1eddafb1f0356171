//! Regular files and block devices through pread/pwrite.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{check_range, Volume, VolumeInfo};
use crate::ids::{Generation, VolumeId};
use crate::{Error, Result};

use super::aligned::{align_down, align_up, AlignedBuf, DIRECT_ALIGN_BYTES};

/// Options for opening a [`FileVolume`].
#[derive(Debug, Clone, Default)]
pub struct FileVolumeOptions {
    /// Open with `O_DIRECT` (bypass the page cache). Default = false. Unaligned requests are
    /// bounced through an aligned buffer.
    pub direct: bool,
    /// Open read-only. Default = false.
    pub read_only: bool,
}

/// A file or block device accessed with positioned reads and writes.
///
/// # Example
///
/// ```
/// use timezero::prelude::*;
/// use timezero::FileVolumeOptions;
///
/// # fn main() -> timezero::Result<()> {
/// let dir = tempfile::tempdir().expect("temporary directory");
/// let path = dir.path().join("disk.img");
/// let vol = FileVolume::create(&path, 1 << 20, &FileVolumeOptions::default())?;
/// assert_eq!(vol.info().size, 1 << 20);
/// vol.write_at(8192, &[9u8; 4096])?;
/// vol.flush()?; // fdatasync: the write is durable
///
/// // Opened again: the same file is the same volume (device and inode), with the data.
/// let read_only = FileVolumeOptions { read_only: true, ..FileVolumeOptions::default() };
/// let again = FileVolume::open(&path, &read_only)?;
/// assert_eq!(again.info().id, vol.info().id);
/// assert_eq!(again.path(), vol.path());
/// let mut buf = [0u8; 4096];
/// again.read_at(8192, &mut buf)?;
/// assert_eq!(buf, [9u8; 4096]);
/// assert!(again.write_at(0, &buf).is_err()); // opened read-only
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FileVolume {
    file: File,
    path: PathBuf,
    id: VolumeId,
    size: u64,
    direct: bool,
}

impl FileVolume {
    /// Open an existing file or block device.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened or inspected.
    pub fn open(path: impl AsRef<Path>, options: &FileVolumeOptions) -> Result<Self> {
        let path = path.as_ref();
        let super::OpenedFile {
            file,
            meta,
            size,
            canonical: abs,
        } = super::open_file(path, options)?;
        Ok(FileVolume {
            file,
            path: abs,
            id: VolumeId::from_parts(meta.dev(), meta.ino()),
            size,
            direct: options.direct,
        })
    }

    /// Create (or truncate) a file of `size` bytes, allocated so that writes cannot hit ENOSPC
    /// later, and open it.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be created or allocated.
    pub fn create(path: impl AsRef<Path>, size: u64, options: &FileVolumeOptions) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io("create", &shown, 0, e))?;
        f.set_len(size)
            .map_err(|e| Error::io("set_len", &shown, size, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &shown, 0, e))?;
        drop(f);
        Self::open(path, options)
    }

    /// The canonical path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn aligned(&self, offset: u64, len: usize) -> bool {
        offset.is_multiple_of(DIRECT_ALIGN_BYTES as u64) && len.is_multiple_of(DIRECT_ALIGN_BYTES)
    }
}

/// Fill `buf` from `offset` with `pread` (rustix's direct system call), continuing short reads.
/// End of file is an error (`UnexpectedEof`) only if it comes before the first `need` bytes;
/// the rest of `buf` is then zero-filled (an `O_DIRECT` bounce buffer whose aligned span reaches
/// past the end of a file whose size is not aligned). Shared by both file backends.
///
/// The direct system call matters on the hot path: every user-space frame between the system
/// call and the caller costs a mispredicted return per request on kernels that refill the
/// return stack buffer on each kernel exit (a speculation mitigation), so the libc wrapper and
/// std's generic loop are left out.
pub(super) fn pread_exact(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    need: usize,
) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match rustix::io::pread(file, &mut buf[done..], offset + done as u64) {
            Ok(0) if done >= need => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("end of file after {done} of {need} bytes"),
                ))
            }
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `write_all_at` through rustix's direct system call (see [`pread_exact`]).
pub(super) fn pwrite_all(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(file, buf, offset) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "failed to write whole buffer",
                ))
            }
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Largest bounce buffer kept per thread for reuse; larger spans allocate per transfer.
const KEPT_BOUNCE_BYTES: usize = 1 << 20;

thread_local! {
    /// The thread's reusable `O_DIRECT` bounce buffer (see [`with_bounce`]).
    static BOUNCE: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::new(0));
}

/// Run `f` on an aligned buffer of `len` bytes (contents unspecified): the thread's kept buffer
/// when `len` is at most [`KEPT_BOUNCE_BYTES`] and it is free, a fresh one otherwise. Reusing
/// the buffer saves an allocation and its page faults on every unaligned `O_DIRECT` transfer.
pub(crate) fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut f = Some(f);
    if len <= KEPT_BOUNCE_BYTES {
        let kept = BOUNCE.try_with(|cell| {
            let mut b = cell.try_borrow_mut().ok()?;
            b.resize(len);
            Some((f.take()?)(b.get_mut()))
        });
        if let Ok(Some(out)) = kept {
            return out;
        }
    }
    let mut b = AlignedBuf::new(len);
    match f.take() {
        Some(f) => f(b.get_mut()),
        // `f` ran above and its result was returned.
        None => unreachable!("with_bounce: the closure ran but returned nothing"),
    }
}

impl Volume for FileVolume {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            id: self.id,
            size: self.size,
            sector_size: 512,
            generation: Generation(0),
            locator: self.shown(),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        if !self.direct
            || (self.aligned(offset, buf.len())
                && buf.as_ptr().align_offset(DIRECT_ALIGN_BYTES) == 0)
        {
            return pread_exact(&self.file, buf, offset, buf.len())
                .map_err(|e| Error::io("read", self.shown(), offset, e));
        }
        let start = align_down(offset);
        let end = align_up(offset + buf.len() as u64);
        let len = usize::try_from(end - start).map_err(|_| Error::invalid("read", "too large"))?;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        with_bounce(len, |bounce| {
            // The aligned tail may lie past the end of a file whose size is not aligned.
            pread_exact(&self.file, bounce, start, skip + buf.len())
                .map_err(|e| Error::io("read", self.shown(), start, e))?;
            buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
            Ok(())
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        if !self.direct
            || (self.aligned(offset, buf.len())
                && buf.as_ptr().align_offset(DIRECT_ALIGN_BYTES) == 0)
        {
            return pwrite_all(&self.file, buf, offset)
                .map_err(|e| Error::io("write", self.shown(), offset, e));
        }
        let start = align_down(offset);
        let end = align_up(offset + buf.len() as u64);
        if end > self.size {
            // Writing the whole aligned tail would extend the file.
            return Err(Error::Misaligned {
                offset,
                len: buf.len() as u64,
                align: DIRECT_ALIGN_BYTES as u64,
            });
        }
        let len = usize::try_from(end - start).map_err(|_| Error::invalid("write", "too large"))?;
        with_bounce(len, |bounce| {
            if start != offset || end != offset + buf.len() as u64 {
                // Read-modify-write of the partial sectors at either edge.
                pread_exact(&self.file, bounce, start, len)
                    .map_err(|e| Error::io("read", self.shown(), start, e))?;
            }
            let skip = usize::try_from(offset - start).unwrap_or(0);
            bounce[skip..skip + buf.len()].copy_from_slice(buf);
            pwrite_all(&self.file, bounce, start)
                .map_err(|e| Error::io("write", self.shown(), start, e))
        })
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", self.shown(), 0, e))
    }

    fn copy_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        (!self.direct).then(|| self.file.as_fd())
    }

    /// `copy_file_range(2)` from a buffered file to this buffered file, continuing short
    /// copies; `Ok(false)` when either side is `O_DIRECT` or not a file, when the kernel cannot
    /// copy between the two (other file systems, files it cannot copy, an older kernel), or
    /// when the source ended early.
    fn copy_from(&self, src: &dyn Volume, src_offset: u64, offset: u64, len: u64) -> Result<bool> {
        check_range(offset, len, self.size, "volume")?;
        if self.direct {
            return Ok(false);
        }
        kernel_copy(src, src_offset, &self.file, offset, len, &self.shown())
    }
}

/// Copy `len` bytes of `src` from `src_offset` to `offset` of the buffered file `to` with
/// `copy_file_range(2)`, continuing short copies; `shown` names `to` in errors. `Ok(false)`
/// when `src` has no file the kernel may copy from ([`Volume::copy_fd`]: it is `O_DIRECT`, or
/// not a file), the kernel cannot copy between the two (`EXDEV`: other file systems;
/// `EOPNOTSUPP`, `EINVAL`, `ENOSYS`: not for these files or not on this kernel; `EBADF`: `to`
/// is not open for writing), or the source ended early; the caller then copies through memory.
pub(crate) fn kernel_copy(
    src: &dyn Volume,
    src_offset: u64,
    to: &File,
    offset: u64,
    len: u64,
    shown: &str,
) -> Result<bool> {
    use rustix::io::Errno;
    check_range(src_offset, len, src.size(), "source volume")?;
    let Some(from) = src.copy_fd() else {
        return Ok(false);
    };
    let (mut so, mut to_off) = (src_offset, offset);
    let end = offset + len;
    while to_off < end {
        let chunk = usize::try_from(end - to_off)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(from, Some(&mut so), to, Some(&mut to_off), chunk) {
            // The source ended before the range did: copy through memory (which reports it).
            Ok(0) => return Ok(false),
            Ok(_) | Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS | Errno::BADF) => {
                return Ok(false)
            }
            Err(e) => return Err(Error::io("copy_file_range", shown, to_off, e.into())),
        }
    }
    Ok(true)
}
