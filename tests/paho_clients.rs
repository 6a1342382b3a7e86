//! The device side with an independent client library: paho-mqtt from PyPI (installed by
//! `scripts/test.sh`), driven by `tests/paho/device_checks.py` against a real gateway:
//! QoS 2 exactly once and in order to a local subscriber, delivered QoS = min(publish,
//! subscription), MQTT 5 subscription options (no local, retain handling, retain as
//! published), session takeover told with DISCONNECT 0x8E, and a QoS 1 message kept for
//! a persistent session while its device was away.

#[path = "common/gateway.rs"]
mod gateway;

use std::process::Stdio;
use std::time::Duration;

use gateway::{TestGateway, FILE_SINK};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paho_mqtt_clients_see_the_device_side_behave_as_mqtt_says() {
    let mut gw = TestGateway::start(FILE_SINK).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho/device_checks.py");
    let child = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--port", &gw.port().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (scripts/test.sh installs paho-mqtt)");
    // Each check waits 15 s at most for anything; five of them.
    let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("the paho checks finish within 240 s")
        .expect("the paho checks run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "paho checks failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        5,
        "every check ran: {stdout}"
    );
    gw.shutdown().await;
}
