//! Shared integration-test harness: certificates, a real Mosquitto broker, an MQTT
//! collector and sequence-numbered publishers. Included with `mod common;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::ExtendedKeyUsagePurpose as Eku;
use rcgen::KeyUsagePurpose as Ku;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode as SubAckCode,
    TlsConfiguration, Transport,
};

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
    l.expect("bind 127.0.0.1:0").port()
}

/// A throwaway PKI in a temp dir: CA, server cert (localhost, 127.0.0.1), client cert (CN edge-01).
pub struct TestCerts {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A server certificate like `server_cert` (same CA, same names) that expired in 2021.
    pub expired_server_cert: PathBuf,
    pub expired_server_key: PathBuf,
    /// The CA's certificate and key, to issue more certificates.
    pub ca_signer: Arc<(rcgen::Certificate, KeyPair)>,
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().expect("tempdir for certs");
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            fs::write(&p, pem).expect("write pem");
            p
        };
        let ca_key = KeyPair::generate().expect("ca key");
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "test CA");
        p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
        let ca = p.self_signed(&ca_key).expect("self-sign CA");
        let leaf = |sans: Vec<String>, cn: &str, eku: Eku, expired: bool| {
            let key = KeyPair::generate().expect("leaf key");
            let mut p = CertificateParams::new(sans).expect("leaf params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![Ku::DigitalSignature];
            p.extended_key_usages = vec![eku];
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let cert = p.signed_by(&key, &ca, &ca_key).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let (srv, srv_key) = leaf(sans.clone(), "localhost", Eku::ServerAuth, false);
        let (old, old_key) = leaf(sans, "localhost", Eku::ServerAuth, true);
        let (cli, cli_key) = leaf(vec![], "edge-01", Eku::ClientAuth, false);
        TestCerts {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", srv),
            server_key: write("server.key", srv_key),
            client_cert: write("client.pem", cli),
            client_key: write("client.key", cli_key),
            expired_server_cert: write("expired-server.pem", old),
            expired_server_key: write("expired-server.key", old_key),
            dir,
            ca_signer: Arc::new((ca, ca_key)),
        }
    }

    /// A new client certificate and key (PEM) from the test CA, with `cn` as its CN (the
    /// username Mosquitto's mutual TLS mode gives the client).
    pub fn client_certificate(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().expect("client key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("client params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![Ku::DigitalSignature];
        p.extended_key_usages = vec![Eku::ClientAuth];
        let cert = p
            .signed_by(&key, &self.ca_signer.0, &self.ca_signer.1)
            .expect("sign client certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// A TLS server config with the test CA's server certificate for the test servers that
/// stand in for an upstream (HTTP, AWS's limits); `require_client_cert` = mutual TLS.
pub fn tls_server_config(certs: &TestCerts, require_client_cert: bool) -> rustls::ServerConfig {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |p: &Path| fs::read(p).expect("read pem");
    let chain: Vec<_> = rustls_pemfile::certs(&mut read(&certs.server_cert).as_slice())
        .collect::<Result<_, _>>()
        .expect("server cert");
    let key = rustls_pemfile::private_key(&mut read(&certs.server_key).as_slice())
        .expect("server key")
        .expect("a key");
    let builder = rustls::ServerConfig::builder();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        for ca in rustls_pemfile::certs(&mut read(&certs.ca).as_slice()) {
            roots.add(ca.expect("ca cert")).expect("add ca");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .expect("client verifier");
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    builder
        .with_single_cert(chain, key)
        .expect("server TLS config")
}

/// Broker listener mode; also used by [`client_options`] to build a matching client.
#[derive(Clone, Copy)]
pub enum Mode<'a> {
    Plain,
    /// TLS; clients verify the server against the CA, no client certificate required.
    Tls(&'a TestCerts),
    /// TLS with a required client certificate signed by the CA; its CN is the username.
    MutualTls(&'a TestCerts),
}

/// rumqttc options for 127.0.0.1:`port` matching `mode` (CA-verified TLS, client cert for mTLS).
pub fn client_options(client_id: &str, port: u16, mode: Mode<'_>) -> MqttOptions {
    let read_file = |p: &Path| fs::read(p).expect("read cert/key");
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (certs, client_auth) = match mode {
        Mode::Plain => return o,
        Mode::Tls(c) => (c, None),
        Mode::MutualTls(c) => (
            c,
            Some((read_file(&c.client_cert), read_file(&c.client_key))),
        ),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    o.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: read_file(&certs.ca),
        alpn: None,
        client_auth,
    }));
    o
}

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A real `mosquitto -c <conf>` child on 127.0.0.1; killed on drop.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    /// The address it listens on: 127.0.0.1, or its address in `netns`.
    host: String,
    /// Runs inside this network namespace (`ip netns exec`).
    netns: Option<String>,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(mode: Mode<'_>) -> Mosquitto {
        Self::start_with(mode, false)
    }

    /// With `persistent`, sessions and queued messages survive [`Mosquitto::terminate`]
    /// and a restart (mosquitto saves its database on SIGTERM).
    pub fn start_with(mode: Mode<'_>, persistent: bool) -> Mosquitto {
        Self::start_at(mode, persistent, "127.0.0.1", None)
    }

    /// Inside network namespace `netns`, listening on `host` (its address there).
    pub fn start_in_netns(netns: &str, host: &str) -> Mosquitto {
        Self::start_at(Mode::Plain, false, host, Some(netns))
    }

    fn start_at(mode: Mode<'_>, persistent: bool, host: &str, netns: Option<&str>) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir for mosquitto");
        let port = free_port();
        // `user root`: as root mosquitto would otherwise drop to `mosquitto`, which cannot
        // read this 0700 temp dir. It has no effect for a non-root user.
        let mut conf = format!(
            "user root\nallow_anonymous true\npersistence false\n\
             max_queued_messages 0\nmax_inflight_messages 0\n\
             log_dest file {}\nlistener {port} {host}\n",
            dir.path().join("mosquitto.log").display()
        );
        if let Mode::Tls(c) | Mode::MutualTls(c) = mode {
            // Copies, so that a restart does not depend on the caller's TestCerts.
            let files = [("cafile", &c.ca), ("certfile", &c.server_cert)];
            for (opt, src) in files.into_iter().chain([("keyfile", &c.server_key)]) {
                let dst = dir.path().join(opt);
                fs::copy(src, &dst).expect("copy cert");
                conf += &format!("{opt} {}\n", dst.display());
            }
        }
        if let Mode::MutualTls(_) = mode {
            conf += "require_certificate true\nuse_identity_as_username true\n";
        }
        if persistent {
            conf = conf.replace("persistence false", "persistence true");
            conf += &format!("persistence_location {}/\n", dir.path().display());
        }
        fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            dir,
            port,
            host: host.to_string(),
            netns: netns.map(str::to_string),
            child: None,
        };
        m.spawn_until_ready();
        m
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything mosquitto logged, including its stderr (config errors land there).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn spawn_until_ready(&mut self) {
        let hint = "run README.md's test command, which installs it";
        assert!(Path::new(MOSQUITTO).exists(), "no {MOSQUITTO}: {hint}");
        let deadline = Instant::now() + Duration::from_secs(10);
        // Respawn while it exits early (e.g. the port is still held) until the deadline.
        while Instant::now() < deadline {
            // "running" is logged once every listener is bound: a bare TCP probe could be
            // answered by another process holding the port.
            let runs = self.logs().matches(" running").count();
            let path = self.dir.path().join("mosquitto.log");
            let log = fs::OpenOptions::new().create(true).append(true).open(path);
            let mut command = match &self.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, MOSQUITTO]);
                    c
                }
                None => Command::new(MOSQUITTO),
            };
            let mut child = command
                .arg("-c")
                .arg(self.dir.path().join("mosquitto.conf"))
                .stdout(Stdio::null())
                .stderr(log.expect("open mosquitto.log"))
                .spawn()
                .expect("spawn mosquitto");
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                let running = self.logs().matches(" running").count() > runs;
                if running && TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "mosquitto not listening on {} after 10 s:\n{}",
            self.port,
            self.logs()
        );
    }

    /// SIGKILL and reap.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (mosquitto saves its persistence database) and reap.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Stop (if running) and start again on the same port with the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_until_ready();
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("mosquitto is not running").id();
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill {sig} {pid} failed");
    }

    /// SIGSTOP: the port keeps accepting TCP (backlog) but nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

pub type Msg = (String, Vec<u8>);

/// A QoS 1 subscriber with a persistent session that reconnects forever in the background.
pub struct Collector {
    msgs: Arc<Mutex<Vec<Msg>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Connects with `opts` (forced to clean_session = false; give it a fixed client id),
    /// subscribes to `filter` at QoS 1 and returns once the SUBACK arrived (10 s limit).
    pub async fn start(mut opts: MqttOptions, filter: &str) -> Collector {
        opts.set_clean_session(false);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let (subbed_tx, mut subbed_rx) = tokio::sync::watch::channel(false);
        let (sink, topics) = (msgs.clone(), filter.to_string());
        let task = tokio::spawn(async move {
            // Subscribe on the first CONNACK (to get a SUBACK even when resuming an old
            // session) and whenever the broker lost the session.
            let mut first = true;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if first || !ack.session_present => {
                        first = false;
                        client
                            .try_subscribe(topics.clone(), QoS::AtLeastOnce)
                            .expect("queue SUBSCRIBE");
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        subbed_tx.send_replace(!ack.return_codes.contains(&SubAckCode::Failure));
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = (p.topic, p.payload.to_vec());
                        sink.lock().expect("collector lock").push(msg);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        let subbed = tokio::time::timeout(Duration::from_secs(10), subbed_rx.wait_for(|ok| *ok));
        assert!(
            matches!(subbed.await, Ok(Ok(_))),
            "collector got no successful SUBACK for {filter} within 10 s"
        );
        Collector { msgs, task }
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().expect("collector lock").clone()
    }

    pub fn len(&self) -> usize {
        self.msgs.lock().expect("collector lock").len()
    }

    /// Polls every 50 ms until at least `n` messages arrived; false on timeout.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.len() >= n
    }

    /// Waits until `n` distinct sequence-numbered messages arrived: duplicates (possible
    /// after a reconnect) would make [`Collector::wait_for`] return early.
    pub async fn wait_for_unique(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let unique = |c: &Self| -> usize {
            let report = check_sequences(&c.messages());
            report.per_device_count.values().sum::<u64>() as usize
        };
        while unique(self) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unique(self) >= n
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `{"device":D,"seq":S}`
pub fn seq_payload(device: u32, seq: u64) -> Vec<u8> {
    format!("{{\"device\":{device},\"seq\":{seq}}}").into_bytes()
}

/// `{"device":D,"seq":S,"pad":"…"}` with `pad` random characters of 64 kinds: about as
/// many bytes on the wire whatever the upstream compresses with (Kafka's LZ4 halved
/// random hex, whose 4-byte sequences repeat within its 64 KiB window).
pub fn padded_seq_payload(device: u32, seq: u64, pad: usize) -> Vec<u8> {
    if pad == 0 {
        return seq_payload(device, seq);
    }
    const CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let text: String = (0..pad)
        .map(|_| char::from(CHARS[rand::random_range(0..64)]))
        .collect();
    format!("{{\"device\":{device},\"seq\":{seq},\"pad\":\"{text}\"}}").into_bytes()
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqReport {
    /// Distinct seqs received per device.
    pub per_device_count: BTreeMap<u32, u64>,
    /// Seqs absent below each device's highest seq (seqs start at 0; losses after the
    /// highest received one show up only in `per_device_count`).
    pub missing: u64,
    pub duplicates: u64,
    /// Lower than the highest seq already seen for the device, and not a duplicate.
    pub out_of_order: u64,
    /// Payloads that are not `{"device":..,"seq":..}`.
    pub unparsed: u64,
}

pub fn check_sequences(msgs: &[Msg]) -> SeqReport {
    let mut r = SeqReport::default();
    let mut seen: BTreeMap<u32, (HashSet<u64>, u64)> = BTreeMap::new();
    for (_, payload) in msgs {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        let (Some(d), Some(s)) = (v["device"].as_u64(), v["seq"].as_u64()) else {
            r.unparsed += 1;
            continue;
        };
        let (set, max) = seen.entry(d as u32).or_insert_with(|| (HashSet::new(), 0));
        if !set.insert(s) {
            r.duplicates += 1;
        } else if s < *max {
            r.out_of_order += 1;
        }
        *max = (*max).max(s);
    }
    for (d, (set, max)) in seen {
        r.per_device_count.insert(d, set.len() as u64);
        r.missing += max + 1 - set.len() as u64;
    }
    r
}

/// Publishes seqs `0..count` of `device` to `topic` on a plain broker; see [`publish_seq_with`].
pub async fn publish_seq(
    host: &str,
    port: u16,
    client_id: &str,
    topic: &str,
    device: u32,
    count: u64,
    qos: QoS,
) -> u64 {
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    publish_seq_with(opts, topic, device, 0..count, qos).await
}

/// Publishes [`seq_payload`]s for `seqs` as fast as an in-flight window of 100 allows and
/// drives the event loop until every one is acknowledged (PUBACK / PUBCOMP; for QoS 0: written)
/// or 120 s passed. Returns the number of acknowledgements received.
pub async fn publish_seq_with(
    opts: MqttOptions,
    topic: &str,
    device: u32,
    seqs: Range<u64>,
    qos: QoS,
) -> u64 {
    publish_padded_seq_with(opts, topic, device, seqs, 0, qos).await
}

/// As [`publish_seq_with`], with [`padded_seq_payload`]s of `pad` extra bytes.
pub async fn publish_padded_seq_with(
    mut opts: MqttOptions,
    topic: &str,
    device: u32,
    seqs: Range<u64>,
    pad: usize,
    qos: QoS,
) -> u64 {
    opts.set_inflight(100);
    let target = seqs.end.saturating_sub(seqs.start);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let topic = topic.to_string();
    let publisher = tokio::spawn(async move {
        for s in seqs {
            let payload = padded_seq_payload(device, s, pad);
            if client.publish(&topic, qos, false, payload).await.is_err() {
                return;
            }
        }
    });
    let mut acked = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked < target {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)))) => acked += 1,
            Ok(Ok(Event::Outgoing(Outgoing::Publish(_)))) if qos == QoS::AtMostOnce => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    publisher.abort();
    acked
}

/// An upstream with a persistent session for a collector subscribed to `up/#`, currently
/// stopped (SIGTERM: what is queued for the collector survives a restart).
pub async fn stopped_upstream() -> (Mosquitto, Collector) {
    let mut upstream = Mosquitto::start_with(Mode::Plain, true);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "up/#",
    )
    .await;
    upstream.terminate();
    (upstream, collector)
}

/// A tmpfs of `size` (as `mount -o size=`, e.g. "4m") on a temp dir; lazily unmounted on
/// drop. Needs root (the test command runs as root in CI).
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the test command runs as root in CI)"
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
