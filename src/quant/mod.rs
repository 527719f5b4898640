//! Quantized CPU inference: llama.cpp's block formats, hand-written dot-product kernels, and
//! the quantized model folder.
//!
//! * [`blocks`]: Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K quantizers byte-identical to ggml's
//!   reference ones, ggml's error-minimizing Q4_0, and the Q8_0 / Q8_1 / Q8_K activation
//!   quantizers. Which weight gets which type is [`crate::io::gguf::export_mix`]. Dequantization is
//!   [`crate::io::gguf::dequantize`].
//! * [`kernels`]: quantized-weight × quantized-activation dot products, scalar and AVX2, and the
//!   eight-row GEMV over Q4_0 rows interleaved at load ([`blocks::pack_q4_0x8`]).
//! * [`matrix`]: [`QuantMatrix`], a quantized `[out, in]` weight and its multi-threaded product
//!   with f32 activations. [`crate::model::linear::Linear`] holds either a dense tensor or one
//!   of these, so the one model definition runs quantized models.
//! * [`team`]: the spinning helper threads the per-token products run on.
//! * [`imatrix`]: importance matrices (llama-imatrix's mean x² per input column) for `quantize --imatrix`.
//! * [`gptq`]: GPTQ into Q4_0 blocks for the MLP's gate/up projections (`quantize --gptq TEXT`),
//!   with the Hessian collected in the same pass as the importance matrix.
//! * [`store`]: the on-disk format, shared by `linly-lora quantize` (a folder with `config.json`,
//!   the tokenizer and `model.gguf`) and `linly-lora export gguf` (the GGUF alone): GGUF with
//!   llama.cpp's names, metadata and Q/K row order, so a quantized folder's `model.gguf` runs in
//!   llama.cpp as is.

pub mod blocks;
pub mod gptq;
pub mod imatrix;
pub mod store;
pub mod kernels;
pub mod matrix;
pub mod team;

pub use kernels::Kernels;
pub use matrix::{QType, QuantMatrix};
