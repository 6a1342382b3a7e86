//! Starts an in-process edgebridge for a test: data_dir in a temp dir, device listener and
//! admin endpoint on free ports. Included with `#[path = "common/gateway.rs"] mod gateway;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use edgebridge::app::Gateway;
use edgebridge::config;

/// Sinks and rules for tests about the broker itself: everything to `{dir}/out.ndjson`.
pub const FILE_SINK: &str = r##"
[sinks.local]
type = "file"
path = "{dir}/out.ndjson"

[[rules]]
name = "all"
from = "#"
to = ["local"]
"##;

pub struct TestGateway {
    pub gateway: Option<Gateway>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl TestGateway {
    /// `body` holds the sinks and rules (and may add `[[listeners]]` or `[admin]` of its
    /// own); `{dir}` in it is replaced by the temp dir.
    pub async fn start(body: &str) -> TestGateway {
        Self::start_in(body, tempfile::tempdir().expect("tempdir for the gateway")).await
    }

    /// As [`TestGateway::start`], in `dir` (a restart reuses the previous one's dir and so
    /// its data_dir, `{dir}/data`).
    pub async fn start_in(body: &str, dir: tempfile::TempDir) -> TestGateway {
        let data_dir = dir.path().join("data");
        Self::start_full(body, dir, &data_dir).await
    }

    /// With data_dir elsewhere (e.g. on a small tmpfs).
    pub async fn start_with_data_dir(body: &str, data_dir: &std::path::Path) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir for the gateway");
        Self::start_full(body, dir, data_dir).await
    }

    async fn start_full(
        body: &str,
        dir: tempfile::TempDir,
        data_dir: &std::path::Path,
    ) -> TestGateway {
        let body = body.replace("{dir}", &dir.path().display().to_string());
        let listeners = if body.contains("[[listeners]]") {
            String::new()
        } else {
            "[[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:0\"\n".to_string()
        };
        // A body with an `[admin]` table of its own binds it to port 0 itself.
        let admin = if body.contains("[admin]") {
            ""
        } else {
            "[admin]\nbind = \"127.0.0.1:0\"\n"
        };
        let toml = format!(
            "[gateway]\nid = \"edge-01\"\ndata_dir = \"{}\"\nshutdown_grace = \"2s\"\n\
             {admin}{listeners}{body}",
            data_dir.display()
        );
        let path = dir.path().join("edgebridge.toml");
        std::fs::write(&path, toml).expect("write config");
        let config = config::load(&path).unwrap_or_else(|e| panic!("config:\n{e}"));
        let plan = config::validate(&config).unwrap_or_else(|e| panic!("config:\n{e}"));
        let gateway = Gateway::start(plan).await.expect("gateway starts");
        let addr = gateway.listeners[0].1;
        TestGateway {
            gateway: Some(gateway),
            dir,
            addr,
        }
    }

    /// The lines of sink `sink`'s dead-letter file (none when it does not exist), for a
    /// gateway whose data_dir is `{dir}/data`.
    pub fn dead_letters(&self, sink: &str) -> Vec<serde_json::Value> {
        let path = self
            .dir
            .path()
            .join("data/dead_letter")
            .join(format!("{sink}.ndjson"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a dead-letter line is JSON"))
            .collect()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn gw(&self) -> &Gateway {
        self.gateway.as_ref().expect("gateway running")
    }

    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.gw().metrics.render(), name, labels)
    }

    pub async fn shutdown(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
    }

    /// Polls sample `name{labels}` every 50 ms until it reads `want` or `timeout` passes,
    /// and returns the last value read, for an `assert_eq!` with `want` that shows what
    /// was there. For a metric another task updates after the effect a test can see (a
    /// socket closes before its refusal is counted): a single read right after races it.
    pub async fn counter_until(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        timeout: Duration,
    ) -> f64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.counter(name, labels);
            if value == want || tokio::time::Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `cond` every 50 ms until it holds or `timeout` passes.
    pub async fn eventually(&self, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if cond(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cond(self)
    }
}

/// The value of one sample in Prometheus text, or 0 when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// `GET path` over a real socket; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within 30 s"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: not HTTP: {text}"));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status in {head}"));
    (code, body.to_string())
}

pub async fn status(addr: SocketAddr) -> Value {
    let (code, body) = http_get(addr, "/api/v1/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("status is not JSON ({e}): {body}"))
}

/// The status entry of sink `name`.
pub fn sink<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["sinks"]
        .as_array()
        .and_then(|sinks| sinks.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no sink {name} in {status:#}"))
}

/// Polls the status until `cond` holds; panics with the last status after `timeout`.
pub async fn status_until(
    addr: SocketAddr,
    timeout: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(addr).await;
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "status never matched:\n{s:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
