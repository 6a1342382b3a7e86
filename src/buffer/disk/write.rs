//! Writing the log: appending records to the active segment, rolling to a new segment
//! when it is full, sealing a segment after a write error, and the group commit (the
//! fsyncs that make appends durable, prepared under the lock and run outside it).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::files::segment_path;
use super::{DiskLog, Segment, WRITE_BUFFER};
use crate::buffer::codec::{self, HEADER_LEN};
use crate::message::Message;

/// The fsyncs that make everything appended before [`DiskLog::prepare_sync`] durable. Run
/// [`SyncHandles::sync`] without holding the log's lock.
#[derive(Debug, Default)]
#[must_use = "nothing is durable until `sync` returned Ok"]
pub struct SyncHandles {
    files: Vec<Arc<File>>,
    /// The log directory, when segment files were created since the last completed sync.
    pub(super) dir: Option<PathBuf>,
    /// What this sync covers, published to `progress` once it completed.
    bytes_mark: u64,
    segments_mark: u64,
    progress: Option<Arc<SyncProgress>>,
}

impl SyncHandles {
    /// True when everything was already durable (another sync covered it).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none()
    }

    /// `fdatasync`s the segment files, then the directory. Blocking; call it outside the
    /// lock so appends go on meanwhile (group commit).
    pub fn sync(self) -> io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        if let Some(dir) = &self.dir {
            File::open(dir)?.sync_all()?;
        }
        if let Some(progress) = &self.progress {
            progress.bytes.fetch_max(self.bytes_mark, Ordering::AcqRel);
            progress
                .segments
                .fetch_max(self.segments_mark, Ordering::AcqRel);
        }
        Ok(())
    }
}

/// How far completed syncs got, shared with the [`SyncHandles`] in flight so that the log
/// can skip what is already durable.
#[derive(Debug, Default)]
pub(super) struct SyncProgress {
    /// `DiskLog::appended_bytes` as of the latest completed sync.
    pub(super) bytes: AtomicU64,
    /// `DiskLog::segments_created` as of the latest completed sync.
    pub(super) segments: AtomicU64,
}

/// A sealed segment whose last bytes may not be durable yet.
#[derive(Debug)]
pub(super) struct UnsyncedSegment {
    pub(super) file: Arc<File>,
    /// `appended_bytes` when it was sealed: durable once a sync covering this completed.
    pub(super) bytes_mark: u64,
}

impl DiskLog {
    /// Assigns the next seq to `msg` and buffers its record; returns the seq. Nothing is
    /// durable before [`DiskLog::prepare_sync`] + [`SyncHandles::sync`]. A message the
    /// record format cannot hold (a string of 64 KiB, a record over `segment_bytes` +
    /// 1 MiB) fails with `ErrorKind::InvalidInput` and consumes no seq: it can never be
    /// stored, so do not retry it.
    pub fn append(&mut self, msg: &Message) -> io::Result<u64> {
        let seq = self.next_seq;
        self.scratch.clear();
        codec::encode(seq, msg, &mut self.scratch)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let len = self.scratch.len() as u64;
        if len - HEADER_LEN as u64 > self.max_body {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a record of {len} bytes is larger than this buffer accepts ({} bytes)",
                    self.max_body
                ),
            ));
        }
        let active = self.active_bytes();
        if self.writer.is_none() || (active > 0 && active + len > self.segment_bytes) {
            self.roll()?;
        }
        let Some(writer) = self.writer.as_mut() else {
            return Err(io::Error::other("buffer has no active segment"));
        };
        if let Err(e) = writer.write_all(&self.scratch) {
            self.seal_after_write_error();
            return Err(e);
        }
        if let Some(last) = self.segments.back_mut() {
            last.bytes += len;
        }
        self.total_bytes += len;
        self.appended_bytes += len;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Hands the buffered appends to the OS and returns the fsyncs that make them durable;
    /// run [`SyncHandles::sync`] after releasing the lock. Fails once after an earlier
    /// write error (records appended before it may be lost).
    pub fn prepare_sync(&mut self) -> io::Result<SyncHandles> {
        if let Some(writer) = self.writer.as_mut() {
            if let Err(e) = writer.flush() {
                self.seal_after_write_error();
                self.write_failed = false;
                return Err(e);
            }
        }
        if std::mem::take(&mut self.write_failed) {
            return Err(io::Error::other(
                "an earlier write to the buffer failed: records appended before it may be lost",
            ));
        }
        let synced_bytes = self.progress.bytes.load(Ordering::Acquire);
        let synced_segments = self.progress.segments.load(Ordering::Acquire);
        self.unsynced_sealed.retain(|s| s.bytes_mark > synced_bytes);
        let dir_needed = self.segments_created > synced_segments;
        if self.appended_bytes <= synced_bytes && !dir_needed {
            return Ok(SyncHandles::default());
        }
        let mut files: Vec<Arc<File>> = self
            .unsynced_sealed
            .iter()
            .map(|s| Arc::clone(&s.file))
            .collect();
        files.extend(self.active_sync.iter().cloned());
        Ok(SyncHandles {
            files,
            dir: dir_needed.then(|| self.dir.clone()),
            bytes_mark: self.appended_bytes,
            segments_mark: self.segments_created,
            progress: Some(Arc::clone(&self.progress)),
        })
    }

    /// Seals the active segment and starts the next one at `next_seq`.
    pub(super) fn roll(&mut self) -> io::Result<()> {
        if let Some(writer) = self.writer.take() {
            match writer.into_inner() {
                Ok(file) => drop(file),
                Err(e) => {
                    let error = io::Error::new(e.error().kind(), e.error().to_string());
                    self.writer = Some(e.into_inner());
                    self.seal_after_write_error();
                    return Err(error);
                }
            }
        }
        if let Some(file) = self.active_sync.take() {
            self.unsynced_sealed.push(UnsyncedSegment {
                file,
                bytes_mark: self.appended_bytes,
            });
        }
        self.start_segment()
    }

    /// Makes a fresh, empty active segment starting at `next_seq`. When the current last
    /// segment already starts there it holds no records and is emptied and reused.
    pub(super) fn start_segment(&mut self) -> io::Result<()> {
        let first_seq = self.next_seq;
        let file = match self.segments.back_mut() {
            Some(last) if last.first_seq == first_seq => {
                let file = OpenOptions::new().append(true).open(&last.path)?;
                file.set_len(0)?;
                self.total_bytes -= last.bytes;
                last.bytes = 0;
                last.damaged = false;
                // The reader and checkpoints may point into the old bytes.
                self.reader = None;
                self.floor_checkpoint = None;
                self.cursor = self.segment_start(self.segments.len() - 1);
                // Everything before was dropped: no backlog is left to read behind.
                self.live = None;
                file
            }
            _ => {
                let path = segment_path(&self.dir, first_seq);
                let file = OpenOptions::new()
                    .append(true)
                    .create_new(true)
                    .open(&path)?;
                self.segments.push_back(Segment {
                    first_seq,
                    path,
                    bytes: 0,
                    damaged: false,
                });
                self.segments_created += 1;
                file
            }
        };
        self.active_sync = Some(Arc::new(file.try_clone()?));
        self.writer = Some(BufWriter::with_capacity(WRITE_BUFFER, file));
        Ok(())
    }

    /// After a failed write nobody knows which buffered bytes reached the file: keep the
    /// file as it is (its unreadable tail is counted as corrupt when read), and let the
    /// next append start a fresh segment.
    pub(super) fn seal_after_write_error(&mut self) {
        self.write_failed = true;
        let Some(writer) = self.writer.take() else {
            return;
        };
        let (file, _unwritten) = writer.into_parts();
        if let (Ok(meta), Some(last)) = (file.metadata(), self.segments.back_mut()) {
            self.total_bytes = self.total_bytes - last.bytes + meta.len();
            last.bytes = meta.len();
        }
    }

    pub(super) fn flush_for_read(&mut self) -> io::Result<()> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(());
        };
        if writer.buffer().is_empty() {
            return Ok(());
        }
        if let Err(e) = writer.flush() {
            self.seal_after_write_error();
            return Err(e);
        }
        Ok(())
    }
}
