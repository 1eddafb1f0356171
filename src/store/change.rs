//! Changes with their preconditions, and the one place both stores check and apply them.
//!
//! One crate-internal function (`apply`) runs a [`Change`] against a transaction: it reads what
//! the precondition names, fails with [`StoreError::Conflict`] when it does not hold, and writes
//! the new rows. The SQLite store gives it its open `BEGIN IMMEDIATE` transaction, the memory
//! store a copy of its maps; so the two cannot disagree on what a change means.

use jiff::Timestamp;

use super::ms::to_ms;
use super::records::{
    EventRow, HookResult, HookRunKey, HookRunRecord, ImageChecksums, ImageRecord, ImageState,
    ImageStateKind, Intent, IntentOutcome, JobProgress, JobRecord, JobState, JobStateKind, Lease,
    OccurrenceOutcome, OccurrenceRow, ScheduleRow, TaskRecord, TaskStatus,
};
use super::{BackupDay, EventId, IdKind, ImageId, IntentId, JobId, LeaseId, StoreError};

/// One change of a [`super::Store::commit`] list, with its precondition. A list is applied in
/// order inside one transaction; the first change whose precondition fails makes the whole list
/// fail with [`StoreError::Conflict`] naming its index, and nothing of the list is kept.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Insert a job started by an occurrence, and record the occurrence as
    /// [`OccurrenceOutcome::Started`] with the job's id. Precondition: no job with this id, the
    /// event exists, no occurrence of (event, due) yet (`UNIQUE(event_id, due_at)`); the
    /// occurrence must name the job and its event.
    InsertJob {
        /// The job.
        job: JobRecord,
        /// The occurrence that started it.
        occurrence: OccurrenceRow,
    },
    /// Move an event's next occurrence. Precondition: the event's `next_due` is `from`.
    AdvanceEvent {
        /// The event.
        event: EventId,
        /// Its `next_due` now.
        from: Option<Timestamp>,
        /// Its `next_due` after.
        to: Option<Timestamp>,
    },
    /// Change a job's state (also its phase, Active to Active). Precondition: the job is in a
    /// state of kind `from` at `attempt`. The job's attempt becomes `to_attempt`, its owner
    /// `owner`; entering `Active` from another kind sets `started` to `at`, entering `Done` or
    /// `Canceled` sets `ended` to `at`.
    Transition {
        /// The job.
        job: JobId,
        /// The kind of state it must be in.
        from: JobStateKind,
        /// The attempt it must be at.
        attempt: u32,
        /// Its new state.
        to: JobState,
        /// Its attempt after (attempt + 1 when a retry is queued, JOB-07).
        to_attempt: u32,
        /// The daemon instance that owns it after.
        owner: Option<String>,
        /// When.
        at: Timestamp,
    },
    /// Record an active job's progress (copied from the copier on clock ticks; a restore's
    /// checkpoint, CAT-08). Precondition: the job is `Active` at `attempt`.
    SetProgress {
        /// The job.
        job: JobId,
        /// The attempt it must be at.
        attempt: u32,
        /// Its progress.
        progress: JobProgress,
    },
    /// Insert a task. Precondition: the job exists and has no task with this index.
    PutTask(TaskRecord),
    /// Change a task's status. Precondition: the task exists with status `from` (exactly,
    /// `Running` steps included).
    UpdateTask {
        /// The job.
        job: JobId,
        /// The task's index.
        index: u32,
        /// The status it must have.
        from: TaskStatus,
        /// Its new status.
        to: TaskStatus,
        /// Its reason after.
        reason: Option<super::records::JobReason>,
        /// Its message after.
        message: Option<String>,
    },
    /// Record a hook's start. Precondition: the job exists and this key never started
    /// (a hook runs at most once per attempt, HOOK-10).
    PutHookRun(HookRunRecord),
    /// Record a hook's end. Precondition: the run started and has not ended.
    EndHookRun {
        /// Which run.
        key: HookRunKey,
        /// When it ended.
        ended: Timestamp,
        /// How.
        result: HookResult,
        /// Its stdout tail.
        stdout_tail: Vec<u8>,
        /// Its stderr tail.
        stderr_tail: Vec<u8>,
    },
    /// Record an intent before its side effect. Precondition: the job exists, the id is new,
    /// and the intent has no outcome yet.
    PutIntent(Intent),
    /// Record an intent's outcome. Precondition: the intent exists and is open.
    Resolve {
        /// The intent.
        intent: IntentId,
        /// Its outcome.
        outcome: IntentOutcome,
        /// When.
        at: Timestamp,
    },
    /// Take a freeze lease. Precondition: the job exists, the id is new, and no lease is held on
    /// the same filesystem (`st_dev`).
    PutLease(Lease),
    /// Drop a lease. Precondition: it is held.
    DropLease(LeaseId),
    /// Insert an image. Precondition: the job exists and the id is new.
    PutImage(ImageRecord),
    /// Change an image's state. Precondition: its state is of kind `from`.
    SetImageState {
        /// The image.
        image: ImageId,
        /// The kind of state it must be in.
        from: ImageStateKind,
        /// Its new state.
        to: ImageState,
    },
    /// Record an image's checksums (CAT-03), in the transaction that makes it `Valid`.
    /// Precondition: the image exists and is `Incomplete`.
    SetImageChecksums {
        /// The image.
        image: ImageId,
        /// Its checksums.
        checksums: ImageChecksums,
    },
    /// Insert or replace a schedule. Precondition: with `replace` it exists, without it does
    /// not.
    PutSchedule {
        /// The schedule.
        schedule: ScheduleRow,
        /// Whether an existing schedule is replaced (CAL-10).
        replace: bool,
    },
    /// Insert or replace an event. Precondition: its schedule exists; with `replace` the id
    /// exists, without it the id is new; no other event has its name.
    PutEvent {
        /// The event.
        event: EventRow,
        /// Whether an existing event is replaced.
        replace: bool,
    },
    /// Enable or disable a schedule or an event (CAL-09). Precondition: it exists.
    SetEnabled {
        /// Which.
        what: Toggle,
        /// Enabled after.
        enabled: bool,
    },
    /// Ask a running attempt to stop (`jobs cancel`, JOB-11): the job keeps its state and
    /// records [`super::StopRequest`], which the process running the attempt looks for.
    /// Precondition: the job is `Active` at `attempt`. Asking again keeps the first request.
    RequestStop {
        /// The job.
        job: JobId,
        /// The attempt it must be at.
        attempt: u32,
        /// Why.
        reason: super::records::JobReason,
        /// When.
        at: Timestamp,
    },
    /// Remove a schedule. Precondition: it exists and no event uses it.
    RemoveSchedule {
        /// The schedule's name.
        name: String,
    },
    /// Remove an event with the occurrences recorded of it. Precondition: it exists, it is not
    /// NEWDAY (CAL-11), and no job names it (a job's history keeps its event until the history
    /// is trimmed; disable such an event instead).
    RemoveEvent {
        /// The event.
        event: EventId,
    },
    /// Record an occurrence that started no job (suppressed, activated, missed, schedule
    /// disabled). Precondition: the event exists, no occurrence of (event, due) yet, and the
    /// outcome is not `Started` (that is [`Change::InsertJob`]).
    RecordOccurrence(OccurrenceRow),
    /// Hand out the `n` ids `first`, `first + 1`, ... of `kind` in this list's own transaction,
    /// so that a list that creates rows needs no [`super::Store::allocate`] transaction before
    /// it: the caller reads [`super::Store::next_id`], names the ids in the changes after this
    /// one, and the ids are handed out exactly when the list commits. Precondition: none of
    /// them was handed out yet (the counter of `kind` is below `first`); the counter then
    /// stands at the last of them. A list that fails hands out nothing, so its ids must be used
    /// nowhere else.
    ReserveIds {
        /// Which counter.
        kind: IdKind,
        /// The first id.
        first: u64,
        /// How many (0 reserves nothing and always applies).
        n: u64,
    },
}

impl Change {
    /// Whether the change writes the calendar (schedules, events, their next occurrences,
    /// recorded occurrences): a commit with such a change moves
    /// [`super::Store::calendar_generation`] on by one.
    #[must_use]
    pub fn writes_calendar(&self) -> bool {
        matches!(
            self,
            Change::InsertJob { .. }
                | Change::AdvanceEvent { .. }
                | Change::PutSchedule { .. }
                | Change::PutEvent { .. }
                | Change::SetEnabled { .. }
                | Change::RemoveSchedule { .. }
                | Change::RemoveEvent { .. }
                | Change::RecordOccurrence(_)
        )
    }
}

/// What [`Change::SetEnabled`] switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Toggle {
    /// A schedule, by name.
    Schedule(String),
    /// An event.
    Event(EventId),
}

/// Which jobs [`super::Store::jobs`] lists; every `Some` narrows. Jobs come in id order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    /// Only jobs in states of these kinds.
    pub states: Option<Vec<JobStateKind>>,
    /// Only backup jobs of this plan.
    pub plan: Option<String>,
    /// Only jobs of this event.
    pub event: Option<EventId>,
    /// Only jobs of this backup day.
    pub backup_day: Option<BackupDay>,
}

impl JobQuery {
    /// Whether `job` is listed.
    #[must_use]
    pub fn matches(&self, job: &JobRecord) -> bool {
        self.states
            .as_ref()
            .is_none_or(|s| s.contains(&job.state.kind()))
            && self
                .plan
                .as_deref()
                .is_none_or(|p| job.kind.plan() == Some(p))
            && self.event.is_none_or(|e| job.event == e)
            && self.backup_day.is_none_or(|d| job.backup_day == d)
    }
}

/// Which images [`super::Store::images`] lists; every `Some` narrows. Images come in order of
/// T0, then id (the last one of a plan and source at or before an instant is CAT-06's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageQuery {
    /// Only images in states of these kinds.
    pub states: Option<Vec<ImageStateKind>>,
    /// Only images of this plan.
    pub plan: Option<String>,
    /// Only images whose source locator is this.
    pub source: Option<String>,
    /// Only images of this backup day.
    pub backup_day: Option<BackupDay>,
    /// Only images of this job.
    pub job: Option<JobId>,
    /// Only images with T0 at or before this (ms since the Unix epoch).
    pub t0_at_or_before_ms: Option<u64>,
}

impl ImageQuery {
    /// Whether `image` is listed.
    #[must_use]
    pub fn matches(&self, image: &ImageRecord) -> bool {
        self.states
            .as_ref()
            .is_none_or(|s| s.contains(&image.state.kind()))
            && self.plan.as_deref().is_none_or(|p| image.plan == p)
            && self
                .source
                .as_deref()
                .is_none_or(|s| image.source.locator == s)
            && self.backup_day.is_none_or(|d| image.backup_day == d)
            && self.job.is_none_or(|j| image.job == j)
            && self
                .t0_at_or_before_ms
                .is_none_or(|t| image.t0_unix_ms <= t)
    }
}

/// Which occurrences [`super::Store::occurrences`] lists; every `Some` narrows. They come in
/// order of due instant, then event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OccurrenceQuery {
    /// Only occurrences of this backup day.
    pub backup_day: Option<BackupDay>,
    /// Only occurrences of this event.
    pub event: Option<EventId>,
    /// Only occurrences due at or after this.
    pub due_from: Option<Timestamp>,
    /// Only occurrences due before this.
    pub due_before: Option<Timestamp>,
}

impl OccurrenceQuery {
    /// Whether `o` is listed.
    #[must_use]
    pub fn matches(&self, o: &OccurrenceRow) -> bool {
        self.backup_day.is_none_or(|d| o.backup_day == d)
            && self.event.is_none_or(|e| o.event == e)
            && self.due_from.is_none_or(|t| o.due >= t)
            && self.due_before.is_none_or(|t| o.due < t)
    }
}

/// The reads and writes [`apply`] needs, inside one transaction. Reads see the writes made
/// before them in the same transaction.
pub(crate) trait Tx {
    fn job(&mut self, id: JobId) -> Result<Option<JobRecord>, StoreError>;
    fn put_job(&mut self, job: &JobRecord, insert: bool) -> Result<(), StoreError>;
    fn task(&mut self, job: JobId, index: u32) -> Result<Option<TaskRecord>, StoreError>;
    fn put_task(&mut self, task: &TaskRecord, insert: bool) -> Result<(), StoreError>;
    fn hook_run(&mut self, key: &HookRunKey) -> Result<Option<HookRunRecord>, StoreError>;
    fn put_hook_run(&mut self, run: &HookRunRecord, insert: bool) -> Result<(), StoreError>;
    fn intent(&mut self, id: IntentId) -> Result<Option<Intent>, StoreError>;
    fn put_intent(&mut self, intent: &Intent, insert: bool) -> Result<(), StoreError>;
    fn lease(&mut self, id: LeaseId) -> Result<Option<Lease>, StoreError>;
    fn lease_on_dev(&mut self, st_dev: u64) -> Result<Option<Lease>, StoreError>;
    fn insert_lease(&mut self, lease: &Lease) -> Result<(), StoreError>;
    fn delete_lease(&mut self, id: LeaseId) -> Result<(), StoreError>;
    fn image(&mut self, id: ImageId) -> Result<Option<ImageRecord>, StoreError>;
    fn put_image(&mut self, image: &ImageRecord, insert: bool) -> Result<(), StoreError>;
    fn schedule(&mut self, name: &str) -> Result<Option<ScheduleRow>, StoreError>;
    fn put_schedule(&mut self, s: &ScheduleRow, insert: bool) -> Result<(), StoreError>;
    fn event(&mut self, id: EventId) -> Result<Option<EventRow>, StoreError>;
    fn event_named(&mut self, name: &str) -> Result<Option<EventId>, StoreError>;
    fn put_event(&mut self, e: &EventRow, insert: bool) -> Result<(), StoreError>;
    fn occurrence(
        &mut self,
        event: EventId,
        due: Timestamp,
    ) -> Result<Option<OccurrenceRow>, StoreError>;
    fn insert_occurrence(&mut self, o: &OccurrenceRow) -> Result<(), StoreError>;
    /// The names of the events that use schedule `name`.
    fn schedule_users(&mut self, name: &str) -> Result<Vec<String>, StoreError>;
    /// The jobs that name event `id`.
    fn event_jobs(&mut self, id: EventId) -> Result<Vec<JobId>, StoreError>;
    fn delete_schedule(&mut self, name: &str) -> Result<(), StoreError>;
    /// Delete an event and its occurrences.
    fn delete_event(&mut self, id: EventId) -> Result<(), StoreError>;
    /// The last id of `kind` handed out (0 when none was).
    fn id_counter(&mut self, kind: IdKind) -> Result<u64, StoreError>;
    /// Set the last id of `kind` handed out.
    fn set_id_counter(&mut self, kind: IdKind, last: u64) -> Result<(), StoreError>;
}

/// Check `change`'s precondition against `tx` and apply it; `index` is its place in the list,
/// named by a [`StoreError::Conflict`].
pub(crate) fn apply(tx: &mut impl Tx, index: usize, change: Change) -> Result<(), StoreError> {
    let conflict = |what: String| StoreError::Conflict {
        change: index,
        what,
    };
    match change {
        Change::ReserveIds { kind, first, n } => {
            if n == 0 {
                return Ok(());
            }
            let last = first
                .checked_add(n - 1)
                .filter(|_| first > 0)
                .ok_or_else(|| StoreError::Invalid {
                    change: index,
                    what: format!("{n} {} ids from {first}", kind.as_str()),
                })?;
            let counter = tx.id_counter(kind)?;
            if counter >= first {
                return Err(conflict(format!(
                    "{} id {first} was already handed out (the counter is {counter})",
                    kind.as_str()
                )));
            }
            tx.set_id_counter(kind, last)
        }
        Change::InsertJob { job, occurrence } => {
            if occurrence.event != job.event
                || occurrence.outcome != OccurrenceOutcome::Started(job.id)
            {
                return Err(StoreError::Invalid {
                    change: index,
                    what: format!(
                        "the occurrence of job {} must be of event {} with outcome Started({})",
                        job.id, job.event, job.id
                    ),
                });
            }
            if tx.job(job.id)?.is_some() {
                return Err(conflict(format!("job {} already exists", job.id)));
            }
            if tx.event(job.event)?.is_none() {
                return Err(conflict(format!("event {} does not exist", job.event)));
            }
            if let Some(o) = tx.occurrence(occurrence.event, occurrence.due)? {
                return Err(conflict(format!(
                    "the occurrence of event {} due {} is already recorded ({:?})",
                    o.event, o.due, o.outcome
                )));
            }
            tx.put_job(&job, true)?;
            tx.insert_occurrence(&occurrence)
        }
        Change::AdvanceEvent { event, from, to } => {
            let mut e = tx
                .event(event)?
                .ok_or_else(|| conflict(format!("event {event} does not exist")))?;
            // Compared as stored: to the millisecond.
            if e.next_due.map(to_ms) != from.map(to_ms) {
                return Err(conflict(format!(
                    "event {event} is next due {}, not {}",
                    show(e.next_due),
                    show(from)
                )));
            }
            e.next_due = to;
            tx.put_event(&e, false)
        }
        Change::Transition {
            job,
            from,
            attempt,
            to,
            to_attempt,
            owner,
            at,
        } => {
            let mut j = need_job(tx, index, job)?;
            if j.state.kind() != from || j.attempt != attempt {
                return Err(conflict(format!(
                    "job {job} is {} at attempt {}, not {} at attempt {attempt}",
                    j.state.kind().as_str(),
                    j.attempt,
                    from.as_str()
                )));
            }
            match to.kind() {
                // A phase change (Active to Active) keeps the attempt's start.
                JobStateKind::Active if from != JobStateKind::Active => j.started = Some(at),
                JobStateKind::Done | JobStateKind::Canceled => j.ended = Some(at),
                _ => {}
            }
            j.state = to;
            j.attempt = to_attempt;
            j.owner = owner;
            tx.put_job(&j, false)
        }
        Change::SetProgress {
            job,
            attempt,
            progress,
        } => {
            let mut j = need_job(tx, index, job)?;
            if j.state.kind() != JobStateKind::Active || j.attempt != attempt {
                return Err(conflict(format!(
                    "job {job} is {} at attempt {}, not active at attempt {attempt}",
                    j.state.kind().as_str(),
                    j.attempt
                )));
            }
            j.progress = Some(progress);
            tx.put_job(&j, false)
        }
        Change::PutTask(task) => {
            need_job(tx, index, task.job)?;
            if tx.task(task.job, task.index)?.is_some() {
                return Err(conflict(format!(
                    "task {} of job {} already exists",
                    task.index, task.job
                )));
            }
            tx.put_task(&task, true)
        }
        Change::UpdateTask {
            job,
            index: task,
            from,
            to,
            reason,
            message,
        } => {
            let mut t = tx
                .task(job, task)?
                .ok_or_else(|| conflict(format!("task {task} of job {job} does not exist")))?;
            if t.status != from {
                return Err(conflict(format!(
                    "task {task} of job {job} is {:?}, not {from:?}",
                    t.status
                )));
            }
            t.status = to;
            t.reason = reason;
            t.message = message;
            tx.put_task(&t, false)
        }
        Change::PutHookRun(run) => {
            need_job(tx, index, run.key.job)?;
            if tx.hook_run(&run.key)?.is_some() {
                return Err(conflict(format!(
                    "hook {} of job {} attempt {} task {:?} already started",
                    run.key.stage.as_str(),
                    run.key.job,
                    run.key.attempt,
                    run.key.task
                )));
            }
            tx.put_hook_run(&run, true)
        }
        Change::EndHookRun {
            key,
            ended,
            result,
            stdout_tail,
            stderr_tail,
        } => {
            let what = || {
                format!(
                    "hook {} of job {} attempt {} task {:?}",
                    key.stage.as_str(),
                    key.job,
                    key.attempt,
                    key.task
                )
            };
            let mut r = tx
                .hook_run(&key)?
                .ok_or_else(|| conflict(format!("{} never started", what())))?;
            if r.result.is_some() {
                return Err(conflict(format!("{} already ended", what())));
            }
            r.ended = Some(ended);
            r.result = Some(result);
            r.stdout_tail = stdout_tail;
            r.stderr_tail = stderr_tail;
            tx.put_hook_run(&r, false)
        }
        Change::PutIntent(intent) => {
            if intent.outcome.is_some() || intent.resolved.is_some() {
                return Err(StoreError::Invalid {
                    change: index,
                    what: format!("intent {} is put with an outcome", intent.id),
                });
            }
            need_job(tx, index, intent.job)?;
            if tx.intent(intent.id)?.is_some() {
                return Err(conflict(format!("intent {} already exists", intent.id)));
            }
            tx.put_intent(&intent, true)
        }
        Change::Resolve {
            intent,
            outcome,
            at,
        } => {
            let mut i = tx
                .intent(intent)?
                .ok_or_else(|| conflict(format!("intent {intent} does not exist")))?;
            if let Some(o) = &i.outcome {
                return Err(conflict(format!(
                    "intent {intent} is already resolved ({o:?})"
                )));
            }
            i.outcome = Some(outcome);
            i.resolved = Some(at);
            tx.put_intent(&i, false)
        }
        Change::PutLease(lease) => {
            need_job(tx, index, lease.job)?;
            if tx.lease(lease.id)?.is_some() {
                return Err(conflict(format!("lease {} already exists", lease.id)));
            }
            if let Some(l) = tx.lease_on_dev(lease.st_dev)? {
                return Err(conflict(format!(
                    "filesystem {} ({}) is already leased by job {} ({})",
                    lease.st_dev,
                    lease.mount.display(),
                    l.job,
                    l.id
                )));
            }
            tx.insert_lease(&lease)
        }
        Change::DropLease(id) => {
            if tx.lease(id)?.is_none() {
                return Err(conflict(format!("lease {id} is not held")));
            }
            tx.delete_lease(id)
        }
        Change::PutImage(image) => {
            need_job(tx, index, image.job)?;
            if tx.image(image.id)?.is_some() {
                return Err(conflict(format!("image {} already exists", image.id)));
            }
            tx.put_image(&image, true)
        }
        Change::SetImageState { image, from, to } => {
            let mut i = tx
                .image(image)?
                .ok_or_else(|| conflict(format!("image {image} does not exist")))?;
            if i.state.kind() != from {
                return Err(conflict(format!(
                    "image {image} is {}, not {}",
                    i.state.kind().as_str(),
                    from.as_str()
                )));
            }
            i.state = to;
            tx.put_image(&i, false)
        }
        Change::SetImageChecksums { image, checksums } => {
            let mut i = tx
                .image(image)?
                .ok_or_else(|| conflict(format!("image {image} does not exist")))?;
            if i.state.kind() != ImageStateKind::Incomplete {
                return Err(conflict(format!(
                    "image {image} is {}, not incomplete",
                    i.state.kind().as_str()
                )));
            }
            i.checksums = Some(checksums);
            tx.put_image(&i, false)
        }
        Change::PutSchedule { schedule, replace } => {
            let exists = tx.schedule(&schedule.name)?.is_some();
            if exists != replace {
                return Err(conflict(format!(
                    "schedule {:?} {}",
                    schedule.name,
                    if exists {
                        "already exists"
                    } else {
                        "does not exist"
                    }
                )));
            }
            tx.put_schedule(&schedule, !replace)
        }
        Change::PutEvent { event, replace } => {
            let exists = tx.event(event.id)?.is_some();
            if exists != replace {
                return Err(conflict(format!(
                    "event {} {}",
                    event.id,
                    if exists {
                        "already exists"
                    } else {
                        "does not exist"
                    }
                )));
            }
            if tx.schedule(&event.schedule)?.is_none() {
                return Err(conflict(format!(
                    "schedule {:?} of event {} does not exist",
                    event.schedule, event.id
                )));
            }
            if let Some(other) = tx.event_named(&event.name)? {
                if other != event.id {
                    return Err(conflict(format!(
                        "event name {:?} is taken by {other}",
                        event.name
                    )));
                }
            }
            tx.put_event(&event, !replace)
        }
        Change::SetEnabled { what, enabled } => match what {
            Toggle::Schedule(name) => {
                let mut s = tx
                    .schedule(&name)?
                    .ok_or_else(|| conflict(format!("schedule {name:?} does not exist")))?;
                s.enabled = enabled;
                tx.put_schedule(&s, false)
            }
            Toggle::Event(id) => {
                let mut e = tx
                    .event(id)?
                    .ok_or_else(|| conflict(format!("event {id} does not exist")))?;
                e.enabled = enabled;
                tx.put_event(&e, false)
            }
        },
        Change::RequestStop {
            job,
            attempt,
            reason,
            at,
        } => {
            let mut j = need_job(tx, index, job)?;
            if j.state.kind() != JobStateKind::Active || j.attempt != attempt {
                return Err(conflict(format!(
                    "job {job} is {} at attempt {}, not active at attempt {attempt}",
                    j.state.kind().as_str(),
                    j.attempt
                )));
            }
            if j.stop_requested
                .as_ref()
                .is_some_and(|r| r.attempt == attempt)
            {
                return Ok(());
            }
            j.stop_requested = Some(super::records::StopRequest {
                attempt,
                reason,
                at,
            });
            tx.put_job(&j, false)
        }
        Change::RemoveSchedule { name } => {
            if tx.schedule(&name)?.is_none() {
                return Err(conflict(format!("schedule {name:?} does not exist")));
            }
            let users = tx.schedule_users(&name)?;
            if !users.is_empty() {
                return Err(conflict(format!(
                    "schedule {name:?} is used by events {}",
                    users.join(", ")
                )));
            }
            tx.delete_schedule(&name)
        }
        Change::RemoveEvent { event } => {
            let e = tx
                .event(event)?
                .ok_or_else(|| conflict(format!("event {event} does not exist")))?;
            if e.kind == super::records::EventKind::Newday {
                return Err(conflict(format!(
                    "event {event} is NEWDAY, which cannot be removed"
                )));
            }
            let jobs = tx.event_jobs(event)?;
            if let Some(first) = jobs.first() {
                return Err(conflict(format!(
                    "event {event} has {} job(s) in the history (first {first})",
                    jobs.len()
                )));
            }
            tx.delete_event(event)
        }
        Change::RecordOccurrence(o) => {
            if matches!(o.outcome, OccurrenceOutcome::Started(_)) {
                return Err(StoreError::Invalid {
                    change: index,
                    what: "an occurrence that started a job is recorded by InsertJob".to_string(),
                });
            }
            if tx.event(o.event)?.is_none() {
                return Err(conflict(format!("event {} does not exist", o.event)));
            }
            if let Some(old) = tx.occurrence(o.event, o.due)? {
                return Err(conflict(format!(
                    "the occurrence of event {} due {} is already recorded ({:?})",
                    o.event, o.due, old.outcome
                )));
            }
            tx.insert_occurrence(&o)
        }
    }
}

fn need_job(tx: &mut impl Tx, index: usize, id: JobId) -> Result<JobRecord, StoreError> {
    tx.job(id)?.ok_or_else(|| StoreError::Conflict {
        change: index,
        what: format!("job {id} does not exist"),
    })
}

fn show(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "never".to_string(), |t| t.to_string())
}
