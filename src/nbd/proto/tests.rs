//! Unit and property tests of the wire format.

use super::*;
use proptest::prelude::*;

#[test]
fn greeting_round_trip() {
    let g = encode_greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(parse_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    assert!(matches!(
        parse_greeting(&g[..10]),
        Err(ProtoError::Truncated { .. })
    ));
    let mut bad = g;
    bad[0] ^= 1;
    assert!(matches!(
        parse_greeting(&bad),
        Err(ProtoError::BadMagic { .. })
    ));
}

#[test]
fn client_flags() {
    assert_eq!(
        ClientFlags::parse(3),
        Ok(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        })
    );
    assert_eq!(ClientFlags::parse(1).map(ClientFlags::encode), Ok(1));
    assert_eq!(
        ClientFlags::parse(4),
        Err(ProtoError::UnknownClientFlags(4))
    );
    assert!(ClientFlags::parse(u32::MAX).is_err());
}

#[test]
fn option_header_round_trip_and_hostile() {
    let h = OptionHeader {
        option: OPT_GO,
        length: 77,
    };
    assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
    let mut bad = h.encode();
    bad[3] = 0;
    assert!(matches!(
        OptionHeader::parse(&bad),
        Err(ProtoError::BadMagic { .. })
    ));
    assert!(OptionHeader::parse(&[]).is_err());
    let whole = encode_option(OPT_LIST, b"xyz");
    assert_eq!(whole.len(), OPTION_HEADER_BYTES + 3);
    assert_eq!(
        OptionHeader::parse(&whole),
        Ok(OptionHeader {
            option: OPT_LIST,
            length: 3
        })
    );
}

#[test]
fn option_reply_round_trip() {
    let r = encode_option_reply(OPT_LIST, REP_SERVER, &encode_rep_server("disk"));
    let h = OptionReplyHeader::parse(&r).expect("header");
    assert_eq!(
        h,
        OptionReplyHeader {
            option: OPT_LIST,
            reply: REP_SERVER,
            length: 8
        }
    );
    assert!(!h.is_error());
    assert_eq!(
        parse_rep_server(&r[OPTION_REPLY_HEADER_BYTES..]).as_deref(),
        Ok("disk")
    );
    let e = encode_option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no");
    assert!(OptionReplyHeader::parse(&e).expect("header").is_error());
    // A name length pointing past the data.
    assert!(parse_rep_server(&[0, 0, 0, 9, b'a']).is_err());
}

#[test]
fn export_name_reply_padding() {
    assert_eq!(encode_export_name_reply(1 << 20, 3, false).len(), 134);
    let short = encode_export_name_reply(1 << 20, 3, true);
    assert_eq!(short.len(), 10);
    assert_eq!(&short[..8], &(1u64 << 20).to_be_bytes());
    assert_eq!(&short[8..], &3u16.to_be_bytes());
}

#[test]
fn info_request_round_trip_and_hostile() {
    let r = InfoRequest {
        name: "disk".into(),
        infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
    };
    assert_eq!(InfoRequest::parse(&r.encode()), Ok(r.clone()));
    let empty = InfoRequest {
        name: String::new(),
        infos: vec![],
    };
    assert_eq!(InfoRequest::parse(&empty.encode()), Ok(empty));
    // Trailing byte.
    let mut t = r.encode();
    t.push(0);
    assert!(matches!(
        InfoRequest::parse(&t),
        Err(ProtoError::Trailing { .. })
    ));
    // Name length beyond the data, or beyond the string limit.
    assert!(InfoRequest::parse(&[0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(matches!(
        InfoRequest::parse(&[0, 0, 0x10, 0x01]),
        Err(ProtoError::TooLong { .. })
    ));
    // Info count beyond the data.
    assert!(InfoRequest::parse(&[0, 0, 0, 0, 0xff, 0xff]).is_err());
    // Not UTF-8, embedded NUL.
    assert!(InfoRequest::parse(&[0, 0, 0, 1, 0xff, 0, 0]).is_err());
    assert!(InfoRequest::parse(&[0, 0, 0, 1, 0, 0, 0]).is_err());
}

#[test]
fn info_round_trip() {
    for i in [
        Info::Export {
            size: 12345,
            flags: 0x1ff,
        },
        Info::Name("n".into()),
        Info::Description("a disk".into()),
        Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: 32 << 20,
        },
        Info::Unknown(77),
    ] {
        assert_eq!(Info::parse(&i.encode()), Ok(i));
    }
    assert!(Info::parse(&[0, 0, 1]).is_err());
    assert!(Info::parse(&[0, 3, 0, 0, 0, 1]).is_err());
    let long = "é".repeat(STRING_MAX_BYTES);
    let enc = Info::Description(long).encode();
    assert!(enc.len() <= 2 + STRING_MAX_BYTES);
    assert!(Info::parse(&enc).is_ok());
}

#[test]
fn request_round_trip_and_hostile() {
    let r = Request {
        flags: CMD_FLAG_FUA,
        command: Command::Write,
        cookie: 0xdead_beef_0bad_cafe,
        offset: 1 << 40,
        length: 4096,
    };
    assert_eq!(Request::parse(&r.encode()), Ok(r));
    let u = Request {
        command: Command::Unknown(999),
        ..r
    };
    assert_eq!(Request::parse(&u.encode()), Ok(u));
    for v in 0..=12u16 {
        assert_eq!(Command::from_u16(v).to_u16(), v);
    }
    let mut bad = r.encode();
    bad[0] = 0;
    assert!(matches!(
        Request::parse(&bad),
        Err(ProtoError::BadMagic { .. })
    ));
    assert!(matches!(
        Request::parse(&r.encode()[..27]),
        Err(ProtoError::Truncated { .. })
    ));
}

fn lim() -> ExportLimits {
    ExportLimits {
        size: 1 << 20,
        read_only: false,
        min_block: 1,
        max_payload: 32 << 20,
    }
}

fn req(command: Command, offset: u64, length: u32) -> Request {
    Request {
        flags: 0,
        command,
        cookie: 1,
        offset,
        length,
    }
}

#[test]
fn check_request_errors() {
    let l = lim();
    let e = |r: Request, l: &ExportLimits| check_request(&r, l).map_err(|j| j.errno);
    assert_eq!(e(req(Command::Read, 0, 4096), &l), Ok(()));
    assert_eq!(e(req(Command::Read, (1 << 20) - 1, 2), &l), Err(EINVAL));
    assert_eq!(e(req(Command::Write, (1 << 20) - 1, 2), &l), Err(ENOSPC));
    assert_eq!(e(req(Command::WriteZeroes, 1 << 20, 1), &l), Err(ENOSPC));
    assert_eq!(e(req(Command::Trim, 1 << 20, 1), &l), Err(EINVAL));
    assert_eq!(e(req(Command::Read, u64::MAX, 2), &l), Err(EOVERFLOW));
    assert_eq!(e(req(Command::Read, 0, (32 << 20) + 1), &l), Err(EOVERFLOW));
    // Trim and zeroing carry no payload, so the payload limit does not apply to them.
    let big = ExportLimits { size: 1 << 40, ..l };
    assert_eq!(e(req(Command::Trim, 0, u32::MAX), &big), Ok(()));
    assert_eq!(e(req(Command::Cache, 0, 1), &l), Err(EINVAL));
    assert_eq!(e(req(Command::BlockStatus, 0, 1), &l), Err(EINVAL));
    assert_eq!(e(req(Command::Unknown(99), 0, 1), &l), Err(EINVAL));
    assert_eq!(e(req(Command::Flush, 5, 5), &l), Ok(()));
    assert_eq!(e(req(Command::Disc, u64::MAX, u32::MAX), &l), Ok(()));
    let df = Request {
        flags: CMD_FLAG_DF,
        ..req(Command::Read, 0, 1)
    };
    assert_eq!(e(df, &l), Err(EINVAL));
    let fua = Request {
        flags: CMD_FLAG_FUA,
        ..req(Command::Write, 0, 1)
    };
    assert_eq!(e(fua, &l), Ok(()));
    let nohole = Request {
        flags: CMD_FLAG_NO_HOLE,
        ..req(Command::WriteZeroes, 0, 1)
    };
    assert_eq!(e(nohole, &l), Ok(()));
    let ro = ExportLimits {
        read_only: true,
        ..l
    };
    assert_eq!(e(req(Command::Write, 0, 1), &ro), Err(EPERM));
    assert_eq!(e(req(Command::Trim, 0, 1), &ro), Err(EPERM));
    assert_eq!(e(req(Command::WriteZeroes, 0, 1), &ro), Err(EPERM));
    assert_eq!(e(req(Command::Read, 0, 1), &ro), Ok(()));
    let aligned = ExportLimits {
        min_block: 512,
        ..l
    };
    assert_eq!(e(req(Command::Read, 512, 1024), &aligned), Ok(()));
    assert_eq!(e(req(Command::Read, 1, 512), &aligned), Err(EINVAL));
    assert_eq!(e(req(Command::Read, 0, 511), &aligned), Err(EINVAL));
}

#[test]
fn block_sizes_are_valid() {
    assert_eq!(block_sizes(1, 4096, 32 << 20), (1, 4096, 32 << 20));
    assert_eq!(block_sizes(0, 0, 32 << 20), (1, 1, 32 << 20));
    assert_eq!(block_sizes(3000, 100, 32 << 20), (4096, 4096, 32 << 20));
    assert_eq!(
        block_sizes(u32::MAX, u32::MAX, 32 << 20),
        (65536, 32 << 20, 32 << 20)
    );
    assert_eq!(block_sizes(4096, 4096, 1000), (4096, 4096, 4096));
}

#[test]
fn replies_round_trip() {
    let s = SimpleReply {
        error: EIO,
        cookie: 42,
    };
    assert_eq!(SimpleReply::parse(&s.encode()), Ok(s));
    assert!(SimpleReply::parse(&[0u8; 16]).is_err());
    let none = encode_none_chunk(7);
    let h = ChunkHeader::parse(&none).expect("none");
    assert!(h.is_done() && h.kind == REPLY_TYPE_NONE && h.length == 0 && h.cookie == 7);
    let p = encode_offset_data_prefix(9, 4096, 100, true);
    let h = ChunkHeader::parse(&p).expect("data");
    assert_eq!(h.length, 108);
    assert_eq!(&p[20..], &4096u64.to_be_bytes());
    for offset in [None, Some(77)] {
        let c = ErrorChunk {
            errno: EINVAL,
            message: "bad".into(),
            offset,
        };
        let enc = c.encode(5);
        let h = ChunkHeader::parse(&enc).expect("error header");
        assert!(h.is_done() && h.kind & REPLY_TYPE_ERROR_BIT != 0);
        assert_eq!(h.length as usize, enc.len() - STRUCTURED_REPLY_HEADER_BYTES);
        assert_eq!(
            ErrorChunk::parse(h.kind, &enc[STRUCTURED_REPLY_HEADER_BYTES..]),
            Ok(c)
        );
    }
    // Message length pointing past the payload.
    assert!(ErrorChunk::parse(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'x']).is_err());
}

#[test]
fn errno_mapping() {
    let io = |code| crate::Error::io("write", "t", 0, std::io::Error::from_raw_os_error(code));
    assert_eq!(
        errno_for(&io(rustix::io::Errno::NOSPC.raw_os_error())),
        ENOSPC
    );
    assert_eq!(
        errno_for(&io(rustix::io::Errno::ROFS.raw_os_error())),
        EPERM
    );
    assert_eq!(errno_for(&io(rustix::io::Errno::IO.raw_os_error())), EIO);
    // A latched volume answers with its first error's errno: a full disk stays ENOSPC.
    let poisoned = crate::Error::PoisonedIo {
        target: "t".into(),
        op: "write",
        offset: 0,
        source: std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
    };
    assert_eq!(errno_for(&poisoned), ENOSPC);
    assert_eq!(errno_for(&crate::Error::invalid("x", "y")), EINVAL);
    let oor = crate::Error::OutOfRange {
        offset: 0,
        len: 1,
        what: "v",
        size: 0,
    };
    assert_eq!(errno_for(&oor), EINVAL);
    assert_eq!(
        errno_for(&crate::Error::Poisoned { target: "v".into() }),
        EIO
    );
}

proptest! {
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_greeting(&bytes);
        let _ = OptionHeader::parse(&bytes);
        let _ = OptionReplyHeader::parse(&bytes);
        let _ = InfoRequest::parse(&bytes);
        let _ = Info::parse(&bytes);
        let _ = parse_rep_server(&bytes);
        let _ = SimpleReply::parse(&bytes);
        let _ = ChunkHeader::parse(&bytes);
        let _ = ErrorChunk::parse(REPLY_TYPE_ERROR, &bytes);
        let _ = ErrorChunk::parse(REPLY_TYPE_ERROR_OFFSET, &bytes);
        if let Ok(r) = Request::parse(&bytes) {
            prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
            for read_only in [false, true] {
                let l = ExportLimits { read_only, min_block: 512, ..lim() };
                if check_request(&r, &l).is_ok() && r.command != Command::Disc
                    && r.command != Command::Flush
                {
                    // Whatever passes the check lies within the export.
                    prop_assert!(r.offset + u64::from(r.length) <= l.size);
                }
            }
        }
    }

    #[test]
    fn request_parser_fuzz(
        magic in prop_oneof![Just(REQUEST_MAGIC), any::<u32>()],
        rest in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut bytes = magic.to_be_bytes().to_vec();
        bytes.extend_from_slice(&rest);
        match Request::parse(&bytes) {
            Ok(r) => {
                prop_assert_eq!(magic, REQUEST_MAGIC);
                prop_assert!(bytes.len() >= REQUEST_HEADER_BYTES);
                prop_assert_eq!(&r.encode()[..], &bytes[..REQUEST_HEADER_BYTES]);
                let _ = check_request(&r, &lim());
            }
            Err(_) => prop_assert!(magic != REQUEST_MAGIC || bytes.len() < REQUEST_HEADER_BYTES),
        }
    }

    #[test]
    fn info_request_round_trips(name in "[a-z0-9/._-]{0,64}",
                                infos in proptest::collection::vec(any::<u16>(), 0..20)) {
        let r = InfoRequest { name, infos };
        prop_assert_eq!(InfoRequest::parse(&r.encode()), Ok(r));
    }
}
