//! Devices → edgebridge → a real Mosquitto upstream: plaintext, TLS, mutual TLS (and its
//! client certificate renewed while running), and an upstream restart while a stream
//! flows.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    check_sequences, client_options, publish_seq, seq_payload, Collector, Mode, Mosquitto,
    TestCerts,
};
use gateway::TestGateway;
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(60);

fn mqtt_sink(url: &str, tls: &str) -> String {
    format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "{url}"
{tls}
backoff_min = "50ms"
backoff_max = "500ms"

[[rules]]
name = "telemetry"
from = "factory/+/telemetry"
to = ["cloud"]
topic = "dt/{{gateway_id}}/{{1}}"
"#
    )
}

/// `mosquitto_pub -l`: a second MQTT implementation as a device, one message per line.
fn mosquitto_pub_lines(port: u16, topic: &str, device: u32, count: u64) {
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .args(["-i", &format!("mosq-dev-{device}")])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub is installed (README's test command installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    for seq in 0..count {
        stdin.write_all(&seq_payload(device, seq)).expect("write");
        stdin.write_all(b"\n").expect("write");
    }
    drop(stdin);
    let status = child.wait().expect("mosquitto_pub exits");
    assert!(status.success(), "mosquitto_pub failed: {status}");
}

async fn forward_and_check(mode: Mode<'_>, url_scheme: &str, tls: &str) {
    let upstream = Mosquitto::start(mode);
    let collector =
        Collector::start(client_options("collector", upstream.port(), mode), "dt/#").await;
    let url = format!("{url_scheme}://localhost:{}", upstream.port());
    let mut gw = TestGateway::start(&mqtt_sink(&url, tls)).await;

    let per_device = 1_000u64;
    let mut publishers = Vec::new();
    for device in 0..3u32 {
        let port = gw.port();
        publishers.push(tokio::spawn(async move {
            let topic = format!("factory/d{device}/telemetry");
            publish_seq(
                "127.0.0.1",
                port,
                &format!("dev-{device}"),
                &topic,
                device,
                per_device,
                QoS::AtLeastOnce,
            )
            .await
        }));
    }
    let port = gw.port();
    tokio::task::spawn_blocking(move || {
        mosquitto_pub_lines(port, "factory/d9/telemetry", 9, per_device)
    })
    .await
    .expect("mosquitto_pub task");
    for p in publishers {
        assert_eq!(
            p.await.expect("publisher"),
            per_device,
            "every publish acked"
        );
    }

    let total = 4 * per_device as usize;
    assert!(
        collector.wait_for(total, WAIT).await,
        "upstream got {} of {total}; mosquitto log:\n{}",
        collector.len(),
        upstream.logs()
    );
    let msgs = collector.messages();
    let report = check_sequences(&msgs);
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    for device in [0, 1, 2, 9] {
        assert_eq!(
            report.per_device_count.get(&device),
            Some(&per_device),
            "{report:?}"
        );
        let topic = format!("dt/edge-01/d{device}");
        assert!(
            msgs.iter().any(|(t, _)| *t == topic),
            "rewritten topic {topic}"
        );
    }
    assert_eq!(
        gw.counter("edgebridge_messages_received_total", &[]),
        total as f64
    );
    // The upstream's PUBACK may reach the gateway after it forwarded to the collector.
    let acked = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "cloud")]) >= total as f64
        })
        .await;
    assert!(acked, "every message is confirmed by the upstream");
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "cloud")]), 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_upstream_gets_every_message_in_order() {
    forward_and_check(Mode::Plain, "mqtt", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_upstream_verified_against_the_test_ca() {
    let certs = TestCerts::generate();
    let tls = format!("tls = {{ ca = \"{}\" }}", certs.ca.display());
    forward_and_check(Mode::Tls(&certs), "mqtts", &tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_upstream_requires_our_client_certificate() {
    let certs = TestCerts::generate();
    let tls = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    forward_and_check(Mode::MutualTls(&certs), "mqtts", &tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_ca_keeps_the_sink_down_and_the_messages_buffered() {
    let certs = TestCerts::generate();
    let other = TestCerts::generate();
    let upstream = Mosquitto::start(Mode::Tls(&certs));
    let url = format!("mqtts://localhost:{}", upstream.port());
    let tls = format!("tls = {{ ca = \"{}\" }}", other.ca.display());
    let mut gw = TestGateway::start(&mqtt_sink(&url, &tls)).await;
    let acked = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev",
        "factory/d1/telemetry",
        1,
        50,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(acked, 50);
    let failed = gw
        .eventually(WAIT, |g| {
            g.counter(
                "edgebridge_sink_errors_total",
                &[("sink", "cloud"), ("reason", "tls")],
            ) >= 2.0
        })
        .await;
    assert!(failed, "TLS failures are counted with reason=tls");
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "cloud")]), 0.0);
    assert_eq!(
        gw.counter("edgebridge_sink_delivered_total", &[("sink", "cloud")]),
        0.0
    );
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]),
        50.0
    );
    gw.shutdown().await;
}

/// The upstream is stopped and started again while a device publishes a steady stream:
/// delivery resumes by itself and every message arrives, in order per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_restart_resumes_delivery_without_loss() {
    let mut upstream = Mosquitto::start_with(Mode::Plain, true);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let url = format!("mqtt://127.0.0.1:{}", upstream.port());
    let mut gw = TestGateway::start(&mqtt_sink(&url, "")).await;

    let port = gw.port();
    let total = 3_000u64;
    let stream = tokio::spawn(async move {
        let mut opts = client_options("steady", port, Mode::Plain);
        opts.set_clean_session(false);
        // ~500 msg/s for 6 s, in chunks, so the outage falls in the middle of the stream.
        let mut acked = 0;
        for chunk in 0..30u64 {
            let seqs = chunk * 100..(chunk + 1) * 100;
            acked += common::publish_seq_with(
                opts.clone(),
                "factory/steady/telemetry",
                7,
                seqs,
                QoS::AtLeastOnce,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        acked
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    upstream.terminate();
    let down = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_up", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(down, "sink_up drops to 0 while the upstream is down");
    tokio::time::sleep(Duration::from_secs(2)).await;
    upstream.restart();

    assert_eq!(stream.await.expect("publisher"), total);
    let complete = collector.wait_for_unique(total as usize, WAIT).await;
    let msgs = collector.messages();
    let seen: std::collections::BTreeSet<u64> = msgs
        .iter()
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    let missing: Vec<u64> = (0..total).filter(|s| !seen.contains(s)).collect();
    assert!(
        complete && missing.is_empty(),
        "upstream got {} of {total}; missing seqs {missing:?}; pending {}; gateway metrics:\n{}",
        msgs.len(),
        gw.counter("edgebridge_buffer_messages", &[]),
        gw.gw()
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("edgebridge_") && !l.contains("latency"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let report = check_sequences(&msgs);
    assert_eq!(report.per_device_count.get(&7), Some(&total), "{report:?}");
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    let up = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_up", &[("sink", "cloud")]) == 1.0
        })
        .await;
    assert!(up, "sink_up is back to 1");
    assert!(gw.counter("edgebridge_sink_errors_total", &[("sink", "cloud")]) >= 1.0);
    gw.shutdown().await;
}

/// `connections = 3`: three upstream connections with client ids `edge-01-1..3` share
/// the messages by topic. Six devices publish while the upstream restarts once: every
/// message arrives, each device's (each topic's) in order, and all three connections were
/// used and came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_connections_share_the_topics_and_keep_each_topics_order() {
    let mut upstream = Mosquitto::start_with(Mode::Plain, true);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let url = format!("mqtt://127.0.0.1:{}", upstream.port());
    let body = mqtt_sink(&url, "connections = 3");
    let mut gw = TestGateway::start(&body).await;

    let (devices, per_device) = (6u32, 2_000u64);
    let port = gw.port();
    let publishers: Vec<_> = (0..devices)
        .map(|d| {
            tokio::spawn(async move {
                let mut acked = 0;
                // In chunks with pauses, so the upstream restart falls mid-stream. A client
                // id per chunk keeps the devices clear of rumqttd's session-takeover race
                // (issue "Device sessions"): this test is about the upstream side.
                for chunk in 0..10u64 {
                    let id = format!("conn-dev-{d}-{chunk}");
                    let opts = client_options(&id, port, Mode::Plain);
                    let seqs = chunk * per_device / 10..(chunk + 1) * per_device / 10;
                    let topic = format!("factory/d{d}/telemetry");
                    acked +=
                        common::publish_seq_with(opts, &topic, d, seqs, QoS::AtLeastOnce).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                acked
            })
        })
        .collect();
    assert!(
        collector.wait_for(1_000, WAIT).await,
        "delivery started ({} arrived)",
        collector.len()
    );
    upstream.terminate();
    upstream.restart();
    let mut acked = 0;
    for p in publishers {
        acked += p.await.expect("publisher");
    }
    let total = u64::from(devices) * per_device;
    assert_eq!(acked, total);
    assert!(
        collector.wait_for_unique(total as usize, WAIT).await,
        "got {} of {total}",
        collector.len()
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    let logs = upstream.logs();
    for id in ["edge-01-1", "edge-01-2", "edge-01-3"] {
        assert!(
            logs.matches(&format!(" as {id} ")).count() >= 2,
            "{id} connected before and after the restart:\n{logs}"
        );
    }
    println!("connections = 3: duplicates {}", report.duplicates);
    gw.shutdown().await;
}
/// A message the upstream can never take (over the sink's `max_packet_size`) while the
/// dead-letter file cannot be written (`dead_letter` is a plain file, so the directory
/// cannot be created; permissions would not stop root): nothing is acked, the failure is
/// counted and retried, and once the file can be written the message is dead-lettered
/// and the messages behind it are delivered. Nothing is lost (issue "One-way
/// architecture": the MQTT sink used to ack the record anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unwritable_dead_letter_file_acks_nothing_and_loses_nothing() {
    let upstream = Mosquitto::start(Mode::Plain);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "dt/#",
    )
    .await;
    let url = format!("mqtt://127.0.0.1:{}", upstream.port());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
    let blocker = dir.path().join("data/dead_letter");
    std::fs::write(&blocker, b"not a directory").expect("block the dead-letter dir");
    let sink = mqtt_sink(&url, "max_packet_size = \"1KiB\"");
    let mut gw = TestGateway::start_in(&sink, dir).await;

    // One oversized message first, then five that fit.
    let mut opts = client_options("big", gw.port(), Mode::Plain);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    client
        .publish(
            "factory/d1/telemetry",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; 2000],
        )
        .await
        .expect("queue the oversized publish");
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(acked, Ok(true), "the gateway takes the oversized message");
    let acked = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev",
        "factory/d1/telemetry",
        1,
        5,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(acked, 5);

    // The failed write is counted, and retried (counted again) after the rewind.
    let retried = gw
        .eventually(WAIT, |g| {
            g.counter(
                "edgebridge_sink_errors_total",
                &[("sink", "cloud"), ("reason", "dead_letter")],
            ) >= 2.0
        })
        .await;
    assert!(retried, "dead-letter failures are counted, and retried");
    assert_eq!(
        gw.counter(
            "edgebridge_buffer_dropped_total",
            &[("sink", "cloud"), ("reason", "too_large")]
        ),
        0.0,
        "nothing counted as dropped while the dead-letter file cannot be written"
    );
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]),
        6.0,
        "nothing acked: the oversized message and the five behind it stay buffered"
    );

    std::fs::remove_file(&blocker).expect("unblock the dead-letter dir");
    assert!(
        gw.eventually(WAIT, |g| g.dead_letters("cloud").len() == 1)
            .await,
        "the oversized message is dead-lettered once the file can be written"
    );
    assert_eq!(gw.dead_letters("cloud")[0]["reason"], "too_large");
    assert!(
        collector.wait_for_unique(5, WAIT).await,
        "the five messages behind it arrive"
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.per_device_count.get(&1), Some(&5), "{report:?}");
    assert_eq!(report.missing, 0, "{report:?}");
    let dropped = gw
        .counter_until(
            "edgebridge_buffer_dropped_total",
            &[("sink", "cloud"), ("reason", "too_large")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(dropped, 1.0);
    gw.shutdown().await;
}

/// The sink's client certificate rotates without a restart: renewed files (written
/// elsewhere, then renamed in place) are used by the next connection, which Mosquitto
/// logs with the certificate's CN as the username; a broken certificate file is then
/// refused and reported, and the renewed certificate stays in use. No message is lost
/// across the reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sink_client_certificate_rotates_without_a_restart_and_a_broken_one_is_refused() {
    let certs = TestCerts::generate();
    let mut upstream = Mosquitto::start_with(Mode::MutualTls(&certs), true);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::MutualTls(&certs)),
        "dt/#",
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("edge.pem"), dir.path().join("edge.key"));
    std::fs::copy(&certs.client_cert, &cert).expect("copy");
    std::fs::copy(&certs.client_key, &key).expect("copy");
    let tls = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        certs.ca.display(),
        cert.display(),
        key.display()
    );
    let url = format!("mqtts://localhost:{}", upstream.port());
    let mut gw = TestGateway::start(&mqtt_sink(&url, &tls)).await;
    let port = gw.port();
    let publish = |seqs: std::ops::Range<u64>| {
        let mut opts = client_options("rotating", port, Mode::Plain);
        opts.set_clean_session(false);
        common::publish_seq_with(opts, "factory/d3/telemetry", 3, seqs, QoS::AtLeastOnce)
    };
    let connected_as =
        |upstream: &Mosquitto, cn: &str| upstream.logs().matches(&format!("u'{cn}'")).count();
    assert_eq!(publish(0..100).await, 100);
    assert!(
        collector.wait_for_unique(100, WAIT).await,
        "{}",
        upstream.logs()
    );
    assert!(
        connected_as(&upstream, "edge-01") >= 1,
        "{}",
        upstream.logs()
    );

    // The renewal, then an upstream restart: the sink's next connection uses it.
    let (renewed_cert, renewed_key) = certs.client_certificate("edge-renewed");
    for (path, pem) in [(&key, renewed_key), (&cert, renewed_cert)] {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, pem).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }
    upstream.terminate();
    upstream.restart();
    let renewed = gw
        .eventually(WAIT, |_| connected_as(&upstream, "edge-renewed") >= 1)
        .await;
    assert!(
        renewed,
        "the sink reconnects with the renewed certificate\n{}",
        upstream.logs()
    );
    assert_eq!(publish(100..200).await, 100);
    assert!(
        collector.wait_for_unique(200, WAIT).await,
        "{}",
        upstream.logs()
    );
    let applied = [("source", "sink:cloud"), ("outcome", "applied")];
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_credentials_reloads_total", &applied)
            >= 1.0)
            .await
    );

    // A broken certificate file: refused and reported; the renewed certificate stays.
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n",
    )
    .expect("write a broken certificate");
    upstream.terminate();
    upstream.restart();
    let refused = [("source", "sink:cloud"), ("outcome", "refused")];
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_credentials_reloads_total", &refused)
            >= 1.0)
            .await,
        "the broken file is reported"
    );
    let again = gw
        .eventually(WAIT, |_| connected_as(&upstream, "edge-renewed") >= 2)
        .await;
    assert!(
        again,
        "the sink reconnects with the certificate that loaded\n{}",
        upstream.logs()
    );
    assert_eq!(publish(200..300).await, 100);
    assert!(
        collector.wait_for_unique(300, WAIT).await,
        "{}",
        upstream.logs()
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.per_device_count.get(&3), Some(&300), "{report:?}");
    assert_eq!(report.missing, 0, "{report:?}");
    gw.shutdown().await;
}
