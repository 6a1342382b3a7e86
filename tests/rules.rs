//! The rule engine end to end: real devices (rumqttc) → edgebridge → a real Mosquitto
//! upstream, with CEL conditions and transforms.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::time::Duration;

use common::{client_options, Collector, Mode, Mosquitto};
use gateway::TestGateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const WAIT: Duration = Duration::from_secs(60);

fn cloud_sink(port: u16) -> String {
    format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
backoff_min = "50ms"
backoff_max = "500ms"
"#
    )
}

/// A Mosquitto "cloud" and a collector subscribed to everything on it.
async fn upstream_with_collector() -> (Mosquitto, Collector) {
    let upstream = Mosquitto::start(Mode::Plain);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "#",
    )
    .await;
    (upstream, collector)
}

/// Publishes `messages` at QoS 1 as device `client_id` and returns once every PUBACK
/// arrived (so each message is in the gateway's buffers).
async fn publish_all(port: u16, client_id: &str, messages: &[(&str, &str)]) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    for (topic, payload) in messages {
        client
            .publish(*topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await
            .expect("queue publish");
    }
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked < messages.len() {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("device {client_id}: {e}"),
            Err(_) => panic!("device {client_id}: {acked} of {} acked", messages.len()),
        }
    }
    let _ = client.disconnect().await;
}

/// Waits until the collector saw a message on `topic` (the test's end marker).
async fn wait_for_topic(collector: &Collector, topic: &str) -> Vec<(String, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msgs = collector.messages();
        if msgs.iter().any(|(t, _)| t == topic) {
            return msgs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {topic} upstream; got {msgs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_condition_passes_one_message_and_stops_another() {
    let (upstream, collector) = upstream_with_collector().await;
    let body = format!(
        r##"{}
[[rules]]
name = "hot"
from = "sensors/+"
where = "payload.temperature > 80"
to = ["cloud"]
topic = "alerts/{{1}}"

[[rules]]
name = "marker"
from = "end"
to = ["cloud"]
"##,
        cloud_sink(upstream.port())
    );
    let mut gw = TestGateway::start(&body).await;
    publish_all(
        gw.port(),
        "dev-1",
        &[
            ("sensors/s1", r#"{"temperature": 85, "n": 1}"#),
            ("sensors/s1", r#"{"temperature": 20, "n": 2}"#),
            ("sensors/s1", r#"{"humidity": 99, "n": 3}"#),
            ("sensors/s1", "not json at all"),
            ("end", "done"),
        ],
    )
    .await;
    // One sink keeps order: everything that passed is upstream before the marker.
    let msgs = wait_for_topic(&collector, "end").await;
    assert_eq!(
        msgs,
        vec![
            (
                "alerts/s1".to_string(),
                br#"{"temperature": 85, "n": 1}"#.to_vec()
            ),
            ("end".to_string(), b"done".to_vec()),
        ]
    );
    assert_eq!(
        gw.counter("edgebridge_rule_matches_total", &[("rule", "hot")]),
        1.0
    );
    // The non-JSON payload is an evaluation error (a string has no fields), counted;
    // the missing field is just false.
    assert_eq!(
        gw.counter("edgebridge_rule_errors_total", &[("rule", "hot")]),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transform_arrives_upstream_as_json() {
    let (upstream, collector) = upstream_with_collector().await;
    let body = format!(
        r##"{}
[[rules]]
name = "shape"
from = "factory/+/+/telemetry"
topic = "dt/{{gateway_id}}/{{2}}"
payload = '{{"machine": levels[2], "t": payload.temperature, "at": received_at, "by": client_id}}'
to = ["cloud", {{ sink = "cloud", topic = "raw/{{client_id}}/{{1}}", payload = "payload_text" }}]
"##,
        cloud_sink(upstream.port())
    );
    let mut gw = TestGateway::start(&body).await;
    let before = edgebridge::message::now_millis();
    publish_all(
        gw.port(),
        "press-7",
        &[("factory/l1/m7/telemetry", r#"{"temperature": 21.5}"#)],
    )
    .await;
    assert!(
        collector.wait_for(2, WAIT).await,
        "{:?}",
        collector.messages()
    );
    let msgs = collector.messages();
    let shaped = msgs
        .iter()
        .find(|(t, _)| t == "dt/edge-01/m7")
        .unwrap_or_else(|| panic!("no transformed message: {msgs:?}"));
    let json: serde_json::Value = serde_json::from_slice(&shaped.1).expect("JSON upstream");
    assert_eq!(json["machine"], "m7");
    assert_eq!(json["t"], 21.5);
    assert_eq!(json["by"], "press-7");
    let at = json["at"].as_u64().expect("received_at is a number");
    assert!(
        at >= before,
        "received_at {at} is the gateway's receive time"
    );
    assert_eq!(json.as_object().map(|o| o.len()), Some(4), "{json}");
    let raw = msgs
        .iter()
        .find(|(t, _)| t == "raw/press-7/l1")
        .unwrap_or_else(|| panic!("no per-target override: {msgs:?}"));
    assert_eq!(raw.1, br#"{"temperature": 21.5}"#.to_vec());
    gw.shutdown().await;
}

/// The real binary, with the caller's `EDGEBRIDGE_*` overrides removed so that only the
/// test's config file counts.
fn edgebridge() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgebridge"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBRIDGE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// `edgebridge rules test --config <file> <args>` as a user runs it.
fn rules_test(config: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgebridge.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgebridge"));
    cmd.args(["rules", "test", "--config"])
        .arg(&path)
        .args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBRIDGE_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd.output().expect("run edgebridge rules test");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

const DRY_RUN_CONFIG: &str = r##"
[gateway]
id = "edge-09"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:1"
[sinks.lake]
type = "file"
path = "lake.ndjson"

[[rules]]
name = "other"
from = "elsewhere/#"
to = ["lake"]

[[rules]]
name = "hot"
from = "factory/+/+/telemetry"
where = "payload.temperature > 80"
topic = "alerts/{gateway_id}/{2}"
payload = '{"machine": levels[2], "t": payload.temperature, "by": client_id}'
to = ["cloud", { sink = "lake", topic = "raw/{topic}", payload = "payload_text" }]
continue = false

[[rules]]
name = "all"
from = "factory/#"
to = ["lake"]

[fallback]
to = [{ sink = "lake", topic = "unrouted/{topic}" }]
"##;

#[test]
fn rules_test_prints_each_rule_and_each_sinks_message() {
    let (code, out, err) = rules_test(
        DRY_RUN_CONFIG,
        &[
            "--topic",
            "factory/l1/m7/telemetry",
            "--payload",
            r#"{"temperature": 91}"#,
            "--client-id",
            "press-7",
        ],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.contains(&"rule other: no match: topic filter elsewhere/# does not match"),
        "{out}"
    );
    assert!(lines.contains(&"rule hot: matched"), "{out}");
    assert!(
        lines.contains(&"rule all: not evaluated: an earlier rule matched with continue = false"),
        "{out}"
    );
    assert!(
        lines.contains(
            &r#"sink cloud: topic "alerts/edge-09/m7" payload {"by":"press-7","machine":"m7","t":91}"#
        ),
        "{out}"
    );
    assert!(
        lines.contains(
            &r#"sink lake: topic "raw/factory/l1/m7/telemetry" payload {"temperature": 91}"#
        ),
        "{out}"
    );

    // The condition is false: the next rule takes it, unchanged.
    let (code, out, _) = rules_test(
        DRY_RUN_CONFIG,
        &[
            "--topic",
            "factory/l1/m7/telemetry",
            "--payload",
            r#"{"temperature": 20}"#,
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("rule hot: no match: where is false (payload.temperature > 80)"),
        "{out}"
    );
    assert!(out.contains("rule all: matched"), "{out}");
    assert!(
        out.contains(r#"sink lake: topic "factory/l1/m7/telemetry" payload {"temperature": 20}"#),
        "{out}"
    );

    // Not JSON: an evaluation error, said as such; a missing field: said as such.
    let (_, out, _) = rules_test(
        DRY_RUN_CONFIG,
        &["--topic", "factory/l1/m7/telemetry", "--payload", "hello"],
    );
    assert!(
        out.contains("rule hot: no match: evaluation error"),
        "{out}"
    );
    let (_, out, _) = rules_test(
        DRY_RUN_CONFIG,
        &["--topic", "factory/l1/m7/telemetry", "--payload", "{}"],
    );
    assert!(
        out.contains(
            "rule hot: no match: where reads a field the message does not have (temperature)"
        ),
        "{out}"
    );

    // Nothing matches: the fallback.
    let (code, out, _) = rules_test(DRY_RUN_CONFIG, &["--topic", "x/ü", "--payload", "1"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("no rule matched: the message goes to [fallback]"),
        "{out}"
    );
    assert!(
        out.contains(r#"sink lake: topic "unrouted/x/ü" payload 1"#),
        "{out}"
    );
}

#[test]
fn rules_test_on_a_bad_config_names_the_key_and_exits_64() {
    let broken = DRY_RUN_CONFIG.replace("payload.temperature > 80", "payload.temperature >");
    let (code, out, err) = rules_test(&broken, &["--topic", "a", "--payload", "1"]);
    assert_eq!(code, 64, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.starts_with("rules[1].where: "), "{err}");
    assert!(out.is_empty(), "{out}");
}

/// Topic, payload, retain flag.
type Received = (String, Vec<u8>, bool);

/// A device subscribed to `filter` on the gateway; collects what it receives.
struct Subscriber {
    msgs: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(port: u16, client_id: &str, filter: &str) -> Subscriber {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let msgs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (subbed_tx, subbed_rx) = tokio::sync::oneshot::channel();
        let sink = msgs.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut subbed = Some(subbed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subbed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = (p.topic, p.payload.to_vec(), p.retain);
                        sink.lock().expect("lock").push(msg);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("subscriber lost its connection: {e}"),
                }
            }
        });
        tokio::time::timeout(WAIT, subbed_rx)
            .await
            .expect("SUBACK within the timeout")
            .expect("subscriber task alive");
        Subscriber { msgs, task }
    }

    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msgs = self.msgs.lock().expect("lock").clone();
            if msgs.len() >= n || tokio::time::Instant::now() >= deadline {
                return msgs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes one retained QoS 1 message on the upstream: the gateway gets it whether
/// its subscription is already in place or comes after.
async fn publish_upstream_retained(port: u16, topic: &str, payload: &str) {
    let (client, mut eventloop) =
        AsyncClient::new(client_options("cloud-app", port, Mode::Plain), 10);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload.as_bytes().to_vec())
        .await
        .expect("queue publish");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("upstream publish failed: {other:?}"),
        }
    }
    let _ = client.disconnect().await;
}

fn downlink_config(upstream: u16, retain: bool) -> String {
    format!(
        r##"{}
[[rules]]
name = "all"
from = "#"
to = ["cloud"]

[[downlinks]]
sink = "cloud"
from = "cmd/{{gateway_id}}/#"
topic = "cmd/{{1}}"
qos = 1
retain = {retain}
"##,
        cloud_sink(upstream)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_from_the_upstream_reaches_a_subscribed_device_on_the_mapped_topic() {
    let upstream = Mosquitto::start(Mode::Plain);
    let mut gw = TestGateway::start(&downlink_config(upstream.port(), false)).await;
    let device = Subscriber::start(gw.port(), "press-7", "cmd/#").await;
    // Not for this gateway: the upstream subscription is cmd/edge-01/#.
    publish_upstream_retained(upstream.port(), "cmd/edge-02/m7/start", "not ours").await;
    publish_upstream_retained(upstream.port(), "cmd/edge-01/m7/start", r#"{"speed": 3}"#).await;
    let got = device.wait_for(1).await;
    assert_eq!(
        got,
        vec![(
            "cmd/m7/start".to_string(),
            br#"{"speed": 3}"#.to_vec(),
            false
        )],
        "mosquitto log:\n{}",
        upstream.logs()
    );
    // Counted after the local publish: the device can have it first.
    let downlinked = gw
        .counter_until(
            "edgebridge_downlink_messages_total",
            &[("sink", "cloud")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(downlinked, 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_downlinked_message_is_never_forwarded_back_upstream() {
    let (upstream, collector) = upstream_with_collector().await;
    // A rule that matches every local topic, the downlinked one included, and a
    // retained downlink (published to the local broker as retained).
    let mut gw = TestGateway::start(&downlink_config(upstream.port(), true)).await;
    let device = Subscriber::start(gw.port(), "press-7", "cmd/#").await;
    publish_upstream_retained(upstream.port(), "cmd/edge-01/m7/stop", "now").await;
    let got = device.wait_for(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "cmd/m7/stop");
    // A device that subscribes later gets the retained command.
    let late = Subscriber::start(gw.port(), "press-8", "cmd/m7/#").await;
    assert_eq!(
        late.wait_for(1).await,
        vec![("cmd/m7/stop".to_string(), b"now".to_vec(), true)]
    );
    // The rule does forward a device's own message: the marker. Once it is upstream,
    // a downlinked message that had entered intake would have been counted and sent.
    publish_all(gw.port(), "dev-1", &[("end", "done")]).await;
    let msgs = wait_for_topic(&collector, "end").await;
    let topics: Vec<&str> = msgs.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, vec!["cmd/edge-01/m7/stop", "end"], "{msgs:?}");
    assert_eq!(gw.counter("edgebridge_messages_received_total", &[]), 1.0);
    assert_eq!(
        gw.counter("edgebridge_rule_matches_total", &[("rule", "all")]),
        1.0
    );
    gw.shutdown().await;
}

/// A device that publishes `count` sequence-numbered QoS 1 messages on `topic`, one
/// every `pace`, over one connection. Returns (PUBACKs received, connection errors).
async fn stream(port: u16, device: u32, topic: String, count: u64, pace: Duration) -> (u64, u64) {
    let mut opts = MqttOptions::new(format!("stream-{device}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let publisher = tokio::spawn(async move {
        for seq in 0..count {
            let payload = common::seq_payload(device, seq);
            if client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(pace).await;
        }
    });
    let (mut acked, mut errors) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while acked < count {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    publisher.abort();
    (acked, errors)
}

fn reload_config(upstream: u16, version: u32) -> String {
    let sinks = cloud_sink(upstream);
    match version {
        1 => format!(
            r##"{sinks}
[sinks.old]
type = "file"
path = "{{dir}}/old.ndjson"

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud", "old"]
topic = "v1/{{1}}"
"##
        ),
        _ => format!(
            r##"{sinks}
[sinks.lake]
type = "file"
path = "{{dir}}/lake.ndjson"

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
where = "payload.seq >= 0"
to = ["cloud", "lake"]
topic = "v2/{{1}}"
"##
        ),
    }
}

/// Writes `body` as the gateway's config file, the way TestGateway writes it.
fn write_config(gw: &TestGateway, body: &str) -> std::path::PathBuf {
    let dir = gw.dir.path();
    let body = body.replace("{dir}", &dir.display().to_string());
    let toml = format!(
        "[gateway]\nid = \"edge-01\"\ndata_dir = \"{}\"\nshutdown_grace = \"2s\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:0\"\n{body}",
        dir.join("data").display()
    );
    let path = dir.join("edgebridge.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_under_a_steady_stream_loses_nothing_and_keeps_every_device_connected() {
    let (upstream, collector) = upstream_with_collector().await;
    let mut gw = TestGateway::start(&reload_config(upstream.port(), 1)).await;
    let (devices, per_device) = (3u32, 1_500u64);
    let streams: Vec<_> = (0..devices)
        .map(|d| {
            let port = gw.port();
            tokio::spawn(stream(
                port,
                d,
                format!("factory/d{d}/telemetry"),
                per_device,
                Duration::from_millis(2),
            ))
        })
        .collect();
    // Reload once the stream is well under way.
    assert!(collector.wait_for(300, WAIT).await, "stream started");
    let path = write_config(&gw, &reload_config(upstream.port(), 2));
    let report = gw
        .gateway
        .as_mut()
        .expect("running")
        .reload_from(&path)
        .await
        .expect("the new config applies");
    assert_eq!(report.added, vec!["lake".to_string()]);
    assert_eq!(report.removed, vec!["old".to_string()]);
    assert!(
        report.restarted.is_empty(),
        "cloud is unchanged: {report:?}"
    );
    assert_eq!(
        gw.counter("edgebridge_connections", &[("listener", "devices")]),
        f64::from(devices)
    );
    for s in streams {
        let (acked, errors) = s.await.expect("stream task");
        assert_eq!(
            (acked, errors),
            (per_device, 0),
            "every publish acked, no reconnect"
        );
    }
    let total = (devices as u64 * per_device) as usize;
    assert!(
        collector.wait_for_unique(total, WAIT).await,
        "upstream got {} of {total}",
        collector.len()
    );
    let msgs = collector.messages();
    let report = common::check_sequences(&msgs);
    assert_eq!(report.missing, 0, "{report:?}");
    // The switch is atomic per message and in order: per device, v1 topics up to some
    // point, v2 after it, never mixed.
    for d in 0..devices {
        let topics: Vec<&str> = msgs
            .iter()
            .filter(|(t, _)| t.ends_with(&format!("/d{d}")))
            .map(|(t, _)| t.split('/').next().unwrap_or(""))
            .collect();
        let first_v2 = topics
            .iter()
            .position(|t| *t == "v2")
            .expect("new rules applied");
        assert!(first_v2 > 0, "old rules applied before the reload");
        assert!(
            topics[first_v2..].iter().all(|t| *t == "v2"),
            "device {d}: old rules after the switch"
        );
    }
    // The added sink started; the removed one keeps its buffer on disk.
    let lake = gw.dir.path().join("lake.ndjson");
    let ok = gw
        .eventually(WAIT, |_| {
            std::fs::read_to_string(&lake).is_ok_and(|t| t.lines().count() > 0)
        })
        .await;
    assert!(ok, "the added sink delivers");
    assert!(gw.dir.path().join("data/buffers/old").is_dir());
    gw.shutdown().await;
}

/// `edgebridge run` as a process, killed on drop.
struct Process {
    child: std::process::Child,
    /// Its stdout (the log) and stderr.
    output: [std::path::PathBuf; 2],
}

impl Process {
    fn logs(&self) -> String {
        let read = |p: &std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        read(&self.output[0]) + &read(&self.output[1])
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "kill {sig}");
    }

    /// Waits until the log says `what` `n` times.
    async fn wait_for_log(&self, what: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.logs().matches(what).count() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what:?} in the log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// `edgebridge run --config path`, its log in `dir`; returns once it started.
    async fn start(dir: &std::path::Path, path: &std::path::Path) -> Process {
        let output = [dir.join("stdout.log"), dir.join("stderr.log")];
        let file = |p: &std::path::PathBuf| std::fs::File::create(p).expect("log file");
        let child = edgebridge()
            .args(["run", "--config"])
            .arg(path)
            .env_remove("RUST_LOG")
            .stdout(file(&output[0]))
            .stderr(file(&output[1]))
            .spawn()
            .expect("start edgebridge");
        let gw = Process { child, output };
        gw.wait_for_log("edgebridge started", 1).await;
        gw
    }
}

/// One device connection kept for a whole test, publishing QoS 1 and waiting for each
/// PUBACK.
struct Device {
    client: AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<()>,
    events: tokio::task::JoinHandle<String>,
}

impl Device {
    async fn connect(port: u16) -> Device {
        let mut opts = MqttOptions::new("dev-1", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let (acks_tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let events = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = acks_tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) => return format!("device connection failed: {e}"),
                }
            }
        });
        Device {
            client,
            acks,
            events,
        }
    }

    async fn publish(&mut self, topic: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, b"x".to_vec())
            .await
            .expect("queue publish");
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .expect("PUBACK within the timeout")
            .expect("device connection alive");
    }

    fn is_connected(&self) -> bool {
        !self.events.is_finished()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// The file sink's lines once there are `n` (or after the timeout, what there is).
async fn wait_file_lines(path: &std::path::Path, n: usize) -> Vec<(String, String)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while file_lines(path).len() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    file_lines(path)
}

/// Lines of the file sink's output, as (topic, payload).
fn file_lines(path: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (s("topic"), s("payload"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_with_a_broken_config_keeps_the_old_rules_and_a_good_one_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let out = dir.path().join("out.ndjson");
    let config = |rule: &str| {
        format!(
            "[gateway]\nid = \"edge-01\"\ndata_dir = \"{}\"\nshutdown_grace = \"1s\"\n\
             [admin]\nbind = \"127.0.0.1:{}\"\n\
             [[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:{port}\"\n\
             [sinks.out]\ntype = \"file\"\npath = \"{}\"\n{rule}",
            dir.path().join("data").display(),
            common::free_port(),
            out.display()
        )
    };
    let rule = |topic: &str, condition: &str| {
        format!(
            "[[rules]]\nname = \"r\"\nfrom = \"a/+\"\nwhere = \"{condition}\"\nto = [\"out\"]\ntopic = \"{topic}\"\n"
        )
    };
    let path = dir.path().join("edgebridge.toml");
    std::fs::write(&path, config(&rule("old/{1}", "true"))).expect("write config");
    let gw = Process::start(dir.path(), &path).await;

    // One device connection for the whole test: a reload must not drop it.
    let mut device = Device::connect(port).await;
    let wait_lines = |n: usize| wait_file_lines(&out, n);

    device.publish("a/1").await;
    assert_eq!(wait_lines(1).await[0].0, "old/1");

    // Broken: a CEL syntax error. Rejected with the key path; the old rules stay.
    std::fs::write(&path, config(&rule("new/{1}", "payload.x >"))).expect("write config");
    gw.signal("-HUP");
    gw.wait_for_log("reload rejected; the running config stays", 1)
        .await;
    assert!(gw.logs().contains("rules[0].where"), "{}", gw.logs());
    device.publish("a/2").await;
    assert_eq!(wait_lines(2).await[1].0, "old/2");

    // Good: applies, the device stays connected.
    std::fs::write(&path, config(&rule("new/{1}", "true"))).expect("write config");
    gw.signal("-HUP");
    gw.wait_for_log("config reloaded", 1).await;
    device.publish("a/3").await;
    let lines = wait_lines(3).await;
    let topics: Vec<&str> = lines.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, vec!["old/1", "old/2", "new/3"]);
    assert!(device.is_connected(), "the device connection is still up");

    gw.signal("-TERM");
    gw.wait_for_log("edgebridge stopped", 1).await;
}

/// A `${file:…}` secret that changes on disk reloads the config with no SIGHUP (a rotated
/// token); a secret file that goes missing is a rejected reload, and the config in force
/// stays. The secret here is a rule's topic prefix, so the file sink shows which applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_secret_file_reloads_the_config_without_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let out = dir.path().join("out.ndjson");
    let secret = dir.path().join("prefix.secret");
    std::fs::write(&secret, "first\n").expect("write secret");
    let path = dir.path().join("edgebridge.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"edge-01\"\ndata_dir = \"{}\"\nshutdown_grace = \"1s\"\n\
             [admin]\nbind = \"127.0.0.1:{}\"\n\
             [[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:{port}\"\n\
             [sinks.out]\ntype = \"file\"\npath = \"{}\"\n\
             [[rules]]\nname = \"r\"\nfrom = \"a/+\"\nto = [\"out\"]\n\
             topic = \"${{file:{}}}/{{1}}\"\n",
            dir.path().join("data").display(),
            common::free_port(),
            out.display(),
            secret.display(),
        ),
    )
    .expect("write config");
    let gw = Process::start(dir.path(), &path).await;

    let mut device = Device::connect(port).await;
    let wait_lines = |n: usize| wait_file_lines(&out, n);

    device.publish("a/1").await;
    assert_eq!(wait_lines(1).await[0].0, "first/1");

    // Rotated: read within the poll interval (5 s), no signal.
    std::fs::write(&secret, "second\n").expect("rotate secret");
    gw.wait_for_log("config reloaded", 1).await;
    device.publish("a/2").await;
    assert_eq!(wait_lines(2).await[1].0, "second/2");

    // Gone: the reload is rejected, once, and the config in force stays.
    std::fs::remove_file(&secret).expect("remove secret");
    gw.wait_for_log("reload rejected; the running config stays", 1)
        .await;
    assert!(
        gw.logs()
            .contains("rules[0].topic: cannot read the secret file"),
        "{}",
        gw.logs()
    );
    device.publish("a/3").await;
    let lines = wait_lines(3).await;
    let topics: Vec<&str> = lines.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, vec!["first/1", "second/2", "second/3"]);
    // Longer than a poll interval: a retry of the same change would be in the log by now.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        gw.logs()
            .matches("reload rejected; the running config stays")
            .count(),
        1,
        "a refused change is tried once"
    );
    assert!(device.is_connected(), "the device connection is still up");

    gw.signal("-TERM");
    gw.wait_for_log("edgebridge stopped", 1).await;
}

#[test]
fn rules_test_takes_properties_and_shows_what_each_sink_gets() {
    let config = r##"
[gateway]
id = "edge-09"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:1"
[sinks.legacy]
type = "mqtt"
url = "mqtt://127.0.0.1:2"
protocol = "3.1.1"
[sinks.lake]
type = "file"
path = "lake.ndjson"

[[rules]]
name = "line4"
from = "factory/+/telemetry"
where = "properties.user['line'] == '4' && properties.content_type == 'application/json'"
to = ["cloud", "legacy", "lake"]
[rules.properties]
remove = ["debug"]
set = { line = "L{1}", site = "{gateway_id}" }
add = { via = "{client_id}" }
"##;
    let (code, out, err) = rules_test(
        config,
        &[
            "--topic",
            "factory/press-7/telemetry",
            "--payload",
            "{}",
            "--client-id",
            "dev-7",
            "--property",
            "line=4",
            "--property",
            "debug=a=b",
            "--content-type",
            "application/json",
        ],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"rule line4: matched"), "{out}");
    let edited = r#"  properties: user [line=Lpress-7, site=edge-09, via=dev-7] content_type "application/json""#;
    let at = |sink: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(&format!("sink {sink}:")))
            .unwrap_or_else(|| panic!("no sink {sink} in:\n{out}"))
    };
    assert_eq!(lines[at("cloud") + 1], edited, "{out}");
    assert_eq!(lines[at("lake") + 1], edited, "{out}");
    assert_eq!(
        lines[at("legacy") + 1],
        format!("{edited} (dropped: this sink speaks MQTT 3.1.1)"),
        "{out}"
    );

    // Another line: the condition is false.
    let (code, out, _) = rules_test(
        config,
        &[
            "--topic",
            "factory/press-7/telemetry",
            "--property",
            "line=5",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("rule line4: no match: where is false"),
        "{out}"
    );
    let (code, _, err) = rules_test(config, &["--topic", "t", "--property", "novalue"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"novalue\" is not key=value"), "{err}");

    // check names the edit and warns that the 3.1.1 sink drops it.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgebridge.toml");
    std::fs::write(&path, config).expect("write config");
    let out = edgebridge()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run edgebridge check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "properties: remove debug, set line=L{1}, set site={gateway_id}, add via={client_id}"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "warning: the [rules.properties] of rule \"line4\" have no effect on this sink"
        ),
        "{text}"
    );
}
