//! Feeds arbitrary bytes to the GGUF reader and everything downstream of it that reads
//! untrusted metadata or tensor data. Any panic, overflow or huge allocation is a bug: hostile
//! files must come back as errors.
//!
//! Run: `cargo fuzz run gguf_reader` (from the repository root; needs nightly and cargo-fuzz).
#![no_main]

use libfuzzer_sys::fuzz_target;
use linly_lora::io::gguf::{dequantize, parse, tokenizer::build_tokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = parse(data) else { return };
    for t in &file.tensors {
        // Bounded so one input cannot stall the fuzzer on a large (valid) tensor.
        if t.ggml_type.can_dequantize() && t.n_elements() <= 1 << 16 {
            let _ = dequantize(t.ggml_type, t.data, t.n_elements() as usize);
        }
    }
    let _ = build_tokenizer(&file, None);
});
