//! MQTT upstream sink (rumqttc): AWS IoT Core, HiveMQ, Mosquitto, any MQTT 3.1.1 broker.
//!
//! Delivery: records are published with the sink's QoS while at most `inflight` await
//! their PUBACK; rumqttc reports `Outgoing::Publish(pkid)` in the order publishes were
//! handed to it, which maps packet ids to buffer records, and `Incoming::PubAck(pkid)`
//! acks the record. On any connection error the whole rumqttc state is dropped (including
//! what it would resend by itself, which it silently forgets when the broker reports no
//! session), the buffer is rewound to the oldest unacked record, and the connection is
//! re-established after an exponential backoff with jitter. Duplicates are possible after
//! a reconnect; losses are not.
//!
//! Half-open connections: an upstream that stops answering while the TCP connection
//! stays open (a hung broker, a dead NAT entry) is caught two ways. With publishes
//! awaiting their acknowledgement, no PUBACK for `ack_timeout` marks the sink down
//! (`reason="ack_timeout"`) and reconnects; with nothing outstanding, rumqttc's own
//! PINGREQ going unanswered for a keep-alive period does the same
//! (`reason="ping_timeout"`).
//!
//! Cloud profiles (`sinks::cloud`) add limits and credentials: a payload over the cloud's
//! limit or a topic AWS refuses is dead-lettered before it is sent; with an Azure shared
//! access key every connection gets a fresh SAS token as its password, and when the token
//! is due the connection stops taking new records, waits briefly for the acks of those in
//! flight, says DISCONNECT and reconnects at once with a new token (`Outcome::Renew`; not
//! an error, the sink stays up); anything unconfirmed is resent after the rewind.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    StateError, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::info;

use super::cloud::{self, CloudProfile};
use super::{Backoff, SinkContext};
use crate::config::MqttPlan;
use crate::rules::downlink::DownlinkTap;

/// Bytes of MQTT framing around topic and payload in a PUBLISH (fixed header, lengths,
/// packet id), rounded up.
const PUBLISH_OVERHEAD: usize = 16;

/// A cloud profile's upstream closing the connection within this time after CONNACK is
/// reported as `reason="closed_after_connack"` with what it usually means. For any
/// upstream, such a connection does not reset the reconnect backoff.
const CLOSED_AFTER_CONNACK: Duration = Duration::from_secs(3);

/// Why a connection failed, as the `reason` label of `edgebridge_sink_errors_total`.
/// Every connection failure is retryable: the destination is at fault, never the data.
pub fn classify(error: &ConnectionError) -> &'static str {
    match error {
        ConnectionError::Io(e) if e.kind() == ErrorKind::ConnectionRefused => "connection_refused",
        ConnectionError::Io(e) if e.kind() == ErrorKind::TimedOut => "timeout",
        ConnectionError::Io(_) => "io",
        ConnectionError::Tls(_) => "tls",
        ConnectionError::ConnectionRefused(_) => "connack_refused",
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => "timeout",
        ConnectionError::MqttState(StateError::AwaitPingResp) => "ping_timeout",
        ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_) => "protocol",
        ConnectionError::RequestsDone => "closed",
        ConnectionError::Websocket(_)
        | ConnectionError::WsConnect(_)
        | ConnectionError::InvalidUrl(_)
        | ConnectionError::ResponseValidation(_) => "websocket",
    }
}

fn qos_of(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// rumqttc's options for one connection attempt, and, with an Azure SAS token as the
/// password, how long from now to renew it.
fn options(plan: &MqttPlan) -> Result<(MqttOptions, Option<Duration>), String> {
    let mut opts = MqttOptions::new(plan.client_id.clone(), plan.host.clone(), plan.port);
    opts.set_keep_alive(plan.keep_alive)
        .set_clean_session(plan.clean_session)
        .set_max_packet_size(plan.max_packet_size, plan.max_packet_size)
        .set_inflight(plan.inflight);
    let mut renew_in = None;
    if let Some(user) = &plan.username {
        let password = match &plan.sas {
            Some(sas) => {
                let (token, _expiry, renew) = sas.fresh_token();
                renew_in = Some(renew);
                token
            }
            None => plan.password.clone().unwrap_or_default(),
        };
        opts.set_credentials(user.clone(), password);
    }
    if let Some(tls) = &plan.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let ca = match &tls.ca {
            Some(p) => read(p)?,
            None => Vec::new(),
        };
        let client_auth = match &tls.client_auth {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        let alpn = (!tls.alpn.is_empty())
            .then(|| tls.alpn.iter().map(|a| a.as_bytes().to_vec()).collect());
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn,
            client_auth,
        }));
    }
    Ok((opts, renew_in))
}

/// A record handed to rumqttc, waiting for its packet id or its acknowledgement.
#[derive(Clone, Copy)]
struct InFlight {
    seq: u64,
    received_at: u64,
}

/// One connection's bookkeeping; dropped with the connection.
#[derive(Default)]
struct Window {
    /// Handed to rumqttc, packet id not yet known (rumqttc keeps request order).
    queued: VecDeque<InFlight>,
    /// Written; waiting for PUBACK (QoS 1) or PUBCOMP (QoS 2).
    by_pkid: HashMap<u16, InFlight>,
}

impl Window {
    fn len(&self) -> usize {
        self.queued.len() + self.by_pkid.len()
    }
}

enum Outcome {
    /// The connection failed: back off and reconnect.
    Reconnect,
    /// The SAS token is about to expire: the connection was closed cleanly; reconnect at
    /// once with a fresh one.
    Renew,
    /// Shutdown finished.
    Stopped,
}

pub async fn run(plan: MqttPlan, ctx: SinkContext) {
    let mut backoff = ctx.backoff(plan.backoff_min, plan.backoff_max);
    loop {
        let (opts, renew_in) = match options(&plan) {
            Ok(o) => o,
            Err(e) => {
                ctx.metrics.mark_down("config", &e);
                if ctx.sleep_or_stop(backoff.next_delay()).await {
                    return;
                }
                continue;
            }
        };
        let capacity = plan.inflight as usize * 2 + 16;
        let (client, mut eventloop) = AsyncClient::new(opts, capacity);
        // rumqttc leaves Nagle's algorithm on: a publish written while the previous one is
        // unacknowledged at the TCP level then waits for that ACK, which a peer delaying
        // its ACKs holds for up to 40 ms (a WAN round trip, at best). Measured with one
        // message in flight per device (S1c): p99 42 ms with Nagle, 5 ms without.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        ctx.buffer.rewind();
        let renew_at = renew_in.map(|d| Instant::now() + d);
        match connection(&plan, &ctx, &client, eventloop, &mut backoff, renew_at).await {
            Outcome::Stopped => return,
            Outcome::Renew => {}
            Outcome::Reconnect => {
                if ctx.sleep_or_stop(backoff.next_delay()).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps until `at`; never returns for `None` (guard the select branch instead).
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Events the delivery loop acts on; everything else stays in the driver task.
fn relevant(event: &Event) -> bool {
    matches!(
        event,
        Event::Incoming(Incoming::ConnAck(_))
            | Event::Incoming(Incoming::PubAck(_))
            | Event::Incoming(Incoming::PubComp(_))
            | Event::Outgoing(Outgoing::Publish(_))
            | Event::Outgoing(Outgoing::Disconnect)
    )
}

/// Polls rumqttc's event loop in a task of its own: `poll()` is never cancelled half
/// way (the delivery loop selects over the buffer too), and network I/O runs in parallel
/// with reading the buffer. Ends after forwarding the first error. Upstream PUBLISHes
/// (downlinks) go to the downlink tap from here.
fn drive(
    mut eventloop: EventLoop,
    downlink: Option<DownlinkTap>,
) -> (
    mpsc::Receiver<Result<Event, ConnectionError>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(1024);
    let task = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            if let (Some(tap), Ok(Event::Incoming(incoming))) = (&downlink, &event) {
                match incoming {
                    Incoming::Publish(publish) => tap.forward(publish).await,
                    Incoming::SubAck(ack) => tap.check_suback(&ack.return_codes),
                    _ => {}
                }
            }
            let failed = event.is_err();
            if (failed || event.as_ref().is_ok_and(relevant)) && tx.send(event).await.is_err() {
                return;
            }
            if failed {
                return;
            }
        }
    });
    (rx, task)
}

async fn connection(
    plan: &MqttPlan,
    ctx: &SinkContext,
    client: &AsyncClient,
    eventloop: EventLoop,
    backoff: &mut Backoff,
    renew_at: Option<Instant>,
) -> Outcome {
    let qos = qos_of(plan.qos);
    let window_size = plan.inflight as usize;
    let refill_at = (window_size / 4).max(1);
    let mut window = Window::default();
    let mut connected = false;
    // When CONNACK arrived: a cloud that closes the connection right after it usually
    // refuses the client id or its policy (see `CloudProfile::closed_after_connack_hint`).
    let mut connected_at: Option<Instant> = None;
    // Set once the SAS token is due for renewal: no new publishes; the connection closes
    // once those in flight are acked, or at this deadline (the rest is resent).
    let mut renewing: Option<Instant> = None;
    // When an acknowledgement last arrived, or the window last became non-empty: while
    // publishes are outstanding, nothing for `ack_timeout` means a half-open connection.
    let mut last_progress = Instant::now();
    let mut ack_check =
        tokio::time::interval((plan.ack_timeout / 4).max(Duration::from_millis(100)));
    ack_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let upstream = format!("{}:{}", plan.host, plan.port);
    let (mut events, driver) = drive(eventloop, ctx.downlink.clone());
    let outcome = loop {
        if let Some(deadline) = renewing {
            if window.len() == 0 || Instant::now() >= deadline {
                disconnect(client, &mut events).await;
                break Outcome::Renew;
            }
        }
        let room = window_size.saturating_sub(window.len());
        // Refill the window in chunks, not one record per PUBACK: each read takes the
        // buffer's lock and a read call.
        let refill = renewing.is_none() && room > 0 && (room >= refill_at || window.len() == 0);
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                break drain_and_disconnect(ctx, client, &mut events, &mut window).await;
            }
            event = events.recv() => {
                match event {
                    Some(Ok(event)) => {
                        if let Event::Incoming(Incoming::ConnAck(ack)) = &event {
                            connected = true;
                            connected_at = Some(Instant::now());
                            last_progress = Instant::now();
                            let session = if ack.session_present { "resumed" } else { "new" };
                            ctx.up(&format!("connected to {upstream} ({session} session)"));
                            if let Some(tap) = &ctx.downlink {
                                tap.subscribe(client);
                            }
                        }
                        if handle_event(ctx, &mut window, event) {
                            last_progress = Instant::now();
                            // An acknowledgement proves the upstream works; a CONNACK
                            // alone does not (see the error branch).
                            backoff.reset();
                            ctx.acked();
                        }
                    }
                    Some(Err(e)) => {
                        // A connection that lasted restarts the backoff from its minimum;
                        // one closed right after CONNACK (a duplicate client id, a policy
                        // refusal) must not, or it is retried at `backoff_min` forever.
                        if connected_at.is_some_and(|at| at.elapsed() >= CLOSED_AFTER_CONNACK) {
                            backoff.reset();
                        }
                        let mut detail = match window.len() {
                            0 => format!("{upstream}: {e}"),
                            n => format!("{upstream}: {e}; {n} unconfirmed will be resent"),
                        };
                        let mut reason = classify(&e);
                        let just_accepted = connected_at
                            .is_some_and(|at| at.elapsed() < CLOSED_AFTER_CONNACK);
                        if let (Some(profile), true) = (plan.profile, just_accepted) {
                            reason = "closed_after_connack";
                            detail = format!(
                                "{detail}; {} (client id {})",
                                profile.closed_after_connack_hint(),
                                plan.client_id
                            );
                        }
                        ctx.metrics.mark_down(reason, &detail);
                        break Outcome::Reconnect;
                    }
                    None => break Outcome::Reconnect,
                }
            }
            _ = sleep_until_some(renew_at), if renewing.is_none() && renew_at.is_some() => {
                info!(
                    sink = %ctx.name,
                    in_flight = window.len(),
                    "renewing the SAS token: reconnecting once the messages in flight are acked"
                );
                // Half the renewal margin at most: the new connection must be up before
                // the token expires.
                let margin = plan
                    .sas
                    .as_ref()
                    .map_or(Duration::ZERO, |s| cloud::renewal_margin(s.ttl));
                renewing = Some(Instant::now() + (plan.ack_timeout / 2).min(margin / 2));
            }
            _ = sleep_until_some(renewing), if renewing.is_some() => {}
            _ = ack_check.tick(), if connected && window.len() > 0 => {
                if last_progress.elapsed() >= plan.ack_timeout {
                    let detail = format!(
                        "{upstream}: no acknowledgement for {} with {} publishes outstanding; reconnecting",
                        humantime::format_duration(plan.ack_timeout),
                        window.len()
                    );
                    ctx.metrics.mark_down("ack_timeout", &detail);
                    break Outcome::Reconnect;
                }
            }
            batch = ctx.buffer.read_batch(room.min(ctx.batch)), if connected && refill => {
                if window.len() == 0 {
                    last_progress = Instant::now();
                }
                if publish_batch(plan, ctx, client, qos, batch, &mut window).await.is_err() {
                    // The event loop is gone: its error is next in `events` (or it was
                    // aborted); nothing of this batch was acked, the rewind resends it.
                    ctx.metrics.mark_down("closed", &format!("{upstream}: the connection closed"));
                    break Outcome::Reconnect;
                }
            }
        }
    };
    driver.abort();
    outcome
}

/// Hands a batch to rumqttc. Messages that can never be delivered (too large for the
/// upstream, an invalid topic) are dropped, counted and acked; an `Err` means the
/// connection is gone.
async fn publish_batch(
    plan: &MqttPlan,
    ctx: &SinkContext,
    client: &AsyncClient,
    qos: QoS,
    batch: Vec<crate::buffer::Record>,
    window: &mut Window,
) -> Result<(), rumqttc::ClientError> {
    for record in batch {
        let msg = &record.msg;
        let topic = match &plan.azure_events {
            Some(events) => events.topic_for(&msg.topic),
            None => msg.topic.clone(),
        };
        let undeliverable = undeliverable(plan, &topic, msg.payload.len());
        if let Some((reason, detail)) = undeliverable {
            if ctx
                .dead_letter(std::slice::from_ref(&record), reason, &detail)
                .await
                .is_err()
            {
                // Retrying cannot make it deliverable; it is counted and logged as lost.
                ctx.metrics.undeliverable(reason);
                ctx.buffer.ack(record.seq);
            }
            continue;
        }
        let msg = record.msg;
        let retain = msg.retain && plan.forward_retain;
        let entry = InFlight {
            seq: record.seq,
            received_at: msg.received_at,
        };
        client
            .publish_bytes(topic, qos, retain, msg.payload)
            .await?;
        window.queued.push_back(entry);
    }
    Ok(())
}

/// Why a message with `topic` (as it goes upstream) and a payload of `payload_len` bytes
/// can never be delivered, if it cannot: the `reason` label and a detail for the log and
/// the dead-letter file.
fn undeliverable(
    plan: &MqttPlan,
    topic: &str,
    payload_len: usize,
) -> Option<(&'static str, String)> {
    if let (Some(profile), Some(limit)) = (plan.profile, plan.max_payload) {
        if payload_len > limit {
            return Some((
                "too_large",
                format!(
                    "payload of {payload_len} bytes is over the {} KiB that profile {} allows",
                    limit / 1024,
                    profile.name()
                ),
            ));
        }
    }
    if topic.len() + payload_len + PUBLISH_OVERHEAD > plan.max_packet_size {
        return Some((
            "too_large",
            "larger than the upstream's max_packet_size".into(),
        ));
    }
    if topic.is_empty() || !rumqttc::valid_topic(topic) {
        return Some(("invalid_topic", "not a valid MQTT topic name".into()));
    }
    if plan.profile == Some(CloudProfile::AwsIot) {
        if let Some(problem) = cloud::aws_topic_problem(topic) {
            return Some(("invalid_topic", format!("topic {topic:?} {problem}")));
        }
    }
    None
}

/// Applies one event to the window; returns whether it confirmed a record.
fn handle_event(ctx: &SinkContext, window: &mut Window, event: Event) -> bool {
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            let Some(entry) = window.queued.pop_front() else {
                return false;
            };
            if pkid == 0 {
                // QoS 0: written is all the confirmation there will be.
                ctx.buffer.ack(entry.seq);
                ctx.metrics.delivered(entry.received_at);
                true
            } else {
                window.by_pkid.insert(pkid, entry);
                false
            }
        }
        Event::Incoming(Incoming::PubAck(ack)) => confirm(ctx, window, ack.pkid),
        Event::Incoming(Incoming::PubComp(comp)) => confirm(ctx, window, comp.pkid),
        _ => false,
    }
}

fn confirm(ctx: &SinkContext, window: &mut Window, pkid: u16) -> bool {
    let Some(entry) = window.by_pkid.remove(&pkid) else {
        return false;
    };
    ctx.buffer.ack(entry.seq);
    ctx.metrics.delivered(entry.received_at);
    true
}

/// Shutdown: wait (within the grace period) for the acks of what is in flight, then say
/// DISCONNECT. Whatever stays unacked remains in the buffer.
async fn drain_and_disconnect(
    ctx: &SinkContext,
    client: &AsyncClient,
    events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
    window: &mut Window,
) -> Outcome {
    let deadline = tokio::time::Instant::now() + ctx.grace;
    while window.len() > 0 {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Ok(event))) => {
                handle_event(ctx, window, event);
            }
            _ => break,
        }
    }
    disconnect(client, events).await;
    ctx.metrics.mark_stopped();
    Outcome::Stopped
}

/// Says DISCONNECT and waits (up to 1 s) until the upstream has closed the connection.
/// Waiting for the close, not only for the DISCONNECT to be written, matters on a SAS
/// renewal, where the next connection uses the same client id at once: a broker still
/// tearing down the old one can take that down with the new one. rumqttd (the Azure
/// stand-in in tests/cloud_profiles.rs) did, on a loaded machine: the new connection was
/// closed right after its CONNACK. rumqttd queues the old connection's end to its router
/// before it closes the socket, so after the close the two cannot cross.
async fn disconnect(
    client: &AsyncClient,
    events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
) {
    if client.try_disconnect().is_ok() {
        // The driver forwards the connection's end as an error, then stops.
        let closed = async { while let Some(Ok(_)) = events.recv().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::ConnectReturnCode;

    #[test]
    fn every_connection_failure_has_a_reason() {
        let table = [
            (
                ConnectionError::Io(std::io::Error::from(ErrorKind::ConnectionRefused)),
                "connection_refused",
            ),
            (
                ConnectionError::Io(std::io::Error::from(ErrorKind::BrokenPipe)),
                "io",
            ),
            (ConnectionError::NetworkTimeout, "timeout"),
            (
                ConnectionError::MqttState(StateError::AwaitPingResp),
                "ping_timeout",
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                "connack_refused",
            ),
            (ConnectionError::RequestsDone, "closed"),
        ];
        for (error, reason) in table {
            assert_eq!(classify(&error), reason, "{error}");
        }
    }
}
