//! The command line as clap parses it: the global I/O flags and one variant per command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::args;
use crate::engine::{EngineOptions, RestartPolicy};
use crate::ids::SessionId;

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
    /// Servers (`serve`, `mount`, `daemon`): hold a first write (one that copies its grains'
    /// T0 bytes) in memory until the client's next flush, FUA write or fsync, which makes all
    /// held writes durable at one target flush and one table commit (reads see held writes; a
    /// crash loses only writes no flush covered, as with any volatile write cache). The
    /// default for servers; the flag only states it.
    #[arg(long, global = true, conflicts_with = "write_through")]
    pub write_back: bool,
    /// Servers (`serve`, `mount`, `daemon`): acknowledge a write only once it is on its volume,
    /// and a first write only once its T0 copy is durable (two durability points before the
    /// source write; about half the speed of write-back through NBD, docs/benchmarks.md), for
    /// clients that never flush.
    #[arg(long, global = true)]
    pub write_through: bool,
    /// Serial copy-before-write: a first write flushes the target, then commits the copied
    /// bits, then writes the source (three durability points in series). By default the
    /// target's flush and the table's commit run side by side instead, the table recording a
    /// CRC32C per grain that recovery proves against the target (docs/crash-model.md).
    #[arg(long, global = true)]
    pub serial_copies: bool,
    /// Background copies (`copy`, `daemon`, the copy of `serve` and `mount`): copy every grain
    /// through memory. By default a run from a buffered file to a buffered file is copied by
    /// the kernel (copy_file_range), which shares the blocks instead on XFS and Btrfs (reflink:
    /// the target then takes no space until either file is written there).
    #[arg(long, global = true)]
    pub no_copy_offload: bool,
}

/// The `--backend` values (see [`crate::volume::Backend`]).
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
    pub fn backend(&self) -> crate::volume::Backend {
        use crate::volume::Backend;
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
            checked_copies: !self.serial_copies,
            copy_offload: !self.no_copy_offload,
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
        /// Bytes of the copy log (0, or 64KiB to 1GiB, a multiple of 4KiB): the T0 bytes of
        /// first writes are made durable there with their record, in one sync, and the
        /// targets are flushed later; 0 makes every first write wait for its target's flush.
        #[arg(long = "log-size", value_parser = args::log_size, default_value = "16MiB")]
        log_size: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Establish a session (T0 is now) and print its id, direction and T0.
    ///
    /// With more SOURCE TARGET pairs (or --group), establish a consistency group: every pair
    /// at one T0, all durable in one commit (all or none, also after a crash), one line per
    /// session in pair order.
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
        /// More SOURCE TARGET pairs: a consistency group (whole volumes).
        #[arg(value_name = "SOURCE TARGET")]
        more: Vec<PathBuf>,
        /// Name of the consistency group (letters, digits, '.', '_', '-'; at most 64 bytes;
        /// default with several pairs: group-N after the first session's number).
        #[arg(long)]
        group: Option<String>,
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
        /// Record which grains change after T0 (copy mode), so that `refresh` later takes a new
        /// T0 and copies only those.
        #[arg(long, conflicts_with = "nocopy")]
        incremental: bool,
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
        /// Requests each worker has in flight in each direction (1 to 16) [default: 4].
        #[arg(long, value_parser = args::depth)]
        depth: Option<usize>,
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
        /// Directory for the activity table, and for the stand-in journal of the rule-2
        /// floor, when they should live on another device than the volumes (default: with
        /// the volumes).
        #[arg(long)]
        table_dir: Option<PathBuf>,
        /// Bytes of the table's copy log (0: none, so first writes wait for the target's
        /// flush as well as for their record).
        #[arg(long = "log-size", value_parser = args::log_size, default_value = "16MiB")]
        log_size: u64,
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
    /// End a session, or with --group every live session of a consistency group (in one
    /// commit).
    Withdraw {
        /// The table.
        table: PathBuf,
        /// Session id.
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        session: Option<SessionId>,
        /// End every live session of this group.
        #[arg(long)]
        group: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take a new T0 for an incremental session (established with --incremental; active or
    /// completed), or with --group for every session of a consistency group in one commit,
    /// and print how much the copy now moves: only the grains written since the last T0. Run
    /// `copy` to move them.
    Refresh {
        /// The table.
        table: PathBuf,
        /// Session id.
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        session: Option<SessionId>,
        /// Refresh every session of this consistency group.
        #[arg(long)]
        group: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reverse restore: make the session's source hold its image again. Through timezero
    /// (`serve`'s exports, a process linking the library) the source reads as the image as
    /// soon as this returns; the grains that differ move back in the background (`copy`, or
    /// --wait here). Only grains that may differ move: those copied since T0, or, for a
    /// completed session, those marked changed (every grain when changes were not recorded).
    /// Other sessions on the source keep their T0.
    Reverse {
        /// The table.
        table: PathBuf,
        /// Session id.
        session: SessionId,
        /// Move every grain back before returning (the source file is then the image by
        /// itself).
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an ended session (completed, withdrawn, terminated) from the table, or with
    /// --ended every ended session; active and suspended sessions are refused. (An establish
    /// that needs room forgets the oldest ended sessions on its own; `status` lists them.)
    Forget {
        /// The table.
        table: PathBuf,
        /// Session id.
        #[arg(required_unless_present = "ended", conflicts_with = "ended")]
        session: Option<SessionId>,
        /// Every ended session.
        #[arg(long)]
        ended: bool,
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
    /// Hold the table and show its source volumes and session images as files in MOUNTPOINT
    /// (FUSE; needs root): one file per source volume and per session image, named as the NBD
    /// exports of `serve`. Source writes go through copy-before-write; images are read-only
    /// unless --writable-images; fsync is a durability point. Other commands on the table reach
    /// this process through its control socket; `timezero umount MOUNTPOINT`, `timezero stop
    /// TABLE` or SIGTERM unmount and end it.
    Mount {
        /// The table.
        table: PathBuf,
        /// An empty directory to mount on.
        mountpoint: PathBuf,
        /// Let image files be written (target-write semantics).
        #[arg(long)]
        writable_images: bool,
        /// Serve the same files as NBD exports on this unix socket too.
        #[arg(long, value_name = "SOCKET")]
        nbd: Option<PathBuf>,
    },
    /// Unmount a `timezero mount` and wait until its process has released the table.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
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
    /// Plans (docs/orchestration.md, section 3.1).
    Plan {
        /// What to do with a plan.
        #[command(subcommand)]
        cmd: PlanCmd,
    },
    /// The catalog of backup images in STATE/orchestration.sqlite (docs/orchestration.md,
    /// "Catalog and restore").
    Catalog {
        /// What to do with the catalog.
        #[command(subcommand)]
        cmd: CatalogCmd,
    },
    /// Restore a valid image onto DEST as a restore job of the store: by an engine copy
    /// session from the image's target (extents reversed), or, when DEST is the source of a
    /// live session (in place) or the image is nocopy, by a stream through `Engine::write` so
    /// every other session keeps its T0. DEST is locked until the job's end is recorded. Run
    /// the same command again after the process died and the job goes on where it was. Exit 0
    /// when the restore completed, 1 when it failed, 2 for bad arguments.
    #[command(after_help = args::SIZES_HELP)]
    Restore {
        /// The image (`i17`). Or choose one with --plan, --source and --at.
        image: Option<crate::store::ImageId>,
        /// The plan of the image (with --source and --at).
        #[arg(long, requires_all = ["source", "at"], conflicts_with = "image")]
        plan: Option<String>,
        /// The source of the image, as the plan named it (with --plan and --at).
        #[arg(long, requires_all = ["plan", "at"])]
        source: Option<String>,
        /// The newest valid image with T0 at or before this instant: RFC 3339, with a zone
        /// (`2026-12-24T20:00[Europe/Berlin]`), `now`, or `+DURATION`.
        #[arg(long, requires_all = ["plan", "source"])]
        at: Option<String>,
        /// Where the image is written (a file is created at the source's size when missing).
        #[arg(long)]
        to: PathBuf,
        /// Only this part of the image, in source offsets OFFSET:LEN; repeat for more.
        #[arg(long = "extent", value_parser = super::catalog::restore_extent)]
        extents: Vec<(u64, u64)>,
        /// Print the summary when the restore ends (bytes, method, the stream's ring waits).
        #[arg(long)]
        wait: bool,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Bytes per second at most (slows a restore down, e.g. to watch or test it).
        #[arg(long, hide = true, value_parser = args::rate)]
        rate: Option<u64>,
        /// Bytes between the restore's checkpoints [default: 256MiB].
        #[arg(long, hide = true, value_parser = args::size)]
        checkpoint: Option<u64>,
    },
    /// Jobs: the open ones and those that ended in the last day, or with --all every job; `jobs
    /// show J` for one job's tasks, hooks (exit codes and output tails) and images.
    Jobs {
        /// What to do (default: list).
        #[command(subcommand)]
        cmd: Option<JobsCmd>,
        /// List every job.
        #[arg(long)]
        all: bool,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Calendar schedules: add, rm, enable, disable, list, next occurrences, what is due at an
    /// instant (docs/orchestration.md, "Calendar").
    Schedule {
        /// What to do with schedules.
        #[command(subcommand)]
        cmd: super::schedule::ScheduleCmd,
    },
    /// Calendar events: what starts on which schedule at which priority.
    Event {
        /// What to do with events.
        #[command(subcommand)]
        cmd: super::schedule::EventCmd,
    },
    /// The calendar sheet of a backup day (default: the current one): completed, executing and
    /// future occurrences, suppressed ones with their reason.
    Calendar {
        /// The backup day (YYYYMMDD or YYYY-MM-DD).
        #[arg(long)]
        day: Option<String>,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: super::schedule::StateArgs,
    },
    /// Match the store with the engine and the file systems after a process running jobs died
    /// (QUI-09): thaw and drop leases of jobs not running, end hook runs in flight `unknown`,
    /// resolve intents without outcome, withdraw the sessions of unfinished images, end the dead
    /// jobs' attempts, reconcile the catalog with each table. One line per decision.
    Reconcile {
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print the decisions as a JSON list.
        #[arg(long)]
        json: bool,
    },
    /// Undo the quiesce holds a job runner announces on stdin when its pipe closes or a hold's
    /// deadline passes (QUI-07); started by the runner itself.
    #[command(hide = true)]
    QuiesceWatchdog {
        /// The job whose holds it watches.
        #[arg(long)]
        job: String,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Run the daemon in the foreground: hold the configured tables (control and NBD sockets as
    /// `serve`), reconcile, run the calendar, the broker and the jobs; requests on
    /// STATE/daemon.ctl; stops on SIGTERM or `daemon stop`.
    Daemon {
        /// `stop`: ask the running daemon to stop and wait until it did.
        #[command(subcommand)]
        cmd: Option<DaemonCmd>,
        /// Start no scheduled event: run only the jobs handed to it (`plan run`) and NEWDAY.
        #[arg(long)]
        no_calendar: bool,
        /// Serve no NBD exports of the tables (their control sockets are always served).
        #[arg(long)]
        no_nbd: bool,
        /// Let NBD clients write to image exports.
        #[arg(long)]
        writable_images: bool,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
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
        /// Run every other round of workloads with the engine in write-back mode (as
        /// `serve --write-back`).
        #[arg(long)]
        write_back: bool,
        /// Run only the named workloads of the catalogue (as a violation names them, e.g.
        /// `overlap#120`; repeat or separate with commas). Each runs as it does in the whole
        /// catalogue of `--workloads` and `--seed`.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
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

/// `timezero plan ...`.
#[derive(Debug, Subcommand)]
pub enum PlanCmd {
    /// Parse a plan, expand it into tasks and run the plan checks (backups allowed, window,
    /// destination, target names, space) for an instant; print the tasks. Runs no hook,
    /// quiesces nothing, creates and establishes nothing. Exit 0 when the checks pass (or
    /// the job would be skipped), 1 when one fails, 2 for a plan file that does not parse.
    Check {
        /// The plan file, or the name of a plan in STATE/plans (NAME.toml).
        plan: PathBuf,
        /// The instant to check for: RFC 3339 (`2026-12-24T20:00:00Z`), with a zone
        /// (`2026-12-24T20:00[Europe/Berlin]`), `now`, or `+DURATION` (`+2h`).
        #[arg(long, default_value = "now")]
        at: String,
        /// The state directory holding timezero.toml and plans/ (default: $TIMEZERO_STATE,
        /// else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a plan now: post an immediate event and print the job id (`j1`). With no daemon
    /// holding the state the job runs in this process, to its end, every step recorded in the
    /// store; a live daemon holding the state is reported (exit 1). Exit 0 when the job ran
    /// (with --wait only when its status is 0), 1 when it could not run, 2 for a bad plan.
    Run {
        /// The plan file, or the name of a plan in STATE/plans (NAME.toml).
        plan: PathBuf,
        /// Priority of the immediate event (0 = always executed, 1 lowest .. 99 highest;
        /// default 0).
        #[arg(long)]
        priority: Option<i64>,
        /// Exit 0 only when the job's status is 0.
        #[arg(long)]
        wait: bool,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The plans in STATE/plans: last job and its status, next scheduled occurrence.
    List {
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `timezero jobs ...`.
#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// One job: state, tasks with their status and reason, hook runs with exit codes and
    /// output tails, images, progress.
    Show {
        /// The job (`j1`).
        job: crate::store::JobId,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: a queued or waiting one at once; a running one is asked to stop (the
    /// request is recorded for the process running it). An ended job is refused (exit 1).
    Cancel {
        /// The job (`j1`).
        job: crate::store::JobId,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: super::schedule::StateArgs,
    },
}

/// `timezero catalog ...`.
#[derive(Debug, Subcommand)]
pub enum CatalogCmd {
    /// List valid images (with --all: every state) by T0: id, state, plan, backup day, T0,
    /// mode, size, source.
    Ls {
        /// Only this plan's images.
        #[arg(long)]
        plan: Option<String>,
        /// Only images of this source (its path as the plan named it).
        #[arg(long)]
        source: Option<String>,
        /// Only images of this backup day (YYYYMMDD or YYYY-MM-DD).
        #[arg(long)]
        day: Option<String>,
        /// Images in every state (incomplete, lost, expired too).
        #[arg(long)]
        all: bool,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image: its row with extents, session, job, target and checksums.
    Show {
        /// The image (`i17`).
        image: crate::store::ImageId,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recompute an image's checksum of every MiB and compare them with those stored at the
    /// end of its copy. Exit 0 when all match, 1 naming the first MiB that does not.
    Verify {
        /// The image (`i17`).
        image: crate::store::ImageId,
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `timezero daemon` subcommands.
#[derive(Debug, Subcommand)]
pub enum DaemonCmd {
    /// Ask the running daemon to stop (as SIGTERM) and wait until it released the state.
    Stop {
        /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
        #[arg(long)]
        state: Option<PathBuf>,
    },
}
