//! The volatile layer: per-file writes not yet covered by a durability point, the overlay that
//! lets readers see them, the trace, and what a power cut leaves on the backing files.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Overlay page size: volatile bytes are kept in pages of this size.
const PAGE: u64 = 4096;

/// What a power cut does to the writes no durability point covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LossPolicy {
    /// Every volatile write is lost.
    DropAll,
    /// Each volatile write reaches the backing file whole or not at all (seeded coin per
    /// write); the kept ones land in issue order.
    RandomSubset,
    /// Each volatile write is cut into aligned pieces of this many bytes (4096 or 512: a page or
    /// a sector); each piece is kept or lost on its own (seeded), in issue order.
    Torn(u32),
}

impl LossPolicy {
    /// The four policies a seeded run rotates through.
    pub const ALL: [LossPolicy; 4] = [
        LossPolicy::DropAll,
        LossPolicy::RandomSubset,
        LossPolicy::Torn(4096),
        LossPolicy::Torn(512),
    ];

    /// A short name for reports.
    #[must_use]
    pub fn name(self) -> String {
        match self {
            LossPolicy::DropAll => "drop-all".to_string(),
            LossPolicy::RandomSubset => "random-subset".to_string(),
            LossPolicy::Torn(g) => format!("torn-{g}"),
        }
    }
}

/// One operation in the trace.
#[derive(Debug, Clone)]
pub enum TraceOp {
    /// A write of `len` bytes at `offset` (its bytes when the mount records data).
    Write {
        /// Byte offset in the file.
        offset: u64,
        /// Bytes written.
        len: u64,
        /// The bytes, when recorded.
        data: Option<Arc<[u8]>>,
    },
    /// `fsync` (`datasync` false) or `fdatasync` (true), or a write to a file opened with
    /// `O_SYNC`/`O_DSYNC` (which the layer turns into one): every earlier write to the file is
    /// durable.
    Flush {
        /// True for `fdatasync`.
        datasync: bool,
    },
    /// `fsync` of a directory (recorded only: entries are durable when made).
    FlushDir,
    /// A file made (create, mknod) or emptied.
    Create,
    /// The file's size set (truncate, `fallocate`): its volatile writes were made durable first.
    Resize {
        /// New size in bytes.
        size: u64,
    },
    /// The file removed.
    Unlink,
    /// The file renamed to this path (relative to the mount).
    Rename {
        /// New relative path.
        to: String,
    },
    /// An open (`O_DIRECT` and the sync flags are what matter here).
    Open {
        /// The open flags as the kernel passed them.
        flags: i32,
    },
}

/// One traced operation: its global sequence number (one counter for every file, so the order
/// across files is known), the file (path relative to the mount) and the operation.
#[derive(Debug, Clone)]
pub struct TraceEvent {
    /// Position in the mount's total order of operations on files.
    pub seq: u64,
    /// Path relative to the mount point.
    pub path: String,
    /// What happened.
    pub op: TraceOp,
}

/// What a power cut did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CutReport {
    /// The mutating operation the cut came before (its 0-based count), or the count at a cut
    /// requested by the caller.
    pub at_op: u64,
    /// Policy name.
    pub policy: String,
    /// Files that had volatile writes.
    pub files: u64,
    /// Volatile writes at the cut.
    pub pending: u64,
    /// Of those, written whole to the backing files.
    pub kept: u64,
    /// Of those, written in part (torn).
    pub torn: u64,
}

/// One write not yet covered by a durability point.
#[derive(Debug)]
struct Pending {
    offset: u64,
    data: Arc<[u8]>,
}

/// The volatile state of one file.
#[derive(Debug, Default)]
struct Volatile {
    /// Page index -> the page's current bytes (the backing bytes overlaid with volatile writes).
    pages: BTreeMap<u64, Vec<u8>>,
    /// The size readers see.
    size: u64,
    /// Writes since the last durability point, in issue order.
    pending: Vec<Pending>,
}

/// Everything the mount keeps: paths, volatile writes, counters, the trace, the cut.
#[derive(Debug)]
pub(crate) struct Store {
    backing: PathBuf,
    /// Inode number -> path relative to the backing directory ("" is the root).
    pub(crate) paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    files: HashMap<u64, File>,
    volatile: HashMap<u64, Volatile>,
    /// Mutating operations counted so far.
    pub(crate) ops: u64,
    /// Every operation handled (reads included).
    pub(crate) requests: u64,
    seq: u64,
    pub(crate) cut_at: Option<u64>,
    pub(crate) policy: LossPolicy,
    seed: u64,
    pub(crate) cut: Option<CutReport>,
    record_data: bool,
    pub(crate) trace: Vec<TraceEvent>,
    /// Opens with `O_DIRECT` seen (answered with `FOPEN_DIRECT_IO`).
    pub(crate) direct_opens: u64,
    /// Top-level regular files of the backing directory when mounted (with data recording on).
    pub(crate) initial: HashMap<String, Vec<u8>>,
}

/// An errno for the FUSE reply.
pub(crate) type Errno = i32;

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc_eio())
}

pub(crate) const fn libc_eio() -> Errno {
    5
}

impl Store {
    pub(crate) fn new(
        backing: &Path,
        cut_at: Option<u64>,
        policy: LossPolicy,
        seed: u64,
        record_data: bool,
    ) -> Store {
        let mut paths = HashMap::new();
        let mut inos = HashMap::new();
        paths.insert(1, PathBuf::new());
        inos.insert(PathBuf::new(), 1);
        let mut initial = HashMap::new();
        if record_data {
            if let Ok(rd) = std::fs::read_dir(backing) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_file()) {
                        if let Ok(b) = std::fs::read(e.path()) {
                            initial.insert(e.file_name().to_string_lossy().into_owned(), b);
                        }
                    }
                }
            }
        }
        Store {
            backing: backing.to_path_buf(),
            paths,
            inos,
            next_ino: 2,
            files: HashMap::new(),
            volatile: HashMap::new(),
            ops: 0,
            requests: 0,
            seq: 0,
            cut_at,
            policy,
            seed,
            cut: None,
            record_data,
            trace: Vec::new(),
            direct_opens: 0,
            initial,
        }
    }

    /// The backing path of a relative path.
    pub(crate) fn real(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.backing.clone()
        } else {
            self.backing.join(rel)
        }
    }

    pub(crate) fn rel(&self, ino: u64) -> Option<PathBuf> {
        self.paths.get(&ino).cloned()
    }

    /// The inode number of a relative path, assigned on first sight.
    pub(crate) fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(i) = self.inos.get(rel) {
            return *i;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        self.inos.insert(rel.to_path_buf(), i);
        self.paths.insert(i, rel.to_path_buf());
        i
    }

    pub(crate) fn forget_path(&mut self, rel: &Path) {
        if let Some(i) = self.inos.remove(rel) {
            self.paths.remove(&i);
            self.files.remove(&i);
            self.volatile.remove(&i);
        }
    }

    pub(crate) fn rename_path(&mut self, from: &Path, to: &Path) {
        self.forget_path(to);
        if let Some(i) = self.inos.remove(from) {
            self.inos.insert(to.to_path_buf(), i);
            self.paths.insert(i, to.to_path_buf());
        }
        // Entries below a renamed directory.
        let moved: Vec<(PathBuf, u64)> = self
            .inos
            .iter()
            .filter(|(p, _)| p.starts_with(from) && p.as_path() != from)
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, i) in moved {
            if let Ok(rest) = p.strip_prefix(from) {
                let np = to.join(rest);
                self.inos.remove(&p);
                self.inos.insert(np.clone(), i);
                self.paths.insert(i, np);
            }
        }
    }

    /// Count one mutating operation; at the planned one, cut the power. Err(EIO) once cut.
    pub(crate) fn tick(&mut self) -> Result<(), Errno> {
        if self.cut.is_some() {
            return Err(libc_eio());
        }
        let n = self.ops;
        self.ops += 1;
        if self.cut_at == Some(n) {
            self.power_cut(n);
            return Err(libc_eio());
        }
        Ok(())
    }

    /// Err(EIO) once cut (for operations that change nothing).
    pub(crate) fn alive(&mut self) -> Result<(), Errno> {
        self.requests += 1;
        if self.cut.is_some() {
            Err(libc_eio())
        } else {
            Ok(())
        }
    }

    pub(crate) fn record(&mut self, ino: u64, op: TraceOp) {
        let path = self
            .paths
            .get(&ino)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.record_path(path, op);
    }

    pub(crate) fn record_path(&mut self, path: String, op: TraceOp) {
        let seq = self.seq;
        self.seq += 1;
        self.trace.push(TraceEvent { seq, path, op });
    }

    fn file(&mut self, ino: u64) -> Result<&File, Errno> {
        if !self.files.contains_key(&ino) {
            let rel = self.paths.get(&ino).ok_or(2)?.clone();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.real(&rel))
                .map_err(|e| errno_of(&e))?;
            self.files.insert(ino, f);
        }
        self.files.get(&ino).ok_or(libc_eio())
    }

    fn backing_len(&mut self, ino: u64) -> Result<u64, Errno> {
        let f = self.file(ino)?;
        f.metadata().map(|m| m.len()).map_err(|e| errno_of(&e))
    }

    /// The size readers see: the backing size, or larger when volatile writes extend it.
    pub(crate) fn visible_size(&self, ino: u64, backing: u64) -> u64 {
        self.volatile
            .get(&ino)
            .map_or(backing, |v| v.size.max(backing))
    }

    fn read_backing(&mut self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let f = self.file(ino)?;
        let mut done = 0usize;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno_of(&e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Read what the process would see: backing bytes overlaid with volatile writes.
    pub(crate) fn read(&mut self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let backing = self.backing_len(ino)?;
        let visible = self.visible_size(ino, backing);
        if offset >= visible {
            return Ok(Vec::new());
        }
        let end = visible.min(offset.saturating_add(u64::from(size)));
        let len = usize::try_from(end - offset).map_err(|_| libc_eio())?;
        let mut buf = vec![0u8; len];
        self.read_backing(ino, offset, &mut buf)?;
        if let Some(v) = self.volatile.get(&ino) {
            for (&p, page) in v.pages.range(offset / PAGE..end.div_ceil(PAGE)) {
                let ps = p * PAGE;
                let s = ps.max(offset);
                let e = (ps + PAGE).min(end);
                if s < e {
                    let dst = usize::try_from(s - offset).unwrap_or(0);
                    let src = usize::try_from(s - ps).unwrap_or(0);
                    let n = usize::try_from(e - s).unwrap_or(0);
                    buf[dst..dst + n].copy_from_slice(&page[src..src + n]);
                }
            }
        }
        Ok(buf)
    }

    /// A write: kept volatile (overlay and pending list) until the file's next durability point.
    pub(crate) fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if self.cut.is_some() {
            return Err(libc_eio());
        }
        let backing = self.backing_len(ino)?;
        let end = offset.saturating_add(data.len() as u64);
        let mut missing = Vec::new();
        {
            let v = self.volatile.entry(ino).or_default();
            v.size = v.size.max(backing).max(end);
            for p in offset / PAGE..end.div_ceil(PAGE) {
                if !v.pages.contains_key(&p) {
                    missing.push(p);
                }
            }
        }
        for p in missing {
            let mut page = vec![0u8; PAGE as usize];
            self.read_backing(ino, p * PAGE, &mut page)?;
            self.volatile.entry(ino).or_default().pages.insert(p, page);
        }
        let v = self.volatile.entry(ino).or_default();
        for (&p, page) in v.pages.range_mut(offset / PAGE..end.div_ceil(PAGE)) {
            let ps = p * PAGE;
            let s = ps.max(offset);
            let e = (ps + PAGE).min(end);
            let dst = usize::try_from(s - ps).unwrap_or(0);
            let src = usize::try_from(s - offset).unwrap_or(0);
            let n = usize::try_from(e - s).unwrap_or(0);
            page[dst..dst + n].copy_from_slice(&data[src..src + n]);
        }
        let data: Arc<[u8]> = Arc::from(data);
        v.pending.push(Pending {
            offset,
            data: data.clone(),
        });
        let recorded = self.record_data.then_some(data);
        self.record(
            ino,
            TraceOp::Write {
                offset,
                len: end - offset,
                data: recorded,
            },
        );
        Ok(())
    }

    /// A durability point for one file: its volatile writes reach the backing file, in order.
    pub(crate) fn persist(&mut self, ino: u64) -> Result<(), Errno> {
        if self.cut.is_some() {
            return Err(libc_eio());
        }
        let Some(v) = self.volatile.remove(&ino) else {
            return Ok(());
        };
        let f = self.file(ino)?;
        for p in &v.pending {
            f.write_all_at(&p.data, p.offset)
                .map_err(|e| errno_of(&e))?;
        }
        Ok(())
    }

    /// Volatile writes pending in all files (tests and reports).
    pub(crate) fn pending_writes(&self) -> u64 {
        self.volatile.values().map(|v| v.pending.len() as u64).sum()
    }

    /// The power cut: apply the loss policy to every file's volatile writes and freeze.
    pub(crate) fn power_cut(&mut self, at_op: u64) -> CutReport {
        if let Some(r) = &self.cut {
            return r.clone();
        }
        let mut rng = SmallRng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        let mut report = CutReport {
            at_op,
            policy: self.policy.name(),
            ..CutReport::default()
        };
        let policy = self.policy;
        let mut inos: Vec<u64> = self.volatile.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(v) = self.volatile.remove(&ino) else {
                continue;
            };
            report.files += 1;
            let Ok(f) = self.file(ino) else {
                continue;
            };
            for p in &v.pending {
                report.pending += 1;
                match policy {
                    LossPolicy::DropAll => {}
                    LossPolicy::RandomSubset => {
                        if rng.random_bool(0.5) {
                            let _ = f.write_all_at(&p.data, p.offset);
                            report.kept += 1;
                        }
                    }
                    LossPolicy::Torn(g) => {
                        let g = u64::from(g.max(1));
                        let end = p.offset + p.data.len() as u64;
                        let (mut kept, mut pieces) = (0u64, 0u64);
                        let mut at = p.offset;
                        while at < end {
                            let next = ((at / g) + 1) * g;
                            let e = next.min(end);
                            pieces += 1;
                            if rng.random_bool(0.5) {
                                let s = usize::try_from(at - p.offset).unwrap_or(0);
                                let n = usize::try_from(e - at).unwrap_or(0);
                                let _ = f.write_all_at(&p.data[s..s + n], at);
                                kept += 1;
                            }
                            at = e;
                        }
                        if kept == pieces {
                            report.kept += 1;
                        } else if kept > 0 {
                            report.torn += 1;
                        }
                    }
                }
            }
        }
        self.cut = Some(report.clone());
        report
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

    use super::*;

    fn store(policy: LossPolicy, cut_at: Option<u64>) -> (tempfile::TempDir, Store, u64) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), vec![1u8; 10_000]).unwrap();
        let mut s = Store::new(dir.path(), cut_at, policy, 7, true);
        let ino = s.ino_of(Path::new("f"));
        (dir, s, ino)
    }

    #[test]
    fn reads_see_volatile_writes_and_only_durable_ones_reach_the_file() {
        let (dir, mut s, ino) = store(LossPolicy::DropAll, None);
        s.write(ino, 4000, &[2u8; 200]).unwrap();
        s.write(ino, 9990, &[3u8; 20]).unwrap();
        let b = s.read(ino, 3990, 300).unwrap();
        assert_eq!(&b[..10], &[1u8; 10][..]);
        assert_eq!(&b[10..210], &[2u8; 200][..]);
        assert_eq!(&b[210..], &[1u8; 90][..]);
        let tail = s.read(ino, 9990, 100).unwrap();
        assert_eq!(tail, vec![3u8; 20], "the visible size grew to 10010");
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            vec![1u8; 10_000]
        );
        s.persist(ino).unwrap();
        s.write(ino, 0, &[4u8; 10]).unwrap();
        let r = s.power_cut(3);
        assert_eq!((r.pending, r.kept), (1, 0));
        let f = std::fs::read(dir.path().join("f")).unwrap();
        assert_eq!(f.len(), 10_010);
        assert_eq!(&f[..10], &[1u8; 10][..], "the unsynced write is lost");
        assert_eq!(&f[4000..4200], &[2u8; 200][..]);
        assert_eq!(&f[9990..], &[3u8; 20][..]);
        assert_eq!(
            s.write(ino, 0, &[5]),
            Err(libc_eio()),
            "nothing after the cut"
        );
        assert_eq!(s.persist(ino), Err(libc_eio()));
        assert_eq!(s.tick(), Err(libc_eio()));
    }

    #[test]
    fn the_planned_operation_cuts_and_freezes() {
        let (dir, mut s, ino) = store(LossPolicy::RandomSubset, Some(8));
        for k in 0..8u8 {
            s.tick().unwrap();
            s.write(ino, u64::from(k) * 1000, &[10 + k; 1000]).unwrap();
        }
        assert_eq!(s.tick(), Err(libc_eio()));
        let r = s.cut.clone().unwrap();
        assert_eq!((r.at_op, r.pending), (8, 8));
        let f = std::fs::read(dir.path().join("f")).unwrap();
        let kept = (0..8)
            .filter(|k| {
                f[k * 1000..(k + 1) * 1000]
                    .iter()
                    .all(|&x| x == 10 + *k as u8)
            })
            .count();
        let old = (0..8)
            .filter(|k| f[k * 1000..(k + 1) * 1000].iter().all(|&x| x == 1))
            .count();
        assert_eq!(kept + old, 8, "whole writes only");
        assert_eq!(kept as u64, r.kept);
        assert_eq!(s.tick(), Err(libc_eio()));
        // The same seed gives the same survivors.
        let (dir2, mut s2, ino2) = store(LossPolicy::RandomSubset, Some(8));
        for k in 0..8u8 {
            s2.tick().unwrap();
            s2.write(ino2, u64::from(k) * 1000, &[10 + k; 1000])
                .unwrap();
        }
        let _ = s2.tick();
        assert_eq!(std::fs::read(dir2.path().join("f")).unwrap(), f);
    }
}
