//! The NBD wire format: constants, and pure parsing and encoding of the handshake, option
//! haggling, transmission requests and replies.
//!
//! Nothing here performs I/O or allocates more than the bytes it was handed (or a bounded
//! constant), so every parser can be fed arbitrary bytes; the property tests do exactly that.
//! All integers on the wire are big-endian.
//!
//! Layout, in the order a connection meets them:
//!
//! - `consts`: magic numbers, sizes and bounds, flags, option / reply / command codes and
//!   error values.
//! - `wire`: what every message shares: [`ProtoError`], the bounds-checked reader, protocol
//!   strings ([`parse_string`], [`truncate_str`]).
//! - `handshake`: option haggling: greeting, [`ClientFlags`], [`OptionHeader`] and option
//!   replies, [`InfoRequest`] / [`Info`], and what is advertised about an export
//!   ([`transmission_flags`], [`block_sizes`]).
//! - `transmission`: the [`Request`] header, [`Command`], and [`check_request`] with the
//!   [`Reject`] it returns; [`errno_for`] maps a library error to an NBD error value.
//! - `reply`: [`SimpleReply`], structured reply chunks ([`ChunkHeader`], [`ErrorChunk`]).
//!
//! Everything is re-exported here, so callers name items as `proto::X`.

mod consts;
mod handshake;
mod reply;
#[cfg(test)]
mod tests;
mod transmission;
mod wire;

pub use consts::*;
pub use handshake::{
    block_sizes, encode_export_name_reply, encode_greeting, encode_option, encode_option_reply,
    encode_rep_server, parse_greeting, parse_rep_server, transmission_flags, ClientFlags, Info,
    InfoRequest, OptionHeader, OptionReplyHeader,
};
pub use reply::{
    encode_none_chunk, encode_offset_data_prefix, ChunkHeader, ErrorChunk, SimpleReply,
};
pub use transmission::{check_request, errno_for, Command, ExportLimits, Reject, Request};
pub use wire::{parse_string, truncate_str, ProtoError, ProtoResult};
