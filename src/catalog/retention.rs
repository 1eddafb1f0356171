//! Retention (CAT-05): which images to expire, and the two steps of an expiry.
//!
//! **Which images are kept.** Retention looks at the `Valid` images of one plan and one source
//! (images in other states are never chosen, and count for nothing), newest first by T0 (then
//! id). An image is kept when at least one rule keeps it, as `restic forget` and `borg prune`
//! do:
//! - `keep_last = n`: the `n` newest images;
//! - `keep_daily = n`: for each of the `n` newest backup days that have an image, the newest
//!   image of that day;
//! - `keep_weekly = n`: the same per ISO week (Monday to Sunday) of the backup day;
//! - `keep_monthly = n`: the same per calendar month of the backup day.
//!
//! Days, weeks and months without an image do not count. Every other `Valid` image of the
//! group is expired. A rule set that keeps nothing (all four 0) is refused, so a typo never
//! expires a whole plan.
//!
//! **An expiry is two steps.** First the row goes `Expired` (one commit): from then on it is
//! never restored, listed only with `--all`, and its target is protected by nothing. Then the
//! target file is removed (copy image) or the session withdrawn (nocopy image). A crash between
//! the two leaves an `Expired` row whose file or session is still there; reconcile finishes it
//! ([`finish_expiry`]). A file is removed only while it is still the image's target (same
//! identity and generation as at the cut) and no `Valid` or `Incomplete` image names it.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{CatalogError, Volumes};
use crate::store::{Change, ImageId, ImageQuery, ImageRecord, ImageState, ImageStateKind, Store};
use crate::{CopyMode, Engine};

/// The retention rules of a plan (`keep_last`, `keep_daily`, `keep_weekly`, `keep_monthly`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    /// The newest images kept.
    pub last: u32,
    /// Backup days whose newest image is kept.
    pub daily: u32,
    /// ISO weeks whose newest image is kept.
    pub weekly: u32,
    /// Months whose newest image is kept.
    pub monthly: u32,
}

/// The rule that kept an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepRule {
    /// `keep_last`.
    Last,
    /// `keep_daily`.
    Daily,
    /// `keep_weekly`.
    Weekly,
    /// `keep_monthly`.
    Monthly,
}

/// What retention decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionDecision {
    /// The `Valid` images kept, each with the rules that keep it, newest first per plan and
    /// source.
    pub keep: Vec<(ImageId, Vec<KeepRule>)>,
    /// The `Valid` images to expire.
    pub expire: Vec<ImageId>,
}

/// The period of an image's backup day a rule keeps one image of: (year, month or week, day).
type Period = fn(&ImageRecord) -> (i32, i32, i32);

/// Choose the images retention expires (pure; see the module's rules).
///
/// # Errors
/// [`CatalogError::Invalid`] when every count is 0.
pub fn choose_expired(
    images: &[ImageRecord],
    keep: &Keep,
) -> Result<RetentionDecision, CatalogError> {
    if keep.last == 0 && keep.daily == 0 && keep.weekly == 0 && keep.monthly == 0 {
        return Err(CatalogError::Invalid {
            what: "retention",
            why: "keep_last, keep_daily, keep_weekly and keep_monthly are all 0: it would expire \
                  every image"
                .to_string(),
        });
    }
    let mut groups: BTreeMap<(&str, &str), Vec<&ImageRecord>> = BTreeMap::new();
    for i in images.iter().filter(|i| i.state == ImageState::Valid) {
        groups
            .entry((i.plan.as_str(), i.source.locator.as_str()))
            .or_default()
            .push(i);
    }
    let mut out = RetentionDecision::default();
    for (_, mut group) in groups {
        // Newest first.
        group.sort_by_key(|i| std::cmp::Reverse((i.t0_unix_ms, i.id)));
        let mut rules: Vec<Vec<KeepRule>> = vec![Vec::new(); group.len()];
        for (idx, r) in rules.iter_mut().enumerate().take(keep.last as usize) {
            debug_assert!(idx < group.len());
            r.push(KeepRule::Last);
        }
        let day = |i: &ImageRecord| {
            let d = i.backup_day.0;
            (
                i32::from(d.year()),
                i32::from(d.month()),
                i32::from(d.day()),
            )
        };
        let week = |i: &ImageRecord| {
            let w = i.backup_day.0.iso_week_date();
            (i32::from(w.year()), i32::from(w.week()), 0)
        };
        let month = |i: &ImageRecord| {
            let d = i.backup_day.0;
            (i32::from(d.year()), i32::from(d.month()), 0)
        };
        let periods: [(u32, KeepRule, Period); 3] = [
            (keep.daily, KeepRule::Daily, day),
            (keep.weekly, KeepRule::Weekly, week),
            (keep.monthly, KeepRule::Monthly, month),
        ];
        for (n, rule, period) in periods {
            let mut seen = HashSet::new();
            for (idx, i) in group.iter().enumerate() {
                if seen.len() >= n as usize {
                    break;
                }
                // The first image met of a period is its newest.
                if seen.insert(period(i)) {
                    rules[idx].push(rule);
                }
            }
        }
        for (i, r) in group.iter().zip(rules) {
            if r.is_empty() {
                out.expire.push(i.id);
            } else {
                out.keep.push((i.id, r));
            }
        }
    }
    Ok(out)
}

/// The first step of an expiry: the images' rows go from `Valid` to `Expired`, all in one
/// commit.
///
/// # Errors
/// [`CatalogError::Store`] (a `Conflict` when one of them is no longer `Valid`: nothing
/// changed).
pub fn mark_expired(store: &dyn Store, images: &[ImageId]) -> Result<(), CatalogError> {
    if images.is_empty() {
        return Ok(());
    }
    store.commit(
        images
            .iter()
            .map(|&image| Change::SetImageState {
                image,
                from: ImageStateKind::Valid,
                to: ImageState::Expired,
            })
            .collect(),
    )?;
    Ok(())
}

/// What [`finish_expiry`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "finished", content = "detail", rename_all = "snake_case")]
pub enum Finished {
    /// The target file was removed.
    Removed,
    /// The session was withdrawn.
    Withdrawn,
    /// Nothing was left to do (the file is gone, the session ended).
    AlreadyDone,
    /// The file at the target's locator was left alone: why.
    LeftAlone(String),
}

/// The second step of an expiry, also reconcile's way to finish a half-done one: remove an
/// `Expired` copy image's target (only while it is still that image's file and no `Valid` or
/// `Incomplete` image names it), or withdraw an `Expired` nocopy image's live session.
///
/// # Errors
/// [`CatalogError::UnknownImage`], [`CatalogError::State`] when the image is not `Expired`,
/// [`CatalogError::Invalid`] for a nocopy image without an engine, volume, file and engine
/// errors.
pub fn finish_expiry(
    store: &dyn Store,
    engine: Option<&Engine>,
    volumes: &dyn Volumes,
    image: ImageId,
) -> Result<Finished, CatalogError> {
    let row = store
        .image(image)?
        .ok_or(CatalogError::UnknownImage(image))?;
    if row.state != ImageState::Expired {
        return Err(CatalogError::state(image, row.state.kind(), "expired"));
    }
    match row.mode {
        CopyMode::Copy => {
            let locator = &row.target.locator;
            let Some(now) = volumes.open(locator)?.map(|v| v.info()) else {
                return Ok(Finished::AlreadyDone);
            };
            if now.id != row.target.id || now.generation != row.target.generation {
                return Ok(Finished::LeftAlone(format!(
                    "{locator} is no longer the target of {image} (another file is there)"
                )));
            }
            let users = store.images(&ImageQuery {
                states: Some(vec![ImageStateKind::Valid, ImageStateKind::Incomplete]),
                ..ImageQuery::default()
            })?;
            if let Some(u) = users
                .iter()
                .find(|u| u.mode == CopyMode::Copy && &u.target.locator == locator)
            {
                return Ok(Finished::LeftAlone(format!(
                    "{locator} is the target of {} image {}",
                    u.state.kind().as_str(),
                    u.id
                )));
            }
            Ok(if volumes.remove(locator)? {
                Finished::Removed
            } else {
                Finished::AlreadyDone
            })
        }
        CopyMode::NoCopy => {
            let engine = engine.ok_or_else(|| CatalogError::Invalid {
                what: "expiry",
                why: format!("nocopy image {image} is withdrawn through its engine"),
            })?;
            let live = engine.status().into_iter().any(|s| {
                s.id == row.session && s.target == row.target.locator && s.state.is_live()
            });
            if !live {
                return Ok(Finished::AlreadyDone);
            }
            engine
                .withdraw(row.session)
                .map_err(CatalogError::engine("withdraw"))?;
            Ok(Finished::Withdrawn)
        }
    }
}

/// Expire images: [`mark_expired`] (one commit), then [`finish_expiry`] for each.
///
/// # Errors
/// As [`mark_expired`] and [`finish_expiry`]; rows marked stay `Expired` and a later reconcile
/// finishes them.
pub fn expire(
    store: &dyn Store,
    engine: Option<&Engine>,
    volumes: &dyn Volumes,
    images: &[ImageId],
) -> Result<Vec<(ImageId, Finished)>, CatalogError> {
    mark_expired(store, images)?;
    images
        .iter()
        .map(|&i| finish_expiry(store, engine, volumes, i).map(|f| (i, f)))
        .collect()
}
