//! Running a command here or in the serving process, and the terminal side of it: the bytes a
//! `write` reads from a file, the bytes `read` and `export` write, progress on stderr, Ctrl-C.

use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{open, IoFlags};
use crate::command::Channel;
use crate::command::{execute, Remote};
use crate::engine::RestartPolicy;
use crate::ids::SessionId;
use crate::{Error, Result};

/// The bytes of `write --from FROM [--len LEN]` and their length: a regular file is read as
/// it is sent (LEN defaults to its size and may not exceed it); anything else (a pipe,
/// `/dev/zero`) needs LEN (checked by `check_write_input`) and is read completely first, so a
/// short pipe writes nothing.
pub(super) fn write_input(from: &Path, len: Option<u64>) -> Result<(Box<dyn Read>, u64)> {
    let shown = from.display().to_string();
    // stat, not open: opening a FIFO would block until a writer appears.
    let meta = std::fs::metadata(from).map_err(|er| Error::io("stat", &shown, 0, er))?;
    let regular = meta.is_file();
    let len = match (len, regular) {
        (Some(l), true) if l > meta.len() => {
            return Err(Error::invalid(
                "--len",
                format!("{l} bytes is more than the {} bytes of {shown}", meta.len()),
            ))
        }
        (Some(l), _) => l,
        (None, true) => meta.len(),
        (None, false) => return Err(Error::invalid("--from", not_regular(&shown, &meta))),
    };
    let f = std::fs::File::open(from).map_err(|er| Error::io("open", &shown, 0, er))?;
    if regular {
        return Ok((Box::new(f.take(len)), len));
    }
    let mut all = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(len)
        .read_to_end(&mut all)
        .map_err(|er| Error::io("read", &shown, 0, er))?;
    if (all.len() as u64) < len {
        return Err(Error::invalid(
            "--from",
            format!("{shown} ended after {} of {len} bytes", all.len()),
        ));
    }
    Ok((Box::new(std::io::Cursor::new(all)), len))
}

/// Why a `--from` that is not a regular file needs `--len`.
pub(super) fn not_regular(shown: &str, meta: &std::fs::Metadata) -> String {
    let what = crate::command::file_kind(&meta.file_type());
    format!("{shown} is {what}; give --len (at most 64MiB)")
}

/// Run `cmd` on the table: locally, or through the control socket of the process serving it.
pub(super) fn local_or_remote(
    table: &Path,
    cmd: Remote,
    io: IoFlags,
    ch: &mut Local,
) -> Result<String> {
    let sock = crate::control::socket_path(table);
    // A server that is starting or stopping holds the table without answering yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match open(table, RestartPolicy::Resume, io) {
            Ok(e) => return execute(&Arc::new(e), &cmd, ch),
            Err(Error::Locked { path, holder }) => match crate::control::connect(&sock) {
                Ok(c) => {
                    let cmd = cmd.canonical()?;
                    let flag = ch.interrupt.clone();
                    return crate::control::request(&sock, Some(c), &cmd, ch, flag.as_deref());
                }
                Err(_) if sock.exists() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(_) => return Err(Error::Locked { path, holder }),
            },
            Err(e) => return Err(e),
        }
    }
}

/// Run `cmd` (`pause`, `resume`, `rate`) in the process serving the table.
pub(super) fn remote_only(table: &Path, session: SessionId, cmd: &Remote) -> Result<String> {
    let sock = crate::control::socket_path(table);
    let c = crate::control::connect(&sock).map_err(|_| {
        Error::invalid(
            "session",
            format!(
                "no copy of {session} is running: no process serves {} ({} does not answer)",
                table.display(),
                sock.display()
            ),
        )
    })?;
    crate::control::request(&sock, Some(c), cmd, &mut Local::default(), None)
}

/// Where `read` and `export` put the image bytes.
#[derive(Debug, Default)]
pub(super) enum Sink {
    /// Nowhere (the command has no data).
    #[default]
    None,
    /// Standard output.
    Stdout,
    /// A file, written under a temporary name in its directory (created at the first bytes,
    /// or at the end when there are none) and renamed into place by [`Local::finish`]; it
    /// replaces an existing file only when the flag is set. A command that fails leaves
    /// nothing (the temporary file is removed).
    File(PathBuf, Option<tempfile::NamedTempFile>, bool),
}

/// The local side of a command: the terminal, Ctrl-C, and the files named on the command line.
#[derive(Default)]
pub(super) struct Local {
    /// The bytes of `write --from` and that file's name.
    pub(super) input: Option<(Box<dyn Read>, String)>,
    pub(super) sink: Sink,
    /// Bytes given to the sink.
    pub(super) written: u64,
    /// Set by SIGINT/SIGTERM.
    pub(super) interrupt: Option<Arc<AtomicBool>>,
    /// A progress line is showing on a terminal without its newline.
    pub(super) open_line: bool,
}

impl Local {
    fn file(&mut self) -> Result<&mut std::fs::File> {
        let Sink::File(p, f, _) = &mut self.sink else {
            return Err(Error::invalid("output", "no file"));
        };
        if f.is_none() {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            *f = Some(
                tempfile::Builder::new()
                    .prefix(&format!(".{name}."))
                    .suffix(".tmp")
                    .tempfile_in(dir)
                    .map_err(|er| Error::io("create", p.display().to_string(), 0, er))?,
            );
        }
        f.as_mut()
            .map(tempfile::NamedTempFile::as_file_mut)
            .ok_or_else(|| Error::invalid("output", p.display().to_string()))
    }

    /// End the progress line; make a file sink durable and rename it into place.
    pub(super) fn finish(&mut self) -> Result<()> {
        if std::mem::take(&mut self.open_line) {
            eprintln!();
        }
        if matches!(self.sink, Sink::File(..)) {
            self.file()?;
        }
        if let Sink::File(p, f, replace) = &mut self.sink {
            let shown = p.display().to_string();
            let Some(tmp) = f.take() else {
                return Ok(());
            };
            tmp.as_file()
                .sync_all()
                .map_err(|er| Error::io("fsync", &shown, 0, er))?;
            let placed = if *replace {
                tmp.persist(&*p)
            } else {
                tmp.persist_noclobber(&*p)
            };
            placed.map_err(|er| Error::io("rename into", &shown, 0, er.error))?;
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            crate::volume::sync_dir(dir)?;
        }
        Ok(())
    }
}

impl Channel for Local {
    fn input(&mut self) -> Result<&mut dyn Read> {
        match &mut self.input {
            Some((f, _)) => Ok(f.as_mut()),
            None => Err(Error::invalid("write", "no input file")),
        }
    }

    fn output(&mut self, bytes: &[u8]) -> Result<()> {
        let at = self.written;
        match &self.sink {
            Sink::None => return Err(Error::invalid("output", "this command has no data")),
            Sink::Stdout => std::io::stdout()
                .write_all(bytes)
                .map_err(|er| Error::io("write", "stdout", at, er))?,
            Sink::File(p, _, _) => {
                let p = p.display().to_string();
                self.file()?
                    .write_all(bytes)
                    .map_err(|er| Error::io("write", p, at, er))?;
            }
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn progress(&mut self, line: &str) {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("{line}   \r");
            self.open_line = true;
        } else {
            eprintln!("{line}");
        }
    }

    fn progress_interval(&self) -> Duration {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(2)
        }
    }

    fn interrupted(&mut self) -> Option<Error> {
        self.interrupt
            .as_ref()
            .filter(|f| f.load(Ordering::Acquire))
            .map(|_| Error::Interrupted("run copy again to resume".into()))
    }

    fn copies(&self) -> Option<crate::control::CopyRegistry> {
        None
    }
}

/// A flag set by SIGINT or SIGTERM; a second signal ends the process at once (exit 130).
pub(super) fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
            .and_then(|_| signal_hook::flag::register(sig, flag.clone()))
            .map_err(|e| Error::io("install signal handler", "SIGINT/SIGTERM", 0, e))?;
    }
    Ok(flag)
}
