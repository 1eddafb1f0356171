//! Grain range locks: a writer, the copier or an image reader holds the grains it works on, so
//! that each grain is copied once and no source write slips between an image read's check and
//! its read. Waiters wait only for overlapping ranges.

use parking_lot::{Condvar, Mutex};

/// A set of held, non-overlapping half-open grain ranges.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    cv: Condvar,
}

/// Releases its range on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Wait until `start..end` overlaps no held range, then hold it.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        debug_assert!(start < end);
        let mut held = self.held.lock();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            self.cv.wait(&mut held);
        }
        held.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }

    /// Hold `start..end` if nothing overlapping is held.
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        self.try_acquire(start, end).then_some(RangeGuard {
            lock: self,
            range: (start, end),
        })
    }

    /// Hold `start..end` if nothing overlapping is held; the caller must release it with
    /// [`RangeLock::release`] (guards that outlive a borrow use this).
    pub(crate) fn try_acquire(&self, start: u64, end: u64) -> bool {
        let mut held = self.held.lock();
        if held.iter().any(|&(s, e)| s < end && start < e) {
            return false;
        }
        held.push((start, end));
        true
    }
}

impl RangeLock {
    /// Release a held range (used by guards that outlive a borrow).
    pub(crate) fn release(&self, start: u64, end: u64) {
        let mut held = self.held.lock();
        if let Some(p) = held.iter().position(|r| *r == (start, end)) {
            held.swap_remove(p);
        }
        drop(held);
        self.cv.notify_all();
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.range.0, self.range.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let l = Arc::new(RangeLock::default());
        let inside = Arc::new(AtomicU32::new(0));
        let mut hs = Vec::new();
        for t in 0..8u64 {
            let l = l.clone();
            let inside = inside.clone();
            hs.push(std::thread::spawn(move || {
                for _ in 0..200 {
                    let _g = l.lock(t % 2, t % 2 + 2);
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        let _a = l.lock(0, 1);
        assert!(l.try_lock(1, 2).is_some());
        assert!(l.try_lock(0, 2).is_none());
    }
}
