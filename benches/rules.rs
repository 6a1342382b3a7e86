//! Rule evaluation cost: a 20-rule config with 5 CEL conditions and 2 transforms, on one
//! core (this thread), no I/O. Target (issue #6): ≤ 5 µs per message.
//!
//! Run with `cargo bench --bench rules`. Three messages are measured:
//! - `telemetry`: matches the filters of all 5 conditions (each is evaluated, so the JSON
//!   payload is parsed once) and of both transforms (each builds a JSON payload): the
//!   worst case of this config;
//! - `text`: same topic, a payload that is not JSON (conditions fail, counted);
//! - `unrelated`: a topic only the catch-all rule matches (filters only).

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use edgebridge::config::{self, Config};
use edgebridge::message::Message;
use edgebridge::metrics::Metrics;
use edgebridge::rules::RuleSet;

const CONFIG: &str = r##"
[gateway]
id = "edge-01"
[sinks.cloud]
type = "file"
path = "cloud"
[sinks.lake]
type = "file"
path = "lake"
[sinks.alerts]
type = "file"
path = "alerts"

[[rules]]
name = "overheat"
from = "factory/+/+/telemetry"
where = "payload.temperature > 80.0"
to = ["alerts"]
[[rules]]
name = "dry"
from = "factory/+/+/telemetry"
where = "payload.humidity < 20"
to = ["alerts"]
[[rules]]
name = "status"
from = "factory/+/+/telemetry"
where = "payload.status != 'ok' || payload.temperature > 95.0"
to = ["alerts"]
[[rules]]
name = "line"
from = "factory/#"
where = "levels[1] == payload.line && qos > 0"
to = ["lake"]
[[rules]]
name = "device"
from = "factory/+/+/telemetry"
where = "client_id.startsWith('press-') && size(payload_text) < 1024"
to = ["lake"]
[[rules]]
name = "shape"
from = "factory/+/+/telemetry"
topic = "dt/{gateway_id}/{1}/{2}"
payload = '{"machine": levels[2], "t": payload.temperature, "h": payload.humidity, "at": received_at}'
to = ["cloud"]
[[rules]]
name = "summary"
from = "factory/+/+/telemetry"
payload = '{"ok": payload.status == "ok", "by": client_id}'
to = [{ sink = "lake", topic = "summary/{2}" }]
[[rules]]
name = "r08"
from = "factory/+/+/status"
to = ["cloud"]
[[rules]]
name = "r09"
from = "factory/+/+/events/#"
to = ["cloud"]
[[rules]]
name = "r10"
from = "plant/+/energy"
to = ["lake"]
[[rules]]
name = "r11"
from = "plant/+/water"
to = ["lake"]
[[rules]]
name = "r12"
from = "site/#"
to = ["lake"]
[[rules]]
name = "r13"
from = "+/config/#"
to = ["cloud"]
[[rules]]
name = "r14"
from = "factory/l2/+/telemetry"
to = ["cloud"]
[[rules]]
name = "r15"
from = "factory/l3/+/telemetry"
to = ["cloud"]
[[rules]]
name = "r16"
from = "warehouse/+/scan"
to = ["lake"]
[[rules]]
name = "r17"
from = "warehouse/+/weight"
to = ["lake"]
[[rules]]
name = "r18"
from = "labs/#"
to = ["lake"]
[[rules]]
name = "r19"
from = "factory/+/+/alarm"
to = ["alerts"]
[[rules]]
name = "catch-all"
from = "#"
to = ["lake"]
topic = "all/{topic}"
"##;

fn message(topic: &str, payload: &str) -> Message {
    Message {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: 1,
        retain: false,
        properties: None,
        received_at: 1_700_000_000_000,
    }
}

fn measure(rules: &RuleSet, msg: &Message, expected_routes: usize) -> f64 {
    let mut out = Vec::new();
    rules.route(msg, "press-7", &mut out);
    assert_eq!(out.len(), expected_routes, "{out:?}");
    // Warm up, then take the best of 5 rounds (the machine is shared).
    let n = 100_000u32;
    let mut best = f64::MAX;
    for _ in 0..6 {
        let start = Instant::now();
        for _ in 0..n {
            black_box(rules.route(black_box(msg), "press-7", &mut out));
        }
        best = best.min(start.elapsed().as_secs_f64() / f64::from(n));
    }
    best * 1e9
}

fn main() {
    let config: Config = toml::from_str(CONFIG).expect("bench config parses");
    let plan = config::validate(&config).expect("bench config is valid");
    let conditions = plan.rules.iter().filter(|r| r.condition.is_some()).count();
    let transforms = plan
        .rules
        .iter()
        .filter(|r| r.to.iter().any(|t| t.payload.is_some()))
        .count();
    assert_eq!((plan.rules.len(), conditions, transforms), (20, 5, 2));
    let metrics = Metrics::new();
    let rules = RuleSet::new(&plan.gateway_id, &plan.rules, &plan.fallback, &metrics);

    let telemetry = message(
        "factory/l1/press-7/telemetry",
        r#"{"temperature": 85.5, "humidity": 40, "status": "ok", "line": "l1", "vibration": [0.1, 0.2, 0.15]}"#,
    );
    let text = message(
        "factory/l1/press-7/telemetry",
        "temperature=85.5 humidity=40",
    );
    let unrelated = message("elsewhere/a/b", r#"{"x": 1}"#);
    // telemetry: overheat, line, device → alerts, lake; shape → cloud; summary → lake;
    // catch-all → lake (alerts and lake from conditions are merged when identical).
    // text: device (no JSON needed) → lake; catch-all → lake.
    let results = [
        ("telemetry", measure(&rules, &telemetry, 5)),
        ("text", measure(&rules, &text, 2)),
        ("unrelated", measure(&rules, &unrelated, 1)),
    ];
    println!("rule evaluation, 20 rules (5 CEL conditions, 2 transforms), one core:");
    for (name, ns) in results {
        println!("  {name:<10} {:>8.2} µs/message", ns / 1000.0);
    }
}
