//! Sink benchmark (S5): the HTTP and Kafka sinks, each against its peer's own ceiling.
//!
//! Run with `cargo bench --bench sinks` (`-- http`, `-- kafka`, `-- aws` or `-- aws-backlog`
//! for one part);
//! the table is printed, and written to `benches/RESULTS-sinks.md` when every part ran.
//!
//! AWS's per-connection limits (S6, `-- aws`): an MQTT sink to a real Mosquitto paced at
//! AWS IoT Core's limits (`rate = { messages = 100, bytes = "512KiB" }`) with packing on
//! (`max_bytes = "120KiB"`, `linger = "200ms"`), over 1 and over 10 connections; the same
//! 10 devices publish 100-byte readings faster than that, so the sink's paced delivery is
//! what is measured (the gateway's delivered counter, which counts readings, not packs).
//! The byte limit allows 512 KiB/s ÷ ~112 bytes per packed reading ≈ 4,700 readings/s per
//! connection; an unpaced, unpacked row gives the machine's ceiling for the same path.
//! The "from a backlog" rows measure the sink alone: the devices publish with the upstream
//! down, and the clock starts when Mosquitto comes up and the stored readings drain (ten
//! connections' limits, ~47k readings/s, are more than this machine's devices get into
//! the gateway live).
//!
//! Kafka: the ceiling is an rdkafka producer alone (the sink's default properties:
//! idempotent, acks=all, lz4, linger 5 ms) producing 100-byte records from this process;
//! the edgebridge run counts `Ok` delivery reports (the gateway's delivered counter).
//! Brokers: librdkafka's MockCluster (in this process) and tansu (memory storage, topic
//! `bench` with 3 partitions).
//!
//! The receiver is an HTTP/1.1 server in this process that counts messages (NDJSON lines,
//! or one per request) and answers 200 at once. Two kinds of run, each batched (NDJSON,
//! 500 messages per request) and unbatched (one JSON object per request):
//! - `ceiling`: this process posts pre-built bodies to the receiver one request at a
//!   time, as the sink does: the most any sequential client gets from this receiver here;
//! - `edgebridge`: the release binary with one HTTP sink to the receiver and a rule
//!   `bench/#` → it; 10 devices (rumqttc, QoS 1, window 100) publish 100-byte JSON
//!   payloads flat out. msg/s = messages at the receiver ÷ (last arrival − first publish).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

mod support;
use support::*;

const DEVICES: u32 = 10;
const WINDOW: u16 = 100;
const PAYLOAD_LEN: usize = 100;
const RUN_DEADLINE: Duration = Duration::from_secs(180);
/// Time the gateway has to answer `/readyz`.
const START_LIMIT: Duration = Duration::from_secs(20);

/// Counts what arrives.
#[derive(Default)]
struct Counts {
    messages: AtomicU64,
    requests: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

async fn receive(
    State(counts): State<Arc<Counts>>,
    headers: HeaderMap,
    body: Bytes,
) -> &'static str {
    let ndjson = headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes() == b"application/x-ndjson");
    let n = if ndjson {
        body.iter().filter(|b| **b == b'\n').count() as u64
    } else {
        1
    };
    let now = Instant::now();
    counts.first.lock().expect("lock").get_or_insert(now);
    *counts.last.lock().expect("lock") = Some(now);
    counts.requests.fetch_add(1, Ordering::Relaxed);
    counts.messages.fetch_add(n, Ordering::Relaxed);
    "ok"
}

async fn start_receiver() -> Result<(u16, Arc<Counts>), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind receiver: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let counts = Arc::new(Counts::default());
    let app = Router::new()
        .route("/in", post(receive))
        .with_state(counts.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((port, counts))
}

/// A 100-byte JSON payload.
fn payload(device: u32, seq: u64) -> Vec<u8> {
    let head = format!("{{\"d\":{device},\"s\":{seq},\"p\":\"");
    let mut p = head.into_bytes();
    p.resize(PAYLOAD_LEN - 2, b'x');
    p.extend_from_slice(b"\"}");
    p
}

struct Row {
    scenario: &'static str,
    target: &'static str,
    messages: u64,
    expected: u64,
    /// HTTP requests (Kafka: none).
    requests: Option<u64>,
    seconds: f64,
    /// msg/s between 10% and 90% of the expected arrivals: the rate without the start
    /// (devices connecting, first packs lingering) and the end (the last pack's linger).
    steady: Option<f64>,
    cpu_us_per_msg: Option<f64>,
    peak_rss_mib: Option<f64>,
}

impl Row {
    fn line(&self) -> String {
        let opt =
            |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        format!(
            "| {} | {} | {}/{} | {:.0} | {} | {} | {} | {} |",
            self.scenario,
            self.target,
            self.messages,
            self.expected,
            self.messages as f64 / self.seconds,
            opt(self.steady, 0),
            opt(self.requests.map(|r| r as f64 / self.seconds), 0),
            opt(self.cpu_us_per_msg, 1),
            opt(self.peak_rss_mib, 1),
        )
    }
}

/// S6's sinks: AWS IoT Core's per-connection limits, packing on.
const AWS_120: &str = "rate = { messages = 100, bytes = \"512KiB\" }\n\
                       pack = { max_bytes = \"120KiB\", linger = \"200ms\" }";
const AWS_100: &str = "rate = { messages = 100, bytes = \"512KiB\" }\n\
                       pack = { max_bytes = \"100KiB\", linger = \"200ms\" }";
const AWS_100_10: &str = "rate = { messages = 100, bytes = \"512KiB\" }\n\
                          pack = { max_bytes = \"100KiB\", linger = \"200ms\" }\n\
                          connections = 10";

/// Sequential posts of pre-built bodies: `total` messages, `batch` per request.
async fn ceiling(scenario: &'static str, batch: usize, total: u64) -> Result<Row, String> {
    let (port, counts) = start_receiver().await?;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/in");
    let (body, content_type) = if batch > 1 {
        let mut b = Vec::new();
        for i in 0..batch {
            let obj = serde_json::json!({
                "id": format!("x-{i}"), "topic": "bench/dev0", "qos": 1, "retain": false,
                "received_at": 1, "gateway_id": "bench-gw",
                "payload": serde_json::from_slice::<serde_json::Value>(&payload(0, i as u64))
                    .map_err(|e| e.to_string())?,
            });
            serde_json::to_writer(&mut b, &obj).map_err(|e| e.to_string())?;
            b.push(b'\n');
        }
        (Bytes::from(b), "application/x-ndjson")
    } else {
        (Bytes::from(payload(0, 0)), "application/json")
    };
    let requests = total / batch as u64;
    let cpu_before = cpu_seconds(None);
    let start = Instant::now();
    for _ in 0..requests {
        let r = client
            .post(&url)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .map_err(|e| format!("ceiling post: {e}"))?;
        let _ = r.bytes().await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let messages = counts.messages.load(Ordering::Relaxed);
    Ok(Row {
        scenario,
        target: "ceiling (sequential client → receiver)",
        messages,
        expected: requests * batch as u64,
        requests: Some(counts.requests.load(Ordering::Relaxed)),
        seconds,
        steady: None,
        cpu_us_per_msg: cpu_seconds(None)
            .zip(cpu_before)
            .map(|(a, b)| (a - b) * 1e6 / messages.max(1) as f64),
        peak_rss_mib: None,
    })
}

/// Device `d` publishes `n` payloads flat out with `WINDOW` in flight; returns PUBACKs.
async fn device(port: u16, d: u32, n: u64) -> u64 {
    let mut opts = MqttOptions::new(format!("dev{d}"), "127.0.0.1", port);
    opts.set_inflight(WINDOW);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, WINDOW as usize);
    let publisher = tokio::spawn(async move {
        for s in 0..n {
            if client
                .publish(
                    // Ten machines behind each device: 100 topics in all, as a plant has
                    // (the MQTT sink's connections are chosen by topic).
                    format!("bench/dev{d}/m{}", s % 10),
                    QoS::AtLeastOnce,
                    false,
                    payload(d, s),
                )
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
    while acked < n {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    publisher.abort();
    acked
}

/// Where a gateway run's messages are counted.
enum Arrivals {
    /// At the HTTP receiver of this process.
    Http(Arc<Counts>),
    /// By the gateway's delivered counter (Kafka: each one an `Ok` delivery report).
    Delivered,
}

/// When the devices publish, against when the sink can deliver.
enum Load {
    /// While the sink delivers: ingest and delivery share the machine.
    Live,
    /// First, with the upstream down (nothing listens on this port): every reading is in
    /// the durable buffer before `start_upstream` brings the upstream up on the port and
    /// the clock starts. What is measured is the sink's drain alone.
    Backlog {
        upstream_port: u16,
        start_upstream: fn(u16) -> Result<ChildGuard, String>,
    },
}

/// The release binary with `sink` (a `[sinks.out]` table) fed by rule `bench/#`, and
/// `DEVICES` devices publishing `per_device` messages each, flat out.
async fn gateway_run(
    binary: &Path,
    scenario: &'static str,
    sink: &str,
    arrivals: Arrivals,
    per_device: u64,
    load: Load,
) -> Result<Row, String> {
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

{sink}

[[rules]]
name = "bench"
from = "bench/#"
to = ["out"]

[log]
level = "warn"
"#,
        data = dir.path().join("data").display()
    );
    let config_path = dir.path().join("edgebridge.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("write config: {e}"))?;
    let log_path = dir.path().join("edgebridge.log");
    let process = launch_gateway(binary, &config_path, &log_path, admin_port, START_LIMIT).await?;
    let expected = per_device * DEVICES as u64;
    let arrived = || match &arrivals {
        Arrivals::Http(counts) => counts.messages.load(Ordering::Relaxed),
        Arrivals::Delivered => http_get(admin_port, "/metrics").map_or(0, |(_, page)| {
            metric_sum(&page, "edgebridge_sink_delivered_total") as u64
        }),
    };
    let spawn_devices = || -> Vec<_> {
        (0..DEVICES)
            .map(|d| tokio::spawn(device(port, d, per_device)))
            .collect()
    };
    let mut devices = Vec::new();
    let mut _upstream = None;
    match load {
        Load::Live => devices = spawn_devices(),
        Load::Backlog {
            upstream_port,
            start_upstream,
        } => {
            let mut stored = 0;
            for d in spawn_devices() {
                stored += d.await.map_err(|e| format!("device: {e}"))?;
            }
            if stored < expected {
                return Err(format!(
                    "{scenario}: the gateway acked {stored} of {expected} readings with the upstream down"
                ));
            }
            _upstream = Some(start_upstream(upstream_port)?);
        }
    }
    let cpu_before = cpu_seconds(Some(process.pid()));
    let start = Instant::now();
    let deadline = start + RUN_DEADLINE;
    let mut messages = arrived();
    // When a tenth and nine tenths of the expected messages had arrived.
    let (mut tenth, mut nine_tenths) = (None, None);
    while messages < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        messages = arrived();
        if messages * 10 >= expected {
            tenth.get_or_insert((Instant::now(), messages));
        }
        if messages * 10 >= expected * 9 {
            nine_tenths.get_or_insert((Instant::now(), messages));
        }
    }
    let steady = tenth.zip(nine_tenths).and_then(|((t0, m0), (t1, m1))| {
        let secs = t1.duration_since(t0).as_secs_f64();
        (secs > 0.0).then(|| (m1 - m0) as f64 / secs)
    });
    let done = Instant::now();
    let cpu_after = cpu_seconds(Some(process.pid()));
    for d in devices {
        let _ = d.await;
    }
    let (seconds, requests) = match &arrivals {
        Arrivals::Http(counts) => {
            let last = counts.last.lock().expect("lock").unwrap_or(done);
            (
                last.duration_since(start).as_secs_f64(),
                Some(counts.requests.load(Ordering::Relaxed)),
            )
        }
        Arrivals::Delivered => (done.duration_since(start).as_secs_f64(), None),
    };
    Ok(Row {
        scenario,
        target: "edgebridge",
        messages,
        expected,
        requests,
        seconds,
        steady,
        cpu_us_per_msg: cpu_after
            .zip(cpu_before)
            .map(|(a, b)| (a - b) * 1e6 / messages.max(1) as f64),
        peak_rss_mib: peak_rss_mib(process.pid()),
    })
}

fn http_sink(receiver_port: u16, extra: &str) -> String {
    format!("[sinks.out]\ntype = \"http\"\nurl = \"http://127.0.0.1:{receiver_port}/in\"\n{extra}")
}

fn kafka_sink(bootstrap: &str) -> String {
    let brokers: Vec<String> = bootstrap.split(',').map(|b| format!("\"{b}\"")).collect();
    format!(
        "[sinks.out]\ntype = \"kafka\"\nbrokers = [{}]\ntopic = \"bench\"",
        brokers.join(", ")
    )
}

/// An rdkafka producer alone, with the sink's default properties, producing `total`
/// 100-byte records to `bootstrap`: the broker's ceiling for this client.
async fn kafka_ceiling(scenario: &'static str, bootstrap: &str, total: u64) -> Result<Row, String> {
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let mut config = rdkafka::ClientConfig::new();
        for (k, v) in edgebridge::sinks::kafka::config::DEFAULT_PROPERTIES {
            config.set(*k, *v);
        }
        config.set("bootstrap.servers", &bootstrap);
        let producer: ThreadedProducer<DefaultProducerContext> = config
            .create()
            .map_err(|e| format!("ceiling producer: {e}"))?;
        let cpu_before = cpu_seconds(None);
        let start = Instant::now();
        for s in 0..total {
            let key = format!("bench/dev{}", s % DEVICES as u64);
            let value = payload((s % DEVICES as u64) as u32, s);
            let mut record = BaseRecord::to("bench").key(&key).payload(&value);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        // Queue full: let librdkafka drain a little.
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        producer
            .flush(Duration::from_secs(120))
            .map_err(|e| format!("ceiling flush: {e}"))?;
        let seconds = start.elapsed().as_secs_f64();
        Ok(Row {
            scenario,
            target: "ceiling (rdkafka producer alone)",
            messages: total,
            expected: total,
            requests: None,
            seconds,
            steady: None,
            cpu_us_per_msg: cpu_seconds(None)
                .zip(cpu_before)
                .map(|(a, b)| (a - b) * 1e6 / total as f64),
            peak_rss_mib: None,
        })
    })
    .await
    .map_err(|e| format!("ceiling task: {e}"))?
}

/// `tansu broker` on a free port with topic `bench`; killed when dropped.
fn mqtt_sink(upstream_port: u16, extra: &str) -> String {
    format!(
        "[sinks.out]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{upstream_port}\"\n\
         max_packet_size = \"256KiB\"\n{extra}"
    )
}

/// A Mosquitto upstream on a free port that takes everything (no subscriber needed: the
/// sink's PUBACKs are what counts). `set_tcp_nodelay`: with Nagle on, Mosquitto held
/// back PUBACKs written behind unacknowledged ones, and one unpaced connection carried
/// 4,219 msg/s; with it off, 48,052 (the same binary, one run each).
fn start_mosquitto() -> Result<(ChildGuard, u16), String> {
    let port = free_port()?;
    Ok((start_mosquitto_on(port)?, port))
}

/// A Mosquitto upstream as [`start_mosquitto`]'s, on `port`.
fn start_mosquitto_on(port: u16) -> Result<ChildGuard, String> {
    let dir = std::env::temp_dir().join(format!("edgebridge-bench-mosquitto-{port}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("mosquitto dir: {e}"))?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n\
             max_inflight_messages 0\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n"
        ),
    )
    .map_err(|e| format!("write mosquitto.conf: {e}"))?;
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start {MOSQUITTO} ({e}): apt-get install mosquitto"))?;
    let guard = ChildGuard { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("mosquitto did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(guard)
}

fn start_tansu() -> Result<(ChildGuard, String), String> {
    let bin = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin/tansu"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("tansu"));
    let port = free_port()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(&bin)
        .args(["broker", "--storage-engine", "memory://tansu/"])
        .args(["--listener-url", &url, "--advertised-listener-url", &url])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("start tansu ({e}); cargo install tansu --locked --features dynostore")
        })?;
    let guard = ChildGuard { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("tansu did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new(&bin)
        .args([
            "topic",
            "create",
            "bench",
            "--partitions",
            "3",
            "--broker",
            &url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("tansu topic create: {e}"))?;
    if !status.success() {
        return Err("tansu topic create bench failed".into());
    }
    Ok((guard, format!("127.0.0.1:{port}")))
}

async fn bench(binary: PathBuf, filters: Vec<String>) -> Result<String, String> {
    let batched = "format = \"ndjson\"\nbatch = { max_messages = 500, max_delay = \"20ms\" }";
    let mut rows = Vec::new();
    let run_http = filters.is_empty() || filters.iter().any(|f| f == "http");
    let run_kafka = filters.is_empty() || filters.iter().any(|f| f == "kafka");
    let run_aws = filters.is_empty() || filters.iter().any(|f| f == "aws");
    let run_aws_backlog = run_aws || filters.iter().any(|f| f == "aws-backlog");
    if run_http {
        rows.push(ceiling("S5-http batched (500/request)", 500, 500_000).await?);
        let (port, counts) = start_receiver().await?;
        rows.push(
            gateway_run(
                &binary,
                "S5-http batched (500/request)",
                &http_sink(port, batched),
                Arrivals::Http(counts),
                30_000,
                Load::Live,
            )
            .await?,
        );
        rows.push(ceiling("S5-http unbatched", 1, 30_000).await?);
        let (port, counts) = start_receiver().await?;
        rows.push(
            gateway_run(
                &binary,
                "S5-http unbatched",
                &http_sink(port, "format = \"json\""),
                Arrivals::Http(counts),
                3_000,
                Load::Live,
            )
            .await?,
        );
    }
    if run_kafka {
        let cluster =
            rdkafka::mocking::MockCluster::new(1).map_err(|e| format!("mock cluster: {e}"))?;
        cluster
            .create_topic("bench", 3, 1)
            .map_err(|e| format!("mock topic: {e}"))?;
        let bootstrap = cluster.bootstrap_servers();
        rows.push(kafka_ceiling("S5-kafka MockCluster", &bootstrap, 500_000).await?);
        rows.push(
            gateway_run(
                &binary,
                "S5-kafka MockCluster",
                &kafka_sink(&bootstrap),
                Arrivals::Delivered,
                30_000,
                Load::Live,
            )
            .await?,
        );
        drop(cluster);
        let (tansu, bootstrap) = start_tansu()?;
        rows.push(kafka_ceiling("S5-kafka tansu", &bootstrap, 300_000).await?);
        drop(tansu);
        // A fresh broker, so the gateway's run does not share it with the ceiling's data.
        let (_tansu, bootstrap) = start_tansu()?;
        rows.push(
            gateway_run(
                &binary,
                "S5-kafka tansu",
                &kafka_sink(&bootstrap),
                Arrivals::Delivered,
                30_000,
                Load::Live,
            )
            .await?,
        );
    }
    if run_aws {
        let (_mosquitto, port) = start_mosquitto()?;
        let runs = [
            ("S6-aws unpaced, unpacked, 1 connection", "", 30_000),
            // ~25 s of paced delivery each, so that the start and the end weigh little.
            (
                "S6-aws paced + packed 120KiB, 1 connection",
                AWS_120,
                11_000,
            ),
            (
                "S6-aws paced + packed 100KiB, 1 connection",
                AWS_100,
                11_000,
            ),
            (
                "S6-aws paced + packed 100KiB, 10 connections",
                AWS_100_10,
                110_000,
            ),
        ];
        for (scenario, extra, per_device) in runs {
            rows.push(
                gateway_run(
                    &binary,
                    scenario,
                    &mqtt_sink(port, extra),
                    Arrivals::Delivered,
                    per_device,
                    Load::Live,
                )
                .await?,
            );
        }
    }
    if run_aws_backlog {
        // The same sinks draining a backlog stored while the upstream was down: the sink's
        // own pace, without the devices' ingest on the same two cores (flat out, this
        // machine takes in ~33k readings/s, less than ten connections' limits allow).
        // ~25 s of paced delivery each; a quick reconnect once the upstream is up.
        const RECONNECT: &str = "backoff_min = \"100ms\"\nbackoff_max = \"500ms\"";
        let backlog_runs = [
            (
                "S6-aws paced + packed 100KiB, 1 connection, from a 120k backlog",
                AWS_100,
                12_000,
            ),
            (
                "S6-aws paced + packed 100KiB, 10 connections, from a 1.2M backlog",
                AWS_100_10,
                120_000,
            ),
        ];
        for (scenario, extra, per_device) in backlog_runs {
            let upstream_port = free_port()?;
            rows.push(
                gateway_run(
                    &binary,
                    scenario,
                    &mqtt_sink(upstream_port, &format!("{extra}\n{RECONNECT}")),
                    Arrivals::Delivered,
                    per_device,
                    Load::Backlog {
                        upstream_port,
                        start_upstream: start_mosquitto_on,
                    },
                )
                .await?,
            );
        }
    }
    let mut md = String::from(
        "| scenario | target | messages | msg/s | steady msg/s | requests/s | CPU µs/msg | peak RSS MiB |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let _ = writeln!(md, "{}", r.line());
    }
    Ok(md)
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; `http`, `kafka`, `aws` or `aws-backlog` picks one part.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let binary = match build_gateway() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sinks bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let full_run = filters.is_empty();
    let outcome = runtime.block_on(async {
        tokio::select! {
            _ = interrupted() => Err("interrupted".to_string()),
            r = bench(binary, filters) => r,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(table) => {
            let stamp = run_stamp();
            let md = format!(
                "# Sink benchmark results\n\nProduced by `cargo bench --bench sinks` (benches/sinks.rs).\n\n\
                 {stamp}\n{table}\n\
                 10 devices, QoS 1, window 100, 100-byte JSON payloads, flat out (S6: more than the \
                 paced sink takes; its msg/s are readings delivered, several per packed publish). The ceiling rows post \
                 pre-built bodies from the bench process to the same receiver, one request at a time \
                 (as the sink sends them); their CPU column is the bench process's. The edgebridge \
                 rows' CPU and RSS are the gateway process's.\n"
            );
            println!("{md}");
            // A half run would replace the other half's numbers: only a full run is kept.
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS-sinks.md");
            if full_run {
                if let Err(e) = std::fs::write(&path, md) {
                    eprintln!("write {}: {e}", path.display());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sinks bench: {e}");
            ExitCode::FAILURE
        }
    }
}
