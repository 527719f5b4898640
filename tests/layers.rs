//! The module order written in `src/lib.rs`, checked: every `crate::` path in `src/` must point
//! at the module itself or one below it. Edges that still point upwards are listed in `KNOWN`
//! with what breaks them; an edge that is neither is a failure, and so is a `KNOWN` edge that
//! no longer occurs (strike it from the list).

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom to top; a module may use those on its own line and above it in this list. Modules on
/// one line do not use each other. Kept equal to the order in `src/lib.rs`'s docs.
const ORDER: &[&[&str]] = &[
    &["rng", "device", "template", "heap"],
    &["ggml"],
    &["io"],
    &["config"],
    &["tokenizer"],
    &["kernels"],
    &["model"],
    &["lora"],
    &["data"],
    &["vocab"],
    &["infer"],
    &["quant"],
    &["train"],
    &["serve"],
    &["commands"],
];

/// Upward edges not yet broken: (file under src/, module it uses). Empty: keep it so.
const KNOWN: &[(&str, &str)] = &[];

fn level(module: &str) -> usize {
    ORDER.iter().position(|l| l.contains(&module)).unwrap_or_else(|| panic!("module `{module}` is not in ORDER; add it (and to src/lib.rs's docs)"))
}

/// `crate::name` paths outside comments.
fn targets(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // `linly_lora::crate::` cannot occur; `some_crate::x` is not ours.
            let before = rest[..i].chars().last();
            if !name.is_empty() && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.insert(name);
            }
            rest = after;
        }
    }
    out
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        }
    }
}

#[test]
fn every_crate_path_points_down_the_module_order() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut seen_known = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        // The binary (`main.rs` and its clap definitions in `cli/`) is its own crate.
        if rel == "lib.rs" || rel == "main.rs" || rel.starts_with("cli/") {
            continue;
        }
        let from = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(f).unwrap();
        for to in targets(&text) {
            if to == from || to == "self" || to == "super" {
                continue;
            }
            let same_line = level(&to) == level(&from) && to != from;
            if level(&to) > level(&from) || same_line {
                if KNOWN.contains(&(rel.as_str(), to.as_str())) {
                    seen_known.insert((rel.clone(), to.clone()));
                } else {
                    bad.push(format!("src/{rel} uses crate::{to}, which is above `{from}` in the module order"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "edges against the module order (see src/lib.rs):\n{}", bad.join("\n"));
    let stale: Vec<_> = KNOWN.iter().filter(|(f, t)| !seen_known.contains(&(f.to_string(), t.to_string()))).collect();
    assert!(stale.is_empty(), "KNOWN edges that no longer occur; remove them from tests/layers.rs: {stale:?}");
}

#[test]
fn the_order_in_lib_rs_is_the_order_checked() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib.lines().filter_map(|l| l.strip_prefix("pub mod ")).map(|l| l.trim_end_matches(';')).collect();
    let ordered: BTreeSet<&str> = ORDER.iter().flat_map(|l| l.iter().copied()).collect();
    assert_eq!(declared, ordered, "every module in src/lib.rs is in ORDER, and no other");
    // The docs list the same order: each module's line appears after the one below it.
    let pos = |m: &str| lib.find(&format!("[`{m}`]")).unwrap_or_else(|| panic!("src/lib.rs's docs do not mention [`{m}`]"));
    for w in ORDER.windows(2) {
        for lo in w[0] {
            for hi in w[1] {
                assert!(pos(lo) < pos(hi), "src/lib.rs lists `{hi}` before `{lo}`; write the order bottom to top");
            }
        }
    }
}
