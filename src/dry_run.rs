//! `edgebridge rules test`: runs one made-up message through the rules of a plan and
//! says what each rule made of it and what each sink would get (and, for a sink with
//! `pack`, the pack it would join and its part there). Touches no buffer, no network and
//! no metric of a running gateway.

use std::fmt::Write;

use base64::Engine;
use bytes::Bytes;

use crate::config::{Plan, SinkKindPlan};
use crate::message::{now_millis, Message, Properties};
use crate::metrics::Metrics;
use crate::rules::{Route, RuleSet, Verdict};
use crate::sinks::mqtt::config::MqttProtocol;

/// The message of a dry run.
pub struct TestMessage {
    pub topic: String,
    pub payload: Vec<u8>,
    pub client_id: String,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 user properties (`--property k=v`), in order.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 content type (`--content-type`).
    pub content_type: Option<String>,
}

/// The report printed by `rules test`.
pub fn dry_run(plan: &Plan, input: &TestMessage) -> String {
    let metrics = Metrics::new();
    let rules = RuleSet::new(&plan.gateway_id, &plan.rules, &plan.fallback, &metrics);
    let msg = Message {
        topic: input.topic.clone(),
        payload: Bytes::copy_from_slice(&input.payload),
        qos: input.qos,
        retain: input.retain,
        properties: (!input.user_properties.is_empty() || input.content_type.is_some()).then(
            || {
                Box::new(Properties {
                    user_properties: input.user_properties.clone(),
                    content_type: input.content_type.clone(),
                    ..Properties::default()
                })
            },
        ),
        received_at: now_millis(),
    };
    let (verdicts, routes, matched) = rules.explain(&msg, &input.client_id);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "message: topic {:?} from client {:?}, {} bytes",
        msg.topic,
        input.client_id,
        msg.payload.len()
    );
    for ((name, verdict), plan_rule) in verdicts.iter().zip(&plan.rules) {
        let why = match verdict {
            Verdict::Matched => "matched".to_string(),
            Verdict::FilterMismatch => {
                format!("no match: topic filter {} does not match", plan_rule.filter)
            }
            Verdict::ConditionFalse => format!(
                "no match: where is false ({})",
                plan_rule.condition.as_ref().map_or("", |c| c.source())
            ),
            Verdict::MissingField(field) => {
                format!("no match: where reads a field the message does not have ({field})")
            }
            Verdict::Error(key, e) => format!("no match: evaluation error in {key}, counted: {e}"),
            Verdict::Skipped => {
                "not evaluated: an earlier rule matched with continue = false".into()
            }
        };
        let _ = writeln!(out, "rule {name}: {why}");
    }
    if !matched {
        let _ = writeln!(
            out,
            "no rule matched: {}",
            if plan.fallback.is_empty() {
                "the message goes nowhere (no [fallback])"
            } else {
                "the message goes to [fallback]"
            }
        );
    }
    for route in &routes {
        describe_route(&mut out, plan, &msg, route);
    }
    if routes.is_empty() {
        let _ = writeln!(out, "no sink gets this message");
    }
    out
}

fn describe_route(out: &mut String, plan: &Plan, msg: &Message, route: &Route) {
    let topic = route.topic.as_deref().unwrap_or(&msg.topic);
    let payload = route.payload.as_ref().unwrap_or(&msg.payload);
    let shown = match std::str::from_utf8(payload) {
        Ok(text) => format!("payload {text}"),
        Err(_) => format!(
            "payload (base64) {}",
            base64::engine::general_purpose::STANDARD.encode(payload)
        ),
    };
    let sink = &plan.sinks[route.sink];
    let _ = writeln!(out, "sink {}: topic {topic:?} {shown}", sink.name);
    let properties = match &route.properties {
        Some(edited) => edited.as_deref(),
        None => msg.properties.as_deref(),
    };
    if let Some(p) = properties {
        let user: Vec<String> = p
            .user_properties
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut shown = format!("user [{}]", user.join(", "));
        if let Some(ct) = &p.content_type {
            shown += &format!(" content_type {ct:?}");
        }
        let dropped = match (&sink.kind, sink.kind.pack()) {
            (SinkKindPlan::Mqtt(m), _) if m.protocol == MqttProtocol::V311 => {
                " (dropped: this sink speaks MQTT 3.1.1)"
            }
            (_, Some(pack)) if pack.fields.properties => " (in its pack part)",
            (_, Some(_)) => {
                " (dropped: a pack carries none; add \"properties\" to pack.fields to keep them in its part)"
            }
            _ => "",
        };
        let _ = writeln!(out, "  properties: {shown}{dropped}");
    }
    if let Some(pack) = sink.kind.pack() {
        let mut part = Vec::new();
        let routed = Message {
            topic: topic.to_string(),
            payload: payload.clone(),
            ..msg.clone()
        };
        pack.encode_part(&routed, &mut part);
        let _ = writeln!(
            out,
            "  packed: with the other messages for topic {topic:?} into one {} message of at most {} bytes (linger {}); its part: {}",
            pack.format.name(),
            pack.max_bytes,
            humantime::format_duration(pack.linger),
            String::from_utf8_lossy(&part).trim_end()
        );
    }
}
