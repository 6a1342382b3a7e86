//! The embedded broker: rumqttd's router plus one rumqttd `Server` per `[[listeners]]`
//! entry, each running on edgebridge's multi-thread runtime with [`DeviceProtocol`] as
//! its codec. Devices talk MQTT 3.1.1 and 5 on the same port.
//!
//! Output: every device PUBLISH becomes an [`IntakeItem`] on the intake channel (see
//! `protocol.rs`). Local subscribers are served by rumqttd as usual.
//!
//! Input from the cloud: [`LocalPublisher`] publishes downlinked messages to devices
//! through a rumqttd local link. A local link bypasses the protocol seam, so nothing it
//! publishes ever reaches intake, and so no rule can send it back upstream.

mod intake;
mod protocol;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info};

pub use intake::{AckTicket, AckTracker, IntakeItem};
pub use protocol::{DeviceProtocol, ListenerShared};

use crate::config::{BrokerSection, ListenerPlan};
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
    for (index, plan) in listeners.iter().enumerate() {
        let addr = reserve(plan.bind)?;
        let shared = Arc::new(ListenerShared::new(
            index,
            plan,
            broker.qos0_high_water,
            intake.clone(),
            metrics.listener(&plan.name),
            stopping.clone(),
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
        let task = tokio::spawn(async move {
            if let Err(e) = server.start(LinkType::Remote).await {
                error!(listener = %name, error = %e, "device listener stopped");
            }
        });
        wait_until_listening(addr, &task).await?;
        info!(listener = %plan.name, %addr, "device listener started (MQTT 3.1.1 and 5)");
        running.push(RunningListener {
            name: plan.name.clone(),
            addr,
            shared,
            task,
        });
    }
    Ok(RunningBroker {
        listeners: running,
        local,
    })
}
