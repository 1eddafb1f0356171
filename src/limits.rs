//! Every bound of the engine as a named constant, units last.
//!
//! Sizes read from disk are checked against these before anything is allocated from them.

/// Smallest grain.
pub const GRAIN_MIN_BYTES: u32 = 4096;
/// Largest grain.
pub const GRAIN_MAX_BYTES: u32 = 1 << 20;
/// Default grain.
pub const GRAIN_DEFAULT_BYTES: u32 = 64 * 1024;
/// Size of one journal block; also the unit of torn-write tolerance.
pub const JOURNAL_BLOCK_BYTES: usize = 512;
/// Size of one superblock slot.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Most sessions one table holds (active or ended but still listed).
pub const SESSIONS_MAX: usize = 1024;
/// Most extents per session.
pub const EXTENTS_PER_SESSION_MAX: usize = 256;
/// Longest volume locator (a path) stored in a table.
pub const LOCATOR_BYTES_MAX: usize = 4096;
/// Longest termination message stored in a table.
pub const REASON_BYTES_MAX: usize = 256;
/// Longest consistency-group name stored in a table.
pub const GROUP_NAME_BYTES_MAX: usize = 64;
/// Most grains one `CopyChecked` journal entry names (one CRC32C each): a longer run of
/// copy-before-write is recorded in several entries.
pub const COPY_CHECKED_GRAINS_MAX: u32 = 256;
/// Threads that lead the journal commit of a checked copy-before-write while its writer
/// flushes the target (started on the first such copy).
pub const FLUSH_THREADS: usize = 2;
/// Most blocks one journal commit may span.
pub const COMMIT_BLOCKS_MAX: usize = 64;
/// Default journal size (per copy).
pub const JOURNAL_DEFAULT_BYTES: u64 = 8 << 20;
/// Smallest journal (per copy).
pub const JOURNAL_MIN_BYTES: u64 = 128 * 1024;
/// Largest journal (per copy).
pub const JOURNAL_MAX_BYTES: u64 = 1 << 30;
/// Default copy log size of a new table: room for the T0 bytes of first writes whose targets
/// are not yet flushed (256 grains of 64 KiB).
pub const LOG_DEFAULT_BYTES: u64 = 16 << 20;
/// Most first writes in copy-before-write at once (this one included) for which a first write
/// still takes the copy log: the log saves a durability point on the writer's path but writes
/// every grain twice, so when many first writes run together (and share their flushes on the
/// checked path anyway) the device's bandwidth matters more and they take the checked path.
pub const LOG_WRITERS_MAX: usize = 2;
/// Smallest copy log (other than none).
pub const LOG_MIN_BYTES: u64 = 64 * 1024;
/// Largest copy log.
pub const LOG_MAX_BYTES: u64 = 1 << 30;
/// Default checkpoint area size (per copy): holds descriptors and bitmaps of all sessions.
pub const CHECKPOINT_DEFAULT_BYTES: u64 = 8 << 20;
/// Smallest checkpoint area.
pub const CHECKPOINT_MIN_BYTES: u64 = 64 * 1024;
/// Largest checkpoint area.
pub const CHECKPOINT_MAX_BYTES: u64 = 4 << 30;
/// Largest contiguous run the background copier moves in one batch.
pub const COPY_BATCH_BYTES_MAX: u64 = 4 << 20;
/// Most requests of one batched volume call ([`crate::Volume::read_many`] /
/// [`crate::Volume::write_many`]) the io_uring backend has in flight at once: the entries of
/// each thread's ring. Larger batches go out in groups of this many.
pub const VOLUME_BATCH_DEPTH_MAX: usize = 16;
/// Requests a background-copy worker keeps in flight in each direction by default: the
/// batches of one read (or one write) call of the source (or target). Bounded by
/// [`COPY_DEPTH_MAX`].
pub const COPY_DEPTH_DEFAULT: usize = 4;
/// Largest copy depth a copier accepts.
pub const COPY_DEPTH_MAX: usize = VOLUME_BATCH_DEPTH_MAX;
/// Default bytes per background-copy request (one batch of adjacent uncopied grains).
pub const COPY_REQUEST_BYTES_DEFAULT: u64 = 1 << 20;
/// Bounded retries for data I/O (source read, target write) before giving up.
pub const DATA_IO_RETRIES_MAX: u32 = 3;
/// Largest single engine I/O request.
pub const IO_BYTES_MAX: u64 = 64 << 20;
/// Most bytes of source writes an engine in write-back mode holds per volume before the write
/// that passes it drains them (makes them durable and writes them to the volume).
pub const HELD_BYTES_MAX: usize = 64 << 20;
/// Most source writes an engine in write-back mode holds per volume before draining them.
pub const HELD_WRITES_MAX: usize = 16_384;

// FUSE mounts (`timezero mount`, the power-loss layer).

/// How long an unmount retries while the mount is busy (a process that forked while holding a
/// descriptor of the mount keeps it until it execs).
pub const FUSE_UNMOUNT_BUSY_RETRY_SECS: u64 = 10;
/// How long `timezero mount`, asked to stop, retries a busy unmount before it detaches the mount
/// and serves it until its last user (a loop device) lets go.
pub const FUSE_DETACH_BUSY_SECS: u64 = 1;
/// Largest write request the kernel sends to a `timezero mount` file system.
pub const FUSE_MAX_WRITE_BYTES: u32 = 1 << 20;
/// Threads answering FUSE requests of a `timezero mount` (requests of a loop device or of
/// several readers run concurrently, as NBD requests do).
pub const FUSE_THREADS_MAX: usize = 4;
/// How long `timezero umount` waits for the mounting process to release its table after the
/// file system is gone.
pub const FUSE_RELEASE_WAIT_SECS: u64 = 30;

// The orchestration layers (docs/orchestration.md).

/// Highest job and event priority (0 = always executed, 1 lowest).
pub const PRIORITY_MAX: u8 = 99;
/// Default time a hook may run before its process group gets SIGTERM (HOOK-07).
pub const HOOK_TIMEOUT_DEFAULT_SECS: u64 = 600;
/// Longest hook timeout a plan may set (one day).
pub const HOOK_TIMEOUT_MAX_SECS: u64 = 24 * 3600;
/// Default time between SIGTERM and SIGKILL of a hook's process group (HOOK-07).
pub const HOOK_KILL_GRACE_SECS: u64 = 10;
/// Longest kill grace a plan may set.
pub const HOOK_KILL_GRACE_MAX_SECS: u64 = 600;
/// How much of a hook's stdout, and separately of its stderr, is kept: the last bytes (HOOK-09).
pub const HOOK_OUTPUT_BYTES_MAX: usize = 64 * 1024;
/// Most arguments of a hook command (the program included).
pub const HOOK_ARGS_MAX: usize = 256;
/// Largest JSON document written to a hook's stdin.
pub const HOOK_STDIN_BYTES_MAX: usize = 16 << 20;
/// Fixed grace after a quiesce or unquiesce timeout before the task stops waiting (QUI-04/05).
pub const QUIESCE_GRACE_SECS: u64 = 180;
/// Default quiesce and unquiesce timeout (the fixed grace comes on top).
pub const QUIESCE_TIMEOUT_DEFAULT_SECS: u64 = 60;
/// Longest quiesce or unquiesce timeout a plan may set (one hour).
pub const QUIESCE_TIMEOUT_MAX_SECS: u64 = 3600;
/// Default time between two runs of a command-mode quiesce's `status_cmd`.
pub const QUIESCE_STATUS_INTERVAL_DEFAULT_SECS: u64 = 5;
/// Most mounts one quiesce freezes or flushes.
pub const QUIESCE_MOUNTS_MAX: usize = 64;

/// How long a store connection waits for another process's write transaction before it gives
/// up with SQLite's "database is locked" (`PRAGMA busy_timeout`).
pub const STORE_BUSY_TIMEOUT_MS: u64 = 10_000;

/// Bytes covered by one checksum of a catalog image (CAT-03: CRC32C per MiB).
pub const IMAGE_CHECKSUM_BLOCK_BYTES: u64 = 1 << 20;
/// Buffers in a restore stream's ring by default (CAT-09): enough for the reader to fill one
/// while the writer writes another, with two in reserve for an uneven pace.
pub const RESTORE_RING_BUFFERS_DEFAULT: usize = 4;
/// Bytes of each buffer of a restore stream's ring by default (CAT-09): large requests, few
/// hand-overs between the reader and the writer. A buffer is never larger than the bytes
/// between two checkpoints.
pub const RESTORE_BUFFER_BYTES_DEFAULT: usize = 16 << 20;
/// Most buffers a restore stream's ring may have.
pub const RESTORE_RING_BUFFERS_MAX: usize = 256;
/// Largest buffer of a restore stream's ring.
pub const RESTORE_BUFFER_BYTES_MAX: usize = 64 << 20;
/// Bytes a restore stream writes between two checkpoints by default (CAT-08).
pub const RESTORE_CHECKPOINT_BYTES_DEFAULT: u64 = 256 << 20;
/// Grains one batch of a restore's copy session copies before its bits are committed (CAT-07),
/// when it is copied in the calling thread (`catalog::run_copy_restore`).
pub const RESTORE_COPY_BATCH_GRAINS: u64 = 64;
/// Copier threads of a restore's copy session (CAT-07): one thread reading the image file in
/// order and writing the destination in order runs at the device's pace; a second one only
/// interleaves requests.
pub const RESTORE_COPY_THREADS: usize = 1;
/// Largest request of a restore's copy session (CAT-07): the copier's largest batch.
pub const RESTORE_COPY_REQUEST_BYTES: u64 = COPY_BATCH_BYTES_MAX;
/// Bytes one reverse-restore batch of an in-place restore moves back before it is made durable
/// (the engine's own durability point: source flushed, grains committed).
pub const RESTORE_REVERSE_BATCH_BYTES: u64 = COPY_BATCH_BYTES_MAX;
/// Milliseconds a copy-session restore waits for its copier's next commit before it checks
/// whether the copier ended.
pub const RESTORE_PROGRESS_POLL_MILLIS: u64 = 200;

const _: () = assert!(GRAIN_MIN_BYTES.is_power_of_two() && GRAIN_MAX_BYTES.is_power_of_two());
const _: () =
    assert!(GRAIN_MIN_BYTES <= GRAIN_DEFAULT_BYTES && GRAIN_DEFAULT_BYTES <= GRAIN_MAX_BYTES);
const _: () = assert!(SUPERBLOCK_BYTES.is_multiple_of(JOURNAL_BLOCK_BYTES));
const _: () = assert!(JOURNAL_MIN_BYTES as usize >= COMMIT_BLOCKS_MAX * JOURNAL_BLOCK_BYTES * 4);
const _: () = assert!(HOOK_TIMEOUT_DEFAULT_SECS <= HOOK_TIMEOUT_MAX_SECS);
const _: () = assert!(HOOK_KILL_GRACE_SECS <= HOOK_KILL_GRACE_MAX_SECS);
const _: () = assert!(QUIESCE_STATUS_INTERVAL_DEFAULT_SECS < QUIESCE_GRACE_SECS);
const _: () = assert!(QUIESCE_TIMEOUT_DEFAULT_SECS <= QUIESCE_TIMEOUT_MAX_SECS);
const _: () = assert!(COPY_BATCH_BYTES_MAX >= GRAIN_MAX_BYTES as u64);
const _: () = assert!(COPY_REQUEST_BYTES_DEFAULT <= COPY_BATCH_BYTES_MAX);
const _: () = assert!(COPY_DEPTH_DEFAULT >= 1 && COPY_DEPTH_DEFAULT <= COPY_DEPTH_MAX);
const _: () = assert!(VOLUME_BATCH_DEPTH_MAX >= 1 && VOLUME_BATCH_DEPTH_MAX <= 4096);
const _: () = assert!(RESTORE_RING_BUFFERS_DEFAULT <= RESTORE_RING_BUFFERS_MAX);
const _: () = assert!(RESTORE_BUFFER_BYTES_DEFAULT <= RESTORE_BUFFER_BYTES_MAX);
const _: () =
    assert!(RESTORE_CHECKPOINT_BYTES_DEFAULT.is_multiple_of(RESTORE_BUFFER_BYTES_DEFAULT as u64));
const _: () = assert!(RESTORE_COPY_REQUEST_BYTES <= COPY_BATCH_BYTES_MAX);
const _: () = assert!(RESTORE_CHECKPOINT_BYTES_DEFAULT >= RESTORE_COPY_REQUEST_BYTES);
/// Largest `N` in `every N UNIT from TIME`.
pub const EVERY_COUNT_MAX: u32 = 1_000_000;
/// How far back the calendar looks for a cron schedule's last occurrence (the NEWDAY that
/// opened a backup day).
pub const CALENDAR_LOOKBACK_DAYS_MAX: i64 = 3660;
/// Most occurrences of one event one scheduler pass decides; the rest wait for the next pass.
pub const OCCURRENCES_PER_EVENT_MAX: usize = 10_000;

/// Most tasks one plan expands into (PLAN-05); a plan that would make more is refused.
pub const TASKS_PER_PLAN_MAX: usize = 1000;
/// Most directory entries the expansion of one plan's source patterns reads.
pub const SOURCE_WALK_ENTRIES_MAX: usize = 100_000;
/// Longest plan, region or activity name (they become parts of file and group names).
pub const PLAN_NAME_BYTES_MAX: usize = 48;

// The job layer (docs/orchestration.md, "Jobs"; the `[limits]` table of timezero.toml).

/// Default most jobs active at once (`max_jobs`, the `global` resource).
pub const JOBS_MAX_DEFAULT: u32 = 16;
/// Most jobs active at once that `max_jobs` may allow.
pub const JOBS_MAX_MAX: u32 = 999;
/// Default most active jobs of one plan ("max jobs per policy", JOB-02).
pub const JOBS_PER_PLAN_DEFAULT: u32 = 999;
/// Largest "max jobs per policy" (the smallest is 1).
pub const JOBS_PER_PLAN_MAX: u32 = 999;
/// Default most active jobs of one client ("max jobs per client", JOB-02).
pub const JOBS_PER_CLIENT_DEFAULT: u32 = 1;
/// Default most active jobs writing to one destination (the storage unit).
pub const JOBS_PER_DESTINATION_DEFAULT: u32 = 999;
/// Default most active jobs on one activity table.
pub const JOBS_PER_TABLE_DEFAULT: u32 = 999;
/// Default delay before a failed job is queued again (`job_retry_delay`, JOB-07).
pub const JOB_RETRY_DELAY_DEFAULT_MINS: u32 = 10;
/// Shortest `job_retry_delay`.
pub const JOB_RETRY_DELAY_MIN_MINS: u32 = 1;
/// Longest `job_retry_delay`.
pub const JOB_RETRY_DELAY_MAX_MINS: u32 = 60;
/// Default attempts of one plan within `attempt_window` (`backup_attempts`, JOB-07).
pub const BACKUP_ATTEMPTS_DEFAULT: u32 = 2;
/// Most `backup_attempts`.
pub const BACKUP_ATTEMPTS_MAX: u32 = 99;
/// Default window in which attempts are counted (`attempt_window`, JOB-07).
pub const ATTEMPT_WINDOW_DEFAULT_HOURS: u32 = 12;
/// Longest `attempt_window` (one week).
pub const ATTEMPT_WINDOW_MAX_HOURS: u32 = 168;
/// Most scheduler passes one tick runs before it leaves the rest to the next tick (a pass ends
/// early only when it conflicts with another instance or decides more than
/// `OCCURRENCES_PER_EVENT_MAX` occurrences of one event).
pub const SCHEDULER_PASSES_MAX: usize = 16;
/// Longest the daemon sleeps between two ticks when nothing is due sooner: it notices the end
/// of a job's work (and a schedule changed without `wake`) within this time.
pub const DAEMON_TICK_MAX_MS: u64 = 500;
/// Longest request line `STATE/daemon.ctl` accepts.
pub const DAEMON_CTL_REQUEST_BYTES_MAX: u64 = 64 * 1024;
/// Longest a client of `STATE/daemon.ctl` waits for its answer (and the daemon for a request
/// line).
pub const DAEMON_CTL_TIMEOUT_SECS: u64 = 60;
/// Longest `plan run --wait` and `daemon stop` wait between two looks at the store or the lock.
pub const DAEMON_POLL_MS: u64 = 200;
/// Longest `plan run` and `restore` wait for a daemon that holds the state's lock to answer
/// on `STATE/daemon.ctl` (a daemon that is starting takes its lock before it listens).
pub const DAEMON_ANSWER_WAIT_MS: u64 = 60_000;
/// How often `plan run` and `restore` try `STATE/daemon.ctl` again while they wait for a
/// starting daemon to answer.
pub const DAEMON_ANSWER_POLL_MS: u64 = 50;

/// Most occurrences `timezero schedule next --count N` prints.
pub const SCHEDULE_NEXT_COUNT_MAX: usize = 1000;

/// `timezero jobs` without `--all` lists the open jobs and those that ended within this many
/// seconds (a day).
pub const JOBS_LIST_RECENT_SECS: i64 = 24 * 60 * 60;

const _: () = assert!(JOB_RETRY_DELAY_MIN_MINS <= JOB_RETRY_DELAY_DEFAULT_MINS);
const _: () = assert!(JOB_RETRY_DELAY_DEFAULT_MINS <= JOB_RETRY_DELAY_MAX_MINS);
const _: () = assert!(JOBS_MAX_DEFAULT <= JOBS_MAX_MAX);
