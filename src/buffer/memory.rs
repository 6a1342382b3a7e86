//! A buffer kept in memory only (`storage = "memory"`): records in a deque, lost on
//! restart; the same read, ack and rewind as the disk log.

use std::collections::VecDeque;

use super::Record;
use crate::message::Message;

struct Slot {
    record: Record,
    acked: bool,
}

/// Records in a deque; sequence numbers are contiguous since drops only remove from the
/// front.
pub(super) struct MemoryLog {
    slots: VecDeque<Slot>,
    /// Index into `slots` of the next record to hand to the sink.
    read_pos: usize,
    pub(super) next_seq: u64,
    pub(super) bytes: u64,
}

impl MemoryLog {
    pub(super) fn new() -> Self {
        Self {
            slots: VecDeque::new(),
            read_pos: 0,
            next_seq: 1,
            bytes: 0,
        }
    }

    pub(super) fn append(&mut self, msg: Message) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += msg.size() as u64;
        self.slots.push_back(Slot {
            record: Record { seq, msg },
            acked: false,
        });
        seq
    }

    /// Up to `max` unacked records with seq ≤ `upto` from the read position on.
    pub(super) fn read(
        &mut self,
        max: usize,
        upto: u64,
        cutoff_ms: Option<u64>,
        expired: &mut u64,
    ) -> Vec<Record> {
        let mut batch = Vec::new();
        while batch.len() < max && self.read_pos < self.slots.len() {
            let pos = self.read_pos;
            if self.slots[pos].record.seq > upto {
                break;
            }
            self.read_pos += 1;
            let slot = &mut self.slots[pos];
            if slot.acked {
                continue;
            }
            if cutoff_ms.is_some_and(|c| slot.record.msg.received_at < c) {
                slot.acked = true;
                *expired += 1;
                continue;
            }
            batch.push(slot.record.clone());
        }
        self.collect();
        batch
    }

    pub(super) fn ack(&mut self, seq: u64) {
        let Some(front) = self.slots.front().map(|s| s.record.seq) else {
            return;
        };
        let Some(idx) = seq.checked_sub(front) else {
            return; // already dropped
        };
        if let Some(slot) = self.slots.get_mut(idx as usize) {
            slot.acked = true;
        }
        self.collect();
    }

    /// Removes acked records from the front.
    pub(super) fn collect(&mut self) {
        while self.slots.front().is_some_and(|s| s.acked) {
            if let Some(old) = self.slots.pop_front() {
                self.bytes -= old.record.msg.size() as u64;
                self.read_pos = self.read_pos.saturating_sub(1);
            }
        }
    }

    /// Drops the oldest record; returns how many unacked records went and their seqs.
    pub(super) fn drop_oldest(&mut self) -> (u64, std::ops::Range<u64>) {
        let Some(old) = self.slots.pop_front() else {
            return (0, 0..0);
        };
        self.bytes -= old.record.msg.size() as u64;
        self.read_pos = self.read_pos.saturating_sub(1);
        let seq = old.record.seq;
        (u64::from(!old.acked), seq..seq + 1)
    }

    /// Hands every unacked record to the sink again, from the oldest.
    pub(super) fn rewind(&mut self) {
        self.read_pos = 0;
    }

    pub(super) fn pending(&self) -> u64 {
        self.slots.iter().filter(|s| !s.acked).count() as u64
    }

    /// Unacked records below `seq`; counts out-of-order acks in that range as pending
    /// (at most a sink's window), so the cost stays O(1) per call.
    pub(super) fn pending_below(&self, seq: u64) -> u64 {
        let Some(front) = self.slots.front().map(|s| s.record.seq) else {
            return 0;
        };
        seq.saturating_sub(front).min(self.pending())
    }

    pub(super) fn oldest_received_at(&self) -> Option<u64> {
        self.slots
            .iter()
            .find(|s| !s.acked)
            .map(|s| s.record.msg.received_at)
    }
}
