//! An NBD (Network Block Device) server, so ordinary clients (`qemu-img`, `qemu-io`,
//! `nbd-client`, libnbd) can read and write exports over a unix socket or loopback TCP.
//!
//! The server does not depend on the rest of the engine: it serves anything implementing
//! [`NbdExport`], looked up by name in an [`ExportRegistry`]. [`StaticRegistry`] and
//! [`VolumeExport`] (any [`crate::volume::Volume`]) cover simple cases and tests.
//!
//! Protocol (see the NBD protocol specification, `doc/proto.md` of the reference
//! implementation): fixed newstyle handshake honouring `NBD_FLAG_C_NO_ZEROES`; options
//! `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT`, `NAME`,
//! `DESCRIPTION`, `BLOCK_SIZE`) and `STRUCTURED_REPLY`, every other option gets
//! `NBD_REP_ERR_UNSUP`; commands `READ`, `WRITE` (FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES`,
//! `DISC`. With structured replies negotiated, reads are answered with one
//! `NBD_REPLY_TYPE_OFFSET_DATA` chunk or an error chunk, always flagged `DONE`.
//!
//! Many requests may be in flight per connection; a small worker pool executes them and
//! replies may arrive out of order. Hostile input gets an NBD error reply (`EINVAL`, `EPERM`,
//! `ENOSPC`, `EOVERFLOW`, `EIO`) or a closed connection, and nothing is allocated from a
//! client-supplied size beyond the configured limits ([`NbdConfig`]). TCP listeners are
//! limited to loopback unless [`NbdConfig::allow_remote`] is set: NBD has no authentication.
//!
//! Layout:
//!
//! - [`proto`] (`proto/`): the wire format as pure functions, usable by clients and fuzzers:
//!   constants, shared encoding helpers, option haggling, transmission requests, replies.
//! - `server/`: the wire format over sockets: listeners, limits and the accept loop; the
//!   handshake; the transmission pipeline of one connection.
//! - `export.rs` and `engine_export.rs`: what is served ([`NbdExport`], registries).
//! - `fuzz.rs` (feature `fault`): the `nbd_request` fuzz check, re-exported as
//!   `fault::fuzzing::check_nbd`.

mod engine_export;
mod export;
#[cfg(feature = "fault")]
pub(crate) mod fuzz;
pub mod proto;
mod server;
#[cfg(test)]
mod tests;

pub use engine_export::EngineRegistry;
pub use export::{ExportRegistry, NbdExport, StaticRegistry, VolumeExport, ZERO_CHUNK_BYTES};
pub use server::{
    ListenAddr, NbdConfig, NbdServer, ServerHandle, CONNECTIONS_MAX, CONNECTIONS_PER_EXPORT_MAX,
    HANDSHAKE_MAX_OPTIONS, HANDSHAKE_TIMEOUT_SECS, IDLE_TIMEOUT_SECS, IN_FLIGHT_MAX_BYTES,
    IN_FLIGHT_MAX_REQUESTS, PAYLOAD_CEILING_BYTES, PAYLOAD_MAX_BYTES, REFUSALS_MAX,
    REFUSAL_TIMEOUT_SECS, REMOTE_ADDRESS_REFUSED, WORKERS_PER_CONNECTION,
};
