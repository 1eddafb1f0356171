//! The report of a run: a table for people, or fio-shaped JSON for scripts
//! (scripts/plot-bench.py, scripts/qemu-compare.sh, docs/bench-writers.json).
//!
//! The JSON is built from the typed structs below. Their fields are declared in the order of
//! their keys' names, so the output lists keys in the same (sorted) order as a `serde_json` map.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use super::figures::{Figure, Kind, Side};
use super::recovery::BigRecovery;
use super::stats::{mean, median, min_max, percentile, sorted, Ratio};
use super::{BenchOptions, COPY_CHUNK, GRAIN, IO, MIB};
use crate::{Error, Result};

/// Facts about a run, for the report.
pub(super) struct RunInfo {
    /// Whether the raw copy used `O_DIRECT` on both sides in every round.
    pub(super) direct: bool,
    /// The engine's file backend.
    pub(super) backend: &'static str,
    /// The file backend of the engine that ran the background copy.
    pub(super) copy_backend: &'static str,
    /// Bytes of the background copy the kernel copied file to file (copy offload), all rounds.
    pub(super) copy_offloaded: u64,
    /// The 1 TiB recovery measurement, when made.
    pub(super) big_recovery: Option<BigRecovery>,
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

/// The table: a header naming the run's parameters, then each figure's engine side, raw side and
/// ratio.
pub(super) fn print_table(
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
        "engine backend: {} (buffered); background copy: {}{}{}; first writes: {}; table: {}",
        run.backend,
        run.copy_backend,
        if opts.direct_copy {
            " with O_DIRECT volumes"
        } else {
            " buffered"
        },
        if run.copy_offloaded > 0 {
            " (copy_file_range)"
        } else {
            ""
        },
        match (opts.checked_copies, opts.log_bytes) {
            (false, _) => "serial copy-before-write".to_string(),
            (true, 0) => "checked copy records, no copy log".to_string(),
            (true, n) => format!(
                "checked copy records, {} copy log",
                crate::units::format_size(n)
            ),
        },
        match &opts.table_dir {
            Some(d) => format!("in {} (apart from the volumes)", d.display()),
            None => "with the volumes".to_string(),
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

/// "  (p50 X us, p99 Y us)" for a set of latencies in ns, empty when there are none.
fn latency_text(lat_ns: &[u64]) -> String {
    if lat_ns.is_empty() {
        return String::new();
    }
    let lat = sorted(lat_ns);
    format!(
        "  (p50 {:.1} us, p99 {:.1} us)",
        percentile(&lat, 50.0) as f64 / 1e3,
        percentile(&lat, 99.0) as f64 / 1e3
    )
}

/// The 1 TiB recovery lines of the table.
pub(super) fn print_big_recovery(b: &BigRecovery, out: &mut dyn Write) {
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

/// The whole JSON document of a run, shaped like fio's `--output-format=json`.
#[derive(Debug, Serialize)]
pub struct BenchJson<'a> {
    /// Per writer count: the already-copied and first-write figures (scripts/plot-bench.py).
    pub by_writers: Vec<WriterRow<'a>>,
    /// `timezero-bench-` and the crate version.
    #[serde(rename = "fio version")]
    pub fio_version: &'static str,
    /// The run's parameters.
    #[serde(rename = "global options")]
    pub global_options: GlobalOptions<'a>,
    /// One job per figure side: the engine's, then the raw one when the figure has one.
    pub jobs: Vec<Job<'a>>,
    /// Every figure with a raw counterpart: its engine/raw ratio over rounds.
    pub ratios: Vec<RatioRow<'a>>,
    /// The 1 TiB recovery measurement; `null` when it was not made.
    pub recovery_1tib: Option<BigRecoveryJson<'a>>,
    /// When the report was made, seconds since the Unix epoch.
    pub timestamp: u64,
}

/// The parameters of a run.
#[derive(Debug, Serialize)]
pub struct GlobalOptions<'a> {
    /// The engine's file backend as it ran (`pread`, `io_uring`).
    pub backend: &'static str,
    /// The backend asked for (`auto`, `pread`, `io-uring`).
    pub backend_option: &'static str,
    /// Bytes per I/O.
    pub bs: usize,
    /// The file backend of the engine that ran the background copy.
    pub copy_backend: &'static str,
    /// Bytes of the table's copy log (0: none).
    pub copy_log_bytes: u64,
    /// Whether the background copy's engine opened its volumes with `O_DIRECT`.
    pub direct_copy: bool,
    /// Grain bytes.
    pub grain: u64,
    /// Whether the raw copy used `O_DIRECT` on both sides in every round.
    pub raw_copy_direct: bool,
    /// Rounds.
    pub rounds: usize,
    /// Bytes of each volume file.
    pub size: u64,
    /// Whether the table (and the floors' stand-in journal) lived in their own
    /// directory (`--table-dir`), not with the volumes.
    pub table_apart: bool,
    /// Writer counts, sorted.
    pub writers: &'a [usize],
}

/// A median and the range over rounds.
#[derive(Debug, Serialize)]
pub struct Spread {
    /// Largest.
    pub max: f64,
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Spread {
        let (min, max) = min_max(v);
        Spread {
            max,
            median: median(v),
            min,
        }
    }
}

/// One row of `by_writers`: a write figure at one writer count.
#[derive(Debug, Serialize)]
pub struct WriterRow<'a> {
    /// Engine time per write over raw time per write, over rounds.
    pub cost_ratio: Spread,
    /// The engine's side.
    pub engine: SideSummary,
    /// `already-copied` or `first-write`.
    pub figure: &'static str,
    /// The raw side.
    pub raw: SideSummary,
    /// What the raw side does.
    pub raw_label: &'a str,
    /// Writer threads.
    pub writers: usize,
}

/// One side of a [`WriterRow`]: rates over rounds and latency percentiles over every write.
#[derive(Debug, Serialize)]
pub struct SideSummary {
    /// Largest rate of a round, operations per second.
    pub iops_max: f64,
    /// Median rate over rounds.
    pub iops_median: f64,
    /// Smallest rate of a round.
    pub iops_min: f64,
    /// Median latency, ns.
    pub lat_p50_ns: u64,
    /// 99th percentile latency, ns.
    pub lat_p99_ns: u64,
}

impl SideSummary {
    fn of(s: &Side) -> SideSummary {
        let (lo, hi) = min_max(&s.per_round);
        let lat = sorted(&s.lat_ns);
        SideSummary {
            iops_max: hi,
            iops_median: median(&s.per_round),
            iops_min: lo,
            lat_p50_ns: percentile(&lat, 50.0),
            lat_p99_ns: percentile(&lat, 99.0),
        }
    }
}

/// One fio-shaped job: one side of one figure, under the key of its direction.
#[derive(Debug, Serialize)]
pub struct Job<'a> {
    /// `engine: FIGURE` or `raw (LABEL): FIGURE`.
    pub jobname: String,
    /// Read figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read: Option<IoJob<'a>>,
    /// The recovery time figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<TimeJob<'a>>,
    /// Write figures and the background copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write: Option<IoJob<'a>>,
}

/// The figures of an I/O job.
#[derive(Debug, Serialize)]
pub struct IoJob<'a> {
    /// KiB per second (median over rounds).
    pub bw: f64,
    /// Operations per second (median over rounds; 1 MiB chunks for the copy).
    pub iops: f64,
    /// Latencies of every operation of every round.
    pub lat_ns: Latency,
    /// The per-round rates.
    pub rounds: Rounds<'a>,
}

/// Latencies in ns, fio-shaped.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// Largest (0 when none).
    pub max: u64,
    /// Mean (0 when none).
    pub mean: f64,
    /// Smallest (0 when none).
    pub min: u64,
    /// By percentile, keyed like fio (`"99.900000"`).
    pub percentile: BTreeMap<String, u64>,
}

impl Latency {
    fn of(lat: &[u64]) -> Latency {
        let s = sorted(lat);
        let percentile = [1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9]
            .into_iter()
            .map(|p| (format!("{p:.6}"), super::stats::percentile(&s, p)))
            .collect();
        Latency {
            max: s.last().copied().unwrap_or(0),
            mean: mean(&s),
            min: s.first().copied().unwrap_or(0),
            percentile,
        }
    }
}

/// The per-round rates of an I/O job and their spread.
#[derive(Debug, Serialize)]
pub struct Rounds<'a> {
    /// Largest.
    pub max: f64,
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Each round's rate.
    pub values: &'a [f64],
}

/// The figures of a time job (recovery), fio-shaped.
#[derive(Debug, Serialize)]
pub struct TimeJob<'a> {
    /// The per-round times in ns.
    pub lat_ns: TimeLatency,
    /// The per-round times in ms.
    pub rounds: TimeRounds<'a>,
}

/// Per-round times in ns: median (as mean and 50th percentile) and range.
#[derive(Debug, Serialize)]
pub struct TimeLatency {
    /// Largest.
    pub max: f64,
    /// The median over rounds.
    pub mean: f64,
    /// Smallest.
    pub min: f64,
    /// The median over rounds, keyed like fio.
    pub percentile: Median50,
}

/// `{"50.000000": median}`.
#[derive(Debug, Serialize)]
pub struct Median50 {
    /// The median.
    #[serde(rename = "50.000000")]
    pub p50: f64,
}

/// The per-round times in ms and their spread.
#[derive(Debug, Serialize)]
pub struct TimeRounds<'a> {
    /// Largest.
    pub max_ms: f64,
    /// Median.
    pub median_ms: f64,
    /// Smallest.
    pub min_ms: f64,
    /// Each round's time.
    pub values_ms: &'a [f64],
}

/// One row of `ratios`: a figure's engine/raw ratio over rounds.
#[derive(Debug, Serialize)]
pub struct RatioRow<'a> {
    /// The figure's name.
    pub figure: &'a str,
    /// `cost` (time per operation, lower is better) or `speed` (rate, higher is better).
    pub kind: &'static str,
    /// Largest.
    pub max: f64,
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
}

/// The 1 TiB recovery measurement.
#[derive(Debug, Serialize)]
pub struct BigRecoveryJson<'a> {
    /// Bytes of the session's copied bitmap.
    pub bitmap_bytes: u64,
    /// Grains of the session.
    pub grains: u64,
    /// Time to open, ms.
    pub open_ms: MedianValues<'a>,
    /// Growth of the peak resident memory while opening, KiB.
    pub peak_rss_growth_kib: MedianValues<'a>,
}

/// A median and the values it is taken over.
#[derive(Debug, Serialize)]
pub struct MedianValues<'a> {
    /// Median.
    pub median: f64,
    /// Each round's value.
    pub values: &'a [f64],
}

impl<'a> MedianValues<'a> {
    fn of(values: &'a [f64]) -> Self {
        MedianValues {
            median: median(values),
            values,
        }
    }
}

impl<'a> Job<'a> {
    /// The job of one side of figure `f`.
    fn of(jobname: String, f: &Figure, side: &'a Side) -> Job<'a> {
        let m = median(&side.per_round);
        let (lo, hi) = min_max(&side.per_round);
        let mut job = Job {
            jobname,
            read: None,
            sync: None,
            write: None,
        };
        let io = |iops: f64, bw: f64| IoJob {
            bw,
            iops,
            lat_ns: Latency::of(&side.lat_ns),
            rounds: Rounds {
                max: hi,
                median: m,
                min: lo,
                values: &side.per_round,
            },
        };
        match f.kind {
            Kind::Write => job.write = Some(io(m, m * f.op_bytes as f64 / 1024.0)),
            Kind::Read => job.read = Some(io(m, m * f.op_bytes as f64 / 1024.0)),
            Kind::Copy => job.write = Some(io(m / COPY_CHUNK as f64, m / 1024.0)),
            Kind::Time => {
                job.sync = Some(TimeJob {
                    lat_ns: TimeLatency {
                        max: hi * 1e6,
                        mean: m * 1e6,
                        min: lo * 1e6,
                        percentile: Median50 { p50: m * 1e6 },
                    },
                    rounds: TimeRounds {
                        max_ms: hi,
                        median_ms: m,
                        min_ms: lo,
                        values_ms: &side.per_round,
                    },
                });
            }
        }
        job
    }
}

impl<'a> BenchJson<'a> {
    /// The document of a run.
    fn new(opts: &'a BenchOptions, figs: &'a [Figure], run: &'a RunInfo) -> BenchJson<'a> {
        let by_writers = figs
            .iter()
            .filter(|f| f.writers > 0)
            .map(|f| WriterRow {
                cost_ratio: Spread::of(&f.ratios()),
                engine: SideSummary::of(&f.engine),
                figure: if f.name.starts_with("first") {
                    "first-write"
                } else {
                    "already-copied"
                },
                raw: SideSummary::of(&f.raw),
                raw_label: f.raw_label,
                writers: f.writers,
            })
            .collect();
        let mut jobs = Vec::new();
        let mut ratios = Vec::new();
        for f in figs {
            jobs.push(Job::of(format!("engine: {}", f.name), f, &f.engine));
            if f.ratio != Ratio::None {
                jobs.push(Job::of(
                    format!("raw ({}): {}", f.raw_label, f.name),
                    f,
                    &f.raw,
                ));
                let r = Spread::of(&f.ratios());
                ratios.push(RatioRow {
                    figure: &f.name,
                    kind: if f.ratio == Ratio::Cost {
                        "cost"
                    } else {
                        "speed"
                    },
                    max: r.max,
                    median: r.median,
                    min: r.min,
                });
            }
        }
        BenchJson {
            by_writers,
            fio_version: concat!("timezero-bench-", env!("CARGO_PKG_VERSION")),
            global_options: GlobalOptions {
                backend: run.backend,
                backend_option: opts.backend.name(),
                bs: IO,
                copy_backend: run.copy_backend,
                copy_log_bytes: if opts.checked_copies {
                    opts.log_bytes
                } else {
                    0
                },
                direct_copy: opts.direct_copy,
                grain: GRAIN,
                raw_copy_direct: run.direct,
                rounds: opts.rounds,
                size: opts.size,
                table_apart: opts.table_dir.is_some(),
                writers: &opts.writers,
            },
            jobs,
            ratios,
            recovery_1tib: run.big_recovery.as_ref().map(|b| BigRecoveryJson {
                bitmap_bytes: b.bitmap_bytes,
                grains: b.grains,
                open_ms: MedianValues::of(&b.open_ms),
                peak_rss_growth_kib: MedianValues::of(&b.growth_kib),
            }),
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// The JSON document of a run, pretty-printed.
pub(super) fn print_json(
    opts: &BenchOptions,
    figs: &[Figure],
    run: &RunInfo,
    out: &mut dyn Write,
) -> Result<()> {
    let doc = BenchJson::new(opts, figs, run);
    let s =
        serde_json::to_string_pretty(&doc).map_err(|e| Error::invalid("json", e.to_string()))?;
    writeln!(out, "{s}").map_err(|e| Error::io("write", "stdout", 0, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::figures::figures;

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    /// The document of a run with two writer counts, two rounds and made-up measurements,
    /// checked to list its keys in the order of a `serde_json` map (the document reads the same
    /// as when it was built from `json!` maps).
    fn sample() -> serde_json::Value {
        let opts = BenchOptions {
            writers: vec![1, 4],
            rounds: 2,
            ..BenchOptions::default()
        };
        let mut figs = figures(&opts.writers);
        for f in &mut figs {
            for s in [&mut f.engine, &mut f.raw] {
                s.per_round = vec![100.0, 200.0];
                s.lat_ns = vec![3, 1, 2];
            }
        }
        let run = RunInfo {
            direct: true,
            backend: "pread",
            copy_backend: "pread",
            copy_offloaded: 0,
            big_recovery: Some(BigRecovery {
                grains: 16,
                bitmap_bytes: 2,
                open_ms: vec![1.5, 2.5],
                growth_kib: vec![4.0, 8.0],
            }),
        };
        let text = serde_json::to_string(&BenchJson::new(&opts, &figs, &run)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(text, serde_json::to_string(&v).unwrap());
        v
    }

    /// The keys scripts/plot-bench.py, scripts/qemu-compare.sh and docs/bench-writers.json rely
    /// on: top level, global options, per writer count.
    #[test]
    fn json_top_level_and_by_writers_keys() {
        let v = sample();
        assert_eq!(
            keys(&v),
            [
                "by_writers",
                "fio version",
                "global options",
                "jobs",
                "ratios",
                "recovery_1tib",
                "timestamp"
            ]
        );
        assert_eq!(keys(&v["global options"]).len(), 12);
        assert_eq!(v["global options"]["writers"], serde_json::json!([1, 4]));
        let w = &v["by_writers"];
        assert_eq!(w.as_array().unwrap().len(), 4);
        assert_eq!(
            keys(&w[0]),
            [
                "cost_ratio",
                "engine",
                "figure",
                "raw",
                "raw_label",
                "writers"
            ]
        );
        assert_eq!(w[3]["figure"], "first-write");
        assert_eq!(w[3]["writers"], 4);
        assert_eq!(
            keys(&w[0]["raw"]),
            [
                "iops_max",
                "iops_median",
                "iops_min",
                "lat_p50_ns",
                "lat_p99_ns"
            ]
        );
        assert_eq!(w[0]["engine"]["iops_median"], 150.0);
        assert_eq!(w[0]["engine"]["lat_p50_ns"], 2);
    }

    /// The fio-shaped jobs, the ratios and the 1 TiB recovery.
    #[test]
    fn json_jobs_ratios_and_recovery_keys() {
        let v = sample();
        let jobs = v["jobs"].as_array().unwrap();
        // Every figure has both sides but the recovery, which has only the engine's.
        assert_eq!(jobs.len(), 2 * figures(&[1, 4]).len() - 1);
        assert_eq!(keys(&jobs[0]), ["jobname", "write"]);
        assert_eq!(keys(&jobs[0]["write"]), ["bw", "iops", "lat_ns", "rounds"]);
        assert_eq!(
            keys(&jobs[0]["write"]["lat_ns"]["percentile"]),
            [
                "1.000000",
                "10.000000",
                "5.000000",
                "50.000000",
                "90.000000",
                "95.000000",
                "99.000000",
                "99.900000"
            ]
        );
        let recovery = jobs.last().unwrap();
        assert_eq!(keys(recovery), ["jobname", "sync"]);
        assert_eq!(
            keys(&recovery["sync"]["rounds"]),
            ["max_ms", "median_ms", "min_ms", "values_ms"]
        );
        assert_eq!(recovery["sync"]["lat_ns"]["percentile"]["50.000000"], 150e6);
        let r = &v["ratios"][0];
        assert_eq!(keys(r), ["figure", "kind", "max", "median", "min"]);
        assert_eq!(r["kind"], "cost");
        assert_eq!(
            keys(&v["recovery_1tib"]),
            ["bitmap_bytes", "grains", "open_ms", "peak_rss_growth_kib"]
        );
        assert_eq!(v["recovery_1tib"]["open_ms"]["median"], 2.0);
    }
}
