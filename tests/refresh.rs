//! Incremental sessions and refresh: a copy session that records which grains change after
//! T0, on its source and on its target, and a refresh that takes a new T0 re-copying only
//! those grains. Each test checks the image and the target byte for byte against the source
//! as it was at the refresh, and what the copy moved against the grains that were written.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use common::{create, image, mem_storage, pattern, reopen, small_table};
use timezero::{
    CopyMode, Engine, Error, GrainCount, MemVolume, Outcome, SessionId, SessionSpec, SessionState,
    VolumeId,
};

const GRAIN: u64 = 4096;
const GRAINS: u64 = 256;
const SIZE: u64 = GRAIN * GRAINS;

fn incremental(src: VolumeId, tgt: VolumeId) -> SessionSpec {
    SessionSpec {
        grain: timezero::GrainSize::new(GRAIN).unwrap(),
        incremental: true,
        ..SessionSpec::whole(src, tgt)
    }
}

struct Setup {
    storage: Arc<timezero::MemStorage>,
    src: Arc<MemVolume>,
    tgt: Arc<MemVolume>,
    e: Engine,
    s: VolumeId,
    t: VolumeId,
}

fn setup() -> Setup {
    let opts = small_table();
    let storage = mem_storage(&opts);
    let e = create(&storage, opts);
    let src = Arc::new(MemVolume::with_data("src", &pattern(1, SIZE as usize)));
    let tgt = Arc::new(MemVolume::new("tgt", SIZE as usize));
    let s = e.attach(src.clone());
    let t = e.attach(tgt.clone());
    Setup {
        storage,
        src,
        tgt,
        e,
        s,
        t,
    }
}

fn status(e: &Engine, id: SessionId) -> timezero::SessionStatus {
    e.status().into_iter().find(|x| x.id == id).unwrap()
}

/// Copy to completion; the grains the copy moved.
fn copy(e: &Engine, id: SessionId) -> u64 {
    let n = e.copy_all(id, GrainCount(16)).unwrap().get();
    assert_eq!(status(e, id).state, SessionState::Completed);
    n
}

#[test]
fn refresh_copies_only_the_grains_written_since_t0() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let id = e.establish(&incremental(s, t)).unwrap();
    assert_eq!(copy(&e, id), GRAINS);
    // Three grains written (one write spans two of them), after the copy completed.
    e.write(s, 5 * GRAIN + 100, &[0xaa; 10]).unwrap();
    e.write(s, 40 * GRAIN - 8, &[0xbb; 16]).unwrap();
    e.write(s, 40 * GRAIN + 8, &[0xcc; 16]).unwrap();
    assert_eq!(status(&e, id).grains_changed, GrainCount(3));
    // The completed target still holds the first T0.
    assert_eq!(&tgt.snapshot()[..], &pattern(1, SIZE as usize)[..]);

    let at_refresh = src.snapshot();
    let r = e.refresh(id).unwrap();
    assert_eq!(r.grains_to_copy, GrainCount(3));
    assert_eq!(r.bytes_to_copy, 3 * GRAIN);
    let st = status(&e, id);
    assert_eq!(st.state, SessionState::Active);
    assert_eq!(st.grains_changed, GrainCount(0));
    assert_eq!(st.created_unix_ms, r.t0_unix_ms);
    // The image is the new T0 at once, and stays it while the source changes again.
    assert_eq!(image(&e, id), at_refresh);
    e.write(s, 5 * GRAIN, &[0xdd; 4096]).unwrap();
    e.write(s, 100 * GRAIN, &[0xee; 4096]).unwrap();
    assert_eq!(image(&e, id), at_refresh);
    // The copy moves what changed and was not copied by those writes first: grains 39 and 40
    // (grain 5 was copied before its write).
    assert_eq!(copy(&e, id), 2);
    assert_eq!(&tgt.snapshot()[..], &at_refresh[..]);
    // The writes after the refresh are the next refresh's changes.
    assert_eq!(status(&e, id).grains_changed, GrainCount(2));
}

#[test]
fn target_writes_through_the_engine_are_changes_too() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let id = e.establish(&incremental(s, t)).unwrap();
    // While active, through the image; once completed, to the target volume.
    e.write_image(id, 7 * GRAIN, &[0x11; 4096]).unwrap();
    copy(&e, id);
    e.write(t, 9 * GRAIN + 1, &[0x22; 3]).unwrap();
    assert_eq!(status(&e, id).grains_changed, GrainCount(2));
    let r = e.refresh(id).unwrap();
    assert_eq!(r.grains_to_copy, GrainCount(2));
    assert_eq!(copy(&e, id), 2);
    assert_eq!(tgt.snapshot(), src.snapshot());
}

#[test]
fn refresh_during_the_copy_gives_the_new_t0() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let id = e.establish(&incremental(s, t)).unwrap();
    // Copy half, then write both halves: copied grains change, uncopied ones are copied first.
    for g in 0..GRAINS / 2 {
        e.copy_batch(id, timezero::GrainIndex(g), GrainCount(1))
            .unwrap();
    }
    e.write(s, 10 * GRAIN, &[1; 4096]).unwrap();
    e.write(s, 200 * GRAIN, &[2; 4096]).unwrap();
    assert_eq!(status(&e, id).grains_changed, GrainCount(2));
    let at_refresh = src.snapshot();
    let r = e.refresh(id).unwrap();
    // Uncopied: the other half (grain 200 too: its write copied its old bytes, so it changed),
    // plus grain 10 again.
    assert_eq!(r.grains_to_copy, GrainCount(GRAINS / 2 + 1));
    assert_eq!(image(&e, id), at_refresh);
    copy(&e, id);
    assert_eq!(tgt.snapshot(), at_refresh);
}

#[test]
fn the_change_map_survives_a_reopen_and_refresh_is_then_exact() {
    let Setup {
        storage,
        src,
        tgt,
        e,
        s,
        t,
    } = setup();
    let id = e.establish(&incremental(s, t)).unwrap();
    copy(&e, id);
    for k in 0..5u64 {
        e.write(s, (k * 31 + 3) * GRAIN, &pattern(k, 512)).unwrap();
    }
    // Enough other commits to make the table checkpoint (the map is then in a checkpoint, the
    // rest in the journal).
    let other_src = Arc::new(MemVolume::with_data("o", &pattern(9, 64 << 10)));
    let other_tgt = Arc::new(MemVolume::new("ot", 64 << 10));
    let (os, ot) = (e.attach(other_src.clone()), e.attach(other_tgt.clone()));
    for _ in 0..40 {
        let x = e
            .establish(&SessionSpec {
                mode: CopyMode::NoCopy,
                ..SessionSpec::whole(os, ot)
            })
            .unwrap();
        e.withdraw(x).unwrap();
    }
    e.write(s, 250 * GRAIN, &[9; 100]).unwrap();
    drop(e); // no close: as after a crash of the process
    let e = reopen(&storage, &[src.clone(), tgt.clone(), other_src, other_tgt]);
    let st = status(&e, id);
    assert_eq!(st.state, SessionState::Completed);
    assert!(st.incremental);
    assert_eq!(st.grains_changed, GrainCount(6));
    // Still recording after the reopen.
    let s = timezero::Volume::info(src.as_ref()).id;
    e.write(s, 251 * GRAIN, &[8; 100]).unwrap();
    let at_refresh = src.snapshot();
    assert_eq!(e.refresh(id).unwrap().grains_to_copy, GrainCount(7));
    assert_eq!(copy(&e, id), 7);
    assert_eq!(tgt.snapshot(), at_refresh);
}

#[test]
fn a_replaced_source_marks_every_grain_changed() {
    let Setup {
        storage,
        src: _,
        tgt,
        e,
        s,
        t,
    } = setup();
    let id = e.establish(&incremental(s, t)).unwrap();
    copy(&e, id);
    drop(e);
    // Another volume under the source's name: writes may have been missed.
    let other = Arc::new(MemVolume::with_data("src", &pattern(2, SIZE as usize)));
    other.set_id(VolumeId::from_parts(7, 7));
    let e = reopen(&storage, &[other.clone(), tgt.clone()]);
    let d = e.decisions.iter().find(|d| d.session == id).unwrap();
    assert!(
        matches!(d.outcome, Outcome::ChangesUnknown(_)),
        "{:?}",
        d.outcome
    );
    let st = status(&e, id);
    assert_eq!(st.state, SessionState::Completed);
    assert_eq!(st.grains_changed, GrainCount(GRAINS));
}

#[test]
fn refresh_is_refused_where_it_cannot_be_exact() {
    let Setup { e, s, t, src, .. } = setup();
    // Not incremental.
    let plain = e.establish(&SessionSpec::whole(s, t)).unwrap();
    assert!(matches!(e.refresh(plain), Err(Error::NotIncremental(x)) if x == plain));
    e.withdraw(plain).unwrap();
    // Incremental needs copy mode.
    let err = e
        .establish(&SessionSpec {
            mode: CopyMode::NoCopy,
            ..incremental(s, t)
        })
        .unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    // Withdrawn: no longer recording, not refreshable, and then forgettable.
    let id = e.establish(&incremental(s, t)).unwrap();
    copy(&e, id);
    assert!(
        matches!(e.forget(id), Err(Error::NotEnded { .. })),
        "a recording session is not forgotten"
    );
    assert!(!e.forget_ended().unwrap().contains(&id));
    e.withdraw(id).unwrap();
    assert!(matches!(
        e.refresh(id),
        Err(Error::NotActive {
            state: SessionState::Withdrawn,
            ..
        })
    ));
    // After the withdraw, writes mark nothing (the session no longer records).
    e.write(s, 0, &[1; 10]).unwrap();
    assert_eq!(status(&e, id).grains_changed, GrainCount(0));
    e.forget(id).unwrap();
    drop(src);
}

#[test]
fn a_completed_incremental_session_keeps_its_target() {
    let Setup { e, s, t, .. } = setup();
    let id = e.establish(&incremental(s, t)).unwrap();
    copy(&e, id);
    let other = Arc::new(MemVolume::with_data("x", &pattern(3, SIZE as usize)));
    let x = e.attach(other);
    let err = e.establish(&SessionSpec::whole(x, t)).unwrap_err();
    assert!(
        matches!(err, Error::TargetInUse { other, .. } if other == id),
        "{err:?}"
    );
}

#[test]
fn a_group_refreshes_at_one_t0_and_its_members_only_together() {
    let opts = small_table();
    let storage = mem_storage(&opts);
    let e = create(&storage, opts);
    let vols: Vec<Arc<MemVolume>> = (0..4u64)
        .map(|i| {
            if i % 2 == 0 {
                Arc::new(MemVolume::with_data(
                    &format!("v{i}"),
                    &pattern(i, SIZE as usize),
                ))
            } else {
                Arc::new(MemVolume::new(&format!("v{i}"), SIZE as usize))
            }
        })
        .collect();
    let ids: Vec<VolumeId> = vols.iter().map(|v| e.attach(v.clone())).collect();
    let members = e
        .establish_group(
            "g",
            &[incremental(ids[0], ids[1]), incremental(ids[2], ids[3])],
        )
        .unwrap();
    for m in &members {
        copy(&e, *m);
    }
    e.write(ids[0], 0, &[1; 10]).unwrap();
    e.write(ids[2], 3 * GRAIN, &[2; 10]).unwrap();
    e.write(ids[2], 4 * GRAIN, &[3; 10]).unwrap();
    assert!(matches!(e.refresh(members[0]), Err(Error::Invalid { .. })));
    let done = e.refresh_group("g").unwrap();
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].t0_unix_ms, done[1].t0_unix_ms);
    let moved: Vec<u64> = done.iter().map(|r| r.grains_to_copy.get()).collect();
    assert_eq!(moved, vec![1, 2]);
    for m in &members {
        copy(&e, *m);
    }
    assert_eq!(vols[1].snapshot(), vols[0].snapshot());
    assert_eq!(vols[3].snapshot(), vols[2].snapshot());
    assert!(matches!(
        e.refresh_group("nope"),
        Err(Error::UnknownGroup(_))
    ));
}

/// Random writes to the source and the target around copies and refreshes: after every step
/// the image is the source as it was at the last T0, and after a refresh and a full copy the
/// target equals the source.
#[test]
fn random_writes_copies_and_refreshes_keep_each_t0() {
    use rand::{Rng, SeedableRng};
    for seed in 0..40u64 {
        let Setup {
            src, tgt, e, s, t, ..
        } = setup();
        let mut r = rand::rngs::SmallRng::seed_from_u64(seed);
        let id = e.establish(&incremental(s, t)).unwrap();
        let mut t0 = src.snapshot();
        for step in 0..60 {
            match r.random_range(0..10) {
                0..=3 => {
                    let len = r.random_range(1..=24u64) * 512;
                    let off = r.random_range(0..=(SIZE - len) / 512) * 512;
                    e.write(s, off, &pattern(r.random(), len as usize)).unwrap();
                }
                4 => {
                    let len = r.random_range(1..=24u64) * 512;
                    let off = r.random_range(0..=(SIZE - len) / 512) * 512;
                    let data = pattern(r.random(), len as usize);
                    if status(&e, id).state == SessionState::Active {
                        e.write_image(id, off, &data).unwrap();
                    } else {
                        e.write(t, off, &data).unwrap();
                    }
                    t0[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                5..=6 => {
                    let from = r.random_range(0..GRAINS);
                    e.copy_batch(id, timezero::GrainIndex(from), GrainCount(4))
                        .unwrap();
                }
                7 => {
                    copy(&e, id);
                }
                _ => {
                    e.refresh(id).unwrap();
                    t0 = src.snapshot();
                }
            }
            assert_eq!(image(&e, id), t0, "seed {seed} step {step}");
        }
        e.refresh(id).unwrap();
        copy(&e, id);
        assert_eq!(tgt.snapshot(), src.snapshot(), "seed {seed}");
    }
}

/// A target that counts its flushes.
#[derive(Debug)]
struct CountingFlushes(Arc<MemVolume>, std::sync::atomic::AtomicU64);

impl timezero::Volume for CountingFlushes {
    fn info(&self) -> timezero::VolumeInfo {
        self.0.info()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> timezero::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> timezero::Result<()> {
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> timezero::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.flush()
    }
}

#[test]
fn scattered_changed_grains_share_one_flush_and_commit() {
    let opts = small_table();
    let storage = mem_storage(&opts);
    let e = create(&storage, opts);
    let src = Arc::new(MemVolume::with_data("src", &pattern(1, SIZE as usize)));
    let tgt = Arc::new(CountingFlushes(
        Arc::new(MemVolume::new("tgt", SIZE as usize)),
        std::sync::atomic::AtomicU64::new(0),
    ));
    let s = e.attach(src.clone());
    let t = e.attach(tgt.clone());
    let id = e.establish(&incremental(s, t)).unwrap();
    assert_eq!(
        e.copy_all(id, GrainCount(GRAINS)).unwrap(),
        GrainCount(GRAINS)
    );
    // Ten grains far apart change, then a refresh: one batch copies all ten.
    let changed: Vec<u64> = (0..10).map(|k| k * 25 + 3).collect();
    for g in &changed {
        e.write(s, g * GRAIN + 100, &[9; 8]).unwrap();
    }
    let at_refresh = src.snapshot();
    assert_eq!(e.refresh(id).unwrap().grains_to_copy, GrainCount(10));
    let before = tgt.1.load(std::sync::atomic::Ordering::Relaxed);
    let (next, n) = e
        .copy_batch(id, timezero::GrainIndex::ZERO, GrainCount(GRAINS))
        .unwrap()
        .unwrap();
    assert_eq!(n, GrainCount(10));
    assert_eq!(next.get(), changed[9] + 1);
    assert_eq!(tgt.1.load(std::sync::atomic::Ordering::Relaxed) - before, 1);
    assert_eq!(tgt.0.snapshot(), at_refresh);
    // A smaller batch stops at its count and goes on from there.
    for g in &changed {
        e.write(s, g * GRAIN, &[7; 8]).unwrap();
    }
    e.refresh(id).unwrap();
    let (next, n) = e
        .copy_batch(id, timezero::GrainIndex::ZERO, GrainCount(4))
        .unwrap()
        .unwrap();
    assert_eq!((next.get(), n), (changed[3] + 1, GrainCount(4)));
    assert_eq!(copy(&e, id), 6);
    assert_eq!(image(&e, id), src.snapshot());
}
