//! The fault sweeps: a workload run again with one fault injected at sampled points (EIO once or
//! forever, a failing durability point, ENOSPC from an I/O on, a misdirected table write or
//! read), then recovered from the final and from the durable image and checked.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::oracle::{recover_and_check, ref_at};
use super::runner::{run_workload, Run};
use super::workload::Workload;
use super::{CrashReport, CrashtestOptions};
use crate::activity::format::Layout;
use crate::fault::sim::{CrashCursor, DevKind, Fate, Faults, IoEvent};

/// Every sweep over workload `w`, with `opts.eio_points` points each; `run` is the fault-free
/// run (its I/O, flush and table I/O counts set the points).
pub(super) fn sweep_faults(
    w: &Workload,
    opts: &CrashtestOptions,
    run: &Run,
    rep: &mut CrashReport,
) {
    let points = opts.eio_points as u64;
    // F9: EIO on the N-th I/O, once and forever; then recover from what is durable.
    let total = run.clock.max(1);
    let step = (total / points).max(1);
    sweep_eio(w, total, step, rep);
    // Failing durability points: the k-th flush/sync fails once, the workload goes on.
    let flushes = run.flushes.max(1);
    sweep_failed_sync(w, flushes, (flushes / points).max(1), rep);
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
    let mut rng = SmallRng::seed_from_u64(w.seed ^ 0xF6);
    let Ok(l) = super::workload_engine_options(w).table.layout() else {
        return;
    };
    let table_writes = run.table_writes.max(1);
    let mstep = (table_writes / points).max(1);
    let mut k = 0;
    while k < table_writes {
        for dest in misdirect_destinations(&l, &mut rng) {
            sweep_misdirect(w, k, dest, rep);
        }
        k += mstep;
    }
    // Misdirected reads: one table read returns the bytes of another place.
    let reads = run.table_reads.max(1);
    let rstep = (reads / points).max(1);
    let mut k = 0;
    while k < reads {
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

/// EIO at I/O `0, step, 2*step, ..` below `total`, once and forever.
fn sweep_eio(w: &Workload, total: u64, step: u64, rep: &mut CrashReport) {
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
                recover_and_check(c.image(|_| fate), refs, rep, &ctx);
            }
        }
        at += step;
    }
}

/// Durability point `0, step, 2*step, ..` below `flushes` fails once.
fn sweep_failed_sync(w: &Workload, flushes: u64, step: u64, rep: &mut CrashReport) {
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
            k += step;
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
            recover_and_check(c.image(|_| fate), refs, rep, &ctx);
        }
        k += step;
    }
}

/// Four places for a misdirected table write: another journal slot, a superblock slot, a
/// checkpoint area (its start or a sector inside it) and any 512-byte-aligned offset before
/// the copy log (the log holds data: see `SimWorld::set_table_data`).
fn misdirect_destinations(l: &Layout, rng: &mut SmallRng) -> [u64; 4] {
    use crate::activity::format::{CHECKPOINT_AREAS, SUPERBLOCK_SLOTS};
    let sector = crate::limits::JOURNAL_BLOCK_BYTES as u64;
    let slot = rng.random_range(0..l.journal_blocks() * 2);
    let journal = l.journal(0) + slot * sector;
    let sb = l.superblock(rng.random_range(0..SUPERBLOCK_SLOTS));
    let area = l.checkpoint(rng.random_range(0..CHECKPOINT_AREAS));
    let inside = rng.random_range(0..4u64) * sector;
    let anywhere = rng.random_range(0..l.log() / sector) * sector;
    [journal, sb, area + inside, anywhere]
}

/// Crash points sampled after the misdirected write: the next few I/Os one by one, then evenly
/// spaced to the end of the log.
const MISDIRECT_CRASH_POINTS: usize = 12;

/// Run `w` with its `k`-th table write sent to `dest`; recover the final and the durable image,
/// then crash at points after the misdirected write (the writes the engine issued next, kept or
/// lost) and recover each: one misdirected write followed by a crash anywhere must never lose
/// an acknowledged session or serve a wrong image.
pub(super) fn sweep_misdirect(w: &Workload, k: u64, dest: u64, rep: &mut CrashReport) {
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
    let mut c = CrashCursor::new(&r.log);
    for p in misdirect_crash_points(&r, k) {
        let end = r.log.events.len();
        while c.pos() < p.min(end) && c.advance() {}
        let n = c.pos();
        let refs = ref_at(&r.recs, if p == usize::MAX { usize::MAX - 1 } else { n });
        let ctx = || format!("{} (seed {}) {what}, crash after I/O {n}", w.name, w.seed);
        for (suffix, fate) in [("prefix", Fate::Keep), ("durable", Fate::Drop)] {
            rep.state(&format!("misdirect_{suffix}"));
            recover_and_check(c.image(|_| fate), refs, rep, &ctx);
        }
    }
}

/// The crash points of [`sweep_misdirect`], ascending: up to [`MISDIRECT_CRASH_POINTS`] log
/// positions after the `k`-th table write of `r` (none when it has fewer), then the end
/// (`usize::MAX`).
fn misdirect_crash_points(r: &Run, k: u64) -> Vec<usize> {
    let table_dev = r.log.devices.iter().position(|d| d.1 == DevKind::Table);
    let at = r
        .log
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, IoEvent::Write { dev, .. } if Some(*dev) == table_dev))
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
    points
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
        recover_and_check(c.image(|_| fate), refs, rep, &ctx);
    }
}
