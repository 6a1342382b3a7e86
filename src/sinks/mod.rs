//! Sink workers: one task per configured sink reads its buffer and delivers upstream.
//!
//! Each kind lives in its own file with its delivery loop and unit tests. A worker acks a
//! buffer record only after the destination confirmed it (MQTT PUBACK, file write +
//! flush); on any connection failure it rewinds the buffer so every unconfirmed record
//! is sent again, and backs off exponentially with jitter.

mod backoff;
pub mod file;
pub mod mqtt;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use tokio_util::sync::CancellationToken;

pub use backoff::{Backoff, BackoffError};

use crate::buffer::Buffer;
use crate::config::{SinkKindPlan, SinkPlan};
use crate::message::now_millis;
use crate::metrics::Metrics;

/// What every sink worker gets.
pub struct SinkContext {
    pub name: String,
    pub buffer: Arc<Buffer>,
    pub batch: usize,
    pub shutdown: CancellationToken,
    /// Time allowed after `shutdown` to finish sends in flight.
    pub grace: Duration,
    pub metrics: SinkMetrics,
}

/// Metric handles of one sink.
pub struct SinkMetrics {
    delivered_total: IntCounter,
    pub up: IntGauge,
    errors: IntCounterVec,
    dropped: IntCounterVec,
    latency: Histogram,
    name: String,
}

impl SinkMetrics {
    pub fn new(metrics: &Metrics, sink: &str) -> Self {
        Self {
            delivered_total: metrics.sink_delivered.with_label_values(&[sink]),
            up: metrics.sink_up.with_label_values(&[sink]),
            errors: metrics.sink_errors.clone(),
            dropped: metrics.buffer_dropped.clone(),
            latency: metrics.delivery_latency.with_label_values(&[sink]),
            name: sink.to_string(),
        }
    }

    pub fn error(&self, reason: &str) {
        self.errors.with_label_values(&[&self.name, reason]).inc();
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
    }
}
