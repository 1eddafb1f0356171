//! The atomic copied-bitmap: one bit per grain, lock-free test, set only by the table's commit
//! leader after the bits are durable.
//!
//! Hand-written over `AtomicU64` words rather than `bitvec`, because the hot path needs a single
//! `Acquire` load per test and a bulk range set with `fetch_or`, which `bitvec`'s atomic slices
//! do not expose as directly. An incremental session's change map is the same type for the same
//! reason: every write through the engine tests it without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-length bitmap of atomically updated bits.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    len: u64,
}

impl AtomicBitmap {
    /// All bits clear.
    #[must_use]
    pub fn new(len: u64) -> Self {
        let n = usize::try_from(len.div_ceil(64)).unwrap_or(0);
        AtomicBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Rebuild from the on-disk byte form (bit `i` is bit `i % 8` of byte `i / 8`). Bits past
    /// `len` are ignored.
    #[must_use]
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Self {
        let b = Self::new(len);
        for (wi, w) in b.words.iter().enumerate() {
            let mut v = [0u8; 8];
            let start = wi * 8;
            let end = (start + 8).min(bytes.len());
            if start < end {
                v[..end - start].copy_from_slice(&bytes[start..end]);
            }
            w.store(u64::from_le_bytes(v), Ordering::Relaxed);
        }
        b.clear_tail();
        b
    }

    fn clear_tail(&self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(last) = self.words.last() {
                last.fetch_and((1u64 << rem) - 1, Ordering::Relaxed);
            }
        }
    }

    /// The on-disk byte form, `ceil(len / 8)` bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out.truncate(usize::try_from(self.len.div_ceil(8)).unwrap_or(0));
        out
    }

    /// Number of bits.
    #[must_use]
    #[allow(
        clippy::len_without_is_empty,
        reason = "a bitmap has its session's grain count, never zero"
    )]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Test bit `i`. Out-of-range bits read as set (nothing to copy there).
    #[must_use]
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return true;
        }
        let w = self.words[(i / 64) as usize].load(Ordering::Acquire);
        w & (1u64 << (i % 64)) != 0
    }

    /// True when every bit in `start..start+count` is set.
    #[must_use]
    pub fn all_set(&self, start: u64, count: u64) -> bool {
        self.word_masks(start, count)
            .all(|(wi, mask)| self.words[wi].load(Ordering::Acquire) & mask == mask)
    }

    /// How many bits in `start..start+count` are set (clipped to the bitmap).
    #[must_use]
    pub fn count_set(&self, start: u64, count: u64) -> u64 {
        self.word_masks(start, count)
            .map(|(wi, mask)| {
                u64::from((self.words[wi].load(Ordering::Acquire) & mask).count_ones())
            })
            .sum()
    }

    /// Set bits `start..start+count`; returns how many were newly set.
    pub fn set_range(&self, start: u64, count: u64) -> u64 {
        self.word_masks(start, count)
            .map(|(wi, mask)| {
                let old = self.words[wi].fetch_or(mask, Ordering::AcqRel);
                u64::from((mask & !old).count_ones())
            })
            .sum()
    }

    /// Set every bit; returns how many were newly set.
    pub fn set_all(&self) -> u64 {
        self.set_range(0, self.len)
    }

    /// Clear every bit that is set in `mask` (a bitmap of the same length); returns how many
    /// were cleared. Not atomic as a whole: the caller excludes concurrent setters.
    pub fn clear_where(&self, mask: &AtomicBitmap) -> u64 {
        self.words
            .iter()
            .zip(&mask.words)
            .map(|(w, m)| {
                let m = m.load(Ordering::Acquire);
                let old = w.fetch_and(!m, Ordering::AcqRel);
                u64::from((old & m).count_ones())
            })
            .sum()
    }

    /// Clear bits `start..start+count`; returns how many were set before.
    pub fn clear_range(&self, start: u64, count: u64) -> u64 {
        self.word_masks(start, count)
            .map(|(wi, mask)| {
                let old = self.words[wi].fetch_and(!mask, Ordering::AcqRel);
                u64::from((old & mask).count_ones())
            })
            .sum()
    }

    /// Make this bitmap a copy of `src` (same length), kept only where `mask` (same length)
    /// is set, when given; returns how many bits are set. Not atomic as a whole: the caller
    /// excludes concurrent setters of all three.
    pub fn assign(&self, src: &AtomicBitmap, mask: Option<&AtomicBitmap>) -> u64 {
        let mut n = 0;
        for (i, w) in self.words.iter().enumerate() {
            let mut v = src.words.get(i).map_or(0, |x| x.load(Ordering::Acquire));
            if let Some(m) = mask {
                v &= m.words.get(i).map_or(0, |x| x.load(Ordering::Acquire));
            }
            w.store(v, Ordering::Release);
            n += u64::from(v.count_ones());
        }
        n
    }

    /// First set bit at or after `from`.
    #[must_use]
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let wi = (i / 64) as usize;
            let w = self.words[wi].load(Ordering::Acquire) & (u64::MAX << (i % 64));
            if w != 0 {
                let bit = (wi as u64) * 64 + u64::from(w.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (wi as u64 + 1) * 64;
        }
        None
    }

    /// Length of the run of set bits starting at `from`, at most `max`.
    #[must_use]
    pub fn set_run(&self, from: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max && from + n < self.len && self.get(from + n) {
            n += 1;
        }
        n
    }

    /// Clear every bit.
    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    /// The (word index, bit mask) pairs covering bits `start..start+count` (clipped to the
    /// bitmap).
    fn word_masks(&self, start: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
        let end = start.saturating_add(count).min(self.len);
        let mut i = start;
        std::iter::from_fn(move || {
            if i >= end {
                return None;
            }
            let lo = i % 64;
            let base = i - lo;
            let hi = (end - base).min(64);
            let mask = if hi == 64 {
                u64::MAX << lo
            } else {
                ((1u64 << hi) - 1) & (u64::MAX << lo)
            };
            i = base + 64;
            Some((usize::try_from(base / 64).unwrap_or(usize::MAX), mask))
        })
    }

    /// Number of set bits.
    #[must_use]
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// First clear bit at or after `from`.
    #[must_use]
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let wi = (i / 64) as usize;
            let w = self.words[wi].load(Ordering::Acquire) | ((1u64 << (i % 64)) - 1);
            if w != u64::MAX {
                let bit = (wi as u64) * 64 + u64::from((!w).trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            i = (wi as u64 + 1) * 64;
        }
        None
    }

    /// Length of the run of clear bits starting at `from`, at most `max`.
    #[must_use]
    pub fn clear_run(&self, from: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max && from + n < self.len && !self.get(from + n) {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_model(len in 1u64..300, ops in proptest::collection::vec((0u64..300, 0u64..80), 0..20)) {
            let b = AtomicBitmap::new(len);
            let mut model = vec![false; len as usize];
            for (s, c) in ops {
                let mut expect_new = 0;
                for i in s..(s + c).min(len) {
                    if !model[i as usize] { expect_new += 1; model[i as usize] = true; }
                }
                prop_assert_eq!(b.set_range(s, c), expect_new);
            }
            for i in 0..len {
                prop_assert_eq!(b.get(i), model[i as usize]);
            }
            prop_assert_eq!(b.count_ones(), model.iter().filter(|x| **x).count() as u64);
            let first_clear = model.iter().position(|x| !*x).map(|p| p as u64);
            prop_assert_eq!(b.next_clear(0), first_clear);
            let rt = AtomicBitmap::from_bytes(len, &b.to_bytes());
            let all = AtomicBitmap::new(len);
            prop_assert_eq!(all.set_all(), len);
            prop_assert_eq!(all.clear_where(&b), b.count_ones());
            for i in 0..len { prop_assert_eq!(all.get(i), !model[i as usize]); }
            all.clear_all();
            prop_assert_eq!(all.count_ones(), 0);
            for i in 0..len { prop_assert_eq!(rt.get(i), model[i as usize]); }
            for s in 0..len {
                let c = 7.min(len - s);
                let all = (s..s + c).all(|i| model[i as usize]);
                prop_assert_eq!(b.all_set(s, c), all);
            }
        }

        /// `clear_range`, `assign`, `next_set` and `set_run` against a vector of booleans.
        #[test]
        fn clear_assign_and_runs_match_model(
            len in 1u64..300,
            set in proptest::collection::vec((0u64..300, 0u64..80), 0..10),
            mask in proptest::collection::vec((0u64..300, 0u64..80), 0..10),
            clear in proptest::collection::vec((0u64..300, 0u64..80), 0..10),
        ) {
            let fill = |ops: &[(u64, u64)]| {
                let b = AtomicBitmap::new(len);
                let mut m = vec![false; len as usize];
                for &(s, c) in ops {
                    b.set_range(s, c);
                    for i in s..(s + c).min(len) { m[i as usize] = true; }
                }
                (b, m)
            };
            let (src, src_m) = fill(&set);
            let (msk, msk_m) = fill(&mask);
            let dst = AtomicBitmap::new(len);
            dst.set_all();
            let want: Vec<bool> = (0..len as usize).map(|i| src_m[i] && msk_m[i]).collect();
            prop_assert_eq!(dst.assign(&src, Some(&msk)), want.iter().filter(|x| **x).count() as u64);
            let mut model = want;
            for (s, c) in clear {
                let was = (s..(s + c).min(len)).filter(|i| model[*i as usize]).count() as u64;
                for i in s..(s + c).min(len) { model[i as usize] = false; }
                prop_assert_eq!(dst.clear_range(s, c), was);
            }
            for from in 0..len {
                let next = (from..len).find(|i| model[*i as usize]);
                prop_assert_eq!(dst.next_set(from), next);
                let run = (from..len).take_while(|i| model[*i as usize]).take(9).count() as u64;
                prop_assert_eq!(dst.set_run(from, 9), run);
            }
            prop_assert_eq!(dst.assign(&src, None), src.count_ones());
        }
    }
}
