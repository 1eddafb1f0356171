//! Hooks: user programs a plan runs around its steps (docs/orchestration.md, "Hooks").
//!
//! [`HookSpec`] is what a plan file says about one hook, [`HookContext`] what the hook is told
//! (`TIMEZERO_*` variables and a JSON document on stdin), and [`run`] runs it: by argv without
//! a shell, in its own process group, with a timeout on the [`Clock`](crate::clock::Clock)
//! after which the group gets SIGTERM and, after a grace, SIGKILL. No process of the group
//! outlives the run, also when the leader exits by itself (see [`run()`]'s module). The result
//! is classified by exit code: 0 success, 75 skip, 1..=99 reserved, 100..=255 the user's.
//!
//! When a hook runs in the job flow, which intents are recorded and what `on_failure` does
//! to the job is the plan layer's business; this module runs one hook and reports.

mod context;
mod group;
mod output;
mod run;
mod spec;

pub use context::{HookContext, RunStatus, Stage, TaskReport, ENV_NAMES, NO_ERROR};
pub use group::live_group_members;
pub use output::OutputTail;
pub use run::{
    classify_exit, run, HookError, HookOutcome, HookRun, Verdict, EXIT_RESERVED_MAX, EXIT_SKIP,
};
pub use spec::{HookSpec, OnFailure, SpecError, Timeout};

pub(crate) use run::later;
