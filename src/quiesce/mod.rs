//! Quiesce and target locks (docs/orchestration.md, "Quiesce and locks").
//!
//! A task quiesces its sources before the cut as its plan says ([`QuiesceSpec`], QUI-01):
//! freeze the file systems (`FIFREEZE`, the lock), flush them (`syncfs`), run the
//! application's quiesce commands, or nothing. [`Quiescer::quiesce`] applies the timeout and
//! the fixed grace of QUI-04 and returns a [`Quiesced`] guard that holds exactly what was done
//! and undoes it, in reverse order, on every path out (QUI-03, QUI-05, QUI-11). The target is
//! locked by a [`TargetLock`] (QUI-02).
//!
//! A [`Watchdog`] process (QUI-07) undoes freezes and command quiesces when the process that
//! made them dies.
//!
//! The file-system calls go through [`QuiesceBackend`]: [`FsFreeze`] for real (the only
//! `unsafe` of this layer, listed in docs/unsafe.md), [`FakeQuiesce`] in tests.

mod backend;
#[allow(unsafe_code)]
mod fsfreeze;
mod guard;
mod lock;
mod spec;
mod watchdog;

pub use backend::{BackendError, FakeAnswer, FakeCall, FakeOp, FakeQuiesce, QuiesceBackend};
pub use fsfreeze::FsFreeze;
pub use guard::{QuiesceError, Quiesced, Quiescer};
pub use lock::{LockError, TargetKind, TargetLock};
pub use spec::{QuiesceMode, QuiesceSpec, QuiesceSpecError};
pub use watchdog::{
    serve as serve_watchdog, Watchdog, WatchdogError, WatchdogMessage, WATCHDOG_READY,
};
