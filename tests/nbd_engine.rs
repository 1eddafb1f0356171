//! NBD serving of engine exports, driven by real clients.
//!
//! Goal: qemu-io and qemu-img reach the engine through `timezero serve`: writes to a source
//! export copy old grains first, image exports stay T0-exact (qemu-img compare against a copy
//! taken before the writes), qemu-img convert reads an image, other CLI commands reach the
//! serving process through its control socket, and a server killed with SIGKILL during client
//! writes restarts with T0-exact images and accepts clients again. `serve` holds a first write
//! until the client's flush (write-back, its default) and `--write-through` does not.
//! Method: spawn the binary; skip (with a message) when qemu-io or qemu-img is not installed.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tz() -> Command {
    Command::new(env!("CARGO_BIN_EXE_timezero"))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// qemu-io and qemu-img are installed; prints a skip message otherwise.
fn have_qemu() -> bool {
    let yes = have("qemu-io") && have("qemu-img");
    if !yes {
        println!("skipping: qemu-io/qemu-img not installed");
    }
    yes
}

fn url(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

fn serve(table: &Path) -> (Child, PathBuf) {
    serve_with(table, &[])
}

/// `timezero [FLAGS] serve TABLE`, once its socket is there.
fn serve_with(table: &Path, flags: &[&str]) -> (Child, PathBuf) {
    let mut sock = table.as_os_str().to_owned();
    sock.push(".nbd");
    let sock = PathBuf::from(sock);
    let _ = std::fs::remove_file(&sock);
    let child = tz()
        .args(flags)
        .arg("serve")
        .arg(table)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    (child, sock)
}

#[test]
fn qemu_clients_through_serve() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 8usize << 20;
    let t0 = common::pattern(77, size);
    std::fs::write(d.join("src.img"), &t0).unwrap();
    std::fs::write(d.join("ref.img"), &t0).unwrap();
    std::fs::write(d.join("tgt.img"), vec![0u8; size]).unwrap();
    std::fs::write(d.join("tgt2.img"), vec![0u8; size]).unwrap();
    let table = d.join("t.tzt");
    ok(tz().arg("init").arg(&table));
    ok(tz()
        .arg("establish")
        .arg(&table)
        .arg(d.join("src.img"))
        .arg(d.join("tgt.img"))
        .arg("--nocopy"));
    let (mut server, sock) = serve(&table);

    // Pattern writes through copy-before-write, verified reads.
    ok(Command::new("qemu-io")
        .args(["-f", "raw", &url(&sock, "src.img")])
        .args([
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 3M 12k",
            "-c",
            "write -z 5M 64k",
            "-c",
            "discard 6M 64k",
            "-c",
            "flush",
        ])
        .args([
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 3M 12k",
            "-c",
            "read -P 0 5M 64k",
        ]));
    // The image still reads as T0.
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &url(&sock, "s1")])
        .arg(d.join("ref.img")));
    assert!(out.contains("identical"), "{out}");
    // A new T0 copy of the live export, taken through the control socket.
    let s2 = ok(tz()
        .arg("establish")
        .arg(&table)
        .arg(d.join("src.img"))
        .arg(d.join("tgt2.img"))
        .arg("--nocopy"));
    assert!(s2.starts_with("s2: "), "{s2}");
    let mut after = t0.clone();
    after[..1 << 20].fill(0xab);
    after[3 << 20..(3 << 20) + 12288].fill(0xcd);
    after[5 << 20..(5 << 20) + 65536].fill(0);
    after[6 << 20..(6 << 20) + 65536].fill(0);
    std::fs::write(d.join("ref2.img"), &after).unwrap();
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &url(&sock, "src.img"),
        "-c",
        "write -P 0x11 0 8M",
        "-c",
        "flush",
    ]));
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url(&sock, "s2")])
        .arg(d.join("out2.img")));
    assert!(
        std::fs::read(d.join("out2.img")).unwrap() == after,
        "converted s2 differs from its T0"
    );
    let st = ok(tz().arg("status").arg(&table));
    assert!(st.contains("s1 active") && st.contains("s2 active"), "{st}");
    // Image exports are read-only unless asked.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", &url(&sock, "s1"), "-c", "write 0 4k"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only") || !o.status.success(),
        "{text}"
    );

    // Kill the server during client writes; restart; images are T0-exact; clients reconnect.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", &url(&sock, "src.img")])
        .args((0..64).flat_map(|i| {
            [
                "-c".to_string(),
                format!("write -P 0x{:02x} {}k 60k", 0x20 + i, i * 100),
            ]
        }))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = writer.wait();
    let (mut server, sock) = serve(&table);
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &url(&sock, "s1")])
        .arg(d.join("ref.img")));
    assert!(out.contains("identical"), "after restart s1: {out}");
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &url(&sock, "s2")])
        .arg(d.join("ref2.img")));
    assert!(out.contains("identical"), "after restart s2: {out}");
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &url(&sock, "src.img"),
        "-c",
        "write -P 0x77 1M 64k",
        "-c",
        "read -P 0x77 1M 64k",
    ]));
    ok(tz().arg("stop").arg(&table));
    let t = Instant::now();
    while server.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Served and stopped: the table is free again.
    let st = ok(tz().arg("status").arg(&table));
    assert!(st.contains("s2 active"), "{st}");
}

/// One `qemu-io` process driven a command at a time through its standard input, so that the
/// connection stays open (and sends no flush) between commands. qemu-io prints its prompt,
/// without a newline, once a command has completed; each command is sent only after the
/// previous prompt (lines sent together are not all read).
struct Shell {
    child: Child,
    out: std::process::ChildStdout,
}

impl Shell {
    const PROMPT: &'static str = "qemu-io> ";

    fn open(url: &str) -> Shell {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", "-t", "writeback", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut sh = Shell { child, out };
        sh.prompt("open");
        sh
    }

    /// Read the output up to the next prompt.
    fn prompt(&mut self, what: &str) -> String {
        use std::io::Read as _;
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while !text.ends_with(Self::PROMPT.as_bytes()) {
            let n = self.out.read(&mut buf).unwrap();
            assert!(n > 0, "qemu-io ended during {what}: {text:?}");
            text.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        assert!(!text.contains("failed"), "{what}: {text}");
        text
    }

    /// Run one command; its output must contain `expect`.
    fn run(&mut self, line: &str, expect: &str) {
        use std::io::Write as _;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        let text = self.prompt(line);
        assert!(text.contains(expect), "{line:?}: {text}");
    }

    fn close(mut self) {
        drop(self.child.stdin.take());
        assert!(self.child.wait().unwrap().success());
    }
}

fn stop(table: &Path, mut server: Child) {
    ok(tz().arg("stop").arg(table));
    let t = Instant::now();
    while server.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(10), "server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_range(path: &Path, at: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[at..at + len].to_vec()
}

#[test]
fn serve_holds_first_writes_until_the_flush_unless_write_through() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 4usize << 20;
    let t0 = common::pattern(78, size);
    let src = d.join("src.img");
    std::fs::write(&src, &t0).unwrap();
    std::fs::write(d.join("ref.img"), &t0).unwrap();
    std::fs::write(d.join("tgt.img"), vec![0u8; size]).unwrap();
    let table = d.join("t.tzt");
    ok(tz().arg("init").arg(&table));
    ok(tz()
        .arg("establish")
        .arg(&table)
        .arg(&src)
        .arg(d.join("tgt.img"))
        .arg("--nocopy"));
    let image_is_t0 = |sock: &Path| {
        let out = ok(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &url(sock, "s1")])
            .arg(d.join("ref.img")));
        assert!(out.contains("identical"), "{out}");
    };

    // The default: a first write is acknowledged, read back through the export, and held
    // from the source file until the client flushes.
    let (server, sock) = serve(&table);
    let mut sh = Shell::open(&url(&sock, "src.img"));
    sh.run("write -P 0x5a 64k 4k", "wrote 4096/4096");
    assert!(
        file_range(&src, 65536, 4096) == t0[65536..69632],
        "the held write is on the file before the flush"
    );
    sh.run("read -P 0x5a 64k 4k", "read 4096/4096");
    image_is_t0(&sock);
    sh.run("flush", "");
    sh.run("read -P 0x5a 64k 4k", "read 4096/4096");
    assert!(
        file_range(&src, 65536, 4096) == [0x5a; 4096],
        "the flushed write is not on the file"
    );
    image_is_t0(&sock);
    sh.close();
    stop(&table, server);

    // --write-through: the first write is on the file when it is acknowledged.
    let (server, sock) = serve_with(&table, &["--write-through"]);
    let mut sh = Shell::open(&url(&sock, "src.img"));
    sh.run("write -P 0x6b 128k 4k", "wrote 4096/4096");
    assert!(
        file_range(&src, 131072, 4096) == [0x6b; 4096],
        "the write-through write is not on the file when acknowledged"
    );
    image_is_t0(&sock);
    sh.close();
    stop(&table, server);

    // The two modes together are refused with a message, before anything is opened.
    let o = tz()
        .args(["--write-back", "--write-through", "serve"])
        .arg(&table)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot be used with"), "{err}");
}
