//! The JSON envelope of one message, shared by the sinks that wrap messages (HTTP
//! bodies, Kafka with `format = "envelope"`):
//! `{"id","topic","payload","qos","retain","received_at","gateway_id"}`.
//!
//! `payload` is the payload as JSON when it parses as JSON, else a string with
//! `"encoding":"text"` (valid UTF-8) or `"encoding":"base64"`. `id` is the message's
//! stable id (`<gateway>-<sink>-<seq>`), for receivers that drop duplicates. Packs
//! (`sinks::pack`) carry payloads by the same rules.

use base64::Engine;
use serde_json::{json, Value};

use crate::message::Message;

/// The JSON object of one message.
pub fn message_object(msg: &Message, id: &str, gateway_id: &str) -> Value {
    let mut obj = match serde_json::from_slice::<Value>(&msg.payload) {
        Ok(v) => json!({ "payload": v }),
        Err(_) => {
            let (payload, encoding) = non_json_payload(&msg.payload);
            json!({ "payload": payload, "encoding": encoding })
        }
    };
    obj["id"] = json!(id);
    obj["topic"] = json!(msg.topic);
    obj["qos"] = json!(msg.qos);
    obj["retain"] = json!(msg.retain);
    obj["received_at"] = json!(msg.received_at);
    obj["gateway_id"] = json!(gateway_id);
    obj
}

/// A payload that is not JSON as a string and its `encoding`: the text itself (`"text"`)
/// when it is valid UTF-8, else base64 (`"base64"`). Shared with packs (`sinks::pack`).
pub fn non_json_payload(payload: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(payload) {
        Ok(text) => (text.to_string(), "text"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(payload),
            "base64",
        ),
    }
}
