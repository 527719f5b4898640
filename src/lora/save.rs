//! Writing the model's LoRA branches and trained token rows as a PEFT adapter.

use super::adapter::{linears, CONFIG, WEIGHTS};
use super::config::{AdapterConfig, TokenIndices};
use super::TableMode;
use crate::io::atomic::StagedDir;
use crate::io::safetensors::{encode_f32, write_all, FloatType};
use crate::io::weights::tensor_to_f32;
use crate::model::{Llama, TokenTable};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Which parts of the token tables an adapter carries.
#[derive(Debug, Clone, Copy)]
pub struct TableSave {
    pub embed: TableMode,
    pub lm_head: TableMode,
    /// Rows of the vocabulary before extension; `new_rows` saves the rows after it.
    pub old_vocab: usize,
}

type Entry = (String, String, Vec<usize>, Vec<u8>);

fn entry(key: String, shape: Vec<usize>, v: &[f32]) -> Entry {
    (key, "F32".into(), shape, encode_f32(v, FloatType::F32))
}

fn table_entries(t: &TokenTable, module: &str, key_prefix: &str, mode: TableMode, old_vocab: usize, cfg: &mut AdapterConfig, out: &mut Vec<Entry>) -> Result<()> {
    let hidden = t.hidden();
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
            let w = t.weight().slice([old_vocab..rows, 0..hidden]);
            out.push(entry(format!("{key_prefix}.token_adapter.trainable_tokens_delta"), vec![rows - old_vocab, hidden], &tensor_to_f32(w)));
            let idx: Vec<usize> = (old_vocab..rows).collect();
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
    table_entries(&model.embed_tokens, "embed_tokens", "base_model.model.model.embed_tokens", tables.embed, tables.old_vocab, &mut cfg, &mut out)?;
    // A tied head is saved as its own copy so that PEFT, which unties modules_to_save, gets
    // the same model; merge re-ties identical tables.
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let head_mode = if model.lm_head.is_none() { tables.embed } else { tables.lm_head };
    table_entries(head, "lm_head", "base_model.model.lm_head", head_mode, tables.old_vocab, &mut cfg, &mut out)?;
    if out.is_empty() {
        bail!("nothing to save: the model has no LoRA branches and no trainable tables");
    }
    let staged = StagedDir::new(dir, true)?;
    write_all(&staged.path().join(WEIGHTS), &out, Some(BTreeMap::from([("format".to_string(), "pt".to_string())])))?;
    crate::io::atomic::write(&staged.path().join(CONFIG), cfg.to_json()?.as_bytes())?;
    for f in extra_files {
        if let Some(name) = f.file_name() {
            std::fs::copy(f, staged.path().join(name))?;
        }
    }
    staged.commit()?;
    Ok(())
}
