//! An MQTT sink's config: the `[sinks.<name>]` section of `type = "mqtt"`, its validation
//! (every problem with its key path) and the validated [`MqttPlan`] the sink runs from.

mod profiles;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::buffer::BufferSection;
use crate::problems::Problems;
use crate::rules::{Template, TemplateScope};
use crate::sinks::check_backoff;
use crate::sinks::cloud::{AzureEvents, AzureSas, CloudProfile};
use crate::sinks::failover::{self, Endpoint};
use crate::sinks::pacing::RateSection;
use crate::sinks::pack::{PackPlan, PackSection, PayloadLimit};
use crate::units::{ByteSize, HumanDuration};

/// An MQTT sink's `url`: one URL as a string, or a list of them for failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlList {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for UrlList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UrlList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a URL or a list of URLs")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<UrlList, E> {
                Ok(UrlList::One(s.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<UrlList, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    urls.push(url);
                }
                Ok(UrlList::Many(urls))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for UrlList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UrlList::One(url) => s.serialize_str(url),
            UrlList::Many(urls) => urls.serialize(s),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkSection {
    /// `mqtt://host:port` or `mqtts://host:port`, or a list of them: the first is the
    /// primary, the others are failed over to in turn (see `sinks::failover`). Required,
    /// except with the `azure-iot-hub` profile, where it defaults to `mqtts://{hub}:8883`.
    #[serde(default)]
    pub url: Option<UrlList>,
    /// With a list of urls: connection attempts in a row that fail before the sink moves
    /// to the next endpoint (default 3).
    #[serde(default)]
    pub failover_after: Option<u32>,
    /// With a list of urls: how often the first endpoint is checked while the sink uses
    /// another one (an MQTT connect with the sink's TLS and credentials; default 30s).
    #[serde(default)]
    pub failback_check: Option<HumanDuration>,
    /// `aws-iot` or `azure-iot-hub`: applies that cloud's rules (see `sinks::cloud`).
    #[serde(default)]
    pub profile: Option<CloudProfile>,
    /// `"5"` or `"3.1.1"`; default 5, except 3.1.1 with the `azure-iot-hub` profile.
    #[serde(default)]
    pub protocol: Option<MqttProtocol>,
    /// Azure IoT Hub: the hub's host name (`{name}.azure-devices.net`).
    #[serde(default)]
    pub hub: Option<String>,
    /// Azure IoT Hub: the device identity the gateway connects as.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Azure IoT Hub: the device's shared access key (base64), from which edgebridge
    /// makes SAS tokens. Keep it in the environment: `"${AZURE_DEVICE_KEY}"`.
    #[serde(default)]
    pub shared_access_key: Option<String>,
    /// Azure IoT Hub: lifetime of each SAS token; renewed a quarter of it (at most 5
    /// minutes) before it expires.
    #[serde(default = "default_sas_ttl")]
    pub sas_ttl: HumanDuration,
    /// Azure IoT Hub: name of the message property that carries the MQTT topic.
    #[serde(default = "default_topic_property")]
    pub topic_property: String,
    /// Azure IoT Hub: fixed message properties added to every message
    /// (e.g. `{ "$.ct" = "application/json", "$.ce" = "utf-8", site = "plant9" }`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Template; default `{gateway_id}`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsSection>,
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Keep the device's retain flag upstream (false: never publish retained).
    #[serde(default = "default_true")]
    pub forward_retain: bool,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// Half-open detection: with publishes awaiting their PUBACK, none arriving for this
    /// long marks the upstream down and reconnects.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: HumanDuration,
    #[serde(default = "default_true")]
    pub clean_session: bool,
    /// Largest packet sent or accepted; default fits a 128 KiB payload.
    #[serde(default = "default_upstream_packet_size")]
    pub max_packet_size: ByteSize,
    /// Publishes awaiting PUBACK at once.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    #[serde(default = "default_backoff_min")]
    pub backoff_min: HumanDuration,
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Upstream connections sharing the sink's messages: a count (client ids
    /// `{client_id}-1`, `-2`, …) or the list of client ids.
    #[serde(default)]
    pub connections: Option<Connections>,
    /// Pacing per connection; the `aws-iot` profile defaults it to AWS's limits.
    #[serde(default)]
    pub rate: Option<RateSection>,
    /// Combine messages of one upstream topic into one publish (`sinks::pack`).
    #[serde(default)]
    pub pack: Option<PackSection>,
    #[serde(default)]
    pub buffer: BufferSection,
}

/// The MQTT version an MQTT sink speaks upstream (`protocol = "5" | "3.1.1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MqttProtocol {
    /// MQTT 5: message properties travel upstream, PUBACKs carry reason codes.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1: message properties are dropped (`check` warns).
    #[serde(rename = "3.1.1")]
    V311,
}

/// `"5"` and `"3.1.1"`, and `5` written as a number (`protocol = 5`, or
/// `EDGEBRIDGE_SINKS__CLOUD__PROTOCOL=5`, which the environment provider reads as one).
impl<'de> Deserialize<'de> for MqttProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MqttProtocol;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"5\" or \"3.1.1\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MqttProtocol, E> {
                match v {
                    "5" | "5.0" => Ok(MqttProtocol::V5),
                    "3.1.1" => Ok(MqttProtocol::V311),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MqttProtocol, E> {
                match v {
                    5 => Ok(MqttProtocol::V5),
                    other => Err(E::invalid_value(
                        serde::de::Unexpected::Unsigned(other),
                        &self,
                    )),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MqttProtocol, E> {
                match v {
                    5 => Ok(MqttProtocol::V5),
                    other => Err(E::invalid_value(
                        serde::de::Unexpected::Signed(other),
                        &self,
                    )),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<MqttProtocol, E> {
                if v == 5.0 {
                    Ok(MqttProtocol::V5)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl MqttProtocol {
    pub fn name(self) -> &'static str {
        match self {
            MqttProtocol::V5 => "5",
            MqttProtocol::V311 => "3.1.1",
        }
    }
}

/// `connections = 3` or `connections = ["plant-a-1", "plant-a-2"]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a number of connections, or a list of client ids"
)]
pub enum Connections {
    Count(u16),
    ClientIds(Vec<String>),
}

/// Most upstream connections one MQTT sink may open.
const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA bundle that signs the server; absent = the system's roots are not loaded, so
    /// set it (AWS: AmazonRootCA1.pem).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub alpn: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct MqttPlan {
    /// The endpoint a connection goes to: as validated, the first of `endpoints` (the
    /// primary); the worker connects with a copy set to the endpoint in use
    /// ([`MqttPlan::at_endpoint`]).
    pub host: String,
    pub port: u16,
    /// Every endpoint of the `url` list, the primary first (one for a plain `url`).
    pub endpoints: Vec<Endpoint>,
    /// Failed connection attempts in a row before moving to the next endpoint.
    pub failover_after: u32,
    /// How often the primary is checked while another endpoint is in use.
    pub failback_check: Duration,
    pub tls: Option<TlsPlan>,
    pub client_id: String,
    /// One per upstream connection (`connections`); `[client_id]` for one.
    pub client_ids: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub qos: u8,
    pub forward_retain: bool,
    pub keep_alive: Duration,
    pub ack_timeout: Duration,
    pub clean_session: bool,
    pub max_packet_size: usize,
    pub inflight: u16,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A cloud profile in force, if any.
    pub profile: Option<CloudProfile>,
    /// The MQTT version spoken upstream (the profile's default unless set).
    pub protocol: MqttProtocol,
    /// Largest payload the upstream accepts; a larger message is dead-lettered.
    pub max_payload: Option<usize>,
    /// Azure IoT Hub with a shared access key: the password is a SAS token made per
    /// connection and renewed before it expires.
    pub sas: Option<AzureSas>,
    /// Azure IoT Hub: every message goes to the device's events topic, its own topic
    /// carried as a property.
    pub azure_events: Option<AzureEvents>,
    /// One line per profile decision, printed by `edgebridge check`.
    pub notes: Vec<String>,
    /// Messages of one upstream topic combined into one publish.
    pub pack: Option<PackPlan>,
}

impl MqttPlan {
    /// This plan with `host` and `port` set to endpoint `index` (the primary when out of
    /// range).
    pub fn at_endpoint(&self, index: usize) -> MqttPlan {
        let mut plan = self.clone();
        if let Some(e) = self.endpoints.get(index) {
            plan.host = e.host.clone();
            plan.port = e.port;
        }
        plan
    }
}

#[derive(Debug, Clone)]
pub struct TlsPlan {
    pub ca: Option<PathBuf>,
    pub client_auth: Option<(PathBuf, PathBuf)>,
    pub alpn: Vec<String>,
}

/// Host, port and whether it takes TLS, of one MQTT URL at `key`. Problems are
/// reported; `None` when it does not parse at all.
fn parse_mqtt_url(
    key: &str,
    url: &str,
    problems: &mut Problems<'_>,
) -> Option<(String, u16, bool)> {
    let u = match url::Url::parse(url) {
        Ok(u) => u,
        Err(e) => {
            problems.add(key.to_string(), format!("invalid URL ({e})"));
            return None;
        }
    };
    let secure = match u.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" | "tls" => true,
        other => {
            problems.add(
                key.to_string(),
                format!("scheme {other:?} is not supported; use mqtt:// or mqtts://"),
            );
            false
        }
    };
    let host = u.host_str().unwrap_or_default().to_string();
    if host.is_empty() {
        problems.add(key.to_string(), "has no host".into());
    }
    let port = u.port().unwrap_or(if secure { 8883 } else { 1883 });
    Some((host, port, secure))
}

/// Validates `[sinks.<name>]` of `type = "mqtt"` at key path `path`: every problem is
/// reported through `err` with its key path; `None` when there was one.
pub fn validate(
    path: &str,
    m: &MqttSinkSection,
    gateway_id: &str,
    err: &mut impl FnMut(String, String),
) -> Option<MqttPlan> {
    let mut problems = Problems::new(err);
    let azure = m.profile == Some(CloudProfile::AzureIotHub);
    if !azure {
        profiles::azure_keys_unused(path, m, &mut problems);
    }
    let (endpoints, secure) = endpoints(path, m, azure, &mut problems)?;
    let (host, port) = (endpoints[0].host.clone(), endpoints[0].port);
    let (failover_after, failback_check) =
        failover_settings(path, m, endpoints.len(), &mut problems);
    let mut tls = tls_plan(path, m, secure, &mut problems);
    if m.qos > 2 {
        problems.add(format!("{path}.qos"), "must be 0, 1 or 2".into());
    }
    let mut max_packet_size = m.max_packet_size.0 as usize;
    let max_payload = m.profile.map(|p| p.max_payload());
    let mut profiled = profiles::Profiled {
        username: m.username.clone(),
        client_id_template: m.client_id.clone().unwrap_or_else(|| "{gateway_id}".into()),
        notes: Vec::new(),
        sas: None,
        azure_events: None,
    };
    match m.profile {
        None => {}
        Some(CloudProfile::AwsIot) => profiles::aws(
            path,
            m,
            (tls.as_mut(), secure, port),
            &mut profiled.notes,
            &mut problems,
        ),
        Some(CloudProfile::AzureIotHub) => profiles::azure(
            path,
            m,
            (tls.as_ref(), secure),
            &mut profiled,
            &mut problems,
        ),
    }
    let profiles::Profiled {
        username,
        client_id_template,
        notes,
        sas,
        azure_events,
    } = profiled;
    if let Some(limit) = max_payload {
        // Room for the topic (with Azure's properties) and the framing.
        max_packet_size = max_packet_size.max(limit + 16 * 1024);
    }
    let pack = pack_plan(path, m, max_packet_size, max_payload, &mut problems);
    if m.keep_alive.0 < Duration::from_secs(5) || m.keep_alive.0 > Duration::from_secs(65535) {
        problems.add(
            format!("{path}.keep_alive"),
            "must be between 5s and 65535s".into(),
        );
    }
    if m.ack_timeout.0 < Duration::from_secs(1) {
        problems.add(format!("{path}.ack_timeout"), "must be at least 1s".into());
    }
    if m.inflight == 0 {
        problems.add(format!("{path}.inflight"), "must be at least 1".into());
    }
    check_backoff(path, m.backoff_min, m.backoff_max, &mut problems.reporter());
    if m.password.is_some() && m.username.is_none() {
        problems.add(format!("{path}.password"), "set without a username".into());
    }
    let client_id = match Template::parse(&client_id_template, &TemplateScope::default()) {
        Ok(t) => t.render_static(gateway_id),
        Err(e) => {
            problems.add(format!("{path}.client_id"), e.to_string());
            String::new()
        }
    };
    let client_ids = client_ids(path, m, &client_id, (azure, endpoints.len()), &mut problems);
    let protocol = protocol(path, m, &mut problems);
    if !problems.none() {
        return None;
    }
    Some(MqttPlan {
        host,
        port,
        endpoints,
        failover_after,
        failback_check,
        tls,
        client_id,
        client_ids,
        username,
        password: m.password.clone(),
        qos: m.qos,
        forward_retain: m.forward_retain,
        keep_alive: m.keep_alive.0,
        ack_timeout: m.ack_timeout.0,
        clean_session: m.clean_session,
        max_packet_size,
        inflight: m.inflight,
        backoff_min: m.backoff_min.0,
        backoff_max: m.backoff_max.0,
        profile: m.profile,
        protocol,
        max_payload,
        sas,
        azure_events,
        notes,
        pack,
    })
}

/// The endpoints of `url` (one URL or a list; Azure's from `hub`), and whether they take
/// TLS (all of them alike). `None` once a problem is reported.
fn endpoints(
    path: &str,
    m: &MqttSinkSection,
    azure: bool,
    problems: &mut Problems<'_>,
) -> Option<(Vec<Endpoint>, bool)> {
    // (key path, URL) of every endpoint: `url` for a single one, `url[i]` in a list.
    let urls: Vec<(String, String)> = match (&m.url, &m.hub) {
        (Some(UrlList::One(url)), _) => vec![(format!("{path}.url"), url.clone())],
        (Some(UrlList::Many(urls)), _) if urls.is_empty() => {
            problems.add(
                format!("{path}.url"),
                "empty list; give at least one mqtt:// or mqtts:// URL".into(),
            );
            return None;
        }
        (Some(UrlList::Many(urls)), _) => urls
            .iter()
            .enumerate()
            .map(|(i, url)| (format!("{path}.url[{i}]"), url.clone()))
            .collect(),
        (None, Some(hub)) if azure => vec![(format!("{path}.url"), format!("mqtts://{hub}:8883"))],
        (None, None) if azure => {
            problems.add(
                format!("{path}.hub"),
                "missing (required by profile \"azure-iot-hub\": {name}.azure-devices.net)".into(),
            );
            return None;
        }
        _ => {
            problems.add(format!("{path}.url"), "missing (required)".into());
            return None;
        }
    };
    let mut endpoints: Vec<Endpoint> = Vec::new();
    // Whether the endpoints take TLS, from the first URL that parses; every other one must
    // agree, since they share the sink's `tls` settings.
    let mut first_secure: Option<(bool, String)> = None;
    let mut unparsed = false;
    for (key, url) in &urls {
        let Some((host, port, secure)) = parse_mqtt_url(key, url, problems) else {
            unparsed = true;
            continue;
        };
        let family = |secure: bool| if secure { "mqtts://" } else { "mqtt://" };
        match &first_secure {
            None => first_secure = Some((secure, key.clone())),
            Some((first, first_key)) if *first != secure => {
                let first_key = first_key.rsplit('.').next().unwrap_or_default();
                problems.add(
                    key.clone(),
                    format!(
                        "{} while {first_key} is {}; every endpoint shares the sink's tls \
                         settings, so use one scheme family",
                        family(secure),
                        family(*first)
                    ),
                );
            }
            Some(_) => {}
        }
        let endpoint = Endpoint { host, port };
        if endpoints.contains(&endpoint) {
            problems.add(key.clone(), format!("{endpoint} is listed twice"));
            continue;
        }
        endpoints.push(endpoint);
    }
    if unparsed || endpoints.is_empty() {
        return None;
    }
    let secure = first_secure.is_some_and(|(secure, _)| secure);
    Some((endpoints, secure))
}

/// `failover_after` and `failback_check` (only with a list of `endpoints`).
fn failover_settings(
    path: &str,
    m: &MqttSinkSection,
    endpoints: usize,
    problems: &mut Problems<'_>,
) -> (u32, Duration) {
    let failover_keys = [
        ("failover_after", m.failover_after.is_some()),
        ("failback_check", m.failback_check.is_some()),
    ];
    if endpoints == 1 {
        for (key, set) in failover_keys {
            if set {
                problems.add(
                    format!("{path}.{key}"),
                    "only used when url is a list of endpoints".into(),
                );
            }
        }
    }
    let failover_after = m.failover_after.unwrap_or(failover::DEFAULT_FAILOVER_AFTER);
    if failover_after == 0 {
        problems.add(
            format!("{path}.failover_after"),
            "must be at least 1".into(),
        );
    }
    let failback_check = m
        .failback_check
        .map_or(failover::DEFAULT_FAILBACK_CHECK, |d| d.0);
    if failback_check < failover::MIN_FAILBACK_CHECK {
        problems.add(
            format!("{path}.failback_check"),
            format!(
                "must be at least {}",
                humantime::format_duration(failover::MIN_FAILBACK_CHECK)
            ),
        );
    }
    (failover_after, failback_check)
}

/// The TLS settings of an `mqtts://` sink (a CA is required); `None` for `mqtt://`.
fn tls_plan(
    path: &str,
    m: &MqttSinkSection,
    secure: bool,
    problems: &mut Problems<'_>,
) -> Option<TlsPlan> {
    let tls = match (&m.tls, secure) {
        (Some(_), false) => {
            problems.add(
                format!("{path}.tls"),
                "set, but the url is not mqtts://".into(),
            );
            None
        }
        (None, true) => Some(TlsPlan {
            ca: None,
            client_auth: None,
            alpn: Vec::new(),
        }),
        (None, false) => None,
        (Some(t), true) => {
            for (key, file) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
                if let Some(file) = file {
                    if !file.is_file() {
                        problems.add(
                            format!("{path}.tls.{key}"),
                            format!("file {} not found", file.display()),
                        );
                    }
                }
            }
            let client_auth = match (&t.cert, &t.key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                (None, None) => None,
                _ => {
                    problems.add(
                        format!("{path}.tls"),
                        "cert and key must be given together".into(),
                    );
                    None
                }
            };
            Some(TlsPlan {
                ca: t.ca.clone(),
                client_auth,
                alpn: t.alpn.clone(),
            })
        }
    };
    if let Some(t) = &tls {
        if t.ca.is_none() {
            problems.add(
                format!("{path}.tls.ca"),
                "required for mqtts:// (the CA that signs the upstream's certificate)".into(),
            );
        }
    }
    tls
}

/// `pack`: each pack is the payload of one upstream message, so it must fit the
/// profile's payload limit and the packet.
fn pack_plan(
    path: &str,
    m: &MqttSinkSection,
    max_packet_size: usize,
    max_payload: Option<usize>,
    problems: &mut Problems<'_>,
) -> Option<PackPlan> {
    match &m.pack {
        Some(section) => {
            // The pack is the payload: it must fit the profile's payload limit and the
            // packet next to the MQTT framing (the topic's length is left to the sink).
            let framing = crate::sinks::mqtt::PUBLISH_OVERHEAD;
            let packet = max_packet_size.saturating_sub(framing);
            let limit = match max_payload {
                Some(l) if l <= packet => PayloadLimit {
                    bytes: l,
                    why: format!(
                        "profile {}'s payload limit",
                        m.profile.map_or("", |p| p.name())
                    ),
                },
                _ => PayloadLimit {
                    bytes: packet,
                    why: format!(
                        "max_packet_size {max_packet_size} minus {framing} bytes of MQTT framing"
                    ),
                },
            };
            let plan = crate::sinks::pack::validate(
                &format!("{path}.pack"),
                section,
                Some(&limit),
                &mut problems.reporter(),
            );
            plan
        }
        None => None,
    }
}

/// The client id of each upstream connection (`connections`: a count or a list).
fn client_ids(
    path: &str,
    m: &MqttSinkSection,
    client_id: &str,
    (azure, endpoints): (bool, usize),
    problems: &mut Problems<'_>,
) -> Vec<String> {
    let client_ids = match &m.connections {
        None | Some(Connections::Count(1)) => vec![client_id.to_string()],
        Some(Connections::Count(n)) => (1..=*n).map(|i| format!("{client_id}-{i}")).collect(),
        Some(Connections::ClientIds(ids)) => ids.clone(),
    };
    let connections_problem = if client_ids.is_empty() || client_ids.len() > MAX_CONNECTIONS {
        Some(format!(
            "must be between 1 and {MAX_CONNECTIONS} connections"
        ))
    } else if client_ids.len() > 1 && azure {
        Some("Azure IoT Hub allows one connection per device identity".to_string())
    } else if client_ids.len() > 1 && endpoints > 1 {
        Some(
            "several connections with a url list (failover) are not supported: use one of them"
                .to_string(),
        )
    } else if client_ids.iter().any(|c| c.is_empty()) {
        Some("a client id must not be empty".to_string())
    } else if client_ids.iter().collect::<HashSet<_>>().len() != client_ids.len() {
        Some(
            "client ids must differ: an upstream closes one of two connections with the same id"
                .to_string(),
        )
    } else {
        None
    };
    if let Some(problem) = connections_problem {
        problems.add(format!("{path}.connections"), problem);
    }
    client_ids
}

/// The MQTT version spoken upstream: the sink's `protocol`, else its profile's.
fn protocol(path: &str, m: &MqttSinkSection, problems: &mut Problems<'_>) -> MqttProtocol {
    // AWS IoT Core and plain brokers (Mosquitto 2, HiveMQ, EMQX) speak MQTT 5; Azure IoT
    // Hub's device endpoint speaks 3.1.1 (its MQTT 5 support is a preview on another API
    // version, with the message properties carried differently).
    match (m.protocol, m.profile) {
        (Some(MqttProtocol::V5), Some(CloudProfile::AzureIotHub)) => {
            problems.add(
                format!("{path}.protocol"),
                "Azure IoT Hub's device endpoint speaks MQTT 3.1.1; leave protocol out or set \"3.1.1\""
                    .into(),
            );
            MqttProtocol::V311
        }
        (Some(p), _) => p,
        (None, Some(CloudProfile::AzureIotHub)) => MqttProtocol::V311,
        (None, _) => MqttProtocol::V5,
    }
}

fn default_ack_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_backoff_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}
fn default_inflight() -> u16 {
    100
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_sas_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn default_topic_property() -> String {
    "topic".into()
}
fn default_upstream_packet_size() -> ByteSize {
    ByteSize(256 * 1024)
}
fn default_qos() -> u8 {
    1
}
fn default_true() -> bool {
    true
}
