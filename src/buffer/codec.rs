//! The on-disk encoding of one buffer record (see [`super::disk`] for the log around it).
//!
//! ```text
//! header (12 bytes, little endian):
//!   magic u32 = 0x45425231 ("EBR1")   body_len u32   crc32c(body) u32
//! body:
//!   seq u64   received_at u64 (ms)   qos u8   flags u8 (bit0 retain, bit1 has_properties)
//!   topic_len u16 + topic (UTF-8)
//!   [properties, when flag bit1:
//!      user_properties: count u16, then (klen u16, key, vlen u16, value)*
//!      content_type, response_topic: len u16 + UTF-8, len 0xFFFF = absent
//!      correlation_data: len u32 + bytes, len u32::MAX = absent
//!      payload_format_indicator: present u8 + value u8
//!      message_expiry_interval: present u8 + value u32]
//!   payload_len u32 + payload
//! ```
//!
//! Encoding refuses what the format cannot hold (a string of 64 KiB or more, ...) with an
//! [`EncodeError`]; decoding checks every length against the bytes it has and returns a
//! [`DecodeError`] for anything that does not parse exactly, so no input can make it panic
//! or allocate more than the body it was given.

use bytes::Bytes;

use crate::message::{Message, Properties};

/// First four bytes of every record (written little endian).
pub const MAGIC: u32 = 0x4542_5231;
/// magic + body_len + crc.
pub const HEADER_LEN: usize = 12;

const FLAG_RETAIN: u8 = 1;
const FLAG_PROPERTIES: u8 = 2;
/// Length marker of an absent optional string.
const ABSENT_STR: u16 = u16::MAX;
/// Length marker of absent correlation data.
const ABSENT_BYTES: u32 = u32::MAX;

/// A message the record format cannot represent: the caller should treat it as
/// undeliverable (dead letter), not retry it.
#[derive(Debug, thiserror::Error)]
#[error("{field} too large for a buffer record: {len} (at most {max})")]
pub struct EncodeError {
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
}

/// Bytes that are not a valid record body (the crc matched but the content does not
/// parse): the record is counted as corrupt and skipped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt record: {0}")]
pub struct DecodeError(pub &'static str);

/// The fixed-size header in front of every body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub body_len: u32,
    pub crc: u32,
}

impl Header {
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Header {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Header {
            magic: word(0),
            body_len: word(4),
            crc: word(8),
        }
    }
}

/// Appends the framed record (header + body) for `msg` with sequence number `seq` to `out`.
/// On error `out` is left as it was.
pub fn encode(seq: u64, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let result = encode_framed(seq, msg, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_framed(seq: u64, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if msg.qos > 2 {
        return Err(EncodeError {
            field: "qos",
            len: usize::from(msg.qos),
            max: 2,
        });
    }
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let body_start = out.len();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&msg.received_at.to_le_bytes());
    out.push(msg.qos);
    let mut flags = 0;
    if msg.retain {
        flags |= FLAG_RETAIN;
    }
    if msg.properties.is_some() {
        flags |= FLAG_PROPERTIES;
    }
    out.push(flags);
    put_str16(out, "topic", &msg.topic, u16::MAX as usize)?;
    if let Some(props) = &msg.properties {
        put_properties(out, props)?;
    }
    put_len32(out, "payload", msg.payload.len(), u32::MAX as usize)?;
    out.extend_from_slice(&msg.payload);

    let body = &out[body_start..];
    let body_len = u32::try_from(body.len()).map_err(|_| EncodeError {
        field: "record",
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&MAGIC.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&body_len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn put_properties(out: &mut Vec<u8>, props: &Properties) -> Result<(), EncodeError> {
    let count = u16::try_from(props.user_properties.len()).map_err(|_| EncodeError {
        field: "user_properties (count)",
        len: props.user_properties.len(),
        max: u16::MAX as usize,
    })?;
    out.extend_from_slice(&count.to_le_bytes());
    for (key, value) in &props.user_properties {
        put_str16(out, "user property key", key, u16::MAX as usize)?;
        put_str16(out, "user property value", value, u16::MAX as usize)?;
    }
    put_opt_str16(out, "content_type", props.content_type.as_deref())?;
    put_opt_str16(out, "response_topic", props.response_topic.as_deref())?;
    match &props.correlation_data {
        Some(data) => {
            put_len32(
                out,
                "correlation_data",
                data.len(),
                ABSENT_BYTES as usize - 1,
            )?;
            out.extend_from_slice(data);
        }
        None => out.extend_from_slice(&ABSENT_BYTES.to_le_bytes()),
    }
    let pfi = props.payload_format_indicator;
    out.push(u8::from(pfi.is_some()));
    out.push(pfi.unwrap_or(0));
    let expiry = props.message_expiry_interval;
    out.push(u8::from(expiry.is_some()));
    out.extend_from_slice(&expiry.unwrap_or(0).to_le_bytes());
    Ok(())
}

fn put_str16(
    out: &mut Vec<u8>,
    field: &'static str,
    s: &str,
    max: usize,
) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len())
        .ok()
        .filter(|&l| l as usize <= max)
        .ok_or(EncodeError {
            field,
            len: s.len(),
            max,
        })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_opt_str16(
    out: &mut Vec<u8>,
    field: &'static str,
    s: Option<&str>,
) -> Result<(), EncodeError> {
    match s {
        Some(s) => put_str16(out, field, s, ABSENT_STR as usize - 1),
        None => {
            out.extend_from_slice(&ABSENT_STR.to_le_bytes());
            Ok(())
        }
    }
}

fn put_len32(
    out: &mut Vec<u8>,
    field: &'static str,
    len: usize,
    max: usize,
) -> Result<(), EncodeError> {
    let value = u32::try_from(len)
        .ok()
        .filter(|&l| l as usize <= max)
        .ok_or(EncodeError { field, len, max })?;
    out.extend_from_slice(&value.to_le_bytes());
    Ok(())
}

/// The sequence number at the start of a body, if the body is long enough to hold one.
pub fn body_seq(body: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Decodes a whole body (whose crc the caller has verified). The payload and correlation
/// data are slices of `body`, not copies.
pub fn decode(body: Bytes) -> Result<(u64, Message), DecodeError> {
    let mut r = Reader {
        body: &body,
        pos: 0,
    };
    let seq = r.u64()?;
    let received_at = r.u64()?;
    let qos = r.u8()?;
    if qos > 2 {
        return Err(DecodeError("qos above 2"));
    }
    let flags = r.u8()?;
    if flags & !(FLAG_RETAIN | FLAG_PROPERTIES) != 0 {
        return Err(DecodeError("unknown flag bits"));
    }
    let topic = r.string16("topic")?;
    let properties = if flags & FLAG_PROPERTIES != 0 {
        Some(Box::new(read_properties(&mut r, &body)?))
    } else {
        None
    };
    let payload_len = r.u32()? as usize;
    let payload_range = r.skip(payload_len, "payload")?;
    if r.pos != body.len() {
        return Err(DecodeError("trailing bytes after the payload"));
    }
    let msg = Message {
        topic,
        payload: body.slice(payload_range),
        qos,
        retain: flags & FLAG_RETAIN != 0,
        properties,
        received_at,
    };
    Ok((seq, msg))
}

fn read_properties(r: &mut Reader<'_>, body: &Bytes) -> Result<Properties, DecodeError> {
    let count = r.u16()?;
    // Each pair takes at least 4 bytes: refuse counts the body cannot hold before
    // reserving memory for them.
    if usize::from(count) * 4 > r.remaining() {
        return Err(DecodeError("user property count beyond the body"));
    }
    let mut user_properties = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let key = r.string16("user property key")?;
        let value = r.string16("user property value")?;
        user_properties.push((key, value));
    }
    let content_type = r.opt_string16("content_type")?;
    let response_topic = r.opt_string16("response_topic")?;
    let correlation_data = match r.u32()? {
        ABSENT_BYTES => None,
        len => Some(body.slice(r.skip(len as usize, "correlation_data")?)),
    };
    let payload_format_indicator = r.optional(|r| r.u8())?;
    let message_expiry_interval = r.optional(|r| r.u32())?;
    Ok(Properties {
        user_properties,
        content_type,
        response_topic,
        correlation_data,
        payload_format_indicator,
        message_expiry_interval,
    })
}

/// Bounds-checked little-endian reads over a body.
struct Reader<'a> {
    body: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    /// Consumes `len` bytes and returns their range in the body.
    fn skip(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<std::ops::Range<usize>, DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError(what));
        }
        let range = self.pos..self.pos + len;
        self.pos += len;
        Ok(range)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let range = self.skip(N, "truncated field")?;
        let mut out = [0; N];
        out.copy_from_slice(&self.body[range]);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    fn utf8(&mut self, len: usize, what: &'static str) -> Result<String, DecodeError> {
        let range = self.skip(len, what)?;
        std::str::from_utf8(&self.body[range])
            .map(str::to_owned)
            .map_err(|_| DecodeError(what))
    }

    fn string16(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u16()?;
        self.utf8(usize::from(len), what)
    }

    fn opt_string16(&mut self, what: &'static str) -> Result<Option<String>, DecodeError> {
        match self.u16()? {
            ABSENT_STR => Ok(None),
            len => self.utf8(usize::from(len), what).map(Some),
        }
    }

    /// A presence byte (0 or 1) followed by a value that is always there.
    fn optional<T>(
        &mut self,
        value: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        let present = self.u8()?;
        let v = value(self)?;
        match present {
            0 => Ok(None),
            1 => Ok(Some(v)),
            _ => Err(DecodeError("presence byte is neither 0 nor 1")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body_of(framed: &[u8]) -> Bytes {
        Bytes::copy_from_slice(&framed[HEADER_LEN..])
    }

    fn full_message() -> Message {
        Message {
            topic: "factory/line-1/press/telemetry".into(),
            payload: Bytes::from_static(&[0, 159, 146, 150, 255, 0, 1]),
            qos: 1,
            retain: true,
            properties: Some(Box::new(Properties {
                user_properties: vec![("k".into(), "v".into()), (String::new(), "ü".into())],
                content_type: Some("application/octet-stream".into()),
                response_topic: Some(String::new()),
                correlation_data: Some(Bytes::from_static(&[1, 2, 3, 0xff])),
                payload_format_indicator: Some(0),
                message_expiry_interval: Some(u32::MAX),
            })),
            received_at: 1_700_000_000_123,
        }
    }

    #[test]
    fn round_trip_with_properties_and_binary_payload() {
        for msg in [
            full_message(),
            Message {
                properties: Some(Box::default()),
                ..full_message()
            },
            Message {
                properties: None,
                retain: false,
                qos: 0,
                payload: Bytes::new(),
                topic: String::new(),
                ..full_message()
            },
        ] {
            let mut out = Vec::new();
            encode(42, &msg, &mut out).unwrap();
            let header = Header::parse(out[..HEADER_LEN].try_into().unwrap());
            assert_eq!(header.magic, MAGIC);
            assert_eq!(header.body_len as usize, out.len() - HEADER_LEN);
            assert_eq!(header.crc, crc32c::crc32c(&out[HEADER_LEN..]));
            assert_eq!(body_seq(&out[HEADER_LEN..]), Some(42));
            assert_eq!(decode(body_of(&out)).unwrap(), (42, msg));
        }
    }

    #[test]
    fn magic_spells_ebr1() {
        assert_eq!(&MAGIC.to_be_bytes(), b"EBR1");
    }

    #[test]
    fn encoding_refuses_what_the_format_cannot_hold_and_leaves_out_untouched() {
        let mut out = vec![7];
        let long = "x".repeat(usize::from(u16::MAX));
        let msg = Message {
            properties: Some(Box::new(Properties {
                content_type: Some(long.clone()),
                ..Properties::default()
            })),
            ..full_message()
        };
        let err = encode(1, &msg, &mut out).unwrap_err();
        assert_eq!(err.field, "content_type");
        assert_eq!(out, [7]);
        // The same length is fine where no absent marker is needed.
        let msg = Message {
            topic: long,
            properties: None,
            ..full_message()
        };
        encode(1, &msg, &mut out).unwrap();
    }

    #[test]
    fn invalid_utf8_topic_and_trailing_bytes_are_corrupt() {
        let mut out = Vec::new();
        encode(1, &full_message(), &mut out).unwrap();
        let mut body = out[HEADER_LEN..].to_vec();
        body[20] = 0xff; // first topic byte (seq 8 + time 8 + qos + flags + len 2)
        assert!(decode(Bytes::from(body)).is_err());
        let mut body = out[HEADER_LEN..].to_vec();
        body.push(0);
        assert!(decode(Bytes::from(body)).is_err());
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let props = (
            proptest::collection::vec((".{0,5}", ".{0,5}"), 0..3),
            proptest::option::of(".{0,8}"),
            proptest::option::of(".{0,8}"),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(user, ct, rt, cd, pfi, exp)| Properties {
                user_properties: user,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd.map(Bytes::from),
                payload_format_indicator: pfi,
                message_expiry_interval: exp,
            });
        (
            ".{0,20}",
            proptest::collection::vec(any::<u8>(), 0..64),
            0u8..=2,
            any::<bool>(),
            proptest::option::of(props),
            any::<u64>(),
        )
            .prop_map(|(topic, payload, qos, retain, props, at)| Message {
                topic,
                payload: Bytes::from(payload),
                qos,
                retain,
                properties: props.map(Box::new),
                received_at: at,
            })
    }

    proptest! {
        #[test]
        fn any_message_round_trips(seq in any::<u64>(), msg in arb_message()) {
            let mut out = Vec::new();
            encode(seq, &msg, &mut out).unwrap();
            prop_assert_eq!(decode(body_of(&out)).unwrap(), (seq, msg));
        }

        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Bytes::from(bytes));
        }

        #[test]
        fn decoding_a_mutated_record_never_panics(
            msg in arb_message(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut out = Vec::new();
            encode(1, &msg, &mut out).unwrap();
            let mut body = out[HEADER_LEN..].to_vec();
            for (at, byte) in flips {
                let i = at.index(body.len());
                body[i] ^= byte;
            }
            let _ = decode(Bytes::from(body));
        }
    }
}
