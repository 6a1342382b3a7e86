//! `[rules.properties]`: the MQTT 5 user properties a rule sets, adds or removes on the
//! messages it routes.
//!
//! Input: the device's properties and the rule's match (its wildcard captures), as for
//! the topic template. Output: the properties each of the rule's sinks gets (one edit per
//! rule, shared by its targets). Order: `remove` first, then `set` (every value of the key
//! replaced by one), then `add` (appended; a key may repeat in MQTT 5). Values are
//! templates (`{1}`.., `{gateway_id}`, `{topic}`, `{client_id}`), rendered per message.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Template, TemplateScope, TemplateVars};
use crate::message::Properties;
use crate::problems::Problems;

/// `[rules.properties]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PropertiesSection {
    /// `key = "template"`: the key gets exactly this one value.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// `key = "template"`: one more value for the key.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Keys whose every value is removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A validated `[rules.properties]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyEdit {
    remove: Vec<String>,
    set: Vec<(String, Template)>,
    add: Vec<(String, Template)>,
}

impl PropertyEdit {
    /// Checks `section` (at key path `path`); each problem goes to `err`.
    pub fn validate(
        path: &str,
        section: &PropertiesSection,
        scope: &TemplateScope,
        err: &mut impl FnMut(String, String),
    ) -> Option<PropertyEdit> {
        let mut problems = Problems::new(err);
        let mut templates = |table: &str, entries: &BTreeMap<String, String>| {
            let mut out = Vec::new();
            for (key, value) in entries {
                if key.is_empty() {
                    problems.add(format!("{path}.{table}"), "a key must not be empty".into());
                    continue;
                }
                match Template::parse_text(value, scope) {
                    Ok(t) => out.push((key.clone(), t)),
                    Err(e) => {
                        problems.add(format!("{path}.{table}.{key}"), e.to_string());
                    }
                }
            }
            out
        };
        let set = templates("set", &section.set);
        let add = templates("add", &section.add);
        if section.remove.iter().any(String::is_empty) {
            problems.add(format!("{path}.remove"), "a key must not be empty".into());
        }
        problems.none().then(|| PropertyEdit {
            remove: section.remove.clone(),
            set,
            add,
        })
    }

    /// The properties of a message with `props` after the edit; `None` when nothing is
    /// left.
    pub fn apply(
        &self,
        props: Option<&Properties>,
        vars: &TemplateVars<'_>,
        captures: &[(usize, usize)],
    ) -> Option<Box<Properties>> {
        let mut out = props.cloned().unwrap_or_default();
        let user = &mut out.user_properties;
        user.retain(|(k, _)| !self.remove.contains(k));
        for (key, template) in &self.set {
            let value = template.render(vars, captures);
            // The first value of the key takes the new one, in place; others go.
            let mut seen = false;
            user.retain_mut(|(k, v)| {
                if k != key {
                    return true;
                }
                if seen {
                    return false;
                }
                seen = true;
                *v = value.clone();
                true
            });
            if !seen {
                user.push((key.clone(), value));
            }
        }
        for (key, template) in &self.add {
            user.push((key.clone(), template.render(vars, captures)));
        }
        (out != Properties::default()).then(|| Box::new(out))
    }

    /// One line for `check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for k in &self.remove {
            parts.push(format!("remove {k}"));
        }
        for (k, t) in &self.set {
            parts.push(format!("set {k}={}", t.source()));
        }
        for (k, t) in &self.add {
            parts.push(format!("add {k}={}", t.source()));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(toml_text: &str) -> PropertyEdit {
        let section: PropertiesSection = toml::from_str(toml_text).expect("toml");
        let scope = TemplateScope {
            wildcards: 1,
            client_id: true,
        };
        PropertyEdit::validate("rules[0].properties", &section, &scope, &mut |k, e| {
            panic!("{k}: {e}")
        })
        .expect("valid")
    }

    #[test]
    fn removes_then_sets_then_adds_with_templates() {
        let e = edit(
            r#"
            remove = ["debug"]
            set = { line = "L{1}", site = "{gateway_id}" }
            add = { via = "{client_id}" }
            "#,
        );
        let props = Properties {
            user_properties: vec![
                ("line".into(), "old".into()),
                ("debug".into(), "1".into()),
                ("line".into(), "older".into()),
                ("keep".into(), "me".into()),
            ],
            content_type: Some("text/plain".into()),
            ..Properties::default()
        };
        let vars = TemplateVars {
            gateway_id: "edge-01",
            topic: "f/7",
            client_id: "press-7",
        };
        let out = e.apply(Some(&props), &vars, &[(2, 3)]).expect("properties");
        assert_eq!(
            out.user_properties,
            [
                ("line".to_string(), "L7".to_string()),
                ("keep".into(), "me".into()),
                ("site".into(), "edge-01".into()),
                ("via".into(), "press-7".into()),
            ]
        );
        assert_eq!(out.content_type.as_deref(), Some("text/plain"));
        // A 3.1.1 device's message gets properties of its own.
        let out = e.apply(None, &vars, &[(2, 3)]).expect("properties");
        assert_eq!(out.user_properties.len(), 3);
        // Removing the last one leaves none.
        let only_remove = edit("remove = [\"debug\"]");
        let debug_only = Properties {
            user_properties: vec![("debug".into(), "1".into())],
            ..Properties::default()
        };
        assert_eq!(only_remove.apply(Some(&debug_only), &vars, &[]), None);
    }

    #[test]
    fn bad_templates_and_empty_keys_name_their_key() {
        let section: PropertiesSection =
            toml::from_str("set = { line = \"{9}\" }\nremove = [\"\"]").expect("toml");
        let scope = TemplateScope {
            wildcards: 1,
            client_id: true,
        };
        let mut errors = Vec::new();
        let e = PropertyEdit::validate("rules[0].properties", &section, &scope, &mut |k, e| {
            errors.push(format!("{k}: {e}"))
        });
        assert!(e.is_none());
        assert!(
            errors[0].starts_with("rules[0].properties.set.line: "),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("rules[0].properties.remove: "),
            "{errors:?}"
        );
    }
}
