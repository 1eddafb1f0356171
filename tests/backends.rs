//! The same volume and engine suite over every backend.
//!
//! Goal: pread (buffered and O_DIRECT), io_uring (buffered and O_DIRECT, and the default mixed
//! O_DIRECT backend: pread plus io_uring registered buffers), in-memory volumes, and the
//! decorators `CheckedVolume` and `FaultyVolume` (no fault armed) over pread files behave the
//! same under the engine. Method: one macro stamps the suite per backend; the
//! io_uring instances skip with a message when the kernel refuses io_uring, and O_DIRECT ones
//! when the file system refuses it.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::path::Path;
use std::sync::Arc;

use timezero::fault::FaultyVolume;
use timezero::Error;
use timezero::GrainSize;
use timezero::{CheckedVolume, FileVolume, FileVolumeOptions, MemVolume, Volume};
use timezero::{Engine, EngineOptions, SessionSpec};

/// Create a file of `data` and open it with the backend; `None` = backend unavailable here.
type Opener = fn(&Path, &[u8]) -> Option<Arc<dyn Volume>>;

fn write_file(p: &Path, data: &[u8]) {
    std::fs::write(p, data).unwrap();
}

fn pread(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    write_file(p, data);
    Some(Arc::new(
        FileVolume::open(p, &FileVolumeOptions::default()).unwrap(),
    ))
}

fn pread_direct(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    write_file(p, data);
    match FileVolume::open(
        p,
        &FileVolumeOptions {
            direct: true,
            read_only: false,
        },
    ) {
        Ok(v) => Some(Arc::new(v)),
        Err(e) => {
            println!("skipping O_DIRECT pread: {e}");
            None
        }
    }
}

fn uring(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    if !timezero::uring_available() {
        println!("skipping io_uring: not available on this kernel");
        return None;
    }
    write_file(p, data);
    Some(Arc::new(
        timezero::UringVolume::open(p, &FileVolumeOptions::default()).unwrap(),
    ))
}

/// Open with an io_uring constructor and `O_DIRECT`; `None` when io_uring or `O_DIRECT` is
/// refused here.
fn uring_direct_with(
    p: &Path,
    data: &[u8],
    open: fn(&Path, &FileVolumeOptions) -> timezero::Result<timezero::UringVolume>,
) -> Option<Arc<dyn Volume>> {
    if !timezero::uring_available() {
        println!("skipping io_uring: not available on this kernel");
        return None;
    }
    write_file(p, data);
    let opts = FileVolumeOptions {
        direct: true,
        read_only: false,
    };
    match open(p, &opts) {
        Ok(v) => Some(Arc::new(v)),
        Err(e) => {
            println!("skipping O_DIRECT io_uring: {e}");
            None
        }
    }
}

fn uring_direct(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    uring_direct_with(p, data, |p, o| timezero::UringVolume::open(p, o))
}

/// The default backend's choice for `O_DIRECT` volumes.
fn uring_registered_only_direct(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    uring_direct_with(p, data, |p, o| {
        timezero::UringVolume::open_registered_only(p, o)
    })
}

/// `CheckedVolume` over the pread backend: healthy, it behaves as the plain backend.
fn checked_pread(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    write_file(p, data);
    Some(Arc::new(CheckedVolume::new(
        FileVolume::open(p, &FileVolumeOptions::default()).unwrap(),
    )))
}

/// `FaultyVolume` (no fault armed, crash shadow on) over the pread backend: it behaves as the
/// plain backend.
fn faulty_pread(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    write_file(p, data);
    Some(Arc::new(FaultyVolume::new(
        FileVolume::open(p, &FileVolumeOptions::default()).unwrap(),
    )))
}

/// `FaultyVolume` over the `O_DIRECT` pread backend (its shadow reads are unaligned).
fn faulty_pread_direct(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    let inner = pread_direct(p, data)?;
    Some(Arc::new(FaultyVolume::new(inner)))
}

fn mem(p: &Path, data: &[u8]) -> Option<Arc<dyn Volume>> {
    Some(Arc::new(MemVolume::with_data(
        &p.display().to_string(),
        data,
    )))
}

fn volume_roundtrip_and_errors(open: Opener) {
    let dir = tempfile::tempdir().unwrap();
    let Some(v) = open(&dir.path().join("v"), &vec![0u8; 1 << 20]) else {
        return;
    };
    let data = common::pattern(1, 12345);
    v.write_at(777, &data).unwrap();
    v.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    v.read_at(777, &mut back).unwrap();
    assert_eq!(back, data);
    let mut b = [0u8; 10];
    assert!(matches!(
        v.read_at((1 << 20) - 5, &mut b),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write_at(u64::MAX - 2, &b),
        Err(Error::OutOfRange { .. })
    ));
    // Concurrent writers to disjoint ranges.
    let hs: Vec<_> = (0..8u64)
        .map(|t| {
            let v = v.clone();
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    let d = common::pattern(t * 100 + i, 4096);
                    v.write_at((t * 16 + i) * 4096, &d).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    for t in 0..8u64 {
        for i in 0..16u64 {
            let mut got = vec![0u8; 4096];
            v.read_at((t * 16 + i) * 4096, &mut got).unwrap();
            assert_eq!(got, common::pattern(t * 100 + i, 4096));
        }
    }
}

/// A file whose size is not a multiple of 4 KiB: reads and writes of its last bytes, which an
/// `O_DIRECT` backend bounces through an aligned span reaching past the end of the file.
fn unaligned_file_tail(open: Opener) {
    let dir = tempfile::tempdir().unwrap();
    let size = (1usize << 20) + 1234;
    let mut model = common::pattern(8, size);
    let Some(v) = open(&dir.path().join("v"), &model) else {
        return;
    };
    assert_eq!(v.size(), size as u64);
    for (off, len) in [(size - 3000, 3000usize), (size - 1, 1), (size - 5000, 4766)] {
        let mut back = vec![0u8; len];
        v.read_at(off as u64, &mut back).unwrap();
        assert!(back == model[off..off + len], "read {len} at {off}");
    }
    // Writes that stay within the last whole sector succeed on every backend; an O_DIRECT write
    // whose aligned span would extend the file is refused with `Misaligned`, never torn.
    let data = common::pattern(9, 1000);
    let at = size - 1234 - 1000;
    v.write_at(at as u64, &data).unwrap();
    model[at..at + 1000].copy_from_slice(&data);
    match v.write_at((size - 10) as u64, &data[..10]) {
        Ok(()) => model[size - 10..].copy_from_slice(&data[..10]),
        Err(Error::Misaligned { .. }) => {}
        Err(e) => panic!("tail write: {e}"),
    }
    v.flush().unwrap();
    let mut back = vec![0u8; 5000];
    v.read_at((size - 5000) as u64, &mut back).unwrap();
    assert!(back == model[size - 5000..], "tail after writes");
}

fn engine_session_over_backend(open: Opener) {
    let dir = tempfile::tempdir().unwrap();
    let size = 2usize << 20;
    let t0 = common::pattern(7, size);
    let Some(src) = open(&dir.path().join("src"), &t0) else {
        return;
    };
    let Some(tgt) = open(&dir.path().join("tgt"), &vec![0u8; size]) else {
        return;
    };
    let e = Engine::create_path(&dir.path().join("table"), EngineOptions::default()).unwrap();
    let a = e.attach(src.clone());
    let b = e.attach(tgt.clone());
    let id = e
        .establish(&SessionSpec {
            grain: GrainSize::new(16384).unwrap(),
            ..SessionSpec::whole(a, b)
        })
        .unwrap();
    // Partial-grain and grain-crossing writes through copy-before-write.
    for (i, (off, len)) in [
        (0u64, 1usize),
        (16380, 10),
        (100_000, 70_000),
        (2_000_000, 97_152),
    ]
    .iter()
    .enumerate()
    {
        e.write(a, *off, &common::pattern(50 + i as u64, *len))
            .unwrap();
    }
    assert_eq!(common::image(&e, id), t0);
    e.copy_all(id, timezero::GrainCount(8)).unwrap();
    let mut got = vec![0u8; size];
    tgt.read_at(0, &mut got).unwrap();
    assert!(got == t0, "completed target differs from T0");
}

macro_rules! backend_suite {
    ($($name:ident => $open:expr),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn volume_roundtrip_and_errors() {
                    super::volume_roundtrip_and_errors($open);
                }
                #[test]
                fn unaligned_file_tail() {
                    super::unaligned_file_tail($open);
                }
                #[test]
                fn engine_session_over_backend() {
                    super::engine_session_over_backend($open);
                }
            }
        )*
    };
}

backend_suite! {
    pread_buffered => super::pread,
    pread_o_direct => super::pread_direct,
    io_uring_buffered => super::uring,
    io_uring_o_direct => super::uring_direct,
    io_uring_registered_only_o_direct => super::uring_registered_only_direct,
    in_memory => super::mem,
    checked_pread_buffered => super::checked_pread,
    faulty_pread_buffered => super::faulty_pread,
    faulty_pread_o_direct => super::faulty_pread_direct,
}

/// The default backend picks io_uring for `O_DIRECT` volumes (where the kernel allows) and
/// pread/pwrite for buffered ones; `Pread` and `IoUring` force one for every volume.
#[test]
fn engine_backend_choice_follows_direct() {
    use timezero::{Backend, BACKEND_IO_URING, BACKEND_PREAD, BACKEND_PREAD_IO_URING};
    let dir = tempfile::tempdir().unwrap();
    let uring = timezero::uring_available();
    let expected = |backend: Backend, direct: bool| match (uring, backend, direct) {
        (false, _, _) | (_, Backend::Pread, _) | (_, Backend::Auto, false) => BACKEND_PREAD,
        (true, Backend::Auto, true) => BACKEND_PREAD_IO_URING,
        (true, Backend::IoUring, _) => BACKEND_IO_URING,
    };
    assert_eq!(EngineOptions::default().backend, Backend::Auto);
    assert!(Backend::Auto.uses_uring(true) && !Backend::Auto.uses_uring(false));
    for (i, backend) in [Backend::Auto, Backend::Pread, Backend::IoUring]
        .into_iter()
        .enumerate()
    {
        for direct in [false, true] {
            let opts = EngineOptions {
                backend,
                file_options: FileVolumeOptions {
                    direct,
                    read_only: false,
                },
                ..EngineOptions::default()
            };
            let table = dir.path().join(format!("t{i}{direct}.tzt"));
            let e = Engine::create_path(&table, opts).unwrap();
            // Before any volume is opened: the backend the options would pick.
            assert_eq!(e.backend_name(), expected(backend, direct));
            let vol = dir.path().join(format!("v{i}{direct}"));
            write_file(&vol, &vec![7u8; 1 << 20]);
            match e.attach_path(&vol) {
                Ok(id) => {
                    assert_eq!(e.backend_name(), expected(backend, direct), "{backend:?}");
                    let mut buf = vec![0u8; 5000];
                    let v = e.volume(id).unwrap();
                    v.read_at(3, &mut buf).unwrap();
                    assert!(buf.iter().all(|&b| b == 7));
                }
                Err(err) if direct => println!("skipping O_DIRECT: {err}"),
                Err(err) => panic!("attach: {err}"),
            }
        }
    }
}
