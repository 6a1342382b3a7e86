//! Intake: what device connections hand to the rule engine, and how the engine tells a
//! connection that its messages are durable so the withheld PUBACKs may go out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

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
/// order, so "everything up to `seq` is durable" is a single number per connection. The
/// connection's task awaits [`AckTracker::changed`]: no thread ever blocks on it.
#[derive(Default)]
pub struct AckTracker {
    durable_upto: AtomicU64,
    /// Set when a message of this connection could not be stored: nothing above
    /// `durable_upto` is acked any more, so the connection closes and the device resends.
    failed: AtomicBool,
    /// One waiter (the connection's task): `notify_one` keeps a permit when it is not
    /// waiting, so a release between its check and its wait is never lost.
    notify: Notify,
}

impl AckTracker {
    pub fn release(&self, seq: u64) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        if self.durable_upto.fetch_max(seq, Ordering::AcqRel) < seq {
            self.notify.notify_one();
        }
    }

    /// The messages not yet released could not be stored (a buffer write failed): they
    /// must never be acked on this connection.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether [`AckTracker::fail`] was called: the device will resend everything not
    /// yet acked, so its later messages must not be stored ahead of those.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Everything up to this sequence number is durable.
    pub fn durable_upto(&self) -> u64 {
        self.durable_upto.load(Ordering::Acquire)
    }

    pub fn is_released(&self, seq: u64) -> bool {
        self.durable_upto() >= seq
    }

    /// Waits until `seq` is released (`true`) or the tracker failed (`false`).
    pub async fn released(&self, seq: u64) -> bool {
        loop {
            if self.is_failed() {
                return false;
            }
            if self.is_released(seq) {
                return true;
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn released_returns_once_released_or_failed() {
        let tracker = Arc::new(AckTracker::default());
        let t = tracker.clone();
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            t.release(3);
        });
        assert!(tracker.released(2).await);
        releaser.await.expect("releaser");
        assert!(tracker.is_released(3));
        let t = tracker.clone();
        let failer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            t.fail();
        });
        // Woken by the failure.
        assert!(!tracker.released(4).await);
        failer.await.expect("failer");
        // What was durable before stays acked; later releases are refused.
        assert!(tracker.is_released(3));
        tracker.release(5);
        assert!(!tracker.is_released(4));
    }
}
