//! Feeds arbitrary bytes, as a `.safetensors` file, to every reader of that format: the mapped
//! file and its tensors, the model loader (a weight folder against a fixed tiny config.json),
//! `eval --ids` input and the importance-matrix loader. Any panic, overflow or huge allocation
//! is a bug: hostile files must come back as errors.
//!
//! Run: `cargo +nightly fuzz run safetensors_reader fuzz/corpus/safetensors_reader` (seeds from
//! `python3 fuzz/seeds.py`); see fuzz/README.md.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use linly_lora::io::safetensors::{FloatType, SafetensorsFile};
use linly_lora::io::weights::WeightStore;
use linly_lora::model::Llama;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch("safetensors");
    let path = dir.join("model.safetensors");
    common::put(&path, data);
    if let Ok(f) = SafetensorsFile::open(&path) {
        let _ = f.metadata();
        for name in f.names() {
            let t = f.get(&name).expect("a listed tensor is there");
            assert_eq!(t.bytes.len(), t.numel() * t.dtype.bitsize() / 8, "{name}: header and data disagree");
            // Bounded so one input cannot stall the fuzzer on a large (valid) tensor.
            if t.bytes.len() <= 1 << 20 {
                let _ = t.to_f32();
                let _ = t.to_i64();
                let _ = f.read_owned(&name);
            }
        }
    }
    let _ = linly_lora::infer::read_ids_file(&path);
    let _ = linly_lora::quant::imatrix::Imatrix::load(&path);
    let cfg = common::tiny_config();
    if let Ok(store) = WeightStore::open(&dir) {
        let device = linly_lora::device::parse("cpu").expect("cpu");
        for dtype in [FloatType::F32, FloatType::BF16] {
            let _ = Llama::from_store(&cfg, &store, &device, dtype);
        }
    }
});
