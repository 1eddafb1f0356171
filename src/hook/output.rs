//! The pipes of a hook: its stdin document is written and its stdout and stderr are read by one
//! thread that polls the three pipes and a stop pipe. Only the last `HOOK_OUTPUT_BYTES_MAX`
//! bytes of each output are kept (HOOK-09).
//!
//! Why a stop pipe: end of file on stdout comes only when every process holding the write end
//! has closed it, and a process that left the hook's group (`setsid`) may hold it for ever. The
//! runner therefore tells the pump to stop once every process of the group has exited; the
//! pump then reads what is already in the pipes (all a dead process wrote is there) and ends,
//! without waiting for end of file.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{ChildStderr, ChildStdin, ChildStdout};

use rustix::event::{poll, PollFd, PollFlags};

use crate::limits::HOOK_OUTPUT_BYTES_MAX;

/// The last bytes a hook wrote to one of its outputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputTail {
    /// The kept bytes: the last `HOOK_OUTPUT_BYTES_MAX` of the output (or all of it).
    pub bytes: Vec<u8>,
    /// How many bytes the hook wrote in all.
    pub total_bytes: u64,
}

impl OutputTail {
    /// Whether bytes were dropped from the front.
    #[must_use]
    pub fn truncated(&self) -> bool {
        self.total_bytes > self.bytes.len() as u64
    }

    /// The kept bytes as text (invalid UTF-8 replaced).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A bounded tail being filled.
#[derive(Debug, Default)]
struct Tail {
    bytes: VecDeque<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let keep = chunk.len().min(HOOK_OUTPUT_BYTES_MAX);
        self.bytes.extend(&chunk[chunk.len() - keep..]);
        let over = self.bytes.len().saturating_sub(HOOK_OUTPUT_BYTES_MAX);
        self.bytes.drain(..over);
        debug_assert!(self.bytes.len() <= HOOK_OUTPUT_BYTES_MAX);
    }

    fn finish(self) -> OutputTail {
        OutputTail {
            bytes: self.bytes.into(),
            total_bytes: self.total,
        }
    }
}

/// The pipes handed to the pump thread.
pub(super) struct Pipes {
    pub stdin: Option<ChildStdin>,
    pub document: Vec<u8>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    /// Readable (end of file) once the runner drops the other end: time to stop.
    pub stop: OwnedFd,
}

/// Pump the pipes until both outputs reached end of file or the stop pipe was closed, then
/// read what is left without blocking. Returns (stdout, stderr).
pub(super) fn pump(mut p: Pipes) -> (OutputTail, OutputTail) {
    for fd in [
        p.stdin.as_ref().map(AsFd::as_fd),
        p.stdout.as_ref().map(AsFd::as_fd),
        p.stderr.as_ref().map(AsFd::as_fd),
    ]
    .into_iter()
    .flatten()
    {
        // A pipe that stays blocking is still served correctly below (poll says it is ready
        // before every call); non-blocking only lets the final drain stop at "empty".
        let _ = rustix::io::ioctl_fionbio(fd, true);
    }
    let mut out = Tail::default();
    let mut err = Tail::default();
    let mut written = 0;
    if p.document.is_empty() {
        p.stdin = None;
    }
    let mut stopping = false;
    while !stopping && (p.stdout.is_some() || p.stderr.is_some()) {
        let mut fds = Vec::with_capacity(4);
        fds.push(PollFd::new(&p.stop, PollFlags::IN));
        if let Some(s) = &p.stdout {
            fds.push(PollFd::new(s, PollFlags::IN));
        }
        if let Some(s) = &p.stderr {
            fds.push(PollFd::new(s, PollFlags::IN));
        }
        if let Some(s) = &p.stdin {
            fds.push(PollFd::new(s, PollFlags::OUT));
        }
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        let mut i = 0;
        stopping = ready[i];
        i += 1;
        if p.stdout.is_some() {
            if ready[i] && read_some(&mut p.stdout, &mut out) == Read::Done {
                p.stdout = None;
            }
            i += 1;
        }
        if p.stderr.is_some() {
            if ready[i] && read_some(&mut p.stderr, &mut err) == Read::Done {
                p.stderr = None;
            }
            i += 1;
        }
        if p.stdin.is_some() && ready[i] {
            write_some(&mut p.stdin, &p.document, &mut written);
        }
    }
    // Whatever the hook's processes wrote before they exited is in the pipes now.
    p.stdin = None;
    while read_some(&mut p.stdout, &mut out) == Read::Data {}
    while read_some(&mut p.stderr, &mut err) == Read::Data {}
    (out.finish(), err.finish())
}

/// What one read from an output pipe gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Bytes, kept in the tail.
    Data,
    /// Nothing right now (the pipe is non-blocking): poll again, or stop draining.
    Empty,
    /// End of file or an error: the pipe is done with.
    Done,
}

/// Read one chunk of `pipe` into `tail`.
fn read_some<R: std::io::Read>(pipe: &mut Option<R>, tail: &mut Tail) -> Read {
    let Some(r) = pipe.as_mut() else {
        return Read::Done;
    };
    let mut buf = [0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Read::Done,
            Ok(n) => {
                tail.push(&buf[..n]);
                return Read::Data;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Read::Empty,
            Err(_) => return Read::Done,
        }
    }
}

/// Write the next part of the document; close stdin when all is written or the hook closed
/// its end (EPIPE: the hook need not read its stdin).
fn write_some(stdin: &mut Option<ChildStdin>, doc: &[u8], written: &mut usize) {
    let Some(w) = stdin.as_mut() else {
        return;
    };
    match w.write(&doc[*written..]) {
        Ok(n) => *written += n,
        Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
        Err(_) => *written = doc.len(),
    }
    if *written >= doc.len() {
        *stdin = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_all() {
        let mut t = Tail::default();
        let big: Vec<u8> = (0..HOOK_OUTPUT_BYTES_MAX + 10)
            .map(|i| (i % 251) as u8)
            .collect();
        t.push(&big[..5]);
        t.push(&big[5..]);
        let out = t.finish();
        assert_eq!(out.bytes.len(), HOOK_OUTPUT_BYTES_MAX);
        assert_eq!(out.bytes[..], big[10..]);
        assert_eq!(out.total_bytes, big.len() as u64);
        assert!(out.truncated());
    }
}
