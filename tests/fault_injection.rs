//! Fault injection around a running gateway, each fault followed by its recovery:
//!
//! - upstream faults: a refused port, an expired TLS certificate, a host name that does
//!   not resolve, an upstream that accepts TCP but never answers CONNECT, one that closes
//!   right after CONNACK. Each must show as the sink's state and last error (status API and
//!   metrics) with every message kept in the buffer, and delivery must resume by itself
//!   once a real Mosquitto answers. The faults a real broker cannot produce come from
//!   [`FaultProxy`], a TCP proxy in front of a real Mosquitto that misbehaves on demand.
//! - device faults: garbage, oversized packets, a flood of connects and a subscriber that
//!   never reads, all while other devices publish: their messages must all arrive.
//! - a full disk (a small tmpfs) during appends and at segment roll-over: no panic, no ack
//!   for a message the disk refused (the device resends it), every acked message
//!   delivered in order, and storing again once space is back.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    check_sequences, client_options, free_port, publish_seq, Collector, Mode, Mosquitto, TestCerts,
};
use gateway::{sink, status, status_until, TestGateway};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(120);

/// An MQTT sink `cloud` at `url` (plus `extra` keys) fed by `dev/+` → `up/{1}`.
fn sink_body(url: &str, extra: &str) -> String {
    format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "{url}"
backoff_min = "100ms"
backoff_max = "1s"
{extra}

[[rules]]
name = "all"
from = "dev/+"
to = ["cloud"]
topic = "up/{{1}}"
"#
    )
}

/// What [`FaultProxy`] does with the next connections it accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    /// Accepts TCP and reads whatever comes, never answering (a hung broker).
    Silent,
    /// Relays the client's CONNECT and the broker's CONNACK, then closes both sides.
    CloseAfterConnack,
    /// Relays both ways.
    Relay,
}

/// A TCP proxy on 127.0.0.1 in front of `target` (a real Mosquitto) that misbehaves as
/// told; records when each connection was accepted.
struct FaultProxy {
    port: u16,
    state: Arc<Mutex<(Behaviour, SocketAddr)>>,
    accepted: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    async fn start_on(port: u16, behaviour: Behaviour, target: u16) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the proxy port");
        let target = SocketAddr::from(([127, 0, 0, 1], target));
        let state = Arc::new(Mutex::new((behaviour, target)));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (st, acc) = (state.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                acc.lock().expect("proxy lock").push(Instant::now());
                let (behaviour, target) = *st.lock().expect("proxy lock");
                tokio::spawn(serve(client, behaviour, target));
            }
        });
        FaultProxy {
            port,
            state,
            accepted,
            task,
        }
    }

    /// Applies to connections accepted from now on.
    fn set(&self, behaviour: Behaviour, target: u16) {
        *self.state.lock().expect("proxy lock") =
            (behaviour, SocketAddr::from(([127, 0, 0, 1], target)));
    }

    fn accepted(&self) -> Vec<Instant> {
        self.accepted.lock().expect("proxy lock").clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, behaviour: Behaviour, target: SocketAddr) {
    if behaviour == Behaviour::Silent {
        let mut sink = [0u8; 4096];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    if behaviour == Behaviour::Relay {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
    // CloseAfterConnack: the client's bytes go up; the first 4 bytes coming back (a
    // 3.1.1 CONNACK) go down, then both connections are dropped.
    let (mut client_rd, mut client_wr) = client.split();
    let (mut up_rd, mut up_wr) = upstream.split();
    let up = tokio::io::copy(&mut client_rd, &mut up_wr);
    let down = async {
        let mut connack = [0u8; 4];
        if up_rd.read_exact(&mut connack).await.is_ok() {
            let _ = client_wr.write_all(&connack).await;
            let _ = client_wr.flush().await;
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// A plain Mosquitto with a collector subscribed to `up/#` directly (not via any proxy).
async fn upstream_with_collector(mode: Mode<'_>) -> (Mosquitto, Collector) {
    let upstream = Mosquitto::start(mode);
    let collector =
        Collector::start(client_options("collector", upstream.port(), mode), "up/#").await;
    (upstream, collector)
}

fn admin(gw: &TestGateway) -> SocketAddr {
    gw.gw().admin_addr
}

/// Publishes `count` messages from device 0 (all must be acked: the buffer takes them
/// whatever the upstream does), then waits for sink `cloud` to be down with `reason` as
/// its last error. Returns the sink's status entry.
async fn publish_and_expect_down(gw: &TestGateway, count: u64, reason: &str) -> Value {
    let acked = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "dev/0",
        0,
        count,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(
        acked, count,
        "the buffer acks every message while the upstream is down"
    );
    let st = status_until(admin(gw), Duration::from_secs(60), |s| {
        let c = sink(s, "cloud");
        c["state"] == "down" && c["last_error"]["reason"] == reason
    })
    .await;
    let cloud = sink(&st, "cloud").clone();
    assert_eq!(cloud["up"], false, "{cloud:#}");
    assert_eq!(
        cloud["buffer"]["messages"], count,
        "everything stays buffered: {cloud:#}"
    );
    assert!(cloud["errors"][reason].as_u64() >= Some(1), "{cloud:#}");
    assert!(
        gw.counter(
            "edgebridge_sink_errors_total",
            &[("sink", "cloud"), ("reason", reason)]
        ) >= 1.0
    );
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "cloud")]), 0.0);
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]),
        count as f64
    );
    assert_eq!(
        gw.counter("edgebridge_sink_delivered_total", &[("sink", "cloud")]),
        0.0
    );
    cloud
}

/// Once the upstream works: every message arrives in order, the sink is up, the buffer
/// empty.
async fn expect_recovery(gw: &TestGateway, collector: &Collector, count: u64) {
    assert!(
        collector.wait_for_unique(count as usize, WAIT).await,
        "got {} of {count} after the fault was repaired",
        collector.len()
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(report.per_device_count.get(&0), Some(&count), "{report:?}");
    status_until(admin(gw), WAIT, |s| {
        let c = sink(s, "cloud");
        c["state"] == "up" && c["buffer"]["messages"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_connections_mark_the_sink_down_and_recover_when_the_port_opens() {
    let (upstream, collector) = upstream_with_collector(Mode::Plain).await;
    // Nothing listens on this port until the proxy opens it.
    let port = free_port();
    let mut gw = TestGateway::start(&sink_body(&format!("mqtt://127.0.0.1:{port}"), "")).await;
    let cloud = publish_and_expect_down(&gw, 300, "connection_refused").await;
    let detail = cloud["last_error"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("127.0.0.1:{port}")) && detail.contains("refused"),
        "{detail}"
    );

    let _proxy = FaultProxy::start_on(port, Behaviour::Relay, upstream.port()).await;
    expect_recovery(&gw, &collector, 300).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_upstream_certificate_is_a_tls_error_until_a_valid_one_is_served() {
    let certs = TestCerts::generate();
    // The same CA and names, but a server certificate that expired in 2021.
    let expired = TestCerts {
        dir: tempfile::tempdir().expect("tempdir"),
        ca: certs.ca.clone(),
        server_cert: certs.expired_server_cert.clone(),
        server_key: certs.expired_server_key.clone(),
        client_cert: certs.client_cert.clone(),
        client_key: certs.client_key.clone(),
        expired_server_cert: certs.expired_server_cert.clone(),
        expired_server_key: certs.expired_server_key.clone(),
        ca_signer: certs.ca_signer.clone(),
    };
    let stale = Mosquitto::start(Mode::Tls(&expired));
    let (good, collector) = upstream_with_collector(Mode::Tls(&certs)).await;
    let proxy = FaultProxy::start_on(free_port(), Behaviour::Relay, stale.port()).await;
    let url = format!("mqtts://localhost:{}", proxy.port);
    let tls = format!("tls = {{ ca = \"{}\" }}", certs.ca.display());
    let mut gw = TestGateway::start(&sink_body(&url, &tls)).await;
    let cloud = publish_and_expect_down(&gw, 300, "tls").await;
    let detail = cloud["last_error"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.to_lowercase().contains("expired"),
        "the detail says why: {detail}"
    );

    // The upstream renews its certificate (same address): delivery resumes by itself.
    proxy.set(Behaviour::Relay, good.port());
    expect_recovery(&gw, &collector, 300).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unresolvable_host_name_is_reported_and_a_reload_recovers() {
    let (upstream, collector) = upstream_with_collector(Mode::Plain).await;
    // `.invalid` never resolves (RFC 2606).
    let mut gw = TestGateway::start(&sink_body("mqtt://upstream.invalid:1883", "")).await;
    let cloud = publish_and_expect_down(&gw, 300, "io").await;
    let detail = cloud["last_error"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("upstream.invalid:1883") && detail.contains("lookup"),
        "the detail names the host and the failed lookup: {detail}"
    );

    // The operator fixes the name: a reload (SIGHUP) restarts the sink on the same buffer.
    let config = gw.dir.path().join("edgebridge.toml");
    let fixed = std::fs::read_to_string(&config)
        .expect("read config")
        .replace(
            "upstream.invalid:1883",
            &format!("127.0.0.1:{}", upstream.port()),
        );
    std::fs::write(&config, fixed).expect("write config");
    let reloaded = gw
        .gateway
        .as_mut()
        .expect("running")
        .reload_from(&config)
        .await;
    assert!(reloaded.is_ok(), "{:?}", reloaded.err());
    expect_recovery(&gw, &collector, 300).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_that_never_answers_connect_times_out_and_recovers() {
    let (upstream, collector) = upstream_with_collector(Mode::Plain).await;
    let proxy = FaultProxy::start_on(free_port(), Behaviour::Silent, upstream.port()).await;
    let mut gw =
        TestGateway::start(&sink_body(&format!("mqtt://127.0.0.1:{}", proxy.port), "")).await;
    let cloud = publish_and_expect_down(&gw, 300, "timeout").await;
    let detail = cloud["last_error"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{detail}"
    );
    let retried = gw
        .eventually(Duration::from_secs(30), |_| proxy.accepted().len() >= 2)
        .await;
    assert!(retried, "it keeps trying");

    proxy.set(Behaviour::Relay, upstream.port());
    expect_recovery(&gw, &collector, 300).await;
    gw.shutdown().await;
}

/// An upstream that accepts the connection and closes it right away (a duplicate client
/// id, a policy refusal) is retried with a growing backoff, not hammered at
/// `backoff_min`: the CONNACK alone does not prove the upstream works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_closing_after_connack_is_retried_with_backoff_and_recovers() {
    let (upstream, collector) = upstream_with_collector(Mode::Plain).await;
    let proxy =
        FaultProxy::start_on(free_port(), Behaviour::CloseAfterConnack, upstream.port()).await;
    // backoff 100ms..2s: from the 6th retry on every delay is at least 1 s (2 s halved by
    // jitter at most).
    let body = sink_body(&format!("mqtt://127.0.0.1:{}", proxy.port), "")
        .replace("backoff_max = \"1s\"", "backoff_max = \"2s\"");
    let mut gw = TestGateway::start(&body).await;
    let acked = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "dev/0",
        0,
        300,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(acked, 300);
    let tried = gw
        .eventually(Duration::from_secs(60), |_| proxy.accepted().len() >= 8)
        .await;
    assert!(tried, "reconnects: {}", proxy.accepted().len());
    let times = proxy.accepted();
    let gap = times[7] - times[6];
    assert!(
        gap >= Duration::from_millis(900),
        "the 7th retry came {gap:?} after the 6th: the backoff was reset by a CONNACK"
    );
    let st = status(admin(&gw)).await;
    let cloud = sink(&st, "cloud");
    assert!(cloud["errors_total"].as_u64() >= Some(7), "{cloud:#}");
    assert!(!cloud["last_error"].is_null(), "{cloud:#}");
    let pending = gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]);
    assert_eq!(
        pending, 300.0,
        "nothing was confirmed, everything stays buffered"
    );

    proxy.set(Behaviour::Relay, upstream.port());
    expect_recovery(&gw, &collector, 300).await;
    gw.shutdown().await;
}

/// Publishes seqs `0..count` of `device` to `dev/{device}`; returns how many were acked.
async fn device(port: u16, device: u32, count: u64) -> u64 {
    let id = format!("good-{device}");
    publish_seq(
        "127.0.0.1",
        port,
        &id,
        &format!("dev/{device}"),
        device,
        count,
        QoS::AtLeastOnce,
    )
    .await
}

/// Sends `bytes` on a fresh connection and waits (10 s at most) for the gateway to close it.
async fn send_raw(port: u16, bytes: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let _ = s.write_all(bytes).await;
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .is_ok()
}

/// While two devices publish 4,000 messages each, the listener gets garbage, packets over
/// its size limit, a flood of connects (kept open, dropped at once, and TCP connections
/// that never send CONNECT) and a subscriber to the busy topic that never reads its
/// socket. The broker must stay up for everyone else: every message of the good devices
/// arrives, in order, and a new device can still connect and publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misbehaving_devices_do_not_stop_the_others() {
    let (upstream, collector) = upstream_with_collector(Mode::Plain).await;
    let body = format!(
        "{}\n[[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:0\"\n\
         max_packet_size = \"64KiB\"\nconnect_timeout = \"2s\"\n",
        sink_body(&format!("mqtt://127.0.0.1:{}", upstream.port()), "")
    );
    let mut gw = TestGateway::start(&body).await;
    let port = gw.port();

    // The subscriber that never reads: QoS 1 on everything the good devices publish.
    let mut opts = MqttOptions::new("slow-reader", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    let (slow, mut slow_events) = AsyncClient::new(opts, 10);
    slow.subscribe("dev/#", QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), slow_events.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("slow subscriber could not subscribe: {other:?}"),
        }
    }
    // From here on `slow_events` is never polled: its socket is never read.

    let good: Vec<_> = (0..2u32)
        .map(|d| tokio::spawn(device(port, d, 4_000)))
        .collect();

    // Garbage: an invalid first byte, a CONNECT with a bad protocol name, random bytes
    // after a valid CONNECT, a SUBSCRIBE before CONNECT.
    let mut connect = vec![0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 4];
    connect.extend_from_slice(b"junk");
    let mut after_connect = connect.clone();
    after_connect.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xFF; 64],
        vec![0x10, 0x0C, 0, 4, b'X', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 0],
        after_connect,
        vec![0x82, 0x06, 0, 1, 0, 1, b'#', 1],
    ];
    for bytes in &garbage {
        assert!(
            send_raw(port, bytes).await,
            "a malformed packet closes its connection: {bytes:?}"
        );
    }
    // Oversized: a PUBLISH announcing 200 MB, and a real 100 KiB one over the 64 KiB limit.
    let mut huge = connect.clone();
    huge.extend_from_slice(&[0x30, 0xFF, 0xFF, 0xFF, 0x5F]);
    huge.extend(std::iter::repeat_n(b'x', 64 * 1024));
    assert!(
        send_raw(port, &huge).await,
        "an oversized packet closes its connection"
    );
    let mut opts = MqttOptions::new("big-sender", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (big, mut big_events) = AsyncClient::new(opts, 10);
    big.publish("dev/big", QoS::AtLeastOnce, false, vec![b'x'; 100 * 1024])
        .await
        .expect("queue the big publish");
    let big_outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match big_events.poll().await {
                Ok(Event::Incoming(Incoming::PubAck(_))) => return "acked",
                Ok(_) => {}
                Err(_) => return "closed",
            }
        }
    })
    .await;
    assert_eq!(
        big_outcome,
        Ok("closed"),
        "a packet over max_packet_size is refused"
    );

    // A flood: 300 clients that connect and stay, 300 that connect and vanish, 100 TCP
    // connections that never send CONNECT (closed after connect_timeout).
    let mut idle_sockets = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)).await {
            idle_sockets.push(s);
        }
    }
    let flood: Vec<_> = (0..600u32)
        .map(|i| {
            tokio::spawn(async move {
                let mut opts = MqttOptions::new(format!("flood-{i}"), "127.0.0.1", port);
                opts.set_keep_alive(Duration::from_secs(30));
                let (client, mut events) = AsyncClient::new(opts, 10);
                let connected = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Incoming::ConnAck(_))) => return true,
                            Ok(_) => {}
                            Err(_) => return false,
                        }
                    }
                })
                .await
                .unwrap_or(false);
                // Half keep their connection until the end of the test.
                (i % 2 == 0).then_some((client, events, connected))
            })
        })
        .collect();
    let mut kept = Vec::new();
    for f in flood {
        if let Some(k) = f.await.expect("flood client") {
            kept.push(k);
        }
    }
    let connected = kept.iter().filter(|(_, _, ok)| *ok).count();
    assert_eq!(connected, 300, "every client of the flood was served");

    for (d, g) in good.into_iter().enumerate() {
        assert_eq!(
            g.await.expect("device"),
            4_000,
            "device {d}: every publish acked"
        );
    }
    assert!(
        collector.wait_for_unique(8_000, WAIT).await,
        "got {} of 8000 from the good devices",
        collector.len()
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(report.per_device_count.get(&0), Some(&4_000), "{report:?}");
    assert_eq!(report.per_device_count.get(&1), Some(&4_000), "{report:?}");

    // Still serving: a new device gets through, and the slow reader did not stop anyone.
    assert_eq!(device(port, 2, 100).await, 100, "a new device is served");
    assert!(
        collector.wait_for_unique(8_100, WAIT).await,
        "the new device's messages arrive"
    );
    let (code, body) = gateway::http_get(admin(&gw), "/healthz").await;
    assert_eq!(code, 200, "{body}");
    drop((slow, slow_events, idle_sockets, kept));
    gw.shutdown().await;
}

/// Free bytes on the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let s = rustix::fs::statvfs(path).expect("statvfs");
    s.f_bavail * s.f_frsize
}

/// A device with an outbox: publishes seqs `0..count` of `device` at QoS 1 (100 in
/// flight) and, after a connection error, reconnects and resends every seq not acked yet,
/// oldest first (rumqttc itself forgets unacked publishes on a new session). Returns how
/// many seqs were acked (120 s limit).
async fn publish_with_outbox(port: u16, device: u32, count: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut acked: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    while (acked.len() as u64) < count && tokio::time::Instant::now() < deadline {
        let todo: std::collections::VecDeque<u64> =
            (0..count).filter(|s| !acked.contains(s)).collect();
        let mut opts = MqttOptions::new(format!("outbox-{device}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5))
            .set_inflight(100);
        let (client, mut events) = AsyncClient::new(opts, 200);
        let seqs = todo.clone();
        let producer = tokio::spawn(async move {
            for seq in seqs {
                let payload = common::seq_payload(device, seq);
                if client
                    .publish(format!("dev/{device}"), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        // rumqttc reports `Outgoing::Publish(pkid)` in the order of the publishes.
        let mut unsent = todo;
        let mut by_pkid = std::collections::HashMap::new();
        while (acked.len() as u64) < count {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                    if let Some(seq) = unsent.pop_front() {
                        by_pkid.insert(pkid, seq);
                    }
                }
                Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                    if let Some(seq) = by_pkid.remove(&ack.pkid) {
                        acked.insert(seq);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        producer.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acked.len() as u64
}

/// The data_dir on a 4 MiB tmpfs, no free-disk margin (`min_free_disk = "0"`), so the
/// disk itself refuses writes (`free`: a filler file leaves only that much). A device
/// with an outbox publishes 80,000 messages (more than the disk holds) while the upstream
/// is down.
/// Expected: no panic, the gateway keeps serving; once the disk is full the device's acks
/// are withheld (its connection is closed and it resends) instead of acking messages that
/// were not stored; when the upstream is back the drain frees the disk, the device gets
/// through, and every one of its messages arrives, in order. Afterwards new messages are
/// stored with no further drops.
async fn disk_full_case(segment_size: &str, free: Option<u64>) {
    let tmpfs = common::Tmpfs::mount("4m");
    let data_dir = tmpfs.path().join("data");
    let (mut upstream, collector) = common::stopped_upstream().await;
    let buffer = format!("buffer = {{ segment_size = \"{segment_size}\", min_free_disk = \"0\" }}");
    let body = sink_body(&format!("mqtt://127.0.0.1:{}", upstream.port()), &buffer);
    let mut gw = TestGateway::start_with_data_dir(&body, &data_dir).await;
    let mut filler: Option<PathBuf> = None;
    if let Some(free) = free {
        let path = tmpfs.path().join("filler");
        let size = free_bytes(tmpfs.path()).saturating_sub(free);
        std::fs::write(&path, vec![0u8; size as usize]).expect("write the filler");
        filler = Some(path);
    }

    // ~60-byte records: 80,000 are more than 4 MiB.
    let sent = 80_000u64;
    let port = gw.port();
    let publisher = tokio::spawn(publish_with_outbox(port, 0, sent));
    let full = gw
        .eventually(Duration::from_secs(60), |_| {
            free_bytes(tmpfs.path()) < 16 * 1024
        })
        .await;
    assert!(
        full,
        "the disk fills up: {} bytes free",
        free_bytes(tmpfs.path())
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !publisher.is_finished(),
        "a device is not acked for what the full disk refused"
    );
    let (code, _) = gateway::http_get(admin(&gw), "/healthz").await;
    assert_eq!(code, 200, "the gateway keeps serving with a full disk");

    // The upstream comes back; the drain deletes segments and frees the disk.
    upstream.restart();
    if let Some(path) = &filler {
        std::fs::remove_file(path).expect("remove the filler");
    }
    assert_eq!(
        publisher.await.expect("publisher"),
        sent,
        "every message is acked in the end"
    );
    let arrived = collector.wait_for_unique(sent as usize, WAIT).await;
    let report = check_sequences(&collector.messages());
    let dropped = |g: &TestGateway, reason: &str| {
        g.counter(
            "edgebridge_buffer_dropped_total",
            &[("sink", "cloud"), ("reason", reason)],
        )
    };
    println!(
        "disk full (segment {segment_size}, free {free:?}): {sent} acked, {} arrived, \
         duplicates {}; records lost on disk and resent: io_error {}, corrupt {}",
        report.per_device_count.get(&0).copied().unwrap_or(0),
        report.duplicates,
        dropped(&gw, "io_error"),
        dropped(&gw, "corrupt"),
    );
    assert!(arrived, "every acked message arrives: {report:?}");
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(
        dropped(&gw, "full"),
        0.0,
        "no policy drop: the margin is off"
    );

    // Space is back: new messages are stored and delivered, with no new drops.
    let drained = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(drained, "the buffer drains");
    let before = gw.counter("edgebridge_buffer_dropped_total", &[]);
    let again = publish_seq(
        "127.0.0.1",
        port,
        "dev-1",
        "dev/1",
        1,
        5_000,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(again, 5_000);
    let arrived = collector.wait_for_unique(sent as usize + 5_000, WAIT).await;
    let report = check_sequences(&collector.messages());
    assert!(
        arrived,
        "after recovery every new message arrives: {report:?}"
    );
    assert_eq!(report.per_device_count.get(&1), Some(&5_000), "{report:?}");
    assert_eq!(gw.counter("edgebridge_buffer_dropped_total", &[]), before);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_during_appends_counts_drops_and_recovers() {
    disk_full_case("1MiB", None).await;
}

/// Ten 64 KiB segments fit exactly; the disk refuses the first write to the eleventh,
/// right after the roll-over created it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_at_segment_roll_over_counts_drops_and_recovers() {
    disk_full_case("64KiB", Some(10 * 64 * 1024)).await;
}
