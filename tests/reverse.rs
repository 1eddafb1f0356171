//! Reverse restore: a session's source holds its image again, at once through the engine and
//! on the volume once the grains have moved back. Each test compares the source, as the
//! engine reads it and as the volume holds it, with the image byte for byte, and checks what
//! moved against what was written.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use common::{create, image, mem_storage, pattern, reopen, small_table};
use timezero::{
    CopyMode, Engine, Error, GrainCount, GrainIndex, MemVolume, SessionId, SessionSpec,
    SessionState, Volume, VolumeId,
};

const GRAIN: u64 = 4096;
const GRAINS: u64 = 256;
const SIZE: u64 = GRAIN * GRAINS;

fn spec(src: VolumeId, tgt: VolumeId, mode: CopyMode, incremental: bool) -> SessionSpec {
    SessionSpec {
        grain: timezero::GrainSize::new(GRAIN).unwrap(),
        mode,
        incremental,
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

/// The source as the engine's clients read it.
fn through_engine(e: &Engine, v: VolumeId) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    e.read(v, 0, &mut b).unwrap();
    b
}

/// The source volume's own bytes.
fn raw(v: &MemVolume) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    v.read_at(0, &mut b).unwrap();
    b
}

/// Writes after T0 on grains 3, 40..42 and 200 (four grains of 256).
fn scribble(e: &Engine, s: VolumeId) {
    e.write(s, 3 * GRAIN + 10, &[0xaa; 100]).unwrap();
    e.write(s, 41 * GRAIN - 50, &[0xbb; 100]).unwrap();
    e.write(s, 200 * GRAIN, &[0xcc; GRAIN as usize]).unwrap();
}

#[test]
fn reverse_of_an_active_session_serves_the_image_at_once_and_moves_only_written_grains() {
    let Setup { src, e, s, t, .. } = setup();
    let t0 = raw(&src);
    let id = e.establish(&spec(s, t, CopyMode::NoCopy, false)).unwrap();
    scribble(&e, s);
    let before = raw(&src);
    assert_ne!(before, t0);
    let r = e.reverse(id).unwrap();
    // Only the copied grains (each written one was copied first) move back.
    assert_eq!(r.grains_to_restore, GrainCount(4));
    assert_eq!(r.bytes_to_restore, 4 * GRAIN);
    // At once, through the engine: the image.
    assert_eq!(through_engine(&e, s), t0);
    // The volume itself is not yet restored.
    assert_eq!(raw(&src), before);
    let status = e.status().into_iter().find(|x| x.id == id).unwrap();
    assert_eq!(status.grains_to_restore, GrainCount(4));
    assert_eq!(e.restore_all(id).unwrap(), GrainCount(4));
    assert_eq!(raw(&src), t0);
    assert_eq!(through_engine(&e, s), t0);
    assert_eq!(image(&e, id), t0);
    // The session goes on: a new write copies nothing new, its grain was copied at T0's
    // first write, and the image stays T0.
    assert_eq!(e.session(id).unwrap().state(), SessionState::Active);
    e.write(s, 3 * GRAIN, &[1; 8]).unwrap();
    assert_eq!(image(&e, id), t0);
}

#[test]
fn a_write_to_a_grain_not_yet_moved_back_moves_it_first() {
    let Setup { src, e, s, t, .. } = setup();
    let t0 = raw(&src);
    let id = e.establish(&spec(s, t, CopyMode::NoCopy, false)).unwrap();
    scribble(&e, s);
    e.reverse(id).unwrap();
    // A partial write into grain 40 (still mapped): the rest of the grain must be the image.
    e.write(s, 40 * GRAIN + 8, &[0x55; 8]).unwrap();
    let mut want = t0.clone();
    want[(40 * GRAIN + 8) as usize..(40 * GRAIN + 16) as usize].fill(0x55);
    assert_eq!(through_engine(&e, s), want);
    assert_eq!(e.session(id).unwrap().restore_pending(), GrainCount(3));
    e.restore_all(id).unwrap();
    assert_eq!(raw(&src), want);
}

#[test]
fn other_sessions_on_the_source_keep_their_t0() {
    let opts = small_table();
    let storage = mem_storage(&opts);
    let e = create(&storage, opts);
    let src = Arc::new(MemVolume::with_data("src", &pattern(1, SIZE as usize)));
    let s = e.attach(src.clone());
    let t1 = e.attach(Arc::new(MemVolume::new("t1", SIZE as usize)));
    let t2 = e.attach(Arc::new(MemVolume::new("t2", SIZE as usize)));
    let first_t0 = raw(&src);
    let a = e.establish(&spec(s, t1, CopyMode::NoCopy, false)).unwrap();
    scribble(&e, s);
    // A second session with a later T0, which the reverse must not disturb.
    let second_t0 = raw(&src);
    let b = e.establish(&spec(s, t2, CopyMode::NoCopy, false)).unwrap();
    e.reverse(a).unwrap();
    assert_eq!(image(&e, b), second_t0);
    e.write(s, 200 * GRAIN + 5, &[9; 5]).unwrap();
    e.restore_all(a).unwrap();
    assert_eq!(image(&e, b), second_t0);
    let mut want = first_t0.clone();
    want[(200 * GRAIN + 5) as usize..(200 * GRAIN + 10) as usize].fill(9);
    assert_eq!(raw(&src), want);
    assert_eq!(image(&e, a), first_t0);
}

#[test]
fn what_would_disturb_a_reverse_is_refused_until_it_ends() {
    let opts = small_table();
    let storage = mem_storage(&opts);
    let e = create(&storage, opts);
    let src = Arc::new(MemVolume::with_data("src", &pattern(1, SIZE as usize)));
    let s = e.attach(src.clone());
    let t = e.attach(Arc::new(MemVolume::new("t", SIZE as usize)));
    let other = e.attach(Arc::new(MemVolume::new("o", SIZE as usize)));
    let id = e.establish(&spec(s, t, CopyMode::NoCopy, false)).unwrap();
    scribble(&e, s);
    e.reverse(id).unwrap();
    let refused = |r: Result<(), Error>| {
        assert!(
            matches!(r, Err(Error::Reversing { id: x, pending: 4, .. }) if x == id),
            "{r:?}"
        );
    };
    refused(e.write(t, 0, &[1; 16]));
    refused(e.write_image(id, 0, &[1; 16]));
    refused(e.withdraw(id));
    refused(e.reverse(id).map(|_| ()));
    refused(
        e.establish(&spec(s, other, CopyMode::NoCopy, false))
            .map(|_| ()),
    );
    refused(
        e.establish(&spec(other, t, CopyMode::NoCopy, false))
            .map(|_| ()),
    );
    e.restore_all(id).unwrap();
    e.write(t, 0, &[1; 16]).unwrap();
    e.withdraw(id).unwrap();
}

#[test]
fn reverse_of_a_completed_session_moves_every_grain_or_only_the_changed_ones() {
    for incremental in [false, true] {
        let Setup { src, e, s, t, .. } = setup();
        let t0 = raw(&src);
        let id = e
            .establish(&spec(s, t, CopyMode::Copy, incremental))
            .unwrap();
        e.copy_all(id, GrainCount(32)).unwrap();
        assert_eq!(e.session(id).unwrap().state(), SessionState::Completed);
        scribble(&e, s);
        let r = e.reverse(id).unwrap();
        let want = if incremental { 4 } else { GRAINS };
        assert_eq!(
            r.grains_to_restore,
            GrainCount(want),
            "incremental {incremental}"
        );
        assert_eq!(through_engine(&e, s), t0);
        assert_eq!(e.restore_all(id).unwrap(), GrainCount(want));
        assert_eq!(raw(&src), t0);
        assert_eq!(e.session(id).unwrap().state(), SessionState::Completed);
    }
}

#[test]
fn a_reverse_resumes_where_it_stopped_after_the_table_is_reopened() {
    let Setup {
        storage,
        src,
        tgt,
        e,
        s,
        t,
    } = setup();
    let t0 = raw(&src);
    let id = e.establish(&spec(s, t, CopyMode::Copy, false)).unwrap();
    // Half the copy, then writes to copied and uncopied grains.
    e.copy_batch(id, GrainIndex(0), GrainCount(128)).unwrap();
    scribble(&e, s);
    let r = e.reverse(id).unwrap();
    assert_eq!(r.grains_to_restore, GrainCount(128 + 1));
    // Move back the first batch only, then stop (the engine is dropped: nothing more moves).
    let (_, n) = e
        .restore_batch(id, GrainIndex(0), GrainCount(16))
        .unwrap()
        .unwrap();
    assert_eq!(n, GrainCount(16));
    drop(e);
    let e = reopen(&storage, &[src.clone(), tgt.clone()]);
    let s2 = e.session(id).unwrap();
    assert_eq!(s2.restore_pending(), GrainCount(128 + 1 - 16));
    assert_eq!(through_engine(&e, s), t0);
    assert_eq!(e.restore_all(id).unwrap(), GrainCount(128 + 1 - 16));
    assert_eq!(raw(&src), t0);
    // Reopened again: nothing left, the source is the image by itself.
    drop(e);
    let e = reopen(&storage, &[src.clone(), tgt]);
    assert_eq!(e.session(id).unwrap().restore_pending(), GrainCount(0));
    assert_eq!(raw(&src), t0);
    assert_eq!(image(&e, id), t0);
}

#[test]
fn the_copier_finishes_a_reverse_and_reports_it() {
    let Setup { src, e, s, t, .. } = setup();
    let t0 = raw(&src);
    let id = e.establish(&spec(s, t, CopyMode::NoCopy, false)).unwrap();
    scribble(&e, s);
    e.reverse(id).unwrap();
    let e = Arc::new(e);
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let c = timezero::Copier::start_with_events(
        e.clone(),
        timezero::CopierOptions::default(),
        move |ev| {
            if let timezero::CopierEvent::Reversed { session } = ev {
                sink.lock().push(*session);
            }
        },
    )
    .unwrap();
    let p = c.join().unwrap();
    assert_eq!(p.grains_to_restore, 0);
    assert_eq!(*seen.lock(), vec![id]);
    assert_eq!(raw(&src), t0);
    // A no-copy session is not copied by the copier: it stays active, not completed.
    assert_eq!(e.session(id).unwrap().state(), SessionState::Active);
}

#[test]
fn a_suspended_or_ended_session_cannot_be_reversed() {
    let Setup { e, s, t, .. } = setup();
    let id = e.establish(&spec(s, t, CopyMode::NoCopy, false)).unwrap();
    e.withdraw(id).unwrap();
    assert!(matches!(
        e.reverse(id),
        Err(Error::NotActive {
            state: SessionState::Withdrawn,
            ..
        })
    ));
    assert!(matches!(
        e.reverse(SessionId(99)),
        Err(Error::UnknownSession(_))
    ));
}
