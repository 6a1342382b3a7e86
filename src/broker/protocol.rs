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
//! - hands every PUBLISH to intake before rumqttd sees it, and, with `ack = "durable"`,
//!   withholds the device's PUBACK/PUBREC in `write` until the rule engine reports the
//!   message synced in every matched buffer. `read_mut` never blocks (rumqttd calls it under
//!   a lock its router also takes); `write` may, off the async workers (`block_in_place`).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{ConnAck, ConnectReturnCode, Error, Packet, Protocol, PublishProperties};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::intake::{AckTicket, AckTracker, IntakeItem};
use crate::config::{AckMode, ListenerPlan};
use crate::message::{now_millis, Message, Properties};
use crate::metrics::ListenerMetrics;

/// How long a device's PUBACK may wait for durability before its connection is dropped
/// (the device then resends; nothing is lost).
const DURABLE_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest client id accepted.
pub(crate) const MAX_CLIENT_ID_LEN: usize = 256;

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

impl ListenerShared {
    pub fn new(
        index: usize,
        plan: &ListenerPlan,
        qos0_high_water: usize,
        intake: mpsc::Sender<IntakeItem>,
        metrics: ListenerMetrics,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Self {
            index,
            name: plan.name.clone(),
            ack: plan.ack,
            max_connections: plan.max_connections,
            qos0_high_water,
            intake,
            metrics,
            connections: AtomicUsize::new(0),
            stopping,
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
}

impl DeviceProtocol {
    pub fn new(shared: Arc<ListenerShared>) -> Self {
        Self {
            shared,
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
        let Packet::Connect(connect, _, _, _, _) = packet else {
            return;
        };
        // MQTT allows keep-alive 0 ("no keep-alive"); rumqttd refuses it. Treat it as the
        // longest keep-alive instead.
        if connect.keep_alive == 0 {
            connect.keep_alive = u16::MAX;
        }
        let refusal = if !valid_client_id(&connect.client_id) {
            Some(ConnectReturnCode::ClientIdentifierNotValid)
        } else if self.shared.stopping.load(Ordering::Relaxed) {
            Some(ConnectReturnCode::ServerUnavailable)
        } else {
            let before = self.shared.connections.fetch_add(1, Ordering::Relaxed);
            if before >= self.shared.max_connections {
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
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
    }

    /// Hands a PUBLISH to intake. An `Err` closes the connection before rumqttd acks the
    /// message, so the device resends it.
    fn on_publish(&mut self, packet: &mut Packet, qos: u8, pkid: u16) -> Result<(), Error> {
        let Packet::Publish(publish, props) = packet else {
            return Ok(());
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
        if self.shared.stopping.load(Ordering::Relaxed) {
            // Shutting down: the device's unacked messages go to the next start.
            return Err(Error::InvalidProtocol);
        }
        if qos == 0 {
            let queued = self.shared.intake.max_capacity() - self.shared.intake.capacity();
            if queued >= self.shared.qos0_high_water {
                metrics.qos0_shed.inc();
                return Ok(());
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
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) if qos == 0 => {
                metrics.qos0_shed.inc();
                Ok(())
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
        let wait = || tracker.wait(seq, DURABLE_ACK_TIMEOUT, &self.shared.stopping);
        let released = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        };
        if released {
            Ok(())
        } else {
            debug!(listener = %self.shared.name, pkid, "message not durable in time; withholding its ack and closing");
            Err(Error::InvalidProtocol)
        }
    }

    fn read_inner(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
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
            (Packet::Publish(..), Some((qos, pkid))) => self.on_publish(&mut packet, qos, pkid)?,
            _ => {}
        }
        Ok(packet)
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
        match catch_unwind(AssertUnwindSafe(|| self.read_inner(stream, max_size))) {
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
        };
        let (tx, _rx) = mpsc::channel(10);
        let metrics = crate::metrics::Metrics::new();
        Arc::new(ListenerShared::new(
            0,
            &plan,
            10,
            tx,
            metrics.listener("devices"),
            Arc::new(AtomicBool::new(false)),
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
