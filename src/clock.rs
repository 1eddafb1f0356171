//! Time for the orchestration layers: what time it is, and a wake-up at an instant.
//!
//! Every wait in the plan, quiesce, job and calendar layers goes through a [`Clock`]: the daemon
//! uses [`SystemClock`]; tests drive a [`ManualClock`] forward and see the timers that fall due
//! fire at once, so no test sleeps and no outcome depends on how fast the machine is.

use std::sync::Arc;
use std::time::Instant;

use crossbeam::channel::{Receiver, Sender};
use jiff::{SignedDuration, Timestamp};
use parking_lot::{Condvar, Mutex};

/// A source of the current instant and of timers.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> Timestamp;

    /// A receiver that gets one message once the clock has reached `deadline` (at once when it
    /// already has). Use it in `crossbeam::select!` beside the event being waited for. The
    /// message's value carries no meaning.
    fn after(&self, deadline: Timestamp) -> Receiver<Instant>;
}

/// The system's wall clock; timers are crossbeam's (`crossbeam::channel::at`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn after(&self, deadline: Timestamp) -> Receiver<Instant> {
        let wait = deadline.duration_since(Timestamp::now());
        let wait = std::time::Duration::try_from(wait).unwrap_or_default();
        crossbeam::channel::at(Instant::now() + wait)
    }
}

/// A clock that moves only when told: [`ManualClock::advance`] and [`ManualClock::set`] fire
/// every timer whose deadline has been reached, in deadline order, before they return.
/// Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<ManualInner>>,
    /// Notified whenever a timer is registered, so a test can wait for a waiter to be in
    /// place before it moves the clock ([`ManualClock::wait_for_timers`]).
    registered: Arc<Condvar>,
}

#[derive(Debug)]
struct ManualInner {
    now: Timestamp,
    timers: Vec<(Timestamp, Sender<Instant>)>,
}

impl ManualClock {
    /// A clock standing at `start`.
    #[must_use]
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            inner: Arc::new(Mutex::new(ManualInner {
                now: start,
                timers: Vec::new(),
            })),
            registered: Arc::new(Condvar::new()),
        }
    }

    /// Move the clock forward by `by` (a negative duration is refused by doing nothing: this
    /// clock never goes back) and fire the timers that fall due.
    pub fn advance(&self, by: SignedDuration) {
        if by.is_negative() {
            return;
        }
        let mut inner = self.inner.lock();
        let to = inner.now.saturating_add(by).unwrap_or(Timestamp::MAX);
        Self::move_to(&mut inner, to);
    }

    /// Move the clock to `to` when it is later than now, and fire the timers that fall due.
    pub fn set(&self, to: Timestamp) {
        let mut inner = self.inner.lock();
        if to > inner.now {
            Self::move_to(&mut inner, to);
        }
    }

    /// How many timers are waiting (their receivers may have been dropped).
    #[must_use]
    pub fn pending_timers(&self) -> usize {
        self.inner.lock().timers.len()
    }

    /// Block until at least `n` timers are waiting, then return. A test calls this before
    /// [`ManualClock::advance`] so that the code under test has registered its deadline (it
    /// called [`Clock::after`]) and the advance cannot come too early; no sleep is involved.
    /// Timers whose receiver was dropped still count until they fall due, so a test counts
    /// on a clock whose timers it knows.
    pub fn wait_for_timers(&self, n: usize) {
        let mut inner = self.inner.lock();
        while inner.timers.len() < n {
            self.registered.wait(&mut inner);
        }
    }

    /// Block until a timer for exactly `at` is waiting. Unlike [`ManualClock::wait_for_timers`]
    /// this does not depend on how many other timers (live or abandoned) exist, so a test can
    /// wait for one known deadline of the code under test.
    pub fn wait_for_timer_at(&self, at: Timestamp) {
        let mut inner = self.inner.lock();
        while !inner.timers.iter().any(|(t, _)| *t == at) {
            self.registered.wait(&mut inner);
        }
    }

    fn move_to(inner: &mut ManualInner, to: Timestamp) {
        inner.now = to;
        inner.timers.sort_by_key(|(at, _)| *at);
        let due = inner.timers.partition_point(|(at, _)| *at <= to);
        for (_, tx) in inner.timers.drain(..due) {
            // A receiver that was dropped no longer waits: nothing to tell it.
            let _ = tx.send(Instant::now());
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.inner.lock().now
    }

    fn after(&self, deadline: Timestamp) -> Receiver<Instant> {
        let (tx, rx) = crossbeam::channel::bounded(1);
        let mut inner = self.inner.lock();
        if deadline <= inner.now {
            let _ = tx.send(Instant::now());
        } else {
            inner.timers.push((deadline, tx));
            self.registered.notify_all();
        }
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn manual_timers_fire_when_their_deadline_is_reached_and_not_before() {
        let clock = ManualClock::new(t("2026-12-01T10:00:00Z"));
        let early = clock.after(t("2026-12-01T10:00:30Z"));
        let late = clock.after(t("2026-12-01T10:01:00Z"));
        let past = clock.after(t("2026-12-01T09:00:00Z"));
        assert!(
            past.try_recv().is_ok(),
            "a deadline already reached fires at once"
        );
        clock.advance(SignedDuration::from_secs(29));
        assert!(early.try_recv().is_err());
        clock.advance(SignedDuration::from_secs(1));
        assert!(early.try_recv().is_ok());
        assert!(late.try_recv().is_err());
        assert_eq!(clock.pending_timers(), 1);
        clock.set(t("2026-12-01T10:05:00Z"));
        assert!(late.try_recv().is_ok());
        assert_eq!(clock.now(), t("2026-12-01T10:05:00Z"));
    }

    #[test]
    fn wait_for_timers_returns_once_another_thread_registered_its_deadline() {
        let clock = ManualClock::new(t("2026-12-01T10:00:00Z"));
        let waiter = {
            let clock = clock.clone();
            std::thread::spawn(move || {
                let rx = clock.after(t("2026-12-01T10:01:00Z"));
                rx.recv().unwrap();
                clock.now()
            })
        };
        clock.wait_for_timers(1);
        clock.advance(SignedDuration::from_secs(60));
        assert_eq!(waiter.join().unwrap(), t("2026-12-01T10:01:00Z"));
        assert_eq!(clock.pending_timers(), 0);
    }

    #[test]
    fn manual_clock_never_goes_back() {
        let clock = ManualClock::new(t("2026-12-01T10:00:00Z"));
        clock.advance(SignedDuration::from_secs(-5));
        clock.set(t("2026-12-01T09:00:00Z"));
        assert_eq!(clock.now(), t("2026-12-01T10:00:00Z"));
    }

    #[test]
    fn system_timer_in_the_past_fires_at_once() {
        let rx = SystemClock.after(t("2000-01-01T00:00:00Z"));
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
    }
}
