//! The crash-state enumerator: scripted workloads, crash images at every I/O boundary, recovery
//! and the oracle, then crashes during recovery itself.
//!
//! `workload` holds the catalogue of scripted workloads; `runner` runs one on simulated devices
//! and enumerates its crash states; `sweeps` runs it again under injected faults; `oracle` holds
//! the expected state and checks a recovered engine against it.

mod oracle;
mod runner;
mod sweeps;
mod workload;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::activity::TableOptions;
use crate::engine::EngineOptions;

pub use workload::{catalogue, catalogue_with, Op, Workload};

/// Names of the simulated volumes (devices 1, 2, 3; device 0 is the table).
pub const VOLUMES: [&str; 3] = ["a", "b", "c"];
/// Size of each simulated volume.
pub const VOLUME_BYTES: u64 = 64 * 1024;

/// Options of [`crashtest`].
#[derive(Debug, Clone)]
pub struct CrashtestOptions {
    /// Number of generated workloads (round-robin over the templates).
    pub workloads: usize,
    /// Master seed.
    pub seed: u64,
    /// Worker threads (0: available parallelism).
    pub threads: usize,
    /// Unsynced-write counts up to this get every subset.
    pub exhaustive_max: usize,
    /// Random subsets per crash point above `exhaustive_max`.
    pub random_subsets: usize,
    /// Crash recovery at every I/O boundary for every `recovery_crash_stride`-th crash point
    /// (0: never).
    pub recovery_crash_stride: usize,
    /// EIO injection points per workload (each run once and forever; 0: none).
    pub eio_points: usize,
    /// Run with the engine's canary (skipped copy-before-write target flush) switched on.
    pub canary: bool,
    /// Run with the table's checkpoint canary (the unverified two-area scheme) switched on.
    pub canary_checkpoint: bool,
    /// Run with the group canary (a group's sessions committed one by one) switched on.
    pub canary_split_group: bool,
    /// Run with the change-mark canary (a write issued before its change marks are durable)
    /// switched on.
    pub canary_late_marks: bool,
    /// Run with the reverse-restore canary (`Restored` committed before the source flush)
    /// switched on.
    pub canary_restored_early: bool,
    /// Run with the copy-log canary (a logged copy's bytes never written to the log, its
    /// record still naming them) switched on.
    pub canary_skip_log_write: bool,
    /// Violation messages kept in the report.
    pub keep_violations: usize,
    /// Run every other round of the templates with the engine in write-back mode
    /// ([`EngineOptions::write_back`]).
    pub write_back: bool,
    /// Run every workload with serial copy-before-write instead of checked copy records
    /// ([`EngineOptions::checked_copies`], the engine's default).
    pub serial_copies: bool,
    /// Run only the catalogue's workloads of these names (as a violation message names them,
    /// e.g. `overlap#120`; empty: every workload). Each keeps its place in the catalogue, so it
    /// runs exactly as it does in the whole catalogue.
    pub only: Vec<String>,
}

impl Default for CrashtestOptions {
    fn default() -> Self {
        CrashtestOptions {
            workloads: 60,
            seed: 1,
            threads: 0,
            exhaustive_max: 4,
            random_subsets: 4,
            recovery_crash_stride: 4,
            eio_points: 12,
            canary: false,
            canary_checkpoint: false,
            canary_split_group: false,
            canary_late_marks: false,
            canary_restored_early: false,
            canary_skip_log_write: false,
            keep_violations: 20,
            write_back: false,
            serial_copies: false,
            only: Vec::new(),
        }
    }
}

/// What [`crashtest`] covered and found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CrashReport {
    /// Master seed.
    pub seed: u64,
    /// Workloads run.
    pub workloads: usize,
    /// Mutating I/Os logged over all workloads (crash points).
    pub crash_points: u64,
    /// Crash states recovered and checked, by kind.
    pub states: BTreeMap<String, u64>,
    /// Sum of `states`.
    pub states_total: u64,
    /// Source writes the online ordering checker examined.
    pub ordering_checks: u64,
    /// Recovery outcomes seen, by kind.
    pub outcomes: BTreeMap<String, u64>,
    /// Violations of the oracle or of the ordering rule.
    pub violations: u64,
    /// The first violation messages (each names workload, seed and crash point).
    pub violation_samples: Vec<String>,
    /// Wall time.
    pub elapsed_ms: u64,
}

impl CrashReport {
    fn merge(&mut self, o: CrashReport, keep: usize) {
        self.crash_points += o.crash_points;
        for (k, v) in o.states {
            *self.states.entry(k).or_default() += v;
        }
        for (k, v) in o.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        self.ordering_checks += o.ordering_checks;
        self.violations += o.violations;
        for v in o.violation_samples {
            if self.violation_samples.len() < keep {
                self.violation_samples.push(v);
            }
        }
    }
    fn violation(&mut self, msg: String) {
        self.violations += 1;
        if self.violation_samples.len() < 20 {
            self.violation_samples.push(msg);
        }
    }
    fn state(&mut self, kind: &str) {
        *self.states.entry(kind.to_string()).or_default() += 1;
    }
}

/// Engine options of every harness engine (smallest table).
#[must_use]
pub fn engine_options() -> EngineOptions {
    EngineOptions {
        table: TableOptions {
            journal_bytes: crate::limits::JOURNAL_MIN_BYTES,
            checkpoint_bytes: crate::limits::CHECKPOINT_MIN_BYTES,
            log_bytes: crate::limits::LOG_MIN_BYTES * 2,
        },
        ..EngineOptions::default()
    }
}

/// Engine options of the engine that runs workload `w` (write-back as the workload says).
#[must_use]
pub fn workload_engine_options(w: &Workload) -> EngineOptions {
    let mut o = EngineOptions {
        write_back: w.write_back,
        checked_copies: !w.serial_copies,
        ..engine_options()
    };
    if !w.copy_log {
        o.table.log_bytes = 0;
    }
    o
}

/// Run workload `w` with its `k`-th table write sent to `dest`, crash at points after it, and
/// check every recovery against the oracle (the misdirect sweep of [`crashtest`] for one write).
#[must_use]
pub fn check_misdirected_write(w: &Workload, k: u64, dest: u64) -> CrashReport {
    let mut rep = CrashReport {
        seed: w.seed,
        workloads: 1,
        ..CrashReport::default()
    };
    sweeps::sweep_misdirect(w, k, dest, &mut rep);
    rep.states_total = rep.states.values().sum();
    rep
}

/// Run the crash-state enumerator over `opts.workloads` generated workloads.
#[must_use]
pub fn crashtest(opts: &CrashtestOptions) -> CrashReport {
    let start = std::time::Instant::now();
    let mut workloads: Vec<(usize, Workload)> =
        catalogue_with(opts.workloads, opts.seed, opts.write_back)
            .into_iter()
            .enumerate()
            .collect();
    if opts.serial_copies {
        for (_, w) in &mut workloads {
            w.serial_copies = true;
            w.name.push_str("+serial");
        }
    }
    if !opts.only.is_empty() {
        workloads.retain(|(_, w)| opts.only.contains(&w.name));
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        opts.threads
    };
    let next = AtomicUsize::new(0);
    let total = Mutex::new(CrashReport {
        seed: opts.seed,
        workloads: workloads.len(),
        ..CrashReport::default()
    });
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                crate::engine::set_canary_skip_cbw_flush(opts.canary);
                crate::activity::set_canary_unverified_checkpoint(opts.canary_checkpoint);
                crate::engine::set_canary_split_group_commit(opts.canary_split_group);
                crate::engine::set_canary_late_change_marks(opts.canary_late_marks);
                crate::engine::set_canary_restored_before_flush(opts.canary_restored_early);
                crate::activity::set_canary_skip_log_write(opts.canary_skip_log_write);
                let mut rep = CrashReport::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((i, w)) = workloads.get(i) else {
                        break;
                    };
                    // Every other workload hands the table's commit to the flusher thread
                    // and flushes the target on the writer; the others the other way round
                    // (the engine picks by measured timings, which simulated devices lack).
                    crate::engine::set_checked_commit_on_thread(Some(i % 2 == 1));
                    runner::enumerate(w, opts, &mut rep);
                }
                crate::engine::set_checked_commit_on_thread(None);
                crate::engine::set_canary_skip_cbw_flush(false);
                crate::activity::set_canary_unverified_checkpoint(false);
                crate::engine::set_canary_split_group_commit(false);
                crate::engine::set_canary_late_change_marks(false);
                crate::engine::set_canary_restored_before_flush(false);
                crate::activity::set_canary_skip_log_write(false);
                total.lock().merge(rep, opts.keep_violations);
            });
        }
    });
    let mut r = total.into_inner();
    r.states_total = r.states.values().sum();
    r.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    r
}
