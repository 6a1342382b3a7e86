//! Cloud-to-device: `[[downlinks]]`.
//!
//! Input: PUBLISHes that an MQTT sink's upstream connection delivers on its downlink
//! subscriptions; the sink worker subscribes after every CONNACK and hands what arrives
//! to a [`DownlinkTap`] (a bounded channel: a slow local side slows the upstream
//! connection down, it does not drop commands).
//! Output: one publish to local devices per matching downlink, straight into the broker's
//! router ([`LocalPublisher`]), with the MQTT 5 properties it came with (response topic,
//! correlation data, user properties, content type, payload format, message expiry), so
//! that the request/response pattern works for commands: a device replies to the
//! response topic with the correlation data, and a rule takes the reply upstream. It does not pass a device connection, so a downlinked
//! message never enters intake and no rule can forward it back upstream.

use std::sync::Arc;

use bytes::Bytes;
use prometheus::IntCounterVec;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::DownlinkPlan;
use super::{Template, TemplateVars, TopicFilter};
use crate::broker::LocalPublisher;
use crate::message::Properties;
use crate::metrics::Metrics;

/// Upstream messages queued for the downlink task.
pub const QUEUE: usize = 1024;

/// A message an upstream delivered on a downlink subscription.
#[derive(Debug)]
pub struct UpstreamMessage {
    pub sink: Arc<str>,
    pub topic: String,
    pub payload: Bytes,
    /// What an MQTT 5 upstream sent with it (`None` on 3.1.1, or when it sent none).
    pub properties: Option<Box<Properties>>,
}

/// What an MQTT sink worker needs for downlinks: what to subscribe to, and where to hand
/// what arrives.
#[derive(Debug, Clone)]
pub struct DownlinkTap {
    sink: Arc<str>,
    /// Distinct upstream filters with their QoS (the highest asked for).
    filters: Vec<(String, u8)>,
    tx: mpsc::Sender<UpstreamMessage>,
}

impl DownlinkTap {
    /// The upstream filters and their QoS.
    pub fn filters(&self) -> &[(String, u8)] {
        &self.filters
    }

    /// The sink worker queued the SUBSCRIBE of [`DownlinkTap::filters`] (after a
    /// CONNACK: a clean session forgets subscriptions), or could not.
    pub fn subscribed(&self, queued: Result<(), String>) {
        match queued {
            Ok(()) => {
                debug!(sink = %self.sink, filters = ?self.filters, "downlink subscription sent")
            }
            Err(e) => {
                warn!(sink = %self.sink, error = %e, "cannot queue the downlink subscription")
            }
        }
    }

    /// Logs a refused subscription (the broker's ACL, or QoS 2 on AWS IoT Core);
    /// `codes` are the SUBACK's reason codes as rumqttc shows them.
    pub fn check_suback(&self, refused: bool, codes: &dyn std::fmt::Debug) {
        if refused {
            warn!(sink = %self.sink, filters = ?self.filters, codes = ?codes, "upstream refused a downlink subscription");
        }
    }

    /// Hands an upstream PUBLISH to the downlink task; waits while its queue is full.
    pub async fn forward(
        &self,
        topic: String,
        payload: Bytes,
        properties: Option<Box<Properties>>,
    ) {
        let msg = UpstreamMessage {
            sink: self.sink.clone(),
            topic,
            payload,
            properties,
        };
        // Closed only at shutdown, when nothing can be delivered locally anyway.
        let _ = self.tx.send(msg).await;
    }
}

struct Entry {
    sink: String,
    filter: TopicFilter,
    topic: Template,
    retain: bool,
}

/// The downlinks of one plan: swapped whole on reload.
pub struct DownlinkTable {
    gateway_id: String,
    entries: Vec<Entry>,
}

impl DownlinkTable {
    /// The table of `downlinks`, for gateway `gateway_id`.
    pub fn new(gateway_id: &str, downlinks: &[DownlinkPlan]) -> Self {
        Self {
            gateway_id: gateway_id.to_string(),
            entries: downlinks
                .iter()
                .map(|d| Entry {
                    sink: d.sink_name.clone(),
                    filter: d.filter.clone(),
                    topic: d.topic.clone(),
                    retain: d.retain,
                })
                .collect(),
        }
    }

    /// The tap of sink `index` (of the plan `downlinks` belong to), or `None` when it has
    /// no downlinks.
    pub fn tap(
        downlinks: &[DownlinkPlan],
        index: usize,
        tx: &mpsc::Sender<UpstreamMessage>,
    ) -> Option<DownlinkTap> {
        let mut filters: Vec<(String, u8)> = Vec::new();
        let mut sink = None;
        for d in downlinks.iter().filter(|d| d.sink == index) {
            sink = Some(d.sink_name.as_str());
            let filter = d.filter.to_string();
            match filters.iter_mut().find(|(f, _)| *f == filter) {
                Some((_, qos)) => *qos = (*qos).max(d.qos),
                None => filters.push((filter, d.qos)),
            }
        }
        sink.map(|sink| DownlinkTap {
            sink: Arc::from(sink),
            filters,
            tx: tx.clone(),
        })
    }

    /// Local (topic, retain) for every downlink of `msg.sink` whose filter matches.
    fn map(&self, msg: &UpstreamMessage) -> Vec<(String, bool)> {
        let mut captures = Vec::new();
        let vars = TemplateVars {
            gateway_id: &self.gateway_id,
            topic: &msg.topic,
            client_id: "",
        };
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| *e.sink == *msg.sink) {
            if e.filter.captures(&msg.topic, &mut captures) {
                out.push((e.topic.render(&vars, &captures), e.retain));
            }
        }
        out
    }
}

/// Metric handles of the downlink task.
pub struct DownlinkMetrics {
    delivered: IntCounterVec,
    errors: IntCounterVec,
}

impl DownlinkMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            delivered: metrics.downlink_messages.clone(),
            errors: metrics.sink_errors.clone(),
        }
    }
}

/// Runs until `shutdown`: maps each upstream message with the current table and
/// publishes it locally.
pub async fn run(
    mut rx: mpsc::Receiver<UpstreamMessage>,
    table: watch::Receiver<Arc<DownlinkTable>>,
    mut local: LocalPublisher,
    metrics: DownlinkMetrics,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let targets = table.borrow().map(&msg);
        if targets.is_empty() {
            // Another subscriber's filter overlapping, or a reload removed the mapping.
            metrics
                .errors
                .with_label_values(&[&msg.sink, "downlink_unmapped"])
                .inc();
            debug!(sink = %msg.sink, topic = %msg.topic, "upstream message matches no downlink");
            continue;
        }
        for (topic, retain) in targets {
            if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                metrics
                    .errors
                    .with_label_values(&[&msg.sink, "downlink_invalid_topic"])
                    .inc();
                warn!(sink = %msg.sink, topic = %topic, "downlink renders an invalid local topic; dropped");
                continue;
            }
            match local
                .publish(
                    Bytes::from(topic.clone()),
                    msg.payload.clone(),
                    retain,
                    msg.properties.as_deref(),
                )
                .await
            {
                Ok(()) => {
                    metrics.delivered.with_label_values(&[&msg.sink]).inc();
                    debug!(sink = %msg.sink, from = %msg.topic, to = %topic, "downlinked");
                }
                Err(e) => {
                    metrics
                        .errors
                        .with_label_values(&[&msg.sink, "downlink_local"])
                        .inc();
                    warn!(sink = %msg.sink, error = %e, "cannot publish a downlink locally; stopping downlinks");
                    return;
                }
            }
        }
    }
}

/// Logs the downlinks in force.
pub fn log_table(downlinks: &[DownlinkPlan]) {
    for d in downlinks {
        info!(sink = %d.sink_name, from = %d.filter, topic = %d.topic.source(), "downlink");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Config};

    fn plan(downlinks: &str) -> config::Plan {
        let toml = format!(
            "[gateway]\nid = \"edge-5\"\n\
             [sinks.aws]\ntype = \"mqtt\"\nurl = \"mqtt://a:1883\"\n\
             [sinks.hive]\ntype = \"mqtt\"\nurl = \"mqtt://b:1883\"\n{downlinks}"
        );
        let config: Config = toml::from_str(&toml).expect("toml");
        config::validate(&config).unwrap_or_else(|e| panic!("{e}"))
    }

    fn upstream(sink: &str, topic: &str) -> UpstreamMessage {
        UpstreamMessage {
            sink: Arc::from(sink),
            topic: topic.into(),
            payload: Bytes::from_static(b"go"),
            properties: None,
        }
    }

    #[test]
    fn maps_by_sink_and_filter_with_captures() {
        let plan = plan(
            r#"
            [[downlinks]]
            sink = "aws"
            from = "cmd/{gateway_id}/+/#"
            topic = "cmd/{1}/{2}"
            [[downlinks]]
            sink = "aws"
            from = "cmd/{gateway_id}/#"
            topic = "audit/{gateway_id}/{topic}"
            retain = true
            qos = 0
            [[downlinks]]
            sink = "hive"
            from = "ota/#"
            topic = "ota/{1}"
            "#,
        );
        let table = DownlinkTable::new(&plan.gateway_id, &plan.downlinks);
        assert_eq!(
            table.map(&upstream("aws", "cmd/edge-5/press-7/start/now")),
            vec![
                ("cmd/press-7/start/now".to_string(), false),
                (
                    "audit/edge-5/cmd/edge-5/press-7/start/now".to_string(),
                    true
                ),
            ]
        );
        // Another gateway's commands, or another sink's filter: nothing.
        assert!(table
            .map(&upstream("aws", "cmd/edge-6/press-7/start"))
            .is_empty());
        assert!(table.map(&upstream("hive", "cmd/edge-5/x/y")).is_empty());
        assert_eq!(
            table.map(&upstream("hive", "ota/fw/ü")),
            vec![("ota/fw/ü".to_string(), false)]
        );
    }

    #[test]
    fn taps_subscribe_each_filter_once_at_the_highest_qos() {
        let plan = plan(
            r#"
            [[downlinks]]
            sink = "aws"
            from = "cmd/#"
            topic = "a/{1}"
            qos = 0
            [[downlinks]]
            sink = "aws"
            from = "cmd/#"
            topic = "b/{1}"
            qos = 1
            "#,
        );
        let (tx, _rx) = mpsc::channel(1);
        let tap = DownlinkTable::tap(&plan.downlinks, 0, &tx).expect("aws has downlinks");
        assert_eq!(tap.filters(), &[("cmd/#".to_string(), 1)]);
        assert!(
            DownlinkTable::tap(&plan.downlinks, 1, &tx).is_none(),
            "hive has none"
        );
    }
}
