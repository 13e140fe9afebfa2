//! The floor plan, enforced: data flows one way (layers → ops → cuda runtime), `src/cuda/` is a
//! runtime that knows no op, layer, device or `Tensor`, and no two top-level modules of the
//! library import each other, directly or around a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Source of every library file (the command line in `src/bin/` is another crate), by the
/// top-level module it belongs to (`cuda`, `ops`, `tensor`, ...).
fn library() -> Vec<(String, PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .filter(|p| !p.starts_with(src.join("bin")) && !p.ends_with("lib.rs"))
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let top = top.trim_end_matches(".rs").to_string();
            let text = std::fs::read_to_string(&p).unwrap();
            (top, p, text)
        })
        .collect()
}

/// The code of a file without its comments (a doc link is not an import).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `crate::<module>` references of a file's code.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let code = code(text);
    code.match_indices("crate::")
        .filter(|(i, _)| !code[..*i].ends_with('$'))
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

fn violations(forbidden: &[&str], top: &str, files: &[(String, PathBuf, String)]) -> Vec<String> {
    let mut bad = Vec::new();
    for (t, path, text) in files.iter().filter(|(t, _, _)| t == top) {
        let _ = t;
        let refs = crate_refs(text);
        let code = code(text);
        for f in forbidden {
            let hit = refs.contains(*f)
                || (*f == "Tensor"
                    && code
                        .split(|c: char| !c.is_alphanumeric())
                        .any(|w| w == "Tensor"));
            if hit {
                bad.push(format!("{} uses {f}", path.display()));
            }
        }
    }
    bad
}

#[test]
fn cuda_runtime_knows_no_op_layer_or_tensor() {
    let files = library();
    assert!(
        files.iter().any(|(t, _, _)| t == "cuda"),
        "no src/cuda found"
    );
    let bad = violations(
        &["ops", "layers", "tensor", "device", "Tensor"],
        "cuda",
        &files,
    );
    assert!(
        bad.is_empty(),
        "src/cuda/ must stay a runtime:\n{}",
        bad.join("\n")
    );
}

#[test]
fn ops_know_no_layer() {
    let files = library();
    let bad = violations(&["layers"], "ops", &files);
    assert!(
        bad.is_empty(),
        "src/ops/ must not import a layer:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let files = library();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (top, _, text) in &files {
        let deps = graph.entry(top.clone()).or_default();
        deps.extend(crate_refs(text).into_iter().filter(|m| m != top));
    }
    let tops: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| tops.contains(d));
    }
    // Depth-first search for a back edge; report the circle.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut circle = stack[i..].to_vec();
            circle.push(n.to_string());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in &g[n] {
            if let Some(c) = visit(d, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle: {} (graph: {graph:?})", c.join(" → "));
        }
    }
}

/// The checks above must be able to fail: a planted import is found.
#[test]
fn planted_imports_are_found() {
    let planted =
        "use crate::ops::SavedStats; // crate::layers in a comment\nfn f(_: Tensor<f32>) {}";
    let refs = crate_refs(planted);
    assert!(refs.contains("ops") && !refs.contains("layers"), "{refs:?}");
    let files = vec![(
        "cuda".to_string(),
        PathBuf::from("x.rs"),
        planted.to_string(),
    )];
    assert_eq!(violations(&["ops", "Tensor"], "cuda", &files).len(), 2);
}
