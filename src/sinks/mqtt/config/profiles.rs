//! What the cloud profiles (`profile = "aws-iot"`, `"azure-iot-hub"`) check and set in
//! an MQTT sink's config: what each cloud accepts, the identity and credentials it
//! needs, and the notes `check` prints about them.

use std::time::Duration;

use super::{MqttSinkSection, TlsPlan};
use crate::problems::Problems;
use crate::sinks::cloud::{self, AzureEvents, AzureSas, SharedAccessKey};

/// Azure IoT Hub's keys set on a sink of another profile.
pub(super) fn azure_keys_unused(path: &str, m: &MqttSinkSection, problems: &mut Problems<'_>) {
    let azure_keys = [
        ("hub", m.hub.is_some()),
        ("device_id", m.device_id.is_some()),
        ("shared_access_key", m.shared_access_key.is_some()),
        ("properties", !m.properties.is_empty()),
    ];
    for (key, set) in azure_keys {
        if set {
            problems.add(
                format!("{path}.{key}"),
                "only used with profile = \"azure-iot-hub\"".into(),
            );
        }
    }
}

/// Profile `aws-iot`: what AWS IoT Core takes (TLS with the thing's certificate, ALPN
/// on port 443, QoS 0 and 1, keep alive 30s..1200s), with the notes `check` prints.
pub(super) fn aws(
    path: &str,
    m: &MqttSinkSection,
    (tls, secure, port): (Option<&mut TlsPlan>, bool, u16),
    notes: &mut Vec<String>,
    problems: &mut Problems<'_>,
) {
    let tls = tls.filter(|_| secure);
    match tls {
        None => {
            problems.add(
                format!("{path}.url"),
                "AWS IoT Core takes MQTT over TLS only; use mqtts://".into(),
            );
        }
        Some(tls) => {
            if tls.client_auth.is_none() && m.username.is_none() {
                problems.add(
                    format!("{path}.tls"),
                    "profile \"aws-iot\" needs the thing's certificate: set tls.cert and tls.key"
                        .into(),
                );
            }
            if port == 443 {
                if tls.alpn.is_empty() {
                    tls.alpn.push(cloud::AWS_ALPN_443.into());
                    notes.push(format!(
                        "port 443: offers ALPN {} (AWS IoT Core takes MQTT on 443 only with it)",
                        cloud::AWS_ALPN_443
                    ));
                } else {
                    notes.push(format!(
                        "port 443: offers ALPN {:?} as configured",
                        tls.alpn
                    ));
                }
            } else {
                notes.push(format!(
                    "port {port}: MQTT over mutual TLS (8883 by default; 443 adds ALPN {})",
                    cloud::AWS_ALPN_443
                ));
            }
        }
    }
    if m.qos == 2 {
        problems.add(
            format!("{path}.qos"),
            "AWS IoT Core does not support QoS 2; use 0 or 1".into(),
        );
    } else {
        notes.push(format!("qos {} (AWS IoT Core supports 0 and 1)", m.qos));
    }
    let (min, max) = cloud::AWS_KEEP_ALIVE;
    if m.keep_alive.0 < min || m.keep_alive.0 > max {
        problems.add(
            format!("{path}.keep_alive"),
            "AWS IoT Core accepts 30s to 1200s".into(),
        );
    } else {
        notes.push(format!(
            "keep_alive {} (AWS IoT Core accepts 30s to 1200s)",
            humantime::format_duration(m.keep_alive.0)
        ));
    }
    notes.push(
        "client id: one connection per id (a second one takes it over); a close right \
         after CONNACK is logged as a duplicate id or a policy refusal"
            .into(),
    );
    notes.push(format!(
        "payloads over {} KiB are dead-lettered (reason too_large) instead of being sent",
        cloud::AWS_MAX_PAYLOAD / 1024
    ));
    notes.push(format!(
        "topics: at most {} bytes and {} slashes, no $aws prefix (Basic Ingest $aws/rules/ \
         allowed); rule templates checked now, every topic again before it is sent \
         (dead-lettered, reason invalid_topic)",
        cloud::AWS_MAX_TOPIC_BYTES,
        cloud::AWS_MAX_TOPIC_SLASHES
    ));
}

/// What profile `azure-iot-hub` sets: the device's client id and username, a SAS token
/// (or a client certificate), its topics and properties, and what IoT Hub takes.
pub(super) fn azure(
    path: &str,
    m: &MqttSinkSection,
    (tls, secure): (Option<&TlsPlan>, bool),
    out: &mut Profiled,
    problems: &mut Problems<'_>,
) {
    let hub = m.hub.clone().unwrap_or_default();
    if hub.is_empty() || hub.contains(['/', ':']) {
        problems.add(
            format!("{path}.hub"),
            "must be the hub's host name ({name}.azure-devices.net)".into(),
        );
    }
    let device_id = m.device_id.clone().unwrap_or_default();
    if device_id.is_empty() || device_id.contains(['/', '+', '#', '&', '=']) {
        problems.add(
            format!("{path}.device_id"),
            "required; the device identity in the hub (no / + # & =)".into(),
        );
    }
    if m.client_id.as_ref().is_some_and(|c| *c != device_id) {
        problems.add(
            format!("{path}.client_id"),
            "Azure IoT Hub requires the device_id as client id; leave it out".into(),
        );
    }
    if m.username.is_some() || m.password.is_some() {
        problems.add(
            format!("{path}.username"),
            "set by profile \"azure-iot-hub\"; leave username and password out".into(),
        );
    }
    out.client_id_template = device_id.clone();
    out.username = Some(cloud::azure_username(&hub, &device_id));
    out.notes.push(format!(
        "client id {device_id}, username {}",
        cloud::azure_username(&hub, &device_id)
    ));
    let client_cert = tls.is_some_and(|t| t.client_auth.is_some());
    azure_auth(path, m, (&hub, &device_id, client_cert), out, problems);
    if m.qos == 2 {
        problems.add(
            format!("{path}.qos"),
            "Azure IoT Hub does not support QoS 2; use 0 or 1".into(),
        );
    } else {
        out.notes
            .push(format!("qos {} (Azure IoT Hub supports 0 and 1)", m.qos));
    }
    if m.keep_alive.0 > cloud::AZURE_MAX_KEEP_ALIVE {
        problems.add(
            format!("{path}.keep_alive"),
            "Azure IoT Hub needs at most 1177s".into(),
        );
    } else {
        out.notes.push(format!(
            "keep_alive {} (Azure IoT Hub needs at most 1177s)",
            humantime::format_duration(m.keep_alive.0)
        ));
    }
    if m.topic_property.is_empty() {
        problems.add(format!("{path}.topic_property"), "must not be empty".into());
    }
    let events = AzureEvents::new(&device_id, &m.topic_property, &m.properties);
    out.notes.push(format!(
        "topic: every message to {} with its MQTT topic as property {:?}{}",
        events.prefix,
        m.topic_property,
        if m.properties.is_empty() {
            String::new()
        } else {
            format!(
                " and {}",
                m.properties.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        }
    ));
    out.azure_events = Some(events);
    out.notes.push(format!(
        "payloads over {} KiB are dead-lettered (reason too_large) instead of being sent",
        cloud::AZURE_MAX_PAYLOAD / 1024
    ));
    if !secure {
        out.notes.push(
            "url is plain mqtt://: only for a local stand-in; Azure IoT Hub takes TLS only".into(),
        );
    }
}

/// How a sink of profile `azure-iot-hub` authenticates: a SAS token made from
/// `shared_access_key`, or the client certificate; one of them.
fn azure_auth(
    path: &str,
    m: &MqttSinkSection,
    (hub, device_id, client_cert): (&str, &str, bool),
    out: &mut Profiled,
    problems: &mut Problems<'_>,
) {
    match (&m.shared_access_key, client_cert) {
        (Some(key), false) => match SharedAccessKey::from_base64(key) {
            Ok(key) => {
                let ttl = m.sas_ttl.0;
                if ttl < Duration::from_secs(2) || ttl > Duration::from_secs(365 * 86400) {
                    problems.add(
                        format!("{path}.sas_ttl"),
                        "must be between 2s and 365d".into(),
                    );
                }
                let resource = format!("{hub}/devices/{device_id}");
                out.notes.push(format!(
                    "password: a SAS token for {resource} from shared_access_key (****), \
                     valid {}, renewed {} before it expires by reconnecting (unconfirmed \
                     messages are resent)",
                    humantime::format_duration(ttl),
                    humantime::format_duration(cloud::renewal_margin(ttl))
                ));
                out.sas = Some(AzureSas { resource, key, ttl });
            }
            Err(e) => {
                problems.add(format!("{path}.shared_access_key"), e);
            }
        },
        (None, true) => out
            .notes
            .push("authentication: X.509 client certificate".into()),
        (Some(_), true) => {
            problems.add(
                format!("{path}.shared_access_key"),
                "set together with tls.cert/tls.key; use one".into(),
            );
        }
        (None, false) => {
            problems.add(
                format!("{path}.shared_access_key"),
                "missing: profile \"azure-iot-hub\" needs shared_access_key or tls.cert and tls.key"
                    .into(),
            );
        }
    }
}

/// What a profile sets in a sink's plan beside its own keys.
pub(super) struct Profiled {
    pub(super) username: Option<String>,
    pub(super) client_id_template: String,
    pub(super) notes: Vec<String>,
    pub(super) sas: Option<AzureSas>,
    pub(super) azure_events: Option<AzureEvents>,
}
