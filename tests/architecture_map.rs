//! ARCHITECTURE.md stays true: every path, identifier and .md file its code
//! map names exists, and no source file imports a file that imports it
//! back (the map's layering is real).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use moetrace_tests::workspace_root;

/// The backticked pieces of `text` (inline code).
fn code_spans(text: &str) -> Vec<&str> {
    // Fenced blocks are drawings, not claims.
    let prose: Vec<&str> = text.split("```").step_by(2).collect();
    prose.iter().flat_map(|p| p.split('`').skip(1).step_by(2)).collect()
}

/// Every file under `dir` whose name ends in one of `exts`, skipping build
/// outputs and hidden folders.
fn files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" || name == "node_modules" {
            continue;
        }
        if path.is_dir() {
            files(&path, exts, out);
        } else if exts.iter().any(|e| name.ends_with(e)) {
            out.push(path);
        }
    }
}

/// Every word (identifier-shaped run of characters) in the project's code,
/// scripts and configs.
fn code_words(root: &Path) -> HashSet<String> {
    let mut paths = Vec::new();
    for dir in ["crates", "tests", "python", "scripts", "configs", ".ci"] {
        files(&root.join(dir), &[".rs", ".py", ".sh", ".ron", ".toml", ".cu", ".cuh", ".json", "run"], &mut paths);
    }
    paths.push(root.join("Cargo.toml"));
    let mut words = HashSet::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.is_empty() {
                words.insert(word.to_string());
            }
        }
    }
    words
}

/// Whether a code span names a code identifier: `Name`, `a::b::C`,
/// `Type::method`, `function()` (one word with an underscore or a capital,
/// so plain words and stage names in prose are not taken for claims).
fn identifier(span: &str) -> Option<Vec<&str>> {
    let span = span.strip_suffix("()").unwrap_or(span);
    let segments: Vec<&str> = span.split("::").collect();
    let shaped = |s: &str| {
        !s.is_empty()
            && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if !segments.iter().all(|s| shaped(s)) {
        return None;
    }
    let codeish = segments.len() > 1 || span.contains('_') || span.chars().any(|c| c.is_ascii_uppercase());
    codeish.then_some(segments)
}

#[test]
fn every_path_identifier_and_document_architecture_md_names_exists() {
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let words = code_words(&root);
    let (mut paths, mut identifiers) = (0, 0);
    let mut missing = Vec::new();
    for piece in code_spans(&text) {
        let looks_like_path =
            piece.contains('/') && !piece.contains(' ') && !piece.contains("..") && !piece.contains('<');
        if looks_like_path || piece.ends_with(".md") {
            paths += 1;
            if !root.join(piece.trim_end_matches('/')).exists() {
                missing.push(format!("path `{piece}`"));
            }
        } else if let Some(segments) = identifier(piece) {
            identifiers += 1;
            if let Some(s) = segments.iter().find(|s| !words.contains(**s)) {
                missing.push(format!("identifier `{piece}` (no `{s}` in the code)"));
            }
        }
    }
    // Markdown links to documents: [text](docs/x.md).
    for link in text.split("](").skip(1) {
        let target = link.split(')').next().unwrap_or("");
        if !target.starts_with("http") && !target.starts_with('#') {
            paths += 1;
            if !root.join(target.split('#').next().unwrap_or("")).exists() {
                missing.push(format!("link `{target}`"));
            }
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md names what does not exist:\n  {}", missing.join("\n  "));
    assert!(
        paths > 20 && identifiers > 50,
        "only {paths} paths and {identifiers} identifiers found; did the format change?"
    );
}

/// The module files of one crate (`src/**/*.rs`), by module path
/// (`backend::cuda::ops`; `lib.rs` and `main.rs` are the root, `mod.rs` its folder).
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut paths = Vec::new();
    files(src, &[".rs"], &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut segments: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if matches!(segments.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                segments.pop();
            }
            (segments, p)
        })
        .collect()
}

/// The modules of its own crate that a file's `use crate::…`, `use
/// super::…` and `crate::…::` paths reach (the longest module prefix of
/// each path).
fn imports(module: &[String], text: &str, known: &BTreeMap<Vec<String>, PathBuf>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let mut resolve = |start: Vec<String>, rest: &str| {
        let mut path = start;
        for segment in rest.split("::") {
            let segment: String = segment.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if segment.is_empty() {
                break;
            }
            let mut next = path.clone();
            next.push(segment);
            if !known.contains_key(&next) {
                break;
            }
            path = next;
        }
        if known.contains_key(&path) && path != module {
            out.insert(path);
        }
    };
    for (i, _) in text.match_indices("crate::") {
        let before = text[..i].chars().last();
        if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '$')) {
            resolve(Vec::new(), &text[i + "crate::".len()..]);
        }
    }
    for (i, _) in text.match_indices("super::") {
        let before = text[..i].chars().last();
        if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            // `super` of a file is its parent module (`mod.rs` is the folder itself).
            let mut parent = module.to_vec();
            parent.pop();
            resolve(parent, &text[i + "super::".len()..]);
        }
    }
    out
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let root = workspace_root();
    let mut crates: Vec<PathBuf> =
        std::fs::read_dir(root.join("crates")).unwrap().flatten().map(|e| e.path()).collect();
    crates.sort();
    let mut cycles = Vec::new();
    for krate in crates {
        let known = modules(&krate.join("src"));
        let mut edges = BTreeMap::new();
        for (module, path) in &known {
            let text = std::fs::read_to_string(path).unwrap();
            // A file's own tests may use its parent (`use super::*`), and
            // a doc link is not an import.
            let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
            let code: String =
                code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
            edges.insert(module.clone(), imports(module, &code, &known));
        }
        for (a, targets) in &edges {
            for b in targets {
                // A module and its own submodules are one unit (a folder's
                // mod.rs declares and re-exports its children).
                let nested = b.starts_with(a) || a.starts_with(b);
                if a < b && !nested && edges.get(b).is_some_and(|t| t.contains(a)) {
                    cycles.push(format!("{} <-> {}", known[a].display(), known[b].display()));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "files that import each other:\n  {}", cycles.join("\n  "));
}
