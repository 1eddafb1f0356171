//! Sources and T0 images as files over FUSE (feature `fuse`): `timezero mount` shows one regular
//! file per export of an [`ExportRegistry`] (for the binary, the NBD server's
//! [`EngineRegistry`](crate::nbd::EngineRegistry)), so that ordinary tools, and loop devices,
//! use them on kernels without an NBD or ublk driver.
//!
//! **What a request does.** Each FUSE request is answered by the same operation of the same
//! [`NbdExport`](crate::nbd::NbdExport) the NBD server uses for its request of that kind, so a
//! file and an NBD export of one name behave alike:
//!
//! | FUSE request | export operation |
//! |---|---|
//! | `read` | `read` (short at the end of the file) |
//! | `write` | `write`, with FUA when the file was opened `O_SYNC`/`O_DSYNC` |
//! | `fsync`, `fdatasync` | `flush` (NBD FLUSH: a durability point) |
//! | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` (a loop device's discard) | `trim` |
//! | `fallocate(ZERO_RANGE)` (a loop device's write-zeroes) | `write_zeroes` |
//! | `close` (FUSE `FLUSH`) | nothing: no durability point, as an NBD disconnect is none |
//!
//! A source file is written through copy-before-write; an image file is read-only (mode 0444,
//! opening it for writing fails with `EROFS`) unless the registry offers it writable (target
//! writes). The files never change size: opening with `O_TRUNC` or truncating fails with
//! `EPERM`, a write at or past the end with `EFBIG`, and a write reaching past the end is cut
//! there, as on a block device. Library errors become the errno the NBD server would send
//! (an unavailable volume, a suspended session: `EIO`).
//!
//! **Live directory.** Neither entries nor attributes are cached by the kernel (a zero TTL):
//! every lookup and directory listing asks the registry, so a session established while mounted
//! appears at once and a withdrawn one disappears. A file already open keeps its export; its
//! reads then fail as the engine fails them.
//!
//! **No page cache (`FOPEN_DIRECT_IO`).** Every open is answered with `FOPEN_DIRECT_IO`: reads
//! and writes reach the engine with the caller's offsets and lengths, and the kernel keeps no
//! cached copy of the files. The sources are written by more than this mount (NBD clients of the
//! same process, `timezero write` through the control socket, the copy-before-write that the
//! engine runs for them), and the kernel would not know that its cached pages of a FUSE file went
//! stale; a loop device on a file keeps a cache of its own (the block device's), so a second
//! cache of the same bytes below it would only cost memory and copies; and a write that the
//! kernel cached would reach the engine only at write-back, long after the writer was told it
//! was done, so the order of writes and durability points the engine sees would not be the
//! order the writer issued. The price: no read-ahead by the kernel, and shared mappings
//! (`mmap` with `MAP_SHARED`) of the files fail with `ENODEV`: the kernel offers them on
//! direct-I/O files only to file systems that ask for `FUSE_DIRECT_IO_ALLOW_MMAP`, which would
//! bring the page cache back for them. Private mappings work. Loop devices, `dd`, `cp` and file
//! systems on loop devices use `read`/`write` and are unaffected.
//!
//! **Mounting.** [`FuseMount`] mounts any fuser file system with `mount(2)` directly (root and
//! `/dev/fuse`, no `fusermount`, no libfuse) and unmounts it, retrying while the mount is
//! briefly busy; the power-loss layer of the `fault` feature uses it too. [`check_mountpoint`]
//! refuses a mount point that is not an empty directory or is a mount point already;
//! [`unmount_path`] is `timezero umount`.

mod fs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use fs::ExportFs;

use crate::limits::{
    FUSE_DETACH_BUSY_SECS, FUSE_RELEASE_WAIT_SECS, FUSE_THREADS_MAX, FUSE_UNMOUNT_BUSY_RETRY_SECS,
};
use crate::nbd::ExportRegistry;
use crate::{Error, Result};

/// The source name (`/proc/self/mountinfo`'s fifth field after the separator) of every mount
/// made by [`mount_exports`], followed by `:` and the table it serves.
pub const FSNAME_PREFIX: &str = "timezero";

/// A mounted FUSE file system: the session thread(s) and the mount point. Dropping it unmounts
/// (lazily, if it stays busy).
#[derive(Debug)]
pub struct FuseMount {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl FuseMount {
    /// Mount `fs` at `mountpoint` with `options` (the kernel's FUSE options: file system name,
    /// `ro`/`rw`, ...), served by `threads` threads.
    ///
    /// # Errors
    /// [`Error::Io`] when the mount point cannot be resolved or the mount fails.
    pub fn mount<F: fuser::Filesystem + Send + Sync + 'static>(
        fs: F,
        mountpoint: &Path,
        options: Vec<fuser::MountOption>,
        threads: usize,
    ) -> Result<FuseMount> {
        let mountpoint = std::fs::canonicalize(mountpoint)
            .map_err(|e| Error::io("resolve", mountpoint.display().to_string(), 0, e))?;
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.n_threads = Some(threads.max(1));
        let session = fuser::spawn_mount(fs, &mountpoint, &config)
            .map_err(|e| Error::io("mount fuse", mountpoint.display().to_string(), 0, e))?;
        Ok(FuseMount {
            session: Some(session),
            mountpoint,
        })
    }

    /// The canonical mount point.
    #[must_use]
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// True once the file system has ended without [`FuseMount::unmount`]: unmounted from
    /// outside (`timezero umount`, `umount`) or its connection aborted.
    #[must_use]
    pub fn ended(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmount and wait for the session threads (every process using the mount must be gone;
    /// a busy mount is retried for [`FUSE_UNMOUNT_BUSY_RETRY_SECS`]).
    ///
    /// # Errors
    /// [`Error::Io`] when the unmount fails or the session ended with an error.
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner(Duration::from_secs(FUSE_UNMOUNT_BUSY_RETRY_SECS))
    }

    /// Unmount as [`FuseMount::unmount`] does; when the mount stays busy for
    /// [`FUSE_DETACH_BUSY_SECS`] (a loop device or an open file still uses one of its files),
    /// detach it from its directory instead and serve
    /// it until its last user is gone, so that nothing written through it is lost. Returns true
    /// when it had to detach (and has then waited for those users).
    ///
    /// # Errors
    /// [`Error::Io`] when the unmount fails otherwise or the session ended with an error.
    pub fn unmount_or_detach(mut self) -> Result<bool> {
        match self.unmount_inner(Duration::from_secs(FUSE_DETACH_BUSY_SECS)) {
            Ok(()) => Ok(false),
            Err(Error::Io { ref source, .. })
                if source.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) =>
            {
                rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)
                    .map_err(|e| {
                        Error::io(
                            "detach fuse",
                            self.mountpoint.display().to_string(),
                            0,
                            e.into(),
                        )
                    })?;
                self.join().map(|()| true)
            }
            Err(e) => Err(e),
        }
    }

    /// Wait for the session threads of a file system that is unmounted (or detached).
    fn join(&mut self) -> Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        // The session thread sees the connection end and returns. Its last read of the FUSE
        // device reports that end as ENODEV (which fuser treats as a clean end) or, when the
        // kernel aborted the connection while tearing the mount down, as ECONNABORTED: after
        // an unmount neither is a failure.
        match s.join() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::CONNABORTED.raw_os_error()) => {
                Ok(())
            }
            Err(e) => Err(Error::io(
                "unmount fuse",
                self.mountpoint.display().to_string(),
                0,
                e,
            )),
        }
    }

    fn unmount_inner(&mut self, busy_for: Duration) -> Result<()> {
        let Some(s) = self.session.as_ref() else {
            return Ok(());
        };
        if !s.guard.is_finished() {
            // A process forked by another thread of this program holds a copy of every
            // descriptor open at that instant until it execs (close-on-exec), so a mount whose
            // files were all closed can still be busy for a moment: retry EBUSY for a while
            // before giving up.
            let deadline = Instant::now() + busy_for;
            loop {
                match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty())
                {
                    Ok(()) | Err(rustix::io::Errno::INVAL) => break,
                    Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        let path = self.mountpoint.display().to_string();
                        return Err(Error::io("unmount fuse", path, 0, e.into()));
                    }
                }
            }
        }
        self.join()
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.session.is_some()
            && self
                .unmount_inner(Duration::from_secs(FUSE_UNMOUNT_BUSY_RETRY_SECS))
                .is_err()
        {
            // Still busy: detach it so that the directory can be removed.
            let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Mount the exports of `registry` at `mountpoint` ([`check_mountpoint`] first), named
/// `timezero:TABLE` in the mount table so that [`unmount_path`] recognises it.
///
/// # Errors
/// [`Error::Invalid`] for an unusable mount point; [`Error::Io`] when the mount fails.
pub fn mount_exports<R: ExportRegistry + 'static>(
    registry: Arc<R>,
    mountpoint: &Path,
    table: &Path,
) -> Result<FuseMount> {
    check_mountpoint(mountpoint)?;
    let fs = ExportFs::new(registry);
    let options = vec![
        fuser::MountOption::FSName(format!("{FSNAME_PREFIX}:{}", table.display())),
        fuser::MountOption::RW,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
    ];
    FuseMount::mount(fs, mountpoint, options, FUSE_THREADS_MAX)
}

/// Check that `path` can take a mount: an existing, empty directory that is not a mount point
/// already.
///
/// # Errors
/// [`Error::Io`] when it cannot be read; [`Error::Invalid`] naming what is wrong.
pub fn check_mountpoint(path: &Path) -> Result<()> {
    let shown = path.display().to_string();
    let m = std::fs::metadata(path).map_err(|e| Error::io("stat", shown.clone(), 0, e))?;
    if !m.is_dir() {
        return Err(Error::invalid(
            "mount point",
            format!("{shown} is not a directory"),
        ));
    }
    let canon =
        std::fs::canonicalize(path).map_err(|e| Error::io("resolve", shown.clone(), 0, e))?;
    if let Some(e) = mount_at(&canon)? {
        return Err(Error::invalid(
            "mount point",
            format!(
                "{shown} is in use: {} ({}) is mounted there",
                e.source, e.fstype
            ),
        ));
    }
    let mut entries =
        std::fs::read_dir(path).map_err(|e| Error::io("read directory", shown.clone(), 0, e))?;
    if entries.next().is_some() {
        return Err(Error::invalid(
            "mount point",
            format!("{shown} is not empty"),
        ));
    }
    Ok(())
}

/// One line of `/proc/self/mountinfo`: what is mounted at a mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount point (unescaped).
    pub mountpoint: PathBuf,
    /// The file system type (`fuse`, `ext4`, ...).
    pub fstype: String,
    /// The mount source (for a `timezero mount`: `timezero:TABLE`).
    pub source: String,
}

/// Undo the octal escapes (`\040` for a space) the kernel writes in mount table fields.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u16, |v, c| v * 8 + u16::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let (b'\\', Some(v)) = (b[i], oct) {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the lines of a mountinfo file.
#[must_use]
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let mountpoint = head.split(' ').nth(4)?;
            let mut t = tail.split(' ');
            let fstype = t.next()?;
            let source = t.next()?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .collect()
}

/// What is mounted at `canonical` (the last mount there), if anything.
///
/// # Errors
/// [`Error::Io`] when the mount table cannot be read.
pub fn mount_at(canonical: &Path) -> Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read", "/proc/self/mountinfo", 0, e))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rfind(|e| e.mountpoint == canonical))
}

/// `timezero umount`: unmount the `timezero mount` at `path`, then wait (at most
/// [`FUSE_RELEASE_WAIT_SECS`]) until its process has released the table. Returns the table.
///
/// A mount whose process died (kill -9) is unmounted the same way.
///
/// # Errors
/// [`Error::Invalid`] when nothing, or something else, is mounted there; [`Error::Io`] when
/// the unmount fails (`EBUSY`: a loop device or an open file still uses a file of it).
pub fn unmount_path(path: &Path) -> Result<PathBuf> {
    let shown = path.display().to_string();
    let canon =
        std::fs::canonicalize(path).map_err(|e| Error::io("resolve", shown.clone(), 0, e))?;
    let entry = mount_at(&canon)?
        .ok_or_else(|| Error::invalid("umount", format!("nothing is mounted at {shown}")))?;
    let table = entry
        .source
        .strip_prefix(FSNAME_PREFIX)
        .and_then(|t| t.strip_prefix(':'))
        .filter(|_| entry.fstype == "fuse" || entry.fstype.starts_with("fuse."))
        .map(PathBuf::from)
        .ok_or_else(|| {
            Error::invalid(
                "umount",
                format!(
                    "{shown} is not a timezero mount: {} ({}) is mounted there",
                    entry.source, entry.fstype
                ),
            )
        })?;
    rustix::mount::unmount(&canon, rustix::mount::UnmountFlags::empty())
        .map_err(|e| Error::io("unmount", shown, 0, e.into()))?;
    wait_released(&table, Duration::from_secs(FUSE_RELEASE_WAIT_SECS));
    Ok(table)
}

/// Wait until no process holds an exclusive lock on `table` (at most `limit`). A table that
/// cannot be opened counts as released.
fn wait_released(table: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let Ok(f) = std::fs::File::open(table) else {
            return;
        };
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => return,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let t = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse timezero:/t/x\\040y.tzt rw\n\
                 37 35 98:0 / /home rw shared:2 - ext4 /dev/sda1 rw\n";
        let v = parse_mountinfo(t);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(v[0].fstype, "fuse");
        assert_eq!(v[0].source, "timezero:/t/x y.tzt");
        assert_eq!(v[1].source, "/dev/sda1");
    }

    #[test]
    fn mountpoint_must_be_an_empty_directory() {
        let d = tempfile::tempdir().unwrap();
        check_mountpoint(d.path()).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let e = check_mountpoint(d.path()).unwrap_err().to_string();
        assert!(e.contains("is not empty"), "{e}");
        let e = check_mountpoint(&d.path().join("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a directory"), "{e}");
        assert!(check_mountpoint(&d.path().join("missing")).is_err());
    }
}
