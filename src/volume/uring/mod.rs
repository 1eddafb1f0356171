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
//! thread touches; the descriptor travels in each entry). A single transfer is one request in
//! flight: push one entry, `io_uring_enter(to_submit = 1, min_complete = 1)`,
//! pop its completion. There is no lock, no hand-over between threads and no dispatch map. The
//! ring is created with `IORING_SETUP_SINGLE_ISSUER` and `IORING_SETUP_DEFER_TASKRUN` where the
//! kernel accepts them (completion work then runs in the submitting thread's own
//! `io_uring_enter`), and without them otherwise.
//!
//! An earlier design shared a pool of rings between threads (a submission mutex and one thread
//! at a time reaping for the others); with 8 threads on 2 rings, 4 KiB `O_DIRECT` reads cost
//! 1.39x a plain `pread` because of the wake-ups between threads (docs/benchmarks.md).
//!
//! **Batches.** [`Volume::read_many`] and [`Volume::write_many`] put up to
//! [`crate::limits::VOLUME_BATCH_DEPTH_MAX`] requests (the ring's entries) in the submission
//! queue and submit them with one `io_uring_enter`, then wait until every one has completed;
//! short transfers are sent again for their rest, and larger batches go out in groups. The
//! thread still blocks for the whole batch, so the ring again holds nothing between calls. Batches
//! use the ring whatever the volume was opened for (also [`UringVolume::open_registered_only`]):
//! a batch saves system calls where a single synchronous request could not. The caller's buffers
//! are used directly; a batch with an unaligned `O_DIRECT` request goes one request at a time.
//!
//! **Flushes** call `fdatasync(2)` directly: the kernel runs an io_uring fsync in a worker
//! thread, which only adds a hand-over for a caller that blocks on it anyway.
//!
//! **Fallback.** When a thread cannot create its ring (the kernel refuses: too many rings,
//! memory limits), that thread's transfers use `pread`/`pwrite` on the same descriptor from then
//! on, with the same bounce handling as [`super::FileVolume`]. A ring that became unusable (an
//! entry the kernel never consumed, see `ring`) is dropped and the thread creates a new one on
//! its next transfer.
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
//! # Layout
//!
//! This file is the safe part of the backend: opening, the probing policy, the thread-local
//! slot that holds each thread's ring, the [`Volume`] implementation, and the choice for each
//! transfer between the caller's buffer, the registered bounce buffer, an allocated bounce
//! buffer and plain system calls. Everything that hands memory to the kernel lives in `ring`
//! (the one module allowed `unsafe`, see docs/unsafe.md): the ring wrapper, one-request-at-a-time
//! submission, and the registered buffer, together with the rules that keep every buffer alive
//! until the kernel is done with it.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use self::ring::{LocalRing, Op, FIXED_BUF_BYTES, RING_ENTRIES};
use super::aligned::{align_down, align_up, DIRECT_ALIGN_BYTES};
use super::{check_range, FileVolumeOptions, Volume, VolumeInfo};
use crate::ids::{Generation, VolumeId};
use crate::{Error, Result};

// Every `unsafe` block of the backend is in `ring` (see docs/unsafe.md).
#[allow(unsafe_code)]
mod ring;
#[cfg(test)]
mod tests;

/// Largest transfer handed to one SQE. A multiple of [`DIRECT_ALIGN_BYTES`] so that the pieces
/// of an aligned `O_DIRECT` transfer stay aligned, and below `u32::MAX` (the SQE length field).
const MAX_CHUNK: usize = 1 << 30;

/// The `op` of errors raised while opening a volume whose rings cannot work at all.
const SETUP_OP: &str = "io_uring_setup";

/// Whether this process may use io_uring for file I/O.
///
/// Creates a small ring, checks that the kernel supports the read, write, fixed-buffer and no-op
/// opcodes, and runs a no-op through it. The answer is computed once per process and cached.
/// `false` when the kernel is too old, io_uring is disabled (`kernel.io_uring_disabled`), or a
/// seccomp filter refuses the system calls (`ENOSYS`, `EPERM`); callers then use
/// [`super::FileVolume`] instead ([`crate::open_file_volume`] with [`crate::Backend::Auto`]
/// makes this choice).
#[must_use]
pub fn uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| ring::probe().is_ok())
}

/// Whether `e` is the kernel refusing io_uring for a volume (as opposed to a problem with the
/// file itself); [`super::open_best`] falls back to the file backend on these.
pub(super) fn is_setup_error(e: &Error) -> bool {
    matches!(e, Error::Io { op, .. } if *op == SETUP_OP)
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

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether a transfer can go to the descriptor as is (always, unless `O_DIRECT`).
    fn direct_ok(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        !self.direct
            || (offset.is_multiple_of(DIRECT_ALIGN_BYTES as u64)
                && len.is_multiple_of(DIRECT_ALIGN_BYTES)
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

/// Where one request of a batch stands: bytes done, and its error once it failed.
struct Progress {
    done: usize,
    failed: Option<Error>,
}

impl UringVolume {
    /// Whether every request of a batch can go to the descriptor as is (no bounce buffer).
    fn batch_direct_ok(&self, reqs: impl Iterator<Item = (u64, *const u8, usize)>) -> bool {
        !self.direct || reqs.into_iter().all(|(o, p, l)| self.direct_ok(p, o, l))
    }

    /// Interpret the completion `res` of the piece of request `i` that started at `at` and
    /// asked for `want` bytes: count the bytes done, or record the request's error (a read that
    /// meets the end of the file and a write that accepts nothing are errors too; an
    /// interrupted piece is sent again).
    fn settle(
        &self,
        p: &mut Progress,
        op: &'static str,
        at: u64,
        want: usize,
        len: usize,
        res: i32,
    ) {
        match transferred(res, want) {
            Ok(0) if op == "read" => {
                p.failed = Some(Error::io(op, self.shown(), at, eof(p.done, len)));
            }
            Ok(0) => {
                let e = io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("write accepted no bytes of {want} ({len}-byte request)"),
                );
                p.failed = Some(Error::io(op, self.shown(), at, e));
            }
            Ok(n) => p.done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => p.failed = Some(Error::io(op, self.shown(), at, e)),
        }
    }

    /// The first error of a batch, in the order of its requests.
    fn first_failure(progress: &mut [Progress]) -> Option<Error> {
        progress.iter_mut().find_map(|p| p.failed.take())
    }

    /// Read a batch of aligned requests through `ring`, [`RING_ENTRIES`] at a time with one
    /// `io_uring_enter` each; short reads are sent again for their rest. Stops at the first
    /// round with a failed request, once that round's requests have all completed.
    fn read_batch(&self, ring: &mut LocalRing, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        let mut progress: Vec<Progress> = reqs
            .iter()
            .map(|_| Progress {
                done: 0,
                failed: None,
            })
            .collect();
        loop {
            // (request, offset, length) of every piece still to transfer, and its op.
            let mut pieces = Vec::new();
            let mut ops = Vec::new();
            for (i, ((offset, buf), p)) in reqs.iter_mut().zip(&progress).enumerate() {
                if p.done < buf.len() {
                    let end = buf.len().min(p.done + MAX_CHUNK);
                    let at = *offset + p.done as u64;
                    pieces.push((i, at, end - p.done, buf.len()));
                    ops.push(Op::Read {
                        buf: &mut buf[p.done..end],
                        offset: at,
                        fixed: false,
                    });
                }
            }
            if ops.is_empty() {
                return Ok(());
            }
            for (ops, pieces) in ops
                .chunks_mut(RING_ENTRIES as usize)
                .zip(pieces.chunks(RING_ENTRIES as usize))
            {
                for _ in pieces {
                    self.count_request(false);
                }
                let results = ring
                    .run_many(self.fd(), ops)
                    .map_err(|e| Error::io("read", self.shown(), pieces[0].1, e))?;
                for (&(i, at, want, len), res) in pieces.iter().zip(results) {
                    self.settle(&mut progress[i], "read", at, want, len, res);
                }
                if let Some(e) = Self::first_failure(&mut progress) {
                    return Err(e);
                }
            }
        }
    }

    /// Write a batch of aligned requests through `ring`, as [`UringVolume::read_batch`] reads.
    fn write_batch(&self, ring: &mut LocalRing, reqs: &[(u64, &[u8])]) -> Result<()> {
        let mut progress: Vec<Progress> = reqs
            .iter()
            .map(|_| Progress {
                done: 0,
                failed: None,
            })
            .collect();
        loop {
            let mut pieces = Vec::new();
            let mut ops = Vec::new();
            for (i, ((offset, buf), p)) in reqs.iter().zip(&progress).enumerate() {
                if p.done < buf.len() {
                    let end = buf.len().min(p.done + MAX_CHUNK);
                    let at = *offset + p.done as u64;
                    pieces.push((i, at, end - p.done, buf.len()));
                    ops.push(Op::Write {
                        buf: &buf[p.done..end],
                        offset: at,
                        fixed: false,
                    });
                }
            }
            if ops.is_empty() {
                return Ok(());
            }
            for (ops, pieces) in ops
                .chunks_mut(RING_ENTRIES as usize)
                .zip(pieces.chunks(RING_ENTRIES as usize))
            {
                for _ in pieces {
                    self.count_request(false);
                }
                let results = ring
                    .run_many(self.fd(), ops)
                    .map_err(|e| Error::io("write", self.shown(), pieces[0].1, e))?;
                for (&(i, at, want, len), res) in pieces.iter().zip(results) {
                    self.settle(&mut progress[i], "write", at, want, len, res);
                }
                if let Some(e) = Self::first_failure(&mut progress) {
                    return Err(e);
                }
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

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        with_ring(|ring| {
            self.count_fallback(ring.is_none());
            self.read_on(ring, buf, offset)
        })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size, "volume")?;
        with_ring(|ring| {
            self.count_fallback(ring.is_none());
            self.write_on(ring, buf, offset)
        })
    }

    /// Several requests per `io_uring_enter` (up to
    /// [`VOLUME_BATCH_DEPTH_MAX`](crate::limits::VOLUME_BATCH_DEPTH_MAX) in flight), whatever
    /// the volume was opened for ([`UringVolume::open_registered_only`] included): batches are
    /// where a ring saves system calls. A batch with an unaligned `O_DIRECT` request, or a
    /// thread without a ring, transfers one request at a time.
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        for (offset, buf) in reqs.iter() {
            check_range(*offset, buf.len() as u64, self.size, "volume")?;
        }
        let aligned = self.batch_direct_ok(reqs.iter().map(|(o, b)| (*o, b.as_ptr(), b.len())));
        with_ring(|ring| match ring {
            Some(r) if aligned && reqs.len() > 1 => self.read_batch(r, reqs),
            mut ring => {
                self.count_fallback(ring.is_none());
                for (offset, buf) in reqs.iter_mut() {
                    self.read_on(ring.as_deref_mut(), buf, *offset)?;
                }
                Ok(())
            }
        })
    }

    /// As [`UringVolume::read_many`], for writes.
    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
        for (offset, buf) in reqs {
            check_range(*offset, buf.len() as u64, self.size, "volume")?;
        }
        let aligned = self.batch_direct_ok(reqs.iter().map(|(o, b)| (*o, b.as_ptr(), b.len())));
        with_ring(|ring| match ring {
            Some(r) if aligned && reqs.len() > 1 => self.write_batch(r, reqs),
            mut ring => {
                self.count_fallback(ring.is_none());
                for (offset, buf) in reqs {
                    self.write_on(ring.as_deref_mut(), buf, *offset)?;
                }
                Ok(())
            }
        })
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", self.shown(), 0, e))
    }

    fn copy_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        (!self.direct).then(|| self.file.as_fd())
    }

    /// As [`super::FileVolume`]'s: `copy_file_range(2)` between buffered files.
    fn copy_from(&self, src: &dyn Volume, src_offset: u64, offset: u64, len: u64) -> Result<bool> {
        super::check_range(offset, len, self.size, "volume")?;
        if self.direct {
            return Ok(false);
        }
        super::file::kernel_copy(src, src_offset, &self.file, offset, len, &self.shown())
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
/// case the caller uses plain system calls. A ring that `f` left broken is discarded.
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
        if slot.as_ref().is_some_and(LocalRing::is_broken) {
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
