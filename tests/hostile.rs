//! Hostile use of the real `timezero` binary: a serving process and the clients around it, over
//! real sockets, with bounded counts and deadlines (never fixed sleeps as the only wait).
//!
//! Also: the binary against hostile or mistaken input.
//!
//! Goal: a wrong argument never harms data and always gets one clear line on stderr naming the
//! path or value involved, exit 1 (runtime) or 2 (usage). Method: drive the `timezero` binary
//! on temporary files and compare every file that must not change byte for byte.

#![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timezero::nbd::proto::{
    self, encode_option, parse_greeting, InfoRequest, OptionReplyHeader, SimpleReply,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, GREETING_BYTES, INFO_BLOCK_SIZE,
    OPTION_REPLY_HEADER_BYTES, SIMPLE_REPLY_HEADER_BYTES,
};

/// Generous bound for anything that should happen "soon" on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn tz() -> Command {
    Command::new(env!("CARGO_BIN_EXE_timezero"))
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    tz().current_dir(dir)
        .args(args)
        .output()
        .expect("run timezero")
}

fn ok_in(dir: &Path, args: &[&str]) -> String {
    let o = run_in(dir, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(path, &data).expect("write file");
    data
}

/// Poll `f` until it returns `Some`, or panic with `what` after [`DEADLINE`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `timezero serve` process, stopped (or killed) when dropped.
struct Server {
    child: Child,
    table: PathBuf,
}

impl Server {
    fn start(cwd: &Path, table: &Path, extra: &[&str]) -> Server {
        let child = tz()
            .current_dir(cwd)
            .arg("serve")
            .arg(table)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve");
        let table = if table.is_absolute() {
            table.to_path_buf()
        } else {
            cwd.join(table)
        };
        let ctl = timezero::control::socket_path(&table);
        wait_for("the control socket", || UnixStream::connect(&ctl).ok());
        Server { child, table }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn nbd(&self) -> PathBuf {
        let mut s = self.table.as_os_str().to_owned();
        s.push(".nbd");
        PathBuf::from(s)
    }

    fn threads(&self) -> usize {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        st.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Threads line")
    }

    /// Wait for the process to exit (after `timezero stop`).
    fn wait_exit(&mut self) {
        let child = &mut self.child;
        wait_for("the server to exit", || child.try_wait().ok().flatten());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lines a child writes to a pipe, collected by a thread.
fn collect_lines(r: impl Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            l2.lock().expect("lines").push(line);
        }
    });
    lines
}

/// Wait for a line satisfying `pred` at index `from` or later; returns its index.
fn wait_line(lines: &Mutex<Vec<String>>, from: usize, pred: impl Fn(&str) -> bool) -> usize {
    wait_for("a matching line", || {
        let l = lines.lock().expect("lines");
        (from..l.len()).find(|&i| pred(&l[i]))
    })
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

fn wait_child(c: &mut Child) -> std::process::ExitStatus {
    wait_for("the client to exit", || c.try_wait().ok().flatten())
}

/// A table in `dir` with one session s1 (`src.img` -> `tgt.img`, `len` bytes); returns the
/// source bytes.
fn table_with_session(dir: &Path, len: usize) -> Vec<u8> {
    let src = random_file(&dir.join("src.img"), len, 7);
    std::fs::write(dir.join("tgt.img"), vec![0u8; len]).expect("target");
    ok_in(dir, &["init", "t.tzt"]);
    assert_eq!(
        ok_in(dir, &["establish", "t.tzt", "src.img", "tgt.img"])
            .split(':')
            .next(),
        Some("s1")
    );
    src
}

// ---------------------------------------------------------------------------------------------
// Forwarded commands and paths.

/// A client in one directory and a server in another: relative paths name the client's files,
/// `write --from` sends the client's bytes, `read --to` and `export` write the client's files;
/// the server itself refuses a relative path.
#[test]
fn hostile_forwarded_paths_are_the_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).expect("a");
    std::fs::create_dir_all(&b).expect("b");
    let src_a = random_file(&a.join("src.img"), 1 << 20, 1);
    std::fs::write(a.join("tgt.img"), vec![0u8; 1 << 20]).expect("tgt");
    let data = random_file(&a.join("data.bin"), 4096, 2);
    // Decoys with the same names in the server's directory.
    let src_b = random_file(&b.join("src.img"), 1 << 20, 3);
    std::fs::write(b.join("tgt.img"), vec![0u8; 1 << 20]).expect("tgt");
    random_file(&b.join("data.bin"), 4096, 4);
    ok_in(&a, &["init", "t.tzt"]);
    let server = Server::start(&b, Path::new("../a/t.tzt"), &[]);

    assert_eq!(
        ok_in(&a, &["establish", "t.tzt", "src.img", "tgt.img"])
            .split(':')
            .next(),
        Some("s1")
    );
    let status = ok_in(&a, &["status", "t.tzt"]);
    let canon_a = std::fs::canonicalize(&a).expect("canon");
    assert!(
        status.contains(&format!("{}/src.img", canon_a.display())),
        "{status}"
    );
    let out = ok_in(
        &a,
        &["write", "t.tzt", "src.img", "4096", "--from", "data.bin"],
    );
    assert!(out.starts_with("wrote 4096 bytes at 4096 of "), "{out}");
    let now_a = std::fs::read(a.join("src.img")).expect("src a");
    assert_eq!(&now_a[4096..8192], &data[..]);
    assert_eq!(std::fs::read(b.join("src.img")).expect("src b"), src_b);

    // The T0 image still holds the old bytes; the client writes the files it names.
    ok_in(
        &a,
        &["read", "t.tzt", "s1", "4096", "4096", "--to", "old.bin"],
    );
    assert_eq!(
        std::fs::read(a.join("old.bin")).expect("old"),
        &src_a[4096..8192]
    );
    assert!(!b.join("old.bin").exists());
    let o = run_in(&a, &["read", "t.tzt", "s1", "0", "16"]);
    assert!(o.status.success());
    assert_eq!(o.stdout, &src_a[..16]);
    let out = ok_in(&a, &["export", "t.tzt", "s1", "image.raw"]);
    assert!(
        out.contains("exported 1048576 bytes of s1 to image.raw"),
        "{out}"
    );
    assert_eq!(std::fs::read(a.join("image.raw")).expect("image"), src_a);
    assert!(!b.join("image.raw").exists());

    // A missing --from file is the client's error, naming it.
    let o = run_in(
        &a,
        &["write", "t.tzt", "src.img", "0", "--from", "nope.bin"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nope.bin"), "{err}");

    // The server refuses a relative path sent by hand.
    let ctl = timezero::control::socket_path(&a.join("t.tzt"));
    let mut c = UnixStream::connect(&ctl).expect("connect");
    c.write_all(b"{\"v\":2,\"req\":{\"Run\":{\"Reset\":{\"volume\":\"src.img\"}}}}\n")
        .expect("send");
    let mut reply = String::new();
    BufReader::new(&c).read_line(&mut reply).expect("reply");
    assert!(reply.contains("Failed"), "{reply}");
    assert!(reply.contains("relative path src.img"), "{reply}");
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// NBD connection limits.

/// A minimal NBD client.
struct Nbd {
    s: UnixStream,
}

impl Nbd {
    /// Connect and greet; `None` when the server hangs up first.
    fn greet(path: &Path) -> Option<Nbd> {
        let mut s = UnixStream::connect(path).ok()?;
        s.set_read_timeout(Some(DEADLINE)).ok()?;
        let mut g = [0u8; GREETING_BYTES];
        s.read_exact(&mut g).ok()?;
        parse_greeting(&g).ok()?;
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .ok()?;
        Some(Nbd { s })
    }

    /// `NBD_OPT_GO`: `Ok` when granted, else the error reply and its message.
    fn go(&mut self, name: &str) -> std::io::Result<Result<(), (u32, String)>> {
        let req = InfoRequest {
            name: name.into(),
            infos: vec![INFO_BLOCK_SIZE],
        };
        self.s
            .write_all(&encode_option(proto::OPT_GO, &req.encode()))?;
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_BYTES];
            self.s.read_exact(&mut h)?;
            let h = OptionReplyHeader::parse(&h).map_err(std::io::Error::other)?;
            let mut data = vec![0u8; h.length as usize];
            self.s.read_exact(&mut data)?;
            match h.reply {
                proto::REP_INFO => {}
                proto::REP_ACK => return Ok(Ok(())),
                e => return Ok(Err((e, String::from_utf8_lossy(&data).into_owned()))),
            }
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let r = proto::Request {
            flags: 0,
            command: proto::Command::Read,
            cookie: 7,
            offset,
            length: len,
        };
        self.s.write_all(&r.encode())?;
        let mut h = [0u8; SIMPLE_REPLY_HEADER_BYTES];
        self.s.read_exact(&mut h)?;
        let rep = SimpleReply::parse(&h).map_err(std::io::Error::other)?;
        assert_eq!((rep.error, rep.cookie), (0, 7));
        let mut v = vec![0u8; len as usize];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// A fresh client that gets `export` and reads its first 4 KiB, or `None` if refused.
fn served(sock: &Path, export: &str) -> Option<Vec<u8>> {
    let mut c = Nbd::greet(sock)?;
    c.go(export).ok()?.ok()?;
    c.read(0, 4096).ok()
}

/// 100 clients that connect and say nothing, and clients idle after the handshake, do not keep
/// a new client out: the handshake deadline and the idle timeout free their places.
#[test]
fn hostile_nbd_idle_clients_do_not_lock_out_new_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = table_with_session(d, 1 << 20);
    let server = Server::start(
        d,
        Path::new("t.tzt"),
        &[
            "--max-connections",
            "8",
            "--handshake-timeout",
            "1",
            "--idle-timeout",
            "2",
        ],
    );
    let sock = server.nbd();
    let idle: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    let got = wait_for("a new client to be served", || served(&sock, "src.img"));
    assert_eq!(got, &src[..4096]);
    drop(idle);

    // Clients that finished the handshake and then send nothing are closed after the idle
    // timeout, so a full server takes new clients again.
    let mut quiet: Vec<Nbd> = (0..8)
        .map(|_| {
            wait_for("a slot", || {
                let mut c = Nbd::greet(&sock)?;
                c.go("s1").ok()?.ok()?;
                Some(c)
            })
        })
        .collect();
    for c in &mut quiet {
        assert!(c.closed(), "an idle client stays connected");
    }
    let got = wait_for("a client after the idle ones", || served(&sock, "s1"));
    assert_eq!(got, &src[..4096]);
}

/// Over the per-export limit, `NBD_OPT_GO` is refused with `NBD_REP_ERR_POLICY` and the client
/// can pick another export; over the total limit every option is refused the same way; a
/// place that frees up is taken by the next client.
#[test]
fn hostile_nbd_clients_over_the_limits_are_refused_by_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = table_with_session(d, 1 << 20);
    let server = Server::start(
        d,
        Path::new("t.tzt"),
        &[
            "--max-connections",
            "3",
            "--max-connections-per-export",
            "2",
            "--idle-timeout",
            "0",
        ],
    );
    let sock = server.nbd();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Nbd::greet(&sock).expect("greet");
        assert_eq!(c.go("src.img").expect("go"), Ok(()));
        held.push(c);
    }
    let mut third = Nbd::greet(&sock).expect("greet");
    match third.go("src.img").expect("go") {
        Err((rep, why)) => {
            assert_eq!(rep, proto::REP_ERR_POLICY, "{why}");
            assert!(why.contains("src.img"), "{why}");
        }
        Ok(()) => panic!("a third client of src.img was let in"),
    }
    assert_eq!(third.go("s1").expect("go"), Ok(()));
    assert_eq!(third.read(0, 4096).expect("read"), &src[..4096]);

    // The server is full: a fourth client is told so, by policy, whatever it asks.
    let mut fourth = Nbd::greet(&sock).expect("a refused client still gets the greeting");
    match fourth.go("s1").expect("go") {
        Err((rep, why)) => {
            assert_eq!(rep, proto::REP_ERR_POLICY, "{why}");
            assert!(why.contains("3 connections"), "{why}");
        }
        Ok(()) => panic!("a client over the total limit was let in"),
    }
    drop(fourth);
    // A freed place goes to the next client.
    drop(held.pop());
    let got = wait_for("the freed place", || served(&sock, "src.img"));
    assert_eq!(got, &src[..4096]);
}

// ---------------------------------------------------------------------------------------------
// The control socket.

/// Hundreds of idle control connections do not make hundreds of threads, and a command still
/// gets through.
#[test]
fn hostile_control_idle_connections_stay_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    table_with_session(d, 1 << 20);
    let server = Server::start(d, Path::new("t.tzt"), &[]);
    let before = server.threads();
    let ctl = timezero::control::socket_path(&d.join("t.tzt"));
    let idle: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&ctl).expect("connect"))
        .collect();
    // The last one is over the limit: it is told so at once.
    let mut line = String::new();
    let last = idle.last().expect("last");
    last.set_read_timeout(Some(DEADLINE)).expect("timeout");
    BufReader::new(last)
        .read_line(&mut line)
        .expect("busy reply");
    assert!(line.contains("Busy"), "{line}");
    let threads = server.threads();
    assert!(
        threads <= before + timezero::control::CONTROL_CONNECTIONS_MAX,
        "{threads} threads (from {before})"
    );
    let out = ok_in(d, &["status", "t.tzt"]);
    assert!(out.contains("s1 active"), "{out}");
    drop(idle);
}

// ---------------------------------------------------------------------------------------------
// Copies through the server.

/// A throttled copy forwarded through the server reports progress to the client; Ctrl-C on the
/// client stops it in the server; a new copy can be paused, resumed and re-rated from other
/// clients and completes the session.
#[test]
fn hostile_forwarded_copy_progress_interrupt_pause_resume_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = table_with_session(d, 32 << 20);
    let server = Server::start(d, Path::new("t.tzt"), &[]);

    let mut copy = tz()
        .current_dir(d)
        .args(["copy", "t.tzt", "s1", "--rate", "256KiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("copy");
    let lines = collect_lines(copy.stderr.take().expect("stderr"));
    wait_line(&lines, 0, |l| {
        l.starts_with("copy ") && l.contains("grains")
    });
    signal(copy.id(), "-INT");
    let st = wait_child(&mut copy);
    assert_eq!(st.code(), Some(130));
    wait_line(&lines, 0, |l| {
        l.contains("interrupted: run copy again to resume")
    });
    // The server holds no copy of s1 any more, and s1 is not complete.
    let o = run_in(d, &["pause", "t.tzt", "s1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no copy of s1 is running"), "{err}");
    let status = ok_in(d, &["status", "t.tzt"]);
    assert!(status.contains("s1 active"), "{status}");

    let mut copy = tz()
        .current_dir(d)
        .args(["copy", "t.tzt", "s1", "--rate", "256KiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("copy");
    let lines = collect_lines(copy.stderr.take().expect("stderr"));
    let first = wait_line(&lines, 0, |l| l.starts_with("copy "));
    assert!(lines.lock().expect("lines")[first].contains("limit 256KiB/s"));
    assert_eq!(
        ok_in(d, &["pause", "t.tzt", "s1"]).trim(),
        "copy of s1 paused"
    );
    let at = wait_line(&lines, first + 1, |l| l.ends_with(" paused"));
    assert_eq!(
        ok_in(d, &["resume", "t.tzt", "s1"]).trim(),
        "copy of s1 resumed"
    );
    let resumed = wait_line(&lines, at + 1, |l| {
        l.starts_with("copy ") && !l.contains("paused")
    });
    assert!(lines.lock().expect("lines")[resumed].contains("limit 256KiB/s"));
    assert_eq!(
        ok_in(d, &["rate", "t.tzt", "s1", "1GiB"]).trim(),
        "copy of s1 limited to 1GiB/s"
    );
    // At 256 KiB/s the copy would need two minutes; at the new rate it ends well before the
    // deadline.
    let st = wait_child(&mut copy);
    assert!(st.success(), "{:?}", lines.lock().expect("lines"));
    let last = lines
        .lock()
        .expect("lines")
        .last()
        .cloned()
        .unwrap_or_default();
    assert!(!last.starts_with("timezero:"), "{last}");
    let mut out = String::new();
    copy.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("stdout");
    assert!(out.contains("s1 completed"), "{out}");
    drop(server);
    assert_eq!(std::fs::read(d.join("tgt.img")).expect("target"), src);
}

/// `stop` during a forwarded copy ends it with a message naming the table, not the stopped
/// server as a holder; a later copy completes the session.
#[test]
fn hostile_stop_during_forwarded_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = table_with_session(d, 32 << 20);
    let mut server = Server::start(d, Path::new("t.tzt"), &[]);
    let mut copy = tz()
        .current_dir(d)
        .args(["copy", "t.tzt", "s1", "--rate", "256KiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("copy");
    let lines = collect_lines(copy.stderr.take().expect("stderr"));
    wait_line(&lines, 0, |l| l.starts_with("copy "));
    ok_in(d, &["stop", "t.tzt"]);
    let st = wait_child(&mut copy);
    assert_eq!(st.code(), Some(1));
    let at = wait_line(&lines, 0, |l| l.starts_with("timezero:"));
    let msg = lines.lock().expect("lines")[at].clone();
    assert!(msg.contains("stopped; run copy again to resume"), "{msg}");
    assert!(msg.contains("t.tzt"), "{msg}");
    assert!(!msg.contains("held by"), "{msg}");
    server.wait_exit();
    let out = ok_in(d, &["copy", "t.tzt", "s1"]);
    assert!(out.contains("s1 completed"), "{out}");
    assert_eq!(std::fs::read(d.join("tgt.img")).expect("target"), src);
}

/// Ctrl-C on a standalone copy stops it cleanly: the message says how to resume, what was
/// copied is durable, and a later copy completes the session byte for byte.
#[test]
fn hostile_standalone_copy_interrupt_is_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = table_with_session(d, 32 << 20);
    let mut copy = tz()
        .current_dir(d)
        .args(["copy", "t.tzt", "s1", "--rate", "512KiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("copy");
    let lines = collect_lines(copy.stderr.take().expect("stderr"));
    wait_line(&lines, 0, |l| l.starts_with("copy "));
    signal(copy.id(), "-INT");
    let st = wait_child(&mut copy);
    assert_eq!(st.code(), Some(130));
    wait_line(&lines, 0, |l| {
        l == "timezero: interrupted: run copy again to resume"
    });
    let json = ok_in(d, &["status", "t.tzt", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["sessions"][0]["state"], "active", "{json}");
    let copied = v["sessions"][0]["grains_copied"].as_u64().expect("copied");
    assert!(copied > 0 && copied < 512, "{json}");
    let out = ok_in(d, &["copy", "t.tzt", "s1"]);
    assert!(out.contains("s1 completed"), "{out}");
    assert_eq!(std::fs::read(d.join("tgt.img")).expect("target"), src);
}

// ---------------------------------------------------------------------------------------------
// The table file itself: rolled back, and read while another process holds it.

/// A table file put back from an older copy (same inode, `cat old > t.tzt`) after an engine
/// write is refused by every command that opens it, naming both sequences; `recover
/// --accept-rollback` opens it and ends every active session (reason TableRolledBack), so no
/// image of it is served afterwards.
#[test]
fn hostile_rolled_back_table_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    table_with_session(d, 1 << 20);
    let old = std::fs::read(d.join("t.tzt")).expect("table");
    random_file(&d.join("data.bin"), 4096, 9);
    ok_in(d, &["write", "t.tzt", "src.img", "0", "--from", "data.bin"]);
    // Put the old bytes back into the same file (same inode, as `cat old > t.tzt` would).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.tzt"))
        .expect("table");
    f.write_all(&old).expect("put back");
    f.sync_all().expect("sync");
    drop(f);
    for args in [
        &["recover", "t.tzt"][..],
        &["export", "t.tzt", "s1", "out.img"][..],
    ] {
        let o = run_in(d, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("rolled back") && err.contains("witness") && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    assert!(!d.join("out.img").exists());
    let st = ok_in(d, &["status", "t.tzt"]);
    assert!(st.contains("rolled back"), "{st}");
    let out = ok_in(d, &["recover", "t.tzt", "--accept-rollback"]);
    assert!(out.contains("rolled back"), "{out}");
    let json = ok_in(d, &["status", "t.tzt", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let s = v["sessions"][0].clone();
    assert_eq!(s["state"], "terminated", "{json}");
    assert_eq!(s["reason"]["code"], "TableRolledBack", "{json}");
    let o = run_in(d, &["export", "t.tzt", "s1", "out.img"]);
    assert_eq!(o.status.code(), Some(1));
    // Accepted once: the witness now follows the table again.
    ok_in(d, &["recover", "t.tzt"]);
}

/// `status` changes nothing: a target moved away while `status` runs is still there for the
/// session afterwards (status neither reconciles nor terminates), and `status` works while
/// another process (a running `copy`, which serves no control socket) holds the table, naming
/// that process.
#[test]
fn hostile_status_is_read_only_and_works_while_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = table_with_session(d, 8 << 20);
    std::fs::rename(d.join("tgt.img"), d.join("tgt.away")).expect("move target away");
    let st = ok_in(d, &["status", "t.tzt", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&st).expect("json");
    assert_eq!(v["sessions"][0]["state"], "active", "{st}");
    std::fs::rename(d.join("tgt.away"), d.join("tgt.img")).expect("move target back");
    let json = ok_in(d, &["status", "t.tzt", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["sessions"][0]["state"], "active", "{json}");
    assert!(v["sessions"][0]["reason"].is_null(), "{json}");

    let mut copy = tz()
        .current_dir(d)
        .args(["copy", "t.tzt", "s1", "--rate", "256KiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("copy");
    let lines = collect_lines(copy.stderr.take().expect("stderr"));
    wait_line(&lines, 0, |l| l.starts_with("copy "));
    let text = ok_in(d, &["status", "t.tzt"]);
    assert!(
        text.contains(&format!("held by pid {}", copy.id())),
        "{text}"
    );
    assert!(text.contains("s1"), "{text}");
    signal(copy.id(), "-INT");
    wait_child(&mut copy);
    let out = ok_in(d, &["copy", "t.tzt", "s1"]);
    assert!(out.contains("s1 completed"), "{out}");
    assert_eq!(std::fs::read(d.join("tgt.img")).expect("target"), src);
    let text = ok_in(d, &["status", "t.tzt"]);
    assert!(text.contains("not held"), "{text}");
}

mod common;

/// Bad input to the command line and the engine: volumes that must never be volumes, lengths,
/// targets holding data, partial files, messages, flag ranges and JSON.
mod bad_input {
    use super::common;

    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use timezero::Error;
    use timezero::{Engine, EngineOptions, SessionSpec};
    use timezero::{FileVolume, FileVolumeOptions};

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
            mode: timezero::fault::internals::format::CopyMode::NoCopy,
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
        // The default table (56 MiB with its copy log) cannot be allocated on 1 MiB.
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
            "--log-size",
            "0",
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
            (vec!["copy", t, "--depth", "0"], "1 to 16"),
            (vec!["copy", t, "--depth", "17"], "1 to 16"),
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

/// A target moved away for a moment: a command that opens the table suspends the session
/// instead of ending it, a write that would need copy-before-write is refused (naming the
/// session and the path) and leaves the source as it was; moved back, `resume` resumes the
/// session and its image is still the source at T0.
#[test]
fn hostile_missing_then_returned_volume_suspends_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = table_with_session(d, 1 << 20);
    random_file(&d.join("data.bin"), 4096, 11);
    std::fs::rename(d.join("tgt.img"), d.join("tgt.away")).expect("move target away");
    let o = run_in(d, &["write", "t.tzt", "src.img", "0", "--from", "data.bin"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("session s1 is suspended") && err.contains("tgt.img"),
        "{err}"
    );
    assert_eq!(std::fs::read(d.join("src.img")).expect("source"), src);
    let st = ok_in(d, &["status", "t.tzt"]);
    assert!(st.contains("s1 suspended"), "{st}");
    std::fs::rename(d.join("tgt.away"), d.join("tgt.img")).expect("move target back");
    assert_eq!(ok_in(d, &["resume", "t.tzt", "s1"]).trim(), "s1 resumed");
    ok_in(d, &["write", "t.tzt", "src.img", "0", "--from", "data.bin"]);
    ok_in(d, &["export", "t.tzt", "s1", "image.raw"]);
    assert_eq!(std::fs::read(d.join("image.raw")).expect("image"), src);
}
