//! The protocol seam of the MQTT sink: one connection to the upstream over rumqttc's
//! MQTT 3.1.1 client (`rumqttc`) or its MQTT 5 client (`rumqttc::v5`), chosen per sink
//! (`protocol`).
//!
//! Input: the sink's plan (options for one connection attempt) and the publishes the
//! delivery loop (`super::connection`) hands over. Output: a [`Client`] to publish with
//! and a channel of [`LinkEvent`]s, the few events the delivery loop acts on, the same for
//! both protocols: CONNACK, the packet id of each publish written, PUBACK (with its
//! reason code; always success on 3.1.1) and PUBCOMP. The delivery loop, pacing, packing,
//! connections and failover are written once, over this seam; only options, publishing and
//! event translation differ between the protocols.
//!
//! Message properties (`crate::message::Properties`) go upstream on MQTT 5 only; the
//! message expiry interval is the one the delivery loop computed (the time spent in the
//! gateway's buffer subtracted). On 3.1.1 they are dropped (documented; `check` warns).

use std::io::ErrorKind;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{
    DisconnectReasonCode, Filter, PubAckReason, PublishProperties, SubscribeReasonCode,
};
use rumqttc::{StateError, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::config::{MqttPlan, MqttProtocol};
use crate::message::Properties;
use crate::rules::downlink::DownlinkTap;
use crate::sinks::credentials::{LoadedTls, TlsFiles};

/// Options for one connection attempt, for the protocol of the sink.
#[derive(Clone)]
pub enum Options {
    V311(Box<rumqttc::MqttOptions>),
    V5(Box<v5::MqttOptions>),
}

/// rumqttc's options for one connection attempt, and, with an Azure SAS token as the
/// password, how long from now to renew it.
pub fn options(
    plan: &MqttPlan,
    tls_files: &TlsFiles,
) -> Result<(Options, Option<Duration>), String> {
    let mut renew_in = None;
    let credentials = match &plan.username {
        Some(user) => {
            let password = match &plan.sas {
                Some(sas) => {
                    let (token, _expiry, renew) = sas.fresh_token();
                    renew_in = Some(renew);
                    token
                }
                None => plan.password.clone().unwrap_or_default(),
            };
            Some((user.clone(), password))
        }
        None => None,
    };
    let transport = match &plan.tls {
        Some(tls) => {
            // As they are now, or the last set that loaded (`sinks::credentials`).
            let LoadedTls { ca, client_auth } = tls_files.read(
                tls.ca.as_deref(),
                tls.client_auth
                    .as_ref()
                    .map(|(cert, key)| (cert.as_path(), key.as_path())),
            )?;
            let alpn = (!tls.alpn.is_empty())
                .then(|| tls.alpn.iter().map(|a| a.as_bytes().to_vec()).collect());
            Some(Transport::tls_with_config(TlsConfiguration::Simple {
                ca,
                alpn,
                client_auth,
            }))
        }
        None => None,
    };
    // rumqttc leaves Nagle's algorithm on: a publish written while the previous one is
    // unacknowledged at the TCP level then waits for that ACK, which a peer delaying
    // its ACKs holds for up to 40 ms (a WAN round trip, at best). Measured with one
    // message in flight per device (S1c): p99 42 ms with Nagle, 5 ms without.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    let options = match plan.protocol {
        MqttProtocol::V311 => {
            let mut opts =
                rumqttc::MqttOptions::new(plan.client_id.clone(), plan.host.clone(), plan.port);
            opts.set_keep_alive(plan.keep_alive)
                .set_clean_session(plan.clean_session)
                .set_max_packet_size(plan.max_packet_size, plan.max_packet_size)
                .set_inflight(plan.inflight);
            if let Some((user, password)) = credentials {
                opts.set_credentials(user, password);
            }
            if let Some(transport) = transport {
                opts.set_transport(transport);
            }
            Options::V311(Box::new(opts))
        }
        MqttProtocol::V5 => {
            let mut opts =
                v5::MqttOptions::new(plan.client_id.clone(), plan.host.clone(), plan.port);
            // The largest packet edgebridge accepts (downlinks); what it may send is the
            // smaller of `max_packet_size` and what the upstream's CONNACK allows.
            let incoming = u32::try_from(plan.max_packet_size).unwrap_or(u32::MAX);
            opts.set_keep_alive(plan.keep_alive)
                .set_clean_start(plan.clean_session)
                .set_max_packet_size(Some(incoming))
                .set_outgoing_inflight_upper_limit(plan.inflight.max(1))
                .set_network_options(network);
            if let Some((user, password)) = credentials {
                opts.set_credentials(user, password);
            }
            if let Some(transport) = transport {
                opts.set_transport(transport);
            }
            Options::V5(Box::new(opts))
        }
    };
    Ok((options, renew_in))
}

/// The client side of one connection: hands publishes to rumqttc's event loop.
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// The event loop is gone (its error is next in the events, or it was aborted).
#[derive(Debug)]
pub struct Closed;

/// What the delivery loop learns from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The upstream accepted the connection. `max_packet_size`: the upstream's own limit
    /// (MQTT 5 CONNACK property), when it set one.
    ConnAck {
        session_present: bool,
        max_packet_size: Option<usize>,
    },
    /// A publish was written with this packet id (0 for QoS 0), in the order publishes
    /// were handed over.
    Published(u16),
    /// PUBACK with its reason code (0x00 on 3.1.1); see `super::puback`.
    PubAck { pkid: u16, code: u8 },
    /// PUBCOMP (QoS 2).
    PubComp(u16),
}

/// Why a connection ended.
#[derive(Debug, Clone)]
pub struct LinkError {
    /// The `reason` label of `edgebridge_sink_errors_total`.
    pub reason: &'static str,
    /// For the log and the status API (never with credentials: rumqttc's errors carry
    /// none).
    pub detail: String,
    /// MQTT 5: the reason code of a DISCONNECT the upstream sent.
    pub disconnect_code: Option<u8>,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

fn qos_v311(level: u8) -> rumqttc::QoS {
    match level {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(level: u8) -> v5::mqttbytes::QoS {
    match level {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        _ => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The MQTT 5 PUBLISH properties of a message: everything the device sent that concerns
/// the receiver, with `expiry` (the remaining interval) in place of the original one.
/// Topic aliases and subscription identifiers are per connection and never forwarded.
pub fn publish_properties(
    props: Option<&Properties>,
    expiry: Option<u32>,
) -> Option<PublishProperties> {
    if props.is_none() && expiry.is_none() {
        return None;
    }
    let p = props.cloned().unwrap_or_default();
    Some(PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: expiry,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    })
}

impl Client {
    /// Hands one publish to the event loop (waits while its request channel is full).
    /// `properties` is dropped on 3.1.1.
    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
        properties: Option<PublishProperties>,
    ) -> Result<(), Closed> {
        match self {
            Client::V311(c) => c
                .publish_bytes(topic, qos_v311(qos), retain, payload)
                .await
                .map_err(|_| Closed),
            Client::V5(c) => match properties {
                Some(p) => c
                    .publish_bytes_with_properties(topic, qos_v5(qos), retain, payload, p)
                    .await
                    .map_err(|_| Closed),
                None => c
                    .publish_bytes(topic, qos_v5(qos), retain, payload)
                    .await
                    .map_err(|_| Closed),
            },
        }
    }

    /// Queues a DISCONNECT; `false` when the event loop is gone or its queue is full.
    pub fn try_disconnect(&self) -> bool {
        match self {
            Client::V311(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        }
    }

    /// Queues the SUBSCRIBE of the downlinks (after a CONNACK: a clean session forgets
    /// subscriptions).
    pub fn subscribe_downlinks(&self, tap: &DownlinkTap) {
        let queued = match self {
            Client::V311(c) => c
                .try_subscribe_many(
                    tap.filters()
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos_v311(*q))),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(
                    tap.filters()
                        .iter()
                        .map(|(f, q)| Filter::new(f.clone(), qos_v5(*q))),
                )
                .map_err(|e| e.to_string()),
        };
        tap.subscribed(queued);
    }
}

/// Starts one connection: the client, the events the delivery loop acts on, and the task
/// that polls rumqttc's event loop. The task runs on its own so that `poll()` is never
/// cancelled half way (the delivery loop selects over the buffer too) and network I/O
/// runs in parallel with reading the buffer; it ends after forwarding the first error.
/// Upstream PUBLISHes (downlinks) go to the downlink tap from there.
pub fn start(
    options: Options,
    capacity: usize,
    downlink: Option<DownlinkTap>,
) -> (
    Client,
    mpsc::Receiver<Result<LinkEvent, LinkError>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(1024);
    match options {
        Options::V311(opts) => {
            let (client, mut eventloop) = rumqttc::AsyncClient::new(*opts, capacity);
            let mut network = eventloop.network_options();
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            let task = tokio::spawn(async move {
                loop {
                    let event = match eventloop.poll().await {
                        Ok(event) => event,
                        Err(e) => {
                            let _ = tx.send(Err(error_v311(&e))).await;
                            return;
                        }
                    };
                    if let (Some(tap), rumqttc::Event::Incoming(incoming)) = (&downlink, &event) {
                        match incoming {
                            rumqttc::Incoming::Publish(p) => {
                                tap.forward(p.topic.clone(), p.payload.clone(), None).await
                            }
                            rumqttc::Incoming::SubAck(ack) => tap.check_suback(
                                ack.return_codes
                                    .contains(&rumqttc::SubscribeReasonCode::Failure),
                                &ack.return_codes,
                            ),
                            _ => {}
                        }
                    }
                    if let Some(event) = link_event_v311(event) {
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            (Client::V311(client), rx, task)
        }
        Options::V5(opts) => {
            let (client, mut eventloop) = v5::AsyncClient::new(*opts, capacity);
            let task = tokio::spawn(async move {
                loop {
                    let event = match eventloop.poll().await {
                        Ok(event) => event,
                        Err(e) => {
                            let _ = tx.send(Err(error_v5(&e))).await;
                            return;
                        }
                    };
                    if let (Some(tap), v5::Event::Incoming(incoming)) = (&downlink, &event) {
                        match incoming {
                            v5::Incoming::Publish(p) => {
                                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                                let properties =
                                    p.properties.as_ref().and_then(downlink_properties);
                                tap.forward(topic, p.payload.clone(), properties).await
                            }
                            v5::Incoming::SubAck(ack) => tap.check_suback(
                                ack.return_codes
                                    .iter()
                                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_))),
                                &ack.return_codes,
                            ),
                            _ => {}
                        }
                    }
                    if let Some(event) = link_event_v5(event) {
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            (Client::V5(client), rx, task)
        }
    }
}

fn link_event_v311(event: rumqttc::Event) -> Option<LinkEvent> {
    use rumqttc::{Event, Incoming, Outgoing};
    match event {
        Event::Incoming(Incoming::ConnAck(ack)) => Some(LinkEvent::ConnAck {
            session_present: ack.session_present,
            max_packet_size: None,
        }),
        Event::Incoming(Incoming::PubAck(ack)) => Some(LinkEvent::PubAck {
            pkid: ack.pkid,
            code: 0,
        }),
        Event::Incoming(Incoming::PubComp(comp)) => Some(LinkEvent::PubComp(comp.pkid)),
        Event::Outgoing(Outgoing::Publish(pkid)) => Some(LinkEvent::Published(pkid)),
        _ => None,
    }
}

fn link_event_v5(event: v5::Event) -> Option<LinkEvent> {
    use rumqttc::Outgoing;
    use v5::{Event, Incoming};
    match event {
        Event::Incoming(Incoming::ConnAck(ack)) => Some(LinkEvent::ConnAck {
            session_present: ack.session_present,
            max_packet_size: ack
                .properties
                .and_then(|p| p.max_packet_size)
                .map(|m| m as usize),
        }),
        Event::Incoming(Incoming::PubAck(ack)) => Some(LinkEvent::PubAck {
            pkid: ack.pkid,
            code: puback_code(ack.reason),
        }),
        Event::Incoming(Incoming::PubComp(comp)) => Some(LinkEvent::PubComp(comp.pkid)),
        Event::Outgoing(Outgoing::Publish(pkid)) => Some(LinkEvent::Published(pkid)),
        _ => None,
    }
}

/// The properties of a PUBLISH an MQTT 5 upstream delivered (a downlink) that travel on
/// to the devices: the ones a message carries end to end. Topic alias and subscription
/// identifiers belong to this connection and stay here.
fn downlink_properties(p: &PublishProperties) -> Option<Box<Properties>> {
    let props = Properties {
        user_properties: p.user_properties.clone(),
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
    };
    (props != Properties::default()).then(|| Box::new(props))
}

/// The wire value of a PUBACK reason code (rumqttc 0.25 keeps the encoder private).
pub fn puback_code(reason: PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// Why a 3.1.1 connection failed, as the `reason` label of `edgebridge_sink_errors_total`.
/// Every connection failure is retryable: the destination is at fault, never the data.
pub fn classify_v311(error: &rumqttc::ConnectionError) -> &'static str {
    use rumqttc::ConnectionError;
    match error {
        ConnectionError::Io(e) => io_reason(e),
        ConnectionError::Tls(_) => "tls",
        ConnectionError::ConnectionRefused(_) => "connack_refused",
        ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => "timeout",
        ConnectionError::MqttState(StateError::AwaitPingResp) => "ping_timeout",
        ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_) => "protocol",
        ConnectionError::RequestsDone => "closed",
        ConnectionError::Websocket(_)
        | ConnectionError::WsConnect(_)
        | ConnectionError::InvalidUrl(_)
        | ConnectionError::ResponseValidation(_) => "websocket",
    }
}

/// [`classify_v311`] for MQTT 5 connections; a DISCONNECT from the upstream is
/// `reason="disconnected"` (its code goes to [`LinkError::disconnect_code`]).
pub fn classify_v5(error: &v5::ConnectionError) -> &'static str {
    use v5::ConnectionError;
    match error {
        ConnectionError::Io(e) => io_reason(e),
        ConnectionError::Tls(_) => "tls",
        ConnectionError::ConnectionRefused(_) => "connack_refused",
        ConnectionError::Timeout(_) => "timeout",
        ConnectionError::MqttState(v5::StateError::AwaitPingResp) => "ping_timeout",
        ConnectionError::MqttState(v5::StateError::ServerDisconnect { .. }) => "disconnected",
        // rumqttc's v5 reader reports socket errors inside a decoding error.
        ConnectionError::MqttState(v5::StateError::Deserialization(v5::mqttbytes::Error::Io(
            e,
        )))
        | ConnectionError::MqttState(v5::StateError::Io(e)) => io_reason(e),
        ConnectionError::MqttState(v5::StateError::ConnectionAborted) => "io",
        ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_) => "protocol",
        ConnectionError::RequestsDone => "closed",
        ConnectionError::Websocket(_)
        | ConnectionError::WsConnect(_)
        | ConnectionError::InvalidUrl(_)
        | ConnectionError::ResponseValidation(_) => "websocket",
    }
}

fn io_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection_refused",
        ErrorKind::TimedOut => "timeout",
        _ => "io",
    }
}

fn error_v311(e: &rumqttc::ConnectionError) -> LinkError {
    LinkError {
        reason: classify_v311(e),
        detail: e.to_string(),
        disconnect_code: None,
    }
}

fn error_v5(e: &v5::ConnectionError) -> LinkError {
    let disconnect_code = match e {
        v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code, ..
        }) => Some(disconnect_code(*reason_code)),
        _ => None,
    };
    LinkError {
        reason: classify_v5(e),
        detail: e.to_string(),
        disconnect_code,
    }
}

/// The wire value of a DISCONNECT reason code (the enum's discriminant).
fn disconnect_code(code: DisconnectReasonCode) -> u8 {
    code as u8
}

/// One check of an endpoint (failover's probe of the primary): connects with `options`,
/// waits up to `timeout` for the CONNACK, and says DISCONNECT. `Ok` only for an accepted
/// connection.
pub async fn check(options: Options, timeout: Duration) -> Result<(), String> {
    let (client, mut events, task) = start(options, 4, None);
    let connack = async {
        match events.recv().await {
            Some(Ok(LinkEvent::ConnAck { .. })) => Ok(()),
            Some(Ok(other)) => Err(format!("{other:?} before CONNACK")),
            Some(Err(e)) => Err(e.detail),
            None => Err("the connection closed".into()),
        }
    };
    let result = tokio::time::timeout(timeout, connack)
        .await
        .unwrap_or_else(|_| Err(format!("no CONNACK within {timeout:?}")));
    if result.is_ok() && client.try_disconnect() {
        // Be polite: let the DISCONNECT be written (briefly) rather than drop the socket;
        // the event loop ends with the close.
        let closed = async { while let Some(Ok(_)) = events.recv().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
    }
    task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_failure_has_a_reason() {
        use rumqttc::{ConnectReturnCode, ConnectionError};
        let table = [
            (
                ConnectionError::Io(std::io::Error::from(ErrorKind::ConnectionRefused)),
                "connection_refused",
            ),
            (
                ConnectionError::Io(std::io::Error::from(ErrorKind::BrokenPipe)),
                "io",
            ),
            (ConnectionError::NetworkTimeout, "timeout"),
            (
                ConnectionError::MqttState(StateError::AwaitPingResp),
                "ping_timeout",
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                "connack_refused",
            ),
            (ConnectionError::RequestsDone, "closed"),
        ];
        for (error, reason) in table {
            assert_eq!(classify_v311(&error), reason, "{error}");
        }
    }

    #[test]
    fn mqtt5_failures_have_a_reason_and_a_disconnect_keeps_its_code() {
        let busy = v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::ServerBusy,
            reason_string: None,
        });
        let e = error_v5(&busy);
        assert_eq!(e.reason, "disconnected");
        assert_eq!(e.disconnect_code, Some(0x89));
        let too_large = v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::PacketTooLarge,
            reason_string: Some("too big".into()),
        });
        assert_eq!(error_v5(&too_large).disconnect_code, Some(0x95));
        let refused = v5::ConnectionError::Io(std::io::Error::from(ErrorKind::ConnectionRefused));
        assert_eq!(classify_v5(&refused), "connection_refused");
        assert_eq!(error_v5(&refused).disconnect_code, None);
        assert_eq!(
            classify_v5(&v5::ConnectionError::MqttState(
                v5::StateError::AwaitPingResp
            )),
            "ping_timeout"
        );
    }

    #[test]
    fn properties_carry_the_remaining_expiry_and_nothing_per_connection() {
        let props = Properties {
            user_properties: vec![("line".into(), "4".into())],
            content_type: Some("application/json".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
        };
        let p = publish_properties(Some(&props), Some(42)).expect("properties");
        assert_eq!(p.message_expiry_interval, Some(42));
        assert_eq!(p.user_properties, props.user_properties);
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.response_topic.as_deref(), Some("reply/here"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.topic_alias, None);
        assert!(publish_properties(None, None).is_none());
    }
}
