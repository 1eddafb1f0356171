//! The backup day (CAL-11, CAL-12, CAL-13): the interval between two NEWDAY occurrences, named
//! by the civil date, in NEWDAY's zone, of the NEWDAY that opens it.
//!
//! With NEWDAY daily at 08:00 the backup day 20070910 runs from 2007-09-10 08:00 to
//! 2007-09-11 08:00, so a job due at 2007-09-11 00:40 carries `20070910`; a NEWDAY that skips
//! Saturday and Sunday makes Friday's backup day last until Monday 08:00.
//!
//! Before the first NEWDAY occurrence (a NEWDAY schedule whose anchor lies ahead, or one with
//! no occurrence in the last `CALENDAR_LOOKBACK_DAYS_MAX` days) the backup day is the civil date
//! in NEWDAY's zone, from its midnight to the next midnight or the first NEWDAY, whichever
//! comes first. Backup days never go back as time moves on.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use super::recurrence::{resolve, Schedule};
use crate::store::BackupDay;

/// One backup day: its name and its instants `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DayBounds {
    /// The civil date of the NEWDAY that opened it.
    pub day: BackupDay,
    /// The NEWDAY occurrence that opened it.
    pub start: Timestamp,
    /// The next NEWDAY occurrence (`None`: NEWDAY has no further occurrence).
    pub end: Option<Timestamp>,
}

impl DayBounds {
    /// Whether `t` lies in `[start, end)`.
    #[must_use]
    pub fn contains(&self, t: Timestamp) -> bool {
        t >= self.start && self.end.is_none_or(|e| t < e)
    }
}

/// Backup days as NEWDAY's schedule makes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDays {
    newday: Schedule,
}

impl BackupDays {
    /// Backup days opened by the occurrences of `newday` (its `enabled` flag is not looked at:
    /// a disabled NEWDAY skips its work, the days still follow its recurrence).
    #[must_use]
    pub fn new(newday: Schedule) -> BackupDays {
        BackupDays { newday }
    }

    /// NEWDAY's schedule.
    #[must_use]
    pub fn schedule(&self) -> &Schedule {
        &self.newday
    }

    /// The backup day `t` belongs to.
    #[must_use]
    pub fn day(&self, t: Timestamp) -> BackupDay {
        self.bounds(t).day
    }

    /// The backup day `t` belongs to, with its bounds.
    #[must_use]
    pub fn bounds(&self, t: Timestamp) -> DayBounds {
        let zone = &self.newday.zone;
        match self.newday.last_at_or_before(t) {
            Some(start) => DayBounds {
                day: BackupDay(start.to_zoned(zone.clone()).date()),
                start,
                end: self.newday.next_after(start),
            },
            None => {
                let date = t.to_zoned(zone.clone()).date();
                let start = midnight(zone, date).unwrap_or(t).min(t);
                let next_midnight = date.tomorrow().ok().and_then(|d| midnight(zone, d));
                let first_newday = self.newday.next_after(t);
                let end = match (next_midnight, first_newday) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                DayBounds {
                    day: BackupDay(date),
                    start,
                    end,
                }
            }
        }
    }

    /// The bounds of the backup day named `day`: the one a NEWDAY on that date opens, or, before
    /// the first NEWDAY, the civil date. `None` when no backup day has that name (a date on which
    /// NEWDAY does not run, such as a Saturday when NEWDAY skips the weekend).
    #[must_use]
    pub fn of_day(&self, day: BackupDay) -> Option<DayBounds> {
        let zone = &self.newday.zone;
        let start = midnight(zone, day.0)?;
        if let Some(t) = self.newday.next_at_or_after(start) {
            if t.to_zoned(zone.clone()).date() == day.0 {
                let b = self.bounds(t);
                if b.day == day {
                    return Some(b);
                }
            }
        }
        let b = self.bounds(start);
        (b.day == day).then_some(b)
    }

    /// The backup day that ended just before `t` (the day a NEWDAY at `t` closes).
    #[must_use]
    pub fn day_before(&self, t: Timestamp) -> BackupDay {
        match t.checked_sub(SignedDuration::from_nanos(1)) {
            Ok(before) => self.day(before),
            Err(_) => self.day(t),
        }
    }
}

/// The first instant of `date` in `zone`.
fn midnight(zone: &TimeZone, date: Date) -> Option<Timestamp> {
    resolve(zone, date.to_datetime(jiff::civil::Time::midnight()))
}
