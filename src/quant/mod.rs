//! Whole-model conversions through ggml's formats, above the model and inference (they run
//! it): `linly-lora quantize` (the quantized folder, [`store`]), importance matrices
//! ([`imatrix`], collected by running the model over a text), GPTQ ([`gptq`]), and GGUF
//! [`export`] (with [`export_mix`] picking each weight's type the way llama-quantize does) and
//! [`import`] (a LLaMA GGUF to an HF folder, written atomically).
//!
//! Typical use (the `linly-lora import gguf FILE --out DIR --dtype bf16` command):
//!
//! ```no_run
//! # use std::path::Path;
//! # fn demo() -> anyhow::Result<()> {
//! use linly_lora::quant::{import_gguf, OutDType};
//! let report = import_gguf(Path::new("model.gguf"), Path::new("out"), "bf16".parse::<OutDType>()?)?;
//! for w in &report.warnings {
//!     eprintln!("warning: {w}");
//! }
//! # Ok(()) }
//! ```
//!
//! The block formats, quantized matrices and their kernels are in [`crate::ggml`] (re-exported
//! here under their old paths); the model loads a quantized folder through
//! [`crate::model::gguf_weights`].

// Re-exports: the formats and kernels keep their `quant::` paths.
pub use crate::ggml::{blocks, kernels, matrix, team, Kernels, QType, QuantMatrix};

pub mod export;
pub mod export_mix;
pub mod gptq;
pub mod imatrix;
pub mod import;
pub mod store;

pub use export::{export_gguf, export_gguf_calibrated, export_gguf_imatrix, ExportOptions, ExportReport, ExportType};
pub use import::{import_gguf, ImportReport, OutDType};
