//! `timezero mount` as a user would use it (root with /dev/fuse; each test prints a SKIPPED line
//! otherwise, and fails instead when `TIMEZERO_REQUIRE_FUSE` is set): a file system made on a
//! source volume, written through a loop device on the source file of the mount, sessions
//! established while mounted, their image files attached read-only with `losetup -r` and mounted
//! `ro,noload` showing exactly the files as they were at each T0; the mounting process killed
//! with SIGKILL while files are written, a new mount, and the images still exact. Then the bad
//! input of the command and the file semantics (no truncation, no growth, read-only images).

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::cli::{ok, p, tz};
use timezero::fault::powerloss::unavailable;

fn fuse_or_skip(test: &str) -> bool {
    if let Some(why) = unavailable() {
        // CI sets this where it saw /dev/fuse as root, so that a broken mount fails the run
        // instead of passing as a skip.
        assert!(
            std::env::var_os("TIMEZERO_REQUIRE_FUSE").is_none(),
            "{test}: TIMEZERO_REQUIRE_FUSE is set but FUSE mounts are unavailable: {why}"
        );
        println!("SKIPPED {test}: timezero mount needs FUSE: {why}");
        return false;
    }
    true
}

/// Whether `tool` can be run (`mkfs.xfs -V`, `losetup --version`, ...).
fn have(tool: &str, flag: &str) -> bool {
    Command::new(tool)
        .arg(flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run a system tool; its output, after checking that it succeeded.
fn sys(tool: &str, args: &[&str]) -> Output {
    let o = Command::new(tool).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Everything a test set up outside its temporary directory, undone on every path (also when
/// the test fails): processes killed, file systems and FUSE mounts unmounted (lazily if busy),
/// loop devices detached.
#[derive(Default)]
struct Cleanup {
    children: Vec<Child>,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse: Vec<PathBuf>,
}

impl Cleanup {
    /// Attach `file` to a free loop device (read-only with `ro`).
    fn losetup(&mut self, file: &Path, ro: bool) -> String {
        let mut args = vec!["-f", "--show"];
        if ro {
            args.push("-r");
        }
        args.push(p(file));
        let dev = String::from_utf8(sys("losetup", &args).stdout)
            .unwrap()
            .trim()
            .to_string();
        self.loops.push(dev.clone());
        dev
    }

    fn detach(&mut self, dev: &str) {
        sys("losetup", &["-d", dev]);
        self.loops.retain(|d| d != dev);
    }

    fn mount(&mut self, dev: &str, dir: &Path, opts: &str) {
        std::fs::create_dir_all(dir).unwrap();
        sys("mount", &["-o", opts, dev, p(dir)]);
        self.mounts.push(dir.to_path_buf());
    }

    /// Unmount `dir`. A child process that another test thread forks holds copies of every
    /// descriptor of this process until it execs, so a file system whose files this test has
    /// all closed can still be busy for a moment: busy is retried for up to 10 s.
    fn umount(&mut self, dir: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let o = Command::new("umount").arg(dir).output().unwrap();
            if o.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("busy") && std::time::Instant::now() < deadline,
                "umount {} failed: {err}",
                dir.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.mounts.retain(|d| d != dir);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").args(["-l", p(m)]).output();
        }
        for l in self.loops.iter().rev() {
            let _ = Command::new("losetup").args(["-d", l]).output();
        }
        for f in self.fuse.iter().rev() {
            let _ = Command::new("umount").args(["-l", p(f)]).output();
        }
    }
}

/// Start `timezero mount TABLE MNT` and wait until it says it is ready; returns its index in
/// `c.children` and the files it listed.
fn start_mount(c: &mut Cleanup, table: &Path, mnt: &Path, extra: &[&str]) -> (usize, String) {
    let mut child = tz()
        .args(["mount", p(table), p(mnt)])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    c.children.push(child);
    c.fuse.push(mnt.to_path_buf());
    let mut files = None;
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(f) = line.strip_prefix("files: ") {
            files = Some(f.to_string());
        }
        if line.starts_with("control socket") {
            return (c.children.len() - 1, files.unwrap());
        }
    }
    panic!("timezero mount ended before it was ready");
}

/// Wait (bounded) for child `k` to end; its exit status.
fn wait_child(c: &mut Cleanup, k: usize) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = c.children[k].try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the mount process did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `timezero umount MNT`, retried (bounded) while a detached loop device still lets go of it.
fn umount_fuse(c: &mut Cleanup, mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = tz().args(["umount", p(mnt)]).output().unwrap();
        if o.status.success() {
            c.fuse.retain(|f| f != mnt);
            return;
        }
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            err.contains("is busy") && Instant::now() < deadline,
            "timezero umount: {err}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn names(mnt: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Every regular file under `dir` (relative path -> bytes), `lost+found` aside.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if rel == "lost+found" {
                continue;
            }
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(base, &path, out);
            } else if t.is_file() {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Write `files` (relative path -> bytes) under `dir`, each synced.
fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (rel, data) in files {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
}

/// A file system kind under test: how to make it and how to mount a possibly unclean image of
/// it without writing to it.
struct Kind {
    name: &'static str,
    mkfs: &'static [&'static str],
    ro_opts: &'static str,
    size: u64,
}

const EXT4: Kind = Kind {
    name: "ext4",
    mkfs: &["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
    ro_opts: "ro,noload",
    size: 64 << 20,
};

const XFS: Kind = Kind {
    name: "xfs",
    mkfs: &["mkfs.xfs", "-q", "-f", "-K"],
    ro_opts: "ro,norecovery,nouuid",
    size: 320 << 20,
};

/// Attach the image file `img` read-only, mount it without replaying its journal, and return
/// its files.
fn image_tree(c: &mut Cleanup, img: &Path, at: &Path, kind: &Kind) -> BTreeMap<String, Vec<u8>> {
    let dev = c.losetup(img, true);
    c.mount(&dev, at, kind.ro_opts);
    let t = tree(at);
    c.umount(at);
    c.detach(&dev);
    t
}

fn files(seed: u64, prefix: &str, n: u64) -> BTreeMap<String, Vec<u8>> {
    (0..n)
        .map(|k| {
            let len = 1000 + ((seed * 7919 + k * 104_729) % 300_000) as usize;
            (
                format!("{prefix}/f{k}"),
                common::pattern(seed * 1000 + k, len),
            )
        })
        .collect()
}

fn scenario(kind: &Kind) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, t1, t2, table) = (
        d.join("src.img"),
        d.join("t1.img"),
        d.join("t2.img"),
        d.join("t.tzt"),
    );
    for f in [&src, &t1, &t2] {
        std::fs::File::create(f)
            .unwrap()
            .set_len(kind.size)
            .unwrap();
    }
    let (mnt, fsdir, imgdir) = (d.join("mnt"), d.join("fs"), d.join("img"));
    std::fs::create_dir_all(&mnt).unwrap();
    let mut c = Cleanup::default();

    // The file system, made and filled on the source volume as it is.
    let mut mkfs = kind.mkfs.to_vec();
    mkfs.push(p(&src));
    sys(mkfs[0], &mkfs[1..]);
    let a = files(1, "a", 12);
    let dev = c.losetup(&src, false);
    c.mount(&dev, &fsdir, "rw");
    write_files(&fsdir, &a);
    c.umount(&fsdir);
    c.detach(&dev);

    ok(&["init", p(&table)]);
    let (k, listed) = start_mount(&mut c, &table, &mnt, &[]);
    assert_eq!(listed, "");
    assert!(names(&mnt).is_empty());
    // A session established while mounted (through the control socket) appears at once.
    ok(&["establish", p(&table), p(&src), p(&t1), "--force"]);
    assert_eq!(names(&mnt), ["s1", "src.img"]);
    assert_eq!(
        std::fs::metadata(mnt.join("src.img")).unwrap().len(),
        kind.size
    );

    // Changes through a loop device on the source file: every write goes through
    // copy-before-write into s1's target.
    let dev = c.losetup(&mnt.join("src.img"), false);
    c.mount(&dev, &fsdir, "rw");
    assert_eq!(
        tree(&fsdir),
        a,
        "the source file shows the file system as made"
    );
    let mut ab = a.clone();
    let b = files(2, "a", 6);
    write_files(&fsdir, &b);
    ab.extend(b);
    std::fs::remove_file(fsdir.join("a/f11")).unwrap();
    ab.remove("a/f11");
    let b2 = files(3, "b", 5);
    write_files(&fsdir, &b2);
    ab.extend(b2);
    c.umount(&fsdir);
    c.detach(&dev);

    ok(&["establish", p(&table), p(&src), p(&t2), "--force"]);
    assert_eq!(names(&mnt), ["s1", "s2", "src.img"]);

    // More changes, with the file system still mounted while the images are examined.
    let dev = c.losetup(&mnt.join("src.img"), false);
    c.mount(&dev, &fsdir, "rw");
    write_files(&fsdir, &files(4, "a", 8));
    write_files(&fsdir, &files(5, "c", 4));
    assert_eq!(
        image_tree(&mut c, &mnt.join("s1"), &imgdir, kind),
        a,
        "s1 at T0"
    );
    assert_eq!(
        image_tree(&mut c, &mnt.join("s2"), &imgdir, kind),
        ab,
        "s2 at T0"
    );

    // SIGKILL of the mounting process while files are written (and synced) on the source.
    let stop = AtomicBool::new(false);
    let synced = AtomicU64::new(0);
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                let path = fsdir.join(format!("d/w{}", n % 40));
                let data = common::pattern(10_000 + n, 64 << 10);
                let r = std::fs::create_dir_all(fsdir.join("d"))
                    .and_then(|()| std::fs::File::create(&path))
                    .and_then(|mut f| f.write_all(&data).and_then(|()| f.sync_all()));
                if r.is_ok() {
                    synced.fetch_add(1, Ordering::AcqRel);
                }
                n += 1;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while synced.load(Ordering::Acquire) < 5 {
            assert!(Instant::now() < deadline, "the writer made no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        c.children[k].kill().unwrap();
        c.children[k].wait().unwrap();
        stop.store(true, Ordering::Release);
        w.join().unwrap();
    });
    // What the dead mount leaves behind: the file system on the loop device, the loop device,
    // the FUSE mount whose connection is gone.
    sys("umount", &["-l", p(&fsdir)]);
    c.mounts.retain(|m| m != &fsdir);
    let _ = Command::new("losetup").args(["-d", &dev]).output();
    c.loops.retain(|l| l != &dev);
    umount_fuse(&mut c, &mnt);

    // A new mount recovers the table; the images are still exactly the files at each T0.
    let (k2, listed) = start_mount(&mut c, &table, &mnt, &[]);
    assert_eq!(listed, "src.img, s1, s2");
    assert_eq!(
        image_tree(&mut c, &mnt.join("s1"), &imgdir, kind),
        a,
        "s1 after SIGKILL"
    );
    assert_eq!(
        image_tree(&mut c, &mnt.join("s2"), &imgdir, kind),
        ab,
        "s2 after SIGKILL"
    );
    umount_fuse(&mut c, &mnt);
    assert!(wait_child(&mut c, k2).success());
    println!(
        "{}: images exact at T0 before and after SIGKILL of the mount",
        kind.name
    );
}

#[test]
fn mount_ext4_through_loop_devices_images_exact_after_sigkill() {
    if !fuse_or_skip("mount_ext4_through_loop_devices_images_exact_after_sigkill") {
        return;
    }
    if !have("losetup", "--version") || !have("mkfs.ext4", "-V") {
        println!("SKIPPED mount_ext4: losetup or mkfs.ext4 is not installed");
        return;
    }
    scenario(&EXT4);
}

#[test]
fn mount_xfs_through_loop_devices_images_exact_after_sigkill() {
    if !fuse_or_skip("mount_xfs_through_loop_devices_images_exact_after_sigkill") {
        return;
    }
    if !have("losetup", "--version") || !have("mkfs.xfs", "-V") {
        println!("SKIPPED mount_xfs: losetup or mkfs.xfs is not installed");
        return;
    }
    scenario(&XFS);
}

fn fails(args: &[&str]) -> (i32, String) {
    let o = tz().args(args).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");
    (o.status.code().unwrap(), err)
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap()
}

#[test]
fn mount_files_bad_input_and_sigterm() {
    if !fuse_or_skip("mount_files_bad_input_and_sigterm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, tgt, table) = (d.join("src.img"), d.join("tgt.img"), d.join("t.tzt"));
    let size = 4u64 << 20;
    std::fs::write(&src, common::pattern(1, size as usize)).unwrap();
    std::fs::write(&tgt, vec![0u8; size as usize]).unwrap();
    ok(&["init", p(&table)]);
    ok(&["establish", p(&table), p(&src), p(&tgt), "--force"]);
    let (mnt, other, full) = (d.join("mnt"), d.join("other"), d.join("full"));
    for m in [&mnt, &other, &full] {
        std::fs::create_dir_all(m).unwrap();
    }
    std::fs::write(full.join("x"), b"x").unwrap();

    let (code, err) = fails(&["mount", p(&table), p(&full)]);
    assert_eq!(code, 1);
    assert!(err.contains("is not empty"), "{err}");
    let (code, err) = fails(&["umount", p(&other)]);
    assert_eq!(code, 1);
    assert!(err.contains("nothing is mounted"), "{err}");
    let (code, _) = fails(&["mount", p(&table)]);
    assert_eq!(code, 2);

    let mut c = Cleanup::default();
    let (k, listed) = start_mount(&mut c, &table, &mnt, &[]);
    assert_eq!(listed, "src.img, s1");
    // The mount point is in use; the table is held by the mounting process.
    let (code, err) = fails(&["mount", p(&table), p(&mnt)]);
    assert_eq!(code, 1);
    assert!(err.contains("is in use"), "{err}");
    let (code, err) = fails(&["mount", p(&table), p(&other)]);
    assert_eq!(code, 1);
    assert!(err.contains("held") || err.contains("lock"), "{err}");

    // The files: sizes, no truncation, no growth, a read-only image, fsync a durability point.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("src.img"))
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    f.write_all_at(b"through fuse", 4096).unwrap();
    f.sync_data().unwrap();
    let mut b = [0u8; 12];
    f.read_exact_at(&mut b, 4096).unwrap();
    assert_eq!(&b, b"through fuse");
    assert_eq!(errno(&f.write_at(b"x", size).unwrap_err()), 27, "EFBIG");
    assert_eq!(errno(&f.set_len(size / 2).unwrap_err()), 1, "EPERM");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(mnt.join("src.img"))
        .unwrap_err();
    assert_eq!(errno(&e), 1, "EPERM on O_TRUNC");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("s1"))
        .unwrap_err();
    assert_eq!(errno(&e), 30, "EROFS");
    drop(f);
    let img = std::fs::read(mnt.join("s1")).unwrap();
    assert_eq!(
        img,
        common::pattern(1, size as usize),
        "the image is the source at T0"
    );
    let now = std::fs::read(&src).unwrap();
    assert_eq!(&now[4096..4108], b"through fuse");

    // A target that disappears: once the engine is told (`reset`), its session is suspended;
    // the image file already open fails with EIO and its name is gone (as the NBD export is),
    // a source write that needs the copy fails with EIO, the rest goes on. Back: resumed.
    let open_img = std::fs::File::open(mnt.join("s1")).unwrap();
    let away = d.join("tgt.away");
    std::fs::rename(&tgt, &away).unwrap();
    ok(&["reset", p(&table), p(&tgt)]);
    let mut b = [0u8; 4096];
    assert_eq!(errno(&open_img.read_at(&mut b, 0).unwrap_err()), 5, "EIO");
    assert!(!mnt.join("s1").exists());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("src.img"))
        .unwrap();
    assert_eq!(errno(&f.write_at(b"x", 1 << 20).unwrap_err()), 5, "EIO");
    f.read_exact_at(&mut b, 1 << 20).unwrap();
    assert_eq!(
        &b[..],
        &common::pattern(1, size as usize)[1 << 20..(1 << 20) + 4096]
    );
    std::fs::rename(&away, &tgt).unwrap();
    ok(&["resume", p(&table), "s1"]);
    drop(f);
    drop(open_img);
    let img = std::fs::read(mnt.join("s1")).unwrap();
    assert_eq!(
        img,
        common::pattern(1, size as usize),
        "the image after the resume"
    );

    // Withdrawn: the image file is gone.
    ok(&["withdraw", p(&table), "s1"]);
    assert!(
        !names(&mnt).contains(&"s1".to_string()),
        "{:?}",
        names(&mnt)
    );
    assert!(!mnt.join("s1").exists());

    // SIGTERM unmounts and ends the process cleanly. With a loop device still on a file, the
    // mount is detached from its directory and served until the loop device lets go.
    let canon = std::fs::canonicalize(&mnt).unwrap();
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&format!(" {} ", p(&canon)))
    };
    let dev = have("losetup", "--version").then(|| c.losetup(&mnt.join("src.img"), false));
    let pid = c.children[k].id();
    sys("kill", &["-TERM", &pid.to_string()]);
    if let Some(dev) = dev {
        let deadline = Instant::now() + Duration::from_secs(60);
        while mounted() {
            assert!(Instant::now() < deadline, "the busy mount was not detached");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            c.children[k].try_wait().unwrap().is_none(),
            "ended while in use"
        );
        // Still served: the loop device reads the source through the detached mount.
        let mut b = vec![0u8; 4096];
        std::fs::File::open(&dev)
            .unwrap()
            .read_exact_at(&mut b, 4096)
            .unwrap();
        assert_eq!(&b[..12], b"through fuse");
        c.detach(&dev);
    }
    assert!(wait_child(&mut c, k).success());
    c.fuse.clear();
    assert!(!mounted(), "still mounted");
}
