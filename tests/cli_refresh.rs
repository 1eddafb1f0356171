//! Incremental refresh through the binary: a completed incremental session, writes (one of them
//! killed with SIGKILL while it runs), `refresh`, `copy`: the target equals the source as it was
//! at the refresh, and the refresh copies no more than the grains those writes touched.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::process::Stdio;

use common::cli::{ok, p, tz};

const GRAIN: u64 = 64 << 10;

/// The grains `off..off+len` touches.
fn grains(off: u64, len: u64) -> std::ops::Range<u64> {
    off / GRAIN..(off + len).div_ceil(GRAIN)
}

#[test]
fn refresh_after_writes_and_a_killed_write_copies_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 8u64 << 20;
    std::fs::write(d.join("src"), common::pattern(5, size as usize)).unwrap();
    std::fs::write(d.join("tgt"), vec![0u8; size as usize]).unwrap();
    let (src, tgt, table) = (d.join("src"), d.join("tgt"), d.join("t.tzt"));
    ok(&["init", p(&table)]);
    let out = ok(&[
        "establish",
        p(&table),
        p(&src),
        p(&tgt),
        "--incremental",
        "--grain",
        "64KiB",
        "--force",
    ]);
    assert!(out.starts_with("s1: "), "{out}");
    assert!(ok(&["copy", p(&table), "s1"]).contains("s1 completed"));

    let mut touched = std::collections::BTreeSet::new();
    for (k, (off, len)) in [(100u64, 10u64), (3 << 20, 70_000), (6 << 20, 4096)]
        .into_iter()
        .enumerate()
    {
        let f = d.join(format!("w{k}"));
        std::fs::write(&f, common::pattern(100 + k as u64, len as usize)).unwrap();
        ok(&[
            "write",
            p(&table),
            p(&src),
            &off.to_string(),
            "--from",
            p(&f),
        ]);
        touched.extend(grains(off, len));
    }
    // A 2 MiB write killed while it runs (or just after it finished: either way its grains
    // are the most it may have changed).
    let big = d.join("big");
    std::fs::write(&big, common::pattern(200, 2 << 20)).unwrap();
    let mut child = tz()
        .args(["write", p(&table), p(&src), "4MiB", "--from", p(&big)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap();
    child.wait().unwrap();
    touched.extend(grains(4 << 20, 2 << 20));

    let st: serde_json::Value =
        serde_json::from_str(&ok(&["status", p(&table), "--json"])).unwrap();
    let s1 = &st["sessions"][0];
    assert_eq!(s1["state"], "completed");
    assert_eq!(s1["incremental"], true);
    let changed = s1["grains_changed"].as_u64().unwrap();
    assert!(changed >= 4, "the three small writes' grains: {changed}");
    assert!(
        changed <= touched.len() as u64,
        "{changed} > {}",
        touched.len()
    );

    let r: serde_json::Value =
        serde_json::from_str(&ok(&["refresh", p(&table), "s1", "--json"])).unwrap();
    let bytes = r[0]["bytes_to_copy"].as_u64().unwrap();
    assert_eq!(bytes, changed * GRAIN);
    assert!(bytes <= touched.len() as u64 * GRAIN);
    let at_refresh = std::fs::read(&src).unwrap();
    // Another write after the refresh: copied first, so the new T0 holds.
    let f = d.join("after");
    std::fs::write(&f, vec![0xee; 8192]).unwrap();
    ok(&["write", p(&table), p(&src), "1MiB", "--from", p(&f)]);
    assert!(ok(&["copy", p(&table), "s1"]).contains("s1 completed"));
    assert!(std::fs::read(&tgt).unwrap() == at_refresh);
    // The text form names what the copy moves.
    let text = ok(&["refresh", p(&table), "s1"]);
    assert!(
        text.starts_with("s1 refreshed at T0 ") && text.contains("1 grains (64KiB) to copy"),
        "{text}"
    );
}
