//! edgebridge's side of rumqttd's router: the links device connections use, the one
//! shared link every device publishes through, and who holds which client id.
//!
//! rumqttd's local links have two blocking calls (issue "Device sessions"):
//! `LinkBuilder::build` waits for the router's answer, and `LinkTx::send` makes a
//! blocking send on the router's bounded event channel. Neither may run on an async
//! worker, so every router-bound operation is a [`Job`] for one thread, the feeder, which
//! owns every `LinkTx`. One FIFO also orders a connection's packets, and a link closed by
//! a session takeover reaches the router before the link of the connection taking over.
//! The router never waits on a link (it `try_send`s), so the feeder's blocking sends are
//! short.
//!
//! Input: jobs from device connections and downlinks. Output: packets into the router;
//! what the router sends back is read by each connection from its own `LinkRx`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, Publish, PublishProperties,
    RetainForwardRule, Subscribe,
};
use rumqttd::{Router, RouterConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::persist::{Persist, Subscription};
use super::subscriptions::Subscriptions;
use crate::message::now_millis;

/// Jobs queued for the feeder; a full queue makes connections wait (backpressure).
const FEEDER_QUEUE: usize = 8192;

/// The user property that carries a message's QoS as published through the router
/// (rumqttd forwards at the subscription's QoS; the connection delivers the minimum).
/// Stripped before any message leaves the gateway.
pub const QOS_PROPERTY: &str = "\u{1}edgebridge-qos";

/// The user property that carries when a message with an MQTT 5 message expiry entered
/// the gateway (ms since the epoch): the time spent here is subtracted on delivery.
pub const ARRIVAL_PROPERTY: &str = "\u{1}edgebridge-arrival";

/// The user property that carries the client id of the device that published a message,
/// for MQTT 5 no-local subscriptions (added only once a device has made one).
pub const ORIGIN_PROPERTY: &str = "\u{1}edgebridge-origin";

/// The user property that says a message was published retained (rumqttd clears the flag
/// of live deliveries), for MQTT 5 retain-as-published subscriptions.
pub const RETAINED_PROPERTY: &str = "\u{1}edgebridge-retained";

/// Whether a user property is one of edgebridge's marks (a device may not set them).
pub fn is_mark(key: &str) -> bool {
    key.starts_with("\u{1}edgebridge-")
}

/// The client id of the shared link: a control character keeps every device id
/// (validated at CONNECT) different from it.
const SHARED_LINK_ID: &str = "\u{1}edgebridge-publish";

/// A router-bound operation, run in order by the feeder thread.
enum Job {
    /// Joins a device connection to the router under `key`.
    Open {
        key: String,
        clean: bool,
        id: u64,
        reply: oneshot::Sender<Result<LinkRx, String>>,
    },
    /// A packet from a device connection's own link (SUBSCRIBE, acks…).
    Send { id: u64, packet: Packet },
    /// A PUBLISH for local subscribers, through the shared link.
    Publish(Packet),
    /// Ends a connection's link; a persistent session is kept by the router.
    Close { id: u64 },
}

/// Who holds a client id now (see [`Links::claim`]).
struct Holder {
    generation: u64,
    /// Cancelled to make the holder close (session takeover).
    kick: CancellationToken,
    /// Completes (sender dropped) once the holder has closed its link.
    done: oneshot::Receiver<()>,
}

/// The router and what edgebridge keeps next to it.
pub struct Links {
    jobs: mpsc::Sender<Job>,
    next_id: AtomicU64,
    holders: Mutex<HashMap<String, Holder>>,
    /// Persistent sessions by client id (so the connection opens its own link at
    /// CONNECT and gets what it missed, and says "session present").
    sessions: Mutex<HashMap<String, SessionInfo>>,
    /// Client ids with a delayed will (MQTT 5 will delay), by the generation of the
    /// connection that left it; a new claim of the id cancels it.
    delayed_wills: Arc<Mutex<HashMap<String, u64>>>,
    /// Retained messages and persistent sessions' subscriptions, kept across restarts.
    pub persist: Arc<Persist>,
    /// A device has made a no-local subscription: publishes carry their origin from then
    /// on (before, nobody needs it).
    origin_wanted: AtomicBool,
    /// A device link was opened (a device subscribed, or a persistent session holds
    /// subscriptions) at some time: until then nobody can receive a local delivery, and a
    /// message that is not retained need not cross the feeder and the router at all (two
    /// thread hand-offs per message, the bulk of the device side's CPU at a steady rate).
    /// Sticky: it never goes back to `false`.
    local_subscribers: AtomicBool,
    /// The subscription options of persistent sessions whose device is away.
    options: Mutex<HashMap<String, Subscriptions>>,
}

/// What edgebridge knows of a persistent session.
#[derive(Debug, Clone, Copy)]
struct SessionInfo {
    /// It holds subscriptions (so rumqttd holds a session for it).
    subscribed: bool,
    /// When it ends while its device is away (MQTT 5 session expiry); `None` while
    /// connected, or never.
    expires_at: Option<Instant>,
}

/// A connection's session at CONNECT (see [`Links::session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionStart {
    /// CONNACK's session present.
    pub present: bool,
    /// Its subscriptions are in the router: the connection joins it at once.
    pub subscribed: bool,
    /// rumqttd still holds an old session that must not come back: see
    /// [`Links::discard`].
    pub discard: bool,
}

/// A will waiting for its delay (see [`Links::delay_will`]).
pub struct DelayedWill {
    key: String,
    generation: u64,
    delayed_wills: Arc<Mutex<HashMap<String, u64>>>,
}

impl DelayedWill {
    /// Whether the will is still to be published (the id was not claimed meanwhile);
    /// answers `true` once.
    pub fn due(&self) -> bool {
        let mut delayed = self.delayed_wills.lock();
        if delayed.get(&self.key) == Some(&self.generation) {
            delayed.remove(&self.key);
            true
        } else {
            false
        }
    }
}

/// A claim on a client id; dropping it tells whoever takes the id over next that this
/// connection is gone.
pub struct Claim {
    pub generation: u64,
    pub kick: CancellationToken,
    _done: oneshot::Sender<()>,
}

/// Poll a future that never waits (rumqttd's `LinkTx::send` is `async` but blocks
/// inside): run on the feeder thread only.
fn run_sync<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::yield_now(),
        }
    }
}

/// Opens a link of the router (`LinkBuilder` with the router's sender, whose type
/// rumqttd does not export: the closure is made where `Router::spawn` returns it).
type OpenLink<'a> = &'a mut dyn FnMut(&str, bool, bool) -> Result<(LinkTx, LinkRx), String>;

fn feeder(open: OpenLink<'_>, shared: LinkTx, mut jobs: mpsc::Receiver<Job>) {
    let mut shared = Some(shared);
    let mut links: HashMap<u64, LinkTx> = HashMap::new();
    while let Some(job) = jobs.blocking_recv() {
        match job {
            Job::Open {
                key,
                clean,
                id,
                reply,
            } => {
                // Only valid ids reach here and the router's connection limit is above
                // every listener's together, so the router always answers.
                match open(&key, clean, false) {
                    Ok((tx, rx)) => {
                        links.insert(id, tx);
                        let _ = reply.send(Ok(rx));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Job::Send { id, packet } => {
                if let Some(tx) = links.get_mut(&id) {
                    if let Err(e) = run_sync(tx.send(packet)) {
                        warn!(error = %e, "router link send failed");
                        links.remove(&id);
                    }
                }
            }
            Job::Publish(packet) => {
                if let Some(tx) = shared.as_mut() {
                    if let Err(e) = run_sync(tx.send(packet)) {
                        error!(error = %e, "the router's shared link failed; local subscribers get nothing more");
                        shared = None;
                    }
                }
            }
            Job::Close { id } => {
                if let Some(mut tx) = links.remove(&id) {
                    let disconnect = Disconnect {
                        reason_code: DisconnectReasonCode::NormalDisconnection,
                    };
                    let _ = run_sync(tx.send(Packet::Disconnect(disconnect, None)));
                }
            }
        }
    }
    debug!("router feeder stopped");
}

impl Links {
    /// Starts rumqttd's router, then the feeder with the shared link. Opening a link
    /// blocks until the router answers: called from a blocking context.
    pub fn start(config: RouterConfig, persist: Arc<Persist>) -> anyhow::Result<Arc<Links>> {
        let router_tx = Router::new(0, config).spawn();
        let mut open = move |key: &str, clean: bool, dynamic_filters: bool| {
            LinkBuilder::new(key, router_tx.clone())
                .clean_session(clean)
                .dynamic_filters(dynamic_filters)
                .build()
                .map(|(tx, rx, _connack)| (tx, rx))
                .map_err(|e| e.to_string())
        };
        // Publishes to topics nobody subscribes to yet need dynamic filters (rumqttd
        // drops the link otherwise); retained messages are kept under them too.
        let (shared, shared_rx) = open(SHARED_LINK_ID, true, true)
            .map_err(|e| anyhow::anyhow!("cannot open the router's shared link: {e}"))?;
        // The shared link only publishes at QoS 0: the router sends it nothing to act
        // on, but its receiver must stay open (a dropped one reads as a gone link).
        std::thread::Builder::new()
            .name("router-shared-rx".into())
            .spawn(move || {
                let mut rx = shared_rx;
                while let Ok(_notification) = rx.recv() {}
            })?;
        let (jobs, jobs_rx) = mpsc::channel(FEEDER_QUEUE);
        std::thread::Builder::new()
            .name("router-feeder".into())
            .spawn(move || feeder(&mut open, shared, jobs_rx))?;
        Ok(Arc::new(Links {
            jobs,
            next_id: AtomicU64::new(1),
            holders: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            delayed_wills: Arc::new(Mutex::new(HashMap::new())),
            persist,
            origin_wanted: AtomicBool::new(false),
            local_subscribers: AtomicBool::new(false),
            options: Mutex::new(HashMap::new()),
        }))
    }

    fn closed() -> anyhow::Error {
        anyhow::anyhow!("the router feeder stopped")
    }

    /// Publishes to local subscribers with `qos` as the message's own QoS.
    /// `origin`: the client id of the device that published it (`None` for the gateway's
    /// own messages).
    pub async fn publish(
        &self,
        topic: Bytes,
        payload: Bytes,
        retain: bool,
        qos: u8,
        properties: Option<PublishProperties>,
        origin: Option<&str>,
    ) -> anyhow::Result<()> {
        if retain {
            self.persist
                .retain(&topic, &payload, qos, properties.as_ref());
        } else if !self.local_subscribers.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut properties = properties.unwrap_or_default();
        let marks = &mut properties.user_properties;
        marks.push((QOS_PROPERTY.to_string(), qos.to_string()));
        if properties.message_expiry_interval.is_some() {
            marks.push((ARRIVAL_PROPERTY.to_string(), now_millis().to_string()));
        }
        if retain {
            marks.push((RETAINED_PROPERTY.to_string(), "1".to_string()));
        }
        if let (Some(origin), true) = (origin, self.origin_wanted.load(Ordering::Relaxed)) {
            marks.push((ORIGIN_PROPERTY.to_string(), origin.to_string()));
        }
        let publish = Publish::new(topic, payload, retain);
        self.jobs
            .send(Job::Publish(Packet::Publish(publish, Some(properties))))
            .await
            .map_err(|_| Self::closed())
    }

    /// Opens a link of the router for a device connection under `key`.
    pub async fn open(&self, key: &str, clean: bool) -> anyhow::Result<(u64, LinkRx)> {
        // Before the link exists: every publish from now on reaches the router.
        self.local_subscribers.store(true, Ordering::Release);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Open {
                key: key.to_string(),
                clean,
                id,
                reply,
            })
            .await
            .map_err(|_| Self::closed())?;
        let rx = answer
            .await
            .map_err(|_| Self::closed())?
            .map_err(|e| anyhow::anyhow!("router link: {e}"))?;
        Ok((id, rx))
    }

    pub async fn send(&self, id: u64, packet: Packet) -> anyhow::Result<()> {
        self.jobs
            .send(Job::Send { id, packet })
            .await
            .map_err(|_| Self::closed())
    }

    pub async fn close(&self, id: u64) {
        let _ = self.jobs.send(Job::Close { id }).await;
    }

    /// Takes `client_id` for a new connection. A connection holding it is kicked and
    /// awaited (up to `wait`) first, so its link is closed before the new one opens.
    pub async fn claim(&self, client_id: &str, wait: Duration) -> Claim {
        let (done_tx, done_rx) = oneshot::channel();
        let kick = CancellationToken::new();
        let generation = self.next_id.fetch_add(1, Ordering::Relaxed);
        let previous = {
            let mut holders = self.holders.lock();
            // Under the holders' lock (as in `delay_will`): a will delayed by the
            // connection replaced here is never published.
            self.delayed_wills.lock().remove(client_id);
            holders.insert(
                client_id.to_string(),
                Holder {
                    generation,
                    kick: kick.clone(),
                    done: done_rx,
                },
            )
        };
        if let Some(previous) = previous {
            previous.kick.cancel();
            if tokio::time::timeout(wait, previous.done).await.is_err() {
                warn!(client_id = %client_id.escape_debug(), "the connection taken over did not close in time");
            }
        }
        Claim {
            generation,
            kick,
            _done: done_tx,
        }
    }

    /// Registers the delayed will of the connection `generation` that held `key`.
    /// `None` when another connection already claimed the id (its will is void).
    pub fn delay_will(&self, key: &str, generation: u64) -> Option<DelayedWill> {
        let holders = self.holders.lock();
        if holders.get(key).is_none_or(|h| h.generation != generation) {
            return None;
        }
        self.delayed_wills
            .lock()
            .insert(key.to_string(), generation);
        Some(DelayedWill {
            key: key.to_string(),
            generation,
            delayed_wills: self.delayed_wills.clone(),
        })
    }

    /// Gives up `client_id` unless another connection took it over meanwhile.
    pub fn release(&self, client_id: &str, generation: u64) {
        let mut holders = self.holders.lock();
        if holders
            .get(client_id)
            .is_some_and(|h| h.generation == generation)
        {
            holders.remove(client_id);
        }
    }

    /// At CONNECT: whether a persistent session exists (session present) and holds
    /// subscriptions. A clean session, or an expired one, is forgotten.
    pub fn session(&self, client_id: &str, clean: bool) -> SessionStart {
        let mut sessions = self.sessions.lock();
        let mut previous = sessions.remove(client_id);
        let expired = previous
            .and_then(|p| p.expires_at)
            .is_some_and(|at| at <= Instant::now());
        let discard = previous.is_some_and(|p| p.subscribed) && (clean || expired);
        if clean || expired {
            self.persist.forget(client_id);
            self.options.lock().remove(client_id);
            previous = None;
        }
        if clean {
            return SessionStart {
                present: false,
                subscribed: false,
                discard,
            };
        }
        let subscribed = previous.is_some_and(|p| p.subscribed);
        sessions.insert(
            client_id.to_string(),
            SessionInfo {
                subscribed,
                expires_at: None,
            },
        );
        SessionStart {
            present: previous.is_some(),
            subscribed,
            discard,
        }
    }

    /// A no-local subscription was made: publishes carry their origin from now on.
    pub fn want_origin(&self) {
        self.origin_wanted.store(true, Ordering::Relaxed);
    }

    /// Keeps a persistent session's subscription options while its device is away.
    pub fn keep_options(&self, client_id: &str, options: Subscriptions) {
        self.options.lock().insert(client_id.to_string(), options);
    }

    /// The subscription options kept for a persistent session (empty when none).
    pub fn take_options(&self, client_id: &str) -> Subscriptions {
        self.options.lock().remove(client_id).unwrap_or_default()
    }

    /// A persistent session's device left: the session ends after `expiry` (`None`:
    /// never).
    pub fn session_ended(&self, client_id: &str, expiry: Option<Duration>) {
        let mut sessions = self.sessions.lock();
        if let Some(info) = sessions.get_mut(client_id) {
            info.expires_at = expiry.map(|e| Instant::now() + e);
        }
    }

    /// Makes rumqttd drop the session it keeps for `key` (a link opened clean and
    /// closed), before the connection opens its own.
    pub async fn discard(&self, key: &str) -> anyhow::Result<()> {
        let (id, _rx) = self.open(key, true).await?;
        self.close(id).await;
        Ok(())
    }

    /// A persistent session subscribed to `filters` (filter, QoS and options).
    pub fn session_subscribed(&self, client_id: &str, filters: Vec<(String, Subscription)>) {
        self.sessions
            .lock()
            .entry(client_id.to_string())
            .or_insert(SessionInfo {
                subscribed: true,
                expires_at: None,
            })
            .subscribed = true;
        self.persist.subscribe(client_id, filters.into_iter());
    }

    /// Puts what the last run persisted back into the router, before any device
    /// connects: retained messages, and each persistent session's subscriptions (a link
    /// opened with its client id subscribes and closes, so the router keeps the session
    /// and queues what comes for it until the device is back).
    pub async fn restore(&self) -> anyhow::Result<()> {
        let state = self.persist.snapshot();
        for (topic, retained) in state.retained {
            let Some(payload) = retained.payload() else {
                warn!(topic = %topic.escape_debug(), "a stored retained message is not base64; skipped");
                continue;
            };
            let properties = retained.properties();
            self.publish(
                Bytes::from(topic),
                payload,
                true,
                retained.qos,
                properties,
                None,
            )
            .await?;
        }
        for (client_id, stored) in state.sessions {
            let (id, _rx) = self.open(&client_id, false).await?;
            // The options the connection applies once the device is back (`take_options`).
            let mut options = Subscriptions::default();
            let filters = stored
                .into_iter()
                .map(|(path, subscription)| {
                    let filter = subscription.filter(path);
                    options.subscribe(&filter);
                    // A restart is not a SUBSCRIBE: no retained messages for it (the
                    // device got them when it subscribed; Mosquitto sends none either).
                    Filter {
                        retain_forward_rule: RetainForwardRule::Never,
                        ..filter
                    }
                })
                .collect();
            if options.wants_origin() {
                self.want_origin();
            }
            if options.active() {
                self.keep_options(&client_id, options);
            }
            let subscribe = Subscribe { pkid: 1, filters };
            self.send(id, Packet::Subscribe(subscribe, None)).await?;
            self.close(id).await;
            self.sessions.lock().insert(
                client_id,
                SessionInfo {
                    subscribed: true,
                    expires_at: None,
                },
            );
        }
        Ok(())
    }
}

/// What edgebridge carries with a message through the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marks {
    /// The QoS it was published with (2, "no downgrade", when unmarked).
    pub qos: u8,
    /// When it entered the gateway, for messages with an expiry.
    pub arrived: Option<u64>,
    /// It was published with the retain flag.
    pub retained: bool,
    /// The client id of the device that published it, when a no-local subscription
    /// exists.
    pub origin: Option<String>,
}

/// Takes edgebridge's properties out of a message from the router: its [`Marks`] and the
/// properties to deliver.
pub fn take_marks(properties: Option<PublishProperties>) -> (Marks, Option<PublishProperties>) {
    let mut marks = Marks {
        qos: 2,
        arrived: None,
        retained: false,
        origin: None,
    };
    let Some(mut p) = properties else {
        return (marks, None);
    };
    p.user_properties.retain(|(k, v)| {
        if k == QOS_PROPERTY {
            marks.qos = v.parse().unwrap_or(2);
            false
        } else if k == ARRIVAL_PROPERTY {
            marks.arrived = v.parse().ok();
            false
        } else if k == RETAINED_PROPERTY {
            marks.retained = true;
            false
        } else if k == ORIGIN_PROPERTY {
            marks.origin = Some(v.clone());
            false
        } else {
            true
        }
    });
    let empty = p == PublishProperties::default();
    (marks, (!empty).then_some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_carried_and_stripped() {
        let mut p = PublishProperties::default();
        p.user_properties.push(("site".into(), "7".into()));
        p.user_properties.push((QOS_PROPERTY.into(), "1".into()));
        p.user_properties
            .push((ARRIVAL_PROPERTY.into(), "1234".into()));
        p.user_properties
            .push((RETAINED_PROPERTY.into(), "1".into()));
        p.user_properties
            .push((ORIGIN_PROPERTY.into(), "press-7".into()));
        let (marks, rest) = take_marks(Some(p));
        assert_eq!(
            marks,
            Marks {
                qos: 1,
                arrived: Some(1234),
                retained: true,
                origin: Some("press-7".into()),
            }
        );
        let rest = rest.expect("the device's own property stays");
        assert_eq!(
            rest.user_properties,
            [("site".to_string(), "7".to_string())]
        );
        // Nothing but the marks: no properties at all are delivered.
        let mut p = PublishProperties::default();
        p.user_properties.push((QOS_PROPERTY.into(), "0".into()));
        assert_eq!(take_marks(Some(p)).1, None);
        assert_eq!(take_marks(None).0.qos, 2);
        assert!(is_mark(ORIGIN_PROPERTY) && is_mark(QOS_PROPERTY) && !is_mark("site"));
    }
}
