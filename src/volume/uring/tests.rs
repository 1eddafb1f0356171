//! Tests of the io_uring backend: transfers at odd offsets and from many threads, `O_DIRECT`
//! bounces through the registered buffer, and the fallback to plain system calls.

use std::sync::Arc;

use super::*;
use crate::volume::aligned::AlignedBuf;

fn unavailable() -> bool {
    if uring_available() {
        false
    } else {
        eprintln!("io_uring is not available here; skipping");
        true
    }
}

fn fixture(size: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vol");
    std::fs::write(&path, vec![0u8; size]).expect("create");
    (dir, path)
}

/// Shrink the 16 KiB file behind `v` to 8 KiB and read across the new end of file: the read
/// fails with an `UnexpectedEof` I/O error.
fn shrink_and_read_past_eof(v: &UringVolume, path: &Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(8192))
        .expect("truncate");
    let mut buf = vec![0u8; 200];
    match v.read_at(8192 - 100, &mut buf) {
        Err(Error::Io {
            op: "read", source, ..
        }) => assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof),
        other => panic!("expected an UnexpectedEof I/O error, got {other:?}"),
    }
}

/// A file of `len` bytes of `pattern(seed, len)`, and those bytes.
fn patterned(seed: u64, len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let (dir, path) = fixture(0);
    let bytes = pattern(seed, len);
    std::fs::write(&path, &bytes).expect("fill");
    (dir, path, bytes)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8)
        .collect()
}

#[test]
fn roundtrip_at_odd_offsets() {
    if unavailable() {
        return;
    }
    let (_dir, path) = fixture(1 << 20);
    let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
    assert_eq!(v.size(), 1 << 20);
    let meta = std::fs::metadata(&path).expect("stat");
    assert_eq!(v.info().id, VolumeId::from_parts(meta.dev(), meta.ino()));
    assert_eq!(
        v.info().locator,
        std::fs::canonicalize(&path)
            .expect("canon")
            .display()
            .to_string()
    );
    for (i, &(off, len)) in [
        (1u64, 1usize),
        (4097, 1000),
        (12345, 70000),
        (1_048_000, 576),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(i as u64 + 1, len);
        v.write_at(off, &data).expect("write");
        let mut back = vec![0u8; len];
        v.read_at(off, &mut back).expect("read");
        assert_eq!(back, data, "offset {off}");
    }
    v.flush().expect("flush");
    let on_disk = std::fs::read(&path).expect("read file");
    assert_eq!(&on_disk[4097..5097], &pattern(2, 1000)[..]);
    let mut empty = [0u8; 0];
    v.read_at(1 << 20, &mut empty).expect("empty read at end");
}

#[test]
fn concurrent_writers_disjoint_ranges() {
    if unavailable() {
        return;
    }
    const THREADS: u64 = 8;
    const CHUNK: usize = 3001;
    const PER_THREAD: u64 = 64;
    let size = (THREADS * PER_THREAD) as usize * CHUNK;
    let (_dir, path) = fixture(size);
    let v = Arc::new(UringVolume::open(&path, &FileVolumeOptions::default()).expect("open"));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let v = Arc::clone(&v);
            s.spawn(move || {
                for k in 0..PER_THREAD {
                    let idx = k * THREADS + t;
                    let data = pattern(idx, CHUNK);
                    v.write_at(idx * CHUNK as u64, &data).expect("write");
                    if k % 16 == 0 {
                        v.flush().expect("flush");
                    }
                    let mut back = vec![0u8; CHUNK];
                    v.read_at(idx * CHUNK as u64, &mut back).expect("read");
                    assert_eq!(back, data);
                }
            });
        }
    });
    v.flush().expect("flush");
    let on_disk = std::fs::read(&path).expect("read file");
    for idx in 0..THREADS * PER_THREAD {
        let mut back = vec![0u8; CHUNK];
        v.read_at(idx * CHUNK as u64, &mut back).expect("read");
        let want = pattern(idx, CHUNK);
        assert_eq!(back, want, "chunk {idx}");
        let at = idx as usize * CHUNK;
        assert_eq!(&on_disk[at..at + CHUNK], &want[..], "chunk {idx} on disk");
    }
}

#[test]
fn out_of_range_is_an_error() {
    if unavailable() {
        return;
    }
    let (_dir, path) = fixture(8192);
    let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
    let mut buf = [0u8; 20];
    assert!(matches!(
        v.read_at(8180, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write_at(8190, &buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        v.read_at(u64::MAX - 5, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write_at(u64::MAX, &buf),
        Err(Error::OutOfRange { .. })
    ));
    v.read_at(8172, &mut buf).expect("last bytes are readable");
}

#[test]
fn direct_roundtrip_unaligned() {
    if unavailable() {
        return;
    }
    let (_dir, path) = fixture(64 * 1024);
    let opts = FileVolumeOptions {
        direct: true,
        read_only: false,
    };
    let v = match UringVolume::open(&path, &opts) {
        Ok(v) => v,
        Err(Error::Io {
            op: "open", source, ..
        }) if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            eprintln!("O_DIRECT not supported by this file system; skipping");
            return;
        }
        Err(e) => panic!("open: {e}"),
    };
    // Unaligned offset, length and (most likely) buffer address.
    let data = pattern(9, 10_000);
    v.write_at(4097, &data[1..]).expect("write");
    let mut back = vec![0u8; 9_999];
    v.read_at(4097, &mut back).expect("read");
    assert_eq!(back, data[1..]);
    // Aligned request through an aligned buffer takes the direct path.
    let mut aligned = AlignedBuf::new(8192);
    aligned.get_mut().copy_from_slice(&pattern(3, 8192));
    v.write_at(16384, aligned.get()).expect("aligned write");
    let mut back = AlignedBuf::new(8192);
    v.read_at(16384, back.get_mut()).expect("aligned read");
    assert_eq!(back.get(), aligned.get());
    v.flush().expect("flush");
    drop(v);
    let on_disk = std::fs::read(&path).expect("read file");
    assert_eq!(&on_disk[4097..4097 + 9_999], &data[1..]);
    assert!(
        on_disk[..4097].iter().all(|&b| b == 0),
        "bytes before the write untouched"
    );
    assert_eq!(&on_disk[16384..16384 + 8192], aligned.get());
}

/// Open `path` with `O_DIRECT` (with or without registered buffers); `None` (after a
/// message) when the file system refuses `O_DIRECT`.
fn open_direct(path: &Path, pool: bool) -> Option<UringVolume> {
    open_direct_with(path, pool, true)
}

/// [`open_direct`], sending every transfer through the ring when `everywhere`, only those
/// using the registered buffer otherwise (`open_registered_only`).
fn open_direct_with(path: &Path, pool: bool, everywhere: bool) -> Option<UringVolume> {
    let opts = FileVolumeOptions {
        direct: true,
        read_only: false,
    };
    match UringVolume::open_with(path, &opts, pool, everywhere) {
        Ok(v) => Some(v),
        Err(Error::Io {
            op: "open", source, ..
        }) if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            eprintln!("O_DIRECT not supported by this file system; skipping");
            None
        }
        Err(e) => panic!("open: {e}"),
    }
}

/// Whether the calling thread's ring has its registered buffer (registering it now if it
/// was never tried); `false` when the kernel refused.
fn registers_here() -> bool {
    with_ring(|r| r.is_some_and(LocalRing::fixed_buffer))
}

/// The calling thread's registered buffer is not held by any transfer (no lease leaked).
fn no_lease_outstanding() -> bool {
    RING.with(|c| !matches!(&*c.borrow(), Some(r) if r.fixed_leased()))
}

/// A buffer of `len` bytes starting one byte past an aligned address, so that even requests
/// at aligned offsets with aligned lengths are bounced.
fn misaligned(len: usize) -> (AlignedBuf, usize) {
    (AlignedBuf::new(len + 1), 1)
}

#[test]
fn direct_fixed_buffers_roundtrip() {
    if unavailable() {
        return;
    }
    const SIZE: usize = 2 << 20;
    let (_dir, path, mut model) = patterned(77, SIZE);
    let Some(v) = open_direct(&path, true) else {
        return;
    };
    if !registers_here() {
        eprintln!("the kernel refused to register buffers; skipping");
        return;
    }
    let edge = FIXED_BUF_BYTES as u64;
    // (offset, length, whether the aligned span fits in one registered buffer)
    let cases: [(u64, usize, bool); 10] = [
        (1, 100, true),                                       // file start
        (0, 5000, true),                                      // aligned offset, odd length
        (4095, 2, true),                                      // straddles a sector boundary
        (700_001, 10_000, true),                              // middle
        (8191, 250_000, true),                                // just below the buffer size
        (4097, FIXED_BUF_BYTES - 2, true),                    // span exactly one buffer
        (4097, FIXED_BUF_BYTES, false),                       // span one sector more
        (12_345, 3 * FIXED_BUF_BYTES + 7, false),             // well above
        (SIZE as u64 - 777, 777, true),                       // file end
        (SIZE as u64 - edge - 1, FIXED_BUF_BYTES + 1, false), // tail, above the buffer size
    ];
    for (i, &(off, len, fits)) in cases.iter().enumerate() {
        let at = usize::try_from(off).expect("offset");
        // Reads of what is on disk first.
        let before = v.fixed_requests();
        let mut back = vec![0u8; len];
        v.read_at(off, &mut back).expect("read");
        assert!(back == model[at..at + len], "read case {i} ({off}, {len})");
        let used = v.fixed_requests() - before;
        assert_eq!(used > 0, fits, "read case {i}: {used} fixed requests");
        // Then a write (read-modify-write at the edges) and a read back.
        let data = pattern(i as u64 + 100, len);
        let before = v.fixed_requests();
        v.write_at(off, &data).expect("write");
        let used = v.fixed_requests() - before;
        assert_eq!(used > 0, fits, "write case {i}: {used} fixed requests");
        model[at..at + len].copy_from_slice(&data);
        v.read_at(off, &mut back).expect("read back");
        assert!(back == data, "read back case {i} ({off}, {len})");
    }
    // An aligned offset and length from a misaligned address is bounced too.
    let (mut raw, skew) = misaligned(8192);
    let before = v.fixed_requests();
    v.read_at(16384, &mut raw.get_mut()[skew..]).expect("read");
    assert!(raw.get()[skew..] == model[16384..16384 + 8192]);
    assert_eq!(v.fixed_requests() - before, 1, "one READ_FIXED, no RMW");
    // Aligned transfers from aligned buffers never use the pool.
    let mut aligned = AlignedBuf::new(8192);
    let before = v.fixed_requests();
    v.read_at(16384, aligned.get_mut()).expect("aligned read");
    v.write_at(16384, aligned.get()).expect("aligned write");
    assert_eq!(v.fixed_requests(), before);
    assert!(no_lease_outstanding());
    v.flush().expect("flush");
    drop(v);
    let on_disk = std::fs::read(&path).expect("read file");
    assert!(on_disk == model, "file contents differ from the model");
}

#[test]
fn direct_tail_read_of_unaligned_file_uses_fixed_buffer() {
    if unavailable() {
        return;
    }
    // The last sector is partial: the aligned span reaches past the end of the file.
    let size = (1 << 20) + 1234;
    let (_dir, path, data) = patterned(5, size);
    let Some(v) = open_direct(&path, true) else {
        return;
    };
    if !registers_here() {
        eprintln!("the kernel refused to register buffers; skipping");
        return;
    }
    let mut back = vec![0u8; 3000];
    v.read_at(size as u64 - 3000, &mut back).expect("tail read");
    assert!(back == data[size - 3000..]);
    // A short READ_FIXED up to the end of file, then one that finds the end.
    assert!(v.fixed_requests() > 0);
    assert!(no_lease_outstanding());
}

#[test]
fn direct_fixed_pool_under_many_threads() {
    if unavailable() {
        return;
    }
    // 12 threads, each with its own ring and registered buffer; leases must never leak and
    // bytes must land exactly. Each thread's range starts and ends
    // inside its own sectors (unaligned writes read-modify-write whole sectors, so threads
    // sharing a sector would race by design).
    const THREADS: u64 = 12;
    const CHUNK: usize = 3 * 4096 + 513;
    const STRIDE: usize = 5 * 4096;
    const ROUNDS: u64 = 30;
    let (_dir, path) = fixture(THREADS as usize * STRIDE);
    let Some(v) = open_direct(&path, true) else {
        return;
    };
    if !registers_here() {
        eprintln!("the kernel refused to register buffers; skipping");
        return;
    }
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let v = &v;
            s.spawn(move || {
                let at = 100 + t * STRIDE as u64;
                for r in 0..ROUNDS {
                    let data = pattern(t * 1000 + r, CHUNK);
                    v.write_at(at, &data).expect("write");
                    let mut back = vec![0u8; CHUNK];
                    v.read_at(at, &mut back).expect("read");
                    assert!(back == data, "thread {t} round {r}");
                }
                assert!(no_lease_outstanding(), "thread {t} leaked its buffer");
            });
        }
    });
    assert!(v.fixed_requests() > 0, "no registered buffer was ever used");
    assert_eq!(v.fallback_transfers(), 0);
    v.flush().expect("flush");
    drop(v);
    let on_disk = std::fs::read(&path).expect("read file");
    for t in 0..THREADS {
        let at = 100 + t as usize * STRIDE;
        assert!(
            on_disk[at..at + CHUNK] == pattern(t * 1000 + ROUNDS - 1, CHUNK)[..],
            "thread {t} on disk"
        );
    }
}

#[test]
fn direct_fixed_buffer_returned_on_error() {
    if unavailable() {
        return;
    }
    let (_dir, path) = fixture(16384);
    let Some(v) = open_direct(&path, true) else {
        return;
    };
    if !registers_here() {
        eprintln!("the kernel refused to register buffers; skipping");
        return;
    }
    // The bounced read hits end of file.
    shrink_and_read_past_eof(&v, &path);
    assert!(v.fixed_requests() > 0);
    assert!(
        no_lease_outstanding(),
        "lease not given back after an error"
    );
}

#[test]
fn no_pool_without_direct_or_when_disabled() {
    if unavailable() {
        return;
    }
    let (_dir, path) = fixture(1 << 20);
    let buffered = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
    let data = pattern(1, 5000);
    buffered.write_at(123, &data).expect("write");
    let mut back = vec![0u8; 5000];
    buffered.read_at(123, &mut back).expect("read");
    assert!(back == data);
    assert_eq!(buffered.fixed_requests(), 0);
    // `open` sends every transfer through the ring; flushes are fdatasync calls.
    buffered.flush().expect("flush");
    assert_eq!(buffered.ring_requests.load(Ordering::Relaxed), 2);
    drop(buffered);
    let Some(v) = open_direct(&path, false) else {
        return;
    };
    let data = pattern(2, 7000);
    v.write_at(8193, &data).expect("write");
    v.read_at(123, &mut back).expect("read");
    assert!(
        back == pattern(1, 5000),
        "buffered write visible to O_DIRECT"
    );
    let mut back = vec![0u8; 7000];
    v.read_at(8193, &mut back).expect("read");
    assert!(back == data);
    assert_eq!(v.fixed_requests(), 0);
}

#[test]
fn read_past_eof_is_an_error() {
    if unavailable() {
        return;
    }
    let (_dir, path) = fixture(16384);
    let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
    // The volume's cached size still says 16384.
    shrink_and_read_past_eof(&v, &path);
    let mut tail = vec![0u8; 100];
    v.read_at(8192 - 100, &mut tail)
        .expect("bytes before EOF still readable");
}

#[test]
fn open_best_picks_uring() {
    let (_dir, path) = fixture(4096);
    let (v, backend) = super::super::open_best(&path, &FileVolumeOptions::default()).expect("open");
    assert_eq!(
        backend,
        if uring_available() {
            "io_uring"
        } else {
            "pread"
        }
    );
    v.write_at(10, b"hello").expect("write");
    let mut back = [0u8; 5];
    v.read_at(10, &mut back).expect("read");
    assert_eq!(&back, b"hello");
    v.flush().expect("flush");
}

thread_local! {
    /// Set by a test: this thread may not create a ring (as if the kernel refused).
    static REFUSE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether ring creation is refused on this thread (tests only; always `false` otherwise).
pub(super) fn rings_refused() -> bool {
    REFUSE.with(std::cell::Cell::get)
}

#[test]
fn every_thread_uses_its_own_ring() {
    if unavailable() {
        return;
    }
    // 24 threads at once, each with a transfer in flight through its own ring; the rings
    // stay with their threads, and no transfer falls back to plain system calls.
    const THREADS: u64 = 24;
    const CHUNK: usize = 4096 + 17;
    const ROUNDS: u64 = 40;
    let (_dir, path) = fixture(THREADS as usize * CHUNK);
    let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let v = &v;
            s.spawn(move || {
                let at = t * CHUNK as u64;
                for r in 0..ROUNDS {
                    let data = pattern(t * 1000 + r, CHUNK);
                    v.write_at(at, &data).expect("write");
                    let mut back = vec![0u8; CHUNK];
                    v.read_at(at, &mut back).expect("read");
                    assert_eq!(back, data);
                    if r % 8 == 0 {
                        v.flush().expect("flush");
                    }
                }
                assert!(RING.with(|c| c.borrow().as_ref().is_some_and(|r| !r.is_broken())));
            });
        }
    });
    assert_eq!(v.fallback_transfers(), 0);
    let on_disk = std::fs::read(&path).expect("read file");
    for t in 0..THREADS {
        let at = t as usize * CHUNK;
        assert!(on_disk[at..at + CHUNK] == pattern(t * 1000 + ROUNDS - 1, CHUNK)[..]);
    }
}

#[test]
fn thread_without_a_ring_falls_back_to_system_calls() {
    if unavailable() {
        return;
    }
    let (_dir, path, mut model) = patterned(21, 1 << 20);
    let buffered = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
    let direct = open_direct(&path, true);
    std::thread::scope(|s| {
        s.spawn(|| {
            // This thread cannot have a ring: every transfer goes through pread/pwrite,
            // unaligned O_DIRECT ones through an allocated bounce buffer.
            REFUSE.with(|r| r.set(true));
            let data = pattern(22, 5000);
            buffered.write_at(777, &data).expect("write");
            model[777..5777].copy_from_slice(&data);
            let mut back = vec![0u8; 5000];
            buffered.read_at(777, &mut back).expect("read");
            assert!(back == data);
            assert_eq!(buffered.fallback_transfers(), 2);
            if let Some(d) = &direct {
                let data = pattern(23, 3000);
                d.write_at(9000, &data).expect("direct write");
                model[9000..12_000].copy_from_slice(&data);
                let mut back = vec![0u8; 3000];
                d.read_at(9000, &mut back).expect("direct read");
                assert!(back == data);
                assert_eq!(d.fallback_transfers(), 2);
                assert_eq!(d.fixed_requests(), 0);
            }
            // A refusal is remembered: no new attempt on this thread.
            REFUSE.with(|r| r.set(false));
            buffered.read_at(777, &mut back).expect("read");
            assert_eq!(buffered.fallback_transfers(), 3);
            assert!(RING.with(|c| c.borrow().is_none()));
        });
    });
    // Another thread gets its ring.
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut back = vec![0u8; 100];
            buffered.read_at(777, &mut back).expect("read");
            assert!(RING.with(|c| c.borrow().is_some()));
        });
    });
    assert_eq!(buffered.fallback_transfers(), 3);
    buffered.flush().expect("flush");
    drop((buffered, direct));
    assert!(std::fs::read(&path).expect("read file") == model);
}

#[test]
fn registered_only_sends_just_the_bounced_transfers_through_the_ring() {
    if unavailable() {
        return;
    }
    let (_dir, path, mut model) = patterned(31, 1 << 20);
    // As `open_registered_only` opens it.
    let Some(v) = open_direct_with(&path, true, false) else {
        return;
    };
    // Aligned: plain system calls.
    let mut aligned = AlignedBuf::new(8192);
    v.read_at(16384, aligned.get_mut()).expect("aligned read");
    assert!(aligned.get() == &model[16384..16384 + 8192]);
    aligned.get_mut().copy_from_slice(&pattern(32, 8192));
    v.write_at(16384, aligned.get()).expect("aligned write");
    model[16384..16384 + 8192].copy_from_slice(aligned.get());
    v.flush().expect("flush");
    assert_eq!(v.ring_requests.load(Ordering::Relaxed), 0);
    // Unaligned and small enough: the registered buffer, through the ring.
    let data = pattern(33, 5000);
    v.write_at(4097, &data).expect("unaligned write");
    model[4097..9097].copy_from_slice(&data);
    let mut back = vec![0u8; 5000];
    v.read_at(4097, &mut back).expect("unaligned read");
    assert!(back == data);
    if registers_here() {
        // Read-modify-write (2) and the read (1).
        assert_eq!(v.fixed_requests(), 3);
        assert_eq!(v.ring_requests.load(Ordering::Relaxed), 3);
    } else {
        assert_eq!(v.ring_requests.load(Ordering::Relaxed), 0);
    }
    // Unaligned but larger than the registered buffer: a bounce buffer and system calls.
    let before = v.ring_requests.load(Ordering::Relaxed);
    let big = pattern(34, FIXED_BUF_BYTES + 10);
    v.write_at(100_001, &big).expect("large unaligned write");
    model[100_001..100_001 + big.len()].copy_from_slice(&big);
    let mut back = vec![0u8; big.len()];
    v.read_at(100_001, &mut back).expect("large unaligned read");
    assert!(back == big);
    assert_eq!(v.ring_requests.load(Ordering::Relaxed), before);
    assert_eq!(v.fallback_transfers(), 0);
    v.flush().expect("flush");
    drop(v);
    assert!(std::fs::read(&path).expect("read file") == model);
}

/// `n` requests of `len` bytes each at a stride of `stride` bytes from `base`.
fn spread(base: u64, n: usize, len: usize, stride: u64) -> Vec<(u64, usize)> {
    (0..n as u64).map(|i| (base + i * stride, len)).collect()
}

/// Read `ranges` of `v` in one `read_many` into aligned buffers.
fn read_ranges(v: &dyn Volume, ranges: &[(u64, usize)]) -> Result<Vec<Vec<u8>>> {
    let mut bufs: Vec<AlignedBuf> = ranges.iter().map(|&(_, l)| AlignedBuf::new(l)).collect();
    let mut reqs: Vec<(u64, &mut [u8])> = ranges
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(o, _), b)| (o, b.get_mut()))
        .collect();
    v.read_many(&mut reqs)?;
    Ok(bufs.iter().map(|b| b.get().to_vec()).collect())
}

/// Write `data[i]` at `ranges[i].0` of `v` in one `write_many`, from aligned buffers.
fn write_ranges(v: &dyn Volume, ranges: &[(u64, usize)], data: &[Vec<u8>]) -> Result<()> {
    let bufs: Vec<AlignedBuf> = data
        .iter()
        .map(|d| {
            let mut b = AlignedBuf::new(d.len());
            b.get_mut().copy_from_slice(d);
            b
        })
        .collect();
    let reqs: Vec<(u64, &[u8])> = ranges
        .iter()
        .zip(bufs.iter())
        .map(|(&(o, _), b)| (o, b.get()))
        .collect();
    v.write_many(&reqs)
}

/// The volumes of one file to compare: the pread backend, io_uring everywhere, and io_uring
/// for bounced transfers only (the engine's default for `O_DIRECT`), buffered or `O_DIRECT`.
fn backends(path: &Path, direct: bool) -> Option<Vec<Box<dyn Volume>>> {
    let opts = FileVolumeOptions {
        direct,
        read_only: false,
    };
    let mut out: Vec<Box<dyn Volume>> = Vec::new();
    if direct {
        out.push(Box::new(open_direct_with(path, true, true)?));
        out.push(Box::new(open_direct_with(path, true, false)?));
    } else {
        out.push(Box::new(UringVolume::open(path, &opts).expect("open")));
        out.push(Box::new(
            UringVolume::open_registered_only(path, &opts).expect("open"),
        ));
    }
    out.push(Box::new(
        crate::volume::FileVolume::open(path, &opts).expect("open"),
    ));
    Some(out)
}

/// Batched reads (more requests than a ring has entries, of several sizes) return exactly
/// what the pread backend reads one request at a time, buffered and `O_DIRECT`.
#[test]
fn batch_01_read_many_matches_pread_buffered_and_direct() {
    if unavailable() {
        return;
    }
    let (_dir, path, bytes) = patterned(31, 4 << 20);
    let n = RING_ENTRIES as usize + 5;
    for direct in [false, true] {
        let Some(vols) = backends(&path, direct) else {
            continue;
        };
        for ranges in [
            spread(0, n, 4096, 64 * 1024),
            spread(8192, n, 128 * 1024, 192 * 1024),
            spread(1 << 20, 3, 1 << 20, 1 << 20),
        ] {
            let want: Vec<Vec<u8>> = ranges
                .iter()
                .map(|&(o, l)| bytes[o as usize..o as usize + l].to_vec())
                .collect();
            for v in &vols {
                let got = read_ranges(v.as_ref(), &ranges).expect("read_many");
                assert!(got == want, "{v:?} (direct {direct}) read other bytes");
            }
        }
    }
}

/// Batched writes land on the file as the pread backend's single writes do: every range
/// holds its data afterwards and the bytes between ranges are untouched, and the io_uring
/// backend sends them through its ring without falling back.
#[test]
fn batch_02_write_many_lands_like_single_writes() {
    if unavailable() {
        return;
    }
    for direct in [false, true] {
        let (_dir, path, mut model) = patterned(32, 4 << 20);
        let Some(vols) = backends(&path, direct) else {
            continue;
        };
        for (k, v) in vols.iter().enumerate() {
            let ranges = spread(k as u64 * 4096, RING_ENTRIES as usize + 3, 8192, 96 * 1024);
            let data: Vec<Vec<u8>> = (0..ranges.len() as u64)
                .map(|i| pattern(100 + i + 40 * k as u64, 8192))
                .collect();
            write_ranges(v.as_ref(), &ranges, &data).expect("write_many");
            for (&(o, l), d) in ranges.iter().zip(&data) {
                model[o as usize..o as usize + l].copy_from_slice(d);
            }
            v.flush().expect("flush");
        }
        let uring = vols[0].as_ref();
        assert!(format!("{uring:?}").contains("fallback_transfers: 0"));
        drop(vols);
        assert!(
            std::fs::read(&path).expect("read") == model,
            "direct {direct}"
        );
    }
}

/// A read that meets the end of the file part-way (the file shrank after it was opened) is
/// sent again for its rest after the short transfer, and then fails with `UnexpectedEof`
/// naming the volume and the offset (io_uring: where the file ends); the requests before it
/// were read.
#[test]
fn batch_03_short_read_at_eof_is_resent_then_fails_with_context() {
    if unavailable() {
        return;
    }
    for direct in [false, true] {
        let (_dir, path, bytes) = patterned(33, 1 << 20);
        let Some(vols) = backends(&path, direct) else {
            continue;
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(512 * 1024))
            .expect("truncate");
        for v in &vols {
            // The third request starts 64 KiB before the new end and asks for 128 KiB.
            let ranges = [(0, 65536), (131_072, 65536), (458_752, 131_072)];
            let mut bufs: Vec<AlignedBuf> =
                ranges.iter().map(|&(_, l)| AlignedBuf::new(l)).collect();
            let mut reqs: Vec<(u64, &mut [u8])> = ranges
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&(o, _), b)| (o, b.get_mut()))
                .collect();
            match v.read_many(&mut reqs) {
                Err(Error::Io {
                    op: "read",
                    target,
                    offset,
                    source,
                }) => {
                    assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof, "{v:?}");
                    // io_uring names where the resent rest starts (the end of the file);
                    // pread, which loops inside one call, the request's offset.
                    let uring = format!("{v:?}").starts_with("UringVolume");
                    assert_eq!(offset, if uring { 524_288 } else { 458_752 }, "{v:?}");
                    assert!(target.ends_with("vol"), "{target}");
                }
                other => panic!("{v:?}: expected an UnexpectedEof I/O error, got {other:?}"),
            }
            assert!(bufs[0].get() == &bytes[..65536]);
            assert!(bufs[2].get()[..65536] == bytes[458_752..524_288]);
        }
    }
}

/// Errors of batched transfers are carried out with their operation, offset and volume: a
/// write batch to a read-only volume fails at its first request with `EBADF`, and a batch
/// reaching past the end of the volume is refused before anything is sent.
#[test]
fn batch_04_errors_carry_operation_offset_and_volume() {
    if unavailable() {
        return;
    }
    let (_dir, path, bytes) = patterned(34, 1 << 20);
    let ro = FileVolumeOptions {
        direct: false,
        read_only: true,
    };
    let vols: Vec<Box<dyn Volume>> = vec![
        Box::new(UringVolume::open(&path, &ro).expect("open")),
        Box::new(UringVolume::open_registered_only(&path, &ro).expect("open")),
        Box::new(crate::volume::FileVolume::open(&path, &ro).expect("open")),
    ];
    for v in &vols {
        let ranges = spread(65536, 4, 4096, 65536);
        let data = vec![vec![9u8; 4096]; 4];
        match write_ranges(v.as_ref(), &ranges, &data) {
            Err(e @ Error::Io { .. }) => {
                let Error::Io {
                    op, offset, source, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(*op, "write");
                assert_eq!(*offset, 65536);
                assert_eq!(
                    source.raw_os_error(),
                    Some(rustix::io::Errno::BADF.raw_os_error()),
                    "{v:?}"
                );
                assert!(e.to_string().contains("at offset 65536"), "{e}");
            }
            other => panic!("{v:?}: expected EBADF, got {other:?}"),
        }
        let past = [(0u64, 4096usize), ((1 << 20) - 4096, 8192)];
        assert!(matches!(
            read_ranges(v.as_ref(), &past),
            Err(Error::OutOfRange { .. })
        ));
    }
    assert!(std::fs::read(&path).expect("read") == bytes);
}

/// A batch with an unaligned request on an `O_DIRECT` volume goes one request at a time
/// (bouncing the unaligned one) and still transfers every range; so does a thread that
/// cannot have a ring.
#[test]
fn batch_05_unaligned_direct_batch_and_ringless_thread_fall_back() {
    if unavailable() {
        return;
    }
    let (_dir, path, mut model) = patterned(35, 1 << 20);
    let Some(v) = open_direct_with(&path, true, false) else {
        return;
    };
    let data = [pattern(1, 4096), pattern(2, 1000)];
    let reqs: [(u64, &[u8]); 2] = [(0, &data[0]), (12_345, &data[1])];
    v.write_many(&reqs).expect("write_many");
    model[..4096].copy_from_slice(&data[0]);
    model[12_345..13_345].copy_from_slice(&data[1]);
    let got = read_ranges(&v, &[(0, 4096), (8192, 8192)]).expect("read_many");
    assert!(got[0] == model[..4096] && got[1] == model[8192..16_384]);
    std::thread::scope(|s| {
        s.spawn(|| {
            REFUSE.with(|r| r.set(true));
            let ranges = spread(65536, 3, 4096, 8192);
            let data: Vec<Vec<u8>> = (0..3).map(|i| pattern(50 + i, 4096)).collect();
            write_ranges(&v, &ranges, &data).expect("write_many without a ring");
            for (&(o, l), d) in ranges.iter().zip(&data) {
                model[o as usize..o as usize + l].copy_from_slice(d);
            }
            assert_eq!(v.fallback_transfers(), 1);
        });
    });
    v.flush().expect("flush");
    drop(v);
    assert!(std::fs::read(&path).expect("read") == model);
}
