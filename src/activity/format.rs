//! The activity table's on-disk format: every byte is described here and in `docs/format.md`.
//!
//! File layout, in order (all integers little-endian):
//!
//! | region            | size               | why here |
//! |-------------------|--------------------|----------|
//! | superblock slot 0 | 4096               | a fixed place to start |
//! | reserved          | 4096               | zero |
//! | journal copy A    | `journal_bytes`    | 512-byte blocks, block `seq` lives at slot `seq % n` |
//! | journal copy B    | `journal_bytes`    | mirror of A: a damaged block is read from the other copy |
//! | checkpoint areas 0, 1, 2 | 3 x (`checkpoint_bytes` + 64 KiB gap) | full states; the two newest superblocks name two of them, a new checkpoint goes to the third |
//! | copy log          | `log_bytes` (+ 64 KiB gap when not 0) | T0 bytes of first writes, durable with their `CopyChecked` record (version 8; 0 bytes in older tables) |
//! | superblock slot 1 | 4096               | the file's last 4 KiB: the other superblock, far from slot 0 |
//!
//! A commit writes its blocks into both journal copies and then makes the file durable once.
//! A checkpoint is written into the area that neither superblock names, read back, and becomes
//! current only when a superblock naming it is durable and read back; that superblock replaces
//! the older one (or one that no longer verifies). The other pair and every journal block since
//! its checkpoint are kept, so a damaged newer pair falls back to the older one plus the journal.
//! Neither a superblock nor a checkpoint is bound to its slot or area by position (the
//! superblock names its area; its generation orders the two), so a copy written to the wrong
//! slot is still a valid superblock.

use super::codec::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, Reader, Writer};
pub use crate::model::{
    CopyMode, Entry, ExtentSpec, Reason, ReasonCode, SessionDesc, SessionImage, SessionState,
    VolumeRef,
};

use crate::error::Corruption;

use crate::ids::{Generation, GrainSize, SessionId, VolumeId};

use crate::limits::{
    COPY_CHECKED_GRAINS_MAX, EXTENTS_PER_SESSION_MAX, GROUP_NAME_BYTES_MAX, JOURNAL_BLOCK_BYTES,
    LOCATOR_BYTES_MAX, REASON_BYTES_MAX, SUPERBLOCK_BYTES,
};

/// Format version written by this build (6 added `CopyChecked` journal entries, 7 the
/// checkpoint's list of checked copies whose verification waits for the volumes, 8 the copy
/// log: its size in the superblock, records that name log space, and the checkpoint's list of
/// unverified grains the log keeps).
pub const FORMAT_VERSION: u32 = 8;

/// Oldest format version this build reads (a version-5 table has no `CopyChecked` entries, a
/// version-6 checkpoint no list of unverified grains; the first checkpoint and superblock
/// written after it is opened are of the current version).
pub const FORMAT_VERSION_MIN_READ: u32 = 5;

/// Whether this build reads a table of format `version`.
#[must_use]
pub fn format_readable(version: u32) -> bool {
    (FORMAT_VERSION_MIN_READ..=FORMAT_VERSION).contains(&version)
}

/// Superblock magic.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"TZTBLSB\0";

/// Checkpoint magic.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"TZCKPT\0\0";

/// Journal block magic ("TZJB").
pub const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"TZJB");

/// Bytes of a journal block header.
pub const BLOCK_HEADER_BYTES: usize = 48;

/// Payload bytes per journal block.
pub const BLOCK_PAYLOAD_BYTES: usize = JOURNAL_BLOCK_BYTES - BLOCK_HEADER_BYTES;

/// Bytes of the checkpoint header.
pub const CHECKPOINT_HEADER_BYTES: usize = 64;

/// Superblock slots.
pub const SUPERBLOCK_SLOTS: u32 = 2;

/// The largest single write the table issues (checkpoints are written in pieces of at most
/// this size), and the gap left after each checkpoint area: one write that lands in the wrong
/// place can never reach two checkpoint areas, nor a checkpoint area and the superblock slot at
/// the end of the file; the two slots are the file's first and last 4 KiB.
pub const TABLE_WRITE_MAX_BYTES: usize = 64 * 1024;

/// Offset of superblock slot `slot` in a table file of `file_len` bytes: slot 0 at the start,
/// slot 1 in the last 4 KiB (so either can be found without the other).
#[must_use]
pub fn superblock_offset(slot: u32, file_len: u64) -> u64 {
    if slot == 0 {
        0
    } else {
        file_len.saturating_sub(SUPERBLOCK_BYTES as u64)
    }
}

/// Checkpoint areas: the two that the superblocks name and one to write the next into.
pub const CHECKPOINT_AREAS: u32 = 3;

/// Offset of the CRC inside a superblock.
const SB_CRC_OFFSET: usize = 124;

/// A 16-byte table identity, chosen at `init`, bound into every record.
pub type TableId = [u8; 16];

/// Where each region of a table file starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes per journal copy.
    pub journal_bytes: u64,
    /// Bytes per checkpoint area.
    pub checkpoint_bytes: u64,
    /// Bytes of the copy log (0: none; tables before format version 8 have none).
    pub log_bytes: u64,
}

impl Layout {
    /// Offset of superblock slot `slot` (0: the start of the file, 1: its last 4 KiB).
    #[must_use]
    pub fn superblock(&self, slot: u32) -> u64 {
        superblock_offset(slot, self.file_bytes())
    }
    /// Offset of journal copy `copy` (0 = A, 1 = B).
    #[must_use]
    pub fn journal(&self, copy: u32) -> u64 {
        2 * SUPERBLOCK_BYTES as u64 + u64::from(copy) * self.journal_bytes
    }
    /// Number of blocks per journal copy.
    #[must_use]
    pub fn journal_blocks(&self) -> u64 {
        self.journal_bytes / JOURNAL_BLOCK_BYTES as u64
    }
    /// Offset of the block with sequence `seq` in journal copy `copy`.
    #[must_use]
    pub fn block(&self, copy: u32, seq: u64) -> u64 {
        self.journal(copy) + (seq % self.journal_blocks()) * JOURNAL_BLOCK_BYTES as u64
    }
    /// Offset of checkpoint area `area` (0, 1 or 2); each is followed by a gap of
    /// [`TABLE_WRITE_MAX_BYTES`].
    #[must_use]
    pub fn checkpoint(&self, area: u32) -> u64 {
        self.journal(2) + u64::from(area) * (self.checkpoint_bytes + TABLE_WRITE_MAX_BYTES as u64)
    }
    /// Offset of the copy log (after the last checkpoint area's gap; a gap of
    /// [`TABLE_WRITE_MAX_BYTES`] follows it when it is not empty).
    #[must_use]
    pub fn log(&self) -> u64 {
        self.checkpoint(CHECKPOINT_AREAS)
    }
    /// Total file size.
    #[must_use]
    pub fn file_bytes(&self) -> u64 {
        let log = if self.log_bytes == 0 {
            0
        } else {
            self.log_bytes + TABLE_WRITE_MAX_BYTES as u64
        };
        self.log() + log + SUPERBLOCK_BYTES as u64
    }
}

/// A superblock: names the current checkpoint and where journal replay starts.
///
/// Bytes: magic\[8\] version u32, reserved u32, table_id\[16\], generation u64,
/// journal_bytes u64, checkpoint_bytes u64, area u32, flags u32, ckpt_seq u64, ckpt_len u64,
/// ckpt_crc u32, reserved u32, created_unix_ms u64, log_bytes u64 (version 8; zero before),
/// reserved\[20\], crc u32 (over bytes 0..124).
///
/// A superblock is valid in either slot: the newer generation of the two valid ones is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Table identity.
    pub table_id: TableId,
    /// Generation: the higher of two valid superblocks is the newer.
    pub generation: u64,
    /// Checkpoint area (0, 1 or 2) holding this generation's checkpoint.
    pub area: u32,
    /// Region sizes.
    pub layout: Layout,
    /// First journal sequence not contained in the checkpoint.
    pub ckpt_seq: u64,
    /// Bytes of the checkpoint (header and payload).
    pub ckpt_len: u64,
    /// CRC32 of those bytes.
    pub ckpt_crc: u32,
    /// When the table was created (ms since the Unix epoch).
    pub created_unix_ms: u64,
}

impl Superblock {
    /// Encode into a full superblock slot.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_BYTES];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        b[16..32].copy_from_slice(&self.table_id);
        put_u64(&mut b, 32, self.generation);
        put_u64(&mut b, 40, self.layout.journal_bytes);
        put_u64(&mut b, 48, self.layout.checkpoint_bytes);
        put_u32(&mut b, 56, self.area);
        put_u32(&mut b, 60, 0);
        put_u64(&mut b, 64, self.ckpt_seq);
        put_u64(&mut b, 72, self.ckpt_len);
        put_u32(&mut b, 80, self.ckpt_crc);
        put_u64(&mut b, 88, self.created_unix_ms);
        put_u64(&mut b, 96, self.layout.log_bytes);
        let crc = crc32fast::hash(&b[..SB_CRC_OFFSET]);
        put_u32(&mut b, SB_CRC_OFFSET, crc);
        b
    }

    /// Decode and validate a superblock (from either slot).
    ///
    /// # Errors
    /// A [`Corruption`] naming what failed; sizes are checked against the limits.
    pub fn decode(b: &[u8]) -> Result<Self, Corruption> {
        const WHAT: &str = "superblock";
        if b.len() < SUPERBLOCK_BYTES {
            return Err(Corruption::Truncated { what: WHAT });
        }
        if b[0..8] != SUPERBLOCK_MAGIC {
            return Err(Corruption::BadMagic { what: WHAT });
        }
        let expected = crc32fast::hash(&b[..SB_CRC_OFFSET]);
        let found = get_u32(b, SB_CRC_OFFSET);
        if expected != found {
            return Err(Corruption::Checksum {
                what: WHAT,
                expected,
                found,
            });
        }
        let version = get_u32(b, 8);
        if !format_readable(version) {
            return Err(Corruption::BadVersion {
                what: WHAT,
                found: version,
            });
        }
        let mut table_id = [0u8; 16];
        table_id.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            table_id,
            generation: get_u64(b, 32),
            area: get_u32(b, 56),
            layout: Layout {
                journal_bytes: get_u64(b, 40),
                checkpoint_bytes: get_u64(b, 48),
                log_bytes: if version >= 8 { get_u64(b, 96) } else { 0 },
            },
            ckpt_seq: get_u64(b, 64),
            ckpt_len: get_u64(b, 72),
            ckpt_crc: get_u32(b, 80),
            created_unix_ms: get_u64(b, 88),
        };
        if sb.area >= CHECKPOINT_AREAS {
            return Err(Corruption::Field {
                what: WHAT,
                field: "area",
                value: u64::from(sb.area),
            });
        }
        validate_layout(&sb.layout)?;
        if sb.ckpt_len < CHECKPOINT_HEADER_BYTES as u64 || sb.ckpt_len > sb.layout.checkpoint_bytes
        {
            return Err(Corruption::Field {
                what: WHAT,
                field: "ckpt_len",
                value: sb.ckpt_len,
            });
        }
        Ok(sb)
    }
}

/// Magic of the rollback witness kept beside a table file.
pub const WITNESS_MAGIC: [u8; 8] = *b"TZWITNS\0";

/// Bytes of an encoded rollback witness.
pub const WITNESS_BYTES: usize = 40;

/// The rollback witness: the newest journal sequence a table is known to have committed, kept
/// outside the table file (`TABLE.witness`) so that a table file put back from an older copy is
/// noticed. Bytes: magic\[8\], table_id\[16\], seq u64, crc u32 (over bytes 0..32), reserved u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Witness {
    /// The table it vouches for.
    pub table_id: TableId,
    /// Every journal sequence below this one was committed.
    pub seq: u64,
}

impl Witness {
    /// Encode.
    #[must_use]
    pub fn encode(&self) -> [u8; WITNESS_BYTES] {
        let mut b = [0u8; WITNESS_BYTES];
        b[0..8].copy_from_slice(&WITNESS_MAGIC);
        b[8..24].copy_from_slice(&self.table_id);
        put_u64(&mut b, 24, self.seq);
        let crc = crc32fast::hash(&b[..32]);
        put_u32(&mut b, 32, crc);
        b
    }

    /// Decode; `None` for anything that is not a whole, intact witness.
    #[must_use]
    pub fn decode(b: &[u8]) -> Option<Witness> {
        if b.len() < WITNESS_BYTES
            || b[0..8] != WITNESS_MAGIC
            || crc32fast::hash(&b[..32]) != get_u32(b, 32)
        {
            return None;
        }
        let mut table_id = [0u8; 16];
        table_id.copy_from_slice(&b[8..24]);
        Some(Witness {
            table_id,
            seq: get_u64(b, 24),
        })
    }
}

/// Check region sizes read from disk against the limits.
///
/// # Errors
/// [`Corruption::Field`].
pub fn validate_layout(l: &Layout) -> Result<(), Corruption> {
    use crate::limits::{
        CHECKPOINT_MAX_BYTES, CHECKPOINT_MIN_BYTES, JOURNAL_MAX_BYTES, JOURNAL_MIN_BYTES,
        LOG_MAX_BYTES, LOG_MIN_BYTES,
    };
    const WHAT: &str = "layout";
    if l.journal_bytes < JOURNAL_MIN_BYTES
        || l.journal_bytes > JOURNAL_MAX_BYTES
        || !l.journal_bytes.is_multiple_of(JOURNAL_BLOCK_BYTES as u64)
    {
        return Err(Corruption::Field {
            what: WHAT,
            field: "journal_bytes",
            value: l.journal_bytes,
        });
    }
    if l.checkpoint_bytes < CHECKPOINT_MIN_BYTES
        || l.checkpoint_bytes > CHECKPOINT_MAX_BYTES
        || !l.checkpoint_bytes.is_multiple_of(4096)
    {
        return Err(Corruption::Field {
            what: WHAT,
            field: "checkpoint_bytes",
            value: l.checkpoint_bytes,
        });
    }
    if l.log_bytes != 0
        && (l.log_bytes < LOG_MIN_BYTES
            || l.log_bytes > LOG_MAX_BYTES
            || !l.log_bytes.is_multiple_of(4096))
    {
        return Err(Corruption::Field {
            what: WHAT,
            field: "log_bytes",
            value: l.log_bytes,
        });
    }
    Ok(())
}

/// Header of one 512-byte journal block.
///
/// Bytes: magic u32, crc u32 (over bytes 8..512), table_id\[16\], seq u64, commit_seq u64,
/// block_count u16, block_index u16, payload_len u16, reserved u16, payload\[464\].
/// The block with sequence `seq` must sit at slot `seq % n`; `commit_seq` is the sequence of the
/// first block of its commit, so a commit is applied only when all its blocks are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Sequence of this block.
    pub seq: u64,
    /// Sequence of the first block of the commit.
    pub commit_seq: u64,
    /// Blocks in the commit.
    pub block_count: u16,
    /// Index of this block in the commit.
    pub block_index: u16,
    /// Payload bytes used in this block.
    pub payload_len: u16,
}

/// Encode a journal block.
#[must_use]
pub fn encode_block(
    table_id: &TableId,
    h: &BlockHeader,
    payload: &[u8],
) -> [u8; JOURNAL_BLOCK_BYTES] {
    debug_assert!(payload.len() <= BLOCK_PAYLOAD_BYTES);
    debug_assert_eq!(usize::from(h.payload_len), payload.len());
    let mut b = [0u8; JOURNAL_BLOCK_BYTES];
    put_u32(&mut b, 0, BLOCK_MAGIC);
    b[8..24].copy_from_slice(table_id);
    put_u64(&mut b, 24, h.seq);
    put_u64(&mut b, 32, h.commit_seq);
    put_u16(&mut b, 40, h.block_count);
    put_u16(&mut b, 42, h.block_index);
    put_u16(&mut b, 44, h.payload_len);
    b[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + payload.len()].copy_from_slice(payload);
    let crc = crc32fast::hash(&b[8..]);
    put_u32(&mut b, 4, crc);
    b
}

/// Decode a journal block that must carry sequence `expect_seq` (`None` accepts any sequence,
/// used when scanning for later commits).
///
/// # Errors
/// A [`Corruption`] for a bad magic, checksum, table or sequence binding or field.
pub fn decode_block<'a>(
    b: &'a [u8],
    table_id: &TableId,
    expect_seq: Option<u64>,
) -> Result<(BlockHeader, &'a [u8]), Corruption> {
    const WHAT: &str = "journal block";
    if b.len() != JOURNAL_BLOCK_BYTES {
        return Err(Corruption::Truncated { what: WHAT });
    }
    if get_u32(b, 0) != BLOCK_MAGIC {
        return Err(Corruption::BadMagic { what: WHAT });
    }
    let expected = crc32fast::hash(&b[8..]);
    let found = get_u32(b, 4);
    if expected != found {
        return Err(Corruption::Checksum {
            what: WHAT,
            expected,
            found,
        });
    }
    let h = BlockHeader {
        seq: get_u64(b, 24),
        commit_seq: get_u64(b, 32),
        block_count: get_u16(b, 40),
        block_index: get_u16(b, 42),
        payload_len: get_u16(b, 44),
    };
    if b[8..24] != table_id[..] || expect_seq.is_some_and(|s| s != h.seq) {
        return Err(Corruption::Misplaced { what: WHAT });
    }
    if usize::from(h.payload_len) > BLOCK_PAYLOAD_BYTES
        || h.block_count == 0
        || usize::from(h.block_count) > crate::limits::COMMIT_BLOCKS_MAX
        || h.block_index >= h.block_count
        || h.commit_seq.checked_add(u64::from(h.block_index)) != Some(h.seq)
    {
        return Err(Corruption::Field {
            what: WHAT,
            field: "header",
            value: h.seq,
        });
    }
    Ok((
        h,
        &b[BLOCK_HEADER_BYTES..BLOCK_HEADER_BYTES + usize::from(h.payload_len)],
    ))
}

fn put_volume(w: &mut Writer, v: &VolumeRef) {
    w.bytes(&v.id.0);
    w.u64(v.size);
    w.u32(v.sector_size);
    w.u64(v.generation.0);
    w.str16(&v.locator);
}

fn get_volume(r: &mut Reader<'_>) -> Result<VolumeRef, Corruption> {
    Ok(VolumeRef {
        id: VolumeId(r.b16()?),
        size: r.u64()?,
        sector_size: r.u32()?,
        generation: Generation(r.u64()?),
        locator: r.str16(LOCATOR_BYTES_MAX, "locator")?,
    })
}

impl SessionDesc {
    /// Encode.
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.id.0);
        w.u8(self.mode.code());
        w.u8(self.grain.shift());
        w.u16(u16::try_from(self.extents.len()).unwrap_or(u16::MAX));
        w.u64(self.created_unix_ms);
        put_volume(w, &self.source);
        put_volume(w, &self.target);
        for e in &self.extents {
            w.u64(e.source_offset);
            w.u64(e.target_offset);
            w.u64(e.len);
        }
        // Version 3: the consistency group's name (length 0: none).
        w.str16(self.group.as_deref().unwrap_or(""));
        // Version 4: flags; bit 0 = incremental (records changes).
        w.u8(u8::from(self.incremental));
    }

    /// Decode and validate ranges (grain, extent count, alignment, overflow).
    ///
    /// # Errors
    /// A [`Corruption`].
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, Corruption> {
        let id = SessionId(r.u64()?);
        let mode_c = r.u8()?;
        let mode = CopyMode::from_code(mode_c).ok_or_else(|| r.bad("mode", u64::from(mode_c)))?;
        let shift = r.u8()?;
        let grain =
            GrainSize::from_shift(shift).map_err(|_| r.bad("grain_shift", u64::from(shift)))?;
        let n = usize::from(r.u16()?);
        if n == 0 || n > EXTENTS_PER_SESSION_MAX {
            return Err(r.bad("extent_count", n as u64));
        }
        let created_unix_ms = r.u64()?;
        let source = get_volume(r)?;
        let target = get_volume(r)?;
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            let e = ExtentSpec {
                source_offset: r.u64()?,
                target_offset: r.u64()?,
                len: r.u64()?,
            };
            let g = grain.bytes();
            if e.len == 0
                || !e.len.is_multiple_of(g)
                || !e.source_offset.is_multiple_of(g)
                || !e.target_offset.is_multiple_of(g)
                || e.source_offset.checked_add(e.len).is_none()
                || e.target_offset.checked_add(e.len).is_none()
            {
                return Err(r.bad("extent", e.len));
            }
            extents.push(e);
        }
        let total: Option<u64> = extents.iter().try_fold(0u64, |a, e| a.checked_add(e.len));
        if total.is_none() {
            return Err(r.bad("extent_total", 0));
        }
        let group = r.str16(GROUP_NAME_BYTES_MAX, "group")?;
        let flags = r.u8()?;
        if flags > 1 || (flags == 1 && mode != CopyMode::Copy) {
            return Err(r.bad("flags", u64::from(flags)));
        }
        Ok(SessionDesc {
            id,
            mode,
            grain,
            source,
            target,
            extents,
            created_unix_ms,
            group: (!group.is_empty()).then_some(group),
            incremental: flags == 1,
        })
    }
}

const E_ESTABLISH: u8 = 1;

const E_SETBITS: u8 = 2;

const E_SETSTATE: u8 = 3;

const E_SETMODE: u8 = 4;

const E_ENDEXTENT: u8 = 5;

const E_FORGET: u8 = 6;

const E_SETCHANGED: u8 = 7;

const E_REFRESH: u8 = 8;
/// Entry kind: a reverse restore began.
const E_REVERSE: u8 = 9;
/// Entry kind: grains of a reverse restore are back on the source.
const E_RESTORED: u8 = 10;
/// Entry kind: grains copied with CRCs that recovery verifies against the target.
const E_COPYCHECKED: u8 = 11;
/// A `CopyChecked` entry that names its grains' bytes in the copy log (version 8).
const E_COPYLOGGED: u8 = 12;

fn put_reason(w: &mut Writer, r: &Reason) {
    w.u16(r.code.code());
    w.str16(&r.detail);
}

fn get_reason(r: &mut Reader<'_>) -> Result<Reason, Corruption> {
    let c = r.u16()?;
    let code = ReasonCode::from_code(c).ok_or_else(|| r.bad("reason", u64::from(c)))?;
    Ok(Reason {
        code,
        detail: r.str16(REASON_BYTES_MAX, "reason_detail")?,
    })
}

impl Entry {
    /// Encode into `w`.
    pub fn encode(&self, w: &mut Writer) {
        match self {
            Entry::Establish(d) => {
                w.u8(E_ESTABLISH);
                d.encode(w);
            }
            Entry::SetBits {
                session,
                start,
                count,
            } => {
                w.u8(E_SETBITS);
                w.u64(session.0);
                w.u64(*start);
                w.u64(*count);
            }
            Entry::CopyChecked {
                session,
                start,
                crcs,
                log,
            } => {
                match log {
                    None => w.u8(E_COPYCHECKED),
                    Some(_) => w.u8(E_COPYLOGGED),
                }
                w.u64(session.0);
                w.u64(*start);
                if let Some(off) = log {
                    w.u64(*off);
                }
                w.u32(u32::try_from(crcs.len()).unwrap_or(u32::MAX));
                for c in crcs {
                    w.u32(*c);
                }
            }
            Entry::SetState {
                session,
                state,
                reason,
            } => {
                w.u8(E_SETSTATE);
                w.u64(session.0);
                w.u8(state.code());
                match reason {
                    Some(r) => {
                        w.u8(1);
                        put_reason(w, r);
                    }
                    None => w.u8(0),
                }
            }
            Entry::SetMode { session, mode } => {
                w.u8(E_SETMODE);
                w.u64(session.0);
                w.u8(mode.code());
            }
            Entry::EndExtent {
                session,
                extent,
                reason,
            } => {
                w.u8(E_ENDEXTENT);
                w.u64(session.0);
                w.u32(*extent);
                put_reason(w, reason);
            }
            Entry::Forget { session } => {
                w.u8(E_FORGET);
                w.u64(session.0);
            }
            Entry::SetChanged {
                session,
                start,
                count,
            } => {
                w.u8(E_SETCHANGED);
                w.u64(session.0);
                w.u64(*start);
                w.u64(*count);
            }
            Entry::Refresh {
                session,
                t0_unix_ms,
            } => {
                w.u8(E_REFRESH);
                w.u64(session.0);
                w.u64(*t0_unix_ms);
            }
            Entry::Reverse { session } => {
                w.u8(E_REVERSE);
                w.u64(session.0);
            }
            Entry::Restored {
                session,
                start,
                count,
            } => {
                w.u8(E_RESTORED);
                w.u64(session.0);
                w.u64(*start);
                w.u64(*count);
            }
        }
    }

    /// Encoded size in bytes.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        let mut w = Writer::default();
        self.encode(&mut w);
        w.buf.len()
    }

    /// Decode all entries of one commit's payload.
    ///
    /// # Errors
    /// A [`Corruption`] for unknown kinds or bad fields.
    pub fn decode_all(payload: &[u8]) -> Result<Vec<Entry>, Corruption> {
        let mut r = Reader::new(payload, "journal entry");
        let mut out = Vec::new();
        while r.remaining() > 0 {
            let kind = r.u8()?;
            let e = match kind {
                E_ESTABLISH => Entry::Establish(SessionDesc::decode(&mut r)?),
                E_SETBITS => Entry::SetBits {
                    session: SessionId(r.u64()?),
                    start: r.u64()?,
                    count: r.u64()?,
                },
                E_COPYCHECKED | E_COPYLOGGED => {
                    let session = SessionId(r.u64()?);
                    let start = r.u64()?;
                    let log = if kind == E_COPYLOGGED {
                        Some(r.u64()?)
                    } else {
                        None
                    };
                    let n = r.u32()?;
                    if n == 0 || n > COPY_CHECKED_GRAINS_MAX {
                        return Err(r.bad("crc_count", u64::from(n)));
                    }
                    let mut crcs = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        crcs.push(r.u32()?);
                    }
                    Entry::CopyChecked {
                        session,
                        start,
                        crcs,
                        log,
                    }
                }
                E_SETSTATE => {
                    let session = SessionId(r.u64()?);
                    let c = r.u8()?;
                    let state =
                        SessionState::from_code(c).ok_or_else(|| r.bad("state", u64::from(c)))?;
                    let reason = match r.u8()? {
                        0 => None,
                        1 => Some(get_reason(&mut r)?),
                        x => return Err(r.bad("has_reason", u64::from(x))),
                    };
                    Entry::SetState {
                        session,
                        state,
                        reason,
                    }
                }
                E_SETMODE => {
                    let session = SessionId(r.u64()?);
                    let c = r.u8()?;
                    Entry::SetMode {
                        session,
                        mode: CopyMode::from_code(c).ok_or_else(|| r.bad("mode", u64::from(c)))?,
                    }
                }
                E_ENDEXTENT => Entry::EndExtent {
                    session: SessionId(r.u64()?),
                    extent: r.u32()?,
                    reason: get_reason(&mut r)?,
                },
                E_FORGET => Entry::Forget {
                    session: SessionId(r.u64()?),
                },
                E_SETCHANGED => Entry::SetChanged {
                    session: SessionId(r.u64()?),
                    start: r.u64()?,
                    count: r.u64()?,
                },
                E_REFRESH => Entry::Refresh {
                    session: SessionId(r.u64()?),
                    t0_unix_ms: r.u64()?,
                },
                E_REVERSE => Entry::Reverse {
                    session: SessionId(r.u64()?),
                },
                E_RESTORED => Entry::Restored {
                    session: SessionId(r.u64()?),
                    start: r.u64()?,
                    count: r.u64()?,
                },
                k => return Err(r.bad("entry_kind", u64::from(k))),
            };
            out.push(e);
        }
        Ok(out)
    }
}

/// Encode a checkpoint (header and payload). The caller checks it fits its area.
#[must_use]
pub fn encode_checkpoint(
    table_id: &TableId,
    area: u32,
    generation: u64,
    seq: u64,
    next_session: u64,
    sessions: &[SessionImage],
) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(&[0u8; CHECKPOINT_HEADER_BYTES]);
    w.u32(u32::try_from(sessions.len()).unwrap_or(u32::MAX));
    for s in sessions {
        s.desc.encode(&mut w);
        w.u8(s.state.code());
        w.u8(s.mode.code());
        match &s.reason {
            Some(r) => {
                w.u8(1);
                put_reason(&mut w, r);
            }
            None => w.u8(0),
        }
        w.u16(u16::try_from(s.ended_extents.len()).unwrap_or(u16::MAX));
        for (i, r) in &s.ended_extents {
            w.u32(*i);
            put_reason(&mut w, r);
        }
        w.u64(s.bitmap.len() as u64);
        w.bytes(&s.bitmap);
        // Version 4: the current T0 and the change map.
        w.u64(s.t0_unix_ms);
        w.u64(s.changed.len() as u64);
        w.bytes(&s.changed);
        // Version 5: the restore map of a reverse restore.
        w.u64(s.pending.len() as u64);
        w.bytes(&s.pending);
        // Version 7: checked copies whose verification waits for the volumes.
        w.u32(u32::try_from(s.unverified.len()).unwrap_or(u32::MAX));
        for (g, crc) in &s.unverified {
            w.u64(*g);
            w.u32(*crc);
        }
        // Version 8: which of them the copy log keeps, and where.
        w.u32(u32::try_from(s.unverified_log.len()).unwrap_or(u32::MAX));
        for (g, off) in &s.unverified_log {
            w.u64(*g);
            w.u64(*off);
        }
    }
    let mut b = w.buf;
    let payload_len = (b.len() - CHECKPOINT_HEADER_BYTES) as u64;
    b[0..8].copy_from_slice(&CHECKPOINT_MAGIC);
    put_u32(&mut b, 8, FORMAT_VERSION);
    put_u32(&mut b, 12, area);
    b[16..32].copy_from_slice(table_id);
    put_u64(&mut b, 32, generation);
    put_u64(&mut b, 40, seq);
    put_u64(&mut b, 48, payload_len);
    put_u64(&mut b, 56, next_session);
    b
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// First journal sequence to replay.
    pub seq: u64,
    /// Next session id to hand out.
    pub next_session: u64,
    /// Sessions.
    pub sessions: Vec<SessionImage>,
}

/// Decode a checkpoint that its superblock `sb` vouches for (CRC already in `sb`).
///
/// # Errors
/// A [`Corruption`].
pub fn decode_checkpoint(b: &[u8], sb: &Superblock) -> Result<Checkpoint, Corruption> {
    const WHAT: &str = "checkpoint";
    let len = usize::try_from(sb.ckpt_len).map_err(|_| Corruption::Truncated { what: WHAT })?;
    if b.len() < len || len < CHECKPOINT_HEADER_BYTES {
        return Err(Corruption::Truncated { what: WHAT });
    }
    let b = &b[..len];
    let expected = crc32fast::hash(b);
    if expected != sb.ckpt_crc {
        return Err(Corruption::Checksum {
            what: WHAT,
            expected,
            found: sb.ckpt_crc,
        });
    }
    if b[0..8] != CHECKPOINT_MAGIC {
        return Err(Corruption::BadMagic { what: WHAT });
    }
    let version = get_u32(b, 8);
    if !format_readable(version) {
        return Err(Corruption::BadVersion {
            what: WHAT,
            found: version,
        });
    }
    if get_u32(b, 12) != sb.area
        || b[16..32] != sb.table_id
        || get_u64(b, 32) != sb.generation
        || get_u64(b, 40) != sb.ckpt_seq
    {
        return Err(Corruption::Misplaced { what: WHAT });
    }
    if get_u64(b, 48) != (len - CHECKPOINT_HEADER_BYTES) as u64 {
        return Err(Corruption::Field {
            what: WHAT,
            field: "payload_len",
            value: get_u64(b, 48),
        });
    }
    let next_session = get_u64(b, 56);
    let mut r = Reader::new(&b[CHECKPOINT_HEADER_BYTES..], WHAT);
    let n = r.u32()? as usize;
    if n > crate::limits::SESSIONS_MAX {
        return Err(r.bad("session_count", n as u64));
    }
    let mut sessions = Vec::with_capacity(n);
    for _ in 0..n {
        let desc = SessionDesc::decode(&mut r)?;
        let c = r.u8()?;
        let state = SessionState::from_code(c).ok_or_else(|| r.bad("state", u64::from(c)))?;
        let m = r.u8()?;
        let mode = CopyMode::from_code(m).ok_or_else(|| r.bad("mode", u64::from(m)))?;
        let reason = match r.u8()? {
            0 => None,
            1 => Some(get_reason(&mut r)?),
            x => return Err(r.bad("has_reason", u64::from(x))),
        };
        let ne = usize::from(r.u16()?);
        if ne > desc.extents.len() {
            return Err(r.bad("ended_extents", ne as u64));
        }
        let mut ended_extents = Vec::with_capacity(ne);
        for _ in 0..ne {
            let i = r.u32()?;
            if i as usize >= desc.extents.len() {
                return Err(r.bad("ended_extent", u64::from(i)));
            }
            ended_extents.push((i, get_reason(&mut r)?));
        }
        let blen = r.u64()?;
        let want = desc.grains().div_ceil(8);
        if blen != 0 && blen != want {
            return Err(r.bad("bitmap_len", blen));
        }
        if blen > r.remaining() as u64 {
            return Err(Corruption::Truncated { what: WHAT });
        }
        let bitmap = r
            .take(usize::try_from(blen).unwrap_or(usize::MAX))?
            .to_vec();
        let t0_unix_ms = r.u64()?;
        let clen = r.u64()?;
        if clen != 0 && (clen != want || !desc.incremental) {
            return Err(r.bad("changed_len", clen));
        }
        if clen > r.remaining() as u64 {
            return Err(Corruption::Truncated { what: WHAT });
        }
        let changed = r
            .take(usize::try_from(clen).unwrap_or(usize::MAX))?
            .to_vec();
        let plen = r.u64()?;
        if plen != 0 && plen != want {
            return Err(r.bad("pending_len", plen));
        }
        if plen > r.remaining() as u64 {
            return Err(Corruption::Truncated { what: WHAT });
        }
        let pending = r
            .take(usize::try_from(plen).unwrap_or(usize::MAX))?
            .to_vec();
        let mut unverified = Vec::new();
        if version >= 7 {
            let nu = u64::from(r.u32()?);
            if nu > desc.grains() || nu.saturating_mul(12) > r.remaining() as u64 {
                return Err(r.bad("unverified_count", nu));
            }
            for _ in 0..nu {
                let g = r.u64()?;
                let crc = r.u32()?;
                if g >= desc.grains() || unverified.last().is_some_and(|&(p, _)| p >= g) {
                    return Err(r.bad("unverified_grain", g));
                }
                unverified.push((g, crc));
            }
            if nu != 0 && !state.is_live() {
                return Err(r.bad("unverified_count", nu));
            }
        }
        let mut unverified_log = Vec::new();
        if version >= 8 {
            let nl = u64::from(r.u32()?);
            if nl > unverified.len() as u64 || nl.saturating_mul(16) > r.remaining() as u64 {
                return Err(r.bad("unverified_log_count", nl));
            }
            for _ in 0..nl {
                let g = r.u64()?;
                let off = r.u64()?;
                if unverified.binary_search_by_key(&g, |&(u, _)| u).is_err()
                    || unverified_log.last().is_some_and(|&(p, _)| p >= g)
                {
                    return Err(r.bad("unverified_log_grain", g));
                }
                unverified_log.push((g, off));
            }
        }
        sessions.push(SessionImage {
            desc,
            state,
            mode,
            reason,
            ended_extents,
            bitmap,
            t0_unix_ms,
            changed,
            pending,
            unverified,
            unverified_log,
        });
    }
    if r.remaining() != 0 {
        return Err(r.bad("trailing", r.remaining() as u64));
    }
    Ok(Checkpoint {
        seq: sb.ckpt_seq,
        next_session,
        sessions,
    })
}
