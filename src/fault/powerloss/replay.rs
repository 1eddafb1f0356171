//! After the cut: the trace replayed through the ordering checker, and the backing files
//! presented to recovery under the identities the table recorded through the mount.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::store::{TraceEvent, TraceOp};
use crate::engine::VolumeResolver;
use crate::fault::checker::{Devices, OrderingChecker};
use crate::model::VolumeRef;
use crate::volume::Backend;
use crate::volume::{open_file_volume, FileVolumeOptions, Volume, VolumeInfo};
use crate::Result;

/// What [`check_ordering`] found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OrderingReport {
    /// Writes replayed.
    pub writes: u64,
    /// Flushes replayed.
    pub flushes: u64,
    /// Writes (to any file but the table) the checker examined while a durable table existed;
    /// it compares those that reach a live session's source with the durable state.
    pub checks: u64,
    /// Violations, each naming the trace sequence number and file of the write that broke the
    /// rule.
    pub violations: Vec<String>,
}

#[derive(Debug)]
struct File {
    path: String,
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Arc<[u8]>)>,
}

#[derive(Debug)]
struct Replay {
    mount: String,
    table: String,
    files: Vec<File>,
}

impl Devices for Replay {
    fn dev_by_locator(&self, locator: &str) -> Option<usize> {
        let rel = locator.strip_prefix(&self.mount)?.trim_start_matches('/');
        self.files.iter().position(|f| f.path == rel)
    }
    fn durable(&self, dev: usize) -> &[u8] {
        &self.files[dev].durable
    }
    fn current(&self, dev: usize) -> &[u8] {
        &self.files[dev].current
    }
    fn table_dev(&self) -> Option<usize> {
        self.files.iter().position(|f| f.path == self.table)
    }
}

fn put(img: &mut Vec<u8>, off: u64, data: &[u8]) {
    let Ok(o) = usize::try_from(off) else {
        return;
    };
    let end = o + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[o..end].copy_from_slice(data);
}

impl Replay {
    fn index(&mut self, path: &str) -> usize {
        if let Some(i) = self.files.iter().position(|f| f.path == path) {
            return i;
        }
        self.files.push(File {
            path: path.to_string(),
            current: Vec::new(),
            durable: Vec::new(),
            pending: Vec::new(),
        });
        self.files.len() - 1
    }
}

/// Replay a power-loss trace (recorded with `record_data`) through the harness's
/// [`OrderingChecker`]: each file starts with its contents at mount time (`initial`, empty for
/// files created later); every write is checked before it is applied, exactly as the checker
/// checks simulated devices online. `mount` is the mount point as the locators in the table
/// spell it, `table` the table's path relative to it. Writes to volumes are taken as the
/// engine's own (copy-before-write, copier, source writes): a run that writes a session's
/// target directly would need those writes noted as user writes, which this replay does not do.
#[must_use]
pub fn check_ordering(
    trace: &[TraceEvent],
    initial: &HashMap<String, Vec<u8>>,
    mount: &Path,
    table: &str,
) -> OrderingReport {
    let mut r = Replay {
        mount: mount.to_string_lossy().into_owned(),
        table: table.to_string(),
        files: initial
            .iter()
            .map(|(p, b)| File {
                path: p.clone(),
                current: b.clone(),
                durable: b.clone(),
                pending: Vec::new(),
            })
            .collect(),
    };
    let mut checker = OrderingChecker::default();
    let mut report = OrderingReport::default();
    for e in trace {
        match &e.op {
            TraceOp::Write { offset, len, data } => {
                report.writes += 1;
                let dev = r.index(&e.path);
                if r.table_dev() != Some(dev) {
                    for v in checker.on_volume_write(&r, dev, *offset, *len) {
                        report
                            .violations
                            .push(format!("{v} (trace seq {}, {})", e.seq, e.path));
                    }
                }
                if let Some(d) = data {
                    let f = &mut r.files[dev];
                    put(&mut f.current, *offset, d);
                    f.pending.push((*offset, d.clone()));
                }
            }
            TraceOp::Flush { .. } => {
                report.flushes += 1;
                let dev = r.index(&e.path);
                let f = &mut r.files[dev];
                for (o, d) in std::mem::take(&mut f.pending) {
                    put(&mut f.durable, o, &d);
                }
            }
            TraceOp::Create => {
                let dev = r.index(&e.path);
                let f = &mut r.files[dev];
                f.current.clear();
                f.durable.clear();
                f.pending.clear();
            }
            TraceOp::Resize { size } => {
                let dev = r.index(&e.path);
                let f = &mut r.files[dev];
                for (o, d) in std::mem::take(&mut f.pending) {
                    put(&mut f.durable, o, &d);
                }
                let n = usize::try_from(*size).unwrap_or(0);
                f.current.resize(n, 0);
                f.durable.resize(n, 0);
            }
            TraceOp::Unlink => {
                if let Some(i) = r.files.iter().position(|f| f.path == e.path) {
                    r.files.remove(i);
                }
            }
            TraceOp::Rename { to } => {
                r.files.retain(|f| &f.path != to);
                if let Some(f) = r.files.iter_mut().find(|f| f.path == e.path) {
                    f.path.clone_from(to);
                }
            }
            TraceOp::FlushDir | TraceOp::Open { .. } => {}
        }
    }
    report.checks = checker.checks;
    report
}

/// Resolves the locators a table recorded through a power-loss mount to the backing files,
/// presented with the identity (id, generation, sector size) the table recorded, so that
/// recovery runs on the survivor without the FUSE layer. Locators outside the mount point
/// resolve as plain files.
#[derive(Debug, Clone)]
pub struct SurvivorResolver {
    /// The mount point as the locators spell it.
    pub mount: PathBuf,
    /// The backing directory.
    pub backing: PathBuf,
    /// File backend for the backing files.
    pub backend: Backend,
}

/// A backing file under the identity its locator had through the mount.
#[derive(Debug)]
struct Relocated {
    inner: Arc<dyn Volume>,
    info: VolumeInfo,
}

impl Volume for Relocated {
    fn info(&self) -> VolumeInfo {
        self.info.clone()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

impl VolumeResolver for SurvivorResolver {
    fn resolve(&self, r: &VolumeRef) -> Result<Option<Arc<dyn Volume>>> {
        let loc = Path::new(&r.locator);
        let Ok(rel) = loc.strip_prefix(&self.mount) else {
            return crate::engine::FileResolver {
                backend: self.backend,
                ..crate::engine::FileResolver::default()
            }
            .resolve(r);
        };
        let path = self.backing.join(rel);
        if !path.exists() {
            return Ok(None);
        }
        let (inner, _) = open_file_volume(&path, &FileVolumeOptions::default(), self.backend)?;
        let info = VolumeInfo {
            id: r.id,
            size: inner.size(),
            sector_size: r.sector_size,
            generation: r.generation,
            locator: r.locator.clone(),
        };
        Ok(Some(Arc::new(Relocated { inner, info })))
    }
}
