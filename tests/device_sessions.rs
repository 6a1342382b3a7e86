//! Device sessions owned by edgebridge (issue "Device sessions"), with real clients
//! (rumqttc 3.1.1 and 5, raw sockets for what no client library sends, mosquitto_pub and
//! mosquitto_sub):
//! wills through the rules, session takeover, delivered QoS = min(publish,
//! subscription), QoS 1 kept for an offline persistent session, unknown protocol levels.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::process::Command;
use std::time::Duration;

use common::{client_options, Collector, Mode, Mosquitto};
use gateway::{TestGateway, FILE_SINK};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// Polls until `want` matches an event (15 s at most).
async fn until<T>(events: &mut EventLoop, mut want: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(event) => {
                    if let Some(t) = want(&event) {
                        return t;
                    }
                }
                Err(e) => panic!("client failed: {e}"),
            }
        }
    })
    .await
    .expect("event within 15 s")
}

fn connected(e: &Event) -> Option<bool> {
    match e {
        Event::Incoming(Incoming::ConnAck(ack)) => Some(ack.session_present),
        _ => None,
    }
}

fn subscribed(e: &Event) -> Option<()> {
    matches!(e, Event::Incoming(Incoming::SubAck(_))).then_some(())
}

/// A CONNECT of protocol `name`/`level` with clean session and `client_id`.
fn connect_packet(name: &str, level: u8, client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(&[level, 0x02, 0, 30]);
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

/// Reads exactly `n` bytes (15 s at most).
async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("bytes within 15 s")
        .expect("read");
    buf
}

/// True once the peer closed the socket (whatever it sent before is skipped).
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_will_goes_through_the_rules_upstream_and_a_clean_disconnect_discards_it() {
    let upstream = Mosquitto::start(Mode::Plain);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "up/#",
    )
    .await;
    let body = format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "500ms"

[[rules]]
name = "presence"
from = "status/+"
to = ["cloud"]
topic = "up/status/{{1}}"
"#,
        upstream.port()
    );
    let mut gw = TestGateway::start(&body).await;
    let will = |id: &str| LastWill::new(format!("status/{id}"), "offline", QoS::AtLeastOnce, false);

    // First a device that says goodbye: its will must never be published.
    let mut opts = options("press-6", gw.port());
    opts.set_last_will(will("press-6"));
    let (polite, mut polite_events) = AsyncClient::new(opts, 10);
    until(&mut polite_events, connected).await;
    polite.disconnect().await.expect("queue DISCONNECT");
    until(&mut polite_events, |e| {
        matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)).then_some(())
    })
    .await;
    gw.counter_until(
        "edgebridge_connections_closed_total",
        &[("reason", "client_disconnect")],
        1.0,
        WAIT,
    )
    .await;

    // Then one that vanishes.
    let mut opts = options("press-7", gw.port());
    opts.set_last_will(will("press-7"));
    let (_device, mut device_events) = AsyncClient::new(opts, 10);
    until(&mut device_events, connected).await;
    drop(device_events);

    assert!(
        collector.wait_for(1, WAIT).await,
        "the will reached the upstream"
    );
    // Intake is in order: a will of press-6 would have come first.
    assert_eq!(
        collector.messages(),
        vec![("up/status/press-7".to_string(), b"offline".to_vec())],
        "mosquitto log:\n{}",
        upstream.logs()
    );
    assert_eq!(
        gw.counter("edgebridge_rule_matches_total", &[("rule", "presence")]),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_takeovers_in_a_row_leave_exactly_one_connection() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let mut sockets = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(&connect_packet("MQTT", 4, "press-1"))
            .await
            .expect("send CONNECT");
        let connack = read_n(&mut s, 4).await;
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK of takeover {i}");
        sockets.push(s);
    }
    let mut last = sockets.pop().expect("200 sockets");
    // Every connection taken over is closed by the gateway...
    for (i, s) in sockets.iter_mut().enumerate() {
        assert!(closed_by_peer(s).await, "connection {i} is still open");
    }
    // ...and the last one is live.
    last.write_all(&[0xC0, 0]).await.expect("PINGREQ");
    assert_eq!(read_n(&mut last, 2).await, [0xD0, 0], "PINGRESP");
    let closed = gw
        .counter_until(
            "edgebridge_connections_closed_total",
            &[("reason", "taken_over")],
            199.0,
            WAIT,
        )
        .await;
    assert_eq!(closed, 199.0);
    assert_eq!(gw.counter("edgebridge_connections", &[]), 1.0);

    // MQTT 5: the connection taken over is told why (DISCONNECT 0x8E).
    let mut old = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    old.write_all(&connect_packet("MQTT", 5, "press-2"))
        .await
        .expect("send CONNECT");
    let header = read_n(&mut old, 2).await;
    assert_eq!(header[0], 0x20);
    read_n(&mut old, header[1] as usize).await;
    let mut new = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    new.write_all(&connect_packet("MQTT", 5, "press-2"))
        .await
        .expect("send CONNECT");
    let header = read_n(&mut old, 2).await;
    assert_eq!(header[0], 0xE0, "DISCONNECT");
    let disconnect = read_n(&mut old, header[1] as usize).await;
    assert_eq!(disconnect[0], 0x8E, "session taken over");
    assert!(
        String::from_utf8_lossy(&disconnect).contains("took this client id over"),
        "with a reason string: {disconnect:?}"
    );
    assert!(closed_by_peer(&mut old).await);
    assert_eq!(read_n(&mut new, 2).await[0], 0x20, "the new one is served");
    gw.shutdown().await;
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivered_qos_is_the_minimum_of_publish_and_subscription_for_every_pair() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    // One 3.1.1 subscriber per subscription QoS.
    let mut subscribers = Vec::new();
    for sub_qos in 0..3u8 {
        let (client, mut events) = AsyncClient::new(options(&format!("sub-{sub_qos}"), port), 10);
        client
            .subscribe("qos/#", qos_of(sub_qos))
            .await
            .expect("subscribe");
        until(&mut events, subscribed).await;
        subscribers.push((sub_qos, client, events));
    }
    // And an MQTT 5 subscriber at QoS 2.
    let mut opts5 = rumqttc::v5::MqttOptions::new("sub5", "127.0.0.1", port);
    opts5.set_keep_alive(Duration::from_secs(5));
    let (client5, mut events5) = rumqttc::v5::AsyncClient::new(opts5, 10);
    client5
        .subscribe("qos/#", rumqttc::v5::mqttbytes::QoS::ExactlyOnce)
        .await
        .expect("subscribe v5");
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::SubAck(_))) =
                events5.poll().await
            {
                return;
            }
        }
    })
    .await
    .expect("v5 SUBACK");

    let (publisher, mut pub_events) = AsyncClient::new(options("publisher", port), 10);
    for pub_qos in 0..3u8 {
        publisher
            .publish(
                format!("qos/{pub_qos}"),
                qos_of(pub_qos),
                false,
                vec![pub_qos],
            )
            .await
            .expect("publish");
    }
    let pumping = tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });

    for (sub_qos, _client, events) in subscribers.iter_mut() {
        let mut got = Vec::new();
        while got.len() < 3 {
            let p = until(events, |e| match e {
                Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
                _ => None,
            })
            .await;
            got.push((p.payload[0], p.qos));
        }
        got.sort_by_key(|(pub_qos, _)| *pub_qos);
        let want: Vec<(u8, QoS)> = (0..3u8)
            .map(|pub_qos| (pub_qos, qos_of(pub_qos.min(*sub_qos))))
            .collect();
        assert_eq!(got, want, "subscription QoS {sub_qos}");
    }
    let mut got5 = Vec::new();
    tokio::time::timeout(WAIT, async {
        while got5.len() < 3 {
            if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::Publish(p))) =
                events5.poll().await
            {
                got5.push((p.payload[0], p.qos as u8));
            }
        }
    })
    .await
    .expect("three deliveries to the v5 subscriber");
    got5.sort();
    assert_eq!(got5, [(0, 0), (1, 1), (2, 2)], "MQTT 5 subscription QoS 2");

    // Every downgraded delivery was acked to the router: a fourth round still flows.
    publisher
        .publish("qos/again", QoS::AtLeastOnce, false, vec![9])
        .await
        .expect("publish");
    for (sub_qos, _client, events) in subscribers.iter_mut() {
        let p = until(events, |e| match e {
            Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await;
        assert_eq!(p.payload.as_ref(), [9], "subscription QoS {sub_qos}");
    }
    pumping.abort();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_qos1_downlink_reaches_a_device_that_was_offline_when_it_came() {
    let upstream = Mosquitto::start(Mode::Plain);
    let body = format!(
        r##"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "500ms"

[[rules]]
name = "all"
from = "up/#"
to = ["cloud"]

[[downlinks]]
sink = "cloud"
from = "cmd/{{gateway_id}}/#"
topic = "cmd/{{1}}"
qos = 1
"##,
        upstream.port()
    );
    let mut gw = TestGateway::start(&body).await;
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_up", &[("sink", "cloud")])
            == 1.0)
            .await,
        "the upstream connection is up"
    );
    // A persistent session subscribes at QoS 1, then goes offline.
    let mut opts = options("press-9", gw.port());
    opts.set_clean_session(false);
    let (device, mut events) = AsyncClient::new(opts.clone(), 10);
    assert!(!until(&mut events, connected).await, "a new session");
    device
        .subscribe("cmd/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut events, subscribed).await;
    device.disconnect().await.expect("queue DISCONNECT");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
    drop(events);

    // The command comes while the device is away (mosquitto_pub as the cloud).
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &upstream.port().to_string()])
        .args(["-q", "1", "-t", "cmd/edge-01/m9/stop", "-m", "now"])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    gw.counter_until(
        "edgebridge_downlink_messages_total",
        &[("sink", "cloud")],
        1.0,
        WAIT,
    )
    .await;

    // Back with the same session: the command is delivered at QoS 1.
    let (_device, mut events) = AsyncClient::new(opts, 10);
    assert!(until(&mut events, connected).await, "session present");
    let p = until(&mut events, |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(p.topic, "cmd/m9/stop");
    assert_eq!(p.payload.as_ref(), b"now");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_protocol_levels_get_a_connack_and_mqtt_31_is_served() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    for (level, want) in [
        (2u8, vec![0x20, 2, 0, 0x01]),
        (6, vec![0x20, 3, 0, 0x84, 0]),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(&connect_packet("MQTT", level, "odd"))
            .await
            .expect("send CONNECT");
        assert_eq!(read_n(&mut s, want.len()).await, want, "level {level}");
        assert!(closed_by_peer(&mut s).await, "level {level} is closed");
    }
    assert_eq!(
        gw.counter(
            "edgebridge_connections_refused_total",
            &[("reason", "protocol_version")]
        ),
        2.0
    );

    // MQTT 3.1 (MQIsdp, level 3): a raw CONNECT is accepted, and mosquitto_pub -V mqttv31
    // reaches a 3.1.1 subscriber.
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&connect_packet("MQIsdp", 3, "plc-31"))
        .await
        .expect("send CONNECT");
    assert_eq!(read_n(&mut s, 4).await, [0x20, 2, 0, 0]);
    let (watcher, mut events) = AsyncClient::new(options("watcher", port), 10);
    watcher
        .subscribe("old/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut events, subscribed).await;
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv31"])
        .args(["-i", "plc-32", "-q", "1", "-t", "old/plc", "-m", "hello"])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    let p = until(&mut events, |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_ref()),
        ("old/plc", &b"hello"[..])
    );

    // A 3.1 subscriber (mosquitto_sub -V mqttv31) gets a retained message.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv31"])
        .args([
            "-i",
            "plc-33",
            "-q",
            "1",
            "-r",
            "-t",
            "old/state",
            "-m",
            "idle",
        ])
        .output()
        .expect("mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv31"])
        .args([
            "-i",
            "plc-34",
            "-q",
            "1",
            "-t",
            "old/state",
            "-C",
            "1",
            "-W",
            "15",
            "-v",
        ])
        .output()
        .expect("mosquitto_sub");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "old/state idle"
    );
    gw.shutdown().await;
}

/// A listener with a short CONNECT timeout and a small packet limit, for bad input.
const STRICT_LISTENER: &str = r##"
[[listeners]]
name = "devices"
bind = "127.0.0.1:0"
connect_timeout = "1s"
max_packet_size = "1KiB"
"##;

/// A raw 3.1.1 connection past its CONNACK.
async fn raw_device(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&connect_packet("MQTT", 4, id))
        .await
        .expect("send CONNECT");
    assert_eq!(read_n(&mut s, 4).await, [0x20, 2, 0, 0], "CONNACK for {id}");
    s
}

/// A QoS 0 PUBLISH of `topic` (raw bytes) with payload "x".
fn publish_packet(topic: &[u8]) -> Vec<u8> {
    let mut out = vec![0x30, (2 + topic.len() + 1) as u8];
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    out.push(b'x');
    out
}

/// A device that stays connected and subscribed through everything: it must still get
/// a message at the end.
async fn bystander(port: u16) -> (AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(options("bystander", port), 10);
    client
        .subscribe("calm/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut events, subscribed).await;
    (client, events)
}

async fn bystander_still_served(port: u16, events: &mut EventLoop) {
    let (talker, mut talker_events) = AsyncClient::new(options("talker", port), 10);
    talker
        .publish("calm/ok", QoS::AtLeastOnce, false, "still here")
        .await
        .expect("publish");
    let pumping = tokio::spawn(async move { while talker_events.poll().await.is_ok() {} });
    let p = until(events, |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(p.payload.as_ref(), b"still here");
    pumping.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_bad_input_closes_its_own_connection_with_its_reason() {
    let mut gw = TestGateway::start(&format!("{STRICT_LISTENER}{FILE_SINK}")).await;
    let port = gw.port();
    let (_bystander, mut bystander_events) = bystander(port).await;
    let oversized = {
        // A PUBLISH announcing 2,000 bytes on a 1 KiB listener.
        vec![0x30, 0xD0, 0x0F, 0, 1, b'a']
    };
    let cases: Vec<(&str, bool, Vec<u8>)> = vec![
        (
            "malformed remaining length",
            true,
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        ),
        ("PUBLISH before CONNECT", false, publish_packet(b"a/b")),
        ("second CONNECT", true, connect_packet("MQTT", 4, "again")),
        ("topic not UTF-8", true, publish_packet(&[0xFF, 0xFE])),
        ("wildcard in a PUBLISH topic", true, publish_packet(b"a/+")),
        ("empty topic", true, publish_packet(b"")),
        ("a CONNACK from a device", true, vec![0x20, 2, 0, 0]),
    ];
    for (i, (what, connect_first, bytes)) in cases.iter().enumerate() {
        let mut s = if *connect_first {
            raw_device(port, &format!("bad-{i}")).await
        } else {
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect")
        };
        s.write_all(bytes).await.expect("send");
        assert!(closed_by_peer(&mut s).await, "{what}: connection closed");
    }
    let mut s = raw_device(port, "too-big").await;
    s.write_all(&oversized).await.expect("send");
    assert!(
        closed_by_peer(&mut s).await,
        "oversized packet: connection closed"
    );
    // MQTT 5 is told why: DISCONNECT 0x95 "packet too large".
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&connect_packet("MQTT", 5, "too-big-5"))
        .await
        .expect("send CONNECT");
    assert_eq!(read_packet(&mut s).await.0, 0x20, "CONNACK");
    s.write_all(&oversized).await.expect("send");
    let (kind, body) = read_packet(&mut s).await;
    assert_eq!(
        (kind, body.first().copied()),
        (0xE0, Some(0x95)),
        "DISCONNECT"
    );
    assert!(
        closed_by_peer(&mut s).await,
        "oversized packet: v5 connection closed"
    );
    // One byte of a CONNECT, then nothing: closed after connect_timeout.
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(&[0x10]).await.expect("send");
    assert!(
        closed_by_peer(&mut s).await,
        "slow CONNECT: connection closed"
    );

    let closed = |reason: &'static str, want: f64| {
        let gw = &gw;
        async move {
            gw.counter_until(
                "edgebridge_connections_closed_total",
                &[("reason", reason)],
                want,
                WAIT,
            )
            .await
        }
    };
    assert_eq!(
        closed("protocol_error", cases.len() as f64).await,
        cases.len() as f64
    );
    assert_eq!(closed("packet_too_large", 2.0).await, 2.0);
    assert_eq!(closed("connect_timeout", 1.0).await, 1.0);
    bystander_still_served(port, &mut bystander_events).await;
    gw.shutdown().await;
}

/// Random byte streams, alone or after a valid CONNECT, never take the listener down:
/// another device is served throughout, and every such connection ends.
#[test]
fn random_byte_streams_never_disturb_other_devices() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let mut gw = runtime.block_on(TestGateway::start(&format!("{STRICT_LISTENER}{FILE_SINK}")));
    let port = gw.port();
    let (_bystander, mut bystander_events) = runtime.block_on(bystander(port));
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..600),
    );
    let counter = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&strategy, |(connect_first, bytes)| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            runtime.block_on(async {
                let mut s = if connect_first {
                    raw_device(port, &format!("fuzz-{n}")).await
                } else {
                    TcpStream::connect(("127.0.0.1", port))
                        .await
                        .expect("connect")
                };
                // The gateway may close before everything is written.
                let _ = s.write_all(&bytes).await;
                // Whatever it made of the bytes, the device leaves: the gateway must
                // notice and close its side too (no stuck connection).
                let _ = s.shutdown().await;
                prop_assert!(closed_by_peer(&mut s).await, "connection {n} left open");
                Ok(())
            })
        })
        .expect("random input handled");
    runtime.block_on(async {
        bystander_still_served(port, &mut bystander_events).await;
        // Only the bystander (and the talker, if not yet gone) remain.
        let open = gw
            .eventually(WAIT, |g| g.counter("edgebridge_connections", &[]) <= 2.0)
            .await;
        assert!(
            open,
            "connections left: {}",
            gw.counter("edgebridge_connections", &[])
        );
        gw.shutdown().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_message_expiry_counts_the_time_spent_in_the_gateway() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, Incoming as Incoming5};

    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let mut opts = rumqttc::v5::MqttOptions::new("sub-exp", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    let (sub, mut events) = Client5::new(opts.clone(), 10);
    sub.subscribe("exp/#", QoS5::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::timeout(WAIT, async {
        while !matches!(
            events.poll().await,
            Ok(Event5::Incoming(Incoming5::SubAck(_)))
        ) {}
    })
    .await
    .expect("SUBACK");
    sub.disconnect().await.expect("queue DISCONNECT");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
    drop(events);

    let mut opts5 = rumqttc::v5::MqttOptions::new("pub-exp", "127.0.0.1", port);
    opts5.set_keep_alive(Duration::from_secs(5));
    let (publisher, mut pub_events) = Client5::new(opts5, 10);
    for (topic, expiry) in [("exp/short", 1), ("exp/long", 600)] {
        let props = PublishProperties {
            message_expiry_interval: Some(expiry),
            user_properties: vec![("site".into(), "7".into())],
            ..Default::default()
        };
        publisher
            .publish_with_properties(topic, QoS5::AtLeastOnce, false, "m", props)
            .await
            .expect("publish");
    }
    let mut acked = 0;
    tokio::time::timeout(WAIT, async {
        while acked < 2 {
            if let Ok(Event5::Incoming(Incoming5::PubAck(_))) = pub_events.poll().await {
                acked += 1;
            }
        }
    })
    .await
    .expect("both publishes acked");
    // Longer than the short message's expiry, while the subscriber is away.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let (_sub, mut events) = Client5::new(opts, 10);
    let delivered = tokio::time::timeout(WAIT, async {
        let mut topics = Vec::new();
        loop {
            if let Ok(Event5::Incoming(Incoming5::Publish(p))) = events.poll().await {
                let topic = String::from_utf8_lossy(&p.topic).to_string();
                topics.push(topic.clone());
                if topic == "exp/long" {
                    return (topics, p.properties);
                }
            }
        }
    })
    .await
    .expect("the unexpired message is delivered");
    let (topics, props) = delivered;
    // In publish order: an expired exp/short would have come first.
    assert_eq!(topics, ["exp/long"]);
    let props = props.expect("properties delivered");
    let left = props.message_expiry_interval.expect("expiry kept");
    assert!((1..=598).contains(&left), "expiry left: {left}");
    assert_eq!(
        props.user_properties,
        [("site".to_string(), "7".to_string())],
        "the device's properties, none of the gateway's"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_will_delay_waits_and_a_reconnect_cancels_the_will() {
    use rumqttc::v5::mqttbytes::v5::{LastWill as Will5, LastWillProperties};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, Incoming as Incoming5};

    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let (watcher, mut watch_events) = AsyncClient::new(options("watcher", port), 10);
    watcher
        .subscribe("gone/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut watch_events, subscribed).await;

    let device = |id: &str| {
        let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        let props = LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        };
        o.set_last_will(Will5::new(
            format!("gone/{id}"),
            "offline",
            QoS5::AtLeastOnce,
            false,
            Some(props),
        ));
        o
    };
    let connect = |opts: rumqttc::v5::MqttOptions| async move {
        let (client, mut events) = Client5::new(opts, 10);
        tokio::time::timeout(WAIT, async {
            while !matches!(
                events.poll().await,
                Ok(Event5::Incoming(Incoming5::ConnAck(_)))
            ) {}
        })
        .await
        .expect("CONNACK");
        (client, events)
    };
    // "b" vanishes and is back well within its will delay: its will is void.
    let (_b, b_events) = connect(device("b")).await;
    drop(b_events);
    gw.counter_until(
        "edgebridge_connections_closed_total",
        &[("reason", "peer_closed")],
        1.0,
        WAIT,
    )
    .await;
    let mut back = rumqttc::v5::MqttOptions::new("b", "127.0.0.1", port);
    back.set_keep_alive(Duration::from_secs(5));
    let (_b_again, mut b_again_events) = connect(back).await;
    let pumping = tokio::spawn(async move { while b_again_events.poll().await.is_ok() {} });
    // "a" vanishes after that and stays away: its will comes after the delay. A will of
    // "b" (delayed as long, and earlier) would have come first.
    let (_a, a_events) = connect(device("a")).await;
    drop(a_events);
    let will = until(&mut watch_events, |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(will.topic, "gone/a");
    assert_eq!(will.payload.as_ref(), b"offline");
    pumping.abort();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retained_messages_and_persistent_subscriptions_survive_a_restart() {
    let gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    // A persistent session subscribes at QoS 1 and leaves.
    let mut opts = options("press-5", port);
    opts.set_clean_session(false);
    let (device, mut events) = AsyncClient::new(opts, 10);
    until(&mut events, connected).await;
    device
        .subscribe("cmd/press-5/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut events, subscribed).await;
    device.disconnect().await.expect("queue DISCONNECT");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
    drop(events);
    // A retained status, and one retained then cleared (an empty retained payload).
    let (publisher, mut pub_events) = AsyncClient::new(options("plc-1", port), 10);
    publisher
        .publish("status/plc-1", QoS::AtLeastOnce, true, "running")
        .await
        .expect("publish");
    publisher
        .publish("status/plc-2", QoS::AtLeastOnce, true, "stopped")
        .await
        .expect("publish");
    publisher
        .publish("status/plc-2", QoS::AtLeastOnce, true, "")
        .await
        .expect("publish");
    let mut acked = 0;
    while acked < 3 {
        until(&mut pub_events, |e| {
            matches!(e, Event::Incoming(Incoming::PubAck(_))).then_some(())
        })
        .await;
        acked += 1;
    }
    drop(pub_events);
    let mut gw = gw;
    gw.shutdown().await;

    // Same data_dir.
    let mut gw = TestGateway::start_in(FILE_SINK, gw.dir).await;
    let port = gw.port();
    // While press-5 is still away, a command for it comes.
    let (commander, mut cmd_events) = AsyncClient::new(options("commander", port), 10);
    commander
        .publish("cmd/press-5/stop", QoS::AtLeastOnce, false, "now")
        .await
        .expect("publish");
    until(&mut cmd_events, |e| {
        matches!(e, Event::Incoming(Incoming::PubAck(_))).then_some(())
    })
    .await;
    // press-5 comes back: its session (and so the command) is there.
    let mut opts = options("press-5", port);
    opts.set_clean_session(false);
    let (_device, mut events) = AsyncClient::new(opts, 10);
    assert!(until(&mut events, connected).await, "session present");
    let p = until(&mut events, |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_ref(), p.qos),
        ("cmd/press-5/stop", &b"now"[..], QoS::AtLeastOnce)
    );
    // A new subscriber gets the retained status, and nothing for the cleared topic.
    let (watcher, mut watch_events) = AsyncClient::new(options("watcher", port), 10);
    watcher
        .subscribe("status/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = until(&mut watch_events, |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_ref(), got.retain),
        ("status/plc-1", &b"running"[..], true)
    );
    // The marker comes after any retained message: status/plc-2 would have come before.
    commander
        .publish("status/zz-marker", QoS::AtLeastOnce, false, "end")
        .await
        .expect("publish");
    let pumping = tokio::spawn(async move { while cmd_events.poll().await.is_ok() {} });
    let next = until(&mut watch_events, |e| match e {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(next.topic, "status/zz-marker");
    pumping.abort();
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_session_expiry_ends_a_session_and_session_present_says_so() {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, Incoming as Incoming5};

    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let opts = |id: &str, expiry: u32| {
        let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(expiry));
        o
    };
    // Returns CONNACK's session present, the client and its event loop.
    let connect = |o: rumqttc::v5::MqttOptions| async move {
        let (client, mut events) = Client5::new(o, 10);
        let present = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(Event5::Incoming(Incoming5::ConnAck(ack))) = events.poll().await {
                    return ack.session_present;
                }
            }
        })
        .await
        .expect("CONNACK");
        (present, client, events)
    };
    let subscribe_and_leave = |o: rumqttc::v5::MqttOptions| async move {
        let (present, client, mut events) = connect(o).await;
        assert!(!present, "a new session");
        client
            .subscribe("exp/#", QoS5::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::time::timeout(WAIT, async {
            while !matches!(
                events.poll().await,
                Ok(Event5::Incoming(Incoming5::SubAck(_)))
            ) {}
        })
        .await
        .expect("SUBACK");
        client.disconnect().await.expect("queue DISCONNECT");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    };
    subscribe_and_leave(opts("short", 1)).await;
    subscribe_and_leave(opts("long", 600)).await;
    // Longer than the short session's expiry.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (publisher, mut pub_events) = AsyncClient::new(options("publisher", port), 10);
    publisher
        .publish("exp/news", QoS::AtLeastOnce, false, "m")
        .await
        .expect("publish");
    until(&mut pub_events, |e| {
        matches!(e, Event::Incoming(Incoming::PubAck(_))).then_some(())
    })
    .await;

    let (present, _long, mut long_events) = connect(opts("long", 600)).await;
    assert!(present, "the unexpired session is present");
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event5::Incoming(Incoming5::Publish(p))) = long_events.poll().await {
                return p.topic;
            }
        }
    })
    .await
    .expect("the unexpired session got what came meanwhile");
    assert_eq!(&got[..], b"exp/news");

    let pumping = tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    let (present, short, mut short_events) = connect(opts("short", 1)).await;
    assert!(!present, "the expired session is gone");
    // Nothing of the old session comes back: not the message, not the subscription.
    // A marker published now on a topic it subscribes anew arrives first.
    short
        .subscribe("marker/#", QoS5::AtLeastOnce)
        .await
        .expect("subscribe");
    let mut subscribed = false;
    let first = tokio::time::timeout(WAIT, async {
        loop {
            match short_events.poll().await {
                Ok(Event5::Incoming(Incoming5::SubAck(_))) if !subscribed => {
                    subscribed = true;
                    publisher
                        .publish("marker/x", QoS::AtLeastOnce, false, "m")
                        .await
                        .expect("publish");
                }
                Ok(Event5::Incoming(Incoming5::Publish(p))) => return p.topic,
                Ok(_) => {}
                Err(e) => panic!("short failed: {e}"),
            }
        }
    })
    .await
    .expect("the marker arrives");
    assert_eq!(&first[..], b"marker/x");
    pumping.abort();
    gw.shutdown().await;
}

/// Reads one MQTT packet: its first byte and its body (15 s at most).
async fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let first = read_n(s, 1).await[0];
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = read_n(s, 1).await[0];
        len |= ((b & 0x7F) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    (first, read_n(s, len).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_receive_maximum_of_a_device_bounds_its_unacked_deliveries() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // MQTT 5 CONNECT, clean start, receive maximum 2.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30];
    body.extend_from_slice(&[3, 0x21, 0, 2]);
    body.extend_from_slice(&[0, 5]);
    body.extend_from_slice(b"slow5");
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend_from_slice(&body);
    s.write_all(&connect).await.expect("CONNECT");
    assert_eq!(read_packet(&mut s).await.0, 0x20, "CONNACK");
    // SUBSCRIBE rm/# at QoS 1, packet id 1.
    let mut sub = vec![0x82, 10, 0, 1, 0, 0, 4];
    sub.extend_from_slice(b"rm/#");
    sub.push(0x01);
    s.write_all(&sub).await.expect("SUBSCRIBE");
    let (kind, suback) = read_packet(&mut s).await;
    assert_eq!(
        (kind, suback.last().copied()),
        (0x90, Some(1)),
        "SUBACK QoS 1"
    );

    let (publisher, mut pub_events) = AsyncClient::new(options("busy", port), 10);
    for i in 0..5u8 {
        publisher
            .publish("rm/x", QoS::AtLeastOnce, false, vec![i])
            .await
            .expect("publish");
    }
    let pumping = tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    // Two deliveries, QoS 1, then nothing while the device acks none of them.
    let mut pkids = Vec::new();
    for _ in 0..2 {
        let (first, body) = read_packet(&mut s).await;
        assert_eq!(first & 0xF6, 0x32, "a QoS 1 PUBLISH");
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        pkids.push([body[2 + topic_len], body[3 + topic_len]]);
    }
    let mut byte = [0u8; 1];
    let more = tokio::time::timeout(Duration::from_millis(1000), s.read(&mut byte)).await;
    assert!(more.is_err(), "a third delivery beyond the receive maximum");
    // One PUBACK lets exactly one more through.
    s.write_all(&[0x40, 2, pkids[0][0], pkids[0][1]])
        .await
        .expect("PUBACK");
    let (first, _) = read_packet(&mut s).await;
    assert_eq!(first & 0xF6, 0x32, "the third delivery");
    pumping.abort();
    gw.shutdown().await;
}

/// An MQTT 5 client of the gateway and its event loop, connected (CONNACK read).
async fn client5(
    id: &str,
    port: u16,
    max_packet: Option<u32>,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    use rumqttc::v5::{Event as Event5, Incoming as Incoming5};
    let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    if max_packet.is_some() {
        opts.set_max_packet_size(max_packet);
    }
    let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 100);
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(Event5::Incoming(Incoming5::ConnAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("{id}: {e}"),
            }
        }
    })
    .await
    .expect("CONNACK within 15 s");
    (client, events)
}

/// Polls a v5 client until `count` packets of the kind `want` picks have come.
async fn until5<T>(
    events: &mut rumqttc::v5::EventLoop,
    count: usize,
    mut want: impl FnMut(&rumqttc::v5::Event) -> Option<T>,
) -> Vec<T> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        while got.len() < count {
            match events.poll().await {
                Ok(event) => got.extend(want(&event)),
                Err(e) => panic!("client failed: {e}"),
            }
        }
    })
    .await
    .expect("events within 15 s");
    got
}

fn suback5(e: &rumqttc::v5::Event) -> Option<()> {
    use rumqttc::v5::{Event as Event5, Incoming as Incoming5};
    matches!(e, Event5::Incoming(Incoming5::SubAck(_))).then_some(())
}

fn puback5(e: &rumqttc::v5::Event) -> Option<()> {
    use rumqttc::v5::{Event as Event5, Incoming as Incoming5};
    matches!(e, Event5::Incoming(Incoming5::PubAck(_))).then_some(())
}

/// (topic, retain flag) of a delivery.
fn delivery5(e: &rumqttc::v5::Event) -> Option<(String, bool)> {
    use rumqttc::v5::{Event as Event5, Incoming as Incoming5};
    match e {
        Event5::Incoming(Incoming5::Publish(p)) => {
            Some((String::from_utf8_lossy(&p.topic).into_owned(), p.retain))
        }
        _ => None,
    }
}

/// MQTT 5 subscription options, which rumqttd's router keeps but does not apply: no local
/// (a device's own messages are not delivered back to it), retain as published (the flag
/// of a live delivery kept), retain handling 2 (no retained messages at SUBSCRIBE) and 1
/// (only for a new subscription); with controls for each, in one ordered stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_subscription_options_no_local_retain_as_published_and_retain_handling() {
    use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
    use rumqttc::v5::mqttbytes::QoS as QoS5;

    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let (other, mut other_events) = client5("opt-other", port, None).await;
    for topic in ["opt/r", "opt/r2"] {
        other
            .publish(topic, QoS5::AtLeastOnce, true, "kept")
            .await
            .expect("publish retained");
    }
    until5(&mut other_events, 2, puback5).await;

    let (dev, mut events) = client5("opt-dev", port, None).await;
    let filter = |path: &str, nolocal: bool, preserve_retain: bool, rule| Filter {
        path: path.into(),
        qos: QoS5::AtLeastOnce,
        nolocal,
        preserve_retain,
        retain_forward_rule: rule,
    };
    dev.subscribe_many([
        filter(
            "opt/own/#",
            true,
            false,
            RetainForwardRule::OnEverySubscribe,
        ),
        filter(
            "opt/rap/#",
            false,
            true,
            RetainForwardRule::OnEverySubscribe,
        ),
        filter(
            "opt/norap/#",
            false,
            false,
            RetainForwardRule::OnEverySubscribe,
        ),
        filter("opt/r", false, false, RetainForwardRule::Never),
        filter("opt/r2", false, false, RetainForwardRule::OnEverySubscribe),
        filter(
            "opt/end/#",
            false,
            false,
            RetainForwardRule::OnEverySubscribe,
        ),
    ])
    .await
    .expect("subscribe");
    // The SUBACK, then opt/r2's retained message (opt/r's is held back).
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut acked = false;
        while !acked || seen.is_empty() {
            match events.poll().await {
                Ok(event) => {
                    acked |= suback5(&event).is_some();
                    seen.extend(delivery5(&event));
                }
                Err(e) => panic!("client failed: {e}"),
            }
        }
    })
    .await
    .expect("SUBACK and a retained message");

    // Its own message first (acked before the others publish), then the others'.
    dev.publish("opt/own/1", QoS5::AtLeastOnce, false, "mine")
        .await
        .expect("publish");
    let mut mine_acked = false;
    tokio::time::timeout(WAIT, async {
        while !mine_acked {
            match events.poll().await {
                Ok(event) => {
                    mine_acked |= puback5(&event).is_some();
                    seen.extend(delivery5(&event));
                }
                Err(e) => panic!("client failed: {e}"),
            }
        }
    })
    .await
    .expect("PUBACK of its own message");
    for (topic, retain) in [
        ("opt/own/2", false),
        ("opt/rap/x", true),
        ("opt/norap/x", true),
        ("opt/end/1", false),
    ] {
        other
            .publish(topic, QoS5::AtLeastOnce, retain, "theirs")
            .await
            .expect("publish");
    }
    until5(&mut other_events, 4, puback5).await;
    while !seen.iter().any(|(t, _)| t == "opt/end/1") {
        seen.extend(until5(&mut events, 1, delivery5).await);
    }
    let strings = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
        v.iter().map(|(t, r)| (t.to_string(), *r)).collect()
    };
    assert_eq!(
        seen,
        strings(&[
            ("opt/r2", true),
            ("opt/own/2", false),
            ("opt/rap/x", true),
            ("opt/norap/x", false),
            ("opt/end/1", false),
        ]),
        "no own message back (no local), retained only where asked, the published flag only \
         with retain as published"
    );

    // Retain handling 1: nothing for a subscription that exists, the message for a new one.
    dev.subscribe_many([
        filter("opt/r2", false, false, RetainForwardRule::OnNewSubscribe),
        filter("opt/rap/#", false, false, RetainForwardRule::OnNewSubscribe),
    ])
    .await
    .expect("subscribe again");
    dev.subscribe_many([filter(
        "opt/norap/+",
        false,
        false,
        RetainForwardRule::OnNewSubscribe,
    )])
    .await
    .expect("subscribe a new filter");
    let mut later = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut acks = 0;
        while acks < 2 || later.is_empty() {
            match events.poll().await {
                Ok(event) => {
                    acks += usize::from(suback5(&event).is_some());
                    later.extend(delivery5(&event));
                }
                Err(e) => panic!("client failed: {e}"),
            }
        }
    })
    .await
    .expect("two SUBACKs and a retained message");
    other
        .publish("opt/end/2", QoS5::AtLeastOnce, false, "theirs")
        .await
        .expect("publish");
    until5(&mut other_events, 1, puback5).await;
    while !later.iter().any(|(t, _)| t == "opt/end/2") {
        later.extend(until5(&mut events, 1, delivery5).await);
    }
    assert_eq!(
        later,
        strings(&[("opt/norap/x", true), ("opt/end/2", false)]),
        "retain handling 1: the retained message only for the new subscription"
    );
    gw.shutdown().await;
}

/// An MQTT 5 device's maximum packet size: a delivery larger than it is not sent (the
/// device would have to close the connection), the next one is, and carries the
/// subscription identifier the device gave its subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_deliveries_over_the_devices_maximum_packet_size_are_dropped() {
    use rumqttc::v5::mqttbytes::QoS as QoS5;

    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let (dev, mut events) = client5("small-dev", port, Some(512)).await;
    let props = rumqttc::v5::mqttbytes::v5::SubscribeProperties {
        id: Some(7),
        user_properties: Vec::new(),
    };
    dev.subscribe_with_properties("big/#", QoS5::AtLeastOnce, props)
        .await
        .expect("subscribe");
    until5(&mut events, 1, suback5).await;
    let (other, mut other_events) = client5("big-pub", port, None).await;
    other
        .publish("big/1", QoS5::AtLeastOnce, false, vec![b'x'; 2000])
        .await
        .expect("publish");
    other
        .publish("big/2", QoS5::AtLeastOnce, false, "small")
        .await
        .expect("publish");
    until5(&mut other_events, 2, puback5).await;
    let got = until5(&mut events, 1, |e| match e {
        rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::Publish(p)) => Some((
            String::from_utf8_lossy(&p.topic).into_owned(),
            p.properties
                .as_ref()
                .map(|p| p.subscription_identifiers.clone()),
        )),
        _ => None,
    })
    .await;
    assert_eq!(
        got,
        [("big/2".to_string(), Some(vec![7]))],
        "only the one that fits, with its subscription identifier"
    );
    gw.shutdown().await;
}

/// The server keep alive (property 0x13) of an MQTT 5 CONNACK's body, if any.
fn server_keep_alive(connack: &[u8]) -> Option<u16> {
    let len = usize::from(*connack.get(2)?);
    let props = connack.get(3..3 + len)?;
    let mut i = 0;
    while i < props.len() {
        let id = props[i];
        i += 1;
        let field = |n: usize| props.get(i..i + n);
        let string_len = |at: usize| {
            props
                .get(at..at + 2)
                .map(|b| 2 + usize::from(u16::from_be_bytes([b[0], b[1]])))
        };
        let skip = match id {
            0x13 => {
                let b = field(2)?;
                return Some(u16::from_be_bytes([b[0], b[1]]));
            }
            0x21 | 0x22 => 2,
            0x11 | 0x27 => 4,
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x12 | 0x1A | 0x1C | 0x1F => string_len(i)?,
            0x26 => {
                let key = string_len(i)?;
                key + string_len(i + key)?
            }
            _ => return None,
        };
        i += skip;
    }
    None
}

/// A listener's `max_keep_alive`: an MQTT 5 device that asks for a longer keep alive, or
/// none, is told the limit in CONNACK (server keep alive; rumqttc then pings at it) and
/// closed when it stays silent past 1.5× that limit; a device within the limit is told
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_server_keep_alive_caps_a_devices_keep_alive() {
    use rumqttc::v5::{Event as Event5, Incoming as Incoming5};

    let body = format!(
        "[[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:0\"\nmax_keep_alive = \"5s\"\n{FILE_SINK}"
    );
    let mut gw = TestGateway::start(&body).await;
    let port = gw.port();
    // rumqttc takes no keep alive under 5 s.
    for (id, keep_alive, want) in [("long-dev", 600, Some(5)), ("fine-dev", 5, None)] {
        let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(keep_alive));
        let (_client, mut events) = rumqttc::v5::AsyncClient::new(opts, 10);
        let told = tokio::time::timeout(WAIT, async {
            loop {
                match events.poll().await {
                    Ok(Event5::Incoming(Incoming5::ConnAck(ack))) => {
                        return ack.properties.as_ref().and_then(|p| p.server_keep_alive)
                    }
                    Ok(_) => {}
                    Err(e) => panic!("connect: {e}"),
                }
            }
        })
        .await
        .expect("CONNACK within 15 s");
        assert_eq!(told, want, "{id}: server keep alive in CONNACK");
    }

    // A device that asks for no keep alive (0) and then stays silent.
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut connect = connect_packet("MQTT", 5, "silent-dev");
    (connect[10], connect[11]) = (0, 0);
    s.write_all(&connect).await.expect("send CONNECT");
    let (kind, connack) = read_packet(&mut s).await;
    assert_eq!(kind, 0x20, "CONNACK");
    assert_eq!(server_keep_alive(&connack), Some(5), "{connack:?}");
    assert!(
        closed_by_peer(&mut s).await,
        "the silent device is closed within 15 s"
    );
    assert!(
        gw.eventually(WAIT, |g| g.counter(
            "edgebridge_connections_closed_total",
            &[("listener", "devices"), ("reason", "keep_alive")]
        ) >= 1.0)
            .await,
        "counted as a keep-alive close"
    );
    gw.shutdown().await;
}

/// Until a device first subscribes, messages that are not retained skip rumqttd's router
/// (nobody could receive them there). A retained message published then is still kept,
/// and a device that subscribes later gets it and everything published after its
/// SUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_subscriber_gets_the_retained_message_and_what_follows() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let (publisher, mut pub_events) = AsyncClient::new(options("early-pub", port), 10);
    let puback = |e: &Event| matches!(e, Event::Incoming(Incoming::PubAck(_))).then_some(());
    publisher
        .publish("early/state", QoS::AtLeastOnce, true, "kept")
        .await
        .expect("publish");
    until(&mut pub_events, puback).await;
    publisher
        .publish("early/live", QoS::AtLeastOnce, false, "before")
        .await
        .expect("publish");
    until(&mut pub_events, puback).await;

    let (sub, mut events) = AsyncClient::new(options("late-sub", port), 10);
    sub.subscribe("early/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut events, subscribed).await;
    publisher
        .publish("early/live", QoS::AtLeastOnce, false, "after")
        .await
        .expect("publish");
    until(&mut pub_events, puback).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let p = until(&mut events, |e| match e {
            Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await;
        got.push((p.topic.clone(), p.payload.to_vec(), p.retain));
    }
    assert_eq!(
        got,
        [
            ("early/state".to_string(), b"kept".to_vec(), true),
            ("early/live".to_string(), b"after".to_vec(), false),
        ]
    );
    gw.shutdown().await;
}

/// A persistent MQTT 5 session's subscription options outlive a restart of the gateway:
/// after it, the session's no-local subscription still keeps the device's own messages
/// from coming back to it, and the others' still come.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt5_subscription_options_of_a_persistent_session_survive_a_restart() {
    use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient as Client5, Event as Event5, Incoming as Incoming5};

    let persistent = |port: u16| {
        let mut o = rumqttc::v5::MqttOptions::new("keep-dev", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600));
        o
    };
    // Returns CONNACK's session present, the client and its event loop.
    let connect = |o: rumqttc::v5::MqttOptions| async move {
        let (client, mut events) = Client5::new(o, 10);
        let present = tokio::time::timeout(WAIT, async {
            loop {
                match events.poll().await {
                    Ok(Event5::Incoming(Incoming5::ConnAck(ack))) => return ack.session_present,
                    Ok(_) => {}
                    Err(e) => panic!("keep-dev: {e}"),
                }
            }
        })
        .await
        .expect("CONNACK");
        (present, client, events)
    };

    let gw = TestGateway::start(FILE_SINK).await;
    let (present, dev, mut events) = connect(persistent(gw.port())).await;
    assert!(!present, "a new session");
    dev.subscribe_many([Filter {
        path: "keep/#".into(),
        qos: QoS5::AtLeastOnce,
        nolocal: true,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    }])
    .await
    .expect("subscribe");
    until5(&mut events, 1, suback5).await;
    dev.disconnect().await.expect("queue DISCONNECT");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while events.poll().await.is_ok() {}
    })
    .await;
    drop(events);
    let mut gw = gw;
    gw.shutdown().await;

    // Same data_dir.
    let mut gw = TestGateway::start_in(FILE_SINK, gw.dir).await;
    let port = gw.port();
    let (present, dev, mut events) = connect(persistent(port)).await;
    assert!(present, "the session outlived the restart");
    // Its own message, acked before the other client publishes: were the option lost,
    // it would be the first delivery.
    dev.publish("keep/own", QoS5::AtLeastOnce, false, "mine")
        .await
        .expect("publish");
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await {
                Ok(event) => {
                    seen.extend(delivery5(&event));
                    if puback5(&event).is_some() {
                        return;
                    }
                }
                Err(e) => panic!("keep-dev: {e}"),
            }
        }
    })
    .await
    .expect("PUBACK of its own message");
    let (other, mut other_events) = client5("keep-other", port, None).await;
    other
        .publish("keep/theirs", QoS5::AtLeastOnce, false, "theirs")
        .await
        .expect("publish");
    until5(&mut other_events, 1, puback5).await;
    while !seen.iter().any(|(t, _)| t == "keep/theirs") {
        seen.extend(until5(&mut events, 1, delivery5).await);
    }
    assert_eq!(
        seen,
        [("keep/theirs".to_string(), false)],
        "no local held across the restart"
    );
    gw.shutdown().await;
}
