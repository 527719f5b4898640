//! HF LLaMA folder → GGUF that llama.cpp loads: `llama.*` hyper-parameters, the tokenizer
//! (see [`crate::io::gguf::vocab_out`]), the chat template, Q/K rows permuted into llama.cpp's order
//! ([`crate::io::gguf::layout::permute_qk_rows`], the inverse of what import undoes), and every 2-D weight
//! as F32, F16 or one of [`QType`] (quantized with [`crate::ggml::blocks`], typed per tensor by
//! [`super::export_mix`]).
//!
//! A tensor with two candidate types (Q4_1 or Q5_0 for rows that cannot hold Q4_K) is quantized
//! both ways in a first pass and keeps the one with the smaller squared reconstruction error;
//! the header needs every tensor's size before the data.
//!
//! With an importance matrix ([`export_gguf_imatrix`], `quantize --imatrix`), the layer
//! projections stored in a type that has ggml's importance-weighted quantizer (Q4_0) get it,
//! with that tensor's per-column importance; nothing else changes, and without one the bytes
//! are exactly those of [`export_gguf`].
//!
//! With GPTQ's Hessians as well ([`export_gguf_calibrated`], `--gptq`), the Q4_0 weights that
//! [`crate::quant::gptq::applies_to`] names (gate/up, whose rows llama.cpp does not reorder)
//! are quantized by GPTQ instead.
//!
//! The header is written first from the tensor sizes alone, then each tensor is read,
//! permuted, converted and written in turn, so peak memory is one tensor in f32.

use super::export_mix::{candidates, Role};
use crate::io::gguf::layout::{hf_to_gguf_name, permute_qk_rows};
use crate::io::gguf::reader::{GgmlType, GgufValue};
use crate::io::gguf::vocab_out::gguf_vocab;
use crate::io::gguf::writer::GgufWriter;
use crate::config::{llama3_rope_divisors, LlamaConfig, RopeScaling};
use crate::io::weights::WeightStore;
use super::gptq::{self, Hessians};
use super::imatrix::Imatrix;
use crate::ggml::{QType, QuantMatrix};
use anyhow::{bail, Context, Result};
use half::f16;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The storage type of the 2-D weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    Quant(QType),
}

impl FromStr for ExportType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportType::F32,
            "f16" => ExportType::F16,
            "q8_0" | "q4_0" | "q4_k" => ExportType::Quant(s.parse()?),
            _ => bail!("unknown GGUF type `{s}`: use f16, f32, q8_0, q4_0 or q4_k"),
        })
    }
}

impl fmt::Display for ExportType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExportType::F32 => f.write_str("f32"),
            ExportType::F16 => f.write_str("f16"),
            ExportType::Quant(q) => write!(f, "{q}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub ty: ExportType,
    /// Keep the token embedding (and an untied LM head) in F16 instead of `ty`.
    pub keep_embeddings: bool,
    /// llama-quantize's `--pure`: every 2-D weight in `ty` (Q5_0 where Q4_K does not fit) with
    /// ggml's reference quantizers, instead of the llama.cpp mix and the error-minimizing Q4_0.
    pub pure: bool,
}

#[derive(Debug, Clone)]
pub struct ExportReport {
    pub path: PathBuf,
    pub n_tensors: usize,
    /// GGUF type → number of tensors stored in it.
    pub types: BTreeMap<String, usize>,
    pub bytes: u64,
    /// `gpt2 (pre smollm)`, `llama`, or `None` without a tokenizer.
    pub tokenizer: Option<String>,
    pub chat_template: bool,
    pub warnings: Vec<String>,
}

/// llama.cpp's `llama_ftype` for the file as a whole (informational for llama.cpp).
fn file_type(ty: ExportType, pure: bool) -> u32 {
    match ty {
        ExportType::Quant(QType::Q4_K) if !pure => 15, // Q4_K_M
        ExportType::F32 => 0,
        ExportType::F16 => 1,
        ExportType::Quant(QType::Q4_0) => 2,
        ExportType::Quant(QType::Q8_0) => 7,
        ExportType::Quant(QType::Q5_0) => 8,
        ExportType::Quant(QType::Q4_K) => 14, // Q4_K_S: Q4_K where rows allow
        ExportType::Quant(QType::Q4_1) => 3,
        ExportType::Quant(QType::Q6_K) => 18,
    }
}

/// One tensor to write.
struct Plan {
    gguf: String,
    hf: String,
    shape: Vec<usize>,
    ty: GgmlType,
    /// Heads to permute over (Q: attention heads, K: KV heads).
    permute: Option<usize>,
}

/// Where a 2-D weight sits in the model, for [`candidates`].
#[derive(Clone, Copy)]
struct Place {
    role: Role,
    layer: usize,
    n_layers: usize,
    /// Whether an importance matrix is given: llama.cpp's mix changes with one.
    imatrix: bool,
}

/// The GGUF types a 2-D weight with `cols`-long rows may take (one, or two to choose between
/// by reconstruction error).
fn types_for(ty: ExportType, pure: bool, place: Place, cols: usize, warnings: &mut Vec<String>, name: &str) -> Vec<GgmlType> {
    match ty {
        ExportType::F32 => vec![GgmlType::F32],
        ExportType::F16 => vec![GgmlType::F16],
        ExportType::Quant(q) => match candidates(q, pure, place.imatrix, place.role, place.layer, place.n_layers, cols) {
            Some(ts) => ts.into_iter().map(QType::ggml).collect(),
            None => {
                warnings.push(format!("`{name}`: rows of {cols} are not whole {q} blocks; stored as F16"));
                vec![GgmlType::F16]
            }
        },
    }
}

/// Squared reconstruction error of `values` stored as `ty`.
fn reconstruction_error(values: &[f32], rows: usize, cols: usize, ty: GgmlType, pure: bool, imp: Option<&[f32]>) -> Result<f64> {
    let q = QType::from_ggml(ty).with_context(|| format!("cannot measure {ty}"))?;
    let m = quantize_matrix(q, rows, cols, values, pure, imp)?;
    let y = m.dequantize();
    Ok(values.par_iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum())
}

/// Whether `q` has an importance-weighted quantizer here (ggml's `quantize_row_q4_0_impl`);
/// the other types are quantized as without an importance matrix.
pub fn uses_importance(q: QType) -> bool {
    q == QType::Q4_0
}

/// The per-column importance for tensor `hf` stored as `ty`: `None` without an importance
/// matrix, for the token table / LM head (their input is not collected; in the mixes they are
/// Q8_0, which has no importance path in ggml either) and for types in which it is unused.
fn importance<'a>(imatrix: Option<&'a Imatrix>, hf: &str, ty: GgmlType, cols: usize) -> Result<Option<&'a [f32]>> {
    match (imatrix, QType::from_ggml(ty)) {
        (Some(m), Some(q)) if uses_importance(q) && hf.starts_with("model.layers.") => m.get(hf, cols).map(Some),
        _ => Ok(None),
    }
}

/// The quantizer `quantize` uses: ggml's reference ones, except Q4_0 outside `pure`, which gets
/// ggml's error-minimizing scale search (same block format), and Q4_0 with an importance `imp`
/// (even under `pure`, as llama-quantize does), which weights that search by it.
fn quantize_matrix(q: QType, rows: usize, cols: usize, values: &[f32], pure: bool, imp: Option<&[f32]>) -> Result<QuantMatrix> {
    if q == QType::Q4_0 && (imp.is_some() || !pure) {
        QuantMatrix::quantize_q4_0_rmse(rows, cols, values, imp)
    } else {
        QuantMatrix::quantize(q, rows, cols, values)
    }
}

/// `rope_freqs` for LLaMA-3 scaling, as convert_hf_to_gguf.py computes it.
fn llama3_rope_factors(cfg: &LlamaConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = cfg.rope_scaling
    else {
        return None;
    };
    let d = llama3_rope_divisors(cfg.head_dim, cfg.rope_theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings);
    Some(d.into_iter().map(|f| f as f32).collect())
}

/// Writes `model_dir` (an HF folder) as a GGUF file at `out`, atomically.
pub fn export_gguf(model_dir: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    export_gguf_imatrix(model_dir, out, opts, None)
}

/// [`export_gguf`] with an importance matrix for the quantizers (see the module docs).
pub fn export_gguf_imatrix(model_dir: &Path, out: &Path, opts: &ExportOptions, imatrix: Option<&Imatrix>) -> Result<ExportReport> {
    export_gguf_calibrated(model_dir, out, opts, imatrix, None)
}

/// [`export_gguf_imatrix`], and with `hessians` the Q4_0 layer projections are quantized by
/// GPTQ ([`crate::quant::gptq`]) instead of rounded one weight at a time.
pub fn export_gguf_calibrated(model_dir: &Path, out: &Path, opts: &ExportOptions, imatrix: Option<&Imatrix>, hessians: Option<&Hessians>) -> Result<ExportReport> {
    crate::io::atomic::check_out(out, &[model_dir], false, crate::io::atomic::OutKind::File)?;
    export_inner(model_dir, out, opts, imatrix, hessians).with_context(|| format!("exporting {} to {}", model_dir.display(), out.display()))
}

/// GPTQ's Q4_0 bytes for `values` (HF row order), or `None` when the tensor is not stored as
/// Q4_0 or is not one GPTQ is used for ([`gptq::applies_to`]).
fn gptq_bytes(hessians: Option<&Hessians>, hf: &str, ty: GgmlType, shape: &[usize], values: &[f32]) -> Result<Option<Vec<u8>>> {
    let (Some(h), GgmlType::Q4_0, [rows, cols]) = (hessians, ty, shape) else {
        return Ok(None);
    };
    if !gptq::applies_to(hf) {
        return Ok(None);
    }
    let (Some(g), Some(imp)) = (h.get(hf, *cols), h.importance(hf, *cols)) else {
        bail!("no calibration Hessian of {cols} columns for `{hf}`");
    };
    let u = gptq::inverse_cholesky_upper(g, *cols, h.damp).with_context(|| format!("GPTQ for `{hf}`"))?;
    gptq::quantize_q4_0(values, *rows, *cols, &u, &imp).map(Some)
}

fn export_inner(model_dir: &Path, out: &Path, opts: &ExportOptions, imatrix: Option<&Imatrix>, hessians: Option<&Hessians>) -> Result<ExportReport> {
    if hessians.is_some() && opts.ty != ExportType::Quant(QType::Q4_0) {
        bail!("GPTQ (`--gptq`) writes Q4_0 blocks: use it with q4_0 (`quantize --format q4_0`, `export gguf --type q4_0`), not {}", opts.ty);
    }
    let cfg = LlamaConfig::load(model_dir)?;
    let store = WeightStore::open(model_dir)?;
    let mut warnings = Vec::new();
    let mut w = GgufWriter::new();
    let s = |x: &str| x.as_bytes().to_vec();
    let name = model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    w.add_kv("general.architecture", &GgufValue::String(&s("llama")))?;
    w.add_kv("general.name", &GgufValue::String(&s(&name)))?;
    w.add_kv("general.file_type", &GgufValue::U32(file_type(opts.ty, opts.pure)))?;
    if matches!(opts.ty, ExportType::Quant(_)) {
        w.add_kv("general.quantization_version", &GgufValue::U32(2))?;
    }
    let u = |v: usize| GgufValue::U32(v as u32);
    w.add_kv("llama.context_length", &u(cfg.max_position_embeddings))?;
    w.add_kv("llama.embedding_length", &u(cfg.hidden_size))?;
    w.add_kv("llama.block_count", &u(cfg.num_layers))?;
    w.add_kv("llama.feed_forward_length", &u(cfg.intermediate_size))?;
    w.add_kv("llama.attention.head_count", &u(cfg.num_heads))?;
    w.add_kv("llama.attention.head_count_kv", &u(cfg.num_kv_heads))?;
    w.add_kv("llama.rope.freq_base", &GgufValue::F32(cfg.rope_theta as f32))?;
    w.add_kv("llama.attention.layer_norm_rms_epsilon", &GgufValue::F32(cfg.rms_norm_eps as f32))?;
    w.add_kv("llama.rope.dimension_count", &u(cfg.head_dim))?;
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        w.add_kv("llama.attention.key_length", &u(cfg.head_dim))?;
        w.add_kv("llama.attention.value_length", &u(cfg.head_dim))?;
    }
    w.add_kv("llama.vocab_size", &u(cfg.vocab_size))?;
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        w.add_kv("llama.rope.scaling.type", &GgufValue::String(&s("linear")))?;
        w.add_kv("llama.rope.scaling.factor", &GgufValue::F32(factor as f32))?;
    }
    let vocab = gguf_vocab(model_dir, cfg.vocab_size)?;
    if let Some(v) = &vocab {
        v.write(&mut w)?;
        warnings.extend(v.warnings.iter().map(|x| format!("tokenizer: {x}")));
    } else {
        warnings.push("the model folder has no tokenizer.json; the GGUF has no tokenizer and llama.cpp will not load it".into());
    }

    let (hd, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut plans = Vec::new();
    // Tensors with two candidate types, decided below.
    let mut choices: Vec<(usize, Vec<GgmlType>)> = Vec::new();
    let mut add = |hf: String, shape: Vec<usize>, tys: Vec<GgmlType>, permute: Option<usize>| {
        let gguf = hf_to_gguf_name(&hf).expect("LLaMA names map to GGUF");
        if tys.len() > 1 {
            choices.push((plans.len(), tys.clone()));
        }
        plans.push(Plan { gguf, hf, shape, ty: tys[0], permute });
    };
    let n_layers = cfg.num_layers;
    let tied = cfg.tie_word_embeddings;
    let place = |role: Role, layer: usize| Place { role, layer, n_layers, imatrix: imatrix.is_some() };
    let table_ty = if opts.keep_embeddings && opts.ty != ExportType::F32 { ExportType::F16 } else { opts.ty };
    let table = types_for(table_ty, opts.pure, place(Role::TokenTable { tied }, 0), hd, &mut warnings, "token_embd");
    add("model.embed_tokens.weight".into(), vec![v, hd], table, None);
    let (q_out, kv_out, ffn) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let mut lin = |m: &str, rows: usize, cols: usize, permute: Option<usize>| {
            let role = match m {
                "self_attn.v_proj" => Role::AttnV,
                "mlp.down_proj" => Role::FfnDown,
                _ => Role::Other,
            };
            let t = types_for(opts.ty, opts.pure, place(role, l), cols, &mut warnings, m);
            add(format!("{p}.{m}.weight"), vec![rows, cols], t, permute);
        };
        lin("self_attn.q_proj", q_out, hd, Some(cfg.num_heads));
        lin("self_attn.k_proj", kv_out, hd, Some(cfg.num_kv_heads));
        lin("self_attn.v_proj", kv_out, hd, None);
        lin("self_attn.o_proj", hd, q_out, None);
        lin("mlp.gate_proj", ffn, hd, None);
        lin("mlp.up_proj", ffn, hd, None);
        lin("mlp.down_proj", hd, ffn, None);
        add(format!("{p}.input_layernorm.weight"), vec![hd], vec![GgmlType::F32], None);
        add(format!("{p}.post_attention_layernorm.weight"), vec![hd], vec![GgmlType::F32], None);
    }
    add("model.norm.weight".into(), vec![hd], vec![GgmlType::F32], None);
    if !cfg.tie_word_embeddings {
        if !store.contains("lm_head.weight") {
            bail!("config.json says the LM head is not tied but there is no `lm_head.weight`");
        }
        let head = types_for(table_ty, opts.pure, place(Role::Output, 0), hd, &mut warnings, "output");
        add("lm_head.weight".into(), vec![v, hd], head, None);
    }
    for (i, tys) in choices {
        let p = &mut plans[i];
        let (values, _) = store.f32(&p.hf)?;
        store.release(&p.hf);
        let mut best = (f64::INFINITY, tys[0]);
        for &t in &tys {
            let imp = importance(imatrix, &p.hf, t, p.shape[1])?;
            let e = reconstruction_error(&values, p.shape[0], p.shape[1], t, opts.pure, imp)
                .with_context(|| format!("quantizing `{}` as {t}", p.hf))?;
            if e < best.0 {
                best = (e, t);
            }
        }
        p.ty = best.1;
    }
    // A missing or mismatched importance entry fails here, before anything is written: for
    // every projection, whether or not this type weights it, so that a matrix of another model
    // never passes for this one's.
    if let Some(m) = imatrix {
        for p in plans.iter().filter(|p| p.hf.starts_with("model.layers.") && p.shape.len() == 2) {
            m.get(&p.hf, p.shape[1])?;
        }
        if !plans.iter().any(|p| QType::from_ggml(p.ty).is_some_and(uses_importance) && p.hf.starts_with("model.layers.")) {
            bail!("--imatrix changes nothing in {}: only Q4_0 weights are rounded by importance here; drop --imatrix, or quantize to q4_0", opts.ty);
        }
    }
    let rope_factors = llama3_rope_factors(&cfg);
    if let Some(f) = &rope_factors {
        w.add_f32("rope_freqs.weight", &[f.len()], f)?;
    }
    for p in &plans {
        let ne: Vec<u64> = p.shape.iter().rev().map(|&d| d as u64).collect();
        w.add_tensor_info(&p.gguf, &ne, p.ty)?;
    }
    let offset = usize::from(rope_factors.is_some());
    w.write_streaming(out, |i, _| {
        let p = &plans[i - offset];
        let (mut values, shape) = store.f32(&p.hf)?;
        if shape != p.shape {
            bail!("{}: tensor `{}` has shape {shape:?}, expected {:?} from config.json", store.file_of(&p.hf).display(), p.hf, p.shape);
        }
        store.release(&p.hf);
        if let Some(b) = gptq_bytes(hessians, &p.hf, p.ty, &p.shape, &values)? {
            debug_assert!(p.permute.is_none(), "GPTQ is not used for Q/K, whose rows are reordered");
            return Ok(b);
        }
        if let Some(heads) = p.permute {
            values = permute_qk_rows(&values, p.shape[0], p.shape[1], heads)?;
        }
        let imp = importance(imatrix, &p.hf, p.ty, p.shape[p.shape.len() - 1])?;
        encode_with(&values, &p.shape, p.ty, opts.pure, imp).with_context(|| format!("converting `{}`", p.hf))
    })?;

    let mut types = BTreeMap::new();
    for p in &plans {
        *types.entry(p.ty.name().to_string()).or_insert(0) += 1;
    }
    if rope_factors.is_some() {
        *types.entry("F32".to_string()).or_insert(0) += 1;
    }
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(ExportReport {
        path: out.to_path_buf(),
        n_tensors: plans.len() + offset,
        types,
        bytes,
        tokenizer: vocab.as_ref().map(|v| match &v.pre {
            Some(p) => format!("{} (pre {p})", v.model),
            None => v.model.clone(),
        }),
        chat_template: vocab.as_ref().is_some_and(|v| !v.chat_templates.is_empty()),
        warnings,
    })
}

/// f32 values (row-major `shape`) in GGUF type `ty`; `pure` as in [`ExportOptions`].
pub fn encode(values: &[f32], shape: &[usize], ty: GgmlType, pure: bool) -> Result<Vec<u8>> {
    encode_with(values, shape, ty, pure, None)
}

/// [`encode`] with a per-column importance for the quantizers that use one.
pub fn encode_with(values: &[f32], shape: &[usize], ty: GgmlType, pure: bool, imp: Option<&[f32]>) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlType::F16 => {
            let mut out = vec![0u8; values.len() * 2];
            out.par_chunks_mut(2 * 4096).zip(values.par_chunks(4096)).for_each(|(o, v)| {
                for (b, x) in o.chunks_exact_mut(2).zip(v) {
                    b.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
                }
            });
            out
        }
        t => {
            let q = QType::from_ggml(t).with_context(|| format!("cannot write {t}"))?;
            let (rows, cols) = match shape {
                [r, c] => (*r, *c),
                _ => bail!("only matrices are quantized"),
            };
            quantize_matrix(q, rows, cols, values, pure, imp)?.into_bytes()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::import::tests::{scratch, tiny_llama};
    use super::super::import::{import_gguf, OutDType};
    use crate::io::gguf::reader::{parse, GgufFile};
    use crate::io::gguf::{dequantize, GgufMmap};
    use super::*;
    use crate::io::weights::WeightStore;

    fn strings(g: &GgufFile<'_>, key: &str) -> Vec<String> {
        let a = g.get(key).unwrap_or_else(|| panic!("{key} missing")).as_array().unwrap();
        a.as_strings().unwrap().iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect()
    }

    fn tensor_f32(g: &GgufFile<'_>, name: &str) -> Vec<f32> {
        let t = g.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        dequantize(t.ggml_type, t.data, t.n_elements() as usize).unwrap()
    }

    /// GGUF → import → export: the same tensors (values and llama.cpp row order) and the same
    /// tokenizer metadata as the file we started from; and export → import gives back the HF
    /// tensors exactly.
    #[test]
    fn gguf_import_export_round_trip() {
        let dir = scratch("export-rt");
        let (bytes, _) = tiny_llama(false, true);
        let src = dir.join("src.gguf");
        std::fs::write(&src, &bytes).unwrap();
        let hf = dir.join("hf");
        import_gguf(&src, &hf, OutDType::F32).unwrap();
        let out = dir.join("out.gguf");
        let r = export_gguf(&hf, &out, &ExportOptions { ty: ExportType::F32, keep_embeddings: false, pure: false }).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.tokenizer.as_deref(), Some("gpt2 (pre smollm)"));
        assert!(r.chat_template);
        let a = parse(&bytes).unwrap();
        let map = GgufMmap::open(&out).unwrap();
        let b = map.parse().unwrap();
        assert_eq!(a.tensors.len(), b.tensors.len());
        for t in &a.tensors {
            assert_eq!(b.tensor(t.name).unwrap().dims, t.dims, "{}", t.name);
            assert_eq!(tensor_f32(&a, t.name), tensor_f32(&b, t.name), "{}: values or row order differ", t.name);
        }
        for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
            assert_eq!(strings(&a, key), strings(&b, key), "{key}");
        }
        let types = |g: &GgufFile<'_>| g.get("tokenizer.ggml.token_type").unwrap().as_array().unwrap().to_i64_vec().unwrap();
        assert_eq!(types(&a), types(&b));
        for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "llama.block_count", "llama.attention.head_count_kv", "llama.embedding_length"] {
            assert_eq!(a.get_u64(key).unwrap(), b.get_u64(key).unwrap(), "{key}");
        }
        for key in ["tokenizer.ggml.pre", "tokenizer.chat_template", "general.architecture"] {
            assert_eq!(a.get_str(key).unwrap(), b.get_str(key).unwrap(), "{key}");
        }
        // And back: the re-imported folder holds the same tensors as the first import.
        let hf2 = dir.join("hf2");
        import_gguf(&out, &hf2, OutDType::F32).unwrap();
        let (s1, s2) = (WeightStore::open(&hf).unwrap(), WeightStore::open(&hf2).unwrap());
        assert_eq!(s1.names(), s2.names());
        for n in s1.names() {
            assert_eq!(s1.f32(&n).unwrap(), s2.f32(&n).unwrap(), "{n}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A tokenizer that `vocab extend` gave the space split keeps its base's llama.cpp
    /// pre-type, and the export says what llama.cpp will tokenize differently.
    #[test]
    fn the_space_split_keeps_the_pre_type_and_warns() {
        let dir = scratch("export-split");
        let (hf, _) = imported_tiny_llama(&dir);
        let path = hf.join("tokenizer.json");
        let mut tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let split = serde_json::json!({"type": "Split", "pattern": {"Regex": crate::io::gguf::tokenizer::SPACE_BEFORE_UNSPACED}, "behavior": "Isolated", "invert": false});
        tj["pre_tokenizer"]["pretokenizers"].as_array_mut().expect("a sequence of splits").insert(0, split);
        std::fs::write(&path, tj.to_string()).unwrap();
        let r = export_gguf(&hf, &dir.join("out.gguf"), &ExportOptions { ty: ExportType::F32, keep_embeddings: false, pure: false }).unwrap();
        assert_eq!(r.tokenizer.as_deref(), Some("gpt2 (pre smollm)"));
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("space off a following Chinese character"), "{:?}", r.warnings);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The tiny tied GGUF imported into `dir/hf` as f32, and its tensors.
    fn imported_tiny_llama(dir: &Path) -> (PathBuf, WeightStore) {
        let (bytes, _) = tiny_llama(true, true);
        let src = dir.join("src.gguf");
        std::fs::write(&src, &bytes).unwrap();
        let hf = dir.join("hf");
        import_gguf(&src, &hf, OutDType::F32).unwrap();
        let store = WeightStore::open(&hf).unwrap();
        (hf, store)
    }

    /// Quantized exports re-import to exactly the dequantized quantization of each tensor, with
    /// the Q/K rows back in HF order.
    #[test]
    fn quantized_export_reimports_to_dequantized_values() {
        let dir = scratch("export-q");
        let (hf, s1) = imported_tiny_llama(&dir);
        for ty in ["q8_0", "q4_0", "q4_k"] {
            let out = dir.join(format!("{ty}.gguf"));
            let r = export_gguf(&hf, &out, &ExportOptions { ty: ty.parse().unwrap(), keep_embeddings: ty == "q4_0", pure: true }).unwrap();
            let back = dir.join(format!("{ty}-hf"));
            import_gguf(&out, &back, OutDType::F32).unwrap();
            let s2 = WeightStore::open(&back).unwrap();
            for n in s1.names() {
                let (v, shape) = s1.f32(&n).unwrap();
                let (w, _) = s2.f32(&n).unwrap();
                let want = if shape.len() == 1 {
                    v
                } else if n.contains("embed_tokens") && ty == "q4_0" {
                    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
                } else {
                    let q = QType::from_str(ty).unwrap().for_row_length(shape[1]).unwrap();
                    QuantMatrix::quantize(q, shape[0], shape[1], &v).unwrap().dequantize()
                };
                assert_eq!(w, want, "{ty}: {n}");
            }
            // 64- and 96-long rows are not whole 256-blocks: q4_k falls back to q5_0.
            if ty == "q4_k" {
                assert!(r.types.contains_key("Q5_0") && !r.types.contains_key("Q4_K"), "{:?}", r.types);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The default (mixed) exports: every tensor in a type [`candidates`] allows, the head in
    /// Q8_0 (rows of 64 cannot hold Q6_K), two-way choices won by the smaller reconstruction
    /// error, and the re-imported values exactly the chosen type's dequantization.
    #[test]
    fn mixed_export_follows_the_mix() {
        let dir = scratch("export-mix");
        let (hf, s1) = imported_tiny_llama(&dir);
        let cfg = LlamaConfig::load(&hf).unwrap();
        for ty in [QType::Q4_0, QType::Q4_K] {
            let out = dir.join(format!("mix-{ty}.gguf"));
            let r = export_gguf(&hf, &out, &ExportOptions { ty: ExportType::Quant(ty), keep_embeddings: false, pure: false }).unwrap();
            assert!(!r.types.contains_key("F16"), "{ty}: {:?}", r.types);
            let map = GgufMmap::open(&out).unwrap();
            let g = map.parse().unwrap();
            for t in g.tensors.iter().filter(|t| t.dims.len() == 2) {
                let hf_name = crate::io::gguf::gguf_to_hf_name(t.name).unwrap();
                let role = Role::of(t.name, cfg.tie_word_embeddings);
                let cols = t.dims[0] as usize;
                let allowed = candidates(ty, false, false, role, hf_name.layer.unwrap_or(0), cfg.num_layers, cols).unwrap();
                let got = QType::from_ggml(t.ggml_type).unwrap();
                assert!(allowed.contains(&got), "{ty}: {} is {got}, allowed {allowed:?}", t.name);
                if matches!(role, Role::TokenTable { tied: true } | Role::Output) {
                    assert_eq!(got, QType::Q8_0, "{ty}: the head of 64-wide rows");
                }
                let (v, shape) = s1.f32(&hf_name.hf_name).unwrap();
                let v = match t.name {
                    n if n.contains("attn_q") => permute_qk_rows(&v, shape[0], shape[1], cfg.num_heads).unwrap(),
                    n if n.contains("attn_k") => permute_qk_rows(&v, shape[0], shape[1], cfg.num_kv_heads).unwrap(),
                    _ => v,
                };
                let want = quantize_matrix(got, shape[0], shape[1], &v, false, None).unwrap();
                assert_eq!(t.data, &*want.bytes(), "{ty}: {} bytes", t.name);
                for &other in &allowed {
                    let (a, b) = (
                        reconstruction_error(&v, shape[0], shape[1], got.ggml(), false, None).unwrap(),
                        reconstruction_error(&v, shape[0], shape[1], other.ggml(), false, None).unwrap(),
                    );
                    assert!(a <= b, "{ty}: {} kept {got} ({a}) over {other} ({b})", t.name);
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
