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
    /// (session, grain) -> (journal sequence of the record, CRC32C of the grain's bytes).
    journal: BTreeMap<(SessionId, u64), (u64, u32)>,
    /// (session, grain) -> CRC32C of a checked copy still to be verified (see the module doc).
    deferred: BTreeMap<(SessionId, u64), u32>,
    inflight: Vec<Inflight>,
    next_ticket: u64,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.inner.lock();
        f.debug_struct("Checked")
            .field("journal", &i.journal.len())
            .field("deferred", &i.deferred.len())
            .field("inflight", &i.inflight.len())
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
        for (&(_, g), &(_, crc)) in i.journal.range((session, 0)..=(session, u64::MAX)) {
            m.insert(g, crc);
        }
        m.into_iter().collect()
    }

    /// Keep `grains` (grain, CRC) of `session` to be verified when its volumes are back: they
    /// go into every checkpoint until then (see the module doc).
    pub(crate) fn defer(&self, session: SessionId, grains: &[(u64, u32)]) {
        let mut i = self.inner.lock();
        for &(g, crc) in grains {
            i.deferred.insert((session, g), crc);
            i.journal.remove(&(session, g));
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
        self.inner.lock().deferred.retain(|(s, _), _| *s != session);
    }

    /// Record what a durable entry (at journal sequence `seq`) means for checked grains: a
    /// `CopyChecked` names its grains; a `SetBits` confirms its grains; a session that ends,
    /// is forgotten, refreshed or restored needs none of its records verified any more (each
    /// of those waits for every copy in flight, whose targets are then durable).
    pub(crate) fn note(&self, e: &Entry, seq: u64, live_after: impl Fn(SessionId) -> bool) {
        let mut i = self.inner.lock();
        match e {
            Entry::CopyChecked {
                session,
                start,
                crcs,
            } => {
                for (k, crc) in crcs.iter().enumerate() {
                    i.journal.insert((*session, start + k as u64), (seq, *crc));
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
            }
            Entry::SetState { session, .. } if !live_after(*session) => {
                i.journal.retain(|(s, _), _| s != session);
                i.deferred.retain(|(s, _), _| s != session);
            }
            Entry::Forget { session }
            | Entry::Refresh { session, .. }
            | Entry::Reverse { session } => {
                i.journal.retain(|(s, _), _| s != session);
                i.deferred.retain(|(s, _), _| s != session);
            }
            _ => {}
        }
        self.journal_len.store(i.journal.len(), Ordering::Release);
    }

    /// Forget records older than `seq` (no replay reads them any more).
    pub(crate) fn prune_before(&self, seq: u64) {
        let mut i = self.inner.lock();
        i.journal.retain(|_, (s, _)| *s >= seq);
        self.journal_len.store(i.journal.len(), Ordering::Release);
    }

    /// Forget the records and deferred grains of `session` (recovery ended the session).
    pub(crate) fn clear_session(&self, session: SessionId) {
        let mut i = self.inner.lock();
        i.journal.retain(|(s, _), _| *s != session);
        i.deferred.retain(|(s, _), _| *s != session);
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
    pub(crate) fn for_checkpoint<T>(
        &self,
        f: impl FnOnce(&[(SessionId, u64, u64)], &BTreeMap<(SessionId, u64), u32>) -> T,
    ) -> crate::Result<T> {
        // Under the lock: no copy begins or settles meanwhile (a copy begins only after its
        // target bytes are written, so each flush here covers them).
        let i = self.inner.lock();
        for x in &i.inflight {
            (x.flush)()?;
        }
        let runs: Vec<_> = i
            .inflight
            .iter()
            .map(|x| (x.session, x.start, x.count))
            .collect();
        Ok(f(&runs, &i.deferred))
    }
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
