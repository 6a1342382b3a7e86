//! A buffer whose one segment file holds arbitrary bytes (a torn write, a corrupt disk):
//! recovered at open, read to the end, acked, and opened again. An I/O error is an
//! answer; a panic, a hang or unbounded memory is the bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgebridge_fuzz_common::quiet_caught_panics();
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    // Small segments, so that the size limits of records are reached too.
    let _ = edgebridge::buffer::fuzz_recover(dir.path(), data, 4096);
});

#[path = "common.rs"]
mod edgebridge_fuzz_common;
