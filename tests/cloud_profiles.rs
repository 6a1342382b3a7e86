//! Cloud profiles against brokers standing in for each cloud.
//!
//! AWS IoT Core's per-connection limits (100 PUBLISH/s, 512 KiB/s): `common/aws_limits.rs`,
//! a mutual-TLS proxy in front of a plain Mosquitto that closes a connection going over.
//!
//! AWS IoT Core: Mosquitto with TLS and `require_certificate true` (mutual TLS, as AWS);
//! the sink offers ALPN `x-amzn-mqtt-ca`, which Mosquitto ignores.
//! Azure IoT Hub: rumqttd running in the test, whose auth handler checks the username,
//! the client id and the SAS token (signature recomputed here from the key, expiry in the
//! future) of every CONNECT and records when each token expires. The stand-in listens on
//! plain TCP (Azure takes TLS only; TLS itself is covered by the AWS and upstream tests).

#[path = "common/aws_limits.rs"]
mod aws_limits;
mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{
    check_sequences, client_options, free_port, publish_seq_with, seq_payload, Collector, Mode,
    Mosquitto, TestCerts,
};
use gateway::TestGateway;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};

const WAIT: Duration = Duration::from_secs(60);

/// Publishes seqs `seqs` of `device`, then one payload of `big` bytes (if any), on
/// `topic` through the gateway; returns the number of PUBACKs.
async fn publish_with_oversized(
    port: u16,
    topic: &str,
    device: u32,
    seqs: std::ops::Range<u64>,
    big: usize,
) -> u64 {
    let mut opts = MqttOptions::new(format!("dev-{device}"), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let acked = publish_seq_with(opts.clone(), topic, device, seqs, QoS::AtLeastOnce).await;
    if big == 0 {
        return acked;
    }
    // Its own client id: the same id reconnecting the instant the previous connection
    // closed races rumqttd's session takeover, which may close the new connection
    // (a device would reconnect and resend; this test is about the payload limit).
    opts.set_client_id(format!("dev-{device}-big"));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, vec![b'x'; big])
        .await
        .expect("queue the oversized publish");
    let acked_big = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(e) => panic!("device connection failed: {e}"),
            }
        }
    })
    .await;
    assert!(
        matches!(acked_big, Ok(true)),
        "the gateway acks the big message"
    );
    acked + 1
}

fn aws_sink(port: u16, certs: &TestCerts, extra: &str) -> String {
    format!(
        r#"
[sinks.cloud]
type = "mqtt"
profile = "aws-iot"
url = "mqtts://localhost:{port}"
tls = {{ ca = "{}", cert = "{}", key = "{}", alpn = ["x-amzn-mqtt-ca"] }}
backoff_min = "50ms"
backoff_max = "500ms"
{extra}

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud"]
topic = "dt/{{gateway_id}}/{{1}}"

[[rules]]
name = "deep"
from = "deep/#"
to = ["cloud"]
"#,
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    )
}

/// AWS closes the connection on a payload over 128 KiB (and on a topic it refuses); with
/// the profile, such a message is dead-lettered and counted, and the stream around it is
/// delivered on the same connection, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aws_profile_delivers_over_mutual_tls_and_dead_letters_oversized_payloads() {
    let certs = TestCerts::generate();
    let upstream = Mosquitto::start(Mode::MutualTls(&certs));
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::MutualTls(&certs)),
        "dt/#",
    )
    .await;
    // Devices may send up to 1 MiB to the gateway (above AWS's limit).
    let mut gw = TestGateway::start(&format!(
        "[[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:0\"\nmax_packet_size = \"1MiB\"\n{}",
        aws_sink(upstream.port(), &certs, "")
    ))
    .await;

    let topic = "factory/d7/telemetry";
    let big = 128 * 1024 + 1;
    let acked = publish_with_oversized(gw.port(), topic, 7, 0..500, big).await;
    assert_eq!(acked, 501);
    // The `deep/#` rule passes devices' topics through: one with 8 slashes is refused
    // before it is sent (AWS allows 7), and the stream goes on.
    let mut opts = MqttOptions::new("dev-deep", "127.0.0.1", gw.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let deep = "deep/1/2/3/4/5/6/7/8";
    let acked = publish_seq_with(opts, deep, 8, 0..1, QoS::AtLeastOnce).await;
    assert_eq!(acked, 1);
    let acked = publish_with_oversized(gw.port(), topic, 7, 500..1000, 0).await;
    assert_eq!(acked, 500);

    assert!(
        collector.wait_for_unique(1000, WAIT).await,
        "upstream got {} of 1000; mosquitto log:\n{}",
        collector.len(),
        upstream.logs()
    );
    let msgs = collector.messages();
    let report = check_sequences(&msgs);
    assert_eq!(report.per_device_count.get(&7), Some(&1000), "{report:?}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report:?}");
    assert_eq!(
        report.unparsed, 0,
        "the oversized payload never went upstream"
    );
    assert!(msgs.iter().all(|(t, _)| t == "dt/edge-01/d7"));

    let letters = gw.dead_letters("cloud");
    let summary: Vec<_> = letters
        .iter()
        .map(|l| (&l["reason"], &l["topic"], &l["detail"]))
        .collect();
    assert_eq!(letters.len(), 2, "{summary:?}");
    assert_eq!(letters[0]["reason"], "too_large");
    assert_eq!(letters[0]["topic"], "dt/edge-01/d7");
    assert_eq!(letters[0]["payload"].as_str().map(str::len), Some(big));
    assert!(
        letters[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("128 KiB that profile aws-iot allows")),
        "{summary:?}"
    );
    assert_eq!(letters[1]["reason"], "invalid_topic");
    assert_eq!(letters[1]["topic"], deep);
    assert!(
        letters[1]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("has 8 forward slashes")),
        "{summary:?}"
    );
    for reason in ["too_large", "invalid_topic"] {
        assert_eq!(
            gw.counter(
                "edgebridge_buffer_dropped_total",
                &[("sink", "cloud"), ("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    // No disconnect loop: the only errors counted are the two dead letters.
    assert_eq!(
        gw.counter("edgebridge_sink_errors_total", &[("sink", "cloud")]),
        2.0
    );
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "cloud")]), 1.0);
    let acked = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "cloud")]) >= 1000.0
        })
        .await;
    assert!(acked, "every message is confirmed by the upstream");
    gw.shutdown().await;
}

/// Another client taking the gateway's client id makes the broker close the gateway's
/// connection right after each CONNACK: counted as `closed_after_connack`, with the hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aws_profile_names_a_close_right_after_connack() {
    let certs = TestCerts::generate();
    let upstream = Mosquitto::start(Mode::MutualTls(&certs));
    let mut gw = TestGateway::start(&aws_sink(upstream.port(), &certs, "")).await;
    let up = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_up", &[("sink", "cloud")]) == 1.0
        })
        .await;
    assert!(up, "the sink connects; mosquitto log:\n{}", upstream.logs());

    // A second client with the same id (the gateway's id, edge-01), reconnecting forever.
    let intruder = {
        let opts = client_options("edge-01", upstream.port(), Mode::MutualTls(&certs));
        let (_client, mut eventloop) = AsyncClient::new(opts, 10);
        tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let named = gw
        .eventually(WAIT, |g| {
            g.counter(
                "edgebridge_sink_errors_total",
                &[("sink", "cloud"), ("reason", "closed_after_connack")],
            ) >= 1.0
        })
        .await;
    intruder.abort();
    assert!(
        named,
        "errors: {}",
        gw.gw()
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("edgebridge_sink_errors_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The error is counted before it is recorded as the last one.
    let detail_of = |s: &serde_json::Value| {
        let cloud = gateway::sink(s, "cloud");
        cloud["last_error"]["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let status = gateway::status_until(gw.gw().admin_addr, WAIT, |s| {
        detail_of(s).contains("same client id")
    })
    .await;
    let cloud = gateway::sink(&status, "cloud");
    let detail = detail_of(&status);
    assert!(
        detail.contains("same client id") && detail.contains("client id edge-01"),
        "{cloud:#}"
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Azure IoT Hub stand-in
// ---------------------------------------------------------------------------------------

const HUB: &str = "myhub.azure-devices.net";
const DEVICE: &str = "edge-01";
/// base64 of "secret-key-for-tests-only".
const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ==";

/// One CONNECT the stand-in saw from the device.
#[derive(Debug, Clone)]
struct Connect {
    /// Seconds since the Unix epoch.
    at: f64,
    /// The token's `se`.
    expiry: u64,
    accepted: bool,
}

struct AzureStandIn {
    port: u16,
    connects: Arc<Mutex<Vec<Connect>>>,
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

fn encode(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    utf8_percent_encode(s, SET).to_string()
}

/// Checks a SAS token the way IoT Hub does: resource, signature over
/// "{resource}\n{expiry}" with the device key, expiry in the future. Returns the expiry.
fn verify_sas(password: &str, key: &[u8]) -> Result<u64, String> {
    let fields = password
        .strip_prefix("SharedAccessSignature ")
        .ok_or("not a SharedAccessSignature")?;
    let mut sr = None;
    let mut sig = None;
    let mut se = None;
    for pair in fields.split('&') {
        match pair.split_once('=') {
            Some(("sr", v)) => sr = Some(v),
            Some(("sig", v)) => sig = Some(v),
            Some(("se", v)) => se = v.parse::<u64>().ok(),
            _ => return Err(format!("unexpected field {pair}")),
        }
    }
    let (sr, sig, se) = (sr.ok_or("no sr")?, sig.ok_or("no sig")?, se.ok_or("no se")?);
    let resource = encode(&format!("{HUB}/devices/{DEVICE}"));
    if sr != resource {
        return Err(format!("sr {sr} is not {resource}"));
    }
    let signing_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&signing_key, format!("{sr}\n{se}").as_bytes());
    let expected = encode(&base64::engine::general_purpose::STANDARD.encode(tag.as_ref()));
    if sig != expected {
        return Err("bad signature".into());
    }
    if (se as f64) <= now_secs() {
        return Err(format!("expired at {se}"));
    }
    Ok(se)
}

impl AzureStandIn {
    async fn start() -> AzureStandIn {
        let key = base64::engine::general_purpose::STANDARD
            .decode(KEY)
            .expect("test key is base64");
        let connects = Arc::new(Mutex::new(Vec::new()));
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: 100,
                max_outgoing_packet_count: 200,
                max_segment_size: 10 * 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        let mut connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1024 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let seen = connects.clone();
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let (seen, key) = (seen.clone(), key.clone());
            async move {
                if client_id == "collector" {
                    return user == "collector" && pass == "collector-secret";
                }
                let expected_user = format!("{HUB}/{DEVICE}/?api-version=2021-04-12");
                let verdict = if client_id != DEVICE || user != expected_user {
                    Err(format!("client id {client_id} / username {user}"))
                } else {
                    verify_sas(&pass, &key)
                };
                let accepted = verdict.is_ok();
                seen.lock().expect("lock").push(Connect {
                    at: now_secs(),
                    expiry: verdict.unwrap_or(0),
                    accepted,
                });
                accepted
            }
        });
        let settings = ServerSettings {
            name: "azure".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let mut server = Server::new(settings, router_tx, V4);
        tokio::spawn(async move {
            let _ = server.start(LinkType::Remote).await;
        });
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return AzureStandIn { port, connects };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the Azure stand-in did not listen on {addr}");
    }

    fn connects(&self) -> Vec<Connect> {
        self.connects.lock().expect("lock").clone()
    }

    async fn collector(&self) -> Collector {
        let mut opts = MqttOptions::new("collector", "127.0.0.1", self.port);
        opts.set_credentials("collector", "collector-secret");
        opts.set_max_packet_size(1 << 20, 1 << 20);
        Collector::start(opts, &format!("devices/{DEVICE}/messages/events/#")).await
    }
}

fn azure_sink(port: u16, key_var_value: &str, ttl: &str) -> String {
    format!(
        r#"
[sinks.hub]
type = "mqtt"
profile = "azure-iot-hub"
hub = "{HUB}"
device_id = "{DEVICE}"
url = "mqtt://127.0.0.1:{port}"
shared_access_key = "{key_var_value}"
sas_ttl = "{ttl}"
properties = {{ "$.ct" = "application/json" }}
backoff_min = "50ms"
backoff_max = "500ms"

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["hub"]
topic = "dt/{{gateway_id}}/{{1}}"
"#
    )
}

/// With a 4 s token lifetime, a steady stream runs over several renewals: each new
/// connection is made before the previous token expires (so the hub never has to drop
/// it), the stand-in accepts every token, and every message arrives on the device's
/// events topic with its MQTT topic as a property. A payload over 256 KiB is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_sas_token_is_renewed_before_expiry_without_losing_messages() {
    let hub = AzureStandIn::start().await;
    let collector = hub.collector().await;
    let mut gw = TestGateway::start(&azure_sink(hub.port, KEY, "4s")).await;

    let port = gw.port();
    let total = 3_000u64;
    let stream = tokio::spawn(async move {
        let mut acked = 0;
        // 100 messages every 400 ms: 12 s, three or four token lifetimes.
        for chunk in 0..30u64 {
            let seqs = chunk * 100..(chunk + 1) * 100;
            let big = if chunk == 10 { 256 * 1024 + 1 } else { 0 };
            acked += publish_with_oversized(port, "factory/d3/telemetry", 3, seqs, big).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        acked
    });
    assert_eq!(stream.await.expect("publisher"), total + 1);

    let complete = collector.wait_for_unique(total as usize, WAIT).await;
    let msgs = collector.messages();
    let report = check_sequences(&msgs);
    let seen: BTreeSet<u64> = msgs
        .iter()
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    let missing: Vec<u64> = (0..total).filter(|s| !seen.contains(s)).collect();
    assert!(
        complete && missing.is_empty(),
        "hub got {} of {total}; missing {missing:?}; connects {:?}",
        msgs.len(),
        hub.connects()
    );
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(
        report.unparsed, 0,
        "the oversized payload never went upstream"
    );
    let topic = "devices/edge-01/messages/events/topic=dt%2Fedge-01%2Fd3&$.ct=application%2Fjson";
    assert!(msgs.iter().all(|(t, _)| t == topic), "{:?}", msgs[0].0);
    assert_eq!(msgs[0].1, seq_payload(3, 0));

    let connects = hub.connects();
    assert!(
        connects.iter().all(|c| c.accepted),
        "the stand-in refused a token: {connects:?}"
    );
    assert!(
        connects.len() >= 3,
        "at least two renewals in 12 s: {connects:?}"
    );
    for pair in connects.windows(2) {
        assert!(
            pair[1].at < pair[0].expiry as f64,
            "renewed after the token expired: {connects:?}"
        );
    }
    // Renewals are not failures.
    let letters = gw.dead_letters("hub");
    let summary: Vec<_> = letters
        .iter()
        .map(|l| (&l["reason"], &l["topic"]))
        .collect();
    assert_eq!(letters.len(), 1, "{summary:?}");
    assert_eq!(letters[0]["reason"], "too_large");
    let errors: Vec<String> = gw
        .gw()
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("edgebridge_sink_errors_total"))
        .map(String::from)
        .collect();
    assert_eq!(
        gw.counter("edgebridge_sink_errors_total", &[("sink", "hub")]),
        1.0,
        "only the dead letter counts as an error: {errors:#?}; connects {:?}",
        hub.connects()
    );
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "hub")]), 1.0);
    gw.shutdown().await;
}

/// The stand-in really checks the signature: a gateway with another key is refused, stays
/// down, and keeps its messages buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_wrong_key_is_refused_and_messages_stay_buffered() {
    let hub = AzureStandIn::start().await;
    let wrong = base64::engine::general_purpose::STANDARD.encode("another-key");
    let mut gw = TestGateway::start(&azure_sink(hub.port, &wrong, "1h")).await;
    let mut opts = MqttOptions::new("dev", "127.0.0.1", gw.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let acked = publish_seq_with(opts, "factory/d1/telemetry", 1, 0..50, QoS::AtLeastOnce).await;
    assert_eq!(acked, 50);
    let refused = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_errors_total", &[("sink", "hub")]) >= 2.0
        })
        .await;
    assert!(refused, "connection failures are counted");
    let connects = hub.connects();
    assert!(
        connects.len() >= 2 && connects.iter().all(|c| !c.accepted),
        "{connects:?}"
    );
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "hub")]), 0.0);
    assert_eq!(
        gw.counter("edgebridge_sink_delivered_total", &[("sink", "hub")]),
        0.0
    );
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "hub")]),
        50.0
    );
    gw.shutdown().await;
}

/// Cloud-to-device: the Azure profile's sink subscribes to the device's `devicebound`
/// topic through `[[downlinks]]`; a command the hub sends (with Azure's URL-encoded
/// property bag as the last level) reaches a local device on the mapped topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azure_cloud_to_device_messages_reach_local_devices_through_downlinks() {
    let hub = AzureStandIn::start().await;
    let body = format!(
        "{}\n[[downlinks]]\nsink = \"hub\"\nfrom = \"devices/{DEVICE}/messages/devicebound/#\"\ntopic = \"cmd/{{gateway_id}}\"\n",
        azure_sink(hub.port, KEY, "1h")
    );
    let mut gw = TestGateway::start(&body).await;
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_up", &[("sink", "hub")])
            == 1.0)
            .await,
        "the hub sink connects"
    );
    // A local device waiting for commands.
    let mut opts = MqttOptions::new("machine-1", "127.0.0.1", gw.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (device, mut device_events) = AsyncClient::new(opts, 10);
    device
        .subscribe("cmd/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // The hub's side: a service sending a C2D message to the device.
    let mut opts = MqttOptions::new("collector", "127.0.0.1", hub.port);
    opts.set_credentials("collector", "collector-secret");
    let (service, mut service_events) = AsyncClient::new(opts, 10);
    let service_driver = tokio::spawn(async move { while service_events.poll().await.is_ok() {} });
    let c2d = format!("devices/{DEVICE}/messages/devicebound/%24.to=%2Fdevices%2F{DEVICE}%2Fmessages%2FdeviceBound&cmd=reboot");
    let received = tokio::time::timeout(WAIT, async {
        let mut next_send = tokio::time::Instant::now();
        loop {
            // Sent again until it arrives: the gateway subscribes once it is connected.
            if tokio::time::Instant::now() >= next_send {
                service
                    .publish(&c2d, QoS::AtLeastOnce, false, b"reboot".to_vec())
                    .await
                    .expect("publish C2D");
                next_send = tokio::time::Instant::now() + Duration::from_secs(1);
            }
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(200), device_events.poll()).await
            {
                return (p.topic.clone(), p.payload.to_vec());
            }
        }
    })
    .await
    .expect("the C2D message reaches the local device");
    assert_eq!(received, ("cmd/edge-01".to_string(), b"reboot".to_vec()));
    service_driver.abort();
    gw.shutdown().await;
}

/// A 100-byte reading `{"device":D,"seq":S,"pad":"…"}`.
fn reading(device: u32, seq: u64) -> Vec<u8> {
    let head = format!("{{\"device\":{device},\"seq\":{seq},\"pad\":\"");
    let mut r = head.into_bytes();
    r.resize(98, b'x');
    r.extend_from_slice(b"\"}");
    r
}

/// Publishes `count` readings of `device` at `per_second`, QoS 1, and returns how many
/// were acknowledged (all within `WAIT` after the last one was sent).
async fn publish_readings(port: u16, device: u32, count: u64, per_second: u32) -> u64 {
    let mut opts = MqttOptions::new(format!("meter-{device}"), "127.0.0.1", port);
    opts.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 200);
    let topic = format!("factory/m{device}/telemetry");
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
        for seq in 0..count {
            tick.tick().await;
            if client
                .publish(&topic, QoS::AtLeastOnce, false, reading(device, seq))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while acked < count {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {device}: {e}"),
            Err(_) => break,
        }
    }
    sender.abort();
    acked
}

/// AWS's per-connection limits, enforced by a stand-in that closes a connection going
/// over 100 PUBLISH or 512 KiB in any second: under the aws-iot profile (which paces to
/// those limits) with packing on, 2,000 readings/s of 100 bytes for 10 s pass without one
/// throttled connection, and every reading arrives, once, in order per device, when the
/// packs are unpacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aws_limits_hold_at_2000_readings_per_second_with_packing() {
    let certs = TestCerts::generate();
    let upstream = Mosquitto::start(Mode::Plain);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let aws = aws_limits::AwsLimits::start(&certs, upstream.port()).await;
    let pack = r#"pack = { max_bytes = "120KiB", linger = "200ms", format = "json_array" }"#;
    let mut gw = TestGateway::start(&aws_sink(aws.port(), &certs, pack)).await;

    let (devices, per_device, rate) = (4u32, 5_000u64, 500u32);
    let port = gw.port();
    let meters: Vec<_> = (0..devices)
        .map(|d| tokio::spawn(publish_readings(port, d, per_device, rate)))
        .collect();
    let mut acked = 0;
    for m in meters {
        acked += m.await.expect("meter");
    }
    let total = u64::from(devices) * per_device;
    assert_eq!(acked, total, "the gateway acked every reading");

    let unpacked = |packs: &[common::Msg]| -> Vec<common::Msg> {
        packs
            .iter()
            .flat_map(|(topic, payload)| {
                let parts: Vec<serde_json::Value> =
                    serde_json::from_slice(payload).expect("a pack is a JSON array");
                parts
                    .into_iter()
                    .map(|part| (topic.clone(), part["payload"].to_string().into_bytes()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut readings = unpacked(&collector.messages());
    while (check_sequences(&readings)
        .per_device_count
        .values()
        .sum::<u64>())
        < total
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        readings = unpacked(&collector.messages());
    }
    let report = check_sequences(&readings);
    for d in 0..devices {
        assert_eq!(
            report.per_device_count.get(&d),
            Some(&per_device),
            "{report:?}"
        );
    }
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "{report:?}");
    let c = &aws.counters;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        c.throttled.load(Relaxed),
        0,
        "a connection went over AWS's limits"
    );
    assert_eq!(
        c.connections.load(Relaxed),
        1,
        "the sink stayed on its first connection"
    );
    assert_eq!(
        gw.counter("edgebridge_sink_errors_total", &[("sink", "cloud")]),
        0.0
    );
    println!(
        "aws limits: {} readings in {} packs; peak {} PUBLISH and {} bytes in one second",
        readings.len(),
        collector.len(),
        c.peak_publishes.load(Relaxed),
        c.peak_bytes.load(Relaxed)
    );
    gw.shutdown().await;
}
