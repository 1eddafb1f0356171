//! Plans: the plan file, its expansion into tasks, the checks, and the task flow that drives
//! the engine (docs/orchestration.md, "Plans" and "Hooks", section 3.1).
//!
//! - [`Plan`] parses a plan file (TOML, every table `deny_unknown_fields`) and keeps its text
//!   and SHA-256 (PLAN-18); [`GlobalConfig`] is the part of `timezero.toml` this layer reads.
//! - [`expand`] turns the activities into [`Task`]s through a [`VolumeFinder`] (PLAN-05, 06,
//!   13).
//! - [`check`] runs the plan checks without side effects and reports the tasks (PLAN-01..04,
//!   07, 16, 17); [`recheck_task`] is the check before each task (PLAN-10).
//! - [`run_plan`] runs a job of a plan: checks, `plan_pre`, each task (`task_pre`, target,
//!   lock, quiesce, cut, thaw, `after_cut`, copy, `task_post`, `finally`), `plan_post`,
//!   `finally`, and reports what happened as a value ([`PlanRun`]: status, per-task results,
//!   event log, hook runs) that the job layer persists. It reaches the engine through the
//!   [`Sessions`] trait, implemented for `Arc<Engine>`.

mod check;
mod expand;
mod file;
mod run;

pub use check::{
    check, destination_problem, fs_space, recheck_task, CheckInput, CheckOutcome, CheckReport,
    Space, DEST_MARKER,
};
pub use expand::{
    check_pattern, expand, is_pattern, region_matcher, source_component, target_conflicts,
    ExpandError, FakeFinder, FsFinder, Naming, Skip, SourceInfo, Task, TaskSource, VolumeFinder,
};
pub use file::{
    effective_window, Activity, Checks, Destination, GlobalConfig, Hooks, MinFree, OnTaskError,
    Plan, PlanError, Region, Retention, SessionSettings, Size, TargetTemplate, Window,
    WindowSetting, Writes, TARGET_PLACEHOLDERS, TARGET_TEMPLATE_DEFAULT,
};
pub use run::{
    resume_plan_observed, run_plan, run_plan_observed, CopySettings, CutStep, Event, HookRecord,
    Left, NoObserver, PlanRun, PlanStatus, ResumeAt, RunContext, RunObserver, Sessions, Step,
    TaskResult,
};

use std::fmt;

/// Why a job or a task did not end well: a typed reason with a stable code (JOB-06: a job's
/// status is 0, 1, or the code of its reason, which is 2 or more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobReason {
    /// `backups_allowed = false` (PLAN-01).
    BackupsDisabled,
    /// Outside the plan's window (PLAN-02).
    OutsideWindow,
    /// The destination is not mounted, or holds another destination's marker (PLAN-03).
    DestinationNotMounted,
    /// Too little free space on the destination (PLAN-04, PLAN-10).
    DestinationSpace,
    /// The plan cannot run as written (PLAN-16, a source that is not a grain multiple, too
    /// many tasks).
    InvalidPlan,
    /// Two tasks map to one target (PLAN-13).
    TargetConflict,
    /// Every task is `Skipped` (PLAN-07).
    NothingToDo,
    /// A literal source could not be opened (PLAN-06).
    SourceUnavailable,
    /// A pattern matched nothing (PLAN-06).
    NoMatch,
    /// The window closed before the task started (PLAN-10).
    WindowClosed,
    /// A hook failed (its error says how: exit code, timeout, ...).
    HookFailed,
    /// A hook exited 75: skip.
    HookSkipped,
    /// A mount of the task was already frozen (PLAN-12).
    AlreadyQuiesced,
    /// Quiescing failed or timed out (QUI-04).
    QuiesceFailed,
    /// Unquiescing failed or timed out (QUI-05).
    UnquiesceFailed,
    /// The target is held elsewhere (QUI-02).
    TargetBusy,
    /// Creating or attaching the target failed.
    TargetCreate,
    /// The engine refused the cut or the copy failed.
    Engine,
    /// Canceled after an earlier task failed (`on_task_error = "halt"`, PLAN-11).
    Halted,
    /// A task failed (the job's reason when its tasks failed for several reasons).
    TaskFailed,
    /// The process running the task died before the task's cut was made or while its copy
    /// depended on a hold that died with it: the task was not finished in this attempt
    /// (JOB-09).
    Interrupted,
}

impl JobReason {
    /// The stable code (2 or more) a job's status carries for this reason.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            JobReason::BackupsDisabled => 2,
            JobReason::OutsideWindow => 3,
            JobReason::DestinationNotMounted => 4,
            JobReason::DestinationSpace => 5,
            JobReason::InvalidPlan => 6,
            JobReason::TargetConflict => 7,
            JobReason::NothingToDo => 8,
            JobReason::SourceUnavailable => 9,
            JobReason::NoMatch => 10,
            JobReason::WindowClosed => 11,
            JobReason::HookFailed => 12,
            JobReason::HookSkipped => 13,
            JobReason::AlreadyQuiesced => 14,
            JobReason::QuiesceFailed => 15,
            JobReason::UnquiesceFailed => 16,
            JobReason::TargetBusy => 17,
            JobReason::TargetCreate => 18,
            JobReason::Engine => 19,
            JobReason::Halted => 20,
            JobReason::TaskFailed => 21,
            JobReason::Interrupted => 22,
        }
    }

    /// The reason's name (`already_quiesced`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            JobReason::BackupsDisabled => "backups_disabled",
            JobReason::OutsideWindow => "outside_window",
            JobReason::DestinationNotMounted => "destination_not_mounted",
            JobReason::DestinationSpace => "destination_space",
            JobReason::InvalidPlan => "invalid_plan",
            JobReason::TargetConflict => "target_conflict",
            JobReason::NothingToDo => "nothing_to_do",
            JobReason::SourceUnavailable => "source_unavailable",
            JobReason::NoMatch => "no_match",
            JobReason::WindowClosed => "window_closed",
            JobReason::HookFailed => "hook_failed",
            JobReason::HookSkipped => "hook_skipped",
            JobReason::AlreadyQuiesced => "already_quiesced",
            JobReason::QuiesceFailed => "quiesce_failed",
            JobReason::UnquiesceFailed => "unquiesce_failed",
            JobReason::TargetBusy => "target_busy",
            JobReason::TargetCreate => "target_create",
            JobReason::Engine => "engine",
            JobReason::Halted => "halted",
            JobReason::TaskFailed => "task_failed",
            JobReason::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for JobReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
