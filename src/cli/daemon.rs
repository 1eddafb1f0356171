//! `timezero daemon` and `timezero daemon stop` (docs/orchestration.md, sections 1.1 and 3.4).
//!
//! The daemon, in the foreground:
//! 1. takes `STATE/daemon.lock` exclusively (`plan run` and `reconcile` take it shared, so
//!    none of them runs under it; a second daemon is refused) and writes its instance into it
//!    (`pid P start S boot B`, the owner its jobs carry);
//! 2. opens each table `timezero.toml` configures once and serves it as `timezero serve`
//!    does (control socket `TABLE.ctl`, NBD socket `TABLE.nbd` unless `--no-nbd`);
//! 3. reconciles, with the same code as `timezero reconcile` (dead jobs' leases, hooks,
//!    intents and unfinished images, their attempts ended by the job layer's recovery, the
//!    catalog against every table with half-done expiries finished);
//! 4. loops: a scheduler tick (calendar pass, retries, broker pass; the granted jobs run on
//!    worker threads through the same [`PlanWork`] as `plan run`), then sleeps until the next
//!    due time, a request on `STATE/daemon.ctl`, or at most [`DAEMON_TICK_MAX_MS`]. When a tick
//!    moved the backup day (NEWDAY), the catalog reconcile (CAT-04) and then retention (CAT-05)
//!    run, as they do once at start before the first tick. When the engine of a held table
//!    handled a storage reset (`timezero reset TABLE VOLUME` through the table's control
//!    socket; the engine tells its watchers, [`Engine::watch_resets`]), the loop runs the
//!    catalog reconcile against that table with the reset's decisions (CAT-04).
//! 5. stops on SIGTERM, SIGINT or `daemon stop`: no job starts any more, the running ones are
//!    let finish (their hooks, quiesce and thaw, cut and copy, and the commit of their end),
//!    the sockets close, the lock is released; exit 0.
//!
//! `--no-calendar` runs only what is handed to it (`plan run`) and NEWDAY: the other events stay
//! due for a daemon with its calendar on.
//!
//! For tests, `TIMEZERO_DAEMON_MANUAL_CLOCK=INSTANT` starts the daemon on a manual clock at
//! that instant (RFC 3339), moved only by the `set-clock` request: schedules fire when a test
//! says so, never by waiting.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::{Receiver, Sender};
use jiff::Timestamp;
use parking_lot::Mutex;

use super::daemon_ctl::{self, CtlReply, CtlRequest, CtlServer, Msg};
use super::runner::PlanWork;
use super::serve::{Exports, Served};
use super::state::StateDir;
use super::{open_server, Fail, IoFlags};
use crate::catalog::{self, FileVolumes, Keep};
use crate::clock::{Clock, ManualClock, SystemClock};
use crate::engine::Engine;
use crate::job::{owner_of_this_process, JobOutcome, JobWork, Needs, Readiness, Scheduler};
use crate::limits::{DAEMON_POLL_MS, DAEMON_TICK_MAX_MS};
use crate::plan::Plan;
use crate::store::{
    BackupDay, ImageQuery, ImageStateKind, JobId, JobReason, JobRecord, JobStatus, Priority,
    SqliteStore, Store,
};

/// The kill point (`TIMEZERO_TEST_STOP_AT`) between the two steps of retention's expiry: the
/// rows are `Expired`, no file is removed yet.
const RETENTION_MARKED: &str = "retention-marked";

/// The environment variable that starts the daemon on a manual clock (tests).
pub(super) const MANUAL_CLOCK_ENV: &str = "TIMEZERO_DAEMON_MANUAL_CLOCK";

/// The flags of `timezero daemon`.
#[derive(Debug, Clone)]
pub(super) struct DaemonArgs {
    /// The state directory.
    pub state: Option<PathBuf>,
    /// Run no schedules, only what is handed to the daemon.
    pub no_calendar: bool,
    /// Serve no NBD exports.
    pub no_nbd: bool,
    /// NBD image exports are writable.
    pub writable_images: bool,
}

/// Take `STATE/daemon.lock` exclusively and write this instance into it.
fn hold_daemon_lock(state: &StateDir, owner: &str) -> Result<File, Fail> {
    use rustix::fs::{flock, FlockOperation};
    std::fs::create_dir_all(&state.dir).map_err(|e| {
        Fail::Message(format!(
            "create state directory {}: {e}",
            state.dir.display()
        ))
    })?;
    let path = state.daemon_lock_path();
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Fail::Message(format!("open {}: {e}", path.display())))?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let text = text.trim();
            return Err(Fail::Message(if text.is_empty() {
                format!(
                    "{} is in use by a plan run or reconcile; start the daemon when it ended",
                    state.dir.display()
                )
            } else {
                format!("a daemon already holds {} ({text})", state.dir.display())
            }));
        }
        Err(e) => return Err(Fail::Message(format!("lock {}: {e}", path.display()))),
    }
    let w = |e: std::io::Error| Fail::Message(format!("write {}: {e}", path.display()));
    file.set_len(0).map_err(w)?;
    file.write_all(format!("{owner} command timezero daemon\n").as_bytes())
        .map_err(w)?;
    file.sync_all().map_err(w)?;
    Ok(file)
}

/// The daemon's job work: each backup job runs through a [`PlanWork`] built for its plan as
/// the plan file reads when the job starts, on the engines the daemon holds.
struct DaemonWork {
    state: StateDir,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    engines: Arc<Mutex<HashMap<PathBuf, Arc<Engine>>>>,
    /// Plan files named by `run-plan` requests, by plan name.
    paths: Mutex<HashMap<String, PathBuf>>,
    wake: Sender<Msg>,
}

impl std::fmt::Debug for DaemonWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonWork")
            .field("state", &self.state.dir)
            .finish_non_exhaustive()
    }
}

fn failed(reason: JobReason) -> JobOutcome {
    JobOutcome::Done {
        status: JobStatus::Failed,
        reason: Some(reason),
    }
}

impl DaemonWork {
    /// The file and plan named `name`: the file a `run-plan` named, else `STATE/plans/NAME.toml`,
    /// else the plan of `STATE/plans` with that name.
    fn plan(&self, name: &str) -> Result<(PathBuf, Plan), String> {
        if let Some(p) = self.paths.lock().get(name).cloned() {
            return Plan::load(&p)
                .map(|plan| (p, plan))
                .map_err(|e| e.to_string());
        }
        let path = self.state.plan_path(Path::new(name));
        if path.exists() {
            return Plan::load(&path)
                .map(|plan| (path, plan))
                .map_err(|e| e.to_string());
        }
        let plans = self.state.plans().map_err(|e| fail_text(&e))?;
        plans
            .into_iter()
            .find_map(|(p, plan)| plan.ok().filter(|x| x.name == name).map(|x| (p, x)))
            .ok_or_else(|| format!("no plan {name} in {}", self.state.plans_dir().display()))
    }

    fn plan_work(
        &self,
        plans: HashMap<String, (PathBuf, Plan)>,
        tables: HashMap<String, PathBuf>,
    ) -> Result<PlanWork, String> {
        Ok(PlanWork {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
            global: self.state.global().map_err(|e| fail_text(&e))?,
            plans,
            tables,
            engines: Mutex::new(self.engines.lock().clone()),
            state_dir: Some(self.state.dir.clone()),
        })
    }
}

impl DaemonWork {
    /// Run `job` of plan `name` through a [`PlanWork`] of that plan.
    fn run_plan(
        &self,
        name: &str,
        job: &JobRecord,
        clock: &dyn Clock,
    ) -> Result<JobOutcome, JobReason> {
        let (path, plan) = self.plan(name).map_err(JobReason::Plan)?;
        let table = self
            .state
            .table_of(&plan)
            .map_err(|e| JobReason::Plan(fail_text(&e)))?;
        let work = self
            .plan_work(
                HashMap::from([(name.to_string(), (path, plan))]),
                HashMap::from([(name.to_string(), table)]),
            )
            .map_err(JobReason::Plan)?;
        let outcome = work.run(job, clock);
        // A table the daemon did not hold was opened for the job: keep it open.
        let mut held = self.engines.lock();
        for (t, e) in work.engines.into_inner() {
            held.entry(t).or_insert(e);
        }
        Ok(outcome)
    }
}

fn fail_text(f: &Fail) -> String {
    match f {
        Fail::Usage(m) | Fail::Message(m) => m.clone(),
        Fail::Run(e) => e.to_string(),
    }
}

impl JobWork for DaemonWork {
    fn needs(&self, _job: &JobRecord, _now: Timestamp) -> Needs {
        Needs {
            resources: Vec::new(),
            readiness: Readiness::Ready,
        }
    }

    fn run(&self, job: &JobRecord, clock: &dyn Clock) -> JobOutcome {
        if matches!(job.kind, crate::store::JobKind::Restore { .. }) {
            // A retried restore goes on from what the earlier attempt left.
            let outcome = match self.plan_work(HashMap::new(), HashMap::new()) {
                Ok(w) => w.restore(job),
                Err(e) => failed(JobReason::Plan(e)),
            };
            let _ = self.wake.send(Msg::Wake);
            return outcome;
        }
        let Some(name) = job.kind.plan() else {
            return failed(JobReason::Plan(format!(
                "job {} is not a backup job",
                job.id
            )));
        };
        let outcome = self.run_plan(name, job, clock).unwrap_or_else(failed);
        let _ = self.wake.send(Msg::Wake);
        outcome
    }

    fn resume(&self, job: &JobRecord, clock: &dyn Clock) -> JobOutcome {
        // The plan text the job recorded (PLAN-18), on the table it names.
        let mut tables = HashMap::new();
        if let Some(plan) = job.plan_text.as_deref().and_then(|t| Plan::parse(t).ok()) {
            if let Ok(t) = self.state.table_of(&plan) {
                tables.insert(plan.name.clone(), t);
            }
        }
        let outcome = match self.plan_work(HashMap::new(), tables) {
            Ok(w) => w.resume(job, clock),
            Err(e) => failed(JobReason::Plan(e)),
        };
        let _ = self.wake.send(Msg::Wake);
        outcome
    }

    fn stop(&self, _job: JobId, _attempt: u32, _reason: &JobReason) {}
}

/// The clock of the daemon: the system's, or a manual one for tests.
fn daemon_clock() -> Result<(Arc<dyn Clock>, Option<ManualClock>), Fail> {
    match std::env::var(MANUAL_CLOCK_ENV) {
        Ok(t) => {
            let start: Timestamp = t.parse().map_err(|e| {
                Fail::Usage(format!(
                    "{MANUAL_CLOCK_ENV}={t}: not an RFC 3339 instant: {e}"
                ))
            })?;
            let m = ManualClock::new(start);
            Ok((Arc::new(m.clone()), Some(m)))
        }
        Err(_) => Ok((Arc::new(SystemClock), None)),
    }
}

/// Forward SIGTERM and SIGINT to the loop as [`Msg::Stop`].
fn forward_signals(to: Sender<Msg>) -> Result<(), Fail> {
    let (mut rd, wr) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Fail::Message(format!("signal pipe: {e}")))?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let wr = wr
            .try_clone()
            .map_err(|e| Fail::Message(format!("signal pipe: {e}")))?;
        signal_hook::low_level::pipe::register(sig, wr)
            .map_err(|e| Fail::Message(format!("install signal handler: {e}")))?;
    }
    std::thread::Builder::new()
        .name("tz-daemon-signals".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            while std::io::Read::read(&mut rd, &mut b).is_ok_and(|n| n > 0) {
                let _ = to.send(Msg::Stop);
            }
        })
        .map_err(|e| Fail::Message(format!("spawn the signal thread: {e}")))?;
    Ok(())
}

/// `timezero daemon`.
pub(super) fn daemon(args: &DaemonArgs, io: IoFlags, out: &mut dyn Write) -> Result<String, Fail> {
    let state = StateDir::new(args.state.clone());
    let owner = owner_of_this_process();
    let lock = hold_daemon_lock(&state, &owner)?;
    let (limits, newday) = super::jobs::job_settings(&state)?;
    let sqlite = state.open_store()?;
    let store: Arc<dyn Store> = sqlite.clone();
    let (clock, manual) = daemon_clock()?;
    let (tx, rx) = crossbeam::channel::unbounded::<Msg>();
    forward_signals(tx.clone())?;
    let mut say = |line: String| {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say(format!("daemon {owner} holds {}", state.dir.display()));

    // The tables, held and served.
    let engines: Arc<Mutex<HashMap<PathBuf, Arc<Engine>>>> = Arc::default();
    let mut served = Vec::new();
    let exports = Exports {
        socket: None,
        listen: None,
        writable_images: args.writable_images,
        config: crate::nbd::NbdConfig::default(),
        nbd: !args.no_nbd,
    };
    for table in state.tables()? {
        let e = Arc::new(open_server(&table, io)?);
        // A reset the engine handles (raised through the table's control socket) is passed to
        // the loop, which reconciles the catalog against this table (CAT-04).
        let (notify, t) = (tx.clone(), table.clone());
        e.watch_resets(move |handled| {
            let _ = notify.send(Msg::Reset {
                table: t.clone(),
                decisions: handled.decisions.clone(),
            });
        });
        let s = Served::start(Arc::clone(&e), &table, &exports)?;
        for l in s.describe().lines() {
            say(l.to_string());
        }
        engines.lock().insert(table, e);
        served.push(s);
    }

    // Reconcile at start (the code of `timezero reconcile`).
    {
        let mut held = engines.lock().clone();
        for l in super::reconcile::reconcile_state(&state, &store, Arc::clone(&clock), &mut held)? {
            say(format!("reconcile: {l}"));
        }
        let mut mine = engines.lock();
        for (t, e) in held {
            mine.entry(t).or_insert(e);
        }
    }
    super::jobs::ensure_newday(&*store, clock.now())?;

    let work = Arc::new(DaemonWork {
        state: state.clone(),
        store: Arc::clone(&store),
        clock: Arc::clone(&clock),
        engines: Arc::clone(&engines),
        paths: Mutex::new(HashMap::new()),
        wake: tx.clone(),
    });
    let mut scheduler = Scheduler::new(
        Arc::clone(&store),
        Arc::clone(&clock),
        Arc::clone(&work) as Arc<dyn JobWork>,
        limits,
        newday,
        owner.clone(),
    );
    if args.no_calendar {
        scheduler = scheduler.immediate_only();
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let ctl = CtlServer::start(&daemon_ctl::ctl_path(&state), tx, Arc::clone(&stopping))?;
    say(format!(
        "requests on {}{}",
        daemon_ctl::ctl_path(&state).display(),
        if args.no_calendar {
            " (calendar off)"
        } else {
            ""
        }
    ));

    let daemon = Daemon {
        state: &state,
        store: &store,
        sqlite: &sqlite,
        owner: &owner,
        restores: Mutex::new(Vec::new()),
        clock: &clock,
        manual: manual.as_ref(),
        scheduler: &scheduler,
        work: &work,
        engines: &engines,
    };
    // The catalog at start: reconcile, then retention (as at NEWDAY).
    for l in daemon.catalog_upkeep() {
        say(l);
    }
    let mut day = daemon.backup_day();
    loop {
        if let Err(e) = scheduler.tick() {
            say(format!("tick: {e}"));
        }
        let now_day = daemon.backup_day();
        if now_day.is_some() && now_day != day {
            for l in daemon.catalog_upkeep() {
                say(l);
            }
            day = now_day;
        }
        if daemon.wait(&rx, &mut say) {
            break;
        }
    }

    // Stop: nothing new starts; the running jobs end and their end is committed.
    stopping.store(true, Ordering::Release);
    say("stopping: no new job starts; waiting for the running ones".to_string());
    if let Err(e) = scheduler.settle() {
        say(format!("recording the jobs' ends: {e}"));
    }
    for t in daemon.restores.lock().drain(..) {
        let _ = t.join();
    }
    drop(ctl);
    for s in served {
        s.shutdown();
    }
    drop(scheduler);
    drop(work);
    let _ = lock.set_len(0);
    drop(lock);
    say("stopped".to_string());
    Ok(String::new())
}

/// What the loop works with.
struct Daemon<'a> {
    state: &'a StateDir,
    store: &'a Arc<dyn Store>,
    sqlite: &'a Arc<SqliteStore>,
    owner: &'a str,
    restores: Mutex<Vec<std::thread::JoinHandle<()>>>,
    clock: &'a Arc<dyn Clock>,
    manual: Option<&'a ManualClock>,
    scheduler: &'a Scheduler,
    work: &'a Arc<DaemonWork>,
    engines: &'a Arc<Mutex<HashMap<PathBuf, Arc<Engine>>>>,
}

impl Daemon<'_> {
    /// The backup day now, as the calendar says.
    fn backup_day(&self) -> Option<BackupDay> {
        self.scheduler
            .view()
            .ok()
            .map(|v| v.backup_day(self.clock.now()))
    }

    /// Sleep until something may be due or a message comes; handle it. `true` to stop.
    fn wait(&self, rx: &Receiver<Msg>, say: &mut dyn FnMut(String)) -> bool {
        let now = self.clock.now();
        let cap = crossbeam::channel::after(Duration::from_millis(DAEMON_TICK_MAX_MS));
        let due = match self.scheduler.next_wake() {
            Ok(Some(t)) if t > now => self.clock.after(t),
            _ => crossbeam::channel::never(),
        };
        let msg = crossbeam::select! {
            recv(rx) -> m => m.ok(),
            recv(due) -> _ => None,
            recv(cap) -> _ => None,
        };
        match msg {
            Some(Msg::Stop) => true,
            Some(Msg::Wake) | None => false,
            Some(Msg::Reset { table, decisions }) => {
                say(format!(
                    "reset handled on {}: reconciling the catalog",
                    table.display()
                ));
                if let Some(engine) = self.engines.lock().get(&table).cloned() {
                    for l in self.catalog_reconcile_table(&table, &engine, &decisions) {
                        say(l);
                    }
                }
                false
            }
            Some(Msg::Request(req, reply)) => {
                let r = self.request(req, say);
                let _ = reply.send(r);
                false
            }
        }
    }

    /// Handle one request of `daemon.ctl`.
    fn request(&self, req: CtlRequest, say: &mut dyn FnMut(String)) -> CtlReply {
        match req {
            CtlRequest::Stop | CtlRequest::Wake => CtlReply::done("ok"),
            CtlRequest::SetClock { to } => {
                let Some(m) = self.manual else {
                    return CtlReply::refused("this daemon runs on the system clock");
                };
                match to.parse::<Timestamp>() {
                    Ok(t) => {
                        m.set(t);
                        CtlReply::done(format!("clock at {}", m.now()))
                    }
                    Err(e) => CtlReply::refused(format!("{to}: {e}")),
                }
            }
            CtlRequest::RunPlan {
                plan,
                path,
                priority,
            } => {
                let priority = match priority.map(Priority::new).transpose() {
                    Ok(p) => p,
                    Err(e) => return CtlReply::refused(e.to_string()),
                };
                if let Some(p) = path {
                    self.work.paths.lock().insert(plan.clone(), p);
                }
                let posted = match self.scheduler.post_immediate(&plan, priority) {
                    Ok(p) => p,
                    Err(e) => return CtlReply::refused(e.to_string()),
                };
                let Some(job) = posted.job() else {
                    return CtlReply::refused(format!(
                        "the run of plan {plan} did not start a job: {:?}",
                        posted.outcome
                    ));
                };
                if let Err(e) = self.scheduler.broker_pass() {
                    say(format!("broker pass: {e}"));
                }
                say(format!("{job}: run of plan {plan} handed in"));
                CtlReply {
                    ok: true,
                    job: Some(job.to_string()),
                    message: format!("{job}"),
                }
            }
            CtlRequest::Restore { image, to } => {
                let engines = self.engines.lock().clone();
                match super::catalog::restore_in_daemon(
                    self.sqlite,
                    image,
                    &to,
                    &engines,
                    self.state.tables().unwrap_or_default(),
                    self.owner,
                ) {
                    Ok((job, thread)) => {
                        self.restores.lock().push(thread);
                        say(format!("{job}: restore of i{image} to {}", to.display()));
                        CtlReply {
                            ok: true,
                            job: Some(job.to_string()),
                            message: format!("{job}"),
                        }
                    }
                    Err(e) => CtlReply::refused(fail_text(&e)),
                }
            }
        }
    }

    /// At start and at NEWDAY: the catalog reconcile against every held table (CAT-04,
    /// half-done expiries finished), then retention of every plan that has rules (CAT-05), so
    /// retention never counts an image that is already lost. One line per decision.
    fn catalog_upkeep(&self) -> Vec<String> {
        let mut lines = self.catalog_reconcile();
        lines.extend(self.retention());
        lines
    }

    /// Retention of every plan that has rules (CAT-05). One line per decision.
    fn retention(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let engines = self.engines.lock().clone();
        let plans = self.state.plans().unwrap_or_default();
        for (path, plan) in plans {
            let Ok(plan) = plan else { continue };
            let Some(r) = &plan.retention else { continue };
            let keep = Keep {
                last: r.keep_last.unwrap_or(0),
                daily: r.keep_daily.unwrap_or(0),
                weekly: r.keep_weekly.unwrap_or(0),
                monthly: r.keep_monthly.unwrap_or(0),
            };
            let images = match self.store.images(&ImageQuery {
                plan: Some(plan.name.clone()),
                states: Some(vec![ImageStateKind::Valid]),
                ..ImageQuery::default()
            }) {
                Ok(i) => i,
                Err(e) => {
                    lines.push(format!("retention of {}: {e}", plan.name));
                    continue;
                }
            };
            let decision = match catalog::choose_expired(&images, &keep) {
                Ok(d) => d,
                Err(e) => {
                    lines.push(format!(
                        "retention of {} ({}): {e}",
                        plan.name,
                        path.display()
                    ));
                    continue;
                }
            };
            let mut by_table: BTreeMap<PathBuf, Vec<crate::store::ImageId>> = BTreeMap::new();
            for id in decision.expire {
                if let Some(i) = images.iter().find(|i| i.id == id) {
                    by_table.entry(i.table.clone()).or_default().push(id);
                }
            }
            for (table, ids) in by_table {
                let engine = engines.get(&table).map(|e| &**e);
                // The two steps of an expiry: the rows first (one commit), then the files or
                // sessions. A daemon that dies between them leaves `Expired` rows whose files are
                // still there; the catalog reconcile of its next start finishes them.
                if let Err(e) = catalog::mark_expired(&**self.store, &ids) {
                    lines.push(format!("retention of {}: {e}", plan.name));
                    continue;
                }
                super::runner::stop_at(RETENTION_MARKED, 1);
                for i in ids {
                    lines.push(
                        match catalog::finish_expiry(
                            &**self.store,
                            engine,
                            &FileVolumes::default(),
                            i,
                        ) {
                            Ok(f) => {
                                format!("retention: image {i} of {} expired: {f:?}", plan.name)
                            }
                            Err(e) => format!(
                                "retention: image {i} of {} expired, not finished (the next \
                                 reconcile finishes it): {e}",
                                plan.name
                            ),
                        },
                    );
                }
            }
        }
        lines
    }

    /// The catalog reconcile against every held table (CAT-04, half-done expiries finished).
    /// One line per decision.
    fn catalog_reconcile(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let engines = self.engines.lock().clone();
        for (table, engine) in &engines {
            lines.extend(self.catalog_reconcile_table(table, engine, &[]));
        }
        lines
    }

    /// The catalog reconcile against one held table (CAT-04), with the decisions of the reset
    /// that asked for it (none at start and NEWDAY: the engine's status then gives the
    /// reasons). One line per decision.
    fn catalog_reconcile_table(
        &self,
        table: &Path,
        engine: &Engine,
        decisions: &[crate::Decision],
    ) -> Vec<String> {
        let report = match catalog::reconcile(
            &**self.store,
            engine,
            table,
            decisions,
            &FileVolumes::default(),
        ) {
            Ok(report) => report,
            Err(e) => return vec![format!("catalog: table {}: {e}", table.display())],
        };
        report
            .done
            .into_iter()
            .map(super::reconcile::catalog_line)
            .collect()
    }
}

/// `timezero daemon stop`: ask the daemon to stop and wait until it released the state.
pub(super) fn stop(state: Option<PathBuf>, out: &mut dyn Write) -> Result<String, Fail> {
    let state = StateDir::new(state);
    let Some(reply) = daemon_ctl::request(&state, &CtlRequest::Stop)? else {
        return Err(Fail::Message(format!(
            "no daemon runs on {}",
            state.dir.display()
        )));
    };
    if !reply.ok {
        return Err(Fail::Message(reply.message));
    }
    let _ = writeln!(out, "asked the daemon of {} to stop", state.dir.display());
    let _ = out.flush();
    // The daemon has stopped when the lock can be shared.
    loop {
        match state.hold_runner_lock()? {
            Ok(_held) => break,
            Err(_) => std::thread::sleep(Duration::from_millis(DAEMON_POLL_MS)),
        }
    }
    Ok("stopped\n".to_string())
}

/// `plan run` while a daemon holds the state: hand the run to it and print the job id; with
/// `wait`, follow the job in the store until it ends (exit 0 exactly on status 0).
pub(super) fn hand_over(
    state: &StateDir,
    plan: (&str, &Path),
    priority: Option<i64>,
    wait: bool,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<String, Fail> {
    let (name, path) = plan;
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let req = CtlRequest::RunPlan {
        plan: name.to_string(),
        path: Some(path),
        priority,
    };
    let Some(reply) = daemon_ctl::request_when_up(state, &req)? else {
        return Err(Fail::Message(format!(
            "a daemon holds {} but did not answer on {}",
            state.dir.display(),
            daemon_ctl::ctl_path(state).display()
        )));
    };
    let (true, Some(job)) = (reply.ok, reply.job.clone()) else {
        return Err(Fail::Message(reply.message));
    };
    if !as_json {
        let _ = writeln!(out, "{job}");
        let _ = out.flush();
    }
    let id: JobId = job
        .trim_start_matches('j')
        .parse::<u64>()
        .map(JobId)
        .map_err(|_| Fail::Message(format!("the daemon answered job {job}")))?;
    let record = follow(state, id, wait)?;
    let status = record.state.status_code();
    if as_json {
        let _ = out.write_all(
            crate::command::output::json(&serde_json::json!({
                "job": job,
                "plan": name,
                "state": record.state,
                "status": status,
            }))?
            .as_bytes(),
        );
    }
    if wait && status != Some(0) {
        return Err(Fail::Message(format!(
            "job {job} ended {}",
            super::jobs::state_text(&record.state)
        )));
    }
    Ok(String::new())
}

/// `timezero daemon [stop]`: `flags` are the daemon's `--state`, `--no-calendar`, `--no-nbd`
/// and `--writable-images`.
pub(super) fn command(
    cmd: Option<super::DaemonCmd>,
    flags: (Option<PathBuf>, bool, bool, bool),
    io: IoFlags,
    out: &mut dyn Write,
) -> Result<String, Fail> {
    let (state, no_calendar, no_nbd, writable_images) = flags;
    match cmd {
        Some(super::DaemonCmd::Stop { state: inner }) => stop(inner.or(state), out),
        None => daemon(
            &DaemonArgs {
                state,
                no_calendar,
                no_nbd,
                writable_images,
            },
            io,
            out,
        ),
    }
}

/// The job `id` now, or with `wait` once it ended.
fn follow(state: &StateDir, id: JobId, wait: bool) -> Result<JobRecord, Fail> {
    let store = state.open_store()?;
    loop {
        let j = store
            .job(id)
            .map_err(|e| Fail::Message(e.to_string()))?
            .ok_or_else(|| Fail::Message(format!("job {id} is not in the store")))?;
        if !wait || j.state.status_code().is_some() {
            return Ok(j);
        }
        std::thread::sleep(Duration::from_millis(DAEMON_POLL_MS));
    }
}

/// `restore I --to DEST` while a daemon holds the state: the daemon runs the restore job
/// (it holds the tables); print the job and, with `wait`, follow it to its end.
pub(super) fn restore_hand_over(
    state: &StateDir,
    image: crate::store::ImageId,
    to: &Path,
    wait: bool,
    out: &mut dyn Write,
) -> Result<String, Fail> {
    let req = CtlRequest::Restore {
        image: image.0,
        to: std::path::absolute(to).unwrap_or_else(|_| to.to_path_buf()),
    };
    let Some(reply) = daemon_ctl::request_when_up(state, &req)? else {
        return Err(Fail::Message(format!(
            "a daemon holds {} but did not answer on {}",
            state.dir.display(),
            daemon_ctl::ctl_path(state).display()
        )));
    };
    let (true, Some(job)) = (reply.ok, reply.job.clone()) else {
        return Err(Fail::Message(reply.message));
    };
    let _ = writeln!(
        out,
        "restore job {job}: image {image} to {} (run by the daemon)",
        to.display()
    );
    let _ = out.flush();
    let id = job
        .trim_start_matches('j')
        .parse::<u64>()
        .map(JobId)
        .map_err(|_| Fail::Message(format!("the daemon answered job {job}")))?;
    let record = follow(state, id, wait)?;
    if wait && record.state.status_code() != Some(0) {
        return Err(Fail::Message(format!(
            "job {job} ended {}",
            super::jobs::state_text(&record.state)
        )));
    }
    Ok(String::new())
}
