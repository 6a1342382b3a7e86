//! The variables of one message as rule expressions read them (`topic`, `payload`,
//! `levels`, `properties`, …): each is resolved on first use, and the payload is parsed as
//! JSON at most once, for the native plans and the CEL interpreter alike.

use std::collections::HashMap;
use std::sync::OnceLock;

use cel::common::types::{CelBool, CelBytes, CelInt, CelList, CelMap, CelMapKey, CelString};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;

use super::json::Json;
use crate::message::{Message, Properties};

/// The variables of one message, resolved on first use.
pub struct MessageVars<'m> {
    msg: &'m Message,
    client_id: &'m str,
    gateway_id: &'m str,
    /// The payload parsed as JSON (`None`: not JSON), for native plans and CEL alike.
    json: OnceLock<Option<Json>>,
    /// The payload as CEL sees it, built from `json` only when the interpreter runs.
    payload: OnceLock<Box<dyn Val + 'static>>,
    levels: OnceLock<Box<dyn Val + 'm>>,
    user_properties: OnceLock<Box<dyn Val + 'm>>,
    properties: OnceLock<Box<dyn Val + 'm>>,
}

impl<'m> MessageVars<'m> {
    pub fn new(msg: &'m Message, client_id: &'m str, gateway_id: &'m str) -> Self {
        Self {
            msg,
            client_id,
            gateway_id,
            json: OnceLock::new(),
            payload: OnceLock::new(),
            levels: OnceLock::new(),
            user_properties: OnceLock::new(),
            properties: OnceLock::new(),
        }
    }

    pub fn topic(&self) -> &'m str {
        &self.msg.topic
    }

    pub(super) fn client_id(&self) -> &'m str {
        self.client_id
    }

    pub(super) fn gateway_id(&self) -> &'m str {
        self.gateway_id
    }

    pub(super) fn qos(&self) -> i64 {
        i64::from(self.msg.qos)
    }

    pub(super) fn retain(&self) -> bool {
        self.msg.retain
    }

    pub(super) fn received_at(&self) -> i64 {
        i64::try_from(self.msg.received_at).unwrap_or(i64::MAX)
    }

    /// The device's MQTT 5 properties, if it sent any.
    pub(super) fn properties(&self) -> Option<&'m Properties> {
        self.msg.properties.as_deref()
    }

    pub(super) fn payload_bytes(&self) -> &'m [u8] {
        &self.msg.payload
    }

    /// The payload as JSON, parsed on first use; `None` when it is not JSON.
    pub(super) fn json(&self) -> Option<&Json> {
        self.json
            .get_or_init(|| Json::parse(&self.msg.payload))
            .as_ref()
    }

    /// The payload as CEL sees it: JSON when it is JSON, else text when UTF-8, else bytes.
    fn payload(&self) -> &(dyn Val + 'static) {
        self.payload
            .get_or_init(|| match self.json() {
                Some(json) => json.to_cel(),
                None => match std::str::from_utf8(&self.msg.payload) {
                    Ok(text) => Box::new(CelString::from(text.to_string())),
                    Err(_) => Box::new(CelBytes::from(self.msg.payload.to_vec())),
                },
            })
            .as_ref()
    }
}

impl VariableResolver for MessageVars<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let msg = self.msg;
        Some(match variable {
            "topic" => CowVal::owned(CelString::from(msg.topic.as_str())),
            "payload" => CowVal::Borrowed(self.payload()),
            "payload_text" => CowVal::owned(CelString::from(String::from_utf8_lossy(&msg.payload))),
            "payload_bytes" => CowVal::owned(CelBytes::from(msg.payload.as_ref())),
            "qos" => CowVal::owned(CelInt::from(self.qos())),
            "retain" => CowVal::owned(CelBool::from(msg.retain)),
            "client_id" => CowVal::owned(CelString::from(self.client_id)),
            "gateway_id" => CowVal::owned(CelString::from(self.gateway_id)),
            "received_at" => CowVal::owned(CelInt::from(self.received_at())),
            "levels" => CowVal::Borrowed(
                self.levels
                    .get_or_init(|| {
                        let levels: Vec<Box<dyn Val + '_>> = msg
                            .topic
                            .split('/')
                            .map(|l| Box::new(CelString::from(l)) as Box<dyn Val>)
                            .collect();
                        Box::new(CelList::from(levels))
                    })
                    .as_ref(),
            ),
            "user_properties" => {
                CowVal::Borrowed(self.user_properties.get_or_init(|| user_map(msg)).as_ref())
            }
            "properties" => {
                CowVal::Borrowed(self.properties.get_or_init(|| properties_val(msg)).as_ref())
            }
            _ => return None,
        })
    }
}

/// A message's user properties as a CEL map (a repeated key keeps its last value).
fn user_map(msg: &Message) -> Box<dyn Val + '_> {
    let mut map: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = HashMap::new();
    if let Some(p) = &msg.properties {
        for (k, v) in &p.user_properties {
            map.insert(
                CelMapKey::String(CelString::from(k.as_str())),
                Box::new(CelString::from(v.as_str())),
            );
        }
    }
    Box::new(CelMap::from(map))
}

/// The `properties` variable: `user` always (empty for 3.1.1), the others only when the
/// device sent them, so that reading one it did not send is a missing field (false).
fn properties_val(msg: &Message) -> Box<dyn Val + '_> {
    let mut map: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> = HashMap::new();
    let key = |k: &'static str| CelMapKey::String(CelString::from(k));
    map.insert(key("user"), user_map(msg));
    if let Some(p) = &msg.properties {
        if let Some(ct) = &p.content_type {
            map.insert(key("content_type"), Box::new(CelString::from(ct.as_str())));
        }
        if let Some(rt) = &p.response_topic {
            map.insert(
                key("response_topic"),
                Box::new(CelString::from(rt.as_str())),
            );
        }
        if let Some(cd) = &p.correlation_data {
            map.insert(
                key("correlation_data"),
                Box::new(CelBytes::from(cd.as_ref())),
            );
        }
        if let Some(pfi) = p.payload_format_indicator {
            map.insert(
                key("payload_format_indicator"),
                Box::new(CelInt::from(i64::from(pfi))),
            );
        }
        if let Some(expiry) = p.message_expiry_interval {
            map.insert(
                key("message_expiry_interval"),
                Box::new(CelInt::from(i64::from(expiry))),
            );
        }
    }
    Box::new(CelMap::from(map))
}
