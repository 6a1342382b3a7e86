//! The rules' config: `[[rules]]` (with their targets), `[fallback]` and
//! `[[downlinks]]` as written, and the validated rule, target and downlink plans the
//! router and the downlink task run from.

use serde::{Deserialize, Serialize};

use super::{Expr, Template, TopicFilter};

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
