//! `timezero plan run`, `plan list`, `jobs` and `jobs show` on the real binary: a plan over two
//! file volumes with a command quiesce and hooks that log, run in the command's own process
//! with everything recorded in the state directory's SQLite store.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const SIZE: usize = 1 << 20;

/// A state directory with a table, two source volumes, a destination and a plan `db`.
struct Rig {
    dir: tempfile::TempDir,
    state: PathBuf,
    vols: PathBuf,
    dest: PathBuf,
    log: PathBuf,
}

fn data(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn tz(args: &[&str], state: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_timezero"))
        .args(args)
        .arg("--state")
        .arg(state)
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

impl Rig {
    fn new(extra_hooks: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let vols = dir.path().join("vols");
        let dest = dir.path().join("dest");
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
        let log = dir.path().join("log");
        let l = log.display();
        let hook = |stage: &str| {
            format!(
                "{stage} = {{ run = [\"/bin/sh\", \"-c\", \
                 \"echo {stage} ${{TIMEZERO_TASK:--}} >> {l}; echo out-{stage}\"] }}\n"
            )
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
            if !extra_hooks.contains(&format!("{stage} =")) {
                hooks += &hook(stage);
            }
        }
        hooks += extra_hooks;
        let plan = format!(
            "name = \"db\"\ntable = \"db.tzt\"\ntimezone = \"UTC\"\n\
             [checks]\nrequire_mount = false\n\
             [destination]\npath = \"{}\"\nid = \"d1\"\n\
             [session]\ngrain = \"64KiB\"\n\
             [hooks]\n{hooks}\
             [[activity]]\nname = \"vols\"\nsources = [\"{}/*.img\"]\n\
             quiesce = {{ mode = \"command\", \
             quiesce_cmd = [\"/bin/sh\", \"-c\", \"echo hold $TIMEZERO_TASK >> {l}\"], \
             unquiesce_cmd = [\"/bin/sh\", \"-c\", \"echo release $TIMEZERO_TASK >> {l}\"] }}\n",
            dest.display(),
            vols.display()
        );
        std::fs::write(state.join("plans/db.toml"), plan).unwrap();
        Rig {
            dir,
            state,
            vols,
            dest,
            log,
        }
    }

    fn tz(&self, args: &[&str]) -> Output {
        tz(args, &self.state)
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn plan_run_wait_records_job_tasks_hooks_and_valid_images() {
    let r = Rig::new("");
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "j1\n");

    // The hooks ran once each, in the documented order, the quiesce held and released per task.
    let log = r.log();
    assert_eq!(
        log,
        [
            "plan_pre -",
            "task_pre 1",
            "hold 1",
            "release 1",
            "after_cut 1",
            "task_post 1",
            "finally 1",
            "task_pre 2",
            "hold 2",
            "release 2",
            "after_cut 2",
            "task_post 2",
            "finally 2",
            "plan_post -",
            "finally -",
        ],
        "{log:?}"
    );

    let show = json_of(&r.tz(&["jobs", "show", "j1", "--json"]));
    assert_eq!(show["status"], 0, "{show:#}");
    assert_eq!(show["job"]["state"]["state"], "done");
    let tasks = show["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{show:#}");
    for t in tasks {
        assert_eq!(t["status"]["status"], "ok", "{t:#}");
    }
    let hooks = show["hooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 11, "{show:#}");
    for h in hooks {
        assert_eq!(h["result"]["result"], "exited", "{h:#}");
        assert_eq!(h["result"]["detail"], 0, "{h:#}");
        assert!(h["stdout"].as_str().unwrap().starts_with("out-"), "{h:#}");
    }
    let images = show["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{show:#}");
    for (i, name) in images.iter().zip(["a.img", "b.img"]) {
        assert_eq!(i["state"]["state"], "valid", "{i:#}");
        // Nothing wrote to the sources: the target holds their bytes exactly.
        let target = i["target"]["locator"].as_str().unwrap();
        let got = std::fs::read(target).unwrap();
        assert!(
            got == std::fs::read(r.vols.join(name)).unwrap(),
            "{target} differs from {name}"
        );
        assert!(Path::new(target).starts_with(&r.dest), "{target}");
    }
    // The images carry checksums: `catalog verify` passes, and finds a target edited in place.
    let id = images[0]["id"].as_u64().unwrap().to_string();
    let out = r.tz(&["catalog", "verify", &id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let target = images[0]["target"]["locator"].as_str().unwrap();
    let mut bytes = std::fs::read(target).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(target, &bytes).unwrap();
    let out = r.tz(&["catalog", "verify", &id]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    bytes[100] ^= 0xff;
    std::fs::write(target, &bytes).unwrap();

    // The text forms name the same things.
    let text = String::from_utf8_lossy(&r.tz(&["jobs", "show", "j1"]).stdout).into_owned();
    assert!(text.contains("hook task_pre task 1"), "{text}");
    assert!(text.contains("stdout: out-task_pre"), "{text}");
    let list = json_of(&r.tz(&["jobs", "--json"]));
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");
    let plans = json_of(&r.tz(&["plan", "list", "--json"]));
    assert_eq!(plans[0]["name"], "db", "{plans:#}");
    assert_eq!(plans[0]["last_job"], "j1", "{plans:#}");
    assert_eq!(plans[0]["last_status"], 0, "{plans:#}");

    // A second run is j2 with targets of its own.
    let out = r.tz(&["plan", "run", "db", "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let run = json_of(&out);
    assert_eq!(run["job"], "j2");
    assert_eq!(run["status"], 0);
    let all = json_of(&r.tz(&["jobs", "--all", "--json"]));
    assert_eq!(all.as_array().unwrap().len(), 2);
    drop(r.dir);
}

#[test]
fn plan_run_a_failing_hook_fails_the_job_with_its_exit_code() {
    let r = Rig::new("task_pre = { run = [\"/bin/sh\", \"-c\", \"echo no-go >&2; exit 101\"] }\n");
    // Without --wait the job still runs to its end here; the exit status says it ran.
    let out = r.tz(&["plan", "run", "db"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "j1\n");
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("j2") && err.contains("status 13"), "{err}");
    let show = json_of(&r.tz(&["jobs", "show", "j2", "--json"]));
    assert_eq!(show["status"], 13, "{show:#}");
    assert_eq!(
        show["job"]["state"]["reason"]["reason"], "hook_exit",
        "{show:#}"
    );
    let pre: Vec<&Value> = show["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["key"]["stage"] == "task_pre")
        .collect();
    assert!(!pre.is_empty(), "{show:#}");
    assert_eq!(pre[0]["result"]["detail"], 101);
    assert_eq!(pre[0]["stderr"], "no-go\n");
    // No image of a task that never cut; no target left behind.
    assert!(show["images"].as_array().unwrap().is_empty(), "{show:#}");
}

#[test]
fn plan_run_refuses_when_the_daemon_holding_the_state_never_answers() {
    use rustix::fs::{flock, FlockOperation};
    let r = Rig::new("");
    let lock = r.state.join("daemon.lock");
    std::fs::write(&lock, "pid 1 timezero daemon\n").unwrap();
    let f = std::fs::File::open(&lock).unwrap();
    flock(&f, FlockOperation::NonBlockingLockExclusive).unwrap();
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // A notice that it waits for the daemon, then (after the wait bound) the one-line error.
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("timezero:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("did not answer"), "{err}");
    assert!(
        err.lines()
            .next()
            .unwrap_or("")
            .contains("waiting for the daemon"),
        "{err}"
    );
    assert!(r.log().is_empty(), "nothing ran");
    drop(f);
}

#[test]
fn plan_run_and_jobs_usage_errors() {
    let r = Rig::new("");
    let out = r.tz(&["plan", "run", "nosuchplan"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = r.tz(&["plan", "run", "db", "--priority", "100"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = r.tz(&["jobs", "show", "x1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = r.tz(&["jobs", "show", "j9"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Reading commands on a fresh state directory create nothing.
    let fresh = r.dir.path().join("fresh");
    let out = tz(&["jobs"], &fresh);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!fresh.join("orchestration.sqlite").exists());
    let out = tz(&["plan", "list", "--json"], &fresh);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json_of(&out), serde_json::json!([]));
}

#[test]
fn qui_08_plan_check_refuses_to_freeze_the_store_table_or_target_file_system() {
    let r = Rig::new("");
    // The same plan with a freeze of the file system holding everything of the test.
    let plan = std::fs::read_to_string(r.state.join("plans/db.toml")).unwrap();
    let start = plan.find("quiesce = {").unwrap();
    let frozen = format!(
        "{}quiesce = {{ mode = \"freeze\", mounts = [\"{}\"] }}\n",
        &plan[..start],
        r.dir.path().display()
    );
    std::fs::write(r.state.join("plans/frozen.toml"), frozen).unwrap();
    let out = r.tz(&["plan", "check", "frozen"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for what in ["the store", "the table", "the target"] {
        assert!(text.contains(&format!("would freeze {what}")), "{text}");
    }
    // The plan with a command quiesce passes.
    let out = r.tz(&["plan", "check", "db"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[path = "common/loopfs.rs"]
mod loopfs;

#[test]
fn qui_08_plan_run_refuses_to_freeze_the_store_file_system_in_one_line() {
    let r = Rig::new("");
    // As root the store lives on a loop-mounted file system of its own, so that even a wrong
    // decision would freeze only that one; otherwise on the temporary directory's (a freeze
    // needs CAP_SYS_ADMIN, so nothing can be frozen there).
    let fs = loopfs::loop_fs(
        "qui_08_plan_run_refuses_to_freeze_the_store_file_system_in_one_line (loop fs)",
    );
    if rustix::process::geteuid().is_root() && fs.is_none() {
        return;
    }
    let state = match &fs {
        Some(fs) => {
            let state = fs.mnt.join("state");
            std::fs::create_dir_all(state.join("plans")).unwrap();
            let out = Command::new(env!("CARGO_BIN_EXE_timezero"))
                .arg("init")
                .arg(state.join("db.tzt"))
                .args(["--log-size", "0"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            state
        }
        None => r.state.clone(),
    };
    let mount = match &fs {
        Some(fs) => fs.mnt.clone(),
        None => r.dir.path().to_path_buf(),
    };
    let plan = std::fs::read_to_string(r.state.join("plans/db.toml")).unwrap();
    let start = plan.find("quiesce = {").unwrap();
    let frozen = format!(
        "{}quiesce = {{ mode = \"freeze\", mounts = [\"{}\"] }}\n",
        &plan[..start],
        mount.display()
    );
    std::fs::write(state.join("plans/frozen.toml"), frozen).unwrap();
    let out = tz(&["plan", "run", "frozen", "--wait"], &state);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("refused (QUI-08)"), "{err}");
    assert!(err.contains("would freeze the store"), "{err}");
    assert!(out.stdout.is_empty(), "no job: {out:?}");
    let jobs = tz(&["jobs", "--all", "--json"], &state);
    assert_eq!(json_of(&jobs), serde_json::json!([]), "no job was created");
    if let Some(fs) = &fs {
        assert!(!fs.frozen(), "nothing was frozen");
    }
}

#[test]
fn plan_18_a_job_records_the_plan_text_and_its_sha256() {
    let r = Rig::new("");
    let file = r.state.join("plans/db.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Edited after the run: the job keeps the text it ran.
    std::fs::write(&file, format!("{text}# edited\n")).unwrap();
    let ran = r.dir.path().join("ran.toml");
    std::fs::write(&ran, &text).unwrap();
    let Ok(sum) = Command::new("sha256sum").arg(&ran).output() else {
        println!("SKIPPED plan_18_a_job_records_the_plan_text_and_its_sha256: no sha256sum");
        return;
    };
    let want = String::from_utf8(sum.stdout).unwrap();
    let want = want
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(want.len(), 64);
    let show = r.tz(&["jobs", "show", "j1"]);
    assert_eq!(show.status.code(), Some(0), "{show:?}");
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains(&format!("plan sha256 {want}")), "{shown}");
    let json = json_of(&r.tz(&["jobs", "show", "j1", "--json"]));
    assert_eq!(
        json["job"]["plan_text"],
        serde_json::json!(text),
        "{json:#}"
    );
    assert_eq!(
        json["job"]["plan_sha256"],
        serde_json::json!(want),
        "{json:#}"
    );
}

/// A loop device attached for one test, detached on every path out.
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A plan's task over a block device: the source is a loop device (as root; skipped with a
/// message elsewhere), its image is `Valid`, holds the device's bytes exactly and verifies.
#[test]
fn plan_run_over_a_loop_device_source() {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let losetup = Command::new("losetup").arg("--version").output();
    if !root || !losetup.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED plan_run_over_a_loop_device_source: needs root and losetup");
        return;
    }
    let r = Rig::new("");
    let backing = r.dir.path().join("device.img");
    std::fs::write(&backing, data(3)).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dev = LoopDev(String::from_utf8(out.stdout).unwrap().trim().to_string());
    let plan_path = r.state.join("plans/db.toml");
    let plan = std::fs::read_to_string(&plan_path).unwrap();
    let glob = format!("sources = [\"{}/*.img\"]", r.vols.display());
    assert!(plan.contains(&glob));
    std::fs::write(
        &plan_path,
        plan.replace(&glob, &format!("sources = [\"{}\"]", dev.0)),
    )
    .unwrap();

    let out = r.tz(&["plan", "run", "db", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show = json_of(&r.tz(&["jobs", "show", "j1", "--json"]));
    let images = show["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{show:#}");
    let i = &images[0];
    assert_eq!(i["state"]["state"], "valid", "{i:#}");
    assert_eq!(
        i["source"]["locator"].as_str(),
        Some(dev.0.as_str()),
        "{i:#}"
    );
    let target = i["target"]["locator"].as_str().unwrap();
    assert!(
        std::fs::read(target).unwrap() == data(3),
        "{target} differs"
    );
    let id = i["id"].as_u64().unwrap().to_string();
    let out = r.tz(&["catalog", "verify", &id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
