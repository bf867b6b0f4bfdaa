//! The layout rules of issue 11, checked on the sources so they stay true:
//! no import cycles between the modules of lb-user or of lb-ebpf, and no
//! file of lb-user/src over 800 lines before its tests.
//!
//! A module's dependencies are the modules its `use crate::...` trees and
//! `crate::...` paths name (comments and the `#[cfg(test)] mod tests` at a
//! file's end left out). A file-module split into private submodules that
//! `use super::*` (config, metrics, daemon) counts as one module with its
//! parent: `super::` is not followed.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const MAX_LINES: usize = 800;

/// `src/a/b.rs` -> `a::b`; `mod.rs`, `lib.rs` and `main.rs` name their folder.
fn module_name(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file without its trailing test module and without comment lines.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a `use` tree names: `a::{b, c::{d, self}}` -> `a::b`, `a::c::d`, `a::c`.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let base = tree[..open].trim_end_matches("::");
        let base = if base.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}{base}::")
        };
        let body = &tree[open + 1..tree.rfind('}').unwrap()];
        let (mut depth, mut start) = (0, 0);
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&body[start..i], &base, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&body[start..], &base, out);
    } else if !tree.is_empty() {
        let item = tree.split(" as ").next().unwrap().trim();
        if item == "self" {
            out.push(prefix.trim_end_matches("::").to_string());
        } else {
            out.push(format!("{prefix}{item}"));
        }
    }
}

/// The longest module named by `path`'s leading segments.
fn resolve<'a>(path: &str, modules: &'a BTreeSet<String>) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .find_map(|n| modules.get(&parts[..n].join("::")))
}

struct Crate {
    graph: BTreeMap<String, BTreeSet<String>>,
    lines: BTreeMap<String, usize>,
}

fn read_crate(root: &Path) -> Crate {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_name(root, f)).collect();
    let mut graph = BTreeMap::new();
    let mut lines = BTreeMap::new();
    for file in &files {
        let me = module_name(root, file);
        let code = code(&std::fs::read_to_string(file).unwrap());
        lines.insert(
            file.strip_prefix(root).unwrap().display().to_string(),
            code.lines().count(),
        );
        let mut paths = Vec::new();
        let mut rest = code.as_str();
        while let Some(at) = rest.find("use crate::") {
            let tail = &rest[at + "use crate::".len()..];
            let end = tail.find(';').unwrap();
            expand(&tail[..end], "", &mut paths);
            rest = &tail[end..];
        }
        for (at, _) in code.match_indices("crate::") {
            let tail = &code[at + "crate::".len()..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            paths.push(tail[..end].trim_end_matches(':').to_string());
        }
        let deps: BTreeSet<String> = paths
            .iter()
            .filter_map(|p| resolve(p, &modules))
            // A module's own children are its parts, not its dependencies.
            .filter(|d| **d != me && !d.starts_with(&format!("{me}::")) && !me.is_empty())
            .cloned()
            .collect();
        graph.insert(me, deps);
    }
    Crate { graph, lines }
}

/// Every pair of modules that reach each other.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, String)> {
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(m) = todo.pop() {
            for d in graph.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let mut out = BTreeSet::new();
    for (a, deps) in graph {
        for b in deps {
            if reach(b).contains(a) {
                out.insert(if a < b {
                    (a.clone(), b.clone())
                } else {
                    (b.clone(), a.clone())
                });
            }
        }
    }
    out.into_iter().collect()
}

fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src")
}

#[test]
fn lb_user_has_no_import_cycles() {
    let c = read_crate(&src("lb-user"));
    assert!(c.graph.len() > 30, "found only {} modules", c.graph.len());
    assert_eq!(
        cycles(&c.graph),
        Vec::<(String, String)>::new(),
        "{:#?}",
        c.graph
    );
}

#[test]
fn lb_ebpf_has_no_import_cycles() {
    let c = read_crate(&src("lb-ebpf"));
    assert!(c.graph.len() > 10, "found only {} modules", c.graph.len());
    assert_eq!(
        cycles(&c.graph),
        Vec::<(String, String)>::new(),
        "{:#?}",
        c.graph
    );
}

#[test]
fn no_lb_user_file_is_over_800_lines_before_its_tests() {
    let c = read_crate(&src("lb-user"));
    let long: Vec<_> = c.lines.iter().filter(|(_, n)| **n > MAX_LINES).collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_reader_sees_a_planted_cycle() {
    // The checker itself: a two-module cycle and a use tree with nesting.
    let mut paths = Vec::new();
    expand("{a::{b, c::{d, self}}, e as f}", "", &mut paths);
    assert_eq!(paths, ["a::b", "a::c::d", "a::c", "e"]);
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("x", vec!["y"]),
        ("y", vec!["z"]),
        ("z", vec!["x"]),
        ("w", vec!["x"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        cycles(&graph),
        [("x", "y"), ("x", "z"), ("y", "z")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
}
