//! Image rows: inserted `Incomplete` at the cut (CAT-01), made `Valid` with their checksums when
//! the task ends (CAT-01, CAT-03), listed and shown (CAT-02), read and verified (CAT-03).
//!
//! An image's bytes are its extents end to end, in image order. A copy image is read from its
//! target at the extents' target offsets (the target holds T0 once the session completed); a
//! nocopy image only exists through its live session and is read with `Engine::read_image`.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::{CatalogError, Volumes};
use crate::limits::IMAGE_CHECKSUM_BLOCK_BYTES;
use crate::store::{
    BackupDay, Change, ChecksumAlgorithm, IdKind, ImageChecksums, ImageId, ImageQuery, ImageRecord,
    ImageState, ImageStateKind, JobId, Store,
};
use crate::{
    CopyMode, Engine, ExtentSpec, SessionDesc, SessionId, SessionState, SessionStatus, Volume,
};

/// Who cut an image, and where its session lives: what the row records beside the engine's
/// facts.
#[derive(Debug, Clone)]
pub struct Cut<'a> {
    /// The job.
    pub job: JobId,
    /// The job's task.
    pub task: u32,
    /// The plan.
    pub plan: &'a str,
    /// The job's backup day.
    pub backup_day: BackupDay,
    /// The activity table holding the session.
    pub table: &'a Path,
}

/// The image row of a session just established: `Incomplete`, with T0, mode, grain, extents and
/// both volumes copied from the session's descriptor (the table may forget the session later).
#[must_use]
pub fn image_at_cut(id: ImageId, cut: &Cut<'_>, desc: &SessionDesc) -> ImageRecord {
    ImageRecord {
        id,
        job: cut.job,
        task: cut.task,
        plan: cut.plan.to_string(),
        backup_day: cut.backup_day,
        table: cut.table.to_path_buf(),
        session: desc.id,
        t0_unix_ms: desc.created_unix_ms,
        mode: desc.mode,
        grain: desc.grain,
        source: desc.source.clone(),
        target: desc.target.clone(),
        extents: desc.extents.clone(),
        state: ImageState::Incomplete,
        checksums: None,
    }
}

/// Insert the `Incomplete` row of a session at its cut (CAT-01) and return its id (`i17`).
/// `desc` is the session's descriptor as the engine has it (`engine.session(id)?.desc`).
///
/// # Errors
/// [`CatalogError::Store`] (the job must exist).
pub fn record_cut(
    store: &dyn Store,
    cut: &Cut<'_>,
    desc: &SessionDesc,
) -> Result<ImageId, CatalogError> {
    let id = ImageId(store.allocate(IdKind::Image)?);
    let row = image_at_cut(id, cut, desc);
    debug_assert_eq!(row.state, ImageState::Incomplete);
    store.commit(vec![Change::PutImage(row)])?;
    Ok(id)
}

/// The image's length: its extents end to end.
#[must_use]
pub fn image_bytes(image: &ImageRecord) -> u64 {
    image.extents.iter().map(|e| e.len).sum()
}

fn load(store: &dyn Store, id: ImageId) -> Result<ImageRecord, CatalogError> {
    store.image(id)?.ok_or(CatalogError::UnknownImage(id))
}

/// The changes that make an image `Valid` (CAT-01) with its checksums (CAT-03), for the
/// transaction that ends its task; empty when it is `Valid` already (committing again is
/// harmless). A copy image needs its session `Completed`, a nocopy image its session `Active`,
/// as `status` (the engine's `status()`) shows them.
///
/// # Errors
/// [`CatalogError::UnknownImage`], [`CatalogError::State`] for a `Lost` or `Expired` image,
/// [`CatalogError::Session`] when the session is not where it must be or not in `status`,
/// [`CatalogError::Checksums`] when the checksums do not fit the image.
pub fn validate_changes(
    store: &dyn Store,
    status: &[SessionStatus],
    image: ImageId,
    checksums: Option<ImageChecksums>,
) -> Result<Vec<Change>, CatalogError> {
    let row = load(store, image)?;
    match row.state.kind() {
        ImageStateKind::Valid => return Ok(Vec::new()),
        ImageStateKind::Incomplete => {}
        k => return Err(CatalogError::state(image, k, "incomplete")),
    }
    let session_err = |why: String| CatalogError::Session {
        image,
        session: row.session,
        why,
    };
    let s = status
        .iter()
        .find(|s| s.id == row.session && s.target == row.target.locator)
        .ok_or_else(|| {
            session_err(format!(
                "with target {} is not in the table",
                row.target.locator
            ))
        })?;
    let needed = match row.mode {
        CopyMode::Copy => SessionState::Completed,
        CopyMode::NoCopy => SessionState::Active,
    };
    if s.state != needed {
        return Err(session_err(format!("is {}, not {needed}", s.state)));
    }
    if let Some(c) = &checksums {
        check_checksums(&row, c)?;
    }
    let mut changes = Vec::new();
    if let Some(checksums) = checksums {
        changes.push(Change::SetImageChecksums { image, checksums });
    }
    changes.push(Change::SetImageState {
        image,
        from: ImageStateKind::Incomplete,
        to: ImageState::Valid,
    });
    Ok(changes)
}

/// Make an image `Valid` with its checksums in one commit (see [`validate_changes`]).
///
/// # Errors
/// As [`validate_changes`], and [`CatalogError::Store`].
pub fn validate(
    store: &dyn Store,
    status: &[SessionStatus],
    image: ImageId,
    checksums: Option<ImageChecksums>,
) -> Result<(), CatalogError> {
    let changes = validate_changes(store, status, image, checksums)?;
    if !changes.is_empty() {
        store.commit(changes)?;
    }
    Ok(())
}

fn check_checksums(row: &ImageRecord, c: &ImageChecksums) -> Result<(), CatalogError> {
    let bytes = image_bytes(row);
    let why = if c.block_bytes == 0 {
        Some("have a block size of 0".to_string())
    } else if c.image_bytes != bytes {
        Some(format!(
            "cover {} bytes, the image has {bytes}",
            c.image_bytes
        ))
    } else if c.sums.len() as u64 != bytes.div_ceil(c.block_bytes) {
        Some(format!(
            "are {} sums, {} bytes in blocks of {} need {}",
            c.sums.len(),
            bytes,
            c.block_bytes,
            bytes.div_ceil(c.block_bytes)
        ))
    } else {
        None
    };
    why.map_or(Ok(()), |why| {
        Err(CatalogError::Checksums { image: row.id, why })
    })
}

/// Reads an image's bytes at image offsets.
#[derive(Debug)]
pub enum ImageReader<'e> {
    /// A copy image: its target, read at the extents' target offsets.
    Target {
        /// The target as it is now.
        volume: Arc<dyn Volume>,
        /// The image's extents.
        extents: Vec<ExtentSpec>,
        /// The target's locator, for errors.
        locator: String,
    },
    /// A nocopy image: its session's image in the engine.
    Session {
        /// The engine holding the session.
        engine: &'e Engine,
        /// The session.
        session: SessionId,
    },
}

impl<'e> ImageReader<'e> {
    /// The reader of `image`: its target through `volumes` for a copy image, its session
    /// through `engine` for a nocopy image.
    ///
    /// # Errors
    /// [`CatalogError::VolumeGone`] when a copy image's target is not there,
    /// [`CatalogError::Invalid`] for a nocopy image without an engine, and the errors of
    /// [`Volumes::open`].
    pub fn open(
        image: &ImageRecord,
        volumes: &dyn Volumes,
        engine: Option<&'e Engine>,
    ) -> Result<ImageReader<'e>, CatalogError> {
        match image.mode {
            CopyMode::Copy => {
                let locator = image.target.locator.clone();
                let volume = volumes
                    .open(&locator)?
                    .ok_or_else(|| CatalogError::VolumeGone {
                        locator: locator.clone(),
                    })?;
                Ok(ImageReader::Target {
                    volume,
                    extents: image.extents.clone(),
                    locator,
                })
            }
            CopyMode::NoCopy => match engine {
                Some(engine) => Ok(ImageReader::Session {
                    engine,
                    session: image.session,
                }),
                None => Err(CatalogError::Invalid {
                    what: "image reader",
                    why: format!("nocopy image {} is read through the engine", image.id),
                }),
            },
        }
    }

    /// Read `buf.len()` bytes of the image at `offset` (image coordinates).
    ///
    /// # Errors
    /// [`CatalogError::Volume`] or [`CatalogError::Engine`] with the read's error; a range past
    /// the image's end is [`CatalogError::Volume`] with `OutOfRange`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), CatalogError> {
        match self {
            ImageReader::Session { engine, session } => engine
                .read_image(*session, offset, buf)
                .map_err(CatalogError::engine("read image")),
            ImageReader::Target {
                volume,
                extents,
                locator,
            } => {
                let vol_err = |source| CatalogError::Volume {
                    op: "read",
                    locator: locator.clone(),
                    source: Box::new(source),
                };
                let total: u64 = extents.iter().map(|e| e.len).sum();
                crate::check_range(offset, buf.len() as u64, total, "image").map_err(vol_err)?;
                let mut done = 0usize;
                let mut start = 0u64; // image offset of the extent
                for e in extents {
                    let pos = offset + done as u64;
                    if done == buf.len() {
                        break;
                    }
                    if pos < start + e.len {
                        let within = pos - start;
                        let n = (e.len - within).min((buf.len() - done) as u64) as usize;
                        volume
                            .read_at(e.target_offset + within, &mut buf[done..done + n])
                            .map_err(vol_err)?;
                        done += n;
                    }
                    start += e.len;
                }
                debug_assert_eq!(done, buf.len());
                Ok(())
            }
        }
    }
}

/// CRC32C of every MiB of the image `reader` reads, `bytes` long (CAT-03); the row records the
/// algorithm ([`ChecksumAlgorithm::Crc32c`]).
///
/// # Errors
/// The reader's.
pub fn checksums(reader: &ImageReader<'_>, bytes: u64) -> Result<ImageChecksums, CatalogError> {
    let block = IMAGE_CHECKSUM_BLOCK_BYTES;
    let mut buf = vec![0u8; block as usize];
    let mut sums = Vec::with_capacity(bytes.div_ceil(block) as usize);
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(block) as usize;
        reader.read_at(off, &mut buf[..n])?;
        sums.push(ChecksumAlgorithm::Crc32c.sum(&buf[..n]));
        off += n as u64;
    }
    debug_assert_eq!(sums.len() as u64, bytes.div_ceil(block));
    Ok(ImageChecksums {
        algorithm: ChecksumAlgorithm::Crc32c,
        block_bytes: block,
        image_bytes: bytes,
        sums,
    })
}

/// What `catalog verify I` found (CAT-03).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The image.
    pub image: ImageId,
    /// The algorithm of the stored checksums (the one recomputed).
    pub algorithm: ChecksumAlgorithm,
    /// Blocks (MiB) compared.
    pub blocks: u64,
    /// Blocks whose checksum differs.
    pub mismatches: u64,
    /// The first block (MiB index in image order) whose checksum differs.
    pub first_mismatch_mib: Option<u64>,
}

impl VerifyReport {
    /// Whether every block matched.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.mismatches == 0
    }
}

/// Recompute an image's checksums and compare them with the stored ones (`catalog verify I`,
/// CAT-03), with the algorithm the row records (CRC32C; CRC32 for rows written before it). A
/// target edited in place outside timezero shows as the MiB it changed.
///
/// # Errors
/// [`CatalogError::UnknownImage`]; [`CatalogError::Checksums`] when the image has none (it was
/// not verified at the end of its copy); the reader's errors.
pub fn verify(
    store: &dyn Store,
    image: ImageId,
    volumes: &dyn Volumes,
    engine: Option<&Engine>,
) -> Result<VerifyReport, CatalogError> {
    let row = load(store, image)?;
    let stored = row
        .checksums
        .clone()
        .ok_or_else(|| CatalogError::Checksums {
            image,
            why: "were not computed (verify = false)".to_string(),
        })?;
    check_checksums(&row, &stored)?;
    let reader = ImageReader::open(&row, volumes, engine)?;
    let mut buf = vec![0u8; stored.block_bytes as usize];
    let mut report = VerifyReport {
        image,
        algorithm: stored.algorithm,
        blocks: stored.sums.len() as u64,
        mismatches: 0,
        first_mismatch_mib: None,
    };
    for (i, want) in stored.sums.iter().enumerate() {
        let off = i as u64 * stored.block_bytes;
        let n = (stored.image_bytes - off).min(stored.block_bytes) as usize;
        reader.read_at(off, &mut buf[..n])?;
        if stored.algorithm.sum(&buf[..n]) != *want {
            report.mismatches += 1;
            report
                .first_mismatch_mib
                .get_or_insert(off / IMAGE_CHECKSUM_BLOCK_BYTES);
        }
    }
    Ok(report)
}

/// Which images `catalog ls` lists (CAT-02).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogQuery {
    /// Only this plan's.
    pub plan: Option<String>,
    /// Only this source's (its locator).
    pub source: Option<String>,
    /// Only this backup day's.
    pub day: Option<BackupDay>,
    /// Images in every state, not only `Valid` ones.
    pub all: bool,
}

/// One line of `catalog ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageLine {
    /// The image.
    pub id: ImageId,
    /// Its plan.
    pub plan: String,
    /// Its source's locator.
    pub source: String,
    /// Its backup day.
    pub backup_day: BackupDay,
    /// T0, ms since the Unix epoch.
    pub t0_unix_ms: u64,
    /// `copy` or `nocopy`.
    pub mode: &'static str,
    /// Its bytes (extents end to end).
    pub bytes: u64,
    /// Its state.
    pub state: ImageStateKind,
}

fn mode_name(m: CopyMode) -> &'static str {
    match m {
        CopyMode::Copy => "copy",
        CopyMode::NoCopy => "nocopy",
    }
}

/// `catalog ls`: `Valid` images (all states with `all`), by T0 then id (CAT-02).
///
/// # Errors
/// [`CatalogError::Store`].
pub fn list(store: &dyn Store, q: &CatalogQuery) -> Result<Vec<ImageLine>, CatalogError> {
    let rows = store.images(&ImageQuery {
        states: (!q.all).then(|| vec![ImageStateKind::Valid]),
        plan: q.plan.clone(),
        source: q.source.clone(),
        backup_day: q.day,
        ..ImageQuery::default()
    })?;
    Ok(rows
        .iter()
        .map(|r| ImageLine {
            id: r.id,
            plan: r.plan.clone(),
            source: r.source.locator.clone(),
            backup_day: r.backup_day,
            t0_unix_ms: r.t0_unix_ms,
            mode: mode_name(r.mode),
            bytes: image_bytes(r),
            state: r.state.kind(),
        })
        .collect())
}

/// `catalog show I`: the whole row (extents, session, job, target, checksums) with its length
/// (CAT-02).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageShow {
    /// The row.
    #[serde(flatten)]
    pub record: ImageRecord,
    /// Its bytes (extents end to end).
    pub bytes: u64,
}

/// `catalog show I` (CAT-02).
///
/// # Errors
/// [`CatalogError::UnknownImage`], [`CatalogError::Store`].
pub fn show(store: &dyn Store, image: ImageId) -> Result<ImageShow, CatalogError> {
    let record = load(store, image)?;
    let bytes = image_bytes(&record);
    Ok(ImageShow { record, bytes })
}
