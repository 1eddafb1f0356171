//! Real NBD clients (`qemu-io`, `qemu-img`) against the NBD server over a unix socket, with the
//! in-memory volumes checked afterwards. Each test prints a message and passes when the tool it
//! needs is not on `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use timezero::nbd::{NbdConfig, NbdServer, ServerHandle, StaticRegistry, VolumeExport};
use timezero::{MemVolume, Volume};

const DISK_BYTES: usize = 4 << 20;
const RO_BYTES: usize = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
const KIB: usize = 1024;

fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("skipping: {tool} not found on PATH");
    }
    found
}

struct Env {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    sock: PathBuf,
    handle: Option<ServerHandle>,
    disk: Arc<MemVolume>,
    ro: Arc<MemVolume>,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let sock = dir.join("nbd.sock");
        let disk = Arc::new(MemVolume::new("disk", DISK_BYTES));
        let ro = Arc::new(MemVolume::with_data("ro", &vec![0x5c; RO_BYTES]));
        let disk_vol: Arc<dyn Volume> = disk.clone();
        let ro_vol: Arc<dyn Volume> = ro.clone();
        let reg = StaticRegistry::new()
            .with("disk", Arc::new(VolumeExport::new(disk_vol)))
            .with(
                "ro",
                Arc::new(VolumeExport::new(ro_vol).with_read_only(true)),
            );
        let server = NbdServer::new(Arc::new(reg), NbdConfig::default());
        let handle = server.serve_unix(&sock).expect("serve_unix");
        Env {
            _dir: tmp,
            dir,
            sock,
            handle: Some(handle),
            disk,
            ro,
        }
    }

    fn url(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

/// Run a tool with a deadline, logging into `dir`; returns success and the combined output.
fn run(dir: &Path, tool: &str, args: &[&str]) -> (bool, String) {
    let out_path = dir.join("tool.log");
    let log = std::fs::File::create(&out_path).expect("log file");
    let err = log.try_clone().expect("clone log");
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .expect("spawn tool");
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{tool} {args:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    (status.success(), out)
}

fn qemu_io_ok(dir: &Path, url: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", url];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    let (ok, out) = run(dir, "qemu-io", &args);
    assert!(ok, "qemu-io {cmds:?} failed:\n{out}");
    assert!(
        !out.contains("verification failed"),
        "qemu-io {cmds:?}:\n{out}"
    );
    assert!(
        !out.to_lowercase().contains("error"),
        "qemu-io {cmds:?}:\n{out}"
    );
    out
}

fn all(buf: &[u8], byte: u8) -> bool {
    buf.iter().all(|&b| b == byte)
}

#[test]
fn nbd_qemu_io_write_read_zero_discard_flush() {
    if !have("qemu-io") {
        return;
    }
    let env = Env::new();
    env.disk
        .write_at(128 * KIB as u64, &vec![0xee; 64 * KIB])
        .expect("seed");
    let out = qemu_io_ok(
        &env.dir,
        &env.url("disk"),
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0xcd 64k 4k",
            "write -z 4k 8k",
            "discard 128k 64k",
            "flush",
            "read -P 0 4k 8k",
            "read -P 0xcd 64k 4k",
            "read -P 0 128k 64k",
        ],
    );
    println!("{out}");
    let s = env.disk.snapshot();
    assert!(all(&s[..4 * KIB], 0xab));
    assert!(all(&s[4 * KIB..12 * KIB], 0));
    assert!(all(&s[12 * KIB..64 * KIB], 0xab));
    assert!(all(&s[64 * KIB..68 * KIB], 0xcd));
    assert!(all(&s[68 * KIB..], 0));
}

#[test]
fn nbd_qemu_io_parallel_requests() {
    if !have("qemu-io") {
        return;
    }
    let env = Env::new();
    let mut cmds: Vec<String> = (0..16)
        .map(|i| format!("aio_write -P {} {}k 64k", 0x10 + i, i * 64))
        .collect();
    cmds.push("aio_flush".into());
    cmds.extend((0..16).map(|i| format!("aio_read -P {} {}k 64k", 0x10 + i, i * 64)));
    cmds.push("aio_flush".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(&env.dir, &env.url("disk"), &refs);
    let s = env.disk.snapshot();
    for i in 0..16usize {
        assert!(
            all(&s[i * 64 * KIB..(i + 1) * 64 * KIB], 0x10 + i as u8),
            "block {i}"
        );
    }
    assert!(all(&s[16 * 64 * KIB..], 0));
}

#[test]
fn nbd_qemu_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let env = Env::new();
    let url = env.url("ro");
    let (ok, out) = run(
        &env.dir,
        "qemu-io",
        &["-f", "raw", "-r", &url, "-c", "read -P 0x5c 0 1M"],
    );
    assert!(
        ok && !out.contains("verification failed"),
        "read-only read failed:\n{out}"
    );
    // Writing must fail, whether qemu refuses to open read-write or the server refuses.
    let (ok, out) = run(
        &env.dir,
        "qemu-io",
        &["-f", "raw", &url, "-c", "write -P 0x11 0 4k"],
    );
    println!("read-write open of the read-only export: ok={ok}\n{out}");
    assert!(!ok, "writing to the read-only export succeeded:\n{out}");
    let (ok, out) = run(
        &env.dir,
        "qemu-io",
        &[
            "-f",
            "raw",
            "--force-share",
            "-r",
            &url,
            "-c",
            "write -P 0x11 0 4k",
        ],
    );
    println!("write through a read-only open: ok={ok}\n{out}");
    assert!(!ok, "writing to the read-only export succeeded:\n{out}");
    assert!(all(&env.ro.snapshot(), 0x5c));
}

#[test]
fn nbd_qemu_img_info_and_convert() {
    if !have("qemu-img") {
        return;
    }
    let env = Env::new();
    let data: Vec<u8> = (0..DISK_BYTES)
        .map(|i| (i / 4096) as u8 ^ (i as u8))
        .collect();
    env.disk.write_at(0, &data).expect("seed");
    let url = env.url("disk");

    let (ok, out) = run(&env.dir, "qemu-img", &["info", "-f", "raw", &url]);
    assert!(ok, "qemu-img info failed:\n{out}");
    assert!(
        out.contains(&format!("({DISK_BYTES} bytes)")),
        "unexpected info:\n{out}"
    );
    println!("{out}");

    // Export -> file.
    let out_file = env.dir.join("out.raw");
    let out_s = path_str(&out_file);
    let (ok, out) = run(
        &env.dir,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &url, &out_s],
    );
    assert!(ok, "qemu-img convert from nbd failed:\n{out}");
    assert_eq!(std::fs::read(&out_file).expect("read out.raw"), data);

    // File -> export (large writes, and zeroing of the zero runs).
    let mut input: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
    input[1 << 20..2 << 20].fill(0);
    let in_file = env.dir.join("in.raw");
    std::fs::write(&in_file, &input).expect("write in.raw");
    let in_s = path_str(&in_file);
    let (ok, out) = run(
        &env.dir,
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", &in_s, &url],
    );
    assert!(ok, "qemu-img convert to nbd failed:\n{out}");
    assert!(
        env.disk.snapshot() == input,
        "export contents differ after convert"
    );

    let (ok, out) = run(
        &env.dir,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &in_s, &url],
    );
    assert!(ok, "qemu-img compare failed:\n{out}");
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}
