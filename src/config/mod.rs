//! Configuration: loading and validation, the composition root of every owner's section.
//!
//! Loading (`load.rs`) layers the built-in defaults (serde defaults on every section)
//! under the TOML file, under `EDGEBRIDGE_<SECTION>__<KEY>` environment variables, then
//! replaces `${VAR}` in string values from the environment and `${file:…}` by a file's
//! content. Unknown keys are errors.
//!
//! Validation (`validate`) reads nothing but the files it names (do they exist, does
//! `gateway.data_dir` take a new file: a probe created and removed at once): it turns the
//! raw [`Config`] into a typed [`Plan`] (parsed addresses, URLs, sizes, compiled topic
//! filters and templates) or into a list of [`ConfigError`]s, one per problem, each
//! naming the key path. Nothing downstream validates again.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Profile, Provider};
use serde::{Deserialize, Serialize};

pub use crate::broker::config::{
    AckMode, AclSection, AuthPlan, AuthSection, BrokerSection, ListenerPlan, ListenerSection,
    ListenerTls,
};
pub use crate::buffer::config::{BufferSection, Drain, Storage, SyncPolicy, WhenFull};
pub use crate::rules::config::{
    DownlinkPlan, DownlinkSection, FallbackSection, RulePlan, RuleSection, TargetPlan,
    TargetSection, TargetTable,
};
use crate::rules::{Template, TopicFilter};
use crate::sinks::cloud::{self, CloudProfile};
pub use crate::sinks::config::{FilePlan, FileSinkSection, SinkKindPlan, SinkPlan, SinkSection};
use crate::sinks::http::HttpSinkSection;
use crate::sinks::kafka::KafkaSinkSection;
pub use crate::sinks::mqtt::config::{
    Connections, MqttPlan, MqttProtocol, MqttSinkSection, TlsPlan, TlsSection, UrlList,
};
use crate::sinks::pacing::validate_rate;
pub use crate::sinks::pacing::RateSection;
pub use crate::units::{ByteSize, HumanDuration};

mod describe;
mod load;

pub use load::{load, load_with_env, SecretFile};

/// One problem with the configuration, named by its key path (`sinks.cloud.url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A list of configuration problems; printed one per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------------------
// Value types with human-friendly syntax (sizes and durations: crate::units)
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Raw configuration, as written in TOML
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub broker: BrokerSection,
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerSection>,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkSection>,
    #[serde(default)]
    pub rules: Vec<RuleSection>,
    /// Where messages go that no rule matched.
    #[serde(default)]
    pub fallback: Option<FallbackSection>,
    /// Cloud-to-device: upstream subscriptions published to local devices.
    #[serde(default)]
    pub downlinks: Vec<DownlinkSection>,
    #[serde(default)]
    pub log: LogSection,
    /// Device users and topic permissions.
    #[serde(default)]
    pub auth: AuthSection,
    /// The files `${file:…}` read while loading, with a digest of what each held (not
    /// config keys: filled by [`load`]).
    #[serde(skip)]
    pub secret_files: Vec<SecretFile>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Used in client ids, templates (`{gateway_id}`) and logs.
    #[serde(default = "default_gateway_id")]
    pub id: String,
    /// Buffers and state live here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Grace period for sinks to finish in-flight sends on shutdown.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            id: default_gateway_id(),
            data_dir: default_data_dir(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_admin_bind")]
    pub bind: String,
    /// How often the status page's charts take a sample; they keep 360 (one hour at 10 s).
    #[serde(default = "default_history_interval")]
    pub history_interval: HumanDuration,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            bind: default_admin_bind(),
            history_interval: default_history_interval(),
        }
    }
}

fn default_history_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `tracing` filter; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_gateway_id() -> String {
    "edge-01".into()
}
fn default_data_dir() -> PathBuf {
    "data".into()
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_admin_bind() -> String {
    "127.0.0.1:9464".into()
}
fn default_listeners() -> Vec<ListenerSection> {
    vec![ListenerSection::plain("devices", "0.0.0.0:1883")]
}
fn default_log_level() -> String {
    "info".into()
}

// ---------------------------------------------------------------------------------------
// The validated plan
// ---------------------------------------------------------------------------------------

/// Everything the gateway needs to start, validated and typed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub gateway_id: String,
    pub data_dir: PathBuf,
    pub shutdown_grace: Duration,
    pub admin_bind: SocketAddr,
    /// Sampling interval of the status page's charts.
    pub history_interval: Duration,
    pub broker: BrokerSection,
    pub listeners: Vec<ListenerPlan>,
    pub sinks: Vec<SinkPlan>,
    pub rules: Vec<RulePlan>,
    /// Targets of messages no rule matched (empty: they go nowhere).
    pub fallback: Vec<TargetPlan>,
    pub downlinks: Vec<DownlinkPlan>,
    pub log: LogSection,
    pub auth: AuthPlan,
    /// Files `${file:…}` read; a change reloads the config.
    pub secret_files: Vec<SecretFile>,
}

/// Checks `config` and builds the [`Plan`]; every problem found is reported.
pub fn validate(config: &Config) -> Result<Plan, ConfigErrors> {
    let mut errors = Vec::new();
    let mut err = |path: String, msg: String| errors.push(ConfigError::new(path, msg));

    let gateway_id = config.gateway.id.clone();
    if gateway_id.is_empty() || gateway_id.contains(['/', '+', '#', '$']) {
        err(
            "gateway.id".into(),
            "must be non-empty and must not contain / + # $".into(),
        );
    }

    let admin_bind = match config.admin.bind.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(e) => {
            err(
                "admin.bind".into(),
                format!("not a host:port address ({e})"),
            );
            None
        }
    };

    let history_interval = config.admin.history_interval.0;
    if history_interval < Duration::from_secs(1) || history_interval > Duration::from_secs(600) {
        err(
            "admin.history_interval".into(),
            "must be between 1s and 10m".into(),
        );
    }

    let broker = config.broker.clone();
    broker.validate(&mut err);

    let listeners = crate::broker::config::validate_listeners(
        &config.listeners,
        config.auth.users_file.is_none(),
        &mut err,
    );

    check_addresses(&config.listeners, admin_bind, &mut err);
    if let Err(why) = writable_dir(&config.gateway.data_dir) {
        err("gateway.data_dir".into(), why);
    }

    let sinks = config
        .sinks
        .iter()
        .filter_map(|(name, sink)| validate_sink(name, sink, &gateway_id, &mut err))
        .collect();

    let sink_names: Vec<&String> = config.sinks.keys().collect();
    let rules = crate::rules::config::validate_rules(&config.rules, &sink_names, &mut err);
    let fallback =
        crate::rules::config::validate_fallback(config.fallback.as_ref(), &sink_names, &mut err);

    let downlinks = crate::rules::config::validate_downlinks(
        &config.downlinks,
        &gateway_id,
        |name| {
            let index = config.sinks.keys().position(|k| k == name)?;
            let is_mqtt = matches!(config.sinks.get(name), Some(SinkSection::Mqtt(_)));
            Some((index, is_mqtt))
        },
        &mut err,
    );

    check_aws_topics(config, &rules, &gateway_id, &mut err);
    let auth = config.auth.validate(&mut err);

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Plan {
        gateway_id,
        data_dir: config.gateway.data_dir.clone(),
        shutdown_grace: config.gateway.shutdown_grace.0,
        // Some whenever no error was recorded above.
        admin_bind: admin_bind.unwrap_or_else(placeholder_addr),
        history_interval,
        broker,
        listeners,
        sinks,
        rules,
        fallback,
        downlinks,
        log: config.log.clone(),
        auth,
        secret_files: config.secret_files.clone(),
    })
}

/// One `[sinks.<name>]` table into its plan (`None` once its errors are reported).
fn validate_sink(
    name: &str,
    sink: &SinkSection,
    gateway_id: &str,
    err: &mut impl FnMut(String, String),
) -> Option<SinkPlan> {
    let path = format!("sinks.{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        err(
            path.clone(),
            "sink names may only use letters, digits, - and _".into(),
        );
    }
    let buffer = sink.buffer().clone();
    buffer.validate(&path, err);
    let mut rate = sink
        .rate()
        .and_then(|r| validate_rate(&format!("{path}.rate"), r, err));
    let kind = match sink {
        SinkSection::Mqtt(m) => crate::sinks::mqtt::config::validate(&path, m, gateway_id, err)
            .map(|mut m| {
                if let (None, Some(default)) = (&rate, m.profile.and_then(|p| p.default_rate())) {
                    if sink.rate().is_none() {
                        rate = Some(default);
                        m.notes.push(format!(
                            "rate {} per connection (the cloud's limits; set rate to change)",
                            default.describe()
                        ));
                    }
                }
                SinkKindPlan::Mqtt(m)
            }),
        SinkSection::Http(h) => {
            crate::sinks::http::config::validate(&path, h, gateway_id, err).map(SinkKindPlan::Http)
        }
        SinkSection::Kafka(k) => crate::sinks::kafka::config::validate(&path, k, gateway_id, err)
            .map(SinkKindPlan::Kafka),
        SinkSection::File(f) => {
            if f.path.as_os_str().is_empty() {
                err(format!("{path}.path"), "must not be empty".into());
                None
            } else {
                Some(SinkKindPlan::File(FilePlan {
                    path: f.path.clone(),
                }))
            }
        }
    };
    Some(SinkPlan {
        name: name.to_string(),
        buffer,
        rate,
        kind: kind?,
    })
}

/// Addresses that cannot all be bound: two listeners on one, or the admin endpoint on a
/// listener's. `run` would fail on them after starting; `check` says so first.
fn check_addresses(
    listeners: &[ListenerSection],
    admin_bind: Option<SocketAddr>,
    err: &mut impl FnMut(String, String),
) {
    let binds: Vec<(usize, SocketAddr)> = listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.bind.parse::<SocketAddr>().ok().map(|a| (i, a)))
        .collect();
    for (n, (i, a)) in binds.iter().enumerate() {
        if let Some((j, _)) = binds[..n].iter().find(|(_, b)| same_socket(*a, *b)) {
            err(
                format!("listeners[{i}].bind"),
                format!(
                    "{a} is also the address of listeners[{j}] ({:?}); each listener needs its own",
                    listeners[*j].name
                ),
            );
        }
    }
    if let Some(admin) = admin_bind {
        if let Some((i, _)) = binds.iter().find(|(_, b)| same_socket(admin, *b)) {
            err(
                "admin.bind".into(),
                format!(
                    "{admin} is also the address of listeners[{i}] ({:?})",
                    listeners[*i].name
                ),
            );
        }
    }
}

/// Rules that send to a sink with `profile = "aws-iot"`: what can be known at load of
/// the topics they will send (see [`aws_template_problem`], [`aws_filter_problem`]).
fn check_aws_topics(
    config: &Config,
    rules: &[RulePlan],
    gateway_id: &str,
    err: &mut impl FnMut(String, String),
) {
    for rule in rules {
        let Some(i) = config.rules.iter().position(|r| r.name == rule.name) else {
            continue;
        };
        let from = &config.rules[i].from;
        for (j, target) in rule.to.iter().enumerate() {
            let Some((sink, SinkSection::Mqtt(m))) = config.sinks.iter().nth(target.sink) else {
                continue;
            };
            if m.profile != Some(CloudProfile::AwsIot) {
                continue;
            }
            let (key, problem) = match &target.topic {
                Some(t) => ("topic", aws_template_problem(t, gateway_id)),
                None => ("from", aws_filter_problem(from, &rule.filter)),
            };
            if let Some(problem) = problem {
                err(
                    format!("rules[{i}].{key}"),
                    format!("topics sent to sink {sink:?} (profile aws-iot) {problem} (to[{j}])"),
                );
            }
        }
    }
}

/// What AWS IoT Core would refuse in every topic a rule's `topic` template renders: its
/// fixed text (literals and the gateway id) is a lower bound of length and levels.
fn aws_template_problem(template: &Template, gateway_id: &str) -> Option<String> {
    let fixed = template.render_static(gateway_id);
    let problem = if template.source().starts_with("$aws") {
        cloud::aws_topic_problem(&fixed)
    } else {
        cloud::aws_topic_size_problem(fixed.len(), fixed.matches('/').count())
    };
    problem.map(|p| format!("would be refused: the template's fixed part alone {p}"))
}

/// As [`aws_template_problem`], for a rule without `topic`: the devices' own topics go
/// upstream, so the filter bounds them (exactly, when it has no `#`).
fn aws_filter_problem(from: &str, filter: &TopicFilter) -> Option<String> {
    if from.starts_with("$aws") {
        return Some("would be refused: they start with the reserved prefix $aws".into());
    }
    let slashes = from.matches('/').count();
    let (bytes, slashes) = if from.ends_with('#') {
        // `a/#` also matches `a`: one level less at least.
        (0, slashes.saturating_sub(1))
    } else if filter.wildcard_count() > 0 {
        (0, slashes)
    } else {
        (from.len(), slashes)
    };
    cloud::aws_topic_size_problem(bytes, slashes).map(|p| {
        format!("would be refused: a topic this filter matches {p}; add a `topic` template")
    })
}

/// Whether binding `a` and then `b` would fail: the same port, and the same address or
/// a wildcard (`0.0.0.0`, `[::]`) on either side. Port 0 (any free port) never clashes.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Whether the gateway can create and write `dir`: it, or the nearest ancestor that
/// exists (`run` creates the rest), is a directory that takes a new file (created and
/// removed at once).
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    if !at.is_dir() {
        return Err(format!("{} is not a directory", at.display()));
    }
    let probe = at.join(format!(".edgebridge-check-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!(
            "cannot be created or written: {} does not take new files ({e})",
            at.display()
        )),
    }
}

/// Stands in for an address that failed to parse (only ever seen when an error was
/// reported, so never bound).
fn placeholder_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::pacing::Rate;
    use std::collections::HashMap;
    use std::io::Write;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Plan, ConfigErrors> {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(toml.as_bytes()).expect("write");
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = load_with_env(file.path(), |k| env.get(k).cloned())?;
        validate(&config)
    }

    #[test]
    fn check_spells_values_as_the_config_does() {
        let plan = load_str(
            r#"
            [[listeners]]
            name = "devices"
            bind = "127.0.0.1:1883"
            ack = "received"
            [sinks.hook]
            type = "http"
            url = "http://h/in"
            method = "put"
            format = "ndjson"
            buffer = { storage = "memory", when_full = "drop_newest" }
            [sinks.lake]
            type = "kafka"
            brokers = ["k:9092"]
            topic = "t"
            format = "envelope"
            buffer = { sync = "interval" }
            "#,
            &[],
        )
        .expect("valid");
        let text = plan.describe();
        for spelled in [
            "ack=received",
            "hook http PUT http://h/in format=ndjson",
            "buffer memory",
            "when_full=drop_newest",
            "format=envelope",
            "sync=interval",
        ] {
            assert!(text.contains(spelled), "{spelled:?} in:\n{text}");
        }
    }

    fn first_error(toml: &str) -> String {
        match load_str(toml, &[]) {
            Ok(_) => panic!("config was accepted:\n{toml}"),
            Err(e) => e.0[0].to_string(),
        }
    }

    const GOOD: &str = r##"
        [gateway]
        id = "edge-07"
        [sinks.out]
        type = "file"
        path = "out.ndjson"
        [[rules]]
        name = "all"
        from = "#"
        to = ["out"]
    "##;

    #[test]
    fn connections_name_distinct_client_ids() {
        let mqtt = |extra: &str| {
            format!(
                "[gateway]\nid = \"gw\"\n[sinks.up]\ntype = \"mqtt\"\nurl = \"mqtt://h:1883\"\n{extra}\n\
                 [[rules]]\nname = \"r\"\nfrom = \"#\"\nto = [\"up\"]\n"
            )
        };
        let ids = |extra: &str| match load_str(&mqtt(extra), &[]).expect("valid").sinks[0].kind {
            SinkKindPlan::Mqtt(ref m) => m.client_ids.clone(),
            _ => unreachable!("an mqtt sink"),
        };
        assert_eq!(ids(""), ["gw"]);
        assert_eq!(ids("connections = 3"), ["gw-1", "gw-2", "gw-3"]);
        assert_eq!(ids("connections = [\"a\", \"b\"]"), ["a", "b"]);
        let plan = load_str(&mqtt("connections = 2"), &[]).expect("valid");
        assert!(plan
            .describe()
            .contains("client_id=gw-1,gw-2 (connections=2, by topic)"));
        for bad in [
            "connections = 0",
            "connections = 65",
            "connections = [\"a\", \"a\"]",
            "connections = []",
        ] {
            let e = first_error(&mqtt(bad));
            assert!(e.starts_with("sinks.up.connections: "), "{bad}: {e}");
        }
    }

    #[test]
    fn live_first_drain_needs_a_disk_buffer() {
        let with = |buffer: &str| {
            GOOD.replace(
                "path = \"out.ndjson\"",
                &format!("path = \"out.ndjson\"\nbuffer = {{ {buffer} }}"),
            )
        };
        let plan = load_str(&with("drain = \"live_first\""), &[]).expect("valid");
        assert_eq!(plan.sinks[0].buffer.drain, Drain::LiveFirst);
        assert!(
            plan.describe().contains("drain=live_first"),
            "{}",
            plan.describe()
        );
        let err = first_error(&with("drain = \"live_first\", storage = \"memory\""));
        assert!(err.starts_with("sinks.out.buffer.drain: "), "{err}");
        let err = first_error(&with("drain = \"newest\""));
        assert!(err.contains("drain"), "{err}");
    }

    #[test]
    fn good_config_builds_a_plan_with_defaults() {
        let plan = load_str(GOOD, &[]).expect("valid");
        assert_eq!(plan.gateway_id, "edge-07");
        assert_eq!(plan.listeners.len(), 1);
        assert_eq!(plan.listeners[0].bind.port(), 1883);
        assert_eq!(plan.listeners[0].ack, AckMode::Durable);
        assert_eq!(plan.rules[0].to[0].sink, 0);
    }

    #[test]
    fn reads_secrets_from_files() {
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("password");
        std::fs::write(&secret, "s3cret\n").expect("write");
        let toml = format!(
            r##"
            [sinks.cloud]
            type = "mqtt"
            url = "mqtt://broker:1883"
            username = "edge"
            password = "${{file:{}}}"

            [[rules]]
            name = "all"
            from = "#"
            to = ["cloud"]
        "##,
            secret.display()
        );
        let plan = load_str(&toml, &[]).expect("valid");
        let SinkKindPlan::Mqtt(mqtt) = &plan.sinks[0].kind else {
            panic!("an mqtt sink");
        };
        assert_eq!(
            mqtt.password.as_deref(),
            Some("s3cret"),
            "the line break dropped"
        );
        // The plan lists the file as it was read: a change on disk tells.
        assert_eq!(plan.secret_files, vec![SecretFile::read(&secret)]);
        std::fs::write(&secret, "rotated\n").expect("write");
        assert_ne!(plan.secret_files, vec![SecretFile::read(&secret)]);
        let device = toml.replace(&secret.display().to_string(), "/dev/zero");
        let err = match load_str(&device, &[]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a device as a secret file accepted"),
        };
        assert!(
            err.ends_with("is not a regular file of at most 64 KiB"),
            "{err}"
        );
        std::fs::remove_file(&secret).expect("remove");
        let err = match load_str(&toml, &[]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a missing secret file accepted"),
        };
        assert!(
            err.starts_with("sinks.cloud.password: cannot read the secret file"),
            "{err}"
        );
    }

    #[test]
    fn interpolates_environment_variables() {
        let toml = r#"
            [gateway]
            id = "${SITE}-gw"
        "#;
        let plan = load_str(toml, &[("SITE", "plant9")]).expect("valid");
        assert_eq!(plan.gateway_id, "plant9-gw");
        let err = match load_str(toml, &[]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("missing variable accepted"),
        };
        assert_eq!(err, "gateway.id: environment variable SITE is not set");
    }

    #[test]
    fn array_indexes_and_missing_keys_have_full_paths() {
        let e = first_error("[[listeners]]\nname = \"a\"\n");
        assert_eq!(e, "listeners[0].bind: missing (required)");
        let e = first_error(
            "[[listeners]]\nname = \"a\"\nbind = \"0.0.0.0:1\"\nmax_packet_size = true\n",
        );
        assert_eq!(e, "listeners[0].max_packet_size: expected a byte size (\"64KiB\", \"1GiB\" or a number of bytes), found a boolean");
        let e = first_error("[sinks.cloud]\ntype = \"mqtt\"\n");
        assert_eq!(e, "sinks.cloud.url: missing (required)");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = first_error("[gateway]\nidd = \"x\"\n");
        assert!(e.starts_with("gateway.idd: unknown key \"idd\""), "{e}");
    }

    #[test]
    fn unknown_sink_in_rule_is_named() {
        let e = first_error(
            r#"[[rules]]
            name = "r"
            from = "a/#"
            to = ["nowhere"]"#,
        );
        assert_eq!(e, "rules[0].to[0]: unknown sink \"nowhere\"");
    }

    #[test]
    fn bad_sizes_and_durations_are_named() {
        let e = first_error(
            r#"[sinks.out]
            type = "file"
            path = "x"
            buffer = { max_bytes = "lots" }"#,
        );
        assert!(
            e.starts_with("sinks.out.buffer.max_bytes: invalid size"),
            "{e}"
        );
        let e = first_error("[gateway]\nshutdown_grace = \"soon\"\n");
        assert!(
            e.starts_with("gateway.shutdown_grace: invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn all_problems_are_reported() {
        let err = load_str(
            r#"
            [admin]
            bind = "nope"
            [[rules]]
            name = "a"
            from = "a/#/b"
            to = ["x"]
            [[rules]]
            name = "a"
            from = "b"
            to = ["y"]
            "#,
            &[],
        )
        .expect_err("invalid");
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "admin.bind",
                "rules[0].from",
                "rules[0].to[0]",
                "rules[1].name",
                "rules[1].to[0]"
            ]
        );
    }

    #[test]
    fn auth_and_listener_security_are_checked_at_load() {
        let e = first_error("[[auth.acl]]\nuser = \"plc-*\"\npublish = [\"a/#\"]\n");
        assert_eq!(
            e,
            "auth.acl[0]: uses the username, which is only verified with auth.users_file set"
        );
        let e = first_error("[[auth.acl]]\npublish = [\"a/{user}/#\"]\n");
        assert!(
            e.starts_with("auth.acl[0].publish[0]: \"a/{user}/#\": unknown placeholder {user}"),
            "{e}"
        );
        let e = first_error("[[auth.acl]]\nsubscribe = [\"a/#/b\"]\n");
        assert!(e.starts_with("auth.acl[0].subscribe[0]:"), "{e}");
        let e = first_error("[[auth.acl]]\nclient_id = \"x\"\n");
        assert_eq!(
            e,
            "auth.acl[0]: grants nothing: give publish and/or subscribe"
        );
        let e = first_error("[auth]\nusers_file = \"/nonexistent/users.toml\"\n");
        assert!(
            e.starts_with("auth.users_file: cannot read /nonexistent/users.toml"),
            "{e}"
        );
        let e = first_error(
            "[[listeners]]\nname = \"tls\"\nbind = \"127.0.0.1:8883\"\n\
             tls = { cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }\n",
        );
        assert_eq!(
            e,
            "listeners[0].tls.cert: file /nonexistent/c.pem not found"
        );
    }

    #[test]
    fn allow_anonymous_defaults_to_whether_a_users_file_is_set() {
        let dir = tempfile::tempdir().expect("dir");
        let users = dir.path().join("users.toml");
        std::fs::write(&users, "").expect("write");
        let listeners = "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n\
                         [[listeners]]\nname = \"b\"\nbind = \"127.0.0.1:2\"\nallow_anonymous = true\n";
        let plan = load_str(listeners, &[]).expect("valid");
        assert!(plan.listeners.iter().all(|l| l.allow_anonymous));
        let with_users = format!(
            "{listeners}[auth]\nusers_file = {:?}\n",
            users.display().to_string()
        );
        let plan = load_str(&with_users, &[]).expect("valid");
        let anonymous: Vec<bool> = plan.listeners.iter().map(|l| l.allow_anonymous).collect();
        assert_eq!(anonymous, [false, true]);
    }

    #[test]
    fn mqtt_sink_checks_url_and_tls() {
        let e = first_error(
            r#"[sinks.cloud]
            type = "mqtt"
            url = "http://x""#,
        );
        assert!(e.starts_with("sinks.cloud.url: scheme \"http\""), "{e}");
        let e = first_error(
            r#"[sinks.cloud]
            type = "mqtt"
            url = "mqtts://x"
            tls = { ca = "/nonexistent/ca.pem" }"#,
        );
        assert_eq!(e, "sinks.cloud.tls.ca: file /nonexistent/ca.pem not found");
    }

    #[test]
    fn mqtt_url_list_builds_endpoints_with_failover_defaults() {
        let plan = load_str(
            r#"[sinks.cloud]
            type = "mqtt"
            url = ["mqtt://primary:1883", "tcp://backup"]
            username = "u"
            password = "pw-secret""#,
            &[],
        )
        .expect("valid");
        let m = mqtt_plan(&plan);
        let endpoints: Vec<String> = m.endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(endpoints, ["primary:1883", "backup:1883"]);
        assert_eq!((m.host.as_str(), m.port), ("primary", 1883));
        assert_eq!(m.failover_after, 3);
        assert_eq!(m.failback_check, Duration::from_secs(30));
        let backup = m.at_endpoint(1);
        assert_eq!((backup.host.as_str(), backup.port), ("backup", 1883));
        let text = plan.describe();
        assert!(
            text.contains("cloud mqtt [mqtt://primary:1883, mqtt://backup:1883] client_id="),
            "{text}"
        );
        assert!(
            text.contains("failover: to the next url after 3 failed connection attempts"),
            "{text}"
        );
        assert!(!text.contains("pw-secret"), "{text}");

        // A single string keeps working as before: one endpoint, printed as one URL.
        let plan = load_str(
            "[sinks.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://b:1884\"\n",
            &[],
        )
        .expect("valid");
        let m = mqtt_plan(&plan);
        assert_eq!(m.endpoints.len(), 1);
        assert!(plan
            .describe()
            .contains("cloud mqtt mqtt://b:1884 client_id="));
        assert!(!plan.describe().contains("failover"));
    }

    #[test]
    fn mqtt_url_list_errors_name_the_entry() {
        let sink = |url: &str, extra: &str| {
            format!("[sinks.cloud]\ntype = \"mqtt\"\nurl = {url}\n{extra}")
        };
        let cases = [
            (
                sink(r#"["mqtt://a", "http://b"]"#, ""),
                "sinks.cloud.url[1]: scheme \"http\" is not supported; use mqtt:// or mqtts://",
            ),
            (
                sink(r#"["mqtt://a", "not a url"]"#, ""),
                "sinks.cloud.url[1]: invalid URL (relative URL without a base)",
            ),
            (
                sink(r#"["mqtt://a", "mqtts://b"]"#, ""),
                "sinks.cloud.url[1]: mqtts:// while url[0] is mqtt://; every endpoint shares \
                 the sink's tls settings, so use one scheme family",
            ),
            (
                sink(r#"["mqtt://a:1883", "mqtt://a"]"#, ""),
                "sinks.cloud.url[1]: a:1883 is listed twice",
            ),
            (
                sink("[]", ""),
                "sinks.cloud.url: empty list; give at least one mqtt:// or mqtts:// URL",
            ),
            (
                sink(r#""mqtt://a""#, "failover_after = 2"),
                "sinks.cloud.failover_after: only used when url is a list of endpoints",
            ),
            (
                sink(r#"["mqtt://a", "mqtt://b"]"#, "failover_after = 0"),
                "sinks.cloud.failover_after: must be at least 1",
            ),
            (
                sink(r#"["mqtt://a", "mqtt://b"]"#, "failback_check = \"10ms\""),
                "sinks.cloud.failback_check: must be at least 100ms",
            ),
            (
                sink("42", ""),
                "sinks.cloud.url: expected a URL or a list of URLs, found an integer",
            ),
        ];
        for (toml, expected) in cases {
            assert_eq!(first_error(&toml), expected, "{toml}");
        }
        // Every bad entry is reported, not just the first.
        let errors =
            load_str(&sink(r#"["ftp://a", "mqtt://b", "ftp://c"]"#, ""), &[]).expect_err("invalid");
        let paths: Vec<&str> = errors.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["sinks.cloud.url[0]", "sinks.cloud.url[2]"]);
    }

    #[test]
    fn mqtt_ack_timeout_defaults_to_30s_and_refuses_zero() {
        let sink = |extra: &str| {
            format!("[sinks.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://b:1883\"\n{extra}")
        };
        let plan = load_str(&sink(""), &[]).expect("valid");
        let SinkKindPlan::Mqtt(m) = &plan.sinks[0].kind else {
            panic!("not an mqtt sink");
        };
        assert_eq!(m.ack_timeout, Duration::from_secs(30));
        let plan = load_str(&sink("ack_timeout = \"2s\""), &[]).expect("valid");
        let SinkKindPlan::Mqtt(m) = &plan.sinks[0].kind else {
            panic!("not an mqtt sink");
        };
        assert_eq!(m.ack_timeout, Duration::from_secs(2));
        let e = first_error(&sink("ack_timeout = \"0s\""));
        assert_eq!(e, "sinks.cloud.ack_timeout: must be at least 1s");
    }

    #[test]
    fn rule_expressions_and_targets_are_checked_with_their_paths() {
        let rules = r#"
            [sinks.lake]
            type = "file"
            path = "x"
            [[rules]]
            name = "syntax"
            from = "a/#"
            where = "payload.x >"
            to = ["lake"]
            [[rules]]
            name = "types"
            from = "a/+"
            where = "topic > 3"
            payload = "{'x': nope}"
            to = [{ sink = "lake", topic = "b/{2}", payload = "levels[0] +" }, { sink = "sea" }]
            [fallback]
            to = [{ sink = "lake", topic = "u/{1}" }]
            "#;
        // A target that is neither a name nor a table fails loading, on its own.
        let err = load_str(
            &rules.replace(r#"{ sink = "sea" }]"#, r#"{ sink = "sea" }, 7]"#),
            &[],
        )
        .expect_err("invalid");
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["rules[1].to[2]"], "{err}");
        let err = load_str(rules, &[]).expect_err("invalid");
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "rules[0].where",
                "rules[1].where",
                "rules[1].payload",
                "rules[1].to[0].topic",
                "rules[1].to[0].payload",
                "rules[1].to[1].sink",
                "fallback.to[0].topic",
            ],
            "{err}"
        );
        assert!(err.0[1].message.contains("type error"), "{err}");
        assert!(err.0[2].message.contains("unknown variable nope"), "{err}");
    }

    #[test]
    fn continue_fallback_and_overrides_build_the_plan() {
        let plan = load_str(
            r#"
            [sinks.lake]
            type = "file"
            path = "x"
            [sinks.sea]
            type = "file"
            path = "y"
            [[rules]]
            name = "r"
            from = "a/+"
            where = "payload.t > 1"
            topic = "t/{1}"
            payload = "{'t': payload.t}"
            to = ["lake", { sink = "sea", topic = "s/{client_id}" }]
            continue = false
            [fallback]
            to = ["sea"]
            "#,
            &[],
        )
        .expect("valid");
        let r = &plan.rules[0];
        assert!(r.stop);
        assert_eq!(
            r.condition.as_ref().map(|c| c.source()),
            Some("payload.t > 1")
        );
        assert_eq!(r.to[0].topic.as_ref().map(|t| t.source()), Some("t/{1}"));
        assert_eq!(
            r.to[1].topic.as_ref().map(|t| t.source()),
            Some("s/{client_id}")
        );
        assert!(
            r.to[1].payload.is_some(),
            "the rule's payload applies to every target"
        );
        assert_eq!(plan.fallback[0].sink, 1);
        let text = plan.describe();
        assert!(
            text.contains("r a/+ where payload.t > 1 -> lake topic=t/{1}"),
            "{text}"
        );
        assert!(text.contains("fallback -> sea"), "{text}");
    }

    #[test]
    fn downlinks_need_an_mqtt_sink_a_filter_and_a_template_of_its_captures() {
        let sinks = r#"
            [gateway]
            id = "edge-3"
            [sinks.cloud]
            type = "mqtt"
            url = "mqtt://broker:1883"
            [sinks.lake]
            type = "file"
            path = "x"
        "#;
        let plan = load_str(
            &format!(
                "{sinks}[[downlinks]]\nsink = \"cloud\"\nfrom = \"cmd/{{gateway_id}}/+/#\"\ntopic = \"cmd/{{1}}/{{2}}\"\nretain = true\n"
            ),
            &[],
        )
        .expect("valid");
        let d = &plan.downlinks[0];
        assert_eq!(d.filter.to_string(), "cmd/edge-3/+/#");
        assert_eq!((d.sink, d.qos, d.retain), (0, 1, true));
        let err = load_str(
            &format!(
                r#"{sinks}
                [[downlinks]]
                sink = "lake"
                from = "a/#"
                topic = "b/{{2}}"
                [[downlinks]]
                sink = "cloud"
                from = "a/#/b"
                topic = "b"
                qos = 3
                [[downlinks]]
                sink = "cloud"
                from = "a/+"
                topic = "b/{{client_id}}"
                "#
            ),
            &[],
        )
        .expect_err("invalid");
        let paths: Vec<&str> = err.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "downlinks[0].sink",
                "downlinks[0].topic",
                "downlinks[1].from",
                "downlinks[1].qos",
                "downlinks[2].topic"
            ],
            "{err}"
        );
    }

    #[test]
    fn password_is_masked_in_the_plan() {
        let plan = load_str(
            r#"[sinks.cloud]
            type = "mqtt"
            url = "mqtt://broker:1883"
            username = "u"
            password = "s3cret-value""#,
            &[],
        )
        .expect("valid");
        let text = plan.describe();
        assert!(text.contains("password=****"), "{text}");
        assert!(!text.contains("s3cret-value"), "{text}");
    }

    #[test]
    fn http_sink_defaults_and_templates() {
        let plan = load_str(
            r#"[sinks.hook]
            type = "http"
            url = "https://hooks.example.com/in/{gateway_id}/{2}?site=a+b"
            format = "ndjson"
            headers = { "X-Line" = "{1}", "X-Key" = "k+y" }"#,
            &[],
        )
        .expect("valid");
        let SinkKindPlan::Http(h) = &plan.sinks[0].kind else {
            panic!("an http plan");
        };
        assert_eq!((h.max_messages, h.max_bytes), (100, 1024 * 1024));
        assert_eq!(h.max_delay, Duration::from_millis(50));
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert_eq!(h.content_type, "application/x-ndjson");
        assert!(!h.url_is_static);
        assert!(h.idempotency_key);
        assert_eq!(h.headers.len(), 2);
    }

    #[test]
    fn http_sink_errors_name_their_keys() {
        let cases = [
            (
                r#"url = "ftp://x/in""#,
                "sinks.hook.url: scheme \"ftp\" is not supported; use http:// or https://",
            ),
            (
                r#"url = "http://{1}.example.com/in""#,
                "sinks.hook.url: placeholders are allowed in the path, not in the host",
            ),
            (
                "url = \"http://x/in\"\nbatch = { max_messages = 10 }",
                "sinks.hook.batch.max_messages: format Json sends one message per request; use format \"ndjson\" or \"json_array\" to batch",
            ),
            (
                "url = \"http://x/in\"\nbearer_token = \"t\"\nusername = \"u\"",
                "sinks.hook.bearer_token: set together with username; use one",
            ),
            (
                "url = \"http://x/in\"\ntls = { ca = \"/nonexistent.pem\" }",
                "sinks.hook.tls: set, but the url is not https://",
            ),
            (
                "url = \"http://x/in\"\nretry_on = [404]\npermanent_on = [404]",
                "sinks.hook.permanent_on: 404 is also in retry_on",
            ),
            (
                "url = \"http://x/in\"\nmethod = \"GET\"",
                "sinks.hook.method: unknown value \"GET\"; use one of: POST, post, PUT, put",
            ),
            (
                "url = \"http://x/in\"\nheaders = { \"Bad Name\" = \"v\" }",
                "sinks.hook.headers.Bad Name: not a valid HTTP header name",
            ),
        ];
        for (body, expected) in cases {
            let e = first_error(&format!("[sinks.hook]\ntype = \"http\"\n{body}"));
            assert_eq!(e, expected, "for {body}");
        }
    }

    #[test]
    fn http_secrets_are_masked_in_the_plan() {
        let plan = load_str(
            r#"[sinks.hook]
            type = "http"
            url = "https://user:pw-in-url@hooks.example.com/in?token=q-secret"
            bearer_token = "${HOOK_TOKEN}"
            headers = { "X-Api-Key" = "header-secret" }"#,
            &[("HOOK_TOKEN", "tok-secret")],
        )
        .expect("valid");
        let text = plan.describe();
        for secret in ["tok-secret", "header-secret", "q-secret", "pw-in-url"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(
            text.contains("X-Api-Key") || text.contains("x-api-key"),
            "{text}"
        );
        assert!(text.contains("auth=bearer ****"), "{text}");
    }

    #[test]
    fn kafka_sink_errors_name_their_keys() {
        let cases = [
            (
                "brokers = []\ntopic = \"t\"",
                "sinks.lake.brokers: at least one host:port",
            ),
            (
                "brokers = [\"kafka\"]\ntopic = \"t\"",
                "sinks.lake.brokers[0]: \"kafka\" is not host:port",
            ),
            (
                "brokers = [\"k:9092\"]\ntopic = \"bad topic\"",
                "sinks.lake.topic: a Kafka topic is 1 to 249 of the characters a-z A-Z 0-9 . _ -",
            ),
            (
                "brokers = [\"k:9092\"]\ntopic = \"t\"\nproperties = { \"bootstrap.servers\" = \"x:1\" }",
                "sinks.lake.properties.bootstrap.servers: set by edgebridge from `brokers`",
            ),
            (
                "brokers = [\"k:9092\"]\ntopic = \"t\"\nproperties = { \"no.such.property\" = \"1\" }",
                "sinks.lake.properties.no.such.property: No such configuration property: \"no.such.property\"",
            ),
            (
                "brokers = [\"k:9092\"]\ntopic = \"t\"\nformat = \"avro\"",
                "sinks.lake.format: unknown value \"avro\"; use one of: raw, envelope",
            ),
        ];
        for (body, expected) in cases {
            let e = first_error(&format!("[sinks.lake]\ntype = \"kafka\"\n{body}"));
            assert_eq!(e, expected, "for {body}");
        }
    }

    /// An AWS IoT sink with a real (temporary) certificate pair and the given extra keys.
    fn aws_sink(dir: &Path, url: &str, extra: &str) -> String {
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.join(f), "x").expect("write");
        }
        format!(
            "[sinks.aws]\ntype = \"mqtt\"\nprofile = \"aws-iot\"\nurl = \"{url}\"\n\
             tls = {{ ca = \"{d}/ca.pem\", cert = \"{d}/cert.pem\", key = \"{d}/key.pem\" }}\n{extra}\n",
            d = dir.display()
        )
    }

    fn mqtt_plan(plan: &Plan) -> &MqttPlan {
        match &plan.sinks[0].kind {
            SinkKindPlan::Mqtt(m) => m,
            _ => panic!("not an mqtt sink"),
        }
    }

    #[test]
    fn pack_fits_the_profile_payload_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = "mqtts://x-ats.iot.eu-west-1.amazonaws.com";
        let plan = load_str(&aws_sink(dir.path(), url, "pack = {}"), &[]).expect("valid");
        let pack = mqtt_plan(&plan).pack.clone().expect("a pack");
        assert_eq!(pack.max_bytes, 120 * 1024);
        assert!(plan
            .describe()
            .contains("pack=json_array by topic max_bytes=122880"));
        let e = first_error(&aws_sink(
            dir.path(),
            url,
            "pack = { max_bytes = \"200KiB\" }",
        ));
        assert_eq!(
            e,
            "sinks.aws.pack.max_bytes: 204800 bytes is over what the upstream takes in one \
             message (131072 bytes: profile aws-iot's payload limit)"
        );
        // Without a profile: max_packet_size less the MQTT framing.
        let e = first_error(
            "[sinks.up]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\nmax_packet_size = \"8KiB\"\n\
             pack = { max_bytes = 8192, fields = [\"topic\", \"colour\"] }\n",
        );
        assert!(
            e.starts_with("sinks.up.pack.fields[1]: unknown value \"colour\"; use one of:"),
            "{e}"
        );
        let e = first_error(
            "[sinks.up]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\nmax_packet_size = \"8KiB\"\n\
             pack = { max_bytes = 8192 }\n",
        );
        assert_eq!(
            e,
            "sinks.up.pack.max_bytes: 8192 bytes is over what the upstream takes in one \
             message (8176 bytes: max_packet_size 8192 minus 16 bytes of MQTT framing)"
        );
        let e = first_error(
            "[sinks.hook]\ntype = \"http\"\nurl = \"http://h/in\"\n\
             batch = { max_delay = \"1s\" }\npack = { linger = \"1s\" }\n",
        );
        assert_eq!(
            e,
            "sinks.hook.batch: not used with pack: pack.max_bytes and pack.linger bound a request"
        );
    }

    #[test]
    fn kafka_defaults_and_secret_properties() {
        let plan = load_str(
            r#"[sinks.lake]
            type = "kafka"
            brokers = ["a:9092", "b:9092"]
            topic = "plant.{2}"
            [sinks.lake.properties]
            "linger.ms" = "20"
            "sasl.password" = "kafka-secret""#,
            &[],
        )
        .expect("valid");
        let SinkKindPlan::Kafka(k) = &plan.sinks[0].kind else {
            panic!("a kafka plan");
        };
        assert_eq!(k.properties["enable.idempotence"], "true");
        assert_eq!(k.properties["acks"], "all");
        // Half-open detection, as the MQTT sink's ack_timeout (tests/network_faults.rs).
        assert_eq!(k.properties["socket.timeout.ms"], "30000");
        assert_eq!(k.properties["linger.ms"], "20", "configured values win");
        assert_eq!(k.properties["bootstrap.servers"], "a:9092,b:9092");
        assert_eq!(k.key.source(), "{topic}");
        let text = plan.describe();
        assert!(!text.contains("kafka-secret"), "{text}");
        assert!(text.contains("sasl.password=****"), "{text}");
    }

    #[test]
    fn aws_profile_defaults_and_port_443_alpn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = load_str(
            &aws_sink(dir.path(), "mqtts://x-ats.iot.eu-west-1.amazonaws.com", ""),
            &[],
        )
        .expect("valid");
        let m = mqtt_plan(&plan);
        assert_eq!(m.port, 8883);
        assert_eq!(m.client_id, "edge-01");
        assert_eq!(m.max_payload, Some(128 * 1024));
        assert!(m.tls.as_ref().is_some_and(|t| t.alpn.is_empty()));
        let text = plan.describe();
        for line in [
            "profile=aws-iot",
            "aws-iot: qos 1",
            "aws-iot: keep_alive 30s",
            "128 KiB are dead-lettered",
            "aws-iot: client id",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        let plan = load_str(
            &aws_sink(dir.path(), "mqtts://x.amazonaws.com:443", ""),
            &[],
        )
        .expect("valid");
        let m = mqtt_plan(&plan);
        assert_eq!(
            m.tls.as_ref().map(|t| t.alpn.clone()),
            Some(vec!["x-amzn-mqtt-ca".to_string()])
        );
        assert!(
            plan.describe()
                .contains("port 443: offers ALPN x-amzn-mqtt-ca"),
            "{}",
            plan.describe()
        );
    }

    #[test]
    fn aws_profile_refuses_what_aws_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = "mqtts://x.amazonaws.com";
        let cases = [
            (
                "qos = 2",
                "sinks.aws.qos: AWS IoT Core does not support QoS 2; use 0 or 1",
            ),
            (
                "keep_alive = \"10s\"",
                "sinks.aws.keep_alive: AWS IoT Core accepts 30s to 1200s",
            ),
            (
                "keep_alive = \"1201s\"",
                "sinks.aws.keep_alive: AWS IoT Core accepts 30s to 1200s",
            ),
            (
                "device_id = \"d\"",
                "sinks.aws.device_id: only used with profile = \"azure-iot-hub\"",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(
                first_error(&aws_sink(dir.path(), url, extra)),
                expected,
                "for {extra}"
            );
        }
        let e = first_error(
            "[sinks.aws]\ntype = \"mqtt\"\nprofile = \"aws-iot\"\nurl = \"mqtt://x:1883\"\n",
        );
        assert_eq!(
            e,
            "sinks.aws.url: AWS IoT Core takes MQTT over TLS only; use mqtts://"
        );
        std::fs::write(dir.path().join("ca.pem"), "x").expect("write");
        let e = first_error(&format!(
            "[sinks.aws]\ntype = \"mqtt\"\nprofile = \"aws-iot\"\nurl = \"{url}\"\ntls = {{ ca = \"{}/ca.pem\" }}\n",
            dir.path().display()
        ));
        assert!(
            e.starts_with("sinks.aws.tls: profile \"aws-iot\" needs the thing's certificate"),
            "{e}"
        );
    }

    #[test]
    fn aws_profile_checks_rule_topics_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = aws_sink(dir.path(), "mqtts://x.amazonaws.com", "");
        let rule = |from: &str, topic: &str| {
            format!("{sink}[[rules]]\nname = \"r\"\nfrom = \"{from}\"\nto = [\"aws\"]\n{topic}")
        };
        assert!(load_str(&rule("f/+/+/t", "topic = \"dt/{gateway_id}/{1}/{2}\""), &[]).is_ok());
        assert!(load_str(&rule("a/b/c/d/e/f/g/#", ""), &[]).is_ok());
        let e = first_error(&rule("f/+/t", "topic = \"a/b/c/d/e/f/g/h/{1}\""));
        assert!(e.starts_with("rules[0].topic: topics sent to sink \"aws\" (profile aws-iot) would be refused: the template's fixed part alone has 8 forward slashes"), "{e}");
        let e = first_error(&rule("f/+/t", "topic = \"$aws/things/{1}/shadow/update\""));
        assert!(e.contains("reserved prefix $aws"), "{e}");
        assert!(load_str(&rule("f/+/t", "topic = \"$aws/rules/ingest/{1}\""), &[]).is_ok());
        let e = first_error(&rule("a/b/c/d/e/f/g/h/+", ""));
        assert!(e.starts_with("rules[0].from: topics sent to sink \"aws\" (profile aws-iot) would be refused: a topic this filter matches has 8 forward slashes"), "{e}");
        let long = "x".repeat(300);
        let e = first_error(&rule(&long, ""));
        assert!(e.contains("300 bytes long"), "{e}");
    }

    #[test]
    fn protocol_defaults_by_profile_and_check_warns_of_dropped_properties() {
        let dir = tempfile::tempdir().expect("tempdir");
        let aws = load_str(
            &aws_sink(dir.path(), "mqtts://x-ats.iot.eu-west-1.amazonaws.com", ""),
            &[],
        )
        .expect("valid");
        assert_eq!(mqtt_plan(&aws).protocol, MqttProtocol::V5);
        assert!(
            aws.describe().contains("qos=1 protocol=5"),
            "{}",
            aws.describe()
        );

        let mut azure = AZURE.to_string();
        azure += "tls = { ca = \"/etc/hostname\" }\n";
        let key = [("AZURE_KEY", "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ==")];
        let plan = load_str(&azure, &key).expect("valid");
        assert_eq!(mqtt_plan(&plan).protocol, MqttProtocol::V311);
        let e = match load_str(&format!("{azure}protocol = \"5\"\n"), &key) {
            Ok(_) => panic!("MQTT 5 accepted for Azure IoT Hub"),
            Err(e) => e.0[0].to_string(),
        };
        assert!(
            e.starts_with("sinks.hub.protocol: Azure IoT Hub's device endpoint speaks MQTT 3.1.1"),
            "{e}"
        );

        let plain = |extra: &str| {
            format!(
                "[gateway]\nid = \"gw\"\n[sinks.up]\ntype = \"mqtt\"\nurl = \"mqtt://h:1883\"\n{extra}\n\
                 [[rules]]\nname = \"telemetry\"\nfrom = \"#\"\nto = [\"up\"]\n"
            )
        };
        let v5 = load_str(&plain(""), &[]).expect("valid");
        assert_eq!(mqtt_plan(&v5).protocol, MqttProtocol::V5);
        assert!(
            !v5.describe().contains("warning: MQTT 3.1.1"),
            "{}",
            v5.describe()
        );
        let v311 = load_str(&plain("protocol = \"3.1.1\""), &[]).expect("valid");
        assert_eq!(mqtt_plan(&v311).protocol, MqttProtocol::V311);
        let text = v311.describe();
        assert!(text.contains("protocol=3.1.1"), "{text}");
        assert!(
            text.contains("warning: MQTT 3.1.1 upstream: the MQTT 5 properties of messages from rule \"telemetry\""),
            "{text}"
        );
        let e = first_error(&plain("protocol = \"4\""));
        assert!(e.starts_with("sinks.up.protocol"), "{e}");
        // A number: figment's environment provider reads EDGEBRIDGE_SINKS__UP__PROTOCOL=5
        // as one, as TOML does `protocol = 5`.
        let five = load_str(&plain("protocol = 5"), &[]).expect("valid");
        assert_eq!(mqtt_plan(&five).protocol, MqttProtocol::V5);
        let e = first_error(&plain("protocol = 3"));
        assert!(e.starts_with("sinks.up.protocol"), "{e}");
    }

    const AZURE: &str = r#"
        [sinks.hub]
        type = "mqtt"
        profile = "azure-iot-hub"
        hub = "myhub.azure-devices.net"
        device_id = "edge-01"
        shared_access_key = "${AZURE_KEY}"
        sas_ttl = "1h"
        properties = { "$.ct" = "application/json" }
    "#;

    #[test]
    fn azure_profile_builds_sas_auth_and_events_topic() {
        let key = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ==";
        let mut toml = AZURE.to_string();
        toml += "tls = { ca = \"/etc/hostname\" }\n";
        let plan = load_str(&toml, &[("AZURE_KEY", key)]).expect("valid");
        let m = mqtt_plan(&plan);
        assert_eq!((m.host.as_str(), m.port), ("myhub.azure-devices.net", 8883));
        assert_eq!(m.client_id, "edge-01");
        assert_eq!(
            m.username.as_deref(),
            Some("myhub.azure-devices.net/edge-01/?api-version=2021-04-12")
        );
        let sas = m.sas.as_ref().expect("SAS auth");
        assert_eq!(sas.resource, "myhub.azure-devices.net/devices/edge-01");
        assert_eq!(sas.ttl, Duration::from_secs(3600));
        assert_eq!(m.max_payload, Some(256 * 1024));
        assert!(m.max_packet_size > 256 * 1024);
        let events = m.azure_events.as_ref().expect("events topic");
        assert_eq!(
            events.topic_for("a/b"),
            "devices/edge-01/messages/events/topic=a%2Fb&$.ct=application%2Fjson"
        );
        let text = plan.describe();
        assert!(!text.contains(key), "{text}");
        assert!(
            !format!("{plan:?}").contains("c2VjcmV0"),
            "the key shows in Debug"
        );
        assert!(
            text.contains(
                "azure-iot-hub: password: a SAS token for myhub.azure-devices.net/devices/edge-01"
            ),
            "{text}"
        );
        assert!(text.contains("renewed 5m before it expires"), "{text}");
    }

    #[test]
    fn azure_profile_errors_name_their_keys() {
        let key = [("AZURE_KEY", "c2VjcmV0")];
        let cases = [
            ("shared_access_key = \"${AZURE_KEY}\"", "", "sinks.hub.shared_access_key: missing: profile \"azure-iot-hub\" needs shared_access_key or tls.cert and tls.key"),
            ("sas_ttl = \"1h\"", "sas_ttl = \"1s\"", "sinks.hub.sas_ttl: must be between 2s and 365d"),
            ("device_id = \"edge-01\"", "device_id = \"a/b\"", "sinks.hub.device_id: required; the device identity in the hub (no / + # & =)"),
            ("sas_ttl = \"1h\"", "sas_ttl = \"1h\"\nqos = 2", "sinks.hub.qos: Azure IoT Hub does not support QoS 2; use 0 or 1"),
            ("sas_ttl = \"1h\"", "sas_ttl = \"1h\"\nclient_id = \"other\"", "sinks.hub.client_id: Azure IoT Hub requires the device_id as client id; leave it out"),
            ("hub = \"myhub.azure-devices.net\"", "", "sinks.hub.hub: missing (required by profile \"azure-iot-hub\": {name}.azure-devices.net)"),
        ];
        for (from, to, expected) in cases {
            let toml = AZURE.replace(from, to) + "url = \"mqtt://127.0.0.1:1883\"\n";
            let toml = if from.starts_with("hub") {
                toml.replace("url = \"mqtt://127.0.0.1:1883\"\n", "")
            } else {
                toml
            };
            let e = match load_str(&toml, &key) {
                Ok(_) => panic!("accepted: {toml}"),
                Err(e) => e.0[0].to_string(),
            };
            assert_eq!(e, expected, "for {to}");
        }
        let e = match load_str(
            &(AZURE.to_string() + "url = \"mqtt://h:1\"\n"),
            &[("AZURE_KEY", "not base64!")],
        ) {
            Ok(_) => panic!("accepted a bad key"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.starts_with("sinks.hub.shared_access_key: not valid base64"),
            "{e}"
        );
        assert!(!e.contains("not base64!"), "{e}");
    }

    #[test]
    fn rate_is_read_for_every_sink_kind_and_shown_by_check() {
        let plan = load_str(
            r#"[sinks.out]
            type = "file"
            path = "out.ndjson"
            rate = { messages = 100, bytes = "512KiB" }
            [sinks.hook]
            type = "http"
            url = "http://127.0.0.1:9/in"
            rate = { bytes = "20KiB" }
            [sinks.lake]
            type = "kafka"
            brokers = ["a:9092"]
            topic = "t"
            rate = { messages = 5 }
            "#,
            &[],
        )
        .expect("valid");
        let rate = |name: &str| {
            plan.sinks
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.rate)
        };
        assert_eq!(
            rate("out"),
            Some(Rate {
                messages: Some(100),
                bytes: Some(512 * 1024)
            })
        );
        assert_eq!(
            rate("hook"),
            Some(Rate {
                messages: None,
                bytes: Some(20 * 1024)
            })
        );
        assert_eq!(
            rate("lake"),
            Some(Rate {
                messages: Some(5),
                bytes: None
            })
        );
        let text = plan.describe();
        for line in [
            "rate 100 msg/s, 512.0 KiB/s",
            "rate 20.0 KiB/s",
            "rate 5 msg/s",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        let plan = load_str(GOOD, &[]).expect("valid");
        assert_eq!(plan.sinks[0].rate, None);
        assert!(!plan.describe().contains("rate"));
    }

    #[test]
    fn bad_rates_are_named_by_their_key_path() {
        let cases = [
            (
                "rate = { messages = 0 }",
                "sinks.out.rate.messages: must be between 1",
            ),
            (
                "rate = { messages = -5 }",
                "sinks.out.rate.messages: must be between 1",
            ),
            (
                "rate = { bytes = 0 }",
                "sinks.out.rate.bytes: must be above zero",
            ),
            (
                "rate = { bytes = \"-1KiB\" }",
                "sinks.out.rate.bytes: invalid size",
            ),
            (
                "rate = { bytes = -1 }",
                "sinks.out.rate.bytes: a byte size cannot be negative",
            ),
            ("rate = {}", "sinks.out.rate: set messages"),
            (
                "rate = { messages = 10, burst = 5 }",
                "sinks.out.rate.burst: unknown key \"burst\"",
            ),
            ("rate = 100", "sinks.out.rate: expected"),
        ];
        for (line, expected) in cases {
            let toml = format!("[sinks.out]\ntype = \"file\"\npath = \"out.ndjson\"\n{line}\n");
            let e = first_error(&toml);
            assert!(e.starts_with(expected), "{line}: {e}");
        }
    }

    #[test]
    fn aws_profile_paces_at_aws_limits_unless_rate_is_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = "mqtts://x-ats.iot.eu-west-1.amazonaws.com";
        let plan = load_str(&aws_sink(dir.path(), url, ""), &[]).expect("valid");
        assert_eq!(
            plan.sinks[0].rate,
            Some(Rate {
                messages: Some(100),
                bytes: Some(512 * 1024)
            })
        );
        let text = plan.describe();
        assert!(
            text.contains("aws-iot: rate 100 msg/s, 512.0 KiB/s per connection"),
            "{text}"
        );
        let plan =
            load_str(&aws_sink(dir.path(), url, "rate = { messages = 20 }"), &[]).expect("valid");
        assert_eq!(
            plan.sinks[0].rate,
            Some(Rate {
                messages: Some(20),
                bytes: None
            })
        );
        assert!(!plan.describe().contains("aws-iot: rate"));
        // A bad rate is reported, not replaced by the profile's.
        let e = first_error(&aws_sink(dir.path(), url, "rate = { messages = 0 }"));
        assert!(e.starts_with("sinks.aws.rate.messages:"), "{e}");
    }
}
