//! Events, the calendar view, and the scheduler's decisions as a pure function of the view and
//! the current instant (CAL-02, CAL-04..CAL-10, CAL-15, CAL-18, CAL-19).
//!
//! [`decide`] looks at every enabled event whose `next_due` has come and gives each of its due
//! occurrences exactly one outcome, then advances `next_due` to the first occurrence after the
//! last one it decided. The caller records the outcomes and the advance in one transaction
//! (creating a job for each [`Decision::Start`]); calling [`decide`] again on the updated view at
//! the same instant yields nothing, so a restart at any point neither loses nor repeats an
//! occurrence.
//!
//! An occurrence `o` of event `E` that is due (`o <= now`) gets, in this order:
//! 1. `Missed` when `o` lies in an earlier backup day than `now` (the daemon was down; NEWDAY
//!    has cancelled that day's pending work), or when a later occurrence of `E` is also due
//!    (within the current backup day a missed occurrence runs once, at the latest due time);
//! 2. for the NEWDAY event, `Newday` (or `ScheduleDisabled` when its schedule is off);
//! 3. `ScheduleDisabled` when `E`'s schedule is disabled;
//! 4. `Suppressed { by }` when a similar event of strictly higher priority has run, or is still
//!    scheduled, in `o`'s backup day (`by` is the highest such event, the lowest id among
//!    equals); priority 0 is never suppressed and counts for nothing;
//! 5. `Activated` for a blocking event, else `Start`.
//!
//! Disabled events are not looked at; [`reschedule_event`] gives an event that is enabled again
//! its next occurrence after now, and [`reschedule`] does the same for every event of an edited
//! schedule, so neither ever starts anything at once (CAL-10).

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;

use super::day::{BackupDays, DayBounds};
use super::recurrence::Schedule;
use super::CalendarError;
use crate::limits::OCCURRENCES_PER_EVENT_MAX;
use crate::store::{BackupDay, EventId, JobId, Priority};

/// What an event does when it runs: the store's type, as the store records it.
pub use crate::store::EventKind;

/// The kind part of a similarity key: events of different kinds are never similar (CAL-06).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KindTag {
    /// A plan event.
    Plan,
    /// A command event.
    Command,
    /// A maintenance event.
    Maintenance,
}

impl EventKind {
    /// What makes two events similar (CAL-06): the same plan, the same command name, the same
    /// maintenance destination. NEWDAY is similar to nothing.
    #[must_use]
    pub fn similarity(&self) -> Option<(KindTag, &str)> {
        match self {
            EventKind::Plan { plan } => Some((KindTag::Plan, plan)),
            EventKind::Command { name, .. } => Some((KindTag::Command, name)),
            EventKind::Maintenance { dest } => Some((KindTag::Maintenance, dest)),
            EventKind::Newday => None,
        }
    }
}

/// A calendar event: what starts, on which schedule, at which priority (the store's row, as
/// the store records it: CAL-04 priorities, CAL-08 blocking, CAL-09 enabled, the next
/// occurrence not yet decided).
pub use crate::store::EventRow as Event;

/// What became of an occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OccurrenceOutcome {
    /// A job was created for it.
    Started(JobId),
    /// A similar event of higher priority had the backup day.
    Suppressed {
        /// That event.
        by: EventId,
    },
    /// A blocking event's occurrence: no job.
    Activated,
    /// Due in an earlier backup day, or superseded by a later due occurrence of the same event.
    Missed,
    /// Its schedule was disabled.
    ScheduleDisabled,
}

/// An occurrence already decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Occurrence {
    /// The event.
    pub event: EventId,
    /// When it was due.
    pub due: Timestamp,
    /// Its backup day.
    pub backup_day: BackupDay,
    /// What became of it.
    pub outcome: OccurrenceOutcome,
}

/// One decision of the scheduler; the caller records each occurrence's outcome and the
/// advances in one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Create a job for this occurrence.
    Start {
        /// The event.
        event: EventId,
        /// The occurrence.
        due: Timestamp,
        /// The job's backup day.
        backup_day: BackupDay,
    },
    /// Record the occurrence suppressed.
    Suppressed {
        /// The event.
        event: EventId,
        /// The occurrence.
        due: Timestamp,
        /// The similar event of higher priority.
        by: EventId,
    },
    /// A blocking event's occurrence: record it, start nothing.
    Activated {
        /// The event.
        event: EventId,
        /// The occurrence.
        due: Timestamp,
    },
    /// The event's schedule is disabled: record it, start nothing.
    ScheduleDisabled {
        /// The event.
        event: EventId,
        /// The occurrence.
        due: Timestamp,
    },
    /// Record the occurrence missed.
    Missed {
        /// The event.
        event: EventId,
        /// The occurrence.
        due: Timestamp,
    },
    /// NEWDAY: close `ending` and open `starting` (the job layer runs CAL-14).
    Newday {
        /// The NEWDAY event.
        event: EventId,
        /// The occurrence.
        due: Timestamp,
        /// The backup day that ends.
        ending: BackupDay,
        /// The backup day that starts.
        starting: BackupDay,
    },
    /// Move the event's `next_due` from `from` to `to` (a compare-and-set).
    Advance {
        /// The event.
        event: EventId,
        /// Its `next_due` as read.
        from: Option<Timestamp>,
        /// Its new `next_due`.
        to: Option<Timestamp>,
    },
}

impl Decision {
    /// The event and occurrence this decision gives an outcome to (`None` for `Advance`).
    #[must_use]
    pub fn occurrence(&self) -> Option<(EventId, Timestamp)> {
        match *self {
            Decision::Start { event, due, .. }
            | Decision::Suppressed { event, due, .. }
            | Decision::Activated { event, due }
            | Decision::ScheduleDisabled { event, due }
            | Decision::Missed { event, due }
            | Decision::Newday { event, due, .. } => Some((event, due)),
            Decision::Advance { .. } => None,
        }
    }
}

/// What the calendar knows: schedules, events and the occurrences already decided (at least
/// those of the backup days being decided).
#[derive(Debug, Clone)]
pub struct CalendarView {
    schedules: BTreeMap<String, Schedule>,
    events: BTreeMap<EventId, Event>,
    occurrences: Vec<Occurrence>,
    newday: EventId,
    days: BackupDays,
    /// Per event, the dues of its occurrences that ran (started or activated), sorted.
    ran: HashMap<EventId, Vec<Timestamp>>,
}

impl CalendarView {
    /// A view over these records.
    ///
    /// # Errors
    /// [`CalendarError`] when two schedules or events share a name or id, an event names a
    /// schedule that does not exist, or there is not exactly one NEWDAY event.
    pub fn new(
        schedules: Vec<Schedule>,
        events: Vec<Event>,
        occurrences: Vec<Occurrence>,
    ) -> Result<CalendarView, CalendarError> {
        let mut by_name = BTreeMap::new();
        for s in schedules {
            if by_name.contains_key(&s.name) {
                return Err(CalendarError::DuplicateSchedule(s.name));
            }
            by_name.insert(s.name.clone(), s);
        }
        let mut by_id = BTreeMap::new();
        let mut newdays = Vec::new();
        for e in events {
            if !by_name.contains_key(&e.schedule) {
                return Err(CalendarError::UnknownSchedule {
                    event: e.id,
                    schedule: e.schedule,
                });
            }
            if e.kind == EventKind::Newday {
                newdays.push(e.id);
            }
            if by_id.contains_key(&e.id) {
                return Err(CalendarError::DuplicateEvent(e.id));
            }
            by_id.insert(e.id, e);
        }
        let [newday] = newdays[..] else {
            return Err(CalendarError::NewdayCount(newdays.len()));
        };
        let newday_schedule = by_id
            .get(&newday)
            .and_then(|e: &Event| by_name.get(&e.schedule))
            .cloned()
            .ok_or(CalendarError::NewdayCount(0))?;
        let mut ran: HashMap<EventId, Vec<Timestamp>> = HashMap::new();
        for o in &occurrences {
            if matches!(
                o.outcome,
                OccurrenceOutcome::Started(_) | OccurrenceOutcome::Activated
            ) {
                ran.entry(o.event).or_default().push(o.due);
            }
        }
        for dues in ran.values_mut() {
            dues.sort_unstable();
        }
        Ok(CalendarView {
            schedules: by_name,
            events: by_id,
            occurrences,
            newday,
            days: BackupDays::new(newday_schedule),
            ran,
        })
    }

    /// The schedules by name.
    #[must_use]
    pub fn schedules(&self) -> &BTreeMap<String, Schedule> {
        &self.schedules
    }

    /// The events by id.
    #[must_use]
    pub fn events(&self) -> &BTreeMap<EventId, Event> {
        &self.events
    }

    /// The occurrences already decided.
    #[must_use]
    pub fn occurrences(&self) -> &[Occurrence] {
        &self.occurrences
    }

    /// The NEWDAY event's id.
    #[must_use]
    pub fn newday(&self) -> EventId {
        self.newday
    }

    /// The backup days NEWDAY's schedule makes.
    #[must_use]
    pub fn backup_days(&self) -> &BackupDays {
        &self.days
    }

    /// The backup day of `t`.
    #[must_use]
    pub fn backup_day(&self, t: Timestamp) -> BackupDay {
        self.days.day(t)
    }

    /// An event's schedule (every event has one: [`CalendarView::new`] checks it).
    fn schedule_of(&self, e: &Event) -> Option<&Schedule> {
        self.schedules.get(&e.schedule)
    }

    /// Move event `event`'s next occurrence to `to`, as a committed [`Decision::Advance`]
    /// did (a view kept between passes follows its own commits this way); nothing when the view
    /// has no such event.
    pub fn set_next_due(&mut self, event: EventId, to: Option<Timestamp>) {
        if let Some(e) = self.events.get_mut(&event) {
            e.next_due = to;
        }
    }

    /// Add an occurrence that was recorded after the view was built.
    pub fn record(&mut self, o: Occurrence) {
        if matches!(
            o.outcome,
            OccurrenceOutcome::Started(_) | OccurrenceOutcome::Activated
        ) {
            let dues = self.ran.entry(o.event).or_default();
            let i = dues.partition_point(|d| *d < o.due);
            dues.insert(i, o.due);
        }
        self.occurrences.push(o);
    }

    /// Whether `e` has an occurrence that ran in `[start, end)`.
    fn ran_in(&self, e: EventId, day: &DayBounds) -> bool {
        self.ran.get(&e).is_some_and(|dues| {
            let i = dues.partition_point(|d| *d < day.start);
            dues.get(i).is_some_and(|d| day.contains(*d))
        })
    }
}

/// Which occurrences count as "scheduled" when a day index is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Those not yet decided: at or after each event's `next_due` (the scheduler).
    FromNextDue,
    /// Every occurrence of the day by the schedules (`schedule due --at`, a day to come).
    WholeDay,
}

/// Per backup day, the highest priority among the events that have an occurrence in it, by
/// similarity key (docs/orchestration.md 3.3): an event counts when an occurrence of it ran in
/// the day or one is still scheduled in it (enabled event, enabled schedule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayIndex {
    /// The day.
    pub day: DayBounds,
    highest: HashMap<(KindTag, String), (Priority, EventId)>,
}

impl DayIndex {
    /// Builds the index of `day`: one look at the recorded runs and one `next_at_or_after` per
    /// event.
    #[must_use]
    pub fn build(view: &CalendarView, day: DayBounds, pending: Pending) -> DayIndex {
        let mut highest: HashMap<(KindTag, String), (Priority, EventId)> = HashMap::new();
        for e in view.events.values() {
            let Some((tag, key)) = e.kind.similarity() else {
                continue;
            };
            if e.priority.is_always() {
                continue;
            }
            let counts = view.ran_in(e.id, &day) || scheduled_in(view, e, &day, pending);
            if !counts {
                continue;
            }
            let slot = highest
                .entry((tag, key.to_string()))
                .or_insert((e.priority, e.id));
            if e.priority > slot.0 || (e.priority == slot.0 && e.id < slot.1) {
                *slot = (e.priority, e.id);
            }
        }
        DayIndex { day, highest }
    }

    /// The similar event of strictly higher priority than `e` in the day, if any (never for
    /// priority 0).
    #[must_use]
    pub fn suppressor(&self, e: &Event) -> Option<(EventId, Priority)> {
        if e.priority.is_always() {
            return None;
        }
        let (tag, key) = e.kind.similarity()?;
        let &(p, by) = self.highest.get(&(tag, key.to_string()))?;
        (p > e.priority).then_some((by, p))
    }
}

fn scheduled_in(view: &CalendarView, e: &Event, day: &DayBounds, pending: Pending) -> bool {
    let Some(schedule) = view.schedule_of(e) else {
        return false;
    };
    if !e.enabled || !schedule.enabled {
        return false;
    }
    let from = match pending {
        Pending::WholeDay => day.start,
        Pending::FromNextDue => match e.next_due {
            // The next occurrence to be decided is `next_due` itself ([`decide`] starts there):
            // no look at the schedule.
            Some(d) if d >= day.start => return day.contains(d),
            Some(_) => day.start,
            None => return false,
        },
    };
    schedule
        .next_at_or_after(from)
        .is_some_and(|o| day.contains(o))
}

/// What an occurrence that is neither missed nor superseded becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// A job starts, in this backup day.
    Start {
        /// Its backup day.
        backup_day: BackupDay,
    },
    /// A similar event of higher priority has the day.
    Suppressed {
        /// That event.
        by: EventId,
        /// Its priority.
        by_priority: Priority,
    },
    /// A blocking event: recorded, no job.
    Activated,
    /// The schedule is disabled.
    ScheduleDisabled,
    /// The event is disabled (only [`due_at`] says this; [`decide`] skips such events).
    EventDisabled,
    /// NEWDAY closes `ending` and opens `starting`.
    Newday {
        /// The backup day that ends.
        ending: BackupDay,
        /// The backup day that starts.
        starting: BackupDay,
    },
}

/// The verdict for occurrence `due` of `e`, with `index` the index of `due`'s backup day.
pub(super) fn verdict(
    view: &CalendarView,
    e: &Event,
    schedule_enabled: bool,
    due: Timestamp,
    index: &DayIndex,
) -> Verdict {
    if !e.enabled {
        return Verdict::EventDisabled;
    }
    if !schedule_enabled {
        return Verdict::ScheduleDisabled;
    }
    if e.kind == EventKind::Newday {
        return Verdict::Newday {
            ending: view.days.day_before(due),
            starting: index.day.day,
        };
    }
    if let Some((by, by_priority)) = index.suppressor(e) {
        return Verdict::Suppressed { by, by_priority };
    }
    if e.blocking {
        Verdict::Activated
    } else {
        Verdict::Start {
            backup_day: index.day.day,
        }
    }
}

/// The scheduler's decisions at `now`: one outcome for each due occurrence of each enabled
/// event, then one `Advance` per event looked at. Outcomes come in order of due time (NEWDAY
/// first among equals, then by event id); at most `OCCURRENCES_PER_EVENT_MAX` occurrences of one
/// event are decided per call (the `Advance` then stays at or before `now`: call again).
#[must_use]
pub fn decide(view: &CalendarView, now: Timestamp) -> Vec<Decision> {
    let today = view.days.bounds(now);
    let mut index: Option<DayIndex> = None;
    let mut outcomes: Vec<(Timestamp, bool, EventId, Decision)> = Vec::new();
    let mut advances = Vec::new();
    for e in view.events.values() {
        let (Some(first), true) = (e.next_due, e.enabled) else {
            continue;
        };
        if first > now {
            continue;
        }
        let Some(schedule) = view.schedule_of(e) else {
            continue;
        };
        let mut due = first;
        let mut decided = 0usize;
        let to = loop {
            let next = schedule.next_after(due);
            let superseded = next.is_some_and(|n| n <= now);
            let decision = if due < today.start || superseded {
                Decision::Missed { event: e.id, due }
            } else {
                // Neither missed nor superseded: `due` lies in today's backup day.
                let index =
                    index.get_or_insert_with(|| DayIndex::build(view, today, Pending::FromNextDue));
                match verdict(view, e, schedule.enabled, due, index) {
                    Verdict::Start { backup_day } => Decision::Start {
                        event: e.id,
                        due,
                        backup_day,
                    },
                    Verdict::Suppressed { by, .. } => Decision::Suppressed {
                        event: e.id,
                        due,
                        by,
                    },
                    Verdict::Activated => Decision::Activated { event: e.id, due },
                    Verdict::ScheduleDisabled | Verdict::EventDisabled => {
                        Decision::ScheduleDisabled { event: e.id, due }
                    }
                    Verdict::Newday { ending, starting } => Decision::Newday {
                        event: e.id,
                        due,
                        ending,
                        starting,
                    },
                }
            };
            let is_newday = matches!(decision, Decision::Newday { .. });
            outcomes.push((due, !is_newday, e.id, decision));
            decided += 1;
            match next {
                Some(n) if n <= now && decided < OCCURRENCES_PER_EVENT_MAX => due = n,
                _ => break next,
            }
        };
        advances.push(Decision::Advance {
            event: e.id,
            from: e.next_due,
            to,
        });
    }
    outcomes.sort_by_key(|(due, not_newday, id, _)| (*due, *not_newday, *id));
    outcomes
        .into_iter()
        .map(|(_, _, _, d)| d)
        .chain(advances)
        .collect()
}

/// One line of `schedule due --at T`: an event with an occurrence at exactly `T` and what would
/// become of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueAt {
    /// The event.
    pub event: EventId,
    /// Its name.
    pub name: String,
    /// Its priority.
    pub priority: Priority,
    /// The occurrence (`T`).
    pub due: Timestamp,
    /// What would become of it.
    pub verdict: Verdict,
}

/// What would start at `t` and why every other event with an occurrence at `t` would not
/// (CAL-18); writes nothing. Every occurrence of `t`'s backup day counts as scheduled, whether
/// or not `t` has been reached, besides the occurrences recorded as run.
#[must_use]
pub fn due_at(view: &CalendarView, t: Timestamp) -> Vec<DueAt> {
    let index = DayIndex::build(view, view.days.bounds(t), Pending::WholeDay);
    let mut out = Vec::new();
    for e in view.events.values() {
        let Some(schedule) = view.schedule_of(e) else {
            continue;
        };
        if schedule.next_at_or_after(t) != Some(t) {
            continue;
        }
        out.push(DueAt {
            event: e.id,
            name: e.name.clone(),
            priority: e.priority,
            due: t,
            verdict: verdict(view, e, schedule.enabled, t, &index),
        });
    }
    out.sort_by_key(|d| (!matches!(d.verdict, Verdict::Newday { .. }), d.event));
    out
}

/// After schedule `name` was edited (now `schedule`), each of its events' next occurrence
/// strictly after `now` (CAL-10): nothing runs at once, whatever the new schedule says.
///
/// # Errors
/// [`CalendarError::UnknownScheduleName`] when no schedule has that name.
pub fn reschedule(
    view: &CalendarView,
    schedule: &Schedule,
    now: Timestamp,
) -> Result<Vec<Decision>, CalendarError> {
    if !view.schedules.contains_key(&schedule.name) {
        return Err(CalendarError::UnknownScheduleName(schedule.name.clone()));
    }
    let to = schedule.next_after(now);
    Ok(view
        .events
        .values()
        .filter(|e| e.schedule == schedule.name)
        .map(|e| Decision::Advance {
            event: e.id,
            from: e.next_due,
            to,
        })
        .collect())
}

/// An event (new, or enabled again) gets its next occurrence strictly after `now`.
///
/// # Errors
/// [`CalendarError::UnknownEvent`] when the view has no such event.
pub fn reschedule_event(
    view: &CalendarView,
    event: EventId,
    now: Timestamp,
) -> Result<Decision, CalendarError> {
    let e = view
        .events
        .get(&event)
        .ok_or(CalendarError::UnknownEvent(event))?;
    let to = view.schedule_of(e).and_then(|s| s.next_after(now));
    Ok(Decision::Advance {
        event,
        from: e.next_due,
        to,
    })
}
