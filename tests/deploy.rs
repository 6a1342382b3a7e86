//! deploy/: what can be checked without a Docker engine or a cluster. Each file parses;
//! the configs they ship or mount pass `edgebridge check`; the commands they run exist
//! in the real CLI; the Dockerfile's health check works against a running gateway; the
//! systemd unit passes `systemd-analyze verify` where that tool exists; the Grafana
//! dashboard queries only metrics and labels the gateway exports.

mod common;
#[path = "common/gateway.rs"]
mod gateway;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::free_port;
use gateway::TestGateway;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn edgebridge(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgebridge"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("run edgebridge")
}

/// `edgebridge check` on `config` (text), in an empty directory; returns the plan printed.
fn check(name: &str, config: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgebridge.toml");
    std::fs::write(&path, config).expect("write config");
    let cwd = dir.path().join("cwd");
    std::fs::create_dir(&cwd).expect("cwd");
    let out = edgebridge(&["check", "--config", &path.display().to_string()], &cwd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} fails `edgebridge check`:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_dir(&cwd).expect("list cwd").count();
    assert_eq!(written, 0, "check wrote files");
    stdout
}

/// Instructions of a Dockerfile with their arguments, continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile").replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, args) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_uppercase(), args.trim().to_string())
        })
        .collect()
}

/// The JSON array that ends an exec-form instruction (`CMD [..]`, `HEALTHCHECK .. CMD [..]`).
fn exec_form(args: &str) -> Vec<String> {
    let start = args
        .find('[')
        .unwrap_or_else(|| panic!("not exec form: {args}"));
    serde_json::from_str(&args[start..]).unwrap_or_else(|e| panic!("bad exec form ({e}): {args}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dockerfile_is_multi_stage_non_root_with_a_volume_and_a_working_healthcheck() {
    let steps = dockerfile();
    let get = |op: &str| -> Vec<&str> {
        steps
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let froms = get("FROM");
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(froms[0].ends_with(" AS build"), "{froms:?}");
    let runtime_at = steps
        .iter()
        .rposition(|(o, _)| o == "FROM")
        .expect("runtime stage");
    let runtime = &steps[runtime_at..];
    let user = runtime
        .iter()
        .find(|(o, _)| o == "USER")
        .map(|(_, a)| a.as_str());
    assert_eq!(
        user,
        Some("edgebridge"),
        "the runtime stage runs as a non-root user"
    );
    assert!(
        get("RUN")[1].contains("--uid 10001"),
        "a fixed uid for volume ownership"
    );
    assert_eq!(get("VOLUME"), ["[\"/var/lib/edgebridge\"]"]);
    let env = get("ENV").join(" ");
    assert!(
        env.contains("EDGEBRIDGE_GATEWAY__DATA_DIR=/var/lib/edgebridge"),
        "{env}"
    );
    assert!(env.contains("EDGEBRIDGE_ADMIN__BIND=0.0.0.0:9464"), "{env}");

    // The build context leaves out build output and local data.
    let ignored = read(".dockerignore");
    for path in ["target/", "data/", ".git/"] {
        assert!(
            ignored.lines().any(|l| l == path),
            ".dockerignore lacks {path}"
        );
    }
    // The build command is the README's.
    let build = get("RUN")[0];
    assert!(
        read("README.md").contains(build),
        "README does not show `{build}`"
    );
    // The config copied in passes check; the command runs the real CLI.
    let copied = get("COPY")
        .into_iter()
        .find(|a| a.ends_with("/etc/edgebridge/edgebridge.toml"))
        .and_then(|a| a.split_whitespace().next())
        .expect("the config is copied in");
    check("the Dockerfile's config", &read(copied));
    assert_eq!(exec_form(get("ENTRYPOINT")[0]), ["edgebridge"]);
    let cmd = exec_form(get("CMD")[0]);
    assert_eq!(
        cmd[..3],
        ["run", "--config", "/etc/edgebridge/edgebridge.toml"]
    );
    let help = edgebridge(&["run", "--help"], &repo("."));
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for flag in cmd.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "`run` has no {flag}:\n{help}");
    }

    // The health check, run as Docker would, against a real gateway's admin port.
    let healthcheck = get("HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1);
    assert!(healthcheck[0].contains("/healthz"), "{healthcheck:?}");
    let probe = exec_form(healthcheck[0]);
    let mut gw = TestGateway::start(gateway::FILE_SINK).await;
    let admin_port = gw.gw().admin_addr.port().to_string();
    let healthy = tokio::task::spawn_blocking({
        let (probe, port) = (probe.clone(), admin_port.clone());
        move || run_probe(&probe, &port)
    });
    assert!(
        healthy.await.expect("probe"),
        "health check fails on a healthy gateway"
    );
    gw.shutdown().await;
    let after = tokio::task::spawn_blocking(move || run_probe(&probe, &admin_port));
    assert!(
        !after.await.expect("probe"),
        "health check passes with the gateway gone"
    );
}

/// Runs a Docker exec-form health check with the admin port 9464 replaced by `port`.
fn run_probe(probe: &[String], port: &str) -> bool {
    let args: Vec<String> = probe.iter().map(|a| a.replace("9464", port)).collect();
    Command::new(&args[0])
        .args(&args[1..])
        .status()
        .expect("run the health check")
        .success()
}

/// `Key=Value` lines of a unit file (all values of repeated keys).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

#[test]
fn systemd_unit_restarts_always_with_a_state_directory_and_hardening() {
    let unit = read("deploy/edgebridge.service");
    let one = |key: &str| -> String {
        let values = unit_values(&unit, key);
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        values[0].clone()
    };
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("RestartPreventExitStatus"), "64");
    assert_eq!(one("StateDirectory"), "edgebridge");
    assert_eq!(one("WorkingDirectory"), "/var/lib/edgebridge");
    assert_eq!(
        one("Environment"),
        "EDGEBRIDGE_GATEWAY__DATA_DIR=/var/lib/edgebridge"
    );
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    // The command is the real CLI, with the config the install steps put in place.
    let exec = one("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(
        args,
        [
            "/usr/local/bin/edgebridge",
            "run",
            "--config",
            "/etc/edgebridge/edgebridge.toml"
        ]
    );
    assert!(unit.contains("config/edgebridge.toml /etc/edgebridge/edgebridge.toml"));
    check("config/edgebridge.toml", &read("config/edgebridge.toml"));

    // systemd's own verification, where the tool exists, with ExecStart pointing at a
    // binary that exists here.
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if analyze.exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copy = dir.path().join("edgebridge.service");
        let text = unit.replace(
            "/usr/local/bin/edgebridge",
            env!("CARGO_BIN_EXE_edgebridge"),
        );
        std::fs::write(&copy, text).expect("write unit");
        let out = Command::new(analyze)
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("run systemd-analyze");
        assert!(
            out.status.success(),
            "systemd-analyze verify:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("systemd-analyze not installed: unit verified by its keys only");
    }
}

#[test]
fn compose_runs_edgebridge_mosquitto_and_a_kafka_compatible_broker() {
    let docs = yaml("deploy/compose.yml");
    let services = &docs[0]["services"];
    assert!(services["cloud"]["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("eclipse-mosquitto")));
    assert!(services["kafka"]["image"]
        .as_str()
        .is_some_and(|i| i.contains("tansu")));
    let edge = &services["edgebridge"];
    assert_eq!(
        edge["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile")
    );
    let context = repo("deploy").join(edge["build"]["context"].as_str().expect("context"));
    assert!(context.join("deploy/Dockerfile").is_file());
    let volumes: Vec<&str> = edge["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        volumes.contains(&"edgebridge-data:/var/lib/edgebridge"),
        "{volumes:?}"
    );
    assert!(!docs[0]["volumes"]["edgebridge-data"].is_badvalue());
    let config = volumes
        .iter()
        .find_map(|v| v.strip_suffix(":/etc/edgebridge/edgebridge.toml:ro"))
        .expect("the config is mounted");
    let config = config.trim_start_matches("./");
    let plan = check("compose's config", &read(&format!("deploy/{config}")));
    // The sink's upstream is the compose service; the admin port is published.
    assert!(plan.contains("mqtt://cloud:1883"), "{plan}");
    assert!(plan.contains("admin http://0.0.0.0:9464"), "{plan}");
    let ports: Vec<&str> = edge["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(ports, ["1883:1883", "9464:9464"]);
}

#[test]
fn kubernetes_statefulset_keeps_the_buffers_on_a_volume_and_probes_health_and_readiness() {
    let docs = yaml("deploy/kubernetes.yaml");
    let kind = |k: &str| -> &Yaml {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let config = kind("ConfigMap")["data"]["edgebridge.toml"]
        .as_str()
        .expect("config in the ConfigMap");
    let plan = check("the ConfigMap's config", config);
    assert!(plan.contains("admin http://0.0.0.0:9464"), "{plan}");

    let set = kind("StatefulSet");
    let pod = &set["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let ports = container["ports"].as_vec().expect("ports");
    let admin = ports
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("admin port");
    assert_eq!(admin["containerPort"].as_i64(), Some(9464));
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"].as_str(),
        Some("admin")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"].as_str(),
        Some("admin")
    );
    let args: Vec<&str> = container["args"]
        .as_vec()
        .expect("args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        args[..3],
        ["run", "--config", "/etc/edgebridge/edgebridge.toml"]
    );

    // The buffers live on the claim, mounted where data_dir points.
    let claim = set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .expect("a volume claim template");
    let mounts = container["volumeMounts"].as_vec().expect("mounts");
    let data = mounts
        .iter()
        .find(|m| m["name"].as_str() == Some(claim))
        .expect("the claim is mounted");
    assert_eq!(data["mountPath"].as_str(), Some("/var/lib/edgebridge"));
    let env = container["env"].as_vec().expect("env");
    assert!(env.iter().any(|e| {
        e["name"].as_str() == Some("EDGEBRIDGE_GATEWAY__DATA_DIR")
            && e["value"].as_str() == Some("/var/lib/edgebridge")
    }));
    // The Dockerfile's non-root uid, and the volume given to it.
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(security["runAsUser"].as_i64(), Some(10001));
    assert_eq!(security["fsGroup"].as_i64(), Some(10001));
    assert!(read("deploy/Dockerfile").contains("--uid 10001"));
}

/// Metric names referred to in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let word = &tail[..end];
        if word.starts_with("edgebridge_") || word.starts_with("process_") {
            names.push(word.to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Labels of every `by (...)` clause.
fn grouping_labels(expr: &str) -> Vec<String> {
    expr.match_indices("by (")
        .flat_map(|(at, m)| {
            let inner = &expr[at + m.len()..];
            let inner = &inner[..inner.find(')').unwrap_or(inner.len())];
            inner
                .split(',')
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grafana_dashboard_queries_only_metrics_the_gateway_exports() {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana-dashboard.json")).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel}");
        exprs.extend(
            targets
                .iter()
                .filter_map(|t| t["expr"].as_str().map(String::from)),
        );
    }

    // Every series a gateway with an MQTT and a file sink exports.
    let body = format!(
        "[sinks.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\n{}",
        free_port(),
        gateway::FILE_SINK.replace("to = [\"local\"]", "to = [\"local\", \"cloud\"]")
    );
    let mut gw = TestGateway::start(&body).await;
    common::publish_seq(
        "127.0.0.1",
        gw.port(),
        "d",
        "a/b",
        0,
        5,
        rumqttc::QoS::AtLeastOnce,
    )
    .await;
    let exported: BTreeSet<String> = gw
        .gw()
        .metrics
        .render()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next().map(String::from))
        .collect();
    gw.shutdown().await;

    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(
                exported.contains(&name),
                "{name} (in `{expr}`) is not exported"
            );
            used.insert(name);
        }
        for label in grouping_labels(expr) {
            assert!(
                ["sink", "rule", "listener", "reason", "le"].contains(&label.as_str()),
                "label {label} in `{expr}`"
            );
        }
    }
    // Every metric of the README is on the dashboard.
    for family in [
        "edgebridge_messages_received_total",
        "edgebridge_messages_dropped_total",
        "edgebridge_messages_unmatched_total",
        "edgebridge_connections",
        "edgebridge_connections_refused_total",
        "edgebridge_acl_denied_total",
        "edgebridge_rule_matches_total",
        "edgebridge_sink_delivered_total",
        "edgebridge_sink_errors_total",
        "edgebridge_sink_up",
        "edgebridge_buffer_messages",
        "edgebridge_buffer_bytes",
        "edgebridge_buffer_oldest_age_seconds",
        "edgebridge_buffer_dropped_total",
        "edgebridge_delivery_latency_seconds_bucket",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(used.contains(family), "{family} is not on the dashboard");
    }
}
