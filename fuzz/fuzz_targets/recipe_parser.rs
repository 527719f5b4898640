//! Feeds arbitrary text to the recipe parser (`Recipe::parse`, everything `train` checks before
//! it loads a model), in a folder holding what the seed recipes name (a model's config.json,
//! data files, an extension, an adapter), and then to what `train` derives from a recipe that
//! loaded. Any panic, overflow or huge allocation is a bug.
//!
//! Run: `cargo +nightly fuzz run recipe_parser fuzz/corpus/recipe_parser` (seeds from
//! `python3 fuzz/seeds.py`); see fuzz/README.md.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use linly_lora::train::recipe::Recipe;

fn root() -> std::path::PathBuf {
    let dir = common::scratch("recipe");
    if !dir.join("model/config.json").exists() {
        std::fs::create_dir_all(dir.join("model")).unwrap();
        common::tiny_config().to_hf().save(&dir.join("model")).unwrap();
        for f in ["zh.txt", "en.txt", "pairs.tsv", "alpaca.json", "ids.jsonl", "valid.txt", "words.txt"] {
            common::put(&dir.join(f), b"x\n");
        }
        std::fs::create_dir_all(dir.join("ext")).unwrap();
        common::put(&dir.join("ext/vocab_extension.json"), b"{}");
        std::fs::create_dir_all(dir.join("adapter")).unwrap();
        common::put(&dir.join("adapter/adapter_config.json"), b"{}");
    }
    dir
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(r) = Recipe::parse(text, &root()) else { return };
    let total = r.total_steps().expect("a loaded recipe has a step count");
    let stages = r.stages().expect("a loaded recipe has stages");
    assert_eq!(stages.iter().map(|s| s.steps as u128).sum::<u128>(), total as u128);
    for s in &stages {
        assert!(s.lr.is_finite() && s.lr > 0.0 && s.embed_lr.is_finite() && s.embed_lr >= 0.0, "{s:?}");
    }
    let _ = r.scaler().expect("checked");
    let _ = r.dtype();
    let _ = r.lora.init;
    let _ = serde_json::to_string(&r).expect("a loaded recipe serializes (its resume hash)");
});
