//! Simulated devices sharing one I/O clock, and the crash images they allow.

use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::checker::{Devices, OrderingChecker};
use crate::activity::TableStorage;
use crate::volume::{check_range, MemVolume, Volume, VolumeInfo};
use crate::{Error, Result};

/// Sector size of torn-write simulation.
pub const SECTOR: usize = 512;

/// What kind of device a simulated device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevKind {
    /// An activity table ([`SimStorage`]).
    Table,
    /// A volume ([`SimVolume`]).
    Volume,
}

/// One mutating I/O in the log (reads are counted by the clock but not logged).
#[derive(Debug, Clone)]
pub enum IoEvent {
    /// A write of `data` at `offset` on device `dev`.
    Write {
        /// Device index.
        dev: usize,
        /// Byte offset.
        offset: u64,
        /// Bytes written.
        data: Vec<u8>,
    },
    /// A durability point on device `dev`.
    Flush {
        /// Device index.
        dev: usize,
    },
}

/// Faults injected online (F1 crash, F9 EIO).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// After this many I/Os (all kinds) every I/O fails and changes nothing (F1, online).
    pub crash_after: Option<u64>,
    /// Fail the I/O with this 0-based clock index with EIO (F9).
    pub eio_at: Option<u64>,
    /// With `eio_at`: fail every I/O from that index on, not just once.
    pub eio_forever: bool,
    /// Every flush/sync fails with EIO (F9).
    pub fail_sync: bool,
    /// The flush/sync with this 0-based index (counting flushes of all devices) fails once
    /// with EIO; its writes stay unsynced (F9).
    pub fail_sync_at: Option<u64>,
    /// F6: the table write with this 0-based index (counting table writes only) lands at
    /// another 512-byte-aligned place: `(index, destination offset)`; the destination is
    /// clamped into the device. The caller is told nothing.
    pub misdirect_table_write: Option<(u64, u64)>,
    /// The table read with this 0-based index (counting table reads only) returns the bytes at
    /// another 512-byte-aligned place: `(index, source offset)`, clamped into the device.
    pub misdirect_table_read: Option<(u64, u64)>,
    /// F8: from the I/O with this 0-based clock index on, every write fails with ENOSPC and
    /// changes nothing (reads and flushes still work).
    pub enospc_from: Option<u64>,
}

#[derive(Debug)]
struct Dev {
    name: String,
    kind: DevKind,
    // The three share one buffer until a write (current) or a flush (durable) changes theirs:
    // most devices of a recovery's world are never written, and the enumerator builds one
    // such world per crash state.
    initial: Arc<Vec<u8>>,
    current: Arc<Vec<u8>>,
    durable: Arc<Vec<u8>>,
    /// Byte ranges of `current` written since the last flush: a flush copies only these to
    /// `durable` (copying the whole device at every flush was most of the enumerator's time).
    dirty: Vec<(usize, usize)>,
}

#[derive(Debug)]
struct WorldState {
    devs: Vec<Dev>,
    log: Vec<IoEvent>,
    clock: u64,
    flushes: u64,
    table_writes: u64,
    table_reads: u64,
    /// The table's copy log (start, end): its writes and reads are data, not metadata, so the
    /// misdirected-table-I/O faults neither count nor move them.
    table_data: Option<(u64, u64)>,
    faults: Faults,
    checker: Option<OrderingChecker>,
    violations: Vec<String>,
    seed: u64,
}

impl Devices for WorldState {
    fn dev_by_locator(&self, locator: &str) -> Option<usize> {
        let name = locator.strip_prefix("mem:")?;
        self.devs.iter().position(|d| d.name == name)
    }
    fn durable(&self, dev: usize) -> &[u8] {
        &self.devs[dev].durable
    }
    fn current(&self, dev: usize) -> &[u8] {
        &self.devs[dev].current
    }
    fn table_dev(&self) -> Option<usize> {
        self.devs.iter().position(|d| d.kind == DevKind::Table)
    }
}

/// The shared world of simulated devices: one I/O clock, one log, one fault plan, an optional
/// online ordering checker. Deterministic: nothing here depends on time or threads.
#[derive(Debug)]
pub struct SimWorld {
    state: Mutex<WorldState>,
}

impl SimWorld {
    /// An empty world; `seed` is printed in every violation message.
    #[must_use]
    pub fn new(seed: u64) -> Arc<SimWorld> {
        Arc::new(SimWorld {
            state: Mutex::new(WorldState {
                devs: Vec::new(),
                log: Vec::new(),
                clock: 0,
                flushes: 0,
                table_writes: 0,
                table_reads: 0,
                table_data: None,
                faults: Faults::default(),
                checker: None,
                violations: Vec::new(),
                seed,
            }),
        })
    }

    fn add(&self, name: &str, kind: DevKind, bytes: Vec<u8>) -> usize {
        let mut s = self.state.lock();
        let bytes = Arc::new(bytes);
        s.devs.push(Dev {
            name: name.to_string(),
            kind,
            initial: Arc::clone(&bytes),
            current: Arc::clone(&bytes),
            durable: bytes,
            dirty: Vec::new(),
        });
        s.devs.len() - 1
    }

    /// Mark the table's bytes `range` (start, end) as data (the copy log): the misdirected
    /// table write and read faults (which model damage the table's redundancy must absorb)
    /// neither count nor move I/O there, as they never touch a volume's data.
    pub fn set_table_data(&self, range: Option<(u64, u64)>) {
        self.state.lock().table_data = range;
    }

    /// Add a simulated table holding `bytes` (all durable).
    pub fn add_table(self: &Arc<Self>, name: &str, bytes: Vec<u8>) -> SimStorage {
        let dev = self.add(name, DevKind::Table, bytes);
        SimStorage {
            world: self.clone(),
            dev,
            name: name.to_string(),
        }
    }

    /// Add a simulated volume `mem:NAME` holding `bytes` (all durable). Its identity equals
    /// that of `MemVolume::new(name, ..)`, so crash images can be recovered on `MemVolume`s.
    pub fn add_volume(self: &Arc<Self>, name: &str, bytes: Vec<u8>) -> SimVolume {
        let info = MemVolume::new(name, bytes.len()).info();
        let dev = self.add(name, DevKind::Volume, bytes);
        SimVolume {
            world: self.clone(),
            dev,
            info,
        }
    }

    /// Replace the fault plan.
    pub fn set_faults(&self, f: Faults) {
        self.state.lock().faults = f;
    }

    /// Turn the online ordering checker on.
    pub fn enable_checker(&self) {
        self.state.lock().checker = Some(OrderingChecker::default());
    }

    /// Tell the checker that the user (not the copier) writes `len` bytes at `offset` of volume
    /// `locator` next: grains there leave the relationship and are not compared with T0.
    pub fn note_user_write(&self, locator: &str, offset: u64, len: u64) {
        let mut s = self.state.lock();
        if let Some(dev) = s.dev_by_locator(locator) {
            if let Some(c) = s.checker.as_mut() {
                c.note_user_write(dev, offset, len);
            }
        }
    }

    /// Violations the checker recorded so far.
    #[must_use]
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().violations.clone()
    }

    /// Source writes the ordering checker examined.
    #[must_use]
    pub fn ordering_checks(&self) -> u64 {
        self.state.lock().checker.as_ref().map_or(0, |c| c.checks)
    }

    /// Flushes/syncs issued so far (failed ones included).
    #[must_use]
    pub fn flushes(&self) -> u64 {
        self.state.lock().flushes
    }

    /// Table writes issued so far.
    #[must_use]
    pub fn table_writes(&self) -> u64 {
        self.state.lock().table_writes
    }

    /// Table reads issued so far.
    #[must_use]
    pub fn table_reads(&self) -> u64 {
        self.state.lock().table_reads
    }

    /// I/Os issued so far (reads included).
    #[must_use]
    pub fn clock(&self) -> u64 {
        self.state.lock().clock
    }

    /// Mutating I/Os logged so far (the crash points).
    #[must_use]
    pub fn log_len(&self) -> usize {
        self.state.lock().log.len()
    }

    /// A copy of the log with every device's initial bytes: enough to build any crash image.
    #[must_use]
    pub fn crash_log(&self) -> CrashLog {
        let s = self.state.lock();
        CrashLog {
            devices: s
                .devs
                .iter()
                .map(|d| (d.name.clone(), d.kind, Arc::clone(&d.initial)))
                .collect(),
            events: s.log.clone(),
        }
    }

    /// The current (not necessarily durable) bytes of device `dev` (empty when there is none).
    #[must_use]
    pub fn current_image(&self, dev: usize) -> Vec<u8> {
        self.state
            .lock()
            .devs
            .get(dev)
            .map(|d| d.current.to_vec())
            .unwrap_or_default()
    }

    /// The current (not necessarily durable) bytes of every device.
    #[must_use]
    pub fn current_images(&self) -> Vec<Vec<u8>> {
        self.state
            .lock()
            .devs
            .iter()
            .map(|d| d.current.to_vec())
            .collect()
    }

    fn tick(s: &mut WorldState, what: &'static str, name: &str, off: u64) -> Result<()> {
        let n = s.clock;
        s.clock += 1;
        let f = &s.faults;
        let eio = f.crash_after.is_some_and(|c| n >= c)
            || f.eio_at.is_some_and(|e| n == e || (f.eio_forever && n > e));
        if eio {
            return Err(Error::io(
                what,
                format!("{name} (sim, seed {})", s.seed),
                off,
                std::io::Error::from_raw_os_error(5),
            ));
        }
        Ok(())
    }

    fn read(&self, dev: usize, off: u64, buf: &mut [u8]) -> Result<()> {
        let mut s = self.state.lock();
        let d = &s.devs[dev];
        check_range(off, buf.len() as u64, d.current.len() as u64, "sim device")?;
        let name = d.name.clone();
        let kind = d.kind;
        let dev_len = d.current.len() as u64;
        Self::tick(&mut s, "read", &name, off)?;
        let mut off = off;
        if kind == DevKind::Table && !in_data(s.table_data, off) {
            let fault = s.faults.misdirect_table_read;
            off = misplaced(&mut s.table_reads, fault, off, buf.len(), dev_len);
        }
        let o = usize::try_from(off).map_err(|_| Error::invalid("offset", "too large"))?;
        buf.copy_from_slice(&s.devs[dev].current[o..o + buf.len()]);
        Ok(())
    }

    fn write(&self, dev: usize, off: u64, data: &[u8]) -> Result<()> {
        let mut s = self.state.lock();
        let d = &s.devs[dev];
        check_range(off, data.len() as u64, d.current.len() as u64, "sim device")?;
        let name = d.name.clone();
        let kind = d.kind;
        let dev_len = d.current.len() as u64;
        let clock = s.clock;
        Self::tick(&mut s, "write", &name, off)?;
        if s.faults.enospc_from.is_some_and(|n| clock >= n) {
            return Err(Error::io(
                "write",
                format!("{name} (sim, seed {})", s.seed),
                off,
                std::io::Error::from_raw_os_error(28),
            ));
        }
        let mut off = off;
        if kind == DevKind::Table && !in_data(s.table_data, off) {
            let fault = s.faults.misdirect_table_write;
            off = misplaced(&mut s.table_writes, fault, off, data.len(), dev_len);
        }
        if kind == DevKind::Volume {
            if let Some(mut c) = s.checker.take() {
                let seed = s.seed;
                let found = c.on_volume_write(&*s, dev, off, data.len() as u64);
                s.violations
                    .extend(found.into_iter().map(|v| format!("{v} (seed {seed})")));
                s.checker = Some(c);
            }
        }
        let o = usize::try_from(off).map_err(|_| Error::invalid("offset", "too large"))?;
        let d = &mut s.devs[dev];
        Arc::make_mut(&mut d.current)[o..o + data.len()].copy_from_slice(data);
        d.dirty.push((o, o + data.len()));
        s.log.push(IoEvent::Write {
            dev,
            offset: off,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn flush(&self, dev: usize) -> Result<()> {
        let mut s = self.state.lock();
        let name = s.devs[dev].name.clone();
        Self::tick(&mut s, "flush", &name, 0)?;
        let k = s.flushes;
        s.flushes += 1;
        if s.faults.fail_sync || s.faults.fail_sync_at == Some(k) {
            return Err(Error::io(
                "flush",
                format!("{name} (sim, seed {})", s.seed),
                0,
                std::io::Error::from_raw_os_error(5),
            ));
        }
        let d = &mut s.devs[dev];
        let dirty = std::mem::take(&mut d.dirty);
        if !dirty.is_empty() {
            let durable = Arc::make_mut(&mut d.durable);
            for (a, b) in dirty {
                durable[a..b].copy_from_slice(&d.current[a..b]);
            }
        }
        s.log.push(IoEvent::Flush { dev });
        Ok(())
    }
}

/// A simulated activity table storage.
#[derive(Debug, Clone)]
pub struct SimStorage {
    world: Arc<SimWorld>,
    dev: usize,
    name: String,
}

impl TableStorage for SimStorage {
    fn len(&self) -> u64 {
        self.world.state.lock().devs[self.dev].current.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.world.read(self.dev, offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.world.write(self.dev, offset, data)
    }
    fn sync(&self) -> Result<()> {
        self.world.flush(self.dev)
    }
    fn name(&self) -> String {
        format!("sim:{}", self.name)
    }
}

/// A simulated volume.
#[derive(Debug, Clone)]
pub struct SimVolume {
    world: Arc<SimWorld>,
    dev: usize,
    info: VolumeInfo,
}

impl Volume for SimVolume {
    fn info(&self) -> VolumeInfo {
        self.info.clone()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.world.read(self.dev, offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.world.write(self.dev, offset, buf)
    }
    fn flush(&self) -> Result<()> {
        self.world.flush(self.dev)
    }
}

/// Devices' initial bytes and the log of mutating I/Os: the input of crash-image building.
#[derive(Debug, Clone)]
pub struct CrashLog {
    /// (name, kind, initial bytes) per device index.
    pub devices: Vec<(String, DevKind, Arc<Vec<u8>>)>,
    /// Writes and flushes in issue order.
    pub events: Vec<IoEvent>,
}

/// Count one table I/O in `counter`; when `fault` names this one `(index, place)`, return the
/// sector-aligned place (clamped into the device) it lands at instead of `off` (F6).
/// Whether table offset `off` is in the data range `r`.
fn in_data(r: Option<(u64, u64)>, off: u64) -> bool {
    r.is_some_and(|(a, b)| a <= off && off < b)
}

fn misplaced(
    counter: &mut u64,
    fault: Option<(u64, u64)>,
    off: u64,
    len: usize,
    dev_len: u64,
) -> u64 {
    let k = *counter;
    *counter += 1;
    match fault {
        Some((i, place)) if i == k => {
            let max = dev_len.saturating_sub(len as u64);
            (place.min(max) / SECTOR as u64) * SECTOR as u64
        }
        _ => off,
    }
}

/// What happens to one unsynced write in a crash image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Reaches the medium whole.
    Keep,
    /// Lost (F2, F5).
    Drop,
    /// Only the first `n` sectors reach the medium (F4).
    Prefix(usize),
    /// Only the sectors from `n` on reach the medium (F4).
    Suffix(usize),
    /// Sector `n` holds garbage from `seed`; the rest is kept (F4).
    Garbage(usize, u64),
}

/// Walks a [`CrashLog`] one event at a time, keeping every device's durable bytes and the writes
/// since its last durability point.
#[derive(Debug)]
pub struct CrashCursor<'a> {
    log: &'a CrashLog,
    pos: usize,
    /// Shared with the log's initial bytes until a flush changes a device.
    durable: Vec<Arc<Vec<u8>>>,
    unsynced: Vec<Vec<usize>>,
}

fn put(img: &mut [u8], off: u64, data: &[u8]) {
    let o = usize::try_from(off).unwrap_or(usize::MAX);
    if let Some(dst) = o.checked_add(data.len()).and_then(|e| img.get_mut(o..e)) {
        dst.copy_from_slice(data);
    }
}

impl<'a> CrashCursor<'a> {
    /// A cursor at crash point 0 (nothing issued).
    #[must_use]
    pub fn new(log: &'a CrashLog) -> Self {
        CrashCursor {
            durable: log.devices.iter().map(|d| Arc::clone(&d.2)).collect(),
            unsynced: vec![Vec::new(); log.devices.len()],
            log,
            pos: 0,
        }
    }

    /// Events applied so far (the crash point).
    #[must_use]
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Apply the next event; false at the end of the log.
    pub fn advance(&mut self) -> bool {
        let Some(e) = self.log.events.get(self.pos) else {
            return false;
        };
        match e {
            IoEvent::Write { dev, .. } => self.unsynced[*dev].push(self.pos),
            IoEvent::Flush { dev } => {
                let writes = std::mem::take(&mut self.unsynced[*dev]);
                if !writes.is_empty() {
                    let durable = Arc::make_mut(&mut self.durable[*dev]);
                    for i in writes {
                        if let IoEvent::Write { offset, data, .. } = &self.log.events[i] {
                            put(durable, *offset, data);
                        }
                    }
                }
            }
        }
        self.pos += 1;
        true
    }

    /// Unsynced writes at this point, as (device, event index), in issue order.
    #[must_use]
    pub fn unsynced(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<(usize, usize)> = self
            .unsynced
            .iter()
            .enumerate()
            .flat_map(|(d, w)| w.iter().map(move |i| (d, *i)))
            .collect();
        v.sort_by_key(|x| x.1);
        v
    }

    /// The kind of device `dev`.
    #[must_use]
    pub fn kind(&self, dev: usize) -> DevKind {
        self.log.devices[dev].1
    }

    /// Length in bytes of the write logged at `event`.
    #[must_use]
    pub fn write_len(&self, event: usize) -> usize {
        match &self.log.events[event] {
            IoEvent::Write { data, .. } => data.len(),
            IoEvent::Flush { .. } => 0,
        }
    }

    /// Device images at this crash point; `fate(k)` decides the fate of the k-th unsynced write
    /// (in [`CrashCursor::unsynced`] order). Unsynced writes are applied in issue order.
    #[must_use]
    pub fn image(&self, fate: impl Fn(usize) -> Fate) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = self.durable.iter().map(|d| d.to_vec()).collect();
        for (k, (dev, i)) in self.unsynced().into_iter().enumerate() {
            let IoEvent::Write { offset, data, .. } = &self.log.events[i] else {
                continue;
            };
            let sectors = data.len().div_ceil(SECTOR);
            let img = &mut out[dev];
            match fate(k) {
                Fate::Keep => put(img, *offset, data),
                Fate::Drop => {}
                Fate::Prefix(n) => {
                    let end = (n.min(sectors) * SECTOR).min(data.len());
                    put(img, *offset, &data[..end]);
                }
                Fate::Suffix(n) => {
                    let start = (n.min(sectors) * SECTOR).min(data.len());
                    put(img, *offset + start as u64, &data[start..]);
                }
                Fate::Garbage(n, seed) => {
                    let mut d = data.clone();
                    let s = (n.min(sectors.saturating_sub(1))) * SECTOR;
                    let e = (s + SECTOR).min(d.len());
                    SmallRng::seed_from_u64(seed).fill(&mut d[s..e]);
                    put(img, *offset, &d);
                }
            }
        }
        out
    }
}

/// Flip bit `bit` (0 = lowest bit of byte 0) of `bytes` (F7).
pub fn flip_bit(bytes: &mut [u8], bit: u64) {
    let i = usize::try_from(bit / 8).unwrap_or(usize::MAX);
    if let Some(b) = bytes.get_mut(i) {
        *b ^= 1 << (bit % 8);
    }
}
