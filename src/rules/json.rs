//! The JSON payload of one message, parsed once and read by every rule.
//!
//! Input: the payload bytes ([`Json::parse`]). Output: the tree itself, read by the native
//! plans of simple expressions ([`super::native`]), the CEL value an expression sees
//! ([`Json::to_cel`], built only when the CEL interpreter runs) and JSON text
//! ([`Json`]'s `Serialize`, the same bytes as a CEL result with these values).
//!
//! Our own tree rather than `serde_json::Value`: numbers follow CEL's rules (`int`, `uint`
//! above i64, `double`) and every object is a plain map, whatever features of serde_json
//! other crates turn on (`raw_value` would read `{"$serde_json::private::RawValue": …}`
//! as something else).

use std::collections::{BTreeMap, HashMap};

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::Val;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Serialize, Serializer};

/// A JSON value with CEL's number types. Objects are sorted by key: the order in which
/// CEL results are written as JSON, and a later duplicate key wins as in a CEL map.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Json {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(String),
    List(Vec<Json>),
    Map(BTreeMap<String, Json>),
}

impl Json {
    /// The payload as JSON, or `None` when it is not JSON (serde_json's nesting limit of
    /// 128 applies: deeper JSON is not JSON).
    pub(super) fn parse(payload: &[u8]) -> Option<Json> {
        serde_json::from_slice(payload).ok()
    }

    /// The value as a CEL expression sees it.
    pub(super) fn to_cel(&self) -> Box<dyn Val + 'static> {
        match self {
            Json::Null => Box::new(CelNull),
            Json::Bool(b) => Box::new(CelBool::from(*b)),
            Json::Int(i) => Box::new(CelInt::from(*i)),
            Json::UInt(u) => Box::new(CelUInt::from(*u)),
            Json::Double(f) => Box::new(CelDouble::from(*f)),
            Json::Str(s) => Box::new(CelString::from(s.clone())),
            Json::List(items) => {
                let items: Vec<Box<dyn Val>> = items.iter().map(Json::to_cel).collect();
                Box::new(CelList::from(items))
            }
            Json::Map(map) => {
                let map: HashMap<CelMapKey<'static>, Box<dyn Val>> = map
                    .iter()
                    .map(|(k, v)| (CelMapKey::from(k.clone()), v.to_cel()))
                    .collect();
                Box::new(CelMap::from(map))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => Json::Int(i),
            Err(_) => Json::UInt(v),
        })
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Double(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Json::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Json::Map(out))
    }
}

/// Written as a CEL result with the same values is: integers as they are, NaN and
/// infinities refused, object keys in sorted order.
impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Int(i) => s.serialize_i64(*i),
            Json::UInt(u) => s.serialize_u64(*u),
            Json::Double(f) => serialize_double(*f, s),
            Json::Str(text) => s.serialize_str(text),
            Json::List(items) => s.collect_seq(items),
            Json::Map(map) => s.collect_map(map),
        }
    }
}

/// A double as JSON: serde_json would write NaN and infinities as `null`; refuse them.
pub(super) fn serialize_double<S: Serializer>(f: f64, s: S) -> Result<S::Ok, S::Error> {
    if f.is_finite() {
        s.serialize_f64(f)
    } else {
        Err(serde::ser::Error::custom(format!(
            "{f} cannot be written as JSON"
        )))
    }
}
