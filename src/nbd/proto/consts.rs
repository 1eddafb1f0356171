//! Wire constants: magic numbers, fixed sizes and bounds, handshake and transmission flags,
//! option, reply, information and command codes, and the protocol's error values.

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
