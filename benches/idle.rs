//! S4: memory per idle device connection, edgebridge beside Mosquitto.
//!
//! Run with `cargo bench --bench idle` (`-- 2000` for another connection count). For
//! each target this process opens N MQTT 3.1.1 connections (CONNECT with keep-alive
//! 600 s, CONNACK read), keeps them open and idle, waits for the target's memory to
//! settle, and reports the growth of its resident set (VmRSS) divided by N. Each target
//! runs twice, on a fresh process: devices that only publish (the common factory
//! device), then devices with one QoS 1 subscription each (`idle/<id>`, SUBACK read).
//! Targets: the release binary with one file sink and `max_connections` raised, and a
//! Mosquitto (`/usr/sbin/mosquitto`, persistence off) as an edge broker would run.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;
use support::*;

const DEFAULT_CONNECTIONS: usize = 10_000;
/// Connections opened at once.
const PARALLEL: usize = 200;

/// A 3.1.1 CONNECT with clean session, keep-alive 600 s and `id`.
fn connect_packet(id: &str) -> Vec<u8> {
    let mut p = vec![0x10, (12 + id.len()) as u8, 0, 4];
    p.extend_from_slice(b"MQTT");
    p.extend_from_slice(&[4, 2, 0x02, 0x58, 0, id.len() as u8]);
    p.extend_from_slice(id.as_bytes());
    p
}

/// A SUBSCRIBE (packet id 1) to `idle/<id>` at QoS 1.
fn subscribe_packet(id: &str) -> Vec<u8> {
    let filter = format!("idle/{id}");
    let mut p = vec![0x82, (5 + filter.len()) as u8, 0, 1, 0, filter.len() as u8];
    p.extend_from_slice(filter.as_bytes());
    p.push(1);
    p
}

/// Opens one connection and waits for a successful CONNACK (and, with `subscribe`, a
/// SUBACK granting QoS 1).
async fn open(port: u16, id: String, subscribe: bool) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(&connect_packet(&id))
        .await
        .map_err(|e| format!("write CONNECT: {e}"))?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut ack))
        .await
        .map_err(|_| "no CONNACK within 20 s".to_string())?
        .map_err(|e| format!("read CONNACK: {e}"))?;
    if ack[0] != 0x20 || ack[3] != 0 {
        return Err(format!("refused: {ack:?}"));
    }
    if subscribe {
        s.write_all(&subscribe_packet(&id))
            .await
            .map_err(|e| format!("write SUBSCRIBE: {e}"))?;
        let mut ack = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut ack))
            .await
            .map_err(|_| "no SUBACK within 20 s".to_string())?
            .map_err(|e| format!("read SUBACK: {e}"))?;
        if ack != [0x90, 3, 0, 1, 1] {
            return Err(format!("subscription refused: {ack:?}"));
        }
    }
    Ok(s)
}

/// Opens `n` idle connections to `port`; returns them (kept open by the caller).
async fn open_all(port: u16, n: usize, subscribe: bool) -> Result<Vec<TcpStream>, String> {
    let mut all = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(PARALLEL) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|i| tokio::spawn(open(port, format!("idle-{i}"), subscribe)))
            .collect();
        for t in tasks {
            all.push(t.await.map_err(|e| e.to_string())??);
        }
    }
    Ok(all)
}

/// VmRSS of `pid` once it stops moving (two readings 1 s apart within 1%), in MiB.
async fn settled_rss(pid: u32) -> f64 {
    let mut last = rss_mib(pid).unwrap_or(0.0);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_mib(pid).unwrap_or(0.0);
        if (now - last).abs() <= last * 0.01 {
            return now;
        }
        last = now;
    }
    last
}

struct Row {
    target: &'static str,
    subscribed: bool,
    connections: usize,
    before_mib: f64,
    after_mib: f64,
    open_seconds: f64,
}

impl Row {
    fn kib_per_connection(&self) -> f64 {
        (self.after_mib - self.before_mib) * 1024.0 / self.connections as f64
    }

    fn line(&self) -> String {
        let per_conn_kib = self.kib_per_connection();
        format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} |",
            self.target,
            if self.subscribed { "1 each" } else { "none" },
            self.connections,
            self.before_mib,
            self.after_mib,
            per_conn_kib,
            self.open_seconds
        )
    }
}

async fn measure(
    target: &'static str,
    pid: u32,
    port: u16,
    n: usize,
    subscribed: bool,
) -> Result<Row, String> {
    let before_mib = settled_rss(pid).await;
    let start = Instant::now();
    let connections = open_all(port, n, subscribed).await?;
    let open_seconds = start.elapsed().as_secs_f64();
    let after_mib = settled_rss(pid).await;
    drop(connections);
    Ok(Row {
        target,
        subscribed,
        connections: n,
        before_mib,
        after_mib,
        open_seconds,
    })
}

async fn edgebridge(binary: &Path, n: usize, subscribed: bool) -> Result<Row, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (port, admin_port) = (free_port()?, free_port()?);
    let config = format!(
        r##"[gateway]
id = "bench-idle"
data_dir = "{data}"

[admin]
bind = "127.0.0.1:{admin_port}"

[[listeners]]
name = "devices"
bind = "127.0.0.1:{port}"
max_connections = {max}

[sinks.out]
type = "file"
path = "{data}/out.ndjson"

[[rules]]
name = "all"
from = "#"
to = ["out"]

[log]
level = "warn"
"##,
        data = dir.path().join("data").display(),
        max = n + 100
    );
    let config_path = dir.path().join("edgebridge.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let log = dir.path().join("edgebridge.log");
    let process = launch_gateway(
        binary,
        &config_path,
        &log,
        admin_port,
        Duration::from_secs(20),
    )
    .await?;
    measure("edgebridge", process.pid(), port, n, subscribed).await
}

async fn mosquitto(n: usize, subscribed: bool) -> Result<Row, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let port = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nuser root\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn mosquitto: {e}"))?;
    let process = ChildGuard { child };
    let ready_by = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > ready_by {
            return Err("mosquitto did not listen".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    measure("mosquitto", process.pid(), port, n, subscribed).await
}

/// The target for S4 (issue "Device sessions"), KiB per idle publish-only connection.
const TARGET_KIB: f64 = 8.0;
/// rumqttd 0.20's router alone, per local link with one subscription (measured for the
/// issue: 10,000 links), for the edgebridge-own share of the subscribed figure.
const ROUTER_SUBSCRIBED_KIB: f64 = 34.0;

/// `benches/RESULTS-idle.md`: the stamp, the table, and what the gateway's number means.
fn results_markdown(n: usize, rows: &[Row]) -> String {
    let mut md = String::from(
        "# Idle connection benchmark (S4)\n\nProduced by `cargo bench --bench idle` (benches/idle.rs).\n\n",
    );
    md += &run_stamp();
    md += &format!("\nS4: {n} idle MQTT 3.1.1 connections (keep-alive 600 s)\n\n");
    md += "| target | subscriptions | connections | RSS before MiB | RSS after MiB | KiB per connection | seconds to open |\n";
    md += "|---|---|---:|---:|---:|---:|---:|\n";
    for r in rows {
        md += &r.line();
        md.push('\n');
    }
    let find = |subscribed: bool| {
        rows.iter()
            .find(|r| r.target == "edgebridge" && r.subscribed == subscribed)
    };
    if let Some(idle) = find(false) {
        let kib = idle.kib_per_connection();
        md += &format!(
            "\nPublish-only: {kib:.2} KiB per connection against the target of ≤ {TARGET_KIB} KiB \
             ({}). A device that only publishes has no router link: its cost is edgebridge's \
             own connection task, its buffers (which start small) and its socket.\n",
            if kib <= TARGET_KIB { "met" } else { "not met" }
        );
    }
    if let (Some(idle), Some(sub)) = (find(false), find(true)) {
        let kib = sub.kib_per_connection();
        md += &format!(
            "\nOne subscription each: {kib:.2} KiB per connection. A subscribing device also gets \
             a link of rumqttd's router, whose queues are preallocated constants \
             (`MAX_CHANNEL_CAPACITY`; rumqttd 0.20 alone was measured at {ROUTER_SUBSCRIBED_KIB} KiB \
             per link with one subscription). The difference to the publish-only run, {:.2} KiB, \
             is that link (rumqttd's) and the subscription; edgebridge's own share is the \
             connection it already had, {:.2} KiB, plus the link's handle.\n",
            kib - idle.kib_per_connection(),
            idle.kib_per_connection()
        );
    }
    md
}

fn main() -> ExitCode {
    let n = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(DEFAULT_CONNECTIONS);
    let binary = match build_gateway() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("idle bench: {e}");
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
    let outcome = runtime.block_on(async {
        let mut rows = Vec::new();
        for subscribed in [false, true] {
            rows.push(edgebridge(&binary, n, subscribed).await?);
            rows.push(mosquitto(n, subscribed).await?);
        }
        Ok::<_, String>(rows)
    });
    match outcome {
        Ok(rows) => {
            let md = results_markdown(n, &rows);
            println!("{md}");
            // Only a run at the scenario's size replaces the kept results.
            if n == DEFAULT_CONNECTIONS {
                let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS-idle.md");
                if let Err(e) = std::fs::write(&path, md) {
                    eprintln!("write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("idle bench: {e}");
            ExitCode::FAILURE
        }
    }
}
