//! The scheduler: the thin edge that turns the calendar's and the broker's pure decisions into
//! store changes and runs the granted jobs (CAL-03, CAL-14, CAL-19, JOB-01, JOB-04, JOB-07,
//! JOB-09).
//!
//! One [`Scheduler::tick`] records the work that ended, runs the calendar pass (every decision of
//! `calendar::decide` at the clock's instant committed in ONE transaction: the jobs with their
//! occurrence rows, the recorded non-runs, the events' advances, and NEWDAY's cancellations), queues
//! the retries whose delay passed, and runs a broker pass whose granted jobs start on worker
//! threads through [`JobWork`]. Every change is conditional: a conflict means another instance
//! did the same thing first (`UNIQUE(event_id, due_at)` for occurrences, the state a transition
//! expects for jobs), and the pass is read again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use parking_lot::Mutex;

use super::machine::{step, Action, Event, JobOutcome, RetryCount};
use super::{
    grant, Counters, Grant, JobError, Limits, NewdaySettings, Queue, Readiness, Request, Resource,
};
use crate::calendar::{self, CalendarView, Decision, Schedule};
use crate::clock::Clock;
use crate::limits::SCHEDULER_PASSES_MAX;
use crate::store::{
    Change, EventId, EventKind, EventRow, IdKind, JobId, JobKind, JobQuery, JobReason, JobRecord,
    JobState, JobStateKind, OccurrenceOutcome, OccurrenceQuery, OccurrenceRow, Priority,
    ScheduleRow, Store, StoreError, WaitReason,
};

/// What a queued job needs, as the plan layer knows it: the resources beyond those every job of
/// its kind takes (`global`, `plan:P`, `run:P@DAY`), and whether its window lets it start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    /// `client:C`, `destination:D`, `table:T`, ...
    pub resources: Vec<Resource>,
    /// Its window and start time.
    pub readiness: Readiness,
}

/// The work of a job, done by the plan layer (the task flow) or a restore; a fake in tests.
/// Called on worker threads.
pub trait JobWork: Send + Sync {
    /// What `job` needs at `now` beyond the resources of its kind.
    fn needs(&self, job: &JobRecord, now: Timestamp) -> Needs;

    /// Run `job`'s attempt from its start; the job is `Active`.
    fn run(&self, job: &JobRecord, clock: &dyn Clock) -> JobOutcome;

    /// Continue `job`'s attempt past its cut after the daemon that ran it died (JOB-09).
    fn resume(&self, job: &JobRecord, clock: &dyn Clock) -> JobOutcome;

    /// Stop the running attempt (JOB-11, CAL-14); its `run` or `resume` then returns
    /// [`JobOutcome::Canceled`] with `reason`.
    fn stop(&self, job: JobId, attempt: u32, reason: &JobReason);

    /// The text of `plan` and its SHA-256, recorded in a job of that plan when the job is
    /// created (PLAN-18); `None` when the work does not know the plan (the default).
    fn plan_text(&self, plan: &str) -> Option<(String, [u8; 32])> {
        let _ = plan;
        None
    }
}

/// What [`Scheduler::post_immediate`] posted and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    /// The one-time event.
    pub event: EventId,
    /// Its occurrence.
    pub due: Timestamp,
    /// What became of the occurrence (`Started(job)`, or suppressed by a similar event of
    /// higher priority); `None` when the calendar pass has not decided it yet.
    pub outcome: Option<OccurrenceOutcome>,
}

impl Posted {
    /// The job it started, if it started one.
    #[must_use]
    pub fn job(&self) -> Option<JobId> {
        match self.outcome {
            Some(OccurrenceOutcome::Started(j)) => Some(j),
            _ => None,
        }
    }
}

type Finished = (JobId, u32, JobOutcome);

/// The scheduler of one daemon instance (see the module's text).
pub struct Scheduler {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    work: Arc<dyn JobWork>,
    limits: Limits,
    newday: NewdaySettings,
    owner: String,
    immediate_only: bool,
    workers: Mutex<HashMap<(JobId, u32), JoinHandle<()>>>,
    /// The attempts told to stop, so a stop request in the store is passed on once.
    stopped: Mutex<HashSet<(JobId, u32)>>,
    finished_tx: Sender<Finished>,
    finished_rx: Receiver<Finished>,
    /// The calendar as read at a generation of the store, kept between passes; held for the
    /// whole of a calendar pass, so passes of one scheduler do not overlap.
    calendar: Mutex<Option<KeptCalendar>>,
}

/// The calendar view a scheduler keeps between passes, and the store's
/// [`Store::calendar_generation`] it is current for.
struct KeptCalendar {
    generation: u64,
    view: CalendarView,
}

/// A calendar write of a pass, applied to the kept view once the pass has committed.
enum Followed {
    Advance(EventId, Option<Timestamp>),
    Occurrence(calendar::Occurrence),
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("owner", &self.owner)
            .field("limits", &self.limits)
            .field("newday", &self.newday)
            .finish_non_exhaustive()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Worker threads hold their own references; they finish on their own and their sends
        // to a dropped channel are ignored. Recovery takes over their jobs (JOB-09).
        self.workers.get_mut().clear();
    }
}

fn is_conflict(e: &StoreError) -> bool {
    matches!(e, StoreError::Conflict { .. })
}

impl Scheduler {
    /// A scheduler over `store`, reading time from `clock`, running jobs through `work`, as the
    /// daemon instance `owner` (see [`owner_of_this_process`]).
    #[must_use]
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        work: Arc<dyn JobWork>,
        limits: Limits,
        newday: NewdaySettings,
        owner: String,
    ) -> Scheduler {
        let (finished_tx, finished_rx) = crossbeam::channel::unbounded();
        Scheduler {
            store,
            clock,
            work,
            limits,
            newday,
            owner,
            immediate_only: false,
            workers: Mutex::new(HashMap::new()),
            stopped: Mutex::new(HashSet::new()),
            finished_tx,
            finished_rx,
            calendar: Mutex::new(None),
        }
    }

    /// A scheduler whose calendar passes decide only the immediate starts posted by
    /// [`Scheduler::post_immediate`] and NEWDAY: the events of the calendar's other schedules
    /// start nothing and stay due (`daemon --no-calendar`, where something else decides when
    /// plans run).
    #[must_use]
    pub fn immediate_only(mut self) -> Scheduler {
        self.immediate_only = true;
        self
    }

    /// The earliest instant at which a tick may have something to do: the next due occurrence
    /// of an enabled event (of those the calendar passes decide) or the end of a retry delay;
    /// `None` when nothing is scheduled. A due time in the past means "now".
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn next_wake(&self) -> Result<Option<Timestamp>, JobError> {
        let mut next: Option<Timestamp> = None;
        let mut keep = |t: Timestamp| {
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        for e in self.store.events()? {
            if e.enabled && self.decided(&e) {
                if let Some(due) = e.next_due {
                    keep(due);
                }
            }
        }
        for job in self.store.jobs(&JobQuery {
            states: Some(vec![JobStateKind::WaitingForRetry]),
            ..JobQuery::default()
        })? {
            if let JobState::WaitingForRetry { at } = job.state {
                keep(at);
            }
        }
        Ok(next)
    }

    /// Whether the calendar passes of this scheduler decide `event`.
    fn decided(&self, event: &EventRow) -> bool {
        !self.immediate_only || event.kind == EventKind::Newday || is_immediate(event)
    }

    /// The daemon instance this scheduler runs as.
    #[must_use]
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// One tick: record the work that ended, pass on the stop requests recorded by other
    /// processes (`jobs cancel`), run the calendar pass, queue the retries that are due, run a
    /// broker pass. Returns the jobs the calendar pass created.
    ///
    /// # Errors
    /// [`JobError`] when the store or the calendar's records fail.
    pub fn tick(&self) -> Result<Vec<JobId>, JobError> {
        self.record_finished()?;
        self.stop_pass()?;
        let created = self.calendar_pass()?;
        self.retry_pass()?;
        self.broker_pass()?;
        Ok(created)
    }

    /// Wait for every worker thread started so far to return and record how each job ended.
    /// (A test calls this after the fake work was let go; the daemon does not need it.)
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn settle(&self) -> Result<(), JobError> {
        let handles: Vec<JoinHandle<()>> = self.workers.lock().drain().map(|(_, h)| h).collect();
        for h in handles {
            // A worker that panicked sent nothing; its job stays Active for recovery.
            let _ = h.join();
        }
        self.record_finished()
    }

    /// The calendar as the store holds it.
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn view(&self) -> Result<CalendarView, JobError> {
        let (schedules, mut events, occurrences) = calendar_records(&*self.store)?;
        events.retain(|e| self.decided(e));
        Ok(CalendarView::new(schedules, events, occurrences)?)
    }

    /// The calendar pass: every decision of `calendar::decide` at now, committed in one
    /// transaction (CAL-19). Returns the jobs created.
    ///
    /// # Errors
    /// As [`Scheduler::tick`]; [`JobError::Contended`] when every try conflicted.
    pub fn calendar_pass(&self) -> Result<Vec<JobId>, JobError> {
        let mut created = Vec::new();
        let mut conflicts = 0;
        for _ in 0..SCHEDULER_PASSES_MAX {
            let now = self.clock.now();
            // Most passes find nothing due: they read no more than the due events.
            if !self.store.events_due_by(now)?.iter().any(|e| e.enabled) {
                return Ok(created);
            }
            // The calendar is read again only when something changed it since the last pass.
            let mut kept = self.calendar.lock();
            let generation = self.store.calendar_generation()?;
            let kept_calendar = match kept.take() {
                Some(k) if k.generation == generation => k,
                _ => KeptCalendar {
                    generation,
                    view: self.view()?,
                },
            };
            let view = &kept.insert(kept_calendar).view;
            let decisions = calendar::decide(view, now);
            if decisions.is_empty() {
                return Ok(created);
            }
            let starts = decisions
                .iter()
                .filter(|d| matches!(d, Decision::Start { .. }))
                .count();
            // The new jobs' ids are handed out by this pass's own transaction (one durable
            // commit per pass): they are read here and reserved at the head of the list, which
            // conflicts, and the pass is read again, when another caller took them first.
            let first = self.store.next_id(IdKind::Job)?;
            let mut changes = Vec::new();
            if starts > 0 {
                changes.push(Change::ReserveIds {
                    kind: IdKind::Job,
                    first,
                    n: starts as u64,
                });
            }
            let mut ids = (first..).take(starts).map(JobId);
            let mut actions = Vec::new();
            let mut jobs = Vec::new();
            let mut followed = Vec::new();
            let mut open_jobs: Option<Vec<JobRecord>> = None;
            for d in decisions {
                let mut record = |event: EventId, due: Timestamp, outcome: OccurrenceOutcome| {
                    let row = OccurrenceRow {
                        event,
                        due,
                        backup_day: view.backup_day(due),
                        outcome,
                    };
                    followed.push(Followed::Occurrence(occurrence_of(row.clone())));
                    changes.push(Change::RecordOccurrence(row));
                };
                match d {
                    Decision::Start {
                        event,
                        due,
                        backup_day,
                    } => {
                        let Some(id) = ids.next() else {
                            continue;
                        };
                        let Some(e) = view.events().get(&event) else {
                            continue;
                        };
                        let Some(kind) = job_kind(&e.kind) else {
                            continue;
                        };
                        jobs.push(id);
                        let (plan_text, plan_sha256) =
                            match kind.plan().and_then(|p| self.work.plan_text(p)) {
                                Some((text, sha)) => (Some(text), Some(sha)),
                                None => (None, None),
                            };
                        let occurrence = OccurrenceRow {
                            event,
                            due,
                            backup_day,
                            outcome: OccurrenceOutcome::Started(id),
                        };
                        followed.push(Followed::Occurrence(occurrence_of(occurrence.clone())));
                        let mut job = JobRecord {
                            id,
                            kind,
                            event,
                            due_at: due,
                            backup_day,
                            priority: e.priority,
                            attempt: 1,
                            state: JobState::Queued {
                                waiting_on: WaitReason::Broker,
                            },
                            owner: None,
                            plan_text,
                            plan_sha256,
                            progress: None,
                            created: now,
                            started: None,
                            ended: None,
                            stop_requested: None,
                        };
                        // What it waits on, when that does not depend on the rest of the queue
                        // (its window or start time), is written with it, so the broker pass
                        // that follows has nothing to record for it.
                        if let Some(on) = waits_whatever_the_queue(self.needs(&job, now).readiness)
                        {
                            job.state = JobState::Queued { waiting_on: on };
                        }
                        changes.push(Change::InsertJob { job, occurrence });
                    }
                    Decision::Suppressed { event, due, by } => {
                        record(event, due, OccurrenceOutcome::Suppressed { by });
                    }
                    Decision::Activated { event, due } => {
                        record(event, due, OccurrenceOutcome::Activated);
                    }
                    Decision::ScheduleDisabled { event, due } => {
                        record(event, due, OccurrenceOutcome::ScheduleDisabled);
                    }
                    Decision::Missed { event, due } => {
                        record(event, due, OccurrenceOutcome::Missed);
                    }
                    Decision::Newday { ending, .. } => {
                        // Read once per pass, however many NEWDAY occurrences it decides.
                        if open_jobs.is_none() {
                            open_jobs = Some(self.store.jobs(&JobQuery {
                                states: Some(vec![
                                    JobStateKind::Queued,
                                    JobStateKind::WaitingForRetry,
                                    JobStateKind::Active,
                                ]),
                                ..JobQuery::default()
                            })?);
                        }
                        for job in open_jobs.iter().flatten() {
                            let (c, a) = step(
                                job,
                                Event::Newday {
                                    ending,
                                    abort: self.newday.abort,
                                    at: now,
                                },
                            );
                            changes.extend(c);
                            actions.extend(a);
                        }
                    }
                    Decision::Advance { event, from, to } => {
                        followed.push(Followed::Advance(event, to));
                        changes.push(Change::AdvanceEvent { event, from, to });
                    }
                }
            }
            match self.store.commit(changes) {
                Ok(()) => {
                    // The kept view follows this commit when nothing else wrote the calendar
                    // since it was read; else it is read again by the next pass.
                    if self.store.calendar_generation()? == generation + 1 {
                        if let Some(k) = kept.as_mut() {
                            k.generation = generation + 1;
                            for f in followed {
                                match f {
                                    Followed::Advance(event, to) => k.view.set_next_due(event, to),
                                    Followed::Occurrence(o) => k.view.record(o),
                                }
                            }
                        }
                    } else {
                        *kept = None;
                    }
                    drop(kept);
                    created.extend(jobs);
                    for a in actions {
                        self.act(a)?;
                    }
                }
                Err(e) if is_conflict(&e) => {
                    *kept = None;
                    conflicts += 1;
                }
                Err(e) => {
                    *kept = None;
                    return Err(e.into());
                }
            }
        }
        if conflicts == SCHEDULER_PASSES_MAX {
            return Err(JobError::Contended(conflicts));
        }
        Ok(created)
    }

    /// Post an immediate start of `plan` (`plan run`, CAL-03) as a one-time event due now, at
    /// `priority` (0 unless given), and run the calendar pass that decides it.
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn post_immediate(
        &self,
        plan: &str,
        priority: Option<Priority>,
    ) -> Result<Posted, JobError> {
        let id = EventId(self.store.allocate(IdKind::Event)?);
        let due = Timestamp::from_millisecond(self.clock.now().as_millisecond())
            .unwrap_or_else(|_| self.clock.now());
        let schedule = ScheduleRow {
            name: format!("run-{id}"),
            expr: format!("once {due}"),
            zone: "UTC".to_string(),
            enabled: true,
        };
        let event = EventRow {
            id,
            name: format!("run-{plan}-{id}"),
            schedule: schedule.name.clone(),
            kind: EventKind::Plan {
                plan: plan.to_string(),
            },
            priority: priority.unwrap_or(Priority::ALWAYS),
            blocking: false,
            enabled: true,
            next_due: Some(due),
        };
        self.store.commit(vec![
            Change::PutSchedule {
                schedule,
                replace: false,
            },
            Change::PutEvent {
                event,
                replace: false,
            },
        ])?;
        self.calendar_pass()?;
        let outcome = self
            .store
            .occurrences(&OccurrenceQuery {
                event: Some(id),
                ..OccurrenceQuery::default()
            })?
            .first()
            .map(|o| o.outcome);
        Ok(Posted {
            event: id,
            due,
            outcome,
        })
    }

    /// `jobs cancel J` (JOB-11): a queued or waiting job is `Canceled` at once; a running one
    /// is told to stop and is `Canceled` when its work returns. Returns whether anything was
    /// done.
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn cancel(&self, job: JobId) -> Result<bool, JobError> {
        let Some(j) = self.store.job(job)? else {
            return Ok(false);
        };
        let (changes, actions) = step(
            &j,
            Event::Cancel {
                at: self.clock.now(),
            },
        );
        let any = !changes.is_empty() || !actions.is_empty();
        if !changes.is_empty() {
            self.store.commit(changes)?;
        }
        for a in actions {
            self.act(a)?;
        }
        Ok(any)
    }

    /// Recovery (JOB-09): every `Active` job whose owner is not this instance and not alive
    /// (`alive` says, e.g. [`owner_alive`]) is taken over: past its cut it resumes through
    /// [`JobWork::resume`], before it the attempt ends `Failed` `DaemonRestarted(phase)` and
    /// the retry rule applies. Returns the jobs taken over.
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn recover(&self, alive: &dyn Fn(&str) -> bool) -> Result<Vec<JobId>, JobError> {
        let now = self.clock.now();
        let active = self.store.jobs(&JobQuery {
            states: Some(vec![JobStateKind::Active]),
            ..JobQuery::default()
        })?;
        let mut taken = Vec::new();
        for job in active {
            let dead = match job.owner.as_deref() {
                Some(o) => o != self.owner && !alive(o),
                None => true,
            };
            if !dead {
                continue;
            }
            let retry = self.retry_count(&job, now)?;
            let (changes, actions) = step(
                &job,
                Event::OwnerDead {
                    owner: self.owner.clone(),
                    retry,
                    at: now,
                },
            );
            match self.store.commit(changes) {
                Ok(()) => {
                    taken.push(job.id);
                    for a in actions {
                        self.act(a)?;
                    }
                }
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(taken)
    }

    /// Record how the work of finished jobs ended (JOB-04, JOB-06, JOB-07).
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn record_finished(&self) -> Result<(), JobError> {
        while let Ok((id, attempt, outcome)) = self.finished_rx.try_recv() {
            self.workers.lock().remove(&(id, attempt));
            let Some(job) = self.store.job(id)? else {
                continue;
            };
            if job.attempt != attempt {
                continue;
            }
            let now = self.clock.now();
            let retry = self.retry_count(&job, now)?;
            let (changes, _) = step(
                &job,
                Event::Ended {
                    outcome,
                    retry,
                    at: now,
                },
            );
            self.commit_or_skip(changes)?;
        }
        Ok(())
    }

    /// Tell the work of every attempt this instance runs that has a stop request in the store
    /// (`jobs cancel` from another process, JOB-11) to stop, once per attempt.
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn stop_pass(&self) -> Result<(), JobError> {
        for job in self.store.jobs(&JobQuery {
            states: Some(vec![JobStateKind::Active]),
            ..JobQuery::default()
        })? {
            let Some(request) = &job.stop_requested else {
                continue;
            };
            if request.attempt != job.attempt || job.owner.as_deref() != Some(&self.owner) {
                continue;
            }
            if self.stopped.lock().insert((job.id, job.attempt)) {
                self.work.stop(job.id, job.attempt, &request.reason);
            }
        }
        Ok(())
    }

    /// Queue again every job whose retry delay passed (JOB-07).
    fn retry_pass(&self) -> Result<(), JobError> {
        let now = self.clock.now();
        for job in self.store.jobs(&JobQuery {
            states: Some(vec![JobStateKind::WaitingForRetry]),
            ..JobQuery::default()
        })? {
            let (changes, _) = step(&job, Event::Tick { at: now });
            self.commit_or_skip(changes)?;
        }
        Ok(())
    }

    /// One broker pass over the queued jobs (JOB-02..05, JOB-08, JOB-12): grant, record what
    /// the others wait on, cancel those whose window closed, start the granted ones. Returns the
    /// jobs started.
    ///
    /// # Errors
    /// As [`Scheduler::tick`].
    pub fn broker_pass(&self) -> Result<Vec<JobId>, JobError> {
        let now = self.clock.now();
        let jobs = self.store.jobs(&JobQuery {
            states: Some(vec![JobStateKind::Queued, JobStateKind::Active]),
            ..JobQuery::default()
        })?;
        let mut active = Vec::new();
        let mut requests = Vec::new();
        let mut by_id = HashMap::new();
        for job in jobs {
            let needs = self.needs(&job, now);
            if job.state.kind() == JobStateKind::Active {
                active.push(needs.resources);
            } else {
                requests.push(Request {
                    job: job.id,
                    priority: job.priority,
                    created: job.created,
                    resources: needs.resources,
                    readiness: needs.readiness,
                });
                by_id.insert(job.id, job);
            }
        }
        let counters = Counters::of_active(active.iter().map(Vec::as_slice));
        let grants = grant(&Queue { requests }, &counters, &self.limits);
        let mut steps = Vec::new();
        for g in grants {
            let Some(job) = by_id.get(&g.job()) else {
                continue;
            };
            let event = match g {
                Grant::Granted { .. } => Event::Granted {
                    owner: self.owner.clone(),
                    at: now,
                },
                Grant::Waits { on, .. } => Event::Waits { on, at: now },
                Grant::WindowClosed { .. } => Event::WindowClosed { at: now },
            };
            let (changes, actions) = step(job, event);
            if !changes.is_empty() || !actions.is_empty() {
                steps.push((job.id, changes, actions));
            }
        }
        // All the pass's changes in one transaction; when another instance changed one of the
        // jobs first, each job's changes on their own, skipping the ones that conflict.
        let all: Vec<Change> = steps.iter().flat_map(|(_, c, _)| c.clone()).collect();
        let together = self.commit_or_skip(all)?;
        let mut started = Vec::new();
        for (id, changes, actions) in steps {
            if together || self.commit_or_skip(changes)? {
                if !actions.is_empty() {
                    started.push(id);
                }
                for a in actions {
                    self.act(a)?;
                }
            }
        }
        Ok(started)
    }

    /// Every resource `job` takes: those of its kind and those its work names.
    fn needs(&self, job: &JobRecord, now: Timestamp) -> Needs {
        let mut needs = self.work.needs(job, now);
        let mut all = vec![Resource::Global];
        if let Some(plan) = job.kind.plan() {
            all.push(Resource::Plan(plan.to_string()));
            all.push(Resource::Run(format!("{plan}@{}", job.backup_day)));
        }
        for r in needs.resources {
            if !all.contains(&r) {
                all.push(r);
            }
        }
        needs.resources = all;
        needs
    }

    /// The retry rule's counts for `job` ending at `now` (JOB-07): the attempts of its plan (or,
    /// for other kinds, of the job) started within the attempt window. A job created within the
    /// window counts all its attempts, an older one its current attempt.
    fn retry_count(&self, job: &JobRecord, now: Timestamp) -> Result<RetryCount, JobError> {
        let since = now
            .checked_sub(self.limits.attempt_window())
            .unwrap_or(Timestamp::MIN);
        let attempts = |j: &JobRecord| -> u32 {
            if j.created >= since {
                j.attempt
            } else {
                u32::from(j.started.is_some_and(|s| s >= since) || j.id == job.id)
            }
        };
        let mut n = attempts(job);
        if let Some(plan) = job.kind.plan() {
            for other in self.store.jobs(&JobQuery {
                plan: Some(plan.to_string()),
                ..JobQuery::default()
            })? {
                if other.id != job.id && other.started.is_some() {
                    n += attempts(&other);
                }
            }
        }
        Ok(RetryCount {
            started_in_window: n,
            backup_attempts: self.limits.backup_attempts,
            delay: self.limits.retry_delay(),
        })
    }

    /// Commit `changes` (nothing when empty); `false` when another instance changed the job
    /// first.
    fn commit_or_skip(&self, changes: Vec<Change>) -> Result<bool, JobError> {
        if changes.is_empty() {
            return Ok(true);
        }
        match self.store.commit(changes) {
            Ok(()) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Do an action: start or resume the work on a worker thread, or tell it to stop.
    fn act(&self, action: Action) -> Result<(), JobError> {
        let (id, attempt, resume) = match action {
            Action::Stop {
                job,
                attempt,
                reason,
            } => {
                if self.stopped.lock().insert((job, attempt)) {
                    self.work.stop(job, attempt, &reason);
                }
                return Ok(());
            }
            Action::Start { job, attempt } => (job, attempt, false),
            Action::Resume { job, attempt } => (job, attempt, true),
        };
        let Some(job) = self.store.job(id)? else {
            return Ok(());
        };
        let work = Arc::clone(&self.work);
        let clock = Arc::clone(&self.clock);
        let tx = self.finished_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("job {id}"))
            .spawn(move || {
                let outcome = if resume {
                    work.resume(&job, &*clock)
                } else {
                    work.run(&job, &*clock)
                };
                // The scheduler may be gone (the daemon stops); recovery then takes over.
                let _ = tx.send((job.id, attempt, outcome));
            });
        match handle {
            Ok(h) => {
                self.workers.lock().insert((id, attempt), h);
            }
            Err(e) => {
                let outcome = JobOutcome::Done {
                    status: crate::store::JobStatus::Failed,
                    reason: Some(JobReason::Engine(format!(
                        "starting the worker thread of job {id}: {e}"
                    ))),
                };
                let _ = self.finished_tx.send((id, attempt, outcome));
            }
        }
        Ok(())
    }
}

/// What a queued job with `readiness` waits on whatever else is queued or active (the broker
/// looks at the window and the start time before any resource, [`grant`]); `None` when the
/// broker decides (a ready job, or one whose window closed).
fn waits_whatever_the_queue(readiness: Readiness) -> Option<WaitReason> {
    match readiness {
        Readiness::WaitWindow => Some(WaitReason::Window),
        Readiness::WaitStartTime => Some(WaitReason::StartTime),
        Readiness::Ready | Readiness::WindowClosed => None,
    }
}

/// Whether `event` is an immediate start posted by [`Scheduler::post_immediate`]: a plan event
/// named `run-PLAN-eN` on its own one-time schedule `run-eN`.
fn is_immediate(event: &EventRow) -> bool {
    matches!(event.kind, EventKind::Plan { .. })
        && event.schedule == format!("run-{}", event.id)
        && event.name.starts_with("run-")
}

/// What [`CalendarView::new`] takes: schedules, events, recorded occurrences.
pub type CalendarRecords = (Vec<Schedule>, Vec<EventRow>, Vec<calendar::Occurrence>);

/// The calendar's records as `store` holds them: the schedules parsed, the events, every
/// recorded occurrence (what [`CalendarView::new`] takes; `schedule due` and `calendar` add a
/// NEWDAY event in memory when the store has none yet).
///
/// # Errors
/// [`JobError`] when the store fails or a stored schedule does not parse.
pub fn calendar_records(store: &dyn Store) -> Result<CalendarRecords, JobError> {
    let schedules = store
        .schedules()?
        .into_iter()
        .map(schedule_of)
        .collect::<Result<Vec<_>, _>>()?;
    let events = store.events()?;
    let occurrences = store
        .occurrences(&OccurrenceQuery::default())?
        .into_iter()
        .map(occurrence_of)
        .collect();
    Ok((schedules, events, occurrences))
}

/// A stored schedule row as the calendar's [`Schedule`].
///
/// # Errors
/// [`JobError::Zone`] or [`JobError::Schedule`] when the row's zone or expression is not valid.
pub fn schedule_of(row: ScheduleRow) -> Result<Schedule, JobError> {
    let zone = TimeZone::get(&row.zone).map_err(|_| JobError::Zone {
        name: row.name.clone(),
        zone: row.zone.clone(),
    })?;
    let mut s =
        Schedule::parse(&row.name, &row.expr, zone).map_err(|source| JobError::Schedule {
            name: row.name.clone(),
            source,
        })?;
    s.enabled = row.enabled;
    Ok(s)
}

fn occurrence_of(row: OccurrenceRow) -> calendar::Occurrence {
    calendar::Occurrence {
        event: row.event,
        due: row.due,
        backup_day: row.backup_day,
        outcome: match row.outcome {
            OccurrenceOutcome::Started(j) => calendar::OccurrenceOutcome::Started(j),
            OccurrenceOutcome::Suppressed { by } => calendar::OccurrenceOutcome::Suppressed { by },
            OccurrenceOutcome::Activated => calendar::OccurrenceOutcome::Activated,
            OccurrenceOutcome::Missed => calendar::OccurrenceOutcome::Missed,
            OccurrenceOutcome::ScheduleDisabled => calendar::OccurrenceOutcome::ScheduleDisabled,
        },
    }
}

fn job_kind(kind: &calendar::EventKind) -> Option<JobKind> {
    match kind {
        calendar::EventKind::Plan { plan } => Some(JobKind::Backup { plan: plan.clone() }),
        calendar::EventKind::Command { name, .. } => Some(JobKind::Command { name: name.clone() }),
        calendar::EventKind::Maintenance { dest } => {
            Some(JobKind::Maintenance { dest: dest.clone() })
        }
        calendar::EventKind::Newday => None,
    }
}

/// This process as a job owner: `pid P start S boot B` (its pid, its start time in clock ticks
/// after boot from `/proc/self/stat`, and the kernel's boot id), so a pid reused after a
/// restart or a reboot is not taken for the daemon that died.
#[must_use]
pub fn owner_of_this_process() -> String {
    let pid = std::process::id();
    format!(
        "pid {pid} start {} boot {}",
        start_ticks(pid).unwrap_or(0),
        boot_id().unwrap_or_default()
    )
}

/// Whether the daemon instance `owner` (as [`owner_of_this_process`] wrote it) still runs: the
/// same boot, and a process with its pid that started at the same tick.
#[must_use]
pub fn owner_alive(owner: &str) -> bool {
    let words: Vec<&str> = owner.split_whitespace().collect();
    let ["pid", pid, "start", start, "boot", boot] = words[..] else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    boot_id().as_deref() == Some(boot) && start_ticks(pid) == Some(start)
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Field 22 of `/proc/PID/stat` (the start time), read after the command's closing parenthesis.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
