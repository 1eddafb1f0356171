//! `timezero catalog ls|show|verify` and `timezero restore` (docs/orchestration.md, section 2
//! "Catalog and restore" and section 3.4): the catalog in `STATE/orchestration.sqlite`, read
//! and checked; a restore run as a job of the store, resumable after kill -9.
//!
//! A restore is a job from the moment it is requested (JOB-10: `Active`, phase
//! `awaiting_resources`, owned by this process). It locks its destination (QUI-10), moves to
//! phase `restore`, and gets the image's bytes onto the destination the way
//! [`RestoreMethod::of`] decides: an engine copy session from the image's target with the
//! extents reversed (CAT-07), or a stream through a ring of buffers into `Engine::write`
//! (CAT-08, CAT-09). Creating a missing destination file and establishing the copy session are
//! bracketed by intent rows. Running the same restore again after the process died takes the
//! job over and goes on: the copy session from its bitmap, the stream from its last
//! checkpoint. The lock is released when the job's end is committed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;

use super::plan::parse_at;
use super::state::state_dir;
use super::{Fail, IoFlags};
use crate::catalog::{
    self, CatalogError, CatalogQuery, FileVolumes, ImageReader, Pick, RestoreMethod, RestorePiece,
    StreamOptions, StreamProgress,
};
use crate::command::output::json;
use crate::engine::copier::{Copier, CopierEvent, CopierOptions};
use crate::engine::{Engine, RestartPolicy};
use crate::job::{owner_alive, owner_of_this_process, JobOutcome};
use crate::limits::{
    RESTORE_CHECKPOINT_BYTES_DEFAULT, RESTORE_COPY_REQUEST_BYTES, RESTORE_COPY_THREADS,
    RESTORE_PROGRESS_POLL_MILLIS, RESTORE_REVERSE_BATCH_BYTES,
};
use crate::quiesce::TargetLock;
use crate::store::{
    BackupDay, Change, EventId, EventKind, EventRow, IdKind, ImageId, ImageRecord, Intent,
    IntentAction, IntentId, IntentOutcome, JobId, JobKind, JobProgress, JobQuery, JobReason,
    JobRecord, JobState, JobStateKind, JobStatus, OccurrenceOutcome, OccurrenceRow, Phase,
    Priority, ScheduleRow, SqliteStore, Store,
};
use crate::{CopyMode, SessionId, SessionState, VolumeId};
use crossbeam::channel::RecvTimeoutError;

/// How often a copy-session restore looks at its copier when no commit was reported.
const RESTORE_PROGRESS_POLL: Duration = Duration::from_millis(RESTORE_PROGRESS_POLL_MILLIS);

/// The store of the state directory; a directory without one is an error (nothing was ever
/// recorded there), not a new empty catalog.
fn open_store(state: Option<PathBuf>) -> Result<SqliteStore, Fail> {
    let dir = state_dir(state);
    let path = dir.join("orchestration.sqlite");
    if !path.exists() {
        return Err(Fail::Message(format!(
            "{} does not exist: no catalog in state directory {} (--state or $TIMEZERO_STATE)",
            path.display(),
            dir.display()
        )));
    }
    SqliteStore::open(&path).map_err(|e| Fail::Message(e.to_string()))
}

fn cat(e: CatalogError) -> Fail {
    match e {
        CatalogError::Extent { .. } => Fail::Usage(e.to_string()),
        e => Fail::Message(e.to_string()),
    }
}

fn store_err(e: crate::store::StoreError) -> Fail {
    Fail::Message(format!("catalog store: {e}"))
}

fn when(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| format!("{ms} ms"), |t| t.to_string())
}

/// `catalog ls`.
pub(super) fn ls(
    state: Option<PathBuf>,
    q: (Option<String>, Option<String>, Option<String>, bool),
    as_json: bool,
) -> Result<String, Fail> {
    let (plan, source, day, all) = q;
    let day = day
        .map(|d| {
            d.parse::<BackupDay>()
                .map_err(|e| Fail::Usage(format!("--day {d}: {e}")))
        })
        .transpose()?;
    let store = open_store(state)?;
    let lines = catalog::list(
        &store,
        &CatalogQuery {
            plan,
            source,
            day,
            all,
        },
    )
    .map_err(cat)?;
    if as_json {
        return Ok(json(&lines)?);
    }
    let mut s = String::new();
    for l in &lines {
        s += &format!(
            "{} {} {} day {} t0 {} {} {} {}\n",
            l.id,
            l.state.as_str(),
            l.plan,
            l.backup_day,
            when(l.t0_unix_ms),
            l.mode,
            crate::units::format_size(l.bytes),
            l.source
        );
    }
    Ok(s)
}

/// `catalog show I`.
pub(super) fn show(state: Option<PathBuf>, image: ImageId, as_json: bool) -> Result<String, Fail> {
    let store = open_store(state)?;
    let s = catalog::show(&store, image).map_err(cat)?;
    if as_json {
        return Ok(json(&s)?);
    }
    let r = &s.record;
    let mut t =
        format!(
        "{}: {} ({} bytes, {})\n  plan {} job {} task {} day {}\n  t0 {}\n  session {} in {}\n  \
         source {}\n  target {}\n  grain {}\n",
        r.id,
        r.state.kind().as_str(),
        s.bytes,
        if r.mode == CopyMode::Copy { "copy" } else { "nocopy" },
        r.plan,
        r.job,
        r.task,
        r.backup_day,
        when(r.t0_unix_ms),
        r.session,
        r.table.display(),
        r.source.locator,
        r.target.locator,
        crate::units::format_size(r.grain.bytes()),
    );
    if let crate::store::ImageState::Lost { why, .. } = &r.state {
        t += &format!("  lost: {why}\n");
    }
    for e in &r.extents {
        t += &format!(
            "  extent {}:{}@{}\n",
            e.source_offset, e.len, e.target_offset
        );
    }
    match &r.checksums {
        Some(c) => {
            t += &format!(
                "  checksums {} per {} ({} blocks)\n",
                c.algorithm.as_str(),
                crate::units::format_size(c.block_bytes),
                c.sums.len()
            );
        }
        None => t += "  checksums none\n",
    }
    Ok(t)
}

/// `catalog verify I`: exit 0 when every MiB matches, 1 (with the first mismatching MiB) when
/// one does not.
pub(super) fn verify(
    state: Option<PathBuf>,
    image: ImageId,
    io: IoFlags,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<String, Fail> {
    let store = open_store(state)?;
    let row = store
        .image(image)
        .map_err(store_err)?
        .ok_or_else(|| cat(CatalogError::UnknownImage(image)))?;
    // A nocopy image is read through its session, so its table is opened; a copy image only
    // through its target file.
    let engine = match row.mode {
        CopyMode::NoCopy => Some(super::open(&row.table, RestartPolicy::Resume, io)?),
        CopyMode::Copy => None,
    };
    let report =
        catalog::verify(&store, image, &FileVolumes::default(), engine.as_ref()).map_err(cat)?;
    let text = if as_json {
        json(&report)?
    } else {
        format!(
            "{}: {} of {} MiB differ ({})\n",
            report.image,
            report.mismatches,
            report.blocks,
            report.algorithm.as_str()
        )
    };
    let _ = out.write_all(text.as_bytes());
    match report.first_mismatch_mib {
        None => Ok(String::new()),
        Some(mib) => Err(Fail::Message(format!(
            "image {image}: MiB {mib} does not match its checksum ({} of {} MiB differ): the \
             target {} was changed",
            report.mismatches, report.blocks, row.target.locator
        ))),
    }
}

/// `--extent OFF:LEN` of `restore`, in source offsets.
pub(super) fn restore_extent(s: &str) -> Result<(u64, u64), String> {
    let (off, len) = s
        .split_once(':')
        .ok_or_else(|| format!("{s}: expected OFFSET:LEN"))?;
    let off = super::args::size(off)?;
    let len = super::args::size(len)?;
    if len == 0 {
        return Err(format!("{s}: the length is 0"));
    }
    Ok((off, len))
}

/// What `restore` was asked.
#[derive(Debug)]
pub(super) struct RestoreArgs {
    /// `restore I`.
    pub image: Option<ImageId>,
    /// `--plan`.
    pub plan: Option<String>,
    /// `--source`.
    pub source: Option<String>,
    /// `--at`.
    pub at: Option<String>,
    /// `--to`.
    pub to: PathBuf,
    /// `--extent`s.
    pub extents: Vec<(u64, u64)>,
    /// `--wait`.
    pub wait: bool,
    /// `--state`.
    pub state: Option<PathBuf>,
    /// `--json`.
    pub json: bool,
    /// Hidden: bytes per second (tests slow a restore down to kill it half-way).
    pub rate: Option<u64>,
    /// Hidden: bytes between checkpoints.
    pub checkpoint: Option<u64>,
}

/// What `restore --wait` prints.
#[derive(Debug, Serialize)]
struct RestoreOut {
    job: JobId,
    image: ImageId,
    dest: String,
    method: RestoreMethod,
    /// Bytes of the image's pieces restored in all.
    bytes: u64,
    /// Where this run started (a resumed job starts past 0).
    resumed_from: u64,
    /// The copy session of a copy-session restore.
    session: Option<SessionId>,
    /// Times the stream's reader waited for an empty buffer.
    waits_for_empty: u64,
    /// Times the stream's writer waited for a full buffer.
    waits_for_full: u64,
    /// Bytes the stream's ring moved, over all the runs of the job.
    ring_bytes: u64,
    /// Buffers in the stream's ring.
    ring_buffers: u64,
    /// The job's status number (0 = success).
    status: u32,
}

/// The destination as the job records it: its canonical path (its directory's, with its
/// name, when it does not exist yet).
fn dest_path(to: &Path) -> Result<PathBuf, Fail> {
    if let Ok(p) = std::fs::canonicalize(to) {
        return Ok(p);
    }
    let name = to
        .file_name()
        .ok_or_else(|| Fail::Usage(format!("--to {}: not a file name", to.display())))?;
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| {
        Fail::Message(format!(
            "--to {}: directory {}: {e}",
            to.display(),
            dir.display()
        ))
    })?;
    Ok(dir.join(name))
}

/// A stopwatch that holds a loop to `rate` bytes per second (hidden `--rate`).
struct Pace {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn new(rate: Option<u64>) -> Pace {
        Pace {
            rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    fn add(&mut self, n: u64) {
        self.bytes += n;
        if let Some(r) = self.rate {
            let due = Duration::from_secs_f64(self.bytes as f64 / r as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Everything one restore run works with.
struct Run<'a> {
    store: &'a dyn Store,
    job: JobRecord,
    image: ImageRecord,
    dest: PathBuf,
    pieces: Vec<RestorePiece>,
    args: &'a RestoreArgs,
    /// The activity tables the state directory configures (`timezero.toml`).
    tables: Vec<PathBuf>,
}

impl Run<'_> {
    fn intent(&self, action: IntentAction) -> Result<IntentId, Fail> {
        let id = IntentId(self.store.allocate(IdKind::Intent).map_err(store_err)?);
        self.store
            .commit(vec![Change::PutIntent(Intent {
                id,
                job: self.job.id,
                attempt: self.job.attempt,
                task: None,
                action,
                created: Timestamp::now(),
                outcome: None,
                resolved: None,
            })])
            .map_err(store_err)?;
        Ok(id)
    }

    fn resolve(&self, intent: IntentId, outcome: IntentOutcome) -> Result<(), Fail> {
        self.store
            .commit(vec![Change::Resolve {
                intent,
                outcome,
                at: Timestamp::now(),
            }])
            .map_err(store_err)
    }

    fn progress(&self, p: JobProgress) -> Result<(), CatalogError> {
        self.store
            .commit(vec![Change::SetProgress {
                job: self.job.id,
                attempt: self.job.attempt,
                progress: p,
            }])
            .map_err(CatalogError::Store)
    }

    /// Resolve the open intents a dead owner left: a destination file that exists was
    /// created; a copy session found in the table was established (adopted).
    fn settle_intents(&self, engine: &Engine, dest_id: Option<VolumeId>) -> Result<(), Fail> {
        let open = self.store.open_intents().map_err(store_err)?;
        for i in open.iter().filter(|i| i.job == self.job.id) {
            let outcome = match &i.action {
                IntentAction::CreateTarget { path } => {
                    if path.exists() {
                        IntentOutcome::Done
                    } else {
                        IntentOutcome::NotDone
                    }
                }
                IntentAction::Establish { .. } => {
                    match dest_id.and_then(|d| self.restore_session(engine, d)) {
                        Some(s) => IntentOutcome::Adopted(s),
                        None => IntentOutcome::NotDone,
                    }
                }
                _ => IntentOutcome::Unknown,
            };
            self.resolve(i.id, outcome)?;
        }
        Ok(())
    }

    /// The copy session of this job in the engine's table: from the image's target to the
    /// destination, active or completed, established after the job was created.
    fn restore_session(&self, engine: &Engine, dest: VolumeId) -> Option<SessionId> {
        let since = u64::try_from(self.job.created.as_millisecond()).unwrap_or(0);
        engine
            .status()
            .iter()
            .filter(|s| {
                matches!(s.state, SessionState::Active | SessionState::Completed)
                    && s.created_unix_ms >= since
            })
            .find(|s| {
                engine.session(s.id).is_ok_and(|x| {
                    x.desc.target.id == dest && x.desc.source.locator == self.image.target.locator
                })
            })
            .map(|s| s.id)
    }

    /// A destination file that is not there is created at the source's size (an intent
    /// around it).
    fn create_dest(&self) -> Result<(), Fail> {
        if self.dest.exists() {
            return Ok(());
        }
        let intent = self.intent(IntentAction::CreateTarget {
            path: self.dest.clone(),
        })?;
        let made = (|| -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&self.dest)?;
            f.set_len(self.image.source.size)?;
            f.sync_all()
        })();
        match made {
            Ok(()) => {
                if let Some(dir) = self.dest.parent() {
                    crate::sync_dir(dir)?;
                }
                self.resolve(intent, IntentOutcome::Done)
            }
            Err(e) => {
                self.resolve(intent, IntentOutcome::Failed(e.to_string()))?;
                Err(Fail::Message(format!(
                    "create {}: {e}",
                    self.dest.display()
                )))
            }
        }
    }

    fn copy_session(
        &self,
        engine: &Arc<Engine>,
        dest: VolumeId,
        out: &mut RestoreOut,
    ) -> Result<(), Fail> {
        let session = match self.restore_session(engine, dest) {
            Some(s) => s,
            None => {
                let intent = self.intent(IntentAction::Establish {
                    table: self.image.table.clone(),
                    target: self.dest.display().to_string(),
                })?;
                let established = engine
                    .attach_path(Path::new(&self.image.target.locator))
                    .map_err(|e| CatalogError::Volume {
                        op: "attach the image's target",
                        locator: self.image.target.locator.clone(),
                        source: Box::new(e),
                    })
                    .and_then(|src| {
                        catalog::start_copy_restore(engine, &self.image, &self.pieces, src, dest)
                    });
                match established {
                    Ok(s) => {
                        self.resolve(intent, IntentOutcome::Established(s))?;
                        s
                    }
                    Err(e) => {
                        self.resolve(intent, IntentOutcome::Failed(e.to_string()))?;
                        return Err(cat(e));
                    }
                }
            }
        };
        out.session = Some(session);
        let grain = self.image.grain.bytes();
        let every = self
            .args
            .checkpoint
            .unwrap_or(RESTORE_CHECKPOINT_BYTES_DEFAULT);
        let total_bytes: u64 = self.pieces.iter().map(|p| p.len).sum();
        let copied = || {
            engine
                .status()
                .iter()
                .find(|s| s.id == session)
                .map_or(0, |s| s.grains_copied.get().saturating_mul(grain))
                .min(total_bytes)
        };
        out.resumed_from = copied();
        // The engine's copier: one thread, 4 MiB requests, and a durability point (target
        // flushed, bits committed) per checkpoint rather than per 16 MiB; each durable commit
        // it reports moves the job's progress on.
        let (tx, rx) = crossbeam::channel::unbounded::<Option<u64>>();
        let copier = Copier::start_with_events(
            Arc::clone(engine),
            CopierOptions {
                threads: RESTORE_COPY_THREADS,
                batch_bytes: RESTORE_COPY_REQUEST_BYTES,
                commit_bytes: every,
                sessions: vec![session],
                rate_bytes_per_s: self.args.rate,
                ..CopierOptions::default()
            },
            move |ev| {
                let _ = match ev {
                    CopierEvent::Committed { bytes, .. } => tx.send(Some(*bytes)),
                    CopierEvent::Completed { .. } => tx.send(None),
                    _ => Ok(()),
                };
            },
        )?;
        let mut done = out.resumed_from;
        let mut next = done;
        let mut failed = None;
        loop {
            match rx.recv_timeout(RESTORE_PROGRESS_POLL) {
                Ok(Some(bytes)) => {
                    done = (done + bytes).min(total_bytes);
                    if done >= next && failed.is_none() {
                        next = done + every;
                        failed = self
                            .progress(JobProgress {
                                bytes_done: done,
                                bytes_total: total_bytes,
                                ..JobProgress::default()
                            })
                            .err();
                        if failed.is_some() {
                            copier.pause();
                        }
                    }
                }
                Ok(None) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) if copier.finished() => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        if let Some(e) = failed {
            let _ = copier.stop();
            return Err(cat(e));
        }
        copier.join()?;
        if copied() < total_bytes {
            return Err(Fail::Message(format!(
                "the restore session {session} stopped at byte {} of {total_bytes}",
                copied()
            )));
        }
        self.progress(JobProgress {
            bytes_done: total_bytes,
            bytes_total: total_bytes,
            ..JobProgress::default()
        })
        .map_err(cat)?;
        out.bytes = total_bytes;
        Ok(())
    }

    /// In place through the engine's reverse restore of the image's own session: started (or
    /// found under way after a crash), then moved back batch by batch in this thread, the
    /// job's progress recorded every checkpoint.
    fn reverse(&self, engine: &Engine, out: &mut RestoreOut) -> Result<(), Fail> {
        let (started, pending) =
            catalog::start_reverse_restore(engine, &self.image).map_err(cat)?;
        out.session = Some(self.image.session);
        let before = self.job.progress.unwrap_or_default();
        // The total is what the reverse had to move when it started; a resumed one kept it in
        // the job's progress.
        let total = if started || before.bytes_total < pending {
            pending
        } else {
            before.bytes_total
        };
        out.resumed_from = total - pending;
        let every = self
            .args
            .checkpoint
            .unwrap_or(RESTORE_CHECKPOINT_BYTES_DEFAULT);
        self.progress(JobProgress {
            bytes_done: total - pending,
            bytes_total: total,
            ..JobProgress::default()
        })
        .map_err(cat)?;
        let mut pace = Pace::new(self.args.rate);
        let mut next = total - pending + every;
        catalog::run_reverse_restore(
            engine,
            self.image.session,
            RESTORE_REVERSE_BATCH_BYTES,
            &mut |p| {
                pace.add(p.moved - pace.bytes);
                let done = total.saturating_sub(p.pending);
                if done >= next {
                    next = done + every;
                    self.progress(JobProgress {
                        bytes_done: done,
                        bytes_total: total,
                        ..JobProgress::default()
                    })?;
                }
                Ok(())
            },
        )
        .map_err(cat)?;
        self.progress(JobProgress {
            bytes_done: total,
            bytes_total: total,
            ..JobProgress::default()
        })
        .map_err(cat)?;
        out.bytes = total;
        Ok(())
    }

    /// Refuse a destination that a live session of another configured table protects.
    fn check_other_tables(&self) -> Result<(), Fail> {
        let own = std::fs::canonicalize(&self.image.table).unwrap_or(self.image.table.clone());
        let mut others = Vec::new();
        for t in &self.tables {
            let path = std::fs::canonicalize(t).unwrap_or(t.clone());
            if path == own || !path.exists() {
                continue;
            }
            let snap = crate::engine::read_status(&path)
                .map_err(|e| Fail::Message(format!("read table {}: {e}", path.display())))?;
            let sessions = snap
                .sessions
                .into_iter()
                .map(|mut s| {
                    if let Ok(p) = std::fs::canonicalize(&s.source) {
                        s.source = p.display().to_string();
                    }
                    s
                })
                .collect();
            others.push((path, sessions));
        }
        catalog::check_not_protected_elsewhere(&self.dest.display().to_string(), &others)
            .map_err(cat)
    }

    fn stream(&self, engine: &Engine, dest: VolumeId, out: &mut RestoreOut) -> Result<(), Fail> {
        let volumes = FileVolumes::default();
        let reader = ImageReader::open(&self.image, &volumes, Some(engine)).map_err(cat)?;
        let start = self.job.progress.and_then(|p| p.checkpoint).unwrap_or(0);
        let before = self.job.progress.unwrap_or_default();
        out.resumed_from = start;
        let opts = StreamOptions {
            checkpoint_bytes: self
                .args
                .checkpoint
                .unwrap_or(RESTORE_CHECKPOINT_BYTES_DEFAULT),
            ..StreamOptions::default()
        };
        let total: u64 = self.pieces.iter().map(|p| p.len).sum();
        let mut pace = Pace::new(self.args.rate);
        let mut at = start;
        let report = catalog::stream(
            engine,
            &reader,
            dest,
            &self.pieces,
            start,
            &opts,
            &mut |p: &StreamProgress| {
                pace.add(p.position - at);
                at = p.position;
                // The ring's counters add up over the runs of a resumed job.
                let mut j = p.job_progress();
                j.waits_for_empty += before.waits_for_empty;
                j.waits_for_full += before.waits_for_full;
                j.ring_bytes += before.ring_bytes;
                self.progress(j)
            },
        )
        .map_err(cat)?;
        let done = JobProgress {
            bytes_done: total,
            bytes_total: total,
            waits_for_full: before.waits_for_full + report.waits_for_full,
            waits_for_empty: before.waits_for_empty + report.waits_for_empty,
            checkpoint: Some(total),
            ring_bytes: before.ring_bytes + report.bytes,
            ring_buffers: report.buffers as u64,
            ring_buffer_bytes: report.buffer_bytes as u64,
        };
        self.progress(done).map_err(cat)?;
        out.bytes = total;
        out.waits_for_empty = done.waits_for_empty;
        out.waits_for_full = done.waits_for_full;
        out.ring_bytes = done.ring_bytes;
        out.ring_buffers = done.ring_buffers;
        Ok(())
    }
}

/// A new restore job: `Active` at once (JOB-10), owned by this process, started by a disabled
/// one-time event of its own (every job names the event that started it).
fn new_job(
    store: &SqliteStore,
    image: ImageId,
    dest: &Path,
    extents: &[(u64, u64)],
    owner: &str,
) -> Result<JobRecord, Fail> {
    let now = Timestamp::from_millisecond(Timestamp::now().as_millisecond())
        .map_err(|e| Fail::Message(e.to_string()))?;
    let event = EventId(store.allocate(IdKind::Event).map_err(store_err)?);
    let id = JobId(store.allocate(IdKind::Job).map_err(store_err)?);
    let schedule = ScheduleRow {
        name: format!("restore-{event}"),
        expr: format!("once {now}"),
        zone: "UTC".to_string(),
        enabled: false,
    };
    // The command as it must run again after a crash: a restore taken over by `reconcile` or
    // a daemon's start reads its extents back from here (`restore_argv_extents`).
    let mut argv = vec![
        "restore".to_string(),
        image.to_string(),
        "--to".to_string(),
        dest.display().to_string(),
    ];
    for (off, len) in extents {
        argv.push("--extent".to_string());
        argv.push(format!("{off}:{len}"));
    }
    let ev = EventRow {
        id: event,
        name: format!("restore-{image}-{event}"),
        schedule: schedule.name.clone(),
        kind: EventKind::Command {
            name: "restore".to_string(),
            argv,
        },
        priority: Priority::ALWAYS,
        blocking: false,
        enabled: false,
        next_due: None,
    };
    let backup_day = BackupDay(now.to_zoned(jiff::tz::TimeZone::UTC).date());
    let job = JobRecord {
        id,
        kind: JobKind::Restore {
            image,
            dest: dest.display().to_string(),
        },
        event,
        due_at: now,
        backup_day,
        priority: Priority::ALWAYS,
        attempt: 1,
        state: JobState::Active {
            phase: Phase::AwaitingResources,
        },
        owner: Some(owner.to_string()),
        plan_text: None,
        plan_sha256: None,
        progress: None,
        created: now,
        started: Some(now),
        ended: None,
        stop_requested: None,
    };
    store
        .commit(vec![
            Change::PutSchedule {
                schedule,
                replace: false,
            },
            Change::PutEvent {
                event: ev,
                replace: false,
            },
            Change::InsertJob {
                occurrence: OccurrenceRow {
                    event,
                    due: now,
                    backup_day,
                    outcome: OccurrenceOutcome::Started(id),
                },
                job: job.clone(),
            },
        ])
        .map_err(store_err)?;
    Ok(job)
}

fn phase(store: &dyn Store, job: &JobRecord, to: JobState, owner: &str) -> Result<(), Fail> {
    store
        .commit(vec![Change::Transition {
            job: job.id,
            from: JobStateKind::Active,
            attempt: job.attempt,
            to,
            to_attempt: job.attempt,
            owner: Some(owner.to_string()),
            at: Timestamp::now(),
        }])
        .map_err(store_err)
}

/// `timezero restore`.
pub(super) fn restore(
    args: &RestoreArgs,
    io: IoFlags,
    out: &mut dyn Write,
) -> Result<String, Fail> {
    let pick = match (&args.image, &args.plan, &args.source, &args.at) {
        (Some(i), None, None, None) => Pick::Image(*i),
        (None, Some(plan), Some(source), Some(at)) => {
            let at = parse_at(at, Timestamp::now())?;
            let source = std::fs::canonicalize(source)
                .map_or_else(|_| source.clone(), |p| p.display().to_string());
            Pick::Newest {
                plan: plan.clone(),
                source,
                at_or_before_ms: u64::try_from(at.as_millisecond()).unwrap_or(0),
            }
        }
        _ => {
            return Err(Fail::Usage(
                "restore needs an IMAGE or all of --plan, --source and --at".to_string(),
            ))
        }
    };
    // A daemon holds the tables: it runs the restore.
    let state = super::state::StateDir::new(args.state.clone());
    if let (Pick::Image(i), true) = (
        &pick,
        args.extents.is_empty() && state.store_path().exists(),
    ) {
        if state.hold_runner_lock()?.is_err() {
            return super::daemon::restore_hand_over(&state, *i, &args.to, args.wait, out);
        }
    }
    let dest = dest_path(&args.to)?;
    let store = open_store(args.state.clone())?;
    let image = match catalog::choose(&store, &pick) {
        Ok(i) => i,
        // `--source` as the image recorded it, when canonical and recorded paths differ.
        Err(CatalogError::NoImage { .. }) if matches!(pick, Pick::Newest { .. }) => {
            let Pick::Newest {
                plan,
                at_or_before_ms,
                ..
            } = &pick
            else {
                unreachable!("matched above")
            };
            catalog::choose(
                &store,
                &Pick::Newest {
                    plan: plan.clone(),
                    source: args.source.clone().unwrap_or_default(),
                    at_or_before_ms: *at_or_before_ms,
                },
            )
            .map_err(cat)?
        }
        Err(e) => return Err(cat(e)),
    };
    let pieces = catalog::restore_pieces(&image, &args.extents).map_err(cat)?;
    let owner = owner_of_this_process();

    // The same restore left half-done by a process that died is taken over; one whose owner
    // runs is refused.
    let same = store
        .jobs(&JobQuery {
            states: Some(vec![JobStateKind::Active]),
            ..JobQuery::default()
        })
        .map_err(store_err)?
        .into_iter()
        .find(|j| {
            j.kind
                == JobKind::Restore {
                    image: image.id,
                    dest: dest.display().to_string(),
                }
        });
    let job = match same {
        Some(j) if j.owner.as_deref().is_some_and(owner_alive) => {
            return Err(Fail::Message(format!(
                "restore job {} of {} to {} is running ({})",
                j.id,
                image.id,
                dest.display(),
                j.owner.unwrap_or_default()
            )))
        }
        Some(j) => {
            phase(&store, &j, j.state.clone(), &owner)?;
            j
        }
        None => new_job(&store, image.id, &dest, &args.extents, &owner)?,
    };
    if !args.json {
        let _ = writeln!(
            out,
            "restore job {}: image {} to {}",
            job.id,
            image.id,
            dest.display()
        );
        let _ = out.flush();
    }
    let run = Run {
        store: &store,
        job,
        image,
        dest,
        pieces,
        args,
        tables: state.tables()?,
    };
    let result = run_job(&run, io, &owner, None);
    let (status, reason, code) = outcome_of(&result);
    // The job's end is committed while the destination is still locked (QUI-10): the lock is
    // in `result` and dropped after.
    phase(&store, &run.job, JobState::Done { status, reason }, &owner)?;
    let (mut summary, _lock) = result?;
    summary.status = code;
    if !args.wait {
        return Ok(String::new());
    }
    if args.json {
        return Ok(json(&summary)?);
    }
    let how = match summary.method {
        RestoreMethod::CopySession => format!(
            "by copy session {}",
            summary.session.map(|s| s.to_string()).unwrap_or_default()
        ),
        RestoreMethod::Stream => "by stream through the engine".to_string(),
        RestoreMethod::Reverse => format!(
            "by reverse restore of session {}",
            summary.session.map(|s| s.to_string()).unwrap_or_default()
        ),
    };
    Ok(format!(
        "restored {} to {}: {} bytes {how} (resumed from byte {}); ring waits: reader {}, writer {}\n",
        summary.image,
        summary.dest,
        summary.bytes,
        summary.resumed_from,
        summary.waits_for_empty,
        summary.waits_for_full
    ))
}

/// The job status, reason and exit status of a restore's result.
fn outcome_of(
    result: &Result<(RestoreOut, TargetLock), Fail>,
) -> (JobStatus, Option<JobReason>, u32) {
    match result {
        Ok(_) => (JobStatus::Success, None, 0),
        Err(Fail::Message(m) | Fail::Usage(m)) if m.contains("is busy") => {
            (JobStatus::Failed, Some(JobReason::TargetBusy), 12)
        }
        Err(Fail::Message(m) | Fail::Usage(m)) => {
            (JobStatus::Failed, Some(JobReason::Engine(m.clone())), 17)
        }
        Err(Fail::Run(e)) => (
            JobStatus::Failed,
            Some(JobReason::Engine(e.to_string())),
            17,
        ),
    }
}

/// A restore requested from the daemon (`restore` on `STATE/daemon.ctl`): the job is created
/// `Active` (phase awaiting resources, JOB-10) before this returns, owned by the daemon
/// instance `owner`, and runs on a thread of its own with the engines the daemon holds (the
/// image's table is opened when the daemon does not hold it). Returns the job and its thread.
pub(super) fn restore_in_daemon(
    store: &Arc<SqliteStore>,
    image: u64,
    to: &Path,
    engines: &std::collections::HashMap<PathBuf, Arc<Engine>>,
    tables: Vec<PathBuf>,
    owner: &str,
) -> Result<(JobId, std::thread::JoinHandle<()>), Fail> {
    let dest = dest_path(to)?;
    let image = catalog::choose(&**store, &Pick::Image(ImageId(image))).map_err(cat)?;
    let pieces = catalog::restore_pieces(&image, &[]).map_err(cat)?;
    let job = new_job(store, image.id, &dest, &[], owner)?;
    let id = job.id;
    let engine = engines.get(&image.table).cloned();
    let store = Arc::clone(store);
    let owner = owner.to_string();
    let args = RestoreArgs {
        image: Some(image.id),
        plan: None,
        source: None,
        at: None,
        to: dest.clone(),
        extents: Vec::new(),
        wait: false,
        state: None,
        json: false,
        rate: None,
        checkpoint: None,
    };
    let thread = std::thread::Builder::new()
        .name(format!("restore {id}"))
        .spawn(move || {
            let run = Run {
                store: &*store,
                job,
                image,
                dest,
                pieces,
                args: &args,
                tables,
            };
            let result = run_job(&run, IoFlags::default(), &owner, engine);
            let (status, reason, _) = outcome_of(&result);
            let _ = phase(&*store, &run.job, JobState::Done { status, reason }, &owner);
            drop(result);
        })
        .map_err(|e| Fail::Message(format!("start the restore thread of {id}: {e}")))?;
    Ok((id, thread))
}

/// The `--extent`s recorded in the command of a restore job's event (see `new_job`).
fn restore_argv_extents(argv: &[String]) -> Result<Vec<(u64, u64)>, String> {
    let mut extents = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "--extent" {
            let v = it
                .next()
                .ok_or_else(|| "--extent without a value".to_string())?;
            extents.push(restore_extent(v)?);
        }
    }
    Ok(extents)
}

/// Continue a restore job whose process died, on its same attempt, in this process (JOB-09:
/// a restore is past its cut from its start). `timezero reconcile` and a daemon's start call
/// this through the job layer's recovery ([`crate::job::JobWork::resume`]); it does what
/// running the same `restore` command again does: the destination is locked again, open
/// intents are settled, and the restore goes on where its durable state says (a copy session
/// from the engine's table, a reverse restore from the table, a stream from its last
/// checkpoint). `engine` is the image's table when the caller holds it. The job's end is the
/// returned outcome, which the job layer commits and to which its retry rule applies (a
/// retried attempt comes back here through [`crate::job::JobWork::run`]); a job that cannot
/// run as recorded (its image no longer valid, its event gone) fails for good.
pub(super) fn resume_restore(
    store: &dyn Store,
    job: &JobRecord,
    engine: Option<Arc<Engine>>,
    tables: Vec<PathBuf>,
    owner: &str,
) -> JobOutcome {
    let not_retried = |why: String| JobOutcome::Done {
        status: JobStatus::Failed,
        reason: Some(JobReason::Plan(why)),
    };
    let JobKind::Restore { image, dest } = &job.kind else {
        return not_retried(format!("job {} is not a restore", job.id));
    };
    let argv = match store.events() {
        Ok(events) => events
            .into_iter()
            .find(|e| e.id == job.event)
            .and_then(|e| match e.kind {
                EventKind::Command { argv, .. } => Some(argv),
                _ => None,
            }),
        Err(e) => return not_retried(format!("read the restore's event: {e}")),
    };
    let Some(argv) = argv else {
        return not_retried(format!("the event of restore job {} is gone", job.id));
    };
    let extents = match restore_argv_extents(&argv) {
        Ok(x) => x,
        Err(e) => return not_retried(format!("the recorded restore command: {e}")),
    };
    let image = match catalog::choose(store, &Pick::Image(*image)) {
        Ok(i) => i,
        Err(e) => return not_retried(e.to_string()),
    };
    let pieces = match catalog::restore_pieces(&image, &extents) {
        Ok(p) => p,
        Err(e) => return not_retried(e.to_string()),
    };
    let args = RestoreArgs {
        image: Some(image.id),
        plan: None,
        source: None,
        at: None,
        to: PathBuf::from(dest),
        extents,
        wait: false,
        state: None,
        json: false,
        rate: None,
        checkpoint: None,
    };
    let run = Run {
        store,
        job: job.clone(),
        image,
        dest: PathBuf::from(dest),
        pieces,
        args: &args,
        tables,
    };
    let result = run_job(&run, IoFlags::default(), owner, engine);
    let (status, reason, _) = outcome_of(&result);
    // The destination lock is released here, just before the job layer records the end
    // (a restore run by its own command records it under the lock, QUI-10); the bytes are all
    // written by now, and another restore of the same job is refused while this owner lives.
    drop(result);
    JobOutcome::Done { status, reason }
}

/// The restore's work: lock, open the image's table, pick the method, move the bytes.
fn run_job(
    run: &Run<'_>,
    io: IoFlags,
    owner: &str,
    held: Option<Arc<Engine>>,
) -> Result<(RestoreOut, TargetLock), Fail> {
    run.check_other_tables()?;
    let engine = match held {
        Some(e) => e,
        None => Arc::new(super::open(&run.image.table, RestartPolicy::Resume, io)?),
    };
    let method_guess = if run.image.mode == CopyMode::NoCopy {
        RestoreMethod::Stream
    } else {
        RestoreMethod::CopySession
    };
    if method_guess == RestoreMethod::CopySession {
        run.create_dest()?;
    }
    let lock = TargetLock::acquire(&run.dest).map_err(|e| Fail::Message(e.to_string()))?;
    let dest = engine.attach_path(&run.dest)?;
    run.settle_intents(&engine, Some(dest))?;
    // In place: the destination is the source of a live session (by identity, whatever path
    // names it).
    let in_place = engine
        .status()
        .iter()
        .any(|s| s.state.is_live() && engine.session(s.id).is_ok_and(|x| x.desc.source.id == dest));
    // Onto the source of the image's own session, still in the table: the engine's reverse
    // restore moves back what may differ, through its write path (so every other session keeps
    // its T0), and resumes after a crash from the table.
    let method =
        if catalog::reverse_applies(&engine, &run.image, dest, !run.args.extents.is_empty()) {
            RestoreMethod::Reverse
        } else {
            RestoreMethod::of(&run.image, in_place)
        };
    phase(
        run.store,
        &run.job,
        JobState::Active {
            phase: Phase::Restore,
        },
        owner,
    )?;
    let mut out = RestoreOut {
        job: run.job.id,
        image: run.image.id,
        dest: run.dest.display().to_string(),
        method,
        bytes: 0,
        resumed_from: 0,
        session: None,
        waits_for_empty: 0,
        waits_for_full: 0,
        ring_bytes: 0,
        ring_buffers: 0,
        status: 0,
    };
    match method {
        RestoreMethod::CopySession => run.copy_session(&engine, dest, &mut out)?,
        RestoreMethod::Stream => run.stream(&engine, dest, &mut out)?,
        RestoreMethod::Reverse => run.reverse(&engine, &mut out)?,
    }
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.close()?;
    }
    Ok((out, lock))
}
