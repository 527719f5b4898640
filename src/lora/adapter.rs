//! PEFT adapters on disk: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys, as PEFT writes them:
//! - `base_model.model.<module>.lora_A.weight` `[r, in]`, `...lora_B.weight` `[out, r]`;
//! - `modules_to_save` tables stored whole: `base_model.model.model.embed_tokens.weight`,
//!   `base_model.model.lm_head.weight`;
//! - trainable tokens (`trainable_token_indices`): `...embed_tokens.token_adapter.trainable_tokens_delta`
//!   `[n, hidden]` holding the *values* of rows `indices` (PEFT replaces rows, it does not add).
//!
//! Reading is lazy (tensors stay in the mapped file) so `merge` never holds more than one
//! tensor of an adapter at a time.

use super::config::{parse_module, AdapterConfig};
use super::LoraBranch;
use crate::io::safetensors::{FloatType, RawTensor, SafetensorsFile};
use crate::model::{Linear, Llama, TokenTable};
use anyhow::{bail, Context, Result};
use burn::tensor::{Device, Tensor, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const WEIGHTS: &str = "adapter_model.safetensors";
pub const CONFIG: &str = "adapter_config.json";
const PREFIX: &str = "base_model.model.";

/// How an adapter changes a token table.
#[derive(Debug, Clone, PartialEq)]
pub enum TableUpdate {
    /// `modules_to_save`: the whole table, `[rows, hidden]`.
    Full { key: String },
    /// Trainable tokens: new values for `indices`.
    Rows { key: String, indices: Vec<usize> },
}

impl TableUpdate {
    pub fn key(&self) -> &str {
        match self {
            TableUpdate::Full { key } | TableUpdate::Rows { key, .. } => key,
        }
    }
}

/// The two keys of one LoRA pair.
#[derive(Debug, Clone)]
pub struct LoraKeys {
    pub a: String,
    pub b: String,
}

/// An adapter folder, parsed and validated against itself (not yet against a base).
pub struct AdapterFile {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub file: SafetensorsFile,
    /// Module path (`model.layers.0.self_attn.q_proj`) → its A/B keys.
    pub lora: BTreeMap<String, LoraKeys>,
    pub embed: Option<TableUpdate>,
    pub lm_head: Option<TableUpdate>,
}

impl AdapterFile {
    /// Whether this adapter updates a tied model's one table from `embed_tokens` rows alone.
    /// Trainable-token rows given only for `embed_tokens` update both uses of a tied table (PEFT's
    /// weight-tied trainable tokens; `adapter pack` stores them once); a whole `embed_tokens`
    /// alone unties it, as PEFT's `modules_to_save` copy does. Used by `apply` and `merge`.
    pub fn updates_tied_table_from_embed_rows(&self, tied: bool) -> bool {
        tied && matches!(self.embed, Some(TableUpdate::Rows { .. })) && self.lm_head.is_none()
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let config = AdapterConfig::load(dir)?;
        let wpath = dir.join(WEIGHTS);
        if !wpath.exists() {
            if dir.join("adapter_model.bin").exists() {
                bail!("{}: only adapter_model.bin (pickle) is present; convert it to safetensors with PEFT (save_pretrained(safe_serialization=True))", dir.display());
            }
            bail!("{}: missing {WEIGHTS}", dir.display());
        }
        let file = SafetensorsFile::open(&wpath)?;
        let mut a_keys = BTreeMap::new();
        let mut b_keys = BTreeMap::new();
        let (mut embed, mut lm_head) = (None, None);
        for key in file.names() {
            let rest = key.strip_prefix(PREFIX).unwrap_or(&key);
            // Some tools keep PEFT's adapter name in the key.
            let rest = rest.replace(".default.", ".");
            let rest = rest.strip_suffix(".default").unwrap_or(&rest).to_string();
            if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                a_keys.insert(m.to_string(), key.clone());
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                b_keys.insert(m.to_string(), key.clone());
            } else if rest == "model.embed_tokens.weight" || rest == "model.embed_tokens.modules_to_save.weight" {
                embed = Some(TableUpdate::Full { key: key.clone() });
            } else if rest == "lm_head.weight" || rest == "lm_head.modules_to_save.weight" {
                lm_head = Some(TableUpdate::Full { key: key.clone() });
            } else if rest == "model.embed_tokens.token_adapter.trainable_tokens_delta" {
                let indices = config
                    .token_indices("embed_tokens")
                    .with_context(|| format!("{}: has {key} but adapter_config.json lists no trainable_token_indices for embed_tokens", dir.display()))?;
                embed = Some(TableUpdate::Rows { key: key.clone(), indices });
            } else if rest == "lm_head.token_adapter.trainable_tokens_delta" {
                let indices = config
                    .token_indices("lm_head")
                    .with_context(|| format!("{}: has {key} but adapter_config.json lists no trainable_token_indices for lm_head", dir.display()))?;
                lm_head = Some(TableUpdate::Rows { key: key.clone(), indices });
            } else {
                bail!("{}: unrecognised tensor `{key}` (expected LoRA A/B, embed_tokens / lm_head tables or trainable tokens)", wpath.display());
            }
        }
        let mut lora = BTreeMap::new();
        for (m, a) in a_keys {
            let b = b_keys.remove(&m).with_context(|| format!("{}: `{a}` has no matching lora_B", wpath.display()))?;
            if parse_module(&m).is_none() {
                bail!("{}: LoRA on `{m}` is not a LLaMA projection (targets: {:?})", wpath.display(), super::config::TARGETS);
            }
            let (ra, rb) = (file.require(&a)?, file.require(&b)?);
            for (key, raw) in [(&a, &ra), (&b, &rb)] {
                if raw.float_type().is_none() {
                    bail!("{}: tensor `{key}` is stored as {:?}; LoRA weights must be F32, F16 or BF16 (re-save the adapter with PEFT)", wpath.display(), raw.dtype);
                }
            }
            if ra.shape.len() != 2 || rb.shape.len() != 2 || ra.shape[0] != rb.shape[1] {
                bail!("{}: `{m}` has lora_A {:?} and lora_B {:?}; expected [r, in] and [out, r]", wpath.display(), ra.shape, rb.shape);
            }
            config.check_module(&m, ra.shape[0]).with_context(|| format!("{}: tensors `{a}`, `{b}` disagree with {}", wpath.display(), dir.join(CONFIG).display()))?;
            lora.insert(m, LoraKeys { a, b });
        }
        if let Some((m, b)) = b_keys.into_iter().next() {
            bail!("{}: `{b}` has no matching lora_A (module {m})", wpath.display());
        }
        for key in file.names() {
            if let Some(i) = file.require(&key)?.first_non_finite() {
                bail!("{}: tensor `{key}` holds NaN or ±inf (element {i}); the adapter was saved from a diverged run", wpath.display());
            }
        }
        for t in [&embed, &lm_head].into_iter().flatten() {
            let raw = file.require(t.key())?;
            if raw.float_type().is_none() {
                bail!("{}: tensor `{}` is stored as {:?}; token tables must be F32, F16 or BF16", wpath.display(), t.key(), raw.dtype);
            }
            if raw.shape.len() != 2 {
                bail!("{}: `{}` has shape {:?}; expected [rows, hidden]", wpath.display(), t.key(), raw.shape);
            }
            if let TableUpdate::Rows { indices, .. } = t {
                if indices.len() != raw.shape[0] {
                    bail!("{}: `{}` has {} rows but trainable_token_indices lists {}", wpath.display(), t.key(), raw.shape[0], indices.len());
                }
            }
        }
        Ok(AdapterFile { dir: dir.to_path_buf(), config, file, lora, embed, lm_head })
    }

    pub fn raw(&self, key: &str) -> Result<RawTensor<'_>> {
        self.file.require(key)
    }

    /// The scale of `module`'s update.
    pub fn scale(&self, module: &str) -> Result<f64> {
        let keys = &self.lora[module];
        let r = self.raw(&keys.a)?.shape[0];
        Ok(self.config.scale_for(module, r))
    }

    /// Rows the table has after this update is applied to a table of `rows` rows.
    pub fn rows_after(&self, update: &TableUpdate, rows: usize) -> Result<usize> {
        let raw = self.raw(update.key())?;
        Ok(match update {
            // Fewer rows than the base is never a vocabulary change an adapter can mean: applied,
            // it would silently drop the base's last tokens.
            TableUpdate::Full { .. } if raw.shape[0] < rows => bail!(
                "{}: `{}` has {} rows but the base's table has {rows}: this adapter was trained for another (smaller) vocabulary; use the base it was trained on",
                self.dir.display(),
                update.key(),
                raw.shape[0]
            ),
            TableUpdate::Full { .. } => raw.shape[0],
            TableUpdate::Rows { indices, .. } => {
                let max = indices.iter().copied().max().map(|m| m.saturating_add(1)).unwrap_or(0);
                if max > rows {
                    // New rows may only be appended, contiguously, right after the existing ones.
                    // Compared without building rows..max: an index from a hostile config may be
                    // near usize::MAX.
                    let mut beyond: Vec<usize> = indices.iter().copied().filter(|&i| i >= rows).collect();
                    beyond.sort_unstable();
                    if beyond.len() != max - rows || beyond.iter().enumerate().any(|(k, &i)| i != rows + k) {
                        bail!(
                            "{}: trainable token indices go up to {} but the table has {rows} rows and the indices beyond it are not exactly {rows}..{max}",
                            self.dir.display(),
                            max - 1
                        );
                    }
                    max
                } else {
                    rows
                }
            }
        })
    }

    /// Applies a table update to host rows `table` (`rows × hidden`, f32), growing it if needed.
    pub fn update_table(&self, update: &TableUpdate, table: &mut Vec<f32>, rows: usize, hidden: usize) -> Result<usize> {
        let raw = self.raw(update.key())?;
        if raw.shape[1] != hidden {
            bail!("{}: `{}` has hidden size {} but the model's is {hidden}", self.dir.display(), update.key(), raw.shape[1]);
        }
        let new_rows = self.rows_after(update, rows)?;
        let vals = raw.to_f32()?;
        match update {
            TableUpdate::Full { .. } => *table = vals,
            TableUpdate::Rows { indices, .. } => {
                table.resize(new_rows * hidden, 0.0);
                for (k, &i) in indices.iter().enumerate() {
                    table[i * hidden..(i + 1) * hidden].copy_from_slice(&vals[k * hidden..(k + 1) * hidden]);
                }
            }
        }
        Ok(new_rows)
    }
}

/// The projection at a module path (`model.layers.0.self_attn.q_proj`).
pub(crate) fn linear_mut<'a>(model: &'a mut Llama, module: &str) -> Option<&'a mut Linear> {
    let (n, _) = parse_module(module)?;
    let layer = model.layers.get_mut(n)?;
    let prefix = format!("model.layers.{n}.");
    layer.projections_mut().into_iter().find(|(p, _)| module.strip_prefix(&prefix) == Some(*p)).map(|(_, l)| l)
}

/// Every projection of the model with its module path, for saving.
pub fn linears(model: &Llama) -> Vec<(String, &Linear)> {
    model.layers.iter().enumerate().flat_map(|(i, l)| l.projections().map(|(p, lin)| (format!("model.layers.{i}.{p}"), lin))).collect()
}

/// Every projection of the model with its module path, mutably, in layer then target order.
pub fn linears_mut(model: &mut Llama) -> Vec<(String, &mut Linear)> {
    model.layers.iter_mut().enumerate().flat_map(|(i, l)| l.projections_mut().map(move |(p, lin)| (format!("model.layers.{i}.{p}"), lin))).collect()
}

fn host_tensor(raw: &RawTensor<'_>, device: &Device) -> Result<Tensor<2>> {
    let v = raw.to_f32()?;
    Ok(Tensor::from_data(TensorData::new(v, [raw.shape[0], raw.shape[1]]), device))
}

fn table_dtype(t: &TokenTable) -> FloatType {
    match t.base.val().dtype() {
        burn::tensor::DType::F16 => FloatType::F16,
        burn::tensor::DType::BF16 => FloatType::BF16,
        _ => FloatType::F32,
    }
}

/// Applies the adapter at `dir` to `model`, unmerged: LoRA branches are added to the
/// projections (kept rank-sized, f32), and token tables are replaced or grown.
pub fn apply(mut model: Llama, dir: &Path, device: &Device) -> Result<Llama> {
    let ad = AdapterFile::open(dir)?;
    for (module, keys) in &ad.lora {
        let scale = ad.scale(module)?;
        let (a, b) = (ad.raw(&keys.a)?, ad.raw(&keys.b)?);
        let layers = model.config.num_layers;
        let lin = linear_mut(&mut model, module)
            .with_context(|| format!("{}: adapter targets `{module}`, which the base model does not have ({layers} layers)", dir.display()))?;
        let (out, inp) = (lin.out_features(), lin.in_features());
        if a.shape[1] != inp || b.shape[0] != out {
            bail!(
                "{}: `{module}` has lora_A {:?} / lora_B {:?} but the base weight is [{out}, {inp}]: this adapter was trained on another model",
                dir.display(),
                a.shape,
                b.shape
            );
        }
        lin.lora.push(LoraBranch::new(host_tensor(&a, device)?, host_tensor(&b, device)?, scale, 0.0));
    }
    apply_tables(&mut model, &ad, device)?;
    Ok(model)
}

fn apply_tables(model: &mut Llama, ad: &AdapterFile, device: &Device) -> Result<()> {
    if ad.embed.is_none() && ad.lm_head.is_none() {
        return Ok(());
    }
    let hidden = model.config.hidden_size;
    let dtype = table_dtype(&model.embed_tokens);
    let old_embed = model.embed_tokens.weight();
    let old_head = model.lm_head.as_ref().map(|h| h.weight());
    let host = |t: &Tensor<2>| crate::io::weights::tensor_to_f32(t.clone());
    let rows = model.embed_tokens.rows();
    let mut embed = None;
    if let Some(u) = &ad.embed {
        let mut v = host(&old_embed);
        let n = ad.update_table(u, &mut v, rows, hidden)?;
        embed = Some((v, n));
    }
    let mut head = None;
    if let Some(u) = &ad.lm_head {
        // A tied model's head is its embedding as it was before this adapter.
        let mut v = host(old_head.as_ref().unwrap_or(&old_embed));
        let n = ad.update_table(u, &mut v, rows, hidden)?;
        head = Some((v, n));
    }
    let upload = |v: &[f32], n: usize| -> TokenTable {
        TokenTable::new(Tensor::from_data(crate::io::weights::f32_data(v, [n, hidden], dtype), (device, dtype.burn())))
    };
    let was_tied = model.lm_head.is_none();
    let tied_rows_only = ad.updates_tied_table_from_embed_rows(was_tied);
    let embed_rows = embed.as_ref().map(|e| e.1).unwrap_or(rows);
    let head_rows = match &head {
        Some(h) => h.1,
        None if tied_rows_only => embed_rows,
        None => old_head.as_ref().map(|h| h.dims()[0]).unwrap_or(rows),
    };
    if embed_rows != head_rows {
        bail!(
            "{}: after this adapter embed_tokens has {embed_rows} rows but lm_head has {head_rows}; the adapter must update both tables when it grows the vocabulary",
            ad.dir.display()
        );
    }
    match (embed, head) {
        (Some((e, n)), Some((h, _))) if was_tied && e == h => {
            model.embed_tokens = upload(&e, n);
        }
        (Some((e, n)), None) if tied_rows_only => {
            model.embed_tokens = upload(&e, n);
        }
        (e, h) => {
            // Diverging tables untie a tied model: the head keeps what it was unless updated.
            let new_head = match h {
                Some((h, n)) => upload(&h, n),
                None => TokenTable::new(old_head.unwrap_or_else(|| old_embed.clone())),
            };
            if let Some((e, n)) = e {
                model.embed_tokens = upload(&e, n);
            }
            model.lm_head = Some(new_head);
            model.config.tie_word_embeddings = false;
        }
    }
    model.config.vocab_size = embed_rows;
    Ok(())
}
