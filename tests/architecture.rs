//! The module structure the architecture document promises (ARCHITECTURE.md, section 3),
//! checked over the sources: arrows between the crate's top-level modules point one way
//! (no cycle), and the modules below the composition root never reach into
//! `crate::config`. Reads `use crate::…` and `crate::…` paths outside comments and test
//! modules. Also the size limits of section 9: no file over 800 lines of code, no function
//! over 120 lines.

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

/// `text` with the insides of string and char literals and every comment blanked out
/// (newlines kept, so line numbers hold): what is left are the braces of the code.
fn without_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let word_before = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && !word_before && matches!(next, Some('"' | '#')) {
            // A raw string: r"…", r#"…"#.
            let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            i += hashes + 2;
            out.push_str("\"\"");
            while i < chars.len() {
                let closes = chars[i] == '"'
                    && chars[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == '#')
                        .count()
                        == hashes;
                if closes {
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push_str("\"\"");
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            i += 1;
        } else if c == '\'' && next == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{1}'.
            i += 2;
            while i < chars.len() && chars[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if c == '\'' && chars.get(i + 2) == Some(&'\'') {
            i += 3;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The name of the function a line starts, if it starts one.
fn fn_name(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    if let Some(r) = rest.strip_prefix("pub") {
        rest = match r.strip_prefix('(') {
            Some(r) => r.split_once(')')?.1,
            None => r,
        }
        .trim_start();
    }
    for qualifier in ["const ", "async ", "unsafe "] {
        rest = rest.strip_prefix(qualifier).unwrap_or(rest);
    }
    let name = rest.strip_prefix("fn ")?;
    let end = name
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(name.len());
    Some(&name[..end])
}

/// Each function of `code` (test modules cut off) longer than `limit` lines, counted from
/// its `fn` line to its closing brace.
fn long_functions(code: &str, limit: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let mut depth = 0i64;
        let mut opened = false;
        for (offset, l) in lines[start..].iter().enumerate() {
            if !opened && l.trim_end().ends_with(';') && !l.contains('{') {
                break; // a declaration without a body
            }
            depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
            opened |= l.contains('{');
            if opened && depth <= 0 {
                if offset + 1 > limit {
                    long.push((name.to_string(), offset + 1));
                }
                break;
            }
        }
    }
    long
}

#[test]
fn the_size_counter_sees_literals_comments_and_bodies() {
    let sample = "fn short() {\n    let s = \"}}}\";\n    let c = '{';\n}\n\
                  // fn commented() {\n\
                  pub(crate) async fn long<'a>(x: &'a str) {\n    let r = r#\"{\"#;\n    \
                  /* } */\n    if x.is_empty() {\n        return;\n    }\n}\n";
    let code = without_literals(sample);
    assert_eq!(code.lines().count(), sample.lines().count());
    assert_eq!(long_functions(&code, 4), vec![("long".to_string(), 7)]);
    assert_eq!(long_functions(&code, 7), vec![]);
    assert_eq!(fn_name("    pub(super) const fn x_1() {"), Some("x_1"));
    assert_eq!(fn_name("    let f = fn_name;"), None);
}

/// ARCHITECTURE.md section 9: no file over 800 lines of code (the lines before its
/// `#[cfg(test)]` test module) and no function over 120 lines.
#[test]
fn no_file_over_800_lines_of_code_and_no_function_over_120() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut too_long = Vec::new();
    let mut functions = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source");
        let code = without_literals(&text);
        let lines: Vec<&str> = code.lines().collect();
        let tests_at = lines
            .windows(2)
            .position(|w| w[0] == "#[cfg(test)]" && w[1].starts_with("mod "))
            .unwrap_or(lines.len());
        let code_lines = &lines[..tests_at];
        let rel = file.strip_prefix(&src).expect("under src").display();
        if code_lines.len() > 800 {
            too_long.push(format!("{rel}: {} lines of code", code_lines.len()));
        }
        let code = code_lines.join("\n");
        functions += code.lines().filter(|l| fn_name(l).is_some()).count();
        for (name, n) in long_functions(&code, 120) {
            too_long.push(format!("{rel}::{name}: {n} lines"));
        }
    }
    assert!(functions > 500, "the functions were found: {functions}");
    assert!(
        too_long.is_empty(),
        "over the limits:\n{}",
        too_long.join("\n")
    );
}
