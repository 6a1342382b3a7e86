//! The HTTP webhook sink against a real HTTP(S) server in the test (tests/common/http.rs)
//! that answers from a script: success, retries, Retry-After, dead letters, timeouts,
//! TLS and mTLS, batching by count, bytes and delay, and an outage.

mod common;
#[path = "common/gateway.rs"]
mod gateway;
#[path = "common/http.rs"]
mod http;

use std::time::Duration;

use axum::http::Version;
use common::{publish_seq, TestCerts};
use gateway::TestGateway;
use http::{HttpServer, Received, Reply};
use rumqttc::QoS;

const WAIT: Duration = Duration::from_secs(60);

/// An HTTP sink `hook` at `url` fed by every `plant/#` message; `extra` adds keys.
fn http_sink(url: &str, extra: &str) -> String {
    format!(
        r##"
[sinks.hook]
type = "http"
url = "{url}"
backoff_min = "50ms"
backoff_max = "500ms"
{extra}

[[rules]]
name = "all"
from = "plant/#"
to = ["hook"]
"##
    )
}

/// Publishes seqs `0..n` of device 1 on `plant/m1/temp`, all acked.
async fn publish(gw: &TestGateway, n: u64) {
    let acked = publish_seq(
        "127.0.0.1",
        gw.port(),
        "dev-1",
        "plant/m1/temp",
        1,
        n,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(acked, n, "every publish acked by the gateway");
}

/// The message objects of a request, whatever the body format.
fn objects(r: &Received) -> Vec<serde_json::Value> {
    match r.header("content-type") {
        Some("application/x-ndjson") => r.ndjson(),
        _ => match r.json() {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        },
    }
}

/// Device seqs of every message the server accepted, in arrival order.
fn accepted_seqs(server: &HttpServer) -> Vec<u64> {
    server
        .accepted()
        .iter()
        .flat_map(objects)
        .map(|o| o["payload"]["seq"].as_u64().expect("payload.seq"))
        .collect()
}

async fn wait_accepted(server: &HttpServer, n: usize) -> Vec<u64> {
    let done = server
        .wait_for(WAIT, |reqs| {
            reqs.iter()
                .filter(|r| (200..300).contains(&r.status))
                .flat_map(objects)
                .count()
                >= n
        })
        .await;
    let seqs = accepted_seqs(server);
    assert!(done, "server accepted {} of {n}: {seqs:?}", seqs.len());
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ok_path_posts_one_json_object_per_message_in_order() {
    let server = HttpServer::start().await;
    let extra = r#"bearer_token = "s3cret-token"
headers = { "X-Machine" = "{2}", "X-Site" = "{gateway_id}" }"#;
    let mut gw = TestGateway::start(&http_sink(&server.url("/ingest/{2}"), extra)).await;
    publish(&gw, 20).await;
    let seqs = wait_accepted(&server, 20).await;
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());

    let reqs = server.received();
    assert_eq!(reqs.len(), 20, "one request per message, none repeated");
    let mut keys = std::collections::HashSet::new();
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/ingest/m1");
        assert_eq!(r.header("x-machine"), Some("m1"));
        assert_eq!(r.header("x-site"), Some("edge-01"));
        assert_eq!(r.header("authorization"), Some("Bearer s3cret-token"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = r.json();
        assert_eq!(body["topic"], "plant/m1/temp");
        assert_eq!(body["payload"]["device"], 1);
        assert_eq!(body["qos"], 1);
        assert_eq!(body["retain"], false);
        assert_eq!(body["gateway_id"], "edge-01");
        assert!(body["received_at"].as_u64().unwrap_or(0) > 0);
        let key = r.header("idempotency-key").expect("Idempotency-Key");
        assert_eq!(body["id"], key, "the key is the message id");
        assert!(keys.insert(key.to_string()), "keys are unique per message");
    }
    let delivered = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_delivered_total", &[("sink", "hook")]) == 20.0
        })
        .await;
    assert!(delivered);
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "hook")]), 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_errors_are_retried_with_the_same_key_and_order_is_kept() {
    let server = HttpServer::start().await;
    server.script([Reply::status(500), Reply::status(500), Reply::status(500)]);
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), "")).await;
    publish(&gw, 10).await;
    let seqs = wait_accepted(&server, 10).await;
    assert_eq!(
        seqs,
        (0..10).collect::<Vec<_>>(),
        "nothing lost, order kept"
    );

    let reqs = server.received();
    assert_eq!(reqs.len(), 13, "3 refused attempts + 10 deliveries");
    let statuses: Vec<u16> = reqs.iter().take(4).map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
    let first_key = reqs[0].header("idempotency-key");
    for r in &reqs[1..4] {
        assert_eq!(
            r.header("idempotency-key"),
            first_key,
            "a retry keeps its key"
        );
    }
    assert_eq!(
        gw.counter(
            "edgebridge_sink_errors_total",
            &[("sink", "hook"), ("reason", "http_500")]
        ),
        3.0
    );
    assert!(
        gw.eventually(WAIT, |g| g
            .counter("edgebridge_sink_up", &[("sink", "hook")])
            == 1.0)
            .await,
        "the sink is up again after the 200"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_is_honoured() {
    let server = HttpServer::start().await;
    server.script([Reply::status(429).header("retry-after", "2")]);
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), "")).await;
    publish(&gw, 1).await;
    assert_eq!(wait_accepted(&server, 1).await, vec![0]);
    let reqs = server.received();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at - reqs[0].at;
    // The backoff alone would have retried after 50 ms.
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    assert_eq!(
        gw.counter(
            "edgebridge_sink_errors_total",
            &[("sink", "hook"), ("reason", "http_429")]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_request_is_dead_lettered_and_the_stream_goes_on() {
    let server = HttpServer::start().await;
    server.refuse_containing("\"seq\":3}", 400);
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), "")).await;
    publish(&gw, 6).await;
    assert_eq!(wait_accepted(&server, 5).await, vec![0, 1, 2, 4, 5]);
    assert_eq!(
        server.received().len(),
        6,
        "the refused message is not retried"
    );
    assert!(
        gw.eventually(WAIT, |g| g.dead_letters("hook").len() == 1)
            .await,
        "one dead letter"
    );
    let dead = &gw.dead_letters("hook")[0];
    assert_eq!(dead["reason"], "http_400");
    assert_eq!(dead["topic"], "plant/m1/temp");
    assert_eq!(dead["payload"], "{\"device\":1,\"seq\":3}");
    // Counted once the dead-letter file is written.
    let dropped = gw
        .counter_until(
            "edgebridge_buffer_dropped_total",
            &[("sink", "hook"), ("reason", "http_400")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(dropped, 1.0);
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "hook")]), 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_batch_is_split_so_only_the_bad_message_is_dead_lettered() {
    let server = HttpServer::start().await;
    server.refuse_containing("\"seq\":3}", 422);
    let extra = r#"format = "ndjson"
batch = { max_messages = 10, max_delay = "2s" }"#;
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), extra)).await;
    publish(&gw, 10).await;
    let expected: Vec<u64> = (0..10).filter(|s| *s != 3).collect();
    assert_eq!(wait_accepted(&server, 9).await, expected);
    assert!(
        gw.eventually(WAIT, |g| g.dead_letters("hook").len() == 1)
            .await
    );
    assert_eq!(gw.dead_letters("hook")[0]["reason"], "http_422");
    // Counted once the dead-letter file is written.
    let dropped = gw
        .counter_until(
            "edgebridge_buffer_dropped_total",
            &[("sink", "hook"), ("reason", "http_422")],
            1.0,
            WAIT,
        )
        .await;
    assert_eq!(dropped, 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_server_times_out_and_the_request_is_retried() {
    let server = HttpServer::start().await;
    // Answered (as a 503) only long after the sink gave up on it.
    server.script([Reply::status(503).delay(Duration::from_secs(30))]);
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), "timeout = \"500ms\"")).await;
    publish(&gw, 2).await;
    assert_eq!(wait_accepted(&server, 2).await, vec![0, 1]);
    assert!(
        gw.counter(
            "edgebridge_sink_errors_total",
            &[("sink", "hook"), ("reason", "timeout")]
        ) >= 1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_with_the_test_ca_negotiates_http2() {
    let certs = TestCerts::generate();
    let server = HttpServer::start_tls(&certs, false).await;
    let extra = format!("tls = {{ ca = \"{}\" }}", certs.ca.display());
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), &extra)).await;
    publish(&gw, 5).await;
    assert_eq!(wait_accepted(&server, 5).await, vec![0, 1, 2, 3, 4]);
    for r in server.received() {
        assert_eq!(
            r.version,
            Version::HTTP_2,
            "h2 offered by the server is used"
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_delivers_with_the_client_certificate_and_keeps_data_without_it() {
    let certs = TestCerts::generate();
    let server = HttpServer::start_tls(&certs, true).await;
    let with_cert = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), &with_cert)).await;
    publish(&gw, 5).await;
    assert_eq!(wait_accepted(&server, 5).await, vec![0, 1, 2, 3, 4]);
    gw.shutdown().await;

    let without_cert = format!("tls = {{ ca = \"{}\" }}", certs.ca.display());
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), &without_cert)).await;
    publish(&gw, 3).await;
    let down = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_errors_total", &[("sink", "hook")]) >= 2.0
        })
        .await;
    assert!(down, "the refused handshake is counted, and retried");
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "hook")]), 0.0);
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "hook")]),
        3.0,
        "the data stays buffered"
    );
    assert_eq!(
        server.received().len(),
        5,
        "nothing got through without a certificate"
    );
    gw.shutdown().await;
}

/// Publishes seq `seq` of device 1 on `plant/m1/temp`, acked.
async fn publish_one(gw: &TestGateway, seq: u64) {
    let opts = rumqttc::MqttOptions::new(format!("dev-{seq}"), "127.0.0.1", gw.port());
    let acked =
        common::publish_seq_with(opts, "plant/m1/temp", 1, seq..seq + 1, QoS::AtLeastOnce).await;
    assert_eq!(acked, 1, "publish acked by the gateway");
}

/// The DER of the first certificate in a PEM text.
fn der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// Certificate rotation for an HTTP sink in mutual TLS: a renewed client certificate and
/// key written over the files are used by later requests without a restart, and nothing
/// is lost; then a broken certificate file is refused and reported, and the renewed
/// certificate stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_client_certificate_is_used_without_a_restart_and_a_broken_one_is_refused() {
    let certs = TestCerts::generate();
    let server = HttpServer::start_tls(&certs, true).await;
    let tls = format!(
        "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), &tls)).await;
    let first = der(&std::fs::read_to_string(&certs.client_cert).expect("read cert"));
    publish_one(&gw, 0).await;
    wait_accepted(&server, 1).await;
    assert_eq!(server.received()[0].client_cert.as_ref(), Some(&first));

    // Renewal: the key first, then the certificate (a reader in between sees a mismatch,
    // refused, and the next read applies both).
    let (cert, key) = certs.client_certificate("edge-02");
    let renewed = der(&cert);
    std::fs::write(&certs.client_key, key).expect("write key");
    std::fs::write(&certs.client_cert, cert).expect("write cert");
    let mut seq = 1;
    let deadline = tokio::time::Instant::now() + WAIT;
    while server
        .received()
        .last()
        .and_then(|r| r.client_cert.as_ref())
        != Some(&renewed)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests still carry the old certificate after {WAIT:?}"
        );
        publish_one(&gw, seq).await;
        wait_accepted(&server, seq as usize + 1).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let count = |g: &TestGateway, outcome: &str| {
        g.counter(
            "edgebridge_credentials_reloads_total",
            &[("source", "sink:hook"), ("outcome", outcome)],
        )
    };
    assert!(count(&gw, "applied") >= 1.0, "the renewal is counted");

    // Broken: the certificate file half written. Refused, reported; the renewed
    // certificate stays in use and messages keep flowing.
    let refused_before = count(&gw, "refused");
    std::fs::write(&certs.client_cert, "-----BEGIN CERTIFICATE-----\nMIIB").expect("break");
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(&gw, "refused") <= refused_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken certificate is not reported within {WAIT:?}"
        );
        publish_one(&gw, seq).await;
        wait_accepted(&server, seq as usize + 1).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    publish_one(&gw, seq).await;
    let seqs = wait_accepted(&server, seq as usize + 1).await;
    assert_eq!(
        seqs,
        (0..=seq).collect::<Vec<_>>(),
        "nothing lost, in order"
    );
    let last = server.received().last().cloned().expect("a request");
    assert_eq!(last.client_cert.as_ref(), Some(&renewed));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_close_at_max_messages() {
    let server = HttpServer::start().await;
    let extra = r#"format = "ndjson"
batch = { max_messages = 10, max_delay = "5s" }"#;
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), extra)).await;
    publish(&gw, 25).await;
    assert_eq!(
        wait_accepted(&server, 25).await,
        (0..25).collect::<Vec<_>>()
    );
    let sizes: Vec<usize> = server.received().iter().map(|r| objects(r).len()).collect();
    assert_eq!(
        sizes,
        [10, 10, 5],
        "full batches, then the rest after max_delay"
    );
    let keys: Vec<String> = server
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_string())
        .collect();
    let range: Vec<u64> = keys[0]
        .rsplit('-')
        .take(2)
        .map(|n| n.parse().expect("seq in key"))
        .collect();
    assert_eq!(
        range[0] - range[1],
        9,
        "a batch key names its first and last seq: {keys:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_close_at_max_bytes() {
    let server = HttpServer::start().await;
    let extra = r#"format = "json_array"
batch = { max_messages = 1000, max_bytes = "1KiB", max_delay = "1s" }"#;
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), extra)).await;
    publish(&gw, 30).await;
    assert_eq!(
        wait_accepted(&server, 30).await,
        (0..30).collect::<Vec<_>>()
    );
    let reqs = server.received();
    assert!(reqs.len() >= 3, "{} requests", reqs.len());
    for r in &reqs {
        assert!(r.body.len() <= 1024, "body of {} bytes", r.body.len());
    }
    for r in &reqs[..reqs.len() - 1] {
        assert!(objects(r).len() >= 2, "batches hold several messages");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partial_batch_waits_max_delay_then_goes() {
    let server = HttpServer::start().await;
    let extra = r#"format = "ndjson"
batch = { max_messages = 100, max_delay = "500ms" }"#;
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), extra)).await;
    publish(&gw, 3).await;
    assert_eq!(wait_accepted(&server, 3).await, vec![0, 1, 2]);
    let sizes: Vec<usize> = server.received().iter().map(|r| objects(r).len()).collect();
    assert_eq!(
        sizes,
        [3],
        "collected into one request, sent without a full batch"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_down_for_ten_seconds_then_everything_arrives_in_order() {
    let mut server = HttpServer::start().await;
    let url = server.url("/in");
    server.stop();
    let down_since = std::time::Instant::now();
    let extra = r#"format = "ndjson"
batch = { max_messages = 50, max_delay = "100ms" }"#;
    let mut gw = TestGateway::start(&http_sink(&url, extra)).await;
    publish(&gw, 200).await;
    let buffered = gw
        .eventually(WAIT, |g| {
            g.counter(
                "edgebridge_sink_errors_total",
                &[("sink", "hook"), ("reason", "connect")],
            ) >= 1.0
                && g.counter("edgebridge_buffer_messages", &[("sink", "hook")]) == 200.0
        })
        .await;
    assert!(buffered, "refused connections counted, all 200 buffered");
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "hook")]), 0.0);
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_since.elapsed())).await;
    server.restart().await;
    assert_eq!(
        wait_accepted(&server, 200).await,
        (0..200).collect::<Vec<_>>()
    );
    assert!(
        gw.eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "hook")]) == 0.0
                && g.counter("edgebridge_sink_up", &[("sink", "hook")]) == 1.0
        })
        .await,
        "the buffer drains and the sink is up"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthorized_keeps_the_data_and_marks_the_sink_down_until_it_passes() {
    let server = HttpServer::start().await;
    // With backoff 50ms..500ms, 20 refusals keep the sink down for a few seconds.
    server.script((0..20).map(|_| Reply::status(401)));
    let extra = r#"bearer_token = "stale-token""#;
    let mut gw = TestGateway::start(&http_sink(&server.url("/in"), extra)).await;
    publish(&gw, 3).await;
    let down = gw
        .eventually(WAIT, |g| {
            g.counter(
                "edgebridge_sink_errors_total",
                &[("sink", "hook"), ("reason", "http_401")],
            ) >= 2.0
        })
        .await;
    assert!(down, "401s counted");
    assert_eq!(gw.counter("edgebridge_sink_up", &[("sink", "hook")]), 0.0);
    // Once the receiver accepts the credentials, everything kept is delivered in order.
    assert_eq!(wait_accepted(&server, 3).await, vec![0, 1, 2]);
    assert!(server.received().iter().take(20).all(|r| r.status == 401));
    assert_eq!(
        gw.counter("edgebridge_buffer_dropped_total", &[("sink", "hook")]),
        0.0,
        "nothing dead-lettered for an auth problem"
    );
    gw.shutdown().await;
}
