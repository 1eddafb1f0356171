//! Per-request cost of the two file backends, side by side: `FileVolume` (pread/pwrite) and
//! `UringVolume` (io_uring), on one 256 MiB file in /var/tmp, buffered or with `O_DIRECT`.
//!
//! `cargo run --release --example backend_probe [direct]`
//!
//! For 4 KiB and 1 MiB random reads and writes at 1 and 8 threads, prints the median of five
//! interleaved rounds (microseconds per request, per thread) and the io_uring / pread ratio;
//! then a 4 KiB write followed by a flush. Figures: docs/benchmarks.md.

use std::sync::Arc;
use std::time::Instant;

use timezero::{FileVolume, FileVolumeOptions, UringVolume, Volume};

const SIZE: u64 = 256 << 20;

/// An aligned buffer of `len` bytes (`O_DIRECT` takes it without a bounce).
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let raw = vec![7u8; len + 4096];
        let start = raw.as_ptr().align_offset(4096);
        Aligned { raw, start, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Microseconds per request of `n` random requests of `len` bytes by each of `threads` threads.
fn run(v: &Arc<dyn Volume>, threads: usize, len: usize, write: bool, n: usize) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..threads {
            let v = Arc::clone(v);
            s.spawn(move || {
                let mut buf = Aligned::new(len);
                let mut x = (th as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                for _ in 0..n {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (SIZE / len as u64)) * len as u64;
                    let r = if write {
                        v.write_at(off, buf.get())
                    } else {
                        v.read_at(off, buf.get())
                    };
                    r.expect("transfer");
                }
            });
        }
    });
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let direct = std::env::args().any(|a| a == "direct");
    let dir = tempfile::Builder::new()
        .prefix("timezero-probe-")
        .tempdir_in("/var/tmp")
        .expect("temporary directory in /var/tmp");
    let path = dir.path().join("vol");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).expect("create");
        let chunk = vec![3u8; 1 << 20];
        for _ in 0..SIZE >> 20 {
            f.write_all(&chunk).expect("fill");
        }
        f.sync_all().expect("sync");
    }
    let o = FileVolumeOptions {
        direct,
        read_only: false,
    };
    let p: Arc<dyn Volume> = Arc::new(FileVolume::open(&path, &o).expect("open pread"));
    let u: Arc<dyn Volume> = Arc::new(UringVolume::open(&path, &o).expect("open io_uring"));
    for (len, n) in [(4096usize, 5000usize), (1 << 20, 50)] {
        for write in [false, true] {
            for threads in [1usize, 8] {
                let (mut rp, mut ru) = (Vec::new(), Vec::new());
                for _ in 0..5 {
                    rp.push(run(&p, threads, len, write, n));
                    ru.push(run(&u, threads, len, write, n));
                }
                let (a, b) = (median(rp), median(ru));
                println!(
                    "direct={direct} {} {len} B x{threads} threads: pread {a:.2} us, \
                     io_uring {b:.2} us, ratio {:.2}",
                    if write { "write" } else { "read" },
                    b / a
                );
            }
        }
    }
    let block = Aligned::new(4096);
    let (mut rp, mut ru) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        for (v, out) in [(&p, &mut rp), (&u, &mut ru)] {
            let t = Instant::now();
            for _ in 0..50 {
                v.write_at(0, &block.raw[block.start..block.start + 4096])
                    .expect("write");
                v.flush().expect("flush");
            }
            out.push(t.elapsed().as_secs_f64() * 1e6 / 50.0);
        }
    }
    let (a, b) = (median(rp), median(ru));
    println!(
        "direct={direct} write 4096 B + flush x1: pread {a:.0} us, io_uring {b:.0} us, ratio {:.2}",
        b / a
    );
}
