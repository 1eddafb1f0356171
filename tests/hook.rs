//! The hook runner against real child processes (docs/orchestration.md, "Hooks").
//!
//! Goal: HOOK-03, -05, -06, -07 and -09 hold at the runner: what a hook is told, how its end is
//! classified, that it runs by argv in its own process group, that a timeout ends the whole
//! group and that only a bounded tail of its output is kept. Method: small `#!/bin/sh` scripts
//! written into a temporary directory log what they see into files; time is a `ManualClock`,
//! and a test moves it only after the script has said through a FIFO that it is running (the
//! runner registers its deadlines before it starts the child), so nothing depends on timing.
//! Survivors of a group are counted from /proc (processes of the group that have not exited).
#![cfg(feature = "orchestration")]
#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use timezero::clock::{Clock, ManualClock};
use timezero::hook::{
    live_group_members, run, HookContext, HookError, HookOutcome, HookRun, HookSpec, OnFailure,
    RunStatus, Stage, TaskReport, Verdict,
};
use timezero::store::{BackupDay, JobId};
use timezero::SessionId;

fn clock() -> ManualClock {
    ManualClock::new("2026-12-01T20:00:00Z".parse::<Timestamp>().unwrap())
}

/// Write an executable `#!/bin/sh` script named `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn spec(argv: &[&str]) -> HookSpec {
    HookSpec::new(argv.iter().copied()).unwrap()
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Run `spec` on a thread; the caller drives the clock.
fn run_in_thread(
    spec: HookSpec,
    ctx: HookContext,
    clock: &ManualClock,
) -> std::thread::JoinHandle<HookRun> {
    let clock: Arc<dyn Clock> = Arc::new(clock.clone());
    std::thread::spawn(move || run(&spec, &ctx, &*clock))
}

fn pid_from(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .trim_start()
                .chars()
                .next();
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

/// No process of group `pgid` is left running: `kill(-pgid, 0)` finds nobody, or only
/// zombies waiting for their new parent to reap them.
fn assert_group_gone(pgid: u32) {
    let group = rustix::process::Pid::from_raw(i32::try_from(pgid).unwrap()).unwrap();
    match rustix::process::test_kill_process_group(group) {
        Err(rustix::io::Errno::SRCH) => {}
        _ => assert_eq!(live_group_members(pgid), Vec::<u32>::new(), "group {pgid}"),
    }
}

#[test]
fn hook_05_exit_codes_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let ctx = HookContext::new(Stage::TaskPre);
    for (code, want) in [
        (0, "success"),
        (75, "skip"),
        (1, "reserved 1"),
        (99, "reserved 99"),
        (100, "user 100"),
        (255, "user 255"),
    ] {
        let s = script(dir.path(), &format!("exit{code}"), &format!("exit {code}"));
        let r = run(&spec(&[s.to_str().unwrap()]), &ctx, &clock);
        let got = match r.outcome {
            HookOutcome::Success => "success".to_string(),
            HookOutcome::Skip => "skip".to_string(),
            HookOutcome::Failed(HookError::ReservedExitCode(n)) => format!("reserved {n}"),
            HookOutcome::Failed(HookError::HookExit(n)) => format!("user {n}"),
            HookOutcome::Failed(e) => format!("other {e}"),
        };
        assert_eq!(got, want, "exit {code}");
        assert_eq!(r.exit_code, Some(code));
    }
}

#[test]
fn hook_05_killed_by_a_signal_and_failed_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let ctx = HookContext::new(Stage::TaskPre);
    let s = script(dir.path(), "suicide", "kill -USR1 $$");
    let r = run(&spec(&[s.to_str().unwrap()]), &ctx, &clock);
    assert!(
        matches!(r.outcome, HookOutcome::Failed(HookError::Signal(10))),
        "{:?}",
        r.outcome
    );

    let missing = dir.path().join("no-such-program");
    let r = run(&spec(&[missing.to_str().unwrap()]), &ctx, &clock);
    match &r.outcome {
        HookOutcome::Failed(HookError::Spawn { program, source }) => {
            assert_eq!(program, missing.to_str().unwrap());
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert!(r.pgid.is_none());
    let text = format!(
        "{}",
        match r.outcome {
            HookOutcome::Failed(e) => e,
            _ => unreachable!(),
        }
    );
    assert!(text.contains("no-such-program"), "{text}");

    let not_exec = dir.path().join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\nexit 0\n").unwrap();
    let r = run(&spec(&[not_exec.to_str().unwrap()]), &ctx, &clock);
    match &r.outcome {
        HookOutcome::Failed(HookError::Spawn { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
        }
        other => panic!("{other:?}"),
    }
}

/// A program that stays open for writing fails to start with `ETXTBSY` after the runner's
/// bounded retries, rather than hanging; the retries themselves exist for the short window
/// in which a concurrently forked child still holds a just-written script open.
#[test]
fn hook_05_a_program_held_open_for_writing_fails_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let s = script(dir.path(), "busy", "exit 0");
    let writer = std::fs::OpenOptions::new().append(true).open(&s).unwrap();
    let r = run(
        &spec(&[s.to_str().unwrap()]),
        &HookContext::new(Stage::TaskPre),
        &clock,
    );
    match &r.outcome {
        HookOutcome::Failed(HookError::Spawn { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ExecutableFileBusy);
        }
        other => panic!("{other:?}"),
    }
    drop(writer);
    let r = run(
        &spec(&[s.to_str().unwrap()]),
        &HookContext::new(Stage::TaskPre),
        &clock,
    );
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
}

#[test]
fn hook_06_argv_without_shell_env_and_own_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let log = dir.path().join("log");
    let s = script(
        dir.path(),
        "show",
        &format!(
            "printf '%s\\n' \"$1\" \"$2\" > {log}\n\
             env | grep '^TIMEZERO_' | sort >> {log}\n\
             echo \"pid $$ pgid $(cut -d' ' -f5 /proc/$$/stat)\" >> {log}",
            log = log.display()
        ),
    );
    let mut ctx = HookContext::new(Stage::TaskPre);
    ctx.job = Some(JobId(42));
    ctx.attempt = Some(2);
    ctx.plan = Some("db".into());
    ctx.task = Some(3);
    ctx.source = Some("/dev/vg0/db-a".into());
    ctx.target = Some("/backup/db/a.img".into());
    ctx.backup_day = Some("20261201".parse::<BackupDay>().unwrap());
    let r = run(
        &spec(&[s.to_str().unwrap(), "$HOME", "two words; $(id)"]),
        &ctx,
        &clock,
    );
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "$HOME", "no shell expands the argument");
    assert_eq!(lines[1], "two words; $(id)");
    for want in [
        "TIMEZERO_ATTEMPT=2",
        "TIMEZERO_BACKUP_DAY=20261201",
        "TIMEZERO_ERROR=NONE",
        "TIMEZERO_JOB=j42",
        "TIMEZERO_PLAN=db",
        "TIMEZERO_SOURCE=/dev/vg0/db-a",
        "TIMEZERO_STAGE=task_pre",
        "TIMEZERO_STATUS=running",
        "TIMEZERO_TARGET=/backup/db/a.img",
        "TIMEZERO_TASK=3",
    ] {
        assert!(lines.contains(&want), "{want} missing in {lines:?}");
    }
    assert!(
        !text.contains("TIMEZERO_SESSION="),
        "unset values are absent"
    );
    let last = lines.last().unwrap();
    let pid = r.pgid.unwrap();
    assert_eq!(
        *last,
        format!("pid {pid} pgid {pid}"),
        "the hook leads its own group"
    );
    let own_group = rustix::process::getpgrp().as_raw_pid().unsigned_abs();
    assert_ne!(pid, own_group);
}

#[test]
fn hook_06_shell_true_opts_in() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let out = dir.path().join("out");
    let mut s = spec(&[
        "echo \"$TIMEZERO_STAGE:$1\" > \"$2\"",
        "x y",
        out.to_str().unwrap(),
    ]);
    s.shell = true;
    let r = run(&s, &HookContext::new(Stage::AfterCut), &clock);
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "after_cut:x y\n");
}

#[test]
fn hook_07_timeout_sends_sigterm_to_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let fifo = dir.path().join("ready");
    mkfifo(&fifo);
    let bg = dir.path().join("bg");
    let s = script(
        dir.path(),
        "hang",
        &format!(
            "sleep 1000 &\necho $! > {}\necho ready > {}\nwait",
            bg.display(),
            fifo.display()
        ),
    );
    let mut sp = spec(&[s.to_str().unwrap()]);
    sp.timeout = timezero::hook::Timeout::parse("timeout", "30s", 3600).unwrap();
    let start = clock.now();
    let h = run_in_thread(sp, HookContext::new(Stage::TaskPre), &clock);
    assert_eq!(std::fs::read_to_string(&fifo).unwrap(), "ready\n");
    let sleeper = pid_from(&bg);
    assert!(alive(sleeper));
    clock.advance(SignedDuration::from_secs(29));
    clock.advance(SignedDuration::from_secs(1));
    let r = h.join().unwrap();
    assert!(
        matches!(
            r.outcome,
            HookOutcome::Failed(HookError::TimedOut { killed: false, .. })
        ),
        "{:?}",
        r.outcome
    );
    assert_eq!(r.signal, Some(15), "SIGTERM ended the leader");
    assert_eq!(r.ended.duration_since(start), SignedDuration::from_secs(30));
    assert!(!alive(sleeper), "the background child got SIGTERM too");
    assert_group_gone(r.pgid.unwrap());
}

#[test]
fn hook_07_sigterm_ignored_then_sigkill_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let fifo = dir.path().join("ready");
    mkfifo(&fifo);
    let bg = dir.path().join("bg");
    let s = script(
        dir.path(),
        "stubborn",
        &format!(
            "trap '' TERM\nsleep 1000 &\necho $! > {}\necho ready > {}\nwhile :; do wait; done",
            bg.display(),
            fifo.display()
        ),
    );
    let sp = spec(&[s.to_str().unwrap()]);
    let h = run_in_thread(sp, HookContext::new(Stage::TaskPre), &clock);
    assert_eq!(std::fs::read_to_string(&fifo).unwrap(), "ready\n");
    let sleeper = pid_from(&bg);
    // Default timeout 600 s, kill grace 10 s.
    clock.advance(SignedDuration::from_secs(600));
    assert!(alive(sleeper), "SIGTERM is ignored by the group");
    clock.advance(SignedDuration::from_secs(10));
    let r = h.join().unwrap();
    assert!(
        matches!(
            r.outcome,
            HookOutcome::Failed(HookError::TimedOut { killed: true, .. })
        ),
        "{:?}",
        r.outcome
    );
    assert_eq!(r.signal, Some(9));
    assert!(!alive(sleeper));
    assert_group_gone(r.pgid.unwrap());
}

#[test]
fn hook_07_processes_left_behind_by_a_normal_exit_are_killed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let bg = dir.path().join("bg");
    let s = script(
        dir.path(),
        "leaves",
        &format!("sleep 1000 &\necho $! > {}\nexit 0", bg.display()),
    );
    let r = run(
        &spec(&[s.to_str().unwrap()]),
        &HookContext::new(Stage::TaskPre),
        &clock,
    );
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
    assert_eq!(r.strays_killed, 1);
    assert!(!alive(pid_from(&bg)));
    assert_group_gone(r.pgid.unwrap());
}

#[test]
fn hook_09_output_tail_is_kept_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let s = script(
        dir.path(),
        "loud",
        "head -c 100000 /dev/zero | tr '\\0' a\nprintf END\necho oops >&2\nexit 101",
    );
    let r = run(
        &spec(&[s.to_str().unwrap()]),
        &HookContext::new(Stage::TaskPost),
        &clock,
    );
    assert!(matches!(
        r.outcome,
        HookOutcome::Failed(HookError::HookExit(101))
    ));
    let max = timezero::limits::HOOK_OUTPUT_BYTES_MAX;
    assert_eq!(r.stdout.total_bytes, 100_003);
    assert_eq!(r.stdout.bytes.len(), max);
    assert!(r.stdout.truncated());
    assert!(r.stdout.bytes.ends_with(b"aaaEND"));
    assert!(r.stdout.bytes[..max - 3].iter().all(|&b| b == b'a'));
    assert_eq!(r.stderr.text(), "oops\n");
    assert!(!r.stderr.truncated());
}

#[test]
fn hook_09_a_process_outside_the_group_holding_stdout_does_not_hang_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let fifo = dir.path().join("escaped");
    mkfifo(&fifo);
    let pidfile = dir.path().join("pid");
    let s = script(
        dir.path(),
        "escape",
        &format!(
            "setsid sh -c 'echo $$ > {pid}; echo x > {fifo}; exec sleep 1000' &\n\
             read x < {fifo}\necho done\nexit 0",
            pid = pidfile.display(),
            fifo = fifo.display()
        ),
    );
    let r = run(
        &spec(&[s.to_str().unwrap()]),
        &HookContext::new(Stage::TaskPre),
        &clock,
    );
    let escaped = pid_from(&pidfile);
    let still_there = alive(escaped);
    // Clean up before asserting, so a failure leaves nothing behind.
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(escaped).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    );
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
    assert_eq!(r.stdout.text(), "done\n");
    assert!(
        still_there,
        "the escaped process (own session) keeps running and holds stdout"
    );
    assert_group_gone(r.pgid.unwrap());
}

#[test]
fn hook_03_status_error_and_json_document_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let s = script(
        dir.path(),
        "post",
        &format!(
            "cat > {d}/stdin.json\nenv | grep '^TIMEZERO_' | sort > {d}/env",
            d = dir.path().display()
        ),
    );
    let mut ctx = HookContext::new(Stage::TaskPost);
    ctx.job = Some(JobId(7));
    ctx.attempt = Some(1);
    ctx.plan = Some("db".into());
    ctx.task = Some(2);
    ctx.source = Some("/dev/vg0/db-b".into());
    ctx.target = Some("/backup/b.img".into());
    ctx.session = Some(SessionId(5));
    ctx.backup_day = Some("2026-12-01".parse().unwrap());
    ctx.status = RunStatus::Failed;
    ctx.error = Some("quiesce timed out".into());
    let r = run(&spec(&[s.to_str().unwrap()]), &ctx, &clock);
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
    let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
    assert!(env.contains("TIMEZERO_STATUS=failed\n"), "{env}");
    assert!(env.contains("TIMEZERO_ERROR=quiesce timed out\n"), "{env}");
    assert!(env.contains("TIMEZERO_SESSION=s5\n"), "{env}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("stdin.json")).unwrap()).unwrap();
    assert_eq!(doc["stage"], "task_post");
    assert_eq!(doc["status"], "failed");
    assert_eq!(doc["error"], "quiesce timed out");
    assert_eq!(doc["job"], "j7");
    assert_eq!(doc["session"], "s5");
    assert_eq!(doc["backup_day"], "20261201");
    assert_eq!(doc["task"], 2);

    // No error: NONE in both.
    let mut ok = ctx.clone();
    ok.status = RunStatus::Ok;
    ok.error = None;
    let r = run(&spec(&[s.to_str().unwrap()]), &ok, &clock);
    assert!(r.outcome.is_success());
    let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
    assert!(env.contains("TIMEZERO_STATUS=ok\n"), "{env}");
    assert!(env.contains("TIMEZERO_ERROR=NONE\n"), "{env}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("stdin.json")).unwrap()).unwrap();
    assert_eq!(doc["error"], "NONE");
}

#[test]
fn hook_03_plan_post_task_list_on_stdin_and_an_unread_document_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let reads = script(
        dir.path(),
        "reads",
        &format!("cat > {}/stdin.json", dir.path().display()),
    );
    let ignores = script(dir.path(), "ignores", "exit 0");
    let mut ctx = HookContext::new(Stage::PlanPost);
    ctx.status = RunStatus::Warning;
    ctx.tasks = (1..=3000)
        .map(|i| TaskReport {
            task: i,
            source: format!("/dev/vg0/vol-{i}"),
            region: (i % 2 == 0).then(|| "wal".to_string()),
            status: if i == 2 {
                RunStatus::Failed
            } else {
                RunStatus::Ok
            },
            error: (i == 2).then(|| "target busy".to_string()),
        })
        .collect();
    assert!(ctx.document().len() > 128 * 1024, "larger than a pipe");
    let r = run(&spec(&[reads.to_str().unwrap()]), &ctx, &clock);
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("stdin.json")).unwrap()).unwrap();
    let tasks = doc["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3000);
    assert_eq!(tasks[1]["task"], 2);
    assert_eq!(tasks[1]["region"], "wal");
    assert_eq!(tasks[1]["status"], "failed");
    assert_eq!(tasks[1]["error"], "target busy");
    assert_eq!(tasks[0]["region"], serde_json::Value::Null);
    assert_eq!(doc["status"], "warning");

    let r = run(&spec(&[ignores.to_str().unwrap()]), &ctx, &clock);
    assert!(r.outcome.is_success(), "{:?}", r.outcome);
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Hooks {
    task_pre: HookSpec,
    plan_pre: HookSpec,
    finally: HookSpec,
}

#[test]
fn hook_08_spec_from_the_plan_file_and_on_failure_applied() {
    let hooks: Hooks = toml::from_str(
        r#"
        task_pre = { run = ["notify", "start"], on_failure = "warn", timeout = "2m" }
        plan_pre = { run = ["check-replica", "--lag-max", "30"], shell = false, kill_grace = "30s" }
        finally = { run = ["cleanup"], on_failure = "ignore", timeout = "1h30m" }
        "#,
    )
    .unwrap();
    assert_eq!(hooks.task_pre.run, ["notify", "start"]);
    assert_eq!(hooks.task_pre.on_failure, OnFailure::Warn);
    assert_eq!(hooks.task_pre.timeout.get(), SignedDuration::from_secs(120));
    assert_eq!(
        hooks.task_pre.kill_grace.get(),
        SignedDuration::from_secs(10)
    );
    assert_eq!(hooks.plan_pre.on_failure, OnFailure::Fail);
    assert_eq!(hooks.plan_pre.timeout.get(), SignedDuration::from_secs(600));
    assert_eq!(
        hooks.plan_pre.kill_grace.get(),
        SignedDuration::from_secs(30)
    );
    assert_eq!(hooks.finally.timeout.get(), SignedDuration::from_secs(5400));

    for bad in [
        r#"run = []"#,
        r#"run = ["x"]
           timeout = "soon""#,
        r#"run = ["x"]
           timeout = "0s""#,
        r#"run = ["x"]
           timeout = "2d""#,
        r#"run = ["x"]
           on_failure = "panic""#,
        r#"run = ["x"]
           retries = 3"#,
    ] {
        assert!(toml::from_str::<HookSpec>(bad).is_err(), "{bad}");
    }

    let failed = HookOutcome::Failed(HookError::HookExit(100));
    assert_eq!(failed.verdict(OnFailure::Fail), Verdict::Fail);
    assert_eq!(failed.verdict(OnFailure::Warn), Verdict::Warn);
    assert_eq!(failed.verdict(OnFailure::Ignore), Verdict::Ok);
    assert_eq!(HookOutcome::Skip.verdict(OnFailure::Ignore), Verdict::Skip);
    assert_eq!(HookOutcome::Success.verdict(OnFailure::Fail), Verdict::Ok);
}
