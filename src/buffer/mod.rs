//! The per-sink buffer between the rule engine and the sink worker.
//!
//! Interface (DESIGN.md): the router `append`s records and then `sync`s (a record is only
//! released to the device's PUBACK after `sync`); the sink worker `read_batch`es records
//! past its read position, `ack`s each one once the upstream confirmed it, and `rewind`s
//! to the oldest unacked record after a reconnect so everything unconfirmed is sent again.
//! A record leaves the buffer only when acked, or when the bound (`max_bytes`) makes the
//! `when_full` policy drop it (counted in `edgebridge_buffer_dropped_total{reason="full"}`).
//!
//! This implementation keeps records in memory: it survives upstream outages but not a
//! restart of the gateway. The durable segmented log replaces the storage behind the same
//! methods without touching the sinks.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use prometheus::{Gauge, IntCounter, IntGauge};
use tokio::sync::Notify;

use crate::config::{BufferSection, WhenFull};
use crate::message::{now_millis, Message};
use crate::metrics::Metrics;

/// A message in a sink's buffer, with its per-sink sequence number.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub msg: Message,
}

/// What happened to an appended message.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// The buffer was full and the policy is `drop_newest`: the message was dropped.
    DroppedNewest,
    /// The buffer is full and the policy is `block`: the message is handed back; try
    /// again after [`Buffer::wait_for_space`].
    Full(Message),
}

struct Slot {
    record: Record,
    acked: bool,
}

struct State {
    slots: VecDeque<Slot>,
    /// Index into `slots` of the next record to hand to the sink.
    read_pos: usize,
    next_seq: u64,
    bytes: u64,
}

struct BufferMetrics {
    messages: IntGauge,
    bytes: IntGauge,
    oldest_age: Gauge,
    dropped_full: IntCounter,
}

pub struct Buffer {
    name: String,
    max_bytes: u64,
    when_full: WhenFull,
    state: Mutex<State>,
    /// Wakes the (single) sink worker when records become readable.
    readable: Notify,
    /// Wakes a router blocked on a full buffer (`when_full = "block"`).
    space: Notify,
    metrics: BufferMetrics,
}

impl Buffer {
    pub fn new(name: &str, config: &BufferSection, metrics: &Metrics) -> Self {
        Self {
            name: name.to_string(),
            max_bytes: config.max_bytes.0,
            when_full: config.when_full,
            state: Mutex::new(State {
                slots: VecDeque::new(),
                read_pos: 0,
                next_seq: 1,
                bytes: 0,
            }),
            readable: Notify::new(),
            space: Notify::new(),
            metrics: BufferMetrics {
                messages: metrics.buffer_messages.with_label_values(&[name]),
                bytes: metrics.buffer_bytes.with_label_values(&[name]),
                oldest_age: metrics.buffer_oldest_age.with_label_values(&[name]),
                dropped_full: metrics.buffer_dropped.with_label_values(&[name, "full"]),
            },
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state is
        // still consistent enough to keep delivering, so recover from poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `msg`, applying the `when_full` policy. Cheap; never blocks.
    pub fn append(&self, msg: Message) -> Appended {
        let size = msg.size() as u64;
        let mut st = self.lock();
        if st.bytes + size > self.max_bytes {
            match self.when_full {
                WhenFull::DropNewest => {
                    self.metrics.dropped_full.inc();
                    return Appended::DroppedNewest;
                }
                WhenFull::Block if !st.slots.is_empty() => return Appended::Full(msg),
                WhenFull::Block => {}
                WhenFull::DropOldest => {
                    while st.bytes + size > self.max_bytes {
                        let Some(old) = st.slots.pop_front() else {
                            break;
                        };
                        st.bytes -= old.record.msg.size() as u64;
                        st.read_pos = st.read_pos.saturating_sub(1);
                        if !old.acked {
                            self.metrics.dropped_full.inc();
                        }
                    }
                }
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.bytes += size;
        st.slots.push_back(Slot {
            record: Record { seq, msg },
            acked: false,
        });
        self.publish_gauges(&st);
        drop(st);
        self.readable.notify_one();
        Appended::Stored
    }

    /// Counts a message the router had to give up on while this buffer was full.
    pub fn count_full_drop(&self) {
        self.metrics.dropped_full.inc();
    }

    /// Makes everything appended so far durable. The in-memory buffer has nothing to do.
    pub async fn sync(&self) {}

    /// Waits until a `block`ed append may succeed.
    pub async fn wait_for_space(&self) {
        self.space.notified().await;
    }

    /// Up to `max` records past the read position; waits until there is at least one.
    pub async fn read_batch(&self, max: usize) -> Vec<Record> {
        loop {
            {
                let mut st = self.lock();
                let mut batch = Vec::new();
                while batch.len() < max && st.read_pos < st.slots.len() {
                    let pos = st.read_pos;
                    st.read_pos += 1;
                    let slot = &st.slots[pos];
                    if !slot.acked {
                        batch.push(slot.record.clone());
                    }
                }
                if !batch.is_empty() {
                    return batch;
                }
            }
            self.readable.notified().await;
        }
    }

    /// Confirms `seq`: it is removed once every older record is confirmed too.
    pub fn ack(&self, seq: u64) {
        let mut st = self.lock();
        let Some(front) = st.slots.front().map(|s| s.record.seq) else {
            return;
        };
        // Sequence numbers in the buffer are contiguous: drops only remove from the front.
        let Some(idx) = seq.checked_sub(front).map(|i| i as usize) else {
            return; // already dropped
        };
        if let Some(slot) = st.slots.get_mut(idx) {
            slot.acked = true;
        }
        let mut freed = false;
        while st.slots.front().is_some_and(|s| s.acked) {
            if let Some(old) = st.slots.pop_front() {
                st.bytes -= old.record.msg.size() as u64;
                st.read_pos = st.read_pos.saturating_sub(1);
                freed = true;
            }
        }
        self.publish_gauges(&st);
        drop(st);
        if freed && self.when_full == WhenFull::Block {
            self.space.notify_waiters();
            self.space.notify_one();
        }
    }

    /// Moves the read position back to the oldest unconfirmed record.
    pub fn rewind(&self) {
        let mut st = self.lock();
        st.read_pos = 0;
        let readable = !st.slots.is_empty();
        drop(st);
        if readable {
            self.readable.notify_one();
        }
    }

    /// Messages and bytes waiting (including in flight).
    pub fn len(&self) -> (usize, u64) {
        let st = self.lock();
        (st.slots.iter().filter(|s| !s.acked).count(), st.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.len().0 == 0
    }

    /// Refreshes the age gauge (called when metrics are scraped).
    pub fn refresh_age(&self) {
        let st = self.lock();
        let age = st
            .slots
            .iter()
            .find(|s| !s.acked)
            .map(|s| now_millis().saturating_sub(s.record.msg.received_at) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.metrics.oldest_age.set(age);
    }

    fn publish_gauges(&self, st: &State) {
        self.metrics.messages.set(st.slots.len() as i64);
        self.metrics.bytes.set(st.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use bytes::Bytes;

    fn msg(n: u64) -> Message {
        Message {
            topic: "t".into(),
            payload: Bytes::from(n.to_string()),
            qos: 1,
            retain: false,
            properties: None,
            received_at: now_millis(),
        }
    }

    fn buffer(max_bytes: u64, when_full: WhenFull) -> Buffer {
        let cfg = BufferSection {
            max_bytes: ByteSize(max_bytes),
            when_full,
            batch: 10,
        };
        Buffer::new("b", &cfg, &Metrics::new())
    }

    fn payloads(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.msg.payload).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn read_ack_and_rewind_resend_only_unacked() {
        let b = buffer(1 << 20, WhenFull::DropOldest);
        for n in 0..5 {
            b.append(msg(n));
        }
        let batch = b.read_batch(3).await;
        assert_eq!(payloads(&batch), ["0", "1", "2"]);
        b.ack(batch[1].seq); // out of order: nothing freed yet
        assert_eq!(b.len().0, 4);
        b.ack(batch[0].seq);
        assert_eq!(b.len().0, 3);
        b.rewind();
        assert_eq!(payloads(&b.read_batch(10).await), ["2", "3", "4"]);
    }

    #[test]
    fn drop_oldest_and_drop_newest_count_what_they_drop() {
        let size = msg(0).size() as u64;
        let b = buffer(size * 3, WhenFull::DropOldest);
        for n in 0..5 {
            assert_eq!(b.append(msg(n)), Appended::Stored);
        }
        assert_eq!(b.len().0, 3);
        assert_eq!(b.metrics.dropped_full.get(), 2);

        let b = buffer(size * 3, WhenFull::DropNewest);
        let outcomes: Vec<Appended> = (0..5).map(|n| b.append(msg(n))).collect();
        assert_eq!(outcomes[3], Appended::DroppedNewest);
        assert_eq!(b.metrics.dropped_full.get(), 2);
    }

    #[tokio::test]
    async fn block_reports_full_until_an_ack_frees_space() {
        let size = msg(0).size() as u64;
        let b = buffer(size * 2, WhenFull::Block);
        b.append(msg(0));
        b.append(msg(1));
        assert!(matches!(b.append(msg(2)), Appended::Full(_)));
        let batch = b.read_batch(1).await;
        b.ack(batch[0].seq);
        assert_eq!(b.append(msg(2)), Appended::Stored);
    }
}
