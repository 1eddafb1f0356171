//! `timezero bench`: the engine against the raw file, measured in one process, interleaved
//! round by round on temporary files.
//!
//! Every figure pairs an engine measurement with its raw counterpart taken in the same round
//! (the machine is shared and single runs swing), and reports the median and min/max over
//! rounds plus the median of the per-round ratios. See docs/benchmarks.md for what each figure
//! means and the targets.
//!
//! `files` creates and opens the files of a run and attaches them as volumes; `figures` names
//! what is measured and where it sits; `measure` times operations and pairs the two sides;
//! `round` measures every figure once; `recovery` measures the 1 TiB recovery in a fresh
//! process; `stats` holds the arithmetic over rounds and latencies; `report` prints the table
//! or the JSON (the types from [`BenchJson`] down).

mod figures;
mod files;
mod measure;
mod recovery;
mod report;
mod round;
mod stats;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use crate::activity::format::CopyMode;
use crate::engine::{Engine, EngineOptions};
use crate::{Error, Result};
use files::{attach, io_err, whole, Files};
use report::RunInfo;

pub use recovery::recovery_probe;
pub use report::{
    BenchJson, BigRecoveryJson, GlobalOptions, IoJob, Job, Latency, Median50, MedianValues,
    RatioRow, Rounds, SideSummary, Spread, TimeJob, TimeLatency, TimeRounds, WriterRow,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const IO: usize = 4096;
const GRAIN: u64 = 64 * KIB;
/// Size of the stand-in journal of the rule-2 and copy-log floors (records written round-robin
/// in its first two quarters, the copy log's grains in its second half).
const JOURNAL_BYTES: u64 = 16 * MIB;
/// One record of the rule-2 and copy-log floors: a 512-byte sector.
const RECORD: usize = 512;
const COPY_CHUNK: usize = 1 << 20;
const DIRECT_ALIGN: usize = 4096;

/// Options of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Directory for the temporary files; `None` = a new temporary directory (removed after).
    pub dir: Option<PathBuf>,
    /// Directory for the activity table and the floors' stand-in journal (in a new
    /// temporary directory inside it, removed after); `None` = with the volumes. A table on
    /// another device than the volumes makes its durability point stop competing with the
    /// target's flush.
    pub table_dir: Option<PathBuf>,
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
    pub backend: crate::volume::Backend,
    /// Open the engine's volumes with `O_DIRECT` for the background-copy figure, like the raw
    /// copy it is compared with.
    pub direct_copy: bool,
    /// Run first writes with checked copy records ([`EngineOptions::checked_copies`], the
    /// default); false: the serial path.
    pub checked_copies: bool,
    /// Let the background copy's engine have the kernel copy file to file
    /// ([`EngineOptions::copy_offload`], the default).
    pub copy_offload: bool,
    /// Bytes of the table's copy log ([`crate::TableOptions::log_bytes`]; 0: none, and a
    /// first write's source write waits for the target's flush too).
    pub log_bytes: u64,
    /// The `timezero` binary, to measure the recovery of a 1 TiB session in a fresh process
    /// (`timezero recovery-probe`, once per round): time and peak resident memory. `None`
    /// skips that measurement.
    pub probe_exe: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            dir: None,
            table_dir: None,
            size: 256 * MIB,
            rounds: 5,
            json: false,
            json_out: None,
            writers: vec![1, 32],
            backend: crate::volume::Backend::Auto,
            probe_exe: None,
            direct_copy: false,
            checked_copies: true,
            copy_offload: true,
            log_bytes: crate::limits::LOG_DEFAULT_BYTES,
        }
    }
}

fn engine_options(opts: &BenchOptions) -> EngineOptions {
    let mut o = EngineOptions {
        backend: opts.backend,
        checked_copies: opts.checked_copies,
        copy_offload: opts.copy_offload,
        ..EngineOptions::default()
    };
    o.table.log_bytes = opts.log_bytes;
    o
}

/// `opts` checked, with the writer counts sorted and deduplicated.
fn checked(opts: &BenchOptions) -> Result<BenchOptions> {
    if opts.size < 16 * MIB || !opts.size.is_multiple_of(GRAIN) {
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
    let c = figures::counts(opts.size, &writers);
    if writers.iter().any(|w| *w != 1 && c.first_many < *w) {
        return Err(Error::invalid(
            "bench writers",
            "too many writer counts for this size (each needs its own grains)",
        ));
    }
    Ok(BenchOptions {
        writers,
        ..opts.clone()
    })
}

/// Run the benchmark and print the result to `out`; progress goes to `log`.
///
/// # Errors
/// [`Error::Invalid`] for a bad size or round count; I/O and engine errors.
pub fn run(opts: &BenchOptions, out: &mut dyn Write, log: &mut dyn Write) -> Result<()> {
    let opts = &checked(opts)?;
    let _ = writeln!(
        log,
        "timezero bench: {} per volume, {} rounds",
        crate::units::format_size(opts.size),
        opts.rounds
    );
    let files = Files::create(opts)?;
    let _ = writeln!(log, "files in {}", files.dir.display());
    if let Some(d) = &files.table_dir {
        let _ = writeln!(log, "table in {}", d.display());
    }
    {
        let e = Engine::create_path(&files.table, engine_options(opts))?;
        let s = attach(&e, &files.src)?;
        let t = attach(&e, &files.tgt)?;
        e.establish(&whole(s, t, CopyMode::NoCopy))?;
    }
    let mut figs = figures::figures(&opts.writers);
    let mut run = RunInfo {
        direct: true,
        backend: "",
        copy_backend: "",
        copy_offloaded: 0,
        big_recovery: None,
    };
    for round in 0..opts.rounds {
        let _ = writeln!(log, "round {}/{}", round + 1, opts.rounds);
        round::one_round(opts, &files, &mut figs, round, &mut run)?;
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
        run.big_recovery = recovery::big_recovery(opts, &files, exe, log)?;
    }
    if let Some(p) = &opts.json_out {
        let mut f = File::create(p).map_err(|e| io_err("create", p, e))?;
        report::print_json(opts, &figs, &run, &mut f)?;
    }
    if opts.json {
        report::print_json(opts, &figs, &run, out)
    } else {
        report::print_table(opts, &figs, &run, out)?;
        if let Some(b) = &run.big_recovery {
            report::print_big_recovery(b, out);
        }
        Ok(())
    }
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
        let jobs = v["jobs"].as_array().unwrap();
        assert!(jobs.len() >= 9);
        // Each floor runs beside the engine's first writes, and did its writes.
        for floor in ["vs floor", "vs rule-2 floor", "vs copy-log floor"] {
            for side in ["engine: ", "raw (floor: "] {
                let job = jobs
                    .iter()
                    .find(|j| {
                        let name = j["jobname"].as_str().unwrap();
                        name.starts_with(side) && name.ends_with(floor)
                    })
                    .unwrap_or_else(|| panic!("no {side}... {floor} job"));
                assert!(job["write"]["iops"].as_f64().unwrap() > 0.0, "{job}");
            }
        }
    }

    #[test]
    fn table_apart_from_the_volumes() {
        let vols = tempfile::tempdir().unwrap();
        let meta = tempfile::tempdir().unwrap();
        let opts = BenchOptions {
            dir: Some(vols.path().to_path_buf()),
            table_dir: Some(meta.path().to_path_buf()),
            size: 16 * MIB,
            rounds: 1,
            json: true,
            ..BenchOptions::default()
        };
        let (mut out, mut log) = (Vec::new(), Vec::new());
        run(&opts, &mut out, &mut log).unwrap();
        let log = String::from_utf8(log).unwrap();
        let line = |what: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(what))
                .unwrap_or_else(|| panic!("no {what:?} in {log}"))
                .to_string()
        };
        assert!(line("table in ").starts_with(&meta.path().display().to_string()));
        assert!(line("files in ").starts_with(&vols.path().display().to_string()));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["global options"]["table_apart"], true);
        assert_eq!(
            v["global options"]["copy_log_bytes"],
            crate::limits::LOG_DEFAULT_BYTES
        );
        // Both temporary directories are gone after the run.
        assert_eq!(std::fs::read_dir(meta.path()).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(vols.path()).unwrap().count(), 0);
    }

    #[test]
    fn writers_io_uring_and_direct_copy() {
        let opts = BenchOptions {
            dir: None,
            table_dir: None,
            size: 16 * MIB,
            rounds: 1,
            json: true,
            json_out: None,
            writers: vec![4, 1, 16],
            backend: crate::volume::Backend::IoUring,
            direct_copy: true,
            checked_copies: true,
            copy_offload: true,
            log_bytes: 0,
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
        assert_eq!(v["global options"]["copy_log_bytes"], 0);
        let b = v["global options"]["backend"].as_str().unwrap();
        assert!(b == "io_uring" || b == "pread", "{b}");
    }
}
