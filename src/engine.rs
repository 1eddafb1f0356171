//! The public engine: tables, volumes, sessions and the I/O paths.
//!
//! Write ordering for a source write that touches uncopied grains (crash-model rule 2):
//! lock the grains (per session, in session order) -> read the old bytes once -> write every
//! target that needs them -> flush those targets (shared) -> commit the copied bits (shared) ->
//! release the source write -> unlock. A write that touches only copied or uncovered grains
//! checks the bitmap and goes straight to the volume.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use crate::activity::format::{
    CopyMode, Entry, ExtentSpec, Reason, ReasonCode, SessionDesc, SessionState, VolumeRef,
};
use crate::activity::{MmapStorage, OpenReport, Table, TableOptions, TableStorage};

use crate::ids::{GrainSize, SessionId, VolumeId};
use crate::session::{GrainHold, Piece, Session};
use crate::sync::GroupSync;
use crate::volume::{check_range, FileVolume, FileVolumeOptions, Volume, VolumeInfo};
use crate::{Error, Result};

/// Name of the pread/pwrite file backend ([`FileVolume`]), as reported by
/// [`Engine::backend_name`].
pub const BACKEND_PREAD: &str = "pread";

/// Name of the io_uring file backend (`UringVolume`), as reported by [`Engine::backend_name`].
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
/// [`Error::Io`] when the file cannot be opened or inspected.
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

    /// The name [`Engine::backend_name`] reports for a volume opened with this backend, when
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
fn uring_allowed() -> bool {
    crate::volume::uring_available()
}

#[cfg(not(feature = "uring"))]
fn uring_allowed() -> bool {
    false
}

#[cfg(feature = "fault")]
thread_local! {
    static CANARY_SKIP_CBW_FLUSH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Fault-harness canary: while on, copy-before-write in the calling thread skips the target
/// flush before committing copied bits (a deliberate rule-2 violation the harness must catch).
/// Thread-local so that parallel tests are not affected.
#[cfg(feature = "fault")]
pub fn set_canary_skip_cbw_flush(on: bool) {
    CANARY_SKIP_CBW_FLUSH.with(|c| c.set(on));
}

/// What to do when copying old data for a source write fails after bounded retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyErrorPolicy {
    /// Fail the source write; the session stays intact. Default.
    #[default]
    FailWrite,
    /// Terminate the session (reason `CopyFailed`) and let the source write proceed.
    TerminateSession,
}

/// What to do with incomplete sessions when a table is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Resume every session whose durable state verifies against its volumes. Default.
    #[default]
    Resume,
    /// Terminate every active session (the source patent's rule).
    TerminateIncomplete,
}

/// Engine options.
#[derive(Debug, Clone, Default)]
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
}

/// Finds a session's volumes again when a table is opened.
pub trait VolumeResolver: Send + Sync {
    /// The volume the locator names, or `None` when it is gone.
    ///
    /// # Errors
    /// An I/O error other than "not found".
    fn resolve(&self, r: &VolumeRef) -> Result<Option<Arc<dyn Volume>>>;
}

/// Resolves locators as file paths (see [`open_file_volume`] for the backend).
#[derive(Debug, Clone, Default)]
pub struct FileResolver {
    /// Options for opening.
    pub options: FileVolumeOptions,
    /// File backend (see [`EngineOptions::backend`]).
    pub backend: Backend,
    /// The backend of the first volume this resolver opened.
    pub opened: std::sync::OnceLock<&'static str>,
}

impl VolumeResolver for FileResolver {
    fn resolve(&self, r: &VolumeRef) -> Result<Option<Arc<dyn Volume>>> {
        if r.locator.starts_with("mem:") || !Path::new(&r.locator).exists() {
            return Ok(None);
        }
        let (v, name) = open_file_volume(Path::new(&r.locator), &self.options, self.backend)?;
        let _ = self.opened.set(name);
        Ok(Some(v))
    }
}

/// Resolves locators from a fixed map (in-memory volumes, tests, harnesses).
#[derive(Debug, Default, Clone)]
pub struct MapResolver {
    /// Locator -> volume.
    pub volumes: HashMap<String, Arc<dyn Volume>>,
}

impl MapResolver {
    /// Add a volume under its own locator.
    pub fn add(&mut self, v: Arc<dyn Volume>) {
        self.volumes.insert(v.info().locator, v);
    }
}

impl VolumeResolver for MapResolver {
    fn resolve(&self, r: &VolumeRef) -> Result<Option<Arc<dyn Volume>>> {
        Ok(self.volumes.get(&r.locator).cloned())
    }
}

/// An attached volume with its durability group and write gate.
#[derive(Debug)]
pub(crate) struct VolumeHandle {
    pub(crate) vol: Arc<dyn Volume>,
    pub(crate) info: VolumeInfo,
    sync: GroupSync,
    /// Writers hold it shared; establishing a session on this volume holds it exclusively, so
    /// T0 falls between writes. Sharded: a writer locks only its thread's shard, so the writers
    /// of a volume do not all update one shared lock word (establish locks every shard).
    gate: crossbeam::sync::ShardedLock<()>,
    /// Set when an `Establish` with this volume as source failed to commit: the session may
    /// still be durable, so writes are refused until the table is reopened and recovered.
    fenced: std::sync::atomic::AtomicBool,
}

impl VolumeHandle {
    fn name(&self) -> String {
        self.info.locator.clone()
    }

    fn flush(&self) -> Result<()> {
        self.sync.sync(&self.name(), || self.vol.flush())
    }

    fn check_live(&self) -> Result<()> {
        if self.sync.is_failed() || self.fenced.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Poisoned {
                target: self.name(),
            });
        }
        Ok(())
    }

    #[inline(always)]
    fn read_retry(&self, buf: &mut [u8], off: u64) -> Result<()> {
        retry(|| self.vol.read_at(buf, off))
    }

    #[inline(always)]
    fn write_retry(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_live()?;
        retry(|| self.vol.write_at(buf, off))
    }
}

/// An open session image (from [`Engine::image`]). Holds the session and its volume handles,
/// so a read costs no lookup; when a volume was attached or replaced since it was opened (a
/// reset), a read resolves the volumes again first.
pub struct Image<'e> {
    engine: &'e Engine,
    session: Arc<Session>,
    src: Arc<VolumeHandle>,
    tgt: Arc<VolumeHandle>,
    epoch: u64,
}

impl std::fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("session", &self.session.id())
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Image<'_> {
    /// The session.
    #[must_use]
    pub fn id(&self) -> SessionId {
        self.session.id()
    }

    /// Read the image at `offset`, exactly as [`Engine::read_image`] does.
    ///
    /// # Errors
    /// As [`Engine::read_image`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let e = self.engine;
        if e.volumes_epoch.load(std::sync::atomic::Ordering::Acquire) != self.epoch {
            return e.image(self.session.id())?.read_now(offset, buf);
        }
        self.read_now(offset, buf)
    }

    /// Read with the handles resolved when this image was opened: lock-free first, then, if a
    /// copy-before-write raced the read, again under the grain locks.
    #[inline(always)]
    fn read_now(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let e = self.engine;
        let s = &self.session;
        let state = s.state();
        if !matches!(state, SessionState::Active | SessionState::Completed) {
            return Err(not_usable(s));
        }
        check_range(offset, buf.len() as u64, s.map.image_len(), "session image")?;
        let completed = state == SessionState::Completed;
        if !completed && self.src.info.id != s.desc.source.id {
            // The source was not attached when the image was opened.
            return Err(Error::UnknownVolume(s.desc.source.locator.clone()));
        }
        if let Some(p) = s.map.within_one_grain(offset, buf.len() as u64) {
            // A read within one grain (most small reads): the general path below, specialised.
            if s.extent_end(p.extent).is_none() {
                let g = p.image_offset >> s.map.shift();
                if completed || s.bits().get(g) {
                    return self.tgt.read_retry(buf, p.target_offset);
                }
                self.src.read_retry(buf, p.source_offset)?;
                // As in `Engine::read_piece`: the source bytes were read before the bit, the
                // extent end and the state are loaded again.
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                if !s.bits().get(g)
                    && s.extent_end(p.extent).is_none()
                    && s.state() == SessionState::Active
                {
                    return Ok(());
                }
            }
        } else if e.read_pieces(s, &self.src, &self.tgt, completed, offset, buf, false)? {
            return Ok(());
        }
        e.read_pieces(s, &self.src, &self.tgt, completed, offset, buf, true)
            .map(|_| ())
    }
}

thread_local! {
    /// The background copy's data buffer, one per thread (see [`Engine::copy_data`]).
    static COPY_BUF: std::cell::RefCell<crate::volume::AlignedBuf> =
        std::cell::RefCell::new(crate::volume::AlignedBuf::new(0));
}

/// Issue a write to a volume whose covering sessions were checked (bits set, or extents or
/// sessions ended). The release fence orders those checks, and the bit stores of a
/// copy-before-write, before the write's stores (the writer half of a sequence lock); it pairs
/// with the acquire fence in `Engine::read_piece`, whose lock-free reads of uncopied source
/// grains re-check the bits after reading.
#[inline(always)]
fn release_write(h: &VolumeHandle, data: &[u8], offset: u64) -> Result<()> {
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    h.write_retry(data, offset)
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

/// The detail of an identity mismatch: which volume was replaced, by path.
fn replaced_message(role: &str, was: &VolumeRef, now: &VolumeInfo) -> String {
    if was.locator == now.locator {
        format!(
            "{role} {} was replaced by another file (different device and inode)",
            was.locator
        )
    } else {
        format!("{role} {} is now {}", was.locator, now.locator)
    }
}

/// What to establish.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Source volume (attached).
    pub source: VolumeId,
    /// Target volume (attached).
    pub target: VolumeId,
    /// Extents; empty means the whole source at the same offsets in the target.
    pub extents: Vec<ExtentSpec>,
    /// Grain. Default = 64 KiB.
    pub grain: GrainSize,
    /// Mode.
    pub mode: CopyMode,
}

impl SessionSpec {
    /// A whole-volume copy session with the default grain.
    #[must_use]
    pub fn whole(source: VolumeId, target: VolumeId) -> Self {
        SessionSpec {
            source,
            target,
            extents: Vec::new(),
            grain: GrainSize::DEFAULT,
            mode: CopyMode::Copy,
        }
    }
}

/// A session's status, for display and JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionStatus {
    /// Id.
    pub id: u64,
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
    /// Grains copied.
    pub grains_copied: u64,
    /// Grains in total.
    pub grains_total: u64,
    /// T0, ms since the epoch.
    pub created_unix_ms: u64,
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
    pub rolled_back: Option<(u64, u64)>,
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

/// What recovery decided for one session.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    /// Session.
    pub session: u64,
    /// Outcome.
    pub outcome: Outcome,
    /// The session was suspended before this decision (so `Resumed` means it left suspension).
    pub was_suspended: bool,
}

impl Decision {
    fn new(session: SessionId, outcome: Outcome, was_suspended: bool) -> Self {
        Decision {
            session: session.0,
            outcome,
            was_suspended,
        }
    }
}

/// Recovery outcome for a session.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Outcome {
    /// Resumed with all extents.
    Resumed,
    /// Resumed with some extents ended (index, reason).
    ResumedPartly(Vec<(u32, Reason)>),
    /// Terminated.
    Terminated(Reason),
    /// Suspended: its source or target cannot be found or opened (the reason says which).
    Suspended(Reason),
    /// Already ended (completed, withdrawn, terminated) before.
    Ended,
}

/// The engine: one activity table and the volumes its sessions use.
#[derive(Debug)]
pub struct Engine {
    table: Table,
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
    /// Serialises `refresh_active` (read the table, store the snapshot), so that a snapshot
    /// taken earlier never replaces one taken later.
    active_change: Mutex<()>,
    options: EngineOptions,
    /// Copy-before-write writes in progress (the background copier yields to them).
    cow_inflight: std::sync::atomic::AtomicUsize,
    /// The backend of the first file volume this engine opened.
    backend: std::sync::OnceLock<&'static str>,
    /// Identity (device and inode) of the table's file, when the table is a file: it is
    /// never accepted as a volume.
    table_file: Option<VolumeId>,
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
        Engine::open_path(path, options)
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
        let (table, report) = Table::open_with(storage, options.accept_rollback)?;
        let mut e = Engine::from_table(table, report, options);
        let decisions = e.reconcile_all(resolver)?;
        e.decisions = decisions;
        Ok(e)
    }

    fn from_table(table: Table, open_report: OpenReport, options: EngineOptions) -> Engine {
        let e = Engine {
            table,
            volumes: ArcSwap::from_pointee(FxHashMap::default()),
            volumes_change: Mutex::new(()),
            volumes_epoch: std::sync::atomic::AtomicU64::new(0),
            active: ArcSwap::from_pointee(Vec::new()),
            active_change: Mutex::new(()),
            options,
            cow_inflight: std::sync::atomic::AtomicUsize::new(0),
            backend: std::sync::OnceLock::new(),
            table_file: None,
            decisions: Vec::new(),
            open_report,
        };
        e.refresh_active();
        e
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
        let v: Vec<_> = self
            .table
            .sessions()
            .into_iter()
            .filter(|s| s.is_live())
            .collect();
        self.active.store(Arc::new(v));
    }

    /// Attach a volume so sessions can use it; returns its id. Attaching the same identity again
    /// replaces the handle.
    pub fn attach(&self, vol: Arc<dyn Volume>) -> VolumeId {
        let info = vol.info();
        let id = info.id;
        let h = Arc::new(VolumeHandle {
            vol,
            info,
            sync: GroupSync::default(),
            gate: crossbeam::sync::ShardedLock::new(()),
            fenced: std::sync::atomic::AtomicBool::new(false),
        });
        let change = self.volumes_change.lock();
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

    /// The file backend in use: [`BACKEND_PREAD`], [`BACKEND_PREAD_IO_URING`] or
    /// [`BACKEND_IO_URING`]. This is the backend
    /// of the first file volume the engine opened (io_uring may fall back to pread when the
    /// kernel refuses), or, before any, the one [`EngineOptions::backend`] would pick.
    #[must_use]
    pub fn backend_name(&self) -> &'static str {
        match self.backend.get() {
            Some(name) => name,
            None if uring_allowed() => self
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
        Ok(self.handle(id)?.vol.clone())
    }

    /// A session.
    ///
    /// # Errors
    /// [`Error::UnknownSession`].
    pub fn session(&self, id: SessionId) -> Result<Arc<Session>> {
        self.table.session(id).ok_or(Error::UnknownSession(id))
    }

    /// Establish a session: from the moment this returns, its image reads as the source did.
    ///
    /// # Errors
    /// [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::TargetTooSmall`],
    /// [`Error::TargetInUse`], [`Error::Overlap`], [`Error::ExtentsOverlap`],
    /// [`Error::UnknownVolume`], [`Error::NotAVolume`] (the table's own file), table errors.
    pub fn establish(&self, spec: &SessionSpec) -> Result<SessionId> {
        let src = self.handle(spec.source)?;
        let tgt = self.handle(spec.target)?;
        self.refuse_table_file(&src.info)?;
        self.refuse_table_file(&tgt.info)?;
        let g = spec.grain.bytes();
        let extents = if spec.extents.is_empty() {
            let len = src.info.size - src.info.size % g;
            if len == 0 {
                return Err(Error::OutOfRange {
                    offset: 0,
                    len: g,
                    what: "source volume",
                    size: src.info.size,
                });
            }
            vec![ExtentSpec {
                source_offset: 0,
                target_offset: 0,
                len,
            }]
        } else {
            spec.extents.clone()
        };
        self.validate(&src.info, &tgt.info, spec.grain, &extents)?;
        let id = self.table.allocate_session_id();
        let desc = SessionDesc {
            id,
            mode: spec.mode,
            grain: spec.grain,
            source: VolumeRef::from(&src.info),
            target: VolumeRef::from(&tgt.info),
            extents,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
                .unwrap_or(0),
        };
        self.table.make_room(&desc)?;
        // T0: drain writers of both volumes (in id order), make the source durable, commit.
        let (a, b) = if src.info.id <= tgt.info.id {
            (&src, &tgt)
        } else {
            (&tgt, &src)
        };
        let _ga = a
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _gb = (a.info.id != b.info.id).then(|| {
            b.gate
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        // Re-validate against sessions established while we waited.
        self.validate(&src.info, &tgt.info, spec.grain, &desc.extents)?;
        src.flush()?;
        if let Err(e) = self.table.commit(vec![Entry::Establish(desc)]) {
            // The entry may have reached the table (a failed durability point says nothing
            // either way): recovery may resume the session, so neither its source (which would
            // change without copy-before-write) nor its target (whose writes the resumed
            // session's copier would overwrite, and its image would not show) may change.
            // Refuse writes to both until the table is reopened and recovery decides.
            src.fenced.store(true, std::sync::atomic::Ordering::Release);
            tgt.fenced.store(true, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        self.refresh_active();
        Ok(id)
    }

    fn validate(
        &self,
        src: &VolumeInfo,
        tgt: &VolumeInfo,
        grain: GrainSize,
        extents: &[ExtentSpec],
    ) -> Result<()> {
        let g = grain.bytes();
        if extents.is_empty() || extents.len() > crate::limits::EXTENTS_PER_SESSION_MAX {
            return Err(Error::invalid(
                "extents",
                format!(
                    "{} extents (1 to {} allowed)",
                    extents.len(),
                    crate::limits::EXTENTS_PER_SESSION_MAX
                ),
            ));
        }
        let align = g
            .max(u64::from(src.sector_size))
            .max(u64::from(tgt.sector_size));
        for e in extents {
            for off in [e.source_offset, e.target_offset] {
                if off % align != 0 || e.len % align != 0 || e.len == 0 {
                    return Err(Error::Misaligned {
                        offset: off,
                        len: e.len,
                        align,
                    });
                }
            }
            check_range(e.source_offset, e.len, src.size, "source volume")?;
        }
        if let Some(e) = extents
            .iter()
            .find(|e| e.target_offset.saturating_add(e.len) > tgt.size)
        {
            return Err(Error::TargetTooSmall {
                target: tgt.locator.clone(),
                offset: e.target_offset,
                len: e.len,
                size: tgt.size,
            });
        }
        // Within the session: no two extents overlap on either side, and on one volume no
        // source range overlaps a target range.
        let range = |o: u64, l: u64| format!("{o}+{l}");
        for (i, a) in extents.iter().enumerate() {
            for b in &extents[i + 1..] {
                if overlaps(a.source_offset, a.len, b.source_offset, b.len) {
                    return Err(Error::ExtentsOverlap {
                        side: "source",
                        volume: src.locator.clone(),
                        first: range(a.source_offset, a.len),
                        second: range(b.source_offset, b.len),
                    });
                }
                if overlaps(a.target_offset, a.len, b.target_offset, b.len) {
                    return Err(Error::ExtentsOverlap {
                        side: "target",
                        volume: tgt.locator.clone(),
                        first: range(a.target_offset, a.len),
                        second: range(b.target_offset, b.len),
                    });
                }
            }
            if src.id == tgt.id {
                for b in extents {
                    if overlaps(a.source_offset, a.len, b.target_offset, b.len) {
                        return Err(Error::Overlap {
                            volume: src.locator.clone(),
                            offset: b.target_offset,
                            len: b.len,
                        });
                    }
                }
            }
        }
        // Against other active sessions: targets are exclusive; a range is never both a source
        // and a target.
        for s in self.active.load().iter() {
            for o in &s.desc.extents {
                for e in extents {
                    if s.desc.target.id == tgt.id
                        && overlaps(o.target_offset, o.len, e.target_offset, e.len)
                    {
                        return Err(Error::TargetInUse {
                            volume: tgt.locator.clone(),
                            offset: e.target_offset,
                            len: e.len,
                            other: s.id(),
                        });
                    }
                    if s.desc.source.id == tgt.id
                        && overlaps(o.source_offset, o.len, e.target_offset, e.len)
                    {
                        return Err(Error::Overlap {
                            volume: tgt.locator.clone(),
                            offset: e.target_offset,
                            len: e.len,
                        });
                    }
                    if s.desc.target.id == src.id
                        && overlaps(o.target_offset, o.len, e.source_offset, e.len)
                    {
                        return Err(Error::Overlap {
                            volume: src.locator.clone(),
                            offset: e.source_offset,
                            len: e.len,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// End a session at the user's request.
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`], table errors.
    pub fn withdraw(&self, id: SessionId) -> Result<()> {
        let s = self.session(id)?;
        if !s.is_live() {
            return Err(Error::NotActive {
                id,
                state: s.status().state.to_string(),
            });
        }
        self.table.commit(vec![Entry::SetState {
            session: id,
            state: SessionState::Withdrawn,
            reason: Some(Reason::new(ReasonCode::Withdrawn, "withdrawn by request")),
        }])?;
        self.refresh_active();
        Ok(())
    }

    /// Ok when the session is active; else the error a use of it gets: [`Error::Suspended`]
    /// (naming the unavailable volume) or [`Error::NotActive`].
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::Suspended`], [`Error::NotActive`].
    pub fn check_active(&self, id: SessionId) -> Result<()> {
        let s = self.session(id)?;
        if s.is_active() {
            return Ok(());
        }
        Err(not_usable(&s))
    }

    /// Convert a no-copy session to copy mode (the background copier then fills the target).
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`], table errors.
    pub fn convert_to_copy(&self, id: SessionId) -> Result<()> {
        let s = self.session(id)?;
        if !s.is_live() {
            return Err(Error::NotActive {
                id,
                state: s.status().state.to_string(),
            });
        }
        if s.status().mode == CopyMode::Copy {
            return Ok(());
        }
        self.table.commit(vec![Entry::SetMode {
            session: id,
            mode: CopyMode::Copy,
        }])
    }

    /// Terminate a session (active or suspended) with a reason.
    ///
    /// # Errors
    /// Table errors.
    pub fn terminate(&self, id: SessionId, reason: Reason) -> Result<()> {
        let s = self.session(id)?;
        if !s.is_live() {
            return Ok(());
        }
        self.table.commit(vec![Entry::SetState {
            session: id,
            state: SessionState::Terminated,
            reason: Some(reason),
        }])?;
        self.refresh_active();
        Ok(())
    }

    /// Mark a copy-mode session complete if every grain is copied. Returns true when it is
    /// (now or before) complete.
    ///
    /// # Errors
    /// Table errors.
    pub fn complete_if_done(&self, id: SessionId) -> Result<bool> {
        let s = self.session(id)?;
        let st = s.status();
        if st.state == SessionState::Completed {
            return Ok(true);
        }
        if st.state != SessionState::Active || st.mode != CopyMode::Copy {
            return Ok(false);
        }
        // Ended extents never complete; the session completes when every live extent has.
        if !live_extents_copied(&s) {
            return Ok(false);
        }
        // Every bit is durable, so every target grain is durable: the target is independent.
        self.table.commit(vec![Entry::SetState {
            session: id,
            state: SessionState::Completed,
            reason: None,
        }])?;
        self.refresh_active();
        Ok(true)
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

    /// Write `data` at `offset` of an attached volume through the engine: copy-before-write for
    /// sessions it is the source of, grain completion for sessions it is the target of.
    /// Durable only after [`Engine::flush`].
    ///
    /// # Errors
    /// [`Error::OutOfRange`], I/O and table errors (the source write is not issued when copying
    /// failed, under [`CopyErrorPolicy::FailWrite`]).
    pub fn write(&self, vol: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        // Borrowed from the loaded snapshot: no reference count shared by every writer of the
        // volume is touched (the snapshot stays alive while `vols` does).
        let vols = self.volumes.load();
        let h = vols
            .get(&vol)
            .ok_or_else(|| Error::UnknownVolume(vol.to_string()))?;
        check_range(offset, data.len() as u64, h.info.size, "volume")?;
        if data.len() as u64 > crate::limits::IO_BYTES_MAX {
            return Err(Error::invalid(
                "write",
                format!("{} bytes exceeds the per-request limit", data.len()),
            ));
        }
        let _gate = h
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let active = self.active.load();
        let mut work: Vec<(Arc<Session>, u64, u64)> = Vec::new();
        for s in active.iter() {
            let state = s.state();
            if !state.is_live() {
                continue;
            }
            // No allocation: this loop runs for every write, most of which find nothing to do.
            let len = data.len() as u64;
            let as_source = (s.desc.source.id == vol).then(|| s.map.source_pieces(offset, len));
            let as_target = (s.desc.target.id == vol).then(|| s.map.target_pieces(offset, len));
            for p in as_source
                .into_iter()
                .flatten()
                .chain(as_target.into_iter().flatten())
            {
                let (g0, g1) = s.map.grains_of(&p);
                if s.extent_live(p.extent) && !s.bits().all_set(g0, g1 - g0) {
                    if state == SessionState::Suspended {
                        // Copy-before-write needs both volumes: refuse rather than bypass it.
                        return Err(suspended_error(s));
                    }
                    work.push((s.clone(), g0, g1));
                }
            }
        }
        if work.is_empty() {
            return release_write(h, data, offset);
        }
        let _busy = InflightGuard::new(&self.cow_inflight);
        work.sort_by_key(|(s, g0, _)| (s.id(), *g0));
        // One range per session and overlapping grains: a volume that is both the source and
        // the target of one session can map a single write onto the same image grains twice,
        // and a thread must never wait for a range it already holds.
        let mut merged: Vec<(Arc<Session>, u64, u64)> = Vec::with_capacity(work.len());
        for (s, g0, g1) in work {
            match merged.last_mut() {
                Some((ms, _, m1)) if ms.id() == s.id() && g0 <= *m1 => *m1 = (*m1).max(g1),
                _ => merged.push((s, g0, g1)),
            }
        }
        let work = merged;
        let guards: Vec<_> = work
            .iter()
            .map(|(s, g0, g1)| s.locks.lock(*g0, *g1))
            .collect();
        let r = self.copy_runs(&work);
        if let Err(e) = r {
            match self.options.on_copy_error {
                CopyErrorPolicy::FailWrite => return Err(e),
                CopyErrorPolicy::TerminateSession => {
                    drop(guards);
                    for (s, _, _) in &work {
                        if !s.bits().all_set(0, s.desc.grains()) {
                            self.terminate(
                                s.id(),
                                Reason::new(ReasonCode::CopyFailed, e.to_string()),
                            )?;
                        }
                    }
                    return release_write(h, data, offset);
                }
            }
        }
        let r = release_write(h, data, offset);
        drop(guards);
        r
    }

    /// Copy the T0 bytes of every still-uncopied grain in `work` (session, grain range; locks
    /// held by the caller) to its target, make it durable, and commit the bits.
    fn copy_runs(&self, work: &[(Arc<Session>, u64, u64)]) -> Result<()> {
        // (session, first grain, end grain, source vol, source off, target vol, target off, len)
        struct Run {
            s: Arc<Session>,
            g0: u64,
            g1: u64,
            p: Piece,
        }
        let mut runs = Vec::new();
        for (s, g0, g1) in work {
            let mut g = *g0;
            while g < *g1 {
                if s.bits().get(g) {
                    g += 1;
                    continue;
                }
                let start = g;
                let (_, ext_end) = s
                    .map
                    .extent_of_grain(g)
                    .ok_or_else(|| Error::invalid("grain", "outside extents"))?;
                while g < *g1 && g < ext_end && !s.bits().get(g) {
                    g += 1;
                }
                let p = s
                    .map
                    .grain_piece(start, g)
                    .ok_or_else(|| Error::invalid("grain", "run crosses extents"))?;
                runs.push(Run {
                    s: s.clone(),
                    g0: start,
                    g1: g,
                    p,
                });
            }
        }
        if runs.is_empty() {
            return Ok(());
        }
        // One read of the old bytes serves every session that needs them: merge source ranges
        // per source volume.
        let mut reads: Vec<(VolumeId, u64, u64)> = runs
            .iter()
            .map(|r| {
                (
                    r.s.desc.source.id,
                    r.p.source_offset,
                    r.p.source_offset + r.p.len,
                )
            })
            .collect();
        reads.sort_unstable();
        let mut merged: Vec<(VolumeId, u64, u64)> = Vec::new();
        for (v, s, e) in reads {
            match merged.last_mut() {
                Some(m) if m.0 == v && s <= m.2 => m.2 = m.2.max(e),
                _ => merged.push((v, s, e)),
            }
        }
        let mut bufs = Vec::with_capacity(merged.len());
        for (v, s, e) in &merged {
            let h = self.handle(*v)?;
            // Aligned, so that O_DIRECT volumes read into it without a bounce copy.
            let mut b = crate::volume::AlignedBuf::new(
                usize::try_from(e - s).map_err(|_| Error::invalid("copy", "too large"))?,
            );
            h.read_retry(b.get_mut(), *s)?;
            bufs.push(b);
        }
        let mut targets: Vec<Arc<VolumeHandle>> = Vec::new();
        let mut entries = Vec::with_capacity(runs.len());
        for r in &runs {
            let i = merged
                .iter()
                .position(|(v, s, e)| {
                    *v == r.s.desc.source.id
                        && *s <= r.p.source_offset
                        && r.p.source_offset + r.p.len <= *e
                })
                .ok_or_else(|| Error::invalid("copy", "run not covered by a read"))?;
            let off = usize::try_from(r.p.source_offset - merged[i].1)
                .map_err(|_| Error::invalid("copy", "offset"))?;
            let len = usize::try_from(r.p.len).map_err(|_| Error::invalid("copy", "len"))?;
            let th = self.handle(r.s.desc.target.id)?;
            th.write_retry(&bufs[i].get()[off..off + len], r.p.target_offset)?;
            if !targets.iter().any(|t| t.info.id == th.info.id) {
                targets.push(th);
            }
            entries.push(Entry::SetBits {
                session: r.s.id(),
                start: r.g0,
                count: r.g1 - r.g0,
            });
        }
        for t in &targets {
            #[cfg(feature = "fault")]
            if CANARY_SKIP_CBW_FLUSH.with(std::cell::Cell::get) {
                continue;
            }
            t.flush()?;
        }
        self.table.commit(entries)
    }

    /// Read the image of a session at `offset` (image coordinates: its extents end to end).
    ///
    /// # Errors
    /// [`Error::NotActive`] for withdrawn or terminated sessions, [`Error::Suspended`] for
    /// suspended ones, [`Error::ExtentTerminated`],
    /// [`Error::OutOfRange`], I/O errors.
    pub fn read_image(&self, id: SessionId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.image(id)?.read_now(offset, buf)
    }

    /// Open a session's image for repeated reads: [`Image::read_at`] reads like
    /// [`Engine::read_image`] without looking the session and its volumes up on every call.
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`], [`Error::UnknownVolume`],
    /// [`Error::Suspended`].
    pub fn image(&self, id: SessionId) -> Result<Image<'_>> {
        let session = self.session(id)?;
        let state = session.state();
        if state == SessionState::Suspended {
            return Err(suspended_error(&session));
        }
        if !matches!(state, SessionState::Active | SessionState::Completed) {
            return Err(Error::NotActive {
                id,
                state: state.to_string(),
            });
        }
        // The epoch before the map (see `Engine::attach`).
        let epoch = self
            .volumes_epoch
            .load(std::sync::atomic::Ordering::Acquire);
        let vols = self.volumes.load();
        let get = |v: &VolumeRef| {
            vols.get(&v.id)
                .cloned()
                .ok_or_else(|| Error::UnknownVolume(v.locator.clone()))
        };
        let tgt = get(&session.desc.target)?;
        // A completed session reads only its target: its source may be gone.
        let src = get(&session.desc.source).unwrap_or_else(|_| Arc::clone(&tgt));
        drop(vols);
        Ok(Image {
            engine: self,
            session,
            src,
            tgt,
            epoch,
        })
    }

    /// Read the image range `offset..offset+buf.len()` piece by piece. Copied pieces come from
    /// the target without a lock (copied grains never go back to uncopied). For the others:
    /// without `locked`, read lock-free and return false as soon as a piece may have changed
    /// under the read; with `locked`, hold the piece's grain lock while reading it.
    #[allow(
        clippy::too_many_arguments,
        reason = "one private helper of read_image"
    )]
    fn read_pieces(
        &self,
        s: &Session,
        src: &VolumeHandle,
        tgt: &VolumeHandle,
        completed: bool,
        offset: u64,
        buf: &mut [u8],
        locked: bool,
    ) -> Result<bool> {
        let id = s.id();
        for p in s.map.image_pieces(offset, buf.len() as u64) {
            if let Some(r) = s.extent_end(p.extent) {
                return Err(Error::ExtentTerminated {
                    id,
                    extent: p.extent as u32,
                    reason: r.to_string(),
                });
            }
            let bo = usize::try_from(p.image_offset - offset)
                .map_err(|_| Error::invalid("read", "offset"))?;
            let bl = usize::try_from(p.len).map_err(|_| Error::invalid("read", "len"))?;
            let out = &mut buf[bo..bo + bl];
            let (g0, g1) = s.map.grains_of(&p);
            if completed || s.bits().all_set(g0, g1 - g0) {
                tgt.read_retry(out, p.target_offset)?;
                continue;
            }
            // A source write is released only after its grains' bits are set in memory (or,
            // for an ended extent or session, after the end is recorded), so bits still clear
            // and the extent still live after a lock-free read mean the source bytes read were
            // T0 bytes.
            if locked {
                let _g = s.locks.lock(g0, g1);
                self.read_piece(s, &p, out, src, tgt, true)?;
            } else if !self.read_piece(s, &p, out, src, tgt, false)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Read one image piece grain run by grain run (copied runs from the target, the others
    /// from the source). Without `locked`, returns false when a run read from the source may
    /// have changed under the read (its grains got copied, or the extent or session ended).
    fn read_piece(
        &self,
        s: &Session,
        p: &Piece,
        out: &mut [u8],
        src: &VolumeHandle,
        tgt: &VolumeHandle,
        locked: bool,
    ) -> Result<bool> {
        let (g0, g1) = s.map.grains_of(p);
        let gb = s.map.grain_bytes();
        let mut from_source = false;
        let mut copied_seen = 0u64;
        let mut g = g0;
        while g < g1 {
            let copied = s.bits().get(g);
            let start = g;
            while g < g1 && s.bits().get(g) == copied {
                g += 1;
            }
            let lo = (start * gb).max(p.image_offset);
            let hi = (g * gb).min(p.image_offset + p.len);
            let o = usize::try_from(lo - p.image_offset)
                .map_err(|_| Error::invalid("read", "offset"))?;
            let l = usize::try_from(hi - lo).map_err(|_| Error::invalid("read", "len"))?;
            let delta = lo - p.image_offset;
            if copied {
                copied_seen += g - start;
                tgt.read_retry(&mut out[o..o + l], p.target_offset + delta)?;
            } else {
                src.read_retry(&mut out[o..o + l], p.source_offset + delta)?;
                from_source = true;
            }
        }
        if !from_source {
            return Ok(true);
        }
        // The reader half of a sequence lock, paired with the release fence before every source
        // write in `Engine::write`: the source bytes above were read before the bits, extent
        // end and state below are loaded.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        if let Some(r) = s.extent_end(p.extent) {
            // Source writes to an ended extent skip copy-before-write (even under the lock).
            if locked {
                return Err(Error::ExtentTerminated {
                    id: s.id(),
                    extent: p.extent as u32,
                    reason: r.to_string(),
                });
            }
            return Ok(false);
        }
        let state = s.state();
        if state != SessionState::Active {
            // Withdrawn, terminated or suspended during the read: its source writes no longer
            // copy first (or are refused).
            if locked {
                return Err(not_usable(s));
            }
            return Ok(false);
        }
        // Bits only go from clear to set: as many set now as were found set above means that
        // no grain read from the source was copied meanwhile. (Under the lock no copy can
        // happen.)
        Ok(locked || s.bits().count_set(g0, g1 - g0) == copied_seen)
    }

    /// Write to a session's image (target-write semantics: the grains leave the relationship).
    ///
    /// # Errors
    /// As [`Engine::write`] and [`Engine::read_image`].
    pub fn write_image(&self, id: SessionId, offset: u64, data: &[u8]) -> Result<()> {
        let s = self.session(id)?;
        if !s.is_active() {
            return Err(not_usable(&s));
        }
        check_range(
            offset,
            data.len() as u64,
            s.map.image_len(),
            "session image",
        )?;
        for p in s.map.image_pieces(offset, data.len() as u64) {
            let o = usize::try_from(p.image_offset - offset)
                .map_err(|_| Error::invalid("write", "offset"))?;
            let l = usize::try_from(p.len).map_err(|_| Error::invalid("write", "len"))?;
            self.write(s.desc.target.id, p.target_offset, &data[o..o + l])?;
        }
        Ok(())
    }

    /// Read from an attached volume directly (no session semantics).
    ///
    /// # Errors
    /// I/O errors.
    pub fn read(&self, vol: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.handle(vol)?.read_retry(buf, offset)
    }

    /// Make completed writes to a volume durable.
    ///
    /// # Errors
    /// I/O errors; the volume latches as poisoned after a failed flush.
    pub fn flush(&self, vol: VolumeId) -> Result<()> {
        self.handle(vol)?.flush()
    }

    /// Copy up to `max_grains` uncopied grains of a session starting the search at grain
    /// `from`, make them durable and commit their bits; returns the grain after the last one
    /// examined and how many grains were copied (`None` when none is left from `from`). Grains
    /// locked by a writer are skipped (the writer copies them).
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn copy_batch(
        &self,
        id: SessionId,
        from: u64,
        max_grains: u64,
    ) -> Result<Option<(u64, u64)>> {
        match self.copy_data(id, from, max_grains)? {
            None => Ok(None),
            Some((next, None)) => Ok(Some((next, 0))),
            Some((next, Some(hold))) => {
                let (g0, g1) = hold.range();
                self.commit_copied(id, vec![hold])?;
                Ok(Some((next, g1 - g0)))
            }
        }
    }

    /// The data half of [`Engine::copy_batch`]: copy up to `max_grains` uncopied grains to the
    /// target and return them *still held*, without making them durable or recording them. The
    /// caller passes the holds to [`Engine::commit_copied`] (many at once, to share one flush
    /// and one commit). Holding the grains until their bits are durable is what keeps a source
    /// writer from changing them while a copy of them is in flight (see
    /// [`Session::try_hold`]). A hold dropped without a commit is simply copied again later.
    ///
    /// # Errors
    /// I/O errors.
    pub fn copy_data(
        &self,
        id: SessionId,
        from: u64,
        max_grains: u64,
    ) -> Result<Option<(u64, Option<GrainHold>)>> {
        let s = self.session(id)?;
        if !s.is_active() {
            return Ok(None);
        }
        let Some(g) = s.bits().next_clear(from) else {
            return Ok(None);
        };
        let (ext, ext_end) = s
            .map
            .extent_of_grain(g)
            .ok_or_else(|| Error::invalid("grain", "outside extents"))?;
        if !s.extent_live(ext) {
            return Ok(Some((ext_end, None)));
        }
        let run = s.bits().clear_run(g, max_grains.min(ext_end - g)).max(1);
        let Some(hold) = s.try_hold(g, g + run) else {
            return Ok(Some((g + 1, None)));
        };
        // Re-check under the hold: bits set before we took it shrink the run to the uncopied
        // prefix; none can be set while we hold it.
        let uncopied = s.bits().clear_run(g, run);
        if uncopied == 0 {
            return Ok(Some((g + 1, None)));
        }
        let (run, hold) = if uncopied == run {
            (run, hold)
        } else {
            // The hold must cover exactly the grains whose bits will be committed.
            drop(hold);
            match s.try_hold(g, g + uncopied) {
                Some(h) if s.bits().clear_run(g, uncopied) == uncopied => (uncopied, h),
                _ => return Ok(Some((g + 1, None))),
            }
        };
        let p = s
            .map
            .grain_piece(g, g + run)
            .ok_or_else(|| Error::invalid("grain", "run crosses extents"))?;
        let src = self.handle(s.desc.source.id)?;
        let tgt = self.handle(s.desc.target.id)?;
        let len = usize::try_from(p.len).map_err(|_| Error::invalid("copy", "len"))?;
        COPY_BUF.with(|b| {
            // One aligned buffer per copying thread, reused: no allocation per batch, and no
            // bounce copy for O_DIRECT volumes.
            let mut b = b.borrow_mut();
            b.resize(len);
            src.read_retry(b.get_mut(), p.source_offset)?;
            tgt.write_retry(b.get(), p.target_offset)
        })?;
        Ok(Some((g + run, Some(hold))))
    }

    /// Make the target of a session durable, then record the grains that
    /// [`Engine::copy_data`] copied (rule 3: bits only after their data), then release them.
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn commit_copied(&self, id: SessionId, holds: Vec<GrainHold>) -> Result<()> {
        if holds.is_empty() {
            return Ok(());
        }
        let s = self.session(id)?;
        self.handle(s.desc.target.id)?.flush()?;
        let entries = holds
            .iter()
            .map(|h| {
                let (start, end) = h.range();
                Entry::SetBits {
                    session: id,
                    start,
                    count: end - start,
                }
            })
            .collect();
        self.table.commit(entries)?;
        drop(holds);
        Ok(())
    }

    /// Run the background copy of one session to the end in the calling thread. Returns grains
    /// copied.
    ///
    /// # Errors
    /// I/O and table errors.
    pub fn copy_all(&self, id: SessionId, batch_grains: u64) -> Result<u64> {
        let mut total = 0;
        let mut from = 0;
        loop {
            match self.copy_batch(id, from, batch_grains)? {
                Some((next, n)) => {
                    total += n;
                    from = next;
                }
                None if from == 0 => break,
                // Grains of ended extents stay uncopied for good: stop once every live
                // extent is copied instead of wrapping forever.
                None if live_extents_copied(&*self.session(id)?) => break,
                None => from = 0,
            }
        }
        self.complete_if_done(id)?;
        Ok(total)
    }

    /// Reconcile every live (active or suspended) session with its volumes (open time).
    fn reconcile_all(&self, resolver: &dyn VolumeResolver) -> Result<Vec<Decision>> {
        let mut out = Vec::new();
        for s in self.table.sessions() {
            if !s.is_live() {
                // A completed session's image is its target: attach it when it is still the
                // same volume, so the image stays readable. (A target that cannot be opened
                // leaves the image unreadable; it does not keep the table from opening.)
                if s.status().state == SessionState::Completed
                    && self.volumes.load().get(&s.desc.target.id).is_none()
                {
                    if let Ok(Some(v)) = resolver.resolve(&s.desc.target) {
                        let i = v.info();
                        if i.id == s.desc.target.id && i.generation == s.desc.target.generation {
                            self.attach(v);
                        }
                    }
                }
                out.push(Decision::new(s.id(), Outcome::Ended, false));
                continue;
            }
            let was_suspended = s.state() == SessionState::Suspended;
            if self.options.restart == RestartPolicy::TerminateIncomplete {
                let r = Reason::new(
                    ReasonCode::RestartPolicy,
                    "terminate-incomplete restart policy",
                );
                self.terminate(s.id(), r.clone())?;
                out.push(Decision::new(s.id(), Outcome::Terminated(r), was_suspended));
                continue;
            }
            let src = self.find_volume(&s.desc.source, resolver);
            let tgt = self.find_volume(&s.desc.target, resolver);
            out.push(self.reconcile(&s, src, tgt, ReasonCode::IdentityMismatch)?);
        }
        self.refresh_active();
        Ok(out)
    }

    /// A session's volume: the attached one with its identity, else what the resolver finds.
    /// A resolver error makes the volume unavailable (the session is suspended), never the
    /// whole open fail.
    fn find_volume(&self, r: &VolumeRef, resolver: &dyn VolumeResolver) -> Found {
        if let Some(h) = self.volumes.load().get(&r.id) {
            return Found::Here(h.vol.clone());
        }
        match resolver.resolve(r) {
            Ok(Some(v)) => Found::Here(v),
            Ok(None) => Found::Missing,
            Err(e) => Found::Unusable(e.to_string()),
        }
    }

    /// Compare a session's extents with what its volumes are now; resume, end extents,
    /// suspend, or terminate. Attaches the volumes when the session resumes.
    ///
    /// A volume that is present but is another volume now (identity, generation, sector size)
    /// terminates the session; otherwise a volume that is missing or cannot be opened
    /// suspends it (the first of source and target that is, with why); otherwise the extents
    /// are checked against the sizes and a suspended session becomes active again.
    fn reconcile(
        &self,
        s: &Arc<Session>,
        src: Found,
        tgt: Found,
        mismatch: ReasonCode,
    ) -> Result<Decision> {
        let id = s.id();
        let was_suspended = s.state() == SessionState::Suspended;
        let check = |now: &VolumeInfo, was: &VolumeRef, role: &str| -> Option<Reason> {
            if now.id != was.id {
                Some(Reason::new(mismatch, replaced_message(role, was, now)))
            } else if now.generation != was.generation {
                Some(Reason::new(
                    ReasonCode::GenerationMismatch,
                    format!(
                        "{role} generation {} is now {}",
                        was.generation, now.generation
                    ),
                ))
            } else if now.sector_size != was.sector_size {
                Some(Reason::new(
                    ReasonCode::SectorSizeMismatch,
                    format!(
                        "{role} sector size {} is now {}",
                        was.sector_size, now.sector_size
                    ),
                ))
            } else {
                None
            }
        };
        let si = src.info();
        let ti = tgt.info();
        let changed = si
            .as_ref()
            .and_then(|i| check(i, &s.desc.source, "source"))
            .or_else(|| ti.as_ref().and_then(|i| check(i, &s.desc.target, "target")));
        if let Some(r) = changed {
            self.terminate(id, r.clone())?;
            return Ok(Decision::new(id, Outcome::Terminated(r), was_suspended));
        }
        let (src, tgt) = match (src, tgt) {
            (Found::Here(a), Found::Here(b)) => (a, b),
            (src, tgt) => return self.suspend(s, src, tgt),
        };
        let (si, ti) = (src.info(), tgt.info());
        let st = s.status();
        let mut ended = Vec::new();
        let mut entries = Vec::new();
        for (i, e) in s.desc.extents.iter().enumerate() {
            if st.ended[i].is_some() {
                continue;
            }
            let fits = e.source_offset + e.len <= si.size && e.target_offset + e.len <= ti.size;
            if !fits {
                let r = Reason::new(
                    ReasonCode::VolumeShrunk,
                    format!(
                        "extent {i} no longer fits (source {} bytes, target {} bytes)",
                        si.size, ti.size
                    ),
                );
                entries.push(Entry::EndExtent {
                    session: id,
                    extent: i as u32,
                    reason: r.clone(),
                });
                ended.push((i as u32, r));
            }
        }
        let live = st.ended.iter().filter(|x| x.is_none()).count();
        if ended.len() == live {
            let r = ended.first().map_or_else(
                || Reason::new(ReasonCode::VolumeShrunk, "no extent left"),
                |(_, r)| r.clone(),
            );
            self.terminate(id, r.clone())?;
            return Ok(Decision::new(id, Outcome::Terminated(r), was_suspended));
        }
        // Attach before a suspended session becomes active again: its first copy-before-write
        // finds both volumes.
        for v in [src, tgt] {
            if self.volumes.load().get(&v.info().id).is_none() {
                self.attach(v);
            }
        }
        if was_suspended {
            entries.push(Entry::SetState {
                session: id,
                state: SessionState::Active,
                reason: None,
            });
        }
        self.table.commit(entries)?;
        let outcome = if ended.is_empty() {
            Outcome::Resumed
        } else {
            Outcome::ResumedPartly(ended)
        };
        Ok(Decision::new(id, outcome, was_suspended))
    }

    /// Suspend a session because its source or target (the first of them that is) is missing
    /// or cannot be opened; durable before it returns. The unavailable volume is detached (a
    /// handle opened before it went away must not be used), the present one attached.
    fn suspend(&self, s: &Arc<Session>, src: Found, tgt: Found) -> Result<Decision> {
        let id = s.id();
        let was_suspended = s.state() == SessionState::Suspended;
        let (code, why, gone) = match (&src, &tgt) {
            (Found::Missing | Found::Unusable(_), _) => {
                (ReasonCode::SourceUnavailable, src.why(), &s.desc.source)
            }
            _ => (ReasonCode::TargetUnavailable, tgt.why(), &s.desc.target),
        };
        let r = Reason::new(code, why);
        self.detach(gone.id);
        for f in [src, tgt] {
            if let Found::Here(v) = f {
                if self.volumes.load().get(&v.info().id).is_none() {
                    self.attach(v);
                }
            }
        }
        if s.status().reason.as_ref() != Some(&r) || !was_suspended {
            self.table.commit(vec![Entry::SetState {
                session: id,
                state: SessionState::Suspended,
                reason: Some(r.clone()),
            }])?;
        }
        Ok(Decision::new(id, Outcome::Suspended(r), was_suspended))
    }

    /// A storage subsystem reports a reset of volume `vol` (device reset, re-attach,
    /// replacement). `now` is the volume as it is after the reset (`None`: gone). Each live
    /// session using it is compared with what it now is and resumes (a suspended one too, when
    /// its volumes are back), loses extents, is suspended (the volume is gone), or terminates.
    ///
    /// # Errors
    /// Table errors.
    pub fn reset(&self, vol: VolumeId, now: Option<Arc<dyn Volume>>) -> Result<Vec<Decision>> {
        self.reset_found(vol, now.map_or(Found::Missing, Found::Here))
    }

    /// A reset of volume `vol` after which it exists but cannot be opened (`why`: the error
    /// opening it gave): every live session using it is suspended.
    ///
    /// # Errors
    /// Table errors.
    pub fn reset_unavailable(&self, vol: VolumeId, why: &str) -> Result<Vec<Decision>> {
        self.reset_found(vol, Found::Unusable(why.to_string()))
    }

    fn reset_found(&self, vol: VolumeId, now: Found) -> Result<Vec<Decision>> {
        let mut out = Vec::new();
        if let Found::Here(v) = &now {
            if v.info().id == vol {
                // The handle is replaced so later I/O goes to the re-attached device.
                self.attach(v.clone());
            }
        }
        // Snapshot the live list first (`terminate` -> `refresh_active` replaces it).
        let active = self.active.load_full();
        for s in active.iter() {
            if s.desc.source.id != vol && s.desc.target.id != vol {
                continue;
            }
            let pick = |r: &VolumeRef| -> Found {
                if r.id == vol {
                    now.clone()
                } else {
                    self.volumes
                        .load()
                        .get(&r.id)
                        .map_or(Found::Missing, |h| Found::Here(h.vol.clone()))
                }
            };
            out.push(self.reconcile(
                s,
                pick(&s.desc.source),
                pick(&s.desc.target),
                ReasonCode::ResetMismatch,
            )?);
        }
        self.refresh_active();
        Ok(out)
    }

    /// Try to resume a suspended session: find its volumes again (attached ones, else through
    /// `resolver`, e.g. [`Engine::file_resolver`]) and reconcile it as opening the table
    /// would. The decision says whether it resumed, stays suspended (the volume is still
    /// unavailable) or terminated (the volume came back as another volume). An active session
    /// is left as it is (`Resumed`, `was_suspended` false).
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`] for an ended session, table errors.
    pub fn resume(&self, id: SessionId, resolver: &dyn VolumeResolver) -> Result<Decision> {
        let s = self.session(id)?;
        match s.state() {
            SessionState::Suspended => {}
            SessionState::Active => return Ok(Decision::new(id, Outcome::Resumed, false)),
            state => {
                return Err(Error::NotActive {
                    id,
                    state: state.to_string(),
                })
            }
        }
        let src = self.find_volume(&s.desc.source, resolver);
        let tgt = self.find_volume(&s.desc.target, resolver);
        let d = self.reconcile(&s, src, tgt, ReasonCode::IdentityMismatch);
        self.refresh_active();
        d
    }
}

/// What reconciling finds for one of a session's volumes.
#[derive(Clone)]
enum Found {
    /// Present (its identity is checked next).
    Here(Arc<dyn Volume>),
    /// Not found.
    Missing,
    /// Present but cannot be opened; the error.
    Unusable(String),
}

impl Found {
    fn info(&self) -> Option<VolumeInfo> {
        match self {
            Found::Here(v) => Some(v.info()),
            Found::Missing | Found::Unusable(_) => None,
        }
    }

    fn why(&self) -> String {
        match self {
            Found::Here(_) => String::new(),
            Found::Missing => "not found".to_string(),
            Found::Unusable(e) => e.clone(),
        }
    }
}

/// Counts a copy-before-write in progress for as long as it lives.
struct InflightGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InflightGuard<'a> {
    fn new(c: &'a std::sync::atomic::AtomicUsize) -> Self {
        c.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InflightGuard(c)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Every grain of every extent that has not ended is copied.
fn live_extents_copied(s: &Session) -> bool {
    let st = s.status();
    s.map
        .image_pieces(0, s.map.image_len())
        .filter(|p| st.ended.get(p.extent).is_some_and(Option::is_none))
        .all(|p| {
            let (g0, g1) = s.map.grains_of(&p);
            s.bits().all_set(g0, g1 - g0)
        })
}

fn overlaps(a: u64, al: u64, b: u64, bl: u64) -> bool {
    a < b.saturating_add(bl) && b < a.saturating_add(al)
}

fn session_status(s: &Session) -> SessionStatus {
    let st = s.status();
    SessionStatus {
        id: s.id().0,
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
            s.desc.grains()
        } else {
            s.copied()
        },
        grains_total: s.desc.grains(),
        created_unix_ms: s.desc.created_unix_ms,
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
        state => Error::NotActive {
            id: s.id(),
            state: state.to_string(),
        },
    }
}
