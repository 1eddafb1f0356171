//! `timezero catalog ls|show|verify` and `timezero restore` through the binary.
//!
//! Goal: the catalog a backup leaves in `STATE/orchestration.sqlite` is listed, shown and
//! verified from the command line (a target edited in place outside timezero is caught), and
//! a restore, killed with SIGKILL at random points and run again, leaves its destination
//! byte-identical to the image, by a copy session and by an in-place stream that keeps another
//! session's T0.
//! Method: images are cut as the plan layer cuts them (a real engine on file volumes, a real
//! `SqliteStore` in a temporary state directory, `catalog::record_cut` and `validate` with
//! checksums); the binary runs against that state directory. A killed restore is polled through
//! the store (its job's progress) until it passed a random point, then killed.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use rand::{Rng, SeedableRng};
use timezero::catalog::{self, Cut, FileVolumes, ImageReader};
use timezero::store::{
    BackupDay, Change, EventId, EventKind, EventRow, IdKind, ImageId, JobId, JobKind, JobReason,
    JobRecord, JobState, JobStateKind, JobStatus, OccurrenceOutcome, OccurrenceRow, Priority,
    ScheduleRow, SqliteStore, Store, WaitReason,
};
use timezero::{CopyMode, Engine, EngineOptions, GrainCount, GrainSize, SessionSpec, VolumeId};

use common::cli::{ok, p, tz};

const MIB: usize = 1 << 20;

/// A state directory with a store and a table, and the volumes of its backups.
struct Site {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    table: PathBuf,
    store: SqliteStore,
    jobs: u64,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        let state = d.join("state");
        std::fs::create_dir(&state).unwrap();
        let store = SqliteStore::open(state.join("orchestration.sqlite")).unwrap();
        assert_eq!(store.allocate(IdKind::Event).unwrap(), 1);
        store
            .commit(vec![
                Change::PutSchedule {
                    schedule: ScheduleRow {
                        name: "nightly".to_string(),
                        expr: "cron 0 20 * * *".to_string(),
                        zone: "UTC".to_string(),
                        enabled: true,
                    },
                    replace: false,
                },
                Change::PutEvent {
                    event: EventRow {
                        id: EventId(1),
                        name: "db-nightly".to_string(),
                        schedule: "nightly".to_string(),
                        kind: EventKind::Plan {
                            plan: "db".to_string(),
                        },
                        priority: Priority::new(5).unwrap(),
                        blocking: false,
                        enabled: true,
                        next_due: None,
                    },
                    replace: false,
                },
            ])
            .unwrap();
        let table = d.join("t.tzt");
        Engine::create_path(&table, EngineOptions::default())
            .unwrap()
            .close()
            .unwrap();
        Site {
            _dir: dir,
            dir: d,
            state,
            table,
            store,
            jobs: 0,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let f = self.path(name);
        std::fs::write(&f, data).unwrap();
        f
    }

    fn engine(&self) -> Engine {
        Engine::open_path(&self.table, EngineOptions::default()).unwrap()
    }

    /// A backup of `source` onto a new target `target` as a plan's task does it: the job row,
    /// the cut, the `Incomplete` row, the copy to the end, the checksums, `Valid`.
    fn backup(&mut self, day: &str, source: &Path, target: &str, mode: CopyMode) -> ImageId {
        self.jobs = self.store.allocate(IdKind::Job).unwrap();
        let now = Timestamp::now();
        let job = JobRecord {
            id: JobId(self.jobs),
            kind: JobKind::Backup {
                plan: "db".to_string(),
            },
            event: EventId(1),
            due_at: Timestamp::from_second(1_800_000_000 + self.jobs as i64 * 60).unwrap(),
            backup_day: day.parse().unwrap(),
            priority: Priority::new(5).unwrap(),
            attempt: 1,
            state: JobState::Queued {
                waiting_on: WaitReason::Broker,
            },
            owner: None,
            plan_text: None,
            plan_sha256: None,
            progress: None,
            created: now,
            started: None,
            ended: None,
            stop_requested: None,
        };
        self.store
            .commit(vec![Change::InsertJob {
                occurrence: OccurrenceRow {
                    event: EventId(1),
                    due: job.due_at,
                    backup_day: job.backup_day,
                    outcome: OccurrenceOutcome::Started(job.id),
                },
                job,
            }])
            .unwrap();
        let size = std::fs::metadata(source).unwrap().len() as usize;
        let target = self.file(target, &vec![0u8; size]);
        let engine = self.engine();
        let src = engine.attach_path(source).unwrap();
        let tgt = engine.attach_path(&target).unwrap();
        let session = engine
            .establish(&SessionSpec {
                source: src,
                target: tgt,
                extents: Vec::new(),
                grain: GrainSize::new(64 << 10).unwrap(),
                mode,
                incremental: false,
            })
            .unwrap();
        let desc = engine.session(session).unwrap().desc.clone();
        let image = catalog::record_cut(
            &self.store,
            &Cut {
                job: JobId(self.jobs),
                task: 0,
                plan: "db",
                backup_day: day.parse::<BackupDay>().unwrap(),
                table: &self.table,
            },
            &desc,
        )
        .unwrap();
        let checksums = match mode {
            CopyMode::Copy => {
                engine.copy_all(session, GrainCount(64)).unwrap();
                let row = self.store.image(image).unwrap().unwrap();
                let reader = ImageReader::open(&row, &FileVolumes::default(), None).unwrap();
                Some(catalog::checksums(&reader, catalog::image_bytes(&row)).unwrap())
            }
            CopyMode::NoCopy => None,
        };
        catalog::validate(&self.store, &engine.status(), image, checksums).unwrap();
        engine.close().unwrap();
        image
    }

    fn tz(&self, args: &[&str]) -> Output {
        tz().args(args)
            .args(["--state", p(&self.state)])
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state", p(&self.state)]);
        ok(&all)
    }

    fn job(&self, id: JobId) -> JobRecord {
        self.store.job(id).unwrap().unwrap()
    }
}

fn fails(o: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn cat_02_ls_and_show_through_the_binary() {
    let mut site = Site::new();
    let data = common::pattern(1, 4 * MIB);
    let src = site.file("src", &data);
    let i1 = site.backup("20270101", &src, "img1", CopyMode::Copy);
    let i2 = site.backup("20270102", &src, "img2", CopyMode::Copy);

    let ls = site.ok(&["catalog", "ls"]);
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(
        ls.starts_with(&format!("{i1} valid db day 20270101 t0 ")),
        "{ls}"
    );
    assert!(ls.contains(&format!("copy 4MiB {}", src.display())), "{ls}");
    let v = json(&site.ok(&["catalog", "ls", "--day", "2027-01-02", "--json"]));
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["id"], i2.0);
    assert_eq!(v[0]["bytes"], 4 * MIB);
    assert_eq!(v[0]["state"], "valid");
    let none = site.ok(&["catalog", "ls", "--plan", "other"]);
    assert_eq!(none, "");
    let by_source = json(&site.ok(&["catalog", "ls", "--source", p(&src), "--json"]));
    assert_eq!(by_source.as_array().unwrap().len(), 2);

    let show = site.ok(&["catalog", "show", &i1.to_string()]);
    assert!(
        show.starts_with(&format!("{i1}: valid (4194304 bytes, copy)")),
        "{show}"
    );
    assert!(
        show.contains("checksums crc32c per 1MiB (4 blocks)"),
        "{show}"
    );
    assert!(show.contains(&format!("extent 0:{}@0", 4 * MIB)), "{show}");
    let v = json(&site.ok(&["catalog", "show", &i1.to_string(), "--json"]));
    assert_eq!(v["checksums"]["algorithm"], "crc32c");
    assert_eq!(v["checksums"]["sums"].as_array().unwrap().len(), 4);
    assert_eq!(v["job"], 1);

    // Errors: an unknown image is a failed operation, a bad day a usage error, a state
    // directory without a store a failed operation.
    fails(&site.tz(&["catalog", "show", "i99"]), 1);
    fails(&site.tz(&["catalog", "ls", "--day", "yesterday"]), 2);
    let empty = site.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = fails(
        &tz()
            .args(["catalog", "ls", "--state", p(&empty)])
            .output()
            .unwrap(),
        1,
    );
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn cat_03_verify_catches_a_target_edited_in_place_outside_timezero() {
    let mut site = Site::new();
    let src = site.file("src", &common::pattern(2, 4 * MIB));
    let image = site.backup("20270101", &src, "img", CopyMode::Copy);
    let id = image.to_string();
    let out = site.ok(&["catalog", "verify", &id]);
    assert_eq!(out, format!("{id}: 0 of 4 MiB differ (crc32c)\n"));

    // One byte of the target's MiB 2 changed in place, as a stray `dd` would.
    let tgt = site.path("img");
    let mut bytes = std::fs::read(&tgt).unwrap();
    bytes[2 * MIB + 4321] ^= 0x10;
    std::fs::write(&tgt, &bytes).unwrap();
    let o = site.tz(&["catalog", "verify", &id]);
    let err = fails(&o, 1);
    assert!(err.contains("MiB 2 does not match"), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{id}: 1 of 4 MiB differ (crc32c)\n")
    );
    let o = site.tz(&["catalog", "verify", &id, "--json"]);
    fails(&o, 1);
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(v["first_mismatch_mib"], 2);
    assert_eq!(v["mismatches"], 1);
}

/// Run `restore ARGS --state S`, read its first line (the job id), poll the job's progress
/// until it has passed `kill_at` bytes, then SIGKILL it. Returns the job and whether the
/// process had ended by itself.
fn restore_killed(site: &Site, args: &[&str], kill_at: u64) -> (JobId, bool) {
    let mut child: Child = tz()
        .args(args)
        .args(["--state", p(&site.state)])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let job: JobId = line
        .strip_prefix("restore job ")
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            return (job, true);
        }
        let j = site.job(job);
        // JOB-10: the job is active from the moment it was requested.
        assert!(
            matches!(j.state, JobState::Active { .. } | JobState::Done { .. }),
            "{:?}",
            j.state
        );
        if matches!(j.state, JobState::Done { .. }) {
            // It ended by itself; only its exit is left.
            child.wait().unwrap();
            return (job, true);
        }
        if j.progress.is_some_and(|p| p.bytes_done >= kill_at) {
            break;
        }
        assert!(Instant::now() < deadline, "restore made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Killed after it recorded its end: it had ended.
    let ended = matches!(site.job(job).state, JobState::Done { .. });
    (job, ended)
}

/// Kill the restore at random points (also before any progress), run it again each time,
/// then let it finish; returns the final summary.
fn kill_and_resume(site: &Site, args: &[&str], total: u64, seed: u64) -> serde_json::Value {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut slow: Vec<&str> = args.to_vec();
    slow.extend(["--rate", "24MiB", "--checkpoint", "1MiB"]);
    let mut job = None;
    let mut kills = 0;
    for round in 0..5 {
        let kill_at = if round == 0 {
            0
        } else {
            rng.random_range(0..total)
        };
        let (j, ended) = restore_killed(site, &slow, kill_at);
        assert_eq!(*job.get_or_insert(j), j, "a rerun takes the same job over");
        if ended {
            break;
        }
        kills += 1;
    }
    // The first round is killed at the job's first progress, long before its end.
    assert!(kills >= 1);
    let mut last: Vec<&str> = args.to_vec();
    last.extend(["--wait", "--json"]);
    let mut job = job.unwrap();
    let was_active = site.job(job).state.kind() == JobStateKind::Active;
    let v = json(&site.ok(&last));
    if was_active {
        assert_eq!(v["job"], job.0, "the last run finishes the same job");
    } else {
        // The job had ended by itself before a kill: the last run is a restore of its own.
        job = JobId(v["job"].as_u64().unwrap());
    }
    let j = site.job(job);
    assert_eq!(
        j.state,
        JobState::Done {
            status: JobStatus::Success,
            reason: None
        }
    );
    assert!(matches!(j.kind, JobKind::Restore { .. }));
    assert_eq!(j.progress.unwrap().bytes_done, total);
    assert!(site.store.open_intents().unwrap().is_empty());
    v
}

#[test]
fn cat_07_copy_restore_by_time_resumes_after_sigkill() {
    let mut site = Site::new();
    let a = common::pattern(3, 24 * MIB);
    let src = site.file("src", &a);
    let i1 = site.backup("20270101", &src, "img1", CopyMode::Copy);
    let t1 = site.store.image(i1).unwrap().unwrap().t0_unix_ms;
    // A later image of other data: --at T0(i1) must choose i1.
    std::fs::write(&src, common::pattern(4, 24 * MIB)).unwrap();
    let i2 = site.backup("20270102", &src, "img2", CopyMode::Copy);
    assert!(site.store.image(i2).unwrap().unwrap().t0_unix_ms > t1);

    // The source is damaged; the image of T0(i1) goes back onto it. The backups' sessions
    // ended and were forgotten (an image never needs its session later): the restore is a copy
    // session from the image file.
    std::fs::write(&src, vec![0xEE; 24 * MIB]).unwrap();
    let e = site.engine();
    assert_eq!(e.forget_ended().unwrap().len(), 2);
    e.close().unwrap();
    let at = Timestamp::from_millisecond(t1 as i64).unwrap().to_string();
    let args = [
        "restore",
        "--plan",
        "db",
        "--source",
        p(&src),
        "--at",
        &at,
        "--to",
        p(&src),
    ];
    let v = kill_and_resume(&site, &args, 24 * MIB as u64, 7);
    assert_eq!(v["image"], i1.0);
    assert_eq!(v["method"], "copy_session");
    assert_eq!(v["status"], 0);
    assert!(
        std::fs::read(&src).unwrap() == a,
        "the source is back at T0(i1)"
    );

    // A restore to a new file creates it; --extent narrows what is restored.
    let part = site.path("part");
    let mut args = vec![
        "restore",
        "--to",
        p(&part),
        "--extent",
        "1MiB:2MiB",
        "--wait",
    ];
    let id2 = i2.to_string();
    args.insert(1, &id2);
    let out = site.ok(&args);
    assert!(
        out.contains(&format!(
            "restored {i2} to {}: 2097152 bytes by copy session",
            part.display()
        )),
        "{out}"
    );
    let got = std::fs::read(&part).unwrap();
    let b = common::pattern(4, 24 * MIB);
    assert_eq!(got.len(), 24 * MIB);
    assert!(got[MIB..3 * MIB] == b[MIB..3 * MIB]);
    assert!(got[..MIB].iter().all(|&x| x == 0));
    assert!(got[3 * MIB..].iter().all(|&x| x == 0));

    // Usage errors: no image, an image with --plan, an extent of length 0.
    fails(&site.tz(&["restore", "--to", p(&part)]), 2);
    fails(
        &site.tz(&["restore", "--to", p(&part), "--extent", "0:0", &id2]),
        2,
    );
    // An image that does not exist is a failed operation.
    fails(&site.tz(&["restore", "i77", "--to", p(&part)]), 1);
}

/// How a restore killed half-way is taken over.
#[derive(Debug, Clone, Copy)]
enum TakeOver {
    /// `timezero reconcile`.
    Reconcile,
    /// A daemon's start.
    Daemon,
}

/// A restore with `--extent` killed half-way, then taken over by `how`: it is finished on its
/// same attempt, with the extent it was given (the job layer's recovery continues it from the
/// engine's table), and the destination outside the extent is never written.
fn killed_restore_taken_over(how: TakeOver) {
    let mut site = Site::new();
    let a = common::pattern(21, 24 * MIB);
    let src = site.file("src", &a);
    let image = site.backup("20270101", &src, "img", CopyMode::Copy);
    let e = site.engine();
    assert_eq!(e.forget_ended().unwrap().len(), 1);
    e.close().unwrap();
    let dest = site.path("dest");
    let id = image.to_string();
    let args = [
        "restore",
        id.as_str(),
        "--to",
        p(&dest),
        "--extent",
        "2MiB:12MiB",
        "--rate",
        "8MiB",
        "--checkpoint",
        "1MiB",
    ];
    let (job, ended) = restore_killed(&site, &args, 2 * MIB as u64);
    assert!(!ended, "the restore ended before it was killed");
    let before = site.job(job);
    assert!(matches!(before.state, JobState::Active { .. }));
    let done_before = before.progress.map_or(0, |p| p.bytes_done);
    assert!(done_before < 12 * MIB as u64, "{done_before}");

    let said = match how {
        TakeOver::Reconcile => site.ok(&["reconcile"]),
        TakeOver::Daemon => {
            let log = site.path("daemon.out");
            let mut d = tz()
                .args([
                    "daemon",
                    "--no-calendar",
                    "--no-nbd",
                    "--state",
                    p(&site.state),
                ])
                .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            // The end is committed before the daemon prints its recovery lines: wait for both.
            let line = format!("{job}: its process died; now");
            while !matches!(site.job(job).state, JobState::Done { .. })
                || !std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(&line)
            {
                if let Some(status) = d.try_wait().unwrap() {
                    panic!(
                        "the daemon exited: {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "the daemon did not finish the restore"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            d.kill().unwrap();
            d.wait().unwrap();
            std::fs::read_to_string(&log).unwrap()
        }
    };
    assert!(
        said.contains(&format!("{job}: its process died; now")),
        "{said}"
    );
    let j = site.job(job);
    assert_eq!(
        j.state,
        JobState::Done {
            status: JobStatus::Success,
            reason: None
        },
        "{how:?}: {said}"
    );
    assert_eq!(j.attempt, before.attempt, "the same attempt goes on");
    assert_eq!(j.progress.unwrap().bytes_done, 12 * MIB as u64);
    let got = std::fs::read(&dest).unwrap();
    assert_eq!(got.len(), 24 * MIB);
    assert!(
        got[2 * MIB..14 * MIB] == a[2 * MIB..14 * MIB],
        "the extent is the image"
    );
    assert!(got[..2 * MIB].iter().all(|&x| x == 0), "before the extent");
    assert!(got[14 * MIB..].iter().all(|&x| x == 0), "after the extent");
    assert!(site.store.open_intents().unwrap().is_empty());
}

#[test]
fn cat_07_a_killed_restore_is_finished_by_reconcile_on_its_attempt_with_its_extents() {
    killed_restore_taken_over(TakeOver::Reconcile);
}

#[test]
fn cat_07_a_killed_restore_is_finished_at_the_daemons_start_on_its_attempt() {
    killed_restore_taken_over(TakeOver::Daemon);
}

#[test]
fn cat_08_in_place_stream_resumes_after_sigkill_and_keeps_the_other_sessions_t0() {
    let mut site = Site::new();
    let a = common::pattern(5, 16 * MIB);
    let src = site.file("src", &a);
    let image = site.backup("20270101", &src, "img", CopyMode::Copy);
    // Later data, then another session protecting the source (nocopy, T0 = b). The image's
    // own session was forgotten: the restore streams the image file through the engine.
    let b = common::pattern(6, 16 * MIB);
    std::fs::write(&src, &b).unwrap();
    let other = site.file("other", &vec![0u8; 16 * MIB]);
    let e = site.engine();
    assert_eq!(e.forget_ended().unwrap().len(), 1);
    let (s, o): (VolumeId, VolumeId) =
        (e.attach_path(&src).unwrap(), e.attach_path(&other).unwrap());
    let s2 = e
        .establish(&SessionSpec {
            source: s,
            target: o,
            extents: Vec::new(),
            grain: GrainSize::new(64 << 10).unwrap(),
            mode: CopyMode::NoCopy,
            incremental: false,
        })
        .unwrap();
    // Damage through the engine (copy-before-write keeps s2's T0).
    e.write(s, 3 * MIB as u64, &vec![0xAB; 5 * MIB]).unwrap();
    e.close().unwrap();

    let id = image.to_string();
    let args = ["restore", &id, "--to", p(&src)];
    let v = kill_and_resume(&site, &args, 16 * MIB as u64, 11);
    assert_eq!(v["method"], "stream");
    // The ring's counters are in the summary and the job's progress.
    let j = site.job(JobId(v["job"].as_u64().unwrap()));
    let pr = j.progress.unwrap();
    assert_eq!(v["waits_for_full"], pr.waits_for_full);
    assert_eq!(v["waits_for_empty"], pr.waits_for_empty);
    // Over all the runs of the job the ring moved the image's bytes exactly once: each run
    // starts at the last checkpoint, up to which the earlier runs' bytes were recorded.
    assert_eq!(pr.ring_bytes, 16 * MIB as u64);
    assert_eq!(v["ring_bytes"], 16 * MIB);
    assert_eq!(pr.ring_buffers, 4);
    assert!(pr.ring_buffer_bytes > 0 && pr.ring_buffer_bytes <= 16 * MIB as u64);
    // `jobs show` prints them, as text and as JSON.
    let job = j.id.to_string();
    let shown = json(&site.ok(&["jobs", "show", &job, "--json"]));
    let sp = &shown["job"]["progress"];
    assert_eq!(sp["ring_bytes"], 16 * MIB);
    assert_eq!(sp["ring_buffers"], 4);
    assert_eq!(sp["ring_buffer_bytes"], pr.ring_buffer_bytes);
    assert_eq!(sp["waits_for_empty"], pr.waits_for_empty);
    assert_eq!(sp["waits_for_full"], pr.waits_for_full);
    let text = site.ok(&["jobs", "show", &job]);
    assert!(
        text.contains(&format!(
            "ring 4 buffers of {} bytes: {} bytes moved; reader waited for a free buffer {} times, writer for a full one {} times",
            pr.ring_buffer_bytes,
            16 * MIB,
            pr.waits_for_empty,
            pr.waits_for_full
        )),
        "{text}"
    );
    assert!(
        std::fs::read(&src).unwrap() == a,
        "the source is back at the image's T0"
    );
    let e = site.engine();
    assert!(common::image(&e, s2) == b, "the other session keeps its T0");
}

#[test]
fn cat_09_in_place_restore_onto_the_images_source_is_the_engines_reverse_and_resumes_after_sigkill()
{
    let mut site = Site::new();
    let a = common::pattern(9, 16 * MIB);
    let src = site.file("src", &a);
    let image = site.backup("20270101", &src, "img", CopyMode::Copy);
    // Later data, then another session protecting the source (nocopy, T0 = b); the image's
    // own session (completed) stays in the table.
    let b = common::pattern(10, 16 * MIB);
    std::fs::write(&src, &b).unwrap();
    let other = site.file("other", &vec![0u8; 16 * MIB]);
    let e = site.engine();
    let (s, o): (VolumeId, VolumeId) =
        (e.attach_path(&src).unwrap(), e.attach_path(&other).unwrap());
    let s2 = e
        .establish(&SessionSpec {
            source: s,
            target: o,
            extents: Vec::new(),
            grain: GrainSize::new(64 << 10).unwrap(),
            mode: CopyMode::NoCopy,
            incremental: false,
        })
        .unwrap();
    e.write(s, 5 * MIB as u64, &vec![0xCD; 3 * MIB]).unwrap();
    e.close().unwrap();

    let id = image.to_string();
    let args = ["restore", &id, "--to", p(&src)];
    let v = kill_and_resume(&site, &args, 16 * MIB as u64, 13);
    assert_eq!(v["method"], "reverse");
    let session = site.store.image(image).unwrap().unwrap().session;
    assert_eq!(v["session"], session.0);
    assert!(
        std::fs::read(&src).unwrap() == a,
        "the source is back at the image's T0"
    );
    let e = site.engine();
    assert!(common::image(&e, s2) == b, "the other session keeps its T0");
    // The reverse ended: nothing is left to move back, the image's session is as it was.
    let st = e.status();
    let mine = st.iter().find(|x| x.id == session).unwrap();
    assert_eq!(mine.grains_to_restore, GrainCount(0));
    assert_eq!(mine.state, timezero::SessionState::Completed);
    e.close().unwrap();

    // With --extent the restore is a stream (the reverse covers the whole image).
    std::fs::write(&src, vec![0x11; 16 * MIB]).unwrap();
    let out = site.ok(&[
        "restore",
        &id,
        "--to",
        p(&src),
        "--extent",
        "0:1MiB",
        "--wait",
    ]);
    assert!(out.contains("by stream through the engine"), "{out}");
    assert!(std::fs::read(&src).unwrap()[..MIB] == a[..MIB]);
}

#[test]
fn cat_08_a_destination_another_configured_table_protects_is_refused() {
    let mut site = Site::new();
    let a = common::pattern(12, 2 * MIB);
    let src = site.file("src", &a);
    let image = site.backup("20270101", &src, "img", CopyMode::Copy);
    // A second table, configured in timezero.toml, with a session protecting `dest`.
    let dest_data = common::pattern(13, 2 * MIB);
    let dest = site.file("dest", &dest_data);
    let other_table = site.path("other.tzt");
    let e = Engine::create_path(&other_table, EngineOptions::default()).unwrap();
    let (d, t) = (
        e.attach_path(&dest).unwrap(),
        e.attach_path(&site.file("snap", &vec![0u8; 2 * MIB]))
            .unwrap(),
    );
    let s = e
        .establish(&SessionSpec {
            source: d,
            target: t,
            extents: Vec::new(),
            grain: GrainSize::new(64 << 10).unwrap(),
            mode: CopyMode::NoCopy,
            incremental: false,
        })
        .unwrap();
    e.close().unwrap();
    std::fs::write(
        site.state.join("timezero.toml"),
        format!("tables = [{:?}, {:?}]\n", p(&site.table), p(&other_table)),
    )
    .unwrap();

    let o = site.tz(&["restore", &image.to_string(), "--to", p(&dest), "--wait"]);
    let err = fails(&o, 1);
    assert!(
        err.contains(&format!(
            "is the source of session {s} of table {}",
            other_table.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), dest_data, "dest untouched");
    // The job records the refusal.
    let job: JobId = String::from_utf8_lossy(&o.stdout)
        .strip_prefix("restore job ")
        .and_then(|l| l.split(':').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(matches!(
        site.job(job).state,
        JobState::Done {
            status: JobStatus::Failed,
            ..
        }
    ));
    // Another destination is restored as before.
    let elsewhere = site.path("elsewhere");
    let out = site.ok(&[
        "restore",
        &image.to_string(),
        "--to",
        p(&elsewhere),
        "--wait",
    ]);
    assert!(out.contains("by copy session"), "{out}");
    assert_eq!(std::fs::read(&elsewhere).unwrap(), a);
}

#[test]
fn qui_10_restore_locks_its_destination() {
    let mut site = Site::new();
    let src = site.file("src", &common::pattern(8, 2 * MIB));
    let image = site.backup("20270101", &src, "img", CopyMode::Copy);
    let dest = site.file("dest", &vec![0u8; 2 * MIB]);
    let held = timezero::quiesce::TargetLock::acquire(&dest).unwrap();
    let o = site.tz(&["restore", &image.to_string(), "--to", p(&dest)]);
    let err = fails(&o, 1);
    assert!(err.contains("busy"), "{err}");
    let job: JobId = String::from_utf8_lossy(&o.stdout)
        .strip_prefix("restore job ")
        .and_then(|l| l.split(':').next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        site.job(job).state,
        JobState::Done {
            status: JobStatus::Failed,
            reason: Some(JobReason::TargetBusy)
        }
    );
    drop(held);
    let out = site.ok(&["restore", &image.to_string(), "--to", p(&dest), "--wait"]);
    assert!(out.contains("by copy session"), "{out}");
    // Released at the end: the lock can be taken again.
    drop(timezero::quiesce::TargetLock::acquire(&dest).unwrap());
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
}
