//! Regular files and block devices through `io_uring`.
//!
//! # Design
//!
//! The [`Volume`] API is synchronous: a caller hands in a borrowed buffer and blocks until the
//! transfer is complete. Queue depth therefore comes from many threads calling at once, and the
//! backend's job is to keep their requests in flight together instead of serialising them.
//!
//! A [`UringVolume`] owns a small pool of rings (one per CPU, at most [`MAX_RINGS`]); each
//! thread is pinned to one ring of the pool by a thread-local slot number. Within a ring:
//!
//! * **Submission** is serialised by a mutex that is held only to push one SQE and hand it to
//!   the kernel with `io_uring_enter(to_submit)`. The mutex is released before waiting, so any
//!   number of requests (up to the ring's completion-queue size) are in flight at once.
//! * **Completion** is dispatched by `user_data`: every request carries a unique token. One
//!   waiting caller at a time (the *reaper*) blocks in `io_uring_enter(GETEVENTS, min_complete =
//!   1)` without holding any lock, then drains the whole completion queue into a token → result
//!   map and wakes the other waiters, which pick their own result out of the map. When the reaper
//!   finds its own result it returns and another waiter takes over. No extra thread is needed and
//!   a lost wake-up is impossible: a new reaper's `min_complete = 1` returns at once if
//!   completions arrived between the previous reaper's drain and its hand-over.
//!
//! Why a pool of rings and not just one: the kernel executes many requests inline in the
//! submitting `io_uring_enter` (page-cache hits, most buffered writes) under a per-ring lock, so
//! a single ring would serialise that work across all threads. A pool keeps those copies
//! parallel, while the per-ring dispatch keeps the queue depth of slow (device) requests.
//!
//! # Buffer lifetime
//!
//! Every request borrows the caller's slice (or a bounce buffer) for the duration of one blocking
//! call, and that call returns only after the request's completion has been reaped, on success
//! and on every error path. The single exception is a failed `io_uring_enter` submission: the
//! kernel then did not consume the SQE, and the ring is marked unusable so that nothing ever
//! submits it later (the reaper always enters with `to_submit = 0`).
//!
//! The number of requests in the kernel per ring is bounded by the completion-queue size, so the
//! completion queue can never overflow.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{opcode, types, EnterFlags, IoUring, Probe};
use parking_lot::{Condvar, Mutex, MutexGuard};

use super::{check_range, FileVolumeOptions, Volume, VolumeInfo};
use crate::ids::{Generation, VolumeId};
use crate::{Error, Result};

/// Alignment used for `O_DIRECT` transfers (same as the file backend).
use super::aligned::{align_down, align_up, AlignedBuf, DIRECT_ALIGN_BYTES};

/// Submission-queue entries per ring (the completion queue gets twice as many).
const RING_ENTRIES: u32 = 64;

/// Upper bound on the number of rings per volume.
const MAX_RINGS: usize = 4;

/// Largest transfer handed to one SQE. A multiple of [`DIRECT_ALIGN_BYTES`] so that the pieces
/// of an aligned `O_DIRECT` transfer stay aligned, and below `u32::MAX` (the SQE length field).
const MAX_CHUNK: usize = 1 << 30;

/// The `op` of errors raised while creating the rings of a volume.
const SETUP_OP: &str = "io_uring_setup";

/// Pause before retrying a transiently refused `io_uring_enter` (`EAGAIN`, `EBUSY`).
const RETRY_PAUSE: Duration = Duration::from_millis(1);

/// Whether this process may use io_uring for file I/O.
///
/// Creates a small ring, checks that the kernel supports the read, write, fsync and no-op
/// opcodes, and runs a no-op through it. The answer is computed once per process and cached.
/// `false` when the kernel is too old, io_uring is disabled (`kernel.io_uring_disabled`), or a
/// seccomp filter refuses the system calls (`ENOSYS`, `EPERM`); callers then use
/// [`super::FileVolume`] instead (see [`super::open_best`]).
#[must_use]
pub fn uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| probe().is_ok())
}

/// Whether `e` is the kernel refusing to create a volume's rings (as opposed to a problem with
/// the file itself); [`super::open_best`] falls back to the file backend on these.
pub(super) fn is_setup_error(e: &Error) -> bool {
    matches!(e, Error::Io { op, .. } if *op == SETUP_OP)
}

fn probe() -> io::Result<()> {
    let mut ring = IoUring::new(2)?;
    let mut ops = Probe::new();
    ring.submitter().register_probe(&mut ops)?;
    for code in [
        opcode::Nop::CODE,
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
    ] {
        if !ops.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring opcode unsupported",
            ));
        }
    }
    let nop = opcode::Nop::new().build().user_data(1);
    // SAFETY: a NOP entry references no memory and no file descriptor, so nothing has to stay
    // valid while the kernel holds it.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            r => break r,
        }
    }?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("io_uring no-op did not complete"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

/// A file or block device accessed through a pool of io_uring instances.
///
/// Identity, size and locator are derived exactly as for [`super::FileVolume`]; see the module
/// documentation for how concurrent callers share the rings.
pub struct UringVolume {
    // Declared before `file`: the rings are torn down before the descriptor they refer to is
    // closed (no request is ever in flight at drop time anyway, see `Ring::run`).
    rings: Vec<Ring>,
    file: File,
    path: PathBuf,
    id: VolumeId,
    size: u64,
    direct: bool,
}

impl std::fmt::Debug for UringVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringVolume")
            .field("path", &self.path)
            .field("id", &self.id)
            .field("size", &self.size)
            .field("direct", &self.direct)
            .field("rings", &self.rings.len())
            .finish_non_exhaustive()
    }
}

impl UringVolume {
    /// Open an existing file or block device.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened or inspected, or (with op
    /// `"io_uring_setup"`) when the kernel refuses to create the rings.
    pub fn open(path: impl AsRef<Path>, options: &FileVolumeOptions) -> Result<Self> {
        let count = std::thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .min(MAX_RINGS);
        Self::open_with(path.as_ref(), options, count, RING_ENTRIES)
    }

    /// [`UringVolume::open`] with `rings` rings of `entries` submission entries each.
    fn open_with(
        path: &Path,
        options: &FileVolumeOptions,
        rings: usize,
        entries: u32,
    ) -> Result<Self> {
        let shown = path.display().to_string();
        let super::OpenedFile {
            file,
            meta,
            size,
            canonical: abs,
        } = super::open_file(path, options)?;
        let rings = (0..rings.max(1))
            .map(|_| Ring::new(entries))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| Error::io(SETUP_OP, &shown, 0, e))?;
        Ok(UringVolume {
            rings,
            file,
            path: abs,
            id: VolumeId::from_parts(meta.dev(), meta.ino()),
            size,
            direct: options.direct,
        })
    }

    /// The canonical path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// The ring of the pool that the calling thread uses.
    fn ring(&self) -> &Ring {
        static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SLOT: usize = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        }
        let slot = SLOT.with(|s| *s);
        &self.rings[slot % self.rings.len()]
    }

    /// Whether a transfer can go to an `O_DIRECT` descriptor as is.
    fn direct_ok(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        !self.direct
            || (offset % DIRECT_ALIGN_BYTES as u64 == 0
                && len % DIRECT_ALIGN_BYTES == 0
                && ptr.align_offset(DIRECT_ALIGN_BYTES) == 0)
    }

    /// Fill `buf` from `offset`, continuing short reads. End of file is an error only if it comes
    /// before the first `need` bytes are read; the rest of `buf` is then zero-filled (used for
    /// `O_DIRECT` bounce buffers that extend past the end of a file).
    fn read_exact(&self, buf: &mut [u8], offset: u64, need: usize) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = buf.len().min(done + MAX_CHUNK);
            let want = end - done;
            let res = self
                .ring()
                .run(
                    self.fd(),
                    Op::Read {
                        buf: &mut buf[done..end],
                        offset: at,
                    },
                )
                .map_err(|e| Error::io("read", self.shown(), at, e))?;
            match transferred(res, want) {
                Ok(0) if done >= need => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(0) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("end of file after {done} of {need} bytes"),
                    );
                    return Err(Error::io("read", self.shown(), at, e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", self.shown(), at, e)),
            }
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`, continuing short writes.
    fn write_all(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = buf.len().min(done + MAX_CHUNK);
            let want = end - done;
            let res = self
                .ring()
                .run(
                    self.fd(),
                    Op::Write {
                        buf: &buf[done..end],
                        offset: at,
                    },
                )
                .map_err(|e| Error::io("write", self.shown(), at, e))?;
            match transferred(res, want) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "write accepted no bytes");
                    return Err(Error::io("write", self.shown(), at, e));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("write", self.shown(), at, e)),
            }
        }
        Ok(())
    }
}

/// Interpret a read or write completion for a request of `want` bytes.
fn transferred(res: i32, want: usize) -> io::Result<usize> {
    if res < 0 {
        return Err(io::Error::from_raw_os_error(-res));
    }
    // `res` is non-negative here, so the conversion is lossless.
    let n = res.unsigned_abs() as usize;
    if n > want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("kernel reported {n} bytes for a {want}-byte request"),
        ));
    }
    Ok(n)
}

impl Volume for UringVolume {
    fn info(&self) -> VolumeInfo {
        VolumeInfo {
            id: self.id,
            size: self.size,
            sector_size: 512,
            generation: Generation(0),
            locator: self.shown(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        if self.direct_ok(buf.as_ptr(), offset, buf.len()) {
            return self.read_exact(buf, offset, buf.len());
        }
        let start = align_down(offset);
        let end = align_up(offset + buf.len() as u64);
        let len = usize::try_from(end - start).map_err(|_| Error::invalid("read", "too large"))?;
        let mut bounce = AlignedBuf::new(len);
        let skip = usize::try_from(offset - start).unwrap_or(0);
        // The aligned tail may lie past the end of a file whose size is not aligned.
        self.read_exact(bounce.get_mut(), start, skip + buf.len())?;
        buf.copy_from_slice(&bounce.get()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        if self.direct_ok(buf.as_ptr(), offset, buf.len()) {
            return self.write_all(buf, offset);
        }
        let start = align_down(offset);
        let end = align_up(offset + buf.len() as u64);
        if end > self.size {
            // Writing the whole aligned tail would extend the file.
            return Err(Error::Misaligned {
                offset,
                len: buf.len() as u64,
                align: DIRECT_ALIGN_BYTES as u64,
            });
        }
        let len = usize::try_from(end - start).map_err(|_| Error::invalid("write", "too large"))?;
        let mut bounce = AlignedBuf::new(len);
        if start != offset || end != offset + buf.len() as u64 {
            // Read-modify-write of the partial sectors at either edge.
            self.read_exact(bounce.get_mut(), start, len)?;
        }
        let skip = usize::try_from(offset - start).unwrap_or(0);
        bounce.get_mut()[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_all(bounce.get(), start)
    }

    fn flush(&self) -> Result<()> {
        loop {
            let res = self
                .ring()
                .run(self.fd(), Op::Fsync)
                .map_err(|e| Error::io("fdatasync", self.shown(), 0, e))?;
            if res >= 0 {
                return Ok(());
            }
            let e = io::Error::from_raw_os_error(-res);
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::io("fdatasync", self.shown(), 0, e));
            }
        }
    }
}

/// One request. The buffers are borrowed for as long as [`Ring::run`] runs, and `run` does not
/// return before the kernel is done with them.
enum Op<'b> {
    Read { buf: &'b mut [u8], offset: u64 },
    Write { buf: &'b [u8], offset: u64 },
    Fsync,
}

/// One io_uring instance shared by several threads (see the module documentation).
struct Ring {
    uring: IoUring,
    /// Held while pushing to and submitting the submission queue. `true` once a submission
    /// failed and left an SQE the kernel has not consumed; the ring then never submits again.
    sq: Mutex<bool>,
    /// Completion dispatch state; also the lock under which the completion queue is drained.
    cq: Mutex<CqState>,
    /// Signalled whenever completions were drained or a request slot was freed.
    cv: Condvar,
    /// Most requests in the kernel at once (the completion-queue size: no overflow possible).
    max_in_flight: usize,
}

struct CqState {
    /// A caller is blocked in `io_uring_enter(GETEVENTS)` for this ring.
    reaping: bool,
    /// Requests submitted (or being submitted) whose completion has not been drained yet.
    in_flight: usize,
    /// Last token handed out.
    next_token: u64,
    /// Drained results not yet picked up by their callers, by token.
    done: HashMap<u64, i32>,
}

impl Ring {
    fn new(entries: u32) -> io::Result<Self> {
        let uring = IoUring::new(entries)?;
        let max_in_flight = uring.params().cq_entries() as usize;
        Ok(Ring {
            uring,
            sq: Mutex::new(false),
            cq: Mutex::new(CqState {
                reaping: false,
                in_flight: 0,
                next_token: 0,
                done: HashMap::with_capacity(max_in_flight),
            }),
            cv: Condvar::new(),
            max_in_flight,
        })
    }

    /// Submit `op` on `fd` and block until its completion has been reaped; returns the raw
    /// completion result (a byte count or a negated errno).
    ///
    /// `Err` only when the request could not be submitted, in which case the kernel never saw it.
    fn run(&self, fd: types::Fd, op: Op<'_>) -> io::Result<i32> {
        let token = self.acquire();
        // Lengths are clamped by the callers to `MAX_CHUNK`, which fits in `u32`.
        let entry = match op {
            Op::Read { buf, offset } => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                opcode::Read::new(fd, buf.as_mut_ptr(), len)
                    .offset(offset)
                    .build()
            }
            Op::Write { buf, offset } => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                opcode::Write::new(fd, buf.as_ptr(), len)
                    .offset(offset)
                    .build()
            }
            Op::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(token);

        let mut broken = self.sq.lock();
        if *broken {
            drop(broken);
            self.release();
            return Err(io::Error::other(
                "io_uring ring unusable after a failed submission",
            ));
        }
        {
            // SAFETY: `submission_shared` requires that no other `SubmissionQueue` of this ring
            // exists. Every one is created with the `sq` mutex held (as here) and dropped before
            // it is released.
            let mut sq = unsafe { self.uring.submission_shared() };
            // SAFETY: the entry points at the buffer of `op`, which is borrowed for the whole of
            // this call (lifetime of `Op`), and at `fd`, which the volume keeps open while `&self`
            // is borrowed. This function returns only after `wait` has reaped the completion of
            // `token`, or without the kernel ever having consumed the entry (failed submission,
            // after which the ring is marked broken and never submits again), so the kernel
            // never touches the buffer after we return.
            let pushed = unsafe { sq.push(&entry) };
            if pushed.is_err() {
                // Cannot happen: every submission empties the queue before the mutex is released.
                drop(sq);
                drop(broken);
                self.release();
                return Err(io::Error::other("io_uring submission queue full"));
            }
            // Dropping `sq` publishes the new tail to the kernel.
        }
        loop {
            match self.uring.submitter().submit() {
                Ok(_) => {}
                Err(e) if is_transient(&e) => std::thread::sleep(RETRY_PAUSE),
                Err(e) => {
                    // io_uring_enter fails only when it consumed no entry, so ours is still in
                    // the queue, unseen. Never submit on this ring again.
                    *broken = true;
                    drop(broken);
                    self.release();
                    return Err(e);
                }
            }
            // SAFETY: as above, the `sq` mutex is held and no other `SubmissionQueue` exists.
            if unsafe { self.uring.submission_shared() }.is_empty() {
                break;
            }
        }
        drop(broken);
        Ok(self.wait(token))
    }

    /// Reserve room for one request in the kernel and return its token.
    fn acquire(&self) -> u64 {
        let mut st = self.cq.lock();
        while st.in_flight >= self.max_in_flight {
            self.cv.wait(&mut st);
        }
        st.in_flight += 1;
        st.next_token = st.next_token.wrapping_add(1);
        st.next_token
    }

    /// Give back the room of a request the kernel never saw.
    fn release(&self) {
        let mut st = self.cq.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        self.cv.notify_all();
    }

    /// Block until the completion of `token` has been reaped and return its result.
    fn wait(&self, token: u64) -> i32 {
        let mut st = self.cq.lock();
        loop {
            if let Some(res) = st.done.remove(&token) {
                return res;
            }
            if st.reaping {
                self.cv.wait(&mut st);
                continue;
            }
            st.reaping = true;
            let entered = MutexGuard::unlocked(&mut st, || self.enter_getevents());
            self.drain(&mut st);
            st.reaping = false;
            self.cv.notify_all();
            if let Err(e) = entered {
                if e.kind() != io::ErrorKind::Interrupted && !is_transient(&e) {
                    // Unexpected, but our request is still in the kernel and its buffer must
                    // not be given back: poll the completion queue instead of blocking.
                    MutexGuard::unlocked(&mut st, || std::thread::sleep(RETRY_PAUSE));
                }
            }
        }
    }

    /// Block until at least one completion is available (without submitting anything).
    fn enter_getevents(&self) -> io::Result<usize> {
        // SAFETY: `enter` is a raw `io_uring_enter`. With `to_submit = 0` the kernel reads no
        // submission entry (so none left in the queue can be submitted by this call);
        // `GETEVENTS` with `min_complete = 1` only waits; the null argument (no signal mask,
        // no extended argument flag) is valid.
        unsafe {
            self.uring
                .submitter()
                .enter::<()>(0, 1, EnterFlags::GETEVENTS.bits(), None)
        }
    }

    /// Move every available completion into the dispatch map.
    fn drain(&self, st: &mut MutexGuard<'_, CqState>) {
        // SAFETY: `completion_shared` requires that no other `CompletionQueue` of this ring
        // exists. One is only ever created here, with the `cq` mutex held (`st` is its guard),
        // and dropped before this function returns.
        let cq = unsafe { self.uring.completion_shared() };
        for cqe in cq {
            st.done.insert(cqe.user_data(), cqe.result());
            st.in_flight = st.in_flight.saturating_sub(1);
        }
    }
}

/// Errors of `io_uring_enter` after which retrying is right.
fn is_transient(e: &io::Error) -> bool {
    let code = e.raw_os_error();
    e.kind() == io::ErrorKind::Interrupted
        || code == Some(rustix::io::Errno::AGAIN.raw_os_error())
        || code == Some(rustix::io::Errno::BUSY.raw_os_error())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn unavailable() -> bool {
        if uring_available() {
            false
        } else {
            eprintln!("io_uring is not available here; skipping");
            true
        }
    }

    fn fixture(size: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vol");
        std::fs::write(&path, vec![0u8; size]).expect("create");
        (dir, path)
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8)
            .collect()
    }

    #[test]
    fn roundtrip_at_odd_offsets() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(1 << 20);
        let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
        assert_eq!(v.size(), 1 << 20);
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(v.info().id, VolumeId::from_parts(meta.dev(), meta.ino()));
        assert_eq!(
            v.info().locator,
            std::fs::canonicalize(&path)
                .expect("canon")
                .display()
                .to_string()
        );
        for (i, &(off, len)) in [
            (1u64, 1usize),
            (4097, 1000),
            (12345, 70000),
            (1_048_000, 576),
        ]
        .iter()
        .enumerate()
        {
            let data = pattern(i as u64 + 1, len);
            v.write_at(&data, off).expect("write");
            let mut back = vec![0u8; len];
            v.read_at(&mut back, off).expect("read");
            assert_eq!(back, data, "offset {off}");
        }
        v.flush().expect("flush");
        let on_disk = std::fs::read(&path).expect("read file");
        assert_eq!(&on_disk[4097..5097], &pattern(2, 1000)[..]);
        let mut empty = [0u8; 0];
        v.read_at(&mut empty, 1 << 20).expect("empty read at end");
    }

    #[test]
    fn concurrent_writers_disjoint_ranges() {
        if unavailable() {
            return;
        }
        const THREADS: u64 = 8;
        const CHUNK: usize = 3001;
        const PER_THREAD: u64 = 64;
        let size = (THREADS * PER_THREAD) as usize * CHUNK;
        let (_dir, path) = fixture(size);
        let v = Arc::new(UringVolume::open(&path, &FileVolumeOptions::default()).expect("open"));
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let v = Arc::clone(&v);
                s.spawn(move || {
                    for k in 0..PER_THREAD {
                        let idx = k * THREADS + t;
                        let data = pattern(idx, CHUNK);
                        v.write_at(&data, idx * CHUNK as u64).expect("write");
                        if k % 16 == 0 {
                            v.flush().expect("flush");
                        }
                        let mut back = vec![0u8; CHUNK];
                        v.read_at(&mut back, idx * CHUNK as u64).expect("read");
                        assert_eq!(back, data);
                    }
                });
            }
        });
        v.flush().expect("flush");
        let on_disk = std::fs::read(&path).expect("read file");
        for idx in 0..THREADS * PER_THREAD {
            let mut back = vec![0u8; CHUNK];
            v.read_at(&mut back, idx * CHUNK as u64).expect("read");
            let want = pattern(idx, CHUNK);
            assert_eq!(back, want, "chunk {idx}");
            let at = idx as usize * CHUNK;
            assert_eq!(&on_disk[at..at + CHUNK], &want[..], "chunk {idx} on disk");
        }
    }

    #[test]
    fn many_threads_share_a_tiny_ring() {
        if unavailable() {
            return;
        }
        // One ring with room for 2 requests in the kernel (CQ of 4 at most) and 24 threads:
        // exercises waiting for room, reaper hand-over and dispatch of foreign completions.
        const THREADS: u64 = 24;
        const CHUNK: usize = 4096 + 17;
        const ROUNDS: u64 = 40;
        let size = THREADS as usize * CHUNK;
        let (_dir, path) = fixture(size);
        let v = UringVolume::open_with(&path, &FileVolumeOptions::default(), 1, 2).expect("open");
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let v = &v;
                s.spawn(move || {
                    let at = t * CHUNK as u64;
                    for r in 0..ROUNDS {
                        let data = pattern(t * 1000 + r, CHUNK);
                        v.write_at(&data, at).expect("write");
                        let mut back = vec![0u8; CHUNK];
                        v.read_at(&mut back, at).expect("read");
                        assert_eq!(back, data);
                        if r % 8 == 0 {
                            v.flush().expect("flush");
                        }
                    }
                });
            }
        });
        let st = v.rings[0].cq.lock();
        assert_eq!(st.in_flight, 0);
        assert!(st.done.is_empty());
        assert!(!st.reaping);
    }

    #[test]
    fn out_of_range_is_an_error() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(8192);
        let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
        let mut buf = [0u8; 20];
        assert!(matches!(
            v.read_at(&mut buf, 8180),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            v.write_at(&buf, 8190),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            v.read_at(&mut buf, u64::MAX - 5),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            v.write_at(&buf, u64::MAX),
            Err(Error::OutOfRange { .. })
        ));
        v.read_at(&mut buf, 8172).expect("last bytes are readable");
    }

    #[test]
    fn direct_roundtrip_unaligned() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(64 * 1024);
        let opts = FileVolumeOptions {
            direct: true,
            read_only: false,
        };
        let v = match UringVolume::open(&path, &opts) {
            Ok(v) => v,
            Err(Error::Io {
                op: "open", source, ..
            }) if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                eprintln!("O_DIRECT not supported by this file system; skipping");
                return;
            }
            Err(e) => panic!("open: {e}"),
        };
        // Unaligned offset, length and (most likely) buffer address.
        let data = pattern(9, 10_000);
        v.write_at(&data[1..], 4097).expect("write");
        let mut back = vec![0u8; 9_999];
        v.read_at(&mut back, 4097).expect("read");
        assert_eq!(back, data[1..]);
        // Aligned request through an aligned buffer takes the direct path.
        let mut aligned = AlignedBuf::new(8192);
        aligned.get_mut().copy_from_slice(&pattern(3, 8192));
        v.write_at(aligned.get(), 16384).expect("aligned write");
        let mut back = AlignedBuf::new(8192);
        v.read_at(back.get_mut(), 16384).expect("aligned read");
        assert_eq!(back.get(), aligned.get());
        v.flush().expect("flush");
        drop(v);
        let on_disk = std::fs::read(&path).expect("read file");
        assert_eq!(&on_disk[4097..4097 + 9_999], &data[1..]);
        assert!(
            on_disk[..4097].iter().all(|&b| b == 0),
            "bytes before the write untouched"
        );
        assert_eq!(&on_disk[16384..16384 + 8192], aligned.get());
    }

    #[test]
    fn read_past_eof_is_an_error() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(16384);
        let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
        // Shrink the file behind the volume's back: its cached size still says 16384.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(8192))
            .expect("truncate");
        let mut buf = vec![0u8; 200];
        match v.read_at(&mut buf, 8192 - 100) {
            Err(Error::Io {
                op: "read", source, ..
            }) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            }
            other => panic!("expected an UnexpectedEof I/O error, got {other:?}"),
        }
        let mut tail = vec![0u8; 100];
        v.read_at(&mut tail, 8192 - 100)
            .expect("bytes before EOF still readable");
    }

    #[test]
    fn open_best_picks_uring() {
        let (_dir, path) = fixture(4096);
        let (v, backend) =
            super::super::open_best(&path, &FileVolumeOptions::default()).expect("open");
        assert_eq!(
            backend,
            if uring_available() {
                "io_uring"
            } else {
                "pread"
            }
        );
        v.write_at(b"hello", 10).expect("write");
        let mut back = [0u8; 5];
        v.read_at(&mut back, 10).expect("read");
        assert_eq!(&back, b"hello");
        v.flush().expect("flush");
    }
}
