//! `timezero plan run`, `plan list`, `jobs` and `jobs show` (docs/orchestration.md, section
//! 3.4).
//!
//! `plan run` with no daemon holding the state runs the job in this process: it posts the
//! immediate event through the job layer's scheduler (the same calendar pass a daemon runs), runs
//! one broker pass, and runs the granted job on a worker thread through [`PlanWork`], every step
//! recorded in the store as it happens. It prints the job id as soon as the job exists and waits
//! for the job's end in every case (there is nobody else to run it); `--wait` only changes the
//! exit status: 0 exactly when the job's status is 0. A job the broker does not grant at once
//! (another job of the plan is active) is canceled, since no daemon would start it later.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;
use parking_lot::Mutex;
use serde::Serialize;

use super::runner::PlanWork;
use super::state::StateDir;
use super::Fail;
use crate::calendar;
use crate::clock::{Clock, SystemClock};
use crate::command::output::json;
use crate::job::{owner_of_this_process, Limits, NewdaySettings, Scheduler};
use crate::limits::JOBS_LIST_RECENT_SECS;
use crate::store::{
    Change, EventId, EventKind, EventRow, HookRunRecord, IdKind, ImageQuery, ImageRecord, JobId,
    JobQuery, JobRecord, JobState, JobStateKind, Priority, ScheduleRow, Store, TaskRecord,
};

/// The `[limits]` and `[newday]` tables of `timezero.toml` (defaults when absent).
pub(super) fn job_settings(state: &StateDir) -> Result<(Limits, NewdaySettings), Fail> {
    let path = state.config_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Limits::default(), NewdaySettings::default()))
        }
        Err(e) => return Err(Fail::Message(format!("read {}: {e}", path.display()))),
    };
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| Fail::Usage(format!("{}: {}", path.display(), e.message())))?;
    let limits = match table.remove("limits") {
        Some(v) => v
            .try_into::<Limits>()
            .map_err(|e| Fail::Usage(format!("{}: [limits]: {}", path.display(), e.message())))?,
        None => Limits::default(),
    };
    let newday = match table.remove("newday") {
        Some(v) => v
            .try_into::<NewdaySettings>()
            .map_err(|e| Fail::Usage(format!("{}: [newday]: {}", path.display(), e.message())))?,
        None => NewdaySettings::default(),
    };
    Ok((limits, newday))
}

/// Make sure the calendar has its NEWDAY event: a store that has none gets the default one
/// (daily at 08:00 in the system's zone, CAL-11), as a daemon's first start would create it.
/// Another process creating it at the same time wins; its event is then the one.
pub(super) fn ensure_newday(store: &dyn Store, now: Timestamp) -> Result<(), Fail> {
    let err = |e: crate::store::StoreError| Fail::Message(e.to_string());
    if store
        .events()
        .map_err(err)?
        .iter()
        .any(|e| e.kind == EventKind::Newday)
    {
        return Ok(());
    }
    let zone = jiff::tz::TimeZone::system();
    let zone_name = zone.iana_name().unwrap_or("UTC").to_string();
    let zone = jiff::tz::TimeZone::get(&zone_name).unwrap_or(jiff::tz::TimeZone::UTC);
    let schedule = calendar::default_newday_schedule(zone);
    let id = EventId(store.allocate(IdKind::Event).map_err(err)?);
    let mut changes = Vec::new();
    if !store
        .schedules()
        .map_err(err)?
        .iter()
        .any(|s| s.name == calendar::NEWDAY_SCHEDULE)
    {
        changes.push(Change::PutSchedule {
            schedule: ScheduleRow {
                name: calendar::NEWDAY_SCHEDULE.to_string(),
                expr: "0 8 * * *".to_string(),
                zone: zone_name,
                enabled: true,
            },
            replace: false,
        });
    }
    changes.push(Change::PutEvent {
        event: EventRow {
            id,
            name: "NEWDAY".to_string(),
            schedule: calendar::NEWDAY_SCHEDULE.to_string(),
            kind: EventKind::Newday,
            priority: Priority::ALWAYS,
            blocking: false,
            enabled: true,
            next_due: schedule.next_after(now),
        },
        replace: false,
    });
    match store.commit(changes) {
        Ok(()) | Err(crate::store::StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// What `plan run --json` prints.
#[derive(Debug, Serialize)]
struct RunOut {
    job: String,
    plan: String,
    state: JobState,
    status: Option<u32>,
}

/// `timezero plan run PLAN [--priority N] [--wait]`.
pub(super) fn plan_run(
    plan: &Path,
    priority: Option<i64>,
    wait: bool,
    state: Option<PathBuf>,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<String, Fail> {
    let state = StateDir::new(state);
    let priority = priority
        .map(Priority::new)
        .transpose()
        .map_err(|e| Fail::Usage(e.to_string()))?;
    let (path, plan) = state.load_plan(plan)?;
    let global = state.global()?;
    let table = state.table_of(&plan)?;
    super::plan::refuse_freezes(&state, &plan, &table, &global)?;
    let (limits, newday) = job_settings(&state)?;
    let _lock = match state.hold_runner_lock()? {
        Ok(f) => f,
        // A daemon holds the state: it runs the job.
        Err(_) => {
            let raw = priority.map(|p| i64::from(p.get()));
            return super::daemon::hand_over(&state, (&plan.name, &path), raw, wait, as_json, out);
        }
    };
    let store = state.open_store()?;
    let store: Arc<dyn Store> = store;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let name = plan.name.clone();
    let work = Arc::new(PlanWork {
        store: Arc::clone(&store),
        clock: Arc::clone(&clock),
        global,
        plans: HashMap::from([(name.clone(), (path, plan))]),
        tables: HashMap::from([(name.clone(), table)]),
        engines: Mutex::new(HashMap::new()),
        state_dir: Some(state.dir.clone()),
    });
    let scheduler = Scheduler::new(
        Arc::clone(&store),
        Arc::clone(&clock),
        work,
        limits,
        newday,
        owner_of_this_process(),
    );
    ensure_newday(&*store, clock.now())?;
    let posted = scheduler
        .post_immediate(&name, priority)
        .map_err(|e| Fail::Message(e.to_string()))?;
    let Some(job) = posted.job() else {
        return Err(Fail::Message(format!(
            "the run of plan {name} did not start a job: {:?}",
            posted.outcome
        )));
    };
    if !as_json {
        let _ = writeln!(out, "{job}");
        let _ = out.flush();
    }
    let started = scheduler
        .broker_pass()
        .map_err(|e| Fail::Message(e.to_string()))?;
    if !started.contains(&job) {
        let waits = store
            .job(job)
            .ok()
            .flatten()
            .map(|j| format!("{:?}", j.state))
            .unwrap_or_default();
        let _ = scheduler.cancel(job);
        return Err(Fail::Message(format!(
            "job {job} was not granted its resources ({waits}) and no daemon runs to start it \
             later: canceled"
        )));
    }
    scheduler
        .settle()
        .map_err(|e| Fail::Message(e.to_string()))?;
    let record = store
        .job(job)
        .map_err(|e| Fail::Message(e.to_string()))?
        .ok_or_else(|| Fail::Message(format!("job {job} vanished from the store")))?;
    let status = record.state.status_code();
    if as_json {
        let _ = out.write_all(
            json(&RunOut {
                job: job.to_string(),
                plan: name,
                state: record.state.clone(),
                status,
            })?
            .as_bytes(),
        );
    }
    if wait && status != Some(0) {
        return Err(Fail::Message(format!(
            "job {job} ended {}",
            state_text(&record.state)
        )));
    }
    Ok(String::new())
}

/// A job's state in words: `done, status 0`, `failed, status 16 (hook_unknown)`.
pub(super) fn state_text(s: &JobState) -> String {
    match s {
        JobState::Queued { waiting_on } => format!("queued, waiting on {waiting_on:?}"),
        JobState::Active { phase } => format!("active, {phase:?}"),
        JobState::WaitingForRetry { at } => format!("waiting for a retry at {at}"),
        JobState::Done { status, reason } => {
            let code = s.status_code().unwrap_or(1);
            match reason {
                Some(r) => format!("{status:?}, status {code} ({r:?})").to_lowercase(),
                None => format!("{status:?}, status {code}").to_lowercase(),
            }
        }
        JobState::Canceled { reason } => {
            format!("canceled, status {} ({reason:?})", reason.code()).to_lowercase()
        }
    }
}

/// One line of `plan list`.
#[derive(Debug, Serialize)]
struct PlanLine {
    name: String,
    path: String,
    error: Option<String>,
    last_job: Option<String>,
    last_state: Option<JobState>,
    last_status: Option<u32>,
    next: Option<String>,
}

/// `timezero plan list`.
pub(super) fn plan_list(state: Option<PathBuf>, as_json: bool) -> Result<String, Fail> {
    let state = StateDir::new(state);
    let store = state.read_store()?;
    let err = |e: crate::store::StoreError| Fail::Message(e.to_string());
    let events = store.events().map_err(err)?;
    let mut lines = Vec::new();
    for (path, plan) in state.plans()? {
        let (name, error) = match plan {
            Ok(p) => (p.name, None),
            Err(e) => (
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                Some(e),
            ),
        };
        let last = store
            .jobs(&JobQuery {
                plan: Some(name.clone()),
                ..JobQuery::default()
            })
            .map_err(err)?
            .into_iter()
            .max_by_key(|j| j.id);
        let next = events
            .iter()
            .filter(|e| e.enabled && matches!(&e.kind, EventKind::Plan { plan } if *plan == name))
            .filter_map(|e| e.next_due)
            .min();
        lines.push(PlanLine {
            name,
            path: path.display().to_string(),
            error,
            last_job: last.as_ref().map(|j| j.id.to_string()),
            last_status: last.as_ref().and_then(|j| j.state.status_code()),
            last_state: last.map(|j| j.state),
            next: next.map(|t| t.to_string()),
        });
    }
    if as_json {
        return Ok(json(&lines)?);
    }
    let mut s = String::new();
    if lines.is_empty() {
        s += &format!("no plans in {}\n", state.plans_dir().display());
    }
    for l in &lines {
        s += &l.name;
        if let Some(e) = &l.error {
            s += &format!("  INVALID: {e}\n");
            continue;
        }
        match (&l.last_job, &l.last_state) {
            (Some(j), Some(st)) => s += &format!("  last {j}: {}", state_text(st)),
            _ => s += "  never run",
        }
        match &l.next {
            Some(t) => s += &format!("  next {t}\n"),
            None => s += "  not scheduled\n",
        }
    }
    Ok(s)
}

/// One line of `jobs`.
fn job_line(j: &JobRecord) -> String {
    let what = match &j.kind {
        crate::store::JobKind::Backup { plan } => format!("backup {plan}"),
        crate::store::JobKind::Restore { image, dest } => format!("restore {image} to {dest}"),
        crate::store::JobKind::Command { name } => format!("command {name}"),
        crate::store::JobKind::Maintenance { dest } => format!("maintenance {dest}"),
    };
    format!(
        "{}  {what}  day {}  priority {}  attempt {}  {}\n",
        j.id,
        j.backup_day,
        j.priority.get(),
        j.attempt,
        state_text(&j.state)
    )
}

/// `timezero jobs [--all]`: the open jobs and those ended in the last
/// `JOBS_LIST_RECENT_SECS`; with `--all` every job.
pub(super) fn jobs_list(state: Option<PathBuf>, all: bool, as_json: bool) -> Result<String, Fail> {
    let state = StateDir::new(state);
    let store = state.read_store()?;
    let now = Timestamp::now();
    let recent = now
        .checked_sub(jiff::SignedDuration::from_secs(JOBS_LIST_RECENT_SECS))
        .unwrap_or(Timestamp::MIN);
    let mut jobs: Vec<JobRecord> = store
        .jobs(&JobQuery::default())
        .map_err(|e| Fail::Message(e.to_string()))?
        .into_iter()
        .filter(|j| {
            all || matches!(
                j.state.kind(),
                JobStateKind::Queued | JobStateKind::Active | JobStateKind::WaitingForRetry
            ) || j.ended.is_some_and(|t| t >= recent)
        })
        .collect();
    jobs.sort_by_key(|j| j.id);
    if as_json {
        return Ok(json(&jobs)?);
    }
    if jobs.is_empty() {
        return Ok(if all {
            "no jobs\n".to_string()
        } else {
            "no open or recent jobs (--all lists every job)\n".to_string()
        });
    }
    Ok(jobs.iter().map(job_line).collect())
}

/// A hook run as `jobs show` prints it.
#[derive(Debug, Serialize)]
struct HookOut {
    #[serde(flatten)]
    run: HookRunRecord,
    stdout: String,
    stderr: String,
}

/// What `jobs show --json` prints.
#[derive(Debug, Serialize)]
struct ShowOut {
    job: JobRecord,
    status: Option<u32>,
    tasks: Vec<TaskRecord>,
    hooks: Vec<HookOut>,
    images: Vec<ImageRecord>,
}

/// The last `n` lines of `bytes`, as text.
fn tail_lines(bytes: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
}

/// `timezero jobs show J`.
pub(super) fn jobs_show(state: Option<PathBuf>, job: JobId, as_json: bool) -> Result<String, Fail> {
    let state = StateDir::new(state);
    let store = state.read_store()?;
    let err = |e: crate::store::StoreError| Fail::Message(e.to_string());
    let record = store
        .job(job)
        .map_err(err)?
        .ok_or_else(|| Fail::Message(format!("job {job} does not exist")))?;
    let tasks = store.tasks(job).map_err(err)?;
    let hooks: Vec<HookOut> = store
        .hook_runs(job)
        .map_err(err)?
        .into_iter()
        .map(|run| HookOut {
            stdout: String::from_utf8_lossy(&run.stdout_tail).into_owned(),
            stderr: String::from_utf8_lossy(&run.stderr_tail).into_owned(),
            run,
        })
        .collect();
    let images: Vec<ImageRecord> = store
        .images(&ImageQuery::default())
        .map_err(err)?
        .into_iter()
        .filter(|i| i.job == job)
        .collect();
    let show = ShowOut {
        status: record.state.status_code(),
        job: record,
        tasks,
        hooks,
        images,
    };
    if as_json {
        return Ok(json(&show)?);
    }
    let j = &show.job;
    let mut s = job_line(j);
    s += &format!("  created {}", j.created);
    if let Some(t) = j.started {
        s += &format!(", started {t}");
    }
    if let Some(t) = j.ended {
        s += &format!(", ended {t}");
    }
    s += "\n";
    if let Some(h) = &j.plan_sha256 {
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        s += &format!("  plan sha256 {hex}\n");
    }
    if let Some(p) = &j.progress {
        s += &format!("  progress {} of {} bytes\n", p.bytes_done, p.bytes_total);
        if p.ring_buffers > 0 {
            s += &format!(
                "  ring {} buffers of {} bytes: {} bytes moved; reader waited for a free buffer {} times, writer for a full one {} times\n",
                p.ring_buffers, p.ring_buffer_bytes, p.ring_bytes, p.waits_for_empty, p.waits_for_full
            );
        }
    }
    for t in &show.tasks {
        s += &format!(
            "  task {} [{}] {} -> {}: {:?}",
            t.index,
            t.activity,
            t.sources.join(", "),
            t.targets.join(", "),
            t.status
        );
        if let Some(r) = &t.reason {
            s += &format!(" reason {r:?}");
        }
        if let Some(m) = &t.message {
            s += &format!(" ({m})");
        }
        s += "\n";
    }
    for h in &show.hooks {
        let k = &h.run.key;
        let task = k.task.map(|t| format!(" task {t}")).unwrap_or_default();
        let result = match &h.run.result {
            Some(r) => format!("{r:?}"),
            None => "running or unknown (no end recorded)".to_string(),
        };
        s += &format!(
            "  hook {}{task} [{}]: {result}\n",
            k.stage.as_str(),
            h.run.argv.join(" ")
        );
        for (name, bytes) in [
            ("stdout", &h.run.stdout_tail),
            ("stderr", &h.run.stderr_tail),
        ] {
            for line in tail_lines(bytes, 5) {
                s += &format!("    {name}: {line}\n");
            }
        }
    }
    for i in &show.images {
        s += &format!(
            "  image {} task {} session {} {} -> {}: {}\n",
            i.id,
            i.task,
            i.session,
            i.source.locator,
            i.target.locator,
            i.state.kind().as_str()
        );
    }
    Ok(s)
}
