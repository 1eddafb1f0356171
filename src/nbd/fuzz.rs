//! The check behind the cargo-fuzz target `nbd_request` (feature `fault`), kept beside the wire
//! format it exercises. Callers reach it as `timezero::fault::fuzzing::check_nbd`, with the
//! other fuzz checks.

use super::proto;

/// Feed `data` to every parser of [`crate::nbd::proto`] (greeting, client flags, option header,
/// option reply header, export name, `NBD_OPT_INFO`/`GO` data, info reply, request header with
/// [`proto::check_request`], simple and structured reply headers, error chunk) and check that
/// what parses re-encodes to the same bytes where an encoder exists.
pub fn check_nbd(data: &[u8]) {
    let _ = proto::parse_greeting(data);
    if let Some(b) = data.get(..4) {
        let raw = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if let Ok(f) = proto::ClientFlags::parse(raw) {
            assert_eq!(proto::ClientFlags::parse(f.encode()), Ok(f));
        }
    }
    if let Ok(h) = proto::OptionHeader::parse(data) {
        assert_eq!(proto::OptionHeader::parse(&h.encode()), Ok(h));
    }
    let _ = proto::OptionReplyHeader::parse(data);
    let _ = proto::parse_rep_server(data);
    let _ = proto::parse_string(data, "fuzz");
    if let Ok(i) = proto::InfoRequest::parse(data) {
        assert_eq!(proto::InfoRequest::parse(&i.encode()), Ok(i));
    }
    if let Ok(i) = proto::Info::parse(data) {
        if !matches!(i, proto::Info::Unknown(_)) {
            assert_eq!(proto::Info::parse(&i.encode()), Ok(i));
        }
    }
    if let Ok(req) = proto::Request::parse(data) {
        assert_eq!(proto::Request::parse(&req.encode()), Ok(req));
        let tail = data.get(proto::REQUEST_HEADER_BYTES..).unwrap_or(&[]);
        // Limits from the bytes after the header, read as zeros past the end.
        let byte = |i: usize| tail.get(i).copied().unwrap_or(0);
        let le32 = |i: usize| u32::from_le_bytes([byte(i), byte(i + 1), byte(i + 2), byte(i + 3)]);
        let lim = proto::ExportLimits {
            size: u64::from(le32(0)) << (byte(4) % 32),
            read_only: byte(5) & 1 == 1,
            min_block: 1 << (byte(6) % 13),
            max_payload: le32(7),
        };
        if proto::check_request(&req, &lim).is_ok()
            && matches!(req.command, proto::Command::Read | proto::Command::Write)
        {
            assert!(req.offset + u64::from(req.length) <= lim.size);
            assert!(req.length <= lim.max_payload);
        }
    }
    let _ = proto::SimpleReply::parse(data);
    let _ = proto::ChunkHeader::parse(data);
    for kind in [proto::REPLY_TYPE_ERROR, proto::REPLY_TYPE_ERROR_OFFSET] {
        let _ = proto::ErrorChunk::parse(kind, data);
    }
}
