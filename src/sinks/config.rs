//! The config every sink kind shares: the `[sinks.<name>]` section (tagged by `type`),
//! the validated [`SinkPlan`], and the file sink's own section and plan. Each kind's own
//! section lives beside it (`mqtt/config/`, `http/config.rs`, `kafka/config.rs`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::http::{HttpPlan, HttpSinkSection};
use super::kafka::{KafkaPlan, KafkaSinkSection};
use super::mqtt::config::{MqttPlan, MqttSinkSection};
use super::pacing::{Rate, RateSection};
use super::pack::PackPlan;
use crate::buffer::BufferSection;

// Built once at load: the size difference between kinds does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkSection {
    Mqtt(MqttSinkSection),
    Http(HttpSinkSection),
    Kafka(KafkaSinkSection),
    File(FileSinkSection),
}

impl SinkSection {
    pub fn buffer(&self) -> &BufferSection {
        match self {
            SinkSection::Mqtt(s) => &s.buffer,
            SinkSection::Http(s) => &s.buffer,
            SinkSection::Kafka(s) => &s.buffer,
            SinkSection::File(s) => &s.buffer,
        }
    }

    /// `rate`, as written (every kind has it).
    pub fn rate(&self) -> Option<&RateSection> {
        match self {
            SinkSection::Mqtt(s) => s.rate.as_ref(),
            SinkSection::Http(s) => s.rate.as_ref(),
            SinkSection::Kafka(s) => s.rate.as_ref(),
            SinkSection::File(s) => s.rate.as_ref(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkSection {
    pub path: PathBuf,
    /// Pacing: lines (and their bytes) written per second.
    #[serde(default)]
    pub rate: Option<RateSection>,
    #[serde(default)]
    pub buffer: BufferSection,
}

#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub name: String,
    pub buffer: BufferSection,
    /// Pacing of what goes on the wire; `None`: as fast as the upstream confirms.
    pub rate: Option<Rate>,
    pub kind: SinkKindPlan,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SinkKindPlan {
    Mqtt(MqttPlan),
    Http(HttpPlan),
    Kafka(KafkaPlan),
    File(FilePlan),
}

impl SinkKindPlan {
    /// How the sink packs messages, if it does (`pack = { ... }`).
    pub fn pack(&self) -> Option<&PackPlan> {
        match self {
            SinkKindPlan::Mqtt(m) => m.pack.as_ref(),
            SinkKindPlan::Http(h) => h.pack.as_ref(),
            SinkKindPlan::Kafka(_) | SinkKindPlan::File(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FilePlan {
    pub path: PathBuf,
}
