//! Topic and text templates: parsed from arbitrary source, rendered against a topic with
//! wildcard captures.
#![no_main]

use edgebridge::rules::{level_ranges, Template, TemplateScope, TemplateVars};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgebridge_fuzz_common::quiet_caught_panics();
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let topic = "factory/line1/press7/telemetry";
    let captures = level_ranges(topic);
    let vars = TemplateVars {
        gateway_id: "edge-01",
        topic,
        client_id: "press-7",
    };
    for wildcards in [0, 2, 4] {
        let scope = TemplateScope {
            wildcards,
            client_id: true,
        };
        if let Ok(t) = Template::parse(source, &scope) {
            let _ = t.render(&vars, &captures[..wildcards.min(captures.len())]);
            let _ = t.render_static("edge-01");
        }
        if let Ok(t) = Template::parse_text(source, &scope) {
            let _ = t.render(&vars, &captures[..wildcards.min(captures.len())]);
        }
    }
});

#[path = "common.rs"]
mod edgebridge_fuzz_common;
