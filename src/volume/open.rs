//! Opening file volumes: which backend the engine uses for a path.

use std::path::Path;
use std::sync::Arc;

use crate::volume::{FileVolume, FileVolumeOptions, Volume};
use crate::Result;

/// Name of the pread/pwrite file backend ([`FileVolume`]), as reported by
/// [`Engine::backend_name`](crate::engine::Engine::backend_name).
pub const BACKEND_PREAD: &str = "pread";

/// Name of the io_uring file backend (`UringVolume`), as reported by [`Engine::backend_name`](crate::engine::Engine::backend_name).
pub const BACKEND_IO_URING: &str = "io_uring";

/// Name of the mixed backend that [`Backend::Auto`] opens for `O_DIRECT` volumes: pread/pwrite,
/// with unaligned transfers through an io_uring registered buffer
/// (`UringVolume::open_registered_only`).
pub const BACKEND_PREAD_IO_URING: &str = "pread+io_uring";

/// Open a file volume the way the engine does, with `backend` (see [`Backend`]). Returns the
/// volume and the backend's name ([`BACKEND_PREAD`], [`BACKEND_PREAD_IO_URING`] or
/// [`BACKEND_IO_URING`]).
///
/// # Errors
/// [`Error::Io`](crate::Error::Io) when the file cannot be opened or inspected.
pub fn open_file_volume(
    path: &Path,
    options: &FileVolumeOptions,
    backend: Backend,
) -> Result<(Arc<dyn Volume>, &'static str)> {
    match backend {
        Backend::IoUring => crate::volume::open_best(path, options),
        Backend::Auto if options.direct => crate::volume::open_registered_only(path, options),
        Backend::Auto | Backend::Pread => {
            Ok((Arc::new(FileVolume::open(path, options)?), BACKEND_PREAD))
        }
    }
}

/// Which backend the engine opens file volumes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// io_uring where it measured faster (the default): for `O_DIRECT` volumes where the
    /// kernel allows, unaligned transfers go through an io_uring registered buffer and the rest
    /// through pread/pwrite ([`BACKEND_PREAD_IO_URING`]); buffered volumes use pread/pwrite.
    /// For one synchronous request per thread, io_uring cost more than a plain system call in
    /// every other case measured: page-cache reads pay the ring round trip, buffered writes on
    /// ext4 run in a kernel worker thread, aligned `O_DIRECT` writes spend longer in
    /// submission (figures in docs/benchmarks.md).
    #[default]
    Auto,
    /// pread/pwrite ([`FileVolume`]) for every volume.
    Pread,
    /// io_uring for every volume where the kernel allows, pread/pwrite otherwise.
    IoUring,
}

impl Backend {
    /// Whether a volume opened with (`direct`) or without `O_DIRECT` should try io_uring (for
    /// some or all of its transfers).
    #[must_use]
    pub fn uses_uring(self, direct: bool) -> bool {
        match self {
            Backend::Auto => direct,
            Backend::Pread => false,
            Backend::IoUring => true,
        }
    }

    /// The name [`Engine::backend_name`](crate::engine::Engine::backend_name) reports for a volume opened with this backend, when
    /// the kernel allows io_uring.
    #[must_use]
    pub fn opened_name(self, direct: bool) -> &'static str {
        match self {
            Backend::IoUring => BACKEND_IO_URING,
            Backend::Auto if direct => BACKEND_PREAD_IO_URING,
            Backend::Auto | Backend::Pread => BACKEND_PREAD,
        }
    }

    /// The name used on the command line and in reports: `auto`, `pread` or `io-uring`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Pread => "pread",
            Backend::IoUring => "io-uring",
        }
    }
}

#[cfg(feature = "uring")]
pub(crate) fn uring_allowed() -> bool {
    crate::volume::uring_available()
}

#[cfg(not(feature = "uring"))]
pub(crate) fn uring_allowed() -> bool {
    false
}
