//! The binary under SIGKILL, and its command-line contract.
//!
//! Goal: a real process killed with SIGKILL while writing and copying leaves a table that
//! reopens with every session resumed and T0-exact; the CLI gives one-line errors with exit 1
//! and usage errors with exit 2; a second holder of a table is refused with the holder named.
//! Method: drive the `timezero` binary (init, establish, hidden `workload`, copy, export,
//! status, withdraw, recover) on temporary files; kill the workload repeatedly at varying times.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::process::Stdio;
use std::time::Duration;

use timezero::SessionId;
use timezero::{Engine, EngineOptions, Outcome};

use common::cli::{ok, p, tz};

#[test]
fn sigkill_during_writes_and_copy_then_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 8usize << 20;
    let t0 = common::pattern(9, size);
    std::fs::write(d.join("src"), &t0).unwrap();
    std::fs::write(d.join("tgt"), vec![0u8; size]).unwrap();
    std::fs::write(d.join("tgt2"), vec![0u8; 1 << 20]).unwrap();
    let table = d.join("t.tzt");
    ok(&[
        "init",
        p(&table),
        "--journal",
        "256KiB",
        "--capacity",
        "1MiB",
    ]);
    let s1 = ok(&[
        "establish",
        p(&table),
        p(&d.join("src")),
        p(&d.join("tgt")),
        "--grain",
        "16KiB",
    ]);
    assert!(s1.starts_with("s1: "), "{s1}");
    let s2 = ok(&[
        "establish",
        p(&table),
        p(&d.join("src")),
        p(&d.join("tgt2")),
        "--extent",
        "1MiB:1MiB@0",
        "--nocopy",
    ]);
    assert!(s2.starts_with("s2: "), "{s2}");
    let ref2 = t0[1 << 20..2 << 20].to_vec();
    for round in 0..6u64 {
        let mut child = tz()
            .args([
                "workload",
                p(&table),
                "--seed",
                &round.to_string(),
                "--rate",
                "2MiB",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + 90 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        let e = Engine::open_path(&table, EngineOptions::default()).unwrap();
        for dcs in &e.decisions {
            assert!(
                matches!(dcs.outcome, Outcome::Resumed | Outcome::Ended),
                "round {round}: {:?}",
                dcs
            );
        }
        assert!(
            e.status().iter().all(|s| s.reason.is_none()),
            "round {round}: {:?}",
            e.status()
        );
        assert_eq!(
            common::image(&e, SessionId(1)),
            t0,
            "round {round}: s1 image"
        );
        assert_eq!(
            common::image(&e, SessionId(2)),
            ref2,
            "round {round}: s2 image"
        );
    }
    let out = ok(&[
        "copy",
        p(&table),
        "s1",
        "--batch",
        "256KiB",
        "--threads",
        "3",
        "--depth",
        "2",
    ]);
    assert!(out.contains("s1 completed"), "{out}");
    ok(&["export", p(&table), "s1", p(&d.join("out"))]);
    assert!(std::fs::read(d.join("out")).unwrap() == t0);
    assert!(std::fs::read(d.join("tgt")).unwrap() == t0);
    ok(&["export", p(&table), "s2", p(&d.join("out2"))]);
    assert!(std::fs::read(d.join("out2")).unwrap() == ref2);
    let st = ok(&["status", p(&table), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(v["sessions"][0]["session"], "s1");
    assert_eq!(v["sessions"][0]["state"], "completed");
    assert_eq!(v["sessions"][1]["state"], "active");
    ok(&["withdraw", p(&table), "s2"]);
    let st = ok(&["status", p(&table)]);
    assert!(
        st.contains("s2 withdrawn") && st.contains("Withdrawn"),
        "{st}"
    );
    // `status` reads the committed state without opening volumes; it says who holds the table.
    assert!(
        st.trim_end()
            .ends_with("not held by any process: its committed state is shown"),
        "{st}"
    );
    // The backend in use is logged by the commands that open volumes (here `copy`, which finds
    // nothing left to copy).
    let out = ok(&["copy", p(&table)]);
    assert!(out.contains("backend pread"), "{out}");
    // Global flag: io_uring where the kernel allows (pread otherwise).
    let out = ok(&["copy", p(&table), "--io-uring"]);
    assert!(
        out.contains("backend io_uring") || out.contains("backend pread"),
        "{out}"
    );
    let rec = ok(&["recover", p(&table), "--json"]);
    assert!(rec.contains("decisions"), "{rec}");
}

#[test]
fn cli_errors_are_one_line_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let table = d.join("t.tzt");
    // Usage error: exit 2.
    let o = tz().args(["establish"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = tz()
        .args(["init", p(&table), "--journal", "12XB"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    // Missing table: exit 1 with one line naming it.
    let o = tz().args(["status", p(&d.join("none"))]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("none"), "{err}");
    ok(&["init", p(&table)]);
    std::fs::write(d.join("a"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(d.join("b"), vec![0u8; 1 << 19]).unwrap();
    // Target too small, misaligned extent, unknown session: one line, exit 1.
    for (args, needle) in [
        (
            vec!["establish", p(&table), p(&d.join("a")), p(&d.join("b"))],
            "target",
        ),
        (
            vec![
                "establish",
                p(&table),
                p(&d.join("a")),
                p(&d.join("b")),
                "--extent",
                "1000:64KiB",
            ],
            "aligned",
        ),
        (vec!["withdraw", p(&table), "s9"], "unknown session"),
    ] {
        let o = tz().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Flag values out of range are usage errors stating the range: exit 2, one line.
    for (args, needle) in [
        (vec!["copy", p(&table), "--batch", "8MiB"], "4KiB to 4MiB"),
        (
            vec![
                "establish",
                p(&table),
                p(&d.join("a")),
                p(&d.join("b")),
                "--grain",
                "3KiB",
            ],
            "power of two from 4KiB to 1MiB",
        ),
    ] {
        let o = tz().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A held table is refused, naming the holder; `status` still reads it and names the holder.
    let _held = Engine::open_path(&table, EngineOptions::default()).unwrap();
    let o = tz().args(["withdraw", p(&table), "s1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("held by pid"), "{err}");
    let st = ok(&["status", p(&table)]);
    assert!(st.contains("held by pid"), "{st}");
}

/// `timezero recovery-probe` (used by `timezero bench`) opens a table in a fresh process and
/// reports the recovery time and the process's resident memory as one JSON line.
#[test]
fn recovery_probe_reports_time_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let table = d.join("t.tzt");
    std::fs::write(d.join("a"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(d.join("b"), vec![0u8; 1 << 20]).unwrap();
    ok(&["init", p(&table)]);
    ok(&["establish", p(&table), p(&d.join("a")), p(&d.join("b"))]);
    let out = ok(&["recovery-probe", p(&table)]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["grains"], 16, "{out}");
    let before = v["rss_before_kib"].as_f64().unwrap();
    let peak = v["hwm_after_kib"].as_f64().unwrap();
    assert!(before > 0.0 && peak >= before, "{out}");
    assert!(v["open_ms"].as_f64().unwrap() >= 0.0, "{out}");
    // A missing table is a one-line error, not a panic.
    let o = tz()
        .args(["recovery-probe", p(&d.join("none"))])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}
