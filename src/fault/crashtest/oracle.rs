//! The oracle: the expected state of every session as a workload runs (T0 images, target writes
//! not yet durable, what may have been withdrawn), and the check of a recovered engine against
//! it.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use super::{engine_options, CrashReport, VOLUMES};
use crate::activity::format::SessionState;
use crate::activity::{MemStorage, TableStorage};
use crate::engine::{Engine, MapResolver, SessionStatus};
use crate::ids::SessionId;
use crate::volume::MemVolume;
use crate::Error;

/// Expected state of one session.
#[derive(Debug, Clone)]
pub(super) struct SessRef {
    /// T0 image, updated by durable target writes.
    pub(super) image: Arc<Vec<u8>>,
    /// Target writes not yet durable, in issue order: per grain, the image may show any
    /// subset of them applied in order.
    pub(super) pending: Vec<(u64, Vec<u8>)>,
    /// Grain bytes.
    pub(super) grain: u64,
    /// Index of the target volume.
    pub(super) target_vol: usize,
    /// Establish returned Ok: must never be missing.
    pub(super) required: bool,
    /// A target write in `pending` failed: they all stay undecided even after a flush.
    pub(super) sticky: bool,
    /// A withdraw was issued but not acknowledged: the session may be withdrawn.
    pub(super) may_withdraw: bool,
    /// A withdraw was acknowledged.
    pub(super) withdrawn: bool,
    /// A refresh is in flight, or failed: the image may instead be this new T0, whole (with
    /// no target write applied).
    pub(super) refreshed: Option<Arc<Vec<u8>>>,
}

/// Expected state of a reverse restore: what the source's clients read over the session's
/// extents.
#[derive(Debug, Clone)]
pub(super) struct RevRef {
    /// The session.
    pub(super) session: u64,
    /// Its source.
    pub(super) source: crate::ids::VolumeId,
    /// Its extents (the image is them laid end to end).
    pub(super) extents: Vec<crate::model::ExtentSpec>,
    /// What the source reads as once the reverse is durable: the image, with the source
    /// writes made durable since.
    pub(super) view: Arc<Vec<u8>>,
    /// Source writes since the reverse not yet durable, as (image offset, bytes): each 512-byte
    /// sector may read as any of them.
    pub(super) pending: Vec<(u64, Vec<u8>)>,
    /// `Engine::reverse` returned Ok.
    pub(super) acknowledged: bool,
    /// A step failed while writes were pending: they stay undecided even after a flush (a
    /// failed write may or may not have landed).
    pub(super) sticky: bool,
}

/// Expected state of every session at one point of a workload.
#[derive(Debug, Clone, Default)]
pub(super) struct RefState {
    /// A reverse restore in flight or done.
    pub(super) reversal: Option<RevRef>,
    /// By session id.
    pub(super) sessions: BTreeMap<u64, SessRef>,
    /// Establishes in flight or failed (ids unknown): each may or may not exist.
    pub(super) pending_establish: Vec<SessRef>,
    /// Group establishes in flight or failed (ids unknown): all of a group's sessions exist,
    /// or none.
    pub(super) pending_groups: Vec<PendingGroup>,
    /// Acknowledged groups: name and session ids. A group is withdrawn in one commit, so its
    /// sessions are all withdrawn or none.
    pub(super) groups: BTreeMap<String, Vec<u64>>,
}

/// A group establish whose outcome is not known: its name and, per pair, the expected session.
#[derive(Debug, Clone)]
pub(super) struct PendingGroup {
    /// The group's name (recorded with each session, so recovered sessions are found by it).
    pub(super) name: String,
    /// Expected session per pair, in pair order (ids are allocated in that order).
    pub(super) members: Vec<SessRef>,
}

/// One step of a workload: its I/Os (log positions `begin..end`) and the expected state while
/// it runs and after it.
#[derive(Debug)]
pub(super) struct OpRec {
    /// Log position where the step's I/Os begin.
    pub(super) begin: usize,
    /// Log position after its last I/O (`usize::MAX`: the step never finished).
    pub(super) end: usize,
    /// Expected state while the step runs.
    pub(super) inflight: RefState,
    /// Expected state after it.
    pub(super) after: RefState,
}

/// The expected state after the first `n` I/Os of the log.
pub(super) fn ref_at(recs: &[OpRec], n: usize) -> &RefState {
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

/// Compare a recovered engine with the reference state.
pub(super) fn check_engine(e: &Engine, refs: &RefState, rep: &mut CrashReport) {
    let mut out: Vec<String> = Vec::new();
    let status = e.status();
    check_groups(e, &status, refs, rep, &mut out);
    for st in status {
        if let Some(sref) = refs.sessions.get(&st.id.0) {
            check_one(e, &st, sref, rep);
            continue;
        }
        if st
            .group
            .as_ref()
            .is_some_and(|g| refs.pending_groups.iter().any(|p| &p.name == g))
        {
            continue; // checked by `check_groups`
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
    if let Some(r) = &refs.reversal {
        if let Err(v) = check_reversal(e, r) {
            out.push(v);
        }
    }
    for v in out {
        rep.violation(v);
    }
}

/// The source over the extents of a reverse restore, as the engine's clients read it
/// (`raw`: as the volume holds it).
fn source_over(e: &Engine, r: &RevRef, raw: bool) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for x in &r.extents {
        let mut b = vec![0u8; usize::try_from(x.len).unwrap_or(0)];
        let res = if raw {
            e.volume(r.source)
                .and_then(|v| v.read_at(x.source_offset, &mut b))
        } else {
            e.read(r.source, x.source_offset, &mut b)
        };
        res.map_err(|err| {
            format!(
                "reverse of session {}: source read failed: {err}",
                r.session
            )
        })?;
        out.extend_from_slice(&b);
    }
    Ok(out)
}

/// What the source's clients read during and after a reverse restore: once it is durable
/// (acknowledged, or found in progress after recovery), per 512-byte sector the image with the
/// durable writes, or one of the writes not yet durable.
fn check_reversal(e: &Engine, r: &RevRef) -> Result<(), String> {
    let reversing = e.session(SessionId(r.session)).is_ok_and(|s| s.reversing());
    if !r.acknowledged && !reversing {
        // Not durable (a reverse that failed moved nothing back): the source is its own.
        return Ok(());
    }
    let got = source_over(e, r, false)?;
    for (i, sector) in got.chunks(512).enumerate() {
        let at = i * 512;
        let want = &r.view[at..at + sector.len()];
        if sector == want {
            continue;
        }
        let by_write = r.pending.iter().any(|(o, d)| {
            let o = usize::try_from(*o).unwrap_or(usize::MAX);
            at >= o
                && at + sector.len() <= o + d.len()
                && &d[at - o..at - o + sector.len()] == sector
        });
        if !by_write {
            return Err(format!(
                "reverse of session {}: the source reads wrong bytes at image offset {at} \
                 (acknowledged: {})",
                r.session, r.acknowledged
            ));
        }
    }
    Ok(())
}

/// After recovery (never on the live engine of a workload): finish a reverse restore in
/// progress; the source volume then holds by itself what its clients read before.
fn finish_reversal(e: &Engine, refs: &RefState, rep: &mut CrashReport) {
    let Some(r) = &refs.reversal else { return };
    let Ok(seen) = source_over(e, r, false) else {
        return; // reported by `check_reversal`
    };
    let id = SessionId(r.session);
    if e.session(id).is_ok_and(|s| s.reversing()) {
        if let Err(err) = e.restore_all(id) {
            rep.violation(format!(
                "reverse of session {id}: restore after recovery failed: {err}"
            ));
            return;
        }
    }
    *rep.outcomes
        .entry("reverse_checked".to_string())
        .or_default() += 1;
    match source_over(e, r, true) {
        Ok(raw) if raw == seen => {}
        Ok(_) => rep.violation(format!(
            "reverse of session {id}: after the restore the source volume differs from what \
             its clients read before"
        )),
        Err(v) => rep.violation(v),
    }
}

/// Incremental sessions: a refresh of the recovered engine, then the copy to the end, must
/// leave every image equal to what its source holds (the change map recovered is a superset
/// of the grains where source and target differ). Changes the engine: only for a recovered
/// engine, after the other checks (never on the live engine of a workload, whose devices the
/// crash states are taken from).
fn check_refresh(e: &Engine, rep: &mut CrashReport) {
    let status = e.status();
    let candidates: Vec<&SessionStatus> = status
        .iter()
        .filter(|s| {
            s.incremental
                && matches!(s.state, SessionState::Active | SessionState::Completed)
                && s.ended_extents.is_empty()
        })
        .collect();
    let mut groups = std::collections::BTreeSet::new();
    for st in &candidates {
        let r = match &st.group {
            Some(g) if groups.insert(g.clone()) => e.refresh_group(g).map(|_| ()),
            Some(_) => Ok(()),
            None => e.refresh(st.id).map(|_| ()),
        };
        if let Err(err) = r {
            rep.violation(format!(
                "session {}: refresh after recovery failed: {err}",
                st.id
            ));
            return;
        }
    }
    for st in candidates {
        let outcome = refreshed_matches_source(e, st);
        *rep.outcomes
            .entry("refresh_checked".to_string())
            .or_default() += 1;
        if let Err(v) = outcome {
            rep.violation(format!("session {} after a refresh: {v}", st.id));
        }
    }
}

/// Copy session `st` to the end and compare its image, extent by extent, with its source.
fn refreshed_matches_source(e: &Engine, st: &SessionStatus) -> Result<(), String> {
    e.copy_all(st.id, crate::ids::GrainCount(8))
        .map_err(|err| format!("copy failed: {err}"))?;
    let src = e
        .volume_by_locator(&st.source)
        .ok_or_else(|| format!("source {} not attached", st.source))?;
    let mut image_off = 0u64;
    for x in &st.extents {
        let len = usize::try_from(x.len).unwrap_or(0);
        let (mut want, mut got) = (vec![0u8; len], vec![0u8; len]);
        e.read(src, x.source_offset, &mut want)
            .map_err(|err| format!("source read failed: {err}"))?;
        e.read_image(st.id, image_off, &mut got)
            .map_err(|err| format!("image read failed: {err}"))?;
        if want != got {
            let at = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "image byte {} differs from the source (grain {}): a change was not recorded",
                image_off + at as u64,
                (image_off + at as u64) / st.grain_bytes
            ));
        }
        image_off += x.len;
    }
    Ok(())
}

/// All or none: the sessions of a group establish in flight are all recovered (each checked
/// against its pair's reference) or none is; the sessions of an acknowledged group are all
/// withdrawn or none is.
fn check_groups(
    e: &Engine,
    status: &[SessionStatus],
    refs: &RefState,
    rep: &mut CrashReport,
    out: &mut Vec<String>,
) {
    for p in &refs.pending_groups {
        let found: Vec<&SessionStatus> = status
            .iter()
            .filter(|s| s.group.as_deref() == Some(&p.name) && !refs.sessions.contains_key(&s.id.0))
            .collect();
        if found.is_empty() {
            *rep.outcomes.entry("group_none".to_string()).or_default() += 1;
            continue;
        }
        if found.len() != p.members.len() {
            out.push(format!(
                "group {}: {} of its {} sessions after recovery",
                p.name,
                found.len(),
                p.members.len()
            ));
            continue;
        }
        *rep.outcomes.entry("group_all".to_string()).or_default() += 1;
        for (st, sref) in found.iter().zip(&p.members) {
            check_one(e, st, sref, rep);
        }
    }
    for (name, ids) in &refs.groups {
        let withdrawn: Vec<bool> = status
            .iter()
            .filter(|s| ids.contains(&s.id.0))
            .map(|s| s.state == SessionState::Withdrawn)
            .collect();
        if withdrawn.iter().any(|w| *w) && !withdrawn.iter().all(|w| *w) {
            out.push(format!(
                "group {name}: some of its sessions are withdrawn, others not"
            ));
        }
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
            check_image(e, st, sref, &mut out);
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
            // A recorded copy that neither the target, the copy log nor the source holds: the
            // grain's T0 bytes are gone. Nothing the enumerator injects may cause that (an
            // injected I/O error while proving one ends the session with another detail).
            Some(r)
                if r.code == crate::model::ReasonCode::CopyUnverified
                    && r.detail.contains("neither") =>
            {
                out.push(format!(
                    "session {} lost T0 bytes of a recorded copy: {}",
                    st.id, r.detail
                ));
                format!("terminated:{:?}", r.code)
            }
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

/// Read the image of a live session: every grain must be its T0 bytes, or show some of the
/// target writes not yet durable (any subset of the first six, applied in order).
fn check_image(e: &Engine, st: &SessionStatus, sref: &SessRef, out: &mut Vec<String>) {
    let mut buf = vec![0u8; sref.image.len()];
    match e.read_image(st.id, 0, &mut buf) {
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
            // An undecided refresh: the whole image is the new T0 instead.
            if sref
                .refreshed
                .as_ref()
                .is_some_and(|r| r.as_slice() == buf.as_slice())
            {
                return;
            }
            for (i, got) in buf.chunks(g).enumerate() {
                let want = &sref.image[i * g..i * g + got.len()];
                let ok = got == want || alts.iter().any(|a| &a[i * g..i * g + got.len()] == got);
                if !ok {
                    out.push(format!(
                        "session {} ({:?}, {} of {} grains copied): image grain {i} differs \
                         from T0",
                        st.id, st.state, st.grains_copied, st.grains_total
                    ));
                    break;
                }
            }
        }
        Err(Error::ExtentTerminated { .. }) => {}
        Err(err) => out.push(format!("session {}: read_image failed: {err}", st.id)),
    }
}

/// Recover from device images (table first, then [`VOLUMES`]), which the recovery takes over
/// without a copy, and check the oracle.
pub(super) fn recover_and_check(
    images: Vec<Vec<u8>>,
    refs: &RefState,
    rep: &mut CrashReport,
    ctx: &dyn Fn() -> String,
) {
    let before = rep.violations;
    let mut images = images.into_iter();
    let table: Arc<dyn TableStorage> = Arc::new(MemStorage::from_bytes(
        "crash",
        images.next().unwrap_or_default(),
    ));
    let mut resolver = MapResolver::default();
    for (n, img) in VOLUMES.iter().zip(images) {
        resolver.add(Arc::new(MemVolume::from_vec(n, img)));
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        Engine::open(table, &resolver, engine_options())
    }));
    match r {
        Err(_) => rep.violation("recovery panicked".to_string()),
        Ok(Err(e)) => {
            *rep.outcomes.entry("open_error".to_string()).or_default() += 1;
            if refs.sessions.values().any(|s| s.required) {
                rep.violation(format!("recovery failed with acknowledged sessions: {e}"));
            }
        }
        Ok(Ok(e)) => {
            check_engine(&e, refs, rep);
            finish_reversal(&e, refs, rep);
            check_refresh(&e, rep);
        }
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
