//! Tests of the server through a small Rust client over unix sockets and TCP, and a fuzz-style
//! property test of a whole session fed arbitrary bytes.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proptest::prelude::*;

use super::proto::*;
use super::server::serve_connection;
use super::*;
use crate::volume::{MemVolume, Volume};
use crate::{Error, Result};

const DISK_BYTES: usize = 1 << 20;
const RO_BYTES: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(20);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    handle: Option<ServerHandle>,
    disk: Arc<MemVolume>,
    ro: Arc<MemVolume>,
}

impl Fixture {
    fn new(config: NbdConfig) -> Self {
        Self::with_extra(config, Vec::new())
    }

    fn with_extra(config: NbdConfig, extra: Vec<(&str, Arc<dyn NbdExport>)>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let disk = Arc::new(MemVolume::new("disk", DISK_BYTES));
        let ro = Arc::new(MemVolume::with_data("ro", &pattern(RO_BYTES, 7)));
        let disk_vol: Arc<dyn Volume> = disk.clone();
        let ro_vol: Arc<dyn Volume> = ro.clone();
        let mut reg = StaticRegistry::new()
            .with(
                "disk",
                Arc::new(VolumeExport::new(disk_vol).with_description("test disk")),
            )
            .with(
                "ro",
                Arc::new(VolumeExport::new(ro_vol).with_read_only(true)),
            );
        for (name, export) in extra {
            reg.insert(name, export);
        }
        let server = NbdServer::new(Arc::new(reg), config);
        let handle = server.serve_unix(&path).expect("serve_unix");
        Fixture {
            _dir: dir,
            path,
            handle: Some(handle),
            disk,
            ro,
        }
    }

    fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("handle")
    }
}

/// A reply, reassembled.
#[derive(Debug, Default)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
    message: Option<String>,
    structured: bool,
}

/// A minimal NBD client over any stream.
struct Client<S: Read + Write> {
    s: S,
    structured: bool,
    next_cookie: u64,
}

fn unix(path: &Path) -> Client<UnixStream> {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    Client {
        s,
        structured: false,
        next_cookie: 1,
    }
}

impl<S: Read + Write> Client<S> {
    fn read_vec(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read from server");
        v
    }

    /// True when the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    fn greet(&mut self, flags: u32) {
        let g = self.read_vec(GREETING_BYTES);
        assert_eq!(parse_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        self.s.write_all(&flags.to_be_bytes()).expect("write flags");
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.s
            .write_all(&encode_option(option, data))
            .expect("write option");
    }

    fn opt_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let h = OptionReplyHeader::parse(&self.read_vec(OPTION_REPLY_HEADER_BYTES)).expect("reply");
        assert!(h.length < 1 << 20);
        let data = self.read_vec(h.length as usize);
        (h, data)
    }

    /// `NBD_OPT_GO`; returns the infos received, or the error reply type.
    fn go(&mut self, name: &str, infos: &[u16]) -> std::result::Result<Vec<Info>, u32> {
        let req = InfoRequest {
            name: name.into(),
            infos: infos.to_vec(),
        };
        self.option(OPT_GO, &req.encode());
        let mut got = Vec::new();
        loop {
            let (h, data) = self.opt_reply();
            assert_eq!(h.option, OPT_GO);
            match h.reply {
                REP_INFO => got.push(Info::parse(&data).expect("info")),
                REP_ACK => return Ok(got),
                e => return Err(e),
            }
        }
    }

    fn structured_reply(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        let (h, _) = self.opt_reply();
        assert_eq!(h.reply, REP_ACK);
        self.structured = true;
    }

    fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).expect("write request");
        cookie
    }

    /// Read one whole reply; `reads` maps cookies of pending reads to their offset and length.
    fn reply(&mut self, reads: &HashMap<u64, (u64, u32)>) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("reply magic");
        let m = u32::from_be_bytes(magic);
        if m == SIMPLE_REPLY_MAGIC {
            let mut b = magic.to_vec();
            b.extend_from_slice(&self.read_vec(SIMPLE_REPLY_HEADER_BYTES - 4));
            let h = SimpleReply::parse(&b).expect("simple");
            let mut r = Reply {
                cookie: h.cookie,
                error: h.error,
                ..Reply::default()
            };
            if h.error == 0 {
                if let Some(&(_, len)) = reads.get(&h.cookie) {
                    r.data = self.read_vec(len as usize);
                }
            }
            return r;
        }
        assert_eq!(m, STRUCTURED_REPLY_MAGIC, "unknown reply magic");
        let mut r = Reply {
            structured: true,
            ..Reply::default()
        };
        let mut first = true;
        loop {
            let mut b = if first {
                magic.to_vec()
            } else {
                self.read_vec(4)
            };
            first = false;
            b.extend_from_slice(&self.read_vec(STRUCTURED_REPLY_HEADER_BYTES - 4));
            let h = ChunkHeader::parse(&b).expect("chunk");
            r.cookie = h.cookie;
            let payload = self.read_vec(h.length as usize);
            match h.kind {
                REPLY_TYPE_NONE => assert_eq!(h.length, 0),
                REPLY_TYPE_OFFSET_DATA => {
                    let &(off, len) = reads.get(&h.cookie).expect("data for a read");
                    let at = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                    if r.data.is_empty() {
                        r.data = vec![0u8; len as usize];
                    }
                    let rel = (at - off) as usize;
                    r.data[rel..rel + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = ErrorChunk::parse(k, &payload).expect("error chunk");
                    assert_ne!(e.errno, 0);
                    r.error = e.errno;
                    r.message = Some(e.message);
                }
                k => panic!("unexpected chunk type {k}"),
            }
            if h.is_done() {
                return r;
            }
        }
    }

    fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        let cookie = self.send(command, flags, offset, length, payload);
        let mut reads = HashMap::new();
        if command == Command::Read {
            reads.insert(cookie, (offset, length));
        }
        let r = self.reply(&reads);
        assert_eq!(r.cookie, cookie);
        r
    }

    fn read_at(&mut self, offset: u64, length: u32) -> Reply {
        self.call(Command::Read, 0, offset, length, &[])
    }

    fn write_at(&mut self, offset: u64, data: &[u8], flags: u16) -> Reply {
        self.call(Command::Write, flags, offset, data.len() as u32, data)
    }
}

fn connect_go(path: &Path, name: &str, structured: bool) -> (Client<UnixStream>, Vec<Info>) {
    let mut c = unix(path);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if structured {
        c.structured_reply();
    }
    let infos = c.go(name, &[INFO_BLOCK_SIZE]).expect("GO");
    (c, infos)
}

fn export_info(infos: &[Info]) -> (u64, u16) {
    infos
        .iter()
        .find_map(|i| match i {
            Info::Export { size, flags } => Some((*size, *flags)),
            _ => None,
        })
        .expect("NBD_INFO_EXPORT")
}

#[test]
fn nbd_handshake_options() {
    let f = Fixture::new(NbdConfig::default());
    let mut c = unix(&f.path);
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (h, data) = c.opt_reply();
        match h.reply {
            REP_SERVER => names.push(parse_rep_server(&data).expect("server")),
            REP_ACK => break,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    assert_eq!(names, ["disk", "ro"]);

    c.option(OPT_LIST, b"junk");
    assert_eq!(c.opt_reply().0.reply, REP_ERR_INVALID);
    c.option(999, b"whatever");
    assert_eq!(c.opt_reply().0.reply, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.opt_reply().0.reply, REP_ERR_UNSUP);
    c.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0]);
    assert_eq!(c.opt_reply().0.reply, REP_ERR_UNSUP);

    // INFO on the default export, with everything requested.
    let req = InfoRequest {
        name: String::new(),
        infos: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    };
    c.option(OPT_INFO, &req.encode());
    let mut infos = Vec::new();
    loop {
        let (h, data) = c.opt_reply();
        assert_eq!(h.option, OPT_INFO);
        match h.reply {
            REP_INFO => infos.push(Info::parse(&data).expect("info")),
            REP_ACK => break,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
    let want_flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    assert!(infos.contains(&Info::Export {
        size: DISK_BYTES as u64,
        flags: want_flags
    }));
    assert!(infos.contains(&Info::Name("disk".into())));
    assert!(infos.contains(&Info::Description("test disk".into())));
    assert!(infos.contains(&Info::BlockSize {
        min: 1,
        preferred: 4096,
        max: PAYLOAD_MAX_BYTES
    }));

    // INFO/GO errors keep the negotiation going.
    c.option(OPT_INFO, &[0, 0]);
    assert_eq!(c.opt_reply().0.reply, REP_ERR_INVALID);
    assert_eq!(c.go("nope", &[]), Err(REP_ERR_UNKNOWN));

    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().0.reply, REP_ACK);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().0.reply, REP_ERR_INVALID);

    // The read-only export advertises it.
    let req = InfoRequest {
        name: "ro".into(),
        infos: vec![],
    };
    c.option(OPT_INFO, &req.encode());
    let (h, data) = c.opt_reply();
    assert_eq!(h.reply, REP_INFO);
    let Info::Export { size, flags } = Info::parse(&data).expect("info") else {
        panic!("export info")
    };
    assert_eq!(size, RO_BYTES as u64);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    while c.opt_reply().0.reply != REP_ACK {}

    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().0.reply, REP_ACK);
    assert!(c.closed());
}

#[test]
fn nbd_simple_replies_and_errors() {
    let f = Fixture::new(NbdConfig::default());
    let (mut c, infos) = connect_go(&f.path, "disk", false);
    assert_eq!(export_info(&infos).0, DISK_BYTES as u64);

    let data = pattern(64 * 1024, 1);
    assert_eq!(c.write_at(4096, &data, 0).error, 0);
    let r = c.read_at(4096, 64 * 1024);
    assert_eq!((r.error, r.structured), (0, false));
    assert_eq!(r.data, data);
    assert_eq!(c.write_at(0, &[9; 512], CMD_FLAG_FUA).error, 0);
    assert_eq!(c.call(Command::Flush, 0, 0, 0, &[]).error, 0);
    assert_eq!(c.call(Command::Trim, 0, 8192, 4096, &[]).error, 0);
    assert_eq!(
        c.call(Command::WriteZeroes, CMD_FLAG_FUA, 16384, 4096, &[])
            .error,
        0
    );

    let snap = f.disk.snapshot();
    assert_eq!(&snap[..512], &[9; 512][..]);
    assert_eq!(&snap[4096..8192], &data[..4096]);
    assert!(snap[8192..12288].iter().all(|&b| b == 0));
    assert_eq!(&snap[12288..16384], &data[8192..12288]);
    assert!(snap[16384..20480].iter().all(|&b| b == 0));
    assert_eq!(&snap[20480..4096 + 65536], &data[16384..]);

    // Hostile requests get errors and the stream stays in sync.
    let end = DISK_BYTES as u64;
    assert_eq!(c.read_at(end - 10, 20).error, EINVAL);
    assert_eq!(c.read_at(end + 4096, 1).error, EINVAL);
    assert_eq!(c.write_at(end - 1, &[1, 2], 0).error, ENOSPC);
    assert_eq!(c.call(Command::WriteZeroes, 0, end, 1, &[]).error, ENOSPC);
    assert_eq!(c.call(Command::Trim, 0, end, 1, &[]).error, EINVAL);
    assert_eq!(c.read_at(u64::MAX - 1, 10).error, EOVERFLOW);
    assert_eq!(c.read_at(0, PAYLOAD_MAX_BYTES + 1).error, EOVERFLOW);
    assert_eq!(c.call(Command::Unknown(42), 0, 0, 0, &[]).error, EINVAL);
    assert_eq!(c.call(Command::BlockStatus, 0, 0, 512, &[]).error, EINVAL);
    assert_eq!(c.call(Command::Cache, 0, 0, 512, &[]).error, EINVAL);
    assert_eq!(
        c.call(Command::Read, CMD_FLAG_DF, 0, 512, &[]).error,
        EINVAL
    );
    assert_eq!(
        c.call(Command::Write, 0x8000, 0, 4, &[1, 2, 3, 4]).error,
        EINVAL
    );
    let r = c.read_at(0, 0);
    assert_eq!((r.error, r.data.len()), (0, 0));
    assert_eq!(f.disk.snapshot()[end as usize - 1], 0);
    let r = c.read_at(4096, 16);
    assert_eq!(r.data, &data[..16]);

    c.send(Command::Disc, 0, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn nbd_structured_replies() {
    let f = Fixture::new(NbdConfig::default());
    let (mut c, _) = connect_go(&f.path, "disk", true);
    let data = pattern(10_000, 3);
    assert_eq!(c.write_at(1000, &data, 0).error, 0);
    let r = c.read_at(1000, 10_000);
    assert_eq!((r.error, r.structured), (0, true));
    assert_eq!(r.data, data);

    let r = c.read_at(DISK_BYTES as u64 - 1, 2);
    assert_eq!((r.error, r.structured), (EINVAL, true));
    assert!(r.message.is_some_and(|m| m.contains("past the end")));
    let r = c.read_at(0, 0);
    assert_eq!((r.error, r.structured, r.data.len()), (0, true, 0));
    // Non-read errors are structured too; successes are simple.
    let r = c.write_at(DISK_BYTES as u64, &[1], 0);
    assert_eq!((r.error, r.structured), (ENOSPC, true));
    let r = c.call(Command::Flush, 0, 0, 0, &[]);
    assert_eq!((r.error, r.structured), (0, false));
}

#[test]
fn nbd_read_only_export() {
    let f = Fixture::new(NbdConfig::default());
    let (mut c, infos) = connect_go(&f.path, "ro", true);
    let (size, flags) = export_info(&infos);
    assert_eq!(size, RO_BYTES as u64);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(c.write_at(0, &[1; 4096], 0).error, EPERM);
    assert_eq!(c.write_at(0, &[1; 16], CMD_FLAG_FUA).error, EPERM);
    assert_eq!(c.call(Command::Trim, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(c.call(Command::WriteZeroes, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(c.call(Command::Flush, 0, 0, 0, &[]).error, 0);
    let r = c.read_at(0, RO_BYTES as u32);
    assert_eq!(r.error, 0);
    assert_eq!(r.data, pattern(RO_BYTES, 7));
    assert_eq!(f.ro.snapshot(), pattern(RO_BYTES, 7));
}

#[test]
fn nbd_pipelined_requests() {
    let config = NbdConfig {
        in_flight_max_requests: 8,
        workers_per_connection: 4,
        ..NbdConfig::default()
    };
    let f = Fixture::new(config);
    for structured in [false, true] {
        let (mut c, _) = connect_go(&f.path, "disk", structured);
        let n = 64u64;
        let seed = u8::from(structured);
        let mut cookies = Vec::new();
        for i in 0..n {
            let block = pattern(4096, (i as u8).wrapping_add(seed));
            cookies.push(c.send(Command::Write, 0, i * 4096, 4096, &block));
        }
        let mut seen: Vec<u64> = (0..n)
            .map(|_| c.reply(&HashMap::new()))
            .map(|r| {
                assert_eq!(r.error, 0);
                r.cookie
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, cookies);

        let mut reads = HashMap::new();
        for i in 0..n {
            let cookie = c.send(Command::Read, 0, i * 4096, 4096, &[]);
            reads.insert(cookie, (i * 4096, 4096u32));
        }
        for _ in 0..n {
            let r = c.reply(&reads);
            assert_eq!(r.error, 0);
            let (off, _) = reads.remove(&r.cookie).expect("known cookie");
            assert_eq!(
                r.data,
                pattern(4096, ((off / 4096) as u8).wrapping_add(seed))
            );
        }
        c.send(Command::Disc, 0, 0, 0, &[]);
        assert!(c.closed());
    }
}

#[test]
fn nbd_hostile_connections_are_closed() {
    let f = Fixture::new(NbdConfig::default());

    // Unknown client flags; a client that is not fixed newstyle.
    for flags in [0x8000_0000u32, 0] {
        let mut c = unix(&f.path);
        c.greet(flags);
        assert!(c.closed());
    }
    // Bad option magic.
    let mut c = unix(&f.path);
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&[0u8; OPTION_HEADER_BYTES]).expect("write");
    assert!(c.closed());
    // Option data over the limit (never read, never allocated).
    let mut c = unix(&f.path);
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(
        &OptionHeader {
            option: OPT_GO,
            length: u32::MAX,
        }
        .encode(),
    )
    .expect("write");
    assert!(c.closed());
    // EXPORT_NAME of an unknown export.
    let mut c = unix(&f.path);
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // Bad request magic.
    let (mut c, _) = connect_go(&f.path, "disk", false);
    c.s.write_all(&[0xffu8; REQUEST_HEADER_BYTES])
        .expect("write");
    assert!(c.closed());
    // A write larger than the payload limit.
    let (mut c, _) = connect_go(&f.path, "disk", false);
    c.send(Command::Write, 0, 0, u32::MAX, &[]);
    assert!(c.closed());
    // The server still serves.
    let (mut c, _) = connect_go(&f.path, "disk", false);
    assert_eq!(c.read_at(0, 16).error, 0);
}

#[test]
fn nbd_export_name_honours_no_zeroes() {
    let f = Fixture::new(NbdConfig::default());
    f.disk.write_at(0, &[5; 8]).expect("seed");
    for no_zeroes in [false, true] {
        let mut c = unix(&f.path);
        c.greet(FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 });
        c.option(OPT_EXPORT_NAME, b"");
        let head = c.read_vec(10);
        assert_eq!(&head[..8], &(DISK_BYTES as u64).to_be_bytes());
        if !no_zeroes {
            assert_eq!(
                c.read_vec(EXPORT_NAME_PADDING_BYTES),
                vec![0u8; EXPORT_NAME_PADDING_BYTES]
            );
        }
        // The very next bytes are the reply to our read.
        let r = c.read_at(0, 8);
        assert_eq!((r.error, r.data), (0, vec![5u8; 8]));
    }
}

#[test]
fn nbd_handshake_timeout() {
    let config = NbdConfig {
        handshake_timeout: Some(Duration::from_millis(200)),
        ..NbdConfig::default()
    };
    let f = Fixture::new(config);
    let mut c = unix(&f.path);
    let _ = c.read_vec(GREETING_BYTES);
    let t = Instant::now();
    assert!(c.closed());
    assert!(t.elapsed() < TIMEOUT);
}

#[test]
fn nbd_handshake_deadline_covers_the_whole_handshake() {
    let config = NbdConfig {
        handshake_timeout: Some(Duration::from_millis(300)),
        ..NbdConfig::default()
    };
    let f = Fixture::new(config);
    let mut c = unix(&f.path);
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    // A client that trickles an option one byte at a time, each well within the deadline,
    // is still cut off once the whole handshake has taken too long.
    let opt = encode_option(OPT_LIST, &[]);
    let t = Instant::now();
    for b in opt.iter().cycle().take(200) {
        if c.s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if t.elapsed() > TIMEOUT {
            break;
        }
    }
    assert!(c.closed());
    assert!(t.elapsed() < TIMEOUT);
}

#[test]
fn nbd_connection_limit_and_shutdown() {
    let mut f = Fixture::new(NbdConfig {
        connections_max: 1,
        ..NbdConfig::default()
    });
    let (mut first, _) = connect_go(&f.path, "disk", false);
    assert_eq!(f.handle().connections(), 1);
    // A connection over the limit is refused by policy during option haggling.
    let mut second = unix(&f.path);
    second.greet(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(second.go("disk", &[]).err(), Some(REP_ERR_POLICY));
    second.option(OPT_ABORT, &[]);
    assert_eq!(second.opt_reply().0.reply, REP_ACK);
    assert!(second.closed());
    assert_eq!(first.read_at(0, 8).error, 0);
    first.send(Command::Disc, 0, 0, 0, &[]);
    assert!(first.closed());
    // Once the server has let the first go (it may still count it for a moment after the
    // client saw the close), another client gets in.
    let deadline = Instant::now() + TIMEOUT;
    let mut third = loop {
        let mut c = unix(&f.path);
        let mut g = [0u8; GREETING_BYTES];
        if c.s.read_exact(&mut g).is_ok() {
            c.s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
                .expect("flags");
            match c.go("disk", &[]) {
                Ok(_) => break c,
                Err(e) => assert_eq!(e, REP_ERR_POLICY, "refused otherwise than by policy"),
            }
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Shutdown closes live connections, joins, and removes the socket.
    f.handle.take().expect("handle").shutdown();
    assert!(third.closed());
    assert!(!f.path.exists());
    assert!(UnixStream::connect(&f.path).is_err());
}

#[test]
fn nbd_tcp_loopback_only() {
    let reg: Arc<dyn ExportRegistry> = Arc::new(StaticRegistry::new().with(
        "disk",
        Arc::new(VolumeExport::new(Arc::new(MemVolume::with_data(
            "t",
            &pattern(8192, 2),
        )))),
    ));
    let server = NbdServer::new(Arc::clone(&reg), NbdConfig::default());
    for bad in ["0.0.0.0:0", "[::]:0", "192.0.2.1:10809"] {
        match server.serve_tcp(bad) {
            Err(Error::Invalid { what, .. }) => assert_eq!(what, REMOTE_ADDRESS_REFUSED),
            Err(e) => panic!("{bad}: unexpected error {e}"),
            Ok(_) => panic!("{bad}: non-loopback address accepted"),
        }
    }
    let handle = server.serve_tcp("127.0.0.1:0").expect("loopback");
    let addr = handle.tcp_addr().expect("tcp addr");
    assert_ne!(addr.port(), 0);
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut c = Client {
        s,
        structured: false,
        next_cookie: 1,
    };
    c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.structured_reply();
    assert!(c.go("disk", &[]).is_ok());
    let r = c.read_at(100, 1000);
    assert_eq!(r.data, &pattern(8192, 2)[100..1100]);
    handle.shutdown();
    assert!(c.closed());

    let remote = NbdServer::new(
        reg,
        NbdConfig {
            allow_remote: true,
            ..NbdConfig::default()
        },
    );
    let h = remote.serve_tcp("0.0.0.0:0").expect("allowed");
    assert!(h.tcp_addr().is_some_and(|a| a.port() != 0));
    h.shutdown();
}

/// An export with 512-byte blocks whose backend fails reads at offset 4096 and beyond.
struct Picky;

impl NbdExport for Picky {
    fn size(&self) -> u64 {
        8192
    }
    fn read_only(&self) -> bool {
        false
    }
    fn description(&self) -> String {
        "picky".into()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset >= 4096 {
            return Err(Error::io(
                "read",
                "picky",
                offset,
                std::io::Error::from_raw_os_error(5),
            ));
        }
        buf.fill(0x5a);
        Ok(())
    }
    fn write(&self, offset: u64, _: &[u8], _: bool) -> Result<()> {
        Err(Error::io(
            "write",
            "picky",
            offset,
            std::io::Error::from_raw_os_error(28),
        ))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Ok(())
    }
    fn min_block(&self) -> u32 {
        512
    }
}

#[test]
fn nbd_block_size_and_backend_errors() {
    let f = Fixture::with_extra(
        NbdConfig::default(),
        vec![("picky", Arc::new(Picky) as Arc<dyn NbdExport>)],
    );
    let mut c = unix(&f.path);
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.structured_reply();
    // GO without asking for block sizes: told the sizes, then refused.
    let req = InfoRequest {
        name: "picky".into(),
        infos: vec![],
    };
    c.option(OPT_GO, &req.encode());
    let (h, data) = c.opt_reply();
    assert_eq!(h.reply, REP_INFO);
    assert_eq!(
        Info::parse(&data),
        Ok(Info::BlockSize {
            min: 512,
            preferred: 4096,
            max: PAYLOAD_MAX_BYTES
        })
    );
    assert_eq!(c.opt_reply().0.reply, REP_ERR_BLOCK_SIZE_REQD);
    assert!(c.go("picky", &[INFO_BLOCK_SIZE]).is_ok());

    assert_eq!(c.read_at(0, 512).data, vec![0x5a; 512]);
    assert_eq!(c.read_at(1, 512).error, EINVAL);
    assert_eq!(c.read_at(0, 100).error, EINVAL);
    let r = c.read_at(4096, 512);
    assert_eq!((r.error, r.structured), (EIO, true));
    assert_eq!(c.write_at(0, &[0; 512], 0).error, ENOSPC);

    // Simple replies report backend errors too.
    let mut c = unix(&f.path);
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    assert!(c.go("picky", &[INFO_BLOCK_SIZE]).is_ok());
    let r = c.read_at(4096, 512);
    assert_eq!((r.error, r.structured, r.data.len()), (EIO, false, 0));
    assert_eq!(c.read_at(0, 512).data, vec![0x5a; 512]);
}

// ---------------------------------------------------------------------------------------------
// Fuzz: whole sessions over in-memory streams.

fn run_session(input: Vec<u8>) -> Vec<u8> {
    let disk: Arc<dyn Volume> = Arc::new(MemVolume::new("fuzz", 64 * 1024));
    let ro: Arc<dyn Volume> = Arc::new(MemVolume::new("fuzz-ro", 4096));
    let reg = StaticRegistry::new()
        .with("", Arc::new(VolumeExport::new(disk)))
        .with("ro", Arc::new(VolumeExport::new(ro).with_read_only(true)))
        .with("picky", Arc::new(Picky));
    let config = NbdConfig {
        payload_max_bytes: 1 << 20,
        workers_per_connection: 2,
        in_flight_max_requests: 4,
        ..NbdConfig::default()
    };
    let server_config = NbdServer::new(Arc::new(StaticRegistry::new()), config)
        .config()
        .clone();
    let writer = Mutex::new(Vec::new());
    serve_connection(
        std::io::Cursor::new(input),
        &writer,
        &|| {},
        &reg,
        &Arc::default(),
        &server_config,
        || true,
    );
    writer.into_inner()
}

fn handshake_prefix(structured: bool, name: &str) -> Vec<u8> {
    let mut v = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if structured {
        v.extend_from_slice(&encode_option(OPT_STRUCTURED_REPLY, &[]));
    }
    let req = InfoRequest {
        name: name.into(),
        infos: vec![INFO_BLOCK_SIZE],
    };
    v.extend_from_slice(&encode_option(OPT_GO, &req.encode()));
    v
}

fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        prop_oneof![0u16..10, any::<u16>()],
        any::<u64>(),
        prop_oneof![0u64..70_000, any::<u64>()],
        prop_oneof![0u32..70_000, any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(flags, cmd, cookie, offset, length, tail)| {
            let r = Request {
                flags: flags & 0x1f,
                command: Command::from_u16(cmd),
                cookie,
                offset,
                length,
            };
            let mut v = r.encode().to_vec();
            v.extend_from_slice(&tail);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn nbd_session_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let out = run_session(bytes);
        prop_assert_eq!(&out[..GREETING_BYTES], &encode_greeting()[..]);
    }

    #[test]
    fn nbd_session_survives_arbitrary_options(
        options in proptest::collection::vec(
            (prop_oneof![0u32..12, any::<u32>()], proptest::collection::vec(any::<u8>(), 0..40)), 0..8),
    ) {
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        for (opt, data) in options {
            input.extend_from_slice(&encode_option(opt, &data));
        }
        let out = run_session(input);
        prop_assert!(out.len() >= GREETING_BYTES);
    }

    #[test]
    fn nbd_session_survives_arbitrary_requests(
        structured in any::<bool>(),
        name in prop_oneof![Just(""), Just("ro"), Just("picky")],
        requests in proptest::collection::vec(arb_request(), 0..12),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut input = handshake_prefix(structured, name);
        for r in requests {
            input.extend_from_slice(&r);
        }
        input.extend_from_slice(&garbage);
        let out = run_session(input);
        prop_assert!(out.len() > GREETING_BYTES);
    }
}

/// An export whose writes wait (up to a deadline) until `want` writes are inside at once, and
/// which records the name of the thread each write ran on.
struct Rendezvous {
    want: usize,
    inside: parking_lot::Mutex<usize>,
    cv: parking_lot::Condvar,
    threads: parking_lot::Mutex<Vec<String>>,
}

impl NbdExport for Rendezvous {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn description(&self) -> String {
        "rendezvous".into()
    }
    fn read(&self, _: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, offset: u64, _: &[u8], _: bool) -> Result<()> {
        self.threads.lock().push(
            std::thread::current()
                .name()
                .unwrap_or_default()
                .to_string(),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut n = self.inside.lock();
        *n += 1;
        self.cv.notify_all();
        while *n < self.want {
            if self.cv.wait_until(&mut n, deadline).timed_out() {
                // Not enough writes ever ran at once: fail the write (the test sees EIO).
                return Err(Error::io(
                    "write",
                    "rendezvous",
                    offset,
                    std::io::Error::from_raw_os_error(5),
                ));
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Ok(())
    }
}

/// A client with one request in flight is answered by the connection's reading thread itself
/// (no worker hand-off); requests in flight together run at once, on workers started as they
/// are needed (here 12 writes that can only finish when all 12 are inside the export). A
/// request the reading thread runs itself delays the reading of later ones while it runs, so
/// it does so only when nothing is in flight and nothing waits to be read.
#[test]
fn nbd_lone_requests_run_inline_and_pipelined_ones_run_at_once() {
    let lone = Arc::new(Rendezvous {
        want: 1,
        inside: parking_lot::Mutex::new(0),
        cv: parking_lot::Condvar::new(),
        threads: parking_lot::Mutex::new(Vec::new()),
    });
    let many = Arc::new(Rendezvous {
        want: 12,
        inside: parking_lot::Mutex::new(0),
        cv: parking_lot::Condvar::new(),
        threads: parking_lot::Mutex::new(Vec::new()),
    });
    let f = Fixture::with_extra(
        NbdConfig::default(),
        vec![
            ("lone", lone.clone() as Arc<dyn NbdExport>),
            ("many", many.clone() as Arc<dyn NbdExport>),
        ],
    );
    let (mut c, _) = connect_go(&f.path, "lone", false);
    for i in 0..3u64 {
        assert_eq!(c.write_at(i * 4096, &[1; 4096], 0).error, 0);
    }
    let names = lone.threads.lock().clone();
    assert_eq!(names.len(), 3);
    assert!(
        names.iter().all(|n| !n.starts_with("nbd-worker")),
        "lone requests ran on workers: {names:?}"
    );

    // The twelve requests leave in one socket write, so the reading thread finds the others
    // waiting behind the first and hands every one to a worker.
    let (mut c, _) = connect_go(&f.path, "many", false);
    let mut batch = Vec::new();
    let cookies: Vec<u64> = (0..12u64)
        .map(|i| {
            let cookie = 1000 + i;
            let r = Request {
                flags: 0,
                command: Command::Write,
                cookie,
                offset: i * 512,
                length: 512,
            };
            batch.extend_from_slice(&r.encode());
            batch.extend_from_slice(&[2; 512]);
            cookie
        })
        .collect();
    c.s.write_all(&batch).expect("write requests");
    let mut seen: Vec<u64> = (0..12)
        .map(|_| {
            let r = c.reply(&HashMap::new());
            assert_eq!(r.error, 0, "a write did not meet the others in time");
            r.cookie
        })
        .collect();
    seen.sort_unstable();
    let mut want = cookies.clone();
    want.sort_unstable();
    assert_eq!(seen, want);
    let names = many.threads.lock().clone();
    let workers: std::collections::HashSet<&String> = names
        .iter()
        .filter(|n| n.starts_with("nbd-worker"))
        .collect();
    assert!(workers.len() >= 11, "threads: {names:?}");
}
