//! What `edgebridge check` prints of a valid plan: every section resolved, defaults
//! filled in, secrets masked.

use super::*;
use crate::units::spelled;

impl Plan {
    /// The rules (and `fallback`) that send to sink `index`, by name.
    pub fn rules_to(&self, index: usize) -> Vec<String> {
        let mut names: Vec<String> = self
            .rules
            .iter()
            .filter(|r| r.to.iter().any(|t| t.sink == index))
            .map(|r| format!("rule {:?}", r.name))
            .collect();
        if self.fallback.iter().any(|t| t.sink == index) {
            names.push("fallback".into());
        }
        names
    }

    /// `sink`, `sink topic=...`, `sink payload=...`, comma separated.
    fn describe_targets(&self, targets: &[TargetPlan]) -> String {
        let parts: Vec<String> = targets
            .iter()
            .map(|t| {
                let mut s = self.sinks[t.sink].name.clone();
                if let Some(topic) = &t.topic {
                    s += &format!(" topic={}", topic.source());
                }
                if let Some(payload) = &t.payload {
                    s += &format!(" payload={}", payload.source());
                }
                s
            })
            .collect();
        parts.join(", ")
    }

    /// What `check` warns of for MQTT sink `index`: messages larger than it takes, and
    /// properties a 3.1.1 upstream drops.
    fn mqtt_warnings(&self, index: usize, m: &MqttPlan) -> Vec<String> {
        let mut warnings = Vec::new();
        // A device's largest publish that a rule can send here, against what one upstream
        // packet takes (a pack splits nothing: each message must fit).
        let largest = self
            .listeners
            .iter()
            .max_by_key(|l| l.max_packet_size)
            .filter(|l| l.max_packet_size > m.max_packet_size);
        if let Some(l) = largest.filter(|_| !self.rules_to(index).is_empty()) {
            warnings.push(format!(
                "listener {} takes publishes up to {} bytes, this sink's max_packet_size is {}: \
                 a larger message routed here is acknowledged to its device, then dead-lettered \
                 (lower the listener's max_packet_size or raise the sink's)",
                l.name, l.max_packet_size, m.max_packet_size
            ));
        }
        if m.protocol != MqttProtocol::V311 {
            return warnings;
        }
        let rules = self.rules_to(index);
        if !rules.is_empty() {
            warnings.push(format!(
                "MQTT 3.1.1 upstream: the MQTT 5 properties of messages from {} (user \
                 properties, content type, payload format, response topic, correlation data, \
                 message expiry) are dropped",
                rules.join(", ")
            ));
        }
        let editing: Vec<String> = self
            .rules
            .iter()
            .filter(|r| {
                r.to.iter()
                    .any(|t| t.sink == index && t.properties.is_some())
            })
            .map(|r| format!("{:?}", r.name))
            .collect();
        if !editing.is_empty() {
            warnings.push(format!(
                "the [rules.properties] of rule {} have no effect on this sink",
                editing.join(", ")
            ));
        }
        warnings
    }

    /// The resolved plan as printed by `edgebridge check`; secrets are masked.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "gateway {} (data_dir {})",
            self.gateway_id,
            self.data_dir.display()
        );
        let _ = write!(out, "admin http://{}", self.admin_bind);
        if self.history_interval != default_history_interval().0 {
            let _ = write!(
                out,
                " history_interval={}",
                humantime::format_duration(self.history_interval)
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "listeners:");
        for l in &self.listeners {
            let tls = match &l.tls {
                Some(t) => format!(
                    " cert={} key=**** client_ca={}",
                    t.cert.display(),
                    t.client_ca
                        .as_ref()
                        .map_or("none".into(), |p| p.display().to_string())
                ),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "  {} {}://{} (MQTT 3.1.1 + 5) ack={} max_connections={} max_packet_size={} allow_anonymous={}{tls}",
                l.name, l.scheme(), l.bind, spelled(&l.ack), l.max_connections, l.max_packet_size, l.allow_anonymous
            );
        }
        describe_auth(&self.auth, &mut out);
        let _ = writeln!(out, "sinks:");
        for (index, s) in self.sinks.iter().enumerate() {
            let buffer = describe_buffer(s);
            match &s.kind {
                SinkKindPlan::Mqtt(m) => {
                    let _ = writeln!(out, "  {} mqtt {}; {buffer}", s.name, mqtt_line(m));
                    for note in &m.notes {
                        let _ = writeln!(out, "    {}: {note}", m.profile.map_or("", |p| p.name()));
                    }
                    for warning in self.mqtt_warnings(index, m) {
                        let _ = writeln!(out, "    warning: {warning}");
                    }
                    if let Some(failover) = failover_line(m) {
                        let _ = writeln!(out, "    failover: {failover}");
                    }
                }
                SinkKindPlan::Http(h) => {
                    let _ = writeln!(out, "  {} http {}; {buffer}", s.name, h.describe());
                }
                SinkKindPlan::Kafka(k) => {
                    let _ = writeln!(out, "  {} kafka {}; {buffer}", s.name, k.describe());
                }
                SinkKindPlan::File(f) => {
                    let _ = writeln!(out, "  {} file {}; {buffer}", s.name, f.path.display());
                }
            }
        }
        let _ = writeln!(out, "rules:");
        for r in &self.rules {
            let condition = r
                .condition
                .as_ref()
                .map(|c| format!(" where {}", c.source()))
                .unwrap_or_default();
            let stop = if r.stop { " (continue = false)" } else { "" };
            let to = self.describe_targets(&r.to);
            let properties =
                r.to.first()
                    .and_then(|t| t.properties.as_ref())
                    .map(|e| format!(" properties: {}", e.describe()))
                    .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} {}{condition} -> {to}{stop}{properties}",
                r.name, r.filter
            );
        }
        if !self.fallback.is_empty() {
            let _ = writeln!(out, "fallback -> {}", self.describe_targets(&self.fallback));
        }
        if !self.downlinks.is_empty() {
            let _ = writeln!(out, "downlinks:");
        }
        for d in &self.downlinks {
            let _ = writeln!(
                out,
                "  {} {} (qos {}) -> local {}{}",
                self.sinks[d.sink].name,
                d.filter,
                d.qos,
                d.topic.source(),
                if d.retain { " retained" } else { "" }
            );
        }
        out
    }
}

/// `[auth]` as `check` prints it: the users file, then each ACL entry.
fn describe_auth(auth: &AuthPlan, out: &mut String) {
    use std::fmt::Write;
    match &auth.users_file {
        Some(f) => {
            let _ = writeln!(out, "auth: users_file {}", f.display());
        }
        None => {
            let _ = writeln!(out, "auth: no users file (usernames are not verified)");
        }
    }
    for a in &auth.acl {
        let sel = |name: &str, g: &Option<crate::broker::Glob>| {
            g.as_ref()
                .map(|g| format!(" {name}={}", g.pattern()))
                .unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "  acl{}{}{} publish={:?} subscribe={:?}",
            sel("user", &a.user),
            sel("cn", &a.cn),
            sel("client_id", &a.client_id),
            a.publish,
            a.subscribe
        );
    }
}

/// A sink's buffer and pacing, as `check` prints them after its upstream.
fn describe_buffer(s: &SinkPlan) -> String {
    let b = &s.buffer;
    let buffer = format!(
        "buffer {} max_bytes={} when_full={} sync={}{}",
        spelled(&b.storage),
        b.max_bytes.0,
        spelled(&b.when_full),
        spelled(&b.sync),
        b.ttl
            .map(|t| format!(" ttl={}", humantime::format_duration(t.0)))
            .unwrap_or_default()
    ) + match b.drain {
        Drain::Ordered => "",
        Drain::LiveFirst => " drain=live_first",
    };
    match &s.rate {
        Some(rate) => format!("{buffer}; rate {}", rate.describe()),
        None => buffer,
    }
}

/// An MQTT sink's upstream: endpoints, profile, client ids, QoS, protocol, credentials
/// (masked), TLS and packing.
fn mqtt_line(m: &MqttPlan) -> String {
    let scheme = if m.tls.is_some() { "mqtts" } else { "mqtt" };
    let auth = match (&m.username, &m.password) {
        (Some(u), Some(_)) => format!(" user={u} password=****"),
        (Some(u), None) => format!(" user={u}"),
        _ => String::new(),
    };
    let tls = match &m.tls {
        Some(t) => format!(
            " ca={} client_cert={} alpn={:?}",
            t.ca.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            if t.client_auth.is_some() {
                "yes (key ****)"
            } else {
                "no"
            },
            t.alpn
        ),
        None => String::new(),
    };
    let profile = m
        .profile
        .map(|p| format!(" profile={}", p.name()))
        .unwrap_or_default();
    let urls: Vec<String> = m
        .endpoints
        .iter()
        .map(|e| format!("{scheme}://{e}"))
        .collect();
    let url = match urls.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let pack = m
        .pack
        .as_ref()
        .map(|p| format!(" {}", p.describe()))
        .unwrap_or_default();
    let client_ids = match m.client_ids.as_slice() {
        [one] => one.clone(),
        ids => format!("{} (connections={}, by topic)", ids.join(","), ids.len()),
    };
    format!(
        "{url}{profile} client_id={client_ids} qos={} protocol={}{auth}{tls}{pack}",
        m.qos,
        m.protocol.name()
    )
}

/// With a list of endpoints: when the sink fails over and back.
fn failover_line(m: &MqttPlan) -> Option<String> {
    let scheme = if m.tls.is_some() { "mqtts" } else { "mqtt" };
    let [primary, _, ..] = m.endpoints.as_slice() else {
        return None;
    };
    Some(format!(
        "to the next url after {} failed connection attempts in a row; back to \
         {scheme}://{primary} once a check every {} connects (client id {}-probe)",
        m.failover_after,
        humantime::format_duration(m.failback_check),
        m.client_id
    ))
}
