//! The NBD wire format: constants, and pure parsing and encoding of the handshake, option
//! haggling, transmission requests and replies.
//!
//! Nothing here performs I/O or allocates more than the bytes it was handed (or a bounded
//! constant), so every parser can be fed arbitrary bytes; the property tests do exactly that.
//! All integers on the wire are big-endian.

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magic numbers.

/// First 8 bytes the server sends: `"NBDMAGIC"`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second magic of the newstyle greeting and the magic of every client option: `"IHAVEOPT"`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Fixed sizes and protocol bounds.

/// Size of the server greeting (magic, `IHAVEOPT`, handshake flags).
pub const GREETING_BYTES: usize = 18;
/// Size of a client option header (magic, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Size of an option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Size of a transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// Size of the prefix of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (header plus offset).
pub const OFFSET_DATA_PREFIX_BYTES: usize = STRUCTURED_REPLY_HEADER_BYTES + 8;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NBD_FLAG_C_NO_ZEROES` was set.
pub const EXPORT_NAME_PADDING_BYTES: usize = 124;
/// Longest string (export name, description, message) the protocol allows.
pub const STRING_MAX_BYTES: usize = 4096;
/// Longest option payload this implementation reads; longer options end the connection.
pub const OPTION_DATA_MAX_BYTES: u32 = 64 * 1024;
/// Largest minimum block size the protocol allows.
pub const MIN_BLOCK_MAX_BYTES: u32 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Handshake flags.

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask to omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags.

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the medium is rotational.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flushes are visible across all connections to the export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// ---------------------------------------------------------------------------------------------
// Options.

/// Option: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not supported here).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts (not supported here).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts (not supported here).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (not supported here).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types.

/// Option reply: success, no more data for this option.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of an `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: syntactically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: the client must request `NBD_INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: the request is too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------------------------
// Information types.

/// Information: size and transmission flags (always sent).
pub const INFO_EXPORT: u16 = 0;
/// Information: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands and command flags.

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command: resize.
pub const CMD_RESIZE: u16 = 8;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not punch a hole (write zeroes).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment the read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent only (block status).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail fast unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------------------------
// Structured replies.

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (success unless an error chunk came earlier).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole (zeroes) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

// ---------------------------------------------------------------------------------------------
// Error values (the protocol's own numbering, not necessarily the host's errno).

/// Error: operation not permitted.
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space left on device.
pub const ENOSPC: u32 = 28;
/// Error: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// Error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why bytes could not be parsed as an NBD message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A magic number did not match.
    #[error("{what}: bad magic {found:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The value found.
        found: u64,
    },
    /// The bytes ended before the message did.
    #[error("{what}: truncated (need {need} bytes, have {have})")]
    Truncated {
        /// Which message.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Bytes were left over after the message.
    #[error("{what}: {extra} unexpected trailing bytes")]
    Trailing {
        /// Which message.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A length field exceeds its bound.
    #[error("{what}: length {len} exceeds {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A string is not UTF-8 or contains NUL.
    #[error("{what}: not a valid string")]
    BadString {
        /// Which field.
        what: &'static str,
    },
    /// The client set flags this server does not know or did not offer.
    #[error("client flags {0:#x} contain unknown bits")]
    UnknownClientFlags(u32),
}

impl From<ProtoError> for crate::Error {
    fn from(e: ProtoError) -> Self {
        crate::Error::invalid("nbd message", e.to_string())
    }
}

/// Result of a parser in this module.
pub type ProtoResult<T> = std::result::Result<T, ProtoError>;

/// A bounds-checked big-endian reader over a byte slice.
struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Rd<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Rd { buf, pos: 0, what }
    }

    fn bytes(&mut self, n: usize) -> ProtoResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(ProtoError::Truncated {
                what: self.what,
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> ProtoResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> ProtoResult<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> ProtoResult<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> ProtoResult<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn finish(&self) -> ProtoResult<()> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            extra => Err(ProtoError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

/// Decode a protocol string: UTF-8, no NUL, at most [`STRING_MAX_BYTES`].
///
/// # Errors
/// [`ProtoError::TooLong`] or [`ProtoError::BadString`].
pub fn parse_string(bytes: &[u8], what: &'static str) -> ProtoResult<String> {
    if bytes.len() > STRING_MAX_BYTES {
        return Err(ProtoError::TooLong {
            what,
            len: bytes.len() as u64,
            max: STRING_MAX_BYTES as u64,
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_string()),
        _ => Err(ProtoError::BadString { what }),
    }
}

/// The longest prefix of `s` that fits `max` bytes and ends on a character boundary.
#[must_use]
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn len_u32(n: usize) -> u32 {
    // Every caller bounds `n` well below 4 GiB; saturate rather than wrap if one ever did not.
    u32::try_from(n).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Greeting and client flags.

/// The server's fixed-newstyle greeting, offering `NBD_FLAG_NO_ZEROES`.
#[must_use]
pub fn encode_greeting() -> [u8; GREETING_BYTES] {
    let mut b = [0u8; GREETING_BYTES];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Parse a server greeting (client side); returns the handshake flags.
///
/// # Errors
/// [`ProtoError::Truncated`] or [`ProtoError::BadMagic`] (including oldstyle servers).
pub fn parse_greeting(b: &[u8]) -> ProtoResult<u16> {
    let mut r = Rd::new(b, "greeting");
    let m = r.u64()?;
    if m != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: m,
        });
    }
    let m = r.u64()?;
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: m,
        });
    }
    r.u16()
}

/// The client flags, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Decode the 32-bit client flags.
    ///
    /// # Errors
    /// [`ProtoError::UnknownClientFlags`] when a bit other than the two known ones is set; the
    /// server must then drop the connection.
    pub fn parse(raw: u32) -> ProtoResult<Self> {
        if raw & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ProtoError::UnknownClientFlags(raw));
        }
        Ok(ClientFlags {
            fixed_newstyle: raw & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: raw & FLAG_C_NO_ZEROES != 0,
        })
    }

    /// Encode as the 32-bit wire value.
    #[must_use]
    pub fn encode(self) -> u32 {
        let mut v = 0;
        if self.fixed_newstyle {
            v |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            v |= FLAG_C_NO_ZEROES;
        }
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Options.

/// A client option header; `length` bytes of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`OPT_*`).
    pub option: u32,
    /// Length of the option data.
    pub length: u32,
}

impl OptionHeader {
    /// Parse the first [`OPTION_HEADER_BYTES`] of `b`.
    ///
    /// # Errors
    /// [`ProtoError::Truncated`] or [`ProtoError::BadMagic`].
    pub fn parse(b: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(b, "option header");
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option header",
                found: m,
            });
        }
        Ok(OptionHeader {
            option: r.u32()?,
            length: r.u32()?,
        })
    }

    /// Encode the header.
    #[must_use]
    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut b = [0u8; OPTION_HEADER_BYTES];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Encode a whole client option (header and data).
#[must_use]
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
    v.extend_from_slice(
        &OptionHeader {
            option,
            length: len_u32(data.len()),
        }
        .encode(),
    );
    v.extend_from_slice(data);
    v
}

/// An option reply header; `length` bytes of reply data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply: u32,
    /// Length of the reply data.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Parse the first [`OPTION_REPLY_HEADER_BYTES`] of `b`.
    ///
    /// # Errors
    /// [`ProtoError::Truncated`] or [`ProtoError::BadMagic`].
    pub fn parse(b: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(b, "option reply");
        let m = r.u64()?;
        if m != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                found: m,
            });
        }
        Ok(OptionReplyHeader {
            option: r.u32()?,
            reply: r.u32()?,
            length: r.u32()?,
        })
    }

    /// Whether the reply type is an error.
    #[must_use]
    pub fn is_error(&self) -> bool {
        self.reply & REP_FLAG_ERROR != 0
    }
}

/// Encode a whole option reply (header and data).
#[must_use]
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_REPLY_HEADER_BYTES + data.len());
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and (unless the client set
/// `NBD_FLAG_C_NO_ZEROES`) 124 zero bytes.
#[must_use]
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let pad = if no_zeroes {
        0
    } else {
        EXPORT_NAME_PADDING_BYTES
    };
    let mut v = Vec::with_capacity(10 + pad);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.resize(10 + pad, 0);
    v
}

/// Data of an `NBD_REP_SERVER` reply: the name length, then the name.
#[must_use]
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let name = truncate_str(name, STRING_MAX_BYTES);
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Parse the data of an `NBD_REP_SERVER` reply; returns the name (details are ignored).
///
/// # Errors
/// [`ProtoError::Truncated`], [`ProtoError::TooLong`] or [`ProtoError::BadString`].
pub fn parse_rep_server(data: &[u8]) -> ProtoResult<String> {
    let mut r = Rd::new(data, "server reply");
    let n = r.u32()? as usize;
    parse_string(r.bytes(n)?, "export name")
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name; empty selects the default export.
    pub name: String,
    /// Information types requested (`INFO_*`), in the client's order.
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// Parse the option data; the whole of `data` must be consumed.
    ///
    /// # Errors
    /// [`ProtoError`] on truncation, trailing bytes, or a bad name.
    pub fn parse(data: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(data, "info request");
        let n = r.u32()? as usize;
        if n > STRING_MAX_BYTES {
            return Err(ProtoError::TooLong {
                what: "export name",
                len: n as u64,
                max: STRING_MAX_BYTES as u64,
            });
        }
        let name = parse_string(r.bytes(n)?, "export name")?;
        let count = usize::from(r.u16()?);
        // Bounded by the option data length before anything is allocated.
        let raw = r.bytes(count.saturating_mul(2))?;
        r.finish()?;
        let infos = raw
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(InfoRequest { name, infos })
    }

    /// Encode as option data.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let name = truncate_str(&self.name, STRING_MAX_BYTES);
        let infos = &self.infos[..self.infos.len().min(usize::from(u16::MAX))];
        let mut v = Vec::with_capacity(4 + name.len() + 2 + 2 * infos.len());
        v.extend_from_slice(&len_u32(name.len()).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&u16::try_from(infos.len()).unwrap_or(u16::MAX).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }
}

/// One information item of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`: canonical name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`: description.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`: block size constraints.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// An information type this implementation does not know.
    Unknown(u16),
}

impl Info {
    /// Encode as the data of an `NBD_REP_INFO` reply (strings are truncated to
    /// [`STRING_MAX_BYTES`]).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Info::Export { size, flags } => {
                v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                v.extend_from_slice(&size.to_be_bytes());
                v.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) | Info::Description(s) => {
                let t = if matches!(self, Info::Name(_)) {
                    INFO_NAME
                } else {
                    INFO_DESCRIPTION
                };
                v.extend_from_slice(&t.to_be_bytes());
                v.extend_from_slice(truncate_str(s, STRING_MAX_BYTES).as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                v.extend_from_slice(&min.to_be_bytes());
                v.extend_from_slice(&preferred.to_be_bytes());
                v.extend_from_slice(&max.to_be_bytes());
            }
            Info::Unknown(t) => v.extend_from_slice(&t.to_be_bytes()),
        }
        v
    }

    /// Parse the data of an `NBD_REP_INFO` reply.
    ///
    /// # Errors
    /// [`ProtoError`] on truncation, trailing bytes or a bad string.
    pub fn parse(data: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(data, "info reply");
        let info = match r.u16()? {
            INFO_EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            INFO_NAME => Info::Name(parse_string(r.rest(), "info name")?),
            INFO_DESCRIPTION => Info::Description(parse_string(r.rest(), "info description")?),
            INFO_BLOCK_SIZE => Info::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            other => {
                r.rest();
                Info::Unknown(other)
            }
        };
        r.finish()?;
        Ok(info)
    }
}

/// Transmission flags for an export.
#[must_use]
pub fn transmission_flags(read_only: bool, multi_conn: bool) -> u16 {
    let mut f =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    if read_only {
        f |= FLAG_READ_ONLY;
    }
    if multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Block size constraints to advertise, made valid whatever the export asked for: the minimum
/// a power of two from 1 to [`MIN_BLOCK_MAX_BYTES`], the preferred a power of two between the
/// minimum and the maximum, and the maximum `max_payload` rounded down to a multiple of the
/// minimum. Returns `(min, preferred, max)`.
#[must_use]
pub fn block_sizes(min: u32, preferred: u32, max_payload: u32) -> (u32, u32, u32) {
    let min = min.clamp(1, MIN_BLOCK_MAX_BYTES).next_power_of_two();
    let max = (max_payload / min).max(1) * min;
    let preferred = preferred
        .clamp(1, 1 << 30)
        .next_power_of_two()
        .clamp(min, max.max(min));
    (min, preferred, max)
}

// ---------------------------------------------------------------------------------------------
// Transmission requests.

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// `NBD_CMD_RESIZE`.
    Resize,
    /// Any other value.
    Unknown(u16),
}

impl Command {
    /// Decode a command type.
    #[must_use]
    pub fn from_u16(v: u16) -> Self {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            CMD_RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    /// Encode as the command type.
    #[must_use]
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Resize => CMD_RESIZE,
            Command::Unknown(v) => v,
        }
    }
}

/// A transmission request header (a write's payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque cookie ("handle") echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Parse the first [`REQUEST_HEADER_BYTES`] of `b`.
    ///
    /// # Errors
    /// [`ProtoError::Truncated`] or [`ProtoError::BadMagic`] (the server then drops the
    /// connection: it cannot find the next request).
    pub fn parse(b: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(b, "request");
        let m = r.u32()?;
        if m != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                found: u64::from(m),
            });
        }
        Ok(Request {
            flags: r.u16()?,
            command: Command::from_u16(r.u16()?),
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    /// Encode the header.
    #[must_use]
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// What a server knows about an export when it checks a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Whether writes, trims and zeroing are refused.
    pub read_only: bool,
    /// Required alignment of offsets and lengths (a power of two; 1 means none).
    pub min_block: u32,
    /// Largest read or write payload.
    pub max_payload: u32,
}

/// Why a request is refused: the error value to send and a message for the human.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    /// Error value (`EINVAL`, `EPERM`, ...).
    pub errno: u32,
    /// Human-readable reason.
    pub message: &'static str,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (error {})", self.message, self.errno)
    }
}

const fn reject(errno: u32, message: &'static str) -> Reject {
    Reject { errno, message }
}

/// Check a request against an export before doing anything with it.
///
/// Order: unsupported command or flag (`EINVAL`), modification of a read-only export
/// (`EPERM`), payload over the limit (`EOVERFLOW`), `offset + length` overflowing 64 bits
/// (`EOVERFLOW`), range past the end (`ENOSPC` for writes and zeroing, `EINVAL` otherwise),
/// misalignment (`EINVAL`). `NBD_CMD_DISC` is never refused.
///
/// # Errors
/// The [`Reject`] to send back.
pub fn check_request(req: &Request, lim: &ExportLimits) -> std::result::Result<(), Reject> {
    let allowed = match req.command {
        Command::Disc => return Ok(()),
        Command::Read | Command::Write | Command::Flush | Command::Trim => CMD_FLAG_FUA,
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        Command::Cache | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
            return Err(reject(EINVAL, "unsupported command"))
        }
    };
    if req.flags & !allowed != 0 {
        return Err(reject(EINVAL, "unsupported command flags"));
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && lim.read_only {
        return Err(reject(EPERM, "export is read-only"));
    }
    if req.command == Command::Flush {
        // Offset and length are reserved; tolerate clients that fill them in.
        return Ok(());
    }
    if matches!(req.command, Command::Read | Command::Write) && req.length > lim.max_payload {
        return Err(reject(EOVERFLOW, "length exceeds the maximum payload"));
    }
    let Some(end) = req.offset.checked_add(u64::from(req.length)) else {
        return Err(reject(EOVERFLOW, "offset + length overflows"));
    };
    if end > lim.size {
        return Err(match req.command {
            Command::Write | Command::WriteZeroes => reject(ENOSPC, "range past the end of export"),
            _ => reject(EINVAL, "range past the end of export"),
        });
    }
    let align = u64::from(lim.min_block.max(1));
    if align > 1 && (req.offset % align != 0 || u64::from(req.length) % align != 0) {
        return Err(reject(
            EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    Ok(())
}

/// The NBD error value for a library error.
#[must_use]
pub fn errno_for(err: &crate::Error) -> u32 {
    use rustix::io::Errno;
    match err {
        crate::Error::Io { source, .. } => match Errno::from_io_error(source) {
            Some(e) if e == Errno::PERM || e == Errno::ACCESS || e == Errno::ROFS => EPERM,
            Some(e) if e == Errno::NOSPC || e == Errno::DQUOT || e == Errno::FBIG => ENOSPC,
            Some(e) if e == Errno::INVAL => EINVAL,
            Some(e) if e == Errno::OVERFLOW => EOVERFLOW,
            Some(e) if e == Errno::NOMEM => ENOMEM,
            Some(e) if e == Errno::NOTSUP || e == Errno::OPNOTSUPP => ENOTSUP,
            _ => match source.kind() {
                std::io::ErrorKind::PermissionDenied => EPERM,
                std::io::ErrorKind::InvalidInput => EINVAL,
                std::io::ErrorKind::Unsupported => ENOTSUP,
                std::io::ErrorKind::OutOfMemory => ENOMEM,
                _ => EIO,
            },
        },
        crate::Error::OutOfRange { .. } | crate::Error::Misaligned { .. } => EINVAL,
        crate::Error::Invalid { .. } => EINVAL,
        _ => EIO,
    }
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// A simple reply header (a successful read's data follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error value, 0 for success.
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

impl SimpleReply {
    /// Parse the first [`SIMPLE_REPLY_HEADER_BYTES`] of `b`.
    ///
    /// # Errors
    /// [`ProtoError::Truncated`] or [`ProtoError::BadMagic`].
    pub fn parse(b: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(b, "simple reply");
        let m = r.u32()?;
        if m != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "simple reply",
                found: u64::from(m),
            });
        }
        Ok(SimpleReply {
            error: r.u32()?,
            cookie: r.u64()?,
        })
    }

    /// Encode the header.
    #[must_use]
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
        let mut b = [0u8; SIMPLE_REPLY_HEADER_BYTES];
        b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// A structured reply chunk header; `length` bytes of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Parse the first [`STRUCTURED_REPLY_HEADER_BYTES`] of `b`.
    ///
    /// # Errors
    /// [`ProtoError::Truncated`] or [`ProtoError::BadMagic`].
    pub fn parse(b: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(b, "structured reply");
        let m = r.u32()?;
        if m != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "structured reply",
                found: u64::from(m),
            });
        }
        Ok(ChunkHeader {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?,
        })
    }

    /// Encode the header.
    #[must_use]
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_HEADER_BYTES] {
        let mut b = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Whether this is the last chunk of its reply.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
#[must_use]
pub fn encode_none_chunk(cookie: u64) -> [u8; STRUCTURED_REPLY_HEADER_BYTES] {
    ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_NONE,
        cookie,
        length: 0,
    }
    .encode()
}

/// The prefix (chunk header and offset) of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying
/// `data_len` bytes; `data_len` must be at most `u32::MAX - 8` (the caller's payload limit
/// guarantees it).
#[must_use]
pub fn encode_offset_data_prefix(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> [u8; OFFSET_DATA_PREFIX_BYTES] {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let length = data_len.saturating_add(8);
    let mut b = [0u8; OFFSET_DATA_PREFIX_BYTES];
    b[..STRUCTURED_REPLY_HEADER_BYTES].copy_from_slice(
        &ChunkHeader {
            flags,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie,
            length,
        }
        .encode(),
    );
    b[STRUCTURED_REPLY_HEADER_BYTES..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// The payload of an error chunk, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// Error value (non-zero).
    pub errno: u32,
    /// Message for a human.
    pub message: String,
    /// Offset of the failure (`NBD_REPLY_TYPE_ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// Encode as a whole chunk (header and payload) with the `DONE` flag: type
    /// `NBD_REPLY_TYPE_ERROR_OFFSET` when `offset` is set, `NBD_REPLY_TYPE_ERROR` otherwise.
    /// The message is truncated to [`STRING_MAX_BYTES`].
    #[must_use]
    pub fn encode(&self, cookie: u64) -> Vec<u8> {
        let msg = truncate_str(&self.message, STRING_MAX_BYTES);
        let payload_len = 6 + msg.len() + if self.offset.is_some() { 8 } else { 0 };
        let kind = if self.offset.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        };
        let header = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind,
            cookie,
            length: len_u32(payload_len),
        };
        let mut v = Vec::with_capacity(STRUCTURED_REPLY_HEADER_BYTES + payload_len);
        v.extend_from_slice(&header.encode());
        v.extend_from_slice(&self.errno.to_be_bytes());
        v.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
        v.extend_from_slice(msg.as_bytes());
        if let Some(o) = self.offset {
            v.extend_from_slice(&o.to_be_bytes());
        }
        v
    }

    /// Parse the payload of a chunk of type `kind` (`NBD_REPLY_TYPE_ERROR` or
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`).
    ///
    /// # Errors
    /// [`ProtoError`] on truncation, trailing bytes or a bad message.
    pub fn parse(kind: u16, payload: &[u8]) -> ProtoResult<Self> {
        let mut r = Rd::new(payload, "error chunk");
        let errno = r.u32()?;
        let n = usize::from(r.u16()?);
        let message = parse_string(r.bytes(n)?, "error message")?;
        let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
            Some(r.u64()?)
        } else {
            None
        };
        r.finish()?;
        Ok(ErrorChunk {
            errno,
            message,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
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
}
