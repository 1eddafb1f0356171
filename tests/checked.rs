//! Checked copy-before-write: a first write's target flush runs beside the table commit of
//! its `CopyChecked` records, so a crash can leave a durable record whose target bytes were
//! lost or torn. Each test builds such a state by hand (the engine dropped without a close, a
//! device put back to what a crash could leave) and checks what recovery makes of it.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use common::{image, mem_storage, pattern, small_table};
use timezero::fault::internals::Table;
use timezero::{
    CopyMode, Engine, EngineOptions, MapResolver, MemVolume, Outcome, ReasonCode, SessionId,
    SessionSpec, SessionState, TableStorage, Volume, VolumeId,
};

const GRAIN: u64 = 4096;
const GRAINS: u64 = 64;
const SIZE: u64 = GRAIN * GRAINS;

struct World {
    storage: Arc<timezero::MemStorage>,
    src: Arc<MemVolume>,
    tgt: Arc<MemVolume>,
    t0: Vec<u8>,
    id: SessionId,
    s: VolumeId,
}

/// The tables of the tests that build the checked path's states: no copy log, so a first
/// write's source write waits for the target's flush as well as for its record.
fn checked_table() -> timezero::TableOptions {
    timezero::TableOptions {
        log_bytes: 0,
        ..small_table()
    }
}

/// An engine with checked copies on and a no-copy session (no background copier: only
/// first writes copy) of a patterned source (`seed`) onto an empty target; no copy log.
fn session(seed: u64) -> (World, Engine) {
    session_in(seed, checked_table())
}

/// [`session`] with a table of `opts`.
fn session_in(seed: u64, opts: timezero::TableOptions) -> (World, Engine) {
    let storage = mem_storage(&opts);
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::create(
        st,
        EngineOptions {
            table: opts,
            checked_copies: true,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let src = Arc::new(MemVolume::with_data("src", &pattern(seed, SIZE as usize)));
    let tgt = Arc::new(MemVolume::new("tgt", SIZE as usize));
    let t0 = src.snapshot();
    let s = e.attach(src.clone());
    let t = e.attach(tgt.clone());
    let id = e
        .establish(&SessionSpec {
            grain: timezero::GrainSize::new(GRAIN).unwrap(),
            mode: CopyMode::NoCopy,
            ..SessionSpec::whole(s, t)
        })
        .unwrap();
    let w = World {
        storage,
        src,
        tgt,
        t0,
        id,
        s,
    };
    (w, e)
}

/// [`session`], then a first write of `len` bytes at grain `g` of the source; the engine is
/// dropped without a close.
fn first_write(g: u64, len: usize) -> World {
    let (w, e) = session(7);
    let (tgt, t0, s) = (&w.tgt, &w.t0, w.s);
    e.write(s, g * GRAIN, &vec![0xee; len]).unwrap();
    assert_eq!(
        &tgt.snapshot()[(g * GRAIN) as usize..((g + 1) * GRAIN) as usize],
        &t0[(g * GRAIN) as usize..((g + 1) * GRAIN) as usize],
        "the first write copied its grain's T0 bytes to the target"
    );
    drop(e);
    w
}

fn grain_range(g: u64) -> std::ops::Range<usize> {
    (g * GRAIN) as usize..((g + 1) * GRAIN) as usize
}

fn reopen(w: &World, vols: &[&Arc<MemVolume>]) -> Engine {
    let mut r = MapResolver::default();
    for v in vols {
        r.add(Arc::clone(v) as Arc<dyn Volume>);
    }
    let st: Arc<dyn TableStorage> = w.storage.clone();
    Engine::open(st, &r, EngineOptions::default()).unwrap()
}

fn outcome(e: &Engine, id: SessionId) -> Outcome {
    e.open_decisions()
        .iter()
        .find(|d| d.session == id)
        .unwrap()
        .outcome
        .clone()
}

#[test]
fn a_record_whose_target_bytes_were_lost_is_copied_again_from_the_source_at_open() {
    // The crash left the record durable, lost the target's bytes, and the source write had
    // not been issued (it waits for both durability points).
    let w = first_write_lost(5);
    reopen_repaired(&w, 5);
}

/// Reopen `w` with both volumes and check that the session resumed with grain `g` copied
/// again onto the target, its image T0-exact, and the grain staying copied: a write to it on
/// the source leaves the image at T0.
fn reopen_repaired(w: &World, g: u64) {
    let e = reopen(w, &[&w.src, &w.tgt]);
    assert!(
        matches!(outcome(&e, w.id), Outcome::Resumed),
        "{:?}",
        outcome(&e, w.id)
    );
    assert_eq!(&w.tgt.snapshot()[grain_range(g)], &w.t0[grain_range(g)]);
    assert_eq!(image(&e, w.id), w.t0);
    e.write(w.s, g * GRAIN, &[1u8; 512]).unwrap();
    assert_eq!(image(&e, w.id), w.t0);
}

#[test]
fn a_torn_target_grain_is_copied_again_too() {
    let w = first_write(9, 4096);
    // Half the grain's target bytes reached the medium.
    w.tgt.write_at(9 * GRAIN + 2048, &[0x11u8; 2048]).unwrap();
    w.src.write_at(9 * GRAIN, &w.t0[grain_range(9)]).unwrap();
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(matches!(outcome(&e, w.id), Outcome::Resumed));
    assert_eq!(image(&e, w.id), w.t0);
}

#[test]
fn a_record_whose_target_bytes_are_durable_is_kept_as_it_is() {
    let w = first_write(3, 100);
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(matches!(outcome(&e, w.id), Outcome::Resumed));
    assert_eq!(image(&e, w.id), w.t0);
    // The source write was issued and stays.
    assert_eq!(w.src.snapshot()[(3 * GRAIN) as usize], 0xee);
}

#[test]
fn a_record_that_neither_target_nor_source_holds_terminates_the_session() {
    let w = first_write(4, 4096);
    // Impossible after a crash of this engine (the source write waits for the target's
    // flush): something else changed both volumes. T0 cannot be proven, so the session ends.
    w.tgt
        .write_at(4 * GRAIN, &vec![0u8; GRAIN as usize])
        .unwrap();
    let e = reopen(&w, &[&w.src, &w.tgt]);
    match outcome(&e, w.id) {
        Outcome::Ended => {}
        o => panic!("expected the session ended at open, got {o:?}"),
    }
    assert_lost_t0(&e, w.id, "neither the target nor the source");
}

/// Session `id` was terminated because a recorded grain's T0 bytes are nowhere: its reason is
/// `CopyUnverified` with `detail` in its text.
fn assert_lost_t0(e: &Engine, id: SessionId, detail: &str) {
    let st = e.status().into_iter().find(|x| x.id == id).unwrap();
    assert_eq!(st.state, SessionState::Terminated);
    let r = st.reason.unwrap();
    assert_eq!(r.code, ReasonCode::CopyUnverified);
    assert!(r.detail.contains(detail), "{}", r.detail);
}

/// [`first_write`] at grain `g`, then the crash this engine can leave: the record durable,
/// the target's bytes of the grain lost, and the source write not issued (the source still
/// holds T0 there).
fn first_write_lost(g: u64) -> World {
    let w = first_write(g, 4096);
    w.tgt
        .write_at(g * GRAIN, &vec![0u8; GRAIN as usize])
        .unwrap();
    w.src.write_at(g * GRAIN, &w.t0[grain_range(g)]).unwrap();
    w
}

fn state(e: &Engine, id: SessionId) -> (SessionState, Option<ReasonCode>) {
    let st = e.status().into_iter().find(|x| x.id == id).unwrap();
    (st.state, st.reason.map(|r| r.code))
}

#[test]
fn a_missing_target_with_unverified_records_suspends_the_session_until_it_returns() {
    let w = first_write_lost(2);
    // The records cannot be proven without the target: the session waits for it, and its
    // grains to prove outlive the checkpoints of several opens (each open writes one, and
    // the journal that named them is behind them).
    for _ in 0..3 {
        let e = reopen(&w, &[&w.src]);
        assert_eq!(
            state(&e, w.id),
            (SessionState::Suspended, Some(ReasonCode::TargetUnavailable))
        );
        // The source keeps the grain's T0 bytes until they are proven: a write to it is
        // refused, as one that needs copy-before-write is.
        match e.write(w.s, 2 * GRAIN + 512, &[9u8; 512]) {
            Err(timezero::Error::Suspended { .. }) => {}
            r => panic!("a write to an unproven grain of a suspended session: {r:?}"),
        }
        drop(e);
    }
    assert_eq!(&w.src.snapshot()[grain_range(2)], &w.t0[grain_range(2)]);
    // The target is back: the grain is copied again from the source, and the session goes on.
    reopen_repaired(&w, 2);
}

#[test]
fn a_suspended_session_whose_target_returns_by_resume_proves_its_grains_first() {
    let w = first_write_lost(6);
    let e = reopen(&w, &[&w.src]);
    assert_eq!(state(&e, w.id).0, SessionState::Suspended);
    let mut r = MapResolver::default();
    r.add(w.src.clone() as Arc<dyn Volume>);
    r.add(w.tgt.clone() as Arc<dyn Volume>);
    let d = e.resume(w.id, &r).unwrap();
    assert!(matches!(d.outcome, Outcome::Resumed), "{:?}", d.outcome);
    assert!(d.was_suspended);
    assert_eq!(&w.tgt.snapshot()[grain_range(6)], &w.t0[grain_range(6)]);
    assert_eq!(image(&e, w.id), w.t0);
    drop(e);
    // The resume confirmed the grain durably: with the target missing again the session is
    // suspended with nothing left to prove, so the copied grain's source is writable.
    let e = reopen(&w, &[&w.src]);
    assert_eq!(state(&e, w.id).0, SessionState::Suspended);
    e.write(w.s, 6 * GRAIN, &[4u8; 512]).unwrap();
    drop(e);
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(matches!(outcome(&e, w.id), Outcome::Resumed));
    assert_eq!(image(&e, w.id), w.t0);
}

#[test]
fn a_returning_target_whose_grain_neither_volume_holds_ends_the_session() {
    let w = first_write_lost(3);
    drop(reopen(&w, &[&w.src]));
    // Something outside the engine changed the source while the target was away: T0 of the
    // grain is on neither volume, so the session cannot go on.
    w.src.write_at(3 * GRAIN, &[0x55u8; 100]).unwrap();
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert_lost_t0(&e, w.id, "neither");
}

#[test]
fn a_resume_that_finds_a_grain_on_neither_volume_ends_the_session() {
    let w = first_write_lost(3);
    let e = reopen(&w, &[&w.src]);
    assert_eq!(state(&e, w.id).0, SessionState::Suspended);
    // Changed outside the engine while the target was away.
    w.src.write_at(3 * GRAIN, &[0x55u8; 100]).unwrap();
    let mut r = MapResolver::default();
    r.add(w.src.clone() as Arc<dyn Volume>);
    r.add(w.tgt.clone() as Arc<dyn Volume>);
    match e.resume(w.id, &r).unwrap().outcome {
        Outcome::Terminated(r) => {
            assert_eq!(r.code, ReasonCode::CopyUnverified);
            assert!(r.detail.contains("neither"), "{}", r.detail);
        }
        o => panic!("expected the session terminated, got {o:?}"),
    }
    assert_eq!(
        state(&e, w.id),
        (SessionState::Terminated, Some(ReasonCode::CopyUnverified))
    );
}

#[test]
fn a_replaced_target_with_unverified_records_ends_the_session() {
    let w = first_write(2, 4096);
    // The target was re-formatted (a new generation): the records can never be proven.
    let other = Arc::new(MemVolume::with_data("tgt", &w.tgt.snapshot()));
    other.set_generation(timezero::Generation(1));
    let e = reopen(&w, &[&w.src, &other]);
    assert_eq!(
        state(&e, w.id),
        (SessionState::Terminated, Some(ReasonCode::CopyUnverified))
    );
}

#[test]
fn an_image_write_after_a_verified_reopen_is_kept_across_the_next_one() {
    let w = first_write(6, 4096);
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(matches!(outcome(&e, w.id), Outcome::Resumed));
    e.write_image(w.id, 6 * GRAIN, &[0x77u8; 4096]).unwrap();
    drop(e);
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(
        matches!(outcome(&e, w.id), Outcome::Resumed),
        "{:?}",
        outcome(&e, w.id)
    );
    let mut want = w.t0.clone();
    want[grain_range(6)].fill(0x77);
    assert_eq!(image(&e, w.id), want);
}

#[test]
fn a_write_through_the_image_right_after_the_first_write_is_kept_across_reopen() {
    let storage = mem_storage(&small_table());
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::create(
        st,
        EngineOptions {
            table: small_table(),
            checked_copies: true,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let src = Arc::new(MemVolume::with_data("src", &pattern(9, SIZE as usize)));
    let tgt = Arc::new(MemVolume::new("tgt", SIZE as usize));
    let t0 = src.snapshot();
    let s = e.attach(src.clone());
    let t = e.attach(tgt.clone());
    let id = e
        .establish(&SessionSpec {
            grain: timezero::GrainSize::new(GRAIN).unwrap(),
            mode: CopyMode::NoCopy,
            ..SessionSpec::whole(s, t)
        })
        .unwrap();
    e.write(s, 8 * GRAIN, &[1u8; 4096]).unwrap();
    // The image writes below must confirm their grains before they land: the records are in
    // the journal the next open replays, and a grain whose target bytes differ from its
    // record would be taken from the source (which no longer holds it: the session ends).
    // A target write to an uncopied grain copies its T0 bytes with a record too, then lands.
    e.write_image(id, 12 * GRAIN + 100, &[2u8; 100]).unwrap();
    e.write_image(id, 8 * GRAIN, &[3u8; 10]).unwrap();
    drop(e);
    let mut r = MapResolver::default();
    r.add(src.clone() as Arc<dyn Volume>);
    r.add(tgt.clone() as Arc<dyn Volume>);
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::open(st, &r, EngineOptions::default()).unwrap();
    assert!(matches!(e.open_decisions()[0].outcome, Outcome::Resumed));
    let mut want = t0.clone();
    want[(12 * GRAIN + 100) as usize..(12 * GRAIN + 200) as usize].fill(2);
    want[(8 * GRAIN) as usize..(8 * GRAIN + 10) as usize].fill(3);
    assert_eq!(image(&e, id), want);
}

#[test]
fn a_table_opened_without_its_volumes_keeps_unverified_records_for_the_engine() {
    let w = first_write_lost(1);
    let st: Arc<dyn TableStorage> = w.storage.clone();
    let (t, _) = Table::open(st).unwrap();
    let s = t.session(w.id).unwrap();
    assert_eq!(s.state(), SessionState::Active);
    drop(t);
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(matches!(outcome(&e, w.id), Outcome::Resumed));
    assert_eq!(image(&e, w.id), w.t0);
}

#[test]
fn after_a_clean_close_a_missing_target_suspends_the_session() {
    let storage = mem_storage(&small_table());
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::create(
        st,
        EngineOptions {
            table: small_table(),
            checked_copies: true,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let src = Arc::new(MemVolume::with_data("src", &pattern(3, SIZE as usize)));
    let tgt = Arc::new(MemVolume::new("tgt", SIZE as usize));
    let s = e.attach(src.clone());
    let t = e.attach(tgt.clone());
    let id = e
        .establish(&SessionSpec {
            grain: timezero::GrainSize::new(GRAIN).unwrap(),
            mode: CopyMode::NoCopy,
            ..SessionSpec::whole(s, t)
        })
        .unwrap();
    e.write(s, 0, &[1u8; 8192]).unwrap();
    // The close flushes every volume, then checkpoints: no record is left to verify.
    e.close().unwrap();
    let mut r = MapResolver::default();
    r.add(src.clone() as Arc<dyn Volume>);
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::open(st, &r, EngineOptions::default()).unwrap();
    let status = e.status().into_iter().find(|x| x.id == id).unwrap();
    assert_eq!(status.state, SessionState::Suspended);
    assert_eq!(status.reason.unwrap().code, ReasonCode::TargetUnavailable);
}

// The copy log: a first write's T0 bytes are durable in the table with their record, and the
// source write goes ahead before the target's flush. A crash can then leave the target's bytes
// lost while the source already holds the new data: the log is where they come back from.

/// A first write of a whole grain `g` through an engine whose table has a copy log; the
/// engine is dropped without a close (nothing retired: the target was never flushed).
fn logged_first_write(g: u64) -> (World, u64) {
    let (w, e) = session_in(7, small_table());
    e.write(w.s, g * GRAIN, &vec![0xee; GRAIN as usize])
        .unwrap();
    let logged = e
        .table()
        .stats
        .logged
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(e);
    (w, logged)
}

/// The crash the copy log allows: the record and the log durable, the source written, the
/// target's bytes of grain `g` lost.
fn logged_and_lost(g: u64) -> World {
    let (w, logged) = logged_first_write(g);
    assert_eq!(logged, 1, "the first write went through the copy log");
    assert_eq!(w.src.snapshot()[grain_range(g)][0], 0xee);
    w.tgt
        .write_at(g * GRAIN, &vec![0u8; GRAIN as usize])
        .unwrap();
    w
}

#[test]
fn a_logged_grain_lost_on_the_target_comes_back_from_the_log() {
    let w = logged_and_lost(5);
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(
        matches!(outcome(&e, w.id), Outcome::Resumed),
        "{:?}",
        outcome(&e, w.id)
    );
    assert_eq!(&w.tgt.snapshot()[grain_range(5)], &w.t0[grain_range(5)]);
    assert_eq!(image(&e, w.id), w.t0);
    // The user's write stays on the source.
    assert_eq!(w.src.snapshot()[grain_range(5)][0], 0xee);
}

#[test]
fn a_logged_grain_torn_on_the_target_comes_back_from_the_log() {
    let (w, logged) = logged_first_write(9);
    assert_eq!(logged, 1);
    w.tgt.write_at(9 * GRAIN + 1024, &[0x11u8; 512]).unwrap();
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(matches!(outcome(&e, w.id), Outcome::Resumed));
    assert_eq!(image(&e, w.id), w.t0);
}

/// Damage the copy log's bytes of the grain the only logged copy of `w` recorded.
fn damage_log(w: &World) {
    let st: Arc<dyn TableStorage> = w.storage.clone();
    let l = {
        let (t, _) = Table::open_read_only(st.clone()).unwrap();
        t.layout()
    };
    // The first (only) logged run starts at the log's first byte.
    st.write(l.log() + 100, &[0xabu8; 8]).unwrap();
}

#[test]
fn a_logged_grain_lost_on_the_target_with_damaged_log_bytes_ends_the_session() {
    let w = logged_and_lost(4);
    damage_log(&w);
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert_lost_t0(&e, w.id, "neither");
}

#[test]
fn a_logged_grain_whose_target_is_missing_keeps_the_log_until_the_resume_proves_it() {
    let w = logged_and_lost(2);
    // Without the target the grain cannot be proven: the session is suspended, and the log
    // keeps the grain's bytes through the checkpoints of several opens; first writes of other
    // sessions do not use the log meanwhile.
    for _ in 0..2 {
        let e = reopen(&w, &[&w.src]);
        assert_eq!(
            state(&e, w.id),
            (SessionState::Suspended, Some(ReasonCode::TargetUnavailable))
        );
        drop(e);
    }
    let other_src = Arc::new(MemVolume::with_data("src2", &pattern(8, SIZE as usize)));
    let other_tgt = Arc::new(MemVolume::new("tgt2", SIZE as usize));
    {
        let e = reopen(&w, &[&w.src]);
        let s2 = e.attach(other_src.clone());
        let t2 = e.attach(other_tgt.clone());
        e.establish(&SessionSpec {
            grain: timezero::GrainSize::new(GRAIN).unwrap(),
            mode: CopyMode::NoCopy,
            ..SessionSpec::whole(s2, t2)
        })
        .unwrap();
        e.write(s2, 0, &vec![0x33; (4 * GRAIN) as usize]).unwrap();
        let logged = e
            .table()
            .stats
            .logged
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            logged, 0,
            "the log is kept for the suspended session's grain"
        );
        drop(e);
    }
    // The target is back (its grain still lost): the resume takes the grain from the log.
    let mut r = MapResolver::default();
    r.add(w.src.clone() as Arc<dyn Volume>);
    let e = {
        let st: Arc<dyn TableStorage> = w.storage.clone();
        Engine::open(st, &r, EngineOptions::default()).unwrap()
    };
    let mut r = MapResolver::default();
    r.add(w.src.clone() as Arc<dyn Volume>);
    r.add(w.tgt.clone() as Arc<dyn Volume>);
    let d = e.resume(w.id, &r).unwrap();
    assert!(matches!(d.outcome, Outcome::Resumed), "{:?}", d.outcome);
    assert_eq!(&w.tgt.snapshot()[grain_range(2)], &w.t0[grain_range(2)]);
    assert_eq!(image(&e, w.id), w.t0);
    // Proven: the log is free again.
    e.write(w.s, 10 * GRAIN, &[5u8; 512]).unwrap();
    assert_eq!(
        e.table()
            .stats
            .logged
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(image(&e, w.id), w.t0);
}

#[test]
fn first_writes_past_the_log_size_retire_it_and_take_the_checked_path_when_it_is_full() {
    // A 64 KiB log holds 16 grains of 4 KiB; 48 first writes pass it three times over.
    let opts = timezero::TableOptions {
        log_bytes: 64 * 1024,
        ..small_table()
    };
    let (w, e) = session_in(11, opts);
    for g in 0..48 {
        e.write(w.s, g * GRAIN, &[g as u8; 4096]).unwrap();
    }
    let logged = e
        .table()
        .stats
        .logged
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(logged >= 16, "{logged} first writes went through the log");
    assert_eq!(image(&e, w.id), w.t0);
    drop(e);
    // Every grain still proves after an unclean end (lost target bytes come from the log
    // where it still holds them, from the target's durable bytes otherwise).
    let e = reopen(&w, &[&w.src, &w.tgt]);
    assert!(matches!(outcome(&e, w.id), Outcome::Resumed));
    assert_eq!(image(&e, w.id), w.t0);
}
