//! Transmission: the connection's thread reads requests, checks them against the export and
//! queues them; a small pool of workers executes them and writes the replies. A [`Budget`]
//! bounds what is in flight.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use parking_lot::{Condvar, Mutex};

use super::handshake::Negotiated;
use super::NbdConfig;
use crate::nbd::export::NbdExport;
use crate::nbd::proto::{
    check_request, encode_none_chunk, encode_offset_data_prefix, errno_for, Command, ErrorChunk,
    ExportLimits, Request, SimpleReply, CMD_FLAG_FUA, EINVAL, OFFSET_DATA_PREFIX_BYTES,
    REQUEST_HEADER_BYTES, SIMPLE_REPLY_HEADER_BYTES,
};
use crate::Result;

/// One request handed to a worker.
struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: u64,
}

/// Bounds the requests and payload bytes in flight on one connection.
struct Budget {
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    max_requests: usize,
    max_bytes: u64,
}

impl Budget {
    fn new(max_requests: usize, max_bytes: u64) -> Self {
        Budget {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            max_requests,
            max_bytes,
        }
    }

    /// Wait for room for one request of `bytes`. A lone request always fits, so a request no
    /// larger than the payload limit can never wait forever.
    fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock();
        while s.0 >= self.max_requests || (s.0 > 0 && s.1.saturating_add(bytes) > self.max_bytes) {
            self.cv.wait(&mut s);
        }
        s.0 += 1;
        s.1 = s.1.saturating_add(bytes);
    }

    /// Whether the one request in flight is the caller's own (nothing queued or executing).
    fn alone(&self) -> bool {
        self.state.lock().0 == 1
    }

    /// Requests in flight: acquired and not yet released (queued, running, or being read).
    fn in_flight(&self) -> usize {
        self.state.lock().0
    }

    fn release(&self, bytes: u64) {
        let mut s = self.state.lock();
        s.0 = s.0.saturating_sub(1);
        s.1 = s.1.saturating_sub(bytes);
        self.cv.notify_all();
    }
}

/// The queue from the connection's reader to its workers. An idle worker parks on a condition
/// variable at once: with many workers per connection (up to 32 requests in flight), a channel
/// that spins and yields before it parks kept idle workers calling `sched_yield` (3.0 s of them
/// in 4,096 first writes at depth 32, `scripts/nbd-profile.sh`; the condition variable removes
/// them, with the same throughput in that run). The [`Budget`] bounds what is queued, so pushing
/// never waits.
struct JobQueue {
    state: Mutex<(std::collections::VecDeque<Job>, bool)>,
    cv: Condvar,
}

impl JobQueue {
    fn new(capacity: usize) -> Self {
        JobQueue {
            state: Mutex::new((std::collections::VecDeque::with_capacity(capacity), false)),
            cv: Condvar::new(),
        }
    }

    /// Queue a job and wake one idle worker.
    fn push(&self, job: Job) {
        self.state.lock().0.push_back(job);
        self.cv.notify_one();
    }

    /// The next job; `None` once the queue is closed and drained.
    fn pop(&self) -> Option<Job> {
        let mut s = self.state.lock();
        loop {
            if let Some(job) = s.0.pop_front() {
                return Some(job);
            }
            if s.1 {
                return None;
            }
            self.cv.wait(&mut s);
        }
    }

    /// No more jobs come: workers drain what is queued and then stop.
    fn close(&self) {
        self.state.lock().1 = true;
        self.cv.notify_all();
    }
}

/// One client connection in transmission, shared by its reader and its workers.
struct Connection<'a, W> {
    /// The export chosen in the handshake.
    export: &'a dyn NbdExport,
    /// Whether replies to reads are structured (`NBD_OPT_STRUCTURED_REPLY` was granted).
    structured: bool,
    /// Where replies go, one whole reply per lock.
    writer: &'a Mutex<W>,
    /// Shuts the socket down, so that the reader stops too.
    kill: &'a (dyn Fn() + Sync),
    /// A reply could not be written: nothing more is sent and no more requests are read.
    dead: AtomicBool,
}

impl<W: Write> Connection<'_, W> {
    /// Write one whole reply; on failure mark the connection dead and shut it down.
    fn send(&self, bytes: &[u8]) {
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let mut w = self.writer.lock();
        if w.write_all(bytes).and_then(|()| w.flush()).is_err() {
            drop(w);
            self.dead.store(true, Ordering::SeqCst);
            (self.kill)();
        }
    }

    /// Send an error reply: an error chunk when structured replies were negotiated, a simple
    /// reply otherwise.
    fn send_error(&self, cookie: u64, errno: u32, message: &str, offset: Option<u64>) {
        if self.structured {
            self.send(
                &ErrorChunk {
                    errno,
                    message: message.to_string(),
                    offset,
                }
                .encode(cookie),
            );
        } else {
            self.send(
                &SimpleReply {
                    error: errno,
                    cookie,
                }
                .encode(),
            );
        }
    }

    /// Reply to a command that returns no data: success, or the error of `what`.
    fn finish(&self, cookie: u64, res: Result<()>, what: &str) {
        match res {
            Ok(()) => self.send(&SimpleReply { error: 0, cookie }.encode()),
            Err(e) => self.send_error(cookie, errno_for(&e), &format!("{what} failed"), None),
        }
    }

    /// Flush when the request carried `NBD_CMD_FLAG_FUA`.
    fn fua_flush(&self, fua: bool) -> Result<()> {
        if fua {
            self.export.flush()
        } else {
            Ok(())
        }
    }

    /// Execute one queued request and send its reply.
    fn execute(&self, job: Job) {
        let Job { req, payload, .. } = job;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = u64::from(req.length);
        let (res, what) = match req.command {
            Command::Read => return self.read(&req),
            Command::Write if payload.is_empty() => (self.fua_flush(fua), "write"),
            Command::Write => (self.export.write(req.offset, &payload, fua), "write"),
            Command::Flush => (self.export.flush(), "flush"),
            Command::Trim if len == 0 => (self.fua_flush(fua), "trim"),
            Command::Trim => (
                self.export
                    .trim(req.offset, len)
                    .and_then(|()| self.fua_flush(fua)),
                "trim",
            ),
            Command::WriteZeroes if len == 0 => (self.fua_flush(fua), "write zeroes"),
            Command::WriteZeroes => (
                self.export.write_zeroes(req.offset, len, fua),
                "write zeroes",
            ),
            _ => return self.send_error(req.cookie, EINVAL, "unsupported command", None),
        };
        drop(payload);
        self.finish(req.cookie, res, what);
    }

    /// Answer `NBD_CMD_READ` in the negotiated reply style.
    fn read(&self, req: &Request) {
        if self.structured {
            self.read_structured(req);
        } else {
            self.read_simple(req);
        }
    }

    /// Answer a read with one `NBD_REPLY_TYPE_OFFSET_DATA` chunk (`NONE` for an empty read), or
    /// an error chunk carrying the offset.
    fn read_structured(&self, req: &Request) {
        // The length was checked against the payload limit before the job was queued.
        let len = req.length as usize;
        if len == 0 {
            return self.send(&encode_none_chunk(req.cookie));
        }
        let mut buf = vec![0u8; OFFSET_DATA_PREFIX_BYTES + len];
        match self
            .export
            .read(req.offset, &mut buf[OFFSET_DATA_PREFIX_BYTES..])
        {
            Ok(()) => {
                buf[..OFFSET_DATA_PREFIX_BYTES].copy_from_slice(&encode_offset_data_prefix(
                    req.cookie, req.offset, req.length, true,
                ));
                self.send(&buf);
            }
            Err(e) => {
                drop(buf);
                self.send_error(req.cookie, errno_for(&e), "read failed", Some(req.offset));
            }
        }
    }

    /// Answer a read with a simple reply followed by the data, or a simple error reply.
    fn read_simple(&self, req: &Request) {
        // The length was checked against the payload limit before the job was queued.
        let len = req.length as usize;
        let mut buf = vec![0u8; SIMPLE_REPLY_HEADER_BYTES + len];
        match self
            .export
            .read(req.offset, &mut buf[SIMPLE_REPLY_HEADER_BYTES..])
        {
            Ok(()) => {
                buf[..SIMPLE_REPLY_HEADER_BYTES].copy_from_slice(
                    &SimpleReply {
                        error: 0,
                        cookie: req.cookie,
                    }
                    .encode(),
                );
                self.send(&buf);
            }
            Err(e) => {
                drop(buf);
                self.send(
                    &SimpleReply {
                        error: errno_for(&e),
                        cookie: req.cookie,
                    }
                    .encode(),
                );
            }
        }
    }
}

/// A request stream that can tell whether more requests are already waiting: in its buffer or
/// on its socket. A request that arrives while nothing else is in flight and nothing waits
/// behind it is executed by the reading thread itself (a client with one request in flight
/// pays no hand-off to a worker and back); otherwise it goes to the workers, so requests in
/// flight together run concurrently.
pub(crate) trait InputWaiting: Read {
    /// Whether more bytes can be read without blocking (`true` when unknown).
    fn input_waiting(&self) -> bool;
}

impl InputWaiting for std::io::BufReader<super::socket::TimedReader<'_>> {
    fn input_waiting(&self) -> bool {
        !self.buffer().is_empty() || self.get_ref().readable_now()
    }
}

impl<T: AsRef<[u8]>> InputWaiting for std::io::Cursor<T> {
    fn input_waiting(&self) -> bool {
        (self.position() as usize) < self.get_ref().as_ref().len()
    }
}

/// Serve requests until the client disconnects, breaks the protocol or a reply cannot be
/// written; every request read before that is answered before this returns.
pub(super) fn transmission<R: InputWaiting, W: Write + Send>(
    reader: &mut R,
    writer: &Mutex<W>,
    kill: &(dyn Fn() + Sync),
    neg: &Negotiated,
    cfg: &NbdConfig,
) {
    let conn = Connection {
        export: &*neg.export,
        structured: neg.structured,
        writer,
        kill,
        dead: AtomicBool::new(false),
    };
    let budget = Budget::new(cfg.in_flight_max_requests, cfg.in_flight_max_bytes);
    let workers = Workers {
        queue: JobQueue::new(cfg.in_flight_max_requests),
        spawned: AtomicUsize::new(0),
        max: cfg.workers_per_connection,
    };
    thread::scope(|scope| {
        let grow = |needed| workers.grow(scope, &conn, &budget, needed);
        // One worker from the start; more as requests in flight need them.
        if grow(1) {
            read_requests(reader, &conn, &budget, &workers.queue, &grow, neg, cfg);
        }
        // Closing the queue lets the workers drain what is queued and exit; the scope joins
        // them, so every request read before a disconnect is answered.
        workers.queue.close();
    });
}

/// A connection's worker threads, started as they are needed up to `max`: a client that keeps
/// one or two requests in flight costs one or two threads, one that keeps 32 in flight gets
/// up to `max` running at once.
struct Workers {
    queue: JobQueue,
    spawned: AtomicUsize,
    max: usize,
}

impl Workers {
    /// Start workers until there are as many as `needed` (the requests in flight, queued or
    /// running) or `max`; `false` when none runs and none could be started.
    fn grow<'scope, W: Write + Send>(
        &'scope self,
        scope: &'scope thread::Scope<'scope, '_>,
        conn: &'scope Connection<'_, W>,
        budget: &'scope Budget,
        needed: usize,
    ) -> bool {
        while self.spawned.load(Ordering::Acquire) < needed.min(self.max) {
            let n = self.spawned.load(Ordering::Acquire);
            let spawned = thread::Builder::new()
                .name(format!("nbd-worker-{n}"))
                .spawn_scoped(scope, move || {
                    while let Some(job) = self.queue.pop() {
                        let cost = job.cost;
                        conn.execute(job);
                        budget.release(cost);
                    }
                });
            if spawned.is_err() {
                break;
            }
            self.spawned.fetch_add(1, Ordering::AcqRel);
        }
        self.spawned.load(Ordering::Acquire) > 0
    }
}

/// The connection's thread: read, check and queue requests, answering refused ones at once,
/// until the client disconnects, a request cannot be framed, or the connection dies.
fn read_requests<R: InputWaiting, W: Write>(
    reader: &mut R,
    conn: &Connection<'_, W>,
    budget: &Budget,
    queue: &JobQueue,
    grow: &dyn Fn(usize) -> bool,
    neg: &Negotiated,
    cfg: &NbdConfig,
) {
    let max_payload = cfg.payload_max_bytes;
    loop {
        if conn.dead.load(Ordering::SeqCst) {
            return;
        }
        let mut hb = [0u8; REQUEST_HEADER_BYTES];
        if reader.read_exact(&mut hb).is_err() {
            return;
        }
        // A bad magic means we cannot find the next request: hard disconnect.
        let Ok(req) = Request::parse(&hb) else { return };
        if req.command == Command::Disc {
            return;
        }
        let is_write = req.command == Command::Write;
        if is_write && req.length > max_payload {
            // The payload cannot be accepted and skipping it would mean reading up to 4 GiB
            // for nothing: hard disconnect.
            return;
        }
        let cost = match req.command {
            Command::Read | Command::Write if req.length <= max_payload => u64::from(req.length),
            _ => 0,
        };
        budget.acquire(cost);
        let mut payload = Vec::new();
        if is_write {
            payload = vec![0u8; req.length as usize];
            if reader.read_exact(&mut payload).is_err() {
                budget.release(cost);
                return;
            }
        }
        let limits = ExportLimits {
            size: neg.export.size(),
            read_only: neg.read_only || neg.export.read_only(),
            min_block: neg.min_block,
            max_payload,
        };
        if let Err(rej) = check_request(&req, &limits) {
            drop(payload);
            conn.send_error(req.cookie, rej.errno, rej.message, None);
            budget.release(cost);
            continue;
        }
        let job = Job { req, payload, cost };
        if budget.alone() && !reader.input_waiting() {
            conn.execute(job);
            budget.release(cost);
            continue;
        }
        grow(budget.in_flight());
        queue.push(job);
    }
}
