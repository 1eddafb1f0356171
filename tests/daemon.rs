//! `timezero daemon` on the real binary, the real SQLite store and file volumes: start and stop
//! (SIGTERM and `daemon stop`), a second daemon refused, `plan run` handed to the daemon, a
//! schedule firing on the daemon's (manual) clock, and a restore requested through the daemon
//! (JOB-10).

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod daemon_rig;

use std::process::Command;

use daemon_rig::{at, text, Rig, T0};
use timezero::store::{JobKind, JobState, JobStatus, OccurrenceOutcome, OccurrenceQuery, Store};

fn done_ok(state: &JobState) -> bool {
    matches!(
        state,
        JobState::Done {
            status: JobStatus::Success,
            ..
        }
    )
}

#[test]
fn daemon_stops_cleanly_on_sigterm() {
    let r = Rig::new("", "");
    let mut d = r.start_daemon(Some(T0), &[]);
    // Its instance is in the lock file while it runs.
    let lock = std::fs::read_to_string(r.state.join("daemon.lock")).unwrap();
    assert!(
        lock.starts_with(&format!("pid {} start ", d.id())) && lock.contains(" boot "),
        "{lock}"
    );
    let st = Command::new("kill")
        .args(["-TERM", &d.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(r.wait_exit(&mut d), Some(0));
    assert!(
        !r.state.join("daemon.ctl").exists(),
        "the request socket is gone"
    );
    assert!(
        !r.state.join("db.tzt.ctl").exists(),
        "the table's control socket is gone"
    );
    // The state is free again: a run in its own process works.
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn second_daemon_is_refused_and_plan_run_is_handed_to_the_daemon() {
    let r = Rig::new("", "");
    let mut d = r.start_daemon(None, &[]);

    let second = r.tz(&["daemon"]);
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("a daemon already holds"), "{err}");

    // `reconcile` does not run under the daemon either.
    let rec = r.tz(&["reconcile"]);
    assert_eq!(rec.status.code(), Some(1), "{}", text(&rec));

    // `plan run` hands the job over and prints its id; `--wait` follows it to its end.
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "j1\n");
    let j1 = r.job(1).unwrap();
    assert!(done_ok(&j1.state), "{:?}", j1.state);
    assert_eq!(j1.kind, JobKind::Backup { plan: "db".into() });
    // The daemon ran it: the job's owner is the daemon's instance.
    let lock = std::fs::read_to_string(r.state.join("daemon.lock")).unwrap();
    assert!(
        lock.starts_with(j1.owner.as_deref().unwrap()),
        "{lock} / {:?}",
        j1.owner
    );
    let log = r.log();
    assert!(log.contains(&"j1 1 plan_pre -".to_string()), "{log:?}");
    assert!(log.contains(&"j1 1 finally -".to_string()), "{log:?}");

    // The table is the daemon's: its control socket answers status.
    let st = Command::new(env!("CARGO_BIN_EXE_timezero"))
        .arg("status")
        .arg(r.state.join("db.tzt"))
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(0), "{}", text(&st));

    let stop = r.tz(&["daemon", "stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));
    assert_eq!(r.wait_exit(&mut d), Some(0));
    let again = r.tz(&["daemon", "stop"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
}

#[test]
fn cal_19_a_schedule_fires_once_on_the_daemon_clock() {
    let r = Rig::new("", "");
    // Hourly at :00 from 10:00, on a daemon whose clock stands at 09:30.
    let ev = r.schedule("hourly", "0 * * * *", 5, "2027-03-01T10:00:00Z");
    let mut d = r.start_daemon(Some(T0), &[]);
    assert!(r.jobs().is_empty(), "nothing is due at 09:30");

    r.set_clock("2027-03-01T10:00:00Z");
    r.wait_until("the 10:00 job", || {
        r.job(1).is_some_and(|j| done_ok(&j.state))
    });
    // Moving the clock within the hour starts nothing more.
    r.set_clock("2027-03-01T10:30:00Z");
    assert_eq!(r.ctl(r#"{"v":1,"req":"wake"}"#).unwrap()["ok"], true);
    assert_eq!(r.jobs().len(), 1);

    r.set_clock("2027-03-01T11:00:00Z");
    r.wait_until("the 11:00 job", || {
        r.job(2).is_some_and(|j| done_ok(&j.state))
    });
    let occ = r
        .store()
        .occurrences(&OccurrenceQuery {
            event: Some(ev),
            ..OccurrenceQuery::default()
        })
        .unwrap();
    let mut dues: Vec<_> = occ.iter().map(|o| (o.due, o.outcome)).collect();
    dues.sort_by_key(|d| d.0);
    assert_eq!(dues.len(), 2, "{dues:?}");
    assert_eq!(dues[0].0, at("2027-03-01T10:00:00Z"));
    assert_eq!(dues[1].0, at("2027-03-01T11:00:00Z"));
    assert!(dues
        .iter()
        .all(|(_, o)| matches!(o, OccurrenceOutcome::Started(_))));
    assert_eq!(r.jobs().len(), 2);

    let stop = r.tz(&["daemon", "stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));
    assert_eq!(r.wait_exit(&mut d), Some(0));
}

#[test]
fn daemon_no_calendar_runs_handed_jobs_only() {
    let r = Rig::new("", "");
    r.schedule("hourly", "0 * * * *", 5, "2027-03-01T10:00:00Z");
    let mut d = r.start_daemon(Some(T0), &["--no-calendar"]);
    r.set_clock("2027-03-01T10:05:00Z");
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "j1\n");
    assert_eq!(r.jobs().len(), 1, "the schedule started nothing");
    let stop = r.tz(&["daemon", "stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));
    assert_eq!(r.wait_exit(&mut d), Some(0));
}

#[test]
fn job_10_a_restore_through_the_daemon_is_active_at_once() {
    let r = Rig::new("", "");
    let mut d = r.start_daemon(None, &[]);
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let to = r.root.join("restored.img");
    let out = r.tz(&["restore", "i1", "--to", to.to_str().unwrap(), "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("restore job j2: image i1 to "),
        "{stdout}"
    );
    let j2 = r.job(2).unwrap();
    assert!(matches!(j2.kind, JobKind::Restore { .. }), "{:?}", j2.kind);
    // Active from the moment it was requested: started when it was created.
    assert_eq!(j2.started, Some(j2.created), "{j2:?}");
    assert!(done_ok(&j2.state), "{:?}", j2.state);
    let image = r
        .store()
        .image(timezero::store::ImageId(1))
        .unwrap()
        .unwrap();
    let name = std::path::Path::new(&image.source.locator)
        .file_name()
        .unwrap()
        .to_owned();
    assert_eq!(
        std::fs::read(&to).unwrap(),
        std::fs::read(r.vols.join(name)).unwrap()
    );
    let stop = r.tz(&["daemon", "stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));
    assert_eq!(r.wait_exit(&mut d), Some(0));
}

/// JOB-10 / CAL-03 with a daemon that is starting: its lock is held but `STATE/daemon.ctl` does
/// not answer yet. `plan run` says it waits, and hands its run over once the socket answers
/// (here a stand-in for the daemon that refuses the request with a message of its own), instead
/// of failing at once or running in its own process.
#[test]
fn job_10_plan_run_waits_for_a_starting_daemon_to_answer() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::process::Stdio;

    let r = Rig::new("", "");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(r.state.join("daemon.lock"))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_timezero"))
        .args(["plan", "run", "db", "--state"])
        .arg(&r.state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says it waits: the socket does not exist yet.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("waiting for the daemon"), "{line}");
    // The daemon starts listening and answers.
    let listener = UnixListener::bind(r.state.join("daemon.ctl")).unwrap();
    let (conn, _) = listener.accept().unwrap();
    let mut request = String::new();
    BufReader::new(&conn).read_line(&mut request).unwrap();
    let req: serde_json::Value = serde_json::from_str(&request).unwrap();
    assert_eq!(req["req"], "run-plan", "{request}");
    assert_eq!(req["plan"], "db", "{request}");
    (&conn)
        .write_all(b"{\"ok\":false,\"job\":null,\"message\":\"refused by the starting daemon\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(out.status.code(), Some(1), "{rest}");
    assert!(rest.contains("refused by the starting daemon"), "{rest}");
    // Nothing ran in its own process.
    assert!(r.jobs().is_empty());
    drop(lock);
}
