//! The files of a benchmark run: created and filled in a temporary directory, opened for the
//! raw side, attached to the engine as volumes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{BenchOptions, COPY_CHUNK, JOURNAL_BYTES, MIB};
use crate::activity::format::CopyMode;
use crate::engine::{Engine, SessionSpec};
use crate::ids::{GrainSize, VolumeId};
use crate::{Error, Result};

/// The files of a run, in a temporary directory removed when this is dropped.
pub(super) struct Files {
    /// The directory holding every file of the run.
    pub(super) dir: PathBuf,
    _tmp: tempfile::TempDir,
    /// The engine's source volume.
    pub(super) src: PathBuf,
    /// The engine's target volume.
    pub(super) tgt: PathBuf,
    /// The raw side's source file.
    pub(super) raw: PathBuf,
    /// The raw side's target file (the floors copy grains into it).
    pub(super) raw_tgt: PathBuf,
    /// The destination of the raw copy.
    pub(super) raw_copy: PathBuf,
    /// A preallocated file standing for the table in the rule-2 and copy-log floors.
    pub(super) raw_journal: PathBuf,
    /// The engine's activity table.
    pub(super) table: PathBuf,
    /// The directory holding the table and the stand-in journal when it is not `dir`.
    pub(super) table_dir: Option<PathBuf>,
    _table_tmp: Option<tempfile::TempDir>,
}

impl Files {
    /// A new temporary directory (inside `opts.dir` when given) holding every file of the run,
    /// filled and made durable.
    pub(super) fn create(opts: &BenchOptions) -> Result<Files> {
        let (dir, tmp) = temp_dir(opts.dir.as_deref())?;
        let (table_dir, table_tmp) = match &opts.table_dir {
            Some(d) => {
                let (p, t) = temp_dir(Some(d))?;
                (Some(p), Some(t))
            }
            None => (None, None),
        };
        let meta = table_dir.as_deref().unwrap_or(&dir);
        let f = Files {
            src: dir.join("src.img"),
            tgt: dir.join("tgt.img"),
            raw: dir.join("raw.img"),
            raw_tgt: dir.join("raw-tgt.img"),
            raw_copy: dir.join("raw-copy.img"),
            raw_journal: meta.join("raw-journal.img"),
            table: meta.join("table.tz"),
            dir,
            _tmp: tmp,
            table_dir,
            _table_tmp: table_tmp,
        };
        fill_file(&f.src, opts.size, 1)?;
        fill_file(&f.tgt, opts.size, 0)?;
        fill_file(&f.raw, opts.size, 2)?;
        fill_file(&f.raw_tgt, opts.size, 0)?;
        fill_file(&f.raw_copy, opts.size, 0)?;
        fill_file(&f.raw_journal, JOURNAL_BYTES, 0)?;
        Ok(f)
    }
}

/// A new temporary directory for a run's files, inside `parent` when given (created if
/// needed); removed when the returned guard is dropped.
fn temp_dir(parent: Option<&Path>) -> Result<(PathBuf, tempfile::TempDir)> {
    let b = {
        let mut b = tempfile::Builder::new();
        b.prefix("timezero-bench-");
        b
    };
    let t = match parent {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| io_err("mkdir", d, e))?;
            b.tempdir_in(d).map_err(|e| io_err("mkdtemp", d, e))?
        }
        None => b
            .tempdir()
            .map_err(|e| io_err("mkdtemp", Path::new("/tmp"), e))?,
    };
    Ok((t.path().to_path_buf(), t))
}

/// An I/O error on `p`.
pub(super) fn io_err(op: &'static str, p: &Path, e: std::io::Error) -> Error {
    Error::io(op, p.display().to_string(), 0, e)
}

/// Open an existing file for reading and writing.
pub(super) fn open_rw(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(|e| io_err("open", p, e))
}

/// Open with `O_DIRECT`, or buffered when the file system refuses (tmpfs). Returns whether
/// `O_DIRECT` is in effect.
pub(super) fn open_direct(p: &Path, write: bool) -> Result<(File, bool)> {
    let flag = i32::try_from(rustix::fs::OFlags::DIRECT.bits()).unwrap_or(0);
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    match o.clone().custom_flags(flag).open(p) {
        Ok(f) => Ok((f, true)),
        Err(_) => Ok((o.open(p).map_err(|e| io_err("open", p, e))?, false)),
    }
}

/// Create `p` with `size` bytes of a pattern derived from `seed`, made durable.
fn fill_file(p: &Path, size: u64, seed: u8) -> Result<()> {
    let f = File::create(p).map_err(|e| io_err("create", p, e))?;
    let mut chunk = vec![0u8; COPY_CHUNK];
    let mut off = 0u64;
    while off < size {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = seed.wrapping_add((i as u8) ^ ((off >> 20) as u8));
        }
        let n = usize::try_from((size - off).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
        f.write_all_at(&chunk[..n], off)
            .map_err(|e| io_err("write", p, e))?;
        off += n as u64;
    }
    f.sync_all().map_err(|e| io_err("fsync", p, e))
}

/// Read `path` once through the page cache (1 MiB at a time).
pub(super) fn warm_page_cache(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| io_err("open", path, e))?;
    let mut buf = vec![0u8; MIB as usize];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path, e)),
        }
    }
}

/// The engine's volume for file `p`: the one already attached, or `p` attached now.
pub(super) fn attach(e: &Engine, p: &Path) -> Result<VolumeId> {
    let canon = std::fs::canonicalize(p).map_err(|e| io_err("canonicalize", p, e))?;
    match e.volume_by_locator(&canon.display().to_string()) {
        Some(id) => Ok(id),
        None => e.attach_path(&canon),
    }
}

/// A session over the whole of `src` onto `tgt` at the default grain.
pub(super) fn whole(src: VolumeId, tgt: VolumeId, mode: CopyMode) -> SessionSpec {
    SessionSpec {
        source: src,
        target: tgt,
        extents: Vec::new(),
        grain: GrainSize::DEFAULT,
        mode,
        incremental: false,
    }
}
