//! Timing primitives: operations run on threads with every latency kept, the engine and raw
//! sides of a figure run in the order a round prescribes (or interleaved in slices), and the
//! raw file-to-file copy.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use super::figures::Figure;
use super::files::{io_err, open_direct};
use super::{COPY_CHUNK, DIRECT_ALIGN, IO};
use crate::{Error, Result};

/// Operations per second and every operation's latency in ns.
pub(super) type Measured = Result<(f64, Vec<u64>)>;

/// Run `ops` operations on `threads` threads (operation `i` on thread `i % threads`); returns
/// operations per second and every latency.
pub(super) fn run_ops<F>(threads: usize, ops: usize, f: F) -> Measured
where
    F: Fn(usize, &mut [u8]) -> Result<()> + Sync,
{
    let start = Instant::now();
    let results: Vec<Result<Vec<u64>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                sc.spawn(move || {
                    let mut buf = vec![0x5au8; IO];
                    let mut lat = Vec::with_capacity(ops / threads + 1);
                    let mut i = t;
                    while i < ops {
                        let t0 = Instant::now();
                        f(i, &mut buf)?;
                        lat.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
                        i += threads;
                    }
                    Ok(lat)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("bench", "worker thread panicked")))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut all = Vec::with_capacity(ops);
    for r in results {
        all.extend(r?);
    }
    Ok((ops as f64 / secs, all))
}

/// A pseudo-random 4 KiB-aligned offset for operation `i` within `size`.
pub(super) fn rand_off(i: usize, size: u64, salt: u64) -> u64 {
    let mut x = (i as u64 ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    (x % (size / IO as u64)) * IO as u64
}

/// Measure the engine and raw sides of a figure in the order this round prescribes.
pub(super) fn pair(
    raw_first: bool,
    figs: &mut [Figure],
    i: usize,
    eng: impl FnOnce() -> Measured,
    raw: impl FnOnce() -> Measured,
) -> Result<()> {
    let (ev, rv) = if raw_first {
        let rv = raw()?;
        (eng()?, rv)
    } else {
        let ev = eng()?;
        (ev, raw()?)
    };
    figs[i].engine.record(ev);
    figs[i].raw.record(rv);
    Ok(())
}

/// Single-threaded figures whose per-operation cost is a few microseconds: engine and raw
/// alternate in this many slices per round (each side's rate is its total operations over its
/// total time), so that a burst of load from a neighbour hits both sides alike.
const SLICES: usize = 10;

/// Like [`pair`] for one thread, but interleaved in [`SLICES`] slices of `ops / SLICES`
/// operations; operation indices stay distinct across slices.
pub(super) fn pair_sliced<E, R>(
    raw_first: bool,
    figs: &mut [Figure],
    i: usize,
    ops: usize,
    eng: E,
    raw: R,
) -> Result<()>
where
    E: Fn(usize, &mut [u8]) -> Result<()> + Sync,
    R: Fn(usize, &mut [u8]) -> Result<()> + Sync,
{
    let per = (ops / SLICES).max(1);
    let (mut e_secs, mut r_secs) = (0.0f64, 0.0f64);
    let (mut e_lat, mut r_lat) = (Vec::new(), Vec::new());
    for k in 0..SLICES {
        let base = k * per;
        let e_run = || run_ops(1, per, |j, b| eng(base + j, b));
        let r_run = || run_ops(1, per, |j, b| raw(base + j, b));
        let ((er, el), (rr, rl)) = if (k % 2 == 0) == raw_first {
            let r = r_run()?;
            (e_run()?, r)
        } else {
            let e = e_run()?;
            (e, r_run()?)
        };
        e_secs += per as f64 / er;
        r_secs += per as f64 / rr;
        e_lat.extend(el);
        r_lat.extend(rl);
    }
    let total = (per * SLICES) as f64;
    figs[i].engine.record((total / e_secs, e_lat));
    figs[i].raw.record((total / r_secs, r_lat));
    Ok(())
}

/// Raw file-to-file copy in 1 MiB chunks (O_DIRECT when possible), made durable at the end.
/// Returns bytes per second and whether O_DIRECT was used.
pub(super) fn raw_copy(from: &Path, to: &Path, size: u64) -> Result<(f64, bool)> {
    let (src, d1) = open_direct(from, false)?;
    let (dst, d2) = open_direct(to, true)?;
    let mut v = vec![0u8; COPY_CHUNK + DIRECT_ALIGN];
    let a = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let buf = &mut v[a..a + COPY_CHUNK];
    let start = Instant::now();
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
        src.read_exact_at(&mut buf[..n], off)
            .map_err(|e| io_err("read", from, e))?;
        dst.write_all_at(&buf[..n], off)
            .map_err(|e| io_err("write", to, e))?;
        off += n as u64;
    }
    dst.sync_data().map_err(|e| io_err("fdatasync", to, e))?;
    Ok((size as f64 / start.elapsed().as_secs_f64(), d1 && d2))
}
