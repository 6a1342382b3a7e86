//! What rumqttd provided to devices still works with edgebridge's own device connections:
//! retained messages, last wills, QoS 2 (whose PUBREC is held until durable), and
//! 3.1.1 and 5 clients on one port.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::time::Duration;

use gateway::{TestGateway, FILE_SINK};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, Publish, QoS};

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// Polls until `want` matches an event (10 s at most).
async fn until<T>(events: &mut EventLoop, mut want: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
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
    .expect("event within 10 s")
}

fn incoming_publish(event: &Event) -> Option<Publish> {
    match event {
        Event::Incoming(Incoming::Publish(p)) => Some(p.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retained_messages_reach_later_subscribers() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let (publisher, mut pub_events) = AsyncClient::new(options("retainer", gw.port()), 10);
    publisher
        .publish("line/1/state", QoS::AtLeastOnce, true, b"running".to_vec())
        .await
        .expect("publish");
    until(&mut pub_events, |e| {
        matches!(e, Event::Incoming(Incoming::PubAck(_))).then_some(())
    })
    .await;

    let (sub, mut sub_events) = AsyncClient::new(options("late", gw.port()), 10);
    sub.subscribe("line/+/state", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = until(&mut sub_events, incoming_publish).await;
    assert_eq!(got.payload.as_ref(), b"running");
    assert!(got.retain, "delivered as retained");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn last_will_is_published_when_a_device_vanishes() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let (watcher, mut watch_events) = AsyncClient::new(options("watcher", gw.port()), 10);
    watcher
        .subscribe("status/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut watch_events, |e| {
        matches!(e, Event::Incoming(Incoming::SubAck(_))).then_some(())
    })
    .await;

    let mut opts = options("plc-7", gw.port());
    opts.set_last_will(LastWill::new(
        "status/plc-7",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (_device, mut device_events) = AsyncClient::new(opts, 10);
    until(&mut device_events, |e| {
        matches!(e, Event::Incoming(Incoming::ConnAck(_))).then_some(())
    })
    .await;
    // The device vanishes without DISCONNECT.
    drop(device_events);

    let will = until(&mut watch_events, incoming_publish).await;
    assert_eq!(will.topic, "status/plc-7");
    assert_eq!(will.payload.as_ref(), b"offline");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qos2_publishes_complete_and_reach_the_sink_once() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    // Room for every request: the event loop is only polled after the loop below.
    let (device, mut events) = AsyncClient::new(options("qos2", gw.port()), 100);
    for i in 0..20u32 {
        device
            .publish(
                "cell/9/count",
                QoS::ExactlyOnce,
                false,
                i.to_string().into_bytes(),
            )
            .await
            .expect("publish");
    }
    let mut completed = 0;
    until(&mut events, |e| {
        if matches!(e, Event::Incoming(Incoming::PubComp(_))) {
            completed += 1;
        }
        (completed == 20).then_some(())
    })
    .await;
    let delivered = gw
        .eventually(Duration::from_secs(10), |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "local")]) >= 20.0
        })
        .await;
    assert!(delivered, "every QoS 2 message reached the file sink");
    let text = std::fs::read_to_string(gw.dir.path().join("out.ndjson")).expect("sink file");
    let payloads: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json line")["payload"].to_string()
        })
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("\"{i}\"")).collect();
    assert_eq!(payloads, expected, "once each, in order");
    gw.shutdown().await;
}
