//! The binary against hostile or mistaken input.
//!
//! Goal: a wrong argument never harms data and always gets one clear line on stderr naming the
//! path or value involved, exit 1 (runtime) or 2 (usage). Method: drive the `timezero` binary
//! on temporary files and compare every file that must not change byte for byte.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

/// Bad input to the command line and the engine: volumes that must never be volumes, lengths,
/// targets holding data, partial files, messages, flag ranges and JSON.
mod bad_input {
    use super::common;

    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use timezero::engine::{Engine, EngineOptions, SessionSpec};
    use timezero::volume::{FileVolume, FileVolumeOptions};
    use timezero::Error;

    fn tz() -> Command {
        Command::new(env!("CARGO_BIN_EXE_timezero"))
    }

    fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
        tz().args(args).output().unwrap()
    }

    fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
        let o = run(args);
        assert!(
            o.status.success(),
            "timezero {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Runs a command that must fail with `code` and one line on stderr; returns that line.
    fn fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], code: i32) -> String {
        let o = run(args);
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(o.status.code(), Some(code), "timezero {args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "timezero {args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }

    fn p(x: &Path) -> &str {
        x.to_str().unwrap()
    }

    /// A 32-digit hex run: a volume id printed where a path belongs.
    fn has_hex_id(s: &str) -> bool {
        s.split(|c: char| !c.is_ascii_hexdigit())
            .any(|w| w.len() >= 32)
    }

    struct Files {
        _dir: tempfile::TempDir,
        d: PathBuf,
        table: PathBuf,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().to_path_buf();
            let table = d.join("t.tzt");
            ok(&[
                "init",
                p(&table),
                "--journal",
                "256KiB",
                "--capacity",
                "1MiB",
            ]);
            Files {
                _dir: dir,
                d,
                table,
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.d.join(name)
        }

        /// A file of `len` patterned bytes (seed `seed`), or zeros for seed 0.
        fn file(&self, name: &str, seed: u64, len: usize) -> PathBuf {
            let path = self.path(name);
            let data = if seed == 0 {
                vec![0u8; len]
            } else {
                common::pattern(seed, len)
            };
            std::fs::write(&path, data).unwrap();
            path
        }

        fn t(&self) -> &str {
            p(&self.table)
        }
    }

    #[test]
    fn hostile_table_and_its_files_are_refused_as_volumes() {
        let f = Files::new();
        let src = f.file("src.img", 3, 1 << 20);
        let x = f.file("x.img", 0, 1 << 20);
        let x_before = std::fs::read(&x).unwrap();
        std::fs::hard_link(&f.table, f.path("hard")).unwrap();
        std::os::unix::fs::symlink(&f.table, f.path("soft")).unwrap();
        let other = f.path("other.tzt");
        ok(&[
            "init",
            p(&other),
            "--journal",
            "128KiB",
            "--capacity",
            "64KiB",
        ]);
        std::fs::write(f.path("t.tzt.holder"), "pid 1 (stale)\n").unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(f.path("x.sock")).unwrap();
        let _ctl = std::os::unix::net::UnixListener::bind(f.path("t.tzt.ctl")).unwrap();
        for (target, needle) in [
            (f.table.clone(), "activity table"),
            (f.path("hard"), "activity table"),
            (f.path("soft"), "activity table"),
            (other.clone(), "activity table"),
            (f.path("t.tzt.holder"), "holder file"),
            (f.path("x.sock"), "socket"),
            (f.path("t.tzt.ctl"), "socket"),
        ] {
            let err = fails(&["establish", f.t(), p(&src), p(&target)], 1);
            assert!(err.contains(p(&target)) && err.contains(needle), "{err}");
            // As a source of a no-copy session too.
            let err = fails(&["establish", f.t(), p(&target), p(&x), "--nocopy"], 1);
            assert!(err.contains(p(&target)) && err.contains(needle), "{err}");
        }
        // Nor can `write` reach the table's bytes.
        let data = f.file("data", 5, 4096);
        let err = fails(&["write", f.t(), f.t(), "0", "--from", p(&data)], 1);
        assert!(err.contains("activity table"), "{err}");
        assert!(std::fs::read(&x).unwrap() == x_before);
        // The table is intact (each open bumps its generation, so its bytes are not compared).
        ok(&["copy", f.t()]);
        assert!(ok(&["recover", f.t()]).lines().count() == 1);
        assert!(ok(&["status", f.t()]).starts_with("no sessions"));
        assert!(ok(&["status", p(&other)]).starts_with("no sessions"));
    }

    #[test]
    fn hostile_engine_refuses_its_own_table_file() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("t.tzt");
        std::fs::write(dir.path().join("src"), common::pattern(1, 1 << 20)).unwrap();
        let e = Engine::create_path(&table, EngineOptions::default()).unwrap();
        std::fs::hard_link(&table, dir.path().join("link")).unwrap();
        assert!(matches!(
            e.attach_path(&dir.path().join("link")),
            Err(Error::NotAVolume { .. })
        ));
        // Attached behind the engine's back: establishing on it is refused all the same.
        let src = e.attach_path(&dir.path().join("src")).unwrap();
        let raw = FileVolume::open(&table, &FileVolumeOptions::default()).unwrap();
        let tgt = e.attach(Arc::new(raw));
        let r = e.establish(&SessionSpec {
            mode: timezero::activity::format::CopyMode::NoCopy,
            ..SessionSpec::whole(src, tgt)
        });
        assert!(matches!(r, Err(Error::NotAVolume { .. })), "{r:?}");
        assert!(e.status().is_empty());
    }

    #[test]
    fn hostile_write_from_devices_and_fifos_needs_a_length() {
        let f = Files::new();
        let src = f.file("src.img", 7, 1 << 20);
        let before = std::fs::read(&src).unwrap();
        // /dev/zero never ends: --len is required, checked before anything is written.
        let err = fails(&["write", f.t(), p(&src), "0", "--from", "/dev/zero"], 2);
        assert!(err.contains("/dev/zero") && err.contains("--len"), "{err}");
        let err = fails(
            &[
                "write",
                f.t(),
                p(&src),
                "512KiB",
                "--from",
                "/dev/zero",
                "--len",
                "1MiB",
            ],
            1,
        );
        assert!(
            err.contains(p(&src)) && err.contains("nothing was written"),
            "{err}"
        );
        // A regular file longer than the rest of the volume.
        let big = f.file("big", 9, 3 << 19);
        let err = fails(&["write", f.t(), p(&src), "0", "--from", p(&big)], 1);
        assert!(err.contains(p(&src)), "{err}");
        let err = fails(
            &[
                "write",
                f.t(),
                p(&src),
                "0",
                "--from",
                p(&big),
                "--len",
                "2MiB",
            ],
            1,
        );
        assert!(err.contains(p(&big)), "{err}");
        assert!(std::fs::read(&src).unwrap() == before, "the volume changed");
        // A FIFO without --len is refused at once (it would block until a writer appears).
        let fifo = f.path("fifo");
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let mut child = tz()
            .args(["write", f.t(), p(&src), "0", "--from", p(&fifo)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > Duration::from_secs(30) {
                child.kill().unwrap();
                panic!("write --from FIFO without --len blocked");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(2));
        // With a length, the bytes arrive and land.
        let out = ok(&[
            "write",
            f.t(),
            p(&src),
            "4KiB",
            "--from",
            "/dev/zero",
            "--len",
            "8KiB",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["bytes"], 8192, "{out}");
        let after = std::fs::read(&src).unwrap();
        assert!(after[4096..12288].iter().all(|&b| b == 0));
        assert!(after[..4096] == before[..4096] && after[12288..] == before[12288..]);
    }

    #[test]
    fn hostile_establish_refuses_a_target_holding_data() {
        let f = Files::new();
        let empty = f.file("empty.img", 0, 2 << 20);
        let precious = f.file("precious.img", 11, 2 << 20);
        let before = std::fs::read(&precious).unwrap();
        // Arguments swapped: the target holds data.
        let err = fails(&["establish", f.t(), p(&empty), p(&precious)], 1);
        assert!(
            err.contains(p(&precious)) && err.contains("holds data") && err.contains("--force"),
            "{err}"
        );
        assert!(ok(&["status", f.t()]).starts_with("no sessions"));
        ok(&["copy", f.t()]);
        assert!(std::fs::read(&precious).unwrap() == before);
        // A file-system signature on an otherwise empty target is named.
        let fs = f.file("fs.img", 0, 2 << 20);
        let mut b = std::fs::read(&fs).unwrap();
        b[1080] = 0x53;
        b[1081] = 0xef;
        std::fs::write(&fs, &b).unwrap();
        let src = f.file("src.img", 12, 2 << 20);
        let err = fails(&["establish", f.t(), p(&src), p(&fs)], 1);
        assert!(err.contains("ext2/3/4") && err.contains(p(&fs)), "{err}");
        // Only the ranges the session writes count: data elsewhere on the target is kept.
        let part = f.file("part.img", 0, 4 << 20);
        let mut b = std::fs::read(&part).unwrap();
        b[3 << 20] = 1;
        std::fs::write(&part, &b).unwrap();
        let out = ok(&[
            "establish",
            f.t(),
            p(&src),
            p(&part),
            "--extent",
            "0:1MiB",
            "--nocopy",
        ]);
        // The session id first, then the direction and T0 (RFC 3339).
        let (id, rest) = out.trim_end().split_once(": ").unwrap();
        assert_eq!(id, "s1");
        let (dir, t0) = rest.split_once(" at T0 ").unwrap();
        assert_eq!(dir, format!("{} -> {}", p(&src), p(&part)));
        assert!(is_rfc3339(t0.split(' ').next().unwrap()), "{out}");
        // --force establishes onto data on purpose.
        let out = ok(&[
            "establish",
            f.t(),
            p(&empty),
            p(&precious),
            "--force",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["session"], "s2");
        assert!(is_rfc3339(v["t0"].as_str().unwrap()), "{out}");
        assert!(v["t0_unix_ms"].as_u64().unwrap() > 0);
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    fn is_rfc3339(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 24
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'.'
            && b[23] == b'Z'
            && s.chars()
                .enumerate()
                .all(|(i, c)| [4, 7, 10, 13, 16, 19, 23].contains(&i) || c.is_ascii_digit())
    }

    #[test]
    fn hostile_export_never_overwrites_or_leaves_partial_files() {
        let f = Files::new();
        let src = f.file("src.img", 21, 1 << 20);
        let tgt = f.file("tgt.img", 0, 1 << 20);
        ok(&["establish", f.t(), p(&src), p(&tgt), "--nocopy"]);
        let out = f.file("out.img", 22, 4096);
        let err = fails(&["export", f.t(), "s1", p(&out)], 1);
        assert!(err.contains(p(&out)) && err.contains("--force"), "{err}");
        assert!(std::fs::read(&out).unwrap() == common::pattern(22, 4096));
        let j = ok(&["export", f.t(), "s1", p(&out), "--force", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["session"], "s1");
        assert_eq!(v["bytes"], 1 << 20);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
        // A failed export (the session has ended) leaves nothing behind.
        ok(&["withdraw", f.t(), "s1"]);
        let names = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let listed = names(&f.d);
        let err = fails(&["export", f.t(), "s1", p(&f.path("new.img"))], 1);
        assert!(err.contains("s1") && err.contains("withdrawn"), "{err}");
        assert_eq!(names(&f.d), listed, "a failed export left a file");
    }

    /// A tmpfs of 1 MiB, mounted for the test when running as root.
    struct SmallFs(PathBuf);

    impl SmallFs {
        fn mount(at: &Path) -> Option<SmallFs> {
            std::fs::create_dir_all(at).unwrap();
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
                .arg(at)
                .stderr(Stdio::null())
                .status()
                .ok()?;
            st.success().then(|| SmallFs(at.to_path_buf()))
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn hostile_init_on_a_full_disk_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("small");
        let Some(_fs) = SmallFs::mount(&mnt) else {
            println!("skipping: cannot mount a small tmpfs (needs root)");
            return;
        };
        let table = mnt.join("t.tzt");
        // The default table (32 MiB) cannot be allocated on 1 MiB.
        let err = fails(&["init", p(&table)], 1);
        assert!(err.contains(p(&table)), "{err}");
        assert!(!err.contains(".tmp-"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
        assert!(left.is_empty(), "a failed init left {left:?}");
        let err = fails(&["status", p(&table)], 1);
        assert!(err.contains("No such file"), "{err}");
        // A table that fits is created as if nothing had happened.
        ok(&[
            "init",
            p(&table),
            "--journal",
            "128KiB",
            "--capacity",
            "64KiB",
        ]);
        assert!(ok(&["status", p(&table)]).starts_with("no sessions"));
    }

    #[test]
    fn hostile_messages_name_paths_and_use_status_words() {
        let f = Files::new();
        let src = f.file("src.img", 31, 4 << 20);
        let tgt = f.file("tgt.img", 0, 4 << 20);
        // The real numbers of an extent past the end of the target.
        let err = fails(
            &[
                "establish",
                f.t(),
                p(&src),
                p(&tgt),
                "--extent",
                "0:1MiB@4MiB",
            ],
            1,
        );
        assert!(
            err.contains("4194304+1048576")
                && err.contains(p(&tgt))
                && err.contains("4194304 bytes"),
            "{err}"
        );
        // Two source extents overlapping are reported as such.
        let err = fails(
            &[
                "establish",
                f.t(),
                p(&src),
                p(&tgt),
                "--extent",
                "0:1MiB",
                "--extent",
                "512KiB:1MiB@2MiB",
            ],
            1,
        );
        assert!(
            err.contains("source extents") && err.contains(p(&src)),
            "{err}"
        );
        ok(&["establish", f.t(), p(&src), p(&tgt)]);
        // The target in use, named by path.
        let err = fails(&["establish", f.t(), p(&src), p(&tgt), "--force"], 1);
        assert!(
            err.contains("s1") && err.contains(p(&tgt)) && !has_hex_id(&err),
            "{err}"
        );
        // A source that is the target of another session.
        let tgt2 = f.file("tgt2.img", 0, 4 << 20);
        let err = fails(&["establish", f.t(), p(&tgt), p(&tgt2)], 1);
        assert!(err.contains(p(&tgt)) && !has_hex_id(&err), "{err}");
        // recover prints the words status uses, no Rust debug output.
        let out = ok(&["recover", f.t(), "--terminate-incomplete"]);
        assert!(out.contains("s1: terminated (RestartPolicy: "), "{out}");
        assert!(
            !out.contains("Terminated(") && !out.contains("Reason {"),
            "{out}"
        );
        let table2 = f.path("t2.tzt");
        ok(&["init", p(&table2)]);
        let tgt3 = f.file("tgt3.img", 0, 4 << 20);
        ok(&["establish", p(&table2), p(&src), p(&tgt3)]);
        ok(&["copy", p(&table2)]);
        let out = ok(&["recover", p(&table2)]);
        assert!(out.contains("s1: completed"), "{out}");
        assert!(ok(&["status", p(&table2)]).contains("s1 completed"));
        // A replaced volume is named by its path.
        std::fs::write(f.path("tgt3.new"), vec![0u8; 4 << 20]).unwrap();
        std::fs::rename(f.path("tgt3.new"), &tgt3).unwrap();
        let tgt4 = f.file("tgt4.img", 0, 4 << 20);
        ok(&["establish", p(&table2), p(&src), p(&tgt4), "--nocopy"]);
        std::fs::write(f.path("tgt4.new"), vec![0u8; 4 << 20]).unwrap();
        std::fs::rename(f.path("tgt4.new"), &tgt4).unwrap();
        let out = ok(&["reset", p(&table2), p(&tgt4)]);
        assert!(
            out.contains("s2: terminated (IdentityMismatch: ") && out.contains(p(&tgt4)),
            "{out}"
        );
        assert!(!has_hex_id(&out), "{out}");
        let st = ok(&["status", p(&table2)]);
        assert!(!has_hex_id(&st), "{st}");
        // No internal names, no "at offset 0" where no offset is involved.
        let err = fails(&["status", p(&f.path("none.tzt"))], 1);
        assert!(err.contains("none.tzt") && !err.contains("offset"), "{err}");
        let err = fails(&["serve", f.t(), "--listen", "8.8.8.8:10809"], 2);
        assert!(
            err.contains("--allow-remote") && !err.contains("NbdConfig"),
            "{err}"
        );
        let err = fails(&["init", p(&f.path("j.tzt")), "--journal", "1000"], 2);
        assert!(
            err.contains("128KiB to 1GiB") && !err.contains("journal_bytes"),
            "{err}"
        );
        let err = fails(&["stop", f.t()], 1);
        assert_eq!(
            err.trim_end(),
            format!("timezero: no server is running for {}", f.t())
        );
    }

    #[test]
    fn hostile_flag_values_out_of_range_are_usage_errors() {
        let f = Files::new();
        let src = f.file("src.img", 41, 1 << 20);
        let tgt = f.file("tgt.img", 0, 1 << 20);
        let t = f.t();
        for (args, needle) in [
            (vec!["copy", t, "--rate", "0"], "at least 1 byte/s"),
            (vec!["copy", t, "--threads", "0"], "1 to 64"),
            (vec!["copy", t, "--threads", "65"], "1 to 64"),
            (vec!["copy", t, "--batch", "0"], "4KiB to 4MiB"),
            (vec!["copy", t, "--batch", "5MiB"], "4KiB to 4MiB"),
            (
                vec!["init", "x.tzt", "--journal", "64KiB"],
                "128KiB to 1GiB",
            ),
            (vec!["init", "x.tzt", "--capacity", "5GiB"], "64KiB to 4GiB"),
            (
                vec!["establish", t, p(&src), p(&tgt), "--extent", "1MiB"],
                "OFFSET:LEN",
            ),
            (
                vec!["establish", t, p(&src), p(&tgt), "--extent", "0:1X"],
                "suffix",
            ),
            (
                vec!["establish", t, p(&src), p(&tgt), "--grain", "3KiB"],
                "power of two",
            ),
            (
                vec!["establish", t, p(&src), p(&tgt), "--grain", "2MiB"],
                "4KiB to 1MiB",
            ),
            (vec!["read", t, "s1", "0", "65MiB"], "export"),
            (
                vec!["write", t, p(&src), "0.1K", "--from", p(&tgt)],
                "whole number",
            ),
        ] {
            let err = fails(&args, 2);
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        // Fractions of binary suffixes.
        let j = f.path("frac.tzt");
        let out = ok(&[
            "init",
            p(&j),
            "--journal",
            "1.5MiB",
            "--capacity",
            "0.5MiB",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["journal_bytes"], 3 << 19);
        assert_eq!(v["checkpoint_bytes"], 1 << 19);
        let help = ok(&["init", "--help"]);
        assert!(help.contains("1K = 1KiB = 1024"), "{help}");
    }

    #[test]
    fn hostile_every_command_speaks_one_json() {
        let f = Files::new();
        let src = f.file("src.img", 51, 1 << 20);
        let tgt = f.file("tgt.img", 0, 1 << 20);
        let t = f.t();
        let js = |args: &[&str]| -> serde_json::Value {
            let out = ok(args);
            assert_eq!(out.lines().count(), 1, "{args:?}: {out}");
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
        };
        let v = js(&["establish", t, p(&src), p(&tgt), "--json"]);
        assert_eq!(v["session"], "s1");
        assert_eq!(v["mode"], "copy");
        let v = js(&["status", t, "--json"]);
        let s = &v["sessions"][0];
        assert_eq!(s["session"], "s1");
        assert_eq!(s["state"], "active");
        assert!(is_rfc3339(s["t0"].as_str().unwrap()));
        assert_eq!(s["size_bytes"], 1 << 20);
        assert_eq!(s["extents"][0]["len"], 1 << 20);
        let data = f.file("data", 52, 4096);
        let v = js(&["write", t, p(&src), "0", "--from", p(&data), "--json"]);
        assert_eq!(v["bytes"], 4096);
        let v = js(&[
            "read",
            t,
            "s1",
            "0",
            "4KiB",
            "--to",
            p(&f.path("r")),
            "--json",
        ]);
        assert_eq!(v["session"], "s1");
        assert!(std::fs::read(f.path("r")).unwrap() == common::pattern(51, 4096));
        let v = js(&["copy", t, "s1", "--json"]);
        assert_eq!(v["sessions"][0]["session"], "s1");
        assert_eq!(v["sessions"][0]["state"], "completed");
        let v = js(&["export", t, "s1", p(&f.path("e")), "--json"]);
        assert_eq!(v["bytes"], 1 << 20);
        let v = js(&["recover", t, "--json"]);
        assert_eq!(v["decisions"][0]["session"], "s1");
        assert_eq!(v["decisions"][0]["outcome"], "completed");
        let tgt2 = f.file("tgt2.img", 0, 1 << 20);
        js(&["establish", t, p(&src), p(&tgt2), "--nocopy", "--json"]);
        let v = js(&["reset", t, p(&tgt2), "--json"]);
        assert_eq!(v["decisions"][0]["session"], "s2", "{v}");
        assert_eq!(v["decisions"][0]["outcome"], "resumed", "{v}");
        let v = js(&["withdraw", t, "s2", "--json"]);
        assert_eq!(v["session"], "s2");
        assert_eq!(v["state"], "withdrawn");
        let v = js(&["status", t, "--json"]);
        assert_eq!(v["sessions"][1]["reason"]["code"], "Withdrawn");
        // Text status: a header row, then T0, size and percent per session.
        let st = ok(&["status", t]);
        let mut lines = st.lines();
        assert!(lines.next().unwrap().starts_with("SESSION STATE"), "{st}");
        let row = lines.next().unwrap();
        assert!(row.starts_with("s1 completed") && row.contains("100.0%") && row.contains("1MiB"));
    }
}
