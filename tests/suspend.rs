//! Suspended sessions, through the library: a volume that is missing or cannot be opened
//! suspends the sessions using it (durably), blocks nothing else, refuses what would bypass
//! copy-before-write, and resumes when the volume is back as it was.

mod common;

use std::sync::Arc;

use timezero::activity::format::{ReasonCode, SessionState, VolumeRef};
use timezero::activity::{MemStorage, TableStorage};
use timezero::engine::{
    Engine, EngineOptions, MapResolver, Outcome, RestartPolicy, SessionSpec, VolumeResolver,
};
use timezero::ids::SessionId;
use timezero::volume::{MemVolume, Volume};
use timezero::Error;

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
    assert_eq!(e.session(s1).unwrap().copied(), 2);
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

fn decision(e: &Engine, id: SessionId) -> &timezero::engine::Decision {
    e.decisions.iter().find(|d| d.session == id.0).unwrap()
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
    // A grain copied before suspension no longer needs the target: the write goes through.
    e.write(ia, 0, &[3u8; 4096]).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        e.read_image(f.s1, 0, &mut buf),
        Err(Error::Suspended { .. })
    ));
    assert!(matches!(e.image(f.s1), Err(Error::Suspended { .. })));
    assert_eq!(e.copy_all(f.s1, 4).unwrap(), 0);
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
    assert_eq!(s.copied(), 2);
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    e.write(ia, 200_000, &[1u8; 4096]).unwrap();
    assert_eq!(common::image(&e, f.s1), f.t0[0]);
    e.copy_all(f.s1, 4).unwrap();
    assert_eq!(
        e.session(f.s1).unwrap().status().state,
        SessionState::Completed
    );
    assert_eq!(&b.snapshot()[..], &f.t0[0][..]);
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
