//! Regular files and block devices through `io_uring`.
//!
//! # Design
//!
//! The [`Volume`] API is synchronous: a caller hands in a borrowed buffer and blocks until the
//! transfer is complete. Queue depth comes from many threads calling at once, so the backend's
//! job is to let every calling thread have its request in the kernel without waiting for any
//! other thread.
//!
//! Every thread that transfers through a [`UringVolume`] gets **its own ring**, created on first
//! use and kept in a thread-local slot for the life of the thread (shared by every volume the
//! thread touches; the descriptor travels in each entry). A thread has at most one request in
//! flight, so a transfer is: push one entry, `io_uring_enter(to_submit = 1, min_complete = 1)`,
//! pop its completion. There is no lock, no hand-over between threads and no dispatch map. The
//! ring is created with `IORING_SETUP_SINGLE_ISSUER` and `IORING_SETUP_DEFER_TASKRUN` where the
//! kernel accepts them (completion work then runs in the submitting thread's own
//! `io_uring_enter`), and without them otherwise.
//!
//! An earlier design shared a pool of rings between threads (a submission mutex and one thread
//! at a time reaping for the others); with 8 threads on 2 rings, 4 KiB `O_DIRECT` reads cost
//! 1.39x a plain `pread` because of the wake-ups between threads (docs/benchmarks.md).
//!
//! **Flushes** call `fdatasync(2)` directly: the kernel runs an io_uring fsync in a worker
//! thread, which only adds a hand-over for a caller that blocks on it anyway.
//!
//! **Fallback.** When a thread cannot create its ring (the kernel refuses: too many rings,
//! memory limits), that thread's transfers use `pread`/`pwrite` on the same descriptor from then
//! on, with the same bounce handling as [`super::FileVolume`]. A ring that became unusable (see
//! below) is dropped and the thread creates a new one on its next transfer.
//!
//! # Registered bounce buffers
//!
//! An `O_DIRECT` transfer whose offset, length or buffer address is not aligned goes through an
//! aligned bounce buffer. The first time a thread needs one for an `O_DIRECT` volume, its ring
//! registers one buffer of [`FIXED_BUF_BYTES`] with the kernel (`IORING_REGISTER_BUFFERS`). A
//! bounced transfer whose aligned span fits in it goes out as `READ_FIXED` / `WRITE_FIXED`: no
//! allocation, no page faults and no per-request page pinning in the kernel. When the span is
//! larger, or registration was refused (`RLIMIT_MEMLOCK`, `ENOMEM`, `EPERM`), the transfer uses a
//! freshly allocated bounce buffer and plain reads and writes instead. One buffer per thread is
//! enough: a thread runs one transfer at a time, and a read-modify-write uses the same buffer
//! for its read and its write. Aligned transfers always use the caller's buffer directly.
//!
//! # Buffer lifetime
//!
//! Every request borrows the caller's slice (or a bounce buffer) for the duration of one blocking
//! call, and that call returns only after the request's completion has been popped, on success
//! and on every error path. The single exception is an `io_uring_enter` that fails without
//! consuming the entry: the kernel then never saw the request, and the ring is discarded (closing
//! it, so that nothing ever submits the stale entry); the thread gets a new ring later.
//!
//! A thread's registered buffer lives exactly as long as its ring: it is never resized or freed
//! while the ring exists, and the ring is torn down (which unregisters it) before it is freed.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{opcode, types, IoUring, Probe};

use super::{check_range, FileVolumeOptions, Volume, VolumeInfo};
use crate::ids::{Generation, VolumeId};
use crate::{Error, Result};

/// Alignment used for `O_DIRECT` transfers (same as the file backend).
use super::aligned::{align_down, align_up, AlignedBuf, DIRECT_ALIGN_BYTES};

/// Submission-queue entries of a thread's ring (a thread has one request in flight).
const RING_ENTRIES: u32 = 4;

/// Largest transfer handed to one SQE. A multiple of [`DIRECT_ALIGN_BYTES`] so that the pieces
/// of an aligned `O_DIRECT` transfer stay aligned, and below `u32::MAX` (the SQE length field).
const MAX_CHUNK: usize = 1 << 30;

/// Size of a thread's registered bounce buffer: the largest aligned span of an unaligned
/// `O_DIRECT` transfer that goes through it. A multiple of [`DIRECT_ALIGN_BYTES`]; locked against
/// `RLIMIT_MEMLOCK` once per thread that bounces `O_DIRECT` transfers.
const FIXED_BUF_BYTES: usize = 256 * 1024;

/// The `op` of errors raised while opening a volume whose rings cannot work at all.
const SETUP_OP: &str = "io_uring_setup";

/// Pause before retrying a transiently refused `io_uring_enter` (`EAGAIN`, `EBUSY`).
const RETRY_PAUSE: Duration = Duration::from_millis(1);

/// Whether this process may use io_uring for file I/O.
///
/// Creates a small ring, checks that the kernel supports the read, write, fixed-buffer and no-op
/// opcodes, and runs a no-op through it. The answer is computed once per process and cached.
/// `false` when the kernel is too old, io_uring is disabled (`kernel.io_uring_disabled`), or a
/// seccomp filter refuses the system calls (`ENOSYS`, `EPERM`); callers then use
/// [`super::FileVolume`] instead (see [`super::open_best`]).
#[must_use]
pub fn uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| probe().is_ok())
}

/// Whether `e` is the kernel refusing io_uring for a volume (as opposed to a problem with the
/// file itself); [`super::open_best`] falls back to the file backend on these.
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
        opcode::ReadFixed::CODE,
        opcode::WriteFixed::CODE,
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

/// A file or block device accessed through io_uring, one ring per calling thread.
///
/// Identity, size and locator are derived exactly as for [`super::FileVolume`]; see the module
/// documentation for how threads use their rings.
pub struct UringVolume {
    file: File,
    path: PathBuf,
    id: VolumeId,
    size: u64,
    direct: bool,
    /// Bounce unaligned `O_DIRECT` transfers through the thread's registered buffer.
    pool: bool,
    /// Send every transfer through io_uring; otherwise only those that use the registered
    /// buffer (see [`UringVolume::open_registered_only`]).
    everywhere: bool,
    /// Requests submitted with a registered buffer (`READ_FIXED` / `WRITE_FIXED`).
    fixed_requests: AtomicU64,
    /// Transfers that went through `pread`/`pwrite` because the thread had no usable ring.
    fallback_transfers: AtomicU64,
    /// Requests submitted to a ring (tests only: a shared counter costs on the hot path).
    #[cfg(test)]
    ring_requests: AtomicU64,
}

impl std::fmt::Debug for UringVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringVolume")
            .field("path", &self.path)
            .field("id", &self.id)
            .field("size", &self.size)
            .field("direct", &self.direct)
            .field(
                "fixed_requests",
                &self.fixed_requests.load(Ordering::Relaxed),
            )
            .field(
                "fallback_transfers",
                &self.fallback_transfers.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// One request. The buffers are borrowed for as long as [`LocalRing::run`] runs, and `run` does
/// not return before the kernel is done with them. `fixed: true` means that `buf` lies within
/// the ring's registered buffer (index 0).
enum Op<'b> {
    Read {
        buf: &'b mut [u8],
        offset: u64,
        fixed: bool,
    },
    Write {
        buf: &'b [u8],
        offset: u64,
        fixed: bool,
    },
}

impl UringVolume {
    /// Open an existing file or block device.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened or inspected, or (with op
    /// `"io_uring_setup"`) when the calling thread cannot create its ring.
    pub fn open(path: impl AsRef<Path>, options: &FileVolumeOptions) -> Result<Self> {
        Self::open_with(path.as_ref(), options, true, true)
    }

    /// Open an existing file or block device using io_uring only where it measured faster
    /// than plain system calls for one synchronous request: unaligned `O_DIRECT` transfers
    /// whose aligned span fits the thread's registered buffer (`READ_FIXED` / `WRITE_FIXED`,
    /// no bounce allocation and no per-request page pinning). Every other transfer uses
    /// `pread`/`pwrite` on the same descriptor, and flushes use `fdatasync`. This is what the
    /// engine's default backend opens for `O_DIRECT` volumes (see docs/benchmarks.md for the
    /// measurements behind the split).
    ///
    /// # Errors
    /// As [`UringVolume::open`].
    pub fn open_registered_only(
        path: impl AsRef<Path>,
        options: &FileVolumeOptions,
    ) -> Result<Self> {
        Self::open_with(path.as_ref(), options, true, false)
    }

    /// [`UringVolume::open`] without registered bounce buffers: unaligned `O_DIRECT` transfers
    /// always allocate their bounce buffer. For measuring what registration saves; use
    /// [`UringVolume::open`] otherwise.
    ///
    /// # Errors
    /// As [`UringVolume::open`].
    #[doc(hidden)]
    pub fn open_without_buffer_pool(
        path: impl AsRef<Path>,
        options: &FileVolumeOptions,
    ) -> Result<Self> {
        Self::open_with(path.as_ref(), options, false, true)
    }

    fn open_with(
        path: &Path,
        options: &FileVolumeOptions,
        pool: bool,
        everywhere: bool,
    ) -> Result<Self> {
        let shown = path.display().to_string();
        // The opening thread's ring: if even that cannot be created, io_uring is of no use here.
        if !with_ring(|r| r.is_some()) {
            let e = io::Error::other("cannot create an io_uring instance");
            return Err(Error::io(SETUP_OP, &shown, 0, e));
        }
        let super::OpenedFile {
            file,
            meta,
            size,
            canonical: abs,
        } = super::open_file(path, options)?;
        Ok(UringVolume {
            file,
            path: abs,
            id: VolumeId::from_parts(meta.dev(), meta.ino()),
            size,
            direct: options.direct,
            pool,
            everywhere,
            fixed_requests: AtomicU64::new(0),
            fallback_transfers: AtomicU64::new(0),
            #[cfg(test)]
            ring_requests: AtomicU64::new(0),
        })
    }

    /// The canonical path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Requests submitted with a registered buffer (`READ_FIXED` / `WRITE_FIXED`) so far.
    #[must_use]
    pub fn fixed_requests(&self) -> u64 {
        self.fixed_requests.load(Ordering::Relaxed)
    }

    /// Transfers (calls of `read_at` / `write_at`) so far that used `pread`/`pwrite` because
    /// the calling thread had no usable ring (see the module documentation).
    #[must_use]
    pub fn fallback_transfers(&self) -> u64 {
        self.fallback_transfers.load(Ordering::Relaxed)
    }

    fn count_request(&self, fixed: bool) {
        if fixed {
            self.fixed_requests.fetch_add(1, Ordering::Relaxed);
        }
        #[cfg(test)]
        self.ring_requests.fetch_add(1, Ordering::Relaxed);
    }

    fn count_fallback(&self, fell_back: bool) {
        if fell_back {
            self.fallback_transfers.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Whether a transfer can go to the descriptor as is (always, unless `O_DIRECT`).
    fn direct_ok(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        !self.direct
            || (offset % DIRECT_ALIGN_BYTES as u64 == 0
                && len % DIRECT_ALIGN_BYTES == 0
                && ptr.align_offset(DIRECT_ALIGN_BYTES) == 0)
    }

    /// The aligned span `(start, len)` of an unaligned `O_DIRECT` transfer.
    fn span(offset: u64, len: usize, op: &'static str) -> Result<(u64, usize)> {
        let start = align_down(offset);
        let end = align_up(offset + len as u64);
        let len = usize::try_from(end - start).map_err(|_| Error::invalid(op, "too large"))?;
        Ok((start, len))
    }

    /// Fill `buf` from `offset` through `ring` (or `pread` without one), continuing short reads.
    /// End of file is an error only if it comes before the first `need` bytes; the rest of `buf`
    /// is then zero-filled (bounce buffers that extend past the end of a file). With `fixed`,
    /// `buf` lies within the ring's registered buffer.
    fn read_exact(
        &self,
        ring: Option<&mut LocalRing>,
        buf: &mut [u8],
        offset: u64,
        need: usize,
        fixed: bool,
    ) -> Result<()> {
        let Some(ring) = ring else {
            return super::file::pread_exact(&self.file, buf, offset, need)
                .map_err(|e| Error::io("read", self.shown(), offset, e));
        };
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = buf.len().min(done + MAX_CHUNK);
            let want = end - done;
            self.count_request(fixed);
            let op = Op::Read {
                buf: &mut buf[done..end],
                offset: at,
                fixed,
            };
            let res = ring
                .run(self.fd(), op)
                .map_err(|e| Error::io("read", self.shown(), at, e))?;
            match transferred(res, want) {
                Ok(0) if done >= need => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(0) => return Err(Error::io("read", self.shown(), at, eof(done, need))),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", self.shown(), at, e)),
            }
        }
        Ok(())
    }

    /// Write all of `buf` at `offset` through `ring` (or `pwrite` without one), continuing short
    /// writes. With `fixed`, `buf` lies within the ring's registered buffer.
    fn write_all(
        &self,
        ring: Option<&mut LocalRing>,
        buf: &[u8],
        offset: u64,
        fixed: bool,
    ) -> Result<()> {
        let Some(ring) = ring else {
            return super::file::pwrite_all(&self.file, buf, offset)
                .map_err(|e| Error::io("write", self.shown(), offset, e));
        };
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = buf.len().min(done + MAX_CHUNK);
            let want = end - done;
            self.count_request(fixed);
            let op = Op::Write {
                buf: &buf[done..end],
                offset: at,
                fixed,
            };
            let res = ring
                .run(self.fd(), op)
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

    /// Whether an unaligned `O_DIRECT` transfer with an aligned span of `len` bytes can use
    /// the ring's registered buffer (registering it on first use).
    fn fixed_fits(&self, ring: Option<&mut LocalRing>, len: usize) -> bool {
        self.pool && len <= FIXED_BUF_BYTES && ring.is_some_and(LocalRing::fixed_buffer)
    }

    /// The ring to use for a transfer that needs no registered buffer: none (plain system
    /// calls) unless the volume sends every transfer through io_uring.
    fn plain_ring<'r>(&self, ring: Option<&'r mut LocalRing>) -> Option<&'r mut LocalRing> {
        ring.filter(|_| self.everywhere)
    }

    fn read_on(&self, mut ring: Option<&mut LocalRing>, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.direct_ok(buf.as_ptr(), offset, buf.len()) {
            return self.read_exact(self.plain_ring(ring), buf, offset, buf.len(), false);
        }
        let (start, len) = Self::span(offset, buf.len(), "read")?;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        let need = skip + buf.len();
        // The aligned tail may lie past the end of a file whose size is not aligned.
        let fits = self.fixed_fits(ring.as_deref_mut(), len);
        match ring {
            Some(r) if fits => {
                let mut fixed = r.take_fixed(len);
                let res = self.read_exact(Some(&mut *r), fixed.get_mut(), start, need, true);
                if res.is_ok() {
                    buf.copy_from_slice(&fixed.get()[skip..need]);
                }
                r.put_fixed(fixed);
                res
            }
            ring => {
                let ring = self.plain_ring(ring);
                super::file::with_bounce(len, |b| {
                    self.read_exact(ring, b, start, need, false)?;
                    buf.copy_from_slice(&b[skip..need]);
                    Ok(())
                })
            }
        }
    }

    fn write_on(&self, mut ring: Option<&mut LocalRing>, buf: &[u8], offset: u64) -> Result<()> {
        if self.direct_ok(buf.as_ptr(), offset, buf.len()) {
            return self.write_all(self.plain_ring(ring), buf, offset, false);
        }
        let (start, len) = Self::span(offset, buf.len(), "write")?;
        if start + len as u64 > self.size {
            // Writing the whole aligned tail would extend the file.
            return Err(Error::Misaligned {
                offset,
                len: buf.len() as u64,
                align: DIRECT_ALIGN_BYTES as u64,
            });
        }
        let skip = usize::try_from(offset - start).unwrap_or(0);
        let partial = skip != 0 || len != buf.len();
        let fits = self.fixed_fits(ring.as_deref_mut(), len);
        match ring {
            Some(r) if fits => {
                let mut fixed = r.take_fixed(len);
                let res = (|| {
                    if partial {
                        // Read-modify-write of the partial sectors at either edge.
                        self.read_exact(Some(&mut *r), fixed.get_mut(), start, len, true)?;
                    }
                    fixed.get_mut()[skip..skip + buf.len()].copy_from_slice(buf);
                    self.write_all(Some(&mut *r), fixed.get(), start, true)
                })();
                r.put_fixed(fixed);
                res
            }
            ring => {
                let mut ring = self.plain_ring(ring);
                super::file::with_bounce(len, |b| {
                    if partial {
                        self.read_exact(ring.as_deref_mut(), b, start, len, false)?;
                    }
                    b[skip..skip + buf.len()].copy_from_slice(buf);
                    self.write_all(ring, b, start, false)
                })
            }
        }
    }
}

/// The end-of-file error of a read that stopped after `done` of `need` bytes.
fn eof(done: usize, need: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("end of file after {done} of {need} bytes"),
    )
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
        with_ring(|ring| {
            self.count_fallback(ring.is_none());
            self.read_on(ring, buf, offset)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        with_ring(|ring| {
            self.count_fallback(ring.is_none());
            self.write_on(ring, buf, offset)
        })
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", self.shown(), 0, e))
    }
}

thread_local! {
    /// The calling thread's ring; `None` before the first transfer and after a ring was
    /// discarded (a new one is created on the next transfer).
    static RING: RefCell<Option<LocalRing>> = const { RefCell::new(None) };
    /// The kernel refused to create a ring for this thread: do not ask again.
    static NO_RING: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the calling thread's ring, creating it if needed; `None` when the thread cannot
/// have one (creation refused, or the slot is unreachable: thread teardown, re-entry), in which
/// case the caller uses plain system calls. A ring that `f` marked broken is discarded.
fn with_ring<R>(f: impl FnOnce(Option<&mut LocalRing>) -> R) -> R {
    let mut f = Some(f);
    let out = RING.try_with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return None;
        };
        if slot.is_none() && !NO_RING.with(Cell::get) {
            let created = if rings_refused() {
                Err(io::Error::other("ring creation refused (test)"))
            } else {
                LocalRing::new()
            };
            match created {
                Ok(r) => *slot = Some(r),
                // Refused (limits, memory): this thread uses plain system calls from now on
                // rather than paying a failing `io_uring_setup` on every transfer.
                Err(_) => NO_RING.with(|n| n.set(true)),
            }
        }
        let f = f.take()?;
        let out = f(slot.as_mut());
        if slot.as_ref().is_some_and(|r| r.broken) {
            // Closing the ring drops the entry the kernel never consumed.
            *slot = None;
        }
        Some(out)
    });
    match (out, f) {
        (Ok(Some(out)), _) => out,
        (_, Some(f)) => f(None),
        // `f` ran and produced a value, which was returned above.
        (_, None) => unreachable!("with_ring: the closure ran but returned nothing"),
    }
}

/// Whether this thread may not create a ring: set by tests to exercise the fallback.
#[cfg(test)]
fn rings_refused() -> bool {
    tests::rings_refused()
}

#[cfg(not(test))]
#[inline]
fn rings_refused() -> bool {
    false
}

/// The registered bounce buffer of a ring.
enum FixedBuf {
    /// Not registered yet: register on first need.
    Untried,
    /// Registered as buffer index 0. `None` while a transfer holds it (`take_fixed`).
    Registered(Option<AlignedBuf>),
    /// The kernel refused the registration; bounce with allocated buffers.
    Refused,
}

/// One thread's io_uring instance (see the module documentation).
struct LocalRing {
    uring: IoUring,
    /// Declared after `uring`, so that the ring, and with it the registration, is destroyed
    /// before the buffer is freed.
    fixed: FixedBuf,
    /// Last `user_data` handed out.
    token: u64,
    /// An entry is in the submission queue that the kernel refused to consume: discard the ring.
    broken: bool,
}

impl LocalRing {
    fn new() -> io::Result<Self> {
        // Single issuer (only this thread submits) with deferred task work where supported
        // (Linux 6.1+), plain otherwise.
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        Ok(LocalRing {
            uring,
            fixed: FixedBuf::Untried,
            token: 0,
            broken: false,
        })
    }

    /// Whether the registered buffer can be used (registering it on first call).
    fn fixed_buffer(&mut self) -> bool {
        if matches!(self.fixed, FixedBuf::Untried) {
            let mut buf = AlignedBuf::new(FIXED_BUF_BYTES);
            let bytes = buf.get_mut();
            let iov = libc::iovec {
                iov_base: bytes.as_mut_ptr().cast(),
                iov_len: bytes.len(),
            };
            // SAFETY: the iovec describes the whole usable part of `buf`, which moves into
            // `self.fixed` and stays alive, never resized (moving an `AlignedBuf` moves only its
            // handle, not the heap memory the iovec points at), until after the io_uring
            // instance and with it the registration is destroyed: `LocalRing` declares `fixed`
            // after `uring`, and a buffer taken out by `take_fixed` is always put back by the
            // same transfer. The kernel touches the buffer only while a request names it, and
            // requests run one at a time, each completing before `run` returns.
            self.fixed = match unsafe { self.uring.submitter().register_buffers(&[iov]) } {
                Ok(()) => FixedBuf::Registered(Some(buf)),
                Err(_) => FixedBuf::Refused,
            };
        }
        matches!(self.fixed, FixedBuf::Registered(Some(_)))
    }

    /// Take the registered buffer for a transfer of an aligned span of `len` bytes (at most
    /// [`FIXED_BUF_BYTES`]); the caller must give it back with [`LocalRing::put_fixed`].
    /// Call only after [`LocalRing::fixed_buffer`] returned `true`.
    fn take_fixed(&mut self, len: usize) -> FixedLease {
        let buf = match &mut self.fixed {
            FixedBuf::Registered(b) => b.take(),
            _ => None,
        }
        .expect("take_fixed: the registered buffer is available");
        FixedLease { buf, len }
    }

    /// Give the registered buffer back.
    fn put_fixed(&mut self, lease: FixedLease) {
        if let FixedBuf::Registered(slot) = &mut self.fixed {
            *slot = Some(lease.buf);
        }
    }

    /// Submit `op` on `fd` and block until its completion has been popped; returns the raw
    /// completion result (a byte count or a negated errno).
    ///
    /// `Err` only when the request could not be submitted, in which case the kernel never saw
    /// it and the ring is marked broken (see [`with_ring`]).
    fn run(&mut self, fd: types::Fd, op: Op<'_>) -> io::Result<i32> {
        self.token = self.token.wrapping_add(1);
        let token = self.token;
        // Lengths are clamped by the callers to `MAX_CHUNK`, which fits in `u32`.
        let entry = match op {
            Op::Read { buf, offset, fixed } => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let ptr = buf.as_mut_ptr();
                if fixed {
                    opcode::ReadFixed::new(fd, ptr, len, 0)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, len).offset(offset).build()
                }
            }
            Op::Write { buf, offset, fixed } => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let ptr = buf.as_ptr();
                if fixed {
                    opcode::WriteFixed::new(fd, ptr, len, 0)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Write::new(fd, ptr, len).offset(offset).build()
                }
            }
        }
        .user_data(token);
        // SAFETY: the entry points at the buffer of `op`, which is borrowed for the whole of this
        // call (lifetime of `Op`), and at `fd`, which the volume keeps open while it is borrowed
        // by its caller. A fixed-buffer entry names buffer 0 registered with this very ring, and
        // its caller took that buffer out for the duration of the transfer; the kernel checks
        // that the address range lies inside it. This function returns only after the entry's
        // completion was popped, or with the entry never consumed by the kernel, in which case
        // the ring is marked broken and discarded before anything else submits on it.
        if unsafe { self.uring.submission().push(&entry) }.is_err() {
            // Cannot happen: the queue is empty between calls (one request at a time).
            return Err(io::Error::other("io_uring submission queue full"));
        }
        loop {
            if let Err(e) = self.uring.submit_and_wait(1) {
                let unsent = !self.uring.submission().is_empty();
                if unsent && !is_transient(&e) {
                    // io_uring_enter consumed nothing: our entry is still in the queue, unseen.
                    self.broken = true;
                    return Err(e);
                }
                if !is_transient(&e) {
                    // Unexpected while waiting, but our request is in the kernel and its buffer
                    // must not be given back: keep polling for its completion.
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
            // Only this thread submits on this ring and it has one request in flight, so the
            // next completion is ours; anything else would be a stale one to skip.
            while let Some(cqe) = self.uring.completion().next() {
                if cqe.user_data() == token {
                    return Ok(cqe.result());
                }
            }
        }
    }
}

/// The ring's registered buffer while a transfer uses its first `len` bytes.
struct FixedLease {
    buf: AlignedBuf,
    len: usize,
}

impl FixedLease {
    fn get(&self) -> &[u8] {
        &self.buf.get()[..self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf.get_mut()[..self.len]
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

    /// Shrink the 16 KiB file behind `v` to 8 KiB and read across the new end of file: the read
    /// fails with an `UnexpectedEof` I/O error.
    fn shrink_and_read_past_eof(v: &UringVolume, path: &Path) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(8192))
            .expect("truncate");
        let mut buf = vec![0u8; 200];
        match v.read_at(&mut buf, 8192 - 100) {
            Err(Error::Io {
                op: "read", source, ..
            }) => assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected an UnexpectedEof I/O error, got {other:?}"),
        }
    }

    /// A file of `len` bytes of `pattern(seed, len)`, and those bytes.
    fn patterned(seed: u64, len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let (dir, path) = fixture(0);
        let bytes = pattern(seed, len);
        std::fs::write(&path, &bytes).expect("fill");
        (dir, path, bytes)
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

    /// Open `path` with `O_DIRECT` (with or without registered buffers); `None` (after a
    /// message) when the file system refuses `O_DIRECT`.
    fn open_direct(path: &Path, pool: bool) -> Option<UringVolume> {
        open_direct_with(path, pool, true)
    }

    /// [`open_direct`], sending every transfer through the ring when `everywhere`, only those
    /// using the registered buffer otherwise (`open_registered_only`).
    fn open_direct_with(path: &Path, pool: bool, everywhere: bool) -> Option<UringVolume> {
        let opts = FileVolumeOptions {
            direct: true,
            read_only: false,
        };
        match UringVolume::open_with(path, &opts, pool, everywhere) {
            Ok(v) => Some(v),
            Err(Error::Io {
                op: "open", source, ..
            }) if source.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                eprintln!("O_DIRECT not supported by this file system; skipping");
                None
            }
            Err(e) => panic!("open: {e}"),
        }
    }

    /// Whether the calling thread's ring has its registered buffer (registering it now if it
    /// was never tried); `false` when the kernel refused.
    fn registers_here() -> bool {
        with_ring(|r| r.is_some_and(LocalRing::fixed_buffer))
    }

    /// The calling thread's registered buffer is not held by any transfer (no lease leaked).
    fn no_lease_outstanding() -> bool {
        RING.with(
            |c| !matches!(&*c.borrow(), Some(r) if matches!(r.fixed, FixedBuf::Registered(None))),
        )
    }

    /// A buffer of `len` bytes starting one byte past an aligned address, so that even requests
    /// at aligned offsets with aligned lengths are bounced.
    fn misaligned(len: usize) -> (AlignedBuf, usize) {
        (AlignedBuf::new(len + 1), 1)
    }

    #[test]
    fn direct_fixed_buffers_roundtrip() {
        if unavailable() {
            return;
        }
        const SIZE: usize = 2 << 20;
        let (_dir, path, mut model) = patterned(77, SIZE);
        let Some(v) = open_direct(&path, true) else {
            return;
        };
        if !registers_here() {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        let edge = FIXED_BUF_BYTES as u64;
        // (offset, length, whether the aligned span fits in one registered buffer)
        let cases: [(u64, usize, bool); 10] = [
            (1, 100, true),                                       // file start
            (0, 5000, true),                                      // aligned offset, odd length
            (4095, 2, true),                                      // straddles a sector boundary
            (700_001, 10_000, true),                              // middle
            (8191, 250_000, true),                                // just below the buffer size
            (4097, FIXED_BUF_BYTES - 2, true),                    // span exactly one buffer
            (4097, FIXED_BUF_BYTES, false),                       // span one sector more
            (12_345, 3 * FIXED_BUF_BYTES + 7, false),             // well above
            (SIZE as u64 - 777, 777, true),                       // file end
            (SIZE as u64 - edge - 1, FIXED_BUF_BYTES + 1, false), // tail, above the buffer size
        ];
        for (i, &(off, len, fits)) in cases.iter().enumerate() {
            let at = usize::try_from(off).expect("offset");
            // Reads of what is on disk first.
            let before = v.fixed_requests();
            let mut back = vec![0u8; len];
            v.read_at(&mut back, off).expect("read");
            assert!(back == model[at..at + len], "read case {i} ({off}, {len})");
            let used = v.fixed_requests() - before;
            assert_eq!(used > 0, fits, "read case {i}: {used} fixed requests");
            // Then a write (read-modify-write at the edges) and a read back.
            let data = pattern(i as u64 + 100, len);
            let before = v.fixed_requests();
            v.write_at(&data, off).expect("write");
            let used = v.fixed_requests() - before;
            assert_eq!(used > 0, fits, "write case {i}: {used} fixed requests");
            model[at..at + len].copy_from_slice(&data);
            v.read_at(&mut back, off).expect("read back");
            assert!(back == data, "read back case {i} ({off}, {len})");
        }
        // An aligned offset and length from a misaligned address is bounced too.
        let (mut raw, skew) = misaligned(8192);
        let before = v.fixed_requests();
        v.read_at(&mut raw.get_mut()[skew..], 16384).expect("read");
        assert!(raw.get()[skew..] == model[16384..16384 + 8192]);
        assert_eq!(v.fixed_requests() - before, 1, "one READ_FIXED, no RMW");
        // Aligned transfers from aligned buffers never use the pool.
        let mut aligned = AlignedBuf::new(8192);
        let before = v.fixed_requests();
        v.read_at(aligned.get_mut(), 16384).expect("aligned read");
        v.write_at(aligned.get(), 16384).expect("aligned write");
        assert_eq!(v.fixed_requests(), before);
        assert!(no_lease_outstanding());
        v.flush().expect("flush");
        drop(v);
        let on_disk = std::fs::read(&path).expect("read file");
        assert!(on_disk == model, "file contents differ from the model");
    }

    #[test]
    fn direct_tail_read_of_unaligned_file_uses_fixed_buffer() {
        if unavailable() {
            return;
        }
        // The last sector is partial: the aligned span reaches past the end of the file.
        let size = (1 << 20) + 1234;
        let (_dir, path, data) = patterned(5, size);
        let Some(v) = open_direct(&path, true) else {
            return;
        };
        if !registers_here() {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        let mut back = vec![0u8; 3000];
        v.read_at(&mut back, size as u64 - 3000).expect("tail read");
        assert!(back == data[size - 3000..]);
        // A short READ_FIXED up to the end of file, then one that finds the end.
        assert!(v.fixed_requests() > 0);
        assert!(no_lease_outstanding());
    }

    #[test]
    fn direct_fixed_pool_under_many_threads() {
        if unavailable() {
            return;
        }
        // 12 threads, each with its own ring and registered buffer; leases must never leak and
        // bytes must land exactly. Each thread's range starts and ends
        // inside its own sectors (unaligned writes read-modify-write whole sectors, so threads
        // sharing a sector would race by design).
        const THREADS: u64 = 12;
        const CHUNK: usize = 3 * 4096 + 513;
        const STRIDE: usize = 5 * 4096;
        const ROUNDS: u64 = 30;
        let (_dir, path) = fixture(THREADS as usize * STRIDE);
        let Some(v) = open_direct(&path, true) else {
            return;
        };
        if !registers_here() {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let v = &v;
                s.spawn(move || {
                    let at = 100 + t * STRIDE as u64;
                    for r in 0..ROUNDS {
                        let data = pattern(t * 1000 + r, CHUNK);
                        v.write_at(&data, at).expect("write");
                        let mut back = vec![0u8; CHUNK];
                        v.read_at(&mut back, at).expect("read");
                        assert!(back == data, "thread {t} round {r}");
                    }
                    assert!(no_lease_outstanding(), "thread {t} leaked its buffer");
                });
            }
        });
        assert!(v.fixed_requests() > 0, "no registered buffer was ever used");
        assert_eq!(v.fallback_transfers(), 0);
        v.flush().expect("flush");
        drop(v);
        let on_disk = std::fs::read(&path).expect("read file");
        for t in 0..THREADS {
            let at = 100 + t as usize * STRIDE;
            assert!(
                on_disk[at..at + CHUNK] == pattern(t * 1000 + ROUNDS - 1, CHUNK)[..],
                "thread {t} on disk"
            );
        }
    }

    #[test]
    fn direct_fixed_buffer_returned_on_error() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(16384);
        let Some(v) = open_direct(&path, true) else {
            return;
        };
        if !registers_here() {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        // The bounced read hits end of file.
        shrink_and_read_past_eof(&v, &path);
        assert!(v.fixed_requests() > 0);
        assert!(
            no_lease_outstanding(),
            "lease not given back after an error"
        );
    }

    #[test]
    fn no_pool_without_direct_or_when_disabled() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(1 << 20);
        let buffered = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
        let data = pattern(1, 5000);
        buffered.write_at(&data, 123).expect("write");
        let mut back = vec![0u8; 5000];
        buffered.read_at(&mut back, 123).expect("read");
        assert!(back == data);
        assert_eq!(buffered.fixed_requests(), 0);
        // `open` sends every transfer through the ring; flushes are fdatasync calls.
        buffered.flush().expect("flush");
        assert_eq!(buffered.ring_requests.load(Ordering::Relaxed), 2);
        drop(buffered);
        let Some(v) = open_direct(&path, false) else {
            return;
        };
        let data = pattern(2, 7000);
        v.write_at(&data, 8193).expect("write");
        v.read_at(&mut back, 123).expect("read");
        assert!(
            back == pattern(1, 5000),
            "buffered write visible to O_DIRECT"
        );
        let mut back = vec![0u8; 7000];
        v.read_at(&mut back, 8193).expect("read");
        assert!(back == data);
        assert_eq!(v.fixed_requests(), 0);
    }

    #[test]
    fn read_past_eof_is_an_error() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(16384);
        let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
        // The volume's cached size still says 16384.
        shrink_and_read_past_eof(&v, &path);
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

    thread_local! {
        /// Set by a test: this thread may not create a ring (as if the kernel refused).
        static REFUSE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Whether ring creation is refused on this thread (tests only; always `false` otherwise).
    pub(super) fn rings_refused() -> bool {
        REFUSE.with(std::cell::Cell::get)
    }

    #[test]
    fn every_thread_uses_its_own_ring() {
        if unavailable() {
            return;
        }
        // 24 threads at once, each with a transfer in flight through its own ring; the rings
        // stay with their threads, and no transfer falls back to plain system calls.
        const THREADS: u64 = 24;
        const CHUNK: usize = 4096 + 17;
        const ROUNDS: u64 = 40;
        let (_dir, path) = fixture(THREADS as usize * CHUNK);
        let v = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
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
                    assert!(RING.with(|c| c.borrow().as_ref().is_some_and(|r| !r.broken)));
                });
            }
        });
        assert_eq!(v.fallback_transfers(), 0);
        let on_disk = std::fs::read(&path).expect("read file");
        for t in 0..THREADS {
            let at = t as usize * CHUNK;
            assert!(on_disk[at..at + CHUNK] == pattern(t * 1000 + ROUNDS - 1, CHUNK)[..]);
        }
    }

    #[test]
    fn thread_without_a_ring_falls_back_to_system_calls() {
        if unavailable() {
            return;
        }
        let (_dir, path, mut model) = patterned(21, 1 << 20);
        let buffered = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
        let direct = open_direct(&path, true);
        std::thread::scope(|s| {
            s.spawn(|| {
                // This thread cannot have a ring: every transfer goes through pread/pwrite,
                // unaligned O_DIRECT ones through an allocated bounce buffer.
                REFUSE.with(|r| r.set(true));
                let data = pattern(22, 5000);
                buffered.write_at(&data, 777).expect("write");
                model[777..5777].copy_from_slice(&data);
                let mut back = vec![0u8; 5000];
                buffered.read_at(&mut back, 777).expect("read");
                assert!(back == data);
                assert_eq!(buffered.fallback_transfers(), 2);
                if let Some(d) = &direct {
                    let data = pattern(23, 3000);
                    d.write_at(&data, 9000).expect("direct write");
                    model[9000..12_000].copy_from_slice(&data);
                    let mut back = vec![0u8; 3000];
                    d.read_at(&mut back, 9000).expect("direct read");
                    assert!(back == data);
                    assert_eq!(d.fallback_transfers(), 2);
                    assert_eq!(d.fixed_requests(), 0);
                }
                // A refusal is remembered: no new attempt on this thread.
                REFUSE.with(|r| r.set(false));
                buffered.read_at(&mut back, 777).expect("read");
                assert_eq!(buffered.fallback_transfers(), 3);
                assert!(RING.with(|c| c.borrow().is_none()));
            });
        });
        // Another thread gets its ring.
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut back = vec![0u8; 100];
                buffered.read_at(&mut back, 777).expect("read");
                assert!(RING.with(|c| c.borrow().is_some()));
            });
        });
        assert_eq!(buffered.fallback_transfers(), 3);
        buffered.flush().expect("flush");
        drop((buffered, direct));
        assert!(std::fs::read(&path).expect("read file") == model);
    }

    #[test]
    fn registered_only_sends_just_the_bounced_transfers_through_the_ring() {
        if unavailable() {
            return;
        }
        let (_dir, path, mut model) = patterned(31, 1 << 20);
        // As `open_registered_only` opens it.
        let Some(v) = open_direct_with(&path, true, false) else {
            return;
        };
        // Aligned: plain system calls.
        let mut aligned = AlignedBuf::new(8192);
        v.read_at(aligned.get_mut(), 16384).expect("aligned read");
        assert!(aligned.get() == &model[16384..16384 + 8192]);
        aligned.get_mut().copy_from_slice(&pattern(32, 8192));
        v.write_at(aligned.get(), 16384).expect("aligned write");
        model[16384..16384 + 8192].copy_from_slice(aligned.get());
        v.flush().expect("flush");
        assert_eq!(v.ring_requests.load(Ordering::Relaxed), 0);
        // Unaligned and small enough: the registered buffer, through the ring.
        let data = pattern(33, 5000);
        v.write_at(&data, 4097).expect("unaligned write");
        model[4097..9097].copy_from_slice(&data);
        let mut back = vec![0u8; 5000];
        v.read_at(&mut back, 4097).expect("unaligned read");
        assert!(back == data);
        if registers_here() {
            // Read-modify-write (2) and the read (1).
            assert_eq!(v.fixed_requests(), 3);
            assert_eq!(v.ring_requests.load(Ordering::Relaxed), 3);
        } else {
            assert_eq!(v.ring_requests.load(Ordering::Relaxed), 0);
        }
        // Unaligned but larger than the registered buffer: a bounce buffer and system calls.
        let before = v.ring_requests.load(Ordering::Relaxed);
        let big = pattern(34, FIXED_BUF_BYTES + 10);
        v.write_at(&big, 100_001).expect("large unaligned write");
        model[100_001..100_001 + big.len()].copy_from_slice(&big);
        let mut back = vec![0u8; big.len()];
        v.read_at(&mut back, 100_001).expect("large unaligned read");
        assert!(back == big);
        assert_eq!(v.ring_requests.load(Ordering::Relaxed), before);
        assert_eq!(v.fallback_transfers(), 0);
        v.flush().expect("flush");
        drop(v);
        assert!(std::fs::read(&path).expect("read file") == model);
    }
}
