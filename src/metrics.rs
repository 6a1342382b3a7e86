//! The Prometheus registry and typed handles for every metric in the README's Metrics table.
//!
//! Label values are resolved once per listener, rule and sink (`*Metrics` handles), so the
//! forwarding path only touches atomics.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub messages_received: IntCounterVec,
    pub messages_dropped: IntCounterVec,
    pub messages_unmatched: IntCounterVec,
    pub acl_denied: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub connections: IntGaugeVec,
    pub rule_matches: IntCounterVec,
    pub rule_errors: IntCounterVec,
    pub downlink_messages: IntCounterVec,
    pub credentials_reloads: IntCounterVec,
    pub sink_delivered: IntCounterVec,
    pub sink_errors: IntCounterVec,
    pub sink_up: IntGaugeVec,
    pub sink_endpoint: IntGaugeVec,
    pub buffer_messages: IntGaugeVec,
    pub buffer_bytes: IntGaugeVec,
    pub buffer_backlog: IntGaugeVec,
    pub buffer_corrupt_files: IntGaugeVec,
    pub buffer_corrupt_bytes: IntGaugeVec,
    pub buffer_oldest_age: GaugeVec,
    pub buffer_dropped: IntCounterVec,
    pub delivery_latency: HistogramVec,
}

/// One metric's name, help text and label names, as in the README's Metrics table.
struct Def {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

const MESSAGES_RECEIVED: Def = Def {
    name: "edgebridge_messages_received_total",
    help: "PUBLISHes accepted from devices",
    labels: &["listener"],
};

const MESSAGES_DROPPED: Def = Def {
    name: "edgebridge_messages_dropped_total",
    help: "PUBLISHes from devices not taken into intake, by reason",
    labels: &["listener", "reason"],
};

const MESSAGES_UNMATCHED: Def = Def {
    name: "edgebridge_messages_unmatched_total",
    help: "PUBLISHes that matched no rule",
    labels: &["listener"],
};

const ACL_DENIED: Def = Def {
    name: "edgebridge_acl_denied_total",
    help: "PUBLISHes and subscriptions refused by the ACL",
    labels: &["listener"],
};

const CONNECTIONS_REFUSED: Def = Def {
    name: "edgebridge_connections_refused_total",
    help: "Device connections refused, by reason",
    labels: &["listener", "reason"],
};

const CONNECTIONS_CLOSED: Def = Def {
    name: "edgebridge_connections_closed_total",
    help: "Device connections ended, by reason",
    labels: &["listener", "reason"],
};

const CONNECTIONS: Def = Def {
    name: "edgebridge_connections",
    help: "Device connections currently open",
    labels: &["listener"],
};

const RULE_MATCHES: Def = Def {
    name: "edgebridge_rule_matches_total",
    help: "Messages matched by each rule",
    labels: &["rule"],
};

const DOWNLINK_MESSAGES: Def = Def {
    name: "edgebridge_downlink_messages_total",
    help: "Messages from an upstream published to local devices by [[downlinks]]",
    labels: &["sink"],
};

const CREDENTIALS_RELOADS: Def = Def {
    name: "edgebridge_credentials_reloads_total",
    help: "Changed credential files read while running, by source (listener:<name>, sink:<name>, users_file, secrets) and outcome (applied, or refused: the ones in use stay)",
    labels: &["source", "outcome"],
};

const RULE_ERRORS: Def = Def {
    name: "edgebridge_rule_errors_total",
    help: "Evaluation errors of a rule's condition or transforms (the rule did not match)",
    labels: &["rule"],
};

const SINK_DELIVERED: Def = Def {
    name: "edgebridge_sink_delivered_total",
    help: "Messages confirmed by the upstream",
    labels: &["sink"],
};

const SINK_ERRORS: Def = Def {
    name: "edgebridge_sink_errors_total",
    help: "Failed deliveries or connections, by reason",
    labels: &["sink", "reason"],
};

const SINK_UP: Def = Def {
    name: "edgebridge_sink_up",
    help: "1 while the upstream is connected and healthy",
    labels: &["sink"],
};

const SINK_ENDPOINT: Def = Def {
    name: "edgebridge_sink_endpoint",
    help: "MQTT sinks: 1 for the endpoint in use, 0 for the others (endpoint: index in the url list, 0 is the primary)",
    labels: &["sink", "endpoint"],
};

const BUFFER_MESSAGES: Def = Def {
    name: "edgebridge_buffer_messages",
    help: "Messages waiting in the sink's buffer (including in flight)",
    labels: &["sink"],
};

const BUFFER_BYTES: Def = Def {
    name: "edgebridge_buffer_bytes",
    help:
        "Bytes of the segment files holding messages waiting in the sink's buffer (0 once drained)",
    labels: &["sink"],
};

const BUFFER_BACKLOG: Def = Def {
    name: "edgebridge_buffer_backlog_messages",
    help: "Messages that waited when the gateway started or the sink last came back, not yet delivered (0 once the drain is done)",
    labels: &["sink"],
};

const BUFFER_CORRUPT_FILES: Def = Def {
    name: "edgebridge_buffer_corrupt_files",
    help: "*.corrupt files (damaged buffer data moved aside) kept for inspection",
    labels: &["sink"],
};

const BUFFER_CORRUPT_BYTES: Def = Def {
    name: "edgebridge_buffer_corrupt_bytes",
    help: "Bytes of the *.corrupt files kept for inspection",
    labels: &["sink"],
};

const BUFFER_DROPPED: Def = Def {
    name: "edgebridge_buffer_dropped_total",
    help: "Messages dropped from the sink's buffer, by reason",
    labels: &["sink", "reason"],
};

fn counter(registry: &Registry, def: &Def) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(def.name, def.help), def.labels)
        .expect("metric names and labels are static and valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

fn gauge(registry: &Registry, def: &Def) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(def.name, def.help), def.labels)
        .expect("metric names and labels are static and valid");
    registry
        .register(Box::new(g.clone()))
        .expect("each metric is registered once");
    g
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Registering the process collector can only fail on a duplicate.
            let _ = registry.register(Box::new(pc));
        }
        let oldest = GaugeVec::new(
            Opts::new(
                "edgebridge_buffer_oldest_age_seconds",
                "Age of the oldest message waiting in the sink's buffer",
            ),
            &["sink"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(oldest.clone()))
            .expect("registered once");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "edgebridge_delivery_latency_seconds",
                "Time from receipt at the broker to the upstream's acknowledgement",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
                600.0, 3600.0,
            ]),
            &["sink"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(latency.clone()))
            .expect("registered once");
        Self {
            messages_received: counter(&registry, &MESSAGES_RECEIVED),
            messages_dropped: counter(&registry, &MESSAGES_DROPPED),
            messages_unmatched: counter(&registry, &MESSAGES_UNMATCHED),
            acl_denied: counter(&registry, &ACL_DENIED),
            connections_refused: counter(&registry, &CONNECTIONS_REFUSED),
            connections_closed: counter(&registry, &CONNECTIONS_CLOSED),
            connections: gauge(&registry, &CONNECTIONS),
            rule_matches: counter(&registry, &RULE_MATCHES),
            downlink_messages: counter(&registry, &DOWNLINK_MESSAGES),
            credentials_reloads: counter(&registry, &CREDENTIALS_RELOADS),
            rule_errors: counter(&registry, &RULE_ERRORS),
            sink_delivered: counter(&registry, &SINK_DELIVERED),
            sink_errors: counter(&registry, &SINK_ERRORS),
            sink_up: gauge(&registry, &SINK_UP),
            sink_endpoint: gauge(&registry, &SINK_ENDPOINT),
            buffer_messages: gauge(&registry, &BUFFER_MESSAGES),
            buffer_bytes: gauge(&registry, &BUFFER_BYTES),
            buffer_backlog: gauge(&registry, &BUFFER_BACKLOG),
            buffer_corrupt_files: gauge(&registry, &BUFFER_CORRUPT_FILES),
            buffer_corrupt_bytes: gauge(&registry, &BUFFER_CORRUPT_BYTES),
            buffer_oldest_age: oldest,
            buffer_dropped: counter(&registry, &BUFFER_DROPPED),
            delivery_latency: latency,
            registry,
        }
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text encoder.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Every metric family with its current values (for the status API).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let refused = |reason| {
            self.connections_refused
                .with_label_values(&[listener, reason])
        };
        ListenerMetrics {
            received: self.messages_received.with_label_values(&[listener]),
            unmatched: self.messages_unmatched.with_label_values(&[listener]),
            qos0_shed: self
                .messages_dropped
                .with_label_values(&[listener, "qos0_shed"]),
            intake_full: self
                .messages_dropped
                .with_label_values(&[listener, "intake_full"]),
            invalid: self
                .messages_dropped
                .with_label_values(&[listener, "invalid"]),
            connections: self.connections.with_label_values(&[listener]),
            closed: ClosedMetrics {
                by_reason: self.connections_closed.clone(),
                listener: listener.to_string(),
            },
            acl_denied: self.acl_denied.with_label_values(&[listener]),
            refused: RefusedMetrics {
                bad_credentials: refused("bad_credentials"),
                not_authorized: refused("not_authorized"),
                invalid_client_id: refused("invalid_client_id"),
                max_connections: refused("max_connections"),
                handshake: refused("handshake"),
                protocol_version: refused("protocol_version"),
            },
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Handles for one device listener.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub received: IntCounter,
    pub unmatched: IntCounter,
    pub qos0_shed: IntCounter,
    pub intake_full: IntCounter,
    pub invalid: IntCounter,
    pub connections: IntGauge,
    pub closed: ClosedMetrics,
    pub acl_denied: IntCounter,
    pub refused: RefusedMetrics,
}

/// `edgebridge_connections_closed_total` of one listener; the reasons are the
/// `CloseReason` labels of the device connection.
#[derive(Clone)]
pub struct ClosedMetrics {
    by_reason: IntCounterVec,
    listener: String,
}

impl ClosedMetrics {
    pub fn inc(&self, reason: &str) {
        self.by_reason
            .with_label_values(&[self.listener.as_str(), reason])
            .inc();
    }
}

/// `edgebridge_connections_refused_total` of one listener, by reason.
#[derive(Clone)]
pub struct RefusedMetrics {
    /// Wrong or unknown username/password.
    pub bad_credentials: IntCounter,
    /// No credentials where required, or a will topic the ACL does not allow.
    pub not_authorized: IntCounter,
    pub invalid_client_id: IntCounter,
    pub max_connections: IntCounter,
    /// TLS or WebSocket handshake failed or timed out (wrong CA, expired certificate…).
    pub handshake: IntCounter,
    /// A CONNECT with a protocol level other than 3.1, 3.1.1 or 5 (CONNACK 0x01 / 0x84).
    pub protocol_version: IntCounter,
}
