//! Tests of the calendar, named after the behaviour ids of docs/orchestration.md ("Calendar").

use std::collections::{BTreeMap, BTreeSet};

use jiff::civil::{Date, DateTime, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};
use proptest::prelude::*;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::store::{BackupDay, EventId, JobId, Priority};

fn zone(name: &str) -> TimeZone {
    TimeZone::get(name).expect("the test zones are in the system's tz database")
}

fn berlin() -> TimeZone {
    zone("Europe/Berlin")
}

/// An instant from `2026-10-31T18:00[Europe/Berlin]` or RFC 3339.
fn at(s: &str) -> Timestamp {
    match s.parse::<Zoned>() {
        Ok(z) => z.timestamp(),
        Err(_) => s.parse().expect("a test instant"),
    }
}

fn sched(name: &str, expr: &str, tz: &TimeZone) -> Schedule {
    Schedule::parse(name, expr, tz.clone()).expect("a test schedule")
}

fn prio(n: i64) -> Priority {
    Priority::new(n).expect("a test priority")
}

fn plan_event(id: u64, name: &str, schedule: &str, plan: &str, priority: i64) -> Event {
    Event {
        id: EventId(id),
        name: name.to_string(),
        schedule: schedule.to_string(),
        kind: EventKind::Plan {
            plan: plan.to_string(),
        },
        priority: prio(priority),
        blocking: false,
        enabled: true,
        next_due: None,
    }
}

fn newday_event(schedule: &str) -> Event {
    Event {
        id: EventId(0),
        name: "NEWDAY".to_string(),
        schedule: schedule.to_string(),
        kind: EventKind::Newday,
        priority: Priority::ALWAYS,
        blocking: false,
        enabled: true,
        next_due: None,
    }
}

fn day(s: &str) -> BackupDay {
    s.parse().expect("a test backup day")
}

/// The calendar's records held in memory, with an applier of decisions that checks what the
/// store's transaction checks: every `Advance` is a compare-and-set of `next_due`, and every
/// occurrence gets one outcome only.
#[derive(Debug, Clone)]
struct Sim {
    schedules: Vec<Schedule>,
    events: Vec<Event>,
    occurrences: Vec<Occurrence>,
    next_job: u64,
    newdays: Vec<(BackupDay, BackupDay)>,
}

impl Sim {
    /// A calendar with NEWDAY daily 08:00 in Berlin (plus `schedules`, `events`), every event's
    /// `next_due` its first occurrence after `start`.
    fn new(schedules: Vec<Schedule>, events: Vec<Event>, start: Timestamp) -> Sim {
        let mut all = vec![default_newday_schedule(berlin())];
        all.extend(schedules);
        Self::with_newday(all, events, start)
    }

    /// Like `new`, with NEWDAY's schedule among `schedules` (named NEWDAY).
    fn with_newday(schedules: Vec<Schedule>, events: Vec<Event>, start: Timestamp) -> Sim {
        let mut all_events = vec![newday_event(NEWDAY_SCHEDULE)];
        all_events.extend(events);
        let mut sim = Sim {
            schedules,
            events: all_events,
            occurrences: Vec::new(),
            next_job: 1,
            newdays: Vec::new(),
        };
        let view = sim.view();
        let ids: Vec<EventId> = sim.events.iter().map(|e| e.id).collect();
        let advances: Vec<Decision> = ids
            .into_iter()
            .map(|id| reschedule_event(&view, id, start).expect("a known event"))
            .collect();
        sim.apply(&view, &advances);
        sim
    }

    fn view(&self) -> CalendarView {
        CalendarView::new(
            self.schedules.clone(),
            self.events.clone(),
            self.occurrences.clone(),
        )
        .expect("a valid calendar")
    }

    fn apply(&mut self, view: &CalendarView, decisions: &[Decision]) {
        for d in decisions {
            if let Decision::Advance { event, from, to } = *d {
                let e = self
                    .events
                    .iter_mut()
                    .find(|e| e.id == event)
                    .expect("an advance names a known event");
                assert_eq!(e.next_due, from, "advance of {event} is a compare-and-set");
                e.next_due = to;
                continue;
            }
            let (event, due) = d.occurrence().expect("an occurrence decision");
            assert!(
                !self
                    .occurrences
                    .iter()
                    .any(|o| o.event == event && o.due == due),
                "occurrence {event} at {due} decided twice"
            );
            let outcome = match *d {
                Decision::Start { backup_day, .. } => {
                    assert_eq!(backup_day, view.backup_day(due));
                    let job = JobId(self.next_job);
                    self.next_job += 1;
                    OccurrenceOutcome::Started(job)
                }
                Decision::Suppressed { by, .. } => OccurrenceOutcome::Suppressed { by },
                Decision::Activated { .. } => OccurrenceOutcome::Activated,
                Decision::ScheduleDisabled { .. } => OccurrenceOutcome::ScheduleDisabled,
                Decision::Missed { .. } => OccurrenceOutcome::Missed,
                Decision::Newday {
                    ending, starting, ..
                } => {
                    self.newdays.push((ending, starting));
                    OccurrenceOutcome::Activated
                }
                Decision::Advance { .. } => unreachable!("handled above"),
            };
            self.occurrences.push(Occurrence {
                event,
                due,
                backup_day: view.backup_day(due),
                outcome,
            });
        }
    }

    /// Decide and apply at `now` until nothing is left to decide.
    fn tick(&mut self, now: Timestamp) {
        loop {
            let view = self.view();
            let decisions = decide(&view, now);
            if decisions.is_empty() {
                return;
            }
            self.apply(&view, &decisions);
        }
    }

    /// Moves `clock` from wake-up to wake-up (the earliest `next_due`, as the scheduler's heap
    /// does) until `end`, deciding at each.
    fn run_until(&mut self, clock: &ManualClock, end: Timestamp) {
        loop {
            self.tick(clock.now());
            let wake = self
                .events
                .iter()
                .filter(|e| e.enabled)
                .filter_map(|e| e.next_due)
                .min();
            match wake {
                Some(w) if w <= end => clock.set(w),
                _ => {
                    clock.set(end);
                    self.tick(end);
                    return;
                }
            }
        }
    }

    fn outcome(&self, event: u64, due: Timestamp) -> Option<OccurrenceOutcome> {
        self.occurrences
            .iter()
            .find(|o| o.event == EventId(event) && o.due == due)
            .map(|o| o.outcome)
    }

    /// Started jobs by backup day: the set of event ids.
    fn started_by_day(&self) -> BTreeMap<BackupDay, BTreeSet<u64>> {
        let mut out: BTreeMap<BackupDay, BTreeSet<u64>> = BTreeMap::new();
        for o in &self.occurrences {
            if let OccurrenceOutcome::Started(_) = o.outcome {
                out.entry(o.backup_day).or_default().insert(o.event.0);
            }
        }
        out
    }

    fn started(&self) -> Vec<(u64, Timestamp)> {
        let mut v: Vec<(u64, Timestamp)> = self
            .occurrences
            .iter()
            .filter(|o| matches!(o.outcome, OccurrenceOutcome::Started(_)))
            .map(|o| (o.event.0, o.due))
            .collect();
        v.sort();
        v
    }
}

// ---------------------------------------------------------------------------------------------
// CAL-01 recurrences

#[test]
fn cal_01_cron_every_and_once_recur_as_written() {
    let tz = berlin();
    let cron = sched("c", "0 20 * * *", &tz);
    assert_eq!(
        cron.next_after(at("2026-12-02T12:00[Europe/Berlin]")),
        Some(at("2026-12-02T20:00[Europe/Berlin]"))
    );
    assert_eq!(
        cron.next_after(at("2026-12-02T20:00[Europe/Berlin]")),
        Some(at("2026-12-03T20:00[Europe/Berlin]")),
        "strictly after"
    );

    let weekly = sched("w", "every 1w from 2027-01-01T20:00", &tz);
    assert_eq!(
        weekly.upcoming(at("2026-12-01T00:00Z"), 3),
        vec![
            at("2027-01-01T20:00[Europe/Berlin]"),
            at("2027-01-08T20:00[Europe/Berlin]"),
            at("2027-01-15T20:00[Europe/Berlin]"),
        ]
    );
    let units = [
        ("every 90 minutes from 2027-01-01T00:00", "2027-01-01T01:30"),
        ("every 2h from 2027-01-01T00:00", "2027-01-01T02:00"),
        ("every 3d from 2027-01-01T00:00", "2027-01-04T00:00"),
        ("every 2 weeks from 2027-01-01T00:00", "2027-01-15T00:00"),
        ("every 1mo from 2027-01-01T00:00", "2027-02-01T00:00"),
        ("every 1y from 2027-01-01T00:00", "2028-01-01T00:00"),
    ];
    for (expr, second) in units {
        let s = sched("u", expr, &tz);
        let first = at("2027-01-01T00:00[Europe/Berlin]");
        assert_eq!(
            s.next_after(first),
            Some(at(&format!("{second}[Europe/Berlin]"))),
            "{expr}"
        );
        assert_eq!(
            s.next_at_or_after(first),
            Some(first),
            "{expr}: the anchor is the first occurrence"
        );
    }

    let once = sched("o", "once 2026-12-24T20:00[Europe/Berlin]", &zone("UTC"));
    let t = at("2026-12-24T19:00Z");
    assert_eq!(once.next_after(at("2026-12-01T00:00Z")), Some(t));
    assert_eq!(once.next_after(t), None, "once runs once");
    assert_eq!(once.last_at_or_before(t), Some(t));
}

#[test]
fn cal_01_bad_expressions_are_typed_errors() {
    let tz = berlin();
    let err = |expr: &str| Recurrence::parse(expr, &tz).expect_err(expr);
    assert_eq!(err("  "), RecurrenceError::Empty);
    assert!(matches!(err("61 * * * *"), RecurrenceError::Cron { .. }));
    assert!(matches!(err("every 1w"), RecurrenceError::EveryForm(_)));
    assert!(matches!(
        err("every w from 2027-01-01T20:00"),
        RecurrenceError::EveryCount(_)
    ));
    assert!(matches!(
        err("every 0d from 2027-01-01T20:00"),
        RecurrenceError::EveryCount(_)
    ));
    assert!(matches!(
        err("every 1x from 2027-01-01T20:00"),
        RecurrenceError::EveryUnit(_)
    ));
    assert!(matches!(
        err("every 1d from tomorrow"),
        RecurrenceError::Time { .. }
    ));
    assert!(matches!(err("once"), RecurrenceError::OnceForm(_)));
    assert!(matches!(
        err("once 2026-13-01T00:00"),
        RecurrenceError::Time { .. }
    ));
}

#[test]
fn cal_01_every_month_from_the_31st_clamps_to_the_last_day_without_drift() {
    let s = sched("m", "every 1mo from 2027-01-31T20:00", &zone("UTC"));
    let days: Vec<String> = s
        .upcoming(at("2027-01-01T00:00Z"), 5)
        .iter()
        .map(|t| t.to_string())
        .collect();
    assert_eq!(
        days,
        [
            "2027-01-31T20:00:00Z",
            "2027-02-28T20:00:00Z",
            "2027-03-31T20:00:00Z",
            "2027-04-30T20:00:00Z",
            "2027-05-31T20:00:00Z",
        ]
    );
    let leap = sched("y", "every 1y from 2028-02-29T08:00", &zone("UTC"));
    assert_eq!(
        leap.upcoming(at("2028-03-01T00:00Z"), 4),
        vec![
            at("2029-02-28T08:00Z"),
            at("2030-02-28T08:00Z"),
            at("2031-02-28T08:00Z"),
            at("2032-02-29T08:00Z"),
        ]
    );
}

#[test]
fn cal_01_a_schedule_used_by_no_event_starts_nothing() {
    let start = at("2026-12-01T00:00[Europe/Berlin]");
    let unused = sched("EVERY_MINUTE", "* * * * *", &berlin());
    let mut sim = Sim::new(vec![unused], Vec::new(), start);
    let clock = ManualClock::new(start);
    sim.run_until(&clock, at("2026-12-03T00:00[Europe/Berlin]"));
    assert!(sim.started().is_empty());
    assert!(sim
        .occurrences
        .iter()
        .all(|o| o.event == sim.view().newday()));
}

// ---------------------------------------------------------------------------------------------
// CAL-02 next occurrence from the anchor

#[test]
fn cal_02_next_occurrence_from_the_anchor_in_the_same_decision_list() {
    let tz = berlin();
    // Saturday 1 January 2000, weekly.
    let weekly = sched("WEEKLY", "every 1w from 2000-01-01T20:00", &tz);
    let mut e = plan_event(1, "weekly", "WEEKLY", "db", 1);
    e.next_due = Some(at("2000-01-01T20:00[Europe/Berlin]"));
    let view = CalendarView::new(
        vec![default_newday_schedule(tz.clone()), weekly],
        vec![newday_event(NEWDAY_SCHEDULE), e],
        Vec::new(),
    )
    .expect("valid");
    assert_eq!(
        Date::new(2000, 1, 1).expect("date").weekday(),
        Weekday::Saturday
    );
    // The scheduler wakes late; the next occurrence still counts from the anchor.
    let decisions = decide(&view, at("2000-01-01T20:07[Europe/Berlin]"));
    assert_eq!(
        decisions,
        vec![
            Decision::Start {
                event: EventId(1),
                due: at("2000-01-01T20:00[Europe/Berlin]"),
                backup_day: day("20000101"),
            },
            Decision::Advance {
                event: EventId(1),
                from: Some(at("2000-01-01T20:00[Europe/Berlin]")),
                to: Some(at("2000-01-08T20:00[Europe/Berlin]")),
            },
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// CAL-04..CAL-08 priorities and suppression

/// A calendar of `events` on named schedules, run from `start` to `end`.
fn run(schedules: &[(&str, &str)], events: Vec<Event>, start: &str, end: &str) -> Sim {
    let tz = berlin();
    let schedules = schedules
        .iter()
        .map(|(name, expr)| sched(name, expr, &tz))
        .collect();
    let start = at(start);
    let mut sim = Sim::new(schedules, events, start);
    let clock = ManualClock::new(start);
    sim.run_until(&clock, at(end));
    sim
}

#[test]
fn cal_04_priority_range_and_priority_zero_always_runs() {
    assert!(Priority::new(100).is_err());
    assert!(Priority::new(-1).is_err());
    assert!("100".parse::<Priority>().is_err());
    let sim = run(
        &[("EVENING", "0 20 * * *"), ("LATE", "0 22 * * *")],
        vec![
            plan_event(1, "always", "EVENING", "db", 0),
            plan_event(2, "high", "LATE", "db", 99),
            plan_event(3, "low", "EVENING", "db", 1),
        ],
        "2026-12-01T09:00[Europe/Berlin]",
        "2026-12-02T07:00[Europe/Berlin]",
    );
    let due = at("2026-12-01T20:00[Europe/Berlin]");
    assert!(
        matches!(sim.outcome(1, due), Some(OccurrenceOutcome::Started(_))),
        "priority 0 is never suppressed"
    );
    assert_eq!(
        sim.outcome(3, due),
        Some(OccurrenceOutcome::Suppressed { by: EventId(2) })
    );
    // Priority 0 suppresses nothing: a lone priority-1 event beside it runs.
    let sim = run(
        &[("EVENING", "0 20 * * *"), ("LATE", "0 22 * * *")],
        vec![
            plan_event(1, "always", "LATE", "db", 0),
            plan_event(2, "low", "EVENING", "db", 1),
        ],
        "2026-12-01T09:00[Europe/Berlin]",
        "2026-12-02T07:00[Europe/Berlin]",
    );
    assert_eq!(
        sim.started_by_day()[&day("20261201")],
        BTreeSet::from([1, 2])
    );
}

#[test]
fn cal_05_higher_priority_run_or_scheduled_in_the_backup_day_suppresses() {
    let sim = run(
        &[
            ("MORNING", "0 10 * * *"),
            ("EVENING", "0 20 * * *"),
            ("NIGHT", "0 2 * * *"),
        ],
        vec![
            // p3 ran in the morning: the p2 evening run is suppressed.
            plan_event(1, "morning", "MORNING", "a", 3),
            plan_event(2, "evening", "EVENING", "a", 2),
            // p5 scheduled after midnight (same backup day): the p4 evening run is suppressed.
            plan_event(3, "night", "NIGHT", "b", 5),
            plan_event(4, "evening-b", "EVENING", "b", 4),
            // Equal priorities both run.
            plan_event(5, "c-morning", "MORNING", "c", 2),
            plan_event(6, "c-evening", "EVENING", "c", 2),
        ],
        "2026-12-01T09:00[Europe/Berlin]",
        "2026-12-02T07:59[Europe/Berlin]",
    );
    let evening = at("2026-12-01T20:00[Europe/Berlin]");
    assert_eq!(
        sim.outcome(2, evening),
        Some(OccurrenceOutcome::Suppressed { by: EventId(1) })
    );
    assert_eq!(
        sim.outcome(4, evening),
        Some(OccurrenceOutcome::Suppressed { by: EventId(3) })
    );
    assert!(matches!(
        sim.outcome(3, at("2026-12-02T02:00[Europe/Berlin]")),
        Some(OccurrenceOutcome::Started(_))
    ));
    assert_eq!(
        sim.started_by_day()[&day("20261201")],
        BTreeSet::from([1, 3, 5, 6])
    );
}

fn event_of(id: u64, schedule: &str, kind: EventKind, priority: i64) -> Event {
    Event {
        kind,
        ..plan_event(id, &format!("e{id}"), schedule, "", priority)
    }
}

#[test]
fn cal_06_only_similar_events_suppress_each_other() {
    let cmd = |name: &str, arg: &str| EventKind::Command {
        name: name.to_string(),
        argv: vec![arg.to_string()],
    };
    let maint = |dest: &str| EventKind::Maintenance {
        dest: dest.to_string(),
    };
    let plan = |plan: &str| EventKind::Plan {
        plan: plan.to_string(),
    };
    let sim = run(
        &[("A", "0 20 * * *"), ("B", "0 21 * * *")],
        vec![
            event_of(1, "A", plan("x"), 1),
            event_of(2, "B", plan("x"), 2), // suppresses 1
            event_of(3, "A", plan("y"), 1), // another plan: runs
            event_of(4, "A", cmd("x", "--one"), 1),
            event_of(5, "B", cmd("x", "--two"), 2), // same command name: suppresses 4
            event_of(6, "A", cmd("z", "--one"), 1), // another name: runs
            event_of(7, "A", maint("pool1"), 1),
            event_of(8, "B", maint("pool1"), 2), // same destination: suppresses 7
            event_of(9, "A", maint("pool2"), 1),
            event_of(10, "A", maint("x"), 1), // kind differs from plan x / command x: runs
        ],
        "2026-12-01T09:00[Europe/Berlin]",
        "2026-12-02T07:00[Europe/Berlin]",
    );
    let t = at("2026-12-01T20:00[Europe/Berlin]");
    for (low, high) in [(1, 2), (4, 5), (7, 8)] {
        assert_eq!(
            sim.outcome(low, t),
            Some(OccurrenceOutcome::Suppressed { by: EventId(high) })
        );
    }
    assert_eq!(
        sim.started_by_day()[&day("20261201")],
        BTreeSet::from([2, 3, 5, 6, 8, 9, 10])
    );
}

#[test]
fn cal_07_weekend_monthend_and_saturday_monthend() {
    // October 2026 ends on a Saturday, November on a Monday.
    assert_eq!(
        Date::new(2026, 10, 31).expect("date").weekday(),
        Weekday::Saturday
    );
    let sim = run(
        &[
            ("DAILY", "0 20 * * *"),
            ("WEEKEND", "0 18 * * SAT"),
            ("MONTHEND", "0 21 L * *"),
        ],
        vec![
            plan_event(1, "daily", "DAILY", "fileserver", 1),
            plan_event(2, "weekend", "WEEKEND", "fileserver", 2),
            plan_event(3, "monthend", "MONTHEND", "fileserver", 3),
        ],
        "2026-10-01T09:00[Europe/Berlin]",
        "2026-12-01T09:00[Europe/Berlin]",
    );
    let started = sim.started_by_day();
    let mut date = Date::new(2026, 10, 1).expect("date");
    let end = Date::new(2026, 11, 30).expect("date");
    while date <= end {
        let expected = if date == date.last_of_month() {
            3
        } else if date.weekday() == Weekday::Saturday {
            2
        } else {
            1
        };
        assert_eq!(
            started.get(&BackupDay(date)),
            Some(&BTreeSet::from([expected])),
            "backup day {date}"
        );
        date = date.tomorrow().expect("date");
    }
    // On the Saturday month end, WEEKEND (18:00) is suppressed by the later MONTHEND (21:00).
    assert_eq!(
        sim.outcome(2, at("2026-10-31T18:00[Europe/Berlin]")),
        Some(OccurrenceOutcome::Suppressed { by: EventId(3) })
    );
    assert_eq!(
        sim.outcome(1, at("2026-10-31T20:00[Europe/Berlin]")),
        Some(OccurrenceOutcome::Suppressed { by: EventId(3) })
    );
}

#[test]
fn cal_08_blocking_event_suppresses_similar_events_and_is_activated() {
    let mut blocking = plan_event(2, "no-backup-christmas", "DEC24", "CSRC", 9);
    blocking.blocking = true;
    let sim = run(
        &[("DAILY", "0 20 * * *"), ("DEC24", "0 10 24 12 *")],
        vec![plan_event(1, "csrc-daily", "DAILY", "CSRC", 2), blocking],
        "2026-12-22T09:00[Europe/Berlin]",
        "2026-12-27T09:00[Europe/Berlin]",
    );
    assert_eq!(
        sim.outcome(2, at("2026-12-24T10:00[Europe/Berlin]")),
        Some(OccurrenceOutcome::Activated)
    );
    assert_eq!(
        sim.outcome(1, at("2026-12-24T20:00[Europe/Berlin]")),
        Some(OccurrenceOutcome::Suppressed { by: EventId(2) })
    );
    let started = sim.started_by_day();
    assert!(
        !started.contains_key(&day("20261224")),
        "no CSRC job on Dec 24"
    );
    for d in ["20261222", "20261223", "20261225", "20261226"] {
        assert_eq!(started[&day(d)], BTreeSet::from([1]), "{d}");
    }
    assert_eq!(
        sim.started().len(),
        4,
        "a blocking event never starts a job"
    );
}

// ---------------------------------------------------------------------------------------------
// CAL-09, CAL-10 disabling and editing

#[test]
fn cal_09_disabled_schedule_stops_its_events_disabled_event_stops_itself() {
    let tz = berlin();
    let mut off = sched("OFF", "0 21 * * *", &tz);
    off.enabled = false;
    let mut disabled_event = plan_event(4, "disabled", "ON", "d", 1);
    disabled_event.enabled = false;
    let start = at("2026-12-01T09:00[Europe/Berlin]");
    let mut sim = Sim::new(
        vec![off, sched("ON", "0 20 * * *", &tz)],
        vec![
            plan_event(1, "off-high", "OFF", "a", 5),
            plan_event(2, "off-other", "OFF", "b", 1),
            plan_event(3, "on-low", "ON", "a", 1),
            disabled_event,
            plan_event(5, "on-d", "ON", "dd", 1),
        ],
        start,
    );
    let clock = ManualClock::new(start);
    sim.run_until(&clock, at("2026-12-02T07:00[Europe/Berlin]"));
    let t21 = at("2026-12-01T21:00[Europe/Berlin]");
    assert_eq!(
        sim.outcome(1, t21),
        Some(OccurrenceOutcome::ScheduleDisabled)
    );
    assert_eq!(
        sim.outcome(2, t21),
        Some(OccurrenceOutcome::ScheduleDisabled)
    );
    // A disabled schedule's event neither runs nor suppresses.
    assert!(matches!(
        sim.outcome(3, at("2026-12-01T20:00[Europe/Berlin]")),
        Some(OccurrenceOutcome::Started(_))
    ));
    assert_eq!(sim.outcome(4, at("2026-12-01T20:00[Europe/Berlin]")), None);
    assert_eq!(
        sim.started_by_day()[&day("20261201")],
        BTreeSet::from([3, 5])
    );

    // Enabled again, the event continues from now, not with what it skipped.
    let now = clock.now();
    let e = sim
        .events
        .iter_mut()
        .find(|e| e.id == EventId(4))
        .expect("e4");
    e.enabled = true;
    let view = sim.view();
    let advance = reschedule_event(&view, EventId(4), now).expect("known");
    sim.apply(&view, &[advance]);
    sim.run_until(&clock, at("2026-12-03T07:00[Europe/Berlin]"));
    assert_eq!(
        sim.started()
            .iter()
            .filter(|(e, _)| *e == 4)
            .map(|(_, t)| *t)
            .collect::<Vec<_>>(),
        vec![at("2026-12-02T20:00[Europe/Berlin]")]
    );
}

#[test]
fn cal_10_editing_a_schedule_moves_next_due_and_never_runs_at_once() {
    let tz = berlin();
    let start = at("2026-12-01T09:00[Europe/Berlin]");
    let mut sim = Sim::new(
        vec![sched("S", "0 20 * * *", &tz)],
        vec![
            plan_event(1, "a", "S", "a", 1),
            plan_event(2, "b", "S", "b", 1),
        ],
        start,
    );
    let now = at("2026-12-01T12:00[Europe/Berlin]");
    sim.tick(now);
    // Edited to a time already past today, and to one that matches `now` itself.
    for (expr, next) in [
        ("0 9 * * *", "2026-12-02T09:00"),
        ("0 12 * * *", "2026-12-02T12:00"),
        ("*/5 * * * *", "2026-12-01T12:05"),
    ] {
        let edited = sched("S", expr, &tz);
        let view = sim.view();
        let advances = reschedule(&view, &edited, now).expect("known schedule");
        let next = at(&format!("{next}[Europe/Berlin]"));
        assert_eq!(advances.len(), 2);
        for a in &advances {
            assert!(
                matches!(a, Decision::Advance { to: Some(t), .. } if *t == next),
                "{expr}"
            );
        }
        sim.apply(&view, &advances);
        *sim.schedules.iter_mut().find(|s| s.name == "S").expect("S") = edited;
        assert!(
            decide(&sim.view(), now).is_empty(),
            "{expr}: nothing at once"
        );
    }
    assert!(matches!(
        reschedule(&sim.view(), &sched("NOPE", "0 1 * * *", &tz), now),
        Err(CalendarError::UnknownScheduleName(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// CAL-11..CAL-13 NEWDAY and the backup day

#[test]
fn cal_11_one_newday_event_default_daily_0800_and_day_bounds() {
    let tz = berlin();
    let days = BackupDays::new(default_newday_schedule(tz.clone()));
    let b = days.bounds(at("2026-12-02T07:59[Europe/Berlin]"));
    assert_eq!(b.day, day("20261201"));
    assert_eq!(b.start, at("2026-12-01T08:00[Europe/Berlin]"));
    assert_eq!(b.end, Some(at("2026-12-02T08:00[Europe/Berlin]")));
    assert_eq!(
        days.day(at("2026-12-02T08:00[Europe/Berlin]")),
        day("20261202")
    );

    let s = vec![default_newday_schedule(tz.clone())];
    assert_eq!(
        CalendarView::new(s.clone(), Vec::new(), Vec::new()).err(),
        Some(CalendarError::NewdayCount(0))
    );
    let mut second = newday_event(NEWDAY_SCHEDULE);
    second.id = EventId(7);
    assert_eq!(
        CalendarView::new(
            s.clone(),
            vec![newday_event(NEWDAY_SCHEDULE), second],
            Vec::new()
        )
        .err(),
        Some(CalendarError::NewdayCount(2))
    );
    assert!(matches!(
        CalendarView::new(
            s,
            vec![
                newday_event(NEWDAY_SCHEDULE),
                plan_event(1, "x", "GONE", "p", 1)
            ],
            Vec::new()
        ),
        Err(CalendarError::UnknownSchedule { .. })
    ));

    // NEWDAY's occurrence closes one day and opens the next, before the jobs due with it.
    let start = at("2026-12-01T09:00[Europe/Berlin]");
    let mut sim = Sim::new(
        vec![sched("EIGHT", "0 8 * * *", &tz)],
        vec![plan_event(1, "at-eight", "EIGHT", "p", 1)],
        start,
    );
    let view = sim.view();
    let eight = at("2026-12-02T08:00[Europe/Berlin]");
    let decisions = decide(&view, eight);
    assert_eq!(
        decisions[..2],
        [
            Decision::Newday {
                event: EventId(0),
                due: eight,
                ending: day("20261201"),
                starting: day("20261202"),
            },
            Decision::Start {
                event: EventId(1),
                due: eight,
                backup_day: day("20261202"),
            },
        ]
    );
    sim.apply(&view, &decisions);
    assert_eq!(sim.newdays, vec![(day("20261201"), day("20261202"))]);
}

#[test]
fn cal_12_job_after_midnight_belongs_to_the_previous_backup_day() {
    let start = at("2007-09-10T09:00[Europe/Berlin]");
    let mut sim = Sim::new(
        vec![sched("LATE", "40 0 * * *", &berlin())],
        vec![plan_event(1, "late", "LATE", "p", 1)],
        start,
    );
    let due = at("2007-09-11T00:40[Europe/Berlin]");
    let view = sim.view();
    assert_eq!(view.backup_day(due).to_string(), "20070910");
    let decisions = decide(&view, due);
    assert_eq!(
        decisions[0],
        Decision::Start {
            event: EventId(1),
            due,
            backup_day: day("20070910"),
        }
    );
    sim.apply(&view, &decisions);
    assert_eq!(sim.occurrences[0].backup_day.to_string(), "20070910");
}

#[test]
fn cal_13_newday_skipping_the_weekend_stretches_friday_to_monday() {
    let days = BackupDays::new(sched(NEWDAY_SCHEDULE, "0 8 * * 1-5", &berlin()));
    // Friday 4 December 2026.
    for t in [
        "2026-12-04T08:00",
        "2026-12-05T12:00",
        "2026-12-06T23:00",
        "2026-12-07T07:59",
    ] {
        let b = days.bounds(at(&format!("{t}[Europe/Berlin]")));
        assert_eq!(b.day, day("20261204"), "{t}");
        assert_eq!(b.end, Some(at("2026-12-07T08:00[Europe/Berlin]")));
    }
    assert_eq!(
        days.day(at("2026-12-07T08:00[Europe/Berlin]")),
        day("20261207")
    );
}

#[test]
fn cal_13_a_backup_day_is_found_by_its_name_and_a_skipped_date_is_none() {
    let days = BackupDays::new(sched(NEWDAY_SCHEDULE, "0 8 * * 1-5", &berlin()));
    let friday = days
        .of_day(day("20261204"))
        .expect("Friday is a backup day");
    assert_eq!(friday.start, at("2026-12-04T08:00[Europe/Berlin]"));
    assert_eq!(friday.end, Some(at("2026-12-07T08:00[Europe/Berlin]")));
    assert_eq!(days.of_day(day("20261205")), None, "no NEWDAY on Saturday");
    let daily = BackupDays::new(default_newday_schedule(berlin()));
    let b = daily.of_day(day("20070910")).expect("a backup day");
    assert_eq!(b.start, at("2007-09-10T08:00[Europe/Berlin]"));
    assert_eq!(b.end, Some(at("2007-09-11T08:00[Europe/Berlin]")));
}

// ---------------------------------------------------------------------------------------------
// CAL-15 downtime

#[test]
fn cal_15_missed_in_the_current_day_runs_once_earlier_days_are_missed() {
    let tz = berlin();
    let start = at("2026-12-07T09:00[Europe/Berlin]"); // Monday
    let make = || {
        Sim::new(
            vec![
                sched("DAILY", "0 20 * * *", &tz),
                sched("Q", "*/15 * * * *", &tz),
            ],
            vec![
                plan_event(1, "daily", "DAILY", "a", 1),
                plan_event(2, "quarter", "Q", "b", 1),
            ],
            start,
        )
    };
    // Down until Tuesday 02:00 (still Monday's backup day): the 20:00 run happens once, and
    // of the quarter-hourly runs only the latest.
    let mut sim = make();
    let back = at("2026-12-08T02:00[Europe/Berlin]");
    sim.tick(back);
    assert_eq!(
        sim.started(),
        vec![(1, at("2026-12-07T20:00[Europe/Berlin]")), (2, back)]
    );
    let quarters = sim
        .occurrences
        .iter()
        .filter(|o| o.event == EventId(2))
        .count();
    assert_eq!(quarters, 17 * 4, "every quarter hour has one outcome");

    // Down until Wednesday 09:00: Monday's and Tuesday's occurrences are missed, NEWDAY ran once.
    let mut sim = make();
    let back = at("2026-12-09T09:00[Europe/Berlin]");
    sim.tick(back);
    for d in ["2026-12-07T20:00", "2026-12-08T20:00"] {
        assert_eq!(
            sim.outcome(1, at(&format!("{d}[Europe/Berlin]"))),
            Some(OccurrenceOutcome::Missed)
        );
    }
    assert_eq!(sim.started(), vec![(2, back)]);
    assert_eq!(sim.newdays, vec![(day("20261208"), day("20261209"))]);
    assert_eq!(
        sim.outcome(0, at("2026-12-08T08:00[Europe/Berlin]")),
        Some(OccurrenceOutcome::Missed)
    );
}

#[test]
fn cal_15_a_long_outage_is_decided_in_bounded_passes_each_occurrence_once() {
    let tz = berlin();
    let start = at("2026-12-01T09:00[Europe/Berlin]");
    let mut sim = Sim::new(
        vec![sched("MINUTE", "* * * * *", &tz)],
        vec![plan_event(1, "minute", "MINUTE", "a", 1)],
        start,
    );
    let back = at("2026-12-11T09:00[Europe/Berlin]");
    let view = sim.view();
    let first = decide(&view, back);
    assert_eq!(
        first
            .iter()
            .filter(|d| d.occurrence().is_some_and(|(e, _)| e == EventId(1)))
            .count(),
        crate::limits::OCCURRENCES_PER_EVENT_MAX
    );
    assert!(
        first.iter().any(|d| matches!(
            d,
            Decision::Advance { event: EventId(1), to: Some(t), .. } if *t <= back
        )),
        "the pass stops at the bound and leaves the rest for the next one"
    );
    sim.tick(back);
    let minutes = sim
        .occurrences
        .iter()
        .filter(|o| o.event == EventId(1))
        .count();
    assert_eq!(minutes, 10 * 1440, "every minute has one outcome");
    assert_eq!(sim.started(), vec![(1, back)]);
}

// ---------------------------------------------------------------------------------------------
// CAL-16 DST

#[test]
fn cal_16_daily_0230_on_spring_forward_and_fall_back_days() {
    let tz = berlin();
    let cron = sched("c", "30 2 * * *", &tz);
    let every = sched("e", "every 1d from 2026-03-01T02:30", &tz);
    for s in [&cron, &every] {
        assert_eq!(
            s.upcoming(at("2026-03-28T12:00Z"), 3),
            vec![
                at("2026-03-29T03:00[Europe/Berlin]"),
                at("2026-03-30T02:30[Europe/Berlin]"),
                at("2026-03-31T02:30[Europe/Berlin]"),
            ],
            "{}",
            s.recurrence
        );
        let fall = s.upcoming(at("2026-10-24T12:00Z"), 2);
        assert_eq!(
            fall,
            vec![
                at("2026-10-25T02:30+02:00[Europe/Berlin]"),
                at("2026-10-26T02:30[Europe/Berlin]"),
            ],
            "{}: once, in the first pass",
            s.recurrence
        );
        // Asked from inside the fold's second pass, it does not run again that day.
        assert_eq!(
            s.next_after(at("2026-10-25T02:10+01:00[Europe/Berlin]")),
            Some(at("2026-10-26T02:30[Europe/Berlin]"))
        );
    }
    // Lord Howe moves by 30 minutes: 02:00 becomes 02:30.
    let lh = zone("Australia/Lord_Howe");
    let s = sched("lh", "15 2 * * *", &lh);
    assert_eq!(
        s.next_after(at("2026-10-03T12:00Z")),
        Some(at("2026-10-04T02:30[Australia/Lord_Howe]"))
    );
}

#[test]
fn cal_16_every_15_minutes_skips_the_gap_and_runs_in_both_passes() {
    let tz = berlin();
    let cron = sched("c", "*/15 * * * *", &tz);
    let every = sched("e", "every 15m from 2026-01-01T00:00", &tz);
    for s in [&cron, &every] {
        let spring: Vec<String> = s
            .upcoming(at("2026-03-29T01:30[Europe/Berlin]"), 3)
            .iter()
            .map(|t| t.to_zoned(tz.clone()).to_string())
            .collect();
        assert_eq!(
            spring,
            [
                "2026-03-29T01:45:00+01:00[Europe/Berlin]",
                "2026-03-29T03:00:00+02:00[Europe/Berlin]",
                "2026-03-29T03:15:00+02:00[Europe/Berlin]",
            ]
        );
        let fall: Vec<String> = s
            .upcoming(at("2026-10-25T01:50+02:00[Europe/Berlin]"), 10)
            .iter()
            .map(|t| t.to_zoned(tz.clone()).strftime("%H:%M%:z").to_string())
            .collect();
        assert_eq!(
            fall,
            [
                "02:00+02:00",
                "02:15+02:00",
                "02:30+02:00",
                "02:45+02:00",
                "02:00+01:00",
                "02:15+01:00",
                "02:30+01:00",
                "02:45+01:00",
                "03:00+01:00",
                "03:15+01:00",
            ]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CAL-18 due --at

#[test]
fn cal_18_due_at_explains_every_occurrence_and_writes_nothing() {
    let tz = berlin();
    let mut disabled = plan_event(4, "disabled", "MONTHEND", "other", 1);
    disabled.enabled = false;
    let start = at("2026-10-01T09:00[Europe/Berlin]");
    let sim = Sim::new(
        vec![
            sched("DAILY", "0 20 * * *", &tz),
            sched("WEEKEND", "0 18 * * SAT", &tz),
            sched("MONTHEND", "0 21 L * *", &tz),
        ],
        vec![
            plan_event(1, "daily", "DAILY", "fs", 1),
            plan_event(2, "weekend", "WEEKEND", "fs", 2),
            plan_event(3, "monthend", "MONTHEND", "fs", 3),
            disabled,
        ],
        start,
    );
    let view = sim.view();
    let saturday = at("2026-10-31T18:00[Europe/Berlin]");
    let lines = due_at(&view, saturday);
    assert_eq!(lines.len(), 1);
    assert_eq!(
        lines[0].verdict,
        Verdict::Suppressed {
            by: EventId(3),
            by_priority: prio(3)
        }
    );
    let lines = due_at(&view, at("2026-10-31T21:00[Europe/Berlin]"));
    let verdicts: Vec<(u64, Verdict)> = lines.iter().map(|l| (l.event.0, l.verdict)).collect();
    assert_eq!(
        verdicts,
        vec![
            (
                3,
                Verdict::Start {
                    backup_day: day("20261031")
                }
            ),
            (4, Verdict::EventDisabled),
        ]
    );
    let newday = due_at(&view, at("2026-11-01T08:00[Europe/Berlin]"));
    assert_eq!(
        newday[0].verdict,
        Verdict::Newday {
            ending: day("20261031"),
            starting: day("20261101")
        }
    );
    assert!(due_at(&view, at("2026-10-31T18:01[Europe/Berlin]")).is_empty());
    // The scheduler, reaching that instant, decides what `due_at` said.
    let mut ran = sim.clone();
    ran.run_until(&ManualClock::new(start), saturday);
    assert_eq!(
        ran.outcome(2, saturday),
        Some(OccurrenceOutcome::Suppressed { by: EventId(3) })
    );
    // `schedule next --count N`.
    assert_eq!(
        view.schedules()["MONTHEND"].upcoming(start, 3),
        vec![
            at("2026-10-31T21:00[Europe/Berlin]"),
            at("2026-11-30T21:00[Europe/Berlin]"),
            at("2026-12-31T21:00[Europe/Berlin]"),
        ]
    );
}

#[test]
fn cal_17_the_sheet_shows_decided_and_coming_occurrences_with_their_reason() {
    let mut sim = run(
        &[
            ("DAILY", "0 20 * * *"),
            ("WEEKEND", "0 18 * * SAT"),
            ("MONTHEND", "0 21 L * *"),
        ],
        vec![
            plan_event(1, "daily", "DAILY", "fs", 1),
            plan_event(2, "weekend", "WEEKEND", "fs", 2),
            plan_event(3, "monthend", "MONTHEND", "fs", 3),
        ],
        "2026-10-30T09:00[Europe/Berlin]",
        "2026-10-31T19:00[Europe/Berlin]",
    );
    let view = sim.view();
    let bounds = view
        .backup_days()
        .of_day(day("20261031"))
        .expect("a backup day");
    let lines: Vec<(u64, Timestamp, SheetEntry)> = sheet(&view, bounds)
        .into_iter()
        .map(|l| (l.event.0, l.due, l.entry))
        .collect();
    assert_eq!(
        lines,
        vec![
            (
                0,
                at("2026-10-31T08:00[Europe/Berlin]"),
                SheetEntry::Decided(OccurrenceOutcome::Activated)
            ),
            (
                2,
                at("2026-10-31T18:00[Europe/Berlin]"),
                SheetEntry::Decided(OccurrenceOutcome::Suppressed { by: EventId(3) })
            ),
            (
                1,
                at("2026-10-31T20:00[Europe/Berlin]"),
                SheetEntry::ToCome(Verdict::Suppressed {
                    by: EventId(3),
                    by_priority: prio(3)
                })
            ),
            (
                3,
                at("2026-10-31T21:00[Europe/Berlin]"),
                SheetEntry::ToCome(Verdict::Start {
                    backup_day: day("20261031")
                })
            ),
        ]
    );
    // The day before: a daily run decided, nothing to come; the sheet of a day to come lists
    // its NEWDAY and the winner.
    let friday = view.backup_days().of_day(day("20261030")).expect("a day");
    let started: Vec<u64> = sheet(&view, friday)
        .iter()
        .filter(|l| matches!(l.entry, SheetEntry::Decided(OccurrenceOutcome::Started(_))))
        .map(|l| l.event.0)
        .collect();
    assert_eq!(started, vec![1]);
    sim.run_until(
        &ManualClock::new(at("2026-10-31T19:00[Europe/Berlin]")),
        at("2026-11-01T09:00[Europe/Berlin]"),
    );
    let view = sim.view();
    let sunday = view.backup_days().of_day(day("20261101")).expect("a day");
    let coming: Vec<(u64, bool)> = sheet(&view, sunday)
        .iter()
        .map(|l| (l.event.0, matches!(l.entry, SheetEntry::ToCome(_))))
        .collect();
    assert_eq!(coming, vec![(0, false), (1, true)]);
}

// ---------------------------------------------------------------------------------------------
// CAL-19 exactly once, however the clock moves, across restarts

fn simulation_calendar(start: Timestamp) -> Sim {
    let tz = berlin();
    let mut blocking = plan_event(6, "block", "NOON_WED", "web", 7);
    blocking.blocking = true;
    Sim::new(
        vec![
            sched("Q", "*/15 * * * *", &tz),
            sched("DAILY", "0 20 * * *", &tz),
            sched("EVENING", "30 22 * * *", &tz),
            sched("HOURLY", "every 1h from 2026-12-01T00:10", &tz),
            sched("NOON_WED", "0 12 * * WED", &tz),
        ],
        vec![
            plan_event(1, "quarter", "Q", "db", 0),
            plan_event(2, "daily-db", "DAILY", "db", 1),
            plan_event(3, "evening-db", "EVENING", "db", 2),
            plan_event(4, "hourly-web", "HOURLY", "web", 1),
            plan_event(5, "daily-web", "DAILY", "web", 3),
            blocking,
        ],
        start,
    )
}

#[test]
fn cal_19_one_outcome_per_occurrence_whatever_the_clock_steps_and_restarts() {
    let start = at("2026-12-01T08:30[Europe/Berlin]");
    let end = at("2026-12-03T08:00[Europe/Berlin]"); // Tuesday 08:30 to Thursday 08:00
    let minute = SignedDuration::from_mins(1);

    // Minute by minute, restarting (records kept, everything else rebuilt) every 97 minutes.
    let clock = ManualClock::new(start);
    let mut stepped = simulation_calendar(start);
    let mut n = 0u32;
    while clock.now() < end {
        clock.advance(minute);
        n += 1;
        if n.is_multiple_of(97) {
            stepped = Sim {
                schedules: stepped.schedules.clone(),
                events: stepped.events.clone(),
                occurrences: stepped.occurrences.clone(),
                next_job: stepped.next_job,
                newdays: stepped.newdays.clone(),
            };
            // A pass decided but lost before it was recorded changes nothing.
            let _lost = decide(&stepped.view(), clock.now());
        }
        stepped.tick(clock.now());
        assert!(decide(&stepped.view(), clock.now()).is_empty());
    }

    // Every occurrence between start and end has exactly one outcome.
    let view = stepped.view();
    for e in view.events().values() {
        let schedule = &view.schedules()[&e.schedule];
        let mut t = start;
        while let Some(o) = schedule.next_after(t).filter(|o| *o <= end) {
            let count = stepped
                .occurrences
                .iter()
                .filter(|x| x.event == e.id && x.due == o)
                .count();
            assert_eq!(count, 1, "{} at {o}", e.id);
            t = o;
        }
    }
    assert_eq!(
        stepped.occurrences.len(),
        view.events()
            .values()
            .map(|e| {
                view.schedules()[&e.schedule]
                    .upcoming(start, 10_000)
                    .into_iter()
                    .filter(|o| *o <= end)
                    .count()
            })
            .sum::<usize>(),
        "no outcome for anything else"
    );
    let wed = &stepped.started_by_day()[&day("20261202")];
    assert!(
        !wed.contains(&4),
        "the blocking event holds the web plan on Wednesday"
    );
    assert_eq!(wed, &BTreeSet::from([1, 3]));

    // From wake-up to wake-up (the heap) gives the same outcomes.
    let clock = ManualClock::new(start);
    let mut heap = simulation_calendar(start);
    heap.run_until(&clock, end);
    assert_eq!(heap.started(), stepped.started());
    let mut a = heap.occurrences.clone();
    let mut b = stepped.occurrences.clone();
    a.sort_by_key(|o| (o.event, o.due));
    b.sort_by_key(|o| (o.event, o.due));
    assert_eq!(a, b);

    // One jump across a backup day starts the same set of events in it.
    for (from, to) in [
        ("2026-12-01T08:00", "2026-12-02T07:59"),
        ("2026-12-02T08:00", "2026-12-03T07:59"),
    ] {
        let (from, to) = (
            at(&format!("{from}[Europe/Berlin]")),
            at(&format!("{to}[Europe/Berlin]")),
        );
        let clock = ManualClock::new(from);
        let mut jump = simulation_calendar(from);
        jump.tick(clock.now());
        clock.set(to);
        jump.tick(clock.now());
        let d = view.backup_day(from);
        assert_eq!(
            jump.started_by_day().get(&d),
            stepped.started_by_day().get(&d),
            "backup day {d}"
        );
        assert_eq!(jump.started_by_day().len(), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: next_after against a minute-by-minute scan, backup days, priority 0

const ZONES: [&str; 4] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
];

/// Instants near which the test zones change their offset in 2026, and an ordinary one.
const NEAR: [&str; 7] = [
    "2026-03-29T01:00Z",
    "2026-10-25T01:00Z",
    "2026-03-08T07:00Z",
    "2026-11-01T06:00Z",
    "2026-04-04T15:00Z",
    "2026-10-03T15:30Z",
    "2026-06-15T12:00Z",
];

fn civil(t: Timestamp, tz: &TimeZone) -> DateTime {
    t.to_zoned(tz.clone()).datetime()
}

/// Whether the wall clock first reaches `l` at `m`: it shows `l` or later at `m` and showed
/// something earlier at every minute of the three hours before.
fn first_reaches(m: Timestamp, tz: &TimeZone, l: DateTime) -> bool {
    civil(m, tz) >= l && (1..=180).all(|j| civil(m - SignedDuration::from_mins(j), tz) < l)
}

/// The wall clock minutes that `m` shows or skipped to get there: `(civil(m - 1 min), civil(m)]`
/// (just `civil(m)` when the clock went back).
fn shown_or_skipped(m: Timestamp, tz: &TimeZone) -> Vec<DateTime> {
    let c = civil(m, tz);
    let prev = civil(m - SignedDuration::from_mins(1), tz);
    if prev >= c {
        return vec![c];
    }
    let mut out = Vec::new();
    let mut l = prev;
    while l < c {
        l = l
            .checked_add(SignedDuration::from_mins(1))
            .expect("in range");
        out.push(l);
    }
    out
}

fn cron_matches_civil(cron: &croner::Cron, l: DateTime) -> bool {
    let z = l.to_zoned(TimeZone::UTC).expect("in range");
    cron.is_time_matching(&z).expect("a cron check")
}

/// The reference rule of CAL-16 at minute `m`, written without the code under test.
fn reference_matches(r: &Recurrence, tz: &TimeZone, m: Timestamp) -> bool {
    match r {
        Recurrence::Once(t) => *t == m,
        Recurrence::Cron(cron) => {
            if cron.determine_job_type() == croner::JobType::FixedTime {
                shown_or_skipped(m, tz)
                    .into_iter()
                    .any(|l| cron_matches_civil(cron, l) && first_reaches(m, tz, l))
            } else {
                cron_matches_civil(cron, civil(m, tz))
            }
        }
        Recurrence::Every { n, unit, anchor } => {
            let n = i64::from(*n);
            let step = match unit {
                Unit::Minutes => 60 * n,
                Unit::Hours => 3600 * n,
                _ => {
                    let a = anchor.with_time_zone(tz.clone()).datetime();
                    return shown_or_skipped(m, tz).into_iter().any(|l| {
                        l.time() == a.time() && on_lattice(a.date(), l.date(), n, *unit)
                    } && first_reaches(m, tz, l));
                }
            };
            let d = m.as_second() - anchor.timestamp().as_second();
            d >= 0 && d % step == 0 && m.subsec_nanosecond() == 0
        }
    }
}

/// Whether `d` is `a + k·n units` for some k ≥ 0 (months clamped to the last day).
fn on_lattice(a: Date, d: Date, n: i64, unit: Unit) -> bool {
    match unit {
        Unit::Days | Unit::Weeks => {
            let per = if unit == Unit::Weeks { 7 * n } else { n };
            let days = i64::from(a.until(d).expect("in range").get_days());
            days >= 0 && days % per == 0
        }
        _ => {
            let per = if unit == Unit::Years { 12 * n } else { n };
            let months = (i64::from(d.year()) * 12 + i64::from(d.month()))
                - (i64::from(a.year()) * 12 + i64::from(a.month()));
            let day = a.day().min(d.days_in_month());
            months >= 0 && months % per == 0 && d.day() == day
        }
    }
}

/// The first minute after `t`, up to `horizon` minutes, where the reference rule matches.
fn scan(r: &Recurrence, tz: &TimeZone, t: Timestamp, horizon: i64) -> Option<Timestamp> {
    let secs = t.as_second();
    let first = (secs.div_euclid(60) + 1) * 60;
    (0..horizon)
        .map(|i| Timestamp::from_second(first + 60 * i).expect("in range"))
        .find(|m| reference_matches(r, tz, *m))
}

fn cron_expr() -> impl Strategy<Value = String> {
    let minute = prop::sample::select(vec!["*", "*/15", "0", "30", "0,30", "5-10", "*/7", "45"]);
    let hour = prop::sample::select(vec!["*", "2", "1-3", "*/3", "20", "0", "1", "3"]);
    let dom = prop::sample::select(vec!["*", "*", "1", "L", "15", "29"]);
    let month = prop::sample::select(vec!["*", "*", "*", "3", "10,11", "4"]);
    let dow = prop::sample::select(vec!["*", "*", "*", "SAT", "1-5", "0"]);
    (minute, hour, dom, month, dow).prop_map(|(a, b, c, d, e)| format!("{a} {b} {c} {d} {e}"))
}

/// Cron expressions with at most a few occurrences a day (for day-long simulations).
fn sparse_cron_expr() -> impl Strategy<Value = String> {
    let minute = prop::sample::select(vec!["0", "30", "15"]);
    let hour = prop::sample::select(vec!["*/2", "20", "2", "*/6", "8", "7-9"]);
    let dow = prop::sample::select(vec!["*", "*", "SAT", "1-5"]);
    (minute, hour, dow).prop_map(|(a, b, c)| format!("{a} {b} * * {c}"))
}

fn every_expr() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![
            ("m", 1u32, 90u32),
            ("h", 1, 30),
            ("d", 1, 10),
            ("w", 1, 3),
            ("mo", 1, 4),
            ("y", 1, 2),
        ]),
        1u32..=90,
        1i8..=12,
        prop::sample::select(vec![1i8, 15, 28, 29, 30, 31]),
        // Mostly the hours in which the test zones change their clocks.
        prop::sample::select(vec![0i8, 1, 1, 2, 2, 2, 3, 8, 20, 23]),
        prop::sample::select(vec![0i8, 15, 30, 45, 7]),
    )
        .prop_map(|((unit, lo, hi), n, month, day, hour, minute)| {
            let n = lo + n % (hi - lo + 1);
            let date = Date::new(2025, month, 1).expect("date");
            let day = day.min(date.days_in_month());
            format!("every {n}{unit} from 2025-{month:02}-{day:02}T{hour:02}:{minute:02}")
        })
}

fn instant() -> impl Strategy<Value = Timestamp> {
    (
        prop::sample::select(NEAR.to_vec()),
        -2160i64..2160,
        0i64..60,
    )
        .prop_map(|(near, mins, s)| {
            at(near) + SignedDuration::from_mins(mins) + SignedDuration::from_secs(s)
        })
}

fn check_against_scan(expr: &str, zone_name: &str, t: Timestamp, horizon: i64) {
    let tz = zone(zone_name);
    let r = Recurrence::parse(expr, &tz).expect("a generated expression");
    let next = r.next_after(t, &tz);
    if let Some(n) = next {
        assert!(n > t, "{expr} in {zone_name}: next_after({t}) = {n}");
    }
    let scanned = scan(&r, &tz, t, horizon);
    match scanned {
        Some(s) => assert_eq!(next, Some(s), "{expr} in {zone_name} after {t}"),
        None => assert!(
            next.is_none_or(|n| n >= t + SignedDuration::from_mins(horizon)),
            "{expr} in {zone_name} after {t}: {next:?} inside the scanned horizon"
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cal_16_prop_cron_next_after_equals_a_minute_scan(
        expr in cron_expr(), zone_name in prop::sample::select(ZONES.to_vec()), t in instant(),
    ) {
        check_against_scan(&expr, zone_name, t, 3 * 1440);
    }

    #[test]
    fn cal_16_prop_every_next_after_equals_a_minute_scan(
        expr in every_expr(), zone_name in prop::sample::select(ZONES.to_vec()), t in instant(),
    ) {
        check_against_scan(&expr, zone_name, t, 3 * 1440);
    }

    #[test]
    fn cal_01_prop_next_after_is_later_and_monotone(
        expr in prop_oneof![cron_expr(), every_expr()],
        zone_name in prop::sample::select(ZONES.to_vec()),
        t1 in instant(), gap_secs in 0i64..(3 * 86_400),
    ) {
        let tz = zone(zone_name);
        let r = Recurrence::parse(&expr, &tz).expect("a generated expression");
        let t2 = t1 + SignedDuration::from_secs(gap_secs);
        let (n1, n2) = (r.next_after(t1, &tz), r.next_after(t2, &tz));
        prop_assert!(n1.is_none_or(|n| n > t1));
        prop_assert!(n2.is_none_or(|n| n > t2));
        if let (Some(a), Some(b)) = (n1, n2) {
            prop_assert!(a <= b, "{} in {}: {} > {}", expr, zone_name, a, b);
        }
        if let Some(last) = r.last_at_or_before(t2, &tz) {
            prop_assert!(last <= t2);
            prop_assert!(r.next_after(last, &tz).is_none_or(|n| n > t2));
        }
    }

    #[test]
    fn cal_11_prop_backup_day_is_monotone_and_contains_its_instant(
        expr in prop::sample::select(vec![
            "0 8 * * *", "0 8 * * 1-5", "30 2 * * *", "0 0 * * SAT", "0 6 1 * *",
            "every 1d from 2025-01-01T02:30", "every 2d from 2026-03-28T02:15",
            "every 1w from 2025-06-01T23:30",
        ]),
        zone_name in prop::sample::select(ZONES.to_vec()),
        t1 in instant(), gap_secs in 0i64..(10 * 86_400),
    ) {
        let days = BackupDays::new(sched(NEWDAY_SCHEDULE, expr, &zone(zone_name)));
        let t2 = t1 + SignedDuration::from_secs(gap_secs);
        let (b1, b2) = (days.bounds(t1), days.bounds(t2));
        prop_assert!(b1.day <= b2.day, "{} in {}: {:?} then {:?}", expr, zone_name, b1, b2);
        prop_assert!(b1.contains(t1) && b2.contains(t2));
        if let Some(end) = b1.end {
            prop_assert!(days.bounds(end).day > b1.day || days.bounds(end).start == end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    #[test]
    fn cal_16_prop_next_after_equals_a_minute_scan_over_a_year(
        expr in prop_oneof![cron_expr(), every_expr()],
        zone_name in prop::sample::select(ZONES[1..].to_vec()),
    ) {
        let tz = zone(zone_name);
        let r = Recurrence::parse(&expr, &tz).expect("a generated expression");
        let start = at("2026-01-01T00:00Z");
        let end = at("2027-01-01T00:00Z");
        let mut expected = Vec::new();
        let mut m = start + SignedDuration::from_mins(1);
        while m <= end {
            if reference_matches(&r, &tz, m) {
                expected.push(m);
            }
            m += SignedDuration::from_mins(1);
        }
        let mut got = Vec::new();
        let mut t = start;
        while let Some(n) = r.next_after(t, &tz).filter(|n| *n <= end) {
            got.push(n);
            t = n;
        }
        prop_assert_eq!(got, expected, "{} in {}", expr, zone_name);
    }

    #[test]
    fn cal_04_prop_priority_zero_is_never_suppressed_and_suppresses_nothing(
        events in prop::collection::vec((sparse_cron_expr(), 0i64..4, any::<bool>()), 2..6),
    ) {
        let tz = berlin();
        let start = at("2026-03-27T09:00[Europe/Berlin]");
        let schedules: Vec<Schedule> = events
            .iter()
            .enumerate()
            .map(|(i, (expr, _, _))| sched(&format!("S{i}"), expr, &tz))
            .collect();
        let evs: Vec<Event> = events
            .iter()
            .enumerate()
            .map(|(i, (_, p, blocking))| {
                let id = i as u64 + 1;
                Event { blocking: *blocking, ..plan_event(id, "e", &format!("S{i}"), "same", *p) }
            })
            .collect();
        let mut sim = Sim::new(schedules, evs.clone(), start);
        let clock = ManualClock::new(start);
        sim.run_until(&clock, at("2026-03-30T09:00[Europe/Berlin]"));
        for o in &sim.occurrences {
            if let OccurrenceOutcome::Suppressed { by } = o.outcome {
                let me = evs.iter().find(|e| e.id == o.event).expect("event");
                let them = evs.iter().find(|e| e.id == by).expect("event");
                prop_assert!(!me.priority.is_always());
                prop_assert!(them.priority > me.priority);
            }
            let me = evs.iter().find(|e| e.id == o.event);
            if me.is_some_and(|e| e.priority.is_always()) {
                let suppressed = matches!(o.outcome, OccurrenceOutcome::Suppressed { .. });
                prop_assert!(!suppressed, "priority 0 suppressed: {:?}", o);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn cal_19_prop_started_events_do_not_depend_on_how_the_clock_moves(
        events in prop::collection::vec(
            (sparse_cron_expr(), 0i64..4, any::<bool>(), any::<bool>()), 2..6,
        ),
    ) {
        let tz = berlin();
        // A Saturday backup day in which Berlin falls back (25 October 2026).
        let from = at("2026-10-24T08:00[Europe/Berlin]");
        let to = at("2026-10-25T07:59[Europe/Berlin]");
        let make = || {
            let schedules: Vec<Schedule> = events
                .iter()
                .enumerate()
                .map(|(i, (expr, ..))| sched(&format!("S{i}"), expr, &tz))
                .collect();
            let evs: Vec<Event> = events
                .iter()
                .enumerate()
                .map(|(i, (_, p, blocking, other))| Event {
                    blocking: *blocking,
                    ..plan_event(
                        i as u64 + 1,
                        "e",
                        &format!("S{i}"),
                        if *other { "b" } else { "a" },
                        *p,
                    )
                })
                .collect();
            Sim::new(schedules, evs, from)
        };
        let minute = SignedDuration::from_mins(1);

        let clock = ManualClock::new(from);
        let mut stepped = make();
        while clock.now() < to {
            clock.advance(minute);
            stepped.tick(clock.now());
        }

        let clock = ManualClock::new(from);
        let mut heap = make();
        heap.run_until(&clock, to);
        let key = |s: &Sim| {
            let mut v: Vec<(EventId, Timestamp, Option<OccurrenceOutcome>)> = s
                .occurrences
                .iter()
                .map(|o| {
                    let outcome = match o.outcome {
                        OccurrenceOutcome::Started(_) => None,
                        other => Some(other),
                    };
                    (o.event, o.due, outcome)
                })
                .collect();
            v.sort_by_key(|(e, t, _)| (*e, *t));
            v
        };
        prop_assert_eq!(key(&stepped), key(&heap));

        let clock = ManualClock::new(from);
        let mut jump = make();
        clock.set(to);
        jump.tick(clock.now());
        prop_assert_eq!(jump.started_by_day(), stepped.started_by_day());
    }
}
