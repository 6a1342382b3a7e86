//! The router task: intake → rules → buffers, then the durable acks.
//!
//! It takes intake items in batches, appends one record per matched sink, syncs every
//! buffer it touched (group commit: the next batch starts as soon as the sync returns),
//! and only then releases the withheld device acknowledgements of the batch — or, when a
//! buffer could not store it, fails them, so that those devices resend.
//!
//! It runs on a thread of its own ([`RouterTask::spawn`]) and fsyncs there, blocking:
//! at low rates every batch is a message or two, and handing each fsync to a blocking
//! pool and back costs more thread wake-ups than the message itself.
//!
//! Reload: the rules and the buffers they route to come as one [`Routing`] through a
//! watch channel; the router takes a new one only between batches, so every message is
//! routed entirely by the old rules or entirely by the new ones.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Route, RuleSet};
use crate::broker::{AckTracker, IntakeItem};
use crate::buffer::{Appended, Buffer};
use crate::metrics::ListenerMetrics;

/// Intake items taken per batch.
const BATCH: usize = 1024;

/// Rules and the buffers of the sinks they name (indexed like the plan's sinks).
pub struct Routing {
    pub rules: RuleSet,
    pub buffers: Vec<Arc<Buffer>>,
}

pub struct RouterTask {
    pub routing: watch::Receiver<Arc<Routing>>,
    /// Indexed like the plan's listeners.
    pub listeners: Vec<ListenerMetrics>,
}

impl RouterTask {
    /// Starts [`RouterTask::run`] on a thread of its own; the receiver resolves when it
    /// ended (also by a panic).
    pub fn spawn(
        self,
        rx: mpsc::Receiver<IntakeItem>,
        shutdown: CancellationToken,
    ) -> std::io::Result<oneshot::Receiver<()>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let (done, ended) = oneshot::channel();
        std::thread::Builder::new()
            .name("router".into())
            .spawn(move || {
                runtime.block_on(self.run(rx, shutdown));
                let _ = done.send(());
            })?;
        Ok(ended)
    }

    /// Runs until `shutdown`; then takes what is still queued, appends and syncs it.
    pub async fn run(mut self, mut rx: mpsc::Receiver<IntakeItem>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut routes = Vec::new();
        let mut routing = self.routing.borrow_and_update().clone();
        let mut touched = vec![false; routing.buffers.len()];
        let mut releases: Vec<(Arc<AckTracker>, u64)> = Vec::new();
        let mut closing = false;
        loop {
            let n = if closing {
                rx.recv_many(&mut batch, BATCH).await
            } else {
                tokio::select! {
                    n = rx.recv_many(&mut batch, BATCH) => n,
                    _ = shutdown.cancelled() => {
                        // Stop intake; what is already queued is still appended below.
                        rx.close();
                        closing = true;
                        continue;
                    }
                }
            };
            if n == 0 {
                break;
            }
            if self.routing.has_changed().unwrap_or(false) {
                routing = self.routing.borrow_and_update().clone();
                touched = vec![false; routing.buffers.len()];
            }
            for item in batch.drain(..) {
                self.route_one(
                    &routing,
                    item,
                    &mut routes,
                    &mut touched,
                    &mut releases,
                    &shutdown,
                )
                .await;
            }
            let mut durable = true;
            for (buffer, t) in routing.buffers.iter().zip(touched.iter_mut()) {
                if std::mem::take(t) {
                    durable &= buffer.sync();
                }
            }
            for (tracker, seq) in releases.drain(..) {
                if durable {
                    tracker.release(seq);
                } else {
                    // A buffer could not store this batch (a full disk): its devices get
                    // no ack; their connections close and they resend.
                    tracker.fail();
                }
            }
        }
    }

    async fn route_one(
        &self,
        routing: &Routing,
        item: IntakeItem,
        routes: &mut Vec<Route>,
        touched: &mut [bool],
        releases: &mut Vec<(Arc<AckTracker>, u64)>,
        shutdown: &CancellationToken,
    ) {
        let IntakeItem {
            listener,
            msg,
            client_id,
            ack,
        } = item;
        if ack.as_ref().is_some_and(|t| t.tracker.is_failed()) {
            // An earlier message of this connection could not be stored: the device
            // resends from there, in order, once its connection closed.
            return;
        }
        if !routing.rules.route(&msg, &client_id, routes) {
            if let Some(m) = self.listeners.get(listener) {
                m.unmatched.inc();
            }
        }
        let last = routes.len().saturating_sub(1);
        let mut msg = Some(msg);
        for (i, route) in routes.iter_mut().enumerate() {
            // The last route takes the message itself; earlier ones a (cheap) clone.
            let Some(mut pending) = (if i == last { msg.take() } else { msg.clone() }) else {
                continue;
            };
            if let Some(topic) = route.topic.take() {
                pending.topic = topic;
            }
            if let Some(payload) = route.payload.take() {
                pending.payload = payload;
            }
            if let Some(properties) = route.properties.take() {
                pending.properties = properties;
            }
            let buffer = &routing.buffers[route.sink];
            loop {
                match buffer.append(pending) {
                    Appended::Stored | Appended::Dropped => break,
                    Appended::Full(_) if shutdown.is_cancelled() => {
                        // Stalled at shutdown by a sink that frees nothing: give up,
                        // counted; a durable-ack device has no ack for it and resends.
                        buffer.count_full_drop();
                        break;
                    }
                    Appended::Full(back) => {
                        pending = back;
                        // `when_full = "block"`: stall intake until the sink frees space.
                        let _ = tokio::time::timeout(
                            Duration::from_millis(100),
                            buffer.wait_for_space(),
                        )
                        .await;
                    }
                }
            }
            touched[route.sink] = true;
        }
        if let Some(ticket) = ack {
            match releases.last_mut() {
                Some((tracker, seq)) if Arc::ptr_eq(tracker, &ticket.tracker) => {
                    *seq = ticket.seq;
                }
                _ => releases.push((ticket.tracker, ticket.seq)),
            }
        }
    }
}
