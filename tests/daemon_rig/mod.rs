//! A state directory for `timezero daemon` tests: a table configured in `timezero.toml`, two
//! file volumes, a destination and a plan `db` whose hooks and command quiesce log
//! `JOB ATTEMPT STAGE TASK` lines; one stage may block (first attempt of j1 only) so that a
//! test can catch the daemon there. The daemon runs as a child process, on a manual clock the
//! test moves through `STATE/daemon.ctl`.

#![allow(dead_code, reason = "each test file uses a part")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use timezero::store::{
    Change, EventId, EventKind, EventRow, IdKind, JobId, JobQuery, JobRecord, Priority,
    ScheduleRow, SqliteStore, Store,
};

pub const SIZE: usize = 1 << 20;
/// The longest any wait of a test lasts before it fails.
pub const POLL_LIMIT: Duration = Duration::from_secs(60);
/// The instant the daemons' manual clocks start at.
pub const T0: &str = "2027-03-01T09:30:00Z";

pub fn data(seed: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) ^ (i >> 10) as u8)
        .collect()
}

pub fn at(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state: PathBuf,
    pub vols: PathBuf,
    pub dest: PathBuf,
    pub log: PathBuf,
}

impl Rig {
    /// `block` names the stage whose hook writes its pid to `ROOT/marker` and blocks (j1's
    /// first attempt only; `STAGE:N` for task N only); `session` adds lines to `[session]`.
    pub fn new(block: &str, session: &str) -> Rig {
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
        std::fs::write(
            state.join("timezero.toml"),
            "tables = [\"db.tzt\"]\n[limits]\njob_retry_delay_mins = 1\nbackup_attempts = 3\n",
        )
        .unwrap();
        let log = root.join("log");
        let (l, r) = (log.display(), root.display());
        // `STAGE:N` blocks the stage of task N only.
        let (block, only_task) = match block.split_once(':') {
            Some((stage, task)) => (stage, format!(" && [ $TIMEZERO_TASK = {task} ]")),
            None => (block, String::new()),
        };
        let blocker = |stage: &str| {
            if stage == block {
                format!(
                    "if [ $TIMEZERO_JOB = j1 ] && [ $TIMEZERO_ATTEMPT = 1 ]{only_task} && [ ! -e {r}/marker ]; \
                     then echo $$ > {r}/marker.tmp; mv {r}/marker.tmp {r}/marker; exec sleep 600; fi"
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
        let plan = format!(
            "name = \"db\"\ntimezone = \"UTC\"\n\
             [checks]\nrequire_mount = false\n\
             [destination]\npath = \"{}\"\nid = \"d1\"\n\
             [session]\ngrain = \"64KiB\"\n{session}\n\
             [hooks]\n{hooks}\
             [[activity]]\nname = \"vols\"\nsources = [\"{}/*.img\"]\n\
             quiesce = {{ mode = \"command\", \
             quiesce_cmd = [\"/bin/sh\", \"-c\", \"echo hold $TIMEZERO_JOB $TIMEZERO_ATTEMPT $TIMEZERO_TASK >> {l}; {}\"], \
             unquiesce_cmd = [\"/bin/sh\", \"-c\", \"echo release $TIMEZERO_JOB $TIMEZERO_ATTEMPT $TIMEZERO_TASK >> {l}; {}\"] }}\n",
            dest.display(),
            vols.display(),
            blocker("quiesce"),
            blocker("unquiesce"),
        );
        std::fs::write(state.join("plans/db.toml"), plan).unwrap();
        Rig {
            dir,
            root,
            state,
            vols,
            dest,
            log,
        }
    }

    pub fn tz(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_timezero"))
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .output()
            .unwrap()
    }

    /// `timezero ARGS` without `--state` (the engine's commands name their table).
    pub fn tz_plain(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_timezero"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Spawn a daemon on a manual clock at `clock`, with `env` added to its environment;
    /// returns at once (for a daemon that stops for good before it answers requests).
    pub fn spawn_daemon(&self, clock: &str, env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_timezero"));
        cmd.arg("daemon")
            .arg("--state")
            .arg(&self.state)
            .env("TIMEZERO_DAEMON_MANUAL_CLOCK", clock)
            .envs(env.iter().copied())
            .stdout(Stdio::from(self.daemon_out()))
            .stderr(Stdio::from(self.daemon_out()));
        cmd.spawn().unwrap()
    }

    /// Start a daemon, on a manual clock at `clock` when given; returns once it answers.
    pub fn start_daemon(&self, clock: Option<&str>, extra: &[&str]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_timezero"));
        cmd.arg("daemon")
            .args(extra)
            .arg("--state")
            .arg(&self.state)
            .stdout(Stdio::from(self.daemon_out()))
            .stderr(Stdio::from(self.daemon_out()));
        if let Some(t) = clock {
            cmd.env("TIMEZERO_DAEMON_MANUAL_CLOCK", t);
        }
        let mut child = cmd.spawn().unwrap();
        let start = Instant::now();
        loop {
            if self
                .ctl(r#"{"v":1,"req":"wake"}"#)
                .is_some_and(|r| r["ok"] == true)
            {
                return child;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the daemon exited at its start: {status}");
            }
            assert!(start.elapsed() < POLL_LIMIT, "the daemon never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ROOT/daemon.out`, where the daemons write what they do.
    fn daemon_out(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("daemon.out"))
            .unwrap()
    }

    /// What the daemons wrote.
    pub fn daemon_text(&self) -> String {
        std::fs::read_to_string(self.root.join("daemon.out")).unwrap_or_default()
    }

    /// One request line to `STATE/daemon.ctl` and its answer; `None` when nobody listens.
    pub fn ctl(&self, line: &str) -> Option<serde_json::Value> {
        let mut c = UnixStream::connect(self.state.join("daemon.ctl")).ok()?;
        c.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        BufReader::new(&c).read_line(&mut answer).ok()?;
        serde_json::from_str(&answer).ok()
    }

    /// Move the daemon's manual clock to `to`.
    pub fn set_clock(&self, to: &str) {
        let r = self
            .ctl(&format!(r#"{{"v":1,"req":"set-clock","to":"{to}"}}"#))
            .expect("the daemon answers");
        assert_eq!(r["ok"], true, "{r}");
    }

    pub fn store(&self) -> SqliteStore {
        SqliteStore::open(self.state.join("orchestration.sqlite")).unwrap()
    }

    pub fn jobs(&self) -> Vec<JobRecord> {
        self.store().jobs(&JobQuery::default()).unwrap()
    }

    pub fn job(&self, id: u64) -> Option<JobRecord> {
        SqliteStore::open(self.state.join("orchestration.sqlite"))
            .ok()?
            .job(JobId(id))
            .ok()
            .flatten()
    }

    /// A schedule `name` with cron `expr` (UTC) and a plan event of `db` on it, due first at
    /// `first`.
    pub fn schedule(&self, name: &str, expr: &str, priority: i64, first: &str) -> EventId {
        let store = self.store();
        let id = EventId(store.allocate(IdKind::Event).unwrap());
        store
            .commit(vec![
                Change::PutSchedule {
                    schedule: ScheduleRow {
                        name: name.to_string(),
                        expr: expr.to_string(),
                        zone: "UTC".to_string(),
                        enabled: true,
                    },
                    replace: false,
                },
                Change::PutEvent {
                    event: EventRow {
                        id,
                        name: format!("db-{name}"),
                        schedule: name.to_string(),
                        kind: EventKind::Plan {
                            plan: "db".to_string(),
                        },
                        priority: Priority::new(priority).unwrap(),
                        blocking: false,
                        enabled: true,
                        next_due: Some(at(first)),
                    },
                    replace: false,
                },
            ])
            .unwrap();
        id
    }

    /// Poll (bounded) until `ready` holds.
    pub fn wait_until(&self, what: &str, ready: impl Fn() -> bool) {
        let start = Instant::now();
        while !ready() {
            assert!(start.elapsed() < POLL_LIMIT, "no {what} in {POLL_LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) for the daemon to exit; its exit code.
    pub fn wait_exit(&self, child: &mut Child) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code();
            }
            assert!(start.elapsed() < POLL_LIMIT, "the daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the daemon with SIGKILL, and the blocked hook's process group.
    pub fn kill(&self, child: &mut Child) {
        child.kill().unwrap();
        child.wait().unwrap();
        if let Ok(pid) = std::fs::read_to_string(self.root.join("marker")) {
            let pid: i32 = pid.trim().parse().unwrap();
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{pid}")])
                .status();
        }
    }

    pub fn log(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// No hook ran twice for one attempt, and every quiesce hold was released.
    pub fn check_hooks(&self) {
        let mut seen = BTreeMap::new();
        for line in self.log() {
            if line.starts_with('j') {
                *seen.entry(line.clone()).or_insert(0) += 1;
            }
        }
        for (line, n) in &seen {
            assert_eq!(*n, 1, "hook ran {n} times: {line}");
        }
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
    }
}

/// The text of `out`'s streams, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
