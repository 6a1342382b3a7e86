//! A device's byte stream through the connection's packet handling: framing, the
//! CONNECT's protocol level (3.1, 3.1.1, 5), rumqttd's codecs behind edgebridge's guards,
//! and the packets encoded back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgebridge_fuzz_common::quiet_caught_panics();
    let _ = edgebridge::broker::fuzz_device_bytes(data, 64 * 1024);
});

#[path = "common.rs"]
mod edgebridge_fuzz_common;
