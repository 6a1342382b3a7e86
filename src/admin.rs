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

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod history;

pub use history::Sample;
use history::{History, Reading};

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
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind admin address {bind}: {e}"))?;
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

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234567` → `1.2 MiB`.
fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// Seconds as `3d 4h`, `5m 12s`, `42s`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    let (d, h, m, s) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn rate(per_second: Option<f64>) -> String {
    per_second.map_or_else(|| "–".to_string(), |r| format!("{r:.1}/s"))
}

/// Counts by reason as `reason n, reason n`, or `0`.
fn reasons(counts: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(reason, n)| format!("{} {n}", escape(reason)))
        .collect();
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join(", ")
    }
}

fn timestamp(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = SystemTime::now()
        .duration_since(at)
        .unwrap_or_default()
        .as_secs_f64();
    let rfc3339 = humantime::format_rfc3339_seconds(at).to_string();
    let readable = rfc3339.replace('T', " ");
    format!("{} UTC, {} ago", readable.trim_end_matches('Z'), age(ago))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;padding:1rem;background:#f4f5f7;color:#1d2330}\
h1{font-size:1.3rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.2rem 0 .5rem}\
.meta{color:#555;font-size:.9rem}\
.card{background:#fff;border-radius:8px;padding:.8rem;margin:.5rem 0;box-shadow:0 1px 2px #0002}\
.card h3{margin:0 0 .4rem;font-size:1.05rem;display:flex;gap:.5rem;align-items:center;flex-wrap:wrap}\
.badge{font-size:.8rem;padding:.1rem .5rem;border-radius:99px;color:#fff}\
.up{background:#1a7f37}.down{background:#c62828}.draining{background:#b26a00}\
.starting,.stopping{background:#666}.running{background:#1a7f37}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem .8rem;margin:0}\
dt{color:#555}dd{margin:0;overflow-wrap:anywhere}\
.error{color:#c62828}\
table{border-collapse:collapse;width:100%;background:#fff;border-radius:8px}\
td,th{text-align:left;padding:.4rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}\
td{overflow-wrap:break-word}th{white-space:nowrap}\
figure.chart{display:inline-block;margin:0 .8rem .3rem 0}\
figure.chart svg{width:180px;height:36px;background:#f4f4f4;display:block}\
figure.chart polyline{fill:none;stroke:#1565c0;stroke-width:1.5;vector-effect:non-scaling-stroke}\
figcaption{font-size:.8rem;color:#555}";

/// The status page: listeners, sinks, rules. Every config-derived string is escaped.
pub fn render_page(s: &Status) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_SECONDS}\">\
         <title>edgebridge {id}</title><style>{STYLE}</style></head><body>\
         <h1>edgebridge {id} <span class=\"badge {phase}\" id=\"gateway-state\">{phase}</span></h1>\
         <div class=\"meta\">version {version} · up {uptime} · refreshes every {PAGE_REFRESH_SECONDS}s · \
         <a href=\"/api/v1/status\">JSON</a> · <a href=\"/metrics\">metrics</a></div>",
        id = escape(&s.gateway_id),
        phase = phase_name(s.state),
        version = escape(s.version),
        uptime = age(s.uptime_seconds as f64),
    );

    h.push_str("<h2>Listeners</h2>");
    for l in &s.listeners {
        let _ = write!(
            h,
            "<div class=\"card listener\"><h3>{name}</h3><dl>\
             <dt>address</dt><dd>{addr}</dd>\
             <dt>connections</dt><dd>{connections}</dd>\
             <dt>received</dt><dd>{received} ({rate})</dd>\
             <dt>not taken in</dt><dd>{dropped}</dd></dl></div>",
            name = escape(&l.name),
            addr = escape(&l.addr),
            connections = l.connections,
            received = l.received,
            rate = rate(l.received_per_second),
            dropped = reasons(&l.dropped),
        );
    }

    h.push_str("<h2>Sinks</h2>");
    for k in &s.sinks {
        let last_error = match &k.last_error {
            Some(e) => format!(
                "<dd class=\"error\">{}: {} <br><small>{}</small></dd>",
                escape(&e.reason),
                escape(&e.detail),
                timestamp(e.at)
            ),
            None => "<dd>none</dd>".into(),
        };
        let mut backlog = if k.buffer.messages > 0 {
            format!(
                "{} messages, {}, oldest {}",
                k.buffer.messages,
                bytes(k.buffer.bytes),
                age(k.buffer.oldest_age_seconds)
            )
        } else {
            "empty".into()
        };
        if k.buffer.corrupt_files > 0 {
            let _ = write!(
                backlog,
                "; {} .corrupt file(s) kept for inspection ({})",
                k.buffer.corrupt_files,
                bytes(k.buffer.corrupt_bytes)
            );
        }
        if k.buffer.backlog > 0 {
            let _ = write!(backlog, "; draining {} from the outage", k.buffer.backlog);
            if let Some(eta) = k.drain_eta_seconds {
                let _ = write!(backlog, ", about {} left", age(eta));
            }
        }
        let charts = charts(&k.name, &k.history);
        // Shown only with failover (more than one endpoint): otherwise it is the target.
        let endpoint = match &k.endpoint {
            Some(e) if e.list.len() > 1 => {
                let role = if e.index == 0 { "primary" } else { "failover" };
                format!(
                    "<dt>endpoint</dt><dd class=\"endpoint\">{} ({role}; {} of {}: {})</dd>",
                    escape(&e.in_use),
                    e.index + 1,
                    e.list.len(),
                    escape(&e.list.join(", "))
                )
            }
            _ => String::new(),
        };
        let _ = write!(
            h,
            "<div class=\"card sink\" id=\"sink-{name}\"><h3><span class=\"sink-name\">{name}</span>\
             <span class=\"badge {state}\">{state}</span></h3><dl>\
             <dt>target</dt><dd>{kind} {target}</dd>{endpoint}\
             <dt>pacing</dt><dd>{pacing}</dd>\
             <dt>backlog</dt><dd>{backlog}</dd>\
             <dt>delivered</dt><dd>{delivered} ({rate})</dd>\
             <dt>errors</dt><dd>{errors}</dd>\
             <dt>dropped</dt><dd>{dropped}</dd>\
             <dt>last error</dt>{last_error}\
             <dt>recent</dt><dd>{charts}</dd></dl></div>",
            name = escape(&k.name),
            state = k.state,
            kind = k.kind,
            target = escape(&k.target),
            pacing = k.pacing.as_deref().map_or("none".into(), escape),
            delivered = k.delivered,
            rate = rate(k.delivered_per_second),
            errors = reasons(&k.errors),
            dropped = reasons(&k.dropped),
        );
    }

    h.push_str(
        "<h2>Rules</h2><table><tr><th>name</th><th>from</th><th>to</th><th>matches</th></tr>",
    );
    for r in &s.rules {
        let to: Vec<String> = r.to.iter().map(|t| escape(t)).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.name),
            escape(&r.from),
            to.join(", "),
            r.matches
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

/// The received rate, delivered rate and messages waiting of one sink as three small
/// inline SVG line charts (no script, no external resource), each labelled with its
/// last and highest value.
fn charts(sink: &str, samples: &[Sample]) -> String {
    if samples.is_empty() {
        return "no samples yet".into();
    }
    let series: [(&str, &str, Vec<f64>); 3] = [
        (
            "received",
            "received msg/s",
            samples.iter().map(|s| s.received_per_second).collect(),
        ),
        (
            "delivered",
            "delivered msg/s",
            samples.iter().map(|s| s.delivered_per_second).collect(),
        ),
        (
            "waiting",
            "waiting",
            samples.iter().map(|s| s.pending as f64).collect(),
        ),
    ];
    let mut out = String::new();
    for (id, label, values) in series {
        out += &sparkline(&format!("chart-{}-{id}", escape(sink)), label, &values);
    }
    out
}

/// Chart width and height in SVG units.
const CHART_W: f64 = 180.0;
const CHART_H: f64 = 36.0;

fn sparkline(id: &str, label: &str, values: &[f64]) -> String {
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let last = values.last().copied().unwrap_or(0.0);
    let step = CHART_W / (values.len().max(2) - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let y = if max > 0.0 {
                CHART_H - v / max * CHART_H
            } else {
                CHART_H
            };
            format!("{:.1},{:.1}", i as f64 * step, y)
        })
        .collect();
    format!(
        "<figure class=\"chart\"><svg id=\"{id}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" \
         preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{label}: now {last}, highest {max}\">\
         <polyline points=\"{}\"/></svg><figcaption>{label}: {} (max {})</figcaption></figure>",
        points.join(" "),
        number(last),
        number(max),
    )
}

/// A chart value: whole numbers without decimals, others with one.
fn number(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Stopping => "stopping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
        assert_eq!(escape("plain/topic/+"), "plain/topic/+");
    }

    #[test]
    fn sizes_and_ages_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(age(42.7), "42s");
        assert_eq!(age(312.0), "5m 12s");
        assert_eq!(age(3.0 * 86_400.0 + 4.0 * 3_600.0 + 5.0), "3d 4h");
    }

    #[test]
    fn the_page_escapes_every_config_string() {
        let status = Status {
            version: "0.1.0",
            gateway_id: "gw<1>".into(),
            state: Phase::Running,
            started_at: 0,
            uptime_seconds: 65,
            listeners: vec![ListenerStatus {
                name: "dev<ices>".into(),
                addr: "127.0.0.1:1883".into(),
                connections: 3,
                received: 10,
                received_per_second: Some(2.5),
                dropped: BTreeMap::new(),
            }],
            sinks: vec![SinkStatus {
                name: "cl\"oud".into(),
                kind: "mqtt",
                target: "mqtt://<host>:1883".into(),
                endpoint: Some(EndpointStatus {
                    in_use: "<backup>:1883".into(),
                    index: 1,
                    list: vec!["<host>:1883".into(), "<backup>:1883".into()],
                }),
                pacing: Some("100 msg/s per connection (1)".into()),
                up: false,
                state: "down",
                last_error: Some(LastError {
                    reason: "connection_refused".into(),
                    detail: "<b>refused</b>".into(),
                    at: now_millis(),
                }),
                buffer: BufferStatus {
                    messages: 7,
                    bytes: 2048,
                    oldest_age_seconds: 75.0,
                    backlog: 4,
                    corrupt_files: 2,
                    corrupt_bytes: 3072,
                },
                delivered: 0,
                delivered_per_second: None,
                errors_total: 2,
                errors: BTreeMap::from([("connection_refused".to_string(), 2)]),
                dropped_total: 0,
                dropped: BTreeMap::new(),
                drain_eta_seconds: Some(90.0),
                history: vec![
                    Sample {
                        at: 0,
                        received_per_second: 2.5,
                        delivered_per_second: 0.0,
                        pending: 3,
                        backlog: 0,
                    },
                    Sample {
                        at: 10_000,
                        received_per_second: 5.0,
                        delivered_per_second: 1.0,
                        pending: 7,
                        backlog: 4,
                    },
                ],
            }],
            rules: vec![RuleStatus {
                name: "r&d".into(),
                from: "a/<b>/#".into(),
                to: vec!["cl\"oud".into()],
                matches: 10,
            }],
        };
        let page = render_page(&status);
        for raw in [
            "gw<1>",
            "dev<ices>",
            "cl\"oud",
            "<host>",
            "<b>refused",
            "<backup>",
            "r&d",
            "a/<b>",
        ] {
            assert!(!page.contains(raw), "{raw} unescaped in:\n{page}");
        }
        for shown in [
            "gw&lt;1&gt;",
            "cl&quot;oud",
            "mqtt://&lt;host&gt;:1883",
            "&lt;backup&gt;:1883 (failover; 2 of 2: &lt;host&gt;:1883, &lt;backup&gt;:1883)",
            "7 messages, 2.0 KiB, oldest 1m 15s; 2 .corrupt file(s) kept for inspection (3.0 KiB)",
            "connection_refused 2",
            "2.5/s",
            "a/&lt;b&gt;/#",
            "draining 4 from the outage, about 1m 30s left",
            "<dt>pacing</dt><dd>100 msg/s per connection (1)</dd>",
            "id=\"chart-cl&quot;oud-waiting\"",
            "<polyline points=\"0.0,20.6 180.0,0.0\"/>",
            "waiting: 7 (max 7)",
            "received msg/s: 5 (max 5)",
        ] {
            assert!(page.contains(shown), "{shown} missing in:\n{page}");
        }
        assert!(page.contains("name=\"viewport\""));
        assert!(page.contains("http-equiv=\"refresh\""));
    }
}
