//! The task flow of one job of a plan (HOOK-01): checks → `plan_pre` → for each task in
//! creation order: re-check (PLAN-10) → `task_pre` → target create and lock → quiesce → cut →
//! thaw (`writes = "engine"`) → `after_cut` → copy (→ thaw with `writes = "direct"`, PLAN-15)
//! → catalog → `task_post` → `finally`; then `plan_post` → `finally`.
//!
//! What happened is returned as a value ([`PlanRun`]): the status and reason (JOB-06), one
//! [`TaskResult`] per task, the event log of the steps taken (the HOOK-01 sequence) and every
//! hook run with its output. This module writes nothing but the target files: the job layer
//! persists the value, and with [`run_plan_observed`] each step as it happens (a
//! [`RunObserver`] hears every step, hook start and end, cut and task end).
//!
//! Decisions where the lists are silent:
//! - A job the checks end (skipped or failed) runs no hook at all: `finally` follows what
//!   started, and nothing has. Once `plan_pre` has been reached, the plan's `finally` always
//!   runs; `plan_post` runs only when `plan_pre` succeeded (post undoes pre).
//! - A task that does not start (skipped at expansion, by the re-check, or canceled by
//!   `on_task_error = "halt"`) runs no task hook. A task that started runs `task_post` and
//!   `finally`, whatever happened (HOOK-02).
//! - A task that fails after its cut withdraws the sessions it established and removes the
//!   target files it created: no half-made image is left behind. Every path out of a quiesce
//!   thaws what that task froze, and only that (QUI-03).
//! - A hook exiting 75 skips its task (`task_pre`, `after_cut`) or the job (`plan_pre`).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::check::{check, recheck_task, CheckInput, CheckOutcome, CheckReport};
use super::expand::{expand, Naming, Skip, Task, VolumeFinder};
use super::file::{GlobalConfig, OnTaskError, Plan, Writes};
use super::JobReason;
use crate::clock::Clock;
use crate::engine::copier::{Copier, CopierOptions};
use crate::engine::{Engine, SessionSpec, SessionStatus};
use crate::hook::{self, HookContext, HookRun, HookSpec, RunStatus, Stage, TaskReport, Verdict};
use crate::ids::{SessionId, VolumeId};
use crate::model::CopyMode;
use crate::quiesce::{LockError, QuiesceBackend, QuiesceError, Quiesced, Quiescer, TargetLock};
use crate::state::SessionState;
use crate::store::{BackupDay, JobId};

/// How a task's copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySettings {
    /// Bytes per second (`None` = unlimited).
    pub rate_bytes_per_s: Option<u64>,
    /// Copier threads.
    pub threads: usize,
}

/// What the task flow needs of the engine (section 1.1). Implemented for `Arc<Engine>`; a
/// table held by `timezero serve` gets an implementation over its control socket.
pub trait Sessions: Send + Sync {
    /// The attached volume with this locator, attaching the path when none is.
    ///
    /// # Errors
    /// The engine's error (a path that cannot be opened, ...).
    fn source(&self, locator: &str) -> crate::Result<VolumeId>;

    /// Attach the target file at `path` (created and sized by the caller).
    ///
    /// # Errors
    /// The engine's error.
    fn target(&self, path: &Path) -> crate::Result<VolumeId>;

    /// Establish one session (one cut).
    ///
    /// # Errors
    /// The engine's error.
    fn establish(&self, spec: &SessionSpec) -> crate::Result<SessionId>;

    /// Establish several sessions with one T0 in one commit: all or none (PLAN-14).
    ///
    /// # Errors
    /// The engine's error; then no session of the group exists.
    fn establish_group(&self, name: &str, specs: &[SessionSpec]) -> crate::Result<Vec<SessionId>>;

    /// End a session.
    ///
    /// # Errors
    /// The engine's error.
    fn withdraw(&self, id: SessionId) -> crate::Result<()>;

    /// Every session's status.
    fn status(&self) -> Vec<SessionStatus>;

    /// Copy `ids` until each is `Completed` (the proof the target is durable).
    ///
    /// # Errors
    /// The copier's error, or a session that ended otherwise.
    fn copy(&self, ids: &[SessionId], settings: &CopySettings) -> crate::Result<()>;
}

impl Sessions for Arc<Engine> {
    fn source(&self, locator: &str) -> crate::Result<VolumeId> {
        match self.volume_by_locator(locator) {
            Some(id) => Ok(id),
            None => self.attach_path(Path::new(locator)),
        }
    }

    fn target(&self, path: &Path) -> crate::Result<VolumeId> {
        self.attach_path(path)
    }

    fn establish(&self, spec: &SessionSpec) -> crate::Result<SessionId> {
        Engine::establish(self, spec)
    }

    fn establish_group(&self, name: &str, specs: &[SessionSpec]) -> crate::Result<Vec<SessionId>> {
        Engine::establish_group(self, name, specs)
    }

    fn withdraw(&self, id: SessionId) -> crate::Result<()> {
        Engine::withdraw(self, id)
    }

    fn status(&self) -> Vec<SessionStatus> {
        Engine::status(self)
    }

    fn copy(&self, ids: &[SessionId], settings: &CopySettings) -> crate::Result<()> {
        let copier = Copier::start(
            Arc::clone(self),
            CopierOptions {
                threads: settings.threads,
                rate_bytes_per_s: settings.rate_bytes_per_s,
                sessions: ids.to_vec(),
                exit_when_done: true,
                ..CopierOptions::default()
            },
        )?;
        copier.join()?;
        for id in ids {
            let s = self.session(*id)?;
            if s.state() != SessionState::Completed {
                return Err(crate::Error::invalid(
                    "copy",
                    format!("session {id} ended {:?}, not Completed", s.state()),
                ));
            }
        }
        Ok(())
    }
}

/// Everything a run needs besides the plan.
#[derive(Clone, Copy)]
pub struct RunContext<'a> {
    /// The global configuration.
    pub global: &'a GlobalConfig,
    /// The clock of every wait and check.
    pub clock: &'a Arc<dyn Clock>,
    /// The engine.
    pub sessions: &'a dyn Sessions,
    /// Where sources are found.
    pub finder: &'a dyn VolumeFinder,
    /// Freeze, thaw and flush.
    pub quiesce: &'a Arc<dyn QuiesceBackend>,
    /// The job.
    pub job: JobId,
    /// Its attempt, from 1.
    pub attempt: u32,
    /// Its backup day.
    pub backup_day: BackupDay,
}

impl std::fmt::Debug for RunContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("job", &self.job)
            .field("attempt", &self.attempt)
            .field("backup_day", &self.backup_day)
            .finish_non_exhaustive()
    }
}

/// A step of the flow, as the event log records it (HOOK-01).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The plan checks.
    Checks,
    /// The `plan_pre` hook.
    PlanPre,
    /// The `task_pre` hook.
    TaskPre,
    /// The quiesce.
    Quiesce,
    /// The cut (establish).
    Cut,
    /// The thaw.
    Thaw,
    /// The `after_cut` hook.
    AfterCut,
    /// The copy until `Completed`.
    Copy,
    /// The image is ready to be recorded (the result carries it).
    Catalog,
    /// The `task_post` hook.
    TaskPost,
    /// The `plan_post` hook.
    PlanPost,
    /// A `finally` hook.
    Finally,
}

impl Step {
    /// The step's name (`task_pre`, `cut`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Checks => "checks",
            Step::PlanPre => "plan_pre",
            Step::TaskPre => "task_pre",
            Step::Quiesce => "quiesce",
            Step::Cut => "cut",
            Step::Thaw => "thaw",
            Step::AfterCut => "after_cut",
            Step::Copy => "copy",
            Step::Catalog => "catalog",
            Step::TaskPost => "task_post",
            Step::PlanPost => "plan_post",
            Step::Finally => "finally",
        }
    }
}

/// One entry of the event log: a step, started for a task or for the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    /// The step.
    pub step: Step,
    /// The task (from 1), or `None` for the plan.
    pub task: Option<u32>,
}

/// One hook run, as the job record keeps it (HOOK-09).
#[derive(Debug, Clone)]
pub struct HookRecord {
    /// The stage.
    pub stage: Stage,
    /// The task, or `None` for plan hooks.
    pub task: Option<u32>,
    /// The run: outcome, exit code, output tails.
    pub run: HookRun,
    /// What it meant, `on_failure` applied.
    pub verdict: Verdict,
}

/// How one task ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskResult {
    /// The task.
    pub task: Task,
    /// Its status (`ok`, `warning`, `skipped`, `failed`, `canceled`).
    pub status: RunStatus,
    /// Why, when it did not end `ok`.
    pub reason: Option<JobReason>,
    /// The error message, when it has one.
    pub error: Option<String>,
    /// The sessions of its image (kept only when the task ended `ok` or `warning`).
    pub sessions: Vec<SessionId>,
    /// T0 of the image, when it was cut.
    pub t0_unix_ms: Option<u64>,
}

/// A job's status (JOB-06).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    /// Everything succeeded (status 0).
    Ok,
    /// A task was skipped or a hook warned (status 1).
    Partial,
    /// The job failed (status = its reason's code).
    Failed,
    /// Nothing ran (every task skipped, backups disabled, outside the window).
    Skipped,
}

/// What a job of a plan did.
#[derive(Debug, Clone)]
pub struct PlanRun {
    /// The status.
    pub status: PlanStatus,
    /// Why, when it is `Failed` or `Skipped`.
    pub reason: Option<JobReason>,
    /// The first error message.
    pub error: Option<String>,
    /// The plan text this run used (PLAN-18).
    pub plan_text: String,
    /// Its SHA-256 (PLAN-18).
    pub plan_sha256: [u8; 32],
    /// What the checks reported.
    pub check: CheckReport,
    /// One result per task, in creation order.
    pub tasks: Vec<TaskResult>,
    /// The steps taken, in order (HOOK-01).
    pub events: Vec<Event>,
    /// Every hook run, in order.
    pub hooks: Vec<HookRecord>,
}

impl PlanRun {
    /// The job's status code (JOB-06): 0 ok, 1 partial, else the reason's code (2 or more;
    /// a skipped job carries its skip reason's code too).
    #[must_use]
    pub fn code(&self) -> u8 {
        match self.status {
            PlanStatus::Ok => 0,
            PlanStatus::Partial => 1,
            PlanStatus::Failed | PlanStatus::Skipped => {
                self.reason.unwrap_or(JobReason::TaskFailed).code()
            }
        }
    }

    /// The event log as `(step, task)` pairs, for comparing with an expected sequence.
    #[must_use]
    pub fn steps(&self) -> Vec<(Step, Option<u32>)> {
        self.events.iter().map(|e| (e.step, e.task)).collect()
    }
}

/// What the job layer records while a run goes on: each step, each hook's start and end, each
/// cut, each task's end. [`run_plan`] calls none of it; [`run_plan_observed`] calls it as things
/// happen, so a store can hold every step before the next one starts. Every method does nothing
/// by default.
pub trait RunObserver {
    /// The run reached `event` (called before the step's work).
    fn step(&self, _event: Event) {}

    /// The checks passed and expanded these tasks (in creation order).
    fn tasks(&self, _tasks: &[Task]) {}

    /// A hook of `stage` (for `task`, or the plan) is about to start with `spec`. `Err(why)`
    /// means it must not start: its start was recorded before for this attempt and its end was
    /// not (HOOK-10); the run then treats the hook as failed with `why`.
    ///
    /// # Errors
    /// `why`, as above.
    fn hook_starting(
        &self,
        _stage: Stage,
        _task: Option<u32>,
        _spec: &HookSpec,
    ) -> Result<(), String> {
        Ok(())
    }

    /// The hook of `stage` ended with `run`.
    fn hook_ended(&self, _stage: Stage, _task: Option<u32>, _run: &HookRun) {}

    /// The cut of `task` is about to be made with these target paths.
    fn cutting(&self, _task: &Task) {}

    /// The cut of `task` was made (its sessions) or failed (the error).
    fn cut(&self, _task: &Task, _result: Result<&[SessionId], &str>) {}

    /// `task` ended: its result, sessions kept only when it ended `ok` or `warning` (the
    /// sessions of a task that failed after its cut were withdrawn).
    fn task_ended(&self, _result: &TaskResult) {}

    /// How `task` ended before this run reached it, when it did: its image is valid from an
    /// earlier attempt of the job (a retry does not cut it again, JOB-07), or the attempt this
    /// run continues ended it before its process died (JOB-09). Such a task is not run again
    /// and runs no hook. `None` by default.
    fn ended_before(&self, _task: &Task) -> Option<TaskResult> {
        None
    }
}

/// Where an attempt continues after the process that ran it died past its cut (JOB-09): the
/// task it was in and what of that task is left. The tasks before it ended in that process
/// ([`RunObserver::ended_before`]); the ones after it run as in [`run_plan_observed`], then
/// `plan_post` and the plan's `finally`. `plan_pre` is not run again: the attempt passed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAt {
    /// The task the attempt was in (from 1).
    pub task: u32,
    /// What of it is left.
    pub left: Left,
}

/// What is left of the task an attempt was in when its process died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Left {
    /// Its cut was not made (or was undone): the task fails with `reason` and `error`, then
    /// runs its `task_post` and `finally` hooks (HOOK-02).
    Uncut {
        /// Why ([`JobReason::Interrupted`], or [`JobReason::HookFailed`] for a hook whose end
        /// is unknown).
        reason: JobReason,
        /// What happened.
        error: String,
    },
    /// Its cut was made: its `sessions` (one per source, in source order) continue from
    /// `from`, then the task's catalog step, `task_post` and `finally`.
    Cut {
        /// The sessions of its image.
        sessions: Vec<SessionId>,
        /// Their T0.
        t0_unix_ms: Option<u64>,
        /// The first step left.
        from: CutStep,
    },
}

/// The first step left of a task whose cut was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutStep {
    /// The `after_cut` hook (found started in this attempt, it is not run again: the task
    /// fails, HOOK-10).
    AfterCut,
    /// The copy: a new copier on the sessions, which copies what is not copied yet.
    Copy,
    /// The catalog step (the copy is complete; recording the image is idempotent).
    Catalog,
}

/// The observer that records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl RunObserver for NoObserver {}

/// A failure of a task: its status, reason and message.
struct Fail {
    status: RunStatus,
    reason: JobReason,
    error: String,
}

impl Fail {
    fn failed(reason: JobReason, error: impl Into<String>) -> Fail {
        Fail {
            status: RunStatus::Failed,
            reason,
            error: error.into(),
        }
    }
}

/// What a task holds while it runs, released in reverse order.
#[derive(Default)]
struct Held {
    created: Vec<PathBuf>,
    locks: Vec<TargetLock>,
    sessions: Vec<SessionId>,
    t0: Option<u64>,
}

struct Runner<'p, 'c> {
    plan: &'p Plan,
    observer: &'c dyn RunObserver,
    ctx: RunContext<'c>,
    quiescer: Quiescer,
    events: Vec<Event>,
    hooks: Vec<HookRecord>,
    /// A plan hook warned: the job is at best partial.
    warned: bool,
}

impl Runner<'_, '_> {
    fn event(&mut self, step: Step, task: Option<u32>) {
        let e = Event { step, task };
        self.observer.step(e);
        self.events.push(e);
    }

    fn hook_context(&self, stage: Stage, task: Option<&Task>) -> HookContext {
        let mut c = HookContext::new(stage);
        c.job = Some(self.ctx.job);
        c.attempt = Some(self.ctx.attempt);
        c.plan = Some(self.plan.name.clone());
        c.backup_day = Some(self.ctx.backup_day);
        if let Some(t) = task {
            c.task = Some(t.index);
            c.source = Some(t.source_label());
            c.target = t.target_label();
        }
        c
    }

    /// Run the hook of `step` if the plan has one; `None` when it has none.
    fn hook(
        &mut self,
        step: Step,
        stage: Stage,
        spec: Option<&HookSpec>,
        ctx: HookContext,
    ) -> Option<(Verdict, String)> {
        let spec = spec?;
        self.event(step, ctx.task);
        if let Err(why) = self.observer.hook_starting(stage, ctx.task, spec) {
            // HOOK-10: never run again within the attempt; it counts as failed, whatever
            // on_failure says (nobody knows what it did).
            return Some((Verdict::Fail, format!("{stage}: {why}")));
        }
        let run = hook::run(spec, &ctx, self.ctx.clock.as_ref());
        self.observer.hook_ended(stage, ctx.task, &run);
        let verdict = run.outcome.verdict(spec.on_failure);
        let message = match &run.outcome {
            hook::HookOutcome::Failed(e) => format!("{stage}: {e}"),
            hook::HookOutcome::Skip => format!("{stage} asked to skip (exit 75)"),
            hook::HookOutcome::Success => String::new(),
        };
        self.hooks.push(HookRecord {
            stage,
            task: ctx.task,
            run,
            verdict,
        });
        Some((verdict, message))
    }

    fn task_report(results: &[TaskResult]) -> Vec<TaskReport> {
        results
            .iter()
            .map(|r| TaskReport {
                task: r.task.index,
                source: r.task.source_label(),
                region: r.task.region.clone(),
                status: r.status,
                error: r.error.clone(),
            })
            .collect()
    }

    /// A task that does not start.
    fn not_started(task: &Task, status: RunStatus, reason: JobReason, error: String) -> TaskResult {
        TaskResult {
            task: task.clone(),
            status,
            reason: Some(reason),
            error: Some(error),
            sessions: Vec::new(),
            t0_unix_ms: None,
        }
    }

    fn run_task(&mut self, task: &Task) -> TaskResult {
        let hooks = &self.plan.hooks;
        let mut warning: Option<String> = None;
        let mut outcome: Result<(), Fail> = Ok(());
        let mut held = Held::default();
        let pre_ctx = self.hook_context(Stage::TaskPre, Some(task));
        match self.hook(
            Step::TaskPre,
            Stage::TaskPre,
            hooks.task_pre.as_ref(),
            pre_ctx,
        ) {
            Some((Verdict::Fail, m)) => outcome = Err(Fail::failed(JobReason::HookFailed, m)),
            Some((Verdict::Skip, m)) => {
                outcome = Err(Fail {
                    status: RunStatus::Skipped,
                    reason: JobReason::HookSkipped,
                    error: m,
                });
            }
            Some((Verdict::Warn, m)) => warning = Some(m),
            Some((Verdict::Ok, _)) | None => {}
        }
        if outcome.is_ok() {
            outcome = self.body(task, &mut held, &mut warning);
            if outcome.is_err() {
                self.undo(&mut held);
            }
        }
        self.task_end(task, held, warning, outcome)
    }

    /// Continue `task` where the process that ran this attempt died (JOB-09).
    fn resume_task(&mut self, task: &Task, left: &Left) -> TaskResult {
        let mut warning: Option<String> = None;
        let mut held = Held::default();
        let outcome = match left {
            Left::Uncut { reason, error } => Err(Fail::failed(*reason, error.clone())),
            Left::Cut {
                sessions,
                t0_unix_ms,
                from,
            } => {
                held.sessions.clone_from(sessions);
                held.t0 = *t0_unix_ms;
                held.created = task.sources.iter().map(|s| s.target.clone()).collect();
                let outcome = if self.plan.session.writes == Writes::Direct
                    && *from != CutStep::Catalog
                {
                    // The freeze that kept the source still until the copy completed died
                    // with the process: the copy cannot be trusted to be T0-exact.
                    Err(Fail::failed(
                        JobReason::Interrupted,
                        "the process died while the source was frozen for the copy \
                         (writes = \"direct\"): the image is given up"
                            .to_string(),
                    ))
                } else {
                    self.resumed_locks(task, &mut held)
                        .and_then(|()| self.after_cut(task, &mut held, &mut warning, None, *from))
                };
                if outcome.is_err() {
                    self.undo(&mut held);
                }
                outcome
            }
        };
        self.task_end(task, held, warning, outcome)
    }

    /// Lock the targets of a resumed task again (held until the end of `task_post`, QUI-02).
    fn resumed_locks(&self, task: &Task, held: &mut Held) -> Result<(), Fail> {
        for s in &task.sources {
            let lock = TargetLock::acquire(&s.target).map_err(|e| match e {
                LockError::TargetBusy { .. } => Fail::failed(JobReason::TargetBusy, e.to_string()),
                _ => Fail::failed(JobReason::TargetCreate, e.to_string()),
            })?;
            held.locks.push(lock);
        }
        Ok(())
    }

    /// The end of a task: `task_post` and `finally` with the outcome so far, then its result.
    fn task_end(
        &mut self,
        task: &Task,
        mut held: Held,
        warning: Option<String>,
        outcome: Result<(), Fail>,
    ) -> TaskResult {
        let hooks = &self.plan.hooks;
        let (mut status, mut reason, mut error) = match outcome {
            Ok(()) if warning.is_some() => (RunStatus::Warning, None, warning.clone()),
            Ok(()) => (RunStatus::Ok, None, None),
            Err(f) => (f.status, Some(f.reason), Some(f.error)),
        };
        for (step, stage, spec) in [
            (Step::TaskPost, Stage::TaskPost, hooks.task_post.as_ref()),
            (Step::Finally, Stage::Finally, hooks.finally.as_ref()),
        ] {
            if stage == Stage::Finally {
                // The target stays locked until the end of task_post (QUI-02).
                held.locks.clear();
            }
            // Each hook sees the status and error as they are when it starts (HOOK-03).
            let mut c = self.hook_context(stage, Some(task));
            c.session = held.sessions.first().copied();
            c.status = status;
            c.error.clone_from(&error);
            match self.hook(step, stage, spec, c) {
                Some((Verdict::Fail, m))
                    if matches!(status, RunStatus::Ok | RunStatus::Warning) =>
                {
                    self.undo(&mut held);
                    status = RunStatus::Failed;
                    reason = Some(JobReason::HookFailed);
                    error = Some(m);
                }
                Some((Verdict::Warn, m)) if status == RunStatus::Ok => {
                    status = RunStatus::Warning;
                    error = Some(m);
                }
                _ => {}
            }
        }
        held.locks.clear();
        let result = TaskResult {
            task: task.clone(),
            status,
            reason,
            error,
            sessions: held.sessions.clone(),
            t0_unix_ms: held.t0,
        };
        self.observer.task_ended(&result);
        result
    }

    /// Withdraw the sessions and remove the target files of a task that failed.
    fn undo(&self, held: &mut Held) {
        for id in held.sessions.drain(..) {
            let _ = self.ctx.sessions.withdraw(id);
        }
        held.t0 = None;
        for path in held.created.drain(..).rev() {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Thaw `guard` and log the step.
    fn thaw(&mut self, guard: Quiesced, task: u32) -> Result<(), Fail> {
        self.event(Step::Thaw, Some(task));
        guard
            .unquiesce()
            .map_err(|e| Fail::failed(JobReason::UnquiesceFailed, e.to_string()))
    }

    fn create_target(path: &Path, size: u64) -> Result<(), String> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("create directory {}: {e}", parent.display()))?;
        }
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| format!("create target {}: {e}", path.display()))?;
        f.set_len(size)
            .map_err(|e| format!("size target {} to {size} bytes: {e}", path.display()))?;
        f.sync_all()
            .map_err(|e| format!("sync target {}: {e}", path.display()))?;
        Ok(())
    }

    fn body(
        &mut self,
        task: &Task,
        held: &mut Held,
        warning: &mut Option<String>,
    ) -> Result<(), Fail> {
        let plan = self.plan;
        let sessions = self.ctx.sessions;
        // Targets: created sized to the source (or to the region's last target byte), locked
        // until the end of task_post, attached.
        let mut specs = Vec::with_capacity(task.sources.len());
        for s in &task.sources {
            let end = task
                .extents
                .iter()
                .map(|e| e.target_offset.saturating_add(e.len))
                .max()
                .unwrap_or(0);
            Self::create_target(&s.target, s.source.size.max(end))
                .map_err(|e| Fail::failed(JobReason::TargetCreate, e))?;
            held.created.push(s.target.clone());
            let lock = TargetLock::acquire(&s.target).map_err(|e| match e {
                LockError::TargetBusy { .. } => Fail::failed(JobReason::TargetBusy, e.to_string()),
                _ => Fail::failed(JobReason::TargetCreate, e.to_string()),
            })?;
            held.locks.push(lock);
            let target = sessions
                .target(&s.target)
                .map_err(|e| Fail::failed(JobReason::TargetCreate, e.to_string()))?;
            let source = sessions
                .source(&s.source.locator)
                .map_err(|e| Fail::failed(JobReason::SourceUnavailable, e.to_string()))?;
            specs.push(SessionSpec {
                source,
                target,
                extents: task.extents.clone(),
                grain: plan.session.grain,
                mode: plan.session.mode,
                incremental: false,
            });
        }
        // Quiesce (PLAN-12: a mount frozen by someone else refuses the task, nothing thawed).
        self.event(Step::Quiesce, Some(task.index));
        let qctx = self.hook_context(Stage::Quiesce, Some(task));
        let guard = self
            .quiescer
            .quiesce(&task.quiesce, &qctx)
            .map_err(|e| match e {
                QuiesceError::AlreadyQuiesced { .. } => {
                    Fail::failed(JobReason::AlreadyQuiesced, e.to_string())
                }
                QuiesceError::QuiesceTimedOut { .. } => Fail {
                    status: RunStatus::Canceled,
                    reason: JobReason::QuiesceFailed,
                    error: e.to_string(),
                },
                _ => Fail::failed(JobReason::QuiesceFailed, e.to_string()),
            })?;
        // The cut: one session, or the group in one commit (PLAN-14).
        self.event(Step::Cut, Some(task.index));
        self.observer.cutting(task);
        let cut = if task.group {
            let name = group_name(&plan.name, self.ctx.job, task.index);
            sessions.establish_group(&name, &specs)
        } else {
            specs
                .first()
                .map_or_else(
                    || Err(crate::Error::invalid("task", "no source")),
                    |s| sessions.establish(s),
                )
                .map(|id| vec![id])
        };
        match &cut {
            Ok(ids) => self.observer.cut(task, Ok(ids)),
            Err(e) => self.observer.cut(task, Err(&e.to_string())),
        }
        let ids = match cut {
            Ok(ids) => ids,
            Err(e) => {
                let thawed = self.thaw(guard, task.index);
                let mut f = Fail::failed(JobReason::Engine, e.to_string());
                if let Err(t) = thawed {
                    f.error = format!("{}; {}", f.error, t.error);
                }
                return Err(f);
            }
        };
        held.sessions.clone_from(&ids);
        held.t0 = sessions
            .status()
            .iter()
            .find(|s| ids.first() == Some(&s.id))
            .map(|s| s.created_unix_ms);
        self.after_cut(task, held, warning, Some(guard), CutStep::AfterCut)
    }

    /// The steps after a task's cut, from `from`: thaw (`writes = "engine"`), `after_cut`, the
    /// copy (then the thaw with `writes = "direct"`), the catalog step. `guard` is the task's
    /// quiesce when this process holds it.
    fn after_cut(
        &mut self,
        task: &Task,
        held: &mut Held,
        warning: &mut Option<String>,
        guard: Option<Quiesced>,
        from: CutStep,
    ) -> Result<(), Fail> {
        let plan = self.plan;
        let sessions = self.ctx.sessions;
        let ids = held.sessions.clone();
        // writes = "engine": the quiesce ends right after the cut (PLAN-15).
        let mut guard = guard;
        if plan.session.writes == Writes::Engine {
            if let Some(g) = guard.take() {
                self.thaw(g, task.index)?;
            }
        }
        let after = if from == CutStep::AfterCut {
            let mut ctx = self.hook_context(Stage::AfterCut, Some(task));
            ctx.session = ids.first().copied();
            self.hook(
                Step::AfterCut,
                Stage::AfterCut,
                plan.hooks.after_cut.as_ref(),
                ctx,
            )
        } else {
            None
        };
        let after_fail = match after {
            Some((Verdict::Fail, m)) => Some(Fail::failed(JobReason::HookFailed, m)),
            Some((Verdict::Skip, m)) => Some(Fail {
                status: RunStatus::Skipped,
                reason: JobReason::HookSkipped,
                error: m,
            }),
            Some((Verdict::Warn, m)) => {
                warning.get_or_insert(m);
                None
            }
            Some((Verdict::Ok, _)) | None => None,
        };
        let copied = match after_fail {
            Some(f) => Err(f),
            None if plan.session.mode == CopyMode::Copy && from != CutStep::Catalog => {
                self.event(Step::Copy, Some(task.index));
                let settings = CopySettings {
                    rate_bytes_per_s: plan.session.copy_rate,
                    threads: plan.session.copy_threads,
                };
                sessions
                    .copy(&ids, &settings)
                    .map_err(|e| Fail::failed(JobReason::Engine, e.to_string()))
            }
            None => Ok(()),
        };
        // writes = "direct": the source stays frozen until Completed (PLAN-15).
        if let Some(g) = guard.take() {
            let thawed = self.thaw(g, task.index);
            copied?;
            thawed?;
        } else {
            copied?;
        }
        self.event(Step::Catalog, Some(task.index));
        Ok(())
    }
}

/// The engine group of a grouped task: `PLAN-JOB-tTASK`, within the engine's name limit.
fn group_name(plan: &str, job: JobId, task: u32) -> String {
    let tail = format!("-{job}-t{task}");
    let room = crate::limits::GROUP_NAME_BYTES_MAX.saturating_sub(tail.len());
    let head: String = plan.chars().take(room).collect();
    format!("{head}{tail}")
}

/// The job's status from its task results (JOB-06) and whether a plan hook warned.
fn job_status(results: &[TaskResult], warned: bool) -> (PlanStatus, Option<JobReason>) {
    let failed: Vec<JobReason> = results
        .iter()
        .filter(|r| matches!(r.status, RunStatus::Failed | RunStatus::Canceled))
        .filter_map(|r| r.reason)
        .filter(|r| *r != JobReason::Halted)
        .collect();
    if let Some(first) = failed.first() {
        let reason = if failed.iter().all(|r| r == first) {
            *first
        } else {
            JobReason::TaskFailed
        };
        return (PlanStatus::Failed, Some(reason));
    }
    if !results.is_empty() && results.iter().all(|r| r.status == RunStatus::Skipped) {
        let first = results.first().and_then(|r| r.reason);
        let reason = if results.iter().all(|r| r.reason == first) {
            first.unwrap_or(JobReason::NothingToDo)
        } else {
            JobReason::NothingToDo
        };
        return (PlanStatus::Skipped, Some(reason));
    }
    if warned
        || results
            .iter()
            .any(|r| matches!(r.status, RunStatus::Skipped | RunStatus::Warning))
    {
        return (PlanStatus::Partial, None);
    }
    (PlanStatus::Ok, None)
}

fn skip_reason(skip: &Skip) -> JobReason {
    match skip {
        Skip::Unavailable { .. } => JobReason::SourceUnavailable,
        Skip::NoMatch => JobReason::NoMatch,
    }
}

fn status_for_hooks(status: PlanStatus) -> RunStatus {
    match status {
        PlanStatus::Ok => RunStatus::Ok,
        PlanStatus::Partial => RunStatus::Warning,
        PlanStatus::Failed => RunStatus::Failed,
        PlanStatus::Skipped => RunStatus::Skipped,
    }
}

/// The runner of one plan run and its empty result.
fn begin<'p, 'c>(
    plan: &'p Plan,
    ctx: &RunContext<'c>,
    observer: &'c dyn RunObserver,
) -> (Runner<'p, 'c>, PlanRun) {
    let ctx = *ctx;
    let runner = Runner {
        plan,
        observer,
        ctx,
        quiescer: Quiescer::new(Arc::clone(ctx.quiesce), Arc::clone(ctx.clock)),
        events: Vec::new(),
        hooks: Vec::new(),
        warned: false,
    };
    let run = PlanRun {
        status: PlanStatus::Ok,
        reason: None,
        error: None,
        plan_text: plan.text.clone(),
        plan_sha256: plan.sha256,
        check: CheckReport {
            outcome: CheckOutcome::Pass,
            problems: Vec::new(),
            window: None,
            space: None,
            tasks: Vec::new(),
        },
        tasks: Vec::new(),
        events: Vec::new(),
        hooks: Vec::new(),
    };
    (runner, run)
}

/// Run one job of `plan` (section 1.1 and HOOK-01); see the module docs for the order and
/// the decisions taken where the behaviour lists are silent. Never panics on bad input: every
/// failure is a status with a reason in the returned [`PlanRun`].
#[must_use]
pub fn run_plan(plan: &Plan, ctx: &RunContext<'_>) -> PlanRun {
    run_plan_observed(plan, ctx, &NoObserver)
}

/// [`run_plan`], telling `observer` each step as it happens (the job layer persists them).
#[must_use]
pub fn run_plan_observed(plan: &Plan, ctx: &RunContext<'_>, observer: &dyn RunObserver) -> PlanRun {
    let (mut runner, mut run) = begin(plan, ctx, observer);
    // PLAN-01: nothing at all runs, not even the checks.
    if !ctx.global.backups_allowed {
        run.status = PlanStatus::Skipped;
        run.reason = Some(JobReason::BackupsDisabled);
        run.error = Some("backups_allowed = false in timezero.toml".to_string());
        return run;
    }
    runner.event(Step::Checks, None);
    let report = check(
        plan,
        &CheckInput {
            global: ctx.global,
            at: ctx.clock.now(),
            finder: ctx.finder,
            job: ctx.job,
            backup_day: ctx.backup_day,
        },
    );
    let tasks = report.tasks.clone();
    let skipped_at_expansion = |t: &Task| {
        t.skip.as_ref().map(|s| {
            Runner::not_started(
                t,
                RunStatus::Skipped,
                skip_reason(s),
                format!("{} {s}", t.pattern),
            )
        })
    };
    match report.outcome {
        CheckOutcome::Pass => {}
        CheckOutcome::Skip(reason) | CheckOutcome::Fail(reason) => {
            run.status = if matches!(report.outcome, CheckOutcome::Skip(_)) {
                PlanStatus::Skipped
            } else {
                PlanStatus::Failed
            };
            run.reason = Some(reason);
            run.error = report.problems.first().cloned();
            run.tasks = tasks.iter().filter_map(skipped_at_expansion).collect();
            run.check = report;
            run.events = runner.events;
            return run;
        }
    }
    run.check = report;
    observer.tasks(&tasks);

    // plan_pre (PLAN-08): at least one task is runnable here.
    let pre_ctx = runner.hook_context(Stage::PlanPre, None);
    let pre = runner.hook(
        Step::PlanPre,
        Stage::PlanPre,
        plan.hooks.plan_pre.as_ref(),
        pre_ctx,
    );
    let mut pre_ok = true;
    match pre {
        Some((Verdict::Fail, m)) => {
            pre_ok = false;
            run.status = PlanStatus::Failed;
            run.reason = Some(JobReason::HookFailed);
            run.error = Some(m);
        }
        Some((Verdict::Skip, m)) => {
            pre_ok = false;
            run.status = PlanStatus::Skipped;
            run.reason = Some(JobReason::HookSkipped);
            run.error = Some(m);
        }
        Some((Verdict::Warn, _)) => runner.warned = true,
        Some((Verdict::Ok, _)) | None => {}
    }

    run_tasks(&mut runner, &mut run, &tasks, pre_ok, None);
    run
}

/// Continue the attempt of `ctx.job` that the process running it left at `at` (JOB-09): the
/// tasks are expanded again (their targets are named after the job and its backup day, so they
/// are the ones the attempt had), no check and no `plan_pre` run again, the tasks before
/// `at.task` are as [`RunObserver::ended_before`] says, `at.task` continues as [`Left`] says,
/// and the rest runs as in [`run_plan_observed`].
#[must_use]
pub fn resume_plan_observed(
    plan: &Plan,
    ctx: &RunContext<'_>,
    observer: &dyn RunObserver,
    at: &ResumeAt,
) -> PlanRun {
    let (mut runner, mut run) = begin(plan, ctx, observer);
    let naming = Naming {
        job: ctx.job,
        day: ctx.backup_day,
    };
    let tasks = match expand(plan, ctx.finder, naming) {
        Ok(t) => t,
        Err(e) => {
            run.status = PlanStatus::Failed;
            run.reason = Some(JobReason::InvalidPlan);
            run.error = Some(format!("expanding the plan again to resume: {e}"));
            return run;
        }
    };
    if !tasks.iter().any(|t| t.index == at.task) {
        run.status = PlanStatus::Failed;
        run.reason = Some(JobReason::Interrupted);
        run.error = Some(format!(
            "the plan expands to no task {} now: the attempt cannot continue",
            at.task
        ));
        return run;
    }
    run.check.tasks.clone_from(&tasks);
    observer.tasks(&tasks);
    run_tasks(&mut runner, &mut run, &tasks, true, Some(at));
    run
}

/// The tasks, one after another in creation order (PLAN-09), then `plan_post` (when `plan_pre`
/// succeeded) and the plan's `finally`. `resume` is the task an attempt continues.
fn run_tasks(
    runner: &mut Runner<'_, '_>,
    run: &mut PlanRun,
    tasks: &[Task],
    pre_ok: bool,
    resume: Option<&ResumeAt>,
) {
    let plan = runner.plan;
    let ctx = runner.ctx;
    let observer = runner.observer;
    let skipped_at_expansion = |t: &Task| {
        t.skip.as_ref().map(|s| {
            Runner::not_started(
                t,
                RunStatus::Skipped,
                skip_reason(s),
                format!("{} {s}", t.pattern),
            )
        })
    };
    let mut stop: Option<(RunStatus, JobReason, String)> = None;
    for task in tasks {
        if let Some(r) = skipped_at_expansion(task) {
            run.tasks.push(r);
            continue;
        }
        if !pre_ok {
            let (status, why) = if run.status == PlanStatus::Skipped {
                (RunStatus::Skipped, JobReason::HookSkipped)
            } else {
                (RunStatus::Canceled, JobReason::Halted)
            };
            run.tasks.push(Runner::not_started(
                task,
                status,
                why,
                "plan_pre did not succeed".to_string(),
            ));
            continue;
        }
        if let Some((status, reason, why)) = &stop {
            run.tasks
                .push(Runner::not_started(task, *status, *reason, why.clone()));
            continue;
        }
        if let Some(at) = resume.filter(|at| at.task == task.index) {
            let result = runner.resume_task(task, &at.left);
            if matches!(result.status, RunStatus::Failed | RunStatus::Canceled)
                && plan.on_task_error == OnTaskError::Halt
            {
                stop = Some(halted(task.index));
            }
            run.tasks.push(result);
            continue;
        }
        if let Some(r) = observer.ended_before(task) {
            if matches!(r.status, RunStatus::Failed | RunStatus::Canceled)
                && plan.on_task_error == OnTaskError::Halt
            {
                stop = Some(halted(task.index));
            }
            run.tasks.push(r);
            continue;
        }
        // PLAN-10: the window and the space again.
        let result = match recheck_task(plan, ctx.global, ctx.clock.now(), task) {
            Some((JobReason::WindowClosed, why)) => {
                stop = Some((RunStatus::Skipped, JobReason::WindowClosed, why.clone()));
                Runner::not_started(task, RunStatus::Skipped, JobReason::WindowClosed, why)
            }
            Some((reason, why)) => Runner::not_started(task, RunStatus::Failed, reason, why),
            None => runner.run_task(task),
        };
        if matches!(result.status, RunStatus::Failed | RunStatus::Canceled)
            && plan.on_task_error == OnTaskError::Halt
        {
            stop = Some(halted(task.index));
        }
        run.tasks.push(result);
    }

    if pre_ok {
        let (status, reason) = job_status(&run.tasks, runner.warned);
        run.status = status;
        run.reason = reason;
        run.error = run.tasks.iter().find_map(|r| {
            matches!(r.status, RunStatus::Failed | RunStatus::Canceled)
                .then(|| r.error.clone())
                .flatten()
        });
        // plan_post with the task list (HOOK-04).
        let mut c = runner.hook_context(Stage::PlanPost, None);
        c.status = status_for_hooks(run.status);
        c.error.clone_from(&run.error);
        c.tasks = Runner::task_report(&run.tasks);
        let post = runner.hook(
            Step::PlanPost,
            Stage::PlanPost,
            plan.hooks.plan_post.as_ref(),
            c,
        );
        apply_plan_hook(run, &mut runner.warned, post);
    }
    let mut c = runner.hook_context(Stage::Finally, None);
    c.status = status_for_hooks(run.status);
    c.error.clone_from(&run.error);
    c.tasks = Runner::task_report(&run.tasks);
    let fin = runner.hook(
        Step::Finally,
        Stage::Finally,
        plan.hooks.finally.as_ref(),
        c,
    );
    apply_plan_hook(run, &mut runner.warned, fin);
    if runner.warned && run.status == PlanStatus::Ok {
        run.status = PlanStatus::Partial;
    }
    run.events = std::mem::take(&mut runner.events);
    run.hooks = std::mem::take(&mut runner.hooks);
}

/// Why the tasks after a failed `task` are canceled with `on_task_error = "halt"` (PLAN-11).
fn halted(task: u32) -> (RunStatus, JobReason, String) {
    (
        RunStatus::Canceled,
        JobReason::Halted,
        format!("canceled after task {task} failed (on_task_error = \"halt\")"),
    )
}

/// What a failing `plan_post` or plan `finally` does to the job (HOOK-08).
fn apply_plan_hook(run: &mut PlanRun, warned: &mut bool, verdict: Option<(Verdict, String)>) {
    match verdict {
        Some((Verdict::Fail, m)) if run.status != PlanStatus::Failed => {
            run.status = PlanStatus::Failed;
            run.reason = Some(JobReason::HookFailed);
            run.error = Some(m);
        }
        Some((Verdict::Warn, _)) => *warned = true,
        _ => {}
    }
}
