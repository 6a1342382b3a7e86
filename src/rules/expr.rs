//! CEL expressions of rules: `where` conditions and `payload` transforms.
//!
//! Compiled once at load ([`Expr::compile`]): a syntax error, an unknown variable, or a
//! type error that does not depend on the payload (`topic > 3`, a condition that is not a
//! boolean) is a config error. The payload is JSON of any shape, so type errors that
//! involve it can only show at run time: there an evaluation error makes the rule not
//! match (counted by the caller), and a field the payload does not have is simply false.
//!
//! What an expression sees ([`VARIABLES`]) is built lazily per message by
//! [`MessageVars`]: the payload is parsed as JSON only when an expression reads it, once
//! per message however many rules do.
//!
//! The simplest expressions also get a native plan ([`super::native`]) that answers
//! without the interpreter; whenever it cannot give CEL's result, CEL runs as before.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use cel::common::ast::{EntryExpr, Expr as Ast, IdedExpr};
use cel::objects::Key;
use cel::{Context, Env, ExecutionError, Program, Value};
use serde::{Serialize, Serializer};

use super::json::serialize_double;
use super::native::Native;
pub use super::vars::MessageVars;
use crate::message::Message;

/// The variables an expression may use, with what they hold.
pub const VARIABLES: &[(&str, &str)] = &[
    ("topic", "the device's topic (string)"),
    ("levels", "the topic split on '/' (list of strings)"),
    (
        "payload",
        "the payload parsed as JSON; when it is not JSON: its text, or bytes when not UTF-8",
    ),
    (
        "payload_text",
        "the payload as text (invalid UTF-8 replaced)",
    ),
    ("payload_bytes", "the payload as bytes"),
    ("qos", "0, 1 or 2 (int)"),
    ("retain", "the retain flag (bool)"),
    ("client_id", "the publishing device's client id (string)"),
    (
        "user_properties",
        "MQTT 5 user properties (map of string to string; empty for 3.1.1)",
    ),
    (
        "properties",
        "MQTT 5 properties (map): user (map of string to string), content_type, \
         response_topic (strings), correlation_data (bytes), payload_format_indicator, \
         message_expiry_interval (ints); only those the device sent",
    ),
    ("gateway_id", "gateway.id (string)"),
    (
        "received_at",
        "when the gateway received the message (int, ms since the Unix epoch)",
    ),
];

/// Names that are not variables but may appear as identifiers (type names).
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
];

/// The standard CEL environment, shared by every expression.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// What an expression is for: decides the result type checked at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExprKind {
    /// `where`: must give a bool.
    Condition,
    /// `payload`: any value; a map or list becomes JSON.
    Transform,
}

/// A compiled CEL expression.
#[derive(Debug, Clone)]
pub struct Expr {
    source: String,
    /// `Program` is not `Clone`; plans are.
    program: Arc<Program>,
    /// Answers without the interpreter when the expression is simple enough.
    native: Option<Arc<Native>>,
}

/// Why an evaluation did not give a usable result. Formatting is left to whoever shows
/// it (the dry run): the router only counts, and must not pay for messages.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalError {
    /// A field, key or index the message does not have: for a condition, simply "false".
    Missing(ExecutionError),
    /// Anything else (type mismatch, bad result type...): counted as a rule error.
    Failed(Failure),
}

/// The cause of [`EvalError::Failed`].
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Execution(ExecutionError),
    /// The expression ran but its result cannot be used (`detail` says why).
    Result(String),
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EvalError::Missing(ExecutionError::NoSuchKey(key)) => f.write_str(key),
            EvalError::Missing(ExecutionError::IndexOutOfBounds(i)) => {
                write!(f, "index {}", one_line(&format!("{i:?}")))
            }
            EvalError::Missing(other) | EvalError::Failed(Failure::Execution(other)) => {
                f.write_str(&one_line(&other.to_string()))
            }
            EvalError::Failed(Failure::Result(detail)) => f.write_str(detail),
        }
    }
}

impl Expr {
    /// Compiles `source`; the error is one line for the config error of the key.
    pub fn compile(source: &str, kind: ExprKind) -> Result<Expr, String> {
        if source.trim().is_empty() {
            return Err("empty expression".into());
        }
        // The parser limits nesting itself; guard against any panic all the same: a bad
        // expression must be a config error, never a crash.
        let compiled = std::panic::catch_unwind(|| ENV.compile(source))
            .map_err(|_| "the CEL parser failed on this expression".to_string())?;
        let program = compiled.map_err(|e| one_line(&e.to_string()))?;
        let mut bound = HashSet::new();
        bound_names(program.expression(), &mut bound);
        let references = program.references();
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|v| {
                !VARIABLES.iter().any(|(name, _)| name == v)
                    && !TYPE_NAMES.contains(v)
                    && !bound.contains(*v)
            })
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            let known: Vec<&str> = VARIABLES.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown variable {}; available: {}",
                unknown.join(", "),
                known.join(", ")
            ));
        }
        let dynamic = references.has_variable("payload")
            || references.has_variable("user_properties")
            || references.has_variable("properties");
        let native = Native::compile(program.expression(), kind == ExprKind::Transform);
        let expr = Expr {
            source: source.to_string(),
            program: Arc::new(program),
            native: native.map(Arc::new),
        };
        expr.check_with_probe(kind, dynamic)?;
        Ok(expr)
    }

    /// Evaluates the expression once against a made-up message: every variable but the
    /// payload and the user properties has a fixed type, so an expression that reads
    /// neither fails here exactly as it would at run time. An unknown function fails here
    /// whatever it reads.
    fn check_with_probe(&self, kind: ExprKind, dynamic: bool) -> Result<(), String> {
        let probe = Message {
            topic: "probe/topic".into(),
            payload: Bytes::from_static(b"{}"),
            qos: 1,
            retain: false,
            properties: None,
            received_at: 0,
        };
        let vars = MessageVars::new(&probe, "probe-client", "probe-gateway");
        match self.execute(&vars) {
            Err(ExecutionError::UndeclaredReference(name)) => {
                Err(format!("unknown function or variable {name}"))
            }
            Err(e) if !dynamic && is_type_error(&e) => Err(format!("type error: {e}")),
            Ok(v) if kind == ExprKind::Condition && !dynamic && !matches!(v, Value::Bool(_)) => {
                Err(format!(
                    "a condition must be true or false; this gives a {}",
                    v.type_of()
                ))
            }
            _ => Ok(()),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The native plan, if the expression has one.
    #[cfg(test)]
    pub(super) fn native(&self) -> Option<&Native> {
        self.native.as_deref()
    }

    /// The same compiled expression (a rule's transform shared by its targets).
    pub fn same(&self, other: &Expr) -> bool {
        Arc::ptr_eq(&self.program, &other.program)
    }

    fn execute(&self, vars: &MessageVars<'_>) -> Result<Value, ExecutionError> {
        let mut ctx = Context::with_env(ENV.clone());
        ctx.set_variable_resolver(vars);
        // The router must survive any input: a panic inside the interpreter on some
        // payload becomes an evaluation error of this rule (costs nothing otherwise).
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.program.execute(&ctx)))
            .unwrap_or_else(|_| {
                Err(ExecutionError::InternalError(
                    "the CEL interpreter panicked on this message".into(),
                ))
            })
    }

    /// Evaluates a condition.
    pub fn matches(&self, vars: &MessageVars<'_>) -> Result<bool, EvalError> {
        if let Some(b) = self.native.as_ref().and_then(|n| n.matches(vars)) {
            return Ok(b);
        }
        self.cel_matches(vars)
    }

    /// Evaluates a condition with the CEL interpreter only.
    pub(super) fn cel_matches(&self, vars: &MessageVars<'_>) -> Result<bool, EvalError> {
        match self.execute(vars) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(EvalError::Failed(Failure::Result(format!(
                "the condition gave a {}, not a bool",
                other.type_of()
            )))),
            Err(e) => Err(classify(e)),
        }
    }

    /// Evaluates a transform into the outgoing payload: a string is sent as its text,
    /// bytes as they are, anything else as JSON.
    pub fn transform(&self, vars: &MessageVars<'_>) -> Result<Bytes, EvalError> {
        if let Some(json) = self.native.as_ref().and_then(|n| n.transform(vars)) {
            return Ok(Bytes::from(json));
        }
        self.cel_transform(vars)
    }

    /// Evaluates a transform with the CEL interpreter only.
    pub(super) fn cel_transform(&self, vars: &MessageVars<'_>) -> Result<Bytes, EvalError> {
        let value = self.execute(vars).map_err(classify)?;
        match value {
            Value::String(s) => Ok(Bytes::from(s.as_bytes().to_vec())),
            Value::Bytes(b) => Ok(Bytes::from(b.as_ref().clone())),
            other => serde_json::to_vec(&JsonOut(&other))
                .map(Bytes::from)
                .map_err(|e| EvalError::Failed(Failure::Result(e.to_string()))),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Errors that come from the types of the values, not from which fields exist.
fn is_type_error(e: &ExecutionError) -> bool {
    matches!(
        e,
        ExecutionError::NoSuchOverload(_)
            | ExecutionError::UnsupportedBinaryOperator(..)
            | ExecutionError::ValuesNotComparable(..)
            | ExecutionError::UnexpectedType { .. }
            | ExecutionError::NotSupportedAsMethod { .. }
            | ExecutionError::UnsupportedTargetType { .. }
            | ExecutionError::UnsupportedKeyType(_)
            | ExecutionError::UnsupportedIndex(..)
    )
}

fn classify(e: ExecutionError) -> EvalError {
    match e {
        ExecutionError::NoSuchKey(_) | ExecutionError::IndexOutOfBounds(_) => EvalError::Missing(e),
        other => EvalError::Failed(Failure::Execution(other)),
    }
}

/// Names bound by comprehensions (`payload.items.all(x, x > 0)` binds `x`).
fn bound_names(expr: &IdedExpr, out: &mut HashSet<String>) {
    match &expr.expr {
        Ast::Comprehension(c) => {
            out.insert(c.iter_var.clone());
            if let Some(v) = &c.iter_var2 {
                out.insert(v.clone());
            }
            out.insert(c.accu_var.clone());
            for e in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                bound_names(e, out);
            }
        }
        Ast::Call(call) => {
            if let Some(t) = &call.target {
                bound_names(t, out);
            }
            for a in &call.args {
                bound_names(a, out);
            }
        }
        Ast::List(l) => l.elements.iter().for_each(|e| bound_names(e, out)),
        Ast::Map(m) => m.entries.iter().for_each(|e| entry_names(&e.expr, out)),
        Ast::Struct(s) => s.entries.iter().for_each(|e| entry_names(&e.expr, out)),
        Ast::Select(s) => bound_names(&s.operand, out),
        Ast::Unspecified | Ast::Ident(_) | Ast::Literal(_) => {}
    }
}

fn entry_names(entry: &EntryExpr, out: &mut HashSet<String>) {
    match entry {
        EntryExpr::StructField(f) => bound_names(&f.value, out),
        EntryExpr::MapEntry(m) => {
            bound_names(&m.key, out);
            bound_names(&m.value, out);
        }
    }
}

/// A CEL result written as JSON, without an intermediate `serde_json::Value`. Map keys
/// become strings, in sorted order (the same result gives the same bytes); NaN and
/// infinities are refused (serde_json would write them as null).
struct JsonOut<'a>(&'a Value);

impl Serialize for JsonOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) => serialize_double(*f, s),
            Value::String(text) => s.serialize_str(text),
            Value::Bytes(b) => s.serialize_str(&String::from_utf8_lossy(b)),
            Value::List(items) => s.collect_seq(items.iter().map(JsonOut)),
            Value::Map(map) => {
                let mut entries: Vec<(std::borrow::Cow<'_, str>, &Value)> = map
                    .map
                    .iter()
                    .map(|(k, v)| {
                        let key = match k {
                            Key::String(k) => std::borrow::Cow::Borrowed(k.as_str()),
                            Key::Int(i) => i.to_string().into(),
                            Key::Uint(u) => u.to_string().into(),
                            Key::Bool(b) => b.to_string().into(),
                        };
                        (key, v)
                    })
                    .collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let mut out = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    out.serialize_entry(&k, &JsonOut(v))?;
                }
                out.end()
            }
            other => Err(S::Error::custom(format!(
                "a {} cannot be written as JSON",
                other.type_of()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Properties;

    fn msg(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos: 1,
            retain: false,
            properties: Some(Box::new(Properties {
                user_properties: vec![("site".into(), "north".into())],
                ..Properties::default()
            })),
            received_at: 1_700_000_000_000,
        }
    }

    fn condition(source: &str, topic: &str, payload: &[u8]) -> Result<bool, EvalError> {
        let expr =
            Expr::compile(source, ExprKind::Condition).unwrap_or_else(|e| panic!("{source}: {e}"));
        let m = msg(topic, payload);
        let vars = MessageVars::new(&m, "dev-1", "edge-01");
        expr.matches(&vars)
    }

    fn transform(source: &str, topic: &str, payload: &[u8]) -> Result<Vec<u8>, EvalError> {
        let expr =
            Expr::compile(source, ExprKind::Transform).unwrap_or_else(|e| panic!("{source}: {e}"));
        let m = msg(topic, payload);
        let vars = MessageVars::new(&m, "dev-1", "edge-01");
        expr.transform(&vars).map(|b| b.to_vec())
    }

    fn deep_json(depth: usize) -> Vec<u8> {
        let mut s = String::new();
        for _ in 0..depth {
            s.push_str("{\"a\":");
        }
        s.push('1');
        for _ in 0..depth {
            s.push('}');
        }
        s.into_bytes()
    }

    #[test]
    fn conditions_table() {
        let deep = deep_json(40);
        let deeper = deep_json(5_000);
        let reading = br#"{"temperature": 85, "unit": "C", "ok": true, "tags": ["a", "b"]}"#;
        // Expected: "true", "false", "missing" (a missing field: false, not counted) or
        // "error" (counted as a rule error).
        let table: &[(&str, &str, &[u8], &str)] = &[
            // JSON fields, ints and doubles
            ("payload.temperature > 80", "t", reading, "true"),
            ("payload.temperature > 80.5", "t", reading, "true"),
            ("payload.temperature > 90", "t", reading, "false"),
            ("payload.unit == 'C' && payload.ok", "t", reading, "true"),
            ("'b' in payload.tags", "t", reading, "true"),
            ("payload.tags.exists(t, t == 'c')", "t", reading, "false"),
            ("has(payload.humidity)", "t", reading, "false"),
            // a missing field is false, even under negation
            ("payload.humidity > 10", "t", reading, "missing"),
            ("!(payload.humidity > 10)", "t", reading, "missing"),
            // type mismatch at run time: an error, not a match
            ("payload.unit > 10", "t", reading, "error"),
            ("payload.temperature.startsWith('8')", "t", reading, "error"),
            // non-JSON payloads: text and bytes
            ("payload_text.startsWith('ALARM')", "t", b"ALARM pump 3", "true"),
            ("payload == 'ALARM pump 3'", "t", b"ALARM pump 3", "true"),
            ("payload.temperature > 80", "t", b"ALARM pump 3", "error"),
            ("size(payload_bytes) == 3", "t", &[0xff, 0x00, 0xfe], "true"),
            ("payload == b'\\xff\\x00\\xfe'", "t", &[0xff, 0x00, 0xfe], "true"),
            ("payload_text.contains('x')", "t", &[0xff, b'x'], "true"),
            // JSON scalars and empty payloads
            ("payload == 42", "t", b"42", "true"),
            ("payload_text == ''", "t", b"", "true"),
            // deep JSON: within serde_json's limit it is JSON, beyond it text
            ("payload.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a == 1", "t", &deep, "true"),
            ("type(payload) == string", "t", &deeper, "true"),
            // topic, levels (unicode), metadata
            ("levels[1] == 'Fräse-7' && levels.size() == 3", "werk/Fräse-7/温度", b"1", "true"),
            ("topic.endsWith('/温度')", "werk/Fräse-7/温度", b"1", "true"),
            ("levels[5] == 'x'", "a/b", b"1", "missing"),
            ("qos == 1 && !retain && client_id == 'dev-1' && gateway_id == 'edge-01'", "t", b"1", "true"),
            ("user_properties.site == 'north'", "t", b"1", "true"),
            ("properties.user['site'] == 'north'", "t", b"1", "true"),
            ("properties.user['line'] == '4'", "t", b"1", "missing"),
            // Not sent by the device: a missing field.
            ("properties.content_type == 'application/json'", "t", b"1", "missing"),
            ("has(properties.content_type)", "t", b"1", "false"),
            ("user_properties.line == 'x'", "t", b"1", "missing"),
            ("received_at > 0", "t", b"1", "true"),
            ("topic.matches('^fac.*y$')", "factory", b"1", "true"),
        ];
        for (source, topic, payload, expected) in table {
            let got = match condition(source, topic, payload) {
                Ok(b) => b.to_string(),
                Err(EvalError::Missing(_)) => "missing".to_string(),
                Err(EvalError::Failed(_)) => "error".to_string(),
            };
            assert_eq!(*expected, got, "{source} on {topic}");
        }
    }

    #[test]
    fn transforms_table() {
        let reading = br#"{"temperature": 21.5, "unit": "C"}"#;
        type Case<'a> = (&'a str, &'a str, &'a [u8], Result<&'a str, ()>);
        let table: &[Case] = &[
            (
                r#"{"machine": levels[2], "t": payload.temperature, "qos": qos}"#,
                "factory/l1/m7/telemetry",
                reading,
                Ok(r#"{"machine":"m7","qos":1,"t":21.5}"#),
            ),
            (
                "[1, 'two', null, true]",
                "t",
                reading,
                Ok(r#"[1,"two",null,true]"#),
            ),
            // strings are sent as text, not as a JSON string
            (
                "'T=' + string(payload.temperature)",
                "t",
                reading,
                Ok("T=21.5"),
            ),
            ("payload_text + '!'", "t", b"not json", Ok("not json!")),
            (
                "payload",
                "t",
                reading,
                Ok(r#"{"temperature":21.5,"unit":"C"}"#),
            ),
            (
                r#"{"ü": topic}"#,
                "werk/温度",
                b"",
                Ok(r#"{"ü":"werk/温度"}"#),
            ),
            // a field the payload lacks, or a type mismatch, is an error
            (r#"{"t": payload.temperature}"#, "t", b"{}", Err(())),
            (r#"{"t": payload.temperature + 'x'}"#, "t", reading, Err(())),
            (r#"{"t": payload.temperature}"#, "t", b"\xff\xfe", Err(())),
            // not representable as JSON
            ("{'x': 1.0 / 0.0}", "t", b"", Err(())),
        ];
        for (source, topic, payload, expected) in table {
            let got = transform(source, topic, payload);
            match (expected, &got) {
                (Ok(want), Ok(bytes)) => {
                    let got = String::from_utf8_lossy(bytes);
                    if want.starts_with(['{', '[']) {
                        let want: serde_json::Value = serde_json::from_str(want).expect("json");
                        let got: serde_json::Value =
                            serde_json::from_str(&got).unwrap_or_else(|e| panic!("{source}: {e}"));
                        assert_eq!(want, got, "{source}");
                    } else {
                        assert_eq!(*want, got, "{source}");
                    }
                }
                (Err(()), Err(_)) => {}
                _ => panic!("{source}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn compile_errors_are_config_errors() {
        let table: &[(&str, ExprKind, &str)] = &[
            ("payload.x >", ExprKind::Condition, "Syntax error"),
            ("", ExprKind::Condition, "empty expression"),
            (
                "temperature > 80",
                ExprKind::Condition,
                "unknown variable temperature",
            ),
            ("nosuch(topic)", ExprKind::Condition, "unknown function"),
            ("topic > 3", ExprKind::Condition, "type error"),
            ("qos + 'a' == 'b'", ExprKind::Condition, "type error"),
            ("levels[1]", ExprKind::Condition, "must be true or false"),
            ("{'a': topic - 1}", ExprKind::Transform, "type error"),
        ];
        for (source, kind, want) in table {
            match Expr::compile(source, *kind) {
                Ok(_) => panic!("{source:?} compiled"),
                Err(e) => assert!(e.contains(want), "{source:?}: {e}"),
            }
        }
        // Payload-dependent types are only known at run time; bound names are fine.
        for ok in [
            "payload.x > 3",
            "payload.items.all(i, i.v > 0)",
            "type(payload) == map",
            "user_properties.a == 'b'",
        ] {
            Expr::compile(ok, ExprKind::Condition).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn hostile_expressions_do_not_crash() {
        let nested = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(Expr::compile(&nested, ExprKind::Condition).is_err());
        let long_or = vec!["topic == 'a'"; 2_000].join(" || ");
        // Either a config error (nesting limit) or a working condition; never a panic.
        if let Ok(expr) = Expr::compile(&long_or, ExprKind::Condition) {
            let m = msg("b", b"");
            assert_eq!(expr.matches(&MessageVars::new(&m, "", "g")), Ok(false));
        }
        for junk in ["\u{0}", "'unterminated", "}{", "a.b.c(", "1 ? 2 :"] {
            assert!(
                Expr::compile(junk, ExprKind::Condition).is_err(),
                "{junk:?}"
            );
        }
        // A huge payload is just data.
        let big = format!("{{\"v\": \"{}\"}}", "x".repeat(4 << 20));
        assert_eq!(
            condition("size(payload.v) > 1000", "t", big.as_bytes()),
            Ok(true)
        );
    }
}
