//! Write-back of source writes ([`EngineOptions::write_back`](super::EngineOptions)): a write
//! that needs copy-before-write copies the grain's T0 bytes to the target at once, but the
//! target's flush, the table commit and the source write itself wait for the volume's next
//! durability point ([`Engine::flush`], an NBD `FLUSH` or FUA write, `fsync` on a mounted file)
//! or for the held bytes to reach [`HELD_BYTES_MAX`](crate::limits::HELD_BYTES_MAX). Until then
//! the write is held in memory, and every read of the volume through the engine sees it.
//!
//! This is the contract every block device with a volatile cache offers, and the one
//! [`Engine::write`] states ("durable only after [`Engine::flush`]"): a crash loses held writes,
//! which were never promised durable, and never the T0 image. The order of a drain is the
//! synchronous path's order for every held write at once, so the crash-model rules hold
//! unchanged:
//!
//! 1. flush every target that received T0 bytes (rule 2's "T0 bytes durable on the target");
//! 2. commit the copied bits and change marks of every held write in one table commit
//!    (rule 2's "bits durable"; rule 9: marks before the writes they cover);
//! 3. issue the held source writes in the order they were acknowledged.
//!
//! Many first writes thus share one target flush and one table commit, which is what makes
//! first writes through NBD as fast as an export that persists nothing.
//!
//! # Invariants
//!
//! * A grain of a session whose T0 bytes a held write copied is *pending*: its target holds the
//!   T0 bytes, its bit is not set. The background copier skips pending grains (the drain
//!   commits them) and a second write to one does not copy it again. A grain is pending from
//!   the push (under the writer's grain lock) until its bit is committed, so a copier that holds
//!   a grain which is neither copied nor pending knows that no held write covers it: the source
//!   still holds its T0 bytes. A drain sets a grain's bit, then stops holding it pending,
//!   then writes the source: so whoever holds a grain looks at *pending first, then the bit*
//!   (in the other order a drain between the two looks shows a grain as neither, and its "T0
//!   bytes" would be read from a source that holds the new ones). Tests force that
//!   interleaving with the `fault` feature's pause hook.
//! * A source range covered by a held write is written on disk only by a drain, after the bits
//!   of every grain it covers are durable. A later write to an overlapping range is held too
//!   (behind it), so the drain's writes never land over newer bytes.
//! * Nothing is held for a volume that is the target of a session (its image reads the volume
//!   directly), and nothing while a reverse restore runs; establish, refresh, withdraw and
//!   reverse drain their volumes under the write gates, so a new T0 includes every acknowledged
//!   write.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rustc_hash::{FxHashMap, FxHashSet};

use super::VolumeHandle;
use crate::ids::SessionId;
use crate::model::Entry;
use crate::session::Session;

/// log2 of the granule of the overlap index (64 KiB).
const CHUNK_SHIFT: u32 = 16;

/// A run of grains of one session whose T0 bytes a held write copied to the target.
#[derive(Debug, Clone)]
pub(crate) struct Copied {
    pub(crate) session: Arc<Session>,
    pub(crate) g0: u64,
    pub(crate) g1: u64,
    pub(crate) target: Arc<VolumeHandle>,
}

/// One held source write.
#[derive(Debug, Clone)]
pub(crate) struct HeldWrite {
    pub(crate) offset: u64,
    pub(crate) data: Arc<[u8]>,
}

#[derive(Debug, Default)]
struct Held {
    /// In acknowledgement order.
    writes: VecDeque<HeldWrite>,
    /// 64 KiB chunk -> held writes touching it.
    chunks: FxHashMap<u64, u32>,
    copies: VecDeque<Copied>,
    /// Grains in `copies`, by session.
    pending: FxHashSet<(SessionId, u64)>,
    marks: VecDeque<Entry>,
    bytes: usize,
}

/// What a drain takes from the front of the held state: the first `writes`, `copies` and
/// `marks` entries at the time it looked.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) writes: Vec<HeldWrite>,
    pub(crate) copies: Vec<Copied>,
    pub(crate) marks: Vec<Entry>,
}

impl Snapshot {
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.copies.is_empty() && self.marks.is_empty()
    }
}

/// The writes held for one volume (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct WriteBack {
    held: RwLock<Held>,
    /// Held writes, copies and marks (read without the lock by the fast paths).
    count: AtomicUsize,
    /// Held bytes.
    bytes: AtomicUsize,
    /// One drain at a time.
    pub(crate) draining: Mutex<()>,
    /// Set when a drain failed before its commit: a failed target flush may have dropped the
    /// T0 bytes the held writes copied, so the next drain copies the pending grains again (the
    /// source still holds their T0 bytes: their writes are held) before it flushes.
    pub(crate) recopy: std::sync::atomic::AtomicBool,
}

fn chunks_of(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    let last = offset + len.max(1) - 1;
    (offset >> CHUNK_SHIFT)..=(last >> CHUNK_SHIFT)
}

fn overlaps(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    a_off < b_off + b_len && b_off < a_off + a_len
}

impl WriteBack {
    /// Whether anything is held.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Bytes of source writes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Whether a held write may overlap `offset..offset + len` (false positives possible at
    /// 64 KiB granularity, never false negatives).
    pub(crate) fn may_overlap(&self, offset: u64, len: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        let h = self.held.read();
        chunks_of(offset, len).any(|c| h.chunks.contains_key(&c))
    }

    /// Whether any grain of `session` among `g0..g1` is pending (one lock hold, no allocation).
    pub(crate) fn any_pending_in(&self, session: SessionId, g0: u64, g1: u64) -> bool {
        if self.is_empty() {
            return false;
        }
        let h = self.held.read();
        (g0..g1).any(|g| h.pending.contains(&(session, g)))
    }

    /// The pending grains of `session` among `g0..g1`, as a predicate over one lock hold.
    pub(crate) fn pending_in(&self, session: SessionId, g0: u64, g1: u64) -> Vec<bool> {
        if self.is_empty() {
            return vec![false; usize::try_from(g1 - g0).unwrap_or(0)];
        }
        let h = self.held.read();
        (g0..g1)
            .map(|g| h.pending.contains(&(session, g)))
            .collect()
    }

    /// Hold a write with the copies and marks it needs. Returns whether the held writes now
    /// pass [`HELD_BYTES_MAX`](crate::limits::HELD_BYTES_MAX) or
    /// [`HELD_WRITES_MAX`](crate::limits::HELD_WRITES_MAX) (the caller drains them).
    pub(crate) fn push(
        &self,
        offset: u64,
        data: &[u8],
        copies: Vec<Copied>,
        marks: Vec<Entry>,
    ) -> bool {
        let mut h = self.held.write();
        for c in &copies {
            for g in c.g0..c.g1 {
                h.pending.insert((c.session.id(), g));
            }
        }
        let added = 1 + copies.len() + marks.len();
        h.copies.extend(copies);
        h.marks.extend(marks);
        for c in chunks_of(offset, data.len() as u64) {
            *h.chunks.entry(c).or_default() += 1;
        }
        h.bytes += data.len();
        h.writes.push_back(HeldWrite {
            offset,
            data: Arc::from(data),
        });
        self.bytes.store(h.bytes, Ordering::Release);
        self.count.fetch_add(added, Ordering::AcqRel);
        h.bytes > crate::limits::HELD_BYTES_MAX || h.writes.len() > crate::limits::HELD_WRITES_MAX
    }

    /// Everything held now (the drain removes exactly this with [`WriteBack::remove`]).
    pub(crate) fn snapshot(&self) -> Snapshot {
        let h = self.held.read();
        Snapshot {
            writes: h.writes.iter().cloned().collect(),
            copies: h.copies.iter().cloned().collect(),
            marks: h.marks.iter().cloned().collect(),
        }
    }

    /// Forget the copies of a snapshot once their bits are durable (a drain calls this between
    /// its commit and its source writes: the grains are no longer pending, they are copied).
    pub(crate) fn committed(&self, snap: &Snapshot) {
        let mut h = self.held.write();
        for c in h.copies.drain(..snap.copies.len()).collect::<Vec<_>>() {
            for g in c.g0..c.g1 {
                h.pending.remove(&(c.session.id(), g));
            }
        }
        h.marks.drain(..snap.marks.len());
        self.count
            .fetch_sub(snap.copies.len() + snap.marks.len(), Ordering::AcqRel);
    }

    /// Forget the writes of a snapshot once they are on the volume.
    pub(crate) fn written(&self, snap: &Snapshot) {
        let mut h = self.held.write();
        for w in h.writes.drain(..snap.writes.len()).collect::<Vec<_>>() {
            for c in chunks_of(w.offset, w.data.len() as u64) {
                if let Some(n) = h.chunks.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        h.chunks.remove(&c);
                    }
                }
            }
            h.bytes -= w.data.len();
        }
        self.bytes.store(h.bytes, Ordering::Release);
        self.count.fetch_sub(snap.writes.len(), Ordering::AcqRel);
    }

    /// Read `buf` at `offset` through the held writes: `read` fills it from the volume, then
    /// every held write overlapping it is laid over it in order. The lock is held across the
    /// volume read, so a drain cannot move a write from memory to the volume in between.
    pub(crate) fn read_through(
        &self,
        offset: u64,
        buf: &mut [u8],
        read: impl FnOnce(&mut [u8]) -> crate::Result<()>,
    ) -> crate::Result<()> {
        let len = buf.len() as u64;
        let h = self.held.read();
        if !chunks_of(offset, len).any(|c| h.chunks.contains_key(&c)) {
            drop(h);
            return read(buf);
        }
        read(buf)?;
        for w in &h.writes {
            let wl = w.data.len() as u64;
            if !overlaps(offset, len, w.offset, wl) {
                continue;
            }
            let start = offset.max(w.offset);
            let end = (offset + len).min(w.offset + wl);
            let (b0, w0) = (
                usize::try_from(start - offset).unwrap_or(0),
                usize::try_from(start - w.offset).unwrap_or(0),
            );
            let n = usize::try_from(end - start).unwrap_or(0);
            buf[b0..b0 + n].copy_from_slice(&w.data[w0..w0 + n]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lay_held_writes_over_the_volume_in_order() {
        let wb = WriteBack::default();
        assert!(wb.is_empty());
        wb.push(100, &[1; 50], Vec::new(), Vec::new());
        wb.push(120, &[2; 10], Vec::new(), Vec::new());
        assert!(wb.may_overlap(0, 101));
        assert!(!wb.may_overlap(1 << 20, 10));
        let mut buf = [9u8; 200];
        wb.read_through(50, &mut buf, |b| {
            b.fill(7);
            Ok(())
        })
        .unwrap();
        assert_eq!(buf[..50], [7; 50]);
        assert_eq!(buf[50..70], [1; 20]);
        assert_eq!(buf[70..80], [2; 10]);
        assert_eq!(buf[80..100], [1; 20]);
        assert_eq!(buf[100..], [7; 100]);
        let snap = wb.snapshot();
        assert_eq!(snap.writes.len(), 2);
        wb.push(0, &[3; 4], Vec::new(), Vec::new());
        wb.committed(&snap);
        wb.written(&snap);
        // The write held after the snapshot stays.
        assert!(!wb.is_empty());
        assert_eq!(wb.bytes(), 4);
        assert!(!wb.may_overlap(100, 50) || wb.may_overlap(0, 4));
        let snap = wb.snapshot();
        wb.committed(&snap);
        wb.written(&snap);
        assert!(wb.is_empty());
        assert_eq!(wb.bytes(), 0);
        assert!(!wb.may_overlap(0, 1 << 20));
    }
}
