//! MQTT sink failover against two real Mosquittos: `url = [primary, backup]`. The primary
//! stops mid-stream, the sink moves to the backup; the primary comes back, the sink
//! returns to it; every message arrives at one of the two, duplicates only within the
//! in-flight window. The metric and the status API show the endpoint in use at each stage.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    check_sequences, client_options, publish_seq_with, Collector, Mode, Mosquitto, TestCerts,
};
use gateway::{sink, status_until, TestGateway};
use rumqttc::{MqttOptions, QoS};

const WAIT: Duration = Duration::from_secs(60);

/// Publishes awaiting their PUBACK at once; bounds the duplicates of one switch.
const INFLIGHT: u64 = 50;

/// `scheme` for both urls; `tls`: the sink's `tls = {...}` line, if any.
fn failover_sink(scheme: &str, primary: u16, backup: u16, tls: &str) -> String {
    format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = ["{scheme}://localhost:{primary}", "{scheme}://127.0.0.1:{backup}"]
{tls}
failover_after = 3
failback_check = "300ms"
backoff_min = "50ms"
backoff_max = "300ms"
inflight = {INFLIGHT}

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud"]
topic = "dt/{{gateway_id}}/{{1}}"
"#
    )
}

/// A device publishing seq-numbered messages in small chunks until stopped, so that
/// the stream runs through every stage of the test.
struct Stream {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Stream {
    fn start(port: u16) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            const CHUNK: u64 = 20;
            let mut next = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                let opts = MqttOptions::new(format!("dev-0-{next}"), "127.0.0.1", port);
                let seqs = next..next + CHUNK;
                let acked = publish_seq_with(
                    opts,
                    "factory/d0/telemetry",
                    0,
                    seqs.clone(),
                    QoS::AtLeastOnce,
                )
                .await;
                assert_eq!(acked, CHUNK, "the gateway acked every publish of {seqs:?}");
                next += CHUNK;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            next
        });
        Stream { stop, task }
    }

    /// Stops after the chunk being published; returns how many messages were published.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("publisher task")
    }
}

fn endpoint_gauge(gw: &TestGateway, index: &str) -> f64 {
    gw.counter(
        "edgebridge_sink_endpoint",
        &[("sink", "cloud"), ("endpoint", index)],
    )
}

/// Waits until the metric and the status API both say endpoint `index` (`addr`) is in use.
async fn wait_for_endpoint(gw: &TestGateway, index: usize, addr: &str) {
    let (this, other) = if index == 0 { ("0", "1") } else { ("1", "0") };
    let shown = gw
        .eventually(WAIT, |g| {
            endpoint_gauge(g, this) == 1.0 && endpoint_gauge(g, other) == 0.0
        })
        .await;
    assert!(
        shown,
        "edgebridge_sink_endpoint never showed endpoint {index}:\n{}",
        gw.gw().metrics.render()
    );
    let status = status_until(gw.gw().admin_addr, WAIT, |s| {
        sink(s, "cloud")["endpoint"]["in_use"] == addr
    })
    .await;
    assert_eq!(sink(&status, "cloud")["endpoint"]["index"], index);
}

fn max_seq(msgs: &[common::Msg]) -> u64 {
    msgs.iter()
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_backup_and_back_with_nothing_lost() {
    failover_and_back(Mode::Plain, "mqtt", "").await;
}

/// The same over mutual TLS: the sink and its probe of the primary both present the
/// client certificate (Mosquitto requires it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_and_back_over_mutual_tls() {
    let certs = TestCerts::generate();
    let tls = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    failover_and_back(Mode::MutualTls(&certs), "mqtts", &tls).await;
}

async fn failover_and_back(mode: Mode<'_>, scheme: &str, tls: &str) {
    // Persistent: what the primary accepted for its collector before it stopped is
    // delivered after its restart, and the collector's subscription survives.
    let mut primary = Mosquitto::start_with(mode, true);
    let backup = Mosquitto::start_with(mode, true);
    let at_primary = Collector::start(
        client_options("collector-primary", primary.port(), mode),
        "dt/#",
    )
    .await;
    let at_backup = Collector::start(
        client_options("collector-backup", backup.port(), mode),
        "dt/#",
    )
    .await;
    let primary_addr = format!("localhost:{}", primary.port());
    let backup_addr = format!("127.0.0.1:{}", backup.port());
    let sink_config = failover_sink(scheme, primary.port(), backup.port(), tls);
    let mut gw = TestGateway::start(&sink_config).await;

    // On the primary.
    wait_for_endpoint(&gw, 0, &primary_addr).await;
    let status = gateway::status(gw.gw().admin_addr).await;
    assert_eq!(
        sink(&status, "cloud")["endpoint"]["list"],
        serde_json::json!([primary_addr, backup_addr])
    );
    let stream = Stream::start(gw.port());
    assert!(
        at_primary.wait_for(300, WAIT).await,
        "the stream reaches the primary"
    );

    // The primary stops mid-stream: the sink moves to the backup, messages arrive there.
    primary.terminate();
    wait_for_endpoint(&gw, 1, &backup_addr).await;
    assert!(
        at_backup.wait_for(300, WAIT).await,
        "the backup got {} messages; its log:\n{}",
        at_backup.len(),
        backup.logs()
    );

    // The primary is back: the sink returns to it, later messages arrive there.
    primary.restart();
    wait_for_endpoint(&gw, 0, &primary_addr).await;
    let mark = at_primary.len();
    assert!(
        at_primary.wait_for(mark + 300, WAIT).await,
        "messages arrive at the primary again after the failback"
    );
    let published = stream.stop().await;

    // Every message arrived at one of the two.
    let union = || {
        let mut all = at_primary.messages();
        all.extend(at_backup.messages());
        all
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut report = check_sequences(&union());
    while report.per_device_count.get(&0) != Some(&published)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        report = check_sequences(&union());
    }
    assert_eq!(
        report.per_device_count.get(&0),
        Some(&published),
        "{report:?}"
    );
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.unparsed, 0, "{report:?}");
    // Two switches; each resends at most the in-flight window (the failback waits for
    // those acks, the failover cannot), and the primary's collector may get a few of
    // its own again after the restart.
    assert!(
        report.duplicates <= 3 * INFLIGHT,
        "{} duplicates for {published} messages: more than the in-flight windows explain ({report:?})",
        report.duplicates
    );
    assert!(
        max_seq(&at_primary.messages()) > max_seq(&at_backup.messages()),
        "the newest messages went to the primary after the failback"
    );
    eprintln!(
        "published {published}: primary {}, backup {}, duplicates {}",
        at_primary.len(),
        at_backup.len(),
        report.duplicates
    );
    gw.shutdown().await;
}

/// A primary that is down from the start: the sink's first attempts fail, it moves to the
/// backup and delivers everything there, and it stays there while every check of the
/// primary goes unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_on_the_backup_while_the_primary_is_down() {
    let dead_primary = common::free_port();
    let backup = Mosquitto::start(Mode::Plain);
    let at_backup = Collector::start(
        client_options("collector-backup", backup.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let backup_addr = format!("127.0.0.1:{}", backup.port());
    let sink_config = failover_sink("mqtt", dead_primary, backup.port(), "");
    let mut gw = TestGateway::start(&sink_config).await;

    let count = 500;
    let acked = common::publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-0",
        "factory/d0/telemetry",
        0,
        count,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(acked, count);
    assert!(
        at_backup.wait_for_unique(count as usize, WAIT).await,
        "the backup got {} of {count}",
        at_backup.len()
    );
    let report = check_sequences(&at_backup.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    wait_for_endpoint(&gw, 1, &backup_addr).await;
    assert!(
        gw.counter(
            "edgebridge_sink_errors_total",
            &[("sink", "cloud"), ("reason", "connection_refused")]
        ) >= 3.0,
        "three refused attempts on the primary before the failover"
    );
    // Several checks of the primary (every 300 ms) find nothing: the sink stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(endpoint_gauge(&gw, "1"), 1.0);
    assert_eq!(endpoint_gauge(&gw, "0"), 0.0);
    gw.shutdown().await;
}
