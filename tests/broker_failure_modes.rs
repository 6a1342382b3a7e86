//! rumqttd's known failure modes (DESIGN.md) reproduced against edgebridge's listener:
//! each scenario runs, then the test proves the listener still serves new clients and
//! that a refused client got a proper CONNACK code.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::time::Duration;

use gateway::{TestGateway, FILE_SINK};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn connect_packet(version: u8, client_id: &str) -> Vec<u8> {
    let mut vh = vec![0, 4, b'M', b'Q', b'T', b'T', version, 0x02, 0, 60];
    if version == 5 {
        vh.push(0); // no properties
    }
    vh.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    vh.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, vh.len() as u8];
    packet.extend(vh);
    packet
}

/// Sends a raw CONNECT and returns the CONNACK's (return/reason code, stream).
async fn raw_connect(port: u16, version: u8, client_id: &str) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("tcp connect");
    s.write_all(&connect_packet(version, client_id))
        .await
        .expect("send CONNECT");
    let mut header = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut header))
        .await
        .expect("CONNACK within 10 s")
        .expect("CONNACK, not a closed connection");
    assert_eq!(header[0], 0x20, "CONNACK packet type");
    let mut body = vec![0u8; header[1] as usize];
    s.read_exact(&mut body).await.expect("CONNACK body");
    (body[1], s)
}

/// Waits until the peer closes `s` (returns false if it stays open for 10 s).
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A new 3.1.1 client subscribes and receives its own QoS 1 publish; a new v5 client
/// connects: the listener serves everyone.
async fn listener_still_serves(port: u16, tag: &str) {
    let mut opts = MqttOptions::new(format!("probe-{tag}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 10);
    client
        .subscribe(format!("probe/{tag}"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .publish(
            format!("probe/{tag}"),
            QoS::AtLeastOnce,
            false,
            b"ping".to_vec(),
        )
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => return p.payload.to_vec(),
                Ok(_) => {}
                Err(e) => panic!("probe client failed: {e}"),
            }
        }
    })
    .await
    .expect("probe round trip within 10 s");
    assert_eq!(got, b"ping");
    let (code, _s) = raw_connect(port, 5, &format!("probe5-{tag}")).await;
    assert_eq!(code, 0, "a new v5 client is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v5_properties_never_reach_a_311_subscriber_writer() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();

    // 3.1.1 subscriber.
    let mut opts = MqttOptions::new("sub311", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(false);
    let (sub, mut sub_events) = AsyncClient::new(opts.clone(), 10);
    sub.subscribe("fm/props", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Incoming::SubAck(_)) = sub_events.poll().await.expect("suback") {
            break;
        }
    }

    // v5 publisher with user properties on the same topic.
    let mut opts5 = rumqttc::v5::MqttOptions::new("pub5", "127.0.0.1", port);
    opts5.set_keep_alive(Duration::from_secs(5));
    let (publisher, mut pub_events) = rumqttc::v5::AsyncClient::new(opts5, 10);
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("site".into(), "plant-9".into())],
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    publisher
        .publish_with_properties(
            "fm/props",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "{\"t\":1}",
            props,
        )
        .await
        .expect("publish");
    let pub_driver = tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });

    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match sub_events.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => return p.payload.to_vec(),
                Ok(_) => {}
                Err(e) => panic!("3.1.1 subscriber lost its connection: {e}"),
            }
        }
    })
    .await
    .expect("the 3.1.1 subscriber receives the v5 message");
    assert_eq!(received, b"{\"t\":1}");

    // The subscriber reconnects with the same id (this used to panic in rumqttd and
    // poison the listener). Its old socket was just dropped: rumqttd may abort the first
    // attempt while it takes the session over, so the client retries as a device would.
    drop(sub);
    drop(sub_events);
    let (sub, mut sub_events) = AsyncClient::new(opts, 10);
    let reconnected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match sub_events.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(a))) => return a.code,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("reconnect within 10 s");
    assert_eq!(reconnected, rumqttc::ConnectReturnCode::Success);
    drop(sub);
    pub_driver.abort();

    listener_still_serves(port, "props").await;
    let delivered = gw
        .eventually(Duration::from_secs(10), |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "local")]) >= 1.0
        })
        .await;
    assert!(delivered, "the v5 message was forwarded to the sink too");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_client_id_is_refused_with_a_connack_twice() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    for attempt in 0..2 {
        let (code, mut s) = raw_connect(port, 4, "dev/1").await;
        assert_eq!(code, 0x02, "3.1.1 'identifier rejected', attempt {attempt}");
        assert!(closed_by_peer(&mut s).await, "refused connection is closed");
    }
    for attempt in 0..2 {
        let (code, mut s) = raw_connect(port, 5, "dev/1").await;
        assert_eq!(
            code, 0x85,
            "v5 'client identifier not valid', attempt {attempt}"
        );
        assert!(closed_by_peer(&mut s).await);
    }
    listener_still_serves(port, "clientid").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v5_client_sending_a_connack_is_closed_and_can_reconnect() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    for _ in 0..2 {
        let (code, mut s) = raw_connect(port, 5, "fm4").await;
        assert_eq!(code, 0);
        s.write_all(&[0x20, 0x03, 0x00, 0x00, 0x00])
            .await
            .expect("send CONNACK");
        assert!(closed_by_peer(&mut s).await, "the connection is closed");
    }
    // The same id again, and everyone else.
    let (code, _s) = raw_connect(port, 5, "fm4").await;
    assert_eq!(code, 0, "the same client id connects again");
    listener_still_serves(port, "connack").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_refuses_cleanly_and_recovers() {
    let body = format!(
        "[[listeners]]\nname = \"small\"\nbind = \"127.0.0.1:0\"\nmax_connections = 2\n{FILE_SINK}"
    );
    let mut gw = TestGateway::start(&body).await;
    let port = gw.port();
    let (a, _sa) = raw_connect(port, 4, "one").await;
    let (b, sb) = raw_connect(port, 4, "two").await;
    assert_eq!((a, b), (0, 0));
    for attempt in 0..2 {
        let (code, mut s) = raw_connect(port, 4, "three").await;
        assert_eq!(code, 0x03, "3.1.1 'server unavailable', attempt {attempt}");
        assert!(closed_by_peer(&mut s).await);
    }
    let (code, _s) = raw_connect(port, 5, "three").await;
    assert_eq!(code, 0x89, "v5 'server busy'");
    assert_eq!(
        gw.counter("edgebridge_connections", &[("listener", "small")]),
        2.0
    );
    drop(sb);
    let freed = gw
        .eventually(Duration::from_secs(10), |g| {
            g.counter("edgebridge_connections", &[("listener", "small")]) == 1.0
        })
        .await;
    assert!(freed, "a closed connection frees its slot");
    let (code, _s) = raw_connect(port, 4, "three").await;
    assert_eq!(code, 0, "accepted once a slot is free");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_server_only_packets_close_one_connection_only() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    let garbage: [&[u8]; 4] = [
        &[0xF0, 0x00],                   // reserved packet type
        &[0x32, 0x02, 0x00, 0x09],       // PUBLISH whose topic runs past the frame
        &[0x36, 0x03, 0x00, 0x01, b'a'], // PUBLISH with QoS 3
        &[0x90, 0x03, 0x00, 0x01, 0x00], // SUBACK from a device
    ];
    for (i, bytes) in garbage.iter().enumerate() {
        let (code, mut s) =
            raw_connect(port, if i % 2 == 0 { 4 } else { 5 }, &format!("bad{i}")).await;
        assert_eq!(code, 0);
        s.write_all(bytes).await.expect("send garbage");
        assert!(
            closed_by_peer(&mut s).await,
            "garbage #{i} closes its connection"
        );
    }
    listener_still_serves(port, "garbage").await;
    gw.shutdown().await;
}

/// rumqttd keeps a will handler per client id and leaves it stale when a connection's
/// link setup fails (typically the takeover of a session by a fast reconnect of the
/// same id); the next CONNECT with that id then panics while holding the listener's
/// mutex, and every later connection on the listener fails. Storms of same-id
/// reconnects, some torn down right after CONNECT, must leave the listener serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_id_reconnect_storms_never_break_the_listener() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let port = gw.port();
    for round in 0..40u32 {
        let mut tasks = Vec::new();
        for i in 0..6u32 {
            tasks.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect");
                s.write_all(&connect_packet(if i % 2 == 0 { 4 } else { 5 }, "storm"))
                    .await
                    .expect("write CONNECT");
                if (round + i) % 3 == 0 {
                    // Gone before the CONNACK.
                    return;
                }
                let mut buf = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
    // Every id, including the stormed one, still connects; the listener still routes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for attempt in 0..3 {
        let (code, _s) = raw_connect(port, 4, "storm").await;
        if code == 0 {
            break;
        }
        assert!(
            attempt < 2,
            "the stormed id is accepted again (CONNACK {code})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    listener_still_serves(port, "after-storm").await;
    gw.shutdown().await;
}
