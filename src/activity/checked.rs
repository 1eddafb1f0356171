//! Copies recorded with a CRC32C per grain ([`Entry::CopyChecked`]) that the table still has to
//! account for.
//!
//! A copy-before-write records its grains with `CopyChecked` while the target's flush runs in
//! parallel, so a durable record does not prove that the target's bytes are durable. The table
//! tracks two things for it:
//!
//! - **In flight**: records whose target flush has not yet been seen to finish. Their bits are
//!   not set in memory until the engine settles them (so no other writer overwrites the source
//!   before the target is durable); a checkpoint first runs each one's flush, then counts their
//!   bits as set.
//! - **In the journal**: grains named by a `CopyChecked` entry in the part of the journal a
//!   replay may read. Recovery verifies them against the target; anything that is about to
//!   change such a grain's bytes on the target (a write through the image) first commits a
//!   plain `SetBits` for it, which confirms it.
//! - **Deferred**: grains whose records an open could not verify because the session's target
//!   (or, for a grain the target lost, its source) was missing or could not be opened. They are
//!   kept in every checkpoint with their CRCs (so they outlive the journal that named them)
//!   until the volumes are back: the session stays suspended, a write to such a grain is refused
//!   like a write that needs copy-before-write, and the resume verifies them first and commits a
//!   `SetBits` for them, which confirms them (see `Engine::reconcile`).
//! - **Logged, not yet retired**: copies whose T0 bytes went to the table's copy log with
//!   their record (`CopyChecked` with `log`), so the source write waited for the table's sync
//!   alone and the target's flush is still to come. Their log space is not reused until
//!   their targets are flushed (a retire, or a checkpoint, which retires everything first);
//!   an entry after which replay would no longer verify such a grain while something still
//!   reads its target (a confirming `SetBits`, the session's completion or reverse restore)
//!   waits for the retire too ([`Checked::needs_retire`]). A copy whose target's flush fails
//!   becomes a deferred proof whose bytes the log keeps; such a grain keeps the whole log out
//!   of use (pinned) until its session resumes or ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ids::SessionId;
use crate::model::Entry;

/// Makes the target bytes of an in-flight checked copy durable (the engine's target flush).
pub type FlushFn = Arc<dyn Fn() -> crate::Result<()> + Send + Sync>;

/// One in-flight checked copy: its grains and how to make its target bytes durable.
struct Inflight {
    ticket: u64,
    session: SessionId,
    start: u64,
    count: u64,
    flush: FlushFn,
}

/// What a table knows of its checked copies (see the module doc).
#[derive(Default)]
pub(crate) struct Checked {
    inner: Mutex<Inner>,
    /// Grains in `Inner::journal` (read without the lock on the write path).
    journal_len: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    /// (session, grain) -> (journal sequence of the record, CRC32C of the grain's bytes,
    /// offset of its bytes in the copy log when the record names them).
    journal: BTreeMap<(SessionId, u64), (u64, u32, Option<u64>)>,
    /// (session, grain) -> CRC32C of a checked copy still to be verified (see the module doc).
    deferred: BTreeMap<(SessionId, u64), u32>,
    inflight: Vec<Inflight>,
    next_ticket: u64,
    /// (session, grain) -> offset in the copy log of a deferred grain's T0 bytes.
    deferred_log: BTreeMap<(SessionId, u64), u64>,
    /// The copy log's space.
    log: Ring,
}

/// The copy log's space: a ring of `size` bytes addressed by ever-growing positions (a
/// position `p` is byte `p % size` of the log region). Space from `tail` to `head` holds
/// T0 bytes whose targets may not be durable yet.
#[derive(Default)]
struct Ring {
    size: u64,
    head: u64,
    tail: u64,
    /// Logged copies whose targets are not known to be durable, in position order.
    unretired: Vec<Unretired>,
    /// A retire is running (at most one at a time is started by writers).
    retiring: bool,
}

/// A logged copy whose target flush is still to come.
struct Unretired {
    /// Position after its bytes.
    end: u64,
    session: SessionId,
    start: u64,
    count: u64,
    flush: FlushFn,
}

/// One run of grains to log: its session, first grain, grain count and T0 bytes.
pub(crate) struct LogRun<'a> {
    /// Session.
    pub session: SessionId,
    /// First grain.
    pub start: u64,
    /// Grains.
    pub count: u64,
    /// The grains' T0 bytes.
    pub bytes: &'a [u8],
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.lock();
        f.debug_struct("Checked")
            .field("journal", &i.journal.len())
            .field("deferred", &i.deferred.len())
            .field("inflight", &i.inflight.len())
            .field("unretired", &i.log.unretired.len())
            .finish()
    }
}

impl Checked {
    /// Whether any grain of the journal carries a checked record (one atomic load).
    pub(crate) fn any_in_journal(&self) -> bool {
        self.journal_len.load(Ordering::Acquire) > 0
    }

    /// Runs of grains in `g0..g1` of `session` named by a checked record in the journal.
    pub(crate) fn in_journal(&self, session: SessionId, g0: u64, g1: u64) -> Vec<(u64, u64)> {
        let i = self.inner.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&(_, g), _) in i.journal.range((session, g0)..(session, g1)) {
            match out.last_mut() {
                Some((_, e)) if *e == g => *e = g + 1,
                _ => out.push((g, g + 1)),
            }
        }
        out
    }

    /// Sessions with grains named by a checked record in the journal, or deferred.
    pub(crate) fn sessions(&self) -> Vec<SessionId> {
        let i = self.inner.lock();
        let mut out: Vec<SessionId> = i
            .journal
            .keys()
            .chain(i.deferred.keys())
            .map(|(s, _)| *s)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Every (grain, CRC) of `session` still to be verified: its deferred grains and those its
    /// checked records in the journal name (a journal record is the newer of the two).
    pub(crate) fn to_verify(&self, session: SessionId) -> Vec<(u64, u32)> {
        let i = self.inner.lock();
        let mut m: BTreeMap<u64, u32> = i
            .deferred
            .range((session, 0)..=(session, u64::MAX))
            .map(|(&(_, g), &crc)| (g, crc))
            .collect();
        for (&(_, g), &(_, crc, _)) in i.journal.range((session, 0)..=(session, u64::MAX)) {
            m.insert(g, crc);
        }
        m.into_iter().collect()
    }

    /// Where the copy log holds the T0 bytes of `grain` of `session`, by the journal's record
    /// (the newer) or a deferred grain's.
    pub(crate) fn log_of(&self, session: SessionId, grain: u64) -> Option<u64> {
        let i = self.inner.lock();
        match i.journal.get(&(session, grain)) {
            Some(&(_, _, log)) => log,
            None => i.deferred_log.get(&(session, grain)).copied(),
        }
    }

    /// Keep `grains` (grain, CRC) of `session` to be verified when its volumes are back: they
    /// go into every checkpoint until then (see the module doc).
    /// A grain whose bytes the copy log holds keeps them there (`logged`: grain, log offset;
    /// the log is pinned until they are proven or their session ends).
    pub(crate) fn defer(&self, session: SessionId, grains: &[(u64, u32)], logged: &[(u64, u64)]) {
        let mut i = self.inner.lock();
        for &(g, crc) in grains {
            i.deferred.insert((session, g), crc);
            if let Some((_, _, Some(off))) = i.journal.remove(&(session, g)) {
                i.deferred_log.insert((session, g), off);
            }
        }
        for &(g, off) in logged {
            if i.deferred.contains_key(&(session, g)) {
                i.deferred_log.insert((session, g), off);
            }
        }
        self.journal_len.store(i.journal.len(), Ordering::Release);
    }

    /// The deferred (grain, CRC) of `session`.
    pub(crate) fn deferred_of(&self, session: SessionId) -> Vec<(u64, u32)> {
        let i = self.inner.lock();
        i.deferred
            .range((session, 0)..=(session, u64::MAX))
            .map(|(&(_, g), &crc)| (g, crc))
            .collect()
    }

    /// Whether a grain in `g0..g1` of `session` is deferred.
    pub(crate) fn deferred_in(&self, session: SessionId, g0: u64, g1: u64) -> bool {
        g0 < g1
            && self
                .inner
                .lock()
                .deferred
                .range((session, g0)..(session, g1))
                .next()
                .is_some()
    }

    /// Forget the deferred grains of `session` (verified, or the session ended).
    pub(crate) fn clear_deferred(&self, session: SessionId) {
        let mut i = self.inner.lock();
        i.deferred.retain(|(s, _), _| *s != session);
        i.deferred_log.retain(|(s, _), _| *s != session);
    }

    /// Record what a durable entry (at journal sequence `seq`) means for checked grains: a
    /// `CopyChecked` names its grains; a `SetBits` confirms its grains; a session that ends,
    /// is forgotten, refreshed or restored needs none of its records verified any more (each
    /// of those waits for every copy in flight, whose targets are then durable).
    ///
    /// `live_after` gives a session's grain size in bytes while it is live after the entry
    /// (`None` once it is not).
    pub(crate) fn note(&self, e: &Entry, seq: u64, live_after: impl Fn(SessionId) -> Option<u64>) {
        let mut i = self.inner.lock();
        match e {
            Entry::CopyChecked {
                session,
                start,
                crcs,
                log,
            } => {
                let grain = live_after(*session);
                for (k, crc) in crcs.iter().enumerate() {
                    let off = log.zip(grain).map(|(l, g)| l + k as u64 * g);
                    i.journal
                        .insert((*session, start + k as u64), (seq, *crc, off));
                }
            }
            Entry::SetBits {
                session,
                start,
                count,
            } => {
                let end = start.saturating_add(*count);
                remove_range(&mut i.journal, *session, *start, end);
                remove_range(&mut i.deferred, *session, *start, end);
                remove_range(&mut i.deferred_log, *session, *start, end);
            }
            Entry::SetState { session, .. } if live_after(*session).is_none() => {
                i.journal.retain(|(s, _), _| s != session);
                i.deferred.retain(|(s, _), _| s != session);
                i.deferred_log.retain(|(s, _), _| s != session);
            }
            Entry::Forget { session }
            | Entry::Refresh { session, .. }
            | Entry::Reverse { session } => {
                i.journal.retain(|(s, _), _| s != session);
                i.deferred.retain(|(s, _), _| s != session);
                i.deferred_log.retain(|(s, _), _| s != session);
            }
            _ => {}
        }
        self.journal_len.store(i.journal.len(), Ordering::Release);
    }

    /// Forget records older than `seq` (no replay reads them any more).
    pub(crate) fn prune_before(&self, seq: u64) {
        let mut i = self.inner.lock();
        i.journal.retain(|_, (s, _, _)| *s >= seq);
        self.journal_len.store(i.journal.len(), Ordering::Release);
    }

    /// Forget the records and deferred grains of `session` (recovery ended the session).
    pub(crate) fn clear_session(&self, session: SessionId) {
        let mut i = self.inner.lock();
        i.journal.retain(|(s, _), _| *s != session);
        i.deferred.retain(|(s, _), _| *s != session);
        i.deferred_log.retain(|(s, _), _| *s != session);
        self.journal_len.store(i.journal.len(), Ordering::Release);
    }

    /// Count a copy of `count` grains of `session` from `start` in flight (its target bytes
    /// are written, its flush may not have finished); returns its ticket.
    pub(crate) fn begin(&self, session: SessionId, start: u64, count: u64, flush: FlushFn) -> u64 {
        let mut i = self.inner.lock();
        let ticket = i.next_ticket;
        i.next_ticket += 1;
        i.inflight.push(Inflight {
            ticket,
            session,
            start,
            count,
            flush,
        });
        ticket
    }

    /// End the in-flight copies `tickets`; while the lock is held, `f` runs (the caller sets
    /// the copied bits in memory there, so a checkpoint sees each grain either in flight or
    /// set).
    pub(crate) fn end(&self, tickets: &[u64], f: impl FnOnce()) {
        let mut i = self.inner.lock();
        f();
        i.inflight.retain(|x| !tickets.contains(&x.ticket));
    }

    /// For a checkpoint: make every in-flight copy's target bytes durable, then run `f` with
    /// the grains in flight (session, start, count) and the deferred grains (session, grain,
    /// CRC), while no copy can settle.
    ///
    /// # Errors
    /// The first flush error (nothing of `f` runs then).
    ///
    /// Every logged copy is retired too (its target flushed, its log space free): the
    /// checkpoint drops the records that name the log.
    pub(crate) fn for_checkpoint<T>(
        &self,
        f: impl FnOnce(
            &[(SessionId, u64, u64)],
            &BTreeMap<(SessionId, u64), u32>,
            &BTreeMap<(SessionId, u64), u64>,
        ) -> T,
    ) -> crate::Result<T> {
        // Under the lock: no copy begins or settles, and nothing is logged, meanwhile (a copy
        // begins, or is logged, only after its target bytes are written, so each flush here
        // covers them).
        let mut i = self.inner.lock();
        for x in &i.inflight {
            (x.flush)()?;
        }
        // A target whose flush fails keeps its copies' bytes in the log, as deferred proofs
        // (the checkpoint carries them): the checkpoint itself goes on.
        let failed: Vec<FlushFn> = distinct(i.log.unretired.iter().map(|u| &u.flush))
            .into_iter()
            .filter(|f| f().is_err())
            .map(Arc::clone)
            .collect();
        for u in std::mem::take(&mut i.log.unretired) {
            if failed.iter().any(|f| Arc::ptr_eq(f, &u.flush)) {
                defer_unflushed(&mut i, &u);
            }
        }
        self.journal_len.store(i.journal.len(), Ordering::Release);
        i.log.tail = i.log.head;
        let runs: Vec<_> = i
            .inflight
            .iter()
            .map(|x| (x.session, x.start, x.count))
            .collect();
        Ok(f(&runs, &i.deferred, &i.deferred_log))
    }

    /// Give the copy log `size` bytes of space (0: no log).
    pub(crate) fn set_log_size(&self, size: u64) {
        self.inner.lock().log.size = size;
    }

    /// Log `runs`: take space for each run's bytes in the copy log, run `write` with the
    /// runs' log offsets (it writes the bytes there; under the lock, so that nothing retires
    /// space whose bytes are still being written), and count them as logged copies whose
    /// targets `flush` makes durable (the targets' bytes are already written). `None` when the
    /// log has no room for all of them now, has no space at all, or is pinned (nothing is
    /// logged then).
    ///
    /// # Errors
    /// `write`'s error (nothing is counted then; the space is given back at the next retire).
    pub(crate) fn log(
        &self,
        runs: &[LogRun<'_>],
        flush: &FlushFn,
        write: impl FnOnce(&[u64]) -> crate::Result<()>,
    ) -> crate::Result<Option<Vec<u64>>> {
        let mut i = self.inner.lock();
        let size = i.log.size;
        if size == 0 || !i.deferred_log.is_empty() {
            return Ok(None);
        }
        let mut head = i.log.head;
        let mut places = Vec::with_capacity(runs.len());
        let mut ends = Vec::with_capacity(runs.len());
        for r in runs {
            let n = r.bytes.len() as u64;
            if n == 0 || n > size {
                return Ok(None);
            }
            // A run never wraps: it starts over at the log's beginning instead.
            if head % size + n > size {
                head = head.next_multiple_of(size);
            }
            if head + n - i.log.tail > size {
                return Ok(None);
            }
            places.push(head % size);
            head += n;
            ends.push(head);
        }
        i.log.head = head;
        write(&places)?;
        for (r, end) in runs.iter().zip(ends) {
            i.log.unretired.push(Unretired {
                end,
                session: r.session,
                start: r.start,
                count: r.count,
                flush: Arc::clone(flush),
            });
        }
        Ok(Some(places))
    }

    /// Whether the copy log is more than half full and no retire is running: the caller
    /// should start one ([`Checked::retire`]), and it is counted as running from here.
    pub(crate) fn retire_due(&self) -> bool {
        let mut i = self.inner.lock();
        let due = i.log.size > 0
            && !i.log.retiring
            && (i.log.head - i.log.tail).saturating_mul(2) > i.log.size;
        if due {
            i.log.retiring = true;
        }
        due
    }

    /// Retire every logged copy counted so far: flush their targets (without the lock:
    /// writers go on logging meanwhile), then give their log space back. A copy whose target's
    /// flush fails keeps its T0 bytes where they are: its grains become deferred proofs that
    /// the log keeps ([`Checked::defer`]'s pinning), proven when the session's volumes are
    /// opened again, and the error is returned.
    ///
    /// # Errors
    /// The first flush error.
    pub(crate) fn retire(&self) -> crate::Result<()> {
        let (upto, flushes) = {
            let i = self.inner.lock();
            let Some(last) = i.log.unretired.last() else {
                drop(i);
                let mut i = self.inner.lock();
                i.log.retiring = false;
                // Nothing waits for a flush (a reset forgot them): the whole log is free.
                if i.log.unretired.is_empty() {
                    i.log.tail = i.log.head;
                }
                return Ok(());
            };
            let flushes: Vec<FlushFn> = distinct(i.log.unretired.iter().map(|u| &u.flush))
                .into_iter()
                .map(Arc::clone)
                .collect();
            (last.end, flushes)
        };
        let results: Vec<crate::Result<()>> = flushes.iter().map(|f| f()).collect();
        let mut i = self.inner.lock();
        i.log.retiring = false;
        // Everything up to `upto` was logged before the flushes started (space is taken and
        // counted under one hold of the lock), so those flushes covered its targets' bytes.
        let failed: Vec<&FlushFn> = flushes
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_err())
            .map(|(f, _)| f)
            .collect();
        let gone: Vec<Unretired> = {
            let (gone, kept) = std::mem::take(&mut i.log.unretired)
                .into_iter()
                .partition(|u| u.end <= upto);
            i.log.unretired = kept;
            gone
        };
        for u in gone {
            if failed.iter().any(|f| Arc::ptr_eq(f, &u.flush)) {
                defer_unflushed(&mut i, &u);
            }
        }
        i.log.tail = i.log.tail.max(upto);
        self.journal_len.store(i.journal.len(), Ordering::Release);
        results.into_iter().collect()
    }

    /// Forget the logged copies of `session` that wait for a retire (their targets' bytes
    /// were proven and flushed by other means).
    pub(crate) fn forget_unretired(&self, session: SessionId) {
        self.inner
            .lock()
            .log
            .unretired
            .retain(|u| u.session != session);
    }

    /// Whether committing `entries` needs the logged copies retired first: a `SetBits` over a
    /// grain whose logged copy is not retired (it confirms the grain: replay would no longer
    /// verify it), a session's completion or reverse restore while it has such copies (its
    /// target is then what its image and its restore read). The end of a session otherwise, a
    /// refresh or forgetting it drops its records too, but nothing reads those targets' T0
    /// bytes afterwards.
    pub(crate) fn needs_retire(&self, entries: &[Entry]) -> bool {
        let i = self.inner.lock();
        if i.log.unretired.is_empty() {
            return false;
        }
        let has = |session: SessionId| i.log.unretired.iter().any(|u| u.session == session);
        entries.iter().any(|e| match e {
            Entry::SetBits {
                session,
                start,
                count,
            } => i.log.unretired.iter().any(|u| {
                u.session == *session
                    && u.start < start.saturating_add(*count)
                    && *start < u.start + u.count
            }),
            Entry::SetState {
                session,
                state: crate::model::SessionState::Completed,
                ..
            }
            | Entry::Reverse { session } => has(*session),
            _ => false,
        })
    }
}

/// A logged copy `u` whose target's flush failed: its grains still named by the journal become
/// deferred proofs whose bytes the log keeps (the log is pinned until they are proven).
fn defer_unflushed(i: &mut Inner, u: &Unretired) {
    for g in u.start..u.start + u.count {
        if let Some((_, crc, log)) = i.journal.remove(&(u.session, g)) {
            i.deferred.insert((u.session, g), crc);
            if let Some(off) = log {
                i.deferred_log.insert((u.session, g), off);
            }
        }
    }
}

/// The distinct flush functions of `fs` (one target's flush once).
fn distinct<'a>(fs: impl Iterator<Item = &'a FlushFn>) -> Vec<&'a FlushFn> {
    let mut out: Vec<&FlushFn> = Vec::new();
    for f in fs {
        if !out.iter().any(|o| Arc::ptr_eq(o, f)) {
            out.push(f);
        }
    }
    out
}

/// Remove the keys of grains `g0..g1` of `session` from `m`.
fn remove_range<V>(m: &mut BTreeMap<(SessionId, u64), V>, session: SessionId, g0: u64, g1: u64) {
    let keys: Vec<_> = m
        .range((session, g0)..(session, g1))
        .map(|(k, _)| *k)
        .collect();
    for k in keys {
        m.remove(&k);
    }
}
