//! `timezero serve`: hold a table, export its volumes and images over NBD, answer the control
//! socket, stop cleanly on SIGTERM or `timezero stop`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{open, Fail, IoFlags};
use crate::command::volume_id;
use crate::engine::RestartPolicy;
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
    use crate::nbd::{EngineRegistry, NbdServer};
    let e = Arc::new(open(table, RestartPolicy::Resume, io)?);
    for v in volumes {
        volume_id(&e, v)?;
    }
    let registry = Arc::new(EngineRegistry::new(e.clone(), writable_images));
    let server = NbdServer::new(registry.clone(), config);
    let sock = socket.unwrap_or_else(|| {
        let mut p = table.as_os_str().to_owned();
        p.push(".nbd");
        PathBuf::from(p)
    });
    let _ = std::fs::remove_file(&sock);
    let unix = server.serve_unix(&sock)?;
    let tcp = listen.map(|a| server.serve_tcp(a.as_str())).transpose()?;
    let control = crate::control::ControlServer::start(
        e.clone(),
        &crate::control::socket_path(table),
        table,
    )?;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(
        o,
        "serving {} on {} (backend {}{})",
        table.display(),
        sock.display(),
        e.backend_name(),
        if e.direct() { ", O_DIRECT" } else { "" }
    );
    if let Some(t) = &tcp {
        if let Some(a) = t.tcp_addr() {
            let _ = writeln!(o, "serving on tcp {a}");
        }
    }
    let _ = writeln!(
        o,
        "exports: {}",
        crate::nbd::ExportRegistry::list(registry.as_ref()).join(", ")
    );
    let _ = writeln!(
        o,
        "control socket {}",
        crate::control::socket_path(table).display()
    );
    let _ = o.flush();
    drop(o);
    control.wait_shutdown();
    unix.shutdown();
    if let Some(t) = tcp {
        t.shutdown();
    }
    Ok(())
}
