//! Running a workload on simulated devices (recording the I/O log and the expected state of
//! every step), and enumerating the crash states of a run: at every I/O boundary, with unsynced
//! writes kept, lost or torn, then crashes during recovery itself.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::oracle::{
    check_engine, recover_and_check, ref_at, OpRec, PendingGroup, RefState, RevRef, SessRef,
};
use super::workload::{fill, Op, Workload};
use super::{
    engine_options, sweeps, workload_engine_options, CrashReport, CrashtestOptions, VOLUMES,
    VOLUME_BYTES,
};
use crate::activity::format::{CopyMode, ExtentSpec, SessionState};
use crate::activity::{MemStorage, TableStorage};
use crate::engine::{Engine, MapResolver, SessionSpec};
use crate::fault::sim::{CrashCursor, CrashLog, DevKind, Fate, Faults, SimWorld, SECTOR};
use crate::ids::{GrainCount, GrainIndex, GrainSize, SessionId, VolumeId};
use crate::volume::{MemVolume, Volume};
use crate::Error;

/// What running a workload recorded.
pub(super) struct Run {
    /// Every I/O, for crash images.
    pub(super) log: CrashLog,
    /// Each step's I/O span and expected state.
    pub(super) recs: Vec<OpRec>,
    /// Violations seen while running (failed steps, the ordering checker, the live engine).
    pub(super) violations: Vec<String>,
    /// Source writes the ordering checker examined.
    pub(super) checks: u64,
    /// I/Os issued.
    pub(super) clock: u64,
    /// Durability points (flushes and syncs) issued.
    pub(super) flushes: u64,
    /// Table writes issued.
    pub(super) table_writes: u64,
    /// Table reads issued.
    pub(super) table_reads: u64,
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

fn table_bytes(w: &Workload) -> u64 {
    super::workload_engine_options(w)
        .table
        .layout()
        .map(|l| l.file_bytes())
        .unwrap_or(0)
}

/// The copy log's bytes in the table of workload `w` (start, end): data, like a volume's, not
/// table metadata (see `SimWorld::set_table_data`).
pub(super) fn log_region(w: &Workload) -> Option<(u64, u64)> {
    let l = super::workload_engine_options(w).table.layout().ok()?;
    (l.log_bytes > 0).then(|| (l.log(), l.log() + l.log_bytes))
}

/// Whether `f` injects any fault (then failed steps are expected, not violations).
fn injects(f: &Faults) -> bool {
    f.eio_at.is_some()
        || f.fail_sync
        || f.fail_sync_at.is_some()
        || f.crash_after.is_some()
        || f.misdirect_table_write.is_some()
        || f.misdirect_table_read.is_some()
        || f.enospc_from.is_some()
}

/// Run a workload on simulated devices, recording the I/O log and the reference model.
pub(super) fn run_workload(w: &Workload, faults: Faults, checker: bool) -> Run {
    let world = SimWorld::new(w.seed);
    let table = world.add_table(
        "table",
        vec![0; usize::try_from(table_bytes(w)).unwrap_or(0)],
    );
    world.set_table_data(log_region(w));
    let vols: Vec<Arc<dyn Volume>> = VOLUMES
        .iter()
        .enumerate()
        .map(|(i, n)| Arc::new(world.add_volume(n, initial_volume(w.seed, i))) as Arc<dyn Volume>)
        .collect();
    if checker {
        world.enable_checker();
    }
    let injecting = injects(&faults);
    world.set_faults(faults);
    let storage: Arc<dyn TableStorage> = Arc::new(table);
    let mut resolver = MapResolver::default();
    for v in &vols {
        resolver.add(v.clone());
    }
    let none = RefState::default();
    let engine = match Engine::create(storage.clone(), workload_engine_options(w)) {
        Ok(e) => e,
        Err(e) => {
            let mut violations = Vec::new();
            if !injecting {
                violations.push(format!("{}: create failed: {e}", w.name));
            }
            return Run {
                log: world.crash_log(),
                recs: vec![OpRec {
                    begin: 0,
                    end: usize::MAX,
                    inflight: none.clone(),
                    after: none,
                }],
                violations,
                checks: 0,
                clock: world.clock(),
                flushes: world.flushes(),
                table_writes: world.table_writes(),
                table_reads: world.table_reads(),
            };
        }
    };
    for v in &vols {
        engine.attach(v.clone());
    }
    let recs = vec![OpRec {
        begin: 0,
        end: world.log_len(),
        inflight: none.clone(),
        after: none,
    }];
    let mut h = Harness {
        w,
        world,
        vols,
        ids: vol_ids(),
        storage,
        resolver,
        engine,
        sids: Vec::new(),
        recs,
        violations: Vec::new(),
    };
    let cur = h.run_steps(injecting);
    h.finish(&cur, injecting)
}

/// A workload running on simulated devices: the engine, its volumes, the sessions it
/// established, and what has been recorded so far.
struct Harness<'w> {
    w: &'w Workload,
    world: Arc<SimWorld>,
    vols: Vec<Arc<dyn Volume>>,
    ids: Vec<VolumeId>,
    storage: Arc<dyn TableStorage>,
    /// Every volume.
    resolver: MapResolver,
    engine: Engine,
    /// Session ids in establish order.
    sids: Vec<SessionId>,
    recs: Vec<OpRec>,
    violations: Vec<String>,
}

/// The expected state while a step runs and after it.
struct Expect {
    inflight: RefState,
    after: RefState,
}

impl Harness<'_> {
    /// Run every step, recording its I/O span and expected states; returns the expected state
    /// after the last step run. Without injected faults a failed step is a violation and ends
    /// the workload; with them its effects stay undecided and the workload goes on.
    fn run_steps(&mut self, injecting: bool) -> RefState {
        let w = self.w;
        let mut cur = RefState::default();
        for (step, op) in w.ops.iter().enumerate() {
            let begin = self.world.log_len();
            let mut x = Expect {
                inflight: cur.clone(),
                after: cur.clone(),
            };
            let Some(r) = self.apply(op, &mut x) else {
                break;
            };
            let end = self.world.log_len();
            let Expect { inflight, after } = x;
            match r {
                Ok(()) => {
                    self.recs.push(OpRec {
                        begin,
                        end,
                        inflight,
                        after: after.clone(),
                    });
                    cur = after;
                }
                Err(e) if !injecting => {
                    self.violations.push(format!(
                        "{} (seed {}): step {step} {op:?} failed: {e}",
                        w.name, w.seed
                    ));
                    self.recs.push(OpRec {
                        begin,
                        end: usize::MAX,
                        inflight,
                        after,
                    });
                    break;
                }
                Err(_) => {
                    // A failed step's effects stay undecided; the workload goes on (later
                    // steps must not turn an unacknowledged change into a wrong image).
                    let mut undecided = inflight.clone();
                    for s in undecided.sessions.values_mut() {
                        if !s.pending.is_empty() {
                            s.sticky = true;
                        }
                    }
                    if let Some(r) = undecided.reversal.as_mut() {
                        r.sticky |= !r.pending.is_empty();
                    }
                    self.recs.push(OpRec {
                        begin,
                        end,
                        inflight,
                        after: undecided.clone(),
                    });
                    cur = undecided;
                }
            }
        }
        cur
    }

    /// The id of the `i`-th session established (an id no session has when there is none).
    fn sid(&self, i: usize) -> SessionId {
        self.sids.get(i).copied().unwrap_or(SessionId(u64::MAX))
    }

    /// Run one step, updating the expected states. `None`: the harness itself failed (a
    /// violation is recorded) and the workload ends.
    fn apply(&mut self, op: &Op, x: &mut Expect) -> Option<crate::Result<()>> {
        let (e, ids) = (&self.engine, &self.ids);
        Some(match op {
            Op::Establish {
                src,
                tgt,
                extents,
                grain,
                mode,
                incremental,
            } => self.establish(*src, *tgt, extents, (*grain, *mode, *incremental), x),
            Op::EstablishGroup {
                name,
                pairs,
                grain,
                mode,
                incremental,
                fails_at,
            } => self.establish_group(name, pairs, (*grain, *mode, *incremental), *fails_at, x),
            Op::Refresh { sess } => self.refresh(*sess, x),
            Op::WithdrawGroup { name } => {
                if let Some(ids) = x.after.groups.get(name).cloned() {
                    for id in ids {
                        if let Some(s) = x.inflight.sessions.get_mut(&id) {
                            s.may_withdraw = true;
                        }
                        if let Some(s) = x.after.sessions.get_mut(&id) {
                            s.withdrawn = true;
                        }
                    }
                }
                e.withdraw_group(name).map(|_| ())
            }
            Op::Write {
                vol,
                off,
                len,
                fill: f,
            } => self.write(*vol, *off, &fill(*f, *len), x),
            Op::Flush { vol } => {
                let r = e.flush(ids[*vol]);
                if let Some(rv) = x.after.reversal.as_mut() {
                    if rv.source == ids[*vol] && r.is_ok() && !rv.sticky {
                        let view = Arc::make_mut(&mut rv.view);
                        for (o, d) in std::mem::take(&mut rv.pending) {
                            let o = usize::try_from(o).unwrap_or(0);
                            view[o..o + d.len()].copy_from_slice(&d);
                        }
                    }
                }
                for s in x.after.sessions.values_mut() {
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
            } => self.write_image(*sess, *off, &fill(*f, *len), x),
            Op::CopyBatch { sess, from, max } => e
                .copy_batch(self.sid(*sess), GrainIndex(*from), GrainCount(*max))
                .map(|_| ()),
            Op::CopyAll { sess } => e.copy_all(self.sid(*sess), GrainCount(4)).map(|_| ()),
            Op::Withdraw { sess } => {
                let id = self.sid(*sess);
                if let Some(s) = x.inflight.sessions.get_mut(&id.0) {
                    s.may_withdraw = true;
                }
                if let Some(s) = x.after.sessions.get_mut(&id.0) {
                    s.withdrawn = true;
                }
                e.withdraw(id)
            }
            Op::Convert { sess } => e.convert_to_copy(self.sid(*sess)),
            Op::Reverse { sess } => self.reverse(*sess, x),
            Op::RestoreBatch { sess, from, max } => e
                .restore_batch(self.sid(*sess), GrainIndex(*from), GrainCount(*max))
                .map(|_| ()),
            Op::RestoreAll { sess } => e.restore_all(self.sid(*sess)).map(|_| ()),
            Op::Reopen => return self.reopen(None),
            Op::ReopenWithout { vol } => return self.reopen(Some(*vol)),
            Op::ResetGone { vol } => e
                .reset(ids[*vol], None)
                .and_then(|_| probe_suspended(e, ids[*vol], *vol)),
            Op::ResetBack { vol } => e
                .reset(ids[*vol], Some(self.vols[*vol].clone()))
                .and_then(|ds| expect_resumed(&ds)),
            Op::Resume { sess } => e
                .resume(self.sid(*sess), &self.resolver)
                .and_then(|d| expect_resumed(&[d])),
        })
    }

    /// What volume `i` holds now, with the writes the engine holds in write-back mode laid
    /// over (an establish or a refresh drains them into its T0); a volume the engine cannot
    /// read keeps the device's bytes. (Only the volume asked for is copied: copying every
    /// device at every establish was a tenth of the enumerator's time.)
    fn volume_now(&self, i: usize) -> Vec<u8> {
        let now = self.world.current_image(1 + i);
        if let Some(id) = self.ids.get(i) {
            if self.engine.held_bytes(*id).unwrap_or(0) != 0 {
                let mut b = vec![0u8; now.len()];
                if self.engine.read(*id, 0, &mut b).is_ok() {
                    return b;
                }
            }
        }
        now
    }

    /// Establish a session. Its T0 is what the source device holds now (establish drains
    /// writers and flushes the source; failed writes may or may not have landed, so the device,
    /// not a model, is the reference).
    fn establish(
        &mut self,
        src: usize,
        tgt: usize,
        extents: &[ExtentSpec],
        (grain, mode, incremental): (u64, CopyMode, bool),
        x: &mut Expect,
    ) -> crate::Result<()> {
        let now = self.volume_now(src);
        let mut image = Vec::new();
        for e in extents {
            let (s, l) = (e.source_offset as usize, e.len as usize);
            image.extend_from_slice(&now[s..s + l]);
        }
        let sref = SessRef {
            image: Arc::new(image),
            pending: Vec::new(),
            grain,
            target_vol: tgt,
            required: false,
            sticky: false,
            may_withdraw: false,
            withdrawn: false,
            refreshed: None,
        };
        x.inflight.pending_establish.push(sref.clone());
        let id = GrainSize::new(grain).and_then(|g| {
            self.engine.establish(&SessionSpec {
                source: self.ids[src],
                target: self.ids[tgt],
                extents: extents.to_vec(),
                grain: g,
                mode,
                incremental,
            })
        })?;
        self.sids.push(id);
        x.after.sessions.insert(
            id.0,
            SessRef {
                required: true,
                ..sref
            },
        );
        Ok(())
    }

    /// Establish a consistency group: like [`Harness::establish`] for every pair, with one T0
    /// (what the sources hold now), and all or none of the sessions in the expected states.
    /// With `fails_at`, the establish must fail on that pair and establish nothing.
    fn establish_group(
        &mut self,
        name: &str,
        pairs: &[(usize, usize, Vec<ExtentSpec>)],
        (grain, mode, incremental): (u64, CopyMode, bool),
        fails_at: Option<usize>,
        x: &mut Expect,
    ) -> crate::Result<()> {
        let members: Vec<SessRef> = pairs
            .iter()
            .map(|(src, tgt, extents)| {
                let now = self.volume_now(*src);
                let mut image = Vec::new();
                for e in extents {
                    let (s, l) = (e.source_offset as usize, e.len as usize);
                    image.extend_from_slice(&now[s..s + l]);
                }
                SessRef {
                    image: Arc::new(image),
                    pending: Vec::new(),
                    grain,
                    target_vol: *tgt,
                    required: false,
                    sticky: false,
                    may_withdraw: false,
                    withdrawn: false,
                    refreshed: None,
                }
            })
            .collect();
        x.inflight.pending_groups.push(PendingGroup {
            name: name.to_string(),
            members: members.clone(),
        });
        let g = GrainSize::new(grain)?;
        let specs: Vec<SessionSpec> = pairs
            .iter()
            .map(|(src, tgt, extents)| SessionSpec {
                source: self.ids[*src],
                target: self.ids[*tgt],
                extents: extents.clone(),
                grain: g,
                mode,
                incremental,
            })
            .collect();
        let r = self.engine.establish_group(name, &specs);
        if let Some(at) = fails_at {
            // Nothing was established: the expected state after is the one before (while it
            // runs, and if it unexpectedly succeeds, the group stays pending: all or none).
            return match r {
                Err(Error::GroupPair { pair, .. }) if pair == at => Ok(()),
                other => Err(Error::invalid(
                    "group",
                    format!("{name}: expected a failure at pair {at}, got {other:?}"),
                )),
            };
        }
        let ids = r?;
        x.after
            .groups
            .insert(name.to_string(), ids.iter().map(|i| i.0).collect());
        for (id, m) in ids.iter().zip(members) {
            self.sids.push(*id);
            x.after.sessions.insert(
                id.0,
                SessRef {
                    required: true,
                    ..m
                },
            );
        }
        Ok(())
    }

    /// A write to volume `vol`. Where it lands on the target of a live session (a volume that
    /// stopped being a target only if a withdraw succeeded, which an injected fault may have
    /// prevented), it is a target write of that session: pending in the expected states like
    /// [`Harness::write_image`], and told to the ordering checker as the user's.
    fn write(&mut self, vol: usize, off: u64, data: &[u8], x: &mut Expect) -> crate::Result<()> {
        let len = data.len() as u64;
        for s in self.engine.table().sessions() {
            // A completed incremental session still holds its target: its image is the target,
            // and a write to it through the engine is recorded as a change.
            if !s.holds_volumes() || s.desc.target.id != self.ids[vol] {
                continue;
            }
            for p in s.map.target_pieces(off, len) {
                self.world
                    .note_user_write(&s.desc.target.locator, p.target_offset, p.len);
                let d = usize::try_from(p.target_offset - off).unwrap_or(0);
                let bytes = data[d..d + usize::try_from(p.len).unwrap_or(0)].to_vec();
                for st in [&mut x.inflight, &mut x.after] {
                    if let Some(r) = st.sessions.get_mut(&s.id().0) {
                        r.pending.push((p.image_offset, bytes.clone()));
                    }
                }
            }
        }
        for st in [&mut x.inflight, &mut x.after] {
            if let Some(rv) = st.reversal.as_mut().filter(|r| r.source == self.ids[vol]) {
                let mut img = 0u64;
                for e in &rv.extents {
                    let lo = off.max(e.source_offset);
                    let hi = (off + len).min(e.source_offset + e.len);
                    if lo < hi {
                        let d = usize::try_from(lo - off).unwrap_or(0);
                        let n = usize::try_from(hi - lo).unwrap_or(0);
                        rv.pending
                            .push((img + (lo - e.source_offset), data[d..d + n].to_vec()));
                    }
                    img += e.len;
                }
            }
        }
        self.engine.write(self.ids[vol], off, data)
    }

    /// A reverse restore of session `sess`: once durable, the source reads as the image.
    fn reverse(&mut self, sess: usize, x: &mut Expect) -> crate::Result<()> {
        let id = self.sid(sess);
        if let (Ok(s), Some(sref)) = (self.engine.session(id), x.after.sessions.get(&id.0)) {
            let rv = RevRef {
                session: id.0,
                source: s.desc.source.id,
                extents: s.desc.extents.clone(),
                view: sref.image.clone(),
                pending: Vec::new(),
                acknowledged: false,
                sticky: false,
            };
            x.inflight.reversal = Some(rv.clone());
            x.after.reversal = Some(RevRef {
                acknowledged: true,
                ..rv
            });
        }
        self.engine.reverse(id).map(|_| ())
    }

    /// A refresh of session `sess`: its new T0 is what its source holds now (the refresh flushes
    /// the source, as establish does). While it runs the image is the old T0 or the new one,
    /// whole; after it, the new one (earlier target writes no longer show: the grains they
    /// changed are copied again).
    fn refresh(&mut self, sess: usize, x: &mut Expect) -> crate::Result<()> {
        let id = self.sid(sess);
        if let Ok(s) = self.engine.session(id) {
            let src = self
                .ids
                .iter()
                .position(|v| *v == s.desc.source.id)
                .unwrap_or(0);
            let now = self.volume_now(src);
            let mut image = Vec::new();
            for e in &s.desc.extents {
                let (o, l) = (e.source_offset as usize, e.len as usize);
                image.extend_from_slice(&now[o..o + l]);
            }
            let image = Arc::new(image);
            if let Some(r) = x.inflight.sessions.get_mut(&id.0) {
                r.refreshed = Some(image.clone());
            }
            if let Some(r) = x.after.sessions.get_mut(&id.0) {
                r.image = image;
                r.pending.clear();
                r.sticky = false;
                r.refreshed = None;
            }
        }
        self.engine.refresh(id).map(|_| ())
    }

    /// A target write through session `sess`: pending in the expected states until a flush of
    /// the target, and told to the ordering checker as the user's.
    fn write_image(
        &mut self,
        sess: usize,
        off: u64,
        data: &[u8],
        x: &mut Expect,
    ) -> crate::Result<()> {
        let id = self.sid(sess);
        for st in [&mut x.inflight, &mut x.after] {
            if let Some(s) = st.sessions.get_mut(&id.0) {
                s.pending.push((off, data.to_vec()));
            }
        }
        if let Ok(s) = self.engine.session(id) {
            for p in s.map.image_pieces(off, data.len() as u64) {
                self.world
                    .note_user_write(&s.desc.target.locator, p.target_offset, p.len);
            }
        }
        self.engine.write_image(id, off, data)
    }

    /// Drop the engine and recover it from the same devices, volume `missing` absent; then
    /// check that what used it is suspended. `None` when no scratch engine could be made to
    /// stand in while the engine is dropped.
    fn reopen(&mut self, missing: Option<usize>) -> Option<crate::Result<()>> {
        let scratch = match Engine::create(
            Arc::new(MemStorage::new("x", table_bytes(self.w))),
            super::workload_engine_options(self.w),
        ) {
            Ok(e) => e,
            Err(e) => {
                self.violations
                    .push(format!("{}: scratch engine: {e}", self.w.name));
                return None;
            }
        };
        drop(std::mem::replace(&mut self.engine, scratch));
        let mut without = self.resolver.clone();
        if let Some(v) = missing {
            without.volumes.remove(&self.vols[v].info().locator);
        }
        let e = match Engine::open(
            self.storage.clone(),
            &without,
            workload_engine_options(self.w),
        ) {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        for (i, v) in self.vols.iter().enumerate() {
            if Some(i) != missing {
                e.attach(v.clone());
            }
        }
        self.engine = e;
        Some(missing.map_or(Ok(()), |v| probe_suspended(&self.engine, self.ids[v], v)))
    }

    /// Check the live engine against the final expected state (without faults), gather the
    /// checker's violations, drop the engine and hand over what was recorded.
    fn finish(self, cur: &RefState, injecting: bool) -> Run {
        let Harness {
            w,
            world,
            engine,
            recs,
            mut violations,
            ..
        } = self;
        // Sanity: the live engine satisfies the oracle too (catches harness mistakes).
        if !injecting && violations.is_empty() {
            let mut rep = CrashReport::default();
            check_engine(&engine, cur, &mut rep);
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

/// Every crash state of workload `w`: crash images at each I/O boundary recovered and checked,
/// crashes during recovery, then (with `opts.eio_points`) the fault sweeps.
pub(super) fn enumerate(w: &Workload, opts: &CrashtestOptions, rep: &mut CrashReport) {
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
    for v in &run.violations {
        rep.violation(v.clone());
    }
    rep.crash_points += run.log.events.len() as u64;
    crash_states(w, opts, &run, rep);
    if opts.eio_points > 0 {
        sweeps::sweep_faults(w, opts, &run, rep);
    }
}

/// Crash after every I/O of `run`: recover each variant of the unsynced writes' fates and check
/// it; every `opts.recovery_crash_stride`-th point, crash recovery itself too.
fn crash_states(w: &Workload, opts: &CrashtestOptions, run: &Run, rep: &mut CrashReport) {
    let mut rng = SmallRng::seed_from_u64(w.seed ^ opts.seed);
    let mut cur = CrashCursor::new(&run.log);
    loop {
        let n = cur.pos();
        let refs = ref_at(&run.recs, n);
        let ctx = |kind: &str| format!("{} (seed {}) crash after I/O {n} [{kind}]", w.name, w.seed);
        for (kind, fates) in &variants(&cur, opts, &mut rng) {
            rep.state(kind);
            let images = cur.image(|k| fates.get(k).copied().unwrap_or(Fate::Keep));
            recover_and_check(images, refs, rep, &|| ctx(kind));
        }
        if opts.recovery_crash_stride > 0 && n.is_multiple_of(opts.recovery_crash_stride) {
            let images = cur.image(|_| Fate::Keep);
            crash_recovery(images, refs, w.seed, rep, &|| ctx("prefix"));
        }
        if !cur.advance() {
            break;
        }
    }
}

/// The fates of the unsynced writes to recover at the cursor's point, each with its kind: all
/// kept, all lost, every subset (few writes) or the last eight lost one by one and random
/// subsets (many), then tears of unsynced table writes.
fn variants(
    cur: &CrashCursor<'_>,
    opts: &CrashtestOptions,
    rng: &mut SmallRng,
) -> Vec<(&'static str, Vec<Fate>)> {
    let uns = cur.unsynced();
    let mut variants: Vec<(&str, Vec<Fate>)> = vec![("prefix", vec![Fate::Keep; uns.len()])];
    if !uns.is_empty() {
        variants.push(("durable", vec![Fate::Drop; uns.len()]));
    }
    let drop_if = |drop: bool| if drop { Fate::Drop } else { Fate::Keep };
    if uns.len() >= 2 && uns.len() <= opts.exhaustive_max {
        for mask in 1..(1u32 << uns.len()) - 1 {
            variants.push((
                "subset",
                (0..uns.len())
                    .map(|k| drop_if(mask >> k & 1 == 1))
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
                    .map(|_| drop_if(rng.random_bool(0.5)))
                    .collect(),
            ));
        }
    }
    torn_variants(cur, &uns, rng, &mut variants);
    variants
}

/// Tears of the last unsynced table write (prefix and suffix sectors, a garbage sector), and a
/// garbage sector in each earlier unsynced table write, the other writes kept.
fn torn_variants(
    cur: &CrashCursor<'_>,
    uns: &[(usize, usize)],
    rng: &mut SmallRng,
    variants: &mut Vec<(&'static str, Vec<Fate>)>,
) {
    let Some(k) = uns
        .iter()
        .rposition(|(d, _)| cur.kind(*d) == DevKind::Table)
    else {
        return;
    };
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

/// Crash recovery itself at each of its mutating I/Os and recover again.
fn crash_recovery(
    images: Vec<Vec<u8>>,
    refs: &RefState,
    seed: u64,
    rep: &mut CrashReport,
    ctx: &dyn Fn() -> String,
) {
    let world = SimWorld::new(seed);
    let mut images = images.into_iter();
    let table = world.add_table("table", images.next().unwrap_or_default());
    let mut resolver = MapResolver::default();
    for (n, img) in VOLUMES.iter().zip(images) {
        resolver.add(Arc::new(world.add_volume(n, img)));
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
        recover_and_check(cur.image(|_| Fate::Keep), refs, rep, &sub);
        if !cur.unsynced().is_empty() {
            rep.state("recovery_crash_durable");
            recover_and_check(cur.image(|_| Fate::Drop), refs, rep, &sub);
        }
    }
}
