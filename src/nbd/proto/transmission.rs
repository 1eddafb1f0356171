//! Transmission requests: the request header, commands, and the checks a request must pass
//! against its export before it is executed.

use std::fmt;

use super::consts::*;
use super::wire::{ProtoError, ProtoResult, Rd};

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
    if align > 1 && (!req.offset.is_multiple_of(align) || u64::from(req.length) % align != 0) {
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
        crate::Error::Io { source, .. } | crate::Error::PoisonedIo { source, .. } => {
            match Errno::from_io_error(source) {
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
            }
        }
        crate::Error::OutOfRange { .. } | crate::Error::Misaligned { .. } => EINVAL,
        crate::Error::Invalid { .. } => EINVAL,
        _ => EIO,
    }
}
