//! Reading a table's durable state on open: the newest superblock pair whose checkpoint
//! verifies, the sessions of that checkpoint, the journal's commits after it, and a search for
//! committed blocks past the point where the replay stopped (a hole). Only reads: the caller
//! ([`super::Table::open`]) builds the live table from what this finds.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::checked::Checked;
use super::format::{
    decode_block, decode_checkpoint, superblock_offset, Checkpoint, Entry, Layout, Reason,
    ReasonCode, SessionState, Superblock, TableId, SUPERBLOCK_SLOTS,
};
use super::storage::TableStorage;
use super::table::{apply, OpenReport};
use crate::error::Corruption;
use crate::ids::SessionId;
use crate::limits::{JOURNAL_BLOCK_BYTES, SUPERBLOCK_BYTES};
use crate::session::Session;
use crate::{Error, Result};

/// What a table's durable state holds, as replay found it.
pub(super) struct Replayed {
    pub(super) table_id: TableId,
    pub(super) layout: Layout,
    pub(super) sessions: BTreeMap<SessionId, Arc<Session>>,
    pub(super) next_session: u64,
    /// The sequence number the next commit gets (past every block seen).
    pub(super) next_seq: u64,
    /// The highest superblock generation found.
    pub(super) max_generation: u64,
    /// The slot and superblock whose checkpoint is the base.
    pub(super) base_slot: usize,
    pub(super) base: Superblock,
    /// The newest valid superblock (its creation time is the table's).
    pub(super) newest: Superblock,
    /// The valid superblock of each slot.
    pub(super) slots: [Option<Superblock>; SUPERBLOCK_SLOTS as usize],
    pub(super) report: OpenReport,
    /// Grains the replayed journal names in checked records (still to be verified).
    pub(super) checked: Checked,
}

/// Replay the table on `storage` (see the module doc).
///
/// # Errors
/// [`Error::Corrupt`] when no superblock pair verifies or a committed entry cannot be applied;
/// I/O errors.
pub(super) fn replay(storage: &dyn TableStorage) -> Result<Replayed> {
    let name = storage.name();
    let corrupt = |kind: Corruption| Error::Corrupt {
        path: name.clone(),
        kind,
    };
    if storage.len() < 2 * SUPERBLOCK_BYTES as u64 {
        return Err(corrupt(Corruption::Truncated { what: "table" }));
    }
    let (sbs, slots, first_err) = read_superblocks(storage)?;
    if sbs.len() == 2
        && (sbs[0].1.table_id != sbs[1].1.table_id || sbs[0].1.layout != sbs[1].1.layout)
    {
        return Err(corrupt(Corruption::Misplaced { what: "superblock" }));
    }
    let Some((_, newest)) = sbs.first().copied() else {
        return Err(corrupt(
            first_err.unwrap_or(Corruption::NoValidCopy { what: "superblock" }),
        ));
    };
    let layout = newest.layout;
    let mut report = OpenReport {
        damaged_superblocks: 2 - sbs.len() as u32,
        ..OpenReport::default()
    };
    let (base_slot, base, ckpt) =
        base_checkpoint(storage, &layout, &sbs, &mut report).map_err(|e| e.into_error(&corrupt))?;
    report.generation = base.generation;
    let (mut sessions, mut bitmap_bytes) = checkpoint_sessions(&ckpt, &layout).map_err(&corrupt)?;
    let mut next_session = ckpt.next_session;
    let checked = Checked::default();
    for img in &ckpt.sessions {
        checked.defer(img.desc.id, &img.unverified, &img.unverified_log);
    }
    let mut state = State {
        sessions: &mut sessions,
        next_session: &mut next_session,
        bitmap_bytes: &mut bitmap_bytes,
        report: &mut report,
        checked,
    };
    let seq = replay_journal(storage, &layout, &newest.table_id, ckpt.seq, &mut state)
        .map_err(|e| e.into_error(&corrupt))?;
    let checked = std::mem::take(&mut state.checked);
    let (max_seen, hole) = scan_for_hole(storage, &layout, &newest.table_id, seq)?;
    if hole {
        report.journal_hole = true;
        terminate_live(&sessions, seq).map_err(&corrupt)?;
    }
    for id in checked.sessions() {
        if !sessions.get(&id).is_some_and(|s| s.is_live()) {
            checked.clear_session(id);
        }
    }
    Ok(Replayed {
        table_id: newest.table_id,
        layout,
        sessions,
        next_session,
        next_seq: max_seen.map_or(seq, |m| m.saturating_add(1)).max(seq),
        max_generation: sbs.iter().map(|(_, s)| s.generation).max().unwrap_or(0),
        base_slot,
        base,
        newest,
        slots,
        report,
        checked,
    })
}

/// A failure of one replay step: an I/O error, or damage to report as [`Error::Corrupt`].
enum StepError {
    Io(Error),
    Damaged(Corruption),
}

impl StepError {
    fn into_error(self, corrupt: &impl Fn(Corruption) -> Error) -> Error {
        match self {
            StepError::Io(e) => e,
            StepError::Damaged(c) => corrupt(c),
        }
    }
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        StepError::Io(e)
    }
}

/// Superblocks in slot order kept where valid: `(slot, superblock)` newest first, the valid
/// superblock of each slot, and the first damage seen.
#[allow(
    clippy::type_complexity,
    reason = "three results of one pass, named at the call"
)]
fn read_superblocks(
    storage: &dyn TableStorage,
) -> Result<(
    Vec<(usize, Superblock)>,
    [Option<Superblock>; SUPERBLOCK_SLOTS as usize],
    Option<Corruption>,
)> {
    let mut sbs: Vec<(usize, Superblock)> = Vec::new();
    let mut slots = [None; SUPERBLOCK_SLOTS as usize];
    let mut first_err = None;
    for slot in 0..SUPERBLOCK_SLOTS {
        let mut b = vec![0u8; SUPERBLOCK_BYTES];
        storage.read(superblock_offset(slot, storage.len()), &mut b)?;
        match Superblock::decode(&b) {
            Ok(sb) if sb.layout.file_bytes() == storage.len() => {
                slots[slot as usize] = Some(sb);
                sbs.push((slot as usize, sb));
            }
            Ok(_) => first_err = first_err.or(Some(Corruption::Truncated { what: "table" })),
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    sbs.sort_by_key(|(_, s)| std::cmp::Reverse(s.generation));
    Ok((sbs, slots, first_err))
}

/// The newest superblock whose checkpoint verifies, with that checkpoint.
fn base_checkpoint(
    storage: &dyn TableStorage,
    layout: &Layout,
    sbs: &[(usize, Superblock)],
    report: &mut OpenReport,
) -> std::result::Result<(usize, Superblock, Checkpoint), StepError> {
    let mut first_err = None;
    for (i, (slot, sb)) in sbs.iter().enumerate() {
        let len = usize::try_from(sb.ckpt_len)
            .map_err(|_| StepError::Damaged(Corruption::Truncated { what: "checkpoint" }))?;
        let mut b = vec![0u8; len];
        storage.read(layout.checkpoint(sb.area), &mut b)?;
        match decode_checkpoint(&b, sb) {
            Ok(c) => {
                report.fell_back = i > 0;
                return Ok((*slot, *sb, c));
            }
            Err(e) => first_err = Some(e),
        }
    }
    Err(StepError::Damaged(
        first_err.unwrap_or(Corruption::NoValidCopy { what: "checkpoint" }),
    ))
}

/// The sessions a checkpoint holds, and the bitmap bytes they take.
fn checkpoint_sessions(
    ckpt: &Checkpoint,
    layout: &Layout,
) -> std::result::Result<(BTreeMap<SessionId, Arc<Session>>, u64), Corruption> {
    let mut sessions = BTreeMap::new();
    let mut bitmap_bytes = 0u64;
    for img in &ckpt.sessions {
        // Check the bitmap budget before building the session: an ended session carries
        // no bitmap on disk, so its extents alone could otherwise demand any allocation.
        bitmap_bytes = bitmap_bytes.saturating_add(img.desc.bitmap_bytes());
        let s = if bitmap_bytes > layout.checkpoint_bytes {
            None
        } else {
            Some(Session::from_image(img)?)
        };
        if s.is_none_or(|s| sessions.insert(s.id(), Arc::new(s)).is_some()) {
            return Err(Corruption::Field {
                what: "checkpoint",
                field: "sessions",
                value: img.desc.id.0,
            });
        }
    }
    Ok((sessions, bitmap_bytes))
}

/// The in-memory state the journal's entries are applied to.
struct State<'a> {
    sessions: &'a mut BTreeMap<SessionId, Arc<Session>>,
    next_session: &'a mut u64,
    bitmap_bytes: &'a mut u64,
    report: &'a mut OpenReport,
    checked: Checked,
}

fn read_block(storage: &dyn TableStorage, layout: &Layout, copy: u32, s: u64) -> Result<Vec<u8>> {
    let mut b = vec![0u8; JOURNAL_BLOCK_BYTES];
    storage.read(layout.block(copy, s), &mut b)?;
    Ok(b)
}

/// Apply every whole commit of the journal from `seq` on (each block from either copy);
/// returns the sequence number where the replay stopped.
fn replay_journal(
    storage: &dyn TableStorage,
    layout: &Layout,
    table_id: &TableId,
    start: u64,
    st: &mut State<'_>,
) -> std::result::Result<u64, StepError> {
    let n = layout.journal_blocks();
    let mut seq = start;
    while let Some((count, payload)) = read_commit(storage, layout, table_id, seq, st.report)? {
        let entries = Entry::decode_all(&payload).map_err(StepError::Damaged)?;
        for e in &entries {
            apply(
                st.sessions,
                st.next_session,
                st.bitmap_bytes,
                layout.checkpoint_bytes,
                e,
            )
            .map_err(StepError::Damaged)?;
            let sessions = &*st.sessions;
            st.checked.note(e, seq, |id| {
                sessions
                    .get(&id)
                    .filter(|s| s.is_live())
                    .map(|s| s.desc.grain.bytes())
            });
        }
        st.report.blocks_replayed += count;
        st.report.commits_replayed += 1;
        seq += count;
        if seq - start > n {
            return Err(StepError::Damaged(Corruption::Field {
                what: "journal",
                field: "length",
                value: seq,
            }));
        }
    }
    Ok(seq)
}

/// The commit starting at `seq`: its block count and payload, when every one of its blocks
/// verifies in one of the two copies.
fn read_commit(
    storage: &dyn TableStorage,
    layout: &Layout,
    table_id: &TableId,
    seq: u64,
    report: &mut OpenReport,
) -> Result<Option<(u64, Vec<u8>)>> {
    let mut payload = Vec::new();
    let mut count = None;
    let mut i = 0u64;
    while count.is_none_or(|c| i < c) {
        let s = seq + i;
        let mut got = None;
        for copy in 0..2 {
            let b = read_block(storage, layout, copy, s)?;
            if let Ok((h, p)) = decode_block(&b, table_id, Some(s)) {
                if h.commit_seq == seq && count.is_none_or(|c| c == u64::from(h.block_count)) {
                    if copy == 1 {
                        report.blocks_repaired += 1;
                    }
                    got = Some((h, p.to_vec()));
                    break;
                }
            }
        }
        let Some((h, p)) = got else {
            return Ok(None);
        };
        count = Some(u64::from(h.block_count));
        payload.extend_from_slice(&p);
        i += 1;
    }
    Ok(Some((count.unwrap_or(0), payload)))
}

/// Look for committed blocks beyond the point where the replay stopped: the highest sequence
/// number seen, and whether a commit after `seq` exists (a hole before the tail).
fn scan_for_hole(
    storage: &dyn TableStorage,
    layout: &Layout,
    table_id: &TableId,
    seq: u64,
) -> Result<(Option<u64>, bool)> {
    let n = layout.journal_blocks();
    let mut max_seen = None::<u64>;
    let mut hole = false;
    for copy in 0..2 {
        for slot in 0..n {
            let b = read_block(storage, layout, copy, slot)?;
            if let Ok((h, _)) = decode_block(&b, table_id, None) {
                if h.seq % n == slot {
                    max_seen = Some(max_seen.map_or(h.seq, |m| m.max(h.seq)));
                    if h.commit_seq > seq {
                        hole = true;
                    }
                }
            }
        }
    }
    Ok((max_seen, hole))
}

/// A hole in the journal: commits after it may be lost, so every live session ends.
fn terminate_live(
    sessions: &BTreeMap<SessionId, Arc<Session>>,
    seq: u64,
) -> std::result::Result<(), Corruption> {
    let reason = Reason::new(
        ReasonCode::TableDamaged,
        format!("journal block {seq} damaged in both copies"),
    );
    for s in sessions.values() {
        if s.is_live() {
            s.apply(&Entry::SetState {
                session: s.id(),
                state: SessionState::Terminated,
                reason: Some(reason.clone()),
            })?;
        }
    }
    Ok(())
}
