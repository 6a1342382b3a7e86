//! The config loader and validation on arbitrary TOML: a clear error list or a plan,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgebridge_fuzz_common::quiet_caught_panics();
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("edgebridge.toml");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    // No environment: `${VAR}` lookups see nothing.
    if let Ok(config) = edgebridge::config::load_with_env(&path, |_| None) {
        let _ = edgebridge::config::validate(&config);
    }
});

#[path = "common.rs"]
mod edgebridge_fuzz_common;
