//! `timezero serve`: hold a table, export its volumes and images over NBD, answer the control
//! socket, stop cleanly on SIGTERM or `timezero stop`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{open_server, Fail, IoFlags};
use crate::command::volume_id;
use crate::Result;

/// `serve --listen`: a non-loopback address needs `--allow-remote`.
pub(super) fn check_listen(addr: &str, allow_remote: bool) -> std::result::Result<(), Fail> {
    use std::net::ToSocketAddrs as _;
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|er| Fail::Usage(format!("--listen {addr}: {er}")))?
        .collect();
    if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(Fail::Usage(format!(
            "--listen {addr} is not a loopback address; pass --allow-remote to listen on it \
             (NBD has no authentication)"
        )));
    }
    Ok(())
}

pub(super) fn serve(
    table: &Path,
    socket: Option<PathBuf>,
    listen: Option<String>,
    writable_images: bool,
    volumes: &[PathBuf],
    config: crate::nbd::NbdConfig,
    io: IoFlags,
) -> Result<()> {
    let e = Arc::new(open_server(table, io)?);
    for v in volumes {
        volume_id(&e, v)?;
    }
    let served = Served::start(
        e,
        table,
        &Exports {
            socket,
            listen,
            writable_images,
            config,
            nbd: true,
        },
    )?;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(served.describe().as_bytes());
    let _ = o.flush();
    drop(o);
    served.wait_shutdown();
    Ok(())
}

/// What a held table offers besides the control socket: its NBD exports.
#[derive(Debug, Clone)]
pub(super) struct Exports {
    /// The NBD unix socket (default `TABLE.nbd`).
    pub socket: Option<PathBuf>,
    /// An NBD TCP address to listen on as well.
    pub listen: Option<String>,
    /// Whether image exports are writable.
    pub writable_images: bool,
    /// The NBD server's limits.
    pub config: crate::nbd::NbdConfig,
    /// Whether to export over NBD at all (the control socket is always served).
    pub nbd: bool,
}

/// A table held by this process and served: its NBD exports (when asked for) and its control
/// socket `TABLE.ctl`, so that `timezero establish|status|copy|withdraw|reset TABLE ...` reach
/// it. `timezero serve` holds one; `timezero daemon` one per configured table.
pub(super) struct Served {
    engine: Arc<crate::Engine>,
    table: PathBuf,
    nbd: Option<(PathBuf, crate::nbd::ServerHandle)>,
    tcp: Option<crate::nbd::ServerHandle>,
    exports: Vec<String>,
    control: crate::control::ControlServer,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Served {
    /// Serve `engine` (holding `table`) as `exports` says.
    pub fn start(engine: Arc<crate::Engine>, table: &Path, exports: &Exports) -> Result<Served> {
        use crate::nbd::{EngineRegistry, NbdServer};
        let (nbd, tcp, names) = if exports.nbd {
            let registry = Arc::new(EngineRegistry::new(engine.clone(), exports.writable_images));
            let server = NbdServer::new(registry.clone(), exports.config.clone());
            let sock = exports.socket.clone().unwrap_or_else(|| {
                let mut p = table.as_os_str().to_owned();
                p.push(".nbd");
                PathBuf::from(p)
            });
            let _ = std::fs::remove_file(&sock);
            let unix = server.serve_unix(&sock)?;
            let tcp = exports
                .listen
                .as_ref()
                .map(|a| server.serve_tcp(a.as_str()))
                .transpose()?;
            let names = crate::nbd::ExportRegistry::list(registry.as_ref());
            (Some((sock, unix)), tcp, names)
        } else {
            (None, None, Vec::new())
        };
        let control = crate::control::ControlServer::start(
            engine.clone(),
            &crate::control::socket_path(table),
            table,
        )?;
        Ok(Served {
            engine,
            table: table.to_path_buf(),
            nbd,
            tcp,
            exports: names,
            control,
        })
    }

    /// What is served where, one line each.
    pub fn describe(&self) -> String {
        let e = &self.engine;
        let mut s = String::new();
        match &self.nbd {
            Some((sock, _)) => {
                s += &format!(
                    "serving {} on {} (backend {}{}, {})\n",
                    self.table.display(),
                    sock.display(),
                    e.backend_name(),
                    if e.direct() { ", O_DIRECT" } else { "" },
                    write_mode(e)
                );
                if let Some(a) = self.tcp.as_ref().and_then(|t| t.tcp_addr()) {
                    s += &format!("serving on tcp {a}\n");
                }
                s += &format!("exports: {}\n", self.exports.join(", "));
            }
            None => {
                s += &format!(
                    "holding {} (backend {}{}, {}, no NBD exports)\n",
                    self.table.display(),
                    e.backend_name(),
                    if e.direct() { ", O_DIRECT" } else { "" },
                    write_mode(e)
                );
            }
        }
        s += &format!(
            "control socket {}\n",
            crate::control::socket_path(&self.table).display()
        );
        s
    }

    /// Block until a client asks through the control socket to stop (`timezero stop TABLE`),
    /// then stop serving.
    pub fn wait_shutdown(self) {
        let Served {
            nbd, tcp, control, ..
        } = self;
        control.wait_shutdown();
        stop_nbd(nbd, tcp);
    }

    /// Stop serving now (the daemon stops); the engine stays open while others hold it.
    pub fn shutdown(self) {
        let Served {
            nbd, tcp, control, ..
        } = self;
        drop(control);
        stop_nbd(nbd, tcp);
    }
}

fn stop_nbd(
    nbd: Option<(PathBuf, crate::nbd::ServerHandle)>,
    tcp: Option<crate::nbd::ServerHandle>,
) {
    if let Some((_, unix)) = nbd {
        unix.shutdown();
    }
    if let Some(t) = tcp {
        t.shutdown();
    }
}

/// How the server acknowledges writes, for its start-up lines.
pub(super) fn write_mode(e: &crate::Engine) -> &'static str {
    if e.write_back() {
        "write-back: writes durable at the client's flush"
    } else {
        "write-through"
    }
}
