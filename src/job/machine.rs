//! A job's states as a pure function (section 3.2's diagram):
//!
//! ```text
//! Queued ──grant──► Active ──► Done(0 | 1 | n)
//!   ▲                  └──failed, attempts left──► WaitingForRetry ──delay passed──► Queued (attempt + 1)
//!   └── back-out (stays Queued)
//! Queued | WaitingForRetry | Active ──window closed, NEWDAY, jobs cancel──► Canceled
//! ```
//!
//! [`step`] takes the job as it was read and one [`Event`] and returns the store changes, each a
//! `Transition` whose precondition is the state kind and attempt that were read, and the
//! [`Action`]s outside the store. An event that does not apply to the job's state gives nothing.
//! An active job is never canceled by a change alone: the runner is told to stop it
//! ([`Action::Stop`]) and records the end when the work returns.

use jiff::{SignedDuration, Timestamp};

use super::NewdayAbort;
use crate::store::{
    BackupDay, Change, JobId, JobReason, JobRecord, JobState, JobStatus, Phase, TaskStep,
    WaitReason,
};

/// How a job's work ended, as [`super::JobWork`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// It ran to its end (JOB-06): a `Failed` status with a [`retryable`] reason is retried
    /// while attempts are left (JOB-07).
    Done {
        /// How it went.
        status: JobStatus,
        /// Why, unless it succeeded.
        reason: Option<JobReason>,
    },
    /// It stopped because it was told to ([`Action::Stop`]).
    Canceled {
        /// Why.
        reason: JobReason,
    },
}

/// What the retry rule needs to know (JOB-07).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryCount {
    /// Attempts of the job's plan, scheduled or manual, started within the attempt window
    /// (the ending attempt included).
    pub started_in_window: u32,
    /// `backup_attempts`: with this many started in the window, no retry is queued.
    pub backup_attempts: u32,
    /// `job_retry_delay`.
    pub delay: SignedDuration,
}

/// Something that happens to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The broker granted its resources; `owner` (this daemon instance) runs it.
    Granted {
        /// The daemon instance.
        owner: String,
        /// When.
        at: Timestamp,
    },
    /// The broker did not grant it: it names what it waits on (JOB-03).
    Waits {
        /// What it waits on.
        on: WaitReason,
        /// When.
        at: Timestamp,
    },
    /// The runner moved to another phase.
    Phase {
        /// The new phase.
        phase: Phase,
        /// When.
        at: Timestamp,
    },
    /// The work returned.
    Ended {
        /// How.
        outcome: JobOutcome,
        /// The retry rule's counts.
        retry: RetryCount,
        /// When.
        at: Timestamp,
    },
    /// The clock passed; a job waiting for its retry may be queued again.
    Tick {
        /// Now.
        at: Timestamp,
    },
    /// `jobs cancel` (JOB-11).
    Cancel {
        /// When.
        at: Timestamp,
    },
    /// The plan's window closed (JOB-08).
    WindowClosed {
        /// When.
        at: Timestamp,
    },
    /// NEWDAY ended `ending` (CAL-14).
    Newday {
        /// The backup day that ends.
        ending: BackupDay,
        /// What happens to running jobs.
        abort: NewdayAbort,
        /// When.
        at: Timestamp,
    },
    /// The daemon instance that owned the active job is gone (JOB-09); `owner` takes over.
    OwnerDead {
        /// The daemon instance taking over.
        owner: String,
        /// The retry rule's counts, should the attempt fail.
        retry: RetryCount,
        /// When.
        at: Timestamp,
    },
}

/// Work to do outside the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the job's attempt from its start.
    Start {
        /// The job.
        job: JobId,
        /// Its attempt.
        attempt: u32,
    },
    /// Continue the job's attempt past its cut after a restart (JOB-09).
    Resume {
        /// The job.
        job: JobId,
        /// Its attempt.
        attempt: u32,
    },
    /// Stop the running attempt: before the cut thaw and create no session, after it withdraw
    /// the session and remove a file target (JOB-11); the work then ends `Canceled`.
    Stop {
        /// The job.
        job: JobId,
        /// Its attempt.
        attempt: u32,
        /// Why.
        reason: JobReason,
    },
}

/// Whether a job in `phase` is past its cut: a task of it has established its sessions (a task
/// after the first, a step after `Cut`, the plan's post stage, or a restore, which resumes from
/// its checkpoint). Tasks are numbered from 1, as the plan layer numbers them. A job past its cut resumes after a restart (JOB-09) and is kept by
/// `newday.abort = "uncut"` (CAL-14).
#[must_use]
pub fn past_cut(phase: Phase) -> bool {
    match phase {
        Phase::AwaitingResources | Phase::Checks | Phase::PlanPre => false,
        Phase::Task { index, step } => {
            index > 1
                || !matches!(
                    step,
                    TaskStep::Checks | TaskStep::Pre | TaskStep::Quiesce | TaskStep::Cut
                )
        }
        Phase::PlanPost | Phase::Restore => true,
    }
}

/// Whether a failure for `reason` is retried (JOB-07): failures of the run (hooks, quiesce,
/// engine, destination, a restart) are; a plan that cannot run as written, a closed window,
/// NEWDAY and a cancel are not.
#[must_use]
pub fn retryable(reason: &JobReason) -> bool {
    !matches!(
        reason,
        JobReason::WindowClosed
            | JobReason::Newday
            | JobReason::BackupsDisabled
            | JobReason::OutsideWindow
            | JobReason::CanceledByUser
            | JobReason::Plan(_)
    )
}

/// The changes and actions `event` makes of `job` (see the module's diagram). Every change is a
/// `Transition` from the state kind and attempt of `job` as given.
#[must_use]
pub fn step(job: &JobRecord, event: Event) -> (Vec<Change>, Vec<Action>) {
    let from = job.state.kind();
    let to = |state: JobState, to_attempt: u32, owner: Option<String>, at: Timestamp| {
        vec![Change::Transition {
            job: job.id,
            from,
            attempt: job.attempt,
            to: state,
            to_attempt,
            owner,
            at,
        }]
    };
    let stop = |reason: JobReason| Action::Stop {
        job: job.id,
        attempt: job.attempt,
        reason,
    };
    let none = || (Vec::new(), Vec::new());
    match (&job.state, event) {
        (JobState::Queued { .. }, Event::Granted { owner, at }) => (
            to(
                JobState::Active {
                    phase: Phase::AwaitingResources,
                },
                job.attempt,
                Some(owner),
                at,
            ),
            vec![Action::Start {
                job: job.id,
                attempt: job.attempt,
            }],
        ),
        (JobState::Queued { waiting_on }, Event::Waits { on, at }) if *waiting_on != on => (
            to(
                JobState::Queued { waiting_on: on },
                job.attempt,
                job.owner.clone(),
                at,
            ),
            Vec::new(),
        ),
        (JobState::Active { phase }, Event::Phase { phase: next, at }) if *phase != next => (
            to(
                JobState::Active { phase: next },
                job.attempt,
                job.owner.clone(),
                at,
            ),
            Vec::new(),
        ),
        (JobState::Active { .. }, Event::Ended { outcome, retry, at }) => {
            (ended(job, outcome, retry, at, &to), Vec::new())
        }
        (JobState::WaitingForRetry { at: due }, Event::Tick { at }) if *due <= at => (
            to(
                JobState::Queued {
                    waiting_on: WaitReason::Broker,
                },
                job.attempt + 1,
                None,
                at,
            ),
            Vec::new(),
        ),
        (JobState::Queued { .. } | JobState::WaitingForRetry { .. }, Event::Cancel { at }) => (
            to(
                JobState::Canceled {
                    reason: JobReason::CanceledByUser,
                },
                job.attempt,
                job.owner.clone(),
                at,
            ),
            Vec::new(),
        ),
        (JobState::Active { .. }, Event::Cancel { at }) => (
            vec![Change::RequestStop {
                job: job.id,
                attempt: job.attempt,
                reason: JobReason::CanceledByUser,
                at,
            }],
            vec![stop(JobReason::CanceledByUser)],
        ),
        (
            JobState::Queued { .. } | JobState::WaitingForRetry { .. },
            Event::WindowClosed { at },
        ) => (
            to(
                JobState::Canceled {
                    reason: JobReason::WindowClosed,
                },
                job.attempt,
                job.owner.clone(),
                at,
            ),
            Vec::new(),
        ),
        (
            JobState::Queued { .. } | JobState::WaitingForRetry { .. },
            Event::Newday { ending, at, .. },
        ) if job.backup_day <= ending => (
            to(
                JobState::Canceled {
                    reason: JobReason::Newday,
                },
                job.attempt,
                job.owner.clone(),
                at,
            ),
            Vec::new(),
        ),
        (JobState::Active { phase }, Event::Newday { ending, abort, .. })
            if job.backup_day <= ending =>
        {
            if abort == NewdayAbort::Uncut && past_cut(*phase) {
                none()
            } else {
                (Vec::new(), vec![stop(JobReason::Newday)])
            }
        }
        (JobState::Active { phase }, Event::OwnerDead { owner, retry, at }) => {
            if past_cut(*phase) {
                (
                    to(
                        JobState::Active { phase: *phase },
                        job.attempt,
                        Some(owner),
                        at,
                    ),
                    vec![Action::Resume {
                        job: job.id,
                        attempt: job.attempt,
                    }],
                )
            } else {
                let outcome = JobOutcome::Done {
                    status: JobStatus::Failed,
                    reason: Some(JobReason::DaemonRestarted(*phase)),
                };
                (ended(job, outcome, retry, at, &to), Vec::new())
            }
        }
        _ => none(),
    }
}

fn ended(
    job: &JobRecord,
    outcome: JobOutcome,
    retry: RetryCount,
    at: Timestamp,
    to: &impl Fn(JobState, u32, Option<String>, Timestamp) -> Vec<Change>,
) -> Vec<Change> {
    let owner = job.owner.clone();
    // An attempt asked to stop that ends in a failure ends canceled: it is not retried.
    let outcome = match (&job.stop_requested, outcome) {
        (
            Some(r),
            JobOutcome::Done {
                status: JobStatus::Failed,
                ..
            },
        ) if r.attempt == job.attempt => JobOutcome::Canceled {
            reason: r.reason.clone(),
        },
        (_, outcome) => outcome,
    };
    match outcome {
        JobOutcome::Canceled { reason } => {
            to(JobState::Canceled { reason }, job.attempt, owner, at)
        }
        JobOutcome::Done {
            status: JobStatus::Failed,
            reason: Some(reason),
        } if retryable(&reason) && retry.started_in_window < retry.backup_attempts => {
            let due = at.saturating_add(retry.delay).unwrap_or(Timestamp::MAX);
            to(
                JobState::WaitingForRetry { at: due },
                job.attempt,
                owner,
                at,
            )
        }
        JobOutcome::Done { status, reason } => {
            to(JobState::Done { status, reason }, job.attempt, owner, at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(index: u32, step: TaskStep) -> Phase {
        Phase::Task { index, step }
    }

    #[test]
    fn job_09_past_cut_counts_tasks_from_1() {
        // The first task (index 1) is before its cut until its sessions exist.
        for step in [
            TaskStep::Checks,
            TaskStep::Pre,
            TaskStep::Quiesce,
            TaskStep::Cut,
        ] {
            assert!(!past_cut(task(1, step)), "task 1 {step:?}");
            assert!(past_cut(task(2, step)), "task 2 {step:?}");
        }
        for step in [
            TaskStep::Thaw,
            TaskStep::AfterCut,
            TaskStep::Copy,
            TaskStep::Catalog,
            TaskStep::Post,
            TaskStep::Finally,
        ] {
            assert!(past_cut(task(1, step)), "task 1 {step:?}");
        }
        assert!(!past_cut(Phase::PlanPre));
        assert!(!past_cut(Phase::Checks));
        assert!(!past_cut(Phase::AwaitingResources));
        assert!(past_cut(Phase::PlanPost));
    }
}
