//! Reconcile the catalog with the engine and the volumes as they are now (CAT-04), and finish
//! half-done expiries (CAT-05).
//!
//! The activity table is the truth about sessions and the volumes are the truth about
//! targets: a `Valid` copy image whose target changed (identity, generation, size) or vanished,
//! or a `Valid` nocopy image whose session ended (terminated, withdrawn, or forgotten by the
//! table), becomes `Lost`, with the engine's [`Reason`] when the
//! engine gave one. An `Expired` image whose target or session is still there has it removed
//! (a crash between the two steps of an expiry); a file is removed only when it is still the
//! expired image's target (same identity) and no `Valid` or `Incomplete` image names it.
//!
//! [`reconcile_decide`] is the pure decision; [`reconcile`] gathers its inputs and applies it.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::retention::{finish_expiry, Finished};
use super::{CatalogError, Volumes};
use crate::store::{
    Change, ImageId, ImageQuery, ImageRecord, ImageState, ImageStateKind, Store, StoreError,
};
use crate::{
    CopyMode, Decision, Engine, Outcome, Reason, SessionId, SessionState, SessionStatus, VolumeInfo,
};

/// What the engine holding one activity table says: its sessions now and the decisions of its
/// last open or reset.
#[derive(Debug, Clone, Copy)]
pub struct EngineView<'a> {
    /// The table (images of other tables' nocopy sessions are not judged).
    pub table: &'a Path,
    /// `Engine::status()`.
    pub status: &'a [SessionStatus],
    /// `Engine::decisions` after an open, or what `Engine::reset` returned.
    pub decisions: &'a [Decision],
}

/// One thing reconcile does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ReconcileAction {
    /// A `Valid` image becomes `Lost`.
    Lose {
        /// The image.
        image: ImageId,
        /// What was found.
        why: String,
        /// The engine's reason, when it gave one.
        engine: Option<Reason>,
    },
    /// An `Expired` copy image's target is still there: remove it.
    RemoveTarget {
        /// The image.
        image: ImageId,
        /// The target's locator.
        locator: String,
    },
    /// An `Expired` nocopy image's session is still live: withdraw it.
    Withdraw {
        /// The image.
        image: ImageId,
        /// The session.
        session: SessionId,
    },
}

/// The engine's reason for a session: a decision's, else its status's.
fn engine_reason(
    view: &EngineView<'_>,
    s: SessionId,
    status: Option<&SessionStatus>,
) -> Option<Reason> {
    let decided = view
        .decisions
        .iter()
        .rev()
        .find(|d| d.session == s)
        .and_then(|d| match &d.outcome {
            Outcome::Terminated(r) | Outcome::Suspended(r) | Outcome::ChangesUnknown(r) => {
                Some(r.clone())
            }
            _ => None,
        });
    decided.or_else(|| status.and_then(|s| s.reason.clone()))
}

/// Why a copy image's target is no longer its target, or `None` when it still is.
fn target_changed(image: &ImageRecord, now: Option<&VolumeInfo>) -> Option<String> {
    let was = &image.target;
    let Some(now) = now else {
        return Some(format!("target {} is gone", was.locator));
    };
    if now.id != was.id {
        Some(format!(
            "target {} was replaced (identity {} is now {})",
            was.locator, was.id, now.id
        ))
    } else if now.generation != was.generation {
        Some(format!(
            "target {} was rewritten (generation {} is now {})",
            was.locator, was.generation.0, now.generation.0
        ))
    } else if now.size != was.size {
        Some(format!(
            "target {} changed size ({} bytes, now {})",
            was.locator, was.size, now.size
        ))
    } else {
        None
    }
}

/// Decide what reconcile does (pure). `images` are the catalog's rows (all states: `Valid`
/// ones are judged, `Expired` ones finished, the others only protect their targets); `targets`
/// maps each copy image's target locator to the volume there now (`None`: nothing). A copy
/// image whose locator is missing from `targets` is not judged.
#[must_use]
pub fn reconcile_decide(
    images: &[ImageRecord],
    view: &EngineView<'_>,
    targets: &HashMap<String, Option<VolumeInfo>>,
) -> Vec<ReconcileAction> {
    let in_use = |locator: &str| {
        images.iter().any(|i| {
            matches!(
                i.state.kind(),
                ImageStateKind::Valid | ImageStateKind::Incomplete
            ) && i.mode == CopyMode::Copy
                && i.target.locator == locator
        })
    };
    let mut out = Vec::new();
    for image in images {
        let status = view
            .status
            .iter()
            .find(|s| s.id == image.session && s.target == image.target.locator);
        let this_table = image.table == view.table;
        match (image.state.kind(), image.mode) {
            (ImageStateKind::Valid, CopyMode::Copy) => {
                let Some(now) = targets.get(&image.target.locator) else {
                    continue;
                };
                if let Some(why) = target_changed(image, now.as_ref()) {
                    let engine = if this_table {
                        engine_reason(view, image.session, status)
                    } else {
                        None
                    };
                    out.push(ReconcileAction::Lose {
                        image: image.id,
                        why,
                        engine,
                    });
                }
            }
            (ImageStateKind::Valid, CopyMode::NoCopy) if this_table => {
                let why = match status {
                    None => Some(format!(
                        "session {} is no longer in table {}",
                        image.session,
                        view.table.display()
                    )),
                    // Ended: its image is gone. A suspended session resumes with its T0 when its
                    // volume is back, and a completed one (converted to copy) holds its image
                    // on its target: neither is lost.
                    Some(s)
                        if matches!(
                            s.state,
                            SessionState::Withdrawn | SessionState::Terminated
                        ) =>
                    {
                        Some(format!("session {} is {}", image.session, s.state))
                    }
                    Some(_) => None,
                };
                if let Some(why) = why {
                    out.push(ReconcileAction::Lose {
                        image: image.id,
                        why,
                        engine: engine_reason(view, image.session, status),
                    });
                }
            }
            (ImageStateKind::Expired, CopyMode::Copy) => {
                let still_there = targets
                    .get(&image.target.locator)
                    .and_then(Option::as_ref)
                    .is_some_and(|now| {
                        now.id == image.target.id && now.generation == image.target.generation
                    });
                if still_there && !in_use(&image.target.locator) {
                    out.push(ReconcileAction::RemoveTarget {
                        image: image.id,
                        locator: image.target.locator.clone(),
                    });
                }
            }
            (ImageStateKind::Expired, CopyMode::NoCopy)
                if this_table && status.is_some_and(|s| s.state.is_live()) =>
            {
                out.push(ReconcileAction::Withdraw {
                    image: image.id,
                    session: image.session,
                });
            }
            _ => {}
        }
    }
    out
}

/// What [`reconcile`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// The actions done.
    pub done: Vec<ReconcileAction>,
    /// Images whose row changed between the decision and its commit (left for the next
    /// reconcile).
    pub skipped: Vec<ImageId>,
}

/// Reconcile the catalog with `engine` (holding `table`, after an open with `decisions`, or a
/// reset) and the targets as `volumes` finds them now (CAT-04); finish half-done expiries
/// (CAT-05). Run at daemon start, after a reset and at NEWDAY.
///
/// # Errors
/// Store, volume and engine errors; actions done before the error stay done.
pub fn reconcile(
    store: &dyn Store,
    engine: &Engine,
    table: &Path,
    decisions: &[Decision],
    volumes: &dyn Volumes,
) -> Result<ReconcileReport, CatalogError> {
    let images = store.images(&ImageQuery::default())?;
    let mut targets = HashMap::new();
    for i in images.iter().filter(|i| i.mode == CopyMode::Copy) {
        if matches!(
            i.state.kind(),
            ImageStateKind::Valid | ImageStateKind::Expired
        ) && !targets.contains_key(&i.target.locator)
        {
            let now = volumes.open(&i.target.locator)?.map(|v| v.info());
            targets.insert(i.target.locator.clone(), now);
        }
    }
    let status = engine.status();
    let view = EngineView {
        table,
        status: &status,
        decisions,
    };
    let mut report = ReconcileReport::default();
    for action in reconcile_decide(&images, &view, &targets) {
        match &action {
            ReconcileAction::Lose { image, why, engine } => {
                let r = store.commit(vec![Change::SetImageState {
                    image: *image,
                    from: ImageStateKind::Valid,
                    to: ImageState::Lost {
                        why: why.clone(),
                        engine: engine.clone(),
                    },
                }]);
                match r {
                    Ok(()) => {}
                    Err(StoreError::Conflict { .. }) => {
                        report.skipped.push(*image);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            ReconcileAction::RemoveTarget { image, .. }
            | ReconcileAction::Withdraw { image, .. } => {
                // Checked again against the rows and the volume as they are now.
                match finish_expiry(store, Some(engine), volumes, *image)? {
                    Finished::Removed | Finished::Withdrawn => {}
                    Finished::AlreadyDone | Finished::LeftAlone(_) => {
                        report.skipped.push(*image);
                        continue;
                    }
                }
            }
        }
        report.done.push(action);
    }
    Ok(report)
}
