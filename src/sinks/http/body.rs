//! Request bodies: how a run of messages becomes one HTTP body.
//!
//! Each message is its envelope object (`crate::sinks::envelope`).

use serde_json::Value;

use super::config::BodyFormat;
use crate::message::Message;
use crate::sinks::envelope::message_object;

/// Appends the body part of one message to `out`: a whole body for `json` and `raw`, a
/// line for `ndjson`, an array element (with its leading comma) for `json_array`.
/// `first` says whether it is the first message of the body.
pub fn encode(
    format: BodyFormat,
    msg: &Message,
    id: &str,
    gateway_id: &str,
    first: bool,
    out: &mut Vec<u8>,
) {
    match format {
        BodyFormat::Raw => out.extend_from_slice(&msg.payload),
        BodyFormat::Json => write_json(out, &message_object(msg, id, gateway_id)),
        BodyFormat::Ndjson => {
            write_json(out, &message_object(msg, id, gateway_id));
            out.push(b'\n');
        }
        BodyFormat::JsonArray => {
            out.push(if first { b'[' } else { b',' });
            write_json(out, &message_object(msg, id, gateway_id));
        }
    }
}

/// Completes a body started by [`encode`] calls.
pub fn finish(format: BodyFormat, out: &mut Vec<u8>) {
    if format == BodyFormat::JsonArray {
        if out.is_empty() {
            out.push(b'[');
        }
        out.push(b']');
    }
}

fn write_json(out: &mut Vec<u8>, value: &Value) {
    // Serializing a serde_json::Value into a Vec cannot fail.
    let _ = serde_json::to_writer(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(payload: &'static [u8]) -> Message {
        Message {
            topic: "plant/m1/temp".into(),
            payload: Bytes::from_static(payload),
            qos: 1,
            retain: true,
            properties: None,
            received_at: 1700,
        }
    }

    fn body(format: BodyFormat, msgs: &[Message]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            encode(format, m, &format!("id-{i}"), "gw", i == 0, &mut out);
        }
        finish(format, &mut out);
        out
    }

    #[test]
    fn json_payloads_stay_json_text_and_binary_are_marked() {
        let v: Value =
            serde_json::from_slice(&body(BodyFormat::Json, &[msg(b"{\"t\":21.5}")])).unwrap();
        assert_eq!(v["payload"]["t"], 21.5);
        assert!(v.get("encoding").is_none());
        assert_eq!(v["topic"], "plant/m1/temp");
        assert_eq!(v["qos"], 1);
        assert_eq!(v["retain"], true);
        assert_eq!(v["received_at"], 1700);
        assert_eq!(v["gateway_id"], "gw");
        assert_eq!(v["id"], "id-0");

        let v: Value =
            serde_json::from_slice(&body(BodyFormat::Json, &[msg(b"not json")])).unwrap();
        assert_eq!(
            (v["payload"].as_str(), v["encoding"].as_str()),
            (Some("not json"), Some("text"))
        );

        let v: Value =
            serde_json::from_slice(&body(BodyFormat::Json, &[msg(&[0, 159, 146, 150])])).unwrap();
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["payload"], "AJ+Slg==");
    }

    #[test]
    fn batch_formats_hold_every_message_in_order() {
        let msgs = [msg(b"1"), msg(b"2"), msg(b"3")];
        let lines = body(BodyFormat::Ndjson, &msgs);
        let parsed: Vec<Value> = lines
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[2]["payload"], 3);

        let array: Vec<Value> =
            serde_json::from_slice(&body(BodyFormat::JsonArray, &msgs)).unwrap();
        let ids: Vec<&str> = array.iter().map(|v| v["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["id-0", "id-1", "id-2"]);

        let empty: Vec<Value> = serde_json::from_slice(&body(BodyFormat::JsonArray, &[])).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn raw_is_the_payload_itself() {
        assert_eq!(body(BodyFormat::Raw, &[msg(&[1, 2, 255])]), vec![1, 2, 255]);
    }
}
