//! Building a [`Llama`] from an HF folder, or with random weights for benchmarks.

use super::*;
use crate::config::LlamaConfig;
use crate::io::safetensors::FloatType;
use crate::io::weights::WeightStore;
use anyhow::{bail, Context, Result};
use burn::module::Param;
use burn::tensor::{Device, Distribution};
use std::path::Path;

/// Where each weight comes from: a checkpoint or a random initialiser.
trait WeightSource {
    fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>>;

    /// A projection or token table; quantized sources hand out quantized matrices.
    fn frozen(&self, name: &str, shape: [usize; 2]) -> Result<linear::Frozen> {
        Ok(linear::Frozen::dense(self.get(name, shape)?))
    }
}

struct FromGguf<'a> {
    weights: &'a super::gguf_weights::GgufWeights,
    device: &'a Device,
    dtype: FloatType,
}

impl WeightSource for FromGguf<'_> {
    fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        self.weights.dense(name, shape, self.device, self.dtype)
    }

    fn frozen(&self, name: &str, shape: [usize; 2]) -> Result<linear::Frozen> {
        self.weights.frozen(name, shape, self.device, self.dtype)
    }
}

struct FromStore<'a> {
    store: &'a WeightStore,
    device: &'a Device,
    dtype: FloatType,
}

impl WeightSource for FromStore<'_> {
    fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        self.store.tensor(name, shape, self.device, self.dtype)
    }
}

struct Random<'a> {
    device: &'a Device,
    dtype: FloatType,
    std: f64,
}

impl WeightSource for Random<'_> {
    fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let opts = (self.device, self.dtype.burn());
        Ok(if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            Tensor::ones(shape, opts)
        } else {
            Tensor::random(shape, Distribution::Normal(0.0, self.std), opts)
        })
    }
}

fn build(cfg: &LlamaConfig, src: &impl WeightSource, has_lm_head: bool, dtype: FloatType) -> Result<Llama> {
    let (hd, ffn, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q_out, kv_out) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let norm = |name: &str| -> Result<RmsNorm> {
        Ok(RmsNorm { weight: Param::from_tensor(src.get(name, [hd])?).set_require_grad(false), eps: cfg.rms_norm_eps })
    };
    let lin = |name: String, out: usize, inp: usize| -> Result<Linear> { Ok(Linear::from_frozen(src.frozen(&name, [out, inp])?)) };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        layers.push(DecoderLayer {
            self_attn: Attention {
                q_proj: lin(format!("{p}.self_attn.q_proj.weight"), q_out, hd)?,
                k_proj: lin(format!("{p}.self_attn.k_proj.weight"), kv_out, hd)?,
                v_proj: lin(format!("{p}.self_attn.v_proj.weight"), kv_out, hd)?,
                o_proj: lin(format!("{p}.self_attn.o_proj.weight"), hd, q_out)?,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            mlp: Mlp {
                gate_proj: lin(format!("{p}.mlp.gate_proj.weight"), ffn, hd)?,
                up_proj: lin(format!("{p}.mlp.up_proj.weight"), ffn, hd)?,
                down_proj: lin(format!("{p}.mlp.down_proj.weight"), hd, ffn)?,
            },
            input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
        });
    }
    let embed_tokens = TokenTable::from_frozen(src.frozen("model.embed_tokens.weight", [v, hd])?);
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else if has_lm_head {
        Some(TokenTable::from_frozen(src.frozen("lm_head.weight", [v, hd])?))
    } else {
        bail!("missing tensor `lm_head.weight` and config.json has tie_word_embeddings = false; set it to true if the head is tied")
    };
    Ok(Llama { embed_tokens, layers, norm: norm("model.norm.weight")?, lm_head, config: cfg.clone(), dtype })
}

impl Llama {
    /// Loads an HF folder (`config.json` + safetensors), converting weights to `dtype`, or a
    /// quantized folder from `linly-lora quantize` (`config.json` + `model.gguf`), whose
    /// quantized matrices stay quantized.
    pub fn load(dir: &Path, device: &Device, dtype: FloatType) -> Result<Self> {
        let cfg = LlamaConfig::load(dir)?;
        if super::gguf_weights::is_quantized_dir(dir) {
            let w = super::gguf_weights::GgufWeights::open(dir, &cfg)?;
            return build(&cfg, &FromGguf { weights: &w, device, dtype }, w.contains("lm_head.weight"), dtype)
                .with_context(|| format!("loading quantized model from {}", dir.display()));
        }
        let store = WeightStore::open(dir)?;
        Self::from_store(&cfg, &store, device, dtype).with_context(|| format!("loading model from {}", dir.display()))
    }

    pub fn from_store(cfg: &LlamaConfig, store: &WeightStore, device: &Device, dtype: FloatType) -> Result<Self> {
        build(cfg, &FromStore { store, device, dtype }, store.contains("lm_head.weight"), dtype)
    }

    /// Random weights (N(0, 0.02), unit norms) of a given shape, built on the device.
    pub fn random(cfg: &LlamaConfig, device: &Device, dtype: FloatType) -> Self {
        build(cfg, &Random { device, dtype, std: 0.02 }, true, dtype).expect("random init cannot fail")
    }
}
