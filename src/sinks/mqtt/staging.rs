//! Getting buffered records ready to publish: the upstream topic and properties (message
//! expiry as the time left), packing, what cannot ever be delivered (dead letters), and
//! publishing what is ready within the pacer and the window.

use super::*;

/// A record (or a closed pack) read from the buffer, checked deliverable, waiting for the
/// pacer and for room in the window before it is handed to rumqttc. Not in the window: a
/// paced wait is not a missing ack.
pub(super) struct Ready {
    pub(super) entry: InFlight,
    pub(super) topic: String,
    pub(super) payload: bytes::Bytes,
    pub(super) retain: bool,
    /// MQTT 5 properties of an unpacked message (a pack carries none: `sinks::pack`).
    pub(super) properties: Option<Box<Properties>>,
}

impl Ready {
    /// What the PUBLISH puts on the wire, as paced: topic, payload and framing.
    pub(super) fn wire_bytes(&self) -> usize {
        self.topic.len() + self.payload.len() + PUBLISH_OVERHEAD
    }
}

/// What is left of a message's expiry interval (seconds) after `waited_ms` in the gateway,
/// rounded up so that a message with time left never goes out with 0 (which MQTT reads as
/// "no expiry"); `Err(())` once it has expired. `None`: the message does not expire.
pub(super) fn remaining_expiry(interval: Option<u32>, waited_ms: u64) -> Result<Option<u32>, ()> {
    let Some(interval) = interval else {
        return Ok(None);
    };
    let left_ms = u64::from(interval) * 1000;
    if waited_ms >= left_ms {
        return Err(());
    }
    Ok(Some((left_ms - waited_ms).div_ceil(1000) as u32))
}

/// Bytes the MQTT 5 properties of `props` add to a PUBLISH (ids, lengths, values).
pub(super) fn properties_wire_len(props: Option<&Properties>) -> usize {
    let Some(p) = props else { return 0 };
    let strings = p
        .user_properties
        .iter()
        .map(|(k, v)| 5 + k.len() + v.len())
        .sum::<usize>();
    strings
        + p.content_type.as_ref().map_or(0, |c| 3 + c.len())
        + p.response_topic.as_ref().map_or(0, |t| 3 + t.len())
        + p.correlation_data.as_ref().map_or(0, |d| 3 + d.len())
        + p.payload_format_indicator.map_or(0, |_| 2)
        + p.message_expiry_interval.map_or(0, |_| 5)
        + 4
}

/// How much closed packs may wait for the pacer while the reading goes on, in full packs'
/// bytes (packs that lingered out are smaller: more of them wait). The next packs fill
/// while these go out, so the pacer does not wait for a pack to fill or linger out (it
/// does not make up for a pause: `sinks::pacing`), and with `connections > 1` a connection
/// with a pack waiting keeps taking records from the dispatcher that feeds them all.
/// Four full packs are ~0.8 s at AWS's 512 KiB/s; memory stays bounded by the open packs
/// (`Packer`'s `max_open`) and these. (One connection at AWS's limits from a backlog,
/// `cargo bench --bench sinks -- aws-backlog` with a soak running beside it: 91.7% of the
/// byte limit when a waiting pack stopped the reading, 93.6% with four.)
pub(super) const READY_PACKS: usize = 4;

/// Ends the session after a failed dead-letter write (see [`DeadLetterFailed`]).
pub(super) fn dead_letter_failed(ctx: &SinkContext, upstream: &str) -> Ended {
    ctx.metrics.mark_down(
        "dead_letter",
        &format!("{upstream}: cannot write the dead-letter file; the undeliverable message stays buffered and is retried"),
    );
    Ended::Failed
}

/// A record up to `seq` was resolved (acked or dead-lettered): once past the one that
/// started a search for a refused message's culprit, publishes go out in full windows
/// again.
pub(super) fn resolved(feed: &mut Feed<'_>, seq: u64) {
    if feed.isolate.is_some_and(|upto| seq >= upto) {
        feed.isolate = None;
    }
}

/// Checks a batch read from the buffer and queues it in `ready`. Messages that can never
/// be delivered (too large for the upstream, an invalid topic) are dead-lettered, counted
/// and acked instead.
pub(super) async fn stage(
    plan: &MqttPlan,
    ctx: &SinkContext,
    max_packet: usize,
    batch: Vec<crate::buffer::Record>,
    ready: &mut VecDeque<Ready>,
) -> Result<(), DeadLetterFailed> {
    for record in batch {
        if expired(ctx, &record) {
            continue;
        }
        let topic = upstream_topic(plan, &record.msg.topic);
        let properties = match plan.protocol {
            MqttProtocol::V5 => record.msg.properties.clone(),
            // Dropped on 3.1.1 (documented; `check` warns).
            MqttProtocol::V311 => None,
        };
        let len = record.msg.payload.len() + properties_wire_len(properties.as_deref());
        if let Some((reason, detail)) = undeliverable(plan, max_packet, &topic, len) {
            dead_letter_one(ctx, record, reason, &detail).await?;
            continue;
        }
        ready.push_back(Ready {
            topic,
            payload: record.msg.payload.clone(),
            retain: record.msg.retain && plan.forward_retain,
            properties,
            entry: InFlight::One(record),
        });
    }
    Ok(())
}

/// Queues closed packs in `ready`. A pack of one message that is too large for the
/// upstream is dead-lettered instead (only a pack of one can be: see `Packer::push`).
pub(super) async fn stage_packs(
    plan: &MqttPlan,
    ctx: &SinkContext,
    max_packet: usize,
    packed: &mut VecDeque<Pack>,
    ready: &mut VecDeque<Ready>,
) -> Result<(), DeadLetterFailed> {
    while let Some(pack) = packed.pop_front() {
        let topic = upstream_topic(plan, &pack.key);
        if let Some((reason, detail)) = undeliverable(plan, max_packet, &topic, pack.body.len()) {
            dead_letter_all(ctx, &pack.records, reason, &detail).await?;
            continue;
        }
        // A pack is never published retained: its parts say whether they were. It
        // carries no MQTT properties either: its parts may carry theirs (`sinks::pack`).
        ready.push_back(Ready {
            entry: InFlight::Pack(pack.records),
            topic,
            payload: bytes::Bytes::from(pack.body),
            retain: false,
            properties: None,
        });
    }
    Ok(())
}

/// A message whose MQTT 5 message expiry lapsed while it waited in the buffer is not
/// sent: it is acked and counted (`edgebridge_buffer_dropped_total{reason="expired"}`).
/// Returns whether `record` was.
pub(super) fn expired(ctx: &SinkContext, record: &Record) -> bool {
    let interval = record
        .msg
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval);
    let waited = now_millis().saturating_sub(record.msg.received_at);
    if remaining_expiry(interval, waited).is_ok() {
        return false;
    }
    ctx.metrics.expired();
    ctx.buffer.ack(record.seq);
    true
}

/// Hands rumqttc the ready publishes the pacer lets go now (all of them without a pacer)
/// while the window has room. The window becoming non-empty starts the ack timeout
/// (`last_progress`). The message expiry interval is computed here, as the publish goes
/// out: a message that expired while the pacer held it back is dropped (counted). An
/// `Err` means the connection is gone.
#[allow(clippy::too_many_arguments)]
pub(super) async fn publish_ready(
    ctx: &SinkContext,
    client: &Client,
    qos: u8,
    ready: &mut VecDeque<Ready>,
    window: &mut Window,
    window_size: usize,
    mut pacer: Option<&mut crate::sinks::Pacer>,
    last_progress: &mut Instant,
) -> Result<(), client::Closed> {
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
        let properties = match (&next.properties, &next.entry) {
            (Some(props), InFlight::One(record)) => {
                let waited = now_millis().saturating_sub(record.msg.received_at);
                match remaining_expiry(props.message_expiry_interval, waited) {
                    Ok(expiry) => client::publish_properties(Some(props), expiry),
                    Err(()) => {
                        ctx.metrics.expired();
                        ctx.buffer.ack(record.seq);
                        continue;
                    }
                }
            }
            _ => None,
        };
        if window.len() == 0 {
            *last_progress = Instant::now();
        }
        client
            .publish(next.topic, qos, next.retain, next.payload, properties)
            .await?;
        window.queued.push_back(next.entry);
    }
    Ok(())
}

/// The upstream topic of a message (or pack) whose topic in the buffer is `topic`.
pub(super) fn upstream_topic(plan: &MqttPlan, topic: &str) -> String {
    match &plan.azure_events {
        Some(events) => events.topic_for(topic),
        None => topic.to_string(),
    }
}

/// Adds a batch to the open packs; closed ones go to `packed`. A record whose topic can
/// never be published is dead-lettered here, before it joins a pack.
pub(super) async fn pack_batch(
    plan: &MqttPlan,
    ctx: &SinkContext,
    max_packet: usize,
    packer: &mut Packer,
    batch: Vec<crate::buffer::Record>,
    packed: &mut VecDeque<Pack>,
) -> Result<(), DeadLetterFailed> {
    let now = Instant::now();
    for record in batch {
        if expired(ctx, &record) {
            continue;
        }
        let topic = upstream_topic(plan, &record.msg.topic);
        if let Some((reason, detail)) = undeliverable(plan, max_packet, &topic, 0) {
            dead_letter_one(ctx, record, reason, &detail).await?;
            continue;
        }
        // What the packet limit leaves for the payload next to this topic.
        let cap = max_packet.saturating_sub(topic.len() + PUBLISH_OVERHEAD);
        packer.push(record, cap, now, packed);
    }
    Ok(())
}

/// The dead-letter file could not be written: nothing was acked, the session ends and the
/// records are read again after the rewind, so they stay in the buffer until the file can
/// be written (the contract HTTP and Kafka follow too: a record leaves the buffer only
/// delivered or dead-lettered).
#[derive(Debug)]
pub(super) struct DeadLetterFailed;

/// Dead-letters a record that can never be delivered (see [`SinkContext::dead_letter`]).
pub(super) async fn dead_letter_one(
    ctx: &SinkContext,
    record: crate::buffer::Record,
    reason: &'static str,
    detail: &str,
) -> Result<(), DeadLetterFailed> {
    dead_letter_all(ctx, std::slice::from_ref(&record), reason, detail).await
}

/// [`dead_letter_one`] for several records (a pack, or a pack the upstream refused).
pub(super) async fn dead_letter_all(
    ctx: &SinkContext,
    records: &[Record],
    reason: &str,
    detail: &str,
) -> Result<(), DeadLetterFailed> {
    ctx.dead_letter(records, reason, detail)
        .await
        .map_err(|_| DeadLetterFailed)
}

/// Why a message with `topic` (as it goes upstream) and a payload of `payload_len` bytes
/// (with its MQTT 5 properties) can never be delivered to an upstream that takes packets
/// up to `max_packet` bytes, if it cannot: the `reason` label and a detail for the log
/// and the dead-letter file.
pub(super) fn undeliverable(
    plan: &MqttPlan,
    max_packet: usize,
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
    if topic.len() + payload_len + PUBLISH_OVERHEAD > max_packet {
        return Some((
            "too_large",
            format!("larger than the upstream's packet limit of {max_packet} bytes"),
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
