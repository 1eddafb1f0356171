//! The source write path: copy-before-write of uncopied grains (read old bytes once, write
//! every target, flush the targets while the table commits checked copy records, set the bits,
//! then release the source write; see `checked.rs`) and target writes.

use crate::volume::AlignedBuf;
use std::sync::Arc;

use crate::model::{Entry, Reason, ReasonCode, SessionState};

use super::writeback::{Copied, Snapshot, WriteBack};
use super::{not_usable, suspended_error, CopyErrorPolicy, Engine, VolumeHandle};
use crate::ids::{SessionId, VolumeId};
use crate::session::{Piece, Session};
use crate::volume::check_range;
use crate::{Error, Result};

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

#[cfg(feature = "fault")]
static CANARY_SKIP_CBW_FLUSH_ALL: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The same canary for every thread of the process (the binary turns it on at startup when
/// `TIMEZERO_CANARY_SKIP_CBW_FLUSH=1`, in `fault` builds only, for the power-loss test).
#[cfg(feature = "fault")]
pub fn set_canary_skip_cbw_flush_all_threads(on: bool) {
    CANARY_SKIP_CBW_FLUSH_ALL.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(feature = "fault")]
thread_local! {
    static CHECKED_COMMIT_ON_THREAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

#[cfg(feature = "fault")]
static CHECKED_COMMIT_ON_THREAD_ALL: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(0);

/// The same choice as [`set_checked_commit_on_thread`] for every thread of the process (the
/// binary makes it at startup from `TIMEZERO_CHECKED_COMMIT_ON_THREAD=1` or `=0`, in `fault`
/// builds only, for the power-loss test); a thread's own choice comes first.
#[cfg(feature = "fault")]
pub fn set_checked_commit_on_thread_all_threads(on: Option<bool>) {
    let v = match on {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    };
    CHECKED_COMMIT_ON_THREAD_ALL.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// Fault harness: which of a checked copy's two durability points a first write in the
/// calling thread hands to a flusher thread: `Some(true)` the table's commit, `Some(false)`
/// the target's flush, `None` as measured (the default; see `engine/checked.rs`,
/// `Durability`). Both arrangements keep the same order (both durable before the source
/// write); this lets the crash enumerator run each of them whatever the simulated devices'
/// timings. Thread-local so that parallel tests are not affected.
#[cfg(feature = "fault")]
pub fn set_checked_commit_on_thread(on: Option<bool>) {
    CHECKED_COMMIT_ON_THREAD.with(|c| c.set(on));
}

#[cfg(feature = "fault")]
thread_local! {
    static CANARY_LATE_CHANGE_MARKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Fault-harness canary: while on, a write in the calling thread that only needs change marks
/// (no copy-before-write) is issued *before* its marks are committed, so a crash between the two
/// leaves a change the map does not record (the enumerator's refresh check must catch it).
/// Thread-local so that parallel tests are not affected.
#[cfg(feature = "fault")]
pub fn set_canary_late_change_marks(on: bool) {
    CANARY_LATE_CHANGE_MARKS.with(|c| c.set(on));
}

/// Issue a write to a volume whose covering sessions were checked (bits set, or extents or
/// sessions ended). The release fence orders those checks, and the bit stores of a
/// copy-before-write, before the write's stores (the writer half of a sequence lock); it pairs
/// with the acquire fence in `Engine::read_piece`, whose lock-free reads of uncopied source
/// grains re-check the bits after reading.
#[inline(always)]
fn release_write(h: &VolumeHandle, offset: u64, data: &[u8]) -> Result<()> {
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    h.write_retry(offset, data)
}

impl Engine {
    /// Write `data` at `offset` of an attached volume through the engine: copy-before-write for
    /// sessions it is the source of, grain completion for sessions it is the target of.
    /// Durable only after [`Engine::flush`].
    ///
    /// # Errors
    /// [`Error::OutOfRange`], I/O and table errors (the source write is not issued when copying
    /// failed, under [`CopyErrorPolicy::FailWrite`]).
    pub fn write(&self, vol: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        self.write_as(vol, offset, data, None)
    }

    /// [`Engine::write`]; `restoring` names the session whose reverse restore issues this
    /// write (its grains move back to the source): that session is passed over (its bits are
    /// set for every grain it restores, and a restore marks nothing changed).
    pub(super) fn write_as(
        &self,
        vol: VolumeId,
        offset: u64,
        data: &[u8],
        restoring: Option<SessionId>,
    ) -> Result<()> {
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
        let len = data.len() as u64;
        let gate = loop {
            if restoring.is_none() && self.reversing_any() {
                // Grains a reverse restore still maps move back before anything lands on them.
                self.restore_first(vol, offset, len)?;
            }
            let gate = h
                .gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !self.reversing_any() || !self.reverse_blocks(vol, offset, len, restoring)? {
                break gate;
            }
        };
        let active = self.active.load();
        let mut work: Vec<(Arc<Session>, u64, u64)> = Vec::new();
        // Grains of incremental sessions this write changes first (their marks are durable
        // before the write is issued).
        let mut marks: Vec<(Arc<Session>, u64, u64)> = Vec::new();
        for s in active.iter() {
            if restoring == Some(s.id()) {
                continue;
            }
            let state = s.state();
            let live = state.is_live();
            let recording = s.desc.incremental && (live || state == SessionState::Completed);
            if !live && !recording {
                continue;
            }
            // No allocation: this loop runs for every write, most of which find nothing to do.
            let as_source = (s.desc.source.id == vol).then(|| s.map.source_pieces(offset, len));
            let as_target = (s.desc.target.id == vol).then(|| s.map.target_pieces(offset, len));
            for p in as_source
                .into_iter()
                .flatten()
                .chain(as_target.into_iter().flatten())
            {
                let (g0, g1) = s.map.grains_of(&p);
                if !s.extent_live(p.extent) {
                    continue;
                }
                if recording && !s.changed_bits().all_set(g0, g1 - g0) {
                    marks.push((s.clone(), g0, g1));
                }
                if state == SessionState::Suspended && self.table.unverified_in(s.id(), g0, g1) {
                    // The T0 bytes of these grains may be only on the missing target, not yet
                    // proven: the source keeps them until the resume proves them.
                    return Err(suspended_error(s));
                }
                if live && !s.bits().all_set(g0, g1 - g0) {
                    if state == SessionState::Suspended {
                        // Copy-before-write needs both volumes: refuse rather than bypass it.
                        return Err(suspended_error(s));
                    }
                    work.push((s.clone(), g0, g1));
                }
            }
        }
        let mut marks = change_entries(marks);
        // Grains of images this write changes on their target whose checked copy the journal
        // still records: confirmed before the write lands (recovery would otherwise find the
        // grain differing from its record and copy the source over it).
        // (Collected whether or not the journal names checked grains now: a copy this write
        // makes for a target grain adds one.)
        let confirm: Vec<(SessionId, u64, u64)> = if active.iter().any(|s| s.desc.target.id == vol)
        {
            active
                .iter()
                .filter(|s| s.desc.target.id == vol)
                .flat_map(|s| {
                    s.map
                        .target_pieces(offset, len)
                        .map(|p| {
                            let (g0, g1) = s.map.grains_of(&p);
                            (s.id(), g0, g1)
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        } else {
            Vec::new()
        };
        if self.options.write_back
            && restoring.is_none()
            && !self.reversing_any()
            && !self.target_vols.load().contains(&vol)
        {
            return self.write_held(h, offset, data, work, marks);
        }
        // A write held for this range reaches the volume before this one does.
        if h.held.may_overlap(offset, len) {
            self.drain_locked(h)?;
        }
        if work.is_empty() {
            #[cfg(feature = "fault")]
            if !marks.is_empty() && CANARY_LATE_CHANGE_MARKS.with(std::cell::Cell::get) {
                release_write(h, offset, data)?;
                return self.table.commit(marks);
            }
            marks.extend(self.confirmations(&confirm));
            if !marks.is_empty() {
                self.table.commit(marks)?;
            }
            return release_write(h, offset, data);
        }
        let _busy = InflightGuard::new(&self.cow_inflight);
        let work = merge_work(work);
        let guards: Vec<_> = work
            .iter()
            .map(|(s, g0, g1)| s.locks.lock(*g0, *g1))
            .collect();
        // Grains a held write on their source copied (write-back mode; this write is not held:
        // it goes to a session's target, say) are committed by that source's drain, and their
        // source may get the held bytes at any moment: drain it first (under its own gate, so
        // with none held here) and start again. Looked at before the bits (`uncopied_runs`), as
        // everywhere (`writeback.rs`, "Invariants").
        if let Some(src) = self.held_pending(&work) {
            drop(guards);
            drop(_busy);
            drop(gate);
            self.drain(&src)?;
            return self.write_as(vol, offset, data, restoring);
        }
        let r = self.copy_runs(&work, marks.clone());
        if let Err(e) = r {
            match self.options.on_copy_error {
                CopyErrorPolicy::FailWrite => return Err(e),
                CopyErrorPolicy::TerminateSession => {
                    drop(guards);
                    // The marks went with the failed commit: the write still needs them.
                    if !marks.is_empty() {
                        self.table.commit(marks)?;
                    }
                    for (s, _, _) in &work {
                        if !s.bits().all_set(0, s.desc.grains()) {
                            self.terminate(
                                s.id(),
                                Reason::new(ReasonCode::CopyFailed, e.to_string()),
                            )?;
                        }
                    }
                    self.confirm(&confirm)?;
                    return release_write(h, offset, data);
                }
            }
        }
        // Under the grain locks: every checked copy of these grains has settled.
        self.confirm(&confirm)?;
        let r = release_write(h, offset, data);
        drop(guards);
        r
    }

    /// The source of the first grain of `work` (session, grain range; locks held) that a held
    /// write copied and whose bit is not yet committed, if any. Only write-back engines hold
    /// writes; a source that is not attached holds none.
    fn held_pending(&self, work: &[(Arc<Session>, u64, u64)]) -> Option<Arc<VolumeHandle>> {
        if !self.options.write_back {
            return None;
        }
        work.iter().find_map(|(s, g0, g1)| {
            let src = self.handle(s.desc.source.id).ok()?;
            src.held.any_pending_in(s.id(), *g0, *g1).then_some(src)
        })
    }

    /// `SetBits` entries that confirm the grains of `ranges` (session, grain range) the
    /// journal names in checked records (their copies have settled: the targets are durable).
    fn confirmations(&self, ranges: &[(SessionId, u64, u64)]) -> Vec<Entry> {
        let mut out = Vec::new();
        if ranges.is_empty() || !self.table.checked_any() {
            return out;
        }
        for &(id, g0, g1) in ranges {
            for (start, end) in self.table.checked_in(id, g0, g1) {
                out.push(Entry::SetBits {
                    session: id,
                    start,
                    count: end - start,
                });
            }
        }
        out
    }

    /// Commit [`Engine::confirmations`] for `ranges`, when there are any.
    fn confirm(&self, ranges: &[(SessionId, u64, u64)]) -> Result<()> {
        let entries = self.confirmations(ranges);
        if entries.is_empty() {
            return Ok(());
        }
        self.table.commit(entries)
    }

    /// Copy the T0 bytes of every still-uncopied grain in `work` (session, grain range; locks
    /// held by the caller) to its target and make the copy durable with `marks` (change marks
    /// the same write needs): the targets' flush and the table's commit of `CopyChecked`
    /// records (a CRC32C per grain, which recovery verifies against the target) run side by
    /// side, one of them on a flusher thread (`checked::Durability` says which); the grains'
    /// bits are set in memory only when both are durable.
    fn copy_runs(&self, work: &[(Arc<Session>, u64, u64)], marks: Vec<Entry>) -> Result<()> {
        let runs = uncopied_runs(work)?;
        super::pause::pause(super::pause::PausePoint::SyncWrite);
        if runs.is_empty() {
            return if marks.is_empty() {
                Ok(())
            } else {
                self.table.commit(marks)
            };
        }
        if !self.options.checked_copies {
            return self.copy_runs_serial(&runs, marks);
        }
        let written = self.write_t0(&runs, true)?;
        let crcs = &written.crcs;
        let targets = written.targets.clone();
        let skip = skip_cbw_flush();
        // Tickets taken now, on this thread: a flusher that runs the flush later finds it done
        // when a flush that started after these writes has completed meanwhile (many writers'
        // flushes of one target coalesce however late the flusher thread gets to them).
        let targets: Vec<(Arc<VolumeHandle>, u64)> = targets
            .into_iter()
            .map(|t| {
                let ticket = t.flush_ticket();
                (t, ticket)
            })
            .collect();
        let flush: crate::activity::FlushFn = Arc::new(move || {
            if skip {
                return Ok(());
            }
            for (t, ticket) in &targets {
                t.flush_from(*ticket)?;
            }
            Ok(())
        });
        let mut entries: Vec<Entry> = Vec::with_capacity(runs.len() + marks.len());
        // The copy log: the T0 bytes go into the table file with their records, so one sync
        // makes both durable and the target's flush waits for a retire.
        let few = self.cow_inflight.load(std::sync::atomic::Ordering::Acquire)
            <= crate::limits::LOG_WRITERS_MAX;
        let logged = if few && self.table.layout().log_bytes > 0 {
            let log_runs: Vec<crate::activity::LogRun<'_>> = runs
                .iter()
                .enumerate()
                .map(|(i, r)| crate::activity::LogRun {
                    session: r.s.id(),
                    start: r.g0,
                    count: r.g1 - r.g0,
                    bytes: written.bytes(i),
                })
                .collect();
            self.table.log_copies(&log_runs, &flush)?
        } else {
            None
        };
        if let Some(places) = logged {
            for ((r, c), off) in runs.iter().zip(crcs).zip(places) {
                let grain = r.p.len / (r.g1 - r.g0).max(1);
                entries.extend(super::checked::entries(
                    r.s.id(),
                    r.g0,
                    c,
                    Some((off, grain)),
                ));
            }
            entries.extend(marks);
            // Durable with the log's bytes; applying it sets the grains' bits.
            self.table.commit(entries)?;
            if self.table.log_retire_due() {
                let table = Arc::clone(&self.table);
                // A target whose flush fails there keeps its copies in the log, as deferred
                // proofs (`Checked::retire`); its volume is latched as failed.
                self.flusher.start(Box::new(move || {
                    let _ = table.retire_log();
                }));
            }
            return Ok(());
        }
        let mut settled: Vec<(SessionId, u64, u64)> = Vec::with_capacity(runs.len());
        let mut tickets: Vec<u64> = Vec::with_capacity(runs.len());
        for (r, c) in runs.iter().zip(crcs) {
            tickets.push(
                self.table
                    .begin_checked(r.s.id(), r.g0, r.g1 - r.g0, Arc::clone(&flush)),
            );
            settled.push((r.s.id(), r.g0, r.g1 - r.g0));
            entries.extend(super::checked::entries(r.s.id(), r.g0, c, None));
        }
        entries.extend(marks);
        let (committed, flushed) = if self.commit_on_thread() {
            self.commit_beside_flush(entries, &flush)
        } else {
            self.flush_beside_commit(entries, &flush)
        };
        self.table
            .settle_checked(&tickets, &settled, committed.is_ok(), flushed.is_ok())?;
        committed?;
        flushed
    }

    /// Whether a first write hands its commit to a flusher thread (and flushes its targets
    /// itself) rather than the other way round: as measured, unless the fault harness chose.
    fn commit_on_thread(&self) -> bool {
        #[cfg(feature = "fault")]
        if let Some(on) = CHECKED_COMMIT_ON_THREAD.with(std::cell::Cell::get) {
            return on;
        }
        #[cfg(feature = "fault")]
        match CHECKED_COMMIT_ON_THREAD_ALL.load(std::sync::atomic::Ordering::Relaxed) {
            1 => return false,
            2 => return true,
            _ => {}
        }
        self.durability.commit_on_thread()
    }

    /// A checked copy's durability points when the table's commit is the shorter (the table
    /// on a faster device): the commit on a flusher thread, the targets' `flush` on this one.
    /// This thread then waits for the commit itself, leading it when the flusher thread has
    /// not got to it yet (the flusher's job then finds it done); whoever leads a commit writes
    /// every queued entry, so concurrent first writes still share one. Returns (commit,
    /// flush).
    fn commit_beside_flush(
        &self,
        entries: Vec<Entry>,
        flush: &crate::activity::FlushFn,
    ) -> (Result<()>, Result<()>) {
        let batch = match self.table.commit_enqueue(entries) {
            Ok(b) => b,
            // Nothing was queued; the targets need no flush for a copy that is not recorded.
            Err(e) => return (Err(e), Ok(())),
        };
        if let Some(b) = batch {
            let (table, times) = (Arc::clone(&self.table), Arc::clone(&self.durability));
            // Timed from here, hand-over included: when the thread is slow to get to it (and
            // this thread leads the commit), the commit looks long and comes back here.
            let t = std::time::Instant::now();
            // Its result is the commit's, which this thread gets from its own wait below.
            self.flusher.start(Box::new(move || {
                if table.commit_wait(b).is_ok() {
                    times.commit_took(t.elapsed());
                }
            }));
        }
        let t = std::time::Instant::now();
        let flushed = flush();
        self.durability.flush_took(t.elapsed());
        (batch.map_or(Ok(()), |b| self.table.commit_wait(b)), flushed)
    }

    /// A checked copy's durability points otherwise (one device for both, where they take
    /// about as long): the targets' `flush` on a flusher thread, the commit on this one.
    /// Returns (commit, flush).
    fn flush_beside_commit(
        &self,
        entries: Vec<Entry>,
        flush: &crate::activity::FlushFn,
    ) -> (Result<()>, Result<()>) {
        let done = Arc::new(super::checked::Done::default());
        {
            let (done, flush, times) = (
                Arc::clone(&done),
                Arc::clone(flush),
                Arc::clone(&self.durability),
            );
            // Timed from here, hand-over included, as the commit is on the other arrangement.
            let t = std::time::Instant::now();
            self.flusher.start(Box::new(move || {
                let r = flush();
                times.flush_took(t.elapsed());
                done.set(r);
            }));
        }
        let t = std::time::Instant::now();
        let committed = self.table.commit(entries);
        if committed.is_ok() {
            self.durability.commit_took(t.elapsed());
        }
        (committed, done.wait())
    }

    /// [`Engine::copy_runs`] without checked records: write the T0 bytes, flush the targets,
    /// then commit the bits with `marks` (three durability points in series with the source's).
    fn copy_runs_serial(&self, runs: &[Run], marks: Vec<Entry>) -> Result<()> {
        let targets = self.write_t0(runs, false)?.targets;
        let mut entries: Vec<Entry> = runs
            .iter()
            .map(|r| Entry::SetBits {
                session: r.s.id(),
                start: r.g0,
                count: r.g1 - r.g0,
            })
            .collect();
        for t in &targets {
            if skip_cbw_flush() {
                continue;
            }
            t.flush()?;
        }
        entries.extend(marks);
        self.table.commit(entries)
    }

    /// Read the T0 bytes of `runs` from their sources (once per source range) and write them
    /// to their targets; returns the targets written (each once), not yet flushed, when
    /// `crcs`, the CRC32C of each run's grains, and the bytes.
    fn write_t0(&self, runs: &[Run], crcs: bool) -> Result<WrittenT0> {
        let (merged, bufs) = self.read_old(runs)?;
        let mut targets: Vec<Arc<VolumeHandle>> = Vec::new();
        let mut sums = Vec::with_capacity(if crcs { runs.len() } else { 0 });
        let mut at = Vec::with_capacity(runs.len());
        for r in runs {
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
            let bytes = &bufs[i].get()[off..off + len];
            at.push((i, off, len));
            th.write_retry(r.p.target_offset, bytes)?;
            if crcs {
                let grain = usize::try_from(r.p.len / (r.g1 - r.g0).max(1))
                    .map_err(|_| Error::invalid("copy", "grain"))?;
                sums.push(super::checked::grain_crcs(bytes, grain));
            }
            if !targets.iter().any(|t| t.info.id == th.info.id) {
                targets.push(th);
            }
        }
        Ok(WrittenT0 {
            targets,
            crcs: sums,
            bufs,
            at,
        })
    }

    /// The write-back path of [`Engine::write`] (gate held; see `writeback.rs`): copy the T0
    /// bytes of the uncopied grains that are not already pending to their targets, hold the
    /// write with those copies and `marks`, and drain when the held writes pass their bound. A
    /// write that needs nothing and overlaps nothing held goes straight to the volume.
    fn write_held(
        &self,
        h: &VolumeHandle,
        offset: u64,
        data: &[u8],
        work: Vec<(Arc<Session>, u64, u64)>,
        marks: Vec<Entry>,
    ) -> Result<()> {
        // A fenced or failed volume refuses the write now, as the synchronous path does (a held
        // write would otherwise be acknowledged, and read back, although no drain can land it).
        h.check_live()?;
        if work.is_empty() && marks.is_empty() && !h.held.may_overlap(offset, data.len() as u64) {
            return release_write(h, offset, data);
        }
        let mut copies = Vec::new();
        let over = if work.is_empty() {
            h.held.push(offset, data, copies, marks)
        } else {
            let _busy = InflightGuard::new(&self.cow_inflight);
            let work = merge_work(work);
            let guards: Vec<_> = work
                .iter()
                .map(|(s, g0, g1)| s.locks.lock(*g0, *g1))
                .collect();
            let runs = uncopied_not_pending(&work, &h.held)?;
            match self.write_t0(&runs, false) {
                Ok(_) => {
                    for r in runs {
                        let target = self.handle(r.s.desc.target.id)?;
                        copies.push(Copied {
                            session: r.s,
                            g0: r.g0,
                            g1: r.g1,
                            target,
                        });
                    }
                }
                Err(e) => match self.options.on_copy_error {
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
                        // The marks still go before the write, which is held.
                        let over = h.held.push(offset, data, Vec::new(), marks);
                        if over {
                            self.drain_locked(h)?;
                        }
                        return Ok(());
                    }
                },
            }
            // Pushed while the grains are held: a copier that holds one next sees it pending.
            let over = h.held.push(offset, data, copies, marks);
            drop(guards);
            over
        };
        if over {
            self.drain_locked(h)?;
        }
        Ok(())
    }

    /// Drain the writes held for `h` (taking its write gate shared for the time).
    pub(super) fn drain(&self, h: &VolumeHandle) -> Result<()> {
        if h.held.is_empty() {
            return Ok(());
        }
        let _gate = h
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.drain_locked(h)
    }

    /// Drain the writes held for every volume of `handles`, whose gates the caller holds.
    pub(super) fn drain_gated(&self, handles: &[Arc<VolumeHandle>]) -> Result<()> {
        for h in handles {
            self.drain_locked(h)?;
        }
        Ok(())
    }

    /// Drain the writes held for `h` (the caller holds its write gate, shared or exclusive):
    /// flush every target that received T0 bytes for them, commit their copied bits and change
    /// marks, then write them to the volume in the order they were acknowledged. On failure
    /// the writes stay held (reads still see them) and the next flush tries again; under
    /// [`CopyErrorPolicy::TerminateSession`] the sessions whose copies could not be made
    /// durable are terminated and the writes go on.
    pub(super) fn drain_locked(&self, h: &VolumeHandle) -> Result<()> {
        if h.held.is_empty() {
            return Ok(());
        }
        let _one = h.held.draining.lock();
        let snap = h.held.snapshot();
        if snap.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.drain_commit(h, &snap) {
            h.held
                .recopy
                .store(true, std::sync::atomic::Ordering::Release);
            match self.options.on_copy_error {
                CopyErrorPolicy::FailWrite => return Err(e),
                CopyErrorPolicy::TerminateSession => {
                    let marks = self.known(snap.marks.clone());
                    if !marks.is_empty() {
                        self.table.commit(marks)?;
                    }
                    for c in &snap.copies {
                        let s = &c.session;
                        if s.is_live() && !s.bits().all_set(0, s.desc.grains()) {
                            self.terminate(
                                s.id(),
                                Reason::new(ReasonCode::CopyFailed, e.to_string()),
                            )?;
                        }
                    }
                }
            }
        }
        h.held
            .recopy
            .store(false, std::sync::atomic::Ordering::Release);
        h.held.committed(&snap);
        for w in &snap.writes {
            release_write(h, w.offset, &w.data)?;
        }
        h.held.written(&snap);
        Ok(())
    }

    /// Steps 1 and 2 of a drain: the targets' flush, then one commit of the bits and marks
    /// (after an earlier drain failed, the pending grains are copied again first).
    fn drain_commit(&self, h: &VolumeHandle, snap: &Snapshot) -> Result<()> {
        if h.held.recopy.load(std::sync::atomic::Ordering::Acquire) {
            self.recopy(snap)?;
        }
        let mut targets: Vec<&Arc<VolumeHandle>> = Vec::new();
        for c in &snap.copies {
            if !targets.iter().any(|t| t.info.id == c.target.info.id) {
                targets.push(&c.target);
            }
        }
        for t in targets {
            if skip_cbw_flush() {
                continue;
            }
            t.flush()?;
        }
        let mut runs: Vec<(SessionId, u64, u64)> = snap
            .copies
            .iter()
            .map(|c| (c.session.id(), c.g0, c.g1))
            .collect();
        runs.sort_unstable();
        let mut entries: Vec<Entry> = Vec::with_capacity(runs.len() + snap.marks.len());
        for (id, g0, g1) in runs {
            if let Some(Entry::SetBits {
                session,
                start,
                count,
            }) = entries.last_mut()
            {
                if *session == id && g0 <= *start + *count {
                    *count = (*start + *count).max(g1) - *start;
                    continue;
                }
            }
            entries.push(Entry::SetBits {
                session: id,
                start: g0,
                count: g1 - g0,
            });
        }
        entries.extend(snap.marks.iter().cloned());
        // A session forgotten since its grains were copied needs nothing any more.
        let entries = self.known(entries);
        if entries.is_empty() {
            return Ok(());
        }
        match self.table.commit(entries.clone()) {
            // Forgotten between the look and the commit (nothing was written).
            Err(Error::UnknownSession(_)) => {
                let entries = self.known(entries);
                if entries.is_empty() {
                    return Ok(());
                }
                self.table.commit(entries)
            }
            r => r,
        }
    }

    /// Copy the T0 bytes of the grains `snap`'s held writes copied once more, under their grain
    /// locks, skipping grains copied since (a target write through the image copies and
    /// commits a grain itself).
    fn recopy(&self, snap: &Snapshot) -> Result<()> {
        let work = merge_work(
            snap.copies
                .iter()
                .map(|c| (Arc::clone(&c.session), c.g0, c.g1))
                .collect(),
        );
        let _guards: Vec<_> = work
            .iter()
            .map(|(s, g0, g1)| s.locks.lock(*g0, *g1))
            .collect();
        let runs = uncopied_runs(&work)?;
        self.write_t0(&runs, false).map(|_| ())
    }

    /// `entries` without those for sessions the table no longer has.
    fn known(&self, entries: Vec<Entry>) -> Vec<Entry> {
        entries
            .into_iter()
            .filter(|e| match e {
                Entry::SetBits { session, .. } | Entry::SetChanged { session, .. } => {
                    self.table.session(*session).is_some()
                }
                _ => true,
            })
            .collect()
    }

    /// Read the old bytes the runs need. One read serves every session that needs a range:
    /// source ranges are merged per source volume. Returns the merged ranges (volume, start,
    /// end) and one buffer per range.
    fn read_old(&self, runs: &[Run]) -> Result<(Vec<ReadRange>, Vec<AlignedBuf>)> {
        let mut reads: Vec<ReadRange> = runs
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
        let mut merged: Vec<ReadRange> = Vec::new();
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
            let mut b = AlignedBuf::new(
                usize::try_from(e - s).map_err(|_| Error::invalid("copy", "too large"))?,
            );
            h.read_retry(*s, b.get_mut())?;
            bufs.push(b);
        }
        Ok((merged, bufs))
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

/// One `SetChanged` entry per session and run of grains (ranges of one session merged).
fn change_entries(mut marks: Vec<(Arc<Session>, u64, u64)>) -> Vec<Entry> {
    if marks.is_empty() {
        return Vec::new();
    }
    marks.sort_by_key(|(s, g0, _)| (s.id(), *g0));
    let mut out: Vec<Entry> = Vec::with_capacity(marks.len());
    for (s, g0, g1) in marks {
        if let Some(Entry::SetChanged {
            session,
            start,
            count,
        }) = out.last_mut()
        {
            if *session == s.id() && g0 <= *start + *count {
                *count = (*start + *count).max(g1) - *start;
                continue;
            }
        }
        out.push(Entry::SetChanged {
            session: s.id(),
            start: g0,
            count: g1 - g0,
        });
    }
    out
}

/// What [`Engine::write_t0`] wrote: the targets (each once, not yet flushed) and, when asked,
/// the CRC32C of each run's grains.
/// What [`Engine::write_t0`] wrote: the targets (each once, not yet flushed), the CRC32Cs of
/// each run's grains (when asked for), and the T0 bytes read.
struct WrittenT0 {
    targets: Vec<Arc<VolumeHandle>>,
    crcs: Vec<Vec<u32>>,
    bufs: Vec<AlignedBuf>,
    /// Per run: (buffer, offset, length) of its bytes.
    at: Vec<(usize, usize, usize)>,
}

impl WrittenT0 {
    /// The T0 bytes of run `i`.
    fn bytes(&self, i: usize) -> &[u8] {
        let (b, off, len) = self.at[i];
        &self.bufs[b].get()[off..off + len]
    }
}

/// A range of one source volume read once for copy-before-write: volume, start, end.
type ReadRange = (VolumeId, u64, u64);

/// A run of uncopied grains of one session, inside one extent, and where its bytes live.
struct Run {
    s: Arc<Session>,
    g0: u64,
    g1: u64,
    p: Piece,
}

/// The runs of still-uncopied grains in `work` (session, grain range), each within one extent.
fn uncopied_runs(work: &[(Arc<Session>, u64, u64)]) -> Result<Vec<Run>> {
    runs_where(work, |_, _| false)
}

/// [`uncopied_runs`] without the grains a held write already copied (pending in `held`; their
/// drain commits them).
///
/// The pending grains are looked at *before* the bits, under the caller's grain locks. A drain
/// commits a grain's bit, then stops holding it pending, then writes the new bytes to the
/// source; in the other order a drain that ran between the two looks would leave a grain that
/// looked neither copied nor pending, and its "T0 bytes" would be read from a source that no
/// longer holds them. In this order a grain that was not pending was either never copied by a
/// held write (and none can copy it now: the caller holds it) or its bit is already set.
fn uncopied_not_pending(work: &[(Arc<Session>, u64, u64)], held: &WriteBack) -> Result<Vec<Run>> {
    if held.is_empty() {
        super::pause::pause(super::pause::PausePoint::HeldWrite);
        return uncopied_runs(work);
    }
    let pending: Vec<Vec<bool>> = work
        .iter()
        .map(|(s, g0, g1)| held.pending_in(s.id(), *g0, *g1))
        .collect();
    super::pause::pause(super::pause::PausePoint::HeldWrite);
    runs_where(work, |i, g| {
        let (_, g0, _) = &work[i];
        usize::try_from(g - g0)
            .ok()
            .and_then(|k| pending[i].get(k))
            .copied()
            .unwrap_or(false)
    })
}

/// The runs of grains of `work` whose bits are clear and which `skip` (index into `work`,
/// grain) does not pass over, each within one extent.
fn runs_where(
    work: &[(Arc<Session>, u64, u64)],
    skip: impl Fn(usize, u64) -> bool,
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for (i, (s, g0, g1)) in work.iter().enumerate() {
        let todo = |g: u64| !s.bits().get(g) && !skip(i, g);
        let mut g = *g0;
        while g < *g1 {
            if !todo(g) {
                g += 1;
                continue;
            }
            let start = g;
            let (_, ext_end) = s
                .map
                .extent_of_grain(g)
                .ok_or_else(|| Error::invalid("grain", "outside extents"))?;
            while g < *g1 && g < ext_end && todo(g) {
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
    Ok(runs)
}

/// Whether the canary that skips the target flush before copied bits are committed is on.
#[inline]
fn skip_cbw_flush() -> bool {
    #[cfg(feature = "fault")]
    {
        CANARY_SKIP_CBW_FLUSH.with(std::cell::Cell::get)
            || CANARY_SKIP_CBW_FLUSH_ALL.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "fault"))]
    {
        false
    }
}

/// One range per session and overlapping grains: a volume that is both the source and the
/// target of one session can map a single write onto the same image grains twice, and a thread
/// must never wait for a range it already holds.
fn merge_work(mut work: Vec<(Arc<Session>, u64, u64)>) -> Vec<(Arc<Session>, u64, u64)> {
    work.sort_by_key(|(s, g0, _)| (s.id(), *g0));
    let mut merged: Vec<(Arc<Session>, u64, u64)> = Vec::with_capacity(work.len());
    for (s, g0, g1) in work {
        match merged.last_mut() {
            Some((ms, _, m1)) if ms.id() == s.id() && g0 <= *m1 => *m1 = (*m1).max(g1),
            _ => merged.push((s, g0, g1)),
        }
    }
    merged
}
