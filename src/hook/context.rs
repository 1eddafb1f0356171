//! What a hook is told: `TIMEZERO_*` environment variables (HOOK-06, HOOK-03) and one JSON
//! document on its stdin (HOOK-03, HOOK-04). The plan layer fills a [`HookContext`]; the runner
//! turns it into both.

use std::fmt;

use crate::ids::SessionId;
use crate::store::{BackupDay, JobId};

/// The step of a job a hook runs for (HOOK-01), and the quiesce commands (QUI-01).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Before the plan's first task.
    PlanPre,
    /// Before a task's quiesce.
    TaskPre,
    /// A command-mode quiesce's `quiesce_cmd`.
    Quiesce,
    /// A command-mode quiesce's `status_cmd`.
    QuiesceStatus,
    /// A command-mode quiesce's `unquiesce_cmd`.
    Unquiesce,
    /// Right after the cut and the thaw.
    AfterCut,
    /// After a task, with its final status.
    TaskPost,
    /// After the plan's last task, with the per-task list.
    PlanPost,
    /// After each task and after the plan, always.
    Finally,
}

impl Stage {
    /// The name used in `TIMEZERO_STAGE` and the JSON document (`task_pre`, ...).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::PlanPre => "plan_pre",
            Stage::TaskPre => "task_pre",
            Stage::Quiesce => "quiesce",
            Stage::QuiesceStatus => "quiesce_status",
            Stage::Unquiesce => "unquiesce",
            Stage::AfterCut => "after_cut",
            Stage::TaskPost => "task_post",
            Stage::PlanPost => "plan_post",
            Stage::Finally => "finally",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status a hook is told in `TIMEZERO_STATUS` (HOOK-03): the task's or plan's status so
/// far. Hooks before the end of a task see `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Still running (pre hooks, `after_cut`, quiesce commands).
    #[default]
    Running,
    /// Ended well.
    Ok,
    /// Ended well with a warning (a hook with `on_failure = "warn"` failed).
    Warning,
    /// Skipped (nothing to do, a window closed, a hook exited 75).
    Skipped,
    /// Failed.
    Failed,
    /// Canceled.
    Canceled,
}

impl RunStatus {
    /// The name used in `TIMEZERO_STATUS` and the JSON document.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Ok => "ok",
            RunStatus::Warning => "warning",
            RunStatus::Skipped => "skipped",
            RunStatus::Failed => "failed",
            RunStatus::Canceled => "canceled",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One task in the list a `plan_post` hook receives on stdin (HOOK-04).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskReport {
    /// The task's number in the job (creation order, from 1).
    pub task: u32,
    /// The source (its path or pattern).
    pub source: String,
    /// The region, when the task covers one.
    pub region: Option<String>,
    /// How the task ended.
    pub status: RunStatus,
    /// Its error message, when it has one.
    pub error: Option<String>,
}

/// Everything a hook is told about the run it belongs to. Fields that do not apply to a stage
/// stay `None`; their variables are then absent from the hook's environment (not empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookContext {
    /// The stage (`TIMEZERO_STAGE`).
    pub stage: Option<Stage>,
    /// The job (`TIMEZERO_JOB`, e.g. `j42`).
    pub job: Option<JobId>,
    /// The attempt of the job, from 1 (`TIMEZERO_ATTEMPT`).
    pub attempt: Option<u32>,
    /// The plan's name (`TIMEZERO_PLAN`).
    pub plan: Option<String>,
    /// The task's number in the job (`TIMEZERO_TASK`).
    pub task: Option<u32>,
    /// The task's source (`TIMEZERO_SOURCE`).
    pub source: Option<String>,
    /// The task's target (`TIMEZERO_TARGET`).
    pub target: Option<String>,
    /// The session made at the cut (`TIMEZERO_SESSION`, e.g. `s7`).
    pub session: Option<SessionId>,
    /// The backup day (`TIMEZERO_BACKUP_DAY`, `YYYYMMDD`).
    pub backup_day: Option<BackupDay>,
    /// The status so far (`TIMEZERO_STATUS`, always set).
    pub status: RunStatus,
    /// The error message so far (`TIMEZERO_ERROR`; `NONE` when there is none).
    pub error: Option<String>,
    /// The tasks of the job with their status, for `plan_post` (stdin only).
    pub tasks: Vec<TaskReport>,
}

/// The value of `TIMEZERO_ERROR` when there is no error (HOOK-03).
pub const NO_ERROR: &str = "NONE";

/// The names of every variable the runner sets or clears, in a fixed order.
pub const ENV_NAMES: [&str; 11] = [
    "TIMEZERO_STAGE",
    "TIMEZERO_JOB",
    "TIMEZERO_ATTEMPT",
    "TIMEZERO_PLAN",
    "TIMEZERO_TASK",
    "TIMEZERO_SOURCE",
    "TIMEZERO_TARGET",
    "TIMEZERO_SESSION",
    "TIMEZERO_BACKUP_DAY",
    "TIMEZERO_STATUS",
    "TIMEZERO_ERROR",
];

/// The JSON document on a hook's stdin: the same values as the variables, plus the task list.
#[derive(Debug, serde::Serialize)]
struct Document<'a> {
    stage: Option<&'static str>,
    job: Option<String>,
    attempt: Option<u32>,
    plan: Option<&'a str>,
    task: Option<u32>,
    source: Option<&'a str>,
    target: Option<&'a str>,
    session: Option<String>,
    backup_day: Option<String>,
    status: RunStatus,
    error: &'a str,
    tasks: &'a [TaskReport],
}

impl HookContext {
    /// A context for `stage` with nothing else set.
    #[must_use]
    pub fn new(stage: Stage) -> HookContext {
        HookContext {
            stage: Some(stage),
            ..HookContext::default()
        }
    }

    /// The same context for another stage (quiesce commands reuse a task's context).
    #[must_use]
    pub fn for_stage(&self, stage: Stage) -> HookContext {
        HookContext {
            stage: Some(stage),
            ..self.clone()
        }
    }

    /// The variables, in the order of [`ENV_NAMES`]: `Some(value)` to set, `None` to remove
    /// (so a variable inherited from the daemon's own environment never leaks into a hook).
    #[must_use]
    pub fn env(&self) -> Vec<(&'static str, Option<String>)> {
        let values = [
            self.stage.map(|s| s.as_str().to_string()),
            self.job.map(|j| j.to_string()),
            self.attempt.map(|a| a.to_string()),
            self.plan.clone(),
            self.task.map(|t| t.to_string()),
            self.source.clone(),
            self.target.clone(),
            self.session.map(|s| s.to_string()),
            self.backup_day.map(|d| d.to_string()),
            Some(self.status.as_str().to_string()),
            Some(self.error.clone().unwrap_or_else(|| NO_ERROR.to_string())),
        ];
        ENV_NAMES.into_iter().zip(values).collect()
    }

    /// The JSON document written to the hook's stdin: `stage`, `job`, `attempt`, `plan`,
    /// `task`, `source`, `target`, `session`, `backup_day`, `status`, `error` (`"NONE"` when
    /// none) and `tasks` (a list of `{task, source, region, status, error}`), in the same
    /// spelling as the variables (`"j42"`, `"s7"`, `"20261201"`).
    #[must_use]
    pub fn document(&self) -> Vec<u8> {
        let doc = Document {
            stage: self.stage.map(Stage::as_str),
            job: self.job.map(|j| j.to_string()),
            attempt: self.attempt,
            plan: self.plan.as_deref(),
            task: self.task,
            source: self.source.as_deref(),
            target: self.target.as_deref(),
            session: self.session.map(|s| s.to_string()),
            backup_day: self.backup_day.map(|d| d.to_string()),
            status: self.status,
            error: self.error.as_deref().unwrap_or(NO_ERROR),
            tasks: &self.tasks,
        };
        let mut out = serde_json::to_vec(&doc).unwrap_or_default();
        out.push(b'\n');
        out
    }
}
