//! Which records of the log are acked: a floor below which everything is, and the
//! ranges above it that were acked out of order (acks that overtook older records).

use std::collections::BTreeMap;

/// Which seqs are acked: everything below `floor`, plus ranges above it.
#[derive(Debug)]
pub(super) struct Acks {
    /// The contiguous ack point, persisted in the position file.
    pub(super) floor: u64,
    /// Acked ranges above `floor`, start → end (exclusive): disjoint, never adjacent to
    /// each other or to `floor`. Small: it only holds acks that overtook older records.
    pub(super) ahead: BTreeMap<u64, u64>,
    /// Total length of the ranges in `ahead`.
    pub(super) ahead_count: u64,
}

impl Acks {
    pub(super) fn new(floor: u64) -> Self {
        Acks {
            floor,
            ahead: BTreeMap::new(),
            ahead_count: 0,
        }
    }

    pub(super) fn is_acked(&self, seq: u64) -> bool {
        seq < self.floor
            || self
                .ahead
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &end)| seq < end)
    }

    /// How many seqs in `from..to` are acked.
    pub(super) fn acked_in(&self, from: u64, to: u64) -> u64 {
        let mut count = self.floor.min(to).saturating_sub(from);
        let low = from.max(self.floor);
        if low >= to {
            return count;
        }
        for (&start, &end) in self.ahead.range(..to).rev() {
            if end <= low {
                break;
            }
            count += end.min(to) - start.max(low);
        }
        count
    }

    /// How many seqs in `floor..to` are acked: [`Acks::acked_in`] from the floor, for the
    /// backlog gauge, which is refreshed on every ack. With `connections > 1` the
    /// connections' acks overtake each other and `ahead` holds thousands of ranges, so this
    /// walks it from whichever side of `to` has fewer: the ranges below `to` summed, or all
    /// of them less the ones above. (Summing the ranges below alone took 68% of the
    /// gateway's CPU while ten paced connections drained a backlog.)
    pub(super) fn acked_below(&self, to: u64) -> u64 {
        let mut below = self.ahead.range(..to).rev();
        let mut from_top = self.ahead.iter().rev();
        let (mut sum_below, mut sum_above) = (0, 0);
        loop {
            match below.next() {
                // Every range starts above the floor.
                Some((&start, &end)) => sum_below += end.min(to) - start,
                None => return sum_below,
            }
            match from_top.next() {
                Some((&start, &end)) if end > to => sum_above += end - start.max(to),
                // Disjoint and descending: the rest end at or below `to` too.
                _ => return self.ahead_count - sum_above,
            }
        }
    }

    /// Marks `from..to` acked (idempotent).
    pub(super) fn ack_range(&mut self, from: u64, to: u64) {
        let mut from = from.max(self.floor);
        let mut to = to;
        if from >= to {
            return;
        }
        let touching: Vec<(u64, u64)> = self
            .ahead
            .range(..=to)
            .rev()
            .take_while(|(_, &end)| end >= from)
            .map(|(&start, &end)| (start, end))
            .collect();
        for (start, end) in touching {
            self.ahead.remove(&start);
            self.ahead_count -= end - start;
            from = from.min(start);
            to = to.max(end);
        }
        if from == self.floor {
            self.floor = to;
        } else {
            self.ahead.insert(from, to);
            self.ahead_count += to - from;
        }
    }

    /// Acks everything below `to`.
    pub(super) fn advance_floor(&mut self, to: u64) {
        self.ack_range(self.floor, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_track_ranges_above_the_floor() {
        let mut acks = Acks::new(1);
        for seq in [5, 3, 4, 9, 9, 7] {
            acks.ack_range(seq, seq + 1);
        }
        assert_eq!((acks.floor, acks.ahead_count), (1, 5));
        assert_eq!(acks.acked_in(1, 10), 5);
        assert_eq!(acks.acked_in(4, 8), 3);
        assert!(acks.is_acked(4) && !acks.is_acked(6) && !acks.is_acked(2));
        acks.ack_range(1, 3);
        assert_eq!((acks.floor, acks.ahead_count), (6, 2));
        acks.advance_floor(8);
        assert_eq!((acks.floor, acks.ahead_count), (8, 1));
        acks.ack_range(8, 9);
        assert_eq!((acks.floor, acks.ahead_count), (10, 0));
    }

    #[test]
    fn acked_below_counts_as_acked_in_whichever_side_it_walks() {
        // Ten connections' acks: every seq of one residue class first, so `ahead` holds
        // many disjoint ranges, then some of a second class, merging pairs of them.
        let mut acks = Acks::new(1);
        for seq in (3..2_000).step_by(10) {
            acks.ack_range(seq, seq + 1);
        }
        for seq in (4..1_000).step_by(10) {
            acks.ack_range(seq, seq + 1);
        }
        assert!(acks.ahead.len() > 150, "{}", acks.ahead.len());
        for to in [
            0, 1, 2, 3, 4, 5, 57, 999, 1_000, 1_004, 1_005, 1_500, 1_994, 1_995, 5_000,
        ] {
            assert_eq!(acks.acked_below(to), acks.acked_in(1, to), "to {to}");
        }
        acks.ack_range(1, 3);
        assert_eq!(acks.acked_below(10), acks.acked_in(acks.floor, 10));
    }
}
