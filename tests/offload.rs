//! Copy offload: the background copy asks the kernel to copy file to file
//! (`Volume::copy_from`, `copy_file_range(2)`), and falls back to copying through memory where
//! the volumes cannot.
//!
//! Goal: the kernel's copy puts exactly the source's bytes on the target, at any offsets; it is
//! refused (not attempted) for `O_DIRECT` volumes and volumes without a file, and refused with
//! the latched error on a target that failed; the copier copies file sessions through it (and
//! counts the bytes), and with `copy_offload` off through memory; the copier and
//! `Engine::copy_all` leave the same target either way, and the image is T0 after a reopen.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::path::Path;
use std::sync::Arc;

use timezero::fault::{FaultPlan, FaultyVolume, Trigger};
use timezero::{CheckedVolume, FileVolume, FileVolumeOptions, MemVolume, Volume};
use timezero::{Copier, CopierOptions, CopyMode, Engine, EngineOptions, Error, SessionSpec};
use timezero::{GrainCount, SessionState};

const MIB: usize = 1 << 20;

fn buffered(p: &Path, data: &[u8]) -> FileVolume {
    std::fs::write(p, data).unwrap();
    FileVolume::open(p, &FileVolumeOptions::default()).unwrap()
}

fn read_all(v: &dyn Volume) -> Vec<u8> {
    let mut b = vec![0u8; usize::try_from(v.size()).unwrap()];
    v.read_at(0, &mut b).unwrap();
    b
}

#[test]
fn a_file_volume_copies_from_another_inside_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::pattern(3, 4 * MIB);
    let src = buffered(&dir.path().join("src"), &data);
    let tgt = buffered(&dir.path().join("tgt"), &vec![0u8; 4 * MIB]);
    // Unaligned offsets and a length that is not a multiple of a page.
    assert!(tgt.copy_from(&src, 12_345, 777_777, 1_000_003).unwrap());
    let back = read_all(&tgt);
    assert_eq!(
        &back[777_777..777_777 + 1_000_003],
        &data[12_345..12_345 + 1_000_003]
    );
    assert!(
        back[..777_777].iter().all(|b| *b == 0),
        "bytes before the range"
    );
    assert!(
        back[777_777 + 1_000_003..].iter().all(|b| *b == 0),
        "bytes after the range"
    );
    // A whole-file copy, then durable.
    assert!(tgt.copy_from(&src, 0, 0, 4 * MIB as u64).unwrap());
    tgt.flush().unwrap();
    assert_eq!(read_all(&tgt), data);

    // Ranges past either end are the caller's mistake, before anything is copied.
    assert!(matches!(
        tgt.copy_from(&src, 4 * MIB as u64 - 10, 0, 20),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        tgt.copy_from(&src, 0, 4 * MIB as u64 - 10, 20),
        Err(Error::OutOfRange { .. })
    ));

    // A source without a file: refused, nothing attempted (the caller copies through memory).
    let mem = MemVolume::with_data("m", &vec![9u8; 4 * MIB]);
    assert!(mem.copy_fd().is_none());
    assert!(!tgt.copy_from(&mem, 0, 0, 4096).unwrap());
    assert_eq!(read_all(&tgt), data, "a refused copy writes nothing");
    // A memory volume as the target never copies either.
    assert!(!mem.copy_from(&src, 0, 0, 4096).unwrap());

    // O_DIRECT on either side: refused (a copy through the page cache would bypass the
    // descriptor's direct writes). Skipped where the file system refuses O_DIRECT.
    let direct = FileVolumeOptions {
        direct: true,
        ..FileVolumeOptions::default()
    };
    match FileVolume::open(dir.path().join("src"), &direct) {
        Ok(d) => {
            assert!(d.copy_fd().is_none());
            assert!(!tgt.copy_from(&d, 0, 0, 4096).unwrap());
            let dt = FileVolume::open(dir.path().join("tgt"), &direct).unwrap();
            assert!(!dt.copy_from(&src, 0, 0, 4096).unwrap());
        }
        Err(e) => eprintln!("skipping the O_DIRECT part: {e}"),
    }
}

#[test]
fn io_uring_volumes_copy_inside_the_kernel_too() {
    if !timezero::uring_available() {
        println!("skipping: io_uring is not available on this kernel");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = common::pattern(8, 2 * MIB);
    std::fs::write(dir.path().join("src"), &data).unwrap();
    std::fs::write(dir.path().join("tgt"), vec![0u8; 2 * MIB]).unwrap();
    let o = FileVolumeOptions::default();
    let src = timezero::UringVolume::open(dir.path().join("src"), &o).unwrap();
    let tgt = timezero::UringVolume::open(dir.path().join("tgt"), &o).unwrap();
    assert!(src.copy_fd().is_some());
    assert!(tgt.copy_from(&src, 0, 0, 2 * MIB as u64).unwrap());
    // Across backends as well: a pread volume copies from an io_uring one.
    let plain = buffered(&dir.path().join("third"), &vec![0u8; 2 * MIB]);
    assert!(plain.copy_from(&src, 4096, 0, MIB as u64).unwrap());
    assert_eq!(read_all(&tgt), data);
    assert_eq!(&read_all(&plain)[..MIB], &data[4096..4096 + MIB]);
}

#[test]
fn a_target_that_failed_refuses_the_kernel_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = buffered(&dir.path().join("src"), &common::pattern(4, MIB));
    let inner = FaultyVolume::with_plan(
        buffered(&dir.path().join("tgt"), &vec![0u8; MIB]),
        FaultPlan::new().fail_flush(Trigger::once(0)),
    );
    let tgt = CheckedVolume::new(inner);
    assert!(tgt.flush().is_err());
    assert!(matches!(
        tgt.copy_from(&src, 0, 0, 4096),
        Err(Error::PoisonedIo { .. })
    ));
    assert!(
        read_all(tgt.inner().inner()).iter().all(|b| *b == 0),
        "nothing copied after the latch"
    );
}

/// Run a copier of `threads` workers over every session to the end.
fn run_copier(e: &Arc<Engine>, threads: usize) -> timezero::Progress {
    Copier::start(
        e.clone(),
        CopierOptions {
            threads,
            ..CopierOptions::default()
        },
    )
    .unwrap()
    .join()
    .unwrap()
}

/// An engine over a file source holding `data` and a zero-filled file target of its size.
fn file_engine(dir: &Path, data: &[u8], offload: bool) -> (Arc<Engine>, SessionSpec) {
    std::fs::write(dir.join("src"), data).unwrap();
    FileVolume::create(
        dir.join("tgt"),
        data.len() as u64,
        &FileVolumeOptions::default(),
    )
    .unwrap();
    let e = Arc::new(
        Engine::create_path(
            &dir.join("table"),
            EngineOptions {
                copy_offload: offload,
                ..EngineOptions::default()
            },
        )
        .unwrap(),
    );
    let src = e.attach_path(&dir.join("src")).unwrap();
    let tgt = e.attach_path(&dir.join("tgt")).unwrap();
    (e, SessionSpec::whole(src, tgt))
}

/// Establish a copy session, write over some grains (their T0 bytes go to the target through
/// memory, by copy-before-write), run the copier, and check the target and the image against
/// T0, also after a reopen. Returns the copier's progress.
fn copy_session(offload: bool) -> timezero::Progress {
    let dir = tempfile::tempdir().unwrap();
    let t0 = common::pattern(5, 32 * MIB);
    let (e, spec) = file_engine(dir.path(), &t0, offload);
    let id = e.establish(&spec).unwrap();
    for g in [0u64, 7, 100, 511] {
        e.write(spec.source, g * 65_536 + 100, &[0xEE; 5000])
            .unwrap();
    }
    e.flush(spec.source).unwrap();
    let p = run_copier(&e, 2);
    assert!(p.done);
    assert_eq!(e.session(id).unwrap().state(), SessionState::Completed);
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), t0);
    Arc::try_unwrap(e).unwrap().close().unwrap();
    let again = Engine::open_path(&dir.path().join("table"), EngineOptions::default()).unwrap();
    let mut img = vec![0u8; t0.len()];
    again.read_image(id, 0, &mut img).unwrap();
    assert_eq!(img, t0, "the image after a reopen");
    p
}

#[test]
fn the_copier_copies_file_sessions_through_the_kernel() {
    let p = copy_session(true);
    // 512 grains, 4 of them copied by the writes: the copier moved the other 508, all through
    // the kernel (the files are buffered, on one file system).
    assert_eq!(p.bytes_copied, 508 * 65_536);
    assert_eq!(p.bytes_offloaded, p.bytes_copied);
}

#[test]
fn without_offload_the_copier_copies_through_memory() {
    let p = copy_session(false);
    assert_eq!(p.bytes_copied, 508 * 65_536);
    assert_eq!(p.bytes_offloaded, 0);
}

#[test]
fn copy_all_gives_the_same_target_with_and_without_offload() {
    for offload in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let t0 = common::pattern(6, 8 * MIB);
        let (e, spec) = file_engine(dir.path(), &t0, offload);
        let id = e.establish(&spec).unwrap();
        e.write(spec.source, 3 * 65_536, &[1u8; 4096]).unwrap();
        assert_eq!(e.copy_all(id, GrainCount(16)).unwrap(), GrainCount(127));
        assert_eq!(e.session(id).unwrap().state(), SessionState::Completed);
        assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), t0);
        // The source write went on after its copy-before-write.
        let src = std::fs::read(dir.path().join("src")).unwrap();
        assert_eq!(&src[3 * 65_536..3 * 65_536 + 4096], &[1u8; 4096][..]);
    }
}

#[test]
fn a_no_copy_session_converted_later_is_offloaded_from_then() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = common::pattern(7, 4 * MIB);
    let (e, mut spec) = file_engine(dir.path(), &t0, true);
    spec.mode = CopyMode::NoCopy;
    let id = e.establish(&spec).unwrap();
    e.write(spec.source, 0, &[2u8; 65_536]).unwrap();
    e.convert_to_copy(id).unwrap();
    let p = run_copier(&e, CopierOptions::default().threads);
    assert_eq!(p.bytes_offloaded, 63 * 65_536);
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), t0);
}

/// `timezero copy` says how much the kernel copied; `--no-copy-offload` copies through memory;
/// both leave the T0 bytes on the target (checked against the source as it was at T0).
#[test]
fn the_copy_command_reports_the_kernel_copy_and_can_turn_it_off() {
    let tz = common::cli::ok_in;
    for (flags, by_kernel) in [(&[][..], true), (&["--no-copy-offload"][..], false)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let t0 = common::pattern(9, 4 * MIB);
        std::fs::write(d.join("src"), &t0).unwrap();
        std::fs::write(d.join("tgt"), vec![0u8; 4 * MIB]).unwrap();
        std::fs::write(d.join("new"), [3u8; 4096]).unwrap();
        tz(d, &["init", "tab"]);
        tz(d, &["establish", "tab", "src", "tgt"]);
        tz(d, &["write", "tab", "src", "65536", "--from", "new"]);
        let mut args = flags.to_vec();
        args.extend(["copy", "tab"]);
        let out = tz(d, &args);
        let first = out.lines().next().unwrap();
        // 64 grains, one copied by the write before the copy.
        assert!(first.starts_with("copied 4128768 bytes"), "{out}");
        assert_eq!(
            first.contains("(4128768 by the kernel)"),
            by_kernel,
            "{flags:?}: {out}"
        );
        assert!(out.contains("s1 completed"), "{out}");
        assert_eq!(std::fs::read(d.join("tgt")).unwrap(), t0);
    }
}

/// A source the kernel cannot copy from (memory) and a file target: the copier tries one
/// span-long run, is refused, and copies the span through memory in batches from that run's
/// first grain: the same commits and 1 MiB runs as without offload, and the T0 bytes.
#[test]
fn the_copier_falls_back_to_memory_where_the_kernel_cannot_copy() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = common::pattern(10, 32 * MIB);
    FileVolume::create(
        dir.path().join("tgt"),
        t0.len() as u64,
        &FileVolumeOptions::default(),
    )
    .unwrap();
    let e =
        Arc::new(Engine::create_path(&dir.path().join("table"), EngineOptions::default()).unwrap());
    let src = e.attach(Arc::new(MemVolume::with_data("m", &t0)));
    let tgt = e.attach_path(&dir.path().join("tgt")).unwrap();
    let id = e.establish(&SessionSpec::whole(src, tgt)).unwrap();
    let p = run_copier(&e, 1);
    assert_eq!(p.bytes_offloaded, 0);
    assert_eq!(p.bytes_copied, 32 * MIB as u64);
    assert_eq!((p.commits, p.runs), (2, 32), "2 spans of 16 runs of 1 MiB");
    assert_eq!(e.session(id).unwrap().state(), SessionState::Completed);
    assert_eq!(std::fs::read(dir.path().join("tgt")).unwrap(), t0);
}
