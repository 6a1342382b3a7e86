//! HTTP webhook sink: POSTs (or PUTs) messages from the sink's buffer to a URL, one
//! request at a time so the receiver sees them in buffer order.
//!
//! Input: batches from the buffer. A request holds one message (`json`, `raw`) or up to
//! `batch.max_messages` / `batch.max_bytes` consecutive messages that render to the same
//! URL and headers (`ndjson`, `json_array`), waiting at most `batch.max_delay` for a
//! partly filled batch. With a `rate`, each request (a retry too) waits for the pacer; it
//! counts as one message of its body's size. Output: a buffer ack per message once the
//! server answered 2xx.
//!
//! What a response means is decided in one place, [`verdict`]: 2xx delivered; 408, 429,
//! 5xx and transport errors retried with backoff (honouring `Retry-After`); 401/403
//! retried too (a configuration problem: the data is kept) with the sink marked down;
//! any other 4xx is the message's fault: it goes to the dead-letter file and the stream
//! goes on. A batch refused that way is split and its messages are sent one by one, so
//! only the one at fault is dead-lettered. `retry_on` / `permanent_on` override the table.
//!
//! Every request carries `Idempotency-Key`: `<gateway>-<sink>-<seq>` for one message,
//! `<gateway>-<sink>-<first>-<last>` for a batch (a memory buffer adds a per-start
//! token, as its sequence numbers restart). The same id is each message's `id` field.
//!
//! MQTT 5 properties: the JSON bodies carry them in each envelope's `properties`; with
//! `property_headers = "x-mqtt-"` the user properties are also request headers
//! `x-mqtt-<key>` (key and value percent-encoded where a header does not allow a
//! character; a batch holds only messages with the same headers); a `raw` body goes with
//! the message's own content type when it has one.
//!
//! With `pack` (`sinks::pack`) a request is one pack instead: messages of one topic,
//! closed by size, linger or the open-pack limit, sent in the order packs close (so in
//! buffer order per topic); its URL and headers are rendered from that topic.

mod body;
pub mod config;

use std::collections::VecDeque;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;
use tokio::time::Instant;
use tracing::{info, warn};

pub use config::{HttpPlan, HttpSinkSection};

use super::credentials::{LoadedTls, CREDENTIALS_POLL};
use super::pack::{self, Pack, PackPlan, Packer};
use super::supervise::{supervise, Ended, Session};
use super::{Backoff, Pacer, SinkContext};
use crate::buffer::Record;
use crate::message::Properties;
use crate::rules::{level_ranges, TemplateVars};
use config::{redact_url, HttpAuth, HttpMethod};

/// Longest `Retry-After` honoured; a larger value waits this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What to do after a response (or a transport error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Ack the messages.
    Delivered,
    /// Keep the messages; send them again after backoff or `Retry-After`.
    Retry,
    /// Keep the messages and retry, but the sink cannot work until its configuration
    /// (credentials, permissions) is fixed: marked down with the reason.
    RetryConfig,
    /// The messages are at fault: dead-letter them and go on.
    Permanent,
}

/// The response table. `retry_on` and `permanent_on` win over the built-in rules.
pub fn verdict(status: u16, retry_on: &[u16], permanent_on: &[u16]) -> Verdict {
    if retry_on.contains(&status) {
        return Verdict::Retry;
    }
    if permanent_on.contains(&status) {
        return Verdict::Permanent;
    }
    match status {
        200..=299 => Verdict::Delivered,
        401 | 403 => Verdict::RetryConfig,
        408 | 429 => Verdict::Retry,
        400..=499 => Verdict::Permanent,
        // 5xx, and 1xx/3xx that reqwest did not resolve (e.g. too many redirects):
        // nothing says the message is at fault, so keep it.
        _ => Verdict::Retry,
    }
}

/// Reads `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(std::time::SystemTime::now())
                .unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Characters escaped when a topic level goes into a URL path.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

/// `topic` as rendered into a URL (each level percent-encoded) and the byte ranges of its
/// levels, which `{1}`.. refer to.
fn url_topic(topic: &str) -> (String, Vec<(usize, usize)>) {
    let escaped: Vec<String> = topic
        .split('/')
        .map(|level| utf8_percent_encode(level, PATH_SEGMENT).to_string())
        .collect();
    let joined = escaped.join("/");
    let ranges = level_ranges(&joined);
    (joined, ranges)
}

/// Where and with which headers one message is sent; consecutive messages with the same
/// target may share a request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// A `raw` body's own MQTT 5 content type, in place of the sink's.
    content_type: Option<HeaderValue>,
}

fn vars<'a>(plan: &'a HttpPlan, topic: &'a str) -> TemplateVars<'a> {
    TemplateVars {
        gateway_id: &plan.gateway_id,
        topic,
        client_id: "",
    }
}

/// Characters not allowed in a header name (RFC 9110 `tchar`): percent-encoded, so that
/// any user property key makes a valid name (`%` itself is a `tchar`).
const NOT_TCHAR: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'(')
    .add(b')')
    .add(b',')
    .add(b'/')
    .add(b':')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'{')
    .add(b'}')
    .add(b'%');

/// The target of a message with `topic` and MQTT 5 `props` (a pack: `None`).
fn render_target(
    plan: &HttpPlan,
    topic: &str,
    props: Option<&Properties>,
) -> Result<Target, String> {
    let url = if plan.url_is_static {
        plan.url.source().to_string()
    } else {
        let (escaped, ranges) = url_topic(topic);
        plan.url.render(&vars(plan, &escaped), &ranges)
    };
    let ranges = if plan.headers.iter().any(|(_, t)| t.uses_captures()) {
        level_ranges(topic)
    } else {
        Vec::new()
    };
    let mut headers = Vec::with_capacity(plan.headers.len());
    for (name, template) in &plan.headers {
        let text = template.render(&vars(plan, topic), &ranges);
        // Non-ASCII (a unicode topic) is percent-encoded so the value stays valid.
        let text = utf8_percent_encode(&text, CONTROLS).to_string();
        let value = HeaderValue::from_str(&text)
            .map_err(|_| format!("header {name} does not render to a valid value"))?;
        headers.push((name.clone(), value));
    }
    let mut content_type = None;
    if let Some(props) = props {
        if let Some(prefix) = &plan.property_headers {
            for (key, value) in &props.user_properties {
                let name = format!("{prefix}{}", utf8_percent_encode(key, NOT_TCHAR));
                let value = utf8_percent_encode(value, CONTROLS).to_string();
                // Both are percent-encoded into what a header allows.
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    headers.push((name, value));
                }
            }
        }
        if plan.format == config::BodyFormat::Raw && plan.pack.is_none() {
            content_type = props
                .content_type
                .as_deref()
                .and_then(|ct| HeaderValue::from_str(ct).ok());
        }
    }
    Ok(Target {
        url,
        headers,
        content_type,
    })
}

/// One request ready to send.
struct Request {
    records: Vec<Record>,
    target: Target,
    body: Vec<u8>,
    key: String,
}

/// Takes the next request's records off the front of `pending`. Records with
/// `seq <= alone_upto` go one per request.
fn next_request(
    plan: &HttpPlan,
    key_prefix: &str,
    pending: &mut VecDeque<Record>,
    alone_upto: u64,
) -> Option<Result<Request, (Record, String)>> {
    let first = pending.pop_front()?;
    let target = match render_target(plan, &first.msg.topic, first.msg.properties.as_deref()) {
        Ok(t) => t,
        Err(e) => return Some(Err((first, e))),
    };
    let id = |seq: u64| format!("{key_prefix}-{seq}");
    let mut body = Vec::new();
    body::encode(
        plan.format,
        &first.msg,
        &id(first.seq),
        &plan.gateway_id,
        true,
        &mut body,
    );
    let alone = first.seq <= alone_upto || !plan.format.batches();
    let mut records = vec![first];
    while !alone && records.len() < plan.max_messages {
        let Some(next) = pending.front() else { break };
        if next.seq <= alone_upto {
            break;
        }
        let same_target =
            plan.url_is_static && plan.headers.is_empty() && plan.property_headers.is_none()
                || render_target(plan, &next.msg.topic, next.msg.properties.as_deref()).as_ref()
                    == Ok(&target);
        if !same_target {
            break;
        }
        let before = body.len();
        body::encode(
            plan.format,
            &next.msg,
            &id(next.seq),
            &plan.gateway_id,
            false,
            &mut body,
        );
        if body.len() + 1 > plan.max_bytes {
            body.truncate(before);
            break;
        }
        if let Some(next) = pending.pop_front() {
            records.push(next);
        }
    }
    body::finish(plan.format, &mut body);
    let key = match records.as_slice() {
        [one] => id(one.seq),
        [first, .., last] => format!("{key_prefix}-{}-{}", first.seq, last.seq),
        [] => unreachable!("records starts with one record"),
    };
    Some(Ok(Request {
        records,
        target,
        body,
        key,
    }))
}

/// The sink's HTTP client, built again when its TLS files change: they are read at most
/// every [`CREDENTIALS_POLL`], before a request ([`super::credentials::TlsFiles`] keeps the last set that
/// loaded and reports a refused one). The next request after a change opens a connection
/// with the new certificate; one in flight finishes on its own.
struct Client {
    current: reqwest::Client,
    tls: Option<LoadedTls>,
    checked: Instant,
}

impl Client {
    /// The first client; an error while the TLS files never loaded or the client cannot
    /// be built.
    fn build(plan: &HttpPlan, ctx: &SinkContext) -> anyhow::Result<Client> {
        let tls = tls_files(plan, ctx).map_err(|e| anyhow::anyhow!("tls: {e}"))?;
        Ok(Client {
            current: client(plan, tls.as_ref())?,
            tls,
            checked: Instant::now(),
        })
    }

    /// The client for the next request.
    fn get(&mut self, plan: &HttpPlan, ctx: &SinkContext) -> reqwest::Client {
        if self.checked.elapsed() >= CREDENTIALS_POLL {
            self.checked = Instant::now();
            if let Ok(tls) = tls_files(plan, ctx) {
                if tls != self.tls {
                    match client(plan, tls.as_ref()) {
                        Ok(next) => {
                            self.current = next;
                            self.tls = tls;
                        }
                        // Loaded by rustls but refused by the client builder: keep the
                        // client in use, and say so once per change.
                        Err(e) => {
                            warn!(sink = %ctx.name, error = %format!("{e:#}"), "new TLS files cannot make an HTTP client; the one in use stays");
                            self.tls = tls;
                        }
                    }
                }
            }
        }
        self.current.clone()
    }
}

/// The sink's TLS files as they are now, or the last set that loaded (`None`: no `tls`).
fn tls_files(plan: &HttpPlan, ctx: &SinkContext) -> Result<Option<LoadedTls>, String> {
    let Some(tls) = &plan.tls else {
        return Ok(None);
    };
    let client_auth = tls.cert.as_deref().zip(tls.key.as_deref());
    ctx.tls_files.read(tls.ca.as_deref(), client_auth).map(Some)
}

fn client(plan: &HttpPlan, tls: Option<&LoadedTls>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(plan.timeout)
        .connect_timeout(plan.timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        // HTTP/2 multiplexes every request over one pooled connection, and a timed-out
        // request does not close it: when a NAT forgot that connection (silence, no
        // RST), every retry went to the same dead connection and the sink never
        // recovered (tests/network_faults.rs, https_h2_nat_forgets_the_connection; the
        // kernel gives up on it only after ~15 minutes of retransmissions). A PING
        // unanswered for `timeout`, sent once nothing arrived for half of it while a
        // request is open, closes the connection and the next attempt opens a new one.
        // HTTP/1.1 drops a connection whose request timed out, so needs none of this.
        .http2_keep_alive_interval(Some((plan.timeout / 2).max(Duration::from_secs(1))))
        .http2_keep_alive_timeout(plan.timeout)
        .http2_keep_alive_while_idle(false)
        .tcp_nodelay(true)
        .user_agent(concat!("edgebridge/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = tls {
        if !tls.ca.is_empty() {
            let certs = reqwest::Certificate::from_pem_bundle(&tls.ca)
                .map_err(|e| anyhow::anyhow!("tls.ca: {e}"))?;
            builder = builder.tls_certs_only(certs);
        }
        if let Some((cert, key)) = &tls.client_auth {
            let mut pem = cert.clone();
            pem.push(b'\n');
            pem.extend_from_slice(key);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| anyhow::anyhow!("tls.cert/tls.key: {e}"))?;
            builder = builder.identity(identity);
        }
    }
    Ok(builder.build()?)
}

/// The result of one attempt.
enum Attempt {
    Status(StatusCode, Option<Duration>),
    /// No response: (reason label, detail).
    Failed(&'static str, String),
}

async fn send(client: &reqwest::Client, plan: &HttpPlan, req: &Request) -> Attempt {
    let mut builder = match plan.method {
        HttpMethod::Post => client.post(&req.target.url),
        HttpMethod::Put => client.put(&req.target.url),
    };
    builder = match &req.target.content_type {
        Some(own) => builder.header(reqwest::header::CONTENT_TYPE, own),
        None => builder.header(reqwest::header::CONTENT_TYPE, &plan.content_type),
    };
    for (name, value) in &req.target.headers {
        builder = builder.header(name, value);
    }
    if plan.idempotency_key {
        builder = builder.header("Idempotency-Key", &req.key);
    }
    builder = match &plan.auth {
        Some(HttpAuth::Bearer(token)) => builder.bearer_auth(token),
        Some(HttpAuth::Basic { username, password }) => {
            builder.basic_auth(username, password.as_ref())
        }
        None => builder,
    };
    match builder.body(req.body.clone()).send().await {
        Ok(response) => {
            let status = response.status();
            let wait = retry_after(response.headers());
            // Read the body so the connection goes back to the pool.
            let _ = response.bytes().await;
            Attempt::Status(status, wait)
        }
        Err(e) => {
            let reason = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else if e.is_builder() {
                "invalid_url"
            } else {
                "io"
            };
            Attempt::Failed(reason, error_chain(&e.without_url()))
        }
    }
}

/// The error with its sources, which name the real cause ("connection refused").
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub async fn run(plan: HttpPlan, ctx: SinkContext) {
    let backoff = ctx.backoff(plan.backoff_min, plan.backoff_max);
    supervise(&ctx, backoff, &mut Posting { plan }).await;
}

/// The HTTP sink's one session: its client built, then requests until shutdown (each
/// request's failure is retried within it; reqwest reconnects on its own).
struct Posting {
    plan: HttpPlan,
}

impl Session for Posting {
    async fn run(&mut self, ctx: &SinkContext, backoff: &mut Backoff) -> Ended {
        match Client::build(&self.plan, ctx) {
            Ok(mut client) => {
                serve(&self.plan, ctx, &mut client, backoff).await;
                Ended::Stopped
            }
            Err(e) => {
                ctx.metrics
                    .mark_down("config", &format!("cannot build the HTTP client: {e:#}"));
                Ended::Failed
            }
        }
    }
}

/// Delivers until shutdown.
async fn serve(plan: &HttpPlan, ctx: &SinkContext, client: &mut Client, backoff: &mut Backoff) {
    let key_prefix = if ctx.buffer.is_durable() {
        format!("{}-{}", plan.gateway_id, ctx.name)
    } else {
        format!(
            "{}-{}-{:08x}",
            plan.gateway_id,
            ctx.name,
            rand::random::<u32>()
        )
    };
    info!(sink = %ctx.name, url = %redact_url(plan.url.source()), format = ?plan.format, "HTTP sink started");
    if let Some(pack) = &plan.pack {
        return serve_packed(plan, ctx, client, backoff, &key_prefix, pack).await;
    }

    let mut pending: VecDeque<Record> = VecDeque::new();
    let mut pacer = ctx.pacer();
    // After a batch was refused as permanent, its records go one per request.
    let mut alone_upto = 0u64;
    loop {
        if !fill(plan, ctx, &mut pending).await {
            return;
        }
        let request = match next_request(plan, &key_prefix, &mut pending, alone_upto) {
            Some(Ok(r)) => r,
            Some(Err((record, problem))) => {
                if ctx
                    .dead_letter(std::slice::from_ref(&record), "invalid_request", &problem)
                    .await
                    .is_err()
                {
                    pending.push_front(record);
                    if ctx.sleep_or_stop(backoff.next_delay()).await {
                        return;
                    }
                }
                continue;
            }
            None => continue,
        };
        match deliver(plan, ctx, client, backoff, pacer.as_mut(), request).await {
            Delivery::Done => {}
            Delivery::Split(records) => {
                alone_upto = records.last().map_or(alone_upto, |r| r.seq);
                for record in records.into_iter().rev() {
                    pending.push_front(record);
                }
            }
            Delivery::Stopped => return,
        }
    }
}

/// Open packs at once: bounds what waits in memory to this many × `pack.max_bytes`.
const MAX_OPEN_PACKS: usize = 64;

/// Delivers packs until shutdown: one request per pack, one request at a time.
async fn serve_packed(
    plan: &HttpPlan,
    ctx: &SinkContext,
    client: &mut Client,
    backoff: &mut Backoff,
    key_prefix: &str,
    pack_plan: &PackPlan,
) {
    let mut packer = Packer::new(pack_plan.clone(), MAX_OPEN_PACKS);
    let mut ready: VecDeque<Pack> = VecDeque::new();
    // Pacing counts requests: one per pack.
    let mut pacer = ctx.pacer();
    loop {
        while ready.is_empty() {
            let linger = packer.next_deadline();
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return,
                _ = pack::linger_until(linger), if linger.is_some() => {
                    packer.close_due(Instant::now(), &mut ready);
                }
                batch = ctx.buffer.read_batch(ctx.batch) => {
                    let now = Instant::now();
                    for record in batch {
                        packer.push(record, usize::MAX, now, &mut ready);
                    }
                }
            }
        }
        let Some(pack) = ready.pop_front() else {
            continue;
        };
        let records = match deliver_pack(
            plan,
            ctx,
            client,
            backoff,
            key_prefix,
            pack,
            pacer.as_mut(),
        )
        .await
        {
            Delivery::Done => continue,
            Delivery::Stopped => return,
            Delivery::Split(records) => records,
        };
        // Refused as the messages' fault: send them one by one so that only the one at
        // fault is dead-lettered; the rest of this topic waits behind them.
        for record in records {
            let single = pack_plan.single(record);
            match deliver_pack(
                plan,
                ctx,
                client,
                backoff,
                key_prefix,
                single,
                pacer.as_mut(),
            )
            .await
            {
                Delivery::Stopped => return,
                Delivery::Done | Delivery::Split(_) => {}
            }
        }
    }
}

/// Sends one pack as a request until it is delivered or dead-lettered.
async fn deliver_pack(
    plan: &HttpPlan,
    ctx: &SinkContext,
    client: &mut Client,
    backoff: &mut Backoff,
    key_prefix: &str,
    pack: Pack,
    pacer: Option<&mut Pacer>,
) -> Delivery {
    let target = match render_target(plan, &pack.key, None) {
        Ok(t) => t,
        Err(problem) => {
            while ctx
                .dead_letter(&pack.records, "invalid_request", &problem)
                .await
                .is_err()
            {
                if ctx.sleep_or_stop(backoff.next_delay()).await {
                    return Delivery::Stopped;
                }
            }
            return Delivery::Done;
        }
    };
    let key = match pack.records.as_slice() {
        [one] => format!("{key_prefix}-{}", one.seq),
        [first, .., last] => format!("{key_prefix}-{}-{}", first.seq, last.seq),
        [] => return Delivery::Done,
    };
    let request = Request {
        records: pack.records,
        target,
        body: pack.body,
        key,
    };
    deliver(plan, ctx, client, backoff, pacer, request).await
}

/// Reads from the buffer into `pending`: waits for at least one record, then (batch
/// formats) up to `max_delay` for a full batch. `false` when shutdown began.
async fn fill(plan: &HttpPlan, ctx: &SinkContext, pending: &mut VecDeque<Record>) -> bool {
    let want = plan.max_messages;
    if pending.is_empty() {
        tokio::select! {
            batch = ctx.buffer.read_batch(want.max(ctx.batch)) => pending.extend(batch),
            _ = ctx.shutdown.cancelled() => return false,
        }
    }
    if plan.format.batches() && pending.len() < want && !plan.max_delay.is_zero() {
        let deadline = Instant::now() + plan.max_delay;
        while pending.len() < want {
            tokio::select! {
                batch = ctx.buffer.read_batch(want - pending.len()) => pending.extend(batch),
                _ = tokio::time::sleep_until(deadline) => break,
                _ = ctx.shutdown.cancelled() => break,
            }
        }
    }
    true
}

enum Delivery {
    /// Delivered or dead-lettered; go on.
    Done,
    /// A batch refused as permanent: send these again one by one.
    Split(Vec<Record>),
    /// Shutdown began; the records stay in the buffer.
    Stopped,
}

/// Sends `req` until it is delivered or dead-lettered.
async fn deliver(
    plan: &HttpPlan,
    ctx: &SinkContext,
    client: &mut Client,
    backoff: &mut Backoff,
    mut pacer: Option<&mut Pacer>,
    req: Request,
) -> Delivery {
    loop {
        // Every attempt is a request on the wire, a retry too.
        if let Some(pacer) = pacer.as_deref_mut() {
            tokio::select! {
                _ = pacer.acquire(req.body.len()) => {}
                _ = ctx.shutdown.cancelled() => return Delivery::Stopped,
            }
        }
        let attempt = {
            let current = client.get(plan, ctx);
            let attempt = send(&current, plan, &req);
            tokio::pin!(attempt);
            tokio::select! {
                a = &mut attempt => a,
                _ = ctx.shutdown.cancelled() => {
                    // Let the request in flight finish within the grace period.
                    match tokio::time::timeout(ctx.grace, &mut attempt).await {
                        Ok(a) => a,
                        Err(_) => return Delivery::Stopped,
                    }
                }
            }
        };
        let (reason, detail, wait) = match attempt {
            Attempt::Status(status, wait) => {
                let code = status.as_u16();
                match verdict(code, &plan.retry_on, &plan.permanent_on) {
                    Verdict::Delivered => {
                        for record in &req.records {
                            ctx.buffer.ack(record.seq);
                            ctx.metrics.delivered(record.msg.received_at);
                        }
                        ctx.up(&format!("HTTP {code}"));
                        ctx.acked();
                        backoff.reset();
                        return Delivery::Done;
                    }
                    Verdict::Permanent if req.records.len() > 1 => {
                        ctx.metrics.error(&format!("http_{code}"));
                        warn!(sink = %ctx.name, status = code, messages = req.records.len(), "batch refused; sending its messages one by one to find the one at fault");
                        return Delivery::Split(req.records);
                    }
                    Verdict::Permanent => {
                        // The server works; this message never will.
                        ctx.up(&format!("HTTP {code}"));
                        let reason = format!("http_{code}");
                        if ctx
                            .dead_letter(&req.records, &reason, &format!("HTTP {status}"))
                            .await
                            .is_ok()
                        {
                            return Delivery::Done;
                        }
                        (
                            "dead_letter".to_string(),
                            "cannot write the dead-letter file".to_string(),
                            None,
                        )
                    }
                    Verdict::RetryConfig => (
                        format!("http_{code}"),
                        format!("HTTP {status}: check the sink's credentials and permissions"),
                        wait,
                    ),
                    Verdict::Retry => (format!("http_{code}"), format!("HTTP {status}"), wait),
                }
            }
            Attempt::Failed(reason, detail) => (reason.to_string(), detail, None),
        };
        ctx.metrics.mark_down(&reason, &detail);
        let delay = wait.unwrap_or_else(|| backoff.next_delay());
        if ctx.sleep_or_stop(delay).await {
            return Delivery::Stopped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_table() {
        use Verdict::*;
        let table: &[(u16, Verdict)] = &[
            (200, Delivered),
            (201, Delivered),
            (204, Delivered),
            (400, Permanent),
            (401, RetryConfig),
            (403, RetryConfig),
            (404, Permanent),
            (408, Retry),
            (409, Permanent),
            (413, Permanent),
            (422, Permanent),
            (429, Retry),
            (500, Retry),
            (502, Retry),
            (503, Retry),
            (504, Retry),
            (304, Retry),
        ];
        for &(status, expected) in table {
            assert_eq!(verdict(status, &[], &[]), expected, "status {status}");
        }
        // Overrides win.
        assert_eq!(verdict(404, &[404], &[]), Retry);
        assert_eq!(verdict(503, &[], &[503]), Permanent);
        assert_eq!(verdict(200, &[], &[]), Delivered);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("999999"),
        );
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_str(&date).unwrap(),
        );
        let wait = retry_after(&h).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("soon"),
        );
        assert_eq!(retry_after(&h), None);
    }

    fn plan(extra: &str) -> Result<HttpPlan, Vec<String>> {
        let section: HttpSinkSection =
            toml::from_str(&format!("url = \"http://h/x\"\n{extra}")).expect("toml");
        let mut errors = Vec::new();
        let plan = config::validate("sinks.hook", &section, "gw", &mut |k, e| {
            errors.push(format!("{k}: {e}"))
        });
        plan.ok_or(errors)
    }

    #[test]
    fn user_properties_become_headers_any_key_a_valid_name() {
        let raw = plan("format = \"raw\"\nproperty_headers = \"X-Mqtt-\"").expect("valid");
        let props = Properties {
            user_properties: vec![
                ("Line".into(), "4".into()),
                ("a b:ü".into(), "wert ü".into()),
            ],
            content_type: Some("text/csv".into()),
            ..Properties::default()
        };
        let target = render_target(&raw, "t", Some(&props)).expect("target");
        let headers: Vec<(String, String)> = target
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        assert_eq!(
            headers,
            [
                ("x-mqtt-line".to_string(), "4".to_string()),
                (
                    "x-mqtt-a%20b%3a%c3%bc".to_string(),
                    "wert %C3%BC".to_string()
                ),
            ]
        );
        assert_eq!(
            target.content_type,
            Some(HeaderValue::from_static("text/csv"))
        );
        // Without a prefix: no property headers; a JSON body keeps its own content type.
        let json = plan("").expect("valid");
        let target = render_target(&json, "t", Some(&props)).expect("target");
        assert!(target.headers.is_empty() && target.content_type.is_none());
        for bad in ["\"\"", "\"x y\""] {
            let e = plan(&format!("property_headers = {bad}")).expect_err("refused");
            assert!(e[0].starts_with("sinks.hook.property_headers: "), "{e:?}");
        }
    }

    #[test]
    fn topic_levels_are_escaped_for_urls() {
        let (escaped, ranges) = url_topic("plant/line 1/温度?x");
        assert_eq!(escaped, "plant/line%201/%E6%B8%A9%E5%BA%A6%3Fx");
        assert_eq!(&escaped[ranges[1].0..ranges[1].1], "line%201");
        assert_eq!(ranges.len(), 3);
        assert_eq!(level_ranges("a//b"), vec![(0, 1), (2, 2), (3, 4)]);
    }
}
