//! `timezero reconcile` (QUI-09): match what the store says was going on with what the engine
//! and the file systems hold now, after a process running jobs died. One printed line per
//! decision.
//!
//! For each `Active` job whose owner is gone (a dead `plan run` or daemon instance):
//! - a lease (a frozen mount) is thawed and dropped;
//! - a hook run whose start is recorded and end is not is ended `Unknown`; it is never run
//!   again for that attempt (HOOK-10);
//! - `Establish` intents without outcome, per task: when each has a live session in its table
//!   whose target is the intent's and that no image row names, they are adopted (image rows
//!   inserted); when only some have (half a group), those are withdrawn and the cut counts as
//!   not made; none found → `NotDone`;
//! - a job in a task's `Cut` step whose image rows cover the task's targets moves to `Thaw`: it
//!   is past its cut;
//! - an `Incomplete` image of a job that continues (past its cut, in that task) is kept; any
//!   other: its session is withdrawn and the image is `Lost`; a file target is removed;
//! - a task's target that no valid or incomplete image and no live session names is removed;
//! - then the job layer's recovery: before its cut the attempt ends `Failed`
//!   `DaemonRestarted(phase)` with the retry rule; past it `JobWork::resume` continues the
//!   attempt in this process to its end (JOB-09), or ends it with status 1 when it died in
//!   `task_post`, `plan_post` or `finally`.
//!
//! A `QuiesceCommand` intent without outcome (a command quiesce held when the process died) runs
//! its `unquiesce_cmd` now and is resolved with how that went. Other open intents of dead jobs
//! are resolved `Unknown`. Broker counters need no repair: every
//! broker pass rebuilds them from the `Active` jobs. Last, the catalog is reconciled with each
//! table (CAT-04).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::holds::wait_for_watchdog;
use super::runner::PlanWork;
use super::state::StateDir;
use super::Fail;
use crate::catalog::{self, Cut, FileVolumes, ReconcileAction};
use crate::clock::{Clock, SystemClock};
use crate::engine::{Engine, EngineOptions};
use crate::hook::{self, HookContext, HookOutcome, HookSpec, Stage};
use crate::job::{
    owner_alive, owner_of_this_process, past_cut, step as job_step, Event as JobEvent, Scheduler,
};
use crate::plan::Plan;
use crate::quiesce::{BackendError, FsFreeze, QuiesceBackend};
use crate::store::{
    Change, HookResult, IdKind, ImageId, ImageQuery, ImageState, ImageStateKind, IntentAction,
    IntentId, IntentOutcome, JobId, JobQuery, JobRecord, JobState, JobStateKind, Phase, Store,
    TaskStep,
};
use crate::{SessionId, SessionState};

fn store_err(e: crate::store::StoreError) -> Fail {
    Fail::Message(e.to_string())
}

/// `timezero reconcile`: returns the decision lines.
pub(super) fn reconcile(state: Option<PathBuf>, as_json: bool) -> Result<String, Fail> {
    let state = StateDir::new(state);
    if !state.store_path().exists() {
        return Ok(if as_json {
            "[]\n".to_string()
        } else {
            format!(
                "nothing to reconcile: {} has no store\n",
                state.dir.display()
            )
        });
    }
    let _lock = match state.hold_runner_lock()? {
        Ok(f) => f,
        Err(holder) => {
            return Err(Fail::Message(format!(
                "a daemon holds {} ({holder}); it reconciles at its start",
                state.dir.display()
            )))
        }
    };
    let store: Arc<dyn Store> = state.open_store()?;
    let lines = reconcile_state(&state, &store, Arc::new(SystemClock), &mut HashMap::new())?;
    if as_json {
        return Ok(crate::command::output::json(&lines)?);
    }
    Ok(lines.iter().map(|l| format!("{l}\n")).collect())
}

/// The reconcile of `state` with `store` open, the lock held by the caller (`timezero
/// reconcile`, or the daemon at its start). `engines` are the tables the caller holds open;
/// the others are opened here and added. `clock` dates the decisions (and the retries). Returns
/// the decision lines.
pub(super) fn reconcile_state(
    state: &StateDir,
    store: &Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    engines: &mut HashMap<PathBuf, Arc<Engine>>,
) -> Result<Vec<String>, Fail> {
    let store = Arc::clone(store);
    let mut lines: Vec<String> = Vec::new();

    let dead: Vec<JobRecord> = store
        .jobs(&JobQuery {
            states: Some(vec![JobStateKind::Active]),
            ..JobQuery::default()
        })
        .map_err(store_err)?
        .into_iter()
        .filter(|j| j.owner.as_deref().is_none_or(|o| !owner_alive(o)))
        .collect();
    let dead_ids: BTreeSet<_> = dead.iter().map(|j| j.id).collect();
    let now = clock.now();

    // The watchdog of a dead job undoes its holds first (QUI-07); what it undid is in the
    // store once it has ended.
    for job in &dead {
        if let Some(line) = wait_for_watchdog(&state.dir, job.id) {
            lines.push(line);
        }
    }

    // Leases: thaw what a dead job froze (QUI-06).
    let freeze: Arc<dyn QuiesceBackend> = Arc::new(FsFreeze);
    for lease in store.open_leases().map_err(store_err)? {
        let live = store
            .job(lease.job)
            .map_err(store_err)?
            .is_some_and(|j| j.state.kind() == JobStateKind::Active && !dead_ids.contains(&j.id));
        if live {
            continue;
        }
        // Only the file system the lease names: the mount point may name another one now.
        let thawed = match rustix::fs::stat(&lease.mount) {
            Ok(st) if st.st_dev == lease.st_dev => match freeze.thaw(&lease.mount) {
                Ok(()) => "thawed".to_string(),
                Err(BackendError::Io { source, .. })
                    if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                {
                    "not frozen".to_string()
                }
                Err(e) => format!("thaw: {e}"),
            },
            Ok(st) => format!(
                "not thawed: its mount is on device {} now, the lease names {}",
                st.st_dev, lease.st_dev
            ),
            Err(e) => format!("not thawed: stat: {e}"),
        };
        store
            .commit(vec![Change::DropLease(lease.id)])
            .map_err(store_err)?;
        lines.push(format!(
            "{}: lease on {} of a job not running: {thawed}, dropped",
            lease.job,
            lease.mount.display()
        ));
    }

    for job in &dead {
        // Hook runs in flight.
        for run in store.hook_runs(job.id).map_err(store_err)? {
            if run.key.attempt != job.attempt || run.ended.is_some() {
                continue;
            }
            store
                .commit(vec![Change::EndHookRun {
                    key: run.key,
                    ended: now,
                    result: HookResult::Unknown,
                    stdout_tail: Vec::new(),
                    stderr_tail: Vec::new(),
                }])
                .map_err(store_err)?;
            let task = run
                .key
                .task
                .map(|t| format!(" task {t}"))
                .unwrap_or_default();
            lines.push(format!(
                "{}: hook {}{task} started and never ended: unknown, not run again in attempt {}",
                job.id,
                run.key.stage.as_str(),
                run.key.attempt
            ));
        }
    }

    // Cuts of dead jobs whose outcome was not recorded (section 3.2): per task, the live
    // session in each intent's table whose target is the intent's and that no image row names.
    // A task whose every intent has its session is adopted; one with only some of them (half
    // a group) has those withdrawn: its cut counts as never made.
    let images = store.images(&ImageQuery::default()).map_err(store_err)?;
    let open = store.open_intents().map_err(store_err)?;
    type Found = (IntentId, PathBuf, Option<SessionId>);
    let mut cuts: BTreeMap<(JobId, Option<u32>), Vec<Found>> = BTreeMap::new();
    for intent in &open {
        let IntentAction::Establish { table, target } = &intent.action else {
            continue;
        };
        if !dead_ids.contains(&intent.job) {
            continue;
        }
        let found = engine(engines, table, &mut lines).and_then(|e| {
            e.status()
                .into_iter()
                .find(|s| {
                    &s.target == target
                        && s.state.is_live()
                        && !images
                            .iter()
                            .any(|i| i.session == s.id && &i.table == table)
                })
                .map(|s| s.id)
        });
        cuts.entry((intent.job, intent.task))
            .or_default()
            .push((intent.id, table.clone(), found));
    }
    let mut adopt: HashMap<IntentId, SessionId> = HashMap::new();
    for ((job, task), found) in &cuts {
        let made = found.iter().filter(|(_, _, s)| s.is_some()).count();
        if made == found.len() {
            adopt.extend(found.iter().filter_map(|(i, _, s)| s.map(|s| (*i, s))));
        } else if made > 0 {
            let mut what = Vec::new();
            for (_, table, session) in found {
                let (Some(session), Some(e)) = (session, engine(engines, table, &mut lines)) else {
                    continue;
                };
                match e.withdraw(*session) {
                    Ok(()) => what.push(format!("{session} withdrawn")),
                    Err(err) => what.push(format!("withdraw {session}: {err}")),
                }
            }
            lines.push(format!(
                "{job}: cut of task {} made {made} of its {} sessions: {}; the cut counts as \
                 not made",
                task.unwrap_or(0),
                found.len(),
                what.join(", ")
            ));
        }
    }

    // Open intents of dead jobs.
    for intent in open {
        if !dead_ids.contains(&intent.job) {
            continue;
        }
        let Some(job) = dead.iter().find(|j| j.id == intent.job) else {
            continue;
        };
        let outcome = match &intent.action {
            IntentAction::QuiesceCommand { argv } => {
                // A command quiesce held when the process died: undo it now (QUI-01: the
                // unquiesce command runs whatever happened to the quiesce command).
                let mut ctx = HookContext::new(Stage::Unquiesce);
                ctx.job = Some(job.id);
                ctx.attempt = Some(intent.attempt);
                ctx.plan = job.kind.plan().map(str::to_string);
                ctx.task = intent.task;
                ctx.backup_day = Some(job.backup_day);
                match HookSpec::new(argv.clone()) {
                    Ok(spec) => {
                        let run = hook::run(&spec, &ctx, &SystemClock);
                        let task = intent
                            .task
                            .map(|t| format!(" of task {t}"))
                            .unwrap_or_default();
                        lines.push(format!(
                            "{}: quiesce{task} held when its process died: unquiesce_cmd run, {}",
                            job.id,
                            match &run.outcome {
                                HookOutcome::Success => "exit 0".to_string(),
                                HookOutcome::Skip => "exit 75".to_string(),
                                HookOutcome::Failed(e) => e.to_string(),
                            }
                        ));
                        match run.outcome {
                            HookOutcome::Failed(e) => IntentOutcome::Failed(e.to_string()),
                            _ => IntentOutcome::Done,
                        }
                    }
                    Err(e) => IntentOutcome::Failed(e.to_string()),
                }
            }
            IntentAction::Establish { table, .. } => match adopt.get(&intent.id) {
                Some(&session) => {
                    // Adopt: the row the cut would have written.
                    let plan = job.kind.plan().unwrap_or_default().to_string();
                    let cut = Cut {
                        job: job.id,
                        task: intent.task.unwrap_or(0),
                        plan: &plan,
                        backup_day: job.backup_day,
                        table,
                    };
                    if let Some(s) =
                        engine(engines, table, &mut lines).and_then(|e| e.session(session).ok())
                    {
                        let id = ImageId(store.allocate(IdKind::Image).map_err(store_err)?);
                        store
                            .commit(vec![Change::PutImage(catalog::image_at_cut(
                                id, &cut, &s.desc,
                            ))])
                            .map_err(store_err)?;
                        lines.push(format!(
                            "{}: cut of task {} made session {session} with no image row: \
                             adopted as {id}",
                            job.id, cut.task
                        ));
                    }
                    IntentOutcome::Adopted(session)
                }
                None => IntentOutcome::NotDone,
            },
            _ => IntentOutcome::Unknown,
        };
        lines.push(format!(
            "{}: intent {} ({}) without outcome: {}",
            intent.job,
            intent.id,
            intent_what(&intent.action),
            match &outcome {
                IntentOutcome::Adopted(s) => format!("adopted {s}"),
                IntentOutcome::NotDone => "not done".to_string(),
                IntentOutcome::Done => "done".to_string(),
                IntentOutcome::Failed(e) => format!("failed: {e}"),
                _ => "unknown".to_string(),
            }
        ));
        store
            .commit(vec![Change::Resolve {
                intent: intent.id,
                outcome,
                at: now,
            }])
            .map_err(store_err)?;
    }

    // A dead job whose task's cut is made (its image rows cover the task's targets) is past
    // that cut, also when the process died before it recorded the next step; the attempt
    // continues there (JOB-09).
    let mut resuming: HashMap<JobId, u32> = HashMap::new();
    let live_images = store
        .images(&ImageQuery {
            states: Some(vec![ImageStateKind::Incomplete, ImageStateKind::Valid]),
            ..ImageQuery::default()
        })
        .map_err(store_err)?;
    let cut_made = |job: JobId, task: u32| -> Result<bool, Fail> {
        let targets = store
            .tasks(job)
            .map_err(store_err)?
            .into_iter()
            .find(|t| t.index == task)
            .map(|t| t.targets)
            .unwrap_or_default();
        Ok(!targets.is_empty()
            && targets.iter().all(|t| {
                live_images
                    .iter()
                    .any(|i| i.job == job && i.task == task && &i.target.locator == t)
            }))
    };
    for job in &dead {
        let Some(j) = store.job(job.id).map_err(store_err)? else {
            continue;
        };
        let JobState::Active { phase } = j.state else {
            continue;
        };
        let Phase::Task { index, step } = phase else {
            continue;
        };
        if step == TaskStep::Cut && cut_made(j.id, index)? {
            let thaw = Phase::Task {
                index,
                step: TaskStep::Thaw,
            };
            let (changes, _) = job_step(
                &j,
                JobEvent::Phase {
                    phase: thaw,
                    at: now,
                },
            );
            store.commit(changes).map_err(store_err)?;
            lines.push(format!(
                "{}: cut of task {index} made before its process died: the attempt continues \
                 after it",
                j.id
            ));
            resuming.insert(j.id, index);
        } else if past_cut(phase) && !matches!(step, TaskStep::Post | TaskStep::Finally) {
            resuming.insert(j.id, index);
        }
    }

    // Incomplete images of dead jobs: the copy of the task a job continues goes on in the
    // attempt; any other cannot finish.
    for image in store.images(&ImageQuery::default()).map_err(store_err)? {
        if image.state.kind() != ImageStateKind::Incomplete || !dead_ids.contains(&image.job) {
            continue;
        }
        if resuming.get(&image.job) == Some(&image.task) && cut_made(image.job, image.task)? {
            lines.push(format!(
                "{}: image {} incomplete: kept, the attempt continues its copy",
                image.job, image.id
            ));
            continue;
        }
        let mut what = Vec::new();
        if let Some(e) = engine(engines, &image.table, &mut lines) {
            let live = e
                .status()
                .iter()
                .any(|s| s.id == image.session && s.state.is_live());
            if live {
                match e.withdraw(image.session) {
                    Ok(()) => what.push(format!("session {} withdrawn", image.session)),
                    Err(err) => what.push(format!("withdraw {}: {err}", image.session)),
                }
            }
            let completed = e
                .status()
                .iter()
                .any(|s| s.id == image.session && s.state == SessionState::Completed);
            if !completed {
                match std::fs::remove_file(&image.target.locator) {
                    Ok(()) => what.push(format!("target {} removed", image.target.locator)),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => what.push(format!("remove {}: {err}", image.target.locator)),
                }
            }
        }
        store
            .commit(vec![Change::SetImageState {
                image: image.id,
                from: ImageStateKind::Incomplete,
                to: ImageState::Lost {
                    why: format!("job {} died before the image was complete", image.job),
                    engine: None,
                },
            }])
            .map_err(store_err)?;
        what.push("lost".to_string());
        lines.push(format!(
            "{}: image {} incomplete: {}",
            image.job,
            image.id,
            what.join(", ")
        ));
    }

    // Targets a dead attempt created before its cut: no valid or incomplete image names
    // them and no live session writes them, and a retry of the job would find them in its way.
    let mut named: BTreeSet<String> = store
        .images(&ImageQuery {
            states: Some(vec![ImageStateKind::Incomplete, ImageStateKind::Valid]),
            ..ImageQuery::default()
        })
        .map_err(store_err)?
        .into_iter()
        .map(|i| i.target.locator)
        .collect();
    for e in engines.values() {
        named.extend(
            e.status()
                .into_iter()
                .filter(|s| s.state.is_live())
                .map(|s| s.target),
        );
    }
    for job in &dead {
        for task in store.tasks(job.id).map_err(store_err)? {
            for target in &task.targets {
                if named.contains(target) {
                    continue;
                }
                match std::fs::remove_file(target) {
                    Ok(()) => lines.push(format!(
                        "{}: target {target} of task {} made before its cut: removed",
                        job.id, task.index
                    )),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => lines.push(format!("{}: remove {target}: {err}", job.id)),
                }
            }
        }
    }

    // The jobs themselves, by the job layer's recovery: one past its cut continues in this
    // process with the plan text it recorded (PLAN-18).
    let global = state.global()?;
    let mut tables = HashMap::new();
    let mut plans = HashMap::new();
    for job in &dead {
        let Some(name) = job.kind.plan() else {
            continue;
        };
        let plan = match job.plan_text.as_deref().map(Plan::parse) {
            Some(Ok(plan)) => plan,
            // A job that recorded no plan text runs the plan of that name in the state.
            _ => match state.load_plan(Path::new(name)) {
                Ok((path, plan)) => {
                    plans.insert(name.to_string(), (path, plan.clone()));
                    plan
                }
                Err(_) => continue,
            },
        };
        match state.table_of(&plan) {
            Ok(t) => {
                tables.insert(plan.name.clone(), t);
            }
            Err(Fail::Usage(e) | Fail::Message(e)) => {
                lines.push(format!("{}: the table of plan {}: {e}", job.id, plan.name));
            }
            Err(Fail::Run(e)) => {
                lines.push(format!("{}: the table of plan {}: {e}", job.id, plan.name));
            }
        }
    }
    let work = Arc::new(PlanWork {
        store: Arc::clone(&store),
        clock: Arc::clone(&clock),
        global,
        plans,
        tables,
        engines: Mutex::new(engines.clone()),
        state_dir: Some(state.dir.clone()),
    });
    // The retry rule of `timezero.toml` decides when the ended attempts run again.
    let (limits, newday) = super::jobs::job_settings(state)?;
    let scheduler = Scheduler::new(
        Arc::clone(&store),
        clock,
        Arc::clone(&work) as Arc<dyn crate::job::JobWork>,
        limits,
        newday,
        owner_of_this_process(),
    );
    let taken = scheduler
        .recover(&owner_alive)
        .map_err(|e| Fail::Message(e.to_string()))?;
    scheduler
        .settle()
        .map_err(|e| Fail::Message(e.to_string()))?;
    // The tables the continued attempts opened stay open for the catalog pass below.
    for (t, e) in work.engines.lock().iter() {
        engines.entry(t.clone()).or_insert_with(|| Arc::clone(e));
    }
    for id in taken {
        if let Some(j) = store.job(id).map_err(store_err)? {
            lines.push(format!(
                "{id}: its process died; now {}",
                super::jobs::state_text(&j.state)
            ));
        }
    }
    let active = store
        .jobs(&JobQuery {
            states: Some(vec![JobStateKind::Active]),
            ..JobQuery::default()
        })
        .map_err(store_err)?
        .len();
    lines.push(format!(
        "broker counters: rebuilt from the {active} active job(s) at each pass"
    ));

    // The catalog against each table.
    let mut tables: BTreeSet<PathBuf> = state.tables()?.into_iter().collect();
    for i in store.images(&ImageQuery::default()).map_err(store_err)? {
        tables.insert(i.table.clone());
    }
    for table in tables {
        let Some(e) = engine(engines, &table, &mut lines) else {
            continue;
        };
        match catalog::reconcile(&*store, &e, &table, &[], &FileVolumes::default()) {
            Ok(report) => lines.extend(report.done.into_iter().map(catalog_line)),
            Err(err) => lines.push(format!("catalog: table {}: {err}", table.display())),
        }
    }
    Ok(lines)
}

/// The line printed for one decision of the catalog reconcile (here and in the daemon).
pub(super) fn catalog_line(a: ReconcileAction) -> String {
    match a {
        ReconcileAction::Lose { image, why, .. } => format!("catalog: image {image} lost: {why}"),
        ReconcileAction::RemoveTarget { image, locator } => {
            format!("catalog: expired image {image}: target {locator} removed")
        }
        ReconcileAction::Withdraw { image, session } => {
            format!("catalog: expired image {image}: session {session} withdrawn")
        }
    }
}

/// The engine of `table`: the one in `engines`, else opened and added.
fn engine(
    engines: &mut HashMap<PathBuf, Arc<Engine>>,
    table: &Path,
    lines: &mut Vec<String>,
) -> Option<Arc<Engine>> {
    if let Some(e) = engines.get(table) {
        return Some(Arc::clone(e));
    }
    match Engine::open_path(table, EngineOptions::default()) {
        Ok(e) => {
            let e = Arc::new(e);
            engines.insert(table.to_path_buf(), Arc::clone(&e));
            Some(e)
        }
        Err(e) => {
            lines.push(format!("table {}: cannot open: {e}", table.display()));
            None
        }
    }
}

fn intent_what(a: &IntentAction) -> String {
    match a {
        IntentAction::Hook { key } => format!("hook {}", key.stage.as_str()),
        IntentAction::Freeze { mount } => format!("freeze {}", mount.display()),
        IntentAction::QuiesceCommand { argv } => format!("quiesce command {}", argv.join(" ")),
        IntentAction::Establish { target, .. } => format!("establish to {target}"),
        IntentAction::Withdraw { session, .. } => format!("withdraw {session}"),
        IntentAction::CreateTarget { path } => format!("create {}", path.display()),
        IntentAction::DeleteTarget { path } => format!("delete {}", path.display()),
    }
}
