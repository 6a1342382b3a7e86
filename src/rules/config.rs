//! The rules' config: `[[rules]]` (with their targets), `[fallback]` and
//! `[[downlinks]]` as written, and the validated rule, target and downlink plans the
//! router and the downlink task run from, and their validation.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{Expr, ExprKind, Template, TemplateScope, TopicFilter};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    pub name: String,
    /// MQTT topic filter.
    pub from: String,
    /// CEL condition; absent = every message the filter matches.
    #[serde(default, rename = "where")]
    pub condition: Option<String>,
    pub to: Vec<TargetSection>,
    /// Topic template for every target that does not set its own.
    #[serde(default)]
    pub topic: Option<String>,
    /// CEL expression building the outgoing payload; absent = unchanged.
    #[serde(default)]
    pub payload: Option<String>,
    /// MQTT 5 user properties to set, add or remove (`rules::properties`).
    #[serde(default)]
    pub properties: Option<super::PropertiesSection>,
    /// `false`: a message this rule matched is not offered to later rules.
    #[serde(default = "default_true", rename = "continue")]
    pub continue_matching: bool,
}

/// One entry of a rule's `to`: a sink name, or a table that overrides topic and payload
/// for that sink.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a sink name or a table { sink = \"...\", topic = \"...\", payload = \"...\" }"
)]
pub enum TargetSection {
    Sink(String),
    Table(TargetTable),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetTable {
    pub sink: String,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub payload: Option<String>,
}

/// `[[downlinks]]`: messages the upstream of an MQTT sink delivers on `from` are
/// published to local devices on `topic`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkSection {
    /// An MQTT sink.
    pub sink: String,
    /// Topic filter subscribed to on the upstream; may use `{gateway_id}`.
    pub from: String,
    /// Local topic template: `{1}`.. are the wildcard levels of `from`, `{topic}` the
    /// upstream topic, `{gateway_id}`.
    pub topic: String,
    /// QoS of the upstream subscription.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Publish retained to local devices.
    #[serde(default)]
    pub retain: bool,
}

/// `[fallback]`: the targets of messages that no rule matched.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackSection {
    pub to: Vec<TargetSection>,
}

#[derive(Debug, Clone)]
pub struct RulePlan {
    pub name: String,
    pub filter: TopicFilter,
    pub condition: Option<Expr>,
    pub to: Vec<TargetPlan>,
    /// `continue = false`: stop after this rule when it matched.
    pub stop: bool,
}

/// One `[[downlinks]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkPlan {
    /// Index into the plan's sinks; always an MQTT sink.
    pub sink: usize,
    /// That sink's name.
    pub sink_name: String,
    /// The upstream filter with `{gateway_id}` filled in.
    pub filter: TopicFilter,
    pub topic: Template,
    pub qos: u8,
    pub retain: bool,
}

/// One destination of a rule, with the rule's topic and payload already folded in (a
/// target's own override wins).
#[derive(Debug, Clone)]
pub struct TargetPlan {
    /// Index into the plan's sinks.
    pub sink: usize,
    pub topic: Option<Template>,
    pub payload: Option<Expr>,
    /// The rule's `[rules.properties]`, shared by its targets.
    pub properties: Option<std::sync::Arc<super::PropertyEdit>>,
}

fn default_qos() -> u8 {
    1
}
fn default_true() -> bool {
    true
}

/// `[[rules]]` into the plans the router runs; `sink_names` in the order targets refer
/// to them by index.
pub fn validate_rules(
    rules: &[RuleSection],
    sink_names: &[&String],
    err: &mut impl FnMut(String, String),
) -> Vec<RulePlan> {
    let mut plans = Vec::new();
    let mut rule_names = HashSet::new();
    for (i, r) in rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        if r.name.is_empty() {
            err(format!("{path}.name"), "must not be empty".into());
        } else if !rule_names.insert(r.name.clone()) {
            err(
                format!("{path}.name"),
                format!("duplicate rule name {:?}", r.name),
            );
        }
        let filter = match TopicFilter::parse(&r.from) {
            Ok(f) => Some(f),
            Err(e) => {
                err(format!("{path}.from"), e.to_string());
                None
            }
        };
        if r.to.is_empty() {
            err(format!("{path}.to"), "must name at least one sink".into());
        }
        let condition = r.condition.as_ref().and_then(|c| {
            Expr::compile(c, ExprKind::Condition)
                .map_err(|e| err(format!("{path}.where"), e))
                .ok()
        });
        let scope = TemplateScope {
            wildcards: filter.as_ref().map_or(0, |f| f.wildcard_count()),
            client_id: true,
        };
        let mut targets = validate_targets(
            &path,
            &r.to,
            r.topic.as_deref(),
            r.payload.as_deref(),
            &scope,
            sink_names,
            err,
        );
        if let Some(section) = &r.properties {
            let edit =
                super::PropertyEdit::validate(&format!("{path}.properties"), section, &scope, err)
                    .map(std::sync::Arc::new);
            for t in &mut targets {
                t.properties = edit.clone();
            }
        }
        if let Some(filter) = filter {
            plans.push(RulePlan {
                name: r.name.clone(),
                filter,
                condition,
                to: targets,
                stop: !r.continue_matching,
            });
        }
    }
    plans
}

/// `[fallback]`: the targets of messages no rule matched (none without the section).
pub fn validate_fallback(
    fallback: Option<&FallbackSection>,
    sink_names: &[&String],
    err: &mut impl FnMut(String, String),
) -> Vec<TargetPlan> {
    let Some(f) = fallback else {
        return Vec::new();
    };
    if f.to.is_empty() {
        err("fallback.to".into(), "must name at least one sink".into());
    }
    let scope = TemplateScope {
        wildcards: 0,
        client_id: true,
    };
    validate_targets("fallback", &f.to, None, None, &scope, sink_names, err)
}

/// `[[downlinks]]` into their plans. `sink_of` gives a sink's index and whether it is an
/// MQTT sink (`None`: no such sink).
pub fn validate_downlinks(
    downlinks: &[DownlinkSection],
    gateway_id: &str,
    sink_of: impl Fn(&str) -> Option<(usize, bool)>,
    err: &mut impl FnMut(String, String),
) -> Vec<DownlinkPlan> {
    let mut plans = Vec::new();
    for (i, d) in downlinks.iter().enumerate() {
        let path = format!("downlinks[{i}]");
        let sink = match sink_of(&d.sink) {
            None => {
                err(format!("{path}.sink"), format!("unknown sink {:?}", d.sink));
                None
            }
            Some((index, true)) => Some(index),
            Some((_, false)) => {
                err(
                    format!("{path}.sink"),
                    format!("sink {:?} is not an mqtt sink", d.sink),
                );
                None
            }
        };
        // `{gateway_id}` is the one placeholder of a filter (braces are legal in topics).
        let filter = TopicFilter::parse(&d.from.replace("{gateway_id}", gateway_id))
            .map_err(|e| err(format!("{path}.from"), e.to_string()))
            .ok();
        let topic = filter.as_ref().and_then(|f| {
            let scope = TemplateScope {
                wildcards: f.wildcard_count(),
                client_id: false,
            };
            Template::parse(&d.topic, &scope)
                .map_err(|e| err(format!("{path}.topic"), e.to_string()))
                .ok()
        });
        if d.qos > 2 {
            err(format!("{path}.qos"), "must be 0, 1 or 2".into());
        }
        if let (Some(sink), Some(filter), Some(topic)) = (sink, filter, topic) {
            plans.push(DownlinkPlan {
                sink,
                sink_name: d.sink.clone(),
                filter,
                topic,
                qos: d.qos.min(2),
                retain: d.retain,
            });
        }
    }
    plans
}

/// Checks the `to` list at `path` (a rule's, or the fallback's) and folds the rule-wide
/// `topic` and `payload` into each target that does not override them.
fn validate_targets(
    path: &str,
    to: &[TargetSection],
    rule_topic: Option<&str>,
    rule_payload: Option<&str>,
    scope: &TemplateScope,
    sink_names: &[&String],
    err: &mut impl FnMut(String, String),
) -> Vec<TargetPlan> {
    let topic = parse_template(format!("{path}.topic"), rule_topic, scope, err);
    let payload = parse_transform(format!("{path}.payload"), rule_payload, err);
    let mut targets = Vec::new();
    for (j, target) in to.iter().enumerate() {
        let key = format!("{path}.to[{j}]");
        let (name, own_topic, own_payload) = match target {
            TargetSection::Sink(name) => (name, None, None),
            TargetSection::Table(t) => (&t.sink, t.topic.as_deref(), t.payload.as_deref()),
        };
        let Some(sink) = sink_names.iter().position(|k| *k == name) else {
            let key = match target {
                TargetSection::Sink(_) => key,
                TargetSection::Table(_) => format!("{key}.sink"),
            };
            err(key, format!("unknown sink {name:?}"));
            continue;
        };
        let own_topic = parse_template(format!("{key}.topic"), own_topic, scope, err);
        let own_payload = parse_transform(format!("{key}.payload"), own_payload, err);
        let (Ok(own_topic), Ok(own_payload), Ok(topic), Ok(payload)) =
            (own_topic, own_payload, &topic, &payload)
        else {
            continue;
        };
        targets.push(TargetPlan {
            sink,
            topic: own_topic.or_else(|| topic.clone()),
            payload: own_payload.or_else(|| payload.clone()),
            properties: None,
        });
    }
    targets
}

/// An optional topic template; `Err` once reported.
fn parse_template(
    key: String,
    source: Option<&str>,
    scope: &TemplateScope,
    err: &mut impl FnMut(String, String),
) -> Result<Option<Template>, ()> {
    match source.map(|t| Template::parse(t, scope)) {
        None => Ok(None),
        Some(Ok(t)) => Ok(Some(t)),
        Some(Err(e)) => {
            err(key, e.to_string());
            Err(())
        }
    }
}

/// An optional CEL payload transform; `Err` once reported.
fn parse_transform(
    key: String,
    source: Option<&str>,
    err: &mut impl FnMut(String, String),
) -> Result<Option<Expr>, ()> {
    match source.map(|p| Expr::compile(p, ExprKind::Transform)) {
        None => Ok(None),
        Some(Ok(e)) => Ok(Some(e)),
        Some(Err(e)) => {
            err(key, e);
            Err(())
        }
    }
}
