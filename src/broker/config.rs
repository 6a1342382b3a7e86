//! The device side's config sections: `[broker]` (router sizing and intake),
//! `[[listeners]]` and `[auth]`, with the validated listener and auth plans the broker
//! starts from (validation itself is in crate::config for now).

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
