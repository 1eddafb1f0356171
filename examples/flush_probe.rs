//! Do two durability points on two files of one device overlap? The question behind the
//! first-write floor: a checked copy-before-write makes the target's grain and the table's copy
//! record durable side by side, and only overlapping flushes make that cheaper than two flushes
//! in a row.
//!
//! `cargo run --release --example flush_probe [DIR]` (default DIR: /var/tmp)
//!
//! Two 1 MiB files in DIR. Per round, three ways of making 4 KiB writes durable, each timed
//! over 400 operations: `single` (write + `fdatasync` on one file), `serial` (the same on file
//! A, then on file B) and `parallel` (A on this thread while B runs on a second thread, both
//! waiting for each other before the next operation). Prints microseconds per operation and
//! `parallel / single`: 1.0 when the two flushes overlap completely, 2.0 when the device
//! serves them one after the other. Figures: docs/benchmarks.md.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Instant;

const OPS: usize = 400;
const ROUNDS: usize = 5;

fn open(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // Written and synced once, so every later write overwrites allocated, written blocks (no
    // metadata in the measured flushes).
    f.write_all_at(&vec![7u8; 1 << 20], 0)?;
    f.sync_all()?;
    Ok(f)
}

/// One 4 KiB write at slot `i` and a `fdatasync`.
fn durable_write(f: &File, buf: &[u8], i: usize) -> std::io::Result<()> {
    f.write_all_at(buf, (i % 256 * 4096) as u64)?;
    f.sync_data()
}

fn per_op(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() / OPS as f64 * 1e6
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/var/tmp".into()));
    let (pa, pb) = (dir.join("flush_probe.a"), dir.join("flush_probe.b"));
    let a = open(&pa)?;
    let b = Arc::new(open(&pb)?);
    let buf = vec![1u8; 4096];
    // The second thread: per operation, wait at `go`, write and flush B, wait at `done`.
    let go = Arc::new(Barrier::new(2));
    let done = Arc::new(Barrier::new(2));
    let helper = {
        let (b, go, done) = (Arc::clone(&b), Arc::clone(&go), Arc::clone(&done));
        std::thread::spawn(move || -> std::io::Result<()> {
            let buf = vec![2u8; 4096];
            for i in 0..ROUNDS * OPS {
                go.wait();
                let r = durable_write(&b, &buf, i);
                done.wait();
                r?;
            }
            Ok(())
        })
    };
    println!("round  single us  serial us  parallel us  parallel/single");
    for round in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..OPS {
            durable_write(&a, &buf, i)?;
        }
        let single = per_op(t);
        let t = Instant::now();
        for i in 0..OPS {
            durable_write(&a, &buf, i)?;
            durable_write(&b, &buf, i)?;
        }
        let serial = per_op(t);
        let t = Instant::now();
        for i in 0..OPS {
            go.wait();
            let r = durable_write(&a, &buf, i);
            done.wait();
            r?;
        }
        let parallel = per_op(t);
        println!(
            "{round:>5}  {single:>9.0}  {serial:>9.0}  {parallel:>11.0}  {:>15.2}",
            parallel / single
        );
    }
    helper
        .join()
        .map_err(|_| std::io::Error::other("the helper thread panicked"))??;
    std::fs::remove_file(pa)?;
    std::fs::remove_file(pb)?;
    Ok(())
}
