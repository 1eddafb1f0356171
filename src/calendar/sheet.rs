//! The calendar sheet of one backup day (CAL-17): every occurrence of every event in the day,
//! the decided ones with what became of them and the ones still to come with what would become
//! of them as the calendar stands.
//!
//! An occurrence is *decided* when the store has its row (started a job, suppressed, activated,
//! missed, schedule disabled); it is *to come* when it lies at or after its event's `next_due`.
//! Occurrences before an event's `next_due` with no row (the event did not exist yet, or was
//! disabled then) are not on the sheet. What is to come is judged as the scheduler will judge
//! it, with the events that ran in the day and those still scheduled in it.

use jiff::Timestamp;

use super::day::DayBounds;
use super::decide::{verdict, CalendarView, DayIndex, Event, OccurrenceOutcome, Pending, Verdict};
use crate::limits::OCCURRENCES_PER_EVENT_MAX;
use crate::store::{EventId, EventKind, Priority};

/// Where an occurrence on the sheet stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SheetEntry {
    /// Decided: what became of it (a started job's state is the job's record).
    Decided(OccurrenceOutcome),
    /// To come: what would become of it.
    ToCome(Verdict),
}

/// One occurrence on the sheet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SheetLine {
    /// The event.
    pub event: EventId,
    /// Its name.
    pub name: String,
    /// Its priority.
    pub priority: Priority,
    /// Whether it is a blocking event.
    pub blocking: bool,
    /// Whether it is NEWDAY.
    pub newday: bool,
    /// The occurrence.
    pub due: Timestamp,
    /// Where it stands.
    pub entry: SheetEntry,
}

/// The sheet of backup day `day` (see [`super::BackupDays::of_day`]): its occurrences in order
/// of due instant (NEWDAY first among equals, then by event id); at most
/// `OCCURRENCES_PER_EVENT_MAX` occurrences to come of one event.
#[must_use]
pub fn sheet(view: &CalendarView, day: DayBounds) -> Vec<SheetLine> {
    let index = DayIndex::build(view, day, Pending::FromNextDue);
    let mut lines = Vec::new();
    let line = |e: &Event, due: Timestamp, entry: SheetEntry| SheetLine {
        event: e.id,
        name: e.name.clone(),
        priority: e.priority,
        blocking: e.blocking,
        newday: e.kind == EventKind::Newday,
        due,
        entry,
    };
    for o in view.occurrences() {
        if o.backup_day != day.day {
            continue;
        }
        if let Some(e) = view.events().get(&o.event) {
            lines.push(line(e, o.due, SheetEntry::Decided(o.outcome)));
        }
    }
    for e in view.events().values() {
        let (Some(next_due), Some(schedule)) = (e.next_due, view.schedules().get(&e.schedule))
        else {
            continue;
        };
        let mut due = schedule.next_at_or_after(next_due.max(day.start));
        let mut count = 0;
        while let Some(t) = due.filter(|t| day.contains(*t)) {
            if count == OCCURRENCES_PER_EVENT_MAX {
                break;
            }
            let decided = view
                .occurrences()
                .iter()
                .any(|o| o.event == e.id && o.due == t);
            if !decided {
                let v = verdict(view, e, schedule.enabled, t, &index);
                lines.push(line(e, t, SheetEntry::ToCome(v)));
                count += 1;
            }
            due = schedule.next_after(t);
        }
    }
    lines.sort_by_key(|l| (l.due, !l.newday, l.event));
    lines
}
