//! Wires broker → rules → buffers → sink workers, and owns start-up and shutdown order.
//!
//! Start: buffers, sink workers, the router task, then the device listeners (so nothing
//! is accepted before it can be stored), then the admin endpoint.
//! Shutdown (SIGINT/SIGTERM): stop intake (listeners refuse new work and devices get no
//! more acks), let the router append and sync what is queued, let each sink finish its
//! in-flight sends within the grace period and disconnect cleanly. Whatever was not
//! confirmed upstream stays in the buffer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::broker;
use crate::buffer::Buffer;
use crate::config::Plan;
use crate::metrics::Metrics;
use crate::rules::downlink::{self, DownlinkMetrics, DownlinkTable};
use crate::rules::router::RouterTask;
use crate::rules::RuleSet;
use crate::sinks::{self, DeadLetter, SinkContext, SinkMetrics};

/// A running gateway.
pub struct Gateway {
    /// Device listeners by name with their bound addresses.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// Tells connections to stop taking messages.
    stopping: Arc<AtomicBool>,
    /// Stops the router (intake).
    intake_stop: CancellationToken,
    /// Stops the sink workers.
    sinks_stop: CancellationToken,
    /// Stops the admin endpoint.
    admin_stop: CancellationToken,
    listener_tasks: Vec<JoinHandle<()>>,
    router: JoinHandle<()>,
    sink_tasks: Vec<JoinHandle<()>>,
    /// Upstream → local devices; stops with the sinks.
    downlinks: JoinHandle<()>,
    buffer_tasks: Vec<JoinHandle<()>>,
    buffers: Vec<Arc<Buffer>>,
    admin: JoinHandle<()>,
    grace: Duration,
}

impl Gateway {
    pub async fn start(plan: Plan) -> anyhow::Result<Gateway> {
        // rumqttc and any future HTTPS client share one TLS provider (DESIGN.md).
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(&plan.data_dir)
            .with_context(|| format!("cannot create data_dir {}", plan.data_dir.display()))?;

        let metrics = Arc::new(Metrics::new());
        let sinks_stop = CancellationToken::new();
        let mut buffers: Vec<Arc<Buffer>> = Vec::new();
        for s in &plan.sinks {
            let buffer = Buffer::open(&s.name, &s.buffer, &plan.data_dir, &metrics)
                .with_context(|| format!("cannot open the buffer of sink {}", s.name))?;
            buffers.push(Arc::new(buffer));
        }
        let buffer_tasks: Vec<JoinHandle<()>> = buffers
            .iter()
            .map(|b| {
                let b = b.clone();
                let stop = sinks_stop.clone();
                tokio::spawn(async move { b.run_interval_sync(stop).await })
            })
            .collect();
        // Upstream → downlink task; the sinks' taps hold the sender.
        let (downlink_tx, downlink_rx) = mpsc::channel(downlink::QUEUE);
        let (_downlink_table_tx, downlink_table) =
            watch::channel(Arc::new(DownlinkTable::new(&plan)));
        downlink::log_table(&plan);
        let sink_tasks = plan
            .sinks
            .iter()
            .zip(&buffers)
            .enumerate()
            .map(|(index, (s, buffer))| {
                let ctx = SinkContext {
                    name: s.name.clone(),
                    buffer: buffer.clone(),
                    batch: s.buffer.batch,
                    shutdown: sinks_stop.clone(),
                    grace: plan.shutdown_grace,
                    metrics: SinkMetrics::new(&metrics, &s.name),
                    dead_letter: DeadLetter::new(&plan.data_dir, &s.name),
                    downlink: DownlinkTable::tap(&plan, index, &downlink_tx),
                };
                sinks::spawn(s, ctx)
            })
            .collect();

        let (intake_tx, intake_rx) = mpsc::channel(plan.broker.intake_queue);
        let intake_stop = CancellationToken::new();
        let router = RouterTask {
            rules: RuleSet::new(&plan.gateway_id, &plan.rules, &plan.fallback, &metrics),
            buffers: buffers.clone(),
            listeners: plan
                .listeners
                .iter()
                .map(|l| metrics.listener(&l.name))
                .collect(),
        };
        let router = tokio::spawn(router.run(intake_rx, intake_stop.clone()));

        let stopping = Arc::new(AtomicBool::new(false));
        let broker = broker::start(
            &plan.broker,
            &plan.listeners,
            intake_tx,
            &metrics,
            stopping.clone(),
        )
        .await?;
        let running = broker.listeners;
        let downlinks = tokio::spawn(downlink::run(
            downlink_rx,
            downlink_table,
            broker.local,
            DownlinkMetrics::new(&metrics),
            sinks_stop.clone(),
        ));
        let listeners: Vec<(String, SocketAddr)> =
            running.iter().map(|l| (l.name.clone(), l.addr)).collect();

        let admin_stop = CancellationToken::new();
        let state = Arc::new(AdminState {
            metrics: metrics.clone(),
            buffers: buffers.clone(),
            listeners: listeners.iter().map(|(_, a)| *a).collect(),
            ready: AtomicBool::new(false),
        });
        let (admin_addr, admin) =
            admin::start(plan.admin_bind, state.clone(), admin_stop.clone()).await?;
        state.ready.store(true, Ordering::Relaxed);
        info!(gateway = %plan.gateway_id, admin = %admin_addr, sinks = plan.sinks.len(), rules = plan.rules.len(), "edgebridge started");

        Ok(Gateway {
            listeners,
            admin_addr,
            metrics,
            stopping,
            intake_stop,
            sinks_stop,
            admin_stop,
            listener_tasks: running.into_iter().map(|l| l.task).collect(),
            router,
            sink_tasks,
            downlinks,
            buffer_tasks,
            buffers,
            admin,
            grace: plan.shutdown_grace,
        })
    }

    /// Stops in the order of the module docs.
    pub async fn shutdown(self) {
        info!("shutting down: stopping intake");
        self.stopping.store(true, Ordering::Relaxed);
        for task in &self.listener_tasks {
            task.abort();
        }
        self.intake_stop.cancel();
        if tokio::time::timeout(Duration::from_secs(10), self.router)
            .await
            .is_err()
        {
            warn!("router did not finish within 10s");
        }
        info!("intake stopped and synced; finishing in-flight sends");
        self.sinks_stop.cancel();
        let sinks = join_all(self.sink_tasks);
        if tokio::time::timeout(self.grace + Duration::from_secs(2), sinks)
            .await
            .is_err()
        {
            warn!("some sinks did not finish within the grace period");
        }
        let _ = self.downlinks.await;
        join_all(self.buffer_tasks).await;
        for buffer in &self.buffers {
            buffer.fsync_now().await;
        }
        self.admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.admin).await;
        info!("edgebridge stopped");
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}
