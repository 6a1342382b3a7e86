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
mod connection;
mod connections;
pub mod puback;
mod staging;
mod window;

use connection::connection;
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
