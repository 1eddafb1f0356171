//! Forgetting ended sessions, explicitly and to make room.
//!
//! Goal: `Engine::forget` and `Engine::forget_ended` remove ended sessions durably and refuse
//! live ones with a typed error; `Engine::room` tells how many session slots are free and which
//! ended sessions an establish that needs room forgets first, and an establish that needs room
//! forgets exactly those, in that order. The same through the binary (`forget`, `status`).

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::sync::Arc;

use timezero::Error;
use timezero::TableStorage;
use timezero::{Engine, EngineOptions, MapResolver, SessionSpec};
use timezero::{GrainSize, SessionId};
use timezero::{MemVolume, Volume};
use timezero::{Reason, ReasonCode, SessionState};

const SIZE: usize = 1 << 20;

fn spec(s: &Arc<MemVolume>, t: &Arc<MemVolume>) -> SessionSpec {
    SessionSpec {
        grain: GrainSize::new(4096).unwrap(),
        ..SessionSpec::whole(s.info().id, t.info().id)
    }
}

#[test]
fn forget_removes_ended_sessions_and_refuses_live_ones() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let vols: Vec<Arc<MemVolume>> = (0..5)
        .map(|i| Arc::new(MemVolume::with_data(&format!("v{i}"), &vec![i as u8; SIZE])))
        .collect();
    for v in &vols {
        e.attach(v.clone());
    }
    let withdrawn = e.establish(&spec(&vols[0], &vols[1])).unwrap();
    let completed = e.establish(&spec(&vols[0], &vols[2])).unwrap();
    let terminated = e.establish(&spec(&vols[0], &vols[3])).unwrap();
    e.withdraw(withdrawn).unwrap();
    e.copy_all(completed, timezero::GrainCount(2)).unwrap();
    assert_eq!(
        e.session(completed).unwrap().state(),
        SessionState::Completed
    );
    e.terminate(terminated, Reason::new(ReasonCode::CopyFailed, "test"))
        .unwrap();
    let active = e.establish(&spec(&vols[4], &vols[1])).unwrap();
    let room = e.room();
    assert_eq!(room.sessions, 4);
    assert_eq!(room.slots_free, room.sessions_max - 4);
    assert_eq!(room.forget_order, vec![withdrawn, completed, terminated]);
    // Live sessions are refused, naming their state.
    match e.forget(active) {
        Err(Error::NotEnded { id, state }) => {
            assert_eq!((id, state.as_str()), (active, "active"));
        }
        r => panic!("{r:?}"),
    }
    assert!(matches!(
        e.forget(SessionId(99)),
        Err(Error::UnknownSession(SessionId(99)))
    ));
    e.forget(completed).unwrap();
    assert!(matches!(e.forget(completed), Err(Error::UnknownSession(_))));
    assert_eq!(e.room().forget_order, vec![withdrawn, terminated]);
    // Durable: gone after a reopen too; then every ended one at once, in one commit.
    drop(e);
    let e = common::reopen(&storage, &vols);
    let ids: Vec<_> = e.status().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![withdrawn, terminated, active]);
    let commits = e
        .table()
        .stats
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(e.forget_ended().unwrap(), vec![withdrawn, terminated]);
    assert_eq!(
        e.table()
            .stats
            .commits
            .load(std::sync::atomic::Ordering::Relaxed),
        commits + 1
    );
    assert_eq!(e.forget_ended().unwrap(), Vec::<SessionId>::new());
    drop(e);
    let e = common::reopen(&storage, &vols);
    let ids: Vec<_> = e.status().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![active]);
    assert!(common::image(&e, active) == vec![4u8; SIZE]);
}

#[test]
fn a_suspended_session_is_not_forgotten() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let s = Arc::new(MemVolume::with_data("s", &vec![1u8; SIZE]));
    let t = Arc::new(MemVolume::new("t", SIZE));
    e.attach(s.clone());
    e.attach(t.clone());
    let id = e.establish(&spec(&s, &t)).unwrap();
    drop(e);
    // Reopened without its target: suspended, not ended.
    let mut r = MapResolver::default();
    r.add(s.clone() as Arc<dyn Volume>);
    let st: Arc<dyn TableStorage> = storage.clone();
    let e = Engine::open(st, &r, EngineOptions::default()).unwrap();
    assert_eq!(e.session(id).unwrap().state(), SessionState::Suspended);
    assert!(e.room().forget_order.is_empty());
    assert!(matches!(
        e.forget(id),
        Err(Error::NotEnded { state, .. }) if state == "suspended"
    ));
    assert!(e.forget_ended().unwrap().is_empty());
    assert!(e.session(id).is_ok());
}

/// Sessions are established and withdrawn until the table needs room: the establish that
/// needs it forgets the first sessions of `room().forget_order`, oldest first, and nothing
/// else.
#[test]
fn making_room_forgets_the_sessions_status_names_first() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = common::create(&storage, opts);
    let s = Arc::new(MemVolume::new("s", SIZE));
    let t = Arc::new(MemVolume::new("t", SIZE));
    e.attach(s.clone());
    e.attach(t.clone());
    for round in 0..5000 {
        let before = e.room();
        let listed: Vec<SessionId> = e.status().iter().map(|x| x.id).collect();
        let id = e.establish(&spec(&s, &t)).unwrap();
        let now: Vec<SessionId> = e.status().iter().map(|x| x.id).collect();
        let gone: Vec<SessionId> = listed
            .iter()
            .filter(|x| !now.contains(x))
            .copied()
            .collect();
        if !gone.is_empty() {
            assert_eq!(
                gone,
                before.forget_order[..gone.len()].to_vec(),
                "round {round}: forgotten other than the first of the forget order"
            );
            return;
        }
        e.withdraw(id).unwrap();
    }
    panic!("the table never needed room");
}

mod cli {
    use std::path::Path;

    use super::common::cli::ok_in as ok;

    fn fails(dir: &Path, args: &[&str], code: i32) -> String {
        let o = super::common::cli::tz()
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    }

    #[test]
    fn forget_and_status_room() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for n in ["a", "b", "c", "e"] {
            std::fs::write(d.join(n), vec![0u8; 1 << 20]).unwrap();
        }
        ok(d, &["init", "t.tzt"]);
        ok(d, &["establish", "t.tzt", "a", "b"]);
        ok(d, &["establish", "t.tzt", "a", "c"]);
        ok(d, &["establish", "t.tzt", "a", "e"]);
        let st = ok(d, &["status", "t.tzt"]);
        assert!(
            st.contains("room: 1021 of 1024 session slots free")
                && st.contains("no ended session to forget"),
            "{st}"
        );
        let err = fails(d, &["forget", "t.tzt", "s1"], 1);
        assert!(
            err.contains("session s1 is active") && err.contains("withdraw it first"),
            "{err}"
        );
        ok(d, &["withdraw", "t.tzt", "s1"]);
        ok(d, &["withdraw", "t.tzt", "s2"]);
        let st = ok(d, &["status", "t.tzt"]);
        assert!(
            st.contains("ended sessions forgotten first when room is needed: s1 s2"),
            "{st}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&ok(d, &["status", "t.tzt", "--json"])).unwrap();
        assert_eq!(v["room"]["slots_free"], 1021);
        assert_eq!(v["room"]["forget_order"], serde_json::json!(["s1", "s2"]));
        assert_eq!(ok(d, &["forget", "t.tzt", "s2"]), "s2 forgotten\n");
        let err = fails(d, &["forget", "t.tzt", "s2"], 1);
        assert!(err.contains("unknown session s2"), "{err}");
        ok(d, &["withdraw", "t.tzt", "s3"]);
        let v: serde_json::Value =
            serde_json::from_str(&ok(d, &["forget", "t.tzt", "--ended", "--json"])).unwrap();
        assert_eq!(v["forgotten"], serde_json::json!(["s1", "s3"]));
        assert_eq!(
            ok(d, &["forget", "t.tzt", "--ended"]),
            "no ended session to forget\n"
        );
        let st = ok(d, &["status", "t.tzt"]);
        assert!(
            st.starts_with("no sessions") && st.contains("1024 of 1024"),
            "{st}"
        );
        // Usage: a session and --ended, or neither.
        fails(d, &["forget", "t.tzt"], 2);
        fails(d, &["forget", "t.tzt", "s1", "--ended"], 2);
    }
}

/// A copy that took grains of a session before it was withdrawn commits them while `forget`
/// waits: the forget never slips between the copy and its commit (which would name a session
/// the table no longer has and fail the table). Holds on every interleaving of the two threads.
#[test]
fn forget_waits_for_a_copy_in_flight() {
    let opts = common::small_table();
    let storage = common::mem_storage(&opts);
    let e = Arc::new(common::create(&storage, opts));
    let s = Arc::new(MemVolume::with_data("s", &vec![5u8; SIZE]));
    let t = Arc::new(MemVolume::new("t", SIZE));
    e.attach(s.clone());
    e.attach(t.clone());
    let id = e.establish(&spec(&s, &t)).unwrap();
    let (_, hold) = e
        .copy_data(id, timezero::GrainIndex(0), timezero::GrainCount(4))
        .unwrap()
        .unwrap();
    let hold = hold.unwrap();
    e.withdraw(id).unwrap();
    let forgetter = {
        let e = e.clone();
        std::thread::spawn(move || e.forget(id))
    };
    e.commit_copied(id, vec![hold]).unwrap();
    forgetter.join().unwrap().unwrap();
    assert!(matches!(e.session(id), Err(Error::UnknownSession(_))));
    // The table is healthy: another session commits and the table reopens.
    let id2 = e.establish(&spec(&s, &t)).unwrap();
    e.copy_all(id2, timezero::GrainCount(8)).unwrap();
    drop(e);
    let e = common::reopen(&storage, &[s.clone(), t.clone()]);
    assert_eq!(e.session(id2).unwrap().state(), SessionState::Completed);
}

/// Establishes racing for the last free session slot: exactly one takes it, the others are
/// refused with `TableFull`, and the table stays healthy (it reopens with every session). Holds
/// on every interleaving of the racing threads.
#[test]
fn establishes_racing_for_the_last_slot_take_it_once() {
    const GRAIN: u64 = 4096;
    let opts = timezero::TableOptions::default();
    let storage = common::mem_storage(&opts);
    let e = Arc::new(common::create(&storage, opts));
    let max = timezero::limits::SESSIONS_MAX as u64;
    let s = Arc::new(MemVolume::with_data("s", &vec![1u8; GRAIN as usize]));
    let t = Arc::new(MemVolume::new("t", ((max + 8) * GRAIN) as usize));
    e.attach(s.clone());
    e.attach(t.clone());
    let one = |i: u64| SessionSpec {
        source: s.info().id,
        target: t.info().id,
        extents: vec![timezero::ExtentSpec {
            source_offset: 0,
            target_offset: i * GRAIN,
            len: GRAIN,
        }],
        grain: GrainSize::new(GRAIN).unwrap(),
        mode: timezero::CopyMode::NoCopy,
        incremental: false,
    };
    for i in 0..max - 1 {
        e.establish(&one(i)).unwrap();
    }
    let racers: Vec<_> = (0..4u64)
        .map(|k| {
            let e = e.clone();
            let spec = one(max - 1 + k);
            std::thread::spawn(move || e.establish(&spec))
        })
        .collect();
    let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for r in &results {
        if let Err(err) = r {
            assert!(
                matches!(err, Error::TableFull { what: "sessions" }),
                "{err}"
            );
        }
    }
    assert!(!e.table().is_poisoned());
    drop(e);
    let e = common::reopen(&storage, &[s.clone(), t.clone()]);
    assert_eq!(e.status().len() as u64, max);
}
