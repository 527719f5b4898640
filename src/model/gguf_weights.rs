//! The weights of a quantized folder (`linly-lora quantize`'s output, see `crate::quant::store`):
//! its `model.gguf` indexed by HF tensor name. Loading maps GGUF names back to HF names and moves
//! the Q/K rows back into HF order. Rows are whole blocks, so this moves bytes and never
//! dequantizes.

use super::linear::Frozen;
use crate::config::LlamaConfig;
use crate::ggml::{GgmlType, QType, QuantMatrix};
use crate::io::gguf::layout::unpermute_qk_rows;
use crate::io::gguf::{gguf_to_hf_name, GgufMmap};
use crate::io::safetensors::FloatType;
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The weights file inside a quantized folder.
pub const MODEL_FILE: &str = "model.gguf";

/// Whether `dir` is a quantized folder (a `model.gguf` and no safetensors).
pub fn is_quantized_dir(dir: &Path) -> bool {
    dir.join(MODEL_FILE).is_file() && !dir.join("model.safetensors").exists() && !dir.join("model.safetensors.index.json").exists()
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
