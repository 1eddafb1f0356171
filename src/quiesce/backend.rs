//! The door to freezing, thawing and flushing file systems, and a fake of it for tests.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use parking_lot::{Condvar, Mutex};

use crate::clock::Clock;

/// Why a backend call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// `EBUSY`: the file system is frozen already (by someone else: the caller reports
    /// `AlreadyQuiesced` and thaws nothing of it).
    #[error("{op} {}: already frozen", mount.display())]
    Busy {
        /// The operation (`freeze`).
        op: &'static str,
        /// The mount given.
        mount: PathBuf,
    },
    /// `EOPNOTSUPP` (or `ENOTTY`): the file system cannot be frozen.
    #[error("{op} {}: not supported by this file system", mount.display())]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The mount given.
        mount: PathBuf,
    },
    /// Any other failure, with the operating system's error.
    #[error("{op} {}: {source}", mount.display())]
    Io {
        /// The operation (`open`, `freeze`, `thaw`, `syncfs`).
        op: &'static str,
        /// The mount given.
        mount: PathBuf,
        /// The error.
        #[source]
        source: Arc<io::Error>,
    },
}

/// Freezing, thawing and flushing the file system mounted at a path (QUI-01). The real
/// backend is [`FsFreeze`](super::FsFreeze); tests use [`FakeQuiesce`].
pub trait QuiesceBackend: Send + Sync + std::fmt::Debug {
    /// Freeze the file system holding `mount` (`FIFREEZE`): writers block until the thaw,
    /// and everything written before is on disk.
    ///
    /// # Errors
    /// [`BackendError::Busy`] when it is frozen already, [`BackendError::Unsupported`],
    /// [`BackendError::Io`].
    fn freeze(&self, mount: &Path) -> Result<(), BackendError>;

    /// Thaw the file system holding `mount` (`FITHAW`).
    ///
    /// # Errors
    /// [`BackendError::Io`] (also when it is not frozen).
    fn thaw(&self, mount: &Path) -> Result<(), BackendError>;

    /// Write the file system's dirty data and metadata to disk without blocking writers
    /// (`syncfs`; \[001\]'s BufferFlushOnly).
    ///
    /// # Errors
    /// [`BackendError::Io`].
    fn flush(&self, mount: &Path) -> Result<(), BackendError>;
}

/// A backend operation, as [`FakeQuiesce`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeOp {
    /// `freeze`.
    Freeze,
    /// `thaw`.
    Thaw,
    /// `flush`.
    Flush,
}

/// How [`FakeQuiesce`] answers one operation on one mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeAnswer {
    /// Succeed at once (the default).
    Ok,
    /// Block until the clock reaches the instant, then succeed.
    HangUntil(Timestamp),
    /// Fail with `Busy`.
    Busy,
    /// Fail with `Unsupported`.
    Unsupported,
    /// Fail with an I/O error (`EIO`).
    Fail,
}

/// A recorded call: the operation, the mount, and whether it has returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCall {
    /// The operation.
    pub op: FakeOp,
    /// The mount.
    pub mount: PathBuf,
    /// Whether the call has returned (a hanging call is recorded when it starts).
    pub returned: bool,
}

/// A [`QuiesceBackend`] for tests: it keeps a set of frozen mounts as the kernel would
/// (freezing a frozen mount is `Busy`, thawing a thawed one an error), records every call in
/// order, and answers as told per (operation, mount), e.g. hanging until a clock instant.
#[derive(Debug, Clone)]
pub struct FakeQuiesce {
    inner: Arc<FakeInner>,
}

#[derive(Debug)]
struct FakeInner {
    clock: Arc<dyn Clock>,
    state: Mutex<FakeState>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct FakeState {
    calls: Vec<FakeCall>,
    frozen: BTreeSet<PathBuf>,
    answers: HashMap<(FakeOp, PathBuf), FakeAnswer>,
}

impl FakeQuiesce {
    /// A fake with nothing frozen that answers `Ok`; hangs wait on `clock`.
    #[must_use]
    pub fn new(clock: Arc<dyn Clock>) -> FakeQuiesce {
        FakeQuiesce {
            inner: Arc::new(FakeInner {
                clock,
                state: Mutex::new(FakeState::default()),
                returned: Condvar::new(),
            }),
        }
    }

    /// Answer `op` on `mount` with `answer` from now on.
    pub fn answer(&self, op: FakeOp, mount: impl Into<PathBuf>, answer: FakeAnswer) {
        self.inner
            .state
            .lock()
            .answers
            .insert((op, mount.into()), answer);
    }

    /// Mark `mount` frozen, as if someone else had frozen it.
    pub fn set_frozen(&self, mount: impl Into<PathBuf>) {
        self.inner.state.lock().frozen.insert(mount.into());
    }

    /// The mounts frozen now, sorted.
    #[must_use]
    pub fn frozen(&self) -> Vec<PathBuf> {
        self.inner.state.lock().frozen.iter().cloned().collect()
    }

    /// Every call so far, in the order they started.
    #[must_use]
    pub fn calls(&self) -> Vec<FakeCall> {
        self.inner.state.lock().calls.clone()
    }

    /// The calls so far as `(op, mount)`, in the order they started.
    #[must_use]
    pub fn ops(&self) -> Vec<(FakeOp, PathBuf)> {
        self.calls().into_iter().map(|c| (c.op, c.mount)).collect()
    }

    /// Block until at least `n` calls have returned.
    pub fn wait_for_returned(&self, n: usize) {
        let mut state = self.inner.state.lock();
        while state.calls.iter().filter(|c| c.returned).count() < n {
            self.inner.returned.wait(&mut state);
        }
    }

    fn call(&self, op: FakeOp, mount: &Path) -> Result<(), BackendError> {
        let (index, answer) = {
            let mut state = self.inner.state.lock();
            state.calls.push(FakeCall {
                op,
                mount: mount.to_path_buf(),
                returned: false,
            });
            let answer = state
                .answers
                .get(&(op, mount.to_path_buf()))
                .copied()
                .unwrap_or(FakeAnswer::Ok);
            (state.calls.len() - 1, answer)
        };
        if let FakeAnswer::HangUntil(at) = answer {
            // The sender lives in the clock until the instant; a closed channel also ends
            // the wait.
            let _ = self.inner.clock.after(at).recv();
        }
        let mut state = self.inner.state.lock();
        let name = match op {
            FakeOp::Freeze => "freeze",
            FakeOp::Thaw => "thaw",
            FakeOp::Flush => "syncfs",
        };
        let result = match answer {
            FakeAnswer::Busy => Err(BackendError::Busy {
                op: name,
                mount: mount.to_path_buf(),
            }),
            FakeAnswer::Unsupported => Err(BackendError::Unsupported {
                op: name,
                mount: mount.to_path_buf(),
            }),
            FakeAnswer::Fail => Err(BackendError::Io {
                op: name,
                mount: mount.to_path_buf(),
                source: Arc::new(io::Error::from_raw_os_error(5)),
            }),
            FakeAnswer::Ok | FakeAnswer::HangUntil(_) => match op {
                FakeOp::Freeze if !state.frozen.insert(mount.to_path_buf()) => {
                    Err(BackendError::Busy {
                        op: name,
                        mount: mount.to_path_buf(),
                    })
                }
                FakeOp::Thaw if !state.frozen.remove(mount) => Err(BackendError::Io {
                    op: name,
                    mount: mount.to_path_buf(),
                    source: Arc::new(io::Error::from_raw_os_error(22)),
                }),
                _ => Ok(()),
            },
        };
        state.calls[index].returned = true;
        self.inner.returned.notify_all();
        result
    }
}

impl QuiesceBackend for FakeQuiesce {
    fn freeze(&self, mount: &Path) -> Result<(), BackendError> {
        self.call(FakeOp::Freeze, mount)
    }
    fn thaw(&self, mount: &Path) -> Result<(), BackendError> {
        self.call(FakeOp::Thaw, mount)
    }
    fn flush(&self, mount: &Path) -> Result<(), BackendError> {
        self.call(FakeOp::Flush, mount)
    }
}
