//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (alive: every device
//! listener accepts a loopback connection), `/readyz` (started: config loaded, buffers
//! open, listeners bound), `/api/v1/status` (JSON) and `/`, the status page: the same
//! picture as server-rendered HTML for a browser or a phone on the plant floor.
//!
//! Everything shown is read when asked: counters and gauges from the [`Metrics`]
//! registry, up/down and the last error from each sink's [`SinkState`], the backlog from
//! the [`Buffer`]s. Rates are the change of a counter between two requests at least
//! [`RATE_WINDOW`] apart. Nothing secret is ever shown: sinks are described by kind, host
//! and port (or path), never by credentials.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod history;
mod page;

pub use history::Sample;
use history::{History, Reading};
pub use page::{escape, render_page};

use crate::broker::loopback;
use crate::buffer::Buffer;
use crate::config::{Plan, SinkKindPlan};
use crate::message::now_millis;
use crate::metrics::Metrics;
use crate::sinks::{LastError, SinkState};

/// Shortest time between the two samples a rate is computed from.
pub const RATE_WINDOW: Duration = Duration::from_secs(2);

/// Seconds between reloads of the status page.
const PAGE_REFRESH_SECONDS: u32 = 5;

/// The phase of the gateway as `/readyz` and the status report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Buffers, workers and listeners are being set up.
    Starting,
    /// Everything is up; devices are served.
    Running,
    /// Shutdown began: intake stopped, sinks finish their in-flight sends.
    Stopping,
}

/// One sink as the admin endpoint sees it.
pub struct SinkInfo {
    pub name: String,
    /// `mqtt`, `file`, ...
    pub kind: &'static str,
    /// Where it delivers, without credentials: `mqtt://host:port`, a file path.
    pub target: String,
    /// MQTT sinks: every endpoint of the `url` list as `host:port`, the primary first.
    pub endpoints: Vec<String>,
    /// The pacing in force (`rate`), as `check` prints it.
    pub pacing: Option<String>,
    pub state: Arc<SinkState>,
    pub buffer: Arc<Buffer>,
}

/// One rule as the admin endpoint sees it.
pub struct RuleInfo {
    pub name: String,
    pub from: String,
    pub to: Vec<String>,
}

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub gateway_id: String,
    /// Device listeners by name; their addresses are probed by `/healthz`.
    pub listeners: Vec<(String, SocketAddr)>,
    /// Sinks and rules; replaced whole by a reload.
    view: RwLock<Arc<View>>,
    /// Start of the process, for the uptime.
    started: Instant,
    started_at_ms: u64,
    /// A [`Phase`] as u8: written by the gateway's start-up and shutdown, read by probes.
    phase: AtomicU8,
    /// The previous sample of every counter a rate is shown for.
    rates: Mutex<HashMap<String, RateSample>>,
    /// Each sink's recent past, sampled every `history_interval`, for the charts.
    history: History,
    history_interval: Duration,
}

/// The sinks and rules of the plan in force.
pub struct View {
    pub sinks: Vec<SinkInfo>,
    pub rules: Vec<RuleInfo>,
}

impl View {
    fn new(plan: &Plan, sinks: Vec<(String, Arc<SinkState>, Arc<Buffer>)>) -> Self {
        let sinks = sinks
            .into_iter()
            .filter_map(|(name, state, buffer)| {
                let s = plan.sinks.iter().find(|s| s.name == name)?;
                let (kind, target) = describe_target(&s.kind);
                let endpoints = match &s.kind {
                    SinkKindPlan::Mqtt(m) => m.endpoints.iter().map(ToString::to_string).collect(),
                    _ => Vec::new(),
                };
                let mut pacing = s.rate.map(|r| r.describe());
                if let (Some(p), SinkKindPlan::Mqtt(m)) = (&mut pacing, &s.kind) {
                    p.push_str(&format!(" per connection ({})", m.client_ids.len()));
                }
                Some(SinkInfo {
                    name,
                    kind,
                    target,
                    endpoints,
                    pacing,
                    state,
                    buffer,
                })
            })
            .collect();
        let rules = plan
            .rules
            .iter()
            .map(|r| RuleInfo {
                name: r.name.clone(),
                from: r.filter.to_string(),
                to: r
                    .to
                    .iter()
                    .filter_map(|t| plan.sinks.get(t.sink).map(|s| s.name.clone()))
                    .collect(),
            })
            .collect();
        View { sinks, rules }
    }
}

struct RateSample {
    at: Instant,
    value: u64,
    /// Per second over the last window; `None` until a window has passed.
    rate: Option<f64>,
}

impl AdminState {
    /// The admin view of `plan`: sinks are given by name with the state handle and
    /// buffer of each; the phase starts as [`Phase::Starting`].
    pub fn new(
        plan: &Plan,
        metrics: Arc<Metrics>,
        listeners: Vec<(String, SocketAddr)>,
        sinks: Vec<(String, Arc<SinkState>, Arc<Buffer>)>,
    ) -> Self {
        Self {
            metrics,
            gateway_id: plan.gateway_id.clone(),
            listeners,
            view: RwLock::new(Arc::new(View::new(plan, sinks))),
            started: Instant::now(),
            started_at_ms: now_millis(),
            phase: AtomicU8::new(Phase::Starting as u8),
            rates: Mutex::new(HashMap::new()),
            history: History::default(),
            history_interval: plan.history_interval,
        }
    }

    /// Takes one sample of every sink for the charts (the sampler calls it every
    /// `history_interval`).
    pub fn sample_history(&self) {
        let view = self.view();
        let at = now_millis();
        let readings: Vec<(&str, Reading)> = view
            .sinks
            .iter()
            .map(|s| {
                let delivered = self.metrics.sink_delivered.with_label_values(&[&s.name]);
                let reading = Reading {
                    at,
                    stored_total: s.buffer.stored_total(),
                    delivered_total: delivered.get(),
                    pending: s.buffer.pending(),
                    backlog: s.buffer.backlog_pending(),
                };
                (s.name.as_str(), reading)
            })
            .collect();
        self.history.record(Instant::now(), &readings);
    }

    /// After a reload: the sinks and rules of the new `plan`.
    pub fn set_plan(&self, plan: &Plan, sinks: Vec<(String, Arc<SinkState>, Arc<Buffer>)>) {
        let view = Arc::new(View::new(plan, sinks));
        *self.view.write() = view;
    }

    /// The sinks and rules in force.
    pub fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Running,
            _ => Phase::Stopping,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The rate of counter `key` now at `value`, per second over the last window.
    fn rate(&self, key: &str, value: u64) -> Option<f64> {
        let mut rates = self.rates.lock();
        let now = Instant::now();
        let sample = rates.entry(key.to_string()).or_insert(RateSample {
            at: self.started,
            value: 0,
            rate: None,
        });
        let elapsed = now.duration_since(sample.at);
        if elapsed >= RATE_WINDOW {
            let delta = value.saturating_sub(sample.value) as f64;
            let per_second = delta / elapsed.as_secs_f64();
            sample.rate = Some((per_second * 100.0).round() / 100.0);
            sample.at = now;
            sample.value = value;
        }
        sample.rate
    }

    /// The status as served at `/api/v1/status`.
    pub fn status(&self) -> Status {
        let families = self.metrics.gather();
        let m = &self.metrics;
        let listeners = self
            .listeners
            .iter()
            .map(|(name, addr)| {
                let received = m.messages_received.with_label_values(&[name]).get();
                ListenerStatus {
                    name: name.clone(),
                    addr: addr.to_string(),
                    connections: m.connections.with_label_values(&[name]).get(),
                    received,
                    received_per_second: self.rate(&format!("listener/{name}"), received),
                    dropped: by_reason(
                        &families,
                        "edgebridge_messages_dropped_total",
                        "listener",
                        name,
                    ),
                }
            })
            .collect();
        let view = self.view();
        let sinks = view
            .sinks
            .iter()
            .map(|s| {
                s.buffer.refresh_age();
                let state = s.state.snapshot();
                let samples = self.history.samples(&s.name);
                let delivered = m.sink_delivered.with_label_values(&[&s.name]).get();
                let errors = by_reason(&families, "edgebridge_sink_errors_total", "sink", &s.name);
                let dropped = by_reason(
                    &families,
                    "edgebridge_buffer_dropped_total",
                    "sink",
                    &s.name,
                );
                let endpoint = (!s.endpoints.is_empty()).then(|| {
                    let index = state.endpoint.unwrap_or(0);
                    EndpointStatus {
                        in_use: s.endpoints.get(index).cloned().unwrap_or_default(),
                        index,
                        list: s.endpoints.clone(),
                    }
                });
                SinkStatus {
                    name: s.name.clone(),
                    kind: s.kind,
                    target: s.target.clone(),
                    endpoint,
                    pacing: s.pacing.clone(),
                    up: state.up,
                    state: match (state.up, state.draining.is_some()) {
                        (false, _) => "down",
                        (true, true) => "draining",
                        (true, false) => "up",
                    },
                    last_error: state.last_error,
                    buffer: BufferStatus {
                        messages: m.buffer_messages.with_label_values(&[&s.name]).get(),
                        bytes: m.buffer_bytes.with_label_values(&[&s.name]).get(),
                        oldest_age_seconds: m.buffer_oldest_age.with_label_values(&[&s.name]).get(),
                        backlog: s.buffer.backlog_pending(),
                        corrupt_files: m.buffer_corrupt_files.with_label_values(&[&s.name]).get(),
                        corrupt_bytes: m.buffer_corrupt_bytes.with_label_values(&[&s.name]).get(),
                    },
                    drain_eta_seconds: history::drain_eta_seconds(&samples),
                    history: samples,
                    delivered,
                    delivered_per_second: self.rate(&format!("sink/{}", s.name), delivered),
                    errors_total: errors.values().sum(),
                    errors,
                    dropped_total: dropped.values().sum(),
                    dropped,
                }
            })
            .collect();
        let rules = view
            .rules
            .iter()
            .map(|r| RuleStatus {
                name: r.name.clone(),
                from: r.from.clone(),
                to: r.to.clone(),
                matches: m.rule_matches.with_label_values(&[&r.name]).get(),
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            gateway_id: self.gateway_id.clone(),
            state: self.phase(),
            started_at: self.started_at_ms,
            uptime_seconds: self.started.elapsed().as_secs(),
            listeners,
            sinks,
            rules,
        }
    }
}

/// Kind and target of a sink, without credentials.
fn describe_target(kind: &SinkKindPlan) -> (&'static str, String) {
    match kind {
        SinkKindPlan::Mqtt(m) => {
            let scheme = if m.tls.is_some() { "mqtts" } else { "mqtt" };
            ("mqtt", format!("{scheme}://{}:{}", m.host, m.port))
        }
        // The URL without its query or password, which may be secrets.
        SinkKindPlan::Http(h) => (
            "http",
            crate::sinks::http::config::redact_url(h.url.source()),
        ),
        SinkKindPlan::Kafka(k) => (
            "kafka",
            format!("{} → {}", k.brokers.join(","), k.topic.source()),
        ),
        SinkKindPlan::File(f) => ("file", f.path.display().to_string()),
    }
}

/// Values of counter `family` for `label = value`, by their `reason` label.
fn by_reason(
    families: &[prometheus::proto::MetricFamily],
    family: &str,
    label: &str,
    value: &str,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Some(f) = families.iter().find(|f| f.name() == family) else {
        return out;
    };
    for metric in f.get_metric() {
        let labels = metric.get_label();
        if !labels
            .iter()
            .any(|l| l.name() == label && l.value() == value)
        {
            continue;
        }
        if let Some(reason) = labels.iter().find(|l| l.name() == "reason") {
            let count = metric.get_counter().value() as u64;
            *out.entry(reason.value().to_string()).or_default() += count;
        }
    }
    out
}

/// `/api/v1/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub gateway_id: String,
    pub state: Phase,
    /// Milliseconds since the Unix epoch.
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub listeners: Vec<ListenerStatus>,
    pub sinks: Vec<SinkStatus>,
    pub rules: Vec<RuleStatus>,
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub addr: String,
    pub connections: i64,
    pub received: u64,
    pub received_per_second: Option<f64>,
    /// Not taken into intake, by reason.
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub kind: &'static str,
    pub target: String,
    /// MQTT sinks: the endpoint in use and the list it is taken from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<EndpointStatus>,
    /// The pacing in force (`rate`): `100 msg/s, 512.0 KiB/s per connection (1)`.
    pub pacing: Option<String>,
    pub up: bool,
    /// `up`, `draining` (up, with a backlog from an outage still being sent) or `down`.
    pub state: &'static str,
    pub last_error: Option<LastError>,
    pub buffer: BufferStatus,
    pub delivered: u64,
    pub delivered_per_second: Option<f64>,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
    pub dropped_total: u64,
    pub dropped: BTreeMap<String, u64>,
    /// While a backlog drains: seconds until it is gone at the pace of the last minute.
    pub drain_eta_seconds: Option<f64>,
    /// The last hour (360 samples at the default `history_interval`), oldest first.
    pub history: Vec<Sample>,
}

/// The endpoint an MQTT sink uses (`url` may list several: failover).
#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    /// `host:port` of the endpoint in use; never credentials.
    pub in_use: String,
    /// Its index in `list`; 0 is the primary.
    pub index: usize,
    /// Every endpoint as `host:port`, the primary first.
    pub list: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BufferStatus {
    pub messages: i64,
    pub bytes: i64,
    pub oldest_age_seconds: f64,
    /// Messages of the current drain's backlog not yet delivered.
    pub backlog: u64,
    /// `*.corrupt` files kept for inspection, and their bytes.
    pub corrupt_files: i64,
    pub corrupt_bytes: i64,
}

#[derive(Debug, Serialize)]
pub struct RuleStatus {
    pub name: String,
    pub from: String,
    pub to: Vec<String>,
    pub matches: u64,
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    for s in &state.view().sinks {
        s.buffer.refresh_age();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    for (_, addr) in &state.listeners {
        let probe =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(loopback(*addr)));
        if !matches!(probe.await, Ok(Ok(_))) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("listener {addr} does not accept connections\n"),
            );
        }
    }
    (StatusCode::OK, "ok\n".to_string())
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    match state.phase() {
        Phase::Running => (StatusCode::OK, "ready\n"),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        Phase::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    // Serializing plain structs of strings and numbers cannot fail.
    let body = serde_json::to_string_pretty(&state.status()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

async fn page(State(state): State<Arc<AdminState>>) -> Html<String> {
    Html(render_page(&state.status()))
}

/// Samples every sink for the charts until `shutdown`; the first sample, at once, is
/// the base the first rates are measured from.
async fn sample_history(state: Arc<AdminState>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(state.history_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => state.sample_history(),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Binds `bind` and serves until `shutdown`. Returns the bound address.
pub async fn start(
    bind: SocketAddr,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve(self::bind(bind).await?, state, shutdown)
}

/// Binds the admin address (before anything else starts, so a taken port stops the start
/// before a buffer is opened).
pub async fn bind(bind: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind admin address {bind}: {e}"))
}

/// Serves on `listener` until `shutdown`. Returns the bound address.
pub fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .with_state(state.clone());
    tokio::spawn(sample_history(state.clone(), shutdown.clone()));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok((addr, task))
}
