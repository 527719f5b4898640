//! ggml's tensor types and block formats, and the quantized matrices built from them: each
//! format's encoder ([`blocks`], ggml's `quantize_row_*_ref` and the activation quantizers) and
//! decoder ([`dequant`], its `dequantize_row_*`) side by side, sharing the layouts and helpers;
//! [`matrix`]'s [`QuantMatrix`] (a quantized `[out, in]` weight), its dot-product [`kernels`]
//! (scalar and AVX2) and the [`team`] of threads they run on. Near the bottom of the crate: GGUF
//! files (`crate::io::gguf`), the model's quantized projections and `crate::quant`'s conversions
//! all build on it.

pub mod blocks;
pub mod dequant;
pub mod kernels;
pub mod matrix;
pub mod team;
pub mod types;

pub use dequant::{dequantize, dequantize_into};
pub use kernels::Kernels;
pub use matrix::{QType, QuantMatrix};
pub use types::GgmlType;
