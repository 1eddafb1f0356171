//! What only the SQLite store promises (STORE-11 to STORE-13): rows survive a reopen, a newer
//! schema is refused, a reader in another process is not blocked by a writer, and kill -9 of a
//! writing process keeps every acknowledged commit, each one whole.
//!
//! The other processes are this test binary run again with `TIMEZERO_STORE_CHILD` naming the
//! part to play and `TIMEZERO_STORE_PATH` the file; the test that spawns them plays that part
//! when it finds the variable set.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::contract::{at, calendar, event, job, started};
use super::*;

const CHILD: &str = "TIMEZERO_STORE_CHILD";
const PATH: &str = "TIMEZERO_STORE_PATH";

/// This binary, running only `test` (a name under `store::sqlite_tests::`) as `part`.
fn child(test: &str, part: &str, path: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        &format!("store::sqlite_tests::{test}"),
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, part)
    .env(PATH, path)
    .stdout(Stdio::piped());
    c
}

/// The part this process plays, when it is a child.
fn part() -> Option<(String, std::path::PathBuf)> {
    let part = std::env::var(CHILD).ok()?;
    let path = std::env::var_os(PATH)?;
    Some((part, path.into()))
}

/// A line a child prints: on a line of its own, whatever the test harness printed before it.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{line}").unwrap();
    out.flush().unwrap();
}

/// The payload of the child's lines that start with `tag`.
fn heard(out: &str, tag: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix(tag))
        .map(str::to_string)
        .collect()
}

#[test]
fn store_11_sqlite_rows_survive_reopen_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    {
        let store = SqliteStore::open(&path).unwrap();
        calendar(&store);
        let j = job(1, 1, at(0), "db", "20270101");
        store
            .commit(vec![Change::InsertJob {
                job: j.clone(),
                occurrence: started(&j),
            }])
            .unwrap();
        assert_eq!(store.allocate(IdKind::Job).unwrap(), 1);
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.jobs(&JobQuery::default()).unwrap().len(), 1);
    assert_eq!(store.events().unwrap(), vec![event(1, "db", Some(at(0)))]);
    assert_eq!(store.allocate(IdKind::Job).unwrap(), 2);
    let raw = rusqlite::Connection::open(&path).unwrap();
    let mode: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // A row that does not decode is reported, not skipped.
    raw.execute("UPDATE jobs SET body = '{\"id\": 1}' WHERE id = 1", [])
        .unwrap();
    match store.jobs(&JobQuery::default()) {
        Err(StoreError::Corrupt { what }) => assert!(what.starts_with("jobs"), "{what}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    drop(store);
    raw.pragma_update(None, "user_version", sqlite::SCHEMA_VERSION + 1)
        .unwrap();
    drop(raw);
    match SqliteStore::open(&path) {
        Err(StoreError::Schema {
            found, supported, ..
        }) => assert_eq!(
            (found, supported),
            (sqlite::SCHEMA_VERSION + 1, sqlite::SCHEMA_VERSION)
        ),
        other => panic!("expected a schema error, got {other:?}"),
    }
    // A file that is not SQLite: a typed error naming the file.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    match SqliteStore::open(&junk) {
        Err(e @ StoreError::Sqlite { .. }) => assert!(e.to_string().contains("junk"), "{e}"),
        other => panic!("expected an SQLite error, got {other:?}"),
    }
}

#[test]
fn store_12_sqlite_a_reader_process_is_not_blocked_by_a_writer() {
    if let Some((part, path)) = part() {
        if part == "reader" {
            let store = SqliteStore::open(&path).unwrap();
            let jobs = store.jobs(&JobQuery::default()).unwrap();
            let next = store.events().unwrap()[0].next_due;
            say(&format!(
                "READ jobs={} next_due={}",
                jobs.len(),
                next.is_some()
            ));
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    calendar(&store);
    // Another connection takes the write lock and changes rows without committing.
    let mut raw = rusqlite::Connection::open(&path).unwrap();
    let tx = raw
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    tx.execute(
        "UPDATE events SET next_due = NULL, body = json_set(body, '$.next_due', NULL)",
        [],
    )
    .unwrap();
    tx.execute("DELETE FROM occurrences", []).unwrap();
    let out = child(
        "store_12_sqlite_a_reader_process_is_not_blocked_by_a_writer",
        "reader",
        &path,
    )
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // The reader opened the store and saw the last commit, not the open transaction.
    assert_eq!(
        heard(&text, "READ "),
        vec!["jobs=0 next_due=true"],
        "{text}"
    );
    tx.commit().unwrap();
    assert_eq!(store.events().unwrap()[0].next_due, None);
}

/// The writer's loop: commit `i` inserts job `ji` for e1's occurrence at `i` minutes and
/// advances e1 to `i + 1` minutes, in one list; each acknowledged commit is printed.
fn write_until_killed(path: &Path) {
    let store = SqliteStore::open(path).unwrap();
    let first = store.jobs(&JobQuery::default()).unwrap().len() as u64 + 1;
    for i in first..first + 10_000 {
        let j = job(i, 1, at(60 * i as i64), "db", "20270101");
        store
            .commit(vec![
                Change::InsertJob {
                    job: j.clone(),
                    occurrence: started(&j),
                },
                Change::AdvanceEvent {
                    event: EventId(1),
                    from: Some(at(60 * i as i64)),
                    to: Some(at(60 * (i as i64 + 1))),
                },
            ])
            .unwrap();
        say(&format!("ACK {i}"));
    }
}

#[test]
fn store_13_sqlite_kill9_keeps_every_acknowledged_commit_whole() {
    if let Some((part, path)) = part() {
        if part == "writer" {
            write_until_killed(&path);
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    {
        let store = SqliteStore::open(&path).unwrap();
        store
            .commit(vec![
                Change::PutSchedule {
                    schedule: super::contract::schedule("daily"),
                    replace: false,
                },
                Change::PutEvent {
                    event: event(1, "db", Some(at(60))),
                    replace: false,
                },
            ])
            .unwrap();
    }
    let mut acked = 0u64;
    for round in 1..=3u64 {
        let mut proc = child(
            "store_13_sqlite_kill9_keeps_every_acknowledged_commit_whole",
            "writer",
            &path,
        )
        .spawn()
        .unwrap();
        let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
        // Kill after 25 more acknowledgements, wherever the writer is then.
        let target = acked + 25;
        while acked < target {
            let line = lines.next().expect("the writer ended early").unwrap();
            if let Some(n) = line.strip_prefix("ACK ") {
                acked = n.parse().unwrap();
            }
        }
        proc.kill().unwrap();
        // Acknowledgements already in the pipe count too.
        for line in lines {
            if let Some(n) = line.unwrap().strip_prefix("ACK ") {
                acked = n.parse().unwrap();
            }
        }
        let status = proc.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the writer was not killed"
        );

        let store = SqliteStore::open(&path).unwrap();
        let jobs = store.jobs(&JobQuery::default()).unwrap();
        let n = jobs.len() as u64;
        assert!(n >= acked, "round {round}: {n} jobs, {acked} acknowledged");
        assert_eq!(
            jobs.iter().map(|j| j.id.0).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "round {round}"
        );
        // Every job with its occurrence and its event advance, never one without the other.
        let occ = store.occurrences(&OccurrenceQuery::default()).unwrap();
        assert_eq!(occ.len() as u64, n, "round {round}");
        for (j, o) in jobs.iter().zip(&occ) {
            assert_eq!(o.outcome, OccurrenceOutcome::Started(j.id));
            assert_eq!(o.due, j.due_at);
        }
        assert_eq!(
            store.events().unwrap()[0].next_due,
            Some(at(60 * (n as i64 + 1))),
            "round {round}"
        );
        acked = n;
    }
}

#[test]
fn store_10_sqlite_two_handles_share_ids_and_preconditions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    let a = SqliteStore::open(&path).unwrap();
    let b = SqliteStore::open(&path).unwrap();
    let ids: Vec<u64> = (0..4)
        .map(|i| {
            let s = if i % 2 == 0 { &a } else { &b };
            s.allocate(IdKind::Job).unwrap()
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    calendar(&a);
    let j = job(1, 1, at(0), "db", "20270101");
    let claim = |s: &SqliteStore, owner: &str| {
        s.commit(vec![Change::Transition {
            job: j.id,
            from: JobStateKind::Queued,
            attempt: 1,
            to: JobState::Active {
                phase: Phase::Checks,
            },
            to_attempt: 1,
            owner: Some(owner.to_string()),
            at: at(1),
        }])
    };
    b.commit(vec![Change::InsertJob {
        job: j.clone(),
        occurrence: started(&j),
    }])
    .unwrap();
    // Two daemons claiming one attempt: the second sees the first's claim.
    claim(&a, "a").unwrap();
    assert!(matches!(
        claim(&b, "b"),
        Err(StoreError::Conflict { change: 0, .. })
    ));
    assert_eq!(b.job(j.id).unwrap().unwrap().owner.as_deref(), Some("a"));
}

#[test]
fn store_11_sqlite_a_version_1_file_is_migrated_and_keeps_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestration.sqlite");
    let mut j = job(1, 1, at(0), "db", "20270101");
    j.plan_text = Some("name = \"db\"\n".to_string());
    j.plan_sha256 = Some([0xab; 32]);
    {
        let store = SqliteStore::open(&path).unwrap();
        calendar(&store);
        store
            .commit(vec![Change::InsertJob {
                job: j.clone(),
                occurrence: started(&j),
            }])
            .unwrap();
    }
    // Back to version 1 as an older build left it: no plan_sha256 column.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "DROP INDEX jobs_by_plan_sha256; ALTER TABLE jobs DROP COLUMN plan_sha256; \
         DROP INDEX events_by_next_due; PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(raw);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.job(j.id).unwrap(), Some(j));
    let raw = rusqlite::Connection::open(&path).unwrap();
    let (version, sha): (i64, String) = raw
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version), plan_sha256 FROM jobs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(version, sqlite::SCHEMA_VERSION);
    assert_eq!(sha, "ab".repeat(32));
    // Version 3's index on the events' next occurrence is there, and the due events query
    // reads it.
    let plan: String = raw
        .query_row(
            "EXPLAIN QUERY PLAN SELECT body FROM events \
             WHERE next_due IS NOT NULL AND next_due <= 0 ORDER BY id",
            [],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("events_by_next_due"), "{plan}");
}
