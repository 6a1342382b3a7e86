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
//! Pacing (`rate`): records read from the buffer wait in a ready queue until the
//! connection's pacer lets them go, one PUBLISH at a time; the wait is a branch of the
//! delivery loop, so acks, shutdown and the half-open check carry on meanwhile, and the
//! ack timeout only runs while publishes are outstanding. A new connection gets a new
//! pacer (AWS counts its limits per connection); what was ready is read again after the
//! rewind.
//!
//! Half-open connections: an upstream that stops answering while the TCP connection
//! stays open (a hung broker, a dead NAT entry) is caught two ways. With publishes
//! awaiting their acknowledgement, no PUBACK for `ack_timeout` marks the sink down
//! (`reason="ack_timeout"`) and reconnects; with nothing outstanding, rumqttc's own
//! PINGREQ going unanswered for a keep-alive period does the same
//! (`reason="ping_timeout"`).
//!
//! `connections = N` (`connections.rs`): N such connections, each message routed to the
//! one its upstream topic was given, so order per topic holds; they fail and reconnect
//! together.
//!
//! Cloud profiles (`sinks::cloud`) add limits and credentials: a payload over the cloud's
//! limit or a topic AWS refuses is dead-lettered before it is sent; with an Azure shared
//! access key every connection gets a fresh SAS token as its password, and when the token
//! is due the connection stops taking new records, waits briefly for the acks of those in
//! flight, says DISCONNECT and reconnects at once with a new token (`Outcome::Renew`; not
//! an error, the sink stays up); anything unconfirmed is resent after the rewind.
//!
//! Failover (`url` as a list, `sinks::failover`): `run` picks the endpoint of each
//! connection. After `failover_after` failed attempts in a row it moves to the next one;
//! while not on the first, a background probe checks the first, and once it answers the
//! connection closes the way a SAS renewal does and the next one goes to the first.
//!
//! Packing (`pack = { ... }`, `sinks::pack`): records go through a [`Packer`] and each
//! closed pack is one publish; its PUBACK acks every record in it. Open packs belong to
//! the connection: after a reconnect the rewind reads their records again. Pacing applies
//! to what goes on the wire: a pack is one paced publish.

mod connections;

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
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::cloud::{self, CloudProfile};
use super::failover::{self, Endpoints, Probe, Switch};
use super::pack::{self, Pack, Packer};
use super::{sleep_until_some, Backoff, SinkContext};
use crate::buffer::{Buffer, Record};
use crate::config::MqttPlan;
use crate::rules::downlink::DownlinkTap;

/// Bytes of MQTT framing around topic and payload in a PUBLISH (fixed header, lengths,
/// packet id), rounded up.
pub const PUBLISH_OVERHEAD: usize = 16;

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

/// A publish handed to rumqttc, waiting for its packet id or its acknowledgement: one
/// record, or the records of a pack, acked together.
#[derive(Clone)]
enum InFlight {
    One {
        seq: u64,
        received_at: u64,
    },
    /// `(seq, received_at)` of each record in the pack.
    Pack(Vec<(u64, u64)>),
}

impl InFlight {
    /// The upstream confirmed it: acks its records and counts each as delivered.
    fn confirm(&self, ctx: &SinkContext) {
        match self {
            InFlight::One { seq, received_at } => {
                ctx.buffer.ack(*seq);
                ctx.metrics.delivered(*received_at);
            }
            InFlight::Pack(records) => {
                for &(seq, received_at) in records {
                    ctx.buffer.ack(seq);
                    ctx.metrics.delivered(received_at);
                }
            }
        }
    }
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

/// A record (or a closed pack) read from the buffer, checked deliverable, waiting for the
/// pacer and for room in the window before it is handed to rumqttc. Not in the window: a
/// paced wait is not a missing ack.
struct Ready {
    entry: InFlight,
    topic: String,
    payload: bytes::Bytes,
    retain: bool,
}

impl Ready {
    /// What the PUBLISH puts on the wire, as paced: topic, payload and framing.
    fn wire_bytes(&self) -> usize {
        self.topic.len() + self.payload.len() + PUBLISH_OVERHEAD
    }
}

enum Outcome {
    /// The connection failed: back off and reconnect.
    Reconnect,
    /// The SAS token is about to expire, or the primary endpoint answers again after a
    /// failover: the connection was closed cleanly; reconnect at once (with a fresh
    /// token, to the primary).
    Renew,
    /// Shutdown finished.
    Stopped,
}

pub async fn run(plan: MqttPlan, ctx: SinkContext) {
    if plan.client_ids.len() > 1 {
        return connections::run(plan, ctx).await;
    }
    let mut backoff = ctx.backoff(plan.backoff_min, plan.backoff_max);
    let mut endpoints = Endpoints::new(plan.endpoints.len(), plan.failover_after);
    ctx.metrics
        .endpoint_in_use(endpoints.current(), plan.endpoints.len());
    // Checks the primary while another endpoint is in use; cancels its token once the
    // primary accepts a connection.
    let mut probe: Option<Probe> = None;
    loop {
        if probe.as_ref().is_some_and(|p| p.answered().is_cancelled()) {
            probe = None;
            if let Some(switch) = endpoints.primary_answered() {
                switch_endpoint(&plan, &ctx, switch);
            }
        }
        let target = plan.at_endpoint(endpoints.current());
        ctx.buffer.rewind();
        let mut feed = Feed {
            source: Source::Buffer,
            failback: probe.as_ref().map(Probe::answered),
        };
        // The backoff restarts exactly when a connection proves the endpoint works.
        let resets = backoff.resets();
        match session(&target, &ctx, &mut backoff, &mut feed).await {
            Outcome::Stopped => return,
            Outcome::Renew => {}
            Outcome::Reconnect => {
                let worked = backoff.resets() != resets;
                if let Some(switch) = endpoints.connection_ended(worked) {
                    switch_endpoint(&plan, &ctx, switch);
                    probe = endpoints
                        .needs_probe()
                        .then(|| primary_probe(&plan, &ctx.name));
                    // A different endpoint: try it at once.
                    continue;
                }
                // Cut short when the primary answers: no point waiting to retry a backup.
                tokio::select! {
                    stop = ctx.sleep_or_stop(backoff.next_delay()) => if stop {
                        return;
                    },
                    _ = cancelled_some(probe.as_ref().map(Probe::answered)) => {}
                }
            }
        }
    }
}

/// Logs a change of endpoint and shows it in the metric and the status.
fn switch_endpoint(plan: &MqttPlan, ctx: &SinkContext, switch: Switch) {
    let name = |i: usize| plan.endpoints.get(i).map(ToString::to_string);
    let to = name(switch.to()).unwrap_or_default();
    match switch {
        Switch::Failover { from, failures, .. } => warn!(
            sink = %ctx.name,
            from = %name(from).unwrap_or_default(),
            to = %to,
            failures,
            "endpoint failed; failing over to the next one"
        ),
        Switch::Failback { from } => info!(
            sink = %ctx.name,
            from = %name(from).unwrap_or_default(),
            to = %to,
            "primary endpoint answers again; failing back to it"
        ),
    }
    ctx.metrics
        .endpoint_in_use(switch.to(), plan.endpoints.len());
}

/// Starts the background check of the primary endpoint: an MQTT connect with the sink's
/// TLS and credentials, as `{client_id}-probe` with a clean session, so that it never
/// takes over the session (or, on a cluster behind both endpoints, the connection) of
/// the sink itself.
fn primary_probe(plan: &MqttPlan, sink: &str) -> Probe {
    let mut primary = plan.at_endpoint(0);
    primary.client_id = format!("{}-probe", plan.client_id);
    primary.clean_session = true;
    let interval = plan.failback_check;
    Probe::spawn(sink.to_string(), interval, move || {
        options(&primary).map(|(opts, _)| opts)
    })
}

/// What drives one connection besides its upstream.
struct Feed<'a> {
    /// Where its records come from.
    source: Source,
    /// Failover (`sinks::failover`): cancelled once the primary answers again; the
    /// connection then closes the way a SAS renewal does, and the next one goes to the
    /// primary.
    failback: Option<&'a CancellationToken>,
}

/// Where one connection's records come from.
enum Source {
    /// The sink's buffer itself: the only connection.
    Buffer,
    /// This connection's share of the buffer's records (`connections > 1`); `stop` ends
    /// the connection when another one of its group failed.
    Routed {
        records: mpsc::Receiver<Record>,
        stop: CancellationToken,
    },
}

impl Source {
    /// Up to `max` records; waits for at least one.
    async fn read_batch(&mut self, buffer: &Buffer, max: usize) -> Vec<Record> {
        match self {
            Source::Buffer => buffer.read_batch(max).await,
            Source::Routed { records, .. } => {
                // Closed: the group is stopping, and `stop` ends this connection.
                let Some(first) = records.recv().await else {
                    return std::future::pending().await;
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match records.try_recv() {
                        Ok(record) => batch.push(record),
                        Err(_) => break,
                    }
                }
                batch
            }
        }
    }

    fn stop(&self) -> Option<CancellationToken> {
        match self {
            Source::Buffer => None,
            Source::Routed { stop, .. } => Some(stop.clone()),
        }
    }
}

/// One connection attempt and, once connected, its session until it ends.
async fn session(
    plan: &MqttPlan,
    ctx: &SinkContext,
    backoff: &mut Backoff,
    feed: &mut Feed<'_>,
) -> Outcome {
    let (opts, renew_in) = match options(plan) {
        Ok(o) => o,
        Err(e) => {
            ctx.metrics.mark_down("config", &e);
            return Outcome::Reconnect;
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
    let renew_at = renew_in.map(|d| Instant::now() + d);
    connection(plan, ctx, &client, eventloop, backoff, renew_at, feed).await
}

/// Waits until `token` is cancelled; never returns for `None` (guard the select branch
/// instead).
async fn cancelled_some(token: Option<&CancellationToken>) {
    match token {
        Some(token) => token.cancelled().await,
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
    feed: &mut Feed<'_>,
) -> Outcome {
    let stop = feed.source.stop();
    let failback = feed.failback;
    let qos = qos_of(plan.qos);
    let window_size = plan.inflight as usize;
    let refill_at = (window_size / 4).max(1);
    let mut window = Window::default();
    // Read and checked, not yet handed to rumqttc: held back by the pacer. Dropped with
    // the connection; the rewind before the next one reads them again.
    let mut ready: VecDeque<Ready> = VecDeque::new();
    // AWS counts its limits per connection: a new connection starts a new pacer.
    let mut pacer = ctx.pacer();
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
    // With `pack`: open packs, and closed ones on their way to `ready`.
    let mut packer = plan.pack.clone().map(|p| Packer::new(p, window_size));
    let mut packed: VecDeque<Pack> = VecDeque::new();
    let (mut events, driver) = drive(eventloop, ctx.downlink.clone());
    let outcome = loop {
        if let Some(deadline) = renewing {
            if window.len() == 0 || Instant::now() >= deadline {
                disconnect(client, &mut events).await;
                break Outcome::Renew;
            }
        }
        let room = window_size.saturating_sub(window.len() + ready.len());
        // Refill the window in chunks, not one record per PUBACK: each read takes the
        // buffer's lock and a read call.
        // Packing reads whole batches (many records make one publish), and reads on while
        // the window is full, so that open packs fill up instead of lingering out half
        // empty; a closed pack waiting in `ready` stops the reading.
        let (refill, read) = match packer {
            Some(_) => (renewing.is_none() && ready.is_empty(), ctx.batch),
            None => (
                renewing.is_none()
                    && room > 0
                    && (room >= refill_at || window.len() + ready.len() == 0),
                room.min(ctx.batch),
            ),
        };
        let linger = packer.as_ref().and_then(|p| p.next_deadline());
        // When the pacer lets the next ready publish go (`None`: nothing waits, or the
        // window is full and an ack comes first).
        let paced_until = match (ready.front(), pacer.as_mut()) {
            _ if window.len() >= window_size => None,
            (Some(next), Some(p)) => Some(p.ready_at(next.wire_bytes(), Instant::now())),
            (Some(_), None) => Some(Instant::now()),
            (None, _) => None,
        };
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                break drain_and_disconnect(ctx, client, &mut events, &mut window).await;
            }
            // Another connection of the group failed: all reconnect, and what is
            // unconfirmed here is resent after the rewind.
            _ = cancelled_some(stop.as_ref()) => break Outcome::Reconnect,
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
            _ = cancelled_some(failback), if renewing.is_none() && failback.is_some() => {
                // The primary answers again (`sinks::failover`): leave this endpoint the
                // way a SAS renewal does.
                let grace = (plan.ack_timeout / 2).min(failover::FAILBACK_GRACE);
                renewing = Some(Instant::now() + grace);
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
            _ = pack::linger_until(linger), if linger.is_some() && renewing.is_none() => {
                if let Some(packer) = &mut packer {
                    packer.close_due(Instant::now(), &mut packed);
                }
                if stage_packs(plan, ctx, &mut packed, &mut ready).await.is_err() {
                    break dead_letter_failed(ctx, &upstream);
                }
            }
            batch = feed.source.read_batch(&ctx.buffer, read), if connected && refill => {
                let staged = match &mut packer {
                    Some(packer) => match pack_batch(plan, ctx, packer, batch, &mut packed).await {
                        Ok(()) => stage_packs(plan, ctx, &mut packed, &mut ready).await,
                        failed => failed,
                    },
                    None => stage(plan, ctx, batch, &mut ready).await,
                };
                if staged.is_err() {
                    break dead_letter_failed(ctx, &upstream);
                }
                let sent = publish_ready(client, qos, &mut ready, &mut window, window_size, pacer.as_mut(), &mut last_progress).await;
                if sent.is_err() {
                    // The event loop is gone: its error is next in `events` (or it was
                    // aborted); nothing of this batch was acked, the rewind resends it.
                    ctx.metrics.mark_down("closed", &format!("{upstream}: the connection closed"));
                    break Outcome::Reconnect;
                }
            }
            // The pacer's wait is a branch of its own, so acks, shutdown and the half-open
            // check go on while it holds records back.
            _ = sleep_until_some(paced_until), if connected && renewing.is_none() && paced_until.is_some() => {
                let sent = publish_ready(client, qos, &mut ready, &mut window, window_size, pacer.as_mut(), &mut last_progress).await;
                if sent.is_err() {
                    ctx.metrics.mark_down("closed", &format!("{upstream}: the connection closed"));
                    break Outcome::Reconnect;
                }
            }
        }
    };
    driver.abort();
    outcome
}

/// Ends the session after a failed dead-letter write (see [`DeadLetterFailed`]).
fn dead_letter_failed(ctx: &SinkContext, upstream: &str) -> Outcome {
    ctx.metrics.mark_down(
        "dead_letter",
        &format!("{upstream}: cannot write the dead-letter file; the undeliverable message stays buffered and is retried"),
    );
    Outcome::Reconnect
}

/// Checks a batch read from the buffer and queues it in `ready`. Messages that can never
/// be delivered (too large for the upstream, an invalid topic) are dead-lettered, counted
/// and acked instead.
async fn stage(
    plan: &MqttPlan,
    ctx: &SinkContext,
    batch: Vec<crate::buffer::Record>,
    ready: &mut VecDeque<Ready>,
) -> Result<(), DeadLetterFailed> {
    for record in batch {
        let topic = upstream_topic(plan, &record.msg.topic);
        if let Some((reason, detail)) = undeliverable(plan, &topic, record.msg.payload.len()) {
            dead_letter_one(ctx, record, reason, &detail).await?;
            continue;
        }
        let msg = record.msg;
        ready.push_back(Ready {
            entry: InFlight::One {
                seq: record.seq,
                received_at: msg.received_at,
            },
            topic,
            payload: msg.payload,
            retain: msg.retain && plan.forward_retain,
        });
    }
    Ok(())
}

/// Queues closed packs in `ready`. A pack of one message that is too large for the
/// upstream is dead-lettered instead (only a pack of one can be: see `Packer::push`).
async fn stage_packs(
    plan: &MqttPlan,
    ctx: &SinkContext,
    packed: &mut VecDeque<Pack>,
    ready: &mut VecDeque<Ready>,
) -> Result<(), DeadLetterFailed> {
    while let Some(pack) = packed.pop_front() {
        let topic = upstream_topic(plan, &pack.key);
        if let Some((reason, detail)) = undeliverable(plan, &topic, pack.body.len()) {
            for record in pack.records {
                dead_letter_one(ctx, record, reason, &detail).await?;
            }
            continue;
        }
        let entry = InFlight::Pack(
            pack.records
                .iter()
                .map(|r| (r.seq, r.msg.received_at))
                .collect(),
        );
        // A pack is never published retained: its parts say whether they were.
        ready.push_back(Ready {
            entry,
            topic,
            payload: bytes::Bytes::from(pack.body),
            retain: false,
        });
    }
    Ok(())
}

/// Hands rumqttc the ready publishes the pacer lets go now (all of them without a pacer)
/// while the window has room. The window becoming non-empty starts the ack timeout
/// (`last_progress`). An `Err` means the connection is gone.
async fn publish_ready(
    client: &AsyncClient,
    qos: QoS,
    ready: &mut VecDeque<Ready>,
    window: &mut Window,
    window_size: usize,
    mut pacer: Option<&mut super::Pacer>,
    last_progress: &mut Instant,
) -> Result<(), rumqttc::ClientError> {
    while let Some(next) = ready.front() {
        if window.len() >= window_size {
            break;
        }
        if let Some(p) = pacer.as_deref_mut() {
            if !p.try_acquire(next.wire_bytes(), Instant::now()) {
                break;
            }
        }
        let Some(next) = ready.pop_front() else { break };
        if window.len() == 0 {
            *last_progress = Instant::now();
        }
        client
            .publish_bytes(next.topic, qos, next.retain, next.payload)
            .await?;
        window.queued.push_back(next.entry);
    }
    Ok(())
}

/// The upstream topic of a message (or pack) whose topic in the buffer is `topic`.
fn upstream_topic(plan: &MqttPlan, topic: &str) -> String {
    match &plan.azure_events {
        Some(events) => events.topic_for(topic),
        None => topic.to_string(),
    }
}

/// Adds a batch to the open packs; closed ones go to `packed`. A record whose topic can
/// never be published is dead-lettered here, before it joins a pack.
async fn pack_batch(
    plan: &MqttPlan,
    ctx: &SinkContext,
    packer: &mut Packer,
    batch: Vec<crate::buffer::Record>,
    packed: &mut VecDeque<Pack>,
) -> Result<(), DeadLetterFailed> {
    let now = Instant::now();
    for record in batch {
        let topic = upstream_topic(plan, &record.msg.topic);
        if let Some((reason, detail)) = undeliverable(plan, &topic, 0) {
            dead_letter_one(ctx, record, reason, &detail).await?;
            continue;
        }
        // What the packet limit leaves for the payload next to this topic.
        let cap = plan
            .max_packet_size
            .saturating_sub(topic.len() + PUBLISH_OVERHEAD);
        packer.push(record, cap, now, packed);
    }
    Ok(())
}

/// The dead-letter file could not be written: nothing was acked, the session ends and the
/// record is read again after the rewind (counted as `reason="dead_letter"` each time), so
/// it stays in the buffer until the file can be written.
#[derive(Debug)]
struct DeadLetterFailed;

/// Dead-letters a record that can never be delivered (see [`SinkContext::dead_letter`]).
async fn dead_letter_one(
    ctx: &SinkContext,
    record: crate::buffer::Record,
    reason: &'static str,
    detail: &str,
) -> Result<(), DeadLetterFailed> {
    ctx.dead_letter(std::slice::from_ref(&record), reason, detail)
        .await
        .map_err(|_| DeadLetterFailed)
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
                entry.confirm(ctx);
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
    entry.confirm(ctx);
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
