//! Durable store-and-forward against a real Mosquitto upstream: outages, restarts, crashes
//! (SIGKILL of the real binary), full buffers, corruption, flapping and disk pressure.
//!
//! The upstream Mosquitto runs with persistence and is stopped with SIGTERM, so the
//! collector's session (and what was queued for it) survives; any loss measured here is
//! edgebridge's.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    check_sequences, client_options, free_port, publish_seq, seq_payload, stopped_upstream,
    Collector, Mode, Mosquitto, Msg, Tmpfs,
};
use gateway::TestGateway;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};

const WAIT: Duration = Duration::from_secs(120);

fn sink_body(upstream_port: u16, buffer: &str) -> String {
    format!(
        r#"
[sinks.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{upstream_port}"
backoff_min = "50ms"
backoff_max = "500ms"
buffer = {{ {buffer} }}

[[rules]]
name = "all"
from = "dev/+"
to = ["cloud"]
topic = "up/{{1}}"
"#
    )
}

async fn publish_devices(port: u16, devices: u32, per_device: u64) -> u64 {
    let tasks: Vec<_> = (0..devices)
        .map(|d| {
            tokio::spawn(async move {
                publish_seq(
                    "127.0.0.1",
                    port,
                    &format!("dev-{d}"),
                    &format!("dev/{d}"),
                    d,
                    per_device,
                    QoS::AtLeastOnce,
                )
                .await
            })
        })
        .collect();
    let mut acked = 0;
    for t in tasks {
        acked += t.await.expect("publisher");
    }
    acked
}

fn assert_complete(msgs: &[Msg], devices: u32, per_device: u64) {
    let report = check_sequences(msgs);
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    for d in 0..devices {
        assert_eq!(
            report.per_device_count.get(&d),
            Some(&per_device),
            "device {d}: {report:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_then_every_buffered_message_arrives_in_order() {
    let (mut upstream, collector) = stopped_upstream().await;
    let mut gw = TestGateway::start(&sink_body(upstream.port(), "")).await;
    assert_eq!(publish_devices(gw.port(), 5, 10_000).await, 50_000);
    assert_eq!(
        gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]),
        50_000.0
    );
    assert!(gw.counter("edgebridge_buffer_bytes", &[("sink", "cloud")]) > 50_000.0 * 20.0);

    upstream.restart();
    assert!(
        collector.wait_for_unique(50_000, WAIT).await,
        "got {} of 50000",
        collector.len()
    );
    assert_complete(&collector.messages(), 5, 10_000);
    let drained = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(drained, "buffer empties once delivered");
    let report = check_sequences(&collector.messages());
    println!("outage: duplicates {}", report.duplicates);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_while_the_backlog_waits_loses_nothing() {
    let (mut upstream, collector) = stopped_upstream().await;
    let body = sink_body(upstream.port(), "");
    let mut gw = TestGateway::start(&body).await;
    assert_eq!(publish_devices(gw.port(), 5, 10_000).await, 50_000);
    gw.shutdown().await;

    // Same data_dir, upstream still down.
    let data = gw.dir.path().join("data");
    assert!(data.join("buffers").join("cloud").is_dir());
    let mut again = TestGateway::start_in(&body, gw.dir).await;
    assert_eq!(
        again.counter("edgebridge_buffer_messages", &[("sink", "cloud")]),
        50_000.0
    );
    upstream.restart();
    assert!(
        collector.wait_for_unique(50_000, WAIT).await,
        "got {} of 50000",
        collector.len()
    );
    assert_complete(&collector.messages(), 5, 10_000);
    again.shutdown().await;
}

/// A device that records which of its messages got a PUBACK, and stops at the first
/// connection error (the gateway died).
async fn publish_until_error(port: u16, device: u32, max: u64) -> Vec<u64> {
    let mut opts = MqttOptions::new(format!("crash-dev-{device}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_inflight(100);
    let (client, mut events) = AsyncClient::new(opts, 200);
    let topic = format!("dev/{device}");
    let producer = tokio::spawn(async move {
        for seq in 0..max {
            if client
                .publish(&topic, QoS::AtLeastOnce, false, seq_payload(device, seq))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut next_seq = 0u64;
    let mut by_pkid: HashMap<u16, u64> = HashMap::new();
    let mut acked = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while (acked.len() as u64) < max {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                by_pkid.insert(pkid, next_seq);
                next_seq += 1;
            }
            Ok(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                if let Some(seq) = by_pkid.remove(&ack.pkid) {
                    acked.push(seq);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    producer.abort();
    acked.sort_unstable();
    acked
}

fn write_config(dir: &Path, port: u16, admin: u16, ack: &str, body: &str) -> PathBuf {
    let toml = format!(
        "[gateway]\nid = \"edge-01\"\ndata_dir = \"{}\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n\
         [log]\nlevel = \"warn\"\n\
         [[listeners]]\nname = \"devices\"\nbind = \"127.0.0.1:{port}\"\nack = \"{ack}\"\n{body}",
        dir.join("data").display()
    );
    let path = dir.join("edgebridge.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// The real binary, killed when dropped: a test that fails half way must not leave it
/// running, holding the test runner's stderr (and `scripts/test.sh`'s `tee`) open.
struct Spawned(Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_binary(config: &Path) -> Spawned {
    Spawned(
        Command::new(env!("CARGO_BIN_EXE_edgebridge"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start edgebridge"),
    )
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("edgebridge did not listen on {port}");
}

/// SIGKILL at a random moment while devices publish: every message a device got a
/// PUBACK for arrives after the restart, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_publishing_loses_no_acked_message() {
    sigkill_case("durable", "sync = \"batch\"", "", 0, Restart::Same).await;
}

/// Standby takeover on a shared volume (a rescheduled Kubernetes pod; deploy/STANDBY.md):
/// gateway A is killed with SIGKILL while devices publish and the upstream is down;
/// gateway B, a new process with ports of its own, starts on the same data_dir, takes its
/// lock and delivers every message A acknowledged to the devices, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_on_the_same_data_dir_delivers_what_the_killed_gateway_acked() {
    sigkill_case("durable", "", "", 0, Restart::Standby).await;
}

/// kill -9 loses nothing under the other sync policies either: acked data was handed to
/// the OS (they differ only on power loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_sync_none_or_interval_loses_no_acked_message() {
    sigkill_case("durable", "sync = \"none\"", "", 0, Restart::Same).await;
    sigkill_case(
        "durable",
        "sync = \"interval\", sync_interval = \"1s\"",
        "",
        0,
        Restart::Same,
    )
    .await;
}

/// `ack = "received"`: rumqttd acks on receipt, so a kill loses what was acked but not
/// yet handed to the OS — at most the intake queue plus one router batch (README).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_ack_received_loses_at_most_the_documented_window() {
    // Default intake queue (65,536) plus one router batch.
    let lost = sigkill_case("received", "", "", 65_536 + 1_024, Restart::Same).await;
    println!("sigkill (ack = received): {lost} acked messages lost");
}

/// How the gateway comes back after the kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// The same config again.
    Same,
    /// A standby: another process on other ports, on the same data_dir.
    Standby,
}

/// SIGKILL at a random moment while 4 devices publish; after a restart every message a
/// device got a PUBACK for must arrive, but for at most `may_lose`. Returns how many
/// acked messages were lost.
async fn sigkill_case(
    ack: &str,
    buffer: &str,
    extra: &str,
    may_lose: usize,
    restart: Restart,
) -> usize {
    let (mut upstream, collector) = stopped_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin) = (free_port(), free_port());
    let body = format!("{extra}{}", sink_body(upstream.port(), buffer));
    let config = write_config(dir.path(), port, admin, ack, &body);
    let mut child = spawn_binary(&config);
    wait_for_port(port).await;

    let devices = 4u32;
    let publishers: Vec<_> = (0..devices)
        .map(|d| tokio::spawn(publish_until_error(port, d, 1_000_000)))
        .collect();
    // A "random" moment: derived from the clock, between 0.5 s and 2 s into the stream.
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_millis() as u64)
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500 + jitter * 3 / 2)).await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let mut acked: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (d, p) in publishers.into_iter().enumerate() {
        acked.insert(d as u32, p.await.expect("publisher"));
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 0, "devices got acks before the kill");

    let (config, port) = match restart {
        Restart::Same => (config, port),
        Restart::Standby => {
            let (port, admin) = (free_port(), free_port());
            (write_config(dir.path(), port, admin, ack, &body), port)
        }
    };
    let mut child = spawn_binary(&config);
    wait_for_port(port).await;
    if restart == Restart::Standby {
        let holder = std::fs::read_to_string(dir.path().join("data/lock")).expect("lock file");
        assert_eq!(
            holder.trim(),
            child.id().to_string(),
            "the standby holds the data_dir lock"
        );
    }
    upstream.restart();
    let arrived = collector
        .wait_for_unique(total - may_lose.min(total), WAIT)
        .await;
    if may_lose > 0 {
        // Let whatever else survived arrive too.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let msgs = collector.messages();
    let mut got: std::collections::HashSet<(u32, u64)> = std::collections::HashSet::new();
    for (_, payload) in &msgs {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("json payload");
        got.insert((
            v["device"].as_u64().unwrap_or(99) as u32,
            v["seq"].as_u64().unwrap_or(0),
        ));
    }
    let missing: Vec<(u32, u64)> = acked
        .iter()
        .flat_map(|(d, seqs)| seqs.iter().map(move |s| (*d, *s)))
        .filter(|k| !got.contains(k))
        .collect();
    assert!(
        missing.len() <= may_lose,
        "{} acked messages missing (at most {may_lose} allowed), e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(arrived, "the acked messages arrived");
    let report = check_sequences(&msgs);
    assert_eq!(report.out_of_order, 0, "{report:?}");
    println!(
        "sigkill (ack = {ack}, {buffer}): acked {total}, arrived {}, duplicates {}, lost {}",
        msgs.len(),
        report.duplicates,
        missing.len()
    );
    child.kill().expect("stop");
    let _ = child.wait();
    missing.len()
}

/// kill -9 at 20 random points of outage and drain cycles: in each cycle the upstream is
/// up or down (at random), two new devices publish a random number of messages, and the
/// gateway is killed at a random moment — while the devices publish, while the backlog
/// drains, or idle. In the end every message a device got a PUBACK for arrives, in order
/// per device. Duplicates are counted and bounded: per kill, the sink's in-flight window
/// plus the acks of the last position save interval (200 ms at `drain_rate`), plus the
/// collector's own in-flight window per upstream restart. `EDGEBRIDGE_FAULT_SEED=<seed>`
/// replays a schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_20_random_points_of_outage_and_drain_cycles() {
    use rand::{Rng, SeedableRng};
    let seed = std::env::var("EDGEBRIDGE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    println!("sigkill cycles: seed {seed} (EDGEBRIDGE_FAULT_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut upstream, collector) = stopped_upstream().await;
    let mut upstream_up = false;
    let (inflight, drain_rate) = (100u64, 5_000u64);
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin) = (free_port(), free_port());
    let body = sink_body(upstream.port(), &format!("drain_rate = {drain_rate}")).replace(
        "backoff_min",
        &format!("inflight = {inflight}\nbackoff_min"),
    );
    let config = write_config(dir.path(), port, admin, "durable", &body);
    let mut acked: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let (mut kills, mut restarts) = (0u64, 0u64);
    for cycle in 0..20u32 {
        let want_up = rng.random_bool(0.5);
        if want_up != upstream_up {
            if want_up {
                upstream.restart();
                restarts += 1;
            } else {
                upstream.terminate();
            }
            upstream_up = want_up;
        }
        let mut child = spawn_binary(&config);
        wait_for_port(port).await;
        // Devices publish some 10k msg/s: half the kills come within 100 ms (while they
        // publish), the others later (during the drain, or idle).
        let per_device = rng.random_range(500..4_000u64);
        let kill_after = Duration::from_millis(match rng.random_bool(0.5) {
            true => rng.random_range(5..100),
            false => rng.random_range(100..1_000),
        });
        let devices: Vec<_> = (0..2)
            .map(|d| {
                let device = cycle * 2 + d;
                (
                    device,
                    tokio::spawn(publish_until_error(port, device, per_device)),
                )
            })
            .collect();
        tokio::time::sleep(kill_after).await;
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        kills += 1;
        for (device, task) in devices {
            acked.insert(device, task.await.expect("publisher"));
        }
        println!(
            "cycle {cycle}: upstream {}, {per_device} per device, killed after {kill_after:?}, \
             acked {:?}",
            if upstream_up { "up" } else { "down" },
            acked
                .range(cycle * 2..)
                .map(|(_, a)| a.len())
                .collect::<Vec<_>>()
        );
    }
    if !upstream_up {
        upstream.restart();
        restarts += 1;
    }
    let mut child = spawn_binary(&config);
    wait_for_port(port).await;
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 0, "devices got acks");
    let arrived = collector.wait_for_unique(total, WAIT).await;
    let msgs = collector.messages();
    let mut got: std::collections::HashSet<(u32, u64)> = std::collections::HashSet::new();
    for (_, payload) in &msgs {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("json payload");
        let (Some(d), Some(s)) = (v["device"].as_u64(), v["seq"].as_u64()) else {
            panic!("unexpected payload {payload:?}");
        };
        got.insert((d as u32, s));
    }
    let missing: Vec<(u32, u64)> = acked
        .iter()
        .flat_map(|(d, seqs)| seqs.iter().map(move |s| (*d, *s)))
        .filter(|k| !got.contains(k))
        .collect();
    let report = check_sequences(&msgs);
    let bound = kills * (inflight + drain_rate / 5) + restarts * 100;
    println!(
        "sigkill cycles (seed {seed}): {kills} kills, {restarts} upstream restarts, acked {total}, \
         arrived {}, duplicates {} (bound {bound}), missing {}",
        msgs.len(),
        report.duplicates,
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "seed {seed}: {} acked messages missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(arrived, "seed {seed}: the acked messages arrived");
    assert_eq!(report.out_of_order, 0, "seed {seed}: {report:?}");
    assert_eq!(report.unparsed, 0, "seed {seed}: {report:?}");
    assert!(
        report.duplicates <= bound,
        "seed {seed}: {} duplicates, more than the bound {bound}",
        report.duplicates
    );
    child.kill().expect("stop");
    let _ = child.wait();
}

async fn full_buffer_case(when_full: &str) -> (f64, Vec<Msg>, u64) {
    let (mut upstream, collector) = stopped_upstream().await;
    let body = sink_body(
        upstream.port(),
        &format!("max_bytes = \"256KiB\", segment_size = \"64KiB\", when_full = \"{when_full}\""),
    );
    let mut gw = TestGateway::start(&body).await;
    let sent = publish_devices(gw.port(), 1, 20_000).await;
    assert_eq!(sent, 20_000);
    let dropped = gw.counter(
        "edgebridge_buffer_dropped_total",
        &[("sink", "cloud"), ("reason", "full")],
    );
    upstream.restart();
    let expected = 20_000 - dropped as usize;
    assert!(
        collector.wait_for_unique(expected, WAIT).await,
        "got {} of {expected}",
        collector.len()
    );
    let drained = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(drained);
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.shutdown().await;
    (dropped, collector.messages(), sent)
}

/// Runs `full_buffer_case` and checks the drop count is exact; returns the seqs that
/// arrived and how many were sent.
async fn full_buffer_exact(when_full: &str) -> (Vec<u64>, u64) {
    let (dropped, msgs, sent) = full_buffer_case(when_full).await;
    assert!(dropped > 0.0, "the buffer filled up");
    let report = check_sequences(&msgs);
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(
        report.per_device_count[&0] + dropped as u64,
        sent,
        "{report:?}"
    );
    let seqs = msgs
        .iter()
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect();
    (seqs, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_buffer_drop_oldest_keeps_the_newest_and_counts_exactly() {
    let (seqs, sent) = full_buffer_exact("drop_oldest").await;
    assert!(seqs.contains(&(sent - 1)), "the newest is kept");
    assert!(!seqs.contains(&0), "the oldest is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_buffer_drop_newest_keeps_the_oldest_and_counts_exactly() {
    let (seqs, sent) = full_buffer_exact("drop_newest").await;
    assert!(seqs.contains(&0), "the oldest is kept");
    assert!(!seqs.contains(&(sent - 1)), "the newest is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_buffer_block_holds_devices_back_and_drops_nothing() {
    let (mut upstream, collector) = stopped_upstream().await;
    let body = sink_body(
        upstream.port(),
        "max_bytes = \"128KiB\", segment_size = \"64KiB\", when_full = \"block\"",
    );
    let mut gw = TestGateway::start(&body).await;
    let port = gw.port();
    let publisher = tokio::spawn(async move { publish_devices(port, 1, 5_000).await });
    // The device stalls: its acks are withheld while the buffer is full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]);
    assert!(
        stored < 5_000.0,
        "intake stalls while the buffer is full ({stored} stored)"
    );
    assert!(!publisher.is_finished(), "the device is held back");
    upstream.restart();
    assert_eq!(publisher.await.expect("publisher"), 5_000);
    assert!(
        collector.wait_for_unique(5_000, WAIT).await,
        "got {}",
        collector.len()
    );
    assert_complete(&collector.messages(), 1, 5_000);
    assert_eq!(gw.counter("edgebridge_buffer_dropped_total", &[]), 0.0);
    gw.shutdown().await;
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("buffer dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_segments_deliver_every_intact_record_and_count_the_rest() {
    let (mut upstream, collector) = stopped_upstream().await;
    let body = sink_body(upstream.port(), "segment_size = \"64KiB\"");
    let mut gw = TestGateway::start(&body).await;
    assert_eq!(publish_devices(gw.port(), 1, 5_000).await, 5_000);
    gw.shutdown().await;

    let buffer_dir = gw.dir.path().join("data/buffers/cloud");
    let segs = segments(&buffer_dir);
    assert!(segs.len() >= 3, "several segments: {segs:?}");
    // Flip a byte inside a record in the middle of the first segment.
    let mut first = std::fs::read(&segs[0]).expect("read segment");
    let mid = first.len() / 2;
    first[mid] ^= 0xFF;
    std::fs::write(&segs[0], &first).expect("write segment");
    // Cut the last segment in the middle of a record.
    let last = segs.last().expect("last");
    let len = std::fs::metadata(last).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .expect("open");
    file.set_len(len - 7).expect("truncate");
    drop(file);

    let mut again = TestGateway::start_in(&body, gw.dir).await;
    upstream.restart();
    let delivered = again
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(delivered, "everything readable was delivered");
    let corrupt = again.counter(
        "edgebridge_buffer_dropped_total",
        &[("sink", "cloud"), ("reason", "corrupt")],
    );
    // Acked by the upstream is not yet forwarded to the collector: wait for what the
    // count leaves (the assertions below say what is missing if it never comes).
    let intact = 5_000usize.saturating_sub(corrupt as usize);
    collector.wait_for_unique(intact, WAIT).await;
    let report = check_sequences(&collector.messages());
    let got = report.per_device_count.get(&0).copied().unwrap_or(0);
    assert!(corrupt >= 1.0, "corruption is counted");
    assert!(
        got >= 5_000 - 3,
        "only the damaged records are missing: got {got}"
    );
    assert_eq!(
        got + corrupt as u64,
        5_000,
        "every record is delivered or counted: {report:?}"
    );
    assert_eq!(report.out_of_order, 0, "{report:?}");
    let corrupt_files = std::fs::read_dir(again.dir.path().join("data/buffers/cloud"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().to_string_lossy().ends_with(".corrupt"))
        .count();
    assert_eq!(
        corrupt_files, 1,
        "the damaged segment is kept for inspection"
    );
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flapping_upstream_loses_nothing_and_keeps_order() {
    let mut upstream = Mosquitto::start_with(Mode::Plain, true);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "up/#",
    )
    .await;
    let mut gw = TestGateway::start(&sink_body(upstream.port(), "")).await;
    let port = gw.port();
    // ~2,000 msg/s from 2 devices for as long as the upstream flaps (30 s).
    let until = tokio::time::Instant::now() + Duration::from_secs(31);
    let devices: Vec<_> = (0..2u32)
        .map(|d| {
            tokio::spawn(async move {
                let (mut sent, mut acked) = (0u64, 0u64);
                while tokio::time::Instant::now() < until {
                    let started = tokio::time::Instant::now();
                    // A client id per chunk: this test is about the upstream flapping; a
                    // device reconnecting with its id 10 times a second hits rumqttd's
                    // session-takeover race (issue "Device sessions"), which stalled a
                    // chunk once in ~12 runs.
                    let opts =
                        client_options(&format!("flap-{d}-{}", sent / 100), port, Mode::Plain);
                    let seqs = sent..sent + 100;
                    sent += 100;
                    acked += common::publish_seq_with(
                        opts,
                        &format!("dev/{d}"),
                        d,
                        seqs,
                        QoS::AtLeastOnce,
                    )
                    .await;
                    tokio::time::sleep_until(started + Duration::from_millis(100)).await;
                }
                (sent, acked)
            })
        })
        .collect();
    // Killed (SIGTERM) and restarted every 2 s for 30 s.
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        upstream.terminate();
        tokio::time::sleep(Duration::from_secs(1)).await;
        upstream.restart();
    }
    let mut per_device = Vec::new();
    for d in devices {
        let (sent, acked) = d.await.expect("device");
        assert_eq!(acked, sent, "every publish acked by the gateway");
        per_device.push(sent);
    }
    let total: u64 = per_device.iter().sum();
    assert!(
        collector.wait_for_unique(total as usize, WAIT).await,
        "got {} of {total}",
        collector.len()
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    for (d, sent) in per_device.iter().enumerate() {
        assert_eq!(
            report.per_device_count.get(&(d as u32)),
            Some(sent),
            "{report:?}"
        );
    }
    println!(
        "flapping: {total} messages, duplicates {}",
        report.duplicates
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn low_disk_margin_applies_the_policy_without_crashing() {
    // data_dir on a 16 MiB tmpfs with a 12 MiB free-space margin: after ~4 MiB the buffer
    // behaves as full and drops the newest; space returns once the upstream drains it.
    let tmpfs = Tmpfs::mount("16m");
    let mount = &tmpfs.dir;
    let (mut upstream, collector) = stopped_upstream().await;
    let body = sink_body(
        upstream.port(),
        "segment_size = \"256KiB\", min_free_disk = \"12MiB\", when_full = \"drop_newest\"",
    );
    let mut gw = TestGateway::start_with_data_dir(&body, &mount.path().join("data")).await;
    // 1 KiB payloads: 8 MiB worth would not fit above the margin.
    let port = gw.port();
    let sent = big_publish(port, 8_000).await;
    assert_eq!(
        sent, 8_000,
        "every publish is acked (dropped ones are counted, not refused)"
    );
    let dropped = gw.counter(
        "edgebridge_buffer_dropped_total",
        &[("sink", "cloud"), ("reason", "full")],
    );
    assert!(dropped > 0.0, "the margin made the buffer full");
    let stored = gw.counter("edgebridge_buffer_messages", &[("sink", "cloud")]);
    assert_eq!(stored + dropped, 8_000.0);
    upstream.restart();
    assert!(
        collector.wait_for_unique(stored as usize, WAIT).await,
        "got {}",
        collector.len()
    );
    let drained = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(drained);
    // Space is back: new messages are stored again.
    let before = gw.counter("edgebridge_buffer_dropped_total", &[]);
    assert_eq!(big_publish(port, 100).await, 100);
    let again = collector
        .wait_for(stored as usize + 100, Duration::from_secs(30))
        .await;
    let files: Vec<String> = std::fs::read_dir(mount.path().join("data/buffers/cloud"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| format!("{:?} {:?}", e.file_name(), e.metadata().map(|m| m.len())))
                .collect()
        })
        .unwrap_or_default();
    let df = Command::new("df")
        .arg(mount.path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        again,
        "after the drain, new messages are delivered again: got {} of {}; files {files:?}; {df}; metrics:\n{}",
        collector.len(),
        stored as usize + 100,
        gw.gw().metrics.render().lines().filter(|l| l.starts_with("edgebridge_") && !l.contains("latency")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(gw.counter("edgebridge_buffer_dropped_total", &[]), before);
    gw.shutdown().await;
}

async fn big_publish(port: u16, count: u64) -> u64 {
    let mut opts = MqttOptions::new("big", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 200);
    let producer = tokio::spawn(async move {
        for i in 0..count {
            let mut payload = seq_payload(0, i);
            payload.resize(1024, b' ');
            if client
                .publish("dev/0", QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut acked = 0;
    while acked < count {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let _ = producer.await;
    acked
}

/// drop_oldest while the sink is delivering: records dropped in flight are counted only
/// if never confirmed, so delivered + dropped is exactly what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_oldest_count_is_exact_while_delivering() {
    let upstream = Mosquitto::start_with(Mode::Plain, false);
    let collector = Collector::start(
        client_options("collector", upstream.port(), Mode::Plain),
        "up/#",
    )
    .await;
    let body = sink_body(
        upstream.port(),
        "max_bytes = \"128KiB\", segment_size = \"64KiB\", when_full = \"drop_oldest\"",
    )
    .replace("backoff_min", "inflight = 8\nbackoff_min");
    let mut gw = TestGateway::start(&body).await;
    let sent = publish_devices(gw.port(), 4, 10_000).await;
    assert_eq!(sent, 40_000);
    let settled = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(settled, "the buffer drains");
    let dropped = gw.counter(
        "edgebridge_buffer_dropped_total",
        &[("sink", "cloud"), ("reason", "full")],
    );
    assert!(dropped > 0.0, "the small buffer overflowed");
    let expected = 40_000 - dropped as usize;
    let arrived = collector.wait_for_unique(expected, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = check_sequences(&collector.messages());
    let unique: u64 = report.per_device_count.values().sum();
    assert!(arrived, "got {unique} of {expected}");
    assert_eq!(
        unique + dropped as u64,
        40_000,
        "delivered + dropped = sent: {report:?}"
    );
    assert_eq!(report.out_of_order, 0, "{report:?}");
    gw.shutdown().await;
}

/// `drain = "live_first"`: a 100k-message backlog drains (slowed by `drain_rate` so the
/// drain outlasts the test's reaction time on a busy machine) while a live device
/// publishes; its first message arrives before the backlog is through, and in the end
/// every message arrived once (no reconnect happened, so no duplicate is expected
/// beyond the in-flight window), each device's messages in its own order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_first_delivers_live_messages_while_a_100k_backlog_drains() {
    let (mut upstream, collector) = stopped_upstream().await;
    let body = sink_body(
        upstream.port(),
        r#"drain = "live_first", drain_rate = 10000, max_bytes = "256MiB""#,
    );
    let mut gw = TestGateway::start(&body).await;
    assert_eq!(publish_devices(gw.port(), 5, 20_000).await, 100_000);
    // Two more failed attempts: the backlog is older than the sink's last attempt before
    // the upstream comes back, so it is all backlog (what arrives after that attempt
    // counts as live).
    let errors = gw.counter("edgebridge_sink_errors_total", &[("sink", "cloud")]);
    let tried = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_errors_total", &[("sink", "cloud")]) >= errors + 2.0
        })
        .await;
    assert!(tried, "the sink keeps trying while the upstream is down");
    upstream.restart();
    let up = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_sink_up", &[("sink", "cloud")]) == 1.0
        })
        .await;
    assert!(up, "the sink reconnects");
    // The live device: topic dev/9, device 9 in the payloads.
    let live = publish_seq(
        "127.0.0.1",
        gw.port(),
        "live-dev",
        "dev/9",
        9,
        20,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(live, 20);
    assert!(
        collector.wait_for_unique(100_020, WAIT).await,
        "got {} of 100020",
        collector.len()
    );
    let msgs = collector.messages();
    let first_live = msgs
        .iter()
        .position(|(topic, _)| topic == "up/9")
        .expect("the live messages arrived");
    assert!(
        first_live < 100_000,
        "the first live message came after the whole backlog ({first_live} messages before it)"
    );
    let report = check_sequences(&msgs);
    assert_eq!(report.missing, 0, "{report:?}");
    assert_eq!(report.out_of_order, 0, "{report:?}");
    assert!(
        report.duplicates <= 100,
        "duplicates beyond the in-flight window: {report:?}"
    );
    let drained = gw
        .eventually(WAIT, |g| {
            g.counter("edgebridge_buffer_backlog_messages", &[("sink", "cloud")]) == 0.0
                && g.counter("edgebridge_buffer_messages", &[("sink", "cloud")]) == 0.0
                && g.counter("edgebridge_buffer_bytes", &[("sink", "cloud")]) == 0.0
        })
        .await;
    assert!(
        drained,
        "a drained buffer reads as empty (messages, bytes, backlog)"
    );
    println!(
        "live_first: first live message after {first_live} backlog messages; duplicates {}",
        report.duplicates
    );
    gw.shutdown().await;
}

/// kill -9 in the middle of a `live_first` drain, with live messages delivered ahead of
/// the backlog (their acks out of order): after a restart every message a device got a
/// PUBACK for arrives; the live ones delivered before the kill come again as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_a_live_first_drain_loses_nothing() {
    let (mut upstream, collector) = stopped_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin) = (free_port(), free_port());
    let body = sink_body(
        upstream.port(),
        r#"drain = "live_first", drain_rate = 5000, max_bytes = "64MiB""#,
    );
    let config = write_config(dir.path(), port, admin, "durable", &body);
    let mut child = spawn_binary(&config);
    wait_for_port(port).await;
    assert_eq!(publish_devices(port, 5, 10_000).await, 50_000);
    // As above: the backlog is older than the sink's last failed attempt.
    let errors = || async {
        let (_, page) = gateway::http_get(([127, 0, 0, 1], admin).into(), "/metrics").await;
        gateway::metric(&page, "edgebridge_sink_errors_total", &[("sink", "cloud")])
    };
    let before = errors().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while errors().await < before + 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink keeps trying"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    upstream.restart();
    assert!(
        collector.wait_for(1, WAIT).await,
        "the drain starts once the upstream is back"
    );
    let live = publish_seq(
        "127.0.0.1",
        port,
        "live-dev",
        "dev/9",
        9,
        2_000,
        QoS::AtLeastOnce,
    )
    .await;
    assert_eq!(live, 2_000);
    // Mid-drain: some live messages are through, the backlog is not.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !collector.messages().iter().any(|(t, _)| t == "up/9") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no live message arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let before = collector.len();
    assert!(before < 52_000, "killed mid-drain ({before} delivered)");

    let mut child = spawn_binary(&config);
    wait_for_port(port).await;
    assert!(
        collector.wait_for_unique(52_000, WAIT).await,
        "got {} unique of 52000",
        check_sequences(&collector.messages())
            .per_device_count
            .values()
            .sum::<u64>()
    );
    let report = check_sequences(&collector.messages());
    assert_eq!(report.missing, 0, "{report:?}");
    // No live traffic after the restart: the rest drains in seq order, so each device's
    // messages still arrive in order (repeats are duplicates, not reordering).
    assert_eq!(report.out_of_order, 0, "{report:?}");
    for d in [0, 1, 2, 3, 4] {
        assert_eq!(report.per_device_count.get(&d), Some(&10_000), "{report:?}");
    }
    assert_eq!(report.per_device_count.get(&9), Some(&2_000), "{report:?}");
    println!(
        "live_first kill -9: {before} delivered before the kill, duplicates {}",
        report.duplicates
    );
    child.kill().expect("stop");
    let _ = child.wait();
}
