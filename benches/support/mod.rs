//! Process, /proc and HTTP helpers shared by the benchmarks (`mod support;`).
#![allow(dead_code)]

use std::io::{Read, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The Mosquitto of the Debian package (`apt-get install mosquitto`).
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A child process that is killed (SIGKILL) and reaped when dropped, on every exit path.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends a signal (`-TERM`, `-STOP`, `-CONT`) to one process we started.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A minimal HTTP/1.1 GET on 127.0.0.1 (the admin endpoint); `(status, body)`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Sum of every sample of `name` in a Prometheus text page (all label sets).
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of `pid` (`None`: this process), in seconds.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which may itself contain spaces and parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field 3 (state) is fields[0], so utime (14) and stime (15) are [11] and [12].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_second())
}

/// Peak resident set (VmHWM) of `pid`, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmHWM:")
}

/// Current resident set (VmRSS) of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    proc_status_mib(pid, "VmRSS:")
}

pub fn proc_status_mib(pid: u32, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `cargo bench` does not build binaries for a `harness = false` bench: build it here.
/// `EDGEBRIDGE_BENCH_BINARY` names a binary to measure instead, unbuilt (A/B runs of
/// two builds).
pub fn build_gateway() -> Result<PathBuf, String> {
    if let Ok(binary) = std::env::var("EDGEBRIDGE_BENCH_BINARY") {
        let binary = PathBuf::from(binary);
        return if binary.is_file() {
            Ok(binary)
        } else {
            Err(format!(
                "EDGEBRIDGE_BENCH_BINARY: {} is not a file",
                binary.display()
            ))
        };
    }
    eprintln!("building target/release/edgebridge …");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "edgebridge"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release --bin edgebridge: {status}"));
    }
    // This bench runs from <target>/release/deps/; the binary is in <target>/release/.
    let beside_bench = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("edgebridge")));
    let fallback = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/edgebridge");
    [beside_bench, Some(fallback)]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or_else(|| "built, but target/release/edgebridge was not found".into())
}

/// Ctrl-C or SIGTERM: returning drops every guard, which kills the child processes.
pub async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// A multi-thread tokio runtime for a bench's `main`.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Starts `binary run --config config_path` with its output appended to `log`, and waits
/// (up to `limit`) until its admin endpoint on `admin_port` answers `/readyz` 200.
pub async fn launch_gateway(
    binary: &Path,
    config_path: &Path,
    log: &Path,
    admin_port: u16,
    limit: Duration,
) -> Result<ChildGuard, String> {
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("open {}: {e}", log.display()))
    };
    let child = Command::new(binary)
        .arg("run")
        .arg("--config")
        .arg(config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
    let mut process = ChildGuard { child };
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if process.has_exited() {
            return Err(format!("edgebridge exited at start:\n{}", tail(log, 20)));
        }
        if matches!(http_get(admin_port, "/readyz"), Some((200, _))) {
            return Ok(process);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("edgebridge not ready in time:\n{}", tail(log, 20)))
}

/// The lines every results file starts with: date, machine (with Mosquitto's version)
/// and the revision measured, each a markdown list item.
pub fn run_stamp() -> String {
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .unwrap_or_else(|| "unknown date".into());
    format!(
        "- date: {date}\n- machine: {}\n- revision: {}\n",
        machine_description(),
        revision()
    )
}

pub fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn machine_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // `mosquitto -h` exits non-zero, but its first line names the version.
    let mosquitto = Command::new(MOSQUITTO)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            text.lines().next().map(str::to_string)
        })
        .unwrap_or_else(|| "mosquitto (unknown version)".into());
    format!("nproc {cpus}, {model}; {mosquitto}")
}

fn revision() -> String {
    if let Ok(binary) = std::env::var("EDGEBRIDGE_BENCH_BINARY") {
        return format!(
            "the binary {binary} (EDGEBRIDGE_BENCH_BINARY), not a build of this checkout"
        );
    }
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    // Only what goes into the gateway binary matters to its numbers.
    let dirty = command_output(
        "git",
        &[
            "status",
            "--porcelain",
            "--",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ],
    )
    .is_some_and(|s| !s.is_empty());
    match (rev.is_empty(), dirty) {
        (true, _) => "unknown".into(),
        (false, true) => format!("{rev} + uncommitted changes in src/ or Cargo.*"),
        (false, false) => rev,
    }
}

/// CPU time of every process on the machine (utime + stime from `/proc/<pid>/stat`, in
/// clock ticks), and when it was read.
///
/// Not `/proc/stat`: on this VM its totals stood still for whole 10 s runs while the
/// bench alone kept a core 20% busy; per-process accounting stays right (the CPU µs/msg
/// columns use it too). Processes that exit between two samples are missed.
#[derive(Clone)]
pub struct MachineCpu {
    ticks: std::collections::HashMap<u32, u64>,
    at: std::time::Instant,
}

impl MachineCpu {
    pub fn sample() -> Option<Self> {
        let mut ticks = std::collections::HashMap::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // After the command name in parentheses: state is field 3, utime 14, stime 15.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let time = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            if let (Some(utime), Some(stime)) = (time(11), time(12)) {
                ticks.insert(pid, utime + stime);
            }
        }
        Some(Self {
            ticks,
            at: std::time::Instant::now(),
        })
    }

    /// Share of all cores busy between two samples, in percent.
    pub fn busy_percent(before: Option<Self>, after: Option<Self>) -> Option<f64> {
        let (b, a) = (before?, after?);
        let busy: u64 = a
            .ticks
            .iter()
            .map(|(pid, &t)| t.saturating_sub(b.ticks.get(pid).copied().unwrap_or(0)))
            .sum();
        // Clock ticks are USER_HZ, 100 per second on Linux.
        let cores = std::thread::available_parallelism().ok()?.get() as f64;
        let capacity = a.at.duration_since(b.at).as_secs_f64() * 100.0 * cores;
        (capacity > 0.0).then(|| busy as f64 * 100.0 / capacity)
    }
}
