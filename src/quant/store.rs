//! The quantized model folder: `config.json` (with a `linly_quantization` entry), the tokenizer
//! files, and `model.gguf`, the same GGUF `linly-lora export gguf` writes. Using llama.cpp's
//! format means one writer, byte layouts checked against llama.cpp itself, and a folder whose
//! `model.gguf` runs in llama.cpp unchanged.
//!
//! Loading maps GGUF names back to HF names and moves the Q/K rows back into HF order. Rows are
//! whole blocks, so this moves bytes and never dequantizes.

use super::{QType, QuantMatrix};
use crate::config::LlamaConfig;
use crate::io::gguf::layout::unpermute_qk_rows;
use super::imatrix::Imatrix;
use super::gptq::Hessians;
use crate::io::gguf::{export_gguf_calibrated, gguf_to_hf_name, ExportOptions, ExportReport, ExportType, GgmlType, GgufMmap};
use crate::io::safetensors::FloatType;
use crate::model::linear::Frozen;
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The weights file inside a quantized folder.
pub const MODEL_FILE: &str = "model.gguf";

/// Files copied from the source folder when they exist.
const COPIED: [&str; 5] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "vocab_extension.json"];

/// Whether `dir` is a quantized folder (a `model.gguf` and no safetensors).
pub fn is_quantized_dir(dir: &Path) -> bool {
    dir.join(MODEL_FILE).is_file() && !dir.join("model.safetensors").exists() && !dir.join("model.safetensors.index.json").exists()
}

/// `linly-lora quantize`: writes `out` (which must not exist) atomically.
pub fn quantize_model(model_dir: &Path, out: &Path, ty: QType, keep_embeddings: bool, pure: bool) -> Result<ExportReport> {
    quantize_model_imatrix(model_dir, out, ty, keep_embeddings, pure, None, None)
}

/// [`quantize_model`] with an importance matrix (`quantize --imatrix`, see
/// [`crate::io::gguf::export_gguf_imatrix`]); it is named in `config.json`.
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

struct Entry {
    ty: GgmlType,
    /// HF (row-major) shape.
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
    /// Heads to undo llama.cpp's Q/K permutation over.
    unpermute: Option<usize>,
}

/// A quantized folder's `model.gguf`, indexed by HF tensor name.
pub struct GgufWeights {
    path: PathBuf,
    map: GgufMmap,
    index: HashMap<String, Entry>,
}

impl GgufWeights {
    pub fn open(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let path = dir.join(MODEL_FILE);
        let map = GgufMmap::open(&path)?;
        let mut index = HashMap::new();
        {
            let g = map.parse()?;
            let base = map.bytes().as_ptr() as usize;
            for t in &g.tensors {
                if t.name == "rope_freqs.weight" {
                    continue; // config.json carries the scaling
                }
                let name = gguf_to_hf_name(t.name)
                    .ok_or_else(|| anyhow!("{}: tensor `{}` is not a LLaMA weight", path.display(), t.name))?;
                let unpermute = match name.kind {
                    "attn_q" => Some(cfg.num_heads),
                    "attn_k" => Some(cfg.num_kv_heads),
                    _ => None,
                };
                let start = t.data.as_ptr() as usize - base;
                index.insert(name.hf_name, Entry { ty: t.ggml_type, shape: t.hf_shape(), range: start..start + t.data.len(), unpermute });
            }
        }
        Ok(GgufWeights { path, map, index })
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        self.index.contains_key(hf_name)
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self.index.get(name).ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.path.display()))?;
        if e.shape != shape {
            bail!("{}: tensor `{name}` has shape {:?}, expected {shape:?} from config.json", self.path.display(), e.shape);
        }
        Ok(e)
    }

    /// A dense tensor (norms, or weights stored as F32/F16), in `dtype`.
    pub fn dense<const D: usize>(&self, name: &str, shape: [usize; D], device: &Device, dtype: FloatType) -> Result<Tensor<D>> {
        let e = self.entry(name, &shape)?;
        let n = shape.iter().product();
        let mut v = crate::io::gguf::dequantize(e.ty, &self.map.bytes()[e.range.clone()], n)
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
        if let Some(h) = e.unpermute {
            v = unpermute_qk_rows(&v, shape[0], shape[1], h)?;
        }
        let data = crate::io::weights::f32_data(&v, shape, dtype);
        Ok(Tensor::from_data(data, (device, dtype.burn())))
    }

    /// A projection or token table: quantized when stored in one of [`QType`], dense otherwise.
    pub fn frozen(&self, name: &str, shape: [usize; 2], device: &Device, dtype: FloatType) -> Result<Frozen> {
        let e = self.entry(name, &shape)?;
        let Some(q) = QType::from_ggml(e.ty) else { return Ok(Frozen::dense(self.dense(name, shape, device, dtype)?)) };
        let m = QuantMatrix::from_bytes(q, shape[0], shape[1], self.map.bytes()[e.range.clone()].to_vec())
            .with_context(|| format!("{}: tensor `{name}`", self.path.display()))?;
        let m = match e.unpermute {
            // The HF row each GGUF row came from, found by running the row mover on indices.
            Some(h) => {
                let idx: Vec<f32> = (0..shape[0]).map(|i| i as f32).collect();
                let perm: Vec<usize> = unpermute_qk_rows(&idx, shape[0], 1, h)?.into_iter().map(|x| x as usize).collect();
                m.permute_rows(&perm)?
            }
            None => m,
        };
        Ok(Frozen::quant(m, device))
    }
}
