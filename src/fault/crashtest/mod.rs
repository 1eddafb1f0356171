//! The crash-state enumerator: scripted workloads, crash images at every I/O boundary, recovery
//! and the oracle, then crashes during recovery itself.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::sim::{CrashCursor, CrashLog, DevKind, Fate, Faults, SimWorld, SECTOR};
use crate::activity::format::{CopyMode, ExtentSpec, SessionState};
use crate::activity::{MemStorage, TableOptions, TableStorage};
use crate::engine::{Engine, EngineOptions, MapResolver, SessionSpec, SessionStatus};
use crate::ids::{GrainSize, SessionId, VolumeId};
use crate::volume::{MemVolume, Volume};
use crate::Error;

/// Names of the simulated volumes (devices 1, 2, 3; device 0 is the table).
pub const VOLUMES: [&str; 3] = ["a", "b", "c"];
/// Size of each simulated volume.
pub const VOLUME_BYTES: u64 = 64 * 1024;

/// One scripted step. Sessions are named by their index in establish order.
#[derive(Debug, Clone)]
pub enum Op {
    /// Establish a session from volume `src` to volume `tgt`.
    Establish {
        /// Source volume index.
        src: usize,
        /// Target volume index.
        tgt: usize,
        /// Extents.
        extents: Vec<ExtentSpec>,
        /// Grain bytes.
        grain: u64,
        /// Mode.
        mode: CopyMode,
    },
    /// `Engine::write` of seeded bytes to a source volume.
    Write {
        /// Volume index.
        vol: usize,
        /// Offset.
        off: u64,
        /// Length.
        len: u64,
        /// Seed of the bytes.
        fill: u64,
    },
    /// `Engine::flush` of a volume.
    Flush {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::write_image` (a target write).
    WriteImage {
        /// Session index.
        sess: usize,
        /// Image offset.
        off: u64,
        /// Length.
        len: u64,
        /// Seed of the bytes.
        fill: u64,
    },
    /// `Engine::copy_batch`.
    CopyBatch {
        /// Session index.
        sess: usize,
        /// First grain to look at.
        from: u64,
        /// Most grains.
        max: u64,
    },
    /// `Engine::copy_all` (completes the session).
    CopyAll {
        /// Session index.
        sess: usize,
    },
    /// `Engine::withdraw`.
    Withdraw {
        /// Session index.
        sess: usize,
    },
    /// `Engine::convert_to_copy`.
    Convert {
        /// Session index.
        sess: usize,
    },
    /// Drop the engine and recover it from the same (uncrashed) devices.
    Reopen,
    /// Drop the engine and recover it with volume `vol` missing (absent from the resolver):
    /// every live session using it must be suspended, and its image reads and the writes
    /// that would need copy-before-write for it must be refused.
    ReopenWithout {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::reset` of volume `vol` reporting it gone: the same checks as `ReopenWithout`.
    ResetGone {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::reset` of volume `vol` reporting it back as it was.
    ResetBack {
        /// Volume index.
        vol: usize,
    },
    /// `Engine::resume` of a session with every volume available again.
    Resume {
        /// Session index.
        sess: usize,
    },
}

/// A named script.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Template and seed.
    pub name: String,
    /// Seed of the volume contents and of the workload's choices.
    pub seed: u64,
    /// Steps.
    pub ops: Vec<Op>,
}

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
    /// Violation messages kept in the report.
    pub keep_violations: usize,
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
            keep_violations: 20,
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
        },
        ..EngineOptions::default()
    }
}

fn fill(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(len).unwrap_or(0)];
    SmallRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

fn ext(s: u64, t: u64, l: u64) -> ExtentSpec {
    ExtentSpec {
        source_offset: s,
        target_offset: t,
        len: l,
    }
}

/// The catalogue: `n` workloads from seven parameterized templates.
#[must_use]
pub fn catalogue(n: usize, seed: u64) -> Vec<Workload> {
    (0..n)
        .map(|i| {
            let ws = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64);
            let mut r = SmallRng::seed_from_u64(ws);
            let w = |r: &mut SmallRng| {
                let len = r.random_range(1..=24u64) * 512;
                let off = r.random_range(0..=(VOLUME_BYTES - len) / 512) * 512;
                Op::Write {
                    vol: 0,
                    off,
                    len,
                    fill: r.random(),
                }
            };
            let grain = if r.random_bool(0.5) { 4096 } else { 8192 };
            let mode = if r.random_bool(0.5) {
                CopyMode::Copy
            } else {
                CopyMode::NoCopy
            };
            let whole = |tgt| Op::Establish {
                src: 0,
                tgt,
                extents: vec![ext(0, 0, VOLUME_BYTES)],
                grain,
                mode,
            };
            let mut ops = Vec::new();
            let t = i % 7;
            let name = [
                "basic",
                "overlap",
                "target",
                "copy",
                "lifecycle",
                "reopen",
                "churn",
            ][t];
            match t {
                0 => {
                    ops.push(w(&mut r));
                    ops.push(whole(1));
                    for _ in 0..r.random_range(3..6) {
                        ops.push(w(&mut r));
                    }
                    ops.push(Op::Flush { vol: 0 });
                    ops.push(w(&mut r));
                    ops.push(w(&mut r));
                }
                1 => {
                    ops.push(whole(1));
                    ops.push(w(&mut r));
                    ops.push(w(&mut r));
                    ops.push(Op::Establish {
                        src: 0,
                        tgt: 2,
                        extents: vec![ext(16384, 0, 16384), ext(40960, 32768, 8192)],
                        grain: 4096,
                        mode: CopyMode::Copy,
                    });
                    for _ in 0..4 {
                        ops.push(w(&mut r));
                    }
                    ops.push(Op::Flush { vol: 0 });
                    ops.push(Op::CopyBatch {
                        sess: 1,
                        from: 0,
                        max: 2,
                    });
                    ops.push(w(&mut r));
                }
                2 => {
                    ops.push(whole(1));
                    ops.push(w(&mut r));
                    for _ in 0..2 {
                        let len = r.random_range(1..=12u64) * 512;
                        let off = r.random_range(0..=(VOLUME_BYTES - len) / 512) * 512;
                        ops.push(Op::WriteImage {
                            sess: 0,
                            off,
                            len,
                            fill: r.random(),
                        });
                        ops.push(Op::Flush { vol: 1 });
                        ops.push(w(&mut r));
                        ops.push(w(&mut r));
                    }
                }
                3 => {
                    ops.push(Op::Establish {
                        src: 0,
                        tgt: 1,
                        extents: vec![ext(0, 0, VOLUME_BYTES)],
                        grain,
                        mode: CopyMode::Copy,
                    });
                    for _ in 0..3 {
                        ops.push(Op::CopyBatch {
                            sess: 0,
                            from: r.random_range(0..8),
                            max: r.random_range(1..4),
                        });
                        ops.push(w(&mut r));
                    }
                    ops.push(Op::CopyAll { sess: 0 });
                    ops.push(w(&mut r));
                }
                4 => {
                    ops.push(Op::Establish {
                        src: 0,
                        tgt: 1,
                        extents: vec![ext(0, 0, VOLUME_BYTES)],
                        grain,
                        mode: CopyMode::NoCopy,
                    });
                    ops.push(w(&mut r));
                    ops.push(w(&mut r));
                    ops.push(Op::Convert { sess: 0 });
                    ops.push(Op::CopyBatch {
                        sess: 0,
                        from: 0,
                        max: 3,
                    });
                    ops.push(Op::Withdraw { sess: 0 });
                    ops.push(whole(2));
                    ops.push(w(&mut r));
                    ops.push(w(&mut r));
                }
                6 => {
                    // Many commits: checkpoints, journal wrap-around, forgetting ended sessions.
                    for k in 0..r.random_range(90..150usize) {
                        ops.push(Op::Establish {
                            src: 0,
                            tgt: 1 + k % 2,
                            extents: vec![ext(0, 0, VOLUME_BYTES)],
                            grain: 4096,
                            mode: CopyMode::NoCopy,
                        });
                        if k % 8 == 0 {
                            ops.push(w(&mut r));
                        }
                        ops.push(Op::Withdraw { sess: k });
                    }
                    ops.push(whole(1));
                    ops.push(w(&mut r));
                }
                _ => {
                    ops.push(whole(1));
                    ops.push(w(&mut r));
                    ops.push(Op::Reopen);
                    ops.push(w(&mut r));
                    ops.push(Op::Establish {
                        src: 0,
                        tgt: 2,
                        extents: vec![ext(8192, 16384, 32768)],
                        grain: 8192,
                        mode,
                    });
                    ops.push(Op::CopyBatch {
                        sess: 1,
                        from: 1,
                        max: 2,
                    });
                    ops.push(w(&mut r));
                    ops.push(Op::Reopen);
                    ops.push(Op::Withdraw { sess: 0 });
                    ops.push(w(&mut r));
                    ops.push(Op::Reopen);
                    // Suspended and resumed (appended, so the steps above and their I/O stay
                    // as they were): session 1's target, then its source, missing at reopen
                    // or gone on a reset; back through reopen, a reset and resume.
                    ops.push(Op::ReopenWithout { vol: 2 });
                    ops.push(Op::Reopen);
                    ops.push(w(&mut r));
                    ops.push(Op::ResetGone { vol: 2 });
                    ops.push(Op::Resume { sess: 1 });
                    ops.push(w(&mut r));
                    ops.push(Op::ResetGone { vol: 2 });
                    ops.push(Op::ResetBack { vol: 2 });
                    ops.push(w(&mut r));
                    ops.push(Op::ReopenWithout { vol: 0 });
                    ops.push(Op::Reopen);
                    ops.push(w(&mut r));
                }
            }
            Workload {
                name: format!("{name}#{i}"),
                seed: ws,
                ops,
            }
        })
        .collect()
}

/// Expected state of one session.
#[derive(Debug, Clone)]
struct SessRef {
    /// T0 image, updated by durable target writes.
    image: Arc<Vec<u8>>,
    /// Target writes not yet durable, in issue order: per grain, the image may show any
    /// subset of them applied in order.
    pending: Vec<(u64, Vec<u8>)>,
    grain: u64,
    target_vol: usize,
    /// Establish returned Ok: must never be missing.
    required: bool,
    /// A target write in `pending` failed: they all stay undecided even after a flush.
    sticky: bool,
    may_withdraw: bool,
    withdrawn: bool,
}

#[derive(Debug, Clone, Default)]
struct RefState {
    sessions: BTreeMap<u64, SessRef>,
    /// Establishes in flight or failed (ids unknown): each may or may not exist.
    pending_establish: Vec<SessRef>,
}

#[derive(Debug)]
struct OpRec {
    begin: usize,
    end: usize,
    inflight: RefState,
    after: RefState,
}

struct Run {
    log: CrashLog,
    recs: Vec<OpRec>,
    violations: Vec<String>,
    checks: u64,
    clock: u64,
    flushes: u64,
    table_writes: u64,
    table_reads: u64,
}

fn ref_at(recs: &[OpRec], n: usize) -> &RefState {
    static EMPTY: std::sync::OnceLock<RefState> = std::sync::OnceLock::new();
    let mut cur = None;
    for r in recs {
        if r.end <= n {
            cur = Some(&r.after);
        } else if r.begin < n {
            return &r.inflight;
        } else {
            break;
        }
    }
    cur.unwrap_or_else(|| EMPTY.get_or_init(RefState::default))
}

fn vol_ids() -> Vec<VolumeId> {
    VOLUMES
        .iter()
        .map(|n| MemVolume::new(n, 0).info().id)
        .collect()
}

fn initial_volume(seed: u64, i: usize) -> Vec<u8> {
    fill(seed ^ (0xA5A5 + i as u64), VOLUME_BYTES)
}

fn table_bytes() -> u64 {
    engine_options()
        .table
        .layout()
        .map(|l| l.file_bytes())
        .unwrap_or(0)
}

/// Run a workload on simulated devices, recording the I/O log and the reference model.
fn run_workload(w: &Workload, faults: Faults, checker: bool) -> Run {
    let world = SimWorld::new(w.seed);
    let table = world.add_table(
        "table",
        vec![0; usize::try_from(table_bytes()).unwrap_or(0)],
    );
    let vols: Vec<Arc<dyn Volume>> = VOLUMES
        .iter()
        .enumerate()
        .map(|(i, n)| Arc::new(world.add_volume(n, initial_volume(w.seed, i))) as Arc<dyn Volume>)
        .collect();
    if checker {
        world.enable_checker();
    }
    let injecting = faults.eio_at.is_some()
        || faults.fail_sync
        || faults.fail_sync_at.is_some()
        || faults.crash_after.is_some()
        || faults.misdirect_table_write.is_some()
        || faults.misdirect_table_read.is_some()
        || faults.enospc_from.is_some();
    world.set_faults(faults);
    let ids = vol_ids();
    let mut recs = Vec::new();
    let mut violations = Vec::new();
    let storage: Arc<dyn TableStorage> = Arc::new(table);
    let resolver = {
        let mut r = MapResolver::default();
        for v in &vols {
            r.add(v.clone());
        }
        r
    };
    let attach = |e: &Engine| {
        for v in &vols {
            e.attach(v.clone());
        }
    };
    let mut cur = RefState::default();
    let mut engine = match Engine::create(storage.clone(), engine_options()) {
        Ok(e) => {
            attach(&e);
            recs.push(OpRec {
                begin: 0,
                end: world.log_len(),
                inflight: cur.clone(),
                after: cur.clone(),
            });
            e
        }
        Err(e) => {
            if !injecting {
                violations.push(format!("{}: create failed: {e}", w.name));
            }
            recs.push(OpRec {
                begin: 0,
                end: usize::MAX,
                inflight: cur.clone(),
                after: cur.clone(),
            });
            return Run {
                log: world.crash_log(),
                recs,
                violations,
                checks: 0,
                clock: world.clock(),
                flushes: world.flushes(),
                table_writes: world.table_writes(),
                table_reads: world.table_reads(),
            };
        }
    };
    let mut sids: Vec<SessionId> = Vec::new();
    for (step, op) in w.ops.iter().enumerate() {
        let begin = world.log_len();
        let mut inflight = cur.clone();
        let mut after = cur.clone();
        let sid = |i: &usize| sids.get(*i).copied().unwrap_or(SessionId(u64::MAX));
        let r: crate::Result<()> = match op {
            Op::Establish {
                src,
                tgt,
                extents,
                grain,
                mode,
            } => {
                // T0: what the source device holds now (establish drains writers and
                // flushes the source; failed writes may or may not have landed, so the
                // device, not a model, is the reference).
                let now = world.current_images();
                let mut image = Vec::new();
                for e in extents {
                    let (s, l) = (e.source_offset as usize, e.len as usize);
                    image.extend_from_slice(&now[1 + *src][s..s + l]);
                }
                let sref = SessRef {
                    image: Arc::new(image),
                    pending: Vec::new(),
                    grain: *grain,
                    target_vol: *tgt,
                    required: false,
                    sticky: false,
                    may_withdraw: false,
                    withdrawn: false,
                };
                inflight.pending_establish.push(sref.clone());
                match GrainSize::new(*grain).and_then(|g| {
                    engine.establish(&SessionSpec {
                        source: ids[*src],
                        target: ids[*tgt],
                        extents: extents.clone(),
                        grain: g,
                        mode: *mode,
                    })
                }) {
                    Ok(id) => {
                        sids.push(id);
                        after.sessions.insert(
                            id.0,
                            SessRef {
                                required: true,
                                ..sref
                            },
                        );
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Op::Write {
                vol,
                off,
                len,
                fill: f,
            } => {
                let data = fill(*f, *len);
                engine.write(ids[*vol], *off, &data)
            }
            Op::Flush { vol } => {
                let r = engine.flush(ids[*vol]);
                for s in after.sessions.values_mut() {
                    if s.target_vol == *vol && !s.sticky && r.is_ok() {
                        for (o, d) in std::mem::take(&mut s.pending) {
                            let o = o as usize;
                            Arc::make_mut(&mut s.image)[o..o + d.len()].copy_from_slice(&d);
                        }
                    }
                }
                r
            }
            Op::WriteImage {
                sess,
                off,
                len,
                fill: f,
            } => {
                let data = fill(*f, *len);
                let id = sid(sess);
                for st in [&mut inflight, &mut after] {
                    if let Some(s) = st.sessions.get_mut(&id.0) {
                        s.pending.push((*off, data.clone()));
                    }
                }
                if let Ok(s) = engine.session(id) {
                    for p in s.map.image_pieces(*off, *len) {
                        world.note_user_write(&s.desc.target.locator, p.target_offset, p.len);
                    }
                }
                engine.write_image(id, *off, &data)
            }
            Op::CopyBatch { sess, from, max } => {
                engine.copy_batch(sid(sess), *from, *max).map(|_| ())
            }
            Op::CopyAll { sess } => engine.copy_all(sid(sess), 4).map(|_| ()),
            Op::Withdraw { sess } => {
                let id = sid(sess);
                if let Some(s) = inflight.sessions.get_mut(&id.0) {
                    s.may_withdraw = true;
                }
                if let Some(s) = after.sessions.get_mut(&id.0) {
                    s.withdrawn = true;
                }
                engine.withdraw(id)
            }
            Op::Convert { sess } => engine.convert_to_copy(sid(sess)),
            Op::Reopen | Op::ReopenWithout { .. } => {
                let missing = match op {
                    Op::ReopenWithout { vol } => Some(*vol),
                    _ => None,
                };
                let old = std::mem::replace(
                    &mut engine,
                    match Engine::create(
                        Arc::new(MemStorage::new("x", table_bytes())),
                        engine_options(),
                    ) {
                        Ok(e) => e,
                        Err(e) => {
                            violations.push(format!("{}: scratch engine: {e}", w.name));
                            break;
                        }
                    },
                );
                drop(old);
                let mut without = resolver.clone();
                if let Some(v) = missing {
                    without.volumes.remove(&vols[v].info().locator);
                }
                match Engine::open(storage.clone(), &without, engine_options()) {
                    Ok(e) => {
                        for (i, v) in vols.iter().enumerate() {
                            if Some(i) != missing {
                                e.attach(v.clone());
                            }
                        }
                        engine = e;
                        missing.map_or(Ok(()), |v| probe_suspended(&engine, ids[v], v))
                    }
                    Err(e) => Err(e),
                }
            }
            Op::ResetGone { vol } => engine
                .reset(ids[*vol], None)
                .and_then(|_| probe_suspended(&engine, ids[*vol], *vol)),
            Op::ResetBack { vol } => engine
                .reset(ids[*vol], Some(vols[*vol].clone()))
                .and_then(|ds| expect_resumed(&ds)),
            Op::Resume { sess } => engine
                .resume(sid(sess), &resolver)
                .and_then(|d| expect_resumed(&[d])),
        };
        let end = world.log_len();
        match r {
            Ok(()) => {
                recs.push(OpRec {
                    begin,
                    end,
                    inflight,
                    after: after.clone(),
                });
                cur = after;
            }
            Err(e) => {
                if !injecting {
                    violations.push(format!(
                        "{} (seed {}): step {step} {op:?} failed: {e}",
                        w.name, w.seed
                    ));
                }
                if !injecting {
                    recs.push(OpRec {
                        begin,
                        end: usize::MAX,
                        inflight,
                        after,
                    });
                    break;
                }
                // A failed step's effects stay undecided; the workload goes on (later steps
                // must not turn an unacknowledged change into a wrong image).
                let mut undecided = inflight.clone();
                for s in undecided.sessions.values_mut() {
                    if !s.pending.is_empty() {
                        s.sticky = true;
                    }
                }
                recs.push(OpRec {
                    begin,
                    end,
                    inflight,
                    after: undecided.clone(),
                });
                cur = undecided;
            }
        }
    }
    // Sanity: the live engine satisfies the oracle too (catches harness mistakes).
    if !injecting && violations.is_empty() {
        let mut rep = CrashReport::default();
        check_engine(&engine, &cur, &mut rep);
        violations.extend(
            rep.violation_samples
                .into_iter()
                .map(|v| format!("{} (seed {}): live engine: {v}", w.name, w.seed)),
        );
    }
    violations.extend(
        world
            .violations()
            .into_iter()
            .map(|v| format!("{}: {v}", w.name)),
    );
    drop(engine);
    Run {
        log: world.crash_log(),
        recs,
        violations,
        checks: world.ordering_checks(),
        clock: world.clock(),
        flushes: world.flushes(),
        table_writes: world.table_writes(),
        table_reads: world.table_reads(),
    }
}

/// After volume `vol` (id `gone`) went missing: every live session using it is suspended, its
/// image reads are refused, and so is a write to its other volume at an uncopied grain (which
/// would need copy-before-write). Nothing reaches a device.
fn probe_suspended(engine: &Engine, gone: VolumeId, vol: usize) -> crate::Result<()> {
    let fail = |why: String| Err(Error::invalid("suspend", why));
    for s in engine.table().sessions() {
        if !s.is_live() || (s.desc.source.id != gone && s.desc.target.id != gone) {
            continue;
        }
        if s.state() != SessionState::Suspended {
            return fail(format!(
                "session {} is {} with volume {vol} missing",
                s.id(),
                s.state()
            ));
        }
        let mut b = [0u8; 512];
        match engine.read_image(s.id(), 0, &mut b) {
            Err(Error::Suspended { .. }) => {}
            other => return fail(format!("image read of suspended {}: {other:?}", s.id())),
        }
        let Some(g) = s.bits().next_clear(0) else {
            continue;
        };
        let live = s
            .map
            .extent_of_grain(g)
            .is_some_and(|(x, _)| s.extent_live(x));
        let Some(p) = s.map.grain_piece(g, g + 1).filter(|_| live) else {
            continue;
        };
        let (other, off) = if s.desc.source.id == gone {
            (s.desc.target.id, p.target_offset)
        } else {
            (s.desc.source.id, p.source_offset)
        };
        match engine.write(other, off, &[0x5a; 512]) {
            Err(Error::Suspended { .. }) => {}
            r => return fail(format!("write to the other volume of {}: {r:?}", s.id())),
        }
    }
    Ok(())
}

/// Every decision resumed a session.
fn expect_resumed(ds: &[crate::engine::Decision]) -> crate::Result<()> {
    for d in ds {
        if !matches!(d.outcome, crate::engine::Outcome::Resumed) {
            return Err(Error::invalid(
                "resume",
                format!("session {} did not resume: {:?}", d.session, d.outcome),
            ));
        }
    }
    Ok(())
}

/// Compare a recovered engine with the reference state.
fn check_engine(e: &Engine, refs: &RefState, rep: &mut CrashReport) {
    let mut out: Vec<String> = Vec::new();
    for st in e.status() {
        if let Some(sref) = refs.sessions.get(&st.id) {
            check_one(e, &st, sref, rep);
            continue;
        }
        // An unacknowledged establish: some candidate must fit.
        let mut best: Option<CrashReport> = None;
        for c in &refs.pending_establish {
            let mut trial = CrashReport::default();
            check_one(e, &st, c, &mut trial);
            let better = best
                .as_ref()
                .is_none_or(|b| trial.violations < b.violations);
            if better {
                best = Some(trial);
            }
        }
        match best {
            Some(b) => rep.merge(b, 20),
            None => out.push(format!(
                "session {} appeared that was never established",
                st.id
            )),
        }
    }
    for (id, s) in &refs.sessions {
        // Ended sessions may be forgotten to make room; active ones never.
        if s.required && !s.withdrawn && !s.may_withdraw && e.session(SessionId(*id)).is_err() {
            out.push(format!(
                "acknowledged session {id} is missing after recovery"
            ));
        }
    }
    for v in out {
        rep.violation(v);
    }
}

/// Check one recovered session against its reference.
fn check_one(e: &Engine, st: &SessionStatus, sref: &SessRef, rep: &mut CrashReport) {
    let mut out: Vec<String> = Vec::new();
    let kind = match st.state {
        SessionState::Active | SessionState::Completed => {
            if sref.withdrawn {
                out.push(format!(
                    "session {} is {:?} after an acknowledged withdraw",
                    st.id, st.state
                ));
            }
            let mut buf = vec![0u8; sref.image.len()];
            match e.read_image(SessionId(st.id), 0, &mut buf) {
                Ok(()) => {
                    let k = sref.pending.len().min(6);
                    let alts: Vec<Vec<u8>> = (1..1usize << k)
                        .map(|mask| {
                            let mut a = sref.image.to_vec();
                            for (j, (o, d)) in sref.pending.iter().enumerate().take(k) {
                                if mask >> j & 1 == 1 {
                                    let o = *o as usize;
                                    a[o..o + d.len()].copy_from_slice(d);
                                }
                            }
                            a
                        })
                        .collect();
                    let g = sref.grain as usize;
                    for (i, got) in buf.chunks(g).enumerate() {
                        let want = &sref.image[i * g..i * g + got.len()];
                        let ok =
                            got == want || alts.iter().any(|a| &a[i * g..i * g + got.len()] == got);
                        if !ok {
                            out.push(format!(
                                "session {} ({:?}, {} of {} grains copied): image grain {i} \
                                 differs from T0",
                                st.id, st.state, st.grains_copied, st.grains_total
                            ));
                            break;
                        }
                    }
                }
                Err(Error::ExtentTerminated { .. }) => {}
                Err(err) => out.push(format!("session {}: read_image failed: {err}", st.id)),
            }
            if st.state == SessionState::Active {
                "resumed".to_string()
            } else {
                "completed".to_string()
            }
        }
        SessionState::Withdrawn => {
            if !(sref.may_withdraw || sref.withdrawn) {
                out.push(format!("session {} withdrawn without a withdraw", st.id));
            }
            "withdrawn".to_string()
        }
        SessionState::Suspended => {
            // Every volume is present when the oracle runs: recovery must resume it.
            out.push(format!(
                "session {} is suspended although its volumes are present ({:?})",
                st.id, st.reason
            ));
            "suspended".to_string()
        }
        SessionState::Terminated => match &st.reason {
            Some(r) => format!("terminated:{:?}", r.code),
            None => {
                out.push(format!("session {} terminated without a reason", st.id));
                "terminated:none".to_string()
            }
        },
    };
    *rep.outcomes.entry(kind).or_default() += 1;
    for v in out {
        rep.violation(v);
    }
}

fn mem_table(img: &[u8]) -> Arc<dyn TableStorage> {
    Arc::new(MemStorage::from_bytes("crash", img.to_vec()))
}

/// Recover from device images (table first, then [`VOLUMES`]) and check the oracle.
fn recover_and_check(
    images: &[Vec<u8>],
    refs: &RefState,
    rep: &mut CrashReport,
    ctx: &dyn Fn() -> String,
) {
    let before = rep.violations;
    let mut resolver = MapResolver::default();
    for (i, n) in VOLUMES.iter().enumerate() {
        resolver.add(Arc::new(MemVolume::with_data(n, &images[i + 1])));
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        Engine::open(mem_table(&images[0]), &resolver, engine_options())
    }));
    match r {
        Err(_) => rep.violation("recovery panicked".to_string()),
        Ok(Err(e)) => {
            *rep.outcomes.entry("open_error".to_string()).or_default() += 1;
            if refs.sessions.values().any(|s| s.required) {
                rep.violation(format!("recovery failed with acknowledged sessions: {e}"));
            }
        }
        Ok(Ok(e)) => check_engine(&e, refs, rep),
    }
    if rep.violations > before {
        let c = ctx();
        let n = rep.violation_samples.len();
        let new = usize::try_from(rep.violations - before).unwrap_or(0).min(n);
        for v in &mut rep.violation_samples[n - new..] {
            *v = format!("{c}: {v}");
        }
    }
}

/// Crash recovery itself at each of its mutating I/Os and recover again.
fn crash_recovery(
    images: &[Vec<u8>],
    refs: &RefState,
    seed: u64,
    rep: &mut CrashReport,
    ctx: &dyn Fn() -> String,
) {
    let world = SimWorld::new(seed);
    let table = world.add_table("table", images[0].clone());
    let mut resolver = MapResolver::default();
    for (i, n) in VOLUMES.iter().enumerate() {
        resolver.add(Arc::new(world.add_volume(n, images[i + 1].clone())));
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        Engine::open(Arc::new(table), &resolver, engine_options()).map(|_| ())
    }));
    if r.is_err() {
        rep.violation(format!("{}: recovery panicked", ctx()));
        return;
    }
    let log = world.crash_log();
    let mut cur = CrashCursor::new(&log);
    while cur.advance() {
        let m = cur.pos();
        let sub = || format!("{} / recovery crashed after I/O {m}", ctx());
        rep.state("recovery_crash_prefix");
        recover_and_check(&cur.image(|_| Fate::Keep), refs, rep, &sub);
        if !cur.unsynced().is_empty() {
            rep.state("recovery_crash_durable");
            recover_and_check(&cur.image(|_| Fate::Drop), refs, rep, &sub);
        }
    }
}

fn enumerate(w: &Workload, opts: &CrashtestOptions, rep: &mut CrashReport) {
    let run = match catch_unwind(AssertUnwindSafe(|| {
        run_workload(w, Faults::default(), true)
    })) {
        Ok(r) => r,
        Err(_) => {
            rep.violation(format!("{} (seed {}): workload panicked", w.name, w.seed));
            return;
        }
    };
    rep.ordering_checks += run.checks;
    for v in run.violations {
        rep.violation(v);
    }
    rep.crash_points += run.log.events.len() as u64;
    let mut rng = SmallRng::seed_from_u64(w.seed ^ opts.seed);
    let mut cur = CrashCursor::new(&run.log);
    loop {
        let n = cur.pos();
        let refs = ref_at(&run.recs, n);
        let uns = cur.unsynced();
        let ctx = |kind: &str| format!("{} (seed {}) crash after I/O {n} [{kind}]", w.name, w.seed);
        let mut variants: Vec<(&str, Vec<Fate>)> = vec![("prefix", vec![Fate::Keep; uns.len()])];
        if !uns.is_empty() {
            variants.push(("durable", vec![Fate::Drop; uns.len()]));
        }
        if uns.len() >= 2 && uns.len() <= opts.exhaustive_max {
            for mask in 1..(1u32 << uns.len()) - 1 {
                variants.push((
                    "subset",
                    (0..uns.len())
                        .map(|k| {
                            if mask >> k & 1 == 1 {
                                Fate::Drop
                            } else {
                                Fate::Keep
                            }
                        })
                        .collect(),
                ));
            }
        } else if uns.len() > opts.exhaustive_max {
            for k in uns.len().saturating_sub(8)..uns.len() {
                let mut f = vec![Fate::Keep; uns.len()];
                f[k] = Fate::Drop;
                variants.push(("drop_one", f));
            }
            for _ in 0..opts.random_subsets {
                variants.push((
                    "random_subset",
                    (0..uns.len())
                        .map(|_| {
                            if rng.random_bool(0.5) {
                                Fate::Drop
                            } else {
                                Fate::Keep
                            }
                        })
                        .collect(),
                ));
            }
        }
        if let Some(k) = uns
            .iter()
            .rposition(|(d, _)| cur.kind(*d) == DevKind::Table)
        {
            let sectors = cur.write_len(uns[k].1).div_ceil(SECTOR);
            let mut tears = Vec::new();
            if sectors >= 2 {
                for p in [1, sectors / 2, sectors - 1] {
                    tears.push(Fate::Prefix(p));
                    tears.push(Fate::Suffix(p));
                }
            }
            tears.push(Fate::Garbage(
                rng.random_range(0..sectors.max(1)),
                rng.random(),
            ));
            tears.dedup();
            for t in tears {
                let mut f = vec![Fate::Keep; uns.len()];
                f[k] = t;
                variants.push(("torn", f));
            }
            // Earlier unsynced table writes: one garbage sector each, the rest kept.
            for (j, (d, i)) in uns.iter().enumerate().take(k) {
                if cur.kind(*d) == DevKind::Table {
                    let n = cur.write_len(*i).div_ceil(SECTOR).max(1);
                    let mut f = vec![Fate::Keep; uns.len()];
                    f[j] = Fate::Garbage(rng.random_range(0..n), rng.random());
                    variants.push(("torn_earlier", f));
                }
            }
        }
        for (kind, fates) in &variants {
            rep.state(kind);
            let images = cur.image(|k| fates.get(k).copied().unwrap_or(Fate::Keep));
            recover_and_check(&images, refs, rep, &|| ctx(kind));
        }
        if opts.recovery_crash_stride > 0 && n % opts.recovery_crash_stride == 0 {
            let images = cur.image(|_| Fate::Keep);
            crash_recovery(&images, refs, w.seed, rep, &|| ctx("prefix"));
        }
        if !cur.advance() {
            break;
        }
    }
    // F9: EIO on the N-th I/O, once and forever; then recover from what is durable.
    if opts.eio_points > 0 {
        let total = run.clock.max(1);
        let step = (total / opts.eio_points as u64).max(1);
        let mut at = 0;
        while at < total {
            for forever in [false, true] {
                let f = Faults {
                    eio_at: Some(at),
                    eio_forever: forever,
                    ..Faults::default()
                };
                let r = catch_unwind(AssertUnwindSafe(|| run_workload(w, f, false)));
                let Ok(r) = r else {
                    rep.violation(format!(
                        "{} (seed {}): panic with EIO at I/O {at}",
                        w.name, w.seed
                    ));
                    continue;
                };
                let mut c = CrashCursor::new(&r.log);
                while c.advance() {}
                let refs = ref_at(&r.recs, usize::MAX - 1);
                let ctx = || {
                    format!(
                        "{} (seed {}) EIO at I/O {at} forever={forever}",
                        w.name, w.seed
                    )
                };
                for (kind, fate) in [("eio_prefix", Fate::Keep), ("eio_durable", Fate::Drop)] {
                    rep.state(kind);
                    recover_and_check(&c.image(|_| fate), refs, rep, &ctx);
                }
            }
            at += step;
        }
        // Failing durability points: the k-th flush/sync fails once, the workload goes on.
        let flushes = run.flushes.max(1);
        let fstep = (flushes / opts.eio_points as u64).max(1);
        let mut k = 0;
        while k < flushes {
            let f = Faults {
                fail_sync_at: Some(k),
                ..Faults::default()
            };
            let r = catch_unwind(AssertUnwindSafe(|| run_workload(w, f, false)));
            let Ok(r) = r else {
                rep.violation(format!(
                    "{} (seed {}): panic with failed sync {k}",
                    w.name, w.seed
                ));
                k += fstep;
                continue;
            };
            let mut c = CrashCursor::new(&r.log);
            while c.advance() {}
            let refs = ref_at(&r.recs, usize::MAX - 1);
            let ctx = || format!("{} (seed {}) sync {k} failed", w.name, w.seed);
            for (kind, fate) in [
                ("syncfail_prefix", Fate::Keep),
                ("syncfail_durable", Fate::Drop),
            ] {
                rep.state(kind);
                recover_and_check(&c.image(|_| fate), refs, rep, &ctx);
            }
            k += fstep;
        }
        // F8: ENOSPC on every write from the N-th I/O on (table or volume, whichever comes).
        let mut at = 0;
        while at < total {
            let f = Faults {
                enospc_from: Some(at),
                ..Faults::default()
            };
            sweep_one(w, f, rep, "enospc", &format!("ENOSPC from I/O {at}"));
            at += step;
        }
        // F6: one table write lands somewhere else in the table; nothing tells the engine.
        // Each sampled write is sent to four places: another journal slot (of either mirror
        // copy), a superblock slot, a checkpoint area and any 512-byte-aligned offset. The
        // state is then crashed at points after the misdirected write (see `sweep_misdirect`).
        let mut rng = rand::rngs::SmallRng::seed_from_u64(w.seed ^ 0xF6);
        let layout = engine_options().table.layout().ok();
        let table_writes = run.table_writes.max(1);
        let mstep = (table_writes / opts.eio_points as u64).max(1);
        let mut k = 0;
        while let (true, Some(l)) = (k < table_writes, layout) {
            for dest in misdirect_destinations(&l, &mut rng) {
                sweep_misdirect(w, k, dest, rep);
            }
            k += mstep;
        }
        // Misdirected reads: one table read returns the bytes of another place.
        let reads = run.table_reads.max(1);
        let rstep = (reads / opts.eio_points as u64).max(1);
        let mut k = 0;
        while let (true, Some(l)) = (k < reads, layout) {
            let dests = misdirect_destinations(&l, &mut rng);
            let dest = dests[usize::try_from(k).unwrap_or(0) % dests.len()];
            let f = Faults {
                misdirect_table_read: Some((k, dest)),
                ..Faults::default()
            };
            sweep_one(
                w,
                f,
                rep,
                "misread",
                &format!("table read {k} misdirected to {dest}"),
            );
            k += rstep;
        }
    }
}

/// Four places for a misdirected table write: another journal slot, a superblock slot, a
/// checkpoint area (its start or a sector inside it) and any 512-byte-aligned offset.
fn misdirect_destinations(l: &crate::activity::format::Layout, rng: &mut SmallRng) -> [u64; 4] {
    use crate::activity::format::{CHECKPOINT_AREAS, SUPERBLOCK_SLOTS};
    let sector = crate::limits::JOURNAL_BLOCK_BYTES as u64;
    let slot = rng.random_range(0..l.journal_blocks() * 2);
    let journal = l.journal(0) + slot * sector;
    let sb = l.superblock(rng.random_range(0..SUPERBLOCK_SLOTS));
    let area = l.checkpoint(rng.random_range(0..CHECKPOINT_AREAS));
    let inside = rng.random_range(0..4u64) * sector;
    let anywhere = rng.random_range(0..l.file_bytes() / sector) * sector;
    [journal, sb, area + inside, anywhere]
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
    sweep_misdirect(w, k, dest, &mut rep);
    rep.states_total = rep.states.values().sum();
    rep
}

/// Crash points sampled after the misdirected write: the next few I/Os one by one, then evenly
/// spaced to the end of the log.
const MISDIRECT_CRASH_POINTS: usize = 12;

/// Run `w` with its `k`-th table write sent to `dest`; recover the final and the durable image,
/// then crash at points after the misdirected write (the writes the engine issued next, kept or
/// lost) and recover each: one misdirected write followed by a crash anywhere must never lose
/// an acknowledged session or serve a wrong image.
fn sweep_misdirect(w: &Workload, k: u64, dest: u64, rep: &mut CrashReport) {
    let what = format!("table write {k} misdirected to {dest}");
    let f = Faults {
        misdirect_table_write: Some((k, dest)),
        ..Faults::default()
    };
    let r = catch_unwind(AssertUnwindSafe(|| run_workload(w, f, false)));
    let Ok(r) = r else {
        rep.violation(format!("{} (seed {}): panic with {what}", w.name, w.seed));
        return;
    };
    let table_dev = r
        .log
        .devices
        .iter()
        .position(|d| d.1 == crate::fault::DevKind::Table);
    let at = r
        .log
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, crate::fault::IoEvent::Write { dev, .. } if Some(*dev) == table_dev))
        .nth(usize::try_from(k).unwrap_or(usize::MAX))
        .map(|(i, _)| i);
    let end = r.log.events.len();
    let mut points: Vec<usize> = Vec::new();
    if let Some(at) = at {
        let after = end - at;
        let near = (MISDIRECT_CRASH_POINTS / 2).min(after);
        points.extend((1..=near).map(|i| at + i));
        let far = MISDIRECT_CRASH_POINTS - near;
        points.extend((1..=far).map(|i| at + near + (after - near) * i / far));
        points.dedup();
    }
    points.push(usize::MAX);
    let mut c = CrashCursor::new(&r.log);
    for p in points {
        while c.pos() < p.min(end) && c.advance() {}
        let n = c.pos();
        let refs = ref_at(&r.recs, if p == usize::MAX { usize::MAX - 1 } else { n });
        let ctx = || format!("{} (seed {}) {what}, crash after I/O {n}", w.name, w.seed);
        for (suffix, fate) in [("prefix", Fate::Keep), ("durable", Fate::Drop)] {
            rep.state(&format!("misdirect_{suffix}"));
            recover_and_check(&c.image(|_| fate), refs, rep, &ctx);
        }
    }
}

/// Run `w` with faults `f` to the end, then recover from the final and from the durable image
/// and check the oracle.
fn sweep_one(w: &Workload, f: Faults, rep: &mut CrashReport, kind: &str, what: &str) {
    let r = catch_unwind(AssertUnwindSafe(|| run_workload(w, f, false)));
    let Ok(r) = r else {
        rep.violation(format!("{} (seed {}): panic with {what}", w.name, w.seed));
        return;
    };
    let mut c = CrashCursor::new(&r.log);
    while c.advance() {}
    let refs = ref_at(&r.recs, usize::MAX - 1);
    let ctx = || format!("{} (seed {}) {what}", w.name, w.seed);
    for (suffix, fate) in [("prefix", Fate::Keep), ("durable", Fate::Drop)] {
        rep.state(&format!("{kind}_{suffix}"));
        recover_and_check(&c.image(|_| fate), refs, rep, &ctx);
    }
}

/// Run the crash-state enumerator over `opts.workloads` generated workloads.
#[must_use]
pub fn crashtest(opts: &CrashtestOptions) -> CrashReport {
    let start = std::time::Instant::now();
    let workloads = catalogue(opts.workloads, opts.seed);
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
                let mut rep = CrashReport::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = workloads.get(i) else { break };
                    enumerate(w, opts, &mut rep);
                }
                crate::engine::set_canary_skip_cbw_flush(false);
                crate::activity::set_canary_unverified_checkpoint(false);
                total.lock().merge(rep, opts.keep_violations);
            });
        }
    });
    let mut r = total.into_inner();
    r.states_total = r.states.values().sum();
    r.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    r
}
