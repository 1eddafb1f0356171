//! `timezero plan check`: parse, expand and check a plan for an instant, print the tasks
//! (PLAN-17). Nothing is run, quiesced, created or established.

use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::{SignedDuration, Timestamp, Zoned};

use super::state::StateDir;
use super::Fail;
use crate::command::output::json;
use crate::plan::{self, CheckInput, CheckOutcome, FsFinder};
use crate::quiesce::QuiesceMode;
use crate::store::{BackupDay, JobId};

/// `--at`: `now`, `+DURATION`, an RFC 3339 instant, or a zoned date-time.
pub(super) fn parse_at(text: &str, now: Timestamp) -> Result<Timestamp, Fail> {
    let t = text.trim();
    if t == "now" {
        return Ok(now);
    }
    if let Some(d) = t.strip_prefix('+') {
        let d: SignedDuration = d
            .parse()
            .map_err(|_| Fail::Usage(format!("--at '{text}': '+{d}' is no duration (+2h)")))?;
        return now
            .checked_add(d)
            .map_err(|_| Fail::Usage(format!("--at '{text}' is out of range")));
    }
    t.parse::<Timestamp>()
        .or_else(|_| t.parse::<Zoned>().map(|z| z.timestamp()))
        .map_err(|_| {
            Fail::Usage(format!(
                "--at '{text}' is not now, +DURATION, RFC 3339 or DATE-TIME[ZONE]"
            ))
        })
}

/// Run `plan check` and write its report to `out`; a failed check is exit 1.
pub(super) fn check(
    file: &Path,
    at: &str,
    state: Option<PathBuf>,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<String, Fail> {
    let state = StateDir::new(state);
    let (path, plan) = state.load_plan(file)?;
    let global = state.global()?;
    let at = parse_at(at, Timestamp::now())?;
    // Until the calendar names it, the backup day is the civil date of the instant in the
    // plan's zone, and the job is j0.
    let backup_day = BackupDay(at.to_zoned(plan.timezone.clone()).date());
    let report = plan::check(
        &plan,
        &CheckInput {
            global: &global,
            at,
            finder: &FsFinder,
            job: JobId(0),
            backup_day,
        },
    );
    let mut report = report;
    // QUI-08: a freeze must not stop the writes timezero itself needs.
    let table = state.table_of(&plan).ok();
    let refused = freeze_conflicts(&state, table.as_deref(), &report.tasks);
    if !refused.is_empty() {
        report.problems.extend(refused);
        if matches!(report.outcome, CheckOutcome::Pass | CheckOutcome::Skip(_)) {
            report.outcome = CheckOutcome::Fail(crate::plan::JobReason::InvalidPlan);
        }
    }
    let text = if as_json {
        json(&report)?
    } else {
        let mut s = format!(
            "plan {} ({}), at {}: {}\n",
            plan.name,
            path.display(),
            at.to_zoned(plan.timezone.clone()),
            match report.outcome {
                CheckOutcome::Pass => "pass".to_string(),
                CheckOutcome::Skip(r) => format!("skip ({r})"),
                CheckOutcome::Fail(r) => format!("FAIL ({r})"),
            }
        );
        for p in &report.problems {
            s += &format!("  problem: {p}\n");
        }
        for t in &report.tasks {
            match &t.skip {
                Some(skip) => {
                    s += &format!(
                        "  task {} [{}] {}: skipped, {skip}\n",
                        t.index, t.activity, t.pattern
                    );
                }
                None => {
                    let region = t
                        .region
                        .as_deref()
                        .map(|r| format!(" region {r}"))
                        .unwrap_or_default();
                    for src in &t.sources {
                        s += &format!(
                            "  task {} [{}] {}{region} -> {}\n",
                            t.index,
                            t.activity,
                            src.source.path,
                            src.target.display()
                        );
                    }
                }
            }
        }
        s
    };
    let _ = out.write_all(text.as_bytes());
    match report.outcome {
        CheckOutcome::Pass | CheckOutcome::Skip(_) => Ok(String::new()),
        CheckOutcome::Fail(r) => Err(Fail::Message(format!("plan check failed: {r}"))),
    }
}

/// QUI-08 before `plan run`: the tasks the plan expands into now, refused in one line (exit 1)
/// when one would freeze the file system of the store, the plan's table or a task's target.
pub(super) fn refuse_freezes(
    state: &StateDir,
    plan: &crate::plan::Plan,
    table: &Path,
    global: &crate::plan::GlobalConfig,
) -> Result<(), Fail> {
    let at = Timestamp::now();
    let report = plan::check(
        plan,
        &CheckInput {
            global,
            at,
            finder: &FsFinder,
            job: JobId(0),
            backup_day: BackupDay(at.to_zoned(plan.timezone.clone()).date()),
        },
    );
    let refused = freeze_conflicts(state, Some(table), &report.tasks);
    match refused.split_first() {
        None => Ok(()),
        Some((first, rest)) => Err(Fail::Message(format!(
            "plan {} refused (QUI-08): {first}{}",
            plan.name,
            if rest.is_empty() {
                String::new()
            } else {
                format!(" (and {} more)", rest.len())
            }
        ))),
    }
}

/// The device of `path`, or of its nearest existing ancestor (a target not created yet).
fn device_of(path: &Path) -> Option<u64> {
    let mut p = Some(path);
    while let Some(q) = p {
        if let Ok(st) = rustix::fs::stat(q) {
            return Some(st.st_dev);
        }
        p = q.parent();
    }
    None
}

/// QUI-08: the freeze mounts of `tasks` that hold the store, the plan's table or a task's
/// target, one problem each (freezing them would stop timezero's own writes while it needs
/// them).
fn freeze_conflicts(
    state: &StateDir,
    table: Option<&Path>,
    tasks: &[crate::plan::Task],
) -> Vec<String> {
    let mut held: Vec<(String, u64)> = Vec::new();
    let store = state.store_path();
    if let Some(d) = device_of(&store) {
        held.push((format!("the store {}", store.display()), d));
    }
    if let Some(t) = table {
        if let Some(d) = device_of(t) {
            held.push((format!("the table {}", t.display()), d));
        }
    }
    let mut out = Vec::new();
    for task in tasks {
        let QuiesceMode::Freeze { mounts } = &task.quiesce.mode else {
            continue;
        };
        let mut here = held.clone();
        for s in &task.sources {
            if let Some(d) = device_of(&s.target) {
                here.push((format!("the target {}", s.target.display()), d));
            }
        }
        for m in mounts {
            let Some(dev) = device_of(m) else {
                continue;
            };
            for (what, d) in &here {
                if *d == dev {
                    out.push(format!(
                        "task {}: freezing {} would freeze {what} (same file system)",
                        task.index,
                        m.display()
                    ));
                }
            }
        }
    }
    out
}
