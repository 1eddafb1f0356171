//! `Engine::image` / `Image::read_at`: an image opened once reads exactly what
//! `Engine::read_image` reads, through copy-before-write, background copy, completion, a volume
//! re-attached under it (reset) and withdrawal.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use timezero::Error;
use timezero::MemVolume;
use timezero::SessionId;
use timezero::SessionSpec;

const SIZE: usize = 4 << 20;

fn both(e: &timezero::Engine, img: &timezero::Image<'_>, id: SessionId) -> Vec<u8> {
    let mut a = vec![0u8; SIZE];
    img.read_at(0, &mut a).unwrap();
    let mut b = vec![0u8; SIZE];
    e.read_image(id, 0, &mut b).unwrap();
    assert!(a == b, "Image::read_at and Engine::read_image differ");
    // Unaligned, grain-crossing pieces too.
    let mut c = vec![0u8; 70_000];
    img.read_at(65_000, &mut c).unwrap();
    assert!(c[..] == a[65_000..135_000]);
    a
}

#[test]
fn image_handle_reads_the_t0_image_through_every_change() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let t0 = common::pattern(3, SIZE);
    let src_vol = Arc::new(MemVolume::with_data("src", &t0));
    let src = e.attach(src_vol.clone());
    let tgt = e.attach(Arc::new(MemVolume::new("tgt", SIZE)));
    let id = e.establish(&SessionSpec::whole(src, tgt)).unwrap();
    let img = e.image(id).unwrap();
    assert_eq!(img.id(), id);
    assert!(both(&e, &img, id) == t0, "uncopied image is not T0");

    // Copy-before-write on some grains; the image still reads T0 (now partly from the target).
    for off in [0u64, 65_536 * 3 + 100, 2 << 20] {
        e.write(src, off, &[0xee; 5000]).unwrap();
    }
    assert!(both(&e, &img, id) == t0, "image changed by source writes");

    // The source is attached again (as a reset does): the handle falls back to a fresh lookup.
    e.attach(src_vol.clone());
    assert!(both(&e, &img, id) == t0, "image wrong after re-attach");

    // Copy everything: the session completes and reads come from the target only.
    while e
        .copy_batch(id, timezero::GrainIndex(0), timezero::GrainCount(64))
        .unwrap()
        .is_some()
    {}
    e.complete_if_done(id).unwrap();
    assert!(both(&e, &img, id) == t0, "completed image is not T0");

    // Out of range and withdrawn: typed errors, as read_image gives.
    let mut buf = [0u8; 16];
    assert!(matches!(
        img.read_at(SIZE as u64 - 8, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    let tgt2 = e.attach(Arc::new(MemVolume::new("tgt2", SIZE)));
    let id2 = e.establish(&SessionSpec::whole(src, tgt2)).unwrap();
    let img2 = e.image(id2).unwrap();
    img2.read_at(0, &mut buf).unwrap();
    e.withdraw(id2).unwrap();
    assert!(matches!(
        img2.read_at(0, &mut buf),
        Err(Error::NotActive { .. })
    ));
    assert!(matches!(
        e.image(SessionId(99)),
        Err(Error::UnknownSession(_))
    ));
}

/// A source volume that, on the first read made by the image reader's thread, stops until
/// told to go on: a deterministic copy-before-write between the reader's bit test and its
/// source read.
#[derive(Debug)]
struct PausingSource {
    inner: MemVolume,
    reader: std::sync::Mutex<Option<std::thread::ThreadId>>,
    in_read: std::sync::Barrier,
    go: std::sync::Barrier,
}

impl timezero::Volume for PausingSource {
    fn info(&self) -> timezero::VolumeInfo {
        self.inner.info()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> timezero::Result<()> {
        let me = std::thread::current().id();
        let pause = {
            let mut r = self.reader.lock().unwrap();
            if *r == Some(me) {
                *r = None; // only once
                true
            } else {
                false
            }
        };
        if pause {
            self.in_read.wait();
            self.go.wait();
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> timezero::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> timezero::Result<()> {
        self.inner.flush()
    }
}

/// A no-copy session over a [`PausingSource`] holding `t0`, and a reader thread that reads `len`
/// bytes of the image at `off` (through an opened `Image` when `opened`) and stops inside its
/// source read; returns once it is stopped there. Let it go on with `src.go.wait()`.
struct Race {
    e: Arc<timezero::Engine>,
    src_vol: Arc<PausingSource>,
    src: timezero::VolumeId,
    id: SessionId,
    reader: std::thread::JoinHandle<timezero::Result<Vec<u8>>>,
}

fn race(t0: &[u8], off: u64, len: usize, opened: bool) -> Race {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = Arc::new(common::create(&storage, opts));
    let src_vol = Arc::new(PausingSource {
        inner: MemVolume::with_data("src", t0),
        reader: std::sync::Mutex::new(None),
        in_read: std::sync::Barrier::new(2),
        go: std::sync::Barrier::new(2),
    });
    let src = e.attach(src_vol.clone());
    let tgt = e.attach(Arc::new(MemVolume::new("tgt", SIZE)));
    let id = e.establish(&SessionSpec::whole(src, tgt)).unwrap();
    let reader = {
        let e = e.clone();
        let src_vol = src_vol.clone();
        std::thread::spawn(move || {
            *src_vol.reader.lock().unwrap() = Some(std::thread::current().id());
            let mut b = vec![0u8; len];
            if opened {
                e.image(id)?.read_at(off, &mut b)?;
            } else {
                e.read_image(id, off, &mut b)?;
            }
            Ok(b)
        })
    };
    src_vol.in_read.wait();
    Race {
        e,
        src_vol,
        src,
        id,
        reader,
    }
}

/// The lock-free read of an uncopied grain is re-checked: when the grain was copied and the
/// source overwritten between the bit test and the source read, the read is done again and
/// returns T0 (from the target). Checked for a read within one grain (the specialised path)
/// and for one across two grains (the general path).
#[test]
fn lock_free_read_racing_copy_before_write_returns_t0() {
    for (off, len) in [(65_536u64, 4096usize), (65_536 - 4096, 8192)] {
        let t0 = common::pattern(5, SIZE);
        let r = race(&t0, off, len, true);
        // The reader has tested the bit (clear) and is reading the source: copy the grain at
        // 64 KiB and overwrite the source under it.
        r.e.write(r.src, 65_536, &[0x77; 4096]).unwrap();
        r.src_vol.go.wait();
        let b = r.reader.join().unwrap().unwrap();
        let at = usize::try_from(off).unwrap();
        assert!(
            b[..] == t0[at..at + len],
            "a lock-free image read of {len} bytes at {off} returned bytes written after T0"
        );
    }
}

/// A session withdrawn while an image read of an uncopied grain is in its source read: source
/// writes no longer copy first, so the read must not return whatever the source now holds as
/// the image. It returns `NotActive` (before, the retry under the grain lock returned the new
/// source bytes).
#[test]
fn read_racing_withdraw_and_source_write_is_not_active() {
    for (off, len) in [(131_072u64, 4096usize), (131_072 - 4096, 8192)] {
        let t0 = common::pattern(6, SIZE);
        let r = race(&t0, off, len, false);
        r.e.withdraw(r.id).unwrap();
        r.e.write(r.src, 131_072, &[0x55; 4096]).unwrap();
        r.src_vol.go.wait();
        let at = usize::try_from(off).unwrap();
        match r.reader.join().unwrap() {
            Err(Error::NotActive { .. }) => {}
            Ok(b) => assert!(
                b[..] == t0[at..at + len],
                "a read racing a withdraw returned post-T0 bytes as the image"
            ),
            Err(other) => panic!("unexpected error {other}"),
        }
    }
}
