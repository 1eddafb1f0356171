//! Reverse restore through the binary: a session whose source was overwritten after T0 is
//! reversed; what would disturb it is refused; the copy that moves the grains back is killed
//! with SIGKILL several times and started again; at the end the source file is byte-identical
//! to the source at T0.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::process::Stdio;

use common::cli::{ok, p, tz};

const GRAIN: u64 = 64 << 10;

fn to_restore(table: &std::path::Path) -> u64 {
    let st: serde_json::Value = serde_json::from_str(&ok(&["status", p(table), "--json"])).unwrap();
    st["sessions"][0]["grains_to_restore"].as_u64().unwrap()
}

#[test]
fn reverse_then_a_copy_killed_with_sigkill_leaves_the_source_at_t0() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 16u64 << 20;
    let t0 = common::pattern(7, size as usize);
    let (src, tgt, table) = (d.join("src"), d.join("tgt"), d.join("t.tzt"));
    std::fs::write(&src, &t0).unwrap();
    std::fs::write(&tgt, vec![0u8; size as usize]).unwrap();
    ok(&["init", p(&table)]);
    ok(&[
        "establish",
        p(&table),
        p(&src),
        p(&tgt),
        "--nocopy",
        "--grain",
        "64KiB",
        "--force",
    ]);
    // Overwrite 12 MiB of the source after T0 (each grain is copied to the target first).
    let junk = d.join("junk");
    std::fs::write(&junk, common::pattern(8, 12 << 20)).unwrap();
    ok(&["write", p(&table), p(&src), "2MiB", "--from", p(&junk)]);
    assert_ne!(std::fs::read(&src).unwrap(), t0);

    let r: serde_json::Value =
        serde_json::from_str(&ok(&["reverse", p(&table), "s1", "--json"])).unwrap();
    let grains = (12u64 << 20) / GRAIN;
    assert_eq!(r["grains_to_restore"].as_u64().unwrap(), grains);
    assert_eq!(r["bytes_to_restore"].as_u64().unwrap(), 12 << 20);
    assert_eq!(to_restore(&table), grains);
    let text = ok(&["status", p(&table)]);
    assert!(
        text.contains(&format!("reverse restore: {grains} grains to move back")),
        "{text}"
    );

    // The target it restores from, and the session, are left alone meanwhile.
    for args in [
        vec!["write", p(&table), p(&tgt), "0", "--from", p(&junk)],
        vec!["withdraw", p(&table), "s1"],
    ] {
        let o = tz().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("is restoring its source"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }

    // Move the grains back at 4 MiB/s, killed with SIGKILL three times along the way.
    let mut left = grains;
    for k in 0..3u64 {
        let mut child = tz()
            .args(["copy", p(&table), "s1", "--rate", "4MiB"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + 100 * k));
        child.kill().unwrap();
        child.wait().unwrap();
        let now = to_restore(&table);
        assert!(now <= left, "{now} grains to move back, {left} before");
        left = now;
    }
    let out = ok(&["copy", p(&table), "s1"]);
    assert!(out.contains("s1 active"), "{out}");
    assert_eq!(to_restore(&table), 0);
    assert!(std::fs::read(&src).unwrap() == t0, "the source is not T0");
    // The session goes on, and may now be withdrawn.
    ok(&["withdraw", p(&table), "s1"]);
}

#[test]
fn reverse_wait_moves_everything_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 4u64 << 20;
    let t0 = common::pattern(9, size as usize);
    let (src, tgt, table) = (d.join("src"), d.join("tgt"), d.join("t.tzt"));
    std::fs::write(&src, &t0).unwrap();
    std::fs::write(&tgt, vec![0u8; size as usize]).unwrap();
    ok(&["init", p(&table)]);
    ok(&["establish", p(&table), p(&src), p(&tgt), "--force"]);
    ok(&["copy", p(&table), "s1"]);
    let junk = d.join("junk");
    std::fs::write(&junk, vec![0x42; 100_000]).unwrap();
    ok(&["write", p(&table), p(&src), "1MiB", "--from", p(&junk)]);
    // A completed session that recorded no changes: every grain moves back.
    let out = ok(&["reverse", p(&table), "s1", "--wait"]);
    assert!(
        out.contains("64 grains (4MiB) to move back") && out.contains("s1: restored"),
        "{out}"
    );
    assert!(std::fs::read(&src).unwrap() == t0);
    let o = tz().args(["reverse", p(&table), "s9"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
}
