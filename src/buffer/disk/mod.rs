//! The durable storage behind one sink's buffer: a segmented, append-only log in
//! `data_dir/buffers/<sink>/`.
//!
//! Input comes from the router ([`DiskLog::append`], then [`DiskLog::prepare_sync`] +
//! [`SyncHandles::sync`] before the devices' PUBACKs are released); output goes to the sink
//! worker ([`DiskLog::read`], [`DiskLog::ack`], [`DiskLog::rewind`]). Everything here is
//! synchronous: the caller keeps the log behind a mutex and runs the fsyncs
//! from [`SyncHandles`] after releasing it.
//!
//! # Files
//!
//! - `{first_seq:020}.seg`: a segment. Records are appended to the last (*active*) segment;
//!   a new one is started when the next record would push the active one past
//!   `segment_bytes` (a record larger than that gets a segment of its own). A record never
//!   spans two segments. Sequence numbers are contiguous across the log, so a sealed
//!   segment holds exactly the seqs from its own `first_seq` up to the next segment's
//!   `first_seq - 1`; that is all the log keeps in memory about it (memory use does not
//!   grow with the buffered volume: no per-record index).
//! - `position`: the lowest unacked seq, `u64 LE` + `crc32c` of those 8 bytes (`u32 LE`),
//!   replaced atomically (`position.tmp`, fsync, rename, fsync of the directory).
//! - `*.corrupt`: segments that held corrupt records, moved aside for inspection once
//!   everything else in them was acked, and corrupt tails cut off at start-up. Never read.
//!   Only the newest are kept, within [`DiskLogOptions::corrupt_max_files`] and
//!   `corrupt_max_bytes` (pruned at start-up and whenever one is added, oldest first), so
//!   failing storage that keeps producing them does not fill the disk.
//!
//! # Record format
//!
//! `[magic u32 = 0x45425231 "EBR1"][body_len u32][crc32c(body) u32][body]`, all little
//! endian; the body is described in [`super::codec`]. `body_len` above
//! `segment_bytes + 1 MiB` is corrupt by definition (appends that large are refused with
//! `InvalidInput`), and a length that runs past the end of its segment never makes the
//! reader allocate more than the file holds.
//!
//! # Acks and deletion
//!
//! Acks may arrive out of order. The log keeps the contiguous ack point (`floor`: every
//! seq below it is acked) and a small set of acked ranges above it. A segment is deleted
//! when every record in it *and before it* is acked (segments only ever leave from the
//! front, which keeps "first seq of the next segment" a valid upper bound after a
//! restart); the active segment is never deleted, it is just left behind when the log
//! rolls.
//!
//! The position file is written before a segment is removed, and otherwise on an ack at
//! most every [`POSITION_SAVE_INTERVAL`] (200 ms), and on drop. **Duplicate window**:
//! after a crash the log forgets (and so re-delivers) the acks made since the last save —
//! at most 200 ms of acks, or all acks since the last one when acking then stopped —
//! plus every out-of-order ack above the contiguous point. [`DiskLog::save_position`]
//! closes that window on demand (shutdown, and every `sync_interval` with
//! `sync = "interval"`).
//!
//! # Durability (fsync policy)
//!
//! `append` only fills a `BufWriter`. `prepare_sync` hands the bytes to the OS and returns
//! the files to `fdatasync` (the active segment, any segment sealed since the last
//! completed sync) and, when segments were created, the directory. Only after
//! [`SyncHandles::sync`] returned `Ok` are the records appended before `prepare_sync`
//! durable. **Loss window** on power loss or `kill -9`: records appended after the last
//! completed sync (a device never got a PUBACK for them). Concurrent callers are safe:
//! each one's handles cover everything appended before its own `prepare_sync`, even when
//! another caller's fsync of the same file is still running.
//!
//! After a failed write the active segment is sealed as it is, the next append starts a
//! fresh segment, and the next `prepare_sync` returns an error once (records buffered
//! before the failure may be lost and must not be reported as durable).
//!
//! # Reading
//!
//! One read cursor (the sink worker's) walks the log from the oldest unacked record; a read
//! that reaches the active segment first hands its buffered appends to the OS. `rewind`
//! goes back to the oldest unacked record: to where that record was last seen, or else to
//! the start of its segment (skipping acked records costs a read of them, at most one
//! segment). The `ttl` bound is applied while reading ([`DiskLog::read_lanes`]):
//! expired records are acked and counted instead of returned, so age never needs an index.
//!
//! `drain = "live_first"` adds a second cursor ([`DiskLog::split_lanes`]): everything
//! appended before the split is the *backlog*; records from the split on (the *live*
//! lane) are read first by [`DiskLog::read_lanes`], and the backlog cursor fills what room
//! is left, oldest first, never past the split. When the backlog cursor reaches the split
//! the lanes merge into one cursor again. Both lanes read the same segments and ack
//! through the same [`Acks`]: the live lane's acks are out of order until the backlog is
//! acked, so after a crash they are forgotten and those records delivered again
//! (duplicates, never a loss). `rewind` drops the lane; the caller splits again.
//!
//! # Recovery and corruption
//!
//! `open` reads the position file (missing or bad: start at the first segment, nothing is
//! counted as lost), deletes segments entirely below it, and verifies only the *last*
//! segment record by record, so start-up time does not grow with the buffered volume. A
//! tail that does not verify and is not followed by any valid record is truncated (a torn
//! write: counted in `truncated_bytes`; if it was a complete record with a bad checksum,
//! also one corrupt record, and the cut bytes are kept in a `*.corrupt` file). Sealed
//! segments are verified lazily as they are read: a record that does not verify is
//! skipped by scanning forward for the next magic whose record verifies (resync); every
//! unacked seq skipped that way is counted as corrupt (see [`DiskLog::take_corrupt_count`]),
//! treated as acked, and the segment is marked damaged, so it is renamed `*.corrupt`
//! instead of deleted. Corruption is never a panic and never a refusal to start.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::warn;

use super::codec;
use super::Record;

mod acks;
mod files;
mod frame;
mod read;
mod write;

use acks::Acks;
use files::{list_segments, prune_corrupt, read_position, recover_tail, retire};
use frame::SegmentReader;
use write::{SyncProgress, UnsyncedSegment};

/// How often, at most, an ack rewrites the position file (the duplicate window).
pub const POSITION_SAVE_INTERVAL: Duration = Duration::from_millis(200);

const POSITION_FILE: &str = "position";
const POSITION_TMP: &str = "position.tmp";
const POSITION_LEN: usize = 12;
const SEGMENT_SUFFIX: &str = ".seg";
const CORRUPT_SUFFIX: &str = ".corrupt";
/// Slack above `segment_bytes` for the largest body the log accepts.
const BODY_SLACK: u64 = 1 << 20;
const WRITE_BUFFER: usize = 256 * 1024;
const READ_BUFFER: usize = 64 * 1024;
/// Window of bytes searched at a time for the next magic after a corrupt record.
const RESYNC_CHUNK: usize = 64 * 1024;
/// Most expired records one read call drops before returning, so one call
/// never holds the caller's lock for a whole backlog.
const EXPIRE_BUDGET: u64 = 10_000;

/// Where the log lives and how large its segments grow.
#[derive(Debug, Clone)]
pub struct DiskLogOptions {
    /// `data_dir/buffers/<sink>`; created if missing.
    pub dir: PathBuf,
    /// A segment is sealed when the next record would take it past this size.
    pub segment_bytes: u64,
    /// `*.corrupt` files kept for inspection, at most this many…
    pub corrupt_max_files: usize,
    /// …and this many bytes; the oldest are deleted first.
    pub corrupt_max_bytes: u64,
}

/// The `*.corrupt` files of a buffer after a prune.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CorruptFiles {
    pub files: usize,
    pub bytes: u64,
    /// Deleted by this prune.
    pub deleted: usize,
}

/// What [`DiskLog::open`] found and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Unacked records in the log after opening.
    pub records: u64,
    /// Bytes cut off the end of the last segment (torn or corrupt tail).
    pub truncated_bytes: u64,
    /// Incomplete records cut off the tail (a write torn by a crash).
    pub torn_records: u64,
    /// Complete records with a bad checksum found in the tail (also reported by the first
    /// [`DiskLog::take_corrupt_count`]).
    pub corrupt_records: u64,
    /// Files moved aside for inspection (`*.corrupt`): a cut-off corrupt tail, a position
    /// file with a bad checksum.
    pub renamed: Vec<PathBuf>,
}

/// One [`DiskLog::read_lanes`] batch.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<Record>,
    /// Records older than the cutoff that were dropped (acked) instead of returned.
    pub expired: u64,
}

/// What the log keeps in memory per segment file.
#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// File length (for the active segment: including bytes still in the write buffer).
    bytes: u64,
    /// A corrupt record was found in it: rename instead of delete.
    damaged: bool,
}

/// A place in the log: the next record to look at is at `offset` in segment `segment`
/// (its `first_seq`) and should carry `next_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    segment: u64,
    offset: u64,
    next_seq: u64,
}

/// One step of walking the log.
enum Step {
    Record {
        seq: u64,
        at: Pos,
        body: Bytes,
    },
    /// Seqs `from..to` of `segment` are missing or corrupt (may be empty: garbage
    /// between intact records).
    Lost {
        segment: u64,
        from: u64,
        to: u64,
    },
    End,
}

/// The durable log of one sink. See the module documentation.
pub struct DiskLog {
    dir: PathBuf,
    segment_bytes: u64,
    /// Largest body accepted on append and believed on read.
    max_body: u64,
    /// Oldest first; the last one is the active segment. Never empty.
    segments: VecDeque<Segment>,
    /// Appends to the active segment; None after a write error until the next append
    /// starts a fresh segment.
    writer: Option<BufWriter<File>>,
    /// A second handle on the active segment for the fsync outside the lock.
    active_sync: Option<Arc<File>>,
    /// The seq the next append gets.
    next_seq: u64,
    acks: Acks,
    /// Where `read` goes on.
    cursor: Pos,
    reader: Option<SegmentReader>,
    /// Position of the record `floor` had when it was last read: lets `rewind` skip the
    /// acked part of a segment without reading it again.
    floor_checkpoint: Option<Pos>,
    /// Sum of `Segment::bytes`.
    total_bytes: u64,
    /// Bytes appended since open; with `segments_created`, what a sync has to cover.
    appended_bytes: u64,
    segments_created: u64,
    unsynced_sealed: Vec<UnsyncedSegment>,
    progress: Arc<SyncProgress>,
    /// A write failed since the last `prepare_sync`: the next one must report it.
    write_failed: bool,
    /// The floor last written to the position file, and when.
    saved_floor: u64,
    last_save: Instant,
    /// Corrupt records found and not yet taken by `take_corrupt_count`.
    corrupt: u64,
    /// Bounds on the `*.corrupt` files kept (files, bytes).
    corrupt_limits: (usize, u64),
    /// The `*.corrupt` files after the last prune.
    corrupt_files: CorruptFiles,
    /// `(floor, received_at)` of the oldest pending record, valid while `floor` is.
    oldest: Option<(u64, u64)>,
    /// Reused encoding buffer.
    scratch: Vec<u8>,
    /// False only for a simulated crash in tests.
    save_on_drop: bool,
    /// Reads stop before this seq: records are handed out only once synced.
    read_limit: u64,
    /// `drain = "live_first"` while a backlog is read behind the live records.
    live: Option<LiveLane>,
}

/// The live lane of [`DiskLog::split_lanes`]: its own cursor over the records from
/// `boundary` on; the log's main cursor reads the backlog below `boundary`.
struct LiveLane {
    boundary: u64,
    cursor: Pos,
    reader: Option<SegmentReader>,
}

impl DiskLog {
    /// Opens (or creates) the log in `opts.dir`, repairing what a crash left behind.
    pub fn open(opts: DiskLogOptions) -> io::Result<(DiskLog, Recovery)> {
        if opts.segment_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "segment_bytes must be above 0",
            ));
        }
        let dir = opts.dir;
        let max_body = (opts.segment_bytes + BODY_SLACK).min(u64::from(u32::MAX));
        fs::create_dir_all(&dir)?;
        // Left by a crash during a save; harmless (the next save truncates it), so a
        // failure to remove it is too.
        let _ = fs::remove_file(dir.join(POSITION_TMP));
        let mut recovery = Recovery::default();
        let position = read_position(&dir, &mut recovery);

        let mut segments = VecDeque::new();
        for (first_seq, path) in list_segments(&dir)? {
            let bytes = fs::metadata(&path)?.len();
            segments.push_back(Segment {
                first_seq,
                path,
                bytes,
                damaged: false,
            });
        }
        let mut next_seq = match segments.back_mut() {
            Some(last) => recover_tail(last, max_body, &mut recovery)?,
            None => position.unwrap_or(1).max(1),
        };
        let first = segments.front().map_or(next_seq, |s| s.first_seq);
        let floor = position.unwrap_or(first).max(first);
        // Acked records can be missing from the tail when a crash lost unsynced appends
        // that had already been delivered: never hand out their seqs again.
        let tail_lost_acked = floor > next_seq;
        next_seq = next_seq.max(floor);
        // Segments entirely below the position were acked before the last run ended.
        loop {
            let end = match segments.get(1) {
                Some(next) => next.first_seq,
                None if tail_lost_acked => next_seq,
                None => break,
            };
            if end > floor {
                break;
            }
            let Some(segment) = segments.pop_front() else {
                break;
            };
            if let Some(path) = retire(&segment)? {
                recovery.renamed.push(path);
            }
        }

        let limits = (opts.corrupt_max_files, opts.corrupt_max_bytes);
        let corrupt_files = prune_corrupt(&dir, limits);

        let mut log = DiskLog {
            dir,
            segment_bytes: opts.segment_bytes,
            max_body,
            segments,
            writer: None,
            active_sync: None,
            next_seq,
            acks: Acks::new(floor),
            cursor: Pos {
                segment: 0,
                offset: 0,
                next_seq: floor,
            },
            reader: None,
            floor_checkpoint: None,
            total_bytes: 0,
            appended_bytes: 0,
            segments_created: 0,
            unsynced_sealed: Vec::new(),
            progress: Arc::default(),
            write_failed: false,
            saved_floor: position.unwrap_or(0),
            last_save: Instant::now(),
            corrupt: recovery.corrupt_records,
            corrupt_limits: limits,
            corrupt_files,
            oldest: None,
            scratch: Vec::new(),
            save_on_drop: true,
            read_limit: u64::MAX,
            live: None,
        };
        log.total_bytes = log.segments.iter().map(|s| s.bytes).sum();
        match log.segments.back() {
            Some(last) => {
                let file = OpenOptions::new().append(true).open(&last.path)?;
                log.active_sync = Some(Arc::new(file.try_clone()?));
                log.writer = Some(BufWriter::with_capacity(WRITE_BUFFER, file));
            }
            None => {
                log.start_segment()?;
                File::open(&log.dir)?.sync_all()?;
                log.progress
                    .segments
                    .store(log.segments_created, Ordering::Release);
            }
        }
        log.cursor = log.floor_position();
        recovery.records = log.pending();
        Ok((log, recovery))
    }

    /// Confirms `seq` (any order; unknown or repeated seqs are ignored). Deletes the
    /// segments that became fully acked (damaged ones are renamed `*.corrupt`) and saves
    /// the position as described in the module doc — an fsync under the caller's lock,
    /// at most every 200 ms and once per removed segment. The ack itself is kept even when
    /// the returned file error says the cleanup failed.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        if seq < self.next_seq {
            self.acks.ack_range(seq, seq + 1);
        }
        self.collect()
    }

    /// Writes the position file now if it is behind (shutdown, `sync = "interval"`): closes the
    /// duplicate window.
    pub fn save_position(&mut self) -> io::Result<()> {
        if self.acks.floor != self.saved_floor {
            self.write_position()?;
        }
        Ok(())
    }

    /// For `when_full = "drop_oldest"`: removes the oldest segment and returns how many
    /// unacked records it held. The active segment is only dropped when it is the only
    /// one: then everything is dropped and a fresh segment started.
    pub fn drop_oldest_segment(&mut self) -> io::Result<u64> {
        let before = self.pending();
        if self.segments.len() > 1 {
            let end = self.segments[1].first_seq;
            self.acks.advance_floor(end);
            let dropped = before - self.pending();
            self.collect()?;
            return Ok(dropped);
        }
        if self.active_bytes() == 0 {
            return Ok(0);
        }
        self.acks.advance_floor(self.next_seq);
        if let Some(writer) = self.writer.take() {
            // The buffered records are being dropped with the rest: do not write them.
            drop(writer.into_parts());
        }
        // A new active segment at `next_seq` (or the old one emptied, if it starts
        // there); the old one is then below the floor and `collect` removes it.
        self.start_segment()?;
        self.collect()?;
        Ok(before)
    }

    /// Every seq below this is acked (or dropped).
    pub fn floor(&self) -> u64 {
        self.acks.floor
    }

    /// Unacked records (including those read and in flight).
    pub fn pending(&self) -> u64 {
        self.next_seq - self.acks.floor - self.acks.ahead_count
    }

    /// Bytes in the live segment files (including appends still in the write buffer).
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The seq the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// `received_at` of the oldest unacked record, for the age gauge. Cached; may read
    /// the log (from the read cursor or the last known position of the oldest record).
    /// I/O errors are logged and give None.
    pub fn oldest_pending_received_at(&mut self) -> Option<u64> {
        if self.pending() == 0 {
            return None;
        }
        if let Some((floor, received_at)) = self.oldest {
            if floor == self.acks.floor {
                return Some(received_at);
            }
        }
        let mut pos = if self.cursor.next_seq <= self.acks.floor
            && self.segment_index(self.cursor.segment).is_some()
        {
            self.cursor
        } else {
            self.floor_position()
        };
        let mut reader = None;
        loop {
            match self.step(&mut pos, &mut reader) {
                Err(e) => {
                    warn!(dir = %self.dir.display(), error = %e, "cannot read the oldest buffer record");
                    return None;
                }
                Ok(Step::End) => return None,
                Ok(Step::Lost { segment, from, to }) => self.note_lost(segment, from, to),
                Ok(Step::Record { seq, at, body }) => {
                    if self.acks.is_acked(seq) {
                        continue;
                    }
                    match codec::decode(body) {
                        Ok((_, msg)) => {
                            if seq == self.acks.floor {
                                self.floor_checkpoint = Some(at);
                                self.oldest = Some((seq, msg.received_at));
                            }
                            return Some(msg.received_at);
                        }
                        Err(_) => self.note_lost(at.segment, seq, seq + 1),
                    }
                }
            }
        }
    }

    /// The `*.corrupt` files kept (and deleted by the last prune).
    pub fn corrupt_files(&self) -> CorruptFiles {
        self.corrupt_files
    }

    /// Corrupt records found since the last call (at open and while reading).
    pub fn take_corrupt_count(&mut self) -> u64 {
        std::mem::take(&mut self.corrupt)
    }

    /// Removes the segments every record of which (and of every older one) is acked, and
    /// saves the position first when it does, or when the last save is old enough.
    fn collect(&mut self) -> io::Result<()> {
        let floor = self.acks.floor;
        let removable = self
            .segments
            .iter()
            .skip(1)
            .take_while(|s| s.first_seq <= floor)
            .count();
        if removable == 0 {
            if floor != self.saved_floor && self.last_save.elapsed() >= POSITION_SAVE_INTERVAL {
                self.write_position()?;
            }
            return Ok(());
        }
        // Position first: a crash in between leaves files below the position, which the
        // next open deletes, never a position that re-delivers deleted records' neighbours.
        // On a full disk the position file cannot be written either, and only removing
        // these segments frees space: remove them anyway and save the position after. A
        // crash in between re-delivers the acked records of the first segment left
        // (`open` starts there): duplicates, never a loss.
        let mut retry_position = false;
        if floor != self.saved_floor {
            match self.write_position() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::StorageFull => retry_position = true,
                Err(e) => return Err(e),
            }
        }
        for _ in 0..removable {
            let Some(segment) = self.segments.pop_front() else {
                break;
            };
            self.total_bytes -= segment.bytes;
            if retire(&segment)?.is_some() {
                self.corrupt_files = prune_corrupt(&self.dir, self.corrupt_limits);
            }
        }
        if retry_position {
            self.write_position()?;
        }
        Ok(())
    }

    fn write_position(&mut self) -> io::Result<()> {
        let floor = self.acks.floor;
        let mut bytes = [0; POSITION_LEN];
        bytes[..8].copy_from_slice(&floor.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..8]);
        bytes[8..].copy_from_slice(&crc.to_le_bytes());
        let tmp = self.dir.join(POSITION_TMP);
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        drop(file);
        fs::rename(&tmp, self.dir.join(POSITION_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        self.saved_floor = floor;
        self.last_save = Instant::now();
        Ok(())
    }

    fn active_bytes(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.bytes)
    }

    fn segment_index(&self, first_seq: u64) -> Option<usize> {
        let idx = self.segments.partition_point(|s| s.first_seq < first_seq);
        (self.segments.get(idx)?.first_seq == first_seq).then_some(idx)
    }

    /// One past the last seq segment `idx` can hold.
    fn segment_end(&self, idx: usize) -> u64 {
        self.segments
            .get(idx + 1)
            .map_or(self.next_seq, |s| s.first_seq)
    }

    fn segment_start(&self, idx: usize) -> Pos {
        let first_seq = self
            .segments
            .get(idx)
            .map_or(self.next_seq, |s| s.first_seq);
        Pos {
            segment: first_seq,
            offset: 0,
            next_seq: first_seq,
        }
    }

    /// A position at or before the oldest unacked record with nothing unacked skipped.
    fn floor_position(&self) -> Pos {
        let floor = self.acks.floor;
        if let Some(cp) = self.floor_checkpoint {
            if cp.next_seq <= floor && self.segment_index(cp.segment).is_some() {
                return cp;
            }
        }
        let idx = self
            .segments
            .partition_point(|s| s.first_seq <= floor)
            .saturating_sub(1);
        self.segment_start(idx)
    }
}

impl Drop for DiskLog {
    /// Hands buffered appends to the OS (no fsync) and saves the position.
    fn drop(&mut self) {
        if !self.save_on_drop {
            return;
        }
        if let Some(writer) = self.writer.as_mut() {
            if let Err(e) = writer.flush() {
                warn!(dir = %self.dir.display(), error = %e, "cannot write buffered records on close");
            }
        }
        if let Err(e) = self.save_position() {
            warn!(dir = %self.dir.display(), error = %e, "cannot save the buffer position on close");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;
    use std::time::Instant;

    use bytes::Bytes;
    use proptest::prelude::*;
    use tempfile::TempDir;

    use super::files::{segment_path, with_suffix};
    use super::write::SyncHandles;
    use super::*;
    use crate::message::{Message, Properties};

    impl DiskLog {
        /// What `kill -9` leaves: buffered appends never reach the file, the position is
        /// not saved.
        fn crash(mut self) {
            if let Some(writer) = self.writer.take() {
                drop(writer.into_parts());
            }
            self.save_on_drop = false;
        }
    }

    fn msg(n: u64) -> Message {
        Message {
            topic: format!("factory/{n}"),
            payload: Bytes::from(format!("m{n}")),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 1_000 + n,
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> (DiskLog, Recovery) {
        DiskLog::open(DiskLogOptions {
            dir: dir.to_path_buf(),
            segment_bytes,
            corrupt_max_files: 8,
            corrupt_max_bytes: 1 << 30,
        })
        .unwrap()
    }

    fn corrupt_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(CORRUPT_SUFFIX))
            .collect();
        names.sort();
        names
    }

    /// `.corrupt` files left by earlier runs are pruned at start-up to the newest within
    /// the count bound (8 here); other files are left alone.
    #[test]
    fn only_the_newest_corrupt_files_are_kept() {
        let dir = TempDir::new().unwrap();
        let name = |i: u64| format!("{i:020}{SEGMENT_SUFFIX}{CORRUPT_SUFFIX}");
        // Created oldest first: modification times never decrease, and names order
        // the ties the same way.
        for i in 1..=13 {
            fs::write(dir.path().join(name(i)), b"damaged").unwrap();
        }
        fs::write(dir.path().join("notes.txt"), b"kept").unwrap();
        let (mut log, _) = open(dir.path(), 4096);
        let seq = log.append(&msg(1)).unwrap();
        assert_eq!(seq, 1, "the .corrupt files are never read as segments");
        let kept: Vec<String> = (6..=13).map(name).collect();
        assert_eq!(corrupt_files(dir.path()), kept);
        assert_eq!(
            log.corrupt_files(),
            CorruptFiles {
                files: 8,
                bytes: 8 * 7,
                deleted: 5
            }
        );
        assert!(dir.path().join("notes.txt").exists());
        let again = prune_corrupt(dir.path(), (8, 1 << 30));
        assert_eq!(again.deleted, 0, "nothing more to prune");

        // The byte bound: 20 bytes keep the two newest 7-byte files.
        let again = prune_corrupt(dir.path(), (8, 20));
        assert_eq!((again.files, again.bytes, again.deleted), (2, 14, 6));
        assert_eq!(corrupt_files(dir.path()), [name(12), name(13)]);
    }

    fn record_len(seq: u64, m: &Message) -> u64 {
        let mut out = Vec::new();
        codec::encode(seq, m, &mut out).unwrap();
        out.len() as u64
    }

    fn sync(log: &mut DiskLog) {
        log.prepare_sync().unwrap().sync().unwrap();
    }

    fn append_n(log: &mut DiskLog, from: u64, to: u64) {
        for n in from..=to {
            assert_eq!(log.append(&msg(n)).unwrap(), n);
        }
    }

    fn read_all(log: &mut DiskLog) -> Vec<Record> {
        let mut all = Vec::new();
        loop {
            let batch = log.read(7).unwrap();
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    /// `*.seg` files with their lengths, oldest first.
    fn layout(dir: &Path) -> Vec<(PathBuf, u64)> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(_, path)| {
                let len = fs::metadata(&path).unwrap().len();
                (path, len)
            })
            .collect()
    }

    fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        files.sort();
        files
    }

    fn copy_dir(from: &Path) -> TempDir {
        let to = TempDir::new().unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
        }
        to
    }

    #[test]
    fn append_read_ack_rewind_and_reopen() {
        let dir = TempDir::new().unwrap();
        let (mut log, recovery) = open(dir.path(), 1 << 20);
        assert_eq!(recovery, Recovery::default());
        append_n(&mut log, 1, 5);
        assert_eq!(log.pending(), 5);
        let first = log.read(3).unwrap();
        assert_eq!(seqs(&first), [1, 2, 3]);
        assert_eq!(first[1].msg, msg(2));
        log.ack(2).unwrap(); // out of order
        log.ack(1).unwrap();
        assert_eq!(log.pending(), 3);
        assert_eq!(seqs(&log.read(10).unwrap()), [4, 5]);
        assert!(log.read(10).unwrap().is_empty());
        log.ack(4).unwrap();
        log.rewind();
        assert_eq!(seqs(&read_all(&mut log)), [3, 5]);
        log.ack(4).unwrap(); // repeated and unknown acks change nothing
        log.ack(99).unwrap();
        assert_eq!(log.pending(), 2);
        sync(&mut log);
        drop(log);

        let (mut log, recovery) = open(dir.path(), 1 << 20);
        assert_eq!(
            recovery.records, 3,
            "out-of-order ack of 4 is not persisted"
        );
        assert_eq!(seqs(&read_all(&mut log)), [3, 4, 5]);
        assert_eq!(log.append(&msg(6)).unwrap(), 6);
        assert_eq!(seqs(&log.read(10).unwrap()), [6]);
        assert_eq!(log.take_corrupt_count(), 0);
    }

    #[test]
    fn the_log_and_its_sync_handles_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<DiskLog>();
        assert_send::<SyncHandles>();
    }

    #[test]
    fn a_corrupt_position_file_is_moved_aside_and_everything_is_delivered() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        append_n(&mut log, 1, 3);
        log.read(3).unwrap();
        log.ack(1).unwrap();
        drop(log);
        let position = dir.path().join(POSITION_FILE);
        let mut bytes = fs::read(&position).unwrap();
        bytes[0] ^= 1;
        fs::write(&position, bytes).unwrap();
        let (mut log, recovery) = open(dir.path(), 1 << 20);
        assert_eq!(recovery.renamed, [with_suffix(&position, CORRUPT_SUFFIX)]);
        assert_eq!(seqs(&read_all(&mut log)), [1, 2, 3]);
    }

    #[test]
    fn segments_roll_and_are_deleted_only_when_all_their_records_are_acked() {
        let dir = TempDir::new().unwrap();
        let len = record_len(1, &msg(1));
        // Three records per segment.
        let (mut log, _) = open(dir.path(), len * 3);
        append_n(&mut log, 1, 10);
        sync(&mut log);
        let names: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(names, [1, 4, 7, 10]);
        let lens: Vec<u64> = (1..=10).map(|n| record_len(n, &msg(n))).collect();
        assert_eq!(log.bytes(), lens.iter().sum::<u64>());
        assert_eq!(seqs(&log.read(10).unwrap()), (1..=10).collect::<Vec<_>>());
        for seq in [1, 2, 4, 5, 6] {
            log.ack(seq).unwrap();
        }
        assert_eq!(layout(dir.path()).len(), 4, "segment 1 still holds seq 3");
        log.ack(3).unwrap();
        let names: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(names, [7, 10]);
        assert_eq!(log.bytes(), lens[6..].iter().sum::<u64>());
        for seq in 7..=10 {
            log.ack(seq).unwrap();
        }
        // The active segment stays (empty of unacked records) for the next appends.
        assert_eq!(layout(dir.path()).len(), 1);
        assert_eq!(log.pending(), 0);
        // The position was saved with the deletions: a crash re-delivers nothing deleted.
        log.crash();
        let (mut log, recovery) = open(dir.path(), len * 3);
        assert!(recovery.records <= 1);
        assert!(read_all(&mut log).iter().all(|r| r.seq == 10));
    }

    #[test]
    fn a_record_larger_than_a_segment_gets_one_of_its_own_and_huge_ones_are_refused() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 100);
        log.append(&msg(1)).unwrap();
        let big = Message {
            payload: Bytes::from(vec![7; 500]),
            ..msg(2)
        };
        assert_eq!(log.append(&big).unwrap(), 2);
        log.append(&msg(3)).unwrap();
        sync(&mut log);
        let names: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(names, [1, 2, 3]);
        let huge = Message {
            payload: Bytes::from(vec![0; 2 << 20]),
            ..msg(4)
        };
        let err = log.append(&huge).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(log.next_seq(), 4);
        let all = read_all(&mut log);
        assert_eq!(seqs(&all), [1, 2, 3]);
        assert_eq!(all[1].msg, big);
    }

    #[test]
    fn properties_and_binary_payloads_survive_the_disk() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        let m = Message {
            payload: Bytes::from_static(&[0, 0xff, 0x45, 0x42, 0x52, 0x31]),
            retain: true,
            properties: Some(Box::new(Properties {
                user_properties: vec![("a".into(), "b".into())],
                correlation_data: Some(Bytes::from_static(&[1, 2])),
                message_expiry_interval: Some(60),
                ..Properties::default()
            })),
            ..msg(1)
        };
        log.append(&m).unwrap();
        sync(&mut log);
        drop(log);
        let (mut log, _) = open(dir.path(), 1 << 20);
        assert_eq!(read_all(&mut log)[0].msg, m);
    }

    #[test]
    fn synced_records_survive_a_crash_and_unsynced_ones_may_not() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        append_n(&mut log, 1, 10);
        sync(&mut log);
        append_n(&mut log, 11, 15); // still in the write buffer
        log.crash();
        let (mut log, recovery) = open(dir.path(), 1 << 20);
        assert_eq!(recovery.records, 10);
        assert_eq!(log.next_seq(), 11);
        assert_eq!(seqs(&read_all(&mut log)), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn sync_handles_cover_everything_appended_before_them() {
        let dir = TempDir::new().unwrap();
        // Two records per segment.
        let (mut log, _) = open(dir.path(), record_len(1, &msg(1)) * 2);
        assert!(log.prepare_sync().unwrap().is_empty());
        append_n(&mut log, 1, 3); // rolls: the directory needs a sync too
        let first = log.prepare_sync().unwrap();
        assert!(first.dir.is_some());
        // The first sync has not completed: a second caller must not skip it.
        let second = log.prepare_sync().unwrap();
        assert!(!second.is_empty() && second.dir.is_some());
        first.sync().unwrap();
        second.sync().unwrap();
        assert!(log.prepare_sync().unwrap().is_empty());
        log.append(&msg(4)).unwrap();
        let third = log.prepare_sync().unwrap();
        assert!(!third.is_empty() && third.dir.is_none());
        third.sync().unwrap();
    }

    #[test]
    fn acked_records_are_not_redelivered_after_reopen_beyond_the_documented_window() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        append_n(&mut log, 1, 100);
        sync(&mut log);
        assert_eq!(log.read(100).unwrap().len(), 100);
        for seq in 1..=50 {
            log.ack(seq).unwrap();
        }
        std::thread::sleep(POSITION_SAVE_INTERVAL + Duration::from_millis(50));
        log.ack(51).unwrap(); // saves: the last save is older than the interval
        for seq in 52..=60 {
            log.ack(seq).unwrap();
        }
        log.crash();
        let (mut log, _) = open(dir.path(), 1 << 20);
        let first = log.read(1).unwrap()[0].seq;
        // 52..=60 may come again (acked within the window); nothing before 52 may.
        assert!((52..=61).contains(&first), "first = {first}");
        drop(log);

        // A clean close saves the position: nothing acked comes back.
        let (mut log, _) = open(dir.path(), 1 << 20);
        for seq in 1..=70 {
            log.ack(seq).unwrap();
        }
        drop(log);
        let (mut log, recovery) = open(dir.path(), 1 << 20);
        assert_eq!(recovery.records, 30);
        assert_eq!(log.read(1).unwrap()[0].seq, 71);
    }

    #[test]
    fn acked_records_lost_in_a_crash_leave_no_gap() {
        let dir = TempDir::new().unwrap();
        let len = record_len(1, &msg(1));
        let (mut log, _) = open(dir.path(), len * 3);
        append_n(&mut log, 1, 12); // segments 1, 4, 7, 10; nothing synced
        assert_eq!(log.read(12).unwrap().len(), 12); // reading hands them to the OS
        for seq in [10, 11, 1, 2, 3, 4, 5, 6, 7, 8, 9] {
            log.ack(seq).unwrap();
        }
        // Deleting segment 7 saved the position 12.
        log.crash();
        let (active, _) = layout(dir.path()).remove(0);
        // The power cut kept only record 10 of the active segment.
        OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap()
            .set_len(len)
            .unwrap();
        let (mut log, recovery) = open(dir.path(), len * 3);
        assert_eq!(recovery.records, 0);
        assert_eq!(
            log.next_seq(),
            12,
            "11 was handed out and acked: never again"
        );
        assert_eq!(log.append(&msg(12)).unwrap(), 12);
        assert_eq!(seqs(&read_all(&mut log)), [12]);
        assert_eq!(log.take_corrupt_count(), 0);
    }

    #[test]
    fn a_torn_tail_is_cut_at_any_offset_and_earlier_records_are_intact() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        append_n(&mut log, 1, 5);
        sync(&mut log);
        drop(log);
        let (path, len) = layout(dir.path()).remove(0);
        let last_len = record_len(5, &msg(5));
        let last_start = len - last_len;
        for kept in 0..last_len {
            let copy = copy_dir(dir.path());
            let seg = copy.path().join(path.file_name().unwrap());
            OpenOptions::new()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(last_start + kept)
                .unwrap();
            let (mut log, recovery) = open(copy.path(), 1 << 20);
            assert_eq!(recovery.truncated_bytes, kept, "kept {kept}");
            assert_eq!(recovery.corrupt_records, 0);
            assert_eq!(recovery.records, 4);
            let all = read_all(&mut log);
            assert_eq!(seqs(&all), [1, 2, 3, 4]);
            assert_eq!(all[3].msg, msg(4));
            assert_eq!(log.append(&msg(5)).unwrap(), 5);
            assert_eq!(log.read(9).unwrap()[0].msg, msg(5));
            assert_eq!(log.take_corrupt_count(), 0);
        }
    }

    #[test]
    fn a_corrupt_record_at_the_tail_is_cut_counted_and_kept_aside() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        append_n(&mut log, 1, 3);
        drop(log);
        let (path, len) = layout(dir.path()).remove(0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[len as usize - 1] ^= 0x20;
        fs::write(&path, bytes).unwrap();
        let (mut log, recovery) = open(dir.path(), 1 << 20);
        assert_eq!(recovery.corrupt_records, 1);
        assert_eq!(recovery.truncated_bytes, record_len(3, &msg(3)));
        assert_eq!(recovery.renamed.len(), 1);
        assert!(recovery.renamed[0].exists());
        assert_eq!(log.take_corrupt_count(), 1);
        assert_eq!(seqs(&read_all(&mut log)), [1, 2]);
        assert_eq!(log.append(&msg(3)).unwrap(), 3);
    }

    #[test]
    fn a_flipped_byte_in_a_sealed_segment_skips_exactly_that_record() {
        let dir = TempDir::new().unwrap();
        let len = record_len(1, &msg(1));
        let segment_bytes = len * 4;
        let (mut log, _) = open(dir.path(), segment_bytes);
        append_n(&mut log, 1, 10);
        sync(&mut log);
        drop(log);
        let (first_segment, _) = layout(dir.path()).remove(0);
        // Every byte of record 2 (of segment 1..=4), flipped in turn.
        for at in len..2 * len {
            let copy = copy_dir(dir.path());
            let seg = copy.path().join(first_segment.file_name().unwrap());
            let mut bytes = fs::read(&seg).unwrap();
            bytes[at as usize] ^= 0x80;
            fs::write(&seg, bytes).unwrap();

            let (mut log, recovery) = open(copy.path(), segment_bytes);
            assert_eq!(
                recovery.corrupt_records, 0,
                "sealed segments are checked lazily"
            );
            let all = read_all(&mut log);
            let expected: Vec<u64> = (1..=10).filter(|&s| s != 2).collect();
            assert_eq!(seqs(&all), expected, "byte {at}");
            assert_eq!(log.take_corrupt_count(), 1, "byte {at}");
            assert_eq!(log.pending(), 9);
            // Re-reading does not count it again.
            log.rewind();
            assert_eq!(read_all(&mut log).len(), 9);
            assert_eq!(log.take_corrupt_count(), 0);

            for seq in [1, 3] {
                log.ack(seq).unwrap();
            }
            assert!(seg.exists(), "record 4 is still unacked");
            log.ack(4).unwrap();
            assert!(!seg.exists());
            assert_eq!(files_ending(copy.path(), ".seg.corrupt").len(), 1);
        }
    }

    #[test]
    fn drop_oldest_removes_a_sealed_segment_and_counts_its_unacked_records() {
        let dir = TempDir::new().unwrap();
        let len = record_len(1, &msg(1));
        let (mut log, _) = open(dir.path(), len * 3);
        append_n(&mut log, 1, 8);
        assert_eq!(seqs(&log.read(2).unwrap()), [1, 2]);
        log.ack(1).unwrap();
        assert_eq!(log.drop_oldest_segment().unwrap(), 2);
        assert_eq!(log.pending(), 5);
        log.ack(2).unwrap(); // a late ack of a dropped record is harmless
        assert_eq!(seqs(&log.read(10).unwrap()), [4, 5, 6, 7, 8]);
        assert_eq!(log.drop_oldest_segment().unwrap(), 3);
        assert_eq!(log.drop_oldest_segment().unwrap(), 2, "then the active one");
        assert_eq!(log.pending(), 0);
        assert_eq!(log.bytes(), 0);
        assert_eq!(log.drop_oldest_segment().unwrap(), 0);
        assert_eq!(log.append(&msg(9)).unwrap(), 9);
        sync(&mut log);
        assert_eq!(seqs(&log.read(10).unwrap()), [9]);
    }

    #[test]
    fn read_unexpired_acks_and_counts_what_is_too_old() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        append_n(&mut log, 1, 5); // received_at 1001..=1005
        let batch = log.read_unexpired(10, 1004).unwrap();
        assert_eq!(seqs(&batch.records), [4, 5]);
        assert_eq!(batch.expired, 3);
        assert_eq!(log.pending(), 2);
    }

    #[test]
    fn oldest_pending_follows_the_acks() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 1 << 20);
        assert_eq!(log.oldest_pending_received_at(), None);
        append_n(&mut log, 1, 3);
        assert_eq!(log.oldest_pending_received_at(), Some(1001));
        log.read(10).unwrap();
        log.ack(1).unwrap();
        log.ack(3).unwrap();
        assert_eq!(log.oldest_pending_received_at(), Some(1002));
        log.ack(2).unwrap();
        assert_eq!(log.oldest_pending_received_at(), None);
    }

    /// Not a benchmark (debug build, shared machine): a sanity number for the issue note.
    #[test]
    fn throughput_of_200k_small_appends_with_group_commit() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 64 << 20);
        let template = Message {
            topic: "factory/line-1/press-7/telemetry".into(),
            payload: Bytes::from(vec![b'x'; 100]),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 0,
        };
        let started = Instant::now();
        for n in 1..=200_000u64 {
            log.append(&template).unwrap();
            if n % 1000 == 0 {
                log.prepare_sync().unwrap().sync().unwrap();
            }
        }
        let elapsed = started.elapsed();
        println!(
            "disk log: 200000 appends of 100-byte payloads, fsync per 1000: {:.0} appends/s ({:.1} MB on disk)",
            200_000.0 / elapsed.as_secs_f64(),
            log.bytes() as f64 / 1e6
        );
        let started = Instant::now();
        let mut count = 0;
        loop {
            let batch = log.read(1000).unwrap();
            if batch.is_empty() {
                break;
            }
            for record in &batch {
                assert_eq!(record.msg.payload, template.payload);
                log.ack(record.seq).unwrap();
            }
            count += batch.len();
        }
        println!(
            "disk log: read + ack {:.0} records/s",
            count as f64 / started.elapsed().as_secs_f64()
        );
        assert_eq!(count, 200_000);
        assert_eq!(log.pending(), 0);
    }

    #[test]
    fn live_lane_is_read_before_the_backlog_and_merges_behind_it() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 200);
        append_n(&mut log, 1, 10);
        sync(&mut log);
        log.split_lanes(log.next_seq());
        assert_eq!(log.live_boundary(), Some(11));
        append_n(&mut log, 11, 13);
        sync(&mut log);
        assert_eq!(seqs(&log.read_lanes(2, None).unwrap().records), [11, 12]);
        // Live first, then the backlog fills the room left, oldest first.
        assert_eq!(
            seqs(&log.read_lanes(5, None).unwrap().records),
            [13, 1, 2, 3, 4]
        );
        for seq in [11, 12, 13, 1, 2] {
            log.ack(seq).unwrap();
        }
        assert_eq!(log.pending_below(11), 8, "the backlog left: 3..=10");
        append_n(&mut log, 14, 14);
        sync(&mut log);
        assert_eq!(seqs(&log.read_lanes(3, None).unwrap().records), [14, 5, 6]);
        assert_eq!(
            seqs(&log.read_lanes(10, None).unwrap().records),
            [7, 8, 9, 10]
        );
        assert_eq!(
            log.live_boundary(),
            None,
            "the backlog was read: one lane again"
        );
        append_n(&mut log, 15, 16);
        sync(&mut log);
        assert_eq!(seqs(&log.read_lanes(10, None).unwrap().records), [15, 16]);
        for seq in 3..=16 {
            log.ack(seq).unwrap();
        }
        assert_eq!(log.pending(), 0);
    }

    #[test]
    fn a_rewind_resends_both_lanes_and_a_crash_forgets_only_live_acks() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 200);
        append_n(&mut log, 1, 6);
        sync(&mut log);
        log.split_lanes(log.next_seq());
        append_n(&mut log, 7, 9);
        sync(&mut log);
        assert_eq!(
            seqs(&log.read_lanes(4, None).unwrap().records),
            [7, 8, 9, 1]
        );
        log.ack(7).unwrap();
        log.ack(1).unwrap();
        // Reconnect: everything unconfirmed is the backlog of the next lane.
        log.rewind();
        log.split_lanes(log.next_seq());
        assert_eq!(log.live_boundary(), Some(10));
        let again = read_all_lanes(&mut log);
        assert_eq!(seqs(&again), [2, 3, 4, 5, 6, 8, 9]);
        log.ack(2).unwrap();
        log.ack(9).unwrap();
        log.save_position().unwrap();
        log.crash();
        // The contiguous point (3) survives; the out-of-order ack of 9 (and 7) does not.
        let (mut log, _) = open(dir.path(), 200);
        log.split_lanes(log.next_seq());
        assert_eq!(seqs(&read_all_lanes(&mut log)), [3, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_lane_may_start_inside_the_log() {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 200);
        append_n(&mut log, 1, 12);
        sync(&mut log);
        // Records from 9 on arrived after the sink's previous attempt: live.
        log.split_lanes(9);
        assert_eq!(log.live_boundary(), Some(9));
        assert_eq!(
            seqs(&read_all_lanes(&mut log)),
            [9, 10, 11, 12, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        // Everything below the boundary acked already: no backlog, no lane.
        log.rewind();
        for seq in 1..=8 {
            log.ack(seq).unwrap();
        }
        log.split_lanes(9);
        assert_eq!(log.live_boundary(), None);
    }

    fn read_all_lanes(log: &mut DiskLog) -> Vec<Record> {
        let mut all = Vec::new();
        loop {
            let batch = log.read_lanes(3, None).unwrap().records;
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }

    #[derive(Debug, Clone)]
    enum LaneOp {
        Append(u8),
        Read(usize),
        Ack(prop::sample::Index),
        /// A reconnect: rewind, then a new lane.
        Reconnect,
        Reopen,
    }

    fn lane_op() -> impl Strategy<Value = LaneOp> {
        prop_oneof![
            6 => any::<u8>().prop_map(LaneOp::Append),
            4 => (1usize..8).prop_map(LaneOp::Read),
            4 => any::<prop::sample::Index>().prop_map(LaneOp::Ack),
            1 => Just(LaneOp::Reconnect),
            1 => Just(LaneOp::Reopen),
        ]
    }

    /// Live first, model-checked: each lane reads in order, live records before backlog
    /// ones in a batch, nothing acked is read again, nothing unacked is skipped.
    fn run_lanes(ops: Vec<LaneOp>) -> Result<(), TestCaseError> {
        let dir = TempDir::new().unwrap();
        let (mut log, _) = open(dir.path(), 300);
        let mut acked = BTreeSet::new();
        let mut in_flight = BTreeSet::new();
        // Seqs read since the last rewind: none may come twice.
        let mut read = BTreeSet::new();
        let (mut last_live, mut last_backlog) = (0, 0);
        let mut boundary = None;
        let mut previous_split = 1;
        for op in ops {
            match op {
                LaneOp::Append(n) => {
                    let seq = log.next_seq();
                    log.append(&Message {
                        payload: Bytes::from("x".repeat(usize::from(n % 50))),
                        ..msg(seq)
                    })
                    .unwrap();
                    sync(&mut log);
                }
                LaneOp::Read(max) => {
                    let batch = log.read_lanes(max, None).unwrap().records;
                    let mut seen_backlog = false;
                    for r in &batch {
                        prop_assert!(!acked.contains(&r.seq), "acked {} read again", r.seq);
                        prop_assert!(read.insert(r.seq), "{} read twice", r.seq);
                        let live = boundary.is_some_and(|b| r.seq >= b);
                        if live {
                            prop_assert!(!seen_backlog, "live {} after backlog", r.seq);
                            prop_assert!(r.seq > last_live, "live lane out of order");
                            last_live = r.seq;
                        } else {
                            seen_backlog = true;
                            prop_assert!(r.seq > last_backlog, "backlog out of order");
                            last_backlog = r.seq;
                        }
                        in_flight.insert(r.seq);
                    }
                    if log.live_boundary().is_none() && boundary.is_some() {
                        // Merged: one lane on from the live lane's place.
                        boundary = None;
                        last_backlog = last_live;
                    }
                }
                LaneOp::Ack(index) => {
                    if !in_flight.is_empty() {
                        let i = index.index(in_flight.len());
                        let Some(&seq) = in_flight.iter().nth(i) else {
                            unreachable!()
                        };
                        in_flight.remove(&seq);
                        log.ack(seq).unwrap();
                        acked.insert(seq);
                    }
                }
                LaneOp::Reconnect | LaneOp::Reopen => {
                    if matches!(op, LaneOp::Reopen) {
                        drop(log);
                        log = open(dir.path(), 300).0;
                        // Only the contiguous ack point survives a reopen.
                        let floor = log.next_seq() - log.pending();
                        acked.retain(|&seq| seq < floor);
                    } else {
                        log.rewind();
                    }
                    // As the buffer does: the lane starts where the previous attempt did.
                    let split_at = std::mem::replace(&mut previous_split, log.next_seq());
                    log.split_lanes(split_at);
                    boundary = log.live_boundary();
                    in_flight.clear();
                    read.clear();
                    (last_live, last_backlog) = (boundary.map_or(0, |b| b - 1), 0);
                    let floor = (1..log.next_seq())
                        .find(|seq| !acked.contains(seq))
                        .unwrap_or(log.next_seq());
                    let expected = split_at.clamp(floor, log.next_seq());
                    if log.pending_below(expected) > 0 {
                        prop_assert_eq!(boundary, Some(expected));
                    } else {
                        prop_assert_eq!(boundary, None);
                    }
                }
            }
        }
        log.rewind();
        let rest = read_all(&mut log);
        let expected: Vec<u64> = (1..log.next_seq()).filter(|s| !acked.contains(s)).collect();
        prop_assert_eq!(seqs(&rest), expected);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn live_first_lanes_keep_order_and_lose_nothing(ops in prop::collection::vec(lane_op(), 1..120)) {
            run_lanes(ops)?;
        }

        /// Garbage segment files: opening and reading terminate and never panic.
        #[test]
        fn random_segment_contents_never_panic(
            sealed in proptest::collection::vec(any::<u8>(), 0..600),
            last in proptest::collection::vec(any::<u8>(), 0..600),
            position in proptest::option::of(any::<[u8; 12]>()),
        ) {
            let dir = TempDir::new().unwrap();
            fs::write(segment_path(dir.path(), 1), &sealed).unwrap();
            fs::write(segment_path(dir.path(), 3), &last).unwrap();
            if let Some(position) = position {
                fs::write(dir.path().join(POSITION_FILE), position).unwrap();
            }
            let (mut log, _) = open(dir.path(), 256);
            let all = read_all(&mut log);
            prop_assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
            log.append(&msg(1)).unwrap();
            sync(&mut log);
        }

        /// Damage anywhere in sealed segments: every record is either delivered intact
        /// or counted as corrupt, exactly once.
        #[test]
        fn damaged_sealed_segments_deliver_or_count_every_record(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..), 0..6),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let dir = TempDir::new().unwrap();
            let (mut log, _) = open(dir.path(), 200);
            append_n(&mut log, 1, 30);
            sync(&mut log);
            drop(log);
            let mut files = layout(dir.path());
            files.pop(); // the active segment is verified at open: not this test
            let total: u64 = files.iter().map(|f| f.1).sum();
            let locate = |mut at: u64| {
                for (i, f) in files.iter().enumerate() {
                    if at < f.1 { return (i, at); }
                    at -= f.1;
                }
                unreachable!()
            };
            for (index, mask) in flips {
                let (i, at) = locate(index.index(total as usize) as u64);
                let mut bytes = fs::read(&files[i].0).unwrap();
                bytes[at as usize] ^= mask;
                fs::write(&files[i].0, bytes).unwrap();
            }
            if let Some(cut) = cut {
                let (i, at) = locate(cut.index(total as usize) as u64);
                OpenOptions::new().write(true).open(&files[i].0).unwrap().set_len(at).unwrap();
            }
            let (mut log, _) = open(dir.path(), 200);
            let all = read_all(&mut log);
            for r in &all {
                prop_assert_eq!(&r.msg, &msg(r.seq));
            }
            prop_assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
            prop_assert_eq!(all.len() as u64 + log.take_corrupt_count(), 30);
            prop_assert_eq!(log.pending(), all.len() as u64);
        }

        #[test]
        fn the_log_behaves_like_a_simple_queue(ops in proptest::collection::vec(op(), 1..120)) {
            run_model(ops)?;
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Sync,
        Read(usize),
        Ack(prop::sample::Index),
        AckAllRead,
        Rewind,
        SavePosition,
        Reopen,
        /// Kill -9, then the machine keeps a random prefix of what was not synced.
        Crash(prop::sample::Index),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => any::<u8>().prop_map(Op::Append),
            2 => Just(Op::Sync),
            3 => (1usize..8).prop_map(Op::Read),
            3 => any::<prop::sample::Index>().prop_map(Op::Ack),
            1 => Just(Op::AckAllRead),
            1 => Just(Op::Rewind),
            1 => Just(Op::SavePosition),
            1 => Just(Op::Reopen),
            1 => any::<prop::sample::Index>().prop_map(Op::Crash),
        ]
    }

    /// What the log must hold, as plainly as possible.
    #[derive(Default)]
    struct Model {
        /// seq → payload of every record the log may hold.
        records: BTreeMap<u64, Bytes>,
        /// Acked records the log has not forgotten: it must not deliver them again.
        acked: BTreeSet<u64>,
        in_flight: BTreeSet<u64>,
        last_read: Option<u64>,
        /// Records up to this seq were synced and must survive a crash.
        synced_through: u64,
        /// The segment files and lengths that are durable.
        synced_layout: Vec<(PathBuf, u64)>,
    }

    impl Model {
        fn floor(&self, next_seq: u64) -> u64 {
            self.records
                .keys()
                .copied()
                .find(|seq| !self.acked.contains(seq))
                .unwrap_or(next_seq)
        }

        fn check_read(&mut self, record: &Record) -> Result<(), TestCaseError> {
            let seq = record.seq;
            prop_assert_eq!(
                self.records.get(&seq),
                Some(&record.msg.payload),
                "seq {}",
                seq
            );
            prop_assert!(
                !self.acked.contains(&seq),
                "acked seq {} delivered again",
                seq
            );
            prop_assert!(
                !matches!(self.last_read, Some(last) if last >= seq),
                "out of order: {}",
                seq
            );
            self.last_read = Some(seq);
            Ok(())
        }

        /// After a reopen the log remembers only its contiguous ack point: acks above it
        /// are forgotten (those records are delivered again), acks below it never are.
        fn reopened(&mut self, log: &DiskLog) -> Result<u64, TestCaseError> {
            let log_floor = log.next_seq() - log.pending();
            let floor = self.floor(log.next_seq());
            prop_assert!(
                log_floor <= floor,
                "unacked records skipped: {} > {}",
                log_floor,
                floor
            );
            self.acked.retain(|&seq| seq < log_floor);
            self.in_flight.clear();
            self.last_read = None;
            Ok(log_floor)
        }
    }

    /// Keeps `keep` bytes of what was written after the last sync (in log order) and
    /// drops the rest, like a power cut with a partially written page cache.
    fn cut_unsynced(dir: &Path, synced: &[(PathBuf, u64)], keep: u64) {
        let mut keep = keep;
        for (path, len) in layout(dir) {
            let synced_len = synced
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, l)| *l)
                .unwrap_or(0);
            let kept = (len - synced_len).min(keep);
            keep -= kept;
            if synced_len == 0 && kept == 0 {
                fs::remove_file(&path).unwrap();
            } else {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(synced_len + kept)
                    .unwrap();
            }
        }
    }

    fn unsynced_bytes(dir: &Path, synced: &[(PathBuf, u64)]) -> u64 {
        layout(dir)
            .iter()
            .map(|(path, len)| {
                let synced_len = synced.iter().find(|(p, _)| p == path).map_or(0, |s| s.1);
                len - synced_len
            })
            .sum()
    }

    fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let dir = TempDir::new().unwrap();
        let segment_bytes = 300;
        let mut model = Model::default();
        let mut log = open(dir.path(), segment_bytes).0;
        let mut counter = 0u64;
        for op in ops {
            match op {
                Op::Append(n) => {
                    counter += 1;
                    let payload =
                        Bytes::from(format!("{counter}:{}", "x".repeat(usize::from(n % 80))));
                    let m = Message {
                        payload: payload.clone(),
                        ..msg(counter)
                    };
                    let expected = log.next_seq();
                    prop_assert_eq!(log.append(&m).unwrap(), expected);
                    model.records.insert(expected, payload);
                }
                Op::Sync => {
                    sync(&mut log);
                    model.synced_through = log.next_seq() - 1;
                    model.synced_layout = layout(dir.path());
                    let on_disk: u64 = model.synced_layout.iter().map(|f| f.1).sum();
                    prop_assert_eq!(log.bytes(), on_disk);
                }
                Op::Read(max) => {
                    for record in log.read(max).unwrap() {
                        model.check_read(&record)?;
                        model.in_flight.insert(record.seq);
                    }
                }
                Op::Ack(index) => {
                    if !model.in_flight.is_empty() {
                        let i = index.index(model.in_flight.len());
                        let Some(&seq) = model.in_flight.iter().nth(i) else {
                            unreachable!()
                        };
                        log.ack(seq).unwrap();
                        model.in_flight.remove(&seq);
                        model.acked.insert(seq);
                    }
                }
                Op::AckAllRead => {
                    for seq in std::mem::take(&mut model.in_flight) {
                        log.ack(seq).unwrap();
                        model.acked.insert(seq);
                    }
                }
                Op::Rewind => {
                    log.rewind();
                    model.last_read = None;
                }
                Op::SavePosition => log.save_position().unwrap(),
                Op::Reopen => {
                    let next_seq = log.next_seq();
                    drop(log);
                    log = open(dir.path(), segment_bytes).0;
                    prop_assert_eq!(log.next_seq(), next_seq);
                    // A clean close saved the contiguous ack point exactly.
                    let floor = model.floor(next_seq);
                    prop_assert_eq!(model.reopened(&log)?, floor);
                }
                Op::Crash(index) => {
                    log.crash();
                    let unsynced = unsynced_bytes(dir.path(), &model.synced_layout);
                    let keep = index.index(usize::try_from(unsynced).unwrap() + 1) as u64;
                    cut_unsynced(dir.path(), &model.synced_layout, keep);
                    log = open(dir.path(), segment_bytes).0;
                    let next_seq = log.next_seq();
                    prop_assert!(next_seq > model.synced_through, "synced records lost");
                    model.records.retain(|&seq, _| seq < next_seq);
                    model.reopened(&log)?;
                    // What survived is on disk now; the next crash starts from here.
                    sync(&mut log);
                    model.synced_through = next_seq - 1;
                    model.synced_layout = layout(dir.path());
                    prop_assert_eq!(log.take_corrupt_count(), 0, "a torn tail is not corruption");
                }
            }
        }

        // Everything appended, kept and not acked comes out, in order, exactly once.
        log.rewind();
        model.last_read = None;
        let pending = log.pending();
        let drained = read_all(&mut log);
        for record in &drained {
            model.check_read(record)?;
        }
        let drained: BTreeSet<u64> = drained.iter().map(|r| r.seq).collect();
        for seq in model
            .records
            .keys()
            .filter(|seq| !model.acked.contains(seq))
        {
            prop_assert!(drained.contains(seq), "seq {} was never read", seq);
        }
        prop_assert_eq!(pending, drained.len() as u64);
        for &seq in &drained {
            log.ack(seq).unwrap();
        }
        prop_assert_eq!(log.pending(), 0);
        prop_assert_eq!(log.take_corrupt_count(), 0);
        prop_assert_eq!(
            layout(dir.path()).len(),
            1,
            "only the active segment is left"
        );
        Ok(())
    }
}
