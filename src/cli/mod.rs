//! The `timezero` binary's commands. No engine logic lives here: each command parses its
//! arguments, calls the library, and prints.

mod args;
mod demo;

pub use crate::command::{check_volume, execute, Remote};
pub use args::parse_extent;

use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::command::{output, volume_id, Channel};
use crate::engine::{Engine, EngineOptions, RestartPolicy};
use crate::ids::SessionId;
use crate::{Error, Result};

use output::json;

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
        /// Open a table file that is older than its rollback witness (put back from an older
        /// copy): every active session is terminated (reason TableRolledBack) and no image of
        /// it is served.
        #[arg(long)]
        accept_rollback: bool,
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
        /// Bytes per second (e.g. 100MiB; at least 1).
        #[arg(value_parser = args::rate)]
        bytes_per_s: u64,
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
        Err(Fail::Run(e @ Error::Interrupted(_))) => {
            eprintln!("timezero: {e}");
            130
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

/// The bytes of `write --from FROM [--len LEN]` and their length: a regular file is read as
/// it is sent (LEN defaults to its size and may not exceed it); anything else (a pipe,
/// `/dev/zero`) needs LEN (checked by `check_write_input`) and is read completely first, so a
/// short pipe writes nothing.
fn write_input(from: &Path, len: Option<u64>) -> Result<(Box<dyn Read>, u64)> {
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
fn not_regular(shown: &str, meta: &std::fs::Metadata) -> String {
    let what = crate::command::file_kind(&meta.file_type());
    format!("{shown} is {what}; give --len (at most 64MiB)")
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
    /// A file, written under a temporary name in its directory (created at the first bytes,
    /// or at the end when there are none) and renamed into place by [`Local::finish`]; it
    /// replaces an existing file only when the flag is set. A command that fails leaves
    /// nothing (the temporary file is removed).
    File(PathBuf, Option<tempfile::NamedTempFile>, bool),
}

/// The local side of a command: the terminal, Ctrl-C, and the files named on the command line.
#[derive(Default)]
struct Local {
    /// The bytes of `write --from` and that file's name.
    input: Option<(Box<dyn Read>, String)>,
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
    fn finish(&mut self) -> Result<()> {
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
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())
            .and_then(|_| signal_hook::flag::register(sig, flag.clone()))
            .map_err(|e| Error::io("install signal handler", "SIGINT/SIGTERM", 0, e))?;
    }
    Ok(flag)
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
            &mut Local::default(),
        )?,
        Command::Status { table, json } => status_command(&table, json)?,
        Command::Copy {
            table,
            session,
            rate,
            threads,
            batch,
            convert,
            json,
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
                    json,
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
            len,
            json,
        } => {
            check_write_input(&from, len)?;
            let (input, len) = write_input(&from, len)?;
            let mut ch = Local {
                input: Some((input, from.display().to_string())),
                ..Local::default()
            };
            let cmd = Remote::Write {
                volume,
                offset,
                len,
                json,
            };
            local_or_remote(&table, cmd, io, &mut ch)?
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
            &mut Local::default(),
        )?,
        Command::Reset {
            table,
            volume,
            json,
        } => local_or_remote(
            &table,
            Remote::Reset { volume, json },
            io,
            &mut Local::default(),
        )?,
        Command::Read {
            table,
            session,
            offset,
            len,
            to,
            json: as_json,
        } => {
            let mut ch = Local {
                sink: to
                    .clone()
                    .map_or(Sink::Stdout, |p| Sink::File(p, None, true)),
                ..Local::default()
            };
            let cmd = Remote::Read {
                session: session.0,
                offset,
                len,
            };
            local_or_remote(&table, cmd, io, &mut ch)?;
            ch.finish()?;
            match to {
                Some(p) if as_json => json(&output::ImageOut {
                    session: session.to_string(),
                    offset,
                    bytes: len,
                    output: p.display().to_string(),
                })?,
                _ => String::new(),
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
            let mut ch = Local {
                sink: Sink::File(output.clone(), None, force),
                ..Local::default()
            };
            let cmd = Remote::Export { session: session.0 };
            local_or_remote(&table, cmd, io, &mut ch)?;
            ch.finish()?;
            let o = output::ImageOut {
                session: session.to_string(),
                offset: 0,
                bytes: ch.written,
                output: output.display().to_string(),
            };
            if as_json {
                json(&o)?
            } else {
                format!("exported {} bytes of {session} to {}\n", o.bytes, o.output)
            }
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
            accept_rollback,
            json: as_json,
        } => {
            let restart = if terminate_incomplete {
                RestartPolicy::TerminateIncomplete
            } else {
                RestartPolicy::Resume
            };
            let e = Engine::open_path(
                &table,
                EngineOptions {
                    accept_rollback,
                    ..io.engine_options(restart)
                },
            )?;
            let o = output::RecoverOut {
                open: e.open_report.clone(),
                decisions: crate::command::decisions_out(&e, &e.decisions),
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
            max_connections,
            max_connections_per_export,
            handshake_timeout,
            idle_timeout,
        } => {
            if let Some(a) = &listen {
                check_listen(a, allow_remote)?;
            }
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

/// `status`: the serving process's live state when one serves the table, else the committed
/// state read without taking the table (never a reconcile: `status` changes nothing).
fn status_command(table: &Path, as_json: bool) -> Result<String> {
    // Only a process that holds the table can be serving it: a control socket nobody holds the
    // table behind is stale (or not ours) and is not asked.
    if crate::activity::table_holder(table).is_some() {
        let sock = crate::control::socket_path(table);
        if let Ok(c) = crate::control::connect(&sock) {
            let cmd = Remote::Status { json: as_json };
            return crate::control::request(&sock, Some(c), &cmd, &mut Local::default(), None);
        }
    }
    let snap = crate::engine::read_status(table)?;
    let o = output::StatusOut {
        sessions: snap.sessions.iter().map(output::SessionOut::of).collect(),
        backend: None,
        direct: None,
        held_by: snap.holder,
        rolled_back: snap.rolled_back,
    };
    if as_json {
        json(&o)
    } else {
        Ok(o.text())
    }
}
