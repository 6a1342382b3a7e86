//! CEL conditions and payload expressions: compiled from arbitrary source, then evaluated
//! against a message whose payload is arbitrary too (the input split at the first NUL).
#![no_main]

use edgebridge::message::Message;
use edgebridge::rules::{Expr, ExprKind, MessageVars};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgebridge_fuzz_common::quiet_caught_panics();
    let (source, payload) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"{\"temp\": 21.5, \"line\": \"A\"}"[..]),
    };
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let msg = Message {
        topic: "factory/line1/press7/telemetry".into(),
        payload: bytes::Bytes::copy_from_slice(payload),
        qos: 1,
        retain: false,
        properties: None,
        received_at: 1_700_000_000_000,
    };
    let vars = MessageVars::new(&msg, "press-7", "edge-01");
    if let Ok(condition) = Expr::compile(source, ExprKind::Condition) {
        let _ = condition.matches(&vars);
    }
    if let Ok(transform) = Expr::compile(source, ExprKind::Transform) {
        let _ = transform.transform(&vars);
    }
});

#[path = "common.rs"]
mod edgebridge_fuzz_common;
