//! The work of a backup job: [`PlanWork`] implements the job layer's [`JobWork`] with
//! [`plan::run_plan_observed`] on the real engine, and [`Recorder`] writes each step to the
//! store as it happens (docs/orchestration.md, sections 1.2 and 3.2):
//!
//! - every step moves the job's phase (`Active { phase }`) and the task's `Running(step)`;
//! - the tasks are put `Pending` when the checks expanded them and get their end status at the
//!   end of the run;
//! - a hook's start is committed before the hook runs and its end after it ends; a start that
//!   is already recorded for the attempt is never run again (HOOK-10): the run treats it as
//!   failed and the job ends `HookUnknown`;
//! - an `Establish` intent is committed before each cut and resolved with the session after
//!   it, in the same commit as the image row, `Incomplete` (CAT-01);
//! - the images of a task become `Valid` at its catalog step (its copy is complete, before
//!   `task_post`); those of a task that fails after its cut are `Lost` (its sessions were
//!   withdrawn, its targets removed).
//!
//! A store error while recording does not stop the run (the run's own outcome decides the
//! job); it is kept and reported as the job's end reason when nothing else failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use parking_lot::Mutex;

use super::holds::Holds;
use crate::catalog::{self, Cut};
use crate::clock::Clock;
use crate::engine::{Engine, EngineOptions};
use crate::hook::{HookError, HookOutcome, HookRun, HookSpec, RunStatus, Stage};
use crate::job::{step as job_step, Event as JobEvent, JobOutcome, JobWork, Needs, Readiness};
use crate::plan::Writes;
use crate::plan::{
    self, CutStep, FsFinder, GlobalConfig, Left, Plan, PlanRun, PlanStatus, ResumeAt, RunContext,
    RunObserver, Step, Task, TaskResult,
};
use crate::quiesce::{FsFreeze, QuiesceBackend, QuiesceMode};
use crate::store::{
    BackupDay, Change, HookResult, HookRunKey, HookRunRecord, HookStage, IdKind, ImageId,
    ImageState, ImageStateKind, Intent, IntentAction, IntentId, IntentOutcome, JobId, JobReason,
    JobRecord, JobStatus, Phase, Store, StoreError, TaskRecord, TaskStatus, TaskStep,
};
use crate::SessionId;

/// The work of backup jobs run by this process.
pub(super) struct PlanWork {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The clock of the runs (the scheduler's).
    pub clock: Arc<dyn Clock>,
    /// The global configuration.
    pub global: GlobalConfig,
    /// The plans this process may run, by name, with their files.
    pub plans: HashMap<String, (PathBuf, Plan)>,
    /// The activity table of each plan, by plan name.
    pub tables: HashMap<String, PathBuf>,
    /// The engine of each table, opened on first use.
    pub engines: Mutex<HashMap<PathBuf, Arc<Engine>>>,
    /// The state directory, where a job's quiesce watchdog keeps its lock (QUI-07); `None`
    /// starts no watchdog (a program that is not the `timezero` binary).
    pub state_dir: Option<PathBuf>,
}

impl std::fmt::Debug for PlanWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlanWork")
            .field("plans", &self.plans.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PlanWork {
    /// Run or continue the restore job `job` (its process died, or the job layer retries it):
    /// see [`super::catalog::resume_restore`].
    pub(super) fn restore(&self, job: &JobRecord) -> JobOutcome {
        let crate::store::JobKind::Restore { image, .. } = &job.kind else {
            return failed(JobReason::Plan(format!("job {} is not a restore", job.id)));
        };
        let engine = self
            .store
            .image(*image)
            .ok()
            .flatten()
            .and_then(|i| self.engines.lock().get(&i.table).cloned());
        let tables = self
            .state_dir
            .as_ref()
            .and_then(|d| super::state::StateDir::new(Some(d.clone())).tables().ok())
            .unwrap_or_default();
        super::catalog::resume_restore(
            &*self.store,
            job,
            engine,
            tables,
            &crate::job::owner_of_this_process(),
        )
    }

    fn engine(&self, table: &Path) -> crate::Result<Arc<Engine>> {
        let mut engines = self.engines.lock();
        if let Some(e) = engines.get(table) {
            return Ok(Arc::clone(e));
        }
        let e = Arc::new(Engine::open_path(table, EngineOptions::default())?);
        engines.insert(table.to_path_buf(), Arc::clone(&e));
        Ok(e)
    }
}

fn failed(reason: JobReason) -> JobOutcome {
    JobOutcome::Done {
        status: JobStatus::Failed,
        reason: Some(reason),
    }
}

impl PlanWork {
    /// End the tasks of `job`, killed in `phase` after its catalog step: a task not started is
    /// `Canceled`; one that was running is `Ok` when each of its sources has a valid image
    /// (`Warning` with `HookUnknown` for the task whose hook was in flight), else `Failed`.
    fn end_tasks(&self, job: JobId, phase: Phase) {
        let (Ok(tasks), Ok(images)) = (
            self.store.tasks(job),
            self.store.images(&crate::store::ImageQuery {
                job: Some(job),
                ..crate::store::ImageQuery::default()
            }),
        ) else {
            return;
        };
        let in_flight = match phase {
            Phase::Task { index, .. } => Some(index),
            _ => None,
        };
        let mut changes = Vec::new();
        for t in tasks {
            let valid = images
                .iter()
                .filter(|i| i.task == t.index && i.state == ImageState::Valid)
                .count();
            let complete = !t.sources.is_empty() && valid >= t.sources.len();
            let (to, reason) = match t.status {
                TaskStatus::Pending => (
                    TaskStatus::Canceled,
                    Some(JobReason::DaemonRestarted(phase)),
                ),
                TaskStatus::Running(_) if in_flight == Some(t.index) => (
                    if complete {
                        TaskStatus::Warning
                    } else {
                        TaskStatus::Failed
                    },
                    Some(JobReason::HookUnknown),
                ),
                TaskStatus::Running(_) if complete => (TaskStatus::Ok, None),
                TaskStatus::Running(_) => {
                    (TaskStatus::Failed, Some(JobReason::DaemonRestarted(phase)))
                }
                _ => continue,
            };
            changes.push(Change::UpdateTask {
                job,
                index: t.index,
                from: t.status,
                to,
                reason,
                message: Some("its process died".to_string()),
            });
        }
        if !changes.is_empty() {
            let _ = self.store.commit(changes);
        }
    }
}

impl PlanWork {
    /// The plan job `job` runs and its table: the one this process loaded under the job's
    /// plan name, else the text the job recorded (PLAN-18) with the table `tables` names.
    fn plan_of(&self, job: &JobRecord) -> Result<(Plan, PathBuf), JobReason> {
        let Some(name) = job.kind.plan() else {
            return Err(JobReason::Plan(format!(
                "job {} is not a backup job",
                job.id
            )));
        };
        let plan = match (self.plans.get(name), &job.plan_text) {
            (Some((_, plan)), _) => plan.clone(),
            (None, Some(text)) => Plan::parse(text).map_err(|e| {
                JobReason::Plan(format!("the plan text job {} recorded: {e}", job.id))
            })?,
            (None, None) => return Err(JobReason::Plan(format!("plan {name} is not loaded"))),
        };
        let Some(table) = self.tables.get(name) else {
            return Err(JobReason::Plan(format!("plan {name} has no table")));
        };
        Ok((plan, table.clone()))
    }

    /// Where `job`, past its cut in `phase` when its process died, continues (JOB-09); `None`
    /// when it cannot (not a task's phase).
    fn resume_at(&self, job: &JobRecord, phase: Phase) -> Option<ResumeAt> {
        let Phase::Task { index, step } = phase else {
            return None;
        };
        let hooks = self.store.hook_runs(job.id).unwrap_or_default();
        let hook = |stage: HookStage| {
            hooks
                .iter()
                .find(|r| {
                    r.key.attempt == job.attempt
                        && r.key.stage == stage
                        && r.key.task == Some(index)
                })
                .map(|r| r.result.clone())
        };
        let mut images: Vec<crate::store::ImageRecord> = self
            .store
            .images(&crate::store::ImageQuery {
                job: Some(job.id),
                ..crate::store::ImageQuery::default()
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|i| {
                i.task == index
                    && matches!(
                        i.state.kind(),
                        ImageStateKind::Incomplete | ImageStateKind::Valid
                    )
            })
            .collect();
        images.sort_by_key(|i| i.id);
        let targets = self
            .store
            .tasks(job.id)
            .ok()
            .and_then(|t| t.into_iter().find(|t| t.index == index))
            .map(|t| t.targets)
            .unwrap_or_default();
        let complete = !targets.is_empty()
            && targets
                .iter()
                .all(|t| images.iter().any(|i| &i.target.locator == t));
        let uncut = |why: &str| {
            let unknown = matches!(hook(HookStage::TaskPre), Some(Some(HookResult::Unknown)));
            Left::Uncut {
                reason: if unknown {
                    plan::JobReason::HookFailed
                } else {
                    plan::JobReason::Interrupted
                },
                error: if unknown {
                    format!(
                        "task_pre: started before in attempt {} and its end is unknown: \
                         not run again; {why}",
                        job.attempt
                    )
                } else {
                    why.to_string()
                },
            }
        };
        let from = match step {
            TaskStep::Checks | TaskStep::Pre | TaskStep::Quiesce => None,
            TaskStep::Cut | TaskStep::Thaw | TaskStep::AfterCut => {
                // An after_cut hook that ended well before the process died is not run again.
                match hook(HookStage::AfterCut) {
                    Some(Some(HookResult::Exited(0))) => Some(CutStep::Copy),
                    _ => Some(CutStep::AfterCut),
                }
            }
            TaskStep::Copy => Some(CutStep::Copy),
            TaskStep::Catalog => Some(CutStep::Catalog),
            TaskStep::Post | TaskStep::Finally => return None,
        };
        let left = match from {
            None => uncut("its process died before its cut"),
            Some(_) if !complete => uncut("its process died and its cut was not made"),
            Some(from) => {
                // One session per target, in the task's target order.
                let sessions = targets
                    .iter()
                    .filter_map(|t| images.iter().find(|i| &i.target.locator == t))
                    .map(|i| i.session)
                    .collect();
                Left::Cut {
                    sessions,
                    t0_unix_ms: images.first().map(|i| i.t0_unix_ms),
                    from,
                }
            }
        };
        Some(ResumeAt { task: index, left })
    }

    /// Run `job`'s attempt, from its start or (`resume`) where its process died.
    fn drive(&self, job: &JobRecord, resume: Option<(ResumeAt, Phase)>) -> JobOutcome {
        let (plan, table) = match self.plan_of(job) {
            Ok(p) => p,
            Err(reason) => return failed(reason),
        };
        let engine = match self.engine(&table) {
            Ok(e) => e,
            Err(e) => {
                return failed(JobReason::Engine(format!(
                    "open table {}: {e}",
                    table.display()
                )))
            }
        };
        let clock = Arc::clone(&self.clock);
        let holds = Arc::new(Holds::new(
            Arc::clone(&self.store),
            Arc::clone(&clock),
            Arc::new(FsFreeze),
            job.id,
            job.attempt,
            plan.name.clone(),
            job.backup_day,
            self.state_dir.clone(),
        ));
        let quiesce: Arc<dyn QuiesceBackend> = Arc::clone(&holds) as Arc<dyn QuiesceBackend>;
        let recorder = Recorder {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&clock),
            engine: Arc::clone(&engine),
            job: job.id,
            attempt: job.attempt,
            plan: plan.name.clone(),
            backup_day: job.backup_day,
            table: table.clone(),
            holds,
            direct: plan.session.writes == Writes::Direct,
            resumed: resume.as_ref().map(|(_, p)| *p),
            inner: Mutex::new(Inner::default()),
        };
        let ctx = RunContext {
            global: &self.global,
            clock: &clock,
            sessions: &engine,
            finder: &FsFinder,
            quiesce: &quiesce,
            job: job.id,
            attempt: job.attempt,
            backup_day: job.backup_day,
        };
        let run = match resume {
            None => plan::run_plan_observed(&plan, &ctx, &recorder),
            Some((at, _)) => {
                recorder.prepare_resume(&at);
                plan::resume_plan_observed(&plan, &ctx, &recorder, &at)
            }
        };
        recorder.finish(&run)
    }
}

impl JobWork for PlanWork {
    fn needs(&self, _job: &JobRecord, _now: Timestamp) -> Needs {
        Needs {
            resources: Vec::new(),
            readiness: Readiness::Ready,
        }
    }

    fn run(&self, job: &JobRecord, _clock: &dyn Clock) -> JobOutcome {
        if matches!(job.kind, crate::store::JobKind::Restore { .. }) {
            return self.restore(job);
        }
        self.drive(job, None)
    }

    fn resume(&self, job: &JobRecord, _clock: &dyn Clock) -> JobOutcome {
        if matches!(job.kind, crate::store::JobKind::Restore { .. }) {
            return self.restore(job);
        }
        let phase = match &job.state {
            crate::store::JobState::Active { phase } => *phase,
            _ => Phase::AwaitingResources,
        };
        let unknown = self.store.hook_runs(job.id).is_ok_and(|runs| {
            runs.iter()
                .any(|r| r.key.attempt == job.attempt && r.result == Some(HookResult::Unknown))
        });
        // Section 3.2: killed in `task_post`, `plan_post` or `finally`, the job is done with
        // status 1 and not retried: its images are made (or it failed) before those stages,
        // and running it again would cut new ones and run its hooks twice. Its tasks get the
        // end statuses the run could not write.
        let after_catalog = matches!(
            phase,
            Phase::Task {
                step: TaskStep::Post | TaskStep::Finally,
                ..
            } | Phase::PlanPost
        );
        if after_catalog {
            self.end_tasks(job.id, phase);
            return JobOutcome::Done {
                status: JobStatus::Partial,
                reason: Some(if unknown {
                    JobReason::HookUnknown
                } else {
                    JobReason::DaemonRestarted(phase)
                }),
            };
        }
        match self.resume_at(job, phase) {
            Some(at) => self.drive(job, Some((at, phase))),
            None if unknown => failed(JobReason::HookUnknown),
            None => failed(JobReason::DaemonRestarted(phase)),
        }
    }

    fn stop(&self, _job: JobId, _attempt: u32, _reason: &JobReason) {}

    fn plan_text(&self, plan: &str) -> Option<(String, [u8; 32])> {
        self.plans
            .get(plan)
            .map(|(_, p)| (p.text.clone(), p.sha256))
    }
}

/// What the recorder knows of the run beyond the store.
#[derive(Debug, Default)]
struct Inner {
    /// Each task's status as last written.
    tasks: HashMap<u32, TaskStatus>,
    /// The open `Establish` intents of each task.
    intents: HashMap<u32, Vec<IntentId>>,
    /// The image rows of each task.
    images: HashMap<u32, Vec<ImageId>>,
    /// The tasks, by index.
    plan_tasks: HashMap<u32, Task>,
    /// The open `QuiesceCommand` intent of each task whose command quiesce is held.
    held: HashMap<u32, IntentId>,
    /// The last step of each task.
    last_step: HashMap<u32, Step>,
    /// A hook was not run again because its start was recorded before (HOOK-10).
    hook_unknown: bool,
    /// The rows of the tasks this attempt ended before its process died (a resumed attempt):
    /// they keep what was recorded.
    kept: HashMap<u32, TaskRecord>,
    /// The task a resumed attempt continues.
    resumed_task: Option<u32>,
    /// The first store error.
    error: Option<String>,
}

/// Writes a run's steps to the store as they happen (see the module's text).
pub(super) struct Recorder {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    engine: Arc<Engine>,
    job: JobId,
    attempt: u32,
    plan: String,
    backup_day: BackupDay,
    table: PathBuf,
    /// The leases and the watchdog of the run (QUI-06, QUI-07).
    holds: Arc<Holds>,
    /// `writes = "direct"`: a freeze is held until the copy completes.
    direct: bool,
    /// The phase the attempt was in when its process died, when this run continues it.
    resumed: Option<Phase>,
    inner: Mutex<Inner>,
}

fn hook_stage(stage: Stage) -> Option<HookStage> {
    Some(match stage {
        Stage::PlanPre => HookStage::PlanPre,
        Stage::TaskPre => HookStage::TaskPre,
        Stage::AfterCut => HookStage::AfterCut,
        Stage::TaskPost => HookStage::TaskPost,
        Stage::PlanPost => HookStage::PlanPost,
        Stage::Finally => HookStage::Finally,
        Stage::Quiesce | Stage::QuiesceStatus | Stage::Unquiesce => return None,
    })
}

fn task_step(step: Step) -> Option<TaskStep> {
    Some(match step {
        Step::TaskPre => TaskStep::Pre,
        Step::Quiesce => TaskStep::Quiesce,
        Step::Cut => TaskStep::Cut,
        Step::Thaw => TaskStep::Thaw,
        Step::AfterCut => TaskStep::AfterCut,
        Step::Copy => TaskStep::Copy,
        Step::Catalog => TaskStep::Catalog,
        Step::TaskPost => TaskStep::Post,
        Step::Finally => TaskStep::Finally,
        Step::Checks | Step::PlanPre | Step::PlanPost => return None,
    })
}

fn task_status(status: RunStatus) -> TaskStatus {
    match status {
        RunStatus::Running => TaskStatus::Pending,
        RunStatus::Ok => TaskStatus::Ok,
        RunStatus::Warning => TaskStatus::Warning,
        RunStatus::Skipped => TaskStatus::Skipped,
        RunStatus::Failed => TaskStatus::Failed,
        RunStatus::Canceled => TaskStatus::Canceled,
    }
}

/// The store's result of a hook run.
pub(super) fn hook_result(run: &HookRun) -> HookResult {
    match &run.outcome {
        HookOutcome::Failed(HookError::TimedOut { .. }) => HookResult::TimedOut,
        HookOutcome::Failed(HookError::Spawn { .. }) => {
            HookResult::SpawnFailed(match &run.outcome {
                HookOutcome::Failed(e) => e.to_string(),
                _ => String::new(),
            })
        }
        _ => match (run.exit_code, run.signal) {
            (Some(c), _) => HookResult::Exited(c),
            (None, Some(s)) => HookResult::Signaled(s),
            (None, None) => HookResult::Exited(0),
        },
    }
}

impl Recorder {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let r = self.store.commit(changes);
        if let Err(e) = &r {
            self.inner.lock().error.get_or_insert_with(|| e.to_string());
        }
        r
    }

    fn phase(&self, phase: Phase) {
        let Ok(Some(job)) = self.store.job(self.job) else {
            return;
        };
        if job.attempt != self.attempt {
            return;
        }
        let (changes, _) = job_step(
            &job,
            JobEvent::Phase {
                phase,
                at: self.now(),
            },
        );
        let _ = self.commit(changes);
    }

    fn set_task(
        &self,
        index: u32,
        to: TaskStatus,
        reason: Option<JobReason>,
        message: Option<String>,
    ) {
        let from = {
            let inner = self.inner.lock();
            match inner.tasks.get(&index) {
                Some(s) => *s,
                None => return,
            }
        };
        if from == to && reason.is_none() && message.is_none() {
            return;
        }
        if self
            .commit(vec![Change::UpdateTask {
                job: self.job,
                index,
                from,
                to,
                reason,
                message,
            }])
            .is_ok()
        {
            self.inner.lock().tasks.insert(index, to);
        }
    }

    /// A command quiesce is held from its `quiesce_cmd` until its `unquiesce_cmd` has run: an
    /// open `QuiesceCommand` intent naming the `unquiesce_cmd` is committed before the quiesce
    /// starts and resolved at the task's first step after the thaw (or its end), so that
    /// `reconcile` runs the `unquiesce_cmd` of a process that died in between.
    fn quiesce_intent(&self, index: u32, step: Step) {
        let last = self.inner.lock().last_step.insert(index, step);
        if last == Some(Step::Thaw) && step != Step::Thaw {
            self.resolve_held(index);
        }
        if step != Step::Quiesce {
            return;
        }
        let spec = match self.inner.lock().plan_tasks.get(&index) {
            Some(t) => t.quiesce.clone(),
            None => return,
        };
        self.holds.quiescing(&spec, self.direct);
        let unquiesce = match spec.mode {
            QuiesceMode::Command { unquiesce, .. } => unquiesce,
            _ => return,
        };
        let argv = unquiesce.run.clone();
        let Ok(n) = self.store.allocate(IdKind::Intent) else {
            return;
        };
        let id = IntentId(n);
        let put = self.commit(vec![Change::PutIntent(Intent {
            id,
            job: self.job,
            attempt: self.attempt,
            task: Some(index),
            action: IntentAction::QuiesceCommand { argv },
            created: self.now(),
            outcome: None,
            resolved: None,
        })]);
        if put.is_ok() {
            self.inner.lock().held.insert(index, id);
            // Without its watchdog the hold is still undone by `reconcile` (the intent).
            if let Err(e) = self.holds.hold_command(id, index, &unquiesce) {
                eprintln!("{}: task {index}: {e}", self.job);
            }
        }
    }

    /// The quiesce of task `index` was undone.
    fn resolve_held(&self, index: u32) {
        let id = self.inner.lock().held.remove(&index);
        if let Some(intent) = id {
            self.holds.release_command(intent);
            let _ = self.commit(vec![Change::Resolve {
                intent,
                outcome: IntentOutcome::Done,
                at: self.now(),
            }]);
        }
    }

    /// The task reached its catalog step (its copy is complete): its images become `Valid`.
    fn validate(&self, index: u32) {
        let images = self
            .inner
            .lock()
            .images
            .get(&index)
            .cloned()
            .unwrap_or_default();
        let status = self.engine.status();
        let mut changes = Vec::new();
        for image in &images {
            // A copy image's checksums per MiB, read from its target now that the copy is
            // complete (`catalog verify` compares with them); a no-copy image has none.
            let sums = match self.image_checksums(*image) {
                Ok(s) => s,
                Err(e) => {
                    self.inner
                        .lock()
                        .error
                        .get_or_insert_with(|| format!("image {image}: {e}"));
                    continue;
                }
            };
            match catalog::validate_changes(&*self.store, &status, *image, sums) {
                Ok(c) => changes.extend(c),
                Err(e) => {
                    self.inner
                        .lock()
                        .error
                        .get_or_insert_with(|| format!("image {image}: {e}"));
                }
            }
        }
        let _ = self.commit(changes);
    }

    /// The checksums of copy image `image` (`None` for a no-copy image).
    fn image_checksums(
        &self,
        image: crate::store::ImageId,
    ) -> Result<Option<crate::store::ImageChecksums>, String> {
        let row = self
            .store
            .image(image)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no such image row".to_string())?;
        if row.mode != crate::CopyMode::Copy {
            return Ok(None);
        }
        let volumes = catalog::FileVolumes::default();
        let reader = catalog::ImageReader::open(&row, &volumes, Some(&self.engine))
            .map_err(|e| e.to_string())?;
        catalog::checksums(&reader, catalog::image_bytes(&row))
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// Before a resumed run: the rows of the tasks the attempt ended, and the images of the task
    /// it continues.
    fn prepare_resume(&self, at: &ResumeAt) {
        let rows = self.store.tasks(self.job).unwrap_or_default();
        let images: Vec<ImageId> = self
            .store
            .images(&crate::store::ImageQuery {
                job: Some(self.job),
                ..crate::store::ImageQuery::default()
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|i| {
                i.task == at.task
                    && matches!(
                        i.state.kind(),
                        ImageStateKind::Incomplete | ImageStateKind::Valid
                    )
            })
            .map(|i| i.id)
            .collect();
        let mut inner = self.inner.lock();
        inner.resumed_task = Some(at.task);
        inner.images.insert(at.task, images);
        for row in rows {
            let ended = matches!(
                row.status,
                TaskStatus::Ok
                    | TaskStatus::Warning
                    | TaskStatus::Skipped
                    | TaskStatus::Failed
                    | TaskStatus::Canceled
            );
            if row.index < at.task && ended {
                inner.kept.insert(row.index, row);
            }
        }
    }

    /// The valid images of this job for `task`, one per target, when every target has one.
    fn valid_images(&self, task: &Task) -> Option<Vec<crate::store::ImageRecord>> {
        if task.sources.is_empty() {
            return None;
        }
        let images = self
            .store
            .images(&crate::store::ImageQuery {
                job: Some(self.job),
                states: Some(vec![ImageStateKind::Valid]),
                ..crate::store::ImageQuery::default()
            })
            .ok()?;
        task.sources
            .iter()
            .map(|s| {
                let target = s.target.display().to_string();
                images
                    .iter()
                    .find(|i| i.task == task.index && i.target.locator == target)
                    .cloned()
            })
            .collect()
    }

    /// Record the run's end: each task's status and reason, and the job's outcome.
    fn finish(&self, run: &PlanRun) -> JobOutcome {
        for r in &run.tasks {
            let reason = r
                .reason
                .map(|why| store_reason(why, r.error.as_deref(), run, self.resumed));
            if self.inner.lock().kept.contains_key(&r.task.index) {
                continue;
            }
            self.set_task(r.task.index, task_status(r.status), reason, r.error.clone());
        }
        let inner = self.inner.lock();
        let reason = run
            .reason
            .map(|why| store_reason(why, run.error.as_deref(), run, self.resumed));
        let (status, reason) = match run.status {
            PlanStatus::Ok => (JobStatus::Success, None),
            PlanStatus::Partial => (JobStatus::Partial, None),
            PlanStatus::Skipped => (JobStatus::Skipped, reason),
            PlanStatus::Failed => (JobStatus::Failed, reason),
        };
        if inner.hook_unknown {
            return failed(JobReason::HookUnknown);
        }
        if let (JobStatus::Success | JobStatus::Partial, Some(e)) = (status, &inner.error) {
            return failed(JobReason::Engine(format!("recording the job: {e}")));
        }
        JobOutcome::Done { status, reason }
    }
}

/// The environment variable naming a step (`catalog`, `copy`, ...) at which a run's first
/// attempt stops for good once the step is recorded, so that a test can kill the process
/// there (the kill points of tests/plan_kill.rs and tests/daemon_kill.rs); also
/// `retention-marked`, where the daemon's retention stops after its rows went `Expired` and
/// before any file is removed (tests/daemon_catalog.rs).
pub(super) const STOP_AT_ENV: &str = "TIMEZERO_TEST_STOP_AT";

/// Stop here for good when [`STOP_AT_ENV`] names `step` and this is a first attempt.
fn stop_point(step: Step, attempt: u32) {
    stop_at(step.as_str(), attempt);
}

/// Stop here for good when [`STOP_AT_ENV`] is `point` and this is a first attempt.
pub(super) fn stop_at(point: &str, attempt: u32) {
    if attempt == 1 && std::env::var(STOP_AT_ENV).is_ok_and(|s| s == point) {
        loop {
            std::thread::park();
        }
    }
}

/// The store's reason for the plan layer's `why`, with the run's messages for the detail.
fn store_reason(
    why: plan::JobReason,
    error: Option<&str>,
    run: &PlanRun,
    resumed: Option<Phase>,
) -> JobReason {
    use plan::JobReason as P;
    let msg = || error.unwrap_or_default().to_string();
    match why {
        P::BackupsDisabled => JobReason::BackupsDisabled,
        P::OutsideWindow => JobReason::OutsideWindow,
        P::DestinationNotMounted => JobReason::DestinationNotMounted,
        P::DestinationSpace => JobReason::DestinationSpace,
        P::InvalidPlan | P::TargetConflict => JobReason::Plan(msg()),
        P::NothingToDo | P::SourceUnavailable | P::NoMatch => JobReason::SourceMissing(msg()),
        P::WindowClosed => JobReason::WindowClosed,
        P::HookFailed | P::HookSkipped => {
            let failed_hook = run.hooks.iter().rev().find_map(|h| match &h.run.outcome {
                HookOutcome::Failed(e) => Some(e),
                _ => None,
            });
            match failed_hook {
                Some(HookError::HookExit(n)) => JobReason::HookExit(*n),
                Some(HookError::ReservedExitCode(n)) => JobReason::ReservedExitCode(*n),
                Some(HookError::TimedOut { .. }) => JobReason::HookTimedOut,
                _ if msg().contains("not run again") => JobReason::HookUnknown,
                _ => JobReason::Engine(msg()),
            }
        }
        P::AlreadyQuiesced => JobReason::AlreadyQuiesced,
        P::QuiesceFailed => JobReason::QuiesceTimedOut,
        P::UnquiesceFailed => JobReason::UnquiesceTimedOut,
        P::TargetBusy => JobReason::TargetBusy,
        P::TargetCreate | P::Engine | P::TaskFailed => JobReason::Engine(msg()),
        P::Halted => JobReason::Halted,
        P::Interrupted => JobReason::DaemonRestarted(resumed.unwrap_or(Phase::AwaitingResources)),
    }
}

impl RunObserver for Recorder {
    fn step(&self, event: plan::Event) {
        let phase = match (event.step, event.task) {
            (Step::Checks, _) => Phase::Checks,
            (Step::PlanPre, _) => Phase::PlanPre,
            (Step::PlanPost | Step::Finally, None) => Phase::PlanPost,
            (s, Some(index)) => match task_step(s) {
                Some(step) => Phase::Task { index, step },
                None => return,
            },
            (_, None) => return,
        };
        self.phase(phase);
        stop_point(event.step, self.attempt);
        if let Some(index) = event.task {
            self.quiesce_intent(index, event.step);
        }
        if let (Step::Catalog, Some(index)) = (event.step, event.task) {
            self.validate(index);
        }
        if let (Some(index), Some(step)) = (event.task, task_step(event.step)) {
            let known = self.inner.lock().tasks.contains_key(&index);
            if known {
                self.set_task(index, TaskStatus::Running(step), None, None);
            }
        }
    }

    fn tasks(&self, tasks: &[Task]) {
        // A retry (attempt 2 and later) finds the rows of the attempt before: it starts them
        // again instead of putting them.
        let earlier: HashMap<u32, TaskStatus> = self
            .store
            .tasks(self.job)
            .map(|rows| rows.into_iter().map(|r| (r.index, r.status)).collect())
            .unwrap_or_default();
        let kept: HashMap<u32, TaskStatus> = self
            .inner
            .lock()
            .kept
            .iter()
            .map(|(i, r)| (*i, r.status))
            .collect();
        let mut changes = Vec::new();
        for t in tasks {
            let status = if t.skip.is_some() {
                TaskStatus::Skipped
            } else {
                TaskStatus::Pending
            };
            if kept.contains_key(&t.index) {
                continue;
            }
            if let Some(from) = earlier.get(&t.index) {
                changes.push(Change::UpdateTask {
                    job: self.job,
                    index: t.index,
                    from: *from,
                    to: status,
                    reason: None,
                    message: t.skip.as_ref().map(ToString::to_string),
                });
                continue;
            }
            let sources: Vec<String> = if t.sources.is_empty() {
                vec![t.pattern.clone()]
            } else {
                t.sources.iter().map(|s| s.source.locator.clone()).collect()
            };
            changes.push(Change::PutTask(TaskRecord {
                job: self.job,
                index: t.index,
                activity: t.activity.clone(),
                region: t.region.clone(),
                sources,
                targets: t
                    .sources
                    .iter()
                    .map(|s| s.target.display().to_string())
                    .collect(),
                status,
                reason: None,
                message: t.skip.as_ref().map(ToString::to_string),
            }));
        }
        self.inner
            .lock()
            .plan_tasks
            .extend(tasks.iter().map(|t| (t.index, t.clone())));
        if self.commit(changes).is_ok() {
            let mut inner = self.inner.lock();
            for t in tasks {
                let status = match kept.get(&t.index) {
                    Some(s) => *s,
                    None if t.skip.is_some() => TaskStatus::Skipped,
                    None => TaskStatus::Pending,
                };
                inner.tasks.insert(t.index, status);
            }
        }
    }

    fn hook_starting(
        &self,
        stage: Stage,
        task: Option<u32>,
        spec: &HookSpec,
    ) -> Result<(), String> {
        let Some(stage) = hook_stage(stage) else {
            return Ok(());
        };
        let key = HookRunKey {
            job: self.job,
            attempt: self.attempt,
            stage,
            task,
        };
        let r = self.store.commit(vec![Change::PutHookRun(HookRunRecord {
            key,
            argv: spec.run.clone(),
            started: self.now(),
            ended: None,
            result: None,
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
        })]);
        match r {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict { .. }) => {
                // The start is recorded: it ran (or began to) in this attempt already.
                let _ = self.store.commit(vec![Change::EndHookRun {
                    key,
                    ended: self.now(),
                    result: HookResult::Unknown,
                    stdout_tail: Vec::new(),
                    stderr_tail: Vec::new(),
                }]);
                self.inner.lock().hook_unknown = true;
                Err(format!(
                    "started before in attempt {} and its end is unknown: not run again",
                    self.attempt
                ))
            }
            Err(e) => {
                // Unrecorded, it must not run: nobody could tell afterwards.
                let m = e.to_string();
                self.inner.lock().error.get_or_insert_with(|| m.clone());
                Err(format!("its start could not be recorded: {m}"))
            }
        }
    }

    fn hook_ended(&self, stage: Stage, task: Option<u32>, run: &HookRun) {
        let Some(stage) = hook_stage(stage) else {
            return;
        };
        let _ = self.commit(vec![Change::EndHookRun {
            key: HookRunKey {
                job: self.job,
                attempt: self.attempt,
                stage,
                task,
            },
            ended: self.now(),
            result: hook_result(run),
            stdout_tail: run.stdout.bytes.clone(),
            stderr_tail: run.stderr.bytes.clone(),
        }]);
    }

    fn cutting(&self, task: &Task) {
        let mut changes = Vec::new();
        let mut ids = Vec::new();
        for s in &task.sources {
            let Ok(n) = self.store.allocate(IdKind::Intent) else {
                continue;
            };
            let id = IntentId(n);
            ids.push(id);
            changes.push(Change::PutIntent(Intent {
                id,
                job: self.job,
                attempt: self.attempt,
                task: Some(task.index),
                action: IntentAction::Establish {
                    table: self.table.clone(),
                    target: s.target.display().to_string(),
                },
                created: self.now(),
                outcome: None,
                resolved: None,
            }));
        }
        if self.commit(changes).is_ok() {
            self.inner.lock().intents.insert(task.index, ids);
        }
    }

    fn cut(&self, task: &Task, result: Result<&[SessionId], &str>) {
        // A kill point between the engine's establish and the record of its outcome.
        stop_at("cut_made", self.attempt);
        let intents = self
            .inner
            .lock()
            .intents
            .remove(&task.index)
            .unwrap_or_default();
        let now = self.now();
        let mut changes = Vec::new();
        let mut images = Vec::new();
        match result {
            Ok(sessions) => {
                let cut = Cut {
                    job: self.job,
                    task: task.index,
                    plan: &self.plan,
                    backup_day: self.backup_day,
                    table: &self.table,
                };
                for (i, id) in sessions.iter().enumerate() {
                    if let Some(intent) = intents.get(i) {
                        changes.push(Change::Resolve {
                            intent: *intent,
                            outcome: IntentOutcome::Established(*id),
                            at: now,
                        });
                    }
                    let Ok(session) = self.engine.session(*id) else {
                        continue;
                    };
                    let Ok(n) = self.store.allocate(IdKind::Image) else {
                        continue;
                    };
                    let image = ImageId(n);
                    images.push(image);
                    changes.push(Change::PutImage(catalog::image_at_cut(
                        image,
                        &cut,
                        &session.desc,
                    )));
                }
            }
            Err(e) => {
                for intent in intents {
                    changes.push(Change::Resolve {
                        intent,
                        outcome: IntentOutcome::Failed(e.to_string()),
                        at: now,
                    });
                }
            }
        }
        if self.commit(changes).is_ok() {
            self.inner.lock().images.insert(task.index, images);
        }
    }

    fn ended_before(&self, task: &Task) -> Option<TaskResult> {
        let (kept, resumed) = {
            let inner = self.inner.lock();
            (inner.kept.get(&task.index).cloned(), inner.resumed_task)
        };
        let valid = self.valid_images(task);
        let result = |status: RunStatus, reason: Option<plan::JobReason>, error: Option<String>| {
            let images = valid.clone().unwrap_or_default();
            TaskResult {
                task: task.clone(),
                status,
                reason,
                error,
                sessions: images.iter().map(|i| i.session).collect(),
                t0_unix_ms: images.first().map(|i| i.t0_unix_ms),
            }
        };
        if let Some(row) = kept {
            // Ended earlier in this attempt, before its process died.
            let (status, reason) = match row.status {
                TaskStatus::Ok => (RunStatus::Ok, None),
                TaskStatus::Warning => (RunStatus::Warning, None),
                TaskStatus::Skipped => (
                    RunStatus::Skipped,
                    Some(if row.reason == Some(JobReason::WindowClosed) {
                        plan::JobReason::WindowClosed
                    } else {
                        plan::JobReason::HookSkipped
                    }),
                ),
                TaskStatus::Canceled => (RunStatus::Canceled, Some(plan::JobReason::Halted)),
                _ => (RunStatus::Failed, Some(plan::JobReason::TaskFailed)),
            };
            return Some(result(status, reason, row.message));
        }
        if valid.is_some() {
            // Its image is valid from an earlier attempt, or from this one before its process
            // died: it is not cut again (JOB-07).
            return Some(result(RunStatus::Ok, None, None));
        }
        match resumed {
            // A task before the one the attempt continues, with no end recorded and no valid
            // image: it did not finish.
            Some(k) if task.index < k => Some(result(
                RunStatus::Failed,
                Some(plan::JobReason::Interrupted),
                Some("its process died before the task ended".to_string()),
            )),
            _ => None,
        }
    }

    fn task_ended(&self, result: &TaskResult) {
        // Every path out of the task undid its quiesce.
        self.resolve_held(result.task.index);
        // Its end, durable before the next task starts (the reason follows at the job's end).
        self.set_task(
            result.task.index,
            task_status(result.status),
            None,
            result.error.clone(),
        );
        let images = self
            .inner
            .lock()
            .images
            .remove(&result.task.index)
            .unwrap_or_default();
        let good = matches!(result.status, RunStatus::Ok | RunStatus::Warning)
            && !result.sessions.is_empty();
        if good {
            return;
        }
        // The task failed after its cut (its sessions were withdrawn, its targets removed).
        let why = result
            .error
            .clone()
            .unwrap_or_else(|| "its task did not end well".to_string());
        let mut changes = Vec::new();
        for image in &images {
            let Ok(Some(row)) = self.store.image(*image) else {
                continue;
            };
            let from = row.state.kind();
            if matches!(from, ImageStateKind::Incomplete | ImageStateKind::Valid) {
                changes.push(Change::SetImageState {
                    image: *image,
                    from,
                    to: ImageState::Lost {
                        why: format!("task {} failed after its cut: {why}", result.task.index),
                        engine: None,
                    },
                });
            }
        }
        let _ = self.commit(changes);
    }
}
