//! Stress test over real files.
//!
//! Goal: several writer threads and the background copier racing on one session never change
//! its image. Method: 4 writers issue random partial-grain writes through the engine while a
//! 2-thread copier runs and a reader checks random image ranges; afterwards the exported image
//! and the completed target both equal the T0 reference.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use timezero::GrainSize;
use timezero::{Copier, CopierOptions};
use timezero::{Engine, EngineOptions, SessionSpec};
use timezero::{FileVolume, FileVolumeOptions};

/// A table, a source file holding `data` and an empty target file of the same size, attached.
fn file_engine(
    data: &[u8],
) -> (
    tempfile::TempDir,
    Arc<Engine>,
    timezero::VolumeId,
    timezero::VolumeId,
) {
    file_engine_with(data, EngineOptions::default())
}

/// As [`file_engine`], with these engine options.
fn file_engine_with(
    data: &[u8],
    options: EngineOptions,
) -> (
    tempfile::TempDir,
    Arc<Engine>,
    timezero::VolumeId,
    timezero::VolumeId,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("src"), data).unwrap();
    FileVolume::create(
        dir.path().join("tgt"),
        data.len() as u64,
        &FileVolumeOptions::default(),
    )
    .unwrap();
    let e = Arc::new(Engine::create_path(&dir.path().join("table"), options).unwrap());
    let src = e.attach_path(&dir.path().join("src")).unwrap();
    let tgt = e.attach_path(&dir.path().join("tgt")).unwrap();
    (dir, e, src, tgt)
}

#[test]
fn writers_copier_and_readers_on_one_session() {
    let size = 16usize << 20;
    let t0 = common::pattern(42, size);
    let (_dir, e, src, tgt) = file_engine(&t0);
    let id = e
        .establish(&SessionSpec {
            grain: GrainSize::new(16384).unwrap(),
            ..SessionSpec::whole(src, tgt)
        })
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let e = e.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 3000 {
                let x = common::pattern(t * 100_000 + n, 16);
                let off = u64::from_le_bytes(x[..8].try_into().unwrap()) % (size as u64 - 40000);
                let len = 1 + (u64::from(x[8]) * 150) as usize;
                e.write(src, off, &common::pattern(n, len)).unwrap();
                n += 1;
            }
        }));
    }
    {
        let e = e.clone();
        let t0 = t0.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let x = common::pattern(n + 7, 16);
                let off = (u64::from_le_bytes(x[..8].try_into().unwrap()) % (size as u64 - 100_000))
                    as usize;
                let mut b = vec![0u8; 70_000];
                e.read_image(id, off as u64, &mut b).unwrap();
                assert!(
                    b[..] == t0[off..off + b.len()],
                    "image read at {off} differs from T0"
                );
                n += 1;
            }
        }));
    }
    {
        // Small reads through an image opened once: many lock-free reads racing the writers'
        // copy-before-write on the same grains.
        let e = e.clone();
        let t0 = t0.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let img = e.image(id).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let x = common::pattern(n + 11, 16);
                let off = (u64::from_le_bytes(x[..8].try_into().unwrap()) % (size as u64 - 8192))
                    as usize;
                let mut b = vec![0u8; 1 + usize::from(x[8]) * 16];
                img.read_at(off as u64, &mut b).unwrap();
                assert!(
                    b[..] == t0[off..off + b.len()],
                    "image handle read at {off} differs from T0"
                );
                n += 1;
            }
        }));
    }
    let c = Copier::start(
        e.clone(),
        CopierOptions {
            rate_bytes_per_s: Some(16 << 20),
            exit_when_done: true,
            ..CopierOptions::default()
        },
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let p = c.progress();
    assert!(p.grains_copied > 0);
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(common::image(&e, id), t0, "image differs after the race");
    c.stop().unwrap();
    e.copy_all(id, timezero::GrainCount(64)).unwrap();
    let mut tb = vec![0u8; size];
    e.read(tgt, 0, &mut tb).unwrap();
    assert!(tb == t0, "completed target differs from T0");
}

/// Pause stops the copier between batches, resume continues it, and the rate limit holds the
/// copier near its budget (loosely: a shared machine); progress counts grains and bytes.
#[test]
fn copier_pause_resume_rate_and_progress() {
    let size = 32usize << 20;
    let (_dir, e, src, tgt) = file_engine(&common::pattern(5, size));
    let id = e.establish(&SessionSpec::whole(src, tgt)).unwrap();
    let rate = 4u64 << 20;
    let c = Copier::start(
        e.clone(),
        CopierOptions {
            rate_bytes_per_s: Some(rate),
            ..CopierOptions::default()
        },
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.pause();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let paused_at = c.progress();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let still = c.progress();
    assert_eq!(
        paused_at.bytes_copied, still.bytes_copied,
        "copier moved data while paused"
    );
    assert!(
        paused_at.bytes_copied > 0,
        "copier made no progress before the pause"
    );
    // About 0.6 s at 4 MiB/s before the pause took effect: ~2.4 MiB. Unthrottled, this machine
    // copies the whole 32 MiB in well under that time; allow 2.5x slack for batches in flight.
    assert!(
        paused_at.bytes_copied <= 6 << 20,
        "rate limit not honoured: {}",
        paused_at.bytes_copied
    );
    assert_eq!(still.grains_total, 512);
    assert!(!still.done);
    c.resume();
    let p = c.join().unwrap();
    assert!(p.done);
    assert_eq!(p.grains_copied, 512);
    assert_eq!(
        e.session(id).unwrap().state(),
        timezero::fault::internals::format::SessionState::Completed
    );
}

/// Copier workers copy disjoint spans, each sharing one target flush and one table commit.
/// 64 MiB at 16 MiB per commit is 4 spans, whatever the number of workers and however they are
/// scheduled: exactly 4 copier commits recording exactly 64 runs of 1 MiB through memory, or
/// 4 runs of 16 MiB (one per span) when the kernel copies file to file. (Workers that copied
/// inside each other's spans, or went back to the start while spans were in flight, collided
/// on held grains and committed fragments: more commits and shorter runs.)
#[test]
fn copier_workers_share_durability_points() {
    copier_workers_share_durability_points_with(false, 64);
    copier_workers_share_durability_points_with(true, 4);
}

fn copier_workers_share_durability_points_with(offload: bool, runs: u64) {
    let size = 64usize << 20;
    let data = common::pattern(9, size);
    let (dir, e, src, tgt) = file_engine_with(
        &data,
        EngineOptions {
            copy_offload: offload,
            ..EngineOptions::default()
        },
    );
    let id = e.establish(&SessionSpec::whole(src, tgt)).unwrap();
    let p = Copier::start(
        e.clone(),
        CopierOptions {
            threads: 4,
            ..CopierOptions::default()
        },
    )
    .unwrap()
    .join()
    .unwrap();
    assert!(p.done);
    assert_eq!(p.grains_copied, (size as u64) >> 16);
    assert_eq!(p.commits, 4, "copier commits for 4 spans of 16 MiB");
    assert_eq!(p.runs, runs, "copied runs (offload {offload})");
    let by_kernel = if offload { size as u64 } else { 0 };
    assert_eq!(p.bytes_offloaded, by_kernel);
    assert_eq!(
        e.session(id).unwrap().state(),
        timezero::fault::internals::format::SessionState::Completed
    );
    drop(e);
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), data);
}

/// With one worker the table's durability points are deterministic: one per 16 MiB span and
/// one for the completion record.
#[test]
fn one_copier_worker_syncs_once_per_span() {
    let size = 64usize << 20;
    let data = common::pattern(10, size);
    let (_dir, e, src, tgt) = file_engine(&data);
    let id = e.establish(&SessionSpec::whole(src, tgt)).unwrap();
    let before = e.table().stats.syncs.load(Ordering::Relaxed);
    let p = Copier::start(
        e.clone(),
        CopierOptions {
            threads: 1,
            ..CopierOptions::default()
        },
    )
    .unwrap()
    .join()
    .unwrap();
    assert_eq!(p.commits, 4);
    let syncs = e.table().stats.syncs.load(Ordering::Relaxed) - before;
    assert_eq!(syncs, 5, "4 spans and the completion record");
    assert_eq!(
        e.session(id).unwrap().state(),
        timezero::fault::internals::format::SessionState::Completed
    );
}
