//! The Kafka sink against real peers: tansu (a Kafka-protocol broker) checked with an
//! rdkafka consumer, and librdkafka's MockCluster for the faults tansu cannot make
//! (injected request errors, brokers taken down mid-stream).

mod common;
#[path = "common/gateway.rs"]
mod gateway;
#[path = "common/kafka.rs"]
mod kafka;

use std::time::Duration;

use common::{check_sequences, publish_seq, Msg};
use gateway::TestGateway;
use kafka::{consume_async, Record, Tansu, TlsFront};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(60);

fn kafka_sink(brokers: &str, topic: &str, extra: &str) -> String {
    let brokers: Vec<String> = brokers.split(',').map(|b| format!("\"{b}\"")).collect();
    format!(
        r##"
[sinks.lake]
type = "kafka"
brokers = [{}]
topic = "{topic}"
backoff_min = "100ms"
backoff_max = "1s"
{extra}

[[rules]]
name = "all"
from = "plant/#"
to = ["lake"]
"##,
        brokers.join(", ")
    )
}

async fn publish(gw: &TestGateway, client_id: &str, topic: &str, device: u32, n: u64) {
    let acked = publish_seq(
        "127.0.0.1",
        gw.port(),
        client_id,
        topic,
        device,
        n,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(acked, n, "every publish acked by the gateway");
}

fn as_msgs(records: &[Record]) -> Vec<Msg> {
    records
        .iter()
        .map(|r| (r.topic.clone(), r.payload.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_reach_kafka_with_topic_key_headers_and_order() {
    let tansu = Tansu::start();
    tansu.create_topic("telemetry-m1");
    tansu.create_topic("telemetry-m2");
    let mut gw = TestGateway::start(&kafka_sink(&tansu.bootstrap(), "telemetry-{2}", "")).await;

    let (a, b) = tokio::join!(
        publish(&gw, "dev-1", "plant/m1/temp", 1, 300),
        publish(&gw, "dev-2", "plant/m2/temp", 2, 300),
    );
    let _ = (a, b);
    // A v5 device with a user property.
    let mut opts5 = rumqttc::v5::MqttOptions::new("dev-5", "127.0.0.1", gw.port());
    opts5.set_keep_alive(Duration::from_secs(5));
    let (client5, mut events5) = rumqttc::v5::AsyncClient::new(opts5, 10);
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![("site".into(), "plant-9".into())],
        ..Default::default()
    };
    client5
        .publish_with_properties(
            "plant/m1/temp",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "{\"device\":5,\"seq\":0}",
            props,
        )
        .await
        .expect("v5 publish");
    let driver = tokio::spawn(async move { while events5.poll().await.is_ok() {} });

    let records = consume_async(
        &tansu.bootstrap(),
        &["telemetry-m1", "telemetry-m2"],
        601,
        WAIT,
    )
    .await;
    driver.abort();
    assert_eq!(records.len(), 601, "tansu log:\n{}", tansu.logs());
    let report = check_sequences(&as_msgs(&records));
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert_eq!(report.per_device_count.get(&1), Some(&300));
    assert_eq!(report.per_device_count.get(&2), Some(&300));
    for r in &records {
        let device = if r.topic == "telemetry-m1" {
            "m1"
        } else {
            "m2"
        };
        let mqtt_topic = format!("plant/{device}/temp");
        assert_eq!(
            r.key.as_deref(),
            Some(mqtt_topic.as_str()),
            "key = MQTT topic"
        );
        assert_eq!(r.headers.get("mqtt_topic"), Some(&mqtt_topic));
        assert_eq!(r.headers.get("qos").map(String::as_str), Some("1"));
        assert_eq!(
            r.headers.get("gateway_id").map(String::as_str),
            Some("edge-01")
        );
    }
    let v5 = records
        .iter()
        .find(|r| r.payload.starts_with(b"{\"device\":5"))
        .expect("the v5 message arrived");
    assert_eq!(
        v5.headers.get("site").map(String::as_str),
        Some("plant-9"),
        "user property as a header"
    );
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_delivered_total", &[("sink", "lake")])
            == 601.0)
            .await
    );
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "lake")]), 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envelope_format_wraps_the_payload() {
    let tansu = Tansu::start();
    tansu.create_topic("events");
    let extra = "format = \"envelope\"\nkey = \"{gateway_id}-{2}\"";
    let mut gw = TestGateway::start(&kafka_sink(&tansu.bootstrap(), "events", extra)).await;
    publish(&gw, "dev-1", "plant/m7/temp", 1, 5).await;
    let records = consume_async(&tansu.bootstrap(), &["events"], 5, WAIT).await;
    assert_eq!(records.len(), 5);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.key.as_deref(), Some("edge-01-m7"));
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("JSON envelope");
        assert_eq!(v["topic"], "plant/m7/temp");
        assert_eq!(v["payload"]["seq"], i as u64);
        assert_eq!(v["gateway_id"], "edge-01");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_down_at_start_then_up_delivers_everything_buffered() {
    let port = common::free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    let mut gw = TestGateway::start(&kafka_sink(&bootstrap, "late", "")).await;
    publish(&gw, "dev-1", "plant/m1/temp", 1, 200).await;
    let down = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_errors_total", &[("sink", "lake")]) >= 1.0
                && g.counter("edgebridge_buffer_messages", &[("sink", "lake")]) == 200.0
        })
        .await;
    assert!(
        down,
        "the unreachable broker is counted and all 200 are buffered"
    );
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "lake")]), 0.0);

    let tansu = Tansu::start_on(port);
    tansu.create_topic("late");
    let records = consume_async(&bootstrap, &["late"], 200, WAIT).await;
    let report = check_sequences(&as_msgs(&records));
    assert_eq!(report.per_device_count.get(&1), Some(&200), "{report:?}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report:?}");
    assert!(
        gw.eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "lake")]) == 0.0
                && g.counter("edgebridge_sink_up", &[("sink", "lake")]) == 1.0
        })
        .await,
        "the buffer drains and the sink is up"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mock_cluster_not_leader_is_retried_and_too_large_is_dead_lettered() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    cluster.create_topic("mock", 1, 3).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let mut gw = TestGateway::start(&kafka_sink(&bootstrap, "mock", "")).await;

    // The next produce request is refused as too large: its message is dead-lettered.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    publish(&gw, "dev-1", "plant/m1/temp", 1, 1).await;
    assert!(
        gw.eventually(WAIT, |g| g.dead_letters("lake").len() == 1)
            .await,
        "the refused message is dead-lettered"
    );
    let dead = &gw.dead_letters("lake")[0];
    assert_eq!(dead["reason"], "message_size_too_large");
    assert_eq!(dead["payload"], "{\"device\":1,\"seq\":0}");

    // NOT_LEADER_FOR_PARTITION three times: retried, nothing lost, order kept.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 3],
    );
    let acked = publish_seq_range(&gw, 1..101).await;
    assert_eq!(acked, 100);
    let records = consume_async(&bootstrap, &["mock"], 100, WAIT).await;
    let seqs: Vec<u64> = records.iter().map(|r| seq_of(&r.payload)).collect();
    assert_eq!(seqs, (1..101).collect::<Vec<_>>());
    assert_eq!(
        gw.dead_letters("lake").len(),
        1,
        "nothing else dead-lettered"
    );
    assert_eq!(
        gw.counter(
            "edgebridge_buffer_dropped_total",
            &[("sink", "lake"), ("reason", "message_size_too_large")]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mock_cluster_broker_down_and_up_mid_stream_loses_nothing() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("mock", 1, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let mut gw = TestGateway::start(&kafka_sink(&bootstrap, "mock", "")).await;

    assert_eq!(publish_seq_range(&gw, 0..100).await, 100);
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_delivered_total", &[("sink", "lake")])
            == 100.0)
            .await
    );
    cluster.broker_down(1).expect("broker down");
    assert_eq!(publish_seq_range(&gw, 100..300).await, 200);
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_buffer_messages", &[("sink", "lake")])
            >= 1.0)
            .await,
        "messages wait while the broker is down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(1).expect("broker up");
    assert_eq!(publish_seq_range(&gw, 300..400).await, 100);

    let records = consume_async(&bootstrap, &["mock"], 400, WAIT).await;
    let report = check_sequences(&as_msgs(&records));
    assert_eq!(report.per_device_count.get(&1), Some(&400), "{report:?}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report:?}");
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_buffer_messages", &[("sink", "lake")])
            == 0.0)
            .await
    );
    gw.shutdown().await;
}

/// Certificate rotation for a Kafka sink in mutual TLS (tansu behind the test's TLS
/// front, which records each connection's client certificate): a renewed certificate and
/// key written over the files are used by the producer's next connections without a
/// restart; a broken certificate file is then refused and reported, the renewed one
/// stays in use; nothing is lost, order kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_client_certificate_is_used_by_the_next_kafka_connections() {
    let certs = common::TestCerts::generate();
    let front_port = common::free_port();
    let tansu = Tansu::start_advertising(common::free_port(), front_port);
    tansu.create_topic("secure");
    let front = TlsFront::start(&certs, front_port, tansu.port).await;
    let bootstrap = format!("127.0.0.1:{front_port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("edge.pem"), dir.path().join("edge.key"));
    let der = |pem: &str| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("PEM")
            .to_vec()
    };
    let (first_pem, first_key) = certs.client_certificate("edge-01");
    std::fs::write(&cert, &first_pem).expect("write cert");
    std::fs::write(&key, first_key).expect("write key");
    let mut gw = TestGateway::start(&tls_sink(&bootstrap, &certs, &cert, &key)).await;
    let count = |g: &TestGateway, outcome: &str| {
        g.counter(
            "edgebridge_credentials_reloads_total",
            &[("source", "sink:lake"), ("outcome", outcome)],
        )
    };
    assert_eq!(publish_seq_range(&gw, 0..10).await, 10);
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_buffer_messages", &[("sink", "lake")])
            == 0.0)
            .await,
        "delivered with the first certificate"
    );
    let (first, renewed_pem) = (der(&first_pem), certs.client_certificate("edge-02"));
    let renewed = der(&renewed_pem.0);
    assert!(front.client_certificates().contains(&first));

    // Renewal: the key, then the certificate (a read in between is a mismatch, refused).
    std::fs::write(&key, &renewed_pem.1).expect("write key");
    std::fs::write(&cert, &renewed_pem.0).expect("write cert");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !front.client_certificates().contains(&renewed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection with the renewed certificate within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(count(&gw, "applied") >= 1.0, "the renewal is counted");
    assert_eq!(publish_seq_range(&gw, 10..20).await, 10);

    // Broken: refused and reported; the renewed certificate stays in use.
    let refused_before = count(&gw, "refused");
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIB").expect("break");
    assert!(
        gw.eventually(WAIT, |g| count(g, "refused") > refused_before)
            .await,
        "the broken certificate is reported"
    );
    assert_eq!(publish_seq_range(&gw, 20..30).await, 10);

    let records = consume_tls(&bootstrap, &certs, 30).await;
    let report = check_sequences(&as_msgs(&records));
    assert_eq!(report.per_device_count.get(&1), Some(&30), "{report:?}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report:?}");
    // The sink's connections: the first certificate, then only the renewed one.
    let sink_certs: Vec<Vec<u8>> = front
        .client_certificates()
        .into_iter()
        .filter(|c| *c == first || *c == renewed)
        .collect();
    let switch = sink_certs
        .iter()
        .position(|c| *c == renewed)
        .expect("the renewed certificate connected");
    assert!(switch > 0, "the first certificate connected first");
    assert!(
        sink_certs[switch..].iter().all(|c| *c == renewed),
        "no connection with the old certificate after the renewal"
    );
    gw.shutdown().await;
}

/// A Kafka sink whose client certificate the brokers refuse (signed by another CA) keeps
/// its messages, and delivers them once a valid certificate is written over the files,
/// without a restart: records stuck in flight with the refused certificate are produced
/// again with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kafka_sink_refused_for_its_certificate_delivers_once_a_valid_one_is_written() {
    let certs = common::TestCerts::generate();
    let other_ca = common::TestCerts::generate();
    let front_port = common::free_port();
    let tansu = Tansu::start_advertising(common::free_port(), front_port);
    tansu.create_topic("secure");
    let _front = TlsFront::start(&certs, front_port, tansu.port).await;
    let bootstrap = format!("127.0.0.1:{front_port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("edge.pem"), dir.path().join("edge.key"));
    let (wrong_cert, wrong_key) = other_ca.client_certificate("edge-01");
    std::fs::write(&cert, wrong_cert).expect("write cert");
    std::fs::write(&key, wrong_key).expect("write key");
    let mut gw = TestGateway::start(&tls_sink(&bootstrap, &certs, &cert, &key)).await;
    assert_eq!(publish_seq_range(&gw, 0..20).await, 20);
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_errors_total", &[("sink", "lake")])
            >= 1.0)
            .await,
        "the refused handshake is counted"
    );
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "lake")]), 0.0);
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "lake")]),
        20.0,
        "the data stays buffered"
    );

    let (good_cert, good_key) = certs.client_certificate("edge-01");
    std::fs::write(&key, good_key).expect("write key");
    std::fs::write(&cert, good_cert).expect("write cert");
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_buffer_messages", &[("sink", "lake")])
            == 0.0)
            .await,
        "delivered with the new certificate, no restart"
    );
    let records = consume_tls(&bootstrap, &certs, 20).await;
    let report = check_sequences(&as_msgs(&records));
    assert_eq!(report.per_device_count.get(&1), Some(&20), "{report:?}");
    assert_eq!((report.missing, report.out_of_order), (0, 0), "{report:?}");
    gw.shutdown().await;
}

/// A Kafka sink to topic `secure` over mutual TLS with the test CA and `cert`/`key`.
fn tls_sink(
    bootstrap: &str,
    certs: &common::TestCerts,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> String {
    let tls = format!(
        "properties = {{ \"security.protocol\" = \"ssl\", \"ssl.ca.location\" = \"{}\", \
         \"ssl.certificate.location\" = \"{}\", \"ssl.key.location\" = \"{}\" }}",
        certs.ca.display(),
        cert.display(),
        key.display()
    );
    kafka_sink(bootstrap, "secure", &tls)
}

/// `n` records of topic `secure`, read over mutual TLS with the test's client certificate.
async fn consume_tls(bootstrap: &str, certs: &common::TestCerts, n: usize) -> Vec<Record> {
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let settings = [
        ("security.protocol", "ssl".to_string()),
        ("ssl.ca.location", path(&certs.ca)),
        ("ssl.certificate.location", path(&certs.client_cert)),
        ("ssl.key.location", path(&certs.client_key)),
    ];
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        kafka::consume_with(&bootstrap, &settings, &["secure"], n, WAIT)
    })
    .await
    .expect("consumer task")
}

/// Publishes seqs `range` of device 1 on `plant/m1/temp`; returns the acks.
async fn publish_seq_range(gw: &TestGateway, range: std::ops::Range<u64>) -> u64 {
    let opts = rumqttc::MqttOptions::new(format!("dev-r{}", range.start), "127.0.0.1", gw.port());
    common::publish_seq_with(opts, "plant/m1/temp", 1, range, QoS::AtLeastOnce).await
}

fn seq_of(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    v["seq"].as_u64().expect("seq")
}
