//! Restore (CAT-06..CAT-10): choose the image, narrow its extents, and get its bytes back onto
//! a destination in one of two ways.
//!
//! - **Copy session** (CAT-07): a copy image restored to a destination that is not the source
//!   of a live session is an engine copy session from the image's target to the destination
//!   with the extents reversed (`source_offset` ← the image's `target_offset`, `target_offset`
//!   ← the original `source_offset`). The engine's own table makes it resumable after kill -9:
//!   reopen the table and call [`run_copy_restore`] again.
//! - **Stream** (CAT-08): an in-place restore (the destination is the source of a live session)
//!   or a nocopy image streams the image (its target for a copy image, `Engine::read_image` for
//!   a nocopy image) into `Engine::write` on the destination, so copy-before-write keeps every
//!   other session's T0. A reader thread fills a ring of reusable buffers (default 4 × 16 MiB,
//!   never larger than the bytes between two checkpoints; a crossbeam channel of empty buffers
//!   and one of full ones) and the calling thread writes them (CAT-09); every 256 MiB the
//!   destination is flushed and the position handed to the caller, who persists it
//!   (`JobProgress::checkpoint`) and resumes from it after a crash.
//!
//! - **Reverse** ([`reverse_applies`]): an in-place restore onto the source of the image's own
//!   session, still in the table and not incremental, of the whole image, is the engine's
//!   reverse restore of that session ([`start_reverse_restore`], [`run_reverse_restore`]):
//!   the grains that may differ move back through the engine's write path (other sessions keep
//!   their T0), and the engine's table resumes it after a crash.
//!
//! A destination that a live session of another table protects is refused
//! ([`check_not_protected_elsewhere`]).
//!
//! Everything a restore holds (its thread, its buffers) is released when it returns, also on an
//! error (CAT-10).

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::channel::{bounded, Receiver, Sender, TryRecvError};
use serde::Serialize;

use super::images::ImageReader;
use super::CatalogError;
use crate::limits::{
    RESTORE_BUFFER_BYTES_DEFAULT, RESTORE_BUFFER_BYTES_MAX, RESTORE_CHECKPOINT_BYTES_DEFAULT,
    RESTORE_COPY_BATCH_GRAINS, RESTORE_RING_BUFFERS_DEFAULT, RESTORE_RING_BUFFERS_MAX,
};
use crate::store::{ImageId, ImageQuery, ImageRecord, ImageStateKind, JobProgress, Store};
use crate::{
    CopyMode, Engine, ExtentSpec, GrainCount, GrainIndex, SessionId, SessionSpec, SessionState,
    SessionStatus, VolumeId,
};

/// Which image a restore reads (CAT-06).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// `restore I`.
    Image(ImageId),
    /// `restore --plan P --source S --at T`: the newest `Valid` image with T0 ≤ T.
    Newest {
        /// The plan.
        plan: String,
        /// The source's locator.
        source: String,
        /// T, ms since the Unix epoch.
        at_or_before_ms: u64,
    },
}

/// The image a restore reads: `Valid` only (an `Incomplete`, `Lost` or `Expired` image is never
/// restorable, CAT-01, CAT-06).
///
/// # Errors
/// [`CatalogError::UnknownImage`], [`CatalogError::State`], [`CatalogError::NoImage`],
/// [`CatalogError::Store`].
pub fn choose(store: &dyn Store, pick: &Pick) -> Result<ImageRecord, CatalogError> {
    match pick {
        Pick::Image(id) => {
            let row = store.image(*id)?.ok_or(CatalogError::UnknownImage(*id))?;
            if row.state.kind() != ImageStateKind::Valid {
                return Err(CatalogError::state(*id, row.state.kind(), "valid"));
            }
            Ok(row)
        }
        Pick::Newest {
            plan,
            source,
            at_or_before_ms,
        } => {
            let rows = store.images(&ImageQuery {
                states: Some(vec![ImageStateKind::Valid]),
                plan: Some(plan.clone()),
                source: Some(source.clone()),
                t0_at_or_before_ms: Some(*at_or_before_ms),
                ..ImageQuery::default()
            })?;
            // In order of T0, then id: the last is the newest.
            rows.into_iter()
                .next_back()
                .ok_or_else(|| CatalogError::NoImage {
                    plan: plan.clone(),
                    source_locator: source.clone(),
                    at_ms: *at_or_before_ms,
                })
        }
    }
}

/// One contiguous piece of a restore: image bytes at `image_offset`, held in a copy image's
/// target at `target_offset`, written to the destination at `dest_offset` (the original
/// source offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RestorePiece {
    /// Offset in the image (its extents end to end).
    pub image_offset: u64,
    /// Offset in the image's target.
    pub target_offset: u64,
    /// Offset in the destination: where the bytes were in the source.
    pub dest_offset: u64,
    /// Length.
    pub len: u64,
}

/// The pieces a restore reads (CAT-06): the image's extents, in image order, or only what
/// `narrow` (`--extent OFF:LEN`, in source offsets) covers of them.
///
/// # Errors
/// [`CatalogError::Extent`] for an empty extent, extents that overlap each other, or one that
/// covers none of the image.
pub fn restore_pieces(
    image: &ImageRecord,
    narrow: &[(u64, u64)],
) -> Result<Vec<RestorePiece>, CatalogError> {
    let mut whole = Vec::with_capacity(image.extents.len());
    let mut at = 0;
    for e in &image.extents {
        whole.push(RestorePiece {
            image_offset: at,
            target_offset: e.target_offset,
            dest_offset: e.source_offset,
            len: e.len,
        });
        at += e.len;
    }
    if narrow.is_empty() {
        return Ok(whole);
    }
    let bad = |offset, len, why: &str| CatalogError::Extent {
        image: image.id,
        offset,
        len,
        why: why.to_string(),
    };
    let mut sorted = narrow.to_vec();
    sorted.sort_unstable();
    for w in sorted.windows(2) {
        if w[0].0.saturating_add(w[0].1) > w[1].0 {
            return Err(bad(w[1].0, w[1].1, "overlaps another extent"));
        }
    }
    let mut out = Vec::new();
    for &(off, len) in &sorted {
        let end = off
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| bad(off, len, "is empty or past the largest offset"))?;
        let before = out.len();
        for p in &whole {
            let (s, e) = (p.dest_offset.max(off), (p.dest_offset + p.len).min(end));
            if s < e {
                let skip = s - p.dest_offset;
                out.push(RestorePiece {
                    image_offset: p.image_offset + skip,
                    target_offset: p.target_offset + skip,
                    dest_offset: s,
                    len: e - s,
                });
            }
        }
        if out.len() == before {
            return Err(bad(off, len, "covers none of the image's extents"));
        }
    }
    out.sort_by_key(|p| p.image_offset);
    debug_assert!(out
        .windows(2)
        .all(|w| w[0].image_offset + w[0].len <= w[1].image_offset));
    Ok(out)
}

/// How a restore gets the image's bytes onto its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreMethod {
    /// An engine copy session from the image's target to the destination (CAT-07).
    CopySession,
    /// A stream into `Engine::write` on the destination (CAT-08).
    Stream,
    /// The engine's reverse restore of the image's own session, onto that session's source
    /// (see [`reverse_applies`]).
    Reverse,
}

/// Whether `dest` (a locator) is the source of a live session in `status`: a restore onto it is
/// in place and must go through `Engine::write`.
#[must_use]
pub fn dest_is_live_source(status: &[SessionStatus], dest: &str) -> bool {
    status.iter().any(|s| s.source == dest && s.state.is_live())
}

impl RestoreMethod {
    /// The method for `image` onto a destination (`dest_is_live_source`: see
    /// [`dest_is_live_source`]): a stream for nocopy images and in-place restores, else a copy
    /// session.
    #[must_use]
    pub fn of(image: &ImageRecord, dest_is_live_source: bool) -> RestoreMethod {
        if image.mode == CopyMode::NoCopy || dest_is_live_source {
            RestoreMethod::Stream
        } else {
            RestoreMethod::CopySession
        }
    }
}

/// What a restore will do: the image, the pieces it reads, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestorePlan {
    /// The image (always `Valid`).
    pub image: ImageRecord,
    /// The pieces, in image order.
    pub pieces: Vec<RestorePiece>,
    /// A copy session or a stream.
    pub method: RestoreMethod,
}

/// Plan a restore (CAT-06..CAT-08): [`choose`] the image, narrow it with [`restore_pieces`],
/// and pick the method for `dest` (a locator) from the engine's `status`.
///
/// # Errors
/// As [`choose`] and [`restore_pieces`].
pub fn plan_restore(
    store: &dyn Store,
    status: &[SessionStatus],
    pick: &Pick,
    dest: &str,
    narrow: &[(u64, u64)],
) -> Result<RestorePlan, CatalogError> {
    let image = choose(store, pick)?;
    let pieces = restore_pieces(&image, narrow)?;
    let method = RestoreMethod::of(&image, dest_is_live_source(status, dest));
    Ok(RestorePlan {
        image,
        pieces,
        method,
    })
}

/// Whether an in-place restore of `image` onto `dest` (attached to `engine`, the image's
/// table) goes through the engine's reverse restore ([`Engine::reverse`]): the whole image is
/// restored (`narrowed` is false: no `--extent`), the image's own session is still in the table
/// (same id, same T0, same target), is `Active` or `Completed`, does not record changes
/// (an incremental session's reverse moves only the grains marked changed), and `dest` is its
/// source. The engine then moves back only what may differ (for a completed session: every
/// grain) through its write path, so every other session on `dest` keeps its T0, and resumes
/// after a crash from its own table.
#[must_use]
pub fn reverse_applies(
    engine: &Engine,
    image: &ImageRecord,
    dest: VolumeId,
    narrowed: bool,
) -> bool {
    if narrowed {
        return false;
    }
    engine.session(image.session).is_ok_and(|s| {
        s.desc.source.id == dest
            && s.desc.target.id == image.target.id
            && s.desc.created_unix_ms == image.t0_unix_ms
            && !s.desc.incremental
            && matches!(s.state(), SessionState::Active | SessionState::Completed)
    })
}

/// Where a reverse restore is: its bytes still to move back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReverseProgress {
    /// The session.
    pub session: SessionId,
    /// Bytes still to move back to the source.
    pub pending: u64,
    /// Bytes moved back by this call so far.
    pub moved: u64,
}

/// Start the reverse restore of `image`'s session ([`Engine::reverse`]), or find it under way
/// (a run that died part way: the engine's table kept it). Returns whether it was started now
/// and the bytes it still has to move back.
///
/// # Errors
/// [`CatalogError::Engine`] with the engine's refusal (`NotActive`, `Reversing` of another
/// session on the same volumes, `UnknownVolume`, ...).
pub fn start_reverse_restore(
    engine: &Engine,
    image: &ImageRecord,
) -> Result<(bool, u64), CatalogError> {
    let s = engine
        .session(image.session)
        .map_err(CatalogError::engine("find the image's session"))?;
    if s.reversing() {
        return Ok((false, s.restore_pending().bytes(s.desc.grain)));
    }
    let r = engine
        .reverse(image.session)
        .map_err(CatalogError::engine("start the reverse restore"))?;
    Ok((true, r.bytes_to_restore))
}

/// Move back every grain of the reverse restore of `session` in the calling thread, at most
/// `batch_bytes` per durable step (the source flushed, the grains committed in the table);
/// `each` sees the progress after every step, and an error it returns stops the restore (what
/// moved stays moved). Returns the bytes moved by this call.
///
/// # Errors
/// [`CatalogError::Engine`]; the error of `each`.
pub fn run_reverse_restore(
    engine: &Engine,
    session: SessionId,
    batch_bytes: u64,
    each: &mut dyn FnMut(&ReverseProgress) -> Result<(), CatalogError>,
) -> Result<u64, CatalogError> {
    let s = engine
        .session(session)
        .map_err(CatalogError::engine("find the restore's session"))?;
    let grain = s.desc.grain;
    let batch = GrainCount((batch_bytes / grain.bytes()).max(1));
    let mut from = GrainIndex::ZERO;
    let mut moved = 0u64;
    while s.reversing() {
        match engine
            .restore_batch(session, from, batch)
            .map_err(CatalogError::engine("reverse restore"))?
        {
            Some((next, n)) => {
                from = next;
                moved += n.bytes(grain);
                each(&ReverseProgress {
                    session,
                    pending: s.restore_pending().bytes(grain),
                    moved,
                })?;
            }
            // The end of the map: grains another thread was moving may be left.
            None => from = GrainIndex::ZERO,
        }
    }
    Ok(moved)
}

/// The configured tables other than the image's own, with their sessions as they are now.
pub type OtherTables = [(std::path::PathBuf, Vec<SessionStatus>)];

/// Refuse a restore onto `dest` (a locator) when a live session of another table (`others`:
/// its path and sessions; the image's own table is left out by the caller) protects it: a
/// write that does not pass through that table's engine would change that session's T0.
///
/// # Errors
/// [`CatalogError::ProtectedElsewhere`] naming the first such table and session.
pub fn check_not_protected_elsewhere(dest: &str, others: &OtherTables) -> Result<(), CatalogError> {
    for (table, sessions) in others {
        if let Some(s) = sessions
            .iter()
            .find(|s| s.source == dest && s.state.is_live())
        {
            return Err(CatalogError::ProtectedElsewhere {
                dest: dest.to_string(),
                table: table.clone(),
                session: s.id,
            });
        }
    }
    Ok(())
}

/// Establish the copy session of a copy image's restore (CAT-07): from `image_target` (the
/// image's target, attached) to `dest` (attached), the pieces' extents reversed, the image's
/// grain. Run it with [`run_copy_restore`].
///
/// # Errors
/// [`CatalogError::Invalid`] for a nocopy image; [`CatalogError::Engine`] with the engine's
/// refusal (`Misaligned` for `--extent`s off the grain, `TargetInUse`, `TargetTooSmall`, ...).
pub fn start_copy_restore(
    engine: &Engine,
    image: &ImageRecord,
    pieces: &[RestorePiece],
    image_target: VolumeId,
    dest: VolumeId,
) -> Result<SessionId, CatalogError> {
    if image.mode != CopyMode::Copy {
        return Err(CatalogError::Invalid {
            what: "restore",
            why: format!("image {} is nocopy: it is restored by a stream", image.id),
        });
    }
    let extents: Vec<ExtentSpec> = pieces
        .iter()
        .map(|p| ExtentSpec {
            source_offset: p.target_offset,
            target_offset: p.dest_offset,
            len: p.len,
        })
        .collect();
    debug_assert_eq!(extents.len(), pieces.len());
    engine
        .establish(&SessionSpec {
            source: image_target,
            target: dest,
            extents,
            grain: image.grain,
            mode: CopyMode::Copy,
            incremental: false,
        })
        .map_err(CatalogError::engine("establish the restore session"))
}

/// Copy a restore session (CAT-07) to its end in the calling thread and complete it; after a
/// crash, reopen the table (the engine resumes the session) and call it again. Returns the
/// grains copied by this call.
///
/// # Errors
/// [`CatalogError::Engine`].
pub fn run_copy_restore(engine: &Engine, session: SessionId) -> Result<GrainCount, CatalogError> {
    engine
        .copy_all(session, GrainCount(RESTORE_COPY_BATCH_GRAINS))
        .map_err(CatalogError::engine("copy the restore session"))
}

/// The ring and checkpoints of a restore stream (CAT-08, CAT-09).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Buffers in the ring. Default = 4 (1..=`RESTORE_RING_BUFFERS_MAX`).
    pub buffers: usize,
    /// Bytes per buffer. Default = 16 MiB (1..=`RESTORE_BUFFER_BYTES_MAX`). The ring's
    /// buffers shrink to `checkpoint_bytes`, and to the bytes to restore, when those are
    /// smaller ([`StreamOptions::ring_buffer_bytes`]).
    pub buffer_bytes: usize,
    /// Bytes between checkpoints. Default = 256 MiB (> 0).
    pub checkpoint_bytes: u64,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            buffers: RESTORE_RING_BUFFERS_DEFAULT,
            buffer_bytes: RESTORE_BUFFER_BYTES_DEFAULT,
            checkpoint_bytes: RESTORE_CHECKPOINT_BYTES_DEFAULT,
        }
    }
}

impl StreamOptions {
    /// Check the ranges.
    ///
    /// # Errors
    /// [`CatalogError::Invalid`] naming the option.
    pub fn validate(&self) -> Result<(), CatalogError> {
        let bad = |why: String| {
            Err(CatalogError::Invalid {
                what: "restore stream",
                why,
            })
        };
        if !(1..=RESTORE_RING_BUFFERS_MAX).contains(&self.buffers) {
            return bad(format!(
                "{} buffers is outside 1..={RESTORE_RING_BUFFERS_MAX}",
                self.buffers
            ));
        }
        if !(1..=RESTORE_BUFFER_BYTES_MAX).contains(&self.buffer_bytes) {
            return bad(format!(
                "buffers of {} bytes are outside 1..={RESTORE_BUFFER_BYTES_MAX}",
                self.buffer_bytes
            ));
        }
        if self.checkpoint_bytes == 0 {
            return bad("a checkpoint every 0 bytes".to_string());
        }
        Ok(())
    }

    /// The bytes of each buffer of a ring that streams `remaining` bytes: `buffer_bytes`, or
    /// `checkpoint_bytes` or `remaining` when smaller (at least 1).
    #[must_use]
    pub fn ring_buffer_bytes(&self, remaining: u64) -> usize {
        let cap = self.checkpoint_bytes.min(remaining).max(1);
        usize::try_from(cap).map_or(self.buffer_bytes, |c| self.buffer_bytes.min(c))
    }
}

/// Where a restore stream is, as its checkpoints report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StreamProgress {
    /// Stream position (bytes of the pieces, in order) written and flushed.
    pub position: u64,
    /// The pieces' bytes.
    pub total: u64,
    /// Times the reader waited for an empty buffer, so far.
    pub waits_for_empty: u64,
    /// Times the writer waited for a full buffer, so far.
    pub waits_for_full: u64,
    /// Bytes the ring moved from the reader to the writer in this run, so far.
    pub bytes: u64,
    /// Buffers in the ring.
    pub buffers: usize,
    /// Bytes of each buffer.
    pub buffer_bytes: usize,
}

impl StreamProgress {
    /// The job's progress at this checkpoint (`JobProgress::checkpoint` is the position to
    /// resume from; `ring_bytes` are this run's: a resumed job adds those of its earlier runs).
    #[must_use]
    pub fn job_progress(&self) -> JobProgress {
        JobProgress {
            bytes_done: self.position,
            bytes_total: self.total,
            waits_for_full: self.waits_for_full,
            waits_for_empty: self.waits_for_empty,
            checkpoint: Some(self.position),
            ring_bytes: self.bytes,
            ring_buffers: self.buffers as u64,
            ring_buffer_bytes: self.buffer_bytes as u64,
        }
    }
}

/// What a restore stream did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StreamReport {
    /// The position it started from.
    pub started_at: u64,
    /// Bytes written by this run.
    pub bytes: u64,
    /// Buffers filled and written by this run.
    pub chunks: u64,
    /// Checkpoints handed to the caller.
    pub checkpoints: u64,
    /// Times the reader waited for an empty buffer (CAT-09).
    pub waits_for_empty: u64,
    /// Times the writer waited for a full buffer (CAT-09).
    pub waits_for_full: u64,
    /// Buffers in the ring.
    pub buffers: usize,
    /// Bytes of each buffer of the ring (see [`StreamOptions::ring_buffer_bytes`]).
    pub buffer_bytes: usize,
    /// Buffers back in the ring at the end (all of them: nothing is left held, CAT-10).
    pub buffers_returned: usize,
}

/// A filled buffer on its way from the reader to the writer.
struct Chunk {
    /// Stream position of its first byte.
    position: u64,
    dest_offset: u64,
    len: usize,
    buf: Vec<u8>,
}

/// The chunks of `pieces` from stream position `start`: (position, image offset, destination
/// offset, length), none longer than `max` and none crossing a piece.
fn chunks(pieces: &[RestorePiece], start: u64, max: u64) -> Vec<(u64, u64, u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    for p in pieces {
        let mut within = start.saturating_sub(pos).min(p.len);
        while within < p.len {
            let n = (p.len - within).min(max);
            out.push((
                pos + within,
                p.image_offset + within,
                p.dest_offset + within,
                n,
            ));
            within += n;
        }
        pos += p.len;
    }
    out
}

/// Stream `pieces` of the image `reader` reads into `Engine::write` on `dest` (CAT-08), from
/// stream position `start_at` (0, or the last checkpoint). Every `checkpoint_bytes` the
/// destination is flushed and `checkpoint` gets the position; an error it returns stops the
/// stream (what was checkpointed stays done). At the end the destination is flushed.
///
/// # Errors
/// [`CatalogError::Invalid`] for bad options or a start past the end; the reader's and the
/// engine's errors; the checkpoint's error; [`CatalogError::ReaderPanicked`].
pub fn stream(
    engine: &Engine,
    reader: &ImageReader<'_>,
    dest: VolumeId,
    pieces: &[RestorePiece],
    start_at: u64,
    opts: &StreamOptions,
    checkpoint: &mut dyn FnMut(&StreamProgress) -> Result<(), CatalogError>,
) -> Result<StreamReport, CatalogError> {
    opts.validate()?;
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    if start_at > total {
        return Err(CatalogError::Invalid {
            what: "restore stream",
            why: format!("start at byte {start_at} is past the end ({total} bytes)"),
        });
    }
    let buffer_bytes = opts.ring_buffer_bytes(total - start_at);
    let plan = chunks(pieces, start_at, buffer_bytes as u64);
    debug_assert_eq!(plan.iter().map(|c| c.3).sum::<u64>(), total - start_at);
    let (empty_tx, empty_rx) = bounded::<Vec<u8>>(opts.buffers);
    let (full_tx, full_rx) = bounded::<Result<Chunk, CatalogError>>(opts.buffers);
    for _ in 0..opts.buffers {
        // The ring is empty and sized to hold every buffer: this cannot block or fail.
        let _ = empty_tx.send(vec![0u8; buffer_bytes]);
    }
    let waits_for_empty = AtomicU64::new(0);
    let mut report = StreamReport {
        started_at: start_at,
        buffers: opts.buffers,
        buffer_bytes,
        ..StreamReport::default()
    };
    let result = std::thread::scope(|scope| {
        let reader_thread =
            scope.spawn(|| read_side(reader, &plan, empty_rx, full_tx, &waits_for_empty));
        let written = write_side(
            engine,
            dest,
            total,
            start_at,
            opts.checkpoint_bytes,
            empty_tx,
            full_rx,
            &waits_for_empty,
            &mut report,
            checkpoint,
        );
        // The writer's ends of both channels are dropped: a reader still running stops.
        let empty_rx = reader_thread
            .join()
            .map_err(|_| CatalogError::ReaderPanicked)?;
        report.buffers_returned = empty_rx.len();
        written
    });
    report.waits_for_empty = waits_for_empty.load(Ordering::Relaxed);
    result.map(|()| report)
}

/// The reader thread: take an empty buffer (counting a wait when none is ready), fill it, pass
/// it on. Returns the ring's receiving end, so the caller can count the buffers that came back.
fn read_side(
    reader: &ImageReader<'_>,
    plan: &[(u64, u64, u64, u64)],
    empty: Receiver<Vec<u8>>,
    full: Sender<Result<Chunk, CatalogError>>,
    waits_for_empty: &AtomicU64,
) -> Receiver<Vec<u8>> {
    for &(position, image_offset, dest_offset, len) in plan {
        let mut buf = match empty.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty) => {
                waits_for_empty.fetch_add(1, Ordering::Relaxed);
                match empty.recv() {
                    Ok(b) => b,
                    Err(_) => break, // the writer stopped
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let n = len as usize; // at most the buffer's length
        let item = reader.read_at(image_offset, &mut buf[..n]).map(|()| Chunk {
            position,
            dest_offset,
            len: n,
            buf,
        });
        let failed = item.is_err();
        if full.send(item).is_err() || failed {
            break;
        }
    }
    empty
}

/// The writer (the calling thread): take a full buffer (counting a wait when none is ready),
/// write it through the engine, give the buffer back; flush and checkpoint every
/// `checkpoint_bytes`, and at the end.
#[allow(clippy::too_many_arguments)]
fn write_side(
    engine: &Engine,
    dest: VolumeId,
    total: u64,
    start_at: u64,
    checkpoint_bytes: u64,
    empty: Sender<Vec<u8>>,
    full: Receiver<Result<Chunk, CatalogError>>,
    waits_for_empty: &AtomicU64,
    report: &mut StreamReport,
    checkpoint: &mut dyn FnMut(&StreamProgress) -> Result<(), CatalogError>,
) -> Result<(), CatalogError> {
    let mut next_checkpoint = (start_at / checkpoint_bytes + 1) * checkpoint_bytes;
    let mut position = start_at;
    while position < total {
        let item = match full.try_recv() {
            Ok(item) => item,
            Err(TryRecvError::Empty) => {
                report.waits_for_full += 1;
                full.recv().map_err(|_| CatalogError::ReaderPanicked)?
            }
            Err(TryRecvError::Disconnected) => return Err(CatalogError::ReaderPanicked),
        };
        let chunk = item?;
        debug_assert_eq!(chunk.position, position);
        engine
            .write(dest, chunk.dest_offset, &chunk.buf[..chunk.len])
            .map_err(CatalogError::engine("restore write"))?;
        position += chunk.len as u64;
        report.bytes += chunk.len as u64;
        report.chunks += 1;
        // Back into the ring; the reader may have stopped (then the buffer is dropped).
        let _ = empty.send(chunk.buf);
        if position >= next_checkpoint && position < total {
            engine
                .flush(dest)
                .map_err(CatalogError::engine("flush the restore destination"))?;
            report.checkpoints += 1;
            next_checkpoint = (position / checkpoint_bytes + 1) * checkpoint_bytes;
            checkpoint(&StreamProgress {
                position,
                total,
                waits_for_empty: waits_for_empty.load(Ordering::Relaxed),
                waits_for_full: report.waits_for_full,
                bytes: report.bytes,
                buffers: report.buffers,
                buffer_bytes: report.buffer_bytes,
            })?;
        }
    }
    engine
        .flush(dest)
        .map_err(CatalogError::engine("flush the restore destination"))
}
