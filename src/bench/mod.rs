//! `timezero bench`: the engine against the raw file, measured in one process, interleaved
//! round by round on temporary files.
//!
//! Every figure pairs an engine measurement with its raw counterpart taken in the same round
//! (the machine is shared and single runs swing), and reports the median and min/max over
//! rounds plus the median of the per-round ratios. See docs/benchmarks.md for what each figure
//! means and the targets.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::activity::format::{CopyMode, Entry};
use crate::copier::{Copier, CopierOptions};
use crate::engine::{Engine, EngineOptions, SessionSpec};
use crate::ids::{GrainSize, SessionId, VolumeId};
use crate::{Error, Result};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const IO: usize = 4096;
const GRAIN: u64 = 64 * KIB;
/// Size of the stand-in journal of the rule-2 floor (records written round-robin).
const JOURNAL_BYTES: u64 = 16 * MIB;
/// One record of the rule-2 floor: a 512-byte sector.
const RECORD: usize = 512;
const COPY_CHUNK: usize = 1 << 20;
const DIRECT_ALIGN: usize = 4096;

/// Options of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Directory for the temporary files; `None` = a new temporary directory (removed after).
    pub dir: Option<PathBuf>,
    /// Size of each volume file in bytes (a multiple of 64 KiB, at least 16 MiB).
    pub size: u64,
    /// Rounds; every figure is measured once per round.
    pub rounds: usize,
    /// Print fio-shaped JSON instead of a table.
    pub json: bool,
    /// Also write the fio-shaped JSON to this file (whatever `json` says).
    pub json_out: Option<PathBuf>,
    /// Writer counts for the already-copied and first-write figures (each 1..=256).
    pub writers: Vec<usize>,
    /// The engine's file backend ([`EngineOptions::backend`]).
    pub backend: crate::engine::Backend,
    /// Open the engine's volumes with `O_DIRECT` for the background-copy figure, like the raw
    /// copy it is compared with.
    pub direct_copy: bool,
    /// The `timezero` binary, to measure the recovery of a 1 TiB session in a fresh process
    /// (`timezero recovery-probe`, once per round): time and peak resident memory. `None`
    /// skips that measurement.
    pub probe_exe: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            dir: None,
            size: 256 * MIB,
            rounds: 5,
            json: false,
            json_out: None,
            writers: vec![1, 32],
            backend: crate::engine::Backend::Auto,
            probe_exe: None,
            direct_copy: false,
        }
    }
}

/// How a figure's per-round ratio is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ratio {
    /// Engine time per operation / raw time per operation (lower is better).
    Cost,
    /// Engine throughput / raw throughput (higher is better).
    Speed,
    /// No raw counterpart.
    None,
}

/// One side (engine or raw) of a figure, over the rounds.
#[derive(Debug, Clone, Default)]
struct Side {
    /// Per round: operations per second (I/O figures), bytes per second (copy) or ms (time).
    per_round: Vec<f64>,
    /// Every operation's latency, all rounds.
    lat_ns: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Read,
    Copy,
    Time,
}

#[derive(Debug, Clone)]
struct Figure {
    name: String,
    /// Writer count (write figures measured per writer count), 0 otherwise.
    writers: usize,
    kind: Kind,
    /// Bytes per operation (I/O figures).
    op_bytes: u64,
    ratio: Ratio,
    raw_label: &'static str,
    engine: Side,
    raw: Side,
}

impl Figure {
    fn new(
        name: impl Into<String>,
        kind: Kind,
        op_bytes: u64,
        ratio: Ratio,
        raw_label: &'static str,
    ) -> Self {
        Figure {
            name: name.into(),
            writers: 0,
            kind,
            op_bytes,
            ratio,
            raw_label,
            engine: Side::default(),
            raw: Side::default(),
        }
    }

    fn ratios(&self) -> Vec<f64> {
        self.engine
            .per_round
            .iter()
            .zip(&self.raw.per_round)
            .map(|(e, r)| match self.ratio {
                // Rates: time per op is 1/rate.
                Ratio::Cost => r / e,
                Ratio::Speed => e / r,
                Ratio::None => f64::NAN,
            })
            .collect()
    }
}

/// The files of a run.
struct Files {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    src: PathBuf,
    tgt: PathBuf,
    raw: PathBuf,
    raw_tgt: PathBuf,
    raw_copy: PathBuf,
    /// A preallocated file standing for a journal in the rule-2 floor.
    raw_journal: PathBuf,
    table: PathBuf,
}

fn io_err(op: &'static str, p: &Path, e: std::io::Error) -> Error {
    Error::io(op, p.display().to_string(), 0, e)
}

fn open_rw(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(|e| io_err("open", p, e))
}

/// Open with `O_DIRECT`, or buffered when the file system refuses (tmpfs). Returns whether
/// `O_DIRECT` is in effect.
fn open_direct(p: &Path, write: bool) -> Result<(File, bool)> {
    let flag = i32::try_from(rustix::fs::OFlags::DIRECT.bits()).unwrap_or(0);
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    match o.clone().custom_flags(flag).open(p) {
        Ok(f) => Ok((f, true)),
        Err(_) => Ok((o.open(p).map_err(|e| io_err("open", p, e))?, false)),
    }
}

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

impl Files {
    fn create(opts: &BenchOptions) -> Result<Files> {
        let (dir, tmp) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|e| io_err("mkdir", d, e))?;
                let t = tempfile::Builder::new()
                    .prefix("timezero-bench-")
                    .tempdir_in(d)
                    .map_err(|e| io_err("mkdtemp", d, e))?;
                (t.path().to_path_buf(), Some(t))
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("timezero-bench-")
                    .tempdir()
                    .map_err(|e| io_err("mkdtemp", Path::new("/tmp"), e))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let f = Files {
            src: dir.join("src.img"),
            tgt: dir.join("tgt.img"),
            raw: dir.join("raw.img"),
            raw_tgt: dir.join("raw-tgt.img"),
            raw_copy: dir.join("raw-copy.img"),
            raw_journal: dir.join("raw-journal.img"),
            table: dir.join("table.tz"),
            dir,
            _tmp: tmp,
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

/// Run `ops` operations on `threads` threads (operation `i` on thread `i % threads`); returns
/// operations per second and every latency.
fn run_ops<F>(threads: usize, ops: usize, f: F) -> Result<(f64, Vec<u64>)>
where
    F: Fn(usize, &mut [u8]) -> Result<()> + Sync,
{
    let start = Instant::now();
    let results: Vec<Result<Vec<u64>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                sc.spawn(move || {
                    let mut buf = vec![0x5au8; IO];
                    let mut lat = Vec::with_capacity(ops / threads + 1);
                    let mut i = t;
                    while i < ops {
                        let t0 = Instant::now();
                        f(i, &mut buf)?;
                        lat.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        i += threads;
                    }
                    Ok(lat)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("bench", "worker thread panicked")))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut all = Vec::with_capacity(ops);
    for r in results {
        all.extend(r?);
    }
    Ok((ops as f64 / secs, all))
}

/// A pseudo-random 4 KiB-aligned offset for operation `i` within `size`.
fn rand_off(i: usize, size: u64, salt: u64) -> u64 {
    let mut x = (i as u64 ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    (x % (size / IO as u64)) * IO as u64
}

fn record(side: &mut Side, (rate, lat): (f64, Vec<u64>)) {
    side.per_round.push(rate);
    side.lat_ns.extend(lat);
}

fn attach(e: &Engine, p: &Path) -> Result<VolumeId> {
    let canon = std::fs::canonicalize(p).map_err(|e| io_err("canonicalize", p, e))?;
    match e.volume_by_locator(&canon.display().to_string()) {
        Some(id) => Ok(id),
        None => e.attach_path(&canon),
    }
}

fn whole(src: VolumeId, tgt: VolumeId, mode: CopyMode) -> SessionSpec {
    SessionSpec {
        source: src,
        target: tgt,
        extents: Vec::new(),
        grain: GrainSize::DEFAULT,
        mode,
    }
}

/// Raw file-to-file copy in 1 MiB chunks (O_DIRECT when possible), made durable at the end.
/// Returns bytes per second and whether O_DIRECT was used.
fn raw_copy(from: &Path, to: &Path, size: u64) -> Result<(f64, bool)> {
    let (src, d1) = open_direct(from, false)?;
    let (dst, d2) = open_direct(to, true)?;
    let mut v = vec![0u8; COPY_CHUNK + DIRECT_ALIGN];
    let a = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let buf = &mut v[a..a + COPY_CHUNK];
    let start = Instant::now();
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
        src.read_exact_at(&mut buf[..n], off)
            .map_err(|e| io_err("read", from, e))?;
        dst.write_all_at(&buf[..n], off)
            .map_err(|e| io_err("write", to, e))?;
        off += n as u64;
    }
    dst.sync_data().map_err(|e| io_err("fdatasync", to, e))?;
    Ok((size as f64 / start.elapsed().as_secs_f64(), d1 && d2))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(*x), b.max(*x))
        })
}

/// Where each figure sits in the list built by [`figures`].
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Number of writer counts.
    n: usize,
}

impl Layout {
    fn copied(self, k: usize) -> usize {
        k
    }
    fn first(self, k: usize) -> usize {
        self.n + k
    }
    fn floor(self) -> usize {
        2 * self.n
    }
    fn floor_rule2(self) -> usize {
        2 * self.n + 1
    }
    fn read_uncopied(self) -> usize {
        2 * self.n + 2
    }
    fn read_copied(self) -> usize {
        2 * self.n + 3
    }
    fn copy(self) -> usize {
        2 * self.n + 4
    }
    fn recovery(self) -> usize {
        2 * self.n + 5
    }
}

fn plural(w: usize) -> &'static str {
    if w == 1 {
        "writer"
    } else {
        "writers"
    }
}

fn figures(writers: &[usize]) -> Vec<Figure> {
    let mut v = Vec::new();
    for (what, raw) in [
        ("already-copied 4KiB write", "pwrite"),
        ("first write 4KiB + flush", "pwrite+fdatasync"),
    ] {
        for &w in writers {
            let mut f = Figure::new(
                format!("{what}, {w} {}", plural(w)),
                Kind::Write,
                IO as u64,
                Ratio::Cost,
                raw,
            );
            f.writers = w;
            v.push(f);
        }
    }
    v.extend([
        Figure::new(
            "first write 4KiB + flush, 1 writer, vs floor",
            Kind::Write,
            IO as u64,
            Ratio::Cost,
            "floor: rd64K+wr64K+sync+wr4K+sync",
        ),
        Figure::new(
            "first write 4KiB + flush, 1 writer, vs rule-2 floor",
            Kind::Write,
            IO as u64,
            Ratio::Cost,
            "floor: rd64K+wr64K+sync+wr512+sync+wr4K+sync",
        ),
        Figure::new(
            "image read 4KiB, uncopied grains",
            Kind::Read,
            IO as u64,
            Ratio::Cost,
            "pread of the source",
        ),
        Figure::new(
            "image read 4KiB, copied grains",
            Kind::Read,
            IO as u64,
            Ratio::Cost,
            "pread of the target",
        ),
        Figure::new(
            "background copy (Copier, 2 threads)",
            Kind::Copy,
            0,
            Ratio::Speed,
            "1MiB O_DIRECT read+write copy",
        ),
        Figure::new(
            "recovery (Engine::open_path)",
            Kind::Time,
            0,
            Ratio::None,
            "-",
        ),
    ]);
    v
}

/// Operation counts for a volume of `size` bytes.
struct Counts {
    fast_ops: usize,
    /// First writes at one writer (also the floor); grains `0..first_1`.
    first_1: usize,
    /// First writes per figure at more than one writer; each figure gets its own grains after
    /// `first_1`.
    first_many: usize,
}

fn counts(size: u64, writers: &[usize]) -> Counts {
    let grains = usize::try_from(size / GRAIN).unwrap_or(usize::MAX);
    let first_1 = (grains / 8).min(512);
    let many = writers.iter().filter(|w| **w != 1).count().max(1);
    Counts {
        fast_ops: 50_000,
        first_1,
        first_many: ((grains - first_1) / many).min(2048),
    }
}

fn engine_options(opts: &BenchOptions) -> EngineOptions {
    EngineOptions {
        backend: opts.backend,
        ..EngineOptions::default()
    }
}

/// Run the benchmark and print the result to `out`; progress goes to `log`.
///
/// # Errors
/// [`Error::Invalid`] for a bad size or round count; I/O and engine errors.
pub fn run(opts: &BenchOptions, out: &mut dyn Write, log: &mut dyn Write) -> Result<()> {
    if opts.size < 16 * MIB || opts.size % GRAIN != 0 {
        return Err(Error::invalid(
            "bench size",
            format!("{} (a multiple of 64KiB, at least 16MiB)", opts.size),
        ));
    }
    if opts.rounds == 0 || opts.rounds > 1000 {
        return Err(Error::invalid("bench rounds", format!("{}", opts.rounds)));
    }
    let mut writers = opts.writers.clone();
    writers.sort_unstable();
    writers.dedup();
    if writers.is_empty() || writers.iter().any(|w| *w == 0 || *w > 256) {
        return Err(Error::invalid(
            "bench writers",
            format!("{:?} (each 1..=256)", opts.writers),
        ));
    }
    let c = counts(opts.size, &writers);
    if writers.iter().any(|w| *w != 1 && c.first_many < *w) {
        return Err(Error::invalid(
            "bench writers",
            "too many writer counts for this size (each needs its own grains)",
        ));
    }
    let opts = &BenchOptions {
        writers,
        ..opts.clone()
    };
    let _ = writeln!(
        log,
        "timezero bench: {} per volume, {} rounds",
        crate::units::format_size(opts.size),
        opts.rounds
    );
    let files = Files::create(opts)?;
    let _ = writeln!(log, "files in {}", files.dir.display());
    {
        let e = Engine::create_path(&files.table, engine_options(opts))?;
        let s = attach(&e, &files.src)?;
        let t = attach(&e, &files.tgt)?;
        e.establish(&whole(s, t, CopyMode::NoCopy))?;
    }
    let mut figs = figures(&opts.writers);
    let mut run = RunInfo {
        direct: true,
        backend: "",
        copy_backend: "",
        big_recovery: None,
    };
    for round in 0..opts.rounds {
        let _ = writeln!(log, "round {}/{}", round + 1, opts.rounds);
        one_round(opts, &files, &mut figs, round, &mut run)?;
        if round == 0 {
            let _ = writeln!(
                log,
                "engine backend {}; background copy backend {}{}",
                run.backend,
                run.copy_backend,
                if opts.direct_copy { " O_DIRECT" } else { "" }
            );
        }
    }
    if let Some(exe) = &opts.probe_exe {
        run.big_recovery = big_recovery(opts, &files, exe, log)?;
    }
    if let Some(p) = &opts.json_out {
        let mut f = File::create(p).map_err(|e| io_err("create", p, e))?;
        print_json(opts, &figs, &run, &mut f)?;
    }
    if opts.json {
        print_json(opts, &figs, &run, out)
    } else {
        print_table(opts, &figs, &run, out)?;
        if let Some(b) = &run.big_recovery {
            print_big_recovery(b, out);
        }
        Ok(())
    }
}

/// Size of the source (and target) of the large-recovery measurement.
const BIG_SOURCE_BYTES: u64 = 1 << 40;

/// The recovery of a session over a 1 TiB sparse source, each round in a fresh process.
#[derive(Debug, Clone)]
struct BigRecovery {
    grains: u64,
    bitmap_bytes: u64,
    open_ms: Vec<f64>,
    growth_kib: Vec<f64>,
}

/// Build a table holding one session over a 1 TiB sparse source (half its grains copied) and
/// open it `opts.rounds` times, each in a fresh `timezero recovery-probe` process. `None` when
/// the file system cannot hold a 1 TiB sparse file.
fn big_recovery(
    opts: &BenchOptions,
    f: &Files,
    exe: &Path,
    log: &mut dyn Write,
) -> Result<Option<BigRecovery>> {
    let src = f.dir.join("big-src.img");
    let tgt = f.dir.join("big-tgt.img");
    let table = f.dir.join("big-table.tz");
    for p in [&src, &tgt] {
        let file = File::create(p).map_err(|e| io_err("create", p, e))?;
        if let Err(e) = file.set_len(BIG_SOURCE_BYTES) {
            let _ = writeln!(
                log,
                "1 TiB recovery skipped: {} cannot hold a 1 TiB sparse file ({e})",
                f.dir.display()
            );
            return Ok(None);
        }
    }
    let grains = BIG_SOURCE_BYTES / GRAIN;
    {
        let e = Engine::create_path(&table, EngineOptions::default())?;
        let s = attach(&e, &src)?;
        let t = attach(&e, &tgt)?;
        let id = e.establish(&whole(s, t, CopyMode::Copy))?;
        e.table().commit(vec![Entry::SetBits {
            session: id,
            start: 0,
            count: grains / 2,
        }])?;
    }
    let mut b = BigRecovery {
        grains,
        bitmap_bytes: grains.div_ceil(8),
        open_ms: Vec::new(),
        growth_kib: Vec::new(),
    };
    for _ in 0..opts.rounds {
        let o = std::process::Command::new(exe)
            .arg("recovery-probe")
            .arg(&table)
            .output()
            .map_err(|e| io_err("spawn", exe, e))?;
        let text = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            return Err(Error::invalid(
                "recovery probe",
                format!(
                    "{}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .map_err(|e| Error::invalid("recovery probe output", e.to_string()))?;
        let num = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| Error::invalid("recovery probe output", format!("no {k}")))
        };
        b.open_ms.push(num("open_ms")?);
        b.growth_kib
            .push((num("hwm_after_kib")? - num("rss_before_kib")?).max(0.0));
    }
    Ok(Some(b))
}

fn print_big_recovery(b: &BigRecovery, out: &mut dyn Write) {
    let (lo, hi) = min_max(&b.open_ms);
    let (glo, ghi) = min_max(&b.growth_kib);
    let mib = |k: f64| k / 1024.0;
    let _ = writeln!(
        out,
        "recovery, 1 TiB sparse session ({} grains, {:.1} MiB bitmap, half copied), fresh process",
        b.grains,
        b.bitmap_bytes as f64 / MIB as f64
    );
    let _ = writeln!(
        out,
        "  Engine::open_path: {:.2} [{lo:.2}..{hi:.2}] ms",
        median(&b.open_ms)
    );
    let _ = writeln!(
        out,
        "  peak resident growth: {:.1} [{:.1}..{:.1}] MiB (bitmap + 32 MiB = {:.1} MiB)",
        mib(median(&b.growth_kib)),
        mib(glo),
        mib(ghi),
        b.bitmap_bytes as f64 / MIB as f64 + 32.0
    );
}

/// `timezero recovery-probe TABLE`: open the table with its volumes (full recovery) in this
/// fresh process and report, as one JSON line, the time it took and the process's resident
/// memory before and at its peak after (from `/proc/self/status`).
///
/// # Errors
/// Engine errors; [`Error::Invalid`] when `/proc/self/status` cannot be read.
pub fn recovery_probe(table: &Path) -> Result<String> {
    let before = proc_status_kib("VmRSS")?;
    let t0 = Instant::now();
    let e = Engine::open_path(table, EngineOptions::default())?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let hwm = proc_status_kib("VmHWM")?;
    let anon = proc_status_kib("RssAnon")?;
    let file = proc_status_kib("RssFile")?;
    let grains: u64 = e.status().iter().map(|s| s.grains_total).sum();
    drop(e);
    Ok(serde_json::json!({
        "open_ms": open_ms,
        "rss_before_kib": before,
        "hwm_after_kib": hwm,
        "rss_anon_after_kib": anon,
        "rss_file_after_kib": file,
        "grains": grains,
    })
    .to_string())
}

/// A `kB` field of `/proc/self/status`.
fn proc_status_kib(key: &str) -> Result<u64> {
    let p = Path::new("/proc/self/status");
    let text = std::fs::read_to_string(p).map_err(|e| io_err("read", p, e))?;
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .ok_or_else(|| Error::invalid("/proc/self/status", format!("no {key} field")))
}

/// Facts about a run, for the report.
struct RunInfo {
    /// Whether the raw copy used `O_DIRECT` on both sides in every round.
    direct: bool,
    /// The engine's file backend.
    backend: &'static str,
    /// The file backend of the engine that ran the background copy.
    copy_backend: &'static str,
    /// The 1 TiB recovery measurement, when made.
    big_recovery: Option<BigRecovery>,
}

fn one_round(
    opts: &BenchOptions,
    f: &Files,
    figs: &mut [Figure],
    round: usize,
    run: &mut RunInfo,
) -> Result<()> {
    let size = opts.size;
    let c = counts(size, &opts.writers);
    let lay = Layout {
        n: opts.writers.len(),
    };
    let salt = round as u64 * 7919;
    let raw_first = round % 2 == 0;

    // (e) recovery of the table, with this run's sessions over the files.
    let t0 = Instant::now();
    let mut e = Arc::new(Engine::open_path(&f.table, engine_options(opts))?);
    figs[lay.recovery()]
        .engine
        .per_round
        .push(t0.elapsed().as_secs_f64() * 1e3);
    let src = attach(&e, &f.src)?;
    let tgt = attach(&e, &f.tgt)?;
    for s in e.status() {
        if s.state == crate::activity::format::SessionState::Active {
            e.withdraw(SessionId(s.id))?;
        }
    }
    let id = e.establish(&whole(src, tgt, CopyMode::NoCopy))?;
    run.backend = e.backend_name();

    let raw = open_rw(&f.raw)?;
    let raw_tgt = open_rw(&f.raw_tgt)?;
    let src_file = File::open(&f.src).map_err(|e| io_err("open", &f.src, e))?;

    // (c) image reads of uncopied grains.
    // The image opened once, as the raw side opens its file once.
    let img = e.image(id)?;
    let eng_read = |i: usize, b: &mut [u8]| img.read_at(rand_off(i, size, salt), b);
    let raw_read = |i: usize, b: &mut [u8]| {
        src_file
            .read_exact_at(b, rand_off(i, size, salt))
            .map_err(|e| io_err("pread", &f.src, e))
    };
    pair_sliced(
        raw_first,
        figs,
        lay.read_uncopied(),
        c.fast_ops,
        eng_read,
        raw_read,
    )?;

    // (b) first writes with durability, and the physical floor.
    let first = |base: usize| {
        let e = &e;
        move |i: usize, b: &mut [u8]| {
            let off = (base + i) as u64 * GRAIN;
            e.write(src, off, b)?;
            e.flush(src)
        }
    };
    let raw_sync = |base: usize| {
        let raw = &raw;
        move |i: usize, b: &mut [u8]| {
            let off = (base + i) as u64 * GRAIN;
            raw.write_all_at(b, off)
                .and_then(|()| raw.sync_data())
                .map_err(|e| io_err("pwrite+fdatasync", &f.raw, e))
        }
    };
    let floor = |i: usize, b: &mut [u8]| {
        let off = i as u64 * GRAIN;
        let mut g = vec![0u8; GRAIN as usize];
        raw.read_exact_at(&mut g, off)
            .and_then(|()| raw_tgt.write_all_at(&g, off))
            .and_then(|()| raw_tgt.sync_data())
            .and_then(|()| raw.write_all_at(b, off))
            .and_then(|()| raw.sync_data())
            .map_err(|e| io_err("floor", &f.raw, e))
    };
    // The floor of a rule-2 copy-before-write (crash model): the target's durability point,
    // then a record and the table's durability point, before the source write.
    let journal = open_rw(&f.raw_journal)?;
    let floor2 = |i: usize, b: &mut [u8]| {
        let off = i as u64 * GRAIN;
        let rec = (i * RECORD) as u64 % JOURNAL_BYTES;
        let mut g = vec![0u8; GRAIN as usize];
        raw.read_exact_at(&mut g, off)
            .and_then(|()| raw_tgt.write_all_at(&g, off))
            .and_then(|()| raw_tgt.sync_data())
            .and_then(|()| journal.write_all_at(&g[..RECORD], rec))
            .and_then(|()| journal.sync_data())
            .and_then(|()| raw.write_all_at(b, off))
            .and_then(|()| raw.sync_data())
            .map_err(|e| io_err("floor", &f.raw, e))
    };
    let e1 = run_ops(1, c.first_1, first(0));
    let (r1, fl, fl2) = if raw_first {
        let fl = run_ops(1, c.first_1, floor)?;
        let fl2 = run_ops(1, c.first_1, floor2)?;
        (run_ops(1, c.first_1, raw_sync(0))?, fl, fl2)
    } else {
        let r1 = run_ops(1, c.first_1, raw_sync(0))?;
        let fl2 = run_ops(1, c.first_1, floor2)?;
        (r1, run_ops(1, c.first_1, floor)?, fl2)
    };
    let e1 = e1?;
    record(&mut figs[lay.floor()].engine, e1.clone());
    record(&mut figs[lay.floor()].raw, fl);
    record(&mut figs[lay.floor_rule2()].engine, e1.clone());
    record(&mut figs[lay.floor_rule2()].raw, fl2);
    let mut base = c.first_1;
    for (k, &w) in opts.writers.iter().enumerate() {
        if w == 1 {
            record(&mut figs[lay.first(k)].engine, e1.clone());
            record(&mut figs[lay.first(k)].raw, r1.clone());
            continue;
        }
        pair(
            raw_first,
            figs,
            lay.first(k),
            || run_ops(w, c.first_many, first(base)),
            || run_ops(w, c.first_many, raw_sync(base)),
        )?;
        base += c.first_many;
    }

    // Every grain copied, session still active: the already-copied path.
    let grains = size / GRAIN;
    e.table().commit(vec![Entry::SetBits {
        session: id,
        start: 0,
        count: grains,
    }])?;
    let salt2 = salt ^ 0xabcd;
    // The raw side writes the same file, at the same offsets, through its own descriptor (every
    // grain is copied, so the image does not depend on the source any more): both sides see the
    // same inode, page cache and write-back state.
    let raw_src = open_rw(&f.src)?;
    for (k, &threads) in opts.writers.iter().enumerate() {
        if threads == 1 {
            pair_sliced(
                raw_first,
                figs,
                lay.copied(k),
                c.fast_ops,
                |i, b| e.write(src, rand_off(i, size, salt2), b),
                |i, b| {
                    raw_src
                        .write_all_at(b, rand_off(i, size, salt2))
                        .map_err(|e| io_err("pwrite", &f.src, e))
                },
            )?;
            continue;
        }
        pair(
            raw_first,
            figs,
            lay.copied(k),
            || {
                run_ops(threads, c.fast_ops, |i, b| {
                    e.write(src, rand_off(i, size, salt2), b)
                })
            },
            || {
                run_ops(threads, c.fast_ops, |i, b| {
                    raw_src
                        .write_all_at(b, rand_off(i, size, salt2))
                        .map_err(|e| io_err("pwrite", &f.src, e))
                })
            },
        )?;
    }
    // (c) image reads of copied grains. With `direct_copy`, the previous round's O_DIRECT copy
    // dropped the target's cached pages; load them again so that neither side reads the disk.
    // Every grain is copied, so the image lives in the target: the raw side reads the target
    // file at the same offsets (same inode, same cached pages), as the uncopied figure reads
    // the source.
    if opts.direct_copy {
        warm_page_cache(&f.tgt)?;
    }
    let tgt_file = File::open(&f.tgt).map_err(|e| io_err("open", &f.tgt, e))?;
    let raw_read_target = |i: usize, b: &mut [u8]| {
        tgt_file
            .read_exact_at(b, rand_off(i, size, salt))
            .map_err(|e| io_err("pread", &f.tgt, e))
    };
    pair_sliced(
        raw_first,
        figs,
        lay.read_copied(),
        c.fast_ops,
        eng_read,
        raw_read_target,
    )?;
    drop(tgt_file);
    drop(img);
    e.withdraw(id)?;

    // (d) background copy vs a raw copy of the same size; with `direct_copy` the engine is
    // reopened with O_DIRECT volumes so that both sides bypass the page cache.
    let (src, tgt) = if opts.direct_copy {
        drop(raw);
        drop(raw_src);
        drop(raw_tgt);
        drop(src_file);
        drop(e);
        let mut eo = engine_options(opts);
        eo.file_options.direct = true;
        e = Arc::new(Engine::open_path(&f.table, eo)?);
        (attach(&e, &f.src)?, attach(&e, &f.tgt)?)
    } else {
        (src, tgt)
    };
    run.copy_backend = e.backend_name();
    let mut direct = true;
    let eng_copy = || -> Result<f64> {
        let cid = e.establish(&whole(src, tgt, CopyMode::Copy))?;
        let t0 = Instant::now();
        let cp = Copier::start(
            e.clone(),
            CopierOptions {
                sessions: vec![cid],
                ..CopierOptions::default()
            },
        )?;
        let p = cp.join()?;
        Ok(p.bytes_copied as f64 / t0.elapsed().as_secs_f64())
    };
    let (ev, rv) = if raw_first {
        let (r, d) = raw_copy(&f.src, &f.raw_copy, size)?;
        direct = d;
        (eng_copy()?, r)
    } else {
        let ev = eng_copy()?;
        let (r, d) = raw_copy(&f.src, &f.raw_copy, size)?;
        direct = direct && d;
        (ev, r)
    };
    figs[lay.copy()].engine.per_round.push(ev);
    figs[lay.copy()].raw.per_round.push(rv);
    run.direct &= direct;
    Ok(())
}

/// Read `path` once through the page cache (1 MiB at a time).
fn warm_page_cache(path: &Path) -> Result<()> {
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

type Measured = Result<(f64, Vec<u64>)>;

/// Measure the engine and raw sides of a figure in the order this round prescribes.
fn pair(
    raw_first: bool,
    figs: &mut [Figure],
    i: usize,
    eng: impl FnOnce() -> Measured,
    raw: impl FnOnce() -> Measured,
) -> Result<()> {
    let (ev, rv) = if raw_first {
        let rv = raw()?;
        (eng()?, rv)
    } else {
        let ev = eng()?;
        (ev, raw()?)
    };
    record(&mut figs[i].engine, ev);
    record(&mut figs[i].raw, rv);
    Ok(())
}

/// Single-threaded figures whose per-operation cost is a few microseconds: engine and raw
/// alternate in this many slices per round (each side's rate is its total operations over its
/// total time), so that a burst of load from a neighbour hits both sides alike.
const SLICES: usize = 10;

/// Like [`pair`] for one thread, but interleaved in [`SLICES`] slices of `ops / SLICES`
/// operations; operation indices stay distinct across slices.
fn pair_sliced<E, R>(
    raw_first: bool,
    figs: &mut [Figure],
    i: usize,
    ops: usize,
    eng: E,
    raw: R,
) -> Result<()>
where
    E: Fn(usize, &mut [u8]) -> Result<()> + Sync,
    R: Fn(usize, &mut [u8]) -> Result<()> + Sync,
{
    let per = (ops / SLICES).max(1);
    let (mut e_secs, mut r_secs) = (0.0f64, 0.0f64);
    let (mut e_lat, mut r_lat) = (Vec::new(), Vec::new());
    for k in 0..SLICES {
        let base = k * per;
        let e_run = || run_ops(1, per, |j, b| eng(base + j, b));
        let r_run = || run_ops(1, per, |j, b| raw(base + j, b));
        let ((er, el), (rr, rl)) = if (k % 2 == 0) == raw_first {
            let r = r_run()?;
            (e_run()?, r)
        } else {
            let e = e_run()?;
            (e, r_run()?)
        };
        e_secs += per as f64 / er;
        r_secs += per as f64 / rr;
        e_lat.extend(el);
        r_lat.extend(rl);
    }
    let total = (per * SLICES) as f64;
    record(&mut figs[i].engine, (total / e_secs, e_lat));
    record(&mut figs[i].raw, (total / r_secs, r_lat));
    Ok(())
}

fn fmt_side(kind: Kind, s: &Side) -> String {
    if s.per_round.is_empty() {
        return "-".to_string();
    }
    let (lo, hi) = min_max(&s.per_round);
    let m = median(&s.per_round);
    match kind {
        Kind::Write | Kind::Read => format!("{m:.0} [{lo:.0}..{hi:.0}] IOPS"),
        Kind::Copy => format!("{:.0} [{:.0}..{:.0}] MB/s", m / 1e6, lo / 1e6, hi / 1e6),
        Kind::Time => format!("{m:.2} [{lo:.2}..{hi:.2}] ms"),
    }
}

fn print_table(
    opts: &BenchOptions,
    figs: &[Figure],
    run: &RunInfo,
    out: &mut dyn Write,
) -> Result<()> {
    let direct = run.direct;
    let w = |e: std::io::Error| Error::io("write", "stdout", 0, e);
    writeln!(
        out,
        "timezero bench: {} volumes, {} rounds, 64KiB grain, 4KiB I/O; median [min..max] over rounds",
        crate::units::format_size(opts.size),
        opts.rounds
    )
    .map_err(w)?;
    writeln!(
        out,
        "ratio = median of per-round ratios; cost = engine time per op / raw, speed = engine rate / raw"
    )
    .map_err(w)?;
    writeln!(
        out,
        "engine backend: {} (buffered); background copy: {}{}",
        run.backend,
        run.copy_backend,
        if opts.direct_copy {
            " with O_DIRECT volumes"
        } else {
            " buffered"
        }
    )
    .map_err(w)?;
    for f in figs {
        writeln!(out, "{}", f.name).map_err(w)?;
        let p = latency_text(&f.engine.lat_ns);
        writeln!(out, "  engine: {}{p}", fmt_side(f.kind, &f.engine)).map_err(w)?;
        if f.ratio != Ratio::None {
            let p = latency_text(&f.raw.lat_ns);
            let label = if f.kind == Kind::Copy && !direct {
                "1MiB buffered copy (O_DIRECT refused)"
            } else {
                f.raw_label
            };
            writeln!(out, "  raw ({label}): {}{p}", fmt_side(f.kind, &f.raw)).map_err(w)?;
            let r = f.ratios();
            let (lo, hi) = min_max(&r);
            let what = if f.ratio == Ratio::Cost {
                "cost"
            } else {
                "speed"
            };
            writeln!(
                out,
                "  ratio engine/raw ({what}): {:.2}x [{lo:.2}..{hi:.2}]",
                median(&r)
            )
            .map_err(w)?;
        }
    }
    Ok(())
}

fn lat_json(lat: &[u64]) -> serde_json::Value {
    let mut s = lat.to_vec();
    s.sort_unstable();
    let mean = if s.is_empty() {
        0.0
    } else {
        s.iter().map(|x| *x as f64).sum::<f64>() / s.len() as f64
    };
    let mut pct = serde_json::Map::new();
    for p in [1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9] {
        pct.insert(format!("{p:.6}"), serde_json::json!(percentile(&s, p)));
    }
    serde_json::json!({
        "min": s.first().copied().unwrap_or(0),
        "max": s.last().copied().unwrap_or(0),
        "mean": mean,
        "percentile": pct,
    })
}

fn job_json(name: String, f: &Figure, side: &Side) -> serde_json::Value {
    let m = median(&side.per_round);
    let (lo, hi) = min_max(&side.per_round);
    let (dir, iops, bw_kib) = match f.kind {
        Kind::Write => ("write", m, m * f.op_bytes as f64 / 1024.0),
        Kind::Read => ("read", m, m * f.op_bytes as f64 / 1024.0),
        Kind::Copy => ("write", m / COPY_CHUNK as f64, m / 1024.0),
        Kind::Time => ("sync", 0.0, 0.0),
    };
    let mut io = serde_json::json!({
        "iops": iops,
        "bw": bw_kib,
        "lat_ns": lat_json(&side.lat_ns),
        "rounds": {"median": m, "min": lo, "max": hi, "values": side.per_round},
    });
    if f.kind == Kind::Time {
        io = serde_json::json!({
            "lat_ns": {
                "mean": m * 1e6, "min": lo * 1e6, "max": hi * 1e6,
                "percentile": {"50.000000": m * 1e6},
            },
            "rounds": {"median_ms": m, "min_ms": lo, "max_ms": hi, "values_ms": side.per_round},
        });
    }
    let mut j = serde_json::Map::new();
    j.insert("jobname".into(), serde_json::json!(name));
    j.insert(dir.into(), io);
    serde_json::Value::Object(j)
}

/// Median/min/max rate and latency percentiles of one side, for the per-writer summary.
fn side_summary(s: &Side) -> serde_json::Value {
    let (lo, hi) = min_max(&s.per_round);
    let mut lat = s.lat_ns.clone();
    lat.sort_unstable();
    serde_json::json!({
        "iops_median": median(&s.per_round), "iops_min": lo, "iops_max": hi,
        "lat_p50_ns": percentile(&lat, 50.0), "lat_p99_ns": percentile(&lat, 99.0),
    })
}

fn print_json(
    opts: &BenchOptions,
    figs: &[Figure],
    run: &RunInfo,
    out: &mut dyn Write,
) -> Result<()> {
    let mut jobs = Vec::new();
    let mut ratios = Vec::new();
    let mut by_writers = Vec::new();
    for f in figs.iter().filter(|f| f.writers > 0) {
        let r = f.ratios();
        let (lo, hi) = min_max(&r);
        by_writers.push(serde_json::json!({
            "figure": if f.name.starts_with("first") { "first-write" } else { "already-copied" },
            "writers": f.writers,
            "engine": side_summary(&f.engine),
            "raw": side_summary(&f.raw),
            "raw_label": f.raw_label,
            "cost_ratio": {"median": median(&r), "min": lo, "max": hi},
        }));
    }
    for f in figs {
        jobs.push(job_json(format!("engine: {}", f.name), f, &f.engine));
        if f.ratio != Ratio::None {
            jobs.push(job_json(
                format!("raw ({}): {}", f.raw_label, f.name),
                f,
                &f.raw,
            ));
            let r = f.ratios();
            let (lo, hi) = min_max(&r);
            ratios.push(serde_json::json!({
                "figure": f.name,
                "kind": if f.ratio == Ratio::Cost { "cost" } else { "speed" },
                "median": median(&r), "min": lo, "max": hi,
            }));
        }
    }
    let v = serde_json::json!({
        "fio version": concat!("timezero-bench-", env!("CARGO_PKG_VERSION")),
        "timestamp": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "global options": {
            "size": opts.size, "rounds": opts.rounds, "bs": IO, "grain": GRAIN,
            "writers": opts.writers, "backend": run.backend,
            "backend_option": opts.backend.name(),
            "copy_backend": run.copy_backend, "direct_copy": opts.direct_copy,
            "raw_copy_direct": run.direct,
        },
        "recovery_1tib": run.big_recovery.as_ref().map(|b| serde_json::json!({
            "grains": b.grains, "bitmap_bytes": b.bitmap_bytes,
            "open_ms": {"median": median(&b.open_ms), "values": b.open_ms},
            "peak_rss_growth_kib": {"median": median(&b.growth_kib), "values": b.growth_kib},
        })),
        "by_writers": by_writers,
        "jobs": jobs,
        "ratios": ratios,
    });
    let s = serde_json::to_string_pretty(&v).map_err(|e| Error::invalid("json", e.to_string()))?;
    writeln!(out, "{s}").map_err(|e| Error::io("write", "stdout", 0, e))
}

/// "  (p50 X us, p99 Y us)" for a set of latencies in ns, empty when there are none.
fn latency_text(lat_ns: &[u64]) -> String {
    if lat_ns.is_empty() {
        return String::new();
    }
    let mut lat = lat_ns.to_vec();
    lat.sort_unstable();
    format!(
        "  (p50 {:.1} us, p99 {:.1} us)",
        percentile(&lat, 50.0) as f64 / 1e3,
        percentile(&lat, 99.0) as f64 / 1e3
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_completes() {
        let opts = BenchOptions {
            dir: None,
            size: 16 * MIB,
            rounds: 1,
            json: true,
            ..BenchOptions::default()
        };
        let mut out = Vec::new();
        run(&opts, &mut out, &mut std::io::sink()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["jobs"].as_array().unwrap().len() >= 9);
    }

    #[test]
    fn writers_io_uring_and_direct_copy() {
        let opts = BenchOptions {
            dir: None,
            size: 16 * MIB,
            rounds: 1,
            json: true,
            json_out: None,
            writers: vec![4, 1, 16],
            backend: crate::engine::Backend::IoUring,
            direct_copy: true,
            probe_exe: None,
        };
        let mut out = Vec::new();
        run(&opts, &mut out, &mut std::io::sink()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let w = v["by_writers"].as_array().unwrap();
        assert_eq!(w.len(), 6);
        assert_eq!(w[0]["writers"], 1);
        assert_eq!(w[5]["figure"], "first-write");
        assert!(w[5]["engine"]["iops_median"].as_f64().unwrap() > 0.0);
        assert_eq!(v["global options"]["backend_option"], "io-uring");
        let b = v["global options"]["backend"].as_str().unwrap();
        assert!(b == "io_uring" || b == "pread", "{b}");
    }
}
