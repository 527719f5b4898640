//! Writing the model's LoRA branches and trained token rows as a PEFT adapter.

use super::adapter::{linears, CONFIG, WEIGHTS};
use super::config::{AdapterConfig, TokenIndices};
use super::TableMode;
use crate::io::atomic::StagedDir;
use crate::io::safetensors::{encode_f32, write_all, Entry, FloatType};
use crate::io::weights::tensor_to_f32;
use crate::model::{Llama, TokenTable};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which parts of the token tables an adapter carries.
#[derive(Debug, Clone)]
pub struct TableSave {
    pub embed: TableMode,
    pub lm_head: TableMode,
    /// Rows of the vocabulary before extension; `new_rows` saves the rows after it.
    pub old_vocab: usize,
    /// Old head rows that differ from the base the model extends (a `distill` init moves the
    /// mass of a new piece's first sub-token; `vocab resize` lists them in
    /// [`crate::vocab::MOVED_ROWS_FILE`]): `new_rows` saves them with the new rows, so the
    /// adapter applied to the unresized base gives the same model.
    pub head_moved: Vec<usize>,
}

fn entry(key: String, shape: Vec<usize>, v: &[f32]) -> Entry {
    (key, "F32".into(), shape, encode_f32(v, FloatType::F32))
}

#[allow(clippy::too_many_arguments)]
fn table_entries(t: &TokenTable, module: &str, key_prefix: &str, mode: TableMode, old_vocab: usize, moved: &[usize], cfg: &mut AdapterConfig, out: &mut Vec<Entry>) -> Result<()> {
    let hidden = t.hidden();
    // A frozen table of an extended model still differs from the base the adapter applies
    // to: its new rows (and a distilled head's moved rows) exist only in the resized model.
    // They are carried like trained ones, so the adapter on the unresized base gives the
    // model that was trained, whatever the init was.
    let mode = if mode == TableMode::Frozen && t.rows() > old_vocab { TableMode::NewRows } else { mode };
    match mode {
        TableMode::Frozen => {}
        TableMode::All => {
            let w = t.weight();
            let rows = w.dims()[0];
            out.push(entry(format!("{key_prefix}.weight"), vec![rows, hidden], &tensor_to_f32(w)));
            cfg.modules_to_save.get_or_insert_with(Vec::new).push(module.to_string());
        }
        TableMode::NewRows => {
            let rows = t.rows();
            if rows <= old_vocab {
                bail!("{module}: new_rows mode but the table has {rows} rows and the old vocabulary {old_vocab}: nothing new to save");
            }
            if let Some(&bad) = moved.iter().find(|&&i| i >= old_vocab) {
                bail!("{module}: moved row {bad} is not an old row (old vocabulary {old_vocab})");
            }
            let w = t.weight();
            // Only the listed rows come to the host, not the whole table.
            let mut vals = Vec::with_capacity((moved.len() + rows - old_vocab) * hidden);
            for &i in moved {
                vals.extend(tensor_to_f32(w.clone().slice([i..i + 1, 0..hidden])));
            }
            vals.extend(tensor_to_f32(w.slice([old_vocab..rows, 0..hidden])));
            let idx: Vec<usize> = moved.iter().copied().chain(old_vocab..rows).collect();
            out.push(entry(format!("{key_prefix}.token_adapter.trainable_tokens_delta"), vec![idx.len(), hidden], &vals));
            let map = match cfg.trainable_token_indices.take() {
                Some(TokenIndices::PerModule(m)) => m,
                _ => BTreeMap::new(),
            };
            let mut map = map;
            map.insert(module.to_string(), idx);
            cfg.trainable_token_indices = Some(TokenIndices::PerModule(map));
        }
    }
    Ok(())
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32) atomically.
/// `extra_files` (tokenizer, vocab_extension.json, recipe) are copied in beside them.
pub fn save(model: &Llama, base_cfg: &AdapterConfig, tables: TableSave, dir: &Path, extra_files: &[&Path]) -> Result<()> {
    encode(model, base_cfg, tables, extra_files)?.write(dir)
}

/// An adapter read out of the model into memory, ready to be written: what [`save`] writes,
/// apart from the writing, so that training can write a checkpoint's files on another thread
/// while it goes on (the model's tensors are read here, on the caller's thread).
pub struct EncodedAdapter {
    weights: Vec<Entry>,
    config: String,
    extra_files: Vec<PathBuf>,
}

impl EncodedAdapter {
    /// Writes the adapter folder `dir` atomically (a staging folder renamed into place).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let staged = StagedDir::new(dir, true)?;
        write_all(&staged.path().join(WEIGHTS), &self.weights, Some(BTreeMap::from([("format".to_string(), "pt".to_string())])))?;
        crate::io::atomic::write(&staged.path().join(CONFIG), self.config.as_bytes())?;
        for f in &self.extra_files {
            if let Some(name) = f.file_name() {
                std::fs::copy(f, staged.path().join(name)).with_context(|| format!("copying {} into the adapter {}", f.display(), dir.display()))?;
            }
        }
        staged.commit()?;
        Ok(())
    }
}

/// The adapter of `model` in memory ([`EncodedAdapter`]; see [`save`]).
pub fn encode(model: &Llama, base_cfg: &AdapterConfig, tables: TableSave, extra_files: &[&Path]) -> Result<EncodedAdapter> {
    let mut cfg = base_cfg.clone();
    cfg.modules_to_save = None;
    cfg.trainable_token_indices = None;
    let mut out: Vec<Entry> = Vec::new();
    let mut targets = BTreeSet::new();
    for (module, lin) in linears(model) {
        match lin.lora.len() {
            0 => continue,
            1 => {}
            n => bail!("{module} carries {n} stacked adapters; merge them first, an adapter file holds one"),
        }
        let br = &lin.lora[0];
        let (a, b) = (br.a.val(), br.b.val());
        let (ad, bd) = (a.dims(), b.dims());
        out.push(entry(format!("base_model.model.{module}.lora_A.weight"), ad.to_vec(), &tensor_to_f32(a)));
        out.push(entry(format!("base_model.model.{module}.lora_B.weight"), bd.to_vec(), &tensor_to_f32(b)));
        targets.insert(module.rsplit('.').next().unwrap_or_default().to_string());
    }
    if !targets.is_empty() {
        cfg.target_modules = super::config::TargetModules::List(targets.into_iter().collect());
    }
    table_entries(&model.embed_tokens, "embed_tokens", "base_model.model.model.embed_tokens", tables.embed, tables.old_vocab, &[], &mut cfg, &mut out)?;
    // A tied head is saved as its own copy so that PEFT, which unties modules_to_save, gets
    // the same model; merge re-ties identical tables.
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let head_mode = if model.lm_head.is_none() { tables.embed } else { tables.lm_head };
    // Moved rows exist only in an untied head (a tied one would move the input rows too).
    let moved: &[usize] = if model.lm_head.is_some() { &tables.head_moved } else { &[] };
    table_entries(head, "lm_head", "base_model.model.lm_head", head_mode, tables.old_vocab, moved, &mut cfg, &mut out)?;
    if out.is_empty() {
        bail!("nothing to save: the model has no LoRA branches and no trainable tables");
    }
    Ok(EncodedAdapter { weights: out, config: cfg.to_json()?, extra_files: extra_files.iter().map(|p| p.to_path_buf()).collect() })
}

/// What [`pack`] did, for the CLI to report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackReport {
    pub tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The head's trainable rows were dropped because they equal the embedding's (tied model).
    pub deduplicated_head: bool,
    /// Set when `--rank` lowered the LoRA pairs' rank.
    pub rank_cut: Option<RankCut>,
}

/// What lowering the rank did: every pair's share of `‖B·A‖²` left out (see
/// [`super::truncate::Truncated::dropped_energy`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RankCut {
    pub from: usize,
    pub to: usize,
    pub pairs: usize,
    pub dropped_energy_median: f64,
    pub dropped_energy_max: f64,
}

/// Rewrites an adapter folder for shipping: every float tensor in `dtype` (f16 halves an f32
/// adapter), and a tied head stored once. Training saves a tied table under both
/// `embed_tokens` and `lm_head` so that PEFT versions which untie trainable tables get the same
/// model; when the two trainable-token entries are identical, `pack` keeps only `embed_tokens`,
/// which loaders (ours, and PEFT's weight-tied trainable tokens) apply to the one shared table.
/// Whole tables (`modules_to_save`) keep both copies: alone, an embed_tokens table unties. Other files in
/// the folder (tokenizer, extension, recipe) are copied.
///
/// With `rank = Some(k)` every LoRA pair is replaced by the rank-`k` pair closest to its update
/// `B·A` ([`super::truncate::truncate_pair`]), and `lora_alpha` is rescaled so that each
/// module's scale (`alpha/r`, or `alpha/√r` with rsLoRA) stays what it was: the update a pair
/// adds is the truncated product, nothing else changes.
pub fn pack(src: &Path, dst: &Path, dtype: FloatType, rank: Option<usize>) -> Result<PackReport> {
    use anyhow::Context;
    use crate::io::safetensors::SafetensorsFile;
    let mut cfg = AdapterConfig::load(src)?;
    let wpath = src.join(WEIGHTS);
    let file = SafetensorsFile::open(&wpath)?;
    const EMBED_ROWS: &str = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
    const HEAD_ROWS: &str = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";
    let same = |a: &str, b: &str| match (file.get(a), file.get(b)) {
        (Some(x), Some(y)) => x.shape == y.shape && x.bytes == y.bytes,
        _ => false,
    };
    // Only trainable-token rows are stored once: loaders give an embed_tokens-only row update of
    // a tied model to both tables, but a lone whole embed_tokens (modules_to_save) unties it.
    let drop_head = same(EMBED_ROWS, HEAD_ROWS) && cfg.token_indices("embed_tokens") == cfg.token_indices("lm_head");
    let (mut cut, rank_cut) = match rank {
        Some(k) => {
            let (cut, report) = lower_rank(&file, &wpath, &cfg, k).with_context(|| format!("adapter pack --rank {k} of {}", src.display()))?;
            cfg.lora_alpha = if cfg.use_rslora { cfg.lora_alpha * (k as f64 / cfg.r as f64).sqrt() } else { cfg.lora_alpha * k as f64 / cfg.r as f64 };
            cfg.r = k;
            (cut, Some(report))
        }
        None => (BTreeMap::new(), None),
    };
    let mut out: Vec<Entry> = Vec::new();
    let mut bytes_in = 0u64;
    for name in file.names() {
        let t = file.require(&name)?;
        bytes_in += t.bytes.len() as u64;
        if drop_head && name == HEAD_ROWS {
            continue;
        }
        let (shape, v) = match cut.remove(&name) {
            Some(replaced) => replaced,
            None => (t.shape.to_vec(), t.to_f32().with_context(|| format!("{}: tensor `{name}` is not a float tensor", wpath.display()))?),
        };
        out.push((name.clone(), dtype.safetensors_name().into(), shape, encode_f32(&v, dtype)));
    }
    if drop_head {
        if let Some(TokenIndices::PerModule(m)) = cfg.trainable_token_indices.as_mut() {
            m.remove("lm_head");
        }
    }
    let bytes_out = out.iter().map(|e| e.3.len() as u64).sum();
    let tensors = out.len();
    let staged = StagedDir::new(dst, false)?;
    write_all(&staged.path().join(WEIGHTS), &out, Some(BTreeMap::from([("format".to_string(), "pt".to_string())])))?;
    crate::io::atomic::write(&staged.path().join(CONFIG), cfg.to_json()?.as_bytes())?;
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot list {}", src.display()))? {
        let p = entry?.path();
        let name = p.file_name().unwrap_or_default();
        if p.is_file() && name != WEIGHTS && name != CONFIG {
            std::fs::copy(&p, staged.path().join(name)).with_context(|| format!("cannot copy {}", p.display()))?;
        }
    }
    staged.commit()?;
    Ok(PackReport { tensors, bytes_in, bytes_out, deduplicated_head: drop_head, rank_cut })
}

/// The rank-`k` replacement of every `lora_A` / `lora_B` pair in `file`, by tensor name.
#[allow(clippy::type_complexity)]
fn lower_rank(file: &crate::io::safetensors::SafetensorsFile, wpath: &Path, cfg: &AdapterConfig, k: usize) -> Result<(BTreeMap<String, (Vec<usize>, Vec<f32>)>, RankCut)> {
    use anyhow::Context;
    if k == 0 || k >= cfg.r {
        bail!("the rank must be at least 1 and below the adapter's r = {} (its adapter_config.json)", cfg.r);
    }
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        bail!("the adapter sets rank_pattern / alpha_pattern (per-module ranks), which --rank does not lower; pack it without --rank");
    }
    let mut cut = BTreeMap::new();
    let mut dropped = Vec::new();
    for a_name in file.names().into_iter().filter(|n| n.ends_with(".lora_A.weight")) {
        let b_name = a_name.replace(".lora_A.weight", ".lora_B.weight");
        let (a, b) = (file.require(&a_name)?, file.require(&b_name).with_context(|| format!("{}: `{a_name}` has no `{b_name}`", wpath.display()))?);
        let (&[r, in_dim], &[out_dim, rb]) = (a.shape, b.shape) else {
            bail!("{}: `{a_name}` {:?} / `{b_name}` {:?} are not 2-D LoRA factors", wpath.display(), a.shape, b.shape);
        };
        if r != rb || r != cfg.r {
            bail!("{}: `{a_name}` has rank {r}, `{b_name}` {rb}, the config r = {}", wpath.display(), cfg.r);
        }
        let (av, bv) = (a.to_f32()?, b.to_f32()?);
        // A NaN or inf would run through the SVD into every value of the pair, silently.
        if let Some(n) = [(&a_name, &av), (&b_name, &bv)].into_iter().find_map(|(n, v)| v.iter().any(|x| !x.is_finite()).then_some(n)) {
            bail!("{}: `{n}` holds NaN or inf values; the adapter is broken, pack it from a good checkpoint", wpath.display());
        }
        let t = super::truncate::truncate_pair(&av, &bv, r, in_dim, out_dim, k).with_context(|| format!("{}: `{a_name}`", wpath.display()))?;
        dropped.push(t.dropped_energy);
        cut.insert(a_name, (vec![k, in_dim], t.a));
        cut.insert(b_name, (vec![out_dim, k], t.b));
    }
    if dropped.is_empty() {
        bail!("{} holds no LoRA pairs (only tables), so there is no rank to lower", wpath.display());
    }
    dropped.sort_by(f64::total_cmp);
    let report = RankCut { from: cfg.r, to: k, pairs: dropped.len(), dropped_energy_median: dropped[dropped.len() / 2], dropped_energy_max: dropped[dropped.len() - 1] };
    Ok((cut, report))
}
