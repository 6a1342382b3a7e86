//! Intake: what the protocol seam hands to the rule engine, and how the engine tells a
//! connection that its messages are durable so the withheld PUBACKs may go out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::message::Message;

/// One device PUBLISH on its way to the rules.
pub struct IntakeItem {
    /// Index of the listener in the plan (for per-listener counters).
    pub listener: usize,
    pub msg: Message,
    /// The publishing device's client id (rules' `client_id`); not part of [`Message`],
    /// which the buffers persist.
    pub client_id: Arc<str>,
    /// Present when the device waits for a durable acknowledgement.
    pub ack: Option<AckTicket>,
}

/// "Release the acknowledgement of message `seq` on this connection."
pub struct AckTicket {
    pub tracker: Arc<AckTracker>,
    pub seq: u64,
}

/// Per-connection progress of durable acknowledgements.
///
/// The connection numbers its QoS 1/2 publishes 1, 2, 3…; the router processes intake in
/// order, so "everything up to `seq` is durable" is a single number per connection.
#[derive(Default)]
pub struct AckTracker {
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Set (under the mutex) when a message of this connection could not be stored:
    /// nothing above `durable_upto` is acked any more, so the connection closes and the
    /// device resends.
    failed: AtomicBool,
}

#[derive(Default)]
struct Progress {
    durable_upto: u64,
    /// The seq the connection's writer is blocked on (0: none). A release below it wakes
    /// nobody: batches are small at low rates, and a wake-up that finds its message still
    /// not durable would cost a context switch for nothing.
    waiting_for: u64,
}

impl AckTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn release(&self, seq: u64) {
        let mut p = self.lock();
        if seq > p.durable_upto && !self.failed.load(Ordering::Relaxed) {
            p.durable_upto = seq;
            if p.waiting_for != 0 && seq >= p.waiting_for {
                self.changed.notify_all();
            }
        }
    }

    /// The messages not yet released could not be stored (a buffer write failed): they
    /// must never be acked on this connection.
    pub fn fail(&self) {
        let _progress = self.lock();
        self.failed.store(true, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Whether [`AckTracker::fail`] was called: the device will resend everything not
    /// yet acked, so its later messages must not be stored ahead of those.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    pub fn is_released(&self, seq: u64) -> bool {
        self.lock().durable_upto >= seq
    }

    /// Blocks the calling thread until `seq` is released, it [failed](AckTracker::fail),
    /// `stop` is set, or `timeout` passes. Returns whether `seq` was released.
    pub fn wait(&self, seq: u64, timeout: Duration, stop: &AtomicBool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.lock();
        let released = loop {
            if p.durable_upto >= seq {
                break true;
            }
            let now = Instant::now();
            if now >= deadline
                || stop.load(Ordering::Relaxed)
                || self.failed.load(Ordering::Relaxed)
            {
                break false;
            }
            p.waiting_for = seq;
            // Wake up now and then to notice `stop`.
            let slice = (deadline - now).min(Duration::from_millis(100));
            p = match self.changed.wait_timeout(p, slice) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        };
        p.waiting_for = 0;
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_returns_once_released_or_stopped() {
        let tracker = Arc::new(AckTracker::default());
        let stop = AtomicBool::new(false);
        let t = tracker.clone();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            t.release(3);
        });
        assert!(tracker.wait(2, Duration::from_secs(10), &stop));
        releaser.join().expect("releaser thread");
        assert!(tracker.is_released(3));
        assert!(!tracker.wait(4, Duration::from_millis(30), &stop));
        stop.store(true, Ordering::Relaxed);
        assert!(!tracker.wait(4, Duration::from_secs(10), &stop));
    }

    #[test]
    fn a_failed_tracker_releases_nothing_more_and_wakes_its_waiter() {
        let tracker = Arc::new(AckTracker::default());
        let stop = AtomicBool::new(false);
        tracker.release(2);
        let t = tracker.clone();
        let failer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            t.fail();
        });
        // Woken by the failure long before the timeout.
        assert!(!tracker.wait(3, Duration::from_secs(60), &stop));
        failer.join().expect("failer thread");
        // What was durable before stays acked; later releases are refused.
        assert!(tracker.is_released(2));
        tracker.release(5);
        assert!(!tracker.is_released(3));
        assert!(!tracker.wait(3, Duration::from_secs(60), &stop));
    }
}
