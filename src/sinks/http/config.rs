//! The HTTP sink's configuration (`type = "http"`), its validation and the typed plan.
//!
//! Validation is pure apart from checking that the TLS files exist; templates in the
//! URL and header values are parsed here, once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::buffer::BufferSection;
use crate::problems::Problems;
use crate::rules::{Template, TemplateScope};
use crate::sinks::pacing::RateSection;
use crate::sinks::pack::{PackPlan, PackSection};
use crate::units::{spelled, ByteSize, HumanDuration};

/// `[sinks.NAME]` with `type = "http"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkSection {
    /// `http://` or `https://`; the path may use `{1}`.. (levels of the message's topic),
    /// `{topic}` and `{gateway_id}`.
    pub url: String,
    #[serde(default)]
    pub method: HttpMethod,
    /// Extra request headers; values may use the same placeholders as the URL.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `Authorization: Bearer …`.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Basic auth, with `password`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: Option<HttpTlsSection>,
    /// Whole request, connect to last byte of the response.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    #[serde(default)]
    pub format: BodyFormat,
    /// `Content-Type` of `raw` bodies (a message's own MQTT 5 content type wins).
    #[serde(default)]
    pub content_type: Option<String>,
    /// MQTT 5 user properties as request headers named `{prefix}{key}` (e.g.
    /// `"x-mqtt-"`); unset: only in the JSON envelope (`properties.user`), and not sent
    /// with `raw` bodies.
    #[serde(default)]
    pub property_headers: Option<String>,
    #[serde(default)]
    pub batch: HttpBatchSection,
    /// Status codes to retry whatever the built-in table says.
    #[serde(default)]
    pub retry_on: Vec<u16>,
    /// Status codes to dead-letter whatever the built-in table says.
    #[serde(default)]
    pub permanent_on: Vec<u16>,
    /// Send an `Idempotency-Key` header, stable per message (or batch) across retries.
    #[serde(default = "default_true")]
    pub idempotency_key: bool,
    #[serde(default = "default_backoff_min")]
    pub backoff_min: HumanDuration,
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Pacing of what goes on the wire (see `sinks::pacing`).
    #[serde(default)]
    pub rate: Option<RateSection>,
    /// Combine messages of one topic into one request body (`sinks::pack`); replaces
    /// `format` and `batch`.
    #[serde(default)]
    pub pack: Option<PackSection>,
    #[serde(default)]
    pub buffer: BufferSection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum HttpMethod {
    #[default]
    #[serde(rename = "POST", alias = "post")]
    Post,
    #[serde(rename = "PUT", alias = "put")]
    Put,
}

/// How messages become a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// One JSON object per request.
    #[default]
    Json,
    /// One JSON object per line; batches.
    Ndjson,
    /// A JSON array of objects; batches.
    JsonArray,
    /// The payload as is, one message per request.
    Raw,
}

impl BodyFormat {
    pub fn batches(self) -> bool {
        matches!(self, BodyFormat::Ndjson | BodyFormat::JsonArray)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpBatchSection {
    /// Messages per request; default 100 for `ndjson`/`json_array`, 1 otherwise.
    #[serde(default)]
    pub max_messages: Option<usize>,
    /// Body bytes per request (a single larger message still goes alone); default 1MiB.
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// How long a partly filled batch waits for more messages; default 50ms.
    #[serde(default)]
    pub max_delay: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsSection {
    /// CA bundle that signs the server; absent = the system's trust store.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_true() -> bool {
    true
}
fn default_backoff_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// The validated HTTP sink.
#[derive(Debug, Clone)]
pub struct HttpPlan {
    pub gateway_id: String,
    /// With placeholders, rendered per message (values percent-encoded).
    pub url: Template,
    /// The URL has no placeholders: it is the same for every message.
    pub url_is_static: bool,
    pub method: HttpMethod,
    pub headers: Vec<(reqwest::header::HeaderName, Template)>,
    pub auth: Option<HttpAuth>,
    pub tls: Option<HttpTlsSection>,
    pub timeout: Duration,
    pub format: BodyFormat,
    pub content_type: String,
    /// Prefix of the request headers that carry MQTT 5 user properties, if they do.
    pub property_headers: Option<String>,
    pub max_messages: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
    pub retry_on: Vec<u16>,
    pub permanent_on: Vec<u16>,
    pub idempotency_key: bool,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Each request is one pack of messages of one topic.
    pub pack: Option<PackPlan>,
}

#[derive(Debug, Clone)]
pub enum HttpAuth {
    Bearer(String),
    Basic {
        username: String,
        password: Option<String>,
    },
}

/// Placeholders `{1}`..`{64}` may name topic levels.
const MAX_LEVELS: usize = 64;

/// Checks `s` (at key path `path`) and builds its plan; each problem goes to `err`.
pub fn validate(
    path: &str,
    s: &HttpSinkSection,
    gateway_id: &str,
    err: &mut impl FnMut(String, String),
) -> Option<HttpPlan> {
    let mut problems = Problems::new(err);
    let scope = TemplateScope {
        wildcards: MAX_LEVELS,
        client_id: false,
    };
    let (url, secure) = url(path, s, gateway_id, &scope, &mut problems);
    let url_is_static = !s.url.contains('{');
    let headers = headers(path, s, &scope, &mut problems);
    let auth = auth(path, s, &mut problems);
    check_tls(path, s, secure, &mut problems);
    if s.timeout.0 < Duration::from_millis(10) || s.timeout.0 > Duration::from_secs(600) {
        problems.add(
            format!("{path}.timeout"),
            "must be between 10ms and 10m".into(),
        );
    }
    let (max_messages, max_bytes, max_delay) = batch_limits(path, s, &mut problems);
    let content_type = content_type(path, s, &mut problems);
    check_statuses_and_prefix(path, s, &mut problems);
    crate::sinks::check_backoff(path, s.backoff_min, s.backoff_max, &mut problems.reporter());
    let pack = pack_plan(path, s, &mut problems);
    let content_type = match &pack {
        Some(p) => p.format.content_type().to_string(),
        None => content_type,
    };

    if !problems.none() {
        return None;
    }
    Some(HttpPlan {
        gateway_id: gateway_id.to_string(),
        url: url?,
        url_is_static,
        method: s.method,
        headers,
        auth,
        tls: s.tls.clone(),
        timeout: s.timeout.0,
        format: s.format,
        content_type,
        property_headers: s.property_headers.as_ref().map(|p| p.to_ascii_lowercase()),
        max_messages,
        max_bytes: max_bytes as usize,
        max_delay,
        retry_on: s.retry_on.clone(),
        permanent_on: s.permanent_on.clone(),
        idempotency_key: s.idempotency_key,
        backoff_min: s.backoff_min.0,
        backoff_max: s.backoff_max.0,
        pack,
    })
}

/// The URL template, and whether it is `https://` (its shape is checked with the
/// placeholders filled in; placeholders only in the path).
fn url(
    path: &str,
    s: &HttpSinkSection,
    gateway_id: &str,
    scope: &TemplateScope,
    problems: &mut Problems<'_>,
) -> (Option<Template>, bool) {
    let url = match Template::parse_text(&s.url, scope) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.add(format!("{path}.url"), e.to_string());
            None
        }
    };
    // Check the URL's shape with its placeholders filled in.
    let probe = s
        .url
        .replace("{gateway_id}", gateway_id)
        .replace("{topic}", "t");
    let probe = (1..=MAX_LEVELS)
        .rev()
        .fold(probe, |u, i| u.replace(&format!("{{{i}}}"), "l"));
    let mut secure = false;
    match url::Url::parse(&probe) {
        Ok(u) => match u.scheme() {
            "http" => {}
            "https" => secure = true,
            other => {
                problems.add(
                    format!("{path}.url"),
                    format!("scheme {other:?} is not supported; use http:// or https://"),
                );
            }
        },
        Err(e) => {
            problems.add(format!("{path}.url"), format!("invalid URL ({e})"));
        }
    }
    if let Some(host_end) = s.url.find("://").map(|i| i + 3) {
        let authority = s.url[host_end..].split('/').next().unwrap_or_default();
        if authority.contains('{') {
            problems.add(
                format!("{path}.url"),
                "placeholders are allowed in the path, not in the host".into(),
            );
        }
    }
    (url, secure)
}

/// `headers`: names HTTP takes, values that are templates (a fixed value must be a valid
/// header value, never echoed: it may be a secret); `Authorization` only without
/// `bearer_token` or `username`.
fn headers(
    path: &str,
    s: &HttpSinkSection,
    scope: &TemplateScope,
    problems: &mut Problems<'_>,
) -> Vec<(reqwest::header::HeaderName, Template)> {
    let mut headers = Vec::new();
    for (name, value) in &s.headers {
        let key = format!("{path}.headers.{name}");
        let header = match reqwest::header::HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                problems.add(key, "not a valid HTTP header name".into());
                continue;
            }
        };
        if header == reqwest::header::AUTHORIZATION
            && (s.bearer_token.is_some() || s.username.is_some())
        {
            problems.add(
                key.clone(),
                "conflicts with bearer_token/username; use one".into(),
            );
        }
        match Template::parse_text(value, scope) {
            Ok(t) => {
                if !value.contains('{') && reqwest::header::HeaderValue::from_str(value).is_err() {
                    // The value itself is never echoed: it may be a secret.
                    problems.add(key, "not a valid HTTP header value".into());
                } else {
                    headers.push((header, t));
                }
            }
            Err(e) => {
                problems.add(key, e.to_string());
            }
        }
    }
    headers
}

/// `bearer_token`, or `username` with an optional `password`: one of them.
fn auth(path: &str, s: &HttpSinkSection, problems: &mut Problems<'_>) -> Option<HttpAuth> {
    match (&s.bearer_token, &s.username, &s.password) {
        (Some(_), Some(_), _) => {
            problems.add(
                format!("{path}.bearer_token"),
                "set together with username; use one".into(),
            );
            None
        }
        (Some(t), None, None) => Some(HttpAuth::Bearer(t.clone())),
        (_, None, Some(_)) => {
            problems.add(format!("{path}.password"), "set without a username".into());
            None
        }
        (None, Some(u), p) => Some(HttpAuth::Basic {
            username: u.clone(),
            password: p.clone(),
        }),
        (None, None, None) => None,
    }
}

/// `tls`: only for `https://`; its files exist; cert and key together.
fn check_tls(path: &str, s: &HttpSinkSection, secure: bool, problems: &mut Problems<'_>) {
    if let Some(t) = &s.tls {
        if !secure {
            problems.add(
                format!("{path}.tls"),
                "set, but the url is not https://".into(),
            );
        }
        for (key, file) in [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)] {
            if let Some(file) = file {
                if !file.is_file() {
                    problems.add(
                        format!("{path}.tls.{key}"),
                        format!("file {} not found", file.display()),
                    );
                }
            }
        }
        if t.cert.is_some() != t.key.is_some() {
            problems.add(
                format!("{path}.tls"),
                "cert and key must be given together".into(),
            );
        }
    }
}

/// `batch`: how many messages, bytes and how long one request may gather (only formats
/// that batch take more than one message).
fn batch_limits(
    path: &str,
    s: &HttpSinkSection,
    problems: &mut Problems<'_>,
) -> (usize, u64, Duration) {
    let default_messages = if s.format.batches() { 100 } else { 1 };
    let max_messages = s.batch.max_messages.unwrap_or(default_messages);
    if max_messages == 0 || max_messages > 100_000 {
        problems.add(
            format!("{path}.batch.max_messages"),
            "must be between 1 and 100000".into(),
        );
    } else if max_messages > 1 && !s.format.batches() {
        problems.add(
            format!("{path}.batch.max_messages"),
            format!(
                "format {:?} sends one message per request; use format \"ndjson\" or \"json_array\" to batch",
                s.format
            ),
        );
    }
    let max_bytes = s.batch.max_bytes.map_or(1024 * 1024, |b| b.0);
    if max_bytes < 1024 {
        problems.add(
            format!("{path}.batch.max_bytes"),
            "must be at least 1KiB".into(),
        );
    }
    let max_delay = s.batch.max_delay.map_or(Duration::from_millis(50), |d| d.0);
    if max_delay > Duration::from_secs(60) {
        problems.add(
            format!("{path}.batch.max_delay"),
            "must be at most 60s".into(),
        );
    }
    (max_messages, max_bytes, max_delay)
}

/// The `Content-Type` of a request: the format's, or `content_type` for `raw` bodies.
fn content_type(path: &str, s: &HttpSinkSection, problems: &mut Problems<'_>) -> String {
    if s.content_type.is_some() && s.format != BodyFormat::Raw {
        problems.add(
            format!("{path}.content_type"),
            "only used with format = \"raw\"".into(),
        );
    }
    let content_type = match s.format {
        BodyFormat::Json | BodyFormat::JsonArray => "application/json".to_string(),
        BodyFormat::Ndjson => "application/x-ndjson".to_string(),
        BodyFormat::Raw => s
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
    };
    if reqwest::header::HeaderValue::from_str(&content_type).is_err() {
        problems.add(
            format!("{path}.content_type"),
            "not a valid header value".into(),
        );
    }
    content_type
}

/// `retry_on` and `permanent_on` (status codes, in one list at most) and the
/// `property_headers` prefix.
fn check_statuses_and_prefix(path: &str, s: &HttpSinkSection, problems: &mut Problems<'_>) {
    for (key, codes) in [("retry_on", &s.retry_on), ("permanent_on", &s.permanent_on)] {
        if let Some(bad) = codes.iter().find(|c| !(100..=599).contains(*c)) {
            problems.add(
                format!("{path}.{key}"),
                format!("{bad} is not an HTTP status code"),
            );
        }
    }
    if let Some(both) = s.retry_on.iter().find(|c| s.permanent_on.contains(c)) {
        problems.add(
            format!("{path}.permanent_on"),
            format!("{both} is also in retry_on"),
        );
    }
    if let Some(prefix) = &s.property_headers {
        // Never empty: a user property "authorization" must not become that header.
        if prefix.is_empty() || reqwest::header::HeaderName::from_bytes(prefix.as_bytes()).is_err()
        {
            problems.add(
                format!("{path}.property_headers"),
                "a non-empty header name prefix, e.g. \"x-mqtt-\"".into(),
            );
        }
    }
}

/// `pack`: the whole body of a request, so `format` and `batch` are refused beside it.
fn pack_plan(path: &str, s: &HttpSinkSection, problems: &mut Problems<'_>) -> Option<PackPlan> {
    match &s.pack {
        Some(section) => {
            // A pack is the whole body: the batch keys and the body format would only
            // mislead, so they are refused rather than ignored.
            if s.format != BodyFormat::Json {
                problems.add(
                    format!("{path}.format"),
                    "not used with pack: pack.format decides the body".into(),
                );
            }
            let b = &s.batch;
            if b.max_messages.is_some() || b.max_bytes.is_some() || b.max_delay.is_some() {
                problems.add(
                    format!("{path}.batch"),
                    "not used with pack: pack.max_bytes and pack.linger bound a request".into(),
                );
            }
            let plan = crate::sinks::pack::validate(
                &format!("{path}.pack"),
                section,
                None,
                &mut problems.reporter(),
            );
            plan
        }
        None => None,
    }
}

impl HttpPlan {
    /// One line for `edgebridge check`: no header values, tokens or passwords.
    pub fn describe(&self) -> String {
        let auth = match &self.auth {
            Some(HttpAuth::Bearer(_)) => " auth=bearer ****".to_string(),
            Some(HttpAuth::Basic { username, password }) => format!(
                " auth=basic user={username}{}",
                if password.is_some() {
                    " password=****"
                } else {
                    ""
                }
            ),
            None => String::new(),
        };
        let headers: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        let mut headers = if headers.is_empty() {
            String::new()
        } else {
            format!(" headers=[{}] (values hidden)", headers.join(", "))
        };
        if let Some(prefix) = &self.property_headers {
            headers += &format!(" property_headers={prefix}<key>");
        }
        let tls = match &self.tls {
            Some(t) => format!(
                " ca={} client_cert={}",
                t.ca.as_ref()
                    .map_or("system".to_string(), |p| p.display().to_string()),
                if t.cert.is_some() {
                    "yes (key ****)"
                } else {
                    "no"
                }
            ),
            None => String::new(),
        };
        let body = match &self.pack {
            Some(p) => p.describe(),
            None => format!(
                "format={} batch={}/{}B/{}",
                spelled(&self.format),
                self.max_messages,
                self.max_bytes,
                humantime::format_duration(self.max_delay),
            ),
        };
        format!(
            "{} {} {body}{auth}{headers}{tls} timeout={}",
            spelled(&self.method),
            redact_url(self.url.source()),
            humantime::format_duration(self.timeout),
        )
    }
}

/// `url` without what may be a secret: the password of `user:pass@` and the query.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(q) = out.find('?') {
        out.truncate(q);
        out.push_str("?****");
    }
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let end = out[start..].find('/').map_or(out.len(), |i| start + i);
        if let Some(at) = out[start..end].rfind('@').map(|i| start + i) {
            if let Some(colon) = out[start..at].find(':').map(|i| start + i) {
                out.replace_range(colon + 1..at, "****");
            }
        }
    }
    out
}
