//! Criterion micro-benchmarks of the engine's hot paths, all in memory (MemVolume, MemStorage),
//! except the `uring_direct` group, which reads an `O_DIRECT` file in /var/tmp.
//!
//! Run with `cargo bench --bench hot_path`. Figures and their meaning: docs/benchmarks.md.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use timezero::fault::internals::format::{CopyMode, Entry, ExtentSpec};
use timezero::fault::internals::Table;
use timezero::fault::internals::{commit, AtomicBitmap};
use timezero::{Engine, EngineOptions, SessionSpec};
use timezero::{Generation, GrainSize, SessionId, VolumeId};
use timezero::{MemStorage, TableStorage};
use timezero::{MemVolume, Volume, VolumeInfo};

const GRAIN: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

/// A volume that reports `size` bytes, stores nothing and reads zeros: lets a session cover a
/// 1 TiB source without the memory.
#[derive(Debug)]
struct SparseVolume {
    name: String,
    size: u64,
}

impl Volume for SparseVolume {
    fn info(&self) -> VolumeInfo {
        let mut id = [0u8; 16];
        let n = self.name.as_bytes();
        id[..n.len().min(16)].copy_from_slice(&n[..n.len().min(16)]);
        VolumeInfo {
            id: VolumeId(id),
            size: self.size,
            sector_size: 512,
            generation: Generation(0),
            locator: format!("mem:{}", self.name),
        }
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> timezero::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _offset: u64, _buf: &[u8]) -> timezero::Result<()> {
        Ok(())
    }
    fn flush(&self) -> timezero::Result<()> {
        Ok(())
    }
}

fn mem_engine() -> Engine {
    let opts = EngineOptions::default();
    let len = opts.table.layout().expect("layout").file_bytes();
    Engine::create(Arc::new(MemStorage::new("table", len)), opts).expect("create")
}

fn spec(src: VolumeId, tgt: VolumeId, mode: CopyMode, extents: Vec<ExtentSpec>) -> SessionSpec {
    SessionSpec {
        source: src,
        target: tgt,
        extents,
        grain: GrainSize::DEFAULT,
        mode,
        incremental: false,
    }
}

/// An engine with one no-copy session `src -> tgt` over MemVolumes of `size` bytes.
fn engine_with_session(size: u64) -> (Engine, VolumeId, VolumeId, SessionId) {
    let e = mem_engine();
    let src = e.attach(Arc::new(MemVolume::new("src", size as usize)));
    let tgt = e.attach(Arc::new(MemVolume::new("tgt", size as usize)));
    let id = e
        .establish(&spec(src, tgt, CopyMode::NoCopy, Vec::new()))
        .expect("establish");
    (e, src, tgt, id)
}

fn bitmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    let n = 16 << 20; // 1 TiB at a 64 KiB grain
    let b = AtomicBitmap::new(n);
    b.set_range(0, n);
    let mut i = 0u64;
    g.bench_function("all_set/1 grain", |bch| {
        bch.iter(|| {
            i = (i + 7919) % (n - 64);
            black_box(b.all_set(black_box(i), 1))
        })
    });
    g.bench_function("all_set/64 grains unaligned", |bch| {
        bch.iter(|| {
            i = (i + 7919) % (n - 64);
            black_box(b.all_set(black_box(i | 3), 64))
        })
    });
    let c2 = AtomicBitmap::new(n);
    g.bench_function("set_range/16 grains", |bch| {
        bch.iter(|| {
            i = (i + 7919) % (n - 64);
            black_box(c2.set_range(black_box(i), 16))
        })
    });
    g.finish();
}

/// Record every grain of a session over `size` bytes as copied (the session stays active).
fn mark_all_copied(e: &Engine, id: SessionId, size: u64) {
    commit(
        e.table(),
        vec![Entry::SetBits {
            session: id,
            start: 0,
            count: size / GRAIN,
        }],
    )
    .expect("commit");
}

fn writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("write");
    let data = vec![0xabu8; 4096];
    let size = 64 * MIB;

    // Uncovered: the session covers the first half; writes land in the second half.
    {
        let e = mem_engine();
        let src = e.attach(Arc::new(MemVolume::new("src", size as usize)));
        let tgt = e.attach(Arc::new(MemVolume::new("tgt", size as usize)));
        let ext = vec![ExtentSpec {
            source_offset: 0,
            target_offset: 0,
            len: size / 2,
        }];
        e.establish(&spec(src, tgt, CopyMode::NoCopy, ext))
            .expect("establish");
        let mut off = 0u64;
        g.bench_function("uncovered 4KiB (1 session on the volume)", |b| {
            b.iter(|| {
                off = (off + 4096 * 37) % (size / 2);
                e.write(src, size / 2 + off, &data).expect("write")
            })
        });
    }

    // Already copied: every bit set, session still active.
    {
        let (e, src, _tgt, id) = engine_with_session(size);
        mark_all_copied(&e, id, size);
        let mut off = 0u64;
        g.bench_function("already copied 4KiB", |b| {
            b.iter(|| {
                off = (off + 4096 * 37) % size;
                e.write(src, off, &data).expect("write")
            })
        });
    }

    // First write to a grain (copy-before-write); re-establish when every grain is used.
    {
        let (e, src, tgt, mut id) = engine_with_session(size);
        let grains = size / GRAIN;
        let mut next = 0u64;
        g.bench_function("first write 4KiB (copy-before-write, 64KiB grain)", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if next == grains {
                        e.withdraw(id).expect("withdraw");
                        id = e
                            .establish(&spec(src, tgt, CopyMode::NoCopy, Vec::new()))
                            .expect("establish");
                        next = 0;
                    }
                    let t = Instant::now();
                    e.write(src, next * GRAIN, &data).expect("write");
                    total += t.elapsed();
                    next += 1;
                }
                total
            })
        });
    }
    g.finish();
}

/// Image reads on in-memory volumes: the engine's CPU cost per read is the difference between
/// an image read and a direct `read_at` of the same volume.
fn reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("read");
    let size = 64 * MIB;
    let e = mem_engine();
    let src_vol = Arc::new(MemVolume::new("src", size as usize));
    let src = e.attach(src_vol.clone());
    let tgt = e.attach(Arc::new(MemVolume::new("tgt", size as usize)));
    let id = e
        .establish(&spec(src, tgt, CopyMode::NoCopy, Vec::new()))
        .expect("establish");
    let mut buf = vec![0u8; 4096];
    let mut off = 0u64;
    g.bench_function("volume read_at 4KiB (baseline)", |b| {
        b.iter(|| {
            off = (off + 4096 * 37) % size;
            src_vol.read_at(off, black_box(&mut buf)).expect("read")
        })
    });
    g.bench_function("image read 4KiB, uncopied grain", |b| {
        b.iter(|| {
            off = (off + 4096 * 37) % size;
            e.read_image(id, off, black_box(&mut buf)).expect("read")
        })
    });
    mark_all_copied(&e, id, size);
    g.bench_function("image read 4KiB, copied grain", |b| {
        b.iter(|| {
            off = (off + 4096 * 37) % size;
            e.read_image(id, off, black_box(&mut buf)).expect("read")
        })
    });
    g.finish();
}

fn table(c: &mut Criterion) {
    let mut g = c.benchmark_group("table");
    let (e, _src, _tgt, id) = engine_with_session(64 * MIB);
    let mut i = 0u64;
    g.bench_function("commit SetBits (MemStorage)", |b| {
        b.iter(|| {
            i = (i + 1) % 1024;
            commit(
                e.table(),
                vec![Entry::SetBits {
                    session: id,
                    start: i,
                    count: 1,
                }],
            )
            .expect("commit")
        })
    });
    g.finish();
}

/// A table image holding one session over a sparse source of `size` bytes, half copied.
fn table_image(size: u64) -> Vec<u8> {
    let opts = EngineOptions::default();
    let len = opts.table.layout().expect("layout").file_bytes();
    let storage = Arc::new(MemStorage::new("table", len));
    let e = Engine::create(storage.clone(), opts).expect("create");
    let src = e.attach(Arc::new(SparseVolume {
        name: "sparse-src".into(),
        size,
    }));
    let tgt = e.attach(Arc::new(SparseVolume {
        name: "sparse-tgt".into(),
        size,
    }));
    let id = e
        .establish(&spec(src, tgt, CopyMode::Copy, Vec::new()))
        .expect("establish");
    // Half the grains copied, in a few hundred commits, as a background copy would leave them.
    let grains = size / GRAIN;
    let step = (grains / 2 / 256).max(1);
    let mut g = 0;
    while g < grains / 2 {
        commit(
            e.table(),
            vec![Entry::SetBits {
                session: id,
                start: g,
                count: step.min(grains / 2 - g),
            }],
        )
        .expect("commit");
        g += step;
    }
    drop(e);
    storage.snapshot()
}

fn recovery(c: &mut Criterion) {
    let mut g = c.benchmark_group("recovery");
    g.sample_size(20);
    for (name, size) in [
        ("Table::open 1GiB source", 1u64 << 30),
        ("Table::open 64GiB source", 64 << 30),
        ("Table::open 1TiB source", 1 << 40),
    ] {
        let img = table_image(size);
        g.bench_function(name, |b| {
            b.iter_batched(
                || -> Arc<dyn TableStorage> { Arc::new(MemStorage::from_bytes("t", img.clone())) },
                |s| black_box(Table::open(s).expect("open")),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// Unaligned `O_DIRECT` reads through the io_uring volume, with the registered bounce-buffer
/// pool (`READ_FIXED`) and without it (a bounce buffer allocated per call, pages pinned per
/// request). Reads a 64 MiB file of non-zero data in /var/tmp, so every read reaches the device.
#[cfg(feature = "uring")]
fn uring_direct(c: &mut Criterion) {
    use std::io::Write;
    use timezero::{FileVolumeOptions, UringVolume};

    if !timezero::uring_available() {
        eprintln!("uring_direct: io_uring is not available here; skipping");
        return;
    }
    let size = 64 * MIB;
    let dir = tempfile::Builder::new()
        .prefix("timezero-bench-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp");
    let path = dir.path().join("vol");
    {
        let mut f = std::fs::File::create(&path).expect("create");
        let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
        for _ in 0..size / MIB {
            f.write_all(&chunk).expect("fill");
        }
        f.sync_all().expect("sync");
    }
    let opts = FileVolumeOptions {
        direct: true,
        read_only: false,
    };
    let pooled = match UringVolume::open(&path, &opts) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("uring_direct: O_DIRECT refused ({e}); skipping");
            return;
        }
    };
    let plain = UringVolume::open_without_buffer_pool(&path, &opts).expect("open");
    let pread = timezero::FileVolume::open(&path, &opts).expect("open");
    let mut probe = [0u8; 10];
    pooled.read_at(100, &mut probe).expect("read");
    if pooled.fixed_requests() == 0 {
        eprintln!("uring_direct: the kernel refused to register buffers; all figures allocate");
    }
    let mut g = c.benchmark_group("uring_direct");
    for (len, name_len) in [(4096usize, "4KiB"), (128 * 1024, "128KiB")] {
        let mut buf = vec![0u8; len];
        let arms: [(&dyn Volume, &str); 3] = [
            (&pooled, "registered buffers"),
            (&plain, "allocated bounce buffer"),
            (&pread, "pread, reused bounce buffer"),
        ];
        for (v, how) in arms {
            let mut off = 0u64;
            g.bench_function(format!("read_at {name_len} unaligned, {how}"), |b| {
                b.iter(|| {
                    off = (off + 4096 * 37) % (size - 2 * len as u64);
                    v.read_at(off + 100, black_box(&mut buf)).expect("read")
                })
            });
        }
    }
    g.finish();
}

#[cfg(not(feature = "uring"))]
fn uring_direct(_c: &mut Criterion) {}

criterion_group!(
    benches,
    bitmap,
    writes,
    reads,
    table,
    recovery,
    uring_direct
);
criterion_main!(benches);
