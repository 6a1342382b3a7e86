//! Sink benchmark (S5): the HTTP sink against the ceiling of the same receiver.
//!
//! Run with `cargo bench --bench sinks`; the table is printed and written to
//! `benches/RESULTS-sinks.md`.
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
    requests: u64,
    seconds: f64,
    cpu_us_per_msg: Option<f64>,
    peak_rss_mib: Option<f64>,
}

impl Row {
    fn line(&self) -> String {
        let opt =
            |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
        format!(
            "| {} | {} | {}/{} | {:.0} | {:.0} | {} | {} |",
            self.scenario,
            self.target,
            self.messages,
            self.expected,
            self.messages as f64 / self.seconds,
            self.requests as f64 / self.seconds,
            opt(self.cpu_us_per_msg, 1),
            opt(self.peak_rss_mib, 1),
        )
    }
}

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
        requests: counts.requests.load(Ordering::Relaxed),
        seconds,
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
                    format!("bench/dev{d}"),
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

async fn gateway_run(
    binary: &Path,
    scenario: &'static str,
    sink_extra: &str,
    per_device: u64,
) -> Result<Row, String> {
    let (receiver_port, counts) = start_receiver().await?;
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

[sinks.hook]
type = "http"
url = "http://127.0.0.1:{receiver_port}/in"
{sink_extra}

[[rules]]
name = "bench"
from = "bench/#"
to = ["hook"]

[log]
level = "warn"
"#,
        data = dir.path().join("data").display()
    );
    let config_path = dir.path().join("edgebridge.toml");
    std::fs::write(&config_path, config).map_err(|e| format!("write config: {e}"))?;
    let log =
        std::fs::File::create(dir.path().join("edgebridge.log")).map_err(|e| e.to_string())?;
    let child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
    let mut process = ChildGuard { child };
    let ready_by = Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(admin_port, "/readyz"), Some((200, _))) {
        if process.has_exited() || Instant::now() > ready_by {
            return Err("edgebridge did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expected = per_device * DEVICES as u64;
    let cpu_before = cpu_seconds(Some(process.pid()));
    let start = Instant::now();
    let devices: Vec<_> = (0..DEVICES)
        .map(|d| tokio::spawn(device(port, d, per_device)))
        .collect();
    let deadline = start + RUN_DEADLINE;
    while counts.messages.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_after = cpu_seconds(Some(process.pid()));
    for d in devices {
        let _ = d.await;
    }
    let last = counts
        .last
        .lock()
        .expect("lock")
        .unwrap_or_else(Instant::now);
    let messages = counts.messages.load(Ordering::Relaxed);
    Ok(Row {
        scenario,
        target: "edgebridge",
        messages,
        expected,
        requests: counts.requests.load(Ordering::Relaxed),
        seconds: last.duration_since(start).as_secs_f64(),
        cpu_us_per_msg: cpu_after
            .zip(cpu_before)
            .map(|(a, b)| (a - b) * 1e6 / messages.max(1) as f64),
        peak_rss_mib: peak_rss_mib(process.pid()),
    })
}

async fn bench(binary: PathBuf) -> Result<String, String> {
    let batched = "format = \"ndjson\"\nbatch = { max_messages = 500, max_delay = \"20ms\" }";
    let rows = vec![
        ceiling("S5-http batched (500/request)", 500, 500_000).await?,
        gateway_run(&binary, "S5-http batched (500/request)", batched, 30_000).await?,
        ceiling("S5-http unbatched", 1, 30_000).await?,
        gateway_run(&binary, "S5-http unbatched", "format = \"json\"", 3_000).await?,
    ];
    let mut md = String::from(
        "| scenario | target | messages | msg/s | requests/s | CPU µs/msg | peak RSS MiB |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let _ = writeln!(md, "{}", r.line());
    }
    Ok(md)
}

fn main() -> ExitCode {
    let binary = match build_gateway() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sinks bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let outcome = runtime.block_on(async {
        tokio::select! {
            _ = interrupted() => Err("interrupted".to_string()),
            r = bench(binary) => r,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Ok(table) => {
            let machine = Command::new("nproc")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            let revision = Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            let date = Command::new("date")
                .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            let md = format!(
                "# Sink benchmark results\n\nProduced by `cargo bench --bench sinks` (benches/sinks.rs).\n\n\
                 - date: {date}\n- machine: nproc {machine}\n- revision: {revision}\n\n{table}\n\
                 10 devices, QoS 1, window 100, 100-byte JSON payloads, flat out. The ceiling rows post \
                 pre-built bodies from the bench process to the same receiver, one request at a time \
                 (as the sink sends them); their CPU column is the bench process's. The edgebridge \
                 rows' CPU and RSS are the gateway process's.\n"
            );
            println!("{md}");
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS-sinks.md");
            if let Err(e) = std::fs::write(&path, md) {
                eprintln!("write {}: {e}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sinks bench: {e}");
            ExitCode::FAILURE
        }
    }
}
