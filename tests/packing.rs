//! Packing (`pack = { ... }`): devices → edgebridge → a real Mosquitto upstream and the
//! HTTP test server. The upstream gets fewer, larger messages, and unpacking them the way
//! README describes gives back exactly the device messages: each once, in order per
//! topic, JSON payloads as JSON and a binary payload as base64 with its flag. Also what
//! `check` and `rules test` say about a packing sink.

mod common;
#[path = "common/gateway.rs"]
mod gateway;
#[path = "common/http.rs"]
mod http;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use common::{
    check_sequences, client_options, publish_seq, publish_seq_with, stopped_upstream, Collector,
    Mode, Mosquitto, Msg,
};
use gateway::TestGateway;
use http::HttpServer;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// Device messages per test: on three topics, plus one binary payload.
const PER_DEVICE: [u64; 3] = [667, 667, 666];
const BINARY: [u8; 5] = [0xff, 0x00, 0xfe, b'\n', 0x80];

/// The parts of one packed payload, as a consumer reads them.
fn parts(body: &[u8], format: &str) -> Vec<Value> {
    match format {
        "json_array" => match serde_json::from_slice(body) {
            Ok(Value::Array(items)) => items,
            other => panic!("a json_array pack is a JSON array: {other:?}"),
        },
        "ndjson" => {
            assert!(body.ends_with(b"\n"), "every ndjson part ends its line");
            body.split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).expect("an ndjson line is JSON"))
                .collect()
        }
        other => panic!("no format {other}"),
    }
}

/// A part's payload as the device sent it: JSON (no `encoding`) as a JSON value, text
/// and base64 as bytes.
#[derive(Debug, PartialEq)]
enum Payload {
    Json(Value),
    Bytes(Vec<u8>),
}

fn payload(part: &Value) -> Payload {
    match part["encoding"].as_str() {
        None => Payload::Json(part["payload"].clone()),
        Some("text") => Payload::Bytes(
            part["payload"]
                .as_str()
                .expect("a text part")
                .as_bytes()
                .to_vec(),
        ),
        Some("base64") => Payload::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(
                    part["payload"]
                        .as_str()
                        .expect("base64 payload is a string"),
                )
                .expect("valid base64"),
        ),
        Some(other) => panic!("unknown encoding {other}"),
    }
}

/// Publishes one binary payload to `topic`, QoS 1, and waits for its PUBACK.
async fn publish_binary(port: u16, topic: &str) {
    publish_one(port, topic, BINARY.to_vec()).await;
}

/// Publishes `payload` to `topic`, QoS 1, and waits for its PUBACK.
async fn publish_one(port: u16, topic: &str, payload: Vec<u8>) {
    let mut opts = MqttOptions::new("dev-one", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue publish");
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "the message was acked by the gateway");
}

/// Devices 0..3 publish their seqs on `{prefix}/d{n}/telemetry`, then one binary payload
/// follows on device 0's topic. Returns the number of device messages.
async fn publish_devices(gw: &TestGateway, prefix: &str) -> usize {
    let mut publishers = Vec::new();
    for (device, count) in PER_DEVICE.iter().copied().enumerate() {
        let port = gw.port();
        let topic = format!("{prefix}/d{device}/telemetry");
        publishers.push(tokio::spawn(async move {
            let acked = publish_seq(
                "127.0.0.1",
                port,
                &format!("dev-{device}"),
                &topic,
                device as u32,
                count,
                QoS::AtLeastOnce,
            )
            .await;
            assert_eq!(acked, count, "device {device}: every publish acked");
        }));
    }
    for p in publishers {
        p.await.expect("publisher");
    }
    publish_binary(gw.port(), &format!("{prefix}/d0/telemetry")).await;
    PER_DEVICE.iter().sum::<u64>() as usize + 1
}

/// Checks the unpacked parts of every pack on `topic_of(device)`: device `d`'s seqs
/// 0..count once each in order, the binary payload last on device 0's topic, and the
/// configured fields. `packs` are (upstream topic, parts) in arrival order.
fn check_unpacked(packs: &[(String, Vec<Value>)], topic_of: impl Fn(usize) -> String) {
    let mut per_topic: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for (topic, parts) in packs {
        assert!(!parts.is_empty(), "no empty pack");
        for part in parts {
            assert_eq!(part["topic"].as_str(), Some(topic.as_str()), "{part}");
            assert!(part["received_at"].as_u64().is_some(), "{part}");
            per_topic.entry(topic).or_default().push(part);
        }
    }
    assert_eq!(per_topic.len(), 3, "three topics: {:?}", per_topic.keys());
    for (device, count) in PER_DEVICE.iter().copied().enumerate() {
        let topic = topic_of(device);
        let parts = per_topic
            .get(topic.as_str())
            .unwrap_or_else(|| panic!("nothing on {topic}"));
        let mut seqs = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            match payload(part) {
                Payload::Json(v) => {
                    assert_eq!(v["device"], device as u64, "{part}");
                    assert!(part.get("encoding").is_none());
                    seqs.push(v["seq"].as_u64().expect("seq"));
                }
                Payload::Bytes(bytes) => {
                    assert_eq!(device, 0, "the binary payload is on device 0's topic");
                    assert_eq!(i, parts.len() - 1, "and comes after its seqs");
                    assert_eq!(part["encoding"], "base64");
                    assert_eq!(bytes, BINARY);
                }
            }
        }
        let expected: Vec<u64> = (0..count).collect();
        assert_eq!(seqs, expected, "{topic}: every seq once, in order");
    }
}

async fn mqtt_packs_unpack_to_the_device_messages(format: &str) {
    let upstream = Mosquitto::start(Mode::Plain);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let max_bytes = 4096;
    let mut gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "500ms"
pack = {{ max_bytes = {max_bytes}, linger = "200ms", format = "{format}", fields = ["topic", "received_at"] }}

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud"]
topic = "dt/{{gateway_id}}/{{1}}"
"#,
        upstream.port()
    ))
    .await;

    let total = publish_devices(&gw, "factory").await;
    let unpacked = |c: &Collector| -> usize {
        c.messages()
            .iter()
            .map(|(_, body)| parts(body, format).len())
            .sum()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while unpacked(&collector) < total && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_delivered_total", &[("sink", "cloud")])
            >= total as f64)
            .await,
        "every device message counted as delivered"
    );
    let msgs = collector.messages();
    let packs: Vec<(String, Vec<Value>)> = msgs
        .iter()
        .map(|(topic, body)| {
            assert!(body.len() <= max_bytes, "{} bytes", body.len());
            (topic.clone(), parts(body, format))
        })
        .collect();
    assert_eq!(
        unpacked(&collector),
        total,
        "{} upstream messages",
        msgs.len()
    );
    assert!(
        msgs.len() * 10 < total,
        "fewer, larger upstream messages: {} for {total}",
        msgs.len()
    );
    check_unpacked(&packs, |d| format!("dt/edge-01/d{d}"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_json_array_packs_unpack_to_the_device_messages() {
    mqtt_packs_unpack_to_the_device_messages("json_array").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_ndjson_packs_unpack_to_the_device_messages() {
    mqtt_packs_unpack_to_the_device_messages("ndjson").await;
}

/// After an outage the buffer has more to give than one pack holds: packs close full
/// (by size, not by linger, which is long here), and the backlog arrives complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_drains_in_full_packs() {
    let (mut upstream, collector) = stopped_upstream().await;
    let max_bytes = 4096;
    let mut gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "500ms"
pack = {{ max_bytes = {max_bytes}, linger = "5s", fields = ["topic", "received_at"] }}

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud"]
topic = "up/{{1}}"
"#,
        upstream.port()
    ))
    .await;
    let total = publish_devices(&gw, "factory").await;
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]),
        total as f64,
        "all buffered while the upstream is down"
    );

    upstream.restart();
    let unpacked = |c: &Collector| -> usize {
        c.messages()
            .iter()
            .map(|(_, body)| parts(body, "json_array").len())
            .sum()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while unpacked(&collector) < total && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let msgs = collector.messages();
    let packs: Vec<(String, Vec<Value>)> = msgs
        .iter()
        .map(|(topic, body)| (topic.clone(), parts(body, "json_array")))
        .collect();
    check_unpacked(&packs, |d| format!("up/d{d}"));
    // Every pack but the last of its topic was closed because the next part did not fit.
    for device in 0..PER_DEVICE.len() {
        let topic = format!("up/d{device}");
        let sizes: Vec<usize> = msgs
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, body)| body.len())
            .collect();
        let (_last, full) = sizes.split_last().expect("packs on every topic");
        assert!(!full.is_empty(), "{topic}: more than one pack");
        for size in full {
            assert!(
                *size <= max_bytes && *size > max_bytes - 100,
                "{topic}: a pack closed before it was full: {sizes:?}"
            );
        }
    }
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_buffer_messages", &[("sink", "cloud")])
            == 0.0)
            .await,
        "the buffer empties once the packs are acked"
    );
    gw.shutdown().await;
}

/// The upstream stops and starts again while a device publishes a steady stream: packs
/// that were not confirmed are read again from the buffer and packed anew; every message
/// arrives, in order (a duplicate only as a resent tail).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_restart_resends_unconfirmed_packs_without_loss() {
    let mut upstream = Mosquitto::start_with(Mode::Plain, true);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let mut gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
backoff_min = "50ms"
backoff_max = "500ms"
pack = {{ max_bytes = "2KiB", linger = "50ms" }}

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud"]
topic = "dt/{{1}}"
"#,
        upstream.port()
    ))
    .await;
    let port = gw.port();
    let total = 3_000u64;
    let stream = tokio::spawn(async move {
        // ~500 msg/s for 6 s, in chunks, so the outage falls in the middle of the stream; a
        // client id per chunk keeps clear of rumqttd's session-takeover race (issue "Device
        // sessions"): this test is about the upstream side.
        let mut acked = 0;
        for chunk in 0..30u64 {
            let opts = client_options(&format!("steady-{chunk}"), port, Mode::Plain);
            let seqs = chunk * 100..(chunk + 1) * 100;
            acked +=
                publish_seq_with(opts, "factory/steady/telemetry", 7, seqs, QoS::AtLeastOnce).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        acked
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    upstream.terminate();
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_up", &[("sink", "cloud")])
            == 0.0)
            .await,
        "the sink goes down with its upstream"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    upstream.restart();
    assert_eq!(stream.await.expect("publisher"), total);

    // Each part as the device message it stands for.
    let unpacked = |c: &Collector| -> Vec<Msg> {
        c.messages()
            .iter()
            .flat_map(|(topic, body)| {
                parts(body, "json_array")
                    .into_iter()
                    .map(|p| {
                        (
                            topic.clone(),
                            serde_json::to_vec(&p["payload"]).expect("JSON"),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let unique = |c: &Collector| {
        check_sequences(&unpacked(c))
            .per_device_count
            .get(&7)
            .copied()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while unique(&collector) != Some(total) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = check_sequences(&unpacked(&collector));
    assert_eq!(report.per_device_count.get(&7), Some(&total), "{report:?}");
    assert_eq!(
        (report.missing, report.out_of_order, report.unparsed),
        (0, 0, 0),
        "{report:?}"
    );
    assert!(
        collector.len() < total as usize / 5,
        "{} packs",
        collector.len()
    );
    println!("restart with packing: {} duplicates", report.duplicates);
    gw.shutdown().await;
}

/// Seqs of device 1 in `parts`' JSON payloads, in order.
fn seqs_of(parts: &[Value]) -> Vec<u64> {
    parts
        .iter()
        .filter_map(|p| p["payload"]["seq"].as_u64())
        .collect()
}

/// A message too large for the upstream even alone goes as a pack of one, which is
/// dead-lettered; the messages around it are packed and delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_too_large_even_alone_is_dead_lettered_and_the_rest_goes_on() {
    let upstream = Mosquitto::start(Mode::Plain);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let mut gw = TestGateway::start(&format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
max_packet_size = "2KiB"
backoff_min = "50ms"
backoff_max = "500ms"
pack = {{ max_bytes = "1KiB", linger = "100ms" }}

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud"]
topic = "dt/{{1}}"
"#,
        upstream.port()
    ))
    .await;
    let device = |seqs: std::ops::Range<u64>| {
        let mut opts = MqttOptions::new("dev-1", "127.0.0.1", gw.port());
        opts.set_max_packet_size(1 << 20, 1 << 20);
        publish_seq_with(opts, "factory/m1/telemetry", 1, seqs, QoS::AtLeastOnce)
    };
    assert_eq!(device(0..50).await, 50);
    publish_one(gw.port(), "factory/m1/telemetry", vec![b'x'; 3000]).await;
    assert_eq!(device(50..100).await, 50);

    let delivered = |c: &Collector| -> Vec<u64> {
        c.messages()
            .iter()
            .flat_map(|(_, body)| seqs_of(&parts(body, "json_array")))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while delivered(&collector).len() < 100 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivered(&collector), (0..100).collect::<Vec<u64>>());
    assert!(
        collector.len() > 1 && collector.len() < 100,
        "{} packs",
        collector.len()
    );
    let dead = gw.dead_letters("cloud");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "too_large");
    assert_eq!(dead[0]["topic"], "dt/m1");
    assert_eq!(dead[0]["payload"].as_str().map(str::len), Some(3000));
    assert_eq!(
        gw.counter(
            "edgebridge_buffer_dropped_total",
            &[("sink", "cloud"), ("reason", "too_large")]
        ),
        1.0
    );
    gw.shutdown().await;
}

/// A pack the HTTP server refuses as the messages' fault (422) is sent again one message
/// per request: only the message at fault is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_pack_refused_as_permanent_is_split_to_find_the_message_at_fault() {
    let server = HttpServer::start().await;
    // Only seq 7's payload ends in `"seq":7}`.
    server.refuse_containing("\"seq\":7}", 422);
    let mut gw = TestGateway::start(&format!(
        r##"
[sinks.hook]
type = "http"
url = "{}"
backoff_min = "50ms"
backoff_max = "500ms"
pack = {{ linger = "100ms", format = "ndjson" }}

[[rules]]
name = "all"
from = "plant/#"
to = ["hook"]
"##,
        server.url("/in")
    ))
    .await;
    let acked = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-1",
        "plant/m1/temp",
        1,
        100,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(acked, 100);
    let accepted = |reqs: &[http::Received]| -> Vec<u64> {
        reqs.iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| seqs_of(&parts(&r.body, "ndjson")))
            .collect()
    };
    assert!(
        server
            .wait_for(WAIT, |reqs| accepted(reqs).len() >= 99)
            .await,
        "accepted {:?}",
        accepted(&server.received())
    );
    let expected: Vec<u64> = (0..100).filter(|s| *s != 7).collect();
    assert_eq!(accepted(&server.received()), expected);
    assert!(
        gw.eventually(WAIT, |g| g.dead_letters("hook").len() == 1)
            .await,
        "seq 7 is dead-lettered"
    );
    let dead = gw.dead_letters("hook");
    assert_eq!(dead[0]["reason"], "http_422");
    assert_eq!(dead[0]["payload"], "{\"device\":1,\"seq\":7}");
    let refused = server.received().iter().filter(|r| r.status == 422).count();
    assert_eq!(refused, 2, "the pack, then seq 7 alone");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_packs_are_one_request_per_topic_and_unpack_to_the_device_messages() {
    let server = HttpServer::start().await;
    let mut gw = TestGateway::start(&format!(
        r##"
[sinks.hook]
type = "http"
url = "{}"
backoff_min = "50ms"
backoff_max = "500ms"
pack = {{ max_bytes = "8KiB", linger = "200ms", format = "json_array", fields = ["topic", "received_at"] }}

[[rules]]
name = "all"
from = "plant/#"
to = ["hook"]
"##,
        server.url("/in/{2}")
    ))
    .await;

    let total = publish_devices(&gw, "plant").await;
    let unpacked = |reqs: &[http::Received]| -> usize {
        reqs.iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(|r| parts(&r.body, "json_array").len())
            .sum()
    };
    assert!(
        server.wait_for(WAIT, |reqs| unpacked(reqs) >= total).await,
        "the server got {} of {total} messages",
        unpacked(&server.received())
    );
    let accepted = server.accepted();
    assert_eq!(unpacked(&accepted), total);
    assert!(
        accepted.len() * 10 < total,
        "fewer, larger requests: {} for {total}",
        accepted.len()
    );
    let mut packs = Vec::new();
    for r in &accepted {
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.body.len() <= 8192, "{} bytes", r.body.len());
        let parts = parts(&r.body, "json_array");
        let topic = parts[0]["topic"].as_str().expect("topic").to_string();
        // The URL is rendered from the pack's topic: one topic per request.
        let device = topic.split('/').nth(1).expect("plant/dN/telemetry");
        assert_eq!(r.path, format!("/in/{device}"));
        packs.push((topic, parts));
    }
    check_unpacked(&packs, |d| format!("plant/d{d}/telemetry"));
    gw.shutdown().await;
}

/// `edgebridge <args> --config <file>` as a user runs it: (exit code, stdout, stderr).
fn run_cli(config: &str, args: &[&str], extra: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgebridge.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgebridge"));
    cmd.args(args).arg("--config").arg(&path).args(extra);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBRIDGE_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd.output().expect("run edgebridge");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

fn cli_config(pack: &str) -> String {
    format!(
        r#"
[gateway]
id = "edge-09"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:1"
pack = {pack}
[sinks.hook]
type = "http"
url = "http://127.0.0.1:1/in"
format = "ndjson"

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud", "hook"]
topic = "dt/{{gateway_id}}/{{1}}"
"#
    )
}

#[test]
fn check_and_rules_test_show_the_packing() {
    let config =
        cli_config(r#"{ max_bytes = "64KiB", format = "ndjson", fields = ["received_at"] }"#);
    let (code, out, err) = run_cli(&config, &["check"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("pack=ndjson by topic max_bytes=65536 linger=200ms fields=[received_at]"),
        "{out}"
    );

    let (code, out, err) = run_cli(
        &config,
        &["rules", "test"],
        &[
            "--topic",
            "factory/m1/telemetry",
            "--payload",
            r#"{"t":21.50}"#,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let packed: Vec<&str> = out.lines().filter(|l| l.contains("packed:")).collect();
    assert_eq!(packed.len(), 1, "only the packing sink says so:\n{out}");
    assert!(
        packed[0].contains(
            r#"topic "dt/edge-09/m1" into one ndjson message of at most 65536 bytes (linger 200ms)"#
        ),
        "{out}"
    );
    assert!(packed[0].contains(r#"{"received_at":"#), "{out}");
    assert!(packed[0].ends_with(r#""payload":{"t":21.50}}"#), "{out}");
}

#[test]
fn bad_pack_keys_are_named_by_their_path() {
    let config = cli_config(r#"{ max_bytes = "1MiB", linger = "5m", formt = "ndjson" }"#);
    let (code, _, err) = run_cli(&config, &["check"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("sinks.cloud.pack.formt: unknown key \"formt\""),
        "{err}"
    );

    let config = cli_config(r#"{ max_bytes = "1MiB", linger = "5m" }"#);
    let (code, _, err) = run_cli(&config, &["check"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("sinks.cloud.pack.max_bytes: 1048576 bytes is over what the upstream takes in one message (262128 bytes: max_packet_size 262144 minus 16 bytes of MQTT framing)"),
        "{err}"
    );
    assert!(
        err.contains("sinks.cloud.pack.linger: must be at most 60s"),
        "{err}"
    );

    // An HTTP sink's pack replaces its body format.
    let config = cli_config("{}").replace(
        "format = \"ndjson\"",
        "format = \"ndjson\"\npack = { format = \"json_array\" }",
    );
    let (code, _, err) = run_cli(&config, &["check"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("sinks.hook.format: not used with pack: pack.format decides the body"),
        "{err}"
    );
}
