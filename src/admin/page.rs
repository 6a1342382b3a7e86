//! The status page (`/`): the [`Status`] as server-rendered HTML for a browser or a
//! phone on the plant floor, with a small chart per sink from its samples. Every string
//! from the config is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Phase, Sample, SinkStatus, Status, PAGE_REFRESH_SECONDS};

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234567` → `1.2 MiB`.
fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// Seconds as `3d 4h`, `5m 12s`, `42s`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    let (d, h, m, s) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn rate(per_second: Option<f64>) -> String {
    per_second.map_or_else(|| "–".to_string(), |r| format!("{r:.1}/s"))
}

/// Counts by reason as `reason n, reason n`, or `0`.
fn reasons(counts: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(reason, n)| format!("{} {n}", escape(reason)))
        .collect();
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join(", ")
    }
}

fn timestamp(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = SystemTime::now()
        .duration_since(at)
        .unwrap_or_default()
        .as_secs_f64();
    let rfc3339 = humantime::format_rfc3339_seconds(at).to_string();
    let readable = rfc3339.replace('T', " ");
    format!("{} UTC, {} ago", readable.trim_end_matches('Z'), age(ago))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;padding:1rem;background:#f4f5f7;color:#1d2330}\
h1{font-size:1.3rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.2rem 0 .5rem}\
.meta{color:#555;font-size:.9rem}\
.card{background:#fff;border-radius:8px;padding:.8rem;margin:.5rem 0;box-shadow:0 1px 2px #0002}\
.card h3{margin:0 0 .4rem;font-size:1.05rem;display:flex;gap:.5rem;align-items:center;flex-wrap:wrap}\
.badge{font-size:.8rem;padding:.1rem .5rem;border-radius:99px;color:#fff}\
.up{background:#1a7f37}.down{background:#c62828}.draining{background:#b26a00}\
.starting,.stopping{background:#666}.running{background:#1a7f37}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem .8rem;margin:0}\
dt{color:#555}dd{margin:0;overflow-wrap:anywhere}\
.error{color:#c62828}\
table{border-collapse:collapse;width:100%;background:#fff;border-radius:8px}\
td,th{text-align:left;padding:.4rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}\
td{overflow-wrap:break-word}th{white-space:nowrap}\
figure.chart{display:inline-block;margin:0 .8rem .3rem 0}\
figure.chart svg{width:180px;height:36px;background:#f4f4f4;display:block}\
figure.chart polyline{fill:none;stroke:#1565c0;stroke-width:1.5;vector-effect:non-scaling-stroke}\
figcaption{font-size:.8rem;color:#555}";

/// A sink's buffer in words: what waits, `.corrupt` files kept, and the drain's progress.
fn backlog(k: &SinkStatus) -> String {
    let mut backlog = if k.buffer.messages > 0 {
        format!(
            "{} messages, {}, oldest {}",
            k.buffer.messages,
            bytes(k.buffer.bytes),
            age(k.buffer.oldest_age_seconds)
        )
    } else {
        "empty".into()
    };
    if k.buffer.corrupt_files > 0 {
        let _ = write!(
            backlog,
            "; {} .corrupt file(s) kept for inspection ({})",
            k.buffer.corrupt_files,
            bytes(k.buffer.corrupt_bytes)
        );
    }
    if k.buffer.backlog > 0 {
        let _ = write!(backlog, "; draining {} from the outage", k.buffer.backlog);
        if let Some(eta) = k.drain_eta_seconds {
            let _ = write!(backlog, ", about {} left", age(eta));
        }
    }
    backlog
}

/// The status page: listeners, sinks, rules. Every config-derived string is escaped.
pub fn render_page(s: &Status) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{PAGE_REFRESH_SECONDS}\">\
         <title>edgebridge {id}</title><style>{STYLE}</style></head><body>\
         <h1>edgebridge {id} <span class=\"badge {phase}\" id=\"gateway-state\">{phase}</span></h1>\
         <div class=\"meta\">version {version} · up {uptime} · refreshes every {PAGE_REFRESH_SECONDS}s · \
         <a href=\"/api/v1/status\">JSON</a> · <a href=\"/metrics\">metrics</a></div>",
        id = escape(&s.gateway_id),
        phase = phase_name(s.state),
        version = escape(s.version),
        uptime = age(s.uptime_seconds as f64),
    );

    h.push_str("<h2>Listeners</h2>");
    for l in &s.listeners {
        let _ = write!(
            h,
            "<div class=\"card listener\"><h3>{name}</h3><dl>\
             <dt>address</dt><dd>{addr}</dd>\
             <dt>connections</dt><dd>{connections}</dd>\
             <dt>received</dt><dd>{received} ({rate})</dd>\
             <dt>not taken in</dt><dd>{dropped}</dd></dl></div>",
            name = escape(&l.name),
            addr = escape(&l.addr),
            connections = l.connections,
            received = l.received,
            rate = rate(l.received_per_second),
            dropped = reasons(&l.dropped),
        );
    }

    h.push_str("<h2>Sinks</h2>");
    for k in &s.sinks {
        let last_error = match &k.last_error {
            Some(e) => format!(
                "<dd class=\"error\">{}: {} <br><small>{}</small></dd>",
                escape(&e.reason),
                escape(&e.detail),
                timestamp(e.at)
            ),
            None => "<dd>none</dd>".into(),
        };
        let backlog = backlog(k);
        let charts = charts(&k.name, &k.history);
        // Shown only with failover (more than one endpoint): otherwise it is the target.
        let endpoint = match &k.endpoint {
            Some(e) if e.list.len() > 1 => {
                let role = if e.index == 0 { "primary" } else { "failover" };
                format!(
                    "<dt>endpoint</dt><dd class=\"endpoint\">{} ({role}; {} of {}: {})</dd>",
                    escape(&e.in_use),
                    e.index + 1,
                    e.list.len(),
                    escape(&e.list.join(", "))
                )
            }
            _ => String::new(),
        };
        let _ = write!(
            h,
            "<div class=\"card sink\" id=\"sink-{name}\"><h3><span class=\"sink-name\">{name}</span>\
             <span class=\"badge {state}\">{state}</span></h3><dl>\
             <dt>target</dt><dd>{kind} {target}</dd>{endpoint}\
             <dt>pacing</dt><dd>{pacing}</dd>\
             <dt>backlog</dt><dd>{backlog}</dd>\
             <dt>delivered</dt><dd>{delivered} ({rate})</dd>\
             <dt>errors</dt><dd>{errors}</dd>\
             <dt>dropped</dt><dd>{dropped}</dd>\
             <dt>last error</dt>{last_error}\
             <dt>recent</dt><dd>{charts}</dd></dl></div>",
            name = escape(&k.name),
            state = k.state,
            kind = k.kind,
            target = escape(&k.target),
            pacing = k.pacing.as_deref().map_or("none".into(), escape),
            delivered = k.delivered,
            rate = rate(k.delivered_per_second),
            errors = reasons(&k.errors),
            dropped = reasons(&k.dropped),
        );
    }

    h.push_str(
        "<h2>Rules</h2><table><tr><th>name</th><th>from</th><th>to</th><th>matches</th></tr>",
    );
    for r in &s.rules {
        let to: Vec<String> = r.to.iter().map(|t| escape(t)).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.name),
            escape(&r.from),
            to.join(", "),
            r.matches
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

/// The received rate, delivered rate and messages waiting of one sink as three small
/// inline SVG line charts (no script, no external resource), each labelled with its
/// last and highest value.
fn charts(sink: &str, samples: &[Sample]) -> String {
    if samples.is_empty() {
        return "no samples yet".into();
    }
    let series: [(&str, &str, Vec<f64>); 3] = [
        (
            "received",
            "received msg/s",
            samples.iter().map(|s| s.received_per_second).collect(),
        ),
        (
            "delivered",
            "delivered msg/s",
            samples.iter().map(|s| s.delivered_per_second).collect(),
        ),
        (
            "waiting",
            "waiting",
            samples.iter().map(|s| s.pending as f64).collect(),
        ),
    ];
    let mut out = String::new();
    for (id, label, values) in series {
        out += &sparkline(&format!("chart-{}-{id}", escape(sink)), label, &values);
    }
    out
}

/// Chart width and height in SVG units.
const CHART_W: f64 = 180.0;
const CHART_H: f64 = 36.0;

fn sparkline(id: &str, label: &str, values: &[f64]) -> String {
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let last = values.last().copied().unwrap_or(0.0);
    let step = CHART_W / (values.len().max(2) - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let y = if max > 0.0 {
                CHART_H - v / max * CHART_H
            } else {
                CHART_H
            };
            format!("{:.1},{:.1}", i as f64 * step, y)
        })
        .collect();
    format!(
        "<figure class=\"chart\"><svg id=\"{id}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" \
         preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{label}: now {last}, highest {max}\">\
         <polyline points=\"{}\"/></svg><figcaption>{label}: {} (max {})</figcaption></figure>",
        points.join(" "),
        number(last),
        number(max),
    )
}

/// A chart value: whole numbers without decimals, others with one.
fn number(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Stopping => "stopping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{BufferStatus, EndpointStatus, ListenerStatus, RuleStatus, SinkStatus};
    use crate::message::now_millis;
    use crate::sinks::LastError;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
        assert_eq!(escape("plain/topic/+"), "plain/topic/+");
    }

    #[test]
    fn sizes_and_ages_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(age(42.7), "42s");
        assert_eq!(age(312.0), "5m 12s");
        assert_eq!(age(3.0 * 86_400.0 + 4.0 * 3_600.0 + 5.0), "3d 4h");
    }

    #[test]
    fn the_page_escapes_every_config_string() {
        let status = Status {
            version: "0.1.0",
            gateway_id: "gw<1>".into(),
            state: Phase::Running,
            started_at: 0,
            uptime_seconds: 65,
            listeners: vec![ListenerStatus {
                name: "dev<ices>".into(),
                addr: "127.0.0.1:1883".into(),
                connections: 3,
                received: 10,
                received_per_second: Some(2.5),
                dropped: BTreeMap::new(),
            }],
            sinks: vec![SinkStatus {
                name: "cl\"oud".into(),
                kind: "mqtt",
                target: "mqtt://<host>:1883".into(),
                endpoint: Some(EndpointStatus {
                    in_use: "<backup>:1883".into(),
                    index: 1,
                    list: vec!["<host>:1883".into(), "<backup>:1883".into()],
                }),
                pacing: Some("100 msg/s per connection (1)".into()),
                up: false,
                state: "down",
                last_error: Some(LastError {
                    reason: "connection_refused".into(),
                    detail: "<b>refused</b>".into(),
                    at: now_millis(),
                }),
                buffer: BufferStatus {
                    messages: 7,
                    bytes: 2048,
                    oldest_age_seconds: 75.0,
                    backlog: 4,
                    corrupt_files: 2,
                    corrupt_bytes: 3072,
                },
                delivered: 0,
                delivered_per_second: None,
                errors_total: 2,
                errors: BTreeMap::from([("connection_refused".to_string(), 2)]),
                dropped_total: 0,
                dropped: BTreeMap::new(),
                drain_eta_seconds: Some(90.0),
                history: vec![
                    Sample {
                        at: 0,
                        received_per_second: 2.5,
                        delivered_per_second: 0.0,
                        pending: 3,
                        backlog: 0,
                    },
                    Sample {
                        at: 10_000,
                        received_per_second: 5.0,
                        delivered_per_second: 1.0,
                        pending: 7,
                        backlog: 4,
                    },
                ],
            }],
            rules: vec![RuleStatus {
                name: "r&d".into(),
                from: "a/<b>/#".into(),
                to: vec!["cl\"oud".into()],
                matches: 10,
            }],
        };
        let page = render_page(&status);
        for raw in [
            "gw<1>",
            "dev<ices>",
            "cl\"oud",
            "<host>",
            "<b>refused",
            "<backup>",
            "r&d",
            "a/<b>",
        ] {
            assert!(!page.contains(raw), "{raw} unescaped in:\n{page}");
        }
        for shown in [
            "gw&lt;1&gt;",
            "cl&quot;oud",
            "mqtt://&lt;host&gt;:1883",
            "&lt;backup&gt;:1883 (failover; 2 of 2: &lt;host&gt;:1883, &lt;backup&gt;:1883)",
            "7 messages, 2.0 KiB, oldest 1m 15s; 2 .corrupt file(s) kept for inspection (3.0 KiB)",
            "connection_refused 2",
            "2.5/s",
            "a/&lt;b&gt;/#",
            "draining 4 from the outage, about 1m 30s left",
            "<dt>pacing</dt><dd>100 msg/s per connection (1)</dd>",
            "id=\"chart-cl&quot;oud-waiting\"",
            "<polyline points=\"0.0,20.6 180.0,0.0\"/>",
            "waiting: 7 (max 7)",
            "received msg/s: 5 (max 5)",
        ] {
            assert!(page.contains(shown), "{shown} missing in:\n{page}");
        }
        assert!(page.contains("name=\"viewport\""));
        assert!(page.contains("http-equiv=\"refresh\""));
    }
}
