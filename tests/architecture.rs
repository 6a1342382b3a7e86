//! The module structure the architecture document promises (ARCHITECTURE.md, section 3),
//! checked over the sources: arrows between the crate's top-level modules point one way
//! (no cycle), and the modules below the composition root never reach into
//! `crate::config`. Reads `use crate::…` and `crate::…` paths outside comments and test
//! modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → (module it refers to → files that do).
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and its `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .into_owned();
        let module = rel
            .split('/')
            .next()
            .expect("a component")
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&file).expect("read source");
        let code = code(&text);
        let edges = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let target: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !target.is_empty() && target != module {
                edges.entry(target).or_default().insert(rel.clone());
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one (depth-first).
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flat_map(|e| e.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then(|| {
        path.push(start.to_string());
        path
    })
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = graph();
    assert!(graph.len() > 8, "the source tree was read: {graph:?}");
    assert!(
        graph["app"].contains_key("config"),
        "the reader sees the composition root's imports"
    );
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            let files: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("{} -> {}: {:?}", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect();
            panic!("import cycle {}:\n{}", cycle.join(" -> "), files.join("\n"));
        }
    }
}

#[test]
fn only_the_composition_root_and_the_tools_above_it_import_config() {
    let graph = graph();
    for module in [
        "broker", "rules", "buffer", "sinks", "topic", "units", "pem", "problems", "message",
        "metrics",
    ] {
        let into_config = graph.get(module).and_then(|e| e.get("config"));
        assert!(
            into_config.is_none(),
            "{module} imports crate::config in {into_config:?}; its sections belong in its own config.rs"
        );
    }
}
