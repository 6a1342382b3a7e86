//! Packing: several device messages become one upstream message (`pack = { ... }` on an
//! MQTT or HTTP sink), so that a cloud that counts messages (AWS IoT Core: 100 PUBLISH/s
//! per connection) carries many readings per message.
//!
//! Input: buffer records, in buffer order, from the sink worker ([`Packer::push`]), and
//! the clock ([`Packer::close_due`]). Output: closed [`Pack`]s, each an upstream topic
//! (the grouping key), the encoded upstream payload and the records it carries; the
//! worker sends a pack as one message and acks all of its records once the upstream
//! confirmed it (a pack is retried or resent whole). Pure: no I/O, no timers of its own.
//!
//! Grouping: by the record's topic as the sink holds it (after the rule's rewrite). One
//! pack is open per topic, so packs of a topic close, and are sent, in buffer order.
//!
//! A pack closes when
//! - the next message of its topic would take it over `max_bytes` (the encoded payload,
//!   or less where the upstream's packet limit leaves less room next to the topic);
//! - `linger` has passed since its first message was read from the buffer. The worker
//!   reads on while the buffer has more to give, so during a drain packs fill up to
//!   `max_bytes` long before: in effect linger waits for more only while the buffer has
//!   nothing more to give. It stays a hard bound: an unsent message keeps its segment on
//!   disk, and after a crash is resent with everything behind it;
//! - a new topic needs a pack while `max_open` are open: the oldest closes (this bounds
//!   the memory held in open packs to `max_open × max_bytes`).
//!
//! A message whose part alone exceeds `max_bytes` goes as a pack of one: every upstream
//! message of a packed sink has the same format, so consumers need no guessing. If that
//! is over the upstream's own limit the sink dead-letters it as it would unpacked.
//!
//! Format (`json_array`: `[part,part,...]`; `ndjson`: one part per line, each ending in
//! `\n`). A part is a JSON object:
//! `{["topic"],["received_at"],["qos"],["retain"],["properties"],"payload"[,"encoding"]}`, the optional
//! fields as listed in `fields`. The payload follows the envelope's rules
//! (`sinks::envelope`): a JSON payload is embedded as JSON, verbatim (whitespace around
//! the value dropped; in `ndjson` its line breaks, which JSON only allows as whitespace,
//! are removed), and has no `encoding`; otherwise it is a string with `"encoding":"text"`
//! (valid UTF-8) or `"encoding":"base64"`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::buffer::Record;
use crate::message::Message;
use crate::problems::Problems;
use crate::sinks::envelope::non_json_payload;
use crate::units::{ByteSize, HumanDuration};

/// `max_bytes` when not set (or the upstream's limit, if smaller): under AWS IoT Core's
/// 128 KiB payload limit with room to spare.
const DEFAULT_MAX_BYTES: usize = 120 * 1024;
/// Smallest `max_bytes`: a pack must hold a few small readings.
const MIN_MAX_BYTES: usize = 1024;
/// MQTT's own limit on a packet (256 MiB); nothing larger can be a message anywhere here.
const MAX_MAX_BYTES: usize = 256 * 1024 * 1024;
const DEFAULT_LINGER: Duration = Duration::from_millis(200);
const MAX_LINGER: Duration = Duration::from_secs(60);

/// `pack = { ... }` in a sink's section.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PackSection {
    /// Largest encoded upstream payload; default 120KiB (or the upstream's limit).
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// How long a pack waits for more messages after its first; default 200ms.
    #[serde(default)]
    pub linger: Option<HumanDuration>,
    #[serde(default)]
    pub format: PackFormat,
    #[serde(default)]
    pub by: PackBy,
    /// What each part carries besides its payload; default nothing.
    #[serde(default)]
    pub fields: Vec<PartField>,
}

/// How parts are laid out in the upstream payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackFormat {
    /// `[part,part,...]`
    #[default]
    JsonArray,
    /// One part per line.
    Ndjson,
}

impl PackFormat {
    pub fn name(self) -> &'static str {
        match self {
            PackFormat::JsonArray => "json_array",
            PackFormat::Ndjson => "ndjson",
        }
    }

    /// The `Content-Type` of an HTTP body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            PackFormat::JsonArray => "application/json",
            PackFormat::Ndjson => "application/x-ndjson",
        }
    }

    /// Bytes a pack of this format has besides its parts and separators (`[`, `]`).
    fn framing(self) -> usize {
        match self {
            PackFormat::JsonArray => 2,
            PackFormat::Ndjson => 0,
        }
    }
}

/// What messages are grouped by; the upstream topic is the only key so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackBy {
    #[default]
    Topic,
}

/// An optional field of a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartField {
    /// The message's topic as the sink holds it (after the rule's rewrite).
    Topic,
    /// When the gateway received it, milliseconds since the Unix epoch.
    ReceivedAt,
    Qos,
    Retain,
    /// The MQTT 5 properties the device sent, as the envelope's `properties` object
    /// (`sinks::envelope`); absent on a part whose message has none. The pack itself
    /// (one upstream publish) carries no MQTT properties.
    Properties,
}

/// Which optional fields the parts carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartFields {
    pub topic: bool,
    pub received_at: bool,
    pub qos: bool,
    pub retain: bool,
    pub properties: bool,
}

/// The validated `pack` of a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackPlan {
    pub max_bytes: usize,
    pub linger: Duration,
    pub format: PackFormat,
    pub fields: PartFields,
}

/// The largest payload the sink's upstream takes, and where that limit comes from (for
/// the error message).
pub struct PayloadLimit {
    pub bytes: usize,
    pub why: String,
}

/// Checks `s` (at key path `path`, e.g. `sinks.cloud.pack`) against the upstream's
/// payload limit, if it has one; each problem goes to `err`.
pub fn validate(
    path: &str,
    s: &PackSection,
    limit: Option<&PayloadLimit>,
    err: &mut impl FnMut(String, String),
) -> Option<PackPlan> {
    let mut problems = Problems::new(err);
    let ceiling = limit.map_or(MAX_MAX_BYTES, |l| l.bytes.min(MAX_MAX_BYTES));
    let max_bytes = match s.max_bytes {
        Some(b) => {
            let b = usize::try_from(b.0).unwrap_or(usize::MAX);
            if b < MIN_MAX_BYTES {
                problems.add(format!("{path}.max_bytes"), "must be at least 1KiB".into());
            } else if b > ceiling {
                let why =
                    limit.map_or_else(|| "the largest MQTT packet".to_string(), |l| l.why.clone());
                problems.add(
                    format!("{path}.max_bytes"),
                    format!("{b} bytes is over what the upstream takes in one message ({ceiling} bytes: {why})"),
                );
            }
            b
        }
        None => DEFAULT_MAX_BYTES.min(ceiling),
    };
    let linger = s.linger.map_or(DEFAULT_LINGER, |l| l.0);
    if linger > MAX_LINGER {
        problems.add(format!("{path}.linger"), "must be at most 60s".into());
    }
    let mut fields = PartFields::default();
    for (i, field) in s.fields.iter().enumerate() {
        let slot = match field {
            PartField::Topic => &mut fields.topic,
            PartField::ReceivedAt => &mut fields.received_at,
            PartField::Qos => &mut fields.qos,
            PartField::Retain => &mut fields.retain,
            PartField::Properties => &mut fields.properties,
        };
        if std::mem::replace(slot, true) {
            problems.add(format!("{path}.fields[{i}]"), "listed twice".into());
        }
    }
    problems.none().then_some(PackPlan {
        max_bytes,
        linger,
        format: s.format,
        fields,
    })
}

impl PackPlan {
    /// For `edgebridge check`.
    pub fn describe(&self) -> String {
        let mut fields = Vec::new();
        for (set, name) in [
            (self.fields.topic, "topic"),
            (self.fields.received_at, "received_at"),
            (self.fields.qos, "qos"),
            (self.fields.retain, "retain"),
            (self.fields.properties, "properties"),
        ] {
            if set {
                fields.push(name);
            }
        }
        format!(
            "pack={} by topic max_bytes={} linger={} fields=[{}]",
            self.format.name(),
            self.max_bytes,
            humantime::format_duration(self.linger),
            fields.join(",")
        )
    }

    /// Appends the part of `msg` to `out`: its JSON object, and in `ndjson` the line end.
    pub fn encode_part(&self, msg: &Message, out: &mut Vec<u8>) {
        use std::io::Write;
        let f = self.fields;
        out.push(b'{');
        if f.topic {
            out.extend_from_slice(b"\"topic\":");
            write_json(out, &msg.topic);
            out.push(b',');
        }
        // Writing into a Vec cannot fail.
        if f.received_at {
            let _ = write!(out, "\"received_at\":{},", msg.received_at);
        }
        if f.qos {
            let _ = write!(out, "\"qos\":{},", msg.qos);
        }
        if f.retain {
            let _ = write!(out, "\"retain\":{},", msg.retain);
        }
        if let (true, Some(props)) = (f.properties, &msg.properties) {
            out.extend_from_slice(b"\"properties\":");
            // Serializing a serde_json::Value into a Vec cannot fail.
            let _ =
                serde_json::to_writer(&mut *out, &crate::sinks::envelope::properties_object(props));
            out.push(b',');
        }
        out.extend_from_slice(b"\"payload\":");
        match json_text(&msg.payload) {
            Some(json) if self.format == PackFormat::Ndjson => {
                // Inside valid JSON a raw line break can only be whitespace: dropping it
                // keeps the value exactly, and the part on its line.
                out.extend(json.iter().filter(|b| !matches!(b, b'\n' | b'\r')));
            }
            Some(json) => out.extend_from_slice(json),
            None => {
                let (text, encoding) = non_json_payload(&msg.payload);
                write_json(out, &text);
                out.extend_from_slice(b",\"encoding\":");
                write_json(out, encoding);
            }
        }
        out.push(b'}');
        if self.format == PackFormat::Ndjson {
            out.push(b'\n');
        }
    }

    /// A pack holding `record` alone (e.g. to find the one message of a refused pack).
    pub fn single(&self, record: Record) -> Pack {
        let mut body = Vec::new();
        if self.format == PackFormat::JsonArray {
            body.push(b'[');
        }
        self.encode_part(&record.msg, &mut body);
        let open = OpenPack {
            body,
            records: vec![record],
            cap: usize::MAX,
            deadline: Instant::now(),
            opened: 0,
        };
        let key = open.records[0].msg.topic.clone();
        open.finish(self.format, key)
    }
}

/// The payload's JSON text without the whitespace around it, if the payload is JSON.
fn json_text(payload: &[u8]) -> Option<&[u8]> {
    // The parser checks the syntax (and that nothing follows the value); strings must
    // also be valid UTF-8 to be embedded as they are.
    std::str::from_utf8(payload).ok()?;
    serde_json::from_slice::<serde::de::IgnoredAny>(payload).ok()?;
    Some(payload.trim_ascii())
}

fn write_json(out: &mut Vec<u8>, value: &str) {
    // Serializing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(out, value);
}

/// A closed pack: one upstream message.
#[derive(Debug)]
pub struct Pack {
    /// The upstream topic its messages share.
    pub key: String,
    /// The encoded upstream payload.
    pub body: Vec<u8>,
    /// Its messages, in buffer order.
    pub records: Vec<Record>,
}

/// A pack still taking messages.
struct OpenPack {
    /// Encoded so far, without the closing `]`.
    body: Vec<u8>,
    records: Vec<Record>,
    /// Largest payload for this pack (`max_bytes`, or less for a long topic).
    cap: usize,
    /// Linger ends.
    deadline: Instant,
    /// Opening order, to close the oldest first.
    opened: u64,
}

impl OpenPack {
    /// The payload's size once closed.
    fn closed_len(&self, format: PackFormat) -> usize {
        self.body.len() + usize::from(format == PackFormat::JsonArray)
    }

    fn finish(mut self, format: PackFormat, key: String) -> Pack {
        if format == PackFormat::JsonArray {
            self.body.push(b']');
        }
        Pack {
            key,
            body: self.body,
            records: self.records,
        }
    }
}

/// The open packs of one sink worker; dropped (unsent packs and all) with the
/// connection, as the buffer's rewind reads their records again.
pub struct Packer {
    plan: PackPlan,
    max_open: usize,
    open: HashMap<String, OpenPack>,
    opened: u64,
    /// Scratch space for the part being added.
    part: Vec<u8>,
}

impl Packer {
    /// At most `max_open` packs open at once (at least one).
    pub fn new(plan: PackPlan, max_open: usize) -> Self {
        Self {
            plan,
            max_open: max_open.max(1),
            open: HashMap::new(),
            opened: 0,
            part: Vec::new(),
        }
    }

    pub fn plan(&self) -> &PackPlan {
        &self.plan
    }

    /// Whether no pack is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Messages held in open packs.
    pub fn held(&self) -> usize {
        self.open.values().map(|p| p.records.len()).sum()
    }

    /// Adds `record` to the open pack of its topic; packs it closes go to `out`. `cap`
    /// is the largest payload the upstream takes next to this topic (`usize::MAX` for no
    /// limit besides `max_bytes`); `now` starts the linger of a new pack.
    pub fn push(&mut self, record: Record, cap: usize, now: Instant, out: &mut VecDeque<Pack>) {
        let format = self.plan.format;
        self.part.clear();
        self.plan.encode_part(&record.msg, &mut self.part);
        let separator = usize::from(format == PackFormat::JsonArray);
        match self.open.get_mut(&record.msg.topic) {
            Some(open) if open.closed_len(format) + separator + self.part.len() <= open.cap => {
                if format == PackFormat::JsonArray {
                    open.body.push(b',');
                }
                open.body.extend_from_slice(&self.part);
                let full = open.closed_len(format) >= open.cap;
                open.records.push(record);
                if full {
                    let key = open.records[0].msg.topic.clone();
                    self.close(&key, out);
                }
                return;
            }
            Some(_) => {
                // Full: it goes now, and this message starts the next pack.
                let key = record.msg.topic.clone();
                self.close(&key, out);
            }
            None => {}
        }
        if self.open.len() >= self.max_open {
            if let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, p)| p.opened)
                .map(|(k, _)| k.clone())
            {
                self.close(&oldest, out);
            }
        }
        let mut body = Vec::with_capacity(self.part.len() + format.framing());
        if format == PackFormat::JsonArray {
            body.push(b'[');
        }
        body.extend_from_slice(&self.part);
        self.opened += 1;
        let open = OpenPack {
            body,
            records: vec![record],
            cap: cap.min(self.plan.max_bytes),
            deadline: now + self.plan.linger,
            opened: self.opened,
        };
        let key = open.records[0].msg.topic.clone();
        if open.closed_len(format) >= open.cap {
            // Alone at or over the limit: nothing more fits.
            out.push_back(open.finish(format, key));
        } else {
            self.open.insert(key, open);
        }
    }

    /// Closes every pack whose linger has ended by `now`, oldest first.
    pub fn close_due(&mut self, now: Instant, out: &mut VecDeque<Pack>) {
        let mut due: Vec<(u64, String)> = self
            .open
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, p)| (p.opened, k.clone()))
            .collect();
        due.sort_unstable();
        for (_, key) in due {
            self.close(&key, out);
        }
    }

    /// When the next linger ends, if a pack is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.values().map(|p| p.deadline).min()
    }

    fn close(&mut self, key: &str, out: &mut VecDeque<Pack>) {
        if let Some((key, open)) = self.open.remove_entry(key) {
            out.push_back(open.finish(self.plan.format, key));
        }
    }
}

/// Sleeps until `deadline` (a [`Packer::next_deadline`]); never returns for `None`.
pub async fn linger_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use bytes::Bytes;
    use serde_json::Value;

    fn record(seq: u64, topic: &str, payload: &[u8]) -> Record {
        Record {
            seq,
            msg: Message {
                topic: topic.into(),
                payload: Bytes::copy_from_slice(payload),
                qos: 1,
                retain: seq % 2 == 0,
                properties: None,
                received_at: 1_700_000_000_000 + seq,
            },
        }
    }

    fn plan(format: PackFormat, max_bytes: usize) -> PackPlan {
        PackPlan {
            max_bytes,
            linger: Duration::from_millis(200),
            format,
            fields: PartFields::default(),
        }
    }

    /// What a consumer does: the parts of one upstream payload.
    fn parts(body: &[u8], format: PackFormat) -> Vec<Value> {
        match format {
            PackFormat::JsonArray => match serde_json::from_slice(body).expect("a JSON array") {
                Value::Array(items) => items,
                other => panic!("not an array: {other}"),
            },
            PackFormat::Ndjson => {
                assert!(body.ends_with(b"\n"), "every line ends");
                body.split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice(l).expect("a JSON line"))
                    .collect()
            }
        }
    }

    /// A part back to the device's payload bytes (JSON re-serialized compactly).
    fn payload_of(part: &Value) -> Vec<u8> {
        match part["encoding"].as_str() {
            None => serde_json::to_vec(&part["payload"]).unwrap(),
            Some("text") => part["payload"].as_str().unwrap().as_bytes().to_vec(),
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(part["payload"].as_str().unwrap())
                .unwrap(),
            Some(other) => panic!("unknown encoding {other}"),
        }
    }

    fn pack_all(packer: &mut Packer, records: Vec<Record>) -> Vec<Pack> {
        let now = Instant::now();
        let mut out = VecDeque::new();
        for r in records {
            packer.push(r, usize::MAX, now, &mut out);
        }
        packer.close_due(now + Duration::from_secs(3600), &mut out);
        assert!(packer.is_empty());
        out.into()
    }

    #[test]
    fn parts_keep_json_verbatim_and_mark_text_and_binary() {
        for format in [PackFormat::JsonArray, PackFormat::Ndjson] {
            let mut p = plan(format, 64 * 1024);
            p.fields = PartFields {
                topic: true,
                received_at: true,
                qos: true,
                retain: true,
                properties: false,
            };
            let mut packer = Packer::new(p, 8);
            let packs = pack_all(
                &mut packer,
                vec![
                    record(1, "dt/a", br#"{"z":1,"a":[1.50,true]}"#),
                    record(2, "dt/a", b"plain text"),
                    record(3, "dt/a", &[0, 159, 146, 150]),
                    record(4, "dt/a", b""),
                ],
            );
            assert_eq!(packs.len(), 1);
            let body = String::from_utf8(packs[0].body.clone()).unwrap();
            // Key order and number spelling of the device's JSON survive.
            assert!(
                body.contains(r#""payload":{"z":1,"a":[1.50,true]}"#),
                "{body}"
            );
            let parts = parts(&packs[0].body, format);
            assert_eq!(parts.len(), 4);
            assert!(parts[0].get("encoding").is_none());
            assert_eq!(parts[0]["payload"]["a"][1], true);
            assert_eq!(parts[1]["encoding"], "text");
            assert_eq!(payload_of(&parts[1]), b"plain text");
            assert_eq!(parts[2]["encoding"], "base64");
            assert_eq!(payload_of(&parts[2]), [0, 159, 146, 150]);
            assert_eq!(payload_of(&parts[3]), b"");
            assert_eq!(parts[1]["topic"], "dt/a");
            assert_eq!(parts[1]["received_at"], 1_700_000_000_002u64);
            assert_eq!(parts[1]["qos"], 1);
            assert_eq!(parts[1]["retain"], true);
            assert_eq!(parts[2]["retain"], false);
        }
    }

    #[test]
    fn parts_carry_only_the_fields_asked_for() {
        let mut packer = Packer::new(plan(PackFormat::JsonArray, 4096), 8);
        let packs = pack_all(&mut packer, vec![record(1, "dt/a", b"7")]);
        assert_eq!(packs[0].body, br#"[{"payload":7}]"#);
    }

    #[test]
    fn parts_carry_the_properties_when_asked_for() {
        let mut p = plan(PackFormat::JsonArray, 4096);
        p.fields.properties = true;
        let mut packer = Packer::new(p, 8);
        let mut with = record(1, "dt/a", b"7");
        with.msg.properties = Some(Box::new(crate::message::Properties {
            user_properties: vec![("line".into(), "4".into())],
            content_type: Some("application/json".into()),
            ..Default::default()
        }));
        let packs = pack_all(&mut packer, vec![with, record(2, "dt/a", b"8")]);
        assert_eq!(
            String::from_utf8_lossy(&packs[0].body),
            r#"[{"properties":{"content_type":"application/json","user":{"line":"4"}},"payload":7},{"payload":8}]"#
        );
    }

    #[test]
    fn ndjson_flattens_multi_line_json_onto_its_line() {
        let mut packer = Packer::new(plan(PackFormat::Ndjson, 4096), 8);
        let pretty = b"{\r\n  \"a\": \"x y\",\n  \"b\": [1,\n 2]\n}\n";
        let packs = pack_all(
            &mut packer,
            vec![record(1, "t", pretty), record(2, "t", b"3")],
        );
        let body = String::from_utf8(packs[0].body.clone()).unwrap();
        assert_eq!(body.lines().count(), 2, "{body}");
        let parts = parts(&packs[0].body, PackFormat::Ndjson);
        let expected: Value = serde_json::from_slice(pretty).unwrap();
        assert_eq!(parts[0]["payload"], expected);
        assert!(
            body.starts_with(r#"{"payload":{  "a": "x y",  "b": [1, 2]}}"#),
            "{body}"
        );
    }

    #[test]
    fn packs_group_by_topic_keep_order_and_respect_max_bytes() {
        for format in [PackFormat::JsonArray, PackFormat::Ndjson] {
            let max = 1024;
            let mut packer = Packer::new(plan(format, max), 8);
            let topics = ["dt/a", "dt/b", "dt/c"];
            let records: Vec<Record> = (0..600u64)
                .map(|seq| {
                    let topic = topics[(seq * 7 % 3) as usize];
                    let payload = format!(
                        r#"{{"seq":{seq},"v":"{}"}}"#,
                        "x".repeat((seq % 40) as usize)
                    );
                    record(seq, topic, payload.as_bytes())
                })
                .collect();
            let expected: Vec<(String, u64)> = records
                .iter()
                .map(|r| (r.msg.topic.clone(), r.seq))
                .collect();
            let packs = pack_all(&mut packer, records);
            assert!(packs.len() < 600 / 10, "{} packs", packs.len());
            let mut seen: Vec<(String, u64)> = Vec::new();
            for pack in &packs {
                assert!(pack.body.len() <= max, "{} bytes", pack.body.len());
                let parts = parts(&pack.body, format);
                assert_eq!(parts.len(), pack.records.len());
                for (part, r) in parts.iter().zip(&pack.records) {
                    assert_eq!(r.msg.topic, pack.key);
                    assert_eq!(payload_of(part), r.msg.payload.to_vec());
                    seen.push((pack.key.clone(), part["payload"]["seq"].as_u64().unwrap()));
                }
            }
            // Each message exactly once, and per topic in buffer order.
            for topic in topics {
                let want: Vec<u64> = expected
                    .iter()
                    .filter(|(t, _)| t == topic)
                    .map(|(_, s)| *s)
                    .collect();
                let got: Vec<u64> = seen
                    .iter()
                    .filter(|(t, _)| t == topic)
                    .map(|(_, s)| *s)
                    .collect();
                assert_eq!(got, want, "{topic} ({format:?})");
            }
        }
    }

    #[test]
    fn a_full_pack_closes_when_the_next_message_would_not_fit() {
        let mut packer = Packer::new(plan(PackFormat::JsonArray, 1024), 8);
        let now = Instant::now();
        let mut out = VecDeque::new();
        let part = |seq| record(seq, "t", &[b'1'; 300]);
        for seq in 0..3 {
            packer.push(part(seq), usize::MAX, now, &mut out);
        }
        // [ + 3 × ({"payload":…300…} = 312) + 2 commas + ] = 940; a fourth is over 1024.
        assert!(out.is_empty());
        packer.push(part(3), usize::MAX, now, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].records.len(), 3);
        assert_eq!(out[0].body.len(), 940);
        assert_eq!(packer.held(), 1, "the fourth starts the next pack");
    }

    #[test]
    fn a_message_over_max_bytes_goes_alone_as_a_pack_of_one() {
        let mut packer = Packer::new(plan(PackFormat::JsonArray, 1024), 8);
        let now = Instant::now();
        let mut out = VecDeque::new();
        packer.push(record(1, "t", b"1"), usize::MAX, now, &mut out);
        packer.push(record(2, "t", &[b'x'; 2000]), usize::MAX, now, &mut out);
        packer.push(record(3, "t", b"3"), usize::MAX, now, &mut out);
        assert_eq!(out.len(), 2, "the open pack, then the large one alone");
        assert_eq!(out[0].records.len(), 1);
        assert_eq!(out[1].records[0].seq, 2);
        assert_eq!(parts(&out[1].body, PackFormat::JsonArray).len(), 1);
        assert_eq!(packer.held(), 1);
        assert_eq!(
            PackPlan::single(packer.plan(), record(9, "t", b"[1]")).body,
            br#"[{"payload":[1]}]"#
        );
    }

    #[test]
    fn a_short_cap_for_a_long_topic_wins_over_max_bytes() {
        let mut packer = Packer::new(plan(PackFormat::Ndjson, 4096), 8);
        let now = Instant::now();
        let mut out = VecDeque::new();
        for seq in 0..10 {
            packer.push(record(seq, "t", &[b'1'; 90]), 300, now, &mut out);
        }
        assert!(!out.is_empty());
        assert!(out
            .iter()
            .all(|p| p.body.len() <= 300 && p.records.len() == 2));
    }

    #[test]
    fn linger_closes_packs_after_their_first_message_oldest_first() {
        let mut packer = Packer::new(plan(PackFormat::JsonArray, 4096), 8);
        let t0 = Instant::now();
        let mut out = VecDeque::new();
        packer.push(record(1, "b", b"1"), usize::MAX, t0, &mut out);
        packer.push(
            record(2, "a", b"2"),
            usize::MAX,
            t0 + Duration::from_millis(50),
            &mut out,
        );
        packer.push(
            record(3, "b", b"3"),
            usize::MAX,
            t0 + Duration::from_millis(150),
            &mut out,
        );
        assert_eq!(
            packer.next_deadline(),
            Some(t0 + Duration::from_millis(200))
        );
        packer.close_due(t0 + Duration::from_millis(199), &mut out);
        assert!(out.is_empty());
        packer.close_due(t0 + Duration::from_millis(200), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].key.as_str(), out[0].records.len()), ("b", 2));
        packer.close_due(t0 + Duration::from_secs(1), &mut out);
        assert_eq!(out[1].key, "a");
        assert_eq!(packer.next_deadline(), None);
    }

    #[test]
    fn too_many_open_packs_close_the_oldest() {
        let mut packer = Packer::new(plan(PackFormat::JsonArray, 4096), 2);
        let now = Instant::now();
        let mut out = VecDeque::new();
        for (seq, topic) in ["a", "b", "a", "c"].iter().enumerate() {
            packer.push(record(seq as u64, topic, b"1"), usize::MAX, now, &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].key.as_str(), out[0].records.len()), ("a", 2));
        assert_eq!(packer.held(), 2);
    }

    fn check(toml: &str, limit: Option<&PayloadLimit>) -> Result<PackPlan, Vec<String>> {
        let section: PackSection = toml::from_str(toml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Vec::new();
        let plan = validate("sinks.c.pack", &section, limit, &mut |k, m| {
            errors.push(format!("{k}: {m}"))
        });
        plan.ok_or(errors)
    }

    #[test]
    fn validation_defaults_limits_and_key_paths() {
        let aws = PayloadLimit {
            bytes: 128 * 1024,
            why: "profile aws-iot's payload limit".into(),
        };
        let p = check("", Some(&aws)).unwrap();
        assert_eq!(p, plan(PackFormat::JsonArray, 120 * 1024));
        let small = PayloadLimit {
            bytes: 10_000,
            why: "max_packet_size".into(),
        };
        assert_eq!(check("", Some(&small)).unwrap().max_bytes, 10_000);
        let p = check(
            "max_bytes = \"64KiB\"\nlinger = \"1s\"\nformat = \"ndjson\"\nby = \"topic\"\nfields = [\"received_at\", \"topic\"]",
            Some(&aws),
        )
        .unwrap();
        assert_eq!(
            (p.max_bytes, p.linger, p.format),
            (65536, Duration::from_secs(1), PackFormat::Ndjson)
        );
        assert!(p.fields.received_at && p.fields.topic && !p.fields.qos);
        assert_eq!(
            p.describe(),
            "pack=ndjson by topic max_bytes=65536 linger=1s fields=[topic,received_at]"
        );

        let e = check("max_bytes = \"129KiB\"", Some(&aws)).unwrap_err();
        assert_eq!(e, ["sinks.c.pack.max_bytes: 132096 bytes is over what the upstream takes in one message (131072 bytes: profile aws-iot's payload limit)"]);
        let e = check(
            "max_bytes = 100\nlinger = \"2m\"\nfields = [\"qos\", \"qos\"]",
            None,
        )
        .unwrap_err();
        assert_eq!(
            e,
            [
                "sinks.c.pack.max_bytes: must be at least 1KiB",
                "sinks.c.pack.linger: must be at most 60s",
                "sinks.c.pack.fields[1]: listed twice",
            ]
        );
        assert!(check("by = \"client\"", None).is_err());
        assert!(check("format = \"csv\"", None).is_err());
        assert!(check("lingr = \"1s\"", None).is_err());
    }
}
