//! `timezero mount`: hold a table (as `serve` does: the control socket answers the other
//! commands, and NBD can serve the same exports from this process) and show its source volumes
//! and session images as files over FUSE until `timezero umount`, `timezero stop`, SIGTERM or
//! SIGINT; `timezero umount`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{open_server, Fail, IoFlags};
use crate::nbd::ExportRegistry as _;
use crate::Error;

/// How often the holding process looks at its stop conditions (a signal, the file system gone).
const POLL: Duration = Duration::from_millis(50);

pub(super) fn mount(
    table: &Path,
    mountpoint: &Path,
    writable_images: bool,
    nbd_socket: Option<PathBuf>,
    io: IoFlags,
) -> std::result::Result<(), Fail> {
    // A mount point that cannot take the mount is refused before the table is touched.
    crate::mount::check_mountpoint(mountpoint).map_err(|e| Fail::Message(e.to_string()))?;
    let table_abs = std::fs::canonicalize(table)
        .map_err(|e| Error::io("resolve", table.display().to_string(), 0, e))?;
    let e = Arc::new(open_server(table, io)?);
    let registry = Arc::new(crate::nbd::EngineRegistry::new(e.clone(), writable_images));
    let nbd = match &nbd_socket {
        Some(sock) => {
            let _ = std::fs::remove_file(sock);
            let server =
                crate::nbd::NbdServer::new(registry.clone(), crate::nbd::NbdConfig::default());
            Some(server.serve_unix(sock)?)
        }
        None => None,
    };
    // SIGINT or SIGTERM: unmount and end; a second one ends the process at once.
    let stop = super::interrupt_flag()?;
    let ctl_path = crate::control::socket_path(table);
    let control = crate::control::ControlServer::start(e.clone(), &ctl_path, table)?;
    let fuse = crate::mount::mount_exports(registry.clone(), mountpoint, &table_abs)?;

    let mut o = std::io::stdout().lock();
    let _ = writeln!(
        o,
        "mounted {} at {} (backend {}{}, {})",
        table.display(),
        fuse.mountpoint().display(),
        e.backend_name(),
        if e.direct() { ", O_DIRECT" } else { "" },
        super::serve::write_mode(&e)
    );
    let _ = writeln!(o, "files: {}", registry.list().join(", "));
    if let Some(sock) = &nbd_socket {
        let _ = writeln!(o, "serving NBD on {}", sock.display());
    }
    let _ = writeln!(o, "control socket {}", ctl_path.display());
    let _ = o.flush();
    drop(o);

    // The control server ends on `timezero stop`; a signal or the end of the file system
    // (`timezero umount`) asks it to end the same way.
    let control_done = Arc::new(AtomicBool::new(false));
    let done = control_done.clone();
    let waiter = std::thread::Builder::new()
        .name("tz-mount-control".into())
        .spawn(move || {
            control.wait_shutdown();
            done.store(true, Ordering::Release);
        })
        .map_err(|er| Error::io("spawn", "control", 0, er))?;
    let mut asked = false;
    while !control_done.load(Ordering::Acquire) {
        if !asked && (stop.load(Ordering::Acquire) || fuse.ended()) {
            asked = true;
            let _ = crate::control::shutdown(&ctl_path);
        }
        std::thread::sleep(POLL);
    }
    let _ = waiter.join();
    if let Some(n) = nbd {
        n.shutdown();
    }
    if fuse.unmount_or_detach()? {
        eprintln!(
            "timezero: {} was busy: detached it and served it until its last user let go",
            mountpoint.display()
        );
    }
    Ok(())
}

/// `timezero umount MOUNTPOINT`.
pub(super) fn umount(mountpoint: &Path) -> std::result::Result<String, Fail> {
    match crate::mount::unmount_path(mountpoint) {
        Ok(table) => Ok(format!(
            "unmounted {} (table {} released)\n",
            mountpoint.display(),
            table.display()
        )),
        Err(Error::Io { ref source, .. })
            if source.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) =>
        {
            Err(Fail::Message(format!(
                "{} is busy: a loop device or an open file uses one of its files (detach it with \
                 `losetup -d`, close the file, then try again)",
                mountpoint.display()
            )))
        }
        Err(er) => Err(Fail::Run(er)),
    }
}
