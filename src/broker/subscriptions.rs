//! A device session's MQTT 5 subscription options that rumqttd's router keeps but does not
//! apply (no local, retain as published, retain handling): the connection applies them to
//! what the router delivers.
//!
//! What the router gives to work with: a delivery of a retained message because of a
//! SUBSCRIBE carries `retain = 1`, and every live delivery `retain = 0` (rumqttd clears
//! it); the publishing client and the published retain flag travel as marks
//! (`links::Marks`). A delivery does not say which of the session's filters it is for, so
//! with overlapping filters a message is delivered when at least one matching filter
//! wants it (one copy, as rumqttd sends).

use rumqttd::protocol::{Filter, RetainForwardRule};

use crate::topic::TopicFilter;

/// One subscription of the session and its options.
#[derive(Debug, Clone)]
struct Entry {
    path: String,
    filter: TopicFilter,
    no_local: bool,
    retain_as_published: bool,
    /// Retained messages sent because of its latest SUBSCRIBE are not delivered (retain
    /// handling 2, or 1 when the subscription already existed).
    skip_retained: bool,
}

impl Entry {
    fn plain(&self) -> bool {
        !self.no_local && !self.retain_as_published && !self.skip_retained
    }
}

/// What to do with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it with this retain flag.
    Deliver { retain: bool },
    /// Do not send it (the router still gets its ack).
    Skip,
}

/// The subscription options of one session, by filter.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    entries: Vec<Entry>,
    /// Some entry has an option to apply: deliveries are checked one by one.
    active: bool,
}

impl Subscriptions {
    /// Records a filter of a SUBSCRIBE the router accepts. Filters that do not parse
    /// (shared subscriptions' `$share/…` prefix included) keep the router's behaviour.
    pub fn subscribe(&mut self, f: &Filter) {
        let existed = self.entries.iter().position(|e| e.path == f.path);
        let skip_retained = match f.retain_forward_rule {
            RetainForwardRule::OnEverySubscribe => false,
            RetainForwardRule::OnNewSubscribe => existed.is_some(),
            RetainForwardRule::Never => true,
        };
        let Ok(filter) = TopicFilter::parse(&f.path) else {
            return;
        };
        let entry = Entry {
            path: f.path.clone(),
            filter,
            no_local: f.nolocal,
            retain_as_published: f.preserve_retain,
            skip_retained,
        };
        match existed {
            Some(i) => self.entries[i] = entry,
            None => self.entries.push(entry),
        }
        self.refresh();
    }

    pub fn unsubscribe(&mut self, path: &str) {
        self.entries.retain(|e| e.path != path);
        self.refresh();
    }

    /// Whether any option is in force (otherwise every delivery goes out as the router
    /// sent it, and [`Subscriptions::verdict`] need not be asked).
    pub fn active(&self) -> bool {
        self.active
    }

    /// Whether any option needs a delivery's origin (the publishing client).
    pub fn wants_origin(&self) -> bool {
        self.entries.iter().any(|e| e.no_local)
    }

    fn refresh(&mut self) {
        self.active = self.entries.iter().any(|e| !e.plain());
    }

    /// What to do with a delivery on `topic`. `retained`: the router sent it because of a
    /// SUBSCRIBE (its retain flag is set). `own`: this session's client published it.
    /// `published_retained`: it was published with the retain flag.
    pub fn verdict(
        &self,
        topic: &str,
        retained: bool,
        own: bool,
        published_retained: bool,
    ) -> Verdict {
        if !self.active {
            return Verdict::Deliver { retain: retained };
        }
        let mut matched = false;
        let mut wanted = false;
        let mut keep_retain = false;
        for e in self.entries.iter().filter(|e| e.filter.matches(topic)) {
            matched = true;
            if (e.no_local && own) || (retained && e.skip_retained) {
                continue;
            }
            wanted = true;
            keep_retain |= e.retain_as_published;
        }
        // A filter the router holds and this table does not (one it could not parse):
        // the router's behaviour.
        if !matched {
            return Verdict::Deliver { retain: retained };
        }
        if !wanted {
            return Verdict::Skip;
        }
        Verdict::Deliver {
            retain: retained || (keep_retain && published_retained),
        }
    }
}

#[cfg(test)]
mod tests {
    use rumqttd::protocol::QoS;

    use super::*;

    fn filter(path: &str, no_local: bool, rap: bool, rule: RetainForwardRule) -> Filter {
        Filter {
            path: path.into(),
            qos: QoS::AtLeastOnce,
            nolocal: no_local,
            preserve_retain: rap,
            retain_forward_rule: rule,
        }
    }

    const LIVE: bool = false;
    const RETAINED: bool = true;

    #[test]
    fn plain_subscriptions_change_nothing() {
        let mut subs = Subscriptions::default();
        subs.subscribe(&filter(
            "a/#",
            false,
            false,
            RetainForwardRule::OnEverySubscribe,
        ));
        assert_eq!(
            subs.verdict("a/b", LIVE, true, true),
            Verdict::Deliver { retain: false }
        );
        assert_eq!(
            subs.verdict("a/b", RETAINED, true, true),
            Verdict::Deliver { retain: true }
        );
        assert!(!subs.wants_origin());
    }

    #[test]
    fn no_local_skips_own_messages_unless_another_filter_wants_them() {
        let mut subs = Subscriptions::default();
        subs.subscribe(&filter(
            "a/#",
            true,
            false,
            RetainForwardRule::OnEverySubscribe,
        ));
        assert!(subs.wants_origin());
        assert_eq!(subs.verdict("a/b", LIVE, true, false), Verdict::Skip);
        assert_eq!(
            subs.verdict("a/b", LIVE, false, false),
            Verdict::Deliver { retain: false }
        );
        subs.subscribe(&filter(
            "a/b",
            false,
            false,
            RetainForwardRule::OnEverySubscribe,
        ));
        assert_eq!(
            subs.verdict("a/b", LIVE, true, false),
            Verdict::Deliver { retain: false }
        );
        assert_eq!(subs.verdict("a/c", LIVE, true, false), Verdict::Skip);
        subs.unsubscribe("a/#");
        assert!(!subs.wants_origin());
        assert_eq!(
            subs.verdict("a/b", LIVE, true, false),
            Verdict::Deliver { retain: false }
        );
    }

    #[test]
    fn retain_as_published_keeps_the_flag_of_live_deliveries() {
        let mut subs = Subscriptions::default();
        subs.subscribe(&filter(
            "a/+",
            false,
            true,
            RetainForwardRule::OnEverySubscribe,
        ));
        assert_eq!(
            subs.verdict("a/b", LIVE, false, true),
            Verdict::Deliver { retain: true }
        );
        assert_eq!(
            subs.verdict("a/b", LIVE, false, false),
            Verdict::Deliver { retain: false }
        );
        assert_eq!(
            subs.verdict("a/b", RETAINED, false, true),
            Verdict::Deliver { retain: true }
        );
    }

    #[test]
    fn retain_handling_skips_retained_messages_as_asked() {
        let mut subs = Subscriptions::default();
        subs.subscribe(&filter("a/+", false, false, RetainForwardRule::Never));
        assert_eq!(subs.verdict("a/b", RETAINED, false, true), Verdict::Skip);
        assert_eq!(
            subs.verdict("a/b", LIVE, false, true),
            Verdict::Deliver { retain: false }
        );

        // 1: only when the subscription is new.
        subs.subscribe(&filter(
            "b/+",
            false,
            false,
            RetainForwardRule::OnNewSubscribe,
        ));
        assert_eq!(
            subs.verdict("b/x", RETAINED, false, true),
            Verdict::Deliver { retain: true }
        );
        subs.subscribe(&filter(
            "b/+",
            false,
            false,
            RetainForwardRule::OnNewSubscribe,
        ));
        assert_eq!(subs.verdict("b/x", RETAINED, false, true), Verdict::Skip);
        // Subscribing again with 0 sends them again.
        subs.subscribe(&filter(
            "b/+",
            false,
            false,
            RetainForwardRule::OnEverySubscribe,
        ));
        assert_eq!(
            subs.verdict("b/x", RETAINED, false, true),
            Verdict::Deliver { retain: true }
        );
    }

    #[test]
    fn unknown_filters_keep_the_routers_behaviour() {
        let mut subs = Subscriptions::default();
        subs.subscribe(&filter("a/#", true, false, RetainForwardRule::Never));
        subs.subscribe(&filter(
            "$share/g/c/#",
            true,
            false,
            RetainForwardRule::Never,
        ));
        assert_eq!(
            subs.verdict("c/d", RETAINED, true, true),
            Verdict::Deliver { retain: true }
        );
    }
}
