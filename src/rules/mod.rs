//! The rule engine: compiled rules and the router task.
//!
//! Input: [`IntakeItem`](crate::broker::IntakeItem)s from the broker's protocol seam.
//! Output: one record per matched sink, appended to that sink's buffer. The engine never
//! touches the network; a slow sink only grows its own buffer.

mod filter;
pub mod router;
mod template;

use std::collections::HashMap;

use prometheus::IntCounter;

pub use filter::{FilterError, TopicFilter};
pub use template::{Template, TemplateError, TemplateScope};

use crate::config::RulePlan;
use crate::metrics::Metrics;

/// One destination of a routed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Index of the sink in the plan.
    pub sink: usize,
    /// The rewritten topic, or `None` to keep the device's topic.
    pub topic: Option<String>,
}

struct CompiledRule {
    filter: TopicFilter,
    to: Vec<usize>,
    topic: Option<Template>,
    matches: IntCounter,
}

/// All rules, indexed by their first literal level so that matching a topic only
/// evaluates the rules that can match it.
pub struct RuleSet {
    gateway_id: String,
    rules: Vec<CompiledRule>,
    by_first_level: HashMap<String, Vec<usize>>,
    /// Rules whose filter starts with a wildcard: candidates for every topic.
    wildcard_first: Vec<usize>,
}

impl RuleSet {
    pub fn new(gateway_id: &str, plans: &[RulePlan], metrics: &Metrics) -> Self {
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
                    filter: p.filter.clone(),
                    to: p.to.clone(),
                    topic: p.topic.clone(),
                    matches: metrics.rule_matches.with_label_values(&[&p.name]),
                }
            })
            .collect();
        Self {
            gateway_id: gateway_id.to_string(),
            rules,
            by_first_level,
            wildcard_first,
        }
    }

    /// Appends the routes of `topic` to `out` (cleared first), in rule order; the same
    /// sink with the same topic is listed once. Returns whether any rule matched.
    pub fn route(&self, topic: &str, out: &mut Vec<Route>) -> bool {
        out.clear();
        let first = topic.split('/').next().unwrap_or("");
        let literal = self
            .by_first_level
            .get(first)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
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
            if !rule.filter.captures(topic, &mut captures) {
                continue;
            }
            matched = true;
            rule.matches.inc();
            let rewritten = rule
                .topic
                .as_ref()
                .map(|t| t.render(&self.gateway_id, topic, &captures));
            for &sink in &rule.to {
                let route = Route {
                    sink,
                    topic: rewritten.clone(),
                };
                if !out.contains(&route) {
                    out.push(route);
                }
            }
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, from: &str, to: &[usize], topic: Option<&str>) -> RulePlan {
        let filter = TopicFilter::parse(from).expect("valid filter");
        let scope = TemplateScope {
            wildcards: filter.wildcard_count(),
        };
        RulePlan {
            name: name.into(),
            topic: topic.map(|t| Template::parse(t, &scope).expect("valid template")),
            filter,
            to: to.to_vec(),
        }
    }

    #[test]
    fn routes_to_every_matching_rule_in_order() {
        let metrics = Metrics::new();
        let rules = RuleSet::new(
            "gw",
            &[
                rule(
                    "a",
                    "factory/+/+/telemetry",
                    &[0],
                    Some("dt/{gateway_id}/{1}/{2}"),
                ),
                rule("b", "#", &[1], None),
                rule("c", "factory/#", &[0], None),
                rule("d", "other/#", &[2], None),
            ],
            &metrics,
        );
        let mut out = Vec::new();
        assert!(rules.route("factory/l1/m7/telemetry", &mut out));
        assert_eq!(
            out,
            vec![
                Route {
                    sink: 0,
                    topic: Some("dt/gw/l1/m7".into())
                },
                Route {
                    sink: 1,
                    topic: None
                },
                Route {
                    sink: 0,
                    topic: None
                },
            ]
        );
        assert!(rules.route("x/y", &mut out));
        assert_eq!(
            out,
            vec![Route {
                sink: 1,
                topic: None
            }]
        );
        let c = metrics.rule_matches.with_label_values(&["c"]).get();
        assert_eq!(c, 1);
    }

    #[test]
    fn unmatched_topics_route_nowhere() {
        let metrics = Metrics::new();
        let rules = RuleSet::new("gw", &[rule("a", "a/+", &[0], None)], &metrics);
        let mut out = vec![Route {
            sink: 9,
            topic: None,
        }];
        assert!(!rules.route("b/c", &mut out));
        assert!(out.is_empty());
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
                rule(&format!("r{i}"), &from, &[i], None)
            })
            .collect();
        let rules = RuleSet::new("gw", &plans, &metrics);
        let mut out = Vec::new();
        for topic in [
            "site3/m5/data",
            "site16/m0/data/x",
            "nowhere",
            "site1/m1/data",
        ] {
            rules.route(topic, &mut out);
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
