//! Intake from device connections under a burst: every QoS 1 message reaches every sink
//! exactly, even when one sink is slow (devices are slowed down instead, by withheld
//! PUBACKs); QoS 0 beyond the high-water mark is shed and counted.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{check_sequences, client_options, publish_seq, Collector, Mode, Mosquitto};
use gateway::TestGateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};

const DEVICES: u32 = 10;
const PER_DEVICE: u64 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_of_200k_reaches_a_fast_and_a_slow_sink_exactly() {
    let upstream = Mosquitto::start(Mode::Plain);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "burst/#",
    )
    .await;
    // "cloud" is deliberately slow: 4 publishes in flight and a 256 KiB buffer that
    // blocks intake when full, so the devices must be held back.
    let body = format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{}"
inflight = 4
buffer = {{ max_bytes = "256KiB", when_full = "block" }}

[sinks.archive]
type = "file"
path = "{{dir}}/archive.ndjson"

[[rules]]
name = "burst"
from = "burst/#"
to = ["cloud", "archive"]
"#,
        upstream.port()
    );
    let mut gw = TestGateway::start(&body).await;

    let port = gw.port();
    let publishers: Vec<_> = (0..DEVICES)
        .map(|d| {
            tokio::spawn(async move {
                let topic = format!("burst/dev{d}");
                publish_seq(
                    "127.0.0.1",
                    port,
                    &format!("burst-{d}"),
                    &topic,
                    d,
                    PER_DEVICE,
                    QoS::AtLeastOnce,
                )
                .await
            })
        })
        .collect();
    for p in publishers {
        assert_eq!(
            p.await.expect("publisher"),
            PER_DEVICE,
            "every publish acked"
        );
    }
    let total = (DEVICES as u64 * PER_DEVICE) as usize;
    assert_eq!(
        gw.counter("edgebridge_messages_received_total", &[]),
        total as f64
    );

    assert!(
        collector.wait_for(total, Duration::from_secs(180)).await,
        "upstream got {} of {total}",
        collector.len()
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(
        report.duplicates, 0,
        "no reconnect happened, so no duplicates: {report:?}"
    );
    assert!(
        report.per_device_count.values().all(|&n| n == PER_DEVICE),
        "{report:?}"
    );

    let archived = gw
        .eventually(Duration::from_secs(60), |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "archive")]) >= total as f64
        })
        .await;
    assert!(archived, "archive sink delivered everything");
    let text = std::fs::read_to_string(gw.dir.path().join("archive.ndjson")).expect("archive file");
    let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
    let mut lines = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("NDJSON line");
        let payload: serde_json::Value =
            serde_json::from_str(v["payload"].as_str().expect("text payload"))
                .expect("JSON payload");
        let (device, seq) = (
            payload["device"].as_u64().unwrap_or(99),
            payload["seq"].as_u64().unwrap_or(0),
        );
        if let Some(prev) = last_seq.insert(device, seq) {
            assert_eq!(seq, prev + 1, "archive order for device {device}");
        }
        lines += 1;
    }
    assert_eq!(lines, total, "archive has every message exactly once");
    for reason in ["qos0_shed", "intake_full", "invalid"] {
        assert_eq!(
            gw.counter("edgebridge_messages_dropped_total", &[("reason", reason)]),
            0.0
        );
    }
    assert_eq!(gw.counter("edgebridge_buffer_dropped_total", &[]), 0.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qos0_beyond_the_high_water_mark_is_shed_and_counted() {
    // The only sink can never deliver (nothing listens on its port) and blocks intake
    // once its small buffer is full, so the intake queue fills up.
    let dead_port = common::free_port();
    let body = format!(
        r##"
[broker]
intake_queue = 64
qos0_high_water = 16

[sinks.dead]
type = "mqtt"
url = "mqtt://127.0.0.1:{dead_port}"
buffer = {{ max_bytes = "64KiB", when_full = "block" }}

[[rules]]
name = "all"
from = "#"
to = ["dead"]
"##
    );
    let mut gw = TestGateway::start(&body).await;
    let sent = 3_000u64;
    let mut opts = MqttOptions::new("flood", "127.0.0.1", gw.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 100);
    let driver = tokio::spawn(async move {
        let mut written = 0u64;
        while written < sent {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(_))) => written += 1,
                Ok(_) => {}
                Err(e) => panic!("flood client failed: {e}"),
            }
        }
        // Keep the connection open until the gateway has read everything.
        tokio::time::sleep(Duration::from_secs(2)).await;
        written
    });
    for i in 0..sent {
        client
            .publish(
                "flood/x",
                QoS::AtMostOnce,
                false,
                i.to_string().into_bytes(),
            )
            .await
            .expect("queue publish");
    }
    assert_eq!(driver.await.expect("driver"), sent);
    let settled = gw
        .eventually(Duration::from_secs(30), |g| {
            let received = g.counter("edgebridge_messages_received_total", &[]);
            let shed = g.counter(
                "edgebridge_messages_dropped_total",
                &[("reason", "qos0_shed")],
            );
            received + shed == sent as f64
        })
        .await;
    let shed = gw.counter(
        "edgebridge_messages_dropped_total",
        &[("reason", "qos0_shed")],
    );
    assert!(
        settled,
        "every QoS 0 message is either taken in or counted as shed"
    );
    assert!(shed > 0.0, "the flood crossed the high-water mark");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_stay_served_while_many_connections_wait_for_stalled_durable_acks() {
    // The only sink never delivers and its full buffer blocks intake: every QoS 1
    // publisher soon waits for an ack that cannot come. More of them wait than the runtime
    // has worker threads, so this fails if a waiting connection holds its worker.
    let dead_port = common::free_port();
    let body = format!(
        r##"
[sinks.dead]
type = "mqtt"
url = "mqtt://127.0.0.1:{dead_port}"
buffer = {{ max_bytes = "64KiB", when_full = "block" }}

[[rules]]
name = "stuck"
from = "stuck/#"
to = ["dead"]
"##
    );
    let mut gw = TestGateway::start(&body).await;
    let port = gw.port();
    let mut stalled = Vec::new();
    for d in 0..8 {
        let mut opts = MqttOptions::new(format!("stuck-{d}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(60))
            .set_inflight(20);
        let (client, mut events) = AsyncClient::new(opts, 64);
        stalled.push(tokio::spawn(async move {
            let publisher = tokio::spawn(async move {
                let payload = vec![b'x'; 2_000];
                for _ in 0..200 {
                    if client
                        .publish("stuck/x", QoS::AtLeastOnce, false, payload.clone())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            while events.poll().await.is_ok() {}
            publisher.abort();
        }));
    }
    // 8 × 200 × 2 KB is far beyond the 64 KiB buffer: wait until it is full.
    let full = gw
        .eventually(Duration::from_secs(20), |g| {
            g.counter("edgebridge_buffer_bytes", &[]) >= 48.0 * 1024.0
        })
        .await;
    assert!(full, "the publishers filled the buffer");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = gw.counter("edgebridge_messages_received_total", &[]);
    assert!(
        received < 8.0 * 200.0,
        "intake is stalled (received {received})"
    );

    // A new device still connects, subscribes and gets a local message from another.
    let mut opts = MqttOptions::new("watcher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (watcher, mut watcher_events) = AsyncClient::new(opts, 16);
    watcher
        .subscribe("local/news", QoS::AtMostOnce)
        .await
        .expect("queue subscribe");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        let mut subscribed = false;
        let mut talker = None;
        loop {
            match watcher_events.poll().await {
                Ok(Event::Incoming(rumqttc::Packet::SubAck(_))) if !subscribed => {
                    subscribed = true;
                    let mut opts = MqttOptions::new("talker", "127.0.0.1", port);
                    opts.set_keep_alive(Duration::from_secs(5));
                    let (client, mut events) = AsyncClient::new(opts, 16);
                    client
                        .publish("local/news", QoS::AtMostOnce, false, "hello")
                        .await
                        .expect("queue publish");
                    talker = Some(tokio::spawn(
                        async move { while events.poll().await.is_ok() {} },
                    ));
                }
                Ok(Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if let Some(t) = talker.take() {
                        t.abort();
                    }
                    return p.payload;
                }
                Ok(_) => {}
                Err(e) => panic!("watcher failed: {e}"),
            }
        }
    })
    .await
    .expect("a new device is served while other connections wait for acks");
    assert_eq!(&got[..], b"hello");
    for task in stalled {
        task.abort();
    }
    gw.shutdown().await;
}
