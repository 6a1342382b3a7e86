//! Operations: health, readiness and status in each state, exact metrics after a known
//! workload, the status page in a real browser (headless Chromium), half-open upstream
//! detection with a SIGSTOPped Mosquitto, and the log format of the real binary.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    check_sequences, client_options, free_port, publish_seq, seq_payload, Collector, Mode,
    Mosquitto,
};
use edgebridge::admin::{self, AdminState, Phase};
use edgebridge::buffer::Buffer;
use edgebridge::config;
use edgebridge::metrics::Metrics;
use edgebridge::sinks::SinkMetrics;
use gateway::{http_get, metric, sink, status, status_until, TestGateway};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(120);

fn admin(gw: &TestGateway) -> SocketAddr {
    gw.gw().admin_addr
}

/// Publishes `(topic, payload)` pairs at QoS 1 and waits for every PUBACK (30 s limit).
async fn publish_all(port: u16, client_id: &str, messages: &[(String, Vec<u8>)]) -> usize {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, messages.len() + 10);
    for (topic, payload) in messages {
        client
            .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .expect("queue publish");
    }
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked < messages.len() {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher {client_id}: {e}"),
            Err(_) => break,
        }
    }
    acked
}

/// A plain Mosquitto as the upstream, with a collector subscribed to `up/#`.
async fn upstream_with_collector() -> (Mosquitto, Collector) {
    let upstream = Mosquitto::start(Mode::Plain);
    let opts = client_options("collector", upstream.port(), Mode::Plain);
    let collector = Collector::start(opts, "up/#").await;
    (upstream, collector)
}

/// Whether sink `cloud` is up within `timeout`.
async fn sink_up_within(gw: &TestGateway, timeout: Duration) -> bool {
    gw.eventually(timeout, |g| {
        g.counter("edgebridge_sink_up", &[("sink", "cloud")]) == 1.0
    })
    .await
}

/// Starting, running and stopping as `/readyz`, `/healthz` and the status answer them,
/// served by the real admin endpoint; then a listener that stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_answer_starting_running_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("edgebridge.toml");
    let toml = format!(
        "[gateway]\ndata_dir = \"{}\"\n[sinks.local]\ntype = \"file\"\npath = \"{}\"\n\
         [[rules]]\nname = \"all\"\nfrom = \"#\"\nto = [\"local\"]\n",
        dir.path().join("data").display(),
        dir.path().join("out.ndjson").display()
    );
    std::fs::write(&config_path, toml).expect("write config");
    let loaded = config::load(&config_path).expect("config loads");
    let plan = config::validate(&loaded).expect("config is valid");
    let metrics = Arc::new(Metrics::new());
    let buffer = Buffer::open("local", &plan.sinks[0].buffer, &plan.data_dir, &metrics)
        .expect("buffer opens");
    let sink_state = SinkMetrics::new(&metrics, "local").state();
    // A device listener stand-in: a bound socket accepts connections into its backlog.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listener_addr = listener.local_addr().expect("addr");
    let state = Arc::new(AdminState::new(
        &plan,
        metrics,
        vec![("devices".into(), listener_addr)],
        vec![("local".into(), sink_state, Arc::new(buffer))],
    ));
    let stop = CancellationToken::new();
    let (addr, task) = admin::start(
        "127.0.0.1:0".parse().expect("addr"),
        state.clone(),
        stop.clone(),
    )
    .await
    .expect("admin starts");

    assert_eq!(http_get(addr, "/readyz").await, (503, "starting\n".into()));
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));
    let s = status(addr).await;
    assert_eq!(s["state"], "starting");
    assert_eq!(sink(&s, "local")["state"], "down");
    assert!(sink(&s, "local")["last_error"].is_null());

    state.set_phase(Phase::Running);
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(status(addr).await["state"], "running");

    state.set_phase(Phase::Stopping);
    assert_eq!(http_get(addr, "/readyz").await, (503, "stopping\n".into()));
    assert_eq!(status(addr).await["state"], "stopping");

    drop(listener);
    let (code, body) = http_get(addr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&listener_addr.to_string()), "{body}");
    stop.cancel();
    let _ = task.await;
}

fn two_sinks(dead_port: u16, extra_rule: &str) -> String {
    format!(
        r#"
[sinks.archive]
type = "file"
path = "{{dir}}/archive.ndjson"

[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{dead_port}"
username = "gateway"
password = "s3cret-pass-word"
backoff_min = "50ms"
backoff_max = "200ms"

[[rules]]
name = "telemetry"
from = "factory/+/t"
to = ["archive", "cloud"]
{extra_rule}
"#
    )
}

/// A running gateway with one sink up (file) and one down (a dead port): health and
/// readiness stay 200 (messages are stored), the status shows each sink's state, last
/// error, backlog and counters, the listener's connections and the rule's matches, and
/// no password anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_of_a_running_gateway_with_a_sink_down() {
    let mut gw = TestGateway::start(&two_sinks(free_port(), "")).await;
    let addr = admin(&gw);
    let s = status_until(addr, WAIT, |s| {
        sink(s, "cloud")["last_error"]["reason"] == "connection_refused"
            && sink(s, "archive")["up"] == true
    })
    .await;
    assert_eq!(s["state"], "running");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["gateway_id"], "edge-01");
    assert!(s["uptime_seconds"].is_u64(), "{s:#}");
    let cloud = sink(&s, "cloud");
    assert_eq!(
        (cloud["up"].clone(), cloud["state"].clone()),
        (false.into(), "down".into())
    );
    assert_eq!(cloud["kind"], "mqtt");
    assert!(
        cloud["last_error"]["at"].as_u64().is_some_and(|at| at > 0),
        "{cloud:#}"
    );
    assert_eq!(sink(&s, "archive")["state"], "up");
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".into()));

    // A device stays connected while it publishes 50 messages.
    let mut opts = MqttOptions::new("watcher", "127.0.0.1", gw.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (_watcher, mut watcher_loop) = AsyncClient::new(opts, 10);
    let watcher = tokio::spawn(async move { while watcher_loop.poll().await.is_ok() {} });
    let sent = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "factory/d0/t",
        0,
        50,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(sent, 50);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let s = status_until(addr, WAIT, |s| {
        sink(s, "archive")["delivered"] == 50 && s["listeners"][0]["connections"] == 1
    })
    .await;
    let listener = &s["listeners"][0];
    assert_eq!(listener["name"], "devices");
    assert_eq!(listener["addr"], gw.addr.to_string());
    assert_eq!(listener["received"], 50);
    let cloud = sink(&s, "cloud");
    assert_eq!(cloud["buffer"]["messages"], 50, "{cloud:#}");
    assert!(
        cloud["buffer"]["bytes"]
            .as_i64()
            .is_some_and(|b| b > 50 * 20),
        "{cloud:#}"
    );
    assert!(
        cloud["buffer"]["oldest_age_seconds"]
            .as_f64()
            .is_some_and(|a| a >= 1.0),
        "{cloud:#}"
    );
    assert_eq!(cloud["delivered"], 0);
    let refused = cloud["errors"]["connection_refused"].as_u64().unwrap_or(0);
    assert!(refused >= 1, "{cloud:#}");
    assert_eq!(
        cloud["errors_total"],
        cloud["errors"]
            .as_object()
            .map_or(0, |e| e.values().filter_map(Value::as_u64).sum::<u64>())
    );
    assert_eq!(sink(&s, "archive")["errors_total"], 0);
    assert_eq!(sink(&s, "archive")["buffer"]["messages"], 0);
    let rule = &s["rules"][0];
    assert_eq!(rule["name"], "telemetry");
    assert_eq!(rule["from"], "factory/+/t");
    assert_eq!(rule["to"], serde_json::json!(["archive", "cloud"]));
    assert_eq!(rule["matches"], 50);

    for path in ["/api/v1/status", "/", "/metrics"] {
        let (code, body) = http_get(addr, path).await;
        assert_eq!(code, 200);
        assert!(
            !body.contains("s3cret-pass-word"),
            "{path} shows the password"
        );
    }
    watcher.abort();
    gw.shutdown().await;
}

/// Every counter after a known workload, compared exactly with what was sent, delivered
/// and dropped: messages delivered to a real Mosquitto and to a file, messages too large
/// for the upstream (dead-lettered), messages no rule matches, and a sink whose upstream
/// is down with a small `drop_newest` buffer. The status API agrees with `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_exact_after_a_workload_with_failures_and_drops() {
    let (upstream, collector) = upstream_with_collector().await;
    let body = format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{up}"
max_packet_size = "1KiB"
backoff_min = "50ms"
backoff_max = "200ms"

[sinks.archive]
type = "file"
path = "{{dir}}/archive.ndjson"

[sinks.dead]
type = "mqtt"
url = "mqtt://127.0.0.1:{dead}"
backoff_min = "50ms"
backoff_max = "200ms"
buffer = {{ max_bytes = "128KiB", segment_size = "64KiB", when_full = "drop_newest" }}

[[rules]]
name = "telemetry"
from = "dev/+/t"
to = ["cloud", "archive", "dead"]
topic = "up/{{1}}"

[[rules]]
name = "images"
from = "dev/+/img"
to = ["cloud"]
topic = "up/img/{{1}}"
"#,
        up = upstream.port(),
        dead = free_port()
    );
    let mut gw = TestGateway::start(&body).await;
    const N: u64 = 3_000;
    const BIG: usize = 5;
    const UNMATCHED: usize = 7;
    let sent = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "dev/0/t",
        0,
        N,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(sent, N);
    let mut others: Vec<(String, Vec<u8>)> = (0..BIG)
        .map(|i| (format!("dev/{i}/img"), vec![b'x'; 2048]))
        .collect();
    others.extend((0..UNMATCHED).map(|i| (format!("other/{i}"), seq_payload(9, i as u64))));
    assert_eq!(
        publish_all(gw.port(), "dev-1", &others).await,
        BIG + UNMATCHED
    );

    let done = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "cloud")]) == N as f64
                && g.counter("edgebridge_sink_delivered_total", &[("sink", "archive")]) == N as f64
                && g.counter(
                    "edgebridge_buffer_dropped_total",
                    &[("sink", "cloud"), ("reason", "too_large")],
                ) == BIG as f64
        })
        .await;
    assert!(
        done,
        "deliveries did not complete:\n{}",
        gw.gw().metrics.render()
    );
    assert!(
        collector.wait_for_unique(N as usize, WAIT).await,
        "upstream got {}",
        collector.len()
    );
    // The publisher has disconnected; its connection task sees that after it left.
    let connections = gw
        .counter_until(
            "edgebridge_connections",
            &[("listener", "devices")],
            0.0,
            WAIT,
        )
        .await;
    assert_eq!(connections, 0.0, "the device's connection is closed");
    // Anything late (a duplicate delivery, a stray count) would show up by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, text) = http_get(admin(&gw), "/metrics").await;
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    let total = N as f64 + (BIG + UNMATCHED) as f64;
    assert_eq!(
        m(
            "edgebridge_messages_received_total",
            &[("listener", "devices")]
        ),
        total
    );
    assert_eq!(
        m(
            "edgebridge_messages_unmatched_total",
            &[("listener", "devices")]
        ),
        UNMATCHED as f64
    );
    assert_eq!(m("edgebridge_messages_dropped_total", &[]), 0.0);
    assert_eq!(
        m("edgebridge_rule_matches_total", &[("rule", "telemetry")]),
        N as f64
    );
    assert_eq!(
        m("edgebridge_rule_matches_total", &[("rule", "images")]),
        BIG as f64
    );
    assert_eq!(m("edgebridge_connections", &[("listener", "devices")]), 0.0);
    // The process collector: memory and open files of this process (its CPU counter
    // counts whole seconds, so it may still read 0 here).
    assert!(m("process_resident_memory_bytes", &[]) > 0.0, "{text}");
    assert!(m("process_open_fds", &[]) > 0.0, "{text}");
    assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
    // cloud: every small message confirmed, every big one dead-lettered.
    assert_eq!(
        m("edgebridge_sink_delivered_total", &[("sink", "cloud")]),
        N as f64
    );
    assert_eq!(
        m(
            "edgebridge_delivery_latency_seconds_count",
            &[("sink", "cloud")]
        ),
        N as f64
    );
    assert_eq!(
        m(
            "edgebridge_sink_errors_total",
            &[("sink", "cloud"), ("reason", "too_large")]
        ),
        BIG as f64
    );
    assert_eq!(
        m("edgebridge_buffer_dropped_total", &[("sink", "cloud")]),
        BIG as f64
    );
    assert_eq!(m("edgebridge_buffer_messages", &[("sink", "cloud")]), 0.0);
    assert_eq!(m("edgebridge_sink_up", &[("sink", "cloud")]), 1.0);
    let report = check_sequences(&collector.messages());
    assert_eq!(report.per_device_count.get(&0), Some(&N), "{report:?}");
    assert!(collector
        .messages()
        .iter()
        .all(|(t, _)| !t.starts_with("up/img/")));
    assert_eq!(gw.dead_letters("cloud").len(), BIG);
    // archive: everything, nothing else.
    assert_eq!(
        m("edgebridge_sink_delivered_total", &[("sink", "archive")]),
        N as f64
    );
    assert_eq!(
        m("edgebridge_sink_errors_total", &[("sink", "archive")]),
        0.0
    );
    let archived = std::fs::read_to_string(gw.dir.path().join("archive.ndjson")).expect("archive");
    assert_eq!(archived.lines().count(), N as usize);
    // dead: nothing delivered; what is not buffered was dropped, counted exactly.
    let buffered = m("edgebridge_buffer_messages", &[("sink", "dead")]);
    let dropped = m(
        "edgebridge_buffer_dropped_total",
        &[("sink", "dead"), ("reason", "full")],
    );
    assert!(dropped > 0.0, "the small buffer filled up");
    assert_eq!(buffered + dropped, N as f64);
    assert_eq!(
        m("edgebridge_sink_delivered_total", &[("sink", "dead")]),
        0.0
    );
    assert_eq!(m("edgebridge_sink_up", &[("sink", "dead")]), 0.0);
    let refused = m(
        "edgebridge_sink_errors_total",
        &[("sink", "dead"), ("reason", "connection_refused")],
    );
    assert!(refused >= 1.0);

    // The status API reports the same numbers.
    let s = status(admin(&gw)).await;
    let dead = sink(&s, "dead");
    assert_eq!(dead["buffer"]["messages"].as_f64(), Some(buffered));
    assert_eq!(dead["dropped"]["full"].as_f64(), Some(dropped));
    assert_eq!(dead["dropped_total"].as_f64(), Some(dropped));
    assert!(dead["errors"]["connection_refused"]
        .as_f64()
        .is_some_and(|e| e >= refused));
    let cloud = sink(&s, "cloud");
    assert_eq!(cloud["delivered"], N);
    assert_eq!(cloud["dropped"]["too_large"], BIG);
    assert_eq!(cloud["errors"]["too_large"], BIG);
    assert_eq!(s["listeners"][0]["received"].as_f64(), Some(total));
    assert_eq!(s["rules"][1]["matches"], BIG);
    gw.shutdown().await;
}

/// The status page at `/` as headless Chromium renders it from a running gateway: one
/// sink up, one down (a dead port) with its last error; config strings escaped (a rule
/// named like an HTML element stays text), no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_renders_sink_states_in_chromium() {
    let rule = "[[rules]]\nname = \"<img src=x onerror=alert(1)>\"\nfrom = \"plant/<b>&co/+\"\nto = [\"archive\"]\n";
    let mut gw = TestGateway::start(&two_sinks(free_port(), rule)).await;
    let addr = admin(&gw);
    status_until(addr, WAIT, |s| {
        sink(s, "cloud")["last_error"]["reason"] == "connection_refused"
            && sink(s, "archive")["up"] == true
    })
    .await;
    let sent = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "factory/d0/t",
        0,
        20,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(sent, 20);

    let dom = render_in_chromium(addr).await;

    // Each sink's card, as rendered: its name and its state badge.
    let card = |name: &str| sink_card(&dom, name);
    let archive = card("archive");
    assert!(
        archive.contains("<span class=\"sink-name\">archive</span>"),
        "{archive}"
    );
    assert!(
        archive.contains("<span class=\"badge up\">up</span>"),
        "{archive}"
    );
    let cloud = card("cloud");
    assert!(
        cloud.contains("<span class=\"sink-name\">cloud</span>"),
        "{cloud}"
    );
    assert!(
        cloud.contains("<span class=\"badge down\">down</span>"),
        "{cloud}"
    );
    assert!(cloud.contains("connection_refused"), "{cloud}");
    assert!(cloud.contains("20 messages"), "the backlog: {cloud}");
    assert!(dom.contains("id=\"gateway-state\">running<"), "{dom}");
    assert!(dom.contains("name=\"viewport\""), "{dom}");
    // Escaped config strings render as text, never as elements.
    assert!(!dom.contains("<img"), "{dom}");
    assert!(!dom.contains("<b>&amp;co"), "{dom}");
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    assert!(dom.contains("plant/&lt;b&gt;&amp;co/+"), "{dom}");
    assert!(!dom.contains("s3cret-pass-word"));
    gw.shutdown().await;
}

/// The status page at `addr` as headless Chromium renders it (its DOM).
async fn render_in_chromium(addr: SocketAddr) -> String {
    let chromium = Path::new("/usr/bin/chromium");
    assert!(
        chromium.exists(),
        "no /usr/bin/chromium: scripts/test.sh installs it"
    );
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let url = format!("http://{addr}/");
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finished within 90 s")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The card of sink `name` in a rendered status page, up to the end of its details.
fn sink_card(dom: &str, name: &str) -> String {
    let start = dom
        .find(&format!("id=\"sink-{name}\""))
        .unwrap_or_else(|| panic!("no card for sink {name} in:\n{dom}"));
    let rest = &dom[start..];
    rest[..rest.find("</dl>").unwrap_or(rest.len())].to_string()
}

/// A drain as an operator sees it: the status API carries each sink's recent samples
/// (sampled every second here) and, while the backlog shrinks, an estimate of the time
/// left; the page in Chromium draws the three charts and says what is left to drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_charts_a_drain_in_chromium() {
    let mut upstream = Mosquitto::start(Mode::Plain);
    let upstream_port = upstream.port();
    upstream.stop();
    let body = format!(
        r#"
[admin]
bind = "127.0.0.1:0"
history_interval = "1s"

[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{upstream_port}"
backoff_min = "50ms"
backoff_max = "200ms"
buffer = {{ drain_rate = 50 }}
rate = {{ messages = 1000, bytes = "1MiB" }}

[[rules]]
name = "telemetry"
from = "factory/+/t"
to = ["cloud"]
"#
    );
    let mut gw = TestGateway::start(&body).await;
    let addr = admin(&gw);
    let sent = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "factory/d0/t",
        0,
        3_000,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(sent, 3_000);
    // The samples show what came in and waits.
    status_until(addr, WAIT, |s| {
        let history = sink(s, "cloud")["history"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        history
            .iter()
            .any(|h| h["received_per_second"].as_f64() > Some(0.0))
            && history.last().is_some_and(|h| h["pending"] == 3_000)
    })
    .await;
    upstream.restart();
    // 50 msg/s: a minute to drain 3,000, so the page below still sees the drain.
    let s = status_until(addr, WAIT, |s| {
        let cloud = sink(s, "cloud");
        cloud["drain_eta_seconds"]
            .as_f64()
            .is_some_and(|eta| eta > 0.0)
            && cloud["buffer"]["backlog"].as_u64().is_some_and(|b| b > 0)
    })
    .await;
    let history = sink(&s, "cloud")["history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        history
            .iter()
            .any(|h| h["delivered_per_second"].as_f64() > Some(0.0)),
        "{history:?}"
    );

    let dom = render_in_chromium(addr).await;
    let cloud = sink_card(&dom, "cloud");
    assert!(cloud.contains("from the outage, about "), "{cloud}");
    assert!(
        cloud.contains("<dd>1000 msg/s, 1.0 MiB/s per connection (1)</dd>"),
        "the pacing in force: {cloud}"
    );
    for chart in ["received", "delivered", "waiting"] {
        let id = format!("id=\"chart-cloud-{chart}\"");
        let at = cloud
            .find(&id)
            .unwrap_or_else(|| panic!("no {chart} chart in {cloud}"));
        let svg = &cloud[at..];
        let points = svg
            .split("points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .unwrap_or_default();
        assert!(
            points.split(' ').count() >= 2,
            "the {chart} chart draws a line: {svg}"
        );
    }
    gw.shutdown().await;
}

/// Publishes seqs `0..count` of device 0 to `topic` at QoS 1, one every `gap`, and returns
/// how many were acknowledged (the event loop keeps going through gateway hiccups).
fn paced_publisher(
    port: u16,
    topic: &str,
    count: u64,
    gap: Duration,
) -> tokio::task::JoinHandle<u64> {
    let topic = topic.to_string();
    tokio::spawn(async move {
        let opts = MqttOptions::new("paced-0", "127.0.0.1", port);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let producer = tokio::spawn(async move {
            for seq in 0..count {
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, seq_payload(0, seq))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
        });
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while acked < count {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => break,
            }
        }
        producer.abort();
        acked
    })
}

fn half_open_sink(port: u16, timeouts: &str) -> String {
    format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{port}"
backoff_min = "50ms"
backoff_max = "500ms"
{timeouts}

[[rules]]
name = "all"
from = "dev/+"
to = ["cloud"]
topic = "up/{{1}}"
"#
    )
}

/// Waits until the sink is marked down; returns how long that took and the status then.
async fn time_to_down(gw: &TestGateway, since: Instant) -> (Duration, Value) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while gw.counter("edgebridge_sink_up", &[("sink", "cloud")]) != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the paused upstream was never marked down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = since.elapsed();
    (took, status(admin(gw)).await)
}

/// A SIGSTOPped upstream keeps its TCP connections open but answers nothing: with
/// publishes outstanding, `ack_timeout` marks it down (reason `ack_timeout`) and the
/// connection is re-established after SIGCONT; every message arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_upstream_is_detected_by_ack_timeout_and_nothing_is_lost() {
    let (upstream, collector) = upstream_with_collector().await;
    // keep_alive well above ack_timeout: the missing PUBACKs must be what detects it.
    let mut gw = TestGateway::start(&half_open_sink(
        upstream.port(),
        "ack_timeout = \"2s\"\nkeep_alive = \"60s\"",
    ))
    .await;
    const COUNT: u64 = 3_000;
    let publisher = paced_publisher(gw.port(), "dev/0", COUNT, Duration::from_millis(2));
    let flowing = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "cloud")]) >= 300.0
        })
        .await;
    assert!(flowing, "the stream reaches the upstream");

    upstream.pause();
    let paused_at = Instant::now();
    let (took, s) = time_to_down(&gw, paused_at).await;
    eprintln!("half-open upstream (SIGSTOP) marked down after {took:?} with ack_timeout = 2s");
    let cloud = sink(&s, "cloud");
    assert_eq!(cloud["last_error"]["reason"], "ack_timeout", "{cloud:#}");
    assert_eq!(cloud["up"], false);
    assert!(
        gw.counter(
            "edgebridge_sink_errors_total",
            &[("sink", "cloud"), ("reason", "ack_timeout")]
        ) >= 1.0
    );
    let delivered_while_down = gw.counter("edgebridge_sink_delivered_total", &[("sink", "cloud")]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    upstream.resume();

    assert_eq!(
        publisher.await.expect("publisher"),
        COUNT,
        "every publish acked by the gateway"
    );
    assert!(
        collector.wait_for_unique(COUNT as usize, WAIT).await,
        "upstream got {} unique of {COUNT}",
        check_sequences(&collector.messages())
            .per_device_count
            .get(&0)
            .copied()
            .unwrap_or(0)
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(report.per_device_count.get(&0), Some(&COUNT), "{report:?}");
    let recovered = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_up", &[("sink", "cloud")]) == 1.0
                && g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(recovered, "the sink is up again with an empty buffer");
    assert!(
        delivered_while_down < COUNT as f64,
        "the pause happened mid-stream"
    );
    gw.shutdown().await;
}

/// A real gateway shutting down while its sink waits for acknowledgements (the upstream
/// is frozen, so the sink uses its whole grace period): readiness says "stopping" and the
/// status reports it until the admin endpoint closes last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_reports_stopping_during_shutdown() {
    let upstream = Mosquitto::start(Mode::Plain);
    let mut gw = TestGateway::start(&half_open_sink(
        upstream.port(),
        "ack_timeout = \"60s\"\nkeep_alive = \"60s\"",
    ))
    .await;
    let addr = admin(&gw);
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".into()));
    let up = sink_up_within(&gw, WAIT).await;
    assert!(up, "the sink connects");
    upstream.pause();
    let sent = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "dev/0",
        0,
        20,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(sent, 20, "stored while the upstream is frozen");
    let outstanding = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 20.0
        })
        .await;
    assert!(outstanding);

    let gateway = gw.gateway.take().expect("gateway running");
    let shutdown = tokio::spawn(gateway.shutdown());
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, body) = loop {
        let answer = http_get(addr, "/readyz").await;
        if answer.0 != 200 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((code, body.as_str()), (503, "stopping\n"));
    assert_eq!(status(addr).await["state"], "stopping");
    shutdown.await.expect("shutdown");
    upstream.resume();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the admin endpoint closes once shutdown is done"
    );
}

/// With nothing outstanding, a SIGSTOPped upstream is caught by its unanswered PINGREQ
/// (`reason="ping_timeout"`), and the sink comes back after SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_paused_upstream_is_detected_by_unanswered_pings() {
    let upstream = Mosquitto::start(Mode::Plain);
    let mut gw = TestGateway::start(&half_open_sink(upstream.port(), "keep_alive = \"5s\"")).await;
    let up = sink_up_within(&gw, WAIT).await;
    assert!(up, "the sink connects");
    upstream.pause();
    let (took, s) = time_to_down(&gw, Instant::now()).await;
    eprintln!("idle half-open upstream (SIGSTOP) marked down after {took:?} with keep_alive = 5s");
    assert_eq!(
        sink(&s, "cloud")["last_error"]["reason"],
        "ping_timeout",
        "{s:#}"
    );
    upstream.resume();
    let back = sink_up_within(&gw, WAIT).await;
    assert!(back, "the sink reconnects after SIGCONT");
    gw.shutdown().await;
}

/// The real binary, its output lines collected as they come.
struct Binary {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The stdout and stderr readers: they end when the process has exited.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Binary {
    fn start(config: &Path, args: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgebridge"))
            .args(["run", "--config"])
            .arg(config)
            .args(args)
            .env_remove("RUST_LOG")
            // Colour-free logs on a pipe must be the gateway's own doing.
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start edgebridge");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        let mut readers = Vec::new();
        for stream in streams {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("EDGEBRIDGE_TEST_LOG").is_some() {
                        eprintln!("{line}");
                    }
                    lines.lock().expect("lines").push(line);
                }
            }));
        }
        Binary {
            child,
            lines,
            readers,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    async fn wait_for_line(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.lines().iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} in:\n{}",
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM; returns whether it exited successfully.
    fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let ok = self.child.wait().is_ok_and(|s| s.success());
        // Every line is taken once the readers reached the end of the closed pipes.
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        ok
    }
}

fn binary_config(dir: &Path, admin: u16, body: &str) -> std::path::PathBuf {
    let toml = format!(
        "[gateway]\ndata_dir = \"{}\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n\
         [[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:{}\"\n{body}",
        dir.join("data").display(),
        free_port()
    );
    let path = dir.join("edgebridge.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// `--log-format json`: every line is a JSON object; a sink logs one line per state
/// change (down with its reason however often it retries, up, draining, drained) and
/// nothing per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_logs_have_one_line_per_sink_state_change() {
    let (mut upstream, collector) = upstream_with_collector().await;
    upstream.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let admin_port = free_port();
    let body = format!(
        "[log]\nlevel = \"info\"\n{}",
        half_open_sink(upstream.port(), "")
    );
    let config = binary_config(dir.path(), admin_port, &body);
    let mut bin = Binary::start(&config, &["--log-format", "json"]);
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    bin.wait_for_line("edgebridge started").await;
    let device_port = status(admin_addr).await["listeners"][0]["addr"]
        .as_str()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .expect("listener address")
        .port();
    // Many failed attempts while down.
    status_until(admin_addr, WAIT, |s| {
        sink(s, "cloud")["errors"]["connection_refused"]
            .as_u64()
            .is_some_and(|n| n >= 5)
    })
    .await;
    let sent = publish_seq(
        "127.0.0.1",
        device_port,
        "dev-0",
        "dev/0",
        0,
        100,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(sent, 100);
    upstream.restart();
    bin.wait_for_line("backlog drained").await;
    assert!(collector.wait_for_unique(100, WAIT).await);
    assert!(bin.terminate(), "edgebridge exits cleanly on SIGTERM");

    let lines = bin.lines();
    let records: Vec<Value> = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for r in &records {
        assert!(r["timestamp"].is_string() && r["level"].is_string(), "{r}");
        assert!(r["fields"]["message"].is_string(), "{r}");
    }
    let cloud: Vec<&Value> = records
        .iter()
        .filter(|r| r["fields"]["sink"] == "cloud")
        .collect();
    let message = |r: &Value| {
        r["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let starts: Vec<String> = cloud
        .iter()
        .map(|r| message(r).split(':').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        starts,
        [
            "sink down",
            "sink up",
            "draining the backlog",
            "backlog drained",
            "sink stopped"
        ],
        "{cloud:#?}"
    );
    assert_eq!(cloud[0]["fields"]["reason"], "connection_refused");
    assert_eq!(cloud[0]["level"], "WARN");
    assert_eq!(cloud[2]["fields"]["pending"], 100);
    assert_eq!(cloud[3]["fields"]["messages"], 100);
    // Start-up and shutdown lines, the state changes, nothing per message.
    assert!(
        records.len() < 30,
        "{} lines:\n{}",
        records.len(),
        lines.join("\n")
    );
}

/// `--log-format` wins over `[log] format`: text lines from a config that says json,
/// JSON lines from the config without the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_format_flag_overrides_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = gateway::FILE_SINK.replace("{dir}", &dir.path().display().to_string());
    let config = binary_config(
        dir.path(),
        free_port(),
        &format!("[log]\nformat = \"json\"\n{body}"),
    );

    let mut text = Binary::start(&config, &["--log-format", "text"]);
    text.wait_for_line("edgebridge started").await;
    assert!(text.terminate());
    let lines = text.lines();
    let started = lines
        .iter()
        .find(|l| l.contains("edgebridge started"))
        .expect("start line");
    assert!(
        serde_json::from_str::<Value>(started).is_err(),
        "text expected: {started}"
    );
    assert!(started.contains("INFO"), "{started}");

    let mut json = Binary::start(&config, &[]);
    json.wait_for_line("edgebridge started").await;
    assert!(json.terminate());
    for line in json.lines().iter().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
}

/// With stdout a pipe (systemd's journal, Docker, a file), text logs carry no ANSI escape
/// codes; colour is for a terminal only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = gateway::FILE_SINK.replace("{dir}", &dir.path().display().to_string());
    let config = binary_config(dir.path(), free_port(), &body);
    let mut bin = Binary::start(&config, &["--log-format", "text"]);
    bin.wait_for_line("edgebridge started").await;
    assert!(bin.terminate());
    let lines = bin.lines();
    assert!(
        lines.iter().any(|l| l.contains("INFO")),
        "levels are logged: {lines:#?}"
    );
    let coloured: Vec<&String> = lines.iter().filter(|l| l.contains("\x1b[")).collect();
    assert!(coloured.is_empty(), "ANSI escape codes in {coloured:#?}");
}
