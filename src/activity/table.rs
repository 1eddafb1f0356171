//! The activity table: open/recover, group commit, checkpoints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use super::codec::Writer;
use super::format::{
    encode_block, encode_checkpoint, BlockHeader, Entry, Layout, Reason, ReasonCode, SessionDesc,
    SessionState, Superblock, TableId, Witness, BLOCK_PAYLOAD_BYTES, CHECKPOINT_AREAS,
    SUPERBLOCK_SLOTS, TABLE_WRITE_MAX_BYTES,
};
use super::storage::TableStorage;
use crate::error::Corruption;
use crate::ids::{Seq, SessionId};
use crate::limits::{COMMIT_BLOCKS_MAX, JOURNAL_BLOCK_BYTES, SESSIONS_MAX, SUPERBLOCK_BYTES};
use crate::session::Session;
use crate::{Error, Result};

/// Bytes a session described by `desc` needs in a checkpoint.
fn checkpoint_bytes(desc: &SessionDesc) -> u64 {
    let mut w = Writer::default();
    desc.encode(&mut w);
    w.buf.len() as u64 + 80 + desc.extents.len() as u64 * 300 + desc.bitmap_bytes()
}

/// Sizes of a new table.
#[derive(Debug, Clone, Copy)]
pub struct TableOptions {
    /// Bytes per journal copy. Default = [`crate::limits::JOURNAL_DEFAULT_BYTES`].
    pub journal_bytes: u64,
    /// Bytes per checkpoint area; bounds the total bitmap size of all sessions.
    /// Default = [`crate::limits::CHECKPOINT_DEFAULT_BYTES`].
    pub checkpoint_bytes: u64,
    /// Bytes of the copy log (0: none, and first writes take the checked path, whose source
    /// write waits for the target's flush too). Default = [`crate::limits::LOG_DEFAULT_BYTES`].
    pub log_bytes: u64,
}

impl Default for TableOptions {
    fn default() -> Self {
        TableOptions {
            journal_bytes: crate::limits::JOURNAL_DEFAULT_BYTES,
            checkpoint_bytes: crate::limits::CHECKPOINT_DEFAULT_BYTES,
            log_bytes: crate::limits::LOG_DEFAULT_BYTES,
        }
    }
}

impl TableOptions {
    /// The file layout these options give.
    ///
    /// # Errors
    /// [`Error::Invalid`] when a size is outside the limits.
    pub fn layout(&self) -> Result<Layout> {
        let l = Layout {
            journal_bytes: self.journal_bytes,
            checkpoint_bytes: self.checkpoint_bytes,
            log_bytes: self.log_bytes,
        };
        use crate::limits::{
            CHECKPOINT_MAX_BYTES, CHECKPOINT_MIN_BYTES, JOURNAL_MAX_BYTES, JOURNAL_MIN_BYTES,
        };
        if super::format::validate_layout(&l).is_err() {
            let journal_ok = (JOURNAL_MIN_BYTES..=JOURNAL_MAX_BYTES).contains(&l.journal_bytes)
                && l.journal_bytes.is_multiple_of(JOURNAL_BLOCK_BYTES as u64);
            let checkpoint_ok = (CHECKPOINT_MIN_BYTES..=CHECKPOINT_MAX_BYTES)
                .contains(&l.checkpoint_bytes)
                && l.checkpoint_bytes.is_multiple_of(4096);
            if journal_ok && checkpoint_ok {
                use crate::limits::{LOG_MAX_BYTES, LOG_MIN_BYTES};
                return Err(Error::invalid(
                    "copy log size",
                    format!(
                        "{} bytes: must be 0 or a multiple of 4096 from {LOG_MIN_BYTES} to                          {LOG_MAX_BYTES}",
                        l.log_bytes
                    ),
                ));
            }
            return Err(if journal_ok {
                Error::invalid(
                    "checkpoint capacity",
                    format!(
                        "{} bytes: must be a multiple of 4096 from {CHECKPOINT_MIN_BYTES} to \
                         {CHECKPOINT_MAX_BYTES}",
                        l.checkpoint_bytes
                    ),
                )
            } else {
                Error::invalid(
                    "journal size",
                    format!(
                        "{} bytes: must be a multiple of {JOURNAL_BLOCK_BYTES} from \
                         {JOURNAL_MIN_BYTES} to {JOURNAL_MAX_BYTES}",
                        l.journal_bytes
                    ),
                )
            });
        }
        Ok(l)
    }
}

/// What opening a table found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OpenReport {
    /// Generation of the superblock used.
    pub generation: u64,
    /// True when the newest superblock or checkpoint was damaged and an older one was used.
    pub fell_back: bool,
    /// Journal blocks replayed.
    pub blocks_replayed: u64,
    /// Commits replayed.
    pub commits_replayed: u64,
    /// Journal blocks read from the mirror copy because the first copy was damaged.
    pub blocks_repaired: u64,
    /// True when a damaged block was found before intact later commits (sessions terminated).
    pub journal_hole: bool,
    /// `(where the journal ends, what the witness saw)` when the table was older than its
    /// rollback witness and was opened with `accept_rollback` (its active sessions were
    /// terminated).
    pub rolled_back: Option<(Seq, Seq)>,
    /// Superblock copies that failed to verify (0, 1 or 2). A damaged newest superblock is
    /// invisible in `fell_back` (its generation is unreadable), so it is counted here.
    pub damaged_superblocks: u32,
}

/// Counters.
#[derive(Debug, Default)]
pub struct TableStats {
    /// Commits written.
    pub commits: AtomicU64,
    /// Entries written.
    pub entries: AtomicU64,
    /// Durability points (syncs) issued.
    pub syncs: AtomicU64,
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
    /// Runs of grains whose T0 bytes went to the copy log (a first write logs one per session
    /// it copies for).
    pub logged: AtomicU64,
}

#[derive(Debug)]
struct Writer_ {
    next_seq: u64,
    /// Highest generation written or seen; the next checkpoint takes the one after it.
    generation: u64,
    /// Journal blocks from this sequence on must be kept (the fallback checkpoint's start).
    retain_from: u64,
    /// Sequence of the newest checkpoint.
    ckpt_seq: u64,
    next_session: u64,
    created_unix_ms: u64,
    /// What each superblock slot is believed to hold (`None`: nothing valid).
    slots: [Option<Superblock>; SUPERBLOCK_SLOTS as usize],
    /// The slot holding the current (newest durable) superblock.
    current_slot: usize,
}

#[cfg(feature = "fault")]
thread_local! {
    static CANARY_UNVERIFIED_CHECKPOINT: std::cell::Cell<bool> =
        const { std::cell::Cell::new(false) };
}

/// Fault-harness canary: while on, checkpoints written by the calling thread use the older,
/// unsafe scheme: two areas chosen by generation parity, the older superblock always replaced,
/// nothing read back. One misdirected table write followed by a crash can then leave no valid
/// superblock/checkpoint pair; the enumerator's misdirect sweep must catch it.
#[cfg(feature = "fault")]
pub fn set_canary_unverified_checkpoint(on: bool) {
    CANARY_UNVERIFIED_CHECKPOINT.with(|c| c.set(on));
}

/// Fault harness: the copy log's bytes are not written (their records still name them), so a
/// crash that loses a target's unflushed write leaves the grain's T0 bytes nowhere. Must be
/// caught by the crash enumerator (this thread only).
#[cfg(feature = "fault")]
pub fn set_canary_skip_log_write(on: bool) {
    CANARY_SKIP_LOG_WRITE.with(|c| c.set(on));
}

#[cfg(feature = "fault")]
thread_local! {
    static CANARY_SKIP_LOG_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(feature = "fault")]
static CANARY_SKIP_LOG_WRITE_ALL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The same canary for every thread of the process (the binary turns it on at startup when
/// `TIMEZERO_CANARY_SKIP_LOG_WRITE=1`, in `fault` builds only, for the power-loss test).
#[cfg(feature = "fault")]
pub fn set_canary_skip_log_write_all_threads(on: bool) {
    CANARY_SKIP_LOG_WRITE_ALL.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn canary_skip_log_write() -> bool {
    #[cfg(feature = "fault")]
    {
        CANARY_SKIP_LOG_WRITE.with(std::cell::Cell::get)
            || CANARY_SKIP_LOG_WRITE_ALL.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "fault"))]
    {
        false
    }
}

fn canary_unverified_checkpoint() -> bool {
    #[cfg(feature = "fault")]
    {
        CANARY_UNVERIFIED_CHECKPOINT.with(std::cell::Cell::get)
    }
    #[cfg(not(feature = "fault"))]
    {
        false
    }
}

/// How often a superblock or checkpoint that does not read back as written is written again
/// before the table gives up (and is poisoned).
const READ_BACK_TRIES: usize = 3;

#[derive(Debug, Default)]
struct Queue {
    pending: Vec<Entry>,
    /// Batch that new entries join.
    open_batch: u64,
    /// Batches durable and applied.
    done_batch: u64,
    leader: bool,
    failed: Option<String>,
    /// Ranges of `pending` that must go into one journal commit ([`Table::commit_atomic`]).
    atomic: Vec<std::ops::Range<usize>>,
}

/// Proves the checked copies of one session at open (see [`Table::open_verified`]): gets
/// the session, its recorded (grain, CRC32C) pairs and where to find a grain's T0 bytes in
/// the copy log, and says what it found.
pub type CopyVerifier<'a> =
    dyn FnMut(&Arc<Session>, &[(u64, u32)], &LogBytes<'_>) -> Result<CopyProof> + 'a;

/// The T0 bytes the copy log holds for a grain of the session being proven (read from the
/// table; `None` when no record names the log for it, or the log cannot be read). The bytes
/// are only what the log holds: they vouch for nothing until they match the grain's CRC.
pub type LogBytes<'a> = dyn Fn(u64) -> Option<Vec<u8>> + 'a;

/// What proving a session's checked copies found (see [`Table::open_verified`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyProof {
    /// Every grain holds its recorded bytes on the target (copied again from the source
    /// where it did not), and the target is durable.
    Proven,
    /// A volume needed to prove them is missing or cannot be opened: the grains are kept, in
    /// every checkpoint, and proven when the session's volumes are back (the session is
    /// suspended meanwhile).
    Deferred,
    /// The session cannot go on, and why.
    Failed(Reason),
}

/// An open activity table.
#[derive(Debug)]
pub struct Table {
    storage: Arc<dyn TableStorage>,
    table_id: TableId,
    layout: Layout,
    sessions: RwLock<BTreeMap<SessionId, Arc<Session>>>,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    writer: Mutex<Writer_>,
    poisoned: AtomicBool,
    /// Opened with [`Table::open_read_only`]: nothing is ever written.
    read_only: bool,
    /// Admission: held while ended sessions are chosen and forgotten (`make_room_for`,
    /// `forget`), and by an establish from its room check until its `Establish` commit, so
    /// that two establishes never both count the last free slot.
    admission: Mutex<()>,
    /// Set once open has checked the table against its rollback witness: only then may the
    /// witness be written (a table refused as rolled back must not lower it on drop).
    witness_checked: AtomicBool,
    /// Checked copies in flight and the grains the journal names in checked records.
    checked: super::checked::Checked,
    /// Counters.
    pub stats: TableStats,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Table {
    /// Format `storage` as a new, empty table.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the storage is too small; I/O errors.
    pub fn create(storage: Arc<dyn TableStorage>, options: &TableOptions) -> Result<Table> {
        let layout = options.layout()?;
        if storage.len() < layout.file_bytes() {
            return Err(Error::invalid(
                "table storage",
                format!("{} bytes, need {}", storage.len(), layout.file_bytes()),
            ));
        }
        let mut table_id = [0u8; 16];
        fill_random(&mut table_id)?;
        let created = now_ms();
        // Generations 0 and 1 both hold the empty state (areas and slots 0 and 1), so either
        // superblock alone suffices.
        for slot in 0..SUPERBLOCK_SLOTS {
            let generation = u64::from(slot);
            let ck = encode_checkpoint(&table_id, slot, generation, 0, 1, &[]);
            storage.write(layout.checkpoint(slot), &ck)?;
            storage.sync()?;
            let sb = Superblock {
                table_id,
                generation,
                area: slot,
                layout,
                ckpt_seq: 0,
                ckpt_len: ck.len() as u64,
                ckpt_crc: crc32fast::hash(&ck),
                created_unix_ms: created,
            };
            storage.write(layout.superblock(slot), &sb.encode())?;
            storage.sync()?;
        }
        let (t, _) = Table::open(storage)?;
        Ok(t)
    }

    /// Open a table: pick the newest valid superblock and checkpoint, replay the journal, detect
    /// holes, and write a fresh checkpoint so that the next sequence never reuses one seen on disk.
    ///
    /// Volumes are not looked at here; the engine reconciles sessions against volumes next.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when no valid superblock/checkpoint pair exists or a committed entry is
    /// invalid; I/O errors.
    pub fn open(storage: Arc<dyn TableStorage>) -> Result<(Table, OpenReport)> {
        Table::open_with(storage, false)
    }

    /// [`Table::open`], then compare the table with its rollback witness
    /// ([`super::format::Witness`]): a table whose journal ends before the sequence its witness
    /// saw committed was put back from an older copy, and is refused with
    /// [`Error::RolledBack`] unless `accept_rollback`; then every active session is terminated
    /// with [`ReasonCode::TableRolledBack`] (durably, by the checkpoint open writes) and
    /// [`OpenReport::rolled_back`] says so. The witness is made durable with the table's state
    /// after open.
    ///
    /// # Errors
    /// As [`Table::open`]; [`Error::RolledBack`].
    pub fn open_with(
        storage: Arc<dyn TableStorage>,
        accept_rollback: bool,
    ) -> Result<(Table, OpenReport)> {
        Table::open_verified(storage, accept_rollback, &mut |_, _, _| {
            Ok(CopyProof::Deferred)
        })
    }

    /// [`Table::open_with`], with `verify` called for each live session whose journal
    /// records checked copies ([`Entry::CopyChecked`]), or whose checkpoint keeps grains whose
    /// proof was deferred, with those grains and their CRC32Cs, before the checkpoint open
    /// writes counts them as copied. `verify` proves each grain on the target (copying it
    /// again from the source where the target's bytes do not match; the source still holds
    /// them then) and makes the target durable ([`CopyProof::Proven`]); or finds a volume it
    /// needs missing, and the grains are kept for later ([`CopyProof::Deferred`]); or returns
    /// why the session cannot go on, and the session is terminated with that reason.
    /// [`Table::open_with`] defers every such proof (it has no volumes to look at).
    ///
    /// # Errors
    /// As [`Table::open_with`]; an error `verify` returns.
    pub fn open_verified(
        storage: Arc<dyn TableStorage>,
        accept_rollback: bool,
        verify: &mut CopyVerifier<'_>,
    ) -> Result<(Table, OpenReport)> {
        let (table, mut report) = Table::replay(storage, false)?;
        if let Some((table_seq, witness_seq)) = table.rolled_back()? {
            if !accept_rollback {
                return Err(Error::RolledBack {
                    path: table.storage.name(),
                    table_seq,
                    witness_seq,
                });
            }
            report.rolled_back = Some((table_seq, witness_seq));
            let reason = Reason::new(
                ReasonCode::TableRolledBack,
                format!(
                    "table ends at journal sequence {table_seq}, its witness saw {witness_seq}"
                ),
            );
            for s in table.sessions.read().values() {
                if s.is_active() {
                    s.apply(&Entry::SetState {
                        session: s.id(),
                        state: SessionState::Terminated,
                        reason: Some(reason.clone()),
                    })
                    .map_err(|kind| Error::Corrupt {
                        path: table.storage.name(),
                        kind,
                    })?;
                }
            }
        }
        table.witness_checked.store(true, Ordering::Release);
        for id in table.checked.sessions() {
            let Some(s) = table.session(id) else {
                table.checked.clear_session(id);
                continue;
            };
            if !s.is_live() {
                table.checked.clear_session(id);
                continue;
            }
            let grains = table.checked.to_verify(id);
            let log = |g: u64| table.log_bytes(&s, g);
            match verify(&s, &grains, &log)? {
                // Verified records stay known until no replay reads them: a write through the
                // image confirms its grains first, also on a fallback to the older checkpoint.
                // Deferred grains are proven now; the checkpoint below drops them.
                CopyProof::Proven => table.checked.clear_deferred(id),
                CopyProof::Deferred => table.checked.defer(id, &grains, &[]),
                CopyProof::Failed(reason) => {
                    s.apply(&Entry::SetState {
                        session: id,
                        state: SessionState::Terminated,
                        reason: Some(reason),
                    })
                    .map_err(|kind| Error::Corrupt {
                        path: table.storage.name(),
                        kind,
                    })?;
                    table.checked.clear_session(id);
                }
            }
        }
        {
            let mut w = table.writer.lock();
            table.checkpoint(&mut w)?;
        }
        Ok((table, report))
    }

    /// `(where the journal ends, what the witness saw)` when the table's rollback witness saw
    /// more committed than the table holds (see [`Table::open_with`]).
    ///
    /// # Errors
    /// I/O errors reading the witness.
    pub fn rolled_back(&self) -> Result<Option<(Seq, Seq)>> {
        let Some(bytes) = self.storage.read_witness()? else {
            return Ok(None);
        };
        let next_seq = self.writer.lock().next_seq;
        Ok(Witness::decode(&bytes)
            .filter(|w| w.table_id == self.table_id && w.seq > next_seq)
            .map(|w| (Seq(next_seq), Seq(w.seq))))
    }

    /// Record `next_seq` in the witness; `durable` at checkpoints and close. A witness that
    /// cannot be written only weakens rollback detection, never the table: errors are ignored
    /// (an I/O error on the table itself is what poisons it).
    fn note_witness(&self, next_seq: u64, durable: bool) {
        if self.read_only || !self.witness_checked.load(Ordering::Acquire) {
            return;
        }
        let w = Witness {
            table_id: self.table_id,
            seq: next_seq,
        };
        let _ = self.storage.write_witness(&w.encode(), durable);
    }

    /// Make the rollback witness current and durable now, and report a failure (a table that
    /// is dropped does the same and ignores failures). Nothing else is pending: every commit
    /// is durable before it returns.
    ///
    /// # Errors
    /// [`Error::Poisoned`] after an earlier failure; I/O errors writing the witness.
    pub(crate) fn close(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Poisoned {
                target: self.storage.name(),
            });
        }
        if self.read_only || !self.witness_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        let next_seq = self.writer.lock().next_seq;
        let w = Witness {
            table_id: self.table_id,
            seq: next_seq,
        };
        self.storage.write_witness(&w.encode(), true)
    }

    /// Read the committed state of a table without writing anything: the same replay as
    /// [`Table::open`] (newest valid pair, journal, holes), but no checkpoint is written, the
    /// rollback witness is neither checked nor updated, and every later commit fails with
    /// [`Error::ReadOnly`]. Safe on a table another process is writing: what it shows is some
    /// committed state (a commit in flight is not applied); a reader racing a checkpoint may
    /// get [`Error::Corrupt`] and should try again.
    ///
    /// # Errors
    /// As [`Table::open`].
    pub fn open_read_only(storage: Arc<dyn TableStorage>) -> Result<(Table, OpenReport)> {
        Table::replay(storage, true)
    }

    fn replay(storage: Arc<dyn TableStorage>, read_only: bool) -> Result<(Table, OpenReport)> {
        let r = super::replay::replay(&*storage)?;
        let table = Table {
            storage,
            table_id: r.table_id,
            layout: r.layout,
            sessions: RwLock::new(r.sessions),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            writer: Mutex::new(Writer_ {
                next_seq: r.next_seq,
                generation: r.max_generation,
                retain_from: r.base.ckpt_seq,
                ckpt_seq: r.base.ckpt_seq,
                next_session: r.next_session,
                created_unix_ms: r.newest.created_unix_ms,
                slots: r.slots,
                current_slot: r.base_slot,
            }),
            poisoned: AtomicBool::new(false),
            read_only,
            admission: Mutex::new(()),
            witness_checked: AtomicBool::new(false),
            checked: r.checked,
            stats: TableStats::default(),
        };
        table.checked.set_log_size(table.layout.log_bytes);
        Ok((table, r.report))
    }

    /// The table's identity.
    #[must_use]
    pub fn id(&self) -> TableId {
        self.table_id
    }

    /// The file layout.
    #[must_use]
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The storage's name (path).
    #[must_use]
    pub fn name(&self) -> String {
        self.storage.name()
    }

    /// All sessions, by id.
    #[must_use]
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.read().values().cloned().collect()
    }

    /// One session.
    #[must_use]
    pub fn session(&self, id: SessionId) -> Option<Arc<Session>> {
        self.sessions.read().get(&id).cloned()
    }

    /// The id the next session established on this table gets.
    #[must_use]
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.writer.lock().next_session)
    }

    /// Reserve the next session id (durable once the `Establish` entry commits).
    pub(crate) fn allocate_session_id(&self) -> SessionId {
        let mut w = self.writer.lock();
        let id = SessionId(w.next_session);
        w.next_session += 1;
        id
    }

    /// Checkpoint bytes in use and available.
    #[must_use]
    pub fn capacity(&self) -> (u64, u64) {
        let used: u64 = self
            .sessions
            .read()
            .values()
            .map(|s| checkpoint_bytes(&s.desc))
            .sum();
        (used + 64, self.layout.checkpoint_bytes)
    }

    /// The ended sessions (completed, withdrawn, terminated) in the order an establish forgets
    /// them when a new session needs room: lowest id (oldest) first. A completed incremental
    /// session still records changes for its next refresh: it is never forgotten (withdraw it
    /// first).
    #[must_use]
    pub fn forget_order(&self) -> Vec<SessionId> {
        self.sessions
            .read()
            .values()
            .filter(|s| !s.holds_volumes())
            .map(|s| s.id())
            .collect()
    }

    /// Forget the ended sessions among `ids` (one commit): they leave the table. Sessions that
    /// are live or already gone are left out; returns those forgotten. Serialised with the
    /// forgetting of [`Table::make_room`], so a session is never forgotten twice.
    ///
    /// # Errors
    /// Table errors.
    pub(crate) fn forget(&self, ids: &[SessionId]) -> Result<Vec<SessionId>> {
        let _admission = self.admission.lock();
        let ended: Vec<Arc<Session>> = {
            let sessions = self.sessions.read();
            ids.iter()
                .filter_map(|id| sessions.get(id).filter(|s| !s.holds_volumes()).cloned())
                .collect()
        };
        let _quiet: Vec<_> = ended.iter().map(|s| quiesce(s)).collect();
        self.commit(
            ended
                .iter()
                .map(|s| Entry::Forget { session: s.id() })
                .collect(),
        )?;
        Ok(ended.iter().map(|s| s.id()).collect())
    }

    /// Check that a new session fits; forget the oldest ended sessions to make room.
    ///
    /// # Errors
    /// [`Error::TableFull`].
    pub(crate) fn make_room(&self, desc: &SessionDesc) -> Result<Admission<'_>> {
        self.make_room_for(std::slice::from_ref(desc))
    }

    /// Check that new sessions (a consistency group) fit together; forget the oldest ended
    /// sessions to make room.
    ///
    /// # Errors
    /// [`Error::TableFull`].
    pub(crate) fn make_room_for(&self, descs: &[SessionDesc]) -> Result<Admission<'_>> {
        let need: u64 = descs.iter().map(checkpoint_bytes).sum();
        let admission = self.admission.lock();
        loop {
            let (used, cap) = self.capacity();
            let count = self.sessions.read().len();
            if used + need <= cap && count + descs.len() <= SESSIONS_MAX {
                return Ok(admission);
            }
            let victim = self.forget_order().first().and_then(|id| self.session(*id));
            match victim {
                Some(v) => {
                    let _quiet = quiesce(&v);
                    self.commit(vec![Entry::Forget { session: v.id() }])?;
                }
                None if count + descs.len() > SESSIONS_MAX => {
                    return Err(Error::TableFull { what: "sessions" })
                }
                None => {
                    return Err(Error::TableFull {
                        what: "checkpoint capacity (bitmaps)",
                    })
                }
            }
        }
    }

    /// Make `entries` durable and apply them. Concurrent callers share durability points: one
    /// caller at a time (the leader) writes everything queued and syncs once.
    ///
    /// # Errors
    /// [`Error::Poisoned`] after an earlier failure; I/O errors; [`Error::TableFull`].
    pub(crate) fn commit(&self, entries: Vec<Entry>) -> Result<()> {
        self.commit_inner(entries, false)
    }

    /// Bytes the largest single journal commit holds: entries committed together by
    /// [`Table::commit_atomic`] must fit in it.
    #[must_use]
    pub(crate) fn commit_payload_max() -> usize {
        COMMIT_BLOCKS_MAX * BLOCK_PAYLOAD_BYTES
    }

    /// [`Table::commit`], with every entry of `entries` in one journal commit: after a crash
    /// at any point, recovery finds all of them or none (a consistency group's `Establish`
    /// entries, or the state changes that end all of its sessions). Entries of other callers
    /// may share the durability point, never split these.
    ///
    /// # Errors
    /// As [`Table::commit`]; [`Error::Invalid`] when the entries do not fit in one commit
    /// ([`Table::commit_payload_max`] bytes).
    pub(crate) fn commit_atomic(&self, entries: Vec<Entry>) -> Result<()> {
        let bytes: usize = entries.iter().map(Entry::encoded_len).sum();
        if bytes > Self::commit_payload_max() {
            return Err(Error::invalid(
                "commit",
                format!(
                    "{} entries need {bytes} bytes in one journal commit; at most {} fit",
                    entries.len(),
                    Self::commit_payload_max()
                ),
            ));
        }
        self.commit_inner(entries, true)
    }

    fn commit_inner(&self, entries: Vec<Entry>, atomic: bool) -> Result<()> {
        match self.enqueue(entries, atomic)? {
            Some(batch) => self.commit_wait(batch),
            None => Ok(()),
        }
    }

    /// The first half of [`Table::commit`]: queue `entries` for the next journal commit and
    /// return the commit to wait for with [`Table::commit_wait`] (`None`: nothing to commit).
    /// Nothing is durable until that wait returns `Ok`; the entries are written by whichever
    /// caller leads the next commit, so a caller may queue, do other work (a first write
    /// flushes its target meanwhile), and then wait, or have another thread wait.
    ///
    /// # Errors
    /// [`Error::ReadOnly`]; [`Error::Poisoned`] after an earlier failure.
    pub(crate) fn commit_enqueue(&self, entries: Vec<Entry>) -> Result<Option<u64>> {
        self.enqueue(entries, false)
    }

    fn enqueue(&self, entries: Vec<Entry>, atomic: bool) -> Result<Option<u64>> {
        if entries.is_empty() {
            return Ok(None);
        }
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.storage.name(),
            });
        }
        // An entry after which replay would no longer verify a logged copy (a `SetBits` that
        // confirms one of its grains, its session's completion or reverse restore) waits for
        // the copy's target to be durable. Done before queueing, on the caller's thread: the
        // grains and sessions these entries concern get no new logged copy meanwhile (their
        // bits are set; a completing session has every bit set; a reverse restore holds the
        // gates after every copy settled). A failed flush fails this commit alone.
        if self.checked.needs_retire(&entries) {
            self.checked.retire()?;
        }
        let mut q = self.queue.lock();
        if let Some(f) = &q.failed {
            return Err(Error::Poisoned {
                target: format!("{} ({f})", self.storage.name()),
            });
        }
        if atomic {
            let start = q.pending.len();
            q.atomic.push(start..start + entries.len());
        }
        q.pending.extend(entries);
        Ok(Some(q.open_batch))
    }

    /// The second half of [`Table::commit`]: wait until commit `batch` (from
    /// [`Table::commit_enqueue`]) is durable, leading it (writing everything queued and
    /// syncing once) when no other caller is.
    ///
    /// # Errors
    /// As [`Table::commit`].
    pub(crate) fn commit_wait(&self, batch: u64) -> Result<()> {
        let mut q = self.queue.lock();
        loop {
            if q.done_batch > batch {
                return Ok(());
            }
            if let Some(f) = &q.failed {
                return Err(Error::Poisoned {
                    target: format!("{} ({f})", self.storage.name()),
                });
            }
            if !q.leader {
                q.leader = true;
                let pending = std::mem::take(&mut q.pending);
                let atomic = std::mem::take(&mut q.atomic);
                let id = q.open_batch;
                q.open_batch += 1;
                drop(q);
                let r = self.write_batch(&pending, &atomic);
                q = self.queue.lock();
                q.leader = false;
                match r {
                    Ok(()) => q.done_batch = id + 1,
                    Err(e) => {
                        q.failed = Some(e.to_string());
                        self.poisoned.store(true, Ordering::Release);
                        self.queue_cv.notify_all();
                        return Err(e);
                    }
                }
                self.queue_cv.notify_all();
            } else {
                self.queue_cv.wait(&mut q);
            }
        }
    }

    /// Count a checked copy of grains `start..start+count` of `session` in flight: its
    /// target bytes are written, and `flush` makes them durable. Call before committing its
    /// [`Entry::CopyChecked`] entries; end it with [`Table::settle_checked`].
    pub(crate) fn begin_checked(
        &self,
        session: SessionId,
        start: u64,
        count: u64,
        flush: super::checked::FlushFn,
    ) -> u64 {
        self.checked.begin(session, start, count, flush)
    }

    /// End the checked copies `tickets` (from [`Table::begin_checked`]). When `committed`
    /// (their records are durable) and `flushed` (so are their targets), their grains' bits
    /// are set in memory now: from here other writers may overwrite those grains on the
    /// source. When the records are durable but the targets' flush failed, the grains stay
    /// uncopied in memory and a checkpoint makes the durable state say so too (so that nothing
    /// later, such as a reverse restore's map, takes them as copied from the journal).
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a range does not fit its session; the checkpoint's errors
    /// (the table is then poisoned: its durable state and memory differ).
    pub(crate) fn settle_checked(
        &self,
        tickets: &[u64],
        runs: &[(SessionId, u64, u64)],
        committed: bool,
        flushed: bool,
    ) -> Result<()> {
        let copied = committed && flushed;
        let r = self.settle_inner(tickets, runs, copied);
        if committed && !flushed && !self.is_poisoned() {
            let mut w = self.writer.lock();
            if let Err(e) = self.checkpoint(&mut w) {
                let mut q = self.queue.lock();
                q.failed.get_or_insert_with(|| e.to_string());
                self.poisoned.store(true, Ordering::Release);
                return Err(e);
            }
        }
        r
    }

    fn settle_inner(
        &self,
        tickets: &[u64],
        runs: &[(SessionId, u64, u64)],
        copied: bool,
    ) -> Result<()> {
        let mut r = Ok(());
        self.checked.end(tickets, || {
            if !copied {
                return;
            }
            let sessions = self.sessions.read();
            for (id, start, count) in runs {
                if let Some(s) = sessions.get(id) {
                    if let Err(kind) = s.apply(&Entry::SetBits {
                        session: *id,
                        start: *start,
                        count: *count,
                    }) {
                        r = Err(Error::Corrupt {
                            path: self.storage.name(),
                            kind,
                        });
                    }
                }
            }
        });
        r
    }

    /// Write a checkpoint when the journal a replay would read names grains in checked
    /// records. The caller has flushed every volume (a clean close): the next open then has
    /// nothing to verify, and a target missing at that open suspends its sessions instead of
    /// ending them.
    ///
    /// # Errors
    /// [`Error::Poisoned`]; the checkpoint's errors.
    pub(crate) fn checkpoint_if_checked(&self) -> Result<()> {
        if self.read_only || !self.checked.any_in_journal() {
            return Ok(());
        }
        if self.is_poisoned() {
            return Err(Error::Poisoned {
                target: self.storage.name(),
            });
        }
        let mut w = self.writer.lock();
        self.checkpoint(&mut w)?;
        // The journal before this checkpoint is read only on a fallback to the older pair,
        // whose replay verifies those records again against targets made durable above.
        self.checked.prune_before(w.next_seq);
        Ok(())
    }

    /// The grains of `session` (grain, CRC32C) whose checked copies wait for its volumes to
    /// be proven (see [`CopyProof::Deferred`]).
    pub(crate) fn unverified_of(&self, session: SessionId) -> Vec<(u64, u32)> {
        self.checked.deferred_of(session)
    }

    /// Whether a grain in `g0..g1` of `session` waits for its volumes to be proven.
    pub(crate) fn unverified_in(&self, session: SessionId, g0: u64, g1: u64) -> bool {
        self.checked.deferred_in(session, g0, g1)
    }

    /// Whether the journal names any grain in a checked record (one atomic load).
    #[must_use]
    pub(crate) fn checked_any(&self) -> bool {
        self.checked.any_in_journal()
    }

    /// Runs of grains in `g0..g1` of `session` that the journal names in a checked record: a
    /// write that changes their bytes on the target commits a `SetBits` for them first.
    #[must_use]
    pub(crate) fn checked_in(&self, session: SessionId, g0: u64, g1: u64) -> Vec<(u64, u64)> {
        self.checked.in_journal(session, g0, g1)
    }

    /// Log the T0 bytes of `runs` in the copy log (see [`super::checked::Checked::log`]):
    /// their offsets in the log, for their `CopyChecked` records; `None` when the log has no
    /// room now (or none at all, or keeps a deferred grain's bytes): the caller takes the
    /// checked path. The bytes are written, not synced: the commit of the records makes them
    /// durable with the records (they are written before the records are queued).
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::Poisoned`]; I/O errors writing the log.
    pub(crate) fn log_copies(
        &self,
        runs: &[super::checked::LogRun<'_>],
        flush: &super::checked::FlushFn,
    ) -> Result<Option<Vec<u64>>> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.storage.name(),
            });
        }
        if self.is_poisoned() {
            return Err(Error::Poisoned {
                target: self.storage.name(),
            });
        }
        let base = self.layout.log();
        let r = self.checked.log(runs, flush, |places| {
            if canary_skip_log_write() {
                return Ok(());
            }
            for (r, &off) in runs.iter().zip(places) {
                for (k, piece) in r.bytes.chunks(TABLE_WRITE_MAX_BYTES).enumerate() {
                    self.storage
                        .write(base + off + (k * TABLE_WRITE_MAX_BYTES) as u64, piece)?;
                }
            }
            Ok(())
        })?;
        if r.is_some() {
            self.stats
                .logged
                .fetch_add(runs.len() as u64, Ordering::Relaxed);
        }
        Ok(r)
    }

    /// Whether the copy log is more than half full with no retire running: the caller starts
    /// [`Table::retire_log`] (on another thread), and it counts as running from here.
    pub(crate) fn log_retire_due(&self) -> bool {
        self.checked.retire_due()
    }

    /// Make the targets of every logged copy so far durable and give their log space back.
    ///
    /// # Errors
    /// A target's flush error.
    pub(crate) fn retire_log(&self) -> Result<()> {
        self.checked.retire()
    }

    /// Every (grain, CRC) of `session` that recovery would prove now: its deferred grains and
    /// those its checked records in the journal name.
    pub(crate) fn recorded_of(&self, session: SessionId) -> Vec<(u64, u32)> {
        self.checked.to_verify(session)
    }

    /// Forget the logged copies of `session` still waiting for a retire: their grains were
    /// just proven on its target, which was flushed (a reset).
    pub(crate) fn forget_unretired(&self, session: SessionId) {
        self.checked.forget_unretired(session);
    }

    /// The T0 bytes the copy log holds for `grain` of `s`, when a record (in the journal, or a
    /// deferred one) names them; `None` otherwise or when they cannot be read. What the log
    /// holds: match them against the grain's CRC before trusting them.
    #[must_use]
    pub fn log_bytes(&self, s: &Session, grain: u64) -> Option<Vec<u8>> {
        let off = self.checked.log_of(s.id(), grain)?;
        let len = s.desc.grain.bytes();
        if off.checked_add(len)? > self.layout.log_bytes {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        self.storage.read(self.layout.log() + off, &mut buf).ok()?;
        Some(buf)
    }

    /// True after a failed durability point.
    #[must_use]
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Every entry names a session that exists (or that the batch establishes), and no
    /// establish reuses an id.
    fn validate_batch(&self, batch: &[Entry]) -> Result<()> {
        let sessions = self.sessions.read();
        for e in batch {
            match e {
                Entry::Establish(d) => {
                    if sessions.contains_key(&d.id) {
                        return Err(Error::invalid(
                            "establish",
                            format!("session {} exists", d.id),
                        ));
                    }
                }
                Entry::SetBits { session, .. }
                | Entry::CopyChecked { session, .. }
                | Entry::SetState { session, .. }
                | Entry::SetMode { session, .. }
                | Entry::EndExtent { session, .. }
                | Entry::SetChanged { session, .. }
                | Entry::Refresh { session, .. }
                | Entry::Reverse { session }
                | Entry::Restored { session, .. }
                | Entry::Forget { session } => {
                    if !sessions.contains_key(session)
                        && !batch
                            .iter()
                            .any(|x| matches!(x, Entry::Establish(d) if d.id == *session))
                    {
                        return Err(Error::UnknownSession(*session));
                    }
                }
            }
        }
        Ok(())
    }

    /// Write `batch` as journal commits, sync once, apply. `atomic` lists ranges of the batch
    /// that each go into one commit whole.
    fn write_batch(&self, batch: &[Entry], atomic: &[std::ops::Range<usize>]) -> Result<()> {
        let mut w = self.writer.lock();
        // Validate before writing: a bad entry must never reach the disk.
        self.validate_batch(batch)?;
        // Entries that need the logged copies retired were held back until they were
        // (`Table::enqueue`); a copy logged since cannot concern them (see there), except
        // through a retire that failed, whose grains are deferred proofs now.
        let chunks = encode_commits(batch, atomic)?;
        let n = self.layout.journal_blocks();
        for chunk in &chunks {
            let blocks = chunk.len().div_ceil(BLOCK_PAYLOAD_BYTES).max(1) as u64;
            // Never overwrite a block the older checkpoint still needs.
            for _ in 0..2 {
                if w.next_seq + blocks > w.retain_from + n {
                    self.checkpoint(&mut w)?;
                }
            }
            if w.next_seq + blocks > w.retain_from + n {
                return Err(Error::TableFull { what: "journal" });
            }
            let commit_seq = w.next_seq;
            for (i, part) in chunk.chunks(BLOCK_PAYLOAD_BYTES).enumerate() {
                let h = BlockHeader {
                    seq: commit_seq + i as u64,
                    commit_seq,
                    block_count: u16::try_from(blocks).unwrap_or(u16::MAX),
                    block_index: u16::try_from(i).unwrap_or(u16::MAX),
                    payload_len: u16::try_from(part.len()).unwrap_or(u16::MAX),
                };
                let b = encode_block(&self.table_id, &h, part);
                self.storage.write(self.layout.block(0, h.seq), &b)?;
                self.storage.write(self.layout.block(1, h.seq), &b)?;
            }
            w.next_seq += blocks;
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.storage.sync()?;
        self.note_witness(w.next_seq, false);
        self.stats
            .commits
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
        self.stats
            .entries
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        // Durable: now apply. A logged copy's record is noted before its bits are set: a write
        // through the image that finds the grain copied must find the record to confirm too.
        let grain_of = |id: SessionId| {
            self.sessions
                .read()
                .get(&id)
                .filter(|s| s.is_live())
                .map(|s| s.desc.grain.bytes())
        };
        for e in batch {
            if matches!(e, Entry::CopyChecked { log: Some(_), .. }) {
                self.checked.note(e, w.next_seq.saturating_sub(1), grain_of);
            }
        }
        {
            let mut sessions = self.sessions.write();
            let mut bb = 0u64;
            let seq = w.next_seq.saturating_sub(1);
            for e in batch {
                // A checked copy's bits are set by its writer once the target's flush is done
                // too (`Table::settle_checked`); here its grains only enter the journal's
                // record.
                // A logged copy's bytes are durable in the log with this commit: its bits are
                // set now.
                if !matches!(e, Entry::CopyChecked { log: None, .. }) {
                    apply(&mut sessions, &mut w.next_session, &mut bb, u64::MAX, e).map_err(
                        |kind| Error::Corrupt {
                            path: self.storage.name(),
                            kind,
                        },
                    )?;
                }
            }
            drop(sessions);
            // Lock order: the checked copies' lock, then the sessions' (as settling and
            // checkpoints take them); never the other way round.
            for e in batch {
                if !matches!(e, Entry::CopyChecked { log: Some(_), .. }) {
                    self.checked.note(e, seq, grain_of);
                }
            }
        }
        if w.next_seq - w.ckpt_seq > n / 2 {
            self.checkpoint(&mut w)?;
        }
        Ok(())
    }

    /// Write a checkpoint of the applied (durable) state and switch superblocks.
    ///
    /// Safe against one misdirected table write (anywhere in the file) followed by a crash at
    /// any point: the new checkpoint goes to the area neither superblock names and is read back
    /// before any superblock names it; the new superblock replaces the older pair, or the pair
    /// that no longer reads back (so the other one, with the journal kept since its checkpoint,
    /// stays valid throughout); and it is read back too. When the pair kept as the fallback
    /// does not verify, a second checkpoint follows so that two valid pairs exist again.
    fn checkpoint(&self, w: &mut Writer_) -> Result<()> {
        for _ in 0..2 {
            if self.checkpoint_once(w)? {
                break;
            }
        }
        Ok(())
    }

    /// One checkpoint and superblock switch; returns whether the pair kept as the fallback
    /// verified.
    fn checkpoint_once(&self, w: &mut Writer_) -> Result<bool> {
        let generation = w.generation + 1;
        let named = |a: u32| w.slots.iter().flatten().any(|s| s.area == a);
        let area = (0..u64::from(CHECKPOINT_AREAS))
            .map(|i| u32::try_from((generation + i) % u64::from(CHECKPOINT_AREAS)).unwrap_or(0))
            .find(|a| !named(*a))
            .unwrap_or(0);
        let canary = canary_unverified_checkpoint();
        let area = if canary {
            u32::from(generation % 2 == 1)
        } else {
            area
        };
        // Bits of checked copies still in flight count as set once their targets are flushed
        // (the record that names them may be behind this checkpoint's sequence).
        let images: Vec<_> = self
            .checked
            .for_checkpoint(|inflight, deferred, deferred_log| {
                let sessions = self.sessions.read();
                sessions
                    .values()
                    .map(|s| {
                        let mut img = s.image();
                        if img.state.is_live() {
                            img.unverified = deferred
                                .range((s.id(), 0)..=(s.id(), u64::MAX))
                                .map(|(&(_, g), &crc)| (g, crc))
                                .collect();
                            img.unverified_log = deferred_log
                                .range((s.id(), 0)..=(s.id(), u64::MAX))
                                .map(|(&(_, g), &off)| (g, off))
                                .collect();
                        }
                        for (id, start, count) in inflight {
                            if *id != s.id() || img.bitmap.is_empty() {
                                continue;
                            }
                            for g in *start..start.saturating_add(*count) {
                                if let Some(b) = usize::try_from(g / 8)
                                    .ok()
                                    .and_then(|i| img.bitmap.get_mut(i))
                                {
                                    *b |= 1 << (g % 8);
                                }
                            }
                        }
                        img
                    })
                    .collect()
            })?;
        let ck = encode_checkpoint(
            &self.table_id,
            area,
            generation,
            w.next_seq,
            w.next_session,
            &images,
        );
        if ck.len() as u64 > self.layout.checkpoint_bytes {
            return Err(Error::TableFull {
                what: "checkpoint area",
            });
        }
        self.write_verified(self.layout.checkpoint(area), &ck, "checkpoint", canary)?;
        // Which pairs still verify on the medium: a misdirected write may have hit one.
        let mut valid = [false; SUPERBLOCK_SLOTS as usize];
        for (slot, v) in valid.iter_mut().enumerate() {
            if let Some(sb) = w.slots[slot] {
                *v = canary || self.pair_verifies(slot, &sb)?;
            }
        }
        let current = w.current_slot;
        let other = 1 - current;
        let slot = if valid[current] { other } else { current };
        let kept = 1 - slot;
        let sb = Superblock {
            table_id: self.table_id,
            generation,
            area,
            layout: self.layout,
            ckpt_seq: w.next_seq,
            ckpt_len: ck.len() as u64,
            ckpt_crc: crc32fast::hash(&ck),
            created_unix_ms: w.created_unix_ms,
        };
        let slot_u32 = u32::try_from(slot).unwrap_or(0);
        self.write_verified(
            self.layout.superblock(slot_u32),
            &sb.encode(),
            "superblock",
            canary,
        )?;
        w.slots[slot] = Some(sb);
        w.current_slot = slot;
        w.retain_from = match w.slots[kept] {
            Some(k) if valid[kept] => k.ckpt_seq.max(w.retain_from),
            _ => w.next_seq,
        };
        w.ckpt_seq = w.next_seq;
        w.generation = generation;
        self.checked.prune_before(w.retain_from);
        self.note_witness(w.next_seq, true);
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(valid[kept])
    }

    /// Write `data` at `offset`, make it durable and read it back; write again while it does
    /// not read back as written (a misdirected write), up to [`READ_BACK_TRIES`] times.
    /// `trust` skips the read-back (the fault harness's canary only).
    fn write_verified(&self, offset: u64, data: &[u8], what: &str, trust: bool) -> Result<()> {
        let mut back = vec![0u8; data.len()];
        for _ in 0..READ_BACK_TRIES {
            for (i, piece) in data.chunks(TABLE_WRITE_MAX_BYTES).enumerate() {
                self.storage
                    .write(offset + (i * TABLE_WRITE_MAX_BYTES) as u64, piece)?;
            }
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            self.storage.sync()?;
            if trust {
                return Ok(());
            }
            self.storage.read_back(offset, &mut back)?;
            if back == data {
                return Ok(());
            }
        }
        Err(Error::io(
            "read back",
            self.storage.name(),
            offset,
            std::io::Error::other(format!(
                "{what} did not read back as written after {READ_BACK_TRIES} writes"
            )),
        ))
    }

    /// Whether `slot` still holds `sb` and the checkpoint it names still matches its CRC.
    fn pair_verifies(&self, slot: usize, sb: &Superblock) -> Result<bool> {
        let mut b = vec![0u8; SUPERBLOCK_BYTES];
        let slot_u32 = u32::try_from(slot).unwrap_or(0);
        self.storage
            .read_back(self.layout.superblock(slot_u32), &mut b)?;
        if b != sb.encode() {
            return Ok(false);
        }
        let Ok(len) = usize::try_from(sb.ckpt_len) else {
            return Ok(false);
        };
        let mut ck = vec![0u8; len];
        self.storage
            .read_back(self.layout.checkpoint(sb.area), &mut ck)?;
        Ok(crc32fast::hash(&ck) == sb.ckpt_crc)
    }
}

impl Drop for Table {
    /// Makes the rollback witness durable (a table closed cleanly leaves it current).
    fn drop(&mut self) {
        if !self.is_poisoned() {
            let next_seq = self.writer.lock().next_seq;
            self.note_witness(next_seq, true);
        }
    }
}

/// Apply one durable entry to the in-memory state. Shared by replay and the commit leader.
pub(super) fn apply(
    sessions: &mut BTreeMap<SessionId, Arc<Session>>,
    next_session: &mut u64,
    bitmap_bytes: &mut u64,
    bitmap_limit: u64,
    e: &Entry,
) -> Result<(), Corruption> {
    match e {
        Entry::Establish(d) => {
            *bitmap_bytes = bitmap_bytes.saturating_add(d.bitmap_bytes());
            if *bitmap_bytes > bitmap_limit
                || sessions.len() >= SESSIONS_MAX
                || sessions.contains_key(&d.id)
            {
                return Err(Corruption::Field {
                    what: "journal entry",
                    field: "establish",
                    value: d.id.0,
                });
            }
            *next_session = (*next_session).max(d.id.0 + 1);
            sessions.insert(d.id, Arc::new(Session::new(d.clone())));
        }
        Entry::Forget { session } => {
            sessions.remove(session);
        }
        Entry::SetBits { session, .. }
        | Entry::CopyChecked { session, .. }
        | Entry::SetState { session, .. }
        | Entry::SetMode { session, .. }
        | Entry::EndExtent { session, .. }
        | Entry::SetChanged { session, .. }
        | Entry::Refresh { session, .. }
        | Entry::Reverse { session }
        | Entry::Restored { session, .. } => {
            let s = sessions.get(session).ok_or(Corruption::Field {
                what: "journal entry",
                field: "session",
                value: session.0,
            })?;
            s.apply(e)?;
        }
    }
    Ok(())
}

/// Fill `buf` from the kernel's random source (`getrandom`, waiting for it to be seeded).
fn fill_random(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::rand::getrandom(&mut buf[done..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(Error::io(
                    "getrandom",
                    "table id",
                    0,
                    std::io::Error::from_raw_os_error(e.raw_os_error()),
                ))
            }
        }
    }
    Ok(())
}

/// Encode a batch into commit payloads, split at entry boundaries where one commit would be
/// too large, never inside one of the `atomic` ranges (each goes into one commit whole).
fn encode_commits(batch: &[Entry], atomic: &[std::ops::Range<usize>]) -> Result<Vec<Vec<u8>>> {
    let max_payload = COMMIT_BLOCKS_MAX * BLOCK_PAYLOAD_BYTES;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut cur = Writer::default();
    let mut i = 0;
    while i < batch.len() {
        let unit = atomic
            .iter()
            .find(|r| r.start == i && r.end > i)
            .map_or(i..i + 1, Clone::clone);
        i = unit.end.min(batch.len()).max(unit.start + 1);
        let mut ew = Writer::default();
        for e in &batch[unit.start..i] {
            e.encode(&mut ew);
        }
        if ew.buf.len() > max_payload {
            return Err(Error::invalid(
                "journal entry",
                format!("{} bytes exceeds {max_payload}", ew.buf.len()),
            ));
        }
        if cur.buf.len() + ew.buf.len() > max_payload {
            chunks.push(std::mem::take(&mut cur.buf));
        }
        cur.bytes(&ew.buf);
    }
    if !cur.buf.is_empty() {
        chunks.push(cur.buf);
    }
    Ok(chunks)
}

/// Room for a new session, held by its establish until the `Establish` entry is committed (see
/// `Table::make_room_for`): no other establish counts the same free slot meanwhile.
pub(crate) type Admission<'a> = parking_lot::MutexGuard<'a, ()>;

/// Wait until no copy, copy-before-write or image read works on any grain of an ended session,
/// and hold them all: a copy that took its grains before the session ended commits their bits
/// (naming the session) before the session is forgotten, never after.
fn quiesce(s: &Session) -> crate::session::RangeGuard<'_> {
    s.locks.lock(0, s.desc.grains().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::MemStorage;
    use crate::ids::{Generation, GrainSize, VolumeId};
    use crate::model::{CopyMode, ExtentSpec, SessionDesc, VolumeRef};

    fn desc(id: u64) -> SessionDesc {
        let v = |n: u8| VolumeRef {
            id: VolumeId([n; 16]),
            size: 1 << 20,
            sector_size: 512,
            generation: Generation(1),
            locator: format!("/dev/v{n}"),
        };
        let n = u8::try_from(id).unwrap_or(0);
        SessionDesc {
            id: SessionId(id),
            mode: CopyMode::NoCopy,
            grain: GrainSize::new(65536).expect("grain"),
            source: v(2 * n),
            target: v(2 * n + 1),
            extents: vec![ExtentSpec {
                source_offset: 0,
                target_offset: 0,
                len: 1 << 20,
            }],
            created_unix_ms: 1,
            group: None,
            incremental: false,
        }
    }

    /// Entries queued by two callers become durable in one commit led by whichever waits
    /// first (here another thread, as a first write's flusher does), and the other caller's
    /// wait then returns at once; nothing is applied before the wait.
    #[test]
    fn queued_entries_share_the_commit_that_any_waiter_leads() {
        let opts = TableOptions {
            journal_bytes: 128 * 1024,
            checkpoint_bytes: 256 * 1024,
            log_bytes: 0,
        };
        let bytes = opts.layout().map(|l| l.file_bytes()).unwrap_or(0);
        let storage = Arc::new(MemStorage::new("t", bytes));
        let table = Arc::new(Table::create(storage.clone(), &opts).expect("create"));
        let syncs = table.stats.syncs.load(Ordering::Relaxed);
        let a = table.commit_enqueue(vec![Entry::Establish(desc(1))]);
        let b = table.commit_enqueue(vec![Entry::Establish(desc(2))]);
        let (Ok(Some(a)), Ok(Some(b))) = (a, b) else {
            panic!("queueing failed");
        };
        assert_eq!(a, b, "both wait for the same commit");
        assert!(table.sessions().is_empty(), "applied before any commit");
        let t = Arc::clone(&table);
        std::thread::spawn(move || t.commit_wait(a))
            .join()
            .expect("the waiter panicked")
            .expect("commit");
        table.commit_wait(b).expect("the second wait");
        assert_eq!(table.stats.syncs.load(Ordering::Relaxed), syncs + 1);
        assert_eq!(table.sessions().len(), 2);
        assert!(matches!(table.commit_enqueue(Vec::new()), Ok(None)));
        // Durable: a reopen finds both sessions.
        drop(table);
        let (again, _) = Table::open(storage).expect("reopen");
        assert_eq!(again.sessions().len(), 2);
    }
}
