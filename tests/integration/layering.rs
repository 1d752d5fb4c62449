//! The module layering of ARCHITECTURE.md, enforced: every top-level module of `src/` sits on
//! a layer and may use only modules on lower layers (or itself), and no two modules import
//! each other, directly or in a loop, at any depth up to two (`calls::dialer` ↔
//! `calls::lifecycle` counts). A small scanner of our own instead of `cargo modules`: it
//! needs no extra tool in CI and runs in milliseconds.
//!
//! It reads `crate::…` and `super::…` paths outside comments and outside `#[cfg(test)]`
//! modules (tests may reach anywhere), so a dependency hidden behind a glob re-export of a
//! lower module is still seen where it is spelled.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. A module may use modules on its own line's layer number or lower only if
/// the number is strictly lower, except itself.
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("config", 1),
    ("audio", 1),
    ("store", 2),
    ("ops", 3),
    ("tls", 4),
    ("proxy", 4),
    ("engines", 4),
    ("media", 5),
    ("telephony", 6),
    ("calls", 7),
    ("http", 8),
    ("api", 9),
    ("edge", 10),
    ("server", 11),
    ("cli", 12),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// `src/a/b.rs` → `["a", "b"]`, `src/a/mod.rs` → `["a"]`, `src/lib.rs` → `[]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

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

/// The code of a file without comments and without its `#[cfg(test)]` module(s).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut depth = 0i32;
    let mut pending_test = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            // Good enough: our paths never contain `//` inside string literals next to code.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        if trimmed.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        let opens = line.matches('{').count() as i32;
        let closes = line.matches('}').count() as i32;
        if pending_test && opens > 0 {
            pending_test = false;
            if skip_depth.is_none() {
                skip_depth = Some(depth);
            }
        }
        depth += opens - closes;
        if let Some(d) = skip_depth {
            if depth <= d {
                skip_depth = None;
            }
            continue;
        }
        if pending_test && trimmed.ends_with(';') {
            // `#[cfg(test)] use …;` or `#[cfg(test)] mod tests;`
            pending_test = false;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// Module paths (depth ≤ 2) that `code` of module `me` refers to.
fn references(me: &[String], code: &str, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut refs = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let (mut base, mut after): (Vec<String>, &str) = if boundary && rest.starts_with("crate::")
        {
            (Vec::new(), &rest["crate::".len()..])
        } else if boundary && rest.starts_with("super::") {
            let mut base = me.to_vec();
            let mut after = rest;
            while let Some(r) = after.strip_prefix("super::") {
                base.pop();
                after = r;
            }
            (base, after)
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        // Follow `a::b::` segments while they name modules we know.
        while let Some(id) = ident_at(after) {
            let mut next = base.clone();
            next.push(id.to_owned());
            if !known.contains(&next) {
                break;
            }
            base = next;
            after = &after[id.len()..];
            match after.strip_prefix("::") {
                Some(r) => after = r,
                None => break,
            }
        }
        // `use crate::calls::{self, lifecycle::X, dialer}`: each named child counts.
        if let Some(group) = after.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let item = item.trim();
                if let Some(id) = ident_at(item) {
                    let mut child = base.clone();
                    child.push(id.to_owned());
                    if known.contains(&child) {
                        child.truncate(2);
                        refs.insert(child);
                    }
                }
            }
        }
        base.truncate(2);
        if !base.is_empty() {
            refs.insert(base);
        }
        i += 1;
    }
    refs
}

#[test]
fn modules_respect_the_layers_and_have_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut known = BTreeSet::new();
    for f in &files {
        let mut p = module_path(&src, f);
        while !p.is_empty() {
            known.insert(p.clone());
            p.pop();
        }
    }

    let mut problems = Vec::new();
    // Edges between modules truncated to depth 2, for the cycle check.
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let me = module_path(&src, f);
        let Some(top) = me.first() else { continue };
        let Some(my_layer) = layer(top) else {
            problems.push(format!(
                "src/{}: top-level module `{top}` has no layer in this test (add it to LAYERS and to ARCHITECTURE.md)",
                f.strip_prefix(&src).unwrap_or(f).display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        let node: Vec<String> = me.iter().take(2).cloned().collect();
        for r in references(&me, &code(&text), &known) {
            let other = &r[0];
            if other != top {
                match layer(other) {
                    Some(l) if l < my_layer => {}
                    _ => problems.push(format!(
                        "src/{}: `{top}` (layer {my_layer}) uses `{}` (layer {}), which is not below it",
                        f.strip_prefix(&src).unwrap_or(f).display(),
                        r.join("::"),
                        layer(other).map_or("none".into(), |l| l.to_string())
                    )),
                }
            }
            // A module using its own descendants (or itself) is structure, not a loop edge.
            if r != node && !r.starts_with(&node) {
                graph.entry(node.clone()).or_default().insert(r);
            }
        }
    }

    // Cycles: depth-first search for a back edge.
    fn visit(
        n: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                0 => visit(m, graph, state, stack, cycles),
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap_or(0);
                    let mut path: Vec<String> =
                        stack[from..].iter().map(|p| p.join("::")).collect();
                    path.push(m.join("::"));
                    cycles.push(path.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut cycles = Vec::new();
    for n in graph.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            visit(n, &graph, &mut state, &mut Vec::new(), &mut cycles);
        }
    }
    for c in cycles {
        problems.push(format!("import cycle: {c}"));
    }
    assert!(
        problems.is_empty(),
        "module layering broken ({} problems):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_scanner_sees_paths_and_skips_tests_and_comments() {
    let known: BTreeSet<Vec<String>> = [
        vec!["calls"],
        vec!["calls", "dialer"],
        vec!["calls", "lifecycle"],
        vec!["store"],
        vec!["store", "calls"],
        vec!["store", "calls", "queue"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    let me: Vec<String> = vec!["calls".into(), "dialer".into()];
    let src = "use super::lifecycle::Lifecycle;\n\
               // crate::api::nothing\n\
               use crate::store::calls::queue::claim; // crate::cli::nope\n\
               #[cfg(test)]\nmod tests {\n    use crate::server::X;\n}\n\
               fn f() { crate::store::calls::{self, queue}; }\n";
    let refs = references(&me, &code(src), &known);
    let names: Vec<String> = refs.iter().map(|r| r.join("::")).collect();
    assert_eq!(names, ["calls::lifecycle", "store::calls"]);
}
