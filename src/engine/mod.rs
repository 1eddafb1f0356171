//! The engine: one activity table, the volumes its sessions use, and every I/O path that
//! crosses a session.
//!
//! # The single mutation point
//!
//! Session state changes in exactly one place: `Table::commit`. Every change (establish,
//! copied bits, ended extents, state changes) is a list of journal entries committed by the
//! table; the in-memory [`Session`] objects are updated by the table *after* those entries are
//! durable. Nothing in this module changes a session any other way, so memory never runs ahead
//! of the disk and a set copied bit always means "durable, and its data durable before it".
//!
//! # Write order
//!
//! A source write that touches uncopied grains (crash-model rule 2, in `write.rs`): lock the
//! grains (per session, in session order) -> read the old bytes once -> write every target that
//! needs them -> flush those targets (shared) -> commit the copied bits (shared) -> release the
//! source write -> unlock. A write that touches only copied or uncovered grains checks the
//! bitmap and goes straight to the volume. The background copy (`copy.rs`, driven by
//! [`copier`]) holds grains, copies, flushes the target, commits, then releases (rule 3).
//!
//! # Rooms
//!
//! | file | concern |
//! |---|---|
//! | `mod.rs` | [`Engine`]: open/create, attach volumes, status, direct volume I/O |
//! | `lifecycle.rs` | [`SessionSpec`], establish, withdraw, convert, terminate, complete |
//! | `forget.rs` | [`Room`], [`Engine::forget`], [`Engine::forget_ended`] |
//! | `group.rs` | consistency groups: [`Engine::establish_group`], [`Engine::withdraw_group`] |
//! | `write.rs` | source writes with copy-before-write, target writes ([`Engine::write_image`]) |
//! | `image.rs` | [`Image`] and the lock-free image read with its re-check |
//! | `writeback.rs` | write-back mode: source writes held until the volume's next flush |
//! | `copy.rs` | [`Engine::copy_data`] / [`Engine::commit_copied`] / [`Engine::copy_all`] |
//! | `copier.rs` | [`copier::Copier`]: background workers, rate limit, pause, progress |
//! | `recovery.rs` | reconcile on open, on reset and on resume; [`Decision`], [`RestartPolicy`] |

mod checked;
pub mod copier;
mod copy;
mod forget;
mod group;
mod image;
mod lifecycle;
mod pause;
mod recovery;
mod refresh;
mod reverse;
mod write;
mod writeback;

use crate::volume::{open_file_volume, Backend, BACKEND_PREAD};
pub use copy::CopyProgress;
pub use forget::{table_room, Room};
#[cfg(feature = "fault")]
pub use group::set_canary_split_group_commit;
pub use image::Image;
pub use lifecycle::SessionSpec;
#[cfg(feature = "fault")]
pub use pause::{set_pause_hook, PauseHook, PausePoint};
pub use recovery::{
    Decision, FileResolver, MapResolver, Outcome, ResetHandled, RestartPolicy, VolumeResolver,
};
pub use refresh::Refreshed;
#[cfg(feature = "fault")]
pub use reverse::set_canary_restored_before_flush;
pub use reverse::Reversed;
#[cfg(feature = "fault")]
pub use write::{
    set_canary_late_change_marks, set_canary_skip_cbw_flush, set_canary_skip_cbw_flush_all_threads,
    set_checked_commit_on_thread, set_checked_commit_on_thread_all_threads,
};

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::activity::{MmapStorage, OpenReport, Table, TableOptions, TableStorage};
use crate::model::{CopyMode, ExtentSpec, Reason, ReasonCode, SessionState};

use crate::ids::{GrainCount, Seq, SessionId, VolumeId};
use crate::session::Session;
use crate::sync::GroupSync;
use crate::volume::{CheckedVolume, FileVolumeOptions, Volume, VolumeInfo};
use crate::{Error, Result};

/// What to do when copying old data for a source write fails after bounded retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyErrorPolicy {
    /// Fail the source write; the session stays intact. Default.
    #[default]
    FailWrite,
    /// Terminate the session (reason `CopyFailed`) and let the source write proceed.
    TerminateSession,
}

/// Engine options.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Restart policy. Default = [`RestartPolicy::Resume`].
    pub restart: RestartPolicy,
    /// Copy error policy. Default = [`CopyErrorPolicy::FailWrite`].
    pub on_copy_error: CopyErrorPolicy,
    /// Options for file volumes the engine opens itself. Default = buffered, read-write.
    pub file_options: FileVolumeOptions,
    /// File backend. Default = [`Backend::Auto`]: io_uring for `O_DIRECT` volumes where the
    /// kernel allows, pread/pwrite for buffered ones.
    pub backend: Backend,
    /// Sizes for a newly created table.
    pub table: TableOptions,
    /// Open a table that is older than its rollback witness (see [`Table::open_with`]),
    /// terminating every active session with `TableRolledBack`, instead of refusing it.
    /// Default = false.
    pub accept_rollback: bool,
    /// Write-back: a source write that needs copy-before-write copies the T0 bytes to the
    /// target at once and is then held in memory (reads through the engine see it) until the
    /// volume's next [`Engine::flush`], which makes all held writes durable at one target flush
    /// and one table commit before writing them to the volume. [`Engine::write`]'s contract is
    /// unchanged (durable after [`Engine::flush`]); what changes is that the volume itself (read
    /// other than through the engine) shows the write only after that flush. The servers of
    /// the command line (`serve`, `mount`, `daemon`) turn it on unless given `--write-through`.
    /// Default = false (every write reaches the volume before it returns).
    pub write_back: bool,
    /// Checked copy-before-write: a first write flushes the target while the table commits
    /// `CopyChecked` records (a CRC32C per grain that recovery verifies
    /// against the target, copying a lost grain again from the source), instead of flushing
    /// the target before committing the bits (docs/crash-model.md, "Checked copy-before-write").
    /// Default = true. Off, the serial path runs: three durability points in series, and
    /// nothing to prove at the next open. A target missing at an open that finds unproven
    /// records (after a crash, or an engine dropped without [`Engine::close`]) suspends the
    /// session as on the serial path; its records are kept in the table and proven when the
    /// target is back, and until then the source grains they name are not written.
    pub checked_copies: bool,
    /// Copy offload: the background copy (the [`crate::Copier`], [`Engine::copy_batch`]) asks
    /// the kernel to copy a run from a buffered file source to a buffered file target
    /// ([`Volume::copy_from`]: `copy_file_range(2)`), so the bytes are copied once, between
    /// page caches, instead of read into user memory and written back; on a file system that
    /// shares extents (XFS, Btrfs) the kernel shares them instead of copying, so the target
    /// costs no space until either file is written there. Runs the kernel cannot copy go
    /// through memory as before. The order of the crash model is unchanged (the run is on the
    /// target before the target's flush that precedes its bits). Default = true; false keeps
    /// every copy in memory (a target that must hold its own physical copy of every block).
    pub copy_offload: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            restart: RestartPolicy::default(),
            on_copy_error: CopyErrorPolicy::default(),
            file_options: FileVolumeOptions::default(),
            backend: Backend::default(),
            table: TableOptions::default(),
            accept_rollback: false,
            write_back: false,
            checked_copies: true,
            copy_offload: true,
        }
    }
}

/// An attached volume with its durability group and write gate.
#[derive(Debug)]
pub(crate) struct VolumeHandle {
    /// The volume, latching its first failed flush: every later write and flush fails at once
    /// with that error (a flush after a failed one may report success for lost writes). Failed
    /// writes do not latch (they are retried, and a write that finally fails fails its caller);
    /// reads go on after the latch (image reads of copied grains stay possible).
    pub(crate) vol: CheckedVolume<Arc<dyn Volume>>,
    pub(crate) info: VolumeInfo,
    sync: GroupSync,
    /// Writers hold it shared; establishing a session on this volume holds it exclusively, so
    /// T0 falls between writes. Sharded: a writer locks only its thread's shard, so the writers
    /// of a volume do not all update one shared lock word (establish locks every shard).
    gate: crossbeam::sync::ShardedLock<()>,
    /// Set when an `Establish` with this volume as source failed to commit: the session may
    /// still be durable, so writes are refused until the table is reopened and recovered.
    fenced: std::sync::atomic::AtomicBool,
    /// Writes held in write-back mode (shared with a handle that replaces this one).
    pub(crate) held: Arc<writeback::WriteBack>,
}

/// Hold the write gates of `handles` (in the order given: volume id order, as every holder of
/// more than one takes them), so that no writer is inside any of them until the guards drop.
pub(crate) fn hold_gates(
    handles: &[Arc<VolumeHandle>],
) -> Vec<crossbeam::sync::ShardedLockWriteGuard<'_, ()>> {
    handles
        .iter()
        .map(|h| {
            h.gate
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })
        .collect()
}

impl VolumeHandle {
    fn name(&self) -> String {
        self.info.locator.clone()
    }

    fn flush(&self) -> Result<()> {
        self.sync.sync(|| self.vol.flush())
    }

    /// The flush that covers every write to this volume completed so far (see
    /// [`crate::sync::GroupSync::ticket`]).
    fn flush_ticket(&self) -> u64 {
        self.sync.ticket()
    }

    /// Make the writes completed before `ticket` was taken durable, sharing flushes.
    fn flush_from(&self, ticket: u64) -> Result<()> {
        self.sync.sync_from(ticket, || self.vol.flush())
    }

    fn check_live(&self) -> Result<()> {
        if self.fenced.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Poisoned {
                target: self.name(),
            });
        }
        if let Some(first) = self.vol.first_error() {
            return Err(first.to_error());
        }
        Ok(())
    }

    #[inline(always)]
    fn read_retry(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        retry(|| self.vol.read_at(off, buf))
    }

    #[inline(always)]
    fn write_retry(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.check_live()?;
        retry(|| self.vol.write_at(off, buf))
    }

    /// Read several ranges at once ([`crate::Volume::read_many`]), retried as
    /// [`VolumeHandle::read_retry`] retries one.
    fn read_many_retry(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        retry(|| self.vol.read_many(reqs))
    }

    /// Write several ranges at once ([`crate::Volume::write_many`]), retried as
    /// [`VolumeHandle::write_retry`] retries one.
    fn write_many_retry(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
        self.check_live()?;
        retry(|| self.vol.write_many(reqs))
    }
}

#[inline(always)]
fn retry(mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let mut last = None;
    for _ in 0..crate::limits::DATA_IO_RETRIES_MAX {
        match f() {
            Ok(()) => return Ok(()),
            Err(e @ Error::Io { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::invalid("retry", "no attempt made")))
}

/// A session's status, for display and JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionStatus {
    /// Id.
    pub id: SessionId,
    /// State.
    pub state: SessionState,
    /// Mode.
    pub mode: CopyMode,
    /// Why it ended, or why it is suspended.
    pub reason: Option<Reason>,
    /// For a suspended session: the path (locator) of the volume that cannot be found or
    /// opened.
    pub unavailable: Option<String>,
    /// Source locator.
    pub source: String,
    /// Target locator.
    pub target: String,
    /// Grain in bytes.
    pub grain_bytes: u64,
    /// Extents.
    pub extents: Vec<ExtentSpec>,
    /// Ended extents (index, reason).
    pub ended_extents: Vec<(u32, Reason)>,
    /// Grains copied (durably recorded).
    pub grains_copied: GrainCount,
    /// Grains in total.
    pub grains_total: GrainCount,
    /// T0, ms since the epoch: the establish's, or for an incremental session the last
    /// refresh's.
    pub created_unix_ms: u64,
    /// The consistency group the session was established in, if any.
    pub group: Option<String>,
    /// Whether the session records changes for [`Engine::refresh`].
    pub incremental: bool,
    /// Grains marked changed since T0 (incremental sessions; 0 otherwise): what a refresh now
    /// would copy again.
    pub grains_changed: GrainCount,
    /// Grains a reverse restore ([`Engine::reverse`]) still has to move back to the source
    /// (0 when none is in progress).
    pub grains_to_restore: GrainCount,
}

/// The committed state of a table read without taking it (see [`read_status`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSnapshot {
    /// Every session, as the table's durable state has it.
    pub sessions: Vec<SessionStatus>,
    /// The process holding the table (`pid N (command)`), if one does.
    pub holder: Option<String>,
    /// `(where the journal ends, what the witness saw)` when the table file is older than its
    /// rollback witness (every command that opens it refuses it).
    pub rolled_back: Option<(Seq, Seq)>,
    /// Room for new sessions, and the ended sessions making room would forget first.
    pub room: Room,
}

/// Read the committed state of the table at `path` without taking it and without changing
/// anything: no lock, no recovery, no reconcile, no checkpoint (see
/// [`Table::open_read_only`]). Works while another process holds and writes the table; the
/// sessions are as its last commit left them (a session whose volume has gone still shows as
/// it was until the holder, or the next open, reconciles it).
///
/// # Errors
/// I/O errors; [`Error::Corrupt`] when no committed state can be read (after a few tries, in
/// case a writer was switching checkpoints).
pub fn read_status(path: &Path) -> Result<TableSnapshot> {
    const TRIES: usize = 10;
    let mut last = None;
    for _ in 0..TRIES {
        let storage: Arc<dyn TableStorage> = Arc::new(MmapStorage::open_read_only(path)?);
        match Table::open_read_only(storage) {
            Ok((t, _)) => {
                return Ok(TableSnapshot {
                    sessions: t.sessions().iter().map(|s| session_status(s)).collect(),
                    holder: crate::activity::table_holder(path),
                    rolled_back: t.rolled_back()?,
                    room: table_room(&t),
                })
            }
            Err(e @ Error::Corrupt { .. }) => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::invalid("status", "no committed state could be read")))
}

/// The engine: one activity table and the volumes its sessions use.
///
/// # Example
///
/// A table in memory, a source and a target, one session: after a write to the source, the
/// session's image still reads as the source did when the session was established (T0).
///
/// ```
/// use std::sync::Arc;
/// use timezero::MemStorage;
/// use timezero::prelude::*;
///
/// # fn main() -> timezero::Result<()> {
/// let layout = TableOptions::default().layout()?;
/// let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
/// let engine = Engine::create(table, EngineOptions::default())?;
///
/// let source = engine.attach(Arc::new(MemVolume::with_data("src", &[1u8; 256 << 10])));
/// let target = engine.attach(Arc::new(MemVolume::new("tgt", 256 << 10)));
/// let session = engine.establish(&SessionSpec::whole(source, target))?; // T0
///
/// engine.write(source, 0, &[2u8; 4096])?; // copy-before-write, then the new bytes
/// let mut now = [0u8; 4096];
/// engine.read(source, 0, &mut now)?;
/// assert_eq!(now, [2u8; 4096]);
/// let mut image = [0u8; 4096];
/// engine.read_image(session, 0, &mut image)?;
/// assert_eq!(image, [1u8; 4096]); // T0 bytes
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Engine {
    /// Shared with the flusher threads, which may lead the journal commits of first writes.
    table: Arc<Table>,
    /// The attached volumes, as a snapshot that readers load without a lock or a shared
    /// reference-count update (every write looks its volume up here, from many threads).
    volumes: ArcSwap<FxHashMap<VolumeId, Arc<VolumeHandle>>>,
    /// Serialises changes of `volumes` (copy, insert, store).
    volumes_change: Mutex<()>,
    /// Bumped after every change of `volumes` (a handle added or replaced): an [`Image`]
    /// resolved under an older value looks its volumes up again.
    volumes_epoch: std::sync::atomic::AtomicU64,
    /// The live (active and suspended) sessions, as a snapshot (loaded by every write, like
    /// `volumes`).
    active: ArcSwap<Vec<Arc<Session>>>,
    /// Volumes that are the target of a session in the table (any state): write-back never
    /// holds writes to them (their images read them directly).
    target_vols: ArcSwap<rustc_hash::FxHashSet<VolumeId>>,
    /// Serialises `refresh_active` (read the table, store the snapshot), so that a snapshot
    /// taken earlier never replaces one taken later.
    active_change: Mutex<()>,
    /// Serialises consistency-group establishes (a group name is taken once).
    groups_change: Mutex<()>,
    options: EngineOptions,
    /// Copy-before-write writes in progress (the background copier yields to them).
    cow_inflight: std::sync::atomic::AtomicUsize,
    /// Runs checked copies' target flushes beside their table commits, or the commits beside
    /// the flushes (see `Durability`).
    flusher: checked::Flusher,
    /// How long a checked copy's two durability points take here.
    durability: Arc<checked::Durability>,
    /// Sessions in `active` with a reverse restore in progress when it was last stored (it
    /// may stay above the true count until the next store, never below it while a reverse
    /// runs): the write and read paths skip every reverse check while it is 0.
    reversing: std::sync::atomic::AtomicUsize,
    /// The backend of the first file volume this engine opened.
    backend: std::sync::OnceLock<&'static str>,
    /// Identity (device and inode) of the table's file, when the table is a file: it is
    /// never accepted as a volume.
    table_file: Option<VolumeId>,
    /// Who is told of each reset handled ([`Engine::watch_resets`]).
    reset_watchers: recovery::ResetWatchers,
    /// Decisions taken when the table was opened.
    pub decisions: Vec<Decision>,
    /// What opening the table found.
    pub open_report: OpenReport,
}

impl Engine {
    /// Create a new table file at `path` and open an engine on it.
    ///
    /// # Errors
    /// I/O errors; `AlreadyExists` when the file exists.
    ///
    /// The table is built under a temporary name in the same directory and renamed into place
    /// only when it is complete (file and directory synced), so a failed create (a full disk)
    /// leaves nothing behind.
    pub fn create_path(path: &Path, options: EngineOptions) -> Result<Engine> {
        let layout = options.table.layout()?;
        crate::volume::create_complete(path, |tmp| {
            let storage: Arc<dyn TableStorage> =
                Arc::new(MmapStorage::create(tmp, layout.file_bytes())?);
            Table::create(storage, &options.table).map(drop)
        })?;
        // The file was created and unlocked by this process a moment ago. A lock on it now is
        // held by a child process that another thread of this process forked while the
        // creating descriptor was open (the child keeps a copy of it until it execs), or by
        // another process that opened the new table at once: wait briefly for the first.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match Engine::open_path(path, options.clone()) {
                Err(Error::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }

    /// Open an existing table file, recover, and reconcile its sessions against file volumes.
    ///
    /// # Errors
    /// I/O errors, [`Error::Locked`], [`Error::Corrupt`].
    pub fn open_path(path: &Path, options: EngineOptions) -> Result<Engine> {
        let storage: Arc<dyn TableStorage> = Arc::new(MmapStorage::open(path)?);
        let resolver = FileResolver {
            options: options.file_options.clone(),
            backend: options.backend,
            opened: std::sync::OnceLock::new(),
        };
        let mut e = Engine::open(storage, &resolver, options)?;
        if let Some(name) = resolver.opened.get() {
            let _ = e.backend.set(name);
        }
        e.table_file = Some(crate::volume::file_identity(path)?);
        Ok(e)
    }

    /// Create a table on `storage`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn create(storage: Arc<dyn TableStorage>, options: EngineOptions) -> Result<Engine> {
        let table = Table::create(storage, &options.table)?;
        Ok(Engine::from_table(table, OpenReport::default(), options))
    }

    /// Open the table on `storage`, recover, and reconcile sessions against the volumes the
    /// resolver finds.
    ///
    /// # Errors
    /// I/O errors, [`Error::Corrupt`].
    pub fn open(
        storage: Arc<dyn TableStorage>,
        resolver: &dyn VolumeResolver,
        options: EngineOptions,
    ) -> Result<Engine> {
        let (table, report) =
            Table::open_verified(storage, options.accept_rollback, &mut |s, grains, log| {
                checked::verify_at_open(resolver, s, grains, log)
            })?;
        let mut e = Engine::from_table(table, report, options);
        let decisions = e.reconcile_all(resolver)?;
        e.decisions = decisions;
        Ok(e)
    }

    fn from_table(table: Table, open_report: OpenReport, options: EngineOptions) -> Engine {
        let e = Engine {
            table: Arc::new(table),
            volumes: ArcSwap::from_pointee(FxHashMap::default()),
            volumes_change: Mutex::new(()),
            volumes_epoch: std::sync::atomic::AtomicU64::new(0),
            active: ArcSwap::from_pointee(Vec::new()),
            target_vols: ArcSwap::from_pointee(rustc_hash::FxHashSet::default()),
            active_change: Mutex::new(()),
            groups_change: Mutex::new(()),
            options,
            cow_inflight: std::sync::atomic::AtomicUsize::new(0),
            flusher: checked::Flusher::new(),
            durability: Arc::default(),
            reversing: std::sync::atomic::AtomicUsize::new(0),
            backend: std::sync::OnceLock::new(),
            table_file: None,
            reset_watchers: recovery::ResetWatchers::default(),
            decisions: Vec::new(),
            open_report,
        };
        e.refresh_active();
        e
    }

    /// Close the engine and report what a drop would hide: every attached volume is flushed
    /// (writes made through [`Engine::write`] and [`Engine::write_image`] become durable) and
    /// the table's rollback witness is made current (the table's close). Every step runs even
    /// after a failure; the first failure is returned. Dropping an engine flushes no volume
    /// and ignores a failure of the witness.
    ///
    /// # Errors
    /// The first flush or table error.
    ///
    /// # Example
    ///
    /// A file-backed table: write through the engine, close it, and find the write durable
    /// and the session resumed when the table is opened again.
    ///
    /// ```
    /// use timezero::prelude::*;
    ///
    /// # fn main() -> timezero::Result<()> {
    /// let dir = tempfile::tempdir().expect("temporary directory");
    /// let (src, tgt) = (dir.path().join("src"), dir.path().join("tgt"));
    /// std::fs::write(&src, vec![5u8; 1 << 20]).expect("source");
    /// std::fs::write(&tgt, vec![0u8; 1 << 20]).expect("target");
    /// let table = dir.path().join("t.tzt");
    ///
    /// let engine = Engine::create_path(&table, EngineOptions::default())?;
    /// let source = engine.attach_path(&src)?;
    /// let target = engine.attach_path(&tgt)?;
    /// let session = engine.establish(&SessionSpec::whole(source, target))?;
    /// engine.write(source, 0, &[6u8; 4096])?;
    /// engine.close()?; // every volume flushed, the table closed
    ///
    /// let engine = Engine::open_path(&table, EngineOptions::default())?;
    /// let mut buf = [0u8; 4096];
    /// engine.read_image(session, 0, &mut buf)?;
    /// assert_eq!(buf, [5u8; 4096]); // still T0
    /// assert_eq!(std::fs::read(&src).expect("read source")[..4096], [6u8; 4096]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn close(self) -> Result<()> {
        let mut first = None;
        let volumes = self.volumes.load_full();
        let mut handles: Vec<_> = volumes.values().collect();
        handles.sort_by(|a, b| a.info.locator.cmp(&b.info.locator));
        for h in &handles {
            if let Err(e) = self.drain(h) {
                first.get_or_insert(e);
            }
        }
        for h in handles {
            if let Err(e) = h.flush() {
                first.get_or_insert(e);
            }
        }
        // Every target is durable: no checked copy needs verifying at the next open.
        if first.is_none() {
            if let Err(e) = self.table.checkpoint_if_checked() {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = self.table.close() {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// What recovery decided for each session when the table was opened (empty for a new
    /// table); the same as the public field `decisions`.
    ///
    /// # Example
    ///
    /// A session whose target file is replaced while the table is closed is terminated when
    /// the table is opened again; one whose volumes are unchanged is resumed.
    ///
    /// ```
    /// use timezero::prelude::*;
    /// use timezero::Outcome;
    ///
    /// # fn main() -> timezero::Result<()> {
    /// let dir = tempfile::tempdir().expect("temporary directory");
    /// let file = |name: &str, byte: u8| {
    ///     let p = dir.path().join(name);
    ///     std::fs::write(&p, vec![byte; 256 << 10]).expect("volume file");
    ///     p
    /// };
    /// let (src, kept, replaced) = (file("src", 1), file("kept", 0), file("replaced", 0));
    /// let table = dir.path().join("t.tzt");
    /// let engine = Engine::create_path(&table, EngineOptions::default())?;
    /// assert!(engine.open_decisions().is_empty()); // a new table
    /// let source = engine.attach_path(&src)?;
    /// let a = engine.establish(&SessionSpec::whole(source, engine.attach_path(&kept)?))?;
    /// let b = engine.establish(&SessionSpec::whole(source, engine.attach_path(&replaced)?))?;
    /// engine.close()?;
    ///
    /// let other = file("other", 0);
    /// std::fs::rename(&other, &replaced).expect("rename"); // same path, another file
    /// let engine = Engine::open_path(&table, EngineOptions::default())?;
    /// let outcome = |id: SessionId| engine.open_decisions().iter().find(|d| d.session == id);
    /// assert!(matches!(outcome(a).map(|d| &d.outcome), Some(Outcome::Resumed)));
    /// assert!(matches!(outcome(b).map(|d| &d.outcome), Some(Outcome::Terminated(_))));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn open_decisions(&self) -> &[Decision] {
        &self.decisions
    }

    /// Copy-before-write writes in progress right now (the background copier yields while
    /// there are any, so first writes do not queue behind large copy batches).
    #[must_use]
    pub fn cow_in_flight(&self) -> usize {
        self.cow_inflight.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The activity table.
    #[must_use]
    pub fn table(&self) -> &Table {
        &self.table
    }

    fn refresh_active(&self) {
        let _change = self.active_change.lock();
        let all = self.table.sessions();
        self.target_vols
            .store(Arc::new(all.iter().map(|s| s.desc.target.id).collect()));
        let v: Vec<_> = all.into_iter().filter(|s| s.holds_volumes()).collect();
        let reversing = v.iter().filter(|s| s.reversing()).count();
        self.active.store(Arc::new(v));
        self.reversing
            .store(reversing, std::sync::atomic::Ordering::Release);
    }

    /// Whether a reverse restore may be in progress (cheap; see `reversing`).
    #[inline]
    pub(crate) fn reversing_any(&self) -> bool {
        self.reversing.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// Attach a volume so sessions can use it; returns its id. Attaching the same identity again
    /// replaces the handle.
    pub fn attach(&self, vol: Arc<dyn Volume>) -> VolumeId {
        let info = vol.info();
        let id = info.id;
        let change = self.volumes_change.lock();
        // Writes held for the identity stay held (a handle attached again replaces the old one
        // for the same volume).
        let held = self
            .volumes
            .load()
            .get(&id)
            .map(|old| Arc::clone(&old.held))
            .unwrap_or_default();
        let h = Arc::new(VolumeHandle {
            vol: CheckedVolume::new(vol)
                .latch_writes(false)
                .serve_reads_when_failed(true),
            info,
            sync: GroupSync::default(),
            gate: crossbeam::sync::ShardedLock::new(()),
            fenced: std::sync::atomic::AtomicBool::new(false),
            held,
        });
        let mut vols = FxHashMap::clone(&self.volumes.load());
        vols.insert(id, h);
        self.volumes.store(Arc::new(vols));
        // After the store: an `Image` that loads the epoch and then the map never pairs a new
        // epoch with an old map (it may pair an old epoch with a new map, and then merely
        // resolves its volumes once more).
        self.volumes_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        drop(change);
        id
    }

    /// Detach a volume (its handle is dropped once no I/O in flight holds it): a volume found
    /// gone must not be used through a handle opened before.
    fn detach(&self, id: VolumeId) {
        let change = self.volumes_change.lock();
        if self.volumes.load().contains_key(&id) {
            let mut vols = FxHashMap::clone(&self.volumes.load());
            vols.remove(&id);
            self.volumes.store(Arc::new(vols));
            self.volumes_epoch
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        drop(change);
    }

    /// A resolver that opens file volumes the way this engine does (its file options and
    /// backend), for [`Engine::resume`].
    #[must_use]
    pub fn file_resolver(&self) -> FileResolver {
        FileResolver {
            options: self.options.file_options.clone(),
            backend: self.options.backend,
            opened: std::sync::OnceLock::new(),
        }
    }

    /// Attach a file volume by path.
    ///
    /// # Errors
    /// I/O errors.
    ///
    /// [`Error::NotAVolume`] when `path` is the table's own file (by device and inode, so a
    /// hard link or a symbolic link to it is refused too).
    pub fn attach_path(&self, path: &Path) -> Result<VolumeId> {
        let v = self.open_file(path)?;
        self.refuse_table_file(&v.info())?;
        Ok(self.attach(v))
    }

    /// [`Error::NotAVolume`] when `info` is the table's own file.
    fn refuse_table_file(&self, info: &VolumeInfo) -> Result<()> {
        if self.table_file == Some(info.id) {
            return Err(Error::NotAVolume {
                path: info.locator.clone(),
                why: format!("it is the activity table {}", self.table.name()),
            });
        }
        Ok(())
    }

    /// Identity (device and inode) of the table's file, when it is a file.
    #[must_use]
    pub fn table_file(&self) -> Option<VolumeId> {
        self.table_file
    }

    /// Open (without attaching) a file volume with this engine's file options and backend.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open_file(&self, path: &Path) -> Result<Arc<dyn Volume>> {
        let (v, name) = open_file_volume(path, &self.options.file_options, self.options.backend)?;
        let _ = self.backend.set(name);
        Ok(v)
    }

    /// The file backend in use: [`BACKEND_PREAD`], [`crate::BACKEND_PREAD_IO_URING`] or
    /// [`crate::BACKEND_IO_URING`]. This is the backend
    /// of the first file volume the engine opened (io_uring may fall back to pread when the
    /// kernel refuses), or, before any, the one [`EngineOptions::backend`] would pick.
    #[must_use]
    pub fn backend_name(&self) -> &'static str {
        match self.backend.get() {
            Some(name) => name,
            None if crate::volume::uring_allowed() => self
                .options
                .backend
                .opened_name(self.options.file_options.direct),
            None => BACKEND_PREAD,
        }
    }

    /// Whether file volumes are opened with `O_DIRECT`.
    #[must_use]
    pub fn direct(&self) -> bool {
        self.options.file_options.direct
    }

    /// Whether first writes are held until the volume's next flush
    /// ([`EngineOptions::write_back`]).
    #[must_use]
    pub fn write_back(&self) -> bool {
        self.options.write_back
    }

    /// The attached handles of the sessions' volumes (each once, in id order: the order
    /// gates are taken in); volumes not attached are left out.
    pub(crate) fn handles_of(&self, sessions: &[&Session]) -> Vec<Arc<VolumeHandle>> {
        let mut vols: Vec<_> = sessions
            .iter()
            .flat_map(|s| [s.desc.source.id, s.desc.target.id])
            .collect();
        vols.sort_unstable();
        vols.dedup();
        vols.iter().filter_map(|v| self.handle(*v).ok()).collect()
    }

    pub(crate) fn handle(&self, id: VolumeId) -> Result<Arc<VolumeHandle>> {
        self.volumes
            .load()
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::UnknownVolume(id.to_string()))
    }

    /// Every attached volume as it was when attached.
    #[must_use]
    pub fn attached(&self) -> Vec<VolumeInfo> {
        let mut v: Vec<_> = self
            .volumes
            .load()
            .values()
            .map(|h| h.info.clone())
            .collect();
        v.sort_by(|a, b| a.locator.cmp(&b.locator));
        v
    }

    /// Find an attached volume by locator (path).
    #[must_use]
    pub fn volume_by_locator(&self, locator: &str) -> Option<VolumeId> {
        self.volumes
            .load()
            .values()
            .find(|h| h.info.locator == locator)
            .map(|h| h.info.id)
    }

    /// The attached volume.
    ///
    /// # Errors
    /// [`Error::UnknownVolume`].
    pub fn volume(&self, id: VolumeId) -> Result<Arc<dyn Volume>> {
        Ok(self.handle(id)?.vol.inner().clone())
    }

    /// A session.
    ///
    /// # Errors
    /// [`Error::UnknownSession`].
    pub fn session(&self, id: SessionId) -> Result<Arc<Session>> {
        self.table.session(id).ok_or(Error::UnknownSession(id))
    }

    /// Status of every session in the table.
    #[must_use]
    pub fn status(&self) -> Vec<SessionStatus> {
        self.table
            .sessions()
            .iter()
            .map(|s| session_status(s))
            .collect()
    }

    /// Read an attached volume as its clients see it: its own bytes, except while a reverse
    /// restore ([`Engine::reverse`]) is moving a session's image back to it, when the grains
    /// not yet moved back are read from that session's target. (An image of a session on the
    /// volume is read with [`Engine::read_image`].)
    ///
    /// # Errors
    /// I/O errors.
    pub fn read(&self, vol: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let h = self.handle(vol)?;
        if !h.held.is_empty() {
            // Write-back: writes held for the volume lie over its bytes.
            return h.held.read_through(offset, buf, |b| {
                if self.reversing_any() {
                    self.read_restoring(&h, offset, b)
                } else {
                    h.read_retry(offset, b)
                }
            });
        }
        if self.reversing_any() {
            return self.read_restoring(&h, offset, buf);
        }
        h.read_retry(offset, buf)
    }

    /// Make completed writes to a volume durable (in write-back mode, the writes held for it
    /// are made durable and written to it first).
    ///
    /// # Errors
    /// I/O errors; the volume latches as poisoned after a failed flush.
    pub fn flush(&self, vol: VolumeId) -> Result<()> {
        let h = self.handle(vol)?;
        self.drain(&h)?;
        h.flush()
    }

    /// Writes held for a volume in write-back mode, in bytes (0 when none).
    ///
    /// # Errors
    /// [`Error::UnknownVolume`].
    pub fn held_bytes(&self, vol: VolumeId) -> Result<u64> {
        Ok(self.handle(vol)?.held.bytes() as u64)
    }
}

fn session_status(s: &Session) -> SessionStatus {
    let st = s.status();
    SessionStatus {
        id: s.id(),
        state: st.state,
        mode: st.mode,
        unavailable: (st.state == SessionState::Suspended)
            .then(|| unavailable_volume(s, st.reason.as_ref()).1.to_string()),
        reason: st.reason.clone(),
        source: s.desc.source.locator.clone(),
        target: s.desc.target.locator.clone(),
        grain_bytes: s.desc.grain.bytes(),
        extents: s.desc.extents.clone(),
        ended_extents: st.ended_list(),
        grains_copied: if st.state == SessionState::Completed {
            GrainCount(s.desc.grains())
        } else {
            s.copied()
        },
        grains_total: GrainCount(s.desc.grains()),
        created_unix_ms: s.t0_unix_ms(),
        group: s.desc.group.clone(),
        incremental: s.desc.incremental,
        grains_changed: s.changed(),
        grains_to_restore: s.restore_pending(),
    }
}

/// Which volume of a suspended session is unavailable (by its reason code): role and path.
fn unavailable_volume<'s>(s: &'s Session, reason: Option<&Reason>) -> (&'static str, &'s str) {
    if reason.is_some_and(|r| r.code == ReasonCode::SourceUnavailable) {
        ("source", &s.desc.source.locator)
    } else {
        ("target", &s.desc.target.locator)
    }
}

/// The error for a use of a suspended session: names it, the unavailable volume and why.
fn suspended_error(s: &Session) -> Error {
    let reason = s.status().reason;
    let (role, path) = unavailable_volume(s, reason.as_ref());
    Error::Suspended {
        id: s.id(),
        role,
        path: path.to_string(),
        why: reason.map_or_else(|| "unavailable".to_string(), |r| r.detail),
    }
}

/// The error for reading or writing the image of a session that is not active:
/// [`Error::Suspended`] or [`Error::NotActive`].
fn not_usable(s: &Session) -> Error {
    match s.state() {
        SessionState::Suspended => suspended_error(s),
        state => Error::NotActive { id: s.id(), state },
    }
}
