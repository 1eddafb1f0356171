//! The plan checks (PLAN-01..04, 07, 10, 13, 16, 17): pure reads of the configuration, the
//! clock's instant, the destination and the sources. [`check`] never runs a hook, quiesces,
//! creates a target or establishes; `plan check` prints its report, and the task flow runs it
//! first.

use std::path::Path;

use jiff::Timestamp;

use super::expand::{expand, target_conflicts, Naming, Task, VolumeFinder};
use super::file::{effective_window, GlobalConfig, Plan, Window, Writes};
use super::JobReason;
use crate::model::CopyMode;
use crate::quiesce::QuiesceMode;
use crate::store::{BackupDay, JobId};

/// The file in a destination's directory that holds its identity (PLAN-03).
pub const DEST_MARKER: &str = ".timezero-dest";

/// What the checks read besides the plan.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    /// The global configuration.
    pub global: &'a GlobalConfig,
    /// The instant the checks are for (now, or `plan check --at`).
    pub at: Timestamp,
    /// Where sources are found.
    pub finder: &'a dyn VolumeFinder,
    /// The job target names carry.
    pub job: JobId,
    /// The backup day target names carry.
    pub backup_day: BackupDay,
}

/// How the checks ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum CheckOutcome {
    /// Every check passed and at least one task is runnable.
    Pass,
    /// Nothing is to be done; the job ends `Skipped` with this reason.
    Skip(JobReason),
    /// A check failed; the job ends `Failed` with this reason.
    Fail(JobReason),
}

/// The destination's space, as the space check saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    /// The file system's size.
    pub total: u64,
    /// Bytes available to unprivileged writers.
    pub available: u64,
    /// What must stay free (`min_free`).
    pub min_free: u64,
    /// What the file targets need.
    pub needed: u64,
}

/// What `plan check` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// How the checks ended.
    pub outcome: CheckOutcome,
    /// Each failed check, in words (empty when all passed).
    pub problems: Vec<String>,
    /// The window that applies, if any.
    #[serde(serialize_with = "window_text")]
    pub window: Option<Window>,
    /// The destination's space, when it was checked.
    pub space: Option<Space>,
    /// The tasks, in creation order (empty when a check before the expansion failed).
    pub tasks: Vec<Task>,
}

fn window_text<S: serde::Serializer>(w: &Option<Window>, s: S) -> Result<S::Ok, S::Error> {
    match w {
        Some(w) => s.collect_str(w),
        None => s.serialize_none(),
    }
}

impl CheckReport {
    fn end(outcome: CheckOutcome, problem: Option<String>, window: Option<Window>) -> Self {
        CheckReport {
            outcome,
            problems: problem.into_iter().collect(),
            window,
            space: None,
            tasks: Vec::new(),
        }
    }
}

/// Whether `window` (in `plan`'s zone) admits `at`.
fn window_open(plan: &Plan, window: Option<Window>, at: Timestamp) -> bool {
    window.is_none_or(|w| w.contains(at.to_zoned(plan.timezone.clone()).time()))
}

/// Why `dest` is not the plan's destination, or `None` when it is: a mount point (its
/// `st_dev` differs from its parent's) when `require_mount`, holding [`DEST_MARKER`] whose
/// trimmed content is `id` (PLAN-03).
#[must_use]
pub fn destination_problem(dest: &Path, id: &str, require_mount: bool) -> Option<String> {
    let stat = match rustix::fs::stat(dest) {
        Ok(s) => s,
        Err(e) => return Some(format!("stat {}: {e}", dest.display())),
    };
    if require_mount {
        let parent = dest.join("..");
        match rustix::fs::stat(&parent) {
            Ok(p) if p.st_dev == stat.st_dev => {
                return Some(format!("{} is not a mount point", dest.display()));
            }
            Ok(_) => {}
            Err(e) => return Some(format!("stat {}: {e}", parent.display())),
        }
    }
    let marker = dest.join(DEST_MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(text) if text.trim() == id.trim() => None,
        Ok(text) => Some(format!(
            "{} holds id {:?}, the plan expects {id:?}",
            marker.display(),
            text.trim()
        )),
        Err(e) => Some(format!("read {}: {e}", marker.display())),
    }
}

/// The size and the available bytes of the file system holding `path` (`statvfs`).
///
/// # Errors
/// The operating system's error, with the path.
pub fn fs_space(path: &Path) -> Result<(u64, u64), String> {
    let st = rustix::fs::statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    Ok((total, available))
}

/// The space check for `needed` bytes of new targets (PLAN-04).
fn space_check(plan: &Plan, needed: u64) -> Result<Space, String> {
    let (total, available) = fs_space(&plan.destination.path)?;
    let min_free = plan.checks.min_free.map_or(0, |m| m.bytes(total));
    let space = Space {
        total,
        available,
        min_free,
        needed,
    };
    if needed.saturating_add(min_free) > available {
        return Err(format!(
            "{} has {available} bytes available; {needed} are needed for targets and {min_free} \
             must stay free",
            plan.destination.path.display()
        ));
    }
    Ok(space)
}

/// `writes = "direct"` needs `mode = "copy"` and every quiescing activity's `quiesce.mode =
/// "freeze"` (PLAN-16).
fn combination_problems(plan: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    if plan.session.writes != Writes::Direct {
        return problems;
    }
    if plan.session.mode != CopyMode::Copy {
        problems.push(
            "session.writes = \"direct\" needs session.mode = \"copy\" (a nocopy image would \
             miss the writes that bypass the engine)"
                .to_string(),
        );
    }
    for a in &plan.activities {
        if !matches!(a.quiesce.mode, QuiesceMode::Freeze { .. }) {
            problems.push(format!(
                "activity {:?}: session.writes = \"direct\" needs quiesce.mode = \"freeze\" \
                 (it is {:?})",
                a.name,
                a.quiesce.mode.name()
            ));
        }
    }
    problems
}

/// Run the plan checks for a job at `input.at` (PLAN-17): backups allowed (PLAN-01), the
/// window (PLAN-02), the setting combinations (PLAN-16), the destination (PLAN-03), the
/// expansion and target names (PLAN-05, 06, 13), whole sources a grain multiple, the space
/// (PLAN-04), and at least one runnable task (PLAN-07). It stops at the first check that ends
/// the job and reports the tasks when it got that far. Nothing is changed anywhere.
#[must_use]
pub fn check(plan: &Plan, input: &CheckInput<'_>) -> CheckReport {
    let window = effective_window(plan, input.global);
    if !input.global.backups_allowed {
        return CheckReport::end(
            CheckOutcome::Skip(JobReason::BackupsDisabled),
            Some("backups_allowed = false in timezero.toml".to_string()),
            window,
        );
    }
    if !window_open(plan, window, input.at) {
        let w = window.map(|w| w.to_string()).unwrap_or_default();
        return CheckReport::end(
            CheckOutcome::Skip(JobReason::OutsideWindow),
            Some(format!(
                "{} is outside the window {w} ({})",
                input.at.to_zoned(plan.timezone.clone()),
                plan.timezone.iana_name().unwrap_or("zone")
            )),
            window,
        );
    }
    let problems = combination_problems(plan);
    if !problems.is_empty() {
        return CheckReport {
            outcome: CheckOutcome::Fail(JobReason::InvalidPlan),
            problems,
            window,
            space: None,
            tasks: Vec::new(),
        };
    }
    if let Some(p) = destination_problem(
        &plan.destination.path,
        &plan.destination.id,
        plan.checks.require_mount,
    ) {
        return CheckReport::end(
            CheckOutcome::Fail(JobReason::DestinationNotMounted),
            Some(p),
            window,
        );
    }
    let naming = Naming {
        job: input.job,
        day: input.backup_day,
    };
    let tasks = match expand(plan, input.finder, naming) {
        Ok(t) => t,
        Err(e) => {
            return CheckReport::end(
                CheckOutcome::Fail(JobReason::InvalidPlan),
                Some(e.to_string()),
                window,
            )
        }
    };
    let mut report = CheckReport {
        outcome: CheckOutcome::Pass,
        problems: Vec::new(),
        window,
        space: None,
        tasks,
    };
    let conflicts = target_conflicts(&report.tasks);
    if !conflicts.is_empty() {
        report.outcome = CheckOutcome::Fail(JobReason::TargetConflict);
        report.problems = conflicts;
        return report;
    }
    let grain = plan.session.grain.bytes();
    for t in report.tasks.iter().filter(|t| t.extents.is_empty()) {
        for s in &t.sources {
            if s.source.size % grain != 0 || s.source.size == 0 {
                report.problems.push(format!(
                    "task {}: source {} has {} bytes, not a positive multiple of the grain \
                     ({grain} bytes); its tail would not be copied",
                    t.index, s.source.path, s.source.size
                ));
            }
        }
    }
    if !report.problems.is_empty() {
        report.outcome = CheckOutcome::Fail(JobReason::InvalidPlan);
        return report;
    }
    let needed = report
        .tasks
        .iter()
        .map(Task::target_bytes)
        .fold(0u64, u64::saturating_add);
    match space_check(plan, needed) {
        Ok(space) => report.space = Some(space),
        Err(p) => {
            report.outcome = CheckOutcome::Fail(JobReason::DestinationSpace);
            report.problems.push(p);
            return report;
        }
    }
    if report.tasks.iter().all(|t| t.skip.is_some()) {
        report.outcome = CheckOutcome::Skip(JobReason::NothingToDo);
        report
            .problems
            .push("every task is skipped (no source available)".to_string());
    }
    report
}

/// The check before each task (PLAN-10): a closed window → `WindowClosed` (this task and the
/// rest are skipped); too little space for this task's targets → `DestinationSpace`.
#[must_use]
pub fn recheck_task(
    plan: &Plan,
    global: &GlobalConfig,
    at: Timestamp,
    task: &Task,
) -> Option<(JobReason, String)> {
    let window = effective_window(plan, global);
    if !window_open(plan, window, at) {
        return Some((
            JobReason::WindowClosed,
            format!(
                "the window {} closed before task {}",
                window.map(|w| w.to_string()).unwrap_or_default(),
                task.index
            ),
        ));
    }
    space_check(plan, task.target_bytes())
        .err()
        .map(|p| (JobReason::DestinationSpace, p))
}
