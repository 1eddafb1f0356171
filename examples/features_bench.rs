//! What change recording, incremental refresh and reverse restore cost, side by side in one run
//! (the figures docs/benchmarks.md reports for them):
//!
//! 1. already-copied 4 KiB writes on an active copy session with change recording vs one
//!    without (every grain written once before, so recording has nothing left to record);
//! 2. the first 4 KiB write to each grain of a completed session with change recording (it
//!    commits the grain's change mark before the write) vs one without, and vs a plain
//!    `pwrite` + `fdatasync` of a file (the cost of one durability point);
//! 3. `refresh` of a volume with 1 % of its grains changed, then the copy of those grains, vs a
//!    full re-copy of the same volume (a new copy session, copied to the end);
//! 4. reverse restore of a 1 TiB sparse session (half its grains copied): time from the call
//!    until the source serves T0 content (the call's return and one read of a restored grain);
//! 5. background restore throughput (`restore_all` of a completed session) vs `copy_all` of a
//!    new copy session of the same size.
//!
//! `cargo run --release --features fault --example features_bench [DIR [MIB [ROUNDS]]]`
//! (defaults: a new directory under /var/tmp, 1024 MiB, 3 rounds). The two sides of every
//! figure run interleaved (the order alternates per round; writes alternate in slices), and
//! the figures are medians of per-round values: the machine may be shared.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use timezero::fault::internals::{commit, Entry};
use timezero::{Engine, EngineOptions, GrainCount, SessionId, SessionSpec, VolumeId};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GRAIN: u64 = 64 * KIB;
const IO: usize = 4096;
/// Writes per slice when two sides alternate.
const SLICE: usize = 64;
/// Volumes of the write figures (1 and 2).
const WRITE_VOLUME: u64 = 64 * MIB;
const TIB: u64 = 1 << 40;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args
        .first()
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let mib: u64 = args.get(1).map_or(Ok(1024), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    if mib < 64 || rounds == 0 {
        return Err("MIB must be at least 64 and ROUNDS at least 1".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("features-bench.")
        .tempdir_in(&base)?;
    let d = dir.path();
    println!(
        "features_bench: {mib} MiB volumes, {rounds} rounds, in {}",
        d.display()
    );
    let mut rng = Lcg(0x5eed_f00d);

    let (rec_ratio, rec_abs) = recording_already_copied(d, rounds, &mut rng)?;
    println!(
        "1. already-copied 4 KiB writes, recording vs not: {:.3}x time (median of rounds {:?}); \
         {:.0} vs {:.0} IOPS",
        median(&rec_ratio),
        rounded(&rec_ratio),
        median(&rec_abs.0),
        median(&rec_abs.1)
    );

    let first = first_write_after_completion(d, rounds, &mut rng)?;
    println!(
        "2. first 4 KiB write to a grain of a completed session: recording {:.1} us, without \
         {:.1} us, pwrite+fdatasync {:.1} us (medians); recording / pwrite+fdatasync {:.2}x \
         (rounds {:?})",
        median(&first.recording_us),
        median(&first.plain_us),
        median(&first.synced_us),
        median(&first.ratio_to_synced),
        rounded(&first.ratio_to_synced)
    );

    let refresh = refresh_vs_full(d, mib * MIB, rounds, &mut rng)?;
    println!(
        "3. {} MiB, 1 % of grains changed: refresh + copy {:.3} s vs full re-copy {:.3} s: \
         {:.1}x faster (rounds {:?})",
        mib,
        median(&refresh.0),
        median(&refresh.1),
        median(&refresh.2),
        rounded(&refresh.2)
    );

    let serve = reverse_time_to_serve(d, rounds)?;
    match serve {
        Some((call_ms, serve_ms)) => println!(
            "4. reverse of a 1 TiB sparse session (8,388,608 of 16,777,216 grains copied): call \
             {:.2} ms, until the first restored read {:.2} ms (medians; rounds {:?})",
            median(&call_ms),
            median(&serve_ms),
            rounded(&serve_ms)
        ),
        None => println!(
            "4. skipped: {} cannot hold a 1 TiB sparse file",
            d.display()
        ),
    }

    let thr = restore_vs_copy(d, mib * MIB, rounds)?;
    println!(
        "5. {} MiB: restore_all {:.0} MB/s vs copy_all {:.0} MB/s: {:.2}x of copy's speed \
         (rounds {:?})",
        mib,
        median(&thr.0),
        median(&thr.1),
        median(&thr.2),
        rounded(&thr.2)
    );
    Ok(())
}

/// A small deterministic generator (the figures do not need a better one).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
}

/// A file of `bytes` filled with non-zero pseudo-random data, synced.
fn data_file(path: &Path, bytes: u64, rng: &mut Lcg) -> Res<()> {
    let mut f = std::io::BufWriter::new(File::create(path)?);
    let mut block = vec![0u8; MIB as usize];
    for _ in 0..bytes / MIB {
        for w in block.chunks_mut(8) {
            w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

/// A zero-filled (sparse) file of `bytes`.
fn empty_file(path: &Path, bytes: u64) -> Res<()> {
    File::create(path)?.set_len(bytes)?;
    Ok(())
}

fn engine(d: &Path, name: &str) -> Res<Engine> {
    let table = d.join(name);
    let _ = std::fs::remove_file(&table);
    Ok(Engine::create_path(&table, EngineOptions::default())?)
}

fn spec(src: VolumeId, tgt: VolumeId, incremental: bool) -> SessionSpec {
    SessionSpec {
        incremental,
        ..SessionSpec::whole(src, tgt)
    }
}

/// One way of writing 4 KiB at an offset.
type Side<'a> = Box<dyn FnMut(u64) -> Res<()> + 'a>;

/// Writes at `offsets`, `SLICE` at a time through each side in turn (the order rotates per
/// slice and round); returns the seconds spent on each side.
fn alternate(sides: &mut [Side<'_>], offsets: &[u64], round: usize) -> Res<Vec<f64>> {
    let n = sides.len();
    let mut secs = vec![0.0; n];
    for (k, chunk) in offsets.chunks(SLICE).enumerate() {
        for i in 0..n {
            let side = (i + k + round) % n;
            let t = Instant::now();
            for off in chunk {
                (sides[side])(*off)?;
            }
            secs[side] += t.elapsed().as_secs_f64();
        }
    }
    Ok(secs)
}

/// A side writing 4 KiB through the engine to `vol`.
fn engine_side(e: &Engine, vol: VolumeId) -> Side<'_> {
    let buf = vec![0x5au8; IO];
    Box::new(move |off| Ok(e.write(vol, off, &buf)?))
}

/// Per round: IOPS with change recording, and without.
type Iops = (Vec<f64>, Vec<f64>);

/// Figure 1: per round, time(recording) / time(without) and both sides' IOPS.
fn recording_already_copied(d: &Path, rounds: usize, rng: &mut Lcg) -> Res<(Vec<f64>, Iops)> {
    let e = engine(d, "rec.tz")?;
    let mut ids = Vec::new();
    for name in ["rec-i", "rec-n"] {
        let (s, t) = (d.join(format!("{name}-src")), d.join(format!("{name}-tgt")));
        data_file(&s, WRITE_VOLUME, rng)?;
        empty_file(&t, WRITE_VOLUME)?;
        let (s, t) = (e.attach_path(&s)?, e.attach_path(&t)?);
        let id = e.establish(&spec(s, t, name == "rec-i"))?;
        // Every grain but the last copied: the session stays active (in the write path).
        let grains = WRITE_VOLUME / GRAIN;
        e.copy_batch(id, timezero::GrainIndex::ZERO, GrainCount(grains - 1))?;
        ids.push((s, id));
    }
    let (vi, vn) = (ids[0].0, ids[1].0);
    let grains = WRITE_VOLUME / GRAIN - 1;
    // Every grain written once: recording has marked all of them changed.
    let all: Vec<u64> = (0..grains).map(|g| g * GRAIN).collect();
    let mut sides = [engine_side(&e, vi), engine_side(&e, vn)];
    alternate(&mut sides, &all, 0)?;
    let n = 200_000usize;
    let (mut ratio, mut iops_i, mut iops_n) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let offs: Vec<u64> = (0..n)
            .map(|_| rng.below(grains) * GRAIN + rng.below(GRAIN / IO as u64) * IO as u64)
            .collect();
        let t = alternate(&mut sides, &offs, r)?;
        let (ti, tn) = (t[0], t[1]);
        ratio.push(ti / tn);
        iops_i.push(n as f64 / ti);
        iops_n.push(n as f64 / tn);
    }
    drop(sides);
    for (_, id) in ids {
        e.withdraw(id)?;
    }
    e.close()?;
    Ok((ratio, (iops_i, iops_n)))
}

struct FirstWrite {
    recording_us: Vec<f64>,
    plain_us: Vec<f64>,
    synced_us: Vec<f64>,
    ratio_to_synced: Vec<f64>,
}

/// Figure 2: first writes after the copy completed, a new pair of sessions per round.
fn first_write_after_completion(d: &Path, rounds: usize, rng: &mut Lcg) -> Res<FirstWrite> {
    let mut out = FirstWrite {
        recording_us: Vec::new(),
        plain_us: Vec::new(),
        synced_us: Vec::new(),
        ratio_to_synced: Vec::new(),
    };
    let plain = d.join("first-raw");
    data_file(&plain, WRITE_VOLUME, rng)?;
    let raw = OpenOptions::new().read(true).write(true).open(&plain)?;
    let grains = WRITE_VOLUME / GRAIN;
    for r in 0..rounds {
        let e = engine(d, "first.tz")?;
        let mut vols = Vec::new();
        for name in ["first-i", "first-n"] {
            let (s, t) = (d.join(format!("{name}-src")), d.join(format!("{name}-tgt")));
            data_file(&s, WRITE_VOLUME, rng)?;
            empty_file(&t, WRITE_VOLUME)?;
            let (s, t) = (e.attach_path(&s)?, e.attach_path(&t)?);
            let id = e.establish(&spec(s, t, name == "first-i"))?;
            e.copy_all(id, GrainCount(256))?;
            vols.push(s);
        }
        let offs: Vec<u64> = (0..grains).map(|g| g * GRAIN).collect();
        let buf = vec![0x33u8; IO];
        let raw = &raw;
        let synced: Side<'_> = Box::new(move |off| {
            raw.write_all_at(&buf, off)?;
            Ok(raw.sync_data()?)
        });
        let mut sides = [engine_side(&e, vols[0]), engine_side(&e, vols[1]), synced];
        let t = alternate(&mut sides, &offs, r)?;
        drop(sides);
        let (ti, tn, ts) = (t[0], t[1], t[2]);
        let per = |s: f64| s * 1e6 / grains as f64;
        out.recording_us.push(per(ti));
        out.plain_us.push(per(tn));
        out.synced_us.push(per(ts));
        out.ratio_to_synced.push(ti / ts);
        e.close()?;
    }
    Ok(out)
}

/// Figure 3: per round (refresh + copy seconds, full re-copy seconds, speed-up).
fn refresh_vs_full(
    d: &Path,
    bytes: u64,
    rounds: usize,
    rng: &mut Lcg,
) -> Res<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let (src, tgt, tgt2) = (d.join("rf-src"), d.join("rf-tgt"), d.join("rf-tgt2"));
    data_file(&src, bytes, rng)?;
    empty_file(&tgt, bytes)?;
    empty_file(&tgt2, bytes)?;
    let e = engine(d, "rf.tz")?;
    let (s, t, t2) = (
        e.attach_path(&src)?,
        e.attach_path(&tgt)?,
        e.attach_path(&tgt2)?,
    );
    let inc = e.establish(&spec(s, t, true))?;
    let batch = GrainCount(256);
    e.copy_all(inc, batch)?;
    let grains = bytes / GRAIN;
    let changed = (grains / 100).max(1);
    let (mut fast, mut full, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let buf = vec![0x77u8; IO];
    for r in 0..rounds {
        // 1 % of the grains changed since the last T0 (distinct grains).
        let mut picked = std::collections::BTreeSet::new();
        while (picked.len() as u64) < changed {
            picked.insert(rng.below(grains));
        }
        for g in &picked {
            e.write(s, g * GRAIN, &buf)?;
        }
        let timed_refresh = |e: &Engine| -> Res<f64> {
            let t = Instant::now();
            let out = e.refresh(inc)?;
            let n = e.copy_all(inc, batch)?;
            let secs = t.elapsed().as_secs_f64();
            if out.grains_to_copy.get() != changed || n.get() != changed {
                return Err(format!(
                    "refresh copied {} grains ({} announced), expected {changed}",
                    n.get(),
                    out.grains_to_copy.get()
                )
                .into());
            }
            Ok(secs)
        };
        let timed_full = |e: &Engine| -> Res<f64> {
            let t = Instant::now();
            let id = e.establish(&spec(s, t2, false))?;
            let n = e.copy_all(id, batch)?;
            let secs = t.elapsed().as_secs_f64();
            e.forget(id)?;
            if n.get() != grains {
                return Err(format!("full copy moved {} of {grains} grains", n.get()).into());
            }
            Ok(secs)
        };
        let (a, b) = if r % 2 == 0 {
            let a = timed_refresh(&e)?;
            (a, timed_full(&e)?)
        } else {
            let b = timed_full(&e)?;
            (timed_refresh(&e)?, b)
        };
        fast.push(a);
        full.push(b);
        ratio.push(b / a);
    }
    e.close()?;
    Ok((fast, full, ratio))
}

/// Figure 4: per round (ms until `reverse` returned, ms until a restored grain was read).
/// `None` when the directory cannot hold a 1 TiB sparse file.
fn reverse_time_to_serve(d: &Path, rounds: usize) -> Res<Option<(Vec<f64>, Vec<f64>)>> {
    let (src, tgt) = (d.join("big-src"), d.join("big-tgt"));
    let (mut call, mut serve) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for p in [&src, &tgt] {
            let f = File::create(p)?;
            if f.set_len(TIB).is_err() {
                return Ok(None);
            }
        }
        // T0 content of grain 0 is on the target (copied), the source holds later data.
        let marker_t0 = vec![0xa1u8; IO];
        File::options()
            .write(true)
            .open(&tgt)?
            .write_all_at(&marker_t0, 0)?;
        File::options()
            .write(true)
            .open(&src)?
            .write_all_at(&[0x1au8; IO], 0)?;
        let e = engine(d, "big.tz")?;
        let (s, t) = (e.attach_path(&src)?, e.attach_path(&tgt)?);
        let id: SessionId = e.establish(&spec(s, t, false))?;
        let grains = TIB / GRAIN;
        commit(
            e.table(),
            vec![Entry::SetBits {
                session: id,
                start: 0,
                count: grains / 2,
            }],
        )?;
        drop(e);
        // Reopen, so the session's state is what recovery rebuilds from the table.
        let e = Engine::open_path(&d.join("big.tz"), EngineOptions::default())?;
        let mut buf = vec![0u8; IO];
        let start = Instant::now();
        let rev = e.reverse(id)?;
        let c = start.elapsed().as_secs_f64() * 1e3;
        e.read(s, 0, &mut buf)?;
        let sv = start.elapsed().as_secs_f64() * 1e3;
        if buf != marker_t0 || rev.grains_to_restore.get() != grains / 2 {
            return Err(format!(
                "reverse served wrong data or announced {} grains",
                rev.grains_to_restore.get()
            )
            .into());
        }
        call.push(c);
        serve.push(sv);
        e.withdraw(id).ok();
        drop(e);
    }
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&tgt);
    Ok(Some((call, serve)))
}

/// Figure 5: per round (restore MB/s, copy MB/s, restore / copy).
fn restore_vs_copy(d: &Path, bytes: u64, rounds: usize) -> Res<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let mut rng = Lcg(7);
    let (src, tgt, tgt2) = (d.join("rs-src"), d.join("rs-tgt"), d.join("rs-tgt2"));
    data_file(&src, bytes, &mut rng)?;
    empty_file(&tgt, bytes)?;
    empty_file(&tgt2, bytes)?;
    let e = engine(d, "rs.tz")?;
    let (s, t, t2) = (
        e.attach_path(&src)?,
        e.attach_path(&tgt)?,
        e.attach_path(&tgt2)?,
    );
    let batch = GrainCount(256);
    let grains = bytes / GRAIN;
    let mb = bytes as f64 / 1e6;
    let (mut rest, mut copy, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let timed_restore = |e: &Engine| -> Res<f64> {
            // A completed session whose every grain moves back (untimed set-up).
            let id = e.establish(&spec(s, t, false))?;
            e.copy_all(id, batch)?;
            let start = Instant::now();
            let rev = e.reverse(id)?;
            let n = e.restore_all(id)?;
            let secs = start.elapsed().as_secs_f64();
            if rev.grains_to_restore.get() != grains || n.get() != grains {
                return Err(format!("restore moved {} of {grains} grains", n.get()).into());
            }
            e.forget(id).ok();
            Ok(secs)
        };
        let timed_copy = |e: &Engine| -> Res<f64> {
            let start = Instant::now();
            let id = e.establish(&spec(s, t2, false))?;
            let n = e.copy_all(id, batch)?;
            let secs = start.elapsed().as_secs_f64();
            e.forget(id)?;
            if n.get() != grains {
                return Err(format!("copy moved {} of {grains} grains", n.get()).into());
            }
            Ok(secs)
        };
        let (a, b) = if r % 2 == 0 {
            let a = timed_restore(&e)?;
            (a, timed_copy(&e)?)
        } else {
            let b = timed_copy(&e)?;
            (timed_restore(&e)?, b)
        };
        rest.push(mb / a);
        copy.push(mb / b);
        ratio.push(b / a);
    }
    e.close()?;
    Ok((rest, copy, ratio))
}
