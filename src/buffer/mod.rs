//! The per-sink buffer between the rule engine and the sink worker.
//!
//! Interface (ARCHITECTURE.md, section 6): the router `append`s records and then `sync`s; the sink worker
//! `read_batch`es records past its read position, `ack`s each one once the upstream
//! confirmed it, and `rewind`s to the oldest unacked record after a reconnect, so
//! everything unconfirmed is sent again. A record leaves the buffer only when acked, or
//! when a declared bound drops it, counted in `edgebridge_buffer_dropped_total{reason}`:
//! `full` (`max_bytes` or the free-disk margin, by the `when_full` policy), `ttl`,
//! `corrupt` (found on start or when read), `io_error` (the disk refused a write).
//!
//! Storage (`storage`):
//! - `disk` (default): the segmented log of `disk.rs` under `data_dir/buffers/<sink>/`
//!   — record format, recovery and deletion rules are described there. `sync` decides
//!   when appends are forced to disk: `batch` fsyncs every batch the router appends
//!   (group commit: the next batch is taken as soon as the previous sync returns) before
//!   the devices' acks go out (the sink may read and forward it while the fsync runs: a
//!   crash then costs a duplicate, never a loss); `interval` and `none`
//!   hand each batch to the OS at once and fsync every `sync_interval` or never.
//!   Loss windows: under kill -9 nothing written to the OS is lost, so none of the
//!   policies loses an acked message; on power loss `batch` loses nothing acked,
//!   `interval` up to `sync_interval` of messages, `none` what the OS had not written
//!   back (typically up to 30 s).
//! - `memory`: records in memory; survives upstream outages, not a restart.
//!
//! Drains (`drain`): the *backlog* is what waited when the gateway started or the sink last
//! came back ([`Buffer::start_drain`], [`Buffer::rewind`]; a sink rewinds before every
//! connection attempt, and since the upstream came back at some moment after the previous
//! attempt, what arrived after that one counts as live); `edgebridge_buffer_backlog_messages`
//! counts what of the backlog is still unconfirmed. `ordered` (default) hands everything over oldest
//! first. `live_first` (disk only) hands over messages that arrived after that moment
//! first and fills the room left with the backlog, oldest first (`disk.rs`, "Reading"):
//! a consumer sees each lane in device order, live messages overtaking older ones.

mod codec;
pub mod config;
mod disk;
mod memory;

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::{Gauge, IntCounter, IntGauge};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::message::{now_millis, Message};
use crate::metrics::Metrics;
pub use config::{BufferSection, Drain, Storage, SyncPolicy, WhenFull};
use disk::{DiskLog, DiskLogOptions};
use memory::MemoryLog;

/// For the fuzz targets only (fuzz/): decodes one record body as a read does. Returns
/// whether it decoded.
#[doc(hidden)]
pub fn fuzz_decode_record(body: &[u8]) -> bool {
    let seq = codec::body_seq(body);
    match codec::decode(bytes::Bytes::copy_from_slice(body)) {
        Ok((decoded, _)) => {
            debug_assert_eq!(seq, Some(decoded), "body_seq agrees with decode");
            true
        }
        Err(_) => false,
    }
}

/// For the fuzz targets only (fuzz/): `segment` as the one segment file of a buffer in
/// `dir` (which must be empty), recovered at open, read to the end and acked, then
/// opened again. Returns the records read, or the I/O error that stopped it (a clear
/// error is fine; a panic or a hang is the bug).
#[doc(hidden)]
pub fn fuzz_recover(dir: &Path, segment: &[u8], segment_bytes: u64) -> io::Result<usize> {
    std::fs::write(dir.join(format!("{:020}.seg", 1)), segment)?;
    let options = || DiskLogOptions {
        dir: dir.to_path_buf(),
        segment_bytes,
        corrupt_max_files: 2,
        corrupt_max_bytes: 1 << 20,
    };
    let (mut log, _) = DiskLog::open(options())?;
    let mut read = 0;
    // Every round reads at least one record or ends: bounded by the segment's size.
    for _ in 0..=segment.len() {
        let batch = log.read_lanes(64, None)?.records;
        if batch.is_empty() {
            break;
        }
        read += batch.len();
        for record in batch {
            log.ack(record.seq)?;
        }
    }
    drop(log);
    DiskLog::open(options())?;
    Ok(read)
}

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
    /// Dropped by a bound (counted).
    Dropped,
    /// The buffer is full and the policy is `block`: the message is handed back; try
    /// again after [`Buffer::wait_for_space`].
    Full(Message),
}

/// How often the free space of the data_dir's file system is looked up: after this long,
/// or after a sixteenth of the margin was appended, whichever comes first; while below
/// the margin, on every append.
const DISK_CHECK_EVERY: Duration = Duration::from_millis(500);

// One per sink, behind its mutex: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Memory(MemoryLog),
    Disk(DiskLog),
}

impl Backend {
    fn bytes(&self) -> u64 {
        match self {
            Backend::Memory(m) => m.bytes,
            Backend::Disk(d) => d.bytes(),
        }
    }

    fn pending(&self) -> u64 {
        match self {
            Backend::Memory(m) => m.pending(),
            Backend::Disk(d) => d.pending(),
        }
    }

    fn next_seq(&self) -> u64 {
        match self {
            Backend::Memory(m) => m.next_seq,
            Backend::Disk(d) => d.next_seq(),
        }
    }

    fn pending_below(&self, seq: u64) -> u64 {
        match self {
            Backend::Memory(m) => m.pending_below(seq),
            Backend::Disk(d) => d.pending_below(seq),
        }
    }
}

struct BufferMetrics {
    messages: IntGauge,
    bytes: IntGauge,
    backlog: IntGauge,
    oldest_age: Gauge,
    dropped_full: IntCounter,
    dropped_ttl: IntCounter,
    dropped_corrupt: IntCounter,
    dropped_io: IntCounter,
    corrupt_files: IntGauge,
    corrupt_bytes: IntGauge,
}

struct State {
    backend: Backend,
    /// Last seq handed to the OS and synced by the policy; the sink reads up to it.
    appended_upto: u64,
    /// Next time a drain-rate-capped read may happen.
    next_read: Instant,
    /// Cached "free space under the margin" and when it was looked up.
    low_disk: bool,
    disk_checked: Option<Instant>,
    /// Bytes appended since the last free-space look-up.
    since_disk_check: u64,
    /// Seqs handed to the sink and not acked yet (bounded by the sink's window).
    in_flight: BTreeSet<u64>,
    /// In-flight seqs whose records `drop_oldest` removed: counted as dropped only if
    /// the sink never confirms them (at the next rewind), so the drop counter is exact.
    dropped_in_flight: BTreeSet<u64>,
    /// Records below this seq are the backlog of the current drain (see the module doc).
    backlog_until: u64,
    /// The next seq when the sink last rewound: where the next rewind's live lane starts.
    last_rewind: u64,
}

pub struct Buffer {
    name: String,
    config: BufferSection,
    dir: Option<PathBuf>,
    state: Mutex<State>,
    /// Wakes the (single) sink worker when records become readable.
    readable: Notify,
    /// Wakes a router blocked on a full buffer (`when_full = "block"`).
    space: Notify,
    metrics: BufferMetrics,
    /// Messages stored since start: the status page's received rate of this sink.
    stored: AtomicU64,
}

impl Buffer {
    /// Opens the sink's buffer: for disk storage under `data_dir/buffers/<name>/`,
    /// recovering what is there (corrupt records are counted, never fatal).
    pub fn open(
        name: &str,
        config: &BufferSection,
        data_dir: &Path,
        metrics: &Metrics,
    ) -> io::Result<Self> {
        let buffer_metrics = BufferMetrics {
            messages: metrics.buffer_messages.with_label_values(&[name]),
            bytes: metrics.buffer_bytes.with_label_values(&[name]),
            backlog: metrics.buffer_backlog.with_label_values(&[name]),
            oldest_age: metrics.buffer_oldest_age.with_label_values(&[name]),
            dropped_full: metrics.buffer_dropped.with_label_values(&[name, "full"]),
            dropped_ttl: metrics.buffer_dropped.with_label_values(&[name, "ttl"]),
            dropped_corrupt: metrics.buffer_dropped.with_label_values(&[name, "corrupt"]),
            dropped_io: metrics
                .buffer_dropped
                .with_label_values(&[name, "io_error"]),
            corrupt_files: metrics.buffer_corrupt_files.with_label_values(&[name]),
            corrupt_bytes: metrics.buffer_corrupt_bytes.with_label_values(&[name]),
        };
        let (backend, dir) = match config.storage {
            Storage::Memory => (Backend::Memory(MemoryLog::new()), None),
            Storage::Disk => {
                let dir = data_dir.join("buffers").join(name);
                let (mut log, recovery) = DiskLog::open(DiskLogOptions {
                    dir: dir.clone(),
                    segment_bytes: config.segment_bytes(),
                    corrupt_max_files: config.corrupt_max_files,
                    corrupt_max_bytes: config.corrupt_max_bytes.0,
                })?;
                // A record torn by a crash is lost too: count it with the corrupt ones.
                let corrupt = log.take_corrupt_count() + recovery.torn_records;
                buffer_metrics.dropped_corrupt.inc_by(corrupt);
                if recovery.truncated_bytes > 0 || corrupt > 0 || !recovery.renamed.is_empty() {
                    warn!(sink = %name, truncated_bytes = recovery.truncated_bytes, corrupt, renamed = ?recovery.renamed, "buffer recovered from damage");
                }
                if log.pending() > 0 {
                    info!(sink = %name, pending = log.pending(), bytes = log.bytes(), "buffer has a backlog from the last run");
                }
                (Backend::Disk(log), Some(dir))
            }
        };
        let appended_upto = match &backend {
            Backend::Memory(_) => 0,
            Backend::Disk(d) => d.next_seq() - 1,
        };
        let buffer = Self {
            name: name.to_string(),
            config: config.clone(),
            dir,
            state: Mutex::new(State {
                backend,
                appended_upto,
                next_read: Instant::now(),
                low_disk: false,
                disk_checked: None,
                since_disk_check: 0,
                in_flight: BTreeSet::new(),
                dropped_in_flight: BTreeSet::new(),
                backlog_until: appended_upto + 1,
                last_rewind: appended_upto + 1,
            }),
            readable: Notify::new(),
            space: Notify::new(),
            metrics: buffer_metrics,
            stored: AtomicU64::new(0),
        };
        {
            let mut st = buffer.state.lock();
            if let Backend::Disk(d) = &mut st.backend {
                d.set_read_limit(appended_upto + 1);
            }
            // A backlog from the last run is drained like one after an outage.
            let next = st.backend.next_seq();
            buffer.split(&mut st, next);
            buffer.publish_gauges(&st);
        }
        Ok(buffer)
    }

    /// Free space on the data_dir's file system is below `min_free_disk`.
    fn low_disk(&self, st: &mut State) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        let now = Instant::now();
        let recent = st.disk_checked.is_some_and(|t| now - t < DISK_CHECK_EVERY);
        // While short of space, look every time: space returns as the sink drains.
        if !st.low_disk && recent && st.since_disk_check < self.config.min_free_disk.0 / 16 {
            return st.low_disk;
        }
        st.disk_checked = Some(now);
        st.since_disk_check = 0;
        let free = match rustix::fs::statvfs(dir) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
            Err(_) => u64::MAX,
        };
        let low = free < self.config.min_free_disk.0;
        if low != st.low_disk {
            if low {
                warn!(sink = %self.name, free, margin = self.config.min_free_disk.0, "free disk below the margin; the buffer behaves as full");
            } else {
                info!(sink = %self.name, free, "free disk above the margin again");
            }
        }
        st.low_disk = low;
        low
    }

    /// Appends `msg`, applying `max_bytes`, the free-disk margin and `when_full`. Cheap
    /// (a buffered write); never blocks. Not readable by the sink before [`Buffer::sync`]
    /// hands it to the OS.
    pub fn append(&self, msg: Message) -> Appended {
        let size = msg.size() as u64;
        let mut st = self.state.lock();
        loop {
            let over_bytes = st.backend.bytes() + size > self.config.max_bytes.0;
            let full = over_bytes || self.low_disk(&mut st);
            if !full || st.backend.pending() == 0 && !st.low_disk {
                break;
            }
            match self.config.when_full {
                WhenFull::DropNewest => {
                    self.metrics.dropped_full.inc();
                    return Appended::Dropped;
                }
                WhenFull::Block if st.backend.pending() > 0 => return Appended::Full(msg),
                WhenFull::Block => {
                    // Nothing to wait for: the disk is short of space by itself.
                    self.metrics.dropped_full.inc();
                    return Appended::Dropped;
                }
                WhenFull::DropOldest => {
                    let dropped = match &mut st.backend {
                        Backend::Memory(m) => Ok(m.drop_oldest()),
                        Backend::Disk(d) => {
                            let from = d.floor();
                            d.drop_oldest_segment().map(|n| (n, from..d.floor()))
                        }
                    };
                    match dropped {
                        Ok((n, seqs)) => {
                            // Records in flight may still be confirmed: they are counted
                            // at the next rewind if not (see `dropped_in_flight`).
                            let in_flight: Vec<u64> = st.in_flight.range(seqs).copied().collect();
                            for seq in &in_flight {
                                st.in_flight.remove(seq);
                                st.dropped_in_flight.insert(*seq);
                            }
                            self.metrics
                                .dropped_full
                                .inc_by(n.saturating_sub(in_flight.len() as u64));
                        }
                        Err(e) => {
                            warn!(sink = %self.name, error = %e, "cannot drop the oldest buffer segment")
                        }
                    }
                    if st.backend.pending() == 0 {
                        // Dropped everything: store the newest unless the disk is short.
                        st.disk_checked = None;
                        if self.low_disk(&mut st) {
                            self.metrics.dropped_full.inc();
                            return Appended::Dropped;
                        }
                        break;
                    }
                }
            }
        }
        let stored = match &mut st.backend {
            Backend::Memory(m) => {
                m.append(msg);
                Ok(())
            }
            Backend::Disk(d) => d.append(&msg).map(drop),
        };
        st.since_disk_check += size;
        if let Err(e) = stored {
            self.metrics.dropped_io.inc();
            warn!(sink = %self.name, error = %e, "cannot store the message in the buffer; dropped");
            return Appended::Dropped;
        }
        self.publish_gauges(&st);
        self.stored.fetch_add(1, Ordering::Relaxed);
        Appended::Stored
    }

    /// Messages stored since start (counted once per append, not per read).
    pub fn stored_total(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Counts a message the router had to give up on while this buffer was full.
    pub fn count_full_drop(&self) {
        self.metrics.dropped_full.inc();
    }

    /// Makes everything appended so far readable, then durable as the sync policy says.
    /// Returns `false` when a write or an fsync failed (a full disk): messages appended
    /// since the last sync may be lost, so their devices must not get an ack.
    ///
    /// The sink may forward a record while its fsync still runs: only the devices' acks
    /// wait for durability, not the forwarding. A record lost to a crash after it was
    /// forwarded costs a duplicate at most: its device got no ack and resends it, and
    /// recovery never hands out the seqs of acked records again (`disk.rs`).
    ///
    /// Blocks the calling thread for the fsync: the router calls it from a thread of its
    /// own, where waiting is all there is to do (a hop to a blocking pool and back would
    /// cost two thread wake-ups per batch).
    pub fn sync(&self) -> bool {
        // Under the lock: hand the appends to the OS. Outside it: the fsync.
        let (handles, upto, mut durable) = {
            let mut st = self.state.lock();
            match &mut st.backend {
                Backend::Memory(m) => (None, m.next_seq - 1, true),
                Backend::Disk(d) => {
                    let upto = d.next_seq() - 1;
                    let handles = d
                        .prepare_sync()
                        .inspect_err(|e| warn!(sink = %self.name, error = %e, "buffer write failed; the devices of recent messages get no ack and resend"))
                        .ok();
                    let written = handles.is_some();
                    (handles, upto, written)
                }
            }
        };
        self.make_readable(upto);
        if let (Some(h), SyncPolicy::Batch) = (handles, self.config.sync) {
            if let Err(e) = h.sync() {
                durable = false;
                warn!(sink = %self.name, error = %e, "buffer fsync failed");
            }
        }
        durable
    }

    fn make_readable(&self, upto: u64) {
        let mut st = self.state.lock();
        if upto <= st.appended_upto {
            return;
        }
        st.appended_upto = upto;
        if let Backend::Disk(d) = &mut st.backend {
            d.set_read_limit(upto + 1);
        }
        drop(st);
        self.readable.notify_one();
    }

    /// `sync = "interval"`: fsyncs every `sync_interval` until `shutdown`, then once more.
    pub async fn run_interval_sync(&self, shutdown: CancellationToken) {
        if self.config.sync != SyncPolicy::Interval || self.dir.is_none() {
            return;
        }
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(self.config.sync_interval.0) => false,
                _ = shutdown.cancelled() => true,
            };
            self.fsync_now().await;
            if stop {
                return;
            }
        }
    }

    /// Forces everything written so far to disk, whatever the policy (used at shutdown).
    pub async fn fsync_now(&self) {
        let handles = {
            let mut st = self.state.lock();
            match &mut st.backend {
                Backend::Disk(d) => d.prepare_sync().ok(),
                Backend::Memory(_) => None,
            }
        };
        if let Some(h) = handles.filter(|h| !h.is_empty()) {
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || h.sync()).await {
                warn!(sink = %self.name, error = %e, "buffer fsync failed");
            }
        }
        let mut st = self.state.lock();
        if let Backend::Disk(d) = &mut st.backend {
            if let Err(e) = d.save_position() {
                warn!(sink = %self.name, error = %e, "cannot save the buffer position");
            }
        }
    }

    /// Waits until a `block`ed append may succeed.
    pub async fn wait_for_space(&self) {
        self.space.notified().await;
    }

    /// Up to `max` readable records past the read position; waits until there is at
    /// least one. Expired records (`ttl`) are dropped and counted here; `drain_rate`
    /// paces the batches.
    pub async fn read_batch(&self, max: usize) -> Vec<Record> {
        loop {
            let pace = {
                let mut st = self.state.lock();
                let wait = st.next_read.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    let batch = self.read_now(&mut st, max);
                    if !batch.is_empty() {
                        if let Some(rate) = self.config.drain_rate {
                            let cost = Duration::from_secs_f64(batch.len() as f64 / rate as f64);
                            st.next_read = Instant::now() + cost;
                        }
                        return batch;
                    }
                    None
                } else {
                    Some(wait)
                }
            };
            match pace {
                Some(wait) => tokio::time::sleep(wait).await,
                None => self.readable.notified().await,
            }
        }
    }

    fn read_now(&self, st: &mut State, max: usize) -> Vec<Record> {
        let cutoff = self
            .config
            .ttl
            .map(|t| now_millis().saturating_sub(t.0.as_millis() as u64));
        let mut expired = 0;
        let batch = match &mut st.backend {
            Backend::Memory(m) => m.read(max, st.appended_upto, cutoff, &mut expired),
            Backend::Disk(d) => {
                let result = d.read_lanes(max, cutoff).map(|b| {
                    expired = b.expired;
                    b.records
                });
                self.metrics.dropped_corrupt.inc_by(d.take_corrupt_count());
                match result {
                    Ok(records) => records,
                    Err(e) => {
                        warn!(sink = %self.name, error = %e, "cannot read the buffer");
                        Vec::new()
                    }
                }
            }
        };
        st.in_flight.extend(batch.iter().map(|r| r.seq));
        if expired > 0 {
            self.metrics.dropped_ttl.inc_by(expired);
            if batch.is_empty() {
                // More may have expired: let the caller come straight back.
                self.readable.notify_one();
            }
        }
        self.publish_gauges(st);
        batch
    }

    /// Confirms `seq`: it is removed once every older record is confirmed too.
    pub fn ack(&self, seq: u64) {
        let mut st = self.state.lock();
        st.in_flight.remove(&seq);
        st.dropped_in_flight.remove(&seq);
        match &mut st.backend {
            Backend::Memory(m) => m.ack(seq),
            Backend::Disk(d) => {
                if let Err(e) = d.ack(seq) {
                    warn!(sink = %self.name, error = %e, "buffer cleanup failed");
                }
            }
        }
        self.publish_gauges(&st);
        drop(st);
        if self.config.when_full == WhenFull::Block {
            self.space.notify_waiters();
            self.space.notify_one();
        }
    }

    /// Moves the read position back to the oldest unconfirmed record.
    pub fn rewind(&self) {
        let mut st = self.state.lock();
        // Dropped while in flight and never confirmed: lost now, so counted now.
        let lost = std::mem::take(&mut st.dropped_in_flight).len() as u64;
        self.metrics.dropped_full.inc_by(lost);
        st.in_flight.clear();
        match &mut st.backend {
            Backend::Memory(m) => m.rewind(),
            Backend::Disk(d) => d.rewind(),
        }
        // Everything unconfirmed is sent again, as the backlog of a new drain. A sink
        // rewinds before every connection attempt, and the upstream came back at some
        // point after the previous one: what arrived since then is live.
        let next = st.backend.next_seq();
        let since = std::mem::replace(&mut st.last_rewind, next);
        self.split(&mut st, since);
        drop(st);
        self.readable.notify_one();
    }

    /// The sink came back (connected, or a delivery succeeded after failures): what
    /// waits now is the backlog of a drain. With `live_first` a drain already split at
    /// the last [`Buffer::rewind`] keeps its lanes (splitting again would re-read the
    /// live records in flight); otherwise the lanes split here. Returns the backlog.
    pub fn start_drain(&self) -> u64 {
        let mut st = self.state.lock();
        let split_already = matches!(&st.backend, Backend::Disk(d) if d.live_boundary().is_some());
        if !split_already {
            let next = st.backend.next_seq();
            self.split(&mut st, next);
        }
        self.backlog(&st)
    }

    /// Starts a drain: the backlog is what is in the buffer below `boundary`;
    /// `live_first` reads records from `boundary` on first.
    fn split(&self, st: &mut State, boundary: u64) {
        st.backlog_until = boundary;
        if let (Backend::Disk(d), Drain::LiveFirst) = (&mut st.backend, self.config.drain) {
            d.split_lanes(boundary);
            // The log may have placed the lane elsewhere (at the end: see `split_lanes`).
            if let Some(b) = d.live_boundary() {
                st.backlog_until = b;
            }
        }
        self.publish_gauges(st);
    }

    fn backlog(&self, st: &State) -> u64 {
        st.backend.pending_below(st.backlog_until)
    }

    /// Unconfirmed messages of the current drain's backlog (0 once drained).
    pub fn backlog_pending(&self) -> u64 {
        let st = self.state.lock();
        self.backlog(&st)
    }

    /// Whether records survive a restart (disk storage), so their sequence numbers are
    /// stable across restarts.
    pub fn is_durable(&self) -> bool {
        self.config.storage == Storage::Disk
    }

    /// Messages waiting (including in flight).
    pub fn pending(&self) -> u64 {
        self.state.lock().backend.pending()
    }

    /// Refreshes the age gauge (called when metrics are scraped).
    pub fn refresh_age(&self) {
        let mut st = self.state.lock();
        let oldest = match &mut st.backend {
            Backend::Memory(m) => m.oldest_received_at(),
            Backend::Disk(d) => d.oldest_pending_received_at(),
        };
        let age = oldest
            .map(|at| now_millis().saturating_sub(at) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.metrics.oldest_age.set(age);
    }

    fn publish_gauges(&self, st: &State) {
        let pending = st.backend.pending();
        self.metrics.messages.set(pending as i64);
        // The active segment is kept (and reused) when everything in it was delivered: a
        // drained buffer holds nothing for the sink, and reads as empty.
        let bytes = if pending == 0 { 0 } else { st.backend.bytes() };
        self.metrics.bytes.set(bytes as i64);
        self.metrics.backlog.set(self.backlog(st) as i64);
        if let Backend::Disk(d) = &st.backend {
            let corrupt = d.corrupt_files();
            self.metrics.corrupt_files.set(corrupt.files as i64);
            self.metrics.corrupt_bytes.set(corrupt.bytes as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::ByteSize;
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

    fn memory(max_bytes: u64, when_full: WhenFull) -> Buffer {
        let cfg = BufferSection {
            storage: Storage::Memory,
            max_bytes: ByteSize(max_bytes),
            when_full,
            batch: 10,
            ..Default::default()
        };
        Buffer::open("b", &cfg, Path::new("unused"), &Metrics::new()).expect("memory buffer")
    }

    fn payloads(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.msg.payload).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn read_ack_and_rewind_resend_only_unacked() {
        let b = memory(1 << 20, WhenFull::DropOldest);
        for n in 0..5 {
            b.append(msg(n));
        }
        b.sync();
        let batch = b.read_batch(3).await;
        assert_eq!(payloads(&batch), ["0", "1", "2"]);
        b.ack(batch[1].seq); // out of order: nothing freed yet
        assert_eq!(b.pending(), 4);
        b.ack(batch[0].seq);
        assert_eq!(b.pending(), 3);
        b.rewind();
        assert_eq!(payloads(&b.read_batch(10).await), ["2", "3", "4"]);
    }

    #[tokio::test]
    async fn nothing_is_readable_before_sync() {
        let b = memory(1 << 20, WhenFull::DropOldest);
        b.append(msg(0));
        let early = tokio::time::timeout(Duration::from_millis(50), b.read_batch(10)).await;
        assert!(early.is_err(), "read before sync");
        b.sync();
        assert_eq!(payloads(&b.read_batch(10).await), ["0"]);
    }

    #[test]
    fn drop_oldest_and_drop_newest_count_what_they_drop() {
        let size = msg(0).size() as u64;
        let b = memory(size * 3, WhenFull::DropOldest);
        for n in 0..5 {
            assert_eq!(b.append(msg(n)), Appended::Stored);
        }
        assert_eq!(b.pending(), 3);
        assert_eq!(b.metrics.dropped_full.get(), 2);

        let b = memory(size * 3, WhenFull::DropNewest);
        let outcomes: Vec<Appended> = (0..5).map(|n| b.append(msg(n))).collect();
        assert_eq!(outcomes[3], Appended::Dropped);
        assert_eq!(b.metrics.dropped_full.get(), 2);
    }

    #[tokio::test]
    async fn records_dropped_in_flight_count_only_if_never_confirmed() {
        let size = msg(0).size() as u64;
        let b = memory(size * 3, WhenFull::DropOldest);
        for n in 0..3 {
            b.append(msg(n));
        }
        b.sync();
        let in_flight = b.read_batch(2).await;
        b.append(msg(3));
        b.append(msg(4)); // drops records 0 and 1, both in flight
        assert_eq!(
            b.metrics.dropped_full.get(),
            0,
            "not counted while in flight"
        );
        b.ack(in_flight[0].seq); // delivered after all
        b.rewind(); // record 1 was never confirmed: lost now
        assert_eq!(b.metrics.dropped_full.get(), 1);
        b.sync();
        assert_eq!(payloads(&b.read_batch(10).await), ["2", "3", "4"]);
    }

    #[tokio::test]
    async fn block_reports_full_until_an_ack_frees_space() {
        let size = msg(0).size() as u64;
        let b = memory(size * 2, WhenFull::Block);
        b.append(msg(0));
        b.append(msg(1));
        assert!(matches!(b.append(msg(2)), Appended::Full(_)));
        b.sync();
        let batch = b.read_batch(1).await;
        b.ack(batch[0].seq);
        assert_eq!(b.append(msg(2)), Appended::Stored);
    }

    #[tokio::test]
    async fn disk_buffer_survives_reopen_and_expires_by_ttl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = BufferSection::default();
        let metrics = Metrics::new();
        {
            let b = Buffer::open("d", &cfg, dir.path(), &metrics).expect("open");
            for n in 0..10 {
                b.append(msg(n));
            }
            b.sync();
            let batch = b.read_batch(3).await;
            for r in &batch {
                b.ack(r.seq);
            }
            b.fsync_now().await;
        }
        let b = Buffer::open("d", &cfg, dir.path(), &metrics).expect("reopen");
        assert_eq!(b.pending(), 7);
        assert_eq!(
            payloads(&b.read_batch(100).await),
            ["3", "4", "5", "6", "7", "8", "9"]
        );

        let ttl = BufferSection {
            ttl: Some(crate::config::HumanDuration(Duration::from_millis(1))),
            ..BufferSection::default()
        };
        let b = Buffer::open("d", &ttl, dir.path(), &metrics).expect("reopen with ttl");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut old = msg(99);
        old.received_at -= 1_000;
        b.append(old);
        b.sync();
        let late = tokio::time::timeout(Duration::from_millis(200), b.read_batch(100)).await;
        assert!(late.is_err(), "every record expired");
        assert_eq!(b.metrics.dropped_ttl.get(), 8);
        assert_eq!(b.pending(), 0);
    }
}
