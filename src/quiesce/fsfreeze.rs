//! The real backend: `FIFREEZE`/`FITHAW` ioctls and `syncfs` on a descriptor of the mount.
//!
//! The only `unsafe` of the quiesce layer is here (docs/unsafe.md): `rustix::ioctl::ioctl` is
//! an `unsafe fn` because the opcode decides how the kernel uses the argument pointer.

use std::ffi::c_int;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, opcode, NoArg, Opcode};

use super::backend::{BackendError, QuiesceBackend};

/// `FIFREEZE` = `_IOWR('X', 119, int)` (linux/fs.h).
const FIFREEZE: Opcode = opcode::read_write::<c_int>(b'X', 119);
/// `FITHAW` = `_IOWR('X', 120, int)` (linux/fs.h).
const FITHAW: Opcode = opcode::read_write::<c_int>(b'X', 120);

/// Freezes with `FIFREEZE`, thaws with `FITHAW`, flushes with `syncfs`, each on the file system
/// holding the given path (a mount point in practice; a subdirectory freezes its whole file
/// system). Freezing and thawing need `CAP_SYS_ADMIN`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FsFreeze;

/// A descriptor of the directory `mount` (`O_RDONLY | O_DIRECTORY | O_CLOEXEC`): what the ioctls
/// and `syncfs` are called on, and what the watchdog holds for a lease.
pub(super) fn open_mount(mount: &Path) -> Result<OwnedFd, BackendError> {
    rustix::fs::open(
        mount,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BackendError::Io {
        op: "open",
        mount: mount.to_path_buf(),
        source: Arc::new(io::Error::from(e)),
    })
}

fn map_errno(op: &'static str, mount: &Path, e: Errno) -> BackendError {
    match e {
        Errno::BUSY => BackendError::Busy {
            op,
            mount: mount.to_path_buf(),
        },
        Errno::OPNOTSUPP | Errno::NOTTY => BackendError::Unsupported {
            op,
            mount: mount.to_path_buf(),
        },
        e => BackendError::Io {
            op,
            mount: mount.to_path_buf(),
            source: Arc::new(io::Error::from(e)),
        },
    }
}

/// `FITHAW` on a descriptor opened before (the watchdog's, QUI-07): the file system it is on
/// is thawed even when its mount point's path now names something else. `mount` only names it
/// in an error.
pub(super) fn thaw_fd(fd: &OwnedFd, mount: &Path) -> Result<(), BackendError> {
    // SAFETY: FITHAW takes no argument (`ioctl_fsthaw` ignores `arg`), so `NoArg` passing a
    // null pointer gives the kernel no memory; `fd` is an open descriptor borrowed for the
    // whole call.
    let r = unsafe { ioctl(fd, NoArg::<FITHAW>::new()) };
    r.map_err(|e| map_errno("thaw", mount, e))
}

impl QuiesceBackend for FsFreeze {
    fn freeze(&self, mount: &Path) -> Result<(), BackendError> {
        let fd = open_mount(mount)?;
        // SAFETY: FIFREEZE takes no argument (the kernel's `ioctl_fsfreeze` ignores `arg`), so
        // `NoArg` passing a null pointer gives the kernel no memory to read or write; `fd` is
        // an open descriptor owned by this function for the whole call.
        let r = unsafe { ioctl(&fd, NoArg::<FIFREEZE>::new()) };
        r.map_err(|e| map_errno("freeze", mount, e))
    }

    fn thaw(&self, mount: &Path) -> Result<(), BackendError> {
        let fd = open_mount(mount)?;
        thaw_fd(&fd, mount)
    }

    fn flush(&self, mount: &Path) -> Result<(), BackendError> {
        let fd = open_mount(mount)?;
        rustix::fs::syncfs(&fd).map_err(|e| map_errno("syncfs", mount, e))
    }
}
