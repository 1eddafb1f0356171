//! A loop-mounted ext4 file system for the tests that freeze a real one (root only). Included
//! by path (`#[path = "common/loopfs.rs"] mod loopfs;`) where it is used.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use timezero::quiesce::{FsFreeze, QuiesceBackend};

/// A loop-mounted ext4 file system: thawed, unmounted and detached on drop.
pub struct LoopFs {
    _dir: tempfile::TempDir,
    /// The loop device.
    pub device: String,
    /// The mount point.
    pub mnt: PathBuf,
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the test can freeze: root and the tools at hand; else prints why it is skipped.
pub fn root_with_tools(name: &str) -> bool {
    if !rustix::process::geteuid().is_root() {
        println!("SKIPPED {name}: not root");
        return false;
    }
    for tool in ["mkfs.ext4", "losetup", "mount", "umount"] {
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

/// A new 64 MiB ext4 file system mounted on a temporary directory, or `None` (with the reason
/// printed) when the test cannot have one.
pub fn loop_fs(name: &str) -> Option<LoopFs> {
    if !root_with_tools(name) {
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
    let ok = Command::new("mount")
        .arg(&device)
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    if !ok {
        let _ = Command::new("losetup").args(["-d", &device]).status();
        panic!("mount {device}");
    }
    let fs = LoopFs {
        _dir: dir,
        device,
        mnt,
    };
    // Never freeze the file system the temporary directory lives on.
    assert!(
        is_mount_point(&fs.mnt),
        "{} is not a mount point",
        fs.mnt.display()
    );
    Some(fs)
}

impl LoopFs {
    /// Whether the file system is frozen now: a second freeze is refused with `EBUSY` (and a
    /// freeze that succeeded is undone at once).
    pub fn frozen(&self) -> bool {
        match FsFreeze.freeze(&self.mnt) {
            Ok(()) => {
                FsFreeze.thaw(&self.mnt).unwrap();
                false
            }
            Err(timezero::quiesce::BackendError::Busy { .. }) => true,
            Err(e) => panic!("freeze probe: {e}"),
        }
    }

    /// Whether a child process writing a file into the file system finishes within `limit`
    /// (it blocks while the file system is frozen; it is killed when it does not finish).
    pub fn write_succeeds_within(&self, name: &str, limit: Duration) -> bool {
        let path = self.mnt.join(name);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo written > '{}' && sync -f '{}'",
                path.display(),
                path.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                // A process blocked on a frozen file system ends once it is thawed (on drop).
                std::thread::spawn(move || child.wait());
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
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

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = FsFreeze.thaw(&self.mnt);
        let _ = umount_retrying(&self.mnt);
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}
