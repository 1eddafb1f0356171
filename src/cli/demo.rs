//! The self-checking demo and the workload it kills.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::engine::copier::{Copier, CopierOptions};
use crate::engine::{Engine, EngineOptions, Outcome, SessionSpec};
use crate::ids::{GrainSize, SessionId, VolumeId};
use crate::model::{CopyMode, ExtentSpec, SessionState};
use crate::volume::{FileVolume, FileVolumeOptions};
use crate::{Error, Result};

const MIB: u64 = 1 << 20;

struct Check {
    images: u64,
    bytes: u64,
}

fn say(msg: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{msg}");
}

fn fill(path: &Path, size: u64, rng: &mut rand::rngs::SmallRng) -> Result<Vec<u8>> {
    let mut data =
        vec![0u8; usize::try_from(size).map_err(|_| Error::invalid("size", "too large"))?];
    rng.fill_bytes(&mut data);
    std::fs::write(path, &data)
        .map_err(|e| Error::io("write", path.display().to_string(), 0, e))?;
    Ok(data)
}

fn verify(e: &Engine, id: SessionId, reference: &[u8], c: &mut Check) -> Result<()> {
    let s = e.session(id)?;
    let len = s.map.image_len();
    if len != reference.len() as u64 {
        return Err(Error::invalid(
            "demo",
            format!("{id} image is {len} bytes, reference {}", reference.len()),
        ));
    }
    let chunk = 1 << 20;
    let mut buf = vec![0u8; chunk];
    let mut off = 0usize;
    while off < reference.len() {
        let n = chunk.min(reference.len() - off);
        e.read_image(id, off as u64, &mut buf[..n])?;
        if buf[..n] != reference[off..off + n] {
            let i = (0..n).find(|&i| buf[i] != reference[off + i]).unwrap_or(0);
            return Err(Error::invalid(
                "demo",
                format!(
                    "{id} image differs from its T0 reference at byte {}",
                    off + i
                ),
            ));
        }
        off += n;
    }
    c.images += 1;
    c.bytes += reference.len() as u64;
    Ok(())
}

/// Writers over the sources (random offsets, partial grains included) until `stop`.
fn writers(
    e: &Arc<Engine>,
    sources: &[crate::ids::VolumeId],
    seed: u64,
    stop: &Arc<AtomicBool>,
    count: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<Result<()>>> {
    (0..4u64)
        .map(|t| {
            let e = e.clone();
            let sources = sources.to_vec();
            let stop = stop.clone();
            let count = count.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(seed * 1000 + t);
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Acquire) {
                    let v = sources[rng.random_range(0..sources.len())];
                    let size = e.volume(v)?.size();
                    let len = if rng.random_range(0..8) == 0 {
                        rng.random_range(1..=128 * 1024u64)
                    } else {
                        rng.random_range(1..=8 * 1024u64)
                    };
                    let off = rng.random_range(0..size - len);
                    let n = usize::try_from(len).unwrap_or(1);
                    rng.fill_bytes(&mut buf[..n]);
                    e.write(v, off, &buf[..n])?;
                    if rng.random_range(0..16) == 0 {
                        e.flush(v)?;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(3));
                }
                Ok(())
            })
        })
        .collect()
}

/// What the demo set up: its directory, table, volumes, sessions and their T0 references.
struct Setup {
    dir: tempfile::TempDir,
    table: std::path::PathBuf,
    /// Session ids: whole-volume copy, two-extent no-copy, large-grain copy.
    s: [SessionId; 3],
    /// Targets of the first and third session.
    t0: VolumeId,
    t2: VolumeId,
    /// Each session's T0 image.
    refs: [Vec<u8>; 3],
}

/// Make the source and target files, the table and three sessions; the engine is returned with
/// the sources' ids for the writers.
fn setup(seed: u64) -> Result<(Setup, Engine, [VolumeId; 2])> {
    let dir = tempfile::Builder::new()
        .prefix("timezero-demo")
        .tempdir()
        .map_err(|e| Error::io("mkdtemp", "tmp", 0, e))?;
    let d = dir.path();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    say(&format!("timezero demo in {}", d.display()));
    let src0 = fill(&d.join("src0.img"), 96 * MIB, &mut rng)?;
    let src1 = fill(&d.join("src1.img"), 32 * MIB, &mut rng)?;
    for (n, s) in [
        ("tgt0.img", 96 * MIB),
        ("tgt1.img", 8 * MIB),
        ("tgt2.img", 32 * MIB),
    ] {
        FileVolume::create(d.join(n), s, &FileVolumeOptions::default())?;
    }
    let table = d.join("table.tzt");
    let e = Engine::create_path(&table, EngineOptions::default())?;
    let a = e.attach_path(&d.join("src0.img"))?;
    let b = e.attach_path(&d.join("src1.img"))?;
    let t0 = e.attach_path(&d.join("tgt0.img"))?;
    let t1 = e.attach_path(&d.join("tgt1.img"))?;
    let t2 = e.attach_path(&d.join("tgt2.img"))?;
    say(&format!("file volumes through {}", e.backend_name()));
    // Three sessions: a whole-volume copy, an overlapping no-copy extent session with a smaller
    // grain on the same source, and a copy session with a large grain on another source.
    let s1 = e.establish(&SessionSpec::whole(a, t0))?;
    let s2 = e.establish(&SessionSpec {
        source: a,
        target: t1,
        extents: vec![
            ExtentSpec {
                source_offset: 4 * MIB,
                target_offset: 0,
                len: 4 * MIB,
            },
            ExtentSpec {
                source_offset: 20 * MIB,
                target_offset: 4 * MIB,
                len: 4 * MIB,
            },
        ],
        grain: GrainSize::new(16 * 1024)?,
        mode: CopyMode::NoCopy,
        incremental: false,
    })?;
    let s3 = e.establish(&SessionSpec {
        grain: GrainSize::new(256 * 1024)?,
        ..SessionSpec::whole(b, t2)
    })?;
    let ref1 = src0.clone();
    let mut ref2 = src0[4 << 20..8 << 20].to_vec();
    ref2.extend_from_slice(&src0[20 << 20..24 << 20]);
    let ref3 = src1.clone();
    say(&format!("established {s1} (copy, 64KiB grain), {s2} (no-copy, 2 extents, 16KiB grain), {s3} (copy, 256KiB grain)"));

    Ok((
        Setup {
            dir,
            table,
            s: [s1, s2, s3],
            t0,
            t2,
            refs: [ref1, ref2, ref3],
        },
        e,
        [a, b],
    ))
}

/// Check all three images against their references.
fn verify_all(e: &Engine, st: &Setup, c: &mut Check) -> Result<()> {
    for (id, r) in st.s.iter().zip(&st.refs) {
        verify(e, *id, r, c)?;
    }
    Ok(())
}

/// Phase 1: concurrent writers against a throttled background copy, image checks while they
/// run.
fn phase1(e: Engine, st: &Setup, sources: [VolumeId; 2], seed: u64, c: &mut Check) -> Result<()> {
    let e = Arc::new(e);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let ws = writers(&e, &sources, seed, &stop, &writes);
    let copier = Copier::start(
        e.clone(),
        CopierOptions {
            rate_bytes_per_s: Some(16 * MIB),
            ..CopierOptions::default()
        },
    )?;
    std::thread::sleep(Duration::from_millis(600));
    verify_all(&e, st, c)?;
    let p = copier.stop()?;
    stop.store(true, Ordering::Release);
    for w in ws {
        w.join()
            .map_err(|_| Error::invalid("demo", "writer thread panicked"))??;
    }
    say(&format!("phase 1: {} concurrent writes, copier moved {} bytes ({}/{} grains); 3 images verified while writing", writes.load(Ordering::Relaxed), p.bytes_copied, p.grains_copied, p.grains_total));

    Ok(())
}

/// Phase 2: a separate process runs writers and the copier; it is killed with SIGKILL, twice,
/// and every image is checked after each reopen.
fn phase2(st: &Setup, seed: u64, c: &mut Check) -> Result<()> {
    let table = &st.table;
    let exe = std::env::current_exe().map_err(|er| Error::io("current_exe", "self", 0, er))?;
    for round in 0..2u64 {
        let mut child = std::process::Command::new(&exe)
            .arg("workload")
            .arg(table)
            .arg("--seed")
            .arg((seed + round + 1).to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|er| Error::io("spawn", exe.display().to_string(), 0, er))?;
        std::thread::sleep(Duration::from_millis(700 + 300 * round));
        child
            .kill()
            .map_err(|er| Error::io("kill", "workload", 0, er))?;
        let status = child
            .wait()
            .map_err(|er| Error::io("wait", "workload", 0, er))?;
        let e = Engine::open_path(table, EngineOptions::default())?;
        let resumed = e
            .decisions
            .iter()
            .filter(|x| matches!(x.outcome, Outcome::Resumed))
            .count();
        let bad: Vec<_> = e
            .decisions
            .iter()
            .filter(|x| !matches!(x.outcome, Outcome::Resumed | Outcome::Ended))
            .collect();
        let ended_ok = e
            .status()
            .iter()
            .all(|s| matches!(s.state, SessionState::Active | SessionState::Completed));
        let copied: u64 = e.status().iter().map(|s| s.grains_copied.get()).sum();
        say(&format!("phase 2.{round}: workload killed ({status}); reopened: replayed {} commits, {resumed} active sessions resumed, none terminated, {copied} grains copied so far", e.open_report.commits_replayed));
        if !bad.is_empty() || !ended_ok || resumed == 0 {
            return Err(Error::invalid(
                "demo",
                format!(
                    "expected every session resumed or completed, got {}",
                    e.decisions
                        .iter()
                        .map(|d| super::output::DecisionOut::of(d, None).text())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ));
        }
        verify_all(&e, st, c)?;
    }

    Ok(())
}

/// Phase 3: finish the copy, check the targets themselves, convert the no-copy session and
/// finish it too. Returns the engine for the closing figures.
fn phase3(st: &Setup, c: &mut Check) -> Result<Arc<Engine>> {
    let [s1, s2, s3] = st.s;
    let [ref1, ref2, ref3] = &st.refs;
    let e = Arc::new(Engine::open_path(&st.table, EngineOptions::default())?);
    Copier::start(e.clone(), CopierOptions::default())?.join()?;
    for (id, target, reference) in [(s1, st.t0, ref1), (s3, st.t2, ref3)] {
        let st = e.session(id)?.status().state;
        if st != SessionState::Completed {
            return Err(Error::invalid(
                "demo",
                format!("{id} is {st}, expected completed"),
            ));
        }
        verify(&e, id, reference, c)?;
        let mut tbuf = vec![0u8; reference.len()];
        e.read(target, 0, &mut tbuf)?;
        if &tbuf != reference {
            return Err(Error::invalid(
                "demo",
                format!("target of {id} differs from T0"),
            ));
        }
        c.bytes += tbuf.len() as u64;
    }
    verify(&e, s2, ref2, c)?;
    e.convert_to_copy(s2)?;
    Copier::start(e.clone(), CopierOptions::default())?.join()?;
    verify(&e, s2, ref2, c)?;
    let st2 = e.session(s2)?.status().state;
    if st2 != SessionState::Completed {
        return Err(Error::invalid(
            "demo",
            format!("{s2} is {st2} after conversion, expected completed"),
        ));
    }
    Ok(e)
}

/// Run the demo: set up, then the three phases, each checking every image it can reach.
pub fn run(keep: bool, seed: u64) -> Result<()> {
    let t_start = Instant::now();
    let (st, e, sources) = setup(seed)?;
    let mut c = Check {
        images: 0,
        bytes: 0,
    };
    phase1(e, &st, sources, seed, &mut c)?;
    phase2(&st, seed, &mut c)?;
    let e = phase3(&st, &mut c)?;
    let stats = &e.table().stats;
    say(&format!("phase 3: all sessions completed; targets equal their T0 references ({} table syncs in this open)", stats.syncs.load(Ordering::Relaxed)));
    say(&format!(
        "demo OK: {} image verifications, {} MiB compared byte for byte, in {:.1}s",
        c.images,
        c.bytes >> 20,
        t_start.elapsed().as_secs_f64()
    ));
    if keep {
        let p = st.dir.keep();
        say(&format!("kept {}", p.display()));
    }
    Ok(())
}

/// Open the table, run writers and a throttled copier forever (until killed).
pub fn workload(table: &Path, seed: u64, rate: u64) -> Result<()> {
    let e = Arc::new(Engine::open_path(table, EngineOptions::default())?);
    let mut sources = Vec::new();
    for s in e.table().sessions() {
        if s.is_active() && !sources.contains(&s.desc.source.id) {
            sources.push(s.desc.source.id);
        }
    }
    if sources.is_empty() {
        return Err(Error::invalid("workload", "no active session"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let ws = writers(&e, &sources, seed, &stop, &count);
    let _c = Copier::start(
        e.clone(),
        CopierOptions {
            rate_bytes_per_s: Some(rate),
            exit_when_done: false,
            ..CopierOptions::default()
        },
    )?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    loop {
        std::thread::sleep(Duration::from_millis(rng.random_range(10..50)));
        if ws.iter().any(std::thread::JoinHandle::is_finished) {
            return Err(Error::invalid("workload", "a writer stopped"));
        }
    }
}
