//! GGUF (llama.cpp's model file format) as a container: a bounds-checked reader, a writer,
//! tensor names and the tokenizer both ways. Converting whole models (import to an HF folder,
//! export from one) is [`crate::quant`]'s, above the model; the ggml block formats are
//! [`crate::ggml`]'s, below this.
//!
//! * [`reader`]: [`parse`] reads GGUF v2/v3 from a byte slice (usually an mmap, see [`GgufMmap`]).
//!   Every count, length and offset is checked against the file size *before* anything is
//!   allocated, so a hostile or truncated file yields an error, never a panic or a huge
//!   allocation. Tensor data is borrowed from the slice, not copied. Its metadata values are in
//!   [`value`], the tensor types in [`crate::ggml::types`].
//! * [`dequant`] (from [`crate::ggml`]): F32/F16/BF16 and Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
//!   Q4_K, Q5_K, Q6_K to f32, bit-for-bit as ggml's reference `dequantize_row_*`.
//! * [`layout`]: GGUF ↔ HF tensor names and llama.cpp's Q/K row permutation (and its inverse).
//! * [`tokenizer`]: rebuilds an HF `tokenizer.json` + `tokenizer_config.json` from the
//!   `tokenizer.ggml.*` metadata, for both byte-level BPE (`gpt2`) and SentencePiece (`llama`)
//!   vocabs; [`vocab_out`] is the way back.
//! * [`writer`]: [`GgufWriter`], metadata of every value type and tensors (raw bytes of any type,
//!   or F32/F16/Q8_0 from f32).
//!
//! GGUF lists tensor dimensions innermost-first (`ne[0]` is the row length); everything this
//! module hands out in HF terms (shapes in safetensors, [`GgufTensor::hf_shape`]) is row-major,
//! outermost-first.

pub mod layout;
pub mod reader;
pub mod tokenizer;
pub mod value;
pub mod vocab_out;
pub mod writer;

// The ggml formats sit below GGUF; these keep their GGUF-side paths.
pub use crate::ggml::dequant;
pub use crate::ggml::{dequantize, dequantize_into};
pub use layout::{gguf_to_hf_name, hf_to_gguf_name, permute_qk_rows, unpermute_qk_rows};
pub use reader::{
    parse, GgmlType, GgufArray, GgufFile, GgufKv, GgufMmap, GgufTensor, GgufValue, GgufValueType, DEFAULT_ALIGNMENT,
};
pub use tokenizer::{build_tokenizer, HfTokenizerFiles};
pub use writer::GgufWriter;
