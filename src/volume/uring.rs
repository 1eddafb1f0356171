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
//! # Registered bounce buffers
//!
//! An `O_DIRECT` transfer whose offset, length or buffer address is not aligned goes through an
//! aligned bounce buffer. For volumes opened with `O_DIRECT`, every ring registers a small pool
//! of bounce buffers with the kernel when it is created ([`POOL_BUFS`] of [`POOL_BUF_BYTES`]
//! each, `IORING_REGISTER_BUFFERS`). A bounced transfer whose aligned span fits in one of them
//! leases a free one and goes out as `READ_FIXED` / `WRITE_FIXED`: no allocation, no page faults
//! and no per-request page pinning in the kernel. When the span is larger, every buffer of the
//! ring is leased, or registration was refused (`RLIMIT_MEMLOCK`, `ENOMEM`, `EPERM`), the
//! transfer uses a freshly allocated bounce buffer and plain reads and writes instead. Aligned
//! transfers always use the caller's buffer directly: copying them into a registered buffer would
//! cost more than the pinning it saves.
//!
//! # Buffer lifetime
//!
//! Every request borrows the caller's slice (or a bounce buffer) for the duration of one blocking
//! call, and that call returns only after the request's completion has been reaped, on success
//! and on every error path. The single exception is a failed `io_uring_enter` submission: the
//! kernel then did not consume the SQE, and the ring is marked unusable so that nothing ever
//! submits it later (the reaper always enters with `to_submit = 0`).
//!
//! Registered bounce buffers are allocated once per ring and live exactly as long as the ring:
//! they are never resized, moved (only their owning handles move; the heap memory stays put) or
//! freed while it exists, and the ring is torn down (which unregisters them) before they are
//! freed. A buffer is leased to one request at a time through a lock guard, which is released
//! only after the blocking call that used it has returned, i.e. after its completion was reaped.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Registered bounce buffers per ring of an `O_DIRECT` volume (see the module documentation).
/// At most this many unaligned transfers per ring use registered buffers at once; more fall back
/// to allocated bounce buffers.
const POOL_BUFS: usize = 4;

/// Size of one registered bounce buffer: the largest aligned span of an unaligned `O_DIRECT`
/// transfer that goes through the pool. A multiple of [`DIRECT_ALIGN_BYTES`]. With
/// [`POOL_BUFS`] buffers per ring and [`MAX_RINGS`] rings, a volume locks at most 4 MiB against
/// `RLIMIT_MEMLOCK`.
const POOL_BUF_BYTES: usize = 256 * 1024;

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
            .field("registered_buffers", &self.registered_buffers())
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
        Self::open_with(path.as_ref(), options, count, RING_ENTRIES, true)
    }

    /// [`UringVolume::open`] without registered bounce buffers: unaligned `O_DIRECT` transfers
    /// always allocate their bounce buffer. For measuring what the pool saves; use
    /// [`UringVolume::open`] otherwise.
    ///
    /// # Errors
    /// As [`UringVolume::open`].
    #[doc(hidden)]
    pub fn open_without_buffer_pool(
        path: impl AsRef<Path>,
        options: &FileVolumeOptions,
    ) -> Result<Self> {
        let count = std::thread::available_parallelism()
            .map_or(1, NonZeroUsize::get)
            .min(MAX_RINGS);
        Self::open_with(path.as_ref(), options, count, RING_ENTRIES, false)
    }

    /// [`UringVolume::open`] with `rings` rings of `entries` submission entries each, with
    /// registered bounce buffers if `pool` and the volume is opened with `O_DIRECT`.
    fn open_with(
        path: &Path,
        options: &FileVolumeOptions,
        rings: usize,
        entries: u32,
        pool: bool,
    ) -> Result<Self> {
        let shown = path.display().to_string();
        let super::OpenedFile {
            file,
            meta,
            size,
            canonical: abs,
        } = super::open_file(path, options)?;
        let rings = (0..rings.max(1))
            .map(|_| Ring::new(entries, pool && options.direct))
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

    /// Number of bounce buffers registered with the kernel, over all rings: 0 unless the volume
    /// was opened with `O_DIRECT` and the kernel accepted the registration (see the module
    /// documentation of the io_uring backend).
    #[must_use]
    pub fn registered_buffers(&self) -> usize {
        self.rings.iter().map(|r| r.fixed.bufs.len()).sum()
    }

    /// Requests submitted with a registered buffer (`READ_FIXED` / `WRITE_FIXED`) so far.
    #[cfg(test)]
    fn fixed_requests(&self) -> u64 {
        self.rings
            .iter()
            .map(|r| r.fixed_requests.load(Ordering::Relaxed))
            .sum()
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
    ///
    /// With `fixed = Some(i)`, `buf` lies within registered buffer `i` of `ring`.
    fn read_exact(
        &self,
        ring: &Ring,
        buf: &mut [u8],
        offset: u64,
        need: usize,
        fixed: Option<u16>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = buf.len().min(done + MAX_CHUNK);
            let want = end - done;
            let res = ring
                .run(
                    self.fd(),
                    Op::Read {
                        buf: &mut buf[done..end],
                        offset: at,
                        fixed,
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
    ///
    /// With `fixed = Some(i)`, `buf` lies within registered buffer `i` of `ring`.
    fn write_all(&self, ring: &Ring, buf: &[u8], offset: u64, fixed: Option<u16>) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let end = buf.len().min(done + MAX_CHUNK);
            let want = end - done;
            let res = ring
                .run(
                    self.fd(),
                    Op::Write {
                        buf: &buf[done..end],
                        offset: at,
                        fixed,
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
        let ring = self.ring();
        if self.direct_ok(buf.as_ptr(), offset, buf.len()) {
            return self.read_exact(ring, buf, offset, buf.len(), None);
        }
        let start = align_down(offset);
        let end = align_up(offset + buf.len() as u64);
        let len = usize::try_from(end - start).map_err(|_| Error::invalid("read", "too large"))?;
        // A registered buffer when one is free and large enough, else an allocated one. The
        // lease is given back when it goes out of scope, after the read's completion was reaped.
        let mut lease = ring.fixed.lease(len);
        let mut owned;
        let (bounce, fixed) = match lease.as_mut() {
            Some(lease) => lease.get_mut(len),
            None => {
                owned = AlignedBuf::new(len);
                (owned.get_mut(), None)
            }
        };
        let skip = usize::try_from(offset - start).unwrap_or(0);
        // The aligned tail may lie past the end of a file whose size is not aligned.
        self.read_exact(ring, bounce, start, skip + buf.len(), fixed)?;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        let ring = self.ring();
        if self.direct_ok(buf.as_ptr(), offset, buf.len()) {
            return self.write_all(ring, buf, offset, None);
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
        // As in `read_at`: the lease outlives both requests that use the buffer.
        let mut lease = ring.fixed.lease(len);
        let mut owned;
        let (bounce, fixed) = match lease.as_mut() {
            Some(lease) => lease.get_mut(len),
            None => {
                owned = AlignedBuf::new(len);
                (owned.get_mut(), None)
            }
        };
        if start != offset || end != offset + buf.len() as u64 {
            // Read-modify-write of the partial sectors at either edge.
            self.read_exact(ring, bounce, start, len, fixed)?;
        }
        let skip = usize::try_from(offset - start).unwrap_or(0);
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_all(ring, bounce, start, fixed)
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
/// return before the kernel is done with them. `fixed: Some(i)` means that `buf` lies within
/// registered buffer `i` of the ring that runs the request (`READ_FIXED` / `WRITE_FIXED`).
enum Op<'b> {
    Read {
        buf: &'b mut [u8],
        offset: u64,
        fixed: Option<u16>,
    },
    Write {
        buf: &'b [u8],
        offset: u64,
        fixed: Option<u16>,
    },
    Fsync,
}

/// Bounce buffers registered with one ring for unaligned `O_DIRECT` transfers (see the module
/// documentation). Element `i` is the ring's registered buffer `i`; empty when the volume is not
/// `O_DIRECT` or the kernel refused the registration.
struct FixedPool {
    /// Each buffer behind its own lock: a held guard is the lease of that buffer. Every buffer is
    /// [`POOL_BUF_BYTES`] long and is never resized (its heap memory never moves).
    bufs: Vec<Mutex<AlignedBuf>>,
}

/// Exclusive use of one registered buffer; dropping it gives the buffer back to its pool.
struct FixedLease<'p> {
    index: u16,
    buf: MutexGuard<'p, AlignedBuf>,
}

impl FixedLease<'_> {
    /// The first `len` bytes of the buffer and its registered index (`len` is at most
    /// [`POOL_BUF_BYTES`], checked by [`FixedPool::lease`]).
    fn get_mut(&mut self, len: usize) -> (&mut [u8], Option<u16>) {
        let index = self.index;
        let bytes = self.buf.get_mut();
        let len = len.min(bytes.len());
        (&mut bytes[..len], Some(index))
    }
}

impl FixedPool {
    /// A pool without buffers: every bounced transfer allocates.
    fn empty() -> Self {
        FixedPool { bufs: Vec::new() }
    }

    /// Allocate [`POOL_BUFS`] buffers and register them with `uring`; an empty pool when the
    /// kernel refuses (`RLIMIT_MEMLOCK`, `ENOMEM`, `EPERM`, no support), which only costs speed.
    ///
    /// The caller must keep the returned pool alive, unchanged, for as long as `uring` exists
    /// (the ring declares it after `uring`, so the ring is dropped first).
    fn register(uring: &IoUring) -> Self {
        let mut bufs: Vec<AlignedBuf> = (0..POOL_BUFS)
            .map(|_| AlignedBuf::new(POOL_BUF_BYTES))
            .collect();
        let iovecs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| {
                let bytes = b.get_mut();
                libc::iovec {
                    iov_base: bytes.as_mut_ptr().cast(),
                    iov_len: bytes.len(),
                }
            })
            .collect();
        // SAFETY: every iovec describes the whole usable part of one live `AlignedBuf`. The
        // buffers move into the returned pool, which the ring keeps, unchanged, until after the
        // io_uring instance (and with it the registration) is destroyed: `Ring` declares `fixed`
        // after `uring`, buffers are never resized or replaced (moving an `AlignedBuf` moves only
        // its handle, not the heap memory the iovec points at), and the pool is never taken out
        // of the ring. The kernel touches a buffer only while a request names it, and such a
        // request holds the buffer's lease for its whole life (see `FixedLease`).
        match unsafe { uring.submitter().register_buffers(&iovecs) } {
            Ok(()) => FixedPool {
                bufs: bufs.into_iter().map(Mutex::new).collect(),
            },
            Err(_) => FixedPool::empty(),
        }
    }

    /// Lease a free buffer for an aligned span of `len` bytes; `None` when `len` does not fit in
    /// one buffer or every buffer is in use.
    fn lease(&self, len: usize) -> Option<FixedLease<'_>> {
        if len > POOL_BUF_BYTES {
            return None;
        }
        self.bufs.iter().enumerate().find_map(|(i, b)| {
            Some(FixedLease {
                index: u16::try_from(i).ok()?,
                buf: b.try_lock()?,
            })
        })
    }
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
    /// Registered bounce buffers. Declared after `uring` so that the ring, and with it the
    /// registration, is destroyed before the buffers are freed.
    fixed: FixedPool,
    /// Requests submitted with a registered buffer.
    fixed_requests: AtomicU64,
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
    /// A ring with `entries` submission entries, with registered bounce buffers if `pool`.
    fn new(entries: u32, pool: bool) -> io::Result<Self> {
        let uring = IoUring::new(entries)?;
        let max_in_flight = uring.params().cq_entries() as usize;
        let fixed = if pool {
            FixedPool::register(&uring)
        } else {
            FixedPool::empty()
        };
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
            fixed,
            fixed_requests: AtomicU64::new(0),
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
            Op::Read { buf, offset, fixed } => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let ptr = buf.as_mut_ptr();
                match fixed {
                    Some(index) => {
                        self.fixed_requests.fetch_add(1, Ordering::Relaxed);
                        opcode::ReadFixed::new(fd, ptr, len, index)
                            .offset(offset)
                            .build()
                    }
                    None => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                }
            }
            Op::Write { buf, offset, fixed } => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let ptr = buf.as_ptr();
                match fixed {
                    Some(index) => {
                        self.fixed_requests.fetch_add(1, Ordering::Relaxed);
                        opcode::WriteFixed::new(fd, ptr, len, index)
                            .offset(offset)
                            .build()
                    }
                    None => opcode::Write::new(fd, ptr, len).offset(offset).build(),
                }
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
            // is borrowed. A fixed-buffer entry names a buffer registered with this very ring
            // (the caller leased it from `self.fixed` and holds the lease beyond this call); the
            // kernel checks that the address range lies inside that registered buffer. This function returns only after `wait` has reaped the completion of
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
        let v =
            UringVolume::open_with(&path, &FileVolumeOptions::default(), 1, 2, true).expect("open");
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

    /// Open `path` with `O_DIRECT` and `rings` rings (with or without the registered pool);
    /// `None` (after a message) when the file system refuses `O_DIRECT`.
    fn open_direct(path: &Path, rings: usize, pool: bool) -> Option<UringVolume> {
        let opts = FileVolumeOptions {
            direct: true,
            read_only: false,
        };
        match UringVolume::open_with(path, &opts, rings, RING_ENTRIES, pool) {
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

    /// Every registered buffer of every ring is free (no lease leaked).
    fn all_buffers_free(v: &UringVolume) -> bool {
        v.rings
            .iter()
            .all(|r| r.fixed.bufs.iter().all(|b| b.try_lock().is_some()))
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
        let (_dir, path) = fixture(0);
        let mut model = pattern(77, SIZE);
        std::fs::write(&path, &model).expect("fill");
        let Some(v) = open_direct(&path, 1, true) else {
            return;
        };
        if v.registered_buffers() == 0 {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        assert_eq!(v.registered_buffers(), POOL_BUFS);
        let edge = POOL_BUF_BYTES as u64;
        // (offset, length, whether the aligned span fits in one registered buffer)
        let cases: [(u64, usize, bool); 10] = [
            (1, 100, true),                                      // file start
            (0, 5000, true),                                     // aligned offset, odd length
            (4095, 2, true),                                     // straddles a sector boundary
            (700_001, 10_000, true),                             // middle
            (8191, 250_000, true),                               // just below the buffer size
            (4097, POOL_BUF_BYTES - 2, true),                    // span exactly one buffer
            (4097, POOL_BUF_BYTES, false),                       // span one sector more
            (12_345, 3 * POOL_BUF_BYTES + 7, false),             // well above
            (SIZE as u64 - 777, 777, true),                      // file end
            (SIZE as u64 - edge - 1, POOL_BUF_BYTES + 1, false), // tail, above the buffer size
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
        assert!(all_buffers_free(&v));
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
        let (_dir, path) = fixture(0);
        let data = pattern(5, size);
        std::fs::write(&path, &data).expect("fill");
        let Some(v) = open_direct(&path, 1, true) else {
            return;
        };
        if v.registered_buffers() == 0 {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        let mut back = vec![0u8; 3000];
        v.read_at(&mut back, size as u64 - 3000).expect("tail read");
        assert!(back == data[size - 3000..]);
        // A short READ_FIXED up to the end of file, then one that finds the end.
        assert!(v.fixed_requests() > 0);
        assert!(all_buffers_free(&v));
    }

    #[test]
    fn direct_fixed_pool_exhausted_falls_back() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(0);
        let mut model = pattern(3, 1 << 20);
        std::fs::write(&path, &model).expect("fill");
        let Some(v) = open_direct(&path, 1, true) else {
            return;
        };
        if v.registered_buffers() == 0 {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        // Hold every registered buffer: transfers must still work, without the pool.
        let leases: Vec<_> = (0..POOL_BUFS)
            .map(|_| v.rings[0].fixed.lease(4096).expect("free buffer"))
            .collect();
        assert!(v.rings[0].fixed.lease(4096).is_none());
        let data = pattern(11, 6000);
        v.write_at(&data, 5000).expect("write");
        model[5000..11_000].copy_from_slice(&data);
        let mut back = vec![0u8; 6000];
        v.read_at(&mut back, 5000).expect("read");
        assert!(back == data);
        assert_eq!(v.fixed_requests(), 0, "no fixed request while exhausted");
        drop(leases);
        // Free again: the same transfer takes the pool.
        v.read_at(&mut back, 5000).expect("read");
        assert!(back == data);
        assert_eq!(v.fixed_requests(), 1);
        v.flush().expect("flush");
        drop(v);
        assert!(std::fs::read(&path).expect("read file") == model);
    }

    #[test]
    fn direct_fixed_pool_under_many_threads() {
        if unavailable() {
            return;
        }
        // One ring, so 12 threads compete for its POOL_BUFS buffers; leases must never be
        // shared or leaked, and bytes must land exactly. Each thread's range starts and ends
        // inside its own sectors (unaligned writes read-modify-write whole sectors, so threads
        // sharing a sector would race by design).
        const THREADS: u64 = 12;
        const CHUNK: usize = 3 * 4096 + 513;
        const STRIDE: usize = 5 * 4096;
        const ROUNDS: u64 = 30;
        let (_dir, path) = fixture(THREADS as usize * STRIDE);
        let Some(v) = open_direct(&path, 1, true) else {
            return;
        };
        if v.registered_buffers() == 0 {
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
                });
            }
        });
        assert!(v.fixed_requests() > 0, "the pool was never used");
        assert!(all_buffers_free(&v), "a lease leaked");
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
        let Some(v) = open_direct(&path, 1, true) else {
            return;
        };
        if v.registered_buffers() == 0 {
            eprintln!("the kernel refused to register buffers; skipping");
            return;
        }
        // Shrink the file behind the volume's back: the bounced read hits end of file.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(8192))
            .expect("truncate");
        let mut buf = vec![0u8; 200];
        match v.read_at(&mut buf, 8192 - 100) {
            Err(Error::Io {
                op: "read", source, ..
            }) => assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected an UnexpectedEof I/O error, got {other:?}"),
        }
        assert!(v.fixed_requests() > 0);
        assert!(all_buffers_free(&v), "lease not given back after an error");
    }

    #[test]
    fn no_pool_without_direct_or_when_disabled() {
        if unavailable() {
            return;
        }
        let (_dir, path) = fixture(1 << 20);
        let buffered = UringVolume::open(&path, &FileVolumeOptions::default()).expect("open");
        assert_eq!(buffered.registered_buffers(), 0);
        let data = pattern(1, 5000);
        buffered.write_at(&data, 123).expect("write");
        let mut back = vec![0u8; 5000];
        buffered.read_at(&mut back, 123).expect("read");
        assert!(back == data);
        assert_eq!(buffered.fixed_requests(), 0);
        drop(buffered);
        let Some(v) = open_direct(&path, 2, false) else {
            return;
        };
        assert_eq!(v.registered_buffers(), 0);
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
