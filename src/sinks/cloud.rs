//! Cloud profiles of the MQTT sink: what AWS IoT Core and Azure IoT Hub require of a
//! client, so that `profile = "aws-iot"` or `profile = "azure-iot-hub"` is enough config.
//!
//! Input: the sink's section, read by `config::validate_mqtt`, which calls the pure
//! checks here and records every decision it takes as a note for `edgebridge check`.
//! Output: the limits and credentials the MQTT sink applies when it connects and sends:
//! the payload limit (a larger message is dead-lettered instead of making the cloud close
//! the connection again and again), AWS's topic rules and per-connection rate (the
//! default `rate` of an `aws-iot` sink), Azure's SAS token (generated per
//! connection, renewed before it expires) and Azure's fixed device-to-cloud topic with the
//! MQTT topic carried as a message property.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

use super::pacing::Rate;

/// A hyperscaler's MQTT endpoint with fixed rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloudProfile {
    AwsIot,
    AzureIotHub,
}

impl CloudProfile {
    pub fn name(self) -> &'static str {
        match self {
            CloudProfile::AwsIot => "aws-iot",
            CloudProfile::AzureIotHub => "azure-iot-hub",
        }
    }

    /// The largest payload the cloud accepts; it closes the connection on a larger one.
    pub fn max_payload(self) -> usize {
        match self {
            CloudProfile::AwsIot => AWS_MAX_PAYLOAD,
            CloudProfile::AzureIotHub => AZURE_MAX_PAYLOAD,
        }
    }

    /// The pacing a sink gets when it sets no `rate`: the cloud's per-connection limits,
    /// above which it throttles or closes the connection.
    pub fn default_rate(self) -> Option<Rate> {
        match self {
            CloudProfile::AwsIot => Some(Rate {
                messages: Some(AWS_MAX_PUBLISH_PER_SECOND),
                bytes: Some(AWS_MAX_BYTES_PER_SECOND),
            }),
            CloudProfile::AzureIotHub => None,
        }
    }

    /// What it usually means when the cloud closes the connection right after CONNACK.
    pub fn closed_after_connack_hint(self) -> &'static str {
        match self {
            CloudProfile::AwsIot => {
                "AWS IoT Core closed the connection right after accepting it: usually another \
                 client connected with the same client id, or the certificate's policy does \
                 not allow iot:Connect for this client id or iot:Publish on this topic"
            }
            CloudProfile::AzureIotHub => {
                "Azure IoT Hub closed the connection right after accepting it: usually another \
                 client connected as the same device, or the device is disabled"
            }
        }
    }
}

/// AWS IoT Core: largest message payload.
pub const AWS_MAX_PAYLOAD: usize = 128 * 1024;
/// AWS IoT Core: PUBLISH requests per second per connection (not adjustable).
pub const AWS_MAX_PUBLISH_PER_SECOND: u32 = 100;
/// AWS IoT Core: inbound bytes per second per connection (not adjustable).
pub const AWS_MAX_BYTES_PER_SECOND: u64 = 512 * 1024;
/// AWS IoT Core: largest topic name, in bytes.
pub const AWS_MAX_TOPIC_BYTES: usize = 256;
/// AWS IoT Core: most forward slashes in a topic name.
pub const AWS_MAX_TOPIC_SLASHES: usize = 7;
/// AWS IoT Core: keep-alive it accepts.
pub const AWS_KEEP_ALIVE: (Duration, Duration) =
    (Duration::from_secs(30), Duration::from_secs(1200));
/// AWS IoT Core: the ALPN protocol that lets MQTT use port 443.
pub const AWS_ALPN_443: &str = "x-amzn-mqtt-ca";
/// Azure IoT Hub: largest device-to-cloud message.
pub const AZURE_MAX_PAYLOAD: usize = 256 * 1024;
/// Azure IoT Hub: the MQTT API version in the username.
pub const AZURE_API_VERSION: &str = "2021-04-12";
/// Azure IoT Hub: keep-alive must stay below 1177 s (its idle timeout is 1.5× of it, at
/// most 29.45 minutes).
pub const AZURE_MAX_KEEP_ALIVE: Duration = Duration::from_secs(1177);

/// Basic Ingest topics (`$aws/rules/<rule>/...`) are the one `$aws` prefix a client may
/// publish to; AWS does not count that prefix against the topic limits.
const AWS_BASIC_INGEST: &str = "$aws/rules/";

/// Why AWS IoT Core would refuse `topic`, if it would.
pub fn aws_topic_problem(topic: &str) -> Option<String> {
    let counted = match topic.strip_prefix(AWS_BASIC_INGEST) {
        // `$aws/rules/<rule name>/` is not counted; the rest is.
        Some(rest) => match rest.split_once('/') {
            Some((rule, rest)) if !rule.is_empty() => rest,
            _ => return Some("a Basic Ingest topic is $aws/rules/<rule name>/<topic>".into()),
        },
        None if topic.starts_with("$aws") => {
            return Some(
                "starts with the reserved prefix $aws (only Basic Ingest $aws/rules/... may be published to)"
                    .into(),
            )
        }
        None => topic,
    };
    aws_topic_size_problem(counted.len(), counted.matches('/').count())
}

/// Checks a topic's byte length and forward-slash count against AWS's limits.
pub fn aws_topic_size_problem(bytes: usize, slashes: usize) -> Option<String> {
    if bytes > AWS_MAX_TOPIC_BYTES {
        Some(format!(
            "{bytes} bytes long; AWS IoT Core allows at most {AWS_MAX_TOPIC_BYTES}"
        ))
    } else if slashes > AWS_MAX_TOPIC_SLASHES {
        Some(format!(
            "has {slashes} forward slashes; AWS IoT Core allows at most {AWS_MAX_TOPIC_SLASHES}"
        ))
    } else {
        None
    }
}

/// A shared access key, decoded; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedAccessKey(Vec<u8>);

impl SharedAccessKey {
    /// Decodes the base64 key as the Azure portal shows it.
    pub fn from_base64(key: &str) -> Result<Self, String> {
        base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map(SharedAccessKey)
            .map_err(|_| "not valid base64 (copy the device's primary key as shown)".to_string())
    }
}

impl fmt::Debug for SharedAccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedAccessKey(****)")
    }
}

/// Characters Azure wants percent-encoded in a SAS token and in message properties:
/// everything but `A-Z a-z 0-9 - _ . ~` (as JavaScript's `encodeURIComponent` plus `!*'()`).
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Property names keep `$` so that system properties (`$.ct`, `$.ce`) are recognised.
const PROPERTY_NAME: &AsciiSet = &URL_COMPONENT.remove(b'$');

fn url_encode(s: &str) -> String {
    utf8_percent_encode(s, URL_COMPONENT).to_string()
}

/// `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}`, where the signature
/// is base64(HMAC-SHA256(key, "{url-encoded resource}\n{expiry}")), url-encoded.
pub fn sas_token(key: &SharedAccessKey, resource: &str, expiry: u64) -> String {
    let resource = url_encode(resource);
    let signing_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.0);
    let tag = ring::hmac::sign(&signing_key, format!("{resource}\n{expiry}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    format!(
        "SharedAccessSignature sr={resource}&sig={}&se={expiry}",
        url_encode(&signature)
    )
}

/// Azure IoT Hub credentials from a shared access key: a fresh SAS token per connection.
#[derive(Debug, Clone)]
pub struct AzureSas {
    /// `{hub}/devices/{device_id}`.
    pub resource: String,
    pub key: SharedAccessKey,
    /// Lifetime of each token (`sas_ttl`).
    pub ttl: Duration,
}

impl AzureSas {
    /// A token valid for `ttl` from now, its expiry (seconds since the Unix epoch) and
    /// how long from now to renew it: a quarter of its lifetime (at most 5 minutes)
    /// before it expires.
    pub fn fresh_token(&self) -> (String, u64, Duration) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // Round up, so that the token lives at least `ttl`.
        let expiry = now.as_secs() + 1 + self.ttl.as_secs().max(1);
        let lifetime = Duration::from_secs(expiry).saturating_sub(now);
        let renew_in = lifetime.saturating_sub(renewal_margin(self.ttl));
        (
            sas_token(&self.key, &self.resource, expiry),
            expiry,
            renew_in,
        )
    }
}

/// How long before a token expires it is renewed.
pub fn renewal_margin(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(300))
}

/// Azure IoT Hub's device-to-cloud topic with the message properties appended:
/// `devices/{device_id}/messages/events/{k}={v}&...`, keys and values url-encoded.
#[derive(Debug, Clone)]
pub struct AzureEvents {
    /// `devices/{device_id}/messages/events/`.
    pub prefix: String,
    /// Name of the property that carries the message's MQTT topic (`topic_property`).
    pub topic_property: String,
    /// The configured `properties`, already encoded as `&k=v&k2=v2` (or empty).
    pub fixed: String,
}

impl AzureEvents {
    pub fn new(
        device_id: &str,
        topic_property: &str,
        properties: &std::collections::BTreeMap<String, String>,
    ) -> Self {
        let fixed = properties
            .iter()
            .map(|(k, v)| {
                let name = utf8_percent_encode(k, PROPERTY_NAME);
                format!("&{name}={}", url_encode(v))
            })
            .collect();
        Self {
            prefix: format!("devices/{device_id}/messages/events/"),
            topic_property: url_encode(topic_property),
            fixed,
        }
    }

    /// The topic to publish a message that had `topic` on.
    pub fn topic_for(&self, topic: &str) -> String {
        format!(
            "{}{}={}{}",
            self.prefix,
            self.topic_property,
            url_encode(topic),
            self.fixed
        )
    }
}

/// Azure IoT Hub's MQTT username for a device.
pub fn azure_username(hub: &str, device_id: &str) -> String {
    format!("{hub}/{device_id}/?api-version={AZURE_API_VERSION}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected token was computed independently with Python's standard library
    /// (hmac, hashlib, base64, urllib.parse.quote(safe='')):
    /// key "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ==" ("secret-key-for-tests-only"),
    /// resource "myhub.azure-devices.net/devices/edge-01", expiry 1767225600.
    #[test]
    fn sas_token_matches_a_known_vector() {
        let key = SharedAccessKey::from_base64("c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ==")
            .expect("valid base64");
        let token = sas_token(&key, "myhub.azure-devices.net/devices/edge-01", 1767225600);
        assert_eq!(token, EXPECTED_TOKEN);
    }

    const EXPECTED_TOKEN: &str =
        "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fedge-01\
        &sig=UePTbgxaocw2vX0%2BSKSQ7x%2BBoQvc4fEtW5QNYBejUZQ%3D&se=1767225600";

    #[test]
    fn shared_access_key_is_never_printed() {
        let key = SharedAccessKey::from_base64("c2VjcmV0").expect("valid base64");
        assert_eq!(format!("{key:?}"), "SharedAccessKey(****)");
        assert!(SharedAccessKey::from_base64("not base64!").is_err());
    }

    #[test]
    fn fresh_tokens_expire_after_the_ttl_and_renew_before() {
        let sas = AzureSas {
            resource: "h/devices/d".into(),
            key: SharedAccessKey::from_base64("c2VjcmV0").expect("valid base64"),
            ttl: Duration::from_secs(3600),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let (token, expiry, renew_in) = sas.fresh_token();
        assert!(token.ends_with(&format!("&se={expiry}")), "{token}");
        assert!((now + 3600..=now + 3602).contains(&expiry));
        // 5 minutes before expiry (a quarter of an hour would be more).
        assert!(
            renew_in <= Duration::from_secs(3600 - 300 + 2),
            "{renew_in:?}"
        );
        assert!(
            renew_in >= Duration::from_secs(3600 - 300 - 2),
            "{renew_in:?}"
        );
        assert_eq!(
            renewal_margin(Duration::from_secs(4)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn aws_topic_rules() {
        assert_eq!(aws_topic_problem("dt/edge-01/line1/m7"), None);
        assert_eq!(aws_topic_problem("a/b/c/d/e/f/g/h"), None);
        assert!(
            aws_topic_problem("a/b/c/d/e/f/g/h/i").is_some_and(|p| p.contains("8 forward slashes"))
        );
        assert!(aws_topic_problem(&"x".repeat(257)).is_some_and(|p| p.contains("257 bytes")));
        assert_eq!(aws_topic_problem(&"x".repeat(256)), None);
        assert!(aws_topic_problem("$aws/things/t/shadow/update")
            .is_some_and(|p| p.contains("reserved prefix $aws")));
        // Basic Ingest: the `$aws/rules/<rule>/` prefix does not count.
        assert_eq!(aws_topic_problem("$aws/rules/ingest/a/b/c/d/e/f/g/h"), None);
        assert!(aws_topic_problem("$aws/rules/").is_some());
    }

    #[test]
    fn azure_topic_carries_the_mqtt_topic_as_a_property() {
        let mut props = std::collections::BTreeMap::new();
        props.insert("site".to_string(), "plant 9".to_string());
        props.insert("$.ct".to_string(), "application/json".to_string());
        let events = AzureEvents::new("edge-01", "topic", &props);
        assert_eq!(
            events.topic_for("dt/edge-01/line1"),
            "devices/edge-01/messages/events/topic=dt%2Fedge-01%2Fline1\
             &$.ct=application%2Fjson&site=plant%209"
        );
        assert_eq!(
            azure_username("h.azure-devices.net", "edge-01"),
            "h.azure-devices.net/edge-01/?api-version=2021-04-12"
        );
    }
}
