//! Quiesce and target locks (docs/orchestration.md, "Quiesce and locks").
//!
//! Goal: the four quiesce modes (QUI-01), the target lock (QUI-02), undoing exactly what was
//! done in reverse order (QUI-03), the timeout plus the fixed 180 s grace for quiesce and
//! unquiesce (QUI-04, QUI-05) and the guard that thaws on every path out (QUI-11). Method: a
//! `FakeQuiesce` records calls and hangs until instants of a `ManualClock`; a test moves the
//! clock only once the code under test is waiting (`wait_for_timer_at` on a deadline it knows),
//! so outcomes do not depend on timing. Command mode runs real scripts through the hook runner.
//! The real `FIFREEZE` backend and the block-device lock run on a loop-mounted ext4 file system
//! when the test runs as root with mkfs.ext4 and losetup, and print `SKIPPED` otherwise.
#![cfg(feature = "orchestration")]
#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use timezero::clock::{Clock, ManualClock};
use timezero::hook::{HookContext, HookError, HookSpec, Stage, Timeout};
use timezero::quiesce::{
    BackendError, FakeAnswer, FakeOp, FakeQuiesce, FsFreeze, LockError, QuiesceBackend,
    QuiesceError, QuiesceMode, QuiesceSpec, Quiesced, Quiescer, TargetKind, TargetLock,
};

const GRACE: i64 = 180;

struct Rig {
    clock: ManualClock,
    fake: FakeQuiesce,
    quiescer: Quiescer,
    start: Timestamp,
}

fn rig() -> Rig {
    let start: Timestamp = "2026-12-01T20:00:00Z".parse().unwrap();
    let clock = ManualClock::new(start);
    let dyn_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let fake = FakeQuiesce::new(Arc::clone(&dyn_clock));
    let quiescer = Quiescer::new(Arc::new(fake.clone()), dyn_clock);
    Rig {
        clock,
        fake,
        quiescer,
        start,
    }
}

fn at(start: Timestamp, secs: i64) -> Timestamp {
    start + SignedDuration::from_secs(secs)
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn freeze_spec(mounts: &[&str], timeout_secs: u64) -> QuiesceSpec {
    let mut spec = QuiesceSpec::new(QuiesceMode::Freeze {
        mounts: mounts.iter().map(|m| p(m)).collect(),
    });
    spec.timeout = Timeout::from_secs(timeout_secs);
    spec.unquiesce_timeout = Timeout::from_secs(timeout_secs);
    spec
}

fn ctx() -> HookContext {
    let mut c = HookContext::new(Stage::TaskPre);
    c.plan = Some("db".into());
    c.task = Some(1);
    c
}

fn quiesce_in_thread(
    r: &Rig,
    spec: QuiesceSpec,
) -> std::thread::JoinHandle<Result<Quiesced, QuiesceError>> {
    let q = r.quiescer.clone();
    std::thread::spawn(move || q.quiesce(&spec, &ctx()))
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn qui_01_freeze_mode_freezes_in_order_and_unquiesce_thaws() {
    let r = rig();
    let q = r
        .quiescer
        .quiesce(&freeze_spec(&["/a", "/b"], 30), &ctx())
        .unwrap();
    assert_eq!(q.frozen(), [p("/a"), p("/b")]);
    assert_eq!(r.fake.frozen(), [p("/a"), p("/b")]);
    q.unquiesce().unwrap();
    assert_eq!(
        r.fake.ops(),
        [
            (FakeOp::Freeze, p("/a")),
            (FakeOp::Freeze, p("/b")),
            (FakeOp::Thaw, p("/b")),
            (FakeOp::Thaw, p("/a")),
        ]
    );
    assert!(r.fake.frozen().is_empty());
}

#[test]
fn qui_01_flush_and_none_modes_hold_nothing() {
    let r = rig();
    let spec = QuiesceSpec::new(QuiesceMode::Flush {
        mounts: vec![p("/a"), p("/b")],
    });
    let q = r.quiescer.quiesce(&spec, &ctx()).unwrap();
    assert!(!q.holds_anything());
    drop(q);
    let q = r.quiescer.quiesce(&QuiesceSpec::none(), &ctx()).unwrap();
    assert!(!q.holds_anything());
    q.unquiesce().unwrap();
    assert_eq!(
        r.fake.ops(),
        [(FakeOp::Flush, p("/a")), (FakeOp::Flush, p("/b"))]
    );
}

#[test]
fn qui_01_unsupported_file_system_is_reported_and_earlier_freezes_thawed() {
    let r = rig();
    r.fake.answer(FakeOp::Freeze, "/b", FakeAnswer::Unsupported);
    let err = r
        .quiescer
        .quiesce(&freeze_spec(&["/a", "/b"], 30), &ctx())
        .unwrap_err();
    assert!(
        matches!(&err, QuiesceError::Unsupported { mount } if mount == Path::new("/b")),
        "{err}"
    );
    assert!(r.fake.frozen().is_empty());
    assert_eq!(r.fake.ops().last(), Some(&(FakeOp::Thaw, p("/a"))));
}

fn command_spec(dir: &Path, quiesce_body: &str) -> (QuiesceSpec, PathBuf) {
    let log = dir.join("log");
    let l = log.display();
    let quiesce = script(
        dir,
        "hold",
        &format!("echo \"hold $TIMEZERO_STAGE $TIMEZERO_PLAN\" >> {l}\n{quiesce_body}"),
    );
    let status = script(
        dir,
        "held",
        &format!(
            "n=$(cat {d}/count 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > {d}/count\n\
             echo \"status $n $TIMEZERO_STAGE\" >> {l}\n[ $n -ge 3 ]",
            d = dir.display()
        ),
    );
    let unquiesce = script(
        dir,
        "release",
        &format!("echo \"release $TIMEZERO_STAGE\" >> {l}"),
    );
    let mut spec = QuiesceSpec::new(QuiesceMode::Command {
        quiesce: HookSpec::new([quiesce]).unwrap(),
        status: Some(HookSpec::new([status]).unwrap()),
        unquiesce: HookSpec::new([unquiesce]).unwrap(),
        status_interval: Timeout::from_secs(5),
    });
    spec.timeout = Timeout::from_secs(60);
    spec.unquiesce_timeout = Timeout::from_secs(60);
    (spec, log)
}

#[test]
fn qui_01_command_mode_polls_status_until_exit_0_and_unquiesces() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig();
    let (spec, log) = command_spec(dir.path(), "exit 0");
    let h = quiesce_in_thread(&r, spec);
    // status runs at +0 s (not yet), +5 s (not yet) and +10 s (quiesced).
    r.clock.wait_for_timer_at(at(r.start, 5));
    r.clock.advance(SignedDuration::from_secs(5));
    r.clock.wait_for_timer_at(at(r.start, 10));
    r.clock.advance(SignedDuration::from_secs(5));
    let q = h.join().unwrap().unwrap();
    assert!(q.holds_anything());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hold quiesce db\nstatus 1 quiesce_status\nstatus 2 quiesce_status\nstatus 3 quiesce_status\n"
    );
    q.unquiesce().unwrap();
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .ends_with("status 3 quiesce_status\nrelease unquiesce\n"));
    assert!(r.fake.ops().is_empty(), "command mode freezes nothing");
}

#[test]
fn qui_01_command_mode_failed_quiesce_cmd_still_runs_unquiesce_cmd() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig();
    let (spec, log) = command_spec(dir.path(), "exit 101");
    let err = r.quiescer.quiesce(&spec, &ctx()).unwrap_err();
    assert!(
        matches!(
            err,
            QuiesceError::Command {
                stage: Stage::Quiesce,
                error: HookError::HookExit(101)
            }
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hold quiesce db\nrelease unquiesce\n"
    );
}

#[derive(Debug, serde::Deserialize)]
struct Activity {
    quiesce: QuiesceSpec,
}

#[test]
fn qui_01_spec_from_the_plan_file() {
    let a: Activity = toml::from_str(
        r#"quiesce = { mode = "freeze", mounts = ["/srv/db"], timeout = "30s", unquiesce_timeout = "30s" }"#,
    )
    .unwrap();
    assert_eq!(
        a.quiesce.mode,
        QuiesceMode::Freeze {
            mounts: vec![p("/srv/db")]
        }
    );
    assert_eq!(a.quiesce.timeout.get(), SignedDuration::from_secs(30));
    let a: Activity = toml::from_str(
        r#"quiesce = { mode = "command", quiesce_cmd = ["dbctl", "hold"], status_cmd = ["dbctl", "held"],
            unquiesce_cmd = ["dbctl", "release"], timeout = "2m", unquiesce_timeout = "1m" }"#,
    )
    .unwrap();
    match &a.quiesce.mode {
        QuiesceMode::Command {
            quiesce,
            status,
            unquiesce,
            status_interval,
        } => {
            assert_eq!(quiesce.run, ["dbctl", "hold"]);
            assert_eq!(status.as_ref().unwrap().run, ["dbctl", "held"]);
            assert_eq!(unquiesce.run, ["dbctl", "release"]);
            assert_eq!(status_interval.get(), SignedDuration::from_secs(5));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.quiesce.timeout.get(), SignedDuration::from_secs(120));
    assert_eq!(
        a.quiesce.unquiesce_timeout.get(),
        SignedDuration::from_secs(60)
    );
    let a: Activity = toml::from_str(r#"quiesce = { mode = "none" }"#).unwrap();
    assert_eq!(a.quiesce.mode, QuiesceMode::None);
    for bad in [
        r#"quiesce = { mode = "freeze" }"#,
        r#"quiesce = { mode = "freeze", mounts = [] }"#,
        r#"quiesce = { mode = "freeze", mounts = ["srv/db"] }"#,
        r#"quiesce = { mode = "freeze", mounts = ["/a", "/a"] }"#,
        r#"quiesce = { mode = "flush", mounts = ["/a"], quiesce_cmd = ["x"] }"#,
        r#"quiesce = { mode = "command", quiesce_cmd = ["x"] }"#,
        r#"quiesce = { mode = "command", quiesce_cmd = ["x"], unquiesce_cmd = ["y"], mounts = ["/a"] }"#,
        r#"quiesce = { mode = "none", mounts = ["/a"] }"#,
        r#"quiesce = { mode = "snapshot" }"#,
        r#"quiesce = { mode = "freeze", mounts = ["/a"], timeout = "2h" }"#,
        r#"quiesce = { mode = "freeze", mounts = ["/a"], grace = "1m" }"#,
    ] {
        assert!(toml::from_str::<Activity>(bad).is_err(), "{bad}");
    }
}

#[test]
fn qui_02_a_second_lock_on_a_file_is_refused_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t.img");
    std::fs::write(&target, b"x").unwrap();
    let first = TargetLock::acquire(&target).unwrap();
    assert_eq!(first.kind(), TargetKind::File);
    assert_eq!(first.path(), target);
    let err = TargetLock::acquire(&target).unwrap_err();
    assert!(
        matches!(&err, LockError::TargetBusy { path } if *path == target),
        "{err}"
    );
    drop(first);
    let again = TargetLock::acquire(&target).unwrap();
    drop(again);
    assert!(matches!(
        TargetLock::acquire(dir.path()),
        Err(LockError::NotATarget { .. })
    ));
    assert!(matches!(
        TargetLock::acquire(&dir.path().join("missing")),
        Err(LockError::Io { op: "stat", .. })
    ));
}

#[test]
fn qui_03_only_what_this_quiesce_froze_is_thawed_in_reverse_order() {
    let r = rig();
    // Someone else froze /b: /a (frozen by us) is thawed, /b stays frozen, /c is never tried.
    r.fake.set_frozen("/b");
    let err = r
        .quiescer
        .quiesce(&freeze_spec(&["/a", "/b", "/c"], 30), &ctx())
        .unwrap_err();
    assert!(
        matches!(&err, QuiesceError::AlreadyQuiesced { mount } if mount == Path::new("/b")),
        "{err}"
    );
    assert_eq!(
        r.fake.ops(),
        [
            (FakeOp::Freeze, p("/a")),
            (FakeOp::Freeze, p("/b")),
            (FakeOp::Thaw, p("/a")),
        ]
    );
    assert_eq!(r.fake.frozen(), [p("/b")]);

    let r = rig();
    let q = r
        .quiescer
        .quiesce(&freeze_spec(&["/c", "/a", "/b"], 30), &ctx())
        .unwrap();
    assert!(q.froze(Path::new("/a")));
    drop(q);
    let thaws: Vec<PathBuf> = r
        .fake
        .ops()
        .into_iter()
        .filter(|(op, _)| *op == FakeOp::Thaw)
        .map(|(_, m)| m)
        .collect();
    assert_eq!(thaws, [p("/b"), p("/a"), p("/c")]);
}

#[test]
fn qui_04_quiesced_at_t_plus_179_goes_on() {
    let r = rig();
    let done = at(r.start, 30 + GRACE - 1);
    r.fake
        .answer(FakeOp::Freeze, "/a", FakeAnswer::HangUntil(done));
    let h = quiesce_in_thread(&r, freeze_spec(&["/a"], 30));
    r.clock.wait_for_timer_at(done);
    r.clock.set(done);
    let q = h.join().unwrap().unwrap();
    assert_eq!(q.frozen(), [p("/a")]);
    q.unquiesce().unwrap();
    assert!(r.fake.frozen().is_empty());
}

#[test]
fn qui_04_not_quiesced_at_t_plus_180_cancels_and_thaws_what_was_frozen() {
    let r = rig();
    let late = at(r.start, 500);
    r.fake
        .answer(FakeOp::Freeze, "/b", FakeAnswer::HangUntil(late));
    let h = quiesce_in_thread(&r, freeze_spec(&["/a", "/b", "/c"], 30));
    // /a is frozen and the freeze of /b hangs.
    r.clock.wait_for_timer_at(late);
    r.clock.set(at(r.start, 30 + GRACE));
    let err = h.join().unwrap().unwrap_err();
    assert!(
        matches!(err, QuiesceError::QuiesceTimedOut { timeout } if timeout == Timeout::from_secs(30)),
        "{err}"
    );
    assert_eq!(
        r.fake.ops(),
        [
            (FakeOp::Freeze, p("/a")),
            (FakeOp::Freeze, p("/b")),
            (FakeOp::Thaw, p("/a")),
        ]
    );
    assert!(r.fake.frozen().is_empty());
    // The late freeze of /b completes; it is thawed at once and /c is never frozen.
    r.clock.set(late);
    r.fake.wait_for_returned(4);
    assert_eq!(
        r.fake.ops()[3..],
        [(FakeOp::Thaw, p("/b"))],
        "{:?}",
        r.fake.ops()
    );
    assert!(r.fake.frozen().is_empty());
}

#[test]
fn qui_04_command_mode_timeout_stops_quiesce_cmd_and_runs_unquiesce_cmd() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig();
    let fifo = dir.path().join("ready");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (spec, log) = command_spec(
        dir.path(),
        &format!("echo ready > {}\nexec sleep 1000", fifo.display()),
    );
    let h = quiesce_in_thread(&r, spec);
    assert_eq!(std::fs::read_to_string(&fifo).unwrap(), "ready\n");
    r.clock.set(at(r.start, 60 + GRACE));
    let err = h.join().unwrap().unwrap_err();
    assert!(matches!(err, QuiesceError::QuiesceTimedOut { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hold quiesce db\nrelease unquiesce\n"
    );
}

#[test]
fn qui_05_unquiesced_at_u_plus_179_is_fine() {
    let r = rig();
    let q = r
        .quiescer
        .quiesce(&freeze_spec(&["/a"], 30), &ctx())
        .unwrap();
    let done = at(r.start, 30 + GRACE - 1);
    r.fake
        .answer(FakeOp::Thaw, "/a", FakeAnswer::HangUntil(done));
    let h = std::thread::spawn(move || q.unquiesce());
    r.clock.wait_for_timer_at(done);
    r.clock.set(done);
    h.join().unwrap().unwrap();
    assert!(r.fake.frozen().is_empty());
}

#[test]
fn qui_05_not_unquiesced_at_u_plus_180_stops_waiting() {
    let r = rig();
    let q = r
        .quiescer
        .quiesce(&freeze_spec(&["/a"], 30), &ctx())
        .unwrap();
    let late = at(r.start, 600);
    r.fake
        .answer(FakeOp::Thaw, "/a", FakeAnswer::HangUntil(late));
    let h = std::thread::spawn(move || q.unquiesce());
    r.clock.wait_for_timer_at(late);
    r.clock.set(at(r.start, 30 + GRACE));
    let err = h.join().unwrap().unwrap_err();
    assert!(
        matches!(err, QuiesceError::UnquiesceTimedOut { timeout } if timeout == Timeout::from_secs(30)),
        "{err}"
    );
    assert_eq!(r.fake.frozen(), [p("/a")], "the thaw is still under way");
    // The thaw may still finish: it does once its hang ends.
    r.clock.set(late);
    r.fake.wait_for_returned(2);
    assert!(r.fake.frozen().is_empty());
}

fn task_that_fails_after_the_freeze(q: &Quiescer) -> Result<(), String> {
    let _guard = q
        .quiesce(&freeze_spec(&["/a", "/b"], 30), &ctx())
        .map_err(|e| e.to_string())?;
    Err("establish failed".to_string())
}

#[test]
fn qui_11_guard_thaws_on_an_error_path_and_in_a_panic() {
    let r = rig();
    assert_eq!(
        task_that_fails_after_the_freeze(&r.quiescer),
        Err("establish failed".to_string())
    );
    assert!(r.fake.frozen().is_empty());
    assert_eq!(
        r.fake.ops()[2..],
        [(FakeOp::Thaw, p("/b")), (FakeOp::Thaw, p("/a"))]
    );

    let r = rig();
    let q = r.quiescer.clone();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _guard = q.quiesce(&freeze_spec(&["/a"], 30), &ctx()).unwrap();
        panic!("cut panicked");
    }));
    assert!(caught.is_err());
    assert_eq!(
        r.fake.ops(),
        [(FakeOp::Freeze, p("/a")), (FakeOp::Thaw, p("/a"))]
    );
    assert!(r.fake.frozen().is_empty());
}

// ---- real file systems (root only) ----

/// A loop-mounted ext4 file system, or why there cannot be one. Unmounted, thawed and
/// detached on drop.
struct LoopFs {
    _dir: tempfile::TempDir,
    device: String,
    mnt: PathBuf,
    mounted: bool,
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the test can run: root and the tools at hand; else prints why.
fn root_with(name: &str, tools: &[&str]) -> bool {
    if !rustix::process::geteuid().is_root() {
        println!("SKIPPED {name}: not root");
        return false;
    }
    for tool in tools {
        if !have(tool) {
            println!("SKIPPED {name}: {tool} not found");
            return false;
        }
    }
    true
}

fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).unwrap().dev();
    let parent = std::fs::metadata(path.parent().unwrap()).unwrap().dev();
    dev != parent
}

fn loop_fs(name: &str) -> Option<LoopFs> {
    if !root_with(name, &["mkfs.ext4", "losetup", "mount", "umount"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4");
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    if !out.status.success() {
        println!(
            "SKIPPED {name}: no loop device ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fs = LoopFs {
        _dir: dir,
        device,
        mnt,
        mounted: false,
    };
    let ok = Command::new("mount")
        .arg(&fs.device)
        .arg(&fs.mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount {}", fs.device);
    fs.mounted = true;
    // Never freeze the file system the temporary directory lives on.
    assert!(
        is_mount_point(&fs.mnt),
        "{} is not a mount point",
        fs.mnt.display()
    );
    Some(fs)
}

/// `umount PATH`, retried while the file system is busy, for up to 10 s: a child process that
/// another test thread forks holds copies of this process's descriptors until it execs, so a
/// file system whose files this test has all closed can be busy for a moment. `false` when it
/// still failed.
fn umount_retrying(path: &Path) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let Ok(o) = Command::new("umount").arg(path).output() else {
            return false;
        };
        if o.status.success() {
            return true;
        }
        if !String::from_utf8_lossy(&o.stderr).contains("busy")
            || std::time::Instant::now() >= deadline
        {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl LoopFs {
    fn unmount(&mut self) {
        if self.mounted {
            let _ = FsFreeze.thaw(&self.mnt);
            assert!(umount_retrying(&self.mnt), "umount {}", self.mnt.display());
            self.mounted = false;
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = FsFreeze.thaw(&self.mnt);
            let _ = umount_retrying(&self.mnt);
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[test]
fn qui_01_fsfreeze_on_a_loop_mounted_ext4() {
    let Some(mut fs) = loop_fs("qui_01_fsfreeze_on_a_loop_mounted_ext4") else {
        return;
    };
    std::fs::write(fs.mnt.join("before"), b"written before the freeze").unwrap();
    FsFreeze.flush(&fs.mnt).unwrap();

    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new("2026-12-01T20:00:00Z".parse().unwrap()));
    let quiescer = Quiescer::new(Arc::new(FsFreeze), Arc::clone(&clock));
    let mnt = fs.mnt.to_str().unwrap().to_string();
    let q = quiescer.quiesce(&freeze_spec(&[&mnt], 30), &ctx()).unwrap();
    // Frozen: the kernel refuses a second freeze, and a second quiesce reports it.
    assert!(matches!(
        FsFreeze.freeze(&fs.mnt),
        Err(BackendError::Busy { op: "freeze", .. })
    ));
    assert!(matches!(
        quiescer.quiesce(&freeze_spec(&[&mnt], 30), &ctx()),
        Err(QuiesceError::AlreadyQuiesced { .. })
    ));
    // The refused quiesce thawed nothing: still frozen.
    assert!(matches!(
        FsFreeze.freeze(&fs.mnt),
        Err(BackendError::Busy { .. })
    ));
    q.unquiesce().unwrap();
    // Thawed exactly once: a second thaw is refused (EINVAL), and writes go through.
    assert!(matches!(
        FsFreeze.thaw(&fs.mnt),
        Err(BackendError::Io { op: "thaw", .. })
    ));
    std::fs::write(fs.mnt.join("after"), b"written after the thaw").unwrap();
    assert_eq!(
        std::fs::read(fs.mnt.join("before")).unwrap(),
        b"written before the freeze"
    );
    fs.unmount();
}

#[test]
fn qui_01_fsfreeze_unsupported_on_tmpfs() {
    if !root_with("qui_01_fsfreeze_unsupported_on_tmpfs", &["mount", "umount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tmpfs");
    std::fs::create_dir(&t).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "tz-test"])
        .arg(&t)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs");
    if !is_mount_point(&t) {
        let _ = Command::new("umount").arg(&t).status();
        panic!("{} is not a mount point", t.display());
    }
    let result = FsFreeze.freeze(&t);
    let _ = FsFreeze.thaw(&t);
    let _ = Command::new("umount").arg(&t).status();
    assert!(
        matches!(result, Err(BackendError::Unsupported { op: "freeze", .. })),
        "{result:?}"
    );
}

#[test]
fn qui_02_block_device_is_locked_by_exclusive_open() {
    let Some(mut fs) = loop_fs("qui_02_block_device_is_locked_by_exclusive_open") else {
        return;
    };
    let dev = PathBuf::from(&fs.device);
    // Mounted: the kernel refuses the exclusive open.
    assert!(matches!(
        TargetLock::acquire(&dev),
        Err(LockError::TargetBusy { .. })
    ));
    fs.unmount();
    let lock = acquire_retrying(&dev);
    assert_eq!(lock.kind(), TargetKind::BlockDevice);
    assert!(matches!(
        TargetLock::acquire(&dev),
        Err(LockError::TargetBusy { .. })
    ));
    // A mount is refused while the lock is held.
    let held = Command::new("mount")
        .arg(&fs.device)
        .arg(&fs.mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    if held {
        let _ = Command::new("umount").arg(&fs.mnt).status();
    }
    assert!(!held, "mount must fail while the target lock is held");
    drop(lock);
    let again = acquire_retrying(&dev);
    drop(again);
}

/// `TargetLock::acquire` of a device this test no longer holds, retried while it is busy for up
/// to 10 s: a child process that another test thread forks holds copies of this process's
/// descriptors (the exclusive open included) until it execs.
fn acquire_retrying(dev: &Path) -> TargetLock {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match TargetLock::acquire(dev) {
            Ok(lock) => return lock,
            Err(LockError::TargetBusy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("lock {}: {e}", dev.display()),
        }
    }
}
