//! Model configuration: the serde mirror of HF's `config.json` ([`HfConfig`]) kept apart from
//! the validated runtime form ([`LlamaConfig`]) that the model is built from. The file format
//! has optional and legacy spellings (top-level `rope_theta` vs `rope_parameters`); the runtime
//! form has exactly one answer for each question, so model code never re-derives defaults.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `config.json` as HF transformers writes it for `LlamaForCausalLM`.
///
/// Unknown keys are kept in `extra` so that rewriting a config (resize, merge) preserves them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfConfig {
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The longest context a config may declare (16M tokens, beyond any LLaMA-family model): a larger
/// `max_position_embeddings` is a corrupt file, not a model.
pub const MAX_CONTEXT: usize = 1 << 24;

/// The largest width, layer or head count, or vocabulary a config may declare (16M, far beyond
/// any LLaMA-family model): larger is a corrupt file, and products of such sizes (heads ×
/// head_dim, rows × hidden) must not overflow before the weights are checked against them.
pub const MAX_DIM: usize = 1 << 24;

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `linear`).
    Linear { factor: f64 },
    /// LLaMA-3.1's piecewise scaling of wavelengths (HF `llama3`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The float arithmetic RoPE frequencies are computed in: f32 where the model must match
/// transformers' f32 tables, f64 where GGUF's `rope_freqs` follow convert_hf_to_gguf.py's Python
/// floats. [`rope_base_freq`] and [`llama3_band`] do the same operations in either.
pub trait RopeFloat: Copy + PartialOrd + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self> + std::ops::Div<Output = Self> {
    const PI: Self;
    fn of_usize(n: usize) -> Self;
    fn of_f64(x: f64) -> Self;
    fn powf(self, e: Self) -> Self;
}

macro_rules! rope_float {
    ($t:ident) => {
        impl RopeFloat for $t {
            const PI: $t = std::$t::consts::PI;
            fn of_usize(n: usize) -> $t {
                n as $t
            }
            fn of_f64(x: f64) -> $t {
                x as $t
            }
            fn powf(self, e: $t) -> $t {
                $t::powf(self, e)
            }
        }
    };
}
rope_float!(f32);
rope_float!(f64);

/// RoPE's unscaled inverse frequency of pair `i` of `head_dim`, `1 / θ^(2i / head_dim)`.
pub fn rope_base_freq<F: RopeFloat>(i: usize, head_dim: usize, theta: f64) -> F {
    let exponent = F::of_usize(2 * i) / F::of_usize(head_dim);
    F::of_f64(1.0) / F::of_f64(theta).powf(exponent)
}

/// Where LLaMA-3 scaling puts an inverse frequency, by its wavelength `2π / freq`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Llama3Band<F> {
    /// Longer than `original / low_freq_factor`: divided by the factor.
    Low,
    /// Shorter than `original / high_freq_factor`: kept.
    High,
    /// In between: blended, `smooth` from 0 (as low) to 1 (as high).
    Mid { smooth: F },
}

/// The one LLaMA-3.1 wavelength rule (HF `_compute_llama3_parameters`, convert_hf_to_gguf.py's
/// `rope_freqs`) for `freq`, with `low`/`high` the `low_freq_factor`/`high_freq_factor` and
/// `orig` the original context. The bands do not overlap: the config checks `high > low`.
pub fn llama3_band<F: RopeFloat>(freq: F, low: F, high: F, orig: F) -> Llama3Band<F> {
    let wavelen = F::of_f64(2.0) * F::PI / freq;
    if wavelen > orig / low {
        Llama3Band::Low
    } else if wavelen < orig / high {
        Llama3Band::High
    } else {
        Llama3Band::Mid { smooth: (orig / wavelen - low) / (high - low) }
    }
}

/// GGUF's `rope_freqs` for LLaMA-3 scaling, in f64 as convert_hf_to_gguf.py computes them: the
/// divisor of each of the `head_dim / 2` base frequencies (1 for high ones, `factor` for low
/// ones, the harmonic blend in between).
pub fn llama3_rope_divisors(head_dim: usize, theta: f64, factor: f64, low: f64, high: f64, orig: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| match llama3_band(rope_base_freq::<f64>(i, head_dim, theta), low, high, orig) {
            Llama3Band::High => 1.0,
            Llama3Band::Low => factor,
            Llama3Band::Mid { smooth } => 1.0 / ((1.0 - smooth) / factor + smooth),
        })
        .collect()
}

/// The validated configuration the model is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

fn f64_field(obj: &serde_json::Value, key: &str) -> Option<f64> {
    obj.get(key).and_then(|v| v.as_f64())
}

impl HfConfig {
    /// Reads `config.json` from a model folder (or the file itself).
    pub fn load(path: &Path) -> Result<Self> {
        let is_file = path.extension().map(|e| e == "json").unwrap_or(false);
        let file = if is_file { path.to_path_buf() } else { path.join("config.json") };
        if path.is_file() && !is_file {
            bail!("{} is a file: pass the model's folder (config.json and safetensors)", path.display());
        }
        let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}: a model folder needs an HF config.json", file.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{} is not UTF-8 text (byte {}): an HF config.json is JSON; the file is damaged or not a config", file.display(), e.utf8_error().valid_up_to()))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            // The line itself, because Python's json.dump writes NaN and Infinity, which are not
            // JSON, and serde's "expected value" names neither the key nor the value.
            let line = e.line();
            let shown = text.lines().nth(line.saturating_sub(1)).unwrap_or("").trim();
            let hint = if ["NaN", "Infinity"].iter().any(|w| shown.contains(w)) {
                "; JSON has no NaN or Infinity: write the model's real value"
            } else {
                ""
            };
            anyhow::anyhow!("{} is not a valid config.json: {e} (line {line}: {shown}){hint}", file.display())
        })?;
        // Typed here, by key, because serde's errors through the flattened `extra` map name
        // neither the key nor the line.
        if let Some(obj) = value.as_object() {
            let whole = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"];
            for key in whole {
                if let Some(v) = obj.get(key).filter(|v| !v.is_null() && !v.is_u64()) {
                    bail!("{}: `{key}` = {v} must be a whole number", file.display());
                }
            }
            for key in ["rms_norm_eps", "rope_theta"] {
                if let Some(v) = obj.get(key).filter(|v| !v.is_null() && !v.is_number()) {
                    bail!("{}: `{key}` = {v} must be a number", file.display());
                }
            }
        }
        serde_json::from_value(value).with_context(|| format!("{} is not a valid config.json", file.display()))
    }

    /// Writes the config atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::io::atomic::write(&dir.join("config.json"), text.as_bytes())
    }

    /// Checks every key the model needs and resolves legacy spellings.
    pub fn to_runtime(&self) -> Result<LlamaConfig> {
        fn positive(v: f64, key: &str, fix: &str) -> Result<f64> {
            if !(v.is_finite() && v > 0.0) {
                bail!("config.json: `{key}` = {v} must be a finite number above 0 ({fix})");
            }
            Ok(v)
        }
        fn req(v: Option<usize>, key: &str) -> Result<usize> {
            match v {
                Some(0) => bail!("config.json: `{key}` is 0; it must be a positive integer"),
                Some(x) if x > MAX_DIM => bail!("config.json: `{key}` = {x} is not a plausible size (at most {MAX_DIM})"),
                Some(x) => Ok(x),
                None => bail!("config.json: missing key `{key}` (a LLaMA config needs it)"),
            }
        }
        if let Some(mt) = &self.model_type {
            if !matches!(mt.as_str(), "llama" | "mistral" | "qwen2" | "smollm" | "smollm2") {
                bail!("config.json: model_type `{mt}` is not a LLaMA-family model; linly-lora supports model_type `llama`");
            }
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("config.json: hidden_act `{act}` is not supported; LLaMA uses `silu`");
            }
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            bail!("config.json: attention_bias/mlp_bias = true is not supported (LLaMA has no linear biases)");
        }
        let hidden_size = req(self.hidden_size, "hidden_size")?;
        let num_heads = req(self.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = match self.num_key_value_heads {
            Some(_) => req(self.num_key_value_heads, "num_key_value_heads")?,
            None => num_heads,
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("config.json: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}");
        }
        let head_dim = match self.head_dim {
            Some(_) => req(self.head_dim, "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!("config.json: hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}; set `head_dim`");
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("config.json: head_dim {head_dim} must be a positive even number for RoPE");
        }
        let params = self.rope_parameters.as_ref();
        let rope_theta = self
            .rope_theta
            .or_else(|| params.and_then(|p| f64_field(p, "rope_theta")))
            .unwrap_or(10000.0);
        // transformers 5 folds the scaling into `rope_parameters`; older files use `rope_scaling`.
        let scaling_obj = self.rope_scaling.as_ref().filter(|v| !v.is_null()).or(params);
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(obj) => {
                let ty = obj
                    .get("rope_type")
                    .or_else(|| obj.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let factor = || {
                    f64_field(obj, "factor").with_context(|| format!("config.json: rope scaling `{ty}` needs `factor`"))
                };
                match ty {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: factor()? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor: f64_field(obj, "low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f64_field(obj, "high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: f64_field(obj, "original_max_position_embeddings")
                            .unwrap_or(8192.0),
                    },
                    other => bail!(
                        "config.json: rope scaling type `{other}` is not supported; supported: default, linear, llama3"
                    ),
                }
            }
        };
        // Checked here, where the file enters, because a NaN epsilon or theta does not fail
        // later: it turns every logit into NaN, and a huge context sizes caches by it.
        let rms_norm_eps = positive(self.rms_norm_eps.unwrap_or(1e-6), "rms_norm_eps", "LLaMA uses 1e-5 or 1e-6")?;
        if rms_norm_eps >= 1.0 {
            bail!("config.json: `rms_norm_eps` = {rms_norm_eps} is not a small epsilon; LLaMA uses 1e-5 or 1e-6");
        }
        positive(rope_theta, "rope_theta", "LLaMA uses 10000, LLaMA-3 500000")?;
        match &rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                positive(*factor, "rope_scaling.factor", "e.g. 2.0 for twice the context")?;
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive(*factor, "rope_scaling.factor", "LLaMA-3.1 uses 8.0")?;
                positive(*low_freq_factor, "rope_scaling.low_freq_factor", "LLaMA-3.1 uses 1.0")?;
                positive(*high_freq_factor, "rope_scaling.high_freq_factor", "LLaMA-3.1 uses 4.0")?;
                positive(*original_max_position_embeddings, "rope_scaling.original_max_position_embeddings", "LLaMA-3.1 uses 8192")?;
                if high_freq_factor <= low_freq_factor {
                    bail!("config.json: rope_scaling.high_freq_factor {high_freq_factor} must be larger than low_freq_factor {low_freq_factor}");
                }
            }
        }
        if let Some(v) = self.extra.get("initializer_range").filter(|v| !v.is_null()) {
            if !v.as_f64().is_some_and(|x| x.is_finite() && x >= 0.0) {
                bail!("config.json: `initializer_range` = {v} must be a finite number ≥ 0 (LLaMA uses 0.02)");
            }
        }
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(2048);
        if max_position_embeddings == 0 || max_position_embeddings > MAX_CONTEXT {
            bail!("config.json: `max_position_embeddings` = {max_position_embeddings} must be between 1 and {MAX_CONTEXT} (the model's context length, e.g. 4096)");
        }
        let eos = token_ids(&self.eos_token_id);
        Ok(LlamaConfig {
            hidden_size,
            intermediate_size: req(self.intermediate_size, "intermediate_size")?,
            num_layers: req(self.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req(self.vocab_size, "vocab_size")?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_ids(&self.bos_token_id).first().copied(),
            eos_token_ids: eos,
        })
    }
}

impl LlamaConfig {
    /// Loads and validates `config.json` from a model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        HfConfig::load(dir)?.to_runtime().with_context(|| format!("in {}", dir.display()))
    }

    /// The HF `config.json` for this configuration.
    pub fn to_hf(&self) -> HfConfig {
        let rope_scaling = match self.rope_scaling {
            RopeScaling::None => None,
            RopeScaling::Linear { factor } => Some(serde_json::json!({"rope_type": "linear", "factor": factor})),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => Some(serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings
            })),
        };
        let mut extra = serde_json::Map::new();
        extra.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        HfConfig {
            hidden_size: Some(self.hidden_size),
            intermediate_size: Some(self.intermediate_size),
            num_hidden_layers: Some(self.num_layers),
            num_attention_heads: Some(self.num_heads),
            num_key_value_heads: Some(self.num_kv_heads),
            head_dim: Some(self.head_dim),
            vocab_size: Some(self.vocab_size),
            rms_norm_eps: Some(self.rms_norm_eps),
            rope_theta: Some(self.rope_theta),
            rope_parameters: None,
            rope_scaling,
            max_position_embeddings: Some(self.max_position_embeddings),
            tie_word_embeddings: Some(self.tie_word_embeddings),
            hidden_act: Some("silu".into()),
            attention_bias: Some(false),
            mlp_bias: Some(false),
            bos_token_id: self.bos_token_id.map(|b| b.into()),
            eos_token_id: self.eos_token_ids.first().map(|e| (*e).into()),
            model_type: Some("llama".into()),
            extra,
        }
    }

    /// A synthetic shape, for benchmarks and tests that need no weights.
    pub fn synthetic(hidden: usize, layers: usize, heads: usize, kv_heads: usize, ffn: usize, vocab: usize) -> Self {
        LlamaConfig {
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hidden / heads,
            vocab_size: vocab,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LlamaConfig> {
        serde_json::from_str::<HfConfig>(s).unwrap().to_runtime()
    }
    const BASE: &str = r#""hidden_size":64,"intermediate_size":176,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":320"#;

    #[test]
    fn rope_theta_top_level_and_nested() {
        let a = parse(&format!("{{{BASE},\"rope_theta\":500000.0}}")).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        let b = parse(&format!("{{{BASE},\"rope_parameters\":{{\"rope_theta\":1000.0,\"rope_type\":\"default\"}}}}")).unwrap();
        assert_eq!(b.rope_theta, 1000.0);
        assert_eq!(b.rope_scaling, RopeScaling::None);
        assert_eq!(b.num_kv_heads, 4);
        assert_eq!(b.head_dim, 16);
    }

    #[test]
    fn rope_scaling_types() {
        let l = parse(&format!("{{{BASE},\"rope_scaling\":{{\"type\":\"linear\",\"factor\":2.0}}}}")).unwrap();
        assert_eq!(l.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let l3 = parse(&format!(
            "{{{BASE},\"rope_scaling\":{{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}}}"
        ))
        .unwrap();
        assert!(matches!(l3.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let err = parse(&format!("{{{BASE},\"rope_scaling\":{{\"type\":\"yarn\",\"factor\":2.0}}}}")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let err = parse(r#"{"hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":320}"#).unwrap_err();
        assert!(err.to_string().contains("intermediate_size"), "{err}");
    }

    #[test]
    fn gqa_must_divide() {
        let err = parse(&format!("{{{BASE},\"num_key_value_heads\":3}}")).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }
}
