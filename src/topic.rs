//! MQTT topic filters (`+`, `#`), compiled once at load.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+`: exactly one level.
    Single,
    /// `#`: this level and everything below (only last).
    Multi,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("topic filter is empty")]
    Empty,
    #[error("'#' must be the whole last level of a filter (as in \"a/#\")")]
    MisplacedMulti,
    #[error("'+' must be a whole level of a filter (as in \"a/+/b\")")]
    MisplacedSingle,
    #[error("topic filter contains a NUL character")]
    Nul,
}

/// A validated, compiled topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    source: String,
    levels: Vec<Level>,
}

impl TopicFilter {
    pub fn parse(source: &str) -> Result<Self, FilterError> {
        if source.is_empty() {
            return Err(FilterError::Empty);
        }
        if source.contains('\0') {
            return Err(FilterError::Nul);
        }
        let parts: Vec<&str> = source.split('/').collect();
        let last = parts.len() - 1;
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "#" if i == last => Level::Multi,
                "#" => return Err(FilterError::MisplacedMulti),
                "+" => Level::Single,
                p if p.contains('#') => return Err(FilterError::MisplacedMulti),
                p if p.contains('+') => return Err(FilterError::MisplacedSingle),
                p => Level::Literal(p.to_string()),
            };
            levels.push(level);
        }
        Ok(Self {
            source: source.to_string(),
            levels,
        })
    }

    /// Number of `+` and `#` levels: the captures `{1}`..`{n}` a template may use.
    pub fn wildcard_count(&self) -> usize {
        self.levels
            .iter()
            .filter(|l| !matches!(l, Level::Literal(_)))
            .count()
    }

    /// The first level when it is a literal: used to index rules.
    pub fn first_literal(&self) -> Option<&str> {
        match self.levels.first() {
            Some(Level::Literal(l)) => Some(l),
            _ => None,
        }
    }

    /// Matches `topic` (split into levels) and pushes the wildcard captures, in order, as
    /// byte ranges of `topic`. `#` captures the rest of the topic (possibly empty).
    pub fn captures(&self, topic: &str, out: &mut Vec<(usize, usize)>) -> bool {
        out.clear();
        self.walk(topic, |range| out.push(range))
    }

    /// Matches `topic`, handing each wildcard capture to `capture`.
    fn walk(&self, topic: &str, mut capture: impl FnMut((usize, usize))) -> bool {
        // MQTT: filters starting with a wildcard do not match `$` topics.
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Literal(_))) {
            return false;
        }
        let mut pos = 0usize;
        let mut remaining = Some(topic);
        for level in &self.levels {
            match level {
                Level::Multi => {
                    // "a/#" matches "a" too (the parent level).
                    let start = remaining.map(|_| pos).unwrap_or(topic.len());
                    capture((start, topic.len()));
                    return true;
                }
                _ => {
                    let Some(rest) = remaining else {
                        return false;
                    };
                    let (head, tail) = match rest.find('/') {
                        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                        None => (rest, None),
                    };
                    match level {
                        Level::Literal(l) if l != head => return false,
                        Level::Single => capture((pos, pos + head.len())),
                        _ => {}
                    }
                    pos += head.len() + 1;
                    remaining = tail;
                }
            }
        }
        remaining.is_none()
    }

    /// Whether every topic `other` matches is matched by `self` (ACLs: may a device
    /// subscribe to `other` when it is granted `self`).
    pub fn covers(&self, other: &TopicFilter) -> bool {
        if !matches!(self.levels.first(), Some(Level::Literal(_)))
            && matches!(other.levels.first(), Some(Level::Literal(l)) if l.starts_with('$'))
        {
            return false;
        }
        let mut mine = self.levels.iter();
        for theirs in &other.levels {
            match (mine.next(), theirs) {
                (Some(Level::Multi), _) => return true,
                (_, Level::Multi) | (None, _) => return false,
                (Some(Level::Single), _) => {}
                (Some(Level::Literal(a)), Level::Literal(b)) if a == b => {}
                (Some(Level::Literal(_)), _) => return false,
            }
        }
        // `other` ended: the rest of `self` must match nothing more than `other` did,
        // except that "a/#" also matches the parent "a".
        matches!(mine.next(), None | Some(Level::Multi))
    }

    /// Matches `topic` without collecting captures (no allocation: ACL checks call this
    /// for every device PUBLISH).
    pub fn matches(&self, topic: &str) -> bool {
        self.walk(topic, |_| {})
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn caps(filter: &str, topic: &str) -> Option<Vec<String>> {
        let f = TopicFilter::parse(filter).expect("valid filter");
        let mut out = Vec::new();
        f.captures(topic, &mut out)
            .then(|| out.iter().map(|&(s, e)| topic[s..e].to_string()).collect())
    }

    #[test]
    fn parse_rejects_bad_filters() {
        assert_eq!(TopicFilter::parse(""), Err(FilterError::Empty));
        assert_eq!(
            TopicFilter::parse("a/#/b"),
            Err(FilterError::MisplacedMulti)
        );
        assert_eq!(TopicFilter::parse("a#"), Err(FilterError::MisplacedMulti));
        assert_eq!(
            TopicFilter::parse("a/b+"),
            Err(FilterError::MisplacedSingle)
        );
        assert!(TopicFilter::parse("+/+/#").is_ok());
    }

    #[test]
    fn matching_follows_the_mqtt_spec() {
        let table = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/+/c", "a//c", true),
            ("+", "", true),
            ("a/b", "a/b/", false),
        ];
        for (filter, topic, expected) in table {
            let f = TopicFilter::parse(filter).expect("valid");
            assert_eq!(f.matches(topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn coverage_of_one_filter_by_another() {
        let table = [
            ("a/#", "a/b/c", true),
            ("a/#", "a/#", true),
            ("a/#", "a", true),
            ("a/#", "a/+", true),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/b", "a/+", false),
            ("a/b", "a/b", true),
            ("a/b/#", "a/b", true),
            ("a/b", "a/b/c", false),
            ("#", "x/#", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("+/+", "+/b", true),
            ("+/b", "+/+", false),
        ];
        for (granted, requested, expected) in table {
            let g = TopicFilter::parse(granted).expect("valid");
            let r = TopicFilter::parse(requested).expect("valid");
            assert_eq!(g.covers(&r), expected, "{granted} covers {requested}");
        }
    }

    #[test]
    fn captures_wildcard_levels_in_order() {
        assert_eq!(
            caps("factory/+/+/telemetry", "factory/l1/m7/telemetry"),
            Some(vec!["l1".into(), "m7".into()])
        );
        assert_eq!(caps("a/#", "a/b/c"), Some(vec!["b/c".into()]));
        assert_eq!(caps("a/#", "a"), Some(vec!["".into()]));
        assert_eq!(caps("+/#", "x/y/z"), Some(vec!["x".into(), "y/z".into()]));
        assert_eq!(caps("a/+", "b/c"), None);
    }

    /// The MQTT matching rules written the plainest way, as the reference: levels compared
    /// one by one; `+` takes one level, a last `#` the rest (also none: "a/#" matches "a");
    /// a filter starting with a wildcard never matches a `$` topic. Returns the captures
    /// as strings, or `None` for no match.
    fn reference(filter: &str, topic: &str) -> Option<Vec<String>> {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return None;
        }
        let mut caps = Vec::new();
        for (i, level) in f.iter().enumerate() {
            match *level {
                "#" => {
                    caps.push(t.get(i..).map(|rest| rest.join("/")).unwrap_or_default());
                    return Some(caps);
                }
                "+" => caps.push(t.get(i)?.to_string()),
                literal if t.get(i) == Some(&literal) => {}
                _ => return None,
            }
        }
        (f.len() == t.len()).then_some(caps)
    }

    /// Topic levels from a small alphabet so that random filters and topics often match.
    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("a".to_string()),
            Just("b".to_string()),
            Just("$SYS".to_string()),
            Just("ü".to_string()),
            "[a-c$ ]{1,3}",
        ]
    }

    /// Topics and filters are never empty (MQTT); a level may be.
    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..6)
            .prop_map(|l| l.join("/"))
            .prop_filter("not empty", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        let filter_level = prop_oneof![3 => level(), 1 => Just("+".to_string())];
        (proptest::collection::vec(filter_level, 1..6), any::<bool>())
            .prop_map(|(mut levels, multi)| {
                if multi {
                    levels.push("#".to_string());
                }
                levels.join("/")
            })
            .prop_filter("not empty", |f| !f.is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn matching_and_captures_agree_with_the_reference(f in filter(), t in topic()) {
            let compiled = TopicFilter::parse(&f).expect("generated filters are valid");
            let mut out = Vec::new();
            let matched = compiled.captures(&t, &mut out);
            let got = matched.then(|| out.iter().map(|&(s, e)| t[s..e].to_string()).collect::<Vec<_>>());
            prop_assert_eq!(got, reference(&f, &t), "filter {:?} topic {:?}", f, t);
            prop_assert_eq!(compiled.matches(&t), matched);
            if matched {
                prop_assert_eq!(out.len(), compiled.wildcard_count());
            }
        }

        #[test]
        fn a_topic_used_as_a_filter_matches_itself(t in topic()) {
            // A topic with no wildcard characters is a valid filter matching exactly it.
            let f = TopicFilter::parse(&t).expect("a topic is a valid filter");
            prop_assert!(f.matches(&t));
        }

        #[test]
        fn parsing_any_string_never_panics_and_keeps_its_source(s in "[a+#/$\\u{0}ü]{0,12}") {
            if let Ok(f) = TopicFilter::parse(&s) {
                prop_assert_eq!(f.to_string(), s.clone());
                prop_assert!(!s.is_empty() && !s.contains('\0'));
                for level in s.split('/') {
                    prop_assert!(level == "+" || level == "#" || !level.contains(['+', '#']));
                }
                let mut scratch = Vec::new();
                f.captures(&s, &mut scratch);
            }
        }
    }
}
