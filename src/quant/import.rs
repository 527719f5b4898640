//! GGUF → Hugging Face folder for LLaMA-architecture models.
//!
//! Output (`--out DIR`):
//! * `model.safetensors`: every weight dequantized to f32, un-permuted (Q/K) and stored in the
//!   requested dtype. 1-D tensors (the RMSNorm weights) stay f32 whatever the dtype: llama.cpp
//!   stores them as f32, they are tiny, and rounding them to bf16 would change the model for
//!   no gain. Loaders that want a single dtype cast on load, as transformers does.
//! * `config.json` (`LlamaForCausalLM`), `generation_config.json`;
//! * `tokenizer.json`, `tokenizer_config.json` (with `chat_template`), `special_tokens_map.json`
//!   when the GGUF carries a tokenizer (see [`crate::io::gguf::tokenizer`]).
//!
//! Everything is written into a hidden temporary folder next to `DIR` and renamed into place at
//! the end, so a failed import leaves no `DIR` behind. Tensors are converted one at a time
//! straight into the output file, so peak memory is about one tensor in f32, not the model.

use crate::config::llama3_rope_divisors;
use crate::io::gguf::dequant::dequantize;
use crate::io::gguf::layout::{gguf_to_hf_name, unpermute_qk_rows};
use crate::io::gguf::reader::{GgmlType, GgufFile, GgufMmap, GgufTensor};
use crate::io::gguf::tokenizer::{build_tokenizer, HfTokenizerFiles};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The dtype of the 2-D weights in the output `model.safetensors`.
pub use crate::io::safetensors::FloatType as OutDType;


/// What [`import_gguf`] did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The folder written (`--out`).
    pub out_dir: PathBuf,
    /// Number of tensors in `model.safetensors`.
    pub n_tensors: usize,
    /// Number of parameters written.
    pub n_params: u64,
    /// GGUF storage types of the imported tensors and how many tensors had each (`Q4_1: 210`).
    pub source_types: BTreeMap<String, usize>,
    /// dtype of the 2-D weights (1-D norms are always f32).
    pub dtype: OutDType,
    /// True when the GGUF has no `output.weight`, so `lm_head` shares the embedding.
    pub tied_embeddings: bool,
    /// `num_hidden_layers` written to config.json.
    pub num_layers: usize,
    /// `hidden_size` written to config.json.
    pub hidden_size: usize,
    /// Rows of the embedding (`vocab_size` in config.json).
    pub vocab_size: usize,
    /// `gpt2` or `llama` (with the pre-tokenizer name when there is one), or `None` when the
    /// GGUF has no tokenizer and none was written.
    pub tokenizer: Option<String>,
    /// Whether a chat template was carried over into `tokenizer_config.json`.
    pub chat_template: bool,
    /// Files written into `out_dir`.
    pub files: Vec<String>,
    /// Non-fatal oddities worth showing the user.
    pub warnings: Vec<String>,
}

/// LLaMA hyper-parameters from `llama.*` metadata.
#[derive(Debug, Clone)]
struct LlamaMeta {
    n_layer: usize,
    n_embd: usize,
    n_ff: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    context_length: u64,
    rms_eps: f64,
    rope_theta: f64,
    rope_scaling: Option<Value>,
}

/// One output tensor and where it comes from.
struct Planned<'f, 'a> {
    hf_name: String,
    src: &'f GgufTensor<'a>,
    /// Row-major HF shape.
    shape: Vec<usize>,
    dtype: OutDType,
    /// Heads to un-permute over, for `attn_q` / `attn_k`.
    unpermute_heads: Option<usize>,
}

fn usize_of(v: u64, key: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| anyhow!("`{key}` = {v} is too large"))
}

fn required(g: &GgufFile<'_>, key: &str) -> Result<usize> {
    let v = g.get_u64(key)?.ok_or_else(|| anyhow!("metadata `{key}` is missing (a LLaMA GGUF needs it)"))?;
    if v == 0 {
        bail!("metadata `{key}` is 0");
    }
    usize_of(v, key)
}

fn read_meta(g: &GgufFile<'_>, warnings: &mut Vec<String>) -> Result<LlamaMeta> {
    let arch =
        g.get_str("general.architecture")?.ok_or_else(|| anyhow!("metadata `general.architecture` is missing"))?;
    if arch != "llama" {
        bail!("architecture `{arch}` is not supported: only `llama` GGUF files can be imported");
    }
    if g.get_u64("llama.expert_count")?.unwrap_or(0) > 0 {
        bail!("mixture-of-experts LLaMA (llama.expert_count > 0) is not supported");
    }
    let n_embd = required(g, "llama.embedding_length")?;
    let n_layer = required(g, "llama.block_count")?;
    let n_ff = required(g, "llama.feed_forward_length")?;
    let n_head = required(g, "llama.attention.head_count")?;
    let n_head_kv = match g.get_u64("llama.attention.head_count_kv")? {
        None => n_head,
        Some(0) => bail!("metadata `llama.attention.head_count_kv` is 0"),
        Some(v) => usize_of(v, "llama.attention.head_count_kv")?,
    };
    if n_head % n_head_kv != 0 {
        bail!("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}");
    }
    let key_length = g.get_u64("llama.attention.key_length")?;
    let value_length = g.get_u64("llama.attention.value_length")?;
    let head_dim = match key_length {
        Some(k) => usize_of(k, "llama.attention.key_length")?,
        None => {
            if n_embd % n_head != 0 {
                bail!("embedding_length {n_embd} is not divisible by head_count {n_head} and no key_length is given");
            }
            n_embd / n_head
        }
    };
    if let Some(v) = value_length {
        if v != head_dim as u64 {
            bail!("attention.value_length {v} differs from key_length {head_dim}; HF LLaMA needs them equal");
        }
    }
    if head_dim == 0 || head_dim % 2 != 0 {
        bail!("head dimension {head_dim} must be a positive even number for RoPE");
    }
    if let Some(rd) = g.get_u64("llama.rope.dimension_count")? {
        if rd != head_dim as u64 {
            bail!("rope.dimension_count {rd} differs from the head dimension {head_dim}: partial rotary embeddings are not supported");
        }
    }
    let context_length = match g.get_u64("llama.context_length")? {
        Some(c) if c > 0 => c,
        _ => {
            warnings.push("`llama.context_length` is missing; max_position_embeddings set to 2048".into());
            2048
        }
    };
    let rms_eps = match g.get_f64("llama.attention.layer_norm_rms_epsilon")? {
        Some(e) => e,
        None => {
            warnings.push("`llama.attention.layer_norm_rms_epsilon` is missing; rms_norm_eps set to 1e-5".into());
            1e-5
        }
    };
    let rope_theta = g.get_f64("llama.rope.freq_base")?.unwrap_or(10000.0);
    // The same rules as config.json's (crate::config), checked here so that a bad GGUF fails
    // its import instead of writing a folder that every later command refuses.
    if context_length > crate::config::MAX_CONTEXT as u64 {
        bail!("metadata `llama.context_length` = {context_length} is beyond {} tokens: the header is corrupt", crate::config::MAX_CONTEXT);
    }
    if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
        bail!("metadata `llama.attention.layer_norm_rms_epsilon` = {rms_eps} must be a small positive number (LLaMA uses 1e-5)");
    }
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        bail!("metadata `llama.rope.freq_base` = {rope_theta} must be a finite number above 0 (LLaMA uses 10000)");
    }
    let rope_scaling = rope_scaling(g, head_dim, rope_theta, warnings)?;
    Ok(LlamaMeta {
        n_layer,
        n_embd,
        n_ff,
        n_head,
        n_head_kv,
        head_dim,
        context_length,
        rms_eps,
        rope_theta,
        rope_scaling,
    })
}

/// `rope_scaling` for config.json from `llama.rope.scaling.*`, or from a `rope_freqs` tensor
/// (how convert_hf_to_gguf.py stores LLaMA-3.1-style scaling).
fn rope_scaling(g: &GgufFile<'_>, head_dim: usize, theta: f64, warnings: &mut Vec<String>) -> Result<Option<Value>> {
    let ty = g.get_str("llama.rope.scaling.type")?;
    let factor = match g.get_f64("llama.rope.scaling.factor")? {
        Some(f) => Some(f),
        None => g.get_f64("llama.rope.scale_linear")?,
    };
    if let Some(f) = factor.filter(|f| !(f.is_finite() && *f > 0.0)) {
        bail!("metadata `llama.rope.scaling.factor` = {f} must be a finite number above 0");
    }
    let orig = g.get_u64("llama.rope.scaling.original_context_length")?;
    if let Some(freqs) = g.tensor("rope_freqs.weight") {
        return Ok(llama3_scaling_from_freqs(freqs, head_dim, theta, orig, warnings));
    }
    Ok(match (ty, factor) {
        (Some("none"), _) | (None, None) => None,
        (Some("linear") | None, Some(f)) if f != 1.0 => Some(json!({"rope_type": "linear", "factor": f})),
        (Some("linear") | None, Some(_)) => None,
        (Some("yarn"), Some(f)) => {
            let mut v = json!({"rope_type": "yarn", "factor": f});
            if let Some(o) = orig {
                v["original_max_position_embeddings"] = json!(o);
            }
            Some(v)
        }
        (Some(other), _) => {
            warnings.push(format!("rope scaling type `{other}` (factor {factor:?}) is not carried into config.json"));
            None
        }
    })
}

/// Recognises convert_hf_to_gguf.py's LLaMA-3 `rope_freqs`: factor 1 for high frequencies,
/// `factor` for low ones, a smooth blend in between, with the published LLaMA-3.1/3.2 constants
/// (low_freq_factor 1, high_freq_factor 4, original context 8192 unless the file says otherwise).
fn llama3_scaling_from_freqs(
    t: &GgufTensor<'_>,
    head_dim: usize,
    theta: f64,
    orig: Option<u64>,
    warnings: &mut Vec<String>,
) -> Option<Value> {
    let values = match dequantize(t.ggml_type, t.data, t.n_elements() as usize) {
        Ok(v) if v.len() == head_dim / 2 => v,
        _ => {
            warnings.push(format!(
                "`rope_freqs.weight` ({} {:?}) is not a head_dim/2 vector; rope scaling left out",
                t.ggml_type, t.dims
            ));
            return None;
        }
    };
    let factor = values.iter().copied().fold(f32::MIN, f32::max) as f64;
    let (low, high, old_ctx) = (1.0f64, 4.0f64, orig.unwrap_or(8192) as f64);
    let wanted = llama3_rope_divisors(head_dim, theta, factor, low, high, old_ctx);
    let matches = values.iter().zip(&wanted).all(|(&v, &want)| (v as f64 - want).abs() <= 1e-3 * want.abs().max(1.0));
    if matches && factor > 1.0 {
        Some(json!({
            "rope_type": "llama3", "factor": crate::io::gguf::value::f32_to_f64_decimal(factor as f32),
            "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": old_ctx as u64,
        }))
    } else {
        warnings.push("`rope_freqs.weight` does not match LLaMA-3 rope scaling with the standard constants; rope_scaling left out of config.json".into());
        None
    }
}

/// Checks every tensor against the metadata and decides its HF name, shape and dtype.
fn plan<'f, 'a>(g: &'f GgufFile<'a>, m: &LlamaMeta, dtype: OutDType) -> Result<(Vec<Planned<'f, 'a>>, usize, bool)> {
    // Every layer has LAYER_TENSORS tensors in the file, so a `block_count` beyond that is a
    // corrupt or hostile header: refused before anything (the missing-weights list below) is
    // sized by it, instead of naming 4 billion missing layers one string at a time.
    const LAYER_TENSORS: usize = 9;
    if m.n_layer > g.tensors.len() / LAYER_TENSORS {
        let max = g.tensors.len() / LAYER_TENSORS;
        bail!(
            "metadata `llama.block_count` = {} but the file holds {} tensors ({max} layers at most): the weights of model.layers.{max} and beyond are missing, or the header is corrupt",
            m.n_layer,
            g.tensors.len()
        );
    }
    let embd = g.tensor("token_embd.weight").ok_or_else(|| anyhow!("tensor `token_embd.weight` is missing"))?;
    let vocab = match embd.hf_shape()[..] {
        [v, e] if e == m.n_embd && v > 0 => v,
        _ => bail!("tensor `token_embd.weight` has GGUF dims {:?}; expected [{}, vocab]", embd.dims, m.n_embd),
    };
    let q_rows = m.n_head * m.head_dim;
    let kv_rows = m.n_head_kv * m.head_dim;
    let mut planned = Vec::new();
    let mut seen = BTreeSet::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            continue; // folded into config.json's rope_scaling
        }
        let ctx = || format!("tensor `{}` ({} {:?})", t.name, t.ggml_type, t.dims);
        let name = gguf_to_hf_name(t.name)
            .ok_or_else(|| anyhow!("not a LLaMA weight this importer knows; refusing to drop it silently"))
            .with_context(ctx)?;
        if let Some(l) = name.layer {
            if l >= m.n_layer {
                return Err(anyhow!("layer {l} is beyond block_count {}", m.n_layer)).with_context(ctx);
            }
        }
        if !t.ggml_type.can_dequantize() {
            return Err(anyhow!("type {} cannot be dequantized by this importer", t.ggml_type)).with_context(ctx);
        }
        let want: Vec<usize> = match name.kind {
            "token_embd.weight" | "output.weight" => vec![vocab, m.n_embd],
            "output_norm.weight" | "attn_norm" | "ffn_norm" => vec![m.n_embd],
            "attn_q" => vec![q_rows, m.n_embd],
            "attn_k" | "attn_v" => vec![kv_rows, m.n_embd],
            "attn_output" => vec![m.n_embd, q_rows],
            "ffn_gate" | "ffn_up" => vec![m.n_ff, m.n_embd],
            "ffn_down" => vec![m.n_embd, m.n_ff],
            other => return Err(anyhow!("no shape rule for `{other}`")).with_context(ctx),
        };
        let shape = t.hf_shape();
        if shape != want {
            return Err(anyhow!("HF shape {shape:?} does not match {want:?} implied by the llama.* metadata"))
                .with_context(ctx);
        }
        let unpermute_heads = match name.kind {
            "attn_q" => Some(m.n_head),
            "attn_k" => Some(m.n_head_kv),
            _ => None,
        };
        let dtype = if shape.len() == 1 { OutDType::F32 } else { dtype };
        seen.insert(name.hf_name.clone());
        planned.push(Planned { hf_name: name.hf_name, src: t, shape, dtype, unpermute_heads });
    }
    let mut missing = Vec::new();
    for n in ["model.embed_tokens.weight", "model.norm.weight"] {
        if !seen.contains(n) {
            missing.push(n.to_string());
        }
    }
    for l in 0..m.n_layer {
        for module in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            let n = format!("model.layers.{l}.{module}.weight");
            if !seen.contains(&n) {
                missing.push(n);
            }
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(6).map(String::as_str).collect();
        bail!("{} weights are missing from the GGUF, e.g. {}", missing.len(), shown.join(", "));
    }
    let tied = !seen.contains("lm_head.weight");
    planned.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
    Ok((planned, vocab, tied))
}

/// Dequantizes, un-permutes and encodes one tensor.
fn convert(p: &Planned<'_, '_>) -> Result<Vec<u8>> {
    let t = p.src;
    let n = usize::try_from(t.n_elements()).map_err(|_| anyhow!("too many elements"))?;
    let mut values = dequantize(t.ggml_type, t.data, n)?;
    if let Some(heads) = p.unpermute_heads {
        values = unpermute_qk_rows(&values, p.shape[0], p.shape[1], heads)?;
    }
    Ok(crate::io::safetensors::encode_f32(&values, p.dtype))
}

/// Streams the planned tensors into a safetensors file, then re-reads its header to check it.
fn write_safetensors(path: &Path, planned: &[Planned<'_, '_>]) -> Result<()> {
    use crate::io::safetensors::{StreamWriter, TensorSpec};
    let specs = planned.iter().map(|p| TensorSpec { name: p.hf_name.clone(), dtype: p.dtype.safetensors_name().into(), shape: p.shape.clone() }).collect();
    let mut w = StreamWriter::create(path, specs, Some([("format".to_string(), "pt".to_string())].into()))?;
    let by_name: std::collections::HashMap<&str, &Planned<'_, '_>> = planned.iter().map(|p| (p.hf_name.as_str(), p)).collect();
    for name in w.order() {
        let p = by_name[name.as_str()];
        let bytes = convert(p).with_context(|| format!("converting tensor `{}` → `{}`", p.src.name, p.hf_name))?;
        w.write(&name, &bytes)?;
    }
    w.finish()
}

fn config_json(m: &LlamaMeta, vocab: usize, tied: bool, dtype: OutDType, ids: &TokenIds) -> Value {
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.n_embd,
        "intermediate_size": m.n_ff,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_head_kv,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.rms_eps,
        "rope_theta": m.rope_theta,
        "max_position_embeddings": m.context_length,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
    });
    if let Some(r) = &m.rope_scaling {
        c["rope_scaling"] = r.clone();
    }
    for (k, v) in [("bos_token_id", ids.bos), ("eos_token_id", ids.eos), ("pad_token_id", ids.pad)] {
        if let Some(v) = v {
            c[k] = json!(v);
        }
    }
    c
}

struct TokenIds {
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

/// Removes the temporary folder unless the import got as far as renaming it.
fn write_json(dir: &Path, name: &str, v: &Value, files: &mut Vec<String>) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v)?;
    text.push('\n');
    std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
    files.push(name.to_string());
    Ok(())
}

/// Imports a LLaMA GGUF file into a new HF model folder `out`.
///
/// Fails, leaving no `out`, when the file is not a valid GGUF, not a `llama` model, has tensors
/// of types that cannot be dequantized or that the metadata does not account for, or when `out`
/// exists and is not an empty folder.
pub fn import_gguf(path: &Path, out: &Path, dtype: OutDType) -> Result<ImportReport> {
    import_inner(path, out, dtype).with_context(|| format!("importing {} into {}", path.display(), out.display()))
}

fn import_inner(path: &Path, out: &Path, dtype: OutDType) -> Result<ImportReport> {
    let out_was_empty_dir = match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} already exists and is not empty; choose a new output folder", out.display());
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(_) if out.exists() => bail!("{} already exists and is not a folder", out.display()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", out.display())),
    };

    let map = GgufMmap::open(path)?;
    let gguf = map.parse()?;
    let mut warnings = Vec::new();
    let meta = read_meta(&gguf, &mut warnings).context("reading llama.* metadata")?;
    let (planned, vocab, tied) = plan(&gguf, &meta, dtype)?;
    let tok: Option<HfTokenizerFiles> =
        build_tokenizer(&gguf, Some(meta.context_length)).context("rebuilding the tokenizer from tokenizer.ggml.*")?;
    match &tok {
        None => {
            warnings.push("the GGUF has no tokenizer (tokenizer.ggml.tokens); no tokenizer files were written".into())
        }
        Some(t) => {
            warnings.extend(t.warnings.iter().map(|w| format!("tokenizer: {w}")));
            if t.n_tokens != vocab {
                warnings.push(format!("the tokenizer has {} tokens but the embedding has {vocab} rows", t.n_tokens));
            }
        }
    }
    if let Some(v) = gguf.get_u64("llama.vocab_size")? {
        if v != vocab as u64 {
            warnings.push(format!("llama.vocab_size is {v} but token_embd.weight has {vocab} rows; using {vocab}"));
        }
    }
    let ids = match &tok {
        Some(t) => TokenIds { bos: t.bos_token_id, eos: t.eos_token_id, pad: t.pad_token_id },
        None => {
            let id = |k: &str| {
                gguf.get_u64(k).ok().flatten().and_then(|v| u32::try_from(v).ok()).filter(|&v| (v as usize) < vocab)
            };
            TokenIds {
                bos: id("tokenizer.ggml.bos_token_id"),
                eos: id("tokenizer.ggml.eos_token_id"),
                pad: id("tokenizer.ggml.padding_token_id"),
            }
        }
    };

    // An empty folder was checked above: replacing it loses nothing.
    let staged = crate::io::atomic::StagedDir::new(out, out_was_empty_dir)?;
    let tmp_dir = staged.path().to_path_buf();

    let mut files = Vec::new();
    write_safetensors(&tmp_dir.join("model.safetensors"), &planned)?;
    files.push("model.safetensors".to_string());
    write_json(&tmp_dir, "config.json", &config_json(&meta, vocab, tied, dtype, &ids), &mut files)?;
    let mut gen = json!({"_from_model_config": true});
    for (k, v) in [("bos_token_id", ids.bos), ("eos_token_id", ids.eos), ("pad_token_id", ids.pad)] {
        if let Some(v) = v {
            gen[k] = json!(v);
        }
    }
    write_json(&tmp_dir, "generation_config.json", &gen, &mut files)?;
    if let Some(t) = &tok {
        write_json(&tmp_dir, "tokenizer.json", &t.tokenizer_json, &mut files)?;
        write_json(&tmp_dir, "tokenizer_config.json", &t.tokenizer_config, &mut files)?;
        write_json(&tmp_dir, "special_tokens_map.json", &t.special_tokens_map, &mut files)?;
    }

    let _ = out_was_empty_dir;
    staged.commit()?;

    let mut source_types = BTreeMap::new();
    for p in &planned {
        *source_types.entry(p.src.ggml_type.name().to_string()).or_insert(0) += 1;
    }
    Ok(ImportReport {
        out_dir: out.to_path_buf(),
        n_tensors: planned.len(),
        n_params: planned.iter().map(|p| p.src.n_elements()).sum(),
        source_types,
        dtype,
        tied_embeddings: tied,
        num_layers: meta.n_layer,
        hidden_size: meta.n_embd,
        vocab_size: vocab,
        tokenizer: tok.as_ref().map(|t| match &t.pre {
            Some(p) => format!("{} (pre-tokenizer {p})", t.model),
            None => t.model.clone(),
        }),
        chat_template: tok.as_ref().is_some_and(|t| t.tokenizer_config.get("chat_template").is_some()),
        files,
        warnings,
    })
}

/// The types [`import_gguf`] accepts for weights, for help texts.
pub fn supported_types() -> Vec<GgmlType> {
    use GgmlType::*;
    vec![F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]
}

#[cfg(test)]
#[path = "import_tests.rs"]
pub(crate) mod tests;
