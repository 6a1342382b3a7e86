//! The Kafka sink's configuration (`type = "kafka"`), its validation and the typed plan.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::buffer::BufferSection;
use crate::problems::Problems;
use crate::rules::{Template, TemplateScope};
use crate::sinks::pacing::RateSection;
use crate::units::{spelled, HumanDuration};

/// `[sinks.NAME]` with `type = "kafka"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkSection {
    /// Bootstrap brokers, `host:port` each.
    pub brokers: Vec<String>,
    /// Kafka topic; may use `{1}`.. (levels of the message's MQTT topic), `{gateway_id}`.
    pub topic: String,
    /// Record key template; default the MQTT topic (`{topic}`), so one device topic
    /// stays in one partition, in order.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub format: KafkaFormat,
    /// MQTT 5 properties as record headers: each user property as
    /// `{property_header_prefix}{key}` (a key sent twice gives two headers), and the
    /// content type as `content-type`.
    #[serde(default = "default_true")]
    pub property_headers: bool,
    /// Prefix of the user property headers (e.g. `"mqtt."`), so that they cannot be
    /// taken for edgebridge's own `mqtt_topic`, `qos` and `gateway_id`.
    #[serde(default)]
    pub property_header_prefix: String,
    /// Passed to librdkafka as is (`security.protocol`, `sasl.*`, `ssl.*`,
    /// `compression.type`, `linger.ms`…); wins over edgebridge's defaults.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Records handed to librdkafka and not yet reported delivered, at most.
    #[serde(default = "default_inflight")]
    pub inflight: usize,
    #[serde(default = "default_backoff_min")]
    pub backoff_min: HumanDuration,
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Pacing of what goes on the wire (see `sinks::pacing`).
    #[serde(default)]
    pub rate: Option<RateSection>,
    #[serde(default)]
    pub buffer: BufferSection,
}

/// What a Kafka record's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaFormat {
    /// The MQTT payload as is.
    #[default]
    Raw,
    /// A JSON envelope (`crate::sinks::envelope`).
    Envelope,
}

fn default_true() -> bool {
    true
}
fn default_inflight() -> usize {
    10_000
}
fn default_backoff_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// librdkafka settings edgebridge starts from; `properties` overrides each.
pub const DEFAULT_PROPERTIES: &[(&str, &str)] = &[
    // Exactly once per partition for librdkafka's own retries, in order.
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("compression.type", "lz4"),
    ("linger.ms", "5"),
    // A record librdkafka cannot deliver in this time is reported failed; the sink then
    // sends it again from its buffer.
    ("message.timeout.ms", "300000"),
    // Half-open detection: a produce request unanswered this long closes the broker
    // connection, and with every broker down librdkafka reports `AllBrokersDown`, which
    // marks the sink down. With librdkafka's own 60 s a link black-holed mid-batch (no
    // FIN, no RST) was reported "up" for 70 s; with 30 s, for 41 s (measured with
    // tests/network_faults.rs). 30 s matches the MQTT sink's `ack_timeout` and still
    // carries a full 1 MB batch over a 64 KiB/s uplink (16 s).
    ("socket.timeout.ms", "30000"),
];

/// Properties edgebridge sets itself.
const RESERVED: &[&str] = &["bootstrap.servers", "metadata.broker.list"];

/// The validated Kafka sink.
#[derive(Debug, Clone)]
pub struct KafkaPlan {
    pub gateway_id: String,
    pub brokers: Vec<String>,
    pub topic: Template,
    pub key: Template,
    pub format: KafkaFormat,
    /// `Some(prefix)`: MQTT 5 user properties become headers `{prefix}{key}`, and the
    /// content type `content-type`; `None`: no property headers.
    pub property_headers: Option<String>,
    /// Defaults merged with the configured properties (bootstrap servers included).
    pub properties: BTreeMap<String, String>,
    pub inflight: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Placeholders `{1}`..`{64}` may name topic levels.
const MAX_LEVELS: usize = 64;

/// A Kafka topic name: 1..=249 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Whether a property's value may be a secret (never printed).
pub fn is_secret(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "sasl.oauthbearer.config",
        "sasl.jaas",
    ]
    .iter()
    .any(|s| p.contains(s))
}

/// Checks `s` (at key path `path`) and builds its plan; each problem goes to `err`.
pub fn validate(
    path: &str,
    s: &KafkaSinkSection,
    gateway_id: &str,
    err: &mut impl FnMut(String, String),
) -> Option<KafkaPlan> {
    let mut problems = Problems::new(err);
    if s.brokers.is_empty() {
        problems.add(format!("{path}.brokers"), "at least one host:port".into());
    }
    for (i, b) in s.brokers.iter().enumerate() {
        let valid = b.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            problems.add(
                format!("{path}.brokers[{i}]"),
                format!("{b:?} is not host:port"),
            );
        }
    }
    let scope = TemplateScope {
        wildcards: MAX_LEVELS,
        client_id: false,
    };
    let topic = match Template::parse_text(&s.topic, &scope) {
        Ok(t) => {
            if !s.topic.contains('{') && !valid_topic_name(&s.topic) {
                problems.add(
                    format!("{path}.topic"),
                    "a Kafka topic is 1 to 249 of the characters a-z A-Z 0-9 . _ -".into(),
                );
            }
            Some(t)
        }
        Err(e) => {
            problems.add(format!("{path}.topic"), e.to_string());
            None
        }
    };
    let key = match Template::parse_text(s.key.as_deref().unwrap_or("{topic}"), &scope) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.add(format!("{path}.key"), e.to_string());
            None
        }
    };
    let mut properties: BTreeMap<String, String> = DEFAULT_PROPERTIES
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in &s.properties {
        if RESERVED.contains(&k.as_str()) {
            problems.add(
                format!("{path}.properties.{k}"),
                "set by edgebridge from `brokers`".into(),
            );
        }
        properties.insert(k.clone(), v.clone());
    }
    properties.insert("bootstrap.servers".into(), s.brokers.join(","));
    // librdkafka checks names and values: build a configuration now so that a typo is a
    // config error with its key path, not a sink that never starts.
    let mut probe = rdkafka::ClientConfig::new();
    for (k, v) in &properties {
        probe.set(k, v);
    }
    if let Err(e) = probe.create_native_config() {
        let (key, message) = match &e {
            rdkafka::error::KafkaError::ClientConfig(_, description, key, _) => {
                (key.clone(), description.clone())
            }
            other => (String::new(), other.to_string()),
        };
        let at = if key.is_empty() {
            format!("{path}.properties")
        } else {
            format!("{path}.properties.{key}")
        };
        problems.add(at, message);
    }
    if s.inflight == 0 || s.inflight > 1_000_000 {
        problems.add(
            format!("{path}.inflight"),
            "must be between 1 and 1000000".into(),
        );
    }
    crate::sinks::check_backoff(path, s.backoff_min, s.backoff_max, &mut problems.reporter());
    if !problems.none() {
        return None;
    }
    Some(KafkaPlan {
        gateway_id: gateway_id.to_string(),
        brokers: s.brokers.clone(),
        topic: topic?,
        key: key?,
        format: s.format,
        property_headers: s.property_headers.then(|| s.property_header_prefix.clone()),
        properties,
        inflight: s.inflight,
        backoff_min: s.backoff_min.0,
        backoff_max: s.backoff_max.0,
    })
}

impl KafkaPlan {
    /// One line for `edgebridge check`: secret property values are masked.
    pub fn describe(&self) -> String {
        let props: Vec<String> = self
            .properties
            .iter()
            .filter(|(k, _)| k.as_str() != "bootstrap.servers")
            .map(|(k, v)| {
                if is_secret(k) {
                    format!("{k}=****")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        let property_headers = match &self.property_headers {
            Some(prefix) => format!("user properties as headers {prefix:?}+key"),
            None => "no property headers".into(),
        };
        format!(
            "{} topic={} key={} format={} {property_headers} inflight={} [{}]",
            self.brokers.join(","),
            self.topic.source(),
            self.key.source(),
            spelled(&self.format),
            self.inflight,
            props.join(" ")
        )
    }
}
