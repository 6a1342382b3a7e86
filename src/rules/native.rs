//! Native plans for the simplest rule expressions: answered without the CEL interpreter.
//!
//! Most conditions compare a payload field, a topic level or a message property with a
//! literal (`payload.temperature > 80.0`, `levels[1] == payload.line && qos > 0`); most
//! transforms copy such values into a new JSON object (`{"t": payload.temperature, "at":
//! received_at}`). At load, [`Native::compile`] recognises these shapes in the AST the
//! CEL parser built. Per message, the plan reads the parsed payload ([`Json`]) and the
//! message directly, with CEL's rules for comparing and writing values.
//!
//! A plan only ever answers with a *result*: wherever CEL would fail (a missing field, a
//! type mismatch, a payload that is not JSON) it gives up (`None`) and the caller runs
//! the CEL program, which fails exactly as it always did, with the same error. The tests
//! at the bottom run many expressions over many payloads both ways and require the same
//! outcome.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

use cel::common::ast::{operators, EntryExpr, Expr as Ast, IdedExpr, LiteralValue};
use serde::ser::{Error as _, SerializeMap};
use serde::{Serialize, Serializer};

use super::json::{serialize_double, Json};
use super::vars::MessageVars;

/// A compiled native plan.
#[derive(Debug)]
pub(super) struct Native(Plan);

#[derive(Debug)]
enum Plan {
    Condition(Cond),
    /// Always a map or list literal: its result is written as JSON.
    Transform(Out),
}

impl Native {
    /// The native plan of `expr`, when every part of it has one. `transform` says whether
    /// it is a `payload` transform or a `where` condition.
    pub(super) fn compile(expr: &IdedExpr, transform: bool) -> Option<Native> {
        if transform {
            match &expr.expr {
                Ast::Map(_) | Ast::List(_) => out(expr).map(|o| Native(Plan::Transform(o))),
                _ => None,
            }
        } else {
            condition(expr).map(|c| Native(Plan::Condition(c)))
        }
    }

    /// The condition's result, or `None` when CEL must decide (or this is a transform).
    pub(super) fn matches(&self, vars: &MessageVars<'_>) -> Option<bool> {
        match &self.0 {
            Plan::Condition(c) => c.eval(vars),
            Plan::Transform(_) => None,
        }
    }

    /// The transform's JSON, or `None` when CEL must decide (or this is a condition).
    pub(super) fn transform(&self, vars: &MessageVars<'_>) -> Option<Vec<u8>> {
        match &self.0 {
            Plan::Transform(o) => {
                let mut buf = Vec::with_capacity(128);
                serde_json::to_writer(&mut buf, &Emit { out: o, vars }).ok()?;
                Some(buf)
            }
            Plan::Condition(_) => None,
        }
    }
}

/// One step down the payload: `.field` / `["field"]`, or `[index]` into a list.
#[derive(Debug)]
enum Step {
    Field(String),
    Index(usize),
}

/// Something a condition compares or a transform copies.
#[derive(Debug)]
enum Operand {
    /// A literal of the expression (a JSON scalar).
    Literal(Json),
    /// `payload` and the steps below it.
    Payload(Vec<Step>),
    Topic,
    Level(usize),
    ClientId,
    GatewayId,
    Qos,
    Retain,
    ReceivedAt,
    PayloadText,
    PayloadBytes,
    /// `size(x)` or `x.size()`.
    Size(Box<Operand>),
}

#[derive(Debug, Clone, Copy)]
enum Compare {
    Less,
    LessEquals,
    Greater,
    GreaterEquals,
}

#[derive(Debug, Clone, Copy)]
enum TextTest {
    StartsWith,
    EndsWith,
    Contains,
}

/// A condition made of comparisons, `has()`, string tests and `&&`, `||`, `!`.
#[derive(Debug)]
enum Cond {
    /// An operand that must be a bool.
    Value(Operand),
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    /// `==`, or `!=` when `negated`.
    Equals {
        left: Operand,
        right: Operand,
        negated: bool,
    },
    Compare(Operand, Compare, Operand),
    /// `has(payload….field)`.
    Has(Vec<Step>, String),
    Text(TextTest, Operand, Operand),
}

/// A transform's value: map and list literals of operands and conditions.
#[derive(Debug)]
enum Out {
    Value(Operand),
    Condition(Cond),
    /// Sorted by key: the order in which a CEL map is written as JSON.
    Map(Vec<(String, Out)>),
    List(Vec<Out>),
}

fn literal(l: &LiteralValue) -> Option<Json> {
    Some(match l {
        LiteralValue::Null => Json::Null,
        LiteralValue::Boolean(b) => Json::Bool(*b.inner()),
        LiteralValue::Int(i) => Json::Int(*i.inner()),
        LiteralValue::UInt(u) => Json::UInt(*u.inner()),
        LiteralValue::Double(d) => Json::Double(*d.inner()),
        LiteralValue::String(s) => Json::Str(s.inner().to_string()),
        LiteralValue::Bytes(_) => return None,
    })
}

fn operand(e: &IdedExpr) -> Option<Operand> {
    match &e.expr {
        Ast::Literal(l) => literal(l).map(Operand::Literal),
        Ast::Ident(name) => Some(match name.as_str() {
            "payload" => Operand::Payload(Vec::new()),
            "topic" => Operand::Topic,
            "client_id" => Operand::ClientId,
            "gateway_id" => Operand::GatewayId,
            "qos" => Operand::Qos,
            "retain" => Operand::Retain,
            "received_at" => Operand::ReceivedAt,
            "payload_text" => Operand::PayloadText,
            "payload_bytes" => Operand::PayloadBytes,
            _ => return None,
        }),
        Ast::Select(s) if !s.test => match operand(&s.operand)? {
            Operand::Payload(mut steps) => {
                steps.push(Step::Field(s.field.clone()));
                Some(Operand::Payload(steps))
            }
            _ => None,
        },
        Ast::Call(c) => match (c.func_name.as_str(), &c.target, c.args.as_slice()) {
            (operators::INDEX, None, [base, index]) => {
                let Ast::Literal(index) = &index.expr else {
                    return None;
                };
                if matches!(&base.expr, Ast::Ident(name) if name == "levels") {
                    return match index {
                        LiteralValue::Int(i) => {
                            usize::try_from(*i.inner()).ok().map(Operand::Level)
                        }
                        _ => None,
                    };
                }
                let Operand::Payload(mut steps) = operand(base)? else {
                    return None;
                };
                steps.push(match index {
                    LiteralValue::String(s) => Step::Field(s.inner().to_string()),
                    LiteralValue::Int(i) => Step::Index(usize::try_from(*i.inner()).ok()?),
                    _ => return None,
                });
                Some(Operand::Payload(steps))
            }
            ("size", None, [x]) => Some(Operand::Size(Box::new(operand(x)?))),
            ("size", Some(x), []) => Some(Operand::Size(Box::new(operand(x)?))),
            _ => None,
        },
        _ => None,
    }
}

fn condition(e: &IdedExpr) -> Option<Cond> {
    let boxed = |e| condition(e).map(Box::new);
    match &e.expr {
        Ast::Select(s) if s.test => match operand(&s.operand)? {
            Operand::Payload(steps) => Some(Cond::Has(steps, s.field.clone())),
            _ => None,
        },
        Ast::Call(c) => match (c.func_name.as_str(), &c.target, c.args.as_slice()) {
            (operators::LOGICAL_AND, None, [a, b]) => Some(Cond::And(boxed(a)?, boxed(b)?)),
            (operators::LOGICAL_OR, None, [a, b]) => Some(Cond::Or(boxed(a)?, boxed(b)?)),
            (operators::LOGICAL_NOT, None, [a]) => Some(Cond::Not(boxed(a)?)),
            (operators::EQUALS | operators::NOT_EQUALS, None, [a, b]) => Some(Cond::Equals {
                left: operand(a)?,
                right: operand(b)?,
                negated: c.func_name == operators::NOT_EQUALS,
            }),
            (op, None, [a, b]) => {
                let op = match op {
                    operators::LESS => Compare::Less,
                    operators::LESS_EQUALS => Compare::LessEquals,
                    operators::GREATER => Compare::Greater,
                    operators::GREATER_EQUALS => Compare::GreaterEquals,
                    _ => return operand(e).map(Cond::Value),
                };
                Some(Cond::Compare(operand(a)?, op, operand(b)?))
            }
            (test, Some(target), [arg]) => {
                let test = match test {
                    "startsWith" => TextTest::StartsWith,
                    "endsWith" => TextTest::EndsWith,
                    "contains" => TextTest::Contains,
                    _ => return None,
                };
                Some(Cond::Text(test, operand(target)?, operand(arg)?))
            }
            _ => operand(e).map(Cond::Value),
        },
        _ => operand(e).map(Cond::Value),
    }
}

fn out(e: &IdedExpr) -> Option<Out> {
    match &e.expr {
        Ast::Map(map) => {
            let mut entries = Vec::with_capacity(map.entries.len());
            let mut keys = HashSet::new();
            for entry in &map.entries {
                let EntryExpr::MapEntry(entry) = &entry.expr else {
                    return None;
                };
                let Ast::Literal(LiteralValue::String(key)) = &entry.key.expr else {
                    return None;
                };
                // A duplicate key is CEL's to report.
                if entry.optional || !keys.insert(key.inner()) {
                    return None;
                }
                entries.push((key.inner().to_string(), out(&entry.value)?));
            }
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            Some(Out::Map(entries))
        }
        Ast::List(list) if list.optional_indices.is_empty() => list
            .elements
            .iter()
            .map(out)
            .collect::<Option<_>>()
            .map(Out::List),
        _ => operand(e)
            .map(Out::Value)
            .or_else(|| condition(e).map(Out::Condition)),
    }
}

/// A value as a plan sees it: borrowed from the message, the payload or the plan.
#[derive(Debug)]
enum Value<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Double(f64),
    Str(Cow<'a, str>),
    Bytes(&'a [u8]),
    List(&'a [Json]),
    Map(&'a BTreeMap<String, Json>),
}

impl<'a> Value<'a> {
    fn of_json(j: &'a Json) -> Value<'a> {
        match j {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(i) => Value::Int(*i),
            Json::UInt(u) => Value::UInt(*u),
            Json::Double(f) => Value::Double(*f),
            Json::Str(s) => Value::Str(Cow::Borrowed(s)),
            Json::List(items) => Value::List(items),
            Json::Map(map) => Value::Map(map),
        }
    }

    fn is_number(&self) -> bool {
        matches!(self, Value::Int(_) | Value::UInt(_) | Value::Double(_))
    }
}

/// The payload value at `steps`, when each step exists: a field of an object, an index
/// within a list. Anything else (missing, not JSON, not a container) is CEL's to report.
fn payload_at<'a>(vars: &'a MessageVars<'_>, steps: &[Step]) -> Option<Value<'a>> {
    let Some(mut json) = vars.json() else {
        // Not JSON: CEL sees the text, or the bytes, and has no fields.
        if !steps.is_empty() {
            return None;
        }
        let payload = vars.payload_bytes();
        return Some(match std::str::from_utf8(payload) {
            Ok(text) => Value::Str(Cow::Borrowed(text)),
            Err(_) => Value::Bytes(payload),
        });
    };
    for step in steps {
        json = match (step, json) {
            (Step::Field(name), Json::Map(map)) => map.get(name)?,
            (Step::Index(i), Json::List(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    Some(Value::of_json(json))
}

impl Operand {
    fn eval<'a>(&'a self, vars: &'a MessageVars<'_>) -> Option<Value<'a>> {
        Some(match self {
            Operand::Literal(l) => Value::of_json(l),
            Operand::Payload(steps) => return payload_at(vars, steps),
            Operand::Topic => Value::Str(Cow::Borrowed(vars.topic())),
            Operand::Level(i) => Value::Str(Cow::Borrowed(vars.topic().split('/').nth(*i)?)),
            Operand::ClientId => Value::Str(Cow::Borrowed(vars.client_id())),
            Operand::GatewayId => Value::Str(Cow::Borrowed(vars.gateway_id())),
            Operand::Qos => Value::Int(vars.qos()),
            Operand::Retain => Value::Bool(vars.retain()),
            Operand::ReceivedAt => Value::Int(vars.received_at()),
            Operand::PayloadText => Value::Str(String::from_utf8_lossy(vars.payload_bytes())),
            Operand::PayloadBytes => Value::Bytes(vars.payload_bytes()),
            Operand::Size(x) => {
                let size = match x.eval(vars)? {
                    // CEL counts the characters of a string, the bytes of bytes.
                    Value::Str(s) => s.chars().count(),
                    Value::Bytes(b) => b.len(),
                    Value::List(items) => items.len(),
                    Value::Map(map) => map.len(),
                    _ => return None,
                };
                Value::Int(i64::try_from(size).ok()?)
            }
        })
    }
}

/// CEL's ordering of two values: numbers of any type with one another (an int against a
/// double as doubles, an int against a uint exactly), strings, bools. `None` for anything
/// CEL refuses to compare.
fn compare(a: &Value<'_>, b: &Value<'_>) -> Option<Ordering> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::UInt(x), Value::UInt(y)) => Some(x.cmp(y)),
        (Value::Int(x), Value::UInt(y)) => Some(
            u64::try_from(*x)
                .map(|x| x.cmp(y))
                .unwrap_or(Ordering::Less),
        ),
        (Value::UInt(x), Value::Int(y)) => Some(
            i64::try_from(*x)
                .map(|x| x.cmp(y))
                .unwrap_or(Ordering::Greater),
        ),
        (Value::Double(x), Value::Double(y)) => x.partial_cmp(y),
        (Value::Int(x), Value::Double(y)) => (*x as f64).partial_cmp(y),
        (Value::UInt(x), Value::Double(y)) => (*x as f64).partial_cmp(y),
        (Value::Double(x), Value::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Value::Double(x), Value::UInt(y)) => x.partial_cmp(&(*y as f64)),
        (Value::Str(x), Value::Str(y)) => Some(x.as_ref().cmp(y.as_ref())),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// CEL's `==`: never an error; values of different types are not equal, except numbers,
/// which compare by value. `None` where this plan does not decide (bytes, two lists or
/// maps).
fn equals(a: &Value<'_>, b: &Value<'_>) -> Option<bool> {
    match (a, b) {
        (Value::Bytes(_), _) | (_, Value::Bytes(_)) => None,
        (Value::List(_) | Value::Map(_), Value::List(_) | Value::Map(_)) => None,
        (Value::Null, Value::Null) => Some(true),
        (Value::Bool(x), Value::Bool(y)) => Some(x == y),
        (Value::Str(x), Value::Str(y)) => Some(x == y),
        _ if a.is_number() && b.is_number() => Some(compare(a, b) == Some(Ordering::Equal)),
        _ => Some(false),
    }
}

impl Cond {
    /// The result, or `None` when CEL must decide. `&&` and `||` only look at their right
    /// side when CEL's would, and a side that gives up makes the whole plan give up: CEL's
    /// answer with an error on one side depends on the other.
    fn eval(&self, vars: &MessageVars<'_>) -> Option<bool> {
        match self {
            Cond::Value(x) => match x.eval(vars)? {
                Value::Bool(b) => Some(b),
                _ => None,
            },
            Cond::Not(c) => c.eval(vars).map(|b| !b),
            Cond::And(a, b) => match a.eval(vars)? {
                false => Some(false),
                true => b.eval(vars),
            },
            Cond::Or(a, b) => match a.eval(vars)? {
                true => Some(true),
                false => b.eval(vars),
            },
            Cond::Equals {
                left,
                right,
                negated,
            } => {
                let (a, b) = (left.eval(vars)?, right.eval(vars)?);
                equals(&a, &b).map(|eq| eq != *negated)
            }
            Cond::Compare(left, op, right) => {
                let (a, b) = (left.eval(vars)?, right.eval(vars)?);
                let ord = compare(&a, &b)?;
                Some(match op {
                    Compare::Less => ord == Ordering::Less,
                    Compare::LessEquals => ord != Ordering::Greater,
                    Compare::Greater => ord == Ordering::Greater,
                    Compare::GreaterEquals => ord != Ordering::Less,
                })
            }
            Cond::Has(steps, field) => match payload_at(vars, steps)? {
                Value::Map(map) => Some(map.contains_key(field)),
                _ => None,
            },
            Cond::Text(test, target, arg) => {
                let (Value::Str(s), Value::Str(needle)) = (target.eval(vars)?, arg.eval(vars)?)
                else {
                    return None;
                };
                Some(match test {
                    TextTest::StartsWith => s.starts_with(needle.as_ref()),
                    TextTest::EndsWith => s.ends_with(needle.as_ref()),
                    TextTest::Contains => s.contains(needle.as_ref()),
                })
            }
        }
    }
}

/// Writes a transform's value; an error means the plan gave up.
struct Emit<'a, 'm> {
    out: &'a Out,
    vars: &'a MessageVars<'m>,
}

const GAVE_UP: &str = "the native plan leaves this message to CEL";

impl Serialize for Emit<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let vars = self.vars;
        match self.out {
            Out::Value(x) => match x.eval(vars) {
                Some(Value::Null) => s.serialize_unit(),
                Some(Value::Bool(b)) => s.serialize_bool(b),
                Some(Value::Int(i)) => s.serialize_i64(i),
                Some(Value::UInt(u)) => s.serialize_u64(u),
                Some(Value::Double(f)) => serialize_double(f, s),
                Some(Value::Str(text)) => s.serialize_str(&text),
                Some(Value::List(items)) => s.collect_seq(items),
                Some(Value::Map(map)) => s.collect_map(map),
                Some(Value::Bytes(_)) | None => Err(S::Error::custom(GAVE_UP)),
            },
            Out::Condition(c) => match c.eval(vars) {
                Some(b) => s.serialize_bool(b),
                None => Err(S::Error::custom(GAVE_UP)),
            },
            Out::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, &Emit { out: value, vars })?;
                }
                map.end()
            }
            Out::List(items) => s.collect_seq(items.iter().map(|out| Emit { out, vars })),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The native plans against the CEL interpreter: the same expressions over the same
    //! messages must give the same outcome (result, missing field or error, with the
    //! same error), and native plans must really answer most of them.

    use bytes::Bytes;
    use proptest::prelude::*;

    use crate::message::Message;
    use crate::rules::{Expr, ExprKind, MessageVars};

    fn msg(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 1_700_000_000_000,
        }
    }

    const TOPICS: &[&str] = &["factory/l1/press-7/telemetry", "werk/Fräse-7/温度", "t"];

    /// Payloads of every shape: fields of each JSON type, nested, missing, unicode, big
    /// numbers, duplicate keys, and payloads that are not JSON.
    fn payloads() -> Vec<Vec<u8>> {
        let json = [
            r#"{"temperature": 85.5, "humidity": 40, "status": "ok", "line": "l1"}"#,
            r#"{"temperature": 85, "humidity": 19.99, "status": "fault", "line": "l2"}"#,
            r#"{"temperature": "hot", "humidity": null, "status": 1, "line": ["l1"]}"#,
            r#"{"temperature": 80, "humidity": 20, "status": "ok", "ok": true, "unit": "C"}"#,
            r#"{"temperature": 9007199254740993, "humidity": 18446744073709551615}"#,
            r#"{"temperature": -9223372036854775808, "humidity": -0.0, "status": ""}"#,
            r#"{"temperature": 1e300, "humidity": 2.5e-300, "ok": false}"#,
            r#"{"a": {"b": {"c": 1}}, "tags": ["a", "b"], "ü": "温度", "line": "Fräse-7"}"#,
            r#"{"a": {"b": [1, {"c": "x"}]}, "tags": [], "ok": "true"}"#,
            r#"{"a": [], "b": {}, "ok": null}"#,
            r#"{"a": 1, "a": "dup", "status": "ok", "status": "fault"}"#,
            r#"{"$serde_json::private::RawValue": "{\"a\":1}", "a": 2}"#,
            r#"{"temperature": 85.5, "nested": {"temperature": 85.5}}"#,
            r#"{}"#,
            "[]",
            "[1, 2, 3]",
            "42",
            "-1.5",
            "\"ok\"",
            "\"ALARM pump 3\"",
            "true",
            "null",
        ];
        let mut all: Vec<Vec<u8>> = json.iter().map(|j| j.as_bytes().to_vec()).collect();
        all.extend([
            b"temperature=85.5 humidity=40".to_vec(),
            b"ALARM pump 3".to_vec(),
            b"ok".to_vec(),
            b"".to_vec(),
            "Fräse-7 温度".as_bytes().to_vec(),
            vec![0xff, 0x00, 0xfe],
            vec![b'x', 0xff],
            b"{\"temperature\": 85".to_vec(),
            b"{\"temperature\": 85} trailing".to_vec(),
        ]);
        all
    }

    /// Runs `source` on every topic and payload with and without its native plan and
    /// requires the same outcome; returns how many the native plan answered alone.
    fn agree(source: &str, kind: ExprKind, payloads: &[Vec<u8>]) -> usize {
        let Ok(expr) = Expr::compile(source, kind) else {
            return 0;
        };
        let mut answered = 0;
        for topic in TOPICS {
            for payload in payloads {
                let m = msg(topic, payload);
                let (native_vars, cel_vars) = (
                    MessageVars::new(&m, "press-7", "edge-01"),
                    MessageVars::new(&m, "press-7", "edge-01"),
                );
                let native = expr.native();
                let what = || format!("{source} on {topic} / {}", String::from_utf8_lossy(payload));
                match kind {
                    ExprKind::Condition => {
                        let cel = expr.cel_matches(&cel_vars);
                        if let Some(b) = native.and_then(|n| n.matches(&native_vars)) {
                            assert_eq!(cel, Ok(b), "{}", what());
                            answered += 1;
                        }
                        assert_eq!(expr.matches(&native_vars), cel, "{}", what());
                    }
                    ExprKind::Transform => {
                        let cel = expr.cel_transform(&cel_vars);
                        if let Some(json) = native.and_then(|n| n.transform(&native_vars)) {
                            assert_eq!(cel.as_deref(), Ok(&json[..]), "{}", what());
                            answered += 1;
                        }
                        assert_eq!(expr.transform(&native_vars), cel, "{}", what());
                    }
                }
            }
        }
        answered
    }

    #[test]
    fn conditions_agree_with_cel() {
        let payloads = payloads();
        let native = [
            "payload.temperature > 80.0",
            "payload.temperature > 80",
            "payload.temperature >= 85",
            "payload.temperature <= 85.5",
            "payload.temperature < 9007199254740992.0",
            "payload.temperature == 9007199254740992",
            "payload.temperature == 85",
            "payload.temperature != 85.5",
            "payload.temperature > 80u",
            "payload.humidity < 20",
            "payload.humidity == 18446744073709551615u",
            "payload.humidity > 9223372036854775807",
            "payload.humidity == null",
            "payload.humidity != null",
            "payload.status != 'ok' || payload.temperature > 95.0",
            "payload.status == 'ok' && payload.temperature > 80",
            "payload.status > 'ok'",
            "payload.status < ''",
            "payload.status == 1",
            "payload.ok",
            "!payload.ok",
            "payload.ok == true",
            "payload.ok > false",
            "payload.unit == 'C' && payload.ok",
            "has(payload.humidity)",
            "!has(payload.humidity)",
            "has(payload.a.b)",
            "has(payload.a)",
            "payload.a.b.c == 1",
            "payload.a.b[1].c == 'x'",
            "payload.a.b[0] >= 1",
            "payload['ü'] == '温度'",
            "payload.tags[0] == 'a'",
            "payload.tags == 'a'",
            "payload.a == payload.b",
            "payload.tags == null",
            "payload.a == 1",
            "payload == 42",
            "payload == 'ok'",
            "payload == 'ALARM pump 3'",
            "payload > 41.5",
            "payload[0] == 1",
            "levels[1] == payload.line && qos > 0",
            "levels[1] == 'Fräse-7'",
            "levels[3] == 'telemetry'",
            "levels[0] < levels[1]",
            "client_id.startsWith('press-') && size(payload_text) < 1024",
            "topic.endsWith('/温度')",
            "topic.contains('l1')",
            "payload.status.startsWith('o')",
            "payload.line.contains(levels[1])",
            "size(payload_text) == 12",
            "payload_text.size() > 3",
            "size(payload_bytes) == 3",
            "size(payload.tags) == 2",
            "size(payload.a) > 0",
            "size(payload.status) == 2",
            "size(payload) > 1",
            "payload_text == 'ok'",
            "retain || qos == 1",
            "!retain && gateway_id == 'edge-01'",
            "received_at > 1600000000000",
            "received_at == 1700000000000.0",
            "qos >= 1u",
            "true",
            "false || payload.ok",
            "1 < 2.5",
            "'a' < 'b'",
        ];
        let mut answered = 0;
        for source in native {
            let expr = Expr::compile(source, ExprKind::Condition)
                .unwrap_or_else(|e| panic!("{source}: {e}"));
            assert!(expr.native().is_some(), "{source} has no native plan");
            answered += agree(source, ExprKind::Condition, &payloads);
        }
        // These have no native plan; they still give CEL's outcome.
        for source in [
            "'b' in payload.tags",
            "payload.tags.exists(t, t == 'a')",
            "payload.temperature + 1 > 80",
            "-payload.temperature < 0",
            "type(payload) == map",
            "payload == b'\\xff\\x00\\xfe'",
            "payload_text.matches('^A')",
            "user_properties.site == 'north'",
            "payload.ok ? true : false",
            "levels.size() == 4",
        ] {
            agree(source, ExprKind::Condition, &payloads);
        }
        // Most outcomes of the native set are results, answered natively.
        let total = native.len() * TOPICS.len() * payloads.len();
        assert!(answered * 3 > total, "{answered} of {total}");
    }

    #[test]
    fn transforms_agree_with_cel() {
        let payloads = payloads();
        let native = [
            r#"{"machine": levels[2], "t": payload.temperature, "h": payload.humidity, "at": received_at}"#,
            r#"{"ok": payload.status == "ok", "by": client_id}"#,
            r#"{"b": 1, "a": 2.5, "c": "x", "ü": null, "Z": true, "": 1u, "n": -0.0}"#,
            r#"{"nested": {"z": payload.a, "y": [payload.tags, topic]}, "gw": gateway_id}"#,
            r#"{"all": payload, "text": payload_text, "q": qos, "r": retain}"#,
            r#"{"big": 1e308, "tiny": 5e-324, "i": -9223372036854775808}"#,
            r#"{"size": size(payload_text), "hot": payload.temperature > 80 && !retain}"#,
            r#"[payload.temperature, levels[0], payload.a.b]"#,
            r#"{"has": has(payload.a), "lvl": levels[9]}"#,
            r#"{"bytes": payload_bytes}"#,
        ];
        let mut answered = 0;
        for source in native {
            let expr = Expr::compile(source, ExprKind::Transform)
                .unwrap_or_else(|e| panic!("{source}: {e}"));
            assert!(expr.native().is_some(), "{source} has no native plan");
            answered += agree(source, ExprKind::Transform, &payloads);
        }
        for source in [
            r#"{"a": 1, "a": 2}"#,
            r#"{1: payload.temperature}"#,
            r#"{"t": payload.temperature + 1}"#,
            r#"{"x": 1.0 / 0.0}"#,
            r#"{?"t": payload.?temperature}"#,
            "payload",
            "payload.temperature",
            "payload_text + '!'",
        ] {
            agree(source, ExprKind::Transform, &payloads);
        }
        let total = native.len() * TOPICS.len() * payloads.len();
        assert!(answered * 4 > total, "{answered} of {total}");
    }

    /// A random JSON value over a few keys, with numbers near CEL's type boundaries.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::{json, Value};
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            prop_oneof![
                Just(0i64),
                Just(1),
                Just(-1),
                Just(80),
                Just(i64::MAX),
                Just(i64::MIN),
                Just(9_007_199_254_740_993),
                any::<i64>()
            ]
            .prop_map(|i| json!(i)),
            prop_oneof![Just(u64::MAX), Just(1u64 << 63), any::<u64>()].prop_map(|u| json!(u)),
            prop_oneof![
                Just(80.0f64),
                Just(0.5),
                Just(-0.0),
                Just(9_007_199_254_740_992.0),
                Just(1e300),
                -1e6..1e6f64
            ]
            .prop_map(|f| json!(f)),
            prop_oneof![
                Just("ok".to_string()),
                Just(String::new()),
                Just("ü".to_string()),
                Just("温度".to_string()),
                "[a-zA-Z0-9ü温 ]{0,6}"
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((prop_oneof!["a", "b", "ü"], inner), 0..4)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn payload_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => json_value().prop_map(|v| v.to_string().into_bytes()),
            1 => "[a-z =.0-9ü温]{0,12}".prop_map(String::into_bytes),
            1 => proptest::collection::vec(any::<u8>(), 0..8),
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just(".a".to_string()),
                Just(".b".to_string()),
                Just("['ü']".to_string()),
                Just("[0]".to_string()),
                Just("[1]".to_string())
            ],
            0..3,
        )
        .prop_map(|steps| format!("payload{}", steps.concat()))
    }

    fn operand() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => path(),
            1 => path().prop_map(|p| format!("size({p})")),
            3 => prop::sample::select(&[
                "0", "1", "-1", "80", "9223372036854775807", "1u", "18446744073709551615u",
                "0.5", "80.0", "-0.0", "9007199254740992.0", "1e300", "'ok'", "''", "'ü'",
                "'温度'", "true", "false", "null",
            ][..])
            .prop_map(str::to_string),
            1 => prop::sample::select(&[
                "topic", "levels[0]", "levels[1]", "levels[5]", "client_id", "gateway_id",
                "qos", "retain", "received_at", "payload_text", "size(payload_text)",
            ][..])
            .prop_map(str::to_string),
        ]
    }

    fn condition() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            (
                operand(),
                prop_oneof!["==", "!=", "<", "<=", ">", ">="],
                operand()
            )
                .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            (path(), prop_oneof!["a", "b", "c"]).prop_map(|(p, f)| format!("has({p}.{f})")),
            (
                operand(),
                prop_oneof!["startsWith", "endsWith", "contains"],
                operand()
            )
                .prop_map(|(a, f, b)| format!("{a}.{f}({b})")),
            path(),
        ];
        leaf.prop_recursive(3, 8, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
                inner.prop_map(|a| format!("!({a})")),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_conditions_agree_with_cel(
            source in condition(),
            payloads in proptest::collection::vec(payload_bytes(), 1..4),
        ) {
            agree(&source, ExprKind::Condition, &payloads);
        }

        #[test]
        fn random_transforms_agree_with_cel(
            values in proptest::collection::vec(prop_oneof![3 => operand(), 1 => condition()], 1..4),
            payloads in proptest::collection::vec(payload_bytes(), 1..4),
        ) {
            let entries: Vec<String> =
                values.iter().enumerate().map(|(i, v)| format!("'k{i}': {v}")).collect();
            agree(&format!("{{{}}}", entries.join(", ")), ExprKind::Transform, &payloads);
        }
    }
}
