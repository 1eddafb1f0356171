//! Schedules and their recurrences: cron expressions, `every N UNIT from ANCHOR`, `once TIME`,
//! and the next occurrence strictly after an instant (CAL-01, CAL-16).
//!
//! # Daylight saving time (CAL-16)
//! One rule for every recurrence, in the schedule's zone:
//! - A wall clock time that a day falls to skip (the spring-forward gap) runs at the first instant
//!   after the gap when the schedule names that time (daily 02:30 in Europe/Berlin runs at 03:00
//!   on the spring-forward day); a schedule that only *steps through* the gap (every 15 minutes)
//!   simply has no occurrence inside it.
//! - A wall clock time that a day repeats (the fall-back fold) runs once, in the first pass, when
//!   the schedule names that time; a schedule stepping through the fold runs in both passes.
//!
//! Cron expressions are evaluated by croner, whose rules are exactly these: a *fixed-time*
//! expression (one value each for second, minute and hour) is carried past a gap and runs in the
//! first pass of a fold only; any other expression (steps, lists, ranges, wildcards in the time
//! fields) matches the wall clock as it is, so it skips the gap and matches both passes.
//! `every` with minutes or hours steps along absolute time from the anchor, which skips the gap
//! and runs in both passes by itself; `every` with days, weeks, months or years steps along the
//! civil calendar in the zone from the anchor's wall clock time and resolves each step by the
//! fixed-time rule above.
//!
//! # Months from the 31st
//! `every N months` (and years) counts each occurrence from the anchor, `anchor + k·N months`,
//! and clamps to the month's last day: from 31 January it runs on 28 (29) February, 31 March,
//! 30 April, 31 May... It never drifts to the 28th, because no occurrence is computed from the
//! previous one. `every 1y` from 29 February runs on 28 February in common years.

use std::fmt;

use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Span, Timestamp, Zoned};

use crate::limits::{CALENDAR_LOOKBACK_DAYS_MAX, EVERY_COUNT_MAX};

/// Why a schedule expression or a time could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecurrenceError {
    /// Nothing was given.
    #[error("empty schedule expression")]
    Empty,
    /// A cron expression croner refuses.
    #[error("cron expression {expr:?}: {reason}")]
    Cron {
        /// The expression given.
        expr: String,
        /// croner's message.
        reason: String,
    },
    /// `every` not followed by `N UNIT from TIME`.
    #[error("{0:?} is not `every N UNIT from TIME` (e.g. `every 1w from 2027-01-01T20:00`)")]
    EveryForm(String),
    /// A count that is not a whole number in 1..=EVERY_COUNT_MAX.
    #[error("every: count {0:?} is not a whole number from 1 to {max}", max = EVERY_COUNT_MAX)]
    EveryCount(String),
    /// A unit other than minutes, hours, days, weeks, months or years.
    #[error("every: unit {0:?} is not one of m (minutes), h, d, w, mo (months), y")]
    EveryUnit(String),
    /// `once` not followed by exactly one time.
    #[error("{0:?} is not `once TIME` (e.g. `once 2026-12-24T20:00[Europe/Berlin]`)")]
    OnceForm(String),
    /// A time that is neither RFC 3339, `DATE T TIME[ZONE]` nor a civil date and time.
    #[error("time {text:?}: {reason}")]
    Time {
        /// The text given.
        text: String,
        /// jiff's message.
        reason: String,
    },
}

/// The unit of an `every` recurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Minutes: absolute steps from the anchor.
    Minutes,
    /// Hours: absolute steps from the anchor.
    Hours,
    /// Days: civil steps in the zone.
    Days,
    /// Weeks (7 civil days).
    Weeks,
    /// Months, clamped to the month's last day, counted from the anchor.
    Months,
    /// Years (12 months).
    Years,
}

impl Unit {
    fn parse(s: &str) -> Result<Unit, RecurrenceError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "m" | "min" | "mins" | "minute" | "minutes" => Unit::Minutes,
            "h" | "hour" | "hours" => Unit::Hours,
            "d" | "day" | "days" => Unit::Days,
            "w" | "week" | "weeks" => Unit::Weeks,
            "mo" | "month" | "months" => Unit::Months,
            "y" | "year" | "years" => Unit::Years,
            _ => return Err(RecurrenceError::EveryUnit(s.to_string())),
        })
    }

    fn suffix(self) -> &'static str {
        match self {
            Unit::Minutes => "m",
            Unit::Hours => "h",
            Unit::Days => "d",
            Unit::Weeks => "w",
            Unit::Months => "mo",
            Unit::Years => "y",
        }
    }

    /// Seconds of one unit: exact for minutes and hours, an average for the civil units (used
    /// only to guess where to start counting).
    fn approx_secs(self) -> i64 {
        match self {
            Unit::Minutes => 60,
            Unit::Hours => 3600,
            Unit::Days => 86_400,
            Unit::Weeks => 7 * 86_400,
            Unit::Months => 2_629_746,
            Unit::Years => 31_556_952,
        }
    }
}

/// When a schedule's occurrences fall.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "schedules are few and long-lived; the cron variant is the common one"
)]
pub enum Recurrence {
    /// A cron expression (croner: 5 or 6 fields, `L`, `W`, `#`), read in the schedule's zone.
    Cron(croner::Cron),
    /// Every `n` units from `anchor` (the anchor is the first occurrence).
    Every {
        /// How many units between occurrences (1..=EVERY_COUNT_MAX).
        n: u32,
        /// The unit.
        unit: Unit,
        /// The first occurrence, in the schedule's zone.
        anchor: Zoned,
    },
    /// One occurrence at an instant.
    Once(Timestamp),
}

impl fmt::Display for Recurrence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recurrence::Cron(c) => write!(f, "{}", c.as_str()),
            Recurrence::Every { n, unit, anchor } => write!(
                f,
                "every {n}{} from {}",
                unit.suffix(),
                anchor.strftime("%Y-%m-%dT%H:%M:%S%:z[%Q]")
            ),
            Recurrence::Once(t) => write!(f, "once {t}"),
        }
    }
}

/// A named recurrence in a zone; a schedule used by no event starts nothing (CAL-01).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Its name (events refer to it by name).
    pub name: String,
    /// When it recurs.
    pub recurrence: Recurrence,
    /// The zone its wall clock times are read in.
    pub zone: TimeZone,
    /// Off: its events' occurrences are recorded `ScheduleDisabled` (CAL-09).
    pub enabled: bool,
}

impl Schedule {
    /// An enabled schedule from the command-line form of `expr` (see [`Recurrence::parse`]).
    ///
    /// # Errors
    /// [`RecurrenceError`] when `expr` cannot be read.
    pub fn parse(name: &str, expr: &str, zone: TimeZone) -> Result<Schedule, RecurrenceError> {
        Ok(Schedule {
            name: name.to_string(),
            recurrence: Recurrence::parse(expr, &zone)?,
            zone,
            enabled: true,
        })
    }

    /// The first occurrence strictly after `t`, if any.
    #[must_use]
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.recurrence.next_after(t, &self.zone)
    }

    /// The first occurrence at or after `t`, if any.
    #[must_use]
    pub fn next_at_or_after(&self, t: Timestamp) -> Option<Timestamp> {
        match t.checked_sub(SignedDuration::from_nanos(1)) {
            Ok(before) => self.next_after(before),
            Err(_) => None,
        }
    }

    /// The last occurrence at or before `t`, searched back at most
    /// `CALENDAR_LOOKBACK_DAYS_MAX` days.
    #[must_use]
    pub fn last_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        self.recurrence.last_at_or_before(t, &self.zone)
    }

    /// The next `count` occurrences strictly after `t` (`schedule next`, CAL-18).
    #[must_use]
    pub fn upcoming(&self, t: Timestamp, count: usize) -> Vec<Timestamp> {
        let mut out = Vec::with_capacity(count.min(1024));
        let mut at = t;
        while out.len() < count {
            match self.next_after(at) {
                Some(n) => {
                    out.push(n);
                    at = n;
                }
                None => break,
            }
        }
        out
    }
}

/// Reads a time: `2026-12-24T20:00[Europe/Berlin]`, RFC 3339 (`2026-12-24T19:00:00Z`), or a
/// civil date and time (`2027-01-01T20:00`) taken in `zone` (a gap moves it to the gap's end,
/// a fold takes the first pass). The result is in `zone`.
///
/// # Errors
/// [`RecurrenceError::Time`] when the text is none of these.
pub fn parse_time(text: &str, zone: &TimeZone) -> Result<Zoned, RecurrenceError> {
    let text = text.trim();
    if let Ok(z) = text.parse::<Zoned>() {
        return Ok(z.with_time_zone(zone.clone()));
    }
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t.to_zoned(zone.clone()));
    }
    match text.parse::<DateTime>() {
        Ok(dt) => resolve(zone, dt)
            .map(|t| t.to_zoned(zone.clone()))
            .ok_or_else(|| RecurrenceError::Time {
                text: text.to_string(),
                reason: "outside the supported range".to_string(),
            }),
        Err(e) => Err(RecurrenceError::Time {
            text: text.to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The instant a wall clock time names in `zone` by the rule of CAL-16: the single instant; in a
/// fold the first pass; in a gap the first instant after the gap.
pub(crate) fn resolve(zone: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    let ambiguous = zone.to_ambiguous_timestamp(dt);
    match ambiguous.offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
        AmbiguousOffset::Fold { before, .. } => before.to_timestamp(dt).ok(),
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the offset after the gap, the wall clock time names an instant before
            // the transition; the transition itself is the first instant after the gap.
            let early = after.to_timestamp(dt).ok()?;
            zone.following(early).next().map(|tr| tr.timestamp())
        }
    }
}

impl Recurrence {
    /// Reads the command-line forms: a cron expression (`0 20 * * *`), `every N UNIT from TIME`
    /// (`every 1w from 2027-01-01T20:00`; units m, h, d, w, mo, y, also spelt out, with or without
    /// a space after N) or `once TIME` (`once 2026-12-24T20:00[Europe/Berlin]`). Times without a
    /// zone are read in `zone` (see [`parse_time`]).
    ///
    /// # Errors
    /// [`RecurrenceError`] naming what is wrong.
    pub fn parse(expr: &str, zone: &TimeZone) -> Result<Recurrence, RecurrenceError> {
        let expr = expr.trim();
        let words: Vec<&str> = expr.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_lowercase()) {
            None => Err(RecurrenceError::Empty),
            Some(w) if w == "once" => match words.as_slice() {
                [_, time] => Ok(Recurrence::Once(parse_time(time, zone)?.timestamp())),
                _ => Err(RecurrenceError::OnceForm(expr.to_string())),
            },
            Some(w) if w == "every" => Self::parse_every(expr, &words[1..], zone),
            Some(_) => expr
                .parse::<croner::Cron>()
                .map(Recurrence::Cron)
                .map_err(|e| RecurrenceError::Cron {
                    expr: expr.to_string(),
                    reason: e.to_string(),
                }),
        }
    }

    fn parse_every(
        expr: &str,
        rest: &[&str],
        zone: &TimeZone,
    ) -> Result<Recurrence, RecurrenceError> {
        let form = || RecurrenceError::EveryForm(expr.to_string());
        let (count, unit, time) = match rest {
            [count_unit, from, time] if from.eq_ignore_ascii_case("from") => {
                let split = count_unit
                    .find(|c: char| !c.is_ascii_digit())
                    .ok_or_else(form)?;
                (&count_unit[..split], &count_unit[split..], *time)
            }
            [count, unit, from, time] if from.eq_ignore_ascii_case("from") => {
                (*count, *unit, *time)
            }
            _ => return Err(form()),
        };
        let n: u32 = count
            .parse()
            .ok()
            .filter(|n| (1..=EVERY_COUNT_MAX).contains(n))
            .ok_or_else(|| RecurrenceError::EveryCount(count.to_string()))?;
        let unit = Unit::parse(unit)?;
        let anchor = parse_time(time, zone)?;
        Ok(Recurrence::Every { n, unit, anchor })
    }

    /// The first occurrence strictly after `t`, with wall clock times read in `zone`.
    #[must_use]
    pub fn next_after(&self, t: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
        match self {
            Recurrence::Once(at) => (*at > t).then_some(*at),
            Recurrence::Cron(cron) => {
                let mut from = t;
                // croner works in whole seconds; a result at or before `t` (a `t` with a
                // fraction of a second) is searched past once more.
                for _ in 0..2 {
                    let found = cron
                        .find_next_occurrence(&from.to_zoned(zone.clone()), false)
                        .ok()?
                        .timestamp();
                    if found > t {
                        return Some(found);
                    }
                    from = found;
                }
                None
            }
            Recurrence::Every { n, unit, anchor } => {
                let k = every_index_after(*n, *unit, anchor, zone, t)?;
                every_occurrence(*n, *unit, anchor, zone, k)
            }
        }
    }

    /// The last occurrence at or before `t`, searched back at most `CALENDAR_LOOKBACK_DAYS_MAX`
    /// days for cron expressions.
    #[must_use]
    pub fn last_at_or_before(&self, t: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
        match self {
            Recurrence::Once(at) => (*at <= t).then_some(*at),
            Recurrence::Every { n, unit, anchor } => {
                let k = every_index_after(*n, *unit, anchor, zone, t)?;
                let k = k.checked_sub(1)?;
                every_occurrence(*n, *unit, anchor, zone, k)
            }
            Recurrence::Cron(_) => {
                const WINDOWS_SECS: [i64; 5] = [60, 3600, 86_400, 8 * 86_400, 32 * 86_400];
                let windows = WINDOWS_SECS.iter().copied().chain(
                    [366, CALENDAR_LOOKBACK_DAYS_MAX]
                        .iter()
                        .map(|d| d.saturating_mul(86_400)),
                );
                for secs in windows {
                    let Ok(start) = t.checked_sub(SignedDuration::from_secs(secs)) else {
                        continue;
                    };
                    let Ok(before) = start.checked_sub(SignedDuration::from_nanos(1)) else {
                        continue;
                    };
                    let mut last = match self.next_after(before, zone) {
                        Some(o) if o <= t => o,
                        _ => continue,
                    };
                    while let Some(o) = self.next_after(last, zone).filter(|o| *o <= t) {
                        last = o;
                    }
                    return Some(last);
                }
                None
            }
        }
    }
}

/// Occurrence `k` (0 = the anchor) of an `every` recurrence.
fn every_occurrence(
    n: u32,
    unit: Unit,
    anchor: &Zoned,
    zone: &TimeZone,
    k: u64,
) -> Option<Timestamp> {
    let steps = i64::try_from(k).ok()?.checked_mul(i64::from(n))?;
    match unit {
        Unit::Minutes | Unit::Hours => {
            let secs = steps.checked_mul(unit.approx_secs())?;
            anchor
                .timestamp()
                .checked_add(SignedDuration::from_secs(secs))
                .ok()
        }
        Unit::Days | Unit::Weeks | Unit::Months | Unit::Years => {
            let span = match unit {
                Unit::Days => Span::new().try_days(steps).ok()?,
                Unit::Weeks => Span::new().try_days(steps.checked_mul(7)?).ok()?,
                Unit::Months => Span::new().try_months(steps).ok()?,
                _ => Span::new().try_years(steps).ok()?,
            };
            let civil = anchor.with_time_zone(zone.clone()).datetime();
            resolve(zone, civil.checked_add(span).ok()?)
        }
    }
}

/// The smallest `k` whose occurrence is strictly after `t` (`None` past the supported range).
fn every_index_after(
    n: u32,
    unit: Unit,
    anchor: &Zoned,
    zone: &TimeZone,
    t: Timestamp,
) -> Option<u64> {
    let occ = |k: u64| every_occurrence(n, unit, anchor, zone, k);
    let elapsed = t.as_second().saturating_sub(anchor.timestamp().as_second());
    let period = unit.approx_secs().saturating_mul(i64::from(n));
    let guess = u64::try_from(elapsed.max(0) / period).unwrap_or(0);
    let mut k = guess.saturating_sub(1);
    // Occurrences increase with k, so walking from a close guess finds the boundary.
    while k > 0 && occ(k - 1).is_none_or(|o| o > t) {
        k -= 1;
    }
    loop {
        match occ(k) {
            Some(o) if o <= t => k += 1,
            Some(_) => return Some(k),
            None => return None,
        }
    }
}
