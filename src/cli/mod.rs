//! The `timezero` binary's commands. No engine logic lives here: each command parses its
//! arguments, calls the library, and prints.

mod demo;

use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::activity::format::{CopyMode, ExtentSpec};
use crate::control::Channel;
use crate::copier::{Copier, CopierOptions};
use crate::engine::{Engine, EngineOptions, Outcome, RestartPolicy, SessionSpec};
use crate::ids::{GrainSize, SessionId};
use crate::units::{format_size, parse_size};
use crate::{Error, Result};

/// Crash-consistent point-in-time (time zero) copies of block storage.
#[derive(Debug, Parser)]
#[command(name = "timezero", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Volume I/O options for the engine (any command).
    #[command(flatten)]
    pub io: IoFlags,
}

/// How the engine opens file volumes; global flags accepted by every command.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct IoFlags {
    /// File backend: auto = io_uring for O_DIRECT volumes where the kernel allows and
    /// pread/pwrite for buffered ones (the faster of the two for each, see docs/benchmarks.md);
    /// pread; io-uring = io_uring for every volume where the kernel allows.
    #[arg(long, global = true, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Same as --backend io-uring.
    #[arg(long, global = true, conflicts_with = "backend")]
    pub io_uring: bool,
    /// Open file volumes with O_DIRECT (bypass the page cache). For `bench`: only the engine's
    /// background-copy figure.
    #[arg(long, global = true)]
    pub direct: bool,
}

/// The `--backend` values (see [`crate::engine::Backend`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// io_uring for O_DIRECT volumes, pread/pwrite for buffered ones.
    #[default]
    Auto,
    /// pread/pwrite for every volume.
    Pread,
    /// io_uring for every volume where the kernel allows.
    IoUring,
}

impl IoFlags {
    /// The engine backend these flags select.
    #[must_use]
    pub fn backend(&self) -> crate::engine::Backend {
        use crate::engine::Backend;
        match (self.io_uring, self.backend) {
            (true, _) | (false, BackendArg::IoUring) => Backend::IoUring,
            (false, BackendArg::Pread) => Backend::Pread,
            (false, BackendArg::Auto) => Backend::Auto,
        }
    }

    /// Engine options with these flags and `restart`.
    #[must_use]
    pub fn engine_options(&self, restart: RestartPolicy) -> EngineOptions {
        EngineOptions {
            restart,
            backend: self.backend(),
            file_options: crate::volume::FileVolumeOptions {
                direct: self.direct,
                ..crate::volume::FileVolumeOptions::default()
            },
            ..EngineOptions::default()
        }
    }
}

fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new, empty activity table.
    Init {
        /// Path of the table file (must not exist).
        table: PathBuf,
        /// Bytes per journal copy (e.g. 8MiB).
        #[arg(long, value_parser = size_arg, default_value = "8MiB")]
        journal: u64,
        /// Bytes per checkpoint area; bounds the bitmaps of all sessions (8MiB covers 4 TiB of
        /// source at a 64 KiB grain).
        #[arg(long, value_parser = size_arg, default_value = "8MiB")]
        capacity: u64,
    },
    /// Establish a session (T0 is now) and print its id.
    Establish {
        /// The table.
        table: PathBuf,
        /// Source volume (file or block device).
        source: PathBuf,
        /// Target volume.
        target: PathBuf,
        /// Source extent OFFSET:LEN, optionally @TARGET_OFFSET (default: same offset); repeat
        /// for more. Default: the whole source.
        #[arg(long = "extent")]
        extents: Vec<String>,
        /// Grain size (power of two, 4KiB to 1MiB).
        #[arg(long, value_parser = size_arg, default_value = "64KiB")]
        grain: u64,
        /// Copy-before-write only: no background copy until converted.
        #[arg(long)]
        nocopy: bool,
    },
    /// Show sessions.
    Status {
        /// The table.
        table: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the background copy to completion (resumable after a kill).
    Copy {
        /// The table.
        table: PathBuf,
        /// Only this session.
        session: Option<SessionId>,
        /// Rate limit in bytes per second (e.g. 100MiB).
        #[arg(long, value_parser = size_arg)]
        rate: Option<u64>,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Bytes per copy request (e.g. 4MiB; at most 4 MiB) [default: 1MiB].
        #[arg(long, value_parser = size_arg)]
        batch: Option<u64>,
        /// Convert the session to copy mode first if it is a no-copy session.
        #[arg(long)]
        convert: bool,
    },
    /// Write a file's bytes to a volume through the engine (copy-before-write).
    Write {
        /// The table.
        table: PathBuf,
        /// The volume (source or target of sessions in the table, or any file).
        volume: PathBuf,
        /// Byte offset.
        #[arg(value_parser = size_arg)]
        offset: u64,
        /// File with the bytes to write.
        #[arg(long)]
        from: PathBuf,
    },
    /// Measure the engine against the raw file in one process (interleaved rounds on temporary
    /// files): already-copied and first writes, image reads, background copy, recovery.
    Bench {
        /// Print fio-shaped JSON.
        #[arg(long)]
        json: bool,
        /// Directory for the temporary files (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of each volume file (e.g. 256MiB).
        #[arg(long, value_parser = size_arg, default_value = "256MiB")]
        size: u64,
        /// Rounds; figures are medians over rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Writer counts for the already-copied and first-write figures (e.g. 1,4,16,32).
        /// The global --io-uring selects the engine's backend; the global --direct opens the
        /// engine's volumes with O_DIRECT for the background-copy figure (the raw copy is
        /// O_DIRECT already; the other raw figures are buffered, so the engine stays buffered
        /// there).
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        writers: Vec<usize>,
        /// Also write the JSON to this file (e.g. for scripts/plot-bench.py).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Read a session's T0 image.
    Read {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
        /// Image offset.
        #[arg(value_parser = size_arg)]
        offset: u64,
        /// Length.
        #[arg(value_parser = size_arg)]
        len: u64,
        /// Write to this file instead of standard output.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Write a session's whole T0 image to a file.
    Export {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
        /// Output file.
        output: PathBuf,
    },
    /// End a session.
    Withdraw {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
    },
    /// Open the table, recover, reconcile every session, and print the decisions.
    Recover {
        /// The table.
        table: PathBuf,
        /// Terminate every incomplete session instead of resuming (the restart rule of the
        /// original time-zero design).
        #[arg(long)]
        terminate_incomplete: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Raise a reset notification for a volume and reconcile the sessions using it.
    Reset {
        /// The table.
        table: PathBuf,
        /// The volume.
        volume: PathBuf,
    },
    /// The self-checking demo: temporary volumes, sessions, concurrent writers, a throttled
    /// copy killed with SIGKILL and resumed, and a byte-for-byte check of every image.
    Demo {
        /// Keep the temporary directory and print its path.
        #[arg(long)]
        keep: bool,
        /// Seed for the random data and writes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Hold the table and serve source volumes and session images over NBD; other commands
    /// on the same table reach this process through its control socket (`TABLE.ctl`).
    Serve {
        /// The table.
        table: PathBuf,
        /// Unix socket to listen on (default `TABLE.nbd`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// TCP address to listen on as well (loopback only unless --allow-remote).
        #[arg(long)]
        listen: Option<String>,
        /// Allow a non-loopback --listen address (NBD has no authentication).
        #[arg(long)]
        allow_remote: bool,
        /// Let clients write session images (target-write semantics).
        #[arg(long)]
        writable_images: bool,
        /// Source volumes to attach and export beyond those of existing sessions.
        #[arg(long = "volume")]
        volumes: Vec<PathBuf>,
        /// Most NBD connections at once over all exports; a client over the limit is refused
        /// during the handshake.
        #[arg(long, default_value_t = crate::nbd::CONNECTIONS_MAX)]
        max_connections: usize,
        /// Most NBD connections to one export.
        #[arg(long, default_value_t = crate::nbd::CONNECTIONS_PER_EXPORT_MAX)]
        max_connections_per_export: usize,
        /// Seconds a client may take for the whole NBD handshake (0 = no limit).
        #[arg(long, default_value_t = crate::nbd::HANDSHAKE_TIMEOUT_SECS)]
        handshake_timeout: u64,
        /// Seconds a connected NBD client may send no request before it is disconnected
        /// (0 = never).
        #[arg(long, default_value_t = crate::nbd::IDLE_TIMEOUT_SECS)]
        idle_timeout: u64,
    },
    /// Pause the copy of a session running in the process serving the table.
    Pause {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
    },
    /// Resume a suspended session whose volume is back (here, or in the process serving the
    /// table), or else the paused copy of a session running in the process serving the table.
    Resume {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
    },
    /// Change the rate limit of the copy of a session running in the process serving the
    /// table.
    Rate {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
        /// Bytes per second (e.g. 100MiB).
        #[arg(value_parser = size_arg)]
        bytes_per_s: u64,
    },
    /// Ask the process serving a table to stop.
    Stop {
        /// The table.
        table: PathBuf,
    },
    /// Run the fault-injection crash-state enumerator (needs the `fault` feature).
    Crashtest {
        /// Number of generated workloads.
        #[arg(long, default_value_t = 60)]
        workloads: usize,
        /// Master seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Error-sweep points per workload (EIO, failed sync, ENOSPC, misdirected table
        /// writes); `all` sweeps every I/O.
        #[arg(long, default_value = "12")]
        eio_points: String,
    },
    /// (internal) Open a table in this fresh process and print the recovery time and peak
    /// resident memory as JSON; used by `bench`.
    #[command(hide = true)]
    RecoveryProbe {
        /// The table.
        table: PathBuf,
    },
    /// (internal) Writers and a throttled copier that run until killed; used by `demo`.
    #[command(hide = true)]
    Workload {
        /// The table.
        table: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Copy rate.
        #[arg(long, value_parser = size_arg, default_value = "8MiB")]
        rate: u64,
    },
}

/// Run the CLI; returns the process exit code (0 ok, 1 error, 2 usage).
#[must_use]
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli.command, cli.io) {
        Ok(()) => 0,
        Err(e @ Error::Interrupted(_)) => {
            eprintln!("timezero: {e}");
            130
        }
        Err(e) => {
            eprintln!("timezero: {e}");
            1
        }
    }
}

fn open(table: &Path, restart: RestartPolicy, io: IoFlags) -> Result<Engine> {
    Engine::open_path(table, io.engine_options(restart))
}

fn parse_extent(s: &str) -> Result<ExtentSpec> {
    let (main, tgt) = match s.split_once('@') {
        Some((m, t)) => (m, Some(parse_size(t)?)),
        None => (s, None),
    };
    let (o, l) = main.split_once(':').ok_or_else(|| {
        Error::invalid("extent", format!("'{s}' is not OFFSET:LEN[@TARGET_OFFSET]"))
    })?;
    let source_offset = parse_size(o)?;
    Ok(ExtentSpec {
        source_offset,
        target_offset: tgt.unwrap_or(source_offset),
        len: parse_size(l)?,
    })
}

/// The locator a volume path is known by: its canonical path, or, when the file is gone, its
/// canonical directory joined with its name.
fn locator_of(path: &Path) -> Result<String> {
    let err = |e| Error::io("resolve", path.display().to_string(), 0, e);
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name = path.file_name().ok_or_else(|| err(e))?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let dir = std::fs::canonicalize(dir).map_err(err)?;
            Ok(dir.join(name).display().to_string())
        }
        Err(e) => Err(err(e)),
    }
}

fn volume_id(engine: &Engine, path: &Path) -> Result<crate::ids::VolumeId> {
    let canon = std::fs::canonicalize(path)
        .map_err(|e| Error::io("open", path.display().to_string(), 0, e))?;
    match engine.volume_by_locator(&canon.display().to_string()) {
        Some(id) => Ok(id),
        None => engine.attach_path(path),
    }
}

/// A command that can run here or, when another process serves the table, in that process
/// through its control socket. Each returns the text to print.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Remote {
    /// `establish`.
    Establish {
        /// Source path.
        source: PathBuf,
        /// Target path.
        target: PathBuf,
        /// Extent strings as given.
        extents: Vec<String>,
        /// Grain bytes.
        grain: u64,
        /// No-copy mode.
        nocopy: bool,
    },
    /// `status`.
    Status {
        /// JSON output.
        json: bool,
    },
    /// `copy`.
    Copy {
        /// Only this session.
        session: Option<u64>,
        /// Rate limit.
        rate: Option<u64>,
        /// Threads.
        threads: usize,
        /// Bytes per copy request.
        #[serde(default)]
        batch: Option<u64>,
        /// Convert first.
        convert: bool,
    },
    /// `withdraw`.
    Withdraw {
        /// Session.
        session: u64,
    },
    /// `reset`.
    Reset {
        /// Volume path.
        volume: PathBuf,
    },
    /// `write`: the bytes follow the request (see [`crate::control::Channel::input`]).
    Write {
        /// Volume path.
        volume: PathBuf,
        /// Offset.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `read`: the image bytes go back to the caller.
    Read {
        /// Session.
        session: u64,
        /// Image offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `export`: the whole image goes back to the caller.
    Export {
        /// Session.
        session: u64,
    },
    /// `pause`: pause the running copy of a session.
    Pause {
        /// Session.
        session: u64,
    },
    /// `resume`: resume a suspended session, or else the paused copy of a session.
    Resume {
        /// Session.
        session: u64,
    },
    /// `rate`: change the rate limit of the running copy of a session.
    Rate {
        /// Session.
        session: u64,
        /// Bytes per second.
        bytes_per_s: u64,
    },
}

impl Remote {
    /// The file paths the command names.
    #[must_use]
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Remote::Establish { source, target, .. } => vec![source, target],
            Remote::Reset { volume } | Remote::Write { volume, .. } => vec![volume],
            _ => Vec::new(),
        }
    }

    /// The same command with every path made absolute and canonical (so that it names the same
    /// files in a process with another working directory).
    ///
    /// # Errors
    /// [`Error::Io`] naming a path that cannot be resolved.
    pub fn canonical(mut self) -> Result<Remote> {
        let canon = |p: &mut PathBuf| -> Result<()> {
            *p = std::fs::canonicalize(&*p)
                .map_err(|e| Error::io("resolve", p.display().to_string(), 0, e))?;
            Ok(())
        };
        match &mut self {
            Remote::Establish { source, target, .. } => {
                canon(source)?;
                canon(target)?;
            }
            // A volume being reset may be gone: name it by its canonical directory.
            Remote::Reset { volume } => *volume = PathBuf::from(locator_of(volume)?),
            Remote::Write { volume, .. } => canon(volume)?,
            _ => {}
        }
        Ok(self)
    }
}

/// Run a [`Remote`] command on an open engine; `io` carries its input, output, progress and
/// interruptions.
///
/// # Errors
/// The command's errors; [`Error::Interrupted`] when it was stopped on request.
pub fn execute(e: &Arc<Engine>, cmd: &Remote, io: &mut dyn Channel) -> Result<String> {
    let mut out = String::new();
    use std::fmt::Write as _;
    match cmd {
        Remote::Establish {
            source,
            target,
            extents,
            grain,
            nocopy,
        } => {
            let src = volume_id(e, source)?;
            let tgt = volume_id(e, target)?;
            let extents = extents
                .iter()
                .map(|s| parse_extent(s))
                .collect::<Result<Vec<_>>>()?;
            let spec = SessionSpec {
                source: src,
                target: tgt,
                extents,
                grain: GrainSize::new(*grain)?,
                mode: if *nocopy {
                    CopyMode::NoCopy
                } else {
                    CopyMode::Copy
                },
            };
            let id = e.establish(&spec)?;
            let _ = writeln!(out, "{id}");
        }
        Remote::Status { json } => status_text(&mut out, e, *json)?,
        Remote::Copy {
            session,
            rate,
            threads,
            batch,
            convert,
        } => {
            let session = session.map(SessionId);
            if let Some(id) = session {
                let s = e.session(id)?;
                let state = s.status().state;
                if state == crate::activity::format::SessionState::Completed {
                    let _ = writeln!(out, "{id} completed");
                    return Ok(out);
                }
                e.check_active(id)?;
                if *convert {
                    e.convert_to_copy(id)?;
                } else if s.status().mode == CopyMode::NoCopy {
                    return Err(Error::invalid(
                        "copy",
                        format!("{id} is a no-copy session; pass --convert to convert it"),
                    ));
                }
            }
            let mut opts = CopierOptions {
                threads: *threads,
                rate_bytes_per_s: *rate,
                sessions: session.into_iter().collect(),
                ..CopierOptions::default()
            };
            if let Some(b) = batch {
                opts.batch_bytes = *b;
            }
            let c = Copier::start(e.clone(), opts)?;
            let _registered = io.copies().map(|r| r.register(c.control()));
            let mut last = std::time::Instant::now();
            while !c.finished() {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(er) = io.interrupted() {
                    // Everything copied so far is committed when the workers stop.
                    c.stop()?;
                    return Err(er);
                }
                if last.elapsed() >= io.progress_interval() {
                    last = std::time::Instant::now();
                    io.progress(&progress_line(&c));
                }
            }
            let p = c.join()?;
            let _ = writeln!(
                out,
                "copied {} bytes; {}/{} grains; backend {}",
                p.bytes_copied,
                p.grains_copied,
                p.grains_total,
                e.backend_name()
            );
            for s in e.status() {
                let _ = writeln!(out, "s{} {}", s.id, s.state);
            }
        }
        Remote::Withdraw { session } => {
            e.withdraw(SessionId(*session))?;
            let _ = writeln!(out, "s{session} withdrawn");
        }
        Remote::Reset { volume } => {
            let l = locator_of(volume)?;
            let uses = |x: &crate::session::Session| {
                x.desc.source.locator == l || x.desc.target.locator == l
            };
            let id_in = |x: &crate::session::Session| {
                if x.desc.source.locator == l {
                    x.desc.source.id
                } else {
                    x.desc.target.id
                }
            };
            // The identity the table knows for this path: a live (active or suspended)
            // session's first (a stale, ended session may name an earlier file at the same path).
            let sessions = e.table().sessions();
            let old = sessions
                .iter()
                .filter(|x| uses(x))
                .max_by_key(|x| (x.is_live(), x.id()))
                .map(|x| id_in(x))
                .ok_or_else(|| Error::UnknownVolume(volume.display().to_string()))?;
            // A local open has already reconciled every session with the volumes as they are
            // now (the same comparison a reset makes): report what it decided for this volume.
            let mut said = 0;
            for d in &e.decisions {
                let on = sessions.iter().any(|x| x.id().0 == d.session && uses(x));
                if on
                    && (d.was_suspended
                        || matches!(
                            d.outcome,
                            Outcome::Terminated(_)
                                | Outcome::ResumedPartly(_)
                                | Outcome::Suspended(_)
                        ))
                {
                    let _ = writeln!(out, "s{}: {:?} (on open)", d.session, d.outcome);
                    said += 1;
                }
            }
            // Gone: its sessions are suspended; present but unopenable (a directory now, no
            // permission): the same, with the error.
            let ds = match e.open_file(Path::new(&l)) {
                Ok(now) => e.reset(old, Some(now))?,
                Err(_) if !Path::new(&l).exists() => e.reset(old, None)?,
                Err(er) => e.reset_unavailable(old, &er.to_string())?,
            };
            if ds.is_empty() && said == 0 {
                let _ = writeln!(out, "no active session uses {}", volume.display());
            }
            for d in ds {
                let _ = writeln!(out, "s{}: {:?}", d.session, d.outcome);
            }
        }
        Remote::Write {
            volume,
            offset,
            len,
        } => {
            let vid = volume_id(e, volume)?;
            crate::volume::check_range(*offset, *len, e.volume(vid)?.size(), "volume")?;
            let input = io.input()?;
            // Bounded memory whatever the length: write in chunks.
            let mut buf = vec![0u8; 4 << 20];
            let mut done = 0u64;
            while done < *len {
                let want = usize::try_from((*len - done).min(buf.len() as u64)).unwrap_or(0);
                let n = input
                    .read(&mut buf[..want])
                    .map_err(|er| Error::io("read", "write input", done, er))?;
                if n == 0 {
                    return Err(Error::invalid(
                        "write",
                        format!("input ended after {done} of {len} bytes"),
                    ));
                }
                e.write(vid, *offset + done, &buf[..n])?;
                done += n as u64;
            }
            e.flush(vid)?;
            let _ = writeln!(out, "wrote {done} bytes at {offset}");
        }
        Remote::Read {
            session,
            offset,
            len,
        } => {
            if *len > crate::limits::IO_BYTES_MAX {
                return Err(Error::invalid("read", "length over 64 MiB; use export"));
            }
            let mut buf = vec![0u8; usize::try_from(*len).unwrap_or(0)];
            e.read_image(SessionId(*session), *offset, &mut buf)?;
            io.output(&buf)?;
        }
        Remote::Export { session } => {
            export(e, SessionId(*session), io)?;
        }
        // A suspended session first; otherwise (false) a paused copy, below.
        Remote::Resume { session } if resume_suspended(e, SessionId(*session), io, &mut out)? => {}
        Remote::Pause { session } | Remote::Resume { session } | Remote::Rate { session, .. } => {
            let id = SessionId(*session);
            let serving = io.copies().is_some();
            let copies = io
                .copies()
                .map(|r| r.find(e, id))
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    Error::invalid(
                        "session",
                        if serving {
                            format!("no copy of {id} is running")
                        } else {
                            format!(
                                "no copy of {id} is running: no process serves {} ({id} is not \
                                 suspended)",
                                e.table().name()
                            )
                        },
                    )
                })?;
            for c in &copies {
                match cmd {
                    Remote::Pause { .. } => c.pause(),
                    Remote::Resume { .. } => c.resume(),
                    Remote::Rate { bytes_per_s, .. } => c.set_rate(Some(*bytes_per_s))?,
                    _ => {}
                }
            }
            let what = match cmd {
                Remote::Pause { .. } => "paused".to_string(),
                Remote::Resume { .. } => "resumed".to_string(),
                Remote::Rate { bytes_per_s, .. } => {
                    format!("limited to {}/s", format_size(*bytes_per_s))
                }
                _ => String::new(),
            };
            let _ = writeln!(out, "copy of {id} {what}");
        }
    }
    Ok(out)
}

/// `resume` of a suspended session: find its volumes again and reconcile it. Returns false
/// (nothing done) when the session is not suspended and was not resumed when this process
/// opened the table, so that `resume` goes on to a paused copy.
fn resume_suspended(e: &Engine, id: SessionId, io: &dyn Channel, out: &mut String) -> Result<bool> {
    use std::fmt::Write as _;
    let d = if e.session(id)?.state() == crate::activity::format::SessionState::Suspended {
        e.resume(id, &e.file_resolver())?
    } else {
        // Opened here (not in a server): opening already reconciled the session.
        match e.decisions.iter().find(|d| d.session == id.0) {
            Some(d) if io.copies().is_none() && d.was_suspended => d.clone(),
            _ => return Ok(false),
        }
    };
    match &d.outcome {
        Outcome::Resumed => {
            let _ = writeln!(out, "{id} resumed");
        }
        Outcome::ResumedPartly(ended) => {
            let _ = writeln!(out, "{id} resumed; extents ended: {ended:?}");
        }
        Outcome::Suspended(_) => e.check_active(id)?,
        Outcome::Terminated(r) => {
            return Err(Error::invalid(
                "resume",
                format!("{id} terminated instead: {r}"),
            ))
        }
        Outcome::Ended => e.check_active(id)?,
    }
    Ok(true)
}

/// One line of a running copy's progress.
fn progress_line(c: &Copier) -> String {
    let p = c.progress();
    let ctl = c.control();
    let pct = if p.grains_total == 0 {
        100.0
    } else {
        100.0 * p.grains_copied as f64 / p.grains_total as f64
    };
    let eta = p.eta_s.map_or("?".to_string(), |s| format!("{s:.0}s"));
    let limit = ctl
        .rate()
        .map(|r| format!(" limit {}/s", format_size(r)))
        .unwrap_or_default();
    let paused = if ctl.paused() { " paused" } else { "" };
    format!(
        "copy {pct:5.1}% {}/{} grains {:.1} MiB/s eta {eta}{limit}{paused}",
        p.grains_copied,
        p.grains_total,
        p.bytes_per_s / 1_048_576.0
    )
}

/// Run `cmd` on the table: locally, or through the control socket of the process serving it.
fn local_or_remote(table: &Path, cmd: Remote, io: IoFlags, ch: &mut Local) -> Result<String> {
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
fn remote_only(table: &Path, session: SessionId, cmd: &Remote) -> Result<String> {
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
enum Sink {
    /// Nowhere (the command has no data).
    #[default]
    None,
    /// Standard output.
    Stdout,
    /// A file, created at the first bytes (or at the end when there are none).
    File(PathBuf, Option<std::fs::File>),
}

/// The local side of a command: the terminal, Ctrl-C, and the files named on the command line.
#[derive(Debug, Default)]
struct Local {
    /// The bytes of `write --from` and that file's name.
    input: Option<(std::fs::File, String)>,
    sink: Sink,
    /// Bytes given to the sink.
    written: u64,
    /// Set by SIGINT/SIGTERM.
    interrupt: Option<Arc<AtomicBool>>,
    /// A progress line is showing on a terminal without its newline.
    open_line: bool,
}

impl Local {
    fn file(&mut self) -> Result<&mut std::fs::File> {
        let Sink::File(p, f) = &mut self.sink else {
            return Err(Error::invalid("output", "no file"));
        };
        if f.is_none() {
            *f = Some(
                std::fs::File::create(&*p)
                    .map_err(|er| Error::io("create", p.display().to_string(), 0, er))?,
            );
        }
        f.as_mut()
            .ok_or_else(|| Error::invalid("output", p.display().to_string()))
    }

    /// End the progress line and make a file sink durable.
    fn finish(&mut self) -> Result<()> {
        if std::mem::take(&mut self.open_line) {
            eprintln!();
        }
        if let Sink::File(p, _) = &self.sink {
            let p = p.display().to_string();
            self.file()?
                .sync_all()
                .map_err(|er| Error::io("fsync", p, 0, er))?;
        }
        Ok(())
    }
}

impl Channel for Local {
    fn input(&mut self) -> Result<&mut dyn Read> {
        match &mut self.input {
            Some((f, _)) => Ok(f),
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
            Sink::File(p, _) => {
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
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
            .and_then(|_| signal_hook::flag::register(sig, flag.clone()))
            .map_err(|e| Error::io("install signal handler", "SIGINT/SIGTERM", 0, e))?;
    }
    Ok(flag)
}

fn run(cmd: Command, io: IoFlags) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let text = match cmd {
        Command::Bench {
            json,
            dir,
            size,
            rounds,
            writers,
            json_out,
        } => {
            let opts = crate::bench::BenchOptions {
                dir,
                size,
                rounds,
                json,
                json_out,
                writers,
                backend: io.backend(),
                direct_copy: io.direct,
                probe_exe: std::env::current_exe().ok(),
            };
            crate::bench::run(&opts, &mut out, &mut std::io::stderr())?;
            String::new()
        }
        Command::Init {
            table,
            journal,
            capacity,
        } => {
            let opts = EngineOptions {
                table: crate::activity::TableOptions {
                    journal_bytes: journal,
                    checkpoint_bytes: capacity,
                },
                ..EngineOptions::default()
            };
            let e = Engine::create_path(&table, opts)?;
            let l = e.table().layout();
            format!(
                "created {} ({} bytes: journal 2x{}, checkpoints 2x{})\n",
                table.display(),
                l.file_bytes(),
                format_size(l.journal_bytes),
                format_size(l.checkpoint_bytes)
            )
        }
        Command::Establish {
            table,
            source,
            target,
            extents,
            grain,
            nocopy,
        } => local_or_remote(
            &table,
            Remote::Establish {
                source,
                target,
                extents,
                grain,
                nocopy,
            },
            io,
            &mut Local::default(),
        )?,
        Command::Status { table, json } => {
            local_or_remote(&table, Remote::Status { json }, io, &mut Local::default())?
        }
        Command::Copy {
            table,
            session,
            rate,
            threads,
            batch,
            convert,
        } => {
            let mut ch = Local {
                interrupt: Some(interrupt_flag()?),
                ..Local::default()
            };
            let r = local_or_remote(
                &table,
                Remote::Copy {
                    session: session.map(|s| s.0),
                    rate,
                    threads,
                    batch,
                    convert,
                },
                io,
                &mut ch,
            );
            ch.finish()?;
            r?
        }
        Command::Write {
            table,
            volume,
            offset,
            from,
        } => {
            let shown = from.display().to_string();
            let f = std::fs::File::open(&from).map_err(|er| Error::io("open", &shown, 0, er))?;
            let len = f
                .metadata()
                .map_err(|er| Error::io("stat", &shown, 0, er))?
                .len();
            let mut ch = Local {
                input: Some((f, shown)),
                ..Local::default()
            };
            let cmd = Remote::Write {
                volume,
                offset,
                len,
            };
            local_or_remote(&table, cmd, io, &mut ch)?
        }
        Command::Withdraw { table, session } => local_or_remote(
            &table,
            Remote::Withdraw { session: session.0 },
            io,
            &mut Local::default(),
        )?,
        Command::Reset { table, volume } => {
            local_or_remote(&table, Remote::Reset { volume }, io, &mut Local::default())?
        }
        Command::Read {
            table,
            session,
            offset,
            len,
            to,
        } => {
            let mut ch = Local {
                sink: to.map_or(Sink::Stdout, |p| Sink::File(p, None)),
                ..Local::default()
            };
            let cmd = Remote::Read {
                session: session.0,
                offset,
                len,
            };
            local_or_remote(&table, cmd, io, &mut ch)?;
            ch.finish()?;
            String::new()
        }
        Command::Export {
            table,
            session,
            output,
        } => {
            let mut ch = Local {
                sink: Sink::File(output.clone(), None),
                ..Local::default()
            };
            let cmd = Remote::Export { session: session.0 };
            local_or_remote(&table, cmd, io, &mut ch)?;
            ch.finish()?;
            format!(
                "exported {} bytes of {session} to {}\n",
                ch.written,
                output.display()
            )
        }
        Command::Pause { table, session } => {
            remote_only(&table, session, &Remote::Pause { session: session.0 })?
        }
        Command::Resume { table, session } => local_or_remote(
            &table,
            Remote::Resume { session: session.0 },
            io,
            &mut Local::default(),
        )?,
        Command::Rate {
            table,
            session,
            bytes_per_s,
        } => remote_only(
            &table,
            session,
            &Remote::Rate {
                session: session.0,
                bytes_per_s,
            },
        )?,
        Command::Recover {
            table,
            terminate_incomplete,
            json,
        } => {
            let e = open(
                &table,
                if terminate_incomplete {
                    RestartPolicy::TerminateIncomplete
                } else {
                    RestartPolicy::Resume
                },
                io,
            )?;
            let mut t = String::new();
            use std::fmt::Write as _;
            if json {
                let v = serde_json::json!({"open": e.open_report, "decisions": e.decisions});
                let _ = writeln!(t, "{v}");
            } else {
                let r = &e.open_report;
                let _ = writeln!(t, "generation {} fell_back {} replayed {} commits ({} blocks, {} repaired) journal_hole {}", r.generation, r.fell_back, r.commits_replayed, r.blocks_replayed, r.blocks_repaired, r.journal_hole);
                for d in &e.decisions {
                    let _ = writeln!(t, "s{}: {:?}", d.session, d.outcome);
                }
            }
            t
        }
        Command::Serve {
            table,
            socket,
            listen,
            allow_remote,
            writable_images,
            volumes,
            max_connections,
            max_connections_per_export,
            handshake_timeout,
            idle_timeout,
        } => {
            let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
            let config = crate::nbd::NbdConfig {
                allow_remote,
                connections_max: max_connections,
                connections_per_export_max: max_connections_per_export,
                handshake_timeout: secs(handshake_timeout),
                idle_timeout: secs(idle_timeout),
                ..crate::nbd::NbdConfig::default()
            };
            serve(
                &table,
                socket,
                listen,
                writable_images,
                &volumes,
                config,
                io,
            )?;
            String::new()
        }
        Command::Stop { table } => {
            crate::control::shutdown(&crate::control::socket_path(&table))?;
            format!("asked the server of {} to stop\n", table.display())
        }
        Command::Demo { keep, seed } => {
            demo::run(keep, seed)?;
            String::new()
        }
        Command::RecoveryProbe { table } => crate::bench::recovery_probe(&table)? + "\n",
        Command::Workload { table, seed, rate } => {
            demo::workload(&table, seed, rate)?;
            String::new()
        }
        Command::Crashtest {
            workloads,
            seed,
            json,
            eio_points,
        } => {
            let points = if eio_points == "all" {
                usize::MAX
            } else {
                eio_points.parse().map_err(|_| {
                    Error::invalid(
                        "--eio-points",
                        format!("'{eio_points}' is not a number or 'all'"),
                    )
                })?
            };
            crashtest(workloads, seed, json, points)?;
            String::new()
        }
    };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

fn serve(
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
        let _ = writeln!(o, "serving on tcp {:?}", t.tcp_addr());
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

#[cfg(feature = "fault")]
fn crashtest(workloads: usize, seed: u64, json: bool, eio_points: usize) -> Result<()> {
    let r = crate::fault::crashtest(&crate::fault::CrashtestOptions {
        workloads,
        seed,
        eio_points,
        ..crate::fault::CrashtestOptions::default()
    });
    let mut out = std::io::stdout().lock();
    if json {
        let s =
            serde_json::to_string_pretty(&r).map_err(|e| Error::invalid("json", e.to_string()))?;
        let _ = writeln!(out, "{s}");
    } else {
        let _ = writeln!(
            out,
            "crashtest: seed {} workloads {} crash points {} states {} ordering checks {} violations {} ({} ms)",
            r.seed, r.workloads, r.crash_points, r.states_total, r.ordering_checks, r.violations, r.elapsed_ms
        );
        for (k, v) in &r.states {
            let _ = writeln!(out, "  states {k}: {v}");
        }
        for (k, v) in &r.outcomes {
            let _ = writeln!(out, "  outcome {k}: {v}");
        }
        for v in &r.violation_samples {
            let _ = writeln!(out, "  VIOLATION {v}");
        }
    }
    if r.violations > 0 {
        return Err(Error::invalid(
            "crashtest",
            format!("{} violations", r.violations),
        ));
    }
    Ok(())
}

#[cfg(not(feature = "fault"))]
fn crashtest(_workloads: usize, _seed: u64, _json: bool, _eio_points: usize) -> Result<()> {
    Err(Error::invalid(
        "command",
        "crashtest needs a build with the `fault` feature (cargo build --features fault)",
    ))
}

/// Send a session's whole image to `io` in chunks; returns its length.
fn export(e: &Engine, session: SessionId, io: &mut dyn Channel) -> Result<u64> {
    let s = e.session(session)?;
    let len = s.map.image_len();
    let chunk = 4u64 << 20;
    let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(1 << 22)];
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
        e.read_image(session, off, b)?;
        io.output(b)?;
        off += n;
    }
    Ok(len)
}

fn status_text(out: &mut String, e: &Engine, json: bool) -> Result<()> {
    use std::fmt::Write as _;
    let st = e.status();
    if json {
        let s = serde_json::to_string_pretty(&st)
            .map_err(|er| Error::invalid("json", er.to_string()))?;
        let _ = writeln!(out, "{s}");
        return Ok(());
    }
    if st.is_empty() {
        let _ = writeln!(out, "no sessions");
    }
    for s in st {
        let pct = if s.grains_total == 0 {
            100.0
        } else {
            100.0 * s.grains_copied as f64 / s.grains_total as f64
        };
        let _ = writeln!(
            out,
            "s{} {} {:?} grain {} {} -> {} extents {} copied {}/{} ({pct:.1}%){}{}",
            s.id,
            s.state,
            s.mode,
            format_size(s.grain_bytes),
            s.source,
            s.target,
            s.extents.len(),
            s.grains_copied,
            s.grains_total,
            s.reason.map(|r| format!(" reason {r}")).unwrap_or_default(),
            s.unavailable
                .map(|p| format!("; volume {p}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "backend {}{}",
        e.backend_name(),
        if e.direct() { " (O_DIRECT)" } else { "" }
    );
    Ok(())
}
