//! MQTT upstream sink (rumqttc): AWS IoT Core, HiveMQ, Mosquitto, any MQTT 5 or 3.1.1
//! broker (`protocol`; the two rumqttc clients sit behind `client.rs`, and everything
//! below is written once for both).
//!
//! Delivery: records are published with the sink's QoS while at most `inflight` await
//! their PUBACK; rumqttc reports the packet id of each publish written
//! (`LinkEvent::Published`) in the order publishes were handed to it, which maps packet
//! ids to buffer records, and a PUBACK acks the record. An MQTT 5 PUBACK's reason code
//! decides (`puback.rs`, one table): delivered, back off and resend (quota exceeded), or
//! dead-letter (not authorized, topic name invalid, …); a DISCONNECT with a reason code
//! goes by the same table.
//!
//! Properties (MQTT 5): a message goes up with the user properties, content type, payload
//! format indicator, response topic and correlation data its device sent, and with the
//! message expiry interval less the time it spent in the gateway. A message whose expiry
//! lapsed in the buffer is not sent (on either protocol: the device asked for it) and is
//! counted as `edgebridge_buffer_dropped_total{reason="expired"}`. Over 3.1.1 the
//! properties are dropped. A pack is one publish without properties. On any connection error the whole rumqttc state is dropped (including
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
//! flight, says DISCONNECT and reconnects at once with a new token (`Ended::Again`; not
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

pub(crate) mod client;
pub mod config;
mod connections;
pub mod puback;
mod staging;
mod window;

use staging::*;
use window::*;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::client::{Client, LinkError, LinkEvent};
use self::puback::Action;
use super::cloud::{self, CloudProfile};
use super::credentials::TlsFiles;
use super::failover::{self, Endpoints, Probe, Switch};
use super::pack::{self, Pack, Packer};
use super::supervise::{supervise, Ended, Session};
use super::{sleep_until_some, Backoff, SinkContext};
use crate::buffer::{Buffer, Record};
use crate::message::{now_millis, Properties};
use config::{MqttPlan, MqttProtocol};

/// Bytes of MQTT framing around topic and payload in a PUBLISH (fixed header, lengths,
/// packet id), rounded up.
pub const PUBLISH_OVERHEAD: usize = 16;

/// A cloud profile's upstream closing the connection within this time after CONNACK is
/// reported as `reason="closed_after_connack"` with what it usually means. For any
/// upstream, such a connection does not reset the reconnect backoff.
const CLOSED_AFTER_CONNACK: Duration = Duration::from_secs(3);

pub async fn run(plan: MqttPlan, ctx: SinkContext) {
    if plan.client_ids.len() > 1 {
        return connections::run(plan, ctx).await;
    }
    let backoff = ctx.backoff(plan.backoff_min, plan.backoff_max);
    let endpoints = Endpoints::new(plan.endpoints.len(), plan.failover_after);
    ctx.metrics
        .endpoint_in_use(endpoints.current(), plan.endpoints.len());
    let mut single = Single {
        plan,
        endpoints,
        probe: None,
        isolate: None,
    };
    supervise(&ctx, backoff, &mut single).await;
}

/// A sink over one upstream connection, with failover between its endpoints: each
/// session is one connection to the endpoint in use.
struct Single {
    plan: MqttPlan,
    endpoints: Endpoints,
    /// Checks the primary while another endpoint is in use; cancels its token once the
    /// primary accepts a connection.
    probe: Option<Probe>,
    /// Records up to this seq go one at a time (see `Feed::isolate`); kept across
    /// connections.
    isolate: Option<u64>,
}

impl Session for Single {
    async fn run(&mut self, ctx: &SinkContext, backoff: &mut Backoff) -> Ended {
        let plan = &self.plan;
        if self
            .probe
            .as_ref()
            .is_some_and(|p| p.answered().is_cancelled())
        {
            self.probe = None;
            if let Some(switch) = self.endpoints.primary_answered() {
                switch_endpoint(plan, ctx, switch);
            }
        }
        let target = plan.at_endpoint(self.endpoints.current());
        ctx.buffer.rewind();
        let mut feed = Feed {
            source: Source::Buffer,
            failback: self.probe.as_ref().map(Probe::answered),
            isolate: self.isolate,
        };
        // The backoff restarts exactly when a connection proves the endpoint works.
        let resets = backoff.resets();
        let outcome = session(&target, ctx, backoff, &mut feed).await;
        self.isolate = feed.isolate;
        match outcome {
            Ended::Failed => {
                let worked = backoff.resets() != resets;
                let Some(switch) = self.endpoints.connection_ended(worked) else {
                    return Ended::Failed;
                };
                switch_endpoint(plan, ctx, switch);
                self.probe = self
                    .endpoints
                    .needs_probe()
                    .then(|| primary_probe(plan, &ctx.name, ctx.tls_files.clone()));
                // A different endpoint: try it at once.
                Ended::Again
            }
            other => other,
        }
    }

    /// No point waiting to retry a backup once the primary answers.
    async fn wake(&self) {
        cancelled_some(self.probe.as_ref().map(Probe::answered)).await
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
fn primary_probe(plan: &MqttPlan, sink: &str, tls_files: Arc<TlsFiles>) -> Probe {
    let mut primary = plan.at_endpoint(0);
    primary.client_id = format!("{}-probe", plan.client_id);
    primary.clean_session = true;
    let interval = plan.failback_check;
    Probe::spawn(sink.to_string(), interval, move || {
        client::options(&primary, &tls_files).map(|(opts, _)| opts)
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
    /// After an MQTT 5 DISCONNECT whose reason code dead-letters (packet too large, …)
    /// came with several publishes outstanding: the newest of them. Until a record past
    /// it is resolved, publishes go one at a time, so that the next such DISCONNECT
    /// names its message. Single-connection sinks only (with `connections > 1` such a
    /// DISCONNECT is retried).
    isolate: Option<u64>,
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

/// One connection attempt and, once connected, its session until it ends: `Failed`
/// (back off, perhaps fail over), `Throttled` (the upstream refused a publish for now:
/// MQTT 5 quota exceeded or server busy; what is unconfirmed is resent), `Again` (the SAS
/// token is about to expire, or the primary answers again after a failover: closed
/// cleanly, reconnect at once, with a fresh token, to the primary) or `Stopped`.
async fn session(
    plan: &MqttPlan,
    ctx: &SinkContext,
    backoff: &mut Backoff,
    feed: &mut Feed<'_>,
) -> Ended {
    let (opts, renew_in) = match client::options(plan, &ctx.tls_files) {
        Ok(o) => o,
        Err(e) => {
            ctx.metrics.mark_down("config", &e);
            return Ended::Failed;
        }
    };
    let capacity = plan.inflight as usize * 2 + 16;
    let (client, events, driver) = client::start(opts, capacity, ctx.downlink.clone());
    let renew_at = renew_in.map(|d| Instant::now() + d);
    let outcome = connection(plan, ctx, &client, events, backoff, renew_at, feed).await;
    driver.abort();
    outcome
}

/// Waits until `token` is cancelled; never returns for `None` (guard the select branch
/// instead).
async fn cancelled_some(token: Option<&CancellationToken>) {
    match token {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

async fn connection(
    plan: &MqttPlan,
    ctx: &SinkContext,
    client: &Client,
    mut events: mpsc::Receiver<Result<LinkEvent, LinkError>>,
    backoff: &mut Backoff,
    renew_at: Option<Instant>,
    feed: &mut Feed<'_>,
) -> Ended {
    let stop = feed.source.stop();
    let failback = feed.failback;
    let full_window = plan.inflight as usize;
    // The largest packet the upstream takes: `max_packet_size`, or less when an MQTT 5
    // upstream says so in its CONNACK (rumqttc refuses to send a larger one and would
    // fail the connection over it, again after every reconnect).
    let mut max_packet = plan.max_packet_size;
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
    // The upstream refused a publish for now (quota exceeded): the connection closes the
    // way a renewal does (the acks of those in flight still count), then backs off.
    let mut throttled = false;
    // When an acknowledgement last arrived, or the window last became non-empty: while
    // publishes are outstanding, nothing for `ack_timeout` means a half-open connection.
    let mut last_progress = Instant::now();
    let mut ack_check =
        tokio::time::interval((plan.ack_timeout / 4).max(Duration::from_millis(100)));
    ack_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let upstream = format!("{}:{}", plan.host, plan.port);
    // With `pack`: open packs, and closed ones on their way to `ready`.
    let mut packer = plan.pack.clone().map(|p| Packer::new(p, full_window));
    let mut packed: VecDeque<Pack> = VecDeque::new();
    loop {
        // One publish at a time while a refusal's culprit is looked for (`Feed::isolate`).
        let window_size = if feed.isolate.is_some() {
            1
        } else {
            full_window
        };
        let refill_at = (window_size / 4).max(1);
        if let Some(deadline) = renewing {
            if window.len() == 0 || Instant::now() >= deadline {
                disconnect(ctx, client, &mut events, &mut window).await;
                break if throttled {
                    Ended::Throttled
                } else {
                    Ended::Again
                };
            }
        }
        let room = window_size.saturating_sub(window.len() + ready.len());
        // Refill the window in chunks, not one record per PUBACK: each read takes the
        // buffer's lock and a read call.
        // Packing reads whole batches (many records make one publish), and reads on while
        // the window is full, so that open packs fill up instead of lingering out half
        // empty; closed packs of [`READY_PACKS`] full packs' bytes waiting in `ready` stop
        // the reading.
        let (refill, read) = match &packer {
            Some(p) => {
                let waiting: usize = ready.iter().map(|r| r.payload.len()).sum();
                (
                    renewing.is_none() && waiting < READY_PACKS * p.plan().max_bytes,
                    ctx.batch,
                )
            }
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
            _ = cancelled_some(stop.as_ref()) => break Ended::Failed,
            event = events.recv() => {
                match event {
                    Some(Ok(event)) => {
                        if let LinkEvent::ConnAck { session_present, max_packet_size } = &event {
                            connected = true;
                            connected_at = Some(Instant::now());
                            last_progress = Instant::now();
                            if let Some(limit) = max_packet_size {
                                max_packet = max_packet.min(*limit);
                            }
                            let session = if *session_present { "resumed" } else { "new" };
                            ctx.up(&format!(
                                "connected to {upstream} (MQTT {}, {session} session)",
                                plan.protocol.name()
                            ));
                            if let Some(tap) = &ctx.downlink {
                                client.subscribe_downlinks(tap);
                            }
                        }
                        match handle_event(ctx, &mut window, event) {
                            Acked::Nothing => {}
                            Acked::Confirmed(last_seq) => {
                                last_progress = Instant::now();
                                // An acknowledgement proves the upstream works; a CONNACK
                                // alone does not (see the error branch).
                                backoff.reset();
                                ctx.acked();
                                resolved(feed, last_seq);
                            }
                            Acked::Refused { entry, code } => {
                                let detail = format!(
                                    "{upstream}: PUBACK {} for {} message(s)",
                                    puback::describe(code),
                                    entry.records().len()
                                );
                                match puback::action(code) {
                                    Action::DeadLetter { reason } => {
                                        last_progress = Instant::now();
                                        backoff.reset();
                                        if dead_letter_all(ctx, entry.records(), reason, &detail).await.is_err() {
                                            break dead_letter_failed(ctx, &upstream);
                                        }
                                        ctx.acked();
                                        resolved(feed, entry.last_seq());
                                    }
                                    // Once per connection: later refusals in the same
                                    // window are resent with it.
                                    Action::Retry { reason } if !throttled => {
                                        ctx.metrics.mark_down(reason, &format!(
                                            "{detail}; backing off once the {} in flight are answered; the refused ones will be resent",
                                            window.len()
                                        ));
                                        // Publishes written before a DISCONNECT are answered
                                        // before it, but rumqttc stops reading once it
                                        // has sent one: wait for their acks first, or
                                        // they would be sent twice.
                                        throttled = true;
                                        let grace = (plan.ack_timeout / 2).min(failover::FAILBACK_GRACE);
                                        renewing = Some(renewing.map_or(Instant::now() + grace, |r| r.min(Instant::now() + grace)));
                                    }
                                    Action::Retry { .. } => {}
                                    // `handle_event` confirms those itself.
                                    Action::Delivered => {}
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if let Some(code) = e.disconnect_code {
                            match puback::action(code) {
                                Action::DeadLetter { reason } => {
                                    let detail = format!(
                                        "{upstream}: DISCONNECT {} with {} publish(es) outstanding",
                                        puback::describe(code),
                                        window.len()
                                    );
                                    match window.take_single() {
                                        Some(entry) => {
                                            if dead_letter_all(ctx, entry.records(), reason, &detail).await.is_err() {
                                                break dead_letter_failed(ctx, &upstream);
                                            }
                                            resolved(feed, entry.last_seq());
                                        }
                                        // Not one culprit: find it one publish at a time.
                                        None if matches!(feed.source, Source::Buffer) => {
                                            feed.isolate = feed.isolate.max(window.last_seq());
                                        }
                                        None => {}
                                    }
                                    // The message is counted under `reason` by the dead
                                    // letter; the connection's end under "disconnected".
                                    ctx.metrics.mark_down(e.reason, &detail);
                                    break Ended::Failed;
                                }
                                Action::Retry { reason } => {
                                    ctx.metrics.mark_down(reason, &format!(
                                        "{upstream}: DISCONNECT {}; backing off, {} unconfirmed will be resent",
                                        puback::describe(code),
                                        window.len()
                                    ));
                                    break Ended::Throttled;
                                }
                                Action::Delivered => {}
                            }
                        }
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
                        let mut reason = e.reason;
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
                        break Ended::Failed;
                    }
                    None => break Ended::Failed,
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
                    break Ended::Failed;
                }
            }
            _ = pack::linger_until(linger), if linger.is_some() && renewing.is_none() => {
                if let Some(packer) = &mut packer {
                    packer.close_due(Instant::now(), &mut packed);
                }
                if stage_packs(plan, ctx, max_packet, &mut packed, &mut ready).await.is_err() {
                    break dead_letter_failed(ctx, &upstream);
                }
            }
            batch = feed.source.read_batch(&ctx.buffer, read), if connected && refill => {
                let staged = match &mut packer {
                    Some(packer) => match pack_batch(plan, ctx, max_packet, packer, batch, &mut packed).await {
                        Ok(()) => stage_packs(plan, ctx, max_packet, &mut packed, &mut ready).await,
                        failed => failed,
                    },
                    None => stage(plan, ctx, max_packet, batch, &mut ready).await,
                };
                if staged.is_err() {
                    break dead_letter_failed(ctx, &upstream);
                }
                let sent = publish_ready(ctx, client, plan.qos, &mut ready, &mut window, window_size, pacer.as_mut(), &mut last_progress).await;
                if sent.is_err() {
                    // The event loop is gone: its error is next in `events` (or it was
                    // aborted); nothing of this batch was acked, the rewind resends it.
                    ctx.metrics.mark_down("closed", &format!("{upstream}: the connection closed"));
                    break Ended::Failed;
                }
            }
            // The pacer's wait is a branch of its own, so acks, shutdown and the half-open
            // check go on while it holds records back.
            _ = sleep_until_some(paced_until), if connected && renewing.is_none() && paced_until.is_some() => {
                let sent = publish_ready(ctx, client, plan.qos, &mut ready, &mut window, window_size, pacer.as_mut(), &mut last_progress).await;
                if sent.is_err() {
                    ctx.metrics.mark_down("closed", &format!("{upstream}: the connection closed"));
                    break Ended::Failed;
                }
            }
        }
    }
}

/// Shutdown: wait (within the grace period) for the acks of what is in flight, then say
/// DISCONNECT. Whatever stays unacked remains in the buffer (a refused publish too: it is
/// dealt with after the restart).
async fn drain_and_disconnect(
    ctx: &SinkContext,
    client: &Client,
    events: &mut mpsc::Receiver<Result<LinkEvent, LinkError>>,
    window: &mut Window,
) -> Ended {
    let deadline = tokio::time::Instant::now() + ctx.grace;
    while window.len() > 0 {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Ok(event))) => {
                handle_event(ctx, window, event);
            }
            _ => break,
        }
    }
    disconnect(ctx, client, events, window).await;
    ctx.metrics.mark_stopped();
    Ended::Stopped
}

/// Says DISCONNECT and waits (up to 1 s) until the upstream has closed the connection.
/// Waiting for the close, not only for the DISCONNECT to be written, matters on a SAS
/// renewal, where the next connection uses the same client id at once: a broker still
/// tearing down the old one can take that down with the new one. rumqttd (the Azure
/// stand-in in tests/cloud_profiles.rs) did, on a loaded machine: the new connection was
/// closed right after its CONNACK. rumqttd queues the old connection's end to its router
/// before it closes the socket, so after the close the two cannot cross.
///
/// Acknowledgements that arrive meanwhile still confirm their records (a refusal among
/// them leaves its record to be resent), so that a connection closed over a refusal
/// (quota exceeded) does not resend what the upstream had already accepted.
async fn disconnect(
    ctx: &SinkContext,
    client: &Client,
    events: &mut mpsc::Receiver<Result<LinkEvent, LinkError>>,
    window: &mut Window,
) {
    if client.try_disconnect() {
        // The driver forwards the connection's end as an error, then stops.
        let closed = async {
            while let Some(Ok(event)) = events.recv().await {
                handle_event(ctx, window, event);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_counts_down_with_the_time_in_the_buffer() {
        assert_eq!(remaining_expiry(None, 10_000_000), Ok(None));
        assert_eq!(remaining_expiry(Some(60), 0), Ok(Some(60)));
        // Rounded up: time left never goes out as 0 ("no expiry").
        assert_eq!(remaining_expiry(Some(60), 59_001), Ok(Some(1)));
        assert_eq!(remaining_expiry(Some(60), 20_500), Ok(Some(40)));
        assert_eq!(remaining_expiry(Some(60), 60_000), Err(()));
        assert_eq!(remaining_expiry(Some(0), 0), Err(()));
    }
}
