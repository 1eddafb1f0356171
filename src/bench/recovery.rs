//! The recovery of a 1 TiB session, measured in a fresh process each round
//! (`timezero recovery-probe`): time and peak resident memory.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::files::{attach, io_err, whole, Files};
use super::{BenchOptions, GRAIN};
use crate::activity::format::{CopyMode, Entry};
use crate::engine::{Engine, EngineOptions};
use crate::{Error, Result};

/// Size of the source (and target) of the large-recovery measurement.
const BIG_SOURCE_BYTES: u64 = 1 << 40;

/// The recovery of a session over a 1 TiB sparse source, each round in a fresh process.
#[derive(Debug, Clone)]
pub(super) struct BigRecovery {
    /// Grains of the session.
    pub(super) grains: u64,
    /// Bytes of its copied bitmap.
    pub(super) bitmap_bytes: u64,
    /// Per round: time to open the table with its volumes, in ms.
    pub(super) open_ms: Vec<f64>,
    /// Per round: growth of the peak resident memory while opening, in KiB.
    pub(super) growth_kib: Vec<f64>,
}

/// The line `timezero recovery-probe` prints (keys in this order, the order `serde_json` gives
/// a map's keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProbeReport {
    /// Grains of every session of the table.
    grains: u64,
    /// Peak resident memory after the open, in KiB (`VmHWM`).
    hwm_after_kib: u64,
    /// Time to open the table with its volumes, in ms.
    open_ms: f64,
    /// Anonymous resident memory after the open, in KiB.
    rss_anon_after_kib: u64,
    /// Resident memory before the open, in KiB (`VmRSS`).
    rss_before_kib: u64,
    /// File-backed resident memory after the open, in KiB.
    rss_file_after_kib: u64,
}

/// Build a table holding one session over a 1 TiB sparse source (half its grains copied) and
/// open it `opts.rounds` times, each in a fresh `timezero recovery-probe` process. `None` when
/// the file system cannot hold a 1 TiB sparse file.
pub(super) fn big_recovery(
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
        let p = probe(exe, &table)?;
        b.open_ms.push(p.open_ms);
        b.growth_kib
            .push((p.hwm_after_kib as f64 - p.rss_before_kib as f64).max(0.0));
    }
    Ok(Some(b))
}

/// Run `exe recovery-probe table` and read its report.
fn probe(exe: &Path, table: &Path) -> Result<ProbeReport> {
    let o = std::process::Command::new(exe)
        .arg("recovery-probe")
        .arg(table)
        .output()
        .map_err(|e| io_err("spawn", exe, e))?;
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
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.trim())
        .map_err(|e| Error::invalid("recovery probe output", e.to_string()))
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
    let grains: u64 = e.status().iter().map(|s| s.grains_total.get()).sum();
    drop(e);
    let report = ProbeReport {
        grains,
        hwm_after_kib: hwm,
        open_ms,
        rss_anon_after_kib: anon,
        rss_before_kib: before,
        rss_file_after_kib: file,
    };
    serde_json::to_string(&report).map_err(|e| Error::invalid("json", e.to_string()))
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
        .ok_or_else(|| Error::invalid("/proc/self/status", format!("no {key}")))
}
