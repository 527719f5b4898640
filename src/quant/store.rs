//! The quantized model folder: `config.json` (with a `linly_quantization` entry), the tokenizer
//! files, and `model.gguf`, the same GGUF `linly-lora export gguf` writes. Using llama.cpp's
//! format means one writer, byte layouts checked against llama.cpp itself, and a folder whose
//! `model.gguf` runs in llama.cpp unchanged.
//!
//! Loading is the model's ([`crate::model::gguf_weights`], re-exported here).

use super::export::{export_gguf_calibrated, ExportOptions, ExportReport, ExportType};
use super::gptq::Hessians;
use super::imatrix::Imatrix;
use super::QType;
use anyhow::{bail, Context, Result};
use std::path::Path;

pub use crate::model::gguf_weights::{is_quantized_dir, GgufWeights, MODEL_FILE};

/// Files copied from the source folder when they exist.
const COPIED: [&str; 5] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "vocab_extension.json"];

/// `linly-lora quantize`: writes `out` (which must not exist) atomically.
pub fn quantize_model(model_dir: &Path, out: &Path, ty: QType, keep_embeddings: bool, pure: bool) -> Result<ExportReport> {
    quantize_model_imatrix(model_dir, out, ty, keep_embeddings, pure, None, None)
}

/// [`quantize_model`] with an importance matrix (`quantize --imatrix`, see
/// [`super::export::export_gguf_imatrix`]); it is named in `config.json`.
#[allow(clippy::too_many_arguments)]
pub fn quantize_model_imatrix(
    model_dir: &Path,
    out: &Path,
    ty: QType,
    keep_embeddings: bool,
    pure: bool,
    imatrix: Option<&Imatrix>,
    hessians: Option<&Hessians>,
) -> Result<ExportReport> {
    if !matches!(ty, QType::Q8_0 | QType::Q4_0 | QType::Q4_K) {
        bail!("`quantize --format {ty}`: use q8_0, q4_0 or q4_k ({ty} is only used inside their mixes)");
    }
    if is_quantized_dir(model_dir) {
        bail!("{} is already quantized; quantize the original f32/f16/bf16 folder", model_dir.display());
    }
    let staged = crate::io::atomic::StagedDir::new(out, false)?;
    let opts = ExportOptions { ty: ExportType::Quant(ty), keep_embeddings, pure };
    let mut report = export_gguf_calibrated(model_dir, &staged.path().join(MODEL_FILE), &opts, imatrix, hessians)?;
    let mut cfg = crate::config::HfConfig::load(model_dir)?;
    let mut info = serde_json::json!({"format": ty.name(), "mix": if pure { "pure" } else { "llama.cpp" }, "types": report.types, "file": MODEL_FILE, "keep_embeddings": keep_embeddings, "source": model_dir.display().to_string()});
    if let Some(m) = imatrix {
        info["imatrix"] = serde_json::json!({"file": m.path.display().to_string(), "tokens": m.tokens, "text": m.meta.get("text")});
        info["gptq"] = serde_json::json!(hessians.is_some());
    }
    cfg.extra.insert("linly_quantization".into(), info);
    cfg.save(staged.path())?;
    for f in COPIED {
        let src = model_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, staged.path().join(f)).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    staged.commit()?;
    report.path = out.join(MODEL_FILE);
    Ok(report)
}
