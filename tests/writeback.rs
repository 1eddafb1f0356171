//! Write-back mode (`EngineOptions::write_back`): source writes that need copy-before-write are
//! held in memory until the volume's next flush. Each test checks what a reader through the
//! engine sees, what the volume itself holds, and that every session's image stays T0-exact,
//! including across a crash (the engine dropped without a flush and reopened on what the
//! devices hold).

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use common::{image, mem_storage, pattern, small_table};
use timezero::fault::internals::{set_pause_hook, PausePoint};
use timezero::{
    CopyMode, Engine, EngineOptions, GrainCount, GrainIndex, MapResolver, MemStorage, MemVolume,
    SessionSpec, SessionState, TableStorage, Volume, VolumeId,
};

const GRAIN: u64 = 4096;
const GRAINS: u64 = 256;
const SIZE: u64 = GRAIN * GRAINS;

fn options() -> EngineOptions {
    EngineOptions {
        table: small_table(),
        write_back: true,
        ..EngineOptions::default()
    }
}

struct Setup {
    storage: Arc<MemStorage>,
    src: Arc<MemVolume>,
    tgt: Arc<MemVolume>,
    e: Engine,
    s: VolumeId,
    t: VolumeId,
}

fn setup() -> Setup {
    let storage = mem_storage(&small_table());
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::create(st, options()).unwrap();
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

fn spec(s: VolumeId, t: VolumeId, mode: CopyMode) -> SessionSpec {
    SessionSpec {
        grain: timezero::GrainSize::new(GRAIN).unwrap(),
        mode,
        ..SessionSpec::whole(s, t)
    }
}

fn read(e: &Engine, v: VolumeId) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    e.read(v, 0, &mut b).unwrap();
    b
}

fn copied(e: &Engine, id: timezero::SessionId) -> u64 {
    e.status()
        .into_iter()
        .find(|x| x.id == id)
        .unwrap()
        .grains_copied
        .get()
}

/// Compare two buffers without printing them.
#[track_caller]
fn same(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("buffers differ first at byte {i}: {} != {}", a[i], b[i]);
    }
}

/// Apply `(offset, bytes)` writes to `base`.
fn apply(base: &[u8], writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut v = base.to_vec();
    for (o, d) in writes {
        v[*o as usize..*o as usize + d.len()].copy_from_slice(d);
    }
    v
}

#[test]
fn a_first_write_is_held_until_flush_and_reads_see_it_meanwhile() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::NoCopy)).unwrap();
    let w = vec![0x5a; 6000];
    e.write(s, 3 * GRAIN + 100, &w).unwrap();
    // Held: the volume still holds T0, the engine's reads see the write, the image is T0.
    same(&src.snapshot(), &t0);
    assert!(e.held_bytes(s).unwrap() >= w.len() as u64);
    let want = apply(&t0, &[(3 * GRAIN + 100, w.clone())]);
    same(&read(&e, s), &want);
    same(&image(&e, id), &t0);
    // The T0 bytes are already on the target, but no bit is committed yet.
    assert_eq!(copied(&e, id), 0);
    same(
        &tgt.snapshot()[3 * GRAIN as usize..5 * GRAIN as usize],
        &t0[3 * GRAIN as usize..5 * GRAIN as usize],
    );
    e.flush(s).unwrap();
    assert_eq!(e.held_bytes(s).unwrap(), 0);
    same(&src.snapshot(), &want);
    assert_eq!(copied(&e, id), 2);
    same(&image(&e, id), &t0);
    same(&read(&e, s), &want);
}

#[test]
fn overlapping_held_writes_land_in_the_order_they_were_acknowledged() {
    let Setup { src, e, s, t, .. } = setup();
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::NoCopy)).unwrap();
    let writes = vec![
        (10 * GRAIN, vec![1u8; 3 * GRAIN as usize]),
        (11 * GRAIN + 7, vec![2u8; 100]),
        (9 * GRAIN, vec![3u8; 2 * GRAIN as usize]),
        (11 * GRAIN + 50, vec![4u8; 10]),
        // An already-copied grain written again, after the others.
        (10 * GRAIN + 1, vec![5u8; 1]),
    ];
    for (o, d) in &writes {
        e.write(s, *o, d).unwrap();
    }
    let want = apply(&t0, &writes);
    same(&read(&e, s), &want);
    // Partial reads across held and unheld bytes.
    let mut b = vec![0u8; 5000];
    e.read(s, 11 * GRAIN - 2000, &mut b).unwrap();
    same(
        &b,
        &want[(11 * GRAIN - 2000) as usize..(11 * GRAIN + 3000) as usize],
    );
    e.flush(s).unwrap();
    same(&src.snapshot(), &want);
    same(&image(&e, id), &t0);
}

#[test]
fn a_crash_before_the_flush_loses_only_the_held_writes_and_never_the_t0_image() {
    let Setup {
        storage,
        src,
        tgt,
        e,
        s,
        t,
    } = setup();
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::NoCopy)).unwrap();
    e.write(s, 0, &[7u8; 8192]).unwrap();
    e.flush(s).unwrap();
    let flushed = src.snapshot();
    // A first write (held) and a write to an already-copied grain that overlaps nothing held
    // (it needs no copy, so it goes to the volume at once).
    e.write(s, 20 * GRAIN, &[8u8; 4096]).unwrap();
    e.write(s, 100, &[9u8; 10]).unwrap();
    let flushed = apply(&flushed, &[(100, vec![9u8; 10])]);
    // Crash: the engine goes away without a flush or a close (dropping it would drain); the
    // devices keep what reached them.
    std::mem::forget(e);
    same(&src.snapshot(), &flushed);
    let mut r = MapResolver::default();
    r.add(src.clone() as Arc<dyn Volume>);
    r.add(tgt.clone() as Arc<dyn Volume>);
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::open(st, &r, options()).unwrap();
    let status = e.status();
    assert_eq!(status[0].state, SessionState::Active);
    same(&image(&e, id), &t0);
    same(&read(&e, s), &flushed);
}

#[test]
fn the_background_copier_drains_held_writes_it_meets_and_never_copies_their_grains_again() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::Copy)).unwrap();
    let w = (5 * GRAIN, vec![0xee; 3 * GRAIN as usize]);
    e.write(s, w.0, &w.1).unwrap();
    same(&src.snapshot(), &t0);
    // The held write copied the three grains' T0 bytes; the copier copies the others and
    // drains the held write when it meets its grains (their bits are committed by it).
    e.copy_all(id, GrainCount(16)).unwrap();
    assert_eq!(copied(&e, id), GRAINS);
    same(&src.snapshot(), &apply(&t0, &[w]));
    same(&tgt.snapshot(), &t0);
    same(&image(&e, id), &t0);
    assert_eq!(e.held_bytes(s).unwrap(), 0);
}

#[test]
fn establish_takes_every_acknowledged_write_into_its_t0() {
    let Setup { src, e, s, t, .. } = setup();
    let t0 = src.snapshot();
    let first = e.establish(&spec(s, t, CopyMode::NoCopy)).unwrap();
    let w = (40 * GRAIN + 3, vec![0x11; 9000]);
    e.write(s, w.0, &w.1).unwrap();
    same(&src.snapshot(), &t0);
    // A second session from the same source: its T0 includes the held write.
    let other = Arc::new(MemVolume::new("other", SIZE as usize));
    let o = e.attach(other.clone());
    let second = e.establish(&spec(s, o, CopyMode::NoCopy)).unwrap();
    let want = apply(&t0, &[w]);
    same(&src.snapshot(), &want);
    same(&image(&e, first), &t0);
    same(&image(&e, second), &want);
    // Later writes are held again and change neither image.
    e.write(s, 40 * GRAIN, &[0x22; 100]).unwrap();
    same(&image(&e, first), &t0);
    same(&image(&e, second), &want);
    e.flush(s).unwrap();
    same(&image(&e, first), &t0);
    same(&image(&e, second), &want);
}

#[test]
fn refresh_takes_every_acknowledged_write_into_its_new_t0() {
    let Setup { src, e, s, t, .. } = setup();
    let t0 = src.snapshot();
    let id = e
        .establish(&SessionSpec {
            incremental: true,
            ..spec(s, t, CopyMode::Copy)
        })
        .unwrap();
    e.copy_all(id, GrainCount(16)).unwrap();
    same(&image(&e, id), &t0);
    let w = (7 * GRAIN, vec![0x33; 5000]);
    e.write(s, w.0, &w.1).unwrap();
    e.refresh(id).unwrap();
    let want = apply(&t0, &[w]);
    same(&src.snapshot(), &want);
    same(&image(&e, id), &want);
    e.copy_all(id, GrainCount(16)).unwrap();
    same(&image(&e, id), &want);
}

#[test]
fn reverse_restore_drains_first_and_the_source_ends_as_the_image() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::Copy)).unwrap();
    e.copy_all(id, GrainCount(16)).unwrap();
    e.write(s, 3 * GRAIN, &[0x44; 4096]).unwrap();
    e.reverse(id).unwrap();
    // A write during the reverse is not held (it goes to the volume at once).
    e.write(s, 9 * GRAIN, &[0x55; 512]).unwrap();
    assert_eq!(e.held_bytes(s).unwrap(), 0);
    e.restore_all(id).unwrap();
    e.flush(s).unwrap();
    let want = apply(&t0, &[(9 * GRAIN, vec![0x55; 512])]);
    same(&src.snapshot(), &want);
    same(&read(&e, s), &want);
    drop(tgt);
}

#[test]
fn writes_to_a_target_volume_are_never_held() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let _id = e.establish(&spec(s, t, CopyMode::Copy)).unwrap();
    e.write(t, 0, &[0x66; 4096]).unwrap();
    assert_eq!(e.held_bytes(t).unwrap(), 0);
    assert_eq!(tgt.snapshot()[..4096], [0x66; 4096]);
    drop(src);
}

#[test]
fn held_writes_drain_on_their_own_past_the_byte_bound() {
    let size = 2 * timezero::limits::HELD_BYTES_MAX as u64;
    let storage = mem_storage(&small_table());
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::create(st, options()).unwrap();
    let src = Arc::new(MemVolume::with_data("big", &pattern(2, size as usize)));
    let tgt = Arc::new(MemVolume::new("bigt", size as usize));
    let s = e.attach(src.clone());
    let t = e.attach(tgt.clone());
    let t0 = src.snapshot();
    let id = e
        .establish(&SessionSpec {
            grain: timezero::GrainSize::new(1 << 20).unwrap(),
            mode: CopyMode::NoCopy,
            ..SessionSpec::whole(s, t)
        })
        .unwrap();
    let chunk = vec![0x77u8; 1 << 20];
    let mut off = 0;
    while off < size {
        e.write(s, off, &chunk).unwrap();
        assert!(e.held_bytes(s).unwrap() <= timezero::limits::HELD_BYTES_MAX as u64);
        off += chunk.len() as u64;
    }
    // The first bound's worth reached the volume without a flush.
    same(&src.snapshot()[..1 << 20], &chunk);
    e.flush(s).unwrap();
    assert!(src.snapshot().iter().all(|b| *b == 0x77));
    let s0 = e.session(id).unwrap();
    let mut b = vec![0u8; s0.image_len() as usize];
    e.read_image(id, 0, &mut b).unwrap();
    assert!(b == t0);
}

/// A source whose flush failed is latched: a first write to it is refused at once, as in the
/// synchronous path, instead of being held, acknowledged and read back although no drain could
/// ever land it (a refresh or establish whose commit failed fences its volumes the same way).
#[test]
fn a_failed_volume_refuses_a_write_instead_of_holding_it() {
    use timezero::fault::{FaultPlan, FaultyVolume, Trigger};
    let storage = mem_storage(&small_table());
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::create(st, options()).unwrap();
    let src = Arc::new(FaultyVolume::new(MemVolume::with_data(
        "src",
        &pattern(3, SIZE as usize),
    )));
    let tgt = Arc::new(MemVolume::new("tgt", SIZE as usize));
    let s = e.attach(src.clone());
    let t = e.attach(tgt.clone());
    let id = e.establish(&spec(s, t, CopyMode::NoCopy)).unwrap();
    let t0 = image(&e, id);
    e.write(s, 0, &[1u8; 4096]).unwrap();
    src.arm(FaultPlan::new().fail_flush(Trigger::once(src.counts().flushes)));
    assert!(e.flush(s).is_err());
    // The volume is latched now: the next first write fails and nothing is held.
    assert!(e.write(s, 10 * GRAIN, &[2u8; 4096]).is_err());
    assert_eq!(e.held_bytes(s).unwrap(), 0);
    same(&image(&e, id), &t0);
}

/// Run `op` on a thread named `name`; the first time that thread reaches `point`, run `between`
/// on this thread, then let it go on. When the thread ends without reaching the point, run
/// `between` after it. Returns what `op` returned and whether the thread paused.
fn interleave_or_after<T: Send + 'static>(
    name: &'static str,
    point: PausePoint,
    op: impl FnOnce() -> T + Send + 'static,
    between: impl FnOnce(),
) -> (T, bool) {
    // The hook is process-wide: one interleaving at a time among this binary's tests.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // true: the thread is at the point; false: it ended.
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let looked_tx = std::sync::Mutex::new(Some(tx.clone()));
    let go_rx = std::sync::Mutex::new(go_rx);
    set_pause_hook(Some(Arc::new(move |p| {
        if p != point || std::thread::current().name() != Some(name) {
            return;
        }
        if let Some(tx) = looked_tx.lock().unwrap().take() {
            tx.send(true).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
        }
    })));
    let t = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let r = op();
            tx.send(false).unwrap();
            r
        })
        .unwrap();
    let paused = rx.recv().unwrap();
    if paused {
        between();
        go_tx.send(()).unwrap();
        let r = t.join().unwrap();
        set_pause_hook(None);
        return (r, true);
    }
    let r = t.join().unwrap();
    set_pause_hook(None);
    between();
    (r, false)
}

/// [`interleave_or_after`] for a thread that must reach the point.
fn interleave<T: Send + 'static>(
    name: &'static str,
    point: PausePoint,
    op: impl FnOnce() -> T + Send + 'static,
    between: impl FnOnce(),
) -> T {
    let (r, paused) = interleave_or_after(name, point, op, between);
    assert!(paused, "the thread never reached the pause point");
    r
}

#[test]
fn a_copier_that_looks_while_a_drain_lands_the_write_never_copies_the_new_bytes() {
    let Setup {
        src, tgt, e, s, t, ..
    } = setup();
    let e = Arc::new(e);
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::Copy)).unwrap();
    let w = (5 * GRAIN, vec![0xc3; GRAIN as usize]);
    e.write(s, w.0, &w.1).unwrap();
    // The copier holds grain 5 and has looked at it; meanwhile a flush drains the held write
    // (its bit is committed, then the new bytes land on the source). Whatever the copier then
    // decides, the target's grain 5 keeps its T0 bytes.
    let ec = Arc::clone(&e);
    let copied_now = interleave(
        "copier-under-test",
        PausePoint::Copier,
        move || {
            let (_, hold) = ec
                .copy_data(id, GrainIndex(5), GrainCount(1))
                .unwrap()
                .unwrap();
            let n = hold.as_ref().map_or(0, |h| h.count().get());
            if let Some(h) = hold {
                ec.commit_copied(id, vec![h]).unwrap();
            }
            n
        },
        || e.flush(s).unwrap(),
    );
    assert_eq!(copied_now, 0, "grain 5 was copied by its write, not again");
    same(&src.snapshot(), &apply(&t0, &[w]));
    same(&tgt.snapshot(), &{
        let mut want = vec![0u8; SIZE as usize];
        want[5 * GRAIN as usize..6 * GRAIN as usize]
            .copy_from_slice(&t0[5 * GRAIN as usize..6 * GRAIN as usize]);
        want
    });
    same(&image(&e, id), &t0);
}

#[test]
fn a_second_write_that_looks_while_a_drain_lands_the_first_never_copies_its_bytes() {
    let Setup { src, e, s, t, .. } = setup();
    let e = Arc::new(e);
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::NoCopy)).unwrap();
    let w1 = (5 * GRAIN, vec![0xa1; GRAIN as usize]);
    let w2 = (5 * GRAIN + 512, vec![0xb2; 512]);
    e.write(s, w1.0, &w1.1).unwrap();
    // The second write to grain 5 holds it and has looked at it; meanwhile a flush drains the
    // first (bit committed, new bytes on the source). The second must not take those bytes for
    // the grain's T0 bytes.
    let ec = Arc::clone(&e);
    let w2c = w2.clone();
    interleave(
        "writer-under-test",
        PausePoint::HeldWrite,
        move || ec.write(s, w2c.0, &w2c.1).unwrap(),
        || e.flush(s).unwrap(),
    );
    e.flush(s).unwrap();
    same(&src.snapshot(), &apply(&t0, &[w1, w2]));
    same(&image(&e, id), &t0);
}

#[test]
fn an_image_write_that_looks_while_a_drain_lands_a_source_write_keeps_t0_around_it() {
    let Setup { src, e, s, t, .. } = setup();
    let e = Arc::new(e);
    let t0 = src.snapshot();
    let id = e.establish(&spec(s, t, CopyMode::NoCopy)).unwrap();
    let w1 = (5 * GRAIN, vec![0xa1; GRAIN as usize]);
    e.write(s, w1.0, &w1.1).unwrap();
    // A write to the image's grain 5 (target-write semantics: the rest of the grain keeps its
    // T0 bytes) holds the grain and has looked at it; meanwhile a flush drains the held source
    // write (bit committed, new bytes on the source).
    let tw = (5 * GRAIN + 1024, vec![0x7e; 512]);
    let ec = Arc::clone(&e);
    let twc = tw.clone();
    // The writer finds grain 5 pending on the source and drains it first, so that its look at
    // the bit comes after the drain (it then needs no copy, and never pauses); on a build that
    // did not, the drain ran in the pause and the new source bytes filled the rest of the grain.
    let ((), _paused) = interleave_or_after(
        "image-writer-under-test",
        PausePoint::SyncWrite,
        move || ec.write_image(id, twc.0, &twc.1).unwrap(),
        || e.flush(s).unwrap(),
    );
    same(&src.snapshot(), &apply(&t0, &[w1]));
    same(&image(&e, id), &apply(&t0, &[tw]));
}
