//! The embedded broker: rumqttd's router plus one rumqttd `Server` per `[[listeners]]`
//! entry, each running on edgebridge's multi-thread runtime with [`DeviceProtocol`] as
//! its codec. Devices talk MQTT 3.1.1 and 5 on the same port. TLS and WebSocket
//! listeners are edgebridge's own accept loop in front of a loopback rumqttd listener
//! (`front.rs`); authentication and ACLs are applied at the protocol seam (`auth.rs`).
//!
//! Output: every device PUBLISH becomes an [`IntakeItem`] on the intake channel (see
//! `protocol.rs`). Local subscribers are served by rumqttd as usual.
//!
//! Input from the cloud: [`LocalPublisher`] publishes downlinked messages to devices
//! through a rumqttd local link. A local link bypasses the protocol seam, so nothing it
//! publishes ever reaches intake, and so no rule can send it back upstream.

mod auth;
mod front;
mod intake;
mod protocol;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use auth::{check_pattern, hash_password, set_password, AclEntry, Glob, Security, Users};
pub use front::WS_PATH;
pub use intake::{AckTicket, AckTracker, IntakeItem};
pub use protocol::{BrokerShared, DeviceProtocol, ListenerShared};

use crate::config::{AuthPlan, BrokerSection, ListenerPlan};
use crate::metrics::Metrics;

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
        // rumqttd's must never be the one that refuses.
        max_connections: connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: broker.max_segment_size.0 as usize,
        max_segment_count: broker.max_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// Picks the address to hand rumqttd: it binds by itself, so for port 0 a free port is
/// found first; binding here also turns "address in use" into a start-up error.
fn reserve(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind(addr).with_context(|| format!("cannot bind {addr}"))?;
    Ok(probe.local_addr()?)
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

/// How many free ports a listener started on a picked port tries (see [`start`]).
const BIND_ATTEMPTS: u32 = 5;

/// Waits until rumqttd's accept loop for `addr` is bound (it binds inside its task).
async fn wait_until_listening(addr: SocketAddr, task: &JoinHandle<()>) -> anyhow::Result<()> {
    let probe = loopback(addr);
    for _ in 0..200 {
        if task.is_finished() {
            anyhow::bail!("device listener on {addr} stopped during start-up");
        }
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    anyhow::bail!("device listener on {addr} did not start within 5s")
}

/// The client id of the local link: longer than any id the protocol seam accepts from a
/// device, so no device can take it over (rumqttd refuses `$ / + #` in any id, the
/// local link's included).
fn local_link_id() -> String {
    format!(
        "edgebridge-downlink{}",
        "-".repeat(protocol::MAX_CLIENT_ID_LEN)
    )
}

/// Publishes to local devices through rumqttd's router (QoS 0 on the link; rumqttd
/// delivers at each subscription's QoS).
pub struct LocalPublisher {
    tx: LinkTx,
    /// Kept open: rumqttd treats a dropped receiver as a gone connection.
    _rx: LinkRx,
}

impl LocalPublisher {
    pub async fn publish(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        retain: bool,
    ) -> anyhow::Result<()> {
        let publish = Publish::new(topic, payload, retain);
        self.tx
            .send(Packet::Publish(publish, None))
            .await
            .map(drop)
            .map_err(|e| anyhow::anyhow!("local link: {e}"))
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
            acl: auth.acl.clone(),
        })
    }
}

/// The embedded broker once started.
pub struct RunningBroker {
    pub listeners: Vec<RunningListener>,
    pub local: LocalPublisher,
}

/// Starts rumqttd's router and every listener; returns once all of them accept.
pub async fn start(
    broker: &BrokerSection,
    listeners: &[ListenerPlan],
    intake: mpsc::Sender<IntakeItem>,
    metrics: &Metrics,
    stopping: Arc<AtomicBool>,
    security: SharedSecurity,
) -> anyhow::Result<RunningBroker> {
    let router_tx = Router::new(0, router_config(broker, listeners)).spawn();
    // `build` waits (blocking) for the router's CONNACK.
    let link_router = router_tx.clone();
    let (tx, rx, _) = tokio::task::spawn_blocking(move || {
        rumqttd::local::LinkBuilder::new(&local_link_id(), link_router)
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
    .await?
    .context("cannot open the local link for downlinks")?;
    let local = LocalPublisher { tx, _rx: rx };
    let mut running = Vec::new();
    let shared_by_all = BrokerShared {
        qos0_high_water: broker.qos0_high_water,
        intake,
        stopping,
        security,
    };
    for (index, plan) in listeners.iter().enumerate() {
        let fronted = plan.tls.is_some() || plan.websocket;
        // Behind a front, rumqttd listens on loopback and only the front connects there.
        let token = if fronted {
            let mut token = [0u8; protocol::TOKEN_LEN];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
                .map_err(|_| anyhow::anyhow!("no system randomness for the listener token"))?;
            Some(token)
        } else {
            None
        };
        let listener_metrics = metrics.listener(&plan.name);
        // rumqttd binds by itself, so a free port picked for it (port 0) can be taken by
        // another socket before it binds: an outgoing connection's ephemeral port comes
        // from the same range (seen in the test suite on a loaded machine). Such a start
        // is retried on a newly picked port; a configured port is not.
        let picked_port = fronted || plan.bind.port() == 0;
        let mut attempt = 1;
        let (shared, public_addr, task) = loop {
            let addr = if fronted {
                reserve(SocketAddr::from(([127, 0, 0, 1], 0)))?
            } else {
                reserve(plan.bind)?
            };
            let shared = Arc::new(ListenerShared::new(
                index,
                plan,
                &shared_by_all,
                listener_metrics.clone(),
                token,
            ));
            let settings = ServerSettings {
                name: plan.name.clone(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    connection_timeout_ms: plan.connect_timeout.as_millis().min(u16::MAX as u128)
                        as u16,
                    max_payload_size: plan.max_packet_size,
                    max_inflight_count: 100,
                    auth: None,
                    external_auth: None,
                    dynamic_filters: true,
                },
            };
            let mut server = Server::new(
                settings,
                router_tx.clone(),
                DeviceProtocol::new(shared.clone()),
            );
            let name = plan.name.clone();
            let serve_rumqttd = async move {
                if let Err(e) = server.start(LinkType::Remote).await {
                    error!(listener = %name, error = %e, "device listener stopped");
                }
            };
            let (public_addr, task) = match token {
                Some(token) => {
                    let socket = tokio::net::TcpListener::bind(plan.bind)
                        .await
                        .with_context(|| format!("cannot bind {}", plan.bind))?;
                    let public_addr = socket.local_addr()?;
                    let front = Arc::new(front::Front::new(
                        plan,
                        addr,
                        token,
                        listener_metrics.clone(),
                    )?);
                    let task = tokio::spawn(async move {
                        tokio::select! {
                            () = serve_rumqttd => {}
                            () = front.serve(socket) => {}
                        }
                    });
                    (public_addr, task)
                }
                None => (addr, tokio::spawn(serve_rumqttd)),
            };
            match wait_until_listening(addr, &task).await {
                Ok(()) => break (shared, public_addr, task),
                Err(e) if picked_port && task.is_finished() && attempt < BIND_ATTEMPTS => {
                    warn!(listener = %plan.name, %addr, attempt, error = %e, "the port picked for the listener was taken before it bound; picking another");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        info!(listener = %plan.name, addr = %public_addr, scheme = plan.scheme(), "device listener started (MQTT 3.1.1 and 5)");
        running.push(RunningListener {
            name: plan.name.clone(),
            addr: public_addr,
            shared,
            task,
        });
    }
    Ok(RunningBroker {
        listeners: running,
        local,
    })
}
