//! The calendar (docs/orchestration.md, section 2 "Calendar", 3.3): schedules and their
//! recurrences, events, the backup day, suppression by priority, and the scheduler's decisions.
//!
//! Everything here is pure logic over an in-memory [`CalendarView`]: [`decide`] says what
//! happens to each due occurrence, the caller (the daemon, with the store) records it and
//! creates the jobs. Layout: `recurrence` (schedules, parsing, next occurrence, DST), `day`
//! (backup days from NEWDAY), `decide` (events, the day index, decisions, `due_at`), `sheet`
//! (the calendar sheet of a backup day).

mod day;
mod decide;
mod recurrence;
mod sheet;

#[cfg(test)]
mod tests;

pub use day::{BackupDays, DayBounds};
pub use decide::{
    decide, due_at, reschedule, reschedule_event, CalendarView, DayIndex, Decision, DueAt, Event,
    EventKind, KindTag, Occurrence, OccurrenceOutcome, Pending, Verdict,
};
pub use recurrence::{parse_time, Recurrence, RecurrenceError, Schedule, Unit};
pub use sheet::{sheet, SheetEntry, SheetLine};

use crate::store::EventId;

/// The name of NEWDAY's default schedule.
pub const NEWDAY_SCHEDULE: &str = "NEWDAY";

/// NEWDAY's default schedule: daily at 08:00 in `zone` (CAL-11).
#[must_use]
pub fn default_newday_schedule(zone: jiff::tz::TimeZone) -> Schedule {
    Schedule {
        name: NEWDAY_SCHEDULE.to_string(),
        recurrence: Recurrence::Cron(
            "0 8 * * *"
                .parse()
                .expect("the default NEWDAY expression is valid cron"),
        ),
        zone,
        enabled: true,
    }
}

/// Why a calendar view could not be built or a change not computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    /// Two schedules with one name.
    #[error("schedule {0:?} exists twice")]
    DuplicateSchedule(String),
    /// Two events with one id.
    #[error("event {0} exists twice")]
    DuplicateEvent(EventId),
    /// An event names a schedule that does not exist.
    #[error("event {event} uses schedule {schedule:?}, which does not exist")]
    UnknownSchedule {
        /// The event.
        event: EventId,
        /// The schedule it names.
        schedule: String,
    },
    /// No schedule has this name.
    #[error("no schedule {0:?}")]
    UnknownScheduleName(String),
    /// No event has this id.
    #[error("no event {0}")]
    UnknownEvent(EventId),
    /// There must be exactly one NEWDAY event.
    #[error("the calendar needs exactly one NEWDAY event, it has {0}")]
    NewdayCount(usize),
}
