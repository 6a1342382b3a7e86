//! The rule engine: compiled rules and the router task.
//!
//! Input: [`IntakeItem`](crate::broker::IntakeItem)s from the broker's device connections.
//! Output: one record per matched sink, appended to that sink's buffer. The engine never
//! touches the network; a slow sink only grows its own buffer.

pub mod config;
pub mod downlink;
mod expr;
mod json;
mod native;
mod properties;
pub mod router;
mod template;
mod vars;

use std::collections::HashMap;

use bytes::Bytes;
use prometheus::IntCounter;

pub use crate::topic::{FilterError, TopicFilter};
pub use expr::{EvalError, Expr, ExprKind, Failure, MessageVars, VARIABLES};
pub use properties::{PropertiesSection, PropertyEdit};
pub use template::{level_ranges, Template, TemplateError, TemplateScope, TemplateVars};

use crate::message::{Message, Properties};
use crate::metrics::Metrics;
pub use config::{RulePlan, TargetPlan};

/// The `rule` label under which errors of `[fallback]` transforms are counted.
pub const FALLBACK_LABEL: &str = "(fallback)";

/// One destination of a routed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Index of the sink in the plan.
    pub sink: usize,
    /// The rewritten topic, or `None` to keep the device's topic.
    pub topic: Option<String>,
    /// The transformed payload, or `None` to keep the device's payload.
    pub payload: Option<Bytes>,
    /// The properties after the rule's `[rules.properties]`, or `None` to keep the
    /// device's (`Some(None)`: the rule removed the last one).
    pub properties: Option<Option<Box<Properties>>>,
}

/// What one rule made of one message (the dry run prints these).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The topic filter does not match.
    FilterMismatch,
    /// The condition is false.
    ConditionFalse,
    /// The condition reads a field the message does not have: false.
    MissingField(EvalError),
    /// Evaluating the condition (`"where"`) or a transform (`"payload"`) failed: no
    /// match, counted.
    Error(&'static str, EvalError),
    /// Matched; its routes were added.
    Matched,
    /// Not evaluated: an earlier rule matched with `continue = false`.
    Skipped,
}

struct CompiledRule {
    name: String,
    filter: TopicFilter,
    condition: Option<Expr>,
    to: Vec<TargetPlan>,
    stop: bool,
    matches: IntCounter,
    errors: IntCounter,
}

/// All rules, indexed by their first literal level so that matching a topic only
/// evaluates the rules that can match it.
pub struct RuleSet {
    gateway_id: String,
    rules: Vec<CompiledRule>,
    by_first_level: HashMap<String, Vec<usize>>,
    /// Rules whose filter starts with a wildcard: candidates for every topic.
    wildcard_first: Vec<usize>,
    fallback: Vec<TargetPlan>,
    fallback_errors: IntCounter,
}

impl RuleSet {
    pub fn new(
        gateway_id: &str,
        plans: &[RulePlan],
        fallback: &[TargetPlan],
        metrics: &Metrics,
    ) -> Self {
        let mut by_first_level: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard_first = Vec::new();
        let rules = plans
            .iter()
            .enumerate()
            .map(|(i, p)| {
                match p.filter.first_literal() {
                    Some(l) => by_first_level.entry(l.to_string()).or_default().push(i),
                    None => wildcard_first.push(i),
                }
                CompiledRule {
                    name: p.name.clone(),
                    filter: p.filter.clone(),
                    condition: p.condition.clone(),
                    to: p.to.clone(),
                    stop: p.stop,
                    matches: metrics.rule_matches.with_label_values(&[&p.name]),
                    errors: metrics.rule_errors.with_label_values(&[&p.name]),
                }
            })
            .collect();
        Self {
            gateway_id: gateway_id.to_string(),
            rules,
            by_first_level,
            wildcard_first,
            fallback: fallback.to_vec(),
            fallback_errors: metrics.rule_errors.with_label_values(&[FALLBACK_LABEL]),
        }
    }

    /// Appends the routes of `msg` (published by `client_id`) to `out` (cleared first),
    /// in rule order; identical routes are listed once. Returns whether any rule matched
    /// (when none did, the routes are the fallback's).
    pub fn route(&self, msg: &Message, client_id: &str, out: &mut Vec<Route>) -> bool {
        out.clear();
        let first = msg.topic.split('/').next().unwrap_or("");
        let literal = self
            .by_first_level
            .get(first)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let vars = MessageVars::new(msg, client_id, &self.gateway_id);
        let mut captures = Vec::new();
        let mut matched = false;
        // Merge the two sorted candidate lists to keep rule order.
        let (mut a, mut b) = (
            literal.iter().peekable(),
            self.wildcard_first.iter().peekable(),
        );
        loop {
            let idx = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            let Some(&idx) = idx else { break };
            let rule = &self.rules[idx];
            if self.apply(rule, &vars, client_id, &mut captures, out) == Verdict::Matched {
                matched = true;
                if rule.stop {
                    break;
                }
            }
        }
        if !matched {
            self.apply_fallback(&vars, client_id, out);
        }
        matched
    }

    /// The dry run: every rule's verdict in order, and the routes (as `route` gives them).
    pub fn explain(
        &self,
        msg: &Message,
        client_id: &str,
    ) -> (Vec<(&str, Verdict)>, Vec<Route>, bool) {
        let vars = MessageVars::new(msg, client_id, &self.gateway_id);
        let mut captures = Vec::new();
        let mut out = Vec::new();
        let mut verdicts = Vec::new();
        let mut stopped = false;
        let mut matched = false;
        for rule in &self.rules {
            let verdict = if stopped {
                Verdict::Skipped
            } else {
                self.apply(rule, &vars, client_id, &mut captures, &mut out)
            };
            if verdict == Verdict::Matched {
                matched = true;
                stopped = rule.stop;
            }
            verdicts.push((rule.name.as_str(), verdict));
        }
        if !matched {
            self.apply_fallback(&vars, client_id, &mut out);
        }
        (verdicts, out, matched)
    }

    fn apply_fallback(&self, vars: &MessageVars<'_>, client_id: &str, out: &mut Vec<Route>) {
        if self.fallback.is_empty() {
            return;
        }
        if push_targets(&self.fallback, vars, &self.gateway_id, client_id, &[], out).is_err() {
            self.fallback_errors.inc();
        }
    }

    /// Applies one rule: filter, condition, then every target's topic and payload. Only
    /// a rule that fully succeeds adds routes (an error in any transform adds none).
    fn apply(
        &self,
        rule: &CompiledRule,
        vars: &MessageVars<'_>,
        client_id: &str,
        captures: &mut Vec<(usize, usize)>,
        out: &mut Vec<Route>,
    ) -> Verdict {
        if !rule.filter.captures(vars.topic(), captures) {
            return Verdict::FilterMismatch;
        }
        if let Some(condition) = &rule.condition {
            match condition.matches(vars) {
                Ok(true) => {}
                Ok(false) => return Verdict::ConditionFalse,
                Err(e @ EvalError::Missing(_)) => return Verdict::MissingField(e),
                Err(e @ EvalError::Failed(_)) => {
                    rule.errors.inc();
                    return Verdict::Error("where", e);
                }
            }
        }
        match push_targets(&rule.to, vars, &self.gateway_id, client_id, captures, out) {
            Ok(()) => {
                rule.matches.inc();
                Verdict::Matched
            }
            Err(e) => {
                rule.errors.inc();
                Verdict::Error("payload", e)
            }
        }
    }
}

/// Appends one route per target; on a transform error removes what it appended.
fn push_targets(
    targets: &[TargetPlan],
    vars: &MessageVars<'_>,
    gateway_id: &str,
    client_id: &str,
    captures: &[(usize, usize)],
    out: &mut Vec<Route>,
) -> Result<(), EvalError> {
    let start = out.len();
    // The rule-wide transform is shared by its targets: evaluate it once.
    let mut last: Option<(&Expr, Bytes)> = None;
    let template_vars = TemplateVars {
        gateway_id,
        topic: vars.topic(),
        client_id,
    };
    for target in targets {
        let payload = match &target.payload {
            None => None,
            Some(expr) => match &last {
                Some((done, bytes)) if done.same(expr) => Some(bytes.clone()),
                _ => match expr.transform(vars) {
                    Ok(bytes) => {
                        last = Some((expr, bytes.clone()));
                        Some(bytes)
                    }
                    Err(e) => {
                        out.truncate(start);
                        return Err(e);
                    }
                },
            },
        };
        let route = Route {
            sink: target.sink,
            topic: target
                .topic
                .as_ref()
                .map(|t| t.render(&template_vars, captures)),
            payload,
            properties: target
                .properties
                .as_ref()
                .map(|edit| edit.apply(vars.properties(), &template_vars, captures)),
        };
        if !out.contains(&route) {
            out.push(route);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Config};

    /// Rules from TOML (as a user writes them) over the file sinks `a`, `b`, `c`
    /// (indexes 0, 1, 2).
    fn rules(body: &str, metrics: &Metrics) -> RuleSet {
        let toml = format!(
            "[gateway]\nid = \"gw\"\n\
             [sinks.a]\ntype = \"file\"\npath = \"a\"\n\
             [sinks.b]\ntype = \"file\"\npath = \"b\"\n\
             [sinks.c]\ntype = \"file\"\npath = \"c\"\n{body}"
        );
        let config: Config = toml::from_str(&toml).expect("toml");
        let plan = config::validate(&config).unwrap_or_else(|e| panic!("{e}"));
        RuleSet::new(&plan.gateway_id, &plan.rules, &plan.fallback, metrics)
    }

    fn msg(topic: &str, payload: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 5,
        }
    }

    fn route(sink: usize, topic: Option<&str>, payload: Option<&str>) -> Route {
        Route {
            sink,
            topic: topic.map(String::from),
            payload: payload.map(|p| Bytes::copy_from_slice(p.as_bytes())),
            properties: None,
        }
    }

    fn routes(rules: &RuleSet, topic: &str, payload: &str) -> (bool, Vec<Route>) {
        let mut out = vec![route(9, None, None)];
        let matched = rules.route(&msg(topic, payload), "dev-1", &mut out);
        (matched, out)
    }

    #[test]
    fn routes_to_every_matching_rule_in_order() {
        let metrics = Metrics::new();
        let rules = rules(
            r##"
            [[rules]]
            name = "a"
            from = "factory/+/+/telemetry"
            to = ["a"]
            topic = "dt/{gateway_id}/{1}/{2}"
            [[rules]]
            name = "b"
            from = "#"
            to = ["b"]
            [[rules]]
            name = "c"
            from = "factory/#"
            to = ["a"]
            [[rules]]
            name = "d"
            from = "other/#"
            to = ["c"]
            "##,
            &metrics,
        );
        assert_eq!(
            routes(&rules, "factory/l1/m7/telemetry", "{}"),
            (
                true,
                vec![
                    route(0, Some("dt/gw/l1/m7"), None),
                    route(1, None, None),
                    route(0, None, None),
                ]
            )
        );
        assert_eq!(
            routes(&rules, "x/y", "{}"),
            (true, vec![route(1, None, None)])
        );
        assert_eq!(metrics.rule_matches.with_label_values(&["c"]).get(), 1);
    }

    #[test]
    fn a_condition_passes_one_message_and_stops_another() {
        let metrics = Metrics::new();
        let rules = rules(
            r##"
            [[rules]]
            name = "hot"
            from = "sensors/+"
            where = "payload.temperature > 80"
            to = ["a"]
            "##,
            &metrics,
        );
        assert_eq!(
            routes(&rules, "sensors/s1", r#"{"temperature": 85}"#),
            (true, vec![route(0, None, None)])
        );
        assert_eq!(
            routes(&rules, "sensors/s1", r#"{"temperature": 20}"#),
            (false, vec![])
        );
        // Missing field: false, not an error. Type mismatch: an error, counted.
        assert_eq!(
            routes(&rules, "sensors/s1", r#"{"humidity": 20}"#),
            (false, vec![])
        );
        assert_eq!(metrics.rule_errors.with_label_values(&["hot"]).get(), 0);
        assert_eq!(
            routes(&rules, "sensors/s1", r#"{"temperature": "hot"}"#),
            (false, vec![])
        );
        assert_eq!(metrics.rule_errors.with_label_values(&["hot"]).get(), 1);
        assert_eq!(metrics.rule_matches.with_label_values(&["hot"]).get(), 1);
    }

    #[test]
    fn transforms_and_per_target_overrides() {
        let metrics = Metrics::new();
        let rules = rules(
            r##"
            [[rules]]
            name = "shape"
            from = "factory/+/+/telemetry"
            topic = "dt/{1}/{2}"
            payload = '{"machine": levels[2], "t": payload.temperature, "by": client_id}'
            to = [
                "a",
                { sink = "b", topic = "raw/{client_id}/{topic}" , payload = "payload_text" },
                { sink = "c", topic = "lake/{2}" },
            ]
            "##,
            &metrics,
        );
        let (matched, out) = routes(&rules, "factory/l1/m7/telemetry", r#"{"temperature":21}"#);
        assert!(matched);
        let shaped = r#"{"by":"dev-1","machine":"m7","t":21}"#;
        assert_eq!(
            out,
            vec![
                route(0, Some("dt/l1/m7"), Some(shaped)),
                route(
                    1,
                    Some("raw/dev-1/factory/l1/m7/telemetry"),
                    Some(r#"{"temperature":21}"#)
                ),
                route(2, Some("lake/m7"), Some(shaped)),
            ]
        );
        // A transform that fails adds no route of that rule, and is counted.
        assert_eq!(
            routes(&rules, "factory/l1/m7/telemetry", "{}"),
            (false, vec![])
        );
        assert_eq!(metrics.rule_errors.with_label_values(&["shape"]).get(), 1);
        assert_eq!(metrics.rule_matches.with_label_values(&["shape"]).get(), 1);
    }

    #[test]
    fn continue_false_stops_and_fallback_takes_the_rest() {
        let metrics = Metrics::new();
        let rules = rules(
            r##"
            [[rules]]
            name = "alarms"
            from = "plant/#"
            where = "payload_text.startsWith('ALARM')"
            to = ["a"]
            continue = false
            [[rules]]
            name = "everything"
            from = "plant/#"
            to = ["b"]
            [fallback]
            to = [{ sink = "c", topic = "unrouted/{topic}" }]
            "##,
            &metrics,
        );
        assert_eq!(
            routes(&rules, "plant/p1", "ALARM"),
            (true, vec![route(0, None, None)])
        );
        assert_eq!(
            routes(&rules, "plant/p1", "fine"),
            (true, vec![route(1, None, None)])
        );
        assert_eq!(
            routes(&rules, "elsewhere/x", "fine"),
            (false, vec![route(2, Some("unrouted/elsewhere/x"), None)])
        );
    }

    #[test]
    fn explain_gives_every_rule_a_verdict() {
        let metrics = Metrics::new();
        let rules = rules(
            r##"
            [[rules]]
            name = "other"
            from = "other/#"
            to = ["a"]
            [[rules]]
            name = "hot"
            from = "s/+"
            where = "payload.t > 80"
            to = ["a"]
            [[rules]]
            name = "typed"
            from = "s/+"
            where = "payload.t > 'x'"
            to = ["a"]
            [[rules]]
            name = "stop"
            from = "s/+"
            to = ["b"]
            continue = false
            [[rules]]
            name = "after"
            from = "#"
            to = ["c"]
            "##,
            &metrics,
        );
        let (verdicts, out, matched) = rules.explain(&msg("s/1", r#"{"t": 5}"#), "dev");
        assert!(matched);
        assert_eq!(out, vec![route(1, None, None)]);
        let verdicts: Vec<(&str, Verdict)> = verdicts;
        assert_eq!(verdicts[0], ("other", Verdict::FilterMismatch));
        assert_eq!(verdicts[1], ("hot", Verdict::ConditionFalse));
        assert!(
            matches!(
                verdicts[2],
                ("typed", Verdict::Error("where", EvalError::Failed(_)))
            ),
            "{verdicts:?}"
        );
        assert_eq!(verdicts[3], ("stop", Verdict::Matched));
        assert_eq!(verdicts[4], ("after", Verdict::Skipped));
        let (verdicts, _, _) = rules.explain(&msg("s/1", "{}"), "dev");
        match &verdicts[1] {
            ("hot", Verdict::MissingField(e)) => assert_eq!(e.to_string(), "t"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn many_rules_match_like_a_linear_scan() {
        let metrics = Metrics::new();
        let plans: Vec<RulePlan> = (0..300)
            .map(|i| {
                let from = match i % 3 {
                    0 => format!("site{}/+/data", i % 17),
                    1 => format!("+/m{}/#", i % 11),
                    _ => format!("site{}/m{}/data", i % 17, i % 11),
                };
                RulePlan {
                    name: format!("r{i}"),
                    filter: TopicFilter::parse(&from).expect("valid filter"),
                    condition: None,
                    to: vec![TargetPlan {
                        sink: i,
                        topic: None,
                        payload: None,
                        properties: None,
                    }],
                    stop: false,
                }
            })
            .collect();
        let rules = RuleSet::new("gw", &plans, &[], &metrics);
        let mut out = Vec::new();
        for topic in [
            "site3/m5/data",
            "site16/m0/data/x",
            "nowhere",
            "site1/m1/data",
        ] {
            rules.route(&msg(topic, ""), "", &mut out);
            let got: Vec<usize> = out.iter().map(|r| r.sink).collect();
            let expected: Vec<usize> = plans
                .iter()
                .enumerate()
                .filter(|(_, p)| p.filter.matches(topic))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(got, expected, "{topic}");
        }
    }
}
