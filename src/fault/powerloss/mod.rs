//! A power-loss file system (feature `fault`): a FUSE pass-through to a backing directory that
//! keeps every file write volatile until a durability point, and a power cut that drops what no
//! durability point covered, as a disk without a battery-backed cache would.
//!
//! Killing a process with SIGKILL loses nothing the kernel accepted: the page cache survives,
//! so the order and presence of `fdatasync` calls go untested. Mounted with [`PowerLossMount`],
//! real processes (the `timezero` binary) write through the kernel's FUSE client into this
//! layer, which behaves like a volatile write cache in front of the backing directory:
//!
//! * **Writes** (`write`, `pwrite`, `pwritev`; io_uring reads and writes reach FUSE as ordinary
//!   read and write requests) are kept in memory per file: a list of pending writes in issue
//!   order plus a 4 KiB page overlay, so that reads (`read`, mapped pages faulted in, `O_DIRECT`
//!   reads) see the process's own writes. Nothing reaches the backing file.
//! * **Durability points honoured**: `fsync` and `fdatasync` on a file (FUSE `FSYNC`; `msync`
//!   with `MS_SYNC` arrives as the mapped pages' writes followed by `FSYNC`), and a write to a
//!   file opened with `O_SYNC` or `O_DSYNC` (the write flags carry the open flags; the kernel
//!   also sends `FSYNC` after such writes). Each makes *all* pending writes of that file
//!   durable, in issue order. `sync_file_range` never reaches FUSE (it only starts page-cache
//!   write-back, and this mount has no write-back cache: writes are sent through at once), so
//!   it is no durability point here, as it is none on a real disk (it does not flush the
//!   device cache). `syncfs`/`sync` are not sent to FUSE file systems of this kind and are no
//!   durability point either; `fsync` of a directory is recorded and changes nothing.
//! * **`O_DIRECT`**: an open with `O_DIRECT` is answered with `FOPEN_DIRECT_IO`, so its reads
//!   and writes bypass the kernel's page cache and arrive as requests of exactly the caller's
//!   offsets and lengths; they are still volatile here (a direct write is durable on a real
//!   disk only after a cache flush too). Counted in [`PowerLoss::direct_opens`].
//! * **Metadata** (create, mknod, mkdir, unlink, rename, link, chmod, truncate, `fallocate`
//!   without hole punching) is applied to the backing directory at once and survives every
//!   cut: this layer models lost data, not lost directory entries or sizes. A size change
//!   (truncate, `fallocate`) and a hard link first make the file's pending writes durable.
//!   `close` (FUSE `FLUSH`) is no durability point.
//!
//! **Power cuts.** The layer counts *mutating* operations (write, fsync, fsyncdir, create,
//! mknod, mkdir, unlink, rmdir, rename, link, setattr of mode or size, fallocate); reads change
//! no durable state, so a cut between two reads equals a cut before the next mutating
//! operation. A [`CutPlan`] names the operation `at_op` to cut before: when it arrives the layer
//! applies the [`LossPolicy`] to every file's pending writes (drop all, a seeded random subset of
//! whole writes, or each write torn at 4 KiB or 512 B granularity with a seeded coin per piece;
//! kept pieces land in issue order), writes the survivors to the backing files, and freezes:
//! that operation and every later one (reads included) fail with `EIO`, so nothing the process
//! does afterwards reaches the backing directory. [`PowerLoss::cut_now`] cuts at once (for a cut
//! after the last operation). The test then kills the processes, unmounts, and examines the
//! backing directory: exactly what a disk would hold after the power came back.
//!
//! **Trace.** Every write, flush, open, create, resize, rename and unlink is recorded with one
//! sequence number across all files ([`TraceEvent`]); with `record_data` the written bytes are
//! kept too, together with the top-level files' contents at mount time, so that
//! [`check_ordering`] can replay the trace through the harness's online
//! [`OrderingChecker`](super::OrderingChecker): a source write issued before its grain's copied
//! bit and T0 bytes were durable is reported at that write's sequence number.
//!
//! **Recovering the survivor.** A file's identity is its device and inode number, and those of
//! a FUSE mount are not those of the backing files, so a table recorded through the mount names
//! volumes the backing directory does not have: `timezero recover` on it would (rightly)
//! terminate every session with `IdentityMismatch`. [`SurvivorResolver`] opens the backing
//! files for the locators under the mount point and presents them with the identity the table
//! recorded, so that `Engine::open` runs the real recovery on the survivor's bytes, without the
//! FUSE layer in between.
//!
//! **Where it runs.** In-process: [`PowerLossMount::mount`] spawns fuser's session thread
//! (one thread, so the operations have one total order) and mounts with `mount(2)` directly,
//! which needs root and `/dev/fuse` (no `fusermount`, no libfuse); [`unavailable`] says why
//! not. Meant for small files: pending writes, the overlay, the trace and the mount-time
//! snapshot are all in memory.

mod fs;
mod replay;
mod store;

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

pub use replay::{check_ordering, OrderingReport, SurvivorResolver};
pub use store::{CutReport, LossPolicy, TraceEvent, TraceOp};

use crate::{Error, Result};
use store::Store;

/// When and how the power goes.
#[derive(Debug, Clone, Copy)]
pub struct CutPlan {
    /// Cut before the mutating operation with this 0-based count (`None`: only on request).
    pub at_op: Option<u64>,
    /// What happens to pending writes.
    pub policy: LossPolicy,
    /// Seed of the policy's choices.
    pub seed: u64,
    /// Keep written bytes in the trace (and the backing files' contents at mount time), for
    /// [`check_ordering`].
    pub record_data: bool,
}

impl Default for CutPlan {
    fn default() -> Self {
        CutPlan {
            at_op: None,
            policy: LossPolicy::DropAll,
            seed: 0,
            record_data: false,
        }
    }
}

/// A handle on the mounted layer's state (cheap to clone).
#[derive(Debug, Clone)]
pub struct PowerLoss {
    store: Arc<Mutex<Store>>,
}

impl PowerLoss {
    /// Mutating operations counted so far.
    #[must_use]
    pub fn ops(&self) -> u64 {
        self.store.lock().ops
    }

    /// Requests that change nothing (lookups, reads, opens) answered so far.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.store.lock().requests
    }

    /// Writes no durability point covers yet.
    #[must_use]
    pub fn pending_writes(&self) -> u64 {
        self.store.lock().pending_writes()
    }

    /// Opens with `O_DIRECT` (answered with `FOPEN_DIRECT_IO`).
    #[must_use]
    pub fn direct_opens(&self) -> u64 {
        self.store.lock().direct_opens
    }

    /// The cut, once it happened.
    #[must_use]
    pub fn cut_report(&self) -> Option<CutReport> {
        self.store.lock().cut.clone()
    }

    /// True once the power is cut (every operation fails with `EIO`).
    #[must_use]
    pub fn is_cut(&self) -> bool {
        self.store.lock().cut.is_some()
    }

    /// Cut the power now (if it was not cut yet) and return what the cut did.
    pub fn cut_now(&self) -> CutReport {
        let mut s = self.store.lock();
        let n = s.ops;
        s.power_cut(n)
    }

    /// The trace so far, every file in one order.
    #[must_use]
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.store.lock().trace.clone()
    }

    /// The trace of one file (path relative to the mount point, as it was named when each
    /// operation happened), with the global sequence numbers.
    #[must_use]
    pub fn file_trace(&self, path: &str) -> Vec<TraceEvent> {
        self.store
            .lock()
            .trace
            .iter()
            .filter(|e| e.path == path)
            .cloned()
            .collect()
    }

    /// Contents of the backing directory's top-level regular files at mount time (empty
    /// unless the plan records data), by name.
    #[must_use]
    pub fn initial_files(&self) -> std::collections::HashMap<String, Vec<u8>> {
        self.store.lock().initial.clone()
    }
}

/// A mounted power-loss layer.
#[derive(Debug)]
pub struct PowerLossMount {
    mount: crate::mount::FuseMount,
    handle: PowerLoss,
}

/// Why a power-loss mount cannot be made here (`None` when it can): no `/dev/fuse`, not root
/// (the mount is made with `mount(2)`, without `fusermount`), or a trial mount of an empty
/// directory failed (for example in a container without the right to mount).
#[must_use]
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse on this machine".to_string());
    }
    if !rustix::process::geteuid().is_root() {
        return Some("not root (the FUSE mount is made with mount(2) directly)".to_string());
    }
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("timezero-fuse-probe-{}-{n}", std::process::id()));
    let (b, m) = (base.join("b"), base.join("m"));
    let made = std::fs::create_dir_all(&b).and_then(|()| std::fs::create_dir_all(&m));
    let why = match made {
        Err(e) => Some(format!("cannot make a trial directory: {e}")),
        Ok(()) => match PowerLossMount::mount(&b, &m, CutPlan::default()) {
            Ok(mount) => mount
                .unmount()
                .err()
                .map(|e| format!("trial unmount failed: {e}")),
            Err(e) => Some(format!("trial mount failed: {e}")),
        },
    };
    let _ = std::fs::remove_dir_all(&base);
    why
}

impl PowerLossMount {
    /// Mount the layer over `backing` at `mountpoint` (an empty directory).
    ///
    /// # Errors
    /// [`Error::Io`] when the mount fails.
    pub fn mount(backing: &Path, mountpoint: &Path, plan: CutPlan) -> Result<PowerLossMount> {
        let backing = std::fs::canonicalize(backing)
            .map_err(|e| Error::io("resolve", backing.display().to_string(), 0, e))?;
        let store = Arc::new(Mutex::new(Store::new(
            &backing,
            plan.at_op,
            plan.policy,
            plan.seed,
            plan.record_data,
        )));
        let fs = fs::PowerLossFs {
            store: store.clone(),
        };
        let options = vec![
            fuser::MountOption::FSName("timezero-powerloss".to_string()),
            fuser::MountOption::RW,
        ];
        // One thread, so that the operations have one total order.
        let mount = crate::mount::FuseMount::mount(fs, mountpoint, options, 1)?;
        Ok(PowerLossMount {
            mount,
            handle: PowerLoss { store },
        })
    }

    /// The state handle.
    #[must_use]
    pub fn handle(&self) -> PowerLoss {
        self.handle.clone()
    }

    /// The canonical mount point (the prefix of locators recorded through the mount).
    #[must_use]
    pub fn mountpoint(&self) -> &Path {
        self.mount.mountpoint()
    }

    /// Unmount and wait for the session thread (every process using the mount must be gone).
    ///
    /// # Errors
    /// [`Error::Io`] when the unmount fails.
    pub fn unmount(self) -> Result<()> {
        self.mount.unmount()
    }
}
