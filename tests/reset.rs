//! Reset notifications (crash model F10, F11): the identity x size x I/O-boundary matrix, the
//! generation and sector-size cases, and `timezero reset TABLE VOLUME` on files.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]
#![allow(clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;

use timezero::fault::internals::format::{ExtentSpec, ReasonCode, SessionState};
use timezero::fault::{engine_options, CrashCursor, Fate, Faults, SimWorld};
use timezero::{Engine, MapResolver, Outcome, SessionSpec};
use timezero::{Error, Result};
use timezero::{Generation, GrainSize, SessionId, VolumeId};
use timezero::{MemStorage, TableStorage};
use timezero::{MemVolume, Volume, VolumeInfo};

const K: u64 = 4096;
const SRC: u64 = 16 * K;
const TGT_A: u64 = 8 * K;
const TGT_B: u64 = 4 * K;
/// Device names: table is device 0, then these.
const NAMES: [&str; 3] = ["src", "tgta", "tgtb"];

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    common::pattern(seed, usize::try_from(len).unwrap())
}

fn ext(s: u64, t: u64, l: u64) -> ExtentSpec {
    ExtentSpec {
        source_offset: s,
        target_offset: t,
        len: l,
    }
}

/// Session A: two extents, the second at the end of the source. Session B: one extent.
fn specs(src: VolumeId, a: VolumeId, b: VolumeId) -> [SessionSpec; 2] {
    let g = GrainSize::new(K).unwrap();
    [
        SessionSpec {
            extents: vec![ext(0, 0, 4 * K), ext(12 * K, 4 * K, 4 * K)],
            grain: g,
            ..SessionSpec::whole(src, a)
        },
        SessionSpec {
            extents: vec![ext(4 * K, 0, 4 * K)],
            grain: g,
            ..SessionSpec::whole(src, b)
        },
    ]
}

/// T0 images of A and B.
fn references(src0: &[u8]) -> [Vec<u8>; 2] {
    let k = usize::try_from(K).unwrap();
    let mut a = src0[..4 * k].to_vec();
    a.extend_from_slice(&src0[12 * k..16 * k]);
    [a, src0[4 * k..8 * k].to_vec()]
}

/// The workload after T0: source writes (copy-before-write), background copy batches, flushes.
/// Errors are ignored: every operation may fail at the injected I/O.
fn workload(e: &Engine, src: VolumeId, ids: [SessionId; 2], round: u8) {
    let w = |off: u64, len: u64| {
        let _ = e.write(src, off, &vec![round ^ 0x5a; usize::try_from(len).unwrap()]);
    };
    w(0, 6000);
    w(5 * K, K);
    let _ = e.copy_batch(ids[1], timezero::GrainIndex(0), timezero::GrainCount(2));
    w(13 * K, 2 * K);
    let _ = e.flush(src);
    w(3 * K, 2 * K);
    let _ = e.copy_batch(ids[0], timezero::GrainIndex(0), timezero::GrainCount(3));
    w(15 * K, K);
    let _ = e.flush(src);
}

/// A volume whose reported sector size differs from its inner volume's.
#[derive(Debug)]
struct Sectored(Arc<MemVolume>, u32);

impl Volume for Sectored {
    fn info(&self) -> VolumeInfo {
        let mut i = self.0.info();
        i.sector_size = self.1;
        i
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Size {
    Same,
    Shrunk,
    Grown,
}

#[derive(Debug, Clone, Copy)]
enum Change {
    /// Identity changed or not, and a size.
    Dev {
        other: bool,
        size: Size,
    },
    Generation,
    Sector,
}

fn changes() -> Vec<Change> {
    let mut v = Vec::new();
    for other in [false, true] {
        for size in [Size::Same, Size::Shrunk, Size::Grown] {
            v.push(Change::Dev { other, size });
        }
    }
    v.push(Change::Generation);
    v.push(Change::Sector);
    v
}

/// The volume after the reset: device `dev` (1 = source, 2 = target of A) with `bytes`.
fn replaced(dev: usize, bytes: &[u8], c: Change) -> Arc<dyn Volume> {
    let v = Arc::new(MemVolume::with_data(NAMES[dev - 1], bytes));
    match c {
        Change::Dev { other, size } => {
            if other {
                v.set_id(VolumeId([0xee; 16]));
            }
            let len = bytes.len();
            let k = usize::try_from(K).unwrap();
            match size {
                Size::Same => {}
                // Source: cuts A's extent at 12K..16K. Target of A: cuts A's extent at 4K..8K.
                Size::Shrunk => v.resize(len - k),
                Size::Grown => v.resize(len + 4 * k),
            }
            v
        }
        Change::Generation => {
            v.set_generation(Generation(7));
            v
        }
        Change::Sector => Arc::new(Sectored(v, 4096)),
    }
}

/// What a session on the reset volume must end as.
fn expected(c: Change, session: usize) -> (Option<ReasonCode>, Vec<u32>) {
    match c {
        Change::Dev { other: true, .. } => (Some(ReasonCode::ResetMismatch), vec![]),
        Change::Dev {
            size: Size::Shrunk, ..
        } if session == 0 => (None, vec![1]),
        Change::Dev { .. } => (None, vec![]),
        Change::Generation => (Some(ReasonCode::GenerationMismatch), vec![]),
        Change::Sector => (Some(ReasonCode::SectorSizeMismatch), vec![]),
    }
}

/// Check decisions and images after `reset(dev)`; then write more through the engine and check
/// the images again. Returns the checks made.
fn check_after(
    e: &Engine,
    ids: [SessionId; 2],
    refs: &[Vec<u8>; 2],
    dev: usize,
    c: Change,
    ds: &[timezero::Decision],
    ctx: &str,
) -> u64 {
    let on: Vec<usize> = if dev == 1 { vec![0, 1] } else { vec![0] };
    assert_eq!(ds.len(), on.len(), "{ctx}: decisions {ds:?}");
    let mut checks = 0;
    for (i, id) in ids.iter().enumerate() {
        let s = e.session(*id).unwrap();
        let st = s.status();
        if on.contains(&i) {
            let d = ds.iter().find(|d| d.session == *id).expect(ctx);
            let (term, ended) = expected(c, i);
            match (&term, &d.outcome) {
                (Some(code), Outcome::Terminated(r)) => {
                    assert_eq!(r.code, *code, "{ctx}: s{i}");
                    assert_eq!(st.state, SessionState::Terminated, "{ctx}");
                }
                (None, Outcome::Resumed) if ended.is_empty() => {}
                (None, Outcome::ResumedPartly(v)) if !ended.is_empty() => {
                    let got: Vec<u32> = v.iter().map(|x| x.0).collect();
                    assert_eq!(got, ended, "{ctx}");
                    assert!(v.iter().all(|x| x.1.code == ReasonCode::VolumeShrunk));
                }
                _ => panic!(
                    "{ctx}: s{i} expected {term:?} {ended:?}, got {:?}",
                    d.outcome
                ),
            }
            checks += 1;
        }
        if st.state == SessionState::Terminated {
            let mut b = vec![0u8; 16];
            assert!(
                matches!(e.read_image(*id, 0, &mut b), Err(Error::NotActive { .. })),
                "{ctx}"
            );
            checks += 1;
            continue;
        }
        assert_eq!(st.state, SessionState::Active, "{ctx}: s{i}");
        checks += check_image(e, *id, &refs[i], ctx);
    }
    // Further writes through the engine: the whole source (copy-before-write on the handle the
    // reset installed), then background copy; images still read as at T0.
    let src = e
        .attached()
        .iter()
        .find(|v| v.locator == "mem:src")
        .unwrap()
        .id;
    let size = e.volume(src).unwrap().size();
    let mut off = 0;
    while off < size {
        let _ = e.write(src, off, &vec![0xc3; usize::try_from(K).unwrap()]);
        off += K;
    }
    for id in ids {
        if e.session(id).unwrap().is_active() {
            let _ = e.copy_all(id, timezero::GrainCount(2));
        }
    }
    for (i, id) in ids.iter().enumerate() {
        if e.session(*id).unwrap().status().state != SessionState::Terminated {
            checks += check_image(e, *id, &refs[i], ctx);
        }
    }
    checks
}

/// Live extents read as T0; ended extents return a typed error.
fn check_image(e: &Engine, id: SessionId, r: &[u8], ctx: &str) -> u64 {
    let s = e.session(id).unwrap();
    let st = s.status();
    let mut off = 0u64;
    for (x, ex) in s.desc.extents.iter().enumerate() {
        let mut b = vec![0u8; usize::try_from(ex.len).unwrap()];
        let res = e.read_image(id, off, &mut b);
        if st.ended[x].is_some() {
            assert!(
                matches!(res, Err(Error::ExtentTerminated { .. })),
                "{ctx}: ended extent {x} of {id:?} read {res:?}"
            );
        } else {
            res.unwrap_or_else(|er| panic!("{ctx}: read {id:?} extent {x}: {er}"));
            let o = usize::try_from(off).unwrap();
            assert!(
                b == r[o..o + b.len()],
                "{ctx}: {id:?} extent {x} differs from T0"
            );
        }
        off += ex.len;
    }
    1
}

struct Setup {
    world: Arc<SimWorld>,
    engine: Engine,
    vols: [VolumeId; 3],
    ids: [SessionId; 2],
    refs: [Vec<u8>; 2],
    start: u64,
}

fn setup(seed: u64, opts: &timezero::EngineOptions) -> Setup {
    let world = SimWorld::new(seed);
    let tb = opts.table.layout().unwrap().file_bytes();
    let table = world.add_table("table", vec![0; usize::try_from(tb).unwrap()]);
    let src0 = pattern(seed, SRC);
    let vs: Vec<Arc<dyn Volume>> = [
        (0, src0.clone()),
        (1, pattern(seed + 1, TGT_A)),
        (2, pattern(seed + 2, TGT_B)),
    ]
    .into_iter()
    .map(|(i, b)| Arc::new(world.add_volume(NAMES[i], b)) as Arc<dyn Volume>)
    .collect();
    let engine = Engine::create(Arc::new(table), opts.clone()).unwrap();
    let vols = [0, 1, 2].map(|i| engine.attach(vs[i].clone()));
    let [sa, sb] = specs(vols[0], vols[1], vols[2]);
    let ids = [
        engine.establish(&sa).unwrap(),
        engine.establish(&sb).unwrap(),
    ];
    let start = world.clock();
    Setup {
        world,
        engine,
        vols,
        ids,
        refs: references(&src0),
        start,
    }
}

fn durable_images(world: &SimWorld, fate: Fate) -> Vec<Vec<u8>> {
    let log = world.crash_log();
    let mut c = CrashCursor::new(&log);
    while c.advance() {}
    c.image(|_| fate)
}

#[test]
fn reset_matrix() {
    matrix(
        &timezero::EngineOptions {
            checked_copies: false,
            ..engine_options()
        },
        "serial copies",
    );
}

/// The same matrix with checked copy records (the default): recovery at open may copy grains
/// again, and the reset then sees the volume as the reopened engine left it.
#[test]
fn reset_matrix_checked_copies() {
    matrix(&engine_options(), "checked copies");
}

fn matrix(opts: &timezero::EngineOptions, mode: &str) {
    let t = std::time::Instant::now();
    let seed = 11;
    // Fault-free run: how many I/Os the workload issues.
    let total = {
        let s = setup(seed, opts);
        workload(&s.engine, s.vols[0], s.ids, 1);
        s.world.clock() - s.start
    };
    let mut cases = 0u64;
    let mut checks = 0u64;
    for n in 0..=total {
        for dev in [1usize, 2] {
            for c in changes() {
                // (a) The N-th I/O fails (unknown outcome), then the reset arrives at the
                // same engine; the devices answer again.
                let s = setup(seed, opts);
                s.world.set_faults(Faults {
                    eio_at: Some(s.start + n),
                    ..Faults::default()
                });
                workload(&s.engine, s.vols[0], s.ids, 1);
                s.world.set_faults(Faults::default());
                let img = durable_images(&s.world, Fate::Drop);
                let now = replaced(dev, &img[dev], c);
                let ctx = format!(
                    "{mode}: same engine, I/O {n} fails, reset of {} to {c:?}",
                    NAMES[dev - 1]
                );
                match s.engine.reset(s.vols[dev - 1], Some(now)) {
                    Ok(ds) => {
                        checks += check_after(&s.engine, s.ids, &s.refs, dev, c, &ds, &ctx);
                    }
                    // A failed table durability point is fatal for this engine: the reset
                    // must say so with a typed error (the reopened case below covers it).
                    Err(er) => assert!(s.engine.table().is_poisoned(), "{ctx}: {er}"),
                }
                cases += 1;
                // (b) The world stops after N I/Os; an engine reopened from the crash image
                // (unsynced writes lost, or all kept) receives the reset.
                let s = setup(seed, opts);
                s.world.set_faults(Faults {
                    crash_after: Some(s.start + n),
                    ..Faults::default()
                });
                workload(&s.engine, s.vols[0], s.ids, 1);
                for fate in [Fate::Drop, Fate::Keep] {
                    let img = durable_images(&s.world, fate);
                    let mut r = MapResolver::default();
                    let mut reopened = Vec::new();
                    for (i, name) in NAMES.iter().enumerate() {
                        let v = Arc::new(MemVolume::with_data(name, &img[i + 1]));
                        reopened.push(v.clone());
                        r.add(v);
                    }
                    let st: Arc<dyn TableStorage> =
                        Arc::new(MemStorage::from_bytes("crash", img[0].clone()));
                    let e = Engine::open(st, &r, opts.clone()).unwrap();
                    assert!(
                        e.decisions
                            .iter()
                            .all(|d| matches!(d.outcome, Outcome::Resumed)),
                        "{:?}",
                        e.decisions
                    );
                    // The device as the reopened engine left it (recovery may have written
                    // to it), now reported changed.
                    let now = replaced(dev, &reopened[dev - 1].snapshot(), c);
                    let ctx = format!(
                        "{mode}: reopened after crash at I/O {n} ({fate:?}), reset of {} to {c:?}",
                        NAMES[dev - 1]
                    );
                    let ds = e.reset(s.vols[dev - 1], Some(now)).unwrap();
                    checks += check_after(&e, s.ids, &s.refs, dev, c, &ds, &ctx);
                    cases += 1;
                }
            }
        }
    }
    println!(
        "reset matrix ({mode}): {cases} cases ({} I/O boundaries x 2 volumes x {} changes x 3 modes), \
         {checks} checks, {:.1?}",
        total + 1,
        changes().len(),
        t.elapsed()
    );
}

fn tz(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_timezero"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "timezero {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn cli_reset_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let k = usize::try_from(K).unwrap();
    std::fs::write(d.join("src"), pattern(3, SRC)).unwrap();
    std::fs::write(d.join("tgt"), vec![0u8; 8 * k]).unwrap();
    std::fs::write(d.join("tgt2"), vec![0u8; 4 * k]).unwrap();
    let table = p("t.tzt");
    tz(&["init", &table, "--journal", "256KiB", "--capacity", "1MiB"]);
    let s1 = tz(&[
        "establish",
        &table,
        &p("src"),
        &p("tgt"),
        "--grain",
        "4KiB",
        "--nocopy",
        "--extent",
        "0:16KiB",
        "--extent",
        "48KiB:16KiB@16KiB",
    ]);
    assert!(s1.starts_with("s1: "), "{s1}");
    let s2 = tz(&[
        "establish",
        &table,
        &p("src"),
        &p("tgt2"),
        "--grain",
        "4KiB",
        "--nocopy",
        "--extent",
        "16KiB:16KiB@0",
    ]);
    assert!(s2.starts_with("s2: "), "{s2}");
    // Replace the target of s2 by another file (new inode) at the same path.
    std::fs::write(d.join("tgt2.new"), vec![0u8; 4 * k]).unwrap();
    std::fs::rename(d.join("tgt2.new"), d.join("tgt2")).unwrap();
    let out = tz(&["reset", &table, &p("tgt2")]);
    assert!(
        out.contains("s2: terminated (IdentityMismatch: target ")
            && out.contains("tgt2 was replaced by another file"),
        "{out}"
    );
    assert!(!out.contains("s1"), "{out}");
    let st = tz(&["status", &table]);
    let l2 = st.lines().find(|l| l.starts_with("s2 ")).unwrap();
    assert!(
        l2.contains("terminated") && l2.contains("IdentityMismatch"),
        "{st}"
    );
    let l1 = st.lines().find(|l| l.starts_with("s1 ")).unwrap();
    assert!(l1.contains("active"), "{st}");
    // Truncate the source so that s1's second extent (48K..64K) no longer fits.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("src"))
        .unwrap();
    f.set_len(12 * K).unwrap();
    drop(f);
    let out = tz(&["reset", &table, &p("src")]);
    assert!(
        out.contains("s1: resumed-partly; extent 1 ended (VolumeShrunk: "),
        "{out}"
    );
    let e = Engine::open_path(
        std::path::Path::new(&table),
        timezero::EngineOptions::default(),
    )
    .unwrap();
    let st = e.session(SessionId(1)).unwrap().status();
    assert_eq!(st.state, SessionState::Active);
    assert!(st.ended[0].is_none());
    assert_eq!(st.ended[1].as_ref().unwrap().code, ReasonCode::VolumeShrunk);
    let mut b = vec![0u8; 4 * k];
    e.read_image(SessionId(1), 0, &mut b).unwrap();
    assert!(b == pattern(3, SRC)[..4 * k]);
    println!("cli reset: target replaced -> s2 terminated; source truncated -> s1 extent 1 ended");
}
