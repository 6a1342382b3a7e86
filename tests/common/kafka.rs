//! A real Kafka-protocol broker (tansu, installed by the README's test command) and an
//! rdkafka consumer to check what arrived. Included with
//! `#[path = "common/kafka.rs"] mod kafka;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The tansu binary: on PATH, or where `cargo install` puts it.
fn tansu_binary() -> PathBuf {
    let in_cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin/tansu"));
    if let Some(p) = in_cargo_home.filter(|p| p.is_file()) {
        return p;
    }
    PathBuf::from("tansu")
}

/// `tansu broker` with in-memory storage on 127.0.0.1:`port`; killed on drop.
pub struct Tansu {
    child: Child,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Tansu {
    pub fn start() -> Tansu {
        Self::start_on(crate::common::free_port())
    }

    pub fn start_on(port: u16) -> Tansu {
        Self::start_advertising(port, port)
    }

    /// Listening on `port`, but telling clients (in metadata) that it is at
    /// 127.0.0.1:`advertised`: a proxy there then carries every connection a Kafka
    /// client makes after its bootstrap.
    pub fn start_advertising(port: u16, advertised: u16) -> Tansu {
        let log = tempfile::NamedTempFile::new().expect("tansu log file");
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let child = Command::new(tansu_binary())
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &advertised])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start tansu ({e}); install it: cargo install tansu --locked --features dynostore")
            });
        let tansu = Tansu { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen:\n{}",
                tansu.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        tansu
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// tansu does not create topics on first use. Three partitions, as tansu's default.
    pub fn create_topic(&self, name: &str) {
        let out = Command::new(tansu_binary())
            .args(["topic", "create", name, "--partitions", "3", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .output()
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Reads partitions 0..3 of `topics` (those that exist) from the beginning until `n` records arrived or `timeout`
/// passed (blocking: call from `spawn_blocking`).
pub fn consume(bootstrap: &str, topics: &[&str], n: usize, timeout: Duration) -> Vec<Record> {
    consume_with(bootstrap, &[], topics, n, timeout)
}

/// As [`consume`], with more client settings (`security.protocol` and the like).
pub fn consume_with(
    bootstrap: &str,
    settings: &[(&str, &str)],
    topics: &[&str],
    n: usize,
    timeout: Duration,
) -> Vec<Record> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "edgebridge-test")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        for partition in 0..3 {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("assign");
        }
    }
    consumer.assign(&assignment).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < n && Instant::now() < deadline {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Ok(m) = result else { continue };
        let mut headers = BTreeMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).to_string())
                    .unwrap_or_default();
                headers.insert(header.key.to_string(), value);
            }
        }
        out.push(Record {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: m.key().map(|k| String::from_utf8_lossy(k).to_string()),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    out
}

/// [`consume`] off the async runtime.
pub async fn consume_async(
    bootstrap: &str,
    topics: &[&str],
    n: usize,
    timeout: Duration,
) -> Vec<Record> {
    let bootstrap = bootstrap.to_string();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consume(&bootstrap, &topics, n, timeout)
    })
    .await
    .expect("consumer task")
}

/// A TLS front for tansu (which speaks plain TCP only): terminates mutual TLS with the
/// test CA's server certificate on `port` and carries each connection to tansu at
/// `upstream`, recording the client certificate (DER) each connection presented. Start
/// tansu advertising `port` so that every connection of a client goes through it.
pub struct TlsFront {
    pub port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    pub async fn start(certs: &crate::common::TestCerts, port: u16, upstream: u16) -> TlsFront {
        let config = crate::common::tls_server_config(certs, true);
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the TLS front");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recording = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, recording) = (acceptor.clone(), recording.clone());
                tokio::spawn(async move {
                    // A refused handshake just closes.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        recording.lock().expect("seen lock").push(cert.to_vec());
                    }
                    let Ok(mut kafka) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut kafka).await;
                });
            }
        });
        TlsFront { port, seen, task }
    }

    /// The client certificates of the connections so far, in order.
    pub fn client_certificates(&self) -> Vec<Vec<u8>> {
        self.seen.lock().expect("seen lock").clone()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
