//! Kafka sink: produces each buffered message as a Kafka record with librdkafka
//! (rdkafka's `ThreadedProducer`), and acks the buffer record only on an `Ok` delivery
//! report.
//!
//! Input: batches from the sink's buffer, at most `inflight` records awaiting their
//! delivery report (or, with a `rate`, waiting for the pacer: one record is one paced
//! message, its key and value its bytes). Each record: topic and key rendered from templates (`{1}`.. are the
//! levels of the MQTT topic; the key defaults to the MQTT topic, so one device topic
//! stays in one partition), value = the payload (or the JSON envelope), headers
//! `mqtt_topic`, `qos`, `gateway_id` and, unless `property_headers = false`, the MQTT 5
//! user properties (`{property_header_prefix}{key}`, in order, repeated keys kept) and the
//! content type (`content-type`); the envelope format carries all properties in its
//! `properties` object.
//!
//! Output: delivery reports, from librdkafka's poll thread over a channel. What a failed
//! report means is decided in one place, [`fault`]: the message's fault (too large, an
//! invalid record or topic) sends it to the dead-letter file and the stream goes on;
//! anything else (brokers down, timeouts, authorization…) is the cluster's or the
//! configuration's: the sink waits for every report in flight, marks itself down with
//! the reason, backs off, rewinds its buffer and produces again from the oldest
//! unconfirmed record. A fatal producer error (e.g. the idempotent producer's sequence
//! broken) recreates the producer.
//!
//! Ordering: `enable.idempotence = true` keeps librdkafka's own retries in order and
//! without duplicates per partition; after a failed report edgebridge re-produces only
//! once nothing else is in flight. On shutdown the producer is flushed within the grace
//! period; what was not confirmed stays in the buffer.
//!
//! TLS files named in the properties (`ssl.ca.location`, `ssl.certificate.location`,
//! `ssl.key.location`; not with `ssl.key.password`, whose encrypted key librdkafka reads
//! itself) are read by edgebridge and handed to librdkafka as PEM, every
//! [`CREDENTIALS_POLL`]: when they changed and load, the producer is made again with them
//! once the records in flight are confirmed (at once while the sink is down: its records
//! are produced again), so later connections use them; when they do not load, the last
//! set that did stays ([`super::credentials::TlsFiles`]).

pub mod config;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

pub use config::{KafkaPlan, KafkaSinkSection};

use super::credentials::{LoadedTls, CREDENTIALS_POLL};
use super::supervise::{supervise, Ended, Session};
use super::{sleep_until_some, Backoff, Pacer, SinkContext};
use crate::buffer::Record;
use crate::message::Message;
use crate::rules::{level_ranges, TemplateVars};
use config::{valid_topic_name, KafkaFormat};

/// Whose fault a failed delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The message can never be delivered: dead-letter it, go on.
    Message,
    /// The cluster or the configuration: keep the message, retry, mark the sink down.
    Cluster,
}

/// The error table.
pub fn fault(code: RDKafkaErrorCode) -> Fault {
    use RDKafkaErrorCode::*;
    match code {
        MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge | InvalidMessage
        | InvalidRecord | InvalidTimestamp | InvalidTopic | BadMessage => Fault::Message,
        _ => Fault::Cluster,
    }
}

/// The `reason` label of an error code: `MessageTimedOut` → `message_timed_out`.
fn reason(code: RDKafkaErrorCode) -> String {
    let name = format!("{code:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// What travels with a record through librdkafka and comes back in its report.
struct Pending {
    seq: u64,
    msg: Message,
}

enum Event {
    Delivered(Box<Pending>),
    Failed(Box<Pending>, RDKafkaErrorCode, String),
    /// An error librdkafka reported outside a delivery (brokers down, auth, fatal).
    Client(RDKafkaErrorCode, String),
}

/// Hands librdkafka's callbacks (on its poll thread) to the sink's task. The channel is
/// unbounded so the poll thread never blocks; it holds at most `inflight` reports plus
/// the occasional client error, as the task drains it continuously.
struct Context {
    sink: String,
    events: mpsc::UnboundedSender<Event>,
}

impl ClientContext for Context {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        // Connection errors repeat on every retry; the sink logs its state changes.
        debug!(sink = %self.sink, ?level, facility = fac, "librdkafka: {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        let _ = self.events.send(Event::Client(code, reason.to_string()));
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        let event = match result {
            Ok(_) => Event::Delivered(pending),
            Err((e, _)) => {
                let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
                Event::Failed(pending, code, e.to_string())
            }
        };
        let _ = self.events.send(event);
    }
}

type KafkaProducer = ThreadedProducer<Context>;

/// The TLS files a sink's properties name that edgebridge reads itself (see the module
/// docs); `None` when there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsPaths {
    ca: Option<PathBuf>,
    client_auth: Option<(PathBuf, PathBuf)>,
}

impl TlsPaths {
    fn of(properties: &BTreeMap<String, String>) -> Option<TlsPaths> {
        if properties.contains_key("ssl.key.password") {
            return None;
        }
        let path = |key: &str| properties.get(key).map(PathBuf::from);
        let paths = TlsPaths {
            // Not a directory of CAs or "probe".
            ca: path("ssl.ca.location").filter(|p| !p.is_dir() && p.as_os_str() != "probe"),
            client_auth: path("ssl.certificate.location").zip(path("ssl.key.location")),
        };
        (paths.ca.is_some() || paths.client_auth.is_some()).then_some(paths)
    }

    /// Whether librdkafka gets `key` from edgebridge instead of reading it.
    fn replaces(&self, key: &str) -> bool {
        match key {
            "ssl.ca.location" => self.ca.is_some(),
            "ssl.certificate.location" | "ssl.key.location" => self.client_auth.is_some(),
            _ => false,
        }
    }

    /// The files as they are now, or the last set that loaded.
    fn read(&self, ctx: &SinkContext) -> Result<LoadedTls, String> {
        let client_auth = self
            .client_auth
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        ctx.tls_files.read(self.ca.as_deref(), client_auth)
    }
}

fn producer(
    plan: &KafkaPlan,
    sink: &str,
    events: mpsc::UnboundedSender<Event>,
    tls: Option<(&TlsPaths, &LoadedTls)>,
) -> Result<KafkaProducer, KafkaError> {
    let mut config = ClientConfig::new();
    for (k, v) in &plan.properties {
        if tls.is_some_and(|(paths, _)| paths.replaces(k)) {
            continue;
        }
        config.set(k, v);
    }
    if let Some((paths, loaded)) = tls {
        let pem = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        if paths.ca.is_some() {
            config.set("ssl.ca.pem", pem(&loaded.ca));
        }
        if let Some((cert, key)) = &loaded.client_auth {
            config.set("ssl.certificate.pem", pem(cert));
            config.set("ssl.key.pem", pem(key));
        }
    }
    config.set(
        "client.id",
        format!("edgebridge-{}-{sink}", plan.gateway_id),
    );
    config.create_with_context(Context {
        sink: sink.to_string(),
        events,
    })
}

fn vars<'a>(plan: &'a KafkaPlan, msg: &'a Message) -> TemplateVars<'a> {
    TemplateVars {
        gateway_id: &plan.gateway_id,
        topic: &msg.topic,
        client_id: "",
    }
}

/// The Kafka topic of `msg`, or why it has none.
fn kafka_topic<'a>(
    plan: &'a KafkaPlan,
    msg: &Message,
    levels: &[(usize, usize)],
) -> Result<std::borrow::Cow<'a, str>, String> {
    if !plan.topic.source().contains('{') {
        return Ok(plan.topic.source().into());
    }
    let topic = plan.topic.render(&vars(plan, msg), levels);
    if valid_topic_name(&topic) {
        Ok(topic.into())
    } else {
        Err(format!(
            "topic template renders to {topic:?}, not a valid Kafka topic"
        ))
    }
}

fn headers(plan: &KafkaPlan, msg: &Message) -> OwnedHeaders {
    let qos = msg.qos.to_string();
    let mut h = OwnedHeaders::new()
        .insert(Header {
            key: "mqtt_topic",
            value: Some(msg.topic.as_str()),
        })
        .insert(Header {
            key: "qos",
            value: Some(qos.as_str()),
        })
        .insert(Header {
            key: "gateway_id",
            value: Some(plan.gateway_id.as_str()),
        });
    if let (Some(props), Some(prefix)) = (&msg.properties, &plan.property_headers) {
        for (k, v) in &props.user_properties {
            let key = format!("{prefix}{k}");
            h = h.insert(Header {
                key: key.as_str(),
                value: Some(v.as_str()),
            });
        }
        if let Some(ct) = &props.content_type {
            h = h.insert(Header {
                key: "content-type",
                value: Some(ct.as_str()),
            });
        }
    }
    h
}

/// What became of one record handed to [`send`].
enum Produced {
    /// Queued in librdkafka; its report will come.
    Queued,
    /// Could not be queued and is at fault: the caller dead-letters it.
    Refused(Record, String, String),
    /// Could not be queued for another reason: stop producing and retry later.
    Failed(String, String),
}

/// A buffer record rendered as a Kafka record, waiting for the pacer.
struct Prepared<'a> {
    record: Record,
    topic: std::borrow::Cow<'a, str>,
    key: String,
    value: bytes::Bytes,
}

impl Prepared<'_> {
    /// What the pacer counts: key and value (headers are small and fixed).
    fn wire_bytes(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// A record that cannot be sent, with the reason and detail for its dead letter. Boxed:
/// it is rare, and the `Ok` path should not carry its size.
type Refusal = Box<(Record, String, String)>;

/// Renders `record`'s topic, key and value; a record that cannot have a topic comes back
/// refused.
fn prepare<'a>(
    plan: &'a KafkaPlan,
    ctx: &SinkContext,
    record: Record,
) -> Result<Prepared<'a>, Refusal> {
    let msg = &record.msg;
    // Only templates with `{1}`.. read the levels; the defaults (a fixed topic, the MQTT
    // topic as key) do not, and skip the allocation.
    let levels = if plan.topic.uses_captures() || plan.key.uses_captures() {
        level_ranges(&msg.topic)
    } else {
        Vec::new()
    };
    let topic = match kafka_topic(plan, msg, &levels) {
        Ok(t) => t,
        Err(problem) => return Err(Box::new((record, "invalid_topic".into(), problem))),
    };
    let key = plan.key.render(&vars(plan, msg), &levels);
    let value: bytes::Bytes = match plan.format {
        KafkaFormat::Raw => msg.payload.clone(),
        KafkaFormat::Envelope => {
            let id = format!("{}-{}-{}", plan.gateway_id, ctx.name, record.seq);
            let obj = super::envelope::message_object(msg, &id, &plan.gateway_id);
            // Serializing a serde_json::Value cannot fail.
            serde_json::to_vec(&obj).unwrap_or_default().into()
        }
    };
    Ok(Prepared {
        record,
        topic,
        key,
        value,
    })
}

/// Hands one prepared record to librdkafka.
fn send(plan: &KafkaPlan, producer: &KafkaProducer, prepared: Prepared<'_>) -> Produced {
    let Prepared {
        record,
        topic,
        key,
        value,
    } = prepared;
    let headers = headers(plan, &record.msg);
    let pending = Box::new(Pending {
        seq: record.seq,
        msg: record.msg,
    });
    let base = BaseRecord::with_opaque_to(&topic, pending)
        .key(key.as_bytes())
        .payload(value.as_ref())
        .headers(headers);
    match producer.send(base) {
        Ok(()) => Produced::Queued,
        Err((e, returned)) => {
            let code = e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
            let record = Record {
                seq: returned.delivery_opaque.seq,
                msg: returned.delivery_opaque.msg,
            };
            if fault(code) == Fault::Message {
                Produced::Refused(record, reason(code), e.to_string())
            } else {
                Produced::Failed(reason(code), e.to_string())
            }
        }
    }
}

/// Sends the prepared records the pacer lets go now (all of them without a pacer). On a
/// failure the rest are dropped: the rewind reads them again.
async fn send_ready(
    plan: &KafkaPlan,
    ctx: &SinkContext,
    producer: &KafkaProducer,
    ready: &mut VecDeque<Prepared<'_>>,
    mut pacer: Option<&mut Pacer>,
    in_flight: &mut usize,
    failure: &mut Option<(String, String)>,
) {
    while let Some(next) = ready.front() {
        if let Some(p) = pacer.as_deref_mut() {
            if !p.try_acquire(next.wire_bytes(), Instant::now()) {
                return;
            }
        }
        let Some(next) = ready.pop_front() else {
            return;
        };
        match send(plan, producer, next) {
            Produced::Queued => *in_flight += 1,
            Produced::Refused(record, reason, detail) => {
                dead_letter(ctx, record, &reason, &detail, failure).await;
            }
            Produced::Failed(reason, detail) => {
                failure.get_or_insert((reason, detail));
                ready.clear();
                return;
            }
        }
    }
}

/// Half-open watch: with records in flight, no delivery report for this long means the
/// connection to the brokers went silent. librdkafka closes such a connection after
/// `socket.timeout.ms` and, when a new one works (a NAT that forgot the old one), retries
/// on it without telling the application: no error callback, no log, the sink stayed
/// "up" through the stall (tests/network_faults.rs, kafka_nat_forgets_the_connection).
/// So the sink watches its own reports, over half that period (over the whole, the
/// reconnect won the race and the 10 s stall went unreported): past it, the sink is
/// marked down (`reason="ack_timeout"`, as the MQTT sink) and the next report marks it up
/// again. A produce answered within seconds is the norm (`acks=all` included), so 15 s
/// of silence by default is no false alarm. Nothing is resent from here: librdkafka
/// keeps retrying what it holds.
fn stall_after(properties: &std::collections::BTreeMap<String, String>) -> Duration {
    let socket_timeout = properties
        .get("socket.timeout.ms")
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis);
    (socket_timeout / 2).max(Duration::from_secs(1))
}

pub async fn run(plan: KafkaPlan, ctx: SinkContext) {
    let backoff = ctx.backoff(plan.backoff_min, plan.backoff_max);
    let tls_paths = TlsPaths::of(&plan.properties);
    supervise(&ctx, backoff, &mut Producing { plan, tls_paths }).await;
}

/// One session of the Kafka sink: one producer, from its creation (with the TLS files
/// as they are now) until a fatal error, new TLS files or shutdown.
struct Producing {
    plan: KafkaPlan,
    tls_paths: Option<TlsPaths>,
}

impl Session for Producing {
    async fn run(&mut self, ctx: &SinkContext, backoff: &mut Backoff) -> Ended {
        let (plan, tls_paths) = (&self.plan, self.tls_paths.as_ref());
        let tls = match tls_paths.map(|paths| paths.read(ctx)).transpose() {
            Ok(tls) => tls,
            Err(e) => {
                ctx.metrics
                    .mark_down("config", &format!("cannot load the TLS files: {e}"));
                return Ended::Failed;
            }
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        let tls_now = tls_paths.zip(tls.as_ref());
        let producer = match producer(plan, &ctx.name, tx, tls_now) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                ctx.metrics
                    .mark_down("config", &format!("cannot create the Kafka producer: {e}"));
                return Ended::Failed;
            }
        };
        info!(sink = %ctx.name, brokers = %plan.brokers.join(","), topic = %plan.topic.source(), "Kafka producer started");
        ctx.buffer.rewind();
        let end = session(plan, ctx, &producer, &mut events, backoff, tls_now).await;
        if end == Ended::Stopped {
            finish(ctx, producer.clone(), &mut events).await;
        }
        // Dropping a producer waits for librdkafka's threads: off the runtime. It purges
        // what it still holds: those records were not acked, the rewind produces them
        // again.
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
        end
    }
}

/// Produces from the buffer and handles reports until shutdown (`Stopped`), a fatal
/// error (`Failed`: a new producer after the backoff) or new TLS files (`Again`: a new
/// producer with them, now).
async fn session(
    plan: &KafkaPlan,
    ctx: &SinkContext,
    producer: &KafkaProducer,
    events: &mut mpsc::UnboundedReceiver<Event>,
    backoff: &mut Backoff,
    tls: Option<(&TlsPaths, &LoadedTls)>,
) -> Ended {
    let mut r = Reports {
        in_flight: 0,
        failure: None,
        last_report: Instant::now(),
        stalled: false,
        delivering: false,
    };
    // Rendered, waiting for the pacer; cleared on a failure (the rewind reads them again).
    let mut ready: VecDeque<Prepared<'_>> = VecDeque::new();
    let mut pacer = ctx.pacer();
    let stall = stall_after(&plan.properties);
    let mut stall_check = tokio::time::interval((stall / 4).max(Duration::from_millis(100)));
    stall_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tls_check = tokio::time::interval(CREDENTIALS_POLL);
    tls_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Set when new TLS files loaded: nothing more is produced with this producer.
    let mut new_tls = false;
    loop {
        // The records in flight are waited for while the sink delivers; while it is down
        // they may never be confirmed with the files in use, and are produced again.
        if new_tls && (r.in_flight == 0 || !r.delivering || r.stalled || r.failure.is_some()) {
            return Ended::Again;
        }
        if r.in_flight == 0 {
            if let Some((reason, detail)) = r.failure.take() {
                ctx.metrics.mark_down(&reason, &detail);
                if let Some((code, detail)) = producer.client().fatal_error() {
                    warn!(sink = %ctx.name, code = ?code, "fatal producer error; recreating the producer: {detail}");
                    return Ended::Failed;
                }
                if ctx.sleep_or_stop(backoff.next_delay()).await {
                    return Ended::Stopped;
                }
                ctx.buffer.rewind();
            }
        }
        let room = plan
            .inflight
            .saturating_sub(r.in_flight + ready.len())
            .min(ctx.batch);
        // When the pacer lets the next ready record go (`None`: nothing waits).
        let paced_until = match (ready.front(), pacer.as_mut()) {
            (Some(next), Some(p)) => Some(p.ready_at(next.wire_bytes(), Instant::now())),
            (Some(_), None) => Some(Instant::now()),
            (None, _) => None,
        };
        let producing = r.failure.is_none() && !new_tls;
        tokio::select! {
            batch = ctx.buffer.read_batch(room), if room > 0 && producing => {
                r.sending();
                for record in batch {
                    match prepare(plan, ctx, record) {
                        Ok(prepared) => ready.push_back(prepared),
                        Err(refusal) => {
                            let (record, reason, detail) = *refusal;
                            dead_letter(ctx, record, &reason, &detail, &mut r.failure).await;
                        }
                    }
                }
                send_ready(plan, ctx, producer, &mut ready, pacer.as_mut(), &mut r.in_flight, &mut r.failure).await;
            }
            // A branch of its own: reports and shutdown are handled while the pacer waits.
            _ = sleep_until_some(paced_until), if producing && paced_until.is_some() => {
                r.sending();
                send_ready(plan, ctx, producer, &mut ready, pacer.as_mut(), &mut r.in_flight, &mut r.failure).await;
            }
            _ = tls_check.tick(), if tls.is_some() && !new_tls => {
                if let Some((paths, in_use)) = tls {
                    if paths.read(ctx).is_ok_and(|now| &now != in_use) {
                        info!(sink = %ctx.name, in_flight = r.in_flight, "new TLS files: making the producer again with them");
                        new_tls = true;
                    }
                }
            }
            _ = stall_check.tick(), if r.in_flight > 0 && !r.stalled => {
                if r.last_report.elapsed() >= stall {
                    r.stalled = true;
                    let detail = format!(
                        "no delivery report for {} with {} records in flight",
                        humantime::format_duration(stall),
                        r.in_flight
                    );
                    ctx.metrics.mark_down("ack_timeout", &detail);
                }
            }
            Some(event) = events.recv() => on_reports(ctx, backoff, events, event, &mut r).await,
            _ = ctx.shutdown.cancelled() => return Ended::Stopped,
        }
    }
}

/// A producer's records in flight and how their reports went.
struct Reports {
    /// Produced, not yet reported.
    in_flight: usize,
    /// Set by the first failure; producing stops until every report is in.
    failure: Option<(String, String)>,
    /// When a report last came, or the first record went out after none was in flight.
    last_report: Instant,
    /// No report for the stall time with records in flight (the sink is marked down).
    stalled: bool,
    /// Whether any delivery was confirmed by this producer.
    delivering: bool,
}

impl Reports {
    /// Records are about to be produced: with none in flight, the wait for a report
    /// starts now.
    fn sending(&mut self) {
        if self.in_flight == 0 {
            self.last_report = Instant::now();
        }
    }

    /// A delivery report came.
    fn reported(&mut self) {
        self.in_flight -= 1;
        (self.last_report, self.stalled) = (Instant::now(), false);
    }
}

/// Delivery reports: `first`, and every one already waiting, taken in one wake-up, so
/// that the sink's shared state (a lock) is updated once for them, not once per message.
async fn on_reports(
    ctx: &SinkContext,
    backoff: &mut Backoff,
    events: &mut mpsc::UnboundedReceiver<Event>,
    first: Event,
    r: &mut Reports,
) {
    let mut confirmed = false;
    let mut next = Some(first);
    while let Some(event) = next {
        match event {
            Event::Delivered(p) => {
                r.reported();
                ctx.buffer.ack(p.seq);
                ctx.metrics.delivered(p.msg.received_at);
                confirmed = true;
                r.delivering = true;
            }
            Event::Failed(p, code, detail) => {
                r.reported();
                if fault(code) == Fault::Message {
                    let record = Record {
                        seq: p.seq,
                        msg: p.msg,
                    };
                    dead_letter(ctx, record, &reason(code), &detail, &mut r.failure).await;
                } else {
                    r.failure.get_or_insert((reason(code), detail));
                }
            }
            Event::Client(code, detail) => {
                // Deliveries reported before it count first.
                if std::mem::take(&mut confirmed) {
                    confirmed_up(ctx, backoff);
                }
                client_error(ctx, code, &detail, &mut r.failure);
            }
        }
        next = events.try_recv().ok();
    }
    if confirmed {
        confirmed_up(ctx, backoff);
    }
}

/// Deliveries were confirmed: the sink is up and its backoff starts over.
fn confirmed_up(ctx: &SinkContext, backoff: &mut Backoff) {
    ctx.up("deliveries confirmed");
    ctx.acked();
    backoff.reset();
}

/// An error librdkafka reported outside a delivery. Those that mean nothing can be
/// delivered mark the sink down; the rest (one broker's idle connection closed, a
/// retried request) are counted and logged at debug level.
fn client_error(
    ctx: &SinkContext,
    code: RDKafkaErrorCode,
    detail: &str,
    failure: &mut Option<(String, String)>,
) {
    use RDKafkaErrorCode::*;
    match code {
        Fatal => {
            failure.get_or_insert(("fatal".into(), detail.to_string()));
            ctx.metrics.mark_down("fatal", detail);
        }
        AllBrokersDown
        | Resolve
        | Authentication
        | SaslAuthenticationFailed
        | TopicAuthorizationFailed
        | ClusterAuthorizationFailed
        | InvalidConfig => {
            ctx.metrics.mark_down(&reason(code), detail);
        }
        _ => {
            ctx.metrics.error(&reason(code));
            debug!(sink = %ctx.name, code = ?code, "Kafka client error: {detail}");
        }
    }
}

/// Dead-letters `record`; if the file cannot be written the record is kept (a failure,
/// so it is produced again after the rewind and refused again).
async fn dead_letter(
    ctx: &SinkContext,
    record: Record,
    reason: &str,
    detail: &str,
    failure: &mut Option<(String, String)>,
) {
    if ctx
        .dead_letter(std::slice::from_ref(&record), reason, detail)
        .await
        .is_err()
    {
        failure.get_or_insert((
            "dead_letter".into(),
            "cannot write the dead-letter file".into(),
        ));
    }
}

/// Flushes what librdkafka holds within the grace period and acks what it confirms.
async fn finish(
    ctx: &SinkContext,
    producer: Arc<KafkaProducer>,
    events: &mut mpsc::UnboundedReceiver<Event>,
) {
    let grace = ctx.grace;
    let flushed = tokio::task::spawn_blocking(move || producer.flush(grace)).await;
    if !matches!(flushed, Ok(Ok(()))) {
        warn!(sink = %ctx.name, "Kafka flush did not finish within the grace period; unconfirmed messages stay buffered");
    }
    while let Ok(event) = events.try_recv() {
        if let Event::Delivered(p) = event {
            ctx.buffer.ack(p.seq);
            ctx.metrics.delivered(p.msg.received_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_half_the_socket_timeout() {
        let props = |v: &str| [("socket.timeout.ms".to_string(), v.to_string())].into();
        assert_eq!(stall_after(&props("30000")), Duration::from_secs(15));
        assert_eq!(stall_after(&props("10000")), Duration::from_secs(5));
        assert_eq!(
            stall_after(&props("500")),
            Duration::from_secs(1),
            "at least 1 s"
        );
        assert_eq!(stall_after(&Default::default()), Duration::from_secs(15));
    }

    #[test]
    fn error_table() {
        use RDKafkaErrorCode::*;
        for code in [
            MessageSizeTooLarge,
            InvalidMessageSize,
            MessageBatchTooLarge,
            InvalidMessage,
            InvalidRecord,
            InvalidTimestamp,
            InvalidTopic,
            BadMessage,
        ] {
            assert_eq!(fault(code), Fault::Message, "{code:?}");
        }
        for code in [
            NotLeaderForPartition,
            MessageTimedOut,
            AllBrokersDown,
            BrokerTransportFailure,
            QueueFull,
            TopicAuthorizationFailed,
            ClusterAuthorizationFailed,
            UnknownTopicOrPartition,
            RequestTimedOut,
            NotEnoughReplicas,
            OutOfOrderSequenceNumber,
            Fatal,
        ] {
            assert_eq!(fault(code), Fault::Cluster, "{code:?}");
        }
    }

    #[test]
    fn tls_sasl_scram_and_compression_are_built_in() {
        // librdkafka refuses, at producer creation, a mechanism or codec it was built
        // without ("OpenSSL not available at build time"...). Nothing connects here.
        for (mechanism, codec) in [
            ("PLAIN", "zstd"),
            ("SCRAM-SHA-256", "lz4"),
            ("SCRAM-SHA-512", "gzip"),
        ] {
            let producer: Result<rdkafka::producer::BaseProducer, _> = ClientConfig::new()
                .set("bootstrap.servers", "127.0.0.1:1")
                .set("security.protocol", "SASL_SSL")
                .set("sasl.mechanisms", mechanism)
                .set("sasl.username", "u")
                .set("sasl.password", "p")
                .set("compression.type", codec)
                .create();
            assert!(
                producer.is_ok(),
                "{mechanism} + {codec}: {:?}",
                producer.err()
            );
        }
    }

    #[test]
    fn reasons_are_snake_case() {
        assert_eq!(
            reason(RDKafkaErrorCode::MessageTimedOut),
            "message_timed_out"
        );
        assert_eq!(reason(RDKafkaErrorCode::AllBrokersDown), "all_brokers_down");
        assert_eq!(
            reason(RDKafkaErrorCode::MessageSizeTooLarge),
            "message_size_too_large"
        );
    }

    #[test]
    fn topics_render_and_are_checked() {
        let plan = |topic: &str| {
            let section: KafkaSinkSection =
                toml::from_str(&format!("brokers = [\"k:9092\"]\ntopic = \"{topic}\"")).unwrap();
            config::validate("s", &section, "gw", &mut |p, m| panic!("{p}: {m}")).unwrap()
        };
        let msg = |topic: &str| Message {
            topic: topic.into(),
            payload: bytes::Bytes::new(),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 0,
        };
        let p = plan("telemetry.{2}");
        let m = msg("plant/press-1/temp");
        assert_eq!(
            kafka_topic(&p, &m, &level_ranges(&m.topic)).unwrap(),
            "telemetry.press-1"
        );
        let m = msg("plant/bad name/temp");
        assert!(kafka_topic(&p, &m, &level_ranges(&m.topic)).is_err());
        let p = plan("static-topic");
        assert_eq!(
            kafka_topic(&p, &m, &level_ranges(&m.topic)).unwrap(),
            "static-topic"
        );
    }
}
