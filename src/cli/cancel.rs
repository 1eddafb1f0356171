//! `timezero jobs cancel J` (JOB-11): a queued job, or one waiting for its retry, is canceled
//! at once (`canceled_by_user`); a running one is asked to stop: the request is recorded in the
//! job's row, where the process running the attempt finds it (a daemon's scheduler on its next
//! tick tells the work to stop, and the attempt ends canceled, not retried). An ended job is
//! refused.

use jiff::Timestamp;
use serde::Serialize;

use super::jobs::state_text;
use super::schedule::StateArgs;
use super::state::StateDir;
use super::Fail;
use crate::command::output::json;
use crate::job::{step, Event};
use crate::limits::SCHEDULER_PASSES_MAX;
use crate::store::{JobId, JobState, JobStateKind, Store, StoreError};

/// Why `jobs cancel` refused (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such job.
    #[error("no job {0}")]
    NoJob(JobId),
    /// The job has ended.
    #[error("job {job} has already ended ({state}): nothing to cancel")]
    Ended {
        /// The job.
        job: JobId,
        /// Its state in words.
        state: String,
    },
    /// The store failed, or the job kept changing under the command.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<CancelError> for Fail {
    fn from(e: CancelError) -> Fail {
        Fail::Message(e.to_string())
    }
}

/// What `jobs cancel --json` prints.
#[derive(Debug, Serialize)]
struct Out {
    job: String,
    /// `canceled` or `stop_requested`.
    done: &'static str,
    state: JobState,
}

/// `timezero jobs cancel J`.
pub(super) fn cancel(job: JobId, common: &StateArgs) -> Result<String, Fail> {
    let state = StateDir::new(common.state.clone());
    if !state.store_path().exists() {
        return Err(CancelError::NoJob(job).into());
    }
    let store = state.open_store()?;
    let mut last = None;
    for _ in 0..SCHEDULER_PASSES_MAX {
        let j = store
            .job(job)
            .map_err(CancelError::from)?
            .ok_or(CancelError::NoJob(job))?;
        if matches!(j.state.kind(), JobStateKind::Done | JobStateKind::Canceled) {
            return Err(CancelError::Ended {
                job,
                state: state_text(&j.state),
            }
            .into());
        }
        let active = j.state.kind() == JobStateKind::Active;
        let (changes, _) = step(
            &j,
            Event::Cancel {
                at: Timestamp::now(),
            },
        );
        match store.commit(changes) {
            Ok(()) => {
                let after = store
                    .job(job)
                    .map_err(CancelError::from)?
                    .map_or(j.state, |r| r.state);
                let done = if active { "stop_requested" } else { "canceled" };
                if common.json {
                    return Ok(json(&Out {
                        job: job.to_string(),
                        done,
                        state: after,
                    })?);
                }
                return Ok(if active {
                    format!(
                        "{job} is running: asked to stop (the process running it ends it canceled)\n"
                    )
                } else {
                    format!("{job} canceled\n")
                });
            }
            // The job changed under us (granted, ended): read it again.
            Err(e @ StoreError::Conflict { .. }) => last = Some(e),
            Err(e) => return Err(CancelError::from(e).into()),
        }
    }
    Err(CancelError::from(last.unwrap_or(StoreError::Corrupt {
        what: "no attempt made".to_string(),
    }))
    .into())
}
