//! Recovery: reconciling each live session with what its volumes are now, on open, on a
//! reset notification and on resume; the restart policies and the decisions taken.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::model::{Entry, Reason, ReasonCode, SessionState, VolumeRef};

use super::Engine;
use crate::activity::CopyProof;
use crate::ids::{SessionId, VolumeId};
use crate::session::Session;
use crate::volume::{open_file_volume, Backend};
use crate::volume::{FileVolumeOptions, Volume, VolumeInfo};
use crate::{Error, Result};

/// What to do with incomplete sessions when a table is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Resume every session whose durable state verifies against its volumes. Default.
    #[default]
    Resume,
    /// Terminate every active session (the source patent's rule).
    TerminateIncomplete,
}

/// Finds a session's volumes again when a table is opened.
pub trait VolumeResolver: Send + Sync {
    /// The volume the locator names, or `None` when it is gone.
    ///
    /// # Errors
    /// An I/O error other than "not found".
    fn resolve(&self, r: &VolumeRef) -> Result<Option<Arc<dyn Volume>>>;
}

/// Resolves locators as file paths (see [`open_file_volume`] for the backend).
#[derive(Debug, Clone, Default)]
pub struct FileResolver {
    /// Options for opening.
    pub options: FileVolumeOptions,
    /// File backend (see [`EngineOptions::backend`](super::EngineOptions::backend)).
    pub backend: Backend,
    /// The backend of the first volume this resolver opened.
    pub opened: std::sync::OnceLock<&'static str>,
}

impl VolumeResolver for FileResolver {
    fn resolve(&self, r: &VolumeRef) -> Result<Option<Arc<dyn Volume>>> {
        if r.locator.starts_with("mem:") || !Path::new(&r.locator).exists() {
            return Ok(None);
        }
        let (v, name) = open_file_volume(Path::new(&r.locator), &self.options, self.backend)?;
        let _ = self.opened.set(name);
        Ok(Some(v))
    }
}

/// Resolves locators from a fixed map (in-memory volumes, tests, harnesses).
#[derive(Debug, Default, Clone)]
pub struct MapResolver {
    /// Locator -> volume.
    pub volumes: HashMap<String, Arc<dyn Volume>>,
}

impl MapResolver {
    /// Add a volume under its own locator.
    pub fn add(&mut self, v: Arc<dyn Volume>) {
        self.volumes.insert(v.info().locator, v);
    }
}

impl VolumeResolver for MapResolver {
    fn resolve(&self, r: &VolumeRef) -> Result<Option<Arc<dyn Volume>>> {
        Ok(self.volumes.get(&r.locator).cloned())
    }
}

/// The detail of an identity mismatch: which volume was replaced, by path.
fn replaced_message(role: &str, was: &VolumeRef, now: &VolumeInfo) -> String {
    if was.locator == now.locator {
        format!(
            "{role} {} was replaced by another file (different device and inode)",
            was.locator
        )
    } else {
        format!("{role} {} is now {}", was.locator, now.locator)
    }
}

/// What recovery decided for one session.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    /// Session.
    pub session: SessionId,
    /// Outcome.
    pub outcome: Outcome,
    /// The session was suspended before this decision (so `Resumed` means it left suspension).
    pub was_suspended: bool,
}

impl Decision {
    fn new(session: SessionId, outcome: Outcome, was_suspended: bool) -> Self {
        Decision {
            session,
            outcome,
            was_suspended,
        }
    }
}

/// Recovery outcome for a session.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Outcome {
    /// Resumed with all extents.
    Resumed,
    /// Resumed with some extents ended (index, reason).
    ResumedPartly(Vec<(u32, Reason)>),
    /// Terminated.
    Terminated(Reason),
    /// Suspended: its source or target cannot be found or opened (the reason says which).
    Suspended(Reason),
    /// A completed incremental session whose change map can no longer be vouched for (its
    /// source or target was replaced, shrank, or cannot be found): every grain is now marked
    /// changed, so its next refresh copies everything. It stays completed.
    ChangesUnknown(Reason),
    /// Already ended (completed, withdrawn, terminated) before.
    Ended,
}

impl Engine {
    /// Reconcile every live (active or suspended) session with its volumes (open time).
    pub(super) fn reconcile_all(&self, resolver: &dyn VolumeResolver) -> Result<Vec<Decision>> {
        let mut out = Vec::new();
        for s in self.table.sessions() {
            if s.reversing() && !s.is_live() {
                out.push(self.reconcile_reversing(&s, resolver)?);
                continue;
            }
            if s.records_changes() && !s.is_live() {
                let src = self.find_volume(&s.desc.source, resolver);
                let tgt = self.find_volume(&s.desc.target, resolver);
                out.push(self.reconcile_recording(&s, src, tgt, ReasonCode::IdentityMismatch)?);
                continue;
            }
            if !s.is_live() {
                // A completed session's image is its target: attach it when it is still the
                // same volume, so the image stays readable. (A target that cannot be opened
                // leaves the image unreadable; it does not keep the table from opening.)
                if s.status().state == SessionState::Completed
                    && self.volumes.load().get(&s.desc.target.id).is_none()
                {
                    if let Ok(Some(v)) = resolver.resolve(&s.desc.target) {
                        let i = v.info();
                        if i.id == s.desc.target.id && i.generation == s.desc.target.generation {
                            self.attach(v);
                        }
                    }
                }
                out.push(Decision::new(s.id(), Outcome::Ended, false));
                continue;
            }
            let was_suspended = s.state() == SessionState::Suspended;
            if self.options.restart == RestartPolicy::TerminateIncomplete {
                let r = Reason::new(
                    ReasonCode::RestartPolicy,
                    "terminate-incomplete restart policy",
                );
                self.terminate(s.id(), r.clone())?;
                out.push(Decision::new(s.id(), Outcome::Terminated(r), was_suspended));
                continue;
            }
            let src = self.find_volume(&s.desc.source, resolver);
            let tgt = self.find_volume(&s.desc.target, resolver);
            out.push(self.reconcile(&s, src, tgt, ReasonCode::IdentityMismatch)?);
        }
        self.refresh_active();
        Ok(out)
    }

    /// A session's volume: the attached one with its identity, else what the resolver finds.
    /// A resolver error makes the volume unavailable (the session is suspended), never the
    /// whole open fail.
    fn find_volume(&self, r: &VolumeRef, resolver: &dyn VolumeResolver) -> Found {
        if let Some(h) = self.volumes.load().get(&r.id) {
            return Found::Here(h.vol.inner().clone());
        }
        match resolver.resolve(r) {
            Ok(Some(v)) => Found::Here(v),
            Ok(None) => Found::Missing,
            Err(e) => Found::Unusable(e.to_string()),
        }
    }

    /// Compare a session's extents with what its volumes are now; resume, end extents,
    /// suspend, or terminate. Attaches the volumes when the session resumes.
    ///
    /// A volume that is present but is another volume now (identity, generation, sector size)
    /// terminates the session; otherwise a volume that is missing or cannot be opened
    /// suspends it (the first of source and target that is, with why); otherwise the extents
    /// are checked against the sizes and a suspended session becomes active again.
    fn reconcile(
        &self,
        s: &Arc<Session>,
        src: Found,
        tgt: Found,
        mismatch: ReasonCode,
    ) -> Result<Decision> {
        let id = s.id();
        let was_suspended = s.state() == SessionState::Suspended;
        let changed = src
            .info()
            .and_then(|i| identity_change(mismatch, &i, &s.desc.source, "source"))
            .or_else(|| {
                tgt.info()
                    .and_then(|i| identity_change(mismatch, &i, &s.desc.target, "target"))
            });
        if let Some(r) = changed {
            self.terminate(id, r.clone())?;
            return Ok(Decision::new(id, Outcome::Terminated(r), was_suspended));
        }
        let (src, tgt) = match (src, tgt) {
            (Found::Here(a), Found::Here(b)) => (a, b),
            (src, tgt) => return self.suspend(s, src, tgt),
        };
        let (si, ti) = (src.info(), tgt.info());
        let st = s.status();
        let ended = shrunk_extents(s, &st.ended, si.size, ti.size);
        let mut entries: Vec<Entry> = ended
            .iter()
            .map(|(i, r)| Entry::EndExtent {
                session: id,
                extent: *i,
                reason: r.clone(),
            })
            .collect();
        let live = st.ended.iter().filter(|x| x.is_none()).count();
        // Checked copies whose proof waited for these volumes (the open that found their
        // records could not reach them): proven before the session goes on, and confirmed by
        // `SetBits` in the commit that resumes it.
        let unproven = self.table.unverified_of(id);
        // After a reset the target is the device as it is now, which may have lost writes
        // that were never flushed: a logged copy's bytes among them (its flush comes at the
        // log's retire). Every copy the journal records is proven again (from the log where
        // the target lost it); the target is flushed then, so those copies need no retire.
        let recorded = if mismatch == ReasonCode::ResetMismatch {
            self.table.recorded_of(id)
        } else {
            unproven.clone()
        };
        if !recorded.is_empty() && ended.len() < live {
            let stays = |e: usize| s.extent_live(e) && !ended.iter().any(|(i, _)| *i as usize == e);
            let log = |g: u64| self.table.log_bytes(s, g);
            match super::checked::verify_on_resume(s, &src, &tgt, &recorded, &log, &stays) {
                CopyProof::Proven => {
                    self.table.forget_unretired(id);
                    entries.extend(set_bits_runs(id, &unproven));
                }
                CopyProof::Deferred => {
                    // Unreachable (both volumes are here); end rather than trust the grains.
                    let r = Reason::new(
                        ReasonCode::CopyUnverified,
                        "recorded copy not verified: the source could not be read",
                    );
                    self.terminate(id, r.clone())?;
                    return Ok(Decision::new(id, Outcome::Terminated(r), was_suspended));
                }
                CopyProof::Failed(r) => {
                    self.terminate(id, r.clone())?;
                    return Ok(Decision::new(id, Outcome::Terminated(r), was_suspended));
                }
            }
        }
        if ended.len() == live {
            let r = ended.first().map_or_else(
                || Reason::new(ReasonCode::VolumeShrunk, "no extent left"),
                |(_, r)| r.clone(),
            );
            self.terminate(id, r.clone())?;
            return Ok(Decision::new(id, Outcome::Terminated(r), was_suspended));
        }
        // Attach before a suspended session becomes active again: its first copy-before-write
        // finds both volumes.
        for v in [src, tgt] {
            if self.volumes.load().get(&v.info().id).is_none() {
                self.attach(v);
            }
        }
        if was_suspended {
            entries.push(Entry::SetState {
                session: id,
                state: SessionState::Active,
                reason: None,
            });
        }
        self.table.commit(entries)?;
        let outcome = if ended.is_empty() {
            Outcome::Resumed
        } else {
            Outcome::ResumedPartly(ended)
        };
        Ok(Decision::new(id, outcome, was_suspended))
    }

    /// A completed session whose reverse restore was in progress: attach both volumes when
    /// they are what it recorded, and the restore goes on; else it cannot (the image it
    /// restores from, or the volume it restores onto, is gone): end the session with why, and
    /// say what was left undone.
    fn reconcile_reversing(
        &self,
        s: &Arc<Session>,
        resolver: &dyn VolumeResolver,
    ) -> Result<Decision> {
        let id = s.id();
        let src = self.find_volume(&s.desc.source, resolver);
        let tgt = self.find_volume(&s.desc.target, resolver);
        let problem = match (&src, &tgt) {
            (Found::Here(a), Found::Here(b)) => {
                let (si, ti) = (a.info(), b.info());
                identity_change(ReasonCode::IdentityMismatch, &si, &s.desc.source, "source")
                    .or_else(|| {
                        identity_change(ReasonCode::IdentityMismatch, &ti, &s.desc.target, "target")
                    })
                    .or_else(|| {
                        shrunk_extents(s, &s.status().ended, si.size, ti.size)
                            .into_iter()
                            .next()
                            .map(|(_, r)| r)
                    })
            }
            (Found::Missing | Found::Unusable(_), _) => Some(Reason::new(
                ReasonCode::SourceUnavailable,
                format!("source {}: {}", s.desc.source.locator, src.why()),
            )),
            _ => Some(Reason::new(
                ReasonCode::TargetUnavailable,
                format!("target {}: {}", s.desc.target.locator, tgt.why()),
            )),
        };
        if let Some(r) = problem {
            self.terminate(id, r.clone())?;
            let r = s.status().reason.unwrap_or(r);
            return Ok(Decision::new(id, Outcome::Terminated(r), false));
        }
        for f in [src, tgt] {
            if let Found::Here(v) = f {
                if self.volumes.load().get(&v.info().id).is_none() {
                    self.attach(v);
                }
            }
        }
        Ok(Decision::new(id, Outcome::Resumed, false))
    }

    /// A completed incremental session: attach its volumes when both are what it recorded (its
    /// writes through the engine keep being recorded); else mark every grain changed, durably,
    /// so that a refresh never trusts a map that may have missed writes.
    fn reconcile_recording(
        &self,
        s: &Arc<Session>,
        src: Found,
        tgt: Found,
        mismatch: ReasonCode,
    ) -> Result<Decision> {
        let id = s.id();
        let problem = match (&src, &tgt) {
            (Found::Here(a), Found::Here(b)) => {
                let (si, ti) = (a.info(), b.info());
                identity_change(mismatch, &si, &s.desc.source, "source")
                    .or_else(|| identity_change(mismatch, &ti, &s.desc.target, "target"))
                    .or_else(|| {
                        shrunk_extents(s, &s.status().ended, si.size, ti.size)
                            .into_iter()
                            .next()
                            .map(|(_, r)| r)
                    })
            }
            (Found::Missing | Found::Unusable(_), _) => Some(Reason::new(
                ReasonCode::SourceUnavailable,
                format!("source {}: {}", s.desc.source.locator, src.why()),
            )),
            _ => Some(Reason::new(
                ReasonCode::TargetUnavailable,
                format!("target {}: {}", s.desc.target.locator, tgt.why()),
            )),
        };
        match problem {
            None => {
                for f in [src, tgt] {
                    if let Found::Here(v) = f {
                        if self.volumes.load().get(&v.info().id).is_none() {
                            self.attach(v);
                        }
                    }
                }
                Ok(Decision::new(id, Outcome::Ended, false))
            }
            Some(r) => {
                let grains = s.desc.grains();
                if !s.changed_bits().all_set(0, grains) {
                    self.table.commit(vec![Entry::SetChanged {
                        session: id,
                        start: 0,
                        count: grains,
                    }])?;
                }
                Ok(Decision::new(id, Outcome::ChangesUnknown(r), false))
            }
        }
    }

    /// Suspend a session because its source or target (the first of them that is) is missing
    /// or cannot be opened; durable before it returns. The unavailable volume is detached (a
    /// handle opened before it went away must not be used), the present one attached.
    fn suspend(&self, s: &Arc<Session>, src: Found, tgt: Found) -> Result<Decision> {
        let id = s.id();
        let was_suspended = s.state() == SessionState::Suspended;
        let (code, why, gone) = match (&src, &tgt) {
            (Found::Missing | Found::Unusable(_), _) => {
                (ReasonCode::SourceUnavailable, src.why(), &s.desc.source)
            }
            _ => (ReasonCode::TargetUnavailable, tgt.why(), &s.desc.target),
        };
        let r = Reason::new(code, why);
        self.detach(gone.id);
        for f in [src, tgt] {
            if let Found::Here(v) = f {
                if self.volumes.load().get(&v.info().id).is_none() {
                    self.attach(v);
                }
            }
        }
        if s.status().reason.as_ref() != Some(&r) || !was_suspended {
            self.table.commit(vec![Entry::SetState {
                session: id,
                state: SessionState::Suspended,
                reason: Some(r.clone()),
            }])?;
        }
        Ok(Decision::new(id, Outcome::Suspended(r), was_suspended))
    }

    /// A storage subsystem reports a reset of volume `vol` (device reset, re-attach,
    /// replacement). `now` is the volume as it is after the reset (`None`: gone). Each live
    /// session using it is compared with what it now is and resumes (a suspended one too, when
    /// its volumes are back), loses extents, is suspended (the volume is gone), or terminates.
    ///
    /// # Errors
    /// Table errors.
    pub fn reset(&self, vol: VolumeId, now: Option<Arc<dyn Volume>>) -> Result<Vec<Decision>> {
        self.reset_found(vol, now.map_or(Found::Missing, Found::Here))
    }

    /// A reset of volume `vol` after which it exists but cannot be opened (`why`: the error
    /// opening it gave): every live session using it is suspended.
    ///
    /// # Errors
    /// Table errors.
    pub fn reset_unavailable(&self, vol: VolumeId, why: &str) -> Result<Vec<Decision>> {
        self.reset_found(vol, Found::Unusable(why.to_string()))
    }

    /// A reset of the file volume whose locator (canonical path, as the table records it) is
    /// `locator`: the identity the table knows for that path (a live session's first, since an
    /// ended session may name an earlier file at the same path) is reset to what the path is
    /// now. Gone: its sessions are suspended; present but unopenable (a directory now, no
    /// permission): the same, with the error; present: reconciled as [`Engine::reset`] does.
    ///
    /// # Errors
    /// [`Error::UnknownVolume`] when no session names the path; table errors.
    pub fn reset_locator(&self, locator: &str) -> Result<Vec<Decision>> {
        let sessions = self.table.sessions();
        let old = sessions
            .iter()
            .filter_map(|x| {
                let id = if x.desc.source.locator == locator {
                    x.desc.source.id
                } else if x.desc.target.locator == locator {
                    x.desc.target.id
                } else {
                    return None;
                };
                Some(((x.is_live(), x.id()), id))
            })
            .max_by_key(|(k, _)| *k)
            .map(|(_, id)| id)
            .ok_or_else(|| Error::UnknownVolume(locator.to_string()))?;
        let path = std::path::Path::new(locator);
        match self.open_file(path) {
            Ok(now) => self.reset(old, Some(now)),
            Err(_) if !path.exists() => self.reset(old, None),
            Err(er) => self.reset_unavailable(old, &er.to_string()),
        }
    }

    /// Call `watcher` after every reset this engine handles ([`Engine::reset`],
    /// [`Engine::reset_unavailable`], [`Engine::reset_locator`], so also a reset raised through
    /// the table's control socket), with the volume and what was decided for each session using
    /// it, on the thread that handled the reset. A watcher should only pass the notice on (a
    /// channel send): it runs before the reset returns to its caller, and a watcher that resets
    /// or watches this engine itself would wait on its own call.
    pub fn watch_resets(&self, watcher: impl Fn(&ResetHandled) + Send + Sync + 'static) {
        self.reset_watchers.add(Arc::new(watcher));
    }

    fn reset_found(&self, vol: VolumeId, now: Found) -> Result<Vec<Decision>> {
        let decisions = self.reset_decide(vol, now)?;
        self.reset_watchers.tell(&ResetHandled {
            volume: vol,
            decisions: decisions.clone(),
        });
        Ok(decisions)
    }

    fn reset_decide(&self, vol: VolumeId, now: Found) -> Result<Vec<Decision>> {
        let mut out = Vec::new();
        if let Found::Here(v) = &now {
            if v.info().id == vol {
                // The handle is replaced so later I/O goes to the re-attached device.
                self.attach(v.clone());
            }
        }
        // Snapshot the live list first (`terminate` -> `refresh_active` replaces it).
        let active = self.active.load_full();
        for s in active.iter() {
            if s.desc.source.id != vol && s.desc.target.id != vol {
                continue;
            }
            let pick = |r: &VolumeRef| -> Found {
                if r.id == vol {
                    now.clone()
                } else {
                    self.volumes
                        .load()
                        .get(&r.id)
                        .map_or(Found::Missing, |h| Found::Here(h.vol.inner().clone()))
                }
            };
            let (src, tgt) = (pick(&s.desc.source), pick(&s.desc.target));
            out.push(if s.is_live() {
                self.reconcile(s, src, tgt, ReasonCode::ResetMismatch)?
            } else {
                self.reconcile_recording(s, src, tgt, ReasonCode::ResetMismatch)?
            });
        }
        self.refresh_active();
        Ok(out)
    }

    /// Try to resume a suspended session: find its volumes again (attached ones, else through
    /// `resolver`, e.g. [`Engine::file_resolver`]) and reconcile it as opening the table
    /// would. The decision says whether it resumed, stays suspended (the volume is still
    /// unavailable) or terminated (the volume came back as another volume). An active session
    /// is left as it is (`Resumed`, `was_suspended` false).
    ///
    /// # Errors
    /// [`Error::UnknownSession`], [`Error::NotActive`] for an ended session, table errors.
    pub fn resume(&self, id: SessionId, resolver: &dyn VolumeResolver) -> Result<Decision> {
        let s = self.session(id)?;
        match s.state() {
            SessionState::Suspended => {}
            SessionState::Active => return Ok(Decision::new(id, Outcome::Resumed, false)),
            state => return Err(Error::NotActive { id, state }),
        }
        let src = self.find_volume(&s.desc.source, resolver);
        let tgt = self.find_volume(&s.desc.target, resolver);
        let d = self.reconcile(&s, src, tgt, ReasonCode::IdentityMismatch);
        self.refresh_active();
        d
    }
}

/// A reset an engine handled, as its watchers see it ([`Engine::watch_resets`]).
#[derive(Debug, Clone)]
pub struct ResetHandled {
    /// The volume reset.
    pub volume: VolumeId,
    /// What was decided for each session using it (resumed, lost extents, suspended,
    /// terminated), as the reset returned it.
    pub decisions: Vec<Decision>,
}

/// A watcher of an engine's resets.
type ResetWatcher = Arc<dyn Fn(&ResetHandled) + Send + Sync>;

/// The watchers of an engine's resets ([`Engine::watch_resets`]).
#[derive(Default)]
pub(crate) struct ResetWatchers(parking_lot::Mutex<Vec<ResetWatcher>>);

impl std::fmt::Debug for ResetWatchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResetWatchers({})", self.0.lock().len())
    }
}

impl ResetWatchers {
    fn add(&self, w: ResetWatcher) {
        self.0.lock().push(w);
    }

    /// Tell every watcher, outside the lock (a watcher may add another).
    fn tell(&self, handled: &ResetHandled) {
        let watchers: Vec<ResetWatcher> = self.0.lock().clone();
        for w in watchers {
            w(handled);
        }
    }
}

/// What reconciling finds for one of a session's volumes.
#[derive(Clone)]
enum Found {
    /// Present (its identity is checked next).
    Here(Arc<dyn Volume>),
    /// Not found.
    Missing,
    /// Present but cannot be opened; the error.
    Unusable(String),
}

impl Found {
    fn info(&self) -> Option<VolumeInfo> {
        match self {
            Found::Here(v) => Some(v.info()),
            Found::Missing | Found::Unusable(_) => None,
        }
    }

    fn why(&self) -> String {
        match self {
            Found::Here(_) => String::new(),
            Found::Missing => "not found".to_string(),
            Found::Unusable(e) => e.clone(),
        }
    }
}

/// Why a volume found now is not the one a session recorded (`None` when it is): another
/// volume (`mismatch` says which code that gets), another generation, another sector size.
fn identity_change(
    mismatch: ReasonCode,
    now: &VolumeInfo,
    was: &VolumeRef,
    role: &str,
) -> Option<Reason> {
    if now.id != was.id {
        Some(Reason::new(mismatch, replaced_message(role, was, now)))
    } else if now.generation != was.generation {
        Some(Reason::new(
            ReasonCode::GenerationMismatch,
            format!(
                "{role} generation {} is now {}",
                was.generation, now.generation
            ),
        ))
    } else if now.sector_size != was.sector_size {
        Some(Reason::new(
            ReasonCode::SectorSizeMismatch,
            format!(
                "{role} sector size {} is now {}",
                was.sector_size, now.sector_size
            ),
        ))
    } else {
        None
    }
}

/// The session's live extents that no longer fit the volumes' sizes, each with its reason.
fn shrunk_extents(
    s: &Session,
    ended: &[Option<Reason>],
    source_size: u64,
    target_size: u64,
) -> Vec<(u32, Reason)> {
    let mut out = Vec::new();
    for (i, e) in s.desc.extents.iter().enumerate() {
        if ended.get(i).is_some_and(Option::is_some) {
            continue;
        }
        let fits = e.source_offset + e.len <= source_size && e.target_offset + e.len <= target_size;
        if !fits {
            out.push((
                i as u32,
                Reason::new(
                    ReasonCode::VolumeShrunk,
                    format!(
                        "extent {i} no longer fits (source {source_size} bytes, target {target_size} bytes)"
                    ),
                ),
            ));
        }
    }
    out
}

/// `SetBits` entries covering `grains` (sorted, distinct), one per run of consecutive grains.
fn set_bits_runs(session: SessionId, grains: &[(u64, u32)]) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for &(g, _) in grains {
        if let Some(Entry::SetBits { start, count, .. }) = out.last_mut() {
            if *start + *count == g {
                *count += 1;
                continue;
            }
        }
        out.push(Entry::SetBits {
            session,
            start: g,
            count: 1,
        });
    }
    out
}
