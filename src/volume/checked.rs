//! A volume that latches its first I/O failure.
//!
//! Why latch: after a failed `fdatasync` the kernel may already have marked the pages it could
//! not write as clean (or dropped them), so a later flush can return `Ok` without the data ever
//! reaching the medium, and reads may return bytes the medium does not hold. A failed write
//! leaves its range in an unknown state (partly written, or written only to the page cache).
//! The only safe answer is to stop using the volume until it is reopened and recovered; the
//! same reasoning applies to ENOSPC, which a thin-provisioned device may report for a write it
//! half performed. Reads are different: a failed read changes nothing on the medium, and the
//! engine retries reads of source grains, so by default a failed read does not latch (redb's
//! `CheckedBackend` latches reads too, because its caches and allocator may already have acted
//! on the read; [`CheckedVolume::latch_reads`] asks for that behaviour).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use super::{Volume, VolumeInfo};
use crate::{Error, Result};

/// The first failure a [`CheckedVolume`] latched: enough to repeat it on every later call as
/// [`Error::PoisonedIo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstFailure {
    /// What the failed call named as its target (usually the volume's path).
    pub target: String,
    /// The failed operation as the inner volume named it (`write`, `fdatasync`, ...).
    pub op: &'static str,
    /// Its byte offset, 0 where none applies.
    pub offset: u64,
    /// The operating system's error kind.
    pub kind: std::io::ErrorKind,
    /// The raw OS error number, when the error had one (`Some(5)` for EIO).
    pub raw_os_error: Option<i32>,
    /// The error's message (the [`std::io::Error`]'s own, without the operation and target).
    pub message: String,
}

impl FirstFailure {
    /// The failure an error reports, when it is one that latches: [`Error::Io`], or an
    /// [`Error::PoisonedIo`] from a volume further down that latched already. Errors that never
    /// reached the device ([`Error::OutOfRange`], [`Error::Misaligned`], [`Error::Invalid`]) are
    /// the caller's mistakes, not the device's, and return `None`.
    #[must_use]
    pub fn of(e: &Error) -> Option<FirstFailure> {
        match e {
            Error::Io {
                op,
                target,
                offset,
                source,
            }
            | Error::PoisonedIo {
                target,
                op,
                offset,
                source,
            } => Some(FirstFailure {
                target: target.clone(),
                op,
                offset: *offset,
                kind: source.kind(),
                raw_os_error: source.raw_os_error(),
                message: source.to_string(),
            }),
            _ => None,
        }
    }

    /// The failure as a fresh [`std::io::Error`]: the same OS error when it had a number, else
    /// one of the same kind and message.
    #[must_use]
    pub fn io_error(&self) -> std::io::Error {
        match self.raw_os_error {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::new(self.kind, self.message.clone()),
        }
    }

    /// The error every call after the latch returns.
    #[must_use]
    pub fn to_error(&self) -> Error {
        Error::PoisonedIo {
            target: self.target.clone(),
            op: self.op,
            offset: self.offset,
            source: self.io_error(),
        }
    }
}

/// A [`Volume`] decorator that latches the first I/O failure of a write or a flush: every later
/// call (reads included) fails fast with [`Error::PoisonedIo`], which keeps the first error's
/// operation, offset, [`std::io::ErrorKind`], OS error number and message, without reaching the
/// inner volume. Reopening the device (a new `CheckedVolume`) is the only way back.
///
/// What latches, by default:
/// - a failed [`Volume::flush`]: always;
/// - a failed [`Volume::write_at`]: yes ([`CheckedVolume::latch_writes`] turns it off, for a
///   caller that retries writes itself);
/// - a failed [`Volume::read_at`]: no ([`CheckedVolume::latch_reads`] turns it on).
///
/// Only device failures latch ([`Error::Io`], or [`Error::PoisonedIo`] from a checked volume
/// further down); a request refused before it reached the device ([`Error::OutOfRange`],
/// [`Error::Misaligned`], [`Error::Invalid`]) is returned as it is and changes nothing. The call
/// that fails first returns its own error unchanged; calls already in flight in other threads
/// at that moment finish with their own results.
///
/// Cost while healthy: one atomic load per call.
///
/// ```
/// use timezero::{CheckedVolume, MemVolume, Volume};
///
/// let v = CheckedVolume::new(MemVolume::new("disk", 4096));
/// v.write_at(0, b"hello")?;
/// v.flush()?;
/// let mut buf = [0u8; 5];
/// v.read_at(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// assert!(!v.is_failed());
/// assert!(v.first_error().is_none());
/// # Ok::<(), timezero::Error>(())
/// ```
#[derive(Debug)]
pub struct CheckedVolume<V> {
    inner: V,
    /// Set (after `first`) when a failure latched; the only thing the hot path reads.
    failed: AtomicBool,
    first: OnceLock<FirstFailure>,
    latch_reads: bool,
    latch_writes: bool,
    serve_reads: bool,
}

impl<V: Volume> CheckedVolume<V> {
    /// Wrap `inner` (healthy).
    #[must_use]
    pub fn new(inner: V) -> Self {
        CheckedVolume {
            inner,
            failed: AtomicBool::new(false),
            first: OnceLock::new(),
            latch_reads: false,
            latch_writes: true,
            serve_reads: false,
        }
    }

    /// Whether a failed read latches too. Default = false.
    #[must_use]
    pub fn latch_reads(mut self, on: bool) -> Self {
        self.latch_reads = on;
        self
    }

    /// Whether a failed write latches. Default = true; a caller that retries failed writes
    /// itself and treats only a failed flush as final turns it off.
    #[must_use]
    pub fn latch_writes(mut self, on: bool) -> Self {
        self.latch_writes = on;
        self
    }

    /// Whether reads still reach the inner volume after the latch. Default = false: a volume
    /// whose flush failed may serve bytes its medium does not hold.
    #[must_use]
    pub fn serve_reads_when_failed(mut self, on: bool) -> Self {
        self.serve_reads = on;
        self
    }

    /// True once a failure latched.
    #[must_use]
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The failure that latched, if any.
    #[must_use]
    pub fn first_error(&self) -> Option<&FirstFailure> {
        if self.is_failed() {
            self.first.get()
        } else {
            None
        }
    }

    /// The wrapped volume.
    #[must_use]
    pub fn inner(&self) -> &V {
        &self.inner
    }

    /// Unwrap the volume (the latch is forgotten).
    #[must_use]
    pub fn into_inner(self) -> V {
        self.inner
    }

    /// The error for a call made after the latch.
    #[cold]
    fn poisoned(&self) -> Error {
        match self.first.get() {
            Some(f) => f.to_error(),
            // `first` is set before `failed`, and `failed` was seen set.
            None => Error::Poisoned {
                target: self.inner.info().locator,
            },
        }
    }

    /// Latch `r`'s failure when it is a device failure.
    #[cold]
    fn latch(&self, e: &Error) {
        if let Some(f) = FirstFailure::of(e) {
            // The first of concurrent failures wins; the others keep their own errors.
            let _ = self.first.set(f);
            self.failed.store(true, Ordering::Release);
        }
    }

    #[inline]
    fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(self.poisoned());
        }
        Ok(())
    }
}

impl<V: Volume> Volume for CheckedVolume<V> {
    fn info(&self) -> VolumeInfo {
        self.inner.info()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if !self.serve_reads {
            self.check()?;
        }
        let r = self.inner.read_at(offset, buf);
        if self.latch_reads {
            if let Err(e) = &r {
                self.latch(e);
            }
        }
        r
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check()?;
        let r = self.inner.write_at(offset, buf);
        if self.latch_writes {
            if let Err(e) = &r {
                self.latch(e);
            }
        }
        r
    }

    fn flush(&self) -> Result<()> {
        self.check()?;
        let r = self.inner.flush();
        if let Err(e) = &r {
            self.latch(e);
        }
        r
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Result<()> {
        if !self.serve_reads {
            self.check()?;
        }
        let r = self.inner.read_many(reqs);
        if self.latch_reads {
            if let Err(e) = &r {
                self.latch(e);
            }
        }
        r
    }

    fn write_many(&self, reqs: &[(u64, &[u8])]) -> Result<()> {
        self.check()?;
        let r = self.inner.write_many(reqs);
        if self.latch_writes {
            if let Err(e) = &r {
                self.latch(e);
            }
        }
        r
    }

    fn copy_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.copy_fd()
    }

    /// Refused once a failure is latched, as writes are. A failed copy does not latch: the
    /// kernel's error does not say whether the read or the write failed, so the caller copies
    /// the range again through memory, and a write that fails there latches as writes do.
    fn copy_from(&self, src: &dyn Volume, src_offset: u64, offset: u64, len: u64) -> Result<bool> {
        self.check()?;
        self.inner.copy_from(src, src_offset, offset, len)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::volume::MemVolume;
    use parking_lot::Mutex;
    use std::io::ErrorKind;

    /// A memory volume whose next read, write or flush fails with a chosen error.
    #[derive(Debug, Default)]
    struct Failing {
        mem: Option<MemVolume>,
        fail_read: Mutex<Option<std::io::Error>>,
        fail_write: Mutex<Option<std::io::Error>>,
        fail_flush: Mutex<Option<std::io::Error>>,
        calls: Mutex<u64>,
    }

    impl Failing {
        fn new() -> Self {
            Failing {
                mem: Some(MemVolume::new("f", 8192)),
                ..Failing::default()
            }
        }
        fn mem(&self) -> &MemVolume {
            self.mem.as_ref().unwrap()
        }
        fn err(op: &'static str, off: u64, e: std::io::Error) -> Error {
            Error::io(op, "mem:f", off, e)
        }
    }

    impl Volume for Failing {
        fn info(&self) -> VolumeInfo {
            self.mem().info()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            *self.calls.lock() += 1;
            if let Some(e) = self.fail_read.lock().take() {
                return Err(Self::err("read", offset, e));
            }
            self.mem().read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
            *self.calls.lock() += 1;
            if let Some(e) = self.fail_write.lock().take() {
                return Err(Self::err("write", offset, e));
            }
            self.mem().write_at(offset, buf)
        }
        fn flush(&self) -> Result<()> {
            *self.calls.lock() += 1;
            if let Some(e) = self.fail_flush.lock().take() {
                return Err(Self::err("fdatasync", 0, e));
            }
            Ok(())
        }
    }

    fn poisoned_parts(e: &Error) -> (&str, &'static str, u64, ErrorKind, Option<i32>, String) {
        match e {
            Error::PoisonedIo {
                target,
                op,
                offset,
                source,
            } => (
                target.as_str(),
                *op,
                *offset,
                source.kind(),
                source.raw_os_error(),
                source.to_string(),
            ),
            other => panic!("expected PoisonedIo, got {other:?}"),
        }
    }

    #[test]
    fn failed_flush_latches_every_later_call_with_the_first_error() {
        let v = CheckedVolume::new(Failing::new());
        v.write_at(100, b"abc").unwrap();
        *v.inner().fail_flush.lock() = Some(std::io::Error::from_raw_os_error(5));
        let first = v.flush().unwrap_err();
        // The failing call returns the inner error itself.
        assert!(
            matches!(
                first,
                Error::Io {
                    op: "fdatasync",
                    ..
                }
            ),
            "{first:?}"
        );
        assert!(v.is_failed());
        let f = v.first_error().unwrap().clone();
        assert_eq!(f.op, "fdatasync");
        assert_eq!(f.raw_os_error, Some(5));
        assert_eq!(f.target, "mem:f");
        let calls = *v.inner().calls.lock();
        // Every later call fails fast, without reaching the inner volume.
        let mut buf = [0u8; 3];
        for e in [
            v.write_at(0, b"xyz").unwrap_err(),
            v.read_at(100, &mut buf).unwrap_err(),
            v.flush().unwrap_err(),
        ] {
            let (target, op, off, kind, raw, msg) = poisoned_parts(&e);
            assert_eq!((target, op, off, raw), ("mem:f", "fdatasync", 0, Some(5)));
            assert_eq!(kind, std::io::Error::from_raw_os_error(5).kind());
            assert_eq!(msg, std::io::Error::from_raw_os_error(5).to_string());
            assert!(e.is_poisoned());
            assert_eq!(e.io_kind(), Some(kind));
            assert!(e.to_string().contains("poisoned"), "{e}");
        }
        assert_eq!(
            *v.inner().calls.lock(),
            calls,
            "a latched call reached the device"
        );
        assert_eq!(buf, [0u8; 3]);
        // Nothing after the latch was written.
        assert_eq!(&v.inner().mem().snapshot()[..3], &[0, 0, 0]);
    }

    #[test]
    fn failed_write_latches_and_keeps_kind_and_message() {
        let v = CheckedVolume::new(Failing::new());
        *v.inner().fail_write.lock() =
            Some(std::io::Error::new(ErrorKind::TimedOut, "device timed out"));
        let e = v.write_at(4096, &[1u8; 10]).unwrap_err();
        assert_eq!(e.io_kind(), Some(ErrorKind::TimedOut));
        let e = v.write_at(0, &[2u8; 10]).unwrap_err();
        let (_, op, off, kind, raw, msg) = poisoned_parts(&e);
        assert_eq!(
            (op, off, kind, raw, msg.as_str()),
            ("write", 4096, ErrorKind::TimedOut, None, "device timed out")
        );
        assert_eq!(
            e.to_string(),
            "mem:f is poisoned by an earlier failed write at offset 4096 (device timed out); \
             reopen it to recover"
        );
        let f = v.first_error().unwrap();
        assert_eq!(f.kind, ErrorKind::TimedOut);
        assert_eq!(f.message, "device timed out");
    }

    #[test]
    fn failed_read_does_not_latch_by_default_but_does_when_asked() {
        let v = CheckedVolume::new(Failing::new());
        *v.inner().fail_read.lock() = Some(std::io::Error::from_raw_os_error(5));
        let mut buf = [0u8; 4];
        assert!(matches!(v.read_at(0, &mut buf), Err(Error::Io { .. })));
        assert!(!v.is_failed());
        v.write_at(0, b"ok!!").unwrap();
        v.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"ok!!");

        let v = CheckedVolume::new(Failing::new()).latch_reads(true);
        *v.inner().fail_read.lock() = Some(std::io::Error::from_raw_os_error(5));
        assert!(matches!(v.read_at(8, &mut buf), Err(Error::Io { .. })));
        assert!(v.is_failed());
        assert_eq!(v.first_error().unwrap().op, "read");
        assert_eq!(v.first_error().unwrap().offset, 8);
        assert!(matches!(
            v.write_at(0, b"x"),
            Err(Error::PoisonedIo { op: "read", .. })
        ));
    }

    #[test]
    fn knobs_keep_writes_retryable_and_reads_served() {
        let v = CheckedVolume::new(Failing::new())
            .latch_writes(false)
            .serve_reads_when_failed(true);
        *v.inner().fail_write.lock() = Some(std::io::Error::from_raw_os_error(5));
        assert!(matches!(v.write_at(0, b"zz"), Err(Error::Io { .. })));
        assert!(
            !v.is_failed(),
            "a failed write latched with latch_writes(false)"
        );
        // The retry reaches the device and succeeds.
        v.write_at(0, b"zz").unwrap();
        *v.inner().fail_flush.lock() = Some(std::io::Error::from_raw_os_error(5));
        assert!(v.flush().is_err());
        assert!(v.is_failed());
        assert!(matches!(v.write_at(0, b"q"), Err(Error::PoisonedIo { .. })));
        // Reads are still served.
        let mut buf = [0u8; 2];
        v.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"zz");
    }

    #[test]
    fn refused_requests_do_not_latch() {
        let v = CheckedVolume::new(MemVolume::new("m", 1024));
        assert!(matches!(
            v.write_at(1020, &[0u8; 10]),
            Err(Error::OutOfRange { .. })
        ));
        let mut buf = [0u8; 10];
        assert!(matches!(
            v.read_at(u64::MAX - 1, &mut buf),
            Err(Error::OutOfRange { .. })
        ));
        assert!(!v.is_failed());
        v.write_at(0, &[7u8; 10]).unwrap();
        assert_eq!(v.size(), 1024);
        assert_eq!(v.info(), v.inner().info());
        assert_eq!(&v.into_inner().snapshot()[..10], &[7u8; 10]);
    }

    #[test]
    fn nested_checked_volumes_pass_the_first_failure_up() {
        let v = CheckedVolume::new(CheckedVolume::new(Failing::new()));
        *v.inner().inner().fail_flush.lock() = Some(std::io::Error::from_raw_os_error(28));
        assert!(matches!(v.flush(), Err(Error::Io { .. })));
        assert!(v.is_failed() && v.inner().is_failed());
        assert_eq!(v.first_error().unwrap().raw_os_error, Some(28));
        assert_eq!(v.first_error(), v.inner().first_error());
    }
}
