//! Group durability: many callers share one flush.

use parking_lot::{Condvar, Mutex};

use crate::{Error, Result};

#[derive(Debug, Default)]
struct State {
    started: u64,
    completed: u64,
    running: bool,
    failed: Option<String>,
}

/// Coalesces flushes: a caller that needs its completed writes durable waits for the first flush
/// that *starts* after its call, and starts one itself when none is running. The first failure
/// latches: every later call returns [`Error::Poisoned`].
#[derive(Debug, Default)]
pub struct GroupSync {
    state: Mutex<State>,
    cv: Condvar,
    /// Mirror of `state.failed.is_some()`, read lock-free on every write.
    failed: std::sync::atomic::AtomicBool,
}

impl GroupSync {
    /// Make every write that completed before this call durable, sharing the flush with
    /// concurrent callers. `flush` performs one durability point.
    ///
    /// # Errors
    /// The flush's error (for the caller that ran it) or [`Error::Poisoned`].
    pub fn sync(&self, name: &str, flush: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut st = self.state.lock();
        let target = st.started + 1;
        let mut flush = Some(flush);
        loop {
            if let Some(f) = &st.failed {
                return Err(Error::Poisoned {
                    target: format!("{name} ({f})"),
                });
            }
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
                    st.failed = Some(e.to_string());
                    self.failed
                        .store(true, std::sync::atomic::Ordering::Release);
                    self.cv.notify_all();
                    return Err(e);
                }
            }
            self.cv.notify_all();
            // `flush` was consumed: our target is `mine` or earlier, so the loop ends now.
        }
    }

    /// True after a failed flush.
    #[must_use]
    pub fn is_failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Flushes completed so far.
    #[must_use]
    pub fn flushes(&self) -> u64 {
        self.state.lock().completed
    }
}
