//! The target lock (QUI-02): held from before the cut to the end of `task_post`, released when
//! dropped.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

/// Why a target could not be locked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LockError {
    /// The target is in use: a block device mounted or opened exclusively (`EBUSY`), or a file
    /// another holder has locked.
    #[error("target {} is busy (mounted, or locked by another holder)", path.display())]
    TargetBusy {
        /// The target.
        path: PathBuf,
    },
    /// Neither a block device nor a regular file.
    #[error("target {} is a {kind}, not a block device or a regular file", path.display())]
    NotATarget {
        /// The target.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Any other failure.
    #[error("{op} target {}: {source}", path.display())]
    Io {
        /// The operation (`stat`, `open`, `flock`).
        op: &'static str,
        /// The target.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
}

/// What kind of target a lock holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A block device, opened `O_EXCL`: the kernel refuses a mount or another exclusive open
    /// while this is held.
    BlockDevice,
    /// A regular file, `flock(LOCK_EX)`: another holder's `flock` is refused while this is
    /// held (advisory, between cooperating programs).
    File,
}

/// An exclusive hold on a task's target (QUI-02); dropping it releases it.
#[derive(Debug)]
pub struct TargetLock {
    // Held for its side effect: the exclusive open or the flock lasts as long as the
    // descriptor.
    _fd: OwnedFd,
    path: PathBuf,
    kind: TargetKind,
}

impl TargetLock {
    /// Lock `path`: a block device by an `O_EXCL` open, a regular file by
    /// `flock(LOCK_EX | LOCK_NB)`. Never waits.
    ///
    /// # Errors
    /// [`LockError::TargetBusy`] when it is held elsewhere (or the device is mounted),
    /// [`LockError::NotATarget`], [`LockError::Io`].
    pub fn acquire(path: &Path) -> Result<TargetLock, LockError> {
        let io = |op: &'static str, e: Errno| LockError::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(io::Error::from(e)),
        };
        let busy = || LockError::TargetBusy {
            path: path.to_path_buf(),
        };
        let stat = rustix::fs::stat(path).map_err(|e| io("stat", e))?;
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::BlockDevice => TargetKind::BlockDevice,
            FileType::RegularFile => TargetKind::File,
            FileType::Directory => return Err(not_a_target(path, "directory")),
            FileType::CharacterDevice => return Err(not_a_target(path, "character device")),
            _ => return Err(not_a_target(path, "special file")),
        };
        let fd = match kind {
            TargetKind::BlockDevice => rustix::fs::open(
                path,
                OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| {
                if e == Errno::BUSY {
                    busy()
                } else {
                    io("open", e)
                }
            })?,
            TargetKind::File => {
                let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| io("open", e))?;
                rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
                    if e == Errno::WOULDBLOCK {
                        busy()
                    } else {
                        io("flock", e)
                    }
                })?;
                fd
            }
        };
        Ok(TargetLock {
            _fd: fd,
            path: path.to_path_buf(),
            kind,
        })
    }

    /// The locked target.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it is locked.
    #[must_use]
    pub fn kind(&self) -> TargetKind {
        self.kind
    }
}

fn not_a_target(path: &Path, kind: &'static str) -> LockError {
    LockError::NotATarget {
        path: path.to_path_buf(),
        kind,
    }
}
