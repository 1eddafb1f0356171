//! The catalog: what images exist, whether they are still good, which ones retention keeps,
//! and how one is restored (docs/orchestration.md, section 2 "Catalog and restore",
//! CAT-01..CAT-10).
//!
//! - [`images`]: image rows inserted `Incomplete` at the cut with the engine's facts copied in
//!   (CAT-01), made `Valid` with their checksums (CAT-01, CAT-03), listed and shown (CAT-02),
//!   read and verified (CAT-03);
//! - [`reconcile`](mod@reconcile): `Valid` images checked against the engine's sessions and their targets as
//!   they are now (CAT-04), and half-done expiries finished (CAT-05);
//! - [`retention`]: the pure choice of the images retention expires, and the two steps of an
//!   expiry (CAT-05);
//! - [`restore`]: choosing the image, narrowing its extents, a copy session back to the
//!   destination (CAT-07), the engine's reverse restore of the image's own session onto its
//!   source, or a stream through a ring of buffers into `Engine::write` with checkpoints
//!   (CAT-08, CAT-09, CAT-10).
//!
//! The catalog uses the engine, the clock and the store. It never relies on an ended session
//! staying in the activity table: everything a restore or a check needs is in the image row.
//! Volumes outside the engine (an image's target file, read for a checksum or a restore) are
//! reached through [`Volumes`], which opens them through the `volume` layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::store::{ImageId, ImageStateKind, StoreError};
use crate::{FileVolume, FileVolumeOptions, MemVolume, SessionId, Volume};

pub mod images;
pub mod reconcile;
pub mod restore;
pub mod retention;
#[cfg(test)]
mod tests;

pub use images::{
    checksums, image_at_cut, image_bytes, list, record_cut, show, validate, validate_changes,
    verify, CatalogQuery, Cut, ImageLine, ImageReader, ImageShow, VerifyReport,
};
pub use reconcile::{reconcile, reconcile_decide, EngineView, ReconcileAction, ReconcileReport};
pub use restore::{
    check_not_protected_elsewhere, choose, dest_is_live_source, plan_restore, restore_pieces,
    reverse_applies, run_copy_restore, run_reverse_restore, start_copy_restore,
    start_reverse_restore, stream, OtherTables, Pick, RestoreMethod, RestorePiece, RestorePlan,
    ReverseProgress, StreamOptions, StreamProgress, StreamReport,
};
pub use retention::{
    choose_expired, expire, finish_expiry, mark_expired, Finished, Keep, KeepRule,
    RetentionDecision,
};

/// Why a catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The store failed or refused a change.
    #[error("catalog store: {0}")]
    Store(#[from] StoreError),
    /// The engine refused or failed.
    #[error("{op}: {source}")]
    Engine {
        /// What was being done.
        op: &'static str,
        /// The engine's error (boxed: the crate's error is large).
        #[source]
        source: Box<crate::Error>,
    },
    /// No image with this id.
    #[error("image {0} does not exist")]
    UnknownImage(ImageId),
    /// The image is not in the state the operation needs (an `Incomplete` image is never
    /// restorable, CAT-01).
    #[error("image {image} is {found}, not {needed}")]
    State {
        /// The image.
        image: ImageId,
        /// Its state.
        found: &'static str,
        /// The state needed.
        needed: &'static str,
    },
    /// An image's session is not where its validation needs it: a copy image becomes `Valid`
    /// only after `Completed`, a nocopy image only while its session is `Active`.
    #[error("image {image}: session {session} {why}")]
    Session {
        /// The image.
        image: ImageId,
        /// Its session.
        session: SessionId,
        /// What was found.
        why: String,
    },
    /// No `Valid` image of a plan and source with T0 at or before an instant (CAT-06).
    #[error("no valid image of plan {plan:?} and source {source_locator:?} with T0 at or before {at_ms} ms")]
    NoImage {
        /// The plan.
        plan: String,
        /// The source's locator.
        source_locator: String,
        /// The instant, ms since the Unix epoch.
        at_ms: u64,
    },
    /// A restore extent (`--extent OFF:LEN`) is not usable.
    #[error("image {image}: extent {offset}:{len}: {why}")]
    Extent {
        /// The image.
        image: ImageId,
        /// The extent's source offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// Why.
        why: String,
    },
    /// A volume the operation needs is not there.
    #[error("volume {locator} is not there")]
    VolumeGone {
        /// Its locator.
        locator: String,
    },
    /// A volume operation outside the engine failed.
    #[error("{op} {locator}: {source}")]
    Volume {
        /// What was being done.
        op: &'static str,
        /// The volume's locator.
        locator: String,
        /// The error (boxed: the crate's error is large).
        #[source]
        source: Box<crate::Error>,
    },
    /// A file operation failed (removing an expired image's target).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An image's checksums do not describe its bytes (another block size or length).
    #[error("image {image}: checksums {why}")]
    Checksums {
        /// The image.
        image: ImageId,
        /// What does not fit.
        why: String,
    },
    /// A retention rule set that keeps nothing, or a stream option out of range.
    #[error("{what}: {why}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// A restore destination is the source of a live session of another activity table: a
    /// restore through this image's table would change that session's T0 behind its back.
    #[error("{dest} is the source of session {session} of table {}: a restore onto it would change that session's T0 (withdraw it, or restore elsewhere)", table.display())]
    ProtectedElsewhere {
        /// The destination's locator.
        dest: String,
        /// The other table.
        table: PathBuf,
        /// The session there that protects the destination.
        session: SessionId,
    },
    /// The restore stream's reader thread panicked.
    #[error("the restore stream's reader thread panicked")]
    ReaderPanicked,
    /// The caller's checkpoint stopped the stream (it goes on from the last checkpoint).
    #[error("restore stream stopped at byte {at}: {why}")]
    Stopped {
        /// The stream position of the last checkpoint.
        at: u64,
        /// Why.
        why: String,
    },
}

impl CatalogError {
    pub(crate) fn engine(op: &'static str) -> impl FnOnce(crate::Error) -> CatalogError {
        move |source| CatalogError::Engine {
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn state(image: ImageId, found: ImageStateKind, needed: &'static str) -> Self {
        CatalogError::State {
            image,
            found: found.as_str(),
            needed,
        }
    }
}

/// Volumes the catalog reaches outside the engine, by locator: an image's target file, read
/// for its checksums and a restore, checked by reconcile, removed by an expiry.
pub trait Volumes: Send + Sync + std::fmt::Debug {
    /// The volume at `locator` as it is now; `Ok(None)` when nothing is there.
    ///
    /// # Errors
    /// [`CatalogError::Volume`] when something is there but cannot be opened.
    fn open(&self, locator: &str) -> Result<Option<Arc<dyn Volume>>, CatalogError>;

    /// Remove the volume at `locator` (an expired image's target); `Ok(false)` when nothing
    /// was there.
    ///
    /// # Errors
    /// [`CatalogError::Io`].
    fn remove(&self, locator: &str) -> Result<bool, CatalogError>;
}

/// File volumes by path (`FileVolume`, opened with the options given); removal unlinks the
/// file and syncs its directory.
#[derive(Debug, Clone)]
pub struct FileVolumes {
    /// How files are opened. Default = buffered, read-only: the catalog reads targets (for
    /// checksums, verify, reconcile and a streamed restore) and never writes them.
    pub options: FileVolumeOptions,
}

impl Default for FileVolumes {
    fn default() -> Self {
        FileVolumes {
            options: FileVolumeOptions {
                read_only: true,
                ..FileVolumeOptions::default()
            },
        }
    }
}

impl Volumes for FileVolumes {
    fn open(&self, locator: &str) -> Result<Option<Arc<dyn Volume>>, CatalogError> {
        let path = Path::new(locator);
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CatalogError::Io {
                    op: "stat",
                    path: path.to_path_buf(),
                    source: e,
                })
            }
            Ok(_) => {}
        }
        FileVolume::open(path, &self.options)
            .map(|v| Some(Arc::new(v) as Arc<dyn Volume>))
            .map_err(|source| CatalogError::Volume {
                op: "open",
                locator: locator.to_string(),
                source: Box::new(source),
            })
    }

    fn remove(&self, locator: &str) -> Result<bool, CatalogError> {
        let path = Path::new(locator);
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(CatalogError::Io {
                    op: "remove",
                    path: path.to_path_buf(),
                    source: e,
                })
            }
            Ok(()) => {}
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::sync_dir(dir).map_err(|source| CatalogError::Volume {
                op: "sync directory of",
                locator: locator.to_string(),
                source: Box::new(source),
            })?;
        }
        Ok(true)
    }
}

/// In-memory volumes by locator (`mem:NAME`), for tests and simulations.
#[derive(Debug, Default)]
pub struct MemVolumes {
    volumes: Mutex<HashMap<String, Arc<MemVolume>>>,
}

impl MemVolumes {
    /// Add a volume under its own locator (replacing one of the same locator).
    pub fn add(&self, v: Arc<MemVolume>) {
        self.volumes.lock().insert(v.info().locator, v);
    }

    /// The volume at `locator`, if any.
    #[must_use]
    pub fn get(&self, locator: &str) -> Option<Arc<MemVolume>> {
        self.volumes.lock().get(locator).cloned()
    }
}

impl Volumes for MemVolumes {
    fn open(&self, locator: &str) -> Result<Option<Arc<dyn Volume>>, CatalogError> {
        Ok(self.get(locator).map(|v| v as Arc<dyn Volume>))
    }

    fn remove(&self, locator: &str) -> Result<bool, CatalogError> {
        Ok(self.volumes.lock().remove(locator).is_some())
    }
}
