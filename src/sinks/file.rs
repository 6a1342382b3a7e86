//! File sink: one NDJSON line per message, appended and flushed per batch (with a
//! `rate`: per run of lines the pacer lets go at once).
//!
//! Line format: `{"topic":…,"payload":…,"qos":…,"retain":…,"received_at":…}` where the
//! payload is UTF-8 text when it is valid UTF-8, else base64 with `"encoding":"base64"`;
//! a message with MQTT 5 properties adds `"properties":{…}`, the object of
//! `sinks::envelope` (user properties, content type, response topic, …).

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::config::FilePlan;
use super::supervise::{supervise, Ended, Session};
use super::{Backoff, Pacer, SinkContext};
use crate::buffer::Record;
use crate::message::Message;

/// Appends the NDJSON line of `msg` to `out`.
pub fn encode_line(msg: &Message, out: &mut Vec<u8>) {
    let mut line = match std::str::from_utf8(&msg.payload) {
        Ok(text) => json!({ "topic": msg.topic, "payload": text }),
        Err(_) => json!({
            "topic": msg.topic,
            "payload": base64::engine::general_purpose::STANDARD.encode(&msg.payload),
            "encoding": "base64",
        }),
    };
    line["qos"] = json!(msg.qos);
    line["retain"] = json!(msg.retain);
    line["received_at"] = json!(msg.received_at);
    if let Some(props) = &msg.properties {
        line["properties"] = super::envelope::properties_object(props);
    }
    // Serializing a serde_json::Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

async fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

/// Encodes into `lines` the first of `records` once the pacer lets it go (waiting for
/// that), then the following ones it lets go at once. Returns how many were taken, or
/// `None` when shutdown began during the wait.
async fn paced_lines(
    ctx: &SinkContext,
    pacer: &mut Pacer,
    records: &[Record],
    lines: &mut Vec<u8>,
) -> Option<usize> {
    lines.clear();
    let mut taken = 0;
    for record in records {
        let before = lines.len();
        encode_line(&record.msg, lines);
        let bytes = lines.len() - before;
        if taken == 0 {
            tokio::select! {
                _ = pacer.acquire(bytes) => {}
                _ = ctx.shutdown.cancelled() => return None,
            }
        } else if !pacer.try_acquire(bytes, Instant::now()) {
            lines.truncate(before);
            break;
        }
        taken += 1;
    }
    Some(taken)
}

pub async fn run(plan: FilePlan, ctx: SinkContext) {
    let backoff = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(10))
        .unwrap_or_else(|_| unreachable!("constant bounds are valid"));
    let mut session = Appender {
        plan,
        lines: Vec::new(),
        pacer: ctx.pacer(),
    };
    supervise(&ctx, backoff, &mut session).await;
}

/// One session of the file sink: the file opened, then lines appended until a write
/// fails or shutdown.
struct Appender {
    plan: FilePlan,
    /// The lines of one write, reused.
    lines: Vec<u8>,
    pacer: Option<Pacer>,
}

impl Session for Appender {
    async fn run(&mut self, ctx: &SinkContext, backoff: &mut Backoff) -> Ended {
        let path = &self.plan.path;
        let mut file = match open(path).await {
            Ok(f) => f,
            Err(e) => {
                let detail = format!("cannot open {}: {e}", path.display());
                ctx.metrics.mark_down("io", &detail);
                return Ended::Failed;
            }
        };
        backoff.reset();
        ctx.up(&format!("writing to {}", path.display()));
        loop {
            let batch = tokio::select! {
                batch = ctx.buffer.read_batch(ctx.batch) => batch,
                _ = ctx.shutdown.cancelled() => return Ended::Stopped,
            };
            // Without a rate the whole batch is one write; with one, each write holds the
            // lines the pacer lets go at that moment.
            let mut rest = batch.as_slice();
            while !rest.is_empty() {
                let lines = &mut self.lines;
                let taken = match self.pacer.as_mut() {
                    None => {
                        lines.clear();
                        for record in rest {
                            encode_line(&record.msg, lines);
                        }
                        rest.len()
                    }
                    Some(pacer) => match paced_lines(ctx, pacer, rest, lines).await {
                        Some(n) => n,
                        // Shutdown: what was not written stays in the buffer.
                        None => return Ended::Stopped,
                    },
                };
                let written = async {
                    file.write_all(lines).await?;
                    file.flush().await
                };
                if let Err(e) = written.await {
                    let detail = format!("cannot write {}: {e}", path.display());
                    ctx.metrics.mark_down("io", &detail);
                    ctx.buffer.rewind();
                    return Ended::Failed;
                }
                for record in &rest[..taken] {
                    ctx.buffer.ack(record.seq);
                    ctx.metrics.delivered(record.msg.received_at);
                }
                ctx.acked();
                rest = &rest[taken..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn line(payload: &'static [u8]) -> serde_json::Value {
        let msg = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain: true,
            properties: None,
            received_at: 42,
        };
        let mut out = Vec::new();
        encode_line(&msg, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).expect("valid JSON line")
    }

    #[test]
    fn text_payloads_stay_text_and_binary_is_base64() {
        let v = line(b"{\"t\":21.5}");
        assert_eq!(v["payload"], "{\"t\":21.5}");
        assert!(v.get("encoding").is_none());
        assert_eq!(v["qos"], 1);
        assert_eq!(v["retain"], true);
        assert_eq!(v["received_at"], 42);
        let v = line(&[0xff, 0x00, 0x10]);
        assert_eq!(v["payload"], "/wAQ");
        assert_eq!(v["encoding"], "base64");
    }
}
