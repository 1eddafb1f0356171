//! The `timezero` binary's commands. No engine logic lives here: each command parses its
//! arguments, calls the library, and prints.

mod args;
mod demo;
mod guard;
mod output;

pub use args::parse_extent;
pub use guard::check_volume;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::activity::format::{CopyMode, SessionState};
use crate::copier::{Copier, CopierOptions};
use crate::engine::{Engine, EngineOptions, Outcome, RestartPolicy, SessionSpec};
use crate::ids::{GrainSize, SessionId};
use crate::{Error, Result};

use output::{json, DecisionOut};

/// Crash-consistent point-in-time (time zero) copies of block storage.
#[derive(Debug, Parser)]
#[command(name = "timezero", version, about, after_help = args::SIZES_HELP)]
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

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new, empty activity table.
    #[command(after_help = args::SIZES_HELP)]
    Init {
        /// Path of the table file (must not exist).
        table: PathBuf,
        /// Bytes per journal copy (128KiB to 1GiB, a multiple of 512 bytes).
        #[arg(long, value_parser = args::journal, default_value = "8MiB")]
        journal: u64,
        /// Bytes per checkpoint area (64KiB to 4GiB, a multiple of 4KiB); bounds the bitmaps
        /// of all sessions (8MiB covers 4 TiB of source at a 64 KiB grain).
        #[arg(long, value_parser = args::capacity, default_value = "8MiB")]
        capacity: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Establish a session (T0 is now) and print its id, direction and T0.
    ///
    /// The target is refused when it visibly holds data in the ranges the session would
    /// overwrite (a file-system or partition-table signature, or non-zero bytes in the first or
    /// last MiB) unless --force is given.
    #[command(after_help = args::SIZES_HELP)]
    Establish {
        /// The table.
        table: PathBuf,
        /// Source volume (file or block device).
        source: PathBuf,
        /// Target volume.
        target: PathBuf,
        /// Source extent OFFSET:LEN, optionally @TARGET_OFFSET (default: same offset); repeat
        /// for more. Default: the whole source.
        #[arg(long = "extent", value_parser = args::extent)]
        extents: Vec<String>,
        /// Grain size (power of two, 4KiB to 1MiB).
        #[arg(long, value_parser = args::grain, default_value = "64KiB")]
        grain: u64,
        /// Copy-before-write only: no background copy until converted.
        #[arg(long)]
        nocopy: bool,
        /// Establish even when the target holds data (it will be overwritten).
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    #[command(after_help = args::SIZES_HELP)]
    Copy {
        /// The table.
        table: PathBuf,
        /// Only this session.
        session: Option<SessionId>,
        /// Rate limit in bytes per second (e.g. 100MiB; at least 1).
        #[arg(long, value_parser = args::rate)]
        rate: Option<u64>,
        /// Worker threads (1 to 64).
        #[arg(long, value_parser = args::threads, default_value = "2")]
        threads: usize,
        /// Bytes per copy request (4KiB to 4MiB) [default: 1MiB].
        #[arg(long, value_parser = args::batch)]
        batch: Option<u64>,
        /// Convert the session to copy mode first if it is a no-copy session.
        #[arg(long)]
        convert: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a file's bytes to a volume through the engine (copy-before-write). The whole
    /// range is checked against the volume before the first byte is written.
    #[command(after_help = args::SIZES_HELP)]
    Write {
        /// The table.
        table: PathBuf,
        /// The volume (source or target of sessions in the table, or any file).
        volume: PathBuf,
        /// Byte offset.
        #[arg(value_parser = args::size)]
        offset: u64,
        /// File with the bytes to write.
        #[arg(long)]
        from: PathBuf,
        /// Bytes to write (default: the whole --from file). Required when --from is not a
        /// regular file (a pipe or a device such as /dev/zero); then at most 64MiB, read
        /// completely before anything is written.
        #[arg(long, value_parser = args::size)]
        len: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        #[arg(long, value_parser = args::size, default_value = "256MiB")]
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
    #[command(after_help = args::SIZES_HELP)]
    Read {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
        /// Image offset.
        #[arg(value_parser = args::size)]
        offset: u64,
        /// Length (1 byte to 64MiB; `export` writes a whole image).
        #[arg(value_parser = args::read_len)]
        len: u64,
        /// Write to this file instead of standard output.
        #[arg(long)]
        to: Option<PathBuf>,
        /// With --to: print what was written as JSON.
        #[arg(long, requires = "to")]
        json: bool,
    },
    /// Write a session's whole T0 image to a file (built under a temporary name in the same
    /// directory and renamed into place when complete).
    Export {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
        /// Output file (must not exist unless --force).
        output: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a session.
    Withdraw {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    },
    /// Ask the process serving a table to stop.
    Stop {
        /// The table.
        table: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the fault-injection crash-state enumerator (needs the `fault` feature).
    #[cfg_attr(not(feature = "fault"), command(hide = true))]
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
        #[arg(long, value_parser = args::rate, default_value = "8MiB")]
        rate: u64,
    },
}

/// Why a command failed: a usage error (exit 2) or a runtime error (exit 1).
#[derive(Debug)]
enum Fail {
    /// The arguments are wrong: exit 2.
    Usage(String),
    /// A runtime error with its own message: exit 1.
    Message(String),
    /// A library error: exit 1.
    Run(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Run(e)
    }
}

/// A clap error as one line: the message without the usage block that follows it.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let head = text
        .split("\n\nUsage:")
        .next()
        .unwrap_or_default()
        .split("\n\nFor more information")
        .next()
        .unwrap_or_default();
    let joined = head.split_whitespace().collect::<Vec<_>>().join(" ");
    let msg = joined.strip_prefix("error: ").unwrap_or(&joined);
    format!("{msg} (see --help)")
}

/// Run the CLI; returns the process exit code (0 ok, 1 error, 2 usage).
#[must_use]
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            eprintln!("timezero: {}", one_line(&e));
            return 2;
        }
        Err(e) => {
            let _ = e.print();
            return 0;
        }
    };
    match run(cli.command, cli.io) {
        Ok(()) => 0,
        Err(Fail::Usage(m)) => {
            eprintln!("timezero: {m}");
            2
        }
        Err(Fail::Message(m)) => {
            eprintln!("timezero: {m}");
            1
        }
        Err(Fail::Run(e)) => {
            eprintln!("timezero: {e}");
            1
        }
    }
}

fn open(table: &Path, restart: RestartPolicy, io: IoFlags) -> Result<Engine> {
    Engine::open_path(table, io.engine_options(restart))
}

/// The attached volume at `path`, attaching it after [`check_volume`] when it is not yet.
fn volume_id(engine: &Engine, path: &Path) -> Result<crate::ids::VolumeId> {
    check_volume(path, Path::new(&engine.table().name()))?;
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
        /// Establish even when the target holds data.
        #[serde(default)]
        force: bool,
        /// JSON output.
        #[serde(default)]
        json: bool,
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
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `withdraw`.
    Withdraw {
        /// Session.
        session: u64,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `reset`.
    Reset {
        /// Volume path.
        volume: PathBuf,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
    /// `write`.
    Write {
        /// Volume path.
        volume: PathBuf,
        /// Offset.
        offset: u64,
        /// Source file of the bytes.
        from: PathBuf,
        /// Bytes to write (default: the size of `from`, which must then be a regular file).
        #[serde(default)]
        len: Option<u64>,
        /// JSON output.
        #[serde(default)]
        json: bool,
    },
}

/// Run a [`Remote`] command on an open engine.
///
/// # Errors
/// The command's errors.
pub fn execute(e: &Arc<Engine>, cmd: &Remote, progress: bool) -> Result<String> {
    match cmd {
        Remote::Establish {
            source,
            target,
            extents,
            grain,
            nocopy,
            force,
            json: as_json,
        } => {
            let spec = SessionSpec {
                source: volume_id(e, source)?,
                target: volume_id(e, target)?,
                extents: extents
                    .iter()
                    .map(|s| parse_extent(s))
                    .collect::<Result<Vec<_>>>()?,
                grain: GrainSize::new(*grain)?,
                mode: if *nocopy {
                    CopyMode::NoCopy
                } else {
                    CopyMode::Copy
                },
            };
            if !force {
                refuse_target_with_data(e, &spec, target)?;
            }
            let id = e.establish(&spec)?;
            let st = e
                .status()
                .into_iter()
                .find(|s| s.id == id.0)
                .ok_or(Error::UnknownSession(id))?;
            let o = output::EstablishOut::new(
                &st,
                source.display().to_string(),
                target.display().to_string(),
            );
            if *as_json {
                json(&o)
            } else {
                Ok(o.text())
            }
        }
        Remote::Status { json: as_json } => {
            let o = output::StatusOut {
                sessions: e.status().iter().map(output::SessionOut::of).collect(),
                backend: e.backend_name().to_string(),
                direct: e.direct(),
            };
            if *as_json {
                json(&o)
            } else {
                Ok(o.text())
            }
        }
        Remote::Copy {
            session,
            rate,
            threads,
            batch,
            convert,
            json: as_json,
        } => copy(
            e,
            session.map(SessionId),
            *rate,
            *threads,
            *batch,
            *convert,
            *as_json,
            progress,
        ),
        Remote::Withdraw {
            session,
            json: as_json,
        } => {
            let id = SessionId(*session);
            e.withdraw(id)?;
            let o = output::SessionStateOut {
                session: id.to_string(),
                state: SessionState::Withdrawn.to_string(),
            };
            if *as_json {
                json(&o)
            } else {
                Ok(format!("{} {}\n", o.session, o.state))
            }
        }
        Remote::Reset {
            volume,
            json: as_json,
        } => reset(e, volume, *as_json),
        Remote::Write {
            volume,
            offset,
            from,
            len,
            json: as_json,
        } => {
            let vid = volume_id(e, volume)?;
            let done = write_from(e, vid, volume, *offset, from, *len)?;
            let o = output::WriteOut {
                volume: volume.display().to_string(),
                offset: *offset,
                bytes: done,
            };
            if *as_json {
                json(&o)
            } else {
                Ok(format!("wrote {done} bytes at {offset} of {}\n", o.volume))
            }
        }
    }
}

/// The establish policy of the command line: refuse a target that visibly holds data in the
/// ranges the session would overwrite.
fn refuse_target_with_data(e: &Engine, spec: &SessionSpec, target: &Path) -> Result<()> {
    let ranges: Vec<(u64, u64)> = if spec.extents.is_empty() {
        let size = e.volume(spec.source)?.size();
        vec![(0, size - size % spec.grain.bytes())]
    } else {
        spec.extents
            .iter()
            .map(|x| (x.target_offset, x.len))
            .collect()
    };
    match crate::volume::visible_data(e.volume(spec.target)?.as_ref(), &ranges)? {
        Some(found) => Err(Error::HoldsData {
            path: target.display().to_string(),
            found,
        }),
        None => Ok(()),
    }
}

/// The decision texts of a reset or an open, with the sessions' states now.
fn decisions_out(e: &Engine, ds: &[crate::engine::Decision]) -> Vec<DecisionOut> {
    ds.iter()
        .map(|d| {
            let state = e.session(SessionId(d.session)).ok().map(|s| s.state());
            DecisionOut::of(d, state)
        })
        .collect()
}

fn reset(e: &Engine, volume: &Path, as_json: bool) -> Result<String> {
    let canon = std::fs::canonicalize(volume)
        .map_err(|er| Error::io("open", volume.display().to_string(), 0, er))?;
    let l = canon.display().to_string();
    let uses =
        |x: &crate::session::Session| x.desc.source.locator == l || x.desc.target.locator == l;
    let id_in = |x: &crate::session::Session| {
        if x.desc.source.locator == l {
            x.desc.source.id
        } else {
            x.desc.target.id
        }
    };
    // The identity the table knows for this path: an active session's first (a stale,
    // ended session may name an earlier file at the same path).
    let sessions = e.table().sessions();
    let old = sessions
        .iter()
        .filter(|x| uses(x))
        .max_by_key(|x| (x.is_active(), x.id()))
        .map(|x| id_in(x))
        .ok_or_else(|| Error::UnknownVolume(volume.display().to_string()))?;
    // A local open has already reconciled every session with the volumes as they are
    // now (the same comparison a reset makes): report what it decided for this volume.
    let mut decided: Vec<crate::engine::Decision> = e
        .decisions
        .iter()
        .filter(|d| {
            sessions.iter().any(|x| x.id().0 == d.session && uses(x))
                && matches!(
                    d.outcome,
                    Outcome::Terminated(_) | Outcome::ResumedPartly(_)
                )
        })
        .cloned()
        .collect();
    let now = e.open_file(volume)?;
    decided.extend(e.reset(old, Some(now))?);
    let o = output::ResetOut {
        volume: volume.display().to_string(),
        decisions: decisions_out(e, &decided),
    };
    if as_json {
        return json(&o);
    }
    if o.decisions.is_empty() {
        return Ok(format!("no active session uses {}\n", o.volume));
    }
    Ok(o.decisions.iter().map(|d| d.text() + "\n").collect())
}

/// Write `len` bytes (default: all) of the file `from` at `offset` of volume `vid`, then
/// flush. The whole range is checked before the first byte is written; input that is not a
/// regular file is read completely first (so a short pipe writes nothing).
fn write_from(
    e: &Engine,
    vid: crate::ids::VolumeId,
    volume: &Path,
    offset: u64,
    from: &Path,
    len: Option<u64>,
) -> Result<u64> {
    use std::io::Read as _;
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
    if !regular && len > crate::limits::IO_BYTES_MAX {
        return Err(Error::invalid(
            "--len",
            format!("{len} bytes from {shown}, which is not a regular file (at most 64MiB)"),
        ));
    }
    let size = e.volume(vid)?.size();
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(Error::invalid(
            "write",
            format!(
                "{len} bytes at offset {offset} do not fit {} ({size} bytes); nothing was written",
                volume.display()
            ),
        ));
    }
    let f = std::fs::File::open(from).map_err(|er| Error::io("open", &shown, 0, er))?;
    let mut input = f.take(len);
    let short = |got: u64| {
        Error::invalid(
            "--from",
            format!("{shown} ended after {got} of {len} bytes"),
        )
    };
    if !regular {
        let mut all = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        input
            .read_to_end(&mut all)
            .map_err(|er| Error::io("read", &shown, 0, er))?;
        if (all.len() as u64) < len {
            return Err(short(all.len() as u64));
        }
        e.write(vid, offset, &all)?;
        e.flush(vid)?;
        return Ok(len);
    }
    // Bounded memory whatever the file's size: write it in chunks.
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    while done < len {
        let n = input
            .read(&mut buf)
            .map_err(|er| Error::io("read", &shown, done, er))?;
        if n == 0 {
            return Err(short(done));
        }
        e.write(vid, offset + done, &buf[..n])?;
        done += n as u64;
    }
    e.flush(vid)?;
    Ok(done)
}

/// Why a `--from` that is not a regular file needs `--len`.
fn not_regular(shown: &str, meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::FileTypeExt as _;
    let ft = meta.file_type();
    let what = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    format!("{shown} is {what}; give --len (at most 64MiB)")
}

#[allow(clippy::too_many_arguments, reason = "the flags of one command")]
fn copy(
    e: &Arc<Engine>,
    session: Option<SessionId>,
    rate: Option<u64>,
    threads: usize,
    batch: Option<u64>,
    convert: bool,
    as_json: bool,
    progress: bool,
) -> Result<String> {
    if let Some(id) = session {
        let s = e.session(id)?;
        let state = s.status().state;
        if state == SessionState::Completed {
            let o = output::SessionStateOut {
                session: id.to_string(),
                state: state.to_string(),
            };
            return if as_json {
                json(&o)
            } else {
                Ok(format!("{id} completed\n"))
            };
        }
        if !s.is_active() {
            return Err(Error::NotActive {
                id,
                state: state.to_string(),
            });
        }
        if convert {
            e.convert_to_copy(id)?;
        } else if s.status().mode == CopyMode::NoCopy {
            return Err(Error::invalid(
                "copy",
                format!("{id} is a no-copy session; pass --convert to convert it"),
            ));
        }
    }
    let mut opts = CopierOptions {
        threads,
        rate_bytes_per_s: rate,
        sessions: session.into_iter().collect(),
        ..CopierOptions::default()
    };
    if let Some(b) = batch {
        opts.batch_bytes = b;
    }
    let c = Copier::start(e.clone(), opts)?;
    let tty = progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = std::time::Instant::now();
    while !c.finished() {
        std::thread::sleep(Duration::from_millis(100));
        if progress && (tty || last.elapsed() >= Duration::from_secs(2)) {
            last = std::time::Instant::now();
            let p = c.progress();
            let pct = if p.grains_total == 0 {
                100.0
            } else {
                100.0 * p.grains_copied as f64 / p.grains_total as f64
            };
            let eta = p.eta_s.map_or("?".to_string(), |s| format!("{s:.0}s"));
            let end = if tty { "\r" } else { "\n" };
            eprint!(
                "copy {pct:5.1}% {}/{} grains {:.1} MiB/s eta {eta}   {end}",
                p.grains_copied,
                p.grains_total,
                p.bytes_per_s / 1_048_576.0
            );
        }
    }
    let p = c.join()?;
    if tty {
        eprintln!();
    }
    let o = output::CopyOut {
        bytes_copied: p.bytes_copied,
        grains_copied: p.grains_copied,
        grains_total: p.grains_total,
        backend: e.backend_name().to_string(),
        sessions: e
            .status()
            .iter()
            .map(|s| output::SessionStateOut {
                session: SessionId(s.id).to_string(),
                state: s.state.to_string(),
            })
            .collect(),
    };
    if as_json {
        return json(&o);
    }
    let mut out = format!(
        "copied {} bytes; {}/{} grains; backend {}\n",
        o.bytes_copied, o.grains_copied, o.grains_total, o.backend
    );
    for s in &o.sessions {
        out.push_str(&format!("{} {}\n", s.session, s.state));
    }
    Ok(out)
}

/// Run `cmd` on the table: locally, or through the control socket of the process serving it.
fn local_or_remote(table: &Path, cmd: Remote, io: IoFlags) -> Result<String> {
    match open(table, RestartPolicy::Resume, io) {
        Ok(e) => execute(&Arc::new(e), &cmd, true),
        Err(Error::Locked { path, holder }) => {
            match crate::control::request(&crate::control::socket_path(table), &cmd) {
                Ok(r) => r,
                Err(_) => Err(Error::Locked { path, holder }),
            }
        }
        Err(e) => Err(e),
    }
}

fn run(cmd: Command, io: IoFlags) -> std::result::Result<(), Fail> {
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
            json: as_json,
        } => init(&table, journal, capacity, as_json)?,
        Command::Establish {
            table,
            source,
            target,
            extents,
            grain,
            nocopy,
            force,
            json,
        } => local_or_remote(
            &table,
            Remote::Establish {
                source,
                target,
                extents,
                grain,
                nocopy,
                force,
                json,
            },
            io,
        )?,
        Command::Status { table, json } => local_or_remote(&table, Remote::Status { json }, io)?,
        Command::Copy {
            table,
            session,
            rate,
            threads,
            batch,
            convert,
            json,
        } => local_or_remote(
            &table,
            Remote::Copy {
                session: session.map(|s| s.0),
                rate,
                threads,
                batch,
                convert,
                json,
            },
            io,
        )?,
        Command::Write {
            table,
            volume,
            offset,
            from,
            len,
            json,
        } => {
            check_write_input(&from, len)?;
            local_or_remote(
                &table,
                Remote::Write {
                    volume,
                    offset,
                    from,
                    len,
                    json,
                },
                io,
            )?
        }
        Command::Withdraw {
            table,
            session,
            json,
        } => local_or_remote(
            &table,
            Remote::Withdraw {
                session: session.0,
                json,
            },
            io,
        )?,
        Command::Reset {
            table,
            volume,
            json,
        } => local_or_remote(&table, Remote::Reset { volume, json }, io)?,
        Command::Read {
            table,
            session,
            offset,
            len,
            to,
            json: as_json,
        } => {
            let e = open(&table, RestartPolicy::Resume, io)?;
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
            e.read_image(session, offset, &mut buf)?;
            match to {
                Some(p) => {
                    write_complete(&p, true, |f| {
                        f.write_all(&buf)
                            .map_err(|er| Error::io("write", p.display().to_string(), 0, er))
                    })?;
                    let o = output::ImageOut {
                        session: session.to_string(),
                        offset,
                        bytes: len,
                        output: p.display().to_string(),
                    };
                    if as_json {
                        json(&o)?
                    } else {
                        String::new()
                    }
                }
                None => {
                    out.write_all(&buf)
                        .map_err(|er| Error::io("write", "standard output", 0, er))?;
                    String::new()
                }
            }
        }
        Command::Export {
            table,
            session,
            output,
            force,
            json: as_json,
        } => {
            if !force && output.symlink_metadata().is_ok() {
                return Err(Fail::Message(format!(
                    "{} exists; pass --force to replace it",
                    output.display()
                )));
            }
            let e = open(&table, RestartPolicy::Resume, io)?;
            let n = export(&e, session, &output, force)?;
            let o = output::ImageOut {
                session: session.to_string(),
                offset: 0,
                bytes: n,
                output: output.display().to_string(),
            };
            if as_json {
                json(&o)?
            } else {
                format!("exported {n} bytes of {session} to {}\n", o.output)
            }
        }
        Command::Recover {
            table,
            terminate_incomplete,
            json: as_json,
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
            let o = output::RecoverOut {
                open: e.open_report.clone(),
                decisions: decisions_out(&e, &e.decisions),
            };
            if as_json {
                json(&o)?
            } else {
                o.text()
            }
        }
        Command::Serve {
            table,
            socket,
            listen,
            allow_remote,
            writable_images,
            volumes,
        } => {
            if let Some(a) = &listen {
                check_listen(a, allow_remote)?;
            }
            serve(
                &table,
                socket,
                listen,
                allow_remote,
                writable_images,
                &volumes,
                io,
            )?;
            String::new()
        }
        Command::Stop {
            table,
            json: as_json,
        } => {
            let sock = crate::control::socket_path(&table);
            if let Err(er) = crate::control::shutdown(&sock) {
                return Err(match er {
                    Error::Io { ref source, .. }
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        Fail::Message(format!("no server is running for {}", table.display()))
                    }
                    er => Fail::Run(er),
                });
            }
            let o = output::StopOut {
                table: table.display().to_string(),
                asked: true,
            };
            if as_json {
                json(&o)?
            } else {
                format!("asked the server of {} to stop\n", o.table)
            }
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
                    Fail::Usage(format!(
                        "--eio-points '{eio_points}' is not a number or 'all'"
                    ))
                })?
            };
            crashtest(workloads, seed, json, points)?;
            String::new()
        }
    };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

fn init(table: &Path, journal: u64, capacity: u64, as_json: bool) -> Result<String> {
    let opts = EngineOptions {
        table: crate::activity::TableOptions {
            journal_bytes: journal,
            checkpoint_bytes: capacity,
        },
        ..EngineOptions::default()
    };
    let e = Engine::create_path(table, opts)?;
    let l = e.table().layout();
    let o = output::InitOut {
        table: table.display().to_string(),
        bytes: l.file_bytes(),
        journal_bytes: l.journal_bytes,
        checkpoint_bytes: l.checkpoint_bytes,
    };
    if as_json {
        return json(&o);
    }
    Ok(format!(
        "created {} ({} bytes: journal 2x{}, checkpoints 2x{})\n",
        o.table,
        o.bytes,
        crate::units::format_size(o.journal_bytes),
        crate::units::format_size(o.checkpoint_bytes)
    ))
}

/// `write --from`: input that is not a regular file needs `--len` (a FIFO would otherwise
/// block, a device never end), at most 64 MiB of it.
fn check_write_input(from: &Path, len: Option<u64>) -> std::result::Result<(), Fail> {
    let shown = from.display().to_string();
    // stat, not open: opening a FIFO blocks until a writer appears.
    let meta = std::fs::metadata(from).map_err(|er| Error::io("stat", &shown, 0, er))?;
    if meta.is_file() {
        return Ok(());
    }
    match len {
        None => Err(Fail::Usage(format!(
            "--from {}",
            not_regular(&shown, &meta)
        ))),
        Some(l) if l > crate::limits::IO_BYTES_MAX => Err(Fail::Usage(format!(
            "--len {l} is over 64MiB, the most read from {shown}, which is not a regular file"
        ))),
        Some(_) => Ok(()),
    }
}

/// `serve --listen`: a non-loopback address needs `--allow-remote`.
fn check_listen(addr: &str, allow_remote: bool) -> std::result::Result<(), Fail> {
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

fn serve(
    table: &Path,
    socket: Option<PathBuf>,
    listen: Option<String>,
    allow_remote: bool,
    writable_images: bool,
    volumes: &[PathBuf],
    io: IoFlags,
) -> Result<()> {
    use crate::nbd::{EngineRegistry, NbdConfig, NbdServer};
    let e = Arc::new(open(table, RestartPolicy::Resume, io)?);
    for v in volumes {
        volume_id(&e, v)?;
    }
    let registry = Arc::new(EngineRegistry::new(e.clone(), writable_images));
    let server = NbdServer::new(
        registry.clone(),
        NbdConfig {
            allow_remote,
            ..NbdConfig::default()
        },
    );
    let sock = socket.unwrap_or_else(|| {
        let mut p = table.as_os_str().to_owned();
        p.push(".nbd");
        PathBuf::from(p)
    });
    let _ = std::fs::remove_file(&sock);
    let unix = server.serve_unix(&sock)?;
    let tcp = listen.map(|a| server.serve_tcp(a.as_str())).transpose()?;
    let control =
        crate::control::ControlServer::start(e.clone(), &crate::control::socket_path(table))?;
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
fn crashtest(
    _workloads: usize,
    _seed: u64,
    _json: bool,
    _eio_points: usize,
) -> std::result::Result<(), Fail> {
    Err(Fail::Usage(
        "crashtest is not in this build; run it with \
         `cargo run --release --features fault -- crashtest ...`"
            .to_string(),
    ))
}

/// Write a session's whole image to `output`; returns bytes written.
fn export(e: &Engine, session: SessionId, output: &Path, replace: bool) -> Result<u64> {
    let s = e.session(session)?;
    let len = s.map.image_len();
    let shown = output.display().to_string();
    write_complete(output, replace, |f| {
        let chunk = 4u64 << 20;
        let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(1 << 22)];
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            let b = &mut buf[..usize::try_from(n).unwrap_or(0)];
            e.read_image(session, off, b)?;
            f.write_all(b)
                .map_err(|er| Error::io("write", &shown, off, er))?;
            off += n;
        }
        Ok(())
    })?;
    Ok(len)
}

/// Write a file through `fill` under a temporary name in `output`'s directory, sync it and
/// rename it into place (replacing an existing file only when `replace`), then sync the
/// directory: a failure leaves no partial file.
fn write_complete(
    output: &Path,
    replace: bool,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let shown = output.display().to_string();
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|er| Error::io("create", &shown, 0, er))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file()
        .sync_all()
        .map_err(|er| Error::io("fsync", &shown, 0, er))?;
    let placed = if replace {
        tmp.persist(output)
    } else {
        tmp.persist_noclobber(output)
    };
    placed.map_err(|er| Error::io("rename into", &shown, 0, er.error))?;
    crate::volume::sync_dir(dir)
}
