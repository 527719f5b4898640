//! `quantize`, `imatrix`, `export gguf` and `import gguf`: the conversions and their shared
//! quantization flags.

use super::{at_least, positive_f64};
use clap::{Args, Subcommand};
use linly_lora::commands::quant as cquant;
use linly_lora::io::safetensors::FloatType;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ImportCmd {
    /// GGUF v2/v3 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K) → HF folder with tokenizer.json
    Gguf {
        file: PathBuf,
        /// Output HF folder (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the 2-D weights (norms stay f32)
        #[arg(long, default_value = "f32")]
        dtype: FloatType,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// HF model folder to quantize (f32, f16 or bf16 safetensors)
    #[arg(long)]
    pub model: PathBuf,
    /// q8_0 (8.5 bits/weight), q4_0 or q4_k, with llama-quantize's mixes (see README):
    /// q4_0 = Q4_0 (error-minimizing scales) + LM head/tied token table in Q6_K (Q8_0 when rows are
    /// not whole 256-blocks); q4_k = Q4_K_M: Q4_K, with attn_v/ffn_down in Q6_K in the first and
    /// last eighth of the layers and every third between, the head as for q4_0, and rows that
    /// cannot hold Q4_K in Q4_1 or Q5_0, whichever reconstructs the tensor better
    #[arg(long)]
    pub format: linly_lora::quant::QType,
    /// Output folder (must not exist unless --force; written atomically): config.json, tokenizer files, model.gguf
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out once the new output is complete (never one of the inputs)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub q: QuantArgs,
}

/// The quantization flags `quantize` and `export gguf` share.
#[derive(Args)]
pub struct QuantArgs {
    /// Keep the token embedding and LM head in f16 instead of quantizing them
    #[arg(long)]
    pub keep_embeddings: bool,
    /// Every 2-D weight in the one format (q5_0 where q4_k does not fit), no llama.cpp mix:
    /// ggml's reference quantizers, like llama-quantize --pure
    #[arg(long)]
    pub pure: bool,
    /// Importance matrix from `linly-lora imatrix` on this model: Q4_0 weights are rounded to
    /// minimize the error weighted by it (llama-quantize --imatrix)
    #[arg(long)]
    pub imatrix: Option<PathBuf>,
    /// Calibration text for GPTQ (q4_0): the model runs over it once; the MLP's gate/up
    /// projections are quantized by GPTQ (each rounding error is compensated in the row's later
    /// columns, along the inverse of the inputs' XᵀX) and the other Q4_0 weights are rounded with
    /// the importance matrix of the same pass. Replaces --imatrix. Still a plain Q4_0 GGUF
    #[arg(long, value_name = "TEXT", conflicts_with = "imatrix")]
    pub gptq: Option<PathBuf>,
    /// Tokens per forward pass over the --gptq text
    #[arg(long, default_value_t = 512, requires = "gptq", value_parser = at_least::<1>)]
    pub calib_window: usize,
    /// Use at most this many tokens of the --gptq text
    #[arg(long, requires = "gptq", value_parser = at_least::<1>)]
    pub calib_tokens: Option<usize>,
    /// GPTQ's damping of the Hessian, as a fraction of its mean diagonal: larger trusts the
    /// calibration text less (and moves the result towards --imatrix rounding)
    #[arg(long, default_value_t = linly_lora::quant::gptq::DAMP, requires = "gptq", value_parser = positive_f64)]
    pub gptq_damp: f64,
}

impl QuantArgs {
    pub fn settings(self) -> cquant::QuantSettings {
        cquant::QuantSettings {
            keep_embeddings: self.keep_embeddings,
            pure: self.pure,
            imatrix: self.imatrix,
            gptq: self.gptq,
            calib_window: self.calib_window,
            calib_tokens: self.calib_tokens,
            gptq_damp: self.gptq_damp,
        }
    }
}

#[derive(Args)]
pub struct ImatrixArgs {
    /// HF model folder (f32, f16 or bf16 safetensors; not a quantized folder)
    #[arg(long)]
    pub model: PathBuf,
    /// UTF-8 calibration text (disjoint from any text you evaluate on)
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per forward pass (non-overlapping windows, like llama-imatrix's chunks)
    #[arg(long, default_value_t = 512, value_parser = at_least::<1>)]
    pub window: usize,
    /// Use at most this many tokens of the text
    #[arg(long, value_parser = at_least::<1>)]
    pub max_tokens: Option<usize>,
    /// Output file (safetensors; must not exist unless --force; written atomically)
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out once the new output is complete (never one of the inputs)
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand)]
pub enum ExportCmd {
    /// HF folder → GGUF for llama.cpp: llama metadata, tokenizer (extended vocabularies included),
    /// chat template, Q/K rows in llama.cpp's order
    Gguf {
        /// HF model folder (e.g. the output of `merge`)
        #[arg(long)]
        model: PathBuf,
        /// Output .gguf file (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
        /// Type of the 2-D weights: f16, f32, q8_0, q4_0 or q4_k (norms are always f32)
        #[arg(long = "type", default_value = "f16")]
        ty: linly_lora::quant::ExportType,
        #[command(flatten)]
        q: QuantArgs,
    },
}
