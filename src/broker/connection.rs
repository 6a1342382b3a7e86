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
//! rumqttd's `Server` cost 45 KiB). A device that subscribes adds rumqttd's router
//! queues (~34 KiB: 40.5 KiB per connection measured).

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

/// Password verifications (argon2: ~20 MiB and tens of ms each) running at once: a
/// flood of CONNECTs with wrong passwords costs time, not memory.
static VERIFY_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

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

/// Appends device bytes to `buf` until it holds a complete packet; returns its fixed
/// header length and total length.
async fn read_frame(
    io: &mut Transport,
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<(usize, usize), CloseReason> {
    loop {
        match v4::check(buf.iter(), max_size) {
            Ok(header) => return Ok((header.fixed_header_len, header.frame_length())),
            Err(Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                match io.read(buf).await {
                    Ok(0) | Err(_) => return Err(CloseReason::PeerClosed),
                    Ok(_) => {}
                }
            }
            Err(e) => return Err(frame_error(&e)),
        }
    }
}

fn frame_error(e: &Error) -> CloseReason {
    match e {
        Error::PayloadSizeLimitExceeded(_) => CloseReason::PacketTooLarge,
        _ => CloseReason::ProtocolError,
    }
}

/// The CONNECT of a connection: what `serve` needs from it.
struct Connected {
    version: Version,
    connect: Connect,
    props: Option<ConnectProperties>,
    will: Option<LastWill>,
    will_props: Option<LastWillProperties>,
    login: Option<Login>,
}

/// Reads the CONNECT. `Err` ends the connection with that reason (an unknown protocol
/// level was already answered).
async fn read_connect(
    shared: &ListenerShared,
    io: &mut Transport,
    buf: &mut BytesMut,
) -> Result<Connected, CloseReason> {
    let (fixed_header_len, frame_len) = read_frame(io, buf, shared.max_packet_size).await?;
    if buf[0] >> 4 != 1 {
        return Err(CloseReason::ProtocolError);
    }
    let (version, mut frame) = match connect_level(&buf[..frame_len], fixed_header_len) {
        Level::V311 => (Version::V4, buf.split_to(frame_len)),
        Level::V5 => (Version::V5, buf.split_to(frame_len)),
        Level::V31 => {
            let frame = buf.split_to(frame_len);
            match protocol::connect_31_as_311(&frame, fixed_header_len) {
                Some(rewritten) => (Version::V4, rewritten),
                None => return Err(CloseReason::ProtocolError),
            }
        }
        Level::Unknown(level) => {
            shared.metrics.refused.protocol_version.inc();
            info!(listener = %shared.name, level, "refusing a CONNECT with an unknown protocol level");
            // MQTT-3.1.2-2: CONNACK 0x01 and close; a client above level 5 gets MQTT 5's
            // format and code (0x84).
            let connack: &[u8] = if level > 5 {
                &[0x20, 3, 0, 0x84, 0]
            } else {
                &[0x20, 2, 0, 0x01]
            };
            let _ = io.write(BytesMut::from(connack)).await;
            return Err(CloseReason::Refused);
        }
        Level::Malformed => return Err(CloseReason::ProtocolError),
    };
    match protocol::read(version, &mut frame, shared.max_packet_size) {
        Ok(Packet::Connect(connect, props, will, will_props, login)) => Ok(Connected {
            version,
            connect,
            props,
            will,
            will_props,
            login,
        }),
        Ok(_) => Err(CloseReason::ProtocolError),
        Err(e) => Err(frame_error(&e)),
    }
}

enum Level {
    V31,
    V311,
    V5,
    Unknown(u8),
    Malformed,
}

fn connect_level(frame: &[u8], fixed_header_len: usize) -> Level {
    match protocol::connect_level(frame, fixed_header_len) {
        Some((b"MQTT", 4)) => Level::V311,
        Some((b"MQTT", 5)) => Level::V5,
        Some((b"MQIsdp", 3)) => Level::V31,
        Some((b"MQTT" | b"MQIsdp", level)) => Level::Unknown(level),
        _ => Level::Malformed,
    }
}

/// Refuses a CONNECT with `code`; MQTT 5 devices also get `why` as the reason string.
async fn refuse(
    io: &mut Transport,
    version: Version,
    code: ConnectReturnCode,
    why: &str,
) -> CloseReason {
    let mut out = BytesMut::new();
    let ack = ConnAck {
        session_present: false,
        code,
    };
    let props = (version == Version::V5).then(|| ConnAckProperties {
        reason_string: Some(why.to_string()),
        ..ConnAckProperties::default()
    });
    if protocol::write(version, Packet::ConnAck(ack, props), &mut out).is_ok() {
        let _ = io.write(out).await;
    }
    CloseReason::Refused
}

/// Holds one of the listener's `max_connections` slots.
struct Slot<'a>(&'a ListenerShared);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections.dec();
    }
}

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
    let version = connected.version;
    let connect = &connected.connect;
    let refused = &shared.metrics.refused;
    if !protocol::valid_client_id(&connect.client_id)
        || (connect.client_id.is_empty() && version == Version::V4 && !connect.clean_session)
    {
        refused.invalid_client_id.inc();
        log_refusal(shared, connect, "invalid client id");
        return Box::pin(refuse(
            io,
            version,
            ConnectReturnCode::ClientIdentifierNotValid,
            "client identifier not valid",
        ))
        .await;
    }
    if shared.stopping.load(Ordering::Relaxed) {
        return Box::pin(refuse(
            io,
            version,
            ConnectReturnCode::ServerUnavailable,
            "the gateway is shutting down",
        ))
        .await;
    }
    let grants = match Box::pin(authorize(shared, &connected, cn.as_deref())).await {
        Ok(grants) => grants,
        Err(code) => {
            log_refusal(shared, connect, "not authorized");
            return Box::pin(refuse(io, version, code, "not authorized")).await;
        }
    };
    let client_id: Arc<str> = Arc::from(connect.client_id.as_str());
    let key = if client_id.is_empty() {
        format!(
            "\u{1}assigned-{}",
            ASSIGNED_IDS.fetch_add(1, Ordering::Relaxed)
        )
    } else {
        client_id.to_string()
    };
    // MQTT 5: a session outlives the connection only with a session expiry interval.
    // (An assigned id is never used again: nothing to keep for it.)
    let persistent = !connect.clean_session
        && !client_id.is_empty()
        && (version == Version::V4
            || connected
                .props
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .is_some_and(|s| s > 0));
    // A connection taking a session over is served even at the limit: the one it
    // replaces is closed (and its slot freed) first.
    let claim = Box::pin(shared.links.claim(&key, TAKEOVER_WAIT)).await;
    let before = shared.connections.fetch_add(1, Ordering::Relaxed);
    if before >= shared.max_connections {
        shared.connections.fetch_sub(1, Ordering::Relaxed);
        shared.links.release(&key, claim.generation);
        refused.max_connections.inc();
        log_refusal(shared, connect, "max_connections reached");
        return Box::pin(refuse(
            io,
            version,
            ConnectReturnCode::ServerBusy,
            "the listener is at its connection limit",
        ))
        .await;
    }
    shared.metrics.connections.inc();
    let _slot = Slot(shared);
    let keep_alive = connect.keep_alive;
    // MQTT 5's 0xFFFFFFFF is "never"; 3.1.1 sessions never expire.
    let session_expiry = connected
        .props
        .as_ref()
        .and_then(|p| p.session_expiry_interval)
        .filter(|&s| s != u32::MAX)
        .map(|s| Duration::from_secs(u64::from(s)));
    // MQTT 5: deliveries the device takes unacknowledged at once.
    let device_receive_max = connected
        .props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .filter(|&m| m > 0)
        .unwrap_or(u16::MAX);
    let receive_max = shared.max_inflight.min(
        connected
            .props
            .as_ref()
            .and_then(|p| p.receive_maximum)
            .unwrap_or(u16::MAX),
    );
    let device_max_packet = connected
        .props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .and_then(|m| usize::try_from(m).ok())
        .unwrap_or(usize::MAX);
    let will = connected.will.map(|w| (w, connected.will_props));
    // The CONNECT (credentials included) is not kept for the connection's life.
    drop(connected.login);
    drop(connected.props);
    let mut session = Session {
        shared: shared.clone(),
        kick: claim.kick.clone(),
        version,
        client_id,
        key,
        persistent,
        session_expiry,
        grants,
        will,
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
        receive_max,
        device_receive_max,
        device_max_packet,
        subscriptions: Subscriptions::default(),
    };
    let reason = session.run(io, &mut buf, keep_alive, &claim, peer).await;
    Box::pin(session.end(reason, &claim)).await;
    reason
}

fn log_refusal(shared: &ListenerShared, connect: &Connect, why: &str) {
    info!(
        listener = %shared.name,
        client_id = %connect.client_id.escape_debug(),
        reason = why,
        "refusing device connection"
    );
}

/// Authenticates the device and settles its ACL grants; the `Err` is the CONNACK code
/// refusing it.
async fn authorize(
    shared: &ListenerShared,
    connected: &Connected,
    cn: Option<&str>,
) -> Result<Grants, ConnectReturnCode> {
    let security = shared.security.read().clone();
    let has_certificate = cn.is_some();
    let anonymous_ok = shared.allow_anonymous;
    let login = connected
        .login
        .as_ref()
        .map(|l| (l.username.clone(), l.password.clone()));
    let result = if login.is_some() && security.users.is_some() {
        // argon2 takes tens of milliseconds: off the async workers, a few at a time.
        let _slot = VERIFY_SLOTS.acquire().await.ok();
        let security = security.clone();
        tokio::task::spawn_blocking(move || {
            let credentials = login.as_ref().map(|(u, p)| (u.as_str(), p.as_bytes()));
            security.authenticate(credentials, has_certificate, anonymous_ok)
        })
        .await
        .unwrap_or(Err(Refusal::BadCredentials))
    } else {
        let credentials = login.as_ref().map(|(u, p)| (u.as_str(), p.as_bytes()));
        security.authenticate(credentials, has_certificate, anonymous_ok)
    };
    let refused = &shared.metrics.refused;
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
        client_id: connected.connect.client_id.clone(),
        cn: cn.map(str::to_string),
    };
    let grants = security.grants(&identity);
    if let Some(will) = &connected.will {
        let allowed = std::str::from_utf8(&will.topic)
            .map(|t| grants.may_publish(t))
            .unwrap_or(false);
        if !allowed {
            shared.metrics.acl_denied.inc();
            refused.not_authorized.inc();
            return Err(ConnectReturnCode::NotAuthorized);
        }
    }
    Ok(grants)
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
    fn write(&mut self, packet: Packet) -> Result<(), CloseReason> {
        protocol::write(self.version, packet, &mut self.out).map_err(|e| {
            warn!(listener = %self.shared.name, error = ?e, "cannot encode a packet for a device; closing");
            CloseReason::ProtocolError
        })
    }

    fn inflight_full(&self) -> bool {
        self.pending.len() >= self.receive_max as usize
    }

    /// Deliveries the device has not acked (PUBACK / PUBREC, then PUBCOMP).
    fn outbound_full(&self) -> bool {
        let waiting = self.router_acks.iter().filter(|(_, a)| a.is_none()).count()
            + self
                .router_comps
                .iter()
                .filter(|(_, a)| a.is_none())
                .count();
        waiting >= self.device_receive_max as usize
    }

    async fn run(
        &mut self,
        io: &mut Transport,
        buf: &mut BytesMut,
        keep_alive: u16,
        claim: &Claim,
        peer: SocketAddr,
    ) -> CloseReason {
        let start = self.shared.links.session(&self.key, !self.persistent);
        if start.discard {
            if let Err(e) = self.shared.links.discard(&self.key).await {
                warn!(listener = %self.shared.name, error = %e, "cannot drop an old session from the router");
                return CloseReason::Router;
            }
        }
        let session_present = start.present;
        if session_present {
            self.subscriptions = self.shared.links.take_options(&self.key);
        }
        if start.subscribed {
            if let Err(reason) = Box::pin(self.open_link()).await {
                return reason;
            }
        }
        // MQTT 5 server keep alive: the device is told the listener's limit and held to
        // it. A 3.1.x device cannot be told, so it keeps its own.
        let server_keep_alive = match (self.version, self.shared.max_keep_alive) {
            (Version::V5, Some(max)) if keep_alive == 0 || keep_alive > max => Some(max),
            _ => None,
        };
        let keep_alive = server_keep_alive.unwrap_or(keep_alive);
        let props = (self.version == Version::V5).then(|| ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(self.shared.max_inflight),
            max_qos: None,
            retain_available: None,
            max_packet_size: u32::try_from(self.shared.max_packet_size).ok(),
            assigned_client_identifier: None,
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        });
        let ack = ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        };
        if let Err(reason) = self.write(Packet::ConnAck(ack, props)) {
            return reason;
        }
        debug!(listener = %self.shared.name, %peer, client_id = %self.client_id.escape_debug(), "device connected");
        let keep_alive =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut last_read = Instant::now();
        let far = Duration::from_secs(86_400 * 365);
        loop {
            // Everything complete in the buffer first, as far as the window allows.
            while !self.inflight_full() {
                match self.next_packet(buf) {
                    Ok(Some((packet, meta))) => {
                        if let Err(reason) = Box::pin(self.on_packet(packet, meta, claim)).await {
                            if reason == CloseReason::ClientDisconnect {
                                Box::pin(self.flush(io)).await.ok();
                            }
                            return self.closing(io, reason).await;
                        }
                    }
                    Ok(None) => break,
                    Err(reason) => return self.closing(io, reason).await,
                }
            }
            if let Err(reason) = Box::pin(self.flush(io)).await {
                return reason;
            }
            // Give a large packet's memory back once it is handled.
            if buf.is_empty() && buf.capacity() > 4096 {
                *buf = BytesMut::new();
            }
            let front = self.pending.front().map(|p| (p.seq, p.since));
            let tracker = self.tracker.clone();
            let durable = async {
                match (front, tracker) {
                    (Some((seq, _)), Some(t)) => t.released(seq).await,
                    (Some(_), None) => true,
                    _ => std::future::pending().await,
                }
            };
            let ack_deadline = front.map_or(Instant::now() + far, |(_, since)| {
                since + DURABLE_ACK_TIMEOUT
            });
            let reading = !self.inflight_full();
            if !reading {
                // The gateway is not reading (the window is full): the device's silence
                // is not its own, so its keep-alive starts over once reading resumes.
                last_read = Instant::now();
            }
            let idle_deadline = last_read + keep_alive.unwrap_or(far);
            tokio::select! {
                biased;
                _ = claim.kick.cancelled() => {
                    Box::pin(self.disconnect(io, DisconnectReasonCode::SessionTakenOver)).await;
                    return CloseReason::TakenOver;
                }
                _ = self.shared.shutdown.cancelled() => {
                    Box::pin(self.disconnect(io, DisconnectReasonCode::ServerShuttingDown)).await;
                    return CloseReason::Shutdown;
                }
                released = durable => {
                    if !released {
                        warn!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), "a message could not be stored; closing so the device resends");
                        return CloseReason::StoreFailed;
                    }
                    if let Err(reason) = self.write_released() {
                        return reason;
                    }
                }
                n = next_notification(&mut self.link), if !self.outbound_full() => {
                    let mut next = Some(n);
                    let mut wake = false;
                    let mut handled = 0;
                    while let Some(n) = next.take() {
                        match n {
                            Ok(Some(notification)) => {
                                match Box::pin(self.on_notification(notification, &mut wake)).await {
                                    Ok(()) => {}
                                    Err(reason) => return reason,
                                }
                            }
                            Ok(None) => break,
                            Err(_) => return CloseReason::Router,
                        }
                        handled += 1;
                        if handled < NOTIFICATION_BATCH && !self.outbound_full() {
                            if let Some(link) = self.link.as_mut() {
                                next = link.rx.next().now_or_never();
                            }
                        }
                    }
                    if let Err(reason) = Box::pin(self.flush(io)).await {
                        return reason;
                    }
                    if wake {
                        if let Some(link) = &self.link {
                            if Box::pin(link.rx.wake()).await.is_err() {
                                return CloseReason::Router;
                            }
                        }
                    }
                }
                read = io.read(buf), if reading => {
                    match read {
                        Ok(0) | Err(_) => return CloseReason::PeerClosed,
                        Ok(_) => last_read = Instant::now(),
                    }
                }
                _ = tokio::time::sleep_until(ack_deadline) => {
                    debug!(listener = %self.shared.name, "message not durable in time; withholding its ack and closing");
                    return CloseReason::DurableTimeout;
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    Box::pin(self.disconnect(io, DisconnectReasonCode::KeepAliveTimeout)).await;
                    return CloseReason::KeepAlive;
                }
            }
        }
    }

    async fn flush(&mut self, io: &mut Transport) -> Result<(), CloseReason> {
        if self.out.is_empty() {
            return Ok(());
        }
        let data = self.out.split();
        // Do not keep a large delivery's buffer for an idle connection.
        if self.out.capacity() > 16 * 1024 {
            self.out = BytesMut::new();
        }
        // A device that stops reading must not hold its task (and so a takeover or
        // the shutdown) forever.
        tokio::select! {
            written = io.write(data) => written.map_err(|_| CloseReason::PeerClosed),
            _ = self.kick.cancelled() => Err(CloseReason::TakenOver),
            _ = self.shared.shutdown.cancelled() => Err(CloseReason::Shutdown),
        }
    }

    /// Ends the connection for a fault of the device's: MQTT 5 devices are told why.
    async fn closing(&mut self, io: &mut Transport, reason: CloseReason) -> CloseReason {
        let code = match reason {
            CloseReason::ProtocolError => Some(DisconnectReasonCode::ProtocolError),
            CloseReason::PacketTooLarge => Some(DisconnectReasonCode::PacketTooLarge),
            CloseReason::Shutdown => Some(DisconnectReasonCode::ServerShuttingDown),
            CloseReason::TakenOver => Some(DisconnectReasonCode::SessionTakenOver),
            _ => None,
        };
        if let Some(code) = code {
            Box::pin(self.disconnect(io, code)).await;
        }
        reason
    }

    /// MQTT 5 devices are told why the server closes.
    async fn disconnect(&mut self, io: &mut Transport, reason_code: DisconnectReasonCode) {
        if self.version == Version::V5 {
            let why = match reason_code {
                DisconnectReasonCode::SessionTakenOver => {
                    "another connection took this client id over"
                }
                DisconnectReasonCode::ServerShuttingDown => "the gateway is shutting down",
                DisconnectReasonCode::KeepAliveTimeout => {
                    "no packet within 1.5 times the keep alive"
                }
                DisconnectReasonCode::PacketTooLarge => {
                    "packet over the listener's maximum packet size"
                }
                _ => "protocol error",
            };
            let props = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(why.to_string()),
                user_properties: Vec::new(),
                server_reference: None,
            };
            let packet = Packet::Disconnect(Disconnect { reason_code }, Some(props));
            if self.write(packet).is_ok() {
                let data = self.out.split();
                let _ = tokio::time::timeout(CLOSE_WAIT, io.write(data)).await;
            }
        }
    }

    /// The next complete packet in `buf`, if any.
    fn next_packet(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<(Packet, PublishMeta)>, CloseReason> {
        let max = self.shared.max_packet_size;
        let (fixed_header_len, frame_len) = match v4::check(buf.iter(), max) {
            Ok(header) => (header.fixed_header_len, header.frame_length()),
            Err(Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                return Ok(None);
            }
            Err(e) => return Err(frame_error(&e)),
        };
        let packet_type = buf[0] >> 4;
        if packet_type == 1 || protocol::server_only(packet_type) {
            debug!(listener = %self.shared.name, packet_type, "a device sent a packet it must not send; closing");
            return Err(CloseReason::ProtocolError);
        }
        // QoS and packet id of a PUBLISH (rumqttd keeps them crate-private).
        let meta = if packet_type == 3 {
            match protocol::publish_qos_pkid(&buf[..frame_len], fixed_header_len) {
                Some(meta @ (0..=2, _)) => meta,
                _ => return Err(CloseReason::ProtocolError),
            }
        } else {
            (0, 0)
        };
        match protocol::read(self.version, buf, max) {
            Ok(packet) => Ok(Some((packet, meta))),
            Err(e) => {
                self.shared.metrics.invalid.inc();
                Err(frame_error(&e))
            }
        }
    }

    async fn on_packet(
        &mut self,
        packet: Packet,
        (qos, pkid): (u8, u16),
        claim: &Claim,
    ) -> Result<(), CloseReason> {
        match packet {
            Packet::Publish(publish, props) => {
                self.on_publish(publish, props, qos, pkid, claim).await
            }
            Packet::PubAck(ack, _) => {
                let answer = if self.downgraded.remove(&ack.pkid) {
                    self.self_pubrel.insert(ack.pkid);
                    Packet::PubRec(
                        PubRec {
                            pkid: ack.pkid,
                            reason: PubRecReason::Success,
                        },
                        None,
                    )
                } else {
                    Packet::PubAck(ack, None)
                };
                self.router_ack(answer).await
            }
            Packet::PubRec(rec, _) => self.router_ack(Packet::PubRec(rec, None)).await,
            Packet::PubComp(comp, _) => {
                let pkid = comp.pkid;
                if let Some(entry) = self
                    .router_comps
                    .iter_mut()
                    .find(|(p, a)| *p == pkid && a.is_none())
                {
                    entry.1 = Some(Packet::PubComp(comp, None));
                }
                self.send_ready_acks().await
            }
            Packet::PubRel(rel, _) => {
                let known = self.inbound_qos2.remove(&rel.pkid);
                let reason = if known || self.version == Version::V4 {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                self.write(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                ))
            }
            Packet::Subscribe(subscribe, props) => self.on_subscribe(subscribe, props).await,
            Packet::Unsubscribe(unsubscribe, props) => {
                let pkid = unsubscribe.pkid;
                let count = unsubscribe.filters.len();
                for path in &unsubscribe.filters {
                    self.subscriptions.unsubscribe(path);
                }
                if self.persistent {
                    self.shared
                        .links
                        .persist
                        .unsubscribe(&self.key, &unsubscribe.filters);
                }
                if let Some(link) = &self.link {
                    let id = link.id;
                    self.shared
                        .links
                        .send(id, Packet::Unsubscribe(unsubscribe, props))
                        .await
                        .map_err(|_| CloseReason::Router)?;
                }
                // rumqttd answers only filters it had: every UNSUBSCRIBE is answered
                // here, and the router's UNSUBACK is dropped.
                self.write(Packet::UnsubAck(
                    UnsubAck {
                        pkid,
                        reasons: vec![UnsubAckReason::Success; count],
                    },
                    None,
                ))
            }
            Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)),
            Packet::Disconnect(disconnect, _) => {
                if disconnect.reason_code != DisconnectReasonCode::DisconnectWithWillMessage {
                    self.will = None;
                }
                Err(CloseReason::ClientDisconnect)
            }
            _ => Err(CloseReason::ProtocolError),
        }
    }

    /// The device acked a delivery: the router gets the ack once every earlier one is
    /// known (rumqttd refuses acks out of order).
    async fn router_ack(&mut self, answer: Packet) -> Result<(), CloseReason> {
        let pkid = match &answer {
            Packet::PubAck(a, _) => a.pkid,
            Packet::PubRec(r, _) => r.pkid,
            _ => return Ok(()),
        };
        if let Some(entry) = self
            .router_acks
            .iter_mut()
            .find(|(p, a)| *p == pkid && a.is_none())
        {
            entry.1 = Some(answer);
        }
        self.send_ready_acks().await
    }

    async fn send_ready_acks(&mut self) -> Result<(), CloseReason> {
        let Some(id) = self.link.as_ref().map(|l| l.id) else {
            return Ok(());
        };
        while let Some((_, Some(_))) = self.router_acks.front() {
            if let Some((_, Some(packet))) = self.router_acks.pop_front() {
                self.shared
                    .links
                    .send(id, packet)
                    .await
                    .map_err(|_| CloseReason::Router)?;
            }
        }
        while let Some((_, Some(_))) = self.router_comps.front() {
            if let Some((_, Some(packet))) = self.router_comps.pop_front() {
                self.shared
                    .links
                    .send(id, packet)
                    .await
                    .map_err(|_| CloseReason::Router)?;
            }
        }
        Ok(())
    }

    async fn open_link(&mut self) -> Result<(), CloseReason> {
        if self.link.is_some() {
            return Ok(());
        }
        match self.shared.links.open(&self.key, !self.persistent).await {
            Ok((id, rx)) => {
                self.link = Some(OwnLink { id, rx });
                Ok(())
            }
            Err(e) => {
                warn!(listener = %self.shared.name, error = %e, "cannot join a device to the router");
                Err(CloseReason::Router)
            }
        }
    }

    async fn on_subscribe(
        &mut self,
        mut subscribe: Subscribe,
        props: Option<SubscribeProperties>,
    ) -> Result<(), CloseReason> {
        if subscribe.filters.is_empty() {
            return Err(CloseReason::ProtocolError);
        }
        let v5 = self.version == Version::V5;
        let mut denied = Vec::new();
        for (i, f) in subscribe.filters.iter().enumerate() {
            let code = if !valid_filter(&f.path) {
                Some(if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                })
            } else if !self.grants.may_subscribe(&f.path) {
                self.shared.metrics.acl_denied.inc();
                Some(if v5 {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                })
            } else {
                None
            };
            if let Some(code) = code {
                denied.push((i, code));
            }
        }
        if !denied.is_empty() {
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), denied = denied.len(), "subscription refused");
        }
        if denied.len() == subscribe.filters.len() {
            let return_codes = denied.into_iter().map(|(_, c)| c).collect();
            return self.write(Packet::SubAck(
                SubAck {
                    pkid: subscribe.pkid,
                    return_codes,
                },
                None,
            ));
        }
        for &(i, _) in denied.iter().rev() {
            subscribe.filters.remove(i);
        }
        if !denied.is_empty() {
            self.denied_filters.insert(subscribe.pkid, denied);
        }
        self.open_link().await?;
        for f in &subscribe.filters {
            self.subscriptions.subscribe(f);
        }
        if self.subscriptions.wants_origin() {
            self.shared.links.want_origin();
        }
        if self.persistent {
            let filters = subscribe
                .filters
                .iter()
                .map(|f| (f.path.clone(), Subscription::of(f)))
                .collect();
            self.shared.links.session_subscribed(&self.key, filters);
        }
        let Some(id) = self.link.as_ref().map(|l| l.id) else {
            return Err(CloseReason::Router);
        };
        self.shared
            .links
            .send(id, Packet::Subscribe(subscribe, props))
            .await
            .map_err(|_| CloseReason::Router)
    }

    async fn on_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        claim: &Claim,
    ) -> Result<(), CloseReason> {
        let metrics = self.shared.metrics.clone();
        if let Some(p) = props.as_mut() {
            if let Some(alias) = p.topic_alias.take() {
                if alias == 0 || alias > TOPIC_ALIAS_MAX {
                    metrics.invalid.inc();
                    return Err(CloseReason::ProtocolError);
                }
                if publish.topic.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => publish.topic = t.clone(),
                        None => {
                            metrics.invalid.inc();
                            return Err(CloseReason::ProtocolError);
                        }
                    }
                } else {
                    self.aliases.insert(alias, publish.topic.clone());
                }
            }
            // A device must not send these; a spoofed QoS marker is dropped too.
            p.subscription_identifiers.clear();
            p.user_properties.retain(|(k, _)| !links::is_mark(k));
        }
        let topic = match std::str::from_utf8(&publish.topic) {
            Ok(t) if !t.is_empty() && !t.contains(['+', '#', '\0']) => t.to_string(),
            _ => {
                metrics.invalid.inc();
                return Err(CloseReason::ProtocolError);
            }
        };
        if !self.grants.may_publish(&topic) {
            metrics.acl_denied.inc();
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), topic = %topic.escape_debug(), "publish denied by the ACL");
            // 3.1.1 gets a plain ack (it has no way to say no), 5 "not authorized".
            let v5 = self.version == Version::V5;
            let answer = match qos {
                0 => return Ok(()),
                1 => Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: if v5 {
                            PubAckReason::NotAuthorized
                        } else {
                            PubAckReason::Success
                        },
                    },
                    None,
                ),
                _ => Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: if v5 {
                            PubRecReason::NotAuthorized
                        } else {
                            PubRecReason::Success
                        },
                    },
                    None,
                ),
            };
            self.ack_in_order(answer);
            return Ok(());
        }
        if self.shared.stopping.load(Ordering::Relaxed) {
            // Shutting down: the device's unacked messages go to the next start.
            return Err(CloseReason::Shutdown);
        }
        if qos == 2 && !self.inbound_qos2.insert(pkid) {
            // A resent QoS 2 publish (its PUBREC was lost): taken once already.
            let rec = Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            );
            self.ack_in_order(rec);
            return Ok(());
        }
        let msg = Message {
            topic,
            payload: publish.payload.clone(),
            qos,
            retain: publish.retain,
            properties: props.as_ref().and_then(protocol::properties_of),
            received_at: now_millis(),
        };
        self.take_in(msg, qos, claim).await?;
        // Local subscribers: the message keeps its own QoS in a property.
        if let Err(e) = self
            .shared
            .links
            .publish(
                publish.topic,
                publish.payload,
                publish.retain,
                qos,
                props,
                Some(&self.key),
            )
            .await
        {
            warn!(listener = %self.shared.name, error = %e, "cannot pass a message to local subscribers");
            return Err(CloseReason::Router);
        }
        let answer = match qos {
            0 => return Ok(()),
            1 => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            _ => Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            ),
        };
        self.ack_in_order(answer);
        Ok(())
    }

    /// Hands a message to intake (QoS 0 is shed above the high-water mark, counted).
    async fn take_in(&mut self, msg: Message, qos: u8, claim: &Claim) -> Result<(), CloseReason> {
        let metrics = &self.shared.metrics;
        let intake = &self.shared.intake;
        if qos == 0 {
            let queued = intake.max_capacity() - intake.capacity();
            if queued >= self.shared.qos0_high_water {
                metrics.qos0_shed.inc();
                return Ok(());
            }
        }
        let ack = match (&self.tracker, qos) {
            (Some(tracker), 1 | 2) => {
                self.next_seq += 1;
                Some(AckTicket {
                    tracker: tracker.clone(),
                    seq: self.next_seq,
                })
            }
            _ => None,
        };
        let item = IntakeItem {
            listener: self.shared.index,
            msg,
            client_id: self.client_id.clone(),
            ack,
        };
        if qos == 0 {
            match intake.try_send(item) {
                Ok(()) => metrics.received.inc(),
                Err(_) => metrics.qos0_shed.inc(),
            }
            return Ok(());
        }
        // QoS 1/2: a full intake queue holds this device back (its acks wait too).
        tokio::select! {
            sent = intake.send(item) => match sent {
                Ok(()) => {
                    metrics.received.inc();
                    Ok(())
                }
                Err(_) => Err(CloseReason::Shutdown),
            },
            _ = claim.kick.cancelled() => Err(CloseReason::TakenOver),
            _ = self.shared.shutdown.cancelled() => Err(CloseReason::Shutdown),
        }
    }

    /// Queues an ack behind those still withheld (acks go out in publish order), or
    /// writes it at once when none is.
    fn ack_in_order(&mut self, packet: Packet) {
        if self.tracker.is_none() && self.pending.is_empty() {
            let _ = self.write(packet);
            return;
        }
        self.pending.push_back(PendingAck {
            seq: self.next_seq,
            since: Instant::now(),
            packet,
        });
    }

    /// Writes every withheld ack whose message is now durable.
    fn write_released(&mut self) -> Result<(), CloseReason> {
        let upto = self.tracker.as_ref().map_or(u64::MAX, |t| t.durable_upto());
        while self.pending.front().is_some_and(|p| p.seq <= upto) {
            if let Some(p) = self.pending.pop_front() {
                self.write(p.packet)?;
            }
        }
        Ok(())
    }

    async fn on_notification(
        &mut self,
        notification: Notification,
        wake: &mut bool,
    ) -> Result<(), CloseReason> {
        match notification {
            Notification::Forward(forward) => self.deliver(forward).await,
            notification @ Notification::DeviceAck(_) => {
                // rumqttd does not export its ack type; its conversion gives the packet.
                let packet: Option<Packet> = notification.into();
                match packet {
                    Some(packet) => self.on_router_ack(packet).await,
                    None => Ok(()),
                }
            }
            Notification::Unschedule => {
                *wake = true;
                Ok(())
            }
            Notification::Disconnect(d, _) => {
                warn!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), reason = ?d.reason_code, "the router ended the device's link");
                Err(CloseReason::Router)
            }
            _ => Ok(()),
        }
    }

    /// What the router answers on the connection's link.
    async fn on_router_ack(&mut self, packet: Packet) -> Result<(), CloseReason> {
        match packet {
            Packet::SubAck(mut ack, props) => {
                for (i, code) in self.denied_filters.remove(&ack.pkid).unwrap_or_default() {
                    let at = i.min(ack.return_codes.len());
                    ack.return_codes.insert(at, code);
                }
                self.write(Packet::SubAck(ack, props))
            }
            Packet::PubRel(rel, _) => {
                let pkid = rel.pkid;
                if self.self_pubrel.remove(&pkid) {
                    let comp = PubComp {
                        pkid,
                        reason: PubCompReason::Success,
                    };
                    self.router_comps
                        .push_back((pkid, Some(Packet::PubComp(comp, None))));
                    self.send_ready_acks().await
                } else {
                    self.router_comps.push_back((pkid, None));
                    self.write(Packet::PubRel(
                        PubRel {
                            pkid,
                            reason: PubRelReason::Success,
                        },
                        None,
                    ))
                }
            }
            // CONNACK (read at link setup), UNSUBACK (answered by the connection),
            // PINGRESP (likewise): nothing for the device.
            _ => Ok(()),
        }
    }

    /// The ack the connection gives the router for a delivery the device will not ack
    /// (downgraded to QoS 0, or expired); a QoS 2 one's PUBREL is answered here too.
    fn self_answer(&mut self, pkid: u16, sub_qos: u8) -> Packet {
        if sub_qos == 1 {
            Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )
        } else {
            self.self_pubrel.insert(pkid);
            Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            )
        }
    }

    /// Writes a delivery at min(published QoS, subscription QoS).
    async fn deliver(&mut self, forward: Forward) -> Result<(), CloseReason> {
        let Forward {
            mut publish,
            properties,
            ..
        } = forward;
        let (marks, mut properties) = links::take_marks(properties);
        let published_qos = marks.qos;
        // Subscription options: no local, retain as published, retain handling (most
        // sessions have none: no per-delivery work then).
        let mut skipped = false;
        let topic = self
            .subscriptions
            .active()
            .then(|| std::str::from_utf8(&publish.topic).ok())
            .flatten();
        if let Some(topic) = topic {
            let own = marks.origin.as_deref() == Some(self.key.as_str());
            match self
                .subscriptions
                .verdict(topic, publish.retain, own, marks.retained)
            {
                Verdict::Deliver { retain } => publish.retain = retain,
                Verdict::Skip => skipped = true,
            }
        }
        // MQTT 5 message expiry: the time spent in the gateway is subtracted; an expired
        // message is not delivered (the router still gets its ack).
        let mut expired = false;
        if let (Some(p), Some(arrived)) = (properties.as_mut(), marks.arrived) {
            if let Some(expiry) = p.message_expiry_interval {
                let spent = now_millis().saturating_sub(arrived) / 1000;
                match u32::try_from(spent) {
                    Ok(spent) if spent < expiry => p.message_expiry_interval = Some(expiry - spent),
                    _ => expired = true,
                }
            }
        }
        let mut frame = BytesMut::new();
        protocol::write(
            self.version,
            Packet::Publish(publish.clone(), properties.clone()),
            &mut frame,
        )
        .map_err(|_| CloseReason::ProtocolError)?;
        let header = v4::check(frame.iter(), usize::MAX).map_err(|_| CloseReason::ProtocolError)?;
        let (sub_qos, pkid) = protocol::publish_qos_pkid(&frame, header.fixed_header_len)
            .ok_or(CloseReason::ProtocolError)?;
        let too_large = frame.len() > self.device_max_packet;
        if too_large {
            debug!(listener = %self.shared.name, client_id = %self.client_id.escape_debug(), bytes = frame.len(), max = self.device_max_packet, "a delivery is over the device's maximum packet size; dropped");
        }
        if expired || skipped || too_large {
            if sub_qos > 0 {
                let answer = self.self_answer(pkid, sub_qos);
                self.router_acks.push_back((pkid, Some(answer)));
                return self.send_ready_acks().await;
            }
            return Ok(());
        }
        let qos = published_qos.min(sub_qos);
        if qos == sub_qos {
            self.out.extend_from_slice(&frame);
            if sub_qos > 0 {
                self.router_acks.push_back((pkid, None));
            }
            return Ok(());
        }
        if qos == 0 {
            let publish = Publish::new(publish.topic, publish.payload, publish.retain);
            self.write(Packet::Publish(publish, properties))?;
            let answer = self.self_answer(pkid, sub_qos);
            self.router_acks.push_back((pkid, Some(answer)));
            return self.send_ready_acks().await;
        }
        // QoS 1 for a QoS 2 subscription: the same frame with the QoS bits changed.
        frame[0] = (frame[0] & !0b0110) | 0b0010;
        self.out.extend_from_slice(&frame);
        self.downgraded.insert(pkid);
        self.router_acks.push_back((pkid, None));
        Ok(())
    }

    /// Closes the link and, on an abnormal end, publishes the will.
    async fn end(&mut self, reason: CloseReason, claim: &Claim) {
        if let (true, Some((will, props))) = (reason.abnormal(), self.will.take()) {
            let delay = props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0);
            if delay == 0 {
                publish_will(&self.shared, &self.client_id, will, props).await;
            } else {
                // MQTT 5 will delay: published later unless the client id connects
                // again meanwhile (a takeover by that new connection included).
                let shared = self.shared.clone();
                let client_id = self.client_id.clone();
                let Some(pending) = shared.links.delay_will(&self.key, claim.generation) else {
                    return self.close_link(claim).await;
                };
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {}
                        () = shared.shutdown.cancelled() => {}
                    }
                    if pending.due() {
                        publish_will(&shared, &client_id, will, props).await;
                    }
                });
            }
        }
        self.close_link(claim).await;
    }

    async fn close_link(&mut self, claim: &Claim) {
        if self.persistent {
            self.shared
                .links
                .keep_options(&self.key, std::mem::take(&mut self.subscriptions));
            self.shared
                .links
                .session_ended(&self.key, self.session_expiry);
        }
        if let Some(link) = self.link.take() {
            self.shared.links.close(link.id).await;
        }
        self.shared.links.release(&self.key, claim.generation);
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
