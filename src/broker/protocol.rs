//! MQTT framing for device connections: which codec a connection speaks, and the checks
//! and rewrites around rumqttd's `V4`/`V5` codecs that keep their known failure modes
//! (ARCHITECTURE.md, section 7) unreachable.
//!
//! - MQTT 3.1 (`MQIsdp`, level 3) CONNECTs are rewritten to 3.1.1 before parsing
//!   (rumqttd's reader refuses them; the rest of 3.1 is 3.1.1's wire format);
//! - packets a device must never send (CONNACK, SUBACK, UNSUBACK, PINGRESP, AUTH, a
//!   second CONNECT) are refused by type before a reader sees them;
//! - 3.1.1 connections are written 3.1.1-valid packets only: properties stripped, v5-only
//!   codes mapped down;
//! - any codec panic is caught and ends that one connection.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::{BufMut, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Error, Packet, Protocol, PublishProperties, SubscribeReasonCode,
};

use crate::message::Properties;

/// Longest client id accepted.
pub const MAX_CLIENT_ID_LEN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 and 3.1.1.
    V4,
    V5,
}

pub fn valid_client_id(id: &str) -> bool {
    id.len() <= MAX_CLIENT_ID_LEN
        && !id
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/' | '$') || c.is_control())
}

/// Packet types a device never sends (rumqttd's v5 reader hits `unreachable!()` on some).
pub fn server_only(packet_type: u8) -> bool {
    matches!(packet_type, 0 | 2 | 9 | 11 | 13 | 15)
}

/// The protocol name and level of a complete CONNECT frame.
pub fn connect_level(frame: &[u8], fixed_header_len: usize) -> Option<(&[u8], u8)> {
    let vh = frame.get(fixed_header_len..)?;
    let name_len = u16::from_be_bytes([*vh.first()?, *vh.get(1)?]) as usize;
    let name = vh.get(2..2 + name_len)?;
    Some((name, *vh.get(2 + name_len)?))
}

/// QoS and packet id of a complete PUBLISH frame (rumqttd keeps them crate-private).
pub fn publish_qos_pkid(frame: &[u8], fixed_header_len: usize) -> Option<(u8, u16)> {
    let qos = (frame.first()? >> 1) & 0b11;
    if qos == 0 {
        return Some((0, 0));
    }
    let vh = frame.get(fixed_header_len..)?;
    let topic_len = u16::from_be_bytes([*vh.first()?, *vh.get(1)?]) as usize;
    let pkid = u16::from_be_bytes([*vh.get(2 + topic_len)?, *vh.get(3 + topic_len)?]);
    Some((qos, pkid))
}

/// A 3.1 CONNECT frame (`MQIsdp`, level 3) as the same CONNECT in 3.1.1.
pub fn connect_31_as_311(frame: &[u8], fixed_header_len: usize) -> Option<BytesMut> {
    let vh = frame.get(fixed_header_len..)?;
    // "MQIsdp" (2 + 6 bytes) + level → "MQTT" (2 + 4) + level 4.
    let rest = vh.get(2 + 6 + 1..)?;
    let remaining = 2 + 4 + 1 + rest.len();
    let mut out = BytesMut::with_capacity(remaining + 5);
    out.put_u8(0x10);
    v4::write_remaining_length(&mut out, remaining).ok()?;
    out.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
    out.extend_from_slice(rest);
    Some(out)
}

/// Reads one packet with `version`'s codec; a codec panic is a malformed packet.
pub fn read(version: Version, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
    let result = catch_unwind(AssertUnwindSafe(|| match version {
        Version::V4 => V4.read_mut(stream, max_size),
        Version::V5 => V5.read_mut(stream, max_size),
    }));
    result.unwrap_or_else(|_| {
        // The frame may be half consumed: nothing more is parsed.
        stream.clear();
        Err(Error::MalformedPacket)
    })
}

/// Encodes `packet` for a connection of `version` (3.1.1 gets 3.1.1-valid packets only).
pub fn write(version: Version, packet: Packet, out: &mut BytesMut) -> Result<(), Error> {
    let result = catch_unwind(AssertUnwindSafe(|| match version {
        Version::V5 => match packet {
            Packet::ConnAck(mut ack, props) => {
                ack.code = v5_connack_code(ack.code);
                V5.write(Packet::ConnAck(ack, props), out)
            }
            other => V5.write(other, out),
        },
        Version::V4 => V4.write(strip_properties(packet), out),
    }));
    match result {
        Ok(r) => r.map(drop),
        Err(_) => Err(Error::MalformedPacket),
    }
}

/// CONNACK codes MQTT 3.1.1 can carry.
pub fn v4_connack_code(code: ConnectReturnCode) -> ConnectReturnCode {
    use ConnectReturnCode::*;
    match code {
        Success
        | RefusedProtocolVersion
        | ClientIdentifierNotValid
        | ServiceUnavailable
        | BadUserNamePassword
        | NotAuthorized => code,
        UnsupportedProtocolVersion => RefusedProtocolVersion,
        Banned | BadAuthenticationMethod => NotAuthorized,
        _ => ServiceUnavailable,
    }
}

/// CONNACK codes rumqttd's v5 writer can carry (3.1.1-only codes hit `unreachable!()`).
pub fn v5_connack_code(code: ConnectReturnCode) -> ConnectReturnCode {
    use ConnectReturnCode::*;
    match code {
        RefusedProtocolVersion => UnsupportedProtocolVersion,
        ServiceUnavailable => ServerUnavailable,
        other => other,
    }
}

fn v4_suback_code(code: SubscribeReasonCode) -> SubscribeReasonCode {
    use SubscribeReasonCode::*;
    match code {
        QoS0 | QoS1 | QoS2 | Success(_) | Failure => code,
        _ => Failure,
    }
}

/// The message properties intake keeps (rules and MQTT sinks pass them on).
pub fn properties_of(p: &PublishProperties) -> Option<Box<Properties>> {
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

/// The PUBLISH properties of a message published into the router by the gateway itself
/// (a downlink); user properties named like edgebridge's marks are left out.
pub fn publish_properties(p: &Properties) -> PublishProperties {
    PublishProperties {
        user_properties: p
            .user_properties
            .iter()
            .filter(|(k, _)| !super::links::is_mark(k))
            .cloned()
            .collect(),
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        ..Default::default()
    }
}

fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::ConnAck(ack, _) => Packet::ConnAck(
            ConnAck {
                session_present: ack.session_present,
                code: v4_connack_code(ack.code),
            },
            None,
        ),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(mut p, _) => {
            p.return_codes = p.return_codes.into_iter().map(v4_suback_code).collect();
            Packet::SubAck(p, None)
        }
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_rules() {
        assert!(valid_client_id("dev-1_A.b"));
        assert!(valid_client_id(""));
        for bad in ["dev/1", "a+b", "a#", "$sys", "a\nb"] {
            assert!(!valid_client_id(bad), "{bad:?}");
        }
        assert!(!valid_client_id(&"x".repeat(MAX_CLIENT_ID_LEN + 1)));
    }

    #[test]
    fn reads_protocol_level_and_publish_header() {
        // CONNECT, remaining length 12: "MQTT", level 5, flags, keep-alive.
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0];
        assert_eq!(connect_level(&connect, 2), Some((&b"MQTT"[..], 5)));
        assert_eq!(connect_level(&connect[..5], 2), None);
        // PUBLISH QoS 1, topic "a/b", pkid 0x0102.
        let publish = [0x32, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'h', b'i'];
        assert_eq!(publish_qos_pkid(&publish, 2), Some((1, 0x0102)));
        assert_eq!(publish_qos_pkid(&[0x30, 2, 0, 0], 2), Some((0, 0)));
        assert_eq!(publish_qos_pkid(&[0x32, 2, 0, 9], 2), None);
    }

    #[test]
    fn a_31_connect_reads_as_311() {
        // "MQIsdp" level 3, clean session, keep-alive 60, client id "p7".
        let mut frame = vec![0x10, 16, 0, 6];
        frame.extend_from_slice(b"MQIsdp");
        frame.extend_from_slice(&[3, 2, 0, 60, 0, 2, b'p', b'7']);
        let mut rewritten = connect_31_as_311(&frame, 2).expect("rewritten");
        match read(Version::V4, &mut rewritten, 1024) {
            Ok(Packet::Connect(c, ..)) => {
                assert_eq!(c.client_id, "p7");
                assert_eq!(c.keep_alive, 60);
                assert!(c.clean_session);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v5_only_codes_map_to_v4_codes() {
        use ConnectReturnCode::*;
        assert_eq!(v4_connack_code(ServerBusy), ServiceUnavailable);
        assert_eq!(v4_connack_code(QuotaExceeded), ServiceUnavailable);
        assert_eq!(v4_connack_code(Banned), NotAuthorized);
        assert_eq!(
            v4_connack_code(ClientIdentifierNotValid),
            ClientIdentifierNotValid
        );
        let mut out = BytesMut::new();
        let ack = rumqttd::protocol::SubAck {
            pkid: 3,
            return_codes: vec![
                SubscribeReasonCode::QoS1,
                SubscribeReasonCode::NotAuthorized,
            ],
        };
        write(Version::V4, Packet::SubAck(ack, None), &mut out).expect("write");
        assert_eq!(&out[..], [0x90, 4, 0, 3, 1, 0x80]);
    }
}
