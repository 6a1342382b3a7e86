//! Reading the log: batches past the read cursor (with `live_first`, from two lanes),
//! the read limit, rewinding to the oldest unacked record, and the walk over segments that
//! steps past lost or corrupt records.

use std::io;

use tracing::warn;

use super::frame::{read_frame, resync, Frame, SegmentReader};
use super::{DiskLog, LiveLane, Pos, ReadBatch, Record, Step, EXPIRE_BUDGET};
use crate::buffer::codec;

impl DiskLog {
    /// Up to `max` unacked records from the read cursor on, oldest first; advances the
    /// cursor past them. Records already acked are skipped; corrupt ones are skipped and
    /// counted (see the module doc). An empty result means the reader caught up.
    #[cfg(test)]
    pub fn read(&mut self, max: usize) -> io::Result<Vec<Record>> {
        self.read_batch(max, None).map(|batch| batch.records)
    }

    /// Like [`DiskLog::read`], but records received before `cutoff_ms` (Unix ms) are
    /// acked instead of returned, and counted in [`ReadBatch::expired`] (the `ttl` bound).
    /// At most 10,000 are dropped per call: an empty batch with `expired > 0` means "call
    /// again".
    #[cfg(test)]
    pub fn read_unexpired(&mut self, max: usize, cutoff_ms: u64) -> io::Result<ReadBatch> {
        self.read_batch(max, Some(cutoff_ms))
    }

    pub(super) fn read_batch(
        &mut self,
        max: usize,
        cutoff_ms: Option<u64>,
    ) -> io::Result<ReadBatch> {
        let mut pos = self.cursor;
        let mut reader = self.reader.take();
        let mut batch = ReadBatch::default();
        let result = self.fill_batch(&mut batch, max, cutoff_ms, &mut pos, &mut reader);
        self.cursor = pos;
        self.reader = reader;
        if let Err(e) = self.collect() {
            warn!(dir = %self.dir.display(), error = %e, "cannot remove acked buffer segments");
        }
        match result {
            // The records before the error were taken past the cursor: hand them over; the
            // error comes back on the next call.
            Err(e) if batch.records.is_empty() && batch.expired == 0 => Err(e),
            _ => Ok(batch),
        }
    }

    pub(super) fn fill_batch(
        &mut self,
        batch: &mut ReadBatch,
        max: usize,
        cutoff_ms: Option<u64>,
        pos: &mut Pos,
        reader: &mut Option<SegmentReader>,
    ) -> io::Result<()> {
        while batch.records.len() < max && batch.expired < EXPIRE_BUDGET {
            match self.step(pos, reader)? {
                Step::End => break,
                Step::Lost { segment, from, to } => self.note_lost(segment, from, to),
                Step::Record { seq, at, body } => {
                    if seq == self.acks.floor {
                        self.floor_checkpoint = Some(at);
                    }
                    if self.acks.is_acked(seq) {
                        continue;
                    }
                    match codec::decode(body) {
                        Ok((_, msg)) if cutoff_ms.is_some_and(|c| msg.received_at < c) => {
                            self.acks.ack_range(seq, seq + 1);
                            batch.expired += 1;
                        }
                        Ok((_, msg)) => batch.records.push(Record { seq, msg }),
                        Err(e) => {
                            warn!(dir = %self.dir.display(), seq, error = %e, "skipping undecodable buffer record");
                            self.note_lost(at.segment, seq, seq + 1);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads stop before `seq` (exclusive) until raised again: the buffer hands records
    /// to the sink only once its sync policy has made them durable.
    pub fn set_read_limit(&mut self, seq: u64) {
        self.read_limit = seq;
    }

    /// Moves the read cursor back to the oldest unacked record: after a reconnect
    /// everything unconfirmed is read (and sent) again. Ends a live lane
    /// ([`DiskLog::split_lanes`] starts a new one).
    pub fn rewind(&mut self) {
        self.cursor = self.floor_position();
        self.live = None;
    }

    /// `drain = "live_first"`: records below `boundary` (at most the next seq) become the
    /// backlog, and records from `boundary` on are read before it by
    /// [`DiskLog::read_lanes`]. Nothing to do (and no lane) when nothing below `boundary`
    /// is pending. Call it after [`DiskLog::rewind`]. Placing the live cursor inside the
    /// log reads the records of one segment at most.
    pub fn split_lanes(&mut self, boundary: u64) {
        self.live = None;
        let boundary = boundary.clamp(self.acks.floor, self.next_seq);
        if self.pending_below(boundary) == 0 {
            return;
        }
        let Some(last) = self.segments.back() else {
            return;
        };
        let mut cursor = Pos {
            segment: last.first_seq,
            offset: last.bytes,
            next_seq: self.next_seq,
        };
        if boundary < self.next_seq {
            // Walk the segment that holds `boundary` up to it.
            let idx = self
                .segments
                .partition_point(|s| s.first_seq <= boundary)
                .saturating_sub(1);
            let mut pos = self.segment_start(idx);
            let mut reader = None;
            while pos.next_seq < boundary {
                match self.step(&mut pos, &mut reader) {
                    Ok(Step::Record { .. } | Step::Lost { .. }) => {}
                    Ok(Step::End) | Err(_) => break,
                }
            }
            if pos.next_seq != boundary {
                // Not readable that far (unsynced, or unreadable): the lane starts at the
                // end, so no record is in both lanes.
                return self.split_lanes(self.next_seq);
            }
            cursor = pos;
        }
        self.live = Some(LiveLane {
            boundary,
            cursor,
            reader: None,
        });
    }

    /// The first live seq while a live lane runs (records below it are the backlog).
    pub fn live_boundary(&self) -> Option<u64> {
        self.live.as_ref().map(|l| l.boundary)
    }

    /// Unacked records with a seq below `seq`.
    pub fn pending_below(&self, seq: u64) -> u64 {
        let floor = self.acks.floor;
        let to = seq.min(self.next_seq);
        if to <= floor {
            return 0;
        }
        (to - floor) - self.acks.acked_below(to)
    }

    /// Up to `max` unacked records, oldest first, advancing the read cursor past them.
    /// Records received before `cutoff_ms` (Unix ms; the `ttl` bound) are acked instead of
    /// returned and counted in [`ReadBatch::expired`] — at most 10,000 per call: an empty
    /// batch with `expired > 0` means "call again". Acked records are skipped; corrupt ones
    /// are skipped and counted (see the module doc). With a live lane
    /// ([`DiskLog::split_lanes`]) the live records come first and the backlog fills the
    /// rest of the batch. An empty result means the reader caught up.
    pub fn read_lanes(&mut self, max: usize, cutoff_ms: Option<u64>) -> io::Result<ReadBatch> {
        let Some(mut lane) = self.live.take() else {
            return self.read_batch(max, cutoff_ms);
        };
        let mut batch = ReadBatch::default();
        let mut result = self.fill_batch(
            &mut batch,
            max,
            cutoff_ms,
            &mut lane.cursor,
            &mut lane.reader,
        );
        let mut merged = false;
        if result.is_ok() && batch.records.len() < max {
            // The backlog cursor never reads past the boundary: those are the live lane's.
            let limit = self.read_limit;
            self.read_limit = limit.min(lane.boundary);
            let mut pos = self.cursor;
            let mut reader = self.reader.take();
            result = self.fill_batch(&mut batch, max, cutoff_ms, &mut pos, &mut reader);
            self.read_limit = limit;
            self.cursor = pos;
            self.reader = reader;
            merged = result.is_ok() && pos.next_seq >= lane.boundary;
        }
        if merged {
            // The backlog has been read: one cursor again, where the live lane stands.
            self.cursor = lane.cursor;
            self.reader = lane.reader;
        } else {
            self.live = Some(lane);
        }
        if let Err(e) = self.collect() {
            warn!(dir = %self.dir.display(), error = %e, "cannot remove acked buffer segments");
        }
        match result {
            Err(e) if batch.records.is_empty() && batch.expired == 0 => Err(e),
            _ => Ok(batch),
        }
    }

    /// The next record from `pos` on, moving `pos` past it.
    pub(super) fn step(
        &mut self,
        pos: &mut Pos,
        reader: &mut Option<SegmentReader>,
    ) -> io::Result<Step> {
        loop {
            if pos.next_seq >= self.next_seq.min(self.read_limit) {
                return Ok(Step::End);
            }
            let Some(idx) = self.segment_index(pos.segment) else {
                // Its segment was removed; segments only go from the front, so whatever
                // is left starts after it.
                *pos = self.segment_start(0);
                continue;
            };
            let end = self.segment_end(idx);
            let seg_bytes = self.segments[idx].bytes;
            if pos.next_seq >= end || pos.offset >= seg_bytes {
                if pos.next_seq < end {
                    let from = pos.next_seq;
                    pos.next_seq = end;
                    pos.offset = seg_bytes;
                    return Ok(Step::Lost {
                        segment: pos.segment,
                        from,
                        to: end,
                    });
                }
                if idx + 1 >= self.segments.len() {
                    return Ok(Step::End);
                }
                *pos = self.segment_start(idx + 1);
                continue;
            }
            if idx + 1 == self.segments.len() {
                self.flush_for_read()?;
            }
            let r = match reader {
                Some(r) if r.segment == pos.segment => r,
                _ => reader.insert(SegmentReader::open(&self.segments[idx].path, pos.segment)?),
            };
            match read_frame(r, pos.offset, seg_bytes, self.max_body)? {
                Frame::Valid { seq, len, body } if seq >= pos.next_seq && seq < end => {
                    if seq > pos.next_seq {
                        let from = pos.next_seq;
                        pos.next_seq = seq;
                        return Ok(Step::Lost {
                            segment: pos.segment,
                            from,
                            to: seq,
                        });
                    }
                    let at = *pos;
                    pos.offset += len;
                    pos.next_seq = seq + 1;
                    return Ok(Step::Record { seq, at, body });
                }
                _ => {
                    let from = pos.next_seq;
                    match resync(r, pos.offset + 1, seg_bytes, self.max_body, from, end)? {
                        Some((offset, seq)) => {
                            pos.offset = offset;
                            pos.next_seq = seq;
                        }
                        None => {
                            pos.offset = seg_bytes;
                            pos.next_seq = end;
                        }
                    }
                    return Ok(Step::Lost {
                        segment: pos.segment,
                        from,
                        to: pos.next_seq,
                    });
                }
            }
        }
    }

    /// Seqs `from..to` of `segment` cannot be read: count the unacked ones as corrupt and
    /// treat them as acked; remember to keep the segment for inspection.
    pub(super) fn note_lost(&mut self, segment: u64, from: u64, to: u64) {
        if let Some(idx) = self.segment_index(segment) {
            self.segments[idx].damaged = true;
        }
        let lost = (to - from) - self.acks.acked_in(from, to);
        self.acks.ack_range(from, to);
        if lost > 0 {
            self.corrupt += lost;
            warn!(dir = %self.dir.display(), segment, from, to, lost, "skipping corrupt buffer records");
        }
    }
}
