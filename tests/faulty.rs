//! Faults injected into real files reach the engine: `FaultyVolume` and `CheckedVolume` over
//! tempfile `FileVolume`s attached to an `Engine`.
//!
//! Goal: a failed or torn target write during copy-before-write fails the user's source write
//! with the I/O error, leaves the source at its T0 bytes and the image T0-exact (also after
//! the table is reopened); a crash that loses the unflushed writes of source and targets
//! leaves every image T0-exact after reopening. Method: single-threaded, counters and bytes
//! asserted exactly.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use timezero::fault::{CrashMode, FaultPlan, FaultyVolume, Trigger};
use timezero::limits::DATA_IO_RETRIES_MAX;
use timezero::Error;
use timezero::{CheckedVolume, FileVolume, FileVolumeOptions, Volume};
use timezero::{Engine, EngineOptions, Outcome, SessionSpec};
use timezero::{SessionId, VolumeId};

const SIZE: usize = 1 << 20;
const GRAIN: usize = 64 << 10;

/// A file holding `data`, opened with the pread backend and wrapped in a `FaultyVolume`.
fn faulty_file(p: &Path, data: &[u8]) -> Arc<FaultyVolume<FileVolume>> {
    std::fs::write(p, data).unwrap();
    Arc::new(FaultyVolume::new(
        FileVolume::open(p, &FileVolumeOptions::default()).unwrap(),
    ))
}

struct Files {
    dir: tempfile::TempDir,
    t0: Vec<u8>,
    opts: EngineOptions,
}

impl Files {
    fn new(seed: u64) -> Self {
        Files {
            dir: tempfile::tempdir().unwrap(),
            t0: common::pattern(seed, SIZE),
            opts: no_log(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn table(&self) -> PathBuf {
        self.path("table")
    }
    /// A new engine with one session from `src` to `tgt` (both attached as given).
    fn engine(&self, src: Arc<dyn Volume>, tgt: Arc<dyn Volume>) -> (Engine, VolumeId, SessionId) {
        let e = Engine::create_path(&self.table(), self.opts.clone()).unwrap();
        let a = e.attach(src);
        let b = e.attach(tgt);
        let id = e.establish(&SessionSpec::whole(a, b)).unwrap();
        (e, a, id)
    }
    /// Reopen the table with plain file volumes; every session must resume.
    fn reopen(&self) -> Engine {
        let e = Engine::open_path(&self.table(), self.opts.clone()).unwrap();
        for d in &e.decisions {
            assert!(
                matches!(d.outcome, Outcome::Resumed),
                "session {} after reopen: {:?}",
                d.session,
                d.outcome
            );
        }
        e
    }
    /// Reopen after a crash (`mode`) of two sessions `s1` (target `t1`) and `s2` of the source:
    /// both images are T0, and the background copy finishes `s1` from the crashed state with a
    /// T0 target.
    fn reopen_two_t0(&self, s1: SessionId, s2: SessionId, mode: CrashMode) {
        let e = self.reopen();
        assert!(
            common::image(&e, s1) == self.t0,
            "{mode:?}: image 1 is not T0"
        );
        assert!(
            common::image(&e, s2) == self.t0,
            "{mode:?}: image 2 is not T0"
        );
        e.copy_all(s1, timezero::GrainCount(4)).unwrap();
        assert!(
            std::fs::read(self.path("t1")).unwrap() == self.t0,
            "{mode:?}"
        );
    }
    /// The source file still holds T0, so does the image, and so does the image after the
    /// table is reopened with plain file volumes; returns the reopened engine.
    fn assert_t0_kept(&self, e: Engine, id: SessionId) -> Engine {
        assert!(
            std::fs::read(self.path("src")).unwrap() == self.t0,
            "source changed"
        );
        assert!(common::image(&e, id) == self.t0, "image is not T0");
        drop(e);
        let e = self.reopen();
        assert!(
            common::image(&e, id) == self.t0,
            "image after reopen is not T0"
        );
        e
    }
}

/// A source holding the T0 pattern of `seed` and a zeroed target, both `FaultyVolume`s over
/// real files, and an engine with one whole-volume session between them.
fn setup(seed: u64) -> Rig {
    setup_with(seed, no_log())
}

/// Engine options whose table has no copy log: a first write's source write waits for the
/// target's flush, which is what most tests here count and fail.
fn no_log() -> EngineOptions {
    EngineOptions {
        table: timezero::TableOptions {
            log_bytes: 0,
            ..timezero::TableOptions::default()
        },
        ..EngineOptions::default()
    }
}

/// With the copy log (the default), first writes release their source writes before the
/// targets are flushed: a crash after the source's flush that loses every unflushed target
/// write still leaves every image T0 after reopen (the grains come back from the log), and the
/// targets are whole again.
#[test]
fn logged_first_writes_survive_a_crash_that_loses_their_target_writes() {
    for mode in [
        CrashMode::DropAll,
        CrashMode::Random { seed: 3 },
        CrashMode::Random { seed: 4 },
    ] {
        let f = Files {
            opts: EngineOptions::default(),
            ..Files::new(26)
        };
        let src = faulty_file(&f.path("src"), &f.t0);
        let t1 = faulty_file(&f.path("t1"), &vec![0u8; SIZE]);
        let t2 = faulty_file(&f.path("t2"), &vec![0u8; SIZE]);
        let e = Engine::create_path(&f.table(), f.opts.clone()).unwrap();
        let a = e.attach(src.clone());
        let b1 = e.attach(t1.clone());
        let b2 = e.attach(t2.clone());
        let s1 = e.establish(&SessionSpec::whole(a, b1)).unwrap();
        let s2 = e.establish(&SessionSpec::whole(a, b2)).unwrap();
        for (i, off) in [0u64, 70_000, 300_000, 1_000_000].into_iter().enumerate() {
            e.write(a, off, &common::pattern(200 + i as u64, 9000))
                .unwrap();
        }
        e.flush(a).unwrap();
        let logged = e
            .table()
            .stats
            .logged
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(logged >= 8, "{logged} runs logged");
        assert!(
            t1.unflushed_sectors() > 0 && t2.unflushed_sectors() > 0,
            "{mode:?}: the targets were flushed on the write path"
        );
        let lost: u64 = [&t1, &t2].iter().map(|v| v.crash(mode).unwrap()).sum();
        if mode == CrashMode::DropAll {
            assert!(lost > 0);
        }
        drop(e);
        f.reopen_two_t0(s1, s2, mode);
    }
}

/// What [`setup`] builds: the files, the source and target, the engine, the source's id and
/// the session.
type Rig = (
    Files,
    Arc<FaultyVolume<FileVolume>>,
    Arc<FaultyVolume<FileVolume>>,
    Engine,
    VolumeId,
    SessionId,
);

/// [`setup`] with engine options `opts`.
fn setup_with(seed: u64, opts: EngineOptions) -> Rig {
    let f = Files {
        opts,
        ..Files::new(seed)
    };
    let src = faulty_file(&f.path("src"), &f.t0);
    let tgt = faulty_file(&f.path("tgt"), &vec![0u8; SIZE]);
    let (e, a, id) = f.engine(src.clone(), tgt.clone());
    (f, src, tgt, e, a, id)
}

fn raw_os_error(e: &Error) -> Option<i32> {
    match e {
        Error::Io { source, .. } | Error::PoisonedIo { source, .. } => source.raw_os_error(),
        other => panic!("expected an I/O error, got {other}"),
    }
}

/// The N-th target write fails for good during a copy-before-write: the user's source write
/// fails with EIO after the engine's bounded retries, the source keeps its T0 bytes, and the
/// image is T0 before and after the table is reopened.
#[test]
fn failing_target_write_fails_the_source_write_and_keeps_t0() {
    let (f, src, tgt, e, a, id) = setup(21);
    let before = tgt.counts();
    tgt.arm(FaultPlan::new().fail_write(Trigger::forever(before.writes)));

    let err = e.write(a, 70_000, &[0xEE; 5000]).unwrap_err();
    assert_eq!(raw_os_error(&err), Some(5), "{err}");
    assert!(err.to_string().contains("injected fault"), "{err}");
    let after = tgt.counts();
    let tries = u64::from(DATA_IO_RETRIES_MAX);
    assert_eq!(after.writes - before.writes, tries);
    assert_eq!(after.injected - before.injected, tries);
    assert_eq!(
        after.flushes, before.flushes,
        "a failed copy flushed the target"
    );
    // The source write was never issued.
    assert_eq!(src.counts().writes, 0);
    assert!(std::fs::read(f.path("tgt")).unwrap() == vec![0u8; SIZE]);
    let e = f.assert_t0_kept(e, id);
    // The engine works again on the healthy files.
    let a = e.volume_by_locator(&src.info().locator).unwrap();
    e.write(a, 70_000, &[0xEE; 5000]).unwrap();
    assert!(common::image(&e, id) == f.t0);
}

/// A target whose flush fails after logged first writes: the write through the image that
/// needs the logged copy retired first fails (nothing is written), the table is not poisoned,
/// the grain's bytes stay in the log (which first writes no longer use), and after a crash
/// that loses the target's unflushed bytes the reopened image is T0, the grain taken from the
/// log.
#[test]
fn a_target_whose_flush_fails_keeps_its_logged_grains_in_the_log() {
    let f = Files {
        opts: EngineOptions::default(),
        ..Files::new(28)
    };
    let src = faulty_file(&f.path("src"), &f.t0);
    let tgt = faulty_file(&f.path("tgt"), &vec![0u8; SIZE]);
    let (e, a, id) = f.engine(src.clone(), tgt.clone());
    e.write(a, 100, &[0x5a; 4000]).unwrap();
    e.flush(a).unwrap();
    let logged = |e: &Engine| {
        e.table()
            .stats
            .logged
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(logged(&e), 1);
    assert!(tgt.unflushed_sectors() > 0);
    tgt.arm(FaultPlan::new().fail_flush(Trigger::forever(tgt.counts().flushes)));
    let err = e.write_image(id, 0, &[0x66; 512]).unwrap_err();
    assert_eq!(raw_os_error(&err), Some(5), "{err:?}");
    assert!(!e.table().is_poisoned());
    assert!(common::image(&e, id) == f.t0);
    // The log keeps the grain: another first write takes the checked path (and meets the
    // failed target).
    assert!(e.write(a, 3 * GRAIN as u64, &[1u8; 512]).is_err());
    assert_eq!(logged(&e), 1);
    // A reverse restore would read the failed target and, once durable, stop recovery from
    // proving the logged grain there: refused until the table is opened again.
    let err = e.reverse(id).unwrap_err();
    assert_eq!(raw_os_error(&err), Some(5), "{err:?}");
    assert!(!e.session(id).unwrap().reversing());
    drop(e);
    tgt.crash(CrashMode::DropAll).unwrap();
    let e = f.reopen();
    assert!(
        common::image(&e, id) == f.t0,
        "image after reopen is not T0"
    );
    let t = std::fs::read(f.path("tgt")).unwrap();
    assert!(
        t[..GRAIN] == f.t0[..GRAIN],
        "the grain came back from the log"
    );
    // Proven: the reverse restore runs now and puts T0 back on the source.
    e.reverse(id).unwrap();
    e.restore_all(id).unwrap();
    e.flush(a).unwrap();
    assert!(
        std::fs::read(f.path("src")).unwrap() == f.t0,
        "the source is not T0 after the restore"
    );
}

/// A target write that fails once is retried by the engine: the source write succeeds, the
/// image stays T0, and the counters show the one extra write.
#[test]
fn one_failed_target_write_is_retried() {
    let (f, src, tgt, e, a, id) = setup(22);
    let before = tgt.counts();
    tgt.arm(FaultPlan::new().fail_write(Trigger::once(before.writes)));
    e.write(a, 200_000, &[0x5A; 100]).unwrap();
    let after = tgt.counts();
    assert_eq!(after.writes - before.writes, 2);
    assert_eq!(after.injected - before.injected, 1);
    assert_eq!(after.flushes - before.flushes, 1);
    let tgt_bytes = std::fs::read(f.path("tgt")).unwrap();
    let g = 200_000 / GRAIN * GRAIN;
    assert!(
        tgt_bytes[g..g + GRAIN] == f.t0[g..g + GRAIN],
        "grain not copied"
    );
    assert_eq!(src.counts().writes, 1);
    assert!(common::image(&e, id) == f.t0);
}

/// A torn target write (cut at a 512-byte boundary, an error returned) during a
/// copy-before-write: the source write fails, the target holds a sector-aligned prefix of the
/// grain's T0 bytes, the grain stays uncopied and the image T0, also after reopening.
#[test]
fn torn_target_write_fails_the_source_write_and_keeps_t0() {
    let (f, src, tgt, e, a, id) = setup(23);
    let before = tgt.counts();
    tgt.arm(FaultPlan::new().tear_write(Trigger::forever(before.writes), 7));

    let err = e.write(a, 70_000, &[0xEE; 5000]).unwrap_err();
    assert_eq!(raw_os_error(&err), Some(5), "{err}");
    assert_eq!(
        tgt.counts().injected - before.injected,
        u64::from(DATA_IO_RETRIES_MAX)
    );
    let tgt_bytes = std::fs::read(f.path("tgt")).unwrap();
    let g = GRAIN; // the grain of offset 70 000
    let grain = &tgt_bytes[g..g + GRAIN];
    let k = (0..=GRAIN)
        .rev()
        .find(|&k| grain[..k] == f.t0[g..g + k])
        .unwrap();
    assert!(k > 0 && k < GRAIN && k % 512 == 0, "torn at {k}");
    assert!(grain[k..].iter().all(|&b| b == 0), "bytes past the tear");
    assert!(tgt_bytes[..g].iter().all(|&b| b == 0));
    assert!(tgt_bytes[g + GRAIN..].iter().all(|&b| b == 0));
    let e = f.assert_t0_kept(e, id);
    let a = e.volume_by_locator(&src.info().locator).unwrap();
    e.write(a, 70_000, &[0xEE; 5000]).unwrap();
    let tgt_bytes = std::fs::read(f.path("tgt")).unwrap();
    assert!(
        tgt_bytes[g..g + GRAIN] == f.t0[g..g + GRAIN],
        "grain copied whole"
    );
    assert!(common::image(&e, id) == f.t0);
}

/// ENOSPC on the target past its first half: copy-before-write of a grain there fails the
/// source write with ENOSPC; grains below the limit copy normally.
#[test]
fn enospc_on_the_target_fails_copy_before_write_past_the_limit() {
    let (f, _src, tgt, e, a, id) = setup(24);
    tgt.arm(FaultPlan::new().enospc_beyond(SIZE as u64 / 2));
    e.write(a, 1000, &[1; 10]).unwrap();
    let err = e.write(a, SIZE as u64 - 10, &[2; 10]).unwrap_err();
    assert_eq!(raw_os_error(&err), Some(28), "{err}");
    let s = std::fs::read(f.path("src")).unwrap();
    assert_eq!(&s[1000..1010], &[1; 10]);
    assert!(
        s[SIZE - 10..] == f.t0[SIZE - 10..],
        "source written past a failed copy"
    );
    assert!(common::image(&e, id) == f.t0);
}

/// A power loss after writes no flush covered: source writes after copy-before-write, target
/// writes of a background copy that was never committed. Each crash mode (all lost, seeded
/// random subsets of sectors) leaves both sessions' images T0-exact after the table is
/// reopened.
#[test]
fn crash_of_unflushed_writes_keeps_every_image_t0() {
    let modes = [
        CrashMode::DropAll,
        CrashMode::Random { seed: 1 },
        CrashMode::Random { seed: 2 },
        CrashMode::Random { seed: 99 },
    ];
    for mode in modes {
        let f = Files::new(25);
        let src = faulty_file(&f.path("src"), &f.t0);
        let t1 = faulty_file(&f.path("t1"), &vec![0u8; SIZE]);
        let t2 = faulty_file(&f.path("t2"), &vec![0u8; SIZE]);
        let e = Engine::create_path(&f.table(), no_log()).unwrap();
        let a = e.attach(src.clone());
        let b1 = e.attach(t1.clone());
        let b2 = e.attach(t2.clone());
        let s1 = e.establish(&SessionSpec::whole(a, b1)).unwrap();
        let s2 = e.establish(&SessionSpec::whole(a, b2)).unwrap();
        assert_eq!(src.unflushed_sectors(), 0, "establish flushes the source");

        // Source writes (copy-before-write to both targets, flushed; the source writes not).
        for (i, off) in [0u64, 70_000, 300_000, 1_000_000].into_iter().enumerate() {
            e.write(a, off, &common::pattern(100 + i as u64, 9000))
                .unwrap();
        }
        // A background copy of session 1 written to its target but never committed.
        let (_, hold) = e
            .copy_data(s1, timezero::GrainIndex(0), timezero::GrainCount(4))
            .unwrap()
            .unwrap();
        drop(hold);
        // Another round of source writes over copied grains.
        e.write(a, 10, &[0x77; 600]).unwrap();
        assert!(common::image(&e, s1) == f.t0);
        assert!(common::image(&e, s2) == f.t0);
        assert!(src.unflushed_sectors() > 0);
        assert!(
            t1.unflushed_sectors() > 0,
            "the uncommitted copy was flushed"
        );
        assert_eq!(t2.unflushed_sectors(), 0);

        let lost: u64 = [&src, &t1, &t2]
            .iter()
            .map(|v| v.crash(mode).unwrap())
            .sum();
        if mode == CrashMode::DropAll {
            assert!(lost > 0);
            let s = std::fs::read(f.path("src")).unwrap();
            assert!(s == f.t0, "DropAll kept an unflushed source write");
        }
        drop(e);
        f.reopen_two_t0(s1, s2, mode);
    }
}

/// The crash simulation catches an ordering bug: with the harness canary that skips the
/// target flush of copy-before-write, a crash loses the copied grain although its bit was
/// committed, and the reopened image reads the target's old bytes there.
#[test]
fn crash_catches_copy_before_write_without_target_flush() {
    let serial = EngineOptions {
        checked_copies: false,
        ..no_log()
    };
    let (f, src, tgt, e, a, id) = setup_with(27, serial);
    timezero::fault::internals::set_canary_skip_cbw_flush(true);
    let r = e.write(a, 3 * GRAIN as u64 + 5, &[0x99; 10]);
    timezero::fault::internals::set_canary_skip_cbw_flush(false);
    r.unwrap();
    assert!(
        common::image(&e, id) == f.t0,
        "before the crash the image is T0"
    );
    assert_eq!(tgt.unflushed_sectors(), GRAIN / 512);
    tgt.crash(CrashMode::DropAll).unwrap();
    src.crash(CrashMode::DropAll).unwrap();
    drop(e);
    let e = f.reopen();
    let img = common::image(&e, id);
    let g = 3 * GRAIN;
    assert!(
        img[g..g + GRAIN].iter().all(|&b| b == 0),
        "lost grain not seen"
    );
    assert!(img[..g] == f.t0[..g] && img[g + GRAIN..] == f.t0[g + GRAIN..]);
}

/// The same lost target flush with checked copy records: the record's CRC no
/// longer matches the target after the crash, so recovery copies the grain again from the
/// source (which still holds T0) and the reopened image is T0 everywhere.
#[test]
fn checked_copies_repair_a_grain_lost_with_its_target_flush() {
    let checked = EngineOptions {
        checked_copies: true,
        ..no_log()
    };
    let (f, src, tgt, e, a, id) = setup_with(27, checked);
    timezero::fault::internals::set_canary_skip_cbw_flush(true);
    let r = e.write(a, 3 * GRAIN as u64 + 5, &[0x99; 10]);
    timezero::fault::internals::set_canary_skip_cbw_flush(false);
    r.unwrap();
    assert_eq!(tgt.unflushed_sectors(), GRAIN / 512);
    tgt.crash(CrashMode::DropAll).unwrap();
    src.crash(CrashMode::DropAll).unwrap();
    drop(e);
    let g = 3 * GRAIN;
    assert!(
        std::fs::read(f.path("tgt")).unwrap()[g..g + GRAIN]
            .iter()
            .all(|&b| b == 0),
        "the crash lost the copied grain"
    );
    let e = f.reopen();
    assert!(
        common::image(&e, id) == f.t0,
        "image after reopen is not T0"
    );
    assert!(
        std::fs::read(f.path("tgt")).unwrap()[g..g + GRAIN] == f.t0[g..g + GRAIN],
        "recovery did not copy the grain again"
    );
}

/// `CheckedVolume` under the engine: a target write that fails once during copy-before-write
/// latches the target, so the engine's retry gets `PoisonedIo` (keeping the EIO) instead of
/// reaching the device again, and the source write fails; a later copy-before-write to that
/// target fails fast the same way without any device call. The source keeps its T0 bytes and
/// the image stays T0, also after the table is reopened on the plain files.
#[test]
fn checked_target_latches_a_failed_write_under_the_engine() {
    let f = Files::new(26);
    let src = faulty_file(&f.path("src"), &f.t0);
    let tgt_faulty = faulty_file(&f.path("tgt"), &vec![0u8; SIZE]);
    let tgt = Arc::new(CheckedVolume::new(tgt_faulty.clone()));
    let (e, a, id) = f.engine(src.clone(), tgt.clone());
    let before = tgt_faulty.counts();
    tgt_faulty.arm(FaultPlan::new().fail_write(Trigger::once(before.writes)));
    let poisoned_eio = |err: &Error| match err {
        Error::PoisonedIo { op, source, .. } => {
            assert_eq!(*op, "write");
            assert_eq!(source.raw_os_error(), Some(5));
        }
        other => panic!("expected PoisonedIo, got {other}"),
    };
    let err = e.write(a, 0, &[1; 100]).unwrap_err();
    poisoned_eio(&err);
    assert!(tgt.is_failed());
    assert_eq!(tgt.first_error().unwrap().raw_os_error, Some(5));
    let seen = tgt_faulty.counts();
    assert_eq!(
        seen.writes - before.writes,
        1,
        "the retry reached the device"
    );
    // Another grain: the copy's target write fails fast.
    let err = e.write(a, 500_000, &[2; 100]).unwrap_err();
    poisoned_eio(&err);
    assert_eq!(
        tgt_faulty.counts(),
        seen,
        "a latched call reached the device"
    );
    assert_eq!(src.counts().writes, 0);
    f.assert_t0_kept(e, id);
}

/// `Engine::close` makes the writes made through the engine durable (a crash after it loses
/// none of them) and reports a volume flush failure that a drop would hide.
#[test]
fn close_flushes_every_volume_and_reports_a_failed_flush() {
    let (_f, src, _tgt, e, a, _) = setup(31);
    e.write(a, 0, &[0x5a; 4096]).unwrap();
    assert!(
        src.unflushed_sectors() > 0,
        "the source write is not yet durable"
    );
    e.close().unwrap();
    assert_eq!(src.unflushed_sectors(), 0, "close flushed the source");
    src.crash(CrashMode::DropAll).unwrap();
    let mut got = vec![0u8; 4096];
    src.read_at(0, &mut got).unwrap();
    assert_eq!(
        got,
        vec![0x5a; 4096],
        "the write survived a crash after close"
    );

    // A flush that fails: close reports it (after flushing the other volumes).
    let (f, src, tgt, e, a, _) = setup(32);
    e.write(a, 0, &[0x5a; 4096]).unwrap();
    let flushes = src.counts().flushes;
    src.arm(FaultPlan::new().fail_flush(Trigger::forever(flushes)));
    let err = e.close().unwrap_err();
    assert_eq!(
        raw_os_error(&err),
        Some(5),
        "EIO from the failed flush: {err:?}"
    );
    assert!(err.to_string().contains("src"), "{err}");
    assert!(
        src.unflushed_sectors() > 0,
        "the failed flush made nothing durable"
    );
    assert_eq!(tgt.unflushed_sectors(), 0);
    // The table itself closed cleanly: it reopens with the session resumed.
    drop(f.reopen());
}

/// A failed target flush latches the target for the engine: a later copy-before-write to it
/// fails at once with the first error (EIO) although the device's next flush would report
/// success (the writes the failed flush should have covered may be lost), the source keeps its
/// T0 bytes, and the image still reads T0, before and after a reopen.
#[test]
fn failed_flush_latches_the_volume_with_its_first_error() {
    let (f, _src, tgt, e, a, id) = setup(33);
    let failing = tgt.counts().flushes;
    tgt.arm(FaultPlan::new().fail_flush(Trigger::once(failing)));

    // The copy-before-write's flush fails (its retry meets the latch): EIO either way.
    let first = e.write(a, 0, &[0x11; 4096]).unwrap_err();
    assert_eq!(raw_os_error(&first), Some(5), "{first:?}");
    let writes = tgt.counts().writes;
    let later = e.write(a, 2 * GRAIN as u64, &[0x22; 4096]).unwrap_err();
    assert!(
        matches!(later, Error::PoisonedIo { .. }) && raw_os_error(&later) == Some(5),
        "a later copy-before-write fails with the first error: {later:?}"
    );
    let c = tgt.counts();
    assert_eq!(
        c.flushes,
        failing + 1,
        "no flush reached the device after the failed one"
    );
    assert_eq!(
        c.writes, writes,
        "no write reached the device after the latch"
    );
    // Flushing the latched volume fails the same way; the source is untouched.
    assert!(matches!(
        e.flush(tgt.info().id),
        Err(Error::PoisonedIo { .. })
    ));
    f.assert_t0_kept(e, id);
}

/// The copier reports every durability point, the completion once, and a failure: over real
/// files, two sessions, one of whose targets starts failing every flush half way.
#[test]
fn copier_events_report_commits_completion_and_failure() {
    use std::sync::Mutex;
    use timezero::{Copier, CopierEvent, CopierOptions};

    #[derive(Debug, PartialEq)]
    enum Seen {
        Committed(SessionId, u64),
        Completed(SessionId),
        Failed(String),
    }
    fn record(log: &Arc<Mutex<Vec<Seen>>>) -> impl Fn(&CopierEvent<'_>) + Send + Sync + 'static {
        let log = log.clone();
        move |ev| {
            let s = match ev {
                CopierEvent::Committed { session, bytes, .. } => Seen::Committed(*session, *bytes),
                CopierEvent::Completed { session } => Seen::Completed(*session),
                CopierEvent::Failed { error } => Seen::Failed(error.to_string()),
                _ => return,
            };
            log.lock().unwrap().push(s);
        }
    }

    // Healthy: every byte of the session is reported in commits, then one completion.
    let (_f, _src, _tgt, e, _a, id) = setup(31);
    let e = Arc::new(e);
    let log = Arc::new(Mutex::new(Vec::new()));
    let opts = CopierOptions {
        batch_bytes: 128 << 10,
        commit_bytes: 256 << 10,
        ..CopierOptions::default()
    };
    let p = Copier::start_with_events(e.clone(), opts.clone(), record(&log))
        .unwrap()
        .join()
        .unwrap();
    assert!(p.done);
    let seen = std::mem::take(&mut *log.lock().unwrap());
    let committed: u64 = seen
        .iter()
        .map(|s| match s {
            Seen::Committed(sid, b) if *sid == id => *b,
            _ => 0,
        })
        .sum();
    assert_eq!(committed, SIZE as u64, "{seen:?}");
    assert_eq!(p.commits, (seen.len() - 1) as u64, "{seen:?}");
    assert_eq!(seen.last(), Some(&Seen::Completed(id)), "{seen:?}");
    assert_eq!(
        seen.iter()
            .filter(|s| matches!(s, Seen::Completed(_)))
            .count(),
        1
    );

    // Failing: the target's every flush fails; the copier reports the error and stops, and
    // join returns it. No commit is reported (none was made durable).
    let (_f, _src, tgt, e, _a, _id) = setup(32);
    tgt.arm(FaultPlan::new().fail_flush(Trigger::forever(0)));
    let e = Arc::new(e);
    let err = Copier::start_with_events(e, opts, record(&log))
        .unwrap()
        .join()
        .unwrap_err();
    let seen = std::mem::take(&mut *log.lock().unwrap());
    assert!(
        seen.iter().any(|s| *s == Seen::Failed(err.to_string())),
        "{seen:?} / {err}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| matches!(s, Seen::Committed(..) | Seen::Completed(_))),
        "{seen:?}"
    );
}
