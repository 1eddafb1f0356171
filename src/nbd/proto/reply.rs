//! Replies to transmission requests: simple replies and structured reply chunks (`NONE`,
//! `OFFSET_DATA`, errors).

use super::consts::*;
use super::wire::{len_u32, parse_string, truncate_str, ProtoError, ProtoResult, Rd};

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
