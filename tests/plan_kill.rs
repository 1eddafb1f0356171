//! `timezero plan run` killed with SIGKILL at chosen steps, then `timezero reconcile` and a new
//! run (the real binary, the real SQLite store, file volumes). Hooks that write a marker and
//! then block let the test pick the moment; the copy is slowed by the plan's `copy_rate` and the
//! test waits until the store says the job is copying. After each: no hook ran twice for one
//! attempt, no session exists without its image row, every `Valid` image is T0-exact, and the
//! new run succeeds.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use timezero::store::{ImageQuery, ImageStateKind, SqliteStore, Store};
use timezero::{Engine, EngineOptions, SessionState};

const SIZE: usize = 1 << 20;
const POLL_LIMIT: Duration = Duration::from_secs(60);

fn data(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    vols: PathBuf,
    log: PathBuf,
}

impl Rig {
    /// `block` names the stage whose hook writes its pid to `ROOT/marker` and blocks (for the
    /// first attempt only); `session` adds lines to `[session]`.
    fn new(block: &str, session: &str) -> Rig {
        Rig::with(block, session, None)
    }

    /// As [`Rig::new`], with the activity's `quiesce` table when given (else a command
    /// quiesce that logs `hold` and `release`).
    fn with(block: &str, session: &str, quiesce: Option<String>) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let state = root.join("state");
        let vols = root.join("vols");
        let dest = root.join("dest");
        for d in [&state.join("plans"), &vols, &dest] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(dest.join(".timezero-dest"), "d1\n").unwrap();
        std::fs::write(vols.join("a.img"), data(1)).unwrap();
        std::fs::write(vols.join("b.img"), data(2)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_timezero"))
            .arg("init")
            .arg(state.join("db.tzt"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let log = root.join("log");
        let (l, r) = (log.display(), root.display());
        let blocker = |stage: &str| {
            if stage == block {
                format!(
                    "if [ $TIMEZERO_JOB = j1 ] && [ ! -e {r}/marker ]; then echo $$ > {r}/marker.tmp; \
                     mv {r}/marker.tmp {r}/marker; exec sleep 600; fi"
                )
            } else {
                "true".to_string()
            }
        };
        let mut hooks = String::new();
        for stage in [
            "plan_pre",
            "task_pre",
            "after_cut",
            "task_post",
            "plan_post",
            "finally",
        ] {
            hooks += &format!(
                "{stage} = {{ run = [\"/bin/sh\", \"-c\", \"echo $TIMEZERO_JOB $TIMEZERO_ATTEMPT \
                 {stage} ${{TIMEZERO_TASK:--}} >> {l}; {}\"] }}\n",
                blocker(stage)
            );
        }
        let quiesce = quiesce.unwrap_or_else(|| {
            format!(
                "{{ mode = \"command\", \
                 quiesce_cmd = [\"/bin/sh\", \"-c\", \"echo hold $TIMEZERO_JOB $TIMEZERO_TASK >> {l}; {}\"], \
                 unquiesce_cmd = [\"/bin/sh\", \"-c\", \"echo release $TIMEZERO_JOB $TIMEZERO_TASK >> {l}; {}\"] }}",
                blocker("quiesce"),
                blocker("unquiesce"),
            )
        });
        let plan = format!(
            "name = \"db\"\ntable = \"db.tzt\"\ntimezone = \"UTC\"\n\
             [checks]\nrequire_mount = false\n\
             [destination]\npath = \"{}\"\nid = \"d1\"\n\
             [session]\ngrain = \"64KiB\"\n{session}\n\
             [hooks]\n{hooks}\
             [[activity]]\nname = \"vols\"\nsources = [\"{}/*.img\"]\n\
             quiesce = {quiesce}\n",
            dest.display(),
            vols.display(),
        );
        std::fs::write(state.join("plans/db.toml"), plan).unwrap();
        Rig {
            _dir: dir,
            root,
            state,
            vols,
            log,
        }
    }

    fn tz(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_timezero"))
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .output()
            .unwrap()
    }

    fn spawn_run(&self) -> Child {
        self.spawn_run_stopping_at(None)
    }

    /// `plan run`, stopping for good at `step` (`TIMEZERO_TEST_STOP_AT`) when given.
    fn spawn_run_stopping_at(&self, step: Option<&str>) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_timezero"));
        cmd.args(["plan", "run", "db", "--state"])
            .arg(&self.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(s) = step {
            cmd.env("TIMEZERO_TEST_STOP_AT", s);
        }
        cmd.spawn().unwrap()
    }

    /// Wait until job 1 is active in task `task` at `step`.
    fn wait_for_step(&self, child: &mut Child, task: u32, step: timezero::store::TaskStep) {
        let store_path = self.state.join("orchestration.sqlite");
        self.wait_for(child, "the step", || {
            let Ok(store) = SqliteStore::open(&store_path) else {
                return false;
            };
            let Ok(Some(job)) = store.job(timezero::store::JobId(1)) else {
                return false;
            };
            job.state
                == timezero::store::JobState::Active {
                    phase: timezero::store::Phase::Task { index: task, step },
                }
        });
    }

    /// Poll (bounded) until `ready` holds; the run must still be going.
    fn wait_for(&self, child: &mut Child, what: &str, ready: impl Fn() -> bool) {
        let start = Instant::now();
        while !ready() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before {what}"
            );
            assert!(start.elapsed() < POLL_LIMIT, "no {what} in {POLL_LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the run with SIGKILL, and the blocked hook's process group (a hook runs in a group
    /// of its own, which outlives its runner like any process would).
    fn kill(&self, mut child: Child) {
        child.kill().unwrap();
        child.wait().unwrap();
        if let Ok(pid) = std::fs::read_to_string(self.root.join("marker")) {
            let pid: i32 = pid.trim().parse().unwrap();
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{pid}")])
                .status();
        }
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The invariants after a kill, a reconcile and a new run.
    fn check_invariants(&self) {
        // No hook ran twice for one attempt (job, attempt, stage, task).
        let mut seen = BTreeMap::new();
        for line in self.log() {
            if line.starts_with('j') {
                *seen.entry(line.clone()).or_insert(0) += 1;
            }
        }
        for (line, n) in &seen {
            assert_eq!(*n, 1, "hook ran {n} times: {line}");
        }
        // Nothing stays held: each hold of a job's task is followed by a release.
        let mut held: BTreeMap<String, i32> = BTreeMap::new();
        for line in self.log() {
            if let Some(who) = line.strip_prefix("hold ") {
                *held.entry(who.to_string()).or_insert(0) += 1;
            } else if let Some(who) = line.strip_prefix("release ") {
                let n = held.entry(who.to_string()).or_insert(0);
                *n = (*n - 1).max(0);
            }
        }
        for (who, n) in &held {
            assert_eq!(*n, 0, "the quiesce of {who} is still held");
        }
        let store = SqliteStore::open(self.state.join("orchestration.sqlite")).unwrap();
        let images = store.images(&ImageQuery::default()).unwrap();
        let engine =
            Engine::open_path(&self.state.join("db.tzt"), EngineOptions::default()).unwrap();
        // No session without its image row.
        for s in engine.status() {
            if matches!(
                s.state,
                SessionState::Active | SessionState::Suspended | SessionState::Completed
            ) {
                assert!(
                    images.iter().any(|i| i.session == s.id),
                    "session {} ({:?}) has no image row",
                    s.id,
                    s.state
                );
            }
        }
        // Every Valid image is T0-exact (nothing wrote to the sources).
        let mut valid = 0;
        for i in &images {
            if i.state.kind() == ImageStateKind::Valid {
                valid += 1;
                let name = Path::new(&i.source.locator).file_name().unwrap();
                let want = std::fs::read(self.vols.join(name)).unwrap();
                let got = std::fs::read(&i.target.locator).unwrap();
                assert!(got == want, "image {} differs from its source", i.id);
            }
        }
        assert!(valid >= 2, "the new run's images are valid");
    }

    fn reconcile_and_rerun(&self) -> String {
        let out = self.tz(&["reconcile"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let again = self.tz(&["reconcile"]);
        assert_eq!(again.status.code(), Some(0), "{again:?}");
        let again = String::from_utf8_lossy(&again.stdout).into_owned();
        assert!(
            !again.contains("j1:"),
            "a second reconcile finds nothing: {again}"
        );
        let out = self.tz(&["plan", "run", "db", "--wait"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "j2\n");
        text
    }

    fn job_state(&self, job: &str) -> serde_json::Value {
        let out = self.tz(&["jobs", "show", job, "--json"]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v
    }
}

/// QUI-09: `timezero reconcile` after a run killed in its pre-processing matches the store with
/// what is held: the hook run in flight ends `unknown` (one line), the broker counters are
/// rebuilt (one line), the attempt ends before its cut; a second reconcile has nothing to say
/// about the job (`reconcile_and_rerun`), and a new run then succeeds.
#[test]
fn qui_09_reconcile_after_a_kill_during_task_pre_prints_each_decision_once() {
    let r = Rig::new("task_pre", "");
    let mut child = r.spawn_run();
    let marker = r.root.join("marker");
    r.wait_for(&mut child, "task_pre", || marker.exists());
    r.kill(child);
    let text = r.reconcile_and_rerun();
    assert!(
        text.contains("j1: hook task_pre task 1 started and never ended: unknown"),
        "{text}"
    );
    assert_eq!(
        text.matches("j1: hook task_pre").count(),
        1,
        "one line per decision: {text}"
    );
    assert!(text.contains("broker counters: rebuilt from the"), "{text}");
    let j1 = r.job_state("j1");
    let state = &j1["job"]["state"];
    // Before its cut: the attempt failed DaemonRestarted; the retry rule queues a retry.
    assert!(
        state["state"] == "waiting_for_retry" || state["reason"]["reason"] == "daemon_restarted",
        "{j1:#}"
    );
    let hook = j1["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["key"]["stage"] == "task_pre")
        .unwrap();
    assert_eq!(hook["result"]["result"], "unknown", "{j1:#}");
    assert!(
        j1["images"].as_array().unwrap().is_empty(),
        "no cut: {j1:#}"
    );
    r.check_invariants();
}

#[test]
fn hook_10_killed_during_task_post_the_hook_is_unknown_and_never_run_again() {
    let r = Rig::new("task_post", "");
    let mut child = r.spawn_run();
    let marker = r.root.join("marker");
    r.wait_for(&mut child, "task_post", || marker.exists());
    r.kill(child);
    let text = r.reconcile_and_rerun();
    assert!(
        text.contains("j1: hook task_post task 1 started and never ended: unknown"),
        "{text}"
    );
    let j1 = r.job_state("j1");
    let status = &j1["job"]["state"];
    // Killed in task_post (section 3.2): done, status 1 with the hook's end unknown
    // (HOOK-10); not a retry. Task 1 has its image; task 2 never started.
    assert_eq!(status["state"], "done", "{j1:#}");
    assert_eq!(status["status"], "partial", "{j1:#}");
    assert_eq!(status["reason"]["reason"], "hook_unknown", "{j1:#}");
    assert!(
        text.contains("j1: its process died; now partial, status 1"),
        "{text}"
    );
    let tasks = j1["tasks"].as_array().unwrap();
    assert_eq!(tasks[0]["status"]["status"], "warning", "{j1:#}");
    assert_eq!(tasks[1]["status"]["status"], "canceled", "{j1:#}");
    // task_post of task 1 was never run again in attempt 1.
    let log = r.log();
    assert_eq!(
        log.iter().filter(|l| *l == "j1 1 task_post 1").count(),
        1,
        "{log:?}"
    );
    // The copy had completed before task_post: its image is valid (checked T0-exact below).
    let images = j1["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{j1:#}");
    assert_eq!(images[0]["state"]["state"], "valid", "{j1:#}");
    r.check_invariants();
}

#[test]
fn job_09_killed_during_the_copy_reconcile_finishes_it_on_the_same_attempt() {
    // 64 KiB/s over 1 MiB: the copy takes about 16 s, plenty to be caught in.
    let r = Rig::new("", "copy_rate = \"64KiB\"\ncopy_threads = 1");
    let mut child = r.spawn_run();
    r.wait_for_step(&mut child, 1, timezero::store::TaskStep::Copy);
    r.kill(child);
    let text = r.reconcile_and_rerun();
    assert!(
        text.contains("j1: image i1 incomplete: kept, the attempt continues its copy"),
        "{text}"
    );
    assert!(
        text.contains("j1: its process died; now success, status 0"),
        "{text}"
    );
    let j1 = r.job_state("j1");
    assert_eq!(j1["job"]["attempt"], 1, "the same attempt: {j1:#}");
    let images = j1["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{j1:#}");
    for i in images {
        assert_eq!(i["state"]["state"], "valid", "{j1:#}");
    }
    // Each hook of attempt 1 ran once: task_pre of task 1 before the kill, the rest after.
    let log = r.log();
    for line in [
        "j1 1 task_pre 1",
        "j1 1 task_post 1",
        "j1 1 task_pre 2",
        "j1 1 plan_post -",
    ] {
        assert!(log.contains(&line.to_string()), "{line}: {log:?}");
    }
    r.check_invariants();
}

#[test]
fn job_09_killed_in_the_catalog_step_commits_again() {
    let r = Rig::new("", "");
    let mut child = r.spawn_run_stopping_at(Some("catalog"));
    r.wait_for_step(&mut child, 1, timezero::store::TaskStep::Catalog);
    r.kill(child);
    let store = SqliteStore::open(r.state.join("orchestration.sqlite")).unwrap();
    let before = store.images(&ImageQuery::default()).unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(
        before[0].state.kind(),
        ImageStateKind::Incomplete,
        "killed before the catalog step recorded the image"
    );
    let text = r.reconcile_and_rerun();
    assert!(
        text.contains("j1: its process died; now success, status 0"),
        "{text}"
    );
    let j1 = r.job_state("j1");
    assert_eq!(j1["job"]["attempt"], 1, "{j1:#}");
    let images = j1["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "one image per task: {j1:#}");
    for i in images {
        assert_eq!(i["state"]["state"], "valid", "{j1:#}");
    }
    // The image of task 1 is the one cut before the kill: its session, recorded once.
    let after = store.image(before[0].id).unwrap().unwrap();
    assert_eq!(after.state.kind(), ImageStateKind::Valid);
    assert_eq!(after.session, before[0].session);
    let out = r.tz(&["catalog", "verify", &before[0].id.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    r.check_invariants();
}

#[test]
fn job_09_killed_after_the_cut_before_its_outcome_is_recorded_adopts_the_session() {
    let r = Rig::new("", "");
    let mut child = r.spawn_run_stopping_at(Some("cut_made"));
    let table = r.state.join("db.tzt");
    // The run stops for good once the engine made the session and before it is recorded.
    r.wait_for(&mut child, "the session", || {
        let out = Command::new(env!("CARGO_BIN_EXE_timezero"))
            .arg("status")
            .arg(&table)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("active")
    });
    r.kill(child);
    let store = SqliteStore::open(r.state.join("orchestration.sqlite")).unwrap();
    assert!(store.images(&ImageQuery::default()).unwrap().is_empty());
    let text = r.reconcile_and_rerun();
    assert!(
        text.contains("j1: cut of task 1 made session s1 with no image row: adopted as i1"),
        "{text}"
    );
    assert!(
        text.contains("j1: its process died; now success, status 0"),
        "{text}"
    );
    let j1 = r.job_state("j1");
    assert_eq!(j1["job"]["attempt"], 1, "{j1:#}");
    let images = j1["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{j1:#}");
    for i in images {
        assert_eq!(i["state"]["state"], "valid", "{j1:#}");
    }
    r.check_invariants();
}

#[test]
fn qui_07_killed_while_quiesced_the_watchdog_releases_each_hold_once() {
    // The quiesce command held the application and had not returned.
    let r = Rig::new("quiesce", "");
    let mut child = r.spawn_run();
    let marker = r.root.join("marker");
    r.wait_for(&mut child, "the quiesce command", || marker.exists());
    r.kill(child);
    // The watchdog, not reconcile, runs the unquiesce command: wait for it (bounded).
    let start = Instant::now();
    while !r.log().contains(&"release j1 1".to_string()) {
        assert!(
            start.elapsed() < POLL_LIMIT,
            "no release by the watchdog: {:?}",
            r.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = r.reconcile_and_rerun();
    assert!(
        !text.contains("unquiesce_cmd run"),
        "not run a second time: {text}"
    );
    let log = r.log();
    for who in ["j1 1", "j2 1", "j2 2"] {
        for what in ["hold", "release"] {
            let n = log
                .iter()
                .filter(|l| **l == format!("{what} {who}"))
                .count();
            assert_eq!(n, 1, "{what} {who}: {log:?}");
        }
    }
    let j1 = r.job_state("j1");
    assert!(
        j1["images"].as_array().unwrap().is_empty(),
        "no cut: {j1:#}"
    );
    r.check_invariants();
}

#[test]
fn plan_kill_between_cut_and_thaw() {
    // The cut is made; the unquiesce command is running and has not returned.
    let r = Rig::new("unquiesce", "");
    let mut child = r.spawn_run();
    let marker = r.root.join("marker");
    r.wait_for(&mut child, "the unquiesce command", || marker.exists());
    r.kill(child);
    let text = r.reconcile_and_rerun();
    // The unquiesce command was running: the watchdog ran it once more (an unquiesce bears
    // being repeated), so nothing is held. The cut is made: the attempt continues after it
    // (JOB-09), with its after_cut hook, the copy, and the second task.
    assert!(
        text.contains("j1: image i1 incomplete: kept, the attempt continues its copy"),
        "{text}"
    );
    assert!(
        text.contains("j1: its process died; now success, status 0"),
        "{text}"
    );
    let j1 = r.job_state("j1");
    assert_eq!(j1["job"]["attempt"], 1, "{j1:#}");
    let images = j1["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{j1:#}");
    for i in images {
        assert_eq!(i["state"]["state"], "valid", "{j1:#}");
    }
    assert!(r.log().contains(&"j1 1 after_cut 1".to_string()));
    r.check_invariants();
}

#[path = "common/loopfs.rs"]
mod loopfs;

/// A plan whose task freezes `fs` and keeps it frozen for its copy (`writes = "direct"`), slowed
/// so that the test catches the copy; the file system holds nothing of timezero's (QUI-08).
fn frozen_rig(fs: &loopfs::LoopFs) -> Rig {
    Rig::with(
        "",
        "writes = \"direct\"\ncopy_rate = \"128KiB\"\ncopy_threads = 1",
        Some(format!(
            "{{ mode = \"freeze\", mounts = [\"{}\"], timeout = \"30s\" }}",
            fs.mnt.display()
        )),
    )
}

impl Rig {
    /// Wait until job 1 copies with its lease held (the file system is frozen).
    fn wait_for_frozen_copy(&self, child: &mut Child) {
        let store_path = self.state.join("orchestration.sqlite");
        self.wait_for(child, "the copy under the freeze", || {
            let Ok(store) = SqliteStore::open(&store_path) else {
                return false;
            };
            let copying = matches!(
                store.job(timezero::store::JobId(1)),
                Ok(Some(timezero::store::JobRecord {
                    state: timezero::store::JobState::Active {
                        phase: timezero::store::Phase::Task {
                            step: timezero::store::TaskStep::Copy,
                            ..
                        }
                    },
                    ..
                }))
            );
            copying && store.open_leases().is_ok_and(|l| l.len() == 1)
        });
    }

    fn watchdog_pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.state.join("watchdog-j1.lock")).unwrap();
        text.trim().parse().unwrap()
    }
}

#[test]
fn qui_06_killed_while_frozen_reconcile_thaws_the_lease() {
    let Some(fs) = loopfs::loop_fs("qui_06_killed_while_frozen_reconcile_thaws_the_lease") else {
        return;
    };
    let r = frozen_rig(&fs);
    let mut child = r.spawn_run();
    r.wait_for_frozen_copy(&mut child);
    let store = SqliteStore::open(r.state.join("orchestration.sqlite")).unwrap();
    let lease = store.open_leases().unwrap().remove(0);
    assert_eq!(lease.mount, fs.mnt);
    assert_eq!(lease.job, timezero::store::JobId(1));
    assert_eq!(
        lease.st_dev,
        std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&fs.mnt).unwrap())
    );
    // The runner and its watchdog both die (as when the whole process tree is killed); the
    // watchdog first, or it would thaw when its runner's pipe closes.
    let watchdog = r.watchdog_pid();
    let _ = Command::new("kill")
        .args(["-9", &watchdog.to_string()])
        .status();
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{watchdog}")).exists()
        && std::fs::read_to_string(format!("/proc/{watchdog}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(start.elapsed() < POLL_LIMIT, "the watchdog did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
    r.kill(child);
    assert!(fs.frozen(), "nothing thawed it yet");
    let text = r.reconcile_and_rerun();
    assert!(
        text.contains(&format!(
            "j1: lease on {} of a job not running: thawed, dropped",
            fs.mnt.display()
        )),
        "{text}"
    );
    assert!(
        fs.write_succeeds_within("after", POLL_LIMIT),
        "the file system takes writes again"
    );
    assert!(store.open_leases().unwrap().is_empty());
    r.check_invariants();
}

#[test]
fn qui_07_killed_while_frozen_the_watchdog_thaws_without_reconcile() {
    let Some(fs) =
        loopfs::loop_fs("qui_07_killed_while_frozen_the_watchdog_thaws_without_reconcile")
    else {
        return;
    };
    let r = frozen_rig(&fs);
    let mut child = r.spawn_run();
    r.wait_for_frozen_copy(&mut child);
    assert!(fs.frozen());
    r.kill(child);
    // No reconcile: the watchdog saw its pipe close and thawed through its descriptor.
    assert!(
        fs.write_succeeds_within("after", POLL_LIMIT),
        "the watchdog thawed the file system"
    );
    let store = SqliteStore::open(r.state.join("orchestration.sqlite")).unwrap();
    let start = Instant::now();
    while !store.open_leases().unwrap().is_empty() {
        assert!(
            start.elapsed() < POLL_LIMIT,
            "the watchdog dropped the lease"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = r.reconcile_and_rerun();
    assert!(!text.contains("lease on"), "nothing left to thaw: {text}");
    r.check_invariants();
}
