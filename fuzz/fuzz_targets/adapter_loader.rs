//! Feeds arbitrary bytes to the adapter loader as a PEFT adapter folder: the input is split into
//! `adapter_config.json` and `adapter_model.safetensors` (a little-endian u16 giving the
//! config's length, the config, then the tensors). The folder is opened, applied to a tiny
//! model (untied and tied) and merged into the same model on disk. Any panic, overflow or huge
//! allocation is a bug, and so is an adapter that loads with a non-finite or zero scale, or
//! leaves the model's two tables with different row counts.
//!
//! Run: `cargo +nightly fuzz run adapter_loader fuzz/corpus/adapter_loader` (seeds from
//! `python3 fuzz/seeds.py`); see fuzz/README.md.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use linly_lora::io::safetensors::FloatType;
use linly_lora::lora::adapter::{apply, AdapterFile};
use linly_lora::lora::merge::{merge, MergeOptions};
use linly_lora::model::Llama;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, tensors) = data[2..].split_at(n);
    let dir = common::scratch("adapter");
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    common::put(&adapter.join("adapter_config.json"), config);
    common::put(&adapter.join("adapter_model.safetensors"), tensors);

    let Ok(ad) = AdapterFile::open(&adapter) else { return };
    for m in ad.lora.keys() {
        let s = ad.scale(m).expect("scale of a loaded module");
        assert!(s.is_finite() && s > 0.0, "{m}: scale {s}");
    }
    drop(ad);

    let device = linly_lora::device::parse("cpu").unwrap();
    for tied in [false, true] {
        let mut cfg = common::tiny_config();
        cfg.tie_word_embeddings = tied;
        let model = Llama::random(&cfg, &device, FloatType::F32);
        if let Ok(m) = apply(model, &adapter, &device) {
            let rows = m.embed_tokens.rows();
            assert_eq!(m.config.vocab_size, rows);
            if let Some(h) = &m.lm_head {
                assert_eq!(h.rows(), rows, "embed_tokens and lm_head disagree after apply");
            }
        }
        let base = dir.join(if tied { "base-tied" } else { "base" });
        if !base.join("model.safetensors").exists() {
            linly_lora::commands::bench::merge::write_random_model(&cfg, &base, FloatType::F32, 7).unwrap();
        }
        let out = dir.join("merged");
        let _ = std::fs::remove_dir_all(&out);
        let opts = MergeOptions { base, adapters: vec![adapter.clone()], out: out.clone(), dtype: None, tokenizer: None, shard_size: 1 << 30, allow_vocab_padding: false };
        let _ = merge(&opts);
        let _ = std::fs::remove_dir_all(&out);
    }
});
