//! One device connection: a task of edgebridge's, the same for TCP, TLS, WebSocket and
//! WSS (`transport.rs`), from the accepted socket to the close.
//!
//! Input: the device's bytes, and what rumqttd's router sends to the connection's own
//! link (deliveries to its subscriptions, SUBACKs, PUBRELs). Output: every PUBLISH (and
//! an abnormal end's will) to intake as an [`IntakeItem`] and, through the shared link
//! (`links.rs`), to the router for local subscribers; the device's acks to the router.
//!
//! What it owns, and why:
//! - the CONNECT: protocol level (3.1, 3.1.1, 5; anything else gets CONNACK 0x01, or
//!   0x84 in MQTT 5's format for a level above 5), client id, authentication, ACL
//!   grants, `max_connections`, session takeover (the connection holding the id is
//!   closed first: MQTT-3.1.4-2, MQTT 5 DISCONNECT 0x8E);
//! - the PUBACK / PUBREC of a device's QoS 1/2 publish, written once intake says it is
//!   durable (`ack = "durable"`): awaited on the [`AckTracker`], never a blocked thread.
//!   The acks not yet written bound the connection's in-flight window (the device's
//!   receive maximum and the listener's `max_inflight`): while it is full, the device is
//!   not read;
//! - the will, published like a device message on an abnormal end;
//! - the QoS of deliveries: rumqttd forwards at the subscription's QoS; the message
//!   carries the QoS it was published with (`links::QOS_PROPERTY`), and the connection
//!   delivers the minimum, answering the router's ack itself where it downgrades.
//!
//! Every end is counted in `edgebridge_connections_closed_total{listener,reason}`.
//!
//! Memory: an idle connection is its task's future plus small buffers (the read buffer
//! starts empty and grows only for a large packet). What is awaited only at CONNECT, at
//! the end, or while one packet is handled is boxed (`Box::pin`), so the task keeps
//! only its steady-state wait: the future shrank from 8.9 to 5.6 KB, and 5,000 idle
//! publish-only connections cost 7.2 KiB each in RSS instead of 10.3 (debug build;
//! rumqttd's `Server` cost 45 KiB). The session's start (joining the router, the
//! CONNACK) and a batch of router notifications are boxed as well: 10,000 idle
//! publish-only connections (`cargo bench --bench idle`, release build) cost 5.16 KiB
//! each instead of 7.19. A device that subscribes adds rumqttd's router queues (~34 KiB:
//! 39.1 KiB per connection measured).
//!
//! Files: this one takes a connection from the socket to a running session (takeover,
//! the connection limit); [`connect`] reads and admits the CONNECT (client id,
//! authentication), [`session`] is the session's loop and its end,
//! [`inbound`] what the device sends, [`outbound`] what it receives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use parking_lot::RwLock;
use rumqttd::local::LinkRx;
use rumqttd::protocol::v4;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, Disconnect,
    DisconnectProperties, DisconnectReasonCode, Error, LastWill, LastWillProperties, Login, Packet,
    PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel,
    PubRelReason, Publish, PublishProperties, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::{Forward, Notification};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth::{Grants, Identity, Refusal, Security};
use super::config::{AckMode, ListenerPlan};
use super::intake::{AckTicket, AckTracker, IntakeItem};
use super::links::{self, Claim, Links};
use super::persist::Subscription;
use super::protocol::{self, Version};
use super::subscriptions::{Subscriptions, Verdict};
use super::transport::{Handshake, Transport};
use crate::message::{now_millis, Message};
use crate::metrics::ListenerMetrics;
use crate::topic::TopicFilter;

/// How long a device's PUBACK may wait for durability before its connection is dropped
/// (the device then resends; nothing is lost).
mod connect;
mod inbound;
mod outbound;
mod session;

use connect::*;

const DURABLE_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a new connection waits for the one it takes over to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// How long the last words to a device (DISCONNECT, TLS close_notify, WebSocket
/// close) may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Topic aliases a device may set (CONNACK's topic alias maximum): bounds the memory a
/// device's aliases take.
const TOPIC_ALIAS_MAX: u16 = 64;

/// Router notifications handled before the connection writes to the device.
const NOTIFICATION_BATCH: usize = 256;

/// Ids for devices that connect with an empty client id (a control character keeps
/// them apart from every id a device may choose).
static ASSIGNED_IDS: AtomicU64 = AtomicU64::new(1);

/// State shared by all connections of one listener.
pub struct ListenerShared {
    pub index: usize,
    pub name: String,
    pub ack: AckMode,
    pub max_connections: usize,
    pub max_inflight: u16,
    /// Seconds; MQTT 5 devices that ask for more (or none) get this.
    pub max_keep_alive: Option<u16>,
    pub max_packet_size: usize,
    pub connect_timeout: Duration,
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
    /// TLS and WebSocket handshakes of this listener.
    pub handshake: Handshake,
    pub links: Arc<Links>,
    /// Cancelled when the listener stops: every connection closes (MQTT 5: 0x8B).
    pub shutdown: CancellationToken,
}

/// What every listener of the broker shares.
#[derive(Clone)]
pub struct BrokerShared {
    pub qos0_high_water: usize,
    pub intake: mpsc::Sender<IntakeItem>,
    pub stopping: Arc<AtomicBool>,
    pub security: Arc<RwLock<Arc<Security>>>,
    pub links: Arc<Links>,
}

impl ListenerShared {
    pub fn new(
        index: usize,
        plan: &ListenerPlan,
        broker: &BrokerShared,
        metrics: ListenerMetrics,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            index,
            name: plan.name.clone(),
            ack: plan.ack,
            max_connections: plan.max_connections,
            max_inflight: plan.max_inflight,
            max_keep_alive: plan.max_keep_alive,
            max_packet_size: plan.max_packet_size,
            connect_timeout: plan.connect_timeout,
            qos0_high_water: broker.qos0_high_water,
            intake: broker.intake.clone(),
            metrics,
            connections: AtomicUsize::new(0),
            stopping: broker.stopping.clone(),
            allow_anonymous: plan.allow_anonymous,
            security: broker.security.clone(),
            handshake: Handshake::new(plan)?,
            links: broker.links.clone(),
            shutdown: CancellationToken::new(),
        })
    }
}

/// Why a connection ended: the `reason` label of `edgebridge_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// TLS or WebSocket handshake failed or timed out.
    Handshake,
    /// No complete CONNECT within `connect_timeout`.
    ConnectTimeout,
    /// CONNECT refused with a CONNACK (credentials, ACL, limits, protocol level…).
    Refused,
    /// The device sent DISCONNECT.
    ClientDisconnect,
    /// The device closed the socket (or it failed) without DISCONNECT.
    PeerClosed,
    /// Nothing received for 1.5 × the keep-alive.
    KeepAlive,
    /// A malformed packet, one a device must not send, or a protocol violation.
    ProtocolError,
    /// A packet over the listener's `max_packet_size`.
    PacketTooLarge,
    /// Another connection took the client id over.
    TakenOver,
    /// A withheld ack did not become durable in time.
    DurableTimeout,
    /// A message could not be stored: the device resends what was not acked.
    StoreFailed,
    /// The gateway is stopping.
    Shutdown,
    /// rumqttd's router ended the connection's link.
    Router,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Handshake => "handshake",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::Refused => "refused",
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::KeepAlive => "keep_alive",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::PacketTooLarge => "packet_too_large",
            CloseReason::TakenOver => "taken_over",
            CloseReason::DurableTimeout => "durable_timeout",
            CloseReason::StoreFailed => "store_failed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Router => "router",
        }
    }

    /// Whether the will is published (everything but a DISCONNECT).
    fn abnormal(self) -> bool {
        self != CloseReason::ClientDisconnect
    }
}

/// Serves one accepted socket to its end.
pub async fn run(shared: Arc<ListenerShared>, socket: TcpStream, peer: SocketAddr) {
    // Small packets (acks, pings) must not wait for Nagle's timer.
    let _ = socket.set_nodelay(true);
    let handshake = tokio::time::timeout(
        shared.connect_timeout,
        Box::pin(shared.handshake.accept(socket)),
    );
    let (mut io, cn) = match handshake.await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            shared.metrics.refused.handshake.inc();
            info!(listener = %shared.name, %peer, error = %format!("{e:#}"), "device handshake failed");
            shared.metrics.closed.inc(CloseReason::Handshake.label());
            return;
        }
        Err(_) => {
            shared.metrics.refused.handshake.inc();
            info!(listener = %shared.name, %peer, timeout = ?shared.connect_timeout, "device handshake timed out");
            shared.metrics.closed.inc(CloseReason::Handshake.label());
            return;
        }
    };
    let reason = serve(&shared, &mut io, cn, peer).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, io.close()).await;
    debug!(listener = %shared.name, %peer, reason = reason.label(), "device connection closed");
    shared.metrics.closed.inc(reason.label());
}

/// Holds one of the listener's `max_connections` slots.
struct Slot<'a>(&'a ListenerShared);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections.dec();
    }
}

/// Serves a connection from its CONNECT to its end (the handshake done).
async fn serve(
    shared: &Arc<ListenerShared>,
    io: &mut Transport,
    cn: Option<String>,
    peer: SocketAddr,
) -> CloseReason {
    let mut buf = BytesMut::new();
    let connected = match tokio::time::timeout(
        shared.connect_timeout,
        Box::pin(read_connect(shared, io, &mut buf)),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(reason)) => return reason,
        Err(_) => return CloseReason::ConnectTimeout,
    };
    let grants = match Box::pin(admit(shared, io, &connected, cn.as_deref())).await {
        Ok(grants) => grants,
        Err(reason) => return reason,
    };
    let client_id: Arc<str> = Arc::from(connected.connect.client_id.as_str());
    let key = if client_id.is_empty() {
        format!(
            "\u{1}assigned-{}",
            ASSIGNED_IDS.fetch_add(1, Ordering::Relaxed)
        )
    } else {
        client_id.to_string()
    };
    // A connection taking a session over is served even at the limit: the one it
    // replaces is closed (and its slot freed) first.
    let claim = Box::pin(shared.links.claim(&key, TAKEOVER_WAIT)).await;
    let before = shared.connections.fetch_add(1, Ordering::Relaxed);
    if before >= shared.max_connections {
        shared.connections.fetch_sub(1, Ordering::Relaxed);
        shared.links.release(&key, claim.generation);
        shared.metrics.refused.max_connections.inc();
        log_refusal(shared, &connected.connect, "max_connections reached");
        return Box::pin(refuse(
            io,
            connected.version,
            ConnectReturnCode::ServerBusy,
            "the listener is at its connection limit",
        ))
        .await;
    }
    shared.metrics.connections.inc();
    let _slot = Slot(shared);
    let keep_alive = connected.connect.keep_alive;
    let mut session = Session::new(shared, connected, &claim, client_id, key, grants);
    let reason = session.run(io, &mut buf, keep_alive, &claim, peer).await;
    Box::pin(session.end(reason, &claim)).await;
    reason
}

/// The PUBACK (QoS 1) or PUBREC (QoS 2 and above) for packet `pkid`: success, or with
/// `not_authorized` MQTT 5's refusal by the ACL.
fn ack_packet(qos: u8, pkid: u16, not_authorized: bool) -> Packet {
    if qos == 1 {
        let reason = if not_authorized {
            PubAckReason::NotAuthorized
        } else {
            PubAckReason::Success
        };
        Packet::PubAck(PubAck { pkid, reason }, None)
    } else {
        let reason = if not_authorized {
            PubRecReason::NotAuthorized
        } else {
            PubRecReason::Success
        };
        Packet::PubRec(PubRec { pkid, reason }, None)
    }
}

/// QoS and packet id of a PUBLISH as read from its frame ((0, 0) for other packets).
type PublishMeta = (u8, u16);

/// An ack to write once everything up to `seq` is durable.
struct PendingAck {
    seq: u64,
    since: Instant,
    packet: Packet,
}

/// The connection's own link of the router.
struct OwnLink {
    id: u64,
    rx: LinkRx,
}

/// A connected device.
struct Session {
    shared: Arc<ListenerShared>,
    /// Cancelled when another connection takes the client id over.
    kick: CancellationToken,
    version: Version,
    /// The device's client id, handed to the rules with each message.
    client_id: Arc<str>,
    /// The id in the router and the takeover registry (the client id, or an assigned one).
    key: String,
    persistent: bool,
    /// How long a persistent session outlives the connection (`None`: for ever).
    session_expiry: Option<Duration>,
    /// What the ACL lets this device do (set at CONNECT).
    grants: Grants,
    will: Option<(LastWill, Option<LastWillProperties>)>,
    /// MQTT 5 topic aliases set by the device.
    aliases: HashMap<u16, Bytes>,
    /// `ack = "durable"`: progress of this connection's messages through the rules.
    tracker: Option<Arc<AckTracker>>,
    next_seq: u64,
    /// Acks withheld until durable, in the order of their publishes (MQTT-4.6.0-2).
    pending: VecDeque<PendingAck>,
    /// Inbound QoS 2 packet ids between PUBLISH and PUBREL: a resent PUBLISH is not
    /// taken twice (exactly once towards intake and local subscribers).
    inbound_qos2: HashSet<u16>,
    /// Present once the device subscribed (or its session holds subscriptions).
    link: Option<OwnLink>,
    /// The router's QoS 1/2 deliveries in order, with the ack to give it once known
    /// (rumqttd refuses acks out of order).
    router_acks: VecDeque<(u16, Option<Packet>)>,
    /// The router's PUBRELs in order, with the PUBCOMP once known.
    router_comps: VecDeque<(u16, Option<Packet>)>,
    /// Deliveries sent at QoS 1 for a QoS 2 subscription: the device's PUBACK becomes a
    /// PUBREC for the router.
    downgraded: HashSet<u16>,
    /// PUBRELs the connection answers itself (its deliveries were downgraded).
    self_pubrel: HashSet<u16>,
    /// SUBSCRIBE packet id → positions of denied filters and their codes, for its SUBACK.
    denied_filters: HashMap<u16, Vec<(usize, SubscribeReasonCode)>>,
    /// Encoded packets for the device, written before the next wait.
    out: BytesMut,
    /// Withheld acks allowed at once: the listener's `max_inflight`, or less.
    receive_max: u16,
    /// QoS 1/2 deliveries the device takes before it acks (its MQTT 5 receive maximum):
    /// the router's link is not read while that many await the device.
    device_receive_max: u16,
    /// The largest packet the device takes (its MQTT 5 maximum packet size): a larger
    /// delivery is dropped as MQTT-3.1.2-25 says, as if it had been sent.
    device_max_packet: usize,
    /// MQTT 5 subscription options the router does not apply (no local, retain as
    /// published, retain handling).
    subscriptions: Subscriptions,
}

impl Session {
    /// The session of an admitted CONNECT. The CONNECT itself (credentials included) is
    /// not kept for the connection's life.
    fn new(
        shared: &Arc<ListenerShared>,
        connected: Connected,
        claim: &Claim,
        client_id: Arc<str>,
        key: String,
        grants: Grants,
    ) -> Session {
        let props = connected.props.as_ref();
        // MQTT 5: a session outlives the connection only with a session expiry interval.
        // (An assigned id is never used again: nothing to keep for it.)
        let persistent = !connected.connect.clean_session
            && !client_id.is_empty()
            && (connected.version == Version::V4
                || props
                    .and_then(|p| p.session_expiry_interval)
                    .is_some_and(|s| s > 0));
        // MQTT 5's 0xFFFFFFFF is "never"; 3.1.1 sessions never expire.
        let session_expiry = props
            .and_then(|p| p.session_expiry_interval)
            .filter(|&s| s != u32::MAX)
            .map(|s| Duration::from_secs(u64::from(s)));
        let receive_maximum = props.and_then(|p| p.receive_maximum);
        let device_max_packet = props
            .and_then(|p| p.max_packet_size)
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(usize::MAX);
        Session {
            shared: shared.clone(),
            kick: claim.kick.clone(),
            version: connected.version,
            client_id,
            key,
            persistent,
            session_expiry,
            grants,
            will: connected.will.map(|w| (w, connected.will_props)),
            aliases: HashMap::new(),
            tracker: (shared.ack == AckMode::Durable).then(|| Arc::new(AckTracker::default())),
            next_seq: 0,
            pending: VecDeque::new(),
            inbound_qos2: HashSet::new(),
            link: None,
            router_acks: VecDeque::new(),
            router_comps: VecDeque::new(),
            downgraded: HashSet::new(),
            self_pubrel: HashSet::new(),
            denied_filters: HashMap::new(),
            out: BytesMut::new(),
            receive_max: shared.max_inflight.min(receive_maximum.unwrap_or(u16::MAX)),
            // MQTT 5: deliveries the device takes unacknowledged at once.
            device_receive_max: receive_maximum.filter(|&m| m > 0).unwrap_or(u16::MAX),
            device_max_packet,
            subscriptions: Subscriptions::default(),
        }
    }
}

/// Publishes a will like a device message: to intake (so rules can forward it) and to
/// local subscribers. Its topic passed the ACL at CONNECT.
async fn publish_will(
    shared: &ListenerShared,
    client_id: &Arc<str>,
    will: LastWill,
    props: Option<LastWillProperties>,
) {
    let Ok(topic) = std::str::from_utf8(&will.topic).map(str::to_string) else {
        return;
    };
    let qos = will.qos as u8;
    let props = props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    });
    let msg = Message {
        topic,
        payload: will.message.clone(),
        qos,
        retain: will.retain,
        properties: props.as_ref().and_then(protocol::properties_of),
        received_at: now_millis(),
    };
    let item = IntakeItem {
        listener: shared.index,
        msg,
        client_id: client_id.clone(),
        ack: None,
    };
    if !shared.stopping.load(Ordering::Relaxed) {
        // Bounded: a full intake queue must not hold a takeover up for long.
        match tokio::time::timeout(TAKEOVER_WAIT / 2, shared.intake.send(item)).await {
            Ok(Ok(())) => shared.metrics.received.inc(),
            _ => shared.metrics.intake_full.inc(),
        }
    }
    if let Err(e) = shared
        .links
        .publish(will.topic, will.message, will.retain, qos, props, None)
        .await
    {
        warn!(listener = %shared.name, error = %e, "cannot pass a will to local subscribers");
    }
}

/// A subscription filter rumqttd can take (it drops the link on `$` filters other
/// than shared subscriptions).
fn valid_filter(filter: &str) -> bool {
    let inner = filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, f)| f);
    let path = match inner {
        Some(f) => f,
        None if filter.starts_with('$') => return false,
        None => filter,
    };
    !path.is_empty() && !path.contains('\0') && TopicFilter::parse(path).is_ok()
}

async fn next_notification(
    link: &mut Option<OwnLink>,
) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match link {
        Some(link) => link.rx.next().await,
        None => std::future::pending().await,
    }
}

/// For the fuzz target `device_packets` (fuzz/, `broker::fuzz_device_bytes`): what a
/// connection does with a device's bytes, without a socket. Frames are split as
/// `read_frame` does; the first must be a CONNECT, whose protocol level picks the codec
/// (a 3.1 CONNECT rewritten to 3.1.1 first); every later frame is parsed with it, and
/// each packet is encoded back for the same version, as deliveries and acks are. Returns
/// how many packets parsed; stops at the first error, as a connection closes there.
pub fn parse_device_bytes(data: &[u8], max_packet: usize) -> usize {
    let mut buf = BytesMut::from(data);
    let mut version = None;
    let mut parsed = 0;
    loop {
        let header = match v4::check(buf.iter(), max_packet) {
            Ok(header) => header,
            Err(_) => return parsed,
        };
        let (fixed_header_len, frame_len) = (header.fixed_header_len, header.frame_length());
        let mut frame = match version {
            Some(_) => buf.split_to(frame_len),
            None => {
                if buf[0] >> 4 != 1 {
                    return parsed;
                }
                let frame = buf.split_to(frame_len);
                match connect_level(&frame, fixed_header_len) {
                    Level::V311 => {
                        version = Some(Version::V4);
                        frame
                    }
                    Level::V5 => {
                        version = Some(Version::V5);
                        frame
                    }
                    Level::V31 => match protocol::connect_31_as_311(&frame, fixed_header_len) {
                        Some(rewritten) => {
                            version = Some(Version::V4);
                            rewritten
                        }
                        None => return parsed,
                    },
                    Level::Unknown(_) | Level::Malformed => return parsed,
                }
            }
        };
        let Some(v) = version else {
            return parsed;
        };
        let frame_bytes = frame.clone();
        let packet = match protocol::read(v, &mut frame, max_packet) {
            Ok(packet) => packet,
            Err(_) => return parsed,
        };
        if matches!(packet, Packet::Publish(..)) {
            let _ = protocol::publish_qos_pkid(&frame_bytes, fixed_header_len);
        }
        let mut out = BytesMut::new();
        let _ = protocol::write(v, packet, &mut out);
        parsed += 1;
    }
}
