//! Option haggling: the server greeting, client flags, option requests and replies, the
//! information items of `NBD_OPT_INFO` / `NBD_OPT_GO`, and what the server advertises about an
//! export (transmission flags, block sizes).

use super::consts::*;
use super::wire::{len_u32, parse_string, truncate_str, ProtoError, ProtoResult, Rd};

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
