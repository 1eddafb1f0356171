//! Plans: the plan file, expansion into tasks, the plan checks and the task flow
//! (docs/orchestration.md, "Plans" and "Hooks").
//!
//! Goal: each PLAN id and the hook ids of the job flow (HOOK-01, 02, 04, 08) hold. Method: the
//! real engine on `MemStorage` with `MemVolume` sources found through a `FakeFinder`, file
//! targets in a temporary destination, `FakeQuiesce`, a `ManualClock`, and hooks that are one
//! small shell script appending `stage task status` to a log and exiting with the code a file
//! `exit-STAGE[-TASK]` holds. A `Probe` wraps the engine's `Sessions` to see what is frozen
//! during the copy and to let the copy take clock time (PLAN-10). The destination checks on a
//! real mount point use a tmpfs mounted as root and print `SKIPPED` otherwise.
#![cfg(feature = "orchestration")]
#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp, Zoned};
use parking_lot::Mutex;
use timezero::clock::{Clock, ManualClock};
use timezero::hook::RunStatus;
use timezero::plan::{
    check, expand, recheck_task, run_plan, source_component, CheckInput, CheckOutcome,
    CopySettings, FakeFinder, GlobalConfig, JobReason, Naming, Plan, PlanError, PlanRun,
    PlanStatus, RunContext, Sessions, Skip, Step, Window,
};
use timezero::quiesce::{FakeOp, FakeQuiesce, QuiesceBackend};
use timezero::store::{BackupDay, JobId};
use timezero::{
    Engine, EngineOptions, MemStorage, MemVolume, SessionId, SessionSpec, SessionState,
    SessionStatus, TableOptions, VolumeId,
};

const SIZE: usize = 256 << 10;
const JOB: JobId = JobId(7);

fn day() -> BackupDay {
    "20261201".parse().unwrap()
}

/// 2026-12-01 22:00 in Berlin, inside `21:30-06:30`.
fn start() -> Timestamp {
    "2026-12-01T22:00:00+01:00[Europe/Berlin]"
        .parse::<Zoned>()
        .unwrap()
        .timestamp()
}

fn data(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The engine wrapped so a test sees what is frozen while a copy runs, and a copy can take
/// clock time.
struct Probe {
    engine: Arc<Engine>,
    fake: FakeQuiesce,
    clock: ManualClock,
    copy_takes: Option<SignedDuration>,
    frozen_during_copy: Mutex<Vec<Vec<PathBuf>>>,
}

impl Sessions for Probe {
    fn source(&self, locator: &str) -> timezero::Result<VolumeId> {
        Sessions::source(&self.engine, locator)
    }
    fn target(&self, path: &Path) -> timezero::Result<VolumeId> {
        Sessions::target(&self.engine, path)
    }
    fn establish(&self, spec: &SessionSpec) -> timezero::Result<SessionId> {
        Sessions::establish(&self.engine, spec)
    }
    fn establish_group(
        &self,
        name: &str,
        specs: &[SessionSpec],
    ) -> timezero::Result<Vec<SessionId>> {
        Sessions::establish_group(&self.engine, name, specs)
    }
    fn withdraw(&self, id: SessionId) -> timezero::Result<()> {
        Sessions::withdraw(&self.engine, id)
    }
    fn status(&self) -> Vec<SessionStatus> {
        Sessions::status(&self.engine)
    }
    fn copy(&self, ids: &[SessionId], settings: &CopySettings) -> timezero::Result<()> {
        self.frozen_during_copy.lock().push(self.fake.frozen());
        if let Some(d) = self.copy_takes {
            self.clock.advance(d);
        }
        Sessions::copy(&self.engine, ids, settings)
    }
}

struct Rig {
    dir: tempfile::TempDir,
    dest: PathBuf,
    log: PathBuf,
    hook: PathBuf,
    clock: ManualClock,
    dyn_clock: Arc<dyn Clock>,
    fake: FakeQuiesce,
    backend: Arc<dyn QuiesceBackend>,
    probe: Probe,
    finder: FakeFinder,
    global: GlobalConfig,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join(".timezero-dest"), "dest-1\n").unwrap();
        let log = dir.path().join("log");
        let hook = dir.path().join("hook.sh");
        let d = dir.path().display();
        std::fs::write(
            &hook,
            format!(
                "echo \"$TIMEZERO_STAGE ${{TIMEZERO_TASK:--}} $TIMEZERO_STATUS\" >> {d}/log\n\
                 if [ \"$TIMEZERO_STAGE\" = plan_post ]; then cat > {d}/plan_post.json; fi\n\
                 code=0\n\
                 if [ -f {d}/exit-$TIMEZERO_STAGE-$TIMEZERO_TASK ]; then \
                 code=$(cat {d}/exit-$TIMEZERO_STAGE-$TIMEZERO_TASK); \
                 elif [ -f {d}/exit-$TIMEZERO_STAGE ]; then code=$(cat {d}/exit-$TIMEZERO_STAGE); fi\n\
                 exit $code\n"
            ),
        )
        .unwrap();
        let clock = ManualClock::new(start());
        let dyn_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let fake = FakeQuiesce::new(Arc::clone(&dyn_clock));
        let backend: Arc<dyn QuiesceBackend> = Arc::new(fake.clone());
        let opts = TableOptions::default();
        let storage = Arc::new(MemStorage::new(
            "table",
            opts.layout().unwrap().file_bytes(),
        ));
        let engine = Arc::new(Engine::create(storage, EngineOptions::default()).unwrap());
        let mut finder = FakeFinder::new();
        for (i, name) in ["db-a", "db-b", "db-c", "log-a", "log-b"]
            .iter()
            .enumerate()
        {
            engine.attach(Arc::new(MemVolume::with_data(name, &data(i as u8))));
            finder = finder.with(
                &format!("/dev/vg0/{name}"),
                &format!("mem:{name}"),
                SIZE as u64,
            );
        }
        let probe = Probe {
            engine,
            fake: fake.clone(),
            clock: clock.clone(),
            copy_takes: None,
            frozen_during_copy: Mutex::new(Vec::new()),
        };
        Rig {
            dir,
            dest,
            log,
            hook,
            clock,
            dyn_clock,
            fake,
            backend,
            probe,
            finder,
            global: GlobalConfig::default(),
        }
    }

    fn engine(&self) -> &Arc<Engine> {
        &self.probe.engine
    }

    /// A plan on this rig's destination: `checks`, `session` and `hooks` lines, then the
    /// activities (and regions) given.
    fn plan(&self, checks: &str, session: &str, hooks: bool, body: &str) -> Plan {
        let h = self.hook.display();
        let hooks = if hooks {
            format!(
                "[hooks]\n\
                 plan_pre = {{ run = [\"/bin/sh\", \"{h}\"] }}\n\
                 task_pre = {{ run = [\"/bin/sh\", \"{h}\"] }}\n\
                 after_cut = {{ run = [\"/bin/sh\", \"{h}\"] }}\n\
                 task_post = {{ run = [\"/bin/sh\", \"{h}\"] }}\n\
                 plan_post = {{ run = [\"/bin/sh\", \"{h}\"] }}\n\
                 finally = {{ run = [\"/bin/sh\", \"{h}\"] }}\n"
            )
        } else {
            String::new()
        };
        let mount = if checks.contains("require_mount") {
            ""
        } else {
            "require_mount = false\n"
        };
        let text = format!(
            "name = \"db\"\ntimezone = \"Europe/Berlin\"\n\
             [checks]\n{mount}{checks}\n\
             [destination]\npath = \"{}\"\nid = \"dest-1\"\n\
             [session]\ngrain = \"64KiB\"\n{session}\n\
             {hooks}\n{body}\n",
            self.dest.display()
        );
        Plan::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn run(&self, plan: &Plan) -> PlanRun {
        run_plan(
            plan,
            &RunContext {
                global: &self.global,
                clock: &self.dyn_clock,
                sessions: &self.probe,
                finder: &self.finder,
                quiesce: &self.backend,
                job: JOB,
                attempt: 1,
                backup_day: day(),
            },
        )
    }

    fn check(&self, plan: &Plan, at: Timestamp) -> timezero::plan::CheckReport {
        check(
            plan,
            &CheckInput {
                global: &self.global,
                at,
                finder: &self.finder,
                job: JOB,
                backup_day: day(),
            },
        )
    }

    fn exit(&self, stage: &str, code: u8) {
        std::fs::write(
            self.dir.path().join(format!("exit-{stage}")),
            code.to_string(),
        )
        .unwrap();
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn active_sessions(&self) -> usize {
        self.engine()
            .status()
            .iter()
            .filter(|s| matches!(s.state, SessionState::Active | SessionState::Completed))
            .count()
    }

    fn target(&self, source: &str, task: u32) -> PathBuf {
        self.dest
            .join("db")
            .join(format!("dev_vg0_{source}"))
            .join(format!("20261201-j7-{task}.img"))
    }
}

const TWO_SOURCES: &str =
    "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\", \"/dev/vg0/db-b\"]\n";

fn statuses(run: &PlanRun) -> Vec<(RunStatus, Option<JobReason>)> {
    run.tasks.iter().map(|t| (t.status, t.reason)).collect()
}

fn berlin(s: &str) -> Timestamp {
    format!("{s}[Europe/Berlin]")
        .parse::<Zoned>()
        .unwrap()
        .timestamp()
}

#[test]
fn plan_01_backups_disabled_skips_everything() {
    let mut r = Rig::new();
    r.global = GlobalConfig::parse("backups_allowed = false\n").unwrap();
    let plan = r.plan(
        "",
        "",
        true,
        &format!("{TWO_SOURCES}quiesce = {{ mode = \"freeze\", mounts = [\"/srv/db\"] }}\n"),
    );
    let run = r.run(&plan);
    assert_eq!(run.status, PlanStatus::Skipped);
    assert_eq!(run.reason, Some(JobReason::BackupsDisabled));
    assert_eq!(run.code(), JobReason::BackupsDisabled.code());
    assert!(run.events.is_empty(), "no check ran: {:?}", run.events);
    assert!(r.log().is_empty(), "no hook ran: {:?}", r.log());
    assert!(r.fake.calls().is_empty());
    assert_eq!(r.active_sessions(), 0);
    assert!(!r.target("db-a", 1).exists());
}

#[test]
fn plan_02_window_half_open_across_midnight_in_berlin() {
    let mut r = Rig::new();
    let w = Window::parse("21:30-06:30").unwrap();
    let plan = r.plan("window = \"21:30-06:30\"", "", false, TWO_SOURCES);
    for (at, open) in [
        ("2026-12-01T23:00:00+01:00", true),
        ("2026-12-02T06:29:00+01:00", true),
        ("2026-12-02T06:29:59+01:00", true),
        ("2026-12-01T21:30:00+01:00", true),
        ("2026-12-02T06:30:00+01:00", false),
        ("2026-12-02T12:00:00+01:00", false),
        ("2026-12-01T21:29:59+01:00", false),
        // Summer time: the window is civil time in the plan's zone.
        ("2026-07-01T06:29:00+02:00", true),
        ("2026-07-01T06:30:00+02:00", false),
    ] {
        let ts = berlin(at);
        assert_eq!(
            w.contains(
                ts.to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
                    .time()
            ),
            open,
            "{at}"
        );
        let outcome = r.check(&plan, ts).outcome;
        let want = if open {
            CheckOutcome::Pass
        } else {
            CheckOutcome::Skip(JobReason::OutsideWindow)
        };
        assert_eq!(outcome, want, "{at}");
    }
    // The plan's window overrides the global one; "" means none; none at all = always open.
    r.global = GlobalConfig::parse("window = \"08:00-09:00\"\n").unwrap();
    let noon = berlin("2026-12-02T12:00:00+01:00");
    let night = berlin("2026-12-01T23:00:00+01:00");
    assert_eq!(r.check(&plan, night).outcome, CheckOutcome::Pass);
    let inherits = r.plan("", "", false, TWO_SOURCES);
    assert_eq!(
        r.check(&inherits, noon).outcome,
        CheckOutcome::Skip(JobReason::OutsideWindow)
    );
    assert_eq!(
        r.check(&inherits, berlin("2026-12-02T08:30:00+01:00"))
            .outcome,
        CheckOutcome::Pass
    );
    let none = r.plan("window = \"\"", "", false, TWO_SOURCES);
    assert_eq!(r.check(&none, noon).outcome, CheckOutcome::Pass);
    r.global = GlobalConfig::default();
    assert_eq!(r.check(&inherits, noon).outcome, CheckOutcome::Pass);
    // Outside the window a run is skipped and nothing runs.
    r.clock.set(berlin("2026-12-02T12:00:00+01:00"));
    let run = r.run(&r.plan("window = \"21:30-06:30\"", "", true, TWO_SOURCES));
    assert_eq!(
        (run.status, run.reason),
        (PlanStatus::Skipped, Some(JobReason::OutsideWindow))
    );
    assert!(r.log().is_empty());
    assert!(Window::parse("21:30-21:30").is_err());
    assert!(Window::parse("25:00-06:00").is_err());
    assert!(Window::parse("9:00-10:00").is_err());
}

/// Run `cmd`; true when it exited 0.
fn sh(cmd: &mut Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}

struct Tmpfs(PathBuf);

impl Tmpfs {
    /// A tmpfs of `size` mounted on `dir`, or `None` (with a SKIPPED line) when not root.
    fn mount(dir: &Path, size: &str, test: &str) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            println!("SKIPPED {test} (mount point part): needs root to mount a tmpfs");
            return None;
        }
        let ok = sh(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir));
        if !ok {
            println!("SKIPPED {test} (mount point part): mount -t tmpfs failed");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = sh(Command::new("umount").arg("-l").arg(&self.0));
    }
}

#[test]
fn plan_03_destination_must_be_a_mount_point_with_its_id() {
    let r = Rig::new();
    // A plain directory is no mount point.
    let plan = r.plan("require_mount = true", "", true, TWO_SOURCES);
    let report = r.check(&plan, start());
    assert_eq!(
        report.outcome,
        CheckOutcome::Fail(JobReason::DestinationNotMounted)
    );
    assert!(
        report.tasks.is_empty(),
        "no task before the destination check"
    );
    assert!(
        report.problems[0].contains("not a mount point"),
        "{report:?}"
    );
    let run = r.run(&plan);
    assert_eq!(
        (run.status, run.reason),
        (PlanStatus::Failed, Some(JobReason::DestinationNotMounted))
    );
    assert!(run.tasks.is_empty());
    assert_eq!(run.steps(), vec![(Step::Checks, None)]);
    assert!(r.log().is_empty());
    // Another destination's marker.
    std::fs::write(r.dest.join(".timezero-dest"), "dest-2\n").unwrap();
    let lax = r.plan("", "", false, TWO_SOURCES);
    assert_eq!(
        r.check(&lax, start()).outcome,
        CheckOutcome::Fail(JobReason::DestinationNotMounted)
    );
    std::fs::remove_file(r.dest.join(".timezero-dest")).unwrap();
    assert_eq!(
        r.check(&lax, start()).outcome,
        CheckOutcome::Fail(JobReason::DestinationNotMounted)
    );

    let Some(_mnt) = Tmpfs::mount(&r.dest, "8m", "plan_03") else {
        return;
    };
    // Mounted, but no marker yet.
    assert_eq!(
        r.check(&plan, start()).outcome,
        CheckOutcome::Fail(JobReason::DestinationNotMounted)
    );
    std::fs::write(r.dest.join(".timezero-dest"), "dest-1\n").unwrap();
    assert_eq!(r.check(&plan, start()).outcome, CheckOutcome::Pass);
    let run = r.run(&plan);
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    assert!(r.target("db-a", 1).exists());
}

#[test]
fn plan_04_free_space_covers_min_free_and_targets() {
    let r = Rig::new();
    let huge = r.plan("min_free = \"1000TiB\"", "", true, TWO_SOURCES);
    let report = r.check(&huge, start());
    assert_eq!(
        report.outcome,
        CheckOutcome::Fail(JobReason::DestinationSpace)
    );
    let run = r.run(&huge);
    assert_eq!(
        (run.status, run.reason),
        (PlanStatus::Failed, Some(JobReason::DestinationSpace))
    );
    assert!(r.log().is_empty());

    let Some(_mnt) = Tmpfs::mount(&r.dest, "2m", "plan_04") else {
        return;
    };
    std::fs::write(r.dest.join(".timezero-dest"), "dest-1\n").unwrap();
    let need = 2 * SIZE as u64;
    let pass = r.plan("require_mount = true", "", false, TWO_SOURCES);
    let report = r.check(&pass, start());
    assert_eq!(report.outcome, CheckOutcome::Pass, "{report:?}");
    let space = report.space.unwrap();
    assert_eq!(space.needed, need);
    // min_free in bytes: what is left after the targets, and one byte more.
    let spare = space.available - need;
    let fits = r.plan(&format!("min_free = {spare}"), "", false, TWO_SOURCES);
    assert_eq!(r.check(&fits, start()).outcome, CheckOutcome::Pass);
    let over = r.plan(&format!("min_free = {}", spare + 1), "", false, TWO_SOURCES);
    assert_eq!(
        r.check(&over, start()).outcome,
        CheckOutcome::Fail(JobReason::DestinationSpace)
    );
    // A percentage of the file system's size.
    assert_eq!(
        r.check(
            &r.plan("min_free = \"10%\"", "", false, TWO_SOURCES),
            start()
        )
        .outcome,
        CheckOutcome::Pass
    );
    assert_eq!(
        r.check(
            &r.plan("min_free = \"90%\"", "", false, TWO_SOURCES),
            start()
        )
        .outcome,
        CheckOutcome::Fail(JobReason::DestinationSpace)
    );
}

#[test]
fn plan_05_expansion_order_regions_and_groups() {
    let mut r = Rig::new();
    r.finder = FakeFinder::new()
        .with("/dev/vg0/db-c", "mem:db-c", SIZE as u64)
        .with("/dev/vg0/db-a", "mem:db-a", SIZE as u64)
        .with("/dev/vg0/db-b", "mem:db-b", SIZE as u64)
        .with("/dev/vg0/log-a", "mem:log-a", SIZE as u64)
        .with("/dev/vg0/log-b", "mem:log-b", SIZE as u64)
        .with("/dev/vg1/db-z", "mem:db-z", SIZE as u64);
    let body = "[[region]]\nname = \"wal1\"\nextents = [\"0:64KiB\"]\n\
                [[region]]\nname = \"data\"\nextents = [\"64KiB:64KiB\"]\n\
                [[region]]\nname = \"wal2\"\nextents = [\"128KiB:64KiB@0\"]\n\
                [[activity]]\nname = \"each\"\nsources = [\"/dev/vg0/db-*\"]\n\
                [[activity]]\nname = \"logs\"\nsources = [\"/dev/vg0/log-b\", \"/dev/vg0/log-a\"]\nregions = [\"wal*\"]\n\
                [[activity]]\nname = \"all\"\nsources = [\"/dev/vg*/db-?\"]\ngroup = true\n";
    let plan = r.plan("", "", false, body);
    let naming = Naming {
        job: JOB,
        day: day(),
    };
    let tasks = expand(&plan, &r.finder, naming).unwrap();
    let summary: Vec<(u32, &str, Vec<&str>, Option<&str>)> = tasks
        .iter()
        .map(|t| {
            (
                t.index,
                t.activity.as_str(),
                t.sources.iter().map(|s| s.source.path.as_str()).collect(),
                t.region.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "each", vec!["/dev/vg0/db-a"], None),
            (2, "each", vec!["/dev/vg0/db-b"], None),
            (3, "each", vec!["/dev/vg0/db-c"], None),
            (4, "logs", vec!["/dev/vg0/log-b"], Some("wal1")),
            (5, "logs", vec!["/dev/vg0/log-b"], Some("wal2")),
            (6, "logs", vec!["/dev/vg0/log-a"], Some("wal1")),
            (7, "logs", vec!["/dev/vg0/log-a"], Some("wal2")),
            (
                8,
                "all",
                vec![
                    "/dev/vg0/db-a",
                    "/dev/vg0/db-b",
                    "/dev/vg0/db-c",
                    "/dev/vg1/db-z"
                ],
                None
            ),
        ]
    );
    assert!(tasks[7].group);
    assert_eq!(tasks[4].extents, plan.regions[2].extents);
    assert!(tasks.iter().all(|t| t.skip.is_none()));
    // The same inputs give the same task list.
    assert_eq!(expand(&plan, &r.finder, naming).unwrap(), tasks);
    // `*` does not cross a '/'.
    let across = r.plan(
        "",
        "",
        false,
        "[[activity]]\nname = \"x\"\nsources = [\"/dev/*-a\"]\n",
    );
    let t = expand(&across, &r.finder, naming).unwrap();
    assert_eq!(t[0].skip, Some(Skip::NoMatch));
}

#[test]
fn plan_06_unavailable_literal_and_empty_pattern_are_skipped_tasks() {
    let r = Rig::new();
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/missing\", \"/dev/vg0/db-a\", \"/dev/vg9/*\"]\n";
    let plan = r.plan("", "", true, body);
    let report = r.check(&plan, start());
    assert_eq!(report.outcome, CheckOutcome::Pass);
    let skips: Vec<_> = report
        .tasks
        .iter()
        .map(|t| (t.pattern.as_str(), t.skip.clone()))
        .collect();
    assert_eq!(skips[1], ("/dev/vg0/db-a", None));
    assert_eq!(skips[2], ("/dev/vg9/*", Some(Skip::NoMatch)));
    assert_eq!(skips[0].0, "/dev/vg0/missing");
    assert!(matches!(skips[0].1, Some(Skip::Unavailable { .. })));
    // The plan goes on: the available source is copied; the job is partial.
    let run = r.run(&plan);
    assert_eq!(
        statuses(&run),
        vec![
            (RunStatus::Skipped, Some(JobReason::SourceUnavailable)),
            (RunStatus::Ok, None),
            (RunStatus::Skipped, Some(JobReason::NoMatch)),
        ]
    );
    assert_eq!((run.status, run.code()), (PlanStatus::Partial, 1));
    assert_eq!(std::fs::read(r.target("db-a", 2)).unwrap(), data(0));
}

#[test]
fn plan_07_all_skipped_runs_no_plan_pre() {
    let r = Rig::new();
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/missing\", \"/dev/vg9/*\"]\n";
    let plan = r.plan("", "", true, body);
    assert_eq!(
        r.check(&plan, start()).outcome,
        CheckOutcome::Skip(JobReason::NothingToDo)
    );
    let run = r.run(&plan);
    assert_eq!(
        (run.status, run.reason),
        (PlanStatus::Skipped, Some(JobReason::NothingToDo))
    );
    assert_eq!(run.tasks.len(), 2);
    assert!(run.tasks.iter().all(|t| t.status == RunStatus::Skipped));
    assert_eq!(run.steps(), vec![(Step::Checks, None)]);
    assert!(r.log().is_empty(), "no hook: {:?}", r.log());
}

#[test]
fn plan_08_plan_pre_failure_fails_the_job_and_finally_runs() {
    let r = Rig::new();
    r.exit("plan_pre", 100);
    let plan = r.plan("", "", true, TWO_SOURCES);
    let run = r.run(&plan);
    assert_eq!(
        (run.status, run.reason),
        (PlanStatus::Failed, Some(JobReason::HookFailed))
    );
    assert!(run.error.as_deref().unwrap().contains("code 100"));
    assert_eq!(
        statuses(&run),
        vec![(RunStatus::Canceled, Some(JobReason::Halted)); 2]
    );
    assert_eq!(r.log(), vec!["plan_pre - running", "finally - failed"]);
    assert_eq!(r.active_sessions(), 0);
    assert!(r.fake.calls().is_empty());
    // A reserved code fails it too.
    r.exit("plan_pre", 3);
    assert_eq!(r.run(&plan).status, PlanStatus::Failed);
}

#[test]
fn plan_09_tasks_run_one_after_another_in_creation_order() {
    let r = Rig::new();
    let body = "[[activity]]\nname = \"b\"\nsources = [\"/dev/vg0/db-b\"]\n\
                [[activity]]\nname = \"a\"\nsources = [\"/dev/vg0/db-a\", \"/dev/vg0/db-c\"]\n";
    let run = r.run(&r.plan("", "", false, body));
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    let tasks: Vec<Option<u32>> = run
        .events
        .iter()
        .filter(|e| e.step == Step::Cut || e.step == Step::Catalog)
        .map(|e| e.task)
        .collect();
    // Each task is cut and finished before the next is cut.
    assert_eq!(
        tasks,
        vec![Some(1), Some(1), Some(2), Some(2), Some(3), Some(3)]
    );
    let sources: Vec<String> = run.tasks.iter().map(|t| t.task.source_label()).collect();
    assert_eq!(
        sources,
        vec!["/dev/vg0/db-b", "/dev/vg0/db-a", "/dev/vg0/db-c"]
    );
    let t0: Vec<u64> = run.tasks.iter().map(|t| t.t0_unix_ms.unwrap()).collect();
    assert!(t0.windows(2).all(|w| w[0] <= w[1]), "{t0:?}");
    // Every image is the source at its T0.
    assert_eq!(std::fs::read(r.target("db-b", 1)).unwrap(), data(1));
    assert_eq!(std::fs::read(r.target("db-a", 2)).unwrap(), data(0));
    assert_eq!(std::fs::read(r.target("db-c", 3)).unwrap(), data(2));
}

#[test]
fn plan_10_window_and_space_checked_again_before_each_task() {
    let mut r = Rig::new();
    // 06:00 in Berlin; each copy takes 20 minutes of clock time: tasks 1 and 2 start inside
    // `21:30-06:30`, task 3 at 06:40.
    r.clock.set(berlin("2026-12-02T06:00:00+01:00"));
    r.probe.copy_takes = Some(SignedDuration::from_mins(20));
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-*\", \"/dev/vg0/log-a\"]\n";
    let plan = r.plan("window = \"21:30-06:30\"", "", true, body);
    let run = r.run(&plan);
    assert_eq!(
        statuses(&run),
        vec![
            (RunStatus::Ok, None),
            (RunStatus::Ok, None),
            (RunStatus::Skipped, Some(JobReason::WindowClosed)),
            (RunStatus::Skipped, Some(JobReason::WindowClosed)),
        ]
    );
    assert_eq!(run.status, PlanStatus::Partial);
    assert!(!run
        .steps()
        .iter()
        .any(|(_, t)| *t == Some(3) || *t == Some(4)));
    assert!(!r.target("db-c", 3).exists());
    // Space: a task whose targets no longer fit fails with DestinationSpace.
    let tight = r.plan("min_free = \"1000TiB\"\nwindow = \"\"", "", false, body);
    let task = &expand(
        &tight,
        &r.finder,
        Naming {
            job: JOB,
            day: day(),
        },
    )
    .unwrap()[0];
    let (reason, _) = recheck_task(&tight, &r.global, r.clock.now(), task).unwrap();
    assert_eq!(reason, JobReason::DestinationSpace);
    let ok = r.plan("window = \"\"", "", false, body);
    assert!(recheck_task(&ok, &r.global, r.clock.now(), task).is_none());
}

#[test]
fn plan_11_halt_cancels_the_rest_continue_runs_them() {
    let r = Rig::new();
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-*\"]\n";
    r.exit("task_pre-1", 100);
    let halt = r.run(&r.plan("", "", true, body));
    assert_eq!(
        statuses(&halt),
        vec![
            (RunStatus::Failed, Some(JobReason::HookFailed)),
            (RunStatus::Canceled, Some(JobReason::Halted)),
            (RunStatus::Canceled, Some(JobReason::Halted)),
        ]
    );
    assert_eq!(
        (halt.status, halt.reason),
        (PlanStatus::Failed, Some(JobReason::HookFailed))
    );
    assert!(!r.target("db-b", 2).exists());
    let text = r.plan("", "", true, body).text.replace(
        "name = \"db\"\n",
        "name = \"db\"\non_task_error = \"continue\"\n",
    );
    let go_on = r.run(&Plan::parse(&text).unwrap());
    assert_eq!(
        statuses(&go_on),
        vec![
            (RunStatus::Failed, Some(JobReason::HookFailed)),
            (RunStatus::Ok, None),
            (RunStatus::Ok, None),
        ]
    );
    assert_eq!(go_on.status, PlanStatus::Failed);
    assert_eq!(std::fs::read(r.target("db-c", 3)).unwrap(), data(2));
}

#[test]
fn plan_12_a_frozen_mount_fails_the_task_and_nothing_is_thawed() {
    let r = Rig::new();
    r.fake.set_frozen("/srv/db");
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\"]\n\
                quiesce = { mode = \"freeze\", mounts = [\"/srv/a\", \"/srv/db\"] }\n";
    let run = r.run(&r.plan("", "", true, body));
    assert_eq!(
        statuses(&run),
        vec![(RunStatus::Failed, Some(JobReason::AlreadyQuiesced))]
    );
    assert_eq!(
        (run.status, run.reason),
        (PlanStatus::Failed, Some(JobReason::AlreadyQuiesced))
    );
    // What this task froze (/srv/a) is thawed; the mount frozen by someone else is not.
    assert_eq!(
        r.fake.ops(),
        vec![
            (FakeOp::Freeze, PathBuf::from("/srv/a")),
            (FakeOp::Freeze, PathBuf::from("/srv/db")),
            (FakeOp::Thaw, PathBuf::from("/srv/a")),
        ]
    );
    assert_eq!(r.fake.frozen(), vec![PathBuf::from("/srv/db")]);
    assert!(!run.steps().contains(&(Step::Cut, Some(1))));
    assert_eq!(r.active_sessions(), 0);
    assert!(
        !r.target("db-a", 1).exists(),
        "the unused target is removed"
    );
}

#[test]
fn plan_13_target_names_are_deterministic_and_must_differ() {
    let r = Rig::new();
    assert_eq!(source_component("/dev/vg0/db-a"), "dev_vg0_db-a");
    assert_eq!(source_component("/dev/mapper/a b:c"), "dev_mapper_a_b_c");
    assert_eq!(source_component("/.hidden"), "_.hidden");
    let plan = r.plan("", "", false, TWO_SOURCES);
    let report = r.check(&plan, start());
    let targets: Vec<PathBuf> = report
        .tasks
        .iter()
        .map(|t| t.sources[0].target.clone())
        .collect();
    assert_eq!(targets, vec![r.target("db-a", 1), r.target("db-b", 2)]);
    let text = r.plan("", "", false, TWO_SOURCES).text.replace(
        "id = \"dest-1\"\n",
        "id = \"dest-1\"\ntarget = \"{dest}/{plan}/{day}.img\"\n",
    );
    let report = r.check(&Plan::parse(&text).unwrap(), start());
    assert_eq!(
        report.outcome,
        CheckOutcome::Fail(JobReason::TargetConflict)
    );
    assert!(report.problems[0].contains("tasks 1, 2"), "{report:?}");
    let bad = text.replace("{day}.img", "{nope}.img");
    assert!(matches!(
        Plan::parse(&bad),
        Err(PlanError::Parse { line: Some(_), .. })
    ));
}

#[test]
fn plan_14_a_grouped_task_establishes_all_its_sessions_or_none() {
    let r = Rig::new();
    // db-b is the target of another active session: pair 2 of the group cannot be cut.
    let e = r.engine();
    let other = e.attach(Arc::new(MemVolume::with_data("other", &data(9))));
    let db_b = e.volume_by_locator("mem:db-b").unwrap();
    let mut spec = SessionSpec::whole(other, db_b);
    spec.mode = timezero::CopyMode::NoCopy;
    let blocker = e.establish(&spec).unwrap();
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\", \"/dev/vg0/db-b\"]\ngroup = true\n";
    let run = r.run(&r.plan("", "", false, body));
    assert_eq!(
        statuses(&run),
        vec![(RunStatus::Failed, Some(JobReason::Engine))]
    );
    assert!(
        run.tasks[0].error.as_deref().unwrap().contains("pair 2"),
        "{:?}",
        run.tasks[0].error
    );
    let live: Vec<SessionId> = e
        .status()
        .iter()
        .filter(|s| s.state == SessionState::Active)
        .map(|s| s.id)
        .collect();
    assert_eq!(live, vec![blocker], "no session of the group is left");
    assert!(!r.target("db-a", 1).exists());
    // Without the blocker both are cut at one T0 and copied.
    e.withdraw(blocker).unwrap();
    let run = r.run(&r.plan("", "", false, body));
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    let ids = &run.tasks[0].sessions;
    assert_eq!(ids.len(), 2);
    let st = e.status();
    let t0: Vec<u64> = st
        .iter()
        .filter(|s| ids.contains(&s.id))
        .map(|s| s.created_unix_ms)
        .collect();
    assert_eq!(t0.len(), 2);
    assert_eq!(t0[0], t0[1]);
    assert_eq!(std::fs::read(r.target("db-b", 1)).unwrap(), data(1));
}

#[test]
fn plan_15_thaw_between_cut_and_copy_or_after_completed() {
    let quiesce = "quiesce = { mode = \"freeze\", mounts = [\"/srv/db\"] }\n";
    let body = format!("[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\"]\n{quiesce}");
    let task_steps = |run: &PlanRun| -> Vec<Step> {
        run.events
            .iter()
            .filter(|e| e.task == Some(1))
            .map(|e| e.step)
            .collect()
    };
    let r = Rig::new();
    let run = r.run(&r.plan("", "writes = \"engine\"", true, &body));
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    assert_eq!(
        task_steps(&run),
        vec![
            Step::TaskPre,
            Step::Quiesce,
            Step::Cut,
            Step::Thaw,
            Step::AfterCut,
            Step::Copy,
            Step::Catalog,
            Step::TaskPost,
            Step::Finally
        ]
    );
    assert_eq!(
        *r.probe.frozen_during_copy.lock(),
        vec![Vec::<PathBuf>::new()]
    );

    let r = Rig::new();
    let run = r.run(&r.plan("", "writes = \"direct\"", true, &body));
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    assert_eq!(
        task_steps(&run),
        vec![
            Step::TaskPre,
            Step::Quiesce,
            Step::Cut,
            Step::AfterCut,
            Step::Copy,
            Step::Thaw,
            Step::Catalog,
            Step::TaskPost,
            Step::Finally
        ]
    );
    assert_eq!(
        *r.probe.frozen_during_copy.lock(),
        vec![vec![PathBuf::from("/srv/db")]]
    );
    assert!(r.fake.frozen().is_empty());
    let id = run.tasks[0].sessions[0];
    assert_eq!(
        r.engine().session(id).unwrap().state(),
        SessionState::Completed
    );
}

#[test]
fn plan_16_direct_writes_need_copy_mode_and_freeze() {
    let r = Rig::new();
    let freeze = "quiesce = { mode = \"freeze\", mounts = [\"/srv/db\"] }\n";
    let flush = "quiesce = { mode = \"flush\", mounts = [\"/srv/db\"] }\n";
    let act =
        |q: &str| format!("[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\"]\n{q}");
    for (session, quiesce, ok) in [
        ("writes = \"direct\"\nmode = \"copy\"", freeze, true),
        ("writes = \"direct\"\nmode = \"nocopy\"", freeze, false),
        ("writes = \"direct\"", flush, false),
        ("writes = \"direct\"", "", false),
        ("writes = \"engine\"\nmode = \"nocopy\"", flush, true),
    ] {
        let report = r.check(&r.plan("", session, false, &act(quiesce)), start());
        let want = if ok {
            CheckOutcome::Pass
        } else {
            CheckOutcome::Fail(JobReason::InvalidPlan)
        };
        assert_eq!(report.outcome, want, "{session} / {quiesce}: {report:?}");
    }
}

#[test]
fn plan_17_check_expands_and_checks_without_side_effects() {
    let r = Rig::new();
    let body = format!("{TWO_SOURCES}quiesce = {{ mode = \"freeze\", mounts = [\"/srv/db\"] }}\n");
    let plan = r.plan("", "", true, &body);
    let report = r.check(&plan, start());
    assert_eq!(report.outcome, CheckOutcome::Pass);
    assert_eq!(report.tasks.len(), 2);
    assert!(r.log().is_empty(), "no hook ran");
    assert!(r.fake.calls().is_empty(), "nothing was quiesced");
    assert!(r.engine().status().is_empty(), "nothing was established");
    assert!(!r.dest.join("db").exists(), "no target was created");
    let again = r.check(&plan, start());
    assert_eq!(again.tasks, report.tasks);
    // The report prints as JSON (what `plan check --json` shows).
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["outcome"]["outcome"], "pass");
    assert_eq!(
        json["tasks"][1]["sources"][0]["source"]["path"],
        "/dev/vg0/db-b"
    );
}

#[test]
fn plan_17_parse_errors_name_the_line_and_the_field() {
    let text =
        "name = \"db\"\n[destination]\npath = \"/b\"\nid = \"x\"\n[session]\ngrian = \"64KiB\"\n";
    match Plan::parse(text) {
        Err(PlanError::Parse { line, message, .. }) => {
            assert_eq!(line, Some(6));
            assert!(message.contains("grian"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let text =
        "name = \"db\"\n[destination]\npath = \"/b\"\nid = \"x\"\n[checks]\nmin_free = \"ten\"\n";
    let e = Plan::parse(text).unwrap_err();
    assert!(matches!(e, PlanError::Parse { line: Some(6), .. }), "{e}");
    let text = "name = \"db\"\n[destination]\npath = \"/b\"\nid = \"x\"\n[[activity]]\nname = \"a\"\nsources = [\"/dev/**\"]\n";
    assert!(matches!(
        Plan::parse(text),
        Err(PlanError::Invalid { ref field, .. }) if field == "activity[1].sources"
    ));
    let text = "name = \"db\"\n[destination]\npath = \"/b\"\nid = \"x\"\n[[activity]]\nname = \"a\"\nsources = [\"/dev/a\"]\nregions = [\"wal\"]\n";
    assert!(matches!(Plan::parse(text), Err(PlanError::Invalid { .. })));
    assert!(GlobalConfig::parse("backups_alowed = false\n").is_err());
    let g = GlobalConfig::parse(
        "backups_allowed = false\nwindow = \"20:00-06:00\"\n[retry]\nbackup_attempts = 2\n",
    )
    .unwrap();
    assert!(!g.backups_allowed);
    assert_eq!(g.window.unwrap().to_string(), "20:00-06:00");
}

#[test]
fn plan_18_a_run_keeps_the_text_and_sha256_of_its_plan() {
    use sha2::Digest;
    let r = Rig::new();
    let plan = r.plan("", "", false, TWO_SOURCES);
    let path = r.dir.path().join("db.toml");
    std::fs::write(&path, &plan.text).unwrap();
    let loaded = Plan::load(&path).unwrap();
    // Editing the file during the run changes nothing in it.
    std::fs::write(&path, "name = \"changed\"\n").unwrap();
    let run = r.run(&loaded);
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    assert_eq!(run.plan_text, plan.text);
    let want: [u8; 32] = sha2::Sha256::digest(plan.text.as_bytes()).into();
    assert_eq!(run.plan_sha256, want);
    assert_eq!(loaded.sha256_hex().len(), 64);
}

#[test]
fn hook_01_stage_order_of_a_job() {
    let r = Rig::new();
    let body = format!("{TWO_SOURCES}quiesce = {{ mode = \"freeze\", mounts = [\"/srv/db\"] }}\n");
    let run = r.run(&r.plan("", "", true, &body));
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    let mut want = vec![(Step::Checks, None), (Step::PlanPre, None)];
    for t in [1, 2] {
        for step in [
            Step::TaskPre,
            Step::Quiesce,
            Step::Cut,
            Step::Thaw,
            Step::AfterCut,
            Step::Copy,
            Step::Catalog,
            Step::TaskPost,
            Step::Finally,
        ] {
            want.push((step, Some(t)));
        }
    }
    want.push((Step::PlanPost, None));
    want.push((Step::Finally, None));
    assert_eq!(run.steps(), want);
    assert_eq!(
        r.log(),
        vec![
            "plan_pre - running",
            "task_pre 1 running",
            "after_cut 1 running",
            "task_post 1 ok",
            "finally 1 ok",
            "task_pre 2 running",
            "after_cut 2 running",
            "task_post 2 ok",
            "finally 2 ok",
            "plan_post - ok",
            "finally - ok",
        ]
    );
    assert_eq!(run.hooks.len(), 11);
    assert_eq!(r.fake.frozen(), Vec::<PathBuf>::new());
}

#[test]
fn hook_02_task_pre_failure_fails_the_task_before_quiesce() {
    let r = Rig::new();
    r.exit("task_pre", 100);
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\"]\n\
                quiesce = { mode = \"freeze\", mounts = [\"/srv/db\"] }\n";
    let run = r.run(&r.plan("", "", true, body));
    assert_eq!(
        statuses(&run),
        vec![(RunStatus::Failed, Some(JobReason::HookFailed))]
    );
    assert!(r.fake.calls().is_empty(), "no quiesce");
    assert!(!run.steps().contains(&(Step::Cut, Some(1))));
    assert_eq!(r.active_sessions(), 0);
    assert_eq!(
        r.log(),
        vec![
            "plan_pre - running",
            "task_pre 1 running",
            "task_post 1 failed",
            "finally 1 failed",
            "plan_post - failed",
            "finally - failed",
        ]
    );
}

#[test]
fn hook_04_plan_post_gets_the_task_list_on_stdin() {
    let r = Rig::new();
    let body = "[[region]]\nname = \"wal\"\nextents = [\"0:64KiB\"]\n\
                [[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\", \"/dev/vg0/missing\"]\nregions = [\"wal\"]\n";
    let run = r.run(&r.plan("", "", true, body));
    assert_eq!(run.status, PlanStatus::Partial, "{:?}", run.error);
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(r.dir.path().join("plan_post.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc["stage"], "plan_post");
    assert_eq!(doc["status"], "warning");
    let tasks = doc["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["task"], 1);
    assert_eq!(tasks[0]["source"], "/dev/vg0/db-a");
    assert_eq!(tasks[0]["region"], "wal");
    assert_eq!(tasks[0]["status"], "ok");
    assert_eq!(tasks[1]["task"], 2);
    assert_eq!(tasks[1]["source"], "/dev/vg0/missing");
    assert_eq!(tasks[1]["region"], serde_json::Value::Null);
    assert_eq!(tasks[1]["status"], "skipped");
}

#[test]
fn hook_08_on_failure_warn_makes_the_job_partial() {
    let r = Rig::new();
    r.exit("task_pre", 100);
    let h = r.hook.display();
    for (on_failure, status, code, task) in [
        ("warn", PlanStatus::Partial, 1, RunStatus::Warning),
        ("ignore", PlanStatus::Ok, 0, RunStatus::Ok),
        (
            "fail",
            PlanStatus::Failed,
            JobReason::HookFailed.code(),
            RunStatus::Failed,
        ),
    ] {
        let text = r.plan("", "", false, TWO_SOURCES).text
            + &format!(
                "[hooks]\ntask_pre = {{ run = [\"/bin/sh\", \"{h}\"], on_failure = \"{on_failure}\" }}\n"
            );
        let text = text.replace(
            "name = \"db\"\n",
            "name = \"db\"\non_task_error = \"continue\"\n",
        );
        let run = r.run(&Plan::parse(&text).unwrap());
        assert_eq!((run.status, run.code()), (status, code), "{on_failure}");
        assert!(run.tasks.iter().all(|t| t.status == task), "{on_failure}");
        for p in [r.target("db-a", 1), r.target("db-b", 2)] {
            let _ = std::fs::remove_file(p);
        }
    }
    // A plan hook that warns makes the job partial too.
    std::fs::remove_file(r.dir.path().join("exit-task_pre")).unwrap();
    r.exit("plan_post", 101);
    let text = r.plan("", "", false, TWO_SOURCES).text
        + &format!(
            "[hooks]\nplan_post = {{ run = [\"/bin/sh\", \"{h}\"], on_failure = \"warn\" }}\n"
        );
    let run = r.run(&Plan::parse(&text).unwrap());
    assert_eq!((run.status, run.code()), (PlanStatus::Partial, 1));
}

#[test]
fn plan_17_cli_plan_check_prints_tasks_and_exits_0_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join(".timezero-dest"), "d1\n").unwrap();
    let src = dir.path().join("vols");
    std::fs::create_dir(&src).unwrap();
    for name in ["b.img", "a.img"] {
        std::fs::write(src.join(name), vec![1u8; SIZE]).unwrap();
    }
    let write_plan = |checks: &str| {
        let text = format!(
            "name = \"db\"\ntimezone = \"Europe/Berlin\"\n[checks]\nrequire_mount = false\n{checks}\n\
             [destination]\npath = \"{}\"\nid = \"d1\"\n\
             [[activity]]\nname = \"vols\"\nsources = [\"{}/*.img\"]\n",
            dest.display(),
            src.display()
        );
        let path = dir.path().join("db.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let run = |path: &Path, at: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_timezero"))
            .args(["plan", "check"])
            .arg(path)
            .args(["--at", at, "--state"])
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let night = "2026-12-01T23:00:00+01:00[Europe/Berlin]";
    let plan = write_plan("window = \"21:30-06:30\"");
    let (code, out) = run(&plan, night);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": pass"), "{out}");
    let a = out.find("/vols/a.img").unwrap();
    let b = out.find("/vols/b.img").unwrap();
    assert!(a < b, "byte order: {out}");
    assert!(out.contains("/dest/db/"), "{out}");
    assert!(!dest.join("db").exists(), "nothing created");
    let (code, out) = run(&plan, "2026-12-02T12:00:00+01:00[Europe/Berlin]");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("skip (outside_window)"), "{out}");
    let (code, out) = run(&write_plan("min_free = \"1000TiB\""), night);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL (destination_space)"), "{out}");
    let (code, _) = run(&write_plan("min_fre = \"1GiB\""), night);
    assert_eq!(code, Some(2));
    let (code, _) = run(&plan, "yesterday");
    assert_eq!(code, Some(2));
}

#[test]
fn plan_17_the_documented_plan_file_parses() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/orchestration.md"
    ))
    .unwrap();
    let section = &doc[doc.find("### 3.1 Plan file").unwrap()..];
    let start = section.find("```toml\n").unwrap() + "```toml\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];
    let plan = Plan::parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.name, "db");
    assert_eq!(
        plan.checks.window.unwrap().0.unwrap().to_string(),
        "21:30-06:30"
    );
    assert_eq!(plan.session.copy_rate, Some(200 << 20));
    assert_eq!(plan.regions[0].extents.len(), 2);
    assert_eq!(plan.activities.len(), 2);
    assert!(plan.activities[0].group);
    assert_eq!(plan.activities[1].regions, vec!["wal*".to_string()]);
    assert!(plan.hooks.finally.is_some());
    assert_eq!(plan.retention.unwrap().keep_monthly, Some(12));
}

#[test]
fn hook_02_a_failing_task_post_fails_the_task_and_finally_sees_it() {
    let r = Rig::new();
    r.exit("task_post", 100);
    let body = "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\"]\n";
    let run = r.run(&r.plan("", "", true, body));
    assert_eq!(
        statuses(&run),
        vec![(RunStatus::Failed, Some(JobReason::HookFailed))]
    );
    assert_eq!(
        r.log(),
        vec![
            "plan_pre - running",
            "task_pre 1 running",
            "after_cut 1 running",
            "task_post 1 ok",
            "finally 1 failed",
            "plan_post - failed",
            "finally - failed",
        ]
    );
    // The image of a failed task is not kept: its copy had completed (a completed session
    // holds nothing and is forgotten with the other ended ones); the result names no session
    // and the target file is removed.
    assert!(run.tasks[0].sessions.is_empty());
    assert!(r
        .engine()
        .status()
        .iter()
        .all(|s| s.state != SessionState::Active));
    assert!(!r.target("db-a", 1).exists());
}

#[test]
fn plan_ids_each_have_a_test_named_after_them() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/docs/orchestration.md")).unwrap();
    let tests = std::fs::read_to_string(format!("{root}/tests/plan.rs")).unwrap();
    let ids: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("- PLAN-"))
        .map(|rest| rest[..2].to_string())
        .collect();
    assert_eq!(ids.len(), 18, "PLAN-01..18 in the doc");
    let missing: Vec<&String> = ids
        .iter()
        .filter(|n| !tests.contains(&format!("fn plan_{n}_")))
        .collect();
    assert!(missing.is_empty(), "PLAN ids without a test: {missing:?}");
}

#[test]
fn hook_01_command_quiesce_runs_between_task_pre_and_after_cut() {
    let r = Rig::new();
    let h = r.hook.display();
    let body = format!(
        "[[activity]]\nname = \"data\"\nsources = [\"/dev/vg0/db-a\"]\n\
         quiesce = {{ mode = \"command\", quiesce_cmd = [\"/bin/sh\", \"{h}\"], \
         unquiesce_cmd = [\"/bin/sh\", \"{h}\"] }}\n"
    );
    let run = r.run(&r.plan("", "", true, &body));
    assert_eq!(run.status, PlanStatus::Ok, "{:?}", run.error);
    assert_eq!(
        r.log(),
        vec![
            "plan_pre - running",
            "task_pre 1 running",
            "quiesce 1 running",
            "unquiesce 1 running",
            "after_cut 1 running",
            "task_post 1 ok",
            "finally 1 ok",
            "plan_post - ok",
            "finally - ok",
        ]
    );
    // A failing quiesce command fails the task before the cut; unquiesce_cmd still runs.
    r.exit("quiesce", 100);
    std::fs::remove_file(&r.log).unwrap();
    std::fs::remove_file(r.target("db-a", 1)).unwrap();
    let run = r.run(&r.plan("", "", true, &body));
    assert_eq!(
        statuses(&run),
        vec![(RunStatus::Failed, Some(JobReason::QuiesceFailed))]
    );
    assert!(!run.steps().contains(&(Step::Cut, Some(1))));
    assert_eq!(
        r.log()[2..4],
        [
            "quiesce 1 running".to_string(),
            "unquiesce 1 running".to_string()
        ]
    );
}
