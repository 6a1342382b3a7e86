//! One buffer record body, decoded as a read decodes it (after its CRC matched).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgebridge_fuzz_common::quiet_caught_panics();
    let _ = edgebridge::buffer::fuzz_decode_record(data);
});

#[path = "common.rs"]
mod edgebridge_fuzz_common;
