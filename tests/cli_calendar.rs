//! `timezero schedule`, `event`, `calendar` and `jobs cancel` through the binary.
//!
//! Goal: the calendar is kept from the command line (each command's happy path and its typed
//! refusals with their exit status), `schedule due --at` says what would start and why every
//! other occurrence would not (the seed example: DAILY 20:00 p1, WEEKEND Saturday 18:00 p2,
//! MONTHEND 21:00 p3, and a blocking event on 24 December), `calendar --day` shows a backup
//! day's sheet, and `jobs cancel` cancels or asks to stop.
//! Method: a temporary state directory, the binary run with `TZ=Europe/Berlin` (NEWDAY's
//! default zone); job rows and recorded occurrences are written with the library's
//! `SqliteStore`, as a daemon would write them.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::path::PathBuf;
use std::process::Output;

use jiff::{Timestamp, Zoned};
use timezero::store::{
    BackupDay, Change, EventId, IdKind, JobId, JobKind, JobReason, JobRecord, JobState, JobStatus,
    OccurrenceOutcome, OccurrenceRow, Phase, Priority, SqliteStore, Store, WaitReason,
};

use common::cli::tz;

/// A temporary state directory.
struct State {
    _dir: tempfile::TempDir,
    state: PathBuf,
}

impl State {
    fn new() -> State {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        State { _dir: dir, state }
    }

    fn run(&self, args: &[&str]) -> Output {
        // The state directory by the environment: `--state` after `--` would be argv.
        tz().args(args)
            .env("TIMEZERO_STATE", &self.state)
            .env("TZ", "Europe/Berlin")
            .output()
            .unwrap()
    }

    /// Stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "timezero {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// The one-line stderr of a command that must fail with `code`.
    fn refused(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "timezero {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn store(&self) -> SqliteStore {
        SqliteStore::open(self.state.join("orchestration.sqlite")).unwrap()
    }

    fn event_id(&self, name: &str) -> EventId {
        self.store()
            .events()
            .unwrap()
            .into_iter()
            .find(|e| e.name == name)
            .unwrap()
            .id
    }

    /// The seed calendar: DAILY 20:00 p1, WEEKEND Saturday 18:00 p2, MONTHEND last day 21:00
    /// p3, all of plan fileserver.
    fn seed(&self) {
        for (s, expr) in [
            ("DAILY", "0 20 * * *"),
            ("WEEKEND", "0 18 * * SAT"),
            ("MONTHEND", "0 21 L * *"),
        ] {
            self.ok(&["schedule", "add", s, expr, "--tz", "Europe/Berlin"]);
        }
        for (e, s, p) in [
            ("daily", "DAILY", "1"),
            ("weekend", "WEEKEND", "2"),
            ("monthend", "MONTHEND", "3"),
        ] {
            self.ok(&[
                "event",
                "add",
                e,
                "--schedule",
                s,
                "--plan",
                "fileserver",
                "--priority",
                p,
            ]);
        }
    }

    /// `schedule due --at T --json` as (name, verdict, reason) triples.
    fn due(&self, at: &str) -> Vec<(String, String, String)> {
        self.json(&["schedule", "due", "--at", at])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap().to_string(),
                    l["verdict"].as_str().unwrap().to_string(),
                    l["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

fn at(s: &str) -> Timestamp {
    s.parse::<Zoned>().unwrap().timestamp()
}

fn triple(name: &str, verdict: &str, reason: &str) -> (String, String, String) {
    (name.to_string(), verdict.to_string(), reason.to_string())
}

#[test]
fn schedule_commands_and_their_refusals() {
    let s = State::new();
    // Reading commands on a fresh state create nothing.
    assert_eq!(s.ok(&["schedule", "list"]), "no schedules\n");
    assert!(!s.state.join("orchestration.sqlite").exists());
    let out = s.ok(&[
        "schedule",
        "add",
        "NIGHT",
        "0 20 * * *",
        "--tz",
        "Europe/Berlin",
    ]);
    assert!(out.starts_with("schedule NIGHT added, next "), "{out}");
    s.ok(&[
        "schedule",
        "add",
        "WEEKLY",
        "every 1w from 2027-01-01T20:00",
    ]);
    s.ok(&[
        "schedule",
        "add",
        "ONCE",
        "once 2027-03-01T10:00[Europe/Berlin]",
    ]);
    let list = s.json(&["schedule", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["NIGHT", "ONCE", "WEEKLY"]);
    // The stored expression is normalised (the anchor with its zone).
    assert_eq!(
        list[2]["expr"],
        "every 1w from 2027-01-01T20:00:00+01:00[Europe/Berlin]"
    );
    // Next occurrences, of a schedule by name and of an expression.
    let next = s.json(&[
        "schedule",
        "next",
        "WEEKLY",
        "--count",
        "3",
        "--from",
        "2027-01-01T00:00Z",
    ]);
    assert_eq!(
        next["occurrences"],
        serde_json::json!([
            "2027-01-01T20:00:00+01:00[Europe/Berlin]",
            "2027-01-08T20:00:00+01:00[Europe/Berlin]",
            "2027-01-15T20:00:00+01:00[Europe/Berlin]"
        ])
    );
    let next = s.json(&[
        "schedule",
        "next",
        "0 21 L * *",
        "--tz",
        "Europe/Berlin",
        "--count",
        "2",
        "--from",
        "2027-01-01T00:00Z",
    ]);
    assert_eq!(next["schedule"], serde_json::Value::Null);
    assert_eq!(
        next["occurrences"],
        serde_json::json!([
            "2027-01-31T21:00:00+01:00[Europe/Berlin]",
            "2027-02-28T21:00:00+01:00[Europe/Berlin]"
        ])
    );
    // Disable, enable, edit.
    s.ok(&["schedule", "disable", "NIGHT"]);
    assert_eq!(s.json(&["schedule", "list"])[0]["enabled"], false);
    s.ok(&["schedule", "enable", "NIGHT"]);
    assert_eq!(s.json(&["schedule", "list"])[0]["enabled"], true);
    s.ok(&["schedule", "add", "NIGHT", "0 22 * * *", "--replace"]);
    assert_eq!(s.json(&["schedule", "list"])[0]["expr"], "0 22 * * *");
    // Refusals: exit 2 for what does not parse, 1 for what the calendar refuses.
    let e = s.refused(&["schedule", "add", "BAD", "0 99 * * *"], 2);
    assert!(e.contains("cron expression"), "{e}");
    s.refused(
        &["schedule", "add", "BAD", "every 0d from 2027-01-01T00:00"],
        2,
    );
    s.refused(&["schedule", "add", "BAD", "once tomorrow"], 2);
    let e = s.refused(
        &["schedule", "add", "X", "0 1 * * *", "--tz", "Mars/Olympus"],
        2,
    );
    assert!(e.contains("Mars/Olympus"), "{e}");
    s.refused(&["schedule", "add", "two words", "0 1 * * *"], 2);
    s.refused(&["schedule", "next", "NIGHT", "--count", "0"], 2);
    let e = s.refused(&["schedule", "add", "NIGHT", "0 1 * * *"], 1);
    assert!(e.contains("exists"), "{e}");
    let e = s.refused(&["schedule", "add", "NOPE", "0 1 * * *", "--replace"], 1);
    assert!(e.contains("no schedule"), "{e}");
    s.refused(&["schedule", "rm", "NOPE"], 1);
    s.refused(&["schedule", "disable", "NOPE"], 1);
    s.ok(&["event", "add", "n", "--schedule", "NIGHT", "--plan", "p"]);
    let e = s.refused(&["schedule", "rm", "NIGHT"], 1);
    assert!(e.contains("used by events n"), "{e}");
    s.ok(&["schedule", "rm", "ONCE"]);
    assert_eq!(s.json(&["schedule", "list"]).as_array().unwrap().len(), 3);
}

#[test]
fn event_commands_and_their_refusals() {
    let s = State::new();
    s.ok(&[
        "schedule",
        "add",
        "NIGHT",
        "0 20 * * *",
        "--tz",
        "Europe/Berlin",
    ]);
    s.ok(&[
        "event",
        "add",
        "db",
        "--schedule",
        "NIGHT",
        "--plan",
        "db",
        "--priority",
        "5",
    ]);
    s.ok(&[
        "event",
        "add",
        "purge",
        "--schedule",
        "NIGHT",
        "--command",
        "purge",
        "--",
        "/bin/rm",
        "-x",
    ]);
    s.ok(&[
        "event",
        "add",
        "tape",
        "--schedule",
        "NIGHT",
        "--maintenance",
        "tape1",
        "--blocking",
    ]);
    let list = s.json(&["event", "list"]);
    let rows = list.as_array().unwrap();
    // The default NEWDAY came with the first event (CAL-11).
    assert_eq!(rows[0]["name"], "NEWDAY");
    assert_eq!(
        rows[1]["kind"],
        serde_json::json!({"kind": "plan", "plan": "db"})
    );
    assert_eq!(rows[1]["priority"], 5);
    assert_eq!(
        rows[2]["kind"],
        serde_json::json!({"kind": "command", "name": "purge", "argv": ["/bin/rm", "-x"]})
    );
    assert_eq!(rows[3]["blocking"], true);
    // A new event's next occurrence lies after now.
    let next = rows[1]["next_due"].as_i64().unwrap();
    assert!(next > Timestamp::now().as_millisecond());
    s.ok(&["event", "disable", "db"]);
    assert_eq!(s.json(&["event", "list"])[1]["enabled"], false);
    let out = s.ok(&["event", "enable", "db"]);
    assert!(out.contains("enabled, next "), "{out}");
    // Refusals.
    let e = s.refused(
        &["event", "add", "x", "--schedule", "NOPE", "--plan", "p"],
        1,
    );
    assert!(e.contains("no schedule \"NOPE\""), "{e}");
    let e = s.refused(
        &[
            "event",
            "add",
            "x",
            "--schedule",
            "NIGHT",
            "--plan",
            "p",
            "--priority",
            "100",
        ],
        2,
    );
    assert!(e.contains("--priority 100"), "{e}");
    s.refused(
        &[
            "event",
            "add",
            "x",
            "--schedule",
            "NIGHT",
            "--plan",
            "p",
            "--priority",
            "-1",
        ],
        2,
    );
    let e = s.refused(
        &["event", "add", "db", "--schedule", "NIGHT", "--plan", "p"],
        1,
    );
    assert!(e.contains("exists"), "{e}");
    s.refused(&["event", "add", "x", "--schedule", "NIGHT"], 2);
    s.refused(
        &[
            "event",
            "add",
            "x",
            "--schedule",
            "NIGHT",
            "--plan",
            "p",
            "--maintenance",
            "d",
        ],
        2,
    );
    s.refused(&["event", "rm", "nope"], 1);
    s.refused(&["event", "enable", "nope"], 1);
    let e = s.refused(&["event", "rm", "NEWDAY"], 1);
    assert!(e.contains("cannot be removed"), "{e}");
    // An event with a job in the history stays; one without goes.
    let store = s.store();
    let db = s.event_id("db");
    insert_job(
        &store,
        db,
        "db",
        at("2026-12-24T20:00[Europe/Berlin]"),
        queued(),
    );
    let e = s.refused(&["event", "rm", "db"], 1);
    assert!(e.contains("disable it instead"), "{e}");
    s.ok(&["event", "rm", "purge"]);
    assert_eq!(s.json(&["event", "list"]).as_array().unwrap().len(), 3);
    // `--state` names the state directory too.
    let other = State::new();
    let out = tz()
        .args(["event", "list", "--state"])
        .arg(&other.state)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "no events\n");
}

#[test]
fn cal_07_schedule_due_shows_the_winner_and_every_suppression() {
    let s = State::new();
    s.seed();
    // A weekday: DAILY runs.
    assert_eq!(
        s.due("2027-07-28T20:00[Europe/Berlin]"),
        vec![triple("daily", "start", "starts (backup day 20270728)")]
    );
    // A Saturday: WEEKEND runs, DAILY is suppressed by it.
    assert_eq!(
        s.due("2027-07-24T18:00[Europe/Berlin]"),
        vec![triple("weekend", "start", "starts (backup day 20270724)")]
    );
    assert_eq!(
        s.due("2027-07-24T20:00[Europe/Berlin]"),
        vec![triple(
            "daily",
            "suppressed",
            "suppressed by weekend (priority 2)"
        )]
    );
    // A month end (Monday 30 November 2026): MONTHEND runs, DAILY is suppressed by it.
    assert_eq!(
        s.due("2026-11-30T20:00[Europe/Berlin]"),
        vec![triple(
            "daily",
            "suppressed",
            "suppressed by monthend (priority 3)"
        )]
    );
    assert_eq!(
        s.due("2026-11-30T21:00[Europe/Berlin]"),
        vec![triple("monthend", "start", "starts (backup day 20261130)")]
    );
    // A Saturday month end (31 July 2027): only MONTHEND; WEEKEND at 18:00 is suppressed
    // though earlier.
    assert_eq!(
        s.due("2027-07-31T18:00[Europe/Berlin]"),
        vec![triple(
            "weekend",
            "suppressed",
            "suppressed by monthend (priority 3)"
        )]
    );
    assert_eq!(
        s.due("2027-07-31T20:00[Europe/Berlin]"),
        vec![triple(
            "daily",
            "suppressed",
            "suppressed by monthend (priority 3)"
        )]
    );
    assert_eq!(
        s.due("2027-07-31T21:00[Europe/Berlin]"),
        vec![triple("monthend", "start", "starts (backup day 20270731)")]
    );
    // A civil time is read in NEWDAY's zone; nothing at a minute without an occurrence.
    assert_eq!(s.due("2027-07-31T21:00").len(), 1);
    let out = s.ok(&["schedule", "due", "--at", "2027-07-31T21:01[Europe/Berlin]"]);
    assert!(out.starts_with("nothing is due at "), "{out}");
    s.refused(&["schedule", "due", "--at", "someday"], 2);
}

#[test]
fn cal_08_a_blocking_event_on_dec_24_stops_the_daily_one() {
    let s = State::new();
    s.seed();
    s.ok(&[
        "schedule",
        "add",
        "DEC24",
        "0 10 24 12 *",
        "--tz",
        "Europe/Berlin",
    ]);
    s.ok(&[
        "event",
        "add",
        "no-backup-christmas",
        "--schedule",
        "DEC24",
        "--plan",
        "fileserver",
        "--priority",
        "9",
        "--blocking",
    ]);
    assert_eq!(
        s.due("2026-12-24T10:00[Europe/Berlin]"),
        vec![triple(
            "no-backup-christmas",
            "activated",
            "blocking: starts nothing, suppresses similar events of lower priority"
        )]
    );
    assert_eq!(
        s.due("2026-12-24T20:00[Europe/Berlin]"),
        vec![triple(
            "daily",
            "blocked",
            "blocked by no-backup-christmas (priority 9)"
        )]
    );
    // The day after, DAILY runs again.
    assert_eq!(
        s.due("2026-12-25T20:00[Europe/Berlin]"),
        vec![triple("daily", "start", "starts (backup day 20261225)")]
    );
}

#[test]
fn cal_18_schedule_due_writes_nothing() {
    let s = State::new();
    // On a fresh state, no store is created.
    let out = s.ok(&["schedule", "due", "--at", "now"]);
    assert!(out.starts_with("nothing is due at "), "{out}");
    assert!(!s.state.join("orchestration.sqlite").exists());
    s.seed();
    let store = s.store();
    let before = (store.events().unwrap(), store.schedules().unwrap());
    s.due("2027-07-31T21:00[Europe/Berlin]");
    s.due("+2h");
    let occurrences = store
        .occurrences(&timezero::store::OccurrenceQuery::default())
        .unwrap();
    assert!(occurrences.is_empty());
    assert_eq!(
        (store.events().unwrap(), store.schedules().unwrap()),
        before
    );
}

fn queued() -> JobState {
    JobState::Queued {
        waiting_on: WaitReason::Broker,
    }
}

/// A job of `event` due at `due`, in `state`, with its occurrence (as the scheduler writes it).
fn insert_job(
    store: &SqliteStore,
    event: EventId,
    plan: &str,
    due: Timestamp,
    state: JobState,
) -> JobId {
    let id = JobId(store.allocate(IdKind::Job).unwrap());
    let backup_day = BackupDay(
        due.to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
            .date(),
    );
    let ended = matches!(state, JobState::Done { .. } | JobState::Canceled { .. }).then_some(due);
    let owner =
        matches!(state, JobState::Active { .. }).then(|| "pid 1 start 1 boot x".to_string());
    store
        .commit(vec![Change::InsertJob {
            job: JobRecord {
                id,
                kind: JobKind::Backup {
                    plan: plan.to_string(),
                },
                event,
                due_at: due,
                backup_day,
                priority: Priority::new(1).unwrap(),
                attempt: 1,
                state,
                owner,
                plan_text: None,
                plan_sha256: None,
                progress: None,
                created: due,
                started: Some(due),
                ended,
                stop_requested: None,
            },
            occurrence: OccurrenceRow {
                event,
                due,
                backup_day,
                outcome: OccurrenceOutcome::Started(id),
            },
        }])
        .unwrap();
    id
}

fn record(store: &SqliteStore, event: EventId, due: Timestamp, outcome: OccurrenceOutcome) {
    let backup_day = BackupDay(
        due.to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
            .date(),
    );
    store
        .commit(vec![Change::RecordOccurrence(OccurrenceRow {
            event,
            due,
            backup_day,
            outcome,
        })])
        .unwrap();
}

#[test]
fn cal_17_calendar_sheet_of_a_backup_day() {
    let s = State::new();
    for (name, expr) in [
        ("MORNING", "0 9 * * *"),
        ("ELEVEN", "0 11 * * *"),
        ("NOON", "0 12 * * *"),
        ("DAILY", "0 20 * * *"),
        ("LATE", "0 22 * * *"),
        ("DEC24", "0 10 24 12 *"),
    ] {
        s.ok(&["schedule", "add", name, expr, "--tz", "Europe/Berlin"]);
    }
    for (name, schedule, plan, priority) in [
        ("db", "MORNING", "db", "5"),
        ("db-extra", "ELEVEN", "db", "1"),
        ("logs", "NOON", "logs", "1"),
        ("daily", "DAILY", "fileserver", "1"),
        ("web", "LATE", "web", "1"),
    ] {
        s.ok(&[
            "event",
            "add",
            name,
            "--schedule",
            schedule,
            "--plan",
            plan,
            "--priority",
            priority,
        ]);
    }
    s.ok(&[
        "event",
        "add",
        "xmas",
        "--schedule",
        "DEC24",
        "--plan",
        "fileserver",
        "--priority",
        "9",
        "--blocking",
    ]);
    // What a daemon would have written on 24 December by 12:30 (of a year to come, so that the
    // events' next occurrences lie before it whenever the test runs).
    let store = s.store();
    let d = |t: &str| at(&format!("2099-12-24T{t}[Europe/Berlin]"));
    let done = insert_job(
        &store,
        s.event_id("db"),
        "db",
        d("09:00"),
        JobState::Done {
            status: JobStatus::Success,
            reason: None,
        },
    );
    record(
        &store,
        s.event_id("xmas"),
        d("10:00"),
        OccurrenceOutcome::Activated,
    );
    record(
        &store,
        s.event_id("db-extra"),
        d("11:00"),
        OccurrenceOutcome::Suppressed {
            by: s.event_id("db"),
        },
    );
    let running = insert_job(
        &store,
        s.event_id("logs"),
        "logs",
        d("12:00"),
        JobState::Active {
            phase: Phase::Checks,
        },
    );
    record(
        &store,
        s.event_id("web"),
        d("22:00"),
        OccurrenceOutcome::Missed,
    );
    let sheet = s.json(&["calendar", "--day", "20991224"]);
    assert_eq!(sheet["day"], "20991224");
    assert_eq!(sheet["start"], "2099-12-24T08:00:00+01:00[Europe/Berlin]");
    assert_eq!(sheet["end"], "2099-12-25T08:00:00+01:00[Europe/Berlin]");
    let lines: Vec<(String, String, String)> = sheet["occurrences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["status"].as_str().unwrap().to_string(),
                l["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            triple(
                "NEWDAY",
                "future",
                "future: NEWDAY: backup day 20991223 ends, 20991224 starts"
            ),
            triple("db", "completed", &format!("job {done}: success, status 0")),
            triple(
                "xmas",
                "activated",
                "blocking: started nothing, suppressed similar events of lower priority"
            ),
            triple("db-extra", "suppressed", "suppressed by db (priority 5)"),
            triple(
                "logs",
                "executing",
                &format!("job {running}: active, Checks")
            ),
            triple("daily", "future", "future: blocked by xmas (priority 9)"),
            triple("web", "missed", "missed (no daemon ran then)"),
        ]
    );
    assert_eq!(sheet["occurrences"][1]["job"], done.to_string());
    assert_eq!(sheet["occurrences"][5]["verdict"], "blocked");
    // The text form has one line per occurrence after the day's line.
    let text = s.ok(&["calendar", "--day", "2099-12-24"]);
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(text.contains("blocked by xmas (priority 9)"), "{text}");
    // The next day: DAILY runs.
    let next = s.json(&["calendar", "--day", "20991225"]);
    let daily = next["occurrences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "daily")
        .unwrap()
        .clone();
    assert_eq!(daily["verdict"], "start");
    s.refused(&["calendar", "--day", "yesterday"], 2);
}

#[test]
fn job_11_jobs_cancel_queued_waiting_active_and_ended() {
    let s = State::new();
    s.ok(&[
        "schedule",
        "add",
        "NIGHT",
        "0 20 * * *",
        "--tz",
        "Europe/Berlin",
    ]);
    s.ok(&["event", "add", "db", "--schedule", "NIGHT", "--plan", "db"]);
    let store = s.store();
    let ev = s.event_id("db");
    let d = |t: &str| at(&format!("2026-12-24T{t}[Europe/Berlin]"));
    let q = insert_job(&store, ev, "db", d("20:00"), queued());
    let w = insert_job(
        &store,
        ev,
        "db",
        d("20:01"),
        JobState::WaitingForRetry { at: d("20:30") },
    );
    let a = insert_job(
        &store,
        ev,
        "db",
        d("20:02"),
        JobState::Active {
            phase: Phase::Checks,
        },
    );
    let e = insert_job(
        &store,
        ev,
        "db",
        d("20:03"),
        JobState::Done {
            status: JobStatus::Success,
            reason: None,
        },
    );
    let canceled = JobState::Canceled {
        reason: JobReason::CanceledByUser,
    };
    assert_eq!(
        s.ok(&["jobs", "cancel", &q.to_string()]),
        format!("{q} canceled\n")
    );
    assert_eq!(store.job(q).unwrap().unwrap().state, canceled);
    let out = s.json(&["jobs", "cancel", &w.to_string()]);
    assert_eq!(out["done"], "canceled");
    assert_eq!(store.job(w).unwrap().unwrap().state, canceled);
    // A running job is asked to stop: the request is in its row, its state unchanged.
    let out = s.json(&["jobs", "cancel", &a.to_string()]);
    assert_eq!(out["done"], "stop_requested");
    let job = store.job(a).unwrap().unwrap();
    assert_eq!(job.state.kind(), timezero::store::JobStateKind::Active);
    let request = job.stop_requested.unwrap();
    assert_eq!(
        (request.attempt, request.reason),
        (1, JobReason::CanceledByUser)
    );
    // Asking again is fine; ended and unknown jobs are refused.
    s.ok(&["jobs", "cancel", &a.to_string()]);
    let err = s.refused(&["jobs", "cancel", &e.to_string()], 1);
    assert!(err.contains("already ended (success, status 0)"), "{err}");
    let err = s.refused(&["jobs", "cancel", &q.to_string()], 1);
    assert!(err.contains("already ended"), "{err}");
    let err = s.refused(&["jobs", "cancel", "j99"], 1);
    assert!(err.contains("no job j99"), "{err}");
    s.refused(&["jobs", "cancel", "x1"], 2);
    let fresh = State::new();
    fresh.refused(&["jobs", "cancel", "j1"], 1);
}
