//! Property tests of config loading and validation: random TOML — random bytes, and
//! documents built from the real keys with hostile values (overflowing sizes and
//! durations, broken templates, filters and URLs, wrong types) — never panics; a refusal
//! is a non-empty list of errors, each naming what is wrong.

use std::io::Write;

use edgebridge::config;
use proptest::prelude::*;

/// Loads `toml` as a config file and validates it. A panic fails the property (proptest
/// reports it with the shrunk input).
fn load(toml: &str) -> Result<(), Vec<String>> {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(toml.as_bytes()).expect("write");
    let errors = match config::load_with_env(file.path(), |_| None) {
        Ok(c) => match config::validate(&c) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        },
        Err(e) => e,
    };
    Err(errors.0.iter().map(ToString::to_string).collect())
}

/// A TOML value, often one that is wrong for the key it lands on.
fn value() -> impl Strategy<Value = String> {
    let strings = prop_oneof![
        Just("0"),
        Just("1KiB"),
        Just("64KiB"),
        Just("1GiB"),
        Just("-5MiB"),
        Just("1.5GiB"),
        Just("99999999999999999999GiB"),
        Just("18446744073709551615"),
        Just("0s"),
        Just("1ms"),
        Just("30s"),
        Just("-1s"),
        Just("18446744073709551615s"),
        Just("99999999999999999999d"),
        Just("7d"),
        Just("#"),
        Just("a/#/b"),
        Just("+/x"),
        Just("dev/+"),
        Just(""),
        Just("{1}"),
        Just("{"),
        Just("{99}/{gateway_id}"),
        Just("{client_id}"),
        Just("mqtt://"),
        Just("mqtt://127.0.0.1:0"),
        Just("mqtts://h:99999"),
        Just("mqtt://[::1"),
        Just("http://127.0.0.1:1/x"),
        Just("https://u:p@h/{1}"),
        Just("127.0.0.1:0"),
        Just("0.0.0.0:99999"),
        Just("${NOPE}"),
        Just("$${x}"),
        Just("mqtt"),
        Just("http"),
        Just("kafka"),
        Just("file"),
        Just("memory"),
        Just("drop_oldest"),
        Just("block"),
        Just("interval"),
        Just("durable"),
        Just("aws-iot"),
        Just("azure-iot-hub"),
        Just("json"),
        Just("payload.x > 1"),
        Just("payload.x >"),
    ]
    .prop_map(|s| format!("{s:?}"));
    let scalars = prop_oneof![
        strings,
        any::<i64>().prop_map(|i| i.to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("65536".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        Just("1.5".to_string()),
        "[a-z0-9 {}$/#+]{0,8}".prop_map(|s| format!("{s:?}")),
    ];
    scalars.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3)
                .prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec((key(), inner), 0..3).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

/// Keys of every section (a key in the wrong section is a test too).
fn key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "id",
        "data_dir",
        "shutdown_grace",
        "bind",
        "name",
        "ack",
        "max_connections",
        "max_packet_size",
        "connect_timeout",
        "tls",
        "websocket",
        "type",
        "url",
        "path",
        "topic",
        "qos",
        "inflight",
        "keep_alive",
        "ack_timeout",
        "backoff_min",
        "backoff_max",
        "profile",
        "client_id",
        "username",
        "password",
        "buffer",
        "max_bytes",
        "segment_size",
        "when_full",
        "ttl",
        "sync",
        "sync_interval",
        "min_free_disk",
        "drain_rate",
        "batch",
        "storage",
        "from",
        "to",
        "where",
        "continue",
        "sink",
        "level",
        "format",
        "max_segment_size",
        "max_segment_count",
        "intake_queue",
        "qos0_high_water",
        "brokers",
        "method",
        "headers",
        "ca",
        "cert",
        "key",
        "alpn",
        "unknown_key",
    ])
}

/// A table header: the real sections, arrays of tables and sink tables.
fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[gateway]".to_string()),
        Just("[admin]".to_string()),
        Just("[broker]".to_string()),
        Just("[log]".to_string()),
        Just("[[listeners]]".to_string()),
        Just("[[rules]]".to_string()),
        Just("[[downlinks]]".to_string()),
        Just("[fallback]".to_string()),
        Just("[sinks.out]".to_string()),
        Just("[sinks.cloud]".to_string()),
        Just("[sinks.cloud.buffer]".to_string()),
        Just("[sinks.cloud.tls]".to_string()),
        Just("[nonsense]".to_string()),
    ]
}

/// A document of 1–6 tables, each with up to 6 keys.
fn document() -> impl Strategy<Value = String> {
    let table = (header(), proptest::collection::vec((key(), value()), 0..6));
    proptest::collection::vec(table, 1..6).prop_map(|tables| {
        let mut doc = String::new();
        for (header, entries) in tables {
            doc += &header;
            doc.push('\n');
            for (k, v) in entries {
                doc += &format!("{k} = {v}\n");
            }
        }
        doc
    })
}

/// A valid config with one key of one section replaced by a random value.
fn mutated_good() -> impl Strategy<Value = String> {
    const GOOD: [&str; 4] = [
        "[gateway]\nid = \"edge-07\"\n",
        "[sinks.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:1884\"\n",
        "[sinks.cloud.buffer]\nmax_bytes = \"1MiB\"\n",
        "[[rules]]\nname = \"all\"\nfrom = \"dev/+\"\nto = [\"cloud\"]\ntopic = \"up/{1}\"\n",
    ];
    (0..GOOD.len(), key(), value()).prop_map(|(at, k, v)| {
        let mut doc = String::new();
        for (i, part) in GOOD.iter().enumerate() {
            doc += part;
            if i == at {
                doc += &format!("{k} = {v}\n");
            }
        }
        doc
    })
}

fn check(toml: &str) -> Result<(), TestCaseError> {
    if let Err(errors) = load(toml) {
        prop_assert!(!errors.is_empty(), "a refusal says why:\n{toml}");
        for e in &errors {
            prop_assert!(!e.trim().is_empty(), "an empty error for:\n{toml}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn random_documents_of_real_keys_never_panic(doc in document()) {
        check(&doc)?;
    }

    #[test]
    fn a_good_config_with_one_bad_key_never_panics(doc in mutated_good()) {
        check(&doc)?;
    }
}

#[test]
fn the_unmutated_good_config_is_accepted() {
    let good = "[gateway]\nid = \"edge-07\"\n[sinks.cloud]\ntype = \"mqtt\"\n\
                url = \"mqtt://127.0.0.1:1884\"\n[sinks.cloud.buffer]\nmax_bytes = \"1MiB\"\n\
                [[rules]]\nname = \"all\"\nfrom = \"dev/+\"\nto = [\"cloud\"]\ntopic = \"up/{1}\"\n";
    assert_eq!(load(good), Ok(()));
}
