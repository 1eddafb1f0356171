//! What would a copy log buy a first write? Three ways to make one copy-before-write durable,
//! on plain files of one device, side by side in one run:
//!
//! * `floor`: the physical floor the `bench` command compares against. Read the grain's 64 KiB
//!   from the source, write them to the target, `fdatasync` the target; write 4 KiB over the
//!   grain in the source, `fdatasync` the source. Two durability points in series.
//! * `checked`: the engine's checked copy-before-write. The target's `fdatasync` on a second
//!   thread while this one writes a 512-byte record to both copies of a journal and syncs it;
//!   then the source write and its `fdatasync`. Two durability points side by side, then one.
//! * `inline`: `checked` with the roles swapped: this thread syncs the target while the second
//!   thread writes and syncs the record, so the longer of the two (the target's, when the
//!   journal is on a faster device) runs without a hand-over to another thread and back.
//! * `log`: a copy log. The grain goes to the target *without* a flush, and the grain with its
//!   record (64 KiB + 512 bytes) is appended to a log file beside the table, which one
//!   `fdatasync` makes durable; then the source write and its `fdatasync`. Every `RETIRE` first
//!   writes the log is retired: the target is synced once and a 512-byte retire record is
//!   synced in the journal, its cost spread over those writes. Recovery would copy a logged
//!   grain whose target bytes do not match the record's CRC back from the log.
//!
//! `cargo run --release --example copy_log_probe [DIR [TABLE_DIR]]` (default DIR: /var/tmp;
//! the journal and the log go to TABLE_DIR when given, e.g. a file system on another device)
//!
//! Per round, each design runs `OPS` first writes on grains of its own (the order of designs
//! rotates per round); prints microseconds per first write and each design's ratio to `floor`.
//! Figures: docs/benchmarks.md.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

const GRAIN: usize = 64 << 10;
const OPS: usize = 256;
const ROUNDS: usize = 5;
const RETIRE: usize = 64;
const RECORD: usize = 512;
/// Grains per file: every design writes fresh grains of its own in each round.
const GRAINS: usize = OPS * ROUNDS * DESIGNS;
/// floor, checked, inline, log.
const DESIGNS: usize = 4;

fn open(path: &Path, len: usize) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // Written and synced once, so every later write overwrites allocated, written blocks (no
    // file-system metadata in the measured flushes).
    let chunk = vec![7u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = chunk.len().min(len - off);
        f.write_all_at(&chunk[..n], off as u64)?;
        off += n;
    }
    f.sync_all()?;
    Ok(f)
}

/// Write a record at `at` in both copies of the journal and sync it.
fn write_record(journal: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    journal.write_all_at(bytes, at)?;
    journal.write_all_at(bytes, at + (1 << 20))?;
    journal.sync_data()
}

struct Files {
    src: File,
    tgt: Arc<File>,
    journal: Arc<File>,
    log: File,
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/var/tmp".into()));
    let meta = std::env::args()
        .nth(2)
        .map_or_else(|| dir.clone(), PathBuf::from);
    let names = ["src", "tgt", "journal", "log"].map(|n| {
        let d = if n == "journal" || n == "log" {
            &meta
        } else {
            &dir
        };
        d.join(format!("copy_log_probe.{n}"))
    });
    let f = Files {
        src: open(&names[0], GRAINS * GRAIN)?,
        tgt: Arc::new(open(&names[1], GRAINS * GRAIN)?),
        journal: Arc::new(open(&names[2], 2 << 20)?),
        log: open(&names[3], RETIRE * (GRAIN + RECORD))?,
    };
    // The second thread of `checked` and `inline`: per operation, wait at `go`, sync the
    // target (`checked`) or write and sync the record at `record` (`inline`), wait at `done`.
    let go = Arc::new(Barrier::new(2));
    let done = Arc::new(Barrier::new(2));
    let record = Arc::new(AtomicU64::new(0));
    let flusher = {
        let (tgt, go, done) = (Arc::clone(&f.tgt), Arc::clone(&go), Arc::clone(&done));
        let (journal, record) = (Arc::clone(&f.journal), Arc::clone(&record));
        std::thread::spawn(move || -> std::io::Result<()> {
            let bytes = vec![3u8; RECORD];
            for _ in 0..ROUNDS * OPS * 2 {
                go.wait();
                let r = match record.load(Ordering::Acquire) {
                    0 => tgt.sync_data(),
                    at => write_record(&journal, &bytes, at - 1),
                };
                done.wait();
                r?;
            }
            Ok(())
        })
    };
    let user = vec![1u8; 4096];
    let mut grain = vec![0u8; GRAIN + RECORD];
    let mut next = 0usize;
    let mut sums = [0f64; DESIGNS];
    let names_of = ["floor", "checked", "inline", "log"];
    println!(
        "round  floor us  checked us  inline us  log us  checked/floor  inline/floor  log/floor"
    );
    for round in 0..ROUNDS {
        let mut us = [0f64; DESIGNS];
        for k in 0..DESIGNS {
            let design = (k + round) % DESIGNS;
            let t = Instant::now();
            for i in 0..OPS {
                let g = next;
                next += 1;
                let off = (g * GRAIN) as u64;
                f.src.read_exact_at(&mut grain[..GRAIN], off)?;
                f.tgt.write_all_at(&grain[..GRAIN], off)?;
                let rec = ((i % 2048) * RECORD) as u64;
                match names_of[design] {
                    "floor" => f.tgt.sync_data()?,
                    "checked" => {
                        record.store(0, Ordering::Release);
                        go.wait();
                        let r = write_record(&f.journal, &grain[..RECORD], rec);
                        done.wait();
                        r?;
                    }
                    "inline" => {
                        record.store(rec + 1, Ordering::Release);
                        go.wait();
                        let r = f.tgt.sync_data();
                        done.wait();
                        r?;
                    }
                    _ => {
                        let slot = (i % RETIRE * (GRAIN + RECORD)) as u64;
                        f.log.write_all_at(&grain, slot)?;
                        f.log.sync_data()?;
                        if i % RETIRE == RETIRE - 1 {
                            f.tgt.sync_data()?;
                            f.journal.write_all_at(&grain[..RECORD], rec)?;
                            f.journal.sync_data()?;
                        }
                    }
                }
                f.src.write_all_at(&user, off)?;
                f.src.sync_data()?;
            }
            us[design] = t.elapsed().as_secs_f64() / OPS as f64 * 1e6;
        }
        for (s, u) in sums.iter_mut().zip(us) {
            *s += u;
        }
        print_row(&format!("{round:>5}"), us);
    }
    print_row("  all", sums.map(|s| s / ROUNDS as f64));
    // The second thread waits for one `go` per `checked` and `inline` operation.
    flusher
        .join()
        .map_err(|_| std::io::Error::other("the flusher thread panicked"))??;
    for n in names {
        std::fs::remove_file(n)?;
    }
    Ok(())
}

/// One line of the table: microseconds per design, then each design's ratio to `floor`.
fn print_row(label: &str, us: [f64; DESIGNS]) {
    println!(
        "{label}  {:>8.0}  {:>10.0}  {:>9.0}  {:>6.0}  {:>13.2}  {:>12.2}  {:>9.2}",
        us[0],
        us[1],
        us[2],
        us[3],
        us[1] / us[0],
        us[2] / us[0],
        us[3] / us[0]
    );
}
