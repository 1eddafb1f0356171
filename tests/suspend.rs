//! Suspended sessions, through the library: a volume that is missing or cannot be opened
//! suspends the sessions using it (durably), blocks nothing else, refuses what would bypass
//! copy-before-write, and resumes when the volume is back as it was.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use timezero::fault::internals::format::{ReasonCode, SessionState, VolumeRef};
use timezero::Error;
use timezero::SessionId;
use timezero::{
    Engine, EngineOptions, MapResolver, Outcome, RestartPolicy, SessionSpec, VolumeResolver,
};
use timezero::{MemStorage, TableStorage};
use timezero::{MemVolume, Volume};

const LEN: usize = 1 << 20;

/// A table with two sessions: s1 `a` -> `b` (copy mode, some grains copied by writes) and
/// s2 `c` -> `d`. Returns the storage, the volumes `[a, b, c, d]`, the session ids and their
/// T0 images.
struct Fixture {
    storage: Arc<MemStorage>,
    vols: Vec<Arc<MemVolume>>,
    s1: SessionId,
    s2: SessionId,
    t0: [Vec<u8>; 2],
}

fn fixture() -> Fixture {
    fixture_closed(false)
}

/// [`fixture`]; with `close`, the engine that made it is closed (its volumes flushed, so the
/// table has no checked copy left to prove), else dropped as a crash would leave it.
fn fixture_closed(close: bool) -> Fixture {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let a0 = common::pattern(1, LEN);
    let c0 = common::pattern(2, LEN);
    let vols = vec![
        Arc::new(MemVolume::with_data("a", &a0)),
        Arc::new(MemVolume::new("b", LEN)),
        Arc::new(MemVolume::with_data("c", &c0)),
        Arc::new(MemVolume::new("d", LEN)),
    ];
    let ids: Vec<_> = vols
        .iter()
        .map(|v| e.attach(v.clone() as Arc<dyn Volume>))
        .collect();
    let s1 = e.establish(&SessionSpec::whole(ids[0], ids[1])).unwrap();
    let s2 = e.establish(&SessionSpec::whole(ids[2], ids[3])).unwrap();
    // Copy-before-write of grains 0 and 1 of s1: they must stay copied across suspension.
    e.write(ids[0], 0, &[9u8; 70_000]).unwrap();
    e.flush(ids[0]).unwrap();
    assert_eq!(e.session(s1).unwrap().copied(), timezero::GrainCount(2));
    if close {
        e.close().unwrap();
    }
    Fixture {
        storage,
        vols,
        s1,
        s2,
        t0: [a0, c0],
    }
}

fn resolver(vols: &[&Arc<MemVolume>]) -> MapResolver {
    let mut r = MapResolver::default();
    for v in vols {
        r.add((*v).clone() as Arc<dyn Volume>);
    }
    r
}

fn open_with(storage: &Arc<MemStorage>, r: &dyn VolumeResolver, restart: RestartPolicy) -> Engine {
    let s: Arc<dyn TableStorage> = storage.clone();
    Engine::open(
        s,
        r,
        EngineOptions {
            restart,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

fn open(storage: &Arc<MemStorage>, r: &dyn VolumeResolver) -> Engine {
    open_with(storage, r, RestartPolicy::Resume)
}

fn decision(e: &Engine, id: SessionId) -> &timezero::Decision {
    e.decisions.iter().find(|d| d.session == id).unwrap()
}

/// A missing target suspends its session on open (instead of terminating it); the other
/// session resumes and works; writes that would need copy-before-write for the suspended
/// session, its image reads and its copy are refused; when the target is back the session
/// resumes with its copied bits and its image is T0-exact.
#[test]
fn missing_target_suspends_on_open_and_resumes_when_back() {
    let f = fixture();
    let [a, b, c, d] = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    let e = open(&f.storage, &resolver(&[a, c, d]));
    let st = e.session(f.s1).unwrap().status();
    assert_eq!(st.state, SessionState::Suspended);
    let r = st.reason.clone().unwrap();
    assert_eq!(r.code, ReasonCode::TargetUnavailable);
    assert_eq!(r.detail, "not found");
    assert!(matches!(decision(&e, f.s1).outcome, Outcome::Suspended(_)));
    let status = e.status();
    assert_eq!(status[0].unavailable.as_deref(), Some("mem:b"));
    assert_eq!(status[1].unavailable, None);
    // The other session is untouched.
    assert_eq!(
        e.session(f.s2).unwrap().status().state,
        SessionState::Active
    );
    let (ia, ic) = (a.info().id, c.info().id);
    e.write(ic, 4096, &[7u8; 8192]).unwrap();
    assert_eq!(common::image(&e, f.s2), f.t0[1]);
    // The source of the suspended session refuses a write to an uncopied grain, naming the
    // session and the missing path; nothing reaches the source.
    let before = a.snapshot();
    match e.write(ia, 200_000, &[1u8; 4096]) {
        Err(Error::Suspended { id, role, path, .. }) => {
            assert_eq!((id, role, path.as_str()), (f.s1, "target", "mem:b"));
        }
        other => panic!("write to the source of a suspended session: {other:?}"),
    }
    let msg = e.write(ia, 200_000, &[1u8; 4096]).unwrap_err().to_string();
    assert!(msg.contains("s1") && msg.contains("mem:b"), "{msg}");
    assert_eq!(a.snapshot(), before);
    // The engine that copied grains 0 and 1 ended without a close: their checked records
    // are not proven yet (the T0 bytes may be only on the missing target), so the source
    // keeps them until the target is back (`grain_proven_before_suspension_takes_writes`
    // shows a clean close).
    assert!(matches!(
        e.write(ia, 0, &[3u8; 4096]),
        Err(Error::Suspended { .. })
    ));
    assert_eq!(a.snapshot(), before);
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        e.read_image(f.s1, 0, &mut buf),
        Err(Error::Suspended { .. })
    ));
    assert!(matches!(e.image(f.s1), Err(Error::Suspended { .. })));
    assert_eq!(
        e.copy_all(f.s1, timezero::GrainCount(4)).unwrap(),
        timezero::GrainCount(0)
    );
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Suspended
    );
    drop(e);
    // Back with the same identity: resumes on open, copied bits kept, T0-exact.
    let e = open(&f.storage, &resolver(&[a, b, c, d]));
    let dd = decision(&e, f.s1);
    assert!(matches!(dd.outcome, Outcome::Resumed) && dd.was_suspended);
    let s = e.session(f.s1).unwrap();
    assert_eq!(s.status().state, SessionState::Active);
    assert_eq!(s.status().reason, None);
    assert_eq!(s.copied(), timezero::GrainCount(2));
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    e.write(ia, 200_000, &[1u8; 4096]).unwrap();
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    e.copy_all(f.s1, timezero::GrainCount(4)).unwrap();
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Completed
    );
    assert_eq!(&b.snapshot()[..], &f.t0[0][..]);
}

/// A grain whose copy was made durable before the suspension (the engine closed cleanly)
/// needs the target no more: a write to it on the source goes through while the session is
/// suspended, and the image is T0-exact when the target is back.
#[test]
fn grain_proven_before_suspension_takes_writes() {
    let f = fixture_closed(true);
    let [a, b, c, d] = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    let e = open(&f.storage, &resolver(&[a, c, d]));
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Suspended
    );
    let ia = a.info().id;
    e.write(ia, 0, &[3u8; 4096]).unwrap();
    assert_eq!(&a.snapshot()[..4096], &[3u8; 4096][..]);
    drop(e);
    let e = open(&f.storage, &resolver(&[a, b, c, d]));
    assert!(matches!(decision(&e, f.s1).outcome, Outcome::Resumed));
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
}

/// Suspension is durable: reopening while the volume is still missing keeps the session
/// suspended (without journaling it again), and a missing source suspends with its own reason.
#[test]
fn suspension_is_durable_and_names_the_missing_source() {
    let f = fixture();
    let [a, b, c, d] = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    drop(open(&f.storage, &resolver(&[b, c, d])));
    let e = open(&f.storage, &resolver(&[b, c, d]));
    let st = e.session(f.s1).unwrap().status();
    assert_eq!(st.state, SessionState::Suspended);
    assert_eq!(st.reason.unwrap().code, ReasonCode::SourceUnavailable);
    assert_eq!(e.status()[0].unavailable.as_deref(), Some("mem:a"));
    // Still missing: nothing new to record.
    assert!(decision(&e, f.s1).was_suspended);
    let commits = &e.table().stats.commits;
    assert_eq!(commits.load(std::sync::atomic::Ordering::Relaxed), 0);
    // A target write to an uncopied grain would need the source's T0 bytes first: refused.
    let ib = b.info().id;
    assert!(matches!(
        e.write(ib, 500_000, &[1u8; 512]),
        Err(Error::Suspended { role: "source", .. })
    ));
    assert!(matches!(
        e.write_image(f.s1, 500_000, &[1u8; 512]),
        Err(Error::Suspended { .. })
    ));
    drop(e);
    let e = open(&f.storage, &resolver(&[a, b, c, d]));
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    assert_eq!(common::image(&e, f.s2), f.t0[1]);
}

/// A resolver error (a volume that exists but cannot be opened) no longer fails the whole
/// open: that session is suspended with the error, the others resume.
#[test]
fn unopenable_volume_suspends_instead_of_failing_open() {
    struct Failing(MapResolver);
    impl VolumeResolver for Failing {
        fn resolve(&self, r: &VolumeRef) -> timezero::Result<Option<Arc<dyn Volume>>> {
            if r.locator == "mem:b" {
                return Err(Error::io(
                    "open",
                    "mem:b",
                    0,
                    std::io::Error::from_raw_os_error(21),
                ));
            }
            self.0.resolve(r)
        }
    }
    let f = fixture();
    let [a, b, c, d] = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    let e = open(&f.storage, &Failing(resolver(&[a, b, c, d])));
    let r = e.session(f.s1).unwrap().status().reason.unwrap();
    assert_eq!(r.code, ReasonCode::TargetUnavailable);
    assert!(r.detail.contains("mem:b"), "{}", r.detail);
    assert_eq!(common::image(&e, f.s2), f.t0[1]);
    // Engine::resume with a resolver that can open it now.
    let dd = e.resume(f.s1, &resolver(&[a, b, c, d])).unwrap();
    assert!(matches!(dd.outcome, Outcome::Resumed) && dd.was_suspended);
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    // Resuming an active session changes nothing.
    let dd = e.resume(f.s1, &resolver(&[])).unwrap();
    assert!(matches!(dd.outcome, Outcome::Resumed) && !dd.was_suspended);
}

/// A volume that comes back as another volume (another identity at the same locator) still
/// terminates the session with `IdentityMismatch`.
#[test]
fn volume_back_with_another_identity_terminates() {
    let f = fixture();
    let [a, _, c, d] = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    let e = open(&f.storage, &resolver(&[a, c, d]));
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Suspended
    );
    let mut r = resolver(&[a, c, d]);
    let impostor: Arc<dyn Volume> = Arc::new(MemVolume::new("other", LEN));
    r.volumes.insert("mem:b".to_string(), impostor);
    let dd = e.resume(f.s1, &r).unwrap();
    match dd.outcome {
        Outcome::Terminated(r) => assert_eq!(r.code, ReasonCode::IdentityMismatch),
        o => panic!("{o:?}"),
    }
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Terminated
    );
}

/// A reset that finds a volume gone suspends its sessions (its old handle is no longer used);
/// a reset that finds it back, or `Engine::resume`, resumes them.
#[test]
fn reset_gone_suspends_and_reset_or_resume_brings_it_back() {
    let f = fixture();
    let all = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    let e = open(&f.storage, &resolver(&all));
    let (ia, ib) = (f.vols[0].info().id, f.vols[1].info().id);
    let ds = e.reset(ib, None).unwrap();
    assert_eq!(ds.len(), 1);
    assert!(matches!(ds[0].outcome, Outcome::Suspended(_)));
    assert!(matches!(
        e.write(ia, 300_000, &[1u8; 512]),
        Err(Error::Suspended { .. })
    ));
    // The gone volume is detached: it cannot be used through the engine until it is back.
    assert!(e.volume(ib).is_err());
    let ds = e
        .reset(ib, Some(f.vols[1].clone() as Arc<dyn Volume>))
        .unwrap();
    assert!(matches!(ds[0].outcome, Outcome::Resumed) && ds[0].was_suspended);
    e.write(ia, 300_000, &[1u8; 512]).unwrap();
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    e.reset(ib, None).unwrap();
    let dd = e.resume(f.s1, &resolver(&all)).unwrap();
    assert!(matches!(dd.outcome, Outcome::Resumed));
    e.write(ia, 600_000, &[1u8; 512]).unwrap();
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    drop(e);
    let e = open(&f.storage, &resolver(&all));
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
}

/// An explicit withdraw and the terminate-incomplete restart policy still end a suspended
/// session.
#[test]
fn withdraw_and_terminate_incomplete_end_a_suspended_session() {
    let f = fixture();
    let [a, b, c, d] = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    let e = open(&f.storage, &resolver(&[a, c, d]));
    e.withdraw(f.s1).unwrap();
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Withdrawn
    );
    // Writes to its former source go straight through now.
    e.write(a.info().id, 300_000, &[1u8; 512]).unwrap();
    drop(e);

    let f = fixture();
    let [a, _, c, d] = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    drop(open(&f.storage, &resolver(&[a, c, d])));
    let e = open_with(
        &f.storage,
        &resolver(&[a, b, c, d]),
        RestartPolicy::TerminateIncomplete,
    );
    let st = e.session(f.s1).unwrap().status();
    assert_eq!(st.state, SessionState::Terminated);
    assert_eq!(st.reason.unwrap().code, ReasonCode::RestartPolicy);
    assert!(decision(&e, f.s1).was_suspended);
}

// Through the command line, on real files.

mod cli {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    const MIB: usize = 1 << 20;

    fn run(dir: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_timezero"))
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run timezero")
    }

    fn ok(dir: &Path, args: &[&str]) -> String {
        let o = run(dir, args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).expect("utf-8")
    }

    /// Runs and must fail with exit 1 and one line on stderr; returns that line.
    fn fails(dir: &Path, args: &[&str]) -> String {
        let o = run(dir, args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        err
    }

    fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
        let data = timezero::fault::fuzzing::fill(seed, len);
        std::fs::write(path, &data).expect("write file");
        data
    }

    /// `init`, then a session `SRC` -> `TGT` (1 MiB each, 64 KiB grains) on table `TABLE`.
    fn session(d: &Path, table: &str, src: &str, tgt: &str, seed: u64) -> Vec<u8> {
        let data = if d.join(src).exists() {
            std::fs::read(d.join(src)).expect("source")
        } else {
            random_file(&d.join(src), MIB, seed)
        };
        std::fs::write(d.join(tgt), vec![0u8; MIB]).expect("target");
        ok(d, &["init", table]);
        assert_eq!(
            ok(d, &["establish", table, src, tgt]).split(':').next(),
            Some("s1")
        );
        data
    }

    fn export(d: &Path, table: &str, session: &str) -> Vec<u8> {
        let out = format!("{session}.{table}.out");
        let _ = std::fs::remove_file(d.join(&out));
        ok(d, &["export", table, session, &out]);
        std::fs::read(d.join(out)).expect("exported image")
    }

    fn canon(d: &Path, name: &str) -> String {
        std::fs::canonicalize(d)
            .expect("dir")
            .join(name)
            .display()
            .to_string()
    }

    /// The target moved away for a moment: commands suspend the session instead of ending it;
    /// what would bypass copy-before-write is refused with the session and path named; moved
    /// back, `resume` resumes it and its image is still T0-exact.
    #[test]
    fn moved_target_suspends_and_resumes_t0_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let t0 = session(d, "t.tzt", "src.img", "tgt.img", 1);
        std::fs::write(d.join("patch"), vec![0xee; 4096]).expect("patch");
        ok(d, &["write", "t.tzt", "src.img", "0", "--from", "patch"]);
        std::fs::rename(d.join("tgt.img"), d.join("tgt.away")).expect("move away");
        let tgt = canon(d, "tgt.img");

        // `status` reads the committed state and changes nothing: the session is still active
        // until a command that opens the table reconciles it.
        assert!(ok(d, &["status", "t.tzt"]).contains("s1 active"));
        ok(d, &["recover", "t.tzt"]);
        let st = ok(d, &["status", "t.tzt"]);
        assert!(st.contains("s1 suspended"), "{st}");
        assert!(st.contains("TargetUnavailable: not found"), "{st}");
        assert!(st.contains(&format!("volume {tgt}")), "{st}");
        let js: serde_json::Value =
            serde_json::from_str(&ok(d, &["status", "t.tzt", "--json"])).expect("json");
        assert_eq!(js["sessions"][0]["state"], "suspended");
        assert_eq!(js["sessions"][0]["reason"]["code"], "TargetUnavailable");
        assert_eq!(js["sessions"][0]["unavailable"], tgt.as_str());

        let before = std::fs::read(d.join("src.img")).expect("src");
        let err = fails(
            d,
            &["write", "t.tzt", "src.img", "131072", "--from", "patch"],
        );
        assert!(
            err.contains("session s1 is suspended") && err.contains(&tgt),
            "{err}"
        );
        assert_eq!(std::fs::read(d.join("src.img")).expect("src"), before);
        let err = fails(d, &["read", "t.tzt", "s1", "0", "4096", "--to", "r.out"]);
        assert!(err.contains("session s1 is suspended"), "{err}");
        let err = fails(d, &["copy", "t.tzt", "s1"]);
        assert!(err.contains("session s1 is suspended"), "{err}");
        let err = fails(d, &["resume", "t.tzt", "s1"]);
        assert!(
            err.contains("session s1 is suspended") && err.contains(&tgt),
            "{err}"
        );

        std::fs::rename(d.join("tgt.away"), d.join("tgt.img")).expect("move back");
        assert_eq!(ok(d, &["resume", "t.tzt", "s1"]).trim(), "s1 resumed");
        let st = ok(d, &["status", "t.tzt"]);
        assert!(st.contains("s1 active") && st.contains(" 1/16 "), "{st}");
        assert!(export(d, "t.tzt", "s1") == t0, "image differs from T0");
        ok(
            d,
            &["write", "t.tzt", "src.img", "131072", "--from", "patch"],
        );
        assert!(export(d, "t.tzt", "s1") == t0, "image differs from T0");
        ok(d, &["copy", "t.tzt", "s1"]);
        assert!(std::fs::read(d.join("tgt.img")).expect("tgt") == t0);
    }

    /// A directory at a target's path suspends that session only: every command on the table
    /// still works, the other session is untouched; `reset` reports the suspension and, with
    /// the file back, the resumption.
    #[test]
    fn directory_at_volume_path_suspends_only_its_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let t1 = session(d, "t.tzt", "src1.img", "tgt1.img", 2);
        let t2 = random_file(&d.join("src2.img"), MIB, 3);
        std::fs::write(d.join("tgt2.img"), vec![0u8; MIB]).expect("tgt2");
        assert_eq!(
            ok(d, &["establish", "t.tzt", "src2.img", "tgt2.img"])
                .split(':')
                .next(),
            Some("s2")
        );
        std::fs::write(d.join("patch"), vec![0x11; 8192]).expect("patch");
        std::fs::rename(d.join("tgt1.img"), d.join("tgt1.away")).expect("move away");
        std::fs::create_dir(d.join("tgt1.img")).expect("mkdir");

        ok(d, &["recover", "t.tzt"]);
        let st = ok(d, &["status", "t.tzt"]);
        assert!(
            st.contains("s1 suspended") && st.contains("Is a directory"),
            "{st}"
        );
        assert!(st.contains("s2 active"), "{st}");
        ok(
            d,
            &["write", "t.tzt", "src2.img", "65536", "--from", "patch"],
        );
        assert!(export(d, "t.tzt", "s2") == t2, "s2 image differs from T0");
        let err = fails(
            d,
            &["write", "t.tzt", "src1.img", "65536", "--from", "patch"],
        );
        assert!(err.contains("session s1 is suspended"), "{err}");
        let out = ok(d, &["reset", "t.tzt", "tgt1.img"]);
        assert!(out.contains("s1: suspended"), "{out}");

        std::fs::remove_dir(d.join("tgt1.img")).expect("rmdir");
        std::fs::rename(d.join("tgt1.away"), d.join("tgt1.img")).expect("move back");
        let out = ok(d, &["reset", "t.tzt", "tgt1.img"]);
        assert!(out.contains("s1: resumed"), "{out}");
        assert!(export(d, "t.tzt", "s1") == t1, "s1 image differs from T0");
    }

    /// Makes a file immutable while it lives (root and a file system with the attribute only).
    struct Immutable(PathBuf);

    impl Immutable {
        fn set(path: &Path) -> Option<Immutable> {
            let st = Command::new("chattr").arg("+i").arg(path).output().ok()?;
            st.status.success().then(|| Immutable(path.to_path_buf()))
        }
    }

    impl Drop for Immutable {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }

    /// An immutable target (it cannot be opened for writing) suspends its session instead of
    /// failing every command; writable again, the session resumes.
    #[test]
    fn immutable_target_suspends_its_session() {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            eprintln!("skipped: chattr +i needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let t0 = session(d, "t.tzt", "src.img", "tgt.img", 4);
        let Some(guard) = Immutable::set(&d.join("tgt.img")) else {
            eprintln!(
                "skipped: the file system of {} refuses chattr +i",
                d.display()
            );
            return;
        };
        ok(d, &["recover", "t.tzt"]);
        let st = ok(d, &["status", "t.tzt"]);
        assert!(
            st.contains("s1 suspended") && st.contains("not permitted"),
            "{st}"
        );
        std::fs::write(d.join("patch"), vec![0x22; 4096]).expect("patch");
        let err = fails(d, &["write", "t.tzt", "src.img", "0", "--from", "patch"]);
        assert!(err.contains("session s1 is suspended"), "{err}");
        drop(guard);
        assert_eq!(ok(d, &["resume", "t.tzt", "s1"]).trim(), "s1 resumed");
        ok(d, &["write", "t.tzt", "src.img", "0", "--from", "patch"]);
        assert!(export(d, "t.tzt", "s1") == t0, "image differs from T0");
    }

    /// A `timezero serve` process, killed when dropped.
    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Forwarded to a running `serve`: a reset of a volume that is gone suspends its session,
    /// writes and reads are refused, and `resume` resumes it once the volume is back.
    #[test]
    fn reset_and_resume_forwarded_to_serve() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let t0 = session(d, "t.tzt", "src.img", "tgt.img", 5);
        let server = Server(
            Command::new(env!("CARGO_BIN_EXE_timezero"))
                .current_dir(d)
                .args(["serve", "t.tzt"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("serve"),
        );
        let ctl = timezero::control::socket_path(&d.join("t.tzt"));
        let start = Instant::now();
        while UnixStream::connect(&ctl).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no control socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(d.join("patch"), vec![0x33; 4096]).expect("patch");
        std::fs::rename(d.join("tgt.img"), d.join("tgt.away")).expect("move away");
        let tgt = canon(d, "tgt.img");
        let out = ok(d, &["reset", "t.tzt", "tgt.img"]);
        assert!(out.contains("s1: suspended"), "{out}");
        assert!(ok(d, &["status", "t.tzt"]).contains("s1 suspended"));
        let err = fails(d, &["write", "t.tzt", "src.img", "0", "--from", "patch"]);
        assert!(
            err.contains("session s1 is suspended") && err.contains(&tgt),
            "{err}"
        );
        let err = fails(d, &["read", "t.tzt", "s1", "0", "4096", "--to", "r.out"]);
        assert!(err.contains("session s1 is suspended"), "{err}");
        let err = fails(d, &["resume", "t.tzt", "s1"]);
        assert!(err.contains("session s1 is suspended"), "{err}");

        std::fs::rename(d.join("tgt.away"), d.join("tgt.img")).expect("move back");
        assert_eq!(ok(d, &["resume", "t.tzt", "s1"]).trim(), "s1 resumed");
        ok(d, &["write", "t.tzt", "src.img", "0", "--from", "patch"]);
        assert!(export(d, "t.tzt", "s1") == t0, "image differs from T0");
        // Active and no copy running: `resume` has nothing to resume.
        let err = fails(d, &["resume", "t.tzt", "s1"]);
        assert!(err.contains("no copy of s1 is running"), "{err}");
        drop(server);
    }

    /// `recover --terminate-incomplete` and `withdraw` end a suspended session; a volume back
    /// with another identity (a copy at the same path) terminates it.
    #[test]
    fn suspended_sessions_still_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for (table, tgt) in [
            ("a.tzt", "ta.img"),
            ("b.tzt", "tb.img"),
            ("c.tzt", "tc.img"),
        ] {
            session(d, table, "src.img", tgt, 6);
            std::fs::rename(d.join(tgt), d.join("away")).expect("move away");
            ok(d, &["recover", table]);
            assert!(ok(d, &["status", table]).contains("s1 suspended"));
            std::fs::rename(d.join("away"), d.join(format!("{tgt}.away"))).expect("keep");
        }
        let out = ok(d, &["recover", "a.tzt", "--terminate-incomplete"]);
        assert!(
            out.contains("s1: terminated") && out.contains("RestartPolicy"),
            "{out}"
        );
        assert!(ok(d, &["status", "a.tzt"]).contains("s1 terminated"));
        assert_eq!(ok(d, &["withdraw", "b.tzt", "s1"]).trim(), "s1 withdrawn");
        assert!(ok(d, &["status", "b.tzt"]).contains("s1 withdrawn"));
        // A copy is another file (another inode): another volume.
        std::fs::copy(d.join("tc.img.away"), d.join("tc.img")).expect("copy back");
        ok(d, &["recover", "c.tzt"]);
        let st = ok(d, &["status", "c.tzt"]);
        assert!(
            st.contains("s1 terminated") && st.contains("IdentityMismatch"),
            "{st}"
        );
    }
}

/// A full table forgets ended sessions to make room, never a suspended one.
#[test]
fn a_full_table_never_forgets_a_suspended_session() {
    let f = fixture();
    let all = [&f.vols[0], &f.vols[1], &f.vols[2], &f.vols[3]];
    let e = open(&f.storage, &resolver(&all));
    e.reset(f.vols[1].info().id, None).unwrap();
    let src = f.vols[2].info().id;
    // More sessions than the table holds at once: each is withdrawn, and the ended ones are
    // forgotten to make room for the next.
    for n in 0..1100 {
        let t = e.attach(Arc::new(MemVolume::new(&format!("t{n}"), 65_536)));
        let spec = SessionSpec {
            mode: timezero::fault::internals::format::CopyMode::NoCopy,
            extents: vec![timezero::fault::internals::format::ExtentSpec {
                source_offset: 0,
                target_offset: 0,
                len: 65_536,
            }],
            ..SessionSpec::whole(src, t)
        };
        let id = e.establish(&spec).unwrap();
        e.withdraw(id).unwrap();
    }
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Suspended
    );
    assert!(e.session(f.s2).is_ok());
}
