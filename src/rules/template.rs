//! Topic and client-id templates: `dt/{gateway_id}/{1}/{2}`, parsed once at load.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    GatewayId,
    /// The whole original topic.
    Topic,
    /// The client id of the device that published (empty when unknown).
    ClientId,
    /// `{n}`: the n-th wildcard capture, 1-based in the text, 0-based here.
    Capture(usize),
}

/// What a template may refer to where it is used.
#[derive(Debug, Clone, Default)]
pub struct TemplateScope {
    /// Number of wildcard captures available (`{1}`..`{n}`).
    pub wildcards: usize,
    /// Whether `{client_id}` (of the publishing device) is known where it renders.
    pub client_id: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unclosed '{{' in template")]
    Unclosed,
    #[error(
        "unknown placeholder {{{0}}}; use {{gateway_id}}, {{topic}}, {{client_id}} or {{1}}..{{n}}"
    )]
    Unknown(String),
    #[error("{{{0}}} is not available here (no device publishes this message)")]
    Unavailable(String),
    #[error("{{{0}}} refers to a wildcard the filter does not have (it has {1})")]
    NoSuchCapture(usize, usize),
    #[error("a topic template must not contain '+' or '#'")]
    Wildcard,
    #[error("template renders to an empty string")]
    Empty,
}

/// What a template renders from, besides the wildcard captures.
#[derive(Debug, Clone, Copy)]
pub struct TemplateVars<'a> {
    pub gateway_id: &'a str,
    /// The topic the captures are byte ranges of.
    pub topic: &'a str,
    pub client_id: &'a str,
}

/// Byte ranges of the `/`-separated levels of `topic`: the captures `{1}`, `{2}`.. of a
/// template rendered against a whole topic (sink templates: URL paths, Kafka topics).
pub fn level_ranges(topic: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for (i, b) in topic.bytes().enumerate() {
        if b == b'/' {
            ranges.push((start, i));
            start = i + 1;
        }
    }
    ranges.push((start, topic.len()));
    ranges
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str, scope: &TemplateScope) -> Result<Self, TemplateError> {
        let template = Self::parse_text(source, scope)?;
        let has_wildcard = template
            .parts
            .iter()
            .any(|p| matches!(p, Part::Literal(l) if l.contains(['+', '#'])));
        if has_wildcard {
            return Err(TemplateError::Wildcard);
        }
        Ok(template)
    }

    /// As [`Template::parse`], for text that is not an MQTT topic (a URL, a header
    /// value): `+` and `#` are allowed.
    pub fn parse_text(source: &str, scope: &TemplateScope) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(TemplateError::Unclosed)?;
            let name = &after[..close];
            let part = match name {
                "gateway_id" => Part::GatewayId,
                "topic" => Part::Topic,
                "client_id" if scope.client_id => Part::ClientId,
                "client_id" => return Err(TemplateError::Unavailable(name.to_string())),
                n => match n.parse::<usize>() {
                    Ok(i) if i >= 1 && i <= scope.wildcards => Part::Capture(i - 1),
                    Ok(i) => return Err(TemplateError::NoSuchCapture(i, scope.wildcards)),
                    Err(_) => return Err(TemplateError::Unknown(n.to_string())),
                },
            };
            parts.push(part);
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if parts.is_empty() {
            return Err(TemplateError::Empty);
        }
        Ok(Self {
            source: source.to_string(),
            parts,
        })
    }

    /// Whether rendering reads captures (`{1}`..): callers may skip computing them.
    pub fn uses_captures(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Capture(_)))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders with the captures of a filter match (byte ranges into `topic`).
    pub fn render(&self, vars: &TemplateVars<'_>, captures: &[(usize, usize)]) -> String {
        let topic = vars.topic;
        let mut out = String::with_capacity(self.source.len() + topic.len());
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::GatewayId => out.push_str(vars.gateway_id),
                Part::Topic => out.push_str(topic),
                Part::ClientId => out.push_str(vars.client_id),
                Part::Capture(i) => {
                    if let Some(&(s, e)) = captures.get(*i) {
                        out.push_str(&topic[s..e]);
                    }
                }
            }
        }
        out
    }

    /// Renders a template that has no topic context (client ids).
    pub fn render_static(&self, gateway_id: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::GatewayId => out.push_str(gateway_id),
                Part::Topic | Part::ClientId | Part::Capture(_) => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope(n: usize) -> TemplateScope {
        TemplateScope {
            wildcards: n,
            client_id: true,
        }
    }

    fn vars<'a>(topic: &'a str) -> TemplateVars<'a> {
        TemplateVars {
            gateway_id: "edge-01",
            topic,
            client_id: "dev-7",
        }
    }

    #[test]
    fn renders_captures_and_gateway_id() {
        let t = Template::parse("dt/{gateway_id}/{1}/{2}", &scope(2)).expect("valid");
        let topic = "factory/l1/m7/telemetry";
        let caps = [(8, 10), (11, 13)];
        assert_eq!(t.render(&vars(topic), &caps), "dt/edge-01/l1/m7");
        let t = Template::parse("copy/{topic}", &scope(0)).expect("valid");
        assert_eq!(t.render(&vars("a/b"), &[]), "copy/a/b");
        let t = Template::parse("by/{client_id}/{1}", &scope(1)).expect("valid");
        assert_eq!(t.render(&vars("x/ü/z"), &[(2, 4)]), "by/dev-7/ü");
    }

    #[test]
    fn rejects_bad_templates() {
        assert_eq!(
            Template::parse("x/{3}", &scope(2)),
            Err(TemplateError::NoSuchCapture(3, 2))
        );
        assert_eq!(
            Template::parse("x/{1", &scope(2)),
            Err(TemplateError::Unclosed)
        );
        assert_eq!(
            Template::parse("x/{nope}", &scope(2)),
            Err(TemplateError::Unknown("nope".into()))
        );
        assert_eq!(
            Template::parse("x/#", &scope(0)),
            Err(TemplateError::Wildcard)
        );
        assert_eq!(Template::parse("", &scope(0)), Err(TemplateError::Empty));
        let no_device = TemplateScope::default();
        assert_eq!(
            Template::parse("x/{client_id}", &no_device),
            Err(TemplateError::Unavailable("client_id".into()))
        );
    }

    /// One piece of a generated template: its source text and what it renders to with
    /// [`vars`] and the captures `["l1", "m/7"]` of topic `"x/l1/m/7"`.
    fn piece() -> impl Strategy<Value = (String, String)> {
        prop_oneof![
            // Literal text without braces (and so without placeholders).
            "[a-z0-9/ü_.-]{1,6}".prop_map(|l| (l.clone(), l)),
            Just(("{gateway_id}".to_string(), "edge-01".to_string())),
            Just(("{topic}".to_string(), "x/l1/m/7".to_string())),
            Just(("{client_id}".to_string(), "dev-7".to_string())),
            Just(("{1}".to_string(), "l1".to_string())),
            Just(("{2}".to_string(), "m/7".to_string())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn known_placeholders_render_to_their_values(pieces in proptest::collection::vec(piece(), 1..8)) {
            let source: String = pieces.iter().map(|(s, _)| s.as_str()).collect();
            let expected: String = pieces.iter().map(|(_, r)| r.as_str()).collect();
            let t = Template::parse_text(&source, &scope(2)).expect("generated templates are valid");
            prop_assert_eq!(t.source(), source.as_str());
            let topic = "x/l1/m/7";
            prop_assert_eq!(t.render(&vars(topic), &[(2, 4), (5, 8)]), expected);
            prop_assert_eq!(t.uses_captures(), source.contains("{1}") || source.contains("{2}"));
            // Without topic context only literals and the gateway id remain.
            let statics: String = pieces
                .iter()
                .filter(|(s, _)| !s.starts_with('{') || s == "{gateway_id}")
                .map(|(_, r)| r.as_str())
                .collect();
            prop_assert_eq!(t.render_static("edge-01"), statics);
        }

        #[test]
        fn any_text_parses_or_errs_and_renders_without_panicking(
            source in "[a{}0-9_/+#]{0,16}|.{0,16}",
            wildcards in 0usize..4,
            client_id in any::<bool>(),
            topic in "[a-c/]{0,10}",
        ) {
            let scope = TemplateScope { wildcards, client_id };
            let _ = Template::parse(&source, &scope);
            if let Ok(t) = Template::parse_text(&source, &scope) {
                prop_assert!(!source.is_empty());
                // Fewer captures than the template refers to render as empty strings.
                let levels = level_ranges(&topic);
                let caps = &levels[..levels.len().min(wildcards)];
                let _ = t.render(&vars(&topic), caps);
                let _ = t.render(&vars(&topic), &[]);
                let _ = t.render_static("edge-01");
            }
        }

        #[test]
        fn level_ranges_cover_the_topic_levels(topic in "[a-cü/]{0,12}") {
            let levels: Vec<&str> = level_ranges(&topic).iter().map(|&(s, e)| &topic[s..e]).collect();
            prop_assert_eq!(levels, topic.split('/').collect::<Vec<_>>());
        }
    }
}
