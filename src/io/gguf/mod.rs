//! GGUF (llama.cpp's model file format): a bounds-checked reader, reference dequantizers, a small
//! writer, and the importer that turns a LLaMA GGUF into a Hugging Face model folder.
//!
//! The pieces, from the bottom up:
//!
//! * [`reader`]: [`parse`] reads GGUF v2/v3 from a byte slice (usually an mmap, see [`GgufMmap`]).
//!   Every count, length and offset is checked against the file size *before* anything is
//!   allocated, so a hostile or truncated file yields an error, never a panic or a huge
//!   allocation. Tensor data is borrowed from the slice, not copied.
//! * [`dequant`]: F32/F16/BF16 and Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K to f32,
//!   bit-for-bit as ggml's reference `dequantize_row_*` (same f32 operation order, no FMA).
//! * [`layout`]: GGUF ↔ HF tensor names and llama.cpp's Q/K row permutation (and its inverse).
//! * [`tokenizer`]: rebuilds an HF `tokenizer.json` + `tokenizer_config.json` from the
//!   `tokenizer.ggml.*` metadata, for both byte-level BPE (`gpt2`) and SentencePiece (`llama`) vocabs.
//! * [`writer`]: [`GgufWriter`], metadata of every value type and tensors (raw bytes of any type,
//!   or F32/F16/Q8_0 from f32). Used by the tests and meant for a later GGUF export.
//! * [`import`]: [`import_gguf`] ties it together and writes the folder atomically.
//! * [`export`]: [`export_gguf`], the way back: an HF folder to a GGUF llama.cpp runs (F32, F16,
//!   Q8_0, Q4_0, Q4_K), with the tokenizer metadata from [`vocab_out`]; [`export_mix`] picks each
//!   weight's type the way llama-quantize does (Q4_K_M's mix for `q4_k`).
//!
//! Typical use (the `linly-lora import gguf FILE --out DIR --dtype bf16` command):
//!
//! ```no_run
//! # use std::path::Path;
//! # fn demo() -> anyhow::Result<()> {
//! use linly_lora::io::gguf::{import_gguf, OutDType};
//! let report = import_gguf(Path::new("model.gguf"), Path::new("out"), "bf16".parse::<OutDType>()?)?;
//! for w in &report.warnings {
//!     eprintln!("warning: {w}");
//! }
//! # Ok(()) }
//! ```
//!
//! GGUF lists tensor dimensions innermost-first (`ne[0]` is the row length); everything this
//! module hands out in HF terms (shapes in safetensors, [`GgufTensor::hf_shape`]) is row-major,
//! outermost-first.

pub mod dequant;
pub mod export;
pub mod export_mix;
pub mod import;
pub mod layout;
pub mod reader;
pub mod tokenizer;
pub mod vocab_out;
pub mod writer;

pub use dequant::{dequantize, dequantize_into};
pub use export::{export_gguf, export_gguf_calibrated, export_gguf_imatrix, ExportOptions, ExportReport, ExportType};
pub use import::{import_gguf, ImportReport, OutDType};
pub use layout::{gguf_to_hf_name, hf_to_gguf_name, permute_qk_rows, unpermute_qk_rows};
pub use reader::{
    parse, GgmlType, GgufArray, GgufFile, GgufKv, GgufMmap, GgufTensor, GgufValue, GgufValueType, DEFAULT_ALIGNMENT,
};
pub use tokenizer::{build_tokenizer, HfTokenizerFiles};
pub use writer::GgufWriter;
