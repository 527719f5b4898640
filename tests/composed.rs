//! The parity, PEFT-gradient, training and resume tests again, with every fused op on its
//! composed fallback (`LINLY_LORA_KERNELS=composed`: what libtorch, f16 and bf16 run), against
//! the same references. The switch is read once per process, so the test binaries that cargo
//! built beside this one are run as child processes with it set; that keeps `cargo test
//! --release` the one test command.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The newest test executable `NAME-<hash>` beside this one.
fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let dir = me.parent().unwrap();
    let prefix = format!("{name}-");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let f = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
            f.strip_prefix(&prefix).is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit())) && is_executable(p)
        })
        .map(|p| (p.metadata().and_then(|m| m.modified()).unwrap(), p))
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("no `{name}` test executable beside {}: run through `cargo test`", me.display())).1
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn run_composed(name: &str) {
    let exe = sibling(name);
    let out = Command::new(&exe).env("LINLY_LORA_KERNELS", "composed").arg("--test-threads=2").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name} on the composed path failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("test result: ok"), "{name}: no test ran:\n{text}");
    eprintln!("{name} (composed): {}", text.lines().filter(|l| l.starts_with("test result")).collect::<Vec<_>>().join("; "));
}

#[test]
fn parity_on_the_composed_path() {
    run_composed("parity");
}

#[test]
fn lora_on_the_composed_path() {
    run_composed("lora");
}

#[test]
fn train_on_the_composed_path() {
    run_composed("train");
}
