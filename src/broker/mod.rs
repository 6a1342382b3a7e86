//! The embedded broker: device connections are edgebridge's own tasks
//! (`connection.rs`), one per device, for TCP, TLS, WebSocket and WSS alike
//! (`transport.rs`); rumqttd keeps only its router (subscriptions, sessions, retained
//! messages, fan-out to local subscribers), joined through local links (`links.rs`).
//! Authentication and ACLs are `auth.rs`; MQTT framing around rumqttd's codecs is
//! `protocol.rs`.
//!
//! Output: every device PUBLISH (and every will) becomes an [`IntakeItem`] on the intake
//! channel, and reaches local subscribers through the router.
//!
//! Input from the cloud: [`LocalPublisher`] publishes downlinked messages to devices
//! through the router. It does not pass a device connection, so nothing it publishes
//! ever reaches intake, and so no rule can send it back upstream.

mod auth;
pub mod config;
mod connection;
mod intake;
mod links;
mod persist;
mod protocol;
mod subscriptions;
mod transport;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use parking_lot::RwLock;
use prometheus::IntCounterVec;
use rumqttd::RouterConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info};

pub use auth::{check_pattern, hash_password, set_password, AclEntry, Glob, Security, Users};
pub use connection::{BrokerShared, CloseReason, ListenerShared};

/// For the fuzz targets only (fuzz/): a device's bytes through the connection's packet
/// handling (see `connection::parse_device_bytes`); returns the packets parsed.
#[doc(hidden)]
pub fn fuzz_device_bytes(data: &[u8], max_packet: usize) -> usize {
    connection::parse_device_bytes(data, max_packet)
}
pub use intake::{AckTicket, AckTracker, IntakeItem};
pub use persist::Persist;
pub use transport::WS_PATH;

use crate::message::Properties;
use crate::metrics::Metrics;
pub use config::{AuthPlan, BrokerSection, ListenerPlan};
use links::Links;
use transport::TlsReload;

/// Sockets beyond `max_connections` still allowed to be mid-handshake: the MQTT-level
/// limit answers with a CONNACK, which needs a finished handshake.
const HANDSHAKE_SLACK: usize = 64;

/// A running device listener.
pub struct RunningListener {
    pub name: String,
    /// The bound address (the real port when the config said port 0).
    pub addr: SocketAddr,
    pub shared: Arc<ListenerShared>,
    pub task: JoinHandle<()>,
}

fn router_config(broker: &BrokerSection, listeners: &[ListenerPlan]) -> RouterConfig {
    let connections: usize = listeners.iter().map(|l| l.max_connections).sum();
    RouterConfig {
        // Our own limit is enforced per listener at CONNECT (with a proper CONNACK);
        // rumqttd's must never be the one that refuses (a refused link is never
        // answered). The shared link counts too.
        max_connections: connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: broker.max_segment_size.0 as usize,
        max_segment_count: broker.max_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// The address to connect to for a listener bound to `addr` (a wildcard address is
/// reached on loopback).
pub fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

/// Publishes to local devices through rumqttd's router as QoS 1 messages (each
/// subscriber gets min(1, its subscription's QoS)).
pub struct LocalPublisher {
    links: Arc<Links>,
}

impl LocalPublisher {
    /// Publishes at QoS 1 with `properties` (MQTT 5 devices get them; a user property that
    /// looks like one of edgebridge's own marks is not passed on).
    pub async fn publish(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        retain: bool,
        properties: Option<&Properties>,
    ) -> anyhow::Result<()> {
        let properties = properties.map(protocol::publish_properties);
        self.links
            .publish(topic, payload, retain, 1, properties, None)
            .await
    }
}

/// Users and ACLs in force, shared by every listener; a reload replaces the inner `Arc`
/// (connected devices keep the grants they got at CONNECT).
pub type SharedSecurity = Arc<RwLock<Arc<Security>>>;

impl Security {
    /// Reads the users file of `auth`, if any.
    pub fn load(auth: &AuthPlan) -> anyhow::Result<Security> {
        let users = match &auth.users_file {
            Some(path) => Some(Users::load(path).context("auth.users_file")?),
            None => None,
        };
        Ok(Security {
            users,
            users_file: auth.users_file.clone(),
            acl: auth.acl.clone(),
        })
    }
}

/// The embedded broker once started.
pub struct RunningBroker {
    pub listeners: Vec<RunningListener>,
    pub local: LocalPublisher,
    /// Retained messages and persistent sessions; written every second when changed, and
    /// by [`Persist::flush`] at shutdown.
    pub persist: Arc<Persist>,
    /// Writes `persist` every second; aborted at shutdown, which then flushes once more.
    pub persist_task: JoinHandle<()>,
    /// Checks the TLS listeners' files for a new certificate every [`CREDENTIALS_POLL`];
    /// notified, at once (SIGHUP).
    pub credentials_now: Arc<Notify>,
    pub credentials_task: JoinHandle<()>,
}

/// How often TLS listeners' certificate, key and client CA files are read for a change.
pub const CREDENTIALS_POLL: Duration = Duration::from_secs(5);

/// How often the broker's persisted state is written when it changed.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Binds every device listener's address, in order (before anything else starts, so a
/// taken port stops the start before a buffer is opened).
pub async fn bind(listeners: &[ListenerPlan]) -> anyhow::Result<Vec<(ListenerPlan, TcpListener)>> {
    let mut bound = Vec::with_capacity(listeners.len());
    for plan in listeners {
        let socket = TcpListener::bind(plan.bind)
            .await
            .with_context(|| format!("listener {}: cannot bind {}", plan.name, plan.bind))?;
        bound.push((plan.clone(), socket));
    }
    Ok(bound)
}

/// Starts rumqttd's router and every listener on its socket (from [`bind`]); returns once
/// all of them accept.
pub async fn start(
    broker: &BrokerSection,
    listeners: Vec<(ListenerPlan, TcpListener)>,
    intake: mpsc::Sender<IntakeItem>,
    metrics: &Metrics,
    stopping: Arc<AtomicBool>,
    security: SharedSecurity,
    data_dir: &Path,
) -> anyhow::Result<RunningBroker> {
    let plans: Vec<ListenerPlan> = listeners.iter().map(|(plan, _)| plan.clone()).collect();
    let config = router_config(broker, &plans);
    let persist = Arc::new(Persist::open(data_dir)?);
    // Opening the shared link waits (blocking) for the router's answer.
    let for_links = persist.clone();
    let links = tokio::task::spawn_blocking(move || Links::start(config, for_links)).await??;
    links
        .restore()
        .await
        .context("cannot restore retained messages and sessions")?;
    let writer = persist.clone();
    let persist_task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(PERSIST_INTERVAL).await;
            let writer = writer.clone();
            let _ = tokio::task::spawn_blocking(move || writer.flush()).await;
        }
    });
    let shared_by_all = BrokerShared {
        qos0_high_water: broker.qos0_high_water,
        intake,
        stopping,
        security,
        links: links.clone(),
    };
    let mut running = Vec::new();
    for (index, (plan, socket)) in listeners.into_iter().enumerate() {
        let addr = socket.local_addr()?;
        let shared = Arc::new(ListenerShared::new(
            index,
            &plan,
            &shared_by_all,
            metrics.listener(&plan.name),
        )?);
        let task = tokio::spawn(accept(shared.clone(), socket));
        info!(listener = %plan.name, %addr, scheme = plan.scheme(), "device listener started (MQTT 3.1, 3.1.1 and 5)");
        running.push(RunningListener {
            name: plan.name.clone(),
            addr,
            shared,
            task,
        });
    }
    let credentials_now = Arc::new(Notify::new());
    let credentials_task = tokio::spawn(watch_credentials(
        running
            .iter()
            .map(|l| l.shared.clone())
            .filter(|l| l.handshake.is_tls())
            .collect(),
        shared_by_all.security.clone(),
        credentials_now.clone(),
        metrics.credentials_reloads.clone(),
    ));
    Ok(RunningBroker {
        listeners: running,
        local: LocalPublisher { links },
        persist,
        persist_task,
        credentials_now,
        credentials_task,
    })
}

/// Puts new TLS files of `listeners` and a new users file in force when they change
/// (`Handshake::reload_tls`, [`reload_users`]), reporting each change: applied, or refused
/// with why (what is in use stays).
async fn watch_credentials(
    listeners: Vec<Arc<ListenerShared>>,
    security: SharedSecurity,
    now: Arc<Notify>,
    reloads: IntCounterVec,
) {
    // The digest of the users file's text last refused: each change is reported once.
    let mut users_refused = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CREDENTIALS_POLL) => {}
            _ = now.notified() => {}
        }
        let (reading, counting) = (security.clone(), reloads.clone());
        if let Ok(refused) =
            tokio::task::spawn_blocking(move || reload_users(&reading, users_refused, &counting))
                .await
        {
            users_refused = refused;
        }
        for listener in &listeners {
            let reading = listener.clone();
            let Ok(Some(outcome)) =
                tokio::task::spawn_blocking(move || reading.handshake.reload_tls()).await
            else {
                continue;
            };
            let source = format!("listener:{}", listener.name);
            match outcome {
                TlsReload::Unchanged => {}
                TlsReload::Applied => {
                    info!(listener = %listener.name, "new TLS certificate files loaded: new connections use them, open ones keep theirs");
                    reloads.with_label_values(&[&source, "applied"]).inc();
                }
                TlsReload::Refused(why) => {
                    error!(listener = %listener.name, error = %why, "new TLS certificate files refused: the certificate in use stays");
                    reloads.with_label_values(&[&source, "refused"]).inc();
                }
            }
        }
    }
}

/// Reads the users file in force again. Changed and valid: later CONNECTs check against
/// it (the ACLs and connected devices stay). Changed and not valid (half written, a bad
/// hash, gone): refused with an error log line and
/// `edgebridge_credentials_reloads_total{source="users_file",outcome="refused"}`, once per
/// change (`refused` is the digest last refused; the new one comes back), and the users
/// in force stay. A reload that swapped in another `Security` meanwhile wins.
fn reload_users(
    security: &SharedSecurity,
    refused: Option<u64>,
    reloads: &IntCounterVec,
) -> Option<u64> {
    let current = security.read().clone();
    let (Some(path), Some(users)) = (&current.users_file, &current.users) else {
        return None;
    };
    let text = std::fs::read_to_string(path);
    let digest = match &text {
        Ok(text) => auth::text_digest(text),
        Err(e) => auth::text_digest(&e.to_string()),
    };
    if digest == users.digest() {
        return None;
    }
    if refused == Some(digest) {
        return refused;
    }
    let source = "users_file";
    let loaded = text
        .map_err(anyhow::Error::from)
        .and_then(|text| Users::parse(&text));
    match loaded {
        Ok(new) => {
            let next = Arc::new(Security {
                users: Some(new),
                users_file: current.users_file.clone(),
                acl: current.acl.clone(),
            });
            let mut in_force = security.write();
            if Arc::ptr_eq(&in_force, &current) {
                *in_force = next;
                info!(file = %path.display(), "users file changed: new connections are checked against it, connected devices stay");
                reloads.with_label_values(&[source, "applied"]).inc();
            }
            None
        }
        Err(e) => {
            error!(file = %path.display(), error = %format!("{e:#}"), "users file changed but does not load: the users in force stay");
            reloads.with_label_values(&[source, "refused"]).inc();
            Some(digest)
        }
    }
}

/// The accept loop: never waits on a device. Dropped (the listener task aborted), it
/// closes every connection of the listener.
async fn accept(shared: Arc<ListenerShared>, listener: TcpListener) {
    let _close_all = shared.shutdown.clone().drop_guard();
    let open = Arc::new(AtomicUsize::new(0));
    let max_sockets = shared.max_connections + HANDSHAKE_SLACK;
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                debug!(listener = %shared.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.fetch_add(1, Ordering::Relaxed) >= max_sockets {
            open.fetch_sub(1, Ordering::Relaxed);
            shared.metrics.refused.max_connections.inc();
            debug!(listener = %shared.name, %peer, "too many sockets open; closing a new one");
            continue;
        }
        let shared = shared.clone();
        let open = open.clone();
        tokio::spawn(async move {
            connection::run(shared, socket, peer).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
