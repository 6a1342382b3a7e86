//! A sink's `buffer` section: how its messages are kept until the upstream confirmed
//! them (storage, size, what a full buffer does, when records are synced, drain order).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// What a full buffer does with the next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    DropOldest,
    DropNewest,
    Block,
}

/// In which order a sink's buffer hands a backlog to the sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Drain {
    /// Oldest first, always: a consumer sees the device order.
    #[default]
    Ordered,
    /// Messages that arrive while a backlog drains go first; the backlog follows with
    /// the room left, oldest first.
    LiveFirst,
}

/// Where a sink's buffer keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// Segmented log under `data_dir/buffers/<sink>/`: survives restarts and crashes.
    Disk,
    /// In memory only: survives upstream outages, not a restart.
    Memory,
}

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncPolicy {
    /// Group commit: every batch the router appends is fsynced before the devices' acks
    /// go out (the sink may read and forward it while the fsync runs: `Buffer::sync`).
    Batch,
    /// Written to the OS at once, fsynced every `sync_interval`.
    Interval,
    /// Written to the OS at once; the OS decides when to write back.
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BufferSection {
    #[serde(default = "default_storage")]
    pub storage: Storage,
    #[serde(default = "default_buffer_max_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    /// Records older than this are dropped when read (counted, `reason="ttl"`).
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// Size of one segment file; default a quarter of max_bytes, between 64KiB and 4MiB.
    #[serde(default)]
    pub segment_size: Option<ByteSize>,
    #[serde(default = "default_sync")]
    pub sync: SyncPolicy,
    #[serde(default = "default_sync_interval")]
    pub sync_interval: HumanDuration,
    /// Below this much free space on the data_dir's file system the buffer behaves as
    /// full, so the gateway never fills the disk.
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk: ByteSize,
    /// Cap on messages per second handed to the sink (backlog drains); absent = no cap.
    #[serde(default)]
    pub drain_rate: Option<u64>,
    /// Order of a backlog drain: `ordered` or `live_first` (disk storage only).
    #[serde(default)]
    pub drain: Drain,
    /// Records handed to the sink at once.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// `*.corrupt` files (damaged data moved aside by recovery) kept for inspection; past
    /// this many the oldest are deleted.
    #[serde(default = "default_corrupt_max_files")]
    pub corrupt_max_files: usize,
    /// Bytes of `*.corrupt` files kept; past this the oldest are deleted.
    #[serde(default = "default_corrupt_max_bytes")]
    pub corrupt_max_bytes: ByteSize,
}

fn default_corrupt_max_files() -> usize {
    8
}
fn default_corrupt_max_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

impl BufferSection {
    /// The segment size in force: as configured, or a quarter of `max_bytes` kept
    /// between 64KiB and 4MiB.
    pub fn segment_bytes(&self) -> u64 {
        self.segment_size
            .map(|s| s.0)
            .unwrap_or_else(|| (self.max_bytes.0 / 4).clamp(64 * 1024, 4 * 1024 * 1024))
    }
}

impl BufferSection {
    /// Reports what a buffer cannot run with; `path` is its sink's (`sinks.<name>`).
    pub fn validate(&self, path: &str, err: &mut impl FnMut(String, String)) {
        if self.max_bytes.0 < 1024 {
            err(
                format!("{path}.buffer.max_bytes"),
                "must be at least 1KiB".into(),
            );
        }
        if self.storage == Storage::Disk && self.max_bytes.0 < 64 * 1024 {
            err(
                format!("{path}.buffer.max_bytes"),
                "must be at least 64KiB for a disk buffer".into(),
            );
        }
        if let Some(size) = self.segment_size {
            if size.0 < 64 * 1024 || size.0 > self.max_bytes.0 {
                err(
                    format!("{path}.buffer.segment_size"),
                    "must be at least 64KiB and not above buffer.max_bytes".into(),
                );
            }
        }
        if self.ttl.is_some_and(|t| t.0.is_zero()) {
            err(format!("{path}.buffer.ttl"), "must be above zero".into());
        }
        if self.drain_rate == Some(0) {
            err(
                format!("{path}.buffer.drain_rate"),
                "must be above zero".into(),
            );
        }
        if self.drain == Drain::LiveFirst && self.storage != Storage::Disk {
            err(
                format!("{path}.buffer.drain"),
                "\"live_first\" needs storage = \"disk\" (both lanes are read from the disk log)"
                    .into(),
            );
        }
        if self.sync_interval.0.is_zero() {
            err(
                format!("{path}.buffer.sync_interval"),
                "must be above zero".into(),
            );
        }
        if self.batch == 0 || self.batch > 100_000 {
            err(
                format!("{path}.buffer.batch"),
                "must be between 1 and 100000".into(),
            );
        }
    }
}

impl Default for BufferSection {
    fn default() -> Self {
        Self {
            storage: default_storage(),
            max_bytes: default_buffer_max_bytes(),
            when_full: default_when_full(),
            ttl: None,
            segment_size: None,
            sync: default_sync(),
            sync_interval: default_sync_interval(),
            min_free_disk: default_min_free_disk(),
            drain_rate: None,
            drain: Drain::Ordered,
            batch: default_batch(),
            corrupt_max_files: default_corrupt_max_files(),
            corrupt_max_bytes: default_corrupt_max_bytes(),
        }
    }
}

fn default_buffer_max_bytes() -> ByteSize {
    ByteSize(1024 * 1024 * 1024)
}
fn default_storage() -> Storage {
    Storage::Disk
}
fn default_sync() -> SyncPolicy {
    SyncPolicy::Batch
}
fn default_sync_interval() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
fn default_min_free_disk() -> ByteSize {
    ByteSize(100 * 1024 * 1024)
}
fn default_when_full() -> WhenFull {
    WhenFull::DropOldest
}
fn default_batch() -> usize {
    500
}
