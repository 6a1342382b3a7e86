//! MQTT 5 end to end: a device's MQTT 5 properties reach a real Mosquitto 2 upstream over
//! the MQTT 5 sink (and are dropped, as documented, over a 3.1.1 sink), and the same
//! message reaches tansu with record headers, the HTTP test server with request headers
//! and in the JSON envelope, and the file sink's NDJSON line; a message whose
//! expiry lapses while the upstream is down is dropped and counted; and every PUBACK (and
//! DISCONNECT) reason code of the table in `sinks::mqtt::puback` has its documented
//! outcome, against a scripted MQTT 5 upstream (fault injection a real broker cannot do);
//! and a cloud's MQTT 5 request comes down to a device with its properties and the
//! device's reply goes back up (request/response).

mod common;
#[path = "common/gateway.rs"]
mod gateway;
#[path = "common/http.rs"]
mod http;
#[path = "common/kafka.rs"]
mod kafka;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Mosquitto;
use gateway::TestGateway;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

/// What an MQTT 5 subscriber received: topic, payload, properties.
type Received = (String, Vec<u8>, Option<PublishProperties>);

/// An MQTT 5 subscriber to `filter` on the upstream at `port` (rumqttc v5), collecting in
/// the background; returns once its SUBACK arrived.
/// With `persistent`, its session (and what is queued for it) outlives a disconnect.
async fn subscribe_v5(
    port: u16,
    filter: &str,
    persistent: bool,
) -> (Arc<Mutex<Vec<Received>>>, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new("v5-collector", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    if persistent {
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe_many([Filter::new(filter, QoS::AtLeastOnce)])
        .await
        .expect("queue SUBSCRIBE");
    let received = Arc::new(Mutex::new(Vec::new()));
    let (subbed_tx, subbed_rx) = tokio::sync::oneshot::channel();
    let sink = received.clone();
    let task = tokio::spawn(async move {
        let mut subbed_tx = Some(subbed_tx);
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subbed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    sink.lock()
                        .expect("lock")
                        .push((topic, p.payload.to_vec(), p.properties));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subbed_rx)
        .await
        .expect("SUBACK within 10 s")
        .expect("subscriber running");
    (received, task)
}

/// Publishes each `(topic, payload, properties)` at QoS 1 from an MQTT 5 device to the
/// gateway and waits for every PUBACK.
async fn publish_v5(
    port: u16,
    client_id: &str,
    messages: Vec<(&str, &str, Option<PublishProperties>)>,
) {
    let opts = MqttOptions::new(client_id, "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let count = messages.len();
    for (topic, payload, props) in messages {
        let payload = Bytes::from(payload.to_string());
        match props {
            Some(p) => client
                .publish_bytes_with_properties(topic, QoS::AtLeastOnce, false, payload, p)
                .await
                .expect("queue publish"),
            None => client
                .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue publish"),
        }
    }
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked < count {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                assert_eq!(
                    ack.reason,
                    rumqttc::v5::mqttbytes::v5::PubAckReason::Success
                );
                acked += 1;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device connection failed: {e}"),
            Err(_) => panic!("{acked} of {count} PUBACKs from the gateway within {WAIT:?}"),
        }
    }
    let _ = client.disconnect().await;
}

fn device_properties(expiry: Option<u32>) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: expiry,
        topic_alias: None,
        response_topic: Some("reply/press-7".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01req-42")),
        user_properties: vec![
            ("line".into(), "4".into()),
            ("shift".into(), "night".into()),
            // Repeated keys are legal in MQTT 5 and keep their order.
            ("line".into(), "4b".into()),
        ],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    }
}

fn mqtt_sinks(port: u16) -> String {
    format!(
        r#"
[sinks.v5]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
client_id = "gw-v5"
backoff_min = "50ms"
backoff_max = "500ms"

[sinks.v311]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
client_id = "gw-v311"
protocol = "3.1.1"
backoff_min = "50ms"
backoff_max = "500ms"

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = [{{ sink = "v5", topic = "v5/{{1}}" }}, {{ sink = "v311", topic = "v311/{{1}}" }}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_as_mqtt5_upstream_receives_every_property() {
    let upstream = Mosquitto::start(common::Mode::Plain);
    let (received, _task) = subscribe_v5(upstream.port(), "#", false).await;
    let gw = TestGateway::start(&mqtt_sinks(upstream.port())).await;

    publish_v5(
        gw.port(),
        "press-7",
        vec![
            (
                "factory/press-7/telemetry",
                r#"{"t":81.5}"#,
                Some(device_properties(Some(3600))),
            ),
            // A message without properties stays without them.
            ("factory/press-7/telemetry", r#"{"t":82.0}"#, None),
        ],
    )
    .await;

    let arrived = gw
        .eventually(WAIT, |_| received.lock().expect("lock").len() >= 4)
        .await;
    let got = received.lock().expect("lock").clone();
    assert!(
        arrived,
        "4 messages expected upstream, got {got:?}\n{}",
        upstream.logs()
    );
    let on = |prefix: &str| -> Vec<Received> {
        got.iter()
            .filter(|(t, _, _)| t.starts_with(prefix))
            .cloned()
            .collect()
    };
    let v5 = on("v5/");
    assert_eq!(v5.len(), 2, "{got:?}");
    assert_eq!(v5[0].0, "v5/press-7");
    assert_eq!(v5[0].1, br#"{"t":81.5}"#);
    let props = v5[0].2.clone().expect("properties upstream over MQTT 5");
    let sent = device_properties(None);
    assert_eq!(props.user_properties, sent.user_properties);
    assert_eq!(props.content_type, sent.content_type);
    assert_eq!(props.payload_format_indicator, Some(1));
    assert_eq!(props.response_topic, sent.response_topic);
    assert_eq!(props.correlation_data, sent.correlation_data);
    // The remaining interval: what the device gave less the time on the way (Mosquitto
    // subtracts its own share too); never more than the device gave.
    let expiry = props
        .message_expiry_interval
        .expect("message expiry upstream");
    assert!((3000..=3600).contains(&expiry), "expiry {expiry}");
    assert_eq!(v5[1].1, br#"{"t":82.0}"#);
    assert!(
        v5[1].2.as_ref().is_none_or(|p| p.user_properties.is_empty()
            && p.content_type.is_none()
            && p.message_expiry_interval.is_none()),
        "{:?}",
        v5[1].2
    );

    // 3.1.1 upstream: the same message, its properties dropped (documented).
    let v311 = on("v311/");
    assert_eq!(v311.len(), 2, "{got:?}");
    assert_eq!(v311[0].1, br#"{"t":81.5}"#);
    assert!(
        v311[0]
            .2
            .as_ref()
            .is_none_or(|p| p.user_properties.is_empty()
                && p.content_type.is_none()
                && p.correlation_data.is_none()
                && p.message_expiry_interval.is_none()),
        "{:?}",
        v311[0].2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiry_that_lapses_during_an_outage_drops_the_message_and_counts_it() {
    // A persistent broker and session: what the gateway sends once the broker is back is
    // queued for the subscriber whenever it reconnects.
    let mut upstream = Mosquitto::start_with(common::Mode::Plain, true);
    let port = upstream.port();
    let (received, _task) = subscribe_v5(port, "v5/#", true).await;
    upstream.terminate();
    let gw = TestGateway::start(&mqtt_sinks(port)).await;

    publish_v5(
        gw.port(),
        "press-7",
        vec![
            (
                "factory/press-7/telemetry",
                "short-lived",
                Some(device_properties(Some(1))),
            ),
            (
                "factory/press-7/telemetry",
                "long-lived",
                Some(device_properties(Some(3600))),
            ),
            ("factory/press-7/telemetry", "never-expires", None),
        ],
    )
    .await;
    // The outage outlasts the short expiry by a wide margin.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    upstream.restart();

    let arrived = gw
        .eventually(WAIT, |_| received.lock().expect("lock").len() >= 2)
        .await;
    let expired = gw
        .counter_until(
            "edgebridge_buffer_dropped_total",
            &[("sink", "v5"), ("reason", "expired")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(expired, 1.0);
    let got: Vec<Vec<u8>> = received
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, p, _)| p.clone())
        .collect();
    assert!(arrived, "{got:?}");
    // In buffer order: had the expired one been sent, it would have come first.
    assert_eq!(got, [b"long-lived".to_vec(), b"never-expires".to_vec()]);
    // What it waited is subtracted: over 2 s of outage, so at most 3598 s remain.
    let expiry = received.lock().expect("lock")[0]
        .2
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .expect("expiry");
    assert!(expiry <= 3598, "expiry {expiry}");
    // The 3.1.1 sink honours the expiry too: the device asked for it.
    let expired_v311 = gw
        .counter_until(
            "edgebridge_buffer_dropped_total",
            &[("sink", "v311"), ("reason", "expired")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(expired_v311, 1.0);
}

/// What the scripted upstream answers to a PUBLISH, by payload.
#[derive(Clone, Copy, Debug)]
enum Answer {
    PubAck(u8),
    Disconnect(u8),
}

/// A scripted MQTT 5 upstream: CONNACK to every CONNECT; to each QoS 1 PUBLISH the next
/// answer scripted for its payload (the last one repeats; PUBACK 0x00 when none), and
/// every PUBLISH it read, in order.
struct ScriptedUpstream {
    port: u16,
    received: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedUpstream {
    async fn start(script: HashMap<&'static str, Vec<Answer>>) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script));
        let log = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, script.clone(), log.clone()));
            }
        });
        ScriptedUpstream {
            port,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().expect("lock").clone()
    }

    fn times(&self, payload: &str) -> usize {
        self.received().iter().filter(|p| *p == payload).count()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one MQTT packet: (first byte, body).
async fn read_packet(socket: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let first = socket.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = socket.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    socket.read_exact(&mut body).await?;
    Ok((first, body))
}

fn varint(bytes: &[u8]) -> (usize, usize) {
    let (mut value, mut shift) = (0usize, 0);
    for (i, b) in bytes.iter().enumerate() {
        value |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
        shift += 7;
    }
    (value, bytes.len())
}

async fn serve(
    mut socket: TcpStream,
    script: Arc<Mutex<HashMap<&'static str, Vec<Answer>>>>,
    log: Arc<Mutex<Vec<String>>>,
) {
    while let Ok((first, body)) = read_packet(&mut socket).await {
        let reply: Vec<u8> = match first >> 4 {
            // CONNECT → CONNACK: session not present, success, no properties.
            1 => vec![0x20, 0x03, 0x00, 0x00, 0x00],
            3 => {
                let qos = (first >> 1) & 3;
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let mut at = 2 + topic_len;
                let pkid = [body[at], body[at + 1]];
                if qos > 0 {
                    at += 2;
                }
                let (props_len, n) = varint(&body[at..]);
                at += n + props_len;
                let payload = String::from_utf8_lossy(&body[at..]).into_owned();
                log.lock().expect("lock").push(payload.clone());
                let answer = {
                    let mut script = script.lock().expect("lock");
                    match script.get_mut(payload.as_str()) {
                        Some(answers) if answers.len() > 1 => answers.remove(0),
                        Some(answers) => answers[0],
                        None => Answer::PubAck(0x00),
                    }
                };
                match answer {
                    Answer::PubAck(code) => vec![0x40, 0x04, pkid[0], pkid[1], code, 0x00],
                    Answer::Disconnect(code) => {
                        // As a broker closes: DISCONNECT, then FIN, reading what the
                        // client still sends until it closes (closing with unread data
                        // would reset the connection, and the DISCONNECT with it).
                        let _ = socket.write_all(&[0xe0, 0x02, code, 0x00]).await;
                        let _ = socket.shutdown().await;
                        let mut sink = [0u8; 4096];
                        let drain =
                            async { while socket.read(&mut sink).await.is_ok_and(|n| n > 0) {} };
                        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                        return;
                    }
                }
            }
            // PINGREQ → PINGRESP
            12 => vec![0xd0, 0x00],
            // DISCONNECT
            14 => return,
            _ => Vec::new(),
        };
        if socket.write_all(&reply).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_reason_code_in_the_table_has_its_documented_outcome() {
    use Answer::{Disconnect, PubAck};
    let script = HashMap::from([
        ("ok", vec![PubAck(0x00)]),
        ("no-subscribers", vec![PubAck(0x10)]),
        ("quota", vec![PubAck(0x97), PubAck(0x97), PubAck(0x00)]),
        ("not-authorized", vec![PubAck(0x87)]),
        ("topic-invalid", vec![PubAck(0x90)]),
        ("payload-format", vec![PubAck(0x99)]),
        ("busy", vec![Disconnect(0x89), PubAck(0x00)]),
        ("too-large", vec![Disconnect(0x95)]),
        ("last", vec![PubAck(0x00)]),
    ]);
    let upstream = ScriptedUpstream::start(script).await;
    let gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "200ms"
# One publish at a time: each answer meets the publish it was scripted for, with no
# other one in flight whose answer a closing connection would swallow.
inflight = 1

[[rules]]
name = "all"
from = "factory/#"
to = ["cloud"]
"#,
        upstream.port
    ))
    .await;

    let order = [
        "ok",
        "no-subscribers",
        "quota",
        "not-authorized",
        "topic-invalid",
        "payload-format",
        "busy",
        "too-large",
        "last",
    ];
    publish_v5(
        gw.port(),
        "dev-1",
        order
            .iter()
            .map(|p| ("factory/d1/telemetry", *p, None))
            .collect(),
    )
    .await;

    let delivered = gw
        .counter_until(
            "edgebridge_sink_delivered_total",
            &[("sink", "cloud")],
            5.0,
            WAIT,
        )
        .await;
    let dead = gw
        .eventually(WAIT, |g| g.dead_letters("cloud").len() >= 4)
        .await;
    let letters = gw.dead_letters("cloud");
    assert!(dead, "{letters:?}\nreceived: {:?}", upstream.received());
    // Delivered: success, no matching subscribers, and the two retried until accepted.
    assert_eq!(delivered, 5.0, "received: {:?}", upstream.received());
    let reasons: HashMap<String, String> = letters
        .iter()
        .map(|l| {
            (
                l["payload"].as_str().unwrap_or_default().to_string(),
                l["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        HashMap::from(
            [
                ("not-authorized", "not_authorized"),
                ("topic-invalid", "invalid_topic"),
                ("payload-format", "payload_format_invalid"),
                ("too-large", "too_large"),
            ]
            .map(|(p, r)| (p.to_string(), r.to_string()))
        ),
        "{letters:?}"
    );
    let detail = letters
        .iter()
        .find(|l| l["payload"] == "not-authorized")
        .and_then(|l| l["detail"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(detail.contains("PUBACK 0x87 not authorized"), "{detail}");
    for (reason, want) in [
        ("not_authorized", 1.0),
        ("invalid_topic", 1.0),
        ("payload_format_invalid", 1.0),
        ("too_large", 1.0),
    ] {
        let dropped = gw.counter(
            "edgebridge_buffer_dropped_total",
            &[("sink", "cloud"), ("reason", reason)],
        );
        assert_eq!(dropped, want, "{reason}");
    }
    // Backed off and retried: refused twice, then accepted; busy once, then accepted.
    assert_eq!(upstream.times("quota"), 3, "{:?}", upstream.received());
    assert_eq!(upstream.times("busy"), 2, "{:?}", upstream.received());
    for (reason, want) in [
        ("quota_exceeded", 2.0),
        ("server_busy", 1.0),
        ("too_large", 1.0),
    ] {
        let errors_now = gw.counter(
            "edgebridge_sink_errors_total",
            &[("sink", "cloud"), ("reason", reason)],
        );
        assert_eq!(
            errors_now,
            want,
            "{reason}: {}\nreceived: {:?}",
            errors(&gw),
            upstream.received()
        );
    }
    // A dead-lettered message is not sent again.
    for refused in [
        "not-authorized",
        "topic-invalid",
        "payload-format",
        "too-large",
    ] {
        assert_eq!(upstream.times(refused), 1, "{:?}", upstream.received());
    }
    // Nothing is left in the buffer.
    let pending = gw
        .counter_until(
            "edgebridge_buffer_messages",
            &[("sink", "cloud")],
            0.0,
            WAIT,
        )
        .await;
    assert_eq!(pending, 0.0);
}

/// `edgebridge_sink_errors_total` lines, for assertion messages.
fn errors(gw: &TestGateway) -> String {
    gw.gw()
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("edgebridge_sink_errors_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnect_for_a_packet_too_large_finds_its_message_among_many_in_flight() {
    use Answer::Disconnect;
    let upstream =
        ScriptedUpstream::start(HashMap::from([("too-large", vec![Disconnect(0x95)])])).await;
    let gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "200ms"

[[rules]]
name = "all"
from = "factory/#"
to = ["cloud"]
"#,
        upstream.port
    ))
    .await;
    let mut messages: Vec<String> = (0..20).map(|i| format!("before-{i}")).collect();
    messages.push("too-large".into());
    messages.extend((0..20).map(|i| format!("after-{i}")));
    publish_v5(
        gw.port(),
        "dev-1",
        messages
            .iter()
            .map(|p| ("factory/d1/telemetry", p.as_str(), None))
            .collect(),
    )
    .await;

    let delivered = gw
        .counter_until(
            "edgebridge_sink_delivered_total",
            &[("sink", "cloud")],
            40.0,
            WAIT,
        )
        .await;
    assert_eq!(delivered, 40.0, "received: {:?}", upstream.received());
    let dropped = gw
        .counter_until(
            "edgebridge_buffer_dropped_total",
            &[("sink", "cloud"), ("reason", "too_large")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(dropped, 1.0);
    let letters = gw.dead_letters("cloud");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["payload"], "too-large");
    assert!(
        letters[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("DISCONNECT 0x95 packet too large")),
        "{letters:?}"
    );
    for m in &messages {
        assert!(upstream.times(m) >= 1, "{m} never reached the upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_message_reaches_every_sink_kind_with_its_properties() {
    let upstream = Mosquitto::start(common::Mode::Plain);
    let (received, _task) = subscribe_v5(upstream.port(), "dt/#", false).await;
    let tansu = kafka::Tansu::start();
    tansu.create_topic("telemetry");
    let web = http::HttpServer::start().await;
    let gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{mqtt}"
backoff_min = "50ms"
backoff_max = "500ms"

[sinks.lake]
type = "kafka"
brokers = ["{kafka}"]
topic = "telemetry"
property_header_prefix = "mqtt."
backoff_min = "100ms"
backoff_max = "1s"

[sinks.hook_raw]
type = "http"
url = "{raw_url}"
format = "raw"
property_headers = "X-Mqtt-"
backoff_min = "50ms"
backoff_max = "500ms"

[sinks.hook_json]
type = "http"
url = "{json_url}"
backoff_min = "50ms"
backoff_max = "500ms"

[sinks.archive]
type = "file"
path = "{{dir}}/archive.ndjson"

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud", "lake", "hook_raw", "hook_json", "archive"]
topic = "dt/{{1}}"
"#,
        mqtt = upstream.port(),
        kafka = tansu.bootstrap(),
        raw_url = web.url("/raw"),
        json_url = web.url("/json"),
    ))
    .await;

    publish_v5(
        gw.port(),
        "press-7",
        vec![(
            "factory/press-7/telemetry",
            r#"{"t":81.5}"#,
            Some(device_properties(Some(3600))),
        )],
    )
    .await;

    // MQTT 5 upstream.
    let arrived = gw
        .eventually(WAIT, |_| !received.lock().expect("lock").is_empty())
        .await;
    assert!(arrived, "nothing reached Mosquitto:\n{}", upstream.logs());
    let props = received.lock().expect("lock")[0]
        .2
        .clone()
        .expect("properties upstream");
    assert_eq!(
        props.user_properties,
        device_properties(None).user_properties
    );
    assert_eq!(props.content_type.as_deref(), Some("application/json"));

    // Kafka: user properties as prefixed record headers, the content type as content-type.
    let records = kafka::consume_async(&tansu.bootstrap(), &["telemetry"], 1, WAIT).await;
    assert_eq!(records.len(), 1, "{}", tansu.logs());
    let h = &records[0].headers;
    // The consumer keeps the last of a repeated key.
    assert_eq!(h.get("mqtt.line").map(String::as_str), Some("4b"), "{h:?}");
    assert_eq!(
        h.get("mqtt.shift").map(String::as_str),
        Some("night"),
        "{h:?}"
    );
    assert_eq!(
        h.get("content-type").map(String::as_str),
        Some("application/json"),
        "{h:?}"
    );
    assert_eq!(h.get("mqtt_topic").map(String::as_str), Some("dt/press-7"));

    // HTTP: raw body with the message's content type and the user properties as headers;
    // JSON body with them in the envelope.
    let both = web
        .wait_for(WAIT, |r| {
            r.iter().any(|x| x.path == "/raw") && r.iter().any(|x| x.path == "/json")
        })
        .await;
    assert!(both, "{:?}", web.received());
    let requests = web.received();
    let raw = requests
        .iter()
        .find(|r| r.path == "/raw")
        .expect("raw request");
    assert_eq!(raw.body.as_ref(), br#"{"t":81.5}"#);
    assert_eq!(raw.header("content-type"), Some("application/json"));
    let lines: Vec<&str> = raw
        .headers
        .get_all("x-mqtt-line")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(lines, ["4", "4b"], "both values of a repeated key");
    assert_eq!(raw.header("x-mqtt-shift"), Some("night"));
    let json = requests
        .iter()
        .find(|r| r.path == "/json")
        .expect("json request")
        .json();
    assert_eq!(
        json["properties"],
        serde_json::json!({
            "user": { "line": "4b", "shift": "night" },
            "content_type": "application/json",
            "payload_format_indicator": 1,
            "response_topic": "reply/press-7",
            "correlation_data": "AAFyZXEtNDI=",
            "message_expiry_interval": 3600
        })
    );
    assert_eq!(json["payload"], serde_json::json!({ "t": 81.5 }));

    // File: the same object on the NDJSON line.
    let path = gw.dir.path().join("archive.ndjson");
    let written = gw
        .eventually(WAIT, |_| {
            std::fs::read_to_string(&path).is_ok_and(|t| t.ends_with('\n'))
        })
        .await;
    assert!(written);
    let text = std::fs::read_to_string(&path).expect("archive");
    let line: serde_json::Value = serde_json::from_str(text.trim_end()).expect("a JSON line");
    assert_eq!(line["properties"], json["properties"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rule_that_sets_properties_sends_them_upstream() {
    let upstream = Mosquitto::start(common::Mode::Plain);
    let (received, _task) = subscribe_v5(upstream.port(), "dt/#", false).await;
    let gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "500ms"

[[rules]]
name = "line4"
from = "factory/+/telemetry"
where = "properties.user['shift'] == 'night' && properties.content_type == 'application/json'"
topic = "dt/{{1}}"
to = ["cloud"]
[rules.properties]
remove = ["shift"]
set = {{ line = "L{{1}}", site = "{{gateway_id}}" }}
add = {{ via = "{{client_id}}" }}
"#,
        upstream.port()
    ))
    .await;

    // A 3.1.1-style message without properties does not match; the MQTT 5 one does.
    publish_v5(
        gw.port(),
        "press-7",
        vec![
            ("factory/press-7/telemetry", "no-properties", None),
            (
                "factory/press-7/telemetry",
                "with-properties",
                Some(device_properties(Some(3600))),
            ),
        ],
    )
    .await;
    let arrived = gw
        .eventually(WAIT, |_| !received.lock().expect("lock").is_empty())
        .await;
    assert!(arrived, "nothing upstream:\n{}", upstream.logs());
    // Both were published before: had the first matched, it would have come first.
    let matched = gw
        .counter_until(
            "edgebridge_rule_matches_total",
            &[("rule", "line4")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(matched, 1.0);
    let got = received.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"with-properties");
    let props = got[0].2.clone().expect("properties");
    assert_eq!(
        props.user_properties,
        [
            ("line".to_string(), "Lpress-7".to_string()),
            ("site".into(), "edge-01".into()),
            ("via".into(), "press-7".into()),
        ]
    );
    // What the rule does not touch passes through.
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.response_topic.as_deref(), Some("reply/press-7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quota_refusal_resends_only_what_the_upstream_did_not_accept() {
    use Answer::PubAck;
    let upstream =
        ScriptedUpstream::start(HashMap::from([("quota", vec![PubAck(0x97), PubAck(0x00)])])).await;
    let gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "200ms"

[[rules]]
name = "all"
from = "factory/#"
to = ["cloud"]
"#,
        upstream.port
    ))
    .await;
    let mut messages: Vec<String> = (0..30).map(|i| format!("before-{i}")).collect();
    messages.push("quota".into());
    messages.extend((0..30).map(|i| format!("after-{i}")));
    publish_v5(
        gw.port(),
        "dev-1",
        messages
            .iter()
            .map(|p| ("factory/d1/telemetry", p.as_str(), None))
            .collect(),
    )
    .await;

    let delivered = gw
        .counter_until(
            "edgebridge_sink_delivered_total",
            &[("sink", "cloud")],
            61.0,
            WAIT,
        )
        .await;
    assert_eq!(delivered, 61.0, "received: {:?}", upstream.received());
    assert_eq!(upstream.times("quota"), 2, "{:?}", upstream.received());
    // Publishes written before the connection closed were acked on the way out: none of
    // them is sent twice.
    for m in messages.iter().filter(|m| *m != "quota") {
        assert_eq!(upstream.times(m), 1, "{m}: {:?}", upstream.received());
    }
    let throttled = gw.counter(
        "edgebridge_sink_errors_total",
        &[("sink", "cloud"), ("reason", "quota_exceeded")],
    );
    assert_eq!(throttled, 1.0);
}

/// MQTT 5 request/response through the gateway, against a real Mosquitto: a command the
/// cloud publishes comes down (`[[downlinks]]`) with its response topic, correlation
/// data, user properties and content type, and the device's reply to the response topic
/// goes back up through a rule with the correlation data, so the cloud can match it to
/// its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cloud_request_comes_down_with_its_properties_and_the_reply_goes_back_up() {
    let upstream = Mosquitto::start(common::Mode::Plain);
    let (replies, _replies_task) = subscribe_v5(upstream.port(), "replies/#", false).await;
    let config = format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
client_id = "gw-rr"
backoff_min = "50ms"
backoff_max = "500ms"

[[downlinks]]
sink = "cloud"
from = "commands/+"
topic = "cmd/{{1}}"

[[rules]]
name = "replies"
from = "replies/#"
to = ["cloud"]
"#,
        port = upstream.port()
    );
    let gw = TestGateway::start(&config).await;
    let (commands, _device_task) = subscribe_v5(gw.port(), "cmd/press-7", false).await;

    // The cloud's request; sent again until it arrives (the gateway's downlink
    // subscription upstream follows its CONNACK).
    let cloud = MqttOptions::new("cloud-app", "127.0.0.1", upstream.port());
    let (cloud, mut cloud_events) = AsyncClient::new(cloud, 10);
    let _cloud_task = tokio::spawn(async move { while cloud_events.poll().await.is_ok() {} });
    let request = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(600),
        topic_alias: None,
        response_topic: Some("replies/press-7".into()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        user_properties: vec![("origin".into(), "mes".into())],
        subscription_identifiers: Vec::new(),
        content_type: Some("application/json".into()),
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while commands.lock().expect("lock").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no command reached the device\n{}",
            upstream.logs()
        );
        cloud
            .publish_bytes_with_properties(
                "commands/press-7",
                QoS::AtLeastOnce,
                false,
                Bytes::from_static(br#"{"stop":true}"#),
                request.clone(),
            )
            .await
            .expect("queue the request");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (topic, payload, props) = commands.lock().expect("lock")[0].clone();
    assert_eq!(topic, "cmd/press-7");
    assert_eq!(payload, br#"{"stop":true}"#);
    let props = props.expect("the request's properties reach the device");
    assert_eq!(props.response_topic, request.response_topic);
    assert_eq!(props.correlation_data, request.correlation_data);
    assert_eq!(props.user_properties, request.user_properties);
    assert_eq!(props.content_type, request.content_type);
    assert_eq!(props.payload_format_indicator, Some(1));
    let expiry = props.message_expiry_interval.expect("message expiry");
    assert!((500..=600).contains(&expiry), "expiry {expiry}");

    // The device replies as MQTT 5 asks: to the response topic, with the correlation data.
    let reply = PublishProperties {
        correlation_data: props.correlation_data.clone(),
        ..device_properties(None)
    };
    let response_topic = props.response_topic.clone().expect("response topic");
    publish_v5(
        gw.port(),
        "press-7",
        vec![(&response_topic, r#"{"stopped":true}"#, Some(reply))],
    )
    .await;
    let arrived = gw
        .eventually(WAIT, |_| !replies.lock().expect("lock").is_empty())
        .await;
    assert!(arrived, "no reply upstream\n{}", upstream.logs());
    let (topic, payload, props) = replies.lock().expect("lock")[0].clone();
    assert_eq!(topic, "replies/press-7");
    assert_eq!(payload, br#"{"stopped":true}"#);
    assert_eq!(
        props.and_then(|p| p.correlation_data),
        Some(Bytes::from_static(b"req-42")),
        "the cloud matches the reply to its request"
    );
}
