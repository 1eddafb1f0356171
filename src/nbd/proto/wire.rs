//! Low-level encoding and decoding shared by every message: the parse error type, a
//! bounds-checked big-endian reader, and protocol strings.

use super::consts::STRING_MAX_BYTES;

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

/// Result of a parser of the wire format.
pub type ProtoResult<T> = std::result::Result<T, ProtoError>;

/// A bounds-checked big-endian reader over a byte slice.
pub(super) struct Rd<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Rd<'a> {
    pub(super) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Rd { buf, pos: 0, what }
    }

    pub(super) fn bytes(&mut self, n: usize) -> ProtoResult<&'a [u8]> {
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

    pub(super) fn array<const N: usize>(&mut self) -> ProtoResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(super) fn u16(&mut self) -> ProtoResult<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self) -> ProtoResult<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self) -> ProtoResult<u64> {
        self.array().map(u64::from_be_bytes)
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub(super) fn finish(&self) -> ProtoResult<()> {
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

/// `n` as a wire length field.
pub(super) fn len_u32(n: usize) -> u32 {
    // Every caller bounds `n` well below 4 GiB; saturate rather than wrap if one ever did not.
    u32::try_from(n).unwrap_or(u32::MAX)
}
