//! Inference: scoring (`eval`), sampling and generation (`generate`), chat templates and the
//! chat REPL. All of it drives the one [`crate::model::Llama`].

pub mod chat;
pub mod eval;
pub mod generate;
pub mod sample;

use crate::io::safetensors::FloatType;
use crate::model::Llama;
use crate::tokenizer::Tok;
use anyhow::Result;
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::{Path, PathBuf};

/// What every model-running command needs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: PathBuf,
    pub adapters: Vec<PathBuf>,
    pub device: String,
    pub dtype: FloatType,
    /// A tokenizer folder overriding the model's own.
    pub tokenizer: Option<PathBuf>,
}

impl ModelSpec {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        ModelSpec { model: model.into(), adapters: vec![], device: "cpu".into(), dtype: FloatType::F32, tokenizer: None }
    }
}

/// A loaded model with its tokenizer (if the folder has one).
pub struct Loaded {
    pub model: Llama,
    pub tok: Option<Tok>,
    pub device: Device,
    /// `old_vocab` of the `vocab_extension.json` beside the tokenizer: ids from here on are the
    /// added pieces, which `eval` reports on their own.
    pub first_added_id: Option<u32>,
}

/// Loads the model, applies adapters unmerged, and finds the tokenizer.
pub fn load(spec: &ModelSpec) -> Result<Loaded> {
    let device = crate::device::parse(&spec.device)?;
    let mut model = Llama::load(&spec.model, &device, spec.dtype)?;
    let base_rows = model.vocab_size();
    for a in &spec.adapters {
        model = crate::lora::adapter::apply(model, a, &device)?;
    }
    let tok_dir = tokenizer_dir(spec);
    let tok = Tok::load_optional(&tok_dir)?;
    if let Some(t) = &tok {
        let tv = t.vocab_size();
        // Rows an adapter added that this tokenizer never writes: the text would be read in the
        // old pieces by a model trained on the new ones (a checkpoint's adapter from before
        // checkpoints carried their tokenizer scored 10.37 bits/char where it was worth 7.68).
        if tv <= base_rows && base_rows < model.vocab_size() {
            anyhow::bail!(
                "the adapters grow the vocabulary from {base_rows} to {} pieces but the tokenizer in {} has {tv}: copy the extended tokenizer (tokenizer.json, tokenizer_config.json, vocab_extension.json) into the adapter folder or pass --tokenizer DIR",
                model.vocab_size(),
                tok_dir.display()
            );
        }
        if tv > model.vocab_size() {
            anyhow::bail!(
                "tokenizer {} has {tv} tokens but the model has {} embedding rows: pass --adapter with the resized rows or a model resized with `linly-lora vocab resize`",
                tok_dir.display(),
                model.vocab_size()
            );
        }
    }
    let first_added_id = added_from(&tok_dir)?;
    Ok(Loaded { model, tok, device, first_added_id })
}

/// The first added id, from `DIR/vocab_extension.json` when the tokenizer folder has one.
pub fn added_from(tok_dir: &Path) -> Result<Option<u32>> {
    let p = if tok_dir.is_dir() { tok_dir.join("vocab_extension.json") } else { tok_dir.with_file_name("vocab_extension.json") };
    if !p.exists() {
        return Ok(None);
    }
    let ext = crate::vocab::VocabExtension::load(&p)?;
    Ok(Some(ext.old_vocab as u32))
}

/// The tokenizer to use: `--tokenizer`, else the last adapter that ships one, else the model's.
fn tokenizer_dir(spec: &ModelSpec) -> PathBuf {
    if let Some(t) = &spec.tokenizer {
        return t.clone();
    }
    for a in spec.adapters.iter().rev() {
        if a.join("tokenizer.json").exists() {
            return a.clone();
        }
    }
    spec.model.clone()
}

/// Puts the model's BOS first when it has one and `ids` do not start with it, so that a
/// scored text's first token is predicted too (`eval`, `imatrix`).
pub fn prepend_bos(loaded: &Loaded, ids: &mut Vec<u32>) {
    if let Some(bos) = loaded.model.config.bos_token_id {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
}

/// Ids `[1, T]` on the device.
pub fn ids_tensor(ids: &[u32], device: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), device)
}

/// Reads ids from a `--ids` file: safetensors with an integer `input_ids` `[B, T]`, or JSONL
/// with one array of ids per line.
pub fn read_ids_file(path: &Path) -> Result<Vec<Vec<u32>>> {
    use anyhow::Context;
    let is_st = path.extension().map(|e| e == "safetensors").unwrap_or(false);
    let to_u32 = |x: i64| -> Result<u32> { u32::try_from(x).map_err(|_| anyhow::anyhow!("{}: id {x} is negative or too large", path.display())) };
    if is_st {
        let f = crate::io::safetensors::SafetensorsFile::open(path)?;
        let raw = f.require("input_ids")?;
        let v = raw.to_i64().with_context(|| format!("{}: tensor `input_ids`", path.display()))?;
        let (b, t) = match raw.shape {
            [b, t] => (*b, *t),
            [t] => (1, *t),
            s => anyhow::bail!("{}: `input_ids` has shape {s:?}; expected [B, T]", path.display()),
        };
        if t == 0 {
            // No ids at all, however many rows the header claims (B may be near 2^64 when the
            // tensor holds zero bytes): nothing to allocate one empty sequence per row for.
            return Ok(Vec::new());
        }
        (0..b).map(|i| v[i * t..(i + 1) * t].iter().map(|&x| to_u32(x)).collect()).collect()
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let ids: Vec<i64> = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: expected a JSON array of token ids", path.display(), n + 1))?;
            out.push(ids.into_iter().map(to_u32).collect::<Result<Vec<_>>>()?);
        }
        Ok(out)
    }
}
