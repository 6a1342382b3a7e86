//! Device security with real clients (rumqttc over TCP, TLS, WebSocket and WSS;
//! mosquitto_pub): users and passwords, client certificates, ACLs with placeholders,
//! the idle-socket handshake test (DESIGN.md, rumqttd failure mode 3), connection limits,
//! listener certificate rotation without a restart, and secrets kept out of `check`. Traffic goes end to end to a real Mosquitto upstream.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Collector, Mode, Mosquitto};
use gateway::TestGateway;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_edgebridge");
const WAIT: Duration = Duration::from_secs(30);

/// A throwaway PKI: a CA with a server certificate and three client certificates (good,
/// expired, and one from another CA).
struct Pki {
    dir: tempfile::TempDir,
    /// The plant CA, to sign a renewed server certificate.
    ca: (rcgen::Certificate, KeyPair),
}

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem);
        let ca = |cn: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            (p.self_signed(&key).expect("ca"), key)
        };
        let (ca_cert, ca_key) = ca("plant CA");
        let (other_cert, other_key) = ca("someone else's CA");
        let leaf = |name: &str, sans: Vec<String>, cn: &str, expired: bool, by_other: bool| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(sans).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            if expired {
                p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                p.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let cert = if by_other {
                p.signed_by(&key, &other_cert, &other_key)
            } else {
                p.signed_by(&key, &ca_cert, &ca_key)
            }
            .expect("sign");
            write(&format!("{name}.pem"), cert.pem()).expect("write");
            write(&format!("{name}.key"), key.serialize_pem()).expect("write");
        };
        write("ca.pem", ca_cert.pem()).expect("write");
        let local = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        leaf("server", local, "localhost", false, false);
        leaf("plc", vec![], "plc-7", false, false);
        leaf("expired", vec![], "plc-8", true, false);
        leaf("stranger", vec![], "plc-9", false, true);
        Pki {
            dir,
            ca: (ca_cert, ca_key),
        }
    }

    /// A new server certificate and key from the same CA (a renewal), put in place of the
    /// old files by rename, as renewal tools do. Returns the certificate (DER).
    fn renew_server(&self) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
        p.distinguished_name
            .push(DnType::CommonName, "localhost renewed");
        let cert = p.signed_by(&key, &self.ca.0, &self.ca.1).expect("sign");
        for (name, pem) in [
            ("server.key", key.serialize_pem()),
            ("server.pem", cert.pem()),
        ] {
            let tmp = self.path(&format!("{name}.new"));
            std::fs::write(&tmp, pem).expect("write");
            std::fs::rename(&tmp, self.path(name)).expect("rename");
        }
        cert.der().to_vec()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("read pem")
    }

    /// TLS settings for a device: our CA, and the client certificate `client` if any.
    fn client_tls(&self, client: Option<&str>) -> TlsConfiguration {
        let _ = rustls::crypto::ring::default_provider().install_default();
        TlsConfiguration::Simple {
            ca: self.read("ca.pem"),
            alpn: None,
            client_auth: client.map(|c| {
                (
                    self.read(&format!("{c}.pem")),
                    self.read(&format!("{c}.key")),
                )
            }),
        }
    }
}

/// `edgebridge passwd` through the real binary: with the password as an argument, or on
/// stdin when `password` is `Err(line)`.
fn passwd(file: &Path, user: &str, password: Result<&str, &str>) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("passwd").arg(file).arg(user);
    if let Ok(p) = password {
        cmd.arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run edgebridge passwd");
    if let Err(line) = password {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(line.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("passwd exits");
    assert!(out.status.success(), "passwd failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The users every test uses: plc-1 (password on the command line), plc-2 (on stdin),
/// admin.
fn users_file(dir: &Path) -> PathBuf {
    let file = dir.join("users.toml");
    let added = passwd(&file, "plc-1", Ok("pw-1"));
    assert!(added.contains("added"), "{added}");
    passwd(&file, "plc-2", Err("pw-2\n"));
    passwd(&file, "admin", Ok("first"));
    let changed = passwd(&file, "admin", Ok("admin-pw"));
    assert!(changed.contains("changed"), "{changed}");
    file
}

/// Everything from devices goes to the upstream Mosquitto unchanged.
fn config(pki: &Pki, users: &Path, upstream: u16, listeners: &str) -> String {
    let cert = pki.path("server.pem").display().to_string();
    let key = pki.path("server.key").display().to_string();
    let ca = pki.path("ca.pem").display().to_string();
    let listeners = listeners
        .replace("{cert}", &cert)
        .replace("{key}", &key)
        .replace("{ca}", &ca);
    format!(
        r##"{listeners}
[auth]
users_file = "{users}"

[[auth.acl]]
publish = ["plant/{{username}}/#"]
subscribe = ["cmd/{{client_id}}/#"]

[[auth.acl]]
cn = "plc-*"
publish = ["site/{{cn}}/#"]

[[auth.acl]]
user = "admin"
publish = ["#"]
subscribe = ["#"]

[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{upstream}"
backoff_min = "50ms"
backoff_max = "500ms"

[[rules]]
name = "all"
from = "#"
to = ["cloud"]
"##,
        users = users.display()
    )
}

const ALL_LISTENERS: &str = r#"
[[listeners]]
name = "tcp"
bind = "127.0.0.1:0"

[[listeners]]
name = "local"
bind = "127.0.0.1:0"
allow_anonymous = true

[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
tls = { cert = "{cert}", key = "{key}" }

[[listeners]]
name = "mtls"
bind = "127.0.0.1:0"
tls = { cert = "{cert}", key = "{key}", client_ca = "{ca}" }

[[listeners]]
name = "ws"
bind = "127.0.0.1:0"
websocket = true

[[listeners]]
name = "wss"
bind = "127.0.0.1:0"
websocket = true
tls = { cert = "{cert}", key = "{key}" }
"#;

struct Setup {
    pki: Pki,
    /// Kept running for the test's length.
    _upstream: Mosquitto,
    collector: Collector,
    gw: TestGateway,
}

impl Setup {
    async fn start(listeners: &str) -> Setup {
        let pki = Pki::generate();
        let upstream = Mosquitto::start(Mode::Plain);
        let collector = Collector::start(
            common::client_options("collector", upstream.port(), Mode::Plain),
            "#",
        )
        .await;
        let users = users_file(pki.dir.path());
        let gw = TestGateway::start(&config(&pki, &users, upstream.port(), listeners)).await;
        Setup {
            pki,
            _upstream: upstream,
            collector,
            gw,
        }
    }

    fn addr(&self, listener: &str) -> SocketAddr {
        self.gw
            .gw()
            .listeners
            .iter()
            .find(|(name, _)| name == listener)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    /// rumqttc options for a device on `listener` (TLS/WebSocket as the listener wants).
    fn device(&self, listener: &str, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
        let addr = self.addr(listener);
        let port = addr.port();
        let mut o = match listener {
            "ws" | "wss" => {
                let scheme = if listener == "ws" { "ws" } else { "wss" };
                let host = if listener == "wss" {
                    "localhost"
                } else {
                    "127.0.0.1"
                };
                MqttOptions::new(id, format!("{scheme}://{host}:{port}/mqtt"), port)
            }
            _ => MqttOptions::new(id, "127.0.0.1", port),
        };
        o.set_keep_alive(Duration::from_secs(5));
        match listener {
            "tls" => o.set_transport(Transport::Tls(self.pki.client_tls(None))),
            "mtls" => o.set_transport(Transport::Tls(self.pki.client_tls(Some("plc")))),
            "ws" => o.set_transport(Transport::Ws),
            "wss" => o.set_transport(Transport::Wss(self.pki.client_tls(None))),
            _ => &mut o,
        };
        if let Some((user, pass)) = login {
            o.set_credentials(user, pass);
        }
        o
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.gw.counter(name, labels)
    }
}

/// Connects and returns the CONNACK outcome with the live client (on success).
async fn connect(opts: MqttOptions) -> Result<(AsyncClient, rumqttc::EventLoop), String> {
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) if ack.code == ConnectReturnCode::Success => {
            Ok((client, eventloop))
        }
        Ok(Ok(other)) => Err(format!("unexpected {other:?}")),
        Ok(Err(ConnectionError::ConnectionRefused(code))) => Err(format!("refused {code:?}")),
        Ok(Err(e)) => Err(format!("error {e}")),
        Err(_) => Err("no CONNACK within 30 s".into()),
    }
}

/// Publishes `(topic, qos)` pairs and drives the event loop until each QoS 1 one is acked
/// (and QoS 0 ones written).
async fn publish_all(
    client: &AsyncClient,
    eventloop: &mut rumqttc::EventLoop,
    msgs: &[(&str, QoS)],
) {
    for (i, (topic, qos)) in msgs.iter().enumerate() {
        client
            .publish(*topic, *qos, false, format!("m{i}"))
            .await
            .expect("queue publish");
    }
    let mut pending = msgs.len();
    let deadline = tokio::time::Instant::now() + WAIT;
    while pending > 0 {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => pending -= 1,
            Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(0)))) => pending -= 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed while publishing: {e}"),
            Err(_) => panic!("{pending} publishes not acknowledged within 30 s"),
        }
    }
}

/// Subscribes to `filters` (QoS 1) and returns the SUBACK's codes.
async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut rumqttc::EventLoop,
    filters: &[&str],
) -> Vec<SubscribeReasonCode> {
    let filters = filters
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
    client
        .subscribe_many(filters)
        .await
        .expect("queue subscribe");
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => return ack.return_codes,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// Drives `eventloop` for `wait` and returns the topics of the PUBLISHes received.
async fn received(eventloop: &mut rumqttc::EventLoop, wait: Duration) -> Vec<String> {
    let mut topics = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(event) = tokio::time::timeout_at(deadline, eventloop.poll()).await {
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => topics.push(p.topic),
            Ok(_) => {}
            Err(e) => panic!("subscriber connection failed: {e}"),
        }
    }
    topics
}

fn upstream_topics(collector: &Collector) -> Vec<String> {
    let mut t: Vec<String> = collector.messages().into_iter().map(|(t, _)| t).collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passwords_right_wrong_and_missing() {
    let s = Setup::start(ALL_LISTENERS).await;
    let ok = connect(s.device("tcp", "d1", Some(("plc-1", "pw-1")))).await;
    assert!(ok.is_ok(), "right password: {:?}", ok.err());
    let ok = connect(s.device("tcp", "d2", Some(("plc-2", "pw-2")))).await;
    assert!(ok.is_ok(), "password set from stdin: {:?}", ok.err());
    for (login, why) in [
        (Some(("plc-1", "pw-2")), "wrong password"),
        (Some(("plc-1", "")), "empty password"),
        (Some(("nobody", "pw-1")), "unknown user"),
    ] {
        let refused = connect(s.device("tcp", "d3", login)).await;
        assert_eq!(
            refused.err().as_deref(),
            Some("refused BadUserNamePassword"),
            "{why}"
        );
    }
    let refused = connect(s.device("tcp", "d4", None)).await;
    assert_eq!(refused.err().as_deref(), Some("refused NotAuthorized"));
    // The same anonymous device on the listener that allows it.
    let ok = connect(s.device("local", "d4", None)).await;
    assert!(ok.is_ok(), "anonymous on allow_anonymous: {:?}", ok.err());

    // mosquitto_pub as a second client implementation: exit status tells.
    let port = s.addr("tcp").port().to_string();
    let pub_with = |user: &str, pass: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-i", "mosq-1"])
            .args(["-u", user, "-P", pass, "-t", "plant/plc-1/mosq", "-m", "hi"])
            .output()
            .expect("mosquitto_pub is installed")
            .status
            .success()
    };
    assert!(pub_with("plc-1", "pw-1"));
    assert!(!pub_with("plc-1", "nope"));
    assert!(
        s.collector.wait_for(1, WAIT).await,
        "mosquitto_pub's message reaches the upstream"
    );
    assert_eq!(upstream_topics(&s.collector), ["plant/plc-1/mosq"]);

    let refused = |reason| {
        s.counter(
            "edgebridge_connections_refused_total",
            &[("listener", "tcp"), ("reason", reason)],
        )
    };
    assert_eq!(refused("bad_credentials"), 4.0);
    assert_eq!(refused("not_authorized"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acl_allows_and_denies_publish_and_subscribe_with_placeholders() {
    let s = Setup::start(ALL_LISTENERS).await;
    let (plc, mut plc_loop) = connect(s.device("tcp", "dev-1", Some(("plc-1", "pw-1"))))
        .await
        .expect("plc-1 connects");
    // Subscribe: only cmd/{client_id}/# is granted; a denied filter fails on its own.
    let codes = subscribe(&plc, &mut plc_loop, &["cmd/dev-1/#", "cmd/dev-2/#", "#"]).await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure
        ]
    );
    // Publish: plant/{username}/# only; denied ones are acknowledged (3.1.1) and dropped.
    publish_all(
        &plc,
        &mut plc_loop,
        &[
            ("plant/plc-1/temp", QoS::AtLeastOnce),
            ("plant/plc-2/temp", QoS::AtLeastOnce),
            ("plant/plc-1/hum", QoS::AtMostOnce),
            ("cmd/dev-2/reset", QoS::AtMostOnce),
            ("plant/plc-1x/temp", QoS::AtLeastOnce),
        ],
    )
    .await;
    // The admin may publish anywhere: a command for dev-1 and one for dev-2.
    let (admin, mut admin_loop) = connect(s.device("tcp", "ops", Some(("admin", "admin-pw"))))
        .await
        .expect("admin connects");
    publish_all(
        &admin,
        &mut admin_loop,
        &[
            ("cmd/dev-1/reset", QoS::AtLeastOnce),
            ("cmd/dev-2/reset", QoS::AtLeastOnce),
        ],
    )
    .await;
    let got = received(&mut plc_loop, Duration::from_secs(2)).await;
    assert_eq!(
        got,
        ["cmd/dev-1/reset"],
        "dev-1 reads only its own commands"
    );

    assert!(s.collector.wait_for(4, WAIT).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        upstream_topics(&s.collector),
        [
            "cmd/dev-1/reset",
            "cmd/dev-2/reset",
            "plant/plc-1/hum",
            "plant/plc-1/temp"
        ],
        "denied publishes are never forwarded"
    );
    // 2 denied filters + 3 denied publishes.
    assert_eq!(
        s.counter("edgebridge_acl_denied_total", &[("listener", "tcp")]),
        5.0
    );
    // The connection survived every denial.
    publish_all(
        &plc,
        &mut plc_loop,
        &[("plant/plc-1/after", QoS::AtLeastOnce)],
    )
    .await;
    assert!(s.collector.wait_for(5, WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_devices_get_not_authorized_reason_codes() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode as Sub5};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as Client5, Event as E5, MqttOptions as Opts5};
    let s = Setup::start(ALL_LISTENERS).await;
    let mut o = Opts5::new("dev-5", "127.0.0.1", s.addr("tcp").port());
    o.set_credentials("plc-2", "pw-2");
    let (client, mut eventloop) = Client5::new(o, 10);
    client
        .subscribe("cmd/other/#", Q5::AtLeastOnce)
        .await
        .expect("queue");
    client
        .publish("plant/plc-1/spoof", Q5::AtLeastOnce, false, "x")
        .await
        .expect("queue");
    client
        .publish("plant/plc-2/ok", Q5::AtLeastOnce, false, "y")
        .await
        .expect("queue");
    let (mut suback, mut pubacks) = (None, Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    while suback.is_none() || pubacks.len() < 2 {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(E5::Incoming(P5::SubAck(a)))) => suback = Some(a.return_codes),
            Ok(Ok(E5::Incoming(P5::PubAck(a)))) => pubacks.push(a.reason),
            Ok(Ok(_)) => {}
            other => panic!("v5 device: {other:?}"),
        }
    }
    assert_eq!(suback, Some(vec![Sub5::NotAuthorized]));
    assert_eq!(
        pubacks,
        [PubAckReason::NotAuthorized, PubAckReason::Success]
    );
    assert!(s.collector.wait_for(1, WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream_topics(&s.collector), ["plant/plc-2/ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_accepted_and_refused() {
    let s = Setup::start(ALL_LISTENERS).await;
    // A certificate from our CA authenticates without a password; its CN fills {cn}.
    let (dev, mut ev) = connect(s.device("mtls", "press", None))
        .await
        .expect("a good client certificate is accepted");
    publish_all(
        &dev,
        &mut ev,
        &[
            ("site/plc-7/load", QoS::AtLeastOnce),
            ("site/plc-8/load", QoS::AtLeastOnce),
        ],
    )
    .await;
    assert!(s.collector.wait_for(1, WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream_topics(&s.collector), ["site/plc-7/load"]);

    let mtls = s.addr("mtls").port();
    for (cert, why) in [
        (None, "no client certificate"),
        (Some("stranger"), "a certificate from another CA"),
        (Some("expired"), "an expired certificate"),
    ] {
        let mut o = MqttOptions::new("press-x", "127.0.0.1", mtls);
        o.set_transport(Transport::Tls(s.pki.client_tls(cert)));
        let result = connect(o).await;
        assert!(result.is_err(), "{why} must be refused");
    }
    let handshakes =
        s.gw.eventually(WAIT, |g| {
            g.counter(
                "edgebridge_connections_refused_total",
                &[("listener", "mtls"), ("reason", "handshake")],
            ) == 3.0
        })
        .await;
    assert!(handshakes, "three failed handshakes counted");
    // The listener still serves good devices.
    assert!(connect(s.device("mtls", "press-2", None)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_ws_and_wss_listeners_carry_traffic_to_the_upstream() {
    let s = Setup::start(ALL_LISTENERS).await;
    for listener in ["tls", "ws", "wss"] {
        let (client, mut ev) = connect(s.device(
            listener,
            &format!("via-{listener}"),
            Some(("plc-1", "pw-1")),
        ))
        .await
        .unwrap_or_else(|e| panic!("{listener}: {e}"));
        let topic = format!("plant/plc-1/{listener}");
        let msgs: Vec<(&str, QoS)> = (0..50)
            .map(|_| (topic.as_str(), QoS::AtLeastOnce))
            .collect();
        publish_all(&client, &mut ev, &msgs).await;
        // Commands come back down the same transport.
        let codes = subscribe(&client, &mut ev, &[&format!("cmd/via-{listener}/#")]).await;
        assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    }
    assert!(
        s.collector.wait_for(150, WAIT).await,
        "150 messages upstream"
    );
    let topics = upstream_topics(&s.collector);
    for listener in ["tls", "ws", "wss"] {
        let n = topics.iter().filter(|t| t.ends_with(listener)).count();
        assert_eq!(n, 50, "{listener}");
    }
    // A WebSocket upgrade on another path is refused.
    let ws = s.addr("ws");
    let mut o = MqttOptions::new(
        "lost",
        format!("ws://127.0.0.1:{}/other", ws.port()),
        ws.port(),
    );
    o.set_transport(Transport::Ws);
    o.set_credentials("plc-1", "pw-1");
    assert!(connect(o).await.is_err(), "only /mqtt serves MQTT");
}

/// rumqttd failure mode 3: its TLS/WebSocket handshakes run in the accept loop, so one
/// silent socket blocks every later device. Here each handshake has its own task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idle_socket_never_blocks_tls_or_websocket_devices() {
    let listeners = ALL_LISTENERS
        .replace(
            "name = \"wss\"",
            "name = \"wss\"\nconnect_timeout = \"15s\"",
        )
        .replace(
            "name = \"tls\"",
            "name = \"tls\"\nconnect_timeout = \"15s\"",
        )
        .replace(
            "name = \"ws\"\n",
            "name = \"ws\"\nconnect_timeout = \"15s\"\n",
        );
    let s = Setup::start(&listeners).await;
    let mut silent = Vec::new();
    for listener in ["tls", "ws", "wss"] {
        // Silent: no ClientHello, no HTTP upgrade. And one that stops half-way: a TLS
        // record header, or the start of an HTTP upgrade.
        let idle = TcpStream::connect(s.addr(listener)).await.expect("connect");
        let mut half = TcpStream::connect(s.addr(listener)).await.expect("connect");
        let start: &[u8] = if listener == "ws" {
            b"GET /mqtt HTTP/1.1\r\nHost: x\r\n"
        } else {
            b"\x16\x03\x01\x00"
        };
        tokio::io::AsyncWriteExt::write_all(&mut half, start)
            .await
            .expect("write");
        silent.push((listener, idle, half));
    }
    let mut buf = [0u8; 1];
    for (listener, idle, half) in &mut silent {
        let device = connect(s.device(
            listener,
            &format!("after-idle-{listener}"),
            Some(("plc-1", "pw-1")),
        ))
        .await;
        assert!(device.is_ok(), "{listener}: {:?}", device.err());
        // The silent sockets were still open while the device got in.
        for (name, socket) in [("idle", idle), ("half", half)] {
            let still_open =
                tokio::time::timeout(Duration::from_millis(100), socket.read(&mut buf)).await;
            assert!(
                still_open.is_err(),
                "{listener}: the {name} socket was still open"
            );
        }
    }
    // And the handshake timeout closes them.
    for (listener, idle, half) in &mut silent {
        for socket in [idle, half] {
            let closed = tokio::time::timeout(WAIT, socket.read(&mut buf)).await;
            assert!(
                matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
                "{listener}: silent socket closed"
            );
        }
    }
    // The listener counts a refusal after it dropped the socket: the close can be seen
    // before the count.
    for listener in ["tls", "ws", "wss"] {
        let timed_out =
            s.gw.counter_until(
                "edgebridge_connections_refused_total",
                &[("listener", listener), ("reason", "handshake")],
                2.0,
                WAIT,
            )
            .await;
        assert_eq!(timed_out, 2.0, "{listener}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_limit_on_a_tls_listener_is_reached_then_freed() {
    let listeners = r#"
[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
max_connections = 2
tls = { cert = "{cert}", key = "{key}" }
"#;
    let s = Setup::start(listeners).await;
    let login = Some(("plc-1", "pw-1"));
    let first = connect(s.device("tls", "one", login)).await.expect("first");
    let _second = connect(s.device("tls", "two", login))
        .await
        .expect("second");
    for _ in 0..2 {
        let third = connect(s.device("tls", "three", login)).await;
        assert_eq!(third.err().as_deref(), Some("refused ServiceUnavailable"));
    }
    drop(first);
    let freed =
        s.gw.eventually(WAIT, |g| {
            g.counter("edgebridge_connections", &[("listener", "tls")]) == 1.0
        })
        .await;
    assert!(freed, "a closed connection frees its slot");
    assert!(connect(s.device("tls", "three", login)).await.is_ok());
    assert_eq!(
        s.counter(
            "edgebridge_connections_refused_total",
            &[("listener", "tls"), ("reason", "max_connections")]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_and_logs_never_show_passwords_hashes_or_keys() {
    let pki = Pki::generate();
    let users = users_file(pki.dir.path());
    let body = config(&pki, &users, 1883, ALL_LISTENERS);
    let file = pki.dir.path().join("edgebridge.toml");
    std::fs::write(
        &file,
        format!(
            "[gateway]\ndata_dir = \"{}\"\n{body}",
            pki.path("data").display()
        ),
    )
    .expect("write config");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("run check");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("wss://127.0.0.1:0"), "{text}");
    assert!(text.contains("key=****"), "{text}");
    let hashes = std::fs::read_to_string(&users).expect("users");
    for secret in hashes.lines().filter_map(|l| l.split('"').nth(1)) {
        assert!(!text.contains(secret), "a hash leaked: {text}");
    }
    let key = std::fs::read_to_string(pki.path("server.key")).expect("key");
    let key_line = key.lines().nth(1).expect("key body");
    assert!(!text.contains(key_line), "{text}");
    for password in ["pw-1", "pw-2", "admin-pw"] {
        assert!(!text.contains(password), "{text}");
    }

    // A broken users file is a config error naming the key.
    std::fs::write(&users, "plc-1 = \"pw-1\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("auth.users_file"), "{err}");
    assert!(!err.contains("pw-1"), "the bad value is not echoed: {err}");
}

/// The users file is read again when it changes, with no reload: a user added with
/// `edgebridge passwd` can connect, connected devices stay. A file that does not load is
/// refused and reported, and the users in force stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_users_file_applies_without_a_reload_or_dropping_devices() {
    let s = Setup::start(ALL_LISTENERS).await;
    let (plc, mut plc_loop) = connect(s.device("tcp", "dev-1", Some(("plc-1", "pw-1"))))
        .await
        .expect("plc-1 connects");
    let users = s.pki.dir.path().join("users.toml");
    passwd(&users, "plc-3", Ok("pw-3"));
    // Read again within the poll interval (5 s).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match connect(s.device("tcp", "dev-3", Some(("plc-3", "pw-3")))).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e, "refused BadUserNamePassword");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the new user is still refused after {WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let count = |g: &TestGateway, outcome: &str| {
        g.counter(
            "edgebridge_credentials_reloads_total",
            &[("source", "users_file"), ("outcome", outcome)],
        )
    };
    assert_eq!(count(&s.gw, "applied"), 1.0);
    // The device connected before the change is still there.
    publish_all(
        &plc,
        &mut plc_loop,
        &[("plant/plc-1/still", QoS::AtLeastOnce)],
    )
    .await;
    assert!(s.collector.wait_for(1, WAIT).await);
    assert_eq!(upstream_topics(&s.collector), ["plant/plc-1/still"]);

    // Half written: refused once, reported, and the users in force stay.
    let good = std::fs::read_to_string(&users).expect("read users");
    std::fs::write(&users, format!("{good}plc-9 = \"$argon2id$v=19$m=")).expect("write users");
    assert!(
        s.gw.eventually(WAIT, |g| count(g, "refused") >= 1.0).await,
        "the broken users file is reported"
    );
    let again = connect(s.device("tcp", "dev-3b", Some(("plc-3", "pw-3")))).await;
    assert!(again.is_ok(), "plc-3 stays valid: {:?}", again.err());
    assert_eq!(count(&s.gw, "refused"), 1.0, "reported once per change");
    assert_eq!(count(&s.gw, "applied"), 1.0);
}

/// The certificate (DER) a TLS listener at `addr` presents to a new handshake.
async fn served_certificate(pki: &Pki, addr: SocketAddr) -> Vec<u8> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pki.read("ca.pem").as_slice()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let socket = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(WAIT, connector.connect(name, socket))
        .await
        .expect("handshake within 30 s")
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// Certificate rotation without a restart: the TLS listener's certificate and key are
/// replaced by a renewal while a device stays connected and publishes; new handshakes
/// see the new certificate and every message arrives. A broken certificate file is then
/// refused and reported (metric, log line), and the renewed certificate stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_certificate_rotates_without_a_restart_and_a_broken_one_is_refused() {
    let s = Setup::start(ALL_LISTENERS).await;
    let tls = s.addr("tls");
    let (dev, mut ev) = connect(s.device("tls", "rotating", Some(("plc-1", "pw-1"))))
        .await
        .expect("plc-1 connects over TLS");
    publish_all(&dev, &mut ev, &[("plant/plc-1/before", QoS::AtLeastOnce)]).await;
    let first = served_certificate(&s.pki, tls).await;

    let renewed = s.pki.renew_server();
    assert_ne!(renewed, first);
    // Read again within the poll interval (5 s); a handshake before that gets the old one.
    let deadline = tokio::time::Instant::now() + WAIT;
    while served_certificate(&s.pki, tls).await != renewed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new handshakes still get the old certificate after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let applied = [("source", "listener:tls"), ("outcome", "applied")];
    assert!(
        s.gw.eventually(WAIT, |g| g
            .counter("edgebridge_credentials_reloads_total", &applied)
            >= 1.0)
            .await,
        "the rotation is counted"
    );
    // The device connected before the rotation is still served; a new one connects.
    publish_all(&dev, &mut ev, &[("plant/plc-1/after", QoS::AtLeastOnce)]).await;
    let (late, mut late_ev) = connect(s.device("tls", "late", Some(("plc-1", "pw-1"))))
        .await
        .expect("a device connects with the renewed certificate");
    publish_all(
        &late,
        &mut late_ev,
        &[("plant/plc-1/late", QoS::AtLeastOnce)],
    )
    .await;

    // A broken certificate file: refused, reported, the renewed certificate stays.
    let refused = [("source", "listener:tls"), ("outcome", "refused")];
    let refused_before = s.counter("edgebridge_credentials_reloads_total", &refused);
    std::fs::write(
        s.pki.path("server.pem"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .expect("write a broken certificate");
    assert!(
        s.gw.eventually(WAIT, |g| g
            .counter("edgebridge_credentials_reloads_total", &refused)
            > refused_before)
            .await,
        "the broken file is reported"
    );
    assert_eq!(served_certificate(&s.pki, tls).await, renewed);
    let (after, mut after_ev) = connect(s.device("tls", "after-broken", Some(("plc-1", "pw-1"))))
        .await
        .expect("devices still connect while the broken file is on disk");
    publish_all(
        &after,
        &mut after_ev,
        &[("plant/plc-1/kept", QoS::AtLeastOnce)],
    )
    .await;

    assert!(s.collector.wait_for(4, WAIT).await, "4 messages upstream");
    let mut topics = upstream_topics(&s.collector);
    topics.sort();
    assert_eq!(
        topics,
        [
            "plant/plc-1/after",
            "plant/plc-1/before",
            "plant/plc-1/kept",
            "plant/plc-1/late"
        ]
    );
}
