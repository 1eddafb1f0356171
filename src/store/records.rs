//! The rows of the store (docs/orchestration.md, sections 3.2 and 3.3): jobs, tasks, hook runs,
//! intents, leases, images, and the calendar's schedules, events and occurrences.
//!
//! Every record is plain data with `serde` derives: the SQLite store keeps each row's record as
//! JSON beside the columns it is searched by, and the memory store passes every record through
//! the same encoding, so both keep exactly the same values. Instants are [`Timestamp`]s kept to
//! the millisecond (see [`super::ms`]); engine types are copied in as they were at the cut.

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{BackupDay, EventId, ImageId, IntentId, JobId, LeaseId, Priority};
use crate::ids::{GrainSize, SessionId};
use crate::model::{CopyMode, ExtentSpec, VolumeRef};
use crate::state::Reason;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Run a plan (a backup).
    Backup {
        /// The plan's name.
        plan: String,
    },
    /// Restore an image to a destination.
    Restore {
        /// The image restored.
        image: ImageId,
        /// Where it is written (a volume locator or path).
        dest: String,
    },
    /// Run a command event's argv.
    Command {
        /// The command event's name.
        name: String,
    },
    /// Maintenance of a destination (retention, verify).
    Maintenance {
        /// The destination's path.
        dest: String,
    },
}

impl JobKind {
    /// The plan a backup job runs; `None` for the other kinds.
    #[must_use]
    pub fn plan(&self) -> Option<&str> {
        match self {
            JobKind::Backup { plan } => Some(plan),
            _ => None,
        }
    }
}

/// One step of a task's flow (HOOK-01), in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStep {
    /// The task's checks (window, free space).
    Checks,
    /// The `task_pre` hook.
    Pre,
    /// Quiescing the sources.
    Quiesce,
    /// Establishing the sessions (T0).
    Cut,
    /// Undoing the quiesce.
    Thaw,
    /// The `after_cut` hook.
    AfterCut,
    /// The background copy.
    Copy,
    /// Recording the image in the catalog.
    Catalog,
    /// The `task_post` hook.
    Post,
    /// The `finally` hook.
    Finally,
}

/// Where an active job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Granted, not yet started (a restore is `Active` at once, JOB-10).
    AwaitingResources,
    /// The plan's checks.
    Checks,
    /// The `plan_pre` hook.
    PlanPre,
    /// A task, at a step.
    Task {
        /// The task's index in the job.
        index: u32,
        /// Its step.
        step: TaskStep,
    },
    /// The `plan_post` hook.
    PlanPost,
    /// A restore's copy or stream.
    Restore,
}

/// What a queued job waits on (JOB-03).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "on", rename_all = "snake_case")]
pub enum WaitReason {
    /// Not yet looked at by the broker.
    Broker,
    /// Resources it was not granted, e.g. `client:dbhost`.
    Resources {
        /// The resources, as the broker names them.
        names: Vec<String>,
    },
    /// The plan's window is closed.
    Window,
    /// Its start time has not come.
    StartTime,
}

/// How a finished job went (JOB-06). Its number is [`JobState::status_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Everything ran (status 0).
    Success,
    /// A task was skipped or a hook warned (status 1).
    Partial,
    /// Every task was skipped, or the job was skipped before any task (status of its reason).
    Skipped,
    /// The job failed (status of its reason).
    Failed,
}

/// Why a job, a task or a hook ended other than well: one enum for every layer, each with a
/// stable code ≥ 2 ([`JobReason::code`]) that is the job's status number (JOB-06).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum JobReason {
    /// The daemon died with the job active before its cut, in this phase (JOB-09). Code 2.
    DaemonRestarted(Phase),
    /// The plan's window closed while the job was queued or between tasks (JOB-08, PLAN-10). 3.
    WindowClosed,
    /// NEWDAY ended the backup day (CAL-14). 4.
    Newday,
    /// `backups_allowed = false` (PLAN-01). 5.
    BackupsDisabled,
    /// Started outside the plan's window (PLAN-02). 6.
    OutsideWindow,
    /// The destination is not the mounted filesystem the plan names (PLAN-03). 7.
    DestinationNotMounted,
    /// Too little free space at the destination (PLAN-04). 8.
    DestinationSpace,
    /// A mount to freeze is already frozen (PLAN-12). 9.
    AlreadyQuiesced,
    /// Quiesce did not finish within its timeout and grace (QUI-04). 10.
    QuiesceTimedOut,
    /// Unquiesce did not finish within its timeout and grace (QUI-05). 11.
    UnquiesceTimedOut,
    /// The target could not be locked (QUI-02). 12.
    TargetBusy,
    /// A hook exited with a user code 100–255 (HOOK-05). 13.
    HookExit(u8),
    /// A hook exited with a code 1–99 reserved for timezero, other than 75 (HOOK-05). 14.
    ReservedExitCode(u8),
    /// A hook ran past its timeout (HOOK-07). 15.
    HookTimedOut,
    /// A hook's start is recorded but not its end (HOOK-10). 16.
    HookUnknown,
    /// The engine refused or failed, with its message. 17.
    Engine(String),
    /// `jobs cancel` (JOB-11). 18.
    CanceledByUser,
    /// The plan file could not be read or is invalid, with the message. 19.
    Plan(String),
    /// A pattern matched nothing or a source could not be opened (PLAN-06), with which. 20.
    SourceMissing(String),
    /// An earlier task failed and `on_task_error = "halt"` (PLAN-11). 21.
    Halted,
}

impl JobReason {
    /// The stable code (≥ 2) shown as the job's status.
    #[must_use]
    pub fn code(&self) -> u32 {
        match self {
            JobReason::DaemonRestarted(_) => 2,
            JobReason::WindowClosed => 3,
            JobReason::Newday => 4,
            JobReason::BackupsDisabled => 5,
            JobReason::OutsideWindow => 6,
            JobReason::DestinationNotMounted => 7,
            JobReason::DestinationSpace => 8,
            JobReason::AlreadyQuiesced => 9,
            JobReason::QuiesceTimedOut => 10,
            JobReason::UnquiesceTimedOut => 11,
            JobReason::TargetBusy => 12,
            JobReason::HookExit(_) => 13,
            JobReason::ReservedExitCode(_) => 14,
            JobReason::HookTimedOut => 15,
            JobReason::HookUnknown => 16,
            JobReason::Engine(_) => 17,
            JobReason::CanceledByUser => 18,
            JobReason::Plan(_) => 19,
            JobReason::SourceMissing(_) => 20,
            JobReason::Halted => 21,
        }
    }
}

/// A job's state (section 3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for resources or its start.
    Queued {
        /// What it waits on.
        waiting_on: WaitReason,
    },
    /// Running.
    Active {
        /// Where it is.
        phase: Phase,
    },
    /// Failed with attempts left; queued again at `at` with attempt + 1 (JOB-07).
    WaitingForRetry {
        /// When it is queued again.
        #[serde(with = "super::ms")]
        at: Timestamp,
    },
    /// Ended.
    Done {
        /// How.
        status: JobStatus,
        /// Why, unless it succeeded.
        reason: Option<JobReason>,
    },
    /// Canceled before it ended by itself.
    Canceled {
        /// Why.
        reason: JobReason,
    },
}

impl JobState {
    /// The state's discriminant.
    #[must_use]
    pub fn kind(&self) -> JobStateKind {
        match self {
            JobState::Queued { .. } => JobStateKind::Queued,
            JobState::Active { .. } => JobStateKind::Active,
            JobState::WaitingForRetry { .. } => JobStateKind::WaitingForRetry,
            JobState::Done { .. } => JobStateKind::Done,
            JobState::Canceled { .. } => JobStateKind::Canceled,
        }
    }

    /// The status number of an ended job (JOB-06): 0 success, 1 partial, else the reason's code
    /// (a skip or failure without a reason counts as 1); `None` while it has not ended.
    #[must_use]
    pub fn status_code(&self) -> Option<u32> {
        match self {
            JobState::Done { status, reason } => Some(match (status, reason) {
                (JobStatus::Success, _) => 0,
                (JobStatus::Partial, _) | (_, None) => 1,
                (_, Some(r)) => r.code(),
            }),
            JobState::Canceled { reason } => Some(reason.code()),
            _ => None,
        }
    }
}

/// A [`JobState`] without its data: what a [`super::Change::Transition`] expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStateKind {
    /// [`JobState::Queued`].
    Queued,
    /// [`JobState::Active`].
    Active,
    /// [`JobState::WaitingForRetry`].
    WaitingForRetry,
    /// [`JobState::Done`].
    Done,
    /// [`JobState::Canceled`].
    Canceled,
}

impl JobStateKind {
    /// The name kept in the `state` column.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            JobStateKind::Queued => "queued",
            JobStateKind::Active => "active",
            JobStateKind::WaitingForRetry => "waiting_for_retry",
            JobStateKind::Done => "done",
            JobStateKind::Canceled => "canceled",
        }
    }
}

/// A job: one run of a plan, a restore, a command or maintenance, with its attempts (3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// What it does.
    pub kind: JobKind,
    /// The event whose occurrence started it (every job has one, CAL-03).
    pub event: EventId,
    /// The occurrence's due instant.
    #[serde(with = "super::ms")]
    pub due_at: Timestamp,
    /// The backup day of `due_at` (CAL-12).
    pub backup_day: BackupDay,
    /// The event's priority.
    pub priority: Priority,
    /// The attempt, from 1 (JOB-07).
    pub attempt: u32,
    /// Its state.
    pub state: JobState,
    /// The daemon instance running the current attempt (pid, start time, boot id as one text),
    /// set when it is claimed; recovery takes over jobs of instances that are gone.
    pub owner: Option<String>,
    /// The plan text the job runs (PLAN-18); `None` for jobs without a plan.
    pub plan_text: Option<String>,
    /// The SHA-256 of `plan_text` (64 hex digits in the row).
    #[serde(with = "sha256_hex")]
    pub plan_sha256: Option<[u8; 32]>,
    /// The current attempt's progress, once it has some.
    pub progress: Option<JobProgress>,
    /// When the job was created.
    #[serde(with = "super::ms")]
    pub created: Timestamp,
    /// When its current attempt became active.
    #[serde(with = "super::ms::opt")]
    pub started: Option<Timestamp>,
    /// When it ended.
    #[serde(with = "super::ms::opt")]
    pub ended: Option<Timestamp>,
    /// `jobs cancel` (or NEWDAY) asked the running attempt to stop (JOB-11): whoever runs it
    /// stops it when it sees this; `None` when nobody asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_requested: Option<StopRequest>,
}

/// A request to stop a job's running attempt, recorded so that the process running it sees it
/// (a daemon's scheduler on its next tick).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRequest {
    /// The attempt to stop.
    pub attempt: u32,
    /// Why (`CanceledByUser` for `jobs cancel`).
    pub reason: JobReason,
    /// When it was asked.
    #[serde(with = "super::ms")]
    pub at: Timestamp,
}

/// How far an active job got: the copy's bytes, the restore stream's ring counters (CAT-09) and
/// its checkpoint (CAT-08).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JobProgress {
    /// Bytes copied or restored.
    pub bytes_done: u64,
    /// Bytes to copy or restore.
    pub bytes_total: u64,
    /// Times the restore's writer waited for a full buffer.
    pub waits_for_full: u64,
    /// Times the restore's reader waited for an empty buffer.
    pub waits_for_empty: u64,
    /// The byte offset a resumed restore stream starts from.
    pub checkpoint: Option<u64>,
    /// Bytes the restore stream's ring moved from its reader to its writer, over all the runs
    /// of the job (rows written before the field existed read as 0).
    #[serde(default)]
    pub ring_bytes: u64,
    /// Buffers in the restore stream's ring (0: no ring, or a row written before the field
    /// existed).
    #[serde(default)]
    pub ring_buffers: u64,
    /// Bytes of each buffer of the restore stream's ring (0 as `ring_buffers`).
    #[serde(default)]
    pub ring_buffer_bytes: u64,
}

/// A task's status (section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "step", rename_all = "snake_case")]
pub enum TaskStatus {
    /// Not started.
    Pending,
    /// Running, at a step.
    Running(TaskStep),
    /// Done well.
    Ok,
    /// Not run (PLAN-06, PLAN-10, exit 75).
    Skipped,
    /// Done, with a hook warning (HOOK-08).
    Warning,
    /// Failed.
    Failed,
    /// Canceled (PLAN-11, JOB-11, QUI-04).
    Canceled,
}

/// One task of a job: a source (or a group of sources) with its target (PLAN-05).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The job.
    pub job: JobId,
    /// Its index in the job, from 0, in creation order.
    pub index: u32,
    /// The activity it was expanded from.
    pub activity: String,
    /// The region, when the activity has regions.
    pub region: Option<String>,
    /// The sources (several for a grouped task), or the pattern that matched nothing.
    pub sources: Vec<String>,
    /// The targets, one per source.
    pub targets: Vec<String>,
    /// Its status.
    pub status: TaskStatus,
    /// Why it did not end `Ok`.
    pub reason: Option<JobReason>,
    /// The error message handed to `task_post` (HOOK-03).
    pub message: Option<String>,
}

/// A hook stage (HOOK-01).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookStage {
    /// Before the plan's tasks.
    PlanPre,
    /// Before a task.
    TaskPre,
    /// Right after the cut.
    AfterCut,
    /// After a task.
    TaskPost,
    /// After the plan's tasks.
    PlanPost,
    /// After each task and after the plan, always.
    Finally,
}

impl HookStage {
    /// The name kept in the `stage` column.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            HookStage::PlanPre => "plan_pre",
            HookStage::TaskPre => "task_pre",
            HookStage::AfterCut => "after_cut",
            HookStage::TaskPost => "task_post",
            HookStage::PlanPost => "plan_post",
            HookStage::Finally => "finally",
        }
    }
}

/// How a hook run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum HookResult {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// It ran past its timeout and its group was killed (HOOK-07).
    TimedOut,
    /// It could not be started, with the error.
    SpawnFailed(String),
    /// Its start was recorded but not its end (HOOK-10).
    Unknown,
}

/// Which hook run: a job's attempt, a stage, and the task for task stages (`None` for plan
/// stages and the plan's `finally`). A key is started at most once (HOOK-10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HookRunKey {
    /// The job.
    pub job: JobId,
    /// Its attempt.
    pub attempt: u32,
    /// The stage.
    pub stage: HookStage,
    /// The task, for task stages.
    pub task: Option<u32>,
}

/// One run of a hook, committed before it starts and completed when it ends (HOOK-09, HOOK-10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRunRecord {
    /// Which run.
    pub key: HookRunKey,
    /// The argv run.
    pub argv: Vec<String>,
    /// When it started.
    #[serde(with = "super::ms")]
    pub started: Timestamp,
    /// When it ended.
    #[serde(with = "super::ms::opt")]
    pub ended: Option<Timestamp>,
    /// How it ended.
    pub result: Option<HookResult>,
    /// The last bytes of its stdout (at most `HOOK_OUTPUT_BYTES_MAX`).
    pub stdout_tail: Vec<u8>,
    /// The last bytes of its stderr.
    pub stderr_tail: Vec<u8>,
}

/// A side effect outside the store, recorded before it is done (section 1.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum IntentAction {
    /// Run a hook.
    Hook {
        /// Which run.
        key: HookRunKey,
    },
    /// Freeze a mount (its lease is a row of its own).
    Freeze {
        /// The mount point.
        mount: PathBuf,
    },
    /// Run a quiesce command.
    QuiesceCommand {
        /// The argv.
        argv: Vec<String>,
    },
    /// Establish a session.
    Establish {
        /// The activity table.
        table: PathBuf,
        /// The target's locator, by which recovery finds the session (3.2).
        target: String,
    },
    /// Withdraw a session.
    Withdraw {
        /// The activity table.
        table: PathBuf,
        /// The session.
        session: SessionId,
    },
    /// Create a file target.
    CreateTarget {
        /// Its path.
        path: PathBuf,
    },
    /// Delete a file target.
    DeleteTarget {
        /// Its path.
        path: PathBuf,
    },
}

/// How a side effect ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum IntentOutcome {
    /// It was done.
    Done,
    /// A session was established.
    Established(SessionId),
    /// It failed, with the error.
    Failed(String),
    /// Recovery could not tell whether it was done.
    Unknown,
    /// Recovery adopted what it found (a session whose target is the intent's, 3.2).
    Adopted(SessionId),
    /// It was never done (recovery found no trace of it).
    NotDone,
}

/// An intent row: an action of a job's attempt, and its outcome once known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Its id.
    pub id: IntentId,
    /// The job.
    pub job: JobId,
    /// Its attempt.
    pub attempt: u32,
    /// The task, for task actions.
    pub task: Option<u32>,
    /// What is done.
    pub action: IntentAction,
    /// When it was recorded.
    #[serde(with = "super::ms")]
    pub created: Timestamp,
    /// Its outcome, `None` while open.
    pub outcome: Option<IntentOutcome>,
    /// When the outcome was recorded.
    #[serde(with = "super::ms::opt")]
    pub resolved: Option<Timestamp>,
}

/// A frozen mount (QUI-06): committed before `FIFREEZE`, dropped after a successful thaw. One
/// lease per filesystem (`st_dev`): a second is a conflict (PLAN-12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Its id.
    pub id: LeaseId,
    /// The job holding it.
    pub job: JobId,
    /// The mount point.
    pub mount: PathBuf,
    /// The filesystem's device number.
    pub st_dev: u64,
    /// When the watchdog thaws it anyway.
    #[serde(with = "super::ms")]
    pub deadline: Timestamp,
}

/// An image's state (CAT-01, CAT-04, CAT-05).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ImageState {
    /// Cut, not yet complete; never restorable.
    Incomplete,
    /// Complete and restorable.
    Valid,
    /// Its copy target changed or vanished, or its nocopy session ended.
    Lost {
        /// What was found.
        why: String,
        /// The engine's reason, when the engine gave one.
        engine: Option<Reason>,
    },
    /// Retention expired it; its file or session is removed next.
    Expired,
}

impl ImageState {
    /// The state's discriminant.
    #[must_use]
    pub fn kind(&self) -> ImageStateKind {
        match self {
            ImageState::Incomplete => ImageStateKind::Incomplete,
            ImageState::Valid => ImageStateKind::Valid,
            ImageState::Lost { .. } => ImageStateKind::Lost,
            ImageState::Expired => ImageStateKind::Expired,
        }
    }
}

/// An [`ImageState`] without its data: what a [`super::Change::SetImageState`] expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStateKind {
    /// [`ImageState::Incomplete`].
    Incomplete,
    /// [`ImageState::Valid`].
    Valid,
    /// [`ImageState::Lost`].
    Lost,
    /// [`ImageState::Expired`].
    Expired,
}

impl ImageStateKind {
    /// The name kept in the `state` column.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStateKind::Incomplete => "incomplete",
            ImageStateKind::Valid => "valid",
            ImageStateKind::Lost => "lost",
            ImageStateKind::Expired => "expired",
        }
    }
}

/// A catalog image: a time-zero copy, with the engine's facts copied in at the cut (3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Its id.
    pub id: ImageId,
    /// The job that cut it.
    pub job: JobId,
    /// The job's task.
    pub task: u32,
    /// The plan.
    pub plan: String,
    /// The backup day.
    pub backup_day: BackupDay,
    /// The activity table holding the session.
    pub table: PathBuf,
    /// The session.
    pub session: SessionId,
    /// T0, ms since the Unix epoch (`SessionStatus::created_unix_ms`).
    pub t0_unix_ms: u64,
    /// Copy or nocopy.
    #[serde(with = "engine_serde::copy_mode")]
    pub mode: CopyMode,
    /// The grain.
    #[serde(with = "engine_serde::grain")]
    pub grain: GrainSize,
    /// The source as it was at the cut.
    #[serde(with = "engine_serde::volume")]
    pub source: VolumeRef,
    /// The target as it was at the cut.
    #[serde(with = "engine_serde::volume")]
    pub target: VolumeRef,
    /// The extents, in image order (the `.f` file).
    #[serde(with = "engine_serde::extents")]
    pub extents: Vec<ExtentSpec>,
    /// Its state.
    pub state: ImageState,
    /// Checksums of the image's bytes, when they were computed at the end of its copy (CAT-03);
    /// rows written before the field existed read as `None`.
    #[serde(default)]
    pub checksums: Option<ImageChecksums>,
}

/// The checksum algorithm of [`ImageChecksums`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumAlgorithm {
    /// CRC-32 (IEEE 802.3, polynomial 0x04C11DB7 reflected), as `crc32fast` computes it: rows
    /// written before CRC32C; still verified with this algorithm.
    Crc32,
    /// CRC-32C (Castagnoli, polynomial 0x1EDC6F41 reflected), as the `crc32c` crate computes it
    /// with the processor's CRC instructions: what new images store.
    Crc32c,
}

impl ChecksumAlgorithm {
    /// The checksum of `bytes` with this algorithm.
    #[must_use]
    pub fn sum(self, bytes: &[u8]) -> u32 {
        match self {
            ChecksumAlgorithm::Crc32 => crc32fast::hash(bytes),
            ChecksumAlgorithm::Crc32c => crc32c::crc32c(bytes),
        }
    }

    /// Its name as rows and `--json` spell it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::Crc32 => "crc32",
            ChecksumAlgorithm::Crc32c => "crc32c",
        }
    }
}

/// Checksums of an image's bytes (its extents end to end, in image order), one per block of
/// `block_bytes` (the last block may be shorter) (CAT-03).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageChecksums {
    /// The algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// Bytes per checksum (1 MiB).
    pub block_bytes: u64,
    /// Bytes covered: the image's length.
    pub image_bytes: u64,
    /// One checksum per block, in image order.
    pub sums: Vec<u32>,
}

/// A schedule: a recurrence expression in a zone, as the calendar layer reads it (3.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRow {
    /// Its name (the key).
    pub name: String,
    /// The expression (`cron ...`, `every 1w from ...`, `once ...`), parsed by the calendar.
    pub expr: String,
    /// The IANA zone name.
    pub zone: String,
    /// Whether its events run (CAL-09).
    pub enabled: bool,
}

/// What an event starts (CAL-06 groups similar events by it; `calendar` adds the similarity).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// Run a plan.
    Plan {
        /// The plan's name.
        plan: String,
    },
    /// Run a command.
    Command {
        /// Its name.
        name: String,
        /// Its argv.
        argv: Vec<String>,
    },
    /// Maintenance of a destination.
    Maintenance {
        /// The destination.
        dest: String,
    },
    /// The start of a backup day (CAL-11).
    Newday,
}

/// A calendar event (3.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    /// Its id.
    pub id: EventId,
    /// Its name (unique).
    pub name: String,
    /// The schedule it uses (must exist).
    pub schedule: String,
    /// What it starts.
    pub kind: EventKind,
    /// Its priority.
    pub priority: Priority,
    /// A blocking event starts nothing and suppresses (CAL-08).
    pub blocking: bool,
    /// Whether it runs (CAL-09).
    pub enabled: bool,
    /// Its next occurrence; `None` when it has none.
    #[serde(with = "super::ms::opt")]
    pub next_due: Option<Timestamp>,
}

/// What became of an occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum OccurrenceOutcome {
    /// It started this job.
    Started(JobId),
    /// A similar event of higher priority suppressed it (CAL-05).
    Suppressed {
        /// That event.
        by: EventId,
    },
    /// A blocking event's occurrence (CAL-08).
    Activated,
    /// It fell in an earlier backup day during downtime (CAL-15).
    Missed,
    /// Its schedule was disabled (CAL-09).
    ScheduleDisabled,
}

/// One occurrence of an event: at most one row per (event, due) (CAL-19).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OccurrenceRow {
    /// The event.
    pub event: EventId,
    /// Its due instant.
    #[serde(with = "super::ms")]
    pub due: Timestamp,
    /// Its backup day.
    pub backup_day: BackupDay,
    /// What became of it.
    pub outcome: OccurrenceOutcome,
}

/// A SHA-256 as 64 lowercase hex digits (readable in the `sqlite3` shell).
mod sha256_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => s.serialize_some(&h.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let bad = || serde::de::Error::custom(format!("SHA-256 {text:?} is not 64 hex digits"));
        if text.len() != 64 || !text.is_ascii() {
            return Err(bad());
        }
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Some(h))
    }
}

/// Serde forms of the engine's value types that have none of their own (the engine's modules
/// stay as they are): a copy mode as `"copy"`/`"nocopy"`, a grain as its bytes, a volume
/// reference as an object with the id in hex, extents as `[source, target, len]` triples.
mod engine_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub mod copy_mode {
        use super::*;
        use crate::model::CopyMode;

        pub fn serialize<S: Serializer>(m: &CopyMode, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(match m {
                CopyMode::Copy => "copy",
                CopyMode::NoCopy => "nocopy",
            })
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CopyMode, D::Error> {
            match String::deserialize(d)?.as_str() {
                "copy" => Ok(CopyMode::Copy),
                "nocopy" => Ok(CopyMode::NoCopy),
                other => Err(serde::de::Error::custom(format!(
                    "copy mode {other:?} is not copy or nocopy"
                ))),
            }
        }
    }

    pub mod grain {
        use super::*;
        use crate::ids::GrainSize;

        pub fn serialize<S: Serializer>(g: &GrainSize, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u64(g.bytes())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GrainSize, D::Error> {
            GrainSize::new(u64::deserialize(d)?).map_err(serde::de::Error::custom)
        }
    }

    #[derive(Serialize, Deserialize)]
    struct VolumeForm {
        id: String,
        size: u64,
        sector_size: u32,
        generation: u64,
        locator: String,
    }

    pub mod volume {
        use super::*;
        use crate::ids::{Generation, VolumeId};
        use crate::model::VolumeRef;

        pub fn serialize<S: Serializer>(v: &VolumeRef, s: S) -> Result<S::Ok, S::Error> {
            VolumeForm {
                id: v.id.to_string(),
                size: v.size,
                sector_size: v.sector_size,
                generation: v.generation.0,
                locator: v.locator.clone(),
            }
            .serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VolumeRef, D::Error> {
            let f = VolumeForm::deserialize(d)?;
            let bad = || serde::de::Error::custom(format!("volume id {:?} is not 32 hex", f.id));
            if f.id.len() != 32 || !f.id.is_ascii() {
                return Err(bad());
            }
            let mut id = [0u8; 16];
            for (i, b) in id.iter_mut().enumerate() {
                *b = u8::from_str_radix(&f.id[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
            }
            Ok(VolumeRef {
                id: VolumeId(id),
                size: f.size,
                sector_size: f.sector_size,
                generation: Generation(f.generation),
                locator: f.locator,
            })
        }
    }

    pub mod extents {
        use super::*;
        use crate::model::ExtentSpec;

        pub fn serialize<S: Serializer>(e: &[ExtentSpec], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(e.iter().map(|x| [x.source_offset, x.target_offset, x.len]))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ExtentSpec>, D::Error> {
            Ok(Vec::<[u64; 3]>::deserialize(d)?
                .into_iter()
                .map(|[source_offset, target_offset, len]| ExtentSpec {
                    source_offset,
                    target_offset,
                    len,
                })
                .collect())
        }
    }
}
