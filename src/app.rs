//! Wires broker → rules → buffers → sink workers, and owns start-up, reload and shutdown
//! order.
//!
//! Start: the lock on `data_dir` ([`crate::lock`]; another process holding it stops the
//! start before anything is opened or bound), buffers, sink workers, the router task,
//! then the device listeners (so nothing is accepted before it can be stored), then the
//! admin endpoint. The lock is released last on shutdown.
//! Reload (SIGHUP, [`Gateway::reload`]): the new plan is validated first; a broken one
//! changes nothing. Then new sinks get their buffer and worker, changed sinks a new worker
//! on the same buffer, the router switches to the new rules and buffers between two
//! batches (one atomic swap), the downlink mappings are swapped, and removed sinks stop;
//! their buffers stay on disk. Device connections are never touched.
//! Shutdown (SIGINT/SIGTERM): stop intake (listeners refuse new work and devices get no
//! more acks), let the router append and sync what is queued, let each sink finish its
//! in-flight sends within the grace period and disconnect cleanly. Whatever was not
//! confirmed upstream stays in the buffer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState, Phase};
use crate::broker;
use crate::buffer::Buffer;
use crate::config::{self, Plan, SinkPlan};
use crate::lock::DataDirLock;
use crate::metrics::Metrics;
use crate::rules::downlink::{self, DownlinkMetrics, DownlinkTable, UpstreamMessage};
use crate::rules::router::{RouterTask, Routing};
use crate::rules::RuleSet;
use crate::sinks::{self, DeadLetter, SinkContext, SinkMetrics, SinkState};

/// A running gateway.
pub struct Gateway {
    /// Device listeners by name with their bound addresses.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// The plan in force (the last one applied).
    plan: Plan,
    /// Tells connections to stop taking messages.
    stopping: Arc<AtomicBool>,
    /// Device users and ACLs; a reload replaces them for later connections.
    security: broker::SharedSecurity,
    /// Stops the router (intake).
    intake_stop: CancellationToken,
    /// Stops the admin endpoint.
    admin_stop: CancellationToken,
    /// What the admin endpoint shows; told when shutdown begins.
    admin_state: Arc<AdminState>,
    listener_tasks: Vec<JoinHandle<()>>,
    /// Wakes the check of the TLS listeners' files for a new certificate (SIGHUP).
    credentials_now: Arc<tokio::sync::Notify>,
    /// Retained messages and persistent sessions, and the task that writes them.
    broker_state: (Arc<broker::Persist>, JoinHandle<()>),
    /// Resolves when the router thread ended.
    router: tokio::sync::oneshot::Receiver<()>,
    /// The router's rules and buffers: a reload sends the next ones.
    routing: watch::Sender<Arc<Routing>>,
    sinks: SinkSet,
    /// Upstream → local devices; stops with the sinks.
    downlinks: JoinHandle<()>,
    /// The downlink task's mappings: a reload sends the next ones.
    downlink_table: watch::Sender<Arc<DownlinkTable>>,
    admin: JoinHandle<()>,
    /// Held until shutdown is done: no other process opens these buffers meanwhile.
    data_dir_lock: DataDirLock,
    /// The `${file:…}` secrets of the config in force, as last seen on disk.
    secrets_seen: Vec<config::SecretFile>,
}

/// What a reload did, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub restarted: Vec<String>,
    pub removed: Vec<String>,
    /// Settings that only a restart applies (kept as they are).
    pub needs_restart: Vec<String>,
}

/// One sink worker.
struct RunningSink {
    /// The plan it runs with, to tell on reload whether it changed.
    plan: SinkPlan,
    /// Its upstream downlink subscriptions (part of what a restart would change).
    downlink_filters: Option<Vec<(String, u8)>>,
    /// Stops this worker alone (a child of `SinkSet::stop`).
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Its up/down state, shown by the status API.
    state: Arc<SinkState>,
}

/// Sink workers and every buffer opened since start, by sink name.
struct SinkSet {
    running: HashMap<String, RunningSink>,
    /// Buffers of removed sinks stay open here: re-adding the sink reuses its buffer, and
    /// two `Buffer`s never share a directory.
    buffers: HashMap<String, Arc<Buffer>>,
    buffer_tasks: Vec<JoinHandle<()>>,
    /// Parent of every sink's stop token, and stops the buffers' sync tasks.
    stop: CancellationToken,
    downlink_tx: mpsc::Sender<UpstreamMessage>,
    metrics: Arc<Metrics>,
}

impl SinkSet {
    /// Opens the buffer of every sink of `plan`, then starts their workers.
    fn open(
        plan: &Plan,
        metrics: Arc<Metrics>,
        downlink_tx: mpsc::Sender<UpstreamMessage>,
    ) -> anyhow::Result<SinkSet> {
        let mut sinks = SinkSet {
            running: HashMap::new(),
            buffers: HashMap::new(),
            buffer_tasks: Vec::new(),
            stop: CancellationToken::new(),
            downlink_tx,
            metrics,
        };
        for s in &plan.sinks {
            sinks.buffer(s, &plan.data_dir)?;
        }
        for index in 0..plan.sinks.len() {
            sinks.start(plan, index);
        }
        Ok(sinks)
    }

    /// The buffer of `sink`, opened (and its sync task started) if it is new.
    fn buffer(&mut self, sink: &SinkPlan, data_dir: &Path) -> anyhow::Result<Arc<Buffer>> {
        if let Some(b) = self.buffers.get(&sink.name) {
            return Ok(b.clone());
        }
        let buffer = Buffer::open(&sink.name, &sink.buffer, data_dir, &self.metrics)
            .with_context(|| format!("cannot open the buffer of sink {}", sink.name))?;
        let buffer = Arc::new(buffer);
        let (b, stop) = (buffer.clone(), self.stop.clone());
        self.buffer_tasks
            .push(tokio::spawn(async move { b.run_interval_sync(stop).await }));
        self.buffers.insert(sink.name.clone(), buffer.clone());
        Ok(buffer)
    }

    /// Starts the worker of sink `index` of `plan` (its buffer must be open).
    fn start(&mut self, plan: &Plan, index: usize) {
        let s = &plan.sinks[index];
        let Some(buffer) = self.buffers.get(&s.name).cloned() else {
            warn!(sink = %s.name, "no buffer open; sink not started");
            return;
        };
        let stop = self.stop.child_token();
        let downlink = DownlinkTable::tap(&plan.downlinks, index, &self.downlink_tx);
        let downlink_filters = downlink.as_ref().map(|t| t.filters().to_vec());
        let ctx = SinkContext {
            name: s.name.clone(),
            buffer,
            batch: s.buffer.batch,
            shutdown: stop.clone(),
            grace: plan.shutdown_grace,
            metrics: SinkMetrics::new(&self.metrics, &s.name),
            dead_letter: DeadLetter::new(&plan.data_dir, &s.name),
            downlink,
            rate: s.rate,
            tls_files: sinks::credentials::TlsFiles::new(
                &s.name,
                self.metrics.credentials_reloads.clone(),
            ),
        };
        let state = ctx.metrics.state();
        let task = sinks::spawn(s, ctx);
        self.running.insert(
            s.name.clone(),
            RunningSink {
                plan: s.clone(),
                downlink_filters,
                stop,
                task,
                state,
            },
        );
    }

    /// The state and buffer of each of `plan`'s sinks, in plan order, for the admin
    /// endpoint (sinks without a running worker are left out).
    fn admin_sinks(&self, plan: &Plan) -> Vec<(String, Arc<SinkState>, Arc<Buffer>)> {
        plan.sinks
            .iter()
            .filter_map(|s| {
                let state = self.running.get(&s.name)?.state.clone();
                let buffer = self.buffers.get(&s.name)?.clone();
                Some((s.name.clone(), state, buffer))
            })
            .collect()
    }

    /// Stops the worker of `name` and waits for it (within the grace period): its
    /// in-flight sends finish or stay in the buffer for the next worker.
    async fn stop_one(&mut self, name: &str, grace: Duration) {
        if let Some(sink) = self.running.remove(name) {
            sink.stop.cancel();
            if tokio::time::timeout(grace + Duration::from_secs(2), sink.task)
                .await
                .is_err()
            {
                warn!(sink = %name, "sink worker did not stop within the grace period");
            }
        }
    }

    /// The buffers of `plan`'s sinks, in plan order (all open).
    fn routing_buffers(&self, plan: &Plan) -> anyhow::Result<Vec<Arc<Buffer>>> {
        plan.sinks
            .iter()
            .map(|s| {
                self.buffers
                    .get(&s.name)
                    .cloned()
                    .with_context(|| format!("no buffer open for sink {}", s.name))
            })
            .collect()
    }
}

/// Sink plans hold only parsed values, all `Debug`: comparing their text tells whether a
/// sink changed without requiring `PartialEq` of every sink kind.
fn same_sink_config(a: &SinkPlan, b: &SinkPlan) -> bool {
    format!("{:?}", a.kind) == format!("{:?}", b.kind)
        && a.buffer.batch == b.buffer.batch
        && a.rate == b.rate
}

impl Gateway {
    pub async fn start(plan: Plan) -> anyhow::Result<Gateway> {
        // rumqttc and any future HTTPS client share one TLS provider (ARCHITECTURE.md, section 7).
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(&plan.data_dir)
            .with_context(|| format!("cannot create data_dir {}", plan.data_dir.display()))?;
        // First: a second process on this data_dir is refused before it opens a buffer
        // or binds a port.
        let data_dir_lock = DataDirLock::acquire(&plan.data_dir)?;
        // Then every address: a port another process holds stops the start here, before
        // a buffer opens or a sink connects. Devices that connect meanwhile wait in the
        // socket's backlog until their listener accepts.
        let device_listeners = broker::bind(&plan.listeners).await?;
        let admin_socket = admin::bind(plan.admin_bind).await?;

        let metrics = Arc::new(Metrics::new());
        // Upstream → downlink task; the sinks' taps hold the sender.
        let (downlink_tx, downlink_rx) = mpsc::channel(downlink::QUEUE);
        let sinks = SinkSet::open(&plan, metrics.clone(), downlink_tx)?;
        let (downlink_table, downlink_table_rx) = watch::channel(Arc::new(DownlinkTable::new(
            &plan.gateway_id,
            &plan.downlinks,
        )));
        downlink::log_table(&plan.downlinks);

        let (intake_tx, intake_rx) = mpsc::channel(plan.broker.intake_queue);
        let intake_stop = CancellationToken::new();
        let buffers = sinks.routing_buffers(&plan)?;
        let (routing, routing_rx) = watch::channel(Arc::new(Routing {
            rules: RuleSet::new(&plan.gateway_id, &plan.rules, &plan.fallback, &metrics),
            buffers: buffers.clone(),
        }));
        let router = RouterTask {
            routing: routing_rx,
            listeners: plan
                .listeners
                .iter()
                .map(|l| metrics.listener(&l.name))
                .collect(),
        };
        let router = router
            .spawn(intake_rx, intake_stop.clone())
            .context("cannot start the router thread")?;

        let stopping = Arc::new(AtomicBool::new(false));
        let security = Arc::new(parking_lot::RwLock::new(Arc::new(broker::Security::load(
            &plan.auth,
        )?)));
        let broker = broker::start(
            &plan.broker,
            device_listeners,
            intake_tx,
            &metrics,
            stopping.clone(),
            security.clone(),
            &plan.data_dir,
        )
        .await?;
        let broker_state = (broker.persist.clone(), broker.persist_task);
        let credentials_now = broker.credentials_now;
        let credentials_task = broker.credentials_task;
        let running = broker.listeners;
        let downlinks = tokio::spawn(downlink::run(
            downlink_rx,
            downlink_table_rx,
            broker.local,
            DownlinkMetrics::new(&metrics),
            sinks.stop.clone(),
        ));
        let listeners: Vec<(String, SocketAddr)> =
            running.iter().map(|l| (l.name.clone(), l.addr)).collect();

        let admin_stop = CancellationToken::new();
        let state = Arc::new(AdminState::new(
            &plan,
            metrics.clone(),
            listeners.clone(),
            sinks.admin_sinks(&plan),
        ));
        let (admin_addr, admin) = admin::serve(admin_socket, state.clone(), admin_stop.clone())?;
        state.set_phase(Phase::Running);
        info!(gateway = %plan.gateway_id, admin = %admin_addr, sinks = plan.sinks.len(), rules = plan.rules.len(), "edgebridge started");

        Ok(Gateway {
            listeners,
            admin_addr,
            metrics,
            secrets_seen: plan.secret_files.clone(),
            plan,
            stopping,
            security,
            intake_stop,
            admin_stop,
            admin_state: state,
            listener_tasks: running
                .into_iter()
                .map(|l| l.task)
                .chain([credentials_task])
                .collect(),
            credentials_now,
            broker_state,
            router,
            routing,
            sinks,
            downlinks,
            downlink_table,
            admin,
            data_dir_lock,
        })
    }

    /// Reads, validates and applies the config at `path` (what SIGHUP does). On any
    /// error nothing changes and the errors come back one per line, as `check` prints
    /// them.
    pub async fn reload_from(&mut self, path: &Path) -> Result<ReloadReport, Vec<String>> {
        let plan = config::load(path)
            .and_then(|c| config::validate(&c))
            .map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        self.reload(plan).await.map_err(|e| vec![format!("{e:#}")])
    }

    /// When a `${file:…}` secret of the config in force changed on disk since it was
    /// read (a rotated password or token), reloads the config at `path` as SIGHUP does,
    /// and counts it (`edgebridge_credentials_reloads_total{source="secrets"}`, applied or
    /// refused). Each change is tried once: a refused one is not retried until the
    /// files change again or a SIGHUP comes. `None` when nothing changed.
    pub async fn reload_if_secrets_changed(
        &mut self,
        path: &Path,
    ) -> Option<Result<ReloadReport, Vec<String>>> {
        let seen = self.secrets_seen.clone();
        let now = tokio::task::spawn_blocking(move || {
            seen.iter()
                .map(|f| config::SecretFile::read(&f.path))
                .collect::<Vec<_>>()
        })
        .await
        .ok()?;
        if now == self.secrets_seen {
            return None;
        }
        info!(config = %path.display(), "a secret file changed: reloading the config");
        self.secrets_seen = now;
        let result = self.reload_from(path).await;
        let outcome = if result.is_ok() { "applied" } else { "refused" };
        self.metrics
            .credentials_reloads
            .with_label_values(&["secrets", outcome])
            .inc();
        Some(result)
    }

    /// Applies `plan`: rules, sinks and downlinks, as the module docs describe.
    /// `gateway.id` and `data_dir` cannot change without a restart (the reload is
    /// refused); listener, broker, admin and log settings are kept and reported.
    pub async fn reload(&mut self, plan: Plan) -> anyhow::Result<ReloadReport> {
        let old = &self.plan;
        if plan.gateway_id != old.gateway_id {
            anyhow::bail!("gateway.id: cannot change on reload (restart to change it)");
        }
        if plan.data_dir != old.data_dir {
            anyhow::bail!("gateway.data_dir: cannot change on reload (restart to change it)");
        }
        let mut report = ReloadReport::default();
        let restart_only = [
            (
                "listeners",
                format!("{:?}", plan.listeners) != format!("{:?}", old.listeners),
            ),
            (
                "broker",
                format!("{:?}", plan.broker) != format!("{:?}", old.broker),
            ),
            ("admin.bind", plan.admin_bind != old.admin_bind),
            ("log", format!("{:?}", plan.log) != format!("{:?}", old.log)),
            (
                "gateway.shutdown_grace",
                plan.shutdown_grace != old.shutdown_grace,
            ),
        ];
        for (key, changed) in restart_only {
            if changed {
                warn!(key, "changed in the config; applies at the next restart");
                report.needs_restart.push(key.to_string());
            }
        }
        // Everything that can fail comes first: the users file, opening the buffers of
        // new sinks.
        let security = broker::Security::load(&plan.auth)?;
        for s in &plan.sinks {
            let old_buffer = old
                .sinks
                .iter()
                .find(|o| o.name == s.name)
                .map(|o| &o.buffer);
            if old_buffer.is_some_and(|b| format!("{b:?}") != format!("{:?}", s.buffer)) {
                warn!(sink = %s.name, "buffer settings changed; they apply at the next restart");
                report
                    .needs_restart
                    .push(format!("sinks.{}.buffer", s.name));
            }
            self.sinks.buffer(s, &plan.data_dir)?;
        }
        let buffers = self.sinks.routing_buffers(&plan)?;
        let rules = RuleSet::new(&plan.gateway_id, &plan.rules, &plan.fallback, &self.metrics);

        // Workers: start new ones, restart changed ones (same buffer), before the router
        // routes to them; a changed worker is stopped before its successor starts, so
        // one buffer never has two readers.
        for (index, s) in plan.sinks.iter().enumerate() {
            let filters = DownlinkTable::tap(&plan.downlinks, index, &self.sinks.downlink_tx)
                .map(|t| t.filters().to_vec());
            match self.sinks.running.get(&s.name) {
                Some(r) if same_sink_config(&r.plan, s) && r.downlink_filters == filters => {}
                Some(_) => {
                    info!(sink = %s.name, "sink changed; restarting its worker (its buffer stays)");
                    self.sinks.stop_one(&s.name, self.plan.shutdown_grace).await;
                    self.sinks.start(&plan, index);
                    report.restarted.push(s.name.clone());
                }
                None => {
                    info!(sink = %s.name, "sink added; starting it");
                    self.sinks.start(&plan, index);
                    report.added.push(s.name.clone());
                }
            }
        }
        // The atomic switch: the router takes the new rules with their buffers between
        // two batches; the downlink task maps every later message with the new table.
        self.routing
            .send_replace(Arc::new(Routing { rules, buffers }));
        self.downlink_table
            .send_replace(Arc::new(DownlinkTable::new(
                &plan.gateway_id,
                &plan.downlinks,
            )));
        downlink::log_table(&plan.downlinks);
        let removed: Vec<String> = self
            .sinks
            .running
            .keys()
            .filter(|name| !plan.sinks.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in removed {
            self.sinks.stop_one(&name, self.plan.shutdown_grace).await;
            if let Some(b) = self.sinks.buffers.get(&name) {
                b.fsync_now().await;
            }
            warn!(sink = %name, dir = %plan.data_dir.join("buffers").join(&name).display(), "sink removed from the config; its buffer stays on disk (delivered again if the sink comes back)");
            report.removed.push(name);
        }
        // Users and ACLs: every later CONNECT uses the new ones.
        *self.security.write() = Arc::new(security);
        // TLS listeners' certificate files: read now rather than at the next poll.
        self.credentials_now.notify_one();
        // What only a restart applies stays as it runs.
        let mut plan = plan;
        plan.listeners = self.plan.listeners.clone();
        plan.broker = self.plan.broker.clone();
        plan.admin_bind = self.plan.admin_bind;
        plan.log = self.plan.log.clone();
        plan.shutdown_grace = self.plan.shutdown_grace;
        info!(rules = plan.rules.len(), sinks = plan.sinks.len(), downlinks = plan.downlinks.len(), added = ?report.added, restarted = ?report.restarted, removed = ?report.removed, "config reloaded");
        self.admin_state
            .set_plan(&plan, self.sinks.admin_sinks(&plan));
        self.secrets_seen = plan.secret_files.clone();
        self.plan = plan;
        Ok(report)
    }

    /// Stops in the order of the module docs.
    pub async fn shutdown(self) {
        info!("shutting down: stopping intake");
        self.admin_state.set_phase(Phase::Stopping);
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
        let sinks = self.sinks;
        sinks.stop.cancel();
        let tasks = join_all(sinks.running.into_values().map(|s| s.task).collect());
        if tokio::time::timeout(self.plan.shutdown_grace + Duration::from_secs(2), tasks)
            .await
            .is_err()
        {
            warn!("some sinks did not finish within the grace period");
        }
        let _ = self.downlinks.await;
        join_all(sinks.buffer_tasks).await;
        let (persist, writer) = self.broker_state;
        writer.abort();
        let _ = tokio::task::spawn_blocking(move || persist.flush()).await;
        for buffer in sinks.buffers.values() {
            buffer.fsync_now().await;
        }
        self.admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.admin).await;
        // Last, after the buffers are synced: the next process may open them now.
        drop(self.data_dir_lock);
        info!("edgebridge stopped");
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BufferSection, FilePlan, SinkKindPlan};
    use crate::sinks::pacing::Rate;

    fn file_sink(rate: Option<Rate>) -> SinkPlan {
        SinkPlan {
            name: "local".into(),
            buffer: BufferSection::default(),
            rate,
            kind: SinkKindPlan::File(FilePlan {
                path: "out.ndjson".into(),
            }),
        }
    }

    /// A reload that changes only a sink's `rate` restarts its worker, so the new pacing
    /// is the one in force (and the one the status page shows).
    #[test]
    fn a_changed_rate_is_a_changed_sink() {
        let paced = |messages| {
            file_sink(Some(Rate {
                messages: Some(messages),
                bytes: None,
            }))
        };
        assert!(same_sink_config(&paced(100), &paced(100)));
        assert!(!same_sink_config(&paced(100), &paced(50)));
        assert!(!same_sink_config(&file_sink(None), &paced(100)));
    }
}
