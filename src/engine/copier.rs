//! The background copier: worker threads that fill targets of copy-mode sessions in large
//! sequential batches, with a rate limit, pause/resume and progress.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::engine::copy::CopyRun;
use crate::engine::{Engine, VolumeHandle};
use crate::ids::{GrainCount, GrainIndex, SessionId};
use crate::model::{CopyMode, SessionState};
use crate::session::GrainHold;
use crate::volume::AlignedBuf;
use crate::{Error, Result};

/// Consecutive 200 us yields to copy-before-write traffic before the copier goes on anyway.
pub const COPIER_YIELDS_MAX: u32 = 25;

/// Copier options.
#[derive(Debug, Clone)]
pub struct CopierOptions {
    /// Worker threads. Default = 2.
    pub threads: usize,
    /// Bytes per second across all workers; `None` = unlimited. Default = None.
    pub rate_bytes_per_s: Option<u64>,
    /// Largest batch in bytes: one request to the source and one to the target. Default =
    /// [`crate::limits::COPY_REQUEST_BYTES_DEFAULT`] (bounded by
    /// [`crate::limits::COPY_BATCH_BYTES_MAX`]).
    pub batch_bytes: u64,
    /// Batches each worker has in flight at once: it reads that many from the source in one
    /// batched call ([`crate::Volume::read_many`]) while its writer thread writes the previous
    /// ones to the target ([`crate::Volume::write_many`]). 1 to
    /// [`crate::limits::COPY_DEPTH_MAX`]; default = [`crate::limits::COPY_DEPTH_DEFAULT`].
    pub depth: usize,
    /// Only these sessions; empty = every active copy-mode session. Default = empty.
    pub sessions: Vec<SessionId>,
    /// Stop when nothing is left to copy. Default = true.
    pub exit_when_done: bool,
    /// Bytes copied between two target flushes and table commits (several batches share one
    /// durability point). Default = 16 MiB; with a rate limit, at most a tenth of a second's
    /// worth, so the limit stays smooth.
    pub commit_bytes: u64,
}

impl Default for CopierOptions {
    fn default() -> Self {
        CopierOptions {
            threads: 2,
            rate_bytes_per_s: None,
            batch_bytes: crate::limits::COPY_REQUEST_BYTES_DEFAULT,
            depth: crate::limits::COPY_DEPTH_DEFAULT,
            sessions: Vec::new(),
            exit_when_done: true,
            commit_bytes: 16 << 20,
        }
    }
}

/// Progress of the copier.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Progress {
    /// Grains copied across the sessions being copied.
    pub grains_copied: u64,
    /// Grains in total across those sessions.
    pub grains_total: u64,
    /// Bytes this copier moved.
    pub bytes_copied: u64,
    /// Bytes per second since start.
    pub bytes_per_s: f64,
    /// Estimated seconds to completion.
    pub eta_s: Option<f64>,
    /// True when no work is left.
    pub done: bool,
    /// Durability points this copier made (one target flush and one table commit each).
    pub commits: u64,
    /// Copied runs those commits recorded.
    pub runs: u64,
    /// Grains reverse restores of those sessions still have to move back to their sources.
    pub grains_to_restore: u64,
    /// Bytes of `bytes_copied` the kernel copied from file to file without them passing
    /// through this process's memory (see [`crate::EngineOptions::copy_offload`]).
    pub bytes_offloaded: u64,
}

/// The spans of grains handed out to workers, per session. A worker reserves a span, copies
/// it, commits it, and finishes it; spans handed out are disjoint, and the cursor of a session
/// goes back to its start only when no span of it is in flight (so that a worker never copies
/// grains of another worker's span, whose bits are still clear until that worker commits).
#[derive(Debug, Default)]
struct Spans {
    /// Next grain to hand out, per session.
    next: HashMap<SessionId, u64>,
    /// Spans handed out and not yet finished, per session.
    in_flight: HashMap<SessionId, usize>,
}

impl Spans {
    /// Hand out `[from, from + len)`; returns `from`.
    fn reserve(&mut self, id: SessionId, len: u64) -> u64 {
        let cur = self.next.entry(id).or_insert(0);
        let from = *cur;
        *cur = from.saturating_add(len);
        *self.in_flight.entry(id).or_insert(0) += 1;
        from
    }

    /// A span is done; the worker got as far as `reached`.
    fn finish(&mut self, id: SessionId, reached: u64) {
        let cur = self.next.entry(id).or_insert(0);
        *cur = (*cur).max(reached);
        if let Some(n) = self.in_flight.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
    }

    /// Nothing is left after the cursor: go back to the start, unless spans are in flight
    /// (their grains are not copied yet). Returns whether it went back.
    fn wrap(&mut self, id: SessionId) -> bool {
        if self.in_flight.get(&id).copied().unwrap_or(0) > 0 {
            return false;
        }
        self.next.insert(id, 0);
        true
    }
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    paused: AtomicBool,
    done: AtomicBool,
    bytes: AtomicU64,
    started: Instant,
    spans: Mutex<Spans>,
    commits: AtomicU64,
    runs: AtomicU64,
    /// Bytes copied by the kernel (part of `bytes`).
    offloaded: AtomicU64,
    error: Mutex<Option<Error>>,
    opts: CopierOptions,
    /// The rate limit in force (0 = none) and when and at how many bytes it took effect.
    rate: Mutex<(u64, Instant, u64)>,
    /// Where events go.
    events: EventSink,
    /// Sessions a `Completed` event was sent for (each is sent once).
    completed: Mutex<Vec<SessionId>>,
    /// Sessions a `Reversed` event was sent for (each is sent once).
    reversed: Mutex<Vec<SessionId>>,
    /// Workers that have not returned yet; `exited` is signalled each time one does.
    running: Mutex<usize>,
    exited: parking_lot::Condvar,
}

/// Counts a worker out of [`Shared::running`] when its thread returns (or unwinds).
struct Running<'a>(&'a Shared);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self.0.running.lock() -= 1;
        self.0.exited.notify_all();
    }
}

/// What a running copier reports to the callback given to [`Copier::start_with_events`].
///
/// The callback runs on a worker thread, between two batches: it should return quickly (send
/// the event down a channel to do more). Progress figures across all sessions stay available
/// from [`Copier::progress`] at any time.
#[derive(Debug)]
#[non_exhaustive]
pub enum CopierEvent<'a> {
    /// A durability point: `grains` more grains of `session` (`bytes` bytes) are on the target,
    /// the target is flushed and the table commit recording them is durable.
    Committed {
        /// The session.
        session: SessionId,
        /// Grains this commit recorded.
        grains: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// `session` is complete: every grain of its live extents is copied and the session's
    /// state is durably `Completed`; its target holds the T0 image by itself. Sent once per
    /// session.
    Completed {
        /// The session.
        session: SessionId,
    },
    /// `grains` more grains of `session`'s reverse restore (`bytes` bytes) are back on its
    /// source, durably.
    Restored {
        /// The session.
        session: SessionId,
        /// Grains moved back.
        grains: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// The reverse restore of `session` is done: its source holds the image by itself.
    Reversed {
        /// The session.
        session: SessionId,
    },
    /// The copier stops on this error; [`Copier::join`] and [`Copier::stop`] return it.
    Failed {
        /// The error.
        error: &'a Error,
    },
}

/// The event callback, if any.
type EventFn = Box<dyn Fn(&CopierEvent<'_>) + Send + Sync>;

/// Holds the callback; `Debug` without showing it.
struct EventSink(Option<EventFn>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "EventSink(callback)"
        } else {
            "EventSink(none)"
        })
    }
}

impl Shared {
    /// The rate limit in force, with the time and byte count it is measured from.
    fn rate(&self) -> Option<(u64, Instant, u64)> {
        let r = *self.rate.lock();
        (r.0 > 0).then_some(r)
    }

    fn emit(&self, ev: &CopierEvent<'_>) {
        if let Some(f) = &self.events.0 {
            f(ev);
        }
    }

    /// Record the first error, report it, and stop every worker.
    fn fail(&self, e: Error) {
        self.emit(&CopierEvent::Failed { error: &e });
        self.error.lock().get_or_insert(e);
        self.stop.store(true, Ordering::Release);
    }

    /// A session's reverse restore was found done: report it the first time.
    fn reversed(&self, id: SessionId) {
        if first_time(&self.reversed, id) {
            self.emit(&CopierEvent::Reversed { session: id });
        }
    }

    /// A session was found complete: report it the first time.
    fn completed(&self, id: SessionId) {
        if first_time(&self.completed, id) {
            self.emit(&CopierEvent::Completed { session: id });
        }
    }
}

/// Whether `id` is new to `seen` (it is recorded there now): each event is sent once.
fn first_time(seen: &Mutex<Vec<SessionId>>, id: SessionId) -> bool {
    let mut c = seen.lock();
    let first = !c.contains(&id);
    if first {
        c.push(id);
    }
    first
}

/// A handle on a running [`Copier`] that can pause, resume and re-rate it from another thread.
#[derive(Debug, Clone)]
pub struct CopierControl(Arc<Shared>);

impl CopierControl {
    /// Pause after the current batches.
    pub fn pause(&self) {
        self.0.paused.store(true, Ordering::Release);
    }

    /// Resume.
    pub fn resume(&self) {
        self.0.paused.store(false, Ordering::Release);
    }

    /// True while paused.
    #[must_use]
    pub fn paused(&self) -> bool {
        self.0.paused.load(Ordering::Acquire)
    }

    /// Change the rate limit (`None` = unlimited); it is measured afresh from now.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a rate of 0.
    pub fn set_rate(&self, bytes_per_s: Option<u64>) -> Result<()> {
        if bytes_per_s == Some(0) {
            return Err(Error::invalid("copy rate", "0 bytes/s"));
        }
        let bytes = self.0.bytes.load(Ordering::Relaxed);
        *self.0.rate.lock() = (bytes_per_s.unwrap_or(0), Instant::now(), bytes);
        Ok(())
    }

    /// The rate limit in force (`None` = unlimited).
    #[must_use]
    pub fn rate(&self) -> Option<u64> {
        self.0.rate().map(|r| r.0)
    }

    /// The sessions the copier was started for (empty = every active copy-mode session).
    #[must_use]
    pub fn sessions(&self) -> &[SessionId] {
        &self.0.opts.sessions
    }
}

/// A running copier. Dropping it stops the workers.
///
/// # Example
///
/// Copy one session's source to its target in the background; the copier completes the
/// session when every grain is copied, and the target then holds the T0 image by itself.
///
/// ```
/// use std::sync::Arc;
/// use timezero::MemStorage;
/// use timezero::prelude::*;
/// use timezero::SessionState;
///
/// # fn main() -> timezero::Result<()> {
/// let layout = TableOptions::default().layout()?;
/// let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
/// let engine = Arc::new(Engine::create(table, EngineOptions::default())?);
/// let source = engine.attach(Arc::new(MemVolume::with_data("src", &[3u8; 4 << 20])));
/// let tgt = Arc::new(MemVolume::new("tgt", 4 << 20));
/// let target = engine.attach(tgt.clone());
/// let session = engine.establish(&SessionSpec::whole(source, target))?;
///
/// let opts = CopierOptions { sessions: vec![session], ..CopierOptions::default() };
/// let progress = Copier::start(engine.clone(), opts)?.join()?;
/// assert!(progress.done);
/// assert_eq!(progress.grains_copied, progress.grains_total);
/// assert_eq!(engine.session(session)?.state(), SessionState::Completed);
/// assert_eq!(engine.status()[0].state, SessionState::Completed);
/// assert_eq!(tgt.snapshot(), vec![3u8; 4 << 20]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Copier {
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Copier {
    /// Start workers.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero threads, batch size or depth (or more than their limits).
    pub fn start(engine: Arc<Engine>, opts: CopierOptions) -> Result<Copier> {
        Self::start_inner(engine, opts, EventSink(None))
    }

    /// Start workers that report every durability point, every completed session and a
    /// failure to `on_event` (see [`CopierEvent`]).
    ///
    /// # Example
    ///
    /// Count the commits and see the session complete, through a channel:
    ///
    /// ```
    /// use std::sync::{mpsc, Arc};
    /// use timezero::MemStorage;
    /// use timezero::CopierEvent;
    /// use timezero::prelude::*;
    ///
    /// # fn main() -> timezero::Result<()> {
    /// let layout = TableOptions::default().layout()?;
    /// let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
    /// let engine = Arc::new(Engine::create(table, EngineOptions::default())?);
    /// let source = engine.attach(Arc::new(MemVolume::with_data("src", &[7u8; 4 << 20])));
    /// let target = engine.attach(Arc::new(MemVolume::new("tgt", 4 << 20)));
    /// let session = engine.establish(&SessionSpec::whole(source, target))?;
    ///
    /// let (tx, rx) = mpsc::channel();
    /// let tx = std::sync::Mutex::new(tx);
    /// let copier = Copier::start_with_events(engine.clone(), CopierOptions::default(), move |ev| {
    ///     let msg = match ev {
    ///         CopierEvent::Committed { bytes, .. } => Some(*bytes),
    ///         CopierEvent::Completed { .. } => Some(0),
    ///         _ => None,
    ///     };
    ///     if let (Some(m), Ok(tx)) = (msg, tx.lock()) {
    ///         let _ = tx.send(m);
    ///     }
    /// })?;
    /// copier.join()?;
    /// let got: Vec<u64> = rx.try_iter().collect();
    /// // Every byte was reported once, in commits, then the completion (a 0).
    /// assert_eq!(got.iter().sum::<u64>(), 4 << 20);
    /// assert_eq!(got.last(), Some(&0));
    /// # let _ = session;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`Copier::start`].
    pub fn start_with_events(
        engine: Arc<Engine>,
        opts: CopierOptions,
        on_event: impl Fn(&CopierEvent<'_>) + Send + Sync + 'static,
    ) -> Result<Copier> {
        Self::start_inner(engine, opts, EventSink(Some(Box::new(on_event))))
    }

    fn start_inner(engine: Arc<Engine>, opts: CopierOptions, events: EventSink) -> Result<Copier> {
        if opts.threads == 0 || opts.threads > 64 {
            return Err(Error::invalid(
                "copier threads",
                format!("{} (1 to 64)", opts.threads),
            ));
        }
        if opts.batch_bytes == 0 || opts.batch_bytes > crate::limits::COPY_BATCH_BYTES_MAX {
            return Err(Error::invalid(
                "copy batch",
                format!("{} bytes", opts.batch_bytes),
            ));
        }
        if opts.rate_bytes_per_s == Some(0) {
            return Err(Error::invalid("copy rate", "0 bytes/s"));
        }
        if opts.depth == 0 || opts.depth > crate::limits::COPY_DEPTH_MAX {
            return Err(Error::invalid(
                "copy depth",
                format!("{} (1 to {})", opts.depth, crate::limits::COPY_DEPTH_MAX),
            ));
        }
        let started = Instant::now();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            done: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
            started,
            spans: Mutex::new(Spans::default()),
            commits: AtomicU64::new(0),
            runs: AtomicU64::new(0),
            offloaded: AtomicU64::new(0),
            error: Mutex::new(None),
            rate: Mutex::new((opts.rate_bytes_per_s.unwrap_or(0), started, 0)),
            events,
            completed: Mutex::new(Vec::new()),
            reversed: Mutex::new(Vec::new()),
            running: Mutex::new(opts.threads),
            exited: parking_lot::Condvar::new(),
            opts,
        });
        let workers = (0..shared.opts.threads)
            .map(|i| {
                let e = engine.clone();
                let sh = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tz-copier-{i}"))
                    .spawn(move || {
                        let _running = Running(&sh);
                        worker(&e, &sh);
                    })
                    .map_err(|e| Error::io("spawn", "copier", 0, e))
            })
            .collect::<Result<Vec<_>>>()
            // The copier is not returned: the workers already spawned stop.
            .inspect_err(|_| shared.stop.store(true, Ordering::Release))?;
        Ok(Copier {
            engine,
            shared,
            workers,
        })
    }

    /// Pause after the current batches.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::Release);
    }

    /// Resume.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Release);
    }

    /// A handle to pause, resume or re-rate this copier from elsewhere.
    #[must_use]
    pub fn control(&self) -> CopierControl {
        CopierControl(self.shared.clone())
    }

    /// Current progress.
    #[must_use]
    pub fn progress(&self) -> Progress {
        let (mut copied, mut total, mut to_restore) = (0, 0, 0);
        for s in self.engine.table().sessions() {
            if !self.shared.opts.sessions.is_empty() && !self.shared.opts.sessions.contains(&s.id())
            {
                continue;
            }
            to_restore += s.restore_pending().get();
            let st = s.status();
            if st.mode == CopyMode::Copy
                && matches!(st.state, SessionState::Active | SessionState::Completed)
            {
                copied += if st.state == SessionState::Completed {
                    s.desc.grains()
                } else {
                    s.copied().get()
                };
                total += s.desc.grains();
            }
        }
        let bytes = self.shared.bytes.load(Ordering::Relaxed);
        let secs = self.shared.started.elapsed().as_secs_f64().max(1e-9);
        let rate = bytes as f64 / secs;
        let remaining_grains = total.saturating_sub(copied);
        let gb = self
            .engine
            .table()
            .sessions()
            .first()
            .map_or(65536, |s| s.desc.grain.bytes());
        Progress {
            grains_copied: copied,
            grains_total: total,
            bytes_copied: bytes,
            bytes_per_s: rate,
            eta_s: (rate > 0.0).then(|| (remaining_grains * gb) as f64 / rate),
            done: self.shared.done.load(Ordering::Acquire),
            commits: self.shared.commits.load(Ordering::Relaxed),
            runs: self.shared.runs.load(Ordering::Relaxed),
            grains_to_restore: to_restore,
            bytes_offloaded: self.shared.offloaded.load(Ordering::Relaxed),
        }
    }

    /// True when every worker has exited.
    #[must_use]
    pub fn finished(&self) -> bool {
        self.workers.iter().all(JoinHandle::is_finished)
    }

    /// Wait until every worker has returned or `timeout` has passed, whichever comes first;
    /// true when every worker has returned ([`Copier::join`] then returns at once). A caller
    /// that reports progress while it waits calls this in a loop instead of sleeping, so it
    /// sees the end of the copy when it happens.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut running = self.shared.running.lock();
        while *running > 0 {
            if self
                .shared
                .exited
                .wait_until(&mut running, deadline)
                .timed_out()
            {
                return *running == 0;
            }
        }
        true
    }

    /// Wait for the workers to finish (they do when nothing is left and `exit_when_done`).
    ///
    /// # Errors
    /// The first error a worker hit.
    pub fn join(mut self) -> Result<Progress> {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(e) = self.shared.error.lock().take() {
            return Err(e);
        }
        Ok(self.progress())
    }

    /// Stop the workers and wait for them.
    ///
    /// # Errors
    /// The first error a worker hit.
    pub fn stop(self) -> Result<Progress> {
        self.shared.stop.store(true, Ordering::Release);
        self.join()
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn candidates(engine: &Engine, sh: &Shared) -> Vec<SessionId> {
    engine
        .table()
        .sessions()
        .into_iter()
        .filter(|s| s.reversing() || (s.is_active() && s.status().mode == CopyMode::Copy))
        .map(|s| s.id())
        .filter(|id| sh.opts.sessions.is_empty() || sh.opts.sessions.contains(id))
        .collect()
}

fn worker(engine: &Engine, sh: &Shared) {
    let mut pipe = Pipeline::default();
    let mut turn = 0usize;
    let mut yields = 0u32;
    while !sh.stop.load(Ordering::Acquire) {
        if sh.paused.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        // Yield to copy-before-write traffic: a first write waits for its own copy and commit,
        // so it should not also queue behind a large copy batch on the same devices. Bounded,
        // so a constant stream of first writes cannot starve the copier.
        if engine.cow_in_flight() > 0 && yields < COPIER_YIELDS_MAX {
            yields += 1;
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        yields = 0;
        let ids = candidates(engine, sh);
        if ids.is_empty() {
            if sh.opts.exit_when_done {
                sh.done.store(true, Ordering::Release);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        turn = turn.wrapping_add(1);
        let id = ids[turn % ids.len()];
        let Ok(s) = engine.session(id) else { continue };
        let grain = s.desc.grain.bytes();
        let batch = (sh.opts.batch_bytes / grain).max(1);
        let rate = sh.rate();
        if let Some((rate, since, base)) = rate {
            // Sleep until the bytes already moved fit the rate.
            let due = sh.bytes.load(Ordering::Relaxed).saturating_sub(base) as f64 / rate as f64;
            let el = since.elapsed().as_secs_f64();
            if due > el {
                std::thread::sleep(Duration::from_secs_f64((due - el).min(0.05)));
                continue;
            }
        }
        if s.reversing() {
            // A reverse restore first: until it ends, the source is not the image by itself.
            match restore_span(engine, sh, id, grain, batch, rate.map(|r| r.0)) {
                Ok(true) => {}
                Ok(false) => {
                    if !sh.spans.lock().wrap(id) {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    if !s.reversing() {
                        sh.reversed(id);
                    }
                }
                Err(e) => sh.fail(e),
            }
            continue;
        }
        match copy_span(engine, sh, &mut pipe, id, grain, batch, rate.map(|r| r.0)) {
            Ok(true) => {}
            Ok(false) => {
                // Nothing left after the span's start: once no other span is in flight, wrap,
                // and complete when every bit is set.
                if !sh.spans.lock().wrap(id) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                match engine.complete_if_done(id) {
                    Ok(true) => sh.completed(id),
                    Ok(false) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => sh.fail(e),
                }
            }
            Err(e) => sh.fail(e),
        }
    }
}

/// Grains a worker reserves at once: a durability point's worth of bytes (with a rate limit,
/// at most a tenth of a second's), at least one batch.
fn span_grains(sh: &Shared, grain: u64, batch: u64, rate: Option<u64>) -> u64 {
    let commit_bytes = match rate {
        Some(r) => sh.opts.commit_bytes.min(r / 10).max(batch * grain),
        None => sh.opts.commit_bytes.max(batch * grain),
    };
    (commit_bytes / grain).max(batch)
}

/// Move back one span of a session's reverse restore (each batch is made durable and
/// recorded by [`Engine::restore_batch`]). Returns false when nothing was left to restore
/// after the span's start.
fn restore_span(
    engine: &Engine,
    sh: &Shared,
    id: SessionId,
    grain: u64,
    batch: u64,
    rate: Option<u64>,
) -> Result<bool> {
    let span = span_grains(sh, grain, batch, rate);
    let from = sh.spans.lock().reserve(id, span);
    let end = from.saturating_add(span);
    let mut next_from = from;
    let mut result = Ok(true);
    while next_from < end && !sh.stop.load(Ordering::Acquire) {
        let max = GrainCount(batch.min(end - next_from));
        match engine.restore_batch(id, GrainIndex(next_from), max) {
            Ok(Some((next, n))) => {
                if n.get() > 0 {
                    sh.bytes.fetch_add(n.get() * grain, Ordering::Relaxed);
                    sh.commits.fetch_add(1, Ordering::Relaxed);
                    sh.emit(&CopierEvent::Restored {
                        session: id,
                        grains: n.get(),
                        bytes: n.get() * grain,
                    });
                }
                next_from = next.get();
            }
            Ok(None) => {
                result = Ok(false);
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    sh.spans.lock().finish(id, next_from);
    result
}

/// What a worker hands its writer thread: runs read from the source, to write to the target.
struct WriteJob {
    tgt: Arc<VolumeHandle>,
    /// One buffer per run, holding its bytes.
    bufs: Vec<AlignedBuf>,
    /// Where each run goes on the target.
    offsets: Vec<u64>,
}

/// What the writer thread hands back: the buffers, and whether every write succeeded.
struct WriteDone {
    bufs: Vec<AlignedBuf>,
    result: Result<()>,
}

/// A copy worker's writer thread: it writes one group of runs to the target (all of them in
/// flight at once, [`crate::Volume::write_many`]) while the worker reads the next group.
struct Writer {
    jobs: Option<mpsc::SyncSender<WriteJob>>,
    done: mpsc::Receiver<WriteDone>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start() -> Result<Writer> {
        let (jobs, rx) = mpsc::sync_channel::<WriteJob>(1);
        let (tx, done) = mpsc::sync_channel::<WriteDone>(1);
        let name = std::thread::current()
            .name()
            .map_or_else(|| "tz-copier-w".to_string(), |n| format!("{n}-w"));
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                for job in rx {
                    let reqs: Vec<(u64, &[u8])> = job
                        .offsets
                        .iter()
                        .zip(&job.bufs)
                        .map(|(o, b)| (*o, b.get()))
                        .collect();
                    let result = job.tgt.write_many_retry(&reqs);
                    drop(reqs);
                    let done = WriteDone {
                        bufs: job.bufs,
                        result,
                    };
                    if tx.send(done).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("spawn", "copier writer", 0, e))?;
        Ok(Writer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has finished its job, if any.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A worker's double buffering: its writer thread, the group of runs that thread is writing
/// (their holds), and the buffer sets not in use (two in all: one being read into, one being
/// written from).
#[derive(Default)]
struct Pipeline {
    writer: Option<Writer>,
    /// Holds of the runs the writer has, and their grains.
    writing: Vec<GrainHold>,
    spare: Vec<Vec<AlignedBuf>>,
}

impl Pipeline {
    /// A buffer set of one buffer of `lens[i]` bytes per run.
    fn buffers(&mut self, lens: impl Iterator<Item = usize>) -> Vec<AlignedBuf> {
        let mut set = self.spare.pop().unwrap_or_default();
        let lens: Vec<usize> = lens.collect();
        set.truncate(lens.len());
        while set.len() < lens.len() {
            set.push(AlignedBuf::new(0));
        }
        for (b, len) in set.iter_mut().zip(lens) {
            b.resize(len);
        }
        set
    }

    /// Keep a buffer set for the next groups (two at most, empty ones not at all).
    fn keep(&mut self, bufs: Vec<AlignedBuf>) {
        if !bufs.is_empty() && self.spare.len() < 2 {
            self.spare.push(bufs);
        }
    }

    /// Give `runs` (read into `bufs`) to the writer thread, starting it on first use.
    fn send(&mut self, runs: Vec<CopyRun>, bufs: Vec<AlignedBuf>) -> Result<()> {
        let Some(first) = runs.first() else {
            self.keep(bufs);
            return Ok(());
        };
        let job = WriteJob {
            tgt: first.tgt.clone(),
            bufs,
            offsets: runs.iter().map(|r| r.target_offset).collect(),
        };
        if self.writer.is_none() {
            self.writer = Some(Writer::start()?);
        }
        let jobs = self.writer.as_ref().and_then(|w| w.jobs.as_ref());
        match jobs.map(|j| j.send(job)) {
            Some(Ok(())) => {
                self.writing = runs.into_iter().map(|r| r.hold).collect();
                Ok(())
            }
            _ => {
                self.writer = None;
                Err(writer_gone())
            }
        }
    }

    /// Wait until the writer has written the group it has, if any, and move that group's holds
    /// to `written` when every write succeeded (a failed group's holds are released: its
    /// grains are copied again later). Returns the grains moved.
    fn settle(&mut self, written: &mut Vec<GrainHold>) -> Result<u64> {
        if self.writing.is_empty() {
            return Ok(0);
        }
        let holds = std::mem::take(&mut self.writing);
        let done = self.writer.as_ref().map(|w| w.done.recv());
        let Some(Ok(done)) = done else {
            self.writer = None;
            return Err(writer_gone());
        };
        self.keep(done.bufs);
        done.result?;
        let grains = holds.iter().map(|h| h.count().get()).sum();
        written.extend(holds);
        Ok(grains)
    }
}

fn writer_gone() -> Error {
    Error::io(
        "write",
        "copier writer thread",
        0,
        std::io::Error::other("the writer thread ended"),
    )
}

/// Choose the next group of runs of a span: up to `depth` runs of at most `batch` grains each
/// from `*next_from` (advanced past them), all with the volumes of the first (a run chosen
/// with other volume handles, after a volume was attached again, is left in `carry` for the
/// next group). Returns whether the session has nothing left to copy after `*next_from`.
#[allow(clippy::too_many_arguments)]
fn plan_group(
    engine: &Engine,
    id: SessionId,
    depth: usize,
    batch: u64,
    end: u64,
    next_from: &mut u64,
    carry: &mut Option<CopyRun>,
    runs: &mut Vec<CopyRun>,
) -> Result<bool> {
    runs.extend(carry.take());
    while runs.len() < depth && *next_from < end {
        let max = GrainCount(batch.min(end - *next_from));
        match engine.plan_copy(id, GrainIndex(*next_from), max)? {
            Some((next, run)) => {
                *next_from = next.get();
                let Some(run) = run else { continue };
                match runs.first() {
                    Some(f) if !Arc::ptr_eq(&f.src, &run.src) || !Arc::ptr_eq(&f.tgt, &run.tgt) => {
                        *carry = Some(run);
                        return Ok(false);
                    }
                    _ => runs.push(run),
                }
            }
            None => return Ok(true),
        }
    }
    Ok(false)
}

/// Copy one span of a session and commit it (one target flush and one table commit for
/// several batches). Returns false when nothing was left to copy after the span's start.
///
/// The span goes in groups of up to `depth` runs (batches): the worker reads a group from the
/// source with all its reads in flight at once, then hands it to its writer thread, which
/// writes it to the target with all its writes in flight while the worker reads the next
/// group. Every write of the span has completed before the span is committed (target flush,
/// then the table commit of the bits: the order [`Engine::commit_copied`] keeps).
fn copy_span(
    engine: &Engine,
    sh: &Shared,
    pipe: &mut Pipeline,
    id: SessionId,
    grain: u64,
    batch: u64,
    rate: Option<u64>,
) -> Result<bool> {
    // Reserve a span for this worker, so that workers copy disjoint ranges.
    let span = span_grains(sh, grain, batch, rate);
    let from = sh.spans.lock().reserve(id, span);
    let end = from.saturating_add(span);
    let mut written = Vec::new();
    let mut next_from = from;
    let mut carry = None;
    let mut result = Ok(true);
    let mut grains = 0;
    // While the kernel copies (file to file), a run needs no buffer: one run at a time, as
    // long as the span's uncopied stretch allows (one system call for it).
    let mut offloading = engine.options.copy_offload;
    loop {
        let mut runs = Vec::new();
        let mut last = sh.stop.load(Ordering::Acquire);
        if !last {
            let (depth, run_grains) = if offloading {
                (1, span)
            } else {
                (sh.opts.depth, batch)
            };
            let planned = plan_group(
                engine,
                id,
                depth,
                run_grains,
                end,
                &mut next_from,
                &mut carry,
                &mut runs,
            );
            match planned {
                // Nothing left to copy after the span's start: write what was chosen, then
                // report it.
                Ok(true) => {
                    result = Ok(false);
                    last = true;
                }
                Ok(false) => last = next_from >= end && carry.is_none(),
                // Write what was chosen before the error, then report it.
                Err(e) => {
                    result = Err(e);
                    last = true;
                }
            }
        }
        if offloading {
            // At most one run (depth 1, and nothing is carried before the first group).
            if let Some(run) = runs.pop() {
                if engine.offload(&run) {
                    // On the target already: it waits for the span's commit.
                    let n = run.hold.count().get();
                    grains += n;
                    sh.bytes.fetch_add(n * grain, Ordering::Relaxed);
                    sh.offloaded.fetch_add(n * grain, Ordering::Relaxed);
                    written.push(run.hold);
                } else {
                    // The kernel cannot (or failed): the rest of the span goes through memory
                    // in batches, from this run's first grain (its hold is released here).
                    offloading = false;
                    next_from = run.hold.range().0.get();
                    drop(run);
                    last = sh.stop.load(Ordering::Acquire);
                }
            }
        }
        let mut read = Ok(());
        let mut bufs = Vec::new();
        if !runs.is_empty() {
            bufs = pipe.buffers(runs.iter().map(|r| r.len));
            let mut reqs: Vec<(u64, &mut [u8])> = runs
                .iter()
                .zip(bufs.iter_mut())
                .map(|(r, b)| (r.source_offset, b.get_mut()))
                .collect();
            read = runs[0].src.read_many_retry(&mut reqs);
        }
        // The previous group's writes end before this group's begin (two buffer sets).
        match pipe.settle(&mut written) {
            Ok(n) => {
                grains += n;
                sh.bytes.fetch_add(n * grain, Ordering::Relaxed);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        if let Err(e) = read {
            // The group's holds are released with `runs`: its grains are copied later.
            result = Err(e);
            break;
        }
        if let Err(e) = pipe.send(runs, bufs) {
            result = Err(e);
            break;
        }
        if last {
            break;
        }
    }
    // The last group's writes; every write of the span has completed before its commit.
    match pipe.settle(&mut written) {
        Ok(n) => {
            grains += n;
            sh.bytes.fetch_add(n * grain, Ordering::Relaxed);
        }
        Err(e) => {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    let committed = written.len() as u64;
    let commit = engine.commit_copied(id, written);
    sh.spans.lock().finish(id, next_from);
    commit?;
    if committed > 0 {
        sh.commits.fetch_add(1, Ordering::Relaxed);
        sh.runs.fetch_add(committed, Ordering::Relaxed);
        sh.emit(&CopierEvent::Committed {
            session: id,
            grains,
            bytes: grains * grain,
        });
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;
    use crate::activity::{MemStorage, TableOptions};
    use crate::engine::EngineOptions;
    use crate::engine::SessionSpec;
    use crate::volume::{MemVolume, Volume, VolumeInfo};

    /// What a recording volume saw, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Read(usize),
        Write(usize),
        ReadMany(usize),
        WriteMany(usize),
        Flush,
    }

    /// A memory volume that records every call (batched calls with their request count).
    #[derive(Debug)]
    struct Recording {
        mem: MemVolume,
        calls: Mutex<Vec<Call>>,
    }

    impl Volume for Recording {
        fn info(&self) -> VolumeInfo {
            self.mem.info()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.calls.lock().push(Call::Read(buf.len()));
            self.mem.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
            self.calls.lock().push(Call::Write(buf.len()));
            self.mem.write_at(offset, buf)
        }
        fn flush(&self) -> Result<()> {
            self.calls.lock().push(Call::Flush);
            self.mem.flush()
        }
        fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
            self.calls.lock().push(Call::ReadMany(reqs.len()));
            for (o, b) in reqs.iter_mut() {
                self.mem.read_at(*o, b)?;
            }
            Ok(())
        }
        fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
            self.calls.lock().push(Call::WriteMany(reqs.len()));
            for (o, b) in reqs {
                self.mem.write_at(*o, b)?;
            }
            Ok(())
        }
    }

    /// A copier worker reads `depth` batches of the source in one batched call and writes them
    /// to the target in one batched call; every batch is written before the target flush that
    /// precedes the table commit of its span, and the target ends up equal to the source.
    #[test]
    fn copier_keeps_depth_batches_in_flight_and_flushes_after_the_span_writes() {
        const MIB: usize = 1 << 20;
        let data: Vec<u8> = (0..8 * MIB).map(|i| (i % 253) as u8).collect();
        let layout = TableOptions::default().layout().unwrap();
        let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
        let engine = Arc::new(Engine::create(table, EngineOptions::default()).unwrap());
        let src = Arc::new(Recording {
            mem: MemVolume::with_data("src", &data),
            calls: Mutex::new(Vec::new()),
        });
        let tgt = Arc::new(Recording {
            mem: MemVolume::new("tgt", 8 * MIB),
            calls: Mutex::new(Vec::new()),
        });
        let s = engine.attach(src.clone());
        let t = engine.attach(tgt.clone());
        let id = engine.establish(&SessionSpec::whole(s, t)).unwrap();
        src.calls.lock().clear();
        tgt.calls.lock().clear();
        // 1 worker, 256 KiB batches, 3 in flight, 2 MiB spans: each span is 8 batches, read
        // and written in groups of 3, 3 and 2.
        let opts = CopierOptions {
            threads: 1,
            batch_bytes: 256 * 1024,
            depth: 3,
            commit_bytes: 2 * MIB as u64,
            sessions: vec![id],
            ..CopierOptions::default()
        };
        let p = Copier::start(engine.clone(), opts).unwrap().join().unwrap();
        assert!(p.done);
        assert_eq!(p.commits, 4);
        assert_eq!(tgt.mem.snapshot(), data);
        let reads = src.calls.lock().clone();
        assert_eq!(
            reads,
            [3, 3, 2]
                .repeat(4)
                .into_iter()
                .map(Call::ReadMany)
                .collect::<Vec<_>>()
        );
        let writes = tgt.calls.lock().clone();
        let mut want = Vec::new();
        for _ in 0..4 {
            want.extend([3, 3, 2].map(Call::WriteMany));
            want.push(Call::Flush);
        }
        assert_eq!(writes, want);
    }

    /// Depths of 0 and above the limit are refused.
    #[test]
    fn copier_refuses_a_depth_out_of_range() {
        let layout = TableOptions::default().layout().unwrap();
        let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
        let engine = Arc::new(Engine::create(table, EngineOptions::default()).unwrap());
        for depth in [0, crate::limits::COPY_DEPTH_MAX + 1] {
            let opts = CopierOptions {
                depth,
                ..CopierOptions::default()
            };
            assert!(matches!(
                Copier::start(engine.clone(), opts),
                Err(Error::Invalid { .. })
            ));
        }
    }

    /// Spans handed out to concurrent workers never overlap, and the cursor does not go back to
    /// the start while a span is in flight.
    #[test]
    fn spans_are_disjoint_and_wrap_waits_for_spans_in_flight() {
        let spans = Arc::new(Mutex::new(Spans::default()));
        let id = SessionId(1);
        let handed: Vec<u64> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let spans = spans.clone();
                    sc.spawn(move || {
                        (0..50)
                            .map(|_| spans.lock().reserve(id, 16))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut starts = handed.clone();
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts.len(), 200, "a span was handed out twice");
        for w in starts.windows(2) {
            assert!(w[1] >= w[0] + 16, "spans {} and {} overlap", w[0], w[1]);
        }
        let mut sp = spans.lock();
        // 200 spans in flight: no wrap until every one is finished.
        for (i, from) in handed.iter().enumerate() {
            assert!(!sp.wrap(id), "wrapped with {} spans in flight", 200 - i);
            sp.finish(id, from + 16);
        }
        assert!(sp.wrap(id));
        assert_eq!(sp.reserve(id, 16), 0);
    }

    /// `wait_finished` returns false while a worker runs (a copier told not to exit when done
    /// never exits by itself) and true once every worker has returned, without waiting out
    /// its timeout.
    #[test]
    fn wait_finished_reports_running_and_returned_workers() {
        let layout = TableOptions::default().layout().unwrap();
        let table = Arc::new(MemStorage::new("table", layout.file_bytes()));
        let engine = Arc::new(Engine::create(table, EngineOptions::default()).unwrap());
        // A 1 MiB source of `byte` and a copier of its session to a fresh target.
        let copier = |name: &str, byte: u8, exit_when_done: bool| {
            let s = engine.attach(Arc::new(MemVolume::with_data(
                &format!("{name}.src"),
                &[byte; 1 << 20],
            )));
            let tgt = Arc::new(MemVolume::new(&format!("{name}.tgt"), 1 << 20));
            let t = engine.attach(tgt.clone());
            let id = engine.establish(&SessionSpec::whole(s, t)).unwrap();
            let opts = CopierOptions {
                sessions: vec![id],
                exit_when_done,
                ..CopierOptions::default()
            };
            (Copier::start(engine.clone(), opts).unwrap(), tgt)
        };
        let (c, _) = copier("a", 5, false);
        assert!(!c.wait_finished(Duration::from_millis(20)));
        c.stop().unwrap();

        let (c, tgt) = copier("b", 6, true);
        // An hour: the call returns when the workers do, long before.
        assert!(c.wait_finished(Duration::from_secs(3600)));
        assert!(c.join().unwrap().done);
        assert_eq!(tgt.snapshot(), vec![6u8; 1 << 20]);
    }
}
