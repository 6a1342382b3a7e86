//! The JSON envelope of one message, shared by the sinks that wrap messages (HTTP
//! bodies, Kafka with `format = "envelope"`):
//! `{"id","topic","payload","qos","retain","received_at","gateway_id"[,"properties"]}`.
//!
//! `properties`, only when the device sent MQTT 5 properties (the file sink writes the
//! same object): `{"user":{k:v,…},"content_type","payload_format_indicator",
//! "response_topic","correlation_data","message_expiry_interval"}`, each only when set.
//! A user property key sent twice keeps its last value (a JSON object has one value per
//! key; Kafka and HTTP headers keep them all). `correlation_data` is base64 (it is
//! binary); `message_expiry_interval` is what the device sent, in seconds from
//! `received_at`.
//!
//! `payload` is the payload as JSON when it parses as JSON, else a string with
//! `"encoding":"text"` (valid UTF-8) or `"encoding":"base64"`. `id` is the message's
//! stable id (`<gateway>-<sink>-<seq>`), for receivers that drop duplicates. Packs
//! (`sinks::pack`) carry payloads by the same rules.

use base64::Engine;
use serde_json::{json, Value};

use crate::message::{Message, Properties};

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
    if let Some(props) = &msg.properties {
        obj["properties"] = properties_object(props);
    }
    obj
}

/// The `properties` object of a message's MQTT 5 properties.
pub fn properties_object(props: &Properties) -> Value {
    let mut obj = serde_json::Map::new();
    if !props.user_properties.is_empty() {
        let user: serde_json::Map<String, Value> = props
            .user_properties
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        obj.insert("user".into(), Value::Object(user));
    }
    if let Some(ct) = &props.content_type {
        obj.insert("content_type".into(), json!(ct));
    }
    if let Some(pfi) = props.payload_format_indicator {
        obj.insert("payload_format_indicator".into(), json!(pfi));
    }
    if let Some(rt) = &props.response_topic {
        obj.insert("response_topic".into(), json!(rt));
    }
    if let Some(cd) = &props.correlation_data {
        obj.insert(
            "correlation_data".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(cd)),
        );
    }
    if let Some(expiry) = props.message_expiry_interval {
        obj.insert("message_expiry_interval".into(), json!(expiry));
    }
    Value::Object(obj)
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn properties_appear_only_when_sent_and_only_those_set() {
        let mut msg = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"{}"),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 7,
        };
        assert!(message_object(&msg, "id", "gw").get("properties").is_none());
        msg.properties = Some(Box::new(Properties {
            user_properties: vec![("line".into(), "4".into()), ("line".into(), "4b".into())],
            content_type: Some("application/json".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            ..Properties::default()
        }));
        assert_eq!(
            message_object(&msg, "id", "gw")["properties"],
            json!({
                "user": { "line": "4b" },
                "content_type": "application/json",
                "correlation_data": "AAE="
            })
        );
    }
}
