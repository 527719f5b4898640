//! `vocab resize`: grow a model folder's embedding and LM head for an extended vocabulary. This
//! is where new rows are initialised (the math is [`super::init_new_rows`]; the model-based
//! fits are [`super::distill`] and, for `--init fit`, `crate::train::fit_rows`, which trains the
//! rows with the training loop); training's in-run extension calls the same [`resize_tables`].

use super::distill::DistillOptions;
use super::{init_new_rows, resize_table, InitMethod, VocabExtension};
use crate::io::safetensors::FloatType;
use crate::model::Llama;
use crate::config::HfConfig;
use crate::io::atomic::StagedDir;
use crate::io::safetensors::{encode_f32, StreamWriter, TensorSpec};
use crate::io::weights::WeightStore;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct ResizeReport {
    pub out: PathBuf,
    pub old_vocab: usize,
    pub new_vocab: usize,
    pub init: String,
    pub tied: bool,
    /// New pieces whose sub-token list was empty (they got the mean of all rows).
    pub empty_subtokens: usize,
    /// What a model-based init did.
    pub distill: Option<super::distill::DistillReport>,
    /// What `--init fit` did (`crate::train::fit_rows`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit: Option<FitReport>,
}

/// What `--init fit` did, beside the resize.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    pub steps: usize,
    pub seconds: f64,
    /// Mean KL(base ‖ model) per position, nats, over the first and the last tenth of the steps
    /// (each step reads text the rows have not been fitted on yet).
    pub kl_first: Option<f64>,
    pub kl_last: Option<f64>,
    pub texts: Vec<PathBuf>,
}

/// The model's init std (`initializer_range`, 0.02 when absent), for `random` rows.
pub fn init_std(cfg: &HfConfig) -> f32 {
    cfg.extra.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02) as f32
}

/// New embedding and head tables `[new_vocab, hidden]` (head `None` when tied), each row set
/// from its own table's old rows, as Linly and Colossal-LLaMA-2's `init_model.py` do.
pub fn resize_tables(embed: &[f32], head: Option<&[f32]>, hidden: usize, ext: &VocabExtension, init: InitMethod, seed: u64, std: f32) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let rows = embed.len() / hidden;
    if rows != ext.old_vocab {
        bail!(
            "the model has {rows} embedding rows but vocab_extension.json says old_vocab = {}: resize the model the extension was made for",
            ext.old_vocab
        );
    }
    let e = resize_table(embed, init_new_rows(embed, rows, hidden, ext, init, seed, std)?);
    // A different seed for the head, so noisy/random rows of the two tables are independent.
    let h = head.map(|h| init_new_rows(h, rows, hidden, ext, init, seed.wrapping_add(1), std).map(|n| resize_table(h, n))).transpose()?;
    Ok((e, h))
}

/// Grows a loaded model's tables for `ext` (embedding and head separately), in memory, with a
/// table-only init; the model-based methods start here from sub-token means and are then fitted
/// by [`super::distill::distill_model`]. The same [`resize_tables`] as `vocab resize`.
pub fn resize_loaded(model: &mut Llama, ext: &VocabExtension, init: InitMethod, seed: u64, init_std: f32) -> Result<()> {
    use crate::io::weights::{f32_data, tensor_to_f32};
    let hidden = model.config.hidden_size;
    let embed = tensor_to_f32(model.embed_tokens.weight());
    let head = model.lm_head.as_ref().map(|h| tensor_to_f32(h.weight()));
    let (e, h) = resize_tables(&embed, head.as_deref(), hidden, ext, init, seed, init_std)?;
    let device = model.embed_tokens.base.val().device();
    let dt = model.dtype;
    let up = |v: &[f32]| crate::model::TokenTable::new(burn::tensor::Tensor::from_data(f32_data(v, [ext.new_vocab, hidden], dt), (&device, dt.burn())));
    model.embed_tokens = up(&e);
    if let Some(h) = h {
        model.lm_head = Some(up(&h));
    }
    model.config.vocab_size = ext.new_vocab;
    Ok(())
}

/// What a model-based init (`distill*`) needs besides the model: the training text its contexts
/// come from, the settings, and the device it runs on.
#[derive(Debug, Clone)]
pub struct DistillSpec {
    pub text: PathBuf,
    pub opts: DistillOptions,
    pub device: burn::tensor::Device,
}

/// An extension made from another tokenizer of the same size passes the `vocab_size` check, and
/// resizing with it would swap the model's tokenizer for one whose ids mean other text. So when
/// both tokenizers are at hand, every base token must keep its id in the extension's tokenizer,
/// and a sample of new pieces must split into the extension's `subtokens` under the model's.
fn check_extension_matches(model: &Path, extension: &Path, ext: &VocabExtension) -> Result<()> {
    use tokenizers::Model;
    let model_tok = model.join("tokenizer.json");
    let ext_tok = extension.parent().unwrap_or(Path::new(".")).join("tokenizer.json");
    if !model_tok.exists() || !ext_tok.exists() {
        return Ok(());
    }
    let load = |p: &Path| tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow::anyhow!("cannot load {}: {e}", p.display()));
    let (old, new) = (load(&model_tok)?, load(&ext_tok)?);
    let fix = "the extension was made from another tokenizer; run `linly-lora vocab extend` on this model's tokenizer";
    let new_vocab = new.get_vocab(true);
    let mut base: Vec<(String, u32)> = old.get_vocab(true).into_iter().collect();
    base.sort_by_key(|(_, id)| *id);
    if let Some((piece, id)) = base.iter().find(|(p, id)| new_vocab.get(p) != Some(id)) {
        bail!(
            "{}: token {piece:?} is id {id} in the model's {} but {:?} in the extension's: {fix}",
            extension.display(),
            model_tok.display(),
            new_vocab.get(piece)
        );
    }
    let unk = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&model_tok)?)
        .ok()
        .and_then(|j| j["model"]["unk_token"].as_str().and_then(|u| old.token_to_id(u)));
    let step = (ext.added() / 64).max(1);
    for i in (0..ext.added()).step_by(step) {
        let id = (ext.old_vocab + i) as u32;
        let piece = new.id_to_token(id).with_context(|| format!("{}: new token {id} is not in {}: {fix}", extension.display(), ext_tok.display()))?;
        let ids: Vec<u32> = old
            .get_model()
            .tokenize(&piece)
            .map_err(|e| anyhow::anyhow!("tokenizing {piece:?}: {e}"))?
            .iter()
            .map(|t| t.id)
            .filter(|&t| Some(t) != unk)
            .collect();
        if ids != ext.subtokens[i] {
            bail!(
                "{}: new token {id} {piece:?} lists sub-tokens {:?}, but the model's tokenizer splits it into {ids:?}: {fix}",
                extension.display(),
                ext.subtokens[i]
            );
        }
    }
    Ok(())
}

/// Resizes `model` into `out` (atomic). The tokenizer beside `extension` (if any) and the
/// extension itself are copied in, so the output folder is self-contained.
/// Written by `vocab resize` beside the resized model when the init changed old head rows: their
/// ids, so that training saves them in the adapter with the new rows.
pub const MOVED_ROWS_FILE: &str = "linly_moved_rows.json";

/// The old head rows a resize moved (empty for a model without [`MOVED_ROWS_FILE`]).
pub fn moved_head_rows(model_dir: &Path) -> Result<Vec<usize>> {
    let p = model_dir.join(MOVED_ROWS_FILE);
    if !p.exists() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("{}: not JSON; delete it and re-run `vocab resize`", p.display()))?;
    let rows = v["lm_head_rows_moved"].as_array().with_context(|| format!("{}: no `lm_head_rows_moved` list; delete it and re-run `vocab resize`", p.display()))?;
    rows.iter().map(|r| r.as_u64().map(|x| x as usize).with_context(|| format!("{}: `lm_head_rows_moved` holds {r}, not a row id", p.display()))).collect()
}

pub fn resize_model(model: &Path, extension: &Path, init: InitMethod, seed: u64, distill: Option<&DistillSpec>, out: &Path) -> Result<ResizeReport> {
    let ext = VocabExtension::load(extension)?;
    let mut cfg = HfConfig::load(model)?;
    let rt = cfg.to_runtime()?;
    let store = WeightStore::open(model)?;
    let hidden = rt.hidden_size;
    let tied = rt.tie_word_embeddings || !store.contains("lm_head.weight");
    if rt.vocab_size != ext.old_vocab {
        bail!(
            "{}: config.json has vocab_size {} but {} was made for a vocabulary of {}: pass the extension made from this model's tokenizer",
            model.display(),
            rt.vocab_size,
            extension.display(),
            ext.old_vocab
        );
    }
    if out.exists() {
        bail!("{} already exists: choose another --out, or pass --force to replace it", out.display());
    }
    if init == InitMethod::Fit {
        bail!("--init fit trains the new rows with the training loop, which `linly-lora vocab resize` runs (`train::fit_rows::fit_model`); this function writes the table-only and distill* inits");
    }
    check_extension_matches(model, extension, &ext)?;
    let ext_dir = extension.parent().unwrap_or(Path::new("."));
    let tok_src = if ext_dir.join("tokenizer.json").exists() { Some(ext_dir) } else { None };
    let mut distilled = None;
    let (new_embed, new_head) = match init.distill_sides() {
        None => {
            let (embed, _) = store.f32("model.embed_tokens.weight")?;
            let head = if tied { None } else { Some(store.f32("lm_head.weight")?.0) };
            resize_tables(&embed, head.as_deref(), hidden, &ext, init, seed, init_std(&cfg))?
        }
        Some(sides) => {
            let spec = distill.with_context(|| format!("--init {init} fits the new rows against the model on a text: pass --init-text FILE (the training text of the new language, never evaluation text)"))?;
            let tok_dir = tok_src.with_context(|| format!("--init {init} reads the text with the extended tokenizer, but {} has no tokenizer.json beside it", extension.display()))?;
            let mut m = Llama::load(model, &spec.device.clone().autodiff(), FloatType::F32)?;
            resize_loaded(&mut m, &ext, InitMethod::SubtokenMean, seed, init_std(&cfg))?;
            let mut opts = spec.opts.clone();
            opts.sides = sides;
            let r = super::distill::distill_model(&mut m, &ext, tok_dir, &spec.text, &opts, |s| eprintln!("vocab resize: {s}"))?;
            distilled = Some(r);
            let e = crate::io::weights::tensor_to_f32(m.embed_tokens.weight());
            let h = m.lm_head.as_ref().map(|h| crate::io::weights::tensor_to_f32(h.weight()));
            (e, h)
        }
    };
    let untie = tied && new_head.is_some();
    let staged = StagedDir::new(out, false)?;
    let mut specs: Vec<TensorSpec> = store
        .names()
        .into_iter()
        .map(|n| {
            let raw = store.raw(&n)?;
            let mut shape = raw.shape.to_vec();
            if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                shape[0] = ext.new_vocab;
            }
            Ok(TensorSpec { name: n.clone(), dtype: format!("{:?}", raw.dtype), shape })
        })
        .collect::<Result<_>>()?;
    let embed_dtype = format!("{:?}", store.raw("model.embed_tokens.weight")?.dtype);
    if untie && !store.contains("lm_head.weight") {
        specs.push(TensorSpec { name: "lm_head.weight".into(), dtype: embed_dtype, shape: vec![ext.new_vocab, hidden] });
    }
    let mut w = StreamWriter::create(&staged.path().join("model.safetensors"), specs, Some([("format".to_string(), "pt".to_string())].into()))?;
    for name in w.order() {
        // A head that untying adds is stored in the embedding's dtype.
        let raw = if store.contains(&name) { store.raw_finite(&name)? } else { store.raw_finite("model.embed_tokens.weight")? };
        let table = match name.as_str() {
            "model.embed_tokens.weight" => Some(&new_embed),
            "lm_head.weight" => new_head.as_ref(),
            _ => None,
        };
        match table {
            Some(t) => {
                let ty = raw.float_type().with_context(|| format!("{name} is not a float tensor"))?;
                w.write(&name, &encode_f32(t, ty))?;
            }
            None => w.write(&name, raw.bytes)?,
        }
    }
    w.finish()?;
    cfg.vocab_size = Some(ext.new_vocab);
    if untie {
        cfg.tie_word_embeddings = Some(false);
    }
    cfg.save(staged.path())?;
    for f in ["generation_config.json"] {
        if model.join(f).exists() {
            std::fs::copy(model.join(f), staged.path().join(f))?;
        }
    }
    if let Some(d) = tok_src {
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
            if d.join(f).exists() {
                std::fs::copy(d.join(f), staged.path().join(f))?;
            }
        }
    }
    std::fs::copy(extension, staged.path().join("vocab_extension.json"))?;
    if let Some(moved) = distilled.as_ref().map(|d| &d.head_rows_moved).filter(|m| !m.is_empty()) {
        let json = serde_json::to_string_pretty(&serde_json::json!({ "lm_head_rows_moved": moved }))?;
        crate::io::atomic::write(&staged.path().join(MOVED_ROWS_FILE), json.as_bytes())?;
    }
    let out = staged.commit()?;
    Ok(ResizeReport { out, old_vocab: ext.old_vocab, new_vocab: ext.new_vocab, init: init.as_str().into(), tied: tied && !untie, empty_subtokens: ext.empty_subtokens(), distill: distilled, fit: None })
}

