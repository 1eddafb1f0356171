//! `timezero schedule ...` and `timezero event ...` (docs/orchestration.md, sections 2
//! "Calendar" and 3.4): the calendar's schedules and events in the store, the next occurrences
//! of an expression, and what would start at an instant.
//!
//! Commands that change the calendar write one transaction each, with the store's
//! preconditions (a schedule removed only when no event uses it, an event name taken once, ...);
//! the checks made here first only give a clearer message. A new or re-enabled event, and the
//! events of an edited schedule, get their next occurrence strictly after now (CAL-10): nothing
//! starts at once. `schedule next`, `schedule due` and the lists only read, and do not create a
//! store that does not exist yet.

use std::path::PathBuf;

use clap::Subcommand;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Serialize;

use super::jobs::ensure_newday;
use super::plan::parse_at;
use super::state::StateDir;
use super::Fail;
use crate::calendar::{
    self, due_at, parse_time, CalendarView, Event, EventKind, Schedule, Verdict,
};
use crate::command::output::json;
use crate::job::{calendar_records, schedule_of};
use crate::limits::SCHEDULE_NEXT_COUNT_MAX;
use crate::store::{
    Change, EventId, EventRow, IdKind, Priority, ScheduleRow, Store, StoreError, Toggle,
};

/// `--state` and `--json`, taken by every calendar command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StateArgs {
    /// The state directory (default: $TIMEZERO_STATE, else /var/lib/timezero).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `timezero schedule ...`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCmd {
    /// Add a schedule: a cron expression (`0 20 * * *`, `0 21 L * *`), `every N UNIT from TIME`
    /// (`every 1w from 2027-01-01T20:00`; units m, h, d, w, mo, y) or `once TIME`. With
    /// --replace, edit an existing one: its events move to their next occurrence after now.
    Add {
        /// Its name.
        name: String,
        /// When it recurs.
        expr: String,
        /// The zone its wall clock times are read in (default: the system's).
        #[arg(long)]
        tz: Option<String>,
        /// Replace the schedule of this name (CAL-10).
        #[arg(long)]
        replace: bool,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// Remove a schedule no event uses.
    Rm {
        /// The schedule.
        name: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// Enable a schedule: its events run again.
    Enable {
        /// The schedule.
        name: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// Disable a schedule: its events' occurrences are recorded `schedule disabled` (CAL-09).
    Disable {
        /// The schedule.
        name: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// The schedules: expression, zone, enabled, events using it, next occurrence.
    List {
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// The next occurrences of a schedule (by name) or of an expression, normalised.
    Next {
        /// A schedule's name, or an expression.
        what: String,
        /// How many occurrences.
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// The zone of an expression (default: the system's).
        #[arg(long)]
        tz: Option<String>,
        /// Count from this instant (default: now).
        #[arg(long, default_value = "now")]
        from: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// What would start at TIME, and why every other event with an occurrence at TIME would not
    /// (CAL-18). Writes nothing.
    Due {
        /// The instant: RFC 3339, `2026-12-24T20:00[Europe/Berlin]`, a date and time in the
        /// system's zone, `now`, or `+DURATION`.
        #[arg(long)]
        at: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
}

/// `timezero event ...`.
#[derive(Debug, Subcommand)]
pub enum EventCmd {
    /// Add an event: what starts (a plan, a command, maintenance of a destination) on which
    /// schedule, at which priority (0 = always runs, 1 lowest .. 99 highest).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["plan", "command", "maintenance"])))]
    Add {
        /// Its name.
        name: String,
        /// The schedule it uses.
        #[arg(long)]
        schedule: String,
        /// Run this plan.
        #[arg(long)]
        plan: Option<String>,
        /// Run this command (its argv after `--`).
        #[arg(long, requires = "argv")]
        command: Option<String>,
        /// Maintenance of this destination.
        #[arg(long)]
        maintenance: Option<String>,
        /// Priority 0..=99 (default 1).
        #[arg(long, default_value_t = 1)]
        priority: i64,
        /// A blocking event: starts nothing; on its days it suppresses similar events of lower
        /// priority (CAL-08).
        #[arg(long)]
        blocking: bool,
        /// The command's argv.
        #[arg(last = true)]
        argv: Vec<String>,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// Remove an event that started no job still in the history (disable it otherwise).
    Rm {
        /// The event.
        name: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// Enable an event: it runs from its next occurrence after now.
    Enable {
        /// The event.
        name: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// Disable an event.
    Disable {
        /// The event.
        name: String,
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
    /// The events: schedule, what they start, priority, blocking, enabled, next occurrence.
    List {
        /// `--state` and `--json`.
        #[command(flatten)]
        common: StateArgs,
    },
}

/// Why a calendar command refused (one line; exit 1 unless said).
#[derive(Debug, thiserror::Error)]
pub enum CalendarCmdError {
    /// No schedule of this name.
    #[error("no schedule {0:?} (timezero schedule list)")]
    UnknownSchedule(String),
    /// No event of this name.
    #[error("no event {0:?} (timezero event list)")]
    UnknownEvent(String),
    /// A schedule of this name exists.
    #[error("schedule {0:?} exists (--replace edits it)")]
    DuplicateSchedule(String),
    /// An event of this name exists.
    #[error("event {0:?} exists")]
    DuplicateEvent(String),
    /// Events use the schedule.
    #[error("schedule {name:?} is used by events {events}: remove or move them first")]
    ScheduleInUse {
        /// The schedule.
        name: String,
        /// The events, comma separated.
        events: String,
    },
    /// NEWDAY is not removed (CAL-11).
    #[error("event {0:?} is NEWDAY, which cannot be removed (its schedule can be edited)")]
    Newday(String),
    /// The event started jobs still in the history.
    #[error("event {name:?} started jobs still in the history ({detail}): disable it instead")]
    EventHasJobs {
        /// The event.
        name: String,
        /// The store's words.
        detail: String,
    },
    /// Usage: priority outside 0..=99 (exit 2).
    #[error("--priority {0}: priorities are 0 (always runs) or 1 (lowest) to 99 (highest)")]
    Priority(i64),
    /// Usage: an expression or time that does not parse (exit 2).
    #[error("{0}")]
    Expression(#[from] calendar::RecurrenceError),
    /// Usage: an unknown zone (exit 2).
    #[error("--tz {0:?} is not a zone of the tz database")]
    Zone(String),
    /// Usage: a bad count (exit 2).
    #[error("--count {0} is not from 1 to {max}", max = SCHEDULE_NEXT_COUNT_MAX)]
    Count(usize),
    /// Usage: an empty name or one with white space (exit 2).
    #[error("name {0:?} must be non-empty, without white space")]
    Name(String),
    /// The store refused or failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The stored calendar does not read.
    #[error("{0}")]
    Job(#[from] crate::job::JobError),
}

impl From<CalendarCmdError> for Fail {
    fn from(e: CalendarCmdError) -> Fail {
        use CalendarCmdError as E;
        match e {
            E::Priority(_) | E::Expression(_) | E::Zone(_) | E::Count(_) | E::Name(_) => {
                Fail::Usage(e.to_string())
            }
            _ => Fail::Message(e.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, CalendarCmdError>;

/// The zone `--tz` names, else the system's (by its IANA name, so that a schedule stores it).
pub(super) fn zone_arg(tz: Option<&str>) -> Result<(String, TimeZone)> {
    match tz {
        Some(name) => TimeZone::get(name)
            .map(|z| (name.to_string(), z))
            .map_err(|_| CalendarCmdError::Zone(name.to_string())),
        None => {
            let name = TimeZone::system().iana_name().unwrap_or("UTC").to_string();
            let zone = TimeZone::get(&name).unwrap_or(TimeZone::UTC);
            Ok((name, zone))
        }
    }
}

/// `--at` / `--from`: `now`, `+DURATION`, RFC 3339, `DATE-TIME[ZONE]`, or a date and time in
/// `zone`.
pub(super) fn instant_arg(
    text: &str,
    now: Timestamp,
    zone: &TimeZone,
) -> std::result::Result<Timestamp, Fail> {
    match parse_at(text, now) {
        Ok(t) => Ok(t),
        Err(first) => parse_time(text, zone)
            .map(|z| z.timestamp())
            .map_err(|_| first),
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(CalendarCmdError::Name(name.to_string()));
    }
    Ok(())
}

/// The calendar as the store holds it, with the default NEWDAY (in memory only) when the store
/// has none yet.
pub(super) fn read_view(store: &dyn Store) -> Result<CalendarView> {
    let (mut schedules, mut events, occurrences) = calendar_records(store)?;
    if !events.iter().any(|e| e.kind == EventKind::Newday) {
        if !schedules
            .iter()
            .any(|s| s.name == calendar::NEWDAY_SCHEDULE)
        {
            schedules.push(calendar::default_newday_schedule(zone_arg(None)?.1));
        }
        events.push(EventRow {
            id: EventId(0),
            name: "NEWDAY".to_string(),
            schedule: calendar::NEWDAY_SCHEDULE.to_string(),
            kind: EventKind::Newday,
            priority: Priority::ALWAYS,
            blocking: false,
            enabled: true,
            next_due: None,
        });
    }
    Ok(CalendarView::new(schedules, events, occurrences).map_err(crate::job::JobError::from)?)
}

/// An instant as the calendar prints it: in `zone`, to the second, with offset and zone.
pub(super) fn show_time(t: Timestamp, zone: &TimeZone) -> String {
    t.to_zoned(zone.clone())
        .strftime("%Y-%m-%dT%H:%M:%S%:z[%Q]")
        .to_string()
}

/// The reason a verdict gives, in words: `starts (backup day 20261031)`, `suppressed by
/// monthend (priority 3)`, `blocked by xmas (priority 9)`, ...
pub(super) fn verdict_text(view: &CalendarView, v: &Verdict) -> (&'static str, String) {
    match v {
        Verdict::Start { backup_day } => ("start", format!("starts (backup day {backup_day})")),
        Verdict::Suppressed { by, by_priority } => by_text(view, *by, Some(*by_priority)),
        Verdict::Activated => (
            "activated",
            "blocking: starts nothing, suppresses similar events of lower priority".to_string(),
        ),
        Verdict::ScheduleDisabled => ("schedule_disabled", "its schedule is disabled".to_string()),
        Verdict::EventDisabled => ("event_disabled", "the event is disabled".to_string()),
        Verdict::Newday { ending, starting } => (
            "newday",
            format!("NEWDAY: backup day {ending} ends, {starting} starts"),
        ),
    }
}

/// `suppressed by NAME (priority N)`, or `blocked by NAME (priority N)` when NAME is a blocking
/// event.
pub(super) fn by_text(
    view: &CalendarView,
    by: EventId,
    priority: Option<Priority>,
) -> (&'static str, String) {
    let e = view.events().get(&by);
    let name = e.map_or_else(|| by.to_string(), |e| e.name.clone());
    let p = priority.or(e.map(|e| e.priority));
    let p = p
        .map(|p| format!(" (priority {})", p.get()))
        .unwrap_or_default();
    if e.is_some_and(|e| e.blocking) {
        ("blocked", format!("blocked by {name}{p}"))
    } else {
        ("suppressed", format!("suppressed by {name}{p}"))
    }
}

/// `timezero schedule ...`.
pub(super) fn schedule(cmd: ScheduleCmd) -> std::result::Result<String, Fail> {
    match cmd {
        ScheduleCmd::Add {
            name,
            expr,
            tz,
            replace,
            common,
        } => Ok(schedule_add(&name, &expr, tz.as_deref(), replace, &common)?),
        ScheduleCmd::Rm { name, common } => Ok(schedule_rm(&name, &common)?),
        ScheduleCmd::Enable { name, common } => Ok(schedule_enable(&name, true, &common)?),
        ScheduleCmd::Disable { name, common } => Ok(schedule_enable(&name, false, &common)?),
        ScheduleCmd::List { common } => schedule_list(&common),
        ScheduleCmd::Next {
            what,
            count,
            tz,
            from,
            common,
        } => schedule_next(&what, count, tz.as_deref(), &from, &common),
        ScheduleCmd::Due { at, common } => schedule_due(&at, &common),
    }
}

/// What the changing commands print with `--json`.
#[derive(Debug, Serialize)]
struct Done<'a> {
    what: &'static str,
    name: &'a str,
    done: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_due: Option<String>,
}

fn done(common: &StateArgs, what: &'static str, name: &str, d: &'static str) -> String {
    done_next(common, what, name, d, None)
}

fn done_next(
    common: &StateArgs,
    what: &'static str,
    name: &str,
    d: &'static str,
    next_due: Option<String>,
) -> String {
    if common.json {
        return json(&Done {
            what,
            name,
            done: d,
            next_due,
        })
        .unwrap_or_default();
    }
    match next_due {
        Some(n) => format!("{what} {name} {d}, next {n}\n"),
        None => format!("{what} {name} {d}\n"),
    }
}

fn open(
    common: &StateArgs,
) -> std::result::Result<std::sync::Arc<crate::store::SqliteStore>, Fail> {
    StateDir::new(common.state.clone()).open_store()
}

fn schedule_add(
    name: &str,
    expr: &str,
    tz: Option<&str>,
    replace: bool,
    common: &StateArgs,
) -> std::result::Result<String, Fail> {
    check_name(name)?;
    let (zone_name, zone) = zone_arg(tz)?;
    let parsed = Schedule::parse(name, expr, zone).map_err(CalendarCmdError::from)?;
    let store = open(common)?;
    let exists = store
        .schedules()
        .map_err(CalendarCmdError::from)?
        .iter()
        .any(|s| s.name == name);
    match (exists, replace) {
        (true, false) => return Err(CalendarCmdError::DuplicateSchedule(name.to_string()).into()),
        (false, true) => return Err(CalendarCmdError::UnknownSchedule(name.to_string()).into()),
        _ => {}
    }
    let enabled = !replace
        || store
            .schedules()
            .map_err(CalendarCmdError::from)?
            .iter()
            .any(|s| s.name == name && s.enabled);
    let row = ScheduleRow {
        name: name.to_string(),
        expr: parsed.recurrence.to_string(),
        zone: zone_name,
        enabled,
    };
    let mut changes = vec![Change::PutSchedule {
        schedule: row,
        replace,
    }];
    if replace {
        // CAL-10: the events of the edited schedule move to its next occurrence after now.
        let now = Timestamp::now();
        let view = read_view(&*store)?;
        for d in calendar::reschedule(&view, &parsed, now)
            .map_err(crate::job::JobError::from)
            .map_err(CalendarCmdError::from)?
        {
            if let calendar::Decision::Advance { event, from, to } = d {
                if event != EventId(0) {
                    changes.push(Change::AdvanceEvent { event, from, to });
                }
            }
        }
    }
    store.commit(changes).map_err(CalendarCmdError::from)?;
    let next = parsed
        .next_after(Timestamp::now())
        .map(|t| show_time(t, &parsed.zone));
    Ok(done_next(
        common,
        "schedule",
        name,
        if replace { "replaced" } else { "added" },
        next,
    ))
}

fn schedule_rm(name: &str, common: &StateArgs) -> Result<String> {
    let store = StateDir::new(common.state.clone())
        .read_store()
        .map_err(|_| CalendarCmdError::UnknownSchedule(name.to_string()))?;
    if !store.schedules()?.iter().any(|s| s.name == name) {
        return Err(CalendarCmdError::UnknownSchedule(name.to_string()));
    }
    let users: Vec<String> = store
        .events()?
        .into_iter()
        .filter(|e| e.schedule == name)
        .map(|e| e.name)
        .collect();
    if !users.is_empty() {
        return Err(CalendarCmdError::ScheduleInUse {
            name: name.to_string(),
            events: users.join(", "),
        });
    }
    store.commit(vec![Change::RemoveSchedule {
        name: name.to_string(),
    }])?;
    Ok(done(common, "schedule", name, "removed"))
}

fn schedule_enable(name: &str, enabled: bool, common: &StateArgs) -> Result<String> {
    let store = StateDir::new(common.state.clone())
        .read_store()
        .map_err(|_| CalendarCmdError::UnknownSchedule(name.to_string()))?;
    if !store.schedules()?.iter().any(|s| s.name == name) {
        return Err(CalendarCmdError::UnknownSchedule(name.to_string()));
    }
    if !enabled && name == calendar::NEWDAY_SCHEDULE {
        eprintln!(
            "timezero: warning: with NEWDAY's schedule disabled, backup days still follow it but \
             NEWDAY cancels and trims nothing"
        );
    }
    store.commit(vec![Change::SetEnabled {
        what: Toggle::Schedule(name.to_string()),
        enabled,
    }])?;
    Ok(done(
        common,
        "schedule",
        name,
        if enabled { "enabled" } else { "disabled" },
    ))
}

/// One line of `schedule list`.
#[derive(Debug, Serialize)]
struct ScheduleLine {
    name: String,
    expr: String,
    zone: String,
    enabled: bool,
    events: Vec<String>,
    next: Option<String>,
}

fn schedule_list(common: &StateArgs) -> std::result::Result<String, Fail> {
    let store = StateDir::new(common.state.clone()).read_store()?;
    let events = store.events().map_err(CalendarCmdError::from)?;
    let now = Timestamp::now();
    let mut lines = Vec::new();
    for row in store.schedules().map_err(CalendarCmdError::from)? {
        let next = schedule_of(row.clone())
            .ok()
            .and_then(|s| s.next_after(now).map(|t| show_time(t, &s.zone)));
        lines.push(ScheduleLine {
            events: events
                .iter()
                .filter(|e| e.schedule == row.name)
                .map(|e| e.name.clone())
                .collect(),
            name: row.name,
            expr: row.expr,
            zone: row.zone,
            enabled: row.enabled,
            next,
        });
    }
    if common.json {
        return Ok(json(&lines)?);
    }
    if lines.is_empty() {
        return Ok("no schedules\n".to_string());
    }
    Ok(lines
        .iter()
        .map(|l| {
            format!(
                "{}  {}  {}  {}  events [{}]  next {}\n",
                l.name,
                l.expr,
                l.zone,
                if l.enabled { "enabled" } else { "disabled" },
                l.events.join(", "),
                l.next.as_deref().unwrap_or("none")
            )
        })
        .collect())
}

/// What `schedule next --json` prints.
#[derive(Debug, Serialize)]
struct NextOut {
    schedule: Option<String>,
    expr: String,
    zone: String,
    occurrences: Vec<String>,
}

fn schedule_next(
    what: &str,
    count: usize,
    tz: Option<&str>,
    from: &str,
    common: &StateArgs,
) -> std::result::Result<String, Fail> {
    if count == 0 || count > SCHEDULE_NEXT_COUNT_MAX {
        return Err(CalendarCmdError::Count(count).into());
    }
    let store = StateDir::new(common.state.clone()).read_store()?;
    let stored = store
        .schedules()
        .map_err(CalendarCmdError::from)?
        .into_iter()
        .find(|s| s.name == what);
    let (name, schedule, zone_name) = match stored {
        Some(row) => {
            let zone = row.zone.clone();
            (
                Some(row.name.clone()),
                schedule_of(row).map_err(CalendarCmdError::from)?,
                zone,
            )
        }
        None => {
            let (zone_name, zone) = zone_arg(tz)?;
            let s = Schedule::parse("-", what, zone).map_err(CalendarCmdError::from)?;
            (None, s, zone_name)
        }
    };
    let start = instant_arg(from, Timestamp::now(), &schedule.zone)?;
    let occurrences: Vec<String> = schedule
        .upcoming(start, count)
        .into_iter()
        .map(|t| show_time(t, &schedule.zone))
        .collect();
    let out = NextOut {
        schedule: name,
        expr: schedule.recurrence.to_string(),
        zone: zone_name,
        occurrences,
    };
    if common.json {
        return Ok(json(&out)?);
    }
    let mut s = format!("{} ({})\n", out.expr, out.zone);
    if out.occurrences.is_empty() {
        s += "no further occurrence\n";
    }
    for o in &out.occurrences {
        s += o;
        s += "\n";
    }
    Ok(s)
}

/// One line of `schedule due --json`.
#[derive(Debug, Serialize)]
struct DueLine {
    event: String,
    name: String,
    priority: u8,
    due: String,
    verdict: &'static str,
    reason: String,
}

fn schedule_due(at: &str, common: &StateArgs) -> std::result::Result<String, Fail> {
    let store = StateDir::new(common.state.clone()).read_store()?;
    let view = read_view(&*store)?;
    let zone = view.backup_days().schedule().zone.clone();
    let t = instant_arg(at, Timestamp::now(), &zone)?;
    let lines: Vec<DueLine> = due_at(&view, t)
        .into_iter()
        .map(|d| {
            let (verdict, reason) = verdict_text(&view, &d.verdict);
            DueLine {
                event: d.event.to_string(),
                name: d.name,
                priority: d.priority.get(),
                due: show_time(d.due, &zone),
                verdict,
                reason,
            }
        })
        .collect();
    if common.json {
        return Ok(json(&lines)?);
    }
    if lines.is_empty() {
        return Ok(format!("nothing is due at {}\n", show_time(t, &zone)));
    }
    Ok(lines
        .iter()
        .map(|l| {
            format!(
                "{}  {}  priority {}  {}\n",
                l.due, l.name, l.priority, l.reason
            )
        })
        .collect())
}

/// `timezero event ...`.
pub(super) fn event(cmd: EventCmd) -> std::result::Result<String, Fail> {
    match cmd {
        EventCmd::Add {
            name,
            schedule,
            plan,
            command,
            maintenance,
            priority,
            blocking,
            argv,
            common,
        } => {
            let kind = match (plan, command, maintenance) {
                (Some(plan), _, _) => EventKind::Plan { plan },
                (_, Some(name), _) => EventKind::Command { name, argv },
                (_, _, Some(dest)) => EventKind::Maintenance { dest },
                _ => {
                    return Err(Fail::Usage(
                        "say what the event starts: --plan, --command or --maintenance".into(),
                    ))
                }
            };
            event_add(&name, &schedule, kind, priority, blocking, &common)
        }
        EventCmd::Rm { name, common } => Ok(event_rm(&name, &common)?),
        EventCmd::Enable { name, common } => Ok(event_enable(&name, true, &common)?),
        EventCmd::Disable { name, common } => Ok(event_enable(&name, false, &common)?),
        EventCmd::List { common } => event_list(&common),
    }
}

fn event_add(
    name: &str,
    schedule: &str,
    kind: EventKind,
    priority: i64,
    blocking: bool,
    common: &StateArgs,
) -> std::result::Result<String, Fail> {
    check_name(name)?;
    let priority = Priority::new(priority).map_err(|_| CalendarCmdError::Priority(priority))?;
    let store = open(common)?;
    let row = store
        .schedules()
        .map_err(CalendarCmdError::from)?
        .into_iter()
        .find(|s| s.name == schedule)
        .ok_or_else(|| CalendarCmdError::UnknownSchedule(schedule.to_string()))?;
    if store
        .events()
        .map_err(CalendarCmdError::from)?
        .iter()
        .any(|e| e.name == name)
    {
        return Err(CalendarCmdError::DuplicateEvent(name.to_string()).into());
    }
    let now = Timestamp::now();
    ensure_newday(&*store, now)?;
    let parsed = schedule_of(row).map_err(CalendarCmdError::from)?;
    let next_due = parsed.next_after(now);
    let id = EventId(
        store
            .allocate(IdKind::Event)
            .map_err(CalendarCmdError::from)?,
    );
    store
        .commit(vec![Change::PutEvent {
            event: EventRow {
                id,
                name: name.to_string(),
                schedule: schedule.to_string(),
                kind,
                priority,
                blocking,
                enabled: true,
                next_due,
            },
            replace: false,
        }])
        .map_err(CalendarCmdError::from)?;
    Ok(done_next(
        common,
        "event",
        name,
        "added",
        next_due.map(|t| show_time(t, &parsed.zone)),
    ))
}

fn find_event(store: &dyn Store, name: &str) -> Result<Event> {
    store
        .events()?
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| CalendarCmdError::UnknownEvent(name.to_string()))
}

fn event_rm(name: &str, common: &StateArgs) -> Result<String> {
    let store = StateDir::new(common.state.clone())
        .read_store()
        .map_err(|_| CalendarCmdError::UnknownEvent(name.to_string()))?;
    let e = find_event(&*store, name)?;
    if e.kind == EventKind::Newday {
        return Err(CalendarCmdError::Newday(name.to_string()));
    }
    match store.commit(vec![Change::RemoveEvent { event: e.id }]) {
        Ok(()) => Ok(done(common, "event", name, "removed")),
        Err(StoreError::Conflict { what, .. }) if what.contains("job") => {
            Err(CalendarCmdError::EventHasJobs {
                name: name.to_string(),
                detail: what,
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn event_enable(name: &str, enabled: bool, common: &StateArgs) -> Result<String> {
    let store = StateDir::new(common.state.clone())
        .read_store()
        .map_err(|_| CalendarCmdError::UnknownEvent(name.to_string()))?;
    let e = find_event(&*store, name)?;
    let mut changes = vec![Change::SetEnabled {
        what: Toggle::Event(e.id),
        enabled,
    }];
    let mut next = None;
    if enabled {
        // It runs from its next occurrence after now, never at once (CAL-10).
        let view = read_view(&*store)?;
        let now = Timestamp::now();
        if let calendar::Decision::Advance { event, from, to } =
            calendar::reschedule_event(&view, e.id, now).map_err(crate::job::JobError::from)?
        {
            changes.push(Change::AdvanceEvent { event, from, to });
            let zone = view
                .schedules()
                .get(&e.schedule)
                .map_or(TimeZone::UTC, |s| s.zone.clone());
            next = to.map(|t| show_time(t, &zone));
        }
    } else if e.kind == EventKind::Newday {
        eprintln!(
            "timezero: warning: NEWDAY disabled: backup days still change at its occurrences, \
             but it cancels and trims nothing"
        );
    }
    store.commit(changes)?;
    Ok(done_next(
        common,
        "event",
        name,
        if enabled { "enabled" } else { "disabled" },
        next,
    ))
}

/// One line of `event list`.
#[derive(Debug, Serialize)]
struct EventLine {
    #[serde(flatten)]
    event: EventRow,
    next: Option<String>,
}

/// What an event starts, in words.
pub(super) fn kind_text(kind: &EventKind) -> String {
    match kind {
        EventKind::Plan { plan } => format!("plan {plan}"),
        EventKind::Command { name, argv } => format!("command {name} {}", argv.join(" "))
            .trim_end()
            .to_string(),
        EventKind::Maintenance { dest } => format!("maintenance {dest}"),
        EventKind::Newday => "NEWDAY".to_string(),
    }
}

fn event_list(common: &StateArgs) -> std::result::Result<String, Fail> {
    let store = StateDir::new(common.state.clone()).read_store()?;
    let view = read_view(&*store)?;
    let mut lines = Vec::new();
    for e in store.events().map_err(CalendarCmdError::from)? {
        let zone = view
            .schedules()
            .get(&e.schedule)
            .map_or(TimeZone::UTC, |s| s.zone.clone());
        lines.push(EventLine {
            next: e.next_due.map(|t| show_time(t, &zone)),
            event: e,
        });
    }
    if common.json {
        return Ok(json(&lines)?);
    }
    if lines.is_empty() {
        return Ok("no events\n".to_string());
    }
    Ok(lines
        .iter()
        .map(|l| {
            let e = &l.event;
            format!(
                "{}  {}  schedule {}  {}  priority {}{}  {}  next {}\n",
                e.id,
                e.name,
                e.schedule,
                kind_text(&e.kind),
                e.priority.get(),
                if e.blocking { "  blocking" } else { "" },
                if e.enabled { "enabled" } else { "disabled" },
                l.next.as_deref().unwrap_or("none")
            )
        })
        .collect())
}
