//! Everything in the io_uring backend that needs `unsafe`: the per-thread ring, submission of
//! one request or one batch at a time, and the registered bounce buffer. Nothing outside this file can make
//! the kernel touch memory; docs/unsafe.md gives the argument block by block.
//!
//! # Buffer lifetime
//!
//! Every request borrows the caller's slice (or a bounce buffer) for the duration of one
//! blocking [`LocalRing::run`] (or, in a batch, [`LocalRing::run_many`]), which returns only
//! after the completion of every request it submitted has been popped, on success and on every
//! error path. The single exception is an `io_uring_enter` that fails without consuming the
//! entries left (and with nothing of the call still in flight): the kernel then never saw the request, the ring is marked
//! broken, [`LocalRing::run`] refuses to submit on it again, and the thread's slot discards it
//! (closing it, so that nothing ever submits the stale entry); the thread gets a new ring later.
//!
//! A thread's registered buffer lives exactly as long as its ring: it is never resized or freed
//! while the ring exists, and the ring is torn down (which unregisters it) before it is freed.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use io_uring::{opcode, types, IoUring, Probe};

use crate::volume::aligned::AlignedBuf;

/// Submission-queue entries of a thread's ring: the most requests of one batch
/// ([`LocalRing::run_many`]) in flight at once; a single transfer uses one.
pub(super) const RING_ENTRIES: u32 = crate::limits::VOLUME_BATCH_DEPTH_MAX as u32;

/// Size of a thread's registered bounce buffer: the largest aligned span of an unaligned
/// `O_DIRECT` transfer that goes through it. A multiple of the `O_DIRECT` alignment; locked
/// against `RLIMIT_MEMLOCK` once per thread that bounces `O_DIRECT` transfers.
pub(super) const FIXED_BUF_BYTES: usize = 256 * 1024;

/// Pause before retrying a transiently refused `io_uring_enter` (`EAGAIN`, `EBUSY`).
const RETRY_PAUSE: Duration = Duration::from_millis(1);

/// Create a small ring, check that the kernel supports the read, write, fixed-buffer and no-op
/// opcodes, and run a no-op through it.
pub(super) fn probe() -> io::Result<()> {
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

/// One request. The buffers are borrowed for as long as [`LocalRing::run`] runs, and `run` does
/// not return before the kernel is done with them. `fixed: true` means that `buf` lies within
/// the ring's registered buffer (index 0), taken out with [`LocalRing::take_fixed`].
pub(super) enum Op<'b> {
    /// Read into `buf` from `offset`.
    Read {
        buf: &'b mut [u8],
        offset: u64,
        fixed: bool,
    },
    /// Write `buf` at `offset`.
    Write {
        buf: &'b [u8],
        offset: u64,
        fixed: bool,
    },
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

/// One thread's io_uring instance (see the module documentation of `volume::uring`).
pub(super) struct LocalRing {
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
    /// A new ring for the calling thread, without registered buffer.
    pub(super) fn new() -> io::Result<Self> {
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
    pub(super) fn fixed_buffer(&mut self) -> bool {
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
            // after `uring`, and a buffer taken out by `take_fixed` is either put back or, should
            // its lease be dropped instead, leaked (`FixedLease` holds it in a `ManuallyDrop`),
            // never freed. The kernel touches the buffer only while a request names it, and
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
    pub(super) fn take_fixed(&mut self, len: usize) -> FixedLease {
        let buf = match &mut self.fixed {
            FixedBuf::Registered(b) => b.take(),
            _ => None,
        }
        .expect("take_fixed: the registered buffer is available");
        FixedLease {
            buf: ManuallyDrop::new(buf),
            len,
        }
    }

    /// Give the registered buffer back.
    pub(super) fn put_fixed(&mut self, lease: FixedLease) {
        if let FixedBuf::Registered(slot) = &mut self.fixed {
            *slot = Some(ManuallyDrop::into_inner(lease.buf));
        }
    }

    /// Submit `op` on `fd` and block until its completion has been popped; returns the raw
    /// completion result (a byte count or a negated errno).
    ///
    /// `Err` only when the request could not be submitted, in which case the kernel never saw
    /// it and the ring is marked broken ([`LocalRing::is_broken`]); a broken ring submits nothing
    /// more.
    pub(super) fn run(&mut self, fd: BorrowedFd<'_>, op: Op<'_>) -> io::Result<i32> {
        if self.broken {
            return Err(io::Error::other("io_uring instance holds an unsent entry"));
        }
        self.token = self.token.wrapping_add(1);
        let token = self.token;
        let fd = types::Fd(fd.as_raw_fd());
        let mut op = op;
        let entry = build_entry(fd, &mut op).user_data(token);
        // SAFETY: the entry points at the buffer of `op`, which is borrowed for the whole of this
        // call (lifetime of `Op`), and at the descriptor behind `fd`, which is borrowed for the
        // whole call too. A fixed-buffer entry names buffer 0 registered with this very ring, and
        // its caller took that buffer out for the duration of the transfer; the kernel checks
        // that the address range lies inside it. The queue is empty on entry (a ring with an
        // unsent entry is broken and refused above), and this function returns only after the
        // entry's completion was popped, or with the entry never consumed by the kernel, in
        // which case the ring is marked broken and submits nothing more.
        if unsafe { self.uring.submission().push(&entry) }.is_err() {
            // Cannot happen: the queue is empty between calls (one request at a time).
            return Err(io::Error::other("io_uring submission queue full"));
        }
        self.wait_for(token)
    }

    /// Submit every op of `ops` on `fd` (at most [`RING_ENTRIES`] of them) with one
    /// `io_uring_enter` and block until the completion of each has been popped; returns the raw
    /// completion result of each, in the order of `ops` (a byte count or a negated errno).
    ///
    /// `Err` only when requests could not be submitted: then none of them is in the kernel any
    /// more (those it took were waited for), and when some never reached it the ring is marked
    /// broken ([`LocalRing::is_broken`]) and submits nothing more.
    pub(super) fn run_many(
        &mut self,
        fd: BorrowedFd<'_>,
        ops: &mut [Op<'_>],
    ) -> io::Result<Vec<i32>> {
        if self.broken {
            return Err(io::Error::other("io_uring instance holds an unsent entry"));
        }
        if ops.len() > RING_ENTRIES as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more requests than the ring's entries",
            ));
        }
        let first = self.token.wrapping_add(1);
        self.token = self.token.wrapping_add(ops.len() as u64);
        let fd = types::Fd(fd.as_raw_fd());
        for (i, op) in ops.iter_mut().enumerate() {
            let entry = build_entry(fd, op).user_data(first.wrapping_add(i as u64));
            // SAFETY: the entry points at the buffer of one op of `ops`, each borrowed (mutably
            // for reads) for the whole of this call, and at the descriptor behind `fd`, borrowed
            // for the whole call too. Fixed-buffer entries name buffer 0 registered with this
            // ring, taken out by their caller for the transfer, and the kernel checks that the
            // range lies inside it. The queue is empty on entry (a ring with an unsent entry is
            // broken and refused above) and holds `RING_ENTRIES`, checked above, so every push
            // succeeds. `wait_for_all` returns only after the completion of every entry the
            // kernel consumed was popped; entries it never consumed leave the ring broken, so
            // that it submits nothing more and is discarded.
            if unsafe { self.uring.submission().push(&entry) }.is_err() {
                // Cannot happen (see above); the entries pushed so far are unsent.
                self.broken = true;
                return Err(io::Error::other("io_uring submission queue full"));
            }
        }
        self.wait_for_all(first, ops.len())
    }

    /// Submit the `count` queued entries with tokens from `first` on and wait until each one the
    /// kernel consumed has completed. `Err` (with the ring marked broken) when entries were left
    /// unconsumed and nothing of the batch is in flight any more.
    fn wait_for_all(&mut self, first: u64, count: usize) -> io::Result<Vec<i32>> {
        let mut results: Vec<Option<i32>> = vec![None; count];
        let mut completed = 0usize;
        loop {
            let waited = self.uring.submit_and_wait(1);
            while let Some(cqe) = self.uring.completion().next() {
                let i = cqe.user_data().wrapping_sub(first);
                // Only this thread submits on this ring, and only this batch is in flight;
                // anything else would be a stale completion to skip.
                if let Some(slot) = usize::try_from(i).ok().and_then(|i| results.get_mut(i)) {
                    if slot.replace(cqe.result()).is_none() {
                        completed += 1;
                    }
                }
            }
            if completed == count {
                return Ok(results.into_iter().map(|r| r.unwrap_or(0)).collect());
            }
            if let Err(e) = waited {
                let unsent = self.uring.submission().len();
                let in_flight = count - unsent - completed;
                if unsent > 0 && in_flight == 0 && !is_transient(&e) {
                    // io_uring_enter consumed none of the rest: they were never seen.
                    self.broken = true;
                    return Err(e);
                }
                if !is_transient(&e) {
                    // Requests of ours are in the kernel and their buffers must not be given
                    // back: keep polling for their completions.
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    /// Submit what is queued and wait until the completion of `token` has been popped; `Err`
    /// (with the ring marked broken) only when `io_uring_enter` consumed nothing.
    fn wait_for(&mut self, token: u64) -> io::Result<i32> {
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

    /// Whether the ring holds an entry the kernel never consumed; it then refuses every
    /// request and is to be discarded (closing it drops the entry).
    pub(super) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether a transfer holds the registered buffer right now (tests only).
    #[cfg(test)]
    pub(super) fn fixed_leased(&self) -> bool {
        matches!(self.fixed, FixedBuf::Registered(None))
    }
}

/// The ring's registered buffer while a transfer uses its first `len` bytes. A lease that is
/// dropped instead of given back leaks the buffer rather than free memory the kernel still has
/// registered; the ring then bounces through allocated buffers.
pub(super) struct FixedLease {
    buf: ManuallyDrop<AlignedBuf>,
    len: usize,
}

impl FixedLease {
    /// The bytes of the transfer.
    pub(super) fn get(&self) -> &[u8] {
        &self.buf.get()[..self.len]
    }
    /// The bytes of the transfer, writable.
    pub(super) fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf.get_mut()[..self.len]
    }
}

/// The submission entry of `op` (without its `user_data`). Lengths are clamped by the callers
/// to `MAX_CHUNK`, which fits in `u32`.
fn build_entry(fd: types::Fd, op: &mut Op<'_>) -> io_uring::squeue::Entry {
    match op {
        Op::Read { buf, offset, fixed } => {
            let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            let ptr = buf.as_mut_ptr();
            if *fixed {
                opcode::ReadFixed::new(fd, ptr, len, 0)
                    .offset(*offset)
                    .build()
            } else {
                opcode::Read::new(fd, ptr, len).offset(*offset).build()
            }
        }
        Op::Write { buf, offset, fixed } => {
            let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            let ptr = buf.as_ptr();
            if *fixed {
                opcode::WriteFixed::new(fd, ptr, len, 0)
                    .offset(*offset)
                    .build()
            } else {
                opcode::Write::new(fd, ptr, len).offset(*offset).build()
            }
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
