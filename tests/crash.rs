//! Fault-injection tests: crash-state enumeration, the ordering canary, bit-flip sweeps.
#![cfg(feature = "fault")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use timezero::fault::internals::format::{
    decode_block, CopyMode, Entry, ExtentSpec, Layout, ReasonCode, SessionState, Superblock,
};
use timezero::fault::internals::Table;
use timezero::fault::{crashtest, engine_options, flip_bit, CrashtestOptions};
use timezero::Error;
use timezero::{MemStorage, TableStorage};

#[test]
fn enumerator_finds_no_violation() {
    // Full budget in release builds; a smaller one for unoptimised `cargo test`.
    let release = !cfg!(debug_assertions);
    let opts = CrashtestOptions {
        workloads: if release { 140 } else { 56 },
        seed: 20_261_123,
        threads: 2,
        exhaustive_max: 5,
        recovery_crash_stride: if release { 1 } else { 4 },
        eio_points: if release { 32 } else { 8 },
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r.violations, 0, "violations: {:#?}", r.violation_samples);
    assert!(r.workloads >= 50);
    let (min_states, min_checks) = if release {
        (150_000, 1_000)
    } else {
        (20_000, 300)
    };
    assert!(
        r.states_total >= min_states,
        "only {} states",
        r.states_total
    );
    assert!(
        r.ordering_checks >= min_checks,
        "only {} ordering checks",
        r.ordering_checks
    );
    assert!(
        r.ordering_checks >= 500,
        "only {} ordering checks",
        r.ordering_checks
    );
    for k in [
        "prefix",
        "durable",
        "subset",
        "torn",
        "recovery_crash_prefix",
        "eio_durable",
    ] {
        assert!(r.states.get(k).copied().unwrap_or(0) > 0, "no {k} states");
    }
}

/// One workload of a catalogue run alone (`only`), as it runs in the whole catalogue: the one
/// that found a reverse restore taken after a retire's failed target flush (`overlap#120` of the
/// catalogue above), with every error sweep, a few times (its retire runs on the flusher
/// thread, so its durability points may come in another order each run). A name the catalogue
/// lacks runs nothing.
#[test]
fn a_named_workload_runs_alone() {
    let opts = CrashtestOptions {
        workloads: 140,
        seed: 20_261_123,
        threads: 1,
        eio_points: usize::MAX,
        only: vec!["overlap#120".to_string()],
        ..CrashtestOptions::default()
    };
    for _ in 0..4 {
        let r = crashtest(&opts);
        assert_eq!(r.workloads, 1);
        assert_eq!(r.violations, 0, "violations: {:#?}", r.violation_samples);
        assert!(r.states.get("syncfail_durable").copied().unwrap_or(0) > 0);
        assert!(r.outcomes.keys().any(|k| k == "reverse_checked"));
    }
    let none = crashtest(&CrashtestOptions {
        only: vec!["overlap#121".to_string()],
        ..opts
    });
    assert_eq!((none.workloads, none.states_total), (0, 0));
}

/// The serial copy-before-write path (target flush, then the bits; `checked_copies` off)
/// under the same enumerator, on another seed and a smaller budget.
#[test]
fn enumerator_finds_no_violation_with_serial_copies() {
    let release = !cfg!(debug_assertions);
    let opts = CrashtestOptions {
        workloads: if release { 42 } else { 14 },
        seed: 20_261_203,
        threads: 2,
        recovery_crash_stride: 2,
        eio_points: if release { 16 } else { 4 },
        serial_copies: true,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!(
        "serial copies: {} states, {} ordering checks, {} violations",
        r.states_total, r.ordering_checks, r.violations
    );
    assert_eq!(r.violations, 0, "violations: {:#?}", r.violation_samples);
    assert!(r.states_total >= 10_000, "only {} states", r.states_total);
    for k in ["prefix", "durable", "subset", "eio_durable"] {
        assert!(r.states.get(k).copied().unwrap_or(0) > 0, "no {k} states");
    }
}

/// A write issued before its change marks are durable leaves, in some crash states, a change
/// the map does not record; the refresh check (refresh, copy, compare with the source) must
/// find it.
#[test]
fn canary_late_change_marks_are_caught() {
    let opts = CrashtestOptions {
        workloads: 11,
        seed: 7,
        threads: 2,
        canary_late_marks: true,
        // Every violation kept: the samples looked for below may come after others.
        keep_violations: 100_000,
        eio_points: 0,
        recovery_crash_stride: 0,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!(
        "late-marks canary: {} states, {} violations; first: {:?}",
        r.states_total,
        r.violations,
        r.violation_samples.first()
    );
    assert!(
        r.violation_samples
            .iter()
            .any(|v| v.contains("a change was not recorded")),
        "an unrecorded change went unnoticed"
    );
}

/// The reverse-restore canary commits `Restored` before the source flush: a crash between the
/// two leaves grains marked back on the source whose bytes never got there; the reverse check
/// (the source as its clients read it, against the image) must find them.
#[test]
fn canary_restored_before_flush_is_caught() {
    let opts = CrashtestOptions {
        workloads: 9,
        seed: 2,
        threads: 2,
        canary_restored_early: true,
        // Every violation kept: the samples looked for below may come after others.
        keep_violations: 100_000,
        eio_points: 0,
        recovery_crash_stride: 0,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!(
        "restored-early canary: {} states, {} violations; first: {:?}",
        r.states_total,
        r.violations,
        r.violation_samples.first()
    );
    assert!(
        r.violation_samples
            .iter()
            .any(|v| v.contains("the source reads wrong bytes")),
        "a grain marked restored before its bytes were durable went unnoticed"
    );
}

/// The copy-log canary leaves a logged copy's bytes out of the log while its record names
/// them: a crash that loses the target's unflushed bytes after the source write leaves the
/// grain's T0 bytes nowhere. The ordering checker (the source write was issued with T0 neither
/// durable on the target nor in the log) and the recovered images must both show it.
#[test]
fn canary_skipped_log_write_is_caught() {
    let opts = CrashtestOptions {
        workloads: 12,
        seed: 7,
        threads: 2,
        canary_skip_log_write: true,
        eio_points: 0,
        recovery_crash_stride: 0,
        keep_violations: 100_000,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!(
        "log canary: {} states, {} violations; first: {:?}; first of a recovered image: {:?}",
        r.states_total,
        r.violations,
        r.violation_samples.first(),
        r.violation_samples
            .iter()
            .find(|v| !v.contains("ordering:"))
    );
    assert!(r.violations > 0, "the missing log bytes went unnoticed");
    assert!(
        r.violation_samples
            .iter()
            .any(|v| v.contains("ordering:") && v.contains("copy log")),
        "ordering checker missed it"
    );
    assert!(
        r.violation_samples.iter().any(|v| !v.contains("ordering:")),
        "the recovered images missed it"
    );
}

#[test]
fn canary_skipped_flush_is_caught() {
    let opts = CrashtestOptions {
        workloads: 12,
        seed: 7,
        threads: 2,
        canary: true,
        // Every violation kept: the samples looked for below may come after others.
        keep_violations: 100_000,
        eio_points: 0,
        recovery_crash_stride: 0,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!(
        "canary: {} states, {} violations; first: {:?}",
        r.states_total,
        r.violations,
        r.violation_samples.first()
    );
    assert!(r.violations > 0, "the skipped flush went unnoticed");
    assert!(
        r.violation_samples.iter().any(|v| v.contains("ordering:")),
        "ordering checker missed it"
    );
    assert!(
        r.violation_samples
            .iter()
            .any(|v| v.contains("differs from T0")),
        "enumerator missed it"
    );
}

/// The state that matters after open: per session, state, mode, reason code and bits.
type Digest = (u64, SessionState, CopyMode, Option<ReasonCode>, Vec<u8>);

fn digest(t: &Table) -> Vec<Digest> {
    t.sessions()
        .iter()
        .map(|s| {
            let st = s.status();
            (
                s.id().0,
                st.state,
                st.mode,
                st.reason.map(|r| r.code),
                s.image().bitmap,
            )
        })
        .collect()
}

#[test]
fn every_single_bit_flip_is_detected() {
    // A small table: one session, a few commits after the last checkpoint.
    let opts = engine_options();
    let layout: Layout = opts.table.layout().unwrap();
    let store = Arc::new(MemStorage::new("t", layout.file_bytes()));
    let engine = timezero::Engine::create(store.clone(), opts).unwrap();
    let a = engine.attach(Arc::new(timezero::MemVolume::new("a", 65536)));
    let b = engine.attach(Arc::new(timezero::MemVolume::new("b", 65536)));
    let id = engine
        .establish(&timezero::SessionSpec {
            source: a,
            target: b,
            extents: vec![ExtentSpec {
                source_offset: 0,
                target_offset: 0,
                len: 65536,
            }],
            grain: timezero::GrainSize::new(4096).unwrap(),
            mode: CopyMode::Copy,
            incremental: false,
        })
        .unwrap();
    engine
        .copy_batch(id, timezero::GrainIndex(0), timezero::GrainCount(3))
        .unwrap();
    timezero::fault::internals::commit(
        engine.table(),
        vec![Entry::SetBits {
            session: id,
            start: 7,
            count: 2,
        }],
    )
    .unwrap();
    drop(engine);
    let good = store.snapshot();
    let (t, _) = Table::open(Arc::new(MemStorage::from_bytes("t", good.clone()))).unwrap();
    let want = digest(&t);
    // Every structure open reads, every bit: both superblocks (their checksummed part), both
    // checkpoints whole (header, descriptors, bitmaps), and every valid journal block of both
    // mirror copies.
    let sbs: Vec<Superblock> = (0..2u32)
        .filter_map(|c| {
            let o = layout.superblock(c) as usize;
            Superblock::decode(&good[o..o + 4096]).ok()
        })
        .collect();
    let current = *sbs
        .iter()
        .max_by_key(|s| s.generation)
        .expect("a valid superblock");
    let jb = 512u64;
    let mut regions: Vec<(String, u64, u64, bool)> = vec![
        ("superblock0".into(), layout.superblock(0), 128, true),
        ("superblock1".into(), layout.superblock(1), 128, true),
    ];
    for sb in &sbs {
        // Open reads only the newest checkpoint while it verifies.
        let is_current = sb.generation == current.generation;
        regions.push((
            format!("checkpoint{}", sb.area),
            layout.checkpoint(sb.area),
            sb.ckpt_len,
            is_current,
        ));
    }
    for copy in 0..2u32 {
        for slot in 0..layout.journal_blocks() {
            let off = layout.block(copy, slot);
            let b = &good[off as usize..(off + jb) as usize];
            if let Ok((h, _)) = decode_block(b, &t.id(), None) {
                // Replay reads copy A first; blocks before the checkpoint are not replayed.
                let read = copy == 0 && h.seq >= current.ckpt_seq;
                regions.push((format!("journal {copy} seq {}", h.seq), off, jb, read));
            }
        }
    }
    assert!(
        regions.iter().any(|r| r.0.starts_with("journal 0") && r.3),
        "a replayed block"
    );
    let (mut same, mut corrupt, mut damaged, mut flips) = (0u64, 0u64, 0u64, 0u64);
    let mut noticed = 0u64;
    let mut per = std::collections::BTreeMap::new();
    for (name, off, len, _) in &regions {
        let name = name.as_str();
        for bit in 0..len * 8 {
            let mut img = good.clone();
            flip_bit(&mut img[*off as usize..], bit);
            flips += 1;
            let s: Arc<dyn TableStorage> = Arc::new(MemStorage::from_bytes("t", img));
            match Table::open(s) {
                Ok((t, rep)) => {
                    let got = digest(&t);
                    if rep.fell_back || rep.blocks_repaired > 0 || rep.damaged_superblocks > 0 {
                        noticed += 1;
                        *per.entry(name.to_string()).or_insert(0u64) += 1;
                    }
                    if got == want {
                        same += 1;
                    } else if got.iter().all(|g| {
                        g.1 != SessionState::Active || g.3 == Some(ReasonCode::TableDamaged)
                    }) && got.iter().any(|g| g.3 == Some(ReasonCode::TableDamaged))
                    {
                        damaged += 1;
                    } else {
                        panic!("{name} bit {bit}: silently different state {got:?} vs {want:?}");
                    }
                }
                Err(Error::Corrupt { .. }) => corrupt += 1,
                Err(e) => panic!("{name} bit {bit}: untyped error {e}"),
            }
        }
    }
    println!(
        "bit flips: {flips} ({same} same state [{noticed} via fallback/mirror repair], \
         {damaged} terminated TableDamaged, {corrupt} Corrupt)"
    );
    println!("regions: {}; noticed per region: {per:?}", regions.len());
    // Every flip in a structure that open reads is noticed (repaired from the other copy or
    // the older checkpoint); flips in structures it does not read change nothing.
    for (name, _, len, read) in &regions {
        if *read {
            assert_eq!(per.get(name).copied().unwrap_or(0), len * 8, "{name}");
        }
    }
    assert!(flips >= 2 * 1024 + 2 * 512 + 4 * 4096, "{flips} flips");
}

/// Regression: an `Establish` whose table sync fails may still be durable, so the engine must
/// not let source writes bypass copy-before-write afterwards (found by the sync-failure sweep).
#[test]
fn failed_establish_fences_the_source() {
    use timezero::fault::{Faults, SimWorld};
    use timezero::Volume;
    let world = SimWorld::new(5);
    let layout = engine_options().table.layout().unwrap();
    let table = world.add_table("t", vec![0; layout.file_bytes() as usize]);
    let a = world.add_volume("a", vec![1; 65536]);
    let b = world.add_volume("b", vec![0; 65536]);
    let engine = timezero::Engine::create(Arc::new(table), engine_options()).unwrap();
    let (ia, ib) = (a.info().id, b.info().id);
    engine.attach(Arc::new(a));
    engine.attach(Arc::new(b));
    // The next flush is the source flush of establish; the one after it the table sync.
    world.set_faults(Faults {
        fail_sync_at: Some(world.flushes() + 1),
        ..Faults::default()
    });
    let spec = timezero::SessionSpec {
        source: ia,
        target: ib,
        extents: Vec::new(),
        grain: timezero::GrainSize::new(4096).unwrap(),
        mode: CopyMode::NoCopy,
        incremental: false,
    };
    assert!(engine.establish(&spec).is_err());
    let w = engine.write(ia, 0, &[2; 4096]);
    assert!(
        matches!(w, Err(Error::Poisoned { .. })),
        "source write after a failed establish: {w:?}"
    );
    // The target too: a resumed session's copier would overwrite the write, and its image would
    // not show it (found by the op_script fuzz target).
    let w = engine.write(ib, 0, &[3; 4096]);
    assert!(
        matches!(w, Err(Error::Poisoned { .. })),
        "target write after a failed establish: {w:?}"
    );
}

/// The state the enumerator found with seed 99: in workload `reopen#33`, the checkpoint that
/// recovery writes on open (table write 23) landed at 268,800, in the journal's second copy and
/// across into the checkpoint area holding the current checkpoint. With two checkpoint areas and
/// no read-back, a crash after the superblock switch left no valid superblock/checkpoint pair
/// and every acknowledged session was lost. The table's canary brings back that scheme: the
/// same write must then be caught, and with the real scheme no state may violate the oracle.
#[test]
fn misdirected_checkpoint_write_in_recovery_keeps_the_table() {
    let w = timezero::fault::catalogue(60, 99)
        .into_iter()
        .find(|w| w.name == "reopen#33")
        .expect("workload reopen#33 in catalogue(60, 99)");
    assert_eq!(w.seed, 3_419_378_616_714_001_472);
    let r = timezero::fault::check_misdirected_write(&w, 23, 268_800);
    assert!(r.states_total >= 10, "only {} states", r.states_total);
    assert_eq!(r.violations, 0, "{:?}", r.violation_samples);

    timezero::fault::internals::set_canary_unverified_checkpoint(true);
    let weak = timezero::fault::check_misdirected_write(&w, 23, 268_800);
    timezero::fault::internals::set_canary_unverified_checkpoint(false);
    assert!(
        weak.violation_samples
            .iter()
            .any(|v| v.contains("recovery failed with acknowledged sessions")),
        "the unverified checkpoint scheme went unnoticed: {:?}",
        weak.violation_samples
    );
}

/// Negative control of the misdirect sweep: with the unverified two-area checkpoint scheme
/// switched back on, sending table writes to superblock slots and checkpoint areas and crashing
/// afterwards must find tables that lost acknowledged sessions.
#[test]
fn canary_unverified_checkpoint_is_caught() {
    let opts = CrashtestOptions {
        workloads: 6,
        seed: 2,
        threads: 2,
        canary_checkpoint: true,
        // Every violation kept: the samples looked for below may come after others.
        keep_violations: 100_000,
        eio_points: 16,
        recovery_crash_stride: 0,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!(
        "checkpoint canary: {} states, {} violations; first: {:?}",
        r.states_total,
        r.violations,
        r.violation_samples.first()
    );
    assert!(
        r.violation_samples
            .iter()
            .any(|v| v.contains("misdirected") && v.contains("acknowledged sessions")),
        "the misdirect sweep missed the unverified checkpoint scheme: {:?}",
        r.violation_samples
    );
}

/// Negative control of the all-or-none check: with a group's sessions committed one by one
/// (the group canary), a crash between two of the commits leaves part of the group, and the
/// enumerator must report it; with the real single commit (`enumerator_finds_no_violation`,
/// whose `basic` workloads end with a group) it never happens.
#[test]
fn canary_split_group_commit_is_caught() {
    let opts = CrashtestOptions {
        workloads: 1,
        seed: 2,
        threads: 1,
        canary_split_group: true,
        // Every violation kept: the samples looked for below may come after others.
        keep_violations: 100_000,
        eio_points: 0,
        recovery_crash_stride: 0,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    println!(
        "group canary: {} states, {} violations; first: {:?}",
        r.states_total,
        r.violations,
        r.violation_samples.first()
    );
    assert!(
        r.violation_samples
            .iter()
            .any(|v| v.contains("group g: 1 of its 2 sessions after recovery")),
        "a partly established group went unnoticed: {:?}",
        r.violation_samples
    );
    let clean = crashtest(&CrashtestOptions {
        canary_split_group: false,
        ..opts
    });
    assert_eq!(clean.violations, 0, "{:?}", clean.violation_samples);
    assert!(clean.outcomes.get("group_all").copied().unwrap_or(0) > 0);
    assert!(clean.outcomes.get("group_none").copied().unwrap_or(0) > 0);
}

/// Write-back mode (experimental): with every other round of workloads holding first writes
/// until the volume's flush, every crash state (prefix, subset, torn, crashes during recovery)
/// still recovers to T0-exact images. The error sweeps are off here to keep the run short; they
/// run in `crashtest --write-back` (see docs/crash-model.md, "Write-back mode").
#[test]
fn write_back_workloads_recover_t0_exact_images_at_every_crash_point() {
    let opts = CrashtestOptions {
        workloads: 28,
        seed: 11,
        threads: 2,
        eio_points: 0,
        write_back: true,
        ..CrashtestOptions::default()
    };
    let r = crashtest(&opts);
    assert_eq!(r.violations, 0, "violations: {:#?}", r.violation_samples);
    assert!(
        r.states.get("torn").copied().unwrap_or(0) > 0,
        "no torn states"
    );
    assert!(r.ordering_checks > 0, "no ordering checks");
}
