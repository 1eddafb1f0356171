//! Consistency groups: several sessions at one T0, durable in one commit, all or none.
//!
//! Goal: `Engine::establish_group` gives every pair one T0 (writes racing it are before T0 on
//! every image or after it on every image), makes the group durable in one commit, records the
//! group's name durably, establishes nothing when one pair is wrong (the error names the pair),
//! and `withdraw_group` ends the group in one commit. Crashes at every I/O of a group
//! establish are covered by the crash-state enumerator (its `basic` template ends with a
//! group); the binary killed during one by `group_establish_killed_is_all_or_none` below.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::{Arc, Barrier};

use timezero::activity::codec::{Reader, Writer};
use timezero::activity::format::{Entry, SessionDesc, SessionState};
use timezero::engine::{Engine, SessionSpec};
use timezero::ids::{GrainSize, SessionId};
use timezero::model::ExtentSpec;
use timezero::volume::MemVolume;
use timezero::Error;

const SIZE: usize = 256 << 10;

struct Rig {
    storage: Arc<timezero::activity::MemStorage>,
    vols: Vec<Arc<MemVolume>>,
    engine: Engine,
}

/// A table and volumes `v0..vN` of `SIZE` bytes, volume `i` filled with byte `i + 1`.
fn rig(n: usize) -> Rig {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let engine = common::create(&storage, opts);
    let vols: Vec<_> = (0..n)
        .map(|i| {
            Arc::new(MemVolume::with_data(
                &format!("v{i}"),
                &vec![i as u8 + 1; SIZE],
            ))
        })
        .collect();
    for v in &vols {
        engine.attach(v.clone());
    }
    Rig {
        storage,
        vols,
        engine,
    }
}

impl Rig {
    fn id(&self, i: usize) -> timezero::ids::VolumeId {
        use timezero::volume::Volume;
        self.vols[i].info().id
    }
    fn spec(&self, s: usize, t: usize) -> SessionSpec {
        SessionSpec {
            grain: GrainSize::new(4096).unwrap(),
            ..SessionSpec::whole(self.id(s), self.id(t))
        }
    }
}

#[test]
fn group_is_one_t0_one_commit_and_its_name_is_durable() {
    let r = rig(4);
    let e = &r.engine;
    let commits = e
        .table()
        .stats
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    let ids = e
        .establish_group("db", &[r.spec(0, 1), r.spec(2, 3)])
        .unwrap();
    assert_eq!(ids, vec![SessionId(1), SessionId(2)]);
    assert_eq!(
        e.table()
            .stats
            .commits
            .load(std::sync::atomic::Ordering::Relaxed),
        commits + 1,
        "one commit for the whole group"
    );
    e.write(r.id(0), 0, &[9u8; 4096]).unwrap();
    e.write(r.id(2), 8192, &[9u8; 4096]).unwrap();
    let st = e.status();
    assert_eq!(st.len(), 2);
    assert!(st.iter().all(|s| s.group.as_deref() == Some("db")));
    assert_eq!(st[0].created_unix_ms, st[1].created_unix_ms, "one T0");
    let again = r.spec(0, 1);
    drop(r.engine);
    let e = common::reopen(&r.storage, &r.vols);
    let st = e.status();
    assert!(
        st.iter().all(|s| s.group.as_deref() == Some("db")),
        "{st:?}"
    );
    assert_eq!(common::image(&e, ids[0]), vec![1u8; SIZE]);
    assert_eq!(common::image(&e, ids[1]), vec![3u8; SIZE]);
    assert_eq!(e.live_in_group("db"), ids);
    // Ending the group: one commit, every session withdrawn.
    let commits = e
        .table()
        .stats
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(e.withdraw_group("db").unwrap(), ids);
    assert_eq!(
        e.table()
            .stats
            .commits
            .load(std::sync::atomic::Ordering::Relaxed),
        commits + 1
    );
    assert!(e
        .status()
        .iter()
        .all(|s| s.state == SessionState::Withdrawn));
    assert!(matches!(e.withdraw_group("db"), Err(Error::UnknownGroup(g)) if g == "db"));
    // The name is free again once no session of it is live.
    e.establish_group("db", &[again]).unwrap();
}

#[test]
fn a_bad_pair_establishes_nothing_and_is_named() {
    let r = rig(5);
    let e = &r.engine;
    let small = Arc::new(MemVolume::new("small", 64 << 10));
    let small_id = e.attach(small);
    let before = e.table().next_session_id();
    let check =
        |res: timezero::Result<Vec<SessionId>>, pair: usize, inner: &dyn Fn(&Error) -> bool| {
            match res {
                Err(Error::GroupPair {
                    group,
                    pair: p,
                    error,
                    ..
                }) => {
                    assert_eq!((group.as_str(), p), ("g", pair));
                    assert!(inner(&error), "pair {pair}: {error}");
                }
                other => panic!("pair {pair}: {other:?}"),
            }
            assert!(e.status().is_empty(), "nothing established");
        };
    // Target too small (pair 2).
    let mut bad = r.spec(2, 3);
    bad.target = small_id;
    check(e.establish_group("g", &[r.spec(0, 1), bad]), 2, &|er| {
        matches!(er, Error::TargetTooSmall { .. })
    });
    // Two pairs of the group on one target range (pair 2 conflicts with pair 1).
    check(
        e.establish_group("g", &[r.spec(0, 1), r.spec(2, 1)]),
        2,
        &|er| matches!(er, Error::GroupConflict { other: 1, .. }),
    );
    // A pair's source is an earlier pair's target.
    check(
        e.establish_group("g", &[r.spec(0, 1), r.spec(1, 2)]),
        2,
        &|er| matches!(er, Error::GroupConflict { other: 1, .. }),
    );
    // A volume that is not attached (pair 3).
    let mut gone = r.spec(4, 0);
    gone.source = timezero::ids::VolumeId([7; 16]);
    gone.target = r.id(4);
    check(
        e.establish_group("g", &[r.spec(0, 1), r.spec(2, 3), gone]),
        3,
        &|er| matches!(er, Error::UnknownVolume(_)),
    );
    // Misaligned extent (pair 1).
    let mut mis = r.spec(0, 1);
    mis.extents = vec![ExtentSpec {
        source_offset: 512,
        target_offset: 0,
        len: 4096,
    }];
    check(e.establish_group("g", &[mis]), 1, &|er| {
        matches!(er, Error::Misaligned { .. })
    });
    // Against a live session: pair 2's target is in use.
    let other = e.establish(&r.spec(4, 3)).unwrap();
    check2(e, r.spec(0, 1), r.spec(2, 3), other);
    // Names.
    for name in ["", "-x", "a b", &"n".repeat(65)] {
        assert!(
            matches!(
                e.establish_group(name, &[r.spec(0, 1)]),
                Err(Error::Invalid { .. })
            ),
            "{name:?}"
        );
    }
    assert!(matches!(
        e.establish_group("g", &[]),
        Err(Error::Invalid { .. })
    ));
    e.establish_group("g", &[r.spec(0, 1)]).unwrap();
    assert!(matches!(
        e.establish_group("g", &[r.spec(2, 4)]),
        Err(Error::GroupExists { .. })
    ));
    assert!(e.table().next_session_id() > before);
}

fn check2(e: &Engine, a: SessionSpec, b: SessionSpec, other: SessionId) {
    let n = e.status().len();
    match e.establish_group("h", &[a, b]) {
        Err(Error::GroupPair { pair: 2, error, .. }) => assert!(
            matches!(*error, Error::TargetInUse { other: o, .. } if o == other),
            "{error}"
        ),
        r => panic!("{r:?}"),
    }
    assert_eq!(e.status().len(), n);
}

#[test]
fn a_group_too_large_for_one_commit_is_refused_whole() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    // Long locators: 8 pairs of about 4 KiB each cannot go into one journal commit.
    let mut specs = Vec::new();
    for i in 0..8 {
        let s = e.attach(Arc::new(MemVolume::new(
            &format!("s{i}{}", "x".repeat(2000)),
            64 << 10,
        )));
        let t = e.attach(Arc::new(MemVolume::new(
            &format!("t{i}{}", "y".repeat(2000)),
            64 << 10,
        )));
        specs.push(SessionSpec::whole(s, t));
    }
    match e.establish_group("big", &specs) {
        Err(Error::Invalid { what: "group", why }) => {
            assert!(why.contains("one journal commit"), "{why}")
        }
        r => panic!("{r:?}"),
    }
    assert!(e.status().is_empty());
    // Three of them fit (several journal blocks, still one commit) and survive a reopen.
    let ids = e.establish_group("big", &specs[..3]).unwrap();
    assert_eq!(ids.len(), 3);
    drop(e);
    let e = Engine::open(
        storage.clone() as Arc<dyn timezero::activity::TableStorage>,
        &timezero::engine::MapResolver::default(),
        timezero::engine::EngineOptions::default(),
    )
    .unwrap();
    let st = e.status();
    assert_eq!(st.len(), 3);
    assert!(st.iter().all(|s| s.group.as_deref() == Some("big")));
}

#[test]
fn the_group_name_round_trips_through_the_format() {
    let r = rig(2);
    let id = r
        .engine
        .establish_group("g.1_x-y", &[r.spec(0, 1)])
        .unwrap()[0];
    let desc: SessionDesc = r.engine.session(id).unwrap().desc.clone();
    assert_eq!(desc.group.as_deref(), Some("g.1_x-y"));
    let mut w = Writer::default();
    Entry::Establish(desc.clone()).encode(&mut w);
    assert_eq!(
        Entry::decode_all(&w.buf).unwrap(),
        vec![Entry::Establish(desc.clone())]
    );
    let mut w = Writer::default();
    let alone = SessionDesc {
        group: None,
        ..desc
    };
    alone.encode(&mut w);
    assert_eq!(
        SessionDesc::decode(&mut Reader::new(&w.buf, "t")).unwrap(),
        alone
    );
}

/// Writers bump a counter on source A, then on source B, one grain each, while a group
/// establish runs. T0 falls where no write to either source is in flight: after writer `w`'s
/// write `n` to A completed and before its write `n` to B started (then A holds `n`, B `n - 1`),
/// or after that write to B completed and before write `n + 1` to A started (both `n`). So on
/// every interleaving, each writer's counters on the images satisfy `b <= a <= b + 1`, whatever
/// the moment of T0. Two separate establishes could give `a < b` (B's T0 later than A's).
#[test]
fn writes_racing_a_group_establish_are_before_or_after_t0_on_every_image() {
    const WRITERS: usize = 4;
    const ROUNDS: usize = 12;
    const BUMPS: u64 = 300;
    let r = rig(0);
    let e = &r.engine;
    // Zeroed sources: counter 0 means "no write yet".
    let a = e.attach(Arc::new(MemVolume::new("a", SIZE)));
    let b = e.attach(Arc::new(MemVolume::new("b", SIZE)));
    let ta: Vec<_> = (0..ROUNDS)
        .map(|i| e.attach(Arc::new(MemVolume::new(&format!("ta{i}"), SIZE))))
        .collect();
    let tb: Vec<_> = (0..ROUNDS)
        .map(|i| e.attach(Arc::new(MemVolume::new(&format!("tb{i}"), SIZE))))
        .collect();
    let counter = |buf: &[u8]| u64::from_le_bytes(buf[..8].try_into().unwrap());
    // How often T0 fell inside the writers' run, and between a write to A and the one to B
    // (printed, not asserted: where T0 falls depends on scheduling).
    let (mut inside, mut between) = (0, 0);
    for round in 0..ROUNDS {
        let base = (round as u64) * BUMPS;
        let start = Barrier::new(WRITERS + 1);
        let ids = std::thread::scope(|s| {
            for w in 0..WRITERS {
                let start = &start;
                s.spawn(move || {
                    let off = (w as u64) * 4096;
                    start.wait();
                    for n in base + 1..=base + BUMPS {
                        let v = [n.to_le_bytes(); 512].concat();
                        e.write(a, off, &v).unwrap();
                        e.write(b, off, &v).unwrap();
                    }
                });
            }
            start.wait();
            let spec = |s, t| SessionSpec {
                grain: GrainSize::new(4096).unwrap(),
                ..SessionSpec::whole(s, t)
            };
            e.establish_group(
                &format!("r{round}"),
                &[spec(a, ta[round]), spec(b, tb[round])],
            )
            .unwrap()
        });
        for w in 0..WRITERS {
            let off = (w as u64) * 4096;
            let mut ia = vec![0u8; 4096];
            let mut ib = vec![0u8; 4096];
            e.read_image(ids[0], off, &mut ia).unwrap();
            e.read_image(ids[1], off, &mut ib).unwrap();
            // Every grain holds one whole write.
            assert!(
                ia.chunks(8).all(|c| c == &ia[..8]),
                "round {round} writer {w}"
            );
            assert!(
                ib.chunks(8).all(|c| c == &ib[..8]),
                "round {round} writer {w}"
            );
            let (ca, cb) = (counter(&ia), counter(&ib));
            if ca > base && ca < base + BUMPS {
                inside += 1;
            }
            if ca == cb + 1 {
                between += 1;
            }
            assert!(
                cb <= ca && ca <= cb + 1,
                "round {round} writer {w}: image of A holds {ca}, image of B {cb}"
            );
        }
        e.withdraw_group(&format!("r{round}")).unwrap();
    }
    println!(
        "{} writer images: T0 inside the run {inside}, between A and B {between}",
        ROUNDS * WRITERS
    );
}
