//! Where a table's bytes live: a narrow trait, the table file (read through a read-only mapping,
//! written with `pwrite`), and an in-memory store.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::mmap::MappedFile;
use crate::volume::witness_path;
use crate::{Error, Result};

/// Storage for one activity table. `write` changes the bytes (not yet durable); `sync` is the
/// durability point for everything written before it.
pub trait TableStorage: Send + Sync + std::fmt::Debug {
    /// Size in bytes (fixed at creation).
    fn len(&self) -> u64;
    /// Read `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] or an I/O error.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Read `buf.len()` bytes at `offset` from the medium, after a durability point, to verify
    /// that a superblock or checkpoint landed where it was written. Implementations should
    /// bypass caches that would return the written bytes whatever reached the medium; the
    /// default reads as [`TableStorage::read`] does.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] or an I/O error.
    fn read_back(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, buf)
    }
    /// The rollback witness kept beside the table, if this storage keeps one (see
    /// [`crate::activity::format::Witness`]). The default keeps none.
    ///
    /// # Errors
    /// I/O errors.
    fn read_witness(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Replace the rollback witness; `durable` makes it durable before returning. The default
    /// keeps none.
    ///
    /// # Errors
    /// I/O errors.
    fn write_witness(&self, bytes: &[u8], durable: bool) -> Result<()> {
        let _ = (bytes, durable);
        Ok(())
    }
    /// Write `data` at `offset`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] or an I/O error.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make all writes durable.
    ///
    /// # Errors
    /// An I/O error; the table then latches as poisoned.
    fn sync(&self) -> Result<()>;
    /// A name for messages (the path).
    fn name(&self) -> String;
    /// True when empty (never, for a valid table).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An activity table file. Reads copy from a shared, read-only mapping of the whole file;
/// writes go through `pwrite` on the file's descriptor (nothing is ever written through the
/// mapping, which shows the same page-cache pages); `sync` is `fdatasync` of the descriptor.
///
/// The file is allocated (`fallocate`) and zero-filled at creation and its length never changes
/// afterwards, so a later write only overwrites blocks already written and allocates nothing.
/// Unless opened read-only, the process holds an exclusive `flock` on the file for as
/// long as this value lives, and records who it is in `PATH.holder`.
#[derive(Debug)]
pub struct MmapStorage {
    /// The read-only mapping reads come from; `None` when opened read-only (another process
    /// may write the file then, so its bytes are read with `pread` into the caller's buffer
    /// instead of being borrowed from a mapping that could change under the borrow).
    map: Mutex<Option<MappedFile>>,
    path: PathBuf,
    len: u64,
    file: File,
    /// The same file opened with `O_DIRECT` for [`TableStorage::read_back`], where the file
    /// system allows it (not on tmpfs, for example).
    direct: Option<File>,
    /// `TABLE.witness`, the rollback witness (`None` when opened read-only).
    witness: Option<File>,
    /// Opened with [`MmapStorage::open_read_only`]: writes are refused, no lock is held.
    read_only: bool,
}

/// Who holds the table at `path` right now, as its holder file records it (`pid N (command)`),
/// or `None` when no process holds its lock.
#[must_use]
pub fn table_holder(path: &Path) -> Option<String> {
    use rustix::fs::{flock, FlockOperation};
    let file = File::open(path).ok()?;
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = flock(&file, FlockOperation::Unlock);
            None
        }
        Err(_) => Some(
            std::fs::read_to_string(holder_path(path))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "another process".to_string()),
        ),
    }
}

fn holder_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".holder");
    PathBuf::from(p)
}

fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    use rustix::fs::{flock, FlockOperation};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let holder = std::fs::read_to_string(holder_path(path))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "another process".to_string());
            return Err(Error::Locked {
                path: path.to_path_buf(),
                holder,
            });
        }
        Err(e) => return Err(Error::io("flock", path.display().to_string(), 0, e.into())),
    }
    // Best effort: a stale holder file only makes a future message less precise.
    if let Ok(mut f) = File::create(holder_path(path)) {
        let cmd = std::env::args().collect::<Vec<_>>().join(" ");
        let _ = writeln!(f, "pid {} ({})", std::process::id(), cmd);
    }
    Ok(())
}

impl MmapStorage {
    /// Create a new table file of `len` bytes (fails if it exists), allocate it, map it.
    ///
    /// # Errors
    /// I/O errors with context; `AlreadyExists` when the file exists.
    pub fn create(path: &Path, len: u64) -> Result<Self> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create", &shown, 0, e))?;
        lock_exclusive(&file, path)?;
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len)
            .map_err(|e| Error::io("fallocate", &shown, 0, e.into()))?;
        // fallocate leaves "unwritten" extents: the first write to each block would then change
        // file-system metadata, and that commit's fdatasync would wait for a metadata journal
        // commit. Writing zeros once makes every later commit a pure overwrite.
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < len {
            let n = (zeros.len() as u64).min(len - off);
            let chunk = &zeros[..usize::try_from(n).unwrap_or(0)];
            std::os::unix::fs::FileExt::write_all_at(&file, chunk, off)
                .map_err(|e| Error::io("write", &shown, off, e))?;
            off += n;
        }
        file.sync_all()
            .map_err(|e| Error::io("fsync", &shown, 0, e))?;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                d.sync_all()
                    .map_err(|e| Error::io("fsync dir", dir.display().to_string(), 0, e))?;
            }
        }
        Self::map(file, path, len, false)
    }

    /// Open an existing table file and map it.
    ///
    /// # Errors
    /// I/O errors with context, [`Error::Locked`] when another process holds it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_existing(path, false)
    }

    /// Open an existing table file for reading only: no lock is taken (another process may
    /// hold and write it), nothing is created, and every write is refused.
    ///
    /// # Errors
    /// I/O errors with context.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        Self::open_existing(path, true)
    }

    fn open_existing(path: &Path, read_only: bool) -> Result<Self> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io("open", &shown, 0, e))?;
        if !read_only {
            lock_exclusive(&file, path)?;
        }
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", &shown, 0, e))?
            .len();
        Self::map(file, path, len, read_only)
    }

    fn map(file: File, path: &Path, len: u64, read_only: bool) -> Result<Self> {
        let map = if read_only {
            None
        } else {
            Some(
                MappedFile::map(&file, len)
                    .map_err(|e| Error::io("mmap", path.display().to_string(), 0, e))?,
            )
        };
        let direct = {
            use std::os::unix::fs::OpenOptionsExt as _;
            let flag = i32::try_from(rustix::fs::OFlags::DIRECT.bits()).unwrap_or(0);
            OpenOptions::new()
                .read(true)
                .custom_flags(flag)
                .open(path)
                .ok()
        };
        let witness = if read_only {
            None
        } else {
            let wp = witness_path(path);
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&wp)
                    .map_err(|e| Error::io("open", wp.display().to_string(), 0, e))?,
            )
        };
        Ok(MmapStorage {
            map: Mutex::new(map),
            path: path.to_path_buf(),
            len,
            file,
            direct,
            witness,
            read_only,
        })
    }
}

impl Drop for MmapStorage {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = std::fs::remove_file(holder_path(&self.path));
        }
    }
}

fn range(offset: u64, n: usize, len: u64) -> Result<std::ops::Range<usize>> {
    crate::volume::check_range(offset, n as u64, len, "table")?;
    let o = usize::try_from(offset).map_err(|_| Error::invalid("offset", "too large"))?;
    Ok(o..o + n)
}

impl TableStorage for MmapStorage {
    fn len(&self) -> u64 {
        self.len
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = range(offset, buf.len(), self.len)?;
        match &*self.map.lock() {
            Some(m) => buf.copy_from_slice(&m.bytes()[r]),
            None => std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
                .map_err(|e| Error::io("read", self.path.display().to_string(), offset, e))?,
        }
        Ok(())
    }
    /// Reads through the `O_DIRECT` descriptor where there is one, so that the bytes come from
    /// the device rather than the page cache the write went through; falls back to the mapping
    /// when the file system refuses direct reads.
    fn read_back(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        use crate::volume::aligned::{align_down, align_up, AlignedBuf};
        crate::volume::check_range(offset, buf.len() as u64, self.len, "table")?;
        let Some(direct) = &self.direct else {
            return self.read(offset, buf);
        };
        let start = align_down(offset);
        let end = offset + buf.len() as u64;
        let need =
            usize::try_from(end - start).map_err(|_| Error::invalid("read back", "too large"))?;
        let span = usize::try_from(align_up(end) - start)
            .map_err(|_| Error::invalid("read back", "too large"))?;
        let mut b = AlignedBuf::new(span);
        let mut done = 0usize;
        while done < need {
            match rustix::io::pread(direct, &mut b.get_mut()[done..], start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                // The file system refused this direct read: read through the mapping.
                Err(rustix::io::Errno::INVAL) => return self.read(offset, buf),
                Err(e) => {
                    return Err(Error::io(
                        "read back",
                        self.path.display().to_string(),
                        offset,
                        e.into(),
                    ))
                }
            }
        }
        if done < need {
            return self.read(offset, buf);
        }
        let skip = usize::try_from(offset - start).unwrap_or(0);
        buf.copy_from_slice(&b.get()[skip..skip + buf.len()]);
        Ok(())
    }
    fn read_witness(&self) -> Result<Option<Vec<u8>>> {
        let wp = witness_path(&self.path);
        match std::fs::read(&wp) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", wp.display().to_string(), 0, e)),
        }
    }
    fn write_witness(&self, bytes: &[u8], durable: bool) -> Result<()> {
        let Some(f) = &self.witness else {
            return Ok(());
        };
        let shown = || witness_path(&self.path).display().to_string();
        std::os::unix::fs::FileExt::write_all_at(f, bytes, 0)
            .map_err(|e| Error::io("write", shown(), 0, e))?;
        if durable {
            rustix::fs::fdatasync(f).map_err(|e| Error::io("fdatasync", shown(), 0, e.into()))?;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.display().to_string(),
            });
        }
        // Writes go through pwrite, never through the mapping (which is read-only): a store into
        // a shared writable mapping makes the kernel update the file's mtime inside a
        // file-system transaction on the first write fault of each page, which turns every later
        // fdatasync into a journal commit (measured: 1.1-1.5 ms per table commit instead of
        // 0.2 ms). The mapping stays coherent: it maps the same page-cache pages pwrite fills.
        // This is the read-mapped, write-through-the-descriptor design LMDB uses by default.
        crate::volume::check_range(offset, data.len() as u64, self.len, "table")?;
        let _map = self.map.lock();
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
            .map_err(|e| Error::io("write", self.path.display().to_string(), offset, e))
    }
    fn sync(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.display().to_string(),
            });
        }
        // fdatasync on the descriptor writes back the page-cache pages pwrite dirtied (the same
        // pages the mapping shows) and flushes the device cache. There are no dirty mapped pages
        // for msync to write: nothing is stored through the mapping. Unlike fsync, fdatasync does
        // not force out the mtime change a pwrite makes (it is not needed to read the data back).
        let _map = self.map.lock();
        rustix::fs::fdatasync(&self.file)
            .map_err(|e| Error::io("fdatasync", self.path.display().to_string(), 0, e.into()))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// A table held in memory: every write is durable at once (no crash can happen). The fault
/// harness wraps storage like this one to model crashes.
#[derive(Debug)]
pub struct MemStorage {
    bytes: Mutex<Vec<u8>>,
    name: String,
}

impl MemStorage {
    /// A zero-filled store.
    #[must_use]
    pub fn new(name: &str, len: u64) -> Self {
        MemStorage {
            bytes: Mutex::new(vec![0; usize::try_from(len).unwrap_or(0)]),
            name: name.to_string(),
        }
    }
    /// A store holding `bytes` (for example a crash image).
    #[must_use]
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Self {
        MemStorage {
            bytes: Mutex::new(bytes),
            name: name.to_string(),
        }
    }
    /// A copy of the bytes.
    #[must_use]
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }
}

impl TableStorage for MemStorage {
    fn len(&self) -> u64 {
        self.bytes.lock().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = self.bytes.lock();
        let r = range(offset, buf.len(), b.len() as u64)?;
        buf.copy_from_slice(&b[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut b = self.bytes.lock();
        let r = range(offset, data.len(), b.len() as u64)?;
        b[r].copy_from_slice(data);
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}
