//! Group durability: many callers share one flush.

use parking_lot::{Condvar, Mutex};

use crate::Result;

#[derive(Debug, Default)]
struct State {
    started: u64,
    completed: u64,
    running: bool,
}

/// Coalesces flushes: a caller that needs its completed writes durable waits for the first flush
/// that *starts* after its call, and starts one itself when none is running.
///
/// It does not latch: a failed flush fails the caller that ran it, and the callers that waited
/// for that flush run the next one themselves and get its result. On Linux a flush after a
/// failed one may succeed although the writes it should have covered are lost, so pair it with a
/// volume that latches its first failure ([`crate::volume::CheckedVolume`], as the engine
/// does): every flush after the failure then fails at once, with the first error.
#[derive(Debug, Default)]
pub struct GroupSync {
    state: Mutex<State>,
    cv: Condvar,
}

impl GroupSync {
    /// Make every write that completed before this call durable, sharing the flush with
    /// concurrent callers. `flush` performs one durability point.
    ///
    /// # Errors
    /// The error of the flush this call ran (its own, or the next one after a failed flush it
    /// waited for).
    pub fn sync(&self, flush: impl FnOnce() -> Result<()>) -> Result<()> {
        let target = self.ticket();
        self.sync_from(target, flush)
    }

    /// The flush that covers every write completed before this call: pass it to
    /// [`GroupSync::sync_from`] later (on another thread, say), which then returns at once when
    /// that flush, or a later one, has completed meanwhile.
    pub fn ticket(&self) -> u64 {
        self.state.lock().started + 1
    }

    /// [`GroupSync::sync`] for writes that completed before [`GroupSync::ticket`] returned
    /// `target`.
    ///
    /// # Errors
    /// As [`GroupSync::sync`].
    pub fn sync_from(&self, target: u64, flush: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut st = self.state.lock();
        let mut flush = Some(flush);
        loop {
            if st.completed >= target {
                return Ok(());
            }
            if st.running {
                self.cv.wait(&mut st);
                continue;
            }
            st.started += 1;
            let mine = st.started;
            st.running = true;
            drop(st);
            let r = match flush.take() {
                Some(f) => f(),
                None => Ok(()),
            };
            st = self.state.lock();
            st.running = false;
            match r {
                Ok(()) => st.completed = mine,
                Err(e) => {
                    self.cv.notify_all();
                    return Err(e);
                }
            }
            self.cv.notify_all();
            // `flush` was consumed: our target is `mine` or earlier, so the loop ends now.
        }
    }
}
