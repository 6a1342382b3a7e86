//! Sink workers: one task per configured sink reads its buffer and delivers upstream.
//!
//! Each kind lives in its own file with its delivery loop and unit tests. A worker acks a
//! buffer record only after the destination confirmed it (MQTT PUBACK, file write +
//! flush); on any connection failure it rewinds the buffer so every unconfirmed record
//! is sent again, and backs off exponentially with jitter: each kind says what one
//! session with its upstream is, and [`supervise`] runs the sessions, the waits between
//! them and shutdown for all of them. With a `rate`, every worker waits for its [`Pacer`]
//! before each upstream message goes on the wire.

mod backoff;
pub mod cloud;
pub mod config;
pub mod credentials;
pub mod envelope;
pub mod failover;
pub mod file;
pub mod http;
pub mod kafka;
pub mod mqtt;
pub mod pacing;
pub mod pack;
mod supervise;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use parking_lot::Mutex;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use backoff::{check_backoff, Backoff, BackoffError};
pub use pacing::{Pacer, Rate};

use crate::buffer::Buffer;
use crate::message::{now_millis, Message};
use crate::metrics::Metrics;
use crate::rules::downlink::DownlinkTap;
pub use config::{SinkKindPlan, SinkPlan};

/// What every sink worker gets.
pub struct SinkContext {
    pub name: String,
    pub buffer: Arc<Buffer>,
    pub batch: usize,
    pub shutdown: CancellationToken,
    /// Time allowed after `shutdown` to finish sends in flight.
    pub grace: Duration,
    pub metrics: SinkMetrics,
    /// Where undeliverable messages go.
    pub dead_letter: DeadLetter,
    /// MQTT sinks with `[[downlinks]]`: what to subscribe to upstream, where to hand it.
    pub downlink: Option<DownlinkTap>,
    /// The sink's `rate`: each worker paces what it puts on the wire with a [`Pacer`].
    pub rate: Option<Rate>,
    /// Its TLS files, with the last set that loaded (`credentials`).
    pub tls_files: Arc<credentials::TlsFiles>,
}

impl SinkContext {
    /// A fresh pacer for the sink's `rate` (MQTT: one per connection); `None` without one.
    pub fn pacer(&self) -> Option<Pacer> {
        self.rate.map(Pacer::new)
    }

    /// The retry backoff of a sink between `min` and `max`. Validation refuses bad
    /// bounds; should some reach here anyway, 1s..30s is used rather than stopping.
    pub fn backoff(&self, min: Duration, max: Duration) -> Backoff {
        Backoff::try_new(min, max).unwrap_or_else(|e| {
            warn!(sink = %self.name, error = %e, "invalid backoff; using 1s..30s");
            Backoff::try_new(Duration::from_secs(1), Duration::from_secs(30))
                .unwrap_or_else(|_| unreachable!("constant bounds are valid"))
        })
    }

    /// Sleeps for `delay`, or returns `true` at once when shutdown begins.
    pub async fn sleep_or_stop(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }

    /// The upstream works: marks the sink up and, on a change of state with a backlog
    /// waiting, logs that it starts draining.
    pub fn up(&self, detail: &str) {
        if self.metrics.mark_up(detail) {
            self.metrics.draining(self.buffer.start_drain());
        }
    }

    /// Called after acks: logs "drained" once a backlog being drained is gone (live
    /// messages still flowing do not keep a drain open).
    pub fn acked(&self) {
        if self.metrics.is_draining() {
            self.metrics.check_drained(self.buffer.backlog_pending());
        }
    }

    /// Moves records that can never be delivered to the dead-letter file, counts them
    /// as dropped under `reason`, and acks them. If the file cannot be written nothing is
    /// acked, the error is counted (`reason="dead_letter"`) and returned.
    pub async fn dead_letter(
        &self,
        records: &[crate::buffer::Record],
        reason: &str,
        detail: &str,
    ) -> std::io::Result<()> {
        let messages: Vec<Message> = records.iter().map(|r| r.msg.clone()).collect();
        if let Err(e) = self
            .dead_letter
            .write(&self.name, reason, detail, &messages)
            .await
        {
            self.metrics.error("dead_letter");
            warn!(sink = %self.name, path = %self.dead_letter.path.display(), error = %e, "cannot write the dead-letter file");
            return Err(e);
        }
        for record in records {
            self.metrics.undeliverable(reason);
            self.buffer.ack(record.seq);
        }
        warn!(sink = %self.name, reason, count = records.len(), path = %self.dead_letter.path.display(), "undeliverable, moved to the dead-letter file: {detail}");
        Ok(())
    }
}

/// Sleeps until `at`; never returns for `None` (guard the select branch instead).
pub(crate) async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Metric handles of one sink.
pub struct SinkMetrics {
    delivered_total: IntCounter,
    pub up: IntGauge,
    errors: IntCounterVec,
    dropped: IntCounterVec,
    latency: Histogram,
    /// `edgebridge_sink_endpoint{sink,endpoint}` (MQTT sinks).
    endpoint: IntGaugeVec,
    name: String,
    state: Arc<SinkState>,
}

impl SinkMetrics {
    pub fn new(metrics: &Metrics, sink: &str) -> Self {
        Self {
            delivered_total: metrics.sink_delivered.with_label_values(&[sink]),
            up: metrics.sink_up.with_label_values(&[sink]),
            errors: metrics.sink_errors.clone(),
            dropped: metrics.buffer_dropped.clone(),
            latency: metrics.delivery_latency.with_label_values(&[sink]),
            endpoint: metrics.sink_endpoint.clone(),
            name: sink.to_string(),
            state: Arc::new(SinkState::default()),
        }
    }

    /// The state shared with the status API.
    pub fn state(&self) -> Arc<SinkState> {
        self.state.clone()
    }

    /// Counts an error under `reason` (`edgebridge_sink_errors_total`). A failure of the
    /// upstream itself goes through [`SinkMetrics::mark_down`], which also counts it and
    /// records it as the last error.
    pub fn error(&self, reason: &str) {
        self.errors.with_label_values(&[&self.name, reason]).inc();
    }

    /// The upstream works (connected, or a delivery succeeded). Logs once per change;
    /// returns whether the sink was down before.
    pub fn mark_up(&self, detail: &str) -> bool {
        let mut state = self.state.inner.lock();
        if state.up {
            return false;
        }
        state.up = true;
        self.up.set(1);
        drop(state);
        info!(sink = %self.name, "sink up: {detail}");
        true
    }

    /// The endpoint in use of a sink with `count` endpoints (its `url` list): sets
    /// `edgebridge_sink_endpoint` to 1 for `index`, 0 for the others, and shows it in the
    /// status.
    pub fn endpoint_in_use(&self, index: usize, count: usize) {
        // A reload may have shortened the list: a series of an index no longer listed
        // (possibly still at 1) would contradict the new ones.
        use prometheus::core::Collector;
        let stale: Vec<String> = self
            .endpoint
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter_map(|metric| {
                let labels = metric.get_label();
                let ours = labels
                    .iter()
                    .any(|l| l.name() == "sink" && l.value() == self.name);
                let endpoint = labels.iter().find(|l| l.name() == "endpoint")?;
                let beyond = endpoint
                    .value()
                    .parse::<usize>()
                    .map_or(true, |i| i >= count);
                (ours && beyond).then(|| endpoint.value().to_string())
            })
            .collect();
        for endpoint in stale {
            let _ = self.endpoint.remove_label_values(&[&self.name, &endpoint]);
        }
        for i in 0..count {
            self.endpoint
                .with_label_values(&[&self.name, &i.to_string()])
                .set(i64::from(i == index));
        }
        self.state.inner.lock().endpoint = Some(index);
    }

    /// The worker stopped on shutdown: down, but not an error.
    pub fn mark_stopped(&self) {
        let mut state = self.state.inner.lock();
        let was_up = std::mem::replace(&mut state.up, false);
        state.draining = None;
        self.up.set(0);
        drop(state);
        if was_up {
            info!(sink = %self.name, "sink stopped");
        }
    }

    /// After [`SinkMetrics::mark_up`] returned `true`: a backlog of `pending` messages
    /// starts draining (logged once; nothing when there is none).
    pub fn draining(&self, pending: u64) {
        if pending == 0 {
            return;
        }
        let mut state = self.state.inner.lock();
        state.draining = Some(Draining {
            since: now_millis(),
            pending,
        });
        drop(state);
        info!(sink = %self.name, pending, "draining the backlog");
    }

    /// Whether a backlog is draining: while it is, the worker calls
    /// [`SinkMetrics::check_drained`] after its acks.
    pub fn is_draining(&self) -> bool {
        self.state.inner.lock().draining.is_some()
    }

    /// Logs "drained" once the buffer holds nothing more (`pending` is its count now).
    pub fn check_drained(&self, pending: u64) {
        if pending > 0 {
            return;
        }
        let mut state = self.state.inner.lock();
        let Some(d) = state.draining.take() else {
            return;
        };
        drop(state);
        let seconds = now_millis().saturating_sub(d.since) as f64 / 1000.0;
        info!(sink = %self.name, messages = d.pending, seconds, "backlog drained");
    }

    /// The upstream failed: counts the error under `reason`, records it as the last
    /// error, and marks the sink down. Logs a warning once per change of state (and of
    /// reason while down); repeats go to debug level.
    pub fn mark_down(&self, reason: &str, detail: &str) {
        self.error(reason);
        let mut state = self.state.inner.lock();
        let changed = state.up
            || state
                .last_error
                .as_ref()
                .is_none_or(|last| last.reason != reason);
        state.up = false;
        state.draining = None;
        self.up.set(0);
        state.last_error = Some(LastError {
            reason: reason.to_string(),
            detail: detail.to_string(),
            at: now_millis(),
        });
        drop(state);
        if changed {
            warn!(sink = %self.name, reason, "sink down: {detail}");
        } else {
            debug!(sink = %self.name, reason, "still down: {detail}");
        }
    }

    /// A message whose MQTT 5 message expiry lapsed in the buffer: not sent, counted
    /// (`edgebridge_buffer_dropped_total{reason="expired"}`).
    pub fn expired(&self) {
        self.dropped
            .with_label_values(&[&self.name, "expired"])
            .inc();
    }

    /// A record that can never be delivered (e.g. larger than the upstream allows).
    pub fn undeliverable(&self, reason: &str) {
        self.error(reason);
        self.dropped.with_label_values(&[&self.name, reason]).inc();
    }

    /// Counts one confirmed delivery of a message received at `received_at` (ms).
    pub fn delivered(&self, received_at: u64) {
        self.delivered_total.inc();
        let ms = now_millis().saturating_sub(received_at);
        self.latency.observe(ms as f64 / 1000.0);
    }
}

/// Starts the worker of one sink.
pub fn spawn(plan: &SinkPlan, ctx: SinkContext) -> tokio::task::JoinHandle<()> {
    match &plan.kind {
        SinkKindPlan::Mqtt(m) => tokio::spawn(mqtt::run(m.clone(), ctx)),
        SinkKindPlan::File(f) => tokio::spawn(file::run(f.clone(), ctx)),
        SinkKindPlan::Http(h) => tokio::spawn(http::run(h.clone(), ctx)),
        SinkKindPlan::Kafka(k) => tokio::spawn(kafka::run(k.clone(), ctx)),
    }
}

/// What the status API shows of one sink; written by its worker, read by the admin
/// endpoint.
#[derive(Debug, Default)]
pub struct SinkState {
    inner: Mutex<SinkStateSnapshot>,
}

/// A copy of a [`SinkState`] at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStateSnapshot {
    pub up: bool,
    pub last_error: Option<LastError>,
    /// Set from the moment the sink came up with a backlog until the buffer is empty.
    pub draining: Option<Draining>,
    /// MQTT sinks: the index in the `url` list of the endpoint in use.
    pub endpoint: Option<usize>,
}

/// A backlog being drained after the sink came up.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Draining {
    /// Milliseconds since the Unix epoch.
    pub since: u64,
    /// Messages in the buffer when draining began.
    pub pending: u64,
}

/// The most recent error of a sink.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    /// The `reason` label it was counted under.
    pub reason: String,
    pub detail: String,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
}

impl SinkState {
    pub fn snapshot(&self) -> SinkStateSnapshot {
        self.inner.lock().clone()
    }
}

/// A sink's dead-letter file: messages that can never be delivered (a permanent HTTP
/// 4xx, a payload over the upstream's limit...) are appended here as NDJSON, one line
/// each, before their buffer record is acked; so nothing leaves the gateway unrecorded.
///
/// Line: `{"dead_at","sink","reason","detail","topic","payload"[,"encoding"],"qos",
/// "retain","received_at"}`; the payload is text when valid UTF-8, else base64.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub path: PathBuf,
}

impl DeadLetter {
    /// The dead-letter file of `sink`: `<data_dir>/dead_letter/<sink>.ndjson`.
    pub fn new(data_dir: &std::path::Path, sink: &str) -> Self {
        Self {
            path: data_dir.join("dead_letter").join(format!("{sink}.ndjson")),
        }
    }

    /// Appends `messages` and syncs the file. On error nothing may be acked: the caller
    /// keeps the records and retries.
    pub async fn write(
        &self,
        sink: &str,
        reason: &str,
        detail: &str,
        messages: &[Message],
    ) -> std::io::Result<()> {
        let mut lines = Vec::new();
        let dead_at = now_millis();
        for msg in messages {
            let mut line = match std::str::from_utf8(&msg.payload) {
                Ok(text) => json!({ "payload": text }),
                Err(_) => json!({
                    "payload": base64::engine::general_purpose::STANDARD.encode(&msg.payload),
                    "encoding": "base64",
                }),
            };
            line["dead_at"] = json!(dead_at);
            line["sink"] = json!(sink);
            line["reason"] = json!(reason);
            line["detail"] = json!(detail);
            line["topic"] = json!(msg.topic);
            line["qos"] = json!(msg.qos);
            line["retain"] = json!(msg.retain);
            line["received_at"] = json!(msg.received_at);
            // Serializing a serde_json::Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut lines, &line);
            lines.push(b'\n');
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            file.write_all(&lines)?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A worker's context over a memory buffer, its dead letters under `data_dir`.
    pub(crate) fn context(data_dir: &std::path::Path, name: &str) -> SinkContext {
        let metrics = Metrics::new();
        let section = crate::buffer::config::BufferSection {
            storage: crate::buffer::config::Storage::Memory,
            ..Default::default()
        };
        let buffer = Buffer::open(name, &section, data_dir, &metrics).expect("memory buffer");
        SinkContext {
            name: name.into(),
            buffer: Arc::new(buffer),
            batch: 10,
            shutdown: CancellationToken::new(),
            grace: Duration::from_secs(1),
            metrics: SinkMetrics::new(&metrics, name),
            dead_letter: DeadLetter::new(data_dir, name),
            downlink: None,
            rate: None,
            tls_files: credentials::TlsFiles::new(name, metrics.credentials_reloads.clone()),
        }
    }

    #[tokio::test]
    async fn dead_letters_are_appended_as_ndjson() {
        let dir = tempfile::tempdir().unwrap();
        let dl = DeadLetter::new(dir.path(), "hook");
        let msg = |topic: &str, payload: &'static [u8]| Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 7,
        };
        dl.write(
            "hook",
            "http_400",
            "bad request",
            &[msg("a/1", b"{\"x\":1}")],
        )
        .await
        .unwrap();
        dl.write("hook", "too_large", "", &[msg("a/2", &[0xff, 0xfe])])
            .await
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("dead_letter/hook.ndjson")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["topic"], "a/1");
        assert_eq!(lines[0]["payload"], "{\"x\":1}");
        assert_eq!(lines[0]["reason"], "http_400");
        assert_eq!(lines[1]["encoding"], "base64");
        assert_eq!(lines[1]["payload"], "//4=");
        assert_eq!(lines[1]["received_at"], 7);
    }

    #[test]
    fn the_endpoint_in_use_is_the_only_one_at_1() {
        let metrics = Metrics::new();
        let gauge = |sink: &str, endpoint: &str| metric_value(&metrics.render(), sink, endpoint);
        let m = SinkMetrics::new(&metrics, "s");
        m.endpoint_in_use(2, 3);
        assert_eq!(
            [gauge("s", "0"), gauge("s", "1"), gauge("s", "2")],
            [Some(0), Some(0), Some(1)]
        );
        assert_eq!(m.state().snapshot().endpoint, Some(2));
        // A reload shortened the list while endpoint 2 was in use.
        let m = SinkMetrics::new(&metrics, "s");
        let other = SinkMetrics::new(&metrics, "other");
        other.endpoint_in_use(1, 3);
        m.endpoint_in_use(0, 2);
        assert_eq!(
            [gauge("s", "0"), gauge("s", "1"), gauge("s", "2")],
            [Some(1), Some(0), None]
        );
        assert_eq!(gauge("other", "2"), Some(0), "another sink's series stay");
    }

    /// `edgebridge_sink_endpoint{sink,endpoint}` in Prometheus text, if present.
    fn metric_value(text: &str, sink: &str, endpoint: &str) -> Option<i64> {
        let series =
            format!("edgebridge_sink_endpoint{{endpoint=\"{endpoint}\",sink=\"{sink}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn state_changes_are_recorded() {
        let metrics = Metrics::new();
        let m = SinkMetrics::new(&metrics, "s");
        assert!(!m.state().snapshot().up);
        m.mark_up("connected");
        assert!(m.state().snapshot().up);
        assert_eq!(m.up.get(), 1);
        m.mark_down("refused", "connection refused");
        let snap = m.state().snapshot();
        assert!(!snap.up);
        assert_eq!(m.up.get(), 0);
        let last = snap.last_error.unwrap();
        assert_eq!(
            (last.reason.as_str(), last.detail.as_str()),
            ("refused", "connection refused")
        );
    }
}
