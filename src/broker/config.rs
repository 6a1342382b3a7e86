//! The device side's config sections: `[broker]` (router sizing and intake),
//! `[[listeners]]` and `[auth]`, with the validated listener and auth plans the broker
//! starts from, and their validation (every problem reported with its key path).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// TOML file of `username = "$argon2id$…"` (written by `edgebridge passwd`). Once set,
    /// devices without credentials are refused unless their listener has
    /// `allow_anonymous = true`.
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// Topic permissions; once any entry exists, whatever no entry grants is denied.
    #[serde(default)]
    pub acl: Vec<AclSection>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclSection {
    /// Applies to devices whose username matches (`*` globs). With several selectors,
    /// all must match; with none, the entry applies to every device.
    #[serde(default)]
    pub user: Option<String>,
    /// … whose client certificate identity (CN, or first SAN) matches.
    #[serde(default)]
    pub cn: Option<String>,
    /// … whose client id matches.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic filters the device may publish to; `{username}`, `{client_id}` and `{cn}`
    /// are filled in per device.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters the device may subscribe to (a subscription must be covered by one).
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// A device listener's TLS: with `client_ca`, client certificates are required.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Sizing of the embedded broker (rumqttd's router) and of intake.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// Size of one in-memory segment of rumqttd's per-topic log (local subscribers only).
    /// rumqttd's real memory use is about 5× this per segment.
    #[serde(default = "default_segment_size")]
    pub max_segment_size: ByteSize,
    /// Segments kept per topic before the oldest is dropped (for slow local subscribers).
    #[serde(default = "default_segment_count")]
    pub max_segment_count: usize,
    /// Messages queued between the broker and the rule engine.
    #[serde(default = "default_intake_queue")]
    pub intake_queue: usize,
    /// QoS 0 messages are shed (and counted) once the intake queue holds this many.
    #[serde(default = "default_qos0_high_water")]
    pub qos0_high_water: usize,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            max_segment_size: default_segment_size(),
            max_segment_count: default_segment_count(),
            intake_queue: default_intake_queue(),
            qos0_high_water: default_qos0_high_water(),
        }
    }
}

/// When a device's QoS 1/2 publish is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// PUBACK/PUBREC only once the message is in every matched sink's buffer.
    Durable,
    /// PUBACK as soon as the broker has read the message (rumqttd's own behaviour).
    Received,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: String,
    pub bind: String,
    #[serde(default = "default_ack")]
    pub ack: AckMode,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: ByteSize,
    /// QoS 1/2 publishes of one connection read but not yet acknowledged (the lower of
    /// this and the device's MQTT 5 receive maximum): the backpressure on a device.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// The longest keep alive an MQTT 5 device may use: one that asks for more (or for
    /// none) is told this one in CONNACK's server keep alive, and held to it.
    #[serde(default)]
    pub max_keep_alive: Option<HumanDuration>,
    /// Time a new connection has to finish its TLS/WebSocket handshake, and then to
    /// send CONNECT.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// TLS for this listener (`mqtts://`, or `wss://` with `websocket`).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// MQTT over WebSocket on path `/mqtt`.
    #[serde(default)]
    pub websocket: bool,
    /// Devices without username or client certificate: allowed by default only when no
    /// `auth.users_file` is set.
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
}

impl ListenerSection {
    /// A plain MQTT listener `name` on `bind` with every default (the default config's
    /// `devices` listener).
    pub fn plain(name: &str, bind: &str) -> ListenerSection {
        ListenerSection {
            name: name.into(),
            bind: bind.into(),
            ack: default_ack(),
            max_connections: default_max_connections(),
            max_packet_size: default_max_packet_size(),
            max_inflight: default_max_inflight(),
            max_keep_alive: None,
            connect_timeout: default_connect_timeout(),
            tls: None,
            websocket: false,
            allow_anonymous: None,
        }
    }
}

/// `[auth]`, validated. The users file is read when the broker starts (and on reload).
#[derive(Debug, Clone, Default)]
pub struct AuthPlan {
    pub users_file: Option<PathBuf>,
    pub acl: Vec<super::AclEntry>,
}

#[derive(Debug, Clone)]
pub struct ListenerPlan {
    pub name: String,
    pub bind: SocketAddr,
    pub ack: AckMode,
    pub max_connections: usize,
    pub max_packet_size: usize,
    pub max_inflight: u16,
    /// Seconds (see `ListenerSection::max_keep_alive`).
    pub max_keep_alive: Option<u16>,
    pub connect_timeout: Duration,
    pub tls: Option<ListenerTls>,
    pub websocket: bool,
    pub allow_anonymous: bool,
}

impl ListenerPlan {
    /// `mqtt`, `mqtts`, `ws` or `wss`.
    pub fn scheme(&self) -> &'static str {
        match (self.tls.is_some(), self.websocket) {
            (false, false) => "mqtt",
            (true, false) => "mqtts",
            (false, true) => "ws",
            (true, true) => "wss",
        }
    }
}

impl BrokerSection {
    /// Reports what the router and intake cannot run with.
    pub fn validate(&self, err: &mut impl FnMut(String, String)) {
        if self.intake_queue == 0 {
            err("broker.intake_queue".into(), "must be at least 1".into());
        }
        if self.qos0_high_water > self.intake_queue {
            err(
                "broker.qos0_high_water".into(),
                "must not exceed broker.intake_queue".into(),
            );
        }
        if self.max_segment_size.0 < 1024 || self.max_segment_count == 0 {
            err(
                "broker.max_segment_size".into(),
                "segments must be at least 1KiB and max_segment_count at least 1".into(),
            );
        }
    }
}

/// `[[listeners]]` into the plans the broker starts from; a listener whose address does
/// not parse is left out (its error reported). `anonymous_default`: whether a listener
/// without `allow_anonymous` takes devices without credentials.
pub fn validate_listeners(
    listeners: &[ListenerSection],
    anonymous_default: bool,
    err: &mut impl FnMut(String, String),
) -> Vec<ListenerPlan> {
    let mut plans = Vec::new();
    let mut listener_names = HashSet::new();
    if listeners.is_empty() {
        err(
            "listeners".into(),
            "at least one listener is required".into(),
        );
    }
    for (i, l) in listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        if l.name.is_empty() {
            err(format!("{path}.name"), "must not be empty".into());
        } else if !listener_names.insert(l.name.clone()) {
            err(
                format!("{path}.name"),
                format!("duplicate listener name {:?}", l.name),
            );
        }
        let bind = match l.bind.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                err(
                    format!("{path}.bind"),
                    format!("not a host:port address ({e})"),
                );
                None
            }
        };
        if l.max_connections == 0 {
            err(
                format!("{path}.max_connections"),
                "must be at least 1".into(),
            );
        }
        if l.max_packet_size.0 < 128 || l.max_packet_size.0 > 256 * 1024 * 1024 {
            err(
                format!("{path}.max_packet_size"),
                "must be between 128B and 256MiB".into(),
            );
        }
        if l.max_inflight == 0 {
            err(format!("{path}.max_inflight"), "must be at least 1".into());
        }
        let max_keep_alive = match l.max_keep_alive {
            None => None,
            Some(HumanDuration(d)) => match u16::try_from(d.as_secs()) {
                Ok(secs) if secs > 0 && d.subsec_nanos() == 0 => Some(secs),
                _ => {
                    err(
                        format!("{path}.max_keep_alive"),
                        "must be whole seconds between 1s and 65535s".into(),
                    );
                    None
                }
            },
        };
        if l.connect_timeout.0.is_zero() || l.connect_timeout.0 > Duration::from_secs(60) {
            err(
                format!("{path}.connect_timeout"),
                "must be between 1ms and 60s".into(),
            );
        }
        if let Some(tls) = &l.tls {
            let files = [("cert", Some(&tls.cert)), ("key", Some(&tls.key))];
            for (key, file) in files
                .into_iter()
                .chain([("client_ca", tls.client_ca.as_ref())])
            {
                if let Some(file) = file.filter(|f| !f.is_file()) {
                    err(
                        format!("{path}.tls.{key}"),
                        format!("file {} not found", file.display()),
                    );
                }
            }
        }
        if let Some(bind) = bind {
            plans.push(ListenerPlan {
                name: l.name.clone(),
                bind,
                ack: l.ack,
                max_connections: l.max_connections,
                max_packet_size: l.max_packet_size.0 as usize,
                max_inflight: l.max_inflight,
                max_keep_alive,
                connect_timeout: l.connect_timeout.0,
                tls: l.tls.clone(),
                websocket: l.websocket,
                allow_anonymous: l.allow_anonymous.unwrap_or(anonymous_default),
            });
        }
    }
    plans
}

impl AuthSection {
    /// `[auth]` into its plan: the users file must load, and each ACL entry must grant
    /// something, with patterns that parse.
    pub fn validate(&self, err: &mut impl FnMut(String, String)) -> AuthPlan {
        use super::{check_pattern, AclEntry, Glob, Users};
        if let Some(file) = &self.users_file {
            if let Err(e) = Users::load(file) {
                err("auth.users_file".into(), format!("{e:#}"));
            }
        }
        let mut acl = Vec::new();
        for (i, a) in self.acl.iter().enumerate() {
            let path = format!("auth.acl[{i}]");
            if a.publish.is_empty() && a.subscribe.is_empty() {
                err(
                    path.clone(),
                    "grants nothing: give publish and/or subscribe".into(),
                );
            }
            let trusts_username = a.user.is_some()
                || a.publish
                    .iter()
                    .chain(&a.subscribe)
                    .any(|p| p.contains("{username}"));
            if trusts_username && self.users_file.is_none() {
                err(
                    path.clone(),
                    "uses the username, which is only verified with auth.users_file set".into(),
                );
            }
            for (key, patterns) in [("publish", &a.publish), ("subscribe", &a.subscribe)] {
                for (j, p) in patterns.iter().enumerate() {
                    if let Err(e) = check_pattern(p) {
                        err(format!("{path}.{key}[{j}]"), format!("{p:?}: {e}"));
                    }
                }
            }
            acl.push(AclEntry {
                user: a.user.as_deref().map(Glob::new),
                cn: a.cn.as_deref().map(Glob::new),
                client_id: a.client_id.as_deref().map(Glob::new),
                publish: a.publish.clone(),
                subscribe: a.subscribe.clone(),
            });
        }
        AuthPlan {
            users_file: self.users_file.clone(),
            acl,
        }
    }
}

fn default_segment_size() -> ByteSize {
    ByteSize(512 * 1024)
}
fn default_segment_count() -> usize {
    4
}
fn default_intake_queue() -> usize {
    65_536
}
fn default_qos0_high_water() -> usize {
    16_384
}
fn default_ack() -> AckMode {
    AckMode::Durable
}
fn default_max_connections() -> usize {
    1_000
}
fn default_max_packet_size() -> ByteSize {
    ByteSize(1024 * 1024)
}
fn default_max_inflight() -> u16 {
    100
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
