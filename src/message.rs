//! The message that flows from intake through the rules into the sink buffers.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// MQTT 5 publish properties worth carrying upstream. Empty for 3.1.1 devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
}

/// One PUBLISH as received from a device (or, after routing, as it goes to one sink:
/// then `topic` is the rewritten upstream topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    /// Shared with the frame rumqttd read; cloning a message never copies the payload.
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Boxed: most messages have none, and it keeps `Message` small.
    pub properties: Option<Box<Properties>>,
    /// Milliseconds since the Unix epoch, stamped at intake.
    pub received_at: u64,
}

impl Message {
    /// Approximate memory (and buffer) cost of the message.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + 32
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
