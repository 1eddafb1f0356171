//! Option haggling: greet the client, answer its options, and settle on an export (or refuse
//! a client over the connection limit).

use std::io::{self, Read, Write};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{ExportClaim, ExportCounts, NbdConfig, HANDSHAKE_MAX_OPTIONS};
use crate::nbd::export::{ExportRegistry, NbdExport};
use crate::nbd::proto::{
    self, block_sizes, encode_export_name_reply, encode_option_reply, encode_rep_server,
    parse_string, transmission_flags, ClientFlags, Info, InfoRequest, OptionHeader,
    INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_NAME, OPTION_DATA_MAX_BYTES, OPTION_HEADER_BYTES,
    STRING_MAX_BYTES,
};

/// The outcome of a successful handshake.
pub(super) struct Negotiated {
    /// The export chosen.
    pub(super) export: Arc<dyn NbdExport>,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` was granted.
    pub(super) structured: bool,
    /// Whether the export was read-only when it was chosen.
    pub(super) read_only: bool,
    /// The minimum block size advertised (requests must be aligned to it).
    pub(super) min_block: u32,
    /// This connection's place in its export's count.
    _claim: ExportClaim,
}

/// Write one whole handshake message.
fn send<W: Write>(w: &Mutex<W>, bytes: &[u8]) -> io::Result<()> {
    let mut g = w.lock();
    g.write_all(bytes)?;
    g.flush()
}

/// Answers one option with a reply type and its data.
type Reply<'a> = dyn Fn(u32, &[u8]) -> io::Result<()> + 'a;

/// Send the greeting and read the client's flags; `None` for a client this server cannot talk
/// to (unknown flags, or not fixed newstyle: this server speaks nothing else).
fn greet<R: Read, W: Write>(r: &mut R, w: &Mutex<W>) -> io::Result<Option<ClientFlags>> {
    send(w, &proto::encode_greeting())?;
    let mut raw = [0u8; 4];
    r.read_exact(&mut raw)?;
    Ok(match ClientFlags::parse(u32::from_be_bytes(raw)) {
        Ok(f) if f.fixed_newstyle => Some(f),
        _ => None,
    })
}

/// Read one option; `None` for one that ends the connection (bad magic, too much data).
fn read_option<R: Read>(r: &mut R) -> io::Result<Option<(OptionHeader, Vec<u8>)>> {
    let mut hb = [0u8; OPTION_HEADER_BYTES];
    r.read_exact(&mut hb)?;
    let Ok(h) = OptionHeader::parse(&hb) else {
        return Ok(None);
    };
    if h.length > OPTION_DATA_MAX_BYTES {
        return Ok(None);
    }
    let mut data = vec![0u8; h.length as usize];
    r.read_exact(&mut data)?;
    Ok(Some((h, data)))
}

/// Refuse a client over the connection limit: every option it sends is answered with
/// `NBD_REP_ERR_POLICY` and `why`, until it aborts or leaves.
///
/// `NBD_REP_ERR_POLICY` ("forbidden by server policy") is the reply the protocol has for a
/// request that is valid but that the server will not grant by its own rules, which is what a
/// connection limit is. `NBD_REP_ERR_UNKNOWN` would tell the client the export does not exist,
/// `NBD_REP_ERR_SHUTDOWN` that the server is going away, and `NBD_REP_ERR_TOO_BIG` concerns
/// request sizes; none of them is true here. `NBD_OPT_EXPORT_NAME` has no error reply, so a
/// client using it only sees the connection close.
pub(super) fn refuse<R: Read, W: Write>(r: &mut R, w: &Mutex<W>, why: &str) -> io::Result<()> {
    if greet(r, w)?.is_none() {
        return Ok(());
    }
    for _ in 0..HANDSHAKE_MAX_OPTIONS {
        let Some((h, _)) = read_option(r)? else {
            return Ok(());
        };
        match h.option {
            proto::OPT_EXPORT_NAME => return Ok(()),
            proto::OPT_ABORT => {
                return send(w, &encode_option_reply(h.option, proto::REP_ACK, &[]))
            }
            _ => send(
                w,
                &encode_option_reply(h.option, proto::REP_ERR_POLICY, why.as_bytes()),
            )?,
        }
    }
    Ok(())
}

/// Run the handshake; `Ok(None)` means the connection is to be closed.
pub(super) fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &Mutex<W>,
    registry: &dyn ExportRegistry,
    exports: &Arc<ExportCounts>,
    cfg: &NbdConfig,
) -> io::Result<Option<Negotiated>> {
    // Unknown client flags must end the connection; so does a client that is not fixed
    // newstyle (this server speaks nothing else).
    let Some(client) = greet(r, w)? else {
        return Ok(None);
    };
    let offer = Offer {
        registry,
        exports,
        cfg,
    };
    let mut structured = false;
    for _ in 0..HANDSHAKE_MAX_OPTIONS {
        let Some((h, data)) = read_option(r)? else {
            return Ok(None);
        };
        let reply = |rep: u32, d: &[u8]| send(w, &encode_option_reply(h.option, rep, d));
        match h.option {
            proto::OPT_EXPORT_NAME => {
                let Some((neg, size, flags)) = offer.export_name(&data, structured) else {
                    return Ok(None);
                };
                send(w, &encode_export_name_reply(size, flags, client.no_zeroes))?;
                return Ok(Some(neg));
            }
            proto::OPT_ABORT => {
                let _ = reply(proto::REP_ACK, &[]);
                return Ok(None);
            }
            proto::OPT_LIST => offer.list(&data, &reply)?,
            proto::OPT_STRUCTURED_REPLY => structured_reply(&data, &mut structured, &reply)?,
            proto::OPT_INFO | proto::OPT_GO => {
                let go = h.option == proto::OPT_GO;
                if let Some(neg) = offer.info_or_go(go, &data, structured, &reply)? {
                    return Ok(Some(neg));
                }
            }
            _ => reply(proto::REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Ok(None)
}

/// Answer `NBD_OPT_STRUCTURED_REPLY`, setting `structured` when it is granted.
fn structured_reply(data: &[u8], structured: &mut bool, reply: &Reply<'_>) -> io::Result<()> {
    if !data.is_empty() {
        reply(
            proto::REP_ERR_INVALID,
            b"NBD_OPT_STRUCTURED_REPLY takes no data",
        )
    } else if *structured {
        reply(
            proto::REP_ERR_INVALID,
            b"structured replies already negotiated",
        )
    } else {
        *structured = true;
        reply(proto::REP_ACK, &[])
    }
}

/// What a handshake may offer a client: the exports, how many connections each has, and the
/// configured limits.
struct Offer<'a> {
    registry: &'a dyn ExportRegistry,
    exports: &'a Arc<ExportCounts>,
    cfg: &'a NbdConfig,
}

impl Offer<'_> {
    /// The export called `name` (the default export for an empty name), with its name.
    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn NbdExport>)> {
        let name = if name.is_empty() {
            self.registry.default_name()?
        } else {
            name.to_string()
        };
        let export = self.registry.get(&name)?;
        Some((name, export))
    }

    /// Settle `NBD_OPT_EXPORT_NAME`: the negotiated export with the size and transmission flags
    /// to send, or `None` (an unknown export, a bad name, or one over its connection limit)
    /// when the connection is to be closed, since this option has no error reply.
    fn export_name(&self, data: &[u8], structured: bool) -> Option<(Negotiated, u64, u16)> {
        let name = parse_string(data, "export name").ok()?;
        let (name, export) = self.lookup(&name)?;
        let claim = self
            .exports
            .claim(&name, self.cfg.connections_per_export_max)?;
        let read_only = export.read_only();
        let flags = transmission_flags(read_only, export.multi_conn());
        let (min_block, _, _) = block_sizes(
            export.min_block(),
            export.preferred_block(),
            self.cfg.payload_max_bytes,
        );
        let size = export.size();
        let neg = Negotiated {
            export,
            structured,
            read_only,
            min_block,
            _claim: claim,
        };
        Some((neg, size, flags))
    }

    /// Answer `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export whose name the protocol can carry.
    fn list(&self, data: &[u8], reply: &Reply<'_>) -> io::Result<()> {
        if !data.is_empty() {
            return reply(proto::REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
        }
        for name in self.registry.list() {
            if name.len() <= STRING_MAX_BYTES {
                reply(proto::REP_SERVER, &encode_rep_server(&name))?;
            }
        }
        reply(proto::REP_ACK, &[])
    }

    /// Answer `NBD_OPT_INFO` or `NBD_OPT_GO`; `Some` when a `GO` succeeded.
    fn info_or_go(
        &self,
        go: bool,
        data: &[u8],
        structured: bool,
        reply: &Reply<'_>,
    ) -> io::Result<Option<Negotiated>> {
        let req = match InfoRequest::parse(data) {
            Ok(r) => r,
            Err(e) => {
                reply(proto::REP_ERR_INVALID, e.to_string().as_bytes())?;
                return Ok(None);
            }
        };
        let Some((name, export)) = self.lookup(&req.name) else {
            reply(proto::REP_ERR_UNKNOWN, b"unknown export")?;
            return Ok(None);
        };
        // A GO takes a place in the export's count for the life of the connection. Over the
        // limit the client is refused by policy (see `refuse`) and may ask for another export.
        let claim = if go {
            let max = self.cfg.connections_per_export_max;
            let Some(c) = self.exports.claim(&name, max) else {
                let why = format!("export {name} has {max} connections, the most it allows");
                reply(proto::REP_ERR_POLICY, why.as_bytes())?;
                return Ok(None);
            };
            Some(c)
        } else {
            None
        };
        let Some((read_only, min_block)) = self.describe(&*export, name, &req, go, reply)? else {
            return Ok(None);
        };
        Ok(claim.map(|c| Negotiated {
            export,
            structured,
            read_only,
            min_block,
            _claim: c,
        }))
    }

    /// Send the `NBD_REP_INFO` items `req` asks for (the export's size and flags and its block
    /// sizes always), then `NBD_REP_ACK`. Returns whether the export is read-only and its
    /// minimum block size, or `None` after refusing a `GO` whose client did not ask for the
    /// block sizes of an export that needs aligned requests.
    fn describe(
        &self,
        export: &dyn NbdExport,
        name: String,
        req: &InfoRequest,
        go: bool,
        reply: &Reply<'_>,
    ) -> io::Result<Option<(bool, u32)>> {
        let read_only = export.read_only();
        let flags = transmission_flags(read_only, export.multi_conn());
        let (min, preferred, max) = block_sizes(
            export.min_block(),
            export.preferred_block(),
            self.cfg.payload_max_bytes,
        );
        let block_info = Info::BlockSize {
            min,
            preferred,
            max,
        }
        .encode();
        let wants = |t: u16| req.infos.contains(&t);
        if go && min > 1 && !wants(INFO_BLOCK_SIZE) {
            // The client would not know it must align its requests.
            reply(proto::REP_INFO, &block_info)?;
            reply(
                proto::REP_ERR_BLOCK_SIZE_REQD,
                b"this export requires aligned requests",
            )?;
            return Ok(None);
        }
        reply(
            proto::REP_INFO,
            &Info::Export {
                size: export.size(),
                flags,
            }
            .encode(),
        )?;
        if wants(INFO_NAME) {
            reply(proto::REP_INFO, &Info::Name(name).encode())?;
        }
        if wants(INFO_DESCRIPTION) {
            reply(
                proto::REP_INFO,
                &Info::Description(export.description()).encode(),
            )?;
        }
        reply(proto::REP_INFO, &block_info)?;
        reply(proto::REP_ACK, &[])?;
        Ok(Some((read_only, min)))
    }
}
