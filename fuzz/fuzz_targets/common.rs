//! Shared by the file-based targets: a private scratch folder per fuzzing process, and the tiny
//! model shape the seeds in `fuzz/seeds.py` are written for.

use linly_lora::config::LlamaConfig;
use std::path::PathBuf;

/// `$TMPDIR/linly-fuzz-<target>-<pid>`, created on first use. Each libFuzzer process (and each
/// `-jobs` worker) gets its own, so inputs never race.
pub fn scratch(target: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("linly-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch folder");
    d
}

/// hidden 8, 1 layer, 2 heads (1 KV head) of 4, FFN 16, vocabulary 16: every seed model and
/// adapter in `fuzz/seeds.py` has this shape.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig::synthetic(8, 1, 2, 1, 16, 16)
}

/// Writes `bytes` to `path`, replacing what the previous input left.
pub fn put(path: &std::path::Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("scratch write");
}
