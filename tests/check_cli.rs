//! `edgebridge check` as a user runs it: the real binary, real files, real environment.
//!
//! The contract under test (DESIGN.md, "The contract"): `check` validates the config and
//! prints the resolved plan with secrets masked; a bad config gives one line per problem
//! naming the key path (`sinks.cloud.url: ...`), exit code 64, and nothing written.
//! Every shipped config (config/*.toml, config/examples/*.toml) must pass as is.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// EX_USAGE: what `edgebridge` exits with on a bad config.
const EXIT_CONFIG: i32 = 64;

/// Files in the scratch `certs/` directory; `cert.pem` is deliberately absent.
const PRESENT_CERT_FILES: [&str; 2] = ["ca.pem", "key.pem"];

/// Runs `edgebridge check --config <config>` in `cwd`, with `set` added to the environment
/// and `unset` removed. `EDGEBRIDGE_*` overrides from the caller's environment are removed
/// too, so the outcome depends on the file and on `set` only.
fn run_check(config: &Path, cwd: &Path, set: &[(&str, &str)], unset: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgebridge"));
    cmd.arg("check")
        .arg("--config")
        .arg(config)
        .current_dir(cwd);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("EDGEBRIDGE_") {
            cmd.env_remove(name);
        }
    }
    for name in unset {
        cmd.env_remove(name);
    }
    cmd.envs(set.iter().copied());
    cmd.output().expect("run edgebridge check")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every path under `root`, relative to it: a snapshot to prove a run wrote nothing.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.insert(path.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
    found
}

/// A temp dir to check one config in: `certs/` holds some certificate files, the config
/// is written next to it, and the gateway's data_dir points at `data/` inside it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        fs::create_dir(&certs).expect("create certs dir");
        for name in PRESENT_CERT_FILES {
            fs::write(certs.join(name), "not a real certificate").expect("write cert file");
        }
        Scratch { dir }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn cert_dir(&self) -> String {
        self.dir.path().join("certs").display().to_string()
    }

    /// Writes `body` to `<scratch>/edgebridge.toml` after a first line
    /// `gateway.data_dir = "<scratch>/data"`. Because that opens the gateway table with a
    /// dotted key, a body sets other gateway keys the same way (`gateway.id = …`), before
    /// its first `[table]`.
    fn write_config(&self, body: &str) -> PathBuf {
        let config = self.dir.path().join("edgebridge.toml");
        let data_dir = self.data_dir().display().to_string();
        fs::write(&config, format!("gateway.data_dir = {data_dir:?}\n{body}"))
            .expect("write config");
        config
    }

    /// Checks `config` in the scratch dir, with CERT_DIR set to the scratch `certs/`.
    fn check(&self, config: &Path, set: &[(&str, &str)], unset: &[&str]) -> Output {
        let cert_dir = self.cert_dir();
        let mut env = vec![("CERT_DIR", cert_dir.as_str())];
        env.extend_from_slice(set);
        run_check(config, self.dir.path(), &env, unset)
    }
}

/// Checks `body` in a fresh scratch dir and asserts what every rejected config must
/// show: exit 64, no plan on stdout, no data_dir and no other file created. Returns
/// stderr.
fn rejected(body: &str, set: &[(&str, &str)], unset: &[&str]) -> Result<String, String> {
    let scratch = Scratch::new();
    let config = scratch.write_config(body);
    let before = tree(scratch.dir.path());
    let out = scratch.check(&config, set, unset);
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    let mut problems = Vec::new();
    if out.status.code() != Some(EXIT_CONFIG) {
        problems.push(format!("exit status {} instead of 64", out.status));
    }
    if !stdout.is_empty() {
        problems.push(format!("printed a plan on stdout:\n{stdout}"));
    }
    if scratch.data_dir().exists() {
        problems.push("created the data_dir".to_string());
    }
    let after = tree(scratch.dir.path());
    if after != before {
        let new: Vec<_> = after.difference(&before).collect();
        problems.push(format!("wrote files: {new:?}"));
    }
    if problems.is_empty() {
        Ok(stderr)
    } else {
        Err(format!("{}\nstderr:\n{stderr}", problems.join("\n")))
    }
}

/// A config with exactly one problem, and the single stderr line it must give.
struct Broken {
    what: &'static str,
    body: &'static str,
    /// The key path the line starts with, before `: `.
    path: &'static str,
    /// A piece of the message after the path.
    says: &'static str,
}

/// Runs every case and fails once, listing each case that did not behave.
fn assert_all_rejected(cases: &[Broken], set: &[(&str, &str)], unset: &[&str]) {
    let mut failures = Vec::new();
    for case in cases {
        let result = rejected(case.body, set, unset).and_then(|stderr| {
            let lines: Vec<&str> = stderr.lines().collect();
            let prefix = format!("{}: ", case.path);
            match lines.as_slice() {
                [line] if line.starts_with(&prefix) && line.contains(case.says) => Ok(()),
                _ => Err(format!(
                    "expected one line starting {prefix:?} and containing {:?}, got:\n{stderr}",
                    case.says
                )),
            }
        });
        if let Err(why) = result {
            failures.push(format!("--- {}:\n{why}", case.what));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} broken configs misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// `.toml` files directly in `dir`, sorted.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

/// The file names a config refers to as `${CERT_DIR}/<name>`, comments included (a
/// commented-out variant should work once uncommented).
fn cert_files_referenced(config: &str) -> BTreeSet<String> {
    const MARKER: &str = "${CERT_DIR}/";
    config
        .match_indices(MARKER)
        .map(|(at, _)| {
            let rest = &config[at + MARKER.len()..];
            let end = rest
                .find(|c: char| c == '"' || c == '\'' || c == ',' || c.is_whitespace())
                .unwrap_or(rest.len());
            rest[..end].to_string()
        })
        .collect()
}

#[test]
fn every_shipped_config_passes_check() {
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let examples = toml_files(&config_dir.join("examples"));
    let mut files = toml_files(&config_dir);
    assert!(
        files.iter().any(|f| f.ends_with("edgebridge.toml")),
        "config/edgebridge.toml not found in {files:?}"
    );
    assert!(!examples.is_empty(), "no examples in config/examples/");
    files.extend(examples);

    // Each referenced certificate exists (check only verifies that the files exist).
    let certs = tempfile::tempdir().expect("tempdir for certs");
    for file in &files {
        let config = fs::read_to_string(file).expect("read config");
        for name in cert_files_referenced(&config) {
            fs::write(certs.path().join(name), "not a real certificate").expect("write cert");
        }
    }
    let cert_dir = certs.path().display().to_string();
    let hivemq_password = "example-password-must-not-show";
    let webhook_token = "example-token-must-not-show";
    let kafka_secret = "example-kafka-secret-must-not-show";
    // A valid base64 key (Azure's keys are base64); it must never be printed.
    let azure_key = "ZXhhbXBsZS1henVyZS1rZXktbXVzdC1ub3Qtc2hvdw==";
    let env = [
        ("KAFKA_API_KEY", "example-key"),
        ("KAFKA_API_SECRET", kafka_secret),
        ("AZURE_IOT_HUB", "example-hub.azure-devices.net"),
        ("AZURE_DEVICE_KEY", azure_key),
        ("WEBHOOK_TOKEN", webhook_token),
        ("CERT_DIR", cert_dir.as_str()),
        (
            "AWS_IOT_ENDPOINT",
            "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com",
        ),
        ("HIVEMQ_PASSWORD", hivemq_password),
    ];
    // Relative paths in the configs (data_dir = "data", file sinks) resolve in here.
    let cwd = tempfile::tempdir().expect("tempdir for cwd");

    let mut failures = Vec::new();
    for file in &files {
        let out = run_check(file, cwd.path(), &env, &[]);
        let stdout = text(&out.stdout);
        let stderr = text(&out.stderr);
        let ok = out.status.success()
            && stdout.contains("config OK")
            && !stdout.contains(hivemq_password)
            && !stderr.contains(hivemq_password)
            && !stdout.contains(webhook_token)
            && !stderr.contains(webhook_token)
            && !stdout.contains(kafka_secret)
            && !stderr.contains(kafka_secret)
            && !stdout.contains(azure_key)
            && !stderr.contains(azure_key);
        // The aws-iot profile paces at AWS's limits, and says so.
        let paced = !file.ends_with("aws-iot.toml")
            || stdout.contains("aws-iot: rate 100 msg/s, 512.0 KiB/s per connection");
        if !ok || !paced {
            failures.push(format!(
                "--- {} ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
                file.display(),
                out.status
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "shipped configs failed `check` (or printed a secret):\n{}",
        failures.join("\n")
    );
    let written = tree(cwd.path());
    assert!(written.is_empty(), "check wrote files: {written:?}");
}

#[test]
fn broken_configs_exit_64_name_the_key_and_write_nothing() {
    let cases = [
        Broken {
            what: "rule sends to a sink that does not exist",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                [[rules]]
                name = "telemetry"
                from = "factory/#"
                to = ["nowhere"]
            "#,
            path: "rules[0].to[0]",
            says: "unknown sink \"nowhere\"",
        },
        Broken {
            what: "invalid topic filter ('#' not last)",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                [[rules]]
                name = "telemetry"
                from = "factory/#/telemetry"
                to = ["archive"]
            "#,
            path: "rules[0].from",
            says: "'#'",
        },
        Broken {
            what: "topic template refers to a wildcard the filter does not have",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                [[rules]]
                name = "telemetry"
                from = "factory/+/telemetry"
                to = ["archive"]
                topic = "dt/{gateway_id}/{2}"
            "#,
            path: "rules[0].topic",
            says: "{2}",
        },
        Broken {
            what: "sink URL with an unsupported scheme",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "http://broker.example.com:1883"
            "#,
            path: "sinks.cloud.url",
            says: "scheme \"http\" is not supported",
        },
        Broken {
            what: "sink URL that does not parse",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtts//broker.example.com:8883"
            "#,
            path: "sinks.cloud.url",
            says: "invalid URL",
        },
        Broken {
            what: "client certificate file missing",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtts://broker.example.com:8883"
                tls = { ca = "${CERT_DIR}/ca.pem", cert = "${CERT_DIR}/cert.pem", key = "${CERT_DIR}/key.pem" }
            "#,
            path: "sinks.cloud.tls.cert",
            says: "cert.pem not found",
        },
        Broken {
            what: "tls set on a plain mqtt:// URL",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtt://broker.example.com:1883"
                tls = { ca = "${CERT_DIR}/ca.pem" }
            "#,
            path: "sinks.cloud.tls",
            says: "not mqtts://",
        },
        Broken {
            what: "two listeners with the same name",
            body: r#"
                [[listeners]]
                name = "devices"
                bind = "127.0.0.1:1883"
                [[listeners]]
                name = "devices"
                bind = "127.0.0.1:1884"
            "#,
            path: "listeners[1].name",
            says: "duplicate listener name \"devices\"",
        },
        Broken {
            what: "two rules with the same name",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                [[rules]]
                name = "telemetry"
                from = "a/#"
                to = ["archive"]
                [[rules]]
                name = "telemetry"
                from = "b/#"
                to = ["archive"]
            "#,
            path: "rules[1].name",
            says: "duplicate rule name \"telemetry\"",
        },
        Broken {
            what: "buffer size that is not a size",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                buffer = { max_bytes = "lots" }
            "#,
            path: "sinks.archive.buffer.max_bytes",
            says: "invalid size \"lots\"",
        },
        Broken {
            what: "broker segment size with an unknown unit",
            body: r#"
                [broker]
                max_segment_size = "1 potato"
            "#,
            path: "broker.max_segment_size",
            says: "invalid size",
        },
        Broken {
            what: "gateway duration that is not a duration",
            body: r#"
                gateway.shutdown_grace = "soon"
            "#,
            path: "gateway.shutdown_grace",
            says: "invalid duration \"soon\"",
        },
        Broken {
            what: "sink duration that is not a duration",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtt://broker.example.com:1883"
                backoff_max = "forever"
            "#,
            path: "sinks.cloud.backoff_max",
            says: "invalid duration \"forever\"",
        },
        Broken {
            what: "unknown top-level key",
            body: r#"
                colour = "blue"
            "#,
            path: "colour",
            says: "unknown key",
        },
        Broken {
            what: "unknown key in a sink (misspelt password)",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtt://broker.example.com:1883"
                username = "gateway"
                pasword = "secret"
            "#,
            path: "sinks.cloud.pasword",
            says: "unknown key",
        },
        Broken {
            what: "unknown key in a sink's tls table",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtts://broker.example.com:8883"
                tls = { cafile = "${CERT_DIR}/ca.pem" }
            "#,
            path: "sinks.cloud.tls.cafile",
            says: "unknown key",
        },
        Broken {
            what: "unknown sink type",
            body: r#"
                [sinks.cloud]
                type = "carrier-pigeon"
                url = "mqtt://broker.example.com:1883"
            "#,
            path: "sinks.cloud.type",
            says: "unknown sink type \"carrier-pigeon\"",
        },
        Broken {
            what: "sink without a type",
            body: r#"
                [sinks.cloud]
                url = "mqtt://broker.example.com:1883"
            "#,
            path: "sinks.cloud.type",
            says: "missing",
        },
        Broken {
            what: "${VAR} not set, in a sink",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtt://broker.example.com:1883"
                username = "gateway"
                password = "${EB_TEST_UNSET_PASSWORD}"
            "#,
            path: "sinks.cloud.password",
            says: "environment variable EB_TEST_UNSET_PASSWORD is not set",
        },
        Broken {
            what: "${VAR} not set, in a rule's list of sinks",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                [[rules]]
                name = "telemetry"
                from = "a/#"
                to = ["${EB_TEST_UNSET_SINK}"]
            "#,
            path: "rules[0].to[0]",
            says: "environment variable EB_TEST_UNSET_SINK is not set",
        },
        Broken {
            what: "QoS out of range",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtt://broker.example.com:1883"
                qos = 3
            "#,
            path: "sinks.cloud.qos",
            says: "must be 0, 1 or 2",
        },
        Broken {
            what: "rate of zero messages per second",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                url = "mqtt://broker.example.com:1883"
                rate = { messages = 0 }
            "#,
            path: "sinks.cloud.rate.messages",
            says: "must be between 1",
        },
        Broken {
            what: "negative rate",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                rate = { messages = -100 }
            "#,
            path: "sinks.archive.rate.messages",
            says: "must be between 1",
        },
        Broken {
            what: "rate with neither messages nor bytes",
            body: r#"
                [sinks.hook]
                type = "http"
                url = "http://127.0.0.1:9/in"
                rate = {}
            "#,
            path: "sinks.hook.rate",
            says: "set messages",
        },
        Broken {
            what: "unknown key in a rate",
            body: r#"
                [sinks.hook]
                type = "http"
                url = "http://127.0.0.1:9/in"
                rate = { messages = 10, per = "1m" }
            "#,
            path: "sinks.hook.rate.per",
            says: "unknown key \"per\"",
        },
        Broken {
            what: "rate bytes that are not a size",
            body: r#"
                [sinks.lake]
                type = "kafka"
                brokers = ["k:9092"]
                topic = "t"
                rate = { bytes = "fast" }
            "#,
            path: "sinks.lake.rate.bytes",
            says: "invalid size",
        },
        Broken {
            what: "admin bind that is not host:port",
            body: r#"
                [admin]
                bind = "localhost"
            "#,
            path: "admin.bind",
            says: "not a host:port address",
        },
    ];
    assert_all_rejected(
        &cases,
        &[],
        &["EB_TEST_UNSET_PASSWORD", "EB_TEST_UNSET_SINK"],
    );
}

#[test]
fn missing_required_keys_are_named_by_their_full_path() {
    let cases = [
        Broken {
            what: "rule without `from`",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                [[rules]]
                name = "telemetry"
                to = ["archive"]
            "#,
            path: "rules[0].from",
            says: "missing",
        },
        Broken {
            what: "mqtt sink without `url`",
            body: r#"
                [sinks.cloud]
                type = "mqtt"
                qos = 1
            "#,
            path: "sinks.cloud.url",
            says: "missing",
        },
        Broken {
            what: "listener without `bind`",
            body: r#"
                [[listeners]]
                name = "devices"
            "#,
            path: "listeners[0].bind",
            says: "missing",
        },
    ];
    assert_all_rejected(&cases, &[], &[]);
}

#[test]
fn keys_in_arrays_are_named_with_brackets_in_every_error() {
    let cases = [
        Broken {
            what: "listener packet size that is not a size",
            body: r#"
                [[listeners]]
                name = "devices"
                bind = "127.0.0.1:1883"
                max_packet_size = "huge"
            "#,
            path: "listeners[0].max_packet_size",
            says: "invalid size \"huge\"",
        },
        Broken {
            what: "unknown key in a listener",
            body: r#"
                [[listeners]]
                name = "devices"
                bind = "127.0.0.1:1883"
                websockets = true
            "#,
            path: "listeners[0].websockets",
            says: "unknown key",
        },
        Broken {
            what: "unknown key in a rule",
            body: r#"
                [sinks.archive]
                type = "file"
                path = "out.ndjson"
                [[rules]]
                name = "hot"
                from = "a/#"
                to = ["archive"]
                when = "payload.temperature > 80"
            "#,
            path: "rules[0].when",
            says: "unknown key",
        },
    ];
    assert_all_rejected(&cases, &[], &[]);
}

#[test]
fn every_problem_is_reported_on_its_own_line() {
    let stderr = rejected(
        r#"
            [admin]
            bind = "nope"
            [sinks.cloud]
            type = "mqtt"
            url = "ftp://broker.example.com"
            [[rules]]
            name = "telemetry"
            from = "factory/#"
            to = ["cloud", "nowhere"]
        "#,
        &[],
        &[],
    )
    .unwrap_or_else(|why| panic!("{why}"));
    let paths = key_paths(&stderr);
    assert_eq!(
        paths,
        ["admin.bind", "sinks.cloud.url", "rules[0].to[1]"],
        "stderr:\n{stderr}"
    );
}

/// The key path each line of `check`'s errors starts with.
fn key_paths(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .map(|line| line.split(": ").next().unwrap_or_default())
        .collect()
}

#[test]
fn parse_level_mistakes_are_all_reported_at_once() {
    // Five mistakes serde would stop at one by one: an unknown key, a bad duration, a bad
    // value of a listener, and two in one sink table.
    let stderr = rejected(
        r#"gateway.idd = "edge-7"
            [admin]
            history_interval = "soon"
            [[listeners]]
            name = "devices"
            bind = "127.0.0.1:1883"
            ack = "sometimes"
            [sinks.cloud]
            type = "mqtt"
            url = "mqtt://broker.example.com"
            qoss = 1
            keep_alive = true
        "#,
        &[],
        &[],
    )
    .unwrap_or_else(|why| panic!("{why}"));
    let paths = key_paths(&stderr);
    assert_eq!(
        paths,
        [
            "admin.history_interval",
            "gateway.idd",
            "listeners[0].ack",
            "sinks.cloud.keep_alive",
            "sinks.cloud.qoss",
        ],
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("unknown value \"sometimes\"; use one of: durable, received"),
        "the config's spelling, no doubled backticks:\n{stderr}"
    );
}

#[test]
fn addresses_that_cannot_all_be_bound_are_refused_by_check() {
    assert_all_rejected(
        &[
            Broken {
                what: "two listeners on one address",
                body: r#"
                    [[listeners]]
                    name = "a"
                    bind = "127.0.0.1:18830"
                    [[listeners]]
                    name = "b"
                    bind = "127.0.0.1:18830"
                "#,
                path: "listeners[1].bind",
                says: "also the address of listeners[0] (\"a\")",
            },
            Broken {
                what: "a wildcard and a specific address on one port",
                body: r#"
                    [[listeners]]
                    name = "a"
                    bind = "0.0.0.0:18830"
                    [[listeners]]
                    name = "b"
                    bind = "127.0.0.1:18830"
                    websocket = true
                "#,
                path: "listeners[1].bind",
                says: "also the address of listeners[0]",
            },
            Broken {
                what: "the admin endpoint on a listener's address",
                body: r#"
                    [admin]
                    bind = "127.0.0.1:18831"
                    [[listeners]]
                    name = "devices"
                    bind = "127.0.0.1:18831"
                "#,
                path: "admin.bind",
                says: "also the address of listeners[0] (\"devices\")",
            },
        ],
        &[],
        &[],
    );
}

#[test]
fn a_data_dir_that_cannot_be_created_is_refused_by_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "x").expect("write file");
    let config = dir.path().join("edgebridge.toml");
    let data_dir = file.join("data").display().to_string();
    fs::write(&config, format!("gateway.data_dir = {data_dir:?}\n")).expect("write config");
    let out = run_check(&config, dir.path(), &[], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert!(
        stderr.starts_with("gateway.data_dir: ") && stderr.contains("is not a directory"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn check_warns_when_a_device_may_publish_more_than_an_mqtt_sink_takes() {
    let scratch = Scratch::new();
    let body = |listener_limit: &str| {
        format!(
            r##"
            [[listeners]]
            name = "devices"
            bind = "127.0.0.1:18832"
            {listener_limit}
            [sinks.cloud]
            type = "mqtt"
            url = "mqtt://broker.example.com"
            [[rules]]
            name = "all"
            from = "#"
            to = ["cloud"]
        "##
        )
    };
    // Defaults: a listener takes 1 MiB, an MQTT sink 256 KiB.
    let out = scratch.check(&scratch.write_config(&body("")), &[], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains(
            "warning: listener devices takes publishes up to 1048576 bytes, this sink's max_packet_size is 262144"
        ),
        "{stdout}"
    );
    let out = scratch.check(
        &scratch.write_config(&body("max_packet_size = \"200KiB\"")),
        &[],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!stdout.contains("warning: listener"), "{stdout}");
}

const SECRET: &str = "hunter2-very-secret";

const SINK_WITH_SECRET: &str = r#"
    [sinks.cloud]
    type = "mqtt"
    url = "mqtts://broker.example.com:8883"
    username = "gateway"
    password = "${SECRET}"
    tls = { ca = "${CERT_DIR}/ca.pem", key = "${CERT_DIR}/key.pem", cert = "${CERT_DIR}/ca.pem" }
    [[rules]]
    name = "telemetry"
    from = "factory/#"
    to = ["cloud"]
"#;

#[test]
fn check_masks_the_password_in_the_plan() {
    let scratch = Scratch::new();
    let config = scratch.write_config(SINK_WITH_SECRET);
    let out = scratch.check(&config, &[("SECRET", SECRET)], &[]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("user=gateway password=****"), "{stdout}");
    assert!(stdout.contains("config OK"), "{stdout}");
    assert!(!stdout.contains(SECRET), "secret on stdout:\n{stdout}");
    assert!(!stderr.contains(SECRET), "secret on stderr:\n{stderr}");
    assert!(!scratch.data_dir().exists(), "check created the data_dir");
}

#[test]
fn a_rejected_config_does_not_print_its_secret_either() {
    let body = format!(
        "{SINK_WITH_SECRET}\n[[rules]]\nname = \"telemetry\"\nfrom = \"#\"\nto = [\"cloud\"]\n"
    );
    let stderr = rejected(&body, &[("SECRET", SECRET)], &[]).unwrap_or_else(|why| panic!("{why}"));
    assert!(stderr.starts_with("rules[1].name: "), "{stderr}");
    assert!(!stderr.contains(SECRET), "secret on stderr:\n{stderr}");
}

#[test]
fn missing_config_file_exits_64_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("no-such-edgebridge.toml");
    let out = run_check(&config, dir.path(), &[], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "stderr:\n{stderr}");
    assert!(out.stdout.is_empty(), "stdout:\n{}", text(&out.stdout));
    assert_eq!(
        stderr.trim_end(),
        format!("config file {} not found", config.display())
    );
    assert!(tree(dir.path()).is_empty(), "check wrote files");
}
