//! Concurrency model of the per-grain protocol (crash-model "How to prove it", item 5), checked
//! with `shuttle` under thousands of random interleavings.
//!
//! What is modelled: one grain of one session, its copied bit, its source and target contents,
//! and four actors running concurrently:
//! - copy-before-write source writer: lock the grain; if the bit is clear, copy old source to
//!   the target and commit the bit while holding the lock; then write the source; unlock;
//! - background copier: `try_hold` the grain; if the bit is still clear, copy source to target
//!   and commit the bit while still holding; release (`Engine::copy_data` + `commit_copied`);
//! - image reader (`Engine::read_image`): if the bit is set read the target; else read the
//!   source without the lock and re-check the bit afterwards: still clear, the value stands;
//!   set meanwhile, read again under the lock (bit set: target, else source);
//! - target writer: lock; complete the grain (copy source to target when the bit is clear); set
//!   the bit; write the target; unlock.
//!
//! Checked: an image read returns T0 unless a target write started before it; the target never
//! ends with non-T0 bytes while the bit is set unless it was target-written (and a target write
//! is never lost); a source write is never issued before the bit is set.
//!
//! Faithful copy, not the engine itself: the engine's `RangeLock` and `Session` use
//! `parking_lot`, which shuttle cannot schedule (a blocked `parking_lot` wait inside a shuttle
//! test blocks the only OS thread), so the lock is a line-for-line copy of `RangeLock` (a mutex
//! over held ranges plus a condition variable) on shuttle primitives, and each bit, volume
//! read and volume write is a shuttle scheduling point.
//!
//! The copier's copy counts as landed only at its commit step (`commit_copied` flushes the
//! target before it records the bit): what the target holds durably is what matters, and a copy
//! in flight must stay under the grain hold until then. The negative control releases the hold
//! before that step (the bug fixed in `Engine::copy_data`/`commit_copied`) and must be caught.
//! A second negative control drops the image reader's re-check after its lock-free source read
//! and must be caught too.
//!
//! Write-back mode has a model of its own (below): two held source writers, the copier, a
//! flusher draining held writes, an image reader and a target writer on one grain; its negative
//! controls look at the copied bit before the pending state (every actor, or the target writer
//! alone) and must be caught.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use shuttle::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use shuttle::sync::{Arc, Condvar, Mutex};
use shuttle::thread;

/// Source bytes at T0.
const T0: u8 = 0;
/// Source bytes after the user's source write.
const S1: u8 = 1;
/// Bytes of the user's target (image) write.
const TW: u8 = 2;
/// Target bytes before anything was copied.
const JUNK: u8 = 9;

/// Copy of the engine's `RangeLock` (src/session/lock.rs) (one grain, so a held flag) on shuttle primitives.
#[derive(Default)]
struct RangeLock {
    held: Mutex<bool>,
    cv: Condvar,
}

impl RangeLock {
    fn lock(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.cv.wait(held).unwrap();
        }
        *held = true;
    }
    fn try_acquire(&self) -> bool {
        let mut held = self.held.lock().unwrap();
        if *held {
            return false;
        }
        *held = true;
        true
    }
    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.cv.notify_all();
    }
}

struct Grain {
    lock: RangeLock,
    bit: AtomicBool,
    source: AtomicU8,
    target: AtomicU8,
    /// Ghost: a target write has started (it may be read from then on).
    target_write_started: AtomicBool,
    /// Ghost: a target write has finished (it must be read from then on).
    target_written: AtomicBool,
    violations: Mutex<Vec<String>>,
}

impl Grain {
    fn new() -> Self {
        Grain {
            lock: RangeLock::default(),
            bit: AtomicBool::new(false),
            source: AtomicU8::new(T0),
            target: AtomicU8::new(JUNK),
            target_write_started: AtomicBool::new(false),
            target_written: AtomicBool::new(false),
            violations: Mutex::new(Vec::new()),
        }
    }
    fn violation(&self, v: String) {
        self.violations.lock().unwrap().push(v);
    }
    fn read_source(&self) -> u8 {
        self.source.load(Ordering::SeqCst)
    }
    fn write_source(&self, v: u8) {
        if !self.bit.load(Ordering::SeqCst) {
            self.violation("source write issued before the grain's bit was set".into());
        }
        self.source.store(v, Ordering::SeqCst);
    }
    fn write_target(&self, v: u8) {
        self.target.store(v, Ordering::SeqCst);
    }
    fn commit_bit(&self) {
        self.bit.store(true, Ordering::SeqCst);
    }
}

/// Copy-before-write source writer.
fn source_writer(g: &Grain) {
    g.lock.lock();
    if !g.bit.load(Ordering::SeqCst) {
        let old = g.read_source();
        g.write_target(old);
        g.commit_bit();
    }
    g.write_source(S1);
    g.lock.release();
}

/// Background copier; `buggy` releases the hold before the copy lands and its bit is committed.
fn copier(g: &Grain, buggy: bool) {
    if !g.lock.try_acquire() {
        return; // held by a writer, which copies the grain itself
    }
    if g.bit.load(Ordering::SeqCst) {
        g.lock.release();
        return;
    }
    let data = g.read_source();
    if buggy {
        g.lock.release();
    }
    // Commit: the copy lands (flush), then the bit is recorded.
    g.write_target(data);
    g.commit_bit();
    if !buggy {
        g.lock.release();
    }
}

/// How the image reader reads an uncopied grain.
#[derive(Clone, Copy, PartialEq)]
enum Reader {
    /// The engine's: lock-free source read, then re-check the bit; fall back to the lock.
    Optimistic,
    /// Negative control: lock-free source read trusted without a re-check.
    NoRecheck,
}

/// Image reader: the value it read, checked against T0 / the target write.
fn image_reader(g: &Grain, mode: Reader) {
    let tw_before = g.target_write_started.load(Ordering::SeqCst);
    let v = if g.bit.load(Ordering::SeqCst) {
        g.target.load(Ordering::SeqCst)
    } else {
        let v = g.read_source();
        if mode == Reader::NoRecheck || !g.bit.load(Ordering::SeqCst) {
            v
        } else {
            g.lock.lock();
            let v = if g.bit.load(Ordering::SeqCst) {
                g.target.load(Ordering::SeqCst)
            } else {
                g.read_source()
            };
            g.lock.release();
            v
        }
    };
    let tw_after = g.target_write_started.load(Ordering::SeqCst);
    let ok = v == T0 || (v == TW && (tw_before || tw_after));
    if !ok {
        g.violation(format!("image read returned {v}, not T0"));
    }
}

/// Target (image) writer.
fn target_writer(g: &Grain) {
    g.lock.lock();
    g.target_write_started.store(true, Ordering::SeqCst);
    if !g.bit.load(Ordering::SeqCst) {
        // Complete the grain: the part not written by the user must hold T0.
        let old = g.read_source();
        g.write_target(old);
    }
    g.commit_bit();
    g.write_target(TW);
    g.target_written.store(true, Ordering::SeqCst);
    g.lock.release();
}

fn final_check(g: &Grain) {
    let t = g.target.load(Ordering::SeqCst);
    if g.bit.load(Ordering::SeqCst) {
        let want = if g.target_written.load(Ordering::SeqCst) {
            TW
        } else {
            T0
        };
        if t != want {
            g.violation(format!("bit set, target ends with {t}, want {want}"));
        }
    }
    let v = g.violations.lock().unwrap().clone();
    assert!(v.is_empty(), "protocol violations: {v:?}");
}

/// One execution: all four actors (two copiers) race on one grain.
fn scenario(buggy: bool, reader: Reader) {
    let g = Arc::new(Grain::new());
    let mut hs = Vec::new();
    for actor in 0..5 {
        let g = g.clone();
        hs.push(thread::spawn(move || match actor {
            0 => source_writer(&g),
            1 | 2 => copier(&g, buggy),
            3 => image_reader(&g, reader),
            _ => target_writer(&g),
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    image_reader(&g, reader);
    final_check(&g);
}

/// Without the target writer: the image must be exactly T0 at the end, whatever ran.
fn scenario_no_target_write(buggy: bool, reader: Reader) {
    let g = Arc::new(Grain::new());
    let mut hs = Vec::new();
    for actor in 0..4 {
        let g = g.clone();
        hs.push(thread::spawn(move || match actor {
            0 => source_writer(&g),
            1 | 2 => copier(&g, buggy),
            _ => image_reader(&g, reader),
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    image_reader(&g, reader);
    final_check(&g);
}

const ITERATIONS: usize = 3000;

#[test]
fn per_grain_protocol_holds() {
    shuttle::check_random(|| scenario(false, Reader::Optimistic), ITERATIONS);
    shuttle::check_random(
        || scenario_no_target_write(false, Reader::Optimistic),
        ITERATIONS,
    );
    shuttle::check_pct(|| scenario(false, Reader::Optimistic), ITERATIONS, 3);
    println!(
        "per-grain protocol: {} random + {ITERATIONS} PCT schedules, no violation",
        2 * ITERATIONS
    );
}

/// Negative control: a copier that releases its hold before its copy lands and its bit is
/// committed must be caught (a target write in the gap is overwritten by the stale copy).
#[test]
fn early_release_is_caught() {
    let r = std::panic::catch_unwind(|| {
        shuttle::check_random(|| scenario(true, Reader::Optimistic), ITERATIONS);
    });
    assert!(r.is_err(), "the checker missed the early-release bug");
}

/// Negative control: an image reader that trusts a lock-free source read without re-checking
/// the bit must be caught (a copy-before-write between its bit test and its read hands it the
/// new source bytes).
#[test]
fn lock_free_read_without_recheck_is_caught() {
    let r = std::panic::catch_unwind(|| {
        shuttle::check_random(
            || scenario_no_target_write(false, Reader::NoRecheck),
            ITERATIONS,
        );
    });
    assert!(
        r.is_err(),
        "the checker missed the unchecked lock-free read"
    );
}

// Write-back mode (src/engine/writeback.rs): source writes are held in memory; a held write
// that needs the grain's T0 bytes copies them to the target at once and leaves the grain
// *pending* (T0 bytes on the target, bit not set); a drain (a flush, or the copier meeting a
// pending grain) sets the bit, stops holding the grain pending, then writes the held source
// writes in order. Modelled: two held writers, a copier, a flusher, an image reader and a
// target (image) writer on one grain. The target writer writes part of the grain: the rest
// (`Grain::target`) must hold T0, which it completes from the source when the grain is neither
// copied nor pending; a drain does not take the grain's lock, so a writer that finds the grain
// pending drains it and starts again (`Engine::held_pending`) rather than trust the bit it
// reads next.

/// Bytes of the second user source write.
const S2: u8 = 3;

/// In which order a thread holding the grain looks at it.
#[derive(Clone, Copy, PartialEq)]
enum Looks {
    /// The engine's: pending first, then the bit.
    PendingFirst,
    /// Negative control: the bit first, then pending.
    BitFirst,
}

#[derive(Default)]
struct Held {
    /// Held source writes, in acknowledgement order.
    writes: Vec<u8>,
    /// The grain is pending (a held write copied its T0 bytes; its bit is not set).
    pending: bool,
}

struct WbGrain {
    /// `g.target` is the part of the grain the target writer does not write.
    g: Grain,
    /// The part of the target the target writer writes.
    part: AtomicU8,
    /// Ghost: the target writer has written `part`.
    part_written: AtomicBool,
    held: Mutex<Held>,
    /// One drain at a time.
    draining: Mutex<()>,
}

impl WbGrain {
    /// A copy of the grain's T0 bytes lands on the whole target grain.
    fn copy_to_target(&self, v: u8) {
        self.g.write_target(v);
        self.part.store(v, Ordering::SeqCst);
    }

    /// Whether the grain is neither pending nor copied, looked at in `order`.
    fn neither(&self, order: Looks) -> (bool, bool) {
        let (pending, bit) = match order {
            Looks::PendingFirst => {
                let p = self.held.lock().unwrap().pending;
                (p, self.g.bit.load(Ordering::SeqCst))
            }
            Looks::BitFirst => {
                let b = self.g.bit.load(Ordering::SeqCst);
                (self.held.lock().unwrap().pending, b)
            }
        };
        (pending, bit)
    }

    /// `Engine::drain_locked`: the bit (after the target's flush), then not pending, then the
    /// held source writes in order, then forget them.
    fn drain(&self) {
        let _one = self.draining.lock().unwrap();
        let (writes, pending) = {
            let h = self.held.lock().unwrap();
            (h.writes.clone(), h.pending)
        };
        if pending {
            self.g.commit_bit();
            self.held.lock().unwrap().pending = false;
        }
        for w in &writes {
            self.g.write_source(*w);
        }
        self.held.lock().unwrap().writes.drain(..writes.len());
    }
}

/// A held source write of `v` (`Engine::write_held`).
fn held_writer(w: &WbGrain, v: u8, order: Looks) {
    if w.g.bit.load(Ordering::SeqCst) {
        // Nothing to copy: straight to the volume unless a held write overlaps it.
        let mut h = w.held.lock().unwrap();
        if !h.writes.is_empty() {
            h.writes.push(v);
            return;
        }
        drop(h);
        w.g.write_source(v);
        return;
    }
    w.g.lock.lock();
    let (pending, bit) = w.neither(order);
    let copy = !pending && !bit;
    if copy {
        let old = w.g.read_source();
        w.copy_to_target(old);
    }
    {
        let mut h = w.held.lock().unwrap();
        h.pending |= copy;
        h.writes.push(v);
    }
    w.g.lock.release();
}

/// The background copier (`Engine::plan_copy` + `copy_data` + `commit_copied`).
fn wb_copier(w: &WbGrain, order: Looks) {
    if !w.g.lock.try_acquire() {
        return;
    }
    let (pending, bit) = w.neither(order);
    if pending && !bit {
        // The grain waits for its held write's drain: drain now.
        w.g.lock.release();
        w.drain();
        return;
    }
    if pending || bit {
        w.g.lock.release();
        return;
    }
    let data = w.g.read_source();
    w.copy_to_target(data);
    w.g.commit_bit();
    w.g.lock.release();
}

/// A target (image) write of part of the grain, not held (`Engine::write_as` on a target).
fn wb_target_writer(w: &WbGrain, order: Looks) {
    loop {
        w.g.lock.lock();
        let (pending, bit) = w.neither(order);
        if pending && !bit {
            // A held write copied the grain and its drain has not set the bit: the source may
            // get the held bytes at any moment. Drain first, then start again.
            w.g.lock.release();
            w.drain();
            continue;
        }
        if !pending && !bit {
            // Complete the grain: the part not written here must hold T0.
            let old = w.g.read_source();
            w.copy_to_target(old);
        }
        w.g.commit_bit();
        w.part.store(TW, Ordering::SeqCst);
        w.part_written.store(true, Ordering::SeqCst);
        w.g.lock.release();
        return;
    }
}

/// One write-back execution; `writer` is the order in which the target writer looks (`None`:
/// no target writer).
fn scenario_write_back(order: Looks, writer: Option<Looks>) {
    let w = Arc::new(WbGrain {
        g: Grain::new(),
        part: AtomicU8::new(JUNK),
        part_written: AtomicBool::new(false),
        held: Mutex::new(Held::default()),
        draining: Mutex::new(()),
    });
    let mut hs = Vec::new();
    let actors = if writer.is_some() { 6 } else { 5 };
    for actor in 0..actors {
        let w = w.clone();
        hs.push(thread::spawn(move || match actor {
            0 => held_writer(&w, S1, order),
            1 => held_writer(&w, S2, order),
            2 => wb_copier(&w, order),
            3 => w.drain(),
            4 => image_reader(&w.g, Reader::Optimistic),
            _ => wb_target_writer(&w, writer.unwrap_or(order)),
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    w.drain();
    image_reader(&w.g, Reader::Optimistic);
    let s = w.g.read_source();
    if s != S1 && s != S2 {
        w.g.violation(format!("source ends with {s}, not a written value"));
    }
    if w.g.bit.load(Ordering::SeqCst) {
        let want = if w.part_written.load(Ordering::SeqCst) {
            TW
        } else {
            T0
        };
        let part = w.part.load(Ordering::SeqCst);
        if part != want {
            w.g.violation(format!(
                "bit set, target part ends with {part}, want {want}"
            ));
        }
    }
    final_check(&w.g);
}

#[test]
fn write_back_protocol_holds() {
    let engine = || scenario_write_back(Looks::PendingFirst, Some(Looks::PendingFirst));
    shuttle::check_random(engine, ITERATIONS);
    shuttle::check_pct(engine, ITERATIONS, 3);
    shuttle::check_random(
        || scenario_write_back(Looks::PendingFirst, None),
        ITERATIONS,
    );
    println!(
        "write-back protocol: {} random + {ITERATIONS} PCT schedules, no violation",
        2 * ITERATIONS
    );
}

/// Negative control: a copier or held writer that looks at the bit before pending must be
/// caught (a drain between the two looks shows the grain as neither, and the held write's new
/// source bytes are copied to the target as its T0 bytes).
#[test]
fn write_back_bit_before_pending_is_caught() {
    let r = std::panic::catch_unwind(|| {
        shuttle::check_random(|| scenario_write_back(Looks::BitFirst, None), ITERATIONS);
    });
    assert!(r.is_err(), "the checker missed the bit-first look");
}

/// Negative control: a target writer that looks at the bit before pending, with every other
/// actor as the engine has it, must be caught (a drain between its two looks sets the bit and
/// lands a held source write, and the writer completes the grain with those new bytes: the bug
/// `Engine::held_pending` fixed).
#[test]
fn write_back_target_writer_bit_first_is_caught() {
    let r = std::panic::catch_unwind(|| {
        shuttle::check_random(
            || scenario_write_back(Looks::PendingFirst, Some(Looks::BitFirst)),
            ITERATIONS,
        );
    });
    assert!(
        r.is_err(),
        "the checker missed the target writer's bit-first look"
    );
}
