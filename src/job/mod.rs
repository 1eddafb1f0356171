//! Jobs (docs/orchestration.md, section 2 "Jobs", 3.2): the queue, the resource broker, the
//! retry policy, the job runner and job recovery.
//!
//! The decisions are pure: [`broker::grant`] says which queued jobs get their resources, and
//! [`step`] turns one job and one event into the store changes (each with its precondition) and
//! the actions outside the store. [`Scheduler`] is the thin edge around them: on each clock tick
//! it turns the calendar's decisions into jobs in one transaction, runs a broker pass, starts the
//! granted jobs through [`JobWork`] on worker threads, and records how they ended.
//!
//! Layout: `broker` (resources, counters, the grant pass), `machine` (events, actions, [`step`]),
//! `scheduler` (the edge: calendar pass, broker pass, runner, recovery).

pub mod broker;
mod machine;
mod scheduler;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::Deserialize;

pub use broker::{grant, Counters, Grant, Queue, Readiness, Request, Resource};
pub use machine::{past_cut, retryable, step, Action, Event, JobOutcome, RetryCount};
pub use scheduler::{
    calendar_records, owner_alive, owner_of_this_process, schedule_of, CalendarRecords, JobWork,
    Needs, Posted, Scheduler,
};

use crate::calendar::{CalendarError, RecurrenceError};
use crate::limits::{
    ATTEMPT_WINDOW_DEFAULT_HOURS, ATTEMPT_WINDOW_MAX_HOURS, BACKUP_ATTEMPTS_DEFAULT,
    BACKUP_ATTEMPTS_MAX, JOBS_MAX_DEFAULT, JOBS_MAX_MAX, JOBS_PER_CLIENT_DEFAULT,
    JOBS_PER_DESTINATION_DEFAULT, JOBS_PER_PLAN_DEFAULT, JOBS_PER_PLAN_MAX, JOBS_PER_TABLE_DEFAULT,
    JOB_RETRY_DELAY_DEFAULT_MINS, JOB_RETRY_DELAY_MAX_MINS, JOB_RETRY_DELAY_MIN_MINS,
};
use crate::store::StoreError;

/// Why the job layer failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The store failed.
    #[error("job store: {0}")]
    Store(#[from] StoreError),
    /// The calendar's records do not make a calendar.
    #[error("calendar: {0}")]
    Calendar(#[from] CalendarError),
    /// A stored schedule does not parse.
    #[error("schedule {name:?}: {source}")]
    Schedule {
        /// The schedule.
        name: String,
        /// Why.
        #[source]
        source: RecurrenceError,
    },
    /// A stored schedule names a zone this system does not know.
    #[error("schedule {name:?}: unknown time zone {zone:?}")]
    Zone {
        /// The schedule.
        name: String,
        /// The zone.
        zone: String,
    },
    /// A value of the `[limits]` table is out of range.
    #[error("[limits] {field} = {value} is outside {min}..={max}")]
    Limit {
        /// The key.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// Another scheduler instance kept changing the same records; the rest waits for the next
    /// tick.
    #[error("the calendar pass conflicted {0} times with another scheduler")]
    Contended(usize),
}

/// The `[limits]` table of `timezero.toml` (JOB-02, JOB-05, JOB-07). Values are checked when
/// the table is read: a value out of range is an error naming the key, an unknown key is refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawLimits")]
pub struct Limits {
    /// Most jobs active at once (`global`).
    pub max_jobs: u32,
    /// Most active jobs of one plan, 1–999 ("max jobs per policy").
    pub max_jobs_per_plan: u32,
    /// Most active jobs of one client (default 1, "max jobs per client").
    pub max_jobs_per_client: u32,
    /// Most active jobs writing to one destination.
    pub max_jobs_per_destination: u32,
    /// Most active jobs on one activity table.
    pub max_jobs_per_table: u32,
    /// Per-plan overrides of `max_jobs_per_plan`.
    pub plans: BTreeMap<String, u32>,
    /// Per-client overrides ("max jobs this client").
    pub clients: BTreeMap<String, u32>,
    /// Per-destination overrides.
    pub destinations: BTreeMap<String, u32>,
    /// `true`: no job passes a ready job ahead of it that waits on resources (JOB-05).
    pub strict: bool,
    /// Minutes before a failed job is queued again, 1–60 (JOB-07).
    pub job_retry_delay_mins: u32,
    /// Attempts of one plan within `attempt_window_hours` after which no retry is queued.
    pub backup_attempts: u32,
    /// Hours in which attempts are counted.
    pub attempt_window_hours: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_jobs: JOBS_MAX_DEFAULT,
            max_jobs_per_plan: JOBS_PER_PLAN_DEFAULT,
            max_jobs_per_client: JOBS_PER_CLIENT_DEFAULT,
            max_jobs_per_destination: JOBS_PER_DESTINATION_DEFAULT,
            max_jobs_per_table: JOBS_PER_TABLE_DEFAULT,
            plans: BTreeMap::new(),
            clients: BTreeMap::new(),
            destinations: BTreeMap::new(),
            strict: false,
            job_retry_delay_mins: JOB_RETRY_DELAY_DEFAULT_MINS,
            backup_attempts: BACKUP_ATTEMPTS_DEFAULT,
            attempt_window_hours: ATTEMPT_WINDOW_DEFAULT_HOURS,
        }
    }
}

impl Limits {
    /// How many active jobs may hold `r`.
    #[must_use]
    pub fn limit_of(&self, r: &Resource) -> u32 {
        match r {
            Resource::Global => self.max_jobs,
            Resource::Plan(p) => self.plans.get(p).copied().unwrap_or(self.max_jobs_per_plan),
            Resource::Client(c) => self
                .clients
                .get(c)
                .copied()
                .unwrap_or(self.max_jobs_per_client),
            Resource::Destination(d) => self
                .destinations
                .get(d)
                .copied()
                .unwrap_or(self.max_jobs_per_destination),
            Resource::Table(_) => self.max_jobs_per_table,
            Resource::Run(_) => 1,
        }
    }

    /// The retry delay.
    #[must_use]
    pub fn retry_delay(&self) -> jiff::SignedDuration {
        jiff::SignedDuration::from_mins(i64::from(self.job_retry_delay_mins))
    }

    /// The window in which attempts are counted.
    #[must_use]
    pub fn attempt_window(&self) -> jiff::SignedDuration {
        jiff::SignedDuration::from_hours(i64::from(self.attempt_window_hours))
    }

    /// Check every value's range.
    ///
    /// # Errors
    /// [`JobError::Limit`] naming the first value out of range.
    pub fn validate(&self) -> Result<(), JobError> {
        let check = |field: &'static str, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(JobError::Limit {
                    field,
                    value: u64::from(value),
                    min: u64::from(min),
                    max: u64::from(max),
                })
            }
        };
        check("max_jobs", self.max_jobs, 1, JOBS_MAX_MAX)?;
        check(
            "max_jobs_per_plan",
            self.max_jobs_per_plan,
            1,
            JOBS_PER_PLAN_MAX,
        )?;
        for n in self.plans.values() {
            check("plans", *n, 1, JOBS_PER_PLAN_MAX)?;
        }
        check(
            "max_jobs_per_client",
            self.max_jobs_per_client,
            1,
            JOBS_MAX_MAX,
        )?;
        for n in self.clients.values() {
            check("clients", *n, 1, JOBS_MAX_MAX)?;
        }
        check(
            "max_jobs_per_destination",
            self.max_jobs_per_destination,
            1,
            JOBS_MAX_MAX,
        )?;
        for n in self.destinations.values() {
            check("destinations", *n, 1, JOBS_MAX_MAX)?;
        }
        check(
            "max_jobs_per_table",
            self.max_jobs_per_table,
            1,
            JOBS_MAX_MAX,
        )?;
        check(
            "job_retry_delay_mins",
            self.job_retry_delay_mins,
            JOB_RETRY_DELAY_MIN_MINS,
            JOB_RETRY_DELAY_MAX_MINS,
        )?;
        check(
            "backup_attempts",
            self.backup_attempts,
            1,
            BACKUP_ATTEMPTS_MAX,
        )?;
        check(
            "attempt_window_hours",
            self.attempt_window_hours,
            1,
            ATTEMPT_WINDOW_MAX_HOURS,
        )
    }
}

/// The `[limits]` table as written; every key optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_jobs: Option<u32>,
    max_jobs_per_plan: Option<u32>,
    max_jobs_per_client: Option<u32>,
    max_jobs_per_destination: Option<u32>,
    max_jobs_per_table: Option<u32>,
    #[serde(default)]
    plans: BTreeMap<String, u32>,
    #[serde(default)]
    clients: BTreeMap<String, u32>,
    #[serde(default)]
    destinations: BTreeMap<String, u32>,
    strict: Option<bool>,
    job_retry_delay_mins: Option<u32>,
    backup_attempts: Option<u32>,
    attempt_window_hours: Option<u32>,
}

impl TryFrom<RawLimits> for Limits {
    type Error = JobError;
    fn try_from(r: RawLimits) -> Result<Limits, JobError> {
        let d = Limits::default();
        let l = Limits {
            max_jobs: r.max_jobs.unwrap_or(d.max_jobs),
            max_jobs_per_plan: r.max_jobs_per_plan.unwrap_or(d.max_jobs_per_plan),
            max_jobs_per_client: r.max_jobs_per_client.unwrap_or(d.max_jobs_per_client),
            max_jobs_per_destination: r
                .max_jobs_per_destination
                .unwrap_or(d.max_jobs_per_destination),
            max_jobs_per_table: r.max_jobs_per_table.unwrap_or(d.max_jobs_per_table),
            plans: r.plans,
            clients: r.clients,
            destinations: r.destinations,
            strict: r.strict.unwrap_or(d.strict),
            job_retry_delay_mins: r.job_retry_delay_mins.unwrap_or(d.job_retry_delay_mins),
            backup_attempts: r.backup_attempts.unwrap_or(d.backup_attempts),
            attempt_window_hours: r.attempt_window_hours.unwrap_or(d.attempt_window_hours),
        };
        l.validate()?;
        Ok(l)
    }
}

/// What NEWDAY does to the running jobs of the ending backup day (`newday.abort`, CAL-14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewdayAbort {
    /// Abort every running job, as `jobs cancel` does (SEP sesam's rule).
    #[default]
    All,
    /// Abort only jobs not yet past their cut; those past it keep running (their data is the old
    /// day's).
    Uncut,
}

/// The `[newday]` table of `timezero.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewdaySettings {
    /// What NEWDAY does to running jobs.
    #[serde(default)]
    pub abort: NewdayAbort,
}
