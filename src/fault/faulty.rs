//! Fault injection on any volume: [`FaultyVolume`] wraps a real [`Volume`] (a file, a block
//! device, a user's own backend) and injects the faults of a [`FaultPlan`], and simulates a
//! crash by forgetting every write no successful flush covered.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::sim::SECTOR;
use crate::volume::{check_range, Volume, VolumeInfo};
use crate::{Error, Result};

/// `EIO`: the default error of an injected fault.
const EIO: i32 = 5;
/// `ENOSPC`: the error of a write past [`FaultPlan::enospc_beyond`].
const ENOSPC: i32 = 28;

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedError {
    /// An operating-system error number (`raw_os_error()` is `Some(n)`).
    Errno(i32),
    /// An error of this kind (no OS error number), with the message `injected fault`.
    Kind(std::io::ErrorKind),
}

impl InjectedError {
    fn io_error(self) -> std::io::Error {
        match self {
            InjectedError::Errno(n) => std::io::Error::from_raw_os_error(n),
            InjectedError::Kind(k) => std::io::Error::new(k, "injected fault"),
        }
    }
}

/// Which calls of one kind (reads, writes or flushes) a fault hits, and what they return.
///
/// Calls are numbered from 0 per kind, over the whole life of the [`FaultyVolume`] (see
/// [`FaultyVolume::counts`]): `Trigger::once(3)` hits the fourth call only,
/// `Trigger::forever(3)` the fourth and every later one. The error is `EIO` unless
/// [`Trigger::kind`] or [`Trigger::errno`] chose another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trigger {
    index: u64,
    forever: bool,
    error: InjectedError,
}

impl Trigger {
    /// The call with 0-based index `index` only.
    #[must_use]
    pub fn once(index: u64) -> Self {
        Trigger {
            index,
            forever: false,
            error: InjectedError::Errno(EIO),
        }
    }

    /// The call with 0-based index `index` and every later one.
    #[must_use]
    pub fn forever(index: u64) -> Self {
        Trigger {
            forever: true,
            ..Trigger::once(index)
        }
    }

    /// Fail with an error of this kind instead of `EIO` (no OS error number).
    #[must_use]
    pub fn kind(mut self, kind: std::io::ErrorKind) -> Self {
        self.error = InjectedError::Kind(kind);
        self
    }

    /// Fail with this OS error number instead of `EIO`.
    #[must_use]
    pub fn errno(mut self, errno: i32) -> Self {
        self.error = InjectedError::Errno(errno);
        self
    }

    /// The error it returns.
    #[must_use]
    pub fn error(&self) -> InjectedError {
        self.error
    }

    /// Whether it hits the call with 0-based index `n`.
    #[must_use]
    pub fn hits(&self, n: u64) -> bool {
        n == self.index || (self.forever && n > self.index)
    }
}

/// The faults a [`FaultyVolume`] injects. The default plan injects nothing.
///
/// What each fault does (a write is checked in this order; the first that applies decides):
/// 1. [`FaultPlan::fail_write`]: the write returns the trigger's error; nothing is written.
/// 2. [`FaultPlan::enospc_beyond`]: a write whose end (`offset + len`) is past the limit
///    returns `ENOSPC`; nothing is written (not even the part below the limit).
/// 3. [`FaultPlan::tear_write`]: the write is cut at a 512-byte boundary of the device
///    (a multiple of 512 strictly inside the written range, chosen by the seed and the write's
///    index): the bytes before the cut are written, the rest are not, and the trigger's error is
///    returned. A write that lies within one 512-byte sector has no such boundary (a sector is
///    written whole or not at all): nothing is written and the error is returned.
///
/// A read hit by [`FaultPlan::fail_read`] returns the error and leaves the buffer untouched. A
/// flush hit by [`FaultPlan::fail_flush`] returns the error without flushing the inner volume:
/// the writes it should have covered stay unflushed (a later [`FaultyVolume::crash`] may drop
/// them). Out-of-range requests are refused with [`Error::OutOfRange`] before any fault applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    fail_read: Option<Trigger>,
    fail_write: Option<Trigger>,
    fail_flush: Option<Trigger>,
    enospc_beyond: Option<u64>,
    tear_write: Option<(Trigger, u64)>,
}

impl FaultPlan {
    /// A plan that injects nothing.
    #[must_use]
    pub fn new() -> Self {
        FaultPlan::default()
    }

    /// Fail the reads `trigger` hits.
    #[must_use]
    pub fn fail_read(mut self, trigger: Trigger) -> Self {
        self.fail_read = Some(trigger);
        self
    }

    /// Fail the writes `trigger` hits (nothing written).
    #[must_use]
    pub fn fail_write(mut self, trigger: Trigger) -> Self {
        self.fail_write = Some(trigger);
        self
    }

    /// Fail the flushes `trigger` hits (the inner volume is not flushed).
    #[must_use]
    pub fn fail_flush(mut self, trigger: Trigger) -> Self {
        self.fail_flush = Some(trigger);
        self
    }

    /// Refuse with `ENOSPC` every write that reaches past `limit` bytes (nothing written), as
    /// a thin-provisioned device that ran out of space would.
    #[must_use]
    pub fn enospc_beyond(mut self, limit: u64) -> Self {
        self.enospc_beyond = Some(limit);
        self
    }

    /// Tear the writes `trigger` hits at a 512-byte boundary chosen by `seed` (and the write's
    /// index); they return the trigger's error.
    #[must_use]
    pub fn tear_write(mut self, trigger: Trigger, seed: u64) -> Self {
        self.tear_write = Some((trigger, seed));
        self
    }

    /// True when the plan injects nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == FaultPlan::default()
    }
}

/// Calls a [`FaultyVolume`] has seen, failed ones included (the reads it makes itself to keep
/// its crash shadow are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// `read_at` calls.
    pub reads: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// Faults injected (failed, refused or torn calls), all kinds together.
    pub injected: u64,
}

/// Which unflushed writes a simulated crash loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every 512-byte sector written since the last successful flush goes back to what it held
    /// then.
    DropAll,
    /// Each such sector independently goes back or keeps its new bytes (a coin flip from
    /// `seed`, sectors in address order): the same seed gives the same image.
    Random {
        /// Seed of the coin flips.
        seed: u64,
    },
}

#[derive(Debug)]
struct State {
    plan: FaultPlan,
    counts: FaultCounts,
    track: bool,
    /// Sector index -> its bytes at the last successful flush, for every sector written since.
    durable: BTreeMap<u64, Vec<u8>>,
}

/// A [`Volume`] decorator that injects faults into any volume (see [`FaultPlan`] for what
/// each fault does) and simulates crashes.
///
/// Crash shadow: before a write reaches the inner volume, the bytes of every 512-byte sector
/// it touches that no earlier write since the last successful flush touched are read from the
/// inner volume and kept; a successful flush forgets them (they are durable now). A failed
/// flush forgets nothing. [`FaultyVolume::crash`] writes the kept bytes of the sectors a
/// [`CrashMode`] drops back to the inner volume and flushes it: the inner volume then holds what
/// it would after a power loss; [`FaultyVolume::crash_image`] returns that image without
/// changing anything. The shadow costs one extra read per write (of the sectors not yet kept)
/// and 512 bytes of memory per sector written since the last flush;
/// [`FaultyVolume::track_crash`] turns it off. A crash is meant to happen with no call in
/// flight, as a power cut between calls.
///
/// Writes and flushes are serialised (the lock that keeps the shadow exact is held across the
/// inner call); reads are not. With an empty plan, every call returns what the inner volume
/// returns and the inner volume ends up with the same bytes.
///
/// ```
/// use timezero::fault::{CrashMode, FaultPlan, FaultyVolume, Trigger};
/// use timezero::{MemVolume, Volume};
///
/// let v = FaultyVolume::new(MemVolume::new("disk", 4096));
/// v.write_at(0, &[1u8; 512])?;
/// v.flush()?;
/// v.write_at(0, &[2u8; 512])?; // never flushed
///
/// // The next write (index 2) fails with EIO and writes nothing.
/// v.arm(FaultPlan::new().fail_write(Trigger::once(2)));
/// let e = v.write_at(512, &[3u8; 512]).unwrap_err();
/// assert!(matches!(&e, timezero::Error::Io { source, .. } if source.raw_os_error() == Some(5)));
/// assert_eq!(v.counts().writes, 3);
///
/// // Power loss: the unflushed write is gone.
/// v.crash(CrashMode::DropAll)?;
/// let mut buf = [0u8; 512];
/// v.read_at(0, &mut buf)?;
/// assert_eq!(buf, [1u8; 512]);
/// # Ok::<(), timezero::Error>(())
/// ```
#[derive(Debug)]
pub struct FaultyVolume<V> {
    inner: V,
    state: Mutex<State>,
}

impl<V: Volume> FaultyVolume<V> {
    /// Wrap `inner` with no fault armed and the crash shadow on.
    #[must_use]
    pub fn new(inner: V) -> Self {
        Self::with_plan(inner, FaultPlan::default())
    }

    /// Wrap `inner` with `plan` armed and the crash shadow on.
    #[must_use]
    pub fn with_plan(inner: V, plan: FaultPlan) -> Self {
        FaultyVolume {
            inner,
            state: Mutex::new(State {
                plan,
                counts: FaultCounts::default(),
                track: true,
                durable: BTreeMap::new(),
            }),
        }
    }

    /// Keep the crash shadow (default) or not; without it [`FaultyVolume::crash`] and
    /// [`FaultyVolume::crash_image`] return [`Error::Invalid`]. Turning it off forgets it.
    #[must_use]
    pub fn track_crash(self, on: bool) -> Self {
        {
            let mut st = self.state.lock();
            st.track = on;
            if !on {
                st.durable.clear();
            }
        }
        self
    }

    /// Replace the fault plan (the counters go on: triggers count calls from the volume's
    /// creation).
    pub fn arm(&self, plan: FaultPlan) {
        self.state.lock().plan = plan;
    }

    /// Remove every fault.
    pub fn disarm(&self) {
        self.arm(FaultPlan::default());
    }

    /// The plan armed now.
    #[must_use]
    pub fn plan(&self) -> FaultPlan {
        self.state.lock().plan.clone()
    }

    /// Calls seen so far.
    #[must_use]
    pub fn counts(&self) -> FaultCounts {
        self.state.lock().counts
    }

    /// 512-byte sectors written since the last successful flush (what a crash may lose).
    #[must_use]
    pub fn unflushed_sectors(&self) -> usize {
        self.state.lock().durable.len()
    }

    /// The wrapped volume.
    #[must_use]
    pub fn inner(&self) -> &V {
        &self.inner
    }

    /// Unwrap the volume.
    #[must_use]
    pub fn into_inner(self) -> V {
        self.inner
    }

    /// Simulate a power loss: the sectors `mode` drops go back to their bytes at the last
    /// successful flush, on the inner volume, which is then flushed; the shadow starts empty
    /// (the surviving state is durable). The plan and counters are kept. Returns how many
    /// sectors went back.
    ///
    /// # Errors
    /// [`Error::Invalid`] without the crash shadow; the inner volume's errors (then the shadow
    /// is kept and the crash may be tried again).
    pub fn crash(&self, mode: CrashMode) -> Result<u64> {
        let mut st = self.state.lock();
        if !st.track {
            return Err(no_shadow());
        }
        let dropped = dropped_sectors(&st.durable, mode);
        let mut i = 0;
        while i < dropped.len() {
            // Write runs of adjacent sectors back in one call.
            let start = dropped[i];
            let mut run = st.durable.get(&start).cloned().unwrap_or_default();
            let mut j = i + 1;
            while j < dropped.len() && dropped[j] == dropped[j - 1] + 1 {
                run.extend_from_slice(st.durable.get(&dropped[j]).map_or(&[][..], |v| v));
                j += 1;
            }
            self.inner.write_at(start * SECTOR as u64, &run)?;
            i = j;
        }
        self.inner.flush()?;
        st.durable.clear();
        Ok(dropped.len() as u64)
    }

    /// The whole inner volume as a crash in `mode` would leave it (the same image
    /// [`FaultyVolume::crash`] with the same mode writes back), changing nothing.
    ///
    /// # Errors
    /// [`Error::Invalid`] without the crash shadow or for a volume too large for memory; the
    /// inner volume's read errors.
    pub fn crash_image(&self, mode: CrashMode) -> Result<Vec<u8>> {
        let st = self.state.lock();
        if !st.track {
            return Err(no_shadow());
        }
        let size = usize::try_from(self.inner.size())
            .map_err(|_| Error::invalid("crash image", "volume too large for memory"))?;
        let mut img = vec![0u8; size];
        self.inner.read_at(0, &mut img)?;
        for s in dropped_sectors(&st.durable, mode) {
            if let Some(bytes) = st.durable.get(&s) {
                let at = usize::try_from(s)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(SECTOR);
                if let Some(dst) = img.get_mut(at..at.saturating_add(bytes.len())) {
                    dst.copy_from_slice(bytes);
                }
            }
        }
        Ok(img)
    }

    fn injected(&self, op: &'static str, offset: u64, e: InjectedError) -> Error {
        Error::io(
            op,
            format!("{} (injected fault)", self.inner.info().locator),
            offset,
            e.io_error(),
        )
    }

    /// Keep the bytes at the last flush of every sector of `offset..offset+len` not kept yet.
    fn keep_durable(&self, st: &mut State, offset: u64, len: u64) -> Result<()> {
        let size = self.inner.size();
        let s0 = offset / SECTOR as u64;
        let s1 = (offset + len).div_ceil(SECTOR as u64);
        // The first and last sectors not kept yet bound the one read made.
        let Some(first) = (s0..s1).find(|s| !st.durable.contains_key(s)) else {
            return Ok(());
        };
        let last = (first..s1)
            .rev()
            .find(|s| !st.durable.contains_key(s))
            .unwrap_or(first);
        let from = first * SECTOR as u64;
        let to = ((last + 1) * SECTOR as u64).min(size);
        let n = usize::try_from(to - from).map_err(|_| Error::invalid("write", "too large"))?;
        let mut old = vec![0u8; n];
        self.inner.read_at(from, &mut old)?;
        for (k, chunk) in old.chunks(SECTOR).enumerate() {
            st.durable
                .entry(first + k as u64)
                .or_insert_with(|| chunk.to_vec());
        }
        Ok(())
    }
}

fn no_shadow() -> Error {
    Error::invalid(
        "crash",
        "the crash shadow is off (FaultyVolume::track_crash)",
    )
}

/// The sectors (in address order) a crash in `mode` sends back to their flushed bytes.
fn dropped_sectors(durable: &BTreeMap<u64, Vec<u8>>, mode: CrashMode) -> Vec<u64> {
    match mode {
        CrashMode::DropAll => durable.keys().copied().collect(),
        CrashMode::Random { seed } => {
            let mut rng = SmallRng::seed_from_u64(seed);
            durable
                .keys()
                .copied()
                .filter(|_| rng.random_bool(0.5))
                .collect()
        }
    }
}

/// How many bytes of a torn write of `len` bytes at `offset` reach the device: the distance to
/// a multiple of [`SECTOR`] strictly inside the range, chosen by `seed`, or 0 when there is none.
fn torn_len(offset: u64, len: usize, seed: u64) -> usize {
    let sector = SECTOR as u64;
    let end = offset + len as u64;
    let first = (offset / sector + 1) * sector;
    if first >= end {
        return 0;
    }
    let boundaries = (end - 1 - first) / sector + 1;
    let k = SmallRng::seed_from_u64(seed).random_range(0..boundaries);
    usize::try_from(first + k * sector - offset).unwrap_or(0)
}

impl<V: Volume> Volume for FaultyVolume<V> {
    fn info(&self) -> VolumeInfo {
        self.inner.info()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let hit = {
            let mut st = self.state.lock();
            let n = st.counts.reads;
            st.counts.reads += 1;
            let hit = st.plan.fail_read.filter(|t| t.hits(n));
            if hit.is_some() {
                check_range(offset, buf.len() as u64, self.inner.size(), "volume")?;
                st.counts.injected += 1;
            }
            hit
        };
        if let Some(t) = hit {
            return Err(self.injected("read", offset, t.error));
        }
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let mut st = self.state.lock();
        let n = st.counts.writes;
        st.counts.writes += 1;
        let plan = &st.plan;
        let len = buf.len() as u64;
        let fail = plan.fail_write.filter(|t| t.hits(n));
        let enospc = plan
            .enospc_beyond
            .filter(|limit| offset.saturating_add(len) > *limit);
        let tear = plan.tear_write.filter(|(t, _)| t.hits(n));
        if fail.is_some() || enospc.is_some() || tear.is_some() {
            check_range(offset, len, self.inner.size(), "volume")?;
            st.counts.injected += 1;
        }
        if let Some(t) = fail {
            return Err(self.injected("write", offset, t.error));
        }
        if enospc.is_some() {
            return Err(self.injected("write", offset, InjectedError::Errno(ENOSPC)));
        }
        let (data, torn) = match tear {
            Some((t, seed)) => {
                let cut = torn_len(offset, buf.len(), seed.wrapping_add(n));
                (&buf[..cut], Some(t.error))
            }
            None => (buf, None),
        };
        if st.track && !data.is_empty() {
            // An out-of-range write is refused by the inner volume below, unrecorded.
            if check_range(offset, len, self.inner.size(), "volume").is_ok() {
                self.keep_durable(&mut st, offset, data.len() as u64)?;
            }
        }
        if !data.is_empty() || torn.is_none() {
            self.inner.write_at(offset, data)?;
        }
        match torn {
            Some(e) => Err(self.injected("write", offset, e)),
            None => Ok(()),
        }
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        let n = st.counts.flushes;
        st.counts.flushes += 1;
        if let Some(t) = st.plan.fail_flush.filter(|t| t.hits(n)) {
            st.counts.injected += 1;
            return Err(self.injected("flush", 0, t.error));
        }
        self.inner.flush()?;
        st.durable.clear();
        Ok(())
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::volume::MemVolume;
    use std::io::ErrorKind;

    const SIZE: usize = 16 * SECTOR;

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn vol() -> FaultyVolume<MemVolume> {
        FaultyVolume::new(MemVolume::with_data("d", &vec![0xAA; SIZE]))
    }

    fn raw(e: &Error) -> Option<i32> {
        match e {
            Error::Io { source, .. } => source.raw_os_error(),
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    #[test]
    fn empty_plan_passes_everything_through_and_counts() {
        let v = vol();
        let d = bytes(1, 1000);
        v.write_at(300, &d).unwrap();
        let mut back = vec![0u8; 1000];
        v.read_at(300, &mut back).unwrap();
        assert_eq!(back, d);
        v.flush().unwrap();
        assert!(matches!(
            v.write_at(SIZE as u64 - 10, &d),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(
            v.counts(),
            FaultCounts {
                reads: 1,
                writes: 2,
                flushes: 1,
                injected: 0
            }
        );
        let mut model = vec![0xAA; SIZE];
        model[300..1300].copy_from_slice(&d);
        assert_eq!(v.inner().snapshot(), model);
        assert!(v.plan().is_empty());
    }

    #[test]
    fn nth_write_fails_once_then_succeeds() {
        let v = FaultyVolume::with_plan(
            MemVolume::new("d", SIZE),
            FaultPlan::new().fail_write(Trigger::once(1)),
        );
        v.write_at(0, &[1; 10]).unwrap();
        let e = v.write_at(100, &[2; 10]).unwrap_err();
        assert_eq!(raw(&e), Some(5));
        assert!(e
            .to_string()
            .contains("write mem:d (injected fault) at offset 100"));
        // Nothing of the failed write landed.
        assert_eq!(&v.inner().snapshot()[100..110], &[0u8; 10]);
        v.write_at(100, &[3; 10]).unwrap();
        assert_eq!(&v.inner().snapshot()[100..110], &[3u8; 10]);
        let c = v.counts();
        assert_eq!((c.writes, c.injected), (3, 1));
    }

    #[test]
    fn forever_trigger_with_kind_fails_every_later_call() {
        let v = FaultyVolume::with_plan(
            MemVolume::new("d", SIZE),
            FaultPlan::new()
                .fail_read(Trigger::forever(2).kind(ErrorKind::TimedOut))
                .fail_flush(Trigger::once(0).errno(28)),
        );
        let mut b = [9u8; 4];
        v.read_at(0, &mut b).unwrap();
        v.read_at(0, &mut b).unwrap();
        for _ in 0..3 {
            let mut b = [9u8; 4];
            let e = v.read_at(0, &mut b).unwrap_err();
            assert_eq!(e.io_kind(), Some(ErrorKind::TimedOut));
            assert_eq!(b, [9u8; 4], "a failed read touched the buffer");
        }
        assert_eq!(raw(&v.flush().unwrap_err()), Some(28));
        v.flush().unwrap();
        assert_eq!(
            v.counts(),
            FaultCounts {
                reads: 5,
                writes: 0,
                flushes: 2,
                injected: 4
            }
        );
    }

    #[test]
    fn enospc_past_the_limit_writes_nothing() {
        let v = FaultyVolume::with_plan(
            MemVolume::new("d", SIZE),
            FaultPlan::new().enospc_beyond(4096),
        );
        v.write_at(4000, &[1; 96]).unwrap(); // ends exactly at the limit
        let e = v.write_at(4000, &[2; 100]).unwrap_err();
        assert_eq!(raw(&e), Some(28));
        let e = v.write_at(5000, &[2; 1]).unwrap_err();
        assert_eq!(raw(&e), Some(28));
        let snap = v.inner().snapshot();
        assert_eq!(&snap[4000..4096], &[1u8; 96][..]);
        assert_eq!(snap[5000], 0);
        assert_eq!(v.counts().injected, 2);
    }

    #[test]
    fn torn_write_keeps_a_sector_aligned_prefix() {
        let data = bytes(7, 4000);
        let mut cuts = std::collections::BTreeSet::new();
        for seed in 0..32u64 {
            let v = FaultyVolume::with_plan(
                MemVolume::with_data("d", &vec![0xAA; SIZE]),
                FaultPlan::new().tear_write(Trigger::once(0).errno(5), seed),
            );
            let off = 700u64;
            let e = v.write_at(off, &data).unwrap_err();
            assert_eq!(raw(&e), Some(5));
            let snap = v.inner().snapshot();
            let region = &snap[700..4700];
            // The written part is a prefix of the data ending at a multiple of 512 strictly
            // inside the write; the rest still holds the old bytes.
            let cut = (0..=data.len())
                .rev()
                .find(|&k| region[..k] == data[..k])
                .unwrap();
            assert!(region[cut..].iter().all(|&b| b == 0xAA), "seed {seed}");
            assert!(cut > 0 && cut < data.len(), "seed {seed}: cut {cut}");
            assert_eq!((off + cut as u64) % 512, 0, "seed {seed}: cut {cut}");
            assert_eq!(&snap[..700], &vec![0xAA; 700][..]);
            cuts.insert(cut);
            // The same seed cuts at the same place.
            let w = FaultyVolume::with_plan(
                MemVolume::with_data("d", &vec![0xAA; SIZE]),
                FaultPlan::new().tear_write(Trigger::once(0), seed),
            );
            let _ = w.write_at(off, &data);
            assert_eq!(w.inner().snapshot(), snap);
        }
        // Boundaries at 1024, 1536, ..., 4608: the seeds pick more than one.
        assert!(cuts.len() > 3, "cuts {cuts:?}");
        assert!(cuts.iter().all(|c| (324..=3908).contains(c)));
    }

    #[test]
    fn torn_write_within_one_sector_writes_nothing() {
        let v = FaultyVolume::with_plan(
            MemVolume::new("d", SIZE),
            FaultPlan::new().tear_write(Trigger::forever(0), 1),
        );
        assert!(v.write_at(1030, &[5; 100]).is_err());
        assert!(v.write_at(1024, &[5; 512]).is_err());
        assert!(v.inner().snapshot().iter().all(|&b| b == 0));
        assert_eq!(v.counts().injected, 2);
    }

    #[test]
    fn crash_drops_every_unflushed_write() {
        let v = vol();
        v.write_at(100, &bytes(1, 2000)).unwrap();
        v.flush().unwrap();
        let flushed = v.inner().snapshot();
        v.write_at(1500, &bytes(2, 3000)).unwrap();
        v.write_at(7000, &bytes(3, 10)).unwrap();
        v.write_at(1600, &bytes(4, 10)).unwrap(); // again, over an already kept sector
        assert_eq!(v.unflushed_sectors(), 7 + 1);
        let img = v.crash_image(CrashMode::DropAll).unwrap();
        assert_eq!(img, flushed);
        assert_ne!(
            v.inner().snapshot(),
            flushed,
            "crash_image changed the volume"
        );
        assert_eq!(v.crash(CrashMode::DropAll).unwrap(), 8);
        assert_eq!(v.inner().snapshot(), flushed);
        assert_eq!(v.unflushed_sectors(), 0);
        // A crash right after it loses nothing more.
        assert_eq!(v.crash(CrashMode::DropAll).unwrap(), 0);
        assert_eq!(v.inner().snapshot(), flushed);
    }

    #[test]
    fn failed_flush_keeps_writes_unflushed() {
        let v = FaultyVolume::with_plan(
            MemVolume::with_data("d", &vec![0xAA; SIZE]),
            FaultPlan::new().fail_flush(Trigger::once(0)),
        );
        v.write_at(512, &[1; 512]).unwrap();
        assert!(v.flush().is_err());
        assert_eq!(v.unflushed_sectors(), 1);
        v.crash(CrashMode::DropAll).unwrap();
        assert_eq!(v.inner().snapshot(), vec![0xAA; SIZE]);
    }

    #[test]
    fn random_crash_keeps_or_drops_whole_sectors_deterministically() {
        let v = vol();
        let d = bytes(9, SIZE);
        v.write_at(0, &d).unwrap();
        let a = v.crash_image(CrashMode::Random { seed: 42 }).unwrap();
        let b = v.crash_image(CrashMode::Random { seed: 42 }).unwrap();
        assert_eq!(a, b);
        let (mut kept, mut dropped) = (0, 0);
        for (k, s) in a.chunks(SECTOR).enumerate() {
            if s == &d[k * SECTOR..(k + 1) * SECTOR] {
                kept += 1;
            } else {
                assert!(s.iter().all(|&x| x == 0xAA), "sector {k} is mixed");
                dropped += 1;
            }
        }
        assert!(kept > 0 && dropped > 0, "kept {kept} dropped {dropped}");
        let n = v.crash(CrashMode::Random { seed: 42 }).unwrap();
        assert_eq!(n, dropped);
        assert_eq!(v.inner().snapshot(), a);
    }

    #[test]
    fn torn_write_is_undone_by_a_crash_and_odd_sized_tail_is_kept() {
        // A volume whose size is not a multiple of 512: the last sector is short.
        let size = SIZE + 100;
        let v = FaultyVolume::with_plan(
            MemVolume::with_data("d", &vec![0x11; size]),
            FaultPlan::new().tear_write(Trigger::once(1), 3),
        );
        v.write_at(SIZE as u64 - 50, &[0x22; 150]).unwrap();
        assert!(v.write_at(0, &[0x33; 2048]).is_err());
        assert_eq!(
            v.unflushed_sectors(),
            2 + (v.inner().snapshot()[..2048]
                .chunks(SECTOR)
                .filter(|s| s[0] == 0x33)
                .count())
        );
        v.crash(CrashMode::DropAll).unwrap();
        assert_eq!(v.inner().snapshot(), vec![0x11; size]);
    }

    #[test]
    fn crash_without_shadow_is_refused() {
        let v = vol().track_crash(false);
        v.write_at(0, &[1; 10]).unwrap();
        assert_eq!(v.unflushed_sectors(), 0);
        assert!(matches!(
            v.crash(CrashMode::DropAll),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            v.crash_image(CrashMode::DropAll),
            Err(Error::Invalid { .. })
        ));
        assert_eq!(&v.inner().snapshot()[..10], &[1u8; 10]);
    }
}
