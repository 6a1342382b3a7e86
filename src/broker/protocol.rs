//! The device-facing protocol seam: every byte a device sends or receives passes through
//! [`DeviceProtocol`], which rumqttd clones once per connection.
//!
//! What it does, and why (DESIGN.md, rumqttd failure modes):
//! - detects the protocol level of the first CONNECT and delegates to rumqttd's `V4` or
//!   `V5` codec, so 3.1.1 and 5 share one port;
//! - strips MQTT 5 properties and maps v5-only CONNACK codes on writes to 3.1.1
//!   connections (mode 1: rumqttd's v4 writer hits `unreachable!()` otherwise);
//! - refuses invalid client ids and connections over `max_connections` with a proper
//!   CONNACK before rumqttd registers anything (mode 2): the CONNECT is rewritten to an
//!   empty client id with `clean_session = false`, which rumqttd itself answers with
//!   "identifier rejected", and `write` puts the right code in that CONNACK;
//! - refuses packets a device must never send (CONNACK, SUBACK, UNSUBACK, PINGRESP, a
//!   second CONNECT) before rumqttd's v5 reader reaches `unreachable!()` (mode 4), and
//!   contains any other codec panic (`catch_unwind`) so it closes one connection only;
//! - authenticates the CONNECT (users file, client certificate, `allow_anonymous`) and
//!   applies the ACL: a denied SUBSCRIBE filter gets a failure code in its SUBACK, a denied
//!   PUBLISH never reaches rumqttd or intake. What rumqttd must not see is swallowed and,
//!   where the device needs an answer (PUBACK, PUBREC, PUBCOMP, SUBACK), replaced by a
//!   PINGREQ whose PINGRESP `write` turns into that answer (rumqttd answers a
//!   connection's packets in order, so the substitutes queue up in order too);
//! - on a listener behind the TLS/WebSocket front (`front.rs`), reads the preamble the
//!   front writes first: a per-process token and the client certificate's identity;
//! - hands every PUBLISH to intake before rumqttd sees it, and, with `ack = "durable"`,
//!   withholds the device's PUBACK/PUBREC in `write` until the rule engine reports the
//!   message synced in every matched buffer. `read_mut` never blocks (rumqttd calls it under
//!   a lock its router also takes); `write` may, off the async workers (`block_in_place`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Error, Packet, PingReq, PingResp, Protocol, PubAck, PubAckReason,
    PubComp, PubCompReason, PubRec, PubRecReason, PublishProperties, SubAck, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::auth::{Grants, Identity, Refusal, Security};
use super::intake::{AckTicket, AckTracker, IntakeItem};
use crate::config::{AckMode, ListenerPlan};
use crate::message::{now_millis, Message, Properties};
use crate::metrics::ListenerMetrics;

/// How long a device's PUBACK may wait for durability before its connection is dropped
/// (the device then resends; nothing is lost).
const DURABLE_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest client id accepted.
pub(crate) const MAX_CLIENT_ID_LEN: usize = 256;

/// Password verifications (argon2: ~20 MiB and tens of ms each) running at once: a
/// flood of CONNECTs with wrong passwords costs time, not memory.
static VERIFY_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Runs blocking work from inside rumqttd's codec calls without stalling an async
/// worker, after taking one of `slots` if given (`block_in_place` needs the multi-thread
/// runtime; unit tests call directly).
fn off_the_workers<T>(slots: Option<&'static tokio::sync::Semaphore>, f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| {
                // Inside `block_in_place`, waiting for a slot blocks only this thread.
                let _slot = slots.and_then(|s| h.block_on(s.acquire()).ok());
                f()
            })
        }
        _ => f(),
    }
}

/// The preamble the TLS/WebSocket front writes before the device's bytes: a marker byte
/// no MQTT stream starts with, the front's token, then the certificate identity
/// (u16 length + UTF-8, empty without a certificate).
pub const PREAMBLE_MARKER: u8 = 0;
pub const TOKEN_LEN: usize = 16;
const PREAMBLE_FIXED: usize = 1 + TOKEN_LEN + 2;

pub fn preamble(token: &[u8; TOKEN_LEN], cn: Option<&str>) -> Vec<u8> {
    let cn = cn.unwrap_or("").as_bytes();
    let cn = &cn[..cn.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(PREAMBLE_FIXED + cn.len());
    out.push(PREAMBLE_MARKER);
    out.extend_from_slice(token);
    out.extend_from_slice(&(cn.len() as u16).to_be_bytes());
    out.extend_from_slice(cn);
    out
}

/// What a PINGRESP written to a device stands for (see the module docs).
#[derive(Debug)]
enum Answer {
    /// A real PINGREQ.
    Ping,
    /// A denied QoS 1 publish.
    PubAck(u16),
    /// A denied QoS 2 publish.
    PubRec(u16),
    /// The PUBREL of a denied QoS 2 publish.
    PubComp(u16),
    /// A SUBSCRIBE whose every filter was denied.
    SubAck(SubAck),
}

/// State shared by all connections of one listener.
pub struct ListenerShared {
    pub index: usize,
    pub name: String,
    pub ack: AckMode,
    pub max_connections: usize,
    pub qos0_high_water: usize,
    pub intake: mpsc::Sender<IntakeItem>,
    pub metrics: ListenerMetrics,
    /// Connections that passed CONNECT checks and have not ended.
    pub connections: AtomicUsize,
    /// Set at shutdown: stop taking messages, release no more withheld acks.
    pub stopping: Arc<AtomicBool>,
    /// Devices without credentials are accepted.
    pub allow_anonymous: bool,
    /// Users and ACLs, shared by every listener and replaced on reload.
    pub security: Arc<RwLock<Arc<Security>>>,
    /// Set when this is the internal side of a TLS/WebSocket front: every connection must
    /// start with the front's preamble carrying this token.
    pub front_token: Option<[u8; TOKEN_LEN]>,
    /// Client ids whose last connection ended before its session was established
    /// (no CONNACK written, or nothing read after it), with how often. rumqttd registers
    /// a will handler per client id before it sets the link up and does not remove it
    /// when that fails; the next CONNECT with the same id then panics on the stale
    /// handler while holding the listener's mutex, which breaks the listener for every
    /// device. So the next connection of such an id gets a fresh key in rumqttd
    /// (`<id>\u{1}<n>`: no device id can contain a control character); rules and
    /// logs still see the device's own id.
    suspect_ids: Mutex<HashMap<String, u32>>,
}

/// What every listener of the broker shares.
#[derive(Clone)]
pub struct BrokerShared {
    pub qos0_high_water: usize,
    pub intake: mpsc::Sender<IntakeItem>,
    pub stopping: Arc<AtomicBool>,
    pub security: Arc<RwLock<Arc<Security>>>,
}

impl ListenerShared {
    pub fn new(
        index: usize,
        plan: &ListenerPlan,
        broker: &BrokerShared,
        metrics: ListenerMetrics,
        front_token: Option<[u8; TOKEN_LEN]>,
    ) -> Self {
        Self {
            allow_anonymous: plan.allow_anonymous,
            security: broker.security.clone(),
            front_token,
            index,
            name: plan.name.clone(),
            ack: plan.ack,
            max_connections: plan.max_connections,
            qos0_high_water: broker.qos0_high_water,
            intake: broker.intake.clone(),
            metrics,
            connections: AtomicUsize::new(0),
            stopping: broker.stopping.clone(),
            suspect_ids: Mutex::new(HashMap::new()),
        }
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // Plain data: a panic elsewhere while holding it leaves it usable.
        self.suspect_ids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V4,
    V5,
}

/// The per-connection codec wrapper handed to rumqttd's `Server`.
pub struct DeviceProtocol {
    shared: Arc<ListenerShared>,
    version: Option<Version>,
    /// The code the CONNACK must carry when this connection is being refused.
    refusal: Option<ConnectReturnCode>,
    /// Holds one of the listener's `max_connections` slots.
    counted: bool,
    /// The device's client id, handed to the rules with each message.
    client_id: Arc<str>,
    /// Accepted with a non-empty client id: rumqttd holds a will handler under it.
    keyed: bool,
    /// The CONNACK accepting the connection was encoded (`write` takes `&self`).
    connack_written: AtomicBool,
    /// A packet was read after the CONNACK: the session is established.
    established: bool,
    /// MQTT 5 topic aliases set by the device.
    aliases: HashMap<u16, String>,
    /// `ack = "durable"`: progress of this connection's messages through the router.
    tracker: Option<Arc<AckTracker>>,
    next_seq: u64,
    /// Packet id → sequence number of QoS 1/2 publishes whose ack is withheld.
    pending: Mutex<HashMap<u16, u64>>,
    /// The front's preamble still has to be read.
    awaiting_preamble: bool,
    /// The client certificate's identity, from the front.
    cn: Option<String>,
    /// What the ACL lets this device do (set at CONNECT).
    grants: Grants,
    /// Answers owed for swallowed packets, in the order of their PINGREQ substitutes.
    answers: Mutex<VecDeque<Answer>>,
    /// SUBSCRIBE packet id → positions of denied filters, to fill into its SUBACK.
    denied_filters: Mutex<HashMap<u16, Vec<usize>>>,
    /// Packet ids of denied QoS 2 publishes whose PUBREL is still to come.
    denied_qos2: HashSet<u16>,
}

impl DeviceProtocol {
    pub fn new(shared: Arc<ListenerShared>) -> Self {
        Self {
            version: None,
            refusal: None,
            counted: false,
            client_id: Arc::from(""),
            keyed: false,
            connack_written: AtomicBool::new(false),
            established: false,
            aliases: HashMap::new(),
            tracker: None,
            next_seq: 0,
            pending: Mutex::new(HashMap::new()),
            awaiting_preamble: shared.front_token.is_some(),
            cn: None,
            grants: Grants::All,
            answers: Mutex::new(VecDeque::new()),
            denied_filters: Mutex::new(HashMap::new()),
            denied_qos2: HashSet::new(),
            shared,
        }
    }
}

impl Clone for DeviceProtocol {
    /// rumqttd clones the listener's prototype for each new connection: a clone starts
    /// with fresh per-connection state.
    fn clone(&self) -> Self {
        Self::new(self.shared.clone())
    }
}

impl Drop for DeviceProtocol {
    fn drop(&mut self) {
        if self.keyed && !self.established {
            let mut suspects = self.shared.suspects();
            let n = suspects.entry(self.client_id.to_string()).or_insert(0);
            *n += 1;
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), key = *n, "connection ended before its session was established; the client id's next connection gets a fresh broker key");
        }
        if self.counted {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            self.shared.metrics.connections.dec();
        }
    }
}

/// Packet types a device never sends: rumqttd's readers or router do not expect them.
fn server_only(packet_type: u8) -> bool {
    matches!(packet_type, 2 | 9 | 11 | 13)
}

fn valid_client_id(id: &str) -> bool {
    id.len() <= MAX_CLIENT_ID_LEN
        && !id
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/' | '$') || c.is_control())
}

/// The protocol level byte of a complete CONNECT frame.
fn connect_level(frame: &[u8], fixed_header_len: usize) -> Option<u8> {
    let vh = frame.get(fixed_header_len..)?;
    let name_len = u16::from_be_bytes([*vh.first()?, *vh.get(1)?]) as usize;
    vh.get(2 + name_len).copied()
}

/// QoS and packet id of a complete PUBLISH frame (rumqttd keeps them crate-private).
fn publish_qos_pkid(frame: &[u8], fixed_header_len: usize) -> Option<(u8, u16)> {
    let qos = (frame.first()? >> 1) & 0b11;
    if qos == 0 {
        return Some((0, 0));
    }
    let vh = frame.get(fixed_header_len..)?;
    let topic_len = u16::from_be_bytes([*vh.first()?, *vh.get(1)?]) as usize;
    let pkid = u16::from_be_bytes([*vh.get(2 + topic_len)?, *vh.get(3 + topic_len)?]);
    Some((qos, pkid))
}

/// CONNACK codes MQTT 3.1.1 can carry.
fn v4_connack_code(code: ConnectReturnCode) -> ConnectReturnCode {
    use ConnectReturnCode::*;
    match code {
        Success
        | RefusedProtocolVersion
        | ClientIdentifierNotValid
        | ServiceUnavailable
        | BadUserNamePassword
        | NotAuthorized => code,
        UnsupportedProtocolVersion => RefusedProtocolVersion,
        Banned | BadAuthenticationMethod => NotAuthorized,
        _ => ServiceUnavailable,
    }
}

/// CONNACK codes rumqttd's v5 writer can carry (3.1.1-only codes hit `unreachable!()`).
fn v5_connack_code(code: ConnectReturnCode) -> ConnectReturnCode {
    use ConnectReturnCode::*;
    match code {
        RefusedProtocolVersion => UnsupportedProtocolVersion,
        ServiceUnavailable => ServerUnavailable,
        other => other,
    }
}

fn properties_of(p: &PublishProperties) -> Option<Box<Properties>> {
    let props = Properties {
        user_properties: p.user_properties.clone(),
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
    };
    (props != Properties::default()).then(|| Box::new(props))
}

fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::ConnAck(ack, _) => Packet::ConnAck(
            ConnAck {
                session_present: ack.session_present,
                code: v4_connack_code(ack.code),
            },
            None,
        ),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other => other,
    }
}

impl DeviceProtocol {
    fn on_connect(&mut self, packet: &mut Packet) {
        let Packet::Connect(connect, _, will, _, login) = packet else {
            return;
        };
        // MQTT allows keep-alive 0 ("no keep-alive"); rumqttd refuses it. Treat it as the
        // longest keep-alive instead.
        if connect.keep_alive == 0 {
            connect.keep_alive = u16::MAX;
        }
        let shared = self.shared.clone();
        let refused = &shared.metrics.refused;
        let refusal = if !valid_client_id(&connect.client_id) {
            refused.invalid_client_id.inc();
            Some(ConnectReturnCode::ClientIdentifierNotValid)
        } else if self.shared.stopping.load(Ordering::Relaxed) {
            Some(ConnectReturnCode::ServerUnavailable)
        } else if let Err(code) = self.authorize(&connect.client_id, will.as_ref(), login.as_ref())
        {
            Some(code)
        } else {
            let before = self.shared.connections.fetch_add(1, Ordering::Relaxed);
            if before >= self.shared.max_connections {
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                refused.max_connections.inc();
                Some(ConnectReturnCode::ServerBusy)
            } else {
                self.counted = true;
                self.shared.metrics.connections.inc();
                None
            }
        };
        if let Some(code) = refusal {
            info!(
                listener = %self.shared.name,
                client_id = %connect.client_id.escape_debug(),
                reason = ?code,
                "refusing device connection"
            );
            // rumqttd answers an empty id without clean session with "identifier
            // rejected" before registering anything; `write` sets the real code.
            connect.client_id.clear();
            connect.clean_session = false;
            self.refusal = Some(code);
        } else {
            self.client_id = Arc::from(connect.client_id.as_str());
            if !connect.client_id.is_empty() {
                self.keyed = true;
                if let Some(n) = self.shared.suspects().get(connect.client_id.as_str()) {
                    connect.client_id = format!("{}\u{1}{n}", connect.client_id);
                }
            }
            if self.shared.ack == AckMode::Durable {
                self.tracker = Some(Arc::new(AckTracker::default()));
            }
        }
        // rumqttd has its own (unconfigured) authentication: it never sees credentials.
        *login = None;
    }

    /// Authenticates the device and settles its ACL grants; the `Err` is the CONNACK code
    /// refusing it.
    fn authorize(
        &mut self,
        client_id: &str,
        will: Option<&rumqttd::protocol::LastWill>,
        login: Option<&rumqttd::protocol::Login>,
    ) -> Result<(), ConnectReturnCode> {
        let security = self
            .shared
            .security
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let credentials = login.map(|l| (l.username.as_str(), l.password.as_bytes()));
        let needs_argon = credentials.is_some() && security.users.is_some();
        let authenticate =
            || security.authenticate(credentials, self.cn.is_some(), self.shared.allow_anonymous);
        let result = if needs_argon {
            off_the_workers(Some(&VERIFY_SLOTS), authenticate)
        } else {
            authenticate()
        };
        let refused = &self.shared.metrics.refused;
        let username = match result {
            Ok(username) => username,
            Err(Refusal::BadCredentials) => {
                refused.bad_credentials.inc();
                return Err(ConnectReturnCode::BadUserNamePassword);
            }
            Err(Refusal::Anonymous) => {
                refused.not_authorized.inc();
                return Err(ConnectReturnCode::NotAuthorized);
            }
        };
        let identity = Identity {
            username,
            client_id: client_id.to_string(),
            cn: self.cn.clone(),
        };
        self.grants = security.grants(&identity);
        if let Some(will) = will {
            let allowed = std::str::from_utf8(&will.topic)
                .map(|t| self.grants.may_publish(t))
                .unwrap_or(false);
            if !allowed {
                self.shared.metrics.acl_denied.inc();
                refused.not_authorized.inc();
                return Err(ConnectReturnCode::NotAuthorized);
            }
        }
        Ok(())
    }

    /// Hands a PUBLISH to intake; `Ok(false)` when the ACL denies it (it must not reach
    /// rumqttd either). An `Err` closes the connection before rumqttd acks the message,
    /// so the device resends it.
    fn on_publish(&mut self, packet: &mut Packet, qos: u8, pkid: u16) -> Result<bool, Error> {
        let Packet::Publish(publish, props) = packet else {
            return Ok(true);
        };
        let metrics = &self.shared.metrics;
        if let Some(alias) = props.as_ref().and_then(|p| p.topic_alias) {
            if publish.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => publish.topic = t.clone().into(),
                    None => {
                        metrics.invalid.inc();
                        return Err(Error::MalformedPacket);
                    }
                }
            } else if let Ok(t) = std::str::from_utf8(&publish.topic) {
                self.aliases.insert(alias, t.to_string());
            }
            // rumqttd resolves the alias again itself; give it the full topic.
            if let Some(p) = props.as_mut() {
                p.topic_alias = None;
            }
        }
        let topic = match std::str::from_utf8(&publish.topic) {
            Ok(t) if !t.is_empty() && !t.contains(['+', '#', '\0']) => t.to_string(),
            _ => {
                metrics.invalid.inc();
                return Err(Error::TopicNotUtf8);
            }
        };
        if !self.grants.may_publish(&topic) {
            metrics.acl_denied.inc();
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), topic = %topic.escape_debug(), "publish denied by the ACL");
            return Ok(false);
        }
        if self.shared.stopping.load(Ordering::Relaxed) {
            // Shutting down: the device's unacked messages go to the next start.
            return Err(Error::InvalidProtocol);
        }
        if qos == 0 {
            let queued = self.shared.intake.max_capacity() - self.shared.intake.capacity();
            if queued >= self.shared.qos0_high_water {
                metrics.qos0_shed.inc();
                return Ok(true);
            }
        }
        let ack = match (&self.tracker, qos) {
            (Some(tracker), 1 | 2) => {
                self.next_seq += 1;
                self.pending
                    .get_mut()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(pkid, self.next_seq);
                Some(AckTicket {
                    tracker: tracker.clone(),
                    seq: self.next_seq,
                })
            }
            _ => None,
        };
        let item = IntakeItem {
            listener: self.shared.index,
            msg: Message {
                topic,
                payload: publish.payload.clone(),
                qos,
                retain: publish.retain,
                properties: props.as_ref().and_then(properties_of),
                received_at: now_millis(),
            },
            client_id: self.client_id.clone(),
            ack,
        };
        match self.shared.intake.try_send(item) {
            Ok(()) => {
                metrics.received.inc();
                Ok(true)
            }
            Err(mpsc::error::TrySendError::Full(_)) if qos == 0 => {
                metrics.qos0_shed.inc();
                Ok(true)
            }
            Err(_) => {
                metrics.intake_full.inc();
                warn!(listener = %self.shared.name, "intake queue full; closing the connection so the device resends");
                Err(Error::InvalidProtocol)
            }
        }
    }

    /// `ack = "durable"`: blocks until the message behind `pkid` is synced.
    fn await_durable(&self, pkid: u16) -> Result<(), Error> {
        let (Some(tracker), Some(seq)) = (
            &self.tracker,
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&pkid),
        ) else {
            return Ok(());
        };
        if tracker.is_released(seq) {
            return Ok(());
        }
        let released = off_the_workers(None, || {
            tracker.wait(seq, DURABLE_ACK_TIMEOUT, &self.shared.stopping)
        });
        if released {
            Ok(())
        } else {
            debug!(listener = %self.shared.name, pkid, "message not durable in time; withholding its ack and closing");
            Err(Error::InvalidProtocol)
        }
    }

    /// Reads the front's preamble (see [`preamble`]); an `Err` closes the connection.
    fn read_preamble(&mut self, stream: &mut BytesMut) -> Result<(), Error> {
        let Some(token) = self.shared.front_token else {
            return Ok(());
        };
        if stream.len() < PREAMBLE_FIXED {
            return Err(Error::InsufficientBytes(PREAMBLE_FIXED - stream.len()));
        }
        // Constant-time comparison of the token.
        let diff = stream[1..1 + TOKEN_LEN]
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if stream[0] != PREAMBLE_MARKER || diff != 0 {
            warn!(listener = %self.shared.name, "connection to the internal side of a TLS/WebSocket listener without the front's token; closing it");
            return Err(Error::InvalidProtocol);
        }
        let len = u16::from_be_bytes([stream[1 + TOKEN_LEN], stream[2 + TOKEN_LEN]]) as usize;
        if stream.len() < PREAMBLE_FIXED + len {
            return Err(Error::InsufficientBytes(
                PREAMBLE_FIXED + len - stream.len(),
            ));
        }
        let cn = String::from_utf8_lossy(&stream[PREAMBLE_FIXED..PREAMBLE_FIXED + len]);
        self.cn = (!cn.is_empty()).then(|| cn.into_owned());
        stream.advance(PREAMBLE_FIXED + len);
        self.awaiting_preamble = false;
        Ok(())
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, VecDeque<Answer>> {
        // Plain data: a panic elsewhere while holding it leaves it usable.
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A PINGREQ for rumqttd standing in for a swallowed packet owed `answer`.
    fn substitute(&self, answer: Answer) -> Option<Packet> {
        self.answers().push_back(answer);
        Some(Packet::PingReq(PingReq))
    }

    /// Drops the SUBSCRIBE filters the ACL denies; `None` when none is left (the
    /// SUBACK is then written from the answer queue).
    fn on_subscribe(&mut self, packet: Packet) -> Option<Packet> {
        let Packet::Subscribe(mut subscribe, props) = packet else {
            return Some(packet);
        };
        let denied: Vec<usize> = subscribe
            .filters
            .iter()
            .enumerate()
            .filter(|(_, f)| !self.grants.may_subscribe(&f.path))
            .map(|(i, _)| i)
            .collect();
        if denied.is_empty() {
            return Some(Packet::Subscribe(subscribe, props));
        }
        self.shared.metrics.acl_denied.inc_by(denied.len() as u64);
        debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), denied = denied.len(), "subscription denied by the ACL");
        if denied.len() == subscribe.filters.len() {
            let return_codes = vec![self.refused_subscription(); denied.len()];
            return self.substitute(Answer::SubAck(SubAck {
                pkid: subscribe.pkid,
                return_codes,
            }));
        }
        for &i in denied.iter().rev() {
            subscribe.filters.remove(i);
        }
        self.denied_filters
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .insert(subscribe.pkid, denied);
        Some(Packet::Subscribe(subscribe, props))
    }

    fn refused_subscription(&self) -> SubscribeReasonCode {
        match self.version {
            Some(Version::V5) => SubscribeReasonCode::NotAuthorized,
            _ => SubscribeReasonCode::Failure,
        }
    }

    /// The next packet for rumqttd; `None` when the frame read was swallowed and nothing
    /// stands in for it.
    fn read_inner(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Option<Packet>, Error> {
        if self.awaiting_preamble {
            self.read_preamble(stream)?;
        }
        let header = v4::check(stream.iter(), max_size)?;
        let frame_len = header.frame_length();
        let packet_type = header.byte1 >> 4;
        let version = match self.version {
            None => {
                if packet_type != 1 {
                    return Err(Error::InvalidPacketType(packet_type));
                }
                let version = match connect_level(&stream[..frame_len], header.fixed_header_len) {
                    Some(3 | 4) => Version::V4,
                    Some(5) => Version::V5,
                    Some(level) => return Err(Error::InvalidProtocolLevel(level)),
                    None => return Err(Error::MalformedPacket),
                };
                self.version = Some(version);
                version
            }
            Some(_) if packet_type == 1 || server_only(packet_type) => {
                return Err(Error::InvalidPacketType(packet_type));
            }
            Some(v) => v,
        };
        let publish_meta = if packet_type == 3 {
            match publish_qos_pkid(&stream[..frame_len], header.fixed_header_len) {
                Some((3, _)) => return Err(Error::InvalidQoS(3)),
                Some(meta) => Some(meta),
                None => return Err(Error::MalformedPacket),
            }
        } else {
            None
        };
        let mut packet = match version {
            Version::V4 => V4.read_mut(stream, max_size)?,
            Version::V5 => V5.read_mut(stream, max_size)?,
        };
        if !self.established && self.connack_written.load(Ordering::Relaxed) {
            self.established = true;
        }
        match (&packet, publish_meta) {
            (Packet::Connect(..), _) => self.on_connect(&mut packet),
            (Packet::Publish(..), Some((qos, pkid))) => {
                let allowed = self.on_publish(&mut packet, qos, pkid)?;
                if !allowed {
                    // Denied: 3.1.1 gets a plain ack (it has no way to say no), 5 the
                    // reason "not authorized".
                    return Ok(match qos {
                        0 => None,
                        1 => self.substitute(Answer::PubAck(pkid)),
                        _ => {
                            self.denied_qos2.insert(pkid);
                            self.substitute(Answer::PubRec(pkid))
                        }
                    });
                }
            }
            (Packet::PubRel(rel, _), _) if self.denied_qos2.remove(&rel.pkid) => {
                return Ok(self.substitute(Answer::PubComp(rel.pkid)));
            }
            (Packet::Subscribe(..), _) => return Ok(self.on_subscribe(packet)),
            (Packet::PingReq(_), _) => return Ok(self.substitute(Answer::Ping)),
            _ => {}
        }
        Ok(Some(packet))
    }

    /// The answer a PINGRESP from rumqttd stands for.
    fn answer(&self) -> Packet {
        let not_authorized = self.version == Some(Version::V5);
        match self.answers().pop_front() {
            None | Some(Answer::Ping) => Packet::PingResp(PingResp),
            Some(Answer::PubAck(pkid)) => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: if not_authorized {
                        PubAckReason::NotAuthorized
                    } else {
                        PubAckReason::Success
                    },
                },
                None,
            ),
            Some(Answer::PubRec(pkid)) => Packet::PubRec(
                PubRec {
                    pkid,
                    reason: if not_authorized {
                        PubRecReason::NotAuthorized
                    } else {
                        PubRecReason::Success
                    },
                },
                None,
            ),
            Some(Answer::PubComp(pkid)) => Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            ),
            Some(Answer::SubAck(ack)) => Packet::SubAck(ack, None),
        }
    }

    fn write_inner(&self, packet: Packet, buffer: &mut BytesMut) -> Result<usize, Error> {
        let packet = match packet {
            Packet::ConnAck(mut ack, props) => {
                if let Some(code) = self.refusal {
                    ack.code = code;
                    ack.session_present = false;
                } else {
                    self.connack_written.store(true, Ordering::Relaxed);
                }
                Packet::ConnAck(ack, props)
            }
            Packet::PubAck(ack, props) => {
                self.await_durable(ack.pkid)?;
                Packet::PubAck(ack, props)
            }
            Packet::PubRec(rec, props) => {
                self.await_durable(rec.pkid)?;
                Packet::PubRec(rec, props)
            }
            Packet::PingResp(_) => self.answer(),
            Packet::SubAck(mut ack, props) => {
                let denied = self
                    .denied_filters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&ack.pkid);
                for i in denied.unwrap_or_default() {
                    let at = i.min(ack.return_codes.len());
                    ack.return_codes.insert(at, self.refused_subscription());
                }
                Packet::SubAck(ack, props)
            }
            other => other,
        };
        match self.version {
            Some(Version::V5) => match packet {
                Packet::ConnAck(mut ack, props) => {
                    ack.code = v5_connack_code(ack.code);
                    V5.write(Packet::ConnAck(ack, props), buffer)
                }
                other => V5.write(other, buffer),
            },
            _ => V4.write(strip_properties(packet), buffer),
        }
    }
}

impl Protocol for DeviceProtocol {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let read = || loop {
            // A swallowed frame (a denied QoS 0 publish) is followed by the next one.
            if let Some(packet) = self.read_inner(stream, max_size)? {
                return Ok(packet);
            }
        };
        match catch_unwind(AssertUnwindSafe(read)) {
            Ok(result) => result,
            Err(_) => {
                warn!(listener = %self.shared.name, "codec panicked on a device packet; closing that connection");
                // The frame may be half consumed: make sure nothing more is parsed.
                stream.clear();
                Err(Error::MalformedPacket)
            }
        }
    }

    fn write(&self, packet: Packet, buffer: &mut BytesMut) -> Result<usize, Error> {
        match catch_unwind(AssertUnwindSafe(|| self.write_inner(packet, buffer))) {
            Ok(result) => result,
            Err(_) => {
                warn!(listener = %self.shared.name, "codec panicked writing to a device; closing that connection");
                Err(Error::MalformedPacket)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_rules() {
        assert!(valid_client_id("dev-1_A.b"));
        assert!(valid_client_id(""));
        for bad in ["dev/1", "a+b", "a#", "$sys", "a\nb"] {
            assert!(!valid_client_id(bad), "{bad:?}");
        }
        assert!(!valid_client_id(&"x".repeat(MAX_CLIENT_ID_LEN + 1)));
    }

    #[test]
    fn reads_protocol_level_and_publish_header() {
        // CONNECT, remaining length 12: "MQTT", level 5, flags, keep-alive.
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0];
        assert_eq!(connect_level(&connect, 2), Some(5));
        assert_eq!(connect_level(&connect[..5], 2), None);
        // PUBLISH QoS 1, topic "a/b", pkid 0x0102.
        let publish = [0x32, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'h', b'i'];
        assert_eq!(publish_qos_pkid(&publish, 2), Some((1, 0x0102)));
        assert_eq!(publish_qos_pkid(&[0x30, 2, 0, 0], 2), Some((0, 0)));
        assert_eq!(publish_qos_pkid(&[0x32, 2, 0, 9], 2), None);
    }

    fn shared() -> Arc<ListenerShared> {
        let plan = ListenerPlan {
            name: "devices".into(),
            bind: "127.0.0.1:0".parse().expect("addr"),
            ack: AckMode::Received,
            max_connections: 10,
            max_packet_size: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            tls: None,
            websocket: false,
            allow_anonymous: true,
        };
        shared_with(&plan, Security::default(), None)
    }

    fn shared_with(
        plan: &ListenerPlan,
        security: Security,
        token: Option<[u8; TOKEN_LEN]>,
    ) -> Arc<ListenerShared> {
        // Intake is not read here: a large queue keeps publishes from being refused.
        let (tx, rx) = mpsc::channel(1000);
        std::mem::forget(rx);
        let metrics = crate::metrics::Metrics::new();
        let broker = BrokerShared {
            qos0_high_water: 1000,
            intake: tx,
            stopping: Arc::new(AtomicBool::new(false)),
            security: Arc::new(RwLock::new(Arc::new(security))),
        };
        Arc::new(ListenerShared::new(
            0,
            plan,
            &broker,
            metrics.listener("devices"),
            token,
        ))
    }

    /// A 3.1.1 CONNECT with clean session and `id`.
    fn connect_bytes(id: &str) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[0x10, (12 + id.len()) as u8, 0, 4]);
        b.extend_from_slice(b"MQTT");
        b.extend_from_slice(&[4, 2, 0, 60, 0, id.len() as u8]);
        b.extend_from_slice(id.as_bytes());
        b
    }

    /// The client id rumqttd gets for a CONNECT of `id` read by `codec`.
    fn broker_key(codec: &mut DeviceProtocol, id: &str) -> String {
        match codec.read_mut(&mut connect_bytes(id), 1 << 20) {
            Ok(Packet::Connect(c, ..)) => c.client_id,
            other => panic!("not a CONNECT: {other:?}"),
        }
    }

    fn connack() -> Packet {
        Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
            },
            None,
        )
    }

    #[test]
    fn a_connection_that_never_established_its_session_gives_the_id_a_fresh_broker_key() {
        let shared = shared();
        // Established normally (CONNACK, then a packet): the id stays as it is.
        let mut ok = DeviceProtocol::new(shared.clone());
        assert_eq!(broker_key(&mut ok, "press-7"), "press-7");
        ok.write(connack(), &mut BytesMut::new()).expect("connack");
        let mut ping = BytesMut::from(&[0xC0u8, 0][..]);
        ok.read_mut(&mut ping, 1 << 20).expect("pingreq");
        drop(ok);
        assert_eq!(
            broker_key(&mut DeviceProtocol::new(shared.clone()), "press-7"),
            "press-7"
        );

        // Torn down before its CONNACK (rumqttd's link setup failed): rumqttd may hold a
        // stale will handler under "press-8", so its next connections use another key.
        let torn = {
            let mut c = DeviceProtocol::new(shared.clone());
            assert_eq!(broker_key(&mut c, "press-8"), "press-8");
            c
        };
        drop(torn);
        let mut next = DeviceProtocol::new(shared.clone());
        assert_eq!(broker_key(&mut next, "press-8"), "press-8\u{1}1");
        drop(next); // never established either
        let mut third = DeviceProtocol::new(shared.clone());
        assert_eq!(broker_key(&mut third, "press-8"), "press-8\u{1}2");
        // The rules still see the device's own id.
        assert_eq!(&*third.client_id, "press-8");
        // An empty id is assigned a unique one by rumqttd: never remapped.
        let empty = DeviceProtocol::new(shared.clone());
        drop(empty);
        assert_eq!(broker_key(&mut DeviceProtocol::new(shared), ""), "");
    }

    fn acl_shared(token: Option<[u8; TOKEN_LEN]>) -> Arc<ListenerShared> {
        let plan = ListenerPlan {
            name: "devices".into(),
            bind: "127.0.0.1:0".parse().expect("addr"),
            ack: AckMode::Received,
            max_connections: 10,
            max_packet_size: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            tls: None,
            websocket: false,
            allow_anonymous: true,
        };
        let security = Security {
            users: None,
            acl: vec![crate::broker::AclEntry {
                user: None,
                cn: None,
                client_id: None,
                publish: vec!["up/{client_id}/#".into()],
                subscribe: vec!["cmd/{client_id}/#".into(), "cmd/{cn}/#".into()],
            }],
        };
        shared_with(&plan, security, token)
    }

    /// Reads every packet rumqttd would get from `bytes`.
    fn read_all(codec: &mut DeviceProtocol, bytes: &[u8]) -> Vec<Packet> {
        let mut stream = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match codec.read_mut(&mut stream, 1 << 20) {
                Ok(p) => out.push(p),
                Err(Error::InsufficientBytes(_)) => return out,
                Err(e) => panic!("read error {e:?}"),
            }
        }
    }

    fn written(codec: &DeviceProtocol, packet: Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        codec.write(packet, &mut out).expect("write");
        out.to_vec()
    }

    #[test]
    fn denied_publishes_never_reach_rumqttd_and_still_get_their_answers() {
        let mut codec = DeviceProtocol::new(acl_shared(None));
        assert_eq!(read_all(&mut codec, &connect_bytes("d1")).len(), 1);
        written(&codec, connack());
        // QoS 0 to "x" (denied), QoS 1 to "x" pkid 7 (denied), QoS 1 to "up/d1/t" pkid 8,
        // PINGREQ, QoS 2 to "x" pkid 9 (denied).
        let mut bytes = vec![0x30, 4, 0, 1, b'x', b'a'];
        bytes.extend_from_slice(&[0x32, 6, 0, 1, b'x', 0, 7, b'b']);
        bytes.extend_from_slice(&[0x32, 12, 0, 7]);
        bytes.extend_from_slice(b"up/d1/t");
        bytes.extend_from_slice(&[0, 8, b'c']);
        bytes.extend_from_slice(&[0xC0, 0]);
        bytes.extend_from_slice(&[0x34, 6, 0, 1, b'x', 0, 9, b'd']);
        let packets = read_all(&mut codec, &bytes);
        let kinds: Vec<&str> = packets
            .iter()
            .map(|p| match p {
                Packet::Publish(..) => "publish",
                Packet::PingReq(_) => "ping",
                _ => "other",
            })
            .collect();
        // The QoS 0 one vanished; the QoS 1 and 2 ones became PINGREQs.
        assert_eq!(kinds, ["ping", "publish", "ping", "ping"]);
        assert_eq!(codec.shared.metrics.acl_denied.get(), 3);
        assert_eq!(codec.shared.metrics.received.get(), 1);
        // rumqttd answers in order: PINGRESP, PUBACK 8, PINGRESP, PINGRESP.
        let pingresp = || Packet::PingResp(PingResp);
        assert_eq!(written(&codec, pingresp()), [0x40, 2, 0, 7]);
        let ack8 = Packet::PubAck(
            PubAck {
                pkid: 8,
                reason: PubAckReason::Success,
            },
            None,
        );
        assert_eq!(written(&codec, ack8), [0x40, 2, 0, 8]);
        assert_eq!(written(&codec, pingresp()), [0xD0, 0]);
        assert_eq!(written(&codec, pingresp()), [0x50, 2, 0, 9]);
        // 3.1.1 QoS 2: the device's PUBREL of the denied publish gets its PUBCOMP.
        let packets = read_all(&mut codec, &[0x62, 2, 0, 9]);
        assert!(matches!(packets[..], [Packet::PingReq(_)]), "{packets:?}");
        assert_eq!(written(&codec, pingresp()), [0x70, 2, 0, 9]);
    }

    /// A 3.1.1 SUBSCRIBE of `filters` (QoS 1) with packet id `pkid`.
    fn subscribe_bytes(pkid: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        for f in filters {
            body.extend_from_slice(&(f.len() as u16).to_be_bytes());
            body.extend_from_slice(f.as_bytes());
            body.push(1);
        }
        let mut out = vec![0x82, body.len() as u8];
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn denied_filters_get_failure_codes_in_their_suback() {
        let mut codec = DeviceProtocol::new(acl_shared(None));
        read_all(&mut codec, &connect_bytes("d1"));
        written(&codec, connack());
        // Mixed: rumqttd sees only the allowed filter; the SUBACK gets the failure back
        // in place.
        let packets = read_all(
            &mut codec,
            &subscribe_bytes(3, &["#", "cmd/d1/x", "cmd/d2/x"]),
        );
        let [Packet::Subscribe(sub, _)] = &packets[..] else {
            panic!("{packets:?}");
        };
        assert_eq!(sub.filters.len(), 1);
        assert_eq!(sub.filters[0].path, "cmd/d1/x");
        let ack = Packet::SubAck(
            SubAck {
                pkid: 3,
                return_codes: vec![SubscribeReasonCode::QoS1],
            },
            None,
        );
        assert_eq!(written(&codec, ack), [0x90, 5, 0, 3, 0x80, 1, 0x80]);
        // All denied: nothing for rumqttd but a PINGREQ.
        let packets = read_all(&mut codec, &subscribe_bytes(4, &["cmd/+/x"]));
        assert!(matches!(packets[..], [Packet::PingReq(_)]), "{packets:?}");
        assert_eq!(
            written(&codec, Packet::PingResp(PingResp)),
            [0x90, 3, 0, 4, 0x80]
        );
        assert_eq!(codec.shared.metrics.acl_denied.get(), 3);
    }

    #[test]
    fn the_front_preamble_is_required_and_carries_the_certificate_identity() {
        let token = [7u8; TOKEN_LEN];
        let shared = acl_shared(Some(token));
        // Without the preamble: closed.
        let mut codec = DeviceProtocol::new(shared.clone());
        let mut stream = connect_bytes("d1");
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err());
        // A wrong token: closed.
        let mut codec = DeviceProtocol::new(shared.clone());
        let mut stream = BytesMut::from(&preamble(&[8u8; TOKEN_LEN], Some("plc"))[..]);
        stream.extend_from_slice(&connect_bytes("d1"));
        assert!(codec.read_mut(&mut stream, 1 << 20).is_err());
        // The right one, arriving in pieces: the identity reaches the ACL.
        let mut codec = DeviceProtocol::new(shared);
        let mut bytes = preamble(&token, Some("plc"));
        bytes.extend_from_slice(&connect_bytes("d1"));
        let mut stream = BytesMut::from(&bytes[..5]);
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Err(Error::InsufficientBytes(_))
        ));
        stream.extend_from_slice(&bytes[5..]);
        assert!(matches!(
            codec.read_mut(&mut stream, 1 << 20),
            Ok(Packet::Connect(..))
        ));
        assert_eq!(codec.cn.as_deref(), Some("plc"));
        assert!(codec.grants.may_subscribe("cmd/plc/#"));
        assert!(!codec.grants.may_subscribe("cmd/other/#"));
    }

    #[test]
    fn v5_only_connack_codes_map_to_v4_codes() {
        use ConnectReturnCode::*;
        assert_eq!(v4_connack_code(ServerBusy), ServiceUnavailable);
        assert_eq!(v4_connack_code(QuotaExceeded), ServiceUnavailable);
        assert_eq!(v4_connack_code(Banned), NotAuthorized);
        assert_eq!(
            v4_connack_code(ClientIdentifierNotValid),
            ClientIdentifierNotValid
        );
    }
}
