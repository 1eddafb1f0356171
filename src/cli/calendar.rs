//! `timezero calendar [--day DAY]` (CAL-17): the calendar sheet of one backup day, its
//! occurrences in order: completed, executing and queued jobs with their state, suppressed and
//! blocked ones with the event that won, missed ones, and those still to come with what would
//! become of them. Reads only.

use jiff::Timestamp;
use serde::Serialize;

use super::jobs::state_text;
use super::schedule::{by_text, read_view, show_time, verdict_text, StateArgs};
use super::state::StateDir;
use super::Fail;
use crate::calendar::{sheet, OccurrenceOutcome, SheetEntry};
use crate::command::output::json;
use crate::store::{BackupDay, JobState};

/// One occurrence on the sheet, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Line {
    due: String,
    event: String,
    name: String,
    priority: u8,
    blocking: bool,
    /// `completed`, `executing`, `queued`, `waiting_for_retry`, `canceled`, `suppressed`,
    /// `blocked`, `activated`, `missed`, `schedule_disabled`, `newday`, or `future`.
    status: &'static str,
    /// For a future occurrence, what would become of it (`start`, `suppressed`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    verdict: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_state: Option<JobState>,
    reason: String,
}

/// What `calendar --json` prints.
#[derive(Debug, Serialize)]
struct Sheet {
    day: String,
    start: String,
    end: Option<String>,
    occurrences: Vec<Line>,
}

/// `timezero calendar [--day DAY]`.
pub(super) fn calendar(day: Option<&str>, common: &StateArgs) -> Result<String, Fail> {
    let store = StateDir::new(common.state.clone()).read_store()?;
    let view = read_view(&*store)?;
    let days = view.backup_days();
    let zone = days.schedule().zone.clone();
    let day = match day {
        Some(d) => d
            .parse::<BackupDay>()
            .map_err(|e| Fail::Usage(format!("--day {d:?}: {e}")))?,
        None => days.day(Timestamp::now()),
    };
    let Some(bounds) = days.of_day(day) else {
        return Err(Fail::Message(format!(
            "{day} is no backup day: NEWDAY does not run on that date"
        )));
    };
    let mut lines = Vec::new();
    for l in sheet(&view, bounds) {
        let (status, verdict, job, job_state, reason) = match l.entry {
            SheetEntry::Decided(OccurrenceOutcome::Started(j)) => {
                let record = store.job(j).map_err(|e| Fail::Message(e.to_string()))?;
                let state = record.map(|r| r.state);
                let status = match &state {
                    Some(JobState::Done { .. }) => "completed",
                    Some(JobState::Active { .. }) => "executing",
                    Some(JobState::Queued { .. }) => "queued",
                    Some(JobState::WaitingForRetry { .. }) => "waiting_for_retry",
                    Some(JobState::Canceled { .. }) => "canceled",
                    None => "completed",
                };
                let reason = match &state {
                    Some(s) => format!("job {j}: {}", state_text(s)),
                    None => format!("job {j} (trimmed from the history)"),
                };
                (status, None, Some(j.to_string()), state, reason)
            }
            SheetEntry::Decided(OccurrenceOutcome::Suppressed { by }) => {
                let (status, reason) = by_text(&view, by, None);
                (status, None, None, None, reason)
            }
            SheetEntry::Decided(OccurrenceOutcome::Activated) if l.newday => (
                "newday",
                None,
                None,
                None,
                "opened the backup day".to_string(),
            ),
            SheetEntry::Decided(OccurrenceOutcome::Activated) => (
                "activated",
                None,
                None,
                None,
                "blocking: started nothing, suppressed similar events of lower priority"
                    .to_string(),
            ),
            SheetEntry::Decided(OccurrenceOutcome::Missed) => (
                "missed",
                None,
                None,
                None,
                "missed (no daemon ran then)".to_string(),
            ),
            SheetEntry::Decided(OccurrenceOutcome::ScheduleDisabled) => (
                "schedule_disabled",
                None,
                None,
                None,
                "its schedule was disabled".to_string(),
            ),
            SheetEntry::ToCome(v) => {
                let (verdict, reason) = verdict_text(&view, &v);
                (
                    "future",
                    Some(verdict),
                    None,
                    None,
                    format!("future: {reason}"),
                )
            }
        };
        lines.push(Line {
            due: show_time(l.due, &zone),
            event: l.event.to_string(),
            name: l.name,
            priority: l.priority.get(),
            blocking: l.blocking,
            status,
            verdict,
            job,
            job_state,
            reason,
        });
    }
    let out = Sheet {
        day: day.to_string(),
        start: show_time(bounds.start, &zone),
        end: bounds.end.map(|t| show_time(t, &zone)),
        occurrences: lines,
    };
    if common.json {
        return Ok(json(&out)?);
    }
    let mut s = format!(
        "backup day {}: {} .. {}\n",
        out.day,
        out.start,
        out.end.as_deref().unwrap_or("(no next NEWDAY)")
    );
    if out.occurrences.is_empty() {
        s += "no occurrences\n";
    }
    for l in &out.occurrences {
        s += &format!(
            "{}  {}  priority {}  {}  {}\n",
            l.due, l.name, l.priority, l.status, l.reason
        );
    }
    Ok(s)
}
