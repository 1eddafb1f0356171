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
/// Most blocks one journal commit may span.
pub const COMMIT_BLOCKS_MAX: usize = 64;
/// Default journal size (per copy).
pub const JOURNAL_DEFAULT_BYTES: u64 = 8 << 20;
/// Smallest journal (per copy).
pub const JOURNAL_MIN_BYTES: u64 = 128 * 1024;
/// Largest journal (per copy).
pub const JOURNAL_MAX_BYTES: u64 = 1 << 30;
/// Default checkpoint area size (per copy): holds descriptors and bitmaps of all sessions.
pub const CHECKPOINT_DEFAULT_BYTES: u64 = 8 << 20;
/// Smallest checkpoint area.
pub const CHECKPOINT_MIN_BYTES: u64 = 64 * 1024;
/// Largest checkpoint area.
pub const CHECKPOINT_MAX_BYTES: u64 = 4 << 30;
/// Largest contiguous run the background copier moves in one batch.
pub const COPY_BATCH_BYTES_MAX: u64 = 4 << 20;
/// Bounded retries for data I/O (source read, target write) before giving up.
pub const DATA_IO_RETRIES_MAX: u32 = 3;
/// Largest single engine I/O request.
pub const IO_BYTES_MAX: u64 = 64 << 20;

// The orchestration layers (docs/orchestration.md).

/// Highest job and event priority (0 = always executed, 1 lowest).
pub const PRIORITY_MAX: u8 = 99;

const _: () = assert!(GRAIN_MIN_BYTES.is_power_of_two() && GRAIN_MAX_BYTES.is_power_of_two());
const _: () =
    assert!(GRAIN_MIN_BYTES <= GRAIN_DEFAULT_BYTES && GRAIN_DEFAULT_BYTES <= GRAIN_MAX_BYTES);
const _: () = assert!(SUPERBLOCK_BYTES % JOURNAL_BLOCK_BYTES == 0);
const _: () = assert!(JOURNAL_MIN_BYTES as usize >= COMMIT_BLOCKS_MAX * JOURNAL_BLOCK_BYTES * 4);
const _: () = assert!(COPY_BATCH_BYTES_MAX >= GRAIN_MAX_BYTES as u64);
/// Largest `N` in `every N UNIT from TIME`.
pub const EVERY_COUNT_MAX: u32 = 1_000_000;
/// How far back the calendar looks for a cron schedule's last occurrence (the NEWDAY that
/// opened a backup day).
pub const CALENDAR_LOOKBACK_DAYS_MAX: i64 = 3660;
/// Most occurrences of one event one scheduler pass decides; the rest wait for the next pass.
pub const OCCURRENCES_PER_EVENT_MAX: usize = 10_000;
