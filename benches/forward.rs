//! End-to-end forwarding benchmark: devices → target → upstream Mosquitto → receiver.
//!
//! Run with `cargo bench --bench forward` (add `-- S1c` to run only the named scenarios,
//! `-- S2 edgebridge` to run one target (`direct`, `edgebridge`, `edgebridge-received`,
//! `bridge`); fixed-rate scenarios run 3 interleaved rounds of every target and add
//! `edgebridge-received` (`ack = "received"`); `EDGEBRIDGE_BENCH_LISTENER` / `EDGEBRIDGE_BENCH_SINK`
//! add TOML keys to the gateway's listener / sink, and `EDGEBRIDGE_BENCH_BINARY` measures a
//! given binary instead of building one (A/B runs of two builds; every bench honours it
//! and says so in its results), for experiments;
//! results are written to `benches/RESULTS.md` only when every S1/S2 scenario ran). S2
//! publishes at a fixed total rate instead of flat out, for latency. The
//! backlog scenario S3 (edgebridge only, a few minutes) runs only when named
//! (`-- S3`) and replaces its own section of `benches/RESULTS.md`. So does S3o (`-- S3o`,
//! about 5 minutes; `-- S3o bridge` for one target): 5,000 msg/s for 100 s while the
//! uplink between the target and the upstream is cut from 10 s to 70 s by a proxy in the
//! bench, then drain; edgebridge and the Mosquitto bridge one after the other on the same
//! load (time to drain, live latency during the drain, loss, CPU per message, peak RSS,
//! load average).
//!
//! What one run measures. N device connections (rumqttc, MQTT 3.1.1) publish
//! sequence-numbered 100-byte QoS 1 payloads on `bench/dev<i>`, each as fast as its
//! in-flight window allows: a semaphore of `window` permits is taken before a publish and
//! given back on its PUBACK, and the send timestamp is taken once the permit is held.
//! The target forwards to an upstream Mosquitto, where one receiver (QoS 1 subscription to
//! `bench/#`, clean_session = false) checks sequences and latencies. Targets:
//! - `direct`: the devices publish straight into the upstream: the load generator's and
//!   the upstream's own ceiling (its RSS/CPU columns are the upstream Mosquitto's);
//! - `edgebridge`: the release binary (`target/release/edgebridge`, built first) with
//!   `ack = "durable"`, one mqtt sink to the upstream and a rule `bench/#` → that sink;
//! - `mosquitto-bridge`: a second Mosquitto bridging `bench/# out 1` to the upstream.
//!
//! Every run gets a fresh upstream and a fresh target, so peak RSS (VmHWM) and CPU time
//! (utime + stime, counted from the first publish to the last receive) belong to that run
//! alone. A run ends when every message arrived, after `IDLE_LIMIT` without progress, or
//! at `RUN_DEADLINE`; child processes are killed on every exit path (`ChildGuard`, also on
//! Ctrl-C / SIGTERM).

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

mod support;
use support::*;

/// Payload size of every benchmark message, as the issue asks.
const PAYLOAD_LEN: usize = 100;
/// First bytes of every benchmark payload, so stray messages are recognised.
const MAGIC: &[u8; 4] = b"EBF1";
/// Hard limit of one run's load phase: the bench never hangs.
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// No new run starts after this (normally the whole bench takes about a minute).
const TOTAL_BUDGET: Duration = Duration::from_secs(8 * 60);
/// A run that makes no progress (no PUBACK at a device, no message at the receiver) for
/// this long is over: what has not arrived by then is counted as lost.
const IDLE_LIMIT: Duration = Duration::from_secs(10);
/// Time allowed for a process to start, connections to be made, the path to carry a
/// warm-up message.
const START_LIMIT: Duration = Duration::from_secs(20);
/// The upstream client window of the gateway's mqtt sink (`inflight`, default 100); the
/// Mosquitto bridge gets the same window (`max_inflight_messages`, default 20) so that
/// both forward with the same number of unacknowledged messages.
const FORWARD_WINDOW: u32 = 100;
/// Upstream → receiver window (Mosquitto `max_inflight_messages`). With Mosquitto's
/// default of 20, messages queued in the upstream on their way to the receiver (S1b
/// direct: p50 1.5 s instead of 0.18 s; S1 direct ~20% fewer msg/s); 0 (unlimited) could
/// exceed the 16-bit packet id space with a backlog.
const RECEIVER_WINDOW: u32 = 1000;

struct Scenario {
    name: &'static str,
    devices: u32,
    per_device: u64,
    window: u16,
    /// Total messages/s over all devices; 0: flat out.
    rate: u64,
    what: &'static str,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "S1",
        devices: 10,
        per_device: 20_000,
        window: 100,
        rate: 0,
        what: "10 devices × 20,000 msgs, window 100, flat out",
    },
    Scenario {
        name: "S1b",
        devices: 100,
        per_device: 2_000,
        window: 100,
        rate: 0,
        what: "100 devices × 2,000 msgs, window 100, flat out",
    },
    Scenario {
        name: "S1c",
        devices: 10,
        per_device: 2_000,
        window: 1,
        rate: 0,
        what: "10 devices × 2,000 msgs, window 1 (stop-and-wait)",
    },
    Scenario {
        name: "S2",
        devices: 10,
        per_device: 5_000,
        window: 100,
        rate: 5_000,
        what: "10 devices × 5,000 msgs at a fixed 5,000 msg/s in total (10 s), window 100; \
               latency from each message's scheduled send time",
    },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Gateway,
    /// edgebridge with `ack = "received"`: device PUBACKs do not wait for the fsync, as
    /// with Mosquitto (fixed-rate scenarios only, where that is what differs).
    GatewayAckReceived,
    /// edgebridge with `protocol = "3.1.1"` on its MQTT sink (the default for a plain
    /// broker is MQTT 5): S1 and S2 only, so that the two protocols compare in one run.
    GatewayV311,
    Bridge,
}

impl Target {
    const ALL: [Target; 5] = [
        Target::Direct,
        Target::Gateway,
        Target::GatewayAckReceived,
        Target::GatewayV311,
        Target::Bridge,
    ];

    /// How a target is named on the command line.
    fn word(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Gateway => "edgebridge",
            Target::GatewayAckReceived => "edgebridge-received",
            Target::GatewayV311 => "edgebridge-3.1.1",
            Target::Bridge => "bridge",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct (no gateway)",
            Target::Gateway => "edgebridge",
            Target::GatewayAckReceived => "edgebridge, ack = received",
            Target::GatewayV311 => "edgebridge, MQTT 3.1.1 sink",
            Target::Bridge => "mosquitto-bridge",
        }
    }

    /// Whether `scenario` runs against this target.
    fn runs(self, scenario: &Scenario) -> bool {
        match self {
            Target::GatewayAckReceived => scenario.rate > 0,
            Target::GatewayV311 => matches!(scenario.name, "S1" | "S2"),
            _ => true,
        }
    }
}

/// Fixed-rate scenarios (latency) run this many rounds of every target, interleaved, and
/// are summarised by the median round: one run's p99 moves by a millisecond on a shared
/// 2-core machine.
const FIXED_RATE_ROUNDS: usize = 3;

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// A Mosquitto process with its config and log in a temp dir.
struct Mosquitto {
    process: ChildGuard,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto -c` with the common settings plus `extra` (bridge sections) and
    /// waits until it logged "running" and accepts TCP. Tries three ports (three times
    /// `fixed_port` when given).
    async fn start(
        max_inflight: u32,
        extra: &str,
        fixed_port: Option<u16>,
    ) -> Result<Mosquitto, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let log = dir.path().join("mosquitto.log");
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = match fixed_port {
                Some(p) => p,
                None => free_port()?,
            };
            // `user root`: as root Mosquitto would otherwise switch to `mosquitto`, which
            // cannot read this 0700 temp dir.
            let conf = format!(
                "user root\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nmax_inflight_messages {max_inflight}\n\
                 log_dest file {log}\nlistener {port} 127.0.0.1\n{extra}",
                log = log.display()
            );
            let conf_path = dir.path().join("mosquitto.conf");
            std::fs::write(&conf_path, conf).map_err(|e| format!("write config: {e}"))?;
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| format!("open {}: {e}", log.display()))?;
            let runs_before = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches(" running")
                .count();
            let child = Command::new(MOSQUITTO)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(|e| format!("spawn {MOSQUITTO}: {e} (apt-get install mosquitto)"))?;
            let mut process = ChildGuard { child };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !process.has_exited() {
                let running = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .matches(" running")
                    .count()
                    > runs_before;
                if running && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Mosquitto {
                        process,
                        port,
                        log,
                        _dir: dir,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            last_error = tail(&log, 10);
        }
        Err(format!("mosquitto did not start:\n{last_error}"))
    }

    /// The upstream "cloud": where every target delivers and the receiver subscribes.
    async fn upstream() -> Result<Mosquitto, String> {
        Mosquitto::start(RECEIVER_WINDOW, "", None).await
    }

    /// A Mosquitto that bridges `bench/#` to `upstream_port`.
    ///
    /// `restart_timeout 1 1` (base and cap): a single value does not turn off
    /// Mosquitto 2.0's jittered backoff (default base 5 s, cap 30 s; seen as 6–31 s
    /// between attempts in S3o), and the bridge should retry about every second, as the
    /// gateway does with `backoff_max = "1s"`.
    async fn bridge(upstream_port: u16) -> Result<Mosquitto, String> {
        let bridge = format!(
            "connection upstream\naddress 127.0.0.1:{upstream_port}\n\
             topic bench/# out 1\nbridge_protocol_version mqttv311\ncleansession false\n\
             notifications false\nrestart_timeout 1 1\n"
        );
        Mosquitto::start(FORWARD_WINDOW, &bridge, None).await
    }
}

/// The edgebridge binary under test, with its generated config in a temp dir.
struct Gateway {
    process: ChildGuard,
    port: u16,
    admin_port: u16,
    log: PathBuf,
    data_dir: PathBuf,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// `sink_extra`: more keys for the `[sinks.upstream]` table.
    async fn start(binary: &Path, upstream_port: u16, sink_extra: &str) -> Result<Gateway, String> {
        Gateway::start_with(binary, upstream_port, sink_extra, None).await
    }

    /// As [`Gateway::start`]; `listener_keys` replace the listener's `ack = "durable"`.
    async fn start_with(
        binary: &Path,
        upstream_port: u16,
        sink_extra: &str,
        listener_keys: Option<&str>,
    ) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let (port, admin_port) = (free_port()?, free_port()?);
        let config = format!(
            r#"[gateway]
id = "bench-gw"
data_dir = "{data}"

[admin]
bind = "127.0.0.1:{admin_port}"

[[listeners]]
name = "devices"
bind = "127.0.0.1:{port}"
{listener_keys}

[sinks.upstream]
type = "mqtt"
url = "mqtt://127.0.0.1:{upstream_port}"
{sink_extra}
{sink_env}

[[rules]]
name = "bench"
from = "bench/#"
to = ["upstream"]

[log]
level = "warn"
"#,
            data = dir.path().join("data").display(),
            // The experiment's keys replace the default `ack`.
            listener_keys = match listener_keys {
                Some(keys) => keys.to_string(),
                None => std::env::var("EDGEBRIDGE_BENCH_LISTENER")
                    .unwrap_or_else(|_| "ack = \"durable\"".into()),
            },
            sink_env = std::env::var("EDGEBRIDGE_BENCH_SINK").unwrap_or_default(),
        );
        let config_path = dir.path().join("edgebridge.toml");
        std::fs::write(&config_path, config).map_err(|e| format!("write config: {e}"))?;
        let log = dir.path().join("edgebridge.log");
        let process = Gateway::launch(binary, &config_path, &log, admin_port).await?;
        Ok(Gateway {
            process,
            port,
            admin_port,
            log,
            data_dir: dir.path().join("data"),
            config_path,
            _dir: dir,
        })
    }

    /// Spawns the binary on `config_path` and waits until `/readyz` answers 200.
    async fn launch(
        binary: &Path,
        config_path: &Path,
        log: &Path,
        admin_port: u16,
    ) -> Result<ChildGuard, String> {
        launch_gateway(binary, config_path, log, admin_port, START_LIMIT).await
    }

    /// SIGTERM, wait (bounded) for the exit, start again on the same config and data_dir.
    /// Returns (time to exit, time from spawn to `/readyz` 200, exited cleanly).
    async fn restart(&mut self, binary: &Path) -> Result<(Duration, Duration, bool), String> {
        let stopping = Instant::now();
        signal(self.process.pid(), "-TERM");
        let mut clean = true;
        while !self.process.has_exited() {
            if stopping.elapsed() > Duration::from_secs(30) {
                clean = false;
                let _ = self.process.child.kill();
                let _ = self.process.child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stop_time = stopping.elapsed();
        let starting = Instant::now();
        self.process =
            Gateway::launch(binary, &self.config_path, &self.log, self.admin_port).await?;
        Ok((stop_time, starting.elapsed(), clean))
    }
}

/// Files and bytes under `dir`, recursively.
fn dir_usage(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            let (f, b) = dir_usage(&entry.path());
            total = (total.0 + f, total.1 + b);
        } else {
            total = (total.0 + 1, total.1 + meta.len());
        }
    }
    total
}

// ---------------------------------------------------------------------------------------
// /proc accounting
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Payloads and the receiver
// ---------------------------------------------------------------------------------------

/// Microseconds since the bench started; devices and receiver share this process's clock.
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// `MAGIC`, device (u32 LE), seq (u64 LE), send time in µs (u64 LE), then padding.
fn payload(device: u32, seq: u64, sent_us: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(PAYLOAD_LEN);
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&device.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&sent_us.to_le_bytes());
    p.resize(PAYLOAD_LEN, b'.');
    p
}

fn parse_payload(p: &[u8]) -> Option<(u32, u64, u64)> {
    if p.len() != PAYLOAD_LEN || &p[..4] != MAGIC {
        return None;
    }
    let device = u32::from_le_bytes(p[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(p[8..16].try_into().ok()?);
    let sent = u64::from_le_bytes(p[16..24].try_into().ok()?);
    Some((device, seq, sent))
}

/// Per-device sequence bookkeeping at the receiver.
#[derive(Default)]
struct DeviceSeen {
    seen: Vec<bool>,
    highest: Option<u64>,
    unique: u64,
    last_arrival_us: u64,
}

/// What the receiver saw in one run.
#[derive(Default)]
struct Received {
    devices: Vec<DeviceSeen>,
    /// End-to-end latency of each message's first arrival, µs.
    latencies_us: Vec<u64>,
    unique: u64,
    duplicates: u64,
    /// Arrived after a higher seq of the same device (and not a duplicate).
    reordered: u64,
    /// Payloads that are not benchmark messages, or outside the run's devices/seqs.
    unparsed: u64,
    warmups: u64,
    last_arrival_us: u64,
    connection_errors: u64,
    /// Devices from this index on keep `(sent, latency)` in `split_latencies_us` (S3).
    split_from: Option<u32>,
    split_latencies_us: Vec<(u64, u64)>,
}

impl Received {
    fn new(devices: u32, per_device: u64) -> Self {
        let seen = || DeviceSeen {
            seen: vec![false; per_device as usize],
            ..DeviceSeen::default()
        };
        Received {
            devices: (0..devices).map(|_| seen()).collect(),
            latencies_us: Vec::with_capacity((devices as u64 * per_device) as usize),
            ..Received::default()
        }
    }

    fn record(&mut self, topic: &str, payload: &[u8]) {
        if topic == WARMUP_TOPIC {
            self.warmups += 1;
            return;
        }
        let now = now_us();
        let Some((device, seq, sent)) = parse_payload(payload) else {
            self.unparsed += 1;
            return;
        };
        let Some(d) = self.devices.get_mut(device as usize) else {
            self.unparsed += 1;
            return;
        };
        let Some(seen) = d.seen.get_mut(seq as usize) else {
            self.unparsed += 1;
            return;
        };
        if *seen {
            self.duplicates += 1;
            return;
        }
        *seen = true;
        if d.highest.is_some_and(|h| seq < h) {
            self.reordered += 1;
        }
        d.highest = Some(d.highest.map_or(seq, |h| h.max(seq)));
        d.unique += 1;
        d.last_arrival_us = now;
        self.unique += 1;
        if self.split_from.is_some_and(|from| device >= from) {
            self.split_latencies_us
                .push((sent, now.saturating_sub(sent)));
        } else {
            self.latencies_us.push(now.saturating_sub(sent));
        }
        self.last_arrival_us = now;
    }
}

const WARMUP_TOPIC: &str = "bench/warmup";

/// The QoS 1 subscriber on the upstream; aborted on drop.
struct Receiver {
    received: Arc<Mutex<Received>>,
    task: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(port: u16, client_id: &str, expect: Received) -> Result<Receiver, String> {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let received = Arc::new(Mutex::new(expect));
        let (subscribed_tx, mut subscribed) = watch::channel(false);
        let state = received.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        let _ = client.try_subscribe("bench/#", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed_tx.send_replace(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        lock(&state).record(&p.topic, &p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        lock(&state).connection_errors += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let receiver = Receiver { received, task };
        let subscribed = tokio::time::timeout(START_LIMIT, subscribed.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok());
        if subscribed {
            Ok(receiver)
        } else {
            Err("receiver got no SUBACK from the upstream".into())
        }
    }

    fn unique(&self) -> u64 {
        lock(&self.received).unique
    }

    fn warmups(&self) -> u64 {
        lock(&self.received).warmups
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock is a bench bug; the counts are still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------

/// Counters shared by every device of a run.
#[derive(Default)]
struct LoadStats {
    connected: AtomicU64,
    acked: AtomicU64,
    first_publish_us: AtomicU64,
    /// When the last PUBACK reached a device: intake rate, apart from delivery.
    last_ack_us: AtomicU64,
    connection_errors: AtomicU64,
    /// Messages a device gave up on because a reconnect came back without its session.
    abandoned: AtomicU64,
}

/// Spawns one device: a publisher task gated by `window` permits, and the event-loop
/// task that returns a permit per PUBACK. Returns both tasks (aborted by the caller).
fn spawn_device(
    port: u16,
    client_id: String,
    device: u32,
    scenario: &Scenario,
    mut start: watch::Receiver<bool>,
    stats: Arc<LoadStats>,
) -> [JoinHandle<()>; 2] {
    let window = scenario.window;
    let count = scenario.per_device;
    // Fixed rate: each device sends every `period`; the latency clock starts at the
    // scheduled time, so a stalled window shows as latency (no coordinated omission).
    let period = (scenario.rate > 0)
        .then(|| Duration::from_micros(1_000_000 * scenario.devices as u64 / scenario.rate));
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(window);
    let (client, eventloop) = AsyncClient::new(opts, window as usize);
    let permits = Arc::new(Semaphore::new(window as usize));

    let (publisher_permits, publisher_stats) = (permits.clone(), stats.clone());
    let topic = format!("bench/dev{device}");
    let publisher = tokio::spawn(async move {
        if start.wait_for(|go| *go).await.is_err() {
            return;
        }
        let (t0, t0_us) = (tokio::time::Instant::now(), now_us());
        for seq in 0..count {
            let scheduled = period.map(|p| {
                let offset = p * seq as u32;
                (t0 + offset, t0_us + offset.as_micros() as u64)
            });
            if let Some((at, _)) = scheduled {
                tokio::time::sleep_until(at).await;
            }
            let Ok(permit) = publisher_permits.acquire().await else {
                return;
            };
            permit.forget();
            let sent = scheduled.map_or_else(now_us, |(_, us)| us);
            publisher_stats
                .first_publish_us
                .fetch_min(sent, Ordering::Relaxed);
            let body = payload(device, seq, sent);
            if client
                .publish(&topic, QoS::AtLeastOnce, false, body)
                .await
                .is_err()
            {
                return;
            }
        }
    });

    let events = spawn_device_events(eventloop, window, permits, stats);
    [publisher, events]
}

/// A device's event loop: counts connections and PUBACKs, gives a window permit back per
/// PUBACK.
fn spawn_device_events(
    mut eventloop: rumqttc::EventLoop,
    window: u16,
    permits: Arc<Semaphore>,
    stats: Arc<LoadStats>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut connected_before = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if !connected_before {
                        connected_before = true;
                        stats.connected.fetch_add(1, Ordering::Relaxed);
                    } else if !ack.session_present {
                        // rumqttc dropped everything unacknowledged: free the window.
                        let lost = (window as usize).saturating_sub(permits.available_permits());
                        permits.add_permits(lost);
                        stats.abandoned.fetch_add(lost as u64, Ordering::Relaxed);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    stats.last_ack_us.fetch_max(now_us(), Ordering::Relaxed);
                    permits.add_permits(1);
                }
                Ok(_) => {}
                Err(_) => {
                    stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Aborts the tasks on drop, so no run leaves devices behind.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Publishes a warm-up message into `port` until the receiver saw one: the whole path
/// (and, for the bridge, its upstream connection) is up.
async fn warm_up(port: u16, client_id: &str, receiver: &Receiver) -> Result<(), String> {
    let opts = MqttOptions::new(client_id, "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let _poll = Tasks(vec![tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })]);
    let deadline = Instant::now() + START_LIMIT;
    while Instant::now() < deadline {
        let _ = client.try_publish(WARMUP_TOPIC, QoS::AtLeastOnce, false, "warm-up");
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if receiver.warmups() > 0 {
                let _ = client.try_disconnect();
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(());
            }
        }
    }
    Err("no warm-up message reached the upstream receiver".into())
}

// ---------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------

/// Why the load phase ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Complete,
    Idle,
    Deadline,
    /// The process under test (or the upstream) died.
    Exited,
}

struct RunResult {
    scenario: &'static str,
    target: Target,
    expected: u64,
    unique: u64,
    duplicates: u64,
    reordered: u64,
    unparsed: u64,
    msg_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    seconds: f64,
    /// Share of all the machine's cores busy during the load phase, in percent.
    machine_busy: Option<f64>,
    peak_rss_mib: Option<f64>,
    cpu_us_per_msg: Option<f64>,
    upstream_cpu_us_per_msg: Option<f64>,
    bench_cpu_us_per_msg: Option<f64>,
    acked: u64,
    /// PUBACKs at the devices ÷ (last PUBACK − first publish).
    ack_per_s: Option<f64>,
    device_errors: u64,
    abandoned: u64,
    receiver_errors: u64,
    end: End,
    notes: String,
}

fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    sorted_us[rank.clamp(1, sorted_us.len()) - 1] as f64 / 1000.0
}

/// CPU time of `pid` between two samples, in µs per message.
fn cpu_per_msg(before: Option<f64>, after: Option<f64>, messages: u64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if messages > 0 => Some((a - b) * 1e6 / messages as f64),
        _ => None,
    }
}

/// The process under test, whichever kind it is.
enum UnderTest {
    Direct,
    Gateway(Gateway),
    Bridge(Mosquitto),
}

async fn run_one(
    scenario: &Scenario,
    target: Target,
    binary: &Path,
    run_tag: &str,
) -> Result<RunResult, String> {
    let mut upstream = Mosquitto::upstream().await?;
    let receiver = Receiver::start(
        upstream.port,
        &format!("{run_tag}-rx"),
        Received::new(scenario.devices, scenario.per_device),
    )
    .await?;
    let mut under_test = match target {
        Target::Direct => UnderTest::Direct,
        Target::Gateway => UnderTest::Gateway(Gateway::start(binary, upstream.port, "").await?),
        Target::GatewayAckReceived => UnderTest::Gateway(
            Gateway::start_with(binary, upstream.port, "", Some("ack = \"received\"")).await?,
        ),
        Target::GatewayV311 => {
            UnderTest::Gateway(Gateway::start(binary, upstream.port, "protocol = \"3.1.1\"").await?)
        }
        Target::Bridge => UnderTest::Bridge(Mosquitto::bridge(upstream.port).await?),
    };
    let (port, pid) = match &under_test {
        UnderTest::Direct => (upstream.port, upstream.process.pid()),
        UnderTest::Gateway(g) => (g.port, g.process.pid()),
        UnderTest::Bridge(b) => (b.port, b.process.pid()),
    };
    warm_up(port, &format!("{run_tag}-warmup"), &receiver).await?;

    let stats = Arc::new(LoadStats {
        first_publish_us: AtomicU64::new(u64::MAX),
        ..LoadStats::default()
    });
    let (start_tx, start_rx) = watch::channel(false);
    let tasks = spawn_devices(port, run_tag, scenario, &start_rx, &stats);
    wait_connected(&stats, scenario.devices).await?;

    let cpu_before = cpu_seconds(Some(pid));
    let upstream_cpu_before = cpu_seconds(Some(upstream.process.pid()));
    let bench_cpu_before = cpu_seconds(None);
    let machine_before = MachineCpu::sample();
    let expected = scenario.devices as u64 * scenario.per_device;
    let started = Instant::now();
    start_tx.send_replace(true);

    let mut last_progress = (Instant::now(), 0u64, 0u64);
    let mut peak_buffer = None;
    let mut last_scrape = Instant::now();
    let end = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let UnderTest::Gateway(g) = &under_test {
            // How far delivery falls behind intake: the sink's buffer depth, twice a second.
            if last_scrape.elapsed() >= Duration::from_millis(500) {
                last_scrape = Instant::now();
                if let Some((200, page)) = http_get(g.admin_port, "/metrics") {
                    let depth = metric_sum(&page, "edgebridge_buffer_messages") as u64;
                    peak_buffer = Some(peak_buffer.unwrap_or(0).max(depth));
                }
            }
        }
        let target_died = match &mut under_test {
            UnderTest::Direct => false,
            UnderTest::Gateway(g) => g.process.has_exited(),
            UnderTest::Bridge(b) => b.process.has_exited(),
        };
        if target_died || upstream.process.has_exited() {
            break End::Exited;
        }
        let (unique, acked) = (receiver.unique(), stats.acked.load(Ordering::Relaxed));
        if unique >= expected {
            break End::Complete;
        }
        if (unique, acked) != (last_progress.1, last_progress.2) {
            last_progress = (Instant::now(), unique, acked);
        } else if last_progress.0.elapsed() > IDLE_LIMIT {
            break End::Idle;
        }
        if started.elapsed() > RUN_DEADLINE {
            break End::Deadline;
        }
    };

    let received = std::mem::take(&mut *lock(&receiver.received));
    let cpu_after = cpu_seconds(Some(pid));
    let upstream_cpu_after = cpu_seconds(Some(upstream.process.pid()));
    let bench_cpu_after = cpu_seconds(None);
    let machine_busy = MachineCpu::busy_percent(machine_before, MachineCpu::sample());
    let peak_rss = peak_rss_mib(pid);
    drop(tasks);
    // Let the target see the upstream's last acknowledgements before reading its counters.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut notes = Vec::new();
    match &under_test {
        UnderTest::Gateway(g) => {
            if let Some(counters) = gateway_counters(g.admin_port, Some(peak_buffer.unwrap_or(0))) {
                notes.push(format!("gateway: {counters}"));
            }
            notes.extend(log_problems(&g.log));
            // Which buffer the build under test has: files under data_dir mean a disk log.
            let (files, bytes) = dir_usage(&g.data_dir);
            if files > 0 {
                notes.push(format!(
                    "data_dir after the run: {files} files, {:.1} MiB",
                    bytes as f64 / (1024.0 * 1024.0)
                ));
            }
            if end == End::Exited {
                notes.push(format!(
                    "log tail: {}",
                    tail(&g.log, 5).replace('\n', " / ")
                ));
            }
        }
        UnderTest::Bridge(b) => {
            let log = std::fs::read_to_string(&b.log).unwrap_or_default();
            let connects = log.matches("Connecting bridge (step 1)").count();
            if connects != 1 {
                notes.push(format!("bridge connected {connects} times"));
            }
        }
        UnderTest::Direct => {}
    }

    let mut latencies = received.latencies_us;
    latencies.sort_unstable();
    let first = stats.first_publish_us.load(Ordering::Relaxed);
    let span_us = received.last_arrival_us.saturating_sub(first).max(1);
    let unique = received.unique;
    let acked = stats.acked.load(Ordering::Relaxed);
    let ack_span_us = stats
        .last_ack_us
        .load(Ordering::Relaxed)
        .saturating_sub(first);
    Ok(RunResult {
        scenario: scenario.name,
        target,
        expected,
        unique,
        duplicates: received.duplicates,
        reordered: received.reordered,
        unparsed: received.unparsed,
        msg_per_s: if unique > 0 {
            unique as f64 * 1e6 / span_us as f64
        } else {
            0.0
        },
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        p999_ms: percentile_ms(&latencies, 99.9),
        max_ms: latencies.last().map_or(f64::NAN, |&l| l as f64 / 1000.0),
        seconds: started.elapsed().as_secs_f64(),
        machine_busy,
        peak_rss_mib: peak_rss,
        cpu_us_per_msg: cpu_per_msg(cpu_before, cpu_after, unique),
        upstream_cpu_us_per_msg: cpu_per_msg(upstream_cpu_before, upstream_cpu_after, unique),
        bench_cpu_us_per_msg: cpu_per_msg(bench_cpu_before, bench_cpu_after, unique),
        acked,
        ack_per_s: (ack_span_us > 0).then(|| acked as f64 * 1e6 / ack_span_us as f64),
        device_errors: stats.connection_errors.load(Ordering::Relaxed),
        abandoned: stats.abandoned.load(Ordering::Relaxed),
        receiver_errors: received.connection_errors,
        end,
        notes: notes.join("; "),
    })
}

// ---------------------------------------------------------------------------------------
// S3: backlog while the upstream is down, restart, drain under live traffic
// ---------------------------------------------------------------------------------------

const S3_DEVICES: u32 = 10;
const S3_PER_DEVICE: u64 = 100_000;
const S3_WINDOW: u16 = 100;
/// Devices publishing at a fixed rate while the backlog drains.
const S3_LIVE_DEVICES: u32 = 2;
/// Total live rate, messages/s (split evenly over the live devices).
const S3_LIVE_RATE: u64 = 2_000;
/// Window of each live device: large enough not to throttle the fixed rate.
const S3_LIVE_WINDOW: u16 = 1_000;
const S3_BUILD_DEADLINE: Duration = Duration::from_secs(180);
const S3_DRAIN_DEADLINE: Duration = Duration::from_secs(300);
/// After the drain: time for the last live messages to be acked and to arrive.
const S3_SETTLE_LIMIT: Duration = Duration::from_secs(20);
const S3_WHAT: &str = "10 devices × 100,000 msgs (window 100) into edgebridge while its \
                       upstream is down; SIGTERM + restart on the same data_dir; upstream \
                       started; drain while 2 devices publish 2,000 msg/s in total";

/// A device publishing one message per `period` until `stop` (or `capacity` messages);
/// the timestamp in the payload is the scheduled send time, so a stalled window shows up
/// as latency instead of a lower rate.
#[allow(clippy::too_many_arguments)]
fn spawn_live_device(
    port: u16,
    client_id: String,
    device: u32,
    period: Duration,
    capacity: u64,
    mut start: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    sent: Arc<AtomicU64>,
    stats: Arc<LoadStats>,
) -> [JoinHandle<()>; 2] {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(S3_LIVE_WINDOW);
    let (client, eventloop) = AsyncClient::new(opts, S3_LIVE_WINDOW as usize);
    let permits = Arc::new(Semaphore::new(S3_LIVE_WINDOW as usize));
    let publisher_permits = permits.clone();
    let topic = format!("bench/dev{device}");
    let publisher = tokio::spawn(async move {
        if start.wait_for(|go| *go).await.is_err() {
            return;
        }
        let mut ticker = tokio::time::interval(period);
        for seq in 0..capacity {
            let tick = ticker.tick().await;
            if *stop.borrow() {
                return;
            }
            let Ok(permit) = publisher_permits.acquire().await else {
                return;
            };
            permit.forget();
            let scheduled = now_us().saturating_sub(tick.elapsed().as_micros() as u64);
            let body = payload(device, seq, scheduled);
            if client
                .publish(&topic, QoS::AtLeastOnce, false, body)
                .await
                .is_err()
            {
                return;
            }
            sent.fetch_add(1, Ordering::Relaxed);
        }
    });
    let events = spawn_device_events(eventloop, S3_LIVE_WINDOW, permits, stats);
    [publisher, events]
}

#[derive(Default)]
struct BacklogResult {
    // Build-up (upstream down).
    build_end: &'static str,
    build_acked: u64,
    build_seconds: f64,
    build_rate: f64,
    build_device_errors: u64,
    build_abandoned: u64,
    build_rss_mib: Option<f64>,
    build_hwm_mib: Option<f64>,
    buffer_bytes: Option<f64>,
    buffer_messages: Option<f64>,
    data_dir_mib: f64,
    data_dir_files: u64,
    // Restart.
    stop_seconds: f64,
    stop_clean: bool,
    ready_seconds: f64,
    restart_rss_mib: Option<f64>,
    restart_buffer_messages: Option<f64>,
    // Drain.
    drain_end: &'static str,
    first_backlog_ms: f64,
    backlog_received: u64,
    drain_seconds: f64,
    drain_rate: f64,
    live_sent: u64,
    live_acked: u64,
    live_received: u64,
    live_rate: f64,
    live_p50_ms: f64,
    live_p99_ms: f64,
    live_max_ms: f64,
    live_during_drain: usize,
    duplicates: u64,
    reordered: u64,
    stray: u64,
    receiver_errors: u64,
    live_device_errors: u64,
    drain_hwm_mib: Option<f64>,
    /// Backlog depth (`edgebridge_buffer_messages`) every ~5 s of the drain.
    depth_timeline: Vec<(f64, u64)>,
    notes: Vec<String>,
}

/// Scrapes `/metrics`; `None` when the admin endpoint does not answer.
fn scrape(admin_port: u16) -> Option<String> {
    match http_get(admin_port, "/metrics") {
        Some((200, page)) => Some(page),
        _ => None,
    }
}

/// The gateway's message counters, as one note (`peak_buffer`: the deepest buffer seen).
fn gateway_counters(admin_port: u16, peak_buffer: Option<u64>) -> Option<String> {
    let page = scrape(admin_port)?;
    let m = |name: &str| metric_sum(&page, name) as u64;
    let mut note = format!(
        "received {} delivered {} sink errors {} buffer dropped {} messages dropped {} \
         buffer left {}",
        m("edgebridge_messages_received_total"),
        m("edgebridge_sink_delivered_total"),
        m("edgebridge_sink_errors_total"),
        m("edgebridge_buffer_dropped_total"),
        m("edgebridge_messages_dropped_total"),
        m("edgebridge_buffer_messages"),
    );
    if let Some(peak) = peak_buffer {
        let _ = write!(note, " buffer peak ≥{peak}");
    }
    Some(note)
}

/// How many warnings and errors the gateway logged, with the first and the last.
fn log_problems(log: &Path) -> Option<String> {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let (first, last) = (problems.first()?, problems.last()?);
    Some(format!(
        "{} warning/error log lines; first: {}; last: {}",
        problems.len(),
        strip_ansi(first),
        strip_ansi(last)
    ))
}

/// Starts `scenario.devices` devices on `port` (ids `{tag}-d<i>`), publishing once
/// `start` turns true.
fn spawn_devices(
    port: u16,
    tag: &str,
    scenario: &Scenario,
    start: &watch::Receiver<bool>,
    stats: &Arc<LoadStats>,
) -> Tasks {
    let mut tasks = Tasks(Vec::new());
    for device in 0..scenario.devices {
        let id = format!("{tag}-d{device}");
        tasks.0.extend(spawn_device(
            port,
            id,
            device,
            scenario,
            start.clone(),
            stats.clone(),
        ));
    }
    tasks
}

/// S3 with the sink's `buffer.drain` set to `drain` (`ordered` or `live_first`).
async fn run_backlog(binary: &Path, drain: &str) -> Result<BacklogResult, String> {
    let mut r = BacklogResult::default();
    // 1. The gateway, pointing at a port where nothing listens yet.
    let upstream_port = free_port()?;
    let sink = format!("backoff_max = \"500ms\"\nbuffer = {{ drain = \"{drain}\" }}");
    let mut gateway = Gateway::start(binary, upstream_port, &sink).await?;

    // 2. The backlog, as fast as durable acks allow.
    let scenario = Scenario {
        name: "S3",
        devices: S3_DEVICES,
        per_device: S3_PER_DEVICE,
        window: S3_WINDOW,
        rate: 0,
        what: S3_WHAT,
    };
    let expected = S3_DEVICES as u64 * S3_PER_DEVICE;
    let stats = Arc::new(LoadStats {
        first_publish_us: AtomicU64::new(u64::MAX),
        ..LoadStats::default()
    });
    let (start_tx, start_rx) = watch::channel(false);
    let tasks = spawn_devices(gateway.port, "bench-s3", &scenario, &start_rx, &stats);
    wait_connected(&stats, S3_DEVICES).await?;
    eprintln!("  building the backlog ({expected} messages, upstream down) …");
    let build_started = Instant::now();
    start_tx.send_replace(true);
    let mut last_progress = (Instant::now(), 0u64);
    r.build_end = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if gateway.process.has_exited() {
            return Err(format!(
                "edgebridge exited while the backlog was built:\n{}",
                tail(&gateway.log, 20)
            ));
        }
        let acked = stats.acked.load(Ordering::Relaxed);
        if acked >= expected {
            break "complete";
        }
        if acked != last_progress.1 {
            last_progress = (Instant::now(), acked);
        } else if last_progress.0.elapsed() > IDLE_LIMIT {
            break "stalled (idle)";
        }
        if build_started.elapsed() > S3_BUILD_DEADLINE {
            break "deadline";
        }
    };
    let pid = gateway.process.pid();
    r.build_rss_mib = rss_mib(pid);
    r.build_hwm_mib = peak_rss_mib(pid);
    r.build_acked = stats.acked.load(Ordering::Relaxed);
    let first = stats.first_publish_us.load(Ordering::Relaxed);
    let span_us = stats
        .last_ack_us
        .load(Ordering::Relaxed)
        .saturating_sub(first)
        .max(1);
    r.build_seconds = span_us as f64 / 1e6;
    r.build_rate = r.build_acked as f64 / r.build_seconds;
    r.build_device_errors = stats.connection_errors.load(Ordering::Relaxed);
    r.build_abandoned = stats.abandoned.load(Ordering::Relaxed);
    if let Some(page) = scrape(gateway.admin_port) {
        r.buffer_bytes = Some(metric_sum(&page, "edgebridge_buffer_bytes"));
        r.buffer_messages = Some(metric_sum(&page, "edgebridge_buffer_messages"));
        let dropped = metric_sum(&page, "edgebridge_buffer_dropped_total")
            + metric_sum(&page, "edgebridge_messages_dropped_total");
        if dropped > 0.0 {
            r.notes.push(format!("dropped during build-up: {dropped}"));
        }
    }
    let (files, bytes) = dir_usage(&gateway.data_dir);
    (r.data_dir_files, r.data_dir_mib) = (files, bytes as f64 / (1024.0 * 1024.0));
    eprintln!(
        "  {} acked in {:.1} s ({:.0} msg/s), RSS {} MiB, buffer {} bytes",
        r.build_acked,
        r.build_seconds,
        r.build_rate,
        opt(r.build_rss_mib, 1),
        opt(r.buffer_bytes, 0)
    );
    drop(tasks);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 3. Restart on the same data_dir.
    let (stop, ready, clean) = gateway.restart(binary).await?;
    (r.stop_seconds, r.ready_seconds, r.stop_clean) =
        (stop.as_secs_f64(), ready.as_secs_f64(), clean);
    let pid = gateway.process.pid();
    r.restart_rss_mib = rss_mib(pid);
    r.restart_buffer_messages =
        scrape(gateway.admin_port).map(|p| metric_sum(&p, "edgebridge_buffer_messages"));
    eprintln!(
        "  restart: exit {:.2} s, ready {:.3} s, RSS {} MiB, backlog {} messages",
        r.stop_seconds,
        r.ready_seconds,
        opt(r.restart_rss_mib, 1),
        opt(r.restart_buffer_messages, 0)
    );

    // Live devices connect now and start publishing when the upstream is there.
    let live_stats = Arc::new(LoadStats::default());
    let live_sent = Arc::new(AtomicU64::new(0));
    let live_capacity =
        S3_LIVE_RATE / S3_LIVE_DEVICES as u64 * (S3_DRAIN_DEADLINE + S3_SETTLE_LIMIT).as_secs();
    let period = Duration::from_secs(1) * S3_LIVE_DEVICES / S3_LIVE_RATE as u32;
    let (live_start_tx, live_start_rx) = watch::channel(false);
    let (live_stop_tx, live_stop_rx) = watch::channel(false);
    let mut live_tasks = Tasks(Vec::new());
    for i in 0..S3_LIVE_DEVICES {
        let device = S3_DEVICES + i;
        let pair = spawn_live_device(
            gateway.port,
            format!("bench-s3-live{i}"),
            device,
            period,
            live_capacity,
            live_start_rx.clone(),
            live_stop_rx.clone(),
            live_sent.clone(),
            live_stats.clone(),
        );
        live_tasks.0.extend(pair);
    }
    wait_connected(&live_stats, S3_LIVE_DEVICES).await?;

    // 4. The upstream and its subscriber, while the gateway is frozen (SIGSTOP), so that
    // the gateway cannot connect before the receiver subscribed.
    let mut expect = Received::new(S3_DEVICES + S3_LIVE_DEVICES, 0);
    for (i, d) in expect.devices.iter_mut().enumerate() {
        let size = if (i as u32) < S3_DEVICES {
            S3_PER_DEVICE
        } else {
            live_capacity
        };
        d.seen = vec![false; size as usize];
    }
    expect.latencies_us.reserve(expected as usize);
    expect.split_from = Some(S3_DEVICES);
    signal(pid, "-STOP");
    let upstream_and_receiver = async {
        let upstream = Mosquitto::start(RECEIVER_WINDOW, "", Some(upstream_port)).await?;
        let receiver = Receiver::start(upstream.port, "bench-s3-rx", expect).await?;
        Ok::<_, String>((upstream, receiver))
    }
    .await;
    signal(pid, "-CONT");
    let (mut upstream, receiver) = upstream_and_receiver?;
    let t0 = Instant::now();
    let t0_us = now_us();
    live_start_tx.send_replace(true);

    // 5. Drain, with live traffic.
    let backlog_unique = |rx: &Receiver| -> (u64, u64) {
        let state = lock(&rx.received);
        let backlog = &state.devices[..S3_DEVICES as usize];
        let unique = backlog.iter().map(|d| d.unique).sum();
        let last = backlog.iter().map(|d| d.last_arrival_us).max().unwrap_or(0);
        (unique, last)
    };
    let mut first_arrival = None;
    let mut last_progress = (Instant::now(), 0u64);
    let mut last_sample = Instant::now() - Duration::from_secs(10);
    r.drain_end = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if gateway.process.has_exited() || upstream.process.has_exited() {
            break "process exited";
        }
        let (unique, _) = backlog_unique(&receiver);
        if unique > 0 && first_arrival.is_none() {
            first_arrival = Some(t0.elapsed());
        }
        if last_sample.elapsed() >= Duration::from_secs(5) {
            last_sample = Instant::now();
            if let Some(page) = scrape(gateway.admin_port) {
                let depth = metric_sum(&page, "edgebridge_buffer_messages") as u64;
                r.depth_timeline.push((t0.elapsed().as_secs_f64(), depth));
            }
        }
        if unique >= r.build_acked {
            break "complete";
        }
        if unique != last_progress.1 {
            last_progress = (Instant::now(), unique);
        } else if last_progress.0.elapsed() > IDLE_LIMIT {
            break "stalled (idle)";
        }
        if t0.elapsed() > S3_DRAIN_DEADLINE {
            break "deadline";
        }
    };
    let (backlog_received, last_backlog_us) = backlog_unique(&receiver);
    let drain_end_us = if backlog_received > 0 {
        last_backlog_us
    } else {
        now_us()
    };
    r.drain_hwm_mib = peak_rss_mib(pid);
    r.backlog_received = backlog_received;
    r.first_backlog_ms = first_arrival.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    r.drain_seconds = drain_end_us.saturating_sub(t0_us) as f64 / 1e6;
    r.drain_rate = backlog_received as f64 / r.drain_seconds.max(1e-6);
    eprintln!(
        "  drain {}: {} backlog messages in {:.1} s ({:.0} msg/s)",
        r.drain_end, r.backlog_received, r.drain_seconds, r.drain_rate
    );

    // Stop the live devices; wait until what they sent is acked and has arrived.
    live_stop_tx.send_replace(true);
    let live_stop_us = now_us();
    let settle = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = live_sent.load(Ordering::Relaxed);
        let acked = live_stats.acked.load(Ordering::Relaxed);
        let received = lock(&receiver.received).split_latencies_us.len() as u64;
        if (acked >= sent && received >= sent) || settle.elapsed() > S3_SETTLE_LIMIT {
            break;
        }
    }
    r.live_sent = live_sent.load(Ordering::Relaxed);
    r.live_acked = live_stats.acked.load(Ordering::Relaxed);
    r.live_device_errors = live_stats.connection_errors.load(Ordering::Relaxed);
    r.drain_hwm_mib = peak_rss_mib(pid).or(r.drain_hwm_mib);
    drop(live_tasks);
    let received = std::mem::take(&mut *lock(&receiver.received));
    // Let the gateway see the upstream's last acknowledgements before reading its counters.
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.live_received = received.split_latencies_us.len() as u64;
    r.live_rate = r.live_sent as f64 / (live_stop_us.saturating_sub(t0_us) as f64 / 1e6);
    let mut during: Vec<u64> = received
        .split_latencies_us
        .iter()
        .filter(|(sent, _)| *sent <= drain_end_us)
        .map(|&(_, l)| l)
        .collect();
    during.sort_unstable();
    r.live_during_drain = during.len();
    r.live_p50_ms = percentile_ms(&during, 50.0);
    r.live_p99_ms = percentile_ms(&during, 99.0);
    r.live_max_ms = during.last().map_or(f64::NAN, |&l| l as f64 / 1000.0);
    r.duplicates = received.duplicates;
    r.reordered = received.reordered;
    r.stray = received.unparsed;
    r.receiver_errors = received.connection_errors;

    if let Some(counters) = gateway_counters(gateway.admin_port, None) {
        r.notes.push(format!("gateway after the drain: {counters}"));
    }
    r.notes.extend(log_problems(&gateway.log));
    Ok(r)
}

/// `line` without ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits (bounded) until `count` devices got their first CONNACK.
async fn wait_connected(stats: &LoadStats, count: u32) -> Result<(), String> {
    let deadline = Instant::now() + START_LIMIT;
    while stats.connected.load(Ordering::Relaxed) < count as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {count} devices connected",
                stats.connected.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn backlog_table(r: &BacklogResult) -> String {
    let expected = S3_DEVICES as u64 * S3_PER_DEVICE;
    let mut t = String::from("| phase | measure | value | target |\n|---|---|---:|---|\n");
    let mut row = |phase: &str, measure: &str, value: String, target: &str| {
        let _ = writeln!(t, "| {phase} | {measure} | {value} | {target} |");
    };
    row(
        "build-up",
        "acked / expected",
        format!("{}/{expected} ({})", r.build_acked, r.build_end),
        "",
    );
    row("build-up", "time s", format!("{:.1}", r.build_seconds), "");
    row(
        "build-up",
        "durable acks/s",
        format!("{:.0}", r.build_rate),
        "",
    );
    row(
        "build-up",
        "RSS MiB (peak)",
        format!("{} ({})", opt(r.build_rss_mib, 1), opt(r.build_hwm_mib, 1)),
        "< 64",
    );
    row(
        "build-up",
        "edgebridge_buffer_bytes",
        format!(
            "{} ({:.1} MiB; {} messages)",
            opt(r.buffer_bytes, 0),
            r.buffer_bytes.unwrap_or(0.0) / (1024.0 * 1024.0),
            opt(r.buffer_messages, 0)
        ),
        "",
    );
    row(
        "build-up",
        "data_dir",
        format!("{} files, {:.1} MiB", r.data_dir_files, r.data_dir_mib),
        "",
    );
    row(
        "build-up",
        "device conn. errors / abandoned",
        format!("{} / {}", r.build_device_errors, r.build_abandoned),
        "0 / 0",
    );
    row(
        "restart",
        "SIGTERM → exit s",
        format!(
            "{:.2}{}",
            r.stop_seconds,
            if r.stop_clean { "" } else { " (killed)" }
        ),
        "",
    );
    row(
        "restart",
        "start → /readyz 200 s",
        format!("{:.3}", r.ready_seconds),
        "< 2",
    );
    row(
        "restart",
        "RSS after start MiB",
        opt(r.restart_rss_mib, 1),
        "< 64",
    );
    row(
        "restart",
        "backlog after start (messages)",
        opt(r.restart_buffer_messages, 0),
        "= acked",
    );
    row(
        "drain",
        "backlog received / acked",
        format!("{}/{} ({})", r.backlog_received, r.build_acked, r.drain_end),
        "",
    );
    row(
        "drain",
        "first backlog message after upstream up ms",
        format!("{:.0}", r.first_backlog_ms),
        "",
    );
    row(
        "drain",
        "drain time s",
        format!("{:.1}", r.drain_seconds),
        "",
    );
    row(
        "drain",
        "drain msg/s",
        format!("{:.0}", r.drain_rate),
        "≥ 40,000",
    );
    row(
        "drain",
        "live sent / acked / received",
        format!("{} / {} / {}", r.live_sent, r.live_acked, r.live_received),
        "",
    );
    row(
        "drain",
        "live msg/s offered",
        format!("{:.0}", r.live_rate),
        "2,000",
    );
    row(
        "drain",
        "live latency p50 / p99 / max ms (sent before the drain ended)",
        format!(
            "{:.1} / {:.1} / {:.1} (n = {})",
            r.live_p50_ms, r.live_p99_ms, r.live_max_ms, r.live_during_drain
        ),
        "",
    );
    let loss = r.build_acked.saturating_sub(r.backlog_received)
        + r.live_acked.saturating_sub(r.live_received);
    row("drain", "loss (acked, not received)", loss.to_string(), "0");
    row("drain", "duplicates", r.duplicates.to_string(), "");
    row(
        "drain",
        "reordered (per device)",
        r.reordered.to_string(),
        "0",
    );
    row(
        "drain",
        "stray / receiver conn. errors / live device conn. errors",
        format!(
            "{} / {} / {}",
            r.stray, r.receiver_errors, r.live_device_errors
        ),
        "",
    );
    row(
        "drain",
        "peak RSS MiB (VmHWM since restart)",
        opt(r.drain_hwm_mib, 1),
        "< 64",
    );
    t
}

/// The issue's targets for `live_first`, side by side with `ordered` from the same run.
fn drain_comparison(runs: &[(&str, BacklogResult, String)]) -> String {
    let mut t = String::from(
        "| drain | drain msg/s | live p50 / p99 / max ms during the drain | live n | lost | duplicates |\n\
         |---|---:|---|---:|---:|---:|\n",
    );
    for (drain, r, _) in runs {
        let loss = r.build_acked.saturating_sub(r.backlog_received)
            + r.live_acked.saturating_sub(r.live_received);
        let _ = writeln!(
            t,
            "| {drain} | {:.0} | {:.1} / {:.1} / {:.1} | {} | {loss} | {} |",
            r.drain_rate,
            r.live_p50_ms,
            r.live_p99_ms,
            r.live_max_ms,
            r.live_during_drain,
            r.duplicates
        );
    }
    let rate = |name: &str| {
        runs.iter()
            .find(|(d, _, _)| *d == name)
            .map(|(_, r, _)| r.drain_rate)
    };
    if let (Some(ordered), Some(live_first)) = (rate("ordered"), rate("live_first")) {
        let _ = writeln!(
            t,
            "\nlive_first drain rate / ordered drain rate: {:.2} (target ≥ 0.80); live_first live p99 target < 50 ms",
            live_first / ordered.max(1e-9)
        );
    }
    t
}

fn backlog_markdown(runs: &[(&str, BacklogResult, String)], comparison: &str) -> String {
    let mut md = String::from("## Backlog drain (S3)\n\n");
    let _ = writeln!(md, "Produced by `cargo bench --bench forward -- S3`.\n");
    md += &run_stamp();
    let _ = writeln!(md, "- scenario: {S3_WHAT}\n");
    md += comparison;
    for (drain, r, table) in runs {
        let _ = writeln!(md, "\n### drain = \"{drain}\"\n");
        md += table;
        let timeline: Vec<String> = r
            .depth_timeline
            .iter()
            .map(|(s, d)| format!("{s:.0} s: {d}"))
            .collect();
        let _ = writeln!(
            md,
            "\nBacklog depth during the drain (`edgebridge_buffer_messages`): {}\n",
            timeline.join(", ")
        );
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    let _ = writeln!(
        md,
        "edgebridge: `ack = \"durable\"`, default buffer (disk, sync = batch, 1 GiB), one \
         mqtt sink (inflight {FORWARD_WINDOW}, backoff_max 500ms). Build-up time: first \
         publish to the last PUBACK at the devices. The gateway is frozen (SIGSTOP) while \
         the upstream Mosquitto (same settings as S1) starts on the reserved port and the \
         receiver subscribes, then resumed (SIGCONT): drain time runs from that moment to \
         the arrival of the last backlog message. Live messages carry their scheduled send \
         time. Mosquitto's bridge is not measured here. `live_first`: the same run with \
         `buffer.drain = \"live_first\"` (live messages ahead of the backlog)."
    );
    md
}

/// Replaces (or appends) the section that starts with `heading` in RESULTS.md, keeping
/// everything before and after it: each named run (S3, S3o) owns one section.
fn write_section(heading: &str, section: &str) -> Result<(), String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let text = replace_section(&old, heading, section);
    std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    eprintln!("wrote the `{heading}` section of {}", path.display());
    Ok(())
}

/// `old` with the section under `heading` (up to the next `## ` heading) replaced by
/// `section`, or with `section` appended when there is none.
fn replace_section(old: &str, heading: &str, section: &str) -> String {
    let section = section.trim_end();
    let Some(start) = old.find(heading) else {
        return format!("{}\n\n{section}\n", old.trim_end());
    };
    let after = &old[start + heading.len()..];
    // The sections that follow, starting with the newline before their heading.
    let rest = after.find("\n## ").map_or("", |i| &after[i..]);
    format!("{}\n\n{section}\n{rest}", old[..start].trim_end())
}

/// Where the sections written by named runs (S3, S3o) begin: a full run keeps them.
fn named_sections(old: &str) -> Option<&str> {
    [S3_HEADING, S3O_HEADING]
        .iter()
        .filter_map(|h| old.find(h))
        .min()
        .map(|i| &old[i..])
}

const S3_HEADING: &str = "## Backlog drain (S3)";

// ---------------------------------------------------------------------------------------
// S3o: a 60 s uplink outage under a fixed load, then drain; edgebridge beside the bridge
// ---------------------------------------------------------------------------------------

const S3O_DEVICES: u32 = 10;
/// Total messages/s over all devices.
const S3O_RATE: u64 = 5_000;
const S3O_WINDOW: u16 = 100;
/// Normal forwarding before the cut: the reference latency.
const S3O_NORMAL: Duration = Duration::from_secs(10);
const S3O_OUTAGE: Duration = Duration::from_secs(60);
/// Publishing goes on this long after the restore, so the backlog drains beside live
/// traffic and the live latency after the drain shows whether the target recovered.
const S3O_AFTER: Duration = Duration::from_secs(30);
/// After the load ended: how long the backlog may take to arrive.
const S3O_DRAIN_DEADLINE: Duration = Duration::from_secs(180);
/// Arrivals this long after the cut still count as in flight at the cut, not as leaks.
const S3O_CUT_GRACE: Duration = Duration::from_secs(1);
const S3O_WHAT: &str = "10 devices publish 5,000 msg/s in total (fixed schedule, window \
                        100) for 100 s; the uplink between the target and the upstream is \
                        cut from 10 s to 70 s, then restored; the run ends when every \
                        message arrived";
const S3O_HEADING: &str = "## Uplink outage (S3o)";

fn s3o_scenario() -> Scenario {
    let seconds = (S3O_NORMAL + S3O_OUTAGE + S3O_AFTER).as_secs();
    Scenario {
        name: "S3o",
        devices: S3O_DEVICES,
        per_device: S3O_RATE / S3O_DEVICES as u64 * seconds,
        window: S3O_WINDOW,
        rate: S3O_RATE,
        what: S3O_WHAT,
    }
}

/// A TCP relay on the target's uplink (target → upstream) that can be cut and restored.
///
/// This is fault injection a real peer cannot do: the upstream must stay up for the
/// receiver, which connects to it directly and never sees the outage, while the target
/// loses its uplink. While cut, every relayed connection is closed and new ones are
/// closed as soon as they are accepted, so the target sees its connection end (EOF) and
/// every reconnect fail, as behind a broken link that still answers TCP.
struct Uplink {
    port: u16,
    /// `true` while connections are relayed; every relay watches it and closes its two
    /// sockets when it turns `false` or when the `Uplink` is dropped.
    up: watch::Sender<bool>,
    counts: Arc<UplinkCounts>,
    _accept: Tasks,
}

/// Connections the uplink saw: how often the target (re)connected.
#[derive(Default)]
struct UplinkCounts {
    relayed: AtomicU64,
    closed_while_cut: AtomicU64,
}

impl Uplink {
    async fn start(upstream_port: u16) -> Result<Uplink, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("uplink proxy: bind 127.0.0.1:0: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("uplink proxy: local address: {e}"))?
            .port();
        let (up, _) = watch::channel(true);
        let counts = Arc::new(UplinkCounts::default());
        let accept = tokio::spawn(accept_uplink(
            listener,
            upstream_port,
            up.subscribe(),
            counts.clone(),
        ));
        Ok(Uplink {
            port,
            up,
            counts,
            _accept: Tasks(vec![accept]),
        })
    }

    fn cut(&self) {
        self.up.send_replace(false);
    }

    fn restore(&self) {
        self.up.send_replace(true);
    }
}

async fn accept_uplink(
    listener: tokio::net::TcpListener,
    upstream_port: u16,
    up: watch::Receiver<bool>,
    counts: Arc<UplinkCounts>,
) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or similar: the outage must not end because of it.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !*up.borrow() {
            counts.closed_while_cut.fetch_add(1, Ordering::Relaxed);
            drop(inbound);
            continue;
        }
        counts.relayed.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(relay(inbound, upstream_port, up.clone()));
    }
}

/// Copies both ways between one target connection and the upstream until either side
/// closes or the uplink is cut.
async fn relay(
    mut inbound: tokio::net::TcpStream,
    upstream_port: u16,
    mut up: watch::Receiver<bool>,
) {
    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
    else {
        return; // dropping `inbound` closes it: the target retries
    };
    // Both MQTT peers disable Nagle on their own sockets; the relay must not add it back.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        // Returning drops (closes) both sockets.
        _ = up.wait_for(|up| !*up) => {}
    }
}

/// The latency of one group of messages.
struct Latency {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(mut latencies_us: Vec<u64>) -> Latency {
        latencies_us.sort_unstable();
        Latency {
            n: latencies_us.len(),
            p50_ms: percentile_ms(&latencies_us, 50.0),
            p99_ms: percentile_ms(&latencies_us, 99.0),
            max_ms: latencies_us.last().map_or(f64::NAN, |&l| l as f64 / 1000.0),
        }
    }
}

/// When the cut and the restore happened, on the `now_us` clock.
#[derive(Clone, Copy)]
struct OutageTimes {
    cut_us: u64,
    restore_us: u64,
    /// The cut on the wall clock, in Unix seconds: Mosquitto's log timestamps.
    cut_unix_s: u64,
}

/// Live messages slower than this count as still queued behind the backlog.
const S3O_SLOW: Duration = Duration::from_secs(1);

/// What the receiver's `(sent, latency)` samples say about the outage and the drain.
struct Drain {
    /// Latest arrival of a message sent before the restore, minus the restore.
    seconds: Option<f64>,
    /// Messages sent before the restore that arrived after it: the backlog that drained.
    backlog: u64,
    /// First arrival after the restore, minus the restore: the reconnect.
    first_after_restore_ms: Option<f64>,
    /// Arrivals while the uplink was cut (after `S3O_CUT_GRACE`): should be 0.
    arrived_during_cut: u64,
    /// Arrival of the last message sent after the restore that took `S3O_SLOW` or more,
    /// minus the restore: when live traffic was back to normal.
    slow_until_s: Option<f64>,
    /// Sent before the cut.
    normal: Latency,
    /// Sent during the cut: the backlog's own latency.
    backlog_latency: Latency,
    /// Sent at or after the restore and before the drain ended.
    live: Latency,
    /// Sent after the drain ended.
    after: Latency,
}

fn analyse_drain(samples: &[(u64, u64)], times: OutageTimes) -> Drain {
    let OutageTimes {
        cut_us, restore_us, ..
    } = times;
    let arrival = |&(sent, latency): &(u64, u64)| sent + latency;
    let drain_end_us = samples
        .iter()
        .filter(|(sent, _)| *sent < restore_us)
        .map(arrival)
        .max();
    // Without arrivals from before the restore, nothing bounds "during the drain".
    let end_us = drain_end_us.unwrap_or(restore_us).max(restore_us);
    let latencies = |keep: &dyn Fn(u64) -> bool| {
        Latency::of(
            samples
                .iter()
                .filter(|(sent, _)| keep(*sent))
                .map(|&(_, l)| l)
                .collect(),
        )
    };
    let grace_us = cut_us + S3O_CUT_GRACE.as_micros() as u64;
    Drain {
        seconds: drain_end_us.map(|e| e.saturating_sub(restore_us) as f64 / 1e6),
        backlog: samples
            .iter()
            .filter(|s| s.0 < restore_us && arrival(s) >= restore_us)
            .count() as u64,
        first_after_restore_ms: samples
            .iter()
            .map(arrival)
            .filter(|&a| a >= restore_us)
            .min()
            .map(|a| (a - restore_us) as f64 / 1000.0),
        arrived_during_cut: samples
            .iter()
            .map(arrival)
            .filter(|&a| a > grace_us && a < restore_us)
            .count() as u64,
        slow_until_s: samples
            .iter()
            .filter(|&&(sent, l)| sent >= restore_us && l >= S3O_SLOW.as_micros() as u64)
            .map(arrival)
            .max()
            .map(|a| a.saturating_sub(restore_us) as f64 / 1e6),
        normal: latencies(&|sent| sent < cut_us),
        backlog_latency: latencies(&|sent| sent >= cut_us && sent < restore_us),
        live: latencies(&|sent| sent >= restore_us && sent < end_us),
        after: latencies(&|sent| sent >= end_us),
    }
}

/// One target's S3o run.
struct OutageResult {
    target: Target,
    end: End,
    expected: u64,
    unique: u64,
    duplicates: u64,
    reordered: u64,
    drain: Drain,
    /// utime + stime of the target (gateway or edge Mosquitto) over the whole run.
    cpu_seconds: Option<f64>,
    cpu_us_per_msg: Option<f64>,
    peak_rss_mib: Option<f64>,
    load_before: String,
    load_after: String,
    notes: Vec<String>,
}

impl UnderTest {
    /// The target's process and device port; `None` for `Direct`, which has no process
    /// of its own.
    fn process(&mut self) -> Option<(&mut ChildGuard, u16)> {
        match self {
            UnderTest::Direct => None,
            UnderTest::Gateway(g) => Some((&mut g.process, g.port)),
            UnderTest::Bridge(b) => Some((&mut b.process, b.port)),
        }
    }

    fn log(&self) -> Option<&Path> {
        match self {
            UnderTest::Direct => None,
            UnderTest::Gateway(g) => Some(&g.log),
            UnderTest::Bridge(b) => Some(&b.log),
        }
    }
}

/// The machine's 1/5/15-minute load average.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".into())
}

/// Runs S3o against one target: upstream, uplink proxy, target, receiver, devices; the
/// timeline; then what the receiver saw. Any failure of the setup or of a process is an
/// error; the guards stop every child process on the way out.
async fn run_outage(target: Target, binary: &Path, tag: &str) -> Result<OutageResult, String> {
    let load_before = load_average();
    let scenario = s3o_scenario();
    let expected = scenario.devices as u64 * scenario.per_device;
    let mut upstream = Mosquitto::upstream().await?;
    let uplink = Uplink::start(upstream.port).await?;
    let mut expect = Received::new(scenario.devices, scenario.per_device);
    // Every device keeps (sent, latency), so latencies can be split by send time.
    expect.split_from = Some(0);
    expect.latencies_us = Vec::new();
    expect.split_latencies_us.reserve(expected as usize);
    let receiver = Receiver::start(upstream.port, &format!("{tag}-rx"), expect).await?;
    let mut under_test = match target {
        Target::Gateway => {
            UnderTest::Gateway(Gateway::start(binary, uplink.port, "backoff_max = \"1s\"").await?)
        }
        Target::Bridge => UnderTest::Bridge(Mosquitto::bridge(uplink.port).await?),
        Target::Direct | Target::GatewayAckReceived | Target::GatewayV311 => {
            return Err("S3o runs against edgebridge and bridge only".into())
        }
    };
    let Some((process, port)) = under_test.process() else {
        return Err("S3o: the target has no process".into());
    };
    let pid = process.pid();
    warm_up(port, &format!("{tag}-warmup"), &receiver).await?;

    let stats = Arc::new(LoadStats {
        first_publish_us: AtomicU64::new(u64::MAX),
        ..LoadStats::default()
    });
    let (start_tx, start_rx) = watch::channel(false);
    let tasks = spawn_devices(port, tag, &scenario, &start_rx, &stats);
    wait_connected(&stats, scenario.devices).await?;

    let cpu_before = cpu_seconds(Some(pid));
    let upstream_cpu_before = cpu_seconds(Some(upstream.process.pid()));
    start_tx.send_replace(true);
    let (end, times, peak_buffer) = drive_outage(
        &mut under_test,
        &mut upstream,
        &uplink,
        &receiver,
        &stats,
        expected,
    )
    .await?;

    let received = std::mem::take(&mut *lock(&receiver.received));
    let cpu_after = cpu_seconds(Some(pid));
    let upstream_cpu_after = cpu_seconds(Some(upstream.process.pid()));
    let peak_rss = peak_rss_mib(pid);
    drop(tasks);
    // Let the target see the upstream's last acknowledgements before reading its counters.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if received.unique == 0 {
        return Err("nothing reached the receiver".into());
    }

    let drain = analyse_drain(&received.split_latencies_us, times);
    let unique = received.unique;
    let mut notes = vec![
        format!(
            "devices: acked {} of {expected}, connection errors {}, abandoned {}; receiver: \
             connection errors {}, stray {}",
            stats.acked.load(Ordering::Relaxed),
            stats.connection_errors.load(Ordering::Relaxed),
            stats.abandoned.load(Ordering::Relaxed),
            received.connection_errors,
            received.unparsed,
        ),
        format!(
            "backlog at the restore {} messages, drained at {} msg/s beside the live load; \
             first arrival {} ms after the restore; live latency under {} s again {} s after \
             the restore; arrivals during the cut {}",
            drain.backlog,
            drain
                .seconds
                .filter(|s| *s > 0.0)
                .map_or("n/a".into(), |s| format!("{:.0}", drain.backlog as f64 / s)),
            opt(drain.first_after_restore_ms, 0),
            S3O_SLOW.as_secs(),
            opt(drain.slow_until_s, 1),
            drain.arrived_during_cut,
        ),
        format!(
            "latency of the messages sent during the cut p50 / max {} / {} ms (n = {}); \
             normal p50 {} ms (n = {}); upstream Mosquitto CPU {} µs/msg",
            ms(drain.backlog_latency.p50_ms, 0),
            ms(drain.backlog_latency.max_ms, 0),
            drain.backlog_latency.n,
            ms(drain.normal.p50_ms, 2),
            drain.normal.n,
            opt(
                cpu_per_msg(upstream_cpu_before, upstream_cpu_after, unique),
                1
            ),
        ),
        format!(
            "uplink connections: relayed {}, closed while cut {}",
            uplink.counts.relayed.load(Ordering::Relaxed),
            uplink.counts.closed_while_cut.load(Ordering::Relaxed),
        ),
    ];
    notes.extend(target_notes(&under_test, peak_buffer, times));
    Ok(OutageResult {
        target,
        end,
        expected,
        unique,
        duplicates: received.duplicates,
        reordered: received.reordered,
        drain,
        cpu_seconds: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        cpu_us_per_msg: cpu_per_msg(cpu_before, cpu_after, unique),
        peak_rss_mib: peak_rss,
        load_before,
        load_after: load_average(),
        notes,
    })
}

/// The timeline: normal load, cut, restore, load until its end, then wait for the
/// backlog. Returns why the wait ended, when the cut and restore happened, and the peak
/// of the gateway's buffer depth. A process that dies ends the run with an error.
async fn drive_outage(
    under_test: &mut UnderTest,
    upstream: &mut Mosquitto,
    uplink: &Uplink,
    receiver: &Receiver,
    stats: &LoadStats,
    expected: u64,
) -> Result<(End, OutageTimes, Option<u64>), String> {
    let started = Instant::now();
    let load_end = S3O_NORMAL + S3O_OUTAGE + S3O_AFTER;
    let (mut cut_us, mut restore_us) = (None, None);
    let mut peak_buffer = None;
    let mut last_scrape = Instant::now();
    let mut last_report = Instant::now();
    let mut last_progress = (Instant::now(), 0u64, 0u64);
    let end = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        check_alive(under_test, upstream)?;
        if let UnderTest::Gateway(g) = &*under_test {
            // The backlog as the gateway counts it, twice a second.
            if last_scrape.elapsed() >= Duration::from_millis(500) {
                last_scrape = Instant::now();
                if let Some(page) = scrape(g.admin_port) {
                    let depth = metric_sum(&page, "edgebridge_buffer_messages") as u64;
                    peak_buffer = Some(peak_buffer.unwrap_or(0).max(depth));
                }
            }
        }
        let elapsed = started.elapsed();
        let (unique, acked) = (receiver.unique(), stats.acked.load(Ordering::Relaxed));
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  {:>3.0} s: acked {acked}, received {unique}{}",
                elapsed.as_secs_f64(),
                peak_buffer.map_or(String::new(), |p| format!(", buffer peak {p}"))
            );
        }
        if cut_us.is_none() && elapsed >= S3O_NORMAL {
            if unique == 0 {
                return Err(format!(
                    "nothing reached the receiver in the first {} s",
                    S3O_NORMAL.as_secs()
                ));
            }
            uplink.cut();
            cut_us = Some((now_us(), unix_seconds()));
            eprintln!("  uplink cut");
        }
        if cut_us.is_some() && restore_us.is_none() && elapsed >= S3O_NORMAL + S3O_OUTAGE {
            uplink.restore();
            restore_us = Some(now_us());
            eprintln!("  uplink restored");
        }
        if (unique, acked) != (last_progress.1, last_progress.2) {
            last_progress = (Instant::now(), unique, acked);
        }
        // Before the load ended the schedule decides; after it, arrivals do.
        if elapsed < load_end {
            continue;
        }
        if unique >= expected {
            break End::Complete;
        }
        if last_progress.0.elapsed() > IDLE_LIMIT {
            break End::Idle;
        }
        if elapsed > load_end + S3O_DRAIN_DEADLINE {
            break End::Deadline;
        }
    };
    // The loop passes the restore before it can end, so both are set.
    let (Some((cut_us, cut_unix_s)), Some(restore_us)) = (cut_us, restore_us) else {
        return Err("the run ended before the uplink was cut and restored".into());
    };
    let times = OutageTimes {
        cut_us,
        restore_us,
        cut_unix_s,
    };
    Ok((end, times, peak_buffer))
}

/// An error with the log tail when the target or the upstream exited.
fn check_alive(under_test: &mut UnderTest, upstream: &mut Mosquitto) -> Result<(), String> {
    let target_exited = under_test.process().is_some_and(|(p, _)| p.has_exited());
    if target_exited {
        let log = under_test.log().map_or(String::new(), |l| tail(l, 10));
        return Err(format!("the target exited during the run:\n{log}"));
    }
    if upstream.process.has_exited() {
        return Err(format!(
            "the upstream Mosquitto exited during the run:\n{}",
            tail(&upstream.log, 10)
        ));
    }
    Ok(())
}

/// What the target says about itself: the gateway's counters and warnings, or how often
/// the bridge connected.
fn target_notes(
    under_test: &UnderTest,
    peak_buffer: Option<u64>,
    times: OutageTimes,
) -> Vec<String> {
    let mut notes = Vec::new();
    match under_test {
        UnderTest::Gateway(g) => {
            if let Some(counters) = gateway_counters(g.admin_port, peak_buffer) {
                notes.push(format!("gateway: {counters}"));
            }
            notes.extend(log_problems(&g.log).map(|p| format!("gateway log: {p}")));
        }
        UnderTest::Bridge(b) => {
            let log = std::fs::read_to_string(&b.log).unwrap_or_default();
            let attempts = bridge_connects(&log, times.cut_unix_s);
            let after_cut: Vec<String> = attempts
                .iter()
                .filter_map(|a| a.map(|s| s.to_string()))
                .collect();
            // A bridge retrying every second would make a 60-item list; its ends suffice.
            let shown = if after_cut.len() > 8 {
                let (head, tail) = (&after_cut[..5], &after_cut[after_cut.len() - 2..]);
                format!("{}, …, {}", head.join(", "), tail.join(", "))
            } else {
                after_cut.join(", ")
            };
            notes.push(format!(
                "bridge: \"Connecting bridge\" {} times in its log, {} of them from the cut on, \
                 at (s after the cut, 1 s resolution): {shown}",
                attempts.len(),
                after_cut.len(),
            ));
        }
        UnderTest::Direct => {}
    }
    notes
}

/// Every "Connecting bridge" in a Mosquitto log, as seconds after `cut_unix_s` (`None`
/// for attempts before the cut, or a line without a timestamp).
fn bridge_connects(log: &str, cut_unix_s: u64) -> Vec<Option<i64>> {
    log.lines()
        .filter(|l| l.contains("Connecting bridge (step 1)"))
        .map(|l| {
            let at: u64 = l.split_once(':')?.0.trim().parse().ok()?;
            (at >= cut_unix_s).then(|| at as i64 - cut_unix_s as i64)
        })
        .collect()
}

/// The wall clock in whole seconds since the Unix epoch (0 if the clock is before it).
fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn outage_table(results: &[OutageResult]) -> String {
    let mut t = String::from(
        "| target | end | received/expected | lost | dups | reordered | drain s \
         | live latency during the drain p50 / p99 / max ms | after the drain p50 / p99 ms \
         | normal p99 ms | CPU s | CPU µs/msg | peak RSS MiB | load before → after |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in results {
        let d = &r.drain;
        let _ = writeln!(
            t,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} / {} / {} (n = {}) \
             | {} / {} (n = {}) | {} | {} | {} | {} | {} → {} |",
            r.target.name(),
            end_word(r.end),
            r.unique,
            r.expected,
            r.expected.saturating_sub(r.unique),
            r.duplicates,
            r.reordered,
            opt(d.seconds, 1),
            ms(d.live.p50_ms, 0),
            ms(d.live.p99_ms, 0),
            ms(d.live.max_ms, 0),
            d.live.n,
            ms(d.after.p50_ms, 2),
            ms(d.after.p99_ms, 2),
            d.after.n,
            ms(d.normal.p99_ms, 2),
            opt(r.cpu_seconds, 1),
            opt(r.cpu_us_per_msg, 1),
            opt(r.peak_rss_mib, 1),
            r.load_before,
            r.load_after,
        );
    }
    t
}

fn end_word(end: End) -> &'static str {
    match end {
        End::Complete => "complete",
        End::Idle => "stalled (idle)",
        End::Deadline => "deadline",
        End::Exited => "process exited",
    }
}

fn outage_markdown(results: &[OutageResult], table: &str, failures: &[String]) -> String {
    let mut md = format!("{S3O_HEADING}\n\n");
    let _ = writeln!(md, "Produced by `cargo bench --bench forward -- S3o`.\n");
    md += &run_stamp();
    let _ = writeln!(md, "- scenario: {S3O_WHAT}\n");
    md += table;
    let _ = writeln!(
        md,
        "\nBoth targets run one after the other against a fresh upstream Mosquitto (as in \
         S1) with the same load. The outage is a TCP proxy in the bench between the target \
         and the upstream: at the cut it closes every connection and then closes each new \
         one at once; the receiver subscribes on the upstream directly. edgebridge: `ack = \
         \"durable\"`, disk buffer, one mqtt sink (inflight {FORWARD_WINDOW}, backoff_max \
         1s). Mosquitto bridge: as in S1 (cleansession false, restart_timeout 1 1, \
         max_inflight_messages {FORWARD_WINDOW}, max_queued_messages 0 = unlimited). \
         lost: expected − unique arrivals. drain s: latest arrival of a message sent \
         before the restore − the restore. Live latency during the drain: messages sent \
         from the restore to the end of the drain, from their scheduled send time; they \
         queue behind the backlog, in order. After the drain: messages sent after it \
         ended, which still wait for the live messages queued during the drain, hence \
         the p99. normal: messages sent before the cut. CPU: utime + stime of the \
         target (gateway or edge Mosquitto) from the first publish to the end of the run, \
         per message received. \
         Peak RSS: VmHWM. Load: /proc/loadavg (1/5/15 min) before and after each target's \
         run; the machine was shared with other builds, so numbers are noisy.\n"
    );
    for r in results {
        let _ = writeln!(md, "{}:\n", r.target.name());
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        md += "\n";
    }
    for f in failures {
        let _ = writeln!(md, "FAILED {f}\n");
    }
    md
}

/// Runs S3o for each of `targets`, prints the table and writes its RESULTS.md section.
async fn run_outages(
    targets: &[Target],
    binary: &Path,
    failures: &mut Vec<String>,
) -> Result<(), String> {
    let mut results = Vec::new();
    let mut own_failures = Vec::new();
    for (i, &target) in targets.iter().enumerate() {
        eprintln!("S3o: {S3O_WHAT} → {} …", target.name());
        match run_outage(target, binary, &format!("bench-s3o-{i}")).await {
            Ok(r) => {
                eprintln!(
                    "  {}/{} received, drain {} s, live p99 {} ms",
                    r.unique,
                    r.expected,
                    opt(r.drain.seconds, 1),
                    ms(r.drain.live.p99_ms, 0)
                );
                results.push(r);
            }
            Err(e) => {
                eprintln!("  FAILED: {e}");
                own_failures.push(format!("S3o / {}: {e}", target.name()));
            }
        }
    }
    let table = outage_table(&results);
    println!("\nUplink outage (S3o):\n\n{table}");
    for r in &results {
        for n in &r.notes {
            println!("- {}: {n}", r.target.name());
        }
    }
    let written = if results.is_empty() {
        Ok(()) // keep the last good section
    } else {
        write_section(
            S3O_HEADING,
            &outage_markdown(&results, &table, &own_failures),
        )
    };
    failures.extend(own_failures);
    written
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.decimals$}"))
}

/// A latency in ms; "n/a" for the NaN of an empty group.
fn ms(v: f64, decimals: usize) -> String {
    opt(Some(v).filter(|v| !v.is_nan()), decimals)
}

fn results_table(results: &[RunResult]) -> String {
    let summary = rounds_summary(results);
    let mut t = if summary.is_empty() {
        String::new()
    } else {
        format!(
            "Fixed-rate scenarios, {FIXED_RATE_ROUNDS} interleaved rounds per target, the \
             median round:\n\n{summary}\nEvery run:\n\n"
        )
    };
    t += &String::from(
        "| scenario | target | msg/s | loss | dups | reordered | p50 ms | p99 ms | p99.9 ms \
         | peak RSS MiB | CPU µs/msg | machine busy |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            r.scenario,
            r.target.name(),
            r.msg_per_s,
            r.expected - r.unique,
            r.duplicates,
            r.reordered,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            opt(r.peak_rss_mib, 1),
            opt(r.cpu_us_per_msg, 1),
            r.machine_busy.map_or("–".into(), |b| format!("{b:.0}%")),
        );
    }
    t
}

/// Per fixed-rate scenario and target: the round with the median p99 (rounds by p99,
/// the middle one), with the spread of p99 over the rounds.
fn rounds_summary(results: &[RunResult]) -> String {
    let mut t = String::from(
        "| scenario | target | rounds | p50 ms | p99 ms (median round) | p99 ms over the rounds \
         | p99.9 ms | CPU µs/msg | machine busy | loss |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    let mut any = false;
    for scenario in SCENARIOS.iter().filter(|s| s.rate > 0) {
        for target in Target::ALL {
            let mut runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.scenario == scenario.name && r.target == target)
                .collect();
            if runs.len() < 2 {
                continue;
            }
            any = true;
            runs.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
            let median = runs[runs.len() / 2];
            let spread: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.p99_ms)).collect();
            let _ = writeln!(
                t,
                "| {} | {} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {} | {} |",
                scenario.name,
                target.name(),
                runs.len(),
                median.p50_ms,
                median.p99_ms,
                spread.join(", "),
                median.p999_ms,
                opt(median.cpu_us_per_msg, 1),
                median
                    .machine_busy
                    .map_or("–".into(), |b| format!("{b:.0}%")),
                runs.iter().map(|r| r.expected - r.unique).sum::<u64>(),
            );
        }
    }
    if any {
        t
    } else {
        String::new()
    }
}

/// Latency of one fdatasync on the disk the gateways' data_dirs are on (the temp dir):
/// `SAMPLES` appends of 4 KiB, each followed by `sync_data`. Returns (p50, p99) in ms.
fn fdatasync_latency() -> Result<(f64, f64), String> {
    use std::io::Write as _;
    const SAMPLES: usize = 400;
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let mut file = std::fs::File::create(dir.path().join("sync-probe"))
        .map_err(|e| format!("create the fdatasync probe: {e}"))?;
    let block = [0x5a_u8; 4096];
    let mut ms = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        file.write_all(&block)
            .map_err(|e| format!("write the fdatasync probe: {e}"))?;
        let start = Instant::now();
        file.sync_data()
            .map_err(|e| format!("fdatasync the probe: {e}"))?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[SAMPLES / 2], ms[SAMPLES * 99 / 100]))
}

/// The median-p99 round of `target` in fixed-rate `scenario` (as in [`rounds_summary`]).
fn median_round<'a>(
    results: &'a [RunResult],
    scenario: &str,
    target: Target,
) -> Option<&'a RunResult> {
    let mut runs: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.scenario == scenario && r.target == target)
        .collect();
    runs.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
    runs.get(runs.len() / 2).copied()
}

/// The targets of issue "Device sessions", computed from this run: S2 p99 and CPU per
/// message against the Mosquitto bridge (median rounds), S1 against `direct`.
fn targets_summary(results: &[RunResult], fsync: Option<(f64, f64)>) -> String {
    let mut md = String::new();
    if let Some((p50, p99)) = fsync {
        let _ = writeln!(
            md,
            "- one fdatasync of 4 KiB on the data disk, in this run: p50 {p50:.2} ms, p99 {p99:.2} ms"
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let s2 = |t| median_round(results, "S2", t);
    if let (Some(bridge), Some(received)) = (s2(Target::Bridge), s2(Target::GatewayAckReceived)) {
        let _ = writeln!(
            md,
            "- S2, `ack = \"received\"`: p99 {:.2} ms vs the bridge's {:.2} ms (target ≤: {})",
            received.p99_ms,
            bridge.p99_ms,
            verdict(received.p99_ms <= bridge.p99_ms)
        );
        if let (Some(ours), Some(theirs)) = (received.cpu_us_per_msg, bridge.cpu_us_per_msg) {
            let _ = writeln!(
                md,
                "- S2, `ack = \"received\"`: CPU {ours:.1} µs/msg = {:.2}× the bridge's {theirs:.1} (target ≤ 1.0×: {})",
                ours / theirs,
                verdict(ours <= theirs)
            );
        }
    }
    if let (Some(bridge), Some(durable)) = (s2(Target::Bridge), s2(Target::Gateway)) {
        if let Some((_, sync_p99)) = fsync {
            let _ = writeln!(
                md,
                "- S2, `ack = \"durable\"`: p99 {:.2} ms vs the bridge's {:.2} ms + one fdatasync's p99 {sync_p99:.2} ms = {:.2} ms (target ≤: {})",
                durable.p99_ms,
                bridge.p99_ms,
                bridge.p99_ms + sync_p99,
                verdict(durable.p99_ms <= bridge.p99_ms + sync_p99)
            );
        }
        if let (Some(ours), Some(theirs)) = (durable.cpu_us_per_msg, bridge.cpu_us_per_msg) {
            let _ = writeln!(
                md,
                "- S2, `ack = \"durable\"`: CPU {ours:.1} µs/msg = {:.2}× the bridge's {theirs:.1} (target ≤ 2.0×: {})",
                ours / theirs,
                verdict(ours <= 2.0 * theirs)
            );
        }
    }
    // Issue "MQTT 5 end to end": the MQTT 5 sink (the default) within 10% of 3.1.1.
    if let (Some(v5), Some(v311)) = (s2(Target::Gateway), s2(Target::GatewayV311)) {
        if let (Some(a), Some(b)) = (v5.cpu_us_per_msg, v311.cpu_us_per_msg) {
            let _ = writeln!(
                md,
                "- S2, MQTT 5 sink vs 3.1.1: p99 {:.2} vs {:.2} ms, CPU {a:.1} vs {b:.1} µs/msg = {:.2}× (target ≤ 1.10×: {})",
                v5.p99_ms,
                v311.p99_ms,
                a / b,
                verdict(a <= 1.1 * b)
            );
        }
    }
    let s1 = |t| results.iter().find(|r| r.scenario == "S1" && r.target == t);
    if let (Some(v5), Some(v311)) = (s1(Target::Gateway), s1(Target::GatewayV311)) {
        let _ = writeln!(
            md,
            "- S1, MQTT 5 sink vs 3.1.1: {:.0} vs {:.0} msg/s = {:.2}× (target ≥ 0.90×: {})",
            v5.msg_per_s,
            v311.msg_per_s,
            v5.msg_per_s / v311.msg_per_s,
            verdict(v5.msg_per_s >= 0.9 * v311.msg_per_s)
        );
    }
    if let (Some(direct), Some(ours)) = (s1(Target::Direct), s1(Target::Gateway)) {
        let _ = writeln!(
            md,
            "- S1 flat out: edgebridge {:.0} msg/s = {:.2}× `direct`'s {:.0} (target ≥ 0.95×: {})",
            ours.msg_per_s,
            ours.msg_per_s / direct.msg_per_s,
            direct.msg_per_s,
            verdict(ours.msg_per_s >= 0.95 * direct.msg_per_s)
        );
    }
    md
}

fn diagnostics_table(results: &[RunResult]) -> String {
    let mut t = String::from(
        "| scenario | target | end | received/expected | acked at devices | device acks/s | max ms | load s \
         | upstream CPU µs/msg | bench CPU µs/msg | device conn. errors | abandoned \
         | receiver errors | stray | notes |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in results {
        let end = end_word(r.end);
        let _ = writeln!(
            t,
            "| {} | {} | {end} | {}/{} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.target.name(),
            r.unique,
            r.expected,
            r.acked,
            opt(r.ack_per_s, 0),
            r.max_ms,
            r.seconds,
            opt(r.upstream_cpu_us_per_msg, 1),
            opt(r.bench_cpu_us_per_msg, 1),
            r.device_errors,
            r.abandoned,
            r.receiver_errors,
            r.unparsed,
            r.notes,
        );
    }
    t
}

fn results_markdown(
    results: &[RunResult],
    table: &str,
    diagnostics: &str,
    targets: &str,
) -> String {
    let mut md = String::from("# Forwarding benchmark results\n\n");
    let _ = writeln!(
        md,
        "Produced by `cargo bench --bench forward` (benches/forward.rs).\n"
    );
    md += &run_stamp();
    md += "\nScenarios (QoS 1, 100-byte payloads, MQTT 3.1.1 devices, loopback only):\n\n";
    for s in &SCENARIOS {
        let _ = writeln!(md, "- {}: {}", s.name, s.what);
    }
    md += "\n";
    if !targets.is_empty() {
        md += "Targets (issue \"Device sessions\"), from this run:\n\n";
        md += targets;
        md += "\n";
    }
    md += table;
    let _ = writeln!(
        md,
        "\nmsg/s: unique messages at the receiver ÷ (last arrival − first publish). loss: \
         expected − unique arrivals. Latency: send timestamp in the payload (taken once the \
         device's window has room) to arrival at the upstream receiver. Peak RSS (VmHWM) \
         and CPU (utime + stime during the load) are the target's; for `direct` they are \
         the upstream Mosquitto's. Targets: edgebridge `ack = \"durable\"` with one mqtt \
         sink (inflight {FORWARD_WINDOW}); in fixed-rate scenarios also \
         `edgebridge, ack = received`, the same gateway whose device PUBACKs do not wait \
         for the buffer's fsync (it still fsyncs every batch), as Mosquitto acks on \
         receipt; Mosquitto bridge `topic bench/# out 1`, \
         mqttv311, cleansession false, max_inflight_messages {FORWARD_WINDOW} (same \
         upstream window as the gateway). Upstream Mosquitto: persistence false, \
         max_queued_messages 0, max_inflight_messages {RECEIVER_WINDOW} toward the \
         receiver. p99.9 is the 99.9th percentile (of 50,000 messages in S2, the 50th \
         slowest). machine busy: the CPU time of every process on the machine during the load \
         phase (utime + stime, /proc/<pid>/stat) over the wall time and the cores: the load generator, the \
         receiver, the upstream and the target share this machine, and anything else \
         running shows up here too.\n"
    );
    md += "\nDiagnostics:\n\n";
    md += diagnostics;
    let incomplete: Vec<String> = results
        .iter()
        .filter(|r| r.end != End::Complete)
        .map(|r| format!("{} / {}", r.scenario, r.target.name()))
        .collect();
    if !incomplete.is_empty() {
        let _ = writeln!(md, "\nIncomplete runs: {}", incomplete.join(", "));
    }
    md
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

async fn bench(filters: Vec<String>, binary: PathBuf) -> Result<(), String> {
    // S3 and S3o run only when named; the S1 scenarios run unless only those were named.
    let named = |name: &str| filters.iter().any(|f| f.eq_ignore_ascii_case(name));
    let (run_s3, run_s3o) = (named("S3"), named("S3o"));
    let long_scenario = |f: &str| f.eq_ignore_ascii_case("S3") || f.eq_ignore_ascii_case("S3o");
    // Target names ("direct", "edgebridge", "bridge") narrow the targets.
    let target_word = |f: &str| Target::ALL.iter().any(|t| t.word() == f);
    let targets: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|t| {
            !filters.iter().any(|f| target_word(f)) || filters.iter().any(|f| *f == t.word())
        })
        .collect();
    let s1_filters: Vec<&String> = filters
        .iter()
        .filter(|f| !long_scenario(f) && !target_word(f))
        .collect();
    let selected: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| {
            s1_filters.is_empty() && !run_s3 && !run_s3o
                || s1_filters.iter().any(|f| f.eq_ignore_ascii_case(s.name))
        })
        .collect();
    if selected.is_empty() && !run_s3 && !run_s3o {
        return Err(format!("no scenario matches {filters:?}"));
    }
    let mut results = Vec::new();
    let mut failures = Vec::new();
    // Beside S2's durable target: what one fdatasync costs on this disk, now.
    let fsync = if selected.iter().any(|s| s.rate > 0) {
        match fdatasync_latency() {
            Ok(f) => Some(f),
            Err(e) => {
                failures.push(format!("fdatasync probe: {e}"));
                None
            }
        }
    } else {
        None
    };
    let bench_started = Instant::now();
    let mut runs: Vec<(&Scenario, Target)> = Vec::new();
    for scenario in &selected {
        let rounds = if scenario.rate > 0 {
            FIXED_RATE_ROUNDS
        } else {
            1
        };
        for _ in 0..rounds {
            runs.extend(
                targets
                    .iter()
                    .filter(|t| t.runs(scenario))
                    .map(|&t| (*scenario, t)),
            );
        }
    }
    for (scenario, target) in runs {
        if bench_started.elapsed() > TOTAL_BUDGET {
            failures.push(format!(
                "{} / {}: skipped, the bench ran over {} s",
                scenario.name,
                target.name(),
                TOTAL_BUDGET.as_secs()
            ));
            continue;
        }
        let tag = format!(
            "bench-{}-{}",
            scenario.name.to_lowercase(),
            results.len() + failures.len()
        );
        eprintln!("{} → {} …", scenario.what, target.name());
        match run_one(scenario, target, &binary, &tag).await {
            Ok(r) => {
                eprintln!(
                    "  {:.0} msg/s, {}/{} received, {} dups, p99 {:.2} ms, {:.1} s",
                    r.msg_per_s, r.unique, r.expected, r.duplicates, r.p99_ms, r.seconds
                );
                results.push(r);
            }
            Err(e) => {
                eprintln!("  FAILED: {e}");
                failures.push(format!("{} / {}: {e}", scenario.name, target.name()));
            }
        }
    }

    let summary = targets_summary(&results, fsync);
    if !selected.is_empty() {
        let table = results_table(&results);
        let diagnostics = diagnostics_table(&results);
        println!("\n{summary}\n{table}\n{diagnostics}");
    }
    if run_s3 {
        // Both drain orders in one run, so the live_first drain rate is a ratio to the
        // ordered one measured on the same machine at the same time.
        let mut runs = Vec::new();
        for drain in ["ordered", "live_first"] {
            eprintln!("S3 (drain = {drain}): {S3_WHAT} → edgebridge …");
            match run_backlog(&binary, drain).await {
                Ok(r) => {
                    let table = backlog_table(&r);
                    println!("\nBacklog drain (S3, drain = {drain}), edgebridge:\n\n{table}");
                    for n in &r.notes {
                        println!("- {n}");
                    }
                    runs.push((drain, r, table));
                }
                Err(e) => {
                    eprintln!("  FAILED: {e}");
                    failures.push(format!("S3 ({drain}) / edgebridge: {e}"));
                }
            }
        }
        if !runs.is_empty() {
            let comparison = drain_comparison(&runs);
            println!("\n{comparison}");
            write_section(S3_HEADING, &backlog_markdown(&runs, &comparison))?;
        }
    }
    if run_s3o {
        // Without an uplink between them, direct has nothing to cut.
        let outage_targets: Vec<Target> = targets
            .iter()
            .copied()
            .filter(|t| matches!(t, Target::Gateway | Target::Bridge))
            .collect();
        if outage_targets.is_empty() {
            failures.push("S3o: runs only against edgebridge and bridge".into());
        } else {
            run_outages(&outage_targets, &binary, &mut failures).await?;
        }
    }
    for f in &failures {
        println!("FAILED {f}");
    }
    if filters.is_empty() {
        let table = results_table(&results);
        let diagnostics = diagnostics_table(&results);
        let mut md = results_markdown(&results, &table, &diagnostics, &summary);
        for f in &failures {
            let _ = writeln!(md, "\nFAILED {f}");
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS.md");
        // A full run replaces the S1 tables and keeps the sections of named runs.
        if let Ok(old) = std::fs::read_to_string(&path) {
            if let Some(sections) = named_sections(&old) {
                md = format!("{}\n\n{sections}", md.trim_end());
            }
        }
        std::fs::write(&path, md).map_err(|e| format!("write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} run(s) failed", failures.len()))
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; anything else not starting with `-` picks scenarios.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !Path::new(MOSQUITTO).exists() {
        eprintln!("forward bench: {MOSQUITTO} not found: apt-get install mosquitto");
        return ExitCode::FAILURE;
    }
    // Before the runtime exists, so that Ctrl-C during the build simply ends the bench.
    let binary = match build_gateway() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("forward bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    now_us(); // fix the clock's epoch before any task reads it
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            biased; // install the signal handlers before the first run starts
            _ = interrupted() => Err("interrupted; child processes stopped".into()),
            r = bench(filters, binary) => r,
        }
    });
    // Tasks still polling sockets must not outlive the runtime's drop by long.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forward bench: {e}");
            ExitCode::FAILURE
        }
    }
}
